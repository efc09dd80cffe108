"""Robust local intensity statistics shared by the bank, pasting and inpainting."""

from __future__ import annotations

import numpy as np

#: Statistics use at most this many voxels (evenly spread), enough for a stable median.
MAX_STAT_VOXELS = 20000


def _sample(where: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(where)
    if idx.size > MAX_STAT_VOXELS:
        idx = idx[:: idx.size // MAX_STAT_VOXELS + 1]
    return idx


def median_and_noise(channel: np.ndarray, where: np.ndarray) -> tuple[float, float]:
    """(median, noise sd) of a channel within `where`; (nan, 0) if fewer than 10 voxels.

    Noise = MAD of the voxel minus its 3x3x3 mean (corrected for the mean containing the voxel itself),
    a robust estimate of white noise that ignores smooth intensity changes. Only the sampled voxels and
    their neighbours are read, so the cost does not grow with the size of `channel`.
    """
    idx = _sample(where)
    if idx.size < 10:
        return float("nan"), 0.0
    ijk = np.unravel_index(idx, channel.shape)
    values = channel[ijk].astype(np.float64)
    upper = np.array(channel.shape) - 1
    total = np.zeros(idx.size, dtype=np.float64)
    for offset in np.indices((3, 3, 3)).reshape(3, -1).T - 1:
        total += channel[tuple(np.clip(a + o, 0, u) for a, o, u in zip(ijk, offset, upper))]
    resid = values - total / 27.0
    noise = 1.4826 * np.median(np.abs(resid - np.median(resid))) / np.sqrt(1 - 1 / 27)
    return float(np.median(values)), float(noise)


def noise_sd(channel: np.ndarray, where: np.ndarray) -> float:
    """Robust voxel-noise estimate within `where` (see median_and_noise)."""
    return median_and_noise(channel, where)[1]
