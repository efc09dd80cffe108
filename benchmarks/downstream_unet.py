"""Downstream check: does training a small 3D U-Net with lesionsynth output help (a load-shift design)?

    python benchmarks/downstream_unet.py [--dataset DIR] [--train-n 4] [--test-n 8] [--n-gen 16]
                                         [--iters N] [--seeds 0 1 2 3] [--recipe ms_flair]
                                         [--bank-args='--space register'] [--generate-args='--volume-warp']
                                         [--load-range 2000 9000] [--arms real real+carvemix real+gen]
                                         [--jobs 2] [--work DIR] [--keep] [--json FILE] [--smoke]
                                         [--save-predictions DIR]

Design. `--dataset` is an nnU-Net v2 raw dataset (`imagesTr/{case}_{XXXX}.nii.gz`, `labelsTr/{case}.nii.gz`,
`dataset.json` with `channel_names`); its cases may have different grids, orientations and spacings
(default: `$LESIONSYNTH_DATA/heldout/native_brains`, i.e. `.cache/data/heldout/native_brains`). Cases are
ranked by lesion load (lesion voxels × voxel volume, mm³, ties by case id): the `--train-n` lightest are
the real training set, the next `--test-n` (heavier loads) are the held-out test set. Three arms (`--arms`):

(a) real:      train on the `--train-n` real cases;
(b) real+gen:  build one lesionsynth bank from ONLY those training cases (a temporary nnU-Net folder of
               symlinks; `lesionsynth build-bank TMP --out BANK --recipe R` + `--bank-args`), then per seed
               `lesionsynth generate BANK --out GEN --n N_GEN --load uniform --load-range LO HI
               --mode populate --seed S --jobs J --no-include-originals` + `--generate-args`, and train on
               the real cases + the generated ones (a patch's case is drawn uniformly over all of them);
(c) real+carvemix: the real cases + `--n-gen` CarveMix cases made from them (below): the published
               augmentation of the same kind (new labelled cases mixed from the same training cases),
               added to the pool exactly as (b)'s cases are.

CarveMix (Zhang, Liu, Ou, Zeng, Xiong, Yu, Liu, Ye: "CarveMix: A Simple Data Augmentation Method for Brain
Lesion Segmentation", MICCAI 2021, LNCS 12901, doi:10.1007/978-3-030-87193-2_19, arXiv:2108.06883), written
from the paper's method in `carvemix()`, not from the authors' code. Per mixed case: a donor A (uniform over
the training cases that have a lesion) and a target B (uniform over the other training cases); D = signed
distance (mm) to the surface of A's lesion mask, negative inside; lambda ~ U(lambda_l, lambda_u) with
lambda_l = -|min D| / 2 and lambda_u = |min D| (|min D| = depth of A's deepest lesion voxel), the paper's
rule (the authors' public code draws the same single uniform: a grown ROI with probability 2/3, a shrunk one
with 1/3); the carved ROI M = {D <= lambda} (lambda >= 0: all of A's lesions plus a margin of up to lambda
mm; lambda < 0: their cores only); new image = A inside M, B elsewhere; new label = A's label inside M, B's
label elsewhere. `--n-gen` mixed cases per seed (the same count as (b)), drawn with
np.random.default_rng([CARVEMIX_STREAM, seed]); same network, iterations, seeds and patch sampling as the
other arms. Where this differs from the paper:
  - no registration: the paper mixes two images voxel by voxel on a common grid (its ATLAS data are
    registered to MNI152); here the cases are on native grids with random head poses, so the mix is made in
    this benchmark's preprocessed space (canonical RAS, 2 mm, z-scored per channel, cropped to the
    foreground), A's cropped volume centred in B's (crop centres = foreground bounding-box centres; cropped,
    or padded with the channel minimum). A's lesion can therefore land in another tissue than it came from,
    or off B's brain, and the ROI boundary is a seam between two heads; z-scoring removes the gain
    difference and nothing else (the paper's extended journal version harmonises heterogeneous data; not
    done here);
  - D is computed at 2 mm (the paper: on the native grid; the authors' code also uses the voxel spacing),
    with its zero level on the voxel faces (every lesion voxel <= -1 mm, every other voxel >= +1 mm), where
    the authors' code measures from the boundary voxels (0 on both boundary layers). lambda's range scales
    with the deepest lesion, so a donor with only small MS lesions (1-2 voxels thick at 2 mm) is carved
    nearly as its mask;
  - offline, a fixed count per seed, not mixes drawn anew during training; A != B whenever there are two or
    more training cases.

Preprocessing (cached as .npy under `--work`/cache, keyed by file path, size and mtime): each case is
reoriented with nibabel `as_closest_canonical` (its own canonical RAS voxel order; no registration) and
resampled to 2 mm isotropic with scipy (images: linear; lesion mask: linear interpolation of the binary
mask, ≥ 0.5), each channel z-scored on its foreground, and the volume cropped to the bounding box of the
foreground (union over channels, binary opening, + 4 voxels) for training and inference. Foreground =
voxels above p2 + 0.1 (p99 - p2) of the channel (p = percentile): a plain low percentile is no threshold
at all on images with a noisy, non-zero background (the MNI-based sample data: p2 lies inside the noise).

Model: a 3-level 3D U-Net in plain torch (16-32-64 channels, two 3×3×3 conv + InstanceNorm + LeakyReLU per
level, strided-conv down, transposed-conv up), trained from scratch on random 32³ patches at 2 mm
(`--patch`; batch 2, half of the patches centred on a random lesion voxel, the others on a random voxel;
random flips along each axis), loss = soft Dice (batch) + cross-entropy with the lesion class weighted
100 (`--ce-weight`), Adam (lr 3e-3, poly decay). All arms run the SAME number of iterations (`--iters`,
default 800) from the SAME initial weights (seeded); `torch.set_num_threads(2)`. A seed sets torch,
numpy, the patch sampling and the generate seed. Why 32³ and the weighted CE: MS lesions at 2 mm are
1-40 voxels each (~1e-4 of a 48³ patch); with plain CE + Dice the network sits at "all background" for
the first several hundred iterations (48³, 200 iterations: every prediction empty), 32³ + CE weight 100
reaches a training-patch Dice ~0.5 after ~250 iterations, at ~1/3 of the cost per iteration.

Evaluation on the held-out cases: sliding-window inference (patch-sized windows, step 3/4 patch, softmax averaged),
argmax, pasted into the whole 2 mm grid. Metrics are computed AT 2 MM against the 2 mm-resampled truth
(predictions are not resampled back to the native grid; this is the same for all arms, so the comparison
is fair, but the absolute numbers are not native-resolution numbers). Per case: Dice, and lesion-wise
detection with connected components (26-connectivity): a predicted component is a true positive if it
overlaps a truth component; precision = TP predicted components / predicted components (undefined when
nothing is predicted), recall = truth components overlapped by the prediction / truth components.
Per arm and seed: median Dice over the held-out cases, mean lesion-wise precision and recall (over the
cases where they are defined), pooled lesion-wise precision and recall (over every lesion of the held-out
cases together: each predicted or truth component counts once, whatever case holds it), and the
false-positive components (predicted components touching no truth lesion: how many, how many of 1-2
voxels; per case their sizes in `false_positive_sizes`). With few truth
lesions per case one such component moves the mean precision by up to 1 / (cases x predicted lesions of
that case): the count says what a precision gap is made of. Per arm: the median over seeds; per metric, the
number of seeds where each augmented arm beats real, and where real+gen beats real+carvemix (JSON
`comparisons`, `wins` = real+gen against real as before). A run whose predictions are all zero on every held-out case is reported as
"collapsed" (Dice 0), a run whose loss became NaN as "diverged"; a failing bank/generate step marks arm
(b) failed, a failing CarveMix step arm (c), without crashing.

`--smoke`: 1 seed, n-gen 2, 4 iterations, test-n 2, no window overlap — checks the plumbing only.
Timings (preprocess / bank / generate / carvemix / train / eval) are printed and stored in `--json`.

Full experiment (the lead's runs):
    python benchmarks/downstream_unet.py --json downstream.json
    python benchmarks/downstream_unet.py --bank-args='--space register' --json downstream_register.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
SPACING = 2.0
PATCH = 32  # patch edge in voxels at 2 mm; --patch sets it (module-wide) before anything runs
CACHE_VERSION = "v2"
ARMS = ("real", "real+carvemix", "real+gen")
FG_FRACTION = 0.1  # foreground: above the 2nd percentile + 10 % of the 2nd-99th percentile range
STRUCT26 = np.ones((3, 3, 3), bool)
#: Per-run metrics summarised over seeds and compared between arms.
METRICS = ("median_dice", "mean_precision", "mean_recall", "pooled_precision", "pooled_recall")


def data_root() -> Path:
    return Path(os.environ.get("LESIONSYNTH_DATA", REPO / ".cache" / "data"))


# ----------------------------------------------------------------------------------------------- dataset

def read_nnunet(root: Path) -> tuple[dict, list[dict]]:
    """Cases of an nnU-Net v2 raw folder: [{'case', 'images': [paths per channel], 'label': path}]."""
    meta = json.loads((root / "dataset.json").read_text())
    if "channel_names" not in meta:
        raise SystemExit(f"{root}/dataset.json: no channel_names (an nnU-Net v2 raw dataset is required)")
    ending = meta.get("file_ending", ".nii.gz")
    n_ch = len(meta["channel_names"])
    cases = []
    for lab in sorted((root / "labelsTr").glob(f"*{ending}")):
        case = lab.name[: -len(ending)]
        images = [root / "imagesTr" / f"{case}_{c:04d}{ending}" for c in range(n_ch)]
        missing = [str(p) for p in images if not p.exists()]
        if missing:
            raise SystemExit(f"{root}: case {case} lacks {missing[0]}")
        cases.append({"case": case, "images": images, "label": lab})
    if not cases:
        raise SystemExit(f"{root}/labelsTr: no *{ending} labels")
    return meta, cases


def lesion_load_mm3(label_path: Path, lesion_labels: tuple[int, ...]) -> float:
    img = nib.load(str(label_path))
    data = np.asarray(img.dataobj)
    return float(np.isin(data, lesion_labels).sum() * abs(np.linalg.det(img.affine[:3, :3])))


def make_subset(root: Path, meta: dict, cases: list[dict], out: Path) -> Path:
    """A temporary nnU-Net folder holding only `cases` (symlinks to the original files)."""
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir(parents=True)
    for c in cases:
        for p in c["images"]:
            os.symlink(p.resolve(), out / "imagesTr" / p.name)
        os.symlink(c["label"].resolve(), out / "labelsTr" / c["label"].name)
    sub = {k: v for k, v in meta.items() if k != "training"}
    sub["numTraining"] = len(cases)
    sub["name"] = f"{meta.get('name', root.name)}_train{len(cases)}"
    (out / "dataset.json").write_text(json.dumps(sub, indent=2))
    return out


# ----------------------------------------------------------------------------------------- preprocessing

def _resample(data: np.ndarray, zooms: np.ndarray, order: int) -> np.ndarray:
    """Resample a canonical volume to SPACING mm isotropic over the same field of view (voxel centres)."""
    shape = np.array(data.shape[:3])
    out_shape = np.maximum(1, np.round(shape * zooms / SPACING)).astype(int)
    step = SPACING / zooms
    offset = 0.5 * step - 0.5
    return ndimage.affine_transform(data, step, offset=offset, output_shape=tuple(out_shape), order=order,
                                    mode="nearest", prefilter=False)


def _cache_key(images: list[Path], label: Path, lesion_labels) -> str:
    h = hashlib.sha1(CACHE_VERSION.encode())
    for p in [*images, label]:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(repr(tuple(lesion_labels)).encode())
    return h.hexdigest()[:16]


def preprocess_case(case: dict, cache: Path, lesion_labels: tuple[int, ...]) -> dict:
    """Canonical RAS, 2 mm, per-channel foreground z-score, crop to foreground; cached as .npy."""
    key = _cache_key(case["images"], case["label"], lesion_labels)
    stem = cache / f"{case['case']}_{key}"
    meta_path = Path(f"{stem}_meta.json")
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    lab_img = nib.as_closest_canonical(nib.load(str(case["label"])))
    zooms = np.array(lab_img.header.get_zooms()[:3], float)
    lesion = np.isin(np.asarray(lab_img.dataobj), lesion_labels).astype(np.float32)
    lab = (_resample(lesion, zooms, 1) >= 0.5).astype(np.uint8)
    chans, fg = [], np.zeros(lab.shape, bool)
    for p in case["images"]:
        img = nib.as_closest_canonical(nib.load(str(p)))
        if img.shape[:3] != lab_img.shape[:3] or not np.allclose(img.affine, lab_img.affine, atol=1e-3):
            raise ValueError(f"{p}: grid differs from its label {case['label']}")
        x = _resample(np.asarray(img.get_fdata(dtype=np.float32)), zooms, 1).astype(np.float32)
        x[~np.isfinite(x)] = 0
        lo, hi = np.percentile(x, [2, 99])
        m = x > lo + FG_FRACTION * (hi - lo)
        if m.sum() < 0.01 * m.size:
            m = np.ones_like(m)
        mu, sd = float(x[m].mean()), float(x[m].std()) or 1.0
        chans.append((x - mu) / sd)
        fg |= m
    img = np.stack(chans).astype(np.float32)
    body = ndimage.binary_opening(fg, iterations=2)
    idx = np.argwhere((body if body.any() else fg) | (lab > 0))
    lo = np.maximum(idx.min(0) - 4, 0)
    hi = np.minimum(idx.max(0) + 5, lab.shape)
    bbox = [[int(a), int(b)] for a, b in zip(lo, hi)]
    sl = tuple(slice(a, b) for a, b in bbox)
    np.save(f"{stem}_img.npy", np.ascontiguousarray(img[(slice(None),) + sl]))
    np.save(f"{stem}_lab.npy", lab)  # whole 2 mm grid (the evaluation truth)
    info = {"case": case["case"], "stem": str(stem), "shape": list(lab.shape), "bbox": bbox,
            "native_shape": list(lab_img.shape[:3]), "native_zooms": zooms.tolist(),
            "orientation": "".join(nib.aff2axcodes(nib.load(str(case["label"])).affine)),
            "lesion_voxels_2mm": int(lab.sum())}
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.rename(meta_path)
    return info


def preprocess_all(cases: list[dict], cache: Path, lesion_labels, jobs: int) -> list[dict]:
    cache.mkdir(parents=True, exist_ok=True)
    if jobs <= 1 or len(cases) == 1:
        return [preprocess_case(c, cache, lesion_labels) for c in cases]
    with ProcessPoolExecutor(min(jobs, len(cases))) as ex:
        return list(ex.map(preprocess_case, cases, [cache] * len(cases), [lesion_labels] * len(cases)))


def load_cropped(info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (C, X, Y, Z), label, whole-grid label) of a preprocessed case, cropped to its bounding box."""
    img = np.load(f"{info['stem']}_img.npy")
    lab_full = np.load(f"{info['stem']}_lab.npy")
    sl = tuple(slice(a, b) for a, b in info["bbox"])
    return img, np.ascontiguousarray(lab_full[sl]), lab_full


def pad_to_patch(img: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Pad to at least one patch (image: each channel's minimum, label: 0); the low-side offsets are returned."""
    pad = [max(0, PATCH - s) for s in lab.shape]
    if any(pad):
        widths = [(p // 2, p - p // 2) for p in pad]
        img = np.stack([np.pad(ch, widths, constant_values=float(ch.min())) for ch in img])
        lab = np.pad(lab, widths)
    return img, lab, [p // 2 for p in pad]


def load_arrays(info: dict) -> dict:
    img, lab, lab_full = load_cropped(info)
    img, lab, pad = pad_to_patch(img, lab)  # the offset is kept for pasting back
    return {"case": info["case"], "img": img, "lab": lab, "lab_full": lab_full, "bbox": info["bbox"],
            "pad": pad, "fg_idx": np.argwhere(lab > 0)}


# ---------------------------------------------------------------------------------------------- CarveMix

CARVEMIX_STREAM = 0xCA4E  # the CarveMix draws of a seed: np.random.default_rng([CARVEMIX_STREAM, seed])


def centre_in(arr: np.ndarray, shape, fill: float = 0) -> np.ndarray:
    """`arr` (..., X, Y, Z) centred in a grid of spatial `shape`: cropped where larger, padded with `fill`."""
    out = np.full(arr.shape[:-3] + tuple(shape), fill, dtype=arr.dtype)
    src, dst = [], []
    for n, m in zip(arr.shape[-3:], shape):
        off = (m - n) // 2  # where arr's first voxel lands in out (negative: arr is cropped)
        s0, d0 = max(0, -off), max(0, off)
        size = min(n - s0, m - d0)
        src.append(slice(s0, s0 + size))
        dst.append(slice(d0, d0 + size))
    out[(Ellipsis, *dst)] = arr[(Ellipsis, *src)]
    return out


def signed_distance(mask: np.ndarray, spacing) -> np.ndarray:
    """Signed distance (mm) to the surface of `mask`: negative inside, positive outside.

    Euclidean distance between voxel centres to the nearest voxel of the other side, less half a voxel
    (the smallest spacing), so that the zero level lies on the faces between lesion and background voxels:
    a lesion voxel is at most -s/2, a background voxel at least +s/2, for every mask.
    """
    mask = np.asarray(mask, bool)
    sp = np.broadcast_to(np.asarray(spacing, float), (3,))
    half = 0.5 * float(sp.min())
    if not mask.any():
        return np.full(mask.shape, np.inf)
    if mask.all():
        return np.full(mask.shape, -np.inf)
    inside = ndimage.distance_transform_edt(mask, sampling=sp)
    outside = ndimage.distance_transform_edt(~mask, sampling=sp)
    return np.where(mask, half - inside, outside - half)


def carvemix(image_a: np.ndarray, label_a: np.ndarray, image_b: np.ndarray, label_b: np.ndarray,
             rng: np.random.Generator, spacing=SPACING) -> tuple[np.ndarray, np.ndarray, np.ndarray, float | None]:
    """One CarveMix sample (Zhang et al., MICCAI 2021): A's lesion region carved and pasted into B.

    image_*: (C, X, Y, Z) or (X, Y, Z); label_*: (X, Y, Z) integer labels (> 0 = lesion); spacing: mm
    (scalar or per axis). If A's grid differs from B's, A is centred in B's grid first (cropped or padded:
    image with each channel's minimum, label 0). D = signed_distance(A's lesion mask) (mm, negative inside),
    lambda ~ U(-|min D| / 2, |min D|) (the paper's lambda_l = -|min D|/2, lambda_u = |min D|), carved
    region M = {D <= lambda}; the new image is A inside M and B elsewhere, the new label is A's label inside
    M and B's label elsewhere. lambda >= 0 grows the lesion (M contains all of it plus a margin up to
    lambda), lambda < 0 shrinks it (only A's lesion voxels deeper than |lambda| are carved; its outer shell
    keeps B's image and label). Returns (image, label, M, lambda); with no lesion in A: B unchanged, M empty,
    lambda None. Pure: the inputs are not modified, the only randomness is one draw from `rng`.
    """
    image_a, image_b = np.asarray(image_a), np.asarray(image_b)
    label_a, label_b = np.asarray(label_a), np.asarray(label_b)
    channels = image_b.ndim == 4
    if (image_a.ndim == 4) != channels or image_b.shape[-3:] != label_b.shape or image_a.shape[-3:] != label_a.shape:
        raise ValueError("carvemix: image and label grids (or channel layouts) differ")
    shape = label_b.shape
    if label_a.shape != shape:
        ia = image_a if channels else image_a[None]
        ia = np.stack([centre_in(ch, shape, float(ch.min())) for ch in ia])
        image_a = ia if channels else ia[0]
        label_a = centre_in(label_a, shape, 0)
    lesion = label_a > 0
    if not lesion.any():
        return image_b.copy(), label_b.copy(), np.zeros(shape, bool), None
    d = signed_distance(lesion, spacing)
    depth = float(abs(d.min()))
    lam = float(rng.uniform(-depth / 2, depth))
    m = d <= lam
    image = np.where(m, image_a, image_b).astype(image_b.dtype, copy=False)
    label = np.where(m, label_a, label_b).astype(label_b.dtype, copy=False)
    return image, label, m, lam


def carvemix_pool(train_infos: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`n` CarveMix cases (training pool entries) from pairs of the real training cases, and their summary.

    Donor A: uniform over the training cases with a lesion (all, if none has one); target B: uniform over
    the other training cases (A itself if there is only one). Both are the preprocessed, cropped arrays.
    """
    rng = np.random.default_rng([CARVEMIX_STREAM, seed])
    arrays = [load_cropped(i)[:2] for i in train_infos]
    donors = [k for k, (_, lab) in enumerate(arrays) if lab.any()] or list(range(len(arrays)))
    pool, made = [], []
    for j in range(n):
        a = donors[int(rng.integers(len(donors)))]
        others = [k for k in range(len(arrays)) if k != a] or [a]
        b = others[int(rng.integers(len(others)))]
        img, lab, m, lam = carvemix(arrays[a][0], arrays[a][1], arrays[b][0], arrays[b][1], rng, SPACING)
        img, lab, pad = pad_to_patch(img, lab)
        name = f"carvemix_{j:03d}"
        pool.append({"case": name, "img": img, "lab": lab, "fg_idx": np.argwhere(lab > 0)})
        made.append({"case": name, "donor": train_infos[a]["case"], "target": train_infos[b]["case"],
                     "lambda_mm": lam, "carved_voxels": int(m.sum()), "lesion_voxels": int((lab > 0).sum()),
                     "target_lesion_voxels": int((arrays[b][1] > 0).sum())})
    return pool, made


# ------------------------------------------------------------------------------------------------- model

def build_unet(in_ch: int, feats=(16, 32, 64)):
    import torch.nn as nn

    def block(i, o, stride=1):
        return nn.Sequential(nn.Conv3d(i, o, 3, stride, 1), nn.InstanceNorm3d(o, affine=True),
                             nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(o, o, 3, 1, 1),
                             nn.InstanceNorm3d(o, affine=True), nn.LeakyReLU(0.01, inplace=True))

    class UNet3D(nn.Module):
        def __init__(self):
            super().__init__()
            f1, f2, f3 = feats
            self.enc1, self.enc2, self.bott = block(in_ch, f1), block(f1, f2, 2), block(f2, f3, 2)
            self.up2, self.dec2 = nn.ConvTranspose3d(f3, f2, 2, 2), block(2 * f2, f2)
            self.up1, self.dec1 = nn.ConvTranspose3d(f2, f1, 2, 2), block(2 * f1, f1)
            self.head = nn.Conv3d(f1, 2, 1)

        def forward(self, x):
            import torch
            a = self.enc1(x)
            b = self.enc2(a)
            c = self.bott(b)
            d = self.dec2(torch.cat([self.up2(c), b], 1))
            return self.head(self.dec1(torch.cat([self.up1(d), a], 1)))

    return UNet3D()


def sample_batch(pool: list[dict], rng: np.random.Generator, batch: int, fg_frac: float, flip: bool):
    xs, ys = [], []
    for _ in range(batch):
        d = pool[int(rng.integers(len(pool)))]
        shape = np.array(d["lab"].shape)
        if rng.random() < fg_frac and len(d["fg_idx"]):
            centre = d["fg_idx"][int(rng.integers(len(d["fg_idx"])))]
        else:
            centre = np.array([int(rng.integers(s)) for s in shape])
        start = np.clip(centre - PATCH // 2, 0, shape - PATCH)
        sl = tuple(slice(int(s), int(s) + PATCH) for s in start)
        x, y = d["img"][(slice(None),) + sl], d["lab"][sl]
        if flip:
            for ax in range(3):
                if rng.random() < 0.5:
                    x, y = np.flip(x, ax + 1), np.flip(y, ax)
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return np.stack(xs), np.stack(ys).astype(np.int64)


def train(pool: list[dict], iters: int, seed: int, in_ch: int, lr: float, batch: int, ce_weight: float,
          log_every: int) -> tuple:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = build_unet(in_ch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    weight = torch.tensor([1.0, ce_weight])
    losses, diverged = [], False
    t0 = time.perf_counter()
    model.train()
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = lr * (1 - it / iters) ** 0.9
        x, y = sample_batch(pool, rng, batch, 0.5, True)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        logits = model(x)
        ce = F.cross_entropy(logits, y, weight=weight)
        p = torch.softmax(logits, 1)[:, 1]
        t = (y == 1).float()
        dice = (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)
        loss = ce + (1 - dice)
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (it + 1) % log_every == 0:
            print(f"      iter {it + 1}/{iters} loss {np.mean(losses[-log_every:]):.3f} "
                  f"({(time.perf_counter() - t0) / (it + 1):.2f} s/iter)", flush=True)
    return model, losses, diverged


def _starts(n: int, step: int) -> list[int]:
    if n <= PATCH:
        return [0]
    s = list(range(0, n - PATCH, step)) + [n - PATCH]
    return sorted(set(s))


def predict(model, d: dict, step: int) -> np.ndarray:
    """Sliding-window softmax average over the cropped volume, argmax pasted into the whole 2 mm grid."""
    import torch

    model.eval()
    img = d["img"]
    shape = img.shape[1:]
    prob = np.zeros(shape, np.float32)
    count = np.zeros(shape, np.float32)
    windows = [(slice(i, i + PATCH), slice(j, j + PATCH), slice(k, k + PATCH))
               for i in _starts(shape[0], step) for j in _starts(shape[1], step) for k in _starts(shape[2], step)]
    with torch.no_grad():
        for b in range(0, len(windows), 8):  # 8 windows per forward pass
            group = windows[b:b + 8]
            x = torch.from_numpy(np.stack([img[(slice(None),) + sl] for sl in group]))
            out = torch.softmax(model(x), 1)[:, 1].numpy()
            for sl, o in zip(group, out):
                prob[sl] += o if np.all(np.isfinite(o)) else 0.0
                count[sl] += 1
    seg = (prob / np.maximum(count, 1)) > 0.5
    # undo the padding to a patch, then paste into the full grid
    (a0, b0), (a1, b1), (a2, b2) = d["bbox"]
    crop = (b0 - a0, b1 - a1, b2 - a2)
    p = d["pad"]
    seg = seg[p[0]:p[0] + crop[0], p[1]:p[1] + crop[1], p[2]:p[2] + crop[2]]
    full = np.zeros(d["lab_full"].shape, np.uint8)
    full[a0:b0, a1:b1, a2:b2] = seg
    return full


def case_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    pred, truth = pred > 0, truth > 0
    inter, total = int((pred & truth).sum()), int(pred.sum() + truth.sum())
    dice = 2 * inter / total if total else 1.0
    pl, n_pred = ndimage.label(pred, STRUCT26)
    tl, n_true = ndimage.label(truth, STRUCT26)
    hits = np.setdiff1d(np.unique(pl[truth]), [0])
    det_true = len(np.setdiff1d(np.unique(tl[pred]), [0]))
    sizes = np.bincount(pl.ravel(), minlength=n_pred + 1)
    missed = np.setdiff1d(np.arange(1, n_pred + 1), hits)
    return {"dice": dice, "precision": len(hits) / n_pred if n_pred else None,
            "recall": det_true / n_true if n_true else None, "pred_components": int(n_pred),
            "truth_components": int(n_true), "truth_detected": int(det_true), "pred_voxels": int(pred.sum()),
            "truth_voxels": int(truth.sum()),
            "false_positive_sizes": sorted(int(v) for v in sizes[missed])}  # voxels (2 mm) of each


def pooled_detection(per_case: list[dict]) -> dict:
    """Lesion-wise precision and recall over every lesion of the test cases together (each predicted and each
    truth component counts once, whichever case holds it); None where nothing is predicted / there is no
    lesion. The mean over cases weighs a component of a case with few lesions more."""
    n_pred = sum(c["pred_components"] for c in per_case)
    false_pos = sum(len(c["false_positive_sizes"]) for c in per_case)
    n_true = sum(c["truth_components"] for c in per_case)
    detected = sum(c["truth_detected"] for c in per_case)
    return {"pooled_precision": (n_pred - false_pos) / n_pred if n_pred else None,
            "pooled_recall": detected / n_true if n_true else None}


def _mean(values):
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _median(values):
    v = [x for x in values if x is not None]
    return float(statistics.median(v)) if v else None


def run_arm(arm: str, seed: int, train_infos: list[dict], test_data: list[dict], args, in_ch: int,
            extra_pool: list[dict] | None = None) -> dict:
    """Train on the preprocessed `train_infos` + `extra_pool` (ready pool entries, e.g. CarveMix cases)."""
    extra_pool = extra_pool or []
    rec = {"arm": arm, "seed": seed, "n_train_cases": len(train_infos) + len(extra_pool), "status": "ok"}
    try:
        pool = [load_arrays(i) for i in train_infos] + extra_pool
        t0 = time.perf_counter()
        model, losses, diverged = train(pool, args.iters, seed, in_ch, args.lr, args.batch, args.ce_weight,
                                        max(1, args.iters // 4) if args.verbose else 0)
        rec["train_s"] = time.perf_counter() - t0
        rec["final_loss"] = float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else None
        rec["iters_done"] = len(losses)
        del pool
        t0 = time.perf_counter()
        per_case = []
        for d in test_data:
            pred = predict(model, d, args.step)
            if args.save_predictions:
                args.save_predictions.mkdir(parents=True, exist_ok=True)
                np.save(args.save_predictions / f"{arm}_s{seed}_{d['case']}.npy", (pred > 0).astype(np.uint8))
            m = case_metrics(pred, d["lab_full"])
            m["case"] = d["case"]
            per_case.append(m)
        rec["eval_s"] = time.perf_counter() - t0
        rec["cases"] = per_case
        rec["median_dice"] = _median([c["dice"] for c in per_case])
        rec["mean_precision"] = _mean([c["precision"] for c in per_case])
        rec["mean_recall"] = _mean([c["recall"] for c in per_case])
        rec.update(pooled_detection(per_case))
        rec["empty_predictions"] = sum(c["pred_voxels"] == 0 for c in per_case)
        false_positives = [v for c in per_case for v in c["false_positive_sizes"]]
        rec["false_positives"] = len(false_positives)
        rec["false_positives_1_2_voxels"] = sum(v <= 2 for v in false_positives)
        if diverged:
            rec["status"] = "diverged"
        elif per_case and rec["empty_predictions"] == len(per_case):
            rec["status"] = "collapsed"
    except Exception as exc:  # report, do not crash the experiment
        rec["status"] = "failed"
        rec["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    return rec


# --------------------------------------------------------------------------------------------- lesionsynth

def lesionsynth_cmd() -> list[str]:
    if os.environ.get("LESIONSYNTH_CLI"):  # another build of the command, e.g. to compare two versions
        return shlex.split(os.environ["LESIONSYNTH_CLI"])
    exe = Path(sys.executable).parent / "lesionsynth"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lesionsynth.cli"]


def run_cli(argv: list[str], log: Path) -> None:
    cmd = lesionsynth_cmd() + argv
    print("    $ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"lesionsynth {argv[0]} failed (exit {proc.returncode}): " + " | ".join(tail))


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def build_bank(work: Path, root: Path, meta: dict, train_cases: list[dict], args) -> Path:
    cfg = {"cases": [c["case"] for c in train_cases], "root": str(root.resolve()), "recipe": args.recipe,
           "files": [_cache_key(c["images"], c["label"], ()) for c in train_cases],  # rebuilt if a file changes
           "bank_args": args.bank_args, "lesion_labels": args.lesion_label}
    bank = work / f"bank_{_hash(cfg)}"
    if (bank / "bank.json").exists():
        print(f"    bank reused: {bank}")
        return bank
    tmp = work / f"train_subset_{_hash(cfg)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    make_subset(root, meta, train_cases, tmp)
    argv = ["build-bank", str(tmp), "--out", str(bank), "--recipe", args.recipe, "--jobs", str(args.jobs)]
    if tuple(args.lesion_label) != (1,):
        for v in args.lesion_label:
            argv += ["--lesion-label", str(v)]
    run_cli(argv + shlex.split(args.bank_args), work / "lesionsynth.log")
    return bank


def generate(work: Path, bank: Path, seed: int, args) -> tuple[Path, dict]:
    cfg = {"bank": str(bank), "n": args.n_gen, "range": args.load_range, "seed": seed,
           "generate_args": args.generate_args}
    out = work / f"gen_s{seed}_{_hash(cfg)}"
    if not (out / "dataset.json").exists():
        if out.exists():
            shutil.rmtree(out)
        argv = ["generate", str(bank), "--out", str(out), "--n", str(args.n_gen), "--load", "uniform",
                "--load-range", str(args.load_range[0]), str(args.load_range[1]), "--mode", "populate",
                "--seed", str(seed), "--jobs", str(args.jobs), "--no-include-originals"]
        run_cli(argv + shlex.split(args.generate_args), work / "lesionsynth.log")
    loads, reached, unchanged = [], 0, 0
    man = out / "manifest.jsonl"
    if man.exists():
        for line in man.read_text().splitlines():
            if line.strip():
                m = json.loads(line)
                if m.get("achieved_load_mm3") is not None:
                    loads.append(m["achieved_load_mm3"])
                reached += bool(m.get("reached"))
                unchanged += m.get("achieved_load_mm3") == m.get("initial_load_mm3")
    summary = {"n": len(loads), "reached": reached, "unchanged_load": unchanged,
               "load_min": min(loads) if loads else None,
               "load_median": statistics.median(loads) if loads else None, "load_max": max(loads) if loads else None}
    return out, summary


# ----------------------------------------------------------------------------------------------- driver

def fmt(x, nd=3):
    return "  -  " if x is None else f"{x:.{nd}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=None,
                    help="nnU-Net v2 raw dataset [default: $LESIONSYNTH_DATA/heldout/native_brains]")
    ap.add_argument("--train-n", type=int, default=4, help="lightest cases used as the real training set")
    ap.add_argument("--test-n", type=int, default=8, help="at most this many of the heavier cases are tested")
    ap.add_argument("--n-gen", type=int, default=16,
                    help="generated cases per seed (arm real+gen), and CarveMix cases per seed (arm real+carvemix)")
    ap.add_argument("--iters", type=int, default=800, help="training iterations (all arms), batch --batch")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, default=32, help="patch (and inference window) edge, voxels at 2 mm")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (poly decay to 0)")
    ap.add_argument("--ce-weight", type=float, default=100.0,
                    help="cross-entropy weight of the lesion class (background 1)")
    ap.add_argument("--step", type=int, default=None, help="sliding-window step in voxels [default: 3/4 patch]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--recipe", default="ms_flair")
    ap.add_argument("--lesion-label", type=int, nargs="+", default=[1])
    ap.add_argument("--load-range", type=float, nargs=2, default=[2000.0, 9000.0], metavar=("LO", "HI"))
    ap.add_argument("--bank-args", default="", help="extra build-bank options, e.g. --bank-args='--space register'")
    ap.add_argument("--generate-args", default="", help="extra generate options, e.g. --generate-args='--volume-warp'")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--jobs", type=int, default=2, help="lesionsynth --jobs and preprocessing processes")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--work", type=Path, default=None, help="work folder (cache, bank, generated) [default: temp]")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (always kept when --work is given)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--save-predictions", type=Path, default=None, metavar="DIR",
                    help="write each held-out prediction (2 mm preprocessed space, uint8 .npy) as ARM_sSEED_CASE.npy")
    ap.add_argument("--smoke", action="store_true", help="plumbing check: 1 seed, n-gen 2, 4 iters, test-n 2")
    ap.add_argument("--verbose", action="store_true", help="print the training loss 4 times per run")
    args = ap.parse_args(argv)
    global PATCH
    PATCH = args.patch
    if args.step is None:
        args.step = max(1, 3 * PATCH // 4)
    if args.smoke:
        args.seeds, args.n_gen, args.iters, args.test_n, args.step = args.seeds[:1], 2, 4, 2, PATCH
    if args.dataset is None:
        args.dataset = data_root() / "heldout" / "native_brains"
    root = args.dataset
    if not (root / "dataset.json").exists():
        print(f"error: {root}: no dataset.json (an nnU-Net v2 raw dataset is required)", file=sys.stderr)
        return 2

    import torch
    torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    meta, cases = read_nnunet(root)
    lesion_labels = tuple(args.lesion_label)
    for c in cases:
        c["load_mm3"] = lesion_load_mm3(c["label"], lesion_labels)
    cases.sort(key=lambda c: (c["load_mm3"], c["case"]))
    if len(cases) < args.train_n + 1:
        print(f"error: {root}: {len(cases)} cases, need more than --train-n {args.train_n}", file=sys.stderr)
        return 2
    train_cases, test_cases = cases[: args.train_n], cases[args.train_n: args.train_n + args.test_n]
    in_ch = len(meta["channel_names"])

    own_tmp = args.work is None
    work = Path(tempfile.mkdtemp(prefix="downstream_unet_")) if own_tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    print(f"dataset {root} ({len(cases)} cases, channels {list(meta['channel_names'].values())}); work {work}")
    print(f"train (lightest {args.train_n}): " + ", ".join(f"{c['case']} {c['load_mm3']:.0f}" for c in train_cases))
    print(f"test  (heavier, {len(test_cases)}): " + ", ".join(f"{c['case']} {c['load_mm3']:.0f}" for c in test_cases))
    print(f"config: iters {args.iters} batch {args.batch} patch {PATCH}^3 @ {SPACING:g} mm, lr {args.lr:g}, "
          f"ce-weight {args.ce_weight:g}, window step {args.step}, n-gen {args.n_gen}, "
          f"seeds {args.seeds}, recipe {args.recipe}, bank-args {args.bank_args!r}, "
          f"generate-args {args.generate_args!r}", flush=True)

    timings: dict = {"generate_s": {}, "preprocess_gen_s": {}, "carvemix_s": {}}
    t0 = time.perf_counter()
    real_infos = preprocess_all(train_cases + test_cases, cache, lesion_labels, args.jobs)
    timings["preprocess_real_s"] = time.perf_counter() - t0
    train_infos, test_infos = real_infos[: len(train_cases)], real_infos[len(train_cases):]
    print(f"preprocess real cases: {timings['preprocess_real_s']:.1f} s", flush=True)
    test_data = [load_arrays(i) for i in test_infos]

    bank, bank_error = None, None
    if "real+gen" in args.arms:
        t0 = time.perf_counter()
        try:
            bank = build_bank(work, root, meta, train_cases, args)
        except Exception as exc:
            bank_error = f"{type(exc).__name__}: {exc}"
            print(f"    bank FAILED: {bank_error}", flush=True)
        timings["bank_s"] = time.perf_counter() - t0
        print(f"bank: {timings['bank_s']:.1f} s", flush=True)

    runs, gen_info, carvemix_info = [], {}, {}
    for seed in args.seeds:
        for arm in args.arms:
            print(f"[seed {seed}] arm {arm}", flush=True)
            infos, extra = list(train_infos), None
            if arm == "real+carvemix":
                try:
                    t0 = time.perf_counter()
                    extra, made = carvemix_pool(train_infos, args.n_gen, seed)
                    timings["carvemix_s"][seed] = time.perf_counter() - t0
                    lams = [c["lambda_mm"] for c in made if c["lambda_mm"] is not None]
                    carvemix_info[seed] = {"cases": len(made), "made": made,
                                           "lambda_mm_min": min(lams) if lams else None,
                                           "lambda_mm_max": max(lams) if lams else None,
                                           "lesion_voxels_median": _median([c["lesion_voxels"] for c in made])}
                    print(f"    carvemix: {len(made)} cases in {timings['carvemix_s'][seed]:.1f} s (lambda mm "
                          f"min/max {fmt(carvemix_info[seed]['lambda_mm_min'], 2)}/"
                          f"{fmt(carvemix_info[seed]['lambda_mm_max'], 2)}, lesion voxels at 2 mm median "
                          f"{fmt(carvemix_info[seed]['lesion_voxels_median'], 0)})", flush=True)
                except Exception as exc:
                    msg = f"{type(exc).__name__}: {exc}"
                    print(f"    carvemix FAILED: {msg}", flush=True)
                    traceback.print_exc()
                    runs.append({"arm": arm, "seed": seed, "status": "failed", "error": f"carvemix: {msg}"})
                    continue
            if arm == "real+gen":
                if bank_error:
                    runs.append({"arm": arm, "seed": seed, "status": "failed", "error": f"bank: {bank_error}"})
                    continue
                try:
                    t0 = time.perf_counter()
                    gen_dir, summary = generate(work, bank, seed, args)
                    timings["generate_s"][seed] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    _, gen_cases = read_nnunet(gen_dir)
                    infos += preprocess_all(gen_cases, cache, lesion_labels, args.jobs)
                    timings["preprocess_gen_s"][seed] = time.perf_counter() - t0
                    summary["cases"] = len(gen_cases)
                    gen_info[seed] = summary
                    print(f"    generated {len(gen_cases)} cases in {timings['generate_s'][seed]:.1f} s "
                          f"(achieved load mm3 min/median/max {fmt(summary['load_min'], 0)}/"
                          f"{fmt(summary['load_median'], 0)}/{fmt(summary['load_max'], 0)}; {summary['reached']} reached "
                          f"the target, {summary['unchanged_load']} with the base's load unchanged), "
                          f"preprocessed in {timings['preprocess_gen_s'][seed]:.1f} s", flush=True)
                    if not args.keep and own_tmp:
                        shutil.rmtree(gen_dir, ignore_errors=True)
                except Exception as exc:
                    msg = f"{type(exc).__name__}: {exc}"
                    print(f"    generate FAILED: {msg}", flush=True)
                    runs.append({"arm": arm, "seed": seed, "status": "failed", "error": f"generate: {msg}"})
                    continue
            rec = run_arm(arm, seed, infos, test_data, args, in_ch, extra)
            del extra
            runs.append(rec)
            print(f"    {rec['status']}: median Dice {fmt(rec.get('median_dice'))}, precision "
                  f"{fmt(rec.get('mean_precision'))}, recall {fmt(rec.get('mean_recall'))}, false positives "
                  f"{rec.get('false_positives', '-')} ({rec.get('false_positives_1_2_voxels', '-')} of 1-2 voxels); train "
                  f"{fmt(rec.get('train_s'), 1)} s, eval {fmt(rec.get('eval_s'), 1)} s"
                  + (f" ({rec['error']})" if "error" in rec else ""), flush=True)

    # ---- summary
    def metric(r, k):
        if r is None or r["status"] == "failed":
            return None
        return r.get(k)

    by = {(r["arm"], r["seed"]): r for r in runs}
    summary = {}
    for arm in args.arms:
        rs = [by.get((arm, s)) for s in args.seeds]
        summary[arm] = {k: _median([metric(r, k) for r in rs]) for k in METRICS}
        summary[arm]["statuses"] = [r["status"] if r else "missing" for r in rs]
    comparisons = {}  # "X>Y": per metric, the seeds where arm X beats arm Y (both not failed)
    for better, base in (("real+gen", "real"), ("real+carvemix", "real"), ("real+gen", "real+carvemix")):
        if better in args.arms and base in args.arms:
            comparisons[f"{better}>{base}"] = {}
            for k in METRICS:
                pairs = [(metric(by.get((base, s)), k), metric(by.get((better, s)), k)) for s in args.seeds]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                comparisons[f"{better}>{base}"][k] = {"b_beats_a": sum(b > a for a, b in pairs), "of": len(pairs)}
    wins = comparisons.get("real+gen>real", {})  # the earlier key: (b) real+gen against (a) real
    timings["total_s"] = time.perf_counter() - t_start

    print()
    print(f"{'arm':13s} {'seed':>4s} {'medDice':>8s} {'meanPrec':>8s} {'meanRec':>8s} {'poolPrec':>8s} "
          f"{'poolRec':>8s} {'FP':>6s} {'empty':>5s} {'train_s':>8s} {'eval_s':>7s}  status")
    for r in runs:
        empty = f"{r['empty_predictions']}/{len(r['cases'])}" if "cases" in r else "-"
        fps = f"{r['false_positives']}/{r['false_positives_1_2_voxels']}" if "false_positives" in r else "-"
        print(f"{r['arm']:13s} {r['seed']:4d} {fmt(r.get('median_dice')):>8s} {fmt(r.get('mean_precision')):>8s} "
              f"{fmt(r.get('mean_recall')):>8s} {fmt(r.get('pooled_precision')):>8s} "
              f"{fmt(r.get('pooled_recall')):>8s} {fps:>6s} {empty:>5s} {fmt(r.get('train_s'), 1):>8s} "
              f"{fmt(r.get('eval_s'), 1):>7s}  {r['status']}" + (f" ({r['error']})" if "error" in r else ""))
    print("(mean: over the test cases; pooled: over all their lesions together; FP: false-positive components over "
          "the test cases / those of 1-2 voxels at 2 mm)")
    print("median over seeds:")
    for arm, s in summary.items():
        print(f"  {arm:13s} Dice {fmt(s['median_dice'])}  precision {fmt(s['mean_precision'])}  "
              f"recall {fmt(s['mean_recall'])}  pooled precision {fmt(s['pooled_precision'])}  "
              f"pooled recall {fmt(s['pooled_recall'])}  [{', '.join(s['statuses'])}]")
    for pair, ws in comparisons.items():
        better, base = pair.split(">")
        print(f"  {better} beats {base}: " + ", ".join(f"{k} {w['b_beats_a']}/{w['of']}" for k, w in ws.items())
              + " seeds")
    print(f"timings: preprocess real {timings['preprocess_real_s']:.1f} s"
          + (f", bank {timings['bank_s']:.1f} s" if "bank_s" in timings else "")
          + "".join(f", generate s{s} {v:.1f} s" for s, v in timings["generate_s"].items())
          + "".join(f", carvemix s{s} {v:.1f} s" for s, v in timings["carvemix_s"].items())
          + f", total {timings['total_s']:.1f} s")
    print("(metrics at 2 mm against the 2 mm-resampled truth; precision undefined for an empty prediction)")

    if args.json:
        out = {"dataset": str(root), "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "train_cases": [{"case": c["case"], "load_mm3": c["load_mm3"]} for c in train_cases],
               "test_cases": [{"case": c["case"], "load_mm3": c["load_mm3"]} for c in test_cases],
               "preprocessed": real_infos, "generated": gen_info, "carvemix": carvemix_info, "runs": runs,
               "summary": summary, "wins": wins, "comparisons": comparisons, "timings": timings,
               "torch": torch.__version__,
               "evaluation": "2 mm isotropic canonical grid, against the 2 mm-resampled truth"}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
        print(f"json: {args.json}")
    if own_tmp and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif own_tmp:
        print(f"work kept: {work}")
    ok = all(r["status"] != "failed" for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
