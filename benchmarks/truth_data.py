"""Build a native-space MS brain dataset with a KNOWN HEALTHY TRUTH, to score inpainting (and pastes).

    python benchmarks/truth_data.py --out DIR [--cases-per-grid 4] [--grids 0.8 1.0 1.2 3.0] [--seed 5000]
                                    [--noise-sigma 0.65] [--load-range 400 25000] [--force]

Made from the same pieces as scripts/fetch_data.py's native brains (imported from it, not copied: the MNI152
anatomy with a synthetic skull and scalp, real MS lesion shapes from the shared masks, a random head pose,
one linear resampling with a voxel box profile onto a scanner grid), but harder, as real scanners are:

* isotropic scanner grids of the given voxel sizes (``--grids``, mm), ``--cases-per-grid`` cases each, every
  case with its own head pose (rotation up to +-15 deg per axis, translation up to +-15 mm), a distinct axis
  code (LPS, RAS, PIR, ...) and every second case of a grid also tilted up to 12 deg (oblique affine);
* per channel a global gain (x0.5-x2, log-uniform) and a smooth multiplicative bias field: a random
  third-order polynomial of the scanner's world coordinates, scaled so that its largest deviation inside the
  intracranial volume is 10-15 % (``1 + f``);
* spatially correlated noise: white Gaussian noise smoothed with a Gaussian of ``--noise-sigma`` voxels
  (0.65: lag-1 autocorrelation ~0.52 measured, recorded per case) and rescaled to sd = 2 % of the 99th percentile of the (healthy)
  image; values rounded to a power-of-two step of a quarter to half of that sd (what the rounding adds is
  at most 2 % of the noise variance);
* lesion loads spread from light to heavy within every grid: target loads log-stratified over
  ``--load-range`` mm³ (the label comes out lighter), 3-23 lesions per case; in the heavier cases a share of
  the lesions (up to half) are large (scaled up to 1.8x) periventricular lesions that may touch and merge
  into confluent ones; the rest are placed as in fetch_data (deep/periventricular WM, >= 95 % WM, apart).

Written under DIR:

* ``DIR/dataset``: nnU-Net v2 raw dataset: ``imagesTr/{case}_0000.nii.gz`` FLAIR, ``_0001`` T1,
  ``labelsTr/{case}.nii.gz`` (0 background, 1 lesion = resampled soft lesion fraction >= 0.5),
  ``dataset.json``. Case names carry the grid: ``t080_00`` is the first 0.8 mm case.
* ``DIR/truth`` (kept apart; never give it to the tool under test):
  ``{case}_healthy_0000.nii.gz`` / ``_0001``: the same case acquired identically (same pose, grid, gain,
  bias field and the SAME noise realisation) with no lesion painted: outside the lesions' resampling
  footprint the two are bit-identical; ``{case}_tissue.nii.gz`` (uint8, 0 outside the brain, 1 CSF, 2 GM,
  3 WM); ``cases.json`` (per case: grid, spacing, shape, affine, pose, gains, bias amplitudes, noise sd per
  channel in image units, measured lag-1 noise autocorrelation, target and label loads, every lesion).

Needs the MNI152 maps that ``scripts/fetch_data.py`` (``make data``) unpacks into CACHE/raw/mni152 (CACHE =
``$LESIONSYNTH_DATA`` or ``.cache/data``) and the shared MS lesion masks it reads. 16 cases take a few
minutes on one core.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import fetch_data as fd  # noqa: E402  (scripts/fetch_data.py)

DEFAULT_GRIDS = (0.8, 1.0, 1.2, 3.0)
DEFAULT_LOAD_RANGE = (400.0, 25000.0)  # mm³, target loads (log-stratified per grid)
NOISE_SIGMA_VOX = 0.65  # Gaussian smoothing of the white noise (voxels): lag-1 autocorrelation ~0.52
BIAS_RANGE = (0.10, 0.15)  # largest |bias - 1| inside the intracranial volume
BIAS_SCALE_MM = 100.0  # world coordinates are divided by this in the bias polynomial
BIAS_ORDER = 3
CONFLUENT_SCALE = (0.9, 1.8)  # scale range of the large periventricular lesions
CONFLUENT_WM_SHARE = 0.85  # they may reach the ventricle wall
PERIVENTRICULAR_MM = 6  # centres of the large lesions: WM within this (taxicab, 1 mm grid) of a ventricle
CONFLUENT_FROM_MM3 = 3000.0  # targets above this get confluent lesions, their share rising to
CONFLUENT_MAX_SHARE = 0.5  # this at the top of the load range
COUNT_RANGE = (3, 23)


def case_name(spacing: float, k: int) -> str:
    return f"t{spacing * 100:03.0f}_{k:02d}"


# --------------------------------------------------------------------------------------------------
# Lesion placement (fetch_data's, plus large periventricular lesions that may merge)
# --------------------------------------------------------------------------------------------------


def periventricular_centres(anat: fd.NativeAnatomy) -> np.ndarray:
    """Flat MNI indices of WM voxels within PERIVENTRICULAR_MM of the lateral ventricles (as NativeAnatomy
    finds them: CSF deep inside the intracranial volume)."""
    depth = ndimage.distance_transform_cdt(anat.icv, "chessboard")
    ventricles = (anat.pc > 0.5) & (depth > 25)
    to_ventricle = ndimage.distance_transform_cdt(~ventricles, "taxicab")
    return np.flatnonzero(anat.wm & (to_ventricle <= PERIVENTRICULAR_MM))


def place_lesions_mixed(anat: fd.NativeAnatomy, library: fd.LesionLibrary, peri: np.ndarray,
                        rng: np.random.Generator, target_mm3: float, count: int,
                        confluent_share: float) -> tuple[np.ndarray, list[dict]]:
    """Like fetch_data.place_lesions, but each lesion is, with probability ``confluent_share``, a large
    periventricular one (scale CONFLUENT_SCALE, centre near a ventricle, >= CONFLUENT_WM_SHARE in WM) that
    may touch or overlap the others (confluent lesions); the others keep fetch_data's rules. The load
    counted is an estimate of the label's (new voxels x the lesion's label/mask ratio)."""
    shape = anat.mni.shape
    mask = np.zeros(shape, bool)
    taken = np.zeros(shape, bool)
    placed: list[dict] = []
    log_vol = np.log(library.volumes)
    load, attempts = 0.0, 0
    while len(placed) < count and attempts < 20 * count:
        attempts += 1
        left = count - len(placed)
        want = max(target_mm3 - load, 30.0 * left) / left
        confluent = bool(rng.random() < confluent_share)
        if confluent:
            want *= 2.0
        weight = np.exp(-0.5 * ((log_vol - np.log(want)) / 0.7) ** 2) + 1e-6
        index = int(rng.choice(len(weight), p=weight / weight.sum()))
        scale = (want / library.volumes[index]) ** (1 / 3) * rng.uniform(0.95, 1.05)
        scale = float(np.clip(scale, *(CONFLUENT_SCALE if confluent else fd.NATIVE_LESION_SCALE)))
        lesion = library.on_mni_grid(index, fd.uniform_rotation(rng), scale)
        if lesion is None:
            continue
        effective = int((fd.lesion_fraction(np.pad(lesion, 2)) >= 0.5).sum())
        half = np.array(lesion.shape) // 2
        grown = ndimage.binary_dilation(np.pad(lesion, 1), structure=fd.CONNECTIVITY_26)
        for _ in range(fd.NATIVE_PLACEMENT_TRIES):
            if confluent:
                flat = peri[int(rng.integers(len(peri)))]
            else:
                flat = anat.centres[np.searchsorted(anat.centre_cdf, rng.random())]
            centre = np.unravel_index(flat, shape)
            start = np.array(centre) - half
            stop = start + lesion.shape
            if (start < 1).any() or (stop > np.array(shape) - 1).any():
                continue
            box = tuple(slice(a, b) for a, b in zip(start, stop))
            if anat.wm[box][lesion].mean() < (CONFLUENT_WM_SHARE if confluent else fd.NATIVE_WM_SHARE):
                continue
            big = tuple(slice(a - 1, b + 1) for a, b in zip(start, stop))
            if not confluent and (taken[big] & grown).any():
                continue
            new = int((lesion & ~mask[box]).sum())
            mask[box] |= lesion
            taken[big] |= grown
            load += effective * new / max(int(lesion.sum()), 1)
            world = anat.mni.affine @ [*centre, 1.0]
            placed.append({"source": index, "scale": round(scale, 3), "confluent": confluent,
                           "voxels": int(lesion.sum()), "label_voxels": effective,
                           "centre_mni_mm": [round(float(v), 1) for v in world[:3]]})
            break
    return mask, placed


# --------------------------------------------------------------------------------------------------
# The scanner: isotropic grid, box-profile sampling, bias field, correlated noise
# --------------------------------------------------------------------------------------------------


def iso_grid(anat: fd.NativeAnatomy, rng: np.random.Generator, code: str, oblique: bool, pose: np.ndarray,
             spacing: float) -> tuple[tuple[int, int, int], np.ndarray, dict]:
    """fetch_data.native_grid with an isotropic voxel of ``spacing`` mm."""
    spacing_v = np.full(3, float(spacing))
    tilt = fd.random_rotation(rng, fd.OBLIQUE_TILT_DEG) if oblique else np.eye(3)
    directions = tilt @ fd.orientation_matrix(code)
    points = (pose[:3, :3] @ anat.head_points.T).T + pose[:3, 3]
    coords = points @ directions / spacing_v
    low = coords.min(axis=0) - fd.FOV_MARGIN_MM / spacing_v
    high = coords.max(axis=0) + fd.FOV_MARGIN_MM / spacing_v
    shape = tuple(int(v) for v in np.ceil(high - low).astype(int) + 1)
    affine = np.eye(4)
    affine[:3, :3] = directions * spacing_v
    affine[:3, 3] = directions @ (low * spacing_v)
    tilt_deg = float(np.degrees(np.arccos(np.clip((np.trace(tilt) - 1) / 2, -1, 1))))
    info = {"spacing_mm": [round(float(spacing), 3)] * 3, "axis_code": code,
            "orientation": "".join(fd.nib.aff2axcodes(affine)), "oblique": oblique,
            "tilt_deg": round(tilt_deg, 2)}
    return shape, affine, info


def box_sample(volume: np.ndarray, src_affine: np.ndarray, shape, affine: np.ndarray,
               to_src: np.ndarray) -> np.ndarray:
    """What the scanner measures per voxel: the mean over the voxel (box profile sampled about every
    fetch_data.NATIVE_PSF_STEP mm per axis, linear interpolation), as fetch_data.native_case does."""
    steps = [max(1, int(round(v / fd.NATIVE_PSF_STEP))) for v in fd.voxel_sizes(affine)]
    total = None
    for offset in np.ndindex(*steps):
        shift = [(o + 0.5) / k - 0.5 for o, k in zip(offset, steps)]
        part = fd.resample(volume, src_affine, shape, affine @ fd.translation(shift), order=1,
                           dst_to_src_world=to_src)
        total = part if total is None else total + part
    return (total / float(np.prod(steps))).astype(np.float32)


def native_footprint(mni_box, mni_affine: np.ndarray, pose: np.ndarray, affine: np.ndarray, shape,
                     margin: int = 3) -> tuple[slice, ...]:
    """The native voxel box covering an MNI voxel box (through the pose), plus ``margin`` voxels."""
    corners = np.array([[[s.start, s.stop - 1][b] for s, b in zip(mni_box, bits)]
                        for bits in np.ndindex(2, 2, 2)])
    world = pose @ mni_affine @ np.c_[corners, np.ones(8)].T
    vox = (np.linalg.inv(affine) @ world)[:3].T
    lo = np.maximum(np.floor(vox.min(axis=0)).astype(int) - margin, 0)
    hi = np.minimum(np.ceil(vox.max(axis=0)).astype(int) + margin + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def world_grid(shape, affine: np.ndarray, centre) -> list[np.ndarray]:
    """(x, y, z) world coordinates (mm) minus ``centre`` over a grid, as three float32 arrays."""
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    coords = []
    for k in range(3):
        value = np.float32(affine[k, 3] - centre[k])
        total = None
        for j in range(3):
            part = (np.float32(affine[k, j]) * axes[j]).reshape([-1 if d == j else 1 for d in range(3)])
            total = part if total is None else total + part
        coords.append(np.broadcast_to(total + value, shape).astype(np.float32))
    return coords


def monomials(order: int) -> list[tuple[int, int, int]]:
    return [(a, b, c) for a in range(order + 1) for b in range(order + 1) for c in range(order + 1)
            if 1 <= a + b + c <= order]


def bias_field(coords: list[np.ndarray], inside: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """1 + f, f a random polynomial (degrees 1..BIAS_ORDER, higher degrees weaker) of the world
    coordinates / BIAS_SCALE_MM, scaled so that max |f| inside ``inside`` is U(BIAS_RANGE); clipped to
    [0.6, 1.4] outside the brain."""
    u = [c / np.float32(BIAS_SCALE_MM) for c in coords]
    terms = monomials(BIAS_ORDER)
    coef = rng.standard_normal(len(terms)) / np.array([2.0 ** (sum(t) - 1) for t in terms])
    powers = [[None, v, v * v, v * v * v][: BIAS_ORDER + 1] for v in u]
    field = np.zeros(u[0].shape, np.float32)
    for (a, b, c), w in zip(terms, coef):
        term = np.full(u[0].shape, np.float32(w), np.float32)
        for p, k in zip((a, b, c), range(3)):
            if p:
                term *= powers[k][p]
        field += term
    amplitude = float(rng.uniform(*BIAS_RANGE))
    field *= np.float32(amplitude / max(float(np.abs(field[inside]).max()), 1e-6))
    bias = np.clip(1.0 + field, 0.6, 1.4).astype(np.float32)
    return bias, {"amplitude": round(amplitude, 4), "order": BIAS_ORDER, "scale_mm": BIAS_SCALE_MM,
                  "range_in_brain": [round(float(bias[inside].min()), 4), round(float(bias[inside].max()), 4)]}


def correlated_noise(shape, sd: float, sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise smoothed by a Gaussian of ``sigma_vox`` voxels, rescaled to sd ``sd``."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    if sigma_vox > 0:
        noise = ndimage.gaussian_filter(noise, sigma_vox, mode="wrap")
    noise *= np.float32(sd / float(noise.std()))
    return noise


def lag1_autocorrelation(noise: np.ndarray) -> list[float]:
    """Lag-1 autocorrelation of a noise array along each voxel axis (on a central block of <= 64³)."""
    centre = [n // 2 for n in noise.shape]
    block = noise[tuple(slice(max(c - 32, 0), c + 32) for c in centre)].astype(np.float64)
    block = block - block.mean()
    out = []
    for ax in range(3):
        a = np.moveaxis(block, ax, 0)
        out.append(round(float((a[1:] * a[:-1]).mean() / (a * a).mean()), 3))
    return out


def quantise(image: np.ndarray, quantum: np.float32) -> np.ndarray:
    return (np.round(image / quantum) * quantum).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------


def truth_case(anat: fd.NativeAnatomy, library: fd.LesionLibrary, peri: np.ndarray, seed: int, code: str,
               oblique: bool, spacing: float, load_range, noise_sigma: float, load_top: float) -> dict:
    """One case: lesion and healthy [FLAIR, T1], label, tissue, affine and its metadata. The target load is
    log-uniform in ``load_range``; the share of confluent lesions rises from CONFLUENT_FROM_MM3 up to
    ``load_top`` (the top of the whole dataset's range)."""
    mni = anat.mni
    rng = np.random.default_rng(seed)
    target = float(np.exp(rng.uniform(*np.log(load_range))))
    top = max(float(load_top), 2 * CONFLUENT_FROM_MM3)
    heavy = np.clip(np.log(target / CONFLUENT_FROM_MM3) / np.log(top / CONFLUENT_FROM_MM3), 0, 1)
    confluent_share = float(CONFLUENT_MAX_SHARE * heavy)
    count = int(np.clip(round(target ** (1 / 3) / 1.5) + int(rng.integers(-2, 5)), *COUNT_RANGE))
    mask, placed = place_lesions_mixed(anat, library, peri, rng, target, count, confluent_share)
    if not mask.any():
        raise SystemExit(f"truth_data: seed {seed}: no lesion could be placed")
    # Lesion minus healthy, painted in MNI space in the lesions' box only (zero at the box's edges).
    mbox = tuple(slice(max(int(i.min()) - 4, 0), int(i.max()) + 5) for i in np.nonzero(mask))
    box_affine = mni.affine @ fd.translation([s.start for s in mbox])
    frac = fd.lesion_fraction(mask[mbox])
    flair_h, t1_h = anat.flair[mbox], anat.t1[mbox]
    d_flair = fd.paint_lesion(flair_h, frac, fd.FLAIR_LESION_LEVEL * anat.wm_flair) - flair_h
    d_t1 = fd.paint_lesion(t1_h, frac, fd.NATIVE_T1_LESION_LEVEL * mni.wm_t1) - t1_h
    # The scanner.
    pose = fd.head_pose(anat, rng)
    shape, affine, info = iso_grid(anat, rng, code, oblique, pose, spacing)
    to_mni = np.linalg.inv(pose)

    def sample(volume, src_affine=mni.affine, dst_shape=shape, dst_affine=affine):
        return box_sample(volume, src_affine, dst_shape, dst_affine, to_mni)

    healthy = [sample(anat.flair), sample(anat.t1)]
    nbox = native_footprint(mbox, mni.affine, pose, affine, shape)
    sub_shape = tuple(s.stop - s.start for s in nbox)
    sub_affine = affine @ fd.translation([s.start for s in nbox])
    label = np.zeros(shape, np.uint8)
    label[nbox] = sample(frac, box_affine, sub_shape, sub_affine) >= 0.5
    diffs = [sample(d, box_affine, sub_shape, sub_affine) for d in (d_flair, d_t1)]
    # Tissue truth, as fetch_data.native_case.
    icv = sample(anat.icv.astype(np.float32))
    gm, wm = sample(anat.pg), sample(anat.pw)
    probs = np.stack([icv - gm - wm, gm, wm])
    inside = icv >= 0.5
    tissue = np.where(inside, probs.argmax(axis=0) + 1, 0).astype(np.uint8)
    del probs, icv, gm, wm
    gains = np.exp(rng.uniform(*np.log(fd.NATIVE_GAIN_RANGE), 2))
    centre = pose[:3, :3] @ anat.brain_centre + pose[:3, 3]
    coords = world_grid(shape, affine, centre)
    images, truths, noise_info = [], [], []
    for c, name in enumerate(("FLAIR", "T1")):
        bias, bias_info = bias_field(coords, inside, rng)
        clean = healthy[c] * bias * np.float32(gains[c])
        sd = fd.NOISE_FRACTION * float(np.percentile(clean, 99))
        noise = correlated_noise(shape, sd, noise_sigma, rng)
        quantum = np.float32(2.0 ** np.floor(np.log2(sd / 2.0)))
        truth = quantise(clean + noise, quantum)
        image = truth.copy()
        changed = diffs[c] != 0  # outside the lesions' resampling footprint the two stay bit-identical
        sub = (clean[nbox] + diffs[c] * bias[nbox] * np.float32(gains[c])) + noise[nbox]
        image[nbox] = np.where(changed, quantise(sub, quantum), truth[nbox])
        acorr = lag1_autocorrelation(truth - clean)
        images.append(image)
        truths.append(truth)
        noise_info.append({"channel": name, "gain": round(float(gains[c]), 4), "bias": bias_info,
                           "noise_sd": round(sd, 5), "quantum": float(quantum), "noise_sigma_vox": noise_sigma,
                           "noise_lag1_autocorrelation": acorr})
        del bias, clean, noise
    voxel_mm3 = float(np.prod(fd.voxel_sizes(affine)))
    info.update({
        "seed": seed, "grid_mm": spacing, "shape": list(shape), "affine": np.round(affine, 5).tolist(),
        "pose_mni_to_native": np.round(pose, 6).tolist(), "channels": noise_info,
        "noise_sd": [n["noise_sd"] for n in noise_info], "gains": [n["gain"] for n in noise_info],
        "target_load_mm3": round(target, 1), "confluent_share": round(confluent_share, 3),
        "lesions_placed": len(placed), "confluent_lesions": sum(p["confluent"] for p in placed),
        "mni_load_mm3": int(mask.sum()), "native_load_mm3": round(float(label.sum()) * voxel_mm3, 1),
        "native_components": int(ndimage.label(label, structure=fd.CONNECTIVITY_26)[1]),
        "lesion_footprint_voxels": [[s.start, s.stop] for s in nbox],
        "lesions": placed,
    })
    return {"images": images, "healthy": truths, "label": label, "tissue": tissue, "affine": affine,
            "info": info}


# --------------------------------------------------------------------------------------------------


def build(out: Path, grids, cases_per_grid: int, seed: int, load_range, noise_sigma: float,
          mni_dir: Path, shared: Path) -> dict:
    started = time.monotonic()
    mni = fd.MNI(mni_dir)
    anat, library = fd.NativeAnatomy(mni), fd.LesionLibrary(shared)
    peri = periventricular_centres(anat)
    print(f"[truth_data] anatomy and {len(library.items)} lesion shapes: {time.monotonic() - started:.0f}s",
          flush=True)
    codes = fd.all_orientations()
    order = np.random.default_rng(seed).permutation(len(codes))
    cases: dict[str, dict] = {}
    n_total = len(grids) * cases_per_grid
    with fd.building(out / "truth") as truth_root, fd.building(out / "dataset") as root:
        index = 0
        for g, spacing in enumerate(grids):
            strata = fd.native_load_strata(cases_per_grid, seed + 101 * (g + 1), load_range)
            for k in range(cases_per_grid):
                t0 = time.monotonic()
                case = case_name(spacing, k)
                made = truth_case(anat, library, peri, seed + index, codes[order[index % len(codes)]],
                                  k % 2 == 1, float(spacing), strata[k], noise_sigma, load_range[1])
                fd.write_nnunet_case(root, case, made["images"], made["label"], made["affine"])
                for c, img in enumerate(made["healthy"]):
                    fd.save_nifti(truth_root / f"{case}_healthy_{c:04d}.nii.gz", img, made["affine"])
                fd.save_nifti(truth_root / f"{case}_tissue.nii.gz", made["tissue"], made["affine"])
                info = made["info"]
                cases[case] = info
                index += 1
                print(f"[truth_data] {index}/{n_total} {case}: {spacing:g} mm {info['orientation']}"
                      f"{' oblique' if info['oblique'] else ''} {'x'.join(map(str, info['shape']))}, "
                      f"{info['lesions_placed']} lesions ({info['confluent_lesions']} confluent), "
                      f"label {info['native_load_mm3']:.0f} mm3 in {info['native_components']} components, "
                      f"noise lag-1 {info['channels'][0]['noise_lag1_autocorrelation']}, "
                      f"{time.monotonic() - t0:.1f}s", flush=True)
        fd.write_nnunet_json(root, "inpaint_truth", {"0": "FLAIR", "1": "T1"}, fd.LESION_LABELS, n_total,
                             "MNI152 2009 anatomy in native scanner space (isotropic grids, random head pose, "
                             "oblique grids, gain, bias field, correlated noise) with real MS lesion shapes; "
                             "healthy truth kept apart (benchmarks/truth_data.py)")
        fd.write_json(truth_root / "cases.json", {
            "tissue_labels": fd.TISSUE_LABELS, "channels": ["FLAIR", "T1"],
            "config": {"grids_mm": list(grids), "cases_per_grid": cases_per_grid, "seed": seed,
                       "load_range_mm3": list(load_range), "noise_sigma_vox": noise_sigma,
                       "noise_fraction_of_p99": fd.NOISE_FRACTION, "bias_range": list(BIAS_RANGE),
                       "gain_range": list(fd.NATIVE_GAIN_RANGE)},
            "cases": cases})
    print(f"[truth_data] {n_total} cases in {time.monotonic() - started:.0f}s: {out / 'dataset'}, "
          f"truth {out / 'truth'}", flush=True)
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (gets dataset/ and truth/)")
    parser.add_argument("--cases-per-grid", type=int, default=4)
    parser.add_argument("--grids", type=float, nargs="+", default=list(DEFAULT_GRIDS),
                        help="isotropic voxel sizes (mm)")
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--load-range", type=float, nargs=2, default=list(DEFAULT_LOAD_RANGE),
                        metavar=("LO", "HI"), help="target lesion loads (mm³), log-stratified per grid")
    parser.add_argument("--noise-sigma", type=float, default=NOISE_SIGMA_VOX,
                        help="Gaussian smoothing of the noise (voxels); 0 = white noise")
    parser.add_argument("--cache", type=Path, default=None,
                        help="fetch_data's cache (default $LESIONSYNTH_DATA or .cache/data): raw/mni152")
    parser.add_argument("--force", action="store_true", help="replace OUT/dataset and OUT/truth")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    mni_dir = (args.cache or fd.default_cache()).resolve() / "raw" / "mni152"
    if not mni_dir.is_dir():
        raise SystemExit(f"truth_data: {mni_dir} not found: run scripts/fetch_data.py (make data) first")
    try:
        shared = fd.shared_data_dir()
    except fd.FetchError as exc:
        raise SystemExit(f"truth_data: {exc}") from None
    for part in (out / "dataset", out / "truth"):
        if part.exists():
            if not args.force:
                raise SystemExit(f"truth_data: {part} exists (use --force to replace it)")
            shutil.rmtree(part)
    out.mkdir(parents=True, exist_ok=True)
    build(out, args.grids, args.cases_per_grid, args.seed, tuple(args.load_range), args.noise_sigma,
          mni_dir, shared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
