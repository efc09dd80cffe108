"""Writing cases and metadata of an nnU-Net v2 raw output dataset."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np

from ..errors import LesionsynthError
from .dataset import Case
from .images import NIFTI_ENDINGS, save_image
from .nifti import atomic_file, write_bytes_atomic


def image_dtype(header) -> np.dtype:
    """On-disk dtype for an output channel: the base channel's integer dtype when it is unscaled, else float32."""
    dtype = np.dtype(header.get_data_dtype())
    slope, inter = header.get_slope_inter()
    unscaled = slope in (None, 1.0) and inter in (None, 0.0)
    if dtype.kind in "iu" and unscaled:
        return dtype
    return np.dtype(np.float32)


def case_paths(out: Path, case_id: str, n_channels: int, ending: str, images_folder: str = "imagesTr",
               labels_folder: str = "labelsTr") -> tuple[list[Path], Path]:
    """(image paths, label path) of a case in nnU-Net's naming: {case}_{XXXX}{ending} and {case}{ending}."""
    images = [out / images_folder / f"{case_id}_{c:04d}{ending}" for c in range(n_channels)]
    return images, out / labels_folder / f"{case_id}{ending}"


class WriteError(LesionsynthError):
    """Writing an output file failed (disk full, permissions): nothing partial is left behind."""


def write_case(out: Path, case_id: str, channels: np.ndarray, label: np.ndarray, base: Case,
               ending: str = ".nii.gz", compression_level: int = 1, paths=None, file_threads: int = 1) -> None:
    """Write all channels then the label, each atomically, with the base case's affine and headers.

    `paths` = (image paths, label path) from the run's layout (io/layout.py); default the nnU-Net layout.
    `file_threads` > 1 writes that many files at once (compression lets go of the interpreter lock), for a
    write nothing else runs beside."""
    images, label_path = paths or case_paths(out, case_id, channels.shape[0], ending)
    try:
        _write_case_files(images, label_path, channels, label, base, compression_level, file_threads)
    except OSError as exc:
        raise WriteError(f"{exc.filename or out}: cannot write ({exc.strerror or exc}); free the space or fix "
                         f"the folder, then rerun with --resume") from None


def stored_values(data: np.ndarray, dtype) -> np.ndarray:
    """Channel values as `dtype` holds them: rounded and clipped to an integer type's range, else cast."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(data), info.min, info.max).astype(dtype)
    return np.asarray(data).astype(dtype, copy=False)


def _write_case_files(images, label_path, channels, label, base, compression_level, file_threads: int = 1
                      ) -> None:
    def channel(c: int) -> None:
        dtype = image_dtype(base.channel_headers[c])
        save_image(images[c], stored_values(channels[c], dtype), base.affine, base.channel_headers[c], dtype,
                   compression_level)

    def label_file() -> None:
        save_image(label_path, label, base.affine, base.label_header, np.uint8, compression_level)

    writes = [functools.partial(channel, c) for c in range(len(images))] + [label_file]
    if file_threads <= 1:
        for write in writes:
            write()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(file_threads, len(writes)), thread_name_prefix="lesionsynth-file") as pool:
        done = [pool.submit(write) for write in writes]
    for future in done:  # every file finished (or removed its temporary) before an error is raised
        future.result()


def copy_original(out: Path, case: Case, image_paths, ending: str = ".nii.gz", compression_level: int = 1,
                  paths=None) -> None:
    """Put an original case into the output: copy 3-D NIfTI image files as they are (a .mha/.nrrd file may name a
    data file beside it, and takes the run's compression), rewrite the label as uint8."""
    try:
        _copy_original_files(out, case, image_paths, ending, compression_level, paths)
    except OSError as exc:
        raise WriteError(f"{exc.filename or out}: cannot write ({exc.strerror or exc}); free the space or fix "
                         f"the folder, then rerun with --resume") from None


def _copy_original_files(out: Path, case: Case, image_paths, ending: str, compression_level: int, paths) -> None:
    images, label_path = paths or case_paths(out, case.case_id, case.channels.shape[0], ending)
    same_files = ending in NIFTI_ENDINGS and len(image_paths) == len(images) \
        and all(str(p).endswith(ending) for p in image_paths)
    for c, dst in enumerate(images):
        if same_files and len(case.channel_headers[c].get_data_shape()) == 3:
            with atomic_file(dst) as fh, open(image_paths[c], "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)
        else:
            dtype = image_dtype(case.channel_headers[c])
            save_image(dst, case.channels[c], case.affine, case.channel_headers[c], dtype, compression_level)
    save_image(label_path, case.label, case.affine, case.label_header, np.uint8, compression_level)


def write_json(path: Path, data) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
