"""Parallel execution: worker processes on this machine (forked or spawned), or a Dask cluster through
joblib's Dask backend."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm import tqdm

from .errors import InputError, Interrupted, LesionsynthError

# tqdm's monitor thread is of no use to a run's bars, and a stop signal raised while the first bar starts it
# would be caught there and printed as a warning instead of stopping the run
tqdm.monitor_interval = 0

#: In the environment while a runner spawns its workers. A spawned worker starts with no signal held back (the
#: spawn clears the mask it would inherit) and takes about a second to import; `lesionsynth/__init__` then sets
#: SIGINT to ignored from its first line on, as `_worker_start` does later (Ctrl-C reaches the whole process
#: group; the parent decides), so a Ctrl-C while it imports prints no KeyboardInterrupt traceback from it.
SPAWNED_WORKER_ENV = "LESIONSYNTH_SPAWNED_WORKER"
#: Seconds a stopped worker gets to remove its temporary file and exit before it is killed.
STOP_GRACE_S = 3.0
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
BACKENDS = ("local", "dask")


@contextlib.contextmanager
def worker_threads_limited(jobs: int):
    """Limit native threads in worker processes (and here) to one each while running `jobs` > 1 workers; at
    jobs 1, this process's BLAS to one thread for the run.

    The lesion work's small matrix products gain nothing from a second BLAS thread, which spins between
    them: at jobs 1 it burnt about 0.3 s of CPU per MNI-sized case that the threads reading and writing
    the cases next to it (`pipeline.overlapped_cases`) need."""
    if jobs == 1:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            yield
        return
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    for k in _THREAD_VARS:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_backend(backend: str, scheduler: str | None) -> None:
    """Refuse a bad --backend/--scheduler before anything is written."""
    if backend not in BACKENDS:
        raise InputError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "dask":
        if not scheduler:
            raise InputError("--backend dask needs --scheduler ADDRESS (e.g. tcp://host:8786)")
        try:
            import dask.distributed  # noqa: F401
            import joblib  # noqa: F401
        except ImportError:
            raise InputError("--backend dask: dask.distributed or joblib is not installed "
                             "(pip install 'lesionsynth[dask]')") from None


class Runner:
    """Runs calls of one function in order: in this process (jobs 1), in `jobs` local worker processes
    (forked from this one where `fork`, else spawned: fresh interpreters), or through joblib's active
    backend (jobs -1: a Dask cluster). `execution` makes one. `map(fn, calls)` yields fn(*args) for each args
    tuple, in the calls' order. Local workers, forked or spawned alike, die with this process (also when it
    is killed with SIGKILL), remove their temporary file when stopped and report why they failed."""

    def __init__(self, jobs: int, fork: bool):
        self.jobs, self.fork = jobs, fork
        self._pool = None
        self._workers: list = []
        self._stopping = False

    @property
    def start_method(self) -> str:
        """How local workers start: "fork" (in milliseconds, everything imported) or "spawn" (a fresh
        interpreter that imports the package, about a second: CUDA, and where forking is unsafe)."""
        return "fork" if self.fork else "spawn"

    @property
    def in_process(self) -> bool:
        """Whether calls run in this process (jobs 1), one after another."""
        return self.jobs == 1

    def map(self, fn, calls: Iterable[tuple]) -> Iterator:
        if self.in_process:
            return _checked(fn(*args) for args in calls)
        if self.jobs > 1:
            # submitted now, not when the results are first asked for: the workers are forked before the
            # caller starts anything else (a progress bar's thread, say)
            return self._results(self._submit(fn, calls))
        from joblib import Parallel, delayed

        return _checked(Parallel(n_jobs=self.jobs, return_as="generator")(delayed(fn)(*args) for args in calls))

    def _submit(self, fn, calls) -> list:
        with deferred_signals():  # a signal now is acted on once the futures are known and returned
            if self._pool is None:
                self._start_workers()
            futures = [self._pool.submit(_run_in_worker, fn, *args) for args in calls]
            self._remember_workers()
        return futures

    def _start_workers(self) -> None:
        """Start the pool with all its workers now, not at its first task (there may be none: a resumed run
        whose originals are done), so that their ids are known from the moment they exist. Called with
        SIGTERM and SIGINT held back (`deferred_signals`): a worker starts with them blocked and takes them
        only once its own handlers are in place (`_worker_start`)."""
        self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context(self.start_method),
                                         initializer=_worker_start, initargs=(os.getpid(),))
        # objects frozen when the workers are forked are not traversed by their garbage collector, which
        # would otherwise copy every page holding them (copy-on-write)
        gc.freeze()
        try:
            # Python's pool forks all its workers at its first submit and spawns them one per submit; these
            # (private, Python 3.9+) calls start them all now. Without them, the first submit starts them.
            launch = getattr(self._pool, "_launch_processes", None)
            start = getattr(self._pool, "_start_executor_manager_thread", None)
            if launch is not None and start is not None:
                if not self.fork:
                    os.environ[SPAWNED_WORKER_ENV] = "1"  # read (and removed) by the spawned worker's first import
                try:
                    launch()
                finally:
                    os.environ.pop(SPAWNED_WORKER_ENV, None)
                start()
        finally:
            gc.unfreeze()
        self._remember_workers()

    def _remember_workers(self) -> None:
        """Add the pool's worker processes to those known (kept after the pool lets them go: to tell why one
        died, and to stop them)."""
        known = {id(p) for p in self._workers}
        processes = getattr(self._pool, "_processes", None) or {}
        self._workers += [p for p in list(processes.values()) if id(p) not in known]

    def _results(self, futures: list) -> Iterator:
        # after an error or an early stop the rest is not run: `close` cancels what has not started, or stops
        # the workers. Not cancelled here: when the workers are stopped next, the broken pool fails every
        # pending future itself, and one cancelled already makes Python 3.11's pool thread print an
        # InvalidStateError traceback (seen when a signal came while the consumer held a result)
        try:
            for future in futures:
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise_if_stopped()  # the workers were stopped by the signal that stops this run too
                    raise LesionsynthError(f"{worker_death(self._workers)}; rerun (generate --resume keeps the "
                                           f"cases already written)") from None
                raise_if_stopped()
                yield result
        except Interrupted:
            self._stopping = True
            raise

    def worker_pids(self) -> list[int]:
        """Process ids of the local worker processes started so far."""
        return [p.pid for p in self._workers if p.pid is not None]

    def close(self, stop_workers: bool = False) -> None:
        """Shut the local workers down: after the work they have, or at once (`stop_workers`: each is sent
        SIGTERM, removes the temporary file it is writing and exits)."""
        if self._pool is None:
            return
        self._stopping = self._stopping or stop_workers
        self._remember_workers()
        if stop_workers:
            for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 0.0)):
                for process in self._workers:  # SIGKILL only for one stuck in a long native call
                    with contextlib.suppress(OSError, ValueError, AttributeError):
                        if process.is_alive():
                            os.kill(process.pid, sig)
                for process in self._workers:
                    with contextlib.suppress(OSError, ValueError, AssertionError):
                        process.join(wait_s)
        self._pool.shutdown(wait=True, cancel_futures=not self._stopping)
        for process in self._workers:  # reaped: no zombie left behind
            with contextlib.suppress(OSError, ValueError, AssertionError):
                process.join(5)
        self._pool = None


def fork_workers_usable(device: str = "cpu") -> bool:
    """Whether local workers may be forked from this process: Linux (where fork is safe with numpy's
    thread pools, unlike macOS) and no CUDA, which a forked child cannot use."""
    return sys.platform.startswith("linux") and device == "cpu" and "fork" in multiprocessing.get_all_start_methods()


def worker_death(workers: list) -> str:
    """Why a worker pool broke, from its processes' exit codes: the signal that killed one, or its exit status."""
    # the pool terminates the others (SIGTERM; a worker that catches it exits with 128 + SIGTERM) once one has
    # died, and may reap them before the one that died first: wait a little for a code that is not theirs
    stopped = (-signal.SIGTERM, 128 + signal.SIGTERM)
    deadline = time.monotonic() + 3.0
    codes: list = []
    first: list = []
    while not first and time.monotonic() < deadline:
        codes = [(p.pid, p.exitcode) for p in workers if getattr(p, "exitcode", None) not in (None, 0)]
        first = [c for c in codes if c[1] not in stopped]
        if not first:
            time.sleep(0.05)
    first = first or codes
    if not first:
        return "a worker process ended unexpectedly"
    pid, code = first[0]
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the kernel's out-of-memory killer sends it: fewer --jobs may help)" if name == "SIGKILL" else ""
        return f"worker process {pid} was killed by {name}{hint}"
    return f"worker process {pid} exited with status {code}"


_start_error: BaseException | None = None


def _worker_start(parent_pid: int) -> None:
    """Worker start: die with the parent, leave no temporary file when stopped, one native thread.

    A failure here is kept and raised by the worker's first task (`_run_in_worker`), so that it reaches the
    user with its own type and message instead of as a broken pool."""
    global _start_error, _stop
    _stop = None  # a forked worker's copy of the parent's stop handling: not its own
    try:
        signal.signal(signal.SIGTERM, _stop_worker)
        signal.signal(signal.SIGALRM, _stop_worker)  # a stop put off until a result is sent (`_stop_worker`)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
        _die_with_parent(parent_pid)
        # a forked worker inherits the parent's thread pools, which the environment variables set for spawned
        # workers no longer size
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)  # applies at once, for the rest of the process
    except BaseException as exc:  # noqa: BLE001 - reported by the first task
        _start_error = exc
    finally:
        # the worker started with both blocked (`Runner._start_workers`): one sent meanwhile is taken now
        _unblock_stop_signals()


def _run_in_worker(fn, *args):
    if _start_error is not None:
        raise LesionsynthError(f"a worker process could not start: {type(_start_error).__name__}: {_start_error}")
    return fn(*args)


def _stop_worker(signum, frame) -> None:
    if _sending_result(frame):  # half a result in the pipe would hang the parent's pool: stop right after it
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        return
    from .io.nifti import remove_open_temporaries

    remove_open_temporaries()
    os._exit(128 + signal.SIGTERM)


def _sending_result(frame) -> bool:
    """Whether a worker stopped at `frame` is writing a message to the parent (a result, through its pipe)."""
    while frame is not None:
        code = frame.f_code
        if code.co_name in ("send_bytes", "_send_bytes", "_send") and \
                code.co_filename.endswith(os.path.join("multiprocessing", "connection.py")):
            return True
        frame = frame.f_back
    return False


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker end when its parent does, also when the parent is killed with SIGKILL: Linux's
    PR_SET_PDEATHSIG (SIGTERM on the parent's death), and elsewhere a thread that watches the parent's id."""
    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(1)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            pr_set_pdeathsig = 1
            if ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # it died in between
                    os._exit(1)
                return

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(1.0)
        _stop_worker(signal.SIGTERM, None)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopRequest:
    """The stop signal a run received (the first one) and how far it has got with it."""

    def __init__(self):
        self.signum: int | None = None
        self.acting = False   # the run is stopping: more signals are noted, and do not cut its cleanup short
        self.deferring = 0    # inside `deferred_signals`: a signal is noted, acted on at the window's end
        self.owner = os.getpid()

    def raise_pending(self) -> None:
        if self.signum is not None and not self.acting:
            raise Interrupted(self.signum)


_stop: _StopRequest | None = None


def _on_stop_signal(signum, frame) -> None:
    stop = _stop
    if stop is None:
        return
    if os.getpid() != stop.owner:  # a forked worker before its own handlers are in place: act as one
        if signum == signal.SIGTERM:
            _stop_worker(signum, frame)
        return
    stop.signum = stop.signum or signum
    if not stop.deferring:
        stop.raise_pending()


def raise_if_stopped() -> None:
    """Raise `Interrupted` if a stop signal came and the run is not stopping yet: its first `Interrupted` was
    lost (raised inside a finalizer or a library's `except Exception`) or is still held back. Loops over
    results call this after each one."""
    if _stop is not None:
        _stop.raise_pending()


def _acknowledge_stop() -> None:
    """The run now acts on the signal it received: later ones are noted, not raised into its cleanup."""
    if _stop is not None and _stop.signum is not None:
        _stop.acting = True


def _unblock_stop_signals() -> None:
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def run_bar(*args, **kwargs):
    """A tqdm progress bar made with SIGTERM and SIGINT held back (`deferred_signals`): a signal while tqdm builds
    it would leave a half-made bar, whose finaliser then prints a traceback beside the run's one line."""
    with deferred_signals():
        return tqdm(*args, **kwargs)


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGTERM and SIGINT back while the block runs, and act on one that came meanwhile at its end. Used
    while worker processes start and tasks are handed to them: a process started here inherits the block
    (its own handlers take the signal later) and is registered before the signal is acted on."""
    blocked = None
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    stop = _stop
    if stop is not None:
        stop.deferring += 1
    try:
        yield
    finally:
        if stop is not None:
            stop.deferring -= 1
        if blocked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a pending one reaches the handler now
        if stop is not None and not stop.deferring:
            stop.raise_pending()  # one the handler took (in another thread's turn) meanwhile


def _checked(results: Iterator) -> Iterator:
    """`results`, with `raise_if_stopped` after each (a signal's lost `Interrupted` is raised here again)."""
    try:
        for result in results:
            raise_if_stopped()
            yield result
    finally:
        if hasattr(results, "close"):
            results.close()


@contextlib.contextmanager
def stop_on_signals(keep_after_stop: bool = False):
    """Turn SIGTERM and SIGINT into `Interrupted` in this (main) thread while the block runs, so the run
    stops where it is, its workers are stopped and one line says what is done. The handlers stay in place
    until the block ends: a signal is never ignored. A second signal before the run acts on the first raises
    again (the first may have been lost); one after that is noted and lets the cleanup (a few seconds) end.
    `keep_after_stop` (a command whose process ends with the stop): once the run has stopped, a repeated signal
    changes nothing and does not kill the process while it exits (Python's own handler would be gone by then;
    its exit status stays that of the first). Nested blocks share the outer one's handling. A no-op off the
    main thread."""
    global _stop
    if threading.current_thread() is not threading.main_thread() or _stop is not None:
        yield
        return
    _stop = _StopRequest()
    previous_hook = sys.unraisablehook

    def quiet_hook(unraisable) -> None:
        # an Interrupted raised inside a finalizer is lost there (raise_if_stopped raises it again): no traceback
        if not isinstance(unraisable.exc_value, Interrupted):
            previous_hook(unraisable)

    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}
    sys.unraisablehook = quiet_hook
    try:
        yield
    finally:
        for sig, old in previous.items():
            # SIG_IGN, unlike a Python handler, outlasts the interpreter's finalization
            signal.signal(sig, signal.SIG_IGN if keep_after_stop and _stop.signum is not None else old)
        sys.unraisablehook = previous_hook
        _stop = None


@contextlib.contextmanager
def execution(backend: str = "local", scheduler: str | None = None, jobs: int = 1, device: str = "cpu"):
    """Context in which the per-case work runs; yields a `Runner`.

    local: this process at jobs 1; else `jobs` worker processes on this machine, one native thread each:
    forked from this one where that is safe (`fork_workers_usable`: they start in milliseconds with
    everything imported), else spawned (each starts a fresh interpreter and imports the package, about a
    second). dask: the Dask cluster at `scheduler` (e.g. tcp://host:8786) via joblib's
    Dask backend; its workers must see the same file system paths (bank, dataset, output). No scheduler
    of our own.
    """
    check_backend(backend, scheduler)
    if backend == "local":
        runner = Runner(jobs, fork=jobs > 1 and fork_workers_usable(device))
        stopped = False
        try:
            with worker_threads_limited(jobs):
                yield runner
        except BaseException:
            stopped = True
            _acknowledge_stop()
            raise
        finally:
            runner.close(stop_workers=stopped)
        return
    from dask.distributed import Client
    import joblib

    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise InputError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({exc})") from None
    try:
        with joblib.parallel_config(backend="dask"):
            yield Runner(-1, fork=False)
    except BaseException:
        _acknowledge_stop()
        raise
    finally:
        client.close()


def overlapped(items: Iterable, read, work, write, read_ahead: int = 1, write_behind: int = 1,
               first_read=None, last_write=None) -> Iterator:
    """write(work(read(item))) for each item, yielded in order, with the reads and writes of the items next
    to one overlapped with its `work`: `read` runs ahead in one thread, `write` behind in another, `work` in
    the caller's thread. At most 1 + read_ahead + write_behind items' data are held at once.
    `first_read` and `last_write`, if given, replace `read` for the first item and `write` for the last: no
    work runs beside them, so they may use more threads.

    On an exception (a signal's `Interrupted` too) every write handed to the writer is finished (a write
    stopped half-way would leave a temporary file), the read in progress is let finish and queued reads
    are dropped; items written then were not yielded."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from itertools import islice

    reader = ThreadPoolExecutor(1, thread_name_prefix="lesionsynth-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="lesionsynth-write")
    reads, writes = deque(), deque()
    try:
        queued = iter(items)
        reads.extend(reader.submit(read if n else (first_read or read), item)
                     for n, item in enumerate(islice(queued, read_ahead)))
        while reads:
            data = reads.popleft().result()
            reads.extend(reader.submit(read, item) for item in islice(queued, 1))
            data = work(data)
            while len(writes) >= write_behind:
                yield writes.popleft().result()
            writes.append(writer.submit(write if reads else (last_write or write), data))
            del data
        while writes:
            yield writes.popleft().result()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)


def release_freed_memory() -> None:
    """Hand memory freed by numpy back to the operating system (glibc only; a no-op elsewhere).

    Freed volume-sized buffers otherwise stay in the heap (glibc raises its mmap threshold after the
    first large free), so a worker's resident size keeps the high-water mark of reading the case while
    it does the lesion work.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


@contextlib.contextmanager
def _lock_file(path: Path):
    """The file `path` (made if missing) open for locking while the block runs, and the fcntl module; (None,
    None) where fcntl is unavailable (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield None, None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield fd, fcntl
    finally:
        os.close(fd)


@contextlib.contextmanager
def writer_lock(path: Path, what: str):
    """Hold an exclusive lock on the file `path` while the block runs; refuse with one line if another process
    holds it (`what` names what is locked). The lock dies with its holder (flock), so a killed run leaves
    none behind. Where flock is unavailable (Windows), no lock is taken."""
    with _lock_file(path) as (fd, fcntl):
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise InputError(f"{what} is being written by another process (pid {holder}); wait for it to "
                                 f"end or stop it first") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield


@contextlib.contextmanager
def shard_count_lock(path: Path, count: int, what: str):
    """Hold, while the block runs, a shared claim that the output is being written in `count` shards, and
    refuse with one line if another process writes it in a different count: its shards would overlap
    these (case i belongs to shard i mod count), so the two would write the same cases. Shards of one
    count share the claim; that two of them are not the same shard is `writer_lock`'s part.

    The claim is a POSIX record lock on byte `count` of the file `path`, shared; a writer of another
    count is one holding another byte, found by trying to lock every other byte exclusively. It dies with
    its holder. Where record locks are unavailable (Windows), no claim is made."""
    with _lock_file(path) as (fd, fcntl):
        if fcntl is not None:
            # every other byte: those after it (length 0: to the end), and those from 1 up to it
            others = [(count + 1, 0)] + ([(1, count - 1)] if count > 1 else [])
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, count)
                for start, length in others:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
                    fcntl.lockf(fd, fcntl.LOCK_UN, length, start)
            except OSError:  # EAGAIN or EACCES: held by a writer of another count
                raise InputError(f"{what} is being written in a different number of shards by another process; "
                                 f"shards of one run use the same --shard count (wait for it to end or stop it "
                                 f"first)") from None
        yield
