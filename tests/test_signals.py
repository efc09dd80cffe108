"""Stopping a run: signals to the parent (SIGTERM as a cluster scheduler sends it, SIGINT, SIGKILL), workers
that die or cannot start, and the lock that keeps two writers of one shard apart. Real processes, real data."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lesionsynth.errors import InputError, LesionsynthError
from lesionsynth.parallel import Runner, process_alive, writer_lock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers: Linux")

CLI = [sys.executable, "-m", "lesionsynth.cli"]


@pytest.fixture(scope="module")
def bank(real_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signals") / "bank"
    subprocess.run([*CLI, "build-bank", str(real_data / "mni_lesions"), "--out", str(out), "--jobs", "2"],
                   check=True, capture_output=True)
    return out


def generate_cmd(bank: Path, out: Path, *extra: str, jobs: int = 2) -> list[str]:
    return [*CLI, "generate", str(bank), "--out", str(out), "--n", "12", "--load", "high", "--seed", "3",
            "--jobs", str(jobs), *extra]


@pytest.fixture(scope="module")
def uninterrupted(bank, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signals") / "reference"
    subprocess.run(generate_cmd(bank, out), check=True, capture_output=True)
    return out


def children(pid: int) -> list[int]:
    """Child process ids of `pid` (from /proc)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def start_and_wait_for_progress(cmd: list[str], out: Path, workers_wanted: int = 2
                                ) -> tuple[subprocess.Popen, list[int]]:
    """Start a run and wait until its workers run and it has written at least one synthetic case."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while time.monotonic() < deadline:
        workers = children(proc.pid) or workers
        logs = list((out / ".progress").glob("*.jsonl")) if (out / ".progress").is_dir() else []
        if len(workers) >= workers_wanted and any(p.stat().st_size for p in logs):
            return proc, workers
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run never got going")


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if process_alive(p) and not _zombie(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*.tmp*")]


def same_output(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and ".progress" not in p.parts)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and ".progress" not in p.parts)
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def resume_gives_the_uninterrupted_bytes(bank: Path, out: Path, uninterrupted: Path) -> None:
    done = subprocess.run(generate_cmd(bank, out, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    same_output(out, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_run_and_its_workers_and_resume_gives_the_same_bytes(sig, bank, uninterrupted, tmp_path):
    out = tmp_path / "out"
    proc, workers = start_and_wait_for_progress(generate_cmd(bank, out), out)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 128 + sig
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by {signal.Signals(sig).name}: ") and "--resume" in last, err
    assert "Traceback" not in err
    assert wait_gone(workers, 10) == []
    assert temporaries(out) == []
    resume_gives_the_uninterrupted_bytes(bank, out, uninterrupted)


@pytest.mark.slow
def test_sigterm_at_jobs_1_lets_the_overlapped_io_finish_and_resume_gives_the_same_bytes(bank, uninterrupted,
                                                                                        tmp_path):
    """At --jobs 1 the next case is read and the last one written in threads (`pipeline.overlapped_cases`):
    a signal stops the run within seconds, the file in progress is finished (no temporary), and --resume
    gives the bytes of an uninterrupted --jobs 2 run."""
    out = tmp_path / "out"
    proc, _ = start_and_wait_for_progress(generate_cmd(bank, out, jobs=1), out, workers_wanted=0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 128 + signal.SIGTERM
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM: ") and "--resume" in last, err
    assert "Traceback" not in err
    assert temporaries(out) == []
    resume_gives_the_uninterrupted_bytes(bank, out, uninterrupted)


@pytest.mark.slow
def test_workers_end_when_the_parent_is_killed(bank, uninterrupted, tmp_path):
    out = tmp_path / "out"
    proc, workers = start_and_wait_for_progress(generate_cmd(bank, out), out)
    proc.kill()
    proc.communicate(timeout=30)
    assert wait_gone(workers, 10) == []  # they noticed their parent is gone
    assert temporaries(out) == []  # stopped by SIGTERM (the parent-death signal), each removed its own
    resume_gives_the_uninterrupted_bytes(bank, out, uninterrupted)


def test_spawned_workers_end_when_the_parent_is_killed(tmp_path):
    """Spawned workers (CUDA, or where forking is unsafe) notice a SIGKILLed parent too, mid-call."""
    (tmp_path / "spawn_helper.py").write_text(
        "import os, time\n\n"
        "def pid_then_sleep(i):\n"
        "    open(f'worker-{os.getpid()}', 'w').close()\n"
        "    time.sleep(120)\n")
    script = ("import sys; sys.path.insert(0, '.')\n"
              "from lesionsynth.parallel import Runner\n"
              "from spawn_helper import pid_then_sleep\n"
              "if __name__ == '__main__':\n"
              "    list(Runner(2, fork=False).map(pid_then_sleep, [(i,) for i in range(4)]))\n")
    (tmp_path / "run.py").write_text(script)
    proc = subprocess.Popen([sys.executable, "run.py"], cwd=tmp_path)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("worker-*"))) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.05)
    workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
    assert len(workers) == 2
    proc.kill()
    proc.wait(timeout=10)
    assert wait_gone(workers, 10) == []


@pytest.mark.slow
def test_a_second_writer_of_the_same_shard_is_refused(bank, uninterrupted, tmp_path):
    out = tmp_path / "out"
    subprocess.run(generate_cmd(bank, out, "--shard", "0/2"), check=True, capture_output=True)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with writer_lock(out / ".progress" / "shard-0000-of-0002.lock", "test"):  # as a running writer holds it
        second = subprocess.run(generate_cmd(bank, out, "--resume", "--shard", "0/2"), capture_output=True,
                                text=True)
        other_shard = subprocess.run(generate_cmd(bank, out, "--shard", "1/2"), capture_output=True, text=True)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: {out} (--shard 0/2) is being written by another process (pid {os.getpid()}); wait for it to end "
        f"or stop it first"]
    assert other_shard.returncode == 0, other_shard.stderr  # shards of one run still run side by side
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if ".progress" not in p.parts
               and p.name not in {"manifest.jsonl", "dataset.json", "splits_final.json", "run.json"}), \
        "first shard rewritten"
    same_output(out, uninterrupted)


def test_writers_of_another_shard_count_are_refused(bank, tmp_path):
    """Case i is in shard i mod n: a writer of another shard count would write the same cases as the running
    ones. Refused with one line, nothing written; the same count is let in (its shard lock does the rest)."""
    from lesionsynth.parallel import shard_count_lock

    out = tmp_path / "out"
    subprocess.run(generate_cmd(bank, out, "--shard", "0/2"), check=True, capture_output=True)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with shard_count_lock(out / ".progress" / "shards.lock", 2, "test"):  # as a running writer of 2 shards
        other_count = subprocess.run(generate_cmd(bank, out, "--resume", "--shard", "1/3"), capture_output=True,
                                     text=True)
        whole = subprocess.run(generate_cmd(bank, out, "--resume"), capture_output=True, text=True)
        assert other_count.returncode == whole.returncode == 2
        for res in (other_count, whole):
            assert res.stderr.strip().splitlines() == [
                f"error: {out} is being written in a different number of shards by another process; shards of "
                f"one run use the same --shard count (wait for it to end or stop it first)"]
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.json"} == \
            {p: t for p, t in before.items() if p.name != "run.json"}  # run.json: rewritten, the same bytes
        same_count = subprocess.run(generate_cmd(bank, out, "--resume", "--shard", "1/2"), capture_output=True,
                                    text=True)
        assert same_count.returncode == 0, same_count.stderr  # the other shard of the same count completes it
    with shard_count_lock(out / ".progress" / "shards.lock", 3, "test"):  # the claim went with its holder
        pass


def test_writer_lock_is_released_with_its_holder(tmp_path):
    lock = tmp_path / "x.lock"
    with writer_lock(lock, "x"):
        with pytest.raises(InputError, match="x is being written by another process"):
            with writer_lock(lock, "x"):  # another open file description: refused, as for another process
                pass
    with writer_lock(lock, "x"):
        pass


def _sleepy(i: int) -> int:
    time.sleep(0.3)
    return i


def _fails(i: int) -> int:
    raise ValueError(f"bad case {i}")


def test_a_killed_worker_is_reported_with_its_signal():
    runner = Runner(2, fork=True)
    results = runner.map(_sleepy, [(i,) for i in range(8)])
    next(results)
    os.kill(runner.worker_pids()[0], signal.SIGKILL)
    with pytest.raises(LesionsynthError, match=r"worker process \d+ was killed by SIGKILL"):
        list(results)
    runner.close()


def test_a_worker_that_cannot_start_reports_the_real_cause(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # the forked workers inherit it: import fails
    runner = Runner(2, fork=True)
    with pytest.raises(LesionsynthError, match="a worker process could not start: ModuleNotFoundError: .*threadpoolctl"):
        list(runner.map(_sleepy, [(i,) for i in range(4)]))
    runner.close()


def test_an_exception_in_a_worker_keeps_its_type_and_message():
    runner = Runner(2, fork=True)
    with pytest.raises(ValueError, match="bad case 0"):
        list(runner.map(_fails, [(i,) for i in range(4)]))
    runner.close()


def test_stale_temporaries_of_a_live_writer_stay(tmp_path):
    from lesionsynth.pipeline import remove_stale_temporaries

    (tmp_path / "imagesTr").mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "imagesTr" / f".a.nii.gz.tmp{dead.pid}"
    live = tmp_path / "imagesTr" / f".b.nii.gz.tmp{os.getppid()}"  # another process, still running
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    remove_stale_temporaries([tmp_path / "imagesTr"])
    assert not stale.exists() and live.exists()
