"""Recipes and the command line: merged values, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lesionsynth.bank import BankConfig
from lesionsynth.errors import InputError
from lesionsynth.plan import AugmentConfig
from lesionsynth.recipes import available, load_recipe, make_config


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lesionsynth.cli", *args], capture_output=True, text=True)


def test_every_shipped_recipe_is_complete():
    names = set(available())
    assert {"ms_flair", "wmh_flair", "stroke_t1", "liver_tumour_ct", "brain_tumour", "lung_nodule_ct"} <= names
    for name in names:
        rec = load_recipe(name)
        assert rec["description"]
        bank = make_config(BankConfig, rec, "bank", {})
        augment = make_config(AugmentConfig, rec, "augment", {})
        assert bank.lesion_labels and augment.scale_range[0] < augment.scale_range[1]


def test_command_line_overrides_recipe():
    rec = load_recipe("liver_tumour_ct")
    cfg = make_config(BankConfig, rec, "bank", {"min_volume_mm3": 1.0, "region_labels": None})
    assert cfg.min_volume_mm3 == 1.0 and cfg.region_labels == (1,) and cfg.lesion_labels == (2,)


def test_bad_recipe_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[bank]\nlesion_label = [1]\n")
    with pytest.raises(InputError, match="unknown key"):
        make_config(BankConfig, load_recipe(str(bad)), "bank", {})
    bad.write_text("[bank\n")
    with pytest.raises(InputError, match="malformed recipe"):
        load_recipe(str(bad))


def test_recipe_values_reach_the_run_record(blobs, tmp_path):
    bank, out = tmp_path / "bank", tmp_path / "out"
    res = cli("build-bank", str(blobs), "--out", str(bank), "--recipe", "ms_flair", "--min-volume", "1")
    assert res.returncode == 0, res.stderr
    config = json.loads((bank / "bank.json").read_text())["config"]
    assert config["min_volume_mm3"] == 1.0 and config["likelihood_sigma_mm"] == 4.0
    res = cli("generate", str(bank), "--out", str(out), "--n", "1", "--load", "low")
    assert res.returncode == 0, res.stderr
    augment = json.loads((out / "run.json").read_text())["config"]["augment"]
    assert augment["rotation_deg"] == 30.0 and augment["elastic_max_mm"] == 2.0  # from the bank's recipe
    assert cli("recipes").stdout.count("\n") >= 6


def test_a_recipe_file_given_to_build_bank_is_found_again_by_generate(blobs, tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('description = "mine"\n[bank]\n[augment]\nrotation_deg = 12.0\n')
    bank, out = tmp_path / "bank", tmp_path / "out"
    res = cli("build-bank", str(blobs), "--out", str(bank), "--recipe", str(recipe))
    assert res.returncode == 0, res.stderr
    assert json.loads((bank / "bank.json").read_text())["run"]["recipe"] == str(recipe.resolve())
    res = cli("generate", str(bank), "--out", str(out), "--n", "1", "--load", "low")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "run.json").read_text())["config"]["augment"]["rotation_deg"] == 12.0


@pytest.mark.parametrize("args, message", [
    (["build-bank", "{ds}", "--out", "{out}", "--space", "nowhere"], "'--space': 'nowhere' is not one of"),
    (["build-bank", "{ds}", "--out", "{out}", "--template-region", "{missing}"], "--template-region needs --template"),
    (["build-bank", "{ds}", "--out", "{out}", "--template", "{missing}"], "template file not found"),
    (["build-bank", "{ds}", "--out", "{out}", "--space", "world", "--template", "{missing}"],
     "--template needs --space register"),
    (["build-bank", "{ds}", "--out", "{out}", "--exclude-case", "nosuch"], "--exclude-case nosuch"),
    (["generate", "{bank}", "--out", "{out}", "--n", "1", "--load", "huge"], "'--load': 'huge' is not one of"),
    (["generate", "{bank}", "--out", "{out}", "--n", "1", "--load", "low", "--shard", "3/2"], "--shard"),
    (["generate", "{bank}", "--out", "{out}", "--n", "1", "--load", "low", "--recipe", "nope"], "--recipe"),
    (["generate", "{missing}", "--out", "{out}", "--n", "1", "--load", "low"], "bank.json missing"),
    (["build-bank", "{missing}", "--out", "{out}"], "no such file or folder"),
    (["generate", "{bank}", "--out", "{out}", "--n", "1", "--load", "low", "--device", "tpu"], "--device"),
])
def test_bad_options_give_one_line_and_exit_2(blob_bank, tmp_path, args, message):
    out = tmp_path / "out"
    dataset = json.loads((blob_bank / "bank.json").read_text())["dataset"]["root"]
    args = [a.format(bank=blob_bank, out=out, missing=tmp_path / "missing", ds=dataset) for a in args]
    res = cli(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_version():
    res = cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("lesionsynth ")


def test_help_keeps_bracketed_text():
    """Square brackets in help texts (a TOML section, a default) are printed, not taken for markup."""
    bank_help, generate_help = cli("build-bank", "--help").stdout, cli("generate", "--help").stdout
    assert "[default: 26]" in bank_help
    assert "[augment]" in " ".join(generate_help.split())


def test_device_auto_falls_back_to_cpu_and_cuda_without_gpu_is_one_line(blob_bank, tmp_path):
    torch = pytest.importorskip("torch")
    res = cli("generate", str(blob_bank), "--out", str(tmp_path / "a"), "--n", "1", "--load", "low",
              "--device", "auto")
    assert res.returncode == 0, res.stderr
    if not torch.cuda.is_available():
        res = cli("generate", str(blob_bank), "--out", str(tmp_path / "c"), "--n", "1", "--load", "low",
                  "--device", "cuda")
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--device cuda" in res.stderr
        assert not (tmp_path / "c").exists()


def test_report_and_inspect_commands(blob_bank, tmp_path):
    out = tmp_path / "out"
    assert cli("generate", str(blob_bank), "--out", str(out), "--n", "2", "--load", "high").returncode == 0
    res = cli("report", str(out), "--examples", "1")
    assert res.returncode == 0, res.stderr
    assert (out / "report" / "report.html").is_file()
    for path in (blob_bank, out):
        res = cli("inspect", str(path))
        assert res.returncode == 0 and len(res.stdout.splitlines()) <= 40
    res = cli("inspect", str(tmp_path))
    assert res.returncode == 2 and res.stderr.startswith("error: ")
