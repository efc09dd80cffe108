"""Where lesions may go: allowed region, lesion likelihood map, placement density and sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .geometry import apply_affine, coarse_stride, crop_affine, dilate, largest_component, spacing_of, voxel_volume
from .labels import label_in

#: Default physical size of the coarse grid used for regions and placement (mm).
COARSE_MM = 2.0


def is_ct(channel_name: str) -> bool:
    """CT channels keep Hounsfield units; nnU-Net calls them "CT"."""
    return channel_name.strip().upper() == "CT"


def coarse_affine(affine: np.ndarray, stride) -> np.ndarray:
    """Affine of the grid obtained by taking every `stride`-th voxel."""
    scaled = np.asarray(affine, dtype=np.float64).copy()
    scaled[:3, :3] = scaled[:3, :3] * np.asarray(stride, dtype=np.float64)
    return scaled


def body_foreground(channel: np.ndarray, channel_name: str) -> np.ndarray:
    """Body mask of a (coarse) channel: threshold, close, fill holes, keep the largest component.

    CT: above -500 HU (holes filling puts lungs and bowel gas back in). MR: above 10 % of the
    robust intensity range, which keeps dark tissue such as CSF once holes are filled.
    """
    if is_ct(channel_name):
        mask = channel > -500
    else:
        lo, hi = np.percentile(channel, [1, 99])
        mask = channel > lo + 0.1 * (hi - lo)
    mask = ndimage.binary_closing(mask, iterations=2, border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    return largest_component(mask)


@dataclass
class Region:
    """The allowed region of one case: exact from region labels, else a coarse body mask."""

    stride: tuple[int, int, int]
    coarse: np.ndarray  # bool mask on the coarse grid
    region_labels: tuple[int, ...]

    def contains(self, label: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Whether full-resolution voxel indices (N, 3) lie in the region."""
        index = np.asarray(index)
        if self.region_labels:
            return label_in(label[tuple(index.T)], self.region_labels)
        c = np.minimum(index // np.asarray(self.stride), np.asarray(self.coarse.shape) - 1)
        return self.coarse[tuple(c.T)]

    def mask_in(self, label_crop: np.ndarray, start) -> np.ndarray:
        """Region mask over a full-resolution crop that starts at voxel `start`."""
        if self.region_labels:
            return label_in(label_crop, self.region_labels)
        if 0 in label_crop.shape:
            return np.zeros(label_crop.shape, dtype=bool)
        grids = [np.minimum((np.arange(n) + s) // st, m - 1)
                 for n, s, st, m in zip(label_crop.shape, start, self.stride, self.coarse.shape)]
        # the coarse block under the crop, repeated along one axis at a time (cheaper than one 3-D gather)
        block = self.coarse[tuple(slice(int(g[0]), int(g[-1]) + 1) for g in grids)]
        for axis, g in enumerate(grids):
            block = block.take(g - g[0], axis=axis)
        return block


def allowed_region(channels: np.ndarray, label: np.ndarray, affine: np.ndarray, channel_names,
                   region_labels=()) -> Region:
    """Region label(s) if given and present, else the body foreground of the first channel."""
    stride = coarse_stride(spacing_of(affine), COARSE_MM)
    sl = tuple(slice(None, None, s) for s in stride)
    region_labels = tuple(int(v) for v in region_labels)
    if region_labels:
        coarse = label_in(label[sl], region_labels)
        if coarse.any():
            return Region(stride, coarse, region_labels)
    return Region(stride, body_foreground(channels[0][sl], channel_names[0]), ())


# --- likelihood map -----------------------------------------------------------------------------------

@dataclass
class Grid:
    shape: tuple[int, int, int]
    affine: np.ndarray


def reference_grid(grids: list[Grid], spacing_mm: float = 2.0) -> tuple[Grid, bool]:
    """The likelihood map's grid: the shared grid when all cases agree, else an RAS grid over their union."""
    first = grids[0]
    if all(g.shape == first.shape and np.allclose(g.affine, first.affine, atol=1e-3) for g in grids):
        return first, True
    corners = []
    for g in grids:
        ext = np.array(g.shape) - 1
        box = np.array([[i, j, k] for i in (0, ext[0]) for j in (0, ext[1]) for k in (0, ext[2])])
        corners.append(apply_affine(g.affine, box))
    corners = np.concatenate(corners)
    lo, hi = corners.min(axis=0) - spacing_mm, corners.max(axis=0) + spacing_mm
    shape = tuple(int(np.ceil(v)) + 1 for v in (hi - lo) / spacing_mm)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = lo
    return Grid(shape, affine), False


def splat(accumulator: np.ndarray, ref_affine: np.ndarray, world: np.ndarray, weight: float) -> None:
    """Add `weight` at the reference voxel nearest to each world point (points outside are dropped)."""
    idx = np.rint(apply_affine(np.linalg.inv(ref_affine), world)).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < np.array(accumulator.shape)), axis=1)
    np.add.at(accumulator, tuple(idx[ok].T), weight)


def finish_likelihood(lesion_sum: np.ndarray, region_hits: np.ndarray, ref_affine: np.ndarray,
                      sigma_mm: float, floor: float) -> np.ndarray:
    """Gaussian-smooth the lesion sum, add a floor inside the allowed region, normalise to a max of 1."""
    spacing = spacing_of(ref_affine)
    smooth = ndimage.gaussian_filter(lesion_sum.astype(np.float32), sigma=sigma_mm / spacing, mode="constant")
    region = region_hits > 0
    peak = float(smooth.max())
    out = np.where(region, smooth, 0.0) if region.any() else smooth
    if peak > 0:
        out = out / peak
    out = np.where(region, np.maximum(out, floor), out)
    return out.astype(np.float32)


def region_world_points(region: Region, affine: np.ndarray) -> np.ndarray:
    """World coordinates of the coarse region voxels (for the likelihood map's floor)."""
    idx = np.argwhere(region.coarse)
    return apply_affine(coarse_affine(affine, region.stride), idx)


# --- context match ------------------------------------------------------------------------------------

#: Hounsfield units that count as one unit of context distance on CT channels (MR channels: log ratio).
CT_CONTEXT_HU = 700.0


def tissue_signature(medians, intensity_ref, ct_channels) -> np.ndarray | None:
    """Per channel, a tissue's median in units of its case's intensity reference (MR; gain-free) or in HU (CT);
    None if a value is missing."""
    out = []
    for median, ref, ct in zip(medians, intensity_ref, ct_channels):
        if median is None or not np.isfinite(median):
            return None
        if ct:
            out.append(float(median))
        elif ref is None or ref <= 0 or median <= 0:
            return None
        else:
            out.append(float(median) / float(ref))
    return np.array(out, dtype=np.float64)


def signature_distances(values: np.ndarray, signature: np.ndarray, ct_channels) -> np.ndarray:
    """Per voxel (columns of `values`, (C, N), in signature units), how unlike it is a tissue signature: the
    largest per-channel difference, |log ratio| on MR channels (inf for a value ≤ 0), |difference| /
    CT_CONTEXT_HU on CT channels."""
    worst = np.zeros(values.shape[1])
    for v, s, ct in zip(np.asarray(values, dtype=np.float64), signature, ct_channels):
        if ct:
            dist = np.abs(v - s) / CT_CONTEXT_HU
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                dist = np.where(v > 0, np.abs(np.log(v / s)), np.inf)
        np.maximum(worst, dist, out=worst)
    return worst


def context_distance(destination: np.ndarray | None, donor: np.ndarray | None, ct_channels) -> float:
    """How unlike two tissue signatures are (`signature_distances`; 0 = alike; inf if either is missing)."""
    if destination is None or donor is None:
        return float("inf")
    return float(signature_distances(np.asarray(destination, dtype=np.float64)[:, None], donor, ct_channels)[0])


def matching_fraction(values: np.ndarray, intensity_ref, donor: np.ndarray | None, ct_channels,
                      tolerance: float) -> float:
    """Share of voxels (columns of `values`, (C, N), the case's own intensities) whose every channel lies within
    `tolerance` of the donor's signature (the per-voxel form of `context_distance`): how much of what a lesion
    would cover is tissue of the kind it grew in. 0 if the donor's signature is unknown, 1 for no voxel."""
    if donor is None:
        return 0.0
    if values.shape[1] == 0:
        return 1.0
    units = np.array([1.0 if ct else float(ref) for ref, ct in zip(intensity_ref, ct_channels)])
    scaled = np.asarray(values, dtype=np.float64) / units[:, None]
    return float(np.mean(signature_distances(scaled, donor, ct_channels) <= tolerance))


#: The local host test (`local_host_match`): a covered voxel is of the host tissue when every channel lies within
#: this (|log ratio| on MR channels, |difference| / CT_CONTEXT_HU on CT) of the host level around it; the host
#: level is found by mean shift with half of it as bandwidth.
LOCAL_TOLERANCE = 0.1
#: ... or this many noise sd on a channel, if wider (a noisy scan; the noise as `stats.channel_stats` reads it).
LOCAL_NOISE_SD = 3.0


def signature_units(values: np.ndarray, ct_channels) -> np.ndarray:
    """(C, N) values in the units of `signature_distances`: log on MR channels (nan for a value ≤ 0), HU /
    CT_CONTEXT_HU on CT channels."""
    out = np.empty(np.shape(values), dtype=np.float64)
    for c, (v, ct) in enumerate(zip(np.asarray(values, dtype=np.float64), ct_channels)):
        if ct:
            out[c] = v / CT_CONTEXT_HU
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                out[c] = np.where(v > 0, np.log(np.where(v > 0, v, 1.0)), np.nan)
    return out


#: Points a mode is found from at most (an even spread of them): enough for a level to a small fraction of the
#: bandwidth, and the mean shift runs once per drawn paste.
MODE_POINTS = 512


def mode_of(units: np.ndarray, bandwidth: float, iterations: int = 20) -> np.ndarray | None:
    """The mode (C,) of points (C, N) by mean shift (Gaussian kernel of `bandwidth`, all channels jointly) from
    their median: the level of the tissue most of them belong to (the median of two tissues is neither)."""
    units = units[:, np.all(np.isfinite(units), axis=0)]
    if units.shape[1] == 0:
        return None
    if units.shape[1] > MODE_POINTS:
        units = units[:, np.linspace(0, units.shape[1] - 1, MODE_POINTS).astype(np.int64)]
    mode = np.median(units, axis=1)
    scale = -0.5 / bandwidth ** 2
    for _ in range(iterations):
        diff = units - mode[:, None]
        w = np.exp(scale * np.einsum("cn,cn->n", diff, diff))
        total = w.sum()
        if total <= 0:
            break
        step = diff @ w / total
        mode = mode + step
        if np.abs(step).max() < 1e-3 * bandwidth:
            break
    return mode


def local_host_match(covered: np.ndarray, surroundings: np.ndarray, ct_channels,
                     tolerance: float = LOCAL_TOLERANCE, noise_sd=None) -> float | None:
    """Share of the `covered` voxels ((C, N) values) that lie within `tolerance` (every channel, signature units)
    of the host tissue of their `surroundings` ((C, M) values of the same case near them, `mode_of`), or within
    LOCAL_NOISE_SD times the noise (`noise_sd`, (C,) in the channels' own units, if given) where that is wider.
    Local, so a scanner's bias field (10-20 % across a head) does not let one tissue pass for another as a
    case-wide reference does. None when the surroundings give no level; 1 for no covered voxel."""
    if covered.shape[1] == 0:
        return 1.0
    mode = mode_of(signature_units(surroundings, ct_channels), tolerance / 2.0)
    if mode is None:
        return None
    allowed = np.full(mode.shape, float(tolerance))
    if noise_sd is not None:
        units = np.array([1.0 / CT_CONTEXT_HU if ct else float(np.exp(-m)) for m, ct in zip(mode, ct_channels)])
        allowed = np.maximum(allowed, LOCAL_NOISE_SD * np.nan_to_num(np.asarray(noise_sd, dtype=np.float64)) * units)
    with np.errstate(invalid="ignore"):
        inside = np.all(np.abs(signature_units(covered, ct_channels) - mode[:, None]) <= allowed[:, None], axis=0)
    return float(np.mean(inside))


def donor_signature(lesion_meta: dict, source_case: dict | None, ct_channels) -> np.ndarray | None:
    """The tissue signature of a bank lesion's own surroundings (its shell in its source case)."""
    ref = (source_case or {}).get("intensity_ref")
    if ref is None:
        return None
    return tissue_signature([st["shell"]["median"] for st in lesion_meta["stats"]], ref, ct_channels)


# --- placement ----------------------------------------------------------------------------------------

@dataclass
class PlacementDensity:
    """A sampling distribution over coarse voxels of one target case."""

    affine: np.ndarray          # coarse grid affine
    cdf: np.ndarray             # cumulative weights of the coarse voxels `flat` (last = 1)
    shape: tuple[int, int, int]
    fallback: str | None        # why the likelihood map was not used, if it was not
    flat: np.ndarray | None = None  # flat coarse indices the cdf runs over (None: all of them, in order)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """A world point: a coarse voxel by weight, then uniform within that voxel."""
        at = int(np.searchsorted(self.cdf, rng.random(), side="right"))
        at = min(at, self.cdf.size - 1)
        flat = at if self.flat is None else int(self.flat[at])
        idx = np.array(np.unravel_index(flat, self.shape), dtype=np.float64)
        idx += rng.uniform(-0.5, 0.5, size=3)
        return apply_affine(self.affine, idx)


def on_grid(values_shape, values_affine: np.ndarray, shape, affine: np.ndarray) -> bool:
    """Whether a map of `values_shape` on `values_affine` already lies on the grid (shape, affine)."""
    return shape is not None and tuple(shape) == tuple(values_shape) and np.allclose(values_affine, affine, atol=1e-3)


def likelihood_on(target_affine: np.ndarray, target_shape, likelihood: np.ndarray,
                  ref_affine: np.ndarray) -> np.ndarray:
    """Resample a map on a reference grid (the likelihood map, a tissue prior; linear) onto a target grid."""
    if on_grid(likelihood.shape, ref_affine, target_shape, target_affine):
        return likelihood
    to_ref = np.linalg.inv(ref_affine) @ target_affine
    return ndimage.affine_transform(likelihood, to_ref[:3, :3], offset=to_ref[:3, 3], output_shape=tuple(target_shape),
                                    order=1, mode="constant", cval=0.0, prefilter=False)


def coarse_likelihood(stride, affine: np.ndarray, shape, coarse_shape, likelihood: np.ndarray,
                      likelihood_affine: np.ndarray, within: np.ndarray | None = None) -> np.ndarray:
    """The likelihood map (or another map on a reference grid) on the coarse grid (every `stride`-th voxel) of
    a case grid (affine, shape; None: not known); with `within` (a bool mask of that coarse grid), only there
    (zero elsewhere): what placement reads."""
    if on_grid(likelihood.shape, likelihood_affine, shape, affine):
        # a strided view would slow every pass over it
        return np.ascontiguousarray(likelihood[tuple(slice(None, None, s) for s in stride)])
    if within is None:
        return likelihood_on(coarse_affine(affine, stride), coarse_shape, likelihood, likelihood_affine)
    to_ref = np.linalg.inv(likelihood_affine) @ coarse_affine(affine, stride)
    at = np.flatnonzero(within)
    out = np.zeros(tuple(coarse_shape), dtype=np.float32)
    if at.size:
        idx = np.stack(np.unravel_index(at, within.shape)).astype(np.float64)
        coords = to_ref[:3, :3] @ idx + to_ref[:3, 3:4]
        out.reshape(-1)[at] = ndimage.map_coordinates(likelihood, coords, order=1, mode="constant", cval=0.0,
                                                      prefilter=False)
    return out


def placement_density(region: Region, label: np.ndarray, affine: np.ndarray, lesion_labels,
                      likelihood: np.ndarray | None) -> PlacementDensity:
    """Likelihood map on the target's coarse grid (`coarse_likelihood`, None if there is none) × allowed
    region × not on an existing lesion."""
    stride = region.stride
    c_aff = coarse_affine(affine, stride)
    sl = tuple(slice(None, None, s) for s in stride)
    free = ~dilate(label_in(label[sl], lesion_labels))  # one voxel (6-neighbour cross) off the lesions
    allowed = region.coarse & free[tuple(slice(0, n) for n in region.coarse.shape)]
    fallback = None
    values = None  # the weights of the voxels `flat`
    if likelihood is not None:
        flat = np.flatnonzero(allowed & (likelihood > 0))  # on the bool grid: no float weight grid
        if flat.size:
            values = likelihood.ravel().take(flat)
        else:
            fallback = "likelihood map is zero in the allowed region; sampled the region uniformly"
    else:
        fallback = "no likelihood map; sampled the region uniformly"
    if values is None:
        flat = np.flatnonzero(allowed)
        if not flat.size:
            flat = np.flatnonzero(region.coarse)
            fallback = "allowed region fully covered by lesions; sampled the whole region"
        if flat.size == 0:
            size = int(np.prod(region.coarse.shape))
            return PlacementDensity(c_aff, np.linspace(1.0 / size, 1.0, size), region.coarse.shape,
                                    "empty allowed region; sampled the whole volume")
        values = np.ones(flat.size)
    # the cumulative sum over the voxels of non-zero weight only: the same sums (adding zeros changes no
    # float) and the same draws, on a fraction of the grid
    cdf = np.cumsum(values, dtype=np.float64)
    cdf /= cdf[-1]
    return PlacementDensity(c_aff, cdf, region.coarse.shape, fallback, flat)


__all__ = ["CT_CONTEXT_HU", "Grid", "PlacementDensity", "Region", "allowed_region", "body_foreground",
           "coarse_affine", "coarse_likelihood", "context_distance", "crop_affine", "donor_signature",
           "finish_likelihood", "is_ct", "likelihood_on", "matching_fraction", "on_grid", "placement_density",
           "reference_grid", "region_world_points", "signature_distances", "splat", "tissue_signature",
           "voxel_volume"]
