#!/usr/bin/env python3
"""Fetch public medical images and build lesionsynth's real-data test datasets.

Usage::

    python scripts/fetch_data.py [--cache DIR]

``DIR`` defaults to ``$LESIONSYNTH_DATA`` or else ``<repo>/.cache/data`` (gitignored).
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

The held-out datasets are for evaluation only; unit tests must not use them.

The script is idempotent: every step skips work whose outputs exist (datasets are built in a
``.partial-*`` folder and renamed when complete), and a final ``DIR/.complete-v1`` stamp makes
later runs exit at once. Any failed download or check exits non-zero with a message.
"""

from __future__ import annotations

import argparse
import csv
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
STAMP_NAME = ".complete-v1"

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


def build_all(cache: Path) -> None:
    """Run every step in order; each skips itself when its outputs exist."""
    shared = shared_data_dir()
    downloads, raw = cache / "downloads", cache / "raw"
    downloads.mkdir(parents=True, exist_ok=True)
    (cache / "heldout").mkdir(exist_ok=True)

    extract_pyradiomics_data(download_pyradiomics(downloads), raw / "pyradiomics")
    extract_mni(download_nilearn(downloads), raw / "mni152")
    convert_nrrd(raw / "pyradiomics", raw / "pyradiomics_nii")

    nii = raw / "pyradiomics_nii"
    build_brain_t1c(cache, nii)
    build_lung_ct(cache, nii)
    build_lung_multiclass(cache)
    mni = MNI(raw / "mni152")
    build_mni_lesions(cache, mni, shared)
    build_msd_mni(cache)
    build_ms_oblique(cache, mni, shared)
    build_lung_lps(cache)

    for name, reader in [("brain_t1c", nnunet_cases), ("lung_ct", nnunet_cases),
                         ("lung_multiclass", nnunet_cases), ("mni_lesions", nnunet_cases),
                         ("heldout/msd_mni", msd_cases), ("heldout/ms_oblique", csv_cases),
                         ("heldout/lung_lps", nnunet_cases)]:
        verify_dataset(name, cache / name, reader)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help="output folder (default: $LESIONSYNTH_DATA or <repo>/.cache/data)")
    args = parser.parse_args(argv)
    cache = (args.cache or default_cache()).resolve()
    stamp = cache / STAMP_NAME
    if stamp.exists():
        print(cache)
        return 0
    step(f"building into {cache}")
    try:
        build_all(cache)
    except FetchError as exc:
        print(f"[fetch_data] ERROR: {exc}", file=sys.stderr)
        return 1
    stamp.write_text(json.dumps({"pyradiomics": PYRADIOMICS_VERSION,
                                 "nilearn": NILEARN_VERSION}) + "\n")
    step(f"done; stamp {stamp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
