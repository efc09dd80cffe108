"""Every file ending nnU-Net v2 reads for 3-D images (.nii.gz, .nii, .mha, .nrrd): the real brain sample in
each, read with the same geometry (checked against SimpleITK's own NIfTI conversion), written back unchanged,
through build-bank -> generate -> nnU-Net's verifier, bytes repeatable, scored, and bad files named."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesionsynth.bank import Bank, build_bank
from lesionsynth.errors import InputError
from lesionsynth.io.images import IMAGE_ENDINGS, image_info, load_image, output_ending, save_image
from lesionsynth.io.nifti import temporary_owner
from lesionsynth.pipeline import GenerateConfig, generate

from .conftest import blob_dataset

ITK = (".mha", ".nrrd")


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lesionsynth.cli", *map(str, args)], capture_output=True, text=True)


def sitk_copy(src: Path, dst: Path) -> None:
    """`src` rewritten by SimpleITK alone (its own NIfTI reader and .mha/.nrrd writers), metadata left out."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(src))
    for key in img.GetMetaDataKeys():
        img.EraseMetaData(key)
    sitk.WriteImage(img, str(dst), useCompression=True)


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def brains(real_data, tmp_path_factory) -> dict[str, Path]:
    """The real brain_t1c sample (4 cases, every second voxel in-plane: 128x128x~24) as one nnU-Net dataset per
    file ending: .nii.gz and .nii written by nibabel, .mha and .nrrd converted from them by SimpleITK."""
    source = real_data / "brain_t1c"
    root = tmp_path_factory.mktemp("formats")
    meta = json.loads((source / "dataset.json").read_text())
    out = {}
    for ending in IMAGE_ENDINGS:
        ds = root / f"ds{ending.replace('.', '_')}"
        for sub in ("imagesTr", "labelsTr"):
            (ds / sub).mkdir(parents=True)
            for f in sorted((source / sub).glob("*.nii.gz")):
                name = f.name[: -len(".nii.gz")]
                if ending in ITK:
                    sitk_copy(root / "ds_nii_gz" / sub / f"{name}.nii.gz", ds / sub / f"{name}{ending}")
                else:
                    nib.save(nib.load(f).slicer[::2, ::2, :], ds / sub / f"{name}{ending}")
        (ds / "dataset.json").write_text(json.dumps({**meta, "file_ending": ending}))
        out[ending] = ds
    return out


@pytest.fixture(scope="session")
def banks(brains, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("format_banks")
    return {e: build_bank(ds, root / f"bank{e.replace('.', '_')}", progress=False) for e, ds in brains.items()}


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("ending", ITK)
def test_itk_files_read_as_their_nifti_originals(brains, ending):
    for nii in files(brains[".nii.gz"]):
        if not nii.name.endswith(".nii.gz"):
            continue
        other = brains[ending] / nii.parent.name / nii.name.replace(".nii.gz", ending)
        ref, img = nib.load(nii), load_image(other)
        data = np.asarray(img.dataobj)
        assert data.dtype == ref.get_data_dtype() and data.shape == ref.shape
        assert np.array_equal(data, np.asarray(ref.dataobj))
        assert np.allclose(img.affine, ref.affine, atol=1e-6), (other, img.affine, ref.affine)
        shape, affine, dtype = image_info(other)
        assert shape == ref.shape and dtype == ref.get_data_dtype() and np.allclose(affine, ref.affine, atol=1e-6)


@pytest.mark.parametrize("name", ["brain1_label", "breast1_image", "lung1_label"])
def test_the_source_nrrd_files_read_as_their_nifti_conversion(real_data, name):
    """pyradiomics' own NRRD files (LAS and LPS grids), against fetch_data's SimpleITK conversion to NIfTI."""
    img, ref = load_image(real_data / "raw" / "pyradiomics" / f"{name}.nrrd"), nib.load(
        real_data / "raw" / "pyradiomics_nii" / f"{name}.nii.gz")
    assert np.array_equal(np.asarray(img.dataobj), np.asarray(ref.dataobj))
    assert np.allclose(img.affine, ref.affine, atol=1e-6)


@pytest.mark.parametrize("ending", ITK)
def test_oblique_geometry_agrees_with_simpleitk_nifti(tmp_path, ending):
    """A rotated, flipped grid written here and converted to NIfTI by SimpleITK has nibabel's affine: LPS and
    RAS are converted the right way round."""
    ds = blob_dataset(tmp_path / "ds", n_cases=1, shape=(20, 18, 16), oblique=True)
    ref = nib.load(ds / "labelsTr" / "case0.nii.gz")
    written = tmp_path / f"x{ending}"
    save_image(written, np.asarray(ref.dataobj), ref.affine, ref.header, np.uint8)
    sitk_copy(written, tmp_path / "back.nii.gz")
    back = nib.load(tmp_path / "back.nii.gz")
    assert np.allclose(back.affine, ref.affine, atol=1e-5)
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(ref.dataobj))
    # a world point maps to the same voxel through either file
    point = np.array([3.0, -7.5, 12.0, 1.0])
    assert np.allclose(np.linalg.inv(load_image(written).affine) @ point, np.linalg.inv(ref.affine) @ point,
                       atol=1e-6)


@pytest.mark.parametrize("ending", IMAGE_ENDINGS)
def test_round_trip_keeps_voxels_type_and_geometry(brains, tmp_path, ending):
    for path in (brains[ending] / "imagesTr" / f"brain1_0000{ending}", brains[ending] / "labelsTr" /
                 f"brain2{ending}"):
        img = load_image(path)
        data = np.asarray(img.dataobj)
        again = tmp_path / path.name
        save_image(again, data, img.affine, img.header, data.dtype)
        back = load_image(again)
        assert np.array_equal(np.asarray(back.dataobj), data) and np.asarray(back.dataobj).dtype == data.dtype
        assert np.allclose(back.affine, img.affine, rtol=0, atol=1e-9)
        save_image(again, np.ascontiguousarray(data), img.affine, img.header, data.dtype)  # any memory order
        assert np.array_equal(np.asarray(load_image(again).dataobj), data)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary left


@pytest.mark.parametrize("ending", ITK)
def test_compression_follows_the_level(brains, tmp_path, ending):
    img = load_image(brains[ending] / "imagesTr" / f"brain1_0000{ending}")
    data = np.asarray(img.dataobj)
    sizes = {}
    for level in (0, 1):
        path = tmp_path / f"l{level}{ending}"
        save_image(path, data, img.affine, None, data.dtype, compression_level=level)
        sizes[level] = path.stat().st_size
        assert np.array_equal(np.asarray(load_image(path).dataobj), data)
    assert sizes[0] > data.nbytes > sizes[1]


@pytest.mark.parametrize("ending", ITK)
def test_written_headers_are_itks_own_on_every_axis_order_and_flip(tmp_path, ending):
    """The .mha/.nrrd writer puts the header ITK's own writer puts (every field but the compressed size, for all
    48 axis orders and flips of a slightly rotated grid, 1- and 4-byte voxels), and SimpleITK reads back the
    same voxels and geometry as from SimpleITK's own file."""
    import itertools

    import SimpleITK as sitk

    from lesionsynth.io.itk import _write_with_simpleitk, write_itk

    def header_lines(path):
        head = path.read_bytes().split(b"ElementDataFile = LOCAL\n")[0].split(b"\n\n")[0]
        return [line for line in head.split(b"\n") if not line.startswith(b"CompressedDataSize")]

    rng = np.random.default_rng(0)
    ours, theirs = tmp_path / f"ours{ending}", tmp_path / f"theirs{ending}"
    for order, signs in itertools.product(itertools.permutations(range(3)), itertools.product((1, -1), repeat=3)):
        axes = np.zeros((3, 3))
        axes[list(order), [0, 1, 2]] = signs
        turn = rng.uniform(-0.3, 0.3)
        rotation = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]])
        affine = np.eye(4)
        affine[:3, :3] = rotation @ axes @ np.diag(rng.uniform(0.7, 3.0, 3))
        affine[:3, 3] = rng.uniform(-100, 100, 3)
        for dtype, level in ((np.uint8, 1), (np.float32, 0)):
            data = (rng.random((6, 5, 4)) * 100).astype(dtype)
            write_itk(ours, data, affine, dtype, level)
            _write_with_simpleitk(theirs, data, affine, ending, level)
            assert header_lines(ours) == header_lines(theirs), (order, signs, dtype)
            a, b = sitk.ReadImage(str(ours)), sitk.ReadImage(str(theirs))
            assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
            assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection(), a.GetPixelID()) == \
                (b.GetSpacing(), b.GetOrigin(), b.GetDirection(), b.GetPixelID())
            assert np.allclose(load_image(ours).affine, affine, atol=1e-9)
    # a voxel type ITK's writers name otherwise still goes through SimpleITK
    write_itk(ours, np.ones((3, 3, 3), dtype=np.uint64), np.eye(4), np.uint64, 1)
    assert np.asarray(load_image(ours).dataobj).dtype == np.uint64


@pytest.mark.parametrize("ending", ITK)
@pytest.mark.parametrize("isal", [True, False])
def test_itk_files_are_written_in_blocks_with_or_without_isal(tmp_path, monkeypatch, ending, isal):
    """Many blocks of a C-ordered array (slabs), through isal's compressors or the stdlib's: SimpleITK reads the
    voxels back, and the same input gives the same bytes."""
    import SimpleITK as sitk

    from lesionsynth.io import nifti
    from lesionsynth.io.itk import write_itk

    monkeypatch.setattr(nifti, "WRITE_BLOCK", 1000)
    if not isal:
        monkeypatch.setattr(nifti, "_fast_gzip", None)
        monkeypatch.setattr(nifti, "_fast_zlib", None)
    data = np.random.default_rng(0).normal(100, 20, (30, 20, 10)).astype(np.float32)
    first, again = tmp_path / f"a{ending}", tmp_path / f"b{ending}"
    for path in (first, again):
        write_itk(path, data, np.diag([1.0, 1.5, 2.0, 1.0]), np.float32, 1)
    assert first.read_bytes() == again.read_bytes()
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(first))).T, data)


def test_temporary_names_with_an_ending_have_an_owner():
    assert temporary_owner(".syn_0000_0000.mha.tmp4242.mha") == 4242
    assert temporary_owner(".syn_0000.nii.gz.tmp17") == 17
    assert temporary_owner("syn_0000.mha") is None


def test_output_ending_rules():
    assert output_ending(None, ".mha") == ".mha"
    assert output_ending(".nrrd", ".nii.gz") == ".nrrd"
    assert output_ending(None, ".nii.gz", uncompressed=True) == ".nii"
    assert output_ending(None, ".mha", uncompressed=True) == ".mha"
    assert output_ending(None, ".mha", nifti_only=True) == ".nii.gz"
    for bad in ((".png", ".nii.gz", {}), (".mha", ".nii.gz", {"nifti_only": True}),
                (".nii.gz", ".mha", {"uncompressed": True})):
        with pytest.raises(InputError):
            output_ending(bad[0], bad[1], **bad[2])


# ------------------------------------------------------------------------------------------------ bad files


@pytest.mark.parametrize("ending,damage,message", [
    (".mha", "truncate", "data block is truncated"),
    (".mha", "header", "holds only a header, no voxel data"),
    (".nrrd", "truncate", "not a readable NRRD file"),
    (".nrrd", "garbage", "not a NRRD file"),
    (".mha", "garbage", "not a MetaImage file"),
    (".mha", "empty", "file is empty"),
])
def test_a_bad_file_is_one_line_naming_it(brains, tmp_path, ending, damage, message):
    ds = tmp_path / "ds"
    shutil.copytree(brains[ending], ds)
    bad = ds / "labelsTr" / f"brain2{ending}"
    raw = bad.read_bytes()
    head = raw.find(b"ElementDataFile = LOCAL\n") + len("ElementDataFile = LOCAL\n") if ending == ".mha" else 0
    bad.write_bytes({"truncate": raw[:-300], "header": raw[:head], "garbage": b"not an image\n" * 10,
                     "empty": b""}[damage])
    res = cli("build-bank", ds, "--out", tmp_path / "bank")
    assert res.returncode == 2
    lines = [line for line in res.stderr.strip().splitlines() if "%|" not in line]  # not the progress bar
    assert len(lines) == 1, res.stderr
    assert str(bad) in lines[0] and message in lines[0], lines[0]
    assert not (tmp_path / "bank").exists()
    from lesionsynth.io.validate import validate_dataset

    _, problems = validate_dataset(ds)  # what `lesionsynth check` reports
    assert [(p.path, message in p.message) for p in problems] == [(str(bad), True)], problems


def test_a_grid_mismatch_between_mha_files_is_named(brains, tmp_path):
    import SimpleITK as sitk

    ds = tmp_path / "ds"
    shutil.copytree(brains[".mha"], ds)
    moved = ds / "imagesTr" / "brain1_0000.mha"
    img = sitk.ReadImage(str(moved))
    img.SetOrigin(tuple(np.add(img.GetOrigin(), (0.0, 2.0, 0.0))))
    sitk.WriteImage(img, str(moved), useCompression=True)
    with pytest.raises(InputError, match=r"brain1_0000\.mha: affine differs from its label brain1\.mha "
                                         r"\(origin off by 2 mm"):
        build_bank(ds, tmp_path / "bank", progress=False)


# ------------------------------------------------------------------------------------------------ end to end


def _verify(out: Path) -> str:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        verify_dataset_integrity(str(out), num_processes=1)
    return buffer.getvalue()


def _md5s(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.md5(p.read_bytes()).hexdigest()
            for sub in ("imagesTr", "labelsTr") for p in sorted((out / sub).iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("ending", [".nii", ".mha", ".nrrd"])
def test_generate_keeps_the_ending_and_nnunet_accepts_it(banks, brains, tmp_path, ending):
    cfg = GenerateConfig(n=2, load="high", seed=1, folds=2)
    out = tmp_path / "out"
    generate(banks[ending], out, cfg, progress=False)
    assert json.loads((out / "dataset.json").read_text())["file_ending"] == ending
    written = [p.name for sub in ("imagesTr", "labelsTr") for p in (out / sub).iterdir()]
    assert len(written) == 2 * (4 + 2) and all(name.endswith(ending) for name in written)
    if ending == ".nii":
        assert all(not name.endswith(".nii.gz") for name in written)
    text = _verify(out)
    assert "verify_dataset_integrity Done" in text and "Error" not in text and "Warning" not in text, text
    # a synthetic case is on its base case's grid, read through the same layer
    rec = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    shape, affine, dtype = image_info(out / "labelsTr" / f"{rec['case_id']}{ending}")
    base_shape, base_affine, _ = image_info(brains[ending] / "labelsTr" / f"{rec['base_case']}{ending}")
    assert shape == base_shape and np.allclose(affine, base_affine, atol=1e-6) and dtype == np.uint8
    assert image_info(out / "imagesTr" / f"{rec['case_id']}_0000{ending}")[2] == np.int16
    if ending == ".mha":  # the QC report reads the written files through the same layer
        from lesionsynth.report import write_report

        assert Path(write_report(out, n_examples=1)).is_file()
    # same seed, same bytes
    again = tmp_path / "again"
    generate(banks[ending], again, cfg, progress=False)
    assert _md5s(out) == _md5s(again)


@pytest.mark.slow
@pytest.mark.parametrize("ending", ITK)
def test_lesions_have_the_same_world_position_in_every_format(banks, ending):
    ref, other = Bank(banks[".nii.gz"]), Bank(banks[ending])
    assert len(ref.lesions) == len(other.lesions) > 0
    for a, b in zip(ref.lesions, other.lesions):
        assert a["source_case"] == b["source_case"] and a["voxels"] == b["voxels"]
        assert np.allclose(a["centroid_mm"], b["centroid_mm"], atol=1e-4), (a["centroid_mm"], b["centroid_mm"])
    assert np.allclose(ref.likelihood()[0], other.likelihood()[0], atol=1e-6)


@pytest.mark.slow
def test_file_ending_option_and_uncompressed(banks, tmp_path):
    res = cli("generate", banks[".nii.gz"], "--out", tmp_path / "a", "--n", "1", "--load", "high",
              "--file-ending", ".mha", "--no-include-originals")
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (tmp_path / "a" / "labelsTr").iterdir()] == ["syn00000.mha"]
    res = cli("generate", banks[".mha"], "--out", tmp_path / "b", "--n", "1", "--load", "high", "--uncompressed",
              "--no-include-originals")
    assert res.returncode == 0, res.stderr
    head = (tmp_path / "b" / "imagesTr" / "syn00000_0000.mha").read_bytes()[:400]
    assert b"CompressedData = False" in head
    res = cli("generate", banks[".mha"], "--out", tmp_path / "c", "--n", "1", "--load", "high", "--format", "bids",
              "--file-ending", ".mha")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "--format bids writes NIfTI only" in res.stderr and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_score_reads_mha_predictions(brains, tmp_path):
    from lesionsynth.score import ScoreConfig, score_predictions

    # truth in NIfTI, predictions as .mha (nnUNetv2_predict on a .mha dataset): the same labels score 1
    result = score_predictions(brains[".mha"] / "labelsTr", brains[".nii.gz"], tmp_path / "s",
                               ScoreConfig(n_resamples=20))
    assert len(result.rows) == 4 and all(r["dice"] == 1 for r in result.rows)
    res = cli("score", brains[".nrrd"] / "labelsTr", brains[".mha"], "--out", tmp_path / "t", "--bootstrap", "20")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["overall"]["dice"]["mean"] == 1


@pytest.mark.slow
def test_testset_on_mha(banks, tmp_path):
    res = cli("testset", banks[".mha"], "--out", tmp_path / "ts", "--vary", "load", "--levels", "2",
              "--per-level", "1", "--test-cases", "brain1,brain2")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "ts" / "dataset.json").read_text())["file_ending"] == ".mha"
    assert sorted(p.name for p in (tmp_path / "ts" / "labelsTs").iterdir()) == ["load00_0000.mha",
                                                                                 "load01_0000.mha"]
    res = cli("score", tmp_path / "ts" / "labelsTs", tmp_path / "ts", "--out", tmp_path / "s", "--bootstrap", "20")
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("ending", ITK)
def test_torchio_reads_a_bank_case_from_its_itk_files(brains, banks, ending):
    """TorchIO reads .mha/.nrrd through SimpleITK with its own LPS -> RAS conversion: the sample is the bank
    case, recognised by its grid and voxels alone (no file names)."""
    tio = pytest.importorskip("torchio")
    from lesionsynth.transforms import LesionMix

    read = tio.Subject(t1=tio.ScalarImage(brains[ending] / "imagesTr" / f"brain1_0000{ending}"),
                       seg=tio.LabelMap(brains[ending] / "labelsTr" / f"brain1{ending}"))
    assert np.allclose(read.t1.affine, Bank(banks[ending]).case_info("brain1")["affine"], atol=1e-6)
    anonymous = tio.Subject(t1=tio.ScalarImage(tensor=read.t1.data, affine=read.t1.affine),
                            seg=tio.LabelMap(tensor=read.seg.data, affine=read.seg.affine))
    out = LesionMix(banks[ending], load="high", seed=0, case_index=0)(anonymous)
    assert out.applied_transforms[-1][1]["plan"]["base_case"] == "brain1"
