"""End-to-end speed and memory of `generate` on MNI-sized cases, against the issue's targets (issue 3).

    python benchmarks/bench_generate.py [--quick] [--cases N] [--data DIR] [--load high]
                                        [--load-range LO HI] [--folds 1] [--seed 0] [--codec gz|nii]
                                        [--compression-level 1] [--torchio-cases K] [--torchio-threads T]
                                        [--memory-cases K] [--rounds R] [--pair-rounds P]
                                        [--profile K] [--work DIR] [--keep] [--json PATH]

Defaults: --data .cache/data/mni_lesions (6 cases, 197×233×189, 2 float32 channels + uint8 label),
--cases 12, --load high, --folds 1 (with one fold every base case is used in turn, so 12 cases use each
of the 6 originals twice), originals not copied into the output, --codec gz (the dataset as fetched,
.nii.gz output at gzip level 1 through isal). `--codec nii` first stores an uncompressed copy of the dataset
and writes .nii: generate, floor and TorchIO all read and write uncompressed files. `--quick`: 3 cases,
1 TorchIO case, 1 memory case, 1 round (a smoke run, about a minute). A full run takes about 6 minutes.

What is measured (all times are wall clock, `time.perf_counter`; the machine may be shared, so every
row reports median, min and max over cases):

1. `generate(..., jobs=1)`, one whole run: per-case read / lesion work / write from the returned timings
   (measured inside the stages of `synthesize_case`: read = bank lookup + `load_case`; lesion = target
   draw, region, placement density, the plan/render loop and the label count; write = `write_case`). At
   --jobs 1 generate overlaps them (`pipeline.overlapped_cases`: the next case is read and the previous one
   written in two threads while a case's lesion work runs), so these stage times overlap in wall clock.
2. Interleaved per case (`--pair-rounds P`, default 3): for each case, back to back in one process, the I/O
   floor (`lesionsynth.io.load_case` + `lesionsynth.io.output.write_case` of its base case, same codec and
   level, no lesion work), `synthesize_case` (the stages one after another, as each worker of a --jobs N
   run does per case) with the 1x bank, and with the 10x bank; the order rotates from case to case and
   round to round. Per case the fastest of the P rounds is kept: the cost of the lesion work itself, and
   the 10x-bank comparison. Interleaving matters on a shared machine whose speed drifts by 20-25 % over
   minutes: whole runs of one variant after another compare different periods of the machine,
   measurements seconds apart compare the code.
3. Whole calls, in --rounds R rounds (default 3), back to back in an order that rotates from round to
   round: `generate` at --jobs 1 and at --jobs 2 (bank opening, run.json, worker start-up at --jobs 2
   (processes forked from this one on Linux, see `lesionsynth.parallel`), all cases,
   manifest/dataset.json/splits; not the originals, which are left out), and the I/O floor of the same
   cases as a whole run: read and write of each output case's base case one after another, and the same
   overlapped as generate overlaps them (read-ahead and write-behind threads). **The target**: generate
   --jobs 1 / the sequential I/O floor, median over the rounds of the two calls' ratio; the ratio to the
   overlapped floor and the CPU seconds per case (this process, its threads included) are printed with
   it. Speed-up = median over rounds of wall_j1 / wall_j2 (the fastest calls' ratio is printed too).
4. Bank size: the 10× bank is bank.json with every lesion entry repeated 10 times (copies right after the
   original, new ids) and the crop files concatenated 10 times, each copy's offsets pointing into its own
   copy of the arrays, so the bank really is 10× larger on disk and in bank.json. Because each lesion's
   copies sit next to each other, the size-aware lesion draw (one uniform through the cumulative weights)
   lands on a copy of the same lesion with the same random stream, so every output case does the same
   lesion work (checked: a whole generate run with the 10x bank is compared byte for byte with the 1x
   run). The difference in per-case time is therefore only what bank size costs (index parsing, per-case
   donor lists, per-paste weight lists, memory-mapped reads, the worker's per-lesion cache holding 10×
   more distinct lesions). Compared per case in the interleaved rounds (item 2).
5. Peak memory of a worker: a fresh child process runs one case with `synthesize_case` and reports its
   peak resident set (VmHWM from /proc/self/status, i.e. the ru_maxrss of its own address space) after the
   imports and the bank (baseline) and after the case (peak); "increment" = peak - baseline, compared with
   one case in memory (channels float32 + uint8 label); the target is judged on the largest increment.
   The total (interpreter, numpy/scipy/nibabel included) is shown too. (`getrusage().ru_maxrss` itself is
   unusable in a child on Linux: it starts from the parent's high-water mark, carried over the exec.)
6. TorchIO (when importable): per-case read (`tio.Subject(...).load()`) → `tio.RandomElasticDeformation()`
   (defaults; SimpleITK with its default thread count, i.e. all cores, which favours TorchIO) → write
   through lesionsynth's own `save_nifti` (same codec and level), for K cases spread evenly over the list
   (`--torchio-cases`, default 3), each right after that case's measurements in the first interleaved
   round (item 2); speed-up = TorchIO's median per case / generate's (1x bank) median per case over all
   cases of that same round (not the best-of-rounds time); the ratio paired with the same case is shown
   too (TorchIO's cost hardly depends on the case, generate's grows with the lesion work).

Lesion counts: connected components (the bank's connectivity) of the written labels, after timing. On
mni_lesions no load setting puts every case in 5-30 lesions: two base cases carry 36 and 54 lesions of
their own (MS_01038, MS_01039), and the size-aware draw fills a high-load deficit of the 1-2-lesion
stroke cases with a few large donors; `--load high` (the default here) gives about half the cases in
5-30 and the most lesion work per case (the harder test). The counts are printed and kept in the JSON.
`--profile K` additionally runs cProfile over `synthesize_case` for K cases and prints the top 15
functions by tottime (not part of the timed runs).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import hashlib
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import lesionsynth
from lesionsynth.bank import IMAGES_FILE, MASKS_FILE, SPLINES_FILE, Bank, BankConfig, build_bank
from lesionsynth.io import load_case
from lesionsynth.io.nifti import has_fast_gzip, save_nifti
from lesionsynth.io.output import write_case
from lesionsynth.pipeline import (GenerateConfig, base_case_of, fold_assignment, generate, run_layout, run_record,
                                  synthesize_case)
from lesionsynth.plan import AugmentConfig
from lesionsynth import pipeline
from lesionsynth.parallel import overlapped

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_PARENT = Path(lesionsynth.__file__).resolve().parents[1]
BANK_FACTOR = 10
ENDINGS = {"gz": ".nii.gz", "nii": ".nii"}

TARGETS = {
    "generate_vs_floor": 1.2,   # generate per case ≤ 1.2 × I/O floor (jobs 1, issue 14; issue 3 asked 1.5)
    "vs_torchio": 20.0,         # ≥ 20 × faster than TorchIO
    "jobs2_speedup": 1.8,       # ≥ 1.8 × throughput at --jobs 2
    "bank10_within": 0.10,      # 10× bank within 10 % of 1×
    "memory_vs_case": 3.0,      # peak memory per worker ≤ 3 × one case
}


# ------------------------------------------------------------------------------------------------ helpers

def summary(values) -> dict:
    v = [float(x) for x in values]
    if not v:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(v), "median": statistics.median(v), "min": min(v), "max": max(v)}


def gen_config(args, n: int, natural_pastes: int) -> GenerateConfig:
    # natural_pastes pinned to the 1x bank's typical lesion count: the 10x bank repeats every lesion, so its
    # own count per case is 10x larger and would change the donor draw (and the lesion work)
    return GenerateConfig(n=n, load=args.load, seed=args.seed, folds=args.folds,
                          augment=AugmentConfig(natural_pastes=natural_pastes),
                          load_range=tuple(args.load_range) if args.load_range else None,
                          include_originals=False, compression_level=args.compression_level,
                          file_ending=ENDINGS[args.codec])


def uncompressed_copy(src: Path, dst: Path) -> Path:
    """The nnU-Net dataset `src` with every .nii.gz file stored as .nii (same NIfTI bytes, decompressed)."""
    import gzip

    spec = json.loads((src / "dataset.json").read_text())
    spec["file_ending"] = ".nii"
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True)
        for path in sorted((src / sub).glob("*.nii.gz")):
            (dst / sub / path.name[: -len(".gz")]).write_bytes(gzip.decompress(path.read_bytes()))
    (dst / "dataset.json").write_text(json.dumps(spec, indent=2))
    return dst


def make_scaled_bank(src: Path, dst: Path, factor: int) -> dict:
    """A bank `factor` × larger: arrays concatenated `factor` times, each lesion entry followed by its copies."""
    dst.mkdir(parents=True)
    index = json.loads((src / "bank.json").read_text())
    n_img = (src / IMAGES_FILE).stat().st_size // 4   # offsets count float32 elements
    n_mask = (src / MASKS_FILE).stat().st_size        # and uint8 elements
    n_spline = (src / SPLINES_FILE).stat().st_size // 4
    for name in (IMAGES_FILE, MASKS_FILE, SPLINES_FILE):
        with open(src / name, "rb") as fin, open(dst / name, "wb") as fout:
            for _ in range(factor):
                fin.seek(0)
                shutil.copyfileobj(fin, fout, 16 << 20)
    for other in src.iterdir():  # likelihood map, body regions: per case, not per lesion
        if other.name not in (IMAGES_FILE, MASKS_FILE, SPLINES_FILE, "bank.json"):
            shutil.copy2(other, dst / other.name)
    lesions = []
    for les in index["lesions"]:
        for k in range(factor):
            entry = dict(les)
            if k:
                entry["id"] = f"{les['id']}~copy{k}"
                entry["image_offset"] = les["image_offset"] + k * n_img
                entry["mask_offset"] = les["mask_offset"] + k * n_mask
                entry["spline_offset"] = les["spline_offset"] + k * n_spline
            lesions.append(entry)
    index["lesions"] = lesions
    (dst / "bank.json").write_text(json.dumps(index, indent=1) + "\n")
    return {"lesions": len(lesions), "bank_json_bytes": (dst / "bank.json").stat().st_size,
            "array_bytes": sum((dst / f).stat().st_size for f in (IMAGES_FILE, MASKS_FILE))}


def case_times(tm: dict) -> dict:
    """read / lesion / write / total seconds of one case from `synthesize_case`'s timings."""
    return {"read_s": tm["read_s"], "lesion_s": tm["lesion_s"], "write_s": tm["write_s"],
            "total_s": tm["read_s"] + tm["lesion_s"] + tm["write_s"]}


def run_generate(bank: Path, out: Path, cfg: GenerateConfig, jobs: int, cpu: list | None = None):
    t, c = time.perf_counter(), time.process_time()
    result = generate(bank, out, cfg, jobs=jobs, progress=False)
    wall = time.perf_counter() - t
    if cpu is not None:  # this process's CPU time (its threads included; not forked workers')
        cpu.append(time.process_time() - c)
    timings = {t["case_id"]: t for t in result.timings}
    cases = []
    for rec in result.records:
        tm = timings[rec["case_id"]]
        cases.append({"case_id": rec["case_id"], "base_case": rec["base_case"], **case_times(tm),
                      "pastes": rec["lesions_added"], "inpaints": rec["lesions_removed"],
                      "failed_tries": rec["failed_placements"], "reached": rec["reached"],
                      "base_reused": bool(tm.get("base_reused"))})
    return wall, cases, result


def case_stats(cases: list[dict]) -> dict:
    return {k: summary(c[k] for c in cases) for k in ("read_s", "lesion_s", "write_s", "total_s")}


def file_digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("imagesTr", "labelsTr") for p in sorted((out / sub).iterdir())}


def layout_of(out: Path, cfg: GenerateConfig, bank_dir: Path):
    """The output layout generate hands its workers for a run of `cfg` from `bank_dir` into `out`."""
    bank = Bank(bank_dir)
    return run_layout(out, cfg, bank, run_record(bank, bank_dir, cfg))


def count_lesions(out: Path, records: list[dict], connectivity: int, ending: str) -> list[int]:
    from scipy import ndimage

    from lesionsynth.geometry import structure_for
    from lesionsynth.io.nifti import load_nifti, read_array

    counts = []
    for rec in records:
        path = out / "labelsTr" / f"{rec['case_id']}{ending}"
        label = read_array(load_nifti(path), path, np.uint8)
        counts.append(int(ndimage.label(label > 0, structure=structure_for(connectivity))[1]))
    return counts


def interleaved(banks: dict[str, Path], cfg: GenerateConfig, n: int, rounds: int, base_cases: list[str],
                tmp: Path, level: int, ending: str, torchio=None, torchio_cases=()) -> dict[str, list]:
    """Per case, back to back in this process: the I/O floor on its base case and `synthesize_case` (what
    every generate worker runs per case) with each bank; the order rotates from case to case and round to
    round. In the first round the cases in `torchio_cases` also run `torchio(i, base_case)` right after them.
    On a shared machine whose speed drifts over minutes, only measurements taken seconds apart can be
    compared; a whole run of one variant, then of another, compares two periods of the machine."""
    bank = Bank(banks["1x"])
    refs = {r.case_id: r for r in bank.case_refs()}
    val_folds = fold_assignment([c["case_id"] for c in bank.cases], cfg.folds, cfg.seed)
    for name in ["floor", *banks]:
        (tmp / name / "imagesTr").mkdir(parents=True)
        (tmp / name / "labelsTr").mkdir()
    n_channels = len(bank.channel_names)

    def floor(i):
        t0 = time.perf_counter()
        case = load_case(refs[base_cases[i]], n_channels)
        t1 = time.perf_counter()
        write_case(tmp / "floor", f"floor{i:05d}", case.channels, case.label, case, ending, level)
        t2 = time.perf_counter()
        return {"read_s": t1 - t0, "write_s": t2 - t1, "total_s": t2 - t0}

    def generate_with(name):
        layout = layout_of(tmp / name, cfg, banks[name])

        def run(i):
            return case_times(synthesize_case(i, str(banks[name]), layout, cfg, val_folds)[1])
        return run

    variants = {"floor": floor, **{name: generate_with(name) for name in banks}}
    names = list(variants)
    out = {name: [[None] * n for _ in range(rounds)] for name in names}
    out["torchio"] = []
    for r in range(rounds):
        for i in range(n):
            k = (i + r) % len(names)
            for name in names[k:] + names[:k]:
                out[name][r][i] = variants[name](i)
            if torchio is not None and r == 0 and i in torchio_cases:
                out["torchio"].append(torchio(i, base_cases[i]))
    return out


def floor_run(bank_dir: Path, base_cases: list[str], out: Path, level: int, ending: str, overlap: bool
              ) -> tuple[float, float]:
    """(wall s, CPU s of this process) of the I/O floor of a whole run: read and write the base case of every
    output case, no lesion work. `overlap`: through the same `parallel.overlapped` as generate at --jobs 1
    (the next case read and the previous one written in two threads); else one case after another."""
    bank = Bank(bank_dir)
    refs = {r.case_id: r for r in bank.case_refs()}
    n_channels = len(bank.channel_names)
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()

    def read(i):
        return i, load_case(refs[base_cases[i]], n_channels)

    def write(job):
        i, case = job
        write_case(out, f"floor{i:05d}", case.channels, case.label, case, ending, level)

    t, cpu = time.perf_counter(), time.process_time()
    if not overlap:
        for i in range(len(base_cases)):
            write(read(i))
    else:
        for _ in overlapped(range(len(base_cases)), read, lambda job: job, write):
            pass
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    shutil.rmtree(out)
    return wall, cpu


def best_of_rounds(per_round: list[list[dict]], key: str = "total_s") -> list[float]:
    """Per case, the fastest of the rounds (a shared machine only ever adds time)."""
    return [min(rnd[i][key] for rnd in per_round) for i in range(len(per_round[0]))]


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
a = json.loads(sys.argv[1])


def status_kib(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


import numpy, scipy.ndimage, skfmm, nibabel
from lesionsynth.bank import Bank
from lesionsynth.pipeline import GenerateConfig, open_bank, run_layout, run_record, synthesize_cases
from lesionsynth.plan import AugmentConfig, plan_and_render_case
from lesionsynth.render import render_op
conf = dict(a["cfg"]); conf["load_range"] = tuple(conf["load_range"]) if conf["load_range"] else None
conf["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in conf["augment"].items()})
cfg = GenerateConfig(**conf)
bank = open_bank(a["bank"])
layout = run_layout(Path(a["out"]), cfg, bank, run_record(bank, a["bank"], cfg))
base = status_kib("VmHWM")
base_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
# a worker's run of cases of one base case: the base case is read once, restored after each case
rec, tm = synthesize_cases(a["indices"], a["bank"], layout, cfg, a["val_folds"])[0]
wall = time.perf_counter() - t
peak = status_kib("VmHWM")
peak_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"index": a["indices"][0], "cases": len(a["indices"]), "base_case": rec["base_case"],
                  "baseline_kib": base, "peak_kib": peak,
                  "ru_maxrss_baseline_kib": base_ru, "ru_maxrss_peak_kib": peak_ru,
                  "pastes": rec["lesions_added"], "inpaints": rec["lesions_removed"], "wall_s": wall}))
"""


def peak_memory(bank_dir: Path, cfg: GenerateConfig, indices: list[int], tmp: Path) -> list[dict]:
    """Run each case in a fresh child process; peak RSS after imports + bank (baseline) and after the case,
    with the next case of the same base case after it, as a worker runs them (`pipeline.synthesize_cases`).

    The peak is the child's VmHWM (/proc/self/status): ru_maxrss is not usable here because Linux carries
    the parent's high-water mark over the exec of the child (the parent holds several cases by then),
    so the child's ru_maxrss would report the benchmark process's peak; both are recorded in the JSON.
    """
    bank = Bank(bank_dir)
    val_folds = fold_assignment([c["case_id"] for c in bank.cases], cfg.folds, cfg.seed)
    conf = {"n": cfg.n, "load": cfg.load, "seed": cfg.seed, "folds": cfg.folds, "include_originals": False,
            "load_range": list(cfg.load_range) if cfg.load_range else None,
            "compression_level": cfg.compression_level, "file_ending": cfg.file_ending,
            "augment": dataclasses.asdict(cfg.augment)}
    rows = []
    for i in indices:
        out = tmp / f"case{i}"
        (out / "imagesTr").mkdir(parents=True)
        (out / "labelsTr").mkdir()
        ids = [c["case_id"] for c in bank.cases]
        base = base_case_of(i, val_folds, ids, cfg.seed)[2]
        run = [i] + [j for j in range(i + 1, cfg.n) if base_case_of(j, val_folds, ids, cfg.seed)[2] == base][:1]
        arg = json.dumps({"cfg": conf, "bank": str(bank_dir), "out": str(out), "indices": run,
                          "val_folds": val_folds})
        env = dict(os.environ)
        # the child imports the lesionsynth this process runs (an installed one, or the checkout's)
        env["PYTHONPATH"] = str(PACKAGE_PARENT) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, env=env,
                              check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        shutil.rmtree(out)
    return rows


def torchio_runner(bank: Bank, level: int, tmp: Path, seed: int, ending: str, threads: int = 0):
    """(info, run) where run(i, base_case) times TorchIO read → RandomElasticDeformation → write (lesionsynth's
    save_nifti, same codec) on one base case; None when torchio is not importable. `threads` > 0 sets
    SimpleITK's (and torch's) thread count, else their defaults (all cores)."""
    try:
        import torch
        import torchio as tio
    except ImportError:
        return None
    try:
        import SimpleITK as sitk
        if threads > 0:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            torch.set_num_threads(threads)
        threads = int(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
    except Exception:  # pragma: no cover
        threads = None
    torch.manual_seed(seed)
    refs = {r.case_id: r for r in bank.case_refs()}
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    transform = tio.RandomElasticDeformation()

    def run(i: int, base: str) -> dict:
        ref = refs[base]
        t0 = time.perf_counter()
        images = {f"ch{c}": tio.ScalarImage(p) for c, p in enumerate(ref.image_paths)}
        subject = tio.Subject(label=tio.LabelMap(ref.label_path), **images)
        subject.load()
        t1 = time.perf_counter()
        warped = transform(subject)
        t2 = time.perf_counter()
        for c in range(len(ref.image_paths)):
            img = warped[f"ch{c}"]
            save_nifti(tmp / "imagesTr" / f"tio{i:05d}_{c:04d}{ending}", img.data[0].numpy(), img.affine, None,
                       np.float32, level)
        lab = warped["label"]
        save_nifti(tmp / "labelsTr" / f"tio{i:05d}{ending}", lab.data[0].numpy(), lab.affine, None, np.uint8,
                   level)
        t3 = time.perf_counter()
        return {"case_index": i, "base_case": base, "read_s": t1 - t0, "deform_s": t2 - t1, "write_s": t3 - t2,
                "total_s": t3 - t0}

    return {"version": tio.__version__, "torch": torch.__version__, "sitk_threads": threads}, run


def profile_cases(bank_dir: Path, cfg: GenerateConfig, indices: list[int], tmp: Path, top: int = 15) -> str:
    bank = Bank(bank_dir)
    val_folds = fold_assignment([c["case_id"] for c in bank.cases], cfg.folds, cfg.seed)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    layout = layout_of(tmp, cfg, bank_dir)
    prof = cProfile.Profile()
    for i in indices:
        prof.enable()
        synthesize_case(i, str(bank_dir), layout, cfg, val_folds)
        prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime")
    buf.write(f"cProfile of synthesize_case over cases {indices} (top {top} by tottime)\n")
    stats.print_stats(top)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------- main

def fmt(v, unit="s", nd=3):
    if v is None:
        return "-"
    return f"{v:.{nd}f}{unit}" if unit else f"{v:.{nd}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 cases, 1 TorchIO case, 1 memory case")
    parser.add_argument("--cases", type=int, default=None, help="output cases per generate run (default 12)")
    parser.add_argument("--data", default=str(ROOT / ".cache" / "data" / "mni_lesions"))
    parser.add_argument("--load", default="high")
    parser.add_argument("--load-range", type=float, nargs=2, metavar=("LO", "HI"), default=None)
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression-level", type=int, default=1)
    parser.add_argument("--codec", choices=sorted(ENDINGS), default="gz",
                        help="gz (default): the dataset as fetched and .nii.gz output; nii: an uncompressed copy of "
                             "the dataset and .nii output, for the generate, floor and TorchIO runs alike")
    parser.add_argument("--torchio-cases", type=int, default=None, help="default 3 (quick: 1); 0 skips")
    parser.add_argument("--torchio-threads", type=int, default=0,
                        help="SimpleITK/torch threads for TorchIO (default 0: their default, all cores)")
    parser.add_argument("--memory-cases", type=int, default=None, help="default min(N, 6) (quick: 1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of whole generate calls at jobs 1 and jobs 2, back to back in alternating "
                             "order; the median of the rounds' ratios gives the throughput gain (default 3; quick: 1)")
    parser.add_argument("--pair-rounds", type=int, default=None,
                        help="interleaved per-case rounds of floor, 1x bank and 10x bank; per case the fastest is "
                             "compared (default 3; quick: 1)")
    parser.add_argument("--profile", type=int, default=0, metavar="K", help="cProfile K cases at the end")
    parser.add_argument("--work", default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args()
    n = args.cases or (3 if args.quick else 12)
    n_tio = args.torchio_cases if args.torchio_cases is not None else (1 if args.quick else 3)
    n_rounds = max(1, args.rounds if args.rounds is not None else (1 if args.quick else 3))
    n_pairs = max(1, args.pair_rounds if args.pair_rounds is not None else (1 if args.quick else 3))
    n_mem = args.memory_cases if args.memory_cases is not None else (1 if args.quick else min(n, 6))

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_generate."))
    work.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    results: dict = {"args": vars(args), "n": n, "machine": {
        "python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
        "platform": platform.platform(), "isal": has_fast_gzip(), "loadavg_start": os.getloadavg()}}
    try:
        # -- banks (building reads every case once, so all base files are in the page cache afterwards)
        bank1 = work / "bank"
        t = time.perf_counter()
        data = Path(args.data)
        if args.codec == "nii":
            data = uncompressed_copy(data, work / "data_nii")
        build_bank(data, bank1, BankConfig(), jobs=2, progress=False)
        results["bank_build_s"] = time.perf_counter() - t
        bank10 = work / f"bank_x{BANK_FACTOR}"
        t = time.perf_counter()
        results["bank_x10"] = make_scaled_bank(bank1, bank10, BANK_FACTOR)
        results["bank_x10"]["make_s"] = time.perf_counter() - t
        bank = Bank(bank1)
        results["bank_1x"] = {"lesions": len(bank.lesions), "cases": len(bank.cases),
                              "bank_json_bytes": (bank1 / "bank.json").stat().st_size}
        log(f"bank: {len(bank.lesions)} lesions from {len(bank.cases)} cases ({results['bank_build_s']:.1f}s); "
            f"10x bank: {results['bank_x10']['lesions']} lesions")
        cfg = gen_config(args, n, bank.typical_lesion_count)

        # -- 1. generate at --jobs 1 (also the 1x bank run)
        wall1, cases1, res1 = run_generate(bank1, work / "out_j1", cfg, 1)
        log(f"generate jobs=1: {wall1:.1f}s for {n} cases")
        counts = count_lesions(work / "out_j1", res1.records, int(bank.config["connectivity"]), ENDINGS[args.codec])
        for c, k in zip(cases1, counts):
            c["lesions_written"] = k
        base_cases = [c["base_case"] for c in cases1]

        # -- 2./4. floor, 1x and 10x bank per case, interleaved (see `interleaved`): the ratios come from here
        runner = None
        if n_tio > 0:
            runner = torchio_runner(bank, args.compression_level, work / "tio", args.seed, ENDINGS[args.codec],
                                    args.torchio_threads)
            log("TorchIO: " + ("not importable, skipped" if runner is None else f"{min(n_tio, n)} cases, interleaved"))
        pairs = interleaved({"1x": bank1, "10x": bank10}, cfg, n, n_pairs, base_cases, work / "pairs",
                            args.compression_level, ENDINGS[args.codec], runner[1] if runner else None,
                            set(np.linspace(0, n - 1, min(n_tio, n)).round().astype(int).tolist()))
        tio_res = {**runner[0], "cases": pairs.pop("torchio")} if runner else None
        shutil.rmtree(work / "tio", ignore_errors=True)
        shutil.rmtree(work / "pairs")
        best_floor, best1, best10 = (best_of_rounds(pairs[k]) for k in ("floor", "1x", "10x"))
        log(f"interleaved per case: {n_pairs} rounds of floor, 1x bank and 10x bank")

        # -- 3. whole generate calls: jobs 1 with the 10x bank (byte identity), jobs 2 and jobs 1 (throughput)
        rounds_1x, rounds_10x, rounds_j2 = [cases1], [], []
        walls = {"jobs1": [], "jobs1_bank_x10": [], "jobs2": [], "floor": [], "floor_overlapped": [],
                 "jobs1_reads": []}
        cpus = {"jobs1": [], "floor": [], "floor_overlapped": [], "jobs1_reads": []}
        reused = {}
        identical = None

        def run_floor(r, overlap=False):
            key = "floor_overlapped" if overlap else "floor"
            w, c = floor_run(bank1, base_cases, work / f"floor_r{r}", args.compression_level, ENDINGS[args.codec],
                             overlap)
            walls[key].append(w)
            cpus[key].append(c)

        def run_1x(r):
            w, c, _ = run_generate(bank1, work / f"out_r{r}_1x", cfg, 1, cpus["jobs1"])
            shutil.rmtree(work / f"out_r{r}_1x")
            walls["jobs1"].append(w)
            rounds_1x.append(c)
            reused["jobs1"] = sum(case["base_reused"] for case in c)

        def run_1x_reads(r):
            # every case reads its base case from its files (no base reused: groups of one base)
            saved, pipeline.REUSE_BASES = pipeline.REUSE_BASES, 1
            try:
                w, c, _ = run_generate(bank1, work / f"out_r{r}_reads", cfg, 1, cpus["jobs1_reads"])
            finally:
                pipeline.REUSE_BASES = saved
            shutil.rmtree(work / f"out_r{r}_reads")
            walls["jobs1_reads"].append(w)
            reused["jobs1_reads"] = sum(case["base_reused"] for case in c)

        def run_10x(r):
            nonlocal identical
            w, c, _ = run_generate(bank10, work / f"out_r{r}_10x", cfg, 1)
            if identical is None:
                identical = file_digests(work / "out_j1") == file_digests(work / f"out_r{r}_10x")
            shutil.rmtree(work / f"out_r{r}_10x")
            walls["jobs1_bank_x10"].append(w)
            rounds_10x.append(c)

        def run_j2(r):
            w, c, _ = run_generate(bank1, work / f"out_r{r}_j2", cfg, 2)
            shutil.rmtree(work / f"out_r{r}_j2")
            walls["jobs2"].append(w)
            rounds_j2.append(c)

        run_10x(0)  # once: the byte identity with the 1x bank (its per-case times come from item 2)
        for r in range(n_rounds):
            # jobs 1 and jobs 2 back to back, in an order that alternates: each round's ratio compares
            # one period of the machine, whose speed drifts over minutes
            steps = [run_1x, run_j2, run_floor, lambda r: run_floor(r, overlap=True), run_1x_reads]
            for step in steps[r % 5:] + steps[:r % 5]:
                step(r)
            log(f"round {r + 1}/{n_rounds}: jobs 1 {walls['jobs1'][-1]:.1f}s, jobs 2 {walls['jobs2'][-1]:.1f}s "
                f"({walls['jobs1'][-1] / walls['jobs2'][-1]:.2f}x), I/O floor {walls['floor'][-1]:.1f}s "
                f"(overlapped {walls['floor_overlapped'][-1]:.1f}s)")
        log(f"jobs 1 with the 10x bank {walls['jobs1_bank_x10'][0]:.1f}s (outputs identical to 1x: {identical})")
        cases10, cases2 = rounds_10x[0], rounds_j2[0]
        wall1, wall10, wall2 = min(walls["jobs1"]), min(walls["jobs1_bank_x10"]), min(walls["jobs2"])
        round_speedups = [a / b for a, b in zip(walls["jobs1"], walls["jobs2"])]
        # generate's own jobs-1 calls are rounds 1.. of walls["jobs1"] (the first call, item 1, ran apart)
        vs_floor_rounds = [a / b for a, b in zip(walls["jobs1"], walls["floor"])]
        vs_overlapped_rounds = [a / b for a, b in zip(walls["jobs1"], walls["floor_overlapped"])]
        reads_vs_floor_rounds = [a / b for a, b in zip(walls["jobs1_reads"], walls["floor"])]

        # -- 5. peak memory per worker
        mem = peak_memory(bank1, cfg, list(range(min(n_mem, n))), work / "mem")
        shutil.rmtree(work / "mem", ignore_errors=True)
        shape = tuple(bank.cases[0]["shape"])
        voxels = int(np.prod(shape))
        case_bytes = voxels * (4 * len(bank.channel_names) + 1)
        log(f"memory: {len(mem)} child runs")

        profile_text = None
        if args.profile:
            profile_text = profile_cases(bank1, cfg, list(range(min(args.profile, n))), work / "prof")
            shutil.rmtree(work / "prof", ignore_errors=True)
        results["machine"]["loadavg_end"] = os.getloadavg()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ report
    g1, g10, g2 = case_stats(cases1), case_stats(cases10), case_stats(cases2)
    fl = {k: summary(r[k] for r in pairs["floor"][0]) for k in ("read_s", "write_s", "total_s")}
    p1 = {k: summary(best_of_rounds(pairs["1x"], k)) for k in ("read_s", "lesion_s", "write_s", "total_s")}
    ratio_floor = statistics.median(best1) / statistics.median(best_floor)
    per_case_ratio = summary(a / b for a, b in zip(best1, best_floor))
    thr1, thr2 = n / wall1, n / wall2
    speedup = statistics.median(round_speedups)
    b1, b10 = summary(best1), summary(best10)
    bank_ratio = b10["median"] / b1["median"]
    paired_bank = summary(b / a for a, b in zip(best1, best10))
    mib = 1024.0
    mem_inc = summary((m["peak_kib"] - m["baseline_kib"]) / mib for m in mem)
    mem_tot = summary(m["peak_kib"] / mib for m in mem)
    mem_base = summary(m["baseline_kib"] / mib for m in mem)
    case_mib = case_bytes / 2**20
    lesions = summary(c["lesions_written"] for c in cases1)
    in_band = sum(5 <= c["lesions_written"] <= 30 for c in cases1)

    rows = [("generate j1 read (whole run)", g1["read_s"], "s"),
            ("generate j1 lesion work (whole run)", g1["lesion_s"], "s"),
            ("generate j1 write (whole run)", g1["write_s"], "s"),
            ("generate j1 total / case (whole run)", g1["total_s"], "s"),
            ("generate j2 total / case (in worker)", g2["total_s"], "s"),
            ("generate j1 total / case, 10x bank", g10["total_s"], "s"),
            (f"paired, min of {n_pairs}: floor read", summary(best_of_rounds(pairs["floor"], "read_s")), "s"),
            (f"paired, min of {n_pairs}: floor write", summary(best_of_rounds(pairs["floor"], "write_s")), "s"),
            (f"paired, min of {n_pairs}: floor total", summary(best_floor), "s"),
            (f"paired, min of {n_pairs}: generate read", p1["read_s"], "s"),
            (f"paired, min of {n_pairs}: generate lesion", p1["lesion_s"], "s"),
            (f"paired, min of {n_pairs}: generate write", p1["write_s"], "s"),
            (f"paired, min of {n_pairs}: generate total", b1, "s"),
            (f"paired, min of {n_pairs}: 10x bank total", b10, "s"),
            ("paired: generate / floor per case", per_case_ratio, "x"),
            ("paired: 10x / 1x bank per case", paired_bank, "x"),
            ("peak RSS increment / worker", mem_inc, " MiB"), ("peak RSS total / worker", mem_tot, " MiB"),
            ("RSS after imports + bank", mem_base, " MiB"),
            ("pastes / case", summary(c["pastes"] for c in cases1), ""),
            ("inpaints / case", summary(c["inpaints"] for c in cases1), ""),
            ("failed placement tries / case", summary(c["failed_tries"] for c in cases1), ""),
            ("lesions in written label / case", lesions, "")]
    tio_stats = None
    if tio_res:
        tio_stats = {k: summary(r[k] for r in tio_res["cases"]) for k in ("read_s", "deform_s", "write_s", "total_s")}
        rows += [("TorchIO read", tio_stats["read_s"], "s"), ("TorchIO RandomElasticDeformation", tio_stats["deform_s"], "s"),
                 ("TorchIO write (same writer and codec)", tio_stats["write_s"], "s"),
                 ("TorchIO total / case", tio_stats["total_s"], "s")]

    print()
    print(f"bench_generate: {n} cases of {'x'.join(map(str, shape))}, {len(bank.channel_names)} float32 channels, "
          f"--load {args.load}" + (f" --load-range {args.load_range[0]:g} {args.load_range[1]:g}" if args.load_range else "")
          + f", --folds {args.folds}, seed {args.seed}, "
          + (f"gzip level {args.compression_level} ({'isal' if has_fast_gzip() else 'stdlib gzip'})"
             if args.codec == "gz" else "uncompressed .nii in and out")
          + f"; {os.cpu_count()} CPUs, load average "
          f"{results['machine']['loadavg_start'][0]:.2f} at start, {results['machine']['loadavg_end'][0]:.2f} at end")
    print(f"bank 1x: {len(bank.lesions)} lesions, bank.json {results['bank_1x']['bank_json_bytes'] / 1e6:.2f} MB; "
          f"bank 10x: {results['bank_x10']['lesions']} lesions, bank.json "
          f"{results['bank_x10']['bank_json_bytes'] / 1e6:.2f} MB, arrays {results['bank_x10']['array_bytes'] / 1e6:.0f} MB; "
          f"10x outputs byte-identical to 1x: {identical}")
    print(f"lesions per written case: {[c['lesions_written'] for c in cases1]} ({in_band}/{n} in 5-30); "
          f"base cases: {base_cases}")
    print("times are per case, wall clock; median over cases (min, max) on a shared machine")
    print()
    w = 40
    print(f"{'row':<{w}} {'median':>12} {'min':>12} {'max':>12}")
    print("-" * (w + 39))
    for name, s, unit in rows:
        nd = 3 if unit in ("s", "x") else (0 if unit == " MiB" else 1)
        print(f"{name:<{w}} {fmt(s['median'], unit, nd):>12} {fmt(s['min'], unit, nd):>12} {fmt(s['max'], unit, nd):>12}")
    print("-" * (w + 39))
    print(f"{'one case in memory (channels + label)':<{w}} {case_mib:>8.1f} MiB")
    rw = lambda k: ", ".join(f"{v:.2f}" for v in walls[k])  # noqa: E731
    print(f"{'whole generate call, jobs 1':<{w}} {wall1:>11.2f}s  ({thr1:.3f} cases/s; rounds {rw('jobs1')})")
    print(f"{'whole generate call, jobs 2':<{w}} {wall2:>11.2f}s  ({thr2:.3f} cases/s; rounds {rw('jobs2')})")
    print(f"{'whole generate call, jobs 1, 10x bank':<{w}} {wall10:>11.2f}s  (rounds {rw('jobs1_bank_x10')})")
    print("(whole call = bank opening, run.json, worker start-up at jobs 2, all cases, manifest/dataset.json/"
          "splits; originals left out)")
    print()

    vs_floor = statistics.median(vs_floor_rounds)
    rr = lambda v: ", ".join(f"{x:.2f}x" for x in v)  # noqa: E731
    per_case = lambda k: statistics.median(walls[k]) / n  # noqa: E731
    print(f"{'whole I/O floor call (read + write), jobs 1':<{w}} {min(walls['floor']):>11.2f}s  "
          f"(rounds {rw('floor')}; overlapped as generate does: {rw('floor_overlapped')})")
    print(f"per case, median over rounds: generate jobs 1 {per_case('jobs1'):.3f}s wall, "
          f"{statistics.median(cpus['jobs1']) / n:.3f}s CPU; I/O floor {per_case('floor'):.3f}s wall, "
          f"{statistics.median(cpus['floor']) / n:.3f}s CPU; overlapped floor {per_case('floor_overlapped'):.3f}s "
          f"wall, {statistics.median(cpus['floor_overlapped']) / n:.3f}s CPU")
    print(f"base cases: {reused['jobs1']} of {n} cases at --jobs 1 took their base case's arrays over from an "
          f"earlier case of it (restored) instead of reading its files; with every base case read from its "
          f"files ({reused['jobs1_reads']} reused): {per_case('jobs1_reads'):.3f}s wall, "
          f"{statistics.median(cpus['jobs1_reads']) / n:.3f}s CPU per case = "
          f"{statistics.median(reads_vs_floor_rounds):.2f}x the I/O floor (rounds {rr(reads_vs_floor_rounds)})")
    print(f"generate jobs 1 / overlapped I/O floor: {statistics.median(vs_overlapped_rounds):.2f}x "
          f"(rounds {rr(vs_overlapped_rounds)}); stages one after another (interleaved per case, no overlap): "
          f"{ratio_floor:.2f}x")
    print()

    checks = [
        ("generate per case <= 1.2x I/O floor (jobs 1)", vs_floor, vs_floor <= TARGETS["generate_vs_floor"],
         f"whole calls, median over {n_rounds} rounds of generate --jobs 1 / read + write of the same base "
         f"cases, back to back: {vs_floor:.2f}x (rounds {rr(vs_floor_rounds)}); {per_case('jobs1'):.3f}s / "
         f"{per_case('floor'):.3f}s per case"),
        ("throughput jobs 2 >= 1.8x jobs 1", speedup, speedup >= TARGETS["jobs2_speedup"],
         f"(jobs 1 overlaps its I/O with the lesion work in threads: "
         f"{statistics.median(cpus['jobs1']) / statistics.median(walls['jobs1']):.2f} cores busy) median over {n_rounds} rounds of jobs 1 and jobs 2 back to back: {speedup:.2f}x (rounds "
         f"{', '.join(f'{v:.2f}x' for v in round_speedups)}); fastest calls {thr2:.3f} / {thr1:.3f} cases/s "
         f"= {thr2 / thr1:.2f}x"),
        ("10x bank within 10% of 1x (per case)", bank_ratio, abs(bank_ratio - 1) <= TARGETS["bank10_within"],
         f"{b10['median']:.3f}s / {b1['median']:.3f}s = {bank_ratio:.3f}x (medians of per-case min over "
         f"{n_pairs} interleaved rounds; paired per case {paired_bank['median']:.3f}x)"),
    ]
    if mem:
        checks.append(("peak memory per worker <= 3x one case", mem_inc["max"] / case_mib,
                       mem_inc["max"] / case_mib <= TARGETS["memory_vs_case"],
                       f"max increment {mem_inc['max']:.0f} MiB / {case_mib:.1f} MiB = "
                       f"{mem_inc['max'] / case_mib:.2f}x (total RSS {mem_tot['max']:.0f} MiB = "
                       f"{mem_tot['max'] / case_mib:.2f}x)"))
    else:
        checks.append(("peak memory per worker <= 3x one case", None, None, "skipped (--memory-cases 0)"))
    if tio_stats:
        same = [pairs["1x"][0][row["case_index"]]["total_s"] for row in tio_res["cases"]]
        paired_tio = summary(row["total_s"] / g for row, g in zip(tio_res["cases"], same))
        round1 = statistics.median(c["total_s"] for c in pairs["1x"][0])
        vs = tio_stats["total_s"]["median"] / round1
        checks.append(("lesionsynth >= 20x faster than TorchIO", vs, vs >= TARGETS["vs_torchio"],
                       f"{tio_stats['total_s']['median']:.3f}s / {round1:.3f}s = {vs:.2f}x (medians per case, "
                       f"first interleaved round; paired with the same case {paired_tio['median']:.2f}x, "
                       f"{paired_tio['min']:.2f}-{paired_tio['max']:.2f}x over {len(same)} cases; against "
                       f"generate's best-of-rounds median {tio_stats['total_s']['median'] / b1['median']:.2f}x, its "
                       f"whole-run median {tio_stats['total_s']['median'] / g1['total_s']['median']:.2f}x; TorchIO "
                       f"{tio_res['version']}, SimpleITK threads {tio_res['sitk_threads']})"))
    else:
        why = "torchio not importable" if n_tio > 0 else "--torchio-cases 0"
        checks.append(("lesionsynth >= 20x faster than TorchIO", None, None, f"skipped ({why})"))
    print("targets (issue 3)")
    for name, _value, ok, detail in checks:
        verdict = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        print(f"  {verdict}  {name:<46} {detail}")
    if profile_text:
        print()
        print(profile_text)

    results.update({
        "shape": list(shape), "channels": len(bank.channel_names), "one_case_mib": case_mib,
        "cases_jobs1": cases1, "cases_jobs2": cases2, "cases_bank_x10": cases10,
        "rounds": {"n": n_rounds, "jobs1": rounds_1x, "jobs1_bank_x10": rounds_10x, "jobs2": rounds_j2,
                   "walls_s": walls, "cpu_s": cpus, "generate_vs_floor": vs_floor_rounds,
                   "generate_vs_overlapped_floor": vs_overlapped_rounds},
        "interleaved": {"n": n_pairs, **pairs, "best_1x_s": best1, "best_10x_s": best10, "best_floor_s": best_floor},
        "memory": mem, "torchio": tio_res, "outputs_identical_1x_10x": identical,
        "wall_s": {"jobs1": wall1, "jobs2": wall2, "jobs1_bank_x10": wall10},  # fastest of the rounds
        "jobs2_speedup_rounds": round_speedups,
        "stats": {"generate_jobs1": g1, "generate_jobs2": g2, "generate_bank_x10": g10, "io_floor": fl,
                  "torchio": tio_stats, "memory_increment_mib": mem_inc, "memory_total_mib": mem_tot,
                  "lesions_written": lesions, "generate_vs_floor_paired": per_case_ratio,
                  "bank_x10_vs_1x_paired": paired_bank},
        "targets": [{"name": name, "value": value, "pass": ok, "detail": detail} for name, value, ok, detail in checks],
        "profile": profile_text,
    })
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
