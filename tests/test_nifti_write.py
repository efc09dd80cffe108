"""save_nifti writes what nibabel writes: the same header and voxels, in blocks where nibabel needs no conversion."""

from __future__ import annotations

import errno
import gzip

import nibabel as nib
import numpy as np
import pytest

import lesionsynth.io.nifti as nifti

AFFINE = np.array([[1.2, 0.0, 0.1, -90.0], [0.0, 0.9, 0.0, 100.0], [0.0, 0.05, 2.0, 5.0], [0.0, 0.0, 0.0, 1.0]])


def _nibabel_save(path, data, affine, header, dtype):
    """The reference: nibabel's own writer on the same image, uncompressed."""
    img = nifti.nifti_image(data, affine, header, dtype)
    with open(path, "wb") as fh:
        img.to_file_map(img.make_file_map({"image": fh, "header": fh}))


def _cases():
    rng = np.random.default_rng(0)
    f32 = rng.normal(size=(37, 41, 29)).astype(np.float32)
    f32[0, 0, 0], f32[1, 0, 0] = np.nan, np.inf
    i16 = (rng.normal(size=(37, 41, 29)) * 100).astype(np.int16)
    int_header = nib.Nifti1Header()
    int_header.set_data_dtype(np.int16)
    int_header["descrip"] = b"scanner"
    scaled = nib.Nifti1Header()
    scaled.set_data_dtype(np.int16)
    scaled.set_slope_inter(2.0, 5.0)
    big_endian = nib.Nifti1Header(endianness=">")
    big_endian.set_data_dtype(np.float32)
    with_extension = nib.Nifti1Header()
    with_extension.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment extension"))
    channels = np.asfortranarray(rng.normal(size=(2, 37, 41, 29)).astype(np.float32))
    return {
        "float32 F-ordered": (np.asfortranarray(f32), None, np.float32, True),
        "float32 C-ordered": (np.ascontiguousarray(f32), None, np.float32, True),
        "channel of a (C, X, Y, Z) case": (channels[1], None, np.float32, True),
        "int16 with its header": (np.asfortranarray(i16), int_header, np.int16, True),
        "float32 on a scaled int16 header": (np.asfortranarray(f32), scaled, np.float32, True),
        "int16 on a scaled header": (np.asfortranarray(i16), scaled, np.int16, True),
        "big-endian header (nibabel converts)": (np.asfortranarray(f32), big_endian, np.float32, False),
        "header extension": (np.asfortranarray(f32), with_extension, np.float32, True),
        "uint8 label": (np.asfortranarray((f32 > 1).astype(np.uint8)), None, np.uint8, True),
        "4-D": (np.asfortranarray(rng.normal(size=(5, 6, 7, 3)).astype(np.float32)), None, np.float32, True),
    }


CASES = _cases()


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
@pytest.mark.parametrize("name", list(CASES))
def test_same_bytes_as_nibabel(tmp_path, monkeypatch, name, ending):
    data, header, dtype, in_blocks = CASES[name]
    monkeypatch.setattr(nifti, "WRITE_BLOCK", 1000)  # many blocks, and slabs of a C-ordered array
    reference, written = tmp_path / "ref.nii", tmp_path / f"out{ending}"
    _nibabel_save(reference, data, AFFINE, header, dtype)
    nifti.save_nifti(written, data, AFFINE, header, dtype)
    raw = written.read_bytes()
    assert (gzip.decompress(raw) if ending == ".nii.gz" else raw) == reference.read_bytes()
    assert (nifti._header_block(nifti.nifti_image(data, AFFINE, header, dtype)) is not None) == in_blocks
    back = nib.load(written)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data.astype(back.get_data_dtype()))


def test_stdlib_gzip_writes_the_same_voxels(tmp_path, monkeypatch):
    data, header, dtype, _ = CASES["float32 F-ordered"]
    monkeypatch.setattr(nifti, "_fast_gzip", None)
    reference, written = tmp_path / "ref.nii", tmp_path / "out.nii.gz"
    _nibabel_save(reference, data, AFFINE, header, dtype)
    nifti.save_nifti(written, data, AFFINE, header, dtype)
    assert gzip.decompress(written.read_bytes()) == reference.read_bytes()


def test_writes_reach_the_file_in_small_pieces(tmp_path, monkeypatch):
    sizes = []
    real_writer = nifti._PieceWriter.write

    def spy(self, payload):
        real = self.raw.write

        def record(piece):
            sizes.append(len(piece))
            return real(piece)

        self.raw.write = record
        try:
            return real_writer(self, payload)
        finally:
            self.raw.write = real

    monkeypatch.setattr(nifti._PieceWriter, "write", spy)
    data = np.asfortranarray(np.random.default_rng(1).normal(size=(64, 64, 128)).astype(np.float32))  # 2 MiB
    nifti.save_nifti(tmp_path / "a.nii", data, AFFINE, None, np.float32)
    assert sizes and max(sizes) <= nifti.WRITE_PIECE and sum(sizes) == (tmp_path / "a.nii").stat().st_size


def test_failed_block_write_leaves_no_file(tmp_path, monkeypatch):
    data, header, dtype, _ = CASES["float32 F-ordered"]
    monkeypatch.setattr(nifti, "WRITE_BLOCK", 1000)
    calls = {"n": 0}
    real_write = nifti._PieceWriter.write

    def failing(self, payload):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, payload)

    monkeypatch.setattr(nifti._PieceWriter, "write", failing)
    with pytest.raises(OSError, match="No space"):
        nifti.save_nifti(tmp_path / "out.nii", data, AFFINE, header, dtype)
    assert list(tmp_path.iterdir()) == []
