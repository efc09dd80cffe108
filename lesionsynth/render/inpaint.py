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

from ..stats import noise_sd
from ..geometry import ball, spacing_of, structure_for
from .paste import Patch

#: Normal tissue ring around the hole used for the local noise estimate (mm).
RING_MM = 3.0


def component_in_box(label: np.ndarray, box, seed_voxel, lesion_labels, connectivity: int) -> np.ndarray:
    """Boolean mask (over `box`) of the lesion component that contains `seed_voxel`."""
    crop = np.isin(label[box], lesion_labels)
    comps, _ = ndimage.label(crop, structure=structure_for(connectivity))
    local = tuple(int(v) - s.start for v, s in zip(seed_voxel, box))
    k = comps[local]
    if k == 0:
        raise ValueError(f"seed voxel {tuple(seed_voxel)} is not on a lesion")
    return comps == k


def fill_order_distance(hole: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) of each hole voxel from the known boundary, by fast marching (0 outside the hole)."""
    phi = np.where(hole, -1.0, 1.0)
    dist = np.asarray(skfmm.distance(phi, dx=np.asarray(spacing, dtype=np.float64)))
    return np.where(hole, -dist, 0.0)


def _neighbour_kernel(spacing) -> np.ndarray:
    offsets = np.indices((3, 3, 3)).reshape(3, -1).T - 1
    dist = np.sqrt(((offsets * np.asarray(spacing)) ** 2).sum(axis=1))
    weights = np.where(dist > 0, 1.0 / np.where(dist > 0, dist, 1.0), 0.0)
    return weights.reshape(3, 3, 3).astype(np.float32)


def fast_marching_fill(channels: np.ndarray, hole: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Fill `hole` in every channel in fast-marching order. Returns (filled channels, distance map)."""
    dist = fill_order_distance(hole, spacing)
    kernel = _neighbour_kernel(spacing)
    band = float(np.min(spacing))
    known = ~hole
    out = channels.astype(np.float32, copy=True)
    remaining = hole.copy()
    level = band
    top = float(dist.max()) + 2 * band
    while remaining.any():
        if level > top:  # unreachable voxels (cannot happen with a known border): use the known mean
            for c in range(out.shape[0]):
                out[c][remaining] = out[c][known].mean() if known.any() else 0.0
            break
        current = remaining & (dist <= level)
        if current.any():
            box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in ndimage.find_objects(current.astype(np.uint8))[0])
            k_known = known[box].astype(np.float32)
            weight = ndimage.correlate(k_known, kernel, mode="constant")
            ready = current[box] & (weight > 0)
            for c in range(out.shape[0]):
                total = ndimage.correlate(out[c][box] * k_known, kernel, mode="constant")
                view = out[c][box]
                view[ready] = total[ready] / weight[ready]
            known[box] |= ready
            remaining[box] &= ~ready
            if ready.any():
                continue  # the same distance level may need another pass for voxels with no known neighbour yet
        level += band
    return out, dist


def inpaint_patch(channels: np.ndarray, label: np.ndarray, affine: np.ndarray, op: dict, lesion_labels,
                  connectivity: int) -> Patch:
    """Everything removing one component changes, as a Patch (the case arrays are not modified)."""
    spacing = spacing_of(affine)
    margin = np.ceil((op["rim_mm"] + RING_MM) / spacing).astype(int) + 1
    (a0, a1), (b0, b1), (c0, c1) = op["bbox"]
    box = tuple(slice(max(lo - m, 0), min(hi + m, n)) for (lo, hi), m, n in
                zip(((a0, a1), (b0, b1), (c0, c1)), margin, label.shape))
    component = component_in_box(label, box, op["seed_voxel"], lesion_labels, connectivity)
    crop_label = label[box]
    lesion_any = np.isin(crop_label, lesion_labels)
    hole = component | (ndimage.binary_dilation(component, structure=ball(op["rim_mm"], spacing)) & ~lesion_any)
    ring = ndimage.binary_dilation(hole, structure=ball(RING_MM, spacing)) & ~hole & ~lesion_any
    crop = channels[(slice(None),) + box]
    filled, dist = fast_marching_fill(crop, hole, spacing)
    rng = np.random.default_rng(int(op["texture_seed"]))
    noise = rng.standard_normal(size=hole.shape, dtype=np.float32)
    taper = np.clip(dist / max(float(op["rim_mm"]), float(spacing.min())), 0.0, 1.0).astype(np.float32)
    for c in range(filled.shape[0]):
        sd = noise_sd(crop[c], ring) * float(op["texture_gain"])
        filled[c][hole] += (sd * taper * noise)[hole]
    new_label = crop_label.copy()
    not_lesion = ~lesion_any
    if not_lesion.any():
        idx = ndimage.distance_transform_edt(~not_lesion, sampling=spacing, return_distances=False,
                                             return_indices=True)
        nearest = crop_label[tuple(idx)]
        new_label[component] = nearest[component]
    else:
        new_label[component] = 0
    return Patch(box, filled, new_label, component)
