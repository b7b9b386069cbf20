"""Dask task runner construction: machine-sized local clusters, existing clusters, GPU resources."""

from __future__ import annotations

import pytest
from prefect_dask import DaskTaskRunner

from flows import runner as R
from rfcore.errors import RfatlasError


def test_local_cluster_is_sized_to_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(R.WORKERS_ENV, raising=False)
    monkeypatch.setattr(R, "gpu_count", lambda: 0)
    for cores, workers, threads in ((2, 2, 1), (8, 4, 2), (16, 4, 4), (1, 1, 1)):
        monkeypatch.setattr(R, "cpu_count", lambda c=cores: c)
        kw = R.cluster_kwargs()
        assert kw["n_workers"] == workers and kw["threads_per_worker"] == 1 and kw["processes"]
        assert kw["env"]["RFATLAS_TORCH_THREADS"] == str(threads)  # workers × torch threads = cores
        assert "resources" not in kw
    monkeypatch.setattr(R, "cpu_count", lambda: 8)
    assert R.cluster_kwargs(2)["env"]["RFATLAS_TORCH_THREADS"] == "4"
    monkeypatch.setenv(R.WORKERS_ENV, "3")
    assert R.cluster_kwargs()["n_workers"] == 3


def test_gpu_machines_get_one_worker_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(R.WORKERS_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(R, "gpu_count", lambda: 4)
    monkeypatch.setattr(R, "cpu_count", lambda: 32)
    kw = R.cluster_kwargs(device="cuda")
    assert (
        kw["n_workers"] == 4 and kw["resources"] == {"GPU": 1} and kw["env"]["RFATLAS_TORCH_THREADS"] == "8"
    )
    assert kw["gpu_ids"] == ["0", "1", "2", "3"]
    assert "resources" not in R.cluster_kwargs(device="cpu")


def test_cuda_without_gpu_is_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "gpu_count", lambda: 0)
    with pytest.raises(RfatlasError, match="no CUDA GPU"):
        R.cluster_kwargs(device="cuda")


def test_existing_cluster_by_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(R.ADDRESS_ENV, raising=False)
    r = R.make_task_runner(address="tcp://10.0.0.5:8786")
    assert isinstance(r, DaskTaskRunner) and r.address == "tcp://10.0.0.5:8786"
    monkeypatch.setenv(R.ADDRESS_ENV, "tcp://10.0.0.6:8786")
    assert R.make_task_runner().address == "tcp://10.0.0.6:8786"
    with pytest.raises(RfatlasError):
        R.make_task_runner(workers=2, address="tcp://10.0.0.5:8786")
    with pytest.raises(RfatlasError, match="no Dask scheduler"):
        R.check_dask_address("tcp://127.0.0.1:1", timeout=1)
    with pytest.raises(RfatlasError, match="bad --dask-address"):
        R.check_dask_address("http://x:1")


def test_workers_get_the_api_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1234/api")
    assert R.cluster_kwargs(1)["env"]["PREFECT_API_URL"] == "http://127.0.0.1:1234/api"


def test_gpu_cluster_gives_each_worker_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real worker processes: worker i's CUDA_VISIBLE_DEVICES names GPU i (CPU-only machine: the
    variable is set all the same), so `cuda` on worker i is that GPU."""
    import os

    from distributed import Client

    monkeypatch.setattr(R, "gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    kw = R.cluster_kwargs(device="auto", threads=1)
    assert kw["gpu_ids"] == ["3", "5"] and kw["n_workers"] == 2 and kw["resources"] == {"GPU": 1}
    assert "gpu_ids" not in R.cluster_kwargs(device="cuda:1")
    with R.LocalGPUCluster(**kw) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["3", "5"]
        assert all(w["resources"] == {"GPU": 1} for w in client.scheduler_info()["workers"].values())
