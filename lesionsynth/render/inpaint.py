"""Remove one lesion component by fast-marching inpainting.

The component is dilated by a partial-volume rim; scikit-fmm gives each hole voxel its distance from
the known boundary, which sets the fill order; voxels are filled band by band, each taking the
distance-weighted mean of its already-known neighbours; texture matching the local noise is added.
Removed lesion voxels take the label of the nearest non-lesion voxel (e.g. the organ they sat in).
"""

from __future__ import annotations

import numpy as np
import skfmm
from scipy import ndimage

from ..geometry import ball, dilate, spacing_of, structure_for
from ..labels import label_in
from ..stats import channel_stats, noise_sd
from .paste import Patch

#: Normal tissue ring around the hole used for the local noise estimate (mm).
RING_MM = 3.0


def component_in_box(label: np.ndarray, box, seed_voxel, lesion_labels, connectivity: int) -> np.ndarray:
    """Boolean mask (over `box`) of the lesion component that contains `seed_voxel`."""
    crop = label_in(label[box], lesion_labels)
    comps, _ = ndimage.label(crop, structure=structure_for(connectivity))
    local = tuple(int(v) - s.start for v, s in zip(seed_voxel, box))
    k = comps[local]
    if k == 0:
        raise ValueError(f"seed voxel {tuple(seed_voxel)} is not on a lesion")
    return comps == k


def fill_order_distance(hole: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) of each hole voxel from the known boundary, by fast marching (0 outside the hole).

    Only the hole and the known voxels next to it take part (the rest is masked out of the march): the
    distance inside the hole depends on nothing else, and the box around a lesion is mostly tissue.
    """
    near = dilate(hole)
    phi = np.ma.MaskedArray(np.where(hole, -1.0, 1.0), mask=~near)
    dist = skfmm.distance(phi, dx=np.asarray(spacing, dtype=np.float64))
    return np.where(hole, -np.ma.getdata(dist), 0.0)


def _neighbour_weights(spacing) -> tuple[np.ndarray, np.ndarray]:
    """The 26 neighbour offsets (26, 3) and their inverse-distance weights."""
    offsets = np.indices((3, 3, 3)).reshape(3, -1).T - 1
    offsets = offsets[np.any(offsets != 0, axis=1)]
    dist = np.sqrt(((offsets * np.asarray(spacing)) ** 2).sum(axis=1))
    return offsets, (1.0 / dist).astype(np.float32)


def fast_marching_fill(channels: np.ndarray, hole: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Fill `hole` in every channel in fast-marching order. Returns (filled channels, distance map).

    Band by band (one voxel size of distance each), every hole voxel with known neighbours takes the
    inverse-distance-weighted mean of them (all voxels of a pass from the values before it); a band is
    passed again until no voxel of it gains a known neighbour. Only hole voxels are visited.
    """
    dist = fill_order_distance(hole, spacing)
    offsets, weights = _neighbour_weights(spacing)
    padded = tuple(n + 2 for n in hole.shape)  # a one-voxel border of unknown zeros: no bounds checks
    inner = tuple(slice(1, n + 1) for n in hole.shape)
    steps = np.ravel_multi_index(tuple((offsets + 1).T), padded) - np.ravel_multi_index((1, 1, 1), padded)
    known = np.zeros(padded, dtype=bool)
    known[inner] = ~hole
    known = known.reshape(-1)
    values = np.zeros((channels.shape[0],) + padded, dtype=np.float32)
    values[(slice(None),) + inner] = channels
    values = values.reshape(channels.shape[0], -1)
    where = np.argwhere(hole) + 1
    order = np.argsort(dist[hole], kind="stable")
    todo = np.ravel_multi_index(tuple(where.T), padded)[order]
    todo_dist = dist[hole][order]
    band = float(np.min(spacing))
    top = float(todo_dist[-1]) + 2 * band if todo.size else 0.0
    pending = np.empty(0, dtype=np.int64)
    taken, level = 0, band
    while taken < todo.size or pending.size:
        if level > top:  # unreachable voxels (cannot happen with a known border): use the known mean
            pending = np.concatenate([pending, todo[taken:]])
            for c in range(values.shape[0]):
                values[c][pending] = values[c][known].mean() if known.any() else 0.0
            break
        upto = int(np.searchsorted(todo_dist, level, side="right"))
        if upto > taken:
            pending = np.concatenate([pending, todo[taken:upto]])
            taken = upto
        if pending.size:
            around = pending[:, None] + steps[None, :]
            w = known[around] * weights
            total_w = w.sum(axis=1)
            ready = total_w > 0
            if ready.any():
                around, w, total_w = around[ready], w[ready], total_w[ready]
                fresh = [np.einsum("nk,nk->n", values[c][around], w) / total_w for c in range(values.shape[0])]
                for c, v in enumerate(fresh):
                    values[c][pending[ready]] = v
                known[pending[ready]] = True
                pending = pending[~ready]
                continue  # the same distance level may need another pass for voxels with no known neighbour yet
        level += band
    out = values.reshape((channels.shape[0],) + padded)[(slice(None),) + inner]
    return np.ascontiguousarray(out), dist


#: Partial-volume growth: a voxel next to the hole whose intensity lies this many noise sd beyond the tissue
#: level, towards the lesion's (channels weighted by the lesion's contrast), is lesion partial volume.
EXCESS_SD = 2.5
#: How far (mm) beyond the first rim the hole may grow by that test (at least one voxel).
MAX_GROWTH_MM = 3.0
#: Smallest contrast (noise sd) of a channel that the partial-volume test reads.
MIN_CONTRAST_SD = 1.0
#: A removal is refused when the voxel layer around the filled hole still lies beyond the tissue level, towards
#: the lesion, by more than this share of the lesion's own contrast (and by more than MIN_RESIDUAL_SD noise sd).
MAX_RESIDUAL_FRACTION = 0.10
MIN_RESIDUAL_SD = 1.0
#: Texture: voxels of the high-pass residual (gaussian of this sd, voxels) of healthy tissue elsewhere in the case.
TEXTURE_SMOOTH_VOX = 1.0
#: Tries to find healthy tissue for the texture before white noise of the local level is used instead.
TEXTURE_TRIES = 24


def tissue_levels(crop: np.ndarray, ring: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(median, noise sd) per channel (C,) of the crop's `ring` voxels."""
    stats = channel_stats(crop, ring)
    return np.array([m for m, _ in stats]), np.array([sd for _, sd in stats])


def lesion_direction(crop: np.ndarray, component: np.ndarray, level: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Per channel (C,), the weight of the partial-volume test: the lesion's signed contrast to the tissue in
    noise sd (0 where it is below MIN_CONTRAST_SD or the noise is unknown), scaled to unit length."""
    weights = np.zeros(crop.shape[0])
    for c in range(crop.shape[0]):
        if noise[c] > 0 and np.isfinite(level[c]):
            contrast = (float(np.median(crop[c][component])) - level[c]) / noise[c]
            weights[c] = contrast if abs(contrast) >= MIN_CONTRAST_SD else 0.0
    norm = float(np.sqrt((weights ** 2).sum()))
    return weights / norm if norm > 0 else weights


def excess_sd(crop: np.ndarray, where: np.ndarray, level, noise, direction) -> np.ndarray:
    """Per voxel of `where`, how many noise sd its channels lie beyond the tissue level towards the lesion."""
    total = np.zeros(int(np.count_nonzero(where)))
    for c, w in enumerate(direction):
        if w != 0:
            total += w * (crop[c][where] - level[c]) / noise[c]
    return total


def grow_hole(crop: np.ndarray, hole: np.ndarray, component: np.ndarray, lesion_any: np.ndarray, spacing,
              ring_mm: float = None) -> tuple[np.ndarray, int]:
    """The hole grown, layer by layer (6-neighbours), by the voxels around it that are still lesion partial
    volume (`EXCESS_SD` beyond the tissue level towards the lesion), at most MAX_GROWTH_MM (at least one
    layer). Returns (hole, layers added)."""
    ring = dilate(hole, ball(ring_mm or RING_MM, spacing)) & ~dilate(hole, structure_for(26)) & ~lesion_any
    level, noise = tissue_levels(crop, ring)
    direction = lesion_direction(crop, component, level, noise)
    if not direction.any():
        return hole, 0
    layers = max(1, int(np.ceil(MAX_GROWTH_MM / float(np.min(spacing)))))
    added = 0
    for _ in range(layers):
        shell = dilate(hole) & ~hole & ~lesion_any
        if not shell.any():
            break
        grow = np.zeros_like(hole)
        grow[shell] = excess_sd(crop, shell, level, noise, direction) > EXCESS_SD
        if not grow.any():
            break
        hole = hole | grow
        added += 1
    return hole, added


def residual_excess(channels: np.ndarray, hole: np.ndarray, component: np.ndarray, lesion_any: np.ndarray,
                    original: np.ndarray, spacing) -> tuple[float, float]:
    """(mean excess, lesion contrast), both in noise sd along the lesion's direction (`lesion_direction`): how
    far the voxel layer around the filled hole still lies beyond the tissue level towards the removed lesion,
    and how far the lesion itself did. Levels and direction are read on the original crop, before the fill."""
    ring = dilate(hole, ball(RING_MM, spacing)) & ~dilate(hole, structure_for(26)) & ~lesion_any
    level, noise = tissue_levels(original, ring)
    direction = lesion_direction(original, component, level, noise)
    shell = dilate(hole, structure_for(26)) & ~hole & ~lesion_any
    if not direction.any() or np.count_nonzero(shell) < 10:
        return 0.0, 0.0
    contrast = float(np.median(excess_sd(original, component, level, noise, direction)))
    return float(excess_sd(channels, shell, level, noise, direction).mean()), contrast


def healthy_texture(channels: np.ndarray, label: np.ndarray, box, hole: np.ndarray, lesion_labels, region_fn,
                    level: np.ndarray, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """(C, X, Y, Z) float32: the high-pass texture (the tissue less its gaussian of TEXTURE_SMOOTH_VOX) of a
    box of healthy tissue elsewhere in the case, of the same tissue level (within 2 noise sd per channel)
    and in the allowed region, each channel rescaled to the local noise `noise`; None if no such box is
    found in TEXTURE_TRIES tries. The noise of an MR case is not white: its texture carries the scanner's
    correlation, which white noise does not."""
    shape = np.array([s.stop - s.start for s in box])
    pad = int(np.ceil(3 * TEXTURE_SMOOTH_VOX))
    size = np.array(label.shape)
    if np.any(size < shape + 2 * pad):
        return None
    for _ in range(TEXTURE_TRIES):
        lo = np.array([int(rng.integers(pad, n - m - pad + 1)) for n, m in zip(size, shape)])
        where = tuple(slice(int(a), int(a + m)) for a, m in zip(lo, shape))
        if all(s.start < b.stop and b.start < s.stop for s, b in zip(where, box)):
            continue  # overlaps the lesion's own box
        lab = label[where]
        if label_in(lab, lesion_labels).any():
            continue
        if region_fn is not None and not region_fn(np.ascontiguousarray(lab), lo.tolist())[hole].all():
            continue
        outer = tuple(slice(int(a) - pad, int(a + m) + pad) for a, m in zip(lo, shape))
        crop = np.asarray(channels[(slice(None),) + outer], dtype=np.float32)
        inner = tuple(slice(pad, pad + int(m)) for m in shape)
        ok, out = True, np.empty((crop.shape[0],) + tuple(int(m) for m in shape), dtype=np.float32)
        for c in range(crop.shape[0]):
            values = crop[c][inner]
            if noise[c] > 0 and abs(float(np.median(values[hole])) - level[c]) > 2.0 * noise[c]:
                ok = False
                break
            out[c] = (crop[c] - ndimage.gaussian_filter(crop[c], TEXTURE_SMOOTH_VOX))[inner]
        if not ok:
            continue
        for c in range(out.shape[0]):
            there = noise_sd(np.ascontiguousarray(crop[c][inner]), hole)
            out[c] *= np.float32(noise[c] / there) if there > 0 else np.float32(0.0)
        return out
    return None


def inpaint_patch(channels: np.ndarray, label: np.ndarray, affine: np.ndarray, op: dict, lesion_labels,
                  connectivity: int, region_fn=None) -> Patch | None:
    """Everything removing one component changes, as a Patch (the case arrays are not modified), or None when
    the lesion cannot be removed without a visible trace (`residual_excess`, MAX_RESIDUAL_FRACTION).

    The hole is the component, its partial-volume rim (`rim_mm`, and at least one voxel all round, whatever
    the grid) and the voxels beyond that still carry the lesion's intensity (`grow_hole`). It is filled by
    fast marching, and texture is added: the high-pass of healthy tissue of the same level elsewhere in the
    case (`healthy_texture`), else white noise of the local level. `patch.info` holds what was done.
    """
    spacing = spacing_of(affine)
    margin = np.ceil((op["rim_mm"] + MAX_GROWTH_MM + RING_MM) / spacing).astype(int) + 2
    (a0, a1), (b0, b1), (c0, c1) = op["bbox"]
    box = tuple(slice(max(lo - m, 0), min(hi + m, n)) for (lo, hi), m, n in
                zip(((a0, a1), (b0, b1), (c0, c1)), margin, label.shape))
    component = component_in_box(label, box, op["seed_voxel"], lesion_labels, connectivity)
    crop_label = label[box]
    lesion_any = label_in(crop_label, lesion_labels)
    rim = dilate(component, ball(op["rim_mm"], spacing)) | dilate(component, structure_for(26))
    hole = component | (rim & ~lesion_any)
    crop = np.asarray(channels[(slice(None),) + box], dtype=np.float32)
    hole, grown = grow_hole(crop, hole, component, lesion_any, spacing)
    ring = dilate(hole, ball(RING_MM, spacing)) & ~hole & ~lesion_any
    filled, dist = fast_marching_fill(crop, hole, spacing)
    rng = np.random.default_rng(int(op["texture_seed"]))
    level, noise = tissue_levels(crop, ring)
    texture = healthy_texture(channels, label, box, hole, lesion_labels, region_fn, level, noise, rng)
    source = "healthy tissue" if texture is not None else "white noise"
    if texture is None:
        texture = rng.standard_normal(size=(crop.shape[0],) + hole.shape, dtype=np.float32)
        texture *= noise.astype(np.float32)[:, None, None, None]
    taper = np.clip(dist / max(float(op["rim_mm"]), float(spacing.min())), 0.0, 1.0).astype(np.float32)
    for c in range(filled.shape[0]):
        filled[c][hole] += (float(op["texture_gain"]) * taper * texture[c])[hole]
    residual, contrast = residual_excess(filled, hole, component, lesion_any, crop, spacing)
    if residual > max(MAX_RESIDUAL_FRACTION * contrast, MIN_RESIDUAL_SD):
        return None
    new_label = crop_label.copy()
    not_lesion = ~lesion_any
    around = crop_label[not_lesion]
    if around.size and around.min() == around.max():  # one label around (no region labels): no search needed
        new_label[component] = around[0]
    elif around.size:
        idx = ndimage.distance_transform_edt(~not_lesion, sampling=spacing, return_distances=False,
                                             return_indices=True)
        nearest = crop_label[tuple(idx)]
        new_label[component] = nearest[component]
    else:
        new_label[component] = 0
    patch = Patch(box, component, new_label, channels=filled)
    patch.info = {"hole_voxels": int(hole.sum()), "grown_layers": grown, "residual_excess_sd": round(residual, 2),
                  "lesion_contrast_sd": round(contrast, 2),
                  "texture": source}
    return patch
