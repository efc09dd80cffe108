"""What a strong critic looks for around pastes and removals: the destination's own noise around a pasted
lesion, and no lesion left behind by a removal on a grid coarser than the recipe's rim."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lesionsynth.bank import BankConfig, extract_lesions
from lesionsynth.io.dataset import Case
from lesionsynth.render.inpaint import inpaint_patch
from lesionsynth.render.paste import PasteSettings, paste_patch, smooth_change, smoothing_weights, written_neighbours


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


def _residual_mad(image: np.ndarray, where: np.ndarray) -> float:
    r = (image - ndimage.uniform_filter(image, 3))[where]
    return float(np.median(np.abs(r - np.median(r))))


def test_binomial_smoothing_weights_match_the_kernel():
    """The centre weight and energy `blend_lesion` accounts noise with are those of the smoothing it applies."""
    shape = (9, 9, 9)
    idx = np.arange(int(np.prod(shape)))
    neighbours = written_neighbours(idx, shape)
    impulse = np.zeros(idx.size, np.float32)
    middle = np.ravel_multi_index((4, 4, 4), shape)
    impulse[middle] = 1.0
    kernel = smooth_change(impulse, neighbours)
    centre, energy = smoothing_weights(neighbours)
    assert np.isclose(kernel[middle], centre[middle])
    assert np.isclose((kernel ** 2).sum(), energy[middle], rtol=1e-5)
    assert np.isclose(kernel.sum(), 1.0)


def _high_pass(image: np.ndarray) -> np.ndarray:
    return image - ndimage.gaussian_filter(image, 1.0)


def test_paste_keeps_the_destination_noise_around_the_lesion():
    """A lesion from a donor twice as noisy as the destination: in the voxel layer just outside its label (its
    partial-volume rim, where a strong critic saw pastes) the written high-pass is mostly the destination's own
    noise, near its level. Blending the donor's values in wrote the donor's noise there (correlation with the
    destination's 0.14, 2.2x its spread); further out (the feather) both keep the destination's."""
    donor, _ = _blurred_ball_case((40, 40, 40), (1.0, 1.0, 1.0), noise_sd=4.0, seed=0)
    lesion = extract_lesions(donor, BankConfig())[0]
    image, mask = lesion.pop("_image"), lesion.pop("_mask")
    _, target = _blurred_ball_case((48, 48, 48), (1.0, 1.0, 1.0), noise_sd=2.0, seed=1, lesion=False)
    op = {"op": "paste", "lesion_id": lesion["id"], "label_value": 1,
          "centre_mm": [23.5, 23.5, 23.5], "flip": [False] * 3, "rotation_deg": [0.0] * 3, "scale": 1.0,
          "elastic_mm": np.zeros((4, 4, 4, 3)).tolist(), "brightness": [1.0, 1.0], "noise_gain": 1.0,
          "noise_seed": 3}
    patch = paste_patch(target.channels, target.label, target.affine, image, mask, lesion, op, (1,),
                        lambda lab, start: np.ones(lab.shape, bool), PasteSettings((False, False)))
    channels, label = target.channels.copy(), target.label.copy()
    patch.apply(channels, label)
    dist = ndimage.distance_transform_edt(label == 0)
    for lo, hi, corr, spread in ((0.5, 1.01, 0.6, 1.35), (2.0, 3.01, 0.8, 1.25)):
        layer = (dist > lo) & (dist <= hi)  # one distance from the label: the lesion's edge is alike over it
        for c in range(2):
            written, own = _high_pass(channels[c])[layer], _high_pass(target.channels[c])[layer]
            assert np.corrcoef(written, own)[0, 1] > corr, (lo, c)
            assert written.std() / own.std() < spread, (lo, c)


def test_inpaint_removes_the_partial_volume_rim_on_a_coarse_grid():
    """On a 1.2 mm grid a 1 mm rim adds no voxel: the refilled region still covers the lesion's partial-volume
    rim (at least one voxel all round, more where its intensity says so), so what is left of the lesion's
    excess over the healthy truth is small (the label-only fill left about a third)."""
    case, healthy = _blurred_ball_case((36, 36, 36), (1.2, 1.2, 1.2), noise_sd=2.0, seed=4)
    component = case.label == 1
    vox = np.argwhere(component)
    op = {"op": "inpaint", "seed_voxel": vox[0].tolist(),
          "bbox": [[int(vox[:, i].min()), int(vox[:, i].max()) + 1] for i in range(3)],
          "rim_mm": 1.0, "texture_gain": 1.0, "texture_seed": 5}
    patch = inpaint_patch(case.channels, case.label, case.affine, op, (1,), 26)
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
