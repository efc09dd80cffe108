"""Common space: registration recovers known head poses, is reproducible, is stored in the bank and used by
generate; `--space auto` chooses as documented; a poor registration is named, never used silently."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from lesionsynth import space
from lesionsynth.bank import Bank, BankConfig, build_bank
from lesionsynth.errors import InputError
from lesionsynth.pipeline import GenerateConfig, generate

CASES = ("ATLAS_001", "ATLAS_003", "MS_01038", "MS_01042")


def pose_of(k: int) -> np.ndarray:
    """Case k's head pose: native world = pose @ template world (rotation ≤ 15°, shift ≤ 15 mm)."""
    rng = np.random.default_rng(100 + k)
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-15, 15, 3), degrees=True).as_matrix()
    pose[:3, 3] = rng.uniform(-15, 15, 3)
    return pose


def native_grid(k: int) -> tuple[tuple[int, ...], np.ndarray]:
    """Case k's grid: anisotropic spacing (one thick axis), flipped axes, about the head's extent."""
    rng = np.random.default_rng(200 + k)
    spacing = rng.uniform(1.6, 2.0, 3)
    spacing[k % 3] = rng.uniform(2.6, 3.0)
    flips = np.diag([float(rng.choice([-1, 1])) for _ in range(3)] + [1.0])
    shape = tuple(int(v) for v in np.ceil(np.array([200.0, 235.0, 190.0]) / spacing))
    affine = flips @ np.diag([*spacing, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2) + np.array([0.0, -18.0, 18.0])
    return shape, affine


def resample(data, src_affine, shape, dst_affine, pose, order):
    m = np.linalg.inv(src_affine) @ np.linalg.inv(pose) @ dst_affine
    return ndimage.affine_transform(np.asarray(data, dtype=np.float32 if order else data.dtype), m[:3, :3], m[:3, 3],
                                    output_shape=shape, order=order)


@pytest.fixture(scope="module")
def native(real_data, tmp_path_factory) -> dict:
    """The MNI-grid sample cases moved into native spaces (pose, spacing, orientation, gain), truth apart."""
    src = real_data / "mni_lesions"
    root = tmp_path_factory.mktemp("native")
    ds = root / "ds"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    wm = nib.load(real_data / "raw" / "mni152" / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    truth = {}
    for k, case in enumerate(CASES):
        shape, affine = native_grid(k)
        label_img = nib.load(src / "labelsTr" / f"{case}.nii.gz")
        mni = label_img.affine
        for ch in range(2):
            data = np.asanyarray(nib.load(src / "imagesTr" / f"{case}_{ch:04d}.nii.gz").dataobj)
            gain = np.random.default_rng(300 + 2 * k + ch).uniform(0.5, 2.0)
            img = resample(data, mni, shape, affine, pose_of(k), 1) * np.float32(gain)
            nib.save(nib.Nifti1Image(img, affine), ds / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        label = resample(np.asanyarray(label_img.dataobj).astype(np.uint8), mni, shape, affine, pose_of(k), 0)
        nib.save(nib.Nifti1Image(label, affine), ds / "labelsTr" / f"{case}.nii.gz")
        wm_prob = resample(np.asanyarray(wm.dataobj), wm.affine, shape, affine, pose_of(k), 1)
        truth[case] = wm_prob > 0.5 * float(np.asanyarray(wm.dataobj).max())
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "FLAIR"},
                                                 "labels": {"background": 0, "lesion": 1},
                                                 "numTraining": len(CASES), "file_ending": ".nii.gz"}))
    bank = build_bank(ds, root / "bank", BankConfig(space="auto"), jobs=1, progress=False)
    return {"root": root, "ds": ds, "bank": bank, "mni_affine": mni, "wm": truth, "src": src}


def test_registration_recovers_a_known_pose(native):
    t1 = nib.load(native["src"] / "imagesTr" / "ATLAS_001_0000.nii.gz")
    reference = space.registration_image(np.asanyarray(t1.dataobj), t1.affine, "T1")
    moved = nib.load(native["ds"] / "imagesTr" / "MS_01042_0000.nii.gz")
    case = space.registration_image(np.asanyarray(moved.dataobj), moved.affine, "T1")
    reg = space.register_case(reference, case)
    # the same anatomy: a template point maps to pose @ point in the case
    points = np.argwhere(np.ones((5, 5, 5))) * 25.0 - 50.0
    got = space.apply_affine(np.linalg.inv(reg.ref_from_case), points)
    want = space.apply_affine(pose_of(3), points)
    assert np.linalg.norm(got - want, axis=1).max() < 1.5
    assert reg.overlap > 0.95 and not reg.poor_below(space.POOR_OVERLAP)
    again = space.register_case(reference, case)
    assert np.array_equal(again.ref_from_case, reg.ref_from_case)  # same matrix on every run


def test_bank_registers_native_cases_and_stores_the_transforms(native):
    bank = Bank(native["bank"])
    assert bank.registered
    assert bank.index["space"]["why"].startswith("auto: the cases are not aligned")
    ref_id = bank.index["space"]["reference"]["case_id"]
    ref_k = CASES.index(ref_id)
    for k, case in enumerate(bank.cases):
        reg = case["registration"]
        assert reg["status"] == "ok" and reg["foreground_overlap"] > 0.9
        # ref_from_case = pose_ref @ inverse(pose_case): the same anatomy in both spaces
        want = pose_of(ref_k) @ np.linalg.inv(pose_of(CASES.index(case["case_id"])))
        points = np.argwhere(np.ones((4, 4, 4))) * 30.0 - 45.0
        err = space.apply_affine(np.array(reg["ref_from_case"]), points) - space.apply_affine(want, points)
        assert np.linalg.norm(err, axis=1).max() < 2.0, case["case_id"]


def test_likelihood_mapped_into_a_case_peaks_on_lesion_anatomy(native):
    """Each case's lesions went into the map through its transform: mapped back, the map is high on them."""
    bank = Bank(native["bank"])
    for case in bank.cases:
        label = np.asanyarray(nib.load(native["ds"] / "labelsTr" / f"{case['case_id']}.nii.gz").dataobj) > 0
        affine = np.array(case["affine"])
        lik = bank.coarse_likelihood((1, 1, 1), affine, label.shape, label.shape, case["case_id"])
        unregistered = bank.coarse_likelihood((1, 1, 1), affine, label.shape, label.shape)
        on, off = lik[label].mean(), lik[~label & (lik > 0)].mean()
        assert on > 2.5 * off, case["case_id"]
        if case["case_id"] != bank.index["space"]["reference"]["case_id"]:  # the reference's transform is identity
            assert lik[label].mean() > 1.2 * unregistered[label].mean(), case["case_id"]


def test_auto_takes_world_space_for_a_shared_grid(blob_bank):
    bank = Bank(blob_bank)
    assert not bank.registered
    assert bank.index["space"] == {"mode": "world", "why": "auto: all cases share one grid",
                                   "reference_name": "world space"}


def test_generate_pastes_follow_the_registered_map(native, tmp_path):
    """Pastes land where the registered likelihood puts them; the run's bytes do not depend on --jobs."""
    cfg = GenerateConfig(n=4, load="uniform", load_range=(40000.0, 60000.0), mode="populate", seed=1, folds=1,
                         include_originals=False)
    one = generate(native["bank"], tmp_path / "one", cfg, jobs=1, progress=False)
    two = generate(native["bank"], tmp_path / "two", cfg, jobs=2, progress=False)
    for rec in one.records:
        a = (tmp_path / "one" / "labelsTr" / f"{rec['case_id']}.nii.gz").read_bytes()
        assert a == (tmp_path / "two" / "labelsTr" / f"{rec['case_id']}.nii.gz").read_bytes()
    assert [r["ops"] for r in one.records] == [r["ops"] for r in two.records]
    assert sum(r["lesions_added"] for r in one.records) > 0
    assert all("context_score" in op for r in one.records for op in r["ops"] if op["op"] == "paste")


def test_poor_registration_is_named_and_can_be_excluded(native, tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    for sub in ("imagesTr", "labelsTr"):
        (ds / sub).mkdir()
        for f in (native["ds"] / sub).iterdir():
            (ds / sub / f.name).symlink_to(f)
    (ds / "dataset.json").write_text((native["ds"] / "dataset.json").read_text())
    # a case whose first channel is a bright block in one corner: nothing in it matches a head
    bad = ds / "imagesTr" / "MS_01042_0000.nii.gz"
    img = nib.load(bad)
    data = np.asanyarray(img.dataobj)
    bad.unlink()
    box = np.zeros_like(data)
    box[: data.shape[0] // 3, : data.shape[1] // 3] = np.percentile(data, 99)
    nib.save(nib.Nifti1Image(box, img.affine), bad)
    with pytest.raises(InputError, match=r"registration .* is poor for MS_01042 \(overlap"):
        build_bank(ds, tmp_path / "bank", BankConfig(space="register"), progress=False)
    assert not (tmp_path / "bank").exists()
    # --space auto does not stop: it falls back to world coordinates and says why
    auto = Bank(build_bank(ds, tmp_path / "auto", BankConfig(space="auto"), progress=False))
    assert auto.index["space"]["mode"] == "world" and not auto.registered
    assert "was poor for MS_01042" in auto.index["space"]["why"]
    bank = build_bank(ds, tmp_path / "bank", BankConfig(space="register", exclude_cases=("MS_01042",)), progress=False)
    assert [c["case_id"] for c in Bank(bank).cases] == [c for c in CASES if c != "MS_01042"]


def test_template_and_tissue_prior_bound_the_pastes(native, real_data, tmp_path):
    mni = real_data / "raw" / "mni152"
    cfg = BankConfig(space="register", template=str(mni / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
                     template_region=str(mni / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"))
    bank = Bank(build_bank(native["ds"], tmp_path / "bank", cfg, progress=False))
    assert bank.index["space"]["reference"]["kind"] == "template"
    assert bank.index["space"]["template_region_file"] == "template_region.nii.gz"
    cfg = GenerateConfig(n=4, load="uniform", load_range=(40000.0, 60000.0), mode="populate", seed=0, folds=1,
                         include_originals=False)
    out = generate(bank.folder, tmp_path / "out", cfg, progress=False)
    new_wm = new_all = 0
    for rec in out.records:
        syn = np.asanyarray(nib.load(tmp_path / "out" / "labelsTr" / f"{rec['case_id']}.nii.gz").dataobj) > 0
        base = np.asanyarray(nib.load(native["ds"] / "labelsTr" / f"{rec['base_case']}.nii.gz").dataobj) > 0
        new = syn & ~base
        new_wm += int((new & native["wm"][rec["base_case"]]).sum())
        new_all += int(new.sum())
    assert new_all > 0
    assert new_wm / new_all > 0.8
