"""Fault test: `kill -9` a Dask worker process mid-sweep, rerun, and the store equals an uninterrupted
run array for array (completion markers are written only after a shard's data)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.atlas import atlas
from rfcore.pipeline import run_sweep
from rfcore.store import AtlasStore

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness", "one_thread")]

PARAMS: dict[str, Any] = dict(
    model="resnet10t",
    data="synthetic:384",
    layers="conv1,layer1.0,layer3.0",
    k=4,
    shard_size=32,
    batch_size=16,
    device="cpu",
)


@pytest.fixture
def own_cluster() -> Iterator[Any]:
    """A cluster of its own (its workers get killed): 2 processes × 1 thread."""
    from distributed import Client, LocalCluster

    from flows.runner import cluster_kwargs

    with LocalCluster(**cluster_kwargs(2, device="cpu", threads=1)) as cluster, Client(cluster) as client:
        yield cluster, client


def _kill_busy_worker(client: Any, store_url: str, stop: threading.Event, killed: list[int]) -> None:
    """Once the first shard is done and others run, SIGKILL the process of a worker that is computing."""
    pids = client.run(os.getpid)
    deadline = time.monotonic() + 240
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            done = AtlasStore.open(store_url).done_keys("sweep")
        except Exception:
            done = set()
        if done:
            busy = [w for w, tasks in client.processing().items() if tasks]
            if busy and len(done) < 12:
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed.append(pids[busy[0]])
                return
        time.sleep(0.05)


def test_kill_worker_mid_sweep_then_rerun_is_identical(
    own_cluster: Any, same_store: Any, tmp_path: Path
) -> None:
    from prefect_dask import DaskTaskRunner

    cluster, client = own_cluster
    ref = str(tmp_path / "ref.zarr")
    run_sweep(ref, model_name="resnet10t", data_spec="synthetic:384", layers="conv1,layer1.0,layer3.0", k=4,
              shard_size=32, batch_size=16, device="cpu", progress=False)  # fmt: skip

    url = str(tmp_path / "killed.zarr")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_busy_worker, args=(client, url, stop, killed), daemon=True)
    killer.start()
    runner = lambda: DaskTaskRunner(address=cluster.scheduler_address)  # noqa: E731
    first: Any
    try:
        first = atlas.with_options(task_runner=runner())(**PARAMS, store_url=url)
    except Exception as e:  # the run may fail (worker lost) or finish (Dask reschedules the shard)
        first = e
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "no worker was killed mid-sweep (the sweep finished too fast?)"
    client.wait_for_workers(2, timeout=120)  # the nanny restarts the killed worker
    second = atlas.with_options(task_runner=runner())(**PARAMS, store_url=url)
    assert second["num_images"] == 384
    if isinstance(first, dict):
        assert second["images_swept"] == 0
    assert same_store(ref, url) == []
