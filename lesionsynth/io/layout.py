"""Output layouts of `generate`: where a run puts its case files, what it writes beside them, and which
dataset-level files it writes at the end.

A run picks its layout once (`output_layout`) and asks it every question that depends on the output
format; a new format is a new subclass of `OutputLayout` here, nothing in the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .._version import __version__
from ..errors import InputError
from . import bids
from .nifti import write_bytes_atomic
from .output import case_paths, write_json

CasePaths = tuple[list[Path], Path]  # (one image path per channel, label path)


@dataclass(frozen=True)
class OutputLayout:
    """The files of one output folder. Subclasses say where a case's files go (`case_paths`) and add
    what their format needs beside them; every other method has a sensible default."""

    out: Path
    channel_names: tuple[str, ...]
    labels: dict  # label name -> value, in the bank's order
    ending: str = ".nii.gz"
    run: dict = field(default_factory=dict)  # the run record (run.json): source bank, version, configuration

    def case_paths(self, case_id: str, original: bool = False) -> CasePaths:
        """(image paths, label path) of a case; `original`: a case copied from the source. Creates nothing."""
        raise NotImplementedError

    def check_case_ids(self, case_ids) -> None:
        """Refuse (InputError) case ids this layout cannot name; called before anything is written."""

    def prepare(self) -> None:
        """Create the layout's fixed folders inside the output folder (which exists by then)."""

    def prepare_case(self, case_id: str, original: bool = False) -> CasePaths:
        """The paths of a case about to be written, their folders created."""
        images, label = self.case_paths(case_id, original)
        for path in images + [label]:
            path.parent.mkdir(parents=True, exist_ok=True)
        return images, label

    def write_case_extras(self, case_id: str, record: dict | None) -> None:
        """Write what belongs beside a written case's images and label; `record` None: an original case."""

    def case_files(self, case_id: str, original: bool = False) -> list[Path]:
        """Every file of a finished case: a case missing one of them is not done."""
        images, label = self.case_paths(case_id, original)
        return images + [label]

    def folders(self) -> list[Path]:
        """The folders files are written into (where a killed run may leave temporary files)."""
        return [self.out]

    def write_final(self, records: list[dict], original_ids: list[str]) -> None:
        """Write the dataset-level files once every case is in place."""

    def sorted_labels(self) -> dict:
        """The labels ordered by value, as dataset-level files list them."""
        return dict(sorted(self.labels.items(), key=lambda kv: kv[1]))


class NnunetLayout(OutputLayout):
    """nnU-Net v2 raw dataset: imagesTr/{case}_{XXXX}{ending}, labelsTr/{case}{ending} and dataset.json."""

    images_folder = "imagesTr"
    labels_folder = "labelsTr"

    def case_paths(self, case_id: str, original: bool = False) -> CasePaths:
        return case_paths(self.out, case_id, len(self.channel_names), self.ending, self.images_folder,
                          self.labels_folder)

    def prepare(self) -> None:
        (self.out / self.images_folder).mkdir(exist_ok=True)
        (self.out / self.labels_folder).mkdir(exist_ok=True)

    def folders(self) -> list[Path]:
        return [self.out / self.images_folder, self.out / self.labels_folder, self.out]

    def write_final(self, records: list[dict], original_ids: list[str]) -> None:
        write_json(self.out / "dataset.json", self.dataset_json(records, original_ids))

    def dataset_json(self, records: list[dict], original_ids: list[str]) -> dict:
        """nnU-Net's dataset.json of the finished dataset."""
        conf = self.run["config"]
        return {
            "channel_names": {str(i): name for i, name in enumerate(self.channel_names)},
            "labels": self.sorted_labels(),
            "numTraining": len(original_ids) + len(records),
            "file_ending": self.ending,
            "description": f"lesionsynth {__version__}: {len(records)} synthetic cases (load '{conf['load']}', "
                           f"mode '{conf['mode']}', seed {conf['seed']})"
                           + (f" + {len(original_ids)} originals" if original_ids else ""),
        }


class TestsetLayout(NnunetLayout):
    """A controlled test set (`lesionsynth testset`): imagesTs/{case}_{XXXX}{ending} and labelsTs/{case}{ending}
    for nnU-Net's predictor, and at the end dataset.json and strata.csv (from each case's record: its
    `factor`, `level` index and `measured_value`, the factor measured on the written case)."""

    __test__ = False  # a pytest collecting "Test*" names must not take this for a test class
    images_folder = "imagesTs"
    labels_folder = "labelsTs"

    def write_final(self, records: list[dict], original_ids: list[str]) -> None:
        write_json(self.out / "dataset.json", self.dataset_json(records, original_ids))
        write_bytes_atomic(self.out / STRATA_FILE, strata_csv(records).encode())

    def dataset_json(self, records: list[dict], original_ids: list[str]) -> dict:
        """dataset.json of test cases (no training cases), with the factor and its nominal levels."""
        conf = self.run.get("config", {})
        return {
            "channel_names": {str(i): name for i, name in enumerate(self.channel_names)},
            "labels": self.sorted_labels(),
            "numTraining": 0,
            "numTest": len(records),
            "file_ending": self.ending,
            "description": f"lesionsynth {__version__}: controlled test set, {len(records)} cases varying "
                           f"{conf.get('factor')!r} over {len(conf.get('levels', []))} levels (seed "
                           f"{conf.get('seed')})",
            "testset": {"factor": conf.get("factor"), "levels": conf.get("levels"),
                        "test_cases": conf.get("test_cases")},
        }


STRATA_FILE = "strata.csv"
STRATA_COLUMNS = ("case_id", "factor", "level", "value")


def strata_csv(records: list[dict]) -> str:
    """strata.csv of a test set: `case_id,factor,level,value`, one row per case, in record order."""
    rows = [",".join(STRATA_COLUMNS)]
    for rec in records:
        rows.append(f"{rec['case_id']},{rec['factor']},{rec['level']},{rec['measured_value']:.6g}")
    return "\n".join(rows) + "\n"


class BidsLayout(OutputLayout):
    """BIDS derivative dataset (io/bids.py): subject folders, a JSON sidecar per file, BIDS metadata."""

    def case_paths(self, case_id: str, original: bool = False) -> CasePaths:
        return bids.bids_case_paths(self.out, case_id, list(self.channel_names), self.ending, labels=self.labels,
                                    original=original)

    def check_case_ids(self, case_ids) -> None:
        bids.subject_labels(case_ids)

    def write_case_extras(self, case_id: str, record: dict | None) -> None:
        bids.write_sidecars(self.out, case_id, list(self.channel_names), record, self.run, labels=self.labels,
                            ending=self.ending)

    def case_files(self, case_id: str, original: bool = False) -> list[Path]:
        files = super().case_files(case_id, original)
        return files + [bids.sidecar_path(p) for p in files]

    def folders(self) -> list[Path]:
        return [self.out, *self.out.glob("sub-*/*")]

    def write_final(self, records: list[dict], original_ids: list[str]) -> None:
        bids.write_bids_metadata(self.out, self.run, records, original_ids, list(self.channel_names),
                                 self.sorted_labels())


#: format name (generate --format) -> layout
LAYOUTS = {"nnunet": NnunetLayout, "bids": BidsLayout}


def output_layout(fmt: str, out: str | Path, channel_names, labels: dict, ending: str = ".nii.gz",
                  run: dict | None = None) -> OutputLayout:
    """The layout of output format `fmt` for the output folder `out`; `run` is the run record (run.json)."""
    if fmt not in LAYOUTS:
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[fmt](Path(out), tuple(channel_names), dict(labels), ending, dict(run or {}))
