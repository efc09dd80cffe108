"""`lesionsynth testset` on the real MNI sample (two of its six cases as test cases): each factor's measured
value rises with its level, the same base cases at every level, anatomy and donors from test cases only,
the inference layout, one-line errors and same bytes from the same command."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesionsynth.errors import InputError
from lesionsynth.testset import FACTORS, TestsetConfig, level_values, select_test_cases, size_bins

TEST_CASES = ("MS_01038", "MS_01039")
LEVELS, PER_LEVEL = 3, 2


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lesionsynth.cli", *args], capture_output=True, text=True)


def make_testset(bank: Path, out: Path, factor: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("testset", str(bank), "--out", str(out), "--vary", factor, "--levels", str(LEVELS),
                   "--per-level", str(PER_LEVEL), "--test-cases", ",".join(TEST_CASES), "--jobs", "2", *extra)


@pytest.fixture(scope="module")
def mni_bank(real_data, tmp_path_factory) -> Path:
    bank = tmp_path_factory.mktemp("testset") / "bank"
    res = run_cli("build-bank", str(real_data / "mni_lesions"), "--out", str(bank), "--jobs", "2")
    assert res.returncode == 0, res.stderr
    return bank


@pytest.fixture(scope="module", params=FACTORS)
def testset(request, mni_bank, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param) / "EVAL"
    res = make_testset(mni_bank, out, request.param)
    assert res.returncode == 0, res.stderr
    return request.param, out


def strata(out: Path) -> list[dict]:
    with open(out / "strata.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_measured_value_rises_with_the_level(testset):
    factor, out = testset
    rows = strata(out)
    assert (out / "strata.csv").read_text().splitlines()[0] == "case_id,factor,level,value"
    assert len(rows) == LEVELS * PER_LEVEL and {r["factor"] for r in rows} == {factor}
    values = np.array([float(r["value"]) for r in rows]).reshape(LEVELS, PER_LEVEL)  # level, case j
    assert [int(r["level"]) for r in rows] == [k for k in range(LEVELS) for _ in range(PER_LEVEL)]
    assert np.all(np.diff(values, axis=0) > 0), values  # every case j, level after level


def test_levels_share_base_cases_and_seeds(testset):
    factor, out = testset
    records = manifest(out)
    by_level = {}
    for rec in records:
        by_level.setdefault(rec["level"], []).append((rec["rng_index"], rec["base_case"], rec["seed"]))
    assert len(by_level) == LEVELS and len({tuple(v) for v in by_level.values()}) == 1
    assert {rec["base_case"] for rec in records} == set(TEST_CASES)
    assert {rec["load_family"] for rec in records} == {"fixed"}  # one target load per level, not a draw
    if factor in ("contrast", "noise"):  # only intensities change: the same lesions at every level
        labels = {}
        for rec in records:
            label = np.asarray(nib.load(out / "labelsTs" / f"{rec['case_id']}.nii.gz").dataobj)
            labels.setdefault(rec["rng_index"], []).append(label)
        for same in labels.values():
            assert all(np.array_equal(same[0], other) for other in same[1:])


def test_only_test_cases_give_anatomy_and_lesions(testset, mni_bank):
    _, out = testset
    bank = json.loads((mni_bank / "bank.json").read_text())
    source = {les["id"]: les["source_case"] for les in bank["lesions"]}
    for rec in manifest(out):
        assert rec["base_case"] in TEST_CASES
        pastes = [op for op in rec["ops"] if op["op"] == "paste"]
        assert all(source[op["lesion_id"]] in TEST_CASES and op["source_case"] in TEST_CASES for op in pastes)
        assert set(rec["donor_cases"]) <= set(TEST_CASES)


def test_layout_is_readable_for_inference(testset):
    factor, out = testset
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1", "1": "FLAIR"} and meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == 0 and meta["file_ending"] == ".nii.gz" and meta["testset"]["factor"] == factor
    assert not (out / ".progress").exists()
    for row in strata(out):
        case = row["case_id"]
        images = [nib.load(out / "imagesTs" / f"{case}_{c:04d}.nii.gz") for c in range(2)]
        label = nib.load(out / "labelsTs" / f"{case}.nii.gz")
        assert all(img.shape == label.shape == (197, 233, 189) for img in images)
        if factor == "load":  # the value is the load of the written label
            load = np.count_nonzero(np.asarray(label.dataobj) == 1) * abs(np.linalg.det(label.affine[:3, :3]))
            assert float(row["value"]) == pytest.approx(load, rel=1e-5)
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == sorted(
        f"{r['case_id']}_{c:04d}.nii.gz" for r in strata(out) for c in range(2))


def test_same_command_gives_the_same_bytes(mni_bank, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        res = run_cli("testset", str(mni_bank), "--out", str(out), "--vary", "noise", "--levels", "2",
                      "--per-level", "1", "--test-cases", "MS_01039", "--load-mm3", "5000")
        assert res.returncode == 0, res.stderr
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert len(files) == 10  # 2 cases x 3 files, dataset.json, manifest, run.json, strata.csv
    assert all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)


def test_splits_fold_names_the_test_cases(mni_bank, tmp_path):
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["ATLAS_001"], "val": ["MS_01042"]},
                                  {"train": ["MS_01042"], "val": ["MS_01039"]}]))
    out = tmp_path / "EVAL"
    res = run_cli("testset", str(mni_bank), "--out", str(out), "--vary", "load", "--levels", "2", "--per-level",
                  "1", "--splits", str(splits), "--fold", "1", "--range", "1000", "4000")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "run.json").read_text())["config"]["test_cases"] == ["MS_01039"]
    assert [r["base_case"] for r in manifest(out)] == ["MS_01039", "MS_01039"]
    assert [float(r["value"]) for r in strata(out)][0] < 1500


@pytest.mark.parametrize("args, message", [
    (["--vary", "load"], "no test cases given: name them with --test-cases"),
    (["--vary", "load", "--test-cases", "MS_01038,nobody"], "test case(s) nobody not in the bank"),
    (["--vary", "blur", "--test-cases", "MS_01038"], "'--vary': 'blur' is not one of 'load', 'size', 'contrast', 'noise'"),
    (["--vary", "size", "--test-cases", "MS_01038", "--range", "1", "2"], "--range does not apply to --vary size"),
    (["--vary", "load", "--test-cases", "MS_01038", "--splits", "x.json", "--fold", "0"],
     "give --test-cases or --splits, not both"),
    (["--vary", "load", "--splits", "missing.json", "--fold", "0"], "missing.json: file not found"),
])
def test_bad_input_is_one_line_and_writes_nothing(mni_bank, tmp_path, args, message):
    out = tmp_path / "EVAL"
    res = run_cli("testset", str(mni_bank), "--out", str(out), "--levels", "2", "--per-level", "1", *args)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert not out.exists()


def test_non_empty_output_is_refused(mni_bank, tmp_path):
    out = tmp_path / "EVAL"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = make_testset(mni_bank, out, "load")
    assert res.returncode == 2 and "folder is not empty and is not a lesionsynth run" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_select_test_cases_and_size_bins():
    assert select_test_cases(["a", "b", "c"], "c, a") == ("a", "c")
    with pytest.raises(InputError, match="no test cases given"):
        select_test_cases(["a"], " , ")
    donors = [{"id": f"l{i}", "volume_mm3": v} for i, v in enumerate([5, 1, 300, 40, 2, 90])]
    assert [[d["volume_mm3"] for d in b] for b in size_bins(donors, 3)] == [[1, 2], [5, 40], [90, 300]]
    cfg = TestsetConfig("size", 3, 1, ("a",))
    assert level_values(cfg, [10.0], donors) == (1.5, 22.5, 195.0)
    cfg = TestsetConfig("load", 3, 1, ("a",))
    assert level_values(cfg, [0.0, 100.0, 10000.0], donors) == (100.0, 1000.0, 10000.0)
    assert level_values(TestsetConfig("noise", 3, 1, ("a",)), [], donors) == (0.0, 1.0, 2.0)
