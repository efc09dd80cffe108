"""Where a bank finds the dataset it was built from.

A bank stores each case's files relative to the dataset root, and the root relative to the bank folder (and
absolute, for a bank folder moved alone), so that a bank and its dataset moved together keep working. Each
file's size and CRC-32 are kept too: they tell whether a dataset found elsewhere (`--data-root`,
`lesionsynth relocate`) holds the same cases. Banks made before keep absolute case paths; they are read as
they are.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from ..errors import InputError

_CHUNK = 1 << 20


def file_fingerprint(path: str | Path) -> dict:
    """{"bytes": size, "crc32": 8 hex digits} of a file's bytes, read in 1 MiB pieces."""
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def relative_to(path: str | Path, root: str | Path) -> str:
    """`path` relative to the folder `root` (POSIX separators; '..' where it lies outside), or absolute where no
    relative path exists (another drive on Windows)."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def dataset_record(root: str | Path, bank_folder: str | Path, kind: str) -> dict:
    """bank.json's "dataset": its root absolute (as the bank was built) and relative to the bank folder."""
    return {"root": str(Path(root).resolve()), "root_from_bank": relative_to(root, bank_folder), "kind": kind}


def case_files(case: dict) -> list[str]:
    """A bank case's files as stored: its images, then its label."""
    return [*case["images"], case["label"]]


def paths_in_root(case: dict, recorded_root: str) -> list[str]:
    """A bank case's files relative to its dataset root; those of a bank made before relative paths (absolute)
    are taken relative to the root it recorded."""
    return [relative_to(p, recorded_root) if os.path.isabs(p) else p for p in case_files(case)]


def root_candidates(index: dict, bank_folder: str | Path, data_root: str | Path | None = None) -> list[Path]:
    """Where the dataset may be, in the order tried: `data_root` alone if given; else where the bank's relative
    path leads (bank and dataset moved together), then the absolute root recorded at build time (the bank
    moved alone)."""
    if data_root is not None:
        return [Path(data_root).resolve()]
    dataset = index.get("dataset") or {}
    out = []
    if dataset.get("root_from_bank"):
        out.append((Path(bank_folder) / dataset["root_from_bank"]).resolve())
    if dataset.get("root"):
        out.append(Path(dataset["root"]))
    return out


def located(index: dict, bank_folder: str | Path, data_root: str | Path | None = None) -> dict:
    """A copy of a bank index whose cases carry absolute paths under the dataset root they are read from: the
    first candidate (`root_candidates`) holding every case file, else the first one (a missing file is then
    named by whoever reads it). "dataset"/"root" becomes that root."""
    dataset = index.get("dataset") or {}
    candidates = root_candidates(index, bank_folder, data_root)
    if not candidates or "cases" not in index:
        return index
    recorded = dataset.get("root") or str(Path(bank_folder).resolve())
    relative = [paths_in_root(c, recorded) for c in index["cases"]]
    root = next((r for r in candidates if all((r / p).is_file() for files in relative for p in files)), candidates[0])
    cases = []
    for case, files in zip(index["cases"], relative):
        absolute = [os.path.normpath(root / p) for p in files]
        cases.append({**case, "images": absolute[:-1], "label": absolute[-1]})
    return {**index, "dataset": {**dataset, "root": str(root)}, "cases": cases}


def check_same_files(cases: list[dict]) -> int:
    """Check that the files of `cases` (absolute paths, `located`) are those the bank was built from: present,
    of the size and CRC-32 it recorded. InputError naming the first file and case that differ; returns how
    many files were compared (a bank made before checksums has none: 0)."""
    compared = 0
    for case in cases:
        fingerprints = case.get("files")
        for k, path in enumerate(case_files(case)):
            if not Path(path).is_file():
                raise InputError(f"{path}: file not found (case {case['case_id']} of the bank is not there)")
            if not fingerprints:
                continue
            want, got = fingerprints[k], file_fingerprint(path)
            if got["bytes"] != want["bytes"]:
                raise InputError(f"{path}: not the file case {case['case_id']} of the bank was built from "
                                 f"({got['bytes']} bytes, the bank recorded {want['bytes']})")
            if got["crc32"] != want["crc32"]:
                raise InputError(f"{path}: not the file case {case['case_id']} of the bank was built from "
                                 f"(same size, different content: CRC-32 {got['crc32']}, the bank recorded "
                                 f"{want['crc32']})")
            compared += 1
    return compared


def check_grids(cases: list[dict]) -> None:
    """Check that every file of `cases` (absolute paths) has the grid (shape, affine) the bank recorded for its
    case (headers only). InputError naming the first file and case that differ."""
    import numpy as np

    from .images import image_info

    for case in cases:
        for path in case_files(case):
            shape, affine, _ = image_info(path)
            if tuple(shape[:3]) != tuple(case["shape"]) or not np.allclose(affine, case["affine"], atol=1e-3):
                raise InputError(f"{path}: not on the grid the bank recorded for case {case['case_id']} (not the "
                                 f"same case)")


def relocate(bank_folder: str | Path, dataset: str | Path) -> tuple[int, int]:
    """Point the bank in `bank_folder` at its dataset moved to `dataset`: check every case file there
    (`check_same_files`), then rewrite bank.json's dataset root (relative to the bank, and absolute) and its
    case paths (relative to the root). Returns (cases, files compared by checksum). Nothing is written if a
    file differs."""
    from .nifti import write_bytes_atomic

    bank_folder, dataset = Path(bank_folder), Path(dataset)
    index_path = bank_folder / "bank.json"
    if not index_path.is_file():
        raise InputError(f"{index_path}: not a lesion bank (bank.json missing)")
    if not dataset.is_dir():
        raise InputError(f"{dataset}: not a folder")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{index_path}: malformed bank index ({exc})") from None
    moved = located(index, bank_folder, dataset)
    compared = check_same_files(moved["cases"])
    check_grids(moved["cases"])
    recorded = (index.get("dataset") or {}).get("root") or str(bank_folder.resolve())
    cases = []
    for case in index["cases"]:
        files = paths_in_root(case, recorded)
        cases.append({**case, "images": files[:-1], "label": files[-1]})
    kind = (index.get("dataset") or {}).get("kind", "")
    updated = {**index, "dataset": {**(index.get("dataset") or {}), **dataset_record(dataset, bank_folder, kind)},
               "cases": cases}
    write_bytes_atomic(index_path, (json.dumps(updated, indent=1) + "\n").encode())
    return len(cases), compared


class BankFolder(str):
    """A bank folder's path (a str, as worker processes are handed it) that also carries the dataset root its
    cases are read from when that is not where the bank says (`--data-root`); `pipeline.open_bank` honours it."""

    data_root: str | None

    def __new__(cls, folder: str | Path, data_root: str | Path | None = None):
        self = super().__new__(cls, str(folder))
        self.data_root = str(Path(data_root).resolve()) if data_root is not None else None
        return self

    def __reduce__(self):
        return BankFolder, (str(self), self.data_root)
