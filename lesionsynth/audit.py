"""Realism audit: how well can pasted lesions be told from the real lesions of the same dataset?

Every lesion (one connected component) is described by a few intensity features per channel, each
divided by the median of a thin shell of normal tissue around it so that they do not depend on the
scanner's gain: `contrast` (lesion median / shell median), `spread` (lesion IQR / shell median) and
`edge` (mean gradient magnitude on the lesion's boundary voxels, per mm, / shell median). `volume_mm3`
and `context` (shell median / the case's body median: which tissue the lesion sits in) are reported too
but are not given to the classifier (the load target sets the volumes; context is shown apart).

REAL lesions are the components of the original cases' labels; PASTED lesions are the components of a
synthetic label that hold voxels which are not lesion in its base case. A logistic regression tells the
two apart from the contrast/spread/edge features; its cross-validated AUC is the audit's figure:
0.5 means pasted lesions cannot be told from real ones, 1.0 that they always can.

Pure functions with explicit spacing; scikit-learn (a dependency) is imported only inside `realism_auc`;
where it will not import, the rest of the audit still works and the report says why.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

from .errors import InputError
from .geometry import dilate, dilate_box, structure_for, true_bounds
from .labels import label_in
from .prior import body_foreground, is_ct

#: Per-channel features given to the classifier, and those only reported.
MEASURES = ("contrast", "spread", "edge")
REPORTED = ("context",)
SHELL_VOXELS = 2          # shell: the lesion dilated by this many voxels (box), minus every lesion voxel
MIN_VOXELS = 4            # smaller lesions are skipped
MIN_SHELL_VOXELS = 10     # so are lesions with a smaller shell (e.g. lesions that fill their neighbourhood)
MAX_LESIONS = 300         # lesions measured per kind (real, pasted), drawn at random (seeded)
MIN_GROUP = 10            # fewer lesions of a kind: no AUC
BOOTSTRAP = 500           # resamples for the AUC's 95 % interval
CT_OFFSET = 1000.0        # CT channels: HU + 1000 (≈ attenuation relative to air), so ratios make sense
INSTALL_HINT = "scikit-learn will not import (it is a dependency of lesionsynth: pip install scikit-learn)"


# --------------------------------------------------------------------------------------------------
# Features of one lesion
# --------------------------------------------------------------------------------------------------

def foreground_median(channel: np.ndarray, channel_name: str = "", offset: float = 0.0) -> float:
    """Median of a channel inside the case's body mask (`prior.body_foreground` on every 3rd voxel)."""
    coarse = np.asarray(channel[::3, ::3, ::3], dtype=np.float32)
    body = body_foreground(coarse, channel_name)
    values = coarse[body] if body.any() else coarse.ravel()
    return float(np.median(values)) + offset


def gradient_at(image: np.ndarray, where: tuple[np.ndarray, ...], spacing) -> np.ndarray:
    """|∇image| (per mm) at the voxels `where` (index arrays): `np.gradient(image, *spacing)` there (central
    differences, one-sided at the array's faces), without computing it anywhere else."""
    total = np.zeros(len(where[0]), dtype=np.float64)
    for axis, step in enumerate(np.asarray(spacing, dtype=np.float64)):
        idx = where[axis]
        lo = np.maximum(idx - 1, 0)
        hi = np.minimum(idx + 1, image.shape[axis] - 1)
        span = (hi - lo) * step
        if not span.any():
            continue
        a = list(where)
        b = list(where)
        a[axis], b[axis] = hi, lo
        diff = image[tuple(a)].astype(np.float64) - image[tuple(b)]
        total += np.divide(diff, span, out=np.zeros_like(diff), where=span > 0) ** 2
    return np.sqrt(total)


def _ratio(value: float, denominator: float, scale: float) -> float:
    """value / denominator, NaN when the denominator is (about) zero relative to `scale`."""
    if not np.isfinite(denominator) or abs(denominator) <= 1e-6 * max(scale, 1e-12):
        return float("nan")
    return float(value / denominator)


def lesion_features(channels: np.ndarray, lesion: np.ndarray, lesion_all: np.ndarray, spacing,
                    foreground=None, names=None, offsets=None) -> dict | None:
    """Features of ONE lesion; None when it is too small (< MIN_VOXELS) or its shell too thin.

    channels: (C, X, Y, Z) intensities; lesion: (X, Y, Z) bool mask of the lesion; lesion_all: every lesion
    voxel of the case (kept out of the shell); spacing: voxel size in mm per axis. foreground: per channel,
    the case's body median (for `context_c`; left out when None); names: key suffix per channel (default
    its index); offsets: per channel, added to the intensities first (e.g. CT_OFFSET for CT).

    Per channel c: contrast_c = lesion median / shell median; spread_c = lesion IQR / shell median;
    edge_c = mean |∇I| (intensity per mm, as np.gradient with `spacing`) on the lesion's boundary voxels (lesion
    voxels with a 6-neighbour outside it) / shell median; context_c = shell median / foreground median.
    The shell is the lesion dilated by SHELL_VOXELS voxels (box) minus every lesion voxel. A ratio whose
    denominator is zero is NaN. Plus `volume_mm3` and `voxels`.
    """
    lesion = np.asarray(lesion, dtype=bool)
    n_vox = int(np.count_nonzero(lesion))
    if n_vox < MIN_VOXELS:
        return None
    spacing = np.asarray(spacing, dtype=np.float64)
    n_channels = channels.shape[0]
    names = [str(c) for c in range(n_channels)] if names is None else [str(x) for x in names]
    offsets = np.zeros(n_channels) if offsets is None else np.asarray(offsets, dtype=np.float64)
    pad = SHELL_VOXELS + 2  # the shell plus room for central differences at the shell's edge
    box = tuple(slice(max(b.start - pad, 0), min(b.stop + pad, size))
                for b, size in zip(true_bounds(lesion), lesion.shape))
    mask = lesion[box]
    shell = dilate_box(mask, SHELL_VOXELS) & ~(np.asarray(lesion_all[box], dtype=bool) | mask)
    if int(np.count_nonzero(shell)) < MIN_SHELL_VOXELS:
        return None
    where = np.nonzero(mask & dilate(~mask))  # boundary: lesion voxels with a 6-neighbour outside the lesion
    out = {"volume_mm3": n_vox * float(np.prod(spacing)), "voxels": n_vox}
    for c in range(n_channels):
        crop = np.asarray(channels[c][box], dtype=np.float64) + offsets[c]
        inside, around = crop[mask], crop[shell]
        shell_median = float(np.median(around))
        q25, q50, q75 = np.percentile(inside, [25, 50, 75])
        scale = float(np.abs(crop).max())
        edge = float(gradient_at(crop, where, spacing).mean()) if len(where[0]) else 0.0
        out[f"contrast_{names[c]}"] = _ratio(q50, shell_median, scale)
        out[f"spread_{names[c]}"] = _ratio(q75 - q25, shell_median, scale)
        out[f"edge_{names[c]}"] = _ratio(edge, shell_median, scale)
        if foreground is not None:
            out[f"context_{names[c]}"] = _ratio(shell_median, float(foreground[c]), abs(float(foreground[c])) + scale)
    return out


def feature_names(names, measures=MEASURES) -> list[str]:
    """Feature keys for channel suffixes `names`, grouped by measure: contrast_*, spread_*, edge_*."""
    return [f"{m}_{n}" for m in measures for n in names]


# --------------------------------------------------------------------------------------------------
# Telling pasted from real
# --------------------------------------------------------------------------------------------------

def rank_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of `score` for the positive class of binary `y` (Mann-Whitney; ties count half)."""
    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


#: Volume bins (quantiles of the pooled log volumes) of the volume-matched AUC.
VOLUME_BINS = 6


def group_weights(real_groups, pasted_groups) -> tuple[np.ndarray, np.ndarray]:
    """Weights that give the real lesions the pasted lesions' mix of groups (any hashable key per lesion):
    real lesions weigh (pasted share / real share) of their group; pasted lesions weigh 1, or 0 in a group
    that holds no real lesion (nothing to compare them with). Real weights are scaled to the pasted total."""
    real_groups, pasted_groups = list(real_groups), list(pasted_groups)
    n_real, n_pasted = Counter(real_groups), Counter(pasted_groups)
    total_real, total_pasted = max(len(real_groups), 1), max(len(pasted_groups), 1)
    w_real = np.array([(n_pasted.get(g, 0) / total_pasted) / (n_real[g] / total_real) for g in real_groups])
    w_pasted = np.array([1.0 if g in n_real else 0.0 for g in pasted_groups])
    return w_real * (w_pasted.sum() / max(w_real.sum(), 1e-12)), w_pasted


def volume_weights(real_volumes: np.ndarray, pasted_volumes: np.ndarray, bins: int = VOLUME_BINS
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`group_weights` over bins of log volume (quantiles of both groups): the real lesions get the pasted
    lesions' volume distribution."""
    lv_real, lv_pasted = np.log(np.maximum(real_volumes, 1e-9)), np.log(np.maximum(pasted_volumes, 1e-9))
    edges = np.quantile(np.concatenate([lv_real, lv_pasted]), np.linspace(0, 1, bins + 1))[1:-1]
    return group_weights(np.searchsorted(edges, lv_real).tolist(), np.searchsorted(edges, lv_pasted).tolist())


def _weighted_auc(y: np.ndarray, score: np.ndarray, weight: np.ndarray) -> float:
    """ROC AUC of `score` for positives `y` with sample weights (ties count half): `rank_auc` when all are 1."""
    if np.all(weight == 1.0):
        return rank_auc(y, score)
    order = np.argsort(score, kind="stable")
    s, yy, ww = score[order], y[order], weight[order]
    neg_below = 0.0
    total = 0.0
    i = 0
    while i < len(s):  # walk groups of equal scores
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        pos_w = ww[i:j][yy[i:j]].sum()
        neg_w = ww[i:j][~yy[i:j]].sum()
        total += pos_w * (neg_below + 0.5 * neg_w)
        neg_below += neg_w
        i = j
    pos_total, neg_total = weight[y].sum(), weight[~y].sum()
    return float(total / (pos_total * neg_total)) if pos_total > 0 and neg_total > 0 else 0.5


def realism_auc(real_features: list[dict], pasted_features: list[dict], seed: int = 0,
                features: list[str] | None = None, match_volume: bool = False, match_case: bool = False,
                match_donor: bool = False) -> dict:
    """Cross-validated AUC of a classifier telling pasted (positive) from real lesions.

    StandardScaler + LogisticRegression, 5-fold StratifiedKFold (shuffled with `seed`), roc_auc_score on
    the out-of-fold probabilities, on `features` (default: every contrast/spread/edge key of the lesions).
    Lesions with a non-finite feature are left out. Also the single-feature AUCs, symmetrised
    (max(auc, 1 − auc): how well the feature alone separates, whichever way), and the three strongest.
    `auc_ci95`: a stratified bootstrap interval of that AUC. With fewer than MIN_GROUP lesions of either
    kind, or without scikit-learn, `auc` is None and `reason` says why (the single-feature AUCs need no
    scikit-learn).

    `match_volume`: the real lesions are weighted (`volume_weights`, in the fit and in the AUC) to the
    pasted lesions' volume distribution, so that features that merely follow lesion size (a large lesion has
    a larger spread) do not count: the load target, not the paste, sets the sizes.
    `match_case`: the real lesions are weighted (`group_weights`) to the pasted lesions' mix of cases (a real
    lesion's `case_id`, a pasted lesion's `base_case`): each pasted lesion is compared with the real lesions of
    the anatomy, grid and scanner it was pasted into, not with other cases' (a coarse grid alone changes the
    spread and the edge of every lesion on it).
    `match_donor`: the real lesions are weighted to the pasted lesions' mix of donor lesions (`lesion_id`: a
    real lesion's own bank id, a pasted lesion's donor), so that each pasted lesion is compared with the very
    lesion it was cut from, as it lies in its own case. In a dataset that mixes lesion kinds (large dark stroke
    lesions beside small MS lesions, say), a high load draws the large ones far more often than the real pool
    holds them; that mix is the load's doing, not a trace of pasting.
    """
    if features is None:
        keys = [k for k in (real_features or pasted_features or [{}])[0] if k.split("_", 1)[0] in MEASURES]
        features = sorted(keys, key=lambda k: (MEASURES.index(k.split("_", 1)[0]), keys.index(k)))
    def matrix(rows):
        x = np.array([[r.get(f, np.nan) for f in features] for r in rows], dtype=np.float64).reshape(-1, len(features))
        volume = np.array([r.get("volume_mm3", np.nan) for r in rows], dtype=np.float64)
        keep = np.isfinite(x).all(axis=1) & (np.isfinite(volume) if match_volume else True)
        if match_donor:  # a lesion without a known donor matches nothing
            groups = [r.get("lesion_id", ("unknown", r.get("case_id"))) for r in rows]
        else:
            groups = [r.get("base_case", r.get("case_id")) for r in rows]
        return x[keep], volume[keep], [g for g, k in zip(groups, keep) if k]
    (x_real, v_real, g_real), (x_pasted, v_pasted, g_pasted) = matrix(real_features), matrix(pasted_features)
    out = {"auc": None, "auc_ci95": None, "reason": None, "features": list(features),
           "n_real": int(len(x_real)), "n_pasted": int(len(x_pasted)),
           "n_dropped": int(len(real_features) + len(pasted_features) - len(x_real) - len(x_pasted)),
           "classifier": "StandardScaler + LogisticRegression, 5-fold stratified CV, out-of-fold ROC AUC",
           "single_auc": {}, "strongest": []}
    x = np.concatenate([x_real, x_pasted])
    y = np.concatenate([np.zeros(len(x_real), bool), np.ones(len(x_pasted), bool)])
    w = np.ones(len(x))
    weighted = (match_volume or match_case or match_donor) and len(x_real) and len(x_pasted)
    if weighted:
        w = np.concatenate(volume_weights(v_real, v_pasted) if match_volume else group_weights(g_real, g_pasted))
        keep = w > 0
        x, y, w = x[keep], y[keep], w[keep]
        out["n_real"], out["n_pasted"] = int((~y).sum()), int(y.sum())  # those that weigh
        x_real, x_pasted = x[~y], x[y]
    if len(x_real) and len(x_pasted):
        for j, f in enumerate(features):
            a = _weighted_auc(y, x[:, j], w)
            out["single_auc"][f] = max(a, 1 - a)
        best = sorted(out["single_auc"].items(), key=lambda kv: -kv[1])[:3]
        out["strongest"] = [{"feature": f, "auc": a} for f, a in best]
    if min(len(x_real), len(x_pasted)) < MIN_GROUP:
        out["reason"] = (f"too few lesions to classify ({len(x_real)} real, {len(x_pasted)} pasted; "
                         f"at least {MIN_GROUP} of each needed)")
        return out
    if not features:
        out["reason"] = "no features"
        return out
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        out["reason"] = INSTALL_HINT
        return out
    model = Pipeline([("scale", StandardScaler()), ("logreg", LogisticRegression(max_iter=1000))])
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=int(seed))
    if weighted:
        proba = np.empty(len(y))
        for train, test in folds.split(x, y.astype(int)):
            model.fit(x[train], y[train].astype(int), logreg__sample_weight=w[train])
            proba[test] = model.predict_proba(x[test])[:, 1]
        out["auc"] = float(roc_auc_score(y.astype(int), proba, sample_weight=w))
    else:
        proba = cross_val_predict(model, x, y.astype(int), cv=folds, method="predict_proba")[:, 1]
        out["auc"] = float(roc_auc_score(y.astype(int), proba))
    # 95 % interval: stratified bootstrap of the out-of-fold probabilities (the models are not refitted)
    rng = np.random.default_rng([int(seed), 3])
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    boots = []
    for _ in range(BOOTSTRAP):
        pick = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        boots.append(_weighted_auc(y[pick], proba[pick], w[pick]))
    out["auc_ci95"] = [float(v) for v in np.percentile(boots, [2.5, 97.5])]
    return out


# --------------------------------------------------------------------------------------------------
# The audit of a generate output
# --------------------------------------------------------------------------------------------------

def _quota(expected: dict[str, int], limit: int, rng: np.random.Generator) -> dict[str, int]:
    """How many lesions to take from each case: `limit` lesions drawn without replacement from all."""
    slots = [case for case in sorted(expected) for _ in range(int(expected[case]))]
    if len(slots) > limit:
        slots = [slots[i] for i in np.sort(rng.choice(len(slots), size=limit, replace=False))]
    return dict(Counter(slots))


def _lesion_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The lesions' bounding box with room for the shell and the gradients (None: no lesion)."""
    bounds = true_bounds(mask)
    if bounds is None:
        return None
    pad = SHELL_VOXELS + 3
    return tuple(slice(max(b.start - pad, 0), min(b.stop + pad, n)) for b, n in zip(bounds, mask.shape))


def _components(mask: np.ndarray, connectivity: int, min_voxels: int):
    """(component labels, voxels per label, label big enough) of a (cropped) lesion mask."""
    comps, n = ndimage.label(mask, structure=structure_for(connectivity))
    sizes = np.bincount(comps.ravel(order="K"), minlength=n + 1)
    sizes[0] = 0
    return comps, sizes, sizes >= min_voxels


def _case_ref(run, case_id: str, original: bool):
    """CaseRef of a case: originals through the bank's recorded files (else the copy in the output)."""
    from .io import CaseRef

    n = len(run.channel_names)
    entry = run.bank_case(case_id) if original else None
    if entry and entry.get("images") and all(Path(p).is_file() for p in entry["images"]) \
            and Path(entry["label"]).is_file():
        return CaseRef(case_id, tuple(Path(p) for p in entry["images"]), Path(entry["label"]),
                       four_d=bool(entry.get("four_d")))
    return CaseRef(case_id, tuple(run.image_path(case_id, c) for c in range(n)), run.label_path(case_id))


def _measure_case(run, case, box, lesion_all, candidates, comps, take: int, rng, kind: str,
                  sources: list[dict] | None = None) -> list[dict]:
    """Features of up to `take` of the `candidates` (labels in `comps`, which covers `box` of the case). Each
    lesion also names its bank lesion (`lesion_id`) and that lesion's case (`source_case`), found by
    `lesion_source` among `sources`: the case's paste ops (pasted lesions) or its bank lesions (real ones)."""
    from .geometry import spacing_of

    names = run.channel_names
    offsets = [CT_OFFSET if is_ct(nm) else 0.0 for nm in names]
    chosen = candidates if len(candidates) <= take else np.sort(rng.choice(candidates, size=take, replace=False))
    if not len(chosen):
        return []
    foreground = [foreground_median(case.channels[c], names[c], offsets[c]) for c in range(len(names))]
    spacing = spacing_of(case.affine)
    channels = case.channels[(slice(None),) + box]
    objects = ndimage.find_objects(comps)
    # where a lesion's bank id and centre are kept: in a paste op (pasted lesions), in a bank lesion (real ones)
    id_key, centre_key, size_key = ("lesion_id", "centre_mm", "added_mm3") if kind == "pasted" else \
        ("id", "centroid_mm", "volume_mm3")
    out = []
    for k in chosen:
        # features on a box around the component (lesion_features crops again inside it)
        pad = SHELL_VOXELS + 3
        sl = tuple(slice(max(b.start - pad, 0), min(b.stop + pad, s)) for b, s in zip(objects[int(k) - 1], comps.shape))
        feats = lesion_features(channels[(slice(None),) + sl], comps[sl] == k, lesion_all[sl], spacing,
                                foreground, names, offsets)
        if feats is None:
            continue
        origin = [s.start + b.start for s, b in zip(sl, box)]
        component = comps[sl] == k
        centre = np.argwhere(component).mean(axis=0) + origin
        row = {"kind": kind, "case_id": case.case_id, "voxel": [round(float(v), 1) for v in centre], **feats}
        source = lesion_source(component, origin, case.affine, sources, centre_key, size_key) if sources else None
        if source is not None:
            row["lesion_id"], row["source_case"] = source[id_key], source["source_case"]
        out.append(row)
    return out


def _summary(rows: list[dict], key: str) -> dict:
    v = np.array([r[key] for r in rows if key in r], dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"n": 0, "median": None, "q25": None, "q75": None}
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "median": float(q50), "q25": float(q25), "q75": float(q75)}


def lesion_source(component: np.ndarray, origin, affine: np.ndarray, candidates: list[dict],
                  centre_key: str = "centre_mm", size_key: str = "added_mm3") -> dict | None:
    """Which of `candidates` (dicts with a world centre in mm under `centre_key`) a lesion is: the paste op
    that made a pasted lesion (ops of the case's manifest record, centred where the paste put its lesion's
    centroid, up to the elastic field), or the bank lesion a real lesion is (`centroid_mm`, `volume_mm3`).
    `component` (bool, a box of the case starting at voxel `origin`) is the lesion. Of the candidates whose
    centre lies inside it, the largest by `size_key` (pastes that touch merge into one lesion); if none does,
    the one whose centre lies nearest to the lesion's centroid. None if there is no candidate."""
    if not candidates:
        return None
    affine = np.asarray(affine, dtype=np.float64)
    centres = np.array([c[centre_key] for c in candidates], dtype=np.float64)
    inv = np.linalg.inv(affine)
    at = np.rint(centres @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64) - np.asarray(origin, dtype=np.int64)
    inside = np.all((at >= 0) & (at < np.array(component.shape)), axis=1)
    inside[inside] = component[tuple(at[inside].T)]
    if inside.any():
        return max((c for c, hit in zip(candidates, inside) if hit), key=lambda c: c.get(size_key, 0.0))
    centroid = np.argwhere(component).mean(axis=0) + np.asarray(origin, dtype=np.float64)
    world = affine[:3, :3] @ centroid + affine[:3, 3]
    return candidates[int(np.argmin(np.linalg.norm(centres - world, axis=1)))]


def audit_output(out_dir, max_lesions: int = MAX_LESIONS, seed: int = 0, progress: bool | None = False) -> dict:
    """Run the realism audit on a generate output folder (or an `OutputRun`); a JSON-able dict.

    At most `max_lesions` real and `max_lesions` pasted lesions are measured, drawn at random with `seed`
    (the same draw every time); each case is read once.
    """
    from .io import load_case
    from .output_run import OutputRun, read_label, read_output

    t0 = time.perf_counter()
    run = out_dir if isinstance(out_dir, OutputRun) else read_output(out_dir)
    names = run.channel_names
    lesion_labels = run.lesion_labels
    connectivity = run.connectivity
    notes: list[str] = []

    # originals: the bank's cases (lesion counts from bank.json), else the originals copied into the output
    synthetic = {r["case_id"] for r in run.records}
    if run.bank_index:
        originals = [c["case_id"] for c in run.bank_index["cases"]]
        wanted = set(lesion_labels)
        expected_real = Counter(les["source_case"] for les in run.bank_index["lesions"]
                                if int(les.get("label_value", lesion_labels[0])) in wanted)
    else:
        from .output_run import component_volumes

        originals = sorted(p.name[: -len(run.file_ending)] for p in (run.out / "labelsTr").glob(f"*{run.file_ending}")
                           if p.name[: -len(run.file_ending)] not in synthetic)
        expected_real = Counter()
        for cid in originals:
            label, affine = read_label(run.label_path(cid))
            expected_real[cid] = len(component_volumes(label, affine, lesion_labels, connectivity,
                                                       run.min_volume_mm3))
    expected_pasted = Counter({r["case_id"]: sum(op["op"] == "paste" for op in r["ops"])
                               for r in run.records if run.label_path(r["case_id"]).is_file()})
    quota_real = _quota({c: expected_real.get(c, 0) for c in originals}, max_lesions,
                        np.random.default_rng([int(seed), 1]))
    quota_pasted = _quota(dict(expected_pasted), max_lesions, np.random.default_rng([int(seed), 2]))
    base_of = {r["case_id"]: r["base_case"] for r in run.records}
    pastes_of = {r["case_id"]: [op for op in r["ops"] if op["op"] == "paste"] for r in run.records}
    bank_lesions_of: dict[str, list[dict]] = {}
    for les in (run.bank_index or {}).get("lesions", []):
        bank_lesions_of.setdefault(les["source_case"], []).append(les)

    real, pasted = [], []
    from tqdm import tqdm

    bar = tqdm(total=len(quota_real) + len(quota_pasted), desc="realism audit", unit="case",
               disable=None if progress is None else not progress)
    for kind, quota, rows, code in (("real", quota_real, real, 1), ("pasted", quota_pasted, pasted, 2)):
        for i, cid in enumerate(sorted(quota)):
            bar.update(1)
            rng = np.random.default_rng([int(seed), code, i])
            try:
                case = load_case(_case_ref(run, cid, kind == "real"), len(names))
                lesion_in_case = label_in(case.label, lesion_labels)
                box = _lesion_box(lesion_in_case)
                if box is None:
                    continue
                lesion_all = lesion_in_case[box]
                comps, sizes, keep = _components(lesion_all, connectivity, MIN_VOXELS)
                if kind == "pasted":  # only the components holding voxels that are not lesion in the base case
                    base_label, _ = read_label(_case_ref(run, base_of[cid], True).label_path)
                    if base_label.shape != case.label.shape:
                        raise InputError(f"{cid}: grid differs from its base case {base_of[cid]}")
                    new = lesion_all & ~label_in(base_label[box], lesion_labels)
                    has_new = np.zeros_like(keep)
                    has_new[np.unique(comps[new])] = True
                    keep &= has_new
            except InputError as exc:
                notes.append(f"{kind} case {cid} not measured: {exc}")
                continue
            vox_vol = abs(float(np.linalg.det(case.affine[:3, :3])))
            keep &= sizes * vox_vol >= run.min_volume_mm3 - 1e-9
            measured = _measure_case(run, case, box, lesion_all, np.flatnonzero(keep), comps, quota[cid], rng, kind,
                                     (pastes_of if kind == "pasted" else bank_lesions_of).get(cid))
            if kind == "pasted":
                for row in measured:
                    row["base_case"] = base_of[cid]
            rows += measured
            del case, lesion_in_case, lesion_all, comps

    bar.close()
    auc = realism_auc(real, pasted, seed=seed, features=feature_names(names))
    matched_keys = ("auc", "auc_ci95", "reason", "n_real", "n_pasted", "single_auc", "strongest")
    matched = {name: realism_auc(real, pasted, seed=seed, features=feature_names(names), **{flag: True})
               for name, flag in (("volume_matched", "match_volume"), ("case_matched", "match_case"),
                                  ("donor_matched", "match_donor"))}
    keys = feature_names(names) + feature_names(names, REPORTED) + ["volume_mm3"]
    return {
        "audit_version": 1,
        "channels": list(names),
        "ct_offset": {nm: CT_OFFSET for nm in names if is_ct(nm)},
        "seed": int(seed),
        "max_lesions": int(max_lesions),
        "shell_voxels": SHELL_VOXELS,
        "real_available": int(sum(expected_real.get(c, 0) for c in originals)),
        "pasted_available": int(sum(expected_pasted.values())),
        "n_real": len(real),
        "n_pasted": len(pasted),
        **{k: auc[k] for k in ("auc", "auc_ci95", "reason", "classifier", "features", "n_dropped", "single_auc",
                               "strongest")},
        **{name: {k: result[k] for k in matched_keys} for name, result in matched.items()},
        "summary": {k: {"real": _summary(real, k), "pasted": _summary(pasted, k)} for k in keys},
        "context": {nm: {"real": _summary(real, f"context_{nm}")["median"],
                         "pasted": _summary(pasted, f"context_{nm}")["median"]} for nm in names},
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 2),
        "lesions": [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
                    for row in real + pasted],
    }
