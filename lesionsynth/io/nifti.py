"""NIfTI reading and atomic writing, with fast gzip (isal) when it is installed."""

from __future__ import annotations

import contextlib
import gzip
import io
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
    """Read a .nii or .nii.gz fully into memory; raise InputError naming the file if it is unreadable.

    The whole file is read and decompressed here and the data block's length is checked against the
    header, so a truncated file fails now, not later when nibabel reads the voxels lazily.
    """
    path = Path(path)
    with file_access_errors(path, "NIfTI"):
        raw = path.read_bytes()
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


@contextlib.contextmanager
def file_access_errors(path: Path, kind: str):
    """Turn a failure to open or read `path` into one InputError line naming it (not found, a folder instead of
    a `kind` file, or the system's reason)."""
    try:
        yield
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a {kind} file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({_short(exc)})") from None


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
    """An open binary file under a temporary name in `path`'s folder (`atomic_path`); on success it is
    flushed, fsynced and renamed over `path`, on any error removed (no partial file is ever left under `path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        yield fh
        fh.flush()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """A temporary path in `path`'s folder, ending in `suffix`, for a writer that opens the file by name (and
    picks its format by the name's ending); on success the file is fsynced and renamed over `path`, on any
    error removed."""
    path = Path(path)
    tmp = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.tmp{os.getpid()}{suffix}")
    OPEN_TEMPORARIES.add(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        OPEN_TEMPORARIES.discard(tmp)


#: Atomic writes go to '.NAME.tmpPID' in the target's folder ('.NAME.tmpPID.mha' where the writer needs the
#: ending).
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
    """The process id in a temporary file's name ('.NAME.tmpPID[.ENDING]'), or None if it is not one."""
    head, sep, pid = name.rpartition(".tmp")
    pid = pid.partition(".")[0]
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


def _zlib_compressor(level: int):
    """A zlib compressor (`compressobj`) at `level`: isal's (0-3) where it is installed, else the stdlib's."""
    if _fast_zlib is not None:
        return _fast_zlib.compressobj(min(max(level, 0), 3))
    return zlib.compressobj(min(max(level, 0), 9))


def save_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray,
               header: nib.Nifti1Header | None, dtype, compression_level: int = DEFAULT_COMPRESSION_LEVEL) -> None:
    """Write a NIfTI atomically (temporary name, fsync, rename); gzip when the name ends in .gz.

    The header is nibabel's. Voxels that it would write unchanged (the on-disk type, no scaling) go to the
    compressor straight from the array in blocks of WRITE_BLOCK bytes; other data goes through nibabel,
    slice by slice. Either way no serialised or compressed copy of the whole image is held in memory.
    """
    img = nifti_image(data, affine, header, dtype)
    gz = str(path).endswith(".gz")
    head = _header_block(img)
    with atomic_file(path) as raw:
        if head is None:
            stream = _gzip_writer(raw, compression_level) if gz else raw
            img.to_file_map(img.make_file_map({"image": stream, "header": stream}))
        else:
            pieces = _PieceWriter(raw)
            stream = _gzip_writer(pieces, compression_level) if gz else pieces
            stream.write(head)
            for block in _f_order_blocks(np.asarray(img.dataobj)):
                stream.write(block)
        if gz:
            stream.close()  # writes the gzip trailer; leaves `raw` open


#: Bytes handed to the compressor at a time. nibabel writes one slice per call (~190 calls of 0.2 MB for an
#: MNI-sized channel), and every call lets go of and takes back the interpreter lock: a case written in a
#: background thread slowed the lesion work running beside it by 33-40 %, in blocks of 2 MB by 18-23 %.
WRITE_BLOCK = 2 << 20
#: Largest single write to the file: writes of 2 MB cost the kernel four times the system time of 256 kB
#: writes of the same bytes (0.065 against 0.018 s per MNI-sized case, measured on Linux/ext4).
WRITE_PIECE = 256 << 10


class _PieceWriter:
    """Writes to an open binary file in pieces of at most WRITE_PIECE bytes."""

    def __init__(self, raw):
        self.raw = raw

    def write(self, payload) -> int:
        view = memoryview(payload).cast("B")
        for start in range(0, len(view), WRITE_PIECE):
            self.raw.write(view[start:start + WRITE_PIECE])
        return len(view)

    def flush(self) -> None:
        self.raw.flush()


class _DataReached(Exception):
    """nibabel has written the whole header and begins the voxels (`_HeaderCapture`)."""


class _HeaderCapture(io.RawIOBase):
    """A write-only file that keeps what nibabel writes before the voxels: it seeks to the data offset (past
    the 348-byte header) once the header and its extensions are written; its first write after that is
    stopped."""

    def __init__(self):
        super().__init__()
        self.head = bytearray()
        self.at_data = False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return len(self.head)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset < len(self.head):
            raise OSError("only forward seeks")
        self.head.extend(bytes(offset - len(self.head)))
        self.at_data = offset >= 348
        return len(self.head)

    def write(self, payload) -> int:
        if self.at_data:
            raise _DataReached
        self.head.extend(payload)
        return len(payload)


def _header_block(img: nib.Nifti1Image) -> bytes | None:
    """What nibabel writes before the voxels (header, extensions, padding), when it would write the voxels
    as they are in memory (on-disk type = array type, no scaling); else None."""
    data = np.asarray(img.dataobj)
    capture = _HeaderCapture()
    try:
        img.to_file_map(img.make_file_map({"image": capture, "header": capture}))
    except _DataReached:
        pass
    else:  # no voxels at all
        return None
    hdr = nib.Nifti1Header(bytes(capture.head[:348]))  # the header as written (type, scaling, offset)
    if hdr.get_data_dtype() != data.dtype or hdr.get_slope_inter() not in ((None, None), (1.0, 0.0)) \
            or int(hdr.get_data_offset()) != len(capture.head):
        return None
    return bytes(capture.head)


def _f_order_blocks(data: np.ndarray):
    """The array's bytes in Fortran order, in pieces of about WRITE_BLOCK bytes (views where the array is
    Fortran-ordered already, else copies of slabs along the last axis)."""
    if data.flags.f_contiguous:
        flat = memoryview(data.reshape(-1, order="F").view(np.uint8))
        for start in range(0, len(flat), WRITE_BLOCK):
            yield flat[start:start + WRITE_BLOCK]
        return
    slab = data[..., :1].nbytes if data.ndim else data.nbytes
    step = max(1, WRITE_BLOCK // max(slab, 1))
    for start in range(0, data.shape[-1] if data.ndim else 1, step):
        yield np.asfortranarray(data[..., start:start + step]).reshape(-1, order="F").view(np.uint8)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each stored axis (column norms of the affine)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
