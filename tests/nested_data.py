"""A small BraTS-like dataset made from the real sample data: nested tumour labels on MNI152 anatomy.

Anatomy: the MNI152 2009 T1, grey- and white-matter maps (nilearn's wheel, `make data`), averaged onto a 2 mm
grid and cropped to the head, as four channels T1, T1c, T2, FLAIR. Tumours: real lesion masks of the
`mni_lesions` sample set (ATLAS stroke and MS lesions) made nested by morphology: oedema (2) = the lesion grown
by 2 voxels, enhancing (3) = the lesion, necrotic core (1) = the lesion eroded by 1 voxel; each part changes
the channels as in BraTS (oedema bright on T2/FLAIR, enhancing bright on T1c, core dark on T1/T1c). Some
cases are healthy (no tumour): the bases that tumours are pasted into.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

CHANNELS = ("T1", "T1c", "T2", "FLAIR")
LABELS = {"background": 0, "necrotic core": 1, "oedema": 2, "enhancing tumour": 3}
NESTING = (2, 3, 1)  # outermost first
#: Per label, the factor on each channel (T1, T1c, T2, FLAIR).
FACTORS = {2: (0.88, 0.9, 1.45, 1.5), 3: (0.8, 1.8, 1.3, 1.3), 1: (0.6, 0.5, 1.9, 0.75)}
#: The source lesions: (mni_lesions case, how many of its largest components become tumours).
TUMOUR_SOURCES = (("ATLAS_002", 1), ("ATLAS_003", 1), ("MS_01038", 3), ("MS_01039", 1))
HEALTHY_CASES = 3
BLOCK = 2  # 1 mm → 2 mm


def _block_mean(data: np.ndarray) -> np.ndarray:
    shape = tuple(n // BLOCK for n in data.shape)
    cut = data[tuple(slice(0, n * BLOCK) for n in shape)].astype(np.float32)
    return cut.reshape(shape[0], BLOCK, shape[1], BLOCK, shape[2], BLOCK).mean(axis=(1, 3, 5))


def _coarse_affine(affine: np.ndarray) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = affine[:3, :3] @ np.full(3, (BLOCK - 1) / 2.0) + affine[:3, 3]
    out[:3, :3] = affine[:3, :3] * BLOCK
    return out


def _anatomy(cache: Path) -> tuple[dict, np.ndarray, np.ndarray, tuple[slice, ...]]:
    """(noise-free channels on the 2 mm grid, cropped; head mask; affine; the crop on the 2 mm grid)."""
    mni = cache / "raw" / "mni152"
    maps = {}
    for name in ("t1", "gm", "wm"):
        img = nib.load(str(mni / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"))
        maps[name] = _block_mean(np.asarray(img.dataobj, dtype=np.float32))
        affine = _coarse_affine(img.affine)
    gm, wm = maps["gm"] / 255.0, maps["wm"] / 255.0
    head = maps["t1"] > 0.05 * float(maps["t1"].max())
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm > 0.3, iterations=2))
    csf = np.clip(brain - gm - wm, 0.0, 1.0) * brain
    t1 = maps["t1"]
    channels = {"T1": t1, "T1c": 0.95 * t1 + 12.0 * gm,
                "T2": (40.0 + 90.0 * gm + 55.0 * wm + 200.0 * csf) * head,
                "FLAIR": (40.0 + 160.0 * gm + 110.0 * wm + 10.0 * csf) * head}
    box = ndimage.find_objects(head.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(box, head.shape))
    start = np.array([s.start for s in box], dtype=np.float64)
    affine = affine.copy()
    affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return {k: v[box] for k, v in channels.items()}, head[box], affine, box


def nested_tumour_label(lesion: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """uint8 label of nested tumours grown from a binary lesion mask: 2 around, 3 = the lesion, 1 inside."""
    label = np.zeros(lesion.shape, dtype=np.uint8)
    label[ndimage.binary_dilation(lesion, iterations=2) & brain] = 2
    label[lesion] = 3
    label[ndimage.binary_erosion(lesion, iterations=1)] = 1
    return label


def _tumour_masks(cache: Path, box, brain: np.ndarray) -> list[np.ndarray]:
    masks = []
    for case, keep in TUMOUR_SOURCES:
        img = nib.load(str(cache / "mni_lesions" / "labelsTr" / f"{case}.nii.gz"))
        coarse = (_block_mean(np.asarray(img.dataobj) > 0) >= 0.5)[box] & brain
        comps, n = ndimage.label(coarse, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(comps.ravel())[1:]
        largest = np.argsort(-sizes, kind="stable")[:keep] + 1
        masks.append(np.isin(comps, largest))
    return masks


def paint(channels: dict, label: np.ndarray) -> dict:
    """The channels with each tumour part's intensity change, its edges blurred like a scanner's."""
    out = {}
    for c, name in enumerate(CHANNELS):
        factor = np.ones(label.shape, dtype=np.float32)
        for value, per_channel in FACTORS.items():
            factor[label == value] = per_channel[c]
        out[name] = channels[name] * ndimage.gaussian_filter(factor, 0.6)
    return out


def brats_like_dataset(root: Path, cache: Path, seed: int = 0) -> Path:
    """Write the nnU-Net v2 dataset (tumour cases `tumNN`, healthy cases `healthyNN`) into `root`."""
    rng = np.random.default_rng(seed)
    clean, head, affine, box = _anatomy(cache)
    brain = clean["FLAIR"] > 0.5 * float(np.percentile(clean["FLAIR"][head], 90))
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    cases = [(f"tum{k:02d}", nested_tumour_label(m, brain)) for k, m in enumerate(_tumour_masks(cache, box, brain))]
    cases += [(f"healthy{k:02d}", np.zeros(head.shape, dtype=np.uint8)) for k in range(HEALTHY_CASES)]
    for case_id, label in cases:
        gain = rng.uniform(0.9, 1.1)
        painted = paint(clean, label)
        for c, name in enumerate(CHANNELS):
            image = painted[name] * np.float32(gain)
            sd = 0.02 * float(np.percentile(image[head], 99))
            image = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sd)
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"{case_id}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{case_id}.nii.gz")
    meta = {"channel_names": {str(i): n for i, n in enumerate(CHANNELS)}, "labels": LABELS,
            "numTraining": len(cases), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def boundary_neighbours(label: np.ndarray, value: int, inside) -> np.ndarray:
    """The label values of the 6-neighbours of `value`'s voxels that lie outside the labels `inside` (one entry
    per such face): what a part of a tumour is surrounded by."""
    part = label == value
    own = np.isin(label, list(inside))
    found = []
    for axis in range(3):
        for step in (-1, 1):
            moved = np.roll(part, step, axis=axis)
            faces = moved & ~own
            found.append(label[faces])
    return np.concatenate(found)


def nested_as(label: np.ndarray, order, min_share: float = 0.9) -> bool:
    """Whether the labels of `label` (a crop of one tumour, 0 around it) hold every value of `order` (outermost
    first) nested in that order: each inner part's faces outside it and the parts within it touch mostly
    (`min_share`) the part just outside it; the outermost part touches mostly background."""
    for k, value in enumerate(order):
        if not np.any(label == value):
            return False
        faces = boundary_neighbours(label, value, order[k:])
        outside = order[k - 1] if k else 0
        if faces.size and np.mean(faces == outside) < min_share:
            return False
    return True
