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


def largest_component(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """The largest connected piece of `mask` (`structure`: the neighbourhood, default 6-connectivity); the mask
    itself when it holds one piece or none."""
    pieces, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return np.asarray(mask, dtype=bool)
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    return pieces == sizes.argmax()


def ball(radius_mm: float, spacing) -> np.ndarray:
    """Ellipsoidal structuring element of `radius_mm` on a grid with `spacing`."""
    spacing = np.asarray(spacing, dtype=np.float64)
    half = np.maximum(np.floor(radius_mm / spacing).astype(int), 0)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2 + 1e-9


def dilate_box(mask: np.ndarray, reach) -> np.ndarray:
    """Binary dilation by the box of `reach` voxels each way along each axis (voxels outside the array
    clear): `ndimage.maximum_filter(mask, size=2 * reach + 1, mode="constant")`, by shifted ORs."""
    out = np.array(mask, dtype=bool)  # a copy in the mask's own memory order
    for axis, r in enumerate(int(v) for v in np.broadcast_to(reach, (out.ndim,))):
        if r <= 0 or out.shape[axis] < 2:
            continue
        before = out.copy()
        for k in range(1, min(r, out.shape[axis] - 1) + 1):
            lo = [slice(None)] * out.ndim
            hi = [slice(None)] * out.ndim
            lo[axis], hi[axis] = slice(0, -k), slice(k, None)
            out[tuple(lo)] |= before[tuple(hi)]
            out[tuple(hi)] |= before[tuple(lo)]
    return out


def dilate(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """`ndimage.binary_dilation(mask, structure)` (voxels outside the array clear), faster for a symmetric
    3-D structure whose columns along the last axis are runs centred on the middle (a ball, the 6- or
    26-neighbourhood; None: the 6-neighbourhood): the mask is dilated along the last axis for each run
    length, and those are OR-ed at the columns' offsets, all by shifted ORs. Any other structure goes to
    ndimage."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(3, 1) if structure is None else np.asarray(structure, dtype=bool)
    if (mask.ndim != 3 or structure.ndim != 3 or np.any(np.array(structure.shape) % 2 == 0)
            or not structure.any() or not np.array_equal(structure, structure[::-1, ::-1, ::-1])):
        return ndimage.binary_dilation(mask, structure=structure)
    half = np.array(structure.shape) // 2
    runs = {}  # (offset along axis 0, along axis 1) -> half length of the run along axis 2
    for (i, j), column in np.ndenumerate(structure.any(axis=2)):
        if column:
            on = np.flatnonzero(structure[i, j])
            h = int(half[2] - on[0])
            if len(on) != 2 * h + 1:
                return ndimage.binary_dilation(mask, structure=structure)
            runs[(i - half[0], j - half[1])] = h
    mask = np.ascontiguousarray(mask)  # mixed memory orders would make every OR below a strided pass
    along = {0: mask}  # the mask dilated by [-h, h] along the last axis, by shifted ORs
    grown = mask
    for h in range(1, max(runs.values()) + 1):
        grown = grown.copy()
        grown[:, :, h:] |= mask[:, :, :-h]
        grown[:, :, :-h] |= mask[:, :, h:]
        along[h] = grown
    out = np.zeros_like(mask)
    for (di, dj), h in runs.items():
        nx, ny = mask.shape[0] - abs(di), mask.shape[1] - abs(dj)
        if nx > 0 and ny > 0:
            out[max(di, 0):max(di, 0) + nx, max(dj, 0):max(dj, 0) + ny] |= \
                along[h][max(-di, 0):max(-di, 0) + nx, max(-dj, 0):max(-dj, 0) + ny]
    return out


def within_mm(mask: np.ndarray, radius_mm: float, spacing, min_voxels: int = 2) -> np.ndarray:
    """`mask` dilated by a ball of `radius_mm` and by at least `min_voxels` voxels each way (a box): the
    surroundings that are read around a lesion must hold voxels on any grid (on a 3 mm grid 3 mm reach one
    voxel only)."""
    return dilate(mask, ball(radius_mm, spacing)) | dilate_box(mask, min_voxels)


def coarse_stride(spacing, target_mm: float = 2.0) -> tuple[int, int, int]:
    """Per-axis stride that brings voxels to about `target_mm` (never below 1)."""
    return tuple(max(1, int(round(target_mm / s))) for s in np.asarray(spacing, dtype=np.float64))
