"""Per-sample cost of the on-the-fly transforms next to the lesion work of `generate`.

    python benchmarks/bench_transforms.py [--bank BANK] [--samples 12] [--load uniform] [--json out.json]

On the MNI sample (`make data`; a bank is built into a temporary folder unless --bank is given), each sample
is one base case (the six cases in turn) and one plan, `case_rng(seed, 0)` for seeds 0, 1, ... Three ways of
doing the same lesion work are timed per sample, with nothing read or written in the timed part (the cases
are loaded beforehand):

  generate   `pipeline.synthesize_arrays` on a copy of the arrays `load_case` read: what a generate worker
             spends on a case's lesion work, between its read and its write;
  torchio    `LesionMix(seed=...)` on a loaded `tio.Subject` (its deep copy, the tensor conversions, finding the
             base case, the lesion work, the tensors back);
  monai      `LesionMixd(seed=...)` on a loaded sample of `LoadImaged` + `EnsureChannelFirstd` (a shallow copy
             of the dict; the rest as for torchio).

All three draw the same plans (the transforms' default donors: every case but the sample's own), so the
differences are the transforms' own overhead; the outputs are checked equal. It prints the median seconds
per sample of each and writes them as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesionsynth.bank import Bank, build_bank  # noqa: E402
from lesionsynth.io import load_case  # noqa: E402
from lesionsynth.pipeline import donor_lesions, synthesize_arrays  # noqa: E402
from lesionsynth.plan import case_rng  # noqa: E402
from lesionsynth.transforms.core import sample_config  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LESIONSYNTH_DATA", REPO / ".cache" / "data")))
    parser.add_argument("--bank", type=Path, default=None, help="a bank of the MNI sample (default: build one)")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--load", default="uniform")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torchio as tio
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from lesionsynth.transforms import LesionMix, LesionMixd

    dataset = args.data / "mni_lesions"
    work = Path(tempfile.mkdtemp(prefix="bench_transforms."))
    try:
        bank_dir = args.bank or build_bank(dataset, work / "bank", progress=False)
        bank = Bank(bank_dir)
        cfg = sample_config(bank, args.load, None, "both", 0.1, None, None)
        cases = {ref.case_id: load_case(ref, len(bank.channel_names)) for ref in bank.case_refs()}
        subjects, dicts = {}, {}
        loading = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"])])
        for ref in bank.case_refs():
            subjects[ref.case_id] = tio.Subject(t1=tio.ScalarImage(ref.image_paths[0]),
                                                flair=tio.ScalarImage(ref.image_paths[1]),
                                                seg=tio.LabelMap(ref.label_path))
            subjects[ref.case_id].load()
            dicts[ref.case_id] = loading({"image": [str(p) for p in ref.image_paths], "label": str(ref.label_path)})
        ids = list(cases)
        rows = []
        for seed in range(args.samples):
            case_id = ids[seed % len(ids)]
            case = cases[case_id]
            channels, label = case.channels.copy(order="K"), case.label.copy(order="K")
            donors = donor_lesions(bank, [c for c in ids if c != case_id])
            t_generate, (ch, lab, rec) = timed(lambda: synthesize_arrays(channels, label, case.affine, bank, cfg,
                                                                         case_rng(seed, 0), case_id, donors))
            mix = LesionMix(bank_dir, load=args.load, seed=seed)
            t_torchio, subject = timed(lambda: mix(subjects[case_id]))
            mixd = LesionMixd(["image"], "label", bank_dir, load=args.load, seed=seed)
            t_monai, sample = timed(lambda: mixd(dicts[case_id]))
            assert np.array_equal(subject.flair.data[0].numpy(), ch[1])
            assert np.array_equal(sample["label"][0].numpy(), lab)
            rows.append({"case": case_id, "seed": seed, "ops": len(rec["ops"]), "generate_s": t_generate,
                         "torchio_s": t_torchio, "monai_s": t_monai})
            print(f"{case_id:10s} seed {seed:3d}: {len(rec['ops']):3d} ops  generate {t_generate:6.2f} s  "
                  f"torchio {t_torchio:6.2f} s  monai {t_monai:6.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {k: statistics.median(r[k] for r in rows) for k in ("generate_s", "torchio_s", "monai_s")}
    overhead = {k: statistics.median(r[k] - r["generate_s"] for r in rows) for k in ("torchio_s", "monai_s")}
    print(f"median per sample over {len(rows)} samples (load {args.load}): generate's lesion work "
          f"{medians['generate_s']:.2f} s, TorchIO {medians['torchio_s']:.2f} s (+{overhead['torchio_s']:.2f} s), "
          f"MONAI {medians['monai_s']:.2f} s (+{overhead['monai_s']:.2f} s)")
    if args.json:
        args.json.write_text(json.dumps({"load": args.load, "median_s": medians, "median_overhead_s": overhead,
                                         "samples": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
