"""Reading a `generate` output folder: its run record, manifest, dataset.json, labels and images (the report,
the realism audit and `inspect` read outputs through this)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import InputError
from .geometry import structure_for, voxel_volume

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"


@dataclass
class OutputRun:
    """What a generate output folder records about itself."""

    out: Path
    run: dict
    records: list[dict]
    dataset: dict            # dataset.json ({} while the run is unfinished)
    bank_dir: Path | None
    bank_index: dict | None  # bank.json, or None when the bank has moved

    @property
    def config(self) -> dict:
        return self.run.get("config", {})

    @property
    def file_ending(self) -> str:
        return self.dataset.get("file_ending") or self.config.get("file_ending") or ".nii.gz"

    @property
    def channel_names(self) -> list[str]:
        names = self.dataset.get("channel_names")
        if isinstance(names, dict) and names:
            return [str(names[k]) for k in sorted(names, key=int)]
        if self.bank_index:
            return list(self.bank_index["channel_names"])
        return ["channel0"]

    @property
    def lesion_labels(self) -> tuple[int, ...]:
        if self.bank_index:
            return tuple(int(v) for v in self.bank_index["config"]["lesion_labels"])
        return tuple(sorted({int(op["label_value"]) for r in self.records for op in r["ops"]
                             if op["op"] == "paste"})) or (1,)

    @property
    def connectivity(self) -> int:
        return int(self.bank_index["config"].get("connectivity", 26)) if self.bank_index else 26

    @property
    def min_volume_mm3(self) -> float:
        return float(self.bank_index["config"].get("min_volume_mm3", 0.0)) if self.bank_index else 0.0

    def tolerance(self, rec: dict) -> float:
        return float(rec.get("tolerance", self.config.get("tolerance", 0.1)))

    def within(self, rec: dict) -> bool:
        """The pipeline's own test: |achieved − target| ≤ tolerance × target."""
        t = float(rec["target_load_mm3"])
        return abs(float(rec["achieved_load_mm3"]) - t) <= self.tolerance(rec) * t + 1e-9

    def label_path(self, case_id: str) -> Path:
        return self.out / "labelsTr" / f"{case_id}{self.file_ending}"

    def image_path(self, case_id: str, channel: int) -> Path:
        return self.out / "imagesTr" / f"{case_id}_{channel:04d}{self.file_ending}"

    def bank_case(self, case_id: str) -> dict | None:
        if not self.bank_index:
            return None
        return next((c for c in self.bank_index["cases"] if c["case_id"] == case_id), None)


def read_manifest(path: Path) -> list[dict]:
    """Manifest records in case order; a line cut short by a kill is skipped."""
    records = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "case_id" in rec:
            records[rec.get("case_index", len(records))] = rec
    return [records[k] for k in sorted(records)]


def bank_fingerprint(bank_dir: str | Path) -> str:
    """sha256 of what a bank holds (bank.json without where its dataset lies: the dataset's root and the cases'
    file paths): the same for a copy of the bank anywhere, and after `lesionsynth relocate`."""
    index = json.loads((Path(bank_dir) / "bank.json").read_text())
    index.pop("dataset", None)
    index["cases"] = [{k: v for k, v in case.items() if k not in ("images", "label")} for case in index["cases"]]
    return hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()


def run_bank(out: Path, run: dict, bank_dir: str | Path | None = None) -> Path:
    """The bank folder of the run in `out` (run.json `run`): `bank_dir` if given (it must be the run's bank), else
    where run.json says; InputError if it is not there or not the run's bank."""
    recorded = run.get("bank")
    folder = Path(bank_dir) if bank_dir is not None else (Path(recorded) if recorded else None)
    if folder is None or not (folder / "bank.json").is_file():
        where = f"{folder}" if folder is not None else "no bank"
        raise InputError(f"{out}: the run's bank is not at {where} (moved?); name it with --bank")
    if bank_dir is not None:
        expected = run.get("bank_sha256")
        if expected is not None:
            same = bank_fingerprint(folder) == expected
        else:  # a run.json from before the fingerprint: the bank's size at least
            index = json.loads((folder / "bank.json").read_text())
            same = (len(index["lesions"]), len(index["cases"])) == (run.get("bank_lesions"), run.get("bank_cases"))
        if not same:
            raise InputError(f"{folder}: not the bank this run was made from (it holds other lesions, cases or "
                             f"settings than {out / RUN_FILE} records)")
    return folder


def read_output(out: str | Path, data_root: str | Path | None = None, bank: str | Path | None = None) -> OutputRun:
    """Open a generate output folder; InputError if it is not one. The bank's cases are found as the bank says
    (`io.locate.located`), or under `data_root` if given; `bank`: the run's bank where it is not where run.json
    says (`run_bank` checks it is the run's)."""
    from .io.locate import located

    out = Path(out)
    if not (out / RUN_FILE).is_file() or not (out / MANIFEST).is_file():
        raise InputError(f"{out}: not a lesionsynth generate output ({RUN_FILE} or {MANIFEST} missing)")
    try:
        run = json.loads((out / RUN_FILE).read_text())
        dataset = json.loads((out / "dataset.json").read_text()) if (out / "dataset.json").is_file() else {}
    except json.JSONDecodeError as exc:
        raise InputError(f"{out}: malformed {RUN_FILE} or dataset.json ({exc})") from None
    records = read_manifest(out / MANIFEST)
    bank_dir = run_bank(out, run, bank) if bank is not None else (Path(run["bank"]) if run.get("bank") else None)
    bank_index = None
    if bank_dir is not None and (bank_dir / "bank.json").is_file():
        try:
            bank_index = located(json.loads((bank_dir / "bank.json").read_text()), bank_dir, data_root)
        except json.JSONDecodeError:
            bank_index = None
    return OutputRun(out, run, records, dataset, bank_dir, bank_index)


def component_volumes(label: np.ndarray, affine: np.ndarray, lesion_labels, connectivity: int = 26,
                      min_volume_mm3: float = 0.0) -> np.ndarray:
    """Volumes (mm³) of the connected lesion components of a label volume, smallest kept ≥ min volume."""
    mask = np.isin(label, np.asarray(lesion_labels, dtype=label.dtype))
    comps, n = ndimage.label(mask, structure=structure_for(connectivity))
    if n == 0:
        return np.zeros(0)
    vols = np.bincount(comps.ravel(), minlength=n + 1)[1:] * voxel_volume(affine)
    return vols[vols >= min_volume_mm3]


def read_label(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(int16 label volume, affine) of a written label file."""
    from .io.images import load_image

    img = load_image(path)
    data = np.asanyarray(img.dataobj)
    if data.dtype.kind == "f":
        data = np.rint(data)
    return data.reshape(img.shape[:3]).astype(np.int16, copy=False), np.asarray(img.affine, dtype=np.float64)


def read_channel(path: Path, channel: int, four_d: bool) -> tuple[np.ndarray, np.ndarray]:
    """(float32 channel volume, affine) of a written image file (`four_d`: channel `channel` of a 4-D file)."""
    from .io.images import load_image
    from .io.nifti import read_array

    img = load_image(path)
    if four_d:
        data = np.asarray(img.dataobj[..., channel], dtype=np.float32)
    else:
        data = read_array(img, path).reshape(img.shape[:3])
    return data, np.asarray(img.affine, dtype=np.float64)
