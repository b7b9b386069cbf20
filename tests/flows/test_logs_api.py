"""Monitoring: a quiet `rfatlas run` (no -v) against a real `prefect server` still sends the atlas
flow's, its Dask tasks' and its analysis subflows' INFO logs to the API (the UI's Logs tab), while the terminal shows no
INFO log lines (only the progress bar and the summary); the store records the flow run's UI URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zarr

from tests.conftest import free_port
from tests.flows.test_deployment import PREFECT, REPO, Server, _spawn, _stop, _tail, _wait_healthy

pytestmark = [pytest.mark.integration]


def _post(api: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"{api}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[Server]:
    """A bare `prefect server start --no-services --no-ui` (the API alone: enough for runs and logs,
    and quick to start) with its own PREFECT_HOME; stopped on teardown."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    for key in (
        "PREFECT_API_KEY",
        "PREFECT_PROFILE",
        "PREFECT_LOGGING_LEVEL",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",
    ):
        env.pop(key, None)  # the CLI's own logging defaults, as a user gets them
    log = tmp_path / "server.log"
    cmd = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-services", "--no-ui"]
    proc = _spawn(cmd, env, log)
    try:
        yield Server(env, proc, log)
    finally:
        _stop(proc)


def test_quiet_cli_run_logs_reach_the_api(api_server: Server, tmp_path: Path) -> None:
    prefect_server = api_server
    env = dict(prefect_server.env)
    api = env["PREFECT_API_URL"]
    t0 = time.monotonic()
    _wait_healthy(api, prefect_server.proc, prefect_server.log, timeout=120)
    started = time.monotonic() - t0
    out = tmp_path / "atlas.zarr"
    cmd = [sys.executable, "-m", "flows.cli", "run", "--model", "resnet10t", "--data", "synthetic:8",
           "--layers", "conv1,maxpool", "--k", "2", "--shard-size", "8", "--batch-size", "8", "--workers", "1",
           "--device", "cpu", "--analyses", "sweep,inactive", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{_tail(prefect_server.log)}"
    terminal = proc.stdout + proc.stderr
    assert "swept 8 images" in proc.stdout
    assert "| INFO " not in terminal, terminal[-2000:]  # no Prefect INFO lines on the console

    runs = _post(api, "/flow_runs/filter", {"flow_runs": {"name": {"any_": ["atlas-resnet10t-synthetic:8"]}}})
    assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED"
    logs: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20  # the API handler ships logs in batches
    while time.monotonic() < deadline:
        logs = _post(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [runs[0]["id"]]}}, "limit": 200})
        if any(lg["task_run_id"] for lg in logs) and any("done in" in lg["message"] for lg in logs):
            break
        time.sleep(1)
    flow_logs = [lg["message"] for lg in logs if not lg["task_run_id"] and lg["level"] == 20]
    task_logs = [lg["message"] for lg in logs if lg["task_run_id"] and lg["level"] == 20]
    assert any("task runner:" in m for m in flow_logs), flow_logs
    assert any("done in" in m for m in flow_logs), flow_logs
    assert any(m.startswith("merged 2 layers") for m in task_logs), task_logs  # from the Dask worker

    # the analysis subflow (named by its template) sends its own flow and task logs too
    subs = _post(api, "/flow_runs/filter", {"flows": {"name": {"any_": ["analysis"]}}})
    assert len(subs) == 1 and subs[0]["name"].startswith("inactive") and subs[0]["parent_task_run_id"]
    sub_logs: list[dict[str, Any]] = []
    while time.monotonic() < deadline + 10 and not any(lg["task_run_id"] for lg in sub_logs):
        sub_logs = _post(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [subs[0]["id"]]}}})
        time.sleep(0.5)
    assert any(lg["task_run_id"] for lg in sub_logs) and any(not lg["task_run_id"] for lg in sub_logs), (
        sub_logs
    )

    # the store names the run that made it (the site links to it)
    root = zarr.open_group(str(out), mode="r")
    assert str(root.attrs["prefect_flow_run_url"]).endswith(f"/flow-runs/flow-run/{runs[0]['id']}")
    print(f"API up in {started:.0f} s; quiet run + log check in {time.monotonic() - t0 - started:.0f} s")
