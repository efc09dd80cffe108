"""The one physical transform of a pasted lesion: flip, rotation, scale about its centre, elastic field.

All maps go from the *target* grid to the *source* (bank crop) grid so each output voxel is
interpolated once from the source data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..geometry import spacing_of


def rotation_matrix(angles_deg) -> np.ndarray:
    """Rotation about the world x, then y, then z axis (degrees)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def forward_linear(flip, angles_deg, scale: float) -> np.ndarray:
    """3x3 linear part of the source→target world map: scale · R · F."""
    f = np.diag([-1.0 if v else 1.0 for v in flip])
    return float(scale) * rotation_matrix(angles_deg) @ f


def source_from_target(src_affine, src_centre, tgt_affine, tgt_centre, flip, angles_deg, scale) -> np.ndarray:
    """4x4 map from target voxel indices to source voxel indices (no elastic part)."""
    lin = forward_linear(flip, angles_deg, scale)
    world_inv = np.eye(4)
    world_inv[:3, :3] = np.linalg.inv(lin)
    world_inv[:3, 3] = np.asarray(src_centre) - world_inv[:3, :3] @ np.asarray(tgt_centre)
    return np.linalg.inv(np.asarray(src_affine)) @ world_inv @ np.asarray(tgt_affine)


def _donor_profile_peak(src_affine, tgt_affine, flip, angles_deg, scale) -> float:
    """The largest variance (target voxels²) of a donor's voxel profile (a box of one source voxel,
    covariance I/12 in source voxels) carried into target voxels by a paste."""
    # the inverse of source_from_target's linear part, tgt^-1 · (scale R F) · src, without its 4x4 inverses
    # (the planner asks for it on every drawn paste)
    inv = np.linalg.solve(np.asarray(tgt_affine, dtype=np.float64)[:3, :3],
                          forward_linear(flip, angles_deg, scale) @ np.asarray(src_affine, dtype=np.float64)[:3, :3])
    return float(np.linalg.eigvalsh(inv @ inv.T / 12.0).max())


def extra_blur(src_affine, tgt_affine, flip, angles_deg, scale) -> float:
    """How much blurrier (sd, target voxels) a donor lesion lands in the target than the target records: the
    donor's voxel profile carried into target voxels (`_donor_profile_peak`), less the target's own (I/12),
    along its worst direction. Upscaling a lesion or taking it from a grid that is coarser along some
    direction leaves it softer than the target's own lesions; resampling cannot sharpen it back (a coarser
    target is matched by the anti-aliasing blur instead)."""
    worst = _donor_profile_peak(src_affine, tgt_affine, flip, angles_deg, scale)
    return float(np.sqrt(max(worst - 1.0 / 12.0, 0.0)))


def largest_sharp_scale(src_affine, tgt_affine, flip, angles_deg, max_blur: float) -> float:
    """The largest scale at which `extra_blur` stays within `max_blur` (the profile's variance grows with the
    scale's square)."""
    worst = _donor_profile_peak(src_affine, tgt_affine, flip, angles_deg, 1.0)
    return float(np.sqrt((max_blur ** 2 + 1.0 / 12.0) / worst))


def lesion_extent(src_box, src_affine, src_centre, tgt_affine, tgt_centre, flip, angles_deg, scale
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) target voxel coordinates spanned by the transformed source box [[lo, hi) x3] (or crop shape)."""
    if np.ndim(src_box) == 1:  # a crop shape: the whole crop
        src_box = [[0, int(n)] for n in src_box]
    lin = forward_linear(flip, angles_deg, scale)
    lo_s = np.array([b[0] for b in src_box], dtype=float) - 0.5
    hi_s = np.array([b[1] for b in src_box], dtype=float) - 0.5
    corners = np.array([[i, j, k] for i in (lo_s[0], hi_s[0]) for j in (lo_s[1], hi_s[1])
                        for k in (lo_s[2], hi_s[2])], dtype=float)
    src_aff = np.asarray(src_affine)
    world = corners @ src_aff[:3, :3].T + src_aff[:3, 3]
    world_t = (world - np.asarray(src_centre)) @ lin.T + np.asarray(tgt_centre)
    inv_t = np.linalg.inv(np.asarray(tgt_affine))
    vox = world_t @ inv_t[:3, :3].T + inv_t[:3, 3]
    return vox.min(axis=0), vox.max(axis=0)


def target_box(extent, tgt_affine, pad_mm: float, tgt_shape) -> tuple[slice, ...] | None:
    """Target voxel box around a lesion extent (lo, hi), padded by `pad_mm`, clipped; None if outside."""
    lo_v, hi_v = extent
    pad = np.ceil(pad_mm / spacing_of(tgt_affine)).astype(int) + 1
    lo = np.maximum(np.floor(lo_v).astype(int) - pad, 0)
    hi = np.minimum(np.ceil(hi_v).astype(int) + pad + 1, np.asarray(tgt_shape))
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


@dataclass(frozen=True)
class PasteGeometry:
    """What both resampling backends need for one paste: the target box and the target→source map."""

    control: np.ndarray                     # (K, K, K, 3) elastic control displacements, mm
    extent: tuple[np.ndarray, np.ndarray]   # the transformed lesion in target voxel coordinates
    box: tuple[slice, ...]                  # target voxels to compute
    src_from_tgt: np.ndarray                # 4x4 target voxel → source voxel (without the elastic part)
    points_landing: np.ndarray | None = None  # (N, 3) where the given source points land, without the field

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.box)


def paste_geometry(src_shape, src_box, src_affine, src_centre, tgt_affine, tgt_shape, op: dict,
                   support_mm: float, src_points: np.ndarray | None = None) -> PasteGeometry | None:
    """Box and maps of one paste operation; None if the lesion would land outside the target volume.

    `src_points` (N, 3), the source voxels of the mask, tighten the box to where they land (the
    transformed crop box is up to 5x larger than the rotated lesion); the elastic field stays anchored
    to the transformed crop box, so the values do not depend on it.
    """
    control = np.asarray(op["elastic_mm"], dtype=np.float32)
    transform = (op["centre_mm"], op["flip"], op["rotation_deg"], op["scale"])
    extent = lesion_extent(src_box if src_box is not None else src_shape, src_affine, src_centre, tgt_affine,
                           *transform)
    src_from_tgt = source_from_target(src_affine, src_centre, tgt_affine, *transform)
    reach, landing = extent, None
    if src_points is not None and len(src_points):
        landing = rigid_landing(src_points, src_from_tgt)
        reach = points_extent(landing, src_from_tgt)
    box = target_box(reach, tgt_affine, elastic_pad_mm(control) + support_mm, tgt_shape)
    if box is None:
        return None
    return PasteGeometry(control, extent, box, src_from_tgt, landing)


def rigid_landing(src_points: np.ndarray, src_from_tgt: np.ndarray) -> np.ndarray:
    """(N, 3) target voxel coordinates where the source voxels `src_points` land, without the elastic field."""
    fwd = np.linalg.inv(np.asarray(src_from_tgt, dtype=np.float64))
    return np.asarray(src_points, dtype=np.float64) @ fwd[:3, :3].T + fwd[:3, 3]


def points_extent(landing: np.ndarray, src_from_tgt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) target voxel coordinates reached by source voxels landing at `landing` (N, 3, see
    `rigid_landing`), each with the one-voxel neighbourhood in which linear interpolation still sees it."""
    half = np.abs(np.linalg.inv(np.asarray(src_from_tgt, dtype=np.float64))[:3, :3]).sum(axis=1)
    return landing.min(axis=0) - half, landing.max(axis=0) + half


def elastic_pad_mm(control_mm) -> float:
    """Margin the elastic field may need: the cubic spline can overshoot its control values (by up to
    ~40 % seen on random grids), so pad by 1.5 x the largest control displacement."""
    return 1.5 * float(np.abs(np.asarray(control_mm)).max()) if np.size(control_mm) else 0.0


def elastic_weights(box, extent, k: int) -> list[np.ndarray]:
    """Per-axis (n, k) weights interpolating k control points spread over the lesion extent (not the box),
    held constant beyond it, so the field does not depend on padding or clipping at the volume edge."""
    lo_v, hi_v = extent
    weights = []
    for sl, lo, hi in zip(box, lo_v, hi_v):
        v = np.arange(sl.start, sl.stop, dtype=np.float64)
        pos = (v - lo) / (hi - lo) * (k - 1) if hi > lo else np.full(v.shape, (k - 1) / 2)
        weights.append(natural_spline_weights(np.clip(pos, 0.0, k - 1.0), k).astype(np.float32))
    return weights


@functools.lru_cache(maxsize=8)
def _natural_second_derivatives(k: int) -> np.ndarray:
    """(k, k) second derivatives at the knots of the natural cubic splines through the unit values e_j
    (zero at both ends); read only."""
    values = np.eye(k)
    second = np.zeros((k, k))
    if k > 2:
        inner = 4.0 * np.eye(k - 2) + np.eye(k - 2, k=1) + np.eye(k - 2, k=-1)
        second[1:-1] = np.linalg.solve(inner, 6.0 * (values[2:] - 2.0 * values[1:-1] + values[:-2]))
    second.setflags(write=False)
    return second


def natural_spline_weights(x: np.ndarray, k: int) -> np.ndarray:
    """(n, k) weights of the natural cubic spline through k knots at 0..k-1 evaluated at x in [0, k-1]:
    column j is the spline through the unit values e_j (scipy's CubicSpline with bc_type="natural", which
    would cost ~0.4 s of import in every worker)."""
    x = np.asarray(x, dtype=np.float64)
    if k == 1:
        return np.ones((x.size, 1))
    values, second = np.eye(k), _natural_second_derivatives(k)
    i = np.clip(np.floor(x).astype(np.int64), 0, k - 2)
    t = (x - i)[:, None]
    u = 1.0 - t
    return (u * values[i] + t * values[i + 1]
            + ((u ** 3 - u) * second[i] + (t ** 3 - t) * second[i + 1]) / 6.0)


def elastic_field(control_mm: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """Smooth displacement field (3, X, Y, Z) in mm from control-point displacements (K, K, K, 3)."""
    control = np.asarray(control_mm, dtype=np.float32)
    k = control.shape[0]
    wx = weights[0]
    small = field_yz(control, weights)
    ny, nz = small.shape[2:]
    # the big step is one batched matrix product that writes (3, X, Y, Z) in order
    return np.matmul(wx[None], small.reshape(3, k, ny * nz)).reshape(3, wx.shape[0], ny, nz)


def field_yz(control_mm: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """The field interpolated along y and z only: (3, K, Y, Z); the x weights finish it (cheap, K rows)."""
    control = np.asarray(control_mm, dtype=np.float32)
    _, wy, wz = weights
    along_z = np.tensordot(control, wz, axes=([2], [1]))       # (i, j, c, Z)
    along_yz = np.tensordot(along_z, wy, axes=([1], [1]))      # (i, c, Z, Y)
    return np.ascontiguousarray(along_yz.transpose(1, 0, 3, 2), dtype=np.float32)


def field_bound_mm(small: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """Upper bound of |displacement| (mm) per world axis over the box, from `field_yz` and the x weights."""
    peak = np.abs(small).reshape(small.shape[0], small.shape[1], -1).max(axis=2)   # (3, K)
    return (np.abs(wx).astype(np.float64) @ peak.T.astype(np.float64)).max(axis=0)


class PointMapper:
    """Source coordinates of arbitrary target voxels of one paste (the same maths as `source_coordinates`,
    elastic field included), so that only the voxels a lesion can reach are interpolated."""

    def __init__(self, geo: "PasteGeometry", tgt_affine):
        self.m = np.asarray(geo.src_from_tgt, dtype=np.float64)
        self.start = np.array([s.start for s in geo.box])
        self.small = self.wx = self.lin = None
        self.bound_mm = np.zeros(3)
        if geo.control.size:
            weights = elastic_weights(geo.box, geo.extent, geo.control.shape[0])
            self.wx, self.small = weights[0], field_yz(geo.control, weights)
            self.wx_rows = np.ascontiguousarray(self.wx.T)
            self.lin = self.m[:3, :3] @ np.linalg.inv(np.asarray(tgt_affine, dtype=np.float64)[:3, :3])
            self.bound_mm = field_bound_mm(self.small, self.wx)

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """(3, N) float32 source voxel coordinates of target voxel indices (N, 3)."""
        index = np.asarray(index, dtype=np.int64)
        coords = self.m[:3, :3] @ index.T + self.m[:3, 3:4]
        if self.small is not None:
            rel = index - self.start
            _, k, ny, nz = self.small.shape
            yz = self.small.reshape(3 * k, ny * nz).take(rel[:, 1] * nz + rel[:, 2], axis=1)  # rows (c, i)
            w = self.wx_rows.take(rel[:, 0], axis=1)
            field = yz[0::k] * w[0]  # sum over the control planes i, in order
            for i in range(1, k):
                field += yz[i::k] * w[i]
            coords += self.lin @ field
        return coords.astype(np.float32)


def source_coordinates(box, src_from_tgt: np.ndarray, field_mm: np.ndarray | None = None,
                       tgt_affine=None) -> np.ndarray:
    """Source voxel coordinates (3, X, Y, Z), float32, of every voxel in the target box."""
    m = np.asarray(src_from_tgt, dtype=np.float64)
    axes = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]
    shape = tuple(len(a) for a in axes)
    coords = np.empty((3,) + shape, dtype=np.float32)
    for r in range(3):
        coords[r] = (m[r, 3] + m[r, 0] * axes[0][:, None, None] + m[r, 1] * axes[1][None, :, None]
                     + m[r, 2] * axes[2][None, None, :])
    if field_mm is not None:
        # a displacement d (world mm) of the target point moves the source point by L·d
        lin = (m[:3, :3] @ np.linalg.inv(np.asarray(tgt_affine)[:3, :3])).astype(np.float32)
        coords += np.tensordot(lin, field_mm, axes=(1, 0))
    return coords
