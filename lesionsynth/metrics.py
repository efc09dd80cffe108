"""Segmentation metrics of one case, and bootstrap intervals of their means: arrays in, numbers out (no files).

Lesions are the connected components of a mask (26-connectivity by default, as cc3d and panoptica use).
Truth lesions and predicted components are matched one to one as panoptica's `NaiveThresholdMatching`
(IoU as the matching metric, many-to-one off) does: every pair that overlaps by at least one voxel and
whose IoU ≥ `iou_threshold` is a candidate; the candidates are taken in decreasing IoU (ties: lower
predicted label, then lower truth label) and a pair is kept when neither of its lesions is matched yet.
A truth lesion that is matched is detected (TP), one that is not is missed (FN); a predicted component
that is not matched is a false positive (FP). With the default threshold 0 any overlap detects a lesion;
0.5 is panoptic quality's rule, under which the matching is unique anyway.

Undefined ratios follow one rule: when a ratio's denominator is 0, it is 1 if truth and prediction are
both empty and 0 otherwise (Dice of two empty masks is 1, of one empty mask and one not 0; the lesion
recall of a case without truth lesions is 1 without predicted lesions, else 0). The relative volume
difference of a case whose truth is empty is NaN (undefined; left out of means).
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
from scipy import ndimage

from .geometry import structure_for, true_bounds

#: The per-case numbers `case_metrics` returns, in the order the tables show them.
CASE_METRICS = ("dice", "lesion_tp", "lesion_fp", "lesion_fn", "lesion_precision", "lesion_recall",
                "lesion_f1", "lesion_dice", "truth_lesions", "pred_lesions", "truth_load_mm3", "pred_load_mm3",
                "volume_diff_mm3", "abs_volume_diff_mm3", "rel_volume_diff", "voxel_precision", "voxel_recall",
                "truth_median_lesion_mm3")


def ratio(numerator: float, denominator: float, both_empty: bool) -> float:
    """numerator / denominator; for a zero denominator 1.0 when truth and prediction are both empty, else 0.0."""
    if denominator == 0:
        return 1.0 if both_empty else 0.0
    return float(numerator) / float(denominator)


def lesion_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask (6, 18 or 26-connectivity): (labels 1..n, n)."""
    labels, n = ndimage.label(mask, structure=structure_for(connectivity))
    return labels, int(n)


def match_lesions(truth_labels: np.ndarray, n_truth: int, pred_labels: np.ndarray, n_pred: int,
                  iou_threshold: float = 0.0) -> list[tuple[int, int, float, float]]:
    """One-to-one matches (truth label, predicted label, IoU, Dice) of two component label volumes, by the
    rule in this module's docstring (panoptica's NaiveThresholdMatching on IoU)."""
    both = (truth_labels > 0) & (pred_labels > 0)
    if not both.any():
        return []
    stride = n_truth + 1
    keys, overlap = np.unique(pred_labels[both].astype(np.int64) * stride + truth_labels[both], return_counts=True)
    pair_pred, pair_truth = np.divmod(keys, stride)
    truth_size = np.bincount(truth_labels.ravel(), minlength=n_truth + 1)
    pred_size = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    sizes = truth_size[pair_truth] + pred_size[pair_pred]
    iou = overlap / (sizes - overlap)
    pair_dice = 2.0 * overlap / sizes
    matched_truth, matched_pred, matches = set(), set(), []
    for k in np.argsort(-iou, kind="stable"):  # keys are sorted by (pred, truth): the stable sort keeps that for ties
        t, p = int(pair_truth[k]), int(pair_pred[k])
        if t in matched_truth or p in matched_pred or iou[k] < iou_threshold:
            continue
        matched_truth.add(t)
        matched_pred.add(p)
        matches.append((t, p, float(iou[k]), float(pair_dice[k])))
    return matches


def case_metrics(truth: np.ndarray, pred: np.ndarray, voxel_volume_mm3: float, connectivity: int = 26,
                 iou_threshold: float = 0.0) -> dict[str, float]:
    """Every number of `CASE_METRICS` for one case: boolean lesion masks of truth and prediction on the same
    grid, and the volume of one voxel in mm³.

    dice is over all lesion voxels; lesion_dice is the mean Dice of the matched lesion pairs (panoptica's
    sq_dsc); lesion_f1 = 2 TP / (truth lesions + predicted lesions) (panoptica's rq); volume_diff_mm3 =
    predicted − truth load (negative: under-segmentation), rel_volume_diff = that / truth load;
    voxel_precision = |T∩P| / |P|, voxel_recall = |T∩P| / |T|.
    """
    truth = np.asarray(truth, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    box = true_bounds(truth | pred)
    if box is not None:  # components lie inside the box of all lesion voxels: label only that
        truth, pred = truth[box], pred[box]
    truth_labels, n_truth = lesion_components(truth, connectivity)
    pred_labels, n_pred = lesion_components(pred, connectivity)
    matches = match_lesions(truth_labels, n_truth, pred_labels, n_pred, iou_threshold)
    tp = len(matches)
    empty = n_truth == 0 and n_pred == 0
    t_voxels, p_voxels = int(np.count_nonzero(truth)), int(np.count_nonzero(pred))
    overlap = int(np.count_nonzero(truth & pred))
    truth_load, pred_load = t_voxels * voxel_volume_mm3, p_voxels * voxel_volume_mm3
    sizes = np.bincount(truth_labels.ravel(), minlength=n_truth + 1)[1:]
    return {
        "dice": ratio(2 * overlap, t_voxels + p_voxels, empty),
        "lesion_tp": tp,
        "lesion_fp": n_pred - tp,
        "lesion_fn": n_truth - tp,
        "lesion_precision": ratio(tp, n_pred, empty),
        "lesion_recall": ratio(tp, n_truth, empty),
        "lesion_f1": ratio(2 * tp, n_truth + n_pred, empty),
        "lesion_dice": float(np.mean([m[3] for m in matches])) if matches else (1.0 if empty else 0.0),
        "truth_lesions": n_truth,
        "pred_lesions": n_pred,
        "truth_load_mm3": truth_load,
        "pred_load_mm3": pred_load,
        "volume_diff_mm3": pred_load - truth_load,
        "abs_volume_diff_mm3": abs(pred_load - truth_load),
        "rel_volume_diff": (pred_load - truth_load) / truth_load if truth_load > 0 else float("nan"),
        "voxel_precision": ratio(overlap, p_voxels, empty),
        "voxel_recall": ratio(overlap, t_voxels, empty),
        "truth_median_lesion_mm3": float(np.median(sizes)) * voxel_volume_mm3 if n_truth else float("nan"),
        # per truth lesion (for recall against lesion size): its volume and whether a prediction matched it
        "truth_lesion_mm3": [float(v) * voxel_volume_mm3 for v in sizes],
        "truth_lesion_detected": [bool(t in {m[0] for m in matches}) for t in range(1, n_truth + 1)],
    }


def bootstrap_means(values: np.ndarray, n_resamples: int, seed: int, key: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Means of the columns of `values` (cases × metrics; NaN left out) and their 95 % percentile bootstrap
    intervals, shape (2, metrics): the cases are drawn with replacement `n_resamples` times, the same draws
    for every column. The draws depend only on `seed` and `key` (e.g. the stratum's name), so a stratum's
    interval does not change when other strata are added. One case: the interval is its value."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError("values must be cases × metrics")
    n = values.shape[0]
    with warnings.catch_warnings():  # a column all NaN: its mean and interval are NaN, said by the NaN itself
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(values, axis=0) if n else np.full(values.shape[1], np.nan)
        if n == 0:
            return means, np.full((2, values.shape[1]), np.nan)
        rng = np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])
        chunk = max(1, 2_000_000 // (n * max(values.shape[1], 1)))  # resamples per block: ≤ 16 MB of drawn values
        resampled = []
        for start in range(0, n_resamples, chunk):
            draws = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
            resampled.append(np.nanmean(values[draws], axis=1))
        boot = np.concatenate(resampled, axis=0)
        interval = np.nanpercentile(boot, [2.5, 97.5], axis=0)
    return means, interval
