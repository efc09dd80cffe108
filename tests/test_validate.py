"""Dataset validation (`lesionsynth check`): every fault in every case is reported, one line naming the
file and the fault; load_case and build-bank stop with the same message and write nothing."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesionsynth.bank import build_bank
from lesionsynth.errors import InputError
from lesionsynth.io import load_case, open_dataset
from lesionsynth.io.validate import Problem, format_report, validate_dataset

from .conftest import blob_dataset

SHAPE = (16, 14, 12)


# ----------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def ds(tmp_path) -> Path:
    return blob_dataset(tmp_path / "ds", n_cases=3, shape=SHAPE)


def image(ds: Path, case: int = 1, ch: int = 0) -> Path:
    return ds / "imagesTr" / f"case{case}_{ch:04d}.nii.gz"


def label(ds: Path, case: int = 1) -> Path:
    return ds / "labelsTr" / f"case{case}.nii.gz"


def rewrite(path: Path, data=None, affine=None, dtype=None) -> None:
    """Save `path` again with new data and/or affine."""
    img = nib.load(path)
    data = np.asarray(img.dataobj) if data is None else np.asarray(data)
    affine = img.affine if affine is None else affine
    out = nib.Nifti1Image(data.astype(dtype or data.dtype), affine)
    nib.save(out, path)


def raw_nifti(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def patch_header(path: Path, **fields) -> None:
    """Change header fields in place, keeping the data block as it is."""
    raw = raw_nifti(path)
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    for key, value in fields.items():
        hdr[key] = value
    path.write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))


def check(ds, **kwargs) -> list[Problem]:
    _spec, problems = validate_dataset(ds, **kwargs)
    for p in problems:
        text = str(p)
        assert text == f"{p.path}: {p.message}" and "\n" not in text and "Traceback" not in text
    return problems


def assert_reported(problems: list[Problem], path, *words: str) -> Problem:
    """A problem names `path` and its message holds all of `words`."""
    want = Path(path).resolve()
    for p in problems:
        if Path(p.path).resolve() == want and all(w in p.message for w in words):
            return p
    pytest.fail(f"no problem for {path} with {words}; got:\n" + "\n".join(map(str, problems)))


def only(problems: list[Problem], path, *words: str) -> Problem:
    """Exactly one problem, and it is the expected one."""
    assert len(problems) == 1, "\n".join(map(str, problems))
    return assert_reported(problems, path, *words)


def set_meta(ds: Path, **changes) -> None:
    meta = json.loads((ds / "dataset.json").read_text())
    meta.update(changes)
    (ds / "dataset.json").write_text(json.dumps(meta))


def msd_dataset(root: Path, n_cases: int = 3, channels=("T1", "FLAIR")) -> Path:
    """The blob dataset converted to the Medical Segmentation Decathlon layout (4-D images)."""
    src = blob_dataset(root.parent / f"{root.name}_src", n_cases=n_cases, shape=SHAPE, channels=channels)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for k in range(n_cases):
        chans = [nib.load(image(src, k, c)) for c in range(len(channels))]
        data = np.stack([np.asarray(c.dataobj) for c in chans], axis=-1)
        nib.save(nib.Nifti1Image(data, chans[0].affine), root / "imagesTr" / f"case{k}.nii.gz")
        nib.save(nib.load(label(src, k)), root / "labelsTr" / f"case{k}.nii.gz")
        training.append({"image": f"./imagesTr/case{k}.nii.gz", "label": f"./labelsTr/case{k}.nii.gz"})
    meta = {"name": "blobs", "modality": {str(i): n for i, n in enumerate(channels)},
            "labels": {"0": "background", "1": "lesion"}, "numTraining": n_cases, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# ----------------------------------------------------------------------------------------------------
# a sound dataset


def test_valid_dataset_has_no_problem(ds):
    spec, problems = validate_dataset(ds)
    assert problems == []
    report = format_report(spec, problems)
    assert report.startswith("dataset OK: 3 cases, 2 channels")
    assert "lesion" in report and "\n" not in report


def test_valid_msd_dataset_has_no_problem(tmp_path):
    assert check(msd_dataset(tmp_path / "msd")) == []


def test_valid_oblique_multiclass_dataset_has_no_problem(tmp_path):
    ds = blob_dataset(tmp_path / "ds", n_cases=2, shape=SHAPE, oblique=True, multiclass=True)
    assert check(ds, lesion_labels=(2,), region_labels=(1,)) == []


def test_parallel_check_finds_the_same(ds):
    rewrite(image(ds, 0, 1), data=np.zeros(SHAPE, np.float32))
    image(ds, 2, 0).write_bytes(image(ds, 2, 0).read_bytes()[:100])
    assert [str(p) for p in check(ds, jobs=2)] == [str(p) for p in check(ds, jobs=1)]


# ----------------------------------------------------------------------------------------------------
# dataset.json and layout


def test_missing_dataset_json(ds):
    (ds / "dataset.json").unlink()
    spec, problems = validate_dataset(ds)
    assert spec is None
    only(problems, ds / "dataset.json", "missing")
    assert format_report(spec, problems).startswith("1 problem: the dataset cannot be opened")


def test_malformed_dataset_json(ds):
    (ds / "dataset.json").write_text('{"labels": {"background": 0,')
    only(check(ds), ds / "dataset.json", "malformed JSON")


def test_dataset_json_without_labels(ds):
    set_meta(ds, labels={})
    only(check(ds), ds / "dataset.json", "'labels'")


def test_dataset_folder_missing(tmp_path):
    only(check(tmp_path / "nope"), tmp_path / "nope", "no such file")


def test_no_cases_at_all(tmp_path):
    ds = blob_dataset(tmp_path / "ds", n_cases=0, shape=SHAPE)
    only(check(ds), ds, "no cases found")


def test_num_training_mismatch(ds):
    set_meta(ds, numTraining=5)
    only(check(ds), ds / "dataset.json", "numTraining is 5", "3 cases")


def test_msd_num_training_mismatch(tmp_path):
    msd = msd_dataset(tmp_path / "msd")
    meta = json.loads((msd / "dataset.json").read_text())
    meta["numTraining"] = 2
    (msd / "dataset.json").write_text(json.dumps(meta))
    only(check(msd), msd / "dataset.json", "numTraining is 2")


def test_duplicate_case_ids_msd(tmp_path):
    msd = msd_dataset(tmp_path / "msd")
    (msd / "more").mkdir()
    (msd / "more" / "case0.nii.gz").write_bytes((msd / "imagesTr" / "case0.nii.gz").read_bytes())
    meta = json.loads((msd / "dataset.json").read_text())
    meta["training"].append({"image": "./more/case0.nii.gz", "label": "./labelsTr/case1.nii.gz"})
    meta["numTraining"] = 4
    (msd / "dataset.json").write_text(json.dumps(meta))
    only(check(msd), msd / "dataset.json", "same case id", "case0")


def test_duplicate_case_ids_csv_list(ds):
    rows = ["case_id,image_0,image_1,label"]
    for k in (0, 1, 1):
        rows.append(f"c{k},imagesTr/case{k}_0000.nii.gz,imagesTr/case{k}_0001.nii.gz,labelsTr/case{k}.nii.gz")
    (ds / "cases.csv").write_text("\n".join(rows) + "\n")
    only(check(ds / "cases.csv"), ds / "cases.csv", "duplicate case_id", "c1")


def test_missing_label(ds):
    label(ds, 2).unlink()
    only(check(ds), label(ds, 2), "missing label", "case2")


def test_missing_channel(ds):
    image(ds, 1, 1).unlink()
    only(check(ds), image(ds, 1, 1), "missing channel 1", "FLAIR")


def test_extra_channel_file(ds):
    image(ds, 0, 2).write_bytes(image(ds, 0, 1).read_bytes())
    only(check(ds), image(ds, 0, 2), "channel 2 is not declared")


def test_unknown_file_in_images(ds):
    (ds / "imagesTr" / "case0_T1.nii.gz").write_bytes(image(ds, 0, 0).read_bytes())
    only(check(ds), ds / "imagesTr" / "case0_T1.nii.gz", "does not match")


def test_label_with_wrong_ending_and_label_without_images(ds):
    (ds / "labelsTr" / "case0.nii").write_bytes(raw_nifti(label(ds, 0)))
    (ds / "labelsTr" / "case9.nii.gz").write_bytes(label(ds, 0).read_bytes())
    problems = check(ds)
    assert_reported(problems, ds / "labelsTr" / "case0.nii", "does not end in .nii.gz")
    assert_reported(problems, ds / "labelsTr" / "case9.nii.gz", "label without images")
    assert len(problems) == 2


def test_channel_count_differs_between_msd_cases(tmp_path):
    msd = msd_dataset(tmp_path / "msd")
    path = msd / "imagesTr" / "case1.nii.gz"
    data = np.asarray(nib.load(path).dataobj)
    rewrite(path, data=np.concatenate([data, data[..., :1]], axis=-1))
    only(check(msd), path, "expected a 4-D image with 2 channels", "(16, 14, 12, 3)")


# ----------------------------------------------------------------------------------------------------
# unreadable and truncated files


def test_truncated_gzip(ds):
    raw = image(ds).read_bytes()
    image(ds).write_bytes(raw[: len(raw) // 2])
    only(check(ds), image(ds), "truncated gzip")


def test_header_only_file(ds):
    image(ds).write_bytes(gzip.compress(raw_nifti(image(ds))[:352]))
    only(check(ds), image(ds), "only a header")


def test_data_block_shorter_than_header_says(ds):
    raw = raw_nifti(label(ds))
    label(ds).write_bytes(gzip.compress(raw[:-100]))
    only(check(ds), label(ds), "data block is truncated")


def test_data_block_truncated_in_uncompressed_file(tmp_path):
    ds = blob_dataset(tmp_path / "ds", n_cases=2, shape=SHAPE)
    set_meta(ds, file_ending=".nii")
    for f in [*ds.glob("imagesTr/*.nii.gz"), *ds.glob("labelsTr/*.nii.gz")]:
        f.with_name(f.name[:-3]).write_bytes(raw_nifti(f))
        f.unlink()
    bad = ds / "imagesTr" / "case1_0001.nii"
    bad.write_bytes(bad.read_bytes()[:-1])
    only(check(ds), bad, "data block is truncated")


def test_wrong_magic(ds):
    raw = bytearray(raw_nifti(image(ds)))
    raw[344:348] = b"abc\x00"
    image(ds).write_bytes(gzip.compress(bytes(raw)))
    only(check(ds), image(ds), "wrong magic")


def test_not_a_nifti_at_all(ds):
    image(ds).write_bytes(b"this is no image" * 40)
    only(check(ds), image(ds), "not gzip-compressed")
    label(ds).write_bytes(b"")
    assert_reported(check(ds), label(ds), "file is empty")


def test_nifti2_file_is_named(ds):
    img = nib.load(image(ds))
    nib.save(nib.Nifti2Image(np.asarray(img.dataobj), img.affine), image(ds))
    only(check(ds), image(ds), "NIfTI-2")


# ----------------------------------------------------------------------------------------------------
# grids


def test_shape_mismatch(ds):
    data = np.asarray(nib.load(image(ds)).dataobj)
    rewrite(image(ds), data=data[:-1])
    only(check(ds), image(ds), "shape (15, 14, 12) differs from its label case1.nii.gz (16, 14, 12)")


def test_origin_mismatch(ds):
    affine = nib.load(image(ds, 1, 1)).affine.copy()
    affine[0, 3] += 2.5
    rewrite(image(ds, 1, 1), affine=affine)
    only(check(ds), image(ds, 1, 1), "affine differs from its label", "origin off by 2.5 mm")


def test_spacing_mismatch(ds):
    affine = nib.load(image(ds)).affine.copy()
    affine[2, 2] = 3.0
    rewrite(image(ds), affine=affine)
    only(check(ds), image(ds), "affine differs", "voxel spacing")


def test_rotation_mismatch_with_small_voxels(tmp_path):
    """0.1 mm voxels: a 0.3 degree rotation moves no affine entry by 1e-3, but the axes differ."""
    ds = blob_dataset(tmp_path / "ds", n_cases=2, shape=SHAPE, spacing=(0.1, 0.1, 0.1))
    affine = nib.load(image(ds)).affine.copy()
    a = np.radians(0.3)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine[:3, :3] = rot @ affine[:3, :3]
    assert np.allclose(affine, nib.load(label(ds)).affine, atol=1e-3)
    rewrite(image(ds), affine=affine)
    only(check(ds), image(ds), "axis directions differ")


def test_tiny_affine_differences_are_tolerated(ds):
    affine = nib.load(image(ds)).affine.copy()
    affine[:3, 3] += 2e-4
    affine[0, 0] += 1e-5
    rewrite(image(ds), affine=affine)
    assert check(ds) == []


def test_four_d_image_where_3d_expected(ds):
    data = np.asarray(nib.load(image(ds)).dataobj)
    rewrite(image(ds), data=np.stack([data, data], axis=-1))
    only(check(ds), image(ds), "4-D", "expected 3-D")


def test_trailing_singleton_dimension_is_fine(ds):
    data = np.asarray(nib.load(image(ds)).dataobj)
    rewrite(image(ds), data=data[..., None])
    rewrite(label(ds), data=np.asarray(nib.load(label(ds)).dataobj)[..., None])
    assert check(ds) == []


def test_four_d_label(ds):
    data = np.asarray(nib.load(label(ds)).dataobj)
    rewrite(label(ds), data=np.stack([data, data], axis=-1))
    only(check(ds), label(ds), "label must be 3-D")


def test_zero_affine(ds):
    patch_header(image(ds), sform_code=1, srow_x=[0, 0, 0, 0], srow_y=[0, 0, 0, 0], srow_z=[0, 0, 0, 0])
    assert np.allclose(nib.load(image(ds)).affine[:3], 0)
    only(check(ds), image(ds), "affine is not invertible")


def test_degenerate_affine_in_label(ds):
    affine = nib.load(label(ds)).affine.copy()
    affine[:3, 2] = affine[:3, 0]  # two parallel voxel axes
    patch_header(label(ds), sform_code=1, srow_x=affine[0], srow_y=affine[1], srow_z=affine[2])
    only(check(ds), label(ds), "affine is not invertible")


# ----------------------------------------------------------------------------------------------------
# voxel values


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_image_voxels(ds, bad):
    data = np.asarray(nib.load(image(ds, 2, 1)).dataobj).copy()
    data[3, 4, 5] = bad
    data[4, 4, 5] = bad
    rewrite(image(ds, 2, 1), data=data)
    only(check(ds), image(ds, 2, 1), "NaN or infinite", "2 voxels")


def test_non_finite_in_msd_channel_names_the_channel(tmp_path):
    msd = msd_dataset(tmp_path / "msd")
    path = msd / "imagesTr" / "case0.nii.gz"
    data = np.asarray(nib.load(path).dataobj).copy()
    data[1, 1, 1, 1] = np.nan
    rewrite(path, data=data)
    only(check(msd), path, "channel 1 (FLAIR) holds NaN")


def test_non_finite_label(ds):
    data = np.asarray(nib.load(label(ds)).dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    rewrite(label(ds), data=data)
    only(check(ds), label(ds), "label holds NaN or infinite")


def test_non_integer_label(ds):
    data = np.asarray(nib.load(label(ds)).dataobj).astype(np.float32)
    data[0, 0, :2] = 0.5
    rewrite(label(ds), data=data)
    only(check(ds), label(ds), "not integers", "0.5", "2 voxels")


def test_near_integer_float_labels_are_fine(ds):
    data = np.asarray(nib.load(label(ds)).dataobj).astype(np.float64)
    rewrite(label(ds), data=np.where(data == 1, 0.9999999997, data))
    assert check(ds) == []
    assert load_case(open_dataset(ds).cases[1], 2).label.max() == 1


def test_scaled_int16_labels_are_fine(ds):
    data = np.asarray(nib.load(label(ds)).dataobj).astype(np.int16)
    rewrite(label(ds), data=data * 3)
    patch_header(label(ds), scl_slope=np.float32(1 / 3), scl_inter=0)
    values = np.unique(np.asarray(nib.load(label(ds)).dataobj))
    assert not np.all(values == np.rint(values))  # 3 * float32(1/3) is 1.0000000298
    assert check(ds) == []


def test_negative_label(ds):
    data = np.asarray(nib.load(label(ds)).dataobj).astype(np.int16)
    data[0, 0, 0] = -1
    rewrite(label(ds), data=data)
    only(check(ds), label(ds), "negative values (-1)")


def test_label_above_255(ds):
    data = np.asarray(nib.load(label(ds)).dataobj).astype(np.int16)
    data[0, 0, 0] = 300
    rewrite(label(ds), data=data)
    only(check(ds), label(ds), "above 255", "300")


def test_undeclared_label_values_are_listed(ds):
    data = np.asarray(nib.load(label(ds)).dataobj).copy()
    data[0, 0, 0], data[0, 0, 1] = 3, 7
    rewrite(label(ds), data=data)
    only(check(ds), label(ds), "label values 3, 7 are not declared", "declared: 0, 1")


def test_empty_image_channel(ds):
    rewrite(image(ds, 0, 1), data=np.zeros(SHAPE, np.float32))
    only(check(ds), image(ds, 0, 1), "empty (all voxels are 0)")


def test_constant_image_channel(ds):
    rewrite(image(ds, 0, 0), data=np.full(SHAPE, 7.0, np.float32))
    only(check(ds), image(ds, 0, 0), "constant (all voxels are 7)")


def test_label_without_background(ds):
    rewrite(label(ds), data=np.ones(SHAPE, np.uint8))
    only(check(ds), label(ds), "label is 1 everywhere")


def test_complex_voxels_are_refused(ds):
    data = np.asarray(nib.load(image(ds)).dataobj).astype(np.complex64)
    nib.save(nib.Nifti1Image(data, nib.load(label(ds)).affine), image(ds))
    only(check(ds), image(ds), "unsupported voxel type")


# ----------------------------------------------------------------------------------------------------
# labels vs options, lesions in the dataset


def test_lesion_label_not_declared(ds):
    problems = check(ds, lesion_labels=(2,))
    assert_reported(problems, ds / "dataset.json", "lesion label 2 is not declared")
    assert_reported(problems, ds, "no voxel has lesion label(s) 2")


def test_region_label_not_declared(ds):
    only(check(ds, region_labels=(4,)), ds / "dataset.json", "region label 4 is not declared")


def test_background_as_lesion_label(ds):
    assert_reported(check(ds, lesion_labels=(0,)), "--lesion-label", "background")


def test_background_not_declared(ds):
    set_meta(ds, labels={"lesion": 1})
    assert_reported(check(ds), ds / "dataset.json", "background value 0")


def test_no_lesion_in_the_whole_dataset(ds):
    for k in range(3):
        rewrite(label(ds, k), data=np.zeros(SHAPE, np.uint8))
    only(check(ds), ds, "no voxel has lesion label(s) 1", "3 read")


# ----------------------------------------------------------------------------------------------------
# all problems, every case


def test_all_problems_in_all_cases_are_reported(ds):
    raw = image(ds, 0, 0).read_bytes()
    image(ds, 0, 0).write_bytes(raw[: len(raw) // 3])                      # case0: truncated channel 0
    data = np.asarray(nib.load(image(ds, 0, 1)).dataobj).copy()
    data[0, 0, 0] = np.nan
    rewrite(image(ds, 0, 1), data=data)                                     # case0: NaN in channel 1
    lab = np.asarray(nib.load(label(ds, 1)).dataobj).copy()
    lab[0, 0, 0] = 5
    rewrite(label(ds, 1), data=lab)                                         # case1: undeclared label 5
    affine = nib.load(image(ds, 2, 1)).affine.copy()
    affine[1, 3] += 4
    rewrite(image(ds, 2, 1), affine=affine)                                 # case2: origin off
    problems = check(ds)
    assert_reported(problems, image(ds, 0, 0), "truncated gzip")
    assert_reported(problems, image(ds, 0, 1), "NaN")
    assert_reported(problems, label(ds, 1), "label values 5 are not declared")
    assert_reported(problems, image(ds, 2, 1), "origin off by 4 mm")
    assert len(problems) == 4

    report = format_report(validate_dataset(ds)[0], problems)
    lines = report.splitlines()
    assert lines[0] == "4 problems in 3 of 3 cases"
    assert "imagesTr/case0_0000.nii.gz:" in lines and "labelsTr/case1.nii.gz:" in lines
    assert any(line.startswith("  - ") and "origin off by 4 mm" in line for line in lines)


def test_files_of_incomplete_cases_are_checked_too(ds):
    label(ds, 1).unlink()
    raw = image(ds, 1, 0).read_bytes()
    image(ds, 1, 0).write_bytes(raw[:200])
    problems = check(ds)
    assert_reported(problems, label(ds, 1), "missing label")
    assert_reported(problems, image(ds, 1, 0), "truncated gzip")
    assert len(problems) == 2
    assert format_report(open_dataset(ds), problems).splitlines()[0] == "2 problems in 1 of 3 cases"


def test_report_counts_dataset_wide_problems(ds):
    set_meta(ds, numTraining=9)
    rewrite(image(ds, 0, 1), data=np.zeros(SHAPE, np.float32))
    spec, problems = validate_dataset(ds)
    head = format_report(spec, problems).splitlines()[0]
    assert head == "2 problems in 1 of 3 cases (1 of them dataset-wide)"


def test_problem_text_is_one_line():
    p = Problem("/d/x.nii.gz", "bad\nthing\r\nhere")
    assert str(p) == "/d/x.nii.gz: bad | thing | here"
    assert Problem.from_text("/d/a b.nii: broken: really") == Problem("/d/a b.nii", "broken: really")


# ----------------------------------------------------------------------------------------------------
# load_case and build-bank stop with the same message and leave nothing behind


@pytest.mark.parametrize("fault", ["truncated", "nan", "affine", "undeclared", "empty"])
def test_load_case_raises_the_same_one_line_message(ds, fault):
    if fault == "truncated":
        image(ds, 1, 1).write_bytes(gzip.compress(raw_nifti(image(ds, 1, 1))[:-10]))
    elif fault == "nan":
        data = np.asarray(nib.load(image(ds)).dataobj).copy()
        data[1, 1, 1] = np.inf
        rewrite(image(ds), data=data)
    elif fault == "affine":
        affine = nib.load(image(ds)).affine.copy()
        affine[2, 3] -= 1
        rewrite(image(ds), affine=affine)
    elif fault == "undeclared":
        lab = np.asarray(nib.load(label(ds)).dataobj).copy()
        lab[0, 0, 0] = 9
        rewrite(label(ds), data=lab)
    else:
        rewrite(image(ds, 1, 1), data=np.zeros(SHAPE, np.float32))
    (problem,) = check(ds)
    ref = next(r for r in open_dataset(ds).cases if r.case_id == "case1")
    with pytest.raises(InputError) as err:
        load_case(ref, 2)
    assert str(err.value) == str(problem)
    assert "\n" not in str(err.value)


def test_load_case_counts_further_problems(ds):
    rewrite(image(ds, 1, 0), data=np.zeros(SHAPE, np.float32))
    rewrite(image(ds, 1, 1), data=np.zeros(SHAPE, np.float32))
    with pytest.raises(InputError, match=r"empty \(all voxels are 0\) \(and 1 more problem in case case1\)$"):
        load_case(open_dataset(ds).cases[1], 2)


@pytest.mark.parametrize("jobs", [1, 2])
def test_build_bank_stops_and_writes_nothing(ds, tmp_path, jobs):
    raw = raw_nifti(label(ds, 2))
    label(ds, 2).write_bytes(gzip.compress(raw[:-50]))
    out = tmp_path / "bank"
    with pytest.raises(InputError) as err:
        build_bank(ds, out, jobs=jobs, progress=False)
    assert str(err.value).startswith(f"{label(ds, 2)}: data block is truncated")
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert not list(tmp_path.glob(".bank*"))


def test_build_bank_stops_on_undeclared_label_values(ds, tmp_path):
    lab = np.asarray(nib.load(label(ds, 0)).dataobj).copy()
    lab[0, 0, 0] = 4
    rewrite(label(ds, 0), data=lab)
    out = tmp_path / "bank"
    with pytest.raises(InputError, match="label values 4 are not declared"):
        build_bank(ds, out, progress=False)
    assert not out.exists()
