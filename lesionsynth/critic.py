"""Strong realism audit (the "critic"): an independent judge of pasted lesions and inpainted regions.

`audit.py` asks a logistic regression whether six intensity features tell pasted lesions from real ones.
The critic asks a gradient-boosted tree ensemble (scikit-learn's HistGradientBoostingClassifier) the same
question with many more features, grouped in FAMILIES, none of which the paste code was tuned against:

* ``intensity``  lesion p10 / p50 / p90 minus the shell median, over the shell's noise sd; p50 / shell median
* ``radial``     mean intensity at signed distances −2 … +4 mm from the lesion surface, minus the shell
                 median, over the shell's noise sd
* ``edge``       width (mm) over which the profile falls from 80 % to 20 % of the lesion's contrast; mean
                 gradient on the boundary voxels over the shell's noise sd, and over the contrast
* ``texture_in`` noise inside the lesion: MAD of the residual (voxel − mean of its 3×3×3 neighbours of the
                 same class), robust Laplacian energy, lag-1 autocorrelation of the residual
* ``band_noise`` the same three measures in bands 0–1, 1–2, 2–3.5 and 5–8 mm outside the lesion
* ``shape``      log volume, surface / volume, elongation and flatness (inertia), bounding-box fill
* ``context``    shell median / the case's body median, distance of the lesion to the body's edge

Noise measures are ratios to the same measure in the case's normal tissue far from lesions (boxes drawn
at random, `tissue_reference`); autocorrelations are differences. Every feature is gain-invariant and every
distance is in mm from explicit voxel spacing (native-space cases have any orientation and spacing).
Distances are measured from each voxel's centre to the nearest face of the lesion's voxels
(`surface_distance_mm`), so the first ring outside a lesion lies at half a voxel.

Out-of-fold AUC under StratifiedGroupKFold grouped by host case (a real lesion by its case, a pasted one by
its synthetic case's BASE case: the same anatomy is never in training and test), a 95 % interval by
bootstrap over those groups, and a permutation importance per family (all its columns permuted together
on the held-out fold; the drop of the AUC). A real-vs-real AUC (real cases split in two halves) checks the
grouping: it should be near 0.5. Inpainted regions are judged the same way against the same masks moved
to healthy tissue of the same kind in the same case, and each gets its residual excess (the share of the
lesion's contrast left behind). `unlabelled_changes` counts voxels a synthetic case changed beyond its
local noise that are not lesion in its label. Only boxes around lesions are filtered, never whole volumes.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .audit import CT_OFFSET, INSTALL_HINT, _case_ref, _components, _quota, gradient_at, rank_auc
from .errors import InputError
from .geometry import coarse_stride, spacing_of, true_bounds, voxel_volume
from .labels import label_in
from .prior import body_foreground, is_ct

FAMILIES = ("intensity", "radial", "edge", "texture_in", "band_noise", "shape", "context")
#: Families of an inpainted region (its shape is the control's by construction; the controls match its context).
INPAINT_FAMILIES = ("intensity", "radial", "edge", "texture_in", "band_noise")
#: Families of the appearance-only AUC (how a lesion looks, not how big it is or where it sits).
APPEARANCE_FAMILIES = tuple(f for f in FAMILIES if f not in ("shape", "context"))
SHELL_MM = (1.0, 4.0)                 # shell: voxels of other tissue this far from the lesion's surface
BANDS_MM = (("0-1", 0.0, 1.0), ("1-2", 1.0, 2.0), ("2-3.5", 2.0, 3.5), ("5-8", 5.0, 8.0))
PAIRED_BANDS_MM = (("0-1", 0.0, 1.0), ("1-2", 1.0, 2.0), ("2-3", 2.0, 3.0), ("4+", 4.0, 8.0))
RADIAL_MM = (-2, -1, 0, 1, 2, 3, 4)
PROFILE_HALF_WIDTH_MM = 1.0           # triangular kernel of the radial profile
EDGE_STEP_MM = 0.25
CROP_PAD_MM = 8.5                     # crop: the lesion's box grown by this (the outermost band) + 2 voxels
NOISE_MEASURES = ("mad", "lap", "acf")
MIN_VOXELS = 4                        # smaller lesions are skipped
MIN_MEASURE = 8                       # fewer voxels for a measure: NaN
MIN_CONTRAST_SD = 2.0                 # edge width and sharpness need this contrast (in shell noise sd)
MAX_LESIONS = 400                     # lesions measured per kind (real, pasted, inpainted), seeded draw
MIN_GROUP = 10                        # fewer lesions of a kind: no AUC
N_SPLITS = 5
BOOTSTRAP = 500
PERMUTATION_REPEATS = 3
REAL_SPLITS = 3                       # real-vs-real: random halves of the real cases
MIN_REAL_CASES = 6
COARSE_MM = 3.0                       # grid of the body mask and of the reference boxes
REFERENCE_BOXES = 16
REFERENCE_HALF_MM = 6.0
FAR_MM = 10.0                         # reference boxes: at least this far from any lesion
EDGE_CLEAR_MM = 8.0                   # … and from the body's edge
CONTROLS_PER_REGION = 2
CONTROL_TRIES = 30
CONTROL_TOLERANCE = 0.06              # control shell median within 6 % of the body median of the region's
CHANGE_SD = 3.0                       # unlabelled change: |output − base| > 3 local noise sd
CANDIDATE_SD = 1.5                    # first pass, against the case's reference sd
FEATHER_MM = 2.0                      # changed voxels this near a written lesion: the paste's feather
INPAINT_REACH_MM = 3.0                # … this near a removed lesion: the inpainting (rim 2 mm)
CHANGE_BLOCK_MM = 16.0
MAD_SCALE = 1.4826

#: The classifier's settings: small trees on 64 bins, no early stopping (deterministic; one thread, `grouped_auc`).
HGB_PARAMS = dict(max_iter=150, learning_rate=0.06, max_leaf_nodes=8, min_samples_leaf=10, max_bins=64,
                  l2_regularization=1.0, early_stopping=False)


# --------------------------------------------------------------------------------------------------
# Geometry and noise measures on a crop (pure, explicit spacing)
# --------------------------------------------------------------------------------------------------

def _distance_to(target: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Per voxel, the distance (mm) from its centre to the nearest face of a `target` voxel (0 on target)."""
    if not target.any():
        return np.full(target.shape, np.inf)
    idx = ndimage.distance_transform_edt(~target, sampling=spacing, return_distances=False, return_indices=True)
    gap = np.zeros(target.shape, dtype=np.float64)
    grid = np.indices(target.shape, sparse=True)
    for axis, step in enumerate(spacing):
        delta = np.abs(idx[axis] - grid[axis]) * step
        gap += np.maximum(delta - step / 2, 0.0) ** 2
    return np.where(target, 0.0, np.sqrt(gap))


def surface_distance_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Signed distance (mm) of each voxel centre from the surface (voxel faces) of `mask`: > 0 outside,
    < 0 inside. On a 1 mm grid the first ring outside lies at +0.5 (face neighbours) to +0.87 (corners)."""
    mask = np.asarray(mask, dtype=bool)
    spacing = np.asarray(spacing, dtype=np.float64)
    return np.where(mask, -_distance_to(~mask, spacing), _distance_to(mask, spacing))


def local_residual(image: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Voxel minus the mean of its 3×3×3 neighbourhood restricted to voxels of the same class (`same`, the
    voxel included); NaN outside `same` and where fewer than 9 of the 27 voxels are of the class (so that a
    lesion's edge does not count as noise in the tissue beside it, nor the tissue's in the lesion)."""
    m = np.asarray(same, dtype=np.float64)
    x = np.asarray(image, dtype=np.float64)
    total = ndimage.uniform_filter(x * m, size=3, mode="constant")
    count = ndimage.uniform_filter(m, size=3, mode="constant") * 27.0
    ok = same & (count >= 8.5)
    out = np.full(x.shape, np.nan)
    out[ok] = x[ok] - total[ok] * 27.0 / count[ok]
    return out


def laplacian(image: np.ndarray, same: np.ndarray, spacing) -> np.ndarray:
    """Discrete Laplacian (intensity per mm²) at voxels whose 6 face neighbours are all of the class `same`
    (inside the array); NaN elsewhere."""
    x = np.pad(np.asarray(image, dtype=np.float64), 1, mode="edge")
    m = np.pad(np.asarray(same, dtype=bool), 1, mode="constant")
    inner = (slice(1, -1),) * 3
    out = np.zeros(image.shape, dtype=np.float64)
    ok = m[inner].copy()
    for axis, step in enumerate(np.asarray(spacing, dtype=np.float64)):
        lo = list(inner)
        hi = list(inner)
        lo[axis] = slice(0, -2)
        hi[axis] = slice(2, None)
        out += (x[tuple(lo)] + x[tuple(hi)] - 2.0 * x[inner]) / step ** 2
        ok &= m[tuple(lo)] & m[tuple(hi)]
    out[~ok] = np.nan
    return out


def lag1_correlation(residual: np.ndarray, region: np.ndarray) -> float:
    """Lag-1 autocorrelation of `residual` over neighbour pairs (along every axis) that both lie in `region`
    and are finite; NaN with fewer than MIN_MEASURE pairs."""
    v = np.where(region & np.isfinite(residual), residual, np.nan)
    finite = np.isfinite(v)
    if finite.sum() < MIN_MEASURE:
        return float("nan")
    v = v - np.nanmean(v)
    num = sq_a = sq_b = 0.0
    pairs = 0
    for axis in range(v.ndim):
        a = np.moveaxis(v, axis, 0)[:-1]
        b = np.moveaxis(v, axis, 0)[1:]
        both = np.isfinite(a) & np.isfinite(b)
        if both.any():
            num += float((a[both] * b[both]).sum())
            sq_a += float((a[both] ** 2).sum())
            sq_b += float((b[both] ** 2).sum())
            pairs += int(both.sum())
    if pairs < MIN_MEASURE or sq_a <= 0 or sq_b <= 0:
        return float("nan")
    return float(num / np.sqrt(sq_a * sq_b))


def noise_measures(residual: np.ndarray, lap: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """Noise in `region`: ``mad`` = 1.4826 × MAD of the residual, ``lap`` = 1.4826 × median |Laplacian| (a
    robust Laplacian energy), ``acf`` = lag-1 autocorrelation of the residual. NaN with too few voxels."""
    r = residual[region]
    r = r[np.isfinite(r)]
    lp = lap[region]
    lp = lp[np.isfinite(lp)]
    mad = MAD_SCALE * float(np.median(np.abs(r - np.median(r)))) if r.size >= MIN_MEASURE else float("nan")
    lap_e = MAD_SCALE * float(np.median(np.abs(lp))) if lp.size >= MIN_MEASURE else float("nan")
    return {"mad": mad, "lap": lap_e, "acf": lag1_correlation(residual, region)}


def radial_profile(image: np.ndarray, distance: np.ndarray, usable: np.ndarray, at_mm,
                   half_width: float = PROFILE_HALF_WIDTH_MM) -> np.ndarray:
    """Mean intensity at signed distances `at_mm` from the lesion surface: a triangular kernel of
    `half_width` mm over the `usable` voxels' distances; NaN where the kernel's weight is below 2 voxels."""
    d = distance[usable]
    v = np.asarray(image, dtype=np.float64)[usable]
    out = np.full(len(at_mm), np.nan)
    for i, at in enumerate(np.asarray(at_mm, dtype=np.float64)):
        w = np.clip(1.0 - np.abs(d - at) / half_width, 0.0, None)
        total = w.sum()
        if total >= 2.0:
            out[i] = float((w * v).sum() / total)
    return out


def edge_width_mm(image: np.ndarray, distance: np.ndarray, usable: np.ndarray, inside: float, outside: float
                  ) -> float:
    """Distance (mm) over which the radial profile falls from 80 % to 20 % of the way from `inside` (the
    lesion's level) to `outside` (the shell's), walking outwards from −3 mm; NaN if it never does."""
    at = np.arange(-3.0, 5.0 + 1e-9, EDGE_STEP_MM)
    prof = radial_profile(image, distance, usable, at)
    contrast = inside - outside
    if contrast == 0:
        return float("nan")
    p = (prof - outside) / contrast
    ok = np.isfinite(p)
    at, p = at[ok], p[ok]
    if p.size < 3 or p[0] < 0.8:
        return float("nan")

    def crossing(level: float, start: int) -> tuple[float, int] | None:
        for i in range(max(start, 1), p.size):
            if p[i] <= level:
                f = (p[i - 1] - level) / (p[i - 1] - p[i]) if p[i - 1] != p[i] else 0.0
                return float(at[i - 1] + f * (at[i] - at[i - 1])), i
        return None

    hi = crossing(0.8, 1)
    lo = crossing(0.2, hi[1]) if hi else None
    return float(lo[0] - hi[0]) if hi and lo else float("nan")


def shape_features(mask: np.ndarray, spacing) -> dict[str, float]:
    """``log_volume`` (ln mm³), ``surface_per_volume`` (voxel-face area / volume, 1/mm), ``elongation`` and
    ``flatness`` (√ of the ratios of the inertia eigenvalues, largest/middle and middle/smallest, each
    voxel counted as a box) and ``bbox_fill`` (voxels / voxels of the bounding box)."""
    mask = np.asarray(mask, dtype=bool)
    spacing = np.asarray(spacing, dtype=np.float64)
    n = int(mask.sum())
    volume = n * float(np.prod(spacing))
    padded = np.pad(mask, 1)
    area = 0.0
    for axis in range(3):
        faces = np.count_nonzero(np.diff(padded, axis=axis))
        area += faces * float(np.prod(np.delete(spacing, axis)))
    coords = np.argwhere(mask) * spacing
    cov = np.cov(coords.T) if n > 1 else np.zeros((3, 3))
    cov = cov + np.diag(spacing ** 2 / 12.0)  # the voxel's own extent
    eig = np.sort(np.linalg.eigvalsh(cov))[::-1]
    bounds = true_bounds(mask)
    box = np.prod([b.stop - b.start for b in bounds])
    return {"log_volume": float(np.log(volume)), "surface_per_volume": area / volume,
            "elongation": float(np.sqrt(eig[0] / eig[1])), "flatness": float(np.sqrt(eig[1] / eig[2])),
            "bbox_fill": n / float(box)}


def _robust_sd(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return MAD_SCALE * float(np.median(np.abs(v - np.median(v)))) if v.size >= MIN_MEASURE else float("nan")


def _div(a: float, b: float) -> float:
    return float(a / b) if np.isfinite(a) and np.isfinite(b) and b > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# The case's normal tissue (reference) and the features of one lesion
# --------------------------------------------------------------------------------------------------

@dataclass
class TissueReference:
    """A case's normal tissue: noise measures per channel far from lesions, body medians, the coarse body mask."""

    noise: list[dict[str, float]]     # per channel: mad, lap, acf
    body_median: list[float]          # per channel, offsets added
    stride: tuple[int, int, int]
    body: np.ndarray                  # coarse bool
    edge_mm: np.ndarray               # coarse: distance (mm) from the body's edge
    lesion_mm: np.ndarray             # coarse: distance (mm) from the nearest lesion (or avoided) voxel


def _coarse_mark(mask: np.ndarray, stride, shape) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    idx = np.nonzero(mask)
    if idx[0].size:
        out[tuple(np.minimum(i // s, n - 1) for i, s, n in zip(idx, stride, shape))] = True
    return out


def tissue_reference(channels: np.ndarray, avoid: np.ndarray, spacing, names, offsets, rng: np.random.Generator
                     ) -> TissueReference:
    """Noise measures of the case's normal tissue: REFERENCE_BOXES boxes of ±REFERENCE_HALF_MM mm drawn at
    random (`rng`) in the body (`prior.body_foreground` of channel 0 on a ~3 mm grid), at least FAR_MM from
    every `avoid` voxel (lesions) and EDGE_CLEAR_MM from the body's edge (relaxed when nothing qualifies);
    per channel the median over the boxes of each `noise_measures` (boxes across a tissue border weigh no
    more than one). Body medians per channel, offsets added."""
    spacing = np.asarray(spacing, dtype=np.float64)
    stride = coarse_stride(spacing, COARSE_MM)
    sl = tuple(slice(None, None, s) for s in stride)
    coarse = np.asarray(channels[0][sl], dtype=np.float32)
    body = body_foreground(coarse, names[0])
    if not body.any():
        body = np.ones_like(body)
    coarse_spacing = spacing * np.asarray(stride)
    edge_mm = ndimage.distance_transform_edt(body, sampling=coarse_spacing)
    lesion_c = _coarse_mark(avoid, stride, body.shape)
    lesion_mm = (ndimage.distance_transform_edt(~lesion_c, sampling=coarse_spacing) if lesion_c.any()
                 else np.full(body.shape, np.inf))
    body_median = [float(np.median(np.asarray(channels[c][sl])[body])) + offsets[c] for c in range(len(channels))]
    cells = np.argwhere(body & (lesion_mm >= FAR_MM) & (edge_mm >= EDGE_CLEAR_MM))
    if len(cells) < REFERENCE_BOXES:
        cells = np.argwhere(body & (lesion_mm >= FAR_MM / 2))
    if len(cells) < REFERENCE_BOXES:
        cells = np.argwhere(body)
    pick = cells[rng.choice(len(cells), size=min(REFERENCE_BOXES, len(cells)), replace=False)]
    half = np.maximum(np.ceil(REFERENCE_HALF_MM / spacing).astype(int), 1)
    shape = np.array(avoid.shape)
    per_box: list[list[dict[str, float]]] = [[] for _ in range(len(channels))]
    for cell in pick:
        centre = cell * np.asarray(stride) + np.asarray(stride) // 2
        box = tuple(slice(max(int(c - h), 0), min(int(c + h + 1), int(n))) for c, h, n in zip(centre, half, shape))
        size = tuple(b.stop - b.start for b in box)
        idx = np.indices(size).reshape(3, -1).T + [b.start for b in box]
        in_body = body[tuple(np.minimum(idx // np.asarray(stride), np.array(body.shape) - 1).T)].reshape(size)
        same = in_body & ~avoid[box]
        if same.sum() < MIN_MEASURE:
            continue
        for c in range(len(channels)):
            crop = np.asarray(channels[c][box], dtype=np.float64)
            per_box[c].append(noise_measures(local_residual(crop, same), laplacian(crop, same, spacing), same))
    noise = [{k: float(np.nanmedian([b[k] for b in boxes])) if any(np.isfinite(b[k]) for b in boxes)
              else float("nan") for k in NOISE_MEASURES} for boxes in per_box]
    return TissueReference(noise, body_median, stride, body, edge_mm, lesion_mm)


def lesion_box(mask_bounds: tuple[slice, ...], shape, spacing, pad_mm: float = CROP_PAD_MM) -> tuple[slice, ...]:
    """The box `mask_bounds` grown by `pad_mm` (+ 2 voxels) on each side, clipped to `shape`."""
    pad = np.ceil(pad_mm / np.asarray(spacing, dtype=np.float64)).astype(int) + 2
    return tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(mask_bounds, pad, shape))


def feature_names(names, families=FAMILIES) -> dict[str, list[str]]:
    """Feature keys per family for channel names `names` ("family:measure:channel")."""
    out = {}
    for fam in families:
        keys = []
        for n in names:
            if fam == "intensity":
                keys += [f"intensity:{q}:{n}" for q in ("p10", "p50", "p90", "ratio")]
            elif fam == "radial":
                keys += [f"radial:{d:+d}mm:{n}" for d in RADIAL_MM]
            elif fam == "edge":
                keys += [f"edge:{m}:{n}" for m in ("width_mm", "gradient_sd", "sharpness")]
            elif fam == "texture_in":
                keys += [f"texture_in:{m}:{n}" for m in NOISE_MEASURES]
            elif fam == "band_noise":
                keys += [f"band_noise:{m}_{b}mm:{n}" for b, _, _ in BANDS_MM for m in NOISE_MEASURES]
            elif fam == "context":
                keys.append(f"context:shell_over_body:{n}")
        if fam == "shape":
            keys = [f"shape:{m}" for m in ("log_volume", "surface_per_volume", "elongation", "flatness", "bbox_fill")]
        if fam == "context":
            keys.append("context:body_edge_mm")
        out[fam] = keys
    return out


def _noise_ratios(measured: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Ratios to the reference (mad, lap); the autocorrelation as a difference."""
    return {"mad": _div(measured["mad"], reference["mad"]), "lap": _div(measured["lap"], reference["lap"]),
            "acf": measured["acf"] - reference["acf"] if np.isfinite(reference["acf"]) else float("nan")}


def lesion_features(channels: np.ndarray, mask: np.ndarray, others: np.ndarray, spacing, reference_noise,
                    names, offsets=None, body_median=None, families=FAMILIES) -> dict[str, float] | None:
    """Features of ONE lesion (or region) on a crop: channels (C, X, Y, Z), `mask` the lesion, `others` every
    other voxel to keep out of the tissue measures (other lesions); `reference_noise` per channel the
    case's normal-tissue measures (mad, lap, acf); `offsets` per channel added before ratios (CT);
    `body_median` per channel (offsets added) for the context. None for a lesion below MIN_VOXELS or
    without a shell. The body-edge distance is added by the caller."""
    mask = np.asarray(mask, dtype=bool)
    if int(mask.sum()) < MIN_VOXELS:
        return None
    spacing = np.asarray(spacing, dtype=np.float64)
    n_ch = channels.shape[0]
    offsets = np.zeros(n_ch) if offsets is None else np.asarray(offsets, dtype=np.float64)
    dist = surface_distance_mm(mask, spacing)
    tissue = ~mask & ~np.asarray(others, dtype=bool)
    shell = tissue & (dist > SHELL_MM[0]) & (dist <= SHELL_MM[1])
    if int(shell.sum()) < MIN_MEASURE:
        return None
    usable = mask | tissue
    boundary = np.nonzero(mask & ndimage.binary_dilation(~mask))
    out: dict[str, float] = {}
    if "shape" in families:
        out.update({f"shape:{k}": v for k, v in shape_features(mask, spacing).items()})
    for c in range(n_ch):
        n = names[c]
        x = np.asarray(channels[c], dtype=np.float64)
        r_out = local_residual(x, tissue)
        shell_median = float(np.median(x[shell]))
        shell_sd = _robust_sd(r_out[shell])
        if not (np.isfinite(shell_sd) and shell_sd > 0):
            shell_sd = reference_noise[c]["mad"]
        q10, q50, q90 = np.percentile(x[mask], [10, 50, 90])
        if "intensity" in families:
            for key, q in (("p10", q10), ("p50", q50), ("p90", q90)):
                out[f"intensity:{key}:{n}"] = _div(q - shell_median, shell_sd) if shell_sd > 0 else float("nan")
            out[f"intensity:ratio:{n}"] = _div(q50 + offsets[c], shell_median + offsets[c])
        if "radial" in families:
            prof = radial_profile(x, dist, usable, RADIAL_MM)
            for d, v in zip(RADIAL_MM, prof):
                out[f"radial:{d:+d}mm:{n}"] = _div(v - shell_median, shell_sd) if np.isfinite(v) else float("nan")
        if "edge" in families:
            contrast = float(q50 - shell_median)
            visible = np.isfinite(shell_sd) and abs(contrast) >= MIN_CONTRAST_SD * shell_sd
            grad = float(gradient_at(x, boundary, spacing).mean()) if boundary[0].size else float("nan")
            out[f"edge:width_mm:{n}"] = edge_width_mm(x, dist, usable, float(q50), shell_median) if visible \
                else float("nan")
            out[f"edge:gradient_sd:{n}"] = _div(grad, shell_sd)
            out[f"edge:sharpness:{n}"] = _div(grad, abs(contrast)) if visible else float("nan")
        ref = reference_noise[c]
        if "texture_in" in families:
            inside = noise_measures(local_residual(x, mask), laplacian(x, mask, spacing), mask)
            for k, v in _noise_ratios(inside, ref).items():
                out[f"texture_in:{k}:{n}"] = v
        if "band_noise" in families:
            lap_out = laplacian(x, tissue, spacing)
            for b, lo, hi in BANDS_MM:
                band = tissue & (dist > lo) & (dist <= hi)
                for k, v in _noise_ratios(noise_measures(r_out, lap_out, band), ref).items():
                    out[f"band_noise:{k}_{b}mm:{n}"] = v
        if "context" in families and body_median is not None:
            out[f"context:shell_over_body:{n}"] = _div(shell_median + offsets[c], body_median[c])
    return out


def paired_band_noise(out_channels: np.ndarray, base_channels: np.ndarray, mask: np.ndarray, tissue: np.ndarray,
                      spacing, names) -> dict[str, float]:
    """Output / base noise on the SAME voxels around a pasted lesion (`mask`; `tissue`: voxels that are
    lesion in neither), per band of PAIRED_BANDS_MM and channel: "mad_{band}mm:{channel}" and
    "lap_{band}mm:{channel}". 1 = the paste left the noise around it as it was."""
    spacing = np.asarray(spacing, dtype=np.float64)
    dist = surface_distance_mm(mask, spacing)
    out = {}
    for c, n in enumerate(names):
        measured = []
        for channel in (out_channels[c], base_channels[c]):
            x = np.asarray(channel, dtype=np.float64)
            measured.append((local_residual(x, tissue), laplacian(x, tissue, spacing)))
        for b, lo, hi in PAIRED_BANDS_MM:
            band = tissue & (dist > lo) & (dist <= hi)
            after = noise_measures(*measured[0], band)
            before = noise_measures(*measured[1], band)
            out[f"mad_{b}mm:{n}"] = _div(after["mad"], before["mad"])
            out[f"lap_{b}mm:{n}"] = _div(after["lap"], before["lap"])
    return out


def residual_excess(out_crop: np.ndarray, base_crop: np.ndarray, region: np.ndarray, base_tissue: np.ndarray,
                    spacing) -> float:
    """(output median − base shell median) / (base median − base shell median) over an inpainted `region` of
    one channel: the share of the lesion's contrast left behind (1: untouched, 0: filled to the level of
    the tissue around it). The shell: `base_tissue` voxels 1-4 mm from the region, in the base case. NaN
    where the lesion's contrast was below MIN_CONTRAST_SD noise sd of that shell."""
    dist = surface_distance_mm(region, spacing)
    shell = base_tissue & (dist > SHELL_MM[0]) & (dist <= SHELL_MM[1])
    if shell.sum() < MIN_MEASURE:
        return float("nan")
    base = np.asarray(base_crop, dtype=np.float64)
    shell_median = float(np.median(base[shell]))
    sd = _robust_sd(local_residual(base, base_tissue)[shell])
    contrast = float(np.median(base[region])) - shell_median
    if not np.isfinite(sd) or abs(contrast) < MIN_CONTRAST_SD * sd or contrast == 0:
        return float("nan")
    return float((np.median(np.asarray(out_crop, dtype=np.float64)[region]) - shell_median) / contrast)


# --------------------------------------------------------------------------------------------------
# Unlabelled changes
# --------------------------------------------------------------------------------------------------

def unlabelled_changes(out_channels: np.ndarray, base_channels: np.ndarray, out_lesion: np.ndarray,
                       base_lesion: np.ndarray, spacing, reference_sd) -> dict[str, int]:
    """Voxels whose value moved from the base case by more than CHANGE_SD local noise sd (any channel) and
    that are not lesion in the output: ``near_paste`` (≤ FEATHER_MM from a written lesion voxel: lesion in
    the output, not in the base), ``near_inpaint`` (else ≤ INPAINT_REACH_MM from a removed one) and
    ``elsewhere``. Local noise sd: robust sd of the base's residual over the unchanged tissue of a block of
    ~CHANGE_BLOCK_MM around them (the case's `reference_sd` per channel where too few). Candidates are the
    voxels moved by more than CANDIDATE_SD × `reference_sd`; only blocks holding one are filtered."""
    spacing = np.asarray(spacing, dtype=np.float64)
    ref = np.asarray(reference_sd, dtype=np.float64)
    counts = {"near_paste": 0, "near_inpaint": 0, "elsewhere": 0}
    candidate = np.zeros(out_lesion.shape, dtype=bool)
    for c in range(out_channels.shape[0]):
        if np.isfinite(ref[c]) and ref[c] > 0:
            candidate |= np.abs(np.asarray(out_channels[c], np.float32) - base_channels[c]) > CANDIDATE_SD * ref[c]
        else:
            candidate |= out_channels[c] != base_channels[c]
    candidate &= ~out_lesion
    bounds = true_bounds(candidate)
    if bounds is None:
        return counts
    block = np.maximum(np.ceil(CHANGE_BLOCK_MM / spacing).astype(int), 4)
    margin = np.ceil(max(FEATHER_MM, INPAINT_REACH_MM) / spacing).astype(int) + 2
    shape = np.array(candidate.shape)
    starts = [range(b.start, b.stop, k) for b, k in zip(bounds, block)]
    for i in starts[0]:
        for j in starts[1]:
            for k in starts[2]:
                core = tuple(slice(s, min(s + int(n), int(e.stop))) for s, n, e in zip((i, j, k), block, bounds))
                if not candidate[core].any():
                    continue
                box = tuple(slice(max(c.start - int(m), 0), min(c.stop + int(m), int(n)))
                            for c, m, n in zip(core, margin, shape))
                inner = tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(core, box))
                base_les, out_les = base_lesion[box], out_lesion[box]
                steady = ~base_les & ~out_les & ~candidate[box]
                changed = np.zeros(candidate[box].shape, dtype=bool)
                for c in range(out_channels.shape[0]):
                    base = np.asarray(base_channels[c][box], dtype=np.float64)
                    sd = _robust_sd(local_residual(base, steady)[steady]) if steady.sum() >= 50 else float("nan")
                    if not (np.isfinite(sd) and sd > 0):
                        sd = ref[c]
                    if not (np.isfinite(sd) and sd > 0):
                        changed |= out_channels[c][box] != base_channels[c][box]
                        continue
                    changed |= np.abs(np.asarray(out_channels[c][box], dtype=np.float64) - base) > CHANGE_SD * sd
                changed &= ~out_les & candidate[box]
                changed = changed[inner]
                if not changed.any():
                    continue
                written = out_les & ~base_les
                removed = base_les & ~out_les
                near_paste = (_distance_to(written, spacing)[inner] <= FEATHER_MM) if written.any() \
                    else np.zeros_like(changed)
                near_inpaint = (_distance_to(removed, spacing)[inner] <= INPAINT_REACH_MM) if removed.any() \
                    else np.zeros_like(changed)
                counts["near_paste"] += int((changed & near_paste).sum())
                counts["near_inpaint"] += int((changed & ~near_paste & near_inpaint).sum())
                counts["elsewhere"] += int((changed & ~near_paste & ~near_inpaint).sum())
    return counts


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------

def _cluster_bootstrap(y: np.ndarray, score: np.ndarray, groups: np.ndarray, seed: int) -> list[float] | None:
    """95 % interval of the AUC, resampling whole groups (host cases) with replacement."""
    rng = np.random.default_rng([int(seed), 23])
    uniq = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in uniq]
    boots = []
    for _ in range(BOOTSTRAP):
        pick = np.concatenate([members[i] for i in rng.integers(len(uniq), size=len(uniq))])
        a = rank_auc(y[pick], score[pick])
        if np.isfinite(a):
            boots.append(a)
    if len(boots) < BOOTSTRAP // 2:
        return None
    return [float(v) for v in np.percentile(boots, [2.5, 97.5])]


def grouped_auc(x: np.ndarray, y: np.ndarray, groups, families: dict[str, list[int]] | None = None,
                seed: int = 0) -> dict:
    """Out-of-fold ROC AUC of HistGradientBoostingClassifier (`HGB_PARAMS`, random_state=`seed`) for the
    positives `y`, with StratifiedGroupKFold over `groups` (min(N_SPLITS, groups holding each class) folds,
    shuffled with `seed`), its 95 % interval by bootstrap over the groups, and per family (column indices
    in `x`) the permutation importance: the AUC's mean drop when the family's columns are permuted together
    (rows shuffled within each held-out fold; PERMUTATION_REPEATS seeded repeats). NaN features are allowed."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=bool)
    groups = np.asarray([str(g) for g in groups])
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    out = {"auc": None, "auc_ci95": None, "reason": None, "n_positive": n_pos, "n_negative": n_neg,
           "n_groups": int(len(set(groups))), "n_splits": None, "family_importance": []}
    if min(n_pos, n_neg) < MIN_GROUP:
        out["reason"] = f"too few to classify ({n_pos} and {n_neg}; at least {MIN_GROUP} of each needed)"
        return out
    splits = min(N_SPLITS, len(set(groups[y])), len(set(groups[~y])))
    if splits < 2:
        out["reason"] = "fewer than 2 host cases hold each kind: no grouped cross-validation"
        return out
    try:
        import sklearn.ensemble  # noqa: F401
        import sklearn.model_selection  # noqa: F401
    except ImportError:
        out["reason"] = INSTALL_HINT
        return out
    try:
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
    except ImportError:  # pragma: no cover
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=1):  # small fits: threads only cost on a shared machine
            return _grouped_fits(x, y, groups, families or {}, seed, splits, out)
    return _grouped_fits(x, y, groups, families or {}, seed, splits, out)


def _grouped_fits(x, y, groups, families, seed, splits, out) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedGroupKFold

    cv = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=int(seed))
    oof = np.full(len(y), np.nan)
    permuted = {f: np.full((PERMUTATION_REPEATS, len(y)), np.nan) for f in families}
    for fold, (train, test) in enumerate(cv.split(x, y.astype(int), groups)):
        if len(set(y[train])) < 2:
            oof[test] = y[train].mean()
            for f in families:
                permuted[f][:, test] = y[train].mean()
            continue
        # a column with no finite value in this training fold tells nothing (and the binning needs one)
        x_fold = np.where((np.isfinite(x[train]).sum(axis=0) < 2)[None, :], 0.0, x)
        model = HistGradientBoostingClassifier(random_state=int(seed), **HGB_PARAMS)
        model.fit(x_fold[train], y[train].astype(int))
        oof[test] = model.predict_proba(x_fold[test])[:, 1]
        for fi, (f, cols) in enumerate(families.items()):
            for rep in range(PERMUTATION_REPEATS):
                rng = np.random.default_rng([int(seed), 31, fold, fi, rep])
                xp = x_fold[test].copy()
                xp[:, cols] = xp[rng.permutation(len(test))][:, cols]
                permuted[f][rep, test] = model.predict_proba(xp)[:, 1]
    auc = rank_auc(y, oof)
    out.update(auc=float(auc), n_splits=int(splits), auc_ci95=_cluster_bootstrap(y, oof, groups, seed))
    drops = []
    for f, scores in permuted.items():
        d = [auc - rank_auc(y, s) for s in scores]
        drops.append({"family": f, "auc_drop": float(np.mean(d)), "sd": float(np.std(d))})
    out["family_importance"] = sorted(drops, key=lambda r: -r["auc_drop"])
    return out


def _matrix(rows: list[dict], keys: list[str]) -> np.ndarray:
    return np.array([[row.get(k, np.nan) for k in keys] for row in rows], dtype=np.float64).reshape(len(rows),
                                                                                                     len(keys))


def classify_rows(negatives: list[dict], positives: list[dict], families: dict[str, list[str]], seed: int = 0,
                  group_key: str = "group") -> dict:
    """`grouped_auc` of `positives` against `negatives` (feature dicts with a `group_key`), on the features of
    `families` ({family: keys}); keys every row lacks are left out."""
    rows = negatives + positives
    if min(len(negatives), len(positives)) < MIN_GROUP:
        return {"auc": None, "auc_ci95": None, "n_positive": len(positives), "n_negative": len(negatives),
                "reason": f"too few to classify ({len(positives)} and {len(negatives)}; at least {MIN_GROUP} of "
                          "each needed)", "family_importance": [], "n_features": 0}
    present = {f: [k for k in keys if any(k in r and np.isfinite(r[k]) for r in rows)] for f, keys in families.items()}
    present = {f: keys for f, keys in present.items() if keys}
    keys = [k for ks in present.values() for k in ks]
    if not keys:
        return {"auc": None, "auc_ci95": None, "reason": "no features", "n_positive": len(positives),
                "n_negative": len(negatives), "family_importance": [], "n_features": 0}
    x = _matrix(rows, keys)
    y = np.r_[np.zeros(len(negatives), bool), np.ones(len(positives), bool)]
    index = {k: i for i, k in enumerate(keys)}
    result = grouped_auc(x, y, [r[group_key] for r in rows], {f: [index[k] for k in ks] for f, ks in present.items()},
                         seed)
    result["n_features"] = len(keys)
    return result


def real_vs_real(real: list[dict], families: dict[str, list[str]], seed: int = 0) -> dict:
    """Honesty check: real lesions against real lesions, the real cases split in two random halves
    (REAL_SPLITS seeded splits); grouped by case, the AUC should be near 0.5."""
    cases = sorted({r["group"] for r in real})
    out = {"auc": None, "aucs": [], "reason": None, "n_cases": len(cases)}
    if len(cases) < MIN_REAL_CASES:
        out["reason"] = f"too few real cases ({len(cases)}; at least {MIN_REAL_CASES} needed)"
        return out
    for split in range(REAL_SPLITS):
        rng = np.random.default_rng([int(seed), 41, split])
        half = set(np.asarray(cases)[rng.permutation(len(cases))[: len(cases) // 2]].tolist())
        result = classify_rows([r for r in real if r["group"] not in half], [r for r in real if r["group"] in half],
                               {f: ks for f, ks in families.items()}, seed=seed + split)
        if result["auc"] is None:
            out["reason"] = result["reason"]
            continue
        out["aucs"].append(result["auc"])
    if out["aucs"]:
        out["auc"] = float(np.mean(out["aucs"]))
        out["reason"] = None
    return out


# --------------------------------------------------------------------------------------------------
# Reading an output
# --------------------------------------------------------------------------------------------------

@dataclass
class CaseArrays:
    case_id: str
    channels: np.ndarray   # (C, X, Y, Z) float32
    lesion: np.ndarray     # bool
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return spacing_of(self.affine)


def read_ref(ref, lesion_labels, n_channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(channels (n, X, Y, Z) float32, lesion mask, affine) of the case a CaseRef points to."""
    from .output_run import read_channel, read_label

    label, affine = read_label(ref.label_path)
    channels = np.empty((n_channels,) + label.shape, dtype=np.float32)
    for c in range(n_channels):
        data, _ = read_channel(ref.image_paths[0] if ref.four_d else ref.image_paths[c], c, ref.four_d)
        if data.shape != label.shape:
            raise InputError(f"{ref.case_id}: channel {c} has shape {data.shape}, the label {label.shape}")
        channels[c] = data
    return channels, label_in(label, lesion_labels), affine


def read_case(run, case_id: str, original: bool) -> CaseArrays:
    """A case's channels, lesion mask and affine: originals through the bank's recorded files (else their
    copy in the output), synthetic cases from the output (`audit._case_ref`)."""
    ref = _case_ref(run, case_id, original)
    return CaseArrays(case_id, *read_ref(ref, run.lesion_labels, len(run.channel_names)))


def _finite(value):
    return None if isinstance(value, float) and not np.isfinite(value) else value


def _summary(values) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not v.size:
        return {"n": 0, "median": None, "q25": None, "q75": None}
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "median": float(q50), "q25": float(q25), "q75": float(q75)}


class _Measurer:
    """Per-case state while measuring: the case, its tissue reference, its offsets and names."""

    def __init__(self, case: CaseArrays, names, offsets, rng, avoid=None):
        self.case = case
        self.names = names
        self.offsets = offsets
        self.spacing = case.spacing
        self.reference = tissue_reference(case.channels, case.lesion if avoid is None else (case.lesion | avoid),
                                          self.spacing, names, offsets, rng)

    def edge_distance(self, centre_voxel) -> float:
        ref = self.reference
        cell = np.minimum(np.asarray(centre_voxel, dtype=np.int64) // np.asarray(ref.stride),
                          np.array(ref.body.shape) - 1)
        return float(ref.edge_mm[tuple(cell)])

    def features(self, box, mask_crop, others_crop, families=FAMILIES) -> dict | None:
        crop = self.case.channels[(slice(None),) + box]
        feats = lesion_features(crop, mask_crop, others_crop, self.spacing, self.reference.noise, self.names,
                                self.offsets, self.reference.body_median, families)
        if feats is not None and "context" in families:
            centre = np.argwhere(mask_crop).mean(axis=0) + [b.start for b in box]
            feats["context:body_edge_mm"] = self.edge_distance(np.rint(centre))
        return feats


def _component_boxes(mask: np.ndarray, connectivity: int, min_voxels: int):
    """(box of `mask`'s voxels, component labels over that box, each label's `find_objects` slices, whether
    each label holds at least `min_voxels`), or None for an empty mask."""
    bounds = true_bounds(mask)
    if bounds is None:
        return None
    comps, _, keep = _components(mask[bounds], connectivity, min_voxels)
    return bounds, comps, ndimage.find_objects(comps), keep


def _draw(candidates: np.ndarray, take: int, rng) -> np.ndarray:
    return candidates if len(candidates) <= take else np.sort(rng.choice(candidates, size=take, replace=False))


def _measure_components(m: _Measurer, mask: np.ndarray, all_lesion: np.ndarray, take: int, rng, connectivity: int,
                        min_volume_mm3: float, must_touch: np.ndarray | None = None, base: CaseArrays | None = None):
    """Features of up to `take` components of `mask` (those holding a `must_touch` voxel, if given), each with
    `all_lesion` minus itself kept out of the tissue; with `base`, also `paired_band_noise` against it."""
    found = _component_boxes(mask, connectivity, MIN_VOXELS)
    if found is None:
        return []
    bounds, comps, objects, keep = found
    keep &= np.bincount(comps.ravel(), minlength=len(keep)) * voxel_volume(m.case.affine) >= min_volume_mm3 - 1e-9
    if must_touch is not None:
        touched = np.zeros_like(keep)
        touched[np.unique(comps[must_touch[bounds]])] = True
        keep &= touched
    keep[0] = False
    rows = []
    shape = mask.shape
    for k in _draw(np.flatnonzero(keep), take, rng):
        obj = objects[int(k) - 1]
        inner = tuple(slice(b.start + o.start, b.start + o.stop) for b, o in zip(bounds, obj))
        box = lesion_box(inner, shape, m.spacing)
        comp_crop = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
        comp_crop[tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inner, box))] = comps[obj] == k
        others = all_lesion[box] & ~comp_crop
        feats = m.features(box, comp_crop, others)
        if feats is None:
            continue
        centre = np.argwhere(comp_crop).mean(axis=0) + [s.start for s in box]
        row = {"case_id": m.case.case_id, "voxel": [round(float(v), 1) for v in centre],
               "volume_mm3": float(comp_crop.sum() * voxel_volume(m.case.affine)), **feats}
        if base is not None:
            tissue = ~all_lesion[box] & ~base.lesion[box]
            row["paired"] = paired_band_noise(m.case.channels[(slice(None),) + box],
                                              base.channels[(slice(None),) + box], comp_crop, tissue, m.spacing,
                                              m.names)
        rows.append(row)
    return rows


def _place_controls(m: _Measurer, tight: np.ndarray, signature, any_lesion: np.ndarray, rng,
                    n_controls: int = CONTROLS_PER_REGION) -> list[dict]:
    """Features of up to `n_controls` copies of a region's mask (`tight`: cropped to its box) moved to
    random body cells at least FAR_MM/2 from every lesion, whose tissue around (shell median per channel)
    lies within CONTROL_TOLERANCE × body median of `signature` (the region's own surroundings)."""
    ref = m.reference
    size = np.array(tight.shape)
    extent_mm = float((size * m.spacing).max())
    cells = np.argwhere(ref.body & (ref.lesion_mm >= FAR_MM / 2 + extent_mm / 2) & (ref.edge_mm >= EDGE_CLEAR_MM))
    if not len(cells):
        return []
    shape = np.array(any_lesion.shape)
    pad = np.ceil(CROP_PAD_MM / m.spacing).astype(int) + 2
    body_med = np.asarray(ref.body_median, dtype=np.float64)
    out = []
    for cell in cells[rng.choice(len(cells), size=min(CONTROL_TRIES, len(cells)), replace=False)]:
        centre = cell * np.asarray(ref.stride) + np.asarray(ref.stride) // 2
        start = centre - size // 2
        if np.any(start - pad < 0) or np.any(start + size + pad > shape):
            continue
        box = tuple(slice(int(s - p), int(s + n + p)) for s, n, p in zip(start, size, pad))
        mask = np.zeros(tuple(b.stop - b.start for b in box), dtype=bool)
        mask[tuple(slice(int(p), int(p + n)) for p, n in zip(pad, size))] = tight
        lesions = any_lesion[box]
        if lesions.any() and (_distance_to(lesions, m.spacing)[mask] <= SHELL_MM[1]).any():
            continue
        crop = m.case.channels[(slice(None),) + box]
        quick = np.array([np.median(crop[c][mask]) + m.offsets[c] for c in range(len(crop))])
        if np.any(np.abs(quick - signature) > 3 * CONTROL_TOLERANCE * body_med):
            continue
        dist = surface_distance_mm(mask, m.spacing)
        shell = ~mask & ~lesions & (dist > SHELL_MM[0]) & (dist <= SHELL_MM[1])
        if shell.sum() < MIN_MEASURE:
            continue
        around = np.array([np.median(crop[c][shell]) + m.offsets[c] for c in range(len(crop))])
        if np.any(np.abs(around - signature) > CONTROL_TOLERANCE * body_med):
            continue
        feats = m.features(box, mask, lesions, INPAINT_FAMILIES)
        if feats is not None:
            out.append({"case_id": m.case.case_id, "voxel": [int(v) for v in centre], **feats})
        if len(out) >= n_controls:
            break
    return out


def _measure_inpainted(m: _Measurer, base: CaseArrays, take: int, rng, connectivity: int):
    """(inpainted region rows, control rows) of a synthetic case: regions = components of lesion voxels of
    the base case that are not lesion in the output."""
    removed = base.lesion & ~m.case.lesion
    found = _component_boxes(removed, connectivity, MIN_VOXELS)
    if found is None:
        return [], []
    bounds, comps, objects, keep = found
    keep[0] = False
    any_lesion = base.lesion | m.case.lesion
    regions, controls = [], []
    for k in _draw(np.flatnonzero(keep), take, rng):
        obj = objects[int(k) - 1]
        inner = tuple(slice(b.start + o.start, b.start + o.stop) for b, o in zip(bounds, obj))
        tight = comps[tuple(slice(o.start, o.stop) for o in obj)] == k
        box = lesion_box(inner, removed.shape, m.spacing)
        region = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
        region[tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inner, box))] = tight
        others = m.case.lesion[box] & ~region
        feats = m.features(box, region, others, INPAINT_FAMILIES)
        if feats is None:
            continue
        base_tissue = ~base.lesion[box]
        excess = {}
        for c, n in enumerate(m.names):
            excess[n] = residual_excess(m.case.channels[c][box], base.channels[c][box], region, base_tissue,
                                        m.spacing)
        dist = surface_distance_mm(region, m.spacing)
        shell = base_tissue & (dist > SHELL_MM[0]) & (dist <= SHELL_MM[1])
        if shell.sum() < MIN_MEASURE:
            continue
        signature = np.array([np.median(base.channels[c][box][shell]) + m.offsets[c] for c in range(len(m.names))])
        centre = np.argwhere(region).mean(axis=0) + [s.start for s in box]
        regions.append({"case_id": m.case.case_id, "voxel": [round(float(v), 1) for v in centre],
                        "volume_mm3": float(region.sum() * voxel_volume(m.case.affine)),
                        "residual_excess": {n: _finite(v) for n, v in excess.items()}, **feats})
        controls += _place_controls(m, tight, signature, any_lesion, rng)
    return regions, controls


# --------------------------------------------------------------------------------------------------
# The audit of a generate output
# --------------------------------------------------------------------------------------------------

def _expected_real(run, originals: list[str]) -> Counter:
    """Lesions per original case: from the bank index, else counted on the originals in the output."""
    if run.bank_index:
        wanted = set(run.lesion_labels)
        return Counter(les["source_case"] for les in run.bank_index["lesions"]
                       if int(les.get("label_value", run.lesion_labels[0])) in wanted)
    from .output_run import component_volumes, read_label

    counts = Counter()
    for cid in originals:
        label, affine = read_label(run.label_path(cid))
        counts[cid] = len(component_volumes(label, affine, run.lesion_labels, run.connectivity, run.min_volume_mm3))
    return counts


def _band_summary(real: list[dict], pasted: list[dict], names) -> dict:
    """Median band-noise ratios (to the case's far tissue) of real and pasted lesions, per band and channel."""
    out = {}
    for b, _, _ in BANDS_MM:
        out[f"{b}mm"] = {meas: {n: {kind: _summary([r.get(f"band_noise:{meas}_{b}mm:{n}") for r in rows])["median"]
                                    for kind, rows in (("real", real), ("pasted", pasted))}
                                for n in names} for meas in NOISE_MEASURES}
    return out


def _paired_summary(pasted: list[dict], names) -> dict:
    """Median over pasted lesions of the output / base noise ratios on the same voxels, per band and channel."""
    return {f"{b}mm": {meas: {n: _summary([r["paired"].get(f"{meas}_{b}mm:{n}") for r in pasted if "paired" in r])
                              for n in names} for meas in ("mad", "lap")} for b, _, _ in PAIRED_BANDS_MM}


def strong_audit(out_dir, max_lesions: int = MAX_LESIONS, seed: int = 0, progress: bool | None = False,
                 keep_rows: bool = False) -> dict:
    """Run the critic on a generate output folder (or an `OutputRun`); a JSON-able dict with the keys
    ``pasted`` (pasted vs real lesions: AUC, interval, family importance; ``appearance``: the same without
    the shape and context families), ``real_vs_real``, ``inpainted`` (inpainted regions vs healthy controls,
    residual excess), ``band_noise`` and ``unlabelled_changes``. At most `max_lesions` lesions of each kind,
    drawn with `seed`; every case is read once (a base case with the synthetic cases made from it).
    `progress`: a tqdm bar (None: only on a terminal). `keep_rows`: add every measured row (``rows``)."""
    from tqdm import tqdm

    from .output_run import OutputRun, read_output

    t0 = time.perf_counter()
    run = out_dir if isinstance(out_dir, OutputRun) else read_output(out_dir)
    names = list(run.channel_names)
    offsets = [CT_OFFSET if is_ct(n) else 0.0 for n in names]
    connectivity = run.connectivity
    notes: list[str] = []

    synthetic = {r["case_id"] for r in run.records}
    if run.bank_index:
        originals = [c["case_id"] for c in run.bank_index["cases"]]
    else:
        originals = sorted(p.name[: -len(run.file_ending)] for p in (run.out / "labelsTr").glob(f"*{run.file_ending}")
                           if p.name[: -len(run.file_ending)] not in synthetic)
    expected_real = _expected_real(run, originals)
    records = [r for r in run.records if run.label_path(r["case_id"]).is_file()]
    quota_real = _quota({c: expected_real.get(c, 0) for c in originals}, max_lesions, np.random.default_rng([seed, 1]))
    quota_pasted = _quota({r["case_id"]: sum(op["op"] == "paste" for op in r["ops"]) for r in records}, max_lesions,
                          np.random.default_rng([seed, 2]))
    quota_inpaint = _quota({r["case_id"]: sum(op["op"] == "inpaint" for op in r["ops"]) for r in records},
                           max_lesions, np.random.default_rng([seed, 3]))
    by_base: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_base[r["base_case"]].append(r)
    visit = sorted(set(quota_real) | set(by_base))

    real, pasted, inpainted, controls, changes = [], [], [], [], []
    bar = tqdm(total=len(visit) + len(records), desc="critic", unit="case", disable=None if progress is None
               else not progress)
    for i, oid in enumerate(visit):
        try:
            base = read_case(run, oid, True)
        except (InputError, OSError) as exc:
            notes.append(f"case {oid} not measured: {exc}")
            bar.update(1 + len(by_base.get(oid, [])))
            continue
        if quota_real.get(oid):
            m = _Measurer(base, names, offsets, np.random.default_rng([seed, 5, i]))
            for row in _measure_components(m, base.lesion, base.lesion, quota_real[oid],
                                           np.random.default_rng([seed, 6, i]), connectivity, run.min_volume_mm3):
                real.append({**row, "kind": "real", "group": oid})
        bar.update(1)
        for j, rec in enumerate(sorted(by_base.get(oid, []), key=lambda r: r["case_id"])):
            cid = rec["case_id"]
            try:
                syn = read_case(run, cid, False)
                if syn.channels.shape != base.channels.shape:
                    raise InputError(f"{cid}: grid {syn.channels.shape[1:]} differs from its base case {oid}'s")
            except (InputError, OSError) as exc:
                notes.append(f"synthetic case {cid} not measured: {exc}")
                bar.update(1)
                continue
            rng = np.random.default_rng([seed, 7, i, j])
            m = _Measurer(syn, names, offsets, rng, avoid=base.lesion)
            if quota_pasted.get(cid):
                for row in _measure_components(m, syn.lesion, syn.lesion, quota_pasted[cid], rng, connectivity,
                                               run.min_volume_mm3, must_touch=syn.lesion & ~base.lesion, base=base):
                    pasted.append({**row, "kind": "pasted", "group": oid, "base_case": oid})
            if quota_inpaint.get(cid):
                regions, ctrl = _measure_inpainted(m, base, quota_inpaint[cid], rng, connectivity)
                inpainted += [{**r, "kind": "inpainted", "group": oid, "base_case": oid} for r in regions]
                controls += [{**r, "kind": "control", "group": oid, "base_case": oid} for r in ctrl]
            counts = unlabelled_changes(syn.channels, base.channels, syn.lesion, base.lesion, syn.spacing,
                                        [n["mad"] for n in m.reference.noise])
            vv = voxel_volume(syn.affine)
            changes.append({"case_id": cid, "base_case": oid, **counts,
                            "unlabelled": counts["near_paste"] + counts["elsewhere"],
                            "unlabelled_mm3": round((counts["near_paste"] + counts["elsewhere"]) * vv, 2)})
            bar.update(1)
            del syn, m
        del base
    bar.close()

    families = feature_names(names)
    appearance = {f: families[f] for f in APPEARANCE_FAMILIES}
    pasted_result = classify_rows(real, pasted, families, seed)
    pasted_result["appearance"] = {k: v for k, v in classify_rows(real, pasted, appearance, seed).items()
                                   if k != "family_importance"}
    inpaint_families = feature_names(names, INPAINT_FAMILIES)
    inpaint_result = classify_rows(controls, inpainted, inpaint_families, seed)
    inpaint_result["residual_excess"] = {n: _summary([r["residual_excess"][n] for r in inpainted]) for n in names}
    inpaint_result["n_regions"], inpaint_result["n_controls"] = len(inpainted), len(controls)
    worst = sorted(changes, key=lambda c: (-c["unlabelled"], -c["elsewhere"], c["case_id"]))[:5]
    result = {
        "critic_version": 1,
        "channels": names,
        "seed": int(seed),
        "max_lesions": int(max_lesions),
        "families": {f: len(keys) for f, keys in families.items()},
        "classifier": "HistGradientBoostingClassifier, StratifiedGroupKFold by host case (pasted: base case), "
                      "out-of-fold ROC AUC, 95 % interval by bootstrap over host cases",
        "n_real": len(real), "n_pasted": len(pasted), "n_inpainted": len(inpainted), "n_controls": len(controls),
        "pasted": pasted_result,
        "real_vs_real": real_vs_real(real, families, seed),
        "inpainted": inpaint_result,
        "band_noise": {"to_case_tissue": _band_summary(real, pasted, names),
                       "paired_output_over_base": _paired_summary(pasted, names)},
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    unlabelled = {"threshold_sd": CHANGE_SD, "feather_mm": FEATHER_MM, "inpaint_reach_mm": INPAINT_REACH_MM,
                  "totals": {k: int(sum(c[k] for c in changes)) for k in ("near_paste", "near_inpaint", "elsewhere")},
                  "per_case": changes, "worst": worst}
    result["unlabelled_changes"] = unlabelled
    if keep_rows:
        result["rows"] = [{k: (_finite(v) if not isinstance(v, dict) else {a: _finite(b) for a, b in v.items()})
                           for k, v in row.items()} for row in real + pasted + inpainted + controls]
    return _json_ready(result)


def _json_ready(value):
    """NaN/inf → None and numpy scalars → Python, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


__all__ = ["FAMILIES", "feature_names", "grouped_auc", "lesion_features", "local_residual", "laplacian",
           "noise_measures", "paired_band_noise", "residual_excess", "strong_audit", "surface_distance_mm",
           "tissue_reference", "unlabelled_changes"]
