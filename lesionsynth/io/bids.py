"""BIDS derivative layout for `generate --format bids` (BIDS 1.11, checked with the official validator).

Layout of one output folder::

    dataset_description.json   DatasetType "derivative", GeneratedBy lesionsynth, SourceDatasets, DatasetLinks
    participants.tsv/.json     one row per subject; `case_id` keeps the original (nnU-Net) case id
    README, .bidsignore        .bidsignore lists what lesionsynth keeps that is not BIDS
    desc-lesion_dseg.tsv       only for multi-class labels: the look-up table of the dseg files
    sub-<label>/anat/sub-<label>[_acq-<a>][_ce-gadolinium][_desc-synth]_<T1w|T2w|FLAIR|PDw|T2starw>.nii.gz (+ .json)
    sub-<label>/anat/sub-<label>_desc-lesion_<mask|dseg>.nii.gz (+ .json)
    sub-<label>/ct/sub-<label>[_desc-synth]_ct.nii.gz (+ .json)          listed in .bidsignore (see below)
    sub-<label>/other/sub-<label>[_desc-synth]_<Name>.nii.gz (+ .json)   listed in .bidsignore (see below)

Naming decisions (references are to the BIDS specification 1.11 and its schema):

* Subjects: a BIDS label is alphanumeric only, so a case id loses every other character
  (`ATLAS_001` -> `sub-ATLAS001`); `participants.tsv` keeps the case id, and ids that would collide
  (also when compared without case, for case-insensitive file systems) are refused before anything is
  written (`subject_labels`).
* Images: MR contrasts use the anatomical suffixes (T1w, T2w, FLAIR, PDw, T2starw); a contrast-enhanced
  T1 (T1c, T1ce, T1Gd, ...) is `ce-gadolinium_T1w` with `ContrastBolusIngredient: GADOLINIUM`.
  Synthetic cases carry `desc-synth` (the desc entity distinguishes derivative files, and it lets
  `desc-synth` select the synthetic cases); original cases copied unchanged carry no desc.
  Two channels that map to the same name are told apart by `acq-<channel name>`.
* CT: BIDS 1.11 has no CT datatype or suffix (CT is BEP024, not merged: the schema's modalities are
  mri, eeg, emg, ieeg, meg, beh, pet, micr, motion, nirs, mrs; uCT/XPCT are microscopy). A `_CT` suffix
  in `anat/` is an error for the validator, so CT volumes go to `sub-<label>/ct/sub-<label>_ct.nii.gz`,
  the layout of the BEP024 draft that tools already use, and `sub-*/ct/` is in `.bidsignore`, the
  spec's mechanism for data it does not cover yet. Channels of no known modality go the same way to
  `sub-*/other/` with their alphanumeric name as suffix.
* Label: a binary label (values {0, 1}) is a mask, `desc-lesion_mask` with `"Type": "Lesion"` in the
  sidecar (the spec's mask Type enum has "Lesion"; `label-` would need the prescribed tissue vocabulary,
  which has no lesion term). A label with more classes is not a mask ("A binary mask that functions as
  a discrete label for a single structure") but a discrete segmentation, `desc-lesion_dseg`, described
  by one `desc-lesion_dseg.tsv` (index, name) at the top level (inheritance principle).
  The label stays in `anat/` also for CT data: masks and dsegs are only defined for anat/func/dwi.
* Sidecars: `Sources` are BIDS URIs `bids:source:<path>` into the source dataset, declared in
  `DatasetLinks` (relative paths in Sources are deprecated); derivative MR images REQUIRE
  `SkullStripped` (lesionsynth does not skull-strip: false unless told otherwise).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .._version import __version__
from ..errors import InputError
from .nifti import write_bytes_atomic

#: the BIDS release this layout follows (the newest one the official validator 3.0.2 knows)
BIDS_VERSION = "1.11.1"
DESC_SYNTH = "synth"
DESC_LABEL = "lesion"
SOURCE_LINK = "source"  # DatasetLinks name of the source dataset, used in bids:source:<path> URIs
CT_DATATYPE = "ct"
OTHER_DATATYPE = "other"
CONTRAST_AGENT = "gadolinium"

#: what lesionsynth keeps beside the BIDS files, in .bidsignore. Anchored and without a trailing slash:
#: the validator (3.0.2) does not match folders written `dir/` (bids-standard/bids-validator#291).
BIDSIGNORE = (
    "# written by lesionsynth: files that are not part of BIDS",
    "/manifest.jsonl",
    "/run.json",
    "/splits_final.json",
    "/dataset.json",
    "/report",
    "/.progress",
    "# CT (BEP024 draft, not in BIDS 1.11) and channels of no BIDS modality",
    f"/sub-*/{CT_DATATYPE}",
    f"/sub-*/{OTHER_DATATYPE}",
)

_ALNUM = re.compile(r"[^A-Za-z0-9]")
_MR_SUFFIX = {
    "t1": "T1w", "t1w": "T1w", "t1weighted": "T1w", "mprage": "T1w", "t1mprage": "T1w", "t1native": "T1w",
    "t2": "T2w", "t2w": "T2w", "t2weighted": "T2w",
    "flair": "FLAIR", "t2flair": "FLAIR", "t2wflair": "FLAIR", "flairt2": "FLAIR",
    "pd": "PDw", "pdw": "PDw",
    "t2star": "T2starw", "t2starw": "T2starw", "t2s": "T2starw",
}
_T1_CONTRAST = {"t1c", "t1ce", "t1gd", "t1wce", "t1wgd", "t1wc", "t1cgd", "t1post", "t1postcontrast",
                "t1contrast", "t1gadolinium", "t1enhanced", "t1cegd", "ce-t1", "cet1", "t1wpost"}


def _alnum(text: str) -> str:
    return _ALNUM.sub("", str(text))


# --------------------------------------------------------------------------------------------- subjects

def subject_label(case_id: str) -> str:
    """The BIDS subject label of a case: its letters and digits (`ATLAS_001` -> `ATLAS001`)."""
    label = _alnum(case_id)
    if not label:
        raise InputError(f"case id {case_id!r}: has no letter or digit, cannot name a BIDS subject")
    return label


def subject_labels(case_ids) -> dict[str, str]:
    """case id -> subject label for all cases; InputError if two cases would get the same subject.

    Labels that differ only in case are refused too: they would share a folder on macOS/Windows.
    Call this before writing anything.
    """
    labels: dict[str, str] = {}
    seen: dict[str, str] = {}
    for cid in case_ids:
        if cid in labels:
            continue
        label = subject_label(cid)
        other = seen.get(label.lower())
        if other is not None:
            raise InputError(f"case ids {other!r} and {cid!r} both become BIDS subject 'sub-{label}' "
                             f"(labels are letters and digits only); rename one of them")
        seen[label.lower()] = cid
        labels[cid] = label
    return labels


# --------------------------------------------------------------------------------------------- channels

@dataclass(frozen=True)
class ChannelFile:
    """Where one channel goes: datatype folder, entities before desc, suffix; bids=False: .bidsignore'd."""

    name: str
    datatype: str
    suffix: str
    entities: tuple[tuple[str, str], ...] = ()
    bids: bool = True

    @property
    def contrast_agent(self) -> str | None:
        return dict(self.entities).get("ce")


def _channel_kind(name: str, index: int) -> tuple[str, str, str | None, bool]:
    key = _alnum(name).lower()
    if key in _MR_SUFFIX:
        return "anat", _MR_SUFFIX[key], None, True
    if key in _T1_CONTRAST:
        return "anat", "T1w", CONTRAST_AGENT, True
    if key == "ct":
        return CT_DATATYPE, "ct", None, False
    return OTHER_DATATYPE, _alnum(name) or f"channel{index}", None, False


def channel_layout(channel_names) -> list[ChannelFile]:
    """Folder, entities and suffix of each channel; channels sharing a name get `acq-<channel name>`."""
    kinds = [_channel_kind(n, i) for i, n in enumerate(channel_names)]
    keys = [(d, s.lower(), ce) for d, s, ce, _ in kinds]
    files = []
    for i, (name, (datatype, suffix, ce, bids)) in enumerate(zip(channel_names, kinds)):
        entities: list[tuple[str, str]] = []
        if keys.count(keys[i]) > 1:
            acq = _alnum(name) or f"ch{i}"
            same = [j for j in range(len(kinds)) if keys[j] == keys[i]]
            if sum((_alnum(channel_names[j]) or f"ch{j}").lower() == acq.lower() for j in same) > 1:
                acq = f"{acq}ch{i}"
            entities.append(("acq", acq))
        if ce:
            entities.append(("ce", ce))
        files.append(ChannelFile(str(name), datatype, suffix, tuple(entities), bids))
    return files


def label_suffix(labels: dict | None) -> str:
    """'mask' for a binary label (values {0, 1}; also when labels is None), else 'dseg'."""
    if labels is None:
        return "mask"
    values = set()
    for v in labels.values():
        if isinstance(v, (list, tuple)):  # nnU-Net region-based labels
            return "dseg"
        values.add(int(v))
    return "mask" if values <= {0, 1} else "dseg"


def _name(sub: str, entities, suffix: str, ending: str) -> str:
    parts = [f"sub-{sub}"] + [f"{k}-{v}" for k, v in entities if v]
    return "_".join(parts) + f"_{suffix}{ending}"


def bids_case_paths(out: Path, case_id: str, channel_names: list[str], ending: str = ".nii.gz", *,
                    labels: dict | None = None, original: bool = False) -> tuple[list[Path], Path]:
    """(image paths, label path) of a case in the BIDS layout; the counterpart of output.case_paths.

    `original=True` for an original case copied from the source (no `desc-synth`); `labels` (name ->
    value, as in dataset.json) decides mask or dseg for the label. Pure: creates no folder.
    """
    out = Path(out)
    sub = subject_label(case_id)
    desc = () if original else (("desc", DESC_SYNTH),)
    images = [out / f"sub-{sub}" / ch.datatype / _name(sub, ch.entities + desc, ch.suffix, ending)
              for ch in channel_layout(channel_names)]
    label = out / f"sub-{sub}" / "anat" / _name(sub, (("desc", DESC_LABEL),), label_suffix(labels), ending)
    return images, label


def sidecar_path(image_path: Path) -> Path:
    """`x.nii.gz` / `x.nii` -> `x.json`."""
    name = image_path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return image_path.with_name(name[: -len(ext)] + ".json")
    return image_path.with_suffix(".json")


# ---------------------------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class SourceIndex:
    """What the bank says about the source dataset: root and, per case, image and label files."""

    root: Path
    kind: str
    channel_names: tuple[str, ...]
    cases: dict  # case_id -> {"images": [...], "label": str, "four_d": bool, "load_mm3": float}


def source_index(run: dict) -> SourceIndex | None:
    """The source dataset of a run (from run['bank']/bank.json), read once per process; None if unknown."""
    bank = run.get("bank") if run else None
    if not bank:
        return None
    path = Path(bank) / "bank.json"
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    return _cached_source_index(str(path), stamp)


@lru_cache(maxsize=4)
def _cached_source_index(path: str, _stamp: int) -> SourceIndex | None:
    try:
        from .locate import located

        index = located(json.loads(Path(path).read_text()), Path(path).parent)  # the cases' paths absolute
        cases = {c["case_id"]: {"images": list(c["images"]), "label": c["label"], "four_d": bool(c.get("four_d")),
                                "load_mm3": c.get("load_mm3")} for c in index["cases"]}
        dataset = index.get("dataset") or {}
        return SourceIndex(Path(dataset["root"]), str(dataset.get("kind", "")),
                           tuple(index.get("channel_names", ())), cases)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def source_uri(path: str | Path, root: Path) -> str:
    """`bids:source:<path relative to the source root>`, or a file:// URI for a file outside it."""
    path = Path(path)
    try:
        rel = path.resolve().relative_to(Path(root).resolve())
    except ValueError:
        return path.resolve().as_uri()
    return f"bids:{SOURCE_LINK}:{rel.as_posix()}"


def _case_sources(src: SourceIndex | None, case_ids, channel_index: int | None, with_label: bool) -> list[str]:
    if src is None:
        return []
    uris: list[str] = []
    for cid in case_ids:
        case = src.cases.get(cid)
        if case is None:
            continue
        files = []
        if channel_index is not None:
            images = case["images"]
            files.append(images[0] if case["four_d"] or channel_index >= len(images) else images[channel_index])
        if with_label:
            files.append(case["label"])
        for f in files:
            uri = source_uri(f, src.root)
            if uri not in uris:
                uris.append(uri)
    return uris


# --------------------------------------------------------------------------------------------- sidecars

_RECORD_KEYS = ("case_id", "case_index", "base_case", "donor_cases", "seed", "home_fold", "load_family", "mode",
                "target_load_mm3", "initial_load_mm3", "achieved_load_mm3", "achieved_load_voxels", "tolerance",
                "reached", "stop_reason", "lesions_added", "lesions_removed", "failed_placements",
                "placement_fallback")


def sidecar(record: dict | None, channel_name: str | None, run: dict, *, case_id: str | None = None,
            channel_index: int | None = None, channel_names=None, labels: dict | None = None,
            skull_stripped: bool = False, ending: str = ".nii.gz") -> dict:
    """JSON sidecar of one image (`channel_name`) or of the label (`channel_name=None`).

    `record` is the case's manifest record, or None for an original case (then give `case_id`).
    `channel_index` picks the source file of the channel (default: the position of `channel_name`
    in `channel_names` or in the bank's channel names).
    """
    synthetic = record is not None
    cid = record["case_id"] if synthetic else case_id
    if cid is None:
        raise ValueError("sidecar of an original case needs case_id")
    src = source_index(run)
    is_label = channel_name is None
    if not is_label and channel_index is None:
        names = list(channel_names or (src.channel_names if src else ()))
        channel_index = names.index(channel_name) if channel_name in names else None
    base = record["base_case"] if synthetic else cid
    donors = list(record.get("donor_cases") or []) if synthetic else []
    # an original file comes from one source file; a synthetic image also from the base label (inpainting)
    sources = _case_sources(src, [base], None if is_label else channel_index, is_label or synthetic)
    sources += [u for u in _case_sources(src, donors, None if is_label else channel_index, True) if u not in sources]

    what = "lesion label" if is_label else f"{channel_name} volume"
    if synthetic:
        desc = (f"Synthetic {what} made by lesionsynth from case '{base}': "
                f"{record.get('lesions_added', 0)} lesion(s) pasted from {len(donors)} "
                f"case(s), {record.get('lesions_removed', 0)} removed by inpainting; lesion load target "
                f"{record.get('target_load_mm3')} mm3, achieved {record.get('achieved_load_mm3')} mm3.")
    else:
        desc = f"Original {what} of case '{cid}', copied from the source dataset."
    side: dict = {"Description": desc}
    if is_label:
        if label_suffix(labels) == "mask":
            side["Type"] = "Lesion"
        names = list(channel_names or (src.channel_names if src else ()))
        if names:  # the label lies on the grid of the case's images: name the first one
            images, _ = bids_case_paths(Path("."), cid, names, ending, labels=labels, original=not synthetic)
            ref = next((p for p, ch in zip(images, channel_layout(names)) if ch.bids), images[0])
            side["SpatialReference"] = f"bids::{ref.as_posix()}"
    if sources:
        side["Sources"] = sources
    if not is_label:
        side["SkullStripped"] = bool(skull_stripped)
        if _channel_kind(channel_name, channel_index or 0)[2] == CONTRAST_AGENT:
            side["ContrastBolusIngredient"] = "GADOLINIUM"
    block: dict = {"version": __version__, "synthetic": synthetic, "case_id": cid,
                   "channel": "label" if is_label else channel_name}
    if synthetic:
        block.update({k: record[k] for k in _RECORD_KEYS if k in record})
        block["n_ops"] = len(record.get("ops") or [])
        block["volume_warp"] = record.get("volume_warp") is not None
        block["manifest"] = "manifest.jsonl"
    if is_label and labels:
        block["labels"] = {str(k): v for k, v in labels.items()}
    side["lesionsynth"] = block
    return side


def _json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def write_sidecars(out: Path, case_id: str, channel_names, record: dict | None, run: dict, *,
                   labels: dict | None = None, ending: str = ".nii.gz", skull_stripped: bool = False) -> list[Path]:
    """Write the JSON sidecar beside every image and the label of a case (each atomically).

    `record` None means an original case. Creates the subject folders if needed; returns the paths.
    """
    images, label = bids_case_paths(out, case_id, list(channel_names), ending, labels=labels,
                                    original=record is None)
    written = []
    for c, (name, path) in enumerate(zip(channel_names, images)):
        data = sidecar(record, name, run, case_id=case_id, channel_index=c, channel_names=channel_names,
                       labels=labels, skull_stripped=skull_stripped)
        written.append(_write_json(sidecar_path(path), data))
    data = sidecar(record, None, run, case_id=case_id, channel_names=channel_names, labels=labels, ending=ending)
    written.append(_write_json(sidecar_path(label), data))
    return written


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, _json_bytes(data))
    return path


def make_case_dirs(paths) -> None:
    """Create the folders of a case's files (bids_case_paths is pure)."""
    for p in paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)


# -------------------------------------------------------------------------------------- dataset metadata

def _tsv_value(v) -> str:
    if v is None or v == "":
        return "n/a"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(round(v, 3))
    return str(v).replace("\t", " ").replace("\n", " ")


_PARTICIPANT_COLUMNS = {
    "participant_id": {"Description": "BIDS subject: sub- and the case id without non-alphanumeric characters"},
    "case_id": {"Description": "Case id in lesionsynth's manifest and in the source dataset"},
    "synthetic": {"Description": "Whether the case was synthesised by lesionsynth",
                  "Levels": {"true": "synthetic case", "false": "original case copied from the source dataset"}},
    "base_case": {"Description": "Source case whose volume the synthetic case was built on (itself for originals)"},
    "load_family": {"Description": "Lesion-load distribution the target load was drawn from"},
    "target_load_mm3": {"Description": "Target lesion load", "Units": "mm^3"},
    "lesion_load_mm3": {"Description": "Lesion load of the written label (all lesion-labelled voxels)",
                        "Units": "mm^3"},
    "lesions_added": {"Description": "Lesions pasted"},
    "lesions_removed": {"Description": "Lesions removed by inpainting"},
    "reached": {"Description": "Whether the lesion load is within the tolerance of the target",
                "Levels": {"true": "within tolerance", "false": "not reached"}},
    "home_fold": {"Description": "Cross-validation fold the synthetic case was built for (splits_final.json)"},
}


def participants_rows(records: list[dict], original_ids, run: dict | None = None) -> list[dict]:
    """One row per subject, sorted by participant_id."""
    src = source_index(run or {})
    rows = []
    for cid in original_ids:
        load = (src.cases.get(cid) or {}).get("load_mm3") if src else None
        rows.append({"participant_id": f"sub-{subject_label(cid)}", "case_id": cid, "synthetic": False,
                     "base_case": cid, "lesion_load_mm3": load})
    for r in records:
        rows.append({"participant_id": f"sub-{subject_label(r['case_id'])}", "case_id": r["case_id"],
                     "synthetic": True, "base_case": r.get("base_case"), "load_family": r.get("load_family"),
                     "target_load_mm3": r.get("target_load_mm3"), "lesion_load_mm3": r.get("achieved_load_mm3"),
                     "lesions_added": r.get("lesions_added"), "lesions_removed": r.get("lesions_removed"),
                     "reached": r.get("reached"), "home_fold": r.get("home_fold")})
    return sorted(rows, key=lambda row: row["participant_id"])


def dataset_description(run: dict, n_synthetic: int, n_original: int) -> dict:
    conf = (run or {}).get("config") or {}
    src = source_index(run or {})
    desc: dict = {
        "Name": f"lesionsynth: {n_synthetic} synthetic lesion cases"
                + (f" (load '{conf['load']}', mode '{conf.get('mode')}', seed {conf.get('seed')})" if "load" in conf else "")
                + (f" + {n_original} original cases" if n_original else ""),
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "lesionsynth",
            "Version": str((run or {}).get("lesionsynth_version") or __version__),
            "Description": "Lesion-level data synthesis (LesionMix): lesions cut from the source dataset are "
                           "augmented and pasted, or removed by inpainting, so that each case reaches a drawn "
                           "lesion load. Full configuration in run.json, every operation in manifest.jsonl.",
        }],
    }
    if src is not None:
        uri = src.root.resolve().as_uri()
        desc["SourceDatasets"] = [{"URL": uri}]
        desc["DatasetLinks"] = {SOURCE_LINK: uri + "/"}
    return desc


def write_bids_metadata(out: Path, run: dict, records: list[dict], original_ids: list[str], channel_names,
                        labels: dict) -> None:
    """Write dataset_description.json, participants.tsv/.json, README, .bidsignore and, for multi-class
    labels, desc-lesion_dseg.tsv (each atomically). Call once every case is written (finalize)."""
    out = Path(out)
    original_ids = list(original_ids)
    subject_labels(original_ids + [r["case_id"] for r in records])  # refuse clashing subjects
    write_bytes_atomic(out / "dataset_description.json",
                       _json_bytes(dataset_description(run, len(records), len(original_ids))))

    rows = participants_rows(records, original_ids, run)
    columns = [c for c in _PARTICIPANT_COLUMNS if any(row.get(c) is not None for row in rows)]
    tsv = "\t".join(columns) + "\n" + "".join("\t".join(_tsv_value(row.get(c)) for c in columns) + "\n"
                                              for row in rows)
    write_bytes_atomic(out / "participants.tsv", tsv.encode())
    # "Description" of the table itself: the validator recommends it for every derivative file's sidecar
    meta = {"Description": "Subjects: original cases copied from the source dataset and synthetic cases"}
    meta.update({c: _PARTICIPANT_COLUMNS[c] for c in columns if c != "participant_id"})
    write_bytes_atomic(out / "participants.json", _json_bytes(meta))

    suffix = label_suffix(labels)
    if suffix == "dseg":
        lut = sorted(((int(v), str(k)) for k, v in labels.items() if not isinstance(v, (list, tuple))))
        write_bytes_atomic(out / f"desc-{DESC_LABEL}_dseg.tsv",
                           ("index\tname\n" + "".join(f"{i}\t{n}\n" for i, n in lut)).encode())
    write_bytes_atomic(out / "README", _readme(run, records, original_ids, channel_names, labels).encode())
    write_bytes_atomic(out / ".bidsignore", ("\n".join(BIDSIGNORE) + "\n").encode())


def _readme(run, records, original_ids, channel_names, labels) -> str:
    layout = channel_layout(list(channel_names))
    lines = [
        "# Synthetic lesion-segmentation dataset (lesionsynth)",
        "",
        f"BIDS derivative dataset written by lesionsynth {(run or {}).get('lesionsynth_version') or __version__}: "
        f"{len(records)} synthetic case(s) (subjects with `desc-synth` images)"
        + (f" and {len(original_ids)} original case(s) copied from the source dataset." if original_ids else "."),
        "",
        "Channels:",
    ]
    for ch in layout:
        note = "" if ch.bids else " (not covered by BIDS 1.11; listed in .bidsignore)"
        lines.append(f"- {ch.name}: sub-<label>/{ch.datatype}/*_{ch.suffix}.nii.gz{note}")
    suffix = label_suffix(labels)
    lines += ["", f"Label: sub-<label>/anat/*_desc-{DESC_LABEL}_{suffix}.nii.gz"
              + (" (binary lesion mask)" if suffix == "mask" else f" (classes in desc-{DESC_LABEL}_dseg.tsv)"),
              "",
              "participants.tsv maps each subject to its case id (`case_id`) and, for synthetic cases, the base",
              "case and lesion loads. Each image's JSON sidecar lists its Sources (BIDS URIs into the source",
              "dataset named `source` in dataset_description.json DatasetLinks) and a `lesionsynth` block.",
              "manifest.jsonl (every operation of every synthetic case) and run.json (the configuration) are",
              "lesionsynth's own files and are listed in .bidsignore.", ""]
    return "\n".join(lines)
