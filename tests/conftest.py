"""Shared fixtures: RNG isolation, GPU markers, free ports, a real S3 endpoint (moto_server), offline Prefect."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

# Offline, quiet Prefect for every test process (and the subprocesses they start).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DO_NOT_TRACK", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_rng_state() -> Iterator[None]:
    """Each test starts seeded and leaves the global RNGs as it found them."""
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API (moto_server) on 127.0.0.1; credentials are dummies set in the environment."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ["AWS_ACCESS_KEY_ID"] = "testing-key"
        os.environ["AWS_SECRET_ACCESS_KEY"] = "testing-secret"
        os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
        os.environ["AWS_ENDPOINT_URL"] = endpoint  # read by botocore/aiobotocore (and so s3fs)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket; returns its s3:// URL."""
    import boto3

    name = "rfatlas-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    name = name.rstrip("-") + f"-{os.getpid()}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=name)
    return f"s3://{name}"
