#!/usr/bin/env python3
"""Fetch public medical images and build lesionsynth's real-data test datasets.

Usage::

    python scripts/fetch_data.py [--cache DIR] [--only DATASET ... | --demo | --tests]

``--only`` builds the named datasets (and those they are made from) with only the downloads they
need; ``--demo`` is ``--only mni_lesions``, all that ``make demo`` reads; ``--tests`` is what the tests read
(every dataset but the held-out ones; ``make test``). ``DIR`` defaults to ``$LESIONSYNTH_DATA`` or else ``<repo>/.cache/data`` (gitignored).
Nothing this script downloads or writes is committed to git.

What it fetches (into ``DIR/downloads``)
----------------------------------------
* ``pyradiomics-3.0.1.tar.gz`` (PyPI sdist). Its ``data/`` folder holds real volumes with
  tumour masks: ``brain{1,2}`` (MR T1 post-contrast), ``lung{1,2}`` (CT, HU) and ``breast1``
  (small MR). Licence: pyradiomics and its sample data BSD-3-Clause; the images come from
  TCGA (The Cancer Imaging Archive), CC BY 3.0.
  A plain ``pip download`` fails (setup.py imports numpy, versioneer and
  ``setuptools.command.test``), so it is downloaded from a throw-away venv that has those,
  with ``--no-deps --no-build-isolation``.
* ``nilearn-0.14.1-py3-none-any.whl`` (PyPI wheel), for the MNI152 2009c symmetric T1, GM
  and WM maps it ships. The MNI152 2009 template is Copyright (C) 1993-2009 Louis Collins,
  McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University (see
  nilearn's ``fetch_icbm152_2009`` documentation for the licence terms). nilearn itself is
  not installed.

It also reads, read-only, lesion masks that the project keeps next to the repository
(``<repo>/../shared/data`` or ``$LESIONSYNTH_SHARED_DATA``): CarveMix sample masks from
ATLAS R1.2 (stroke, on the MNI grid) and from an MS lesion dataset (scanner space).

What it builds (under ``DIR``)
------------------------------
nnU-Net v2 raw layout (``imagesTr/{case}_{XXXX}.nii.gz``, ``labelsTr/{case}.nii.gz``,
``dataset.json``) unless noted:

* ``brain_t1c/``       brain MR T1c + tumour, with left-right mirrored copies.
* ``lung_ct/``         lung CT + tumour (cropped to the body), with mirrored copies.
* ``lung_multiclass/`` same CTs, labels background / lung / tumour.
* ``mni_lesions/``     T1 + FLAIR-like images on the MNI grid with stroke and MS lesions.
* ``heldout/msd_mni/``    Decathlon layout (4-D images), flipped axes, 1.5 mm.
* ``heldout/ms_oblique/`` CSV-listed, oblique scanner grid.
* ``heldout/lung_lps/``   nnU-Net layout, axes permuted (z first), int16.
* ``native_brains/`` (8 cases, for the unit tests) and ``heldout/native_brains/`` (12 cases,
  other seeds): FLAIR-like (``_0000``) + T1 (``_0001``) brains in native scanner space, label
  0/1 lesion only. Built from the MNI152 anatomy: nilearn's T1 is brain-masked, so the head gets
  a synthetic skull (dark) and scalp (bright T1, moderate FLAIR) shell around the intracranial
  volume (ICV = (gm + wm) > 0.3, closed by 5 mm and hole-filled; CSF = ICV - GM - WM; the wheel
  ships no CSF map or brain mask). FLAIR: WM ~150, GM ~200, CSF ~35, air 0. Each case has 6-25
  real MS lesion shapes (26-connected components of the shared MS masks, >= 10 voxels, rotated
  at random, scaled 0.8-1.25) placed in MNI white matter (periventricular/deep preferred, >= 95 %
  of each lesion's voxels with WM prob >= 0.5, no two touching), painted as a soft fraction
  (FLAIR 1.6x WM, T1 0.6x WM); target loads log-stratified over 600-15000 mm³ (held-out
  1000-15000; the label comes out 10-30 % lighter). Then one linear resampling through a random
  head pose (rotation up to +-15 deg per axis, translation up to +-15 mm) onto a scanner grid:
  two in-plane axes 0.8-1.3 mm and a slice axis 1.5-3 mm (which voxel axis varies), a distinct
  axis code per case (LPS, RAS, PIR, ... ; every third grid also tilted up to 12 deg: oblique
  affine), FOV = the head + 8 mm; per channel a gain of x0.5-x2 and Gaussian noise (2 % of the
  99th percentile) added on the native grid, float32. Label = resampled fraction >= 0.5.
* ``truth/native_brains/``, ``truth/heldout_native_brains/``: the kept-apart truth, outside the
  dataset folders: ``{case}_tissue.nii.gz`` (uint8 on exactly the case's grid and affine: 0
  background/non-brain, 1 CSF, 2 GM, 3 WM; argmax of the resampled probabilities inside the
  resampled ICV) and ``cases.json`` (per case: seed, pose, grid, gains, target and label loads,
  every placed lesion). Never give these to the tool under test; ``benchmarks/native_space.py``
  measures where pasted lesions land with them.

The held-out datasets are for evaluation only; unit tests must not use them.

The script is idempotent: every step skips work whose outputs exist (datasets are built in a
``.partial-*`` folder and renamed when complete), and a final ``DIR/.complete-v2`` stamp makes
later runs exit at once (``DIR/.complete-tests-v2`` once the tests' datasets are all there). Any failed download or check exits non-zero with a message.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
STAMP_NAME = ".complete-v2"
TESTS_STAMP_NAME = ".complete-tests-v2"  # the datasets the tests read are all there (`--tests`, or a full build)

PYRADIOMICS_VERSION = "3.0.1"
PYRADIOMICS_SDIST = f"pyradiomics-{PYRADIOMICS_VERSION}.tar.gz"
PYRADIOMICS_CASES = ("brain1", "brain2", "lung1", "lung2", "breast1")
NILEARN_VERSION = "0.14.1"
NILEARN_WHEEL = f"nilearn-{NILEARN_VERSION}-py3-none-any.whl"
MNI_MAPS = ("t1", "gm", "wm")
MNI_MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"

ATLAS_CASES = ("ATLAS_001", "ATLAS_002", "ATLAS_003")
MS_CASES = ("MS_01038", "MS_01039", "MS_01042")

BRAIN_PROB_THRESHOLD = 0.3  # (gm + wm) / 255 above this counts as brain
WM_PROB_THRESHOLD = 0.5  # wm / 255 above this counts as white matter (for medians)
LESION_SMOOTH_SIGMA = 0.7  # voxels; turns a binary mask into a soft lesion fraction
T1_LESION_LEVEL = 0.35  # lesion T1 = this * median WM T1 (hypointense)
FLAIR_LESION_LEVEL = 1.6  # lesion FLAIR = this * median WM FLAIR (hyperintense)
NOISE_FRACTION = 0.02  # noise sd as a fraction of the image's 99th percentile
GAIN_RANGE = (0.9, 1.1)

LUNG_LABELS = {"background": 0, "lung": 1, "tumour": 2}
LESION_LABELS = {"background": 0, "lesion": 1}
CONNECTIVITY_26 = ndimage.generate_binary_structure(3, 3)


class FetchError(RuntimeError):
    """A download, extraction or consistency check failed."""


_STARTED = time.monotonic()


def step(message: str) -> None:
    """Print one progress line, prefixed with the seconds elapsed since start."""
    print(f"[fetch_data {time.monotonic() - _STARTED:5.0f}s] {message}", flush=True)


# --------------------------------------------------------------------------------------
# Small file helpers
# --------------------------------------------------------------------------------------


def run_command(cmd: list[str], cwd: Path | None = None) -> None:
    """Run a command; raise FetchError with the tail of its output if it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise FetchError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Write a file through a temporary name so a crash never leaves a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)


def write_json(path: Path, obj: dict) -> None:
    """Write pretty-printed JSON."""
    path.write_text(json.dumps(obj, indent=2) + "\n")


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """Yield a scratch folder that is renamed to ``final`` only if the block succeeds."""
    partial = final.with_name(f".partial-{final.name}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    yield partial
    partial.replace(final)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Save an array as NIfTI-1 with the affine as both sform and qform, no scaling."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))


def load_nifti(path: Path, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Load (data, affine); ``dtype`` casts the stored values (default: stored dtype)."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    return (data if dtype is None else data.astype(dtype)), img.affine


def load_binary_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a 0/1 mask stored with float scaling (values like 0.9999999997) as uint8."""
    img = nib.load(str(path))
    return (np.rint(img.get_fdata(dtype=np.float32)) > 0).astype(np.uint8), img.affine


# --------------------------------------------------------------------------------------
# Geometry helpers (all affines are nibabel's voxel -> RAS world mm)
# --------------------------------------------------------------------------------------


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths in mm."""
    return np.linalg.norm(affine[:3, :3], axis=0)


def translation(offset) -> np.ndarray:
    """4x4 homogeneous translation matrix."""
    mat = np.eye(4)
    mat[:3, 3] = offset
    return mat


def crop(data: np.ndarray, affine: np.ndarray, start, stop) -> tuple[np.ndarray, np.ndarray]:
    """Crop voxel ranges [start, stop) and shift the affine so world coordinates hold."""
    region = tuple(slice(a, b) for a, b in zip(start, stop))
    return data[region], affine @ translation(start)


def flip_axes(data: np.ndarray, affine: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
    """Reverse voxel axes, updating the affine so every voxel keeps its world position."""
    fix = np.eye(4)
    for ax in axes:
        fix[ax, ax] = -1
        fix[ax, 3] = data.shape[ax] - 1
    return np.flip(data, axis=tuple(axes)).copy(), affine @ fix


def permute_axes(data: np.ndarray, affine: np.ndarray, order) -> tuple[np.ndarray, np.ndarray]:
    """Transpose voxel axes (new axis d = old axis order[d]), keeping world positions."""
    perm = np.zeros((4, 4))
    perm[3, 3] = 1
    for new_ax, old_ax in enumerate(order):
        perm[old_ax, new_ax] = 1
    return np.ascontiguousarray(data.transpose(order)), affine @ perm


def resample(src: np.ndarray, src_affine: np.ndarray, dst_shape, dst_affine: np.ndarray,
             order: int, dst_to_src_world: np.ndarray | None = None) -> np.ndarray:
    """Sample ``src`` on a destination grid (``order`` 0 nearest, 1 linear; 0 outside).

    ``dst_to_src_world`` optionally maps destination world coordinates to source world
    coordinates (e.g. a rigid translation between two subjects' spaces).
    """
    world = np.eye(4) if dst_to_src_world is None else dst_to_src_world
    vox = np.linalg.inv(src_affine) @ world @ dst_affine
    src = src if order == 0 else src.astype(np.float32)
    return ndimage.affine_transform(src, vox[:3, :3], vox[:3, 3], output_shape=tuple(dst_shape),
                                    order=order, mode="constant", cval=0.0)


def ball(radius_mm: float, spacing) -> np.ndarray:
    """Ellipsoidal structuring element of a physical radius on an anisotropic grid."""
    radii = [int(radius_mm // s) for s in spacing]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    dist = sum((g * s / radius_mm) ** 2 for g, s in zip(grids, spacing))
    return dist <= 1.0


def largest_components(mask: np.ndarray, keep: int, min_fraction: float = 0.0) -> np.ndarray:
    """Keep the ``keep`` largest 26-connected components of a binary mask, dropping any
    smaller than ``min_fraction`` of the largest one."""
    labels, n = ndimage.label(mask, structure=CONNECTIVITY_26)
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    kept = np.argsort(sizes)[::-1][:keep]
    kept = kept[sizes[kept] >= min_fraction * sizes[kept[0]]] + 1
    return np.isin(labels, kept)


def fill_holes_per_slice(mask: np.ndarray, axis: int = 2) -> np.ndarray:
    """Fill 2-D holes slice by slice along ``axis``."""
    out = np.moveaxis(mask.copy(), axis, 0)
    for k in range(out.shape[0]):
        out[k] = ndimage.binary_fill_holes(out[k])
    return np.moveaxis(out, 0, axis)


# --------------------------------------------------------------------------------------
# Downloads and extraction
# --------------------------------------------------------------------------------------


def download_pyradiomics(downloads: Path) -> Path:
    """Download the pyradiomics sdist from a throw-away venv that can run its setup.py."""
    target = downloads / PYRADIOMICS_SDIST
    if target.exists():
        step(f"download {PYRADIOMICS_SDIST}: exists, skipped")
        return target
    with tempfile.TemporaryDirectory(prefix="lesionsynth-pipenv-") as tmp:
        venv = Path(tmp) / "venv"
        run_command([sys.executable, "-m", "venv", str(venv)])
        pip = str(venv / "bin" / "pip")
        run_command([pip, "install", "--quiet", "numpy", "versioneer", "setuptools<72", "wheel"])
        run_command([pip, "download", "--quiet", "--no-deps", "--no-build-isolation",
                     f"pyradiomics=={PYRADIOMICS_VERSION}", "-d", str(downloads)], cwd=downloads)
    if not target.exists():
        raise FetchError(f"pip reported success but {target} is missing")
    step(f"download {PYRADIOMICS_SDIST}: ok ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def download_nilearn(downloads: Path) -> Path:
    """Download the nilearn wheel (no dependencies, not installed)."""
    target = downloads / NILEARN_WHEEL
    if target.exists():
        step(f"download {NILEARN_WHEEL}: exists, skipped")
        return target
    run_command([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 f"nilearn=={NILEARN_VERSION}", "-d", str(downloads)], cwd=downloads)
    if not target.exists():
        raise FetchError(f"pip reported success but {target} is missing")
    step(f"download {NILEARN_WHEEL}: ok ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def extract_pyradiomics_data(sdist: Path, out: Path) -> None:
    """Extract ``pyradiomics-X/data/*.nrrd`` (flat, no other files) into ``out``."""
    wanted = [f"{c}_{kind}.nrrd" for c in PYRADIOMICS_CASES for kind in ("image", "label")]
    if all((out / name).exists() for name in wanted):
        step("extract pyradiomics data: exists, skipped")
        return
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"pyradiomics-{PYRADIOMICS_VERSION}/data/"
    with tarfile.open(sdist, "r:gz") as tar:
        for name in wanted:
            member = tar.getmember(prefix + name)
            write_bytes_atomic(out / name, tar.extractfile(member).read())
    step(f"extract pyradiomics data: {len(wanted)} NRRD files -> {out}")


def extract_mni(wheel: Path, out: Path) -> None:
    """Extract the MNI152 2009 T1, GM and WM maps from the nilearn wheel."""
    names = {m: MNI_MEMBER.format(m) for m in MNI_MAPS}
    if all((out / Path(n).name).exists() for n in names.values()):
        step("extract MNI152 maps: exists, skipped")
        return
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for member in names.values():
            write_bytes_atomic(out / Path(member).name, zf.read(member))
    step(f"extract MNI152 maps: {len(names)} files -> {out}")


def convert_nrrd(src_dir: Path, out: Path) -> None:
    """Convert every NRRD to NIfTI with SimpleITK (keeps geometry and pixel type)."""
    sources = sorted(src_dir.glob("*.nrrd"))
    todo = [p for p in sources if not (out / (p.stem + ".nii.gz")).exists()]
    if not todo:
        step("convert NRRD -> NIfTI: exists, skipped")
        return
    out.mkdir(parents=True, exist_ok=True)
    for path in todo:
        target = out / (path.stem + ".nii.gz")
        tmp = out / (path.stem + ".tmp.nii.gz")
        sitk.WriteImage(sitk.ReadImage(str(path)), str(tmp))
        tmp.replace(target)
    step(f"convert NRRD -> NIfTI: {len(todo)} files -> {out}")


# --------------------------------------------------------------------------------------
# Dataset writers
# --------------------------------------------------------------------------------------


def write_nnunet_case(root: Path, case: str, channels: list[np.ndarray], label: np.ndarray,
                      affine: np.ndarray) -> None:
    """Write one nnU-Net case: ``imagesTr/{case}_{XXXX}.nii.gz`` and ``labelsTr/{case}``."""
    (root / "imagesTr").mkdir(exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    for idx, channel in enumerate(channels):
        save_nifti(root / "imagesTr" / f"{case}_{idx:04d}.nii.gz", channel, affine)
    save_nifti(root / "labelsTr" / f"{case}.nii.gz", label, affine)


def write_nnunet_json(root: Path, name: str, channel_names: dict, labels: dict, n: int,
                      description: str) -> None:
    """Write an nnU-Net v2 ``dataset.json``."""
    write_json(root / "dataset.json", {
        "name": name,
        "description": description,
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": n,
        "file_ending": ".nii.gz",
    })


def load_pyradiomics_case(nii_dir: Path, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load a converted pyradiomics case: (image in stored dtype, uint8 label, affine)."""
    image, affine = load_nifti(nii_dir / f"{case}_image.nii.gz")
    label, label_affine = load_nifti(nii_dir / f"{case}_label.nii.gz")
    if image.shape != label.shape or not np.allclose(affine, label_affine, atol=1e-4):
        raise FetchError(f"{case}: image and label geometry differ")
    if not set(np.unique(label)) <= {0, 1}:
        raise FetchError(f"{case}: unexpected label values {np.unique(label)}")
    return image, label.astype(np.uint8), affine


def with_mirrors(cases: dict[str, tuple]) -> dict[str, tuple]:
    """Add left-right mirrored copies (``{case}m``): arrays flipped on axis 0, same affine.

    This deliberately does not preserve world positions: the result is a plausible new
    subject whose anatomy is mirrored.
    """
    out = dict(cases)
    for case, (image, label, affine) in cases.items():
        out[f"{case}m"] = (image[::-1].copy(), label[::-1].copy(), affine)
    return out


def build_brain_t1c(cache: Path, nii_dir: Path) -> None:
    """Dataset A: brain MR T1c with tumour labels, plus mirrored copies."""
    final = cache / "brain_t1c"
    if final.exists():
        step("build brain_t1c: exists, skipped")
        return
    cases = with_mirrors({c: load_pyradiomics_case(nii_dir, c) for c in ("brain1", "brain2")})
    with building(final) as root:
        for case, (image, label, affine) in cases.items():
            write_nnunet_case(root, case, [image], label, affine)
        write_nnunet_json(root, "brain_t1c", {"0": "T1c"}, LESION_LABELS, len(cases),
                          "pyradiomics brain1/brain2 (TCGA, CC BY 3.0) + mirrored copies")
    step(f"build brain_t1c: {len(cases)} cases")


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Patient body in a CT: HU > -500, closed, largest component, holes filled per slice."""
    mask = ndimage.binary_closing(hu > -500, structure=np.ones((5, 5, 1), bool), iterations=2)
    return fill_holes_per_slice(largest_components(mask, keep=1))


def crop_to_body(image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                 margin_mm: float = 5.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop a CT in x/y to the body's bounding box plus a margin (all slices kept)."""
    body = body_mask(image)
    margin = np.ceil(margin_mm / voxel_sizes(affine)[:2]).astype(int)
    start, stop = [0, 0, 0], list(image.shape)
    for ax in (0, 1):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(body.any(axis=other))
        start[ax] = max(int(idx[0]) - margin[ax], 0)
        stop[ax] = min(int(idx[-1]) + 1 + margin[ax], image.shape[ax])
    cropped, new_affine = crop(image, affine, start, stop)
    return cropped, crop(label, affine, start, stop)[0], new_affine


def build_lung_ct(cache: Path, nii_dir: Path) -> None:
    """Dataset B: lung CT (cropped to the body) with tumour labels, plus mirrored copies."""
    final = cache / "lung_ct"
    if final.exists():
        step("build lung_ct: exists, skipped")
        return
    cropped = {c: crop_to_body(*load_pyradiomics_case(nii_dir, c)) for c in ("lung1", "lung2")}
    cases = with_mirrors(cropped)
    with building(final) as root:
        for case, (image, label, affine) in cases.items():
            write_nnunet_case(root, case, [image], label, affine)
        write_nnunet_json(root, "lung_ct", {"0": "CT"}, LESION_LABELS, len(cases),
                          "pyradiomics lung1/lung2 (TCGA, CC BY 3.0), cropped to the body, "
                          "+ mirrored copies")
    step(f"build lung_ct: {len(cases)} cases")


def lung_mask(hu: np.ndarray, affine: np.ndarray, close_mm: float = 3.0) -> np.ndarray:
    """Both lungs: air (HU < -400) inside the body, not touching the in-plane border.

    Keeps the two largest remaining components (the second only if it is at least 10 % of
    the first: the lungs are often joined through the trachea, and the next component is
    then stomach gas or an axilla air pocket), closes them by ``close_mm`` and fills holes
    (vessels) slice by slice.
    """
    candidates = (hu < -400) & body_mask(hu)
    labels, _ = ndimage.label(candidates, structure=CONNECTIVITY_26)
    border = np.unique(np.concatenate([labels[0].ravel(), labels[-1].ravel(),
                                       labels[:, 0].ravel(), labels[:, -1].ravel()]))
    candidates &= ~np.isin(labels, border[border > 0])
    lungs = largest_components(candidates, keep=2, min_fraction=0.1)
    lungs = ndimage.binary_closing(lungs, structure=ball(close_mm, voxel_sizes(affine)))
    return fill_holes_per_slice(lungs)


def build_lung_multiclass(cache: Path) -> None:
    """Dataset C: the lung_ct cases with labels 0 background, 1 lung, 2 tumour."""
    final = cache / "lung_multiclass"
    if final.exists():
        step("build lung_multiclass: exists, skipped")
        return
    source = cache / "lung_ct"
    cases = sorted(p.name[: -len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))
    with building(final) as root:
        for case in cases:
            image, affine = load_nifti(source / "imagesTr" / f"{case}_0000.nii.gz")
            tumour, _ = load_nifti(source / "labelsTr" / f"{case}.nii.gz")
            label = lung_mask(image, affine).astype(np.uint8) * LUNG_LABELS["lung"]
            label[tumour > 0] = LUNG_LABELS["tumour"]
            write_nnunet_case(root, case, [image], label, affine)
        write_nnunet_json(root, "lung_multiclass", {"0": "CT"}, LUNG_LABELS, len(cases),
                          "lung_ct cases; lung label from HU thresholding, tumour from "
                          "pyradiomics masks (lesion inside an organ label)")
    step(f"build lung_multiclass: {len(cases)} cases")


# --------------------------------------------------------------------------------------
# MNI-based synthetic-contrast datasets
# --------------------------------------------------------------------------------------


class MNI:
    """The MNI152 2009 maps (float32 on the 1 mm grid) and quantities derived from them."""

    def __init__(self, mni_dir: Path):
        maps = {m: load_nifti(mni_dir / Path(MNI_MEMBER.format(m)).name, np.float32)
                for m in MNI_MAPS}
        self.affine = maps["t1"][1]
        self.shape = maps["t1"][0].shape
        self.t1, self.gm, self.wm = (maps[m][0] for m in MNI_MAPS)
        self.flair = (40.0 + 160.0 * self.gm / 255.0 + 110.0 * self.wm / 255.0).astype(np.float32)
        self.brain_prob = (self.gm + self.wm) / 255.0
        white = self.wm / 255.0 > WM_PROB_THRESHOLD
        self.wm_t1 = float(np.median(self.t1[white]))
        self.wm_flair = float(np.median(self.flair[white]))
        com = ndimage.center_of_mass(self.brain_prob)
        self.brain_centre = (self.affine @ [*com, 1.0])[:3]

    def ms_to_mni(self, ms_affine: np.ndarray, ms_shape) -> np.ndarray:
        """Translation (world, 4x4) moving the MS volume's FOV centre onto the brain centre."""
        fov_centre = (ms_affine @ [*((np.asarray(ms_shape) - 1) / 2.0), 1.0])[:3]
        return translation(self.brain_centre - fov_centre)


def lesion_fraction(mask: np.ndarray) -> np.ndarray:
    """Soft lesion fraction in [0, 1] from a binary mask."""
    return np.clip(ndimage.gaussian_filter(mask.astype(np.float32), LESION_SMOOTH_SIGMA), 0, 1)


def paint_lesion(image: np.ndarray, fraction: np.ndarray, level: float) -> np.ndarray:
    """Blend ``image`` towards a constant lesion intensity by ``fraction``."""
    return (image * (1.0 - fraction) + fraction * level).astype(np.float32)


def gain_and_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random global gain, then Gaussian noise of sd NOISE_FRACTION * 99th percentile."""
    image = image * np.float32(rng.uniform(*GAIN_RANGE))
    sd = NOISE_FRACTION * float(np.percentile(image, 99))
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sd)
    return (image + noise).astype(np.float32)


def ms_mask_in_mni(mni: MNI, shared: Path, case: str) -> np.ndarray:
    """An MS mask moved into the MNI grid (centring translation, nearest neighbour), in brain."""
    mask, ms_affine = load_binary_mask(shared / "ms_lesion_masks" / f"{case}.nii.gz")
    mni_to_ms = np.linalg.inv(mni.ms_to_mni(ms_affine, mask.shape))
    moved = resample(mask, ms_affine, mni.shape, mni.affine, order=0, dst_to_src_world=mni_to_ms)
    return ((moved > 0) & (mni.brain_prob > BRAIN_PROB_THRESHOLD)).astype(np.uint8)


def mni_lesion_masks(mni: MNI, shared: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (case, uint8 mask on the MNI grid) for the ATLAS and MS cases."""
    for case in ATLAS_CASES:
        mask, affine = load_binary_mask(shared / "atlas_mni_labels" / f"{case}.nii.gz")
        if mask.shape != mni.shape or not np.allclose(affine, mni.affine, atol=1e-4):
            raise FetchError(f"{case}: not on the MNI152 grid")
        yield case, mask
    for case in MS_CASES:
        yield case, ms_mask_in_mni(mni, shared, case)


def build_mni_lesions(cache: Path, mni: MNI, shared: Path) -> None:
    """Dataset D: T1 + FLAIR-like MNI images with real stroke/MS lesion masks."""
    final = cache / "mni_lesions"
    if final.exists():
        step("build mni_lesions: exists, skipped")
        return
    n = 0
    with building(final) as root:
        for index, (case, mask) in enumerate(mni_lesion_masks(mni, shared)):
            rng = np.random.default_rng(index)
            frac = lesion_fraction(mask)
            t1 = gain_and_noise(paint_lesion(mni.t1, frac, T1_LESION_LEVEL * mni.wm_t1), rng)
            flair = gain_and_noise(
                paint_lesion(mni.flair, frac, FLAIR_LESION_LEVEL * mni.wm_flair), rng)
            write_nnunet_case(root, case, [t1, flair], mask, mni.affine)
            n += 1
        write_nnunet_json(root, "mni_lesions", {"0": "T1", "1": "FLAIR"}, LESION_LABELS, n,
                          "MNI152 2009 T1 and a FLAIR-like image from GM/WM maps, with ATLAS "
                          "R1.2 stroke and MS lesion masks (CarveMix samples) painted in")
    step(f"build mni_lesions: {n} cases")


# --------------------------------------------------------------------------------------
# Held-out datasets (evaluation only)
# --------------------------------------------------------------------------------------


def to_isotropic_grid(shape, affine: np.ndarray, spacing: float) -> tuple[tuple, np.ndarray]:
    """Grid of ``spacing`` mm voxels starting at the same first voxel centre, same FOV."""
    step_vox = spacing / voxel_sizes(affine)
    new_shape = tuple(int(np.floor((n - 1) / s)) + 1 for n, s in zip(shape, step_vox))
    return new_shape, affine @ np.diag([*step_vox, 1.0])


def build_msd_mni(cache: Path) -> None:
    """Held-out: mni_lesions in Decathlon layout, axes 0/1 flipped, 1.5 mm isotropic."""
    final = cache / "heldout" / "msd_mni"
    if final.exists():
        step("build heldout/msd_mni: exists, skipped")
        return
    source = cache / "mni_lesions"
    cases = sorted(p.name[: -len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))
    training = []
    with building(final) as root:
        (root / "imagesTr").mkdir()
        (root / "labelsTr").mkdir()
        for index, case in enumerate(cases):
            new_id = f"mni_{chr(ord('a') + index)}"
            label, affine = load_nifti(source / "labelsTr" / f"{case}.nii.gz")
            label, flipped = flip_axes(label, affine, (0, 1))
            shape, iso = to_isotropic_grid(label.shape, flipped, 1.5)
            channels = []
            for ch in range(2):
                image, _ = load_nifti(source / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
                image, _ = flip_axes(image, affine, (0, 1))
                channels.append(resample(image, flipped, shape, iso, order=1))
            save_nifti(root / "imagesTr" / f"{new_id}.nii.gz",
                       np.stack(channels, axis=-1).astype(np.float32), iso)
            save_nifti(root / "labelsTr" / f"{new_id}.nii.gz",
                       resample(label, flipped, shape, iso, order=0).astype(np.uint8), iso)
            training.append({"image": f"./imagesTr/{new_id}.nii.gz",
                             "label": f"./labelsTr/{new_id}.nii.gz", "source": case})
        write_json(root / "dataset.json", {
            "name": "msd_mni",
            "description": "mni_lesions re-encoded: axes 0/1 flipped, 1.5 mm isotropic, 4-D",
            "tensorImageSize": "4D",
            "modality": {"0": "T1", "1": "FLAIR"},
            "labels": {"0": "background", "1": "lesion"},
            "numTraining": len(training),
            "numTest": 0,
            "training": training,
            "test": [],
        })
    step(f"build heldout/msd_mni: {len(training)} cases")


def downsample_inplane(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Halve axes 1 and 2 by 2x2 block averaging (>= 0.5 kept); new voxel centres move by
    half an old voxel, which the affine records."""
    n0, n1, n2 = mask.shape
    blocks = mask[:, : n1 // 2 * 2, : n2 // 2 * 2].reshape(n0, n1 // 2, 2, n2 // 2, 2)
    small = (blocks.mean(axis=(2, 4)) >= 0.5).astype(np.uint8)
    scale = np.array([[1, 0, 0, 0], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1]], float)
    return small, affine @ scale


def build_ms_oblique(cache: Path, mni: MNI, shared: Path) -> None:
    """Held-out: MS masks on their oblique grid (in-plane /2) with a T1-like image, CSV list."""
    final = cache / "heldout" / "ms_oblique"
    if final.exists():
        step("build heldout/ms_oblique: exists, skipped")
        return
    rows = []
    with building(final) as root:
        (root / "images").mkdir()
        (root / "labels").mkdir()
        for index, case in enumerate(MS_CASES):
            full, full_affine = load_binary_mask(shared / "ms_lesion_masks" / f"{case}.nii.gz")
            to_mni = mni.ms_to_mni(full_affine, full.shape)  # same centring as mni_lesions
            mask, affine = downsample_inplane(full, full_affine)
            brain = resample(mni.brain_prob, mni.affine, mask.shape, affine, 1, to_mni)
            mask &= (brain > BRAIN_PROB_THRESHOLD).astype(np.uint8)
            t1 = resample(mni.t1, mni.affine, mask.shape, affine, order=1, dst_to_src_world=to_mni)
            t1 = paint_lesion(t1, lesion_fraction(mask), T1_LESION_LEVEL * mni.wm_t1)
            t1 = gain_and_noise(t1, np.random.default_rng(100 + index))
            save_nifti(root / "images" / f"{case}_0000.nii.gz", t1, affine)
            save_nifti(root / "labels" / f"{case}.nii.gz", mask, affine)
            rows.append((case, f"images/{case}_0000.nii.gz", f"labels/{case}.nii.gz"))
        with open(root / "cases.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["case_id", "image_0", "label"])
            writer.writerows(rows)
    step(f"build heldout/ms_oblique: {len(rows)} cases")


def build_lung_lps(cache: Path) -> None:
    """Held-out: lung_multiclass with axes permuted to (z, y, x), int16 image and label."""
    final = cache / "heldout" / "lung_lps"
    if final.exists():
        step("build heldout/lung_lps: exists, skipped")
        return
    source = cache / "lung_multiclass"
    cases = sorted(p.name[: -len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))
    with building(final) as root:
        for case in cases:
            image, affine = load_nifti(source / "imagesTr" / f"{case}_0000.nii.gz")
            label, _ = load_nifti(source / "labelsTr" / f"{case}.nii.gz")
            image, zyx = permute_axes(image.astype(np.int16), affine, (2, 1, 0))
            label, _ = permute_axes(label.astype(np.int16), affine, (2, 1, 0))
            write_nnunet_case(root, case, [image], label, zyx)
        write_nnunet_json(root, "lung_lps", {"0": "CT"}, LUNG_LABELS, len(cases),
                          "lung_multiclass with voxel axes permuted to (z, y, x), int16")
    step(f"build heldout/lung_lps: {len(cases)} cases")


# --------------------------------------------------------------------------------------
# Native-space brains (scanner grids) with the tissue truth kept apart
# --------------------------------------------------------------------------------------

NATIVE_DATASETS = (
    # (dataset folder, truth folder, case prefix, cases, first seed, target load range mm³;
    # the label's load comes out ~10-30 % below the target on coarse slices)
    ("native_brains", "truth/native_brains", "nat", 8, 1000, (600.0, 15000.0)),
    ("heldout/native_brains", "truth/heldout_native_brains", "hnat", 12, 2000, (1000.0, 15000.0)),
)
NATIVE_FORCED_ORIENTATIONS = {"native_brains": ("LPS", "RAS", "PIR"),
                              "heldout/native_brains": ("LAS", "RPI", "ASL")}
TISSUE_LABELS = {"background": 0, "csf": 1, "gm": 2, "wm": 3}
ICV_CLOSING_MM = 5.0  # closing radius turning (gm + wm) > 0.3 into the intracranial volume
SKULL_MM, SCALP_MM = 6.0, 5.0  # thickness of the synthetic skull and scalp shells
HEAD_T1_LEVELS = {"skull": 0.12, "scalp": 0.85}  # T1 of the shells, times the median WM T1
FOV_MARGIN_MM = 8.0  # margin around the head's bounding box in the native grid
POSE_ROTATION_DEG = 15.0  # head pose: rotation up to this about each axis
POSE_TRANSLATION_MM = 15.0  # and translation up to this along each axis
OBLIQUE_TILT_DEG = 12.0  # every third case's grid is also tilted (oblique affine)
INPLANE_SPACING = (0.8, 1.3)  # mm, the two in-plane voxel axes
SLICE_SPACING = (1.5, 3.0)  # mm, the slice axis
NATIVE_GAIN_RANGE = (0.5, 2.0)  # per-channel global gain (log-uniform)
NATIVE_LESIONS = (6, 25)  # lesions per case
NATIVE_MIN_VOXELS = 10  # a real lesion component needs this many voxels (source and 1 mm grid)
NATIVE_LESION_SCALE = (0.8, 1.25)  # isotropic scale range of a placed lesion (linear)
NATIVE_MAX_LESION_MM3 = 8000.0  # larger (confluent) source components are left out
NATIVE_WM_SHARE = 0.95  # a placed lesion needs this share of its voxels in WM (prob >= 0.5)
NATIVE_PLACEMENT_TRIES = 60  # random centres tried per lesion before another lesion is drawn
NATIVE_T1_LESION_LEVEL = 0.6  # lesion T1 = this * median WM T1
FLAIR_LEVELS = {"wm": 150.0, "gm": 200.0, "csf": 35.0, "skull": 10.0, "scalp": 110.0}


def closing_edt(mask: np.ndarray, radius_vox: float) -> np.ndarray:
    """Binary closing by a ball, through two Euclidean distance transforms (fast for big balls)."""
    dilated = ndimage.distance_transform_edt(~mask) <= radius_vox
    return ndimage.distance_transform_edt(dilated) > radius_vox


class NativeAnatomy:
    """MNI-space anatomy for the native datasets: tissue probabilities, intracranial volume,
    FLAIR-like image, where lesions may go, and the head's outline."""

    def __init__(self, mni: MNI):
        self.mni = mni
        pg, pw = mni.gm / 255.0, mni.wm / 255.0
        brain = (pg + pw) > BRAIN_PROB_THRESHOLD
        icv = ndimage.binary_fill_holes(closing_edt(brain, ICV_CLOSING_MM))
        self.icv = largest_components(icv, keep=1)
        icv_f = self.icv.astype(np.float32)
        self.pg = (pg * icv_f).astype(np.float32)
        self.pw = (pw * icv_f).astype(np.float32)
        self.pc = (np.clip(1.0 - pg - pw, 0.0, 1.0) * icv_f).astype(np.float32)
        # nilearn's MNI T1 is brain-masked (zero outside the intracranial volume): give the
        # head a skull (dark) and a scalp (T1 bright like fat, FLAIR moderate) as two shells.
        outside_mm = ndimage.distance_transform_edt(~self.icv)  # the MNI grid is 1 mm
        skull = (outside_mm > 0) & (outside_mm <= SKULL_MM)
        scalp = (outside_mm > SKULL_MM) & (outside_mm <= SKULL_MM + SCALP_MM)

        def soft(mask: np.ndarray) -> np.ndarray:
            return np.clip(ndimage.gaussian_filter(mask.astype(np.float32), 0.7), 0, 1)

        soft_icv, soft_skull, soft_scalp = soft(self.icv), soft(skull), soft(scalp)
        self.t1 = (mni.t1 * soft_icv + mni.wm_t1 * (HEAD_T1_LEVELS["skull"] * soft_skull
                                                    + HEAD_T1_LEVELS["scalp"] * soft_scalp))
        self.t1 = self.t1.astype(np.float32)
        tissue = (FLAIR_LEVELS["wm"] * self.pw + FLAIR_LEVELS["gm"] * self.pg
                  + FLAIR_LEVELS["csf"] * self.pc)
        self.flair = (soft_icv * tissue + FLAIR_LEVELS["skull"] * soft_skull
                      + FLAIR_LEVELS["scalp"] * soft_scalp).astype(np.float32)
        self.wm = pw >= WM_PROB_THRESHOLD
        self.wm_flair = float(np.median(self.flair[self.wm]))
        # Where lesion centres are drawn: white matter, favouring the periventricular and deep
        # WM (weight 0.15 + exp(-distance to the lateral ventricles / 8 mm)).
        # (chamfer distances: fast, and exact enough for a weight)
        depth = ndimage.distance_transform_cdt(self.icv, "chessboard")
        ventricles = (self.pc > 0.5) & (depth > 25)
        to_ventricle = ndimage.distance_transform_cdt(~ventricles, "taxicab")
        self.centres = np.flatnonzero(self.wm)
        weight = 0.15 + np.exp(-to_ventricle.ravel()[self.centres] / 8.0)
        self.centre_cdf = np.cumsum(weight) / weight.sum()
        head = outside_mm <= SKULL_MM + SCALP_MM
        edge = head & ~ndimage.binary_erosion(head)
        pts = np.argwhere(edge)[::7]
        self.head_points = (mni.affine @ np.c_[pts, np.ones(len(pts))].T)[:3].T
        self.brain_centre = mni.brain_centre


class LesionLibrary:
    """Connected components of the shared MS lesion masks (real shapes), each kept as its
    crop on the source grid, ready to be turned to the 1 mm MNI grid under a rotation."""

    def __init__(self, shared: Path):
        self.items: list[tuple[np.ndarray, np.ndarray, float]] = []
        for case in MS_CASES:
            mask, affine = load_binary_mask(shared / "ms_lesion_masks" / f"{case}.nii.gz")
            voxel_mm3 = float(np.prod(voxel_sizes(affine)))
            labels, _ = ndimage.label(mask, structure=CONNECTIVITY_26)
            for idx, box in enumerate(ndimage.find_objects(labels), start=1):
                comp = labels[box] == idx
                volume = float(comp.sum()) * voxel_mm3
                if comp.sum() < NATIVE_MIN_VOXELS or volume > NATIVE_MAX_LESION_MM3:
                    continue
                start = np.array([s.start for s in box]) - 1
                self.items.append((np.pad(comp, 1).astype(np.float32),
                                   affine @ translation(start), volume))
        if not self.items:
            raise FetchError("no MS lesion components found")
        self.volumes = np.array([v for _, _, v in self.items])

    def on_mni_grid(self, index: int, rotation: np.ndarray, scale: float) -> np.ndarray | None:
        """Component ``index`` rotated about its centroid and scaled by ``scale`` (isotropic,
        so the shape is kept) on a 1 mm MNI-axis grid (bool crop), or None when fewer than
        NATIVE_MIN_VOXELS voxels remain."""
        comp, affine, _ = self.items[index]
        centre = (affine @ [*ndimage.center_of_mass(comp), 1.0])[:3]
        extent = np.linalg.norm(np.array(comp.shape) * voxel_sizes(affine)) * scale
        half = int(np.ceil(extent / 2)) + 1
        size = 2 * half + 1
        dst_affine = translation(np.rint(centre) - half)
        move = np.eye(4)  # destination world -> source world: c + R (x - c) / scale
        move[:3, :3] = rotation / scale
        move[:3, 3] = centre - rotation @ centre / scale
        frac = resample(comp, affine, (size,) * 3, dst_affine, order=1, dst_to_src_world=move)
        binary = largest_components(frac >= 0.5, keep=1)
        if binary.sum() < NATIVE_MIN_VOXELS:
            return None
        return binary[ndimage.find_objects(binary.astype(np.uint8))[0]]


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Rotation matrix from three angles, each uniform in [-max_deg, max_deg] (x, y, z)."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def uniform_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    return q if np.linalg.det(q) > 0 else -q


AXIS_DIRECTIONS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0),
                   "S": (2, 1.0), "I": (2, -1.0)}


def orientation_matrix(code: str) -> np.ndarray:
    """Direction cosines (columns = voxel axes in RAS world) of an axis code such as 'LPS'."""
    mat = np.zeros((3, 3))
    for col, letter in enumerate(code):
        row, sign = AXIS_DIRECTIONS[letter]
        mat[row, col] = sign
    return mat


def all_orientations() -> list[str]:
    """The 48 axis codes (every permutation of the three axes, each either way)."""
    pairs = ("RL", "AP", "SI")
    codes = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((0, 1), repeat=3):
            codes.append("".join(pairs[p][s] for p, s in zip(perm, signs)))
    return codes


def native_orientations(name: str, n: int, seed: int) -> list[str]:
    """n distinct axis codes: the dataset's forced ones first, then a seeded shuffle."""
    forced = list(NATIVE_FORCED_ORIENTATIONS[name])
    rest = [c for c in all_orientations() if c not in forced]
    order = np.random.default_rng(seed).permutation(len(rest))
    return (forced + [rest[i] for i in order])[:n]


def native_load_strata(n: int, seed: int, load_range) -> list[tuple[float, float]]:
    """The log range of loads cut into n equal strata, shuffled (seeded) over the cases, so
    every dataset spans light to heavy loads."""
    edges = np.exp(np.linspace(*np.log(load_range), n + 1))
    order = np.random.default_rng(seed).permutation(n)
    return [(float(edges[k]), float(edges[k + 1])) for k in order]


def place_lesions(anat: NativeAnatomy, library: LesionLibrary, rng: np.random.Generator,
                  target_mm3: float, count: int) -> tuple[np.ndarray, list[dict]]:
    """Place ``count`` real lesion shapes in MNI white matter, aiming at ``target_mm3`` in all.

    Each lesion is drawn with a size-aware weight (log-normal around the remaining load per
    remaining lesion), rotated at random, scaled by 0.8-1.25 (towards that size), and put at
    a random centre (periventricular/deep WM preferred) where at least NATIVE_WM_SHARE of its
    voxels are WM and it keeps one voxel away from the lesions already placed; otherwise
    another centre, then another lesion. The load counted is what the label will hold: the
    voxels where the painted (smoothed) lesion fraction is >= 0.5.
    """
    shape = anat.mni.shape
    mask = np.zeros(shape, bool)
    taken = np.zeros(shape, bool)
    placed: list[dict] = []
    log_vol = np.log(library.volumes)
    load = 0.0
    attempts = 0
    while len(placed) < count and attempts < 20 * count:
        attempts += 1
        left = count - len(placed)
        want = max(target_mm3 - load, 30.0 * left) / left
        weight = np.exp(-0.5 * ((log_vol - np.log(want)) / 0.7) ** 2) + 1e-6
        index = int(rng.choice(len(weight), p=weight / weight.sum()))
        scale = (want / library.volumes[index]) ** (1 / 3) * rng.uniform(0.95, 1.05)
        scale = float(np.clip(scale, *NATIVE_LESION_SCALE))
        lesion = library.on_mni_grid(index, uniform_rotation(rng), scale)
        if lesion is None:
            continue
        effective = int((lesion_fraction(np.pad(lesion, 2)) >= 0.5).sum())
        half = np.array(lesion.shape) // 2
        grown = ndimage.binary_dilation(np.pad(lesion, 1), structure=CONNECTIVITY_26)
        for _ in range(NATIVE_PLACEMENT_TRIES):
            centre = np.unravel_index(
                anat.centres[np.searchsorted(anat.centre_cdf, rng.random())], shape)
            start = np.array(centre) - half
            stop = start + lesion.shape
            if (start < 1).any() or (stop > np.array(shape) - 1).any():
                continue
            box = tuple(slice(a, b) for a, b in zip(start, stop))
            if anat.wm[box][lesion].mean() < NATIVE_WM_SHARE:
                continue
            big = tuple(slice(a - 1, b + 1) for a, b in zip(start, stop))
            if (taken[big] & grown).any():
                continue
            mask[box] |= lesion
            taken[big] |= grown
            load += effective
            world = anat.mni.affine @ [*centre, 1.0]
            placed.append({"source": index, "scale": round(scale, 3),
                           "voxels": int(lesion.sum()), "label_voxels": effective,
                           "centre_mni_mm": [round(float(v), 1) for v in world[:3]]})
            break
    return mask, placed


def native_grid(anat: NativeAnatomy, rng: np.random.Generator, code: str, oblique: bool,
                pose: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray, dict]:
    """A scanner grid around the posed head: spacing, axis order/flips, FOV = head + margin."""
    slice_axis = int(rng.integers(3))
    spacing = rng.uniform(*INPLANE_SPACING, 3)
    spacing[slice_axis] = rng.uniform(*SLICE_SPACING)
    directions = orientation_matrix(code)
    tilt = random_rotation(rng, OBLIQUE_TILT_DEG) if oblique else np.eye(3)
    directions = tilt @ directions
    points = (pose[:3, :3] @ anat.head_points.T).T + pose[:3, 3]
    coords = points @ directions / spacing  # along each voxel axis, in voxels
    low = coords.min(axis=0) - FOV_MARGIN_MM / spacing
    high = coords.max(axis=0) + FOV_MARGIN_MM / spacing
    shape = tuple(int(v) for v in np.ceil(high - low).astype(int) + 1)
    affine = np.eye(4)
    affine[:3, :3] = directions * spacing
    affine[:3, 3] = directions @ (low * spacing)
    info = {"spacing_mm": [round(float(s), 3) for s in spacing], "slice_axis": slice_axis,
            "orientation": "".join(nib.aff2axcodes(affine)), "oblique": oblique}
    return shape, affine, info


def head_pose(anat: NativeAnatomy, rng: np.random.Generator) -> np.ndarray:
    """MNI world -> native world: rotation about the brain centre, then a translation."""
    rot = random_rotation(rng, POSE_ROTATION_DEG)
    shift = rng.uniform(-POSE_TRANSLATION_MM, POSE_TRANSLATION_MM, 3)
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = anat.brain_centre - rot @ anat.brain_centre + shift
    return pose


def acquire(image: np.ndarray, gain: float, rng: np.random.Generator) -> np.ndarray:
    """Gain, then Gaussian acquisition noise (sd NOISE_FRACTION * 99th percentile), float32.

    Values are rounded to a power-of-two step of half to one noise sd (exact in float32;
    the rounding error, at most 0.29 sd, adds at most 4 % to the noise sd, and it lets gzip
    shrink the files by about a third)."""
    image = image * np.float32(gain)
    sd = NOISE_FRACTION * float(np.percentile(image, 99))
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sd)
    quantum = np.float32(2.0 ** np.floor(np.log2(sd)))
    return (np.round(image / quantum) * quantum).astype(np.float32)


#: Sub-sample spacing (mm) of the voxel profile that native cases are acquired with.
NATIVE_PSF_STEP = 1.0


def native_case(anat: NativeAnatomy, library: LesionLibrary, seed: int, code: str,
                oblique: bool, load_range) -> tuple[list[np.ndarray], np.ndarray, np.ndarray,
                                                    np.ndarray, dict]:
    """One native case: ([FLAIR, T1], label, tissue truth, affine, metadata); the target
    load is log-uniform in ``load_range`` (mm³)."""
    mni = anat.mni
    rng = np.random.default_rng(seed)
    target = float(np.exp(rng.uniform(*np.log(load_range))))
    count = int(rng.integers(NATIVE_LESIONS[0], NATIVE_LESIONS[1] + 1))
    mask, placed = place_lesions(anat, library, rng, target, count)
    # Soft lesion fraction, painted in MNI space (only the lesions' box is touched).
    box = tuple(slice(max(int(i.min()) - 4, 0), int(i.max()) + 5) for i in np.nonzero(mask))
    frac = np.zeros(mni.shape, np.float32)
    frac[box] = lesion_fraction(mask[box])
    flair, t1 = anat.flair.copy(), anat.t1.copy()
    flair[box] = paint_lesion(flair[box], frac[box], FLAIR_LESION_LEVEL * anat.wm_flair)
    t1[box] = paint_lesion(t1[box], frac[box], NATIVE_T1_LESION_LEVEL * mni.wm_t1)
    # The scanner: head pose, grid, one linear resampling of everything through the pose.
    pose = head_pose(anat, rng)
    shape, affine, info = native_grid(anat, rng, code, oblique, pose)
    to_mni = np.linalg.inv(pose)

    def sample(volume: np.ndarray) -> np.ndarray:
        """What the scanner measures in each voxel: the mean over the voxel (a box profile, sampled about
        every NATIVE_PSF_STEP mm along each axis), not the value at its centre."""
        steps = [max(1, int(round(v / NATIVE_PSF_STEP))) for v in voxel_sizes(affine)]
        total = None
        for offset in np.ndindex(*steps):
            shift = [(o + 0.5) / k - 0.5 for o, k in zip(offset, steps)]
            part = resample(volume, mni.affine, shape, affine @ translation(shift), order=1,
                            dst_to_src_world=to_mni)
            total = part if total is None else total + part
        return total / float(np.prod(steps))

    label = (sample(frac) >= 0.5).astype(np.uint8)
    # Tissue truth: argmax of the resampled CSF/GM/WM probabilities inside the resampled
    # intracranial volume (CSF = ICV - GM - WM: resampling is linear, so it is not resampled).
    icv = sample(anat.icv.astype(np.float32))
    gm, wm = sample(anat.pg), sample(anat.pw)
    probs = np.stack([icv - gm - wm, gm, wm])
    tissue = np.where(icv >= 0.5, probs.argmax(axis=0) + 1, 0).astype(np.uint8)
    del probs, icv, gm, wm
    gains = np.exp(rng.uniform(*np.log(NATIVE_GAIN_RANGE), 2))
    channels = [acquire(sample(flair), gains[0], rng), acquire(sample(t1), gains[1], rng)]
    voxel_mm3 = float(np.prod(voxel_sizes(affine)))
    info.update({
        "seed": seed, "shape": list(shape), "affine": np.round(affine, 4).tolist(),
        "pose_mni_to_native": np.round(pose, 6).tolist(),
        "gains": [round(float(g), 4) for g in gains],
        "target_load_mm3": round(target, 1), "lesions_placed": len(placed),
        "mni_load_mm3": int(mask.sum()),
        "native_load_mm3": round(float(label.sum()) * voxel_mm3, 1),
        "native_components": int(ndimage.label(label, structure=CONNECTIVITY_26)[1]),
        "lesions": placed,
    })
    return channels, label, tissue, affine, info


def build_native_brains(cache: Path, mni: MNI, shared: Path, names=None) -> None:
    """Native-space FLAIR + T1 brains with real MS lesion shapes; tissue truth kept apart. `names`: which of
    NATIVE_DATASETS to build (None: both)."""
    anat = library = None
    for name, truth_name, prefix, n, first_seed, load_range in NATIVE_DATASETS:
        if names is not None and name not in names:
            continue
        final, truth_final = cache / name, cache / truth_name
        if final.exists() and truth_final.exists():
            step(f"build {name}: exists, skipped")
            continue
        for stale in (final, truth_final):
            if stale.exists():
                shutil.rmtree(stale)
        truth_final.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        if anat is None:
            anat, library = NativeAnatomy(mni), LesionLibrary(shared)
            step(f"native anatomy and {len(library.items)} real lesion shapes: "
                 f"{time.monotonic() - started:.0f}s")
        started = time.monotonic()
        codes = native_orientations(name, n, first_seed)
        strata = native_load_strata(n, first_seed, load_range)
        cases = {}
        with building(truth_final) as truth_root, building(final) as root:
            for index in range(n):
                case = f"{prefix}_{index:03d}"
                channels, label, tissue, affine, info = native_case(
                    anat, library, first_seed + index, codes[index], index % 3 == 2, strata[index])
                write_nnunet_case(root, case, channels, label, affine)
                save_nifti(truth_root / f"{case}_tissue.nii.gz", tissue, affine)
                cases[case] = info
            write_nnunet_json(root, name.split("/")[-1], {"0": "FLAIR", "1": "T1"}, LESION_LABELS,
                              n, "MNI152 2009 anatomy in native scanner space (random head pose, "
                              "grid, orientation, spacing, gain, noise) with real MS lesion shapes "
                              "in white matter; FLAIR-like and T1 channels")
            write_json(truth_root / "cases.json", {"tissue_labels": TISSUE_LABELS,
                                                   "dataset": name, "cases": cases})
        summary = ", ".join(
            f"{c} {i['orientation']} {'x'.join(f'{s:.2f}' for s in i['spacing_mm'])} "
            f"{i['lesions_placed']} les {i['native_load_mm3']:.0f} mm3" for c, i in cases.items())
        step(f"build {name}: {n} cases in {time.monotonic() - started:.0f}s ({summary})")


def verify_truth(name: str, root: Path, truth: Path) -> None:
    """Each case has a tissue truth on exactly its grid, values 0-3, most lesion voxels in WM;
    no tissue file inside the dataset folder."""
    cases, _, lesion_value = nnunet_cases(root)
    in_wm = total = 0
    for case, _images, label_path in cases:
        label_img = nib.load(str(label_path))
        tissue_img = nib.load(str(truth / f"{case}_tissue.nii.gz"))
        if tissue_img.shape != label_img.shape or not np.allclose(tissue_img.affine,
                                                                  label_img.affine, atol=1e-4):
            raise FetchError(f"{name}/{case}: tissue truth geometry differs from the case")
        tissue = np.asanyarray(tissue_img.dataobj)
        if not set(np.unique(tissue).tolist()) <= set(TISSUE_LABELS.values()):
            raise FetchError(f"{name}/{case}: tissue values outside {TISSUE_LABELS}")
        lesion = np.asanyarray(label_img.dataobj) == lesion_value
        in_wm += int((tissue[lesion] == TISSUE_LABELS["wm"]).sum())
        total += int(lesion.sum())
    if list(root.rglob("*tissue*")):
        raise FetchError(f"{name}: a tissue file is inside the dataset folder")
    share = in_wm / max(total, 1)
    if share < NATIVE_WM_SHARE:
        raise FetchError(f"{name}: only {share:.3f} of lesion voxels are in WM by the truth")
    step(f"verify truth of {name}: {len(cases)} tissue maps on the case grids, "
         f"lesion voxels in WM {share:.3f}")


# --------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------


def nnunet_cases(root: Path) -> tuple[list[tuple[str, list[Path], Path]], dict, int]:
    """(cases, label name->value, lesion value) of an nnU-Net v2 raw dataset."""
    meta = json.loads((root / "dataset.json").read_text())
    n_channels = len(meta["channel_names"])
    cases = []
    for label in sorted((root / "labelsTr").glob("*.nii.gz")):
        case = label.name[: -len(".nii.gz")]
        images = [root / "imagesTr" / f"{case}_{i:04d}.nii.gz" for i in range(n_channels)]
        cases.append((case, images, label))
    if len(cases) != meta["numTraining"]:
        raise FetchError(f"{root}: numTraining {meta['numTraining']} != {len(cases)} labels")
    return cases, meta["labels"], max(meta["labels"].values())


def msd_cases(root: Path) -> tuple[list[tuple[str, list[Path], Path]], dict, int]:
    """(cases, label name->value, lesion value) of a Decathlon dataset."""
    meta = json.loads((root / "dataset.json").read_text())
    cases = [(Path(e["label"]).name[: -len(".nii.gz")], [root / e["image"]], root / e["label"])
             for e in meta["training"]]
    if len(cases) != meta["numTraining"]:
        raise FetchError(f"{root}: numTraining does not match the training list")
    labels = {name: int(value) for value, name in meta["labels"].items()}
    return cases, labels, max(labels.values())


def csv_cases(root: Path) -> tuple[list[tuple[str, list[Path], Path]], dict, int]:
    """(cases, label name->value, lesion value) of a CSV-listed dataset."""
    with open(root / "cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cases = [(r["case_id"], [root / r["image_0"]], root / r["label"]) for r in rows]
    return cases, LESION_LABELS, 1


def check_case(case: str, images: list[Path], label_path: Path, allowed: set) -> tuple:
    """Check one case's geometry and label values; return (shape, lesion array)."""
    label_img = nib.load(str(label_path))
    label = np.asanyarray(label_img.dataobj)
    for path in images:
        img = nib.load(str(path))
        if img.shape[:3] != label.shape or not np.allclose(img.affine, label_img.affine,
                                                           atol=1e-4):
            raise FetchError(f"{case}: {path.name} geometry differs from its label")
    values = set(np.unique(label).tolist())
    if not values <= allowed:
        raise FetchError(f"{case}: label values {sorted(values)} not in {sorted(allowed)}")
    return label.shape, label


def verify_dataset(name: str, root: Path, reader) -> None:
    """Check every case of a dataset and print a one-line summary."""
    cases, labels, lesion_value = reader(root)
    if not cases:
        raise FetchError(f"{name}: no cases")
    first_shape, voxels, components = None, [], []
    for case, images, label_path in cases:
        for path in [*images, label_path]:
            if not path.exists():
                raise FetchError(f"{name}/{case}: missing {path}")
        shape, label = check_case(case, images, label_path, set(labels.values()))
        first_shape = first_shape or shape
        lesion = label == lesion_value
        voxels.append(int(lesion.sum()))
        components.append(ndimage.label(lesion, structure=CONNECTIVITY_26)[1])
    step(f"verify {name}: {len(cases)} cases, first shape {first_shape}, "
         f"lesion voxels {voxels}, lesion components {components}")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def default_cache() -> Path:
    """``$LESIONSYNTH_DATA`` or ``<repo>/.cache/data``."""
    env = os.environ.get("LESIONSYNTH_DATA")
    return Path(env) if env else REPO / ".cache" / "data"


def _shared_candidates() -> list[Path]:
    """Where the shared masks may be: the env override, beside this checkout, or beside the repository
    this checkout was cloned from (a CI clone in a temporary folder still finds them that way)."""
    env = os.environ.get("LESIONSYNTH_SHARED_DATA")
    if env:
        return [Path(env)]
    candidates = [REPO.parent / "shared" / "data"]
    try:
        origin = subprocess.run(["git", "-C", str(REPO), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        origin = ""
    if origin and "://" not in origin and not origin.startswith("git@"):
        origin_path = Path(origin.removeprefix("file:")).expanduser()
        if not origin_path.is_absolute():
            origin_path = (REPO / origin_path).resolve()
        candidates.append(origin_path.parent / "shared" / "data")
    return candidates


def shared_data_dir() -> Path:
    """``$LESIONSYNTH_SHARED_DATA``, ``<repo>/../shared/data`` or ``<origin repo>/../shared/data``."""
    tried = []
    for path in _shared_candidates():
        needed = [path / "atlas_mni_labels" / f"{c}.nii.gz" for c in ATLAS_CASES]
        needed += [path / "ms_lesion_masks" / f"{c}.nii.gz" for c in MS_CASES]
        if all(p.exists() for p in needed):
            return path
        tried.append(str(path))
    raise FetchError("shared lesion masks not found (set LESIONSYNTH_SHARED_DATA); looked in: " + ", ".join(tried))


# What each dataset needs: the downloads ("pyradiomics", "mni152", "shared" masks) and the datasets it is
# made from. Listed in build order; ``--only`` builds the named datasets and what they are made from.
DATASETS: dict[str, tuple[set[str], tuple[str, ...]]] = {
    "brain_t1c": ({"pyradiomics"}, ()),
    "lung_ct": ({"pyradiomics"}, ()),
    "lung_multiclass": (set(), ("lung_ct",)),
    "mni_lesions": ({"mni152", "shared"}, ()),
    "heldout/msd_mni": (set(), ("mni_lesions",)),
    "heldout/ms_oblique": ({"mni152", "shared"}, ()),
    "heldout/lung_lps": (set(), ("lung_multiclass",)),
    "native_brains": ({"mni152", "shared"}, ()),
    "heldout/native_brains": ({"mni152", "shared"}, ()),
}
DEMO_DATASETS = ("mni_lesions",)  # what `make demo` and `make check-install` read
# what the tests read (`make test`); the held-out sets are for the benchmarks only, which the tests never see
TEST_DATASETS = ("brain_t1c", "lung_ct", "lung_multiclass", "mni_lesions", "native_brains")


def with_sources(names) -> list[str]:
    """``names`` and every dataset they are made from, in build order."""
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(DATASETS[name][1])
    return [name for name in DATASETS if name in wanted]


def build_all(cache: Path, only=None) -> None:
    """Build every dataset (or those in ``only`` and their sources) in order; each step skips itself when
    its outputs exist, and only the downloads the chosen datasets need are made."""
    names = with_sources(only or DATASETS)
    needs = set().union(*(DATASETS[n][0] for n in names))
    shared = shared_data_dir() if "shared" in needs else None
    downloads, raw = cache / "downloads", cache / "raw"
    downloads.mkdir(parents=True, exist_ok=True)
    (cache / "heldout").mkdir(exist_ok=True)

    if "pyradiomics" in needs:
        extract_pyradiomics_data(download_pyradiomics(downloads), raw / "pyradiomics")
        convert_nrrd(raw / "pyradiomics", raw / "pyradiomics_nii")
    mni = None
    if "mni152" in needs:
        extract_mni(download_nilearn(downloads), raw / "mni152")
        mni = MNI(raw / "mni152")

    nii = raw / "pyradiomics_nii"
    builders = {
        "brain_t1c": lambda: build_brain_t1c(cache, nii),
        "lung_ct": lambda: build_lung_ct(cache, nii),
        "lung_multiclass": lambda: build_lung_multiclass(cache),
        "mni_lesions": lambda: build_mni_lesions(cache, mni, shared),
        "heldout/msd_mni": lambda: build_msd_mni(cache),
        "heldout/ms_oblique": lambda: build_ms_oblique(cache, mni, shared),
        "heldout/lung_lps": lambda: build_lung_lps(cache),
    }
    for name in names:
        if name in builders:
            builders[name]()
    if any(name in names for name, *_ in NATIVE_DATASETS):
        build_native_brains(cache, mni, shared, names)  # the native datasets share one lesion library

    readers = {"heldout/msd_mni": msd_cases, "heldout/ms_oblique": csv_cases}
    for name in names:
        verify_dataset(name, cache / name, readers.get(name, nnunet_cases))
    for name, truth_name, *_ in NATIVE_DATASETS:
        if name in names:
            verify_truth(name, cache / name, cache / truth_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help="output folder (default: $LESIONSYNTH_DATA or <repo>/.cache/data)")
    parser.add_argument("--only", nargs="+", choices=list(DATASETS), metavar="DATASET", default=None,
                        help="build only these datasets (and those they are made from), with only the downloads "
                             f"they need; any of: {', '.join(DATASETS)}")
    parser.add_argument("--demo", action="store_true",
                        help=f"only what `make demo` reads: the same as --only {' '.join(DEMO_DATASETS)}")
    parser.add_argument("--tests", action="store_true",
                        help=f"only what the tests read: the same as --only {' '.join(TEST_DATASETS)}")
    args = parser.parse_args(argv)
    only = [*(args.only or ()), *(DEMO_DATASETS if args.demo else ()), *(TEST_DATASETS if args.tests else ())] or None
    cache = (args.cache or default_cache()).resolve()
    stamp, tests_stamp = cache / STAMP_NAME, cache / TESTS_STAMP_NAME
    built, tests_set = with_sources(only or DATASETS), set(with_sources(TEST_DATASETS))
    covers_tests = tests_set <= set(built)
    if stamp.exists() or (set(built) <= tests_set and tests_stamp.exists()):
        print(cache)
        return 0
    step(f"building into {cache}" + (f" (only {', '.join(built)})" if only else ""))
    try:
        build_all(cache, only)
    except FetchError as exc:
        print(f"[fetch_data] ERROR: {exc}", file=sys.stderr)
        return 1
    versions = json.dumps({"pyradiomics": PYRADIOMICS_VERSION, "nilearn": NILEARN_VERSION}) + "\n"
    if covers_tests:
        tests_stamp.write_text(versions)
    if only:  # a partial build: the stamp (everything is there) is written by a full one only
        step("done" + (f"; stamp {tests_stamp}" if covers_tests else ""))
        return 0
    stamp.write_text(versions)
    step(f"done; stamp {stamp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
