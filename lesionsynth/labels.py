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
    """Number of voxels whose label is one of `values`, one value at a time (one byte-sized temporary
    per voxel, where np.bincount would make an 8-byte copy of the whole volume)."""
    label = np.asarray(label)
    return int(sum(np.count_nonzero(label == v) for v in set(np.asarray(values).ravel().tolist())))
