"""End to end on the real sample datasets (`make data`): build-bank + generate through the CLI, output
checked by nnU-Net's own verify_dataset_integrity and by nibabel."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

DATASETS = {
    # name: (build-bank options, load family)
    "brain_t1c": ([], "high"),
    # two patients: half the cases' only donor is a 48 cm³ tumour against the mediastinum, which the context
    # match lets into few places of a body without a lung label
    "lung_ct": ([], "low"),
    "lung_multiclass": (["--lesion-label", "2", "--region-label", "1"], "high"),
    "mni_lesions": ([], "uniform"),
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lesionsynth.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module", params=sorted(DATASETS))
def generated(request, real_data, tmp_path_factory):
    name = request.param
    options, family = DATASETS[name]
    work = tmp_path_factory.mktemp(name)
    bank, out = work / "bank", work / "Dataset901_Test"
    res = run_cli("build-bank", str(real_data / name), "--out", str(bank), "--jobs", "2", *options)
    assert res.returncode == 0, res.stderr
    res = run_cli("generate", str(bank), "--out", str(out), "--n", "4", "--load", family, "--seed", "1",
                  "--jobs", "2", "--folds", "2")
    assert res.returncode == 0, res.stderr
    return name, real_data / name, bank, out


def test_nnunet_verify_dataset_integrity_accepts_output(generated):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    _, _, _, out = generated
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        verify_dataset_integrity(str(out), num_processes=2)
    text = buffer.getvalue()
    assert "verify_dataset_integrity Done" in text
    assert "Error" not in text and "Warning" not in text, text


def test_output_geometry_and_labels_match_base_cases(generated):
    name, source, bank, out = generated
    meta = json.loads((out / "dataset.json").read_text())
    src_meta = json.loads((source / "dataset.json").read_text())
    assert meta["labels"] == src_meta["labels"]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    lesion_values = [2] if name == "lung_multiclass" else [1]
    for rec in records:
        label_img = nib.load(out / "labelsTr" / f"{rec['case_id']}.nii.gz")
        base_img = nib.load(source / "labelsTr" / f"{rec['base_case']}.nii.gz")
        assert np.array_equal(label_img.affine, base_img.affine)
        assert label_img.shape == base_img.shape
        assert label_img.get_data_dtype() == np.uint8
        label = np.asarray(label_img.dataobj)
        base_label = np.asarray(base_img.dataobj)
        assert set(np.unique(label)) <= set(src_meta["labels"].values())
        vox = abs(np.linalg.det(label_img.affine[:3, :3]))
        assert rec["achieved_load_mm3"] == pytest.approx(np.isin(label, lesion_values).sum() * vox, abs=1e-3)
        added = np.isin(label, lesion_values) & ~np.isin(base_label, lesion_values)
        for c in range(len(meta["channel_names"])):
            img = nib.load(out / "imagesTr" / f"{rec['case_id']}_{c:04d}.nii.gz")
            base = nib.load(source / "imagesTr" / f"{rec['base_case']}_{c:04d}.nii.gz")
            assert np.array_equal(img.affine, base.affine)
            if added.sum() > 20:  # every channel changes where a lesion was added
                diff = np.abs(np.asarray(img.dataobj, np.float32) - np.asarray(base.dataobj, np.float32))
                assert np.median(diff[added]) > 0
    assert sum(r["reached"] for r in records) >= (2 if name == "lung_ct" else 3)


def test_originals_are_included_unchanged(generated):
    _, source, _, out = generated
    meta = json.loads((source / "dataset.json").read_text())
    ids = sorted(p.name[: -len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))
    for cid in ids:
        a = np.asarray(nib.load(source / "imagesTr" / f"{cid}_0000.nii.gz").dataobj)
        b = np.asarray(nib.load(out / "imagesTr" / f"{cid}_0000.nii.gz").dataobj)
        assert np.array_equal(a, b)
        la = np.asarray(nib.load(source / "labelsTr" / f"{cid}.nii.gz").dataobj)
        lb = np.asarray(nib.load(out / "labelsTr" / f"{cid}.nii.gz").dataobj)
        assert np.array_equal(np.rint(la), lb)
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == len(ids) + 4
    assert meta["channel_names"] == json.loads((out / "dataset.json").read_text())["channel_names"]


def test_torchio_loads_output_with_the_same_geometry(generated):
    tio = pytest.importorskip("torchio")
    _, source, _, out = generated
    rec = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    subject = tio.Subject(image=tio.ScalarImage(out / "imagesTr" / f"{rec['case_id']}_0000.nii.gz"),
                          label=tio.LabelMap(out / "labelsTr" / f"{rec['case_id']}.nii.gz"))
    subject.check_consistent_space()  # TorchIO's own check that image and label share one grid
    base = nib.load(source / "labelsTr" / f"{rec['base_case']}.nii.gz")
    assert np.allclose(subject.label.affine, base.affine, atol=1e-4)
    assert subject.label.data.shape[1:] == base.shape
    batch = tio.SubjectsLoader(tio.SubjectsDataset([subject]), batch_size=1)
    assert next(iter(batch))["label"][tio.DATA].shape[2:] == base.shape
