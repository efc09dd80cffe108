"""`lesionsynth score` on the real sample labels: predictions with known faults, whose effect on every metric is
known in advance; the lesion-wise numbers cross-checked against panoptica; one-line errors, no partial output,
reproducible bootstrap intervals."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lesionsynth.errors import InputError
from lesionsynth.metrics import bootstrap_means, case_metrics, match_lesions
from lesionsynth.score import ScoreConfig, level_order, open_truth, score_predictions, volume_bin

from .conftest import blob_dataset

FULL = ndimage.generate_binary_structure(3, 3)  # 26-connectivity, the command's default
#: The test set's strata: two factors, one with numeric levels and one whose levels sort by their values.
STRATA = {"ATLAS_001": ("contrast", "1.5", "1.5"), "ATLAS_002": ("contrast", "0.5", "0.5"),
          "ATLAS_003": ("contrast", "1.0", "1.0"), "MS_01038": ("load", "medium", "20806"),
          "MS_01039": ("load", "high", "36254"), "MS_01042": ("load", "low", "11000")}
SMALL_VOXELS = 50        # lesions below this many voxels are dropped by the "dropped" prediction
FP_BLOBS = 3             # false-positive cubes added far from every lesion


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lesionsynth.cli", *map(str, args)], capture_output=True, text=True)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(mask, structure=FULL)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def far_blobs(mask: np.ndarray, count: int, margin: int = 10) -> np.ndarray:
    """`count` 3×3×3 cubes, each at least `margin` voxels from every lesion voxel and from each other."""
    blobs = np.zeros_like(mask)
    placed = 0
    for i in range(margin + 1, mask.shape[0] - margin - 1, 2 * margin + 3):
        for j in range(margin + 1, mask.shape[1] - margin - 1, 2 * margin + 3):
            for k in range(margin + 1, mask.shape[2] - margin - 1, 2 * margin + 3):
                near = (slice(i - margin, i + margin + 1), slice(j - margin, j + margin + 1),
                        slice(k - margin, k + margin + 1))
                if placed < count and not mask[near].any() and not blobs[near].any():
                    blobs[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2] = True
                    placed += 1
    assert placed == count
    return blobs


def drop_small(mask: np.ndarray) -> np.ndarray:
    labels, n = components(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= SMALL_VOXELS
    keep[0] = False
    return keep[labels]


class PackedMasks(dict):
    """Boolean volumes kept as bits (36 predicted volumes of 8.7 M voxels would take 300 MB as bytes)."""

    def __setitem__(self, key, mask):
        super().__setitem__(key, (np.packbits(mask, axis=None), mask.shape))

    def __getitem__(self, key):
        bits, shape = super().__getitem__(key)
        return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)

    def items(self):
        return ((key, self[key]) for key in self.keys())


FAULTS = {
    "truth": lambda m: m,
    "eroded": lambda m: ndimage.binary_erosion(m),       # 6-neighbourhood, one voxel
    "dilated": lambda m: ndimage.binary_dilation(m),
    "dropped": drop_small,
    "fp_blobs": lambda m: m | far_blobs(m, FP_BLOBS),
    "shifted": lambda m: np.roll(ndimage.binary_erosion(m), 2, axis=0),  # not known in advance: cross-check only
}


@pytest.fixture(scope="module")
def sample(real_data, tmp_path_factory):
    """The mni_lesions labels as a test set (labelsTs/ + strata.csv), and one prediction folder per fault, each
    as nnUNetv2_predict leaves it (with its json files)."""
    source = real_data / "mni_lesions"
    root = tmp_path_factory.mktemp("score")
    testset = root / "testset"
    (testset / "labelsTs").mkdir(parents=True)
    truth = {}
    for path in sorted((source / "labelsTr").glob("*.nii.gz")):
        case_id = path.name[: -len(".nii.gz")]
        shutil.copy(path, testset / "labelsTs" / path.name)
        img = nib.load(path)
        truth[case_id] = (np.asarray(img.dataobj) > 0, img)
    shutil.copy(source / "dataset.json", testset / "dataset.json")
    with open(testset / "strata.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "factor", "level", "value"])
        for case_id, row in STRATA.items():
            writer.writerow([case_id, *row])
    preds, masks = {}, PackedMasks()
    for name, fault in FAULTS.items():
        folder = root / f"pred_{name}"
        folder.mkdir()
        for case_id, (mask, img) in truth.items():
            pred = fault(mask)
            masks[name, case_id] = pred
            nib.save(nib.Nifti1Image(pred.astype(np.uint8), img.affine, img.header), folder / f"{case_id}.nii.gz")
        for extra in ("dataset.json", "plans.json", "predict_from_raw_data_args.json"):
            (folder / extra).write_text("{}")
        preds[name] = folder
    return {"root": root, "testset": testset, "truth": truth, "preds": preds, "masks": masks}


@pytest.fixture(scope="module")
def scored(sample):
    """cases.csv rows of every fault scored with the defaults (any overlap, 26-connectivity), by case id."""
    out = {}
    for name, folder in sample["preds"].items():
        result = score_predictions(folder, sample["testset"], sample["root"] / f"score_{name}",
                                   ScoreConfig(n_resamples=200))
        assert not result.warnings
        out[name] = {r["case_id"]: r for r in read_csv(result.out / "cases.csv")}
    return out


def number(row: dict, key: str) -> float:
    return float(row[key])


# --------------------------------------------------------------------------------------------------
# Known faults
# --------------------------------------------------------------------------------------------------

def test_truth_itself_scores_perfectly(sample, scored):
    for case_id, (mask, _) in sample["truth"].items():
        row = scored["truth"][case_id]
        n = components(mask)[1]
        assert number(row, "dice") == 1 and number(row, "lesion_dice") == 1
        assert (int(row["lesion_tp"]), int(row["lesion_fp"]), int(row["lesion_fn"])) == (n, 0, 0)
        assert number(row, "lesion_precision") == number(row, "lesion_recall") == number(row, "lesion_f1") == 1
        assert number(row, "volume_diff_mm3") == 0 and number(row, "rel_volume_diff") == 0
        assert number(row, "truth_load_mm3") == number(row, "pred_load_mm3") == mask.sum()  # 1 mm³ voxels
        assert int(row["truth_lesions"]) == int(row["pred_lesions"]) == n
        assert row["stratum"] == f"{STRATA[case_id][0]}={STRATA[case_id][1]}"
        assert (row["factor"], row["level"], row["value"]) == STRATA[case_id]


def test_eroded_prediction(sample, scored):
    for case_id, (mask, _) in sample["truth"].items():
        eroded = sample["masks"]["eroded", case_id]
        labels, n = components(mask)
        survivors = len(set(np.unique(labels[eroded]).tolist()) - {0})
        pieces = components(eroded)[1]
        row = scored["eroded"][case_id]
        assert number(row, "dice") < 1
        assert int(row["lesion_tp"]) == survivors  # every lesion that keeps a voxel is still found
        assert int(row["lesion_fn"]) == n - survivors
        assert int(row["lesion_fp"]) == pieces - survivors  # a lesion split by the erosion leaves extra pieces
        assert number(row, "volume_diff_mm3") == eroded.sum() - mask.sum() < 0
        assert number(row, "voxel_precision") == 1 and number(row, "voxel_recall") < 1
        assert number(row, "rel_volume_diff") == pytest.approx((eroded.sum() - mask.sum()) / mask.sum(), rel=1e-5)


def test_dilated_prediction(sample, scored):
    for case_id, (mask, _) in sample["truth"].items():
        dilated = sample["masks"]["dilated", case_id]
        n, merged = components(mask)[1], components(dilated)[1]
        row = scored["dilated"][case_id]
        assert number(row, "volume_diff_mm3") == dilated.sum() - mask.sum() > 0
        assert number(row, "voxel_precision") < 1 and number(row, "voxel_recall") == 1
        # each dilated component holds at least one truth lesion and is matched to one of them
        assert (int(row["lesion_tp"]), int(row["lesion_fp"]), int(row["lesion_fn"])) == (merged, 0, n - merged)


def test_small_lesions_dropped(sample, scored):
    for case_id, (mask, _) in sample["truth"].items():
        labels, n = components(mask)
        dropped = int(np.count_nonzero(np.bincount(labels.ravel())[1:] < SMALL_VOXELS))
        row = scored["dropped"][case_id]
        assert int(row["lesion_fn"]) == dropped and int(row["lesion_fp"]) == 0
        assert int(row["lesion_tp"]) == n - dropped
        assert number(row, "lesion_recall") == pytest.approx((n - dropped) / n)
        assert number(row, "lesion_precision") == 1
    assert sum(int(r["lesion_fn"]) for r in scored["dropped"].values()) > 20  # the MS cases have many small ones


def test_false_positive_blobs(sample, scored):
    for case_id, (mask, _) in sample["truth"].items():
        n = components(mask)[1]
        row = scored["fp_blobs"][case_id]
        assert (int(row["lesion_tp"]), int(row["lesion_fp"]), int(row["lesion_fn"])) == (n, FP_BLOBS, 0)
        assert number(row, "lesion_precision") == pytest.approx(n / (n + FP_BLOBS))
        assert number(row, "lesion_recall") == 1
        assert number(row, "volume_diff_mm3") == 27 * FP_BLOBS


def test_strata_follow_the_test_set(sample, scored):
    out = sample["root"] / "score_truth"
    strata = read_csv(out / "strata.csv")
    assert [(r["factor"], r["level"]) for r in strata] == [
        ("all", "all"), ("contrast", "0.5"), ("contrast", "1.0"), ("contrast", "1.5"),
        ("load", "low"), ("load", "medium"), ("load", "high")]  # numeric levels by number, the others by value
    assert [int(r["n"]) for r in strata] == [6, 1, 1, 1, 1, 1, 1]
    assert all(float(r["dice_mean"]) == float(r["dice_ci_low"]) == float(r["dice_ci_high"]) == 1 for r in strata)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["truth_kind"] == "testset" and summary["n_cases"] == 6
    assert summary["settings"]["iou_threshold"] == 0 and summary["settings"]["connectivity"] == 26
    assert summary["settings"]["bootstrap"] == {"resamples": 200, "seed": 0, "interval": "95 % percentile",
                                                "unit": "case"}
    assert summary["overall"]["dice"]["mean"] == 1


def test_html_page_is_self_contained(sample, scored):
    page = (sample["root"] / "score_dropped" / "score.html").read_text()
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == 2 * 5 + 1  # two factors, five metrics each; recall against lesion size
    for svg in svgs:
        ET.fromstring(svg)  # well-formed
    assert "polygon" in page  # interval bands
    assert not re.search(r'(src|href)="(https?:)?//', page)
    for case_id in STRATA:
        assert case_id in page


# --------------------------------------------------------------------------------------------------
# Cross-check against panoptica
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_lesion_metrics_agree_with_panoptica(sample, threshold):
    pytest.importorskip("panoptica")
    from panoptica import ConnectedComponentsInstanceApproximator, InputType, Panoptica_Evaluator
    from panoptica.instance_matcher import NaiveThresholdMatching
    from panoptica.metrics import Metric

    evaluator = Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC, instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=NaiveThresholdMatching(matching_metric=Metric.IOU, matching_threshold=threshold),
        verbose=False, log_times=False)
    compared = 0
    for (name, case_id), pred in sample["masks"].items():
        truth = sample["truth"][case_id][0]
        ours = case_metrics(truth, pred, 1.0, connectivity=26, iou_threshold=threshold)
        ref = evaluator.evaluate(pred.astype(np.uint8), truth.astype(np.uint8), verbose=False)["ungrouped"]
        assert (ours["lesion_tp"], ours["lesion_fp"], ours["lesion_fn"]) == (ref.tp, ref.fp, ref.fn), (name, case_id)
        assert ours["truth_lesions"] == ref.n_ref_instances and ours["pred_lesions"] == ref.n_pred_instances
        assert ours["lesion_f1"] == pytest.approx(ref.rq), (name, case_id)
        assert ours["dice"] == pytest.approx(ref.global_bin_dsc)
        if ref.tp:
            assert ours["lesion_precision"] == pytest.approx(ref.prec)
            assert ours["lesion_recall"] == pytest.approx(ref.rec)
            assert ours["lesion_dice"] == pytest.approx(ref.sq_dsc), (name, case_id)
        compared += 1
    assert compared == len(FAULTS) * 6


def test_matching_is_one_to_one_by_iou():
    truth = np.zeros((12, 12, 12), bool)
    truth[1:4, 1:4, 1:4] = truth[1:4, 5:8, 1:4] = True         # two lesions ...
    pred = np.zeros_like(truth)
    pred[1:4, 1:8, 1:4] = True                                 # ... covered by one predicted component
    labels_t, n_t = components(truth)
    labels_p, n_p = components(pred)
    assert len(match_lesions(labels_t, n_t, labels_p, n_p)) == 1
    m = case_metrics(truth, pred, 2.0)
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (1, 0, 1)
    assert m["lesion_dice"] == pytest.approx(2 * 27 / (27 + 63))
    assert m["truth_load_mm3"] == 54 * 2.0 and m["pred_load_mm3"] == 63 * 2.0
    assert case_metrics(truth, pred, 1.0, iou_threshold=0.5)["lesion_tp"] == 0  # IoU 27/63 < 0.5
    # 6-connectivity splits a diagonal pair that 26-connectivity joins
    diagonal = np.zeros((4, 4, 4), bool)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = True
    assert case_metrics(diagonal, diagonal, 1.0, connectivity=6)["truth_lesions"] == 2
    assert case_metrics(diagonal, diagonal, 1.0)["truth_lesions"] == 1


def test_empty_cases_follow_the_stated_convention():
    empty = np.zeros((5, 5, 5), bool)
    lesion = empty.copy()
    lesion[2, 2, 2] = True
    both_empty = case_metrics(empty, empty, 1.0)
    assert both_empty["dice"] == both_empty["lesion_f1"] == both_empty["lesion_recall"] == 1
    assert both_empty["lesion_precision"] == both_empty["lesion_dice"] == 1
    assert np.isnan(both_empty["rel_volume_diff"]) and both_empty["volume_diff_mm3"] == 0
    missed = case_metrics(lesion, empty, 1.0)
    assert missed["dice"] == missed["lesion_recall"] == missed["lesion_precision"] == missed["lesion_f1"] == 0
    assert missed["rel_volume_diff"] == -1
    invented = case_metrics(empty, lesion, 1.0)
    assert invented["dice"] == invented["lesion_precision"] == invented["lesion_recall"] == 0
    assert invented["lesion_fp"] == 1 and np.isnan(invented["rel_volume_diff"])


# --------------------------------------------------------------------------------------------------
# Bootstrap and bins
# --------------------------------------------------------------------------------------------------

def test_bootstrap_is_reproducible():
    values = np.random.default_rng(3).random((40, 3))
    values[5, 1] = np.nan
    a = bootstrap_means(values, 500, seed=7, key="load=high")
    b = bootstrap_means(values, 500, seed=7, key="load=high")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.allclose(a[0], np.nanmean(values, axis=0))
    assert np.all(a[1][0] < a[0]) and np.all(a[0] < a[1][1])
    c = bootstrap_means(values, 500, seed=8, key="load=high")
    assert not np.array_equal(a[1], c[1])
    one = bootstrap_means(values[:1], 100, seed=0)
    assert np.array_equal(one[1][0], values[0]) and np.array_equal(one[1][1], values[0])


def test_bootstrap_seed_reaches_the_output(sample, tmp_path):
    pred, truth = sample["preds"]["dropped"], sample["testset"]
    first = score_predictions(pred, truth, tmp_path / "a", ScoreConfig(n_resamples=300, seed=5))
    again = score_predictions(pred, truth, tmp_path / "b", ScoreConfig(n_resamples=300, seed=5), jobs=2)
    other = score_predictions(pred, truth, tmp_path / "c", ScoreConfig(n_resamples=300, seed=6))
    text = [(r.out / "strata.csv").read_text() for r in (first, again, other)]
    assert text[0] == text[1] and text[0] != text[2]
    assert (first.out / "cases.csv").read_text() == (again.out / "cases.csv").read_text()  # --jobs 2 the same


def test_volume_bins():
    assert volume_bin(1000) == ("1000-3000", 1000)
    assert volume_bin(2999.9)[0] == "1000-3000"
    assert volume_bin(3000)[0] == "3000-10000"
    assert volume_bin(9999)[0] == "3000-10000"
    assert volume_bin(0.5)[0] == "0.3-1"
    assert volume_bin(1e-3 * 1000 * 1000)[0] == "1000-3000"


def test_level_order():
    assert level_order(["high", "low", "medium"], {"high": ["9"], "low": ["1"], "medium": ["5", "4"]}) == \
        ["low", "medium", "high"]
    assert level_order(["2.0", "-1", "0", "0.5"], {}) == ["-1", "0", "0.5", "2.0"]
    assert level_order(["30-100", "none", "3-10"], {}) == ["none", "3-10", "30-100"]
    assert level_order(["b", "a"], {"b": ["x"], "a": ["y"]}) == ["b", "a"]  # as listed


def test_case_without_lesions_in_a_plain_folder(tmp_path):
    truth = blob_dataset(tmp_path / "ds", n_cases=2)
    folder = tmp_path / "labels"
    shutil.copytree(truth / "labelsTr", folder)
    img = nib.load(folder / "case0.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header), folder / "case0.nii.gz")
    result = score_predictions(folder, folder, tmp_path / "out", ScoreConfig(n_resamples=20))
    assert open_truth(folder).kind == "folder"
    rows = {r["case_id"]: r for r in read_csv(tmp_path / "out" / "cases.csv")}
    assert rows["case0"]["stratum"] == "truth_load=0; median_lesion_size=none"
    assert rows["case0"]["dice"] == rows["case0"]["lesion_f1"] == "1" and rows["case0"]["rel_volume_diff"] == ""
    assert result.summary["overall"]["rel_volume_diff"]["n"] == 1  # the empty case is left out of that mean
    assert [s["level"] for s in result.summary["strata"] if s["factor"] == "median_lesion_size"][0] == "none"


def test_nnunet_dataset_truth_is_binned(sample, real_data, tmp_path):
    res = cli("score", sample["preds"]["eroded"], real_data / "mni_lesions", "--out", tmp_path / "s",
              "--bootstrap", "100")
    assert res.returncode == 0, res.stderr
    assert "score: " in res.stdout and "Dice" in res.stdout
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["truth_kind"] == "nnunet" and summary["settings"]["label_set"] == [0, 1]
    factors = {s["factor"] for s in summary["strata"]}
    assert factors == {"truth_load", "median_lesion_size"}
    cases = {r["case_id"]: r for r in read_csv(tmp_path / "s" / "cases.csv")}
    # ATLAS_002: one lesion of 7279 mm³
    assert cases["ATLAS_002"]["stratum"] == "truth_load=3000-10000; median_lesion_size=3000-10000"
    for s in summary["strata"]:
        for case_id in s["cases"]:
            value = float(cases[case_id]["truth_load_mm3" if s["factor"] == "truth_load" else
                                         "truth_median_lesion_mm3"])
            low, high = map(float, s["level"].split("-"))
            assert low <= value < high


def test_lesion_label_selects_values(tmp_path):
    truth = blob_dataset(tmp_path / "ds", n_cases=2, multiclass=True)  # 1 = organ, 2 = lesion
    pred = tmp_path / "pred"
    pred.mkdir()
    for path in sorted((truth / "labelsTr").glob("*.nii.gz")):
        img = nib.load(path)
        label = np.asarray(img.dataobj).copy()
        label[label == 1] = 0  # the organ not predicted: wrong for label 1, right for the lesions
        nib.save(nib.Nifti1Image(label, img.affine, img.header), pred / path.name)
    lesions_only = score_predictions(pred, truth, tmp_path / "a", ScoreConfig(lesion_labels=(2,), n_resamples=50))
    assert all(r["dice"] == 1 for r in lesions_only.rows)
    every_label = score_predictions(pred, truth, tmp_path / "b", ScoreConfig(n_resamples=50))
    assert all(r["dice"] < 1 for r in every_label.rows)
    with pytest.raises(InputError, match=r"--lesion-label 3: not a label of .*dataset.json"):
        score_predictions(pred, truth, tmp_path / "c", ScoreConfig(lesion_labels=(3,)))


# --------------------------------------------------------------------------------------------------
# Errors: one line naming the file, exit status 2, nothing written
# --------------------------------------------------------------------------------------------------

def copy_prediction(sample, tmp_path, name="truth") -> Path:
    folder = tmp_path / "pred"
    shutil.copytree(sample["preds"][name], folder)
    return folder


def assert_one_line_error(res, *fragments, out: Path):
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging folder left


def test_error_grid_shape(sample, tmp_path):
    pred = copy_prediction(sample, tmp_path)
    img = nib.load(pred / "MS_01039.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine, img.header), pred / "MS_01039.nii.gz")
    out = tmp_path / "out"
    res = cli("score", pred, sample["testset"], "--out", out, "--jobs", "2")  # an error from a worker process
    assert_one_line_error(res, str(pred / "MS_01039.nii.gz"), "grid differs", "shape (196, 233, 189)", out=out)


def test_error_grid_affine(sample, tmp_path):
    pred = copy_prediction(sample, tmp_path)
    img = nib.load(pred / "ATLAS_002.nii.gz")
    affine = img.affine.copy()
    affine[0, 3] += 1.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header), pred / "ATLAS_002.nii.gz")
    out = tmp_path / "out"
    res = cli("score", pred, sample["testset"], "--out", out)
    assert_one_line_error(res, str(pred / "ATLAS_002.nii.gz"), "grid differs", "affines differ by up to 1 mm", out=out)


def test_small_affine_difference_is_tolerated(sample, tmp_path):
    pred = copy_prediction(sample, tmp_path)
    img = nib.load(pred / "ATLAS_002.nii.gz")
    affine = img.affine.copy()
    affine[:3, 3] += 2e-4  # float32 rounding of a header written by another tool
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header), pred / "ATLAS_002.nii.gz")
    result = score_predictions(pred, sample["testset"], tmp_path / "out", ScoreConfig(n_resamples=10))
    assert result.rows[1]["case_id"] == "ATLAS_002" and result.rows[1]["dice"] == 1


def test_error_missing_prediction(sample, tmp_path):
    pred = copy_prediction(sample, tmp_path)
    (pred / "MS_01038.nii.gz").unlink()
    out = tmp_path / "out"
    res = cli("score", pred, sample["testset"], "--out", out)
    assert_one_line_error(res, str(pred / "MS_01038.nii.gz"), "prediction missing for truth case MS_01038", out=out)


def test_error_unknown_label_value(sample, tmp_path):
    pred = copy_prediction(sample, tmp_path)
    img = nib.load(pred / "ATLAS_003.nii.gz")
    label = np.asarray(img.dataobj).copy()
    label[label == 1] = 3
    nib.save(nib.Nifti1Image(label, img.affine, img.header), pred / "ATLAS_003.nii.gz")
    out = tmp_path / "out"
    res = cli("score", pred, sample["testset"], "--out", out)
    assert_one_line_error(res, str(pred / "ATLAS_003.nii.gz"), "label value(s) [3] not in the truth's label set [0, 1]",
                          "(dataset.json)", out=out)
    # a plain folder of labels: the values seen in the truth are the label set
    res = cli("score", pred, sample["testset"] / "labelsTs", "--out", out)
    assert_one_line_error(res, str(pred / "ATLAS_003.nii.gz"), "label value(s) [3]", "values seen in", out=out)


def test_error_no_overwrite_and_overwrite(sample, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = cli("score", sample["preds"]["truth"], sample["testset"], "--out", out)
    assert res.returncode == 2 and "folder exists and is not empty" in res.stderr
    res = cli("score", sample["preds"]["truth"], sample["testset"], "--out", out, "--overwrite")
    assert res.returncode == 2 and "not the output of a previous 'lesionsynth score'" in res.stderr
    assert (out / "notes.txt").read_text() == "keep me"
    shutil.rmtree(out)
    assert cli("score", sample["preds"]["truth"], sample["testset"], "--out", out, "--bootstrap", "50").returncode == 0
    first = json.loads((out / "summary.json").read_text())
    res = cli("score", sample["preds"]["eroded"], sample["testset"], "--out", out, "--overwrite", "--bootstrap", "50")
    assert res.returncode == 0, res.stderr
    second = json.loads((out / "summary.json").read_text())
    assert first["overall"]["dice"]["mean"] == 1 > second["overall"]["dice"]["mean"]
    assert sorted(p.name for p in out.iterdir()) == ["cases.csv", "score.html", "strata.csv", "summary.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_extra_predictions_are_ignored_with_a_warning(sample, tmp_path):
    pred = copy_prediction(sample, tmp_path)
    shutil.copy(pred / "ATLAS_001.nii.gz", pred / "OTHER_001.nii.gz")
    (pred / "ATLAS_001.npz").write_bytes(b"probabilities")  # --save_probabilities output: not a label
    res = cli("score", pred, sample["testset"], "--out", tmp_path / "out", "--bootstrap", "50")
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "1 prediction file(s) without a truth case ignored (OTHER_001)" in warnings[0]
    assert len(read_csv(tmp_path / "out" / "cases.csv")) == 6


def test_bad_strata_file_is_one_line(sample, tmp_path):
    testset = tmp_path / "testset"
    shutil.copytree(sample["testset"], testset)
    (testset / "strata.csv").write_text("case_id,factor,level,value\nATLAS_001,load,low,1\n")
    with pytest.raises(InputError, match=r"strata.csv: case ATLAS_002 of labelsTs/ has no row \(and 4 more cases\)"):
        open_truth(testset)
    (testset / "strata.csv").write_text("case,factor,level\n")
    with pytest.raises(InputError, match=r"column\(s\) case_id, value missing"):
        open_truth(testset)


def test_bad_options_are_one_line(sample, tmp_path):
    for option, value, message in (("--connectivity", "8", "'8' is not one of '6', '18', '26'"),
                                   ("--iou-threshold", "1.5", "must be between 0 and 1"),
                                   ("--bootstrap", "0", "at least 1")):
        out = tmp_path / "out"
        res = cli("score", sample["preds"]["truth"], sample["testset"], "--out", out, option, value)
        assert_one_line_error(res, option, message, out=out)


def test_page_shows_level_values_small_strata_size_recall_and_worst_cases(sample, scored):
    out = sample["root"] / "score_dropped"
    page = (out / "score.html").read_text()
    # every stratum here holds 1 case: named in a warning, drawn hollow
    assert "fewer than 5 cases in contrast=0.5 (1 case)" in page and 'fill="white"' in page
    # recall against truth lesion size: the dropped lesions (< 50 voxels) are the small ones
    recall = json.loads((out / "summary.json").read_text())["recall_by_lesion_size"]
    assert recall[0]["recall"] < 1 and recall[-1]["recall"] == 1
    assert sum(r["n"] for r in recall) == sum(int(r["truth_lesions"]) for r in scored["dropped"].values())
    assert 'id="size-recall"' in page and 'aria-label="Lesion recall by truth lesion volume (mm³)"' in page
    # overlays of the three worst cases, embedded
    worst = page[page.index('id="worst"'):page.index('id="strata-table"')]
    assert worst.count("data:image/png;base64,iVBORw0KGgo") == 3


def test_test_set_levels_are_shown_by_their_values():
    from lesionsynth.score_html import curve_svg, level_label, small_strata_warning

    assert level_label("2", 36254.0) == "36.3k" and level_label("0", 0.5) == "0.5"
    assert level_label("1000-3000", 1500.0) == "1k–3k" and level_label("medium", 20806.0) == "medium"
    stats = [{"mean": 0.5, "ci95": [0.4, 0.6], "n": 2}, {"mean": 0.7, "ci95": [0.6, 0.8], "n": 9}]
    svg = curve_svg("Dice", "ratio", "load", ["0", "1"], stats, {"mean": 0.6}, "#000",
                    [level_label("0", 1200.0), level_label("1", 25000.0)])
    ticks = re.findall(r'text-anchor="middle" fill="#333">([^<]+)<', svg)
    assert ticks == ["1.2k", "25k"]
    warning = small_strata_warning([{"factor": "load", "level": "0", "n": 2}, {"factor": "load", "level": "1", "n": 9}])
    assert len(warning) == 1 and "load=0 (2 cases)" in warning[0] and "load=1" not in warning[0]
    assert "(2 lesions)" in small_strata_warning([{"factor": "size", "level": "1-3", "n": 2}], unit="lesion")[0]


def test_relative_axis_ticks_stay_distinct_within_one_percent():
    """A volume difference within ±1 % read "+0%, -0%, -0%, -1%" on the axis: the labels take the decimals their
    step needs."""
    from lesionsynth.score_html import curve_svg

    stats = [{"mean": m, "ci95": [m - 0.001, m + 0.001], "n": 6} for m in (-0.001, -0.009, -0.006)]
    svg = curve_svg("Volume difference (rel.)", "relative", "load", ["low", "medium", "high"], stats,
                    {"mean": -0.005}, "#000")
    labels = re.findall(r'text-anchor="end" fill="#555">([^<]+%)<', svg)
    assert len(labels) >= 3 and len(set(labels)) == len(labels) and "-0.5%" in labels
