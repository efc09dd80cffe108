"""What a strong critic looks for around removals: no lesion left behind on a grid coarser than the recipe's rim,
the case's own noise kept in the hole."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lesionsynth.io.dataset import Case
from lesionsynth.render.inpaint import edge_preserving_smooth, inpaint_patch, written_neighbours


def _blurred_ball_case(shape, spacing, noise_sd, seed, radius=5.0, contrast=60.0, level=100.0, lesion=True,
                       noise_smooth=0.0):
    """A case with a ball lesion whose edge is blurred as a scanner records it (partial volume), white or
    smoothed noise of `noise_sd`; returns (case, the same case without the lesion and the same noise)."""
    rng = np.random.default_rng(seed)
    affine = np.diag(list(spacing) + [1.0])
    g = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2.0
    dist = np.sqrt(sum(((g[i] - centre[i]) * spacing[i]) ** 2 for i in range(3)))
    fraction = np.clip(radius + 0.5 * min(spacing) - dist, 0.0, min(spacing)) / min(spacing) if lesion else 0 * dist
    fraction = ndimage.gaussian_filter(fraction, 0.6)
    noise = rng.normal(0.0, 1.0, shape)
    if noise_smooth:
        noise = ndimage.gaussian_filter(noise, noise_smooth)
    noise *= noise_sd / noise.std()
    healthy = level + noise
    image = healthy + contrast * fraction
    label = (fraction >= 0.5).astype(np.uint8)
    def case(img):
        return Case("c", np.stack([img, 0.5 * img + 10]).astype(np.float32), label.copy(), affine, [None, None], None)
    return case(image), case(healthy)


def _inpaint_op(component: np.ndarray) -> dict:
    """The operation that removes the lesion component `component` (a mask), with a 1 mm rim."""
    vox = np.argwhere(component)
    return {"op": "inpaint", "seed_voxel": vox[0].tolist(),
            "bbox": [[int(vox[:, i].min()), int(vox[:, i].max()) + 1] for i in range(3)],
            "rim_mm": 1.0, "texture_gain": 1.0, "texture_seed": 5}


def _residual_mad(image: np.ndarray, where: np.ndarray) -> float:
    r = (image - ndimage.uniform_filter(image, 3))[where]
    return float(np.median(np.abs(r - np.median(r))))


def test_edge_preserving_smoothing_keeps_a_lesion_edge_and_averages_noise():
    """The smoothing of a removal's fill difference: weights that sum to one, a step of many noise sd (a lesion's
    edge) left as it is, noise on either side averaged (what it takes off is what `remove_excess` puts back)."""
    shape = (12, 12, 12)
    idx = np.arange(int(np.prod(shape)))
    neighbours = written_neighbours(idx, shape)
    impulse = np.zeros(idx.size, np.float32)
    impulse[np.ravel_multi_index((6, 6, 6), shape)] = 1e-3  # far below the tolerance: plain binomial weights
    smoothed, _ = edge_preserving_smooth(impulse, neighbours, tolerance=1.0)
    assert np.isclose(smoothed.sum(), 1e-3, rtol=1e-4)
    rng = np.random.default_rng(0)
    step = np.where(np.indices(shape)[0].ravel() < 6, 0.0, 20.0).astype(np.float32)
    noisy = step + rng.normal(0, 1.0, idx.size).astype(np.float32)
    smoothed, lost = edge_preserving_smooth(noisy, neighbours, tolerance=1.0)
    x = np.indices(shape)[0].ravel()
    for layer in (5, 6):  # the edge stays where it is: no part of the step leaks across it
        assert abs(float((smoothed - step)[x == layer].mean())) < 0.5
    inner = (x > 1) & (x < 4)
    assert (smoothed - step)[inner].std() < 0.8 and 0.3 < lost[inner].mean() < 0.95


def test_inpaint_removes_the_partial_volume_rim_on_a_coarse_grid():
    """On a 1.2 mm grid a 1 mm rim adds no voxel: the refilled region still covers the lesion's partial-volume
    rim (at least one voxel all round, more where its intensity says so), so what is left of the lesion's
    excess over the healthy truth is small (the label-only fill left about a third)."""
    case, healthy = _blurred_ball_case((36, 36, 36), (1.2, 1.2, 1.2), noise_sd=2.0, seed=4)
    component = case.label == 1
    patch = inpaint_patch(case.channels, case.label, case.affine, _inpaint_op(component), (1,), 26)
    assert patch is not None and patch.info["hole_voxels"] > component.sum()
    channels = case.channels.copy()
    patch.apply(channels, case.label.copy())
    region = ndimage.binary_dilation(component, iterations=2)
    excess_before = (case.channels[0] - healthy.channels[0])[region].mean()
    excess_after = (channels[0] - healthy.channels[0])[region].mean()
    assert excess_after / excess_before < 0.1
    # the fill carries texture like the local noise (not flat, not noisier)
    hole = ndimage.binary_dilation(component)
    ratio = _residual_mad(channels[0], hole) / _residual_mad(healthy.channels[0], hole)
    assert 0.7 < ratio < 1.3


def test_host_level_is_the_main_tissue_not_the_median_of_two():
    """Around a lesion at a ventricle the known voxels belong to two tissues: the fill continues the one most of
    them belong to (the mode over both channels), not the median, a level between the two."""
    from lesionsynth.render.inpaint import host_level
    rng = np.random.default_rng(1)
    tissue = np.stack([100 + rng.normal(0, 2, 600), 50 + rng.normal(0, 2, 600)])
    other = np.stack([40 + rng.normal(0, 2, 400), 20 + rng.normal(0, 2, 400)])
    crop = np.concatenate([tissue, other], axis=1)[:, :, None, None].astype(np.float32)
    known = np.ones(crop.shape[1:], bool)
    level = host_level(crop, known, np.array([2.0, 2.0]))
    assert np.allclose(level, [100, 50], atol=0.5)
    assert abs(float(np.median(crop[0])) - 100) > 1.0  # the median is pulled towards the other tissue


def test_inpaint_next_to_a_dark_tissue_fills_with_the_lesion_s_own_tissue():
    """A lesion whose refilled rim touches a dark tissue (a ventricle on FLAIR) on one side: the healthy tissue
    under it is the surrounding tissue, and the fill must not average the dark one in (the plain fast-marching
    fill left the lesion's side towards it darker than the healthy truth by about half the lesion's contrast)."""
    from lesionsynth.render.inpaint import fast_marching_fill
    shape, spacing = (36, 36, 36), (1.0, 1.0, 1.0)
    case, healthy = _blurred_ball_case(shape, spacing, noise_sd=2.0, seed=7)
    dark = np.indices(shape)[0] > 17 + 6  # another tissue from 1 mm beyond the lesion's edge (centre 17.5, radius 5.5)
    for c in (case, healthy):
        c.channels[:, dark] -= np.array([60.0, 30.0], np.float32)[:, None]
    component = case.label == 1
    patch = inpaint_patch(case.channels, case.label, case.affine, _inpaint_op(component), (1,), 26)
    channels = case.channels.copy()
    patch.apply(channels, case.label.copy())
    excess = (case.channels[0] - healthy.channels[0])[component].mean()
    left = (channels[0] - healthy.channels[0])[component].mean()
    assert abs(left) / excess < 0.1
    assert (channels[0] - case.channels[0])[dark].std() < 1.0  # the other tissue keeps its values
    near = component & (np.indices(shape)[0] >= 21)  # the lesion's side towards the dark tissue
    assert abs((channels[0] - healthy.channels[0])[near].mean()) / excess < 0.1
    # the same hole filled without the host tissue's weighting is pulled towards the dark tissue
    hole = ndimage.binary_dilation(component, structure=np.ones((3, 3, 3)))
    plain, _ = fast_marching_fill(case.channels, hole, spacing)
    assert (plain[0] - healthy.channels[0])[near].mean() / excess < -0.1


def test_edge_tolerance_is_bounded_by_the_lesion_s_contrast_where_the_noise_estimate_is_wide():
    """The removal's smoothing keeps steps beyond one noise sd; where the local noise estimate also holds anatomy
    (a coarse grid: 10 against a 66 contrast), steps beyond a twentieth of the lesion's contrast are kept too,
    but the tolerance never falls below half a noise sd; without a contrast (or one within the noise), the noise
    alone sets it."""
    from lesionsynth.render.inpaint import edge_tolerance
    noise = np.array([10.0, 3.0, 2.0])
    assert np.allclose(edge_tolerance(noise), noise)
    assert np.allclose(edge_tolerance(noise, np.array([66.0, -80.0, np.nan])), [5.0, 3.0, 2.0])
    assert np.allclose(edge_tolerance(noise, np.array([130.0, 40.0, 1.5])), [6.5, 2.0, 2.0])
