"""A small 3D patch CNN as a critic of pasted lesions: can it tell them from real ones?

    python benchmarks/patch_cnn_critic.py OUT_DIR [--data DATASET] [--json FILE] [--seed 0] [--epochs 15]
                                          [--max-lesions 300] [--real bases|all] [--real-splits 1]

OUT_DIR is a `lesionsynth generate` output (manifest.jsonl: one line per synthetic case with its base case and
its ops). DATASET is the dataset the bank was built from (the real cases); without --data, the path bank.json
records (the bank is the one run.json names).

Lesions (as in `lesionsynth.critic`): REAL = connected components of the original cases' labels, PASTED =
components of a synthetic case's label that hold voxels which are not lesion in its base case; components
smaller than critic.MIN_VOXELS voxels or the bank's min_volume_mm3 are skipped. At most --max-lesions of each
kind, drawn with --seed (a seeded random key per lesion; the smallest keys are kept, so the draw does not
depend on the order in which cases are read).

Patch: a PATCH_MM cube (24 mm) sampled every STEP_MM (1 mm: 24³ points) around the lesion's centroid, its axes
the WORLD axes (RAS mm), through the case's affine (scipy.ndimage.map_coordinates, linear), so native grids of
any spacing and orientation give the same physical patch. Each channel is normalised by the median and the
robust sd (1.4826 × MAD) of the patch's tissue points (no lesion of the case within a voxel's reach: the
linearly sampled lesion mask is 0) and clipped to ±CLIP; one more channel is the lesion's own mask (linear
sample: partial volume in 0…1), so the network sees where the label lies relative to the intensities.

Network: 4 blocks of conv 3×3×3 (WIDTHS = 8, 16, 32, 32 channels) + BatchNorm + ReLU, max-pool 2 between blocks
(24 → 12 → 6 → 3), global average pool, linear → one logit. Adam (lr 1e-3, weight decay 1e-4), batch 32,
--epochs epochs, class-balanced loss (each class weighs half), augmentation: a random flip of each axis and a
random 90° rotation in a random plane per sample; prediction: mean logit over the 8 flips.

Cross-validation: StratifiedGroupKFold (min(5, groups of each class) folds, shuffled with --seed) grouped by
HOST ANATOMY: a real lesion by its case, a pasted lesion by its synthetic case's base case, so an anatomy is
never in training and test. Out-of-fold ROC AUC, its 95 % interval by bootstrap over the groups
(`critic._cluster_bootstrap`), the AUC of each fold and the within-fold AUC (pairs of one fold only, so that a
fold's score offset does not count). Occlusion: on each held-out fold the trained model
predicts again with one input part set to 0 (= the tissue median): each intensity channel, the mask channel,
the lesion's inside (all intensity channels where mask ≥ 0.5), the rim (0-RIM_MM outside the lesion) and the
context (farther); the AUC drop says what the CNN uses.

--real bases (default) takes real lesions only from the original cases that are base cases of the synthetic
cases: pasted and real lesions then come from the same anatomies, scanners and grids (voxel size, noise and
smoothness of the resampled patch would otherwise tell the case mix, not the paste). --real all takes them
from every original case. Honesty check (real vs real): the real lesions of ALL original cases, the cases
split at random into two pseudo-classes (--real-splits seeded splits, the mean AUC), the same cross-validation;
its AUC should be near 0.5. It falls below 0.5 when the cases differ a lot (grids of 0.8 to 3 mm, say): the
network learns case looks, and a held-out case's look is over-represented in the OTHER pseudo-class of its
training folds. An AUC well above 0.5 would mean a leak.

Printed: the numbers of lesions, the pasted-vs-real AUC [95 % interval] with the fold AUCs, the occlusion
AUCs, the real-vs-real AUC, the seconds. --json writes it all, with each lesion's out-of-fold score.

Deterministic on CPU for a seed: torch.manual_seed per fold, torch.use_deterministic_algorithms, one thread
(torch.set_num_threads(1)). About 4 ms per patch and epoch of training on one CPU thread: a 16-case output
(~60 real, ~170 pasted lesions, 160 real ones in the check) takes about 2 minutes at 15 epochs, 300 lesions
of each kind about 4-5 minutes.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

PATCH_MM = 24.0
STEP_MM = 1.0
MAX_LESIONS = 300
N_SPLITS = 5
EPOCHS = 15
WIDTHS = (8, 16, 32, 32)
BATCH = 32
LR = 1e-3
WEIGHT_DECAY = 1e-4
CLIP = 50.0
RIM_MM = 3.0
MIN_TISSUE = 50          # fewer tissue points in a patch: normalise over all its points
MAD_SCALE = 1.4826


# --------------------------------------------------------------------------------------------------
# Patches in world mm
# --------------------------------------------------------------------------------------------------

def patch_points(centre_mm, size_mm: float = PATCH_MM, step_mm: float = STEP_MM) -> np.ndarray:
    """World coordinates (3, n, n, n) of a cube of side `size_mm` sampled every `step_mm` (n = size / step
    points per axis), centred on `centre_mm`; patch axis i runs along world axis i (RAS mm)."""
    n = int(round(size_mm / step_mm))
    offsets = (np.arange(n) - (n - 1) / 2.0) * step_mm
    grid = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"))
    return grid + np.asarray(centre_mm, dtype=np.float64).reshape(3, 1, 1, 1)


def sampling_box(affine, shape, centre_mm, size_mm: float = PATCH_MM, step_mm: float = STEP_MM):
    """(crop: voxel slices of a volume with `affine` and `shape` that cover the patch, coords: the patch's
    points as voxel coordinates within that crop, shape (3, n, n, n)); crop is None when the patch misses
    the volume entirely."""
    world = patch_points(centre_mm, size_mm, step_mm)
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    vox = np.einsum("ij,jxyz->ixyz", inv[:3, :3], world) + inv[:3, 3].reshape(3, 1, 1, 1)
    lo = np.floor(vox.reshape(3, -1).min(axis=1)).astype(int) - 1
    hi = np.ceil(vox.reshape(3, -1).max(axis=1)).astype(int) + 2
    lo = np.clip(lo, 0, np.asarray(shape))
    hi = np.clip(hi, 0, np.asarray(shape))
    if np.any(hi <= lo):
        return None, vox
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return crop, vox - lo.reshape(3, 1, 1, 1)


def sample(array: np.ndarray, coords: np.ndarray, order: int = 1) -> np.ndarray:
    """`array` (a crop) at the voxel coordinates `coords` (3, ...): linear, edge values beyond the volume."""
    return ndimage.map_coordinates(np.asarray(array, dtype=np.float32), coords, order=order, mode="nearest",
                                   prefilter=False).astype(np.float32)


def normalise(patch: np.ndarray, tissue: np.ndarray, clip: float = CLIP) -> np.ndarray:
    """Each channel of `patch` (C, n, n, n) minus the median of its `tissue` points, over their robust sd."""
    out = np.empty_like(patch, dtype=np.float32)
    use = tissue if tissue.sum() >= MIN_TISSUE else np.ones_like(tissue)
    for c in range(len(patch)):
        v = patch[c][use].astype(np.float64)
        med = float(np.median(v))
        sd = MAD_SCALE * float(np.median(np.abs(v - med)))
        if not sd > 1e-6:
            sd = float(v.std())
        if not sd > 1e-6:
            sd = 1.0
        out[c] = np.clip((patch[c] - med) / sd, -clip, clip)
    return out


def lesion_patch(channels: np.ndarray, lesion: np.ndarray, comps: np.ndarray, label: int, affine,
                 centre_mm, size_mm: float = PATCH_MM, step_mm: float = STEP_MM) -> np.ndarray:
    """The network's input for one lesion: (C + 1, n, n, n) = the C channels normalised on the patch's tissue
    (points where the sampled `lesion` mask is 0), then component `label` of `comps` as a soft mask."""
    n = int(round(size_mm / step_mm))
    crop, coords = sampling_box(affine, lesion.shape, centre_mm, size_mm, step_mm)
    if crop is None:
        return np.zeros((len(channels) + 1, n, n, n), np.float32)
    raw = np.stack([sample(channels[c][crop], coords) for c in range(len(channels))])
    any_lesion = sample(lesion[crop], coords)
    own = sample(comps[crop] == label, coords)
    return np.concatenate([normalise(raw, any_lesion <= 1e-6), own[None]]).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Lesions of an output
# --------------------------------------------------------------------------------------------------

def _candidates(lesion: np.ndarray, affine, connectivity: int, min_volume_mm3: float, must_touch=None):
    """(component labels of `lesion`, kept labels, their centroids in world mm, their volumes in mm³): the
    components of at least critic.MIN_VOXELS voxels and `min_volume_mm3` (that hold a `must_touch` voxel)."""
    from lesionsynth.audit import _components
    from lesionsynth.critic import MIN_VOXELS
    from lesionsynth.geometry import voxel_volume

    comps, sizes, keep = _components(lesion, connectivity, MIN_VOXELS)
    vv = voxel_volume(affine)
    keep &= sizes * vv >= min_volume_mm3 - 1e-9
    if must_touch is not None:
        touched = np.zeros_like(keep)
        touched[np.unique(comps[must_touch])] = True
        keep &= touched
    keep[0] = False
    labels = np.flatnonzero(keep)
    if not len(labels):
        return comps, labels, np.zeros((0, 3)), np.zeros(0)
    centres = np.asarray(ndimage.center_of_mass(lesion, comps, labels), dtype=np.float64).reshape(-1, 3)
    world = centres @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return comps, labels, world, sizes[labels] * vv


class _Pool:
    """The `cap` lesions with the smallest random keys (a draw independent of the reading order)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.heap: list = []   # (-key, serial, patch, meta)
        self.serial = 0

    def wants(self, key: float) -> bool:
        return len(self.heap) < self.cap or key < -self.heap[0][0]

    def add(self, key: float, patch: np.ndarray, meta: dict) -> None:
        item = (-key, self.serial, patch, meta)
        self.serial += 1
        if len(self.heap) < self.cap:
            heapq.heappush(self.heap, item)
        else:
            heapq.heapreplace(self.heap, item)

    def items(self) -> list[tuple[float, np.ndarray, dict]]:
        return sorted(((-k, p, m) for k, _, p, m in self.heap), key=lambda t: t[0])


def _keys(seed: int, kind: int, case_id: str, n: int) -> np.ndarray:
    return np.random.default_rng([int(seed), kind, zlib.crc32(case_id.encode())]).random(n)


def collect_lesions(out_dir, data=None, max_lesions: int = MAX_LESIONS, seed: int = 0, log=print) -> dict:
    """Patches of real and pasted lesions of a generate output: {"pasted", "real_base", "real_other":
    [(key, patch, meta)], "channels": names, "notes": [...]}; real_base = lesions of original cases that are
    base cases of synthetic cases. Each list holds at most `max_lesions` (smallest keys)."""
    from lesionsynth import critic
    from lesionsynth.errors import InputError
    from lesionsynth.io import CaseRef
    from lesionsynth.io.dataset import open_dataset
    from lesionsynth.output_run import read_output

    run = read_output(out_dir)
    if data is None:
        root = ((run.bank_index or {}).get("dataset") or {}).get("root")
        if not root:
            raise InputError(f"{out_dir}: the bank's dataset is unknown (bank moved?); pass --data DATASET")
        data = root
    spec = open_dataset(data)
    if len(spec.channel_names) != len(run.channel_names):
        raise InputError(f"{data} has channels {spec.channel_names}, {out_dir} {run.channel_names}")
    originals = {ref.case_id: ref for ref in spec.cases}
    labels, connectivity, min_volume = run.lesion_labels, run.connectivity, run.min_volume_mm3
    records = [r for r in run.records if run.label_path(r["case_id"]).is_file()]
    by_base = defaultdict(list)
    for r in records:
        by_base[r["base_case"]].append(r)
    notes = [f"base case {b} of {len(rs)} synthetic case(s) is not in {data}" for b, rs in sorted(by_base.items())
             if b not in originals]
    n_ch = len(run.channel_names)
    pools = {"pasted": _Pool(max_lesions), "real_base": _Pool(max_lesions), "real_other": _Pool(max_lesions)}
    found = {k: 0 for k in pools}
    for oid in sorted(originals):
        try:
            channels, lesion, affine = critic.read_ref(originals[oid], labels, n_ch)
        except (InputError, OSError) as exc:
            notes.append(f"case {oid} not read: {exc}")
            continue
        kind = "real_base" if oid in by_base else "real_other"
        comps, labs, centres, vols = _candidates(lesion, affine, connectivity, min_volume)
        found[kind] += len(labs)
        for key, lab, c, v in zip(_keys(seed, 1, oid, len(labs)), labs, centres, vols):
            if pools[kind].wants(key):
                pools[kind].add(key, lesion_patch(channels, lesion, comps, int(lab), affine, c),
                                {"kind": "real", "case_id": oid, "group": oid, "centre_mm": c.round(2).tolist(),
                                 "volume_mm3": round(float(v), 2)})
        del comps
        for rec in sorted(by_base.get(oid, []), key=lambda r: r["case_id"]):
            cid = rec["case_id"]
            ref = CaseRef(cid, tuple(run.image_path(cid, c) for c in range(n_ch)), run.label_path(cid))
            try:
                s_channels, s_lesion, s_affine = critic.read_ref(ref, labels, n_ch)
                if s_lesion.shape != lesion.shape:
                    raise InputError(f"grid {s_lesion.shape} differs from its base case {oid}'s {lesion.shape}")
            except (InputError, OSError) as exc:
                notes.append(f"synthetic case {cid} not read: {exc}")
                continue
            comps, labs, centres, vols = _candidates(s_lesion, s_affine, connectivity, min_volume,
                                                     must_touch=s_lesion & ~lesion)
            found["pasted"] += len(labs)
            for key, lab, c, v in zip(_keys(seed, 2, cid, len(labs)), labs, centres, vols):
                if pools["pasted"].wants(key):
                    pools["pasted"].add(key, lesion_patch(s_channels, s_lesion, comps, int(lab), s_affine, c),
                                        {"kind": "pasted", "case_id": cid, "group": oid,
                                         "centre_mm": c.round(2).tolist(), "volume_mm3": round(float(v), 2)})
            del s_channels, s_lesion, comps
        log(f"  read {oid} and {len(by_base.get(oid, []))} synthetic case(s): {found['real_base']} + "
            f"{found['real_other']} real, {found['pasted']} pasted lesions so far")
    out = {k: p.items() for k, p in pools.items()}
    out.update(channels=list(run.channel_names), notes=notes, found=found, data=str(data))
    return out


# --------------------------------------------------------------------------------------------------
# The network and the grouped cross-validation
# --------------------------------------------------------------------------------------------------

def set_deterministic(threads: int = 1) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set in this process
        pass
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_net(in_channels: int, widths=WIDTHS):
    """Conv 3×3×3 + BatchNorm + ReLU blocks, max-pool 2 between them, global average pool, linear → 1 logit."""
    from torch import nn

    layers, c = [], in_channels
    for i, w in enumerate(widths):
        layers += [nn.Conv3d(c, w, 3, padding=1, bias=False), nn.BatchNorm3d(w), nn.ReLU(inplace=True)]
        if i < len(widths) - 1:
            layers.append(nn.MaxPool3d(2))
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(c, 1))


def augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per sample of (B, C, n, n, n): a random flip of each spatial axis, then a random 90° rotation in a
    random plane."""
    out = np.empty_like(batch)
    planes = ((1, 2), (1, 3), (2, 3))
    for i, x in enumerate(batch):
        for axis in (1, 2, 3):
            if rng.random() < 0.5:
                x = np.flip(x, axis)
        x = np.rot90(x, k=int(rng.integers(4)), axes=planes[int(rng.integers(3))])
        out[i] = x
    return out


def train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int = EPOCHS, widths=WIDTHS, batch: int = BATCH,
          lr: float = LR):
    """A net trained on patches `x` (N, C, n, n, n) for labels `y` (bool): Adam, class-balanced loss."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(int(seed))
    rng = np.random.default_rng([int(seed), 11])
    model = make_net(x.shape[1], widths)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    weight = np.where(y, len(y) / (2.0 * n_pos), len(y) / (2.0 * n_neg)).astype(np.float32)
    target = y.astype(np.float32)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            xb = torch.from_numpy(augment(x[idx], rng))
            logits = model(xb)[:, 0]
            loss = (F.binary_cross_entropy_with_logits(logits, torch.from_numpy(target[idx]), reduction="none")
                    * torch.from_numpy(weight[idx])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def predict(model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Mean logit over the 8 flips of the three spatial axes."""
    import torch

    flips = [tuple(a for a, f in zip((2, 3, 4), bits) if f) for bits in np.ndindex(2, 2, 2)]
    out = np.zeros(len(x))
    with torch.no_grad():
        for start in range(0, len(x), batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch]))
            total = torch.zeros(len(xb))
            for axes in flips:
                total += model(torch.flip(xb, axes) if axes else xb)[:, 0]
            out[start:start + batch] = (total / len(flips)).numpy()
    return out


def regions(mask: np.ndarray, rim_mm: float = RIM_MM, step_mm: float = STEP_MM):
    """(inside, rim, context) of each patch's soft lesion mask (N, n, n, n): mask ≥ 0.5, up to `rim_mm`
    outside it, farther."""
    inside = mask >= 0.5
    dist = np.stack([ndimage.distance_transform_edt(~m) * step_mm if m.any() else np.full(m.shape, np.inf)
                     for m in inside])
    rim = ~inside & (dist <= rim_mm)
    return inside, rim, ~inside & ~rim


def occlusions(channel_names, rim_mm: float = RIM_MM) -> dict:
    """{name: a function of patches x → x with that part set to 0}: each intensity channel, the mask channel,
    and in every intensity channel the lesion's inside (mask ≥ 0.5), its rim (0-`rim_mm` outside) and the
    context (farther)."""
    n_int = len(channel_names)

    def channel(c):
        def f(v):
            v = v.copy()
            v[:, c] = 0.0
            return v
        return f

    def region(which):
        def f(v):
            mask = regions(v[:, -1], rim_mm)[which]
            v = v.copy()
            for c in range(n_int):
                v[:, c][mask] = 0.0
            return v
        return f

    out = {f"channel {n}": channel(c) for c, n in enumerate(channel_names)}
    out["mask channel"] = channel(n_int)
    out["inside lesion"] = region(0)
    out[f"rim 0-{rim_mm:g} mm"] = region(1)
    out[f"context > {rim_mm:g} mm"] = region(2)
    return out


def _within(y: np.ndarray, score: np.ndarray, fold_of: np.ndarray) -> float | None:
    """AUC over the pairs (negative, positive) of the same fold only: the fold AUCs weighted by their pairs
    (a fold's own offset of the scores, e.g. an anatomy unlike the training folds, does not count)."""
    from lesionsynth.audit import rank_auc

    total = weight = 0.0
    for f in np.unique(fold_of):
        sel = fold_of == f
        pairs = float(y[sel].sum()) * float((~y[sel]).sum())
        if pairs:
            total += rank_auc(y[sel], score[sel]) * pairs
            weight += pairs
    return total / weight if weight else None


def cross_validate(x: np.ndarray, y, groups, seed: int = 0, epochs: int = EPOCHS, widths=WIDTHS,
                   splits: int = N_SPLITS, channel_names=None, occlude: bool = False, log=None) -> dict:
    """Out-of-fold AUC of the CNN under StratifiedGroupKFold over `groups`, its 95 % interval by bootstrap
    over the groups, the AUC of each fold; `occlude`: the AUC drop of each occlusion (`occlusions`)."""
    from sklearn.model_selection import StratifiedGroupKFold

    from lesionsynth.audit import rank_auc
    from lesionsynth.critic import _cluster_bootstrap

    y = np.asarray(y, dtype=bool)
    groups = np.asarray([str(g) for g in groups])
    out = {"auc": None, "auc_ci95": None, "fold_aucs": [], "n_positive": int(y.sum()), "n_negative": int((~y).sum()),
           "n_groups": len(set(groups)), "reason": None}
    k = min(splits, len(set(groups[y])), len(set(groups[~y])))
    if k < 2:
        out["reason"] = "fewer than 2 groups hold each class: no grouped cross-validation"
        return out
    set_deterministic(1)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(seed))
    oof = np.full(len(y), np.nan)
    parts = occlusions(channel_names or [f"c{i}" for i in range(x.shape[1] - 1)]) if occlude else {}
    occluded = {name: np.full(len(y), np.nan) for name in parts}
    fold_of = np.zeros(len(y), dtype=int)
    for fold, (tr, te) in enumerate(cv.split(np.zeros(len(y)), y.astype(int), groups)):
        t0 = time.perf_counter()
        fold_of[te] = fold
        model = train(x[tr], y[tr], seed=1000 * int(seed) + fold, epochs=epochs, widths=widths)
        oof[te] = predict(model, x[te])
        fold_auc = rank_auc(y[te], oof[te])
        out["fold_aucs"].append(None if not np.isfinite(fold_auc) else float(fold_auc))
        for name, f in parts.items():
            occluded[name][te] = predict(model, f(x[te]))
        if log:
            log(f"  fold {fold + 1}/{k}: {len(tr)} train, {len(te)} test, AUC {fold_auc:.3f} "
                f"({time.perf_counter() - t0:.1f} s)")
    auc = rank_auc(y, oof)
    out.update(auc=float(auc), auc_ci95=_cluster_bootstrap(y, oof, groups, seed), n_splits=int(k),
               within_fold_auc=_within(y, oof, fold_of), scores=oof.round(4).tolist())
    if parts:
        out["occlusion"] = {name: {"auc": float(rank_auc(y, s)), "auc_drop": float(auc - rank_auc(y, s))}
                            for name, s in occluded.items()}
    return out


def real_vs_real(x: np.ndarray, groups, seed: int = 0, splits: int = 1, **kw) -> dict:
    """Honesty check: the real lesions' cases split at random in two halves (pseudo-classes; `splits` seeded
    splits), the same grouped cross-validation; ≈ 0.5 when nothing leaks (below 0.5 when the cases differ a
    lot: a held-out case's kind is then over-represented in the other class of the training folds)."""
    groups = np.asarray([str(g) for g in groups])
    cases = sorted(set(groups))
    out = {"auc": None, "aucs": [], "splits": [], "n_cases": len(cases), "reason": None}
    if len(cases) < 4:
        out["reason"] = f"too few real cases ({len(cases)}; at least 4 needed)"
        return out
    for split in range(splits):
        rng = np.random.default_rng([int(seed), 41, split])
        half = set(np.asarray(cases)[rng.permutation(len(cases))[: len(cases) // 2]].tolist())
        y = np.array([g in half for g in groups])
        result = cross_validate(x, y, groups, seed=int(seed) + split, **kw)
        result.pop("scores", None)
        result["half"] = sorted(half)
        out["splits"].append(result)
        if result["auc"] is not None:
            out["aucs"].append(result["auc"])
        else:
            out["reason"] = result["reason"]
    if out["aucs"]:
        out.update(auc=float(np.mean(out["aucs"])), reason=None)
    return out


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def _auc_text(r: dict) -> str:
    if r.get("auc") is None:
        return f"not computed ({r.get('reason')})"
    ci = r.get("auc_ci95")
    return f"{r['auc']:.3f}" + (f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else " [no interval]")


def _stack(items) -> np.ndarray:
    return np.stack([p for _, p, _ in items]) if items else np.zeros((0,))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder of lesionsynth generate")
    parser.add_argument("--data", type=Path, default=None,
                        help="the dataset of the real cases (default: the one the bank's bank.json records)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--seed", type=int, default=0, help="lesion draw, folds, network initialisation")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--max-lesions", type=int, default=MAX_LESIONS, help="lesions per kind")
    parser.add_argument("--real-splits", type=int, default=1,
                        help="random halvings of the real cases in the real-vs-real check (each a cross-validation)")
    parser.add_argument("--real", choices=("bases", "all"), default="bases",
                        help="real lesions from the base cases only (default) or from every original case")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    set_deterministic(1)
    print(f"reading {args.out} ...")
    got = collect_lesions(args.out, args.data, args.max_lesions, args.seed)
    names = got["channels"]
    real_all = sorted(got["real_base"] + got["real_other"], key=lambda t: t[0])[: args.max_lesions]
    real = got["real_base"] if args.real == "bases" else real_all
    pasted = got["pasted"]
    t_read = time.perf_counter() - t0
    print(f"lesions: {len(real)} real ({args.real}; {got['found']['real_base']} in base cases, "
          f"{got['found']['real_other']} in other originals), {len(pasted)} pasted "
          f"(of {got['found']['pasted']}); patches {PATCH_MM:g} mm at {STEP_MM:g} mm; read in {t_read:.1f} s")
    result = {"out": str(args.out), "data": got["data"], "seed": args.seed, "epochs": args.epochs,
              "real_from": args.real, "patch_mm": PATCH_MM, "step_mm": STEP_MM, "widths": list(WIDTHS),
              "channels": names, "n_real": len(real), "n_pasted": len(pasted), "found": got["found"],
              "notes": got["notes"]}
    if real and pasted:
        x = np.concatenate([_stack(real), _stack(pasted)])
        y = np.r_[np.zeros(len(real), bool), np.ones(len(pasted), bool)]
        groups = [m["group"] for _, _, m in real] + [m["group"] for _, _, m in pasted]
        print("pasted vs real:")
        res = cross_validate(x, y, groups, seed=args.seed, epochs=args.epochs, channel_names=names, occlude=True,
                             log=print)
        res["lesions"] = [m for _, _, m in real] + [m for _, _, m in pasted]
        result["pasted_vs_real"] = res
    else:
        result["pasted_vs_real"] = {"auc": None, "reason": "no real or no pasted lesions"}
    if real_all:
        print("real vs real (original cases in two random halves):")
        result["real_vs_real"] = real_vs_real(_stack(real_all), [m["group"] for _, _, m in real_all],
                                              seed=args.seed, splits=args.real_splits, epochs=args.epochs, log=print)
    seconds = time.perf_counter() - t0
    result["seconds"] = round(seconds, 1)

    p, rvr = result["pasted_vs_real"], result.get("real_vs_real", {"auc": None, "reason": "no real lesions"})
    print(f"\nn real {len(real)}, n pasted {len(pasted)}")
    print(f"pasted vs real AUC   {_auc_text(p)}   folds: "
          + ", ".join("-" if a is None else f"{a:.2f}" for a in p.get("fold_aucs", [])))
    if p.get("within_fold_auc") is not None:
        print(f"  within-fold AUC      {p['within_fold_auc']:.3f} (pairs of the same fold only)")
    for name, o in (p.get("occlusion") or {}).items():
        print(f"  without {name:22s} AUC {o['auc']:.3f} (drop {o['auc_drop']:+.3f})")
    if rvr.get("auc") is None:
        print(f"real vs real AUC     not computed ({rvr.get('reason')})")
    else:
        print(f"real vs real AUC     {rvr['auc']:.3f} (mean of {len(rvr['aucs'])} split(s) of "
              f"{rvr['n_cases']} cases)")
        for i, r in enumerate(rvr["splits"]):
            print(f"  split {i + 1}: {_auc_text(r)}   folds: "
                  + ", ".join("-" if a is None else f"{a:.2f}" for a in r.get("fold_aucs", [])))
    for note in got["notes"]:
        print(f"note: {note}")
    print(f"seconds: {seconds:.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
