"""Fixtures of the flow tests: one Prefect test harness and one 2-worker Dask cluster per session, and
a store comparison (array for array) used by the resume and fault tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zarr


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API (SQLite) for the whole session: starting one costs seconds."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):
        yield


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[Any]:
    """Two real worker processes × 1 thread (torch: 1 thread each); flows connect by address."""
    from distributed import LocalCluster

    from flows.runner import cluster_kwargs

    kw = cluster_kwargs(2, device="cpu", threads=1)
    with LocalCluster(**kw) as cluster:
        yield cluster


@pytest.fixture
def dask_runner(dask_cluster: Any) -> Callable[[], Any]:
    from prefect_dask import DaskTaskRunner

    return lambda: DaskTaskRunner(address=dask_cluster.scheduler_address)


def _walk(group: zarr.Group, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, node in group.members():
        path = f"{prefix}{name}"
        if path == "_state":  # completion markers and lease carry wall-clock times
            continue
        if isinstance(node, zarr.Array):
            out[path] = node
        else:
            out[path + "/"] = dict(node.attrs)
            out.update(_walk(node, path + "/"))
    return out


def store_diff(url_a: str, url_b: str) -> list[str]:
    """Differences between two atlases (arrays bit for bit, attrs, layout); [] when identical. The root
    attr naming the flow run that last wrote the store is provenance and is not compared."""
    from rfcore.site import FLOW_RUN_ATTR
    from rfcore.store import AtlasStore

    a, b = AtlasStore.open(url_a).root, AtlasStore.open(url_b).root
    problems = []
    # provenance, not results: the UI link of the flow run that last wrote the store
    attrs_a, attrs_b = ({k: v for k, v in dict(g.attrs).items() if k != FLOW_RUN_ATTR} for g in (a, b))
    if attrs_a != attrs_b:
        problems.append(f"root attrs differ: {attrs_a} vs {attrs_b}")
    na, nb = _walk(a), _walk(b)
    if set(na) != set(nb):
        problems.append(f"layout differs: {sorted(set(na) ^ set(nb))}")
    for path in sorted(set(na) & set(nb)):
        x, y = na[path], nb[path]
        if isinstance(x, dict):
            if x != y:
                problems.append(f"{path} attrs differ")
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{path}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
            continue
        if not np.array_equal(x[...], y[...], equal_nan=x.dtype.kind == "f"):
            problems.append(f"{path}: values differ")
    return problems


@pytest.fixture
def same_store() -> Callable[[str, str], list[str]]:
    return store_diff


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on 1 thread in this process, as on the test cluster's workers (same float kernels)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("RFATLAS_TORCH_THREADS", "1")
    try:
        yield
    finally:
        torch.set_num_threads(before)
