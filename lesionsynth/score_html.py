"""score.html of `lesionsynth score`: one self-contained page (inline SVG curves, the worst cases' overlays as
embedded PNGs, a few lines of script to sort the case table) with the headline numbers, each main metric against
every factor's levels (their values on the x-axis) with its 95 % interval band and a warning for strata of few
cases, lesion recall against truth lesion size, the worst cases, the strata table, the per-case table and how the
numbers were made."""

from __future__ import annotations

import base64
import html
import math
import re

#: The curves drawn for every factor: (metric, title, kind) — kind "ratio" is drawn on [0, 1].
CURVES = (("dice", "Dice", "ratio"), ("lesion_recall", "Lesion recall", "ratio"),
          ("lesion_precision", "Lesion precision", "ratio"), ("lesion_f1", "Lesion F1", "ratio"),
          ("rel_volume_diff", "Volume difference (rel.)", "relative"))
#: Columns of the case table: (key, header, kind).
CASE_COLUMNS = (("dice", "Dice", "ratio"), ("lesion_f1", "lesion F1", "ratio"),
                ("lesion_recall", "lesion recall", "ratio"), ("lesion_precision", "lesion precision", "ratio"),
                ("lesion_dice", "lesion Dice", "ratio"), ("lesion_tp", "TP", "count"), ("lesion_fp", "FP", "count"),
                ("lesion_fn", "FN", "count"), ("truth_lesions", "truth lesions", "count"),
                ("pred_lesions", "pred. lesions", "count"), ("truth_load_mm3", "truth load mm³", "volume"),
                ("pred_load_mm3", "pred. load mm³", "volume"), ("volume_diff_mm3", "volume diff. mm³", "volume"),
                ("rel_volume_diff", "rel. volume diff.", "relative"))
#: How the factors are named on the page: those that bin a truth without strata.csv, and a test set's (whose
#: levels are shown by the median value measured on their cases, strata.csv's `value`).
FACTOR_TITLES = {"truth_load": "truth lesion load (mm³)", "median_lesion_size": "median truth lesion volume (mm³)",
                 "load": "lesion load (mm³)", "size": "median lesion volume (mm³)",
                 "contrast": "pasted lesion contrast (× the real lesions')",
                 "noise": "noise (sd, × the case's own)"}
#: Strata with fewer cases than this are named in a warning: their means and intervals are not reliable.
SMALL_STRATUM = 5
#: One colour per factor (the first factor takes the first).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.1em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.8em}h3{font-size:1.05em;margin:1.2em 0 .3em}
.sub{color:#555;margin-top:0}.muted{color:#666;font-size:.9em}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em .9em;min-width:150px;background:#fafafa}
.card .v{font-size:1.6em;font-weight:600}.card .k{color:#555;font-size:.9em}.card .ci{color:#666;font-size:.85em}
.panels{display:flex;flex-wrap:wrap;gap:.4em}svg text{font-family:inherit}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.2em .5em;
text-align:left}th{background:#f3f3f3;position:sticky;top:0}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:hover{background:#e6e6e6}
.scroll{max-height:36em;overflow:auto;border:1px solid #eee}.scroll table{margin:0}
.warn{background:#fff4e0;border-left:4px solid #f0a030;padding:.3em .7em}
.pictures{display:flex;flex-wrap:wrap;gap:.8em}.pictures figure{margin:0}
"""

#: Sorts every `table.sortable` by the clicked column (cells' data-v: numbers numerically, else as text).
SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var up = th.dataset.dir !== 'up'; th.dataset.dir = up ? 'up' : 'down';
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def fmt(value, kind: str) -> str:
    """A metric value as the page shows it."""
    if not _finite(value):
        return "–"
    if kind == "ratio":
        return f"{value:.3f}"
    if kind == "relative":
        return f"{value * 100:+.1f} %"
    if kind == "count":
        return f"{value:.3g}" if value != int(value) else f"{int(value)}"
    return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.3g}"


def _ci_text(stats: dict, kind: str) -> str:
    lo, hi = stats["ci95"]
    return f"{fmt(lo, kind)} – {fmt(hi, kind)}" if _finite(lo) and _finite(hi) else "–"


def _shade(value, kind: str) -> str:
    """Background of a table cell: red (0) to green (1) for ratios, white (0) to orange (±50 %) for relative."""
    if not _finite(value):
        return ""
    if kind == "ratio":
        return f' style="background:hsl({120 * min(max(value, 0.0), 1.0):.0f},65%,86%)"'
    if kind == "relative":
        strength = min(abs(value) / 0.5, 1.0)
        return f' style="background:hsl({30 if value > 0 else 200},80%,{100 - 16 * strength:.0f}%)"'
    return ""


def level_label(level: str, value) -> str:
    """A level as its x-axis tick: a test set's level index by its measured value (strata.csv `value`), a
    volume bin or a named level by itself (`short_level`)."""
    if re.fullmatch(r"\d+", level) and _finite(value):
        return _short_value(value)
    return short_level(level)


def _short_value(value: float) -> str:
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def short_level(level: str) -> str:
    """A level as a tick label: volume bins 'LOW-HIGH' in k (thousands) and M (millions), others cut at 14."""
    match = re.fullmatch(r"([0-9.]+)-([0-9.]+)", level)
    if match:
        def short(text: str) -> str:
            value = float(text)
            for size, suffix in ((1e6, "M"), (1e3, "k")):
                if value >= size:
                    return f"{value / size:g}{suffix}"
            return f"{value:g}"

        return f"{short(match.group(1))}–{short(match.group(2))}"
    return level if len(level) <= 14 else level[:13] + "…"


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def curve_svg(title: str, kind: str, factor: str, levels: list[str], stats: list[dict], overall: dict,
              colour: str, labels: list[str] | None = None, width: int = 232) -> str:
    """One panel: the metric's mean per level of `factor` (points and line) with its 95 % interval band, and the
    mean over all cases as a dashed line. `stats` holds {mean, ci95, n} per level; `labels`: the x-axis ticks
    (default: the levels, shortened); a level of fewer than SMALL_STRATUM cases is drawn hollow; `width` in px."""
    height = 200
    left, right, top, bottom = 44, 10, 24, 56
    means = [s["mean"] for s in stats]
    lows = [s["ci95"][0] for s in stats]
    highs = [s["ci95"][1] for s in stats]
    if kind == "ratio":
        y_lo, y_hi = 0.0, 1.0
    else:
        seen = [v for v in means + lows + highs + [overall.get("mean"), 0.0] if _finite(v)]
        y_lo, y_hi = min(seen), max(seen)
        pad = (y_hi - y_lo) * 0.08 or 0.1
        y_lo, y_hi = y_lo - pad, y_hi + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def x_at(i: int) -> float:
        return left + plot_w / 2 if len(levels) == 1 else left + 10 + i * (plot_w - 20) / (len(levels) - 1)

    def y_at(v: float) -> float:
        return top + plot_h * (1 - (v - y_lo) / (y_hi - y_lo))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)} by {html.escape(factor)}" '
             f'font-family="Helvetica, Arial, sans-serif">',
             f'<text x="{left}" y="15" font-size="12" font-weight="600">{html.escape(title)}</text>',
             f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" font-size="10" text-anchor="middle" '
             f'fill="#555">{html.escape(FACTOR_TITLES.get(factor, factor))}</text>']
    ticks = _nice_ticks(y_lo, y_hi)
    # as many decimals as the tick step needs: a range within ±1 % must not read "+0%, -0%, -0%"
    step = (ticks[1] - ticks[0]) * 100 if len(ticks) > 1 else 1.0
    decimals = next((d for d in range(4) if abs(round(step, d) - step) < 1e-9 * max(step, 1.0)), 3)
    for t in ticks:
        y = y_at(t)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        label = f"{t * 100 + 0.0:+.{decimals}f}%" if kind == "relative" else f"{t:g}"
        parts.append(f'<text x="{left - 4}" y="{y + 3.5:.1f}" font-size="10" text-anchor="end" '
                     f'fill="#555">{label}</text>')
    if kind == "relative" and y_lo < 0 < y_hi:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y_at(0):.1f}" y2="{y_at(0):.1f}" stroke="#999"/>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>')
    if _finite(overall.get("mean")):
        y = y_at(overall["mean"])
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#777" '
                     f'stroke-dasharray="4 3"><title>all cases: {fmt(overall["mean"], kind)}</title></line>')
    # band and line, broken where a level has no value
    segments, current = [], []
    for i, (m, lo, hi) in enumerate(zip(means, lows, highs)):
        if _finite(m) and _finite(lo) and _finite(hi):
            current.append((x_at(i), m, lo, hi))
        elif current:
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    for seg in segments:
        if len(seg) > 1:
            outline = [f"{x:.1f},{y_at(hi):.1f}" for x, _, _, hi in seg] + \
                      [f"{x:.1f},{y_at(lo):.1f}" for x, _, lo, _ in reversed(seg)]
            parts.append(f'<polygon points="{" ".join(outline)}" fill="{colour}" fill-opacity="0.16" stroke="none"/>')
            parts.append(f'<polyline points="{" ".join(f"{x:.1f},{y_at(m):.1f}" for x, m, _, _ in seg)}" '
                         f'fill="none" stroke="{colour}" stroke-width="2"/>')
    labels = labels or [short_level(lv) for lv in levels]
    rotated = len(levels) > 4 or max(len(lv) for lv in labels) > 6
    for i, (level, s) in enumerate(zip(levels, stats)):
        x = x_at(i)
        if _finite(s["ci95"][0]) and _finite(s["ci95"][1]):
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y_at(s["ci95"][0]):.1f}" y2="{y_at(s["ci95"][1]):.1f}" '
                         f'stroke="{colour}" stroke-opacity="0.6"/>')
        if _finite(s["mean"]):
            tip = f"{level}: {fmt(s['mean'], kind)} (95 % CI {_ci_text(s, kind)}; n = {s['n']})"
            fill = "white" if s["n"] < SMALL_STRATUM else colour  # hollow: too few cases to trust
            parts.append(f'<circle cx="{x:.1f}" cy="{y_at(s["mean"]):.1f}" r="3.5" fill="{fill}" stroke="{colour}" '
                         f'stroke-width="1.5"><title>{html.escape(tip)}</title></circle>')
        label = html.escape(labels[i])
        if rotated:
            parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 12}" font-size="10" text-anchor="end" fill="#333" '
                         f'transform="rotate(-35 {x:.1f} {top + plot_h + 12})">{label}</text>')
        else:
            parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 13}" font-size="10" text-anchor="middle" '
                         f'fill="#333">{label}</text>')
            parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 25}" font-size="9" text-anchor="middle" '
                         f'fill="#888">n={s["n"]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _cards(summary: dict) -> str:
    overall = summary["overall"]
    cards = []
    for key, title, kind in CURVES + (("lesion_dice", "Lesion Dice", "ratio"),):
        s = overall[key]
        cards.append(f'<div class="card"><div class="k">{html.escape(title)}</div><div class="v">{fmt(s["mean"], kind)}'
                     f'</div><div class="ci">95 % CI {_ci_text(s, kind)}</div></div>')
    tp, fp, fn = (overall[k]["mean"] for k in ("lesion_tp", "lesion_fp", "lesion_fn"))
    cards.append(f'<div class="card"><div class="k">Lesions per case: TP / FP / FN</div><div class="v">'
                 f'{fmt(tp, "count")} / {fmt(fp, "count")} / {fmt(fn, "count")}</div>'
                 f'<div class="ci">means over {summary["n_cases"]} cases</div></div>')
    return '<div class="cards">' + "".join(cards) + "</div>"


def _factor_panels(summary: dict) -> list[str]:
    parts = []
    factors: dict[str, list[dict]] = {}
    for s in summary["strata"]:
        factors.setdefault(s["factor"], []).append(s)
    for k, (factor, strata) in enumerate(factors.items()):
        colour = PALETTE[k % len(PALETTE)]
        levels = [s["level"] for s in strata]
        labels = [level_label(s["level"], s.get("value")) for s in strata]
        counts = ", ".join(f"{html.escape(s['level'])} ({html.escape(label)}): {s['n']}"
                           if label != short_level(s["level"]) else f"{html.escape(s['level'])}: {s['n']}"
                           for s, label in zip(strata, labels))
        name = html.escape(FACTOR_TITLES.get(factor, factor))
        parts.append(f'<h3><span style="color:{colour}">■</span> {name}</h3>'
                     f'<p class="muted">cases per level: {counts}</p>')
        parts += small_strata_warning(strata)
        parts.append('<div class="panels">')
        for key, title, kind in CURVES:
            parts.append(curve_svg(title, kind, factor, levels, [s["metrics"][key] for s in strata],
                                   summary["overall"][key], colour, labels))
        parts.append("</div>")
    return parts


def small_strata_warning(strata: list[dict], unit: str = "case") -> list[str]:
    """A warning paragraph naming the strata of fewer than SMALL_STRATUM `unit`s (cases, or lesions for the
    recall by size; none if there is no such)."""
    small = [s for s in strata if s["n"] < SMALL_STRATUM]
    if not small:
        return []
    names = ", ".join(f"{s['factor']}={s['level']} ({s['n']} {unit}{'s' if s['n'] != 1 else ''})" for s in small)
    return [f'<p class="warn"><b>warning:</b> fewer than {SMALL_STRATUM} {unit}s in {html.escape(names)}: their '
            "means are unreliable and their intervals too narrow to trust (hollow points).</p>"]


def size_recall_html(recall: list[dict]) -> list[str]:
    """Lesion recall against truth lesion size: a curve over the half-decade volume bins, with Wilson intervals."""
    if not recall:
        return ["<p>No truth lesion: no recall against lesion size.</p>"]
    stats = [{"mean": r["recall"], "ci95": r["ci95"], "n": r["n"]} for r in recall]
    total = sum(r["n"] for r in recall)
    overall = {"mean": sum(r["detected"] for r in recall) / total}
    return ["<p>Every truth lesion of every case, binned by its volume (half-decade bins, mm³): the share that a "
            "predicted component matched, with its 95 % Wilson interval; dashed: all lesions together. Small "
            "lesions are where models miss most.</p>",
            '<div class="panels">',
            curve_svg("Lesion recall", "ratio", "truth lesion volume (mm³)", [r["level"] for r in recall], stats,
                      overall, PALETTE[0], width=max(232, 80 + 42 * len(recall))),  # room for every bin's label
            "</div>", *small_strata_warning([{"factor": "lesion volume", "level": r["level"], "n": r["n"]}
                                             for r in recall], unit="lesion")]


def worst_cases_html(pictures: list[dict]) -> list[str]:
    """The overlays of the worst cases (lowest Dice), embedded."""
    if not pictures:
        return ["<p>No overlays (no case with lesions, or matplotlib is not installed).</p>"]
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(p["png"]).decode("ascii")}" '
        f'alt="{html.escape(p["case_id"])}: found, missed and false-positive voxels"><figcaption>'
        f'{html.escape(p["case_id"])} (Dice {p["dice"]:.3f})</figcaption></figure>' for p in pictures)
    return ["<p>The cases of lowest Dice, each on the slice with most wrong voxels: green = truth lesion voxels the "
            "prediction found, orange = missed truth voxels, pink = false-positive voxels (on the case's first "
            "image channel where the truth folder has one, else on black).</p>",
            f'<div class="pictures">{figures}</div>']


def _strata_table(summary: dict) -> str:
    shown = CURVES + (("lesion_dice", "Lesion Dice", "ratio"), ("lesion_fp", "FP per case", "count"),
                      ("truth_load_mm3", "truth load mm³", "volume"))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["factor", "level", "n", *(t for _, t, _ in shown)])
    rows = []
    for s in [{"factor": "all", "level": "all", "n": summary["n_cases"], "metrics": summary["overall"]},
              *summary["strata"]]:
        cells = [f"<td>{html.escape(s['factor'])}</td><td>{html.escape(s['level'])}</td><td class=\"n\">{s['n']}</td>"]
        for key, _, kind in shown:
            m = s["metrics"][key]
            cells.append(f'<td class="n"{_shade(m["mean"], kind)}>{fmt(m["mean"], kind)}<br>'
                         f'<span class="muted">{_ci_text(m, kind)}</span></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _case_table(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["case", "stratum", *(h for _, h, _ in CASE_COLUMNS)])
    body = []
    for row in rows:
        stratum = "; ".join(f"{f}={lv}" for f, lv, _ in row["strata"])
        cells = [f'<td data-v="{html.escape(row["case_id"])}">{html.escape(row["case_id"])}</td>',
                 f'<td data-v="{html.escape(stratum)}">{html.escape(stratum)}</td>']
        for key, _, kind in CASE_COLUMNS:
            value = row[key]
            raw = f"{value:.10g}" if _finite(value) else ""
            cells.append(f'<td class="n" data-v="{raw}"{_shade(value, kind)}>{fmt(value, kind)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def score_html(rows: list[dict], summary: dict, pictures: list[dict] = ()) -> str:
    """The whole page."""
    settings = summary["settings"]
    boot = settings["bootstrap"]
    title = "lesionsynth score"
    threshold = settings["iou_threshold"]
    rule = ("any overlap (≥ 1 voxel)" if threshold == 0 else f"IoU ≥ {threshold:g}")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{title}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{title}</h1>",
        f'<p class="sub">predictions <b>{html.escape(summary["pred"])}</b> against truth '
        f'<b>{html.escape(summary["truth"])}</b> ({html.escape(summary["truth_kind"])}, '
        f'{summary["n_cases"]} cases)</p>',
        _cards(summary),
        f'<p class="muted">Means over cases with 95 % bootstrap intervals ({boot["resamples"]} resamples of the cases, '
        f'seed {boot["seed"]}). A lesion counts as detected on {rule} with a predicted component, matched one to one '
        f'({settings["connectivity"]}-connectivity).</p>',
    ]
    parts += [f"<p><b>warning:</b> {html.escape(w)}</p>" for w in summary.get("warnings", [])]
    parts.append('<h2 id="strata">Against the strata</h2>')
    if summary["strata"]:
        parts.append("<p>Each row is one factor; each panel one metric: the mean of its cases per level (points and "
                     "line), the 95 % bootstrap interval (band and bars), and the mean over all cases (dashed). "
                     "Hover a point for its numbers. " + html.escape(
                         "Strata: " + settings["strata"]) + ".</p>")
        parts += _factor_panels(summary)
    else:
        parts.append("<p>No strata.</p>")
    parts += ['<h2 id="size-recall">Recall against truth lesion size</h2>',
              *size_recall_html(summary.get("recall_by_lesion_size", [])),
              '<h2 id="worst">Worst cases</h2>', *worst_cases_html(list(pictures)),
              '<h2 id="strata-table">Strata table</h2>', "<p>Mean and 95 % interval per stratum (strata.csv).</p>",
              _strata_table(summary),
              '<h2 id="cases">Cases</h2>',
              "<p>One row per case (cases.csv); click a column's header to sort by it.</p>",
              _case_table(rows),
              '<h2 id="method">How the numbers are made</h2>',
              "<ul>",
              f"<li><b>Lesions</b>: connected components ({settings['connectivity']}-connectivity) of the lesion "
              f"voxels (label(s): {html.escape(str(settings['lesion_labels']))}; the truth's label set: "
              f"{html.escape(str(settings['label_set']))}).</li>",
              f"<li><b>Matching</b> (IoU threshold {threshold:g}): {html.escape(settings['overlap_rule'])}. "
              f"Reference: {html.escape(settings['reference_implementation'])}.</li>",
              "<li><b>Dice</b>: over all lesion voxels of the case. <b>Lesion Dice</b>: mean Dice of the matched "
              "lesion pairs. <b>Lesion F1</b> = 2 TP / (truth lesions + predicted lesions). <b>Volume difference</b> = "
              "predicted − truth load (mm³, from the voxel volume of the truth's affine); relative: divided by the "
              "truth load.</li>",
              f"<li><b>Empty cases</b>: {html.escape(settings['convention'])}.</li>",
              f"<li><b>Intervals</b>: percentile bootstrap over cases, {boot['resamples']} resamples, seed "
              f"{boot['seed']} (reproducible; each stratum draws from its own stream).</li>",
              "</ul>",
              f"<script>{SORT_JS}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"
