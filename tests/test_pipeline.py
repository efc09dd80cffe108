"""generate end to end on small synthetic datasets: contract, reproducibility, splits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesionsynth.bank import Bank, BankConfig, build_bank
from lesionsynth.errors import InputError
from lesionsynth.io import load_case
from lesionsynth import pipeline
from lesionsynth.pipeline import GenerateConfig, generate
from lesionsynth.plan import case_rng
from lesionsynth.prior import allowed_region, is_ct
from lesionsynth.render import PasteSettings, RenderContext, render_plan

from .conftest import blob_dataset


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.json"}


def test_output_layout_and_manifest(blob_bank, tmp_path):
    out = tmp_path / "out"
    res = generate(blob_bank, out, GenerateConfig(n=6, load="uniform", seed=3), progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 6 + 4
    assert meta["channel_names"] == {"0": "T1", "1": "FLAIR"}
    labels = sorted((out / "labelsTr").glob("*.nii.gz"))
    assert len(labels) == 10
    assert len(list((out / "imagesTr").glob("*.nii.gz"))) == 20
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 6
    bank = Bank(blob_bank)
    for rec in map(json.loads, lines):
        for key in ("case_id", "base_case", "seed", "target_load_mm3", "initial_load_mm3", "achieved_load_mm3",
                    "reached", "ops"):
            assert key in rec
        lab = nib.load(out / "labelsTr" / f"{rec['case_id']}.nii.gz")
        assert lab.get_data_dtype() == np.uint8
        data = np.asarray(lab.dataobj)
        measured = (data == 1).sum() * abs(np.linalg.det(lab.affine[:3, :3]))
        assert rec["achieved_load_mm3"] == pytest.approx(measured, abs=1e-3)
        base = next(c for c in bank.cases if c["case_id"] == rec["base_case"])
        assert np.array_equal(lab.affine, np.array(base["affine"]))
        for c in range(2):
            img = nib.load(out / "imagesTr" / f"{rec['case_id']}_{c:04d}.nii.gz")
            assert np.array_equal(img.affine, lab.affine)
    assert sum(r["reached"] for r in res.records) >= 5


def test_same_bytes_for_any_jobs(blob_bank, tmp_path):
    cfg = GenerateConfig(n=6, load="high", seed=11)
    generate(blob_bank, tmp_path / "a", cfg, jobs=1, progress=False)
    generate(blob_bank, tmp_path / "b", cfg, jobs=2, progress=False)
    ha, hb = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert ha == hb and len(ha) > 10


def test_different_seed_gives_different_cases(blob_bank, tmp_path):
    generate(blob_bank, tmp_path / "a", GenerateConfig(n=2, load="high", seed=1, include_originals=False),
             progress=False)
    generate(blob_bank, tmp_path / "b", GenerateConfig(n=2, load="high", seed=2, include_originals=False),
             progress=False)
    assert _hashes(tmp_path / "a")["labelsTr/syn00000.nii.gz"] != _hashes(tmp_path / "b")["labelsTr/syn00000.nii.gz"]


def test_recorded_plan_renders_the_same_case(blob_bank, tmp_path):
    out = tmp_path / "out"
    res = generate(blob_bank, out, GenerateConfig(n=3, load="uniform", seed=5, include_originals=False),
                   progress=False)
    bank = Bank(blob_bank)
    for rec in res.records:
        ref = next(r for r in bank.case_refs() if r.case_id == rec["base_case"])
        case = load_case(ref, 2)
        region = allowed_region(case.channels, case.label, case.affine, bank.channel_names, bank.region_labels)
        ctx = RenderContext(bank.lesion_labels, 26, PasteSettings(tuple(is_ct(n) for n in bank.channel_names)),
                            region.mask_in)
        channels, label = render_plan(case.channels, case.label, case.affine, rec["ops"], bank, ctx)
        written = np.asarray(nib.load(out / "labelsTr" / f"{rec['case_id']}.nii.gz").dataobj)
        assert np.array_equal(written, label)
        img = np.asarray(nib.load(out / "imagesTr" / f"{rec['case_id']}_0000.nii.gz").dataobj)
        assert np.array_equal(img, channels[0])


def test_families_are_ordered(blob_bank, tmp_path):
    achieved = {}
    for fam in ("low", "medium", "high"):
        res = generate(blob_bank, tmp_path / fam, GenerateConfig(n=6, load=fam, seed=0, include_originals=False),
                       progress=False)
        achieved[fam] = np.median([r["achieved_load_mm3"] for r in res.records])
        assert sum(r["reached"] for r in res.records) >= 5
    assert achieved["low"] < achieved["medium"] < achieved["high"]


def test_modes(blob_bank, tmp_path):
    res = generate(blob_bank, tmp_path / "p", GenerateConfig(n=4, load="high", mode="populate",
                                                             include_originals=False), progress=False)
    assert all(op["op"] == "paste" for r in res.records for op in r["ops"])
    res = generate(blob_bank, tmp_path / "i", GenerateConfig(n=4, load="low", mode="inpaint",
                                                             include_originals=False), progress=False)
    assert all(op["op"] == "inpaint" for r in res.records for op in r["ops"])
    assert all(r["achieved_load_mm3"] <= r["initial_load_mm3"] for r in res.records)


def test_splits_keep_validation_cases_out_of_training(blob_bank, tmp_path):
    out = tmp_path / "out"
    res = generate(blob_bank, out, GenerateConfig(n=12, load="uniform", folds=2), progress=False)
    splits = json.loads((out / "splits_final.json").read_text())
    assert len(splits) == 2
    by_id = {r["case_id"]: r for r in res.records}
    originals = {f"case{k}" for k in range(4)}
    assert set().union(*[set(s["val"]) for s in splits]) == originals
    for fold in splits:
        val = set(fold["val"])
        assert val <= originals and not val & set(fold["train"])
        for cid in fold["train"]:
            if cid in by_id:
                assert by_id[cid]["base_case"] not in val
                assert not val & set(by_id[cid]["donor_cases"])
    # every synthetic case is usable by at least one fold
    assert set(by_id) <= set().union(*[set(s["train"]) for s in splits])


def test_refuses_non_empty_output(blob_bank, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(InputError, match="not empty"):
        generate(blob_bank, out, GenerateConfig(n=1, load="low"), progress=False)
    assert (out / "precious.txt").read_text() == "user data"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_region_label_keeps_lesions_inside_organ(tmp_path):
    ds = blob_dataset(tmp_path / "ds", multiclass=True, oblique=True, channels=("CT",))
    bank = build_bank(ds, tmp_path / "bank", BankConfig(lesion_labels=(2,), region_labels=(1,)), progress=False)
    out = tmp_path / "out"
    res = generate(bank, out, GenerateConfig(n=6, load="high", include_originals=False), progress=False)
    assert sum(r["reached"] for r in res.records) >= 5
    pasted = 0
    for rec in res.records:
        data = np.asarray(nib.load(out / "labelsTr" / f"{rec['case_id']}.nii.gz").dataobj)
        base = np.asarray(nib.load(ds / "labelsTr" / f"{rec['base_case']}.nii.gz").dataobj)
        new_lesion = (data == 2) & (base != 2)
        organ_or_lesion = base > 0
        if new_lesion.any():  # a case already at its target gets no paste
            pasted += 1
            assert organ_or_lesion[new_lesion].mean() >= 0.9
    assert pasted >= 4


def test_load_range_sets_targets(blob_bank, tmp_path):
    res = generate(blob_bank, tmp_path / "o", GenerateConfig(n=4, load="uniform", load_range=(300.0, 400.0),
                                                             include_originals=False), progress=False)
    assert all(300 <= r["target_load_mm3"] <= 400 for r in res.records)


def test_case_rng_depends_only_on_seed_and_index():
    assert case_rng(3, 7).random() == case_rng(3, 7).random()
    assert case_rng(3, 7).random() != case_rng(3, 8).random()


def test_volume_warp_is_recorded_and_keeps_image_and_label_aligned(blob_bank, tmp_path):
    out = tmp_path / "out"
    res = generate(blob_bank, out, GenerateConfig(n=2, load="medium", volume_warp=True, include_originals=False),
                   progress=False)
    for rec in res.records:
        warp = rec["volume_warp"]
        assert warp and len(warp["elastic_mm"]) == 5 and 0.9 <= warp["scale"] <= 1.1
        label = np.asarray(nib.load(out / "labelsTr" / f"{rec['case_id']}.nii.gz").dataobj)
        base = np.asarray(nib.load(Path(Bank(blob_bank).case_refs()[0].label_path).parent /
                                   f"{rec['base_case']}.nii.gz").dataobj)
        assert not np.array_equal(label, base)  # the whole case moved
        img = np.asarray(nib.load(out / "imagesTr" / f"{rec['case_id']}_0000.nii.gz").dataobj)
        # lesions stay bright: image and label were warped with the same grid
        assert np.median(img[label == 1]) > np.median(img[(label == 0) & (img > 50)]) + 15


def test_stored_spline_coefficients_give_the_same_cases(blob_bank, tmp_path):
    """The bank's stored spline coefficients are those a paste would make itself, and a bank without them
    (built before they were stored) generates the same bytes."""
    import shutil

    from lesionsynth.bank import SPLINES_FILE
    from lesionsynth.render.paste import spline_coefficients

    bank = Bank(blob_bank)
    for les in bank.lesions[:5]:
        stored = bank.lesion_splines(les["id"])
        assert np.array_equal(stored, spline_coefficients(bank.lesion_arrays(les["id"])[0]))
    old = tmp_path / "old_bank"
    shutil.copytree(blob_bank, old)
    (old / SPLINES_FILE).unlink()
    index = json.loads((old / "bank.json").read_text())
    for les in index["lesions"]:
        del les["spline_offset"]
    (old / "bank.json").write_text(json.dumps(index))
    assert Bank(old).lesion_splines(bank.lesions[0]["id"]) is None
    cfg = GenerateConfig(n=3, load="high", seed=4)
    generate(blob_bank, tmp_path / "new_out", cfg, progress=False)
    generate(old, tmp_path / "old_out", cfg, progress=False)
    written = sorted((tmp_path / "new_out").glob("*Tr/*.nii.gz"))
    assert written
    for path in written:
        assert path.read_bytes() == (tmp_path / "old_out" / path.relative_to(tmp_path / "new_out")).read_bytes()


def test_a_failing_read_at_jobs_1_stops_after_the_write_in_progress(blob_bank, tmp_path, monkeypatch):
    """At --jobs 1 the next case is read while this one's lesion work runs (`overlapped_cases`): an error in
    that read reaches the caller as it is, the cases before it (in the order they are made, `reuse_order`)
    are written whole, nothing temporary is left, and --resume then gives the bytes of an uninterrupted run."""
    from lesionsynth import pipeline

    cfg = GenerateConfig(n=6, load="high", seed=11)
    generate(blob_bank, tmp_path / "ref", cfg, jobs=1, progress=False)
    real_read = pipeline.read_stage
    reads = []

    def failing_read(index, *args):
        reads.append(index)
        if len(reads) == 3:  # the third case read from its files
            raise InputError(f"case {index}: unreadable (a test)")
        return real_read(index, *args)

    monkeypatch.setattr(pipeline, "read_stage", failing_read)
    with pytest.raises(InputError, match="unreadable"):
        generate(blob_bank, tmp_path / "out", cfg, jobs=1, progress=False)
    ids = [c["case_id"] for c in Bank(blob_bank).cases]
    folds = pipeline.fold_assignment(ids, cfg.folds, cfg.seed)
    order, _ = pipeline.reuse_order(list(range(cfg.n)), lambda i: pipeline.base_case_of(i, folds, ids, cfg.seed)[2])
    before = order[:order.index(reads[-1])]
    assert len(before) >= 2
    written = sorted(p.name for p in (tmp_path / "out" / "labelsTr").iterdir() if p.name.startswith("syn"))
    assert written == sorted(f"syn{i:05d}.nii.gz" for i in before)
    assert not [p for p in (tmp_path / "out").rglob(".*.tmp*")]
    monkeypatch.setattr(pipeline, "read_stage", real_read)
    generate(blob_bank, tmp_path / "out", cfg, jobs=1, progress=False, resume=True)
    assert _hashes(tmp_path / "out") == _hashes(tmp_path / "ref")


def test_reuse_order_takes_turns_and_never_waits_on_the_case_just_before():
    from lesionsynth.pipeline import reuse_order

    base_of = {i: "ABCDEFG"[i % 7] for i in range(30)}.get
    order, takes_from = reuse_order(list(range(30)), base_of)
    assert sorted(order) == list(range(30))
    assert order[:6] == [0, 1, 2, 7, 8, 9]  # three bases take turns
    position = {index: k for k, index in enumerate(order)}
    for taker, giver in takes_from.items():
        assert base_of(taker) == base_of(giver)
        assert position[giver] < position[taker] - 1
        # the next case of the giver's base, none of it in between
        assert not [i for i in order[position[giver] + 1:position[taker]] if base_of(i) == base_of(giver)]
    assert len(takes_from) == 30 - 7  # every case but the first of its base (7 bases: 3 + 2 + 2, none alone)
    order, takes_from = reuse_order(list(range(5)), lambda i: "A")
    assert order == list(range(5)) and not takes_from  # one base: each case right after the last, read again


def test_cases_of_one_base_case_reuse_its_arrays_and_give_the_same_bytes(blob_bank, tmp_path, monkeypatch):
    """Cases of one base case reuse its arrays, restored after each write (--jobs 1 and in workers); the bytes
    equal those of runs that read every base case from its files."""
    from lesionsynth import pipeline

    cfg = GenerateConfig(n=12, load="high", seed=5)
    reused = {}
    for jobs in (1, 2):
        result = generate(blob_bank, tmp_path / f"jobs{jobs}", cfg, jobs=jobs, progress=False)
        reused[jobs] = sum(t["base_reused"] for t in result.timings)
    monkeypatch.setattr(pipeline, "_restored_base", lambda job: None)
    result = generate(blob_bank, tmp_path / "reads", cfg, jobs=1, progress=False)
    assert not any(t["base_reused"] for t in result.timings)
    assert reused[1] >= 6 and reused[2] >= 4
    reference = _hashes(tmp_path / "reads")
    assert _hashes(tmp_path / "jobs1") == reference == _hashes(tmp_path / "jobs2")


def test_a_base_case_not_restored_exactly_is_read_again(blob_bank, tmp_path, monkeypatch):
    """If a written case's arrays do not come back as the base case was read (here: nothing is restored),
    the checksum says so and the next case of that base reads it from its files: the bytes do not change."""
    from lesionsynth import render

    cfg = GenerateConfig(n=12, load="high", seed=5)
    result = generate(blob_bank, tmp_path / "ref", cfg, jobs=1, progress=False)
    restored = sum(t["base_reused"] for t in result.timings)
    monkeypatch.setattr(render, "restore_patches", lambda channels, label, undo: None)
    for jobs in (1, 2):
        result = generate(blob_bank, tmp_path / f"out{jobs}", cfg, jobs=jobs, progress=False)
        # only arrays that no operation changed still pass
        assert sum(t["base_reused"] for t in result.timings) < restored
        assert _hashes(tmp_path / f"out{jobs}") == _hashes(tmp_path / "ref")


def test_base_groups_are_short_runs_of_one_base_case():
    from lesionsynth.pipeline import RUN_CASES, base_groups

    base_of = {i: i % 3 for i in range(100)}.get
    groups = base_groups(list(range(100)), base_of, jobs=2)
    assert sorted(i for g in groups for i in g) == list(range(100))
    assert all(len({base_of(i) for i in g}) == 1 and len(g) <= RUN_CASES for g in groups)
    assert max(len(g) for g in groups) == RUN_CASES  # long enough to reuse, short enough to lose little
    small = base_groups(list(range(12)), base_of, jobs=2)
    assert len(small) >= 6 and all(len(g) <= 2 for g in small)  # every worker gets several runs


def test_base_cases_spread_over_the_dataset():
    """The first n outputs use n distinct base cases (8 of 8 cases with 5 folds; walking each fold's sorted
    training cases used 4), each a training case of its home fold, the folds in turn; over a long run every
    case is a base about equally often, and another seed orders them otherwise."""
    ids = [f"case{k:02d}" for k in range(8)]
    folds = pipeline.fold_assignment(ids, 5, 0)
    picks = [pipeline.base_case_of(i, folds, ids, 0) for i in range(8 * 5 * 3)]
    assert len({base for _, _, base in picks[:8]}) == 8
    for i, (fold, train, base) in enumerate(picks):
        assert fold == i % 5 and base in train and base not in folds[fold]
    uses = np.bincount([ids.index(base) for _, _, base in picks], minlength=8)
    assert uses.max() - uses.min() <= 2, uses
    other = [pipeline.base_case_of(i, folds, ids, 1)[2] for i in range(8)]
    assert other != [base for _, _, base in picks[:8]] and len(set(other)) == 8


def test_one_direction_modes_pick_bases_that_can_reach_the_target():
    """Populate-only cannot lower a load, inpaint-only cannot raise one: such runs take, among the fold's
    training cases, those on the right side of each case's target (drawn as the case draws it), and the
    targets themselves do not change."""
    ids = [f"case{k:02d}" for k in range(10)]
    loads = tuple(float(v) for v in np.geomspace(300, 30000, 10))
    folds = pipeline.fold_assignment(ids, 5, 0)
    for mode, load in (("inpaint", "low"), ("populate", "high")):
        reach = pipeline.Reach(mode, load, None, 0.1, 20, loads)
        for i in range(20):
            _, train, base = pipeline.base_case_of(i, folds, ids, 3, reach)
            target = pipeline.draw_target_load(load, case_rng(3, i), np.array(loads))
            fits = [c for c in train if (loads[ids.index(c)] >= 0.9 * target if mode == "inpaint"
                                         else loads[ids.index(c)] <= 1.1 * target)]
            reaches = pipeline.base_assignment(tuple(ids), tuple(tuple(v) for v in folds), 3, reach)[i][2]
            assert (base in fits) == bool(fits) and reaches == bool(fits)
            assert base in train


def test_inpaint_only_low_load_starts_from_bases_above_their_targets(blob_bank, tmp_path):
    """Every base starts above its low target and loses lesions (how close it gets depends on its lesions'
    sizes: the blobs are few and large)."""
    res = generate(blob_bank, tmp_path / "out", GenerateConfig(n=4, load="low", mode="inpaint",
                                                               include_originals=False), progress=False)
    assert all(r["initial_load_mm3"] >= 0.9 * r["target_load_mm3"] for r in res.records)
    assert sum(r["lesions_removed"] > 0 for r in res.records) >= 3


def test_a_run_says_in_one_line_when_bases_could_not_reach_their_targets(capsys):
    from types import SimpleNamespace

    from lesionsynth.cli import _summary

    stuck = {"reached": False, "mode": "populate", "stop_reason": "populate-only mode cannot lower the load",
             "lesions_added": 0, "lesions_removed": 0}
    fine = {"reached": True, "mode": "populate", "stop_reason": "reached", "lesions_added": 3, "lesions_removed": 0}
    _summary(SimpleNamespace(out="OUT", records=[stuck, fine, stuck]), 3)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("2 case(s) started on the wrong side of their target")
    _summary(SimpleNamespace(out="OUT", records=[fine]), 1)
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_more_folds_than_cases_is_said_and_shown(blob_bank, tmp_path):
    """--folds 9 on a 4-case bank: one line says that 4 folds are used, splits_final.json holds 4, and inspect
    shows the folds used."""
    from typer.testing import CliRunner

    from lesionsynth.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["generate", str(blob_bank), "--out", str(out), "--n", "1", "--load", "low",
                                   "--folds", "9", "--jobs", "1"])
    assert res.exit_code == 0, res.output
    assert "--folds 9: the bank holds 4 cases, so 4 folds were used" in res.output
    assert len(json.loads((out / "splits_final.json").read_text())) == 4
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert "folds 4 (9 asked; the bank holds 4 cases)" in shown.output
