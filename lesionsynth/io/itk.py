"""MetaImage (.mha) and NRRD (.nrrd) files, read through SimpleITK as nnU-Net's SimpleITKIO reads them, and
written with ITK's own header and fast compression.

An image read here becomes an in-memory nibabel image (voxels x fastest, affine voxel -> RAS mm), so the rest
of lesionsynth sees one kind of image whatever the file ending. ITK keeps geometry in LPS (origin, spacing,
direction) and NIfTI in RAS: the two differ by a sign on the first two world axes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputError
from .nifti import _f_order_blocks, _gzip_writer, _PieceWriter, _zlib_compressor, file_access_errors

ITK_ENDINGS = (".mha", ".nrrd")
FORMAT_NAMES = {".mha": "MetaImage", ".nrrd": "NRRD"}
#: LPS <-> RAS: flip the first two world axes
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
#: bytes per voxel of MetaImage element types (to find a truncated data block before ITK does)
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}
_HEADER_PEEK = 1 << 16


def itk_affine(spacing, origin, direction) -> np.ndarray:
    """The 4x4 voxel -> RAS mm affine of an ITK grid (LPS origin, spacing, row-major direction matrix).
    A 2-D grid gets a unit third axis; axes beyond the third (time, channels) are left out."""
    dim = len(spacing)
    d = np.asarray(direction, dtype=np.float64).reshape(dim, dim)
    n = min(dim, 3)
    lps = np.eye(3)
    lps[:n, :n] = d[:n, :n] * np.asarray(spacing, dtype=np.float64)[:n]
    shift = np.zeros(3)
    shift[:n] = np.asarray(origin, dtype=np.float64)[:n]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ lps
    affine[:3, 3] = _LPS_TO_RAS @ shift
    return affine


def itk_geometry(affine) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in ITK's LPS convention of a 3-D voxel -> RAS mm affine."""
    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3]
    spacing = np.sqrt((lps[:, :3] ** 2).sum(axis=0))
    direction = lps[:, :3] / spacing
    return tuple(spacing.tolist()), tuple(lps[:, 3].tolist()), tuple(direction.ravel().tolist())


def _reason(exc: BaseException) -> str:
    """ITK's own reason in one short line: the last line of its message without the source location and the
    '[nrrd] function:' or 'ITK ERROR: Class(0x...):' prefixes."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    text = re.sub(r"^(sitk::ERROR|itk::ERROR|ITK ERROR):\s*", "", text)
    text = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    text = re.sub(r"^\[nrrd\]\s*", "", text)
    return text[:200]


def _header_problem(ending: str, head: bytes, size: int) -> str | None:
    """Why the file cannot be a readable `ending` file, judged from its first bytes and its size (ITK's own
    messages for these faults are misleading, and MetaIO prints to stderr)."""
    if ending == ".nrrd":
        return None if head.startswith(b"NRRD000") else "not a NRRD file (it does not begin with 'NRRD000')"
    fields, offset = {}, 0
    for line in head.split(b"\n"):
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            break
        offset += len(line) + 1
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    if "NDims" not in fields or "ElementDataFile" not in fields:
        return "not a MetaImage file (no 'NDims = ...' and 'ElementDataFile = ...' header)"
    if fields["ElementDataFile"].upper() != "LOCAL":
        return None  # data in another file: ITK reports what is wrong with it
    have = size - offset
    if fields.get("CompressedData", "False") == "True":
        need = int(fields["CompressedDataSize"]) if fields.get("CompressedDataSize", "").isdigit() else 0
    else:
        try:
            dims = [int(v) for v in fields.get("DimSize", "").split()]
            need = int(np.prod(dims, dtype=np.int64)) * _MET_BYTES[fields.get("ElementType", "")] \
                * int(fields.get("ElementNumberOfChannels", "1"))
        except (ValueError, KeyError):
            return None  # let ITK say what is wrong
    if have < need:
        what = "holds only a header, no voxel data" if have <= 0 else "data block is truncated"
        return f"{what} (header says {need} bytes of voxel data, file has {max(have, 0)})"
    return None


def _checked_reader(path: Path):
    """A SimpleITK reader of `path` whose header has been read; InputError naming the file if it cannot be."""
    import SimpleITK as sitk

    ending = path.name[path.name.rfind("."):].lower()
    kind = FORMAT_NAMES.get(ending, "image")
    with file_access_errors(path, kind):
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(_HEADER_PEEK)
    if size == 0:
        raise InputError(f"{path}: file is empty")
    problem = _header_problem(ending, head, size)
    if problem:
        raise InputError(f"{path}: {problem}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("NrrdImageIO" if ending == ".nrrd" else "MetaImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable {kind} file ({_reason(exc)})") from None
    return reader


def _header(dtype) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_xyzt_units("mm", "sec")
    return hdr


def load_itk(path: str | os.PathLike) -> nib.Nifti1Image:
    """Read a .mha or .nrrd file into memory as a nibabel image: voxels (X, Y, Z[, C]) with x fastest, affine
    voxel -> RAS mm, header with the file's voxel type. InputError naming the file if it is unreadable."""
    import SimpleITK as sitk

    path = Path(path)
    reader = _checked_reader(path)
    kind = FORMAT_NAMES.get(path.name[path.name.rfind("."):].lower(), "image")
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable {kind} file ({_reason(exc)})") from None
    data = sitk.GetArrayFromImage(image)  # C order: (Z, Y, X[, C]) for 3-D, (T, Z, Y, X) for 4-D
    if image.GetNumberOfComponentsPerPixel() > 1:
        data = np.moveaxis(data, -1, 0)  # components first, so that .T puts them last
    data = data.T  # (X, Y, Z[, C]): a view, x fastest as in NIfTI
    affine = itk_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    img = nib.Nifti1Image(data, affine, header=_header(data.dtype))
    img.set_qform(affine, code=1)  # scanner, as SimpleITK's own NIfTI writer sets them
    img.set_sform(affine, code=1)
    return img


def itk_info(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray, np.dtype]:
    """(shape, affine, voxel type) of a .mha or .nrrd file from its header alone."""
    import SimpleITK as sitk

    path = Path(path)
    reader = _checked_reader(path)
    shape = tuple(int(n) for n in reader.GetSize())
    if reader.GetNumberOfComponents() > 1:
        shape += (int(reader.GetNumberOfComponents()),)
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    dtype = _PIXEL_DTYPES.get(pixel.replace("vector of ", ""), np.float32)
    return shape, itk_affine(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()), np.dtype(dtype)


_PIXEL_DTYPES = {"8-bit signed integer": np.int8, "8-bit unsigned integer": np.uint8,
                 "16-bit signed integer": np.int16, "16-bit unsigned integer": np.uint16,
                 "32-bit signed integer": np.int32, "32-bit unsigned integer": np.uint32,
                 "64-bit signed integer": np.int64, "64-bit unsigned integer": np.uint64,
                 "32-bit float": np.float32, "64-bit float": np.float64}


#: (MetaImage ElementType, NRRD type) of the voxel types written without SimpleITK, as ITK names them.
_ITK_TYPES = {np.dtype(np.uint8): ("MET_UCHAR", "unsigned char"), np.dtype(np.int8): ("MET_CHAR", "signed char"),
              np.dtype(np.int16): ("MET_SHORT", "short"), np.dtype(np.uint16): ("MET_USHORT", "unsigned short"),
              np.dtype(np.int32): ("MET_INT", "int"), np.dtype(np.uint32): ("MET_UINT", "unsigned int"),
              np.dtype(np.int64): ("MET_LONG_LONG", "long long int"), np.dtype(np.float32): ("MET_FLOAT", "float"),
              np.dtype(np.float64): ("MET_DOUBLE", "double")}


def write_itk(path: Path, data: np.ndarray, affine: np.ndarray, dtype, compression_level: int) -> None:
    """Write a 3-D volume (X, Y, Z) as .mha or .nrrd to `path` (the caller makes it atomic), compressed at
    `compression_level` (0: uncompressed) with isal where it is installed (levels 1-3, as for .nii.gz; the
    stdlib's 1-9 otherwise; `nifti`'s compressors). Equal input gives equal bytes: neither format stores a time
    or a file name. The voxels go to the file or the compressor in blocks, as for NIfTI (no copy of the whole
    image).

    The header is the one ITK's own writers put (`itk_header`), and SimpleITK (as nnU-Net) reads the file
    back; the voxels are compressed here rather than by SimpleITK because its zlib takes about 5x as long as
    isal on an MNI-sized case, which made a .mha/.nrrd run write-bound. A voxel type ITK names differently
    goes through SimpleITK's writer."""
    volume = np.asarray(data, dtype=dtype)
    ending = ".nrrd" if str(path).endswith(".nrrd") else ".mha"
    if volume.ndim != 3 or volume.dtype.newbyteorder("=") not in _ITK_TYPES:
        _write_with_simpleitk(path, volume, affine, ending, compression_level)
        return
    volume = volume.astype(volume.dtype.newbyteorder("<"), copy=False)
    level = int(compression_level)
    with open(path, "wb") as raw:
        fh = _PieceWriter(raw)  # the file gets pieces of at most WRITE_PIECE bytes, as a NIfTI does
        if level <= 0:
            fh.write(itk_header(ending, volume.shape, volume.dtype, affine, False).encode("ascii"))
            for block in _f_order_blocks(volume):  # x fastest, as ITK stores voxels
                fh.write(block)
        elif ending == ".nrrd":  # a gzip stream after the header
            fh.write(itk_header(ending, volume.shape, volume.dtype, affine, True).encode("ascii"))
            stream = _gzip_writer(fh, level)
            for block in _f_order_blocks(volume):
                stream.write(block)
            stream.close()  # the gzip trailer; leaves the file open
        else:  # MetaImage states the compressed size in its header: compress first
            compressor = _zlib_compressor(level)
            pieces = [compressor.compress(block) for block in _f_order_blocks(volume)] + [compressor.flush()]
            size = sum(len(piece) for piece in pieces)
            fh.write(itk_header(ending, volume.shape, volume.dtype, affine, True, size).encode("ascii"))
            for piece in pieces:
                fh.write(piece)


def _number(x: float) -> str:
    return f"{float(x):.17g}"


def itk_header(ending: str, shape, dtype, affine, compressed: bool, compressed_size: int = 0) -> str:
    """The header ITK's MetaImage (.mha, data in the same file) or NRRD writer puts before a 3-D volume of
    `shape` (X, Y, Z) and `dtype` on the voxel -> RAS grid `affine`, for raw voxels or `compressed` ones (zlib
    for MetaImage, whose header states their `compressed_size` in bytes; gzip for NRRD)."""
    spacing, origin, direction = itk_geometry(affine)
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    met_type, nrrd_type = _ITK_TYPES[np.dtype(dtype).newbyteorder("=")]
    if ending == ".nrrd":
        columns = " ".join("(" + ",".join(_number(v) for v in d[:, j] * spacing[j]) + ")" for j in range(3))
        return ("NRRD0004\n# Complete NRRD file format specification at:\n"
                "# http://teem.sourceforge.net/nrrd/format.html\n"
                f"type: {nrrd_type}\ndimension: 3\nspace: left-posterior-superior\n"
                f"sizes: {' '.join(str(int(n)) for n in shape)}\nspace directions: {columns}\n"
                "kinds: domain domain domain\n" + ("endian: little\n" if np.dtype(dtype).itemsize > 1 else "") +
                f"encoding: {'gzip' if compressed else 'raw'}\n"
                f"space origin: ({','.join(_number(v) for v in origin)})\n\n")
    # ITK's orientation code: per voxel axis, the LPS axis it runs closest to and its sign ("RAI": identity)
    letters = (("R", "L"), ("A", "P"), ("I", "S"))
    nearest = np.argmax(np.abs(d), axis=0)
    orientation = "".join(letters[i][int(d[i, j] < 0)] for j, i in enumerate(nearest))
    compression = (f"CompressedData = True\nCompressedDataSize = {int(compressed_size)}\n" if compressed else
                   "CompressedData = False\n")
    return ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n" + compression +
            f"TransformMatrix = {' '.join(_number(v) for v in d.T.ravel())}\n"
            f"Offset = {' '.join(_number(v) for v in origin)}\nCenterOfRotation = 0 0 0\n"
            f"AnatomicalOrientation = {orientation}\n"
            f"ElementSpacing = {' '.join(_number(v) for v in spacing)}\n"
            f"DimSize = {' '.join(str(int(n)) for n in shape)}\nElementType = {met_type}\n"
            "ElementDataFile = LOCAL\n")


def _write_with_simpleitk(path: Path, volume: np.ndarray, affine: np.ndarray, ending: str,
                          compression_level: int) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.T, isVector=False)  # (Z, Y, X) in C order: x fastest, no copy here
    spacing, origin, direction = itk_geometry(affine)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("NrrdImageIO" if ending == ".nrrd" else "MetaImageIO")
    writer.SetFileName(str(path))
    writer.SetUseCompression(compression_level > 0)
    writer.SetCompressionLevel(min(max(int(compression_level), 1), 9))
    writer.Execute(image)
