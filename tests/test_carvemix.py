"""The CarveMix arm of benchmarks/downstream_unet.py: `carvemix()` on small synthetic arrays."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import load_benchmark


bench = load_benchmark("downstream_unet")
SHAPE = (20, 18, 16)
SPACING = 2.0


def _pair(seed: int = 0, shape_b=SHAPE):
    """Donor A: a thick rod (deep enough for a margin) + one single voxel; target B: a small blob elsewhere."""
    rng = np.random.default_rng(seed)
    image_a = rng.normal(10.0, 1.0, (2,) + SHAPE).astype(np.float32)  # A's intensities ~10, B's ~-10
    image_b = rng.normal(-10.0, 1.0, (2,) + tuple(shape_b)).astype(np.float32)
    label_a = np.zeros(SHAPE, np.uint8)
    label_a[4:16, 6:11, 5:10] = 1  # rod 12 x 5 x 5 voxels
    label_a[2, 2, 2] = 1
    label_b = np.zeros(shape_b, np.uint8)
    label_b[1:3, 14:16, 12:14] = 2  # another label value, to tell B's labels from A's
    return image_a, label_a, image_b, label_b


def _brute_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Signed distance to the mask's surface by brute force over voxel centres (the reference)."""
    grid = np.indices(mask.shape).reshape(3, -1).T * spacing
    inside, outside = grid[mask.ravel()], grid[~mask.ravel()]
    d_to_in = np.sqrt(((grid[:, None, :] - inside[None]) ** 2).sum(-1)).min(1)
    d_to_out = np.sqrt(((grid[:, None, :] - outside[None]) ** 2).sum(-1)).min(1)
    d = np.where(mask.ravel(), spacing / 2 - d_to_out, d_to_in - spacing / 2)
    return d.reshape(mask.shape)


def _draws(n: int, seed: int = 0):
    a = _pair()
    rng = np.random.default_rng(seed)
    return a, [bench.carvemix(*a, rng=rng, spacing=SPACING) for _ in range(n)]


def test_shapes_dtypes_and_inputs_untouched():
    image_a, label_a, image_b, label_b = _pair()
    copies = [x.copy() for x in (image_a, label_a, image_b, label_b)]
    image, label, m, lam = bench.carvemix(image_a, label_a, image_b, label_b, np.random.default_rng(1), SPACING)
    assert image.shape == image_b.shape and image.dtype == image_b.dtype
    assert label.shape == label_b.shape and label.dtype == label_b.dtype
    assert m.shape == SHAPE and m.dtype == bool and lam is not None
    for x, c in zip((image_a, label_a, image_b, label_b), copies):
        assert np.array_equal(x, c)
    # single-channel (X, Y, Z) images work the same way
    image1, label1, m1, _ = bench.carvemix(image_a[0], label_a, image_b[0], label_b, np.random.default_rng(1),
                                           SPACING)
    assert image1.shape == SHAPE and np.array_equal(m1, m) and np.array_equal(label1, label)


def test_labels_and_image_from_a_inside_from_b_outside():
    (image_a, label_a, image_b, label_b), draws = _draws(12)
    for image, label, m, lam in draws:
        assert m.any() and not m.all()
        assert np.array_equal(label[m], label_a[m])
        assert np.array_equal(label[~m], label_b[~m])
        assert np.array_equal(image[:, m], image_a[:, m])
        assert np.array_equal(image[:, ~m], image_b[:, ~m])


def test_lambda_range_and_region_grows_or_shrinks():
    (_, label_a, _, _), draws = _draws(60)
    lesion = label_a > 0
    depth = float(abs(bench.signed_distance(lesion, SPACING).min()))
    assert depth == pytest.approx(2 * SPACING + SPACING / 2)  # the rod's centre: 3 voxels from background
    lams = np.array([d[3] for d in draws])
    assert np.all(lams >= -depth / 2) and np.all(lams <= depth)
    assert (lams >= 0).sum() > 20 and (lams < 0).sum() > 5  # both branches of U(-depth/2, depth) occur
    for _, label, m, lam in draws:
        if lam >= 0:  # grown: the whole donor lesion is carved, with its label
            assert m[lesion].all() and (label[lesion] == 1).all()
            if lam >= SPACING / 2:
                assert (m & ~lesion).any()  # plus a margin
        else:  # shrunk: only lesion voxels are carved; below -s/2 (the outer layer's D) not all of them
            assert m.any() and not (m & ~lesion).any()
            assert label[m].min() == 1
            assert m[lesion].all() == (lam >= -SPACING / 2)


def test_region_is_the_distance_level_set():
    """M must be {D <= lambda} for the Euclidean signed distance: a box, a cube dilation or a sphere fails."""
    (_, label_a, _, _), draws = _draws(40, seed=3)
    lesion = label_a > 0
    ref = _brute_distance(lesion, SPACING)
    assert np.allclose(bench.signed_distance(lesion, SPACING), ref)
    checked = 0
    for _, _, m, lam in draws:
        expected = ref <= lam
        if np.any(np.abs(ref - lam) < 1e-6):  # a tie exactly on a level: skip
            continue
        assert np.array_equal(m, expected)
        if lam > 2 * SPACING:  # a large margin: Euclidean, not a box (the corners of the grown box are out)
            (x0, y0, z0), (x1, y1, z1) = np.argwhere(m & (ref > 0)).min(0), np.argwhere(m & (ref > 0)).max(0)
            assert not m[x0, y0, z0] and not m[x1, y1, z1]
        checked += 1
    assert checked >= 30


def test_deterministic_for_a_seed():
    a = _pair()
    r1 = bench.carvemix(*a, rng=np.random.default_rng(7), spacing=SPACING)
    r2 = bench.carvemix(*a, rng=np.random.default_rng(7), spacing=SPACING)
    r3 = bench.carvemix(*a, rng=np.random.default_rng(8), spacing=SPACING)
    for x, y in zip(r1[:3], r2[:3]):
        assert np.array_equal(x, y)
    assert r1[3] == r2[3] and r1[3] != r3[3]


def test_different_grids_are_centred():
    """A smaller donor grid is centred in the target's: output on B's grid, A's lesion shifted by the offset."""
    image_a, label_a, image_b, label_b = _pair(shape_b=(26, 18, 12))
    image, label, m, lam = bench.carvemix(image_a, label_a, image_b, label_b, np.random.default_rng(0), SPACING)
    assert image.shape == (2, 26, 18, 12) and label.shape == (26, 18, 12) and m.shape == (26, 18, 12)
    off = np.array([3, 0, -2])  # (26 - 20) // 2, (18 - 18) // 2, (12 - 16) // 2
    shifted = np.zeros((26, 18, 12), bool)
    idx = np.argwhere(label_a > 0) + off
    idx = idx[np.all((idx >= 0) & (idx < (26, 18, 12)), axis=1)]
    shifted[tuple(idx.T)] = True
    if lam >= 0:
        assert m[shifted].all() and (label[shifted] == 1).all()
    assert np.array_equal(label[~m], label_b[~m])


def test_no_donor_lesion_returns_target():
    image_a, label_a, image_b, label_b = _pair()
    image, label, m, lam = bench.carvemix(image_a, np.zeros_like(label_a), image_b, label_b,
                                          np.random.default_rng(0), SPACING)
    assert lam is None and not m.any()
    assert np.array_equal(image, image_b) and np.array_equal(label, label_b)
