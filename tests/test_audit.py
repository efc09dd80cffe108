"""Realism audit (`lesionsynth.audit`): lesion features, the real-vs-pasted AUC, and its part in the report."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from lesionsynth.audit import (INSTALL_HINT, MIN_GROUP, audit_output, feature_names, lesion_features, rank_auc,
                               realism_auc)
from lesionsynth.bank import BankConfig, build_bank
from lesionsynth.pipeline import GenerateConfig, generate
from lesionsynth.report import write_report

from .conftest import blob_dataset

# ------------------------------------------------------------------------------------------- features


def _cube_case(spacing=(1.0, 1.0, 1.0)):
    """Two channels of 100 with a 4x4x4 lesion at [8:12]^3: constant 200 in channel 0, half 150 / half 250 in
    channel 1 (in slabs along x, so its IQR is 100); a second lesion (1000) close by, inside the shell's reach."""
    shape = (20, 20, 20)
    channels = np.full((2,) + shape, 100.0, dtype=np.float32)
    lesion = np.zeros(shape, bool)
    lesion[8:12, 8:12, 8:12] = True
    channels[0][lesion] = 200.0
    channels[1, 8:10, 8:12, 8:12] = 150.0
    channels[1, 10:12, 8:12, 8:12] = 250.0
    other = np.zeros(shape, bool)
    other[13:15, 8:12, 8:12] = True  # one voxel gap: inside the 2-voxel shell of the first lesion
    channels[:, other] = 1000.0
    return channels, lesion, lesion | other, np.asarray(spacing)


def test_features_of_a_hand_made_lesion():
    channels, lesion, lesion_all, spacing = _cube_case()
    f = lesion_features(channels, lesion, lesion_all, spacing, foreground=[50.0, 25.0], names=["A", "B"])
    # the other lesion's 1000s are kept out of the shell: its median stays 100
    assert f["contrast_A"] == pytest.approx(2.0)
    assert f["contrast_B"] == pytest.approx(2.0)
    assert f["spread_A"] == pytest.approx(0.0)
    assert f["spread_B"] == pytest.approx(1.0)
    # boundary of a 4^3 cube: 8 corners (jump along 3 axes), 24 edge voxels (2), 24 face voxels (1); each jump
    # gives a central difference of (200 - 100) / 2 mm = 50 per mm; divided by the shell median 100
    edge = 50 * (8 * np.sqrt(3) + 24 * np.sqrt(2) + 24) / 56 / 100
    assert f["edge_A"] == pytest.approx(edge, rel=1e-6)
    assert f["context_A"] == pytest.approx(2.0) and f["context_B"] == pytest.approx(4.0)
    assert f["volume_mm3"] == pytest.approx(64.0) and f["voxels"] == 64
    # spacing: gradients are per mm, volumes in mm³
    g = lesion_features(channels, lesion, lesion_all, np.array([2.0, 2.0, 2.0]))
    assert g["edge_0"] == pytest.approx(edge / 2, rel=1e-6)
    assert g["volume_mm3"] == pytest.approx(512.0)
    assert "context_0" not in g  # no foreground given
    # gain independence: every ratio stays when the image is scaled
    h = lesion_features(channels * 7.5, lesion, lesion_all, spacing, foreground=[375.0, 187.5], names=["A", "B"])
    for k in f:
        assert h[k] == pytest.approx(f[k], rel=1e-5)


def test_tiny_lesions_and_zero_shells():
    channels, lesion, lesion_all, spacing = _cube_case()
    tiny = np.zeros_like(lesion)
    tiny[2, 2, 2:5] = True  # 3 voxels
    assert lesion_features(channels, tiny, lesion_all | tiny, spacing) is None
    # a lesion filling its neighbourhood has no shell
    full = np.ones_like(lesion)
    assert lesion_features(channels, full, full, spacing) is None
    # shell median 0: the ratios are NaN (left out by the classifier), not an error
    dark = channels.copy()
    dark[:, ~lesion] = 0.0
    f = lesion_features(dark, lesion, lesion, spacing)
    assert np.isnan(f["contrast_0"]) and np.isnan(f["edge_0"])
    # CT: an offset makes HU ratios meaningful (HU 0 shell -> 1000)
    g = lesion_features(dark, lesion, lesion, spacing, offsets=[1000.0, 1000.0])
    assert g["contrast_0"] == pytest.approx(1.2)


# ------------------------------------------------------------------------------------------- AUC

def _groups(shift: float, n: int = 150, seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = feature_names(["T1", "FLAIR"])
    real = [dict(zip(keys, rng.normal(1.0, 0.1, len(keys)))) for _ in range(n)]
    pasted = [dict(zip(keys, rng.normal(1.0, 0.1, len(keys)))) for _ in range(n)]
    for row in pasted:
        row["edge_FLAIR"] += shift
    return real, pasted


def test_auc_is_half_for_the_same_distribution_and_one_for_different_ones():
    same = realism_auc(*_groups(0.0))
    assert same["reason"] is None and 0.35 < same["auc"] < 0.65
    assert same["n_real"] == same["n_pasted"] == 150
    lo, hi = same["auc_ci95"]
    assert lo < same["auc"] < hi
    assert all(0.5 <= a < 0.65 for a in same["single_auc"].values())
    apart = realism_auc(*_groups(0.5))
    assert apart["auc"] > 0.97
    assert apart["strongest"][0]["feature"] == "edge_FLAIR" and apart["strongest"][0]["auc"] > 0.97
    assert len(apart["strongest"]) == 3
    # symmetrised: a feature lower in pasted lesions counts as much as a higher one
    below = realism_auc(*_groups(-0.5))
    assert below["single_auc"]["edge_FLAIR"] == pytest.approx(apart["single_auc"]["edge_FLAIR"], abs=0.02)
    # same seed, same numbers
    assert realism_auc(*_groups(0.5), seed=3) == realism_auc(*_groups(0.5), seed=3)
    assert rank_auc(np.array([0, 0, 1, 1]), np.array([1.0, 2.0, 3.0, 4.0])) == 1.0


def _hide_sklearn(monkeypatch) -> None:
    """Make every `import sklearn...` raise ImportError, as without scikit-learn installed."""
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_auc_needs_enough_lesions_and_scikit_learn(monkeypatch):
    real, pasted = _groups(0.5)
    few = realism_auc(real, pasted[: MIN_GROUP - 1])
    assert few["auc"] is None and "too few" in few["reason"]
    # non-finite features: the lesion is left out
    pasted[0]["contrast_T1"] = float("nan")
    assert realism_auc(real, pasted)["n_dropped"] == 1
    _hide_sklearn(monkeypatch)
    missing = realism_auc(real, pasted)
    assert missing["auc"] is None and missing["reason"] == INSTALL_HINT
    assert missing["single_auc"]["edge_FLAIR"] > 0.97  # needs no scikit-learn


# ------------------------------------------------------------------------------------------- in the report

@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    bank = build_bank(blob_dataset(root / "ds", n_cases=6), root / "bank", BankConfig(), jobs=1, progress=False)
    out = root / "out"
    generate(bank, out, GenerateConfig(n=8, load="high", seed=2, mode="populate"), progress=False)
    return out


EXPECTED_KEYS = {"channels", "n_real", "n_pasted", "real_available", "pasted_available", "auc", "auc_ci95", "reason",
                 "features", "single_auc", "strongest", "summary", "context", "notes", "seconds", "lesions"}


def test_report_writes_realism_json_and_section(output):
    html_path = write_report(output, n_examples=1, seed=0)
    audit = json.loads((output / "report" / "realism.json").read_text())
    assert EXPECTED_KEYS <= set(audit)
    assert audit["channels"] == ["T1", "FLAIR"]
    assert audit["features"] == feature_names(["T1", "FLAIR"])
    assert audit["n_real"] >= MIN_GROUP and audit["n_pasted"] >= MIN_GROUP
    assert 0.0 <= audit["auc"] <= 1.0 and audit["reason"] is None
    assert len(audit["strongest"]) == 3
    assert set(audit["summary"]) == set(audit["features"]) | {"context_T1", "context_FLAIR", "volume_mm3"}
    s = audit["summary"]["contrast_FLAIR"]["real"]
    assert s["q25"] <= s["median"] <= s["q75"] and s["n"] == audit["n_real"]
    assert set(audit["context"]) == {"T1", "FLAIR"}
    kinds = [les["kind"] for les in audit["lesions"]]
    assert kinds.count("real") == audit["n_real"] and kinds.count("pasted") == audit["n_pasted"]
    # every pasted lesion is traced to a paste of its own case's record, whose donor case it carries
    records = {r["case_id"]: r for r in map(json.loads, (output / "manifest.jsonl").read_text().splitlines())}
    for les in audit["lesions"]:
        if les["kind"] == "pasted":
            ops = {op["lesion_id"]: op for op in records[les["case_id"]]["ops"] if op["op"] == "paste"}
            assert les["source_case"] == ops[les["lesion_id"]]["source_case"]
    # and every real lesion to its bank lesion
    bank_ids = {les["id"]: les["source_case"] for les in json.loads(
        (Path(json.loads((output / "run.json").read_text())["bank"]) / "bank.json").read_text())["lesions"]}
    real_rows = [les for les in audit["lesions"] if les["kind"] == "real"]
    assert real_rows and all(bank_ids[les["lesion_id"]] == les["case_id"] for les in real_rows)
    assert set(audit["donor_matched"]) >= {"auc", "auc_ci95", "n_real", "n_pasted", "strongest"}
    # blob lesions are bright in T1 (160 in 100) and in FLAIR (120 in 120): contrast ≈ 1.6 and ≈ 1
    assert 1.2 < audit["summary"]["contrast_T1"]["real"]["median"] < 1.8
    text = html_path.read_text()
    assert 'id="realism"' in text and "Realism audit" in text and "indistinguishable" in text
    assert f"Realism AUC {audit['auc']:.2f}" in text
    assert re.search(r'<img data-name="realism.png" src="data:image/png;base64,iVBORw0KGgo', text)  # a PNG
    # the same draw every time
    again = audit_output(output, seed=0)
    written_only = ("seconds", "strong", "unlabelled_changes")  # the report adds the strong critic's figures
    assert {k: v for k, v in again.items() if k not in written_only} == {
        k: v for k, v in audit.items() if k not in written_only}


def test_report_without_scikit_learn_still_works(output, monkeypatch):
    _hide_sklearn(monkeypatch)
    text = write_report(output, n_examples=0).read_text()
    audit = json.loads((output / "report" / "realism.json").read_text())
    assert audit["auc"] is None and audit["reason"] == INSTALL_HINT
    assert "pip install scikit-learn" in text and 'id="load"' in text


def test_audit_bounds_the_lesions_measured(output):
    audit = audit_output(output, max_lesions=5, seed=1)
    assert audit["n_real"] <= 5 and audit["n_pasted"] <= 5
    assert audit["auc"] is None and "too few" in audit["reason"]


def test_weighted_auc_matches_scikit_learn_and_volume_matching_removes_a_size_effect():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from lesionsynth.audit import _weighted_auc, realism_auc

    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    score = rng.normal(size=300) + 0.7 * y
    score[::7] = np.round(score[::7])  # ties
    weight = rng.uniform(0.2, 3.0, 300)
    assert _weighted_auc(y, score, weight) == pytest.approx(
        sklearn_metrics.roc_auc_score(y, score, sample_weight=weight), abs=1e-12)
    # a feature that only follows lesion size: pasted lesions are larger, so it separates them, but not once
    # the real lesions are weighted to the pasted lesions' sizes
    def lesions(n, mean_log_volume):
        volume = np.exp(rng.normal(mean_log_volume, 1.0, n))
        return [{"volume_mm3": v, "spread_0": 0.1 * np.log(v) + rng.normal(0, 0.05)} for v in volume]
    real, pasted = lesions(300, 4.0), lesions(200, 5.0)
    plain = realism_auc(real, pasted, features=["spread_0"])
    matched = realism_auc(real, pasted, features=["spread_0"], match_volume=True)
    assert plain["auc"] > 0.65
    assert matched["auc"] < 0.6


def test_case_matching_compares_pasted_lesions_with_their_own_case():
    """A feature set by the case's grid (a coarse case blurs every lesion on it): pasted lesions sit mostly in
    the coarse case, so the plain AUC separates them; weighted to the pasted lesions' mix of base cases, not."""
    from lesionsynth.audit import group_weights, realism_auc

    rng = np.random.default_rng(5)
    blur = {"fine": 0.0, "coarse": 1.0}

    def lesions(counts, pasted):
        rows = []
        for case, n in counts.items():
            for _ in range(n):
                row = {"volume_mm3": 100.0, "spread_0": blur[case] + rng.normal(0, 0.3)}
                row.update({"case_id": f"syn_{case}", "base_case": case} if pasted else {"case_id": case})
                rows.append(row)
        return rows

    real, pasted = lesions({"fine": 150, "coarse": 50}, False), lesions({"fine": 20, "coarse": 180}, True)
    assert realism_auc(real, pasted, features=["spread_0"])["auc"] > 0.65
    assert realism_auc(real, pasted, features=["spread_0"], match_case=True)["auc"] < 0.6
    w_real, w_pasted = group_weights(["a", "a", "b"], ["a", "b", "b", "c"])
    assert w_pasted.tolist() == [1.0, 1.0, 1.0, 0.0]  # case c has no real lesion to compare with
    assert w_real[0] == w_real[1] and w_real[2] == pytest.approx(4 * w_real[0])
    assert w_real.sum() == pytest.approx(w_pasted.sum())


def test_donor_matching_compares_pasted_lesions_with_their_own_donors():
    """A dataset that mixes two lesion kinds (a few dark "stroke" lesions, many brighter "ms" ones): pasted
    lesions drawn mostly from the stroke lesions look like stroke lesions, so the plain AUC separates them
    from the MS-dominated real pool; weighted to the pasted lesions' mix of donor lesions, not."""
    from lesionsynth.audit import realism_auc

    rng = np.random.default_rng(7)
    contrast = {"stroke": 0.47, "ms": 0.66}

    def lesions(counts, pasted):
        rows = []
        for kind, n in counts.items():
            for i in range(n):
                donor = f"{kind}_{i % 5}"  # pasted lesions reuse 5 donors of each kind
                row = {"volume_mm3": 100.0, "contrast_0": contrast[kind] + rng.normal(0, 0.05)}
                row.update({"case_id": "syn", "base_case": "ms_case", "lesion_id": donor} if pasted
                           else {"case_id": f"{kind}_case", "lesion_id": f"{kind}_{i}"})
                rows.append(row)
        return rows

    real, pasted = lesions({"stroke": 10, "ms": 150}, False), lesions({"stroke": 60, "ms": 20}, True)
    assert realism_auc(real, pasted, features=["contrast_0"])["auc"] > 0.7
    donor = realism_auc(real, pasted, features=["contrast_0"], match_donor=True)
    assert donor["auc"] < 0.65 and donor["n_real"] == 10  # only the 10 donors weigh
    # a pasted lesion whose donor is not among the real ones measured has nothing to be compared with
    unknown = [dict(r, lesion_id="elsewhere") for r in pasted[:5]] + pasted[5:]
    assert realism_auc(real, unknown, features=["contrast_0"], match_donor=True)["n_pasted"] == len(pasted) - 5


def test_lesion_source_names_the_op_that_made_a_lesion():
    """The paste whose centre lies in the lesion, the larger of two merged ones, else the nearest centre."""
    from lesionsynth.audit import lesion_source

    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 0.0, 5.0]
    component = np.zeros((10, 10, 10), bool)
    component[2:8, 2:8, 2:5] = True  # origin (3, 0, 1): voxels x 5-10, y 2-7, z 3-5
    origin = (3, 0, 1)
    small = {"centre_mm": [2.0, 6.0, 17.0], "source_case": "a", "lesion_id": "a_1", "added_mm3": 10.0}  # (6, 3, 4)
    large = {"centre_mm": [8.0, 12.0, 14.0], "source_case": "b", "lesion_id": "b_3", "added_mm3": 900.0}  # (9, 6, 3)
    far = {"centre_mm": [60.0, 60.0, 60.0], "source_case": "c", "lesion_id": "c_2", "added_mm3": 5000.0}
    assert lesion_source(component, origin, affine, [small, far])["lesion_id"] == "a_1"
    assert lesion_source(component, origin, affine, [small, large, far])["lesion_id"] == "b_3"
    near = {"centre_mm": [20.0, 30.0, 30.0], "source_case": "d", "lesion_id": "d_1"}  # outside, nearer than far
    assert lesion_source(component, origin, affine, [far, near])["lesion_id"] == "d_1"
    assert lesion_source(component, origin, affine, []) is None
