"""NIfTI reading and atomic writing, with fast gzip (isal) when it is installed."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputError

try:  # isal's igzip is ~8x faster than the stdlib at the same level and size
    from isal import igzip as _fast_gzip
    from isal import isal_zlib as _fast_zlib
except ImportError:  # pragma: no cover - exercised where isal is missing
    _fast_gzip = None
    _fast_zlib = None

#: gzip level used for output unless told otherwise (isal supports 0-3).
DEFAULT_COMPRESSION_LEVEL = 1


def has_fast_gzip() -> bool:
    return _fast_gzip is not None


def _decompress(raw: bytes) -> bytes:
    if _fast_gzip is not None:
        return _fast_gzip.decompress(raw)
    return gzip.decompress(raw)


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Read a .nii or .nii.gz fully into memory; raise InputError naming the file if it is unreadable."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = _decompress(raw)
        img = nib.Nifti1Image.from_bytes(raw)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({_short(exc)})") from None
    except Exception as exc:  # isal raises its own error types on truncated data
        raise InputError(f"{path}: not a readable NIfTI file ({_short(exc)})") from None
    return img


def read_array(img: nib.Nifti1Image, path: str | os.PathLike, dtype=np.float32) -> np.ndarray:
    """The image's data (scaling applied) as `dtype`; InputError if the data block is truncated."""
    try:
        return np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:
        raise InputError(f"{path}: cannot read voxel data ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def nifti_bytes(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None,
                dtype) -> bytes:
    """Serialise an image with the given header (copied), affine and on-disk dtype."""
    hdr = header.copy() if header is not None else nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine, header=hdr)
    # keep the header's qform/sform codes; nibabel resets them when an affine is passed
    if header is not None:
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    img.header.set_slope_inter(1.0, 0.0) if np.issubdtype(np.dtype(dtype), np.integer) else None
    return img.to_bytes()


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def gzip_bytes(payload: bytes, level: int = DEFAULT_COMPRESSION_LEVEL) -> bytes:
    """Gzip with a fixed (zero) mtime so the same data always gives the same bytes."""
    if _fast_gzip is not None:
        return _fast_gzip.compress(payload, compresslevel=min(max(level, 0), 3), mtime=0)
    return gzip.compress(payload, compresslevel=level, mtime=0)


def save_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray,
               header: nib.Nifti1Header | None, dtype, compression_level: int = DEFAULT_COMPRESSION_LEVEL) -> None:
    """Write a NIfTI atomically; gzip when the name ends in .gz."""
    payload = nifti_bytes(data, affine, header, dtype)
    if str(path).endswith(".gz"):
        payload = gzip_bytes(payload, compression_level)
    write_bytes_atomic(path, payload)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each stored axis (column norms of the affine)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
