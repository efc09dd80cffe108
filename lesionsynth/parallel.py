"""Parallel execution: worker processes on this machine (forked, or joblib's loky), or a Dask cluster through
joblib's Dask backend."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .errors import InputError, LesionsynthError

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
BACKENDS = ("local", "dask")


@contextlib.contextmanager
def worker_threads_limited(jobs: int):
    """Limit native threads in joblib workers (and here) to one each while running `jobs` > 1 workers."""
    if jobs == 1:
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
        except ImportError:
            raise InputError("--backend dask: dask.distributed is not installed "
                             "(pip install 'lesionsynth[dask]')") from None


class Runner:
    """Runs calls of one function in order, in this process, in local worker processes, or through joblib
    (`execution` makes one). `map(fn, calls)` yields fn(*args) for each args tuple, in the calls' order."""

    def __init__(self, jobs: int, fork: bool):
        self.jobs, self.fork = jobs, fork
        self._pool = None

    def map(self, fn, calls: Iterable[tuple]) -> Iterator:
        if self.jobs == 1:
            return (fn(*args) for args in calls)
        if self.fork:
            # submitted now, not when the results are first asked for: the workers are forked before the
            # caller starts anything else (a progress bar's thread, say)
            return self._results(self._submit(fn, calls))
        from joblib import Parallel, delayed

        return Parallel(n_jobs=self.jobs, return_as="generator")(delayed(fn)(*args) for args in calls)

    def _submit(self, fn, calls) -> list:
        if self._pool is not None:
            return [self._pool.submit(fn, *args) for args in calls]
        self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("fork"),
                                         initializer=_one_native_thread)
        # the workers start at the first submit; objects frozen then are not traversed by the workers'
        # garbage collector, which would otherwise copy every page holding them (copy-on-write)
        gc.freeze()
        try:
            return [self._pool.submit(fn, *args) for args in calls]
        finally:
            gc.unfreeze()

    @staticmethod
    def _results(futures: list) -> Iterator:
        try:
            for future in futures:
                try:
                    yield future.result()
                except BrokenProcessPool:
                    raise LesionsynthError(
                        "a worker process died (killed, e.g. out of memory?); rerun, perhaps with fewer --jobs "
                        "(generate --resume keeps the cases already written)") from None
        finally:
            for future in futures:
                future.cancel()  # after an error (or an early stop) the rest is not run

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def fork_workers_usable(device: str = "cpu") -> bool:
    """Whether local workers may be forked from this process: Linux (where fork is safe with numpy's
    thread pools, unlike macOS) and no CUDA, which a forked child cannot use."""
    return sys.platform.startswith("linux") and device == "cpu" and "fork" in multiprocessing.get_all_start_methods()


def _one_native_thread() -> None:
    """Worker start: one BLAS/OpenMP thread (a forked worker inherits the parent's pools, which the
    environment variables set for spawned workers no longer size)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # applies at once, for the rest of the process


@contextlib.contextmanager
def execution(backend: str = "local", scheduler: str | None = None, jobs: int = 1, device: str = "cpu"):
    """Context in which the per-case work runs; yields a `Runner`.

    local: this process at jobs 1; else `jobs` worker processes on this machine, one native thread each:
    forked from this one where that is safe (`fork_workers_usable`: they start in milliseconds with
    everything imported), else joblib's loky processes (each starts a fresh interpreter and imports the
    package, about a second). dask: the Dask cluster at `scheduler` (e.g. tcp://host:8786) via joblib's
    Dask backend; its workers must see the same file system paths (bank, dataset, output). No scheduler
    of our own.
    """
    check_backend(backend, scheduler)
    if backend == "local":
        runner = Runner(jobs, fork=jobs > 1 and fork_workers_usable(device))
        try:
            with worker_threads_limited(jobs):
                yield runner
        finally:
            runner.close()
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
    finally:
        client.close()


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
