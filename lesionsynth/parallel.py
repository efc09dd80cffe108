"""Parallel execution: joblib on this machine (loky), or on a Dask cluster through joblib's Dask backend."""

from __future__ import annotations

import contextlib
import os

from .errors import InputError

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


@contextlib.contextmanager
def execution(backend: str = "local", scheduler: str | None = None, jobs: int = 1):
    """Context in which `joblib.Parallel(n_jobs=...)` runs the per-case work; yields the n_jobs to use.

    local: joblib's loky processes on this machine, one native thread each. dask: the Dask cluster at
    `scheduler` (e.g. tcp://host:8786) via joblib's Dask backend; its workers must see the same file
    system paths (bank, dataset, output). No scheduler of our own.
    """
    check_backend(backend, scheduler)
    if backend == "local":
        with worker_threads_limited(jobs):
            yield jobs
        return
    from dask.distributed import Client
    import joblib

    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise InputError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({exc})") from None
    try:
        with joblib.parallel_config(backend="dask"):
            yield -1
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
