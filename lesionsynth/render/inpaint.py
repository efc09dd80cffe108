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
from ..stats import noise_sd
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
    lesion_any = label_in(crop_label, lesion_labels)
    hole = component | (dilate(component, ball(op["rim_mm"], spacing)) & ~lesion_any)
    ring = dilate(hole, ball(RING_MM, spacing)) & ~hole & ~lesion_any
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
    return Patch(box, component, new_label, channels=filled)
