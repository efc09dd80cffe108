"""LesionMix on the fly: the TorchIO and MONAI transforms over a bank of the real MNI sample, checked against
what `generate` writes, in DataLoader pipelines of 2 workers, and for repeatability."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from lesionsynth.bank import Bank, build_bank
from lesionsynth.errors import InputError, LesionsynthError
from lesionsynth.pipeline import GenerateConfig, base_case_of, fold_assignment, generate

from .conftest import REPO

pytestmark = pytest.mark.slow

OFFLINE = GenerateConfig(n=3, load="medium", seed=0, include_originals=False)  # a case that removes and adds
#: Two cases of the sample that this range makes one paste into (ATLAS_003, 1169 mm³) and one inpaint (MS_01042,
#: 27475 mm³): the lesion work of both kinds, in a few seconds.
LOADER_CASES = ("ATLAS_003", "MS_01042")
LOADER_SETTINGS = {"load": "uniform", "load_range": (5000.0, 15000.0)}


@pytest.fixture(scope="module")
def mni(real_data):
    return real_data / "mni_lesions"


@pytest.fixture(scope="module")
def mni_bank(mni, tmp_path_factory):
    import shutil

    folder = tmp_path_factory.mktemp("mni_bank")
    yield build_bank(mni, folder / "bank", progress=False)
    shutil.rmtree(folder)  # 70 MB


@pytest.fixture(scope="module")
def offline(mni_bank, tmp_path_factory):
    """generate's output of OFFLINE: {case index: (manifest record, channels, label)}, read back from the files
    (the files are removed: every run of this module would leave ~100 MB behind)."""
    import shutil

    out = tmp_path_factory.mktemp("mni_offline") / "out"
    result = generate(mni_bank, out, OFFLINE, progress=False)
    cases = {}
    for rec in result.records:
        images = [np.asarray(nib.load(out / "imagesTr" / f"{rec['case_id']}_{c:04d}.nii.gz").dataobj) for c in (0, 1)]
        label = np.asarray(nib.load(out / "labelsTr" / f"{rec['case_id']}.nii.gz").dataobj)
        cases[rec["case_index"]] = (rec, np.stack(images), label)
    shutil.rmtree(out)
    return cases


def offline_donors(bank_dir, index: int) -> list[str]:
    """The donor cases `generate` gives case `index` (its fold's training cases)."""
    ids = [c["case_id"] for c in Bank(bank_dir).cases]
    return base_case_of(index, fold_assignment(ids, OFFLINE.folds, OFFLINE.seed), ids)[1]


def case_files(mni, case_id: str) -> tuple[list[str], str]:
    return ([str(mni / "imagesTr" / f"{case_id}_{c:04d}.nii.gz") for c in (0, 1)],
            str(mni / "labelsTr" / f"{case_id}.nii.gz"))


def manifest_fields(record: dict) -> dict:
    """The fields of a manifest line that the plan decides (JSON round trip: the manifest's own types)."""
    return json.loads(json.dumps({k: v for k, v in record.items() if k not in ("case_id", "case_index", "seed",
                                                                              "home_fold", "base_case")}))


# ---------------------------------------------------------------------------------------------------- TorchIO

def tio_subject(mni, case_id: str):
    import torchio as tio

    images, label = case_files(mni, case_id)
    return tio.Subject(t1=tio.ScalarImage(images[0]), flair=tio.ScalarImage(images[1]), seg=tio.LabelMap(label))


def test_torchio_transform_equals_generate(mni, mni_bank, offline):
    pytest.importorskip("torchio")
    from lesionsynth.transforms import LesionMix

    for index, (rec, channels, label) in offline.items():
        mix = LesionMix(mni_bank, load=OFFLINE.load, seed=OFFLINE.seed, case_index=index,
                        donor_cases=offline_donors(mni_bank, index))
        out = mix(tio_subject(mni, rec["base_case"]))
        assert out.t1.data.numpy().dtype == out.flair.data.numpy().dtype == channels.dtype == np.float32
        assert np.array_equal(out.t1.data[0].numpy(), channels[0])
        assert np.array_equal(out.flair.data[0].numpy(), channels[1])
        assert np.array_equal(out.seg.data[0].numpy(), label)
        plan = out.applied_transforms[-1][1]["plan"]
        assert plan["base_case"] == rec["base_case"] and plan["seed"] == 0 and plan["case_index"] == index
        assert manifest_fields(plan) == manifest_fields(rec)
    assert any(r["lesions_added"] and r["lesions_removed"] for r, _, _ in offline.values())


def _tio_loader_outputs(mni, mni_bank, seed: int):
    import torch
    import torchio as tio

    from lesionsynth.transforms import RandomLesionMix

    mix = RandomLesionMix(mni_bank, **LOADER_SETTINGS)
    assert len(pickle.dumps(mix)) < 4000  # the bank folder and the settings, not the bank
    dataset = tio.SubjectsDataset([tio_subject(mni, c) for c in LOADER_CASES], transform=tio.Compose([mix]))
    loader = tio.SubjectsLoader(dataset, batch_size=1, num_workers=2, collate_fn=tio.utils.history_collate)
    torch.manual_seed(seed)
    return [(b["t1"]["data"][0], b["flair"]["data"][0], b["seg"]["data"][0], b["history"][0]) for b in loader]


def test_torchio_pipeline_in_dataloader_workers(mni, mni_bank):
    pytest.importorskip("torchio")
    import torch

    first = _tio_loader_outputs(mni, mni_bank, seed=0)
    again = _tio_loader_outputs(mni, mni_bank, seed=0)
    for (t1, flair, seg, history), (t1b, flair_b, seg_b, _) in zip(first, again):
        assert torch.equal(t1, t1b) and torch.equal(flair, flair_b) and torch.equal(seg, seg_b)
    from lesionsynth.transforms import recorded_plan

    plans = [recorded_plan(history) for *_, history in first]
    assert [p["case_id"] for p in plans] == list(LOADER_CASES)
    assert [p["base_case"] for p in plans] == list(LOADER_CASES)  # known by their file names
    assert plans[0]["lesions_added"] > 0 and plans[1]["lesions_removed"] > 0
    assert all(p["case_id"] not in p["donor_cases"] for p in plans)  # no case gets its own lesions
    assert all(5000 * 0.9 <= p["achieved_load_mm3"] <= 15000 * 1.1 for p in plans)
    # the history reproduces a sample from the original subject: by rendering its plan again ...
    t1, flair, seg, history = first[0]
    import torchio as tio

    replayed = tio.Compose(history)(tio_subject(mni, LOADER_CASES[0]))
    assert torch.equal(replayed.t1.data, t1) and torch.equal(replayed.seg.data, seg)
    # ... and from its seed alone
    from lesionsynth.transforms import LesionMix

    seeded = LesionMix(mni_bank, **LOADER_SETTINGS, seed=plans[0]["seed"])(tio_subject(mni, LOADER_CASES[0]))
    assert torch.equal(seeded.flair.data, flair)
    other = _tio_loader_outputs(mni, mni_bank, seed=1)
    assert [h[-1].plan["seed"] for *_, h in other] != [p["seed"] for p in plans]


# ---------------------------------------------------------------------------------------------------- MONAI

def monai_loading():
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    return [LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"])]


def monai_sample(mni, case_id: str) -> dict:
    images, label = case_files(mni, case_id)
    return {"image": images, "label": label}


def test_monai_transform_equals_generate(mni, mni_bank, offline):
    pytest.importorskip("monai")
    from monai.transforms import Compose

    from lesionsynth.transforms import LesionMixd

    for index, (rec, channels, label) in offline.items():
        mix = LesionMixd(["image"], "label", mni_bank, load=OFFLINE.load, seed=OFFLINE.seed, case_index=index,
                         donor_cases=offline_donors(mni_bank, index))
        out = Compose([*monai_loading(), mix])(monai_sample(mni, rec["base_case"]))
        assert out["image"].numpy().dtype == channels.dtype == np.float32
        assert np.array_equal(out["image"].numpy(), channels)
        assert np.array_equal(out["label"][0].numpy(), label)
        plan = out["label"].applied_operations[-1]["extra_info"]["lesionmix"]
        assert plan["base_case"] == rec["base_case"] and plan["case_index"] == index
        assert manifest_fields(plan) == manifest_fields(rec)


def _monai_loader_outputs(mni, mni_bank, seed: int):
    import torch
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.transforms import Compose

    from lesionsynth.transforms import RandLesionMixd

    mix = RandLesionMixd(["image"], "label", mni_bank, **LOADER_SETTINGS)
    assert len(pickle.dumps(mix)) < 8000
    dataset = Dataset([monai_sample(mni, c) for c in LOADER_CASES], transform=Compose([*monai_loading(), mix]))
    torch.manual_seed(seed)  # MONAI's DataLoader seeds each worker's transforms (set_random_state) from it
    return [decollate_batch(batch)[0] for batch in DataLoader(dataset, batch_size=1, num_workers=2)]


def test_monai_pipeline_in_dataloader_workers(mni, mni_bank):
    pytest.importorskip("monai")
    import torch

    from lesionsynth.transforms import LesionMixd

    first = _monai_loader_outputs(mni, mni_bank, seed=0)
    again = _monai_loader_outputs(mni, mni_bank, seed=0)
    for a, b in zip(first, again):
        assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
        assert torch.equal(a["label"].as_tensor(), b["label"].as_tensor())
    from lesionsynth.transforms import recorded_plan

    plans = [recorded_plan(s) for s in first]
    assert plans == [s["image"].applied_operations[-1]["extra_info"]["lesionmix"] for s in first]
    assert [p["base_case"] for p in plans] == list(LOADER_CASES)
    assert plans[0]["lesions_added"] > 0 and plans[1]["lesions_removed"] > 0
    assert all(p["case_id"] not in p["donor_cases"] for p in plans)
    # the recorded plan reproduces the sample from the original files
    from monai.transforms import Compose

    replay = LesionMixd(["image"], "label", mni_bank, **LOADER_SETTINGS, plan=plans[0])
    again = Compose([*monai_loading(), replay])(monai_sample(mni, LOADER_CASES[0]))
    assert torch.equal(again["image"].as_tensor(), first[0]["image"].as_tensor())
    assert torch.equal(again["label"].as_tensor(), first[0]["label"].as_tensor())
    other = _monai_loader_outputs(mni, mni_bank, seed=1)
    assert [s["label"].applied_operations[-1]["extra_info"]["lesionmix"]["seed"] for s in other] != \
        [p["seed"] for p in plans]


def test_monai_set_random_state_decides_the_plan(mni, mni_bank):
    pytest.importorskip("monai")
    from monai.transforms import Compose

    from lesionsynth.transforms import RandLesionMixd

    sample = Compose(monai_loading())(monai_sample(mni, LOADER_CASES[1]))
    seeds = []
    for state in (3, 3, 4):
        mix = RandLesionMixd(["image"], "label", mni_bank, mode="inpaint", load="low").set_random_state(state)
        out = mix(dict(sample))
        seeds.append(out["label"].applied_operations[-1]["extra_info"]["lesionmix"]["seed"])
    assert seeds[0] == seeds[1] != seeds[2]
    # the inverse moves nothing and drops its trace, so that earlier spatial transforms can be inverted
    undone = mix.inverse(out)
    assert undone["label"].applied_operations == [] and undone["image"].applied_operations == []
    assert undone["image"] is out["image"]


# ---------------------------------------------------------------------------------------------------- any image

def test_another_image_on_its_own_grid_in_loader_dtypes(mni, mni_bank):
    """A crop of a bank case with int16 channels and an int64 label: not a bank case as it was read, so its
    region comes from the sample itself; its own case's lesions are still not pasted (named by case_id); the
    output keeps the input dtypes, integers rounded and clipped as generate writes them."""
    tio = pytest.importorskip("torchio")
    import torch

    from lesionsynth.transforms import LesionMix, recorded_plan

    subject = tio_subject(mni, "MS_01039")
    crop = (slice(20, 170), slice(30, 200), slice(40, 160))
    start = np.array([s.start for s in crop])
    affine = subject.t1.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ start
    t1 = torch.round(subject.t1.data[(slice(None),) + crop] * 10).to(torch.int16)
    flair = subject.flair.data[(slice(None),) + crop].to(torch.float64)
    seg = subject.seg.data[(slice(None),) + crop].to(torch.int64)
    sample = tio.Subject(t1=tio.ScalarImage(tensor=t1, affine=affine),
                         flair=tio.ScalarImage(tensor=flair, affine=affine),
                         seg=tio.LabelMap(tensor=seg, affine=affine), case_id="MS_01039")
    out = LesionMix(mni_bank, load="uniform", load_range=(60000.0, 70000.0), seed=5)(sample)
    plan = recorded_plan(out)
    assert plan["case_id"] == "MS_01039" and plan["base_case"] is None
    assert plan["lesions_added"] > 0 and "MS_01039" not in plan["donor_cases"]
    assert out.t1.data.dtype == torch.int16 and out.flair.data.dtype == torch.float64
    assert out.seg.data.dtype == torch.int64
    assert int((out.seg.data == 1).sum()) == plan["achieved_load_voxels"]
    changed = out.seg.data != seg
    assert changed.any() and (out.t1.data[changed] != t1[changed]).float().mean() > 0.5
    # the same image without its name may get lesions of its own case; the same seed, the same draw otherwise
    anonymous = tio.Subject(t1=sample.t1, flair=sample.flair, seg=sample.seg)
    assert LesionMix(mni_bank, load="uniform", load_range=(60000.0, 70000.0), seed=5)(anonymous) \
        .applied_transforms[-1][1]["plan"]["case_id"] is None


def test_a_changed_bank_case_is_another_image(mni, mni_bank):
    """A bank case whose intensities changed (or that was flipped) before the transform keeps its name but not
    the bank's stored region: that was made from the case as it was read."""
    tio = pytest.importorskip("torchio")

    from lesionsynth.transforms import LesionMix

    subject = tio_subject(mni, "ATLAS_003")
    flipped = tio.Flip(axes=(0,))(subject)
    mix = LesionMix(mni_bank, mode="inpaint", load="low", seed=1)
    assert mix(subject).applied_transforms[-1][1]["plan"]["base_case"] == "ATLAS_003"
    plan = mix(flipped).applied_transforms[-1][1]["plan"]
    assert plan["case_id"] == "ATLAS_003" and plan["base_case"] is None
    # without a name or a file, the case is found by its grid and its content among the six on that grid
    from_tensors = tio.Subject({k: type(im)(tensor=im.data, affine=im.affine) for k, im in subject.items()})
    assert mix(from_tensors).applied_transforms[-1][1]["plan"]["base_case"] == "ATLAS_003"


def test_a_sample_of_a_registered_bank_that_is_not_its_case_is_placed_by_region_only(blob_bank):
    """The bank's registration maps its likelihood onto its own cases only: another image is placed uniformly
    over its body region, not through the wrong transform."""
    from lesionsynth.io import load_case
    from lesionsynth.pipeline import synthesize_arrays
    from lesionsynth.plan import case_rng

    bank = Bank(blob_bank)
    case = load_case(bank.case_refs()[1], 2)
    bank.index["space"] = {"mode": "register"}
    cfg = GenerateConfig(n=0, load="high")
    *_, record = synthesize_arrays(case.channels.copy(), case.label.copy(), case.affine, bank, cfg, case_rng(0, 0))
    assert record["placement_fallback"] == "no likelihood map; sampled the region uniformly"
    assert record["lesions_added"] > 0


# ---------------------------------------------------------------------------------------------------- packaging

def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_importing_lesionsynth_imports_neither_framework():
    run = _run("import sys, lesionsynth, lesionsynth.transforms, lesionsynth.transforms.core\n"
               "assert 'torchio' not in sys.modules and 'monai' not in sys.modules, sorted(sys.modules)")
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("module, name, extra", [("torchio", "RandomLesionMix", "torchio"),
                                                 ("monai", "RandLesionMixd", "monai")])
def test_a_missing_framework_is_one_line_naming_the_extra(module, name, extra):
    run = _run(f"import sys; sys.modules[{module!r}] = None\n"
               f"from lesionsynth.errors import LesionsynthError\n"
               f"try:\n    from lesionsynth.transforms import {name}\n"
               f"except ImportError as exc:\n    assert isinstance(exc, LesionsynthError); print(exc)")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines() == [f"the {'TorchIO' if extra == 'torchio' else 'MONAI'} transform "
                                               f"needs {module}: pip install 'lesionsynth[{extra}]'"]


def test_bad_settings_fail_at_construction(mni_bank):
    from lesionsynth.transforms import LesionMixer

    with pytest.raises(InputError, match="load: 'huge' is not one of"):
        LesionMixer(mni_bank, load="huge")
    with pytest.raises(InputError, match="--load-range"):
        LesionMixer(mni_bank, load_range=(10.0, 1.0))
    with pytest.raises(InputError, match="donor case 'nope'"):
        LesionMixer(mni_bank, donor_cases=["nope"])
    with pytest.raises(LesionsynthError, match="not a lesion bank"):
        LesionMixer(mni_bank.parent)


def test_a_sample_that_does_not_fit_the_bank_is_one_line(mni, mni_bank):
    tio = pytest.importorskip("torchio")
    from lesionsynth.transforms import RandomLesionMix

    subject = tio_subject(mni, "ATLAS_001")
    one_channel = tio.Subject(t1=subject.t1, seg=subject.seg)
    with pytest.raises(InputError, match="1 image channel"):
        RandomLesionMix(mni_bank)(one_channel)
    two_labels = tio.Subject(t1=subject.t1, flair=subject.flair, seg=subject.seg, other=subject.seg)
    with pytest.raises(InputError, match="label_key"):
        RandomLesionMix(mni_bank)(two_labels)
