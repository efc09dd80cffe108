"""benchmarks/patch_cnn_critic.py: patches sampled in world mm on an oblique grid, and a tiny CNN under grouped
cross-validation on synthetic patches (separable: AUC > 0.9; one distribution: AUC near 0.5)."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import load_benchmark


bench = load_benchmark("patch_cnn_critic")


def _oblique_affine():
    """Rotated about two axes, one axis flipped, anisotropic voxels (0.8, 1.1, 1.7 mm), an offset."""
    a, b = 0.5, -0.35
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.8, -1.1, 1.7])
    affine[:3, 3] = [-30.0, 25.0, -20.0]
    return affine


def _world(affine, shape):
    g = np.indices(shape).reshape(3, -1).astype(np.float64)
    return (affine[:3, :3] @ g + affine[:3, 3:4]).reshape((3,) + tuple(shape))


def _weighted_centre(values: np.ndarray) -> np.ndarray:
    w = np.clip(values, 0, None)
    idx = np.indices(values.shape).reshape(3, -1)
    return (idx * w.ravel()).sum(axis=1) / w.sum()


def test_patch_is_sampled_in_world_mm_on_an_oblique_grid():
    affine, shape = _oblique_affine(), (70, 50, 36)
    world = _world(affine, shape)
    blob_mm = _world(affine, (1, 1, 1))[:, 0, 0, 0] + affine[:3, :3] @ np.array([35.0, 24.0, 17.0])
    r2 = ((world - blob_mm.reshape(3, 1, 1, 1)) ** 2).sum(axis=0)
    image = np.exp(-r2 / (2 * 2.0 ** 2)).astype(np.float32)          # a 2 mm Gaussian blob
    n = 24
    centre = (n - 1) / 2.0
    crop, coords = bench.sampling_box(affine, shape, blob_mm, 24.0, 1.0)
    patch = bench.sample(image[crop], coords)
    assert patch.shape == (n, n, n)
    assert np.abs(_weighted_centre(patch) - centre).max() < 0.25
    # its spread along every patch axis is the blob's, in mm (2 mm sd; the linear interpolation adds a little)
    w = patch / patch.sum()
    idx = np.indices(patch.shape) - centre
    variance = np.array([(w * idx[i] ** 2).sum() for i in range(3)])
    assert np.all((variance > 3.8) & (variance < 4.8)), variance
    # centred 5 mm to the left (world −x) of the blob: the blob lies 5 points further along patch axis 0
    crop, coords = bench.sampling_box(affine, shape, blob_mm - np.array([5.0, 0.0, 0.0]), 24.0, 1.0)
    shifted = _weighted_centre(bench.sample(image[crop], coords))
    assert shifted == pytest.approx([centre + 5, centre, centre], abs=0.25)
    # half the step: 48 points over the same 24 mm, the blob 10 points off
    crop, coords = bench.sampling_box(affine, shape, blob_mm + np.array([0.0, 0.0, 5.0]), 24.0, 0.5)
    fine = _weighted_centre(bench.sample(image[crop], coords))
    assert fine == pytest.approx([23.5, 23.5, 23.5 - 10], abs=0.4)


def test_lesion_patch_normalises_on_tissue_and_adds_the_mask():
    affine, shape = _oblique_affine(), (70, 50, 36)
    world = _world(affine, shape)
    rng = np.random.default_rng(0)
    centre_mm = _world(affine, (1, 1, 1))[:, 0, 0, 0] + affine[:3, :3] @ np.array([35.0, 24.0, 17.0])
    ball = ((world - centre_mm.reshape(3, 1, 1, 1)) ** 2).sum(axis=0) <= 5.0 ** 2
    channels = np.stack([200 + 10 * rng.standard_normal(shape), 50 + 4 * rng.standard_normal(shape)]).astype(np.float32)
    channels[0][ball] += 100.0   # bright in channel 0, unchanged in channel 1
    comps = ball.astype(np.int32)
    x = bench.lesion_patch(channels, ball, comps, 1, affine, centre_mm)
    assert x.shape == (3, 24, 24, 24)
    inside, _, context = bench.regions(x[None, -1])
    assert inside[0].sum() * 1.0 == pytest.approx(4 / 3 * np.pi * 5.0 ** 3, rel=0.15)   # mm³ of the ball
    assert np.abs(_weighted_centre(x[-1]) - 11.5).max() < 0.3
    for c in range(2):
        assert abs(np.median(x[c][context[0]])) < 0.1
    # tissue sd after linear resampling is below the raw noise sd: the contrast is over > 10 sd
    assert np.median(x[0][inside[0]]) > 10 and abs(np.median(x[1][inside[0]])) < 0.5


def _synthetic_patches(n_per_class: int, separable: bool, seed: int = 0, size: int = 12):
    """(x, y, groups): noise patches with a ball (radius 3) marked in the mask channel; separable: the ball is
    bright in channel 0 for class 1 and dark for class 0; otherwise the same for both. 12 groups, both classes
    in each."""
    rng = np.random.default_rng(seed)
    g = np.indices((size,) * 3) - (size - 1) / 2.0
    ball = (g ** 2).sum(axis=0) <= 3.0 ** 2
    x = rng.standard_normal((2 * n_per_class, 3, size, size, size)).astype(np.float32)
    y = np.r_[np.zeros(n_per_class, bool), np.ones(n_per_class, bool)]
    x[:, 2] = ball
    for i in range(len(x)):
        x[i, 0][ball] += (2.0 if y[i] else -2.0) if separable else 1.0
    groups = [f"case{i % 12}" for i in range(len(x))]
    return x, y, groups


EPOCHS = 12


@pytest.mark.parametrize("separable", [True, False])
def test_tiny_cnn_under_grouped_cross_validation(separable):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    x, y, groups = _synthetic_patches(48, separable)
    result = bench.cross_validate(x, y, groups, seed=0, epochs=EPOCHS, widths=(4, 8), splits=4,
                                  channel_names=["A", "B"], occlude=separable)
    assert result["n_splits"] == 4 and len(result["fold_aucs"]) == 4
    lo, hi = result["auc_ci95"]
    assert lo <= result["auc"] <= hi
    if separable:
        assert result["auc"] > 0.9
        drops = {k: v["auc_drop"] for k, v in result["occlusion"].items()}
        assert drops["channel A"] > 0.2 and drops["inside lesion"] > 0.2   # where the difference lies
        assert abs(drops["channel B"]) < 0.1
    else:
        assert 0.3 < result["auc"] < 0.7
    again = bench.cross_validate(x, y, groups, seed=0, epochs=EPOCHS, widths=(4, 8), splits=4)
    assert again["scores"] == result["scores"]   # deterministic on CPU for a seed
