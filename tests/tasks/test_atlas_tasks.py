"""The atlas tasks through `.fn()`: shard by shard, out of order, with a rerun, they write the same
store as the single-process pipeline; they return small metadata, never tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rfcore.atlas import open_atlas
from rfcore.errors import ConfigMismatchError, StoreError
from rfcore.pipeline import run_sweep
from rfcore.store import AtlasStore
from tasks import atlas as T
from tasks import runtime

OPTS = dict(
    model="resnet10t",
    weights=None,
    data="synthetic:64",
    layers="conv1,layer2.0",
    k=4,
    shard_size=16,
    batch_size=16,
)


def _sweep_by_tasks(url: str, order: list[int] | None = None) -> dict:
    plan = T.prepare_store.fn(url, **OPTS)
    common = dict(
        model="resnet10t", weights=None, data="synthetic:64",
        image_size=plan["image_size"], resize=plan["resize"], device="cpu",
    )  # fmt: skip
    outs = [
        T.sweep_shard.fn(url, s, plan["num_shards"], **common) for s in (order or range(plan["num_shards"]))
    ]
    for L in plan["layers"]:
        T.merge_layer.fn(url, L)
        T.crop_patches.fn(url, L, data="synthetic:64", image_size=plan["image_size"], resize=plan["resize"])
    return {"plan": plan, "shards": outs}


def test_tasks_match_single_process_pipeline(tmp_path: Path) -> None:
    ref = str(tmp_path / "ref.zarr")
    run_sweep(ref, model_name="resnet10t", data_spec="synthetic:64", layers="conv1,layer2.0", k=4,
              shard_size=16, batch_size=16, device="cpu", progress=False)  # fmt: skip
    url = str(tmp_path / "tasks.zarr")
    res = _sweep_by_tasks(url, order=[3, 1, 0, 2])
    assert res["plan"]["num_shards"] == 4 and res["plan"]["layers"] == ["conv1", "layer2.0"]
    json.dumps(res)  # small, JSON-able metadata only
    assert all(o["images"] == 16 and not o["cached"] for o in res["shards"])
    a, b = open_atlas(ref), open_atlas(url)
    for L in a.layers:
        for path in (
            "activation",
            "topk/value",
            "topk/image",
            "topk/y",
            "topk/x",
            "topk/patch",
            "mean_stimulus",
            "max",
        ):
            np.testing.assert_array_equal(
                a.layer(L).array(path), b.layer(L).array(path), err_msg=f"{L}/{path}"
            )
    # A rerun finds every shard and layer done and changes nothing.
    again = _sweep_by_tasks(url)
    assert all(o["cached"] and o["images"] == 0 for o in again["shards"])
    np.testing.assert_array_equal(
        a.layer("conv1").array("topk/image"), open_atlas(url).layer("conv1").array("topk/image")
    )


def test_prepare_refuses_another_run(tmp_path: Path) -> None:
    url = str(tmp_path / "a.zarr")
    T.prepare_store.fn(url, **OPTS)
    with pytest.raises(ConfigMismatchError):
        T.prepare_store.fn(url, **{**OPTS, "k": 5})
    with pytest.raises(ConfigMismatchError):
        T.prepare_store.fn(url, **{**OPTS, "data": "synthetic:80"})


def test_merge_before_sweep_is_bad_input(tmp_path: Path) -> None:
    url = str(tmp_path / "a.zarr")
    T.prepare_store.fn(url, **OPTS)
    with pytest.raises(StoreError, match="not swept"):
        T.merge_layer.fn(url, "conv1")
    assert AtlasStore.open(url).num_shards == 4


def test_model_is_cached_per_worker() -> None:
    runtime.clear_caches()
    m1 = runtime.cached_model("resnet10t", None, "cpu", 0)
    m2 = runtime.cached_model("resnet10t", None, "cpu", 0)
    assert m1 is m2
    assert runtime.cached_model("resnet10t", None, "cpu", 1) is not m1
    assert runtime.cached_dataset("synthetic:8", 64, 64) is runtime.cached_dataset("synthetic:8", 64, 64)
