"""Inactive-channel detection: forced-dead channels are found exactly; stored with threshold and image count."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

from rfcore.analysis import run_local
from rfcore.data import iter_batches, open_dataset
from rfcore.errors import DataError, StoreError, UnknownLayerError
from rfcore.inactive import (
    channel_max,
    default_layer,
    detect_inactive,
    module_at,
    read_inactive,
    write_inactive,
)
from rfcore.models import get_model, model_meta, save_checkpoint
from rfcore.pipeline import run_sweep
from rfcore.schema import LayerAttrs, RunAttrs, spec
from rfcore.store import AtlasStore

DEAD = [2, 7, 11]


def forced_dead_resnet10t() -> nn.Module:
    """resnet10t whose conv1 channels DEAD have zero weights and a negative (BN) bias before the ReLU."""
    model = get_model("resnet10t", seed=3)
    with torch.no_grad():
        cast(nn.Conv2d, model.conv1).weight[DEAD] = 0.0
        cast(nn.BatchNorm2d, model.bn1).bias[DEAD] = -0.5
    return model


def test_detect_inactive_threshold_is_inclusive() -> None:
    mx = np.array([0.0, 0.5, -0.0, 1e-3, -2.0], np.float32)
    assert detect_inactive(mx).tolist() == [True, False, True, False, True]
    assert detect_inactive(mx, threshold=1e-3).tolist() == [True, False, True, True, True]
    with pytest.raises(DataError, match="finite 1-D"):
        detect_inactive(np.array([0.0, np.nan]))


def test_forced_dead_channels_are_detected_exactly() -> None:
    model = forced_dead_resnet10t()
    ds = open_dataset("synthetic:48", size=64)
    mx = channel_max(
        model,
        "maxpool",
        iter_batches(ds, range(48), 16),
        normalize=model_meta(model).preprocessing.normalize,
    )
    assert mx.shape == (16,)
    assert np.flatnonzero(detect_inactive(mx)).tolist() == DEAD
    assert (mx[DEAD] == 0).all()


def test_default_layer_is_first_max_pool_and_unknown_layer_is_suggested() -> None:
    assert default_layer(get_model("resnet10t")) == "maxpool"
    assert default_layer(get_model("alexnet")) == "features.2"
    with pytest.raises(UnknownLayerError, match="no max-pool"):
        default_layer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(UnknownLayerError, match="did you mean 'maxpool'"):
        module_at(get_model("resnet10t"), "maxpol")


def _store(n: int = 10, skipped: int = 0) -> AtlasStore:
    url = f"memory://rfatlas-inactive-{uuid.uuid4().hex}/atlas.zarr"
    run = RunAttrs(
        model="resnet10t",
        weights=None,
        dataset=f"synthetic:{n}",
        num_images=n,
        image_size=64,
        preprocessing={"size": 64, "resize": 64},
        config={"k": 2, "patch_max": 16, "shard_size": 4, "batch_size": 2, "layers": ["maxpool"], "seed": 0},
    )
    rf = {"size": [11, 11], "stride": [4, 4], "offset": [0.0, 0.0]}
    layers = {"maxpool": LayerAttrs("pool", 5, (16, 16), rf, {"factor": 1.0, "size": 11})}
    store = AtlasStore.create(url, run=run, layers=layers, num_images=n, shard_size=4, k=2)
    if skipped:
        from rfcore.data import SkippedImage

        store.add_skipped([SkippedImage(i, f"img{i}.jpg", "truncated") for i in range(skipped)])
    return store


def test_write_inactive_stores_mask_threshold_and_image_count() -> None:
    store = _store(skipped=2)
    with pytest.raises(StoreError, match="no sweep statistics"):
        write_inactive(store, "maxpool")
    with pytest.raises(StoreError, match="no inactive channels detected"):
        read_inactive(store, "maxpool")
    store.require_array(spec("max"), (5,), (5,), layer="maxpool")[:] = np.array([0, 3, 0, 0.1, 2], np.float32)
    mask = write_inactive(store, "maxpool", threshold=0.0)
    assert mask.tolist() == [True, False, True, False, False]
    got, attrs = read_inactive(AtlasStore.open(store.url, "r"), "maxpool")
    assert got.tolist() == mask.tolist()
    assert attrs == {"threshold": 0.0, "num_images": 8, "count": 2, "maxima": "sweep"}
    assert write_inactive(store, "maxpool", threshold=0.1).tolist() == [True, False, True, True, False]
    with pytest.raises(UnknownLayerError, match="no layer"):
        write_inactive(store, "conv1")


def test_maxima_of_a_low_precision_sweep_are_recomputed_in_fp32(tmp_path: Path) -> None:
    """After a bf16 sweep the stored maxima may hold a silent channel's rounded-up pre-activation;
    the inactive analysis measures the maxima again in fp32 over the swept images (paper's Table 1
    lives below bf16 resolution). Simulated: the sweep's markers say bfloat16 and its `max` of the
    dead channels is 1e-3, as a bf16 rounding would leave it."""
    model = forced_dead_resnet10t()
    ckpt = str(tmp_path / "dead.pt")
    save_checkpoint(model, ckpt, config={}, metrics={})
    url = str(tmp_path / "a.zarr")
    run_sweep(url, model_name="resnet10t", weights=ckpt, data_spec="synthetic:24", layers=["conv1"],
              k=2, patch_max=16, shard_size=16, batch_size=8, device="cpu", progress=False)  # fmt: skip
    store = AtlasStore.open(url, "r+")
    swept = store.root["layers/conv1/max"][...]
    assert (swept[DEAD] == 0).all()
    for key in store.done_keys("sweep"):
        info = (store.marker(key) or {})["info"]
        store.mark_done(key, {**info, "precision": "bfloat16"})
    rounded = swept.copy()
    rounded[DEAD] = 1e-3
    store.root["layers/conv1/max"][...] = rounded
    run_local(url, "inactive", {"layers": "conv1"})
    mask, attrs = read_inactive(AtlasStore.open(url, "r"), "conv1")
    assert np.flatnonzero(mask).tolist() == DEAD
    assert attrs["maxima"] == "fp32 recomputed"
    # the fp32 maxima are those of the fp32 sweep: recomputing finds what the sweep found
    ds = open_dataset(
        "synthetic:24", size=int(store.run["image_size"]), resize=store.run["preprocessing"].get("resize")
    )
    again = channel_max(get_model("resnet10t", weights=ckpt).eval(), "conv1", iter_batches(ds, range(24), 8),
                        normalize=model_meta(model).preprocessing.normalize)  # fmt: skip
    np.testing.assert_allclose(again, swept, rtol=1e-5, atol=1e-6)
