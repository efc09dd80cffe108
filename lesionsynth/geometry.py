"""Small pure helpers for voxel/world geometry. Affines map voxel indices to world millimetres."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each stored axis."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def voxel_volume(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def crop_affine(affine: np.ndarray, start) -> np.ndarray:
    """Affine of a sub-volume that starts at voxel `start` of the volume with `affine`."""
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(start, dtype=np.float64)
    return np.asarray(affine, dtype=np.float64) @ shift


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (..., 3) points through a 4x4 affine."""
    points = np.asarray(points, dtype=np.float64)
    return points @ affine[:3, :3].T + affine[:3, 3]


def true_bounds(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box (one slice per axis) of the set voxels of `mask`, or None if none is set."""
    bounds = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not hit.size:
            return None
        bounds.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(bounds)


def structure_for(connectivity: int) -> np.ndarray:
    """3-D neighbourhood for 6-, 18- or 26-connectivity."""
    rank = {6: 1, 18: 2, 26: 3}.get(int(connectivity))
    if rank is None:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    return ndimage.generate_binary_structure(3, rank)


def ball(radius_mm: float, spacing) -> np.ndarray:
    """Ellipsoidal structuring element of `radius_mm` on a grid with `spacing`."""
    spacing = np.asarray(spacing, dtype=np.float64)
    half = np.maximum(np.floor(radius_mm / spacing).astype(int), 0)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2 + 1e-9


def coarse_stride(spacing, target_mm: float = 2.0) -> tuple[int, int, int]:
    """Per-axis stride that brings voxels to about `target_mm` (never below 1)."""
    return tuple(max(1, int(round(target_mm / s))) for s in np.asarray(spacing, dtype=np.float64))
