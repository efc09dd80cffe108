"""Shared fixtures: small synthetic datasets for unit tests, and the real sample data cache."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """The script benchmarks/{name}.py as a module, loaded once per test process (kept in sys.modules, which
    its dataclasses need)."""
    key = f"benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def data_cache() -> Path:
    return Path(os.environ.get("LESIONSYNTH_DATA", REPO / ".cache" / "data"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real sample datasets the tests read, made by `make test-data` (or `make data`, which also makes the
    held-out ones); missing data fails in CI and skips elsewhere."""
    root = data_cache()
    if not any((root / stamp).is_file() for stamp in (".complete-tests-v2", ".complete-v2")):
        msg = f"real sample data missing in {root}: run `make test-data`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return root


def _mm(img):
    img.header.set_xyzt_units("mm", "sec")
    return img


def blob_dataset(root: Path, n_cases: int = 4, shape=(48, 44, 36), spacing=(1.0, 1.2, 1.5), seed: int = 0,
                 channels=("T1", "FLAIR"), oblique: bool = False, multiclass: bool = False) -> Path:
    """A small nnU-Net v2 dataset: an ellipsoid 'body' with bright spherical lesions."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    affine = np.diag(list(spacing) + [1.0])
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        affine[:3, :3] = rot @ affine[:3, :3] @ np.diag([-1, 1, 1])
    affine[:3, 3] = [-20.0, -30.0, -10.0]
    g = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2
    body = sum(((g[i] - centre[i]) / (0.42 * shape[i])) ** 2 for i in range(3)) < 1
    for k in range(n_cases):
        label = np.zeros(shape, np.uint8)
        if multiclass:
            organ = sum(((g[i] - centre[i]) / (0.3 * shape[i])) ** 2 for i in range(3)) < 1
            label[organ] = 1
        for _ in range(k + 1):
            c = rng.uniform(0.35, 0.65, 3) * np.array(shape)
            r = rng.uniform(2.0, 4.0)
            les = sum((g[i] - c[i]) ** 2 * spacing[i] ** 2 for i in range(3)) < r * r
            label[les & body] = 2 if multiclass else 1
        lesion = np.isin(label, [2] if multiclass else [1])
        base = np.where(body, 100.0, 0.0) + np.where(label == 1, 20.0, 0.0) if multiclass else np.where(body, 100.0, 0.0)
        for ci, _name in enumerate(channels):
            img = np.where(lesion, 160.0 - 40 * ci, base * (1 + 0.2 * ci))
            img = ndimage.gaussian_filter(img, 0.7) + rng.normal(0, 3, shape)
            nib.save(_mm(nib.Nifti1Image(img.astype(np.float32), affine)), root / "imagesTr" / f"case{k}_{ci:04d}.nii.gz")
        nib.save(_mm(nib.Nifti1Image(label, affine)), root / "labelsTr" / f"case{k}.nii.gz")
    labels = {"background": 0, "organ": 1, "lesion": 2} if multiclass else {"background": 0, "lesion": 1}
    meta = {"channel_names": {str(i): n for i, n in enumerate(channels)}, "labels": labels,
            "numTraining": n_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def blobs(tmp_path) -> Path:
    return blob_dataset(tmp_path / "ds")


@pytest.fixture(scope="session")
def blob_bank(tmp_path_factory) -> Path:
    from lesionsynth.bank import BankConfig, build_bank

    root = tmp_path_factory.mktemp("blobbank")
    ds = blob_dataset(root / "ds")
    return build_bank(ds, root / "bank", BankConfig(), jobs=1, progress=False)
