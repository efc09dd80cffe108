"""QC report of a `generate` output: load plots, lesion count/size distributions, before/after pictures.

`write_report(OUT)` writes `OUT/report/report.html`, one self-contained file: every picture is embedded as a
base64 PNG and none is saved beside it (one file to mail or archive, nothing to keep in step; each `<img>` names
its picture in `data-name`). It reads `run.json`, `manifest.jsonl`,
`dataset.json`, the synthetic labels (for the lesion counts and sizes), the bank index recorded in
`run.json`, and the images of the few cases it draws. matplotlib is imported only here, inside the
functions, and only its Agg canvas is used (no pyplot, no global backend switch). The realism audit
(`audit.audit_output`: can pasted lesions be told from real ones?) is written to `report/realism.json`
and shown as a section of the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from ._version import __version__
from .errors import InputError, LesionsynthError
from .geometry import apply_affine
from .output_run import OutputRun, component_volumes, read_channel, read_label, read_output
from .score_html import SORT_JS

REPORT_DIR = "report"
REPORT_FILE = "report.html"
REALISM_FILE = "realism.json"

#: Colours: other lesions' outlines, the zoom window, the lesion of the drawn operation by kind (a pasted one
#: magenta, an inpainted one cyan), target, achieved, original, organ labels.
LESION_COLOUR = "#ffd400"
BEFORE_COLOUR = "#00e5ff"
OP_COLOURS = {"paste": "#ff3df2", "inpaint": "#00e5ff"}
TARGET_COLOUR = "#1f77b4"
ACHIEVED_COLOUR = "#d62728"
ORIGINAL_COLOUR = "#7f7f7f"
ORGAN_COLOUR = "#4cdc4c"
#: At most this many rows in the per-case table (manifest.jsonl holds every case).
MAX_CASE_ROWS = 2000


@dataclass
class Picture:
    """A rendered figure: the name it is known by (`data-name` of its <img>) and its PNG bytes."""

    name: str
    data: bytes


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------

@dataclass
class LesionStats:
    counts: list[int]        # lesions per case
    volumes: list[float]     # mm³ per lesion
    source: str              # where the numbers come from, in words


def before_stats(run: OutputRun) -> LesionStats | None:
    """Lesion counts and sizes of the original cases: from the bank, else from originals in the output."""
    if run.bank_index:
        lesion_labels = set(run.lesion_labels)
        return LesionStats([int(c["lesion_count"]) for c in run.bank_index["cases"]],
                           [float(les["volume_mm3"]) for les in run.bank_index["lesions"]
                            if int(les.get("label_value", 1)) in lesion_labels],
                           f"bank {run.bank_dir}")
    synthetic = {r["case_id"] for r in run.records}
    labels = sorted(p for p in (run.out / "labelsTr").glob(f"*{run.file_ending}")
                    if p.name[: -len(run.file_ending)] not in synthetic)
    if not labels:
        return None
    counts, volumes = [], []
    for p in labels:
        label, affine = read_label(p)
        vols = component_volumes(label, affine, run.lesion_labels, run.connectivity, run.min_volume_mm3)
        counts.append(len(vols))
        volumes.extend(vols.tolist())
    return LesionStats(counts, volumes, "original cases in the output (bank not found)")


def after_stats(run: OutputRun, cache: dict, progress: bool = False) -> LesionStats:
    """Lesion count and volumes of the synthetic labels (connected components), with a bar if `progress`."""
    from tqdm import tqdm

    counts, volumes = [], []
    for rec in tqdm(run.records, desc="report lesions", unit="case", disable=not progress):
        path = run.label_path(rec["case_id"])
        if not path.is_file():
            continue
        label, affine = cache.get(("label", rec["case_id"])) or read_label(path)
        vols = component_volumes(label, affine, run.lesion_labels, run.connectivity, run.min_volume_mm3)
        counts.append(len(vols))
        volumes.extend(vols.tolist())
    return LesionStats(counts, volumes, "connected components of the synthetic labels")


def display_channel(run: OutputRun) -> int:
    """The channel where bank lesions stand out most from their surroundings (median contrast / shell sd)."""
    if not run.bank_index or not run.bank_index["lesions"]:
        return 0
    n = len(run.channel_names)
    scores = np.zeros(n)
    for c in range(n):
        vals = []
        for les in run.bank_index["lesions"]:
            st = les.get("stats", [])
            if c < len(st) and st[c]["lesion"]["median"] is not None and st[c]["shell"]["median"] is not None:
                sd = st[c]["shell"]["std"] or 1.0
                vals.append(abs(st[c]["lesion"]["median"] - st[c]["shell"]["median"]) / max(sd, 1e-6))
        scores[c] = np.median(vals) if vals else 0.0
    return int(scores.argmax())


# --------------------------------------------------------------------------------------------------
# Choosing the sites to draw
# --------------------------------------------------------------------------------------------------

@dataclass
class Site:
    record: dict
    op_index: int

    @property
    def op(self) -> dict:
        return self.record["ops"][self.op_index]


def choose_sites(records: list[dict], n_examples: int, seed: int) -> list[Site]:
    """Up to `n_examples` cases (seeded) with one paste and one inpaint site each; both kinds shown if present."""
    rng = np.random.default_rng([int(seed), 7])
    with_ops = [r for r in records if r.get("ops")]
    if n_examples <= 0 or not with_ops:
        return []
    order = [with_ops[i] for i in rng.permutation(len(with_ops))]
    chosen = order[:n_examples]
    for kind in ("inpaint", "paste"):
        has = lambda r: any(op["op"] == kind for op in r["ops"])  # noqa: E731
        if not any(has(r) for r in chosen):
            extra = next((r for r in order[n_examples:] if has(r)), None)
            if extra is not None:
                keep = [r for r in chosen if not has(r)]
                # drop the last case that does not bring the other kind either
                drop = keep[-1] if len(chosen) >= n_examples else None
                chosen = [r for r in chosen if r is not drop] + [extra]
    sites = []
    for rec in sorted(chosen, key=lambda r: r.get("case_index", 0)):
        for kind in ("paste", "inpaint"):
            idx = [i for i, op in enumerate(rec["ops"]) if op["op"] == kind]
            if idx:
                sites.append(Site(rec, idx[int(rng.integers(len(idx)))]))
    return sites


# --------------------------------------------------------------------------------------------------
# Figures (matplotlib Agg canvas, no pyplot)
# --------------------------------------------------------------------------------------------------

def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, name: str, dpi: int = 100, palette: bool = False) -> Picture:
    """The figure as PNG bytes; `palette` stores it with a fixed palette (`_palette`: 2x smaller than RGB; an
    adaptive palette would take the greys' levels, and so the images' noise, or wash out the outlines)."""
    buffer = io.BytesIO()
    if not palette:
        fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
        return Picture(name, buffer.getvalue())
    from PIL import Image  # a dependency of matplotlib

    fig.set_dpi(dpi)
    fig.set_facecolor("white")
    canvas = fig.canvas
    canvas.draw()
    rgb = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    rgb.convert("RGB").quantize(palette=_palette(), dither=Image.Dither.NONE).save(buffer, format="PNG",
                                                                                     optimize=True)
    return Picture(name, buffer.getvalue())


def _palette():
    """192 grey levels, and each overlay colour pure and blended with black, grey and white (the outlines'
    anti-aliased edges), as a PIL palette image."""
    from PIL import Image

    colours = [(round(i * 255 / 191),) * 3 for i in range(192)]
    for hex_colour in (LESION_COLOUR, *OP_COLOURS.values(), ORGAN_COLOUR):
        rgb = [int(hex_colour[k:k + 2], 16) for k in (1, 3, 5)]
        colours += [tuple(round(w * c + (1 - w) * bg) for c in rgb) for bg in (0, 128, 255) for w in (1.0, 0.66, 0.33)]
    image = Image.new("P", (1, 1))
    image.putpalette([v for c in colours[:256] for v in c])
    return image


def _mm3_axis(axis) -> None:
    """Readable load ticks: at most 6, as 75k rather than 75000."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if axis.get_scale() == "linear":
        axis.set_major_locator(MaxNLocator(6))
    axis.set_major_formatter(FuncFormatter(lambda x, _pos: _short_num(x)))


def _short_num(x: float) -> str:
    if abs(x) >= 1e6:
        return f"{x / 1e6:g}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:g}k"
    return f"{x:g}"


def _bins(values: np.ndarray, max_bins: int = 30) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return np.linspace(0, 1, 2)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.array([lo - 0.5, hi + 0.5])
    edges = np.histogram_bin_edges(values, bins="auto")
    return edges if len(edges) - 1 <= max_bins else np.linspace(lo, hi, max_bins + 1)


def load_figure(run: OutputRun, picture_name: str = "loads.png") -> Picture:
    """Histogram of target and achieved (and original) loads; scatter achieved vs target with the tolerance band."""
    recs = run.records
    target = np.array([r["target_load_mm3"] for r in recs], dtype=np.float64)
    achieved = np.array([r["achieved_load_mm3"] for r in recs], dtype=np.float64)
    ok = np.array([run.within(r) for r in recs], dtype=bool)
    original = (np.array([c["load_mm3"] for c in run.bank_index["cases"]], dtype=np.float64)
                if run.bank_index else np.zeros(0))
    tol = run.tolerance(recs[0]) if recs else float(run.config.get("tolerance", 0.1))

    fig = _figure(11, 4.2)
    ax_h, ax_s = fig.subplots(1, 2)
    edges = _bins(np.concatenate([target, achieved, original]))
    if original.size:
        ax_h.hist(original, bins=edges, weights=np.full(original.size, 1 / original.size), color=ORIGINAL_COLOUR,
                  alpha=0.35, label=f"original cases (n={original.size})")
    ax_h.hist(target, bins=edges, weights=np.full(target.size, 1 / max(target.size, 1)), histtype="step",
              linewidth=2, color=TARGET_COLOUR, label=f"target (n={target.size})")
    ax_h.hist(achieved, bins=edges, weights=np.full(achieved.size, 1 / max(achieved.size, 1)), histtype="step",
              linewidth=2, linestyle="--", color=ACHIEVED_COLOUR, label="achieved")
    ax_h.set_xlabel("lesion load (mm³)")
    ax_h.set_ylabel("fraction of cases")
    ax_h.set_title("Lesion load distribution")
    _legend_below(ax_h)

    lo = float(min(target.min(initial=np.inf), achieved[achieved > 0].min(initial=np.inf)))
    hi = float(max(target.max(initial=0), achieved.max(initial=0)))
    if not np.isfinite(lo) or hi <= 0:
        lo, hi = 0.0, 1.0
    log = lo > 0 and hi / lo > 30
    pad = (hi / lo) ** 0.05 if log else 0.05 * (hi - lo or hi or 1)
    x0, x1 = (lo / pad, hi * pad) if log else (max(lo - pad, 0), hi + pad)
    line = np.geomspace(x0, x1, 200) if log else np.linspace(x0, x1, 200)
    ax_s.fill_between(line, line * (1 - tol), line * (1 + tol), color=TARGET_COLOUR, alpha=0.15, linewidth=0,
                      label=f"±{tol:.0%} tolerance")
    ax_s.plot(line, line, color="black", linewidth=1, label="achieved = target")
    ax_s.scatter(target[ok], achieved[ok], s=22, color=TARGET_COLOUR, label=f"within tolerance ({ok.sum()})",
                 zorder=3)
    if (~ok).any():
        ax_s.scatter(target[~ok], np.maximum(achieved[~ok], x0) if log else achieved[~ok], s=30,
                     color=ACHIEVED_COLOUR, marker="x", label=f"outside ({(~ok).sum()})", zorder=3)
    if log:
        ax_s.set_xscale("log")
        ax_s.set_yscale("log")
    ax_s.set_xlim(x0, x1)
    ax_s.set_ylim(x0, x1)
    for axis in (ax_h.xaxis, ax_s.xaxis, ax_s.yaxis):
        _mm3_axis(axis)
    ax_s.set_aspect("equal", adjustable="box")
    ax_s.set_xlabel("target load (mm³)")
    ax_s.set_ylabel("achieved load (mm³)")
    ax_s.set_title("Achieved vs target")
    _legend_below(ax_s)
    return _save(fig, picture_name)


def lesion_figure(before: LesionStats | None, after: LesionStats, picture_name: str = "lesions.png") -> Picture:
    """Lesions per case and lesion size (log axis), before (original cases) and after (synthetic)."""
    fig = _figure(11, 4.2)
    ax_c, ax_v = fig.subplots(1, 2)
    series = [(s, name, colour) for s, name, colour in
              ((before, "original", ORIGINAL_COLOUR), (after, "synthetic", ACHIEVED_COLOUR)) if s is not None]
    all_counts = [c for s, _, _ in series for c in s.counts] or [0]
    top = max(all_counts)
    width = max(1, int(np.ceil((top + 1) / 30)))
    edges = np.arange(0, top + width + 1, width) - 0.5
    for s, name, colour in series:
        if s.counts:
            ax_c.hist(s.counts, bins=edges, weights=np.full(len(s.counts), 1 / len(s.counts)),
                      histtype="stepfilled" if name == "original" else "step",
                      alpha=0.35 if name == "original" else 1.0, linewidth=2, color=colour,
                      label=f"{name}: {len(s.counts)} cases, median {np.median(s.counts):g}")
    ax_c.set_xlabel("lesions per case")
    ax_c.set_ylabel("fraction of cases")
    ax_c.set_title("Lesion count")
    _legend_below(ax_c)

    vols = np.array([v for s, _, _ in series for v in s.volumes if v > 0])
    if vols.size:
        lo, hi = vols.min(), vols.max()
        if hi <= lo:
            lo, hi = lo / 1.5, hi * 1.5
        v_edges = np.geomspace(lo, hi * 1.0001, 31)
        for s, name, colour in series:
            v = np.array([x for x in s.volumes if x > 0])
            if v.size:
                ax_v.hist(v, bins=v_edges, weights=np.full(v.size, 1 / v.size),
                          histtype="stepfilled" if name == "original" else "step",
                          alpha=0.35 if name == "original" else 1.0, linewidth=2, color=colour,
                          label=f"{name}: {v.size} lesions, median {np.median(v):.3g} mm³")
        ax_v.set_xscale("log")
        _legend_below(ax_v)
    else:
        ax_v.text(0.5, 0.5, "no lesions", ha="center", va="center", transform=ax_v.transAxes)
    ax_v.set_xlabel("lesion volume (mm³, log scale)")
    ax_v.set_ylabel("fraction of lesions")
    ax_v.set_title("Lesion size")
    return _save(fig, picture_name)


def _legend_below(ax) -> None:
    """The axes' legend under its x-axis label, clear of the data (constrained layout makes room)."""
    ax.legend(frameon=False, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)


def realism_figure(audit: dict, picture_name: str = "realism.png") -> Picture:
    """Per channel (rows): histograms of each audit feature (contrast, spread, edge, context), real vs pasted;
    values more than 3 IQR beyond the quartiles (both groups together) are counted in the end bins."""
    from .audit import MEASURES, REPORTED

    names = audit["channels"]
    measures = MEASURES + REPORTED
    fig = _figure(11, 0.6 + 2.4 * len(names))
    axes = np.asarray(fig.subplots(len(names), len(measures), squeeze=False))
    rows = {kind: [les for les in audit["lesions"] if les["kind"] == kind] for kind in ("real", "pasted")}
    for r, name in enumerate(names):
        for c, measure in enumerate(measures):
            ax, key = axes[r, c], f"{measure}_{name}"
            values = {kind: np.array([les[key] for les in rows[kind] if les.get(key) is not None], dtype=np.float64)
                      for kind in rows}
            both = np.concatenate(list(values.values()))
            q25, q75 = np.percentile(both, [25, 75]) if both.size else (0.0, 1.0)
            lo, hi = q25 - 3 * (q75 - q25), q75 + 3 * (q75 - q25)
            edges = _bins(np.clip(both, lo, hi))  # outliers go into the end bins
            for kind, colour in (("real", ORIGINAL_COLOUR), ("pasted", ACHIEVED_COLOUR)):
                v = np.clip(values[kind], lo, hi)
                if v.size:
                    ax.hist(v, bins=edges, weights=np.full(v.size, 1 / v.size),
                            histtype="stepfilled" if kind == "real" else "step", alpha=0.35 if kind == "real" else 1,
                            linewidth=2, color=colour, label=f"{kind} (n={v.size})")
            single = audit["single_auc"].get(key)
            ax.set_title(f"{measure} {name}" + (f" (AUC {single:.2f})" if single is not None else " (not classified)"),
                         fontsize=10)
            ax.tick_params(labelsize=8)
            if c == 0:
                ax.set_ylabel("fraction of lesions", fontsize=9)
            if r == 0 and c == 0:
                fig.legend(frameon=False, fontsize=9, loc="outside upper center", ncol=2)
    return _save(fig, picture_name)


def _canonical(data: np.ndarray, affine: np.ndarray):
    """(data, affine, zooms) in the closest RAS+ orientation (nibabel's as_closest_canonical)."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(img.dataobj), img.affine, np.asarray(img.header.get_zooms()[:3], dtype=np.float64)


#: (name, fixed axis, horizontal axis, vertical axis, edge letters: left, right, bottom, top) in RAS+.
PLANES = (("axial", 2, 0, 1, "LRPA"), ("coronal", 1, 0, 2, "LRIS"), ("sagittal", 0, 1, 2, "PAIS"))


def _plane(vol: np.ndarray, fixed: int, index: int) -> np.ndarray:
    sl = [slice(None)] * 3
    sl[fixed] = int(np.clip(index, 0, vol.shape[fixed] - 1))
    return vol[tuple(sl)]  # axes: the two remaining axes in order (horizontal, vertical)


def site_figure(site: Site, run: OutputRun, channel: int, cache: dict, picture_name: str) -> Picture | None:
    """Before / after slices (three orthogonal planes, zoomed) and the after slices in full, through one site; the
    lesion of the operation is outlined in its kind's colour (`OP_COLOURS`), solid where it is, dashed where it
    will be (paste, before) or was (inpaint, after), and a multi-class lesion's inner parts (`inner_parts`) thinner
    in the same colour; other lesions in yellow."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    rec, op = site.record, site.op
    after_img, affine = _cached(cache, ("image", rec["case_id"], channel),
                                lambda: read_channel(run.image_path(rec["case_id"], channel), channel, False))
    after_lab, _ = _cached(cache, ("label", rec["case_id"]), lambda: read_label(run.label_path(rec["case_id"])))
    before = _base_case(run, rec["base_case"], channel, cache)
    lesion_labels = run.lesion_labels

    # site centre (world mm) and half field of view (mm)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if op["op"] == "paste":
        centre_mm = np.asarray(op["centre_mm"], dtype=np.float64)
        les = run.bank_index and next((x for x in run.bank_index["lesions"] if x["id"] == op["lesion_id"]), None)
        vol = float(op.get("added_mm3") or (les["volume_mm3"] * op["scale"] ** 3 if les else 100.0))
        extent_mm = 2 * np.cbrt(3 * vol / (4 * np.pi))
    else:
        box = np.asarray(op["bbox"], dtype=np.float64)
        centre_mm = apply_affine(affine, (box[:, 0] + box[:, 1] - 1) / 2)
        extent_mm = float(((box[:, 1] - box[:, 0]) * spacing).max())
    half = max(25.0, 2.0 * extent_mm)

    vols = {"after": _canonical(after_img, affine)}
    lab_after, c_affine, zooms = _canonical(np.isin(after_lab, lesion_labels).astype(np.uint8), affine)
    masks = {"after": lab_after}
    organs = {}  # other labels (organ / region), outlined thinly
    for name, lab in (("after", after_lab), ("before", before[1] if before is not None else None)):
        if lab is not None:
            other = (lab > 0) & ~np.isin(lab, lesion_labels)
            if other.any():
                organs[name] = _canonical(other.astype(np.uint8), affine)[0]
    if before is not None:
        vols["before"] = _canonical(before[0], affine)
        masks["before"] = _canonical(np.isin(before[1], lesion_labels).astype(np.uint8), affine)[0]
        window = before[2]
    else:
        window = tuple(np.percentile(after_img[::2, ::2, ::2], [1, 99]))
    centre_vox = np.rint(apply_affine(np.linalg.inv(c_affine), centre_mm)).astype(int)
    centre_vox = np.clip(centre_vox, 0, np.asarray(lab_after.shape) - 1)
    op_colour = OP_COLOURS[op["op"]]
    op_mask = operation_mask(masks["after"], masks.get("before"), op["op"], centre_vox, half / zooms)
    # a multi-class lesion's inner parts, drawn in the picture where the lesion is (after a paste, before a removal)
    inner: dict[str, list[np.ndarray]] = {}
    where = "after" if op["op"] == "paste" else "before"
    values = after_lab if where == "after" else (before[1] if before is not None else None)
    if len(lesion_labels) > 1 and values is not None:
        inner[where] = inner_parts(_canonical(values, affine)[0], op_mask, zooms)

    # the full-slice row is left out when the zoom window already shows (nearly) the whole slice
    shape_c = np.asarray(lab_after.shape)
    zoom_vox = np.minimum(2 * half / zooms, shape_c)
    context = bool((zoom_vox < 0.8 * shape_c).any())
    rows = (["before"] if before is not None else []) + ["after"] + (["context"] if context else [])
    row_names = {"before": "before (base case)", "after": "after (synthetic)", "context": "after, full slice"}
    panel, top_in, bottom_in, left_in = 3.0, 0.75, 0.35, 0.3
    width, height = left_in + 3 * panel + 0.1, top_in + bottom_in + panel * len(rows)
    fig = _figure(width, height, layout=None)
    axes = np.atleast_2d(fig.subplots(len(rows), 3, gridspec_kw=dict(
        left=left_in / width, right=1 - 0.1 / width, bottom=bottom_in / height, top=1 - top_in / height,
        wspace=0.04, hspace=0.06)))
    for col, (pname, fixed, h, v, letters) in enumerate(PLANES):
        k = int(centre_vox[fixed])
        for row, kind in enumerate(rows):
            ax = axes[row, col]
            src = "before" if kind == "before" else "after"
            img = _plane(vols[src][0], fixed, k)
            own = _plane(op_mask, fixed, k)
            mask = _plane(masks[src], fixed, k) & ~own  # the other lesions
            # the op's lesion: solid where it is in this row's picture, dashed where it is not (yet / any more)
            present = (op["op"] == "paste") == (src == "after")
            n_h, n_v = img.shape
            if kind == "context":
                (h0, h1), (v0, v1) = (0, n_h), (0, n_v)
            else:  # crop to the zoom window before drawing: cheaper, and the same picture
                h0, h1 = _window(centre_vox[h], half / zooms[h], n_h)
                v0, v1 = _window(centre_vox[v], half / zooms[v], n_v)
            crop = (slice(h0, h1), slice(v0, v1))
            # mm relative to the site at pixel edges; RAS+ so + is right / anterior / superior
            ext = [(h0 - 0.5 - centre_vox[h]) * zooms[h], (h1 - 0.5 - centre_vox[h]) * zooms[h],
                   (v0 - 0.5 - centre_vox[v]) * zooms[v], (v1 - 0.5 - centre_vox[v]) * zooms[v]]
            ax.imshow(img[crop].T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", extent=ext,
                      interpolation="nearest" if kind != "context" else "antialiased")
            organ = _plane(organs[src], fixed, k) if src in organs else None
            for m, colour, style, lw in ((organ, ORGAN_COLOUR, "-", 0.7),
                                         (mask, LESION_COLOUR, "-", 1.0 if kind != "context" else 0.6),
                                         (own, op_colour, "-" if present else "--", 2.0 if kind != "context" else 1.2)):
                if m is not None and m[crop].any() and min(h1 - h0, v1 - v0) > 1:
                    ax.contour(m[crop].T, levels=[0.5], colors=colour, linewidths=lw, linestyles=style,
                               origin="lower", extent=ext)
            for part in inner.get(src, []):
                m = _plane(part, fixed, k)
                if m[crop].any() and min(h1 - h0, v1 - v0) > 1:
                    ax.contour(m[crop].T, levels=[0.5], colors=op_colour, linewidths=1.0 if kind != "context" else 0.6,
                               linestyles="-", origin="lower", extent=ext)
            if kind == "context":
                ax.add_patch(Rectangle((-half, -half), 2 * half, 2 * half, fill=False, edgecolor=BEFORE_COLOUR,
                                       linewidth=1, linestyle=":", clip_on=True))
            else:
                _scale_bar(ax, ext)
            ax.set_xlim(ext[0], ext[1])
            ax.set_ylim(ext[2], ext[3])
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
            for x, y, s, ha, va in ((0.02, 0.5, letters[0], "left", "center"),
                                    (0.98, 0.5, letters[1], "right", "center"),
                                    (0.5, 0.02, letters[2], "center", "bottom"),
                                    (0.5, 0.98, letters[3], "center", "top")):
                ax.text(x, y, s, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=8, path_effects=_halo(),
                        fontweight="bold")
            if col == 0:
                ax.set_ylabel(row_names[kind], fontsize=10)
            if row == 0:
                ax.set_title(f"{pname} (slice {k})", fontsize=10)
    what = "pasted lesion (dashed: before it was pasted)" if op["op"] == "paste" else \
        "inpainted lesion (dashed: after it was removed)"
    handles = [Line2D([], [], color=op_colour, linewidth=2.0, label=what)]
    if any(inner.values()):
        handles.append(Line2D([], [], color=op_colour, linewidth=1.0, label="its inner parts (nested labels)"))
    handles.append(Line2D([], [], color=LESION_COLOUR, linewidth=1.0, label="other lesions"))
    if organs:
        handles.append(Line2D([], [], color=ORGAN_COLOUR, linewidth=1, label="other labels (organ / region)"))
    if context:
        handles.append(Line2D([], [], color=BEFORE_COLOUR, linewidth=1, linestyle=":", label="zoom window"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9,
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(site_title(site, run, channel), fontsize=10.5, y=1 - 0.08 / height, va="top")
    return _save(fig, picture_name, dpi=80, palette=True)


def operation_mask(after: np.ndarray, before: np.ndarray | None, kind: str, centre_vox, half_vox) -> np.ndarray:
    """The voxels of the drawn operation's lesion: the connected part, nearest the site's centre inside the zoom
    window, of what a paste added (after − before) or an inpaint removed (before − after); without the before
    picture, the after lesion at the site (paste) or nothing (inpaint)."""
    from scipy import ndimage

    after = after.astype(bool)
    if before is None:
        changed = after if kind == "paste" else np.zeros(after.shape, dtype=bool)
    else:
        changed = after & ~before.astype(bool) if kind == "paste" else before.astype(bool) & ~after
    lo = np.maximum(np.floor(centre_vox - half_vox).astype(int), 0)
    hi = np.minimum(np.ceil(centre_vox + half_vox).astype(int) + 1, after.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    parts, n = ndimage.label(changed[box], structure=np.ones((3, 3, 3), dtype=bool))
    out = np.zeros(after.shape, dtype=bool)
    if n == 0:
        return out
    points = np.argwhere(parts > 0)
    nearest = points[np.argmin(((points + lo - centre_vox) ** 2).sum(axis=1))]
    out[box] = parts == parts[tuple(nearest)]
    return out


def inner_parts(values: np.ndarray, lesion: np.ndarray, spacing) -> list[np.ndarray]:
    """The inner parts of one multi-class lesion (`lesion`, bool, its voxels in the label volume `values`), each
    with the parts inside it, outermost first (`labels.nesting_order`, `labels.nested_masks`): BraTS' tumour
    core and its enhancing rim inside the oedema. Empty for a lesion of one label."""
    from .geometry import true_bounds
    from .labels import nested_masks, nesting_order

    box = true_bounds(lesion)
    if box is None:
        return []
    grown = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(box, lesion.shape))
    crop = np.where(lesion[grown], values[grown], 0)  # background around it, for the depths
    order = nesting_order(crop, spacing)
    out = []
    for part in nested_masks(crop, order):
        full = np.zeros(lesion.shape, dtype=bool)
        full[grown] = part
        out.append(full)
    return out


def _window(centre: int, half_vox: float, n: int) -> tuple[int, int]:
    lo = int(np.floor(centre - half_vox))
    hi = int(np.ceil(centre + half_vox)) + 1
    return max(lo, 0), min(hi, n)


def _halo(width: float = 2.0):
    """A black outline so white overlay text and bars stay readable on bright tissue."""
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=width, foreground="black")]


def _scale_bar(ax, ext) -> None:
    """A white bar of a round length, about a fifth of the panel width."""
    x0, x1, y0, y1 = ext
    length_mm = next((v for v in (100, 50, 20, 10, 5, 2, 1) if v <= (x1 - x0) / 4), 0.5)
    xs = x0 + 0.05 * (x1 - x0)
    ys = y0 + 0.06 * (y1 - y0)
    ax.plot([xs, xs + length_mm], [ys, ys], color="white", linewidth=2.5, solid_capstyle="butt",
            path_effects=_halo(4.5))
    ax.text(xs + length_mm / 2, ys + 0.02 * (y1 - y0), f"{length_mm:g} mm", color="white", fontsize=7,
            path_effects=_halo(),
            ha="center", va="bottom")


def site_title(site: Site, run: OutputRun, channel: int) -> str:
    rec, op = site.record, site.op
    names = run.channel_names
    chan = names[channel] if channel < len(names) else f"channel {channel}"
    head = f"{rec['case_id']} (base {rec['base_case']}) — op {site.op_index + 1}/{len(rec['ops'])}: "
    if op["op"] == "paste":
        les = run.bank_index and next((x for x in run.bank_index["lesions"] if x["id"] == op["lesion_id"]), None)
        src = f"{les['volume_mm3']:.0f} mm³" if les else "?"
        what = (f"paste {op['lesion_id']} ({src}, scale {op['scale']:.2f}, +{op.get('added_mm3', 0):.0f} mm³) "
                f"at ({', '.join(f'{x:.0f}' for x in op['centre_mm'])}) mm")
    else:
        what = (f"inpaint component at voxel {tuple(op['seed_voxel'])} (−{op.get('removed_mm3', 0):.0f} mm³)")
    return (f"{head}{what}\n{chan}; target {rec['target_load_mm3']:.0f} mm³, "
            f"achieved {rec['achieved_load_mm3']:.0f} mm³")


def site_caption(site: Site, run: OutputRun) -> str:
    """What a site's pictures show, in words: case, base, operation, donor, scale, score, loads."""
    rec, op = site.record, site.op
    head = f"{rec['case_id']} (base {rec['base_case']}), operation {site.op_index + 1} of {len(rec['ops'])}: "
    if op["op"] == "paste":
        les = run.bank_index and next((x for x in run.bank_index["lesions"] if x["id"] == op["lesion_id"]), None)
        donor = op.get("source_case") or (les and les.get("case_id")) or "?"
        size = f", {les['volume_mm3']:.0f} mm³ in the bank" if les else ""
        score = (f"; context score {op['context_score']:.2f} (distance of the destination's tissue from the "
                 f"donor's own surroundings; 0 = same)") if "context_score" in op else ""
        what = (f"<b>paste</b> (magenta) of lesion {op['lesion_id']} from donor case {donor}{size}, scale "
                f"{op['scale']:.2f}, adding {op.get('added_mm3', 0):.0f} mm³{score}")
    else:
        what = f"<b>inpaint</b> (cyan) removing a {op.get('removed_mm3', 0):.0f} mm³ lesion"
    return (f"{html.escape(head)}{what}. Case load: target {rec['target_load_mm3']:,.0f} mm³, achieved "
            f"{rec['achieved_load_mm3']:,.0f} mm³.")


def _cached(cache: dict, key, make):
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _base_case(run: OutputRun, case_id: str, channel: int, cache: dict):
    """(image, label, window) of a base case: the bank's recorded files, else the copy in the output."""
    def load():
        entry = run.bank_case(case_id)
        candidates = []
        if entry:
            four_d = bool(entry.get("four_d"))
            img_path = Path(entry["images"][0 if four_d else channel]) if entry["images"] else None
            candidates.append((img_path, four_d, Path(entry["label"])))
        candidates.append((run.image_path(case_id, channel), False, run.label_path(case_id)))
        for img_path, four_d, lab_path in candidates:
            if img_path is not None and img_path.is_file() and lab_path.is_file():
                image, _ = read_channel(img_path, channel, four_d)
                label, _ = read_label(lab_path)
                window = tuple(float(x) for x in np.percentile(image[::2, ::2, ::2], [1, 99]))
                if window[1] <= window[0]:
                    window = (window[0], window[0] + 1.0)
                return image, label, window
        return None
    return _cached(cache, ("base", case_id, channel), load)


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}td.n{text-align:right}img{max-width:100%;height:auto;display:block;margin:.6em 0}
.muted{color:#666;font-size:.9em}figure{margin:1.2em 0}figcaption{font-size:.9em;color:#444}
.channels{display:flex;flex-wrap:wrap;gap:.5em}.channels>div{flex:1 1 480px}
.scroll{max-height:30em;overflow:auto;border:1px solid #eee}.scroll table{margin:0}
table.sortable th{cursor:pointer;position:sticky;top:0}table.sortable th:hover{background:#e6e6e6}
details summary{cursor:pointer;color:#444}
"""


def _img_tag(picture: Picture, alt: str) -> str:
    data = base64.b64encode(picture.data).decode("ascii")
    return f'<img data-name="{html.escape(picture.name)}" src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(header: list[str] | None, rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header) if header else ""
    def cell(c) -> str:
        cls = ' class="n"' if isinstance(c, (int, float)) else ""
        return f"<td{cls}>{html.escape(str(c))}</td>"

    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def _sortable_table(header: list[str], rows: list[list]) -> str:
    """A table whose columns sort on a click on their header (score_html.SORT_JS; numbers numerically)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)

    def cell(c) -> str:
        if isinstance(c, float):
            return f'<td class="n" data-v="{c:.10g}">{c:,.0f}</td>'
        if isinstance(c, int) and not isinstance(c, bool):
            return f'<td class="n" data-v="{c}">{c}</td>'
        return f'<td data-v="{html.escape(str(c))}">{html.escape(str(c))}</td>'

    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return (f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


def case_rows(run: OutputRun) -> list[list]:
    """The per-case table: case, base, target and achieved load (mm³), achieved / target, within tolerance,
    lesions pasted and inpainted, failed placements, stop reason; in case order."""
    rows = []
    for r in sorted(run.records, key=lambda r: r.get("case_index", 0)):
        ops = Counter(op["op"] for op in r.get("ops", []))
        target, achieved = float(r["target_load_mm3"]), float(r["achieved_load_mm3"])
        rows.append([r["case_id"], r["base_case"], target, achieved,
                     f"{achieved / target:.0%}" if target > 0 else "–", "yes" if run.within(r) else "no",
                     ops.get("paste", 0), ops.get("inpaint", 0), int(r.get("failed_placements", 0)),
                     str(r.get("stop_reason", "?"))])
    return rows


def quantile_rows(series: list[tuple[str, object]]) -> list[list]:
    """Rows of a statistics table: name, n, min, q25, median, q75, max of each (name, values)."""
    rows = []
    for name, values in series:
        v = np.asarray(values if values is not None else [], dtype=np.float64)
        q = np.percentile(v, [0, 25, 50, 75, 100]) if v.size else [None] * 5
        rows.append([name, int(v.size), *(("–" if x is None else f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}")
                                          for x in q)])
    return rows


QUANTILE_HEADER = ["", "n", "min", "q25", "median", "q75", "max"]


def equivalent_command(run: OutputRun) -> str:
    """A `lesionsynth generate` command line that makes this run again (its options that differ from the
    defaults; the augment ranges come from the bank's recipe, as generate reads them)."""
    import shlex

    cfg = run.config
    defaults = {"mode": "both", "seed": 0, "tolerance": 0.1, "folds": 5, "include_originals": True,
                "compression_level": 1, "file_ending": None, "volume_warp": False, "format": "nnunet",
                "load_label": None, "load_range": None}
    words = ["lesionsynth", "generate", str(run.bank_dir), "--out", str(run.out), "--n", str(cfg.get("n", "?")),
             "--load", str(cfg.get("load", "?"))]
    flags = {"mode": "--mode", "seed": "--seed", "tolerance": "--tolerance", "folds": "--folds",
             "compression_level": "--compression-level", "file_ending": "--file-ending", "format": "--format",
             "load_label": "--load-label"}
    for key, flag in flags.items():
        if key in cfg and cfg[key] != defaults[key]:
            words += [flag, str(cfg[key])]
    if cfg.get("load_range"):
        words += ["--load-range", *(f"{v:g}" for v in cfg["load_range"])]
    if cfg.get("include_originals") is False:
        words.append("--no-include-originals")
    if cfg.get("volume_warp"):
        words.append("--volume-warp")
    return " ".join(shlex.quote(w) for w in words)


def run_rows(run: OutputRun) -> list[list]:
    """The head of the page: what made the run, when, and what made this report."""
    manifest = run.out / "manifest.jsonl"
    finished = (datetime.fromtimestamp(manifest.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
                if manifest.is_file() else "not finished")
    return [["run", f"lesionsynth {run.run.get('lesionsynth_version', '?')}, finished {finished}"],
            ["command (equivalent)", equivalent_command(run)],
            ["report", f"lesionsynth {__version__}, {datetime.now().strftime('%Y-%m-%d %H:%M')}"]]


def config_rows(config: dict, prefix: str = "") -> list[list]:
    """The run's configuration as (key, value) rows; nested sections as `section.key`."""
    rows = []
    for key, value in config.items():
        if isinstance(value, dict):
            rows += config_rows(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", json.dumps(value) if isinstance(value, (list, tuple, type(None))) else
                         str(value)])
    return rows


def _quantiles(values) -> str:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return "–"
    q = np.percentile(v, [0, 25, 50, 75, 100])
    return " / ".join(f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" for x in q)


def write_report(out_dir: str | Path, n_examples: int = 6, seed: int = 0, data_root: str | Path | None = None,
                 progress: bool = False, bank: str | Path | None = None) -> Path:
    """Write `out_dir/report/report.html` (self-contained, its pictures embedded) and `realism.json`; return the
    HTML path. `data_root`: the bank's dataset, where it is not where the bank says (else the pictures use the
    originals in the output); `bank`: the run's bank, where it is not where run.json says. `progress`: bars and
    step lines on stderr."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LesionsynthError("lesionsynth report needs matplotlib: pip install matplotlib") from None
    run = read_output(out_dir, data_root, bank)
    if not run.records:
        raise InputError(f"{run.out}: manifest.jsonl holds no synthetic case; nothing to report")
    folder = run.out / REPORT_DIR
    folder.mkdir(exist_ok=True)
    for old in list(folder.glob("*.png")) + [folder / REPORT_FILE, folder / REALISM_FILE]:
        old.unlink(missing_ok=True)

    cache: dict = {}
    channel = display_channel(run)
    sites = choose_sites(run.records, n_examples, seed)
    figures = {"loads": load_figure(run)}
    before = before_stats(run)
    site_pngs, skipped = [], []
    # every channel of a site is drawn: a paste can look right on one contrast and wrong on another
    channels = [channel] + [c for c in range(len(run.channel_names)) if c != channel]
    for k, site in enumerate(tqdm(sites, desc="report pictures", unit="site", disable=not progress)):
        stem = f"site{k + 1:02d}_{site.record['case_id']}_{site.op['op']}{site.op_index + 1}"
        try:
            pngs = [(c, site_figure(site, run, c, cache, f"{stem}_c{c}.png")) for c in channels]
        except InputError as exc:  # a case file gone missing or unreadable: say so, draw the others
            skipped.append(f"{site.record['case_id']} op {site.op_index + 1}: {exc}")
            pngs = []
        pngs = [(c, png) for c, png in pngs if png is not None]
        if pngs:
            site_pngs.append((site, pngs))
        # keep memory bounded: drop images that no later site needs (labels stay for the counts)
        later = sites[k + 1:]
        for key in list(cache):
            if (key[0] == "image" and not any(s.record["case_id"] == key[1] for s in later)) or \
                    (key[0] == "base" and not any(s.record["base_case"] == key[1] for s in later)):
                del cache[key]
    after = after_stats(run, cache, progress)
    cache.clear()
    figures["lesions"] = lesion_figure(before, after)
    from .audit import audit_output
    from .io.nifti import write_bytes_atomic

    audit = audit_output(run, seed=seed, progress=progress)
    from .critic import strong_audit

    _step("report: strong audit (critic)", progress)
    strong = strong_audit(run, seed=seed, progress=progress)  # the critic: a stronger, independent audit
    audit["unlabelled_changes"] = strong.pop("unlabelled_changes")
    audit["strong"] = strong
    write_bytes_atomic(folder / REALISM_FILE, (json.dumps(audit, indent=1) + "\n").encode("utf-8"))
    if audit["n_real"] or audit["n_pasted"]:
        figures["realism"] = realism_figure(audit)

    html_text = _html(run, before, after, figures, site_pngs, skipped, channel, n_examples, seed,
                      time.perf_counter() - t0, audit)
    path = folder / REPORT_FILE
    write_bytes_atomic(path, html_text.encode("utf-8"))
    return path


def _step(text: str, progress: bool) -> None:
    """One line on stderr as a long step of the report starts."""
    if progress:
        print(f"{text} ...", file=sys.stderr, flush=True)


def label_rows(run: OutputRun) -> list[list]:
    """Per lesion label of a run with several: its load per case (median mm³) and its voxels in all, in the
    original cases (the bank) and in the synthetic ones (`achieved_by_label` of the manifest); no rows for a
    run with one lesion label."""
    if len(run.lesion_labels) <= 1:
        return []
    rows = []
    bank_cases = run.bank_index["cases"] if run.bank_index else []
    for v in run.lesion_labels:
        key = str(int(v))
        real = [c["load_by_label"][key] for c in bank_cases if key in c.get("load_by_label", {})]
        synthetic = [r["achieved_by_label"][key] for r in run.records if key in (r.get("achieved_by_label") or {})]
        rows.append([v, f"{np.median(real):,.0f}" if real else "–",
                     f"{np.median([s['mm3'] for s in synthetic]):,.0f}" if synthetic else "–",
                     f"{sum(s['voxels'] for s in synthetic):,}" if synthetic else "–"])
    return rows


def _label_html(run: OutputRun) -> list[str]:
    rows = label_rows(run)
    if not rows:
        return []
    counted = run.config.get("load_label")
    return ["<p>Per lesion label (a lesion is the connected whole of all of them and keeps its inner labels"
            + (f"; loads were counted on label {counted} only" if counted is not None else "") + "):</p>",
            _table(["label", "original load per case, median mm³", "synthetic load per case, median mm³",
                    "synthetic voxels in all"], rows)]


def _placement_html(run: OutputRun) -> list[str]:
    """Where lesions may go: the bank's common space (registration per case) and why pastes were refused."""
    parts = ['<h2 id="placement">Placement: common space and refused pastes</h2>']
    space = (run.bank_index or {}).get("space")
    if space is None:
        parts.append("<p>The bank records no common space (made before registration existed, or not found).</p>")
    elif space["mode"] != "register":
        parts.append(f"<p>Common space: <b>world coordinates</b> ({html.escape(space.get('why', ''))}).</p>")
    else:
        rows = [[c["case_id"], f"{c['registration']['foreground_overlap']:.3f}", f"{c['registration']['seconds']:.1f}",
                 c["registration"]["status"]] for c in run.bank_index["cases"]]
        parts.append(f"<p>Common space: every case <b>registered</b> (affine) to {html.escape(space['reference_name'])} "
                     f"({html.escape(space.get('why', ''))}); the likelihood map was built there and mapped into each "
                     f"case. Quality: overlap (Dice) of the registered foreground with the reference's; below "
                     f"{space.get('poor_overlap', 0.8)} a registration is called poor and build-bank stops.</p>")
        parts.append(_table(["case", "foreground overlap", "seconds", "status"], rows))
    refused = Counter()
    for rec in run.records:
        refused.update(rec.get("refused_placements") or {})
    pastes = [op for rec in run.records for op in rec["ops"] if op["op"] == "paste"]
    scores = [op["context_score"] for op in pastes if "context_score" in op]
    covered = [op["covered_match"] for op in pastes if "covered_match" in op]
    host = [op["host_match"] for op in pastes if "host_match" in op]
    tol = run.config.get("augment", {}).get("context_tolerance")
    if scores:
        parts.append(f"<p>Context match (tolerance {tol}): a paste is kept only where the destination's tissue "
                     "around it resembles the donor lesion's own surroundings in its source case (per channel, in "
                     "units of each case's intensity level) and the tissue it covers does too, also against the "
                     "main tissue right around it (the local host test, free of a bias field). Kept pastes:</p>")
        parts.append(_table(QUANTILE_HEADER, quantile_rows([("distance to the donor's surroundings", scores),
                                                            ("share of covered voxels that match",
                                                             covered or None),
                                                            ("share of covered voxels of the local host tissue",
                                                             host or None)])))
    sharp = sum(1 for rec in run.records if rec.get("sharp_donors") is False)
    if sharp:
        parts.append(f"<p>{sharp} cases had no donor sharp enough for their grid; all donors were used.</p>")
    if refused:
        total = sum(refused.values())
        parts.append(f"<p>{total} drawn pastes were refused ({len(pastes)} kept), by reason:</p>")
        parts.append(_table(["reason", "refused", "fraction"], [[k, v, f"{v / total:.0%}"] for k, v in
                                                             sorted(refused.items(), key=lambda kv: (-kv[1], kv[0]))]))
    return parts


#: The matched realism AUCs of the audit (its keys), in the order the report states them, with what each means.
MATCHED_AUCS = (
    ("volume_matched", "Volume-matched (real lesions weighted to the pasted lesions' sizes, so that features that "
                       "only follow lesion size do not count)"),
    ("case_matched", "Case-matched (each pasted lesion against the real lesions of the case it was pasted into: "
                     "same anatomy, grid and scanner)"),
    ("donor_matched", "Donor-matched (each pasted lesion against the real lesion it was cut from, in its own case, "
                      "so that a mix of lesion kinds drawn unlike the real pool does not count)"),
)


def _realism_html(audit: dict, figures: dict) -> list[str]:
    """The realism audit section: AUC, strongest features, real vs pasted table, histograms, tissue context."""
    from .audit import MEASURES, REPORTED, SHELL_VOXELS

    def iqr(s: dict) -> str:
        return f"{s['median']:.3g} [{s['q25']:.3g}–{s['q75']:.3g}]" if s["n"] else "–"

    auc_rows = []
    if audit["auc"] is not None:
        lo, hi = audit["auc_ci95"]
        verdict = (f"<b>Realism AUC {audit['auc']:.2f}</b> (95 % bootstrap interval {lo:.2f}–{hi:.2f}; "
                   f"{audit['n_real']} real and {audit['n_pasted']} pasted lesions).")
        auc_rows.append(["all pasted vs all real lesions", f"{audit['auc']:.2f}", f"{lo:.2f}–{hi:.2f}"])
        for key, what in MATCHED_AUCS:
            matched = audit.get(key) or {}
            if matched.get("auc") is not None:
                mlo, mhi = matched["auc_ci95"]
                auc_rows.append([what, f"{matched['auc']:.2f}", f"{mlo:.2f}–{mhi:.2f}"])
    else:
        verdict = f"<b>Realism AUC not computed</b>: {html.escape(audit['reason'] or '?')}."
    strongest = ", ".join(f"{s['feature']} ({s['auc']:.2f})" for s in audit["strongest"]) or "–"
    names = audit["channels"]
    keys = [f"{m}_{n}" for m in MEASURES + REPORTED for n in names] + ["volume_mm3"]
    rows = [[k, iqr(audit["summary"][k]["real"]), iqr(audit["summary"][k]["pasted"]),
             f"{audit['single_auc'][k]:.2f}" if k in audit["single_auc"] else "not classified"] for k in keys]
    context = "; ".join(f"{html.escape(n)} {c['real']:.3g} real vs {c['pasted']:.3g} pasted"
                        if c["real"] is not None and c["pasted"] is not None else f"{html.escape(n)} –"
                        for n, c in audit["context"].items())
    parts = [
        '<h2 id="realism">Realism audit</h2>',
        "<p>Can pasted lesions be told from the real lesions of this dataset? Each lesion (connected component) "
        "is described per channel by its <i>contrast</i> (lesion median / median of a "
        f"{SHELL_VOXELS}-voxel shell of surrounding non-lesion tissue), <i>spread</i> (lesion IQR / shell median) "
        "and <i>edge</i> (mean gradient magnitude per mm on the lesion's boundary / shell median). A logistic "
        "regression on these features, 5-fold cross-validated, gives the AUC: <b>0.5 = pasted lesions "
        "indistinguishable from real ones</b>, 1 = always told apart. Real lesions: the original cases; pasted: "
        "the synthetic labels' components that hold voxels not lesion in their base case (at most "
        f"{audit['max_lesions']} of each, drawn with seed {audit['seed']}; {audit['real_available']} real and "
        f"{audit['pasted_available']} pasted lesions recorded in all).</p>",
        f"<p>{verdict}</p>",
        *([_table(["comparison", "AUC", "95 % interval"], auc_rows)] if auc_rows else []),
        f"<p>Strongest single features (AUC alone, either direction): {html.escape(strongest)}.</p>",
        _table(["feature", "real: median [IQR]", "pasted: median [IQR]", "AUC alone"], rows),
        f"<p>Tissue context (shell median / the case's body median): {context}. Volume and context are not "
        "given to the classifier (the load target sets the volumes).</p>",
    ]
    if "realism" in figures:
        parts.append(_img_tag(figures["realism"], "realism audit: feature histograms real vs pasted"))
        parts.append('<p class="muted">Histograms: fraction of lesions per bin, real (grey) vs pasted (red); values '
                     "more than 3 IQR beyond the quartiles are counted in the end bins.</p>")
    parts += [f"<p>{html.escape(note)}</p>" for note in audit["notes"]]
    parts.append(f'<p class="muted">{REALISM_FILE} holds these numbers and every measured lesion; the audit took '
                 f"{audit['seconds']:.1f} s.</p>")
    return parts


#: Fewer real cases than this make the real-vs-real check too small to read (the page says so).
MIN_HONEST_CASES = 10


def _critic_html(audit: dict) -> list[str]:
    """The strong audit (`critic.strong_audit`): its AUCs and strongest families, band noise around pasted
    lesions, contrast left in inpainted regions, unlabelled changed voxels."""
    strong, changes = audit["strong"], audit.get("unlabelled_changes") or {}

    def auc_cells(result: dict) -> list:
        if not result or result.get("auc") is None:
            return [f"not computed: {(result or {}).get('reason') or '?'}", "–"]
        ci = result.get("auc_ci95")
        return [f"{result['auc']:.2f}", f"{ci[0]:.2f}–{ci[1]:.2f}" if ci else "–"]

    def top(result: dict) -> str:
        return ", ".join(f"{r['family']} ({r['auc_drop']:+.3f})" for r in (result.get("family_importance") or [])[:3]) \
            or "–"

    pasted, inpainted, honest = strong["pasted"], strong["inpainted"], strong["real_vs_real"]
    rows = [["pasted vs real lesions, all families", *auc_cells(pasted),
             f"{strong['n_pasted']} / {strong['n_real']}", top(pasted)],
            ["pasted vs real, appearance only (no shape, context)", *auc_cells(pasted.get("appearance")),
             f"{strong['n_pasted']} / {strong['n_real']}", "–"],
            ["real vs real (random halves of the real cases; ≈ 0.5 if honest)",
             f"{honest['auc']:.2f}" if honest.get("auc") is not None else f"not computed: {honest.get('reason')}",
             ", ".join(f"{a:.2f}" for a in honest.get("aucs", [])) or "–", f"{honest.get('n_cases', 0)} cases", "–"],
            ["inpainted regions vs healthy tissue of the same case", *auc_cells(inpainted),
             f"{strong['n_inpainted']} / {strong['n_controls']}", top(inpainted)]]
    paired = strong["band_noise"]["paired_output_over_base"]
    bands = [band for band in paired
             if any(s["median"] is not None for m in ("mad", "lap") for s in paired[band].get(m, {}).values())]
    channels = list(next(iter(paired.values()))["mad"]) if paired else []

    def median_cell(summary: dict | None) -> str:
        return "–" if not summary or summary.get("median") is None else f"{summary['median']:.2f}"

    band_rows = [[band, *(median_cell(paired[band].get(m, {}).get(ch)) for m in ("mad", "lap") for ch in channels)]
                 for band in bands]
    excess = ", ".join(f"{html.escape(ch)} {s['median']:.2f}" for ch, s in inpainted.get("residual_excess", {}).items()
                       if s["median"] is not None)
    few = honest.get("auc") is not None and honest.get("n_cases", 0) < MIN_HONEST_CASES
    parts = [
        '<h3 id="critic">Strong audit (critic)</h3>',
        "<p>An independent check the paste code was not tuned against: per lesion "
        f"{sum(strong['families'].values())} features in families ({', '.join(strong['families'])}), a gradient-"
        "boosted classifier cross-validated by host case (a pasted lesion counts with its base case), its AUC with a "
        "95 % interval by bootstrap over host cases, and the families whose permutation costs the AUC most.</p>",
        _table(["comparison", "AUC", "95 % interval", "n (positive / negative)", "strongest families (AUC drop)"],
               rows),
    ]
    if few:
        parts.append(f"<p>The real-vs-real check splits only {honest['n_cases']} real cases (fewer than "
                     f"{MIN_HONEST_CASES}): its AUC is not a fair test of the classifier's honesty here.</p>")
    if band_rows:
        parts.append("<p>Noise around pasted lesions, output / base case on the same voxels, by distance from the "
                     "lesion's surface (MAD of the local residual and Laplacian energy, median over pasted lesions; "
                     "1 = unchanged):</p>")
        parts.append(_table(["distance", *(f"{name} {html.escape(ch)}" for name in ("MAD", "Laplacian")
                                           for ch in channels)], band_rows))
    if excess:
        parts.append(f"<p>Contrast left behind in inpainted regions (0 = filled to the tissue's level, "
                     f"1 = untouched), median: {excess}.</p>")
    if changes:
        totals = changes["totals"]
        parts.append(
            f"<p>Unlabelled changed voxels (moved by more than {changes['threshold_sd']:g} local noise sd from the "
            f"base case, not lesion in the output): {totals['near_paste']} within {changes['feather_mm']:g} mm of a "
            f"pasted lesion, {totals['elsewhere']} elsewhere ({totals['near_inpaint']} more near inpainted "
            "lesions). Most affected cases:</p>")
        parts.append(_table(["case", "base", "near a paste", "elsewhere", "near an inpaint", "unlabelled mm³"],
                            [[c["case_id"], c["base_case"], c["near_paste"], c["elsewhere"], c["near_inpaint"],
                              c["unlabelled_mm3"]] for c in changes["worst"]]))
    parts += [f"<p>{html.escape(note)}</p>" for note in strong.get("notes", [])]
    parts.append(f'<p class="muted">{REALISM_FILE} holds these numbers under "strong" and "unlabelled_changes"; '
                 f"the strong audit took {strong['seconds']:.1f} s.</p>")
    return parts


def _html(run: OutputRun, before, after, figures, site_pngs, skipped, channel, n_examples, seed, seconds,
          audit: dict | None = None) -> str:
    recs = run.records
    n = len(recs)
    ok = sum(run.within(r) for r in recs)
    tols = sorted({run.tolerance(r) for r in recs})
    tol_text = "/".join(f"±{t:.0%}" for t in tols)
    cfg = run.config
    families = Counter(r.get("load_family", cfg.get("load", "?")) for r in recs)
    target = [r["target_load_mm3"] for r in recs]
    achieved = [r["achieved_load_mm3"] for r in recs]
    added = sum(int(r.get("lesions_added", 0)) for r in recs)
    removed = sum(int(r.get("lesions_removed", 0)) for r in recs)
    fallback = sum(1 for r in recs if r.get("placement_fallback"))
    title = f"lesionsynth QC report — {run.out.name}"
    bank_text = (f"{run.bank_dir} ({len(run.bank_index['cases'])} cases, {len(run.bank_index['lesions'])} lesions)"
                 if run.bank_index else f"{run.bank_dir} (not found: pictures use the originals in the output)")
    expected_n = cfg.get("n")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
        _table(None, run_rows(run)),
        '<h2 id="summary">Summary</h2>',
        _table(None, [
            ["output", str(run.out)],
            ["bank", bank_text],
            ["synthetic cases", f"{n}" + (f" of {expected_n} configured (unfinished run?)"
                                          if isinstance(expected_n, int) and expected_n != n else "")],
            ["load family", ", ".join(f"{k} ({v})" for k, v in families.items())],
            ["mode / seed", f"{cfg.get('mode', '?')} / {cfg.get('seed', '?')}"],
            ["lesions added / removed", f"{added} / {removed}"],
            ["placement fell back to the region alone", f"{fallback} cases"],
        ]),
        f"<p><b>{ok} of {n} cases ({ok / n:.0%}) reached their target load within {tol_text}.</b></p>",
        '<h2 id="load">Lesion load: target vs achieved</h2>',
        "<p>Left: distribution of the drawn target loads and of the achieved loads (measured on the written "
        "labels)" + (", with the original cases' loads in grey" if run.bank_index else "") + ". Right: achieved "
        f"against target per case; the shaded band is the {tol_text} tolerance and the line is achieved = target."
        "</p>",
        _table(QUANTILE_HEADER, quantile_rows([("target load (mm³)", target), ("achieved load (mm³)", achieved)]
                                              + ([("original cases' load (mm³)",
                                                   [c["load_mm3"] for c in run.bank_index["cases"]])]
                                                 if run.bank_index else []))),
        _img_tag(figures["loads"], "target vs achieved load"),
        '<h2 id="cases">Cases</h2>',
        "<p>One row per synthetic case; click a column's header to sort by it. pasted / inpainted: lesions added "
        "and removed; failed: pastes drawn and refused.</p>",
        _sortable_table(["case", "base", "target mm³", "achieved mm³", "achieved / target", "within tolerance",
                         "pasted", "inpainted", "failed", "stop reason"], case_rows(run)[:MAX_CASE_ROWS]),
        *([f'<p class="muted">The first {MAX_CASE_ROWS} of {n} cases; manifest.jsonl holds them all.</p>']
          if n > MAX_CASE_ROWS else []),
        '<h2 id="lesions">Lesion count and size</h2>',
        "<p>Lesions are connected components "
        f"({run.connectivity}-connectivity, ≥ {run.min_volume_mm3:g} mm³, label(s) {list(run.lesion_labels)}). "
        f"Original: {html.escape(before.source) if before else 'not available'}; synthetic: {after.source}.</p>",
        _table(QUANTILE_HEADER, quantile_rows([("lesions per case, original", before.counts if before else None),
                                               ("lesions per case, synthetic", after.counts),
                                               ("lesion volume (mm³), original", before.volumes if before else None),
                                               ("lesion volume (mm³), synthetic", after.volumes)])),
        _img_tag(figures["lesions"], "lesion count and size distributions"),
        *_label_html(run),
        *_placement_html(run),
        *(_realism_html(audit, figures) if audit else []),
        *(_critic_html(audit) if audit and "strong" in audit else []),
        '<h2 id="examples">Example sites</h2>',
    ]
    if site_pngs:
        chan = run.channel_names[channel] if channel < len(run.channel_names) else str(channel)
        parts.append(
            f"<p>{len({s.record['case_id'] for s, _ in site_pngs})} cases drawn at random (seed {seed}, up to "
            f"{n_examples}), one pasted and one inpainted site each where the case has them. Every channel, "
            f"<b>{html.escape(chan)}</b> first (where the bank's lesions contrast most with their surroundings); "
            "window: 1st–99th percentile of the base image. Rows: base case, synthetic case (both zoomed on the "
            "site), and the synthetic case's full slice with a box marking the zoom (left out when the zoom already "
            "shows the whole slice). Slices are in the closest RAS "
            "orientation with true voxel proportions (neurological view: patient's right on the right). "
            f"<b>The lesion of the operation</b>: magenta = pasted (dashed on the base case: where it goes), cyan = "
            "inpainted (dashed on the synthetic case: where it was); yellow = the other lesions; thin green = other "
            "labels (organ / region), when the labels have any; dotted cyan box = the zoom window.</p>")
        for site, pngs in site_pngs:
            images = "".join(f'<div>{_img_tag(png, site_title(site, run, c))}</div>' for c, png in pngs)
            chans = ", ".join(run.channel_names[c] if c < len(run.channel_names) else str(c) for c, _ in pngs)
            parts.append(f'<figure><div class="channels">{images}</div>'
                         f"<figcaption>{site_caption(site, run)} Channels: {html.escape(chans)}.</figcaption>"
                         "</figure>")
    elif not skipped:
        parts.append("<p>No case has a paste or inpaint operation: nothing to draw.</p>")
    for note in skipped:
        parts.append(f"<p>Not drawn: {html.escape(note)}</p>")
    reasons = Counter(r.get("stop_reason", "?") for r in recs)
    parts += [
        '<h2 id="stop">Stop reasons</h2>',
        _table(["stop reason", "cases", "fraction"],
               [[k, v, f"{v / n:.0%}"] for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))]),
        '<h2 id="config">Configuration</h2>',
        f"<details><summary>The run's configuration (run.json; {len(config_rows(cfg))} settings)</summary>"
        + _table(["setting", "value"], config_rows(cfg)) + "</details>",
        f'<p class="muted">Made by lesionsynth report in {seconds:.1f} s.</p>',
        f"<script>{SORT_JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
