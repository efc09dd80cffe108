"""The torch backend reproduces the numpy/scipy resampling of a lesion and of a whole volume.

Tolerances (float32 on both sides; measured over 120 random pastes, 60 of them with the mask cut by the crop
border, torch 2.13 CPU, scipy 1.17):
- lesion channels: max |torch − numpy| ≤ CHANNEL_TOL × (channel max − min); measured ≤ 6.2e-6.
- soft mask (values in [0, 1]): max |torch − numpy| ≤ MASK_TOL; measured ≤ 1.3e-5, except at exact ties on a
  crop face (source coordinate within 1e-4 voxel of 0 or n-1), where scipy's mode="constant" jumps from the
  edge value to 0 and either side may win (1 voxel of 23.5 million in those 120 pastes); those are excluded.
- channels are zero outside the support (soft > 0 grown by support_mm) on both sides: same voxels (measured:
  identical in all 120 pastes apart from that one tie).
- the target box is identical (same host maths).
- full-volume warp: labels agree on ≥ 99.9 % of voxels (measured: all of 107,520 here; 4 of 8.7 million on
  197×233×189, at nearest-neighbour rounding ties), channels within CHANNEL_TOL × range (measured ≤ 8e-7).
Mistakes were injected to check that these tests catch them: grid axis order not reversed, elastic field
axes swapped or not reversed, align_corners=False, mask padded with "zeros" instead of the in-bounds test,
no in-bounds test, no support growth: each fails 5–18 tests (differences of order 0.1–1 × range).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")

from lesionsynth.errors import InputError  # noqa: E402
from lesionsynth.geometry import spacing_of  # noqa: E402
from lesionsynth.render import torch_backend as tb  # noqa: E402
from lesionsynth.render.paste import resample_lesion  # noqa: E402
from lesionsynth.render.transform import (  # noqa: E402
    elastic_field, elastic_weights, lesion_extent, rotation_matrix, source_coordinates, source_from_target)

CHANNEL_TOL = 1e-4
MASK_TOL = 1e-4
SPACINGS = [(0.5, 0.5, 1.1), (0.8, 0.8, 6.5), (1.0, 1.0, 1.0), (0.7, 0.7, 3.0)]
HAS_CUDA = torch.cuda.is_available()


def _affine(spacing, rng) -> np.ndarray:
    """Oblique affine: rotation up to ±25° per axis times the spacing, random origin."""
    a = np.eye(4)
    a[:3, :3] = rotation_matrix(rng.uniform(-25, 25, 3)) @ np.diag(spacing)
    a[:3, 3] = rng.uniform(-100, 100, 3)
    return a


def _crop(rng, spacing, edge_mask=False) -> tuple[np.ndarray, np.ndarray]:
    """A 20–40³ voxel (fewer along a thick-slice axis) two-channel crop with an irregular blob mask."""
    shape = tuple(int(n) if s < 3 else int(max(n // 3, 6)) for n, s in zip(rng.integers(20, 41, 3), spacing))
    g = np.indices(shape).astype(np.float64)
    centre = (np.array(shape) - 1) / 2
    radii = np.array(shape) * rng.uniform(0.2, 0.35, 3)
    d = sum(((g[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    mask = (d + 2 * ndimage.gaussian_filter(rng.normal(size=shape), 2) < 1).astype(np.float32)
    if edge_mask:  # lesion cut by the crop: exercises mode="constant" at the crop border
        mask[: shape[0] // 2] = 1.0
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    mr = 400 + 300 * (d < 1) + 500 * texture + 5 * g[0]            # MR-like, gradient along axis 0
    ct = -100 + 0.2 * g[2] ** 2 + 30 * rng.normal(size=shape)       # CT-like, curved along axis 2
    return np.stack([mr, ct]).astype(np.float32), mask


def _op(rng, tgt_affine, tgt_shape, elastic=True, inside=True) -> dict:
    frac = rng.uniform(0.0, 1.0, 3) if inside else np.array([3.0, 3.0, 3.0])
    centre = tgt_affine[:3, :3] @ (np.array(tgt_shape) * frac) + tgt_affine[:3, 3]
    control = np.clip(rng.normal(0.0, 1.5, (4, 4, 4, 3)), -3.0, 3.0) if elastic else np.zeros((0,))
    return {"centre_mm": centre.tolist(), "flip": [bool(v) for v in rng.random(3) < 0.5],
            "rotation_deg": rng.uniform(-45, 45, 3).tolist(), "scale": float(rng.uniform(0.5, 1.8)),
            "elastic_mm": control.tolist()}


def _problem(seed, edge_mask=False, elastic=True, inside=True):
    """Arguments of resample_lesion for one random but realistic paste.

    Odd seeds pass the mask's bounding box as `src_box`; seeds ≡ 2 (mod 3) have no channel support limit.
    """
    rng = np.random.default_rng(seed)
    src_spacing = SPACINGS[seed % len(SPACINGS)]
    tgt_spacing = SPACINGS[(seed // len(SPACINGS) + 1 + seed) % len(SPACINGS)]
    image, mask = _crop(rng, src_spacing, edge_mask)
    src_affine, tgt_affine = _affine(src_spacing, rng), _affine(tgt_spacing, rng)
    tgt_shape = tuple(int(round(n / s)) for n, s in zip((120.0, 130.0, 90.0), tgt_spacing))
    src_centre = src_affine[:3, :3] @ np.array(ndimage.center_of_mass(mask)) + src_affine[:3, 3]
    op = _op(rng, tgt_affine, tgt_shape, elastic, inside)
    nz = np.nonzero(mask)
    src_box = [[int(i.min()), int(i.max()) + 1] for i in nz] if seed % 2 else None
    support_mm = 0.0 if seed % 3 == 2 else 2.0  # 4 × the default feather
    return image, mask, src_affine, src_centre, tgt_affine, tgt_shape, op, src_box, support_mm


def _support(soft, tgt_affine, support_mm):
    """Where resample_lesion interpolates channels: soft > 0 grown by support_mm (zero elsewhere)."""
    reach = np.ceil(support_mm / spacing_of(tgt_affine)).astype(int)
    return ndimage.binary_dilation(soft > 0, structure=np.ones(tuple(2 * reach + 1), dtype=bool))


def _edge_ties(args, box, slack=1e-4) -> np.ndarray:
    """Voxels whose numpy source coordinate lies within `slack` voxel of a crop face (mask 0-or-edge ties)."""
    image, mask, src_affine, src_centre, tgt_affine, _, op = args[:7]
    m = source_from_target(src_affine, src_centre, tgt_affine, op["centre_mm"], op["flip"], op["rotation_deg"],
                           op["scale"])
    control = np.asarray(op["elastic_mm"], dtype=np.float32)
    src_box = args[7] if len(args) > 7 and args[7] is not None else mask.shape
    extent = lesion_extent(src_box, src_affine, src_centre, tgt_affine, op["centre_mm"], op["flip"],
                           op["rotation_deg"], op["scale"])
    field = elastic_field(control, elastic_weights(box, extent, control.shape[0])) if control.size else None
    coords = source_coordinates(box, m, field, tgt_affine)
    ties = np.zeros(coords.shape[1:], bool)
    for r, n in enumerate(mask.shape):
        ties |= (np.abs(coords[r]) < slack) | (np.abs(coords[r] - (n - 1)) < slack)
    return ties


def _assert_same(expected, got, args, ties=None):
    assert got is not None and expected is not None
    image, tgt_affine, support_mm = args[0], args[4], args[8]
    (box0, ch0, soft0), (box1, ch1, soft1) = expected, got
    assert box1 == box0
    assert ch1.dtype == np.float32 and soft1.dtype == np.float32
    assert ch1.shape == ch0.shape and soft1.shape == soft0.shape
    # channels are zero outside the support (soft > 0, grown by support_mm): the same voxels up to ties
    sup0, sup1 = _support(soft0, tgt_affine, support_mm), _support(soft1, tgt_affine, support_mm)
    assert ((sup0 != sup1) & (True if ties is None else ~ties)).sum() <= max(3, 1e-4 * sup0.size)
    assert not ch1[:, ~sup1].any()
    same = sup0 == sup1
    for c in range(image.shape[0]):
        span = float(image[c].max() - image[c].min())
        assert np.abs(ch1[c] - ch0[c])[same].max() <= CHANNEL_TOL * span, f"channel {c}"
    bad = np.abs(soft1 - soft0) > MASK_TOL
    if ties is not None:  # ties exactly on a crop face may go either way (scipy mode="constant" jumps there)
        bad &= ~ties
    assert not bad.any(), f"soft mask: max diff {np.abs(soft1 - soft0)[bad].max()} at {bad.sum()} voxels"
    assert soft0.max() > 0.5  # the lesion did land in the box (the comparison is not vacuous)


@pytest.mark.parametrize("seed", range(10))
def test_lesion_resampling_matches_numpy(seed):
    args = _problem(seed)
    _assert_same(resample_lesion(*args), tb.resample_lesion_torch(*args, device="cpu"), args)


@pytest.mark.parametrize("seed", [20, 21, 22])
def test_mask_cut_by_crop_border_is_zero_outside_like_scipy_constant(seed):
    args = _problem(seed, edge_mask=True)
    expected = resample_lesion(*args)
    _assert_same(expected, tb.resample_lesion_torch(*args, device="cpu"), args, _edge_ties(args, expected[0]))
    # the test really samples outside the crop where the mask is 1 at the edge (padding "zeros" would differ)
    assert (expected[2] == 0).any() and (expected[2] == 1).any()


@pytest.mark.parametrize("flip", [[False] * 3, [True, False, True]])
def test_axis_aligned_paste_with_integer_coordinates_keeps_the_whole_mask(flip):
    """Axis-aligned grids, no rotation, scale 1: every coordinate is an integer, crop faces included.

    Checked against plain indexing, not against numpy: scipy's mode="constant" is discontinuous exactly at
    the faces (numpy path: a coordinate of -1e-16 from float64 noise drops a face of a mask that touches
    the crop border) and every voxel is such a tie; the torch path keeps the whole mask.
    """
    image, mask = _problem(40, edge_mask=True)[:2]
    src_affine = np.diag([-0.8, 0.9, 3.0, 1.0])
    src_affine[:3, 3] = [40.0, -20.0, 7.0]
    src_centre = src_affine[:3, :3] @ np.round(ndimage.center_of_mass(mask)) + src_affine[:3, 3]  # on a voxel
    tgt_affine = src_affine.copy()
    tgt_affine[:3, 3] -= src_affine[:3, :3] @ np.array([17.0, 9.0, 5.0])  # target voxel v = source v - shift
    op = {"centre_mm": src_centre.tolist(), "flip": flip, "rotation_deg": [0.0, 0.0, 0.0], "scale": 1.0,
          "elastic_mm": np.zeros((4, 4, 4, 3)).tolist()}
    args = (image, mask, src_affine, src_centre, tgt_affine, (90, 80, 60), op, None, 0.0)
    expected, got = resample_lesion(*args), tb.resample_lesion_torch(*args, device="cpu")
    # the box follows the soft mask, so numpy's dropped face (see above) may make its box one voxel smaller
    assert all(g.start <= e.start and e.stop <= g.stop for g, e in zip(got[0], expected[0]))
    assert abs(float(got[2].sum()) - float(mask.sum())) < 1e-2
    # ground truth by plain indexing: the source voxel of every target voxel is an integer
    m = source_from_target(src_affine, src_centre, tgt_affine, src_centre, flip, [0.0] * 3, 1.0)
    idx = np.rint(source_coordinates(got[0], m)).astype(int)
    inside = np.all([(i >= 0) & (i < n) for i, n in zip(idx, mask.shape)], axis=0)
    src = tuple(i[inside] for i in idx)
    np.testing.assert_allclose(got[2][inside], mask[src], atol=1e-5)
    assert not got[2][~inside].any()
    lesion = mask[src] > 0  # support_mm = 0: channels only where the soft mask is > 0
    np.testing.assert_allclose(got[1][:, inside][:, lesion], image[(slice(None),) + src][:, lesion], rtol=1e-5,
                               atol=1e-3)


def test_prepared_mask_voxels_give_the_same_resampling():
    """The worker's cached mask voxels (int32, searched in the mask's box) stand in for a fresh search."""
    from lesionsynth.render.paste import PreparedMask

    args = _problem(3)
    plain = tb.resample_lesion_torch(*args, device="cpu")
    cached = tb.resample_lesion_torch(*args, device="cpu", prepared=PreparedMask(args[1], args[7]))
    assert plain[0] == cached[0]
    np.testing.assert_array_equal(plain[1], cached[1])
    np.testing.assert_array_equal(plain[2], cached[2])


def test_without_elastic_field_matches_numpy():
    args = _problem(30, elastic=False)
    _assert_same(resample_lesion(*args), tb.resample_lesion_torch(*args, device="cpu"), args)


def test_lesion_outside_target_gives_none():
    args = _problem(31, inside=False)
    assert resample_lesion(*args) is None
    assert tb.resample_lesion_torch(*args, device="cpu") is None


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("seed", range(4))
def test_lesion_resampling_on_cuda_matches_numpy(seed):
    args = _problem(seed, edge_mask=seed == 3)
    _assert_same(resample_lesion(*args), tb.resample_lesion_torch(*args, device="cuda"), args)


@pytest.mark.parametrize("shape, reach", [((12, 9, 7), (2, 0, 3)), ((4, 6, 3), (5, 1, 5)), ((8, 8, 8), (0, 0, 0))])
def test_support_is_a_box_dilation_of_soft_above_zero(shape, reach):
    soft = np.random.default_rng(3).random(shape).astype(np.float32)
    soft[soft < 0.93] = 0.0
    got = tb._support(torch.from_numpy(soft), reach).numpy()
    structure = np.ones(tuple(2 * r + 1 for r in reach), dtype=bool)
    assert (got == ndimage.binary_dilation(soft > 0, structure=structure)).all()


def _volume(seed=1, shape=(56, 64, 30)):
    rng = np.random.default_rng(seed)
    g = np.indices(shape).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix([10, -5, 20]) @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-50.0, 20.0, 10.0]
    channels = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 3) * 100 + g[0],
                         0.1 * g[1] * g[2]]).astype(np.float32)
    label = ((ndimage.gaussian_filter(rng.normal(size=shape), 4) > 0.02).astype(np.uint8)
             + (ndimage.gaussian_filter(rng.normal(size=shape), 3) > 0.05)).astype(np.uint8)
    control = np.clip(rng.normal(0.0, 1.5, (4, 4, 4, 3)), -3.0, 3.0)
    return channels, label, affine, control


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_volume_warp_torch_matches_numpy(device):
    channels, label, affine, control = _volume()
    ch0, lab0 = tb.warp_volume_numpy(channels, label, affine, control, [15, -20, 8], 1.1)
    ch1, lab1 = tb.warp_volume_torch(channels, label, affine, control, [15, -20, 8], 1.1, device=device)
    assert lab1.dtype == label.dtype and lab1.shape == label.shape and ch1.dtype == np.float32
    assert (lab0 == lab1).mean() >= 0.999
    assert len(np.unique(lab0)) == 3 and (lab0 != label).mean() > 0.05  # a real, non-trivial warp
    for c in range(channels.shape[0]):
        assert np.abs(ch1[c] - ch0[c]).max() <= CHANNEL_TOL * float(np.ptp(channels[c]))


def test_identity_volume_warp_is_identity():
    channels, label, affine, _ = _volume(shape=(20, 24, 12))
    ch, lab = tb.warp_volume_torch(channels, label, affine, np.zeros((0,)), [0, 0, 0], 1.0, device="cpu")
    assert (lab == label).all()
    np.testing.assert_allclose(ch, channels, atol=1e-3)


def test_auto_without_gpu_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tb.resolve_device("auto") == "cpu"
    assert tb.resolve_device("cpu") == "cpu"


def test_cuda_without_gpu_is_an_input_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="--device cuda"):
        tb.resolve_device("cuda")


def test_cuda_without_torch_is_an_input_error(monkeypatch):
    monkeypatch.setattr(tb, "torch_available", lambda: False)
    with pytest.raises(InputError, match=r"pip install 'lesionsynth\[cuda\]'"):
        tb.resolve_device("cuda")
    assert tb.resolve_device("auto") == "cpu"


def test_unknown_device_is_an_input_error():
    with pytest.raises(InputError):
        tb.resolve_device("tpu")


def test_module_imports_and_resolves_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from lesionsynth.render import torch_backend as tb\n"
            "assert not tb.torch_available() and tb.resolve_device('auto') == 'cpu'\n"
            "try:\n    tb.resolve_device('cuda')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("InputError --device cuda: torch is not installed")


def _paste_case(spacing, seed, lesion=True):
    """A two-channel MR-like case (tissue 100, lesion 170 and 0.5x + 10, noise sd 2) with one lesion."""
    from lesionsynth.io.dataset import Case

    rng = np.random.default_rng(seed)
    shape = tuple(int(round(n / s)) for n, s in zip((48.0, 48.0, 40.0), spacing))
    affine = np.diag(list(spacing) + [1.0])
    g = np.indices(shape).astype(float)
    dist = np.sqrt(sum(((g[i] - (n - 1) / 2) * s) ** 2 for i, (n, s) in enumerate(zip(shape, spacing))))
    inside = (dist < 6.0) & lesion
    image = np.where(inside, 170.0, 100.0) + rng.normal(0, 2.0, shape)
    return Case("c", np.stack([image, 0.5 * image + 10]).astype(np.float32), inside.astype(np.uint8), affine,
                [None, None], None)


@pytest.mark.parametrize("seed", range(4))
def test_paste_on_the_torch_resampler_matches_the_numpy_one(seed):
    """paste_patch gives the same patch whichever resampler `render.backend.lesion_resampler` picks (the torch
    twin run on CPU torch here): the same label, blended channels within the channel tolerance."""
    from lesionsynth.bank import BankConfig, extract_lesions
    from lesionsynth.render.backend import lesion_resampler
    from lesionsynth.render.paste import PasteSettings, paste_patch, resample_on_cpu

    rng = np.random.default_rng(seed)
    donor = _paste_case(SPACINGS[seed % 3], seed)
    target = _paste_case((1.0, 1.0, 1.0) if seed % 2 else (0.9, 0.9, 2.5), seed + 10, lesion=False)
    lesion = extract_lesions(donor, BankConfig())[0]
    image, mask = lesion.pop("_image"), lesion.pop("_mask")
    centre = target.affine[:3, :3] @ ((np.array(target.label.shape) - 1) / 2) + target.affine[:3, 3]
    op = {"op": "paste", "lesion_id": lesion["id"], "label_value": 1, "centre_mm": centre.tolist(),
          "flip": [False, bool(seed % 2), False], "rotation_deg": rng.uniform(-30, 30, 3).tolist(),
          "scale": float(rng.uniform(0.8, 1.2)), "elastic_mm": np.clip(rng.normal(0, 1, (4, 4, 4, 3)), -2, 2).tolist(),
          "brightness": [1.1, 0.9], "noise_gain": 1.0, "noise_seed": 7}
    assert lesion_resampler("cpu") is resample_on_cpu
    patches = []
    for resample in (lesion_resampler("cpu"), lesion_resampler("cpu", torch_on_cpu=True)):
        patch = paste_patch(target.channels, target.label, target.affine, image, mask, lesion, op, (1,),
                            lambda crop, start: np.ones(crop.shape, bool), PasteSettings((False, False)),
                            resample=resample)
        channels = target.channels.copy()
        label = target.label.copy()
        patch.apply(channels, label)
        patches.append((patch.box, label, channels))
    (box0, label0, ch0), (box1, label1, ch1) = patches
    assert box0 == box1
    assert label0.sum() > 100 and (label0 != label1).sum() <= max(2, 0.01 * label0.sum())
    assert np.abs(ch1 - ch0).max() <= 1e-3 * 170
