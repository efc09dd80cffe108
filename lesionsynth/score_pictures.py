"""The pictures and per-lesion numbers of score.html: recall against truth lesion size, and overlays of the worst
cases (one slice each: truth image, matched truth, missed truth lesions, false positives). matplotlib is imported
only here, inside the functions (Agg canvas); without it the page says the overlays are left out."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

#: Overlay colours: matched truth lesion, missed truth lesion (false negative), false-positive prediction.
HIT_COLOUR, MISS_COLOUR, FALSE_POSITIVE_COLOUR = "#2ca02c", "#ff7f0e", "#e377c2"


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    """95 % Wilson score interval of a proportion (sensible at small n and at 0 or 1)."""
    if n == 0:
        return None, None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def recall_by_lesion_size(rows: list[dict]) -> list[dict]:
    """Lesion recall per half-decade bin of truth lesion volume, over every truth lesion of every case:
    {level, n, detected, recall, ci95}, bins in increasing size."""
    from .score import volume_bin

    bins: dict[str, list] = {}
    for row in rows:
        for volume, detected in zip(row.get("truth_lesion_mm3", []), row.get("truth_lesion_detected", [])):
            level, low = volume_bin(volume)
            entry = bins.setdefault(level, [low, 0, 0])
            entry[1] += 1
            entry[2] += int(detected)
    out = []
    for level, (_, n, hits) in sorted(bins.items(), key=lambda kv: kv[1][0]):
        lo, hi = wilson_interval(hits, n)
        out.append({"level": level, "n": n, "detected": hits, "recall": hits / n, "ci95": [lo, hi]})
    return out


def worst_cases(rows: list[dict], count: int = 3) -> list[dict]:
    """The `count` cases with the lowest Dice among those with any truth or predicted lesion."""
    scored = [r for r in rows if (r["truth_lesions"] or r["pred_lesions"]) and r["dice"] == r["dice"]]
    return sorted(scored, key=lambda r: (r["dice"], r["case_id"]))[:count]


def image_beside(label_path: Path, case_id: str) -> Path | None:
    """The first channel of a case next to its label folder (imagesTs/ beside labelsTs/, imagesTr/ beside
    labelsTr/), or None."""
    from .score import _ending_of

    ending = _ending_of(label_path)
    folder = label_path.parent
    if not folder.name.startswith("labels"):
        return None
    image = folder.parent / folder.name.replace("labels", "images", 1) / f"{case_id}_0000{ending}"
    return image if image.is_file() else None


def overlay_png(truth: np.ndarray, pred: np.ndarray, image: np.ndarray | None, title: str) -> bytes:
    """One slice (the one with most wrong voxels, along the last axis) of a case: the image (else the truth in
    grey), matched truth voxels, missed truth voxels and false-positive voxels, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    wrong = truth ^ pred
    k = int(np.argmax(wrong.sum(axis=(0, 1)))) if wrong.any() else int(np.argmax(truth.sum(axis=(0, 1))))
    t, p = truth[..., k], pred[..., k]
    background = image[..., k] if image is not None else np.zeros(t.shape, dtype=np.float32)
    window = _crop(t | p)  # zoomed on the lesions of the slice: small misses stay visible
    t, p, background = t[window], p[window], background[window]
    classes = np.zeros(t.shape, dtype=np.uint8)
    classes[t & p] = 1
    classes[t & ~p] = 2
    classes[~t & p] = 3
    fig = Figure(figsize=(3.6, 4.0), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lo, hi = np.percentile(background, [1, 99]) if background.any() else (0.0, 1.0)
    ax.imshow(background.T, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
    colours = ListedColormap(["#00000000", HIT_COLOUR, MISS_COLOUR, FALSE_POSITIVE_COLOUR])
    ax.imshow(np.ma.masked_equal(classes, 0).T, cmap=colours, vmin=0, vmax=3, origin="lower", alpha=0.85,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title}\nslice {k} (last axis), zoomed on its lesions", fontsize=9)
    fig.legend(handles=[Patch(color=HIT_COLOUR, label="found"), Patch(color=MISS_COLOUR, label="missed"),
                        Patch(color=FALSE_POSITIVE_COLOUR, label="false positive")],
               loc="outside lower center", ncol=3, frameon=False, fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()


def _crop(mask: np.ndarray, margin: int = 12, least: int = 64) -> tuple[slice, slice]:
    """The box around a slice's lesion voxels, `margin` voxels wider and at least `least` voxels a side."""
    if not mask.any():
        return slice(None), slice(None)
    box = []
    for axis, n in enumerate(mask.shape):
        hits = np.flatnonzero(mask.any(axis=1 - axis))
        lo, hi = int(hits[0]) - margin, int(hits[-1]) + 1 + margin
        grow = max(0, least - (hi - lo))
        lo, hi = lo - grow // 2, hi + grow - grow // 2
        box.append(slice(max(lo, 0), min(hi, n)))
    return box[0], box[1]


def worst_case_overlays(rows: list[dict], truth_paths: dict[str, Path], pred_paths: dict[str, Path],
                        lesion_mask, count: int = 3) -> list[dict]:
    """Overlays of the `count` worst cases: {case_id, dice, png}; [] without matplotlib. `lesion_mask` turns a
    label volume into the boolean lesion mask the scores used."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    from .io.images import load_image
    from .io.nifti import read_array
    from .score import read_label

    pictures = []
    for row in worst_cases(rows, count):
        case_id = row["case_id"]
        truth = lesion_mask(read_label(truth_paths[case_id])[0])
        pred = lesion_mask(read_label(pred_paths[case_id])[0])
        image_path = image_beside(truth_paths[case_id], case_id)
        image = None
        if image_path is not None:
            data = np.asarray(read_array(load_image(image_path), image_path), dtype=np.float32)
            image = data[..., 0] if data.ndim == 4 else data
            if image.shape != truth.shape:
                image = None
        title = f"{case_id}: Dice {row['dice']:.3f}, {row['lesion_fn']} missed, {row['lesion_fp']} FP"
        pictures.append({"case_id": case_id, "dice": row["dice"], "png": overlay_png(truth, pred, image, title)})
    return pictures
