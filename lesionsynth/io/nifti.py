"""NIfTI reading and atomic writing, with fast gzip (isal) when it is installed."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
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
    """Read a .nii or .nii.gz fully into memory; raise InputError naming the file if it is unreadable.

    The whole file is read and decompressed here and the data block's length is checked against the
    header, so a truncated file fails now, not later when nibabel reads the voxels lazily.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a NIfTI file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({_short(exc)})") from None
    if not raw:
        raise InputError(f"{path}: file is empty")
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = _decompress(raw)
        except Exception as exc:  # gzip/isal raise EOFError, zlib.error, OSError or their own types
            raise InputError(f"{path}: corrupt or truncated gzip data ({_short(exc)})") from None
    elif str(path).endswith(".gz"):
        raise InputError(f"{path}: not gzip-compressed although the name ends in .gz")
    if len(raw) < 348:
        raise InputError(f"{path}: truncated header ({len(raw)} bytes; a NIfTI-1 header has 348)")
    sizeof_hdr = int.from_bytes(raw[:4], "little")
    if 540 in (sizeof_hdr, int.from_bytes(raw[:4], "big")):
        raise InputError(f"{path}: NIfTI-2 files are not supported; convert it to NIfTI-1")
    if raw[344:348] == b"ni1\x00":
        raise InputError(f"{path}: header of a .hdr/.img pair; use a single-file .nii or .nii.gz")
    if raw[344:348] != b"n+1\x00":
        raise InputError(f"{path}: not a NIfTI-1 file (wrong magic {raw[344:348]!r})")
    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            img = nib.Nifti1Image.from_bytes(raw)
    except Exception as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({_short(exc)})") from None
    try:
        hdr = img.header
        n_bytes = int(np.prod(hdr.get_data_shape(), dtype=np.int64)) * hdr.get_data_dtype().itemsize
        offset = max(int(hdr.get_data_offset()), 352)
    except Exception as exc:
        raise InputError(f"{path}: invalid NIfTI header ({_short(exc)})") from None
    if len(raw) < offset + n_bytes:
        have = max(len(raw) - offset, 0)
        what = "holds only a header, no voxel data" if have == 0 else "data block is truncated"
        raise InputError(f"{path}: {what} (header says {n_bytes} bytes of voxel data, file has {have})")
    return img


def read_array(img: nib.Nifti1Image, path: str | os.PathLike, dtype=np.float32) -> np.ndarray:
    """The image's data (scaling applied) as `dtype`; InputError if the data block is truncated.

    When the file already holds `dtype` unscaled, the array is a read-only view of the bytes `load_nifti`
    read (no second copy of the volume in memory); copy it before writing into it.
    """
    view = _unscaled_view(img, dtype)
    if view is not None:
        return view
    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            return np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:
        text = _short(exc)
        if text.startswith("Expected ") and " bytes, got " in text:
            raise InputError(f"{path}: data block is truncated ({text})") from None
        raise InputError(f"{path}: cannot read voxel data ({text})") from None


def _unscaled_view(img: nib.Nifti1Image, dtype) -> np.ndarray | None:
    """The voxels as a view of the in-memory file, or None when scaling or a type change is needed."""
    proxy = img.dataobj
    holder = img.file_map.get("image")
    fileobj = getattr(holder, "fileobj", None)
    if not isinstance(proxy, nib.arrayproxy.ArrayProxy) or not isinstance(fileobj, io.BytesIO):
        return None
    if proxy.slope != 1.0 or proxy.inter != 0.0 or np.dtype(proxy.dtype) != np.dtype(dtype):
        return None
    count = int(np.prod(proxy.shape, dtype=np.int64))
    buffer = fileobj.getvalue()  # the bytes object itself (getbuffer would copy it)
    if len(buffer) < proxy.offset + count * np.dtype(dtype).itemsize:
        return None  # truncated: let nibabel raise its error
    flat = np.frombuffer(buffer, dtype=proxy.dtype, count=count, offset=int(proxy.offset))
    return flat.reshape(proxy.shape, order=proxy.order).view(np.dtype(dtype).newbyteorder("="))


def _short(exc: BaseException) -> str:
    """The first line of an exception's message (never a traceback), at most 200 characters."""
    text = str(exc).strip().splitlines()
    return text[0].strip()[:200] if text and text[0].strip() else type(exc).__name__


def nifti_image(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None,
                dtype) -> nib.Nifti1Image:
    """An image with the given header (copied), affine and on-disk dtype, ready to serialise."""
    hdr = header.copy() if header is not None else nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine, header=hdr)
    # keep the header's qform/sform codes; nibabel resets them when an affine is passed
    if header is not None:
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    img.header.set_slope_inter(1.0, 0.0) if np.issubdtype(np.dtype(dtype), np.integer) else None
    return img


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """An open binary file under a temporary name in `path`'s folder; on success it is flushed, fsynced
    and renamed over `path`, on any error removed (no partial file is ever left under `path`)."""
    path = Path(path)
    tmp = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.tmp{os.getpid()}")
    OPEN_TEMPORARIES.add(tmp)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        OPEN_TEMPORARIES.discard(tmp)


#: Atomic writes go to '.NAME.tmpPID' in the target's folder.
TEMPORARY_PREFIX = "."
#: The temporary files this process is writing now (removed by a worker stopped by a signal).
OPEN_TEMPORARIES: set[Path] = set()


def remove_open_temporaries() -> None:
    """Remove the temporary files this process is writing (a worker being stopped: no partial file left)."""
    for tmp in list(OPEN_TEMPORARIES):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def temporary_owner(name: str) -> int | None:
    """The process id in a temporary file's name ('.NAME.tmpPID'), or None if it is not one."""
    head, sep, pid = name.rpartition(".tmp")
    return int(pid) if sep and head.startswith(TEMPORARY_PREFIX) and pid.isdigit() else None


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over `path`."""
    with atomic_file(path) as fh:
        fh.write(payload)


def _gzip_writer(raw, level: int):
    """A gzip stream onto the open file `raw`: zero mtime and no file name, so equal data gives equal bytes."""
    if _fast_gzip is not None:
        return _fast_gzip.GzipFile(filename="", mode="wb", compresslevel=min(max(level, 0), 3), fileobj=raw,
                                   mtime=0)
    return gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=raw, mtime=0)


def save_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray,
               header: nib.Nifti1Header | None, dtype, compression_level: int = DEFAULT_COMPRESSION_LEVEL) -> None:
    """Write a NIfTI atomically (temporary name, fsync, rename); gzip when the name ends in .gz.

    The voxels stream slice by slice through the compressor into the file, so no serialised or
    compressed copy of the whole image is held in memory.
    """
    img = nifti_image(data, affine, header, dtype)
    with atomic_file(path) as raw:
        stream = _gzip_writer(raw, compression_level) if str(path).endswith(".gz") else raw
        img.to_file_map(img.make_file_map({"image": stream, "header": stream}))
        if stream is not raw:
            stream.close()  # writes the gzip trailer; leaves `raw` open


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each stored axis (column norms of the affine)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
