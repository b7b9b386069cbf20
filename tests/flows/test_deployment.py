"""End to end through a real deployment, no mocks: `prefect server` (subprocess, own PREFECT_HOME) →
work pools from deploy/work_pools/*.json → `prefect deploy --prefect-file deploy/prefect.yaml --all`
→ `prefect worker start` (process pool, subprocess) → a run of `atlas/atlas` triggered through
the API, its tasks on a 2-process Dask cluster (address passed as a job variable), writing the atlas to
a real S3 endpoint (moto_server). The store read back must equal a single-process `run_sweep`, array
for array.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PREFECT = str(Path(sys.executable).with_name("prefect"))

MODEL, DATA, LAYERS, K, SHARD, BATCH = "resnet10t", "synthetic:64", "conv1,maxpool,layer2.0", 4, 32, 16
PARAMS = dict(model=MODEL, data=DATA, layers=LAYERS, k=K, shard_size=SHARD, batch_size=BATCH, device="cpu", analyses="sweep")  # fmt: skip
DEPLOYMENTS = ["atlas/atlas", "train/train", "demo/demo", "atlas/atlas-gpu", "atlas/atlas-nightly"]
SERVER_START_S, RUN_TIMEOUT_S = 180.0, 240.0


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path.name}: no output)"
    return f"--- {path.name} (last {min(n, len(lines))} lines) ---\n" + "\n".join(lines[-n:])


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """SIGTERM the process group this test started (the worker's flow-run children included), then KILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _spawn(args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    try:
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        out.close()  # the child holds its own descriptor


def _check(args: list[str], env: dict[str, str], log: Path, timeout: float = 240.0) -> None:
    with log.open("wb") as out:
        rc = subprocess.run(
            args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode
    assert rc == 0, f"{' '.join(args[1:])} exited {rc}\n{_tail(log)}"


def _wait_healthy(api_url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited {proc.returncode}\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {timeout:.0f} s\n{_tail(log)}")


@dataclass
class Server:
    env: dict[str, str]  # PREFECT_HOME, PREFECT_API_URL, ... for clients, `prefect deploy`, the worker
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[Server]:
    """A throwaway `prefect server start` on 127.0.0.1 (SQLite in a tmp PREFECT_HOME); the environment
    that clients, `prefect deploy` and the worker use. Stopped on teardown, even on failure."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        # Keep the server light on a shared 2-core machine; the nightly schedule must never fire here.
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED="false",
        PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    env.pop("PREFECT_API_KEY", None)
    env.pop("PREFECT_PROFILE", None)
    log = tmp_path / "server.log"
    proc = _spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        yield Server(env, proc, log)
    finally:
        _stop(proc)


@pytest.fixture
def worker_cluster(prefect_server: Server) -> Iterator[Any]:
    """Two real Dask worker processes × 1 thread (torch on 1 thread, as the reference run), reporting
    to the test's server; they inherit AWS_* (moto) from this process."""
    from distributed import LocalCluster

    env = {"RFATLAS_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update({k: prefect_server.env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME")})
    cluster = LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0",
        env=env,
    )  # fmt: skip
    try:
        yield cluster
    finally:
        cluster.close(timeout=30)


def _layer_arrays(group: zarr.Group, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, node in group.members():
        if isinstance(node, zarr.Array):
            out[prefix + name] = node[...]
        else:
            out.update(_layer_arrays(node, f"{prefix}{name}/"))
    return out


async def _wait_for_run(flow_run_id: Any, timeout: float) -> Any:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                return run
            await asyncio.sleep(2)


async def _read_deployments(names: list[str]) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return {name: await client.read_deployment_by_name(name) for name in names}


def test_atlas_deployment_on_worker_dask_and_s3(
    prefect_server: Server,
    worker_cluster: Any,
    s3_bucket: str,
    same_store: Callable[[str, str], list[str]],
    one_thread: None,
    tmp_path: Path,
) -> None:
    t0 = time.monotonic()
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from rfcore.atlas import open_atlas
    from rfcore.pipeline import run_sweep

    env, server_log = prefect_server.env, prefect_server.log

    # The single-process reference, computed while the server boots.
    ref_url = str(tmp_path / "reference.zarr")
    run_sweep(ref_url, model_name=MODEL, data_spec=DATA, layers=LAYERS, k=K, shard_size=SHARD,
              batch_size=BATCH, device="cpu", progress=False)  # fmt: skip

    marks = {"reference": time.monotonic() - t0}

    # The real project files: pools from deploy/work_pools/*.json, deployments from deploy/prefect.yaml.
    _wait_healthy(env["PREFECT_API_URL"], prefect_server.proc, server_log, SERVER_START_S)
    marks["server"] = time.monotonic() - t0
    pools = DEPLOY / "work_pools"
    create_pools = (
        f"{PREFECT} work-pool create rfatlas-local --type process --base-job-template {pools / 'rfatlas-local.json'}"
        f" && {PREFECT} work-pool create rfatlas-gpu --type kubernetes"
        f" --base-job-template {pools / 'gpu-kubernetes.json'}"
    )
    _check(["bash", "-c", create_pools], env, tmp_path / "pools.log")
    marks["pools"] = time.monotonic() - t0
    # The worker starts while the deployments are made; RFATLAS_REPO is where the pull step `cd`s to.
    worker_env = dict(env, RFATLAS_REPO=str(REPO), PREFECT_WORKER_QUERY_SECONDS="2")
    worker_log = tmp_path / "worker.log"
    worker = _spawn(
        [PREFECT, "worker", "start", "--pool", "rfatlas-local", "--type", "process", "--limit", "1"],
        worker_env,
        worker_log,
    )
    try:
        # = `prefect --no-prompt deploy --prefect-file deploy/prefect.yaml --all` + a fix for a 422 of
        # prefect 3.8.8's client against its server under fastapi 0.154 (see deploy/prefect_deploy.py).
        deploy = [
            sys.executable,
            str(DEPLOY / "prefect_deploy.py"),
            "--prefect-file",
            str(DEPLOY / "prefect.yaml"),
        ]
        _check([*deploy, "--all"], env, tmp_path / "deploy.log")
        marks["deploy"] = time.monotonic() - t0
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_HOME: env["PREFECT_HOME"]}):
            deps = asyncio.run(_read_deployments(DEPLOYMENTS))  # ObjectNotFound if one is missing
            nightly = deps["atlas/atlas-nightly"]
            assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
            assert deps["atlas/atlas-gpu"].work_pool_name == "rfatlas-gpu"
            local = deps["atlas/atlas"]
            assert local.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $RFATLAS_REPO }}"}}
            ]
            store_url = f"{s3_bucket}/atlas.zarr"
            run = run_deployment(
                "atlas/atlas",
                parameters={**PARAMS, "store_url": store_url},
                job_variables={
                    "env": {
                        "RFATLAS_DASK_ADDRESS": worker_cluster.scheduler_address,
                        "RFATLAS_TORCH_THREADS": "1",
                        "PREFECT_LOGGING_LEVEL": "INFO",
                    }
                },
                timeout=0,
            )
            final = asyncio.run(_wait_for_run(run.id, RUN_TIMEOUT_S))
            marks["flow run"] = time.monotonic() - t0
        state = final.state
        logs = "\n\n".join(
            [f"phases (s since start): {marks}", _tail(worker_log, 120), _tail(server_log, 20)]
        )
        assert state is not None and state.is_completed(), f"flow run {final.name}: {state}\n{logs}"
        assert final.name == f"atlas-{MODEL}-{DATA}"
        assert final.work_pool_name == "rfatlas-local"
    finally:
        _stop(worker)
    # The shard/merge/crop tasks ran on the test's Dask cluster, on both of its worker processes.
    from distributed import Client

    with Client(worker_cluster.scheduler_address, timeout=30) as client:
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(executed) == 2 and all(n > 0 for n in executed.values()), executed

    # The atlas on S3 equals the single-process one, array for array (NaN-aware).
    got, ref = open_atlas(store_url), open_atlas(ref_url)
    assert got.layers == ref.layers == LAYERS.split(",")
    assert got.run["num_images"] == ref.run["num_images"] == 64
    for layer in ref.layers:
        a, b = _layer_arrays(got.layer(layer).group), _layer_arrays(ref.layer(layer).group)
        assert sorted(a) == sorted(b), f"{layer}: {sorted(set(a) ^ set(b))}"
        assert {"activation", "topk/value", "topk/image", "topk/patch", "mean_stimulus"} <= set(b)
        for path, want in b.items():
            have = a[path]
            assert have.shape == want.shape and have.dtype == want.dtype, f"{layer}/{path}"
            assert np.array_equal(have, want, equal_nan=want.dtype.kind == "f"), f"{layer}/{path} differs"
        assert got.layer(layer).attrs == ref.layer(layer).attrs
    assert same_store(ref_url, store_url) == []  # also the root/layer attrs and the layout
    # Nothing secret reached the run record, the deployments or the worker's output.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    records = json.dumps([final.model_dump(mode="json")] + [d.model_dump(mode="json") for d in deps.values()])
    assert secret not in records and secret not in worker_log.read_text(errors="replace")
    marks["compare"] = time.monotonic() - t0
    print(f"deployment test phases (s since start): { {k: round(v, 1) for k, v in marks.items()} }")
