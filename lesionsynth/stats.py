"""Robust local intensity statistics shared by the bank, pasting and inpainting."""

from __future__ import annotations

import numpy as np

#: Statistics use at most this many voxels (evenly spread), enough for a stable median.
MAX_STAT_VOXELS = 5000


def _sample(where: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(where)
    if idx.size > MAX_STAT_VOXELS:
        idx = idx[:: idx.size // MAX_STAT_VOXELS + 1]
    return idx


def flat_view(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(1-D view of the array's memory, element step of each axis in it): for C- or Fortran-ordered arrays,
    so voxels of a case held in NIfTI's (Fortran) order are read without a reordered copy. Any other
    layout is copied to C order first."""
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        array = np.ascontiguousarray(array)
    order = "C" if array.flags.c_contiguous else "F"
    return array.reshape(-1, order=order), np.array(array.strides) // array.itemsize


def channel_stats(channels: np.ndarray, where: np.ndarray, origin=None) -> list[tuple[float, float]]:
    """(median, noise sd) of each channel (C, X, Y, Z) within `where`; (nan, 0) if fewer than 10 voxels.

    `where` covers the box of the channels that starts at voxel `origin` (default: all of them); the
    statistics stay inside that box (neighbours beyond its faces are clipped to it).
    Noise = MAD of the voxel minus its 3x3x3 mean (corrected for the mean containing the voxel itself),
    a robust estimate of white noise that ignores smooth intensity changes. Only the sampled voxels and
    their neighbours are read, so the cost does not grow with the size of the channels.
    """
    idx = _sample(where)
    if idx.size < 10:
        return [(float("nan"), 0.0)] * channels.shape[0]
    ijk = np.unravel_index(idx, where.shape)
    origin = (0,) * where.ndim if origin is None else tuple(int(o) for o in origin)
    if not all(ch.flags.c_contiguous or ch.flags.f_contiguous for ch in channels):
        # an unusual layout: flat_view would copy each whole channel; copy only the box
        box = tuple(slice(o, o + n) for o, n in zip(origin, where.shape))
        channels, origin = np.ascontiguousarray(channels[(slice(None),) + box]), (0,) * where.ndim
    values = np.empty((channels.shape[0], idx.size), dtype=np.float64)
    resid = np.empty_like(values)
    offsets = {}
    for c in range(channels.shape[0]):
        flat, steps = flat_view(channels[c])
        key = tuple(steps.tolist())
        if key not in offsets:
            # flat offsets of the 3 clipped neighbour positions along each axis; 27 sums of them below
            along = [[(np.clip(a + o, 0, n - 1) + s0) * st for o in (-1, 0, 1)]
                     for a, n, s0, st in zip(ijk, where.shape, origin, steps)]
            offsets[key] = np.stack([i + j + k for i in along[0] for j in along[1] for k in along[2]])
        neighbours = flat.take(offsets[key])  # (27, N): one gather, summed in the same order as one by one
        total = neighbours.sum(axis=0, dtype=np.float64)
        values[c] = neighbours[13]  # the voxel itself (offset 0 on every axis)
        resid[c] = values[c] - total / 27.0
    out = []
    for v, r in zip(values, resid):
        noise = 1.4826 * np.median(np.abs(r - np.median(r))) / np.sqrt(1 - 1 / 27)
        out.append((float(np.median(v)), float(noise)))
    return out


def noise_sd(channel: np.ndarray, where: np.ndarray) -> float:
    """Robust voxel-noise estimate of one channel within `where` (see channel_stats)."""
    return channel_stats(channel[None], where)[0][1]
