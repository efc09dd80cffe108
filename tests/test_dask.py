"""--backend dask: the per-case work runs on a (local) dask.distributed cluster and gives the same bytes."""

from __future__ import annotations

import hashlib

import pytest

from lesionsynth.errors import InputError
from lesionsynth.pipeline import GenerateConfig, generate

distributed = pytest.importorskip("dask.distributed")


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.json"}


def test_dask_cluster_gives_same_bytes_as_local(blob_bank, tmp_path):
    cfg = GenerateConfig(n=4, load="uniform", seed=2, folds=2)
    generate(blob_bank, tmp_path / "local", cfg, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster):
            with distributed.get_task_stream() as stream:
                generate(blob_bank, tmp_path / "dask", cfg, progress=False, backend="dask",
                         scheduler=cluster.scheduler_address)
    assert _hashes(tmp_path / "local") == _hashes(tmp_path / "dask")
    assert len(stream.data) >= 1  # the cluster really ran the per-case work


def test_dask_needs_a_scheduler(blob_bank, tmp_path):
    with pytest.raises(InputError, match="--scheduler"):
        generate(blob_bank, tmp_path / "o", GenerateConfig(n=1, load="low"), progress=False, backend="dask")
    assert not (tmp_path / "o").exists()


def test_stopping_drops_the_calls_queued_on_the_cluster(tmp_path):
    """A run stopped early (an error, a signal: generate closes its results) leaves the rest of its calls
    unrun: joblib hands the cluster only a few calls ahead of the results taken, and only those finish."""
    import subprocess
    import time

    from lesionsynth.parallel import execution

    calls = [(["sh", "-c", f"sleep 0.3 && touch {tmp_path}/{i}.done"],) for i in range(30)]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with execution("dask", cluster.scheduler_address) as runner:
            results = runner.map(subprocess.run, calls)
            next(results)
            results.close()
        time.sleep(3.0)  # 10 more calls' time
        assert len(list(tmp_path.glob("*.done"))) <= 4
