"""The strong realism audit (`lesionsynth.critic`) of a generate output, as a measuring instrument.

    python benchmarks/critic_audit.py OUT_DIR [--seed 0] [--max-lesions 400] [--json FILE]

Runs `critic.strong_audit` on OUT_DIR (a `lesionsynth generate` output whose bank is still where run.json says,
or whose originals are in the output) and prints:

* the AUC of pasted vs real lesions (out-of-fold, grouped by host case, 95 % interval by bootstrap over host
  cases), with all feature families and with the appearance families only (no shape, no context), the three
  families whose permutation costs the AUC most, and the real-vs-real check (≈ 0.5 when the grouping is honest);
* the same for inpainted regions against healthy tissue of the same case, and the contrast they keep
  (residual excess: 0 = filled to the tissue's level, 1 = untouched);
* band noise around pasted lesions: output / base case on the same voxels, median over pasted lesions, of the
  noise MAD and the Laplacian energy at 0-1, 1-2, 2-3 and 4-8 mm from the lesion's surface (1 = unchanged);
* unlabelled changed voxels: moved by more than 3 local noise sd from the base case and not lesion in the output,
  near a paste (≤ 2 mm), near an inpainted lesion, elsewhere; the five cases with the most.

--json writes the whole result, every measured lesion included (`rows`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _auc_text(result: dict | None) -> str:
    if not result or result.get("auc") is None:
        return f"not computed ({(result or {}).get('reason') or '?'})"
    ci = result.get("auc_ci95")
    return f"{result['auc']:.3f}" + (f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else "")


def _families_text(result: dict, n: int = 3) -> str:
    return ", ".join(f"{r['family']} {r['auc_drop']:+.3f}" for r in (result.get("family_importance") or [])[:n]) or "-"


def _median(summary: dict) -> str:
    return "-" if summary.get("median") is None else f"{summary['median']:.2f}"


def print_summary(result: dict, seconds: float, out=sys.stdout) -> None:
    """The figures a developer compares from run to run, as a few lines of text."""
    p, inp, rvr = result["pasted"], result["inpainted"], result["real_vs_real"]
    names = result["channels"]
    w = out.write
    w(f"lesions: {result['n_real']} real, {result['n_pasted']} pasted, {result['n_inpainted']} inpainted regions, "
      f"{result['n_controls']} healthy controls; {seconds:.1f} s\n")
    w(f"pasted vs real AUC      {_auc_text(p)}   top families: {_families_text(p)}\n")
    w(f"  appearance only       {_auc_text(p.get('appearance'))}\n")
    honest = "not computed (" + str(rvr.get("reason")) + ")" if rvr.get("auc") is None else \
        f"{rvr['auc']:.3f} (splits: {', '.join(f'{a:.2f}' for a in rvr['aucs'])})"
    w(f"real vs real AUC        {honest}\n")
    w(f"inpainted vs healthy    {_auc_text(inp)}   top families: {_families_text(inp)}\n")
    w("  residual excess       " + ", ".join(f"{n} {_median(inp['residual_excess'][n])}" for n in names) + "\n")
    w("band noise around pasted lesions, output / base on the same voxels (median):\n")
    paired = result["band_noise"]["paired_output_over_base"]
    w(f"  {'band':6s}" + "".join(f"{f'{m} {n}':>16s}" for m in ("MAD", "Laplacian") for n in names) + "\n")
    for band, by_measure in paired.items():
        w(f"  {band:6s}" + "".join(f"{_median(by_measure[m][n]):>16s}" for m in ("mad", "lap") for n in names) + "\n")
    changes = result["unlabelled_changes"]
    t = changes["totals"]
    w(f"unlabelled changed voxels (> {changes['threshold_sd']:g} sd): {t['near_paste']} near pastes, "
      f"{t['elsewhere']} elsewhere, {t['near_inpaint']} near inpaints\n")
    for c in changes["worst"]:
        w(f"  {c['case_id']} (base {c['base_case']}): {c['near_paste']} near pastes, {c['elsewhere']} elsewhere, "
          f"{c['near_inpaint']} near inpaints, {c['unlabelled_mm3']:.0f} mm³\n")
    for note in result.get("notes", []):
        w(f"note: {note}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder of lesionsynth generate")
    parser.add_argument("--seed", type=int, default=0, help="which lesions are drawn, folds, permutations")
    parser.add_argument("--max-lesions", type=int, default=None, help="lesions measured per kind (default 400)")
    parser.add_argument("--json", type=Path, default=None, help="write the whole result here")
    args = parser.parse_args(argv)

    from lesionsynth.critic import MAX_LESIONS, strong_audit

    t0 = time.perf_counter()
    result = strong_audit(args.out, max_lesions=args.max_lesions or MAX_LESIONS, seed=args.seed, progress=None,
                          keep_rows=args.json is not None)
    seconds = time.perf_counter() - t0
    print_summary(result, seconds)
    if args.json is not None:
        record = {"out": str(args.out), "wall_seconds": round(seconds, 2), **result}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
