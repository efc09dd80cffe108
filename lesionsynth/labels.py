"""Label-value membership, the test every lesion and region step repeats on label crops."""

from __future__ import annotations

import numpy as np


def label_in(label: np.ndarray, values) -> np.ndarray:
    """Boolean mask of the voxels whose label is one of `values` (in the label's own memory order).

    uint8 labels: one vectorised comparison per value for a few values (tens of times faster than a
    lookup table, which np.isin also beats only on small arrays), a lookup table for many."""
    label = np.asarray(label)
    values = np.asarray(values).ravel()
    if label.dtype == np.uint8:
        wanted = sorted({int(v) for v in values if v == int(v) and 0 <= v <= 255})
        if len(wanted) <= 8:
            out = np.zeros(label.shape, dtype=bool) if not wanted else label == wanted[0]
            for v in wanted[1:]:
                out |= label == v
            return out
        table = np.zeros(256, dtype=bool)
        table[wanted] = True
        return table.take(label)
    return np.isin(label, values)


def count_in(label: np.ndarray, values) -> int:
    """Number of voxels whose label is one of `values`, one value at a time (one byte-sized temporary
    per voxel, where np.bincount would make an 8-byte copy of the whole volume)."""
    label = np.asarray(label)
    return int(sum(np.count_nonzero(label == v) for v in set(np.asarray(values).ravel().tolist())))


def nesting_order(values: np.ndarray, spacing) -> tuple[int, ...]:
    """The label values of one multi-class lesion, outermost first: `values` is its crop of label values (0
    outside the lesion, with background around it), ordered by the mean depth (mm from the nearest voxel
    outside the lesion) of their voxels, ties by value. BraTS: oedema 2, enhancing 3, necrotic core 1."""
    values = np.asarray(values)
    present = sorted(int(v) for v in np.unique(values) if v != 0)
    if len(present) <= 1:
        return tuple(present)
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(values != 0, sampling=np.asarray(spacing, dtype=np.float64))
    mean_depth = {v: float(depth[values == v].mean()) for v in present}
    return tuple(sorted(present, key=lambda v: (mean_depth[v], v)))


def nested_masks(values: np.ndarray, order) -> list[np.ndarray]:
    """For each level k ≥ 1 of `order` (outermost first), the mask of the labels order[k:]: the lesion's
    inner parts as nested sets (each inside the one before), which resample without holes or rings."""
    return [label_in(values, tuple(order[k:])) for k in range(1, len(order))]
