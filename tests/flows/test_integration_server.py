"""Real parts end to end: `prefect server start` on 127.0.0.1, the process work pool `rfatlas-local`,
`prefect worker start`, the `atlas` deployment of deploy/prefect.yaml triggered through the API, a store
on a real S3 endpoint (moto_server) swept by a local Dask cluster of 2 worker processes; the results
read back with `rfcore.open_atlas` equal a single-process run, and no credential leaks anywhere."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
POOL = "rfatlas-local"
PARAMS: dict[str, Any] = dict(
    model="resnet10t",
    data="synthetic:96",
    layers="conv1,layer1.0",
    k=4,
    shard_size=32,
    batch_size=16,
    device="cpu",
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prefect(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("prefect")
    return subprocess.run(
        [str(exe), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`prefect server start` with its own PREFECT_HOME; yields the environment that talks to it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "RFATLAS_REPO": str(REPO),
        "RFATLAS_DASK_WORKERS": "2",
    }
    exe = Path(sys.executable).with_name("prefect")
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [str(exe), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield env
    finally:
        _stop(proc)
        log.close()


def test_deployment_on_process_pool_with_s3_and_dask(
    prefect_server: dict[str, str], s3_bucket: str, tmp_path: Path, same_store: Any, one_thread: None
) -> None:
    env = {**prefect_server, **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")}}
    res = _prefect(env, "work-pool", "create", POOL, "--type", "process", "--base-job-template",
                   "deploy/work_pools/rfatlas-local.json")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    deploy = subprocess.run(
        [sys.executable, "deploy/prefect_deploy.py", "--prefect-file", "deploy/prefect.yaml",
         "--name", "atlas", "--name", "train", "--name", "demo"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", POOL, "--type", "process"],
        env=env, cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    store_url = f"{s3_bucket}/atlas/resnet10t.zarr"
    try:
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            run = run_deployment(
                "atlas/atlas", parameters={**PARAMS, "store_url": store_url}, timeout=480, poll_interval=2,
                as_subflow=False,
            )  # fmt: skip
            logs = asyncio.run(_flow_run_logs(run.id))
            artifacts = asyncio.run(_artifacts())
    finally:
        _stop(worker)
        worker_log.close()
    wlog = (tmp_path / "worker.log").read_text()
    assert run.state is not None and run.state.is_completed(), f"{run.state}\n{wlog[-4000:]}"
    assert run.name == "atlas-resnet10t-synthetic:96"

    # The results read back from S3 equal a single-process, single-thread run.
    from rfcore.pipeline import run_sweep
    from rfcore.store import open_atlas

    ref = str(tmp_path / "ref.zarr")
    run_sweep(ref, model_name="resnet10t", data_spec="synthetic:96", layers="conv1,layer1.0", k=4,
              shard_size=32, batch_size=16, device="cpu", progress=False)  # fmt: skip
    atlas = open_atlas(store_url)
    assert atlas.layers == ["conv1", "layer1.0"] and atlas.store.num_shards == 3
    for name in atlas.layers:
        np.testing.assert_array_equal(
            atlas.layer(name).array("topk/image"), open_atlas(ref).layer(name).array("topk/image")
        )
    assert same_store(ref, store_url) == []
    # Two Dask worker processes shared the shards (the logs name the worker of each shard).
    assert any("with 2 workers" in ln for ln in logs), logs
    assert sum(ln.startswith("shard ") for ln in logs) == 3, logs
    # Credentials never appear in logs, artifacts or store attrs.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    key = os.environ["AWS_ACCESS_KEY_ID"]
    blob = json.dumps(dict(atlas.store.root.attrs)) + "\n".join(logs) + json.dumps(artifacts, default=str)
    assert secret not in blob and key not in blob
    assert any(a["type"] == "markdown" for a in artifacts) and any(a["type"] == "progress" for a in artifacts)


async def _flow_run_logs(flow_run_id: Any) -> list[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        resp = await client._client.post(
            "/logs/filter", json={"limit": 200, "offset": 0, "sort": "TIMESTAMP_ASC"}
        )
        return [r["message"] for r in resp.json()]


async def _artifacts() -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        resp = await client._client.post(
            "/artifacts/filter", json={"limit": 200, "offset": 0, "sort": "CREATED_DESC"}
        )
        return list(resp.json())
