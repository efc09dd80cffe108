"""`lesionsynth inspect PATH`: a one-screen plain-text summary of a dataset, a lesion bank or a generate output.

The kind is told from the files present: `bank.json` → bank; `run.json` + `manifest.jsonl` → output;
`dataset.json` (nnU-Net v2 or MSD), a CSV case list, or a CSV/JSON list file → dataset. Anything else is an
InputError. Only headers, indexes and (for small datasets) label volumes are read, never images.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import InputError

MAX_LINES = 40
#: Datasets with at most this many cases get their labels read for lesion counts and loads.
LABEL_SCAN_LIMIT = 60
LESION_WORDS = ("lesion", "tumor", "tumour", "metast", "wmh", "nodule", "cancer", "infarct", "stroke", "ms",
                # tumour sub-regions (BraTS: necrotic core, oedema, enhancing; NCR, ED, ET, NET)
                "necro", "edema", "oedema", "enhanc", "ncr", "ed", "et", "net")
#: Lesion words that count as whole words only (as substrings they are in too many names).
WHOLE_WORDS = ("ms", "ncr", "ed", "et", "net")


def summarize(path: str | Path, data_root: str | Path | None = None, bank: str | Path | None = None) -> str:
    """One-screen (≤ 40 lines) summary of a dataset folder or list, a bank folder or an output folder; a bank's
    cases (an output's bank's) looked for under `data_root` if given; an output's bank at `bank` if given."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "bank.json").is_file():
        lines = _bank(path, data_root)
    elif path.is_dir() and (path / "run.json").is_file() and (path / "manifest.jsonl").is_file():
        lines = _output(path, data_root, bank)
    elif (path.is_dir() and ((path / "dataset.json").is_file() or len(list(path.glob("*.csv"))) == 1)) or \
            (path.is_file() and path.suffix.lower() in (".csv", ".json")):
        lines = _dataset(path)
    else:
        raise InputError(f"{path}: not a dataset (dataset.json or CSV list), a lesion bank (bank.json) or a "
                         "lesionsynth output (run.json + manifest.jsonl)")
    return _fit(lines)


def _fit(lines: list[str]) -> str:
    if len(lines) > MAX_LINES:
        lines = lines[: MAX_LINES - 1] + [f"… ({len(lines) - MAX_LINES + 1} more lines)"]
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------------------------ helpers

def _num(x: float) -> str:
    """Compact number: 3 significant digits, no exponent below a million."""
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e6 or abs(x) < 1e-2:
        return f"{x:.3g}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _range(values, unit: str = "") -> str:
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return "–"
    u = f" {unit}" if unit else ""
    return f"{_num(v.min())} / {_num(np.median(v))} / {_num(v.max())}{u}  (min / median / max)"


def _quantiles(values, unit: str = "") -> str:
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return "–"
    q = np.percentile(v, [0, 10, 50, 90, 100])
    u = f" {unit}" if unit else ""
    return " / ".join(_num(x) for x in q) + u + "  (min / p10 / median / p90 / max)"


def _labels_text(labels: dict) -> str:
    items = sorted(labels.items(), key=lambda kv: kv[1])
    text = ", ".join(f"{v}={k}" for k, v in items)
    return text if len(text) <= 90 else text[:87] + "…"


def _vec(v, nd: int = 3) -> str:
    return "×".join(f"{float(x):.{nd}g}" for x in v)


def _shape_range(shapes) -> str:
    shapes = [tuple(int(x) for x in s) for s in shapes]
    if not shapes:
        return "–"
    lo, hi = np.min(shapes, axis=0), np.max(shapes, axis=0)
    return _vec(lo, 6) if (lo == hi).all() else f"{_vec(lo, 6)} … {_vec(hi, 6)}"


def _spacing_range(spacings) -> str:
    if not spacings:
        return "–"
    sp = np.asarray(spacings, dtype=np.float64)
    lo, hi = sp.min(axis=0), sp.max(axis=0)
    return (f"{_vec(lo)} mm" if np.allclose(lo, hi, rtol=1e-3) else f"{_vec(lo)} … {_vec(hi)} mm")


def _guess_lesion_labels(labels: dict) -> tuple[tuple[int, ...], str]:
    """Lesion label values from label names, else 1 (the default of build-bank --lesion-label)."""
    found = tuple(sorted(int(v) for k, v in labels.items() if int(v) != 0 and
                         any(w in str(k).lower().replace("_", " ").replace("-", " ").split() or
                             (w not in WHOLE_WORDS and w in str(k).lower()) for w in LESION_WORDS)))
    if found:
        return found, "from label names"
    return (1,), "default --lesion-label"


# ------------------------------------------------------------------------------------------------ dataset

def _dataset(path: Path) -> list[str]:
    from .io import image_info, open_dataset
    from .io.nifti import voxel_spacing

    spec = open_dataset(path)
    kind = {"nnunet": "nnU-Net v2 raw", "msd": "Medical Segmentation Decathlon", "list": "case list"}.get(
        spec.kind, spec.kind)
    lines = [f"dataset  {path}", f"format   {kind}",
             f"channels {len(spec.channel_names)}: {', '.join(spec.channel_names)}",
             f"labels   {_labels_text(spec.labels) if spec.labels else '(not declared)'}",
             f"cases    {len(spec.cases)}" + (f"  ({len(spec.problems)} problem(s))" if spec.problems else "")]
    for p in spec.problems[:3]:
        lines.append(f"  ! {p if len(p) <= 110 else p[:107] + '…'}")
    if len(spec.problems) > 3:
        lines.append(f"  ! … and {len(spec.problems) - 3} more")
    shapes, spacings, dtypes = [], [], Counter()
    for ref in spec.cases:
        try:
            shape, affine, dtype = image_info(ref.label_path)
        except InputError:  # unreadable files are reported by build-bank / check
            continue
        shapes.append(shape[:3])
        spacings.append(tuple(voxel_spacing(affine)))
        dtypes[str(dtype)] += 1
    lines += [f"shape    {_shape_range(shapes)}", f"spacing  {_spacing_range(spacings)}"]
    if spec.cases and len(spec.cases) <= LABEL_SCAN_LIMIT:
        lesion_labels, why = _guess_lesion_labels(spec.labels)
        counts, loads, vols, by_label = _scan_labels(spec.cases, lesion_labels)
        lines += [f"lesions  label(s) {list(lesion_labels)} ({why}); 26-connected components",
                  f"  per case     {_range(counts)}; {sum(counts)} in all",
                  f"  load         {_range(loads, 'mm³')}",
                  f"  lesion size  {_quantiles(vols, 'mm³')}"]
        if len(lesion_labels) > 1:
            lines += _label_lines(by_label)
    elif spec.cases:
        lines.append(f"lesions  not counted ({len(spec.cases)} cases > {LABEL_SCAN_LIMIT}): "
                     "build a bank for per-lesion numbers")
    return lines


def _label_lines(by_label: dict) -> list[str]:
    """One line per lesion label: its load per case (mm³ and voxels)."""
    return [f"  label {v:<6} {_range([mm3 for mm3, _ in per_case], 'mm³')}; "
            f"{sum(n for _, n in per_case):,} voxels in all" for v, per_case in by_label.items()]


def _scan_labels(cases, lesion_labels) -> tuple[list[int], list[float], list[float], dict]:
    """Per case its lesion count and load, every lesion's volume, and per lesion label value its
    (mm³, voxels) per case."""
    from .io.images import load_image
    from .labels import count_in
    from .output_run import component_volumes

    counts, loads, vols = [], [], []
    by_label: dict = {int(v): [] for v in lesion_labels}
    for ref in cases:
        try:
            img = load_image(ref.label_path)
            data = np.asanyarray(img.dataobj)
        except Exception:
            continue
        if data.dtype.kind == "f":
            data = np.rint(data)
        data = data.reshape(img.shape[:3])
        v = component_volumes(data, img.affine, lesion_labels)
        counts.append(len(v))
        loads.append(float(v.sum()))
        vols.extend(v.tolist())
        voxel_mm3 = float(abs(np.linalg.det(np.asarray(img.affine)[:3, :3])))
        for value, per_case in by_label.items():
            n = count_in(data, (value,))
            per_case.append((n * voxel_mm3, n))
    return counts, loads, vols, by_label


# ------------------------------------------------------------------------------------------------ bank

def _bank(path: Path, data_root: str | Path | None = None) -> list[str]:
    from .io.locate import located

    try:
        index = located(json.loads((path / "bank.json").read_text()), path, data_root)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path / 'bank.json'}: malformed bank index ({exc})") from None
    cfg = index.get("config", {})
    cases, lesions = index.get("cases", []), index.get("lesions", [])
    ds = index.get("dataset", {})
    lk = index.get("likelihood", {})
    lines = [f"bank     {path}",
             f"from     {ds.get('root', '?')} ({ds.get('kind', '?')}); lesionsynth "
             f"{index.get('lesionsynth_version', '?')}, bank format {index.get('format', '?')}",
             f"channels {', '.join(index.get('channel_names', []))}",
             f"labels   {_labels_text(index.get('labels', {}))}",
             f"lesion label(s) {cfg.get('lesion_labels')}; region label(s) "
             f"{cfg.get('region_labels') or 'none (body foreground)'}",
             f"lesion = {cfg.get('connectivity', '?')}-connected component ≥ {cfg.get('min_volume_mm3', 0):g} mm³; "
             f"crop margin {cfg.get('margin_mm', '?')} mm",
             "",
             f"cases    {len(cases)}",
             f"lesions  {len(lesions)}",
             f"  per case     {_range([c.get('lesion_count', 0) for c in cases])}",
             f"  load         {_range([c.get('load_mm3', 0.0) for c in cases], 'mm³')}",
             f"  lesion size  {_quantiles([les['volume_mm3'] for les in lesions], 'mm³')}"]
    lines += _bank_label_lines(cases, lesions, cfg.get("lesion_labels") or [])
    shapes = [c["shape"] for c in cases if "shape" in c]
    spacings = [np.sqrt((np.asarray(c["affine"])[:3, :3] ** 2).sum(axis=0)) for c in cases if "affine" in c]
    lines += [f"case shape   {_shape_range(shapes)}", f"case spacing {_spacing_range(spacings)}"]
    if lk:
        lk_sp = np.sqrt((np.asarray(lk["affine"])[:3, :3] ** 2).sum(axis=0)) if "affine" in lk else []
        lines.append(f"likelihood   {lk.get('file', '?')}: grid {_vec(lk.get('shape', []), 6)} at {_vec(lk_sp)} mm, "
                     f"{'shared case grid' if lk.get('shared_grid') else 'reference-space grid'}; "
                     f"σ {cfg.get('likelihood_sigma_mm', '?')} mm, floor {cfg.get('likelihood_floor', '?')}")
    lines += _space_lines(index)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    lines.append(f"on disk      {size / 2**20:.1f} MiB")
    missing = [p for c in cases for p in [*c.get("images", []), c.get("label")] if p and not Path(p).is_file()]
    if missing:
        lines.append(f"  ! {len(missing)} source file(s) recorded in bank.json are missing, e.g. {missing[0]} "
                     f"(dataset moved? lesionsynth relocate {path} DATASET)")
    return lines


def _bank_label_lines(cases: list[dict], lesions: list[dict], lesion_labels) -> list[str]:
    """Per lesion label of a bank with several: how many lesions hold it, its volume in them and its load per
    case; and how many lesions are multi-class."""
    if len(lesion_labels) <= 1:
        return []
    lines = []
    multi = Counter(len(les.get("labels") or [les.get("label_value")]) for les in lesions)
    lines.append("  labels held  " + ", ".join(f"{k} label{'s' if k > 1 else ''}: {n} lesions"
                                               for k, n in sorted(multi.items())))
    orders = Counter(tuple(les["label_order"]) for les in lesions if les.get("label_order"))
    if orders:
        shown = ", ".join(f"{' ⊃ '.join(map(str, o))}: {n}" for o, n in orders.most_common(3))
        lines.append(f"  nesting      {shown}  (outermost first)")
    for v in lesion_labels:
        key = str(int(v))
        volumes = [les["volume_by_label"][key] for les in lesions if key in les.get("volume_by_label", {})]
        if not volumes and not any("volume_by_label" in les for les in lesions):  # a bank from before per-label data
            volumes = [les["volume_mm3"] for les in lesions if int(les.get("label_value", 0)) == int(v)]
        loads = [c["load_by_label"].get(key, 0.0) for c in cases if "load_by_label" in c]
        lines.append(f"  label {key:<6} in {len(volumes)} lesions, {_range(volumes, 'mm³')}"
                     + (f"; load per case median {_num(np.median(loads))} mm³" if loads else ""))
    return lines


def _space_lines(index: dict) -> list[str]:
    """The bank's common space and, when registered, each case's registration quality."""
    space = index.get("space") or {"mode": "world", "why": "bank made before registration existed"}
    lines = [f"space        {space['mode']} ({space.get('why', '')})"]
    if space["mode"] != "register":
        return lines
    lines[0] += f"; reference {space.get('reference_name')}"
    if space.get("template_region_file"):
        lines.append(f"  tissue prior {space['template_region_file']} (from {space['reference'].get('region_path')})")
    regs = [(c["case_id"], c["registration"]) for c in index.get("cases", []) if c.get("registration")]
    overlaps = [r["foreground_overlap"] for _, r in regs]
    seconds = _range([r["seconds"] for _, r in regs], "s")
    threshold = f" (poor below {space['poor_overlap']:g})" if space.get("poor_overlap") is not None else ""
    lines.append(f"  registration foreground overlap {_range(overlaps)}{threshold}; time {seconds} per case")
    poor = [f"{cid} ({r['foreground_overlap']:.2f})" for cid, r in regs if r.get("status") == "poor"]
    if poor:
        lines.append(f"  ! poor registration: {', '.join(poor)}")
    worst = sorted(regs, key=lambda cr: cr[1]["foreground_overlap"])[:3]
    lines.append("  lowest overlap " + ", ".join(f"{cid} {r['foreground_overlap']:.3f}" for cid, r in worst))
    return lines


# ------------------------------------------------------------------------------------------------ output

def _output(path: Path, data_root: str | Path | None = None, bank: str | Path | None = None) -> list[str]:
    from .output_run import read_output

    run = read_output(path, data_root, bank)
    cfg = run.config
    recs = run.records
    n = len(recs)
    labels_dir = path / "labelsTr"
    all_cases = {p.name[: -len(run.file_ending)] for p in labels_dir.glob(f"*{run.file_ending}")} \
        if labels_dir.is_dir() else set()
    synthetic = {r["case_id"] for r in recs}
    originals = len(all_cases - synthetic)
    expected = cfg.get("n")
    lines = [f"output   {path}",
             f"bank     {run.bank_dir}" + ("" if run.bank_index else "  (! not found)"),
             f"cases    {n} synthetic + {originals} original = {n + originals}"
             + (f"; dataset.json says {run.dataset['numTraining']}" if run.dataset.get("numTraining") not in
                (None, n + originals) else ""),
             f"channels {', '.join(run.channel_names)}"]
    if isinstance(expected, int) and expected != n:
        lines.append(f"  ! unfinished: {n} of {expected} cases in manifest.jsonl (rerun generate with --resume)")
    if not run.dataset:
        lines.append("  ! dataset.json missing: the run has not finished")
    lines.append(f"config   load {cfg.get('load')}, mode {cfg.get('mode')}, seed {cfg.get('seed')}, tolerance "
                 f"±{float(cfg.get('tolerance', 0.1)):.0%}, folds {_folds_used(cfg.get('folds'), run)}"
                 + (f", load range {cfg['load_range']} mm³" if cfg.get("load_range") else ""))
    if n:
        ok = sum(run.within(r) for r in recs)
        lines += ["", f"within tolerance  {ok} of {n} ({ok / n:.0%})"]
        families = sorted({r.get("load_family", cfg.get("load", "?")) for r in recs})
        for fam in families:
            sub = [r for r in recs if r.get("load_family", cfg.get("load", "?")) == fam]
            head = f"{fam} ({len(sub)})"
            lines.append(f"  {head:<14} target   {_quantiles([r['target_load_mm3'] for r in sub], 'mm³')}")
            lines.append(f"  {'':<14} achieved {_quantiles([r['achieved_load_mm3'] for r in sub], 'mm³')}")
        if run.bank_index:
            loads = [c["load_mm3"] for c in run.bank_index["cases"]]
            lines.append(f"  {'original':<14} load     {_range(loads, 'mm³')}")
        by_label: dict = {}
        for r in recs:
            for v, figures in (r.get("achieved_by_label") or {}).items():
                by_label.setdefault(v, []).append(figures)
        for v, figures in sorted(by_label.items(), key=lambda kv: int(kv[0])):
            lines.append(f"  label {v:<8} achieved {_quantiles([f['mm3'] for f in figures], 'mm³')}; "
                         f"{sum(f['voxels'] for f in figures):,} voxels")
        if cfg.get("load_label") is not None:
            lines.append(f"  loads counted on lesion label {cfg['load_label']} only (--load-label)")
        added = [int(r.get("lesions_added", 0)) for r in recs]
        removed = [int(r.get("lesions_removed", 0)) for r in recs]
        lines.append(f"lesions added    {sum(added)}; per case {_range(added)}")
        lines.append(f"lesions removed  {sum(removed)}; per case {_range(removed)}")
        fallback = sum(1 for r in recs if r.get("placement_fallback"))
        failed = sum(int(r.get("failed_placements", 0)) for r in recs)
        lines.append(f"failed placement tries {failed}; placement fell back to the region alone in {fallback} case(s)")
        lines.append("stop reasons")
        reasons = Counter(r.get("stop_reason", "?") for r in recs).most_common()
        for reason, count in reasons[:6]:
            lines.append(f"  {count:>5}  {reason}")
        if len(reasons) > 6:
            lines.append(f"  … {len(reasons) - 6} more")
    report = path / "report" / "report.html"
    lines.append(f"report   {report if report.is_file() else '(none yet: run lesionsynth report ' + str(path) + ')'}")
    return lines


def _folds_used(asked, run) -> str:
    """The folds a run used: as asked, or as many as the bank has cases when it asked for more."""
    cases = len(run.bank_index.get("cases", [])) if run.bank_index else 0
    if isinstance(asked, int) and cases and asked > cases:
        return f"{cases} ({asked} asked; the bank holds {cases} cases)"
    return str(asked)
