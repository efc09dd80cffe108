"""Paste and inpaint on small arrays: geometry, labels, intensity behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lesionsynth.bank import BankConfig, extract_lesions
from lesionsynth.geometry import apply_affine
from lesionsynth.io.dataset import Case
from lesionsynth.render.inpaint import inpaint_patch
from lesionsynth.render.paste import PasteSettings, paste_patch, resample_lesion
from lesionsynth.render.transform import elastic_field, elastic_weights, rotation_matrix


def _case(shape=(40, 40, 30), spacing=(1.0, 1.0, 2.0), seed=0, lesion_centre=(20, 20, 15), radius=5.0,
          lesion_value=160.0, body_value=100.0, organ=False):
    rng = np.random.default_rng(seed)
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = [5.0, -7.0, 3.0]
    g = np.indices(shape).astype(float)
    dist = np.sqrt(sum(((g[i] - lesion_centre[i]) * spacing[i]) ** 2 for i in range(3)))
    label = np.zeros(shape, np.uint8)
    if organ:
        label[:] = 1
    label[dist < radius] = 2 if organ else 1
    image = np.where(dist < radius, lesion_value, body_value) + rng.normal(0, 2.0, shape)
    channels = np.stack([image, 0.5 * image + 10]).astype(np.float32)
    return Case("c", channels, label, affine, [None, None], None)


def _identity_op(lesion, **kw):
    op = {"op": "paste", "lesion_id": lesion["id"], "label_value": lesion["label_value"],
          "centre_mm": lesion["centroid_mm"], "flip": [False] * 3, "rotation_deg": [0.0] * 3, "scale": 1.0,
          "elastic_mm": np.zeros((4, 4, 4, 3)).tolist(), "brightness": [1.0, 1.0], "noise_gain": 0.0,
          "noise_seed": 1}
    op.update(kw)
    return op


def _all_region(label_crop, start):
    return np.ones(label_crop.shape, bool)


def test_identity_paste_reproduces_the_lesion():
    case = _case()
    lesion = extract_lesions(case, BankConfig())[0]
    image, mask = lesion.pop("_image"), lesion.pop("_mask")
    target = _case(seed=1, radius=0.1)  # same grid, no lesion
    patch = paste_patch(target.channels, target.label, target.affine, image, mask, lesion, _identity_op(lesion),
                        (1,), _all_region, PasteSettings((False, False)))
    new_label = target.label.copy()
    new_label[patch.box] = patch.label
    assert (new_label == case.label).all()
    inside = case.label == 1
    new = target.channels.copy()
    patch.apply(new, target.label.copy())
    # lesion intensity rescaled to the destination tissue (which matches the source): ~160 inside
    assert abs(np.median(new[0][inside]) - 160) < 6
    assert abs(np.median(new[1][inside]) - 90) < 4


def test_first_ring_keeps_a_share_of_the_donors_partial_volume_detail(monkeypatch):
    """Around the body a paste writes the fitted (smooth) tail, and on the first voxel ring also
    FIRST_RING_DONOR_SHARE of the donor's own detail beyond it: a voxel pattern in the donor's ring comes
    through at that share, and nothing changes off the ring."""
    from lesionsynth.render import paste as paste_module

    case = _case()
    inside = case.label == 1
    ring = ndimage.binary_dilation(inside, np.ones((3, 3, 3), bool)) & ~inside
    pattern = np.where((np.indices(case.label.shape).sum(axis=0) % 2 == 0) & ring, 12.0, 0.0)
    case.channels[0] += pattern.astype(np.float32)
    lesion = extract_lesions(case, BankConfig())[0]
    image, mask = lesion.pop("_image"), lesion.pop("_mask")
    target = _case(seed=1, radius=0.1)
    written = {}
    for share in (0.0, paste_module.FIRST_RING_DONOR_SHARE):
        monkeypatch.setattr(paste_module, "FIRST_RING_DONOR_SHARE", share)
        patch = paste_patch(target.channels, target.label, target.affine, image, mask, lesion,
                            _identity_op(lesion), (1,), _all_region, PasteSettings((False, False)))
        new = target.channels.copy()
        patch.apply(new, target.label.copy())
        written[share] = new[0]
    share = paste_module.FIRST_RING_DONOR_SHARE
    assert share > 0
    gain = written[share] - written[0.0]
    assert np.abs(gain[~ring]).max() < 1e-3
    slope = np.polyfit(pattern[ring], gain[ring], 1)[0]
    assert 0.5 * share < slope < 1.2 * share and np.corrcoef(pattern[ring], gain[ring])[0, 1] > 0.8


def _periventricular_case(seed, csf=True, shape=(40, 40, 40)):
    """FLAIR-like and T1-like channels: white matter 100/100, a ball lesion 160/60 of radius 6 whose face at
    x = 25 touches CSF (40/30) from x = 26 on and is half lesion, half CSF (100/45: grey on FLAIR, dark on
    T1), labelled lesion like the rest."""
    rng = np.random.default_rng(seed)
    g = np.indices(shape).astype(float)
    lesion = np.sqrt(sum((g[i] - 20) ** 2 for i in range(3))) < 6
    flair, t1 = np.full(shape, 100.0), np.full(shape, 100.0)
    flair[lesion], t1[lesion] = 160.0, 60.0
    face = lesion & (g[0] == 25)
    if csf:
        slab = (g[0] >= 26) & ~lesion
        flair[slab], t1[slab] = 40.0, 30.0
        flair[face], t1[face] = 100.0, 45.0
        lesion &= g[0] <= 25
    channels = np.stack([flair, t1]) + rng.normal(0, 2.0, (2,) + shape)
    return Case("c", channels.astype(np.float32), lesion.astype(np.uint8), np.eye(4), [None, None], None), face


@pytest.mark.parametrize("csf", [True, False])
def test_paste_leaves_out_the_donors_partial_volume_with_another_tissue(csf):
    """A periventricular donor's face of lesion and CSF mixed (grey on FLAIR, dark on T1) is left out of the
    body and label of its paste into plain white matter; a donor without it keeps its whole label."""
    donor, face = _periventricular_case(0, csf)
    lesion = extract_lesions(donor, BankConfig())[0]
    image, mask = lesion.pop("_image"), lesion.pop("_mask")
    target, _ = _periventricular_case(1, csf=False)
    target.label[:] = 0
    target.channels[0][:] = 100.0 + np.random.default_rng(2).normal(0, 2.0, target.label.shape)
    target.channels[1][:] = 100.0 + np.random.default_rng(3).normal(0, 2.0, target.label.shape)
    patch = paste_patch(target.channels, target.label, target.affine, image, mask, lesion, _identity_op(lesion),
                        (1,), _all_region, PasteSettings((False, False)))
    label = np.zeros_like(target.label)
    label[patch.box] = patch.label
    rest = (donor.label == 1) & ~face
    assert (label[rest] == 1).mean() > 0.97
    if csf:
        assert (label[face] == 1).mean() < 0.2
        new = target.channels.copy()
        patch.apply(new, label.copy())
        assert np.percentile(new[0][label == 1], 2) > 130  # no grey notch inside the label
    else:
        assert (label[face] == 1).mean() > 0.97


def test_paste_moves_scales_and_flips_in_world_space():
    case = _case(spacing=(0.8, 0.8, 2.5))
    lesion = extract_lesions(case, BankConfig())[0]
    image, mask = lesion.pop("_image"), lesion.pop("_mask")
    target = _case(shape=(60, 50, 40), spacing=(1.0, 1.0, 1.0), seed=2, radius=0.1)
    centre = apply_affine(target.affine, [30, 25, 20])
    op = _identity_op(lesion, centre_mm=centre.tolist(), scale=1.5, flip=[True, False, True],
                      rotation_deg=[10.0, 20.0, 30.0])
    patch = paste_patch(target.channels, target.label, target.affine, image, mask, lesion, op, (1,), _all_region,
                        PasteSettings((False, False)))
    label = target.label.copy()
    patch.apply(target.channels.copy(), label)
    pasted = label == 1
    com = apply_affine(target.affine, np.argwhere(pasted).mean(axis=0))
    assert np.linalg.norm(com - centre) < 1.0
    expected = lesion["volume_mm3"] * 1.5 ** 3
    assert abs(pasted.sum() * 1.0 - expected) / expected < 0.2


def test_paste_keeps_everything_outside_its_box():
    case = _case()
    lesion = extract_lesions(case, BankConfig())[0]
    image, mask = lesion.pop("_image"), lesion.pop("_mask")
    target = _case(seed=3, radius=0.1)
    op = _identity_op(lesion, noise_gain=0.5, brightness=[1.1, 0.9],
                      elastic_mm=np.random.default_rng(0).normal(0, 1, (4, 4, 4, 3)).tolist())
    patch = paste_patch(target.channels, target.label, target.affine, image, mask, lesion, op, (1,), _all_region,
                        PasteSettings((False, False)))
    channels, label = target.channels.copy(), target.label.copy()
    patch.apply(channels, label)
    outside = np.ones(label.shape, bool)
    outside[patch.box] = False
    assert (channels[:, outside] == target.channels[:, outside]).all()
    assert (label[outside] == 0).all()
    core = label == 1
    for c in range(2):  # every channel changes where the lesion was added
        assert np.abs(channels[c][core] - target.channels[c][core]).mean() > 10


def test_paste_blends_in_place_alike_in_any_channel_layout():
    """The blend writes into the case's channels: C-, Fortran- and odd-strided channel arrays get the same
    values, and a paste's patch cannot be applied twice (its blend reads the channels it changes)."""
    case = _case()
    lesion = extract_lesions(case, BankConfig())[0]
    image, mask = lesion.pop("_image"), lesion.pop("_mask")
    target = _case(seed=3, radius=0.1)
    op = _identity_op(lesion, noise_gain=0.5, brightness=[1.1, 0.9])
    results = []
    for layout in ("C", "F", "strided"):
        if layout == "strided":  # every other voxel of a larger array: neither C nor Fortran contiguous
            big = np.zeros((2,) + tuple(2 * n for n in target.channels.shape[1:]), dtype=np.float32)
            channels = big[:, ::2, ::2, ::2]
            channels[...] = target.channels
        else:
            channels = np.array(target.channels, order=layout)
        patch = paste_patch(channels, target.label, target.affine, image, mask, lesion, op, (1,), _all_region,
                            PasteSettings((False, False)))
        label = target.label.copy()
        patch.apply(channels, label)
        results.append(np.array(channels))
        with pytest.raises(RuntimeError, match="only once"):
            patch.apply(channels, label)
    assert (results[0] != target.channels).any()
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_ct_paste_keeps_hounsfield_units():
    case = _case(lesion_value=40.0, body_value=-800.0)  # a nodule in lung
    lesion = extract_lesions(case, BankConfig())[0]
    image, mask = lesion.pop("_image"), lesion.pop("_mask")
    target = _case(seed=4, radius=0.1, body_value=30.0)  # soft tissue target
    patch = paste_patch(target.channels, target.label, target.affine, image, mask, lesion, _identity_op(lesion),
                        (1,), _all_region, PasteSettings((True, True)))
    channels = target.channels.copy()
    patch.apply(channels, target.label.copy())
    inside = case.label == 1
    core = ndimage.binary_erosion(inside, iterations=2)
    assert abs(np.median(channels[0][core]) - 40.0) < 5  # HU kept, not rescaled to the 30 HU target


def _inpainted(case, component: np.ndarray, lesion_labels) -> tuple[np.ndarray, np.ndarray]:
    """(channels, label) of copies of the case after inpainting the lesion component `component` (a mask)."""
    vox = np.argwhere(component)
    op = {"op": "inpaint", "seed_voxel": vox[0].tolist(),
          "bbox": [[int(vox[:, i].min()), int(vox[:, i].max()) + 1] for i in range(3)],
          "rim_mm": 1.0, "texture_gain": 1.0, "texture_seed": 5}
    patch = inpaint_patch(case.channels, case.label, case.affine, op, lesion_labels, 26)
    channels, label = case.channels.copy(), case.label.copy()
    patch.apply(channels, label)
    return channels, label


def test_inpaint_removes_component_and_takes_surrounding_label():
    case = _case(organ=True)
    channels, label = _inpainted(case, case.label == 2, (2,))
    assert not (label == 2).any()
    assert (label[case.label == 2] == 1).all()  # removed voxels take the organ label, not 0
    hole = case.label == 2
    assert abs(np.median(channels[0][hole]) - 100) < 3  # filled with surrounding tissue
    assert 0.5 < channels[0][hole].std() / 2.0 < 2.0  # with texture like the local noise


def test_inpaint_takes_the_nearest_of_several_labels_around():
    case = _case(organ=True)
    case.label[:20][case.label[:20] == 1] = 0  # the lesion straddles the organ's edge: organ one side, 0 the other
    _, label = _inpainted(case, case.label == 2, (2,))
    lesion = case.label == 2
    nearest = ndimage.distance_transform_edt(lesion, sampling=(1.0, 1.0, 2.0), return_distances=False,
                                             return_indices=True)
    np.testing.assert_array_equal(label[lesion], case.label[tuple(nearest)][lesion])
    assert set(np.unique(label[lesion])) == {0, 1}


def test_inpaint_only_touches_its_component():
    case = _case()
    g = np.indices(case.label.shape)
    second = (g[0] - 8) ** 2 + (g[1] - 8) ** 2 + (g[2] - 8) ** 2 < 9
    case.label[second] = 1
    _, label = _inpainted(case, (case.label == 1) & ~second, (1,))
    assert (label[second] == 1).all()
    assert (label[~second] == 0).all()


def test_inpaint_rejects_seed_off_lesion():
    case = _case()
    op = {"op": "inpaint", "seed_voxel": [0, 0, 0], "bbox": [[0, 5], [0, 5], [0, 5]], "rim_mm": 1.0,
          "texture_gain": 1.0, "texture_seed": 1}
    with pytest.raises(ValueError):
        inpaint_patch(case.channels, case.label, case.affine, op, (1,), 26)


def test_rotation_matrix_is_orthonormal():
    r = rotation_matrix([30, -50, 170])
    assert np.allclose(r @ r.T, np.eye(3))
    assert np.isclose(np.linalg.det(r), 1.0)


def test_elastic_field_interpolates_control_points():
    control = np.random.default_rng(0).normal(size=(4, 4, 4, 3))
    box = tuple(slice(0, 4) for _ in range(3))
    extent = (np.zeros(3), np.full(3, 3.0))
    field = elastic_field(control, elastic_weights(box, extent, 4))
    assert np.allclose(field, np.moveaxis(control, -1, 0), atol=1e-5)
    big_box = (slice(0, 31), slice(0, 17), slice(0, 9))
    big = elastic_field(control, elastic_weights(big_box, (np.zeros(3), np.array([30.0, 16.0, 8.0])), 4))
    assert big.shape == (3, 31, 17, 9)
    assert np.abs(np.diff(big, axis=1)).max() < np.abs(control).max()  # smooth between control points


def test_elastic_field_ignores_padding_and_clipping():
    """The field follows the lesion extent: a bigger or clipped box gives the same values where they overlap."""
    control = np.random.default_rng(1).normal(size=(4, 4, 4, 3))
    extent = (np.array([10.0, 12.0, 5.0]), np.array([30.0, 25.0, 15.0]))
    small_box = (slice(8, 33), slice(10, 28), slice(3, 18))
    big_box = (slice(0, 45), slice(2, 40), slice(0, 30))
    small = elastic_field(control, elastic_weights(small_box, extent, 4))
    big = elastic_field(control, elastic_weights(big_box, extent, 4))
    assert np.allclose(small, big[:, 8:33, 8:26, 3:18], atol=1e-5)


def test_paste_leaves_no_detached_specks():
    """A lesion with a thin neck to a small satellite: shrinking it must not leave the satellite as a
    detached 1-3 voxel fragment (the neck falls below soft 0.5 first)."""
    from lesionsynth.geometry import structure_for

    case = _case(radius=5.0, spacing=(1.0, 1.0, 1.0))
    g = np.indices(case.label.shape)
    case.label[(g[0] >= 20) & (g[0] <= 29) & (g[1] == 20) & (g[2] == 15)] = 1   # one-voxel neck
    case.label[(np.abs(g[0] - 30) <= 1) & (np.abs(g[1] - 20) <= 1) & (np.abs(g[2] - 15) <= 1)] = 1  # satellite
    lesion = extract_lesions(case, BankConfig())[0]
    image, mask = lesion.pop("_image"), lesion.pop("_mask")
    found_fragment_without_fix = False
    for scale in (0.7, 0.8, 0.9):
        target = _case(seed=1, radius=0.1, spacing=(1.0, 1.0, 1.0))
        op = _identity_op(lesion, scale=scale, rotation_deg=[20.0, 30.0, 45.0])
        patch = paste_patch(target.channels, target.label, target.affine, image, mask, lesion, op, (1,),
                            _all_region, PasteSettings((False, False)))
        _, n = ndimage.label(patch.label == 1, structure=structure_for(26))
        assert n == 1
        soft = resample_lesion(image, mask, np.asarray(lesion["affine"]), lesion["centroid_mm"], target.affine,
                               target.label.shape, op)[2]
        found_fragment_without_fix |= ndimage.label(soft >= 0.5, structure=structure_for(26))[1] > 1
    assert found_fragment_without_fix  # the situation really arises without keep_main_body


def _dense_soft(image, mask, src_affine, src_centre, tgt_affine, tgt_shape, op, src_box):
    """Reference: the soft mask computed on every voxel of the paste's (loose) box."""
    from lesionsynth.render.transform import paste_geometry, source_coordinates

    geo = paste_geometry(mask.shape, src_box, src_affine, src_centre, tgt_affine, tgt_shape, op, 2.0)
    field = elastic_field(geo.control, elastic_weights(geo.box, geo.extent, geo.control.shape[0]))
    coords = source_coordinates(geo.box, geo.src_from_tgt, field, tgt_affine)
    soft = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, mode="constant", cval=0.0,
                                   prefilter=False)
    full = np.zeros(tgt_shape, dtype=np.float32)
    full[geo.box] = soft
    return full


def _brick_problem(seed):
    rng = np.random.default_rng(seed)
    shape = (30, 26, 22)
    g = np.indices(shape).astype(float)
    mask = (((g[0] - 15) / 9) ** 2 + ((g[1] - 13) / 6) ** 2 + ((g[2] - 11) / 4) ** 2 < 1).astype(np.uint8)
    mask[15, 13:24, 11] = 1  # a thin spur
    image = rng.normal(100.0, 10.0, (2,) + shape).astype(np.float32)
    src_affine = np.diag([0.9, 1.1, 1.3, 1.0])
    src_affine[:3, :3] = rotation_matrix([10.0, -20.0, 5.0]) @ src_affine[:3, :3]
    tgt_affine = np.diag([1.0, 0.8, 1.2, 1.0])
    src_centre = apply_affine(src_affine, np.array([15.0, 13.0, 11.0]))
    tgt_shape = (70, 80, 60)
    op = {"centre_mm": apply_affine(tgt_affine, np.array([35.0, 40.0, 30.0])).tolist(),
          "flip": [bool(v) for v in rng.random(3) < 0.5], "rotation_deg": rng.uniform(-45, 45, 3).tolist(),
          "scale": float(rng.uniform(0.6, 1.7)),
          "elastic_mm": np.clip(rng.normal(0.0, 1.5, (4, 4, 4, 3)), -3.0, 3.0).tolist()}
    return image, mask, src_affine, src_centre, tgt_affine, tgt_shape, op, None, 2.0


@pytest.mark.parametrize("seed", range(6))
def test_brick_resampling_finds_every_soft_voxel(seed, monkeypatch):
    """The soft mask computed on reachable bricks equals the one computed on every voxel of the box, and
    so does the fallback taken when the landing estimate is off (forced here by shifting it)."""
    import lesionsynth.render.paste as paste

    args = _brick_problem(seed)
    dense = _dense_soft(*args[:8])
    box, channels, soft = resample_lesion(*args)
    got = np.zeros_like(dense)
    got[box] = soft
    assert np.count_nonzero(dense) > 100
    # float32 coordinates: values agree to ~1e-6; no voxel of the lesion is missed
    np.testing.assert_allclose(got, dense, atol=1e-5)
    assert not ((dense > 1e-4) & (got == 0)).any()
    real = paste.landing_points
    monkeypatch.setattr(paste, "landing_points", lambda *a: (real(*a)[0] + 6.0, real(*a)[1]))
    box2, channels2, soft2 = resample_lesion(*args)
    assert box2 == box
    np.testing.assert_array_equal(soft2, soft)
    np.testing.assert_array_equal(channels2, channels)


def _voxel_by_voxel(bricks, geo, mapper, prepared):
    from lesionsynth.render.paste import BRICK, brick_voxels

    voxels = brick_voxels(np.argwhere(bricks) * BRICK + [s.start for s in geo.box], geo)
    values = ndimage.map_coordinates(prepared.mask.astype(np.float64), mapper(voxels), order=1, mode="constant",
                                     cval=0.0, prefilter=False).astype(np.float32)
    return {tuple(v): x for v, x in zip(voxels[values > 0], values[values > 0])}


def _classified_bricks_problem(seed):
    from lesionsynth.render.paste import BRICK, PreparedMask
    from lesionsynth.render.transform import PointMapper, paste_geometry

    image, mask, src_affine, src_centre, tgt_affine, tgt_shape, op, box, support = _brick_problem(seed)
    if seed % 2:  # strong elastic fields as well as the usual ones
        op["elastic_mm"] = (np.asarray(op["elastic_mm"]) * 2.5).tolist()
    prepared = PreparedMask(mask, box)
    geo = paste_geometry(mask.shape, box, src_affine, src_centre, tgt_affine, tgt_shape, op, support,
                         prepared.points)
    mapper = PointMapper(geo, tgt_affine)
    bricks = np.ones(tuple(-(-n // BRICK) for n in geo.shape), dtype=bool)  # every brick of the box
    return bricks, geo, mapper, prepared


@pytest.mark.parametrize("seed", range(8))
def test_classified_bricks_give_the_voxel_by_voxel_values(seed):
    """Bricks classed as all-clear or all-set from one mapped point give exactly what mapping and sampling
    each of their voxels gives (same voxels, same float32 values) on every brick of the paste's box."""
    from lesionsynth.render.paste import soft_on_bricks

    bricks, geo, mapper, prepared = _classified_bricks_problem(seed)
    voxels, values = soft_on_bricks(bricks, geo, mapper, prepared)
    got = {tuple(v): x for v, x in zip(voxels, values)}
    assert len(got) == len(voxels)
    assert got == _voxel_by_voxel(bricks, geo, mapper, prepared)
    assert sum(x == 1.0 for x in got.values()) > 50  # some bricks were classed all-set


def test_brick_classes_need_their_spread(monkeypatch):
    """Without the spread of a brick's voxels around its reference point the classes are wrong somewhere:
    the test above can fail."""
    import lesionsynth.render.paste as paste

    monkeypatch.setattr(paste, "brick_spread", lambda mapper: np.zeros(3))
    wrong = 0
    for seed in range(8):
        bricks, geo, mapper, prepared = _classified_bricks_problem(seed)
        voxels, values = paste.soft_on_bricks(bricks, geo, mapper, prepared)
        wrong += {tuple(v): x for v, x in zip(voxels, values)} != _voxel_by_voxel(bricks, geo, mapper, prepared)
    assert wrong >= 4


def test_count_in_boxes_counts_mask_voxels():
    from lesionsynth.render.paste import PreparedMask

    rng = np.random.default_rng(3)
    mask = np.zeros((20, 18, 16), np.uint8)
    mask[4:15, 3:12, 5:14] = rng.random((11, 9, 9)) < 0.6
    prepared = PreparedMask(mask, [[4, 15], [3, 12], [5, 14]])
    lo = rng.integers(-4, 22, size=(3, 300))
    hi = lo + rng.integers(-1, 12, size=(3, 300))
    want = [int(mask[tuple(slice(max(a, 0), max(b + 1, 0)) for a, b in zip(lo[:, i], hi[:, i]))].sum())
            if (hi[:, i] >= lo[:, i]).all() else 0 for i in range(300)]
    assert prepared.count_in_boxes(lo, hi).tolist() == want


def test_landing_estimate_rarely_gives_up_an_acceptable_paste():
    """The early region test sees where the mask's voxels are estimated to land. On random pastes of a small
    lesion with a thin spur (the hardest case: many edge voxels), with a half-space region holding 88-100 %
    of the final core (soft >= 0.5), i.e. pastes a 0.9 limit accepts or nearly so, the estimated share is
    within 8 % of the core's, and a 0.9 limit less the slack lets through at least 99 % of the pastes
    whose core share is 0.9 or more (100 % with the slack of 0.03; 95 % without any)."""
    from lesionsynth.render import EARLY_REGION_SLACK
    from lesionsynth.render.paste import PreparedMask, estimated_landing, resample_mask

    accepted = passed = 0
    for seed in range(30):
        image, mask, src_affine, src_centre, tgt_affine, tgt_shape, op, box, support = _brick_problem(seed)
        landing = estimated_landing(PreparedMask(mask, box), src_affine, src_centre, tgt_affine, tgt_shape, op,
                                    support)
        box_t, soft, _ = resample_mask(mask, src_affine, src_centre, tgt_affine, tgt_shape, op, box, support)
        core = np.argwhere(soft >= 0.5) + [s.start for s in box_t]
        land = np.rint(landing[2]).astype(int)
        for axis in range(3):
            for q in (0, 2, 5, 8, 10, 12):
                cut = np.percentile(core[:, axis], q)
                share_core, share_land = np.mean(core[:, axis] >= cut), np.mean(land[:, axis] >= cut)
                assert abs(share_core - share_land) < 0.08
                if share_core >= 0.9:
                    accepted += 1
                    passed += share_land >= 0.9 - EARLY_REGION_SLACK
    assert accepted > 300
    assert passed >= 0.99 * accepted


def test_paste_given_up_when_the_landing_check_fails():
    """paste_patch returns None (nothing resampled) when the landing check says no, and is unchanged when
    it says yes."""
    case = _case()
    lesion = extract_lesions(case, BankConfig())[0]
    image, mask = lesion.pop("_image"), lesion.pop("_mask")
    target = _case(seed=1, radius=0.1)
    op = _identity_op(lesion)
    seen = []

    def refuse(land):
        seen.append(len(land))
        return False

    args = (target.channels, target.label, target.affine, image, mask, lesion, op, (1,), _all_region,
            PasteSettings((False, False)))
    assert paste_patch(*args, land_check=refuse) is None
    assert seen == [int(mask.sum())]
    plain, checked = paste_patch(*args), paste_patch(*args, land_check=lambda land: True)
    assert plain.box == checked.box
    np.testing.assert_array_equal(plain.label, checked.label)
    got = []
    for patch in (plain, checked):
        channels, label = target.channels.copy(), target.label.copy()
        patch.apply(channels, label)
        got.append(channels)
    np.testing.assert_array_equal(*got)
    assert (got[0] != target.channels).any()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7])
def test_natural_spline_weights_match_scipy(k):
    """The elastic field's spline weights equal scipy's natural CubicSpline through unit values."""
    from scipy.interpolate import CubicSpline

    from lesionsynth.render.transform import natural_spline_weights

    x = np.concatenate([np.linspace(0.0, k - 1.0, 501), np.arange(k, dtype=float)])
    got = natural_spline_weights(x, k)
    if k == 1:
        np.testing.assert_array_equal(got, np.ones((x.size, 1)))
        return
    expected = CubicSpline(np.arange(k), np.eye(k), bc_type="natural")(x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-14)


def test_block_any_and_region_mask_match_their_plain_forms():
    """The strided-OR block summary and the region mask by per-axis takes equal the straightforward
    reshape-any and 3-D gather, odd shapes and crops reaching past the coarse grid included."""
    from lesionsynth.prior import Region
    from lesionsynth.render.paste import _block_any

    rng = np.random.default_rng(5)
    for shape in [(7, 8, 9), (10, 10, 10), (1, 5, 3)]:
        mask = rng.random(shape) < 0.1
        padded = np.pad(mask, [(0, n % 2) for n in shape])
        x, y, z = (n // 2 for n in padded.shape)
        np.testing.assert_array_equal(_block_any(mask, 2), padded.reshape(x, 2, y, 2, z, 2).any(axis=(1, 3, 5)))
    region = Region((2, 3, 1), rng.random((12, 9, 20)) < 0.5, ())
    for start, shape in [((0, 0, 0), (24, 27, 20)), ((5, 7, 3), (9, 4, 11)), ((20, 25, 15), (10, 8, 9))]:
        grids = [np.minimum((np.arange(n) + s) // st, m - 1)
                 for n, s, st, m in zip(shape, start, region.stride, region.coarse.shape)]
        np.testing.assert_array_equal(region.mask_in(np.zeros(shape, np.uint8), start), region.coarse[np.ix_(*grids)])


def _stats(lesion_median, shell_median, noise=2.0, p5=None, p95=None):
    # percentiles of a lesion whose spread is its noise alone: the plateau is its median
    p5 = lesion_median - 1.645 * noise if p5 is None else p5
    p95 = lesion_median + 1.645 * noise if p95 is None else p95
    return {"lesion": {"median": lesion_median, "p5": p5, "p95": p95}, "shell": {"median": shell_median},
            "noise_sd": noise}


def test_lesion_fraction_reads_bright_and_dark_channels_and_skips_flat_ones():
    from lesionsynth.render.paste import lesion_fraction

    # channel 0 bright (tissue 100, lesion 160), channel 1 dark (tissue 80, lesion 50), channel 2 without contrast
    stats = [_stats(160.0, 100.0), _stats(50.0, 80.0), _stats(100.5, 100.0)]
    values = np.array([[100.0, 130.0, 160.0], [80.0, 65.0, 50.0], [0.0, 1e6, -1e6]])
    assert lesion_fraction(values, stats) == pytest.approx([0.0, 0.5, 1.0])
    # a small lesion's median lies below its plateau: the plateau is read from its tail, less the noise
    small = [_stats(130.0, 100.0, noise=2.0, p95=160.0 + 1.645 * 2.0)]
    assert lesion_fraction(np.array([[130.0, 160.0]]), small) == pytest.approx([0.5, 1.0])
    assert lesion_fraction(values[2:], stats[2:]) is None


def test_intensity_cut_keeps_the_label_size_and_follows_the_intensity():
    from lesionsynth.render.paste import CUT_BAND, intensity_cut

    rng = np.random.default_rng(3)
    cut = rng.uniform(0.0, 1.0, size=(6, 7, 8)).astype(np.float32)
    cut[0] = 1.0
    cut[-1] = 0.0
    intensity = rng.uniform(100.0, 160.0, size=cut.size)  # lesion fraction (v - 100) / 60, unrelated to the cut

    def lesion_values(idx):
        return intensity[idx][None]

    out = intensity_cut(cut, lesion_values, [_stats(160.0, 100.0)])
    band = (cut >= CUT_BAND[0]) & (cut < CUT_BAND[1])
    assert np.array_equal(out[~band], cut[~band])  # decided voxels keep their value
    assert np.count_nonzero(out >= 0.5) == np.count_nonzero(cut >= 0.5)  # same label size
    kept, left = intensity.reshape(cut.shape)[band & (out >= 0.5)], intensity.reshape(cut.shape)[band & (out < 0.5)]
    assert kept.min() >= left.max()  # the brightest band voxels are the label's
    # no contrast to read: the mask's cut stays
    assert intensity_cut(cut, lesion_values, [_stats(100.2, 100.0)]) is cut


def test_rotated_self_paste_keeps_the_spread_of_its_label(real_data, tmp_path):
    """Native-space lesions pasted onto their own place, rotated: with the label's edge on the lesion's
    intensity, the spread inside the label stays as it was; the resampled mask's cut alone widened it."""
    from lesionsynth.audit import lesion_features
    from lesionsynth.bank import Bank, build_bank
    from lesionsynth.geometry import spacing_of
    from lesionsynth.io import load_case
    from lesionsynth.prior import allowed_region, is_ct
    from lesionsynth.render import RenderContext, render_op

    bank = Bank(build_bank(real_data / "native_brains", tmp_path / "bank", BankConfig(min_volume_mm3=20.0),
                           jobs=2, progress=False))
    ratios = {True: [], False: []}
    for ref in bank.case_refs()[:3]:
        case = load_case(ref, len(bank.channel_names))
        spacing = spacing_of(case.affine)
        region = allowed_region(case.channels, case.label, case.affine, bank.channel_names, ())
        comps, _ = ndimage.label(case.label > 0, structure=np.ones((3, 3, 3)))
        inv = np.linalg.inv(case.affine)
        for les in [x for x in bank.lesions if x["source_case"] == ref.case_id]:
            at = comps[tuple(np.rint(inv[:3, :3] @ np.array(les["centroid_mm"]) + inv[:3, 3]).astype(int))]
            before = lesion_features(case.channels, comps == at, case.label > 0, spacing) if at else None
            if before is None:
                continue
            for from_intensity in (True, False):
                settings = PasteSettings(tuple(is_ct(n) for n in bank.channel_names),
                                         label_from_intensity=from_intensity)
                ctx = RenderContext(bank.lesion_labels, 26, settings, region.mask_in)
                channels, label = case.channels.copy(), np.zeros_like(case.label)
                op = _identity_op(les, rotation_deg=[20.0, -15.0, 10.0])
                render_op(channels, label, case.affine, op, bank, ctx).apply(channels, label)
                after = lesion_features(channels, label > 0, label > 0, spacing)
                if after is not None:
                    ratios[from_intensity].append(np.mean([after[f"spread_{c}"] / before[f"spread_{c}"]
                                                           for c in range(len(bank.channel_names))]))
    assert len(ratios[True]) >= 10
    with_cut, mask_only = np.median(ratios[True]), np.median(ratios[False])
    assert abs(with_cut - 1.0) < 0.5 * abs(mask_only - 1.0), (with_cut, mask_only)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0)])
def test_lesion_values_are_cubic_or_linear_per_voxel_as_asked(spacing):
    """resample_on_cpu's lesion_values reads each voxel as asked: cubic B-spline (sample_channels) unless it is
    marked linear, then linear interpolation of the same crop (blurred first on a coarser target); a voxel
    read both ways gives each method's value (as the torch twin does), the same each time it is asked."""
    from lesionsynth.render.paste import (PreparedMask, antialiased_crop, paste_coefficients, resample_on_cpu,
                                          sample_channels)

    donor = _case(spacing=(1.0, 1.0, 1.0), seed=3)
    target = _case(spacing=spacing, seed=4, radius=0.0)
    lesion = extract_lesions(donor, BankConfig())[0]
    image, mask = lesion.pop("_image"), lesion.pop("_mask")
    op = _identity_op(lesion, rotation_deg=[10.0, -20.0, 5.0], centre_mm=[19.5, 20.5, 29.0])
    prepared = PreparedMask(mask, lesion.get("mask_box"))
    args = (image, prepared, np.asarray(lesion["affine"]), lesion["centroid_mm"], target.affine, target.label.shape,
            op, 1.0)
    res = resample_on_cpu(*args)
    idx = np.flatnonzero(res.soft > 0)
    rng = np.random.default_rng(0)
    linear = rng.random(idx.size) < 0.5
    got = res.lesion_values(idx, linear)
    voxels = np.column_stack(np.unravel_index(idx, res.soft.shape)) + [s.start for s in res.box]
    mapper = res.mapper()
    crop = antialiased_crop(image, np.asarray(lesion["affine"]), target.affine, op)
    assert (crop is image) == (spacing[2] == 1.0)  # a coarser target reads the blurred crop
    cubic = sample_channels(image, mapper, voxels,
                            paste_coefficients(image, np.asarray(lesion["affine"]), target.affine, op, crop=crop))
    coords = mapper(voxels)
    for axis, n in enumerate(crop.shape[1:]):
        coords[axis] = np.clip(coords[axis], 0, n - 1)
    lines = np.stack([ndimage.map_coordinates(crop[c], coords, order=1, mode="nearest") for c in range(len(crop))])
    np.testing.assert_allclose(got[:, ~linear], cubic[:, ~linear], rtol=0, atol=1e-4)
    np.testing.assert_allclose(got[:, linear], lines[:, linear], rtol=0, atol=1e-4)
    assert np.abs(cubic[:, linear] - lines[:, linear]).max() > 1e-2  # the two really differ here
    np.testing.assert_allclose(res.lesion_values(idx), cubic, rtol=0, atol=1e-4)  # all cubic when asked so
    np.testing.assert_array_equal(res.lesion_values(idx, linear), got)  # and the mixed read again, unchanged


def test_cubic_read_matches_scipy_spline_and_interpolates_the_crop():
    """cubic_read gives scipy's cubic B-spline values (map_coordinates, order 3, no prefilter) on the padded
    coefficients, to float32 rounding, anywhere in and beyond the crop (edge values outside), over several
    blocks of points; at voxel centres it gives the crop back."""
    from lesionsynth.render.paste import CUBIC_BLOCK, cubic_read, spline_coefficients, spline_coordinates

    rng = np.random.default_rng(5)
    crop = (rng.standard_normal((3, 11, 7, 16)) * 80 + 400).astype(np.float32)
    coefficients = spline_coefficients(crop)
    points = rng.uniform(-4.0, 20.0, (3, 2 * CUBIC_BLOCK + 37))
    coords = spline_coordinates(points, crop.shape[1:])
    expected = np.stack([ndimage.map_coordinates(coefficients[c], coords, order=3, mode="nearest", prefilter=False)
                         for c in range(len(crop))])
    got = cubic_read(coefficients, coords)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    centres = np.indices(crop.shape[1:]).reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(cubic_read(coefficients, spline_coordinates(centres, crop.shape[1:])),
                               crop.reshape(len(crop), -1), rtol=0, atol=1e-3)
