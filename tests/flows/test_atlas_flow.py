"""The `atlas` flow under the Prefect test harness, on a real 2-worker Dask cluster: same store as the
single-process pipeline, resume, rerun, identity and lease refusals, artifacts, run names, subflows."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from flows.atlas import atlas, parse_analyses
from rfcore.analysis import list_analyses
from rfcore.atlas import open_atlas
from rfcore.errors import ConfigMismatchError, RfatlasError, StoreLockedError
from rfcore.pipeline import run_sweep
from rfcore.store import AtlasStore
from tasks import atlas as T

pytestmark = pytest.mark.usefixtures("prefect_harness", "one_thread")

DATA, LAYERS, K, SHARD = "synthetic:96", "conv1,maxpool,layer2.0", 4, 32
PARAMS: dict[str, Any] = dict(
    model="resnet10t", data=DATA, layers=LAYERS, k=K, shard_size=SHARD, device="cpu", batch_size=16
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    run_sweep(url, model_name="resnet10t", data_spec=DATA, layers=LAYERS, k=K, shard_size=SHARD,
              batch_size=16, device="cpu", progress=False)  # fmt: skip
    return url


def _run(runner: Any, url: str, **kw: Any) -> dict[str, Any]:
    return atlas.with_options(task_runner=runner())(**{**PARAMS, "store_url": url, **kw})


def test_atlas_flow_matches_single_process(
    dask_runner: Any, reference: str, same_store: Any, tmp_path: Path
) -> None:
    url = str(tmp_path / "a.zarr")
    summary = _run(dask_runner, url)
    assert summary["images_swept"] == 96 and summary["num_shards"] == 3 and summary["shards_run"] == 3
    assert summary["layers"] == ["conv1", "maxpool", "layer2.0"] and summary["channels"] == 16 + 16 + 32
    assert same_store(reference, url) == []
    # Rerun: every shard and layer is done; nothing is recomputed, the store does not change.
    again = _run(dask_runner, url)
    assert again["images_swept"] == 0 and again["images_resumed"] == 96
    assert same_store(reference, url) == []
    # The flow run name is the template's, and the UI gets a progress and a summary artifact.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    async def read() -> tuple[list[str], list[str]]:
        async with get_client() as client:
            runs = await client.read_flow_runs(limit=200, sort=FlowRunSort.START_TIME_DESC)
            resp = await client._client.post("/artifacts/filter", json={"limit": 200, "sort": "CREATED_DESC"})
            arts = resp.json()
        return [r.name for r in runs], [f"{a['type']}:{a['key']}" for a in arts]

    names, arts = asyncio.run(read())
    assert "atlas-resnet10t-synthetic:96" in names
    assert any(a.startswith("progress:") for a in arts), arts
    assert "markdown:atlas-resnet10t" in arts


def test_atlas_flow_resumes_partial_store(
    dask_runner: Any, reference: str, same_store: Any, tmp_path: Path
) -> None:
    url = str(tmp_path / "a.zarr")
    plan = T.prepare_store.fn(url, weights=None, **{k: v for k, v in PARAMS.items() if k != "device"})
    common = dict(
        model="resnet10t", weights=None, data=DATA, image_size=64, resize=plan["resize"], device="cpu"
    )
    T.sweep_shard.fn(url, 1, 3, **common)  # an earlier run finished shard 1 only
    # ... and was killed while writing shard 2: garbage rows, no marker.
    store = AtlasStore.open(url, "r+")
    act = store.layer_group("conv1")["activation"]
    act[64:80] = 123.0
    summary = _run(dask_runner, url)
    assert summary["images_swept"] == 64 and summary["images_resumed"] == 32
    assert same_store(reference, url) == []


def test_atlas_flow_refuses_other_identity_and_live_lease(dask_runner: Any, tmp_path: Path) -> None:
    url = str(tmp_path / "a.zarr")
    T.prepare_store.fn(url, weights=None, **{k: v for k, v in PARAMS.items() if k != "device"})
    with pytest.raises(ConfigMismatchError):
        _run(dask_runner, url, k=8)
    with pytest.raises(ConfigMismatchError):
        _run(dask_runner, url, data="synthetic:64")
    store = AtlasStore.open(url, "r+")
    with store.lease("another run", ttl_s=60), pytest.raises(StoreLockedError, match="another run"):
        _run(dask_runner, url)


def test_analyses_plug_in_as_subflows(dask_runner: Any, tmp_path: Path) -> None:
    url = str(tmp_path / "a.zarr")
    summary = _run(dask_runner, url, analyses="sweep,inactive")
    assert summary["analyses"] == ["sweep", "inactive"] and "inactive" in summary["analysis_results"]
    a = open_atlas(url)
    assert any("inactive" in a.layer(L).group for L in a.layers)


def test_parse_analyses() -> None:
    assert parse_analyses("sweep") == ["sweep"]
    assert parse_analyses(None) == ["sweep"]
    assert parse_analyses("all") == ["sweep", *list_analyses()]
    assert list_analyses()[:4] == ["inactive", "noise", "actmax", "virtual"]
    with pytest.raises(RfatlasError, match="did you mean 'noise'"):
        parse_analyses("sweep,nois")
    assert parse_analyses(["actmax", "inactive"]) == ["sweep", "inactive", "actmax"]
