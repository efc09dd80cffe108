"""The native-space brain dataset (scripts/fetch_data.py) and the tissue-share measurement of
benchmarks/native_space.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def native(real_data) -> tuple[Path, Path, list[str]]:
    root, truth = real_data / "native_brains", real_data / "truth" / "native_brains"
    cases = sorted(p.name[: -len(".nii.gz")] for p in (root / "labelsTr").glob("*.nii.gz"))
    assert len(cases) == 8
    return root, truth, cases


def _array(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_grids_and_orientations_differ(native):
    root, _, cases = native
    imgs = [nib.load(str(root / "imagesTr" / f"{c}_0000.nii.gz")) for c in cases]
    codes = ["".join(nib.aff2axcodes(img.affine)) for img in imgs]
    assert len(set(codes)) == len(cases), codes
    assert {"LPS", "RAS", "PIR"} <= set(codes)
    for a, b in itertools.combinations(imgs, 2):
        assert a.shape != b.shape or not np.allclose(a.affine, b.affine)
    spacings = np.array([img.header.get_zooms()[:3] for img in imgs])
    assert len({tuple(np.round(s, 2)) for s in spacings}) == len(cases)
    assert spacings.min() >= 0.8 - 1e-3 and spacings.max() <= 3.0 + 1e-3
    # Some grids are oblique: their direction cosines are not a signed permutation.
    dirs = [img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0) for img in imgs]
    assert any(np.abs(d).max(axis=0).min() < 0.999 for d in dirs)
    for c in cases:  # both channels float32 on the label's grid
        label = nib.load(str(root / "labelsTr" / f"{c}.nii.gz"))
        for ch in range(2):
            img = nib.load(str(root / "imagesTr" / f"{c}_{ch:04d}.nii.gz"))
            assert img.get_data_dtype() == np.float32
            assert img.shape == label.shape and np.allclose(img.affine, label.affine, atol=1e-4)


def test_no_tissue_label_in_dataset(native):
    root, _, cases = native
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1"}
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == len(cases)
    assert not [p for p in root.rglob("*") if "tissue" in p.name.lower()]
    for c in cases:
        img = nib.load(str(root / "labelsTr" / f"{c}.nii.gz"))
        assert img.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(img.dataobj)).tolist()) == {0, 1}


def test_truth_on_case_grids_and_real_lesions_in_wm(native):
    root, truth, cases = native
    harness = load_benchmark("native_space")
    results = []
    for c in cases:
        label_img = nib.load(str(root / "labelsTr" / f"{c}.nii.gz"))
        tissue_img = nib.load(str(truth / f"{c}_tissue.nii.gz"))
        assert tissue_img.get_data_dtype() == np.uint8
        assert tissue_img.shape == label_img.shape
        assert np.allclose(tissue_img.affine, label_img.affine, atol=1e-4)
        tissue = np.asanyarray(tissue_img.dataobj)
        assert set(np.unique(tissue).tolist()) == {0, 1, 2, 3}
        result = harness.tissue_shares(np.asanyarray(label_img.dataobj), None, tissue, [1])
        assert result["shares"]["wm"] >= 0.9, (c, result)
        results.append(result)
    pooled = harness.pool(results)
    assert pooled["shares"]["wm"] >= 0.95, pooled


def test_ventricle_distance_hand_example():
    """Deep CSF is a ventricle, CSF at the brain's surface is not; a component's distance is its centroid's."""
    harness = load_benchmark("native_space")
    tissue = np.zeros((60, 60, 60), np.uint8)
    tissue[5:55, 5:55, 5:55] = 3  # a brain cube of WM, 50 mm (1 mm voxels)
    tissue[28:32, 28:32, 28:32] = 1  # a ventricle in its middle (depth 23 mm)
    tissue[5:7, 5:10, 5:10] = 1  # sulcal CSF at its surface: not a ventricle
    distance = harness.ventricle_distance_map(tissue, (1.0, 1.0, 1.0))
    assert distance[30, 30, 30] == 0 and distance[6, 6, 6] > 20
    lesions = np.zeros(tissue.shape, bool)
    lesions[40:43, 29:32, 29:32] = True  # centroid (41, 30, 30): 10 mm beyond the ventricle's face (x = 31)
    lesions[29:32, 29:32, 14:17] = True  # centroid (30, 30, 15): 13 mm below it (z = 28)
    assert sorted(harness.centroid_distances(lesions, distance)) == pytest.approx([10.0, 13.0])
    assert harness.ventricle_distance_map(np.full((8, 8, 8), 3, np.uint8), (1.0, 1.0, 1.0)) is None
    assert harness.ks_statistic([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert harness.ks_statistic([1.0, 2.0], [5.0, 6.0]) == 1.0
    assert harness.ks_statistic([], [1.0]) is None


def test_tissue_shares_hand_example():
    harness = load_benchmark("native_space")
    tissue = np.zeros((4, 4, 1), np.uint8)
    tissue[0] = 3  # row 0 WM
    tissue[1] = 2  # row 1 GM
    tissue[2] = 1  # row 2 CSF; row 3 outside the brain
    base = np.zeros_like(tissue)
    base[0, :2] = 1  # two real lesion voxels in WM
    label = base.copy()
    label[0, 2:] = 1  # pasted: 2 WM
    label[1, 0] = 1  # 1 GM
    label[2, 0] = 2  # 1 CSF (another lesion value)
    label[3, 3] = 1  # 1 outside
    label[3, 0] = 5  # not a lesion value: ignored
    pasted = harness.tissue_shares(label, base, tissue, [1, 2])
    assert pasted["voxels"] == 5
    assert pasted["counts"] == {"background": 1, "csf": 1, "gm": 1, "wm": 2}
    assert pasted["shares"] == pytest.approx({"background": 0.2, "csf": 0.2, "gm": 0.2, "wm": 0.4})
    real = harness.tissue_shares(base, None, tissue, [1])
    assert real["counts"] == {"background": 0, "csf": 0, "gm": 0, "wm": 2}
    assert real["shares"]["wm"] == 1.0
    only_wm_label = harness.tissue_shares(label, base, tissue, [2])
    assert only_wm_label["counts"]["csf"] == 1 and only_wm_label["voxels"] == 1
    empty = harness.tissue_shares(base, base, tissue, [1])
    assert empty["voxels"] == 0 and empty["shares"]["wm"] is None
    pooled = harness.pool([pasted, real])
    assert pooled["voxels"] == 7 and pooled["shares"]["wm"] == pytest.approx(4 / 7)
    with pytest.raises(ValueError):
        harness.tissue_shares(label, base[:2], tissue, [1])


def test_default_truth_folder():
    harness = load_benchmark("native_space")
    cache = Path("/some/cache")
    assert harness.default_truth(cache / "heldout" / "native_brains") == cache / "truth" / "heldout_native_brains"
    assert harness.default_truth(cache / "native_brains") == cache / "truth" / "native_brains"
