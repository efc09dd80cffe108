"""Strong realism audit (`lesionsynth.critic`): features with known answers, the grouped classifier, inpainting
residuals, unlabelled changes, and its place in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lesionsynth.critic import (FAMILIES, feature_names, lesion_features, noise_measures, paired_band_noise,
                                residual_excess, shape_features, strong_audit, surface_distance_mm, tissue_reference,
                                unlabelled_changes)

from .conftest import blob_dataset

# ------------------------------------------------------------------------------------------- geometry


def _ball(shape, centre, radius_mm, spacing):
    g = np.indices(shape).astype(np.float64)
    return sum(((g[i] - centre[i]) * spacing[i]) ** 2 for i in range(3)) <= radius_mm ** 2


def test_surface_distance_is_in_mm_from_the_voxel_faces():
    mask = np.zeros((9, 9, 9), bool)
    mask[3:6, 3:6, 3:6] = True
    d = surface_distance_mm(mask, (1.0, 1.0, 2.0))
    assert d[6, 4, 4] == pytest.approx(0.5) and d[7, 4, 4] == pytest.approx(1.5)  # face neighbours along x
    assert d[4, 4, 6] == pytest.approx(1.0) and d[4, 4, 7] == pytest.approx(3.0)  # 2 mm slices along z
    assert d[6, 6, 4] == pytest.approx(np.sqrt(0.5))  # an edge neighbour
    assert d[4, 4, 4] == pytest.approx(-1.5) and d[3, 4, 4] == pytest.approx(-0.5)  # inside: negative


def test_shape_features_of_boxes():
    cube = np.zeros((8, 8, 8), bool)
    cube[2:6, 2:6, 2:6] = True
    f = shape_features(cube, (1.0, 1.0, 1.0))
    assert f["surface_per_volume"] == pytest.approx(6 * 16 / 64)
    assert f["bbox_fill"] == 1.0 and f["elongation"] == pytest.approx(1.0) and f["flatness"] == pytest.approx(1.0)
    assert f["log_volume"] == pytest.approx(np.log(64))
    # the same voxels on a 2 mm grid along x: 8 mm long, twice the volume
    g = shape_features(cube, (2.0, 1.0, 1.0))
    assert g["log_volume"] == pytest.approx(np.log(128)) and g["elongation"] > 1.9
    rod = np.zeros((4, 4, 16), bool)
    rod[1:3, 1:3, 2:14] = True
    assert shape_features(rod, (1.0, 1.0, 1.0))["elongation"] > 4


# ------------------------------------------------------------------------------------------- noise bands

SD = 10.0


def _noisy_lesion_case(seed=0, ring_gain=2.0, ring=(1.0, 2.0), spacing=(1.0, 1.0, 1.0), shape=(44, 44, 44)):
    """Tissue 100 ± SD with a bright ball (radius 6 mm) in the middle; the noise in the ring `ring` (mm from the
    lesion's surface) is `ring_gain` times the tissue's."""
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing, dtype=np.float64)
    centre = (np.array(shape) - 1) / 2
    lesion = _ball(shape, centre, 6.0, spacing)
    image = np.full(shape, 100.0) + rng.normal(0, SD, shape)
    image[lesion] += 80.0
    d = surface_distance_mm(lesion, spacing)
    band = (d > ring[0]) & (d <= ring[1])
    image[band] += rng.normal(0, SD * np.sqrt(ring_gain ** 2 - 1), band.sum())
    return image[None].astype(np.float32), lesion, spacing


def _far_reference(image, lesion, spacing):
    far = surface_distance_mm(lesion, spacing) > 10
    from lesionsynth.critic import laplacian, local_residual

    return [noise_measures(local_residual(image[0], far), laplacian(image[0], far, spacing), far)]


def test_band_noise_finds_a_noise_ring_and_nothing_beyond_it():
    image, lesion, spacing = _noisy_lesion_case()
    ref = _far_reference(image, lesion, spacing)
    assert ref[0]["mad"] == pytest.approx(SD, rel=0.1)  # residual of white noise ≈ its sd
    f = lesion_features(image, lesion, np.zeros_like(lesion), spacing, ref, ["MR"], body_median=[100.0])
    assert set(f) == set(sum(feature_names(["MR"]).values(), [])) - {"context:body_edge_mm"}
    assert 1.6 < f["band_noise:mad_1-2mm:MR"] < 2.4
    assert 1.6 < f["band_noise:lap_1-2mm:MR"] < 2.4
    assert 0.85 < f["band_noise:mad_5-8mm:MR"] < 1.15 and 0.85 < f["band_noise:lap_5-8mm:MR"] < 1.15
    assert 0.85 < f["band_noise:mad_2-3.5mm:MR"] < 1.3
    assert 0.85 < f["texture_in:mad:MR"] < 1.15  # the lesion's own noise is the tissue's
    assert 7 < f["intensity:p50:MR"] < 9.5  # contrast 80 in noise sd 10 (shell sd a little above 10)
    assert f["radial:-2mm:MR"] > 6 and abs(f["radial:+4mm:MR"]) < 1.5
    # a plain lesion: no ring
    plain, _, _ = _noisy_lesion_case(ring_gain=1.0)
    g = lesion_features(plain, lesion, np.zeros_like(lesion), spacing, _far_reference(plain, lesion, spacing), ["MR"])
    assert 0.85 < g["band_noise:mad_1-2mm:MR"] < 1.15
    # gain-invariant: the same case scaled
    h = lesion_features(image * 7.0, lesion, np.zeros_like(lesion), spacing,
                        _far_reference(image * 7.0, lesion, spacing), ["MR"], body_median=[700.0])
    for k, v in f.items():
        assert h[k] == pytest.approx(v, rel=1e-4, abs=1e-5) or (np.isnan(v) and np.isnan(h[k]))


def test_paired_band_noise_compares_the_same_voxels_before_and_after():
    after, lesion, spacing = _noisy_lesion_case(seed=1, ring=(2.0, 3.0))
    before = after.copy()
    d = surface_distance_mm(lesion, spacing)
    rng = np.random.default_rng(9)
    before[0][(d > 2) & (d <= 3)] = 100.0 + rng.normal(0, SD, int(((d > 2) & (d <= 3)).sum()))
    ratios = paired_band_noise(after, before, lesion, ~lesion, spacing, ["MR"])
    assert 1.6 < ratios["mad_2-3mm:MR"] < 2.4
    # untouched voxels (only the residuals of the band's first layer reach into the changed ring)
    assert ratios["mad_4+mm:MR"] == pytest.approx(1.0, abs=0.02)
    assert ratios["lap_4+mm:MR"] == pytest.approx(1.0, abs=0.02)


def test_tissue_reference_avoids_lesions_and_reads_the_noise():
    shape = (40, 40, 30)
    spacing = np.array([1.0, 1.0, 2.0])
    rng = np.random.default_rng(3)
    body = _ball(shape, (np.array(shape) - 1) / 2, 28.0, spacing)
    image = np.where(body, 100.0, 0.0) + rng.normal(0, SD, shape)
    lesion = _ball(shape, (20, 20, 15), 4.0, spacing)
    image[lesion] += 300.0 * rng.random(int(lesion.sum()))  # a wild lesion the reference must not see
    ref = tissue_reference(image[None].astype(np.float32), lesion, spacing, ["MR"], [0.0], np.random.default_rng(0))
    assert ref.noise[0]["mad"] == pytest.approx(SD, rel=0.15)
    assert ref.body_median[0] == pytest.approx(100.0, abs=3.0)
    assert ref.noise == tissue_reference(image[None].astype(np.float32), lesion, spacing, ["MR"], [0.0],
                                         np.random.default_rng(0)).noise


# ------------------------------------------------------------------------------------------- classifier

def _rows(n_groups, per_group, shift_family, shift, seed, kind):
    rng = np.random.default_rng(seed)
    keys = feature_names(["MR"])
    rows = []
    for g in range(n_groups):
        case_level = rng.normal(0, 0.3)  # every case a little different
        for _ in range(per_group):
            row = {"group": f"case{g}"}
            for fam, ks in keys.items():
                for k in ks:
                    row[k] = case_level + rng.normal() + (shift if fam == shift_family else 0.0)
            rows.append(row)
    return rows


def test_grouped_auc_separates_what_differs_and_names_its_family():
    pytest.importorskip("sklearn")
    from lesionsynth.critic import classify_rows, real_vs_real

    families = feature_names(["MR"])
    real = _rows(8, 25, None, 0.0, 1, "real")
    apart = classify_rows(real, _rows(8, 25, "band_noise", 1.5, 2, "pasted"), families, seed=0)
    assert apart["auc"] > 0.95 and apart["n_splits"] == 5
    assert apart["family_importance"][0]["family"] == "band_noise"
    assert apart["family_importance"][0]["auc_drop"] > 0.1
    lo, hi = apart["auc_ci95"]
    assert lo <= apart["auc"] <= hi
    same = classify_rows(real, _rows(8, 25, None, 0.0, 3, "pasted"), families, seed=0)
    assert 0.35 < same["auc"] < 0.65
    # deterministic
    again = classify_rows(real, _rows(8, 25, "band_noise", 1.5, 2, "pasted"), families, seed=0)
    assert again == apart
    honest = real_vs_real(real, families, seed=0)
    assert honest["reason"] is None and len(honest["aucs"]) == 3 and 0.3 < honest["auc"] < 0.7
    few = classify_rows(real[:5], real[5:10], families)
    assert few["auc"] is None and "too few" in few["reason"]


def test_classifier_needs_scikit_learn(monkeypatch):
    import sys

    from lesionsynth.audit import INSTALL_HINT
    from lesionsynth.critic import classify_rows

    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)
    out = classify_rows(_rows(4, 20, None, 0.0, 1, "r"), _rows(4, 20, None, 0.0, 2, "p"), feature_names(["MR"]))
    assert out["auc"] is None and out["reason"] == INSTALL_HINT


# ------------------------------------------------------------------------------------------- inpainting

def test_residual_excess_is_one_untouched_and_zero_when_filled():
    image, lesion, spacing = _noisy_lesion_case(ring_gain=1.0)
    base = image[0]
    tissue = ~lesion
    assert residual_excess(base, base, lesion, tissue, spacing) == pytest.approx(1.0)
    filled = base.copy()
    filled[lesion] = 100.0 + np.random.default_rng(4).normal(0, SD, int(lesion.sum()))
    assert abs(residual_excess(filled, base, lesion, tissue, spacing)) < 0.1
    half = base.copy()
    half[lesion] -= 40.0
    assert residual_excess(half, base, lesion, tissue, spacing) == pytest.approx(0.5, abs=0.05)
    # an invisible lesion has no contrast to leave behind
    assert np.isnan(residual_excess(filled, filled, lesion, tissue, spacing))


# ------------------------------------------------------------------------------------------- unlabelled changes

def test_unlabelled_changes_are_split_by_where_they_lie():
    shape = (40, 40, 40)
    spacing = np.array([1.0, 1.0, 1.0])
    rng = np.random.default_rng(5)
    base = (100.0 + rng.normal(0, SD, (1,) + shape)).astype(np.float32)
    base_lesion = np.zeros(shape, bool)
    assert unlabelled_changes(base, base.copy(), base_lesion, base_lesion, spacing, [SD]) == \
        {"near_paste": 0, "near_inpaint": 0, "elsewhere": 0}
    out = base.copy()
    written = _ball(shape, (12, 12, 12), 3.0, spacing)
    out[0][written] += 100.0
    d = surface_distance_mm(written, spacing)
    feather = (d > 0) & (d <= 1.0)
    out[0][feather] += 60.0           # an unlabelled feather, 6 sd
    out[0][30:33, 30:33, 30:33] += 60.0  # 27 voxels changed far from any lesion
    out[0][20, 5, 5] += 5.0           # half a noise sd: not a change
    counts = unlabelled_changes(out, base, written, base_lesion, spacing, [SD])
    assert counts["near_paste"] == pytest.approx(int(feather.sum()), abs=2)
    assert counts["elsewhere"] == 27 and counts["near_inpaint"] == 0
    # a removed lesion: its changed voxels count apart
    removed = _ball(shape, (28, 12, 12), 2.5, spacing)
    out2 = base.copy()
    out2[0][removed] -= 60.0
    counts = unlabelled_changes(out2, base, np.zeros(shape, bool), removed, spacing, [SD])
    assert counts["near_inpaint"] == int(removed.sum()) and counts["elsewhere"] == 0


# ------------------------------------------------------------------------------------------- on an output

@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    from lesionsynth.bank import BankConfig, build_bank
    from lesionsynth.pipeline import GenerateConfig, generate

    root = tmp_path_factory.mktemp("critic")
    bank = build_bank(blob_dataset(root / "ds", n_cases=6), root / "bank", BankConfig(), jobs=1, progress=False)
    out = root / "out"
    generate(bank, out, GenerateConfig(n=6, load="high", seed=3, mode="replace"), progress=False)
    return out


def test_strong_audit_of_an_output(output):
    result = strong_audit(output, seed=0, keep_rows=True)
    assert result["channels"] == ["T1", "FLAIR"]
    assert result["families"] == {f: len(k) for f, k in feature_names(["T1", "FLAIR"]).items()}
    assert set(result["families"]) == set(FAMILIES)
    assert result["n_real"] > 0 and result["n_pasted"] > 0 and result["n_inpainted"] > 0
    kinds = [r["kind"] for r in result["rows"]]
    assert kinds.count("pasted") == result["n_pasted"] and kinds.count("inpainted") == result["n_inpainted"]
    records = {r["case_id"]: r for r in map(json.loads, (output / "manifest.jsonl").read_text().splitlines())}
    for row in result["rows"]:
        if row["kind"] in ("pasted", "inpainted", "control"):  # grouped by the base case's anatomy
            assert row["group"] == records[row["case_id"]]["base_case"]
    # mode replace removes every original lesion: each inpainted region was a real lesion, some contrast gone
    excess = result["inpainted"]["residual_excess"]["T1"]
    assert excess["n"] > 0 and excess["median"] < 0.8
    changes = result["unlabelled_changes"]
    assert len(changes["per_case"]) == len(records) and len(changes["worst"]) == min(5, len(records))
    assert changes["totals"]["near_inpaint"] > 0
    paired = result["band_noise"]["paired_output_over_base"]
    assert set(paired) == {"0-1mm", "1-2mm", "2-3mm", "4+mm"} and paired["4+mm"]["mad"]["T1"]["n"] > 0
    assert "NaN" not in json.dumps(result)  # JSON-able (NaN: None)
    # the same draw, folds and permutations every time
    again = strong_audit(output, seed=0, keep_rows=True)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}


def test_report_carries_the_strong_audit(output):
    from lesionsynth.report import write_report

    text = write_report(output, n_examples=0, seed=0).read_text()
    audit = json.loads((output / "report" / "realism.json").read_text())
    assert {"strong", "unlabelled_changes"} <= set(audit) and "auc" in audit  # the 6-feature audit stays
    assert audit["strong"]["pasted"]["n_positive"] == audit["strong"]["n_pasted"]
    assert 'id="critic"' in text and "Strong audit" in text and "real vs real" in text
    assert "Unlabelled changed voxels" in text
    # the band noise is a table, one row per distance, MAD and Laplacian per channel
    assert "<th>distance</th>" in text and "<th>MAD T1</th>" in text and "<td>4+mm</td>" in text
    honest = audit["strong"]["real_vs_real"]
    if honest.get("auc") is not None and honest["n_cases"] < 10:
        assert "not a fair test of the classifier" in text
