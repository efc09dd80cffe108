"""Paste one bank lesion into a case: one resampling of all channels and the mask, intensity matching,
brightness and noise, feathered blending. Pure functions of (case arrays, lesion arrays, parameters)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..geometry import ball, dilate, dilate_box, largest_component, spacing_of, structure_for, true_bounds
from ..labels import label_in
from ..stats import channel_stats, flat_view
from .transform import PointMapper, paste_geometry, rigid_landing, source_from_target


class Patch:
    """New values for a box of a case; `core` marks the voxels that become lesion.

    A paste's new channel values are left to a `blend` callable that writes them into the case's channels
    when the patch is applied: the planner decides from `core` and `region_fraction` whether to keep a
    paste, so a rejected or re-scaled try never pays for interpolating and blending its channels, and a
    kept one writes only the voxels its feathered edge reaches (no copy of the box).
    """

    def __init__(self, box: tuple[slice, ...], core: np.ndarray, label: np.ndarray, channels: np.ndarray | None = None,
                 region_fraction: float = 1.0, blend=None, old_label: np.ndarray | None = None, tissue_stats=None):
        self.box = box
        self.old_label = old_label              # (X, Y, Z) the case's label in the box before (pastes)
        self.core = core                        # (X, Y, Z) bool
        self.label = label                      # (X, Y, Z) uint8
        self.region_fraction = region_fraction  # share of `core` inside the allowed region (pastes)
        self.channels = channels                # (C, X, Y, Z) float32 new values of the box, or None
        self._blend = blend                     # blend(case channels) writes the new values in place
        self._tissue_stats = tissue_stats       # tissue_stats(case channels) -> [(median, noise sd)] per channel
        self._applied = False
        self.info: dict = {}                    # what rendering found, recorded with the operation (removals)

    def tissue_stats(self, channels: np.ndarray) -> list[tuple[float, float]] | None:
        """(median, noise sd) per channel of the destination's normal tissue around a paste (what its intensity
        is matched to; the context match compares it with the donor's shell), or None for other patches.
        Ask before `apply`: it reads the case's channels as they are."""
        return None if self._tissue_stats is None else self._tissue_stats(channels)

    def apply(self, channels: np.ndarray, label: np.ndarray, undo: list | None = None) -> None:
        """Write the patch into the case arrays (once: a blend reads the channels it changes). `undo`, if
        given, gets what the box held before (`restore_patches` puts it back)."""
        if undo is not None:
            undo.append((self.box, channels[(slice(None),) + self.box].copy(), label[self.box].copy()))
        if self._blend is not None:
            if self._applied:
                raise RuntimeError("a paste's patch can be applied only once (its blend reads what it changes)")
            self._blend(channels)
            self._applied = True
        else:
            channels[(slice(None),) + self.box] = self.channels
        label[self.box] = self.label


def restore_patches(channels: np.ndarray, label: np.ndarray, undo: list) -> None:
    """Put back what the patches applied with this `undo` list changed, last first: the arrays hold exactly
    what they held before the first."""
    for box, old_channels, old_label in reversed(undo):
        channels[(slice(None),) + box] = old_channels
        label[box] = old_label
    undo.clear()


@dataclass(frozen=True)
class PasteSettings:
    """Fixed (not random) settings of pasting."""

    is_ct: tuple[bool, ...]
    feather_mm: float = 0.5
    halo_mm: float = 3.0   # beyond the lesion's body: where its modelled partial-volume tail is written (alpha 1)
    label_from_intensity: bool = True  # the label's edge follows the lesion's half level (`intensity_cut`)


def feather_support_mm(settings: "PasteSettings") -> float:
    """How far the feathered alpha reaches beyond the soft mask: the halo, then the feather (gaussian_filter
    truncates at 4 sigma)."""
    return settings.halo_mm + 4.0 * settings.feather_mm


#: Side (voxels) of the bricks that mark where a transformed lesion can land.
BRICK = 2
#: Voxels of the first estimate the lesion must stay clear of (else the rigorous bound is used).
GUARD = 1


def lesion_box(shape, src_box=None) -> np.ndarray:
    """(3, 2) int64 [lo, hi) per axis of the lesion in its crop: `src_box` (the bank's mask_box), or the
    whole crop of `shape` if it is None."""
    return np.array(src_box if src_box is not None else [[0, n] for n in shape], dtype=np.int64).reshape(-1, 2)


def box_slices(box: np.ndarray) -> tuple[slice, ...]:
    """The slices of a (3, 2) [lo, hi) box."""
    return tuple(slice(int(a), int(b)) for a, b in box)


def mask_voxels(src_mask: np.ndarray, src_box=None) -> np.ndarray:
    """Source voxel indices (N, 3) of the mask's non-zero voxels (searching `src_box` only, if given)."""
    box = lesion_box(src_mask.shape, src_box)
    # a contiguous copy of the box and flat indices: faster than np.argwhere on the strided view
    inside = np.ascontiguousarray(src_mask[box_slices(box)])
    flat = np.flatnonzero(inside)
    points = np.empty((flat.size, 3), dtype=np.int64)
    for axis, index in enumerate(np.unravel_index(flat, inside.shape)):
        points[:, axis] = index + box[axis, 0]
    return points


def landing_points(points: np.ndarray, src_mask: np.ndarray, src_box, geo, mapper: PointMapper, block: int,
                   rigid: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Target positions (N, 3) where the mask's voxels `points` land, elastic field included, and the extra
    reach (in source voxels) each position stands for. `rigid`, if given, is `rigid_landing` of `points`.

    With `block` > 1 the mask is summarised by block x block x block cells (any voxel set; the cell centre
    is within (block - 1) / 2 voxel of each). The elastic part is one fixed-point step
    (t = t0 - A^-1 L d(t0)), close but not exact: callers check the result against a guard band.
    """
    extra = 0.0
    if block > 1:
        box = lesion_box(src_mask.shape, src_box)
        origin = box[:, 0].astype(np.float64)
        cells = _block_any(src_mask[box_slices(box)] > 0, block)
        points = np.argwhere(cells) * block + origin + (block - 1) / 2.0
        extra = (block - 1) / 2.0
    fwd = np.linalg.inv(geo.src_from_tgt)
    land = rigid if block == 1 and rigid is not None else rigid_landing(points, geo.src_from_tgt)
    if mapper.small is not None and len(land):
        start = np.array([s.start for s in geo.box])
        at = np.clip(np.rint(land).astype(np.int64), start, start + np.array(geo.shape) - 1)
        at_src = geo.src_from_tgt[:3, :3] @ at.T + geo.src_from_tgt[:3, 3:4]  # `at` in the source, rigidly
        land = land - (fwd[:3, :3] @ (mapper(at).astype(np.float64) - at_src)).T
    return land, extra


def _block_any(mask: np.ndarray, block: int) -> np.ndarray:
    """Whether any voxel is set in each block x block x block cell (the last cells may be partial)."""
    pad = [(0, (-n) % block) for n in mask.shape]
    m = np.pad(mask, pad) if any(p for _, p in pad) else mask
    cells = None
    for offset in np.ndindex(*(block,) * m.ndim):  # OR of the strided sub-grids (a reshaped any is slower)
        part = m[tuple(slice(o, None, block) for o in offset)]
        cells = part.copy() if cells is None else cells | part
    return cells


def brick_grid(land: np.ndarray, geo, margin_vox: np.ndarray) -> np.ndarray:
    """Bricks (BRICK voxels a side) of the box within `margin_vox` of the `land` positions (N, 3)."""
    start = np.array([s.start for s in geo.box])
    n_bricks = -(-np.array(geo.shape) // BRICK)
    cells = np.clip(np.floor(land).astype(np.int64) - start, 0, np.array(geo.shape) - 1) // BRICK
    bricks = np.zeros(tuple(n_bricks), dtype=bool)
    bricks[tuple(cells.T)] = True
    return dilate_box(bricks, np.ceil(margin_vox / BRICK).astype(int))


def brick_voxels(origins: np.ndarray, geo) -> np.ndarray:
    """Target voxel indices (N, 3) of the bricks whose first voxels are `origins` (absolute, (B, 3)), brick
    by brick (not in C order); voxels of bricks that stick out of the box's far faces are left out."""
    within = np.indices((BRICK,) * 3).reshape(3, -1)
    # built axis by axis as (3, B, BRICK**3): broadcasting over a trailing axis of 3 is several times slower
    voxels = np.empty((3, len(origins), within.shape[1]), dtype=np.int64)
    for axis in range(3):
        np.add(origins[:, axis, None], within[axis][None, :], out=voxels[axis])
    voxels = voxels.reshape(3, -1)
    keep = None
    for axis, s in enumerate(geo.box):
        if (s.stop - s.start) % BRICK:
            inside = voxels[axis] < s.stop
            keep = inside if keep is None else keep & inside
    if keep is not None:
        voxels = voxels.take(np.flatnonzero(keep), axis=1)
    return voxels.T


def brick_spread(mapper: PointMapper) -> np.ndarray:
    """Per source axis, how far (source voxels) the coordinates of a brick's voxels can lie from its
    reference point: the mapped first voxel shifted by half a voxel along each target axis.

    The linear part moves them by at most half a voxel step per axis; the elastic part by at most its
    largest change over one voxel step along each target axis (`elastic_step_bound`). The small constant
    covers float32 rounding of the computed coordinates."""
    spread = 0.5 * (BRICK - 1) * np.abs(mapper.m[:3, :3]).sum(axis=1)
    if mapper.small is not None:
        spread = spread + (BRICK - 1) * 1.001 * elastic_step_bound(mapper.small, mapper.wx, mapper.lin).sum(axis=0)
    return spread + 1e-3


def elastic_step_bound(small: np.ndarray, wx: np.ndarray, lin: np.ndarray) -> np.ndarray:
    """(3 target axes, 3 source axes): bounds of how much the elastic part of the source coordinates
    (`lin` @ field) changes over one voxel step along each target axis anywhere in the box.

    The field is sum_i wx[x, i] * small[:, i, y, z]. Along y and z, each control plane i contributes its
    largest step times |wx[x, i]|; along x, the weights' steps sum to zero (the spline weights sum to
    one), so each plane contributes its largest distance from the planes' mid-range at its (y, z)."""
    planes = np.einsum("rc,cikl->rikl", lin, small.astype(np.float64))  # (3, K, Y, Z) source voxels
    wx = wx.astype(np.float64)
    bound = np.zeros((3, 3))
    if wx.shape[0] > 1:
        mid = 0.5 * (planes.max(axis=1) + planes.min(axis=1))
        spread = np.abs(planes - mid[:, None]).reshape(3, planes.shape[1], -1).max(axis=2)  # (3, K)
        bound[0] = (np.abs(np.diff(wx, axis=0)) @ spread.T).max(axis=0)
    for axis in (1, 2):
        if planes.shape[axis + 1] > 1:
            step = np.abs(np.diff(planes, axis=axis + 1)).reshape(3, planes.shape[1], -1).max(axis=2)
            bound[axis] = (np.abs(wx) @ step.T).max(axis=0)
    return bound


def sample_mask(mask: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation (float32) of a 0/1 lesion mask at source coordinates (3, N), zero outside the
    crop. Read on the mask's own bytes (no float copy). Where all 8 corners of a point's cell are set the
    value is exactly 1.0 (scipy sums the weights in float64), where none is, exactly 0.0."""
    mask = np.asarray(mask)
    return ndimage.map_coordinates(mask.view(np.uint8) if mask.dtype == bool else mask, coords, output=np.float32,
                                   order=1, mode="constant", cval=0.0, prefilter=False)


#: Mask voxels the planner's pre-check maps per draw (every k-th of a larger lesion).
SAMPLE_POINTS = 4000


class PreparedMask:
    """What every paste of one bank lesion needs from its mask, each part made on first use and then kept:
    the mask's voxels and a summed-area table of it (the bank keeps recently used ones, see `Bank.derived`)."""

    def __init__(self, mask: np.ndarray, src_box=None):
        self.mask, self.src_box = mask, src_box
        self.box = lesion_box(mask.shape, src_box)  # (3, 2) [lo, hi) of the lesion in the crop
        self._points = self._table = None
        self._sample = None

    def centred_sample_mm(self, src_affine: np.ndarray, centroid_mm, max_points: int) -> np.ndarray:
        """(N, 3) world mm, less the lesion's `centroid_mm`, of every k-th mask voxel, at most about
        `max_points` of them (the planner's pre-check maps these on every draw of the lesion); kept."""
        if self._sample is None or self._sample[0] != max_points:
            pts = self.points
            if len(pts) > max_points:
                pts = pts[:: len(pts) // max_points + 1]
            src_affine = np.asarray(src_affine)
            world = pts @ src_affine[:3, :3].T + src_affine[:3, 3]
            self._sample = (max_points, world - np.asarray(centroid_mm))
        return self._sample[1]

    @property
    def points(self) -> np.ndarray:
        """Source voxel indices (N, 3) of the mask."""
        if self._points is None:
            self._points = mask_voxels(self.mask, self.src_box).astype(np.int32)
        return self._points

    def count_in_boxes(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Set mask voxels in each box [lo, hi] (inclusive source voxel indices, (3, N) each, any values)."""
        if self._table is None:  # summed-area table over the lesion's box, zero row first on each axis
            table = np.zeros(tuple(int(b - a) + 1 for a, b in self.box), dtype=np.int32)
            sums = table[1:, 1:, 1:]
            sums[...] = self.mask[box_slices(self.box)] > 0
            # plane by plane along the first two axes: several times faster than cumsum along them
            for i in range(1, sums.shape[0]):
                sums[i] += sums[i - 1]
            for j in range(1, sums.shape[1]):
                sums[:, j] += sums[:, j - 1]
            np.cumsum(sums, axis=2, out=sums)
            self._table = table
        size = np.array(self._table.shape)[:, None] - 1
        a = np.clip(lo - self.box[:, :1], 0, size)       # table corners: voxels [a, b) of the box
        b = np.clip(hi - self.box[:, :1] + 1, 0, size)
        b = np.maximum(a, b)
        flat = self._table.reshape(-1)
        strides = np.array(self._table.strides) // self._table.itemsize
        total = np.zeros(lo.shape[1], dtype=np.int64)
        for corner in np.ndindex(2, 2, 2):
            at = sum(np.where(c, b[i], a[i]) * strides[i] for i, c in enumerate(corner))
            sign = 1 if (3 - sum(corner)) % 2 == 0 else -1
            total += sign * flat.take(at)
        return total

    @property
    def nbytes(self) -> int:
        """Bytes it holds once all parts are made (the bank's cache budget counts this)."""
        shape = self.box[:, 1] - self.box[:, 0]
        n = int(np.count_nonzero(self.mask))
        return 12 * n + 24 * min(n, SAMPLE_POINTS) + 4 * int(np.prod(shape + 1))


def soft_on_bricks(bricks: np.ndarray, geo, mapper: PointMapper, prepared: PreparedMask
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(target voxels (N, 3), soft values (N,)) of the voxels of the set `bricks` where the mask reads > 0.

    Each brick is classed first from one mapped point: if the source box its voxels can read from
    (`brick_spread` plus one voxel, the reach of linear interpolation) holds no mask voxel, all read 0; if
    it is all mask, all read exactly 1 (see `sample_mask`). Only the bricks on the mask's edge are mapped
    and sampled voxel by voxel, so the cost follows the lesion's surface, not its volume.
    """
    origins = np.argwhere(bricks) * BRICK + np.array([s.start for s in geo.box])
    centre_shift = 0.5 * (BRICK - 1) * mapper.m[:3, :3].sum(axis=1)
    ref = mapper(origins).astype(np.float64) + centre_shift[:, None]
    # a voxel's value depends on the 8 corners of its interpolation cell, all within 1 of its coordinate
    reach = brick_spread(mapper)[:, None] + 1.0
    lo, hi = np.ceil(ref - reach).astype(np.int64), np.floor(ref + reach).astype(np.int64)
    count = prepared.count_in_boxes(lo, hi)
    full = count == np.prod(hi - lo + 1, axis=0)
    edge = (count > 0) & ~full
    edge_voxels = brick_voxels(origins[edge], geo)
    values = sample_mask(prepared.mask, mapper(edge_voxels))
    hit = values > 0
    full_voxels = brick_voxels(origins[full], geo)
    return (np.concatenate([edge_voxels[hit], full_voxels]),
            np.concatenate([values[hit], np.ones(len(full_voxels), dtype=np.float32)]))


def support_reach(support_mm: float, tgt_affine) -> np.ndarray:
    """Voxels per axis that `support_mm` spans on the target grid (rounded up)."""
    return np.ceil(support_mm / spacing_of(tgt_affine)).astype(int)


def support_box(box, lo, hi, reach) -> tuple[slice, ...]:
    """`box` shrunk to the voxels [lo, hi] (inclusive, absolute) grown by `reach` voxels."""
    return tuple(slice(max(s.start, int(a) - int(r)), min(s.stop, int(b) + int(r) + 1))
                 for s, a, b, r in zip(box, lo, hi, reach))


def estimated_landing(prepared: PreparedMask, src_affine, src_centre, tgt_affine, tgt_shape, op: dict,
                      support_mm: float):
    """(geometry, point mapper, estimated target positions (N, 3) of the mask's voxels, their extra reach)
    of one paste, or None if it misses the volume (see `landing_points`)."""
    points, mask, src_box = prepared.points, prepared.mask, prepared.src_box
    geo = paste_geometry(mask.shape, src_box, src_affine, src_centre, tgt_affine, tgt_shape, op, support_mm, points)
    if geo is None or not len(points):
        return None
    mapper = PointMapper(geo, tgt_affine)
    land, extra = landing_points(points, mask, src_box, geo, mapper, 2 if len(points) > 20000 else 1,
                                 geo.points_landing)
    return geo, mapper, land, extra


def resample_mask(src_mask: np.ndarray, src_affine, src_centre, tgt_affine, tgt_shape, op: dict, src_box=None,
                  support_mm: float = 0.0, prepared: PreparedMask | None = None, land_check=None
                  ) -> tuple[tuple[slice, ...], np.ndarray, PointMapper] | None:
    """The lesion's soft mask on the target grid: (box, soft mask, point mapper) or None if it misses.

    The box holds the soft mask (> 0) grown by `support_mm` (all that blending reads); the mapper gives
    the source coordinates of any target voxel, for interpolating the channels where they are needed.
    Only target voxels the lesion can reach are computed, so the cost follows the lesion's volume, not
    its bounding box. `land_check(positions)`, if given, sees the estimated target positions (N, 3) of
    the mask's voxels first; when it returns False nothing is resampled and the result is None.
    """
    prepared = prepared if prepared is not None else PreparedMask(src_mask, src_box)
    landing = estimated_landing(prepared, src_affine, src_centre, tgt_affine, tgt_shape, op, support_mm)
    if landing is None:
        return None
    geo, mapper, land, extra = landing
    if land_check is not None and not land_check(land):
        return None
    points = prepared.points
    fwd = np.abs(np.linalg.inv(geo.src_from_tgt)[:3, :3]).sum(axis=1)  # target voxels per source voxel step
    # First try: bricks around where the mask lands with the elastic field (a close estimate), keeping a
    # guard band; if the lesion reaches the guard band, redo it with the rigorous bound of the field.
    bricks = brick_grid(land, geo, fwd * (1.0 + extra) + 1.01 + GUARD)
    active, values = soft_on_bricks(bricks, geo, mapper, prepared)
    inner = ~dilate_box(~bricks, 1)  # erosion, bricks outside the box counting as set
    cells = (active - np.array([s.start for s in geo.box])) // BRICK
    if not len(active) or not inner[tuple(cells.T)].all():
        tgt_inv = np.abs(np.linalg.inv(np.asarray(tgt_affine, dtype=np.float64)[:3, :3]))
        # a source voxel is seen one voxel around it; the elastic field moves it by at most bound_mm
        rigid = geo.points_landing if geo.points_landing is not None else rigid_landing(points, geo.src_from_tgt)
        bricks = brick_grid(rigid, geo, fwd + tgt_inv @ mapper.bound_mm + 1.01)
        active, values = soft_on_bricks(bricks, geo, mapper, prepared)
    if not len(active):
        return None
    box = support_box(geo.box, active.min(axis=0), active.max(axis=0), support_reach(support_mm, tgt_affine))
    start = np.array([s.start for s in box])
    soft = np.zeros(tuple(s.stop - s.start for s in box), dtype=np.float32)
    soft[tuple((active - start).T)] = values
    return box, soft, mapper


#: Margin (voxels) of the spline coefficients around a lesion crop: cubic B-splines read 2 voxels each way.
SPLINE_PAD = 2


def spline_coefficients(src_image: np.ndarray) -> np.ndarray:
    """(C, X+4, Y+4, Z+4) float32 cubic B-spline coefficients of a lesion crop's channels, with a margin of
    SPLINE_PAD voxels: the crop is extended by repeating its edge voxels, so that a spline read anywhere in
    [0, n-1] on each axis needs no boundary rule.

    Channels are resampled with cubic B-splines, not linearly: linear interpolation at sub-voxel offsets
    blurs (it averages 8 voxels), which lowers a small lesion's contrast and softens its edge a second time
    after the blur of its own acquisition, and that is what told pasted lesions from real ones (README)."""
    pad = SPLINE_PAD
    out = np.empty((src_image.shape[0],) + tuple(int(n) + 2 * pad for n in src_image.shape[1:]), dtype=np.float32)
    for c in range(src_image.shape[0]):
        extended = np.pad(np.asarray(src_image[c], dtype=np.float64), pad + 2, mode="edge")
        coeffs = ndimage.spline_filter(extended, order=3, mode="nearest", output=np.float64)
        out[c] = coeffs[2:-2, 2:-2, 2:-2]
    return out


def clipped_coordinates(coords: np.ndarray, crop_shape, dtype=np.float64) -> np.ndarray:
    """Source voxel coordinates (3, N) clipped to the crop: reads beyond it give its edge values (mode
    "nearest")."""
    out = np.empty(coords.shape, dtype=dtype)
    for axis, n in enumerate(crop_shape):
        np.clip(coords[axis], 0.0, float(n - 1), out=out[axis])
    return out


def spline_coordinates(coords: np.ndarray, crop_shape) -> np.ndarray:
    """Source voxel coordinates (3, N) clipped to the crop (`clipped_coordinates`) and moved into the padded
    coefficient array."""
    out = clipped_coordinates(coords, crop_shape)
    out += SPLINE_PAD
    return out


#: Smallest anti-aliasing blur (source voxels, sd) worth applying; below it the crop is used as it is.
MIN_ANTIALIAS_SD = 0.25


def antialias_sd(src_affine, tgt_affine, op: dict) -> np.ndarray:
    """Per source axis, the gaussian sd (source voxels) that turns the donor's voxel profile into the target's.

    A scanner voxel measures the mean over the voxel. Where a target voxel covers more of the source than a
    source voxel does (a coarser target grid, or a lesion shrunk by its scale), sampling the source at points
    would leave the lesion sharper and brighter than that grid records lesions: the donor is blurred first by
    what the target's box profile adds to its own (covariances M M^T / 12 - I / 12, M the linear map from
    target to source voxels; only the positive part, per source axis). Upsampling adds nothing."""
    m = source_from_target(src_affine, np.zeros(3), tgt_affine, np.zeros(3), op["flip"], op["rotation_deg"],
                           op["scale"])[:3, :3]
    extra = (m @ m.T - np.eye(3)) / 12.0
    values, vectors = np.linalg.eigh(extra)
    positive = (vectors * np.clip(values, 0.0, None)) @ vectors.T
    return np.sqrt(np.clip(np.diag(positive), 0.0, None))


def antialiased_crop(src_image: np.ndarray, src_affine, tgt_affine, op: dict) -> np.ndarray:
    """The donor crop a paste reads its channels from: as it is, or blurred by `antialias_sd` first when the
    target grid is coarser."""
    sd = antialias_sd(src_affine, tgt_affine, op)
    if sd.max() < MIN_ANTIALIAS_SD:
        return src_image
    blurred = np.empty(src_image.shape, dtype=np.float32)
    for c in range(src_image.shape[0]):
        ndimage.gaussian_filter(np.asarray(src_image[c], dtype=np.float32), sigma=sd, output=blurred[c], mode="nearest")
    return blurred


def paste_coefficients(src_image: np.ndarray, src_affine, tgt_affine, op: dict, coefficients=None,
                       crop: np.ndarray | None = None) -> np.ndarray:
    """The spline coefficients a paste reads its channels from: of the donor crop as it is (`coefficients`:
    those coefficients, or a callable that gives them, e.g. from a worker's cache; None: made here), or of the
    crop blurred by `antialias_sd` first when the target grid is coarser (`crop`: `antialiased_crop`, if made)."""
    crop = antialiased_crop(src_image, src_affine, tgt_affine, op) if crop is None else crop
    if crop is src_image:
        if callable(coefficients):
            return coefficients()
        return spline_coefficients(src_image) if coefficients is None else coefficients
    return spline_coefficients(crop)


def sample_channels(src_image: np.ndarray, mapper: PointMapper, voxels: np.ndarray,
                    coefficients: np.ndarray | None = None) -> np.ndarray:
    """(C, N) float32: the lesion's channels (cubic B-spline, edge values beyond the crop) at target voxels
    (N, 3). `coefficients` is `spline_coefficients(src_image)`, if made already."""
    coeffs = spline_coefficients(src_image) if coefficients is None else coefficients
    return cubic_read(coeffs, spline_coordinates(mapper(voxels), src_image.shape[1:]))


#: Points read together by `cubic_read`: the gathers of a block stay in the processor's cache.
CUBIC_BLOCK = 2048


def cubic_bspline_weights(t: np.ndarray) -> np.ndarray:
    """(4, N) float32 cubic B-spline weights of the nodes floor(x) - 1 ... floor(x) + 2 for the fractional
    parts `t` = x - floor(x) (N,); they sum to one."""
    t = t.astype(np.float32)
    s = np.float32(1.0) - t
    w = np.empty((4, t.size), dtype=np.float32)
    w[0] = s * s * s / np.float32(6.0)
    w[3] = t * t * t / np.float32(6.0)
    w[1] = np.float32(2.0 / 3.0) - t * t * (np.float32(1.0) - t / np.float32(2.0))
    w[2] = np.float32(1.0) - w[0] - w[1] - w[3]
    return w


def cubic_read(coeffs: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """(C, N) float32 cubic B-spline values of `coeffs` (C, X, Y, Z) at coordinates (3, N) whose 4 x 4 x 4
    nodes all lie inside the array (`spline_coordinates` into `spline_coefficients` ensure it).

    The same values as scipy's map_coordinates(order=3, prefilter=False), to float32 rounding, in one half to
    two thirds of the time for a lesion's two channels (measured): the node offsets and the tensor-product
    weights of a block of points are made once for all channels, and there is no boundary rule per node."""
    n_channels, shape = coeffs.shape[0], coeffs.shape[1:]
    flat = coeffs.reshape(n_channels, -1)
    strides = (shape[1] * shape[2], shape[2], 1)
    nodes = np.arange(-1, 3, dtype=np.intp)[:, None]
    out = np.empty((n_channels, coords.shape[1]), dtype=np.float32)
    for lo in range(0, coords.shape[1], CUBIC_BLOCK):
        block = coords[:, lo:lo + CUBIC_BLOCK]
        n = block.shape[1]
        base = np.floor(block)
        w = [cubic_bspline_weights(block[a] - base[a]) for a in range(3)]
        at = [(base[a].astype(np.intp) + nodes) * strides[a] for a in range(3)]  # (4, n) offsets per axis
        index = at[0][:, None, None, :] + at[1][None, :, None, :] + at[2][None, None, :, :]  # (4, 4, 4, n)
        w_yz = w[1][:, None, :] * w[2][None, :, :]  # (4, 4, n)
        for c in range(n_channels):
            values = flat[c].take(index)
            values *= w_yz
            along_x = values.reshape(4, 16, n).sum(axis=1)
            along_x *= w[0]
            along_x.sum(axis=0, out=out[c, lo:lo + n])
    return out


def sample_channels_linear(crop: np.ndarray, mapper: PointMapper, voxels: np.ndarray) -> np.ndarray:
    """(C, N) float32: the crop's channels, linearly interpolated (edge values beyond the crop), at target
    voxels (N, 3)."""
    coords = clipped_coordinates(mapper(voxels), crop.shape[1:], np.float32)
    out = np.empty((crop.shape[0], len(voxels)), dtype=np.float32)
    for c in range(crop.shape[0]):
        ndimage.map_coordinates(crop[c], coords, output=out[c], order=1, mode="nearest", prefilter=False)
    return out


def resample_lesion(src_image: np.ndarray, src_mask: np.ndarray, src_affine, src_centre, tgt_affine, tgt_shape,
                    op: dict, src_box=None, support_mm: float = 0.0, prepared: PreparedMask | None = None,
                    coefficients: np.ndarray | None = None
                    ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray] | None:
    """Resample the lesion's channels and mask onto the target grid: (box, channels, soft mask) or None.
    `coefficients`: the crop's `spline_coefficients`, if made already (blurred here when the paste needs it).

    As `resample_mask`, with the channels interpolated on the whole support: the soft mask (> 0) grown
    by `support_mm` (zero elsewhere). `paste_patch` interpolates fewer voxels (only where the feathered
    alpha reaches); this dense form is what the torch twin is compared with.
    """
    resampled = resample_mask(src_mask, src_affine, src_centre, tgt_affine, tgt_shape, op, src_box, support_mm,
                              prepared)
    if resampled is None:
        return None
    box, soft, mapper = resampled
    reach = support_reach(support_mm, tgt_affine)
    support = soft > 0
    if reach.max() > 0:
        support = dilate_box(support, reach)
    channels = np.zeros((src_image.shape[0],) + soft.shape, dtype=np.float32)
    coefficients = paste_coefficients(src_image, src_affine, tgt_affine, op, coefficients)
    channels[:, support] = sample_channels(src_image, mapper, np.argwhere(support) + [s.start for s in box],
                                           coefficients)
    return box, channels, soft


@dataclass
class Resampled:
    """A lesion resampled onto a case, as `paste_patch` uses it (from `resample_on_cpu` or its torch twin)."""

    box: tuple[slice, ...]  # the box of `soft` in the case
    soft: np.ndarray        # (X, Y, Z) float32 soft mask, > 0 where the lesion reaches
    lesion_values: object   # lesion_values(flat box indices (N,), linear=None) -> (C, N) float32 resampled
    #                         channels; `linear` (N,) bool: voxels read by linear interpolation, not cubic
    mapper: object          # mapper() -> the paste's PointMapper (target voxels to source coordinates)


def resample_on_cpu(lesion_image: np.ndarray, prepared: PreparedMask, src_affine, src_centre, tgt_affine,
                    tgt_shape, op: dict, support_mm: float, land_check=None, coefficients=None) -> Resampled | None:
    """The numpy/scipy resampling of a paste (`resample_mask`): the soft mask now, the channels later and only
    at the voxels asked for (the anti-aliasing blur of the crop, if the paste needs one, is made once, on the
    first ask). None if the lesion misses the volume or fails `land_check`."""
    resampled = resample_mask(prepared.mask, src_affine, src_centre, tgt_affine, tgt_shape, op, prepared.src_box,
                              support_mm, prepared, land_check)
    if resampled is None:
        return None
    box, soft, mapper = resampled
    start, shape = np.array([s.start for s in box]), soft.shape
    made = {}

    def lesion_values(idx, linear=None):
        # each voxel is interpolated once per method: the label's edge (`intensity_cut`) asks for some voxels
        # first, the blend for them again with the rest of the feather (the torch twin reads the same way)
        if not made:
            made["crop"] = antialiased_crop(lesion_image, src_affine, tgt_affine, op)
            for kind in ("cubic", "linear"):
                made[kind] = (np.empty((lesion_image.shape[0], soft.size), dtype=np.float32),
                              np.zeros(soft.size, dtype=bool))
        linear = np.zeros(idx.size, dtype=bool) if linear is None else np.asarray(linear, dtype=bool)
        out = np.empty((lesion_image.shape[0], idx.size), dtype=np.float32)
        for kind, part, read in (("cubic", ~linear, cubic), ("linear", linear, by_line)):
            values, known = made[kind]
            wanted = idx[part]
            missing = wanted[~known[wanted]]
            if missing.size:
                values[:, missing] = read(np.column_stack(np.unravel_index(missing, shape)) + start)
                known[missing] = True
            out[:, part] = values[:, wanted]
        return out

    def cubic(voxels):
        if "coefficients" not in made:
            made["coefficients"] = paste_coefficients(lesion_image, src_affine, tgt_affine, op, coefficients,
                                                      made["crop"])
        return sample_channels(lesion_image, mapper, voxels, made["coefficients"])

    def by_line(voxels):
        return sample_channels_linear(made["crop"], mapper, voxels)

    return Resampled(box, soft, lesion_values, lambda: mapper)


def crop_to_support(box, channels: np.ndarray, soft: np.ndarray, support_mm: float, tgt_affine):
    """(box, channels, soft) cut down to the soft mask (> 0) grown by `support_mm`, as `resample_lesion`
    returns them (the torch path computes its whole box); None if the soft mask is empty."""
    nz = true_bounds(soft > 0)
    if nz is None:
        return None
    start = np.array([s.start for s in box])
    lo = start + [s.start for s in nz]
    hi = start + [s.stop - 1 for s in nz]
    new = support_box(box, lo, hi, support_reach(support_mm, tgt_affine))
    local = tuple(slice(n.start - s, n.stop - s) for n, s in zip(new, start))
    return new, channels[(slice(None),) + local], soft[local]


#: Smallest feathered alpha that is written. The faint outer layers matter little to the image but are where
#: the tissue levels of the intensity match are read (RING_ALPHA): cutting them at 0.01 raised the realism
#: AUC on native brains from 0.65 to 0.80.
MIN_ALPHA = 1e-6


def feather(soft: np.ndarray, spacing, settings: PasteSettings) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices, alpha) of the box voxels the feathered alpha reaches (alpha > MIN_ALPHA).

    The alpha is 1 on every voxel the soft mask touches and on a halo of `halo_mm` around them, then falls off
    with a gaussian of `feather_mm`: the lesion's partial-volume tail (`blend_lesion`) is written in full, and
    the fall-off lies beyond it in normal tissue, not across the lesion's edge, where a second blur would lower
    its contrast and widen its spread."""
    spacing = np.asarray(spacing, dtype=np.float64)
    grown = soft > 0
    if settings.halo_mm > 0:
        grown = dilate(grown, ball(settings.halo_mm, spacing))
    alpha = ndimage.gaussian_filter(grown.astype(np.float32), sigma=settings.feather_mm / spacing, mode="constant")
    idx = np.flatnonzero(alpha > MIN_ALPHA)
    return idx, np.clip(alpha.ravel()[idx], 0.0, 1.0)


#: Share of white noise's sd that cubic B-spline resampling at random sub-voxel offsets keeps (measured: 0.80-0.82;
#: linear interpolation keeps 0.48-0.55): how much of the donor's own noise a pasted lesion still carries.
SPLINE_NOISE_KEPT = 0.8
#: Fewest tissue voxels around a paste from which the donor's resampled tissue level is read.
MIN_RING_VOXELS = 10
#: The ring the tissue levels are read on: written tissue voxels of alpha below this (the feather, past the halo).
RING_ALPHA = 0.03


#: Gaussian (sd, voxels) whose low-pass the destination's texture under a paste is taken from (`destination_texture`).
TEXTURE_LOWPASS_VOX = 2.0


def destination_texture(box_values: np.ndarray, at: np.ndarray, white: np.ndarray) -> np.ndarray:
    """(N,) noise of unit spread with the destination's own texture at the flat box indices `at`: the high-pass
    of its values there (`box_values` minus their gaussian low-pass, TEXTURE_LOWPASS_VOX), over its robust sd.
    The noise a paste adds to its body then has the scanner's spatial correlation (white noise was whiter than
    the scanner's, inside the lesion); `white` (N,) where too few voxels give no spread."""
    values = np.asarray(box_values, dtype=np.float32)
    high = (values - ndimage.gaussian_filter(values, TEXTURE_LOWPASS_VOX)).reshape(-1)[at]
    spread = 1.4826 * float(np.median(np.abs(high - np.median(high)))) if high.size >= 8 else 0.0
    return high / np.float32(spread) if spread > 0 else white


#: Widths (sd, mm) of the gaussian point-spread functions a pasted lesion's partial-volume tail is fitted with.
TAIL_PSF_MM = (0.3, 0.45, 0.6, 0.8, 1.0, 1.3)


def tail_shapes(body: np.ndarray, spacing) -> list[np.ndarray]:
    """The lesion's body (bool, over its box) blurred by each gaussian of TAIL_PSF_MM (float32): the shapes a
    scanner gives the partial-volume tail around it, following the label's outline."""
    spacing = np.asarray(spacing, dtype=np.float64)
    body = np.asarray(body, dtype=np.float32)
    return [ndimage.gaussian_filter(body, sd / spacing, mode="constant") for sd in TAIL_PSF_MM]


#: Share of the donor's own partial-volume detail (its excess less the fitted tail) kept on the first voxel ring
#: around the body. The smooth tail lacks the voxel-to-voxel spread a real lesion's first ring has (how much
#: of each voxel the lesion covers); the donor's ring holds it, with the donor's noise. Strong critic on
#: native brains, seeds 0/1/2: 0.80/0.79/0.81 with none, 0.77/0.78/0.71 with 0.3, 0.78/0.78/0.70 with 0.4,
#: 0.82 (seed 0) with 0.7; on two rings 0.83-0.84; a per-paste Wiener share 0.87-0.93.
FIRST_RING_DONOR_SHARE = 0.3


def fitted_tail(excess: np.ndarray, shapes: list[np.ndarray]) -> np.ndarray:
    """(N,) the tail that fits `excess` (N,) best in least squares as a sum of `shapes` ((N,) each, read at the
    same voxels) with weights of one sign (that of the excess along their sum; scipy's non-negative least
    squares): the tail may be sharp and wide at once, and changes smoothly with the donor's values (a choice of
    one shape would jump between them). Zeros for fewer than 8 voxels."""
    from scipy.optimize import nnls

    tail = np.zeros(excess.shape, dtype=np.float32)
    if excess.size < 8 or not shapes:
        return tail
    basis = np.stack(shapes, axis=1).astype(np.float64)
    excess = excess.astype(np.float64)
    sign = 1.0 if float(excess @ basis.sum(axis=1)) >= 0 else -1.0
    weights, _ = nnls(basis, sign * excess)
    return (sign * (basis @ weights)).astype(np.float32)


def blend_lesion(channels: np.ndarray, box: tuple[slice, ...], lesion_values, soft: np.ndarray, tissue: np.ndarray,
                 spacing, src_stats: list[dict], op: dict, settings: PasteSettings, dest_stats=None,
                 core: np.ndarray | None = None) -> None:
    """Intensity-match, brighten and add noise to the lesion's channels and write them into the case's
    `channels` (C, X, Y, Z), in place, within `box` (the box of `soft` and `tissue`).

    `lesion_values(idx, linear)` gives the resampled lesion channels (C, N) at flat box indices (cubic, or
    linear where `linear`); it is asked only for the voxels the feathered alpha reaches, and only those voxels
    are written. `dest_stats`, if given, is
    `channel_stats(channels, tissue, box start)` computed already.

    MR channels are scaled by (destination tissue median / donor tissue median), both read on the same
    voxels: the `tissue` voxels of the feather around the paste (beyond the halo), in the destination and in
    the resampled donor crop. The lesion thus keeps its contrast to the tissue right around it.

    The lesion's body (`core`, the voxels its label marks; else soft mask >= 0.5) takes the donor's values,
    with noise added only as far as the destination's noise (× `noise_gain`) exceeds what the donor's own
    noise keeps after resampling; that noise has the destination's texture (`destination_texture`). Around
    the body the destination keeps its own values, noise and anatomy, and gets only the lesion's
    partial-volume tail: the body blurred by gaussian point-spread functions, fitted to the donor's excess
    over the tissue level there (`fitted_tail`), and on the first voxel ring FIRST_RING_DONOR_SHARE of the
    donor's own detail beyond that fit. Writing the donor's voxels around the body (as before) put
    the donor's noise beside the destination's, a seam inside the tissue that a texture-aware critic found at
    once, and cut the tail off where that rim ended.
    """
    idx, a = feather(soft, spacing, settings)
    noise = np.random.default_rng(int(op["noise_seed"])).standard_normal(size=idx.size, dtype=np.float32)
    start = [s.start for s in box]
    if dest_stats is None:
        dest_stats = channel_stats(channels, tissue, start)
    body_box = (soft >= 0.5) if core is None else np.asarray(core, dtype=bool)
    body = body_box.reshape(-1)[idx]
    shapes = [shape.reshape(-1)[idx[~body]] for shape in tail_shapes(body_box, spacing)]
    first_ring = (dilate(body_box, structure_for(26)) & ~body_box).reshape(-1)[idx[~body]]
    # around the body only the tail's fit reads the donor: linear interpolation is enough there (on most of the
    # voxels a paste writes, at an eighth of the cubic spline's cost)
    lesion = lesion_values(idx, ~body)
    # normal tissue the paste writes, beyond the halo: there the resampled donor holds no more of its lesion's
    # partial volume, which would otherwise set its tissue level too bright (FLAIR) and dim the lesion
    ring = tissue.reshape(-1)[idx] & (a < RING_ALPHA)
    ijk = [i + s0 for i, s0 in zip(np.unravel_index(idx, soft.shape), start)]
    use_ring = np.count_nonzero(ring) >= MIN_RING_VOXELS
    offsets = {}
    for c in range(channels.shape[0]):
        channel = channels[c]
        flat = None
        if channel.flags.c_contiguous or channel.flags.f_contiguous:
            flat, steps = flat_view(channel)  # a view: writes reach the case
            key = tuple(steps.tolist())
            if key not in offsets:
                offsets[key] = sum(i * st for i, st in zip(ijk, steps))  # the voxels in the channel's memory order
            at = offsets[key]
            d = flat[at]
        else:  # an unusual layout: index it voxel by voxel
            d = channel[tuple(ijk)]
        dest_ref, dest_noise = dest_stats[c]
        src_ref = src_stats[c]["shell"]["median"]
        src_ref = float(src_stats[c]["lesion"]["median"]) if src_ref is None else float(src_ref)
        values = lesion[c]
        if use_ring:  # both levels read on the same voxels
            src_ref, dest_ref = float(np.median(values[ring])), float(np.median(d[ring]))
        gain = 1.0
        if settings.is_ct[c] or not np.isfinite(dest_ref):
            ref = src_ref  # CT keeps Hounsfield units
        else:
            scale_ok = src_ref > 1e-6 and dest_ref > 1e-6
            gain = dest_ref / src_ref if scale_ok else 1.0
            values = values * np.float32(gain) if scale_ok else values + np.float32(dest_ref - src_ref)
            ref = dest_ref
        brightness = float(op["brightness"][c])
        values = np.float32(ref) + np.float32(brightness) * (values - np.float32(ref))
        kept = SPLINE_NOISE_KEPT * abs(gain * brightness) * float(src_stats[c].get("noise_sd") or 0.0)
        wanted = float(op["noise_gain"]) * float(dest_noise)
        written = np.empty_like(d)
        extra = np.float32(np.sqrt(max(wanted * wanted - kept * kept, 0.0)))
        noisy = values[body] + extra * destination_texture(channel[box], idx[body], noise[body])
        written[body] = d[body] + a[body] * (noisy - d[body])
        excess = values[~body] - np.float32(ref)
        tail = fitted_tail(excess, shapes)
        tail[first_ring] += np.float32(FIRST_RING_DONOR_SHARE) * (excess[first_ring] - tail[first_ring])
        written[~body] = d[~body] + a[~body] * tail
        if flat is not None:
            flat[at] = written
        else:
            channel[tuple(ijk)] = written


def label_soft(soft: np.ndarray, box, mapper: PointMapper, src_mask: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """The soft mask a paste's label is cut from (at 0.5): `soft` itself, or, where the target grid is coarser
    than the donor's (`sd`, the paste's `antialias_sd`), the donor mask blurred like its channels and read at
    the same voxels.

    A scanner records a small lesion on a coarse grid as a lower, wider blob whose half-level region is
    smaller than the lesion; the real labels of such grids follow that. Cutting the unblurred mask would give
    the pasted lesion a label larger than its visible extent there."""
    if sd.max() < MIN_ANTIALIAS_SD:
        return soft
    blurred = ndimage.gaussian_filter(np.asarray(src_mask, dtype=np.float32), sigma=sd, mode="constant")
    at = np.nonzero(soft > 0)
    voxels = np.column_stack(at) + np.array([s.start for s in box])
    out = np.zeros_like(soft)
    out[at] = ndimage.map_coordinates(blurred, mapper(voxels), output=np.float32, order=1, mode="constant",
                                      cval=0.0, prefilter=False)
    return out


#: The band of the resampled mask (soft values) where the label's edge is decided by the lesion's intensity.
CUT_BAND = (0.2, 0.8)
#: Smallest contrast-to-noise ratio (lesion level - shell level, in noise sd) of a channel that the lesion
#: fraction is read from.
MIN_FRACTION_CNR = 1.0


def channel_levels(stats: list[dict], min_cnr: float = MIN_FRACTION_CNR) -> list[tuple[int, float, float, float]]:
    """(channel, tissue level, lesion level − tissue level, noise sd) of each channel whose contrast-to-noise is
    at least `min_cnr`. The lesion level is the plateau: its median, or, for a small lesion whose median is
    pulled towards the tissue by its partial-volume edge, its 95th (5th, for a dark lesion) percentile less the
    noise's share of it."""
    out = []
    for c, st in enumerate(stats):
        shell, lesion, noise = st["shell"]["median"], st["lesion"], float(st.get("noise_sd") or 0.0)
        if shell is None or lesion.get("median") is None or noise <= 0:
            continue
        sign = 1.0 if lesion["median"] >= shell else -1.0
        extreme = lesion["p95"] if sign > 0 else lesion["p5"]
        plateau = lesion["median"] + sign * max(sign * (extreme - lesion["median"]) - 1.645 * noise, 0.0)
        delta = plateau - shell
        if abs(delta) >= min_cnr * noise:
            out.append((c, shell, delta, noise))
    return out


def lesion_fraction(values: np.ndarray, stats: list[dict]) -> np.ndarray | None:
    """Per voxel (N,), how far the donor's resampled values (C, N) lie from its surrounding tissue level (0)
    towards its lesion level (1, `channel_levels`), channels weighted by their contrast-to-noise ratio squared;
    None if no channel has a contrast of MIN_FRACTION_CNR noise sd."""
    total = weight = None
    for c, shell, delta, noise in channel_levels(stats):
        w = (delta / noise) ** 2
        part = w * (values[c].astype(np.float64) - shell) / delta
        total, weight = (part, w) if total is None else (total + part, weight + w)
    return None if total is None else total / weight


def intensity_cut(cut: np.ndarray, lesion_values, stats: list[dict]) -> np.ndarray:
    """The soft mask the label is cut from (at 0.5), its edge moved onto the lesion's intensity.

    Resampling a 0/1 mask and cutting it at 0.5 gives a staircase that misses the lesion's visible edge by up
    to half a voxel (rotated, deformed or regridded), so the label takes in some edge voxels of tissue and
    leaves out some of lesion: a wider spread inside the pasted label than real labels have, which are
    drawn on the lesion's intensity. In the band where the resampled mask is undecided (CUT_BAND), as many
    voxels as the mask's cut would keep there are kept, but those of the highest lesion fraction
    (`lesion_fraction` of the donor's resampled intensities): the label keeps its size and follows the
    lesion's edge."""
    band = (cut >= CUT_BAND[0]) & (cut < CUT_BAND[1])
    idx = np.flatnonzero(band)
    if not idx.size:
        return cut
    fraction = lesion_fraction(lesion_values(idx), stats)
    if fraction is None:
        return cut
    keep = int(np.count_nonzero(cut.reshape(-1)[idx] >= 0.5))
    order = np.argsort(-fraction, kind="stable")
    inside = np.zeros(idx.size, dtype=bool)
    inside[order[:keep]] = True
    out = cut.copy()
    # inside the band only: the label cannot grow onto a neighbouring lesion or shrink the lesion's core
    out.reshape(-1)[idx] = np.where(inside, np.float32(0.5), np.float32(0.49))
    return out


#: A voxel on the edge of a pasted body holds a tissue of the donor's surroundings, not lesion, when its donor
#: values (`channel_fractions`, 0 = the donor's tissue level, 1 = its lesion level) disagree between channels:
#: partial volume with the tissue around the lesion moves every channel's fraction alike, partial volume with
#: another tissue (CSF beside a periventricular lesion: grey on FLAIR, dark on T1) does not. Such a voxel has
#: a fraction below FOREIGN_FRACTION on some channel and FOREIGN_SPREAD more on another, beyond three noise sd
#: of that difference; with one channel only, a value beyond the tissue level on the far side from the
#: lesion (three noise sd). Channels of contrast-to-noise below FOREIGN_MIN_CNR are not read.
FOREIGN_FRACTION = 0.25
FOREIGN_SPREAD = 0.5
FOREIGN_MIN_CNR = 3.0
#: Voxel layers of the body's edge that test can take off.
FOREIGN_LAYERS = 2


def channel_fractions(values: np.ndarray, stats: list[dict], min_cnr: float = MIN_FRACTION_CNR
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """((K, N) fractions, (K,) noise sd in fraction units): per channel of contrast-to-noise ≥ `min_cnr`
    (`channel_levels`), how far the donor's resampled values (C, N) lie from its tissue level (0) towards its
    lesion level (1); None if no channel qualifies."""
    levels = channel_levels(stats, min_cnr)
    if not levels:
        return None
    return (np.array([(values[c].astype(np.float64) - shell) / delta for c, shell, delta, _ in levels]),
            np.array([noise / abs(delta) for _, _, delta, noise in levels]))


def foreign_tissue(values: np.ndarray, stats: list[dict]) -> np.ndarray | None:
    """(N,) whether the donor's values (C, N) at a lesion's edge read as another tissue than lesion and its
    surroundings (see FOREIGN_FRACTION); None when no channel can tell."""
    read = channel_fractions(values, stats, FOREIGN_MIN_CNR)
    if read is None:
        return None
    fractions, noise_share = read
    if len(fractions) == 1:
        return fractions[0] < -3.0 * noise_share[0]
    low = fractions.min(axis=0)
    spread = fractions.max(axis=0) - low
    return (low < FOREIGN_FRACTION) & (spread > FOREIGN_SPREAD + 3.0 * np.sqrt(2.0) * noise_share.max())


def without_foreign_edge(core: np.ndarray, lesion_values, stats: list[dict]) -> np.ndarray:
    """`core` less the voxels of its edge (up to FOREIGN_LAYERS layers, 6-neighbours of the outside) whose donor
    values read as another tissue (`foreign_tissue`): a donor lesion beside a ventricle has a face of lesion
    and CSF mixed inside its label; pasted away from the ventricle that face was a square notch of tissue
    inside the label. The body and its label now end where the donor's lesion does; the voxels taken off get
    the partial-volume tail like the rest around the body. The largest 26-connected piece is kept."""
    out = core.copy()
    for _ in range(FOREIGN_LAYERS):
        idx = np.flatnonzero(out & dilate(~out))
        if not idx.size:
            break
        foreign = foreign_tissue(lesion_values(idx), stats)
        if foreign is None or not foreign.any():
            break
        out.reshape(-1)[idx[foreign]] = False
    return largest_component(out, structure_for(26)) if out.any() else core


def keep_main_body(soft: np.ndarray) -> np.ndarray:
    """The soft mask of the largest connected piece of the lesion only.

    A bank lesion is one connected component, but rotation, scaling and the elastic field can leave
    slivers whose soft value crosses 0.5 apart from the body: they would become detached 1-3 voxel
    "lesions". Keep the largest 26-connected piece of soft >= 0.5 and the soft fringe within 2 voxels
    of it (for the feathered edge); zero the rest. Only the pieces' bounding box is labelled.
    """
    core = soft >= 0.5
    inner = true_bounds(core)
    if inner is None:
        return soft
    pieces, n = ndimage.label(core[inner], structure=np.ones((3, 3, 3), dtype=bool), output=np.intp)
    if n <= 1:
        return soft
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    # the body's 2-voxel neighbourhood lies within the pieces' box grown by 2
    outer = tuple(slice(max(i.start - 2, 0), min(i.stop + 2, size)) for i, size in zip(inner, soft.shape))
    within = tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))
    body = np.zeros(tuple(s.stop - s.start for s in outer), dtype=bool)
    body[within] = pieces == sizes.argmax()
    other = np.zeros_like(body)
    other[within] = pieces > 0
    other &= ~body
    near = dilate_box(body, 2)  # = two 3x3x3 dilations
    out = np.zeros_like(soft)
    out[outer] = np.where(near & ~other, soft[outer], np.float32(0.0))
    return out


#: An inner part of a donor counts as wrapped by the part just outside it when at most this share of the voxels
#: around it (6-neighbours) lies outside that part; a paste then keeps it wrapped.
WRAPPED_SHARE = 0.05


def wrapped_parts(label_values: np.ndarray, order) -> list[bool]:
    """For each inner level k ≥ 1 of `order` (outermost first), whether the donor's labels order[k:] are wrapped
    by order[k - 1] (`WRAPPED_SHARE`): BraTS' core inside a closed enhancing rim, that inside the oedema."""
    from ..labels import nested_masks

    parts = [np.asarray(label_values) != 0] + nested_masks(label_values, order)
    out = []
    for outer, inner in zip(parts[:-1], parts[1:]):
        around = dilate(inner) & ~inner
        out.append(bool(np.count_nonzero(around & ~outer) <= WRAPPED_SHARE * max(np.count_nonzero(around), 1)))
    return out


def nested_label_values(core: np.ndarray, box, mapper: PointMapper, label_values: np.ndarray, order,
                        sd: np.ndarray) -> np.ndarray:
    """(X, Y, Z) uint8 labels of a pasted multi-class lesion over its box (0 outside `core`).

    `label_values` is the donor crop's label values, `order` its labels outermost first. Each inner part (the
    labels order[k:], `labels.nested_masks`) is resampled like the mask, with the same mapping and the same
    anti-aliasing blur (`sd`, see `label_soft`), and cut within the part outside it, so the parts stay nested
    (no hole of an outer value inside an inner part, no ring of an inner value outside it). As for the outer
    edge (`intensity_cut`), a part keeps the voxels that read ≥ CUT_BAND[1] and, of its partial-volume band
    (CUT_BAND), those of highest value, as many as give it the donor's share of the lesion: cutting a small
    part at 0.5 after a rotation shrinks it more than the whole. A part the donor wraps in the one outside it
    (`wrapped_parts`: a closed rim of enhancing tumour around the core) stays wrapped: where resampling left
    no voxel of the outer part between it and a part further out, that voxel joins the outer part (a rim one
    voxel thick stays closed), or, where the outer part may not be (beyond the lesion, or where it is wrapped
    in turn), the inner part gives the voxel up."""
    from ..labels import nested_masks

    idx = np.flatnonzero(core)
    voxels = np.column_stack(np.unravel_index(idx, core.shape)) + np.array([s.start for s in box])
    coords = mapper(voxels)
    out = np.where(core, np.uint8(order[0]), np.uint8(0))
    parts = nested_masks(label_values, order)
    donor_share = [np.count_nonzero(part) / max(np.count_nonzero(label_values), 1) for part in parts]
    outer, outer_allowed = core, core  # the part outside the next one, and where that part may be
    for level, outer_level, part, share, wrapped in zip(order[1:], order[:-1], parts, donor_share,
                                                        wrapped_parts(label_values, order)):
        if sd.max() >= MIN_ANTIALIAS_SD:
            part = ndimage.gaussian_filter(part.astype(np.float32), sigma=sd, mode="constant")
        soft = np.zeros(core.shape, dtype=np.float32)
        soft.reshape(-1)[idx] = sample_mask(part, coords)
        inner = outer & (soft >= CUT_BAND[1])
        band = np.flatnonzero(outer & (soft >= CUT_BAND[0]) & (soft < CUT_BAND[1]))
        wanted = int(round(share * idx.size)) - int(np.count_nonzero(inner))
        if wanted > 0 and band.size:
            chosen = band[np.argsort(-soft.reshape(-1)[band], kind="stable")[:wanted]]
            inner.reshape(-1)[chosen] = True
        if wrapped:
            gap = dilate(inner) & ~outer & outer_allowed
            outer = outer | gap
            out[gap] = outer_level
            inner &= ~dilate(~outer)
        outer_allowed = outer & ~dilate(~outer) if wrapped else outer
        outer = inner
        out[inner] = level
    return out


def outer_part_stats(lesion_meta: dict) -> list[dict]:
    """The lesion's per-channel stats with its `lesion` statistics read on its outermost label: a multi-class
    lesion meets the tissue with that part (BraTS: the oedema), so its edge is cut on that part's level."""
    by_label, order = lesion_meta.get("stats_by_label"), lesion_meta.get("label_order")
    if not by_label or not order:
        return lesion_meta["stats"]
    return [dict(st, lesion=parts[str(order[0])]) for st, parts in zip(lesion_meta["stats"], by_label)]


def paste_patch(channels: np.ndarray, label: np.ndarray, affine: np.ndarray, lesion_image: np.ndarray,
                lesion_mask: np.ndarray, lesion_meta: dict, op: dict, lesion_labels, region_fn,
                settings: PasteSettings, prepared: PreparedMask | None = None, land_check=None,
                coefficients=None, resample=None, label_values: np.ndarray | None = None) -> Patch | None:
    """Everything a paste changes, as a Patch (the case arrays are not modified); None if it misses the volume
    or fails `land_check` (see `resample_mask`).

    `region_fn(label_crop, start)` gives the allowed-region mask of a box, used to pick local tissue.
    `coefficients`: the crop's spline coefficients or a callable giving them (see `paste_coefficients`).
    `resample`: how the lesion is resampled onto the case (`resample_on_cpu`, the default, or its torch twin;
    `render.backend.lesion_resampler` picks one from the device).
    `label_values`: a multi-class lesion's crop of label values (`Bank.lesion_label_values`); the pasted label
    then keeps its inner parts (`nested_label_values`), else every lesion voxel takes `op["label_value"]`.
    The channel values are blended by `apply`, from and into the channels it is given (`channels` here
    only keeps the signature of `inpaint_patch`); apply it before the case arrays change otherwise.
    """
    src_affine = np.asarray(lesion_meta["affine"], dtype=np.float64)
    prepared = prepared if prepared is not None else PreparedMask(lesion_mask, lesion_meta.get("mask_box"))
    resampled = (resample or resample_on_cpu)(
        lesion_image, prepared, src_affine, lesion_meta["centroid_mm"], affine, label.shape, op,
        feather_support_mm(settings), land_check, coefficients)
    if resampled is None:
        return None
    box, soft, lesion_values = resampled.box, resampled.soft, resampled.lesion_values
    sd = antialias_sd(src_affine, affine, op)
    cut = soft
    if sd.max() >= MIN_ANTIALIAS_SD:
        cut = label_soft(soft, box, resampled.mapper(), lesion_mask, sd)
    if settings.label_from_intensity:
        cut = intensity_cut(cut, lesion_values, outer_part_stats(lesion_meta) if label_values is not None
                            else lesion_meta["stats"])
    body = keep_main_body(cut)
    soft = np.where((soft > 0) & (body == 0), np.float32(0.0), soft)  # the pieces keep_main_body left out
    core = body >= 0.5
    if not core.any():
        return None
    if label_values is None:  # the parts of a multi-class lesion differ by channel by nature
        core = without_foreign_edge(core, lesion_values, lesion_meta["stats"])
    dest_label = np.ascontiguousarray(label[box])  # the box's own masks are C-ordered: no mixed-order passes
    region = region_fn(dest_label, [s.start for s in box])
    new_label = dest_label.copy()
    if label_values is not None:
        new_label[core] = nested_label_values(core, box, resampled.mapper(), label_values, lesion_meta["label_order"],
                                              sd)[core]
    else:
        new_label[core] = int(op["label_value"])

    tissue = (soft < 0.02) & ~label_in(dest_label, lesion_labels) & region
    known = {}

    def tissue_stats(case_channels: np.ndarray) -> list[tuple[float, float]]:
        if "stats" not in known:  # the planner's context match and the blend read the same channels
            known["stats"] = channel_stats(case_channels, tissue, [s.start for s in box])
        return known["stats"]

    def blend(case_channels: np.ndarray) -> None:
        blend_lesion(case_channels, box, lesion_values, soft, tissue, spacing_of(affine), lesion_meta["stats"], op,
                     settings, tissue_stats(case_channels), core)

    return Patch(box, core, new_label, region_fraction=float(region[core].mean()), blend=blend, old_label=dest_label,
                 tissue_stats=tissue_stats)
