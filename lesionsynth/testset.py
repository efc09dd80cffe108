"""`lesionsynth testset`: controlled test sets. The same base cases are rendered at graded levels of one factor
(load, size, contrast, noise) while everything else stays fixed, and written for inference (imagesTs/, labelsTs/,
dataset.json, strata.csv: io/layout.TestsetLayout) with the manifest of every case's plan.

Case `j` of every level has the same base case and the same generator (`case_rng(seed, j)`), so its plan
differs between levels only by the factor. Base cases and donor lesions come only from the test cases.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from ._version import __version__
from .bank import Bank, case_load, lesion_mask
from .errors import InputError, Interrupted, check_choice, check_field
from .geometry import voxel_volume
from .io import load_case
from .io.images import IMAGE_ENDINGS
from .io.layout import TestsetLayout
from .io.output import image_dtype, stored_values, write_case
from .pipeline import (MANIFEST, PROGRESS_DIR, GenerateConfig, LoadLabelChoice, bank_entries, check_base_cases,
                       donor_lesions, open_bank, prepare_output, read_records, remove_stale_temporaries,
                       synthesize_arrays, with_file_ending)
from .plan import AugmentConfig, case_rng, lesion_components
from .prior import allowed_region
from .stats import noise_sd

FACTORS = ("load", "size", "contrast", "noise")
#: The lesion work of each factor: size and contrast replace the base case's lesions by pasted ones (whose
#: sizes or brightness the level sets); load and noise keep them where the target allows (mode both).
FACTOR_MODES = {"load": "both", "size": "replace", "contrast": "replace", "noise": "both"}
#: Nominal range of the levels where --range is not given (contrast: paste brightness; noise: × own noise sd).
DEFAULT_RANGES = {"contrast": (0.5, 1.5), "noise": (0.0, 2.0)}
#: size: the default load is at most this many lesions of the smallest size bin's median volume.
SMALL_LESIONS_PER_CASE = 100
#: Third entry of the added noise's generator seed (seed, case j, this): apart from the case's own generator.
NOISE_STREAM = 7


@dataclass(frozen=True)
class TestsetConfig(LoadLabelChoice):
    """Everything that decides a test set's bytes (recorded in run.json once `resolve_levels` filled in
    `levels` and `load_mm3`)."""

    __test__ = False  # not a pytest test class

    factor: str
    n_levels: int
    per_level: int
    test_cases: tuple[str, ...]
    seed: int = 0
    level_range: tuple[float, float] | None = None
    load_mm3: float | None = None      # the fixed load of size, contrast and noise (None: default)
    levels: tuple[float, ...] = ()     # nominal value of each level (resolved)
    tolerance: float = 0.1
    compression_level: int = 1
    file_ending: str | None = None     # .nii.gz, .nii, .mha or .nrrd; None: that of the bank's source cases
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    load_label: int | None = None      # loads (levels, fixed load, measured) on this lesion label only

    def __post_init__(self) -> None:
        self.validate()  # a bad config fails where it is made, naming its field

    def validate(self) -> None:
        check_choice(self, "factor", FACTORS)
        check_field(self, "n_levels", self.n_levels >= 1, "must be ≥ 1")
        check_field(self, "per_level", self.per_level >= 1, "must be ≥ 1")
        if not self.test_cases:
            raise InputError(NO_TEST_CASES)
        if self.level_range is not None:
            check_level_range(self.factor, self.level_range)
        if self.load_mm3 is not None and self.factor == "load":
            raise InputError("--load-mm3 does not apply to --vary load (its levels are loads; use --range LO HI)")
        check_field(self, "load_mm3", self.load_mm3 is None or self.load_mm3 > 0, "must be > 0")
        check_field(self, "tolerance", 0 <= self.tolerance < 1, "must lie in [0, 1)")
        check_field(self, "compression_level", 0 <= self.compression_level <= 9, "must lie in 0..9")
        check_choice(self, "file_ending", (None, *IMAGE_ENDINGS))


NO_TEST_CASES = ("no test cases given: name them with --test-cases ID,ID,... or --splits splits_final.json "
                 "--fold F (a test set takes its anatomy and lesions from test cases only)")


def check_level_range(factor: str, level_range: tuple[float, float]) -> None:
    """Refuse a --range the factor cannot use."""
    lo, hi = (float(v) for v in level_range)
    if factor == "size":
        raise InputError("--range does not apply to --vary size (its levels are donor size bins; --load-mm3 "
                         "sets the load)")
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
        raise InputError(f"--range {lo:g} {hi:g}: need LO ≤ HI")
    if factor == "load" and lo <= 0:
        raise InputError(f"--range {lo:g} {hi:g}: load levels are log-spaced, need 0 < LO (mm³)")
    if lo < 0:
        raise InputError(f"--range {lo:g} {hi:g}: {factor} levels must be ≥ 0")


def select_test_cases(bank_case_ids, ids: str | None = None, splits: str | Path | None = None,
                      fold: int | None = None) -> tuple[str, ...]:
    """The test cases, sorted: the comma-separated `ids`, or fold `fold`'s "val" list of an nnU-Net
    splits_final.json; every one must be a case of the bank."""
    if ids is not None and splits is not None:
        raise InputError("give --test-cases or --splits, not both")
    if fold is not None and splits is None:
        raise InputError("--fold needs --splits splits_final.json")
    if splits is not None:
        if fold is None:
            raise InputError("--splits needs --fold F (whose 'val' cases are the test cases)")
        chosen = fold_val_cases(Path(splits), fold)
    elif ids is not None:
        chosen = [c.strip() for c in ids.split(",") if c.strip()]
    else:
        chosen = []
    return cases_in_bank(chosen, bank_case_ids)


def cases_in_bank(chosen, bank_case_ids) -> tuple[str, ...]:
    """The chosen test cases, sorted and once each; refused if there are none or one is not in the bank."""
    if not chosen:
        raise InputError(NO_TEST_CASES)
    known = set(bank_case_ids)
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise InputError(f"test case(s) {', '.join(unknown)} not in the bank (it holds {len(known)} cases, e.g. "
                         f"{', '.join(sorted(known)[:3])})")
    return tuple(sorted(set(chosen)))


def fold_val_cases(splits: Path, fold: int) -> list[str]:
    """The "val" list of fold `fold` of an nnU-Net splits_final.json."""
    try:
        folds = json.loads(splits.read_text())
    except FileNotFoundError:
        raise InputError(f"{splits}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{splits}: not a readable splits_final.json ({exc})") from None
    if not isinstance(folds, list) or not all(isinstance(f, dict) and isinstance(f.get("val"), list) for f in folds):
        raise InputError(f"{splits}: not an nnU-Net splits_final.json (a list of {{'train': [...], 'val': [...]}})")
    if not 0 <= fold < len(folds):
        raise InputError(f"--fold {fold}: {splits} has folds 0..{len(folds) - 1}")
    return [str(c) for c in folds[fold]["val"]]


def size_bins(donors: list[dict], k: int) -> list[list[dict]]:
    """The donors split into `k` bins of (nearly) equal count by volume, smallest first."""
    if len(donors) < k:
        raise InputError(f"--vary size --levels {k}: the test cases hold only {len(donors)} lesions; use at most "
                         f"that many levels")
    ordered = sorted(donors, key=lambda les: (les["volume_mm3"], les["id"]))
    return [list(part) for part in np.array_split(np.array(ordered, dtype=object), k)]


def level_values(cfg: TestsetConfig, real_loads, donors: list[dict]) -> tuple[float, ...]:
    """The nominal value of each level, increasing: load in mm³ (log-spaced over the bank's real loads or
    --range), size = median donor volume of each size bin (mm³), contrast = paste brightness, noise = added
    sd in units of the case's own noise sd (both evenly spaced over --range or DEFAULT_RANGES)."""
    k = cfg.n_levels
    if cfg.factor == "size":
        return tuple(round(float(np.median([les["volume_mm3"] for les in b])), 3) for b in size_bins(donors, k))
    if cfg.factor == "load":
        if cfg.level_range is None:
            loads = np.asarray(real_loads, dtype=np.float64)
            loads = loads[loads > 0]
            if loads.size == 0:
                raise InputError("the bank holds no case with lesions to take load levels from; use --range LO HI")
            lo, hi = float(loads.min()), float(loads.max())
        else:
            lo, hi = cfg.level_range
        return tuple(round(float(v), 3) for v in np.geomspace(lo, hi, k))
    lo, hi = cfg.level_range or DEFAULT_RANGES[cfg.factor]
    return tuple(round(float(v), 4) for v in np.linspace(lo, hi, k))


def fixed_load(cfg: TestsetConfig, test_loads, donors: list[dict]) -> float | None:
    """The load held fixed across the levels of size, contrast and noise: --load-mm3, else the median real load
    of the test cases (size: at most SMALL_LESIONS_PER_CASE lesions of the smallest bin's size). None: load."""
    if cfg.factor == "load":
        return None
    if cfg.load_mm3 is not None:
        return float(cfg.load_mm3)
    loads = np.asarray(test_loads, dtype=np.float64)
    loads = loads[loads > 0]
    if loads.size == 0:
        raise InputError("the test cases hold no lesions to take a load from; give --load-mm3")
    load = float(np.median(loads))
    if cfg.factor == "size":
        smallest = size_bins(donors, cfg.n_levels)[0]
        load = min(load, SMALL_LESIONS_PER_CASE * float(np.median([les["volume_mm3"] for les in smallest])))
    return round(load, 3)


def resolve_levels(cfg: TestsetConfig, bank: Bank) -> TestsetConfig:
    """`cfg` with its level values and fixed load worked out from the bank and the test cases."""
    donors = donor_lesions(bank, cfg.test_cases, cfg.load_labels)
    if not donors:
        raise InputError(f"the test cases ({', '.join(cfg.test_cases)}) hold no lesions to paste")
    real_loads = bank.real_loads(cfg.load_labels)
    test_loads = [load for c, load in zip(bank.cases, real_loads) if c["case_id"] in cfg.test_cases]
    return replace(cfg, levels=level_values(cfg, real_loads, donors), load_mm3=fixed_load(cfg, test_loads, donors))


def level_config(cfg: TestsetConfig, level: int) -> GenerateConfig:
    """The lesion work of one level as a generate configuration: a fixed target load (a uniform draw over
    [L, L]) and the factor's mode; contrast plans at brightness 1 (`lesion_work` sets the level's)."""
    target = cfg.levels[level] if cfg.factor == "load" else cfg.load_mm3
    augment = cfg.augment
    if cfg.factor == "contrast":
        augment = replace(augment, brightness=(1.0, 1.0))
    return GenerateConfig(n=cfg.n_levels * cfg.per_level, load="uniform", mode=FACTOR_MODES[cfg.factor],
                          seed=cfg.seed, tolerance=cfg.tolerance, load_range=(target, target), folds=1,
                          include_originals=False, compression_level=cfg.compression_level,
                          file_ending=cfg.file_ending, augment=augment, load_label=cfg.load_label)


def level_donors(cfg: TestsetConfig, bank: Bank, level: int) -> list[dict]:
    """The donors of one level: the test cases' lesions (size: those of the level's size bin)."""
    donors = donor_lesions(bank, cfg.test_cases, cfg.load_labels)
    return size_bins(donors, cfg.n_levels)[level] if cfg.factor == "size" else donors


def with_brightness(record: dict, brightness: float) -> dict:
    """A lesion record whose pastes all have `brightness` on every channel."""
    ops = [dict(op, brightness=[brightness] * len(op["brightness"])) if op["op"] == "paste" else op
           for op in record["ops"]]
    return dict(record, ops=ops)


def lesion_work(case, bank: Bank, cfg: TestsetConfig, level: int, j: int, base_id: str):
    """`synthesize_arrays` of case `j` at a level: (channels, label, record). Contrast draws the plan once at
    brightness 1 (on copies) and renders it with the level's brightness, so that its levels share one plan."""
    args = (bank, level_config(cfg, level), case_rng(cfg.seed, j), base_id, level_donors(cfg, bank, level))
    if cfg.factor != "contrast":
        return synthesize_arrays(case.channels, case.label, case.affine, *args)
    _, _, planned = synthesize_arrays(case.channels.copy(order="K"), case.label.copy(order="K"), case.affine, *args)
    return synthesize_arrays(case.channels, case.label, case.affine, *args,
                             replay=with_brightness(planned, cfg.levels[level]))


def testset_case_id(factor: str, level: int, j: int) -> str:
    """Case id of case `j` of a level, e.g. load02_0001."""
    return f"{factor}{level:02d}_{j:04d}"


def base_case_of_testset(j: int, test_cases) -> str:
    """The base case of case `j` of every level: the test cases take turns."""
    return test_cases[j % len(test_cases)]


def noise_rng(seed: int, j: int) -> np.random.Generator:
    """The generator of the noise added to case `j` (the same at every level: only its scale changes)."""
    return np.random.default_rng([int(seed), int(j), NOISE_STREAM])


def add_noise(channels: np.ndarray, sds, rng: np.random.Generator) -> None:
    """Add Gaussian noise of sd `sds[c]` to every voxel of channel c, in place (one standard normal field per
    channel, drawn in channel order, whatever the sds)."""
    if not any(sd > 0 for sd in sds):
        return
    for c, sd in enumerate(sds):
        noise = rng.standard_normal(channels.shape[1:], dtype=np.float32)
        if sd > 0:
            channels[c] += np.float32(sd) * noise


def median_lesion_volume(label: np.ndarray, affine: np.ndarray, lesion_labels, connectivity: int) -> float:
    """Median volume (mm³) of the connected lesions of a label volume (0 without any)."""
    comps = lesion_components(label, lesion_labels, connectivity)
    return float(np.median([c.voxels for c in comps])) * voxel_volume(affine) if comps else 0.0


def pasted_contrast(channels, lesions: np.ndarray, pasted: np.ndarray, scales) -> float:
    """Contrast of the pasted lesion voxels to a 2-voxel shell around them: per channel |median inside −
    median of the shell| / that channel's `scales` (the base case's foreground IQR), averaged over channels;
    nan without pasted voxels."""
    if not pasted.any():
        return float("nan")
    box = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in ndimage.find_objects(pasted.astype(np.uint8))[0])
    inside = pasted[box]
    shell = ndimage.binary_dilation(inside, iterations=2) & ~lesions[box]
    ratios = [abs(float(np.median(ch[box][inside]) - np.median(ch[box][shell]))) / max(float(s), 1e-9)
              for ch, s in zip(channels, scales)]
    return float(np.mean(ratios))


def relative_noise(channels, foreground: np.ndarray, own_sds) -> float:
    """Noise sd of the channels on the foreground (stats.noise_sd) in units of the base case's own, averaged
    over channels."""
    return float(np.mean([noise_sd(ch, foreground) / max(own, 1e-9) for ch, own in zip(channels, own_sds)]))


def foreground_iqr(channel: np.ndarray, foreground: np.ndarray) -> float:
    """Interquartile range of a channel on the foreground (a sample of at most 200 000 voxels)."""
    values = channel[foreground]
    values = values[:: max(1, values.size // 200_000)]
    q1, q3 = np.percentile(values, [25, 75]) if values.size else (0.0, 0.0)
    return float(q3 - q1)


def make_testset_case(index: int, bank_dir: str, layout: TestsetLayout, cfg: TestsetConfig) -> dict:
    """Make output case `index` (level index // per_level, case j = index % per_level): its base case's lesion
    work at the level (`synthesize_arrays`), noise for the noise factor, the factor measured on the arrays as
    they are written, then write it in `layout`. Returns its manifest record."""
    level, j = divmod(index, cfg.per_level)
    bank = open_bank(bank_dir)
    base_id = base_case_of_testset(j, cfg.test_cases)
    ref = next(r for r in bank.case_refs() if r.case_id == base_id)
    case = load_case(ref, len(bank.channel_names))
    lesion_labels = bank.lesion_labels
    region = bank.body_region(base_id) or allowed_region(case.channels, case.label, case.affine,
                                                         bank.channel_names, bank.region_labels)
    foreground = region.mask_in(case.label, (0, 0, 0))
    base_lesions = lesion_mask(case.label, lesion_labels).copy()
    own_sds = [noise_sd(ch, foreground) for ch in case.channels] if cfg.factor == "noise" else None
    scales = [foreground_iqr(ch, foreground) for ch in case.channels] if cfg.factor == "contrast" else None

    channels, label, lesion_record = lesion_work(case, bank, cfg, level, j, base_id)
    added_sds = None
    if cfg.factor == "noise":
        added_sds = [round(cfg.levels[level] * sd, 6) for sd in own_sds]
        add_noise(channels, added_sds, noise_rng(cfg.seed, j))
    # measured on the values the files will hold (an integer dataset's rounding included)
    written = [np.asarray(stored_values(ch, image_dtype(h)), dtype=np.float32)
               for ch, h in zip(channels, case.channel_headers)]
    if cfg.factor == "load":
        value = case_load(label, case.affine, cfg.load_labels or lesion_labels)[0]
    elif cfg.factor == "size":
        value = median_lesion_volume(label, case.affine, lesion_labels, int(bank.config["connectivity"]))
    elif cfg.factor == "contrast":
        lesions = lesion_mask(label, lesion_labels)
        value = pasted_contrast(written, lesions, lesions & ~base_lesions, scales)
    else:
        value = relative_noise(written, foreground, own_sds)

    case_id = testset_case_id(cfg.factor, level, j)
    paths = layout.prepare_case(case_id)
    write_case(layout.out, case_id, channels, label, case, cfg.file_ending, cfg.compression_level, paths)
    record = {"case_id": case_id, "case_index": index, "rng_index": j, "base_case": base_id, "seed": cfg.seed,
              "factor": cfg.factor, "level": level, "level_value": cfg.levels[level],
              "measured_value": round(float(value), 6), "added_noise_sd": added_sds, **lesion_record,
              "load_family": "fixed"}  # each level's one target load (drawn as uniform over [L, L])
    layout.write_case_extras(case_id, record)
    return record


def run_record(bank: Bank, bank_dir: Path, cfg: TestsetConfig) -> dict:
    """run.json of a test set: version, bank, and the resolved configuration."""
    return {"lesionsynth_version": __version__, "command": "testset", **bank_entries(bank, bank_dir),
            "config": json.loads(json.dumps(cfg.config_record()))}


def testset(bank_dir: str | Path, out: str | Path, cfg: TestsetConfig, jobs: int = 1, resume: bool = False,
            progress: bool = True, data_root: str | Path | None = None) -> list[dict]:
    """Write the controlled test set `cfg` from the bank into the folder `out`; returns its records.

    Everything is checked before anything is written; then run.json, each case atomically, a progress record
    per case, and at the end manifest.jsonl, dataset.json and strata.csv. --resume completes an unfinished
    run of the same configuration. `data_root`: the dataset folder to read the bank's cases from, where it is
    not where the bank says."""
    from .io.locate import BankFolder
    from .parallel import run_bar

    from .parallel import execution, stop_on_signals, writer_lock

    cfg.validate()
    bank_dir, out = BankFolder(Path(bank_dir), data_root), Path(out)
    bank = Bank(bank_dir, data_root)
    cfg.check_load_label(bank)
    cfg = resolve_levels(replace(cfg, test_cases=cases_in_bank(cfg.test_cases, [c["case_id"] for c in bank.cases])),
                         bank)
    cfg = with_file_ending(cfg, bank)
    check_base_cases(bank, same_files=data_root is not None)
    record = run_record(bank, bank_dir, cfg)
    layout = TestsetLayout(out, tuple(bank.channel_names), dict(bank.index["labels"]), cfg.file_ending, record)
    n = cfg.n_levels * cfg.per_level
    prepare_output(out, record, resume)
    layout.prepare()
    with writer_lock(out / PROGRESS_DIR / "testset.lock", str(out)), stop_on_signals():
        try:
            if resume:
                remove_stale_temporaries(layout.folders())
            done = read_records(out)
            todo = [i for i in range(n) if i not in done]
            progress_file = out / PROGRESS_DIR / "testset.jsonl"
            with execution("local", None, jobs, "cpu") as runner, open(progress_file, "a") as log:
                cases = runner.map(make_testset_case, [(i, bank_dir, layout, cfg) for i in todo])
                for rec in run_bar(cases, total=len(todo), desc="testset", unit="case", disable=not progress):
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
        except Interrupted as exc:
            raise Interrupted(exc.signum, f"{exc}: {len(read_records(out))} of {n} cases written to {out}; run "
                                          f"the same command with --resume to finish") from None
    done = read_records(out)
    records = [done[i] for i in range(n)]
    finalize_testset(layout, records)
    return records


def finalize_testset(layout: TestsetLayout, records: list[dict]) -> None:
    """Write manifest.jsonl and the layout's final files (dataset.json, strata.csv) once every case is in place."""
    from .io.nifti import write_bytes_atomic

    write_bytes_atomic(layout.out / MANIFEST, "".join(json.dumps(r) + "\n" for r in records).encode())
    layout.write_final(records, [])
    shutil.rmtree(layout.out / PROGRESS_DIR, ignore_errors=True)
