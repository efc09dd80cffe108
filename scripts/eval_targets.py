"""Measure how well `generate` hits its targets on datasets the tests never use (DIR/heldout).

For each held-out dataset and each load family: build a bank, generate N cases, and report the share of
cases within ±tolerance of their target (measured on the written labels), the median achieved load,
whether each low/medium/high case lies in its band, and the time per case.

    python scripts/eval_targets.py [--cache DIR] [--n 10] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from lesionsynth.bank import Bank, BankConfig, build_bank
from lesionsynth.loads import FAMILIES, load_band
from lesionsynth.pipeline import GenerateConfig, generate

HELDOUT = {
    # name: (path relative to the cache, lesion labels, region labels)
    "msd_mni": ("heldout/msd_mni", (1,), ()),
    "ms_oblique": ("heldout/ms_oblique/cases.csv", (1,), ()),
    "lung_lps": ("heldout/lung_lps", (2,), (1,)),
}


def measured_load(path: Path, lesion_labels) -> float:
    img = nib.load(path)
    return float(np.isin(np.asarray(img.dataobj), lesion_labels).sum() * abs(np.linalg.det(img.affine[:3, :3])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.environ.get("LESIONSYNTH_DATA", ".cache/data"))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lesionsynth-eval-"))
    rows = []
    try:
        for name, (rel, lesion_labels, region_labels) in HELDOUT.items():
            bank_dir = work / name / "bank"
            build_bank(Path(args.cache) / rel, bank_dir, BankConfig(lesion_labels=lesion_labels,
                                                                    region_labels=region_labels),
                       jobs=args.jobs, progress=False)
            bank = Bank(bank_dir)
            for family in FAMILIES:
                out = work / name / family
                t0 = time.perf_counter()
                res = generate(bank_dir, out, GenerateConfig(n=args.n, load=family, include_originals=False),
                               jobs=args.jobs, progress=False)
                per_case = (time.perf_counter() - t0) / args.n
                written = [measured_load(out / "labelsTr" / f"{r['case_id']}.nii.gz", lesion_labels)
                           for r in res.records]
                assert all(abs(w - r["achieved_load_mm3"]) < 1e-3 for w, r in zip(written, res.records))
                within = np.mean([abs(w - r["target_load_mm3"]) <= 0.1 * r["target_load_mm3"]
                                  for w, r in zip(written, res.records)])
                lo, hi = load_band(family, bank.real_loads())
                in_band = np.mean([lo * 0.9 <= w <= hi * 1.1 for w in written])
                rows.append((name, family, within, float(np.median(written)), in_band, per_case,
                             sorted({r["stop_reason"] for r in res.records})))
                print(f"{name:11s} {family:8s} within±10%={within:5.0%} median={np.median(written):10.0f} mm³ "
                      f"in-band={in_band:5.0%} band=[{lo:.0f}, {hi:.0f}] {per_case:5.2f} s/case "
                      f"reasons={rows[-1][6]}", flush=True)
        total = np.mean([r[2] for r in rows])
        print(f"overall share within ±10%: {total:.1%} over {len(rows) * args.n} cases")
        print(json.dumps([{"dataset": r[0], "family": r[1], "within": r[2], "median": r[3], "in_band": r[4],
                           "s_per_case": r[5]} for r in rows]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
