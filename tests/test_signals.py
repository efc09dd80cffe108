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


# ---------------------------------------------------------------------------------- every start path, small data
# A small dataset (6 blob cases of 112×104×80): a case takes a fraction of a second, so a run of 24 lasts a few
# seconds; each signal is sent at a moment the run is seen to reach (its folder prepared, its workers started, an
# original copied, a case recorded), SIGINT to the whole process group as a terminal's Ctrl-C.

@pytest.fixture(scope="module")
def small_bank(tmp_path_factory) -> Path:
    from .conftest import blob_dataset

    from lesionsynth.bank import BankConfig, build_bank

    root = tmp_path_factory.mktemp("small")
    ds = blob_dataset(root / "ds", n_cases=6, shape=(112, 104, 80))
    return build_bank(ds, root / "bank", BankConfig(), jobs=1, progress=False)


def small_cmd(bank: Path, out: Path, *extra: str, jobs: int = 2) -> list[str]:
    return [*CLI, "generate", str(bank), "--out", str(out), "--n", "24", "--load", "high", "--seed", "3",
            "--jobs", str(jobs), *extra]


@pytest.fixture(scope="module")
def small_reference(small_bank, tmp_path_factory):
    """Uninterrupted runs, with and without the originals (made when first asked for)."""
    made: dict[bool, Path] = {}

    def reference(originals: bool) -> Path:
        if originals not in made:
            out = tmp_path_factory.mktemp("small_ref") / "out"
            extra = [] if originals else ["--no-include-originals"]
            subprocess.run(small_cmd(small_bank, out, *extra), check=True, capture_output=True)
            made[originals] = out
        return made[originals]

    return reference


def recorded_count(out: Path) -> int:
    from lesionsynth.pipeline import read_records

    return len(read_records(out)) if out.is_dir() else 0


def reached(moment: str, proc: subprocess.Popen, out: Path, before: int) -> bool:
    """Whether the run has got to `moment`: prepared (run.json written), workers (its worker processes exist),
    originals (an original case copied), cases (a synthetic case recorded beyond the `before` there were)."""
    if moment == "prepared":
        return (out / "run.json").is_file()
    if moment == "workers":
        return bool(children(proc.pid))
    if moment == "originals":
        labels = out / "labelsTr"
        return labels.is_dir() and any(not p.name.startswith(("syn", ".")) for p in labels.iterdir())
    return recorded_count(out) > before


def interrupt(cmd: list[str], out: Path, moment: str, sig: int, repeat: bool = False) -> tuple[float, str, list[int]]:
    """Run `cmd`, send `sig` once it reaches `moment` (again 0.05 s later with `repeat`); (seconds from the first
    signal to its end, its stderr, every child process seen)."""
    before = recorded_count(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: set[int] = set()
    deadline = time.monotonic() + 120
    while not reached(moment, proc, out, before):
        seen.update(children(proc.pid))
        assert proc.poll() is None, f"the run ended before {moment}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"the run never got to {moment}"
        time.sleep(0.01)
    seen.update(children(proc.pid))

    def send():
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the whole process group
        else:
            proc.send_signal(sig)

    send()
    sent = time.monotonic()
    if repeat:
        time.sleep(0.05)
        if proc.poll() is None:
            send()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    return time.monotonic() - sent, err, sorted(seen)


def complete_cases(out: Path) -> set[str]:
    """Synthetic cases whose files are all in place (label and every channel)."""
    labels = out / "labelsTr"
    if not labels.is_dir():
        return set()
    ids = {p.name[: -len(".nii.gz")] for p in labels.glob("syn*.nii.gz")}
    return {i for i in ids if all((out / "imagesTr" / f"{i}_{c:04d}.nii.gz").is_file() for c in range(2))}


def check_stopped_cleanly(out: Path, seconds: float, err: str, sig: int, workers: list[int]) -> None:
    from lesionsynth.pipeline import read_records

    assert seconds < 10, f"stopped {seconds:.1f} s after the signal"
    bars = ("originals: ", "generate: ")  # progress bars
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith(bars)]
    assert len(lines) == 1 and lines[0].startswith(f"error: stopped by {signal.Signals(sig).name}"), err
    assert "--resume" in lines[0] or "run the same command again" in lines[0], err
    assert wait_gone(workers, 10) == []
    assert temporaries(out) == [] if out.exists() else True
    recorded = {r["case_id"] for r in read_records(out).values()} if out.exists() else set()
    assert recorded == complete_cases(out), "a case written but not recorded, or recorded but not written"


# (extra options, jobs, moment, signal) of each interrupted run, in order; then the runs that complete it
START_PATHS = {
    "fresh-sigterm-while-workers-start": ([([], 2, "workers", signal.SIGTERM)], [["--resume"]]),
    "fresh-sigint-during-originals": ([([], 2, "originals", signal.SIGINT)], [["--resume"]]),
    "fresh-jobs1-sigint-once-prepared": ([([], 1, "prepared", signal.SIGINT)], [["--resume"]]),
    "no-originals-sigint-while-workers-start": ([(["--no-include-originals"], 2, "workers", signal.SIGINT)],
                                                [["--no-include-originals", "--resume"]]),
    "resume-after-originals-sigterm-and-again-sigint": (
        [([], 2, "cases", signal.SIGTERM), (["--resume"], 2, "cases", signal.SIGTERM),
         (["--resume"], 2, "workers", signal.SIGINT)], [["--resume"]]),
    "resume-jobs1-sigterm": ([([], 2, "cases", signal.SIGINT), (["--resume"], 1, "cases", signal.SIGTERM)],
                             [["--resume"]]),
    "shard-sigterm-then-resumed-shard-sigint": (
        [(["--shard", "0/2"], 2, "cases", signal.SIGTERM), (["--shard", "0/2", "--resume"], 2, "workers",
                                                             signal.SIGINT)],
        [["--shard", "0/2", "--resume"], ["--shard", "1/2"]]),
}


@pytest.mark.slow
@pytest.mark.parametrize("path", list(START_PATHS))
def test_a_signal_on_every_start_path_stops_the_run_cleanly_and_resume_gives_the_same_bytes(path, small_bank,
                                                                                         small_reference, tmp_path):
    """Fresh, --resume (after the originals are done, and interrupted again), --shard, with and without the
    originals, --jobs 1 and 2, a signal at several moments of start-up: the run stops within seconds, no process
    of it survives, every case whose files are in place is recorded, no temporary file is left, one line says how
    to go on; the runs that complete it give the bytes of an uninterrupted run."""
    out = tmp_path / "out"
    stops, finish = START_PATHS[path]
    for extra, jobs, moment, sig in stops:
        seconds, err, workers = interrupt(small_cmd(small_bank, out, *extra, jobs=jobs), out, moment, sig)
        check_stopped_cleanly(out, seconds, err, sig, workers)
    for extra in finish:
        done = subprocess.run(small_cmd(small_bank, out, *extra), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    same_output(out, small_reference("--no-include-originals" not in finish[0]))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_repeated_signal_is_not_swallowed(sig, small_bank, small_reference, tmp_path):
    """A second SIGINT/SIGTERM just after the first (an impatient user, a scheduler that sends it again) neither
    cuts the cleanup short nor kills the exiting process: one stop, one line, nothing left behind. (That a second
    signal is raised again when the first was lost: test_parallel.)"""
    out = tmp_path / "out"
    seconds, err, workers = interrupt(small_cmd(small_bank, out), out, "cases", sig, repeat=True)
    check_stopped_cleanly(out, seconds, err, sig, workers)
    done = subprocess.run(small_cmd(small_bank, out, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    same_output(out, small_reference(True))


SPAWNED_RUN = """\
import sys
sys.path.insert(0, '.')
from lesionsynth.errors import Interrupted
from lesionsynth.parallel import execution, stop_on_signals
from spawn_helper import pid_then_sleep

if __name__ == "__main__":
    try:
        with stop_on_signals(), execution("local", None, 2, device="cuda") as runner:  # cuda: spawned workers
            assert not runner.fork
            for _ in runner.map(pid_then_sleep, [(i,) for i in range(40)]):
                pass
    except Interrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize("moment", ["starting", "working"])
def test_spawned_workers_stop_with_the_run_also_while_they_start(moment, tmp_path):
    """Spawned workers (CUDA) take a second to start a fresh interpreter: a Ctrl-C to the process group while they
    start is held back until their own handlers are in place (no KeyboardInterrupt traceback from them), and the
    run stops with them within seconds."""
    (tmp_path / "spawn_helper.py").write_text(
        "import os, time\n\n"
        "def pid_then_sleep(i):\n"
        "    open(f'worker-{os.getpid()}', 'w').close()\n"
        "    time.sleep(0.5)\n")
    (tmp_path / "run.py").write_text(SPAWNED_RUN)
    proc = subprocess.Popen([sys.executable, "run.py"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not (children(proc.pid) if moment == "starting" else list(tmp_path.glob("worker-*"))):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    workers = children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["error: stopped by SIGINT"], err
    assert wait_gone(workers, 10) == []


@pytest.mark.slow
def test_a_dask_run_stops_on_sigterm_and_resumes_to_the_same_bytes(small_bank, small_reference, tmp_path):
    """--backend dask: SIGTERM stops the run (the client) within seconds with one line; the cases the cluster
    finishes after it are recorded by the worker that wrote them; --resume gives the bytes of a local run."""
    distributed = pytest.importorskip("dask.distributed")
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        dask = ["--backend", "dask", "--scheduler", cluster.scheduler_address]
        seconds, err, _ = interrupt(small_cmd(small_bank, out, *dask), out, "cases", signal.SIGTERM)
        deadline = time.monotonic() + 30
        # calls already running end on the cluster (a cancelled call's thread still writes its case to the end)
        while (any(client.processing().values()) or temporaries(out)) and time.monotonic() < deadline:
            time.sleep(0.1)
        check_stopped_cleanly(out, seconds, err, signal.SIGTERM, [])
        done = subprocess.run(small_cmd(small_bank, out, "--resume", *dask), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    same_output(out, small_reference(True))
