"""A case's files read or written several at once (the first read and the last write of a --jobs 1 run,
which have no lesion work beside them): the same arrays, the same bytes, the same one-line errors, and no
temporary file left by a failed write."""

from __future__ import annotations

import errno
import gzip
import threading

import numpy as np
import pytest

from lesionsynth.errors import InputError
from lesionsynth.io import load_case, open_dataset
from lesionsynth.io import nifti
from lesionsynth.io.output import WriteError, write_case
from lesionsynth.parallel import overlapped

from .conftest import blob_dataset


def _output(out):
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    return out


@pytest.fixture
def refs(tmp_path):
    ds = blob_dataset(tmp_path / "ds", n_cases=2, channels=("T1", "FLAIR", "T2"), shape=(20, 18, 16))
    return ds, open_dataset(ds).cases


def test_reading_the_files_at_once_gives_the_same_case(refs):
    _, cases = refs
    for ref in cases:
        one, three = load_case(ref, 3), load_case(ref, 3, file_threads=3)
        assert np.array_equal(one.channels, three.channels) and one.channels.strides == three.channels.strides
        assert np.array_equal(one.label, three.label) and np.array_equal(one.affine, three.affine)
        assert [h.binaryblock for h in one.channel_headers] == [h.binaryblock for h in three.channel_headers]
        assert one.label_header.binaryblock == three.label_header.binaryblock


def test_reading_the_files_at_once_reports_a_bad_file_as_one_by_one(refs):
    ds, cases = refs
    bad = ds / "imagesTr" / f"{cases[0].case_id}_0001.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    messages = []
    for threads in (1, 3):
        with pytest.raises(InputError) as err:
            load_case(cases[0], 3, file_threads=threads)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and str(bad) in messages[0] and "truncated" in messages[0]


def test_writing_the_files_at_once_gives_the_same_bytes(refs, tmp_path):
    _, cases = refs
    case = load_case(cases[0], 3)
    written = []
    for threads in (1, 3):
        out = _output(tmp_path / f"out{threads}")
        write_case(out, "c0", case.channels, case.label, case, file_threads=threads)
        written.append({p.relative_to(out): gzip.decompress(p.read_bytes()) for p in sorted(out.rglob("*.gz"))})
    assert len(written[0]) == 4 and written[0] == written[1]


def test_a_failed_write_among_several_leaves_no_temporary_file(refs, tmp_path, monkeypatch):
    _, cases = refs
    case = load_case(cases[0], 3)
    real = nifti._PieceWriter.write
    lock, calls = threading.Lock(), {"n": 0}

    def failing(self, payload):
        with lock:
            calls["n"] += 1
            fail = calls["n"] == 3
        if fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, payload)

    monkeypatch.setattr(nifti._PieceWriter, "write", failing)
    out = _output(tmp_path / "out")
    with pytest.raises(WriteError, match="No space"):
        write_case(out, "c0", case.channels, case.label, case, file_threads=3)
    assert not [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".nii.gz")]


@pytest.mark.parametrize("n", [1, 2, 5])
def test_overlapped_uses_the_first_read_and_the_last_write_once(n):
    calls = []

    def tag(name):
        return lambda x: calls.append((name, x)) or x

    out = list(overlapped(range(n), tag("read"), lambda x: x * 10, tag("write"),
                          first_read=tag("first read"), last_write=tag("last write")))
    assert out == [10 * i for i in range(n)]
    reads = sorted(c for c in calls if "read" in c[0])
    writes = sorted((x, name) for name, x in calls if "write" in name)
    assert ("first read", 0) in reads and [x for _, x in reads] == list(range(n))
    assert [x for x, _ in writes] == [10 * i for i in range(n)]
    assert writes[-1][1] == "last write" and all(name == "write" for _, name in writes[:-1])
    assert all(name == "read" for name, x in reads if x != 0)
