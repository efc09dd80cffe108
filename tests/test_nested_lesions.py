"""Multi-class (nested) lesions as one object: BraTS-like tumours (1 core inside 3 enhancing inside 2 oedema) made
from the real sample data (`nested_data.py`) keep their inner labels through the bank, pasting and removal;
loads per label; the command line's label lists."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lesionsynth.bank import Bank, BankConfig, build_bank
from lesionsynth.cli import expand_label_options
from lesionsynth.errors import InputError
from lesionsynth.output_run import read_output
from lesionsynth.io import load_case
from lesionsynth.pipeline import GenerateConfig, generate, synthesize_arrays
from lesionsynth.plan import AugmentConfig, lesion_components
from lesionsynth.prior import allowed_region, is_ct
from lesionsynth.recipes import load_recipe, make_config
from lesionsynth.render import RenderContext, render_op
from lesionsynth.render import paste as paste_module
from lesionsynth.render.paste import PasteSettings
from lesionsynth.report import label_rows

from .nested_data import NESTING, brats_like_dataset, nested_as

RECIPE = "brain_tumour_multiclass"


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lesionsynth.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def nested(real_data, tmp_path_factory) -> dict:
    """The BraTS-like dataset, its bank (recipe brain_tumour_multiclass) and a populate run into its cases."""
    root = tmp_path_factory.mktemp("nested")
    ds = brats_like_dataset(root / "ds", real_data)
    config = make_config(BankConfig, load_recipe(RECIPE), "bank", {})
    bank = build_bank(ds, root / "bank", config, progress=False)
    augment = make_config(AugmentConfig, load_recipe(RECIPE), "augment", {})
    cfg = GenerateConfig(n=8, load="high", mode="populate", seed=0, include_originals=False, augment=augment)
    generate(bank, root / "out", cfg, progress=False)
    return {"root": root, "ds": ds, "bank": bank, "out": root / "out", "cfg": cfg}


def render_context(bank: Bank, case) -> RenderContext:
    region = allowed_region(case.channels, case.label, case.affine, bank.channel_names, bank.region_labels)
    return RenderContext(bank.lesion_labels, 26, PasteSettings(tuple(is_ct(n) for n in bank.channel_names)),
                         region.mask_in)


def paste_op(bank: Bank, lesion_id: str, centre_mm, scale: float, rotation=(20.0, -15.0, 30.0)) -> dict:
    les = bank.by_id[lesion_id]
    return {"op": "paste", "lesion_id": lesion_id, "source_case": les["source_case"],
            "label_value": les["label_value"], "centre_mm": list(centre_mm), "flip": [False, True, False],
            "rotation_deg": list(rotation), "scale": scale, "elastic_mm": np.zeros((4, 4, 4, 3)).tolist(),
            "brightness": [1.0] * len(bank.channel_names), "noise_gain": 1.0, "noise_seed": 1}


def brain_centre_mm(case) -> np.ndarray:
    head = case.channels[-1] > np.percentile(case.channels[-1], 60)
    centre = np.array(ndimage.center_of_mass(head))
    return case.affine[:3, :3] @ centre + case.affine[:3, 3]


def pasted_crop(patch) -> np.ndarray:
    """The pasted lesion's labels over its box (0 elsewhere), padded by one voxel of background."""
    return np.pad(np.where(patch.core, patch.label, 0), 1)


def case_of(bank: Bank, case_id: str):
    return load_case(next(r for r in bank.case_refs() if r.case_id == case_id), len(bank.channel_names))


# ----------------------------------------------------------------------------------------------- command line

@pytest.mark.parametrize("args, expected", [
    (["--lesion-label", "1", "2", "3", "DS"], ["--lesion-label", "1", "--lesion-label", "2", "--lesion-label", "3", "DS"]),
    (["--lesion-label", "1,2,3"], ["--lesion-label", "1", "--lesion-label", "2", "--lesion-label", "3"]),
    (["--lesion-label=1,2", "--region-label", "4"], ["--lesion-label", "1", "--lesion-label", "2", "--region-label", "4"]),
    (["--lesion-label", "1", "--lesion-label", "2"], ["--lesion-label", "1", "--lesion-label", "2"]),
    (["--lesion-label", "x"], ["--lesion-label", "x"]),  # click reports the bad value
    (["--jobs", "2", "3"], ["--jobs", "2", "3"]),  # other options are left alone
    (["--", "--lesion-label", "1", "2"], ["--", "--lesion-label", "1", "2"]),
])
def test_label_list_options_are_expanded(args, expected):
    assert expand_label_options(args) == expected


def test_every_form_of_lesion_label_builds_the_same_bank(nested, tmp_path):
    ds = nested["ds"]
    forms = [["--lesion-label", "1", "2", "3"], ["--lesion-label", "1,2,3"],
             ["--lesion-label", "1", "--lesion-label", "2", "--lesion-label", "3"]]
    for k, form in enumerate(forms):
        result = cli("build-bank", ds, "--out", tmp_path / f"bank{k}", *form, "--min-volume", "200")
        assert result.returncode == 0, result.stderr
        index = json.loads((tmp_path / f"bank{k}" / "bank.json").read_text())
        assert index["config"]["lesion_labels"] == [1, 2, 3]
        assert {tuple(les["labels"]) for les in index["lesions"]} == {(1, 2, 3)}
    checked = cli("check", ds, "--lesion-label", "1", "2", "3")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for value in (1, 2, 3):
        assert f"lesion label {value}: " in checked.stdout
    assert "voxels" in checked.stdout and "mm³" in checked.stdout


# ----------------------------------------------------------------------------------------------- the bank

def test_bank_keeps_the_inner_labels_and_their_nesting(nested):
    bank = Bank(nested["bank"])
    assert len(bank.lesions) >= 4
    for les in bank.lesions:
        assert les["labels"] == [1, 2, 3]
        assert tuple(les["label_order"]) == NESTING
        values = bank.lesion_label_values(les["id"])
        _, mask = bank.lesion_arrays(les["id"])
        assert np.array_equal(values > 0, mask > 0)
        # the crop's values are the source case's labels at the same place
        source = nib.load(str(nested["ds"] / "labelsTr" / f"{les['source_case']}.nii.gz"))
        start = np.rint(np.linalg.inv(source.affine) @ np.array(les["affine"])[:, 3]).astype(int)[:3]
        box = tuple(slice(a, a + n) for a, n in zip(start, les["shape"]))
        assert np.array_equal(values[mask > 0], np.asarray(source.dataobj)[box][mask > 0])
        for v in (1, 2, 3):
            assert les["voxels_by_label"][str(v)] == int(np.count_nonzero(values == v))
        assert les["volume_by_label"]["2"] > les["volume_by_label"]["3"] > 0
        assert les["stats_by_label"][3]["3"]["median"] > les["stats_by_label"][3]["1"]["median"]  # FLAIR
    for case in bank.cases:
        assert set(case["load_by_label"]) == {"1", "2", "3"}
        assert case["load_mm3"] == pytest.approx(sum(case["load_by_label"].values()))


def test_single_label_bank_stores_no_label_values(blob_bank):
    bank = Bank(blob_bank)
    assert all("labels_offset" not in les and les["labels"] == [1] for les in bank.lesions)
    assert bank.lesion_label_values(bank.lesions[0]["id"]) is None
    assert (blob_bank / "lesion_label_values.u8").stat().st_size == 0


# ----------------------------------------------------------------------------------------------- pasting

@pytest.mark.parametrize("scale", [0.8, 1.25])
def test_a_paste_keeps_each_label_at_its_donor_volume_and_nesting(nested, scale):
    bank = Bank(nested["bank"])
    healthy = case_of(bank, "healthy00")
    ctx = render_context(bank, healthy)
    checked = 0
    for les in bank.lesions:
        if les["voxels_by_label"]["1"] < 100:  # a core of a few voxels: its volume is not measurable to 20 %
            continue
        op = paste_op(bank, les["id"], brain_centre_mm(healthy), scale)
        patch = render_op(healthy.channels, healthy.label, healthy.affine, op, bank, ctx)
        assert patch is not None
        crop = pasted_crop(patch)
        assert nested_as(crop, les["label_order"], 0.95), les["id"]
        for v, n in les["voxels_by_label"].items():
            ratio = np.count_nonzero(crop == int(v)) / (n * scale ** 3)
            assert 0.8 < ratio < 1.25, (les["id"], v, ratio)
        checked += 1
    assert checked >= 2


def test_torch_resampling_gives_the_same_nested_labels(nested):
    pytest.importorskip("torch")
    from lesionsynth.render.backend import lesion_resampler

    bank = Bank(nested["bank"])
    healthy = case_of(bank, "healthy01")
    ctx = render_context(bank, healthy)
    torch_ctx = render_context(bank, healthy)
    torch_ctx.resample = lesion_resampler("cpu", torch_on_cpu=True)
    for les in bank.lesions:
        op = paste_op(bank, les["id"], brain_centre_mm(healthy), 1.1)
        a = render_op(healthy.channels, healthy.label, healthy.affine, op, bank, ctx)
        b = render_op(healthy.channels, healthy.label, healthy.affine, op, bank, torch_ctx)
        assert a.box == b.box
        assert np.mean(a.label == b.label) > 0.998
        assert nested_as(pasted_crop(b), les["label_order"])


def test_generated_tumours_hold_all_labels_nested(nested):
    """Every paste of the run, rendered again op by op: ≥ 90 % hold their donor's labels in its nesting."""
    bank = Bank(nested["bank"])
    records = [json.loads(line) for line in (nested["out"] / "manifest.jsonl").read_text().splitlines()]
    seen, apply = [], paste_module.Patch.apply

    def recording(patch, channels, label, undo=None):
        if patch._blend is not None:
            seen.append(pasted_crop(patch))
        return apply(patch, channels, label, undo)

    paste_module.Patch.apply = recording
    try:
        nested_ok = []
        for rec in records:
            seen.clear()
            case = case_of(bank, rec["base_case"])
            synthesize_arrays(case.channels, case.label, case.affine, bank, nested["cfg"], None, rec["base_case"],
                              replay=rec)
            pastes = [op for op in rec["ops"] if op["op"] == "paste"]
            assert len(pastes) == len(seen)
            nested_ok += [nested_as(crop, bank.by_id[op["lesion_id"]]["label_order"]) for op, crop in zip(pastes, seen)]
    finally:
        paste_module.Patch.apply = apply
    assert len(nested_ok) >= 10
    assert np.mean(nested_ok) >= 0.9
    # the written labels: every new tumour in a healthy base holds all three labels
    for rec in records:
        if rec["base_case"].startswith("healthy") and rec["ops"]:
            label = np.asarray(nib.load(str(nested["out"] / "labelsTr" / f"{rec['case_id']}.nii.gz")).dataobj)
            comps, n = ndimage.label(label > 0, structure=np.ones((3, 3, 3)))
            for k in range(1, n + 1):
                assert set(np.unique(label[comps == k])) == {1, 2, 3}
            assert rec["achieved_by_label"]["3"]["voxels"] == int(np.count_nonzero(label == 3))


# ----------------------------------------------------------------------------------------------- removal, loads

def test_inpainting_removes_every_label_of_a_tumour(nested):
    bank = Bank(nested["bank"])
    case = case_of(bank, "tum00")
    ctx = render_context(bank, case)
    (comp,) = lesion_components(case.label, bank.lesion_labels, 26)
    op = {"op": "inpaint", "seed_voxel": comp.seed_voxel, "bbox": comp.bbox, "rim_mm": 2.0, "texture_gain": 0.9,
          "texture_seed": 3, "must_remove": True}
    patch = render_op(case.channels, case.label, case.affine, op, bank, ctx)
    before = case.label[patch.box].copy()
    assert set(np.unique(before)) == {0, 1, 2, 3}
    patch.apply(case.channels, case.label)
    assert not np.isin(case.label, [1, 2, 3]).any()


def test_load_label_counts_one_label(nested, tmp_path):
    bank = Bank(nested["bank"])
    cfg = GenerateConfig(n=3, load="uniform", mode="populate", seed=1, include_originals=False, load_label=3,
                         augment=nested["cfg"].augment)
    result = generate(nested["bank"], tmp_path / "out", cfg, progress=False)
    real = bank.real_loads((3,))
    assert np.allclose(real, [c["load_by_label"]["3"] for c in bank.cases])
    assert real.max() < bank.real_loads().max()
    for rec in result.records:
        label = np.asarray(nib.load(str(tmp_path / "out" / "labelsTr" / f"{rec['case_id']}.nii.gz")).dataobj)
        assert rec["achieved_load_voxels"] == int(np.count_nonzero(label == 3))
        assert real.min() <= rec["target_load_mm3"] <= real.max()
    assert sum(r["reached"] for r in result.records) >= 2
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config"]["load_label"] == 3
    shown = cli("inspect", tmp_path / "out").stdout
    assert "lesion label 3 only" in shown and "label 1" in shown
    with pytest.raises(InputError, match="--load-label 4"):
        generate(nested["bank"], tmp_path / "bad", GenerateConfig(n=1, load="uniform", load_label=4), progress=False)


def test_testset_load_label_grades_one_label(nested, tmp_path):
    """A test set graded by the load of one label (the enhancing part): its levels span that label's real loads,
    each case's measured value is that label's load as written, and run.json records the label; another label
    is refused in one line."""
    bank = Bank(nested["bank"])
    ids = [c["case_id"] for c in bank.cases if c["load_by_label"]["3"] > 0][:2]
    done = cli("testset", nested["bank"], "--out", tmp_path / "eval", "--vary", "load", "--levels", "2",
               "--per-level", "1", "--test-cases", ",".join(ids), "--load-label", "3", "--seed", "2")
    assert done.returncode == 0, done.stderr
    real = bank.real_loads((3,))
    run = json.loads((tmp_path / "eval" / "run.json").read_text())
    assert run["config"]["load_label"] == 3
    levels = run["config"]["levels"]
    assert np.isclose(levels[0], real[real > 0].min(), rtol=1e-3) and np.isclose(levels[-1], real.max(), rtol=1e-3)
    records = [json.loads(line) for line in (tmp_path / "eval" / "manifest.jsonl").read_text().splitlines()]
    for rec in records:
        img = nib.load(str(tmp_path / "eval" / "labelsTs" / f"{rec['case_id']}.nii.gz"))
        enhancing = np.count_nonzero(np.asarray(img.dataobj) == 3) * float(np.prod(img.header.get_zooms()[:3]))
        assert np.isclose(rec["measured_value"], enhancing, rtol=1e-4)
    refused = cli("testset", nested["bank"], "--out", tmp_path / "bad", "--vary", "load", "--levels", "2",
                  "--per-level", "1", "--test-cases", ",".join(ids), "--load-label", "7")
    assert refused.returncode != 0 and "--load-label 7" in refused.stderr and not (tmp_path / "bad").exists()


def test_inspect_shows_per_label_figures(nested):
    dataset = cli("inspect", nested["ds"]).stdout
    assert "label(s) [1, 2, 3] (from label names)" in dataset
    assert all(f"  label {v} " in dataset for v in (1, 2, 3))
    bank = cli("inspect", nested["bank"]).stdout
    assert "2 ⊃ 3 ⊃ 1" in bank and "3 labels:" in bank
    out = cli("inspect", nested["out"]).stdout
    assert all(f"  label {v} " in out for v in (1, 2, 3))
    rows = label_rows(read_output(nested["out"]))  # the report's per-label table
    assert [row[0] for row in rows] == [1, 2, 3]
    assert all(row[2] != "–" and int(row[3].replace(",", "")) > 0 for row in rows)


def test_run_json_of_a_single_label_run_has_no_load_label(blob_bank, tmp_path):
    generate(blob_bank, tmp_path / "out", GenerateConfig(n=1, load="uniform", include_originals=False), progress=False)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert "load_label" not in run["config"]
    record = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    assert "achieved_by_label" not in record


def test_report_pictures_outline_the_inner_parts_of_a_pasted_tumour(nested, monkeypatch):
    """A site picture of a pasted multi-class lesion draws its inner parts (each nested in the one before) inside
    its outline; a lesion of one label has none."""
    from lesionsynth import report

    values = np.zeros((12, 12, 12), dtype=np.uint8)
    values[2:10, 2:10, 2:10] = 2   # oedema
    values[3:9, 3:9, 3:9] = 3      # enhancing rim
    values[5:7, 5:7, 5:7] = 1      # necrotic core
    values[0, 0, 0] = 2            # another lesion's voxel: not this one's
    lesion = values > 0
    lesion[0, 0, 0] = False
    parts = report.inner_parts(values, lesion, (1.0, 1.0, 1.0))
    assert [int(p.sum()) for p in parts] == [6 ** 3, 2 ** 3]
    assert not (parts[1] & ~parts[0]).any() and not parts[0][0, 0, 0]
    assert report.inner_parts(lesion.astype(np.uint8), lesion, (1.0, 1.0, 1.0)) == []

    original, drawn = report.inner_parts, []

    def recorded(*args):
        drawn.append(original(*args))
        return drawn[-1]

    monkeypatch.setattr(report, "inner_parts", recorded)
    run = read_output(nested["out"])
    record = next(r for r in run.records if any(op["op"] == "paste" for op in r["ops"]))
    index = next(i for i, op in enumerate(record["ops"]) if op["op"] == "paste")
    picture = report.site_figure(report.Site(record, index), run, 0, {}, "site.png")
    assert picture is not None and picture.data.startswith(b"\x89PNG")
    assert len(drawn) == 1 and drawn[0] and all(part.any() for part in drawn[0])
