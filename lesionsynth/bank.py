"""Lesion bank: every lesion cut out of a dataset with its crops and metadata, stored for lazy reading."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy import ndimage

from ._version import __version__
from .errors import InputError, check_choice, check_field
from .geometry import apply_affine, ball, crop_affine, dilate, spacing_of, structure_for, voxel_volume
from .io import Case, CaseRef, load_case, open_dataset
from .io.locate import dataset_record, file_fingerprint, located, relative_to
from .io.nifti import save_nifti
from .labels import count_in, label_in, nesting_order
from .prior import (Grid, Region, allowed_region, coarse_likelihood, finish_likelihood, is_ct, likelihood_on,
                    on_grid, reference_grid, region_world_points, splat)
from .space import (ALIGNED_OVERLAP, POOR_OVERLAP, SPACES, RegImage, Registration, closest_case, foreground_overlap,
                    provisional_reference, reference_grid_of, register_case, registration_image, world_overlap)
from .render.paste import SPLINE_PAD, spline_coefficients
from .stats import noise_sd

BANK_FORMAT = 1
IMAGES_FILE = "lesion_images.f32"
MASKS_FILE = "lesion_masks.u8"
#: The crops' cubic B-spline coefficients (`render.paste.spline_coefficients`), made once here rather than per
#: paste in every worker; memory-mapped, so the workers of a run share one copy in the page cache.
SPLINES_FILE = "lesion_splines.f32"
#: The label values (uint8, 0 outside the lesion) of the crops of multi-class lesions only (`labels_offset`).
LABEL_VALUES_FILE = "lesion_label_values.u8"
LIKELIHOOD_FILE = "likelihood.nii.gz"
REGIONS_FILE = "body_regions.u1"  # packed coarse body masks of the cases without region labels
TEMPLATE_REGION_FILE = "template_region.nii.gz"  # the template's tissue prior on the likelihood grid
#: Bytes of per-lesion derived data (`Bank.derived`) a worker keeps between pastes.
DERIVED_BYTES = 16 * 2**20


@dataclass(frozen=True)
class BankConfig:
    """How lesions are cut out and the likelihood map is built."""

    lesion_labels: tuple[int, ...] = (1,)
    region_labels: tuple[int, ...] = ()
    connectivity: int = 26
    min_volume_mm3: float = 0.0
    margin_mm: float = 5.0          # crop margin around the lesion's bounding box
    shell_mm: float = 3.0           # width of the normal-tissue shell used for intensity statistics
    likelihood_sigma_mm: float = 4.0
    likelihood_floor: float = 0.01
    likelihood_spacing_mm: float = 2.0  # grid spacing when cases lie on different grids
    space: str = "auto"             # common space: auto, world or register (see space.py)
    template: str | None = None     # a template image to register to (else the case closest to the others)
    template_region: str | None = None  # tissue prior (probability map) in the template's space
    exclude_cases: tuple[str, ...] = ()  # cases left out (e.g. one whose registration is poor)
    # foreground overlap (Dice) below which a registration is poor; a brain-only template against images that
    # show the head overlaps about 0.75-0.8 even when aligned
    min_overlap: float = POOR_OVERLAP

    def __post_init__(self) -> None:  # a bad config fails where it is made, naming its field
        check_field(self, "lesion_labels", len(self.lesion_labels) > 0 and 0 not in self.lesion_labels,
                    "must name one or more labels other than 0 (the background)")
        check_choice(self, "connectivity", (6, 18, 26))
        check_field(self, "min_volume_mm3", self.min_volume_mm3 >= 0, "must be ≥ 0")
        check_choice(self, "space", SPACES)
        check_field(self, "min_overlap", 0.0 < self.min_overlap <= 1.0, "must be in (0, 1]")


def lesion_mask(label: np.ndarray, lesion_labels) -> np.ndarray:
    return label_in(label, lesion_labels)


def lesion_load_volume(les: dict, load_labels=None) -> float:
    """A bank lesion's volume (mm³) counted on `load_labels` (all its labels: None)."""
    if not load_labels or "volume_by_label" not in les:
        return les["volume_mm3"]
    return float(sum(les["volume_by_label"].get(str(v), 0.0) for v in load_labels))


def case_load(label: np.ndarray, affine: np.ndarray, lesion_labels) -> tuple[float, int]:
    """Lesion load of a label volume: (mm³, voxels), counting every lesion voxel."""
    voxels = int(np.count_nonzero(lesion_mask(label, lesion_labels)))
    return voxels * voxel_volume(affine), voxels


def _robust_stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "p5": None, "p95": None}
    v = values.astype(np.float64)
    p5, med, p95 = np.percentile(v, [5, 50, 95])
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(med), "std": float(v.std()),
            "p5": float(p5), "p95": float(p95)}


#: Levels of the shell deviation quantiles kept per lesion (see `shell_deviation`).
DEVIATION_LEVELS = tuple(round(0.1 * k, 1) for k in range(1, 11))


def shell_deviation(crop: np.ndarray, shell: np.ndarray, ct_channels) -> list[float] | None:
    """How alike a lesion's surroundings are: quantiles (DEVIATION_LEVELS) over its shell voxels of each
    voxel's distance from the shell's median signature (`prior.signature_distances`). The context match asks
    the tissue a paste covers to be as alike the donor's surroundings as those surroundings are themselves."""
    from .prior import signature_distances

    if not shell.any():
        return None
    values = crop[:, shell].astype(np.float64)
    medians = np.median(values, axis=1)
    if any(m <= 0 for m, ct in zip(medians, ct_channels) if not ct):
        return None
    # a zero or negative voxel of an MR channel is as unlike as it gets (inf, kept finite for the quantiles)
    worst = np.minimum(signature_distances(values, medians, ct_channels), 1e3)
    return [round(float(q), 4) for q in np.quantile(worst, DEVIATION_LEVELS)]


def extract_lesions(case: Case, config: BankConfig, ct_channels=None) -> list[dict]:
    """Cut every lesion (connected component ≥ min volume) out of a case: crops plus metadata."""
    spacing = spacing_of(case.affine)
    vox_vol = voxel_volume(case.affine)
    any_lesion = lesion_mask(case.label, config.lesion_labels)
    components, n = ndimage.label(any_lesion, structure=structure_for(config.connectivity))
    if n == 0:
        return []
    objects = ndimage.find_objects(components)
    margin = np.ceil(config.margin_mm / spacing).astype(int)
    shell_ball = ball(config.shell_mm, spacing)
    lesions = []
    for k, box in enumerate(objects, start=1):
        sl = tuple(slice(max(b.start - m, 0), min(b.stop + m, size))
                   for b, m, size in zip(box, margin, case.label.shape))
        mask = components[sl] == k
        voxels = int(mask.sum())
        volume = voxels * vox_vol
        if volume < config.min_volume_mm3:
            continue
        label_crop = case.label[sl]
        values, counts = np.unique(label_crop[mask], return_counts=True)
        label_value = int(values[counts.argmax()])
        by_label = {str(int(v)): int(n) for v, n in zip(values, counts)}
        shell = dilate(mask, shell_ball) & ~any_lesion[sl]
        # the voxels touching the lesion carry its partial volume: they are not the tissue it sits in
        clean = shell & ~dilate(mask)
        if np.count_nonzero(clean) >= 10:
            shell = clean
        start = np.array([s.start for s in sl])
        centroid_vox = np.argwhere(mask).mean(axis=0) + start
        crop = case.channels[(slice(None),) + sl]
        stats = []
        for c in range(crop.shape[0]):
            stats.append({"lesion": _robust_stats(crop[c][mask]), "shell": _robust_stats(crop[c][shell]),
                          "noise_sd": noise_sd(crop[c], shell)})
        deviation = shell_deviation(crop, shell, ct_channels or (False,) * crop.shape[0])
        core_box = [[int(b.start - s.start), int(b.stop - s.start)] for b, s in zip(box, sl)]
        lesions.append({
            "id": f"{case.case_id}_L{k:03d}",
            "source_case": case.case_id,
            "label_value": label_value,
            "labels": [int(v) for v in values],
            "volume_mm3": volume,
            "voxels": voxels,
            "voxels_by_label": by_label,
            "volume_by_label": {v: n * vox_vol for v, n in by_label.items()},
            "centroid_mm": apply_affine(case.affine, centroid_vox).tolist(),
            "spacing_mm": spacing.tolist(),
            "shape": list(mask.shape),
            "mask_box": core_box,  # the lesion's bounding box inside the crop (voxels, half-open)
            "affine": crop_affine(case.affine, start).tolist(),
            "stats": stats,
            "shell_deviation": deviation,
            "_image": np.ascontiguousarray(crop, dtype=np.float32),
            "_mask": np.ascontiguousarray(mask, dtype=np.uint8),
        })
        if len(values) > 1:  # a multi-class lesion keeps its inner label values and their nesting
            inner = np.where(mask, label_crop, 0).astype(np.uint8)
            lesions[-1].update(multi_class_parts(crop, inner, spacing))
    return lesions


def multi_class_parts(crop: np.ndarray, values: np.ndarray, spacing) -> dict:
    """What the bank keeps of a multi-class lesion beyond its mask: its crop of label values (`_labels`, 0
    outside the lesion), the labels' nesting (`label_order`, outermost first) and per channel the intensity
    statistics of each label's voxels (`stats_by_label`, label value (str) → stats)."""
    order = nesting_order(values, spacing)
    stats = [{str(v): _robust_stats(channel[values == v]) for v in order} for channel in crop]
    return {"label_order": list(order), "stats_by_label": stats,
            "_labels": np.ascontiguousarray(values, dtype=np.uint8)}


def intensity_reference(channels: np.ndarray, region: Region) -> list[float]:
    """Per channel, the median over the case's coarse allowed region: the unit in which the context match
    compares tissue across cases, so that a scanner's intensity gain does not matter."""
    sl = tuple(slice(None, None, s) for s in region.stride)
    out = []
    for channel in channels:
        coarse = channel[sl][tuple(slice(0, n) for n in region.coarse.shape)]
        values = coarse[region.coarse] if region.coarse.any() else coarse.ravel()
        out.append(round(float(np.median(values)), 6))
    return out


def _scan_case(ref: CaseRef, n_channels: int, channel_names, config: BankConfig) -> dict:
    """Worker: load one case, cut its lesions, and collect what the likelihood map needs."""
    case = load_case(ref, n_channels)
    load_mm3, load_voxels = case_load(case.label, case.affine, config.lesion_labels)
    by_label = {}
    if len(config.lesion_labels) > 1:  # the load of each lesion label (generate --load-label)
        by_label = {"load_by_label": {str(int(v)): count_in(case.label, (v,)) * voxel_volume(case.affine)
                                      for v in config.lesion_labels}}
    lesions = extract_lesions(case, config, tuple(is_ct(name) for name in channel_names))
    region = allowed_region(case.channels, case.label, case.affine, channel_names, config.region_labels)
    lesion_idx = np.argwhere(lesion_mask(case.label, config.lesion_labels))
    return {
        "reg_image": registration_image(case.channels[0], case.affine, channel_names[0]),
        "case": {
            "case_id": case.case_id,
            "images": [str(Path(p).resolve()) for p in ref.image_paths],
            "label": str(Path(ref.label_path).resolve()),
            # size and checksum: whether a dataset found elsewhere (relocate, --data-root) holds these cases
            "files": [file_fingerprint(p) for p in [*ref.image_paths, ref.label_path]],
            "four_d": ref.four_d,
            "shape": list(case.label.shape),
            "affine": case.affine.tolist(),
            "load_mm3": load_mm3,
            "load_voxels": load_voxels,
            **by_label,
            "lesion_count": len(lesions),
            "region_from_labels": bool(region.region_labels),
            "intensity_ref": intensity_reference(case.channels, region),
        },
        "lesions": lesions,
        "lesion_world": apply_affine(case.affine, lesion_idx).astype(np.float32),
        "voxel_volume": voxel_volume(case.affine),
        "region_world": region_world_points(region, case.affine).astype(np.float32),
        "region_stride": region.stride,
        # the body mask costs a closing and a hole filling of the whole case: done once here, not per output
        "body_region": None if region.region_labels else region.coarse,
    }


def build_bank(dataset: str | Path, out: str | Path, config: BankConfig | None = None, jobs: int = 1,
               progress: bool = True, extra_run_info: dict | None = None, backend: str = "local",
               scheduler: str | None = None) -> Path:
    """Build a lesion bank from DATASET into the new folder OUT and return its path.

    Writes `bank.json` (index and metadata), the lesion crops as flat memory-mappable arrays, and the
    lesion likelihood map as NIfTI. Nothing is left behind if it fails.
    """
    from tqdm import tqdm

    from .parallel import check_backend, execution

    config = config or BankConfig()
    check_backend(backend, scheduler)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: output folder exists and is not empty; choose a new folder")
    spec = open_dataset(dataset)
    if spec.problems:
        raise InputError(spec.problems[0] + (f" (and {len(spec.problems) - 1} more problems; run "
                                             f"'lesionsynth check {dataset}')" if len(spec.problems) > 1 else ""))
    if not spec.cases:
        raise InputError(f"{dataset}: no cases found")
    declared = set(spec.labels.values())
    if declared:
        for v in list(config.lesion_labels) + list(config.region_labels):
            if v not in declared:
                raise InputError(f"{dataset}: label {v} is not declared in dataset.json labels {spec.labels}")
    if config.space not in SPACES:
        raise InputError(f"--space {config.space!r}: choose one of {', '.join(SPACES)}")
    if config.template_region and not config.template:
        raise InputError("--template-region needs --template (the image the tissue prior is aligned with)")
    if config.template and config.space == "world":
        raise InputError("--template needs --space register or auto (the cases are registered to it)")
    template = _read_template(config) if config.template else None
    spec.cases = _without_excluded(spec.cases, config.exclude_cases, dataset)
    n_channels = len(spec.channel_names)
    with execution(backend, scheduler, jobs) as runner:
        results = runner.map(_scan_case, [(ref, n_channels, spec.channel_names, config) for ref in spec.cases])
        results = list(tqdm(results, total=len(spec.cases), desc="build-bank", unit="case", disable=not progress))
        if not any(r["lesions"] for r in results):
            raise InputError(f"{dataset}: no lesion found with label(s) {list(config.lesion_labels)}"
                             f" and volume ≥ {config.min_volume_mm3} mm³")
        space = common_space(results, config, template, runner, progress, dataset)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_bank(staging, spec, results, config, extra_run_info or {}, space, progress)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _without_excluded(cases: list[CaseRef], excluded, dataset) -> list[CaseRef]:
    known = {ref.case_id for ref in cases}
    unknown = sorted(set(excluded) - known)
    if unknown:
        raise InputError(f"--exclude-case {unknown[0]}: no such case in {dataset}")
    kept = [ref for ref in cases if ref.case_id not in set(excluded)]
    if not kept:
        raise InputError(f"{dataset}: every case is excluded")
    return kept


def _read_template(config: BankConfig) -> dict:
    """The template image (first volume if 4-D) as a registration image, and its tissue prior if given."""
    from .io.images import load_image
    from .io.nifti import read_array

    def volume(path_text: str) -> tuple[np.ndarray, np.ndarray]:
        path = Path(path_text)
        if not path.is_file():
            raise InputError(f"{path}: template file not found")
        img = load_image(path)
        data = np.asarray(read_array(img, path), dtype=np.float32)
        if data.ndim == 4:
            data = data[..., 0]
        if data.ndim != 3:
            raise InputError(f"{path}: a template must be a 3-D image, got shape {data.shape}")
        if not np.isfinite(data).all():
            raise InputError(f"{path}: template holds NaN or infinite voxels")
        return data, np.asarray(img.affine, dtype=np.float64)

    image, affine = volume(config.template)
    out = {"image": registration_image(image, affine, "template"), "path": str(Path(config.template).resolve())}
    if config.template_region:
        prior, prior_affine = volume(config.template_region)
        peak = float(prior.max())
        if peak <= 0:
            raise InputError(f"{config.template_region}: the tissue prior is zero everywhere")
        # probability maps come as 0-1, 0-100 or 0-255
        out["region"] = (np.clip(prior / (1.0 if peak <= 1.0 else peak), 0.0, 1.0), prior_affine)
        out["region_path"] = str(Path(config.template_region).resolve())
    return out


def common_space(results: list[dict], config: BankConfig, template: dict | None, runner, progress: bool,
                 dataset) -> dict:
    """Decide the bank's common space and register the cases when it is `register`.

    Stores per case `registration` (see `space.Registration.as_json`) in `results[i]["case"]` and returns
    the bank.json `space` record (mode, why, the reference). With no template the reference is chosen
    group-wise: every case is registered to the case of median foreground volume, then the case closest to
    the others becomes the reference and the transforms are composed onto it. A poor registration falls back
    to world space under `auto` (and says so), and is an InputError naming the cases otherwise.
    """
    from tqdm import tqdm

    images: list[RegImage] = [r.pop("reg_image") for r in results]
    grids = [Grid(tuple(r["case"]["shape"]), np.array(r["case"]["affine"])) for r in results]
    mode, why = config.space, "asked for"
    if mode == "auto":
        if template is not None:
            mode, why = "register", "auto: a template was given"
        elif reference_grid(grids, config.likelihood_spacing_mm)[1]:
            mode, why = "world", "auto: all cases share one grid"
        else:
            first = provisional_reference(images)
            worst = min(world_overlap(images[first], img) for img in images)
            mode, why = (("world", f"auto: the cases are aligned in world space (foreground overlap ≥ {worst:.2f})")
                         if worst >= ALIGNED_OVERLAP else
                         ("register", f"auto: the cases are not aligned in world space (foreground overlap down to "
                                      f"{worst:.2f})"))
    if mode == "world":
        return {"mode": "world", "why": why, "reference_name": "world space"}
    if template is not None:
        reference, ref_name = template["image"], f"template {Path(template['path']).name}"
        calls = [(reference, img) for img in images]
    else:
        first = provisional_reference(images)
        reference = images[first]
        calls = [(reference, img) for k, img in enumerate(images) if k != first]
    regs = list(tqdm(runner.map(register_case, calls), total=len(calls), desc="register", unit="case",
                     disable=not progress))
    if template is None:
        identity = Registration(np.eye(4), foreground_overlap(reference, reference, np.eye(4)), 0.0, 0.0)
        regs.insert(first, identity)
        best = closest_case(images, [r.ref_from_case for r in regs], reference)
        if best != first:  # compose onto the closest case: ref_from_case_i = (best_from_first) @ first_from_case_i
            best_from_first = np.linalg.inv(regs[best].ref_from_case)
            reference = images[best]
            regs = [Registration(best_from_first @ r.ref_from_case,
                                 foreground_overlap(reference, img, np.linalg.inv(best_from_first @ r.ref_from_case)),
                                 r.metric, r.seconds) for r, img in zip(regs, images)]
        ref_name = f"case {results[best]['case']['case_id']}"
    poor = [(r["case"]["case_id"], reg.overlap) for r, reg in zip(results, regs) if reg.poor_below(config.min_overlap)]
    if poor and config.space == "auto" and template is None:
        named = ", ".join(f"{cid} ({ov:.2f})" for cid, ov in poor)
        return {"mode": "world", "reference_name": "world space",
                "why": f"auto: registration to the case {results[best]['case']['case_id']} was poor for {named}, so "
                       f"the cases' world coordinates are used; --space register to insist, --exclude-case to drop "
                       f"a case"}
    if poor:
        named = ", ".join(f"{cid} (overlap {ov:.2f})" for cid, ov in poor)
        raise InputError(f"{dataset}: registration to the reference {ref_name} is poor for {named}"
                         f" (foreground overlap < {config.min_overlap:g}): check those cases, leave them out with "
                         f"--exclude-case ID, or build with --space world"
                         + (f"; a brain-only template against images that show the head (or the other way round) "
                            f"overlaps about 0.75-0.8 even when aligned: --min-overlap 0.7 accepts that"
                            if template is not None else ""))
    for r, reg in zip(results, regs):
        r["case"]["registration"] = reg.as_json(config.min_overlap)
    record = {"mode": "register", "why": why, "reference_name": ref_name, "transform": "affine",
              "registration_mm": float(spacing_of(images[0].affine).mean().round(2)),
              "poor_overlap": config.min_overlap,
              "_reference_image": reference}
    if template is None:
        record["reference"] = {"kind": "case", "case_id": results[best]["case"]["case_id"]}
    else:
        record["reference"] = {"kind": "template", "path": template["path"],
                               "region_path": template.get("region_path")}
        if "region" in template:
            record["_template_region"] = template["region"]
    return record


def _write_bank(folder: Path, spec, results: list[dict], config: BankConfig, extra: dict, space: dict,
                progress: bool = False) -> None:
    from tqdm import tqdm

    lesions_meta = []
    image_offset = mask_offset = spline_offset = values_offset = 0
    with open(folder / IMAGES_FILE, "wb") as fi, open(folder / MASKS_FILE, "wb") as fm, \
            open(folder / SPLINES_FILE, "wb") as fs, open(folder / LABEL_VALUES_FILE, "wb") as fv:
        for r in tqdm(results, desc="write lesions", unit="case", disable=not progress):
            for les in r["lesions"]:
                image, mask = les.pop("_image"), les.pop("_mask")
                values = les.pop("_labels", None)
                if values is not None:
                    les["labels_offset"] = values_offset
                    fv.write(values.tobytes())
                    values_offset += values.size
                splines = spline_coefficients(image)
                les["image_offset"], les["mask_offset"] = image_offset, mask_offset
                les["spline_offset"] = spline_offset
                fi.write(image.tobytes())
                fm.write(mask.tobytes())
                fs.write(splines.tobytes())
                image_offset += image.size
                mask_offset += mask.size
                spline_offset += splines.size
                lesions_meta.append(les)
    region_offset = 0
    with open(folder / REGIONS_FILE, "wb") as fr:
        for r in results:
            body = r.pop("body_region")
            if body is not None:
                packed = np.packbits(body.ravel())
                fr.write(packed.tobytes())
                r["case"]["body_region"] = {"offset": region_offset, "shape": list(body.shape),
                                            "stride": list(r["region_stride"])}
                region_offset += packed.size
    registered = space["mode"] == "register"
    if registered:
        ref, shared = reference_grid_of(space.pop("_reference_image"), config.likelihood_spacing_mm), False
    else:
        grids = [Grid(tuple(r["case"]["shape"]), np.array(r["case"]["affine"])) for r in results]
        ref, shared = reference_grid(grids, config.likelihood_spacing_mm)
    lesion_sum = np.zeros(ref.shape, dtype=np.float32)
    region_hits = np.zeros(ref.shape, dtype=np.uint16)
    ref_vox = voxel_volume(ref.affine)
    for r in tqdm(results, desc="likelihood map", unit="case", disable=not progress):
        to_ref = np.array(r["case"]["registration"]["ref_from_case"]) if registered else np.eye(4)
        splat(lesion_sum, ref.affine, apply_affine(to_ref, r["lesion_world"]), r["voxel_volume"] / ref_vox)
        splat_mask = np.zeros(ref.shape, dtype=np.float32)
        splat(splat_mask, ref.affine, apply_affine(to_ref, r["region_world"]), 1.0)
        hits = splat_mask > 0
        # coarse region points are `stride` voxels apart: close the gaps between them
        reach = np.ceil(np.array(r["region_stride"]) * spacing_of(np.array(r["case"]["affine"]))
                        / spacing_of(ref.affine)).astype(int)
        if reach.max() > 1:
            hits = ndimage.binary_dilation(hits, structure=np.ones(tuple(reach), dtype=bool))
        region_hits += hits
    likelihood = finish_likelihood(lesion_sum, region_hits, ref.affine, config.likelihood_sigma_mm,
                                   config.likelihood_floor)
    save_nifti(folder / LIKELIHOOD_FILE, likelihood, ref.affine, None, np.float32)
    template_region = space.pop("_template_region", None)
    if template_region is not None:
        prior = likelihood_on(ref.affine, ref.shape, template_region[0], template_region[1]).astype(np.float32)
        save_nifti(folder / TEMPLATE_REGION_FILE, prior, ref.affine, None, np.float32)
        space["template_region_file"] = TEMPLATE_REGION_FILE
    # paths relative to the dataset root, the root relative to the bank (`io.locate`): bank and dataset may move
    cases = [{**r["case"], "images": [relative_to(p, spec.root) for p in r["case"]["images"]],
              "label": relative_to(r["case"]["label"], spec.root)} for r in results]
    index = {
        "format": BANK_FORMAT,
        "lesionsynth_version": __version__,
        "dataset": dataset_record(spec.root, folder, spec.kind),
        "channel_names": spec.channel_names,
        "labels": spec.labels or _labels_from_cases(results, config),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
        "likelihood": {"file": LIKELIHOOD_FILE, "shared_grid": shared, "shape": list(ref.shape),
                       "affine": np.asarray(ref.affine).tolist()},
        "space": space,
        "n_channels": len(spec.channel_names),
        "cases": cases,
        "lesions": lesions_meta,
        "run": extra,
    }
    (folder / "bank.json").write_text(json.dumps(index, indent=1) + "\n")


def _labels_from_cases(results, config: BankConfig) -> dict[str, int]:
    """Label names for a CSV dataset without declared labels."""
    labels = {"background": 0}
    for v in config.lesion_labels:
        labels[f"lesion{v}" if len(config.lesion_labels) > 1 else "lesion"] = int(v)
    for v in config.region_labels:
        labels[f"region{v}"] = int(v)
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


#: The fewest pastes of drawn size a deficit may take before larger lesions are favoured (see plan.size_tilted_weights).
MIN_TYPICAL_LESIONS = 4


class Bank:
    """Read access to a bank folder; lesion arrays are memory-mapped, opened on first use. Its cases' paths are
    absolute, under the dataset root found (`io.locate.located`) or under `data_root` if given."""

    def __init__(self, folder: str | Path, data_root: str | Path | None = None):
        self.folder = Path(folder)
        index_path = self.folder / "bank.json"
        if not index_path.is_file():
            raise InputError(f"{index_path}: not a lesion bank (bank.json missing)")
        try:
            self.index = json.loads(index_path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{index_path}: malformed bank index ({exc})") from None
        if self.index.get("format") != BANK_FORMAT:
            raise InputError(f"{index_path}: unsupported bank format {self.index.get('format')}")
        self.index = located(self.index, self.folder, data_root)
        self.lesions = self.index["lesions"]
        self.by_id = {les["id"]: les for les in self.lesions}
        self.cases = self.index["cases"]
        self.channel_names = self.index["channel_names"]
        self.config = self.index["config"]
        self._images = self._masks = self._splines = self._label_values = None
        self._likelihood = None
        self._likelihood_grid = None  # (shape, affine) of the map, kept when the map itself is let go
        self._coarse_likelihood = None
        self._derived: OrderedDict = OrderedDict()
        self._derived_bytes = 0
        self._donor_tables: dict = {}

    @property
    def lesion_labels(self) -> tuple[int, ...]:
        return tuple(self.config["lesion_labels"])

    @property
    def region_labels(self) -> tuple[int, ...]:
        return tuple(self.config["region_labels"])

    @cached_property
    def typical_lesion_count(self) -> int:
        """Median number of bank lesions per case (cases without any count as 0), at least MIN_TYPICAL_LESIONS."""
        per_case = {c["case_id"]: 0 for c in self.cases}
        for les in self.lesions:
            per_case[les["source_case"]] = per_case.get(les["source_case"], 0) + 1
        return max(MIN_TYPICAL_LESIONS, int(np.ceil(np.median(list(per_case.values()) or [0]))))

    def case_refs(self) -> list[CaseRef]:
        return [CaseRef(c["case_id"], tuple(Path(p) for p in c["images"]), Path(c["label"]), c["four_d"])
                for c in self.cases]

    def real_loads(self, load_labels=None) -> np.ndarray:
        """Per case, the lesion load (mm³): of every lesion label, or of `load_labels` only."""
        if not load_labels or set(load_labels) >= set(self.lesion_labels):
            return np.array([c["load_mm3"] for c in self.cases], dtype=np.float64)
        if any("load_by_label" not in c for c in self.cases):
            raise InputError(f"{self.folder}: the bank has no load per lesion label; rebuild it with build-bank")
        return np.array([sum(c["load_by_label"].get(str(v), 0.0) for v in load_labels) for c in self.cases],
                        dtype=np.float64)

    def lesion_label_values(self, lesion_id: str) -> np.ndarray | None:
        """(X, Y, Z) uint8 label values of a multi-class lesion's crop (0 outside it), a memory-mapped view;
        None for a lesion of one label value."""
        les = self.by_id[lesion_id]
        if "labels_offset" not in les:
            return None
        if self._label_values is None:
            path = self.folder / LABEL_VALUES_FILE
            if not path.is_file():
                raise InputError(f"{path}: missing from the bank; rebuild it with build-bank")
            self._label_values = np.memmap(path, dtype=np.uint8, mode="r")
        shape = tuple(les["shape"])
        n = int(np.prod(shape))
        return self._label_values[les["labels_offset"]: les["labels_offset"] + n].reshape(shape)

    def lesion_arrays(self, lesion_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(channels (C, X, Y, Z) float32, mask (X, Y, Z) uint8) views into the memory-mapped bank."""
        if self._images is None:
            self._images = np.memmap(self.folder / IMAGES_FILE, dtype=np.float32, mode="r")
            self._masks = np.memmap(self.folder / MASKS_FILE, dtype=np.uint8, mode="r")
        les = self.by_id[lesion_id]
        shape = tuple(les["shape"])
        n = int(np.prod(shape))
        c = self.index["n_channels"]
        image = self._images[les["image_offset"]: les["image_offset"] + c * n].reshape((c,) + shape)
        mask = self._masks[les["mask_offset"]: les["mask_offset"] + n].reshape(shape)
        return image, mask

    def lesion_splines(self, lesion_id: str) -> np.ndarray | None:
        """The lesion crop's stored spline coefficients (C, X+4, Y+4, Z+4) float32, a memory-mapped view;
        None for a bank built before they were stored."""
        les = self.by_id[lesion_id]
        if "spline_offset" not in les:
            return None
        if self._splines is None:
            self._splines = np.memmap(self.folder / SPLINES_FILE, dtype=np.float32, mode="r")
        shape = (self.index["n_channels"],) + tuple(int(n) + 2 * SPLINE_PAD for n in les["shape"])
        n = int(np.prod(shape))
        return self._splines[les["spline_offset"]: les["spline_offset"] + n].reshape(shape)

    def derived(self, key, make):
        """`make()`'s result (an object with `nbytes`), kept for the most recently used keys up to
        DERIVED_BYTES in all: per-lesion data that every paste of a lesion needs (its mask voxels and edge
        codes), because a worker draws the same donors again and again."""
        hit = self._derived.get(key)
        if hit is not None:
            self._derived.move_to_end(key)
            return hit[0]
        value = make()
        self._derived[key] = (value, int(value.nbytes))
        self._derived_bytes += self._derived[key][1]
        while self._derived_bytes > DERIVED_BYTES and len(self._derived) > 1:
            self._derived_bytes -= self._derived.popitem(last=False)[1][1]
        return value

    def body_region(self, case_id: str) -> Region | None:
        """The stored body-foreground region of a base case (None if it has region labels or the bank
        predates stored regions): the same mask `allowed_region` computes from the case."""
        case = next(c for c in self.cases if c["case_id"] == case_id)
        info = case.get("body_region")
        if info is None:
            return None
        shape = tuple(info["shape"])
        n = int(np.prod(shape))
        path = self.folder / REGIONS_FILE
        try:
            packed = np.fromfile(path, dtype=np.uint8, count=(n + 7) // 8, offset=int(info["offset"]))
        except FileNotFoundError:
            raise InputError(f"{path}: missing from the bank; rebuild it with build-bank") from None
        if packed.size < (n + 7) // 8:
            raise InputError(f"{path}: truncated; rebuild the bank with build-bank")
        coarse = np.unpackbits(packed, count=n).reshape(shape).astype(bool)
        return Region(tuple(int(v) for v in info["stride"]), coarse, ())

    @property
    def registered(self) -> bool:
        """Whether the cases were registered to a reference (`space.py`) rather than taken in world space."""
        return self.index.get("space", {}).get("mode") == "register"

    def case_info(self, case_id: str) -> dict:
        return next(c for c in self.cases if c["case_id"] == case_id)

    def donor_shell_match(self, tolerance: float) -> dict:
        """Lesion id → the share of its shell voxels within `tolerance` of the shell's own signature (from the
        stored `shell_deviation` quantiles; 1.0 where the bank has none), made once per tolerance."""
        levels = (0.0,) + DEVIATION_LEVELS
        return self._donor_table(("shell_match", tolerance), lambda les: (
            float(np.interp(tolerance, [0.0] + list(les["shell_deviation"]), levels))
            if les.get("shell_deviation") else 1.0))

    def donor_shell_spread(self) -> dict:
        """Lesion id → the median distance of its shell voxels from the shell's signature (None if unknown)."""
        middle = DEVIATION_LEVELS.index(0.5)
        return self._donor_table(("shell_spread",), lambda les: (
            les["shell_deviation"][middle] if les.get("shell_deviation") else None))

    def donor_local_match(self, ct_channels, tolerance: float) -> dict:
        """Lesion id → the share of its shell voxels of the host tissue of that shell (`prior.local_host_match`,
        the shell as `extract_lesions` takes it, within the lesion's crop), made once per worker: how mixed the
        tissue a lesion grew in is, which the tissue a paste covers may be too. 1.0 where it cannot be read."""
        from .prior import local_host_match

        shell_mm = float(self.config.get("shell_mm", 3.0))

        def own(les) -> float:
            image, mask = self.lesion_arrays(les["id"])
            mask = mask > 0
            spacing = np.asarray(les["spacing_mm"], dtype=np.float64)
            shell = dilate(mask, ball(shell_mm, spacing)) & ~dilate(mask)
            if np.count_nonzero(shell) < 10:
                return 1.0
            values = image[:, shell]
            noise = [float(st.get("noise_sd") or 0.0) for st in les["stats"]]
            share = local_host_match(values, values, ct_channels, tolerance, noise_sd=noise)
            return 1.0 if share is None else share

        return self._donor_table(("local_match", tuple(ct_channels), tolerance), own)

    def donor_signatures(self, ct_channels) -> dict:
        """Lesion id → the tissue signature of its shell in its source case (`prior.donor_signature`), made once."""
        from .prior import donor_signature

        return self._donor_table(("signature", tuple(ct_channels)), lambda les: donor_signature(
            les, self.case_info(les["source_case"]), ct_channels))

    def _donor_table(self, key, make) -> dict:
        """Lesion id → make(lesion), made once per key in this worker (every output case asks for the same)."""
        if key not in self._donor_tables:
            self._donor_tables[key] = {les["id"]: make(les) for les in self.lesions}
        return self._donor_tables[key]

    def case_from_ref(self, case_id: str) -> np.ndarray:
        """World matrix from the reference space (the likelihood map's) to a bank case (identity in world
        space)."""
        reg = self.case_info(case_id).get("registration") if self.registered else None
        return np.eye(4) if reg is None else np.linalg.inv(np.array(reg["ref_from_case"], dtype=np.float64))

    def coarse_likelihood(self, stride, affine: np.ndarray, shape, coarse_shape, case_id: str | None = None,
                          within: np.ndarray | None = None) -> np.ndarray:
        """The likelihood map on a case's coarse grid (`prior.coarse_likelihood`), kept for the last grid
        asked for: the cases of a dataset on a shared grid all ask for the same. `case_id` names the bank
        case whose grid it is (its stored transform maps the reference onto it); `within`, a coarse mask where
        it is needed (zero elsewhere; not kept). Do not modify it."""
        if self._likelihood_grid is None:
            self.likelihood()
        values_shape, values_affine = self._likelihood_grid
        values_affine = (self.case_from_ref(case_id) if case_id is not None else np.eye(4)) @ values_affine
        on_its_grid = on_grid(values_shape, values_affine, shape, affine)
        if within is not None and not on_its_grid:
            return coarse_likelihood(stride, affine, shape, coarse_shape, self.likelihood()[0], values_affine, within)
        key = (tuple(stride), np.asarray(affine, dtype=np.float64).tobytes(), tuple(shape), tuple(coarse_shape),
               values_affine.tobytes())
        if self._coarse_likelihood is None or self._coarse_likelihood[0] != key:
            self._coarse_likelihood = (key, coarse_likelihood(stride, affine, shape, coarse_shape, self.likelihood()[0],
                                                              values_affine))
            if on_its_grid:
                # cases on the map's own grid (a shared grid) all ask for this coarse map: the full-resolution
                # map, a case-sized float32 volume, need not stay in every worker (read again if asked)
                self._likelihood = None
        return self._coarse_likelihood[1]

    def coarse_template_region(self, stride, affine: np.ndarray, coarse_shape, case_id: str | None
                               ) -> np.ndarray | None:
        """The template's tissue prior (0-1) on a bank case's coarse grid (None: a grid in the reference's
        world space), or None if the bank has none."""
        name = self.index.get("space", {}).get("template_region_file")
        if not name:
            return None
        from .io.nifti import load_nifti, read_array

        path = self.folder / name
        img = load_nifti(path)
        values = np.asarray(read_array(img, path), dtype=np.float32)
        to_case = self.case_from_ref(case_id) if case_id is not None else np.eye(4)
        return coarse_likelihood(stride, affine, None, coarse_shape, values,
                                 to_case @ np.asarray(img.affine, dtype=np.float64))

    def likelihood(self) -> tuple[np.ndarray, np.ndarray]:
        """(map, affine) of the lesion likelihood map, loaded once."""
        if self._likelihood is None:
            from .io.nifti import load_nifti, read_array

            path = self.folder / self.index["likelihood"]["file"]
            img = load_nifti(path)
            self._likelihood = (read_array(img, path), np.asarray(img.affine, dtype=np.float64))
            self._likelihood_grid = (self._likelihood[0].shape, self._likelihood[1])
        return self._likelihood
