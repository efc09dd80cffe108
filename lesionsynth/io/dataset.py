"""Find the cases of a dataset (nnU-Net v2 raw, Medical Segmentation Decathlon, CSV/JSON list).

Reading a case is `validate.load_case` (it runs the checks of `lesionsynth check`): validate imports
the types here, never the other way round.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputError
from .images import IMAGE_ENDINGS


@dataclass(frozen=True)
class CaseRef:
    """Where one case lives on disk. `image_paths` holds one file per channel, or one 4-D file (MSD)."""

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path
    four_d: bool = False
    #: label values declared in dataset.json; load_case rejects others (empty: not checked)
    declared_labels: tuple[int, ...] = ()


@dataclass
class DatasetSpec:
    """A dataset: its format, channel names, label names and cases."""

    root: Path
    kind: str  # "nnunet", "msd" or "list"
    channel_names: list[str]
    labels: dict[str, int]
    cases: list[CaseRef]
    problems: list[str] = field(default_factory=list)


@dataclass
class Case:
    """One loaded case: channels (C, X, Y, Z) float32 in stored voxel order, integer label, shared affine."""

    case_id: str
    channels: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    channel_headers: list
    label_header: nib.Nifti1Header

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def voxel_volume(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))


def _strip_ending(name: str) -> str:
    for end in IMAGE_ENDINGS:
        if name.endswith(end):
            return name[: -len(end)]
    return name


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    return data


def _labels_from_json(meta: dict, path: Path) -> dict[str, int]:
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: 'labels' must be a non-empty mapping")
    labels: dict[str, int] = {}
    for key, value in raw.items():
        # nnU-Net v2: {"name": int}; MSD: {"int": "name"}
        if isinstance(value, int) and not isinstance(value, bool):
            labels[str(key)] = int(value)
        elif isinstance(value, str) and re.fullmatch(r"\d+", str(key)):
            labels[value] = int(key)
        elif isinstance(value, list):  # nnU-Net region-based labels are not supported
            raise InputError(f"{path}: region-based label '{key}' is not supported; use plain integer labels")
        else:
            raise InputError(f"{path}: label '{key}' has a non-integer value {value!r}")
    return labels


def _channel_names(meta: dict, path: Path) -> list[str]:
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: 'channel_names' (or MSD 'modality') must be a non-empty mapping")
    try:
        order = sorted(raw, key=lambda k: int(k))
    except ValueError:
        raise InputError(f"{path}: channel keys must be integers, got {sorted(raw)}") from None
    return [str(raw[k]) for k in order]


def open_dataset(path: str | Path) -> DatasetSpec:
    """Discover the cases of a dataset folder or list file; raise InputError on a malformed layout."""
    root = Path(path)
    if not root.exists():
        raise InputError(f"{root}: no such file or folder")
    if root.is_file():
        return _open_list(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        lists = sorted(root.glob("*.csv"))
        if len(lists) == 1:
            return _open_list(lists[0])
        raise InputError(f"{meta_path}: missing (need an nnU-Net v2 or MSD dataset.json, or a CSV case list)")
    meta = _read_json(meta_path)
    if "training" in meta:
        return _open_msd(root, meta, meta_path)
    return _open_nnunet(root, meta, meta_path)


def _open_nnunet(root: Path, meta: dict, meta_path: Path) -> DatasetSpec:
    channels = _channel_names(meta, meta_path)
    labels = _labels_from_json(meta, meta_path)
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in IMAGE_ENDINGS:
        raise InputError(f"{meta_path}: file_ending {ending!r} is not supported (use {', '.join(IMAGE_ENDINGS)})")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise InputError(f"{folder}: missing folder")
    pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
    found: dict[str, dict[int, Path]] = {}
    problems: list[str] = []
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith("."):
            continue
        m = pattern.match(f.name)
        if not m:
            problems.append(f"{f}: file name does not match {{case}}_{{XXXX}}{ending}")
            continue
        found.setdefault(m["case"], {})[int(m["ch"])] = f
    cases = []
    for case_id in sorted(found):
        chans = found[case_id]
        missing = [i for i in range(len(channels)) if i not in chans]
        extra = [i for i in chans if i >= len(channels)]
        for i in missing:
            problems.append(f"{images_dir / f'{case_id}_{i:04d}{ending}'}: missing channel {i} ({channels[i]})")
        for i in extra:
            problems.append(f"{chans[i]}: channel {i} is not declared in dataset.json channel_names")
        label = labels_dir / f"{case_id}{ending}"
        if not label.is_file():
            problems.append(f"{label}: missing label for case {case_id}")
        if missing or extra or not label.is_file():
            continue
        cases.append(CaseRef(case_id, tuple(chans[i] for i in range(len(channels))), label,
                             declared_labels=_declared(labels)))
    for f in sorted(labels_dir.iterdir()):
        if f.name.startswith("."):
            continue
        if f.name.endswith(ending):
            if f.name[: -len(ending)] not in found:
                problems.append(f"{f}: label without images")
        elif f.name.endswith(IMAGE_ENDINGS):
            problems.append(f"{f}: file name does not end in {ending} (dataset.json file_ending)")
    n_declared = meta.get("numTraining")
    if isinstance(n_declared, int) and n_declared != len(found):
        problems.append(f"{meta_path}: numTraining is {n_declared} but imagesTr holds {len(found)} cases")
    return DatasetSpec(root, "nnunet", channels, labels, cases, problems)


def _declared(labels: dict[str, int]) -> tuple[int, ...]:
    return tuple(sorted(set(int(v) for v in labels.values())))


def _open_msd(root: Path, meta: dict, meta_path: Path) -> DatasetSpec:
    channels = _channel_names(meta, meta_path)
    labels = _labels_from_json(meta, meta_path)
    training = meta["training"]
    if not isinstance(training, list):
        raise InputError(f"{meta_path}: 'training' must be a list of {{image, label}} entries")
    cases, problems, seen = [], [], {}
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                or not isinstance(entry.get("label"), str):
            problems.append(f"{meta_path}: training entry {i} needs 'image' and 'label' paths")
            continue
        image, label = (root / entry["image"]).resolve(), (root / entry["label"]).resolve()
        case_id = _strip_ending(image.name)
        if case_id in seen:
            problems.append(f"{meta_path}: training entries {seen[case_id]} and {i} have the same case id "
                            f"{case_id!r}")
            continue
        seen[case_id] = i
        for p in (image, label):
            if not p.is_file():
                problems.append(f"{p}: file not found (training entry {i})")
        if image.is_file() and label.is_file():
            cases.append(CaseRef(case_id, (image,), label, four_d=len(channels) > 1,
                                 declared_labels=_declared(labels)))
    n_declared = meta.get("numTraining")
    if isinstance(n_declared, int) and n_declared != len(training):
        problems.append(f"{meta_path}: numTraining is {n_declared} but 'training' lists {len(training)} cases")
    return DatasetSpec(root, "msd", channels, labels, cases, problems)


def _open_list(path: Path) -> DatasetSpec:
    """A CSV with columns case_id, image_0[, image_1 ...], label (paths relative to the CSV)."""
    if path.suffix.lower() == ".json":
        meta = _read_json(path)
        rows = meta.get("cases")
        if not isinstance(rows, list):
            raise InputError(f"{path}: a JSON case list needs a 'cases' list")
        header = sorted({k for r in rows if isinstance(r, dict) for k in r})
    else:
        try:
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                rows = list(reader)
                header = reader.fieldnames or []
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"{path}: unreadable CSV ({exc})") from None
        meta = {}
    image_cols = sorted((c for c in header if re.fullmatch(r"image(_\d+)?", c)),
                        key=lambda c: int(c.split("_")[1]) if "_" in c else 0)
    if not image_cols or "label" not in header:
        raise InputError(f"{path}: needs columns 'image_0' (and image_1, ...) and 'label'; found {header}")
    names = meta.get("channel_names")
    channels = _channel_names(meta, path) if names else [c.replace("image_", "channel") for c in image_cols]
    base = path.parent
    labels = _labels_from_json(meta, path) if meta.get("labels") else {}
    cases, problems, seen = [], [], set()
    for n, row in enumerate(rows, start=2):
        paths = [row.get(c) or "" for c in image_cols]
        label = row.get("label") or ""
        if not all(paths) or not label:
            problems.append(f"{path}: line {n}: empty image or label path")
            continue
        images = tuple((base / p) for p in paths)
        case_id = row.get("case_id") or _strip_ending(Path(label).name)
        if case_id in seen:
            problems.append(f"{path}: line {n}: duplicate case_id {case_id!r}")
            continue
        seen.add(case_id)
        missing = [p for p in (*images, base / label) if not p.is_file()]
        for p in missing:
            problems.append(f"{p}: file not found (listed in {path.name} line {n})")
        if not missing:
            cases.append(CaseRef(case_id, images, base / label, declared_labels=_declared(labels)))
    return DatasetSpec(path, "list", channels, labels, cases, problems)
