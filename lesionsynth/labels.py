"""Label-value membership, the test every lesion and region step repeats on label crops."""

from __future__ import annotations

import numpy as np


def label_in(label: np.ndarray, values) -> np.ndarray:
    """Boolean mask of the voxels whose label is one of `values` (a lookup table for uint8 labels:
    several times faster than np.isin on the volumes and crops this runs on)."""
    label = np.asarray(label)
    values = np.asarray(values).ravel()
    if label.dtype == np.uint8:
        table = np.zeros(256, dtype=bool)
        table[values[(values >= 0) & (values <= 255)].astype(np.intp)] = True
        return table[label]
    return np.isin(label, values)


def count_in(label: np.ndarray, values) -> int:
    """Number of voxels whose label is one of `values` (one histogram pass for uint8 labels)."""
    label = np.asarray(label)
    if label.dtype == np.uint8:
        counts = np.bincount(label.reshape(-1), minlength=256)
        return int(sum(counts[int(v)] for v in set(np.asarray(values).ravel().tolist()) if 0 <= v <= 255))
    return int(np.count_nonzero(label_in(label, values)))
