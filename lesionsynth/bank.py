"""Lesion bank: every lesion cut out of a dataset with its crops and metadata, stored for lazy reading."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import __version__
from .errors import InputError
from .geometry import apply_affine, ball, crop_affine, dilate, spacing_of, structure_for, voxel_volume
from .io import Case, CaseRef, load_case, open_dataset
from .io.nifti import save_nifti
from .labels import label_in
from .prior import (Grid, Region, allowed_region, coarse_likelihood, finish_likelihood, reference_grid,
                    region_world_points, splat)
from .stats import noise_sd

BANK_FORMAT = 1
IMAGES_FILE = "lesion_images.f32"
MASKS_FILE = "lesion_masks.u8"
LIKELIHOOD_FILE = "likelihood.nii.gz"
REGIONS_FILE = "body_regions.u1"  # packed coarse body masks of the cases without region labels
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


def lesion_mask(label: np.ndarray, lesion_labels) -> np.ndarray:
    return label_in(label, lesion_labels)


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


def extract_lesions(case: Case, config: BankConfig) -> list[dict]:
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
        shell = dilate(mask, shell_ball) & ~any_lesion[sl]
        start = np.array([s.start for s in sl])
        centroid_vox = np.argwhere(mask).mean(axis=0) + start
        crop = case.channels[(slice(None),) + sl]
        stats = []
        for c in range(crop.shape[0]):
            stats.append({"lesion": _robust_stats(crop[c][mask]), "shell": _robust_stats(crop[c][shell]),
                          "noise_sd": noise_sd(crop[c], shell)})
        core_box = [[int(b.start - s.start), int(b.stop - s.start)] for b, s in zip(box, sl)]
        lesions.append({
            "id": f"{case.case_id}_L{k:03d}",
            "source_case": case.case_id,
            "label_value": label_value,
            "volume_mm3": volume,
            "voxels": voxels,
            "centroid_mm": apply_affine(case.affine, centroid_vox).tolist(),
            "spacing_mm": spacing.tolist(),
            "shape": list(mask.shape),
            "mask_box": core_box,  # the lesion's bounding box inside the crop (voxels, half-open)
            "affine": crop_affine(case.affine, start).tolist(),
            "stats": stats,
            "_image": np.ascontiguousarray(crop, dtype=np.float32),
            "_mask": np.ascontiguousarray(mask, dtype=np.uint8),
        })
    return lesions


def _scan_case(ref: CaseRef, n_channels: int, channel_names, config: BankConfig) -> dict:
    """Worker: load one case, cut its lesions, and collect what the likelihood map needs."""
    case = load_case(ref, n_channels)
    load_mm3, load_voxels = case_load(case.label, case.affine, config.lesion_labels)
    lesions = extract_lesions(case, config)
    region = allowed_region(case.channels, case.label, case.affine, channel_names, config.region_labels)
    lesion_idx = np.argwhere(lesion_mask(case.label, config.lesion_labels))
    return {
        "case": {
            "case_id": case.case_id,
            "images": [str(Path(p).resolve()) for p in ref.image_paths],
            "label": str(Path(ref.label_path).resolve()),
            "four_d": ref.four_d,
            "shape": list(case.label.shape),
            "affine": case.affine.tolist(),
            "load_mm3": load_mm3,
            "load_voxels": load_voxels,
            "lesion_count": len(lesions),
            "region_from_labels": bool(region.region_labels),
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
    n_channels = len(spec.channel_names)
    with execution(backend, scheduler, jobs) as runner:
        results = runner.map(_scan_case, [(ref, n_channels, spec.channel_names, config) for ref in spec.cases])
        results = list(tqdm(results, total=len(spec.cases), desc="build-bank", unit="case", disable=not progress))
    if not any(r["lesions"] for r in results):
        raise InputError(f"{dataset}: no lesion found with label(s) {list(config.lesion_labels)}"
                         f" and volume ≥ {config.min_volume_mm3} mm³")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_bank(staging, spec, results, config, extra_run_info or {})
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_bank(folder: Path, spec, results: list[dict], config: BankConfig, extra: dict) -> None:
    lesions_meta = []
    image_offset = mask_offset = 0
    with open(folder / IMAGES_FILE, "wb") as fi, open(folder / MASKS_FILE, "wb") as fm:
        for r in results:
            for les in r["lesions"]:
                image, mask = les.pop("_image"), les.pop("_mask")
                les["image_offset"], les["mask_offset"] = image_offset, mask_offset
                fi.write(image.tobytes())
                fm.write(mask.tobytes())
                image_offset += image.size
                mask_offset += mask.size
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
    grids = [Grid(tuple(r["case"]["shape"]), np.array(r["case"]["affine"])) for r in results]
    ref, shared = reference_grid(grids, config.likelihood_spacing_mm)
    lesion_sum = np.zeros(ref.shape, dtype=np.float32)
    region_hits = np.zeros(ref.shape, dtype=np.uint16)
    ref_vox = voxel_volume(ref.affine)
    for r in results:
        splat(lesion_sum, ref.affine, r["lesion_world"], r["voxel_volume"] / ref_vox)
        splat_mask = np.zeros(ref.shape, dtype=np.float32)
        splat(splat_mask, ref.affine, r["region_world"], 1.0)
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
    cases = [r["case"] for r in results]
    index = {
        "format": BANK_FORMAT,
        "lesionsynth_version": __version__,
        "dataset": {"root": str(Path(spec.root).resolve()), "kind": spec.kind},
        "channel_names": spec.channel_names,
        "labels": spec.labels or _labels_from_cases(results, config),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
        "likelihood": {"file": LIKELIHOOD_FILE, "shared_grid": shared, "shape": list(ref.shape),
                       "affine": np.asarray(ref.affine).tolist()},
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


class Bank:
    """Read access to a bank folder; lesion arrays are memory-mapped, opened on first use."""

    def __init__(self, folder: str | Path):
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
        self.lesions = self.index["lesions"]
        self.by_id = {les["id"]: les for les in self.lesions}
        self.cases = self.index["cases"]
        self.channel_names = self.index["channel_names"]
        self.config = self.index["config"]
        self._images = self._masks = None
        self._likelihood = None
        self._coarse_likelihood = None
        self._derived: OrderedDict = OrderedDict()
        self._derived_bytes = 0

    @property
    def lesion_labels(self) -> tuple[int, ...]:
        return tuple(self.config["lesion_labels"])

    @property
    def region_labels(self) -> tuple[int, ...]:
        return tuple(self.config["region_labels"])

    def case_refs(self) -> list[CaseRef]:
        return [CaseRef(c["case_id"], tuple(Path(p) for p in c["images"]), Path(c["label"]), c["four_d"])
                for c in self.cases]

    def real_loads(self) -> np.ndarray:
        return np.array([c["load_mm3"] for c in self.cases], dtype=np.float64)

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

    def coarse_likelihood(self, stride, affine: np.ndarray, shape, coarse_shape) -> np.ndarray:
        """The likelihood map on a case's coarse grid (`prior.coarse_likelihood`), kept for the last grid
        asked for: the cases of a dataset on a shared grid all ask for the same. Do not modify it."""
        key = (tuple(stride), np.asarray(affine, dtype=np.float64).tobytes(), tuple(shape), tuple(coarse_shape))
        if self._coarse_likelihood is None or self._coarse_likelihood[0] != key:
            self._coarse_likelihood = (key, coarse_likelihood(stride, affine, shape, coarse_shape, *self.likelihood()))
        return self._coarse_likelihood[1]

    def likelihood(self) -> tuple[np.ndarray, np.ndarray]:
        """(map, affine) of the lesion likelihood map, loaded once."""
        if self._likelihood is None:
            from .io.nifti import load_nifti, read_array

            path = self.folder / self.index["likelihood"]["file"]
            img = load_nifti(path)
            self._likelihood = (read_array(img, path), np.asarray(img.affine, dtype=np.float64))
        return self._likelihood
