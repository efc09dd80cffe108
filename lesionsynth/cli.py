"""Command line: parses options and calls the library. Errors become one line on stderr."""

from __future__ import annotations

import re
import functools
import sys
from pathlib import Path
from typing import List, Literal, Optional, Tuple

import typer
from typer.core import TyperGroup

from ._version import __version__
from .errors import ConfigError, InputError, Interrupted, LesionsynthError

#: Options that take one or more label values: `--lesion-label 1 2 3`, `--lesion-label 1,2,3` or the option
#: repeated (`--lesion-label 1 --lesion-label 2`), on every command.
LABEL_LIST_OPTIONS = ("--lesion-label", "--region-label")
_LABEL_VALUES = re.compile(r"^\d+(,\d+)*$")


def expand_label_options(args: list[str]) -> list[str]:
    """The command line with each label-list option given once per value, as click parses a repeated option:
    `--lesion-label 1 2 3` and `--lesion-label 1,2,3` (or `=1,2,3`) become `--lesion-label 1 --lesion-label 2
    --lesion-label 3`. The values are the integer tokens that follow (a path argument made of digits only
    goes before the option, or as ./NAME); anything else is left for click to judge."""
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return out + list(args[i:])
        name, eq, inline = token.partition("=")
        if name not in LABEL_LIST_OPTIONS or (eq and not _LABEL_VALUES.match(inline)):
            out.append(token)
            i += 1
            continue
        values = [inline] if eq else []
        i += 1
        while i < len(args) and _LABEL_VALUES.match(args[i]):
            values.append(args[i])
            i += 1
        if not values:  # no value: click says so
            out.append(token)
        for value in values:
            for part in value.split(","):
                out += [name, part]
    return out


#: The values of the enumerated options (as the library's tuples, which tests/test_cli_help.py compares them to;
#: kept here so that `--help` does not import numpy).
LOADS = ("low", "medium", "high", "uniform", "gaussian", "real")
MODES = ("both", "populate", "inpaint", "replace")
SPACES = ("auto", "world", "register")
DEVICES = ("cpu", "cuda", "auto")
BACKENDS = ("local", "dask")
FORMATS = ("nnunet", "bids")
FACTORS = ("load", "size", "contrast", "noise")
FILE_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
CONNECTIVITIES = (6, 18, 26)

#: The commands in the order of the work: `lesionsynth --help` lists them so (others follow, as registered).
WORKFLOW = ("recipes", "check", "build-bank", "inspect", "generate", "report", "finalize", "testset", "score")

#: The flag that sets each config field (`Config.field`): a bad value is named by its flag on the command line.
FLAGS = {
    "BankConfig.lesion_labels": "--lesion-label", "BankConfig.region_labels": "--region-label",
    "BankConfig.connectivity": "--connectivity", "BankConfig.min_volume_mm3": "--min-volume",
    "BankConfig.space": "--space",
    "GenerateConfig.n": "--n", "GenerateConfig.load": "--load", "GenerateConfig.mode": "--mode",
    "GenerateConfig.tolerance": "--tolerance", "GenerateConfig.folds": "--folds",
    "GenerateConfig.format": "--format", "GenerateConfig.file_ending": "--file-ending",
    "GenerateConfig.compression_level": "--compression-level",
    "TestsetConfig.factor": "--vary", "TestsetConfig.n_levels": "--levels", "TestsetConfig.per_level": "--per-level",
    "TestsetConfig.load_mm3": "--load-mm3", "TestsetConfig.tolerance": "--tolerance",
    "TestsetConfig.compression_level": "--compression-level", "TestsetConfig.file_ending": "--file-ending",
    "ScoreConfig.connectivity": "--connectivity", "ScoreConfig.iou_threshold": "--iou-threshold",
    "ScoreConfig.n_resamples": "--bootstrap", "ScoreConfig.lesion_labels": "--lesion-label",
}
#: Plain names of the value types, where an option sets no metavar of its own (typer writes `<int>`).
TYPE_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


def plain_metavar(param) -> str | None:
    """A metavar in plain words for a parameter that has none: an argument's name (BANK), an option's choices
    `[a|b|c]` or its type's name (INT, FLOAT, PATH, TEXT); None for flags and types not named here."""
    if param.param_type_name == "argument":
        return param.name.upper()
    desc = getattr(param, "type_descriptor", None)  # typer's description of the annotation
    if desc is None or getattr(param, "is_flag", False):
        return None
    if desc.is_choice and not desc.is_list:
        return "[" + "|".join(str(c) for c in desc.choices) + "]"
    if desc.is_path:
        return "PATH"
    return TYPE_METAVARS.get(desc.annotation)


class LabelListGroup(TyperGroup):
    """The command group: lists its commands in workflow order, gives every option a plain metavar, and reads
    label-list options with one or more values (`expand_label_options`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            for param in command.params:
                if param.metavar is None:
                    param.metavar = plain_metavar(param)

    def list_commands(self, ctx):
        names = list(self.commands)
        return sorted(names, key=lambda n: (WORKFLOW.index(n) if n in WORKFLOW else len(WORKFLOW), names.index(n)))

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, expand_label_options(list(args)))


# plain help: rich markup would swallow the square brackets of help texts ("[augment]", "[default: 26]")
app = typer.Typer(cls=LabelListGroup, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
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
    lesion_label: Optional[List[int]] = typer.Option(None, "--lesion-label", metavar="LABEL...",
                                                     help="Label value(s) that mark lesions: 1 2 3, 1,2,3 or "
                                                          "repeated; a lesion is a connected component of them "
                                                          "all and keeps its inner labels [default: 1]."),
    region_label: Optional[List[int]] = typer.Option(None, "--region-label", metavar="LABEL...",
                                                     help="Label value(s) where lesions may live, as "
                                                          "--lesion-label [default: body foreground]."),
    connectivity: Optional[Literal[CONNECTIVITIES]] = typer.Option(None, "--connectivity",
                                                                   help="Neighbours that join lesion voxels into "
                                                                        "one lesion [default: 26]."),
    min_volume: Optional[float] = typer.Option(None, "--min-volume", metavar="MM3",
                                               help="Smallest lesion kept in the bank, mm³ [default: 0]."),
    jobs: int = typer.Option(1, "--jobs", "-j", metavar="N", help="Parallel workers (-1: every core)."),
    backend: Literal[BACKENDS] = typer.Option("local", "--backend", help="local (worker processes on this machine) "
                                              "or dask."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", metavar="ADDRESS",
                                            help="Dask scheduler address (--backend dask)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", metavar="NAME|FILE",
                                         help="Recipe name (see 'lesionsynth recipes') or "
                                         "TOML file; options given here override it."),
    space: Optional[Literal[SPACES]] = typer.Option(None, "--space",
                                                    help="Common space of the likelihood map: register "
                                        "(affine registration of every case to one reference), world (the cases' "
                                        "world coordinates as they are) or auto (world when the cases share a grid "
                                        "or are already aligned) [default: auto]."),
    template: Optional[Path] = typer.Option(None, "--template", help="Template image to register the cases to "
                                            "[default: the dataset case closest to the others]."),
    template_region: Optional[Path] = typer.Option(None, "--template-region", help="Tissue prior (probability "
                                                   "map, e.g. white matter) in the template's space: lesions go "
                                                   "only where it is ≥ 0.5."),
    exclude_case: Optional[List[str]] = typer.Option(None, "--exclude-case", metavar="CASE",
                                                     help="Leave this case out (e.g. one "
                                                     "whose registration is poor); repeatable."),
    min_overlap: Optional[float] = typer.Option(None, "--min-overlap", metavar="DICE",
                                                help="Foreground overlap (Dice) with the reference below which a "
                                                "registration is poor [default: 0.8]; a brain-only template "
                                                "against images that show the head reaches about 0.75-0.8."),
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
        "exclude_cases": tuple(exclude_case) if exclude_case else None, "min_overlap": min_overlap})
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


def _stops_on_signals(command):
    """Run a command with SIGTERM and SIGINT turned into one line and exit status 128 + the signal's number from
    its first line on (`parallel.stop_on_signals`); the run's own message says what is written."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        from .errors import Interrupted
        from .parallel import stop_on_signals

        with stop_on_signals(keep_after_stop=True):
            try:
                return command(*args, **kwargs)
            except Interrupted as exc:
                if str(exc) == str(Interrupted(exc.signum)):  # before or after the run itself
                    raise Interrupted(exc.signum, f"{exc}; run the same command again (with --resume if its "
                                                  f"output folder exists)") from None
                raise

    return run


# the options generate and testset share: one definition each
COMPRESSION_LEVEL_OPTION = typer.Option(1, "--compression-level", metavar="LEVEL",
                                        help="Compression level of .nii.gz, .mha and .nrrd (isal: 0-3; without isal "
                                             "the stdlib's 0-9); 0 writes .mha/.nrrd uncompressed.")
UNCOMPRESSED_OPTION = typer.Option(False, "--uncompressed", help="No compression: .nii instead of .nii.gz, "
                                   ".mha/.nrrd without zlib.")
FILE_ENDING_OPTION = typer.Option(None, "--file-ending", help="File type of the written images: .nii.gz, .nii, "
                                  ".mha or .nrrd [default: that of the dataset the bank was built from].")

LOAD_LABEL_OPTION = typer.Option(None, "--load-label", metavar="LABEL",
                                 help="Count lesion loads (targets, real distribution, achieved) on this lesion "
                                 "label only, e.g. the enhancing part of a tumour [default: every lesion label].")
RUN_BANK_OPTION = typer.Option(None, "--bank", help="An output's bank, where it is not where its run.json says "
                               "(it must hold the same lesions and settings).")
DATA_ROOT_HELP = ("The bank's dataset folder, where it is not where the bank says (moved); its files must be the "
                  "cases the bank was built from (sizes and checksums are checked). 'lesionsynth relocate' "
                  "records a new place in the bank.")


@app.command()
@_stops_on_signals
def generate(
    bank: Path = typer.Argument(..., help="Lesion bank folder made by build-bank."),
    out: Path = typer.Option(..., "--out", help="Output folder (nnU-Net v2 raw dataset)."),
    n: int = typer.Option(..., "--n", metavar="N", help="Number of synthetic cases."),
    load: Literal[LOADS] = typer.Option(..., "--load", help="Distribution of the cases' lesion loads: the lower, "
                                        "middle or upper third of the bank's load range, uniform over it, gaussian "
                                        "(mean and sd of the bank's loads) or real (drawn from the bank's cases)."),
    mode: Literal[MODES] = typer.Option("both", "--mode", help="both (add and remove lesions), populate (add only), "
                                        "inpaint (remove only) or replace (remove the base case's lesions, then "
                                        "populate)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice: the same seed gives the same "
                             "bytes, whatever --jobs or --shard."),
    jobs: int = typer.Option(1, "--jobs", "-j", metavar="N", help="Parallel workers (-1: every core)."),
    load_range: Optional[Tuple[float, float]] = typer.Option(None, "--load-range", metavar="LO HI",
                                                             help="LO HI: load range in mm³ "
                                                             "instead of the bank's observed range."),
    tolerance: float = typer.Option(0.1, "--tolerance", metavar="FRACTION", help="Relative load tolerance: a "
                                    "case is done once its load is within target × (1 ± this)."),
    folds: int = typer.Option(5, "--folds", metavar="K", help="Cross-validation folds for splits_final.json."),
    include_originals: bool = typer.Option(True, "--include-originals/--no-include-originals",
                                           help="Also copy the bank's original cases into OUT and into the "
                                                "training folds of splits_final.json."),
    compression_level: int = COMPRESSION_LEVEL_OPTION,
    uncompressed: bool = UNCOMPRESSED_OPTION,
    file_ending: Optional[Literal[FILE_ENDINGS]] = FILE_ENDING_OPTION,
    output_format: Literal[FORMATS] = typer.Option("nnunet", "--format",
                                                   help="Output layout: nnunet (v2 raw dataset) or bids "
                                      "(BIDS derivative dataset)."),
    volume_warp: bool = typer.Option(False, "--volume-warp", help="Also warp each whole case (rotation ±10°, "
                                     "scale 0.9-1.1, smooth elastic field) before the lesion work."),
    resume: bool = typer.Option(False, "--resume", help="Complete an unfinished run of the same configuration."),
    backend: Literal[BACKENDS] = typer.Option("local", "--backend", help="local (worker processes on this machine) "
                                              "or dask."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", metavar="ADDRESS",
                                            help="Dask scheduler address (--backend dask)."),
    device: Literal[DEVICES] = typer.Option("cpu", "--device",
                                            help="cpu (numpy/scipy), cuda (torch on the GPU) or auto "
                               "(cuda when torch sees a GPU, else cpu)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", metavar="NAME|FILE", help="Recipe name or TOML file: "
                                         "its [augment] "
                                         "section sets the lesion augmentation ranges."),
    shard: str = typer.Option("0/1", "--shard", metavar="I/N",
                              help="I/N: make only cases with index ≡ I (mod N); shards may "
                              "share OUT, and the last one to finish writes dataset.json and the splits."),
    load_label: Optional[int] = LOAD_LABEL_OPTION,
    data_root: Optional[Path] = typer.Option(None, "--data-root", metavar="DIR", help=DATA_ROOT_HELP),
) -> None:
    """Generate N synthetic cases whose lesion load follows the chosen distribution."""
    if n == 0:
        typer.echo(f"warning: --n 0 makes no synthetic case: {out} gets "
                   + ("only copies of the original cases" if include_originals else "no case at all"), err=True)
    from .pipeline import GenerateConfig, parse_shard
    from .pipeline import generate as run_generate

    lr = (float(load_range[0]), float(load_range[1])) if load_range else None
    from .plan import AugmentConfig
    from .recipes import load_recipe, make_config

    if recipe is None:  # default to the recipe the bank was built with
        from .bank import Bank

        recipe = Bank(bank).index.get("run", {}).get("recipe")
    augment = make_config(AugmentConfig, load_recipe(recipe) if recipe else None, "augment", {})
    ending, level = _output_files(bank, file_ending, uncompressed, compression_level, output_format)
    cfg = GenerateConfig(augment=augment, n=n, load=load, mode=mode, seed=seed, tolerance=tolerance, load_range=lr, folds=folds,
                         include_originals=include_originals, compression_level=level,
                         file_ending=ending, volume_warp=volume_warp, format=output_format,
                         load_label=load_label)
    result = run_generate(bank, out, cfg, jobs=_jobs(jobs), resume=resume, shard=parse_shard(shard),
                          device=device, backend=backend, scheduler=scheduler, data_root=data_root)
    _summary(result, n)
    from .bank import Bank

    n_cases = len(Bank(bank).cases)
    if folds > n_cases:
        typer.echo(f"--folds {folds}: the bank holds {n_cases} cases, so {n_cases} folds were used "
                   f"(one case per validation fold in splits_final.json)")


@app.command()
@_stops_on_signals
def testset(
    bank: Path = typer.Argument(..., help="Lesion bank folder made by build-bank."),
    out: Path = typer.Option(..., "--out", help="New folder for the test set (imagesTs/, labelsTs/, strata.csv)."),
    vary: Literal[FACTORS] = typer.Option(..., "--vary",
                                          help="The factor that changes between levels: load (lesion load, "
                             "mm³), size (few large or many small lesions at one load), contrast (brightness of "
                             "the pasted lesions) or noise (Gaussian noise over the whole case)."),
    levels: int = typer.Option(..., "--levels", metavar="K", help="Number of levels K."),
    per_level: int = typer.Option(..., "--per-level", metavar="N",
                                  help="Cases per level (the same base cases and seeds at "
                                  "every level)."),
    test_cases: Optional[str] = typer.Option(None, "--test-cases", metavar="ID,ID,...",
                                             help="ID,ID,...: the bank cases that are "
                                             "test cases (the only base cases and donors)."),
    splits: Optional[Path] = typer.Option(None, "--splits", metavar="FILE",
                                          help="nnU-Net splits_final.json whose fold --fold "
                                          "'val' cases are the test cases."),
    fold: Optional[int] = typer.Option(None, "--fold", metavar="F", help="Fold of --splits."),
    level_range: Optional[Tuple[float, float]] = typer.Option(None, "--range", metavar="LO HI",
                                                              help="LO HI of the levels: load "
                                                              "in mm³ (log-spaced; default: the bank's real "
                                                              "loads), contrast as paste brightness (default "
                                                              "0.5 1.5), noise in units of the case's own noise "
                                                              "sd (default 0 2)."),
    load_mm3: Optional[float] = typer.Option(None, "--load-mm3", metavar="MM3",
                                             help="The load held fixed by size, contrast and "
                                             "noise, mm³ (default: the test cases' median real load; size: at "
                                             "most 100 lesions of the smallest size bin)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice: the same seed gives the same "
                             "bytes."),
    tolerance: float = typer.Option(0.1, "--tolerance", metavar="FRACTION", help="Relative load tolerance."),
    jobs: int = typer.Option(1, "--jobs", "-j", metavar="N", help="Parallel workers (-1: every core)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", metavar="NAME|FILE", help="Recipe name or TOML file: "
                                         "its augment "
                                         "section sets the lesion augmentation ranges (default: the bank's)."),
    compression_level: int = COMPRESSION_LEVEL_OPTION,
    uncompressed: bool = UNCOMPRESSED_OPTION,
    file_ending: Optional[Literal[FILE_ENDINGS]] = FILE_ENDING_OPTION,
    resume: bool = typer.Option(False, "--resume", help="Complete an unfinished run of the same configuration."),
    load_label: Optional[int] = LOAD_LABEL_OPTION,
    data_root: Optional[Path] = typer.Option(None, "--data-root", metavar="DIR", help=DATA_ROOT_HELP),
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
    ending, level = _output_files(bank, file_ending, uncompressed, compression_level)
    cfg = TestsetConfig(factor=vary, n_levels=levels, per_level=per_level, test_cases=chosen, seed=seed,
                        level_range=(float(level_range[0]), float(level_range[1])) if level_range else None,
                        load_mm3=load_mm3, tolerance=tolerance, compression_level=level,
                        file_ending=ending, augment=augment, load_label=load_label)
    records = run_testset(bank, out, cfg, jobs=_jobs(jobs), resume=resume, data_root=data_root)
    reached = sum(r["reached"] for r in records)
    typer.echo(f"test set: {out} ({len(records)} cases, {levels} levels of {vary} from {len(chosen)} test "
               f"case(s); {reached} within tolerance of their load)")


def space_lines(index: dict) -> list[str]:
    """What build-bank says about the common space: the choice, and each case's registration."""
    space = index.get("space") or {"mode": "world", "why": "bank made before registration existed"}
    lines = [f"space: {space['mode']} ({space.get('why', '')})"]
    if space["mode"] == "register":
        lines[0] += f"; reference: {space.get('reference_name')}"
        if space.get("poor_overlap") is not None:
            lines[0] += f"; poor below a foreground overlap of {space['poor_overlap']:g}"
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
def finalize(out: Path = typer.Argument(..., help="Output folder of a sharded generate run."),
             bank: Optional[Path] = RUN_BANK_OPTION) -> None:
    """Write manifest.jsonl, dataset.json and splits_final.json once every shard of a run is done."""
    from .pipeline import finalize_run

    result = finalize_run(out, bank)
    _summary(result, len(result.records))


@app.command()
def report(
    out: Path = typer.Argument(..., help="Output folder of generate."),
    examples: int = typer.Option(6, "--examples", metavar="N", help="How many cases to draw lesion sites for."),
    seed: int = typer.Option(0, "--seed", help="Seed of the draw of the cases shown."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="The bank's dataset folder, where it is "
                                             "not where the bank says (the pictures show its base cases)."),
    bank: Optional[Path] = RUN_BANK_OPTION,
) -> None:
    """Write OUT/report/report.html: load plots, lesion counts and sizes, before/after pictures of sites."""
    from .report import write_report

    path = write_report(out, n_examples=examples, seed=seed, data_root=data_root, progress=True, bank=bank)
    typer.echo(f"report: {path}")


@app.command("inspect")
def inspect_cmd(path: Path = typer.Argument(..., help="A dataset, a bank or an output folder."),
                data_root: Optional[Path] = typer.Option(None, "--data-root", help="The bank's dataset folder, "
                                                         "where it is not where the bank says."),
                bank: Optional[Path] = RUN_BANK_OPTION) -> None:
    """One-screen summary of a dataset, a bank or an output."""
    from .inspect import summarize

    typer.echo(summarize(path, data_root, bank))


@app.command()
def relocate(
    bank: Path = typer.Argument(..., help="Lesion bank folder made by build-bank."),
    dataset: Path = typer.Argument(..., help="The folder its dataset has been moved to."),
) -> None:
    """Point BANK at its dataset moved to DATASET: every case file there must be the one the bank was built
    from (same size and checksum, same grid); then bank.json records the new place (relative to the bank)."""
    from .io.locate import relocate as relocate_bank

    cases, compared = relocate_bank(bank, dataset)
    checked = (f"{compared} files checked: same sizes and checksums" if compared else
               "the bank predates checksums: files and grids checked")
    typer.echo(f"bank: {bank} now reads its {cases} cases from {dataset} ({checked})")


@app.command()
def check(
    dataset: Path = typer.Argument(..., help="Dataset to check (nnU-Net v2, MSD or CSV list)."),
    lesion_label: List[int] = typer.Option([1], "--lesion-label", metavar="LABEL...",
                                           help="Label value(s) that mark lesions: 1 2 3, "
                                           "1,2,3 or repeated."),
    region_label: List[int] = typer.Option([], "--region-label", metavar="LABEL...",
                                           help="Label value(s) of the allowed region, as "
                                           "--lesion-label."),
    jobs: int = typer.Option(1, "--jobs", "-j", metavar="N", help="Parallel workers (-1: every core)."),
) -> None:
    """Check every case of DATASET and print every problem found (exit status 2 if there is any)."""
    from .io.validate import format_report, validate_dataset

    figures: list[str] = []
    spec, problems = validate_dataset(dataset, tuple(lesion_label), tuple(region_label), jobs=_jobs(jobs),
                                      progress=True, figures=figures)
    typer.echo(format_report(spec, problems))
    for line in figures:
        typer.echo(line)
    if problems:
        raise typer.Exit(InputError.exit_code)


@app.command("score")
def score_cmd(
    pred: Path = typer.Argument(..., help="Folder of predicted label files, as nnUNetv2_predict writes them "
                                "(CASE_ID + file ending; its other files are ignored)."),
    truth: Path = typer.Argument(..., help="The truth: a lesionsynth test set (labelsTs/ + strata.csv), an nnU-Net "
                                 "v2 raw dataset (labelsTs/, else labelsTr/) or a folder of label files."),
    out: Path = typer.Option(..., "--out", help="New folder for cases.csv, strata.csv, summary.json and score.html."),
    iou_threshold: float = typer.Option(0.0, "--iou-threshold", metavar="IOU",
                                        help="A truth lesion and a predicted component "
                                        "match when they overlap with IoU ≥ this (0: any overlap); one to one, "
                                        "highest IoU first."),
    connectivity: Literal[CONNECTIVITIES] = typer.Option(26, "--connectivity", help="Neighbours that join lesion "
                                                         "voxels into one lesion."),
    lesion_label: Optional[List[int]] = typer.Option(None, "--lesion-label", metavar="LABEL...",
                                                     help="Label value(s) that count as "
                                                     "lesion: 1 2 3, 1,2,3 or repeated (default: every non-zero "
                                                     "label)."),
    bootstrap: int = typer.Option(2000, "--bootstrap", metavar="N",
                                  help="Bootstrap resamples of the cases for the 95 % "
                                  "intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    jobs: int = typer.Option(1, "--jobs", "-j", metavar="N", help="Parallel workers (-1: every core)."),
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


def _output_files(bank: Path, file_ending: Optional[str], uncompressed: bool, compression_level: int,
                  output_format: str = "nnunet") -> tuple[str, int]:
    """(file ending, compression level) of the written images from --file-ending, --uncompressed and
    --compression-level (--uncompressed: level 0, i.e. no zlib, for .mha/.nrrd)."""
    from .bank import Bank
    from .io.images import NIFTI_ENDINGS, output_ending
    from .pipeline import source_ending

    ending = output_ending(file_ending, source_ending(Bank(bank)), uncompressed=uncompressed,
                           nifti_only=output_format == "bids")
    return ending, 0 if uncompressed and ending not in NIFTI_ENDINGS else compression_level


def _jobs(jobs: int) -> int:
    if jobs == 0 or jobs < -1:
        raise InputError(f"--jobs {jobs}: use a positive number, or -1 for all cores")
    return jobs


def usage_error_line(exc) -> str:
    """A usage error (bad value, missing or unknown option) as one line, with where to find the command's help."""
    text = exc.format_message().replace("Value error, ", "").replace("\n", " ").rstrip(".")
    ctx = getattr(exc, "ctx", None)
    return f"{text} (see '{ctx.command_path} --help')" if ctx is not None else text


def main() -> None:
    """Entry point: run the app, turning known errors into one line and an exit status."""
    try:
        # without standalone mode click returns the exit code of typer.Exit instead of raising it
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except Interrupted as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except LesionsynthError as exc:
        if _state["debug"]:
            raise
        if isinstance(exc, ConfigError) and f"{exc.owner}.{exc.field}" in FLAGS:
            exc = exc.for_flag(FLAGS[f"{exc.owner}.{exc.field}"])  # the command line names its flag
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a run's own signal handling
        typer.echo("stopped by SIGINT", err=True)
        sys.exit(130)
    except Exception as exc:  # usage errors and internal errors
        if isinstance(exc, typer.exceptions.TyperException) and hasattr(exc, "format_message"):
            typer.echo(f"error: {usage_error_line(exc)}", err=True)
            sys.exit(getattr(exc, "exit_code", 2))
        if _state["debug"]:
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
