"""Parallel execution helpers: one BLAS/OpenMP/torch thread per worker so N workers use N cores."""

from __future__ import annotations

import contextlib
import os

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


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
