"""Plumbing of benchmarks/downstream_unet.py: `--smoke` on the real sample data (bank, generate, train, eval)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_downstream_unet_smoke(real_data, tmp_path):
    out = tmp_path / "downstream.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "downstream_unet.py"), "--smoke",
         "--dataset", str(real_data / "mni_lesions"), "--work", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [c["case"] for c in res["train_cases"]] == ["ATLAS_003", "ATLAS_002", "MS_01038", "MS_01042"]
    assert len(res["test_cases"]) == 2
    assert {(r["arm"], r["seed"]) for r in res["runs"]} == {("real", 0), ("real+carvemix", 0), ("real+gen", 0)}
    for run in res["runs"]:
        assert run["status"] in ("ok", "collapsed"), run
        assert len(run["cases"]) == 2
        for case in run["cases"]:
            assert 0.0 <= case["dice"] <= 1.0
            assert case["truth_components"] > 0
            false_positives = len(case["false_positive_sizes"])
            assert false_positives <= case["pred_components"]
            if case["pred_components"]:
                assert case["precision"] == pytest.approx(1 - false_positives / case["pred_components"])
        assert run["false_positives"] == sum(len(c["false_positive_sizes"]) for c in run["cases"])
        predicted = sum(c["pred_components"] for c in run["cases"])
        if predicted:  # pooled over the cases' lesions: each predicted component counts once
            assert run["pooled_precision"] == pytest.approx(1 - run["false_positives"] / predicted)
        else:
            assert run["pooled_precision"] is None
        assert 0.0 <= run["pooled_recall"] <= 1.0
        assert run["pooled_recall"] == pytest.approx(sum(c["truth_detected"] for c in run["cases"])
                                                     / sum(c["truth_components"] for c in run["cases"]))
    assert res["runs"][1]["n_train_cases"] == 4 + 2
    assert res["generated"]["0"]["cases"] == 2
    assert res["wins"]["median_dice"]["of"] == 1
    assert set(res["summary"]["real+gen"]) >= {"pooled_precision", "pooled_recall"}
