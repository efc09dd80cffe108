"""Image files in every ending nnU-Net v2 reads for 3-D data: NIfTI (.nii.gz, .nii) through nibabel, MetaImage
(.mha) and NRRD (.nrrd) through SimpleITK. Every image lesionsynth reads or writes goes through here.

Whatever the ending, an image is a nibabel image in memory (voxels x fastest, affine voxel -> RAS mm), so a
case's arrays, affine and header look the same to everything else; a written file keeps the world geometry
it was given.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import InputError
from .itk import ITK_ENDINGS, itk_info, load_itk, write_itk
from .nifti import DEFAULT_COMPRESSION_LEVEL, atomic_path, load_nifti, save_nifti

NIFTI_ENDINGS = (".nii.gz", ".nii")
#: the file endings read and written, in nnU-Net's spelling (".nii.gz" before ".nii" so that it matches first)
IMAGE_ENDINGS = NIFTI_ENDINGS + ITK_ENDINGS


def image_ending(name: str | os.PathLike) -> str | None:
    """The image file ending of a file name (".nii.gz", ".nii", ".mha", ".nrrd"), or None for any other file."""
    text = Path(name).name
    return next((end for end in IMAGE_ENDINGS if text.endswith(end)), None)


def strip_ending(name: str) -> str:
    """A file name without its image ending (unchanged if it has none)."""
    end = image_ending(name)
    return name[: -len(end)] if end else name


def _ending_or_error(path: Path) -> str:
    end = image_ending(path)
    if end is None:
        raise InputError(f"{path}: not an image file name (use one of {', '.join(IMAGE_ENDINGS)})")
    return end


def load_image(path: str | os.PathLike):
    """Read an image file fully into memory as a nibabel image; InputError naming the file if it is unreadable."""
    path = Path(path)
    if _ending_or_error(path) in ITK_ENDINGS:
        return load_itk(path)
    return load_nifti(path)


def image_info(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray, np.dtype]:
    """(shape, affine voxel -> RAS mm, voxel type) of an image file, from its header alone."""
    path = Path(path)
    if _ending_or_error(path) in ITK_ENDINGS:
        return itk_info(path)
    import nibabel as nib

    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            img = nib.load(str(path))
        return tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64), img.get_data_dtype()
    except Exception as exc:  # nibabel raises several types for unreadable headers
        first = str(exc).strip().splitlines()
        raise InputError(f"{path}: not a readable NIfTI file ({first[0][:200] if first else type(exc).__name__})"
                         ) from None


def save_image(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, header, dtype,
               compression_level: int = DEFAULT_COMPRESSION_LEVEL) -> None:
    """Write a 3-D volume atomically in the format its name ends in. NIfTI keeps `header` (nibabel's; None: a
    new one); .mha/.nrrd store only voxels and geometry (zlib at `compression_level`, 0: uncompressed)."""
    path = Path(path)
    ending = _ending_or_error(path)
    if ending in ITK_ENDINGS:
        with atomic_path(path, ending) as tmp:
            write_itk(tmp, data, affine, dtype, compression_level)
    else:
        save_nifti(path, data, affine, header, dtype, compression_level)


def common_ending(paths) -> str:
    """The image ending most of `paths` have (".nii.gz" if none has one): a bank's source format."""
    counts = Counter(e for e in (image_ending(p) for p in paths) if e)
    return max(IMAGE_ENDINGS, key=lambda e: counts[e]) if counts else ".nii.gz"  # a tie: the first


def output_ending(requested: str | None, source: str, *, uncompressed: bool = False,
                  nifti_only: bool = False) -> str:
    """The ending of written images: `requested` (--file-ending) if given, else the source dataset's.
    `uncompressed` turns .nii.gz into .nii (.mha/.nrrd stay, written without zlib); `nifti_only` (BIDS) refuses
    a requested non-NIfTI ending and turns a .mha/.nrrd source into NIfTI."""
    if requested is not None and requested not in IMAGE_ENDINGS:
        raise InputError(f"--file-ending {requested!r}: choose one of {', '.join(IMAGE_ENDINGS)}")
    if nifti_only and requested is not None and requested not in NIFTI_ENDINGS:
        raise InputError(f"--file-ending {requested}: --format bids writes NIfTI only (.nii.gz or .nii)")
    if uncompressed and requested == ".nii.gz":
        raise InputError("--uncompressed and --file-ending .nii.gz contradict each other (use --file-ending .nii)")
    ending = requested or source
    if nifti_only and ending not in NIFTI_ENDINGS:
        ending = ".nii.gz"
    return ".nii" if uncompressed and ending == ".nii.gz" else ending
