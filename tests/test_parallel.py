"""The local runner: forked workers give the same results in order, pass errors on, limit native threads."""

from __future__ import annotations

import os
import sys
import signal
import threading
import time

import pytest

from lesionsynth.errors import InputError, Interrupted, LesionsynthError
from lesionsynth.parallel import Runner, execution, fork_workers_usable, worker_death

needs_fork = pytest.mark.skipif(not fork_workers_usable(), reason="forked workers are used on Linux only")


def _square_and_pid(x):
    return x * x, os.getpid()


def _fail_on(x, bad):
    if x == bad:
        raise InputError(f"case {x}: bad input")
    return x


def _die_on(x, bad):
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _slow(x):
    time.sleep(0.3)
    return x


def _record(x, folder):
    time.sleep(0.05)
    (folder / f"{x}.done").write_text("")
    if x == 0:
        raise InputError("first call fails")
    return x


def _native_threads(_):
    from threadpoolctl import threadpool_info

    return sorted({info["num_threads"] for info in threadpool_info()})


@needs_fork
def test_forked_workers_return_results_in_order():
    with execution(jobs=2) as runner:
        assert runner.fork
        results = list(runner.map(_square_and_pid, [(x,) for x in range(20)]))
    assert [r[0] for r in results] == [x * x for x in range(20)]
    pids = {r[1] for r in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    with execution(jobs=1) as runner:
        assert [r[0] for r in runner.map(_square_and_pid, [(x,) for x in range(5)])] == [0, 1, 4, 9, 16]


@needs_fork
def test_worker_error_keeps_its_type_and_message():
    with execution(jobs=2) as runner:
        with pytest.raises(InputError, match="case 3: bad input"):
            list(runner.map(_fail_on, [(x, 3) for x in range(6)]))


@needs_fork
def test_killed_worker_gives_one_clear_error():
    with execution(jobs=2) as runner:
        with pytest.raises(LesionsynthError, match=r"worker process \d+ was killed by SIGKILL"):
            list(runner.map(_die_on, [(x, 2) for x in range(6)]))


@needs_fork
def test_calls_after_an_error_are_not_run(tmp_path):
    runner = Runner(2, fork=True)
    try:
        with pytest.raises(InputError):
            list(runner.map(_record, [(x, tmp_path) for x in range(40)]))
    finally:
        runner.close()
    assert len(list(tmp_path.glob("*.done"))) < 10


@needs_fork
def test_forked_workers_use_one_native_thread():
    with execution(jobs=2) as runner:
        assert list(runner.map(_native_threads, [(0,), (1,)])) in ([[1], [1]], [[], []])


def test_spawned_workers_where_forking_is_not_used():
    """Elsewhere (macOS, Windows, CUDA) the workers are spawned interpreters: same results, same order, the
    same error reports as forked ones."""
    runner = Runner(2, fork=False)
    assert runner.start_method == "spawn"
    try:
        results = list(runner.map(_square_and_pid, [(x,) for x in range(8)]))
        with pytest.raises(InputError, match="case 1: bad input"):
            list(runner.map(_fail_on, [(x, 1) for x in range(4)]))
    finally:
        runner.close()
    assert [r[0] for r in results] == [x * x for x in range(8)]
    assert os.getpid() not in {r[1] for r in results}
    assert not fork_workers_usable("cuda")
    runner = Runner(2, fork=False)
    try:
        with pytest.raises(LesionsynthError, match=r"worker process \d+ was killed by SIGKILL"):
            list(runner.map(_die_on, [(x, 1) for x in range(4)]))
    finally:
        runner.close()


def test_worker_death_reports_the_killed_worker_not_the_ones_the_pool_stopped():
    """The pool stops the other workers with SIGTERM, which they catch (exit status 128 + SIGTERM) or die of;
    the report names the worker that died first, whichever order the codes are found in."""
    from types import SimpleNamespace

    workers = [SimpleNamespace(pid=11, exitcode=128 + signal.SIGTERM),
               SimpleNamespace(pid=12, exitcode=-signal.SIGTERM), SimpleNamespace(pid=13, exitcode=-signal.SIGKILL)]
    assert worker_death(workers).startswith("worker process 13 was killed by SIGKILL")
    assert worker_death(workers[:1]) == "worker process 11 exited with status 143"


@needs_fork
def test_stopping_while_a_result_is_held_prints_no_pool_traceback(monkeypatch):
    """A signal that comes while the caller holds a result: the caller closes the results (as generate does)
    and the workers are stopped. Python 3.11's pool thread used to die with an InvalidStateError (printed
    as a traceback) for the pending calls the results had cancelled first."""
    import threading

    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_type.__name__))
    with pytest.raises(Interrupted):
        with execution(jobs=2) as runner:
            results = runner.map(_slow, [(x,) for x in range(20)])
            assert next(results) == 0
            results.close()
            raise Interrupted(signal.SIGTERM)
    time.sleep(0.5)  # the pool's thread reports the broken pool after the workers are gone
    assert thread_errors == []


class _RaisesASignalWhenFreed:
    """Sends SIGTERM to this process while it is being freed: the handler's `Interrupted` is raised inside a
    finalizer, where Python ignores it (as in a library's __del__ or weakref callback that runs at that moment)."""

    def __del__(self):
        signal.raise_signal(signal.SIGTERM)
        sum(range(100))  # bytecode after the signal: its handler runs here, inside the finalizer


def test_a_signal_lost_in_a_finalizer_is_raised_again_at_the_next_check():
    from lesionsynth.parallel import raise_if_stopped, stop_on_signals

    with stop_on_signals():
        _RaisesASignalWhenFreed()  # freed at once: the Interrupted is lost
        with pytest.raises(Interrupted) as caught:
            raise_if_stopped()  # as the run does after each result
    assert caught.value.signum == signal.SIGTERM


def test_a_second_signal_is_raised_when_the_first_was_lost():
    from lesionsynth.parallel import stop_on_signals

    with stop_on_signals():
        _RaisesASignalWhenFreed()
        with pytest.raises(Interrupted) as caught:
            signal.raise_signal(signal.SIGINT)
            sum(range(100))
    assert caught.value.signum == signal.SIGTERM  # the exit status is the first signal's


def test_a_signal_while_workers_start_is_held_back_then_acted_on():
    from lesionsynth.parallel import deferred_signals, stop_on_signals

    finished = False
    with stop_on_signals():
        with pytest.raises(Interrupted) as caught:
            with deferred_signals():
                signal.raise_signal(signal.SIGINT)
                sum(range(100))
                finished = True  # not cut short
    assert finished and caught.value.signum == signal.SIGINT


@needs_fork
def test_worker_ids_are_known_before_any_task():
    """A pool started by an empty map (a resumed run whose originals are all done) knows its workers: a signal
    then stops them, instead of waiting for every queued case."""
    runner = Runner(2, fork=True)
    assert list(runner.map(_slow, [])) == []
    pids = runner.worker_pids()
    assert len(pids) == 2 and all(os.path.exists(f"/proc/{pid}") for pid in pids)
    results = runner.map(_slow, [(x,) for x in range(40)])
    start = time.monotonic()
    runner.close(stop_workers=True)
    assert time.monotonic() - start < 5  # not 40 × 0.3 s / 2
    del results


def _large_result(x):
    return bytes(100_000_000)  # its trip through the pipe to the parent takes most of the call's time


@needs_fork
def test_workers_stopped_while_they_send_results_do_not_hang_the_stop():
    """A worker killed half-way through writing a result leaves half a message in the pipe, on which Python's
    pool waits for ever: a worker being stopped finishes the message first, then exits."""
    for _ in range(3):
        runner = Runner(2, fork=True)
        results = runner.map(_large_result, [(x,) for x in range(20)])
        next(results)
        time.sleep(0.15)
        start = time.monotonic()
        stopper = threading.Thread(target=runner.close, kwargs={"stop_workers": True}, daemon=True)
        stopper.start()
        stopper.join(20)
        assert not stopper.is_alive(), "the stop hangs"
        assert time.monotonic() - start < 10
        del results


def test_a_spawned_worker_ignores_sigint_from_its_first_import():
    """A spawned worker starts with no signal held back (the spawn clears the mask) and imports for about a
    second: marked by the runner's environment variable, lesionsynth's first line sets SIGINT to ignored (a
    Ctrl-C to the process group then prints no KeyboardInterrupt traceback from it) and removes the mark; a
    process without the mark (the parent, a user's own workers) keeps Python's handler."""
    import subprocess

    from lesionsynth.parallel import SPAWNED_WORKER_ENV, Runner

    probe = ("import os, signal, lesionsynth; "
             f"print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, {SPAWNED_WORKER_ENV!r} in os.environ)")

    def default_sigint():  # a shell's background job starts with SIGINT ignored, and exec keeps that
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    marked = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env={**os.environ, SPAWNED_WORKER_ENV: "1"}, preexec_fn=default_sigint)
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           env={k: v for k, v in os.environ.items() if k != SPAWNED_WORKER_ENV},
                           preexec_fn=default_sigint)
    assert marked.stdout.split() == ["True", "False"]
    assert plain.stdout.split() == ["False", "False"]
    runner = Runner(2, fork=False)
    try:
        assert list(runner.map(os.getpid, [()] * 2))
        assert SPAWNED_WORKER_ENV not in os.environ  # only while the workers start
    finally:
        runner.close()
