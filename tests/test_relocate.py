"""A bank that can move: dataset paths relative to the bank, --data-root, `lesionsynth relocate`, and the sizes and
checksums that tell a moved dataset holds the same cases."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lesionsynth.bank import Bank, BankConfig, build_bank
from lesionsynth.errors import InputError
from lesionsynth.io.locate import relocate
from lesionsynth.pipeline import GenerateConfig, generate

from .conftest import blob_dataset

CLI = [sys.executable, "-m", "lesionsynth.cli"]
CFG = GenerateConfig(n=3, load="high", seed=5, folds=2)


def case_bytes(out: Path) -> dict[str, bytes]:
    """Every output file but run.json (which names the bank's folder)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "run.json"}


def generate_cli(bank: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "generate", str(bank), "--out", str(out), "--n", "3", "--load", "high", "--seed",
                           "5", "--folds", "2", *extra], capture_output=True, text=True)


@pytest.fixture
def built(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A bank in project/bank built from project/ds, and the bytes of a run from it before anything moved."""
    project = tmp_path / "project"
    ds = blob_dataset(project / "ds")
    bank = build_bank(ds, project / "bank", BankConfig(), jobs=1, progress=False)
    generate(bank, tmp_path / "before", CFG, progress=False)
    return project, case_bytes(tmp_path / "before")


def test_the_bank_stores_dataset_paths_relative_to_itself_with_sizes_and_checksums(built):
    project, _ = built
    index = json.loads((project / "bank" / "bank.json").read_text())
    assert index["dataset"]["root_from_bank"] == "../ds"
    for case in index["cases"]:
        files = [*case["images"], case["label"]]
        assert not any(Path(f).is_absolute() for f in files)
        assert [f["bytes"] for f in case["files"]] == [(project / "ds" / f).stat().st_size for f in files]
    assert Path(Bank(project / "bank").cases[0]["label"]) == project / "ds" / "labelsTr" / "case0.nii.gz"


def test_bank_and_dataset_moved_together_keep_working(built, tmp_path):
    project, before = built
    moved = tmp_path / "elsewhere" / "project"
    shutil.move(project, moved)
    done = generate_cli(moved / "bank", tmp_path / "after")
    assert done.returncode == 0, done.stderr
    assert case_bytes(tmp_path / "after") == before


def test_a_bank_moved_alone_still_finds_its_dataset(built, tmp_path):
    project, before = built
    shutil.move(project / "bank", tmp_path / "bank_alone")
    generate(tmp_path / "bank_alone", tmp_path / "after", CFG, progress=False)
    assert case_bytes(tmp_path / "after") == before


def test_a_dataset_moved_alone_fails_in_one_line_then_data_root_and_relocate_work(built, tmp_path):
    project, before = built
    new_place = tmp_path / "new" / "ds"
    shutil.move(project / "ds", new_place)
    failed = generate_cli(project / "bank", tmp_path / "out")
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "file not found" in lines[0] and "lesionsynth relocate" in lines[0], failed.stderr
    assert not (tmp_path / "out").exists()

    done = generate_cli(project / "bank", tmp_path / "with_data_root", "--data-root", str(new_place))
    assert done.returncode == 0, done.stderr
    assert case_bytes(tmp_path / "with_data_root") == before

    moved = subprocess.run([*CLI, "relocate", str(project / "bank"), str(new_place)], capture_output=True, text=True)
    assert moved.returncode == 0, moved.stderr
    assert "12 files checked" in moved.stdout  # 4 cases × (2 channels + label)
    done = generate_cli(project / "bank", tmp_path / "relocated")
    assert done.returncode == 0, done.stderr
    assert case_bytes(tmp_path / "relocated") == before
    inspected = subprocess.run([*CLI, "inspect", str(project / "bank")], capture_output=True, text=True)
    assert str(new_place) in inspected.stdout and "missing" not in inspected.stdout


def test_a_dataset_with_other_files_is_refused_naming_the_case(built, tmp_path):
    project, _ = built
    other = tmp_path / "other"
    shutil.copytree(project / "ds", other)
    label = other / "labelsTr" / "case2.nii.gz"
    label.write_bytes(label.read_bytes()[:-4] + b"\0\0\0\0")  # same size, other bytes
    index_before = (project / "bank" / "bank.json").read_bytes()
    refused = subprocess.run([*CLI, "relocate", str(project / "bank"), str(other)], capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: {label}: not the file case case2 of the bank was built from (same size, different content: "
        f"CRC-32 {refused.stderr.split('CRC-32 ')[1].split(',')[0]}, the bank recorded "
        f"{json.loads(index_before)['cases'][2]['files'][2]['crc32']})"]
    assert (project / "bank" / "bank.json").read_bytes() == index_before
    (other / "imagesTr" / "case1_0001.nii.gz").write_bytes(b"short")
    with pytest.raises(InputError, match=r"case1_0001.nii.gz: not the file case case1 .*\(5 bytes"):
        generate(project / "bank", tmp_path / "out", CFG, progress=False, data_root=other)
    assert not (tmp_path / "out").exists()


def test_a_bank_with_absolute_paths_is_still_read_and_can_be_relocated(built, tmp_path):
    """Banks built before relative paths: absolute case paths, no root_from_bank, no checksums."""
    project, before = built
    index_path = project / "bank" / "bank.json"
    index = json.loads(index_path.read_text())
    root = Path(index["dataset"]["root"])
    del index["dataset"]["root_from_bank"]
    for case in index["cases"]:
        case["images"] = [str(root / p) for p in case["images"]]
        case["label"] = str(root / case["label"])
        del case["files"]
    index_path.write_text(json.dumps(index, indent=1) + "\n")
    generate(project / "bank", tmp_path / "old", CFG, progress=False)
    assert case_bytes(tmp_path / "old") == before
    shutil.move(project / "ds", tmp_path / "moved_ds")
    assert relocate(project / "bank", tmp_path / "moved_ds") == (4, 0)  # no checksums to compare: grids checked
    generate(project / "bank", tmp_path / "after", CFG, progress=False)
    assert case_bytes(tmp_path / "after") == before


def test_a_sharded_run_goes_on_and_finalizes_with_its_bank_copied_elsewhere(built, tmp_path):
    """A cluster job may copy the bank to node-local scratch: a later shard reads the same bank from another
    folder (relocated to the dataset there) and the run goes on; `finalize --bank` finds it once the recorded
    folder is gone, and the output is the same as one run's. Another bank is refused in one line."""
    project, before = built
    out = tmp_path / "sharded"
    first = generate_cli(project / "bank", out, "--shard", "0/2")
    assert first.returncode == 0, first.stderr
    scratch = tmp_path / "node" / "bank"
    shutil.copytree(project / "bank", scratch)
    relocated = subprocess.run([*CLI, "relocate", str(scratch), str(project / "ds")], capture_output=True, text=True)
    assert relocated.returncode == 0, relocated.stderr
    second = generate_cli(scratch, out, "--shard", "1/2")
    assert second.returncode == 0, second.stderr
    assert json.loads((out / "run.json").read_text())["bank"] == str(scratch.resolve())
    (out / "dataset.json").unlink()  # finalize again, from a bank that is no longer where run.json says
    shutil.move(scratch, tmp_path / "kept")
    missing = subprocess.run([*CLI, "finalize", str(out)], capture_output=True, text=True)
    assert missing.returncode != 0 and "--bank" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    build_bank(project / "ds", tmp_path / "other", BankConfig(min_volume_mm3=20.0), jobs=1, progress=False)
    other = subprocess.run([*CLI, "finalize", str(out), "--bank", str(tmp_path / "other")], capture_output=True,
                           text=True)
    assert other.returncode != 0 and "not the bank this run was made from" in other.stderr, other.stderr
    done = subprocess.run([*CLI, "finalize", str(out), "--bank", str(tmp_path / "kept")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert case_bytes(out) == before
    assert json.loads((out / "run.json").read_text())["bank"] == str((tmp_path / "kept").resolve())


def test_a_run_is_the_same_run_wherever_its_bank_is_read_from():
    """Resume and shards compare run.json: the bank's folder may differ when its fingerprint is the same; a
    run.json from before the fingerprint still needs the same folder."""
    from lesionsynth.pipeline import same_run

    record = {"bank": "/scratch/a/bank", "bank_sha256": "f1", "bank_lesions": 3, "config": {"n": 3}}
    assert same_run({**record, "bank": "/home/bank"}, record)
    assert not same_run({**record, "bank_sha256": "f2"}, record)
    assert not same_run({**record, "config": {"n": 4}}, record)
    legacy = {k: v for k, v in record.items() if k != "bank_sha256"}
    assert same_run(legacy, record)
    assert not same_run({**legacy, "bank": "/home/bank"}, record)


def test_report_and_inspect_find_a_moved_bank_with_bank(built, tmp_path):
    """An output whose bank has moved: inspect says the bank is not found, and with --bank it reads the bank
    again (another bank is refused in one line); the report takes --bank too."""
    project, _ = built
    out = tmp_path / "before"
    shutil.move(project / "bank", tmp_path / "bank_elsewhere")
    plain = subprocess.run([*CLI, "inspect", str(out)], capture_output=True, text=True)
    assert plain.returncode == 0 and "(! not found)" in plain.stdout
    found = subprocess.run([*CLI, "inspect", str(out), "--bank", str(tmp_path / "bank_elsewhere")],
                           capture_output=True, text=True)
    assert found.returncode == 0 and "(! not found)" not in found.stdout, found.stderr
    assert str(tmp_path / "bank_elsewhere") in found.stdout
    build_bank(project / "ds", tmp_path / "other", BankConfig(min_volume_mm3=20.0), jobs=1, progress=False)
    other = subprocess.run([*CLI, "report", str(out), "--bank", str(tmp_path / "other")], capture_output=True,
                           text=True)
    assert other.returncode != 0 and "not the bank this run was made from" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
