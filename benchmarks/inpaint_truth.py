"""Score lesion removal (inpainting) against a KNOWN HEALTHY TRUTH.

    python benchmarks/inpaint_truth.py --data DIR [--work W] [--seed 0] [--jobs 1] [--folds 1]
                                       [--generate-args "..."] [--pictures 1] [--reuse] [--json FILE]

DIR is made by benchmarks/truth_data.py: DIR/dataset (nnU-Net v2 raw: FLAIR _0000, T1 _0001, label) and
DIR/truth ({case}_healthy_0000/_0001: the same acquisition without the lesions, same noise realisation;
{case}_tissue; cases.json with each case's grid and noise sd).

What it runs, through the installed command line (the `lesionsynth` next to this Python):

1. `lesionsynth build-bank DIR/dataset --out W/bank --recipe ms_flair --jobs J`
2. `lesionsynth generate W/bank --out W/out --n N --load low --mode inpaint --seed S --jobs J
   --no-include-originals --folds F` + the words of --generate-args, with N = the number of cases. With
   --folds 1 (the default) the cases take turns as base case, so every case is a base once; the base cases
   used are read from manifest.jsonl and listed. Cases already below their drawn target lose nothing (inpaint
   mode cannot raise a load); --generate-args "--load-range 0 600" makes every case lose most of its lesions.

$LESIONSYNTH_CLI replaces the command (e.g. a launcher of another checkout, to measure a commit while the
working tree is being edited); the JSON records which lesionsynth ran and whether its tree had uncommitted
changes.

With --reuse an existing W/bank and W/out are measured again without running anything.

What it measures. A removal = a 26-connected component of (lesion in the base label and not in the
output label); it is matched to its `inpaint` op of the manifest (seed voxel), whose rim_mm etc. are kept.
Against the base case's healthy truth H, with B the base image and O the output, on FLAIR and T1:

* residual excess = mean(O - H) / mean(B - H) over the removed lesion's voxels (0 = fully removed,
  1 = untouched), and the same over the lesion dilated by one voxel (26-neighbourhood; its partial-volume
  rim) and by two voxels ("wide");
* PSNR and SSIM (3-D, 7³ uniform window, skimage's constants) in the removal's bounding box + 2 voxels, and
  MAE and PSNR in the region R = the lesion dilated by one voxel, BraTS 2023 local-inpainting style: the data
  range is p99.5 - p0.5 of H inside the brain (tissue truth > 0); MAE is given as a fraction of that range;
* the same for a reference fill: R replaced by the median of B over a 2-4 mm shell (distance from the
  lesion, mm) of non-lesion voxels around it ("shell-median fill");
* texture ratio: MAD of (voxel - its 3x3x3 mean) of O over R / the same of H over R (1 = the same noise);
* per case, the mean residual excess over its removals; per grid, the largest such case mean and the share of
  cases within 10 % (a case's removals all stay or all go in one written volume);
* unlabelled changed voxels, per case: |O - B| > 3 noise sd (the truth's noise sd of the channel) where the
  output label is not lesion, outside every removal's one-voxel dilation (either channel); and of those, the
  ones where the change moved away from the truth (|O - H| > |B - H|: not a partial-volume tail taken away).

Prints a table per voxel size and writes everything to --json; W/pictures gets a 2x4 PNG (base / out /
healthy / out - healthy for FLAIR and T1, the axial slice through the removed lesion's centre, nearest to the
world's axial plane) of the worst removals (largest FLAIR residual excess) per voxel size. The work folder
is kept (default: a new temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from native_space import cli  # noqa: E402  (the lesionsynth command of this environment)

CHANNELS = ("FLAIR", "T1")
CONN26 = np.ones((3, 3, 3), bool)
SSIM_WIN = 7
BOX_MARGIN = 2  # voxels around a removal's bounding box for PSNR / SSIM
SHELL_MM = (2.0, 4.0)
CHANGE_SD = 3.0
GOOD_RESIDUAL = 0.10


# --------------------------------------------------------------------------------------------------
# Metrics (plain functions of arrays; tests/test_truth_bench.py checks them)
# --------------------------------------------------------------------------------------------------


def residual_excess(out: np.ndarray, base: np.ndarray, healthy: np.ndarray, mask: np.ndarray) -> float:
    """mean(out - healthy) / mean(base - healthy) over ``mask``: 0 when the excess is gone, 1 when untouched
    (nan when the base has no excess there)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return float("nan")
    den = float(np.mean(base[mask].astype(np.float64) - healthy[mask]))
    num = float(np.mean(out[mask].astype(np.float64) - healthy[mask]))
    scale = float(np.abs(healthy[mask]).mean()) + 1e-12
    if abs(den) <= 1e-9 * scale:
        return float("nan")
    return num / den


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float, mask: np.ndarray | None = None) -> float:
    """10 log10(range² / MSE) over ``mask`` (all voxels if None); inf when identical."""
    diff = image.astype(np.float64) - reference
    if mask is not None:
        diff = diff[np.asarray(mask, bool)]
    mse = float(np.mean(diff * diff)) if diff.size else float("nan")
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range ** 2 / mse))


def ssim_map(image: np.ndarray, reference: np.ndarray, data_range: float, win: int = SSIM_WIN) -> np.ndarray:
    """Local SSIM (uniform win³ window, sample covariance, K1 0.01, K2 0.03: skimage's defaults) per voxel;
    values within win//2 of the array's edge see a reflected window."""
    x, y = image.astype(np.float64), reference.astype(np.float64)
    ux, uy = ndimage.uniform_filter(x, win), ndimage.uniform_filter(y, win)
    uxx, uyy, uxy = (ndimage.uniform_filter(a, win) for a in (x * x, y * y, x * y))
    n = win ** x.ndim
    cov = n / (n - 1.0)
    vx, vy, vxy = cov * (uxx - ux * ux), cov * (uyy - uy * uy), cov * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def mae(image: np.ndarray, reference: np.ndarray, data_range: float, mask: np.ndarray) -> float:
    """Mean absolute error over ``mask``, as a fraction of ``data_range``."""
    mask = np.asarray(mask, bool)
    return float(np.mean(np.abs(image[mask].astype(np.float64) - reference[mask])) / data_range)


def shell_median_fill(image: np.ndarray, lesion: np.ndarray, region: np.ndarray, spacing,
                      not_lesion: np.ndarray | None = None, shell_mm=SHELL_MM) -> tuple[np.ndarray, float]:
    """(image with ``region`` set to the median of the voxels at SHELL_MM[0] < distance <= SHELL_MM[1] mm
    from ``lesion`` that are in ``not_lesion`` (default: not ``lesion``), that median). When the shell is
    empty, it is widened by one voxel size at a time."""
    lesion = np.asarray(lesion, bool)
    allowed = ~lesion if not_lesion is None else np.asarray(not_lesion, bool)
    dist = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    lo, hi = shell_mm
    step = float(np.min(spacing))
    shell = (dist > lo) & (dist <= hi) & allowed
    while not shell.any() and hi < 50 * step:
        lo, hi = max(lo - step, 0.0), hi + step
        shell = (dist > lo) & (dist <= hi) & allowed
    value = float(np.median(image[shell])) if shell.any() else float(np.median(image[~lesion]))
    filled = image.astype(np.float32).copy()
    filled[np.asarray(region, bool)] = value
    return filled, value


def noise_mad(image: np.ndarray, mask: np.ndarray) -> float:
    """Median absolute deviation of (voxel - its 3x3x3 mean) over ``mask``."""
    resid = image.astype(np.float64) - ndimage.uniform_filter(image.astype(np.float64), 3)
    r = resid[np.asarray(mask, bool)]
    return float(np.median(np.abs(r - np.median(r)))) if r.size else float("nan")


def texture_ratio(out: np.ndarray, healthy: np.ndarray, mask: np.ndarray) -> float:
    """noise_mad(out) / noise_mad(healthy) over ``mask``: 1 = the truth's texture, < 1 smoother."""
    ref = noise_mad(healthy, mask)
    return noise_mad(out, mask) / ref if ref > 0 else float("nan")


def data_range_of(healthy: np.ndarray, brain: np.ndarray) -> float:
    """p99.5 - p0.5 of the healthy image inside the brain."""
    lo, hi = np.percentile(healthy[brain], [0.5, 99.5])
    return float(hi - lo)


def dilate1(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    return ndimage.binary_dilation(mask, structure=CONN26, iterations=iterations)


# --------------------------------------------------------------------------------------------------
# Running lesionsynth
# --------------------------------------------------------------------------------------------------


def provenance(exe: list[str]) -> dict:
    """Which lesionsynth ran: the command, and for the default one the package's folder, the repository's
    commit and whether lesionsynth/ has uncommitted changes (a working tree being edited)."""
    info: dict = {"cli": exe, "override": os.environ.get("LESIONSYNTH_CLI")}
    if info["override"]:
        return info
    import importlib.util

    spec = importlib.util.find_spec("lesionsynth")
    origin = Path(spec.origin).resolve().parent if spec and spec.origin else None
    info["package"] = str(origin) if origin else None
    if origin is not None:
        def git(*words: str) -> str:
            proc = subprocess.run(["git", "-C", str(origin.parent), *words], capture_output=True, text=True)
            return proc.stdout.strip() if proc.returncode == 0 else ""

        info["commit"] = git("rev-parse", "HEAD") or None
        info["uncommitted"] = git("status", "--porcelain", "--", origin.name).splitlines()
    return info


def run_stage(name: str, cmd: list[str]) -> tuple[float, str]:
    print(f"[inpaint_truth] {name}: {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise SystemExit(f"inpaint_truth: {name} failed (exit {proc.returncode}):\n{tail}")
    print(f"[inpaint_truth] {name}: {seconds:.0f}s", flush=True)
    return seconds, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def load(path: Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=dtype), img.affine


def spacing_of(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(affine[:3, :3], axis=0)


def grow(box, margin, shape) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - m, 0), min(s.stop + m, n)) for s, m, n in zip(box, margin, shape))


def within(inner, outer) -> tuple[slice, ...]:
    """``inner`` (absolute slices) relative to ``outer``."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def match_op(ops: list[dict], component: np.ndarray, crop) -> dict | None:
    """The inpaint op whose seed voxel lies in ``component`` (a mask over ``crop``)."""
    for op in ops:
        seed = op.get("seed_voxel")
        if seed is None:
            continue
        local = [int(v) - s.start for v, s in zip(seed, crop)]
        if all(0 <= v < n for v, n in zip(local, component.shape)) and component[tuple(local)]:
            return op
    return None


def finite(values) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def measure_case(entry: dict, dataset: Path, truth: Path, out: Path, cases_info: dict,
                 lesion_labels) -> tuple[dict, list[dict], dict]:
    """(case summary, removals, arrays for pictures) of one synthetic case."""
    case_id, base_id = entry["case_id"], entry["base_case"]
    ending = ".nii.gz"
    base_label, affine = load(dataset / "labelsTr" / f"{base_id}{ending}", np.int16)
    out_label, out_affine = load(out / "labelsTr" / f"{case_id}{ending}", np.int16)
    if base_label.shape != out_label.shape or not np.allclose(affine, out_affine, atol=1e-4):
        raise SystemExit(f"inpaint_truth: {case_id} is not on its base case {base_id}'s grid")
    tissue, _ = load(truth / f"{base_id}_tissue{ending}", np.uint8)
    base = [load(dataset / "imagesTr" / f"{base_id}_{c:04d}{ending}")[0] for c in range(len(CHANNELS))]
    outs = [load(out / "imagesTr" / f"{case_id}_{c:04d}{ending}")[0] for c in range(len(CHANNELS))]
    healthy = [load(truth / f"{base_id}_healthy_{c:04d}{ending}")[0] for c in range(len(CHANNELS))]
    info = cases_info.get(base_id, {})
    spacing = spacing_of(affine)
    grid = float(info.get("grid_mm", round(float(spacing.mean()), 2)))
    brain = tissue > 0
    ranges = [data_range_of(h, brain) for h in healthy]
    noise_sd = info.get("noise_sd") or [1.4826 * noise_mad(h, brain) for h in healthy]
    base_les, out_les = np.isin(base_label, lesion_labels), np.isin(out_label, lesion_labels)
    removed = base_les & ~out_les
    comps, n = ndimage.label(removed, structure=CONN26)
    ops = [op for op in entry.get("ops", []) if op.get("op") == "inpaint"]
    voxel_mm3 = float(np.prod(spacing))
    margin = np.maximum(np.ceil(SHELL_MM[1] / spacing).astype(int) + 2, BOX_MARGIN + SSIM_WIN // 2 + 1)
    removals = []
    for k, box in enumerate(ndimage.find_objects(comps), start=1):
        crop = grow(box, margin, comps.shape)
        lesion = comps[crop] == k
        rim1, rim2 = dilate1(lesion), dilate1(lesion, 2)
        inner = within(grow(box, [BOX_MARGIN] * 3, comps.shape), crop)
        not_lesion = ~base_les[crop]
        op = match_op(ops, lesion, crop)
        centre = [int(round(v)) for v in ndimage.center_of_mass(lesion)]
        rec = {"case": case_id, "base_case": base_id, "grid_mm": grid, "component": k,
               "voxels": int(lesion.sum()), "volume_mm3": round(float(lesion.sum()) * voxel_mm3, 2),
               "centre_voxel": [int(c + s.start) for c, s in zip(centre, crop)],
               "bbox": [[s.start, s.stop] for s in box],
               "wm_share": round(float((tissue[crop][lesion] == 3).mean()), 3),
               "op": None if op is None else {key: op[key] for key in op if key not in ("bbox",)},
               "channels": {}}
        for c, name in enumerate(CHANNELS):
            b, o, h = base[c][crop], outs[c][crop], healthy[c][crop]
            rng = ranges[c]
            shell_fill, shell_value = shell_median_fill(b, lesion, rim1, spacing, not_lesion)
            s_ours, s_shell = ssim_map(o, h, rng), ssim_map(shell_fill, h, rng)
            rec["channels"][name] = {
                "residual_excess": residual_excess(o, b, h, lesion),
                "residual_excess_rim": residual_excess(o, b, h, rim1),
                "residual_excess_wide": residual_excess(o, b, h, rim2),
                "contrast_sd": float(np.mean(b[lesion] - h[lesion]) / noise_sd[c]),
                "psnr": psnr(o[inner], h[inner], rng),
                "psnr_shell": psnr(shell_fill[inner], h[inner], rng),
                "psnr_region": psnr(o, h, rng, rim1),
                "psnr_region_shell": psnr(shell_fill, h, rng, rim1),
                "ssim": float(s_ours[inner].mean()),
                "ssim_shell": float(s_shell[inner].mean()),
                "mae": mae(o, h, rng, rim1),
                "mae_shell": mae(shell_fill, h, rng, rim1),
                "texture_ratio": texture_ratio(o, h, rim1),
                "texture_ratio_shell": texture_ratio(shell_fill, h, rim1),
                "shell_median": shell_value,
                "data_range": rng,
            }
        removals.append(rec)
    # Unlabelled changed voxels (outside every removal's one-voxel dilation, output label not lesion).
    keep_out = dilate1(removed) | out_les
    changed_any = np.zeros(removed.shape, bool)
    away_any = np.zeros(removed.shape, bool)
    changed, away = {}, {}
    for c, name in enumerate(CHANNELS):
        ch = (np.abs(outs[c] - base[c]) > CHANGE_SD * float(noise_sd[c])) & ~keep_out
        # of those, the ones the change took further from the truth (not a partial-volume tail removed)
        worse = ch & (np.abs(outs[c] - healthy[c]) > np.abs(base[c] - healthy[c]))
        changed[name], away[name] = int(ch.sum()), int(worse.sum())
        changed_any |= ch
        away_any |= worse
    summary = {"case": case_id, "base_case": base_id, "grid_mm": grid, "removals": n,
               "inpaint_ops": len(ops), "unmatched_ops": len(ops) - sum(r["op"] is not None for r in removals),
               "removed_voxels": int(removed.sum()), "removed_mm3": round(float(removed.sum()) * voxel_mm3, 1),
               "unlabelled_changed_voxels": {**changed, "any": int(changed_any.sum())},
               "unlabelled_changed_mm3": round(float(changed_any.sum()) * voxel_mm3, 1),
               "unlabelled_changed_away_from_truth": {**away, "any": int(away_any.sum())},
               "noise_sd": [float(v) for v in noise_sd], "data_range": ranges,
               "stop_reason": entry.get("stop_reason"), "target_load_mm3": entry.get("target_load_mm3"),
               "achieved_load_mm3": entry.get("achieved_load_mm3")}
    arrays = {"base": base, "out": outs, "healthy": healthy, "comps": comps, "affine": affine}
    return summary, removals, arrays


def grid_summary(removals: list[dict], cases: list[dict]) -> dict:
    """Per-grid figures: medians over removals, plus pooled (voxel-weighted) residual excess."""
    res = {"removals": len(removals), "cases": len(cases),
           "cases_with_removals": sum(1 for c in cases if c["removals"]),
           "unlabelled_changed_voxels": sum(c["unlabelled_changed_voxels"]["any"] for c in cases),
           "unlabelled_changed_mm3": round(sum(c["unlabelled_changed_mm3"] for c in cases), 1),
           "unlabelled_changed_away_from_truth": sum(c["unlabelled_changed_away_from_truth"]["any"] for c in cases),
           "removed_mm3": round(sum(r["volume_mm3"] for r in removals), 1)}
    for name in CHANNELS:
        ch = [r["channels"][name] for r in removals]
        resid = finite(x["residual_excess"] for x in ch)
        d = {"median_residual_excess": float(np.median(resid)) if resid.size else None,
             "max_residual_excess": float(resid.max()) if resid.size else None,
             "share_residual_le_10pct": float((resid <= GOOD_RESIDUAL).mean()) if resid.size else None}
        for key in ("residual_excess_rim", "residual_excess_wide", "psnr", "psnr_shell", "psnr_region",
                    "psnr_region_shell", "ssim", "ssim_shell", "mae", "mae_shell", "texture_ratio",
                    "texture_ratio_shell", "contrast_sd"):
            vals = finite(x[key] for x in ch)
            d[f"median_{key}"] = float(np.median(vals)) if vals.size else None
        # per case: the mean over its removals (the worst case, and the share of cases within GOOD_RESIDUAL)
        case_means = finite(c.get("mean_residual_excess", {}).get(name) for c in cases if c["removals"])
        d["max_case_mean_residual_excess"] = float(case_means.max()) if case_means.size else None
        d["share_cases_mean_le_10pct"] = float((case_means <= GOOD_RESIDUAL).mean()) if case_means.size else None
        # voxel-weighted: total excess left / total excess before (lesion voxels)
        w = np.array([r["voxels"] for r in removals], float)
        rv = np.array([x["residual_excess"] for x in ch], float)
        ok = np.isfinite(rv)
        d["pooled_residual_excess"] = float((rv[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else None
        res[name] = d
    return res


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------


def axial_slice(arr: np.ndarray, affine: np.ndarray, centre, half_mm: float = 30.0):
    """The axial slice (closest voxel axis to world S) through ``centre`` (voxel), cropped to +-half_mm in
    plane (at least 12 voxels), as an image whose columns run to R and rows to A."""
    ornt = nib.orientations.io_orientation(affine)
    spacing = spacing_of(affine)
    half = np.maximum(np.ceil(half_mm / spacing).astype(int), 12)
    box = tuple(slice(max(c - h, 0), min(c + h + 1, n)) for c, h, n in zip(centre, half, arr.shape))
    crop = arr[box]
    local = [c - b.start for c, b in zip(centre, box)]
    ras = nib.orientations.apply_orientation(crop, ornt)
    # where the centre went
    point = np.zeros(3, int)
    for ax, (new_ax, flip) in enumerate(ornt.astype(int)):
        point[new_ax] = crop.shape[ax] - 1 - local[ax] if flip < 0 else local[ax]
    return ras[:, :, point[2]].T  # rows = A-P (y), columns = R-L (x)


def save_picture(path: Path, arrays: dict, removal: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    affine, centre = arrays["affine"], removal["centre_voxel"]
    comp = (arrays["comps"] == removal["component"]).astype(np.float32)
    mask2d = axial_slice(comp, affine, centre)
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.8))
    for row, name in enumerate(CHANNELS):
        views = [axial_slice(arrays[k][row], affine, centre) for k in ("base", "out", "healthy")]
        diff = views[1] - views[2]
        lo, hi = np.percentile(np.concatenate([v.ravel() for v in views]), [1, 99.5])
        excess = np.abs(views[0] - views[2]).max()
        lim = max(float(excess), 1e-6)
        ch = removal["channels"][name]
        for col, (img, label) in enumerate(zip(views, ("base", "out (inpainted)", "healthy truth"))):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            if col < 2 and mask2d.any():
                ax.contour(mask2d, levels=[0.5], colors="tab:red" if col == 0 else "tab:orange",
                           linewidths=0.6, origin="lower")
            ax.set_title(f"{name} {label}", fontsize=9)
        ax = axes[row, 3]
        im = ax.imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower", interpolation="nearest")
        if mask2d.any():
            ax.contour(mask2d, levels=[0.5], colors="k", linewidths=0.5, origin="lower")
        ax.set_title(f"{name} out - healthy (resid {ch['residual_excess']:.2f}, "
                     f"rim {ch['residual_excess_rim']:.2f}, tex {ch['texture_ratio']:.2f})", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------


def fmt(value, spec: str = ".2f", width: int = 6) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return f"{'-':>{width}s}" if value is None or np.isnan(value) else f"{'inf':>{width}s}"
    return f"{value:{width}{spec}}"


def plain(obj):
    """JSON-safe copy: numpy scalars to Python, nan to null, +-inf to "inf" / "-inf"."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if np.isnan(v):
            return None
        if np.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    return obj


def print_tables(per_grid: dict) -> None:
    for name in CHANNELS:
        print(f"\n{name}: residual excess (0 = removed, 1 = untouched), ours vs shell-median fill")
        print(f"{'grid':>6s} {'cases':>5s} {'rem':>4s} {'res med':>7s} {'max':>6s} {'<=10%':>6s} {'rim':>6s} {'pooled':>6s} "
              f"{'PSNR':>6s} {'shell':>6s} {'PSNRr':>6s} {'shell':>6s} {'SSIM':>6s} {'shell':>6s} "
              f"{'MAE':>6s} {'shell':>6s} {'tex':>5s} {'chg vox':>8s} {'worse':>6s} {'case max':>8s} {'<=10%':>6s}")
        for grid, g in per_grid.items():
            d = g[name]
            share = None if d["share_residual_le_10pct"] is None else 100 * d["share_residual_le_10pct"]
            cases_share = None if d["share_cases_mean_le_10pct"] is None else 100 * d["share_cases_mean_le_10pct"]
            print(f"{grid:>6s} {g['cases_with_removals']:2d}/{g['cases']:<2d} {g['removals']:4d} {fmt(d['median_residual_excess'], '.3f', 7)} "
                  f"{fmt(d['max_residual_excess'], '.3f')} {fmt(share, '.0f')}% "
                  f"{fmt(d['median_residual_excess_rim'], '.3f')} {fmt(d['pooled_residual_excess'], '.3f')} "
                  f"{fmt(d['median_psnr'], '.1f')} {fmt(d['median_psnr_shell'], '.1f')} "
                  f"{fmt(d['median_psnr_region'], '.1f')} {fmt(d['median_psnr_region_shell'], '.1f')} "
                  f"{fmt(d['median_ssim'], '.3f')} {fmt(d['median_ssim_shell'], '.3f')} "
                  f"{fmt(d['median_mae'], '.3f')} {fmt(d['median_mae_shell'], '.3f')} "
                  f"{fmt(d['median_texture_ratio'], '.2f', 5)} {g['unlabelled_changed_voxels']:8d} "
                  f"{g['unlabelled_changed_away_from_truth']:6d} {fmt(d['max_case_mean_residual_excess'], '.3f', 8)} "
                  f"{fmt(cases_share, '.0f')}%")
    print("\n(cases: with a removal / all; medians over removals; res/rim: over the lesion / the lesion + 1 voxel; pooled: voxel-weighted; "
          "PSNR/SSIM: bounding box + 2 voxels, PSNRr: lesion + 1 voxel; MAE: fraction of the data range, "
          "lesion + 1 voxel; tex: texture ratio; chg vox: unlabelled changed voxels of all the grid's cases, worse: those of them "
          "that moved away from the truth; case max / <=10%: the mean residual excess over a case's removals, "
          "its largest over the grid's cases and the share of cases within 10 %)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder made by benchmarks/truth_data.py")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--folds", type=int, default=1,
                        help="generate --folds (1: every case is a base case once)")
    parser.add_argument("--recipe", default="ms_flair")
    parser.add_argument("--load", default="low")
    parser.add_argument("--generate-args", default="",
                        help='extra words for generate, e.g. "--load-range 0 600" (every case loses most lesions)')
    parser.add_argument("--pictures", type=int, default=1, help="worst removals pictured per voxel size")
    parser.add_argument("--reuse", action="store_true", help="measure an existing WORK/bank and WORK/out")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    data = args.data.resolve()
    dataset, truth = data / "dataset", data / "truth"
    for path in (dataset / "dataset.json", truth / "cases.json"):
        if not path.exists():
            raise SystemExit(f"inpaint_truth: {path} not found (run benchmarks/truth_data.py --out {data})")
    cases_info = json.loads((truth / "cases.json").read_text())["cases"]
    work = (args.work or Path(tempfile.mkdtemp(prefix="inpaint_truth."))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bank, out = work / "bank", work / "out"
    n_cases = len(list((dataset / "labelsTr").glob("*.nii.gz")))
    exe = cli()
    bank_cmd = [*exe, "build-bank", str(dataset), "--out", str(bank), "--recipe", args.recipe,
                "--jobs", str(args.jobs)]
    gen_cmd = [*exe, "generate", str(bank), "--out", str(out), "--n", str(n_cases), "--load", args.load,
               "--mode", "inpaint", "--seed", str(args.seed), "--jobs", str(args.jobs),
               "--no-include-originals", "--folds", str(args.folds), *shlex.split(args.generate_args)]
    times, logs = {}, {}
    source = provenance(exe)
    if source.get("uncommitted"):
        print(f"[inpaint_truth] note: lesionsynth has uncommitted changes ({len(source['uncommitted'])} files): "
              "the figures are of the working tree, not of commit " + str(source.get("commit"))[:10], flush=True)
    if args.reuse:
        if not (out / "manifest.jsonl").exists() or not (bank / "bank.json").exists():
            raise SystemExit(f"inpaint_truth: --reuse needs {bank} and {out}/manifest.jsonl")
    else:
        for path in (bank, out):
            if path.exists():
                raise SystemExit(f"inpaint_truth: {path} exists; give another --work, remove it, or --reuse")
        times["build-bank"], logs["build-bank"] = run_stage("build-bank", bank_cmd)
        times["generate"], logs["generate"] = run_stage("generate", gen_cmd)
    lesion_labels = json.loads((bank / "bank.json").read_text())["config"]["lesion_labels"]
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    bases = sorted({e["base_case"] for e in entries})
    never = sorted(set(cases_info) - set(bases))
    print(f"[inpaint_truth] {len(entries)} synthetic cases on {len(bases)}/{len(cases_info)} base cases"
          + (f" (never a base: {', '.join(never)})" if never else ""), flush=True)

    start = time.perf_counter()
    case_rows, removals = [], []
    worst: dict[str, list] = {}
    for entry in entries:
        summary, recs, arrays = measure_case(entry, dataset, truth, out, cases_info, lesion_labels)
        summary["mean_residual_excess"] = {
            name: (float(np.mean(v)) if (v := finite(r["channels"][name]["residual_excess"] for r in recs)).size
                   else None) for name in CHANNELS}
        case_rows.append(summary)
        removals.extend(recs)
        key = f"{summary['grid_mm']:g}"
        # keep the arrays of this grid's worst removals only
        for r in recs:
            v = r["channels"]["FLAIR"]["residual_excess"]
            if np.isfinite(v):
                worst.setdefault(key, []).append((v, r, arrays))
        worst[key] = sorted(worst.get(key, []), key=lambda t: -t[0])[: max(args.pictures, 0)]
        resid = finite(r["channels"]["FLAIR"]["residual_excess"] for r in recs)
        print(f"[inpaint_truth] {summary['case']} (base {summary['base_case']}, {key} mm): "
              f"{summary['removals']} removals, {summary['removed_mm3']:.0f} mm3, FLAIR residual median "
              f"{fmt(float(np.median(resid)) if resid.size else None, '.3f', 5)}", flush=True)
    times["measure"] = time.perf_counter() - start

    grids = sorted({c["grid_mm"] for c in case_rows})
    per_grid = {}
    for g in grids:
        per_grid[f"{g:g}"] = grid_summary([r for r in removals if r["grid_mm"] == g],
                                          [c for c in case_rows if c["grid_mm"] == g])
    per_grid["all"] = grid_summary(removals, case_rows)

    pictures = []
    for key, items in worst.items():
        for rank, (value, rec, arrays) in enumerate(items):
            path = work / "pictures" / f"worst{rank + 1}_{key}mm_{rec['case']}_{rec['base_case']}_c{rec['component']}.png"
            op = rec.get("op") or {}
            title = (f"{key} mm: {rec['case']} (base {rec['base_case']}), removal {rec['component']}: "
                     f"{rec['voxels']} voxels / {rec['volume_mm3']:.0f} mm3, WM {rec['wm_share']:.0%}, "
                     f"rim_mm {op.get('rim_mm')}, texture_gain {op.get('texture_gain')}; "
                     f"FLAIR residual excess {value:.2f}")
            save_picture(path, arrays, rec, title)
            pictures.append(str(path))
    worst.clear()

    print_tables(per_grid)
    result = {
        "data": str(data), "work": str(work),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "commands": {"build-bank": shlex.join(bank_cmd), "generate": shlex.join(gen_cmd)},
        "lesion_labels": lesion_labels, "times_s": times, "lesionsynth": source, "reused": args.reuse,
        "base_cases_used": bases, "never_base": never,
        "per_grid": per_grid, "per_case": case_rows, "removals": removals, "pictures": pictures,
        "logs": {k: v.strip().splitlines()[-40:] for k, v in logs.items()},
    }
    for p in pictures:
        print(f"picture: {p}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plain(result), indent=1) + "\n")
        print(f"json: {args.json}")
    print(f"work folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
