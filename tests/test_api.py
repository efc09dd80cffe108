"""The Python API mirrors the commands."""

import json

import lesionsynth


def test_api_builds_and_generates(blobs, tmp_path):
    assert lesionsynth.build_bank.__doc__ and lesionsynth.generate.__doc__
    bank = lesionsynth.build_bank(blobs, tmp_path / "bank", lesionsynth.BankConfig(min_volume_mm3=1.0),
                                  progress=False)
    res = lesionsynth.generate(bank, tmp_path / "out", lesionsynth.GenerateConfig(n=2, load="real", seed=3),
                               progress=False)
    assert len(res.records) == 2
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["load"] == "real" and run["config"]["seed"] == 3
