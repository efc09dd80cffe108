"""Remove one lesion component by fast-marching inpainting.

The component is dilated by a partial-volume rim (at least one voxel, grown while its neighbours still carry
the lesion's intensity); scikit-fmm gives each hole voxel its distance from the known boundary, which sets the
fill order; voxels are filled band by band, each taking the distance-weighted mean of its already-known
neighbours, weighted towards the tissue most of the hole's surroundings belong to; only the smoothed difference
between fill and case is written, so the hole keeps the case's own noise. Removed lesion voxels take the label
of the nearest non-lesion voxel (e.g. the organ they sat in).
"""

from __future__ import annotations

import numpy as np
import skfmm
from scipy import ndimage

from ..geometry import ball, dilate, spacing_of, structure_for, within_mm
from ..labels import label_in
from ..prior import mode_of
from ..stats import channel_stats
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


#: Host-tissue weighting of the fill (`fast_marching_fill`): a neighbour's weight is multiplied by
#: exp(-d^2 / 2) + HOST_FLOOR, d its distance (all channels, in HOST_SCALE_SD noise sd) from the host tissue's level.
HOST_SCALE_SD = 2.0
HOST_FLOOR = 1e-3
#: Bandwidth (noise sd) of the mean shift that finds the host tissue's level around the hole (`host_level`).
HOST_BANDWIDTH_SD = 2.0


def host_level(crop: np.ndarray, known: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The level (C,) of the tissue most of the `known` voxels belong to: the mode of their joint distribution
    over channels (`prior.mode_of`, in noise sd, bandwidth HOST_BANDWIDTH_SD). The median of voxels of two
    tissues (white matter and a ventricle's border) is a level neither has; nan where none is known."""
    mode = mode_of(crop[:, known].astype(np.float64) / noise[:, None], HOST_BANDWIDTH_SD)
    return np.full(crop.shape[0], np.nan) if mode is None else mode * noise


def fast_marching_fill(channels: np.ndarray, hole: np.ndarray, spacing, host: np.ndarray | None = None,
                       noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fill `hole` in every channel in fast-marching order. Returns (filled channels, distance map).

    Band by band (one voxel size of distance each), every hole voxel with known neighbours takes the
    inverse-distance-weighted mean of them (all voxels of a pass from the values before it); a band is
    passed again until no voxel of it gains a known neighbour. Only hole voxels are visited.

    With `host` (level per channel, `host_level`) and `noise` (sd per channel), a neighbour's weight is also
    multiplied by its likeness to the host tissue (HOST_SCALE_SD): where the hole borders another tissue
    (a ventricle, the cortex), the fill continues the tissue the lesion sat in rather than averaging both;
    where only the other tissue is known, it still takes that tissue's level.
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
    if host is not None:
        scale = (HOST_SCALE_SD * np.maximum(np.asarray(noise, dtype=np.float64), 1e-6)).astype(np.float32)
        host = np.asarray(host, dtype=np.float32)

        def likeness(at):
            d2 = sum(((values[c][at] - host[c]) / scale[c]) ** 2 for c in range(values.shape[0]))
            return np.exp(-0.5 * d2) + np.float32(HOST_FLOOR)

        affinity = np.ones(values.shape[1], dtype=np.float32)
        affinity[known] = likeness(known)
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
            if host is not None:
                w = w * affinity[around]
            total_w = w.sum(axis=1)
            ready = total_w > 0
            if ready.any():
                around, w, total_w = around[ready], w[ready], total_w[ready]
                fresh = [np.einsum("nk,nk->n", values[c][around], w) / total_w for c in range(values.shape[0])]
                for c, v in enumerate(fresh):
                    values[c][pending[ready]] = v
                if host is not None:
                    affinity[pending[ready]] = likeness(pending[ready])
                known[pending[ready]] = True
                pending = pending[~ready]
                continue  # the same distance level may need another pass for voxels with no known neighbour yet
        level += band
    out = values.reshape((channels.shape[0],) + padded)[(slice(None),) + inner]
    return np.ascontiguousarray(out), dist


#: Partial-volume growth (`grow_hole`): the layer around the hole still holds the lesion's partial volume when,
#: on some channel, its median lies beyond the tissue level towards the lesion by this share of the lesion's
#: contrast and at least LAYER_MIN_SD noise sd; its voxels beyond EXCESS_SD on such a channel are taken.
LAYER_FRACTION = 0.05
LAYER_MIN_SD = 0.5
EXCESS_SD = 1.5
#: How far (mm) beyond the first rim the hole may grow by that test (at least one voxel).
MAX_GROWTH_MM = 3.0
#: Smallest contrast (noise sd) of a channel that the partial-volume tests read.
MIN_CONTRAST_SD = 1.0
#: A removal is refused when, on some channel, the voxel layer around the filled hole still lies beyond the
#: tissue level, towards the lesion, by more than this share of the lesion's contrast (and MIN_RESIDUAL_SD sd).
MAX_RESIDUAL_FRACTION = 0.10
MIN_RESIDUAL_SD = 0.5


def tissue_levels(crop: np.ndarray, ring: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(median, noise sd) per channel (C,) of the crop's `ring` voxels."""
    stats = channel_stats(crop, ring)
    return np.array([m for m, _ in stats]), np.array([sd for _, sd in stats])


def lesion_contrast(crop: np.ndarray, component: np.ndarray, level: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Per channel (C,), the lesion's signed contrast to the tissue level in noise sd (its median); 0 where it
    is below MIN_CONTRAST_SD or the noise is unknown."""
    contrast = np.zeros(crop.shape[0])
    for c in range(crop.shape[0]):
        if noise[c] > 0 and np.isfinite(level[c]):
            value = (float(np.median(crop[c][component])) - level[c]) / noise[c]
            contrast[c] = value if abs(value) >= MIN_CONTRAST_SD else 0.0
    return contrast


def excess_sd(crop: np.ndarray, where: np.ndarray, level, noise, contrast) -> np.ndarray:
    """(C, N): per channel and voxel of `where`, how many noise sd it lies beyond the tissue level towards the
    lesion (0 on channels without contrast)."""
    out = np.zeros((crop.shape[0], int(np.count_nonzero(where))))
    for c, k in enumerate(contrast):
        if k != 0:
            out[c] = np.sign(k) * (crop[c][where] - level[c]) / noise[c]
    return out


def tissue_ring(hole: np.ndarray, lesion_any: np.ndarray, spacing, skip: np.ndarray | None = None) -> np.ndarray:
    """Normal tissue around `hole` that its levels are read on: within RING_MM and at least two voxels of it
    (on a 3 mm grid RING_MM reaches one voxel only), outside `skip` (default: the hole) and every lesion."""
    return within_mm(hole, RING_MM, spacing) & ~(hole if skip is None else skip) & ~lesion_any


def grow_hole(crop: np.ndarray, hole: np.ndarray, component: np.ndarray, lesion_any: np.ndarray, spacing
              ) -> tuple[np.ndarray, int]:
    """The hole grown, layer by layer (6-neighbours), at most MAX_GROWTH_MM (at least one layer), while the layer
    around it still carries the lesion's partial volume on some channel (its median, LAYER_FRACTION of the
    lesion's contrast); of such a layer the voxels EXCESS_SD beyond the tissue on that channel are taken.
    Returns (hole, layers added). A voxel-by-voxel test alone took in noise and the anatomy next to a lesion,
    and the hole grew to its limit around most lesions."""
    ring = tissue_ring(hole, lesion_any, spacing, dilate(hole, structure_for(26)))
    level, noise = tissue_levels(crop, ring)
    contrast = lesion_contrast(crop, component, level, noise)
    if not contrast.any():
        return hole, 0
    needed = np.maximum(LAYER_FRACTION * np.abs(contrast), LAYER_MIN_SD)
    layers = max(1, int(np.ceil(MAX_GROWTH_MM / float(np.min(spacing)))))
    added = 0
    for _ in range(layers):
        shell = dilate(hole) & ~hole & ~lesion_any
        if not shell.any():
            break
        excess = excess_sd(crop, shell, level, noise, contrast)
        still = (contrast != 0) & (np.median(excess, axis=1) > needed)
        if not still.any():
            break
        grow = np.zeros_like(hole)
        grow[shell] = (excess[still] > EXCESS_SD).any(axis=0)
        hole = hole | grow
        added += 1
    return hole, added


def residual_excess(channels: np.ndarray, hole: np.ndarray, component: np.ndarray, lesion_any: np.ndarray,
                    original: np.ndarray, spacing) -> tuple[float, float]:
    """(residual, contrast) in noise sd, of the channel where the voxel layer around the filled hole still lies
    furthest beyond the tissue level towards the removed lesion, relative to the lesion's contrast there:
    the layer's median excess and the lesion's contrast on that channel. Levels and contrast are read on
    the original crop, before the fill."""
    around = dilate(hole, structure_for(26))
    level, noise = tissue_levels(original, tissue_ring(hole, lesion_any, spacing, around))
    contrast = lesion_contrast(original, component, level, noise)
    shell = around & ~hole & ~lesion_any
    if not contrast.any() or np.count_nonzero(shell) < 10:
        return 0.0, 0.0
    left = np.median(excess_sd(channels, shell, level, noise, contrast), axis=1)
    share = np.where(contrast != 0, left / np.maximum(np.abs(contrast), 1e-9), -np.inf)
    c = int(np.argmax(share))
    return float(left[c]), float(abs(contrast[c]))


#: Neighbours whose fill difference differs by more than about this many noise sd are not averaged together:
#: a lesion's sharp edge stays sharp in the excess that is taken off.
EDGE_TOLERANCE_SD = 1.0
#: ... nor by more than this share of the lesion's contrast on the channel, but at least EDGE_FLOOR_SD noise sd. On a
#: coarse grid the local noise estimate also holds anatomy (2-3x the scanner's noise on 3 mm voxels), and a tolerance
#: of one such sd averaged the lesion's partial-volume steps away: its shape stayed behind as texture.
EDGE_CONTRAST_FRACTION = 0.05
EDGE_FLOOR_SD = 0.5
#: Rounds of that smoothing (each along all three axes): the wider it reaches, the less of the case's own noise
#: it takes off (and replaces by white noise); a scanner's noise is correlated over neighbouring voxels.
SMOOTH_PASSES = 3


def written_neighbours(idx: np.ndarray, shape) -> np.ndarray:
    """(3, 2, N): per axis, the position in `idx` (flat indices of the written voxels of a box of `shape`) of the
    voxel before and after each one, or -1 where that voxel is not written."""
    pos = np.full(int(np.prod(shape)), -1, dtype=np.int64)
    pos[idx] = np.arange(idx.size)
    ijk = np.unravel_index(idx, shape)
    strides = np.cumprod((1,) + tuple(shape[:0:-1]))[::-1]  # C order
    out = np.full((3, 2, idx.size), -1, dtype=np.int64)
    for axis, n in enumerate(shape):
        for side, step in enumerate((-1, 1)):
            at = np.flatnonzero((ijk[axis] + step >= 0) & (ijk[axis] + step < n))
            out[axis, side, at] = pos[idx[at] + step * int(strides[axis])]
    return out


def edge_preserving_smooth(change: np.ndarray, neighbours: np.ndarray, tolerance: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(`change` (N,) smoothed, noise sd it takes off each voxel per unit white noise): the binomial kernel
    [1, 2, 1] / 4 along each axis in turn (neighbours as `written_neighbours` gives them), each neighbour
    weighted by exp(-d^2 / 2 tolerance^2), d its difference from the voxel: noise is averaged out, a step of
    a few noise sd (a lesion's edge, a small lesion within its rim) is not."""
    out = change.astype(np.float32, copy=True)
    centre = np.ones(out.size, dtype=np.float32)
    energy = np.ones(out.size, dtype=np.float32)
    inv = np.float32(1.0 / (2.0 * tolerance * tolerance))
    for before, after in neighbours:
        total = 2.0 * out
        weight = np.full(out.size, 2.0, dtype=np.float32)
        squares = np.full(out.size, 4.0, dtype=np.float32)
        for nb in (before, after):
            has = np.flatnonzero(nb >= 0)
            other = out[nb[has]]
            w = np.exp(-((other - out[has]) ** 2) * inv)
            total[has] += w * other
            weight[has] += w
            squares[has] += w * w
        out = total / weight
        centre *= 2.0 / weight
        energy *= squares / (weight * weight)
    return out, np.sqrt(np.clip(2.0 * centre - energy, 0.0, None))


def edge_tolerance(noise: np.ndarray, contrast: np.ndarray | None = None) -> np.ndarray:
    """Per channel (C,), the difference between neighbours beyond which `remove_excess` does not average them:
    EDGE_TOLERANCE_SD noise sd, at most EDGE_CONTRAST_FRACTION of the lesion's `contrast` (its level above the
    host tissue, the channels' units; none, nan or below MIN_CONTRAST_SD noise sd: no such bound), at least
    EDGE_FLOOR_SD noise sd."""
    noise = np.maximum(np.asarray(noise, dtype=np.float64), 1e-6)
    tolerance = EDGE_TOLERANCE_SD * noise
    if contrast is not None:
        contrast = np.abs(np.nan_to_num(np.asarray(contrast, dtype=np.float64), nan=0.0))
        bound = np.where(contrast >= MIN_CONTRAST_SD * noise, EDGE_CONTRAST_FRACTION * contrast, np.inf)
        tolerance = np.maximum(np.minimum(tolerance, bound), EDGE_FLOOR_SD * noise)
    return tolerance


def remove_excess(crop: np.ndarray, filled: np.ndarray, hole: np.ndarray, noise, gain: float,
                  rng: np.random.Generator, tolerance: np.ndarray | None = None) -> None:
    """Turn `filled` (the fast-marching fill of `hole`, (C, X, Y, Z)) into the case's own voxels less the lesion's
    smoothed excess, in place: in the hole, crop + smoothed (fill - crop) (`edge_preserving_smooth`, over hole
    voxels only, `tolerance` per channel: `edge_tolerance`, by default of the noise alone), plus white noise of
    `gain` x `noise` (per channel) for the variance the smoothing takes off the case's own noise.

    The removal thus changes only the low-frequency content: the hole keeps the scanner's own noise, with its
    level and spatial correlation, and where the grown rim held little of the lesion the voxels hardly move.
    A smooth fill with noise of another place or white noise added differs from the healthy tissue by about
    1.4 noise sd in every voxel it writes (the truth benchmark: PSNR below a plain shell-median fill)."""
    idx = np.flatnonzero(hole)
    if not idx.size:
        return
    neighbours = np.concatenate([written_neighbours(idx, hole.shape)] * SMOOTH_PASSES)
    z = rng.standard_normal(size=idx.size, dtype=np.float32)
    if tolerance is None:
        tolerance = edge_tolerance(noise)
    for c in range(crop.shape[0]):
        own = crop[c].reshape(-1)[idx]
        change, lost = edge_preserving_smooth(filled[c].reshape(-1)[idx] - own, neighbours, float(tolerance[c]))
        filled[c].reshape(-1)[idx] = own + change + np.float32(gain * float(noise[c])) * lost * z


def inpaint_patch(channels: np.ndarray, label: np.ndarray, affine: np.ndarray, op: dict, lesion_labels,
                  connectivity: int) -> Patch | None:
    """Everything removing one component changes, as a Patch (the case arrays are not modified), or None when
    the lesion cannot be removed without a visible trace (`residual_excess`, MAX_RESIDUAL_FRACTION) unless the
    operation says it must be (`must_remove`: a case cleared of every lesion); `residual_visible` records it.

    The hole is the component, its partial-volume rim (`rim_mm`, and at least one voxel all round, whatever
    the grid) and the voxels beyond that still carry the lesion's intensity (`grow_hole`). It is filled by
    fast marching, and only the smoothed difference is written (`remove_excess`): the hole keeps the case's
    own noise. `patch.info` holds what was done.
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
    ring = tissue_ring(hole, lesion_any, spacing)
    _, noise = tissue_levels(crop, ring)
    positive = np.maximum(noise, 1e-6)
    host = host_level(crop, dilate(hole) & ~hole & ~lesion_any, positive)
    if np.all(np.isfinite(host)):
        filled, _ = fast_marching_fill(crop, hole, spacing, host, positive)
        tolerance = edge_tolerance(positive, np.median(crop[:, component], axis=1) - host)
    else:
        filled, _ = fast_marching_fill(crop, hole, spacing)
        tolerance = edge_tolerance(positive)
    rng = np.random.default_rng(int(op["texture_seed"]))
    remove_excess(crop, filled, hole, noise, float(op["texture_gain"]), rng, tolerance)
    residual, contrast = residual_excess(filled, hole, component, lesion_any, crop, spacing)
    visible = residual > max(MAX_RESIDUAL_FRACTION * contrast, MIN_RESIDUAL_SD)
    if visible and not op.get("must_remove"):
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
                  "lesion_contrast_sd": round(contrast, 2), "residual_visible": bool(visible)}
    return patch
