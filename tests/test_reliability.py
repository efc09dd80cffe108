"""Never a partial output: kill -9 and --resume, shards, write failures, same bytes as one run."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lesionsynth.errors import LesionsynthError
from lesionsynth.pipeline import GenerateConfig, finalize_run, generate

CFG = GenerateConfig(n=8, load="uniform", seed=4, folds=2)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.json"}


@pytest.fixture(scope="module")
def reference(blob_bank, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("ref") / "out"
    generate(blob_bank, out, CFG, progress=False)
    hashes = _hashes(out)
    assert "manifest.jsonl" in hashes and "splits_final.json" in hashes
    return hashes


def _cli(*args):
    return [sys.executable, "-m", "lesionsynth.cli", *args]


def test_kill_then_resume_gives_identical_bytes(blob_bank, reference, tmp_path):
    out = tmp_path / "out"
    args = ["generate", str(blob_bank), "--out", str(out), "--n", "8", "--load", "uniform", "--seed", "4",
            "--folds", "2"]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / ".progress"
    deadline = time.time() + 120
    while time.time() < deadline:
        done = sum(len(p.read_text().splitlines()) for p in progress.glob("*.jsonl")) if progress.is_dir() else 0
        if done >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "dataset.json").exists()  # an interrupted run is visibly unfinished
    res = subprocess.run(_cli(*args), capture_output=True, text=True)
    assert res.returncode == 2 and "--resume" in res.stderr
    res = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert _hashes(out) == reference


def test_shards_give_the_same_bytes_as_one_run(blob_bank, reference, tmp_path):
    out = tmp_path / "out"
    first = generate(blob_bank, out, CFG, progress=False, shard=(1, 3))
    assert len(first.records) < CFG.n and not (out / "dataset.json").exists()
    generate(blob_bank, out, CFG, progress=False, shard=(0, 3))
    with pytest.raises(LesionsynthError, match="not done yet"):
        finalize_run(out)
    generate(blob_bank, out, CFG, progress=False, shard=(2, 3))  # the last shard finalises
    assert _hashes(out) == reference


def test_shards_in_parallel_processes(blob_bank, reference, tmp_path):
    out = tmp_path / "out"
    args = ["generate", str(blob_bank), "--out", str(out), "--n", "8", "--load", "uniform", "--seed", "4",
            "--folds", "2"]
    procs = [subprocess.Popen(_cli(*args, "--shard", f"{i}/2"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    if not (out / "dataset.json").exists():  # both finished at once: finalize explicitly
        assert subprocess.run(_cli("finalize", str(out))).returncode == 0
    assert _hashes(out) == reference


def test_write_failure_is_clean_and_resumable(blob_bank, reference, tmp_path, monkeypatch):
    import lesionsynth.io.output as output

    out = tmp_path / "out"
    real_save = output.save_image
    calls = {"n": 0}

    def failing_save(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 14:  # half-way through the synthetic cases
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(output, "save_image", failing_save)
    with pytest.raises(LesionsynthError, match="No space left on device.*--resume"):
        generate(blob_bank, out, CFG, progress=False)
    assert not list(out.rglob(".*.tmp*"))  # no partial file left
    assert not (out / "dataset.json").exists()
    for label in (out / "labelsTr").glob("*.nii.gz"):
        assert label.stat().st_size > 0
    monkeypatch.setattr(output, "save_image", real_save)
    generate(blob_bank, out, CFG, progress=False, resume=True)
    assert _hashes(out) == reference


def test_resume_refuses_other_configuration(blob_bank, tmp_path):
    out = tmp_path / "out"
    generate(blob_bank, out, GenerateConfig(n=1, load="low"), progress=False)
    with pytest.raises(LesionsynthError, match="different configuration"):
        generate(blob_bank, out, GenerateConfig(n=1, load="high"), progress=False, resume=True)
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert manifest[0]["load_family"] == "low"


def test_missing_or_changed_base_case_stops_before_writing(tmp_path):
    import nibabel as nib
    import numpy as np

    from lesionsynth.bank import BankConfig, build_bank

    from .conftest import blob_dataset

    ds = blob_dataset(tmp_path / "ds", n_cases=2)
    bank = build_bank(ds, tmp_path / "bank", BankConfig(), progress=False)
    label = ds / "labelsTr" / "case1.nii.gz"
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), label)  # one slice short
    with pytest.raises(LesionsynthError, match="case1.nii.gz: grid differs"):
        generate(bank, tmp_path / "out", GenerateConfig(n=2, load="low"), progress=False)
    label.unlink()
    with pytest.raises(LesionsynthError, match="case1.nii.gz: file not found"):
        generate(bank, tmp_path / "out", GenerateConfig(n=2, load="low"), progress=False)
    assert not (tmp_path / "out").exists()
