"""Command line: parses options and calls the library. Errors become one line on stderr."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from ._version import __version__
from .errors import InputError, LesionsynthError

# plain help: rich markup would swallow the square brackets of help texts ("[augment]", "[default: 26]")
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Lesion-level synthesis of training data for lesion segmentation (LesionMix).")

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lesionsynth {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug


@app.command("build-bank")
def build_bank_cmd(
    dataset: Path = typer.Argument(..., help="nnU-Net v2 raw folder, MSD folder, or CSV case list."),
    out: Path = typer.Option(..., "--out", help="New folder for the lesion bank."),
    lesion_label: Optional[List[int]] = typer.Option(None, "--lesion-label",
                                                     help="Label value(s) that mark lesions [default: 1]."),
    region_label: Optional[List[int]] = typer.Option(None, "--region-label",
                                                     help="Label value(s) where lesions may live "
                                                          "[default: body foreground]."),
    connectivity: Optional[int] = typer.Option(None, "--connectivity", help="6, 18 or 26 [default: 26]."),
    min_volume: Optional[float] = typer.Option(None, "--min-volume",
                                               help="Smallest lesion kept in the bank, mm³ [default: 0]."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Parallel workers."),
    backend: str = typer.Option("local", "--backend", help="local (worker processes on this machine) or dask."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address (--backend dask)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe name (see 'lesionsynth recipes') or "
                                         "TOML file; options given here override it."),
    space: Optional[str] = typer.Option(None, "--space", help="Common space of the likelihood map: register "
                                        "(affine registration of every case to one reference), world (the cases' "
                                        "world coordinates as they are) or auto (world when the cases share a grid "
                                        "or are already aligned) [default: auto]."),
    template: Optional[Path] = typer.Option(None, "--template", help="Template image to register the cases to "
                                            "[default: the dataset case closest to the others]."),
    template_region: Optional[Path] = typer.Option(None, "--template-region", help="Tissue prior (probability "
                                                   "map, e.g. white matter) in the template's space: lesions go "
                                                   "only where it is ≥ 0.5."),
    exclude_case: Optional[List[str]] = typer.Option(None, "--exclude-case", help="Leave this case out (e.g. one "
                                                     "whose registration is poor); repeatable."),
) -> None:
    """Cut every lesion out of DATASET into a bank and build the lesion likelihood map."""
    from .bank import Bank, BankConfig, build_bank
    from .recipes import load_recipe, make_config

    rec = load_recipe(recipe) if recipe else None
    config = make_config(BankConfig, rec, "bank", {
        "lesion_labels": tuple(lesion_label) if lesion_label else None,
        "region_labels": tuple(region_label) if region_label else None,
        "connectivity": connectivity, "min_volume_mm3": min_volume, "space": space,
        "template": str(template) if template else None,
        "template_region": str(template_region) if template_region else None,
        "exclude_cases": tuple(exclude_case) if exclude_case else None})
    if config.connectivity not in (6, 18, 26):
        raise InputError(f"--connectivity {config.connectivity}: must be 6, 18 or 26")
    overlap = set(config.lesion_labels) & set(config.region_labels)
    if overlap:
        raise InputError(f"label(s) {sorted(overlap)} cannot be both --lesion-label and --region-label")
    path = build_bank(dataset, out, config, jobs=_jobs(jobs), extra_run_info={"recipe": rec and rec["ref"]},
                      backend=backend, scheduler=scheduler)
    bank = Bank(path)
    for line in space_lines(bank.index):
        typer.echo(line)
    typer.echo(f"bank: {path} ({len(bank.lesions)} lesions from {len(bank.cases)} cases)")


@app.command("recipes")
def recipes_cmd() -> None:
    """List the shipped recipes, one line each."""
    from .recipes import available, load_recipe

    for name in available():
        typer.echo(f"{name:18s} {load_recipe(name)['description']}")


@app.command()
def generate(
    bank: Path = typer.Argument(..., help="Lesion bank folder made by build-bank."),
    out: Path = typer.Option(..., "--out", help="Output folder (nnU-Net v2 raw dataset)."),
    n: int = typer.Option(..., "--n", help="Number of synthetic cases."),
    load: str = typer.Option(..., "--load", help="low, medium, high, uniform, gaussian or real."),
    mode: str = typer.Option("both", "--mode", help="both, populate, inpaint or replace (remove the base case's "
                             "lesions, then populate)."),
    seed: int = typer.Option(0, "--seed"),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Parallel workers."),
    load_range: Optional[Tuple[float, float]] = typer.Option(None, "--load-range", help="LO HI: load range in mm³ "
                                                             "instead of the bank's observed range."),
    tolerance: float = typer.Option(0.1, "--tolerance", help="Relative load tolerance."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds for splits_final.json."),
    include_originals: bool = typer.Option(True, "--include-originals/--no-include-originals"),
    compression_level: int = typer.Option(1, "--compression-level", help="gzip level (isal: 0-3)."),
    uncompressed: bool = typer.Option(False, "--uncompressed", help="Write .nii instead of .nii.gz."),
    output_format: str = typer.Option("nnunet", "--format", help="Output layout: nnunet (v2 raw dataset) or bids "
                                      "(BIDS derivative dataset)."),
    volume_warp: bool = typer.Option(False, "--volume-warp", help="Also warp each whole case (rotation ±10°, "
                                     "scale 0.9-1.1, smooth elastic field) before the lesion work."),
    resume: bool = typer.Option(False, "--resume", help="Complete an unfinished run of the same configuration."),
    backend: str = typer.Option("local", "--backend", help="local (worker processes on this machine) or dask."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address (--backend dask)."),
    device: str = typer.Option("cpu", "--device", help="cpu (numpy/scipy), cuda (torch on the GPU) or auto "
                               "(cuda when torch sees a GPU, else cpu)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe name or TOML file: its [augment] "
                                         "section sets the lesion augmentation ranges."),
    shard: str = typer.Option("0/1", "--shard", help="I/N: make only cases with index ≡ I (mod N); shards may "
                              "share OUT, and the last one to finish writes dataset.json and the splits."),
) -> None:
    """Generate N synthetic cases whose lesion load follows the chosen distribution."""
    from .pipeline import GenerateConfig, parse_shard
    from .pipeline import generate as run_generate

    lr = (float(load_range[0]), float(load_range[1])) if load_range else None
    from .plan import AugmentConfig
    from .recipes import load_recipe, make_config

    if recipe is None:  # default to the recipe the bank was built with
        from .bank import Bank

        recipe = Bank(bank).index.get("run", {}).get("recipe")
    augment = make_config(AugmentConfig, load_recipe(recipe) if recipe else None, "augment", {})
    cfg = GenerateConfig(augment=augment, n=n, load=load, mode=mode, seed=seed, tolerance=tolerance, load_range=lr, folds=folds,
                         include_originals=include_originals, compression_level=compression_level,
                         file_ending=".nii" if uncompressed else ".nii.gz", volume_warp=volume_warp, format=output_format)
    result = run_generate(bank, out, cfg, jobs=_jobs(jobs), resume=resume, shard=parse_shard(shard),
                          device=device, backend=backend, scheduler=scheduler)
    _summary(result, n)
    from .bank import Bank

    n_cases = len(Bank(bank).cases)
    if folds > n_cases:
        typer.echo(f"--folds {folds}: the bank holds {n_cases} cases, so {n_cases} folds were used "
                   f"(one case per validation fold in splits_final.json)")


@app.command()
def testset(
    bank: Path = typer.Argument(..., help="Lesion bank folder made by build-bank."),
    out: Path = typer.Option(..., "--out", help="New folder for the test set (imagesTs/, labelsTs/, strata.csv)."),
    vary: str = typer.Option(..., "--vary", help="The factor that changes between levels: load (lesion load, "
                             "mm³), size (few large or many small lesions at one load), contrast (brightness of "
                             "the pasted lesions) or noise (Gaussian noise over the whole case)."),
    levels: int = typer.Option(..., "--levels", help="Number of levels K."),
    per_level: int = typer.Option(..., "--per-level", help="Cases per level (the same base cases and seeds at "
                                  "every level)."),
    test_cases: Optional[str] = typer.Option(None, "--test-cases", help="ID,ID,...: the bank cases that are "
                                             "test cases (the only base cases and donors)."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="nnU-Net splits_final.json whose fold --fold "
                                          "'val' cases are the test cases."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Fold of --splits."),
    level_range: Optional[Tuple[float, float]] = typer.Option(None, "--range", help="LO HI of the levels: load "
                                                              "in mm³ (log-spaced; default: the bank's real "
                                                              "loads), contrast as paste brightness (default "
                                                              "0.5 1.5), noise in units of the case's own noise "
                                                              "sd (default 0 2)."),
    load_mm3: Optional[float] = typer.Option(None, "--load-mm3", help="The load held fixed by size, contrast and "
                                             "noise, mm³ (default: the test cases' median real load; size: at "
                                             "most 100 lesions of the smallest size bin)."),
    seed: int = typer.Option(0, "--seed"),
    tolerance: float = typer.Option(0.1, "--tolerance", help="Relative load tolerance."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Parallel workers."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe name or TOML file: its augment "
                                         "section sets the lesion augmentation ranges (default: the bank's)."),
    compression_level: int = typer.Option(1, "--compression-level", help="gzip level (isal: 0-3)."),
    uncompressed: bool = typer.Option(False, "--uncompressed", help="Write .nii instead of .nii.gz."),
    resume: bool = typer.Option(False, "--resume", help="Complete an unfinished run of the same configuration."),
) -> None:
    """Render the test cases at K graded levels of one factor, all else fixed, for nnU-Net inference and
    'lesionsynth score' (strata.csv: case_id,factor,level,value; level = the level's index, value = the
    factor measured on the written case)."""
    from .bank import Bank
    from .plan import AugmentConfig
    from .recipes import load_recipe, make_config
    from .testset import TestsetConfig, select_test_cases
    from .testset import testset as run_testset

    opened = Bank(bank)
    chosen = select_test_cases([c["case_id"] for c in opened.cases], test_cases, splits, fold)
    recipe = recipe or opened.index.get("run", {}).get("recipe")
    augment = make_config(AugmentConfig, load_recipe(recipe) if recipe else None, "augment", {})
    cfg = TestsetConfig(factor=vary, n_levels=levels, per_level=per_level, test_cases=chosen, seed=seed,
                        level_range=(float(level_range[0]), float(level_range[1])) if level_range else None,
                        load_mm3=load_mm3, tolerance=tolerance, compression_level=compression_level,
                        file_ending=".nii" if uncompressed else ".nii.gz", augment=augment)
    records = run_testset(bank, out, cfg, jobs=_jobs(jobs), resume=resume)
    reached = sum(r["reached"] for r in records)
    typer.echo(f"test set: {out} ({len(records)} cases, {levels} levels of {vary} from {len(chosen)} test "
               f"case(s); {reached} within tolerance of their load)")


def space_lines(index: dict) -> list[str]:
    """What build-bank says about the common space: the choice, and each case's registration."""
    space = index.get("space") or {"mode": "world", "why": "bank made before registration existed"}
    lines = [f"space: {space['mode']} ({space.get('why', '')})"]
    if space["mode"] == "register":
        lines[0] += f"; reference: {space.get('reference_name')}"
        for case in index["cases"]:
            reg = case["registration"]
            lines.append(f"  {case['case_id']}: foreground overlap {reg['foreground_overlap']:.3f}, "
                         f"{reg['seconds']:.1f} s, {reg['status']}")
    return lines


def _summary(result, n: int) -> None:
    reached = sum(r["reached"] for r in result.records)
    if len(result.records) < n:
        typer.echo(f"output: {result.out} ({len(result.records)} of {n} synthetic cases done; the remaining shards "
                   f"or 'lesionsynth finalize' complete it)")
    else:
        typer.echo(f"output: {result.out} ({len(result.records)} synthetic cases, {reached} within tolerance "
                   f"of their target load)")
    # a one-direction run picks bases on the right side of their targets where its folds have any
    stuck = [r for r in result.records if "-only mode cannot" in str(r.get("stop_reason"))
             and not r.get("lesions_added") and not r.get("lesions_removed")]
    if stuck:
        typer.echo(f"{len(stuck)} case(s) started on the wrong side of their target: no training case of their fold "
                   f"could reach it in --mode {stuck[0]['mode']} ({stuck[0]['stop_reason']}; see manifest.jsonl)")


@app.command()
def finalize(out: Path = typer.Argument(..., help="Output folder of a sharded generate run.")) -> None:
    """Write manifest.jsonl, dataset.json and splits_final.json once every shard of a run is done."""
    from .pipeline import finalize_run

    result = finalize_run(out)
    _summary(result, len(result.records))


@app.command()
def report(
    out: Path = typer.Argument(..., help="Output folder of generate."),
    examples: int = typer.Option(6, "--examples", help="How many cases to draw lesion sites for."),
    seed: int = typer.Option(0, "--seed", help="Which cases are drawn."),
) -> None:
    """Write OUT/report/report.html: load plots, lesion counts and sizes, before/after pictures of sites."""
    from .report import write_report

    typer.echo(f"report: {write_report(out, n_examples=examples, seed=seed)}")


@app.command("inspect")
def inspect_cmd(path: Path = typer.Argument(..., help="A dataset, a bank or an output folder.")) -> None:
    """One-screen summary of a dataset, a bank or an output."""
    from .inspect import summarize

    typer.echo(summarize(path))


@app.command()
def check(
    dataset: Path = typer.Argument(..., help="Dataset to check (nnU-Net v2, MSD or CSV list)."),
    lesion_label: List[int] = typer.Option([1], "--lesion-label", help="Label value(s) that mark lesions."),
    region_label: List[int] = typer.Option([], "--region-label", help="Label value(s) of the allowed region."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Parallel workers."),
) -> None:
    """Check every case of DATASET and print every problem found (exit status 2 if there is any)."""
    from .io.validate import format_report, validate_dataset

    spec, problems = validate_dataset(dataset, tuple(lesion_label), tuple(region_label), jobs=_jobs(jobs),
                                      progress=True)
    typer.echo(format_report(spec, problems))
    if problems:
        raise typer.Exit(InputError.exit_code)


@app.command("score")
def score_cmd(
    pred: Path = typer.Argument(..., help="Folder of predicted label files, as nnUNetv2_predict writes them "
                                "(CASE_ID + file ending; its other files are ignored)."),
    truth: Path = typer.Argument(..., help="The truth: a lesionsynth test set (labelsTs/ + strata.csv), an nnU-Net "
                                 "v2 raw dataset (labelsTs/, else labelsTr/) or a folder of label files."),
    out: Path = typer.Option(..., "--out", help="New folder for cases.csv, strata.csv, summary.json and score.html."),
    iou_threshold: float = typer.Option(0.0, "--iou-threshold", help="A truth lesion and a predicted component "
                                        "match when they overlap with IoU ≥ this (0: any overlap); one to one, "
                                        "highest IoU first."),
    connectivity: int = typer.Option(26, "--connectivity", help="Lesion connectivity: 6, 18 or 26."),
    lesion_label: Optional[List[int]] = typer.Option(None, "--lesion-label", help="Label value(s) that count as "
                                                     "lesion (default: every non-zero label)."),
    bootstrap: int = typer.Option(2000, "--bootstrap", help="Bootstrap resamples of the cases for the 95 % "
                                  "intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Parallel workers."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT when it holds a previous score output."),
) -> None:
    """Score predicted labels against the truth: Dice, lesion detection and volume per case and per stratum."""
    from .score import ScoreConfig, score_predictions

    config = ScoreConfig(iou_threshold=iou_threshold, connectivity=connectivity,
                         lesion_labels=tuple(lesion_label or ()), n_resamples=bootstrap, seed=seed)
    result = score_predictions(pred, truth, out, config, jobs=_jobs(jobs), overwrite=overwrite, progress=True)
    for line in result.warnings:
        typer.echo(f"warning: {line}", err=True)
    overall = result.summary["overall"]

    def stat(key: str) -> str:
        s = overall[key]
        if s["mean"] is None:
            return "–"
        lo, hi = s["ci95"]
        return f"{s['mean']:.3f} [{lo:.3f}–{hi:.3f}]" if lo is not None else f"{s['mean']:.3f}"

    typer.echo(f"score: {result.out} ({len(result.rows)} cases; Dice {stat('dice')}, lesion F1 {stat('lesion_f1')}, "
               f"recall {stat('lesion_recall')}, precision {stat('lesion_precision')})")


def _jobs(jobs: int) -> int:
    if jobs == 0 or jobs < -1:
        raise InputError(f"--jobs {jobs}: use a positive number, or -1 for all cores")
    return jobs


def main() -> None:
    """Entry point: run the app, turning known errors into one line and an exit status."""
    try:
        # without standalone mode click returns the exit code of typer.Exit instead of raising it
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except LesionsynthError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a run's own signal handling
        typer.echo("stopped by SIGINT", err=True)
        sys.exit(130)
    except Exception as exc:  # usage errors and internal errors
        if isinstance(exc, typer.exceptions.TyperException) and hasattr(exc, "show"):
            exc.show()  # usage errors: click's own message
            sys.exit(2)
        if _state["debug"]:
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
