"""The actmax subflow, its tasks and `rfatlas actmax` on a tiny sweep-less atlas (Prefect test harness)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import rfcore.actmax as am
from flows.actmax import actmax_analysis, quick_look_store, register_cli
from rfcore.errors import ConfigMismatchError, StoreError
from rfcore.models import get_model
from rfcore.store import AtlasStore
from rfcore.virtual import virtual_filter
from tasks.actmax import actmax_block_task

LAYER = "layer1.0.conv1"  # 16 channels, 16×16 map on the 64 px input


@pytest.fixture(scope="module", autouse=True)
def harness(prefect_harness: None) -> Iterator[None]:
    """The session's Prefect harness; one torch thread (tiny convs on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def arrays(url: str, objective: str) -> dict[str, zarr.Array]:
    group = AtlasStore.open(url, "r").root[f"layers/{LAYER}/actmax/{objective}"]
    assert isinstance(group, zarr.Group)
    return {name: node for name, node in group.arrays()}


def test_subflow_writes_blocks_resumes_and_writes_virtual_filters(tmp_path: Path) -> None:
    url = str(tmp_path / "atlas.zarr")
    quick_look_store(url, "resnet10t", None, LAYER)
    res = actmax_analysis(
        url, layers=[LAYER], channels="0-11", overrides={"steps": 3}, block_size=8, device="cpu"
    )
    assert (res["blocks_run"], res["blocks_skipped"]) == (4, 0)  # 2 objectives × blocks 0-7, 8-11
    model = get_model("resnet10t")
    config = am.preset("kobayashi2020", steps=3)
    for objective in am.OBJECTIVES:
        got = arrays(url, objective)
        assert got["image"].shape == (16, 3, 64, 64) and got["trace"].shape == (16, 3)
        assert tuple(got["image"].metadata.dimension_names) == ("channel", "color", "y", "x")
        want = am.actmax(model, LAYER, list(range(12)), objective=objective, config=config)
        np.testing.assert_allclose(got["image"][:12], want.image.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["activation"][:12], want.activation.numpy(), rtol=1e-4, atol=1e-4)
        assert np.isnan(got["activation"][12:]).all()
    crop = arrays(url, "neuron")["crop"]
    assert crop.shape[0] == 16 and tuple(crop.metadata.dimension_names) == ("channel", "color", "ry", "rx")
    # the fully covered block 0 is done, the partial block 1 (8-11 of 8-15) is not
    store = AtlasStore.open(url, "r")
    assert store.is_done(am.block_key(LAYER, "channel", 0)) and not store.is_done(
        am.block_key(LAYER, "channel", 1)
    )
    again = actmax_analysis(
        url, layers=[LAYER], channels="0-11", overrides={"steps": 3}, block_size=8, device="cpu"
    )
    assert (again["blocks_run"], again["blocks_skipped"]) == (2, 2)
    # virtual filters of the default conv layers, equal to rfcore.virtual's
    assert [v["layer"] for v in res["virtual_filters"]] == [LAYER, "layer2.0.downsample.0"]
    root = store.root
    for layer in (LAYER, "layer2.0.downsample.0"):
        vf = virtual_filter(model, layer, "conv1")
        arr = root[f"layers/{layer}/virtual_filter"]
        assert isinstance(arr, zarr.Array) and arr.attrs["source"] == "conv1"
        assert tuple(arr.metadata.dimension_names) == ("channel", "in_channel", "ky", "kx")
        np.testing.assert_allclose(arr[...], vf.weight.numpy())
        np.testing.assert_array_equal(
            root[f"layers/{layer}/virtual_coupling_index"][...], vf.coupling_index.numpy()
        )
    with pytest.raises(ConfigMismatchError, match="other settings"):
        actmax_analysis(
            url, layers=[LAYER], channels="0-11", overrides={"steps": 4}, block_size=8, device="cpu"
        )


def test_block_task_runs_directly_and_marks_its_block(tmp_path: Path) -> None:
    url = str(tmp_path / "atlas.zarr")
    store = quick_look_store(url, "resnet10t", None, LAYER)
    am.prepare_actmax(
        store,
        get_model("resnet10t"),
        LAYER,
        "channel",
        config=am.preset("lucid", steps=2, size=32),
        block_size=8,
    )
    out = actmax_block_task.fn(url, LAYER, "channel", 1, list(range(8, 16)), "cpu")
    assert out["skipped"] is False and store.is_done(am.block_key(LAYER, "channel", 1))
    assert actmax_block_task.fn(url, LAYER, "channel", 1, list(range(8, 16)), "cpu")["skipped"] is True
    image = arrays(url, "channel")["image"]
    assert image.shape == (16, 3, 32, 32) and not np.isnan(image[8:]).any() and np.isnan(image[:8]).all()


def test_cli_quick_look(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="rfatlas")
    register_cli(parser.add_subparsers())
    url = str(tmp_path / "look.zarr")
    args = parser.parse_args(
        [
            "actmax",
            "--model",
            "resnet10t",
            "--layer",
            "conv1",
            "--channels",
            "0-3",
            "--steps",
            "2",
            "--objectives",
            "channel",
            "--init",
            "random",
            "--device",
            "cpu",
            "--out",
            url,
        ]
    )
    assert args.func(args) == 0
    assert "conv1 channels 0-3" in capsys.readouterr().out
    group = AtlasStore.open(url).root["layers/conv1/actmax/channel"]
    assert not np.isnan(group["activation"][:4]).any() and group.attrs["config"]["init"] == "random"
    other = parser.parse_args(["actmax", "--model", "resnet18", "--layer", "conv1", "--out", url])
    with pytest.raises(ConfigMismatchError, match="holds resnet10t"):
        other.func(other)
    # the quick look, on an existing atlas: the model comes from the store
    again = parser.parse_args(["actmax", "--layer", "conv1", "--channels", "4-5", "--steps", "2", "--init", "random",
                               "--objectives", "channel", "--device", "cpu", "--out", url])  # fmt: skip
    assert again.func(again) == 0
    assert not np.isnan(AtlasStore.open(url).root["layers/conv1/actmax/channel/activation"][4:6]).any()
    fresh = parser.parse_args(["actmax", "--layer", "conv1", "--out", str(tmp_path / "new.zarr")])
    with pytest.raises(StoreError, match="give --model"):
        fresh.func(fresh)
