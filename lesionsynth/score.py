"""`lesionsynth score PRED TRUTH --out DIR`: score a model's predicted labels against the truth, per case and
per stratum.

PRED is a folder of predicted label files as `nnUNetv2_predict` writes them (`CASE_ID` + file ending: .nii.gz,
.nii, .mha or .nrrd; anything else, such as its json files and probability maps, is ignored). TRUTH is a
lesionsynth test set (`labelsTs/` and `strata.csv` with the columns case_id,factor,level,value), an nnU-Net
v2 raw dataset (`labelsTs/` if present, else `labelsTr/`; dataset.json gives the file ending and the label
values), or a plain folder of label files.

Every case is scored by `metrics.case_metrics` (the overlap rule is in that module). Strata: a test set's
(factor, level) pairs; for any other truth, every case is put in a bin of its truth load and one of its
median truth lesion volume (`volume_bin`). DIR receives `cases.csv`, `strata.csv`, `summary.json` and
`score.html`, all written into a staging folder that is renamed to DIR once every case is scored: an error
leaves no DIR behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, LesionsynthError, check_choice, check_field
from .geometry import voxel_volume
from .io.images import IMAGE_ENDINGS
from .labels import label_in
from .metrics import CASE_METRICS, bootstrap_means, case_metrics
from .score_pictures import recall_by_lesion_size, worst_case_overlays

STRATA_FILE = "strata.csv"
STRATA_COLUMNS = ("case_id", "factor", "level", "value")
OUTPUT_FILES = ("cases.csv", "strata.csv", "summary.json", "score.html")
#: Written into summary.json; `--overwrite` replaces only a folder whose summary.json says this.
PRODUCER = "lesionsynth score"
#: Largest difference of any affine entry (mm) between prediction and truth still taken as the same grid.
AFFINE_TOLERANCE_MM = 1e-3
#: The metrics whose means (with intervals) strata.csv and summary.json report.
STRATUM_METRICS = ("dice", "lesion_precision", "lesion_recall", "lesion_f1", "lesion_dice", "volume_diff_mm3",
                   "abs_volume_diff_mm3", "rel_volume_diff", "lesion_tp", "lesion_fp", "lesion_fn",
                   "truth_load_mm3", "pred_load_mm3", "voxel_precision", "voxel_recall")
#: The factors that bin a truth without strata.csv.
BIN_FACTORS = {"truth_load": "truth_load_mm3", "median_lesion_size": "truth_median_lesion_mm3"}
OVERLAP_RULE = ("truth lesions and predicted components (connected components) are matched one to one: every "
                "pair overlapping by >= 1 voxel with IoU >= the threshold is a candidate, candidates are taken in "
                "decreasing IoU and kept when neither lesion is matched yet (panoptica NaiveThresholdMatching, "
                "IoU, many-to-one off); matched truth lesions are TP, unmatched ones FN, unmatched predicted "
                "components FP")
CONVENTION = ("a ratio whose denominator is 0 is 1 when truth and prediction are both empty, else 0 (Dice of "
              "two empty masks 1, of one empty mask 0); rel_volume_diff is undefined (NaN, empty in the CSV) "
              "when the truth is empty; means leave NaN out")
BIN_RULE = ("fixed half-decade bins in mm3 (edges 1, 3, 10, 30, 100, 300, ...; a value on an edge goes to the "
            "upper bin): truth_load bins the case's truth lesion load (level '0': no lesion), median_lesion_size "
            "the median volume of its truth lesions (level 'none': no lesion)")


@dataclass
class ScoreConfig:
    """How cases are scored and summarised."""

    iou_threshold: float = 0.0
    connectivity: int = 26
    #: label values that count as lesion; empty: every non-zero value
    lesion_labels: tuple[int, ...] = ()
    n_resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        self.check()  # a bad config fails where it is made, naming its field

    def check(self) -> None:
        check_choice(self, "connectivity", (6, 18, 26))
        check_field(self, "iou_threshold", 0.0 <= self.iou_threshold <= 1.0, "must be between 0 and 1")
        check_field(self, "n_resamples", self.n_resamples >= 1, "must be at least 1")
        check_field(self, "lesion_labels", all(v != 0 for v in self.lesion_labels), "holds 0, the background")


@dataclass
class TruthCase:
    """One truth case: its label file and the strata (factor, level, value) it belongs to."""

    case_id: str
    label_path: Path
    strata: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class TruthSet:
    """The truth side of a scoring: where its labels are and what it says about them."""

    root: Path
    kind: str                      # "testset", "nnunet" or "folder"
    label_dir: Path
    cases: list[TruthCase]
    file_ending: str | None        # from dataset.json, else None (any image ending)
    declared_labels: dict[str, int] | None   # dataset.json labels, else None (the values seen in the truth)


@dataclass
class ScoreResult:
    out: Path
    rows: list[dict]
    summary: dict
    warnings: list[str]


# --------------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------------

def _case_id(name: str, ending: str | None = None) -> str | None:
    """The case id of an image file name (its ending stripped), or None for any other file."""
    if name.startswith("."):
        return None
    for end in ((ending,) if ending else IMAGE_ENDINGS):
        if name.endswith(end) and len(name) > len(end):
            return name[: -len(end)]
    return None


def _image_files(folder: Path, ending: str | None = None) -> dict[str, Path]:
    """Case id -> file of the image files directly in `folder`."""
    files = {}
    for path in sorted(folder.iterdir()):
        case_id = _case_id(path.name, ending)
        if case_id is not None and path.is_file():
            files[case_id] = path
    return files


def _read_dataset_json(path: Path) -> tuple[str | None, dict[str, int] | None]:
    """(file ending, labels) of a dataset.json; labels in nnU-Net v2 form {name: value}, or MSD {value: name}."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    ending = meta.get("file_ending")
    if ending is not None and ending not in IMAGE_ENDINGS:
        raise InputError(f"{path}: file_ending {ending!r} is not supported (use {', '.join(IMAGE_ENDINGS)})")
    raw = meta.get("labels")
    if raw is None:
        return ending, None
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: 'labels' must be a non-empty mapping")
    labels = {}
    for key, value in raw.items():
        if isinstance(value, int) and not isinstance(value, bool):
            labels[str(key)] = value
        elif isinstance(value, str) and str(key).isdigit():
            labels[value] = int(key)
        else:
            raise InputError(f"{path}: label {key!r} has value {value!r}; scoring needs plain integer labels")
    return ending, labels


def _read_strata(path: Path) -> dict[str, list[tuple[str, str, str]]]:
    """case id -> [(factor, level, value), ...] from a test set's strata.csv."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in STRATA_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(f"{path}: column(s) {', '.join(missing)} missing (expected {','.join(STRATA_COLUMNS)})")
    strata: dict[str, list[tuple[str, str, str]]] = {}
    for line, row in enumerate(reader, start=2):
        case_id, factor, level = (str(row.get(c) or "").strip() for c in ("case_id", "factor", "level"))
        if not case_id or not factor or not level:
            raise InputError(f"{path}: line {line}: case_id, factor and level must not be empty")
        entry = (factor, level, str(row.get("value") or "").strip())
        if any(f == factor for f, _, _ in strata.get(case_id, [])):
            raise InputError(f"{path}: line {line}: case {case_id} is listed twice for factor {factor}")
        strata.setdefault(case_id, []).append(entry)
    if not strata:
        raise InputError(f"{path}: no rows")
    return strata


def open_truth(path: str | Path) -> TruthSet:
    """Find the truth labels: a lesionsynth test set, an nnU-Net v2 raw dataset or a plain folder of labels."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder" if not root.exists() else f"{root}: is a file, not a folder")
    ending, labels = (_read_dataset_json(root / "dataset.json") if (root / "dataset.json").is_file()
                      else (None, None))
    label_dir = next((root / d for d in ("labelsTs", "labelsTr") if (root / d).is_dir()), root)
    if (root / STRATA_FILE).is_file() and label_dir != root:
        kind = "testset"
    else:
        kind = "nnunet" if label_dir != root else "folder"
    files = _image_files(label_dir, ending)
    if not files:
        raise InputError(f"{label_dir}: no label files ({ending or ', '.join(IMAGE_ENDINGS)}) found")
    cases = [TruthCase(case_id, p) for case_id, p in files.items()]
    if kind == "testset":
        strata = _read_strata(root / STRATA_FILE)
        unlisted = [c.case_id for c in cases if c.case_id not in strata]
        if unlisted:
            raise InputError(f"{root / STRATA_FILE}: case {unlisted[0]} of {label_dir.name}/ has no row"
                             + (f" (and {len(unlisted) - 1} more cases)" if len(unlisted) > 1 else ""))
        absent = sorted(set(strata) - set(files))
        if absent:
            raise InputError(f"{root / STRATA_FILE}: case {absent[0]} has no label file in {label_dir}"
                             + (f" (and {len(absent) - 1} more cases)" if len(absent) > 1 else ""))
        for case in cases:
            case.strata = list(strata[case.case_id])
    return TruthSet(root, kind, label_dir, cases, ending, labels)


def find_predictions(pred_dir: str | Path, truth: TruthSet) -> tuple[dict[str, Path], list[str]]:
    """Case id -> predicted label file for every truth case; InputError naming the first one missing.
    Also returns the case ids of prediction files that have no truth case (ignored)."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: no such folder" if not pred_dir.exists() else
                         f"{pred_dir}: is a file, not a folder of predictions")
    found = _image_files(pred_dir)
    if truth.file_ending:  # a file with the truth's own ending wins over another image ending of the same case
        found.update(_image_files(pred_dir, truth.file_ending))
    if not found:
        raise InputError(f"{pred_dir}: no prediction files ({', '.join(IMAGE_ENDINGS)}) found")
    missing = [c for c in truth.cases if c.case_id not in found]
    if missing:
        ending = truth.file_ending or _ending_of(missing[0].label_path)
        more = f" (and {len(missing) - 1} more cases)" if len(missing) > 1 else ""
        raise InputError(f"{pred_dir / (missing[0].case_id + ending)}: prediction missing for truth case "
                         f"{missing[0].case_id}{more}")
    known = {c.case_id for c in truth.cases}
    return {c.case_id: found[c.case_id] for c in truth.cases}, sorted(set(found) - known)


def _ending_of(path: Path) -> str:
    return next(e for e in IMAGE_ENDINGS if path.name.endswith(e))


# --------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------

def read_label(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(integer label volume, affine) of a 3-D label file (a trailing axis of length 1 is dropped)."""
    import nibabel as nib

    from .io.images import load_image

    img = load_image(path)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: a label must be 3-D, this file has shape {img.shape}")
    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            data = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as exc:  # noqa: BLE001 - a broken data block, whatever nibabel raises
        raise InputError(f"{path}: cannot read voxel data ({str(exc).splitlines()[0][:200]})") from None
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise InputError(f"{path}: holds non-integer values (a probability map?); labels must be integers")
        data = data.astype(np.int32)
    elif data.dtype.kind not in "iub":
        raise InputError(f"{path}: voxel type {data.dtype} is not a label type")
    return data, np.asarray(img.affine, dtype=np.float64)


def label_values(label: np.ndarray) -> set[int]:
    """The distinct values of a label volume."""
    if label.dtype == np.uint8:
        return {int(v) for v in np.flatnonzero(np.bincount(label.ravel(), minlength=256))}
    return {int(v) for v in np.unique(label)}


def check_same_grid(pred_path: Path, pred_shape, pred_affine, truth_path: Path, truth_shape, truth_affine) -> None:
    """InputError naming the prediction when its shape or affine differs from the truth's."""
    if tuple(pred_shape) != tuple(truth_shape):
        raise InputError(f"{pred_path}: grid differs from the truth {truth_path} (shape {tuple(pred_shape)} vs "
                         f"{tuple(truth_shape)})")
    worst = float(np.max(np.abs(np.asarray(pred_affine) - np.asarray(truth_affine))))
    if not worst <= AFFINE_TOLERANCE_MM:
        raise InputError(f"{pred_path}: grid differs from the truth {truth_path} (affines differ by up to "
                         f"{worst:.4g} mm; tolerance {AFFINE_TOLERANCE_MM:g})")


def _lesion_mask(label: np.ndarray, lesion_labels: tuple[int, ...]) -> np.ndarray:
    """The voxels that count as lesion: those of `lesion_labels`, or every non-zero one."""
    return label_in(label, lesion_labels) if lesion_labels else label != 0


def score_case(case_id: str, truth_path: Path, pred_path: Path, config: ScoreConfig,
               allowed_values: tuple[int, ...] | None) -> dict:
    """Metrics of one case, with the label values seen in truth and prediction (`allowed_values`: the truth's
    declared label set, checked here; None: checked by the caller against all values seen in the truth)."""
    truth, truth_affine = read_label(truth_path)
    pred, pred_affine = read_label(pred_path)
    check_same_grid(pred_path, pred.shape, pred_affine, truth_path, truth.shape, truth_affine)
    pred_values = label_values(pred)
    if allowed_values is not None:
        _check_values(pred_path, pred_values, set(allowed_values), "dataset.json")
    truth_mask, pred_mask = _lesion_mask(truth, config.lesion_labels), _lesion_mask(pred, config.lesion_labels)
    metrics = case_metrics(truth_mask, pred_mask, voxel_volume(truth_affine), config.connectivity,
                           config.iou_threshold)
    return {"case_id": case_id, "metrics": metrics, "truth_values": sorted(label_values(truth)),
            "pred_values": sorted(pred_values)}


def _score_case_or_error(*args):
    """`score_case`, with an error the user can act on returned instead of raised (see `score`)."""
    try:
        return score_case(*args)
    except LesionsynthError as exc:
        return exc


def _check_values(pred_path: Path, values: set[int], allowed: set[int], source: str) -> None:
    extra = sorted(values - allowed)
    if extra:
        raise InputError(f"{pred_path}: label value(s) {extra} not in the truth's label set {sorted(allowed)} "
                         f"({source})")


# --------------------------------------------------------------------------------------------------
# Strata and summaries
# --------------------------------------------------------------------------------------------------

def volume_bin(volume_mm3: float) -> tuple[str, float]:
    """(level name, lower edge) of the half-decade bin (edges 1, 3, 10, 30, ... mm³) holding `volume_mm3`."""
    exponent = math.floor(math.log10(volume_mm3))
    decade = 10.0 ** exponent
    if volume_mm3 >= 10 * decade:  # log10 rounded across a power of ten
        decade *= 10
    elif volume_mm3 < decade:
        decade /= 10
    low, high = (decade, 3 * decade) if volume_mm3 < 3 * decade else (3 * decade, 10 * decade)
    return f"{_edge(low)}-{_edge(high)}", low


def _edge(value: float) -> str:
    return f"{value:.0f}" if value >= 1 else f"{value:.10g}"


def bin_strata(metrics: dict) -> list[tuple[str, str, str]]:
    """The (factor, level, value) strata of a case scored against a truth without strata.csv."""
    strata = []
    for factor, key in BIN_FACTORS.items():
        value = metrics[key]
        if not value > 0:  # no truth lesion: zero load, no median size
            level = "0" if factor == "truth_load" else "none"
            strata.append((factor, level, f"{value:g}" if value == value else ""))
        else:
            strata.append((factor, volume_bin(value)[0], f"{value:.6g}"))
    return strata


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def level_order(levels: list[str], values: dict[str, list[str]]) -> list[str]:
    """A factor's levels in plotting order: by their number when every level is one (bins: by lower edge),
    else by the median of their cases' values when those are numbers, else as first listed."""
    def key_of(level: str) -> float | None:
        if level == "none":  # the median lesion size of a case without lesions: first
            return -math.inf
        if "-" in level and all(_number(part) is not None for part in level.split("-", 1)):
            return _number(level.split("-", 1)[0])
        return _number(level)

    keys = {lv: key_of(lv) for lv in levels}
    if all(k is not None for k in keys.values()):
        return sorted(levels, key=lambda lv: keys[lv])
    medians = {}
    for lv in levels:
        numbers = [n for n in (_number(v) for v in values.get(lv, [])) if n is not None]
        medians[lv] = float(np.median(numbers)) if numbers else None
    if all(m is not None for m in medians.values()):
        return sorted(levels, key=lambda lv: medians[lv])
    return list(levels)


def _stat_block(rows: list[dict], config: ScoreConfig, key: str) -> dict:
    table = np.array([[_as_float(r[m]) for m in STRATUM_METRICS] for r in rows], dtype=np.float64)
    means, interval = bootstrap_means(table.reshape(len(rows), len(STRATUM_METRICS)), config.n_resamples,
                                      config.seed, key)
    return {m: {"mean": _json_float(means[i]), "ci95": [_json_float(interval[0, i]), _json_float(interval[1, i])],
                "n": int(np.count_nonzero(~np.isnan(table[:, i]))) if len(rows) else 0}
            for i, m in enumerate(STRATUM_METRICS)}


def _as_float(value) -> float:
    return float("nan") if value is None or value == "" else float(value)


def _json_float(value: float) -> float | None:
    return None if not math.isfinite(value) else round(float(value), 10)


def summarise(rows: list[dict], config: ScoreConfig) -> tuple[dict, list[dict]]:
    """(overall statistics, per stratum statistics in factor and level order) of the scored cases."""
    overall = _stat_block(rows, config, "all")
    members: dict[str, dict[str, list[dict]]] = {}
    values: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        for factor, level, value in row["strata"]:
            members.setdefault(factor, {}).setdefault(level, []).append(row)
            values.setdefault(factor, {}).setdefault(level, []).append(value)
    strata = []
    for factor, by_level in members.items():
        for level in level_order(list(by_level), values[factor]):
            cases = by_level[level]
            numbers = [n for n in (_number(v) for v in values[factor][level]) if n is not None]
            strata.append({"factor": factor, "level": level, "stratum": f"{factor}={level}", "n": len(cases),
                           "value": float(np.median(numbers)) if numbers else None,
                           "cases": [r["case_id"] for r in cases],
                           "metrics": _stat_block(cases, config, f"{factor}={level}")})
    return overall, strata


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output that exists and is not empty, unless --overwrite and it is a previous score output."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise InputError(f"{out}: folder exists and is not empty; choose a new folder or pass --overwrite")
    try:
        producer = json.loads((out / "summary.json").read_text()).get("producer")
    except (OSError, ValueError, AttributeError):
        producer = None
    if producer != PRODUCER:
        raise InputError(f"{out}: not the output of a previous 'lesionsynth score' (no summary.json of one); "
                         f"--overwrite replaces only those")


def score_predictions(pred: str | Path, truth: str | Path, out: str | Path, config: ScoreConfig | None = None,
                      jobs: int = 1, overwrite: bool = False, progress: bool = False) -> ScoreResult:
    """Score the predictions in PRED against TRUTH and write DIR (`out`): cases.csv, strata.csv, summary.json,
    score.html. Nothing is written unless every case is scored."""
    from tqdm import tqdm

    from .parallel import execution

    config = config or ScoreConfig()
    config.check()
    out = Path(out)
    check_out(out, overwrite)
    truth_set = open_truth(truth)
    predictions, extra = find_predictions(pred, truth_set)
    declared = tuple(sorted(set(truth_set.declared_labels.values()))) if truth_set.declared_labels else None
    known_labels = set(declared) if declared else None
    if declared and config.lesion_labels:
        unknown = sorted(set(config.lesion_labels) - set(declared))
        if unknown:
            raise InputError(f"--lesion-label {unknown[0]}: not a label of {truth_set.root / 'dataset.json'} "
                             f"{truth_set.declared_labels}")
    warnings = []
    if extra:
        warnings.append(f"{Path(pred)}: {len(extra)} prediction file(s) without a truth case ignored "
                        f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})")
    calls = [(c.case_id, c.label_path, predictions[c.case_id], config, declared) for c in truth_set.cases]
    results, error = [], None
    with execution("local", None, jobs) as runner:
        for r in tqdm(runner.map(_score_case_or_error, calls), total=len(calls), desc="score", unit="case",
                      disable=None if progress else True):
            if isinstance(r, LesionsynthError):
                # leave the block normally: the workers finish their case and stop (stopping them at once from
                # an error makes Python 3.11's pool thread print a traceback)
                error = r
                break
            results.append(r)
    if error is not None:
        raise error
    if known_labels is None:
        known_labels = set().union(*(r["truth_values"] for r in results))
        for r in results:
            _check_values(predictions[r["case_id"]], set(r["pred_values"]), known_labels,
                          f"the values seen in {truth_set.label_dir}")
        if config.lesion_labels and not set(config.lesion_labels) & known_labels:
            raise InputError(f"--lesion-label {list(config.lesion_labels)}: no such value in the truth labels "
                             f"{sorted(known_labels)}")
    rows = []
    for case, r in zip(truth_set.cases, results):
        strata = case.strata if truth_set.kind == "testset" else bin_strata(r["metrics"])
        rows.append({"case_id": case.case_id, "strata": strata, **r["metrics"]})
    overall, strata = summarise(rows, config)
    summary = _summary(Path(pred), truth_set, config, sorted(known_labels), overall, strata, warnings)
    summary["recall_by_lesion_size"] = recall_by_lesion_size(rows)
    pictures = worst_case_overlays(rows, {c.case_id: c.label_path for c in truth_set.cases}, predictions,
                                   lambda label: _lesion_mask(label, config.lesion_labels))
    _write_outputs(out, rows, strata, overall, summary, pictures)
    return ScoreResult(out, rows, summary, warnings)


def _summary(pred: Path, truth_set: TruthSet, config: ScoreConfig, label_set: list[int], overall: dict,
             strata: list[dict], warnings: list[str]) -> dict:
    """summary.json: where the numbers come from, how they were made, the overall and per stratum statistics."""
    return {
        "producer": PRODUCER,
        "pred": str(pred.resolve()),
        "truth": str(truth_set.root.resolve()),
        "truth_kind": truth_set.kind,
        "n_cases": len(truth_set.cases),
        "settings": {
            "overlap_rule": OVERLAP_RULE, "reference_implementation": "panoptica NaiveThresholdMatching (IoU)",
            "iou_threshold": config.iou_threshold, "connectivity": config.connectivity,
            "lesion_labels": list(config.lesion_labels) or "every non-zero label",
            "label_set": label_set, "convention": CONVENTION,
            "strata": ("the test set's (factor, level) from strata.csv" if truth_set.kind == "testset" else BIN_RULE),
            "bootstrap": {"resamples": config.n_resamples, "seed": config.seed, "interval": "95 % percentile",
                          "unit": "case"},
        },
        "overall": overall,
        "strata": strata,
        "warnings": warnings,
    }


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def _cell(value) -> str:
    """A CSV cell: integers without a decimal point, other numbers exactly (shortest round trip), NaN empty."""
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return ""
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


def cases_csv(rows: list[dict]) -> str:
    """cases.csv: one row per case; a case in several strata has them joined by '; '."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case_id", "stratum", "factor", "level", "value", *CASE_METRICS])
    for row in rows:
        strata = row["strata"]
        writer.writerow([row["case_id"], "; ".join(f"{f}={lv}" for f, lv, _ in strata),
                         "; ".join(s[0] for s in strata), "; ".join(s[1] for s in strata),
                         "; ".join(s[2] for s in strata), *(_cell(row[m]) for m in CASE_METRICS)])
    return buf.getvalue()


def strata_csv(overall: dict, strata: list[dict], n_cases: int) -> str:
    """strata.csv: a row 'all' and one per stratum: n, the median value, and mean and 95 % interval of each metric."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["stratum", "factor", "level", "n", "value",
                     *(f"{m}_{part}" for m in STRATUM_METRICS for part in ("mean", "ci_low", "ci_high"))])

    def cells(stats: dict) -> list[str]:
        return [_cell(float("nan") if x is None else x) for m in STRATUM_METRICS
                for x in (stats[m]["mean"], *stats[m]["ci95"])]

    writer.writerow(["all", "all", "all", n_cases, "", *cells(overall)])
    for s in strata:
        writer.writerow([s["stratum"], s["factor"], s["level"], s["n"], _cell(s["value"] if s["value"] is not None
                                                                              else float("nan")), *cells(s["metrics"])])
    return buf.getvalue()


def _write_outputs(out: Path, rows: list[dict], strata: list[dict], overall: dict, summary: dict,
                   pictures: list[dict] = ()) -> None:
    from .score_html import score_html

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = None
    try:
        (staging / "cases.csv").write_text(cases_csv(rows), encoding="utf-8")
        (staging / "strata.csv").write_text(strata_csv(overall, strata, len(rows)), encoding="utf-8")
        (staging / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        (staging / "score.html").write_text(score_html(rows, summary, pictures), encoding="utf-8")
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
        if out.exists():
            if any(out.iterdir()):
                old = out.with_name(f".{out.name}.old{os.getpid()}")
                os.replace(out, old)
            else:
                out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
