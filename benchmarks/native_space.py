"""Where do pasted lesions land on native-space brains? Tissue shares against a kept-apart truth.

    python benchmarks/native_space.py [--data DIR] [--truth DIR] [--n 12] [--load high]
                                      [--mode populate] [--seed 0] [--jobs 2] [--recipe ms_flair]
                                      [--bank-args "..."] [--generate-args "..."]
                                      [--work DIR] [--keep] [--json FILE]

Defaults: --data .cache/data/heldout/native_brains (made by scripts/fetch_data.py: MNI152 anatomy in
native scanner space, every case with its own head pose, grid, orientation, spacing and gain, real MS
lesion shapes in white matter), --truth the matching folder under DATA's cache: truth/native_brains or
truth/heldout_native_brains, which holds `{case}_tissue.nii.gz` (uint8 on exactly the case's grid:
0 outside the brain, 1 CSF, 2 GM, 3 WM). The dataset itself carries no tissue label.

What it runs, through the installed command line (the `lesionsynth` next to this Python):

1. `lesionsynth build-bank DATA --out WORK/bank --recipe RECIPE --jobs J` + the words of --bank-args
   (e.g. --bank-args "--space register"), passed through as they are;
2. `lesionsynth generate WORK/bank --out WORK/out --n N --load LOAD --mode MODE --seed S --jobs J`
   + the words of --generate-args.

What it measures on the written output (the synthetic case has exactly its base case's grid):

* pasted lesion voxels of a synthetic case = lesion in `WORK/out/labelsTr/synXXXXX.nii.gz` but not in
  its base case's label (`base_case` of its line in `manifest.jsonl`; the base label is read from DATA);
* real lesion voxels = the lesion voxels of the DATA cases;
* for both: the share of those voxels in WM, GM, CSF and outside the brain (background) by the truth
  map of the (base) case; per case and pooled (pooled = all voxels together, so big cases weigh more);
* the distance (mm) from each lesion component's centroid (26-connected; pasted voxels of a synthetic case,
  all lesion voxels of a real one) to the nearest ventricle voxel of the truth map (CSF deeper than 15 mm in
  the brain), medians and the two-sample Kolmogorov-Smirnov statistic pasted vs real;
* from the manifest: pastes (`paste` operations), failed placements, cases that reached their target
  (`reached`); and the wall-clock time of each stage.

Lesion label values are the bank's (`bank.json` config `lesion_labels`). Prints a short table; --json
writes everything (configuration, commands, times, pooled and per-case figures, build-bank's report).
The work folder is a new temporary folder unless --work is given; it is removed at the end unless
--keep (a --work folder that existed before is kept, only its bank/ and out/ are removed).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, stats

REPO = Path(__file__).resolve().parents[1]
TISSUES = {"background": 0, "csf": 1, "gm": 2, "wm": 3}  # the truth maps' values
REPORT_ORDER = ("wm", "gm", "csf", "background")


def tissue_shares(label: np.ndarray, base_label: np.ndarray | None, tissue: np.ndarray,
                  lesion_labels=(1,)) -> dict:
    """Tissue make-up of the lesion voxels of ``label`` that are not lesion in ``base_label``.

    ``base_label`` None counts every lesion voxel of ``label`` (the real lesions of a case).
    Returns ``{"voxels": n, "counts": {tissue: voxels}, "shares": {tissue: fraction}}`` with the
    tissues of TISSUES; shares are None when there is no such voxel. All arrays share one grid.
    """
    if label.shape != tissue.shape or (base_label is not None and base_label.shape != label.shape):
        raise ValueError(f"grids differ: label {label.shape}, tissue {tissue.shape}, "
                         f"base {None if base_label is None else base_label.shape}")
    values = list(lesion_labels)
    voxels = np.isin(label, values)
    if base_label is not None:
        voxels &= ~np.isin(base_label, values)
    found = np.bincount(np.asarray(tissue)[voxels].astype(np.int64), minlength=len(TISSUES))
    if found.size > len(TISSUES):
        raise ValueError(f"tissue values outside {sorted(TISSUES.values())}")
    counts = {name: int(found[value]) for name, value in TISSUES.items()}
    return {"voxels": int(voxels.sum()), "counts": counts, "shares": shares_of(counts)}


#: Ventricles in a truth map: CSF at least this deep (mm) inside the brain (sulcal CSF lies at its surface).
VENTRICLE_DEPTH_MM = 15.0


def ventricle_distance_map(tissue: np.ndarray, spacing) -> np.ndarray | None:
    """Distance (mm) of every voxel to the nearest ventricle voxel (CSF deeper than VENTRICLE_DEPTH_MM in the
    brain of a truth map), or None when the map has no such voxel."""
    depth = ndimage.distance_transform_edt(tissue > 0, sampling=spacing)
    ventricles = (tissue == TISSUES["csf"]) & (depth > VENTRICLE_DEPTH_MM)
    if not ventricles.any():
        return None
    return ndimage.distance_transform_edt(~ventricles, sampling=spacing)


def centroid_distances(voxels: np.ndarray, distance: np.ndarray | None) -> list[float]:
    """Distance-map value at the centroid of each 26-connected component of ``voxels`` (mm)."""
    if distance is None or not voxels.any():
        return []
    comps, n = ndimage.label(voxels, structure=np.ones((3, 3, 3), bool))
    centres = ndimage.center_of_mass(voxels, comps, range(1, n + 1))
    top = np.array(distance.shape) - 1
    return [float(distance[tuple(np.clip(np.rint(c).astype(int), 0, top))]) for c in centres]


def ks_statistic(a, b) -> float | None:
    """Two-sample Kolmogorov-Smirnov statistic (None when either sample is empty)."""
    if not len(a) or not len(b):
        return None
    return float(stats.ks_2samp(a, b).statistic)


def shares_of(counts: dict) -> dict:
    """Fractions of the total of a ``{tissue: voxels}`` dict (None when empty)."""
    total = sum(counts.values())
    return {name: (counts[name] / total if total else None) for name in TISSUES}


def pool(results: list[dict]) -> dict:
    """Sum the counts of several tissue_shares results."""
    counts = {name: sum(r["counts"][name] for r in results) for name in TISSUES}
    return {"voxels": sum(counts.values()), "counts": counts, "shares": shares_of(counts)}


# --------------------------------------------------------------------------------------------------


def default_data() -> Path:
    return REPO / ".cache" / "data" / "heldout" / "native_brains"


def default_truth(data: Path) -> Path:
    """CACHE/heldout/NAME -> CACHE/truth/heldout_NAME; CACHE/NAME -> CACHE/truth/NAME."""
    data = data.resolve()
    if data.parent.name == "heldout":
        return data.parent.parent / "truth" / f"heldout_{data.name}"
    return data.parent / "truth" / data.name


def cli() -> list[str]:
    """The lesionsynth command of this environment ($LESIONSYNTH_CLI, if set: another build, to compare)."""
    if os.environ.get("LESIONSYNTH_CLI"):
        return shlex.split(os.environ["LESIONSYNTH_CLI"])
    sibling = Path(sys.executable).with_name("lesionsynth")
    if sibling.exists():
        return [str(sibling)]
    found = shutil.which("lesionsynth")
    if found:
        return [found]
    raise SystemExit(f"{Path(sys.argv[0]).stem}: no lesionsynth command next to this Python or on PATH")


def run_stage(name: str, cmd: list[str]) -> tuple[float, str]:
    """Run one command; return (seconds, its stdout); exit with its output's tail if it fails."""
    print(f"[native_space] {name}: {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise SystemExit(f"native_space: {name} failed (exit {proc.returncode}):\n{tail}")
    return seconds, proc.stdout


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def same_grid(a: tuple, b: tuple) -> bool:
    return a[0].shape == b[0].shape and np.allclose(a[1], b[1], atol=1e-4)


def measure(data: Path, truth: Path, out: Path, lesion_labels) -> dict:
    """Per-case and pooled tissue shares of the pasted and the real lesion voxels."""
    tissue_cache: dict[str, tuple] = {}
    base_cache: dict[str, tuple] = {}
    distance_cache: dict[str, np.ndarray | None] = {}
    values = list(lesion_labels)

    def ventricle_distance(case: str) -> np.ndarray | None:
        if case not in distance_cache:
            tissue, affine = tissue_of(case)
            distance_cache[case] = ventricle_distance_map(tissue, np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        return distance_cache[case]

    def tissue_of(case: str) -> tuple:
        if case not in tissue_cache:
            path = truth / f"{case}_tissue.nii.gz"
            if not path.exists():
                raise SystemExit(f"native_space: no truth map {path}")
            tissue_cache[case] = load(path)
        return tissue_cache[case]

    def base_of(case: str) -> tuple:
        if case not in base_cache:
            base_cache[case] = load(data / "labelsTr" / f"{case}.nii.gz")
        return base_cache[case]

    real = []
    for path in sorted((data / "labelsTr").glob("*.nii.gz")):
        case = path.name[: -len(".nii.gz")]
        label, tissue = base_of(case), tissue_of(case)
        if not same_grid(label, tissue):
            raise SystemExit(f"native_space: truth of {case} is not on its grid")
        real.append({"case": case, **tissue_shares(label[0], None, tissue[0], lesion_labels),
                     "ventricle_mm": centroid_distances(np.isin(label[0], values), ventricle_distance(case))})

    synthetic = []
    for line in (out / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        case, base = entry["case_id"], entry["base_case"]
        label = load(out / "labelsTr" / f"{case}.nii.gz")
        if not same_grid(label, base_of(base)):
            raise SystemExit(f"native_space: {case} is not on its base case {base}'s grid")
        shares = tissue_shares(label[0], base_of(base)[0], tissue_of(base)[0], lesion_labels)
        pasted = np.isin(label[0], values) & ~np.isin(base_of(base)[0], values)
        ops = entry.get("ops", [])
        synthetic.append({
            "case": case, "base_case": base,
            "pastes": sum(1 for op in ops if op.get("op") == "paste"),
            "failed_placements": int(entry.get("failed_placements") or 0),
            "refused_placements": entry.get("refused_placements") or {},
            "reached": bool(entry.get("reached")),
            "target_load_mm3": entry.get("target_load_mm3"),
            "achieved_load_mm3": entry.get("achieved_load_mm3"),
            **shares,
            "ventricle_mm": centroid_distances(pasted, ventricle_distance(base)),
        })
    refused: dict[str, int] = {}
    for s in synthetic:
        for why, k in s["refused_placements"].items():
            refused[why] = refused.get(why, 0) + int(k)
    pasted_mm = [d for s in synthetic for d in s["ventricle_mm"]]
    real_mm = [d for r in real for d in r["ventricle_mm"]]
    return {
        "pasted": pool(synthetic), "real": pool(real),
        "ventricle_distance": {
            "pasted_median_mm": float(np.median(pasted_mm)) if pasted_mm else None,
            "real_median_mm": float(np.median(real_mm)) if real_mm else None,
            "pasted_components": len(pasted_mm), "real_components": len(real_mm),
            "ks": ks_statistic(pasted_mm, real_mm)},
        "pastes": sum(s["pastes"] for s in synthetic),
        "failed_placements": sum(s["failed_placements"] for s in synthetic),
        "refused_placements": refused,
        "reached": sum(s["reached"] for s in synthetic), "cases": len(synthetic),
        "per_synthetic_case": synthetic, "per_real_case": real,
    }


def pct(value) -> str:
    return "    -" if value is None else f"{100 * value:5.1f}"


def print_table(result: dict, times: dict) -> None:
    m = result["measure"]
    head = f"{'':24s} {'voxels':>8s} " + " ".join(f"{t[:5]:>6s}" for t in REPORT_ORDER)
    print("\n" + head.replace("backg", "outsd"))

    def row(name: str, r: dict) -> None:
        print(f"{name:24s} {r['voxels']:8d} " + " ".join(f"{pct(r['shares'][t]):>6s}"
                                                        for t in REPORT_ORDER))

    row("pasted (pooled)", m["pasted"])
    row("real (pooled)", m["real"])
    print(f"\n{'synthetic case':14s} {'base':9s} {'paste':>5s} {'fail':>5s} {'reach':>5s} "
          f"{'voxels':>7s} " + " ".join(f"{t[:5]:>6s}" for t in REPORT_ORDER).replace("backg", "outsd"))
    for s in m["per_synthetic_case"]:
        print(f"{s['case']:14s} {s['base_case']:9s} {s['pastes']:5d} {s['failed_placements']:5d} "
              f"{'yes' if s['reached'] else 'no':>5s} {s['voxels']:7d} "
              + " ".join(f"{pct(s['shares'][t]):>6s}" for t in REPORT_ORDER))
    print(f"\n{'real case':14s} {'voxels':>7s} " + " ".join(f"{t[:5]:>6s}" for t in REPORT_ORDER)
          .replace("backg", "outsd"))
    for r in m["per_real_case"]:
        print(f"{r['case']:14s} {r['voxels']:7d} "
              + " ".join(f"{pct(r['shares'][t]):>6s}" for t in REPORT_ORDER))
    v = m["ventricle_distance"]
    if v["ks"] is not None:
        print(f"\ndistance of lesion centroids to the ventricles: pasted median {v['pasted_median_mm']:.1f} mm "
              f"({v['pasted_components']} components), real {v['real_median_mm']:.1f} mm "
              f"({v['real_components']}), KS {v['ks']:.3f}")
    print(f"\npastes {m['pastes']}, failed placements {m['failed_placements']} "
          f"{m['refused_placements']}, reached {m['reached']}/{m['cases']}")
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="nnU-Net dataset (default .cache/data/heldout/native_brains)")
    parser.add_argument("--truth", type=Path, default=None,
                        help="folder of {case}_tissue.nii.gz (default: CACHE/truth/<dataset>)")
    parser.add_argument("--n", type=int, default=12, help="synthetic cases")
    parser.add_argument("--load", default="high")
    parser.add_argument("--mode", default="populate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--recipe", default="ms_flair")
    parser.add_argument("--bank-args", default="", help="extra words for build-bank (one string)")
    parser.add_argument("--generate-args", default="", help="extra words for generate (one string)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    data = (args.data or default_data()).resolve()
    truth = (args.truth or default_truth(data)).resolve()
    for path, what in ((data / "dataset.json", "dataset"), (truth, "truth folder")):
        if not path.exists():
            raise SystemExit(f"native_space: {what} {path} not found (run scripts/fetch_data.py)")
    existed = args.work is not None and args.work.exists()
    work = (args.work or Path(tempfile.mkdtemp(prefix="native_space."))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bank, out = work / "bank", work / "out"
    for path in (bank, out):
        if path.exists():
            raise SystemExit(f"native_space: {path} exists; give another --work or remove it")
    exe = cli()
    bank_cmd = [*exe, "build-bank", str(data), "--out", str(bank), "--recipe", args.recipe,
                "--jobs", str(args.jobs), *shlex.split(args.bank_args)]
    gen_cmd = [*exe, "generate", str(bank), "--out", str(out), "--n", str(args.n), "--load", args.load,
               "--mode", args.mode, "--seed", str(args.seed), "--jobs", str(args.jobs),
               *shlex.split(args.generate_args)]
    times = {}
    try:
        times["build-bank"], bank_log = run_stage("build-bank", bank_cmd)
        times["generate"], gen_log = run_stage("generate", gen_cmd)
        lesion_labels = json.loads((bank / "bank.json").read_text())["config"]["lesion_labels"]
        start = time.perf_counter()
        measured = measure(data, truth, out, lesion_labels)
        times["measure"] = time.perf_counter() - start
    finally:
        if not args.keep:
            if existed:
                shutil.rmtree(bank, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
            else:
                shutil.rmtree(work, ignore_errors=True)
    result = {
        "data": str(data), "truth": str(truth), "work": str(work) if args.keep else None,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "commands": {"build-bank": shlex.join(bank_cmd), "generate": shlex.join(gen_cmd)},
        "lesion_labels": lesion_labels, "times_s": times,
        "build_bank_output": bank_log.strip().splitlines(),
        "generate_output": gen_log.strip().splitlines(),
        "measure": measured,
    }
    print_table(result, times)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"json: {args.json}")
    if args.keep:
        print(f"work folder kept: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
