"""Output layouts (lesionsynth.io.layout): paths, finished-case files, folders and the choice by format.

Whole runs in each layout are tested in test_pipeline.py and test_bids.py."""

from __future__ import annotations

import json
import pickle

import pytest

from lesionsynth.errors import InputError
from lesionsynth.io.layout import BidsLayout, NnunetLayout, TestsetLayout, output_layout

CHANNELS = ("T1", "FLAIR")
BINARY = {"background": 0, "lesion": 1}
RUN = {"bank": "/nowhere", "lesionsynth_version": "0", "config": {"load": "high", "mode": "both", "seed": 3}}


def _rel(paths, root):
    return [p.relative_to(root).as_posix() for p in paths]


def test_output_layout_picks_the_format(tmp_path):
    assert type(output_layout("nnunet", tmp_path, CHANNELS, BINARY)) is NnunetLayout
    assert type(output_layout("bids", tmp_path, CHANNELS, BINARY)) is BidsLayout
    with pytest.raises(InputError, match="--format 'tiff': choose one of nnunet, bids"):
        output_layout("tiff", tmp_path, CHANNELS, BINARY)


def test_nnunet_paths_and_files(tmp_path):
    layout = output_layout("nnunet", tmp_path, CHANNELS, BINARY, ".nii")
    images, label = layout.case_paths("syn00003")
    assert _rel(images, tmp_path) == ["imagesTr/syn00003_0000.nii", "imagesTr/syn00003_0001.nii"]
    assert _rel([label], tmp_path) == ["labelsTr/syn00003.nii"]
    assert layout.case_paths("ATLAS_001", original=True)[1].name == "ATLAS_001.nii"
    assert layout.case_files("syn00003") == images + [label]
    assert not (tmp_path / "imagesTr").exists()  # case_paths and case_files create nothing
    layout.prepare()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagesTr", "labelsTr"]
    assert set(layout.folders()) == {tmp_path, tmp_path / "imagesTr", tmp_path / "labelsTr"}


def test_testset_paths_carry_channel_suffixes(tmp_path):
    layout = TestsetLayout(tmp_path, CHANNELS, BINARY)
    images, label = layout.case_paths("case_7")
    assert _rel(images, tmp_path) == ["imagesTs/case_7_0000.nii.gz", "imagesTs/case_7_0001.nii.gz"]
    assert _rel([label], tmp_path) == ["labelsTs/case_7.nii.gz"]
    layout.prepare()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagesTs", "labelsTs"]
    layout.write_final([{"case_id": "case_7", "factor": "noise", "level": 2, "measured_value": 1.5}], [])
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["numTraining"] == 0 and meta["file_ending"] == ".nii.gz" and meta["channel_names"]["1"] == "FLAIR"
    assert (tmp_path / "strata.csv").read_text() == "case_id,factor,level,value\ncase_7,noise,2,1.5\n"


def test_bids_case_files_include_sidecars(tmp_path):
    layout = output_layout("bids", tmp_path, CHANNELS, BINARY)
    images, label = layout.case_paths("ATLAS_001", original=True)
    assert _rel(images + [label], tmp_path) == ["sub-ATLAS001/anat/sub-ATLAS001_T1w.nii.gz",
                                                "sub-ATLAS001/anat/sub-ATLAS001_FLAIR.nii.gz",
                                                "sub-ATLAS001/anat/sub-ATLAS001_desc-lesion_mask.nii.gz"]
    files = layout.case_files("ATLAS_001", original=True)
    assert files[:3] == images + [label]
    assert [p.name for p in files[3:]] == ["sub-ATLAS001_T1w.json", "sub-ATLAS001_FLAIR.json",
                                           "sub-ATLAS001_desc-lesion_mask.json"]
    layout.prepare_case("ATLAS_001", original=True)
    assert layout.folders() == [tmp_path, tmp_path / "sub-ATLAS001" / "anat"]


def test_bids_refuses_case_ids_that_share_a_subject(tmp_path):
    layout = output_layout("bids", tmp_path, CHANNELS, BINARY)
    with pytest.raises(InputError, match="sub-ATLAS001"):
        layout.check_case_ids(["ATLAS_001", "ATLAS001"])
    output_layout("nnunet", tmp_path, CHANNELS, BINARY).check_case_ids(["ATLAS_001", "ATLAS001"])
    assert not list(tmp_path.iterdir())


def test_nnunet_dataset_json_lists_labels_by_value(tmp_path):
    layout = output_layout("nnunet", tmp_path, CHANNELS, {"lesion": 1, "background": 0}, run=RUN)
    layout.write_final([{"case_id": "syn00000"}], ["ATLAS_001", "ATLAS_002"])
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    assert list(dataset["labels"]) == ["background", "lesion"]
    assert dataset["channel_names"] == {"0": "T1", "1": "FLAIR"}
    assert dataset["numTraining"] == 3
    assert "(load 'high', mode 'both', seed 3) + 2 originals" in dataset["description"]


def test_a_layout_travels_to_workers(tmp_path):
    layout = output_layout("bids", tmp_path, CHANNELS, BINARY, run=RUN)
    copy = pickle.loads(pickle.dumps(layout))
    assert type(copy) is BidsLayout and copy.case_paths("syn00001") == layout.case_paths("syn00001")

