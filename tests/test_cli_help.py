"""A command line that explains itself: choices and plain metavars in --help, help on every option, commands in
workflow order, one-line errors; the advice for a finished run and the --n 0 warning; config checks at
construction that name the Python field (the command line names its flag); the Python API beside the commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import lesionsynth
from lesionsynth import cli
from lesionsynth.errors import ConfigError, InputError

COMMANDS = ("recipes", "check", "build-bank", "inspect", "generate", "report", "finalize", "testset", "score")


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lesionsynth.cli", *map(str, args)], capture_output=True, text=True)


def help_text(*args: str) -> str:
    result = CliRunner().invoke(cli.app, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def option_lines(text: str) -> dict[str, str]:
    """Option name → its entry (names, metavar, help), from the Options section of a help text."""
    section = text.split("Options:", 1)[1]
    entries = re.split(r"\n(?=  -)", section)
    return {re.search(r"--[a-z-]+", e).group(0): " ".join(e.split()) for e in entries if "--" in e}


def option_help(text: str) -> dict[str, str]:
    """Option name → its help text alone (what follows the names and metavar, two spaces on)."""
    section = text.split("Options:", 1)[1]
    entries = re.split(r"\n(?=  -)", section)
    return {re.search(r"--[a-z-]+", e).group(0): (re.split(r"\s{2,}", e.strip(), maxsplit=1) + [""])[1]
            for e in entries if "--" in e}


def test_commands_are_listed_in_workflow_order():
    listed = re.findall(r"^  ([a-z-]+)  ", help_text().split("Commands:", 1)[1], flags=re.M)
    assert tuple(listed[:len(COMMANDS)]) == COMMANDS and set(listed) >= set(COMMANDS)


def test_choices_match_the_library():
    from lesionsynth.io.images import IMAGE_ENDINGS
    from lesionsynth.loads import FAMILIES
    from lesionsynth.parallel import BACKENDS
    from lesionsynth.pipeline import FORMATS
    from lesionsynth.plan import MODES
    from lesionsynth.space import SPACES
    from lesionsynth.testset import FACTORS

    assert (cli.LOADS, cli.MODES, cli.SPACES, cli.FORMATS, cli.FACTORS) == (FAMILIES, MODES, SPACES, FORMATS, FACTORS)
    assert tuple(cli.BACKENDS) == tuple(BACKENDS) and set(cli.FILE_ENDINGS) == set(IMAGE_ENDINGS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_a_plain_metavar(command):
    text = help_text(command)
    assert "<list[" not in text and "<str>" not in text and "<int>" not in text and "<float" not in text
    for name, words in option_help(text).items():
        assert words and not words.startswith("["), f"{command} {name} has no help: {words!r}"


def test_enumerated_options_list_their_choices():
    generate, bank = option_lines(help_text("generate")), option_lines(help_text("build-bank"))
    assert generate["--load"].startswith("--load [low|medium|high|uniform|gaussian|real] ")
    assert generate["--mode"].startswith("--mode [both|populate|inpaint|replace] ")
    assert generate["--device"].startswith("--device [cpu|cuda|auto] ")
    assert bank["--space"].startswith("--space [auto|world|register] ")
    assert bank["--lesion-label"].startswith("--lesion-label LABEL... ")
    assert generate["--load-range"].startswith("--load-range LO HI ")
    assert option_lines(help_text("testset"))["--vary"].startswith("--vary [load|size|contrast|noise] ")
    assert "Seed of every random choice" in generate["--seed"]
    assert "original cases" in generate["--include-originals"]


def test_a_bad_choice_is_one_line_naming_the_choices(tmp_path):
    res = run_cli("generate", tmp_path, "--out", tmp_path / "out", "--n", "1", "--load", "hgh")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert res.stderr.startswith("error: Invalid value for '--load': 'hgh' is not one of 'low', 'medium'")
    assert "generate --help')" in res.stderr


def test_finished_run_is_complete_and_n0_warns(blob_bank, tmp_path):
    out = tmp_path / "out"
    args = ("generate", blob_bank, "--out", out, "--n", "0", "--load", "low", "--folds", "2")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "warning: --n 0 makes no synthetic case" in first.stderr and "original cases" in first.stderr
    again = run_cli(*args)
    error = again.stderr.splitlines()[-1]
    assert again.returncode == 2 and error.startswith("error: ") and "Traceback" not in again.stderr
    assert "finished run of this configuration; it is complete, nothing to do" in error and "--resume" not in error
    # a bad value set in Python is named by its flag on the command line
    res = run_cli("generate", blob_bank, "--out", tmp_path / "b", "--n", "1", "--load", "low", "--tolerance", "2")
    assert res.returncode == 2 and res.stderr == "error: --tolerance 2.0: must lie in [0, 1)\n"


@pytest.mark.parametrize("make, message", [
    (lambda: lesionsynth.GenerateConfig(n=1, load="hgh"),
     "GenerateConfig.load: 'hgh' is not one of low, medium, high, uniform, gaussian, real"),
    (lambda: lesionsynth.GenerateConfig(n=-1, load="low"), "GenerateConfig.n: -1 must be ≥ 0"),
    (lambda: lesionsynth.GenerateConfig(n=1, load="low", file_ending=".png"), "GenerateConfig.file_ending: '.png'"),
    (lambda: lesionsynth.BankConfig(space="mni"), "BankConfig.space: 'mni' is not one of auto, world, register"),
    (lambda: lesionsynth.BankConfig(connectivity=8), "BankConfig.connectivity: 8 is not one of 6, 18, 26"),
    (lambda: lesionsynth.TestsetConfig(factor="blur", n_levels=2, per_level=1, test_cases=("a",)),
     "TestsetConfig.factor: 'blur' is not one of load, size, contrast, noise"),
    (lambda: lesionsynth.TestsetConfig(factor="load", n_levels=0, per_level=1, test_cases=("a",)),
     "TestsetConfig.n_levels: 0 must be ≥ 1"),
    (lambda: lesionsynth.ScoreConfig(iou_threshold=2.0), "ScoreConfig.iou_threshold: 2.0 must be between 0 and 1"),
])
def test_configs_check_their_fields_when_made(make, message):
    with pytest.raises(ConfigError) as caught:
        make()
    assert str(caught.value).startswith(message)
    assert isinstance(caught.value, InputError)


def test_api_inspects_reports_and_makes_test_sets(blob_bank, tmp_path):
    assert "bank" in lesionsynth.summarize(blob_bank).lower()
    bank_cases = [c["case_id"] for c in json.loads((blob_bank / "bank.json").read_text())["cases"]]
    records = lesionsynth.make_testset(
        blob_bank, tmp_path / "eval", lesionsynth.TestsetConfig(factor="contrast", n_levels=2, per_level=1,
                                                                test_cases=tuple(bank_cases[:1])), progress=False)
    assert len(records) == 2 and (tmp_path / "eval" / "strata.csv").is_file()
    for name in ("write_report", "make_testset", "summarize", "build_bank", "generate", "score_predictions"):
        assert name in lesionsynth.__all__ and getattr(lesionsynth, name).__doc__
