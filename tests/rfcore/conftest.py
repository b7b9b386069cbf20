"""Fixtures of the rfcore tests: a tiny, fully written atlas for the site and xarray tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torchvision import models as tvm

from rfcore.actmax import ACTMAX_ARRAYS
from rfcore.data import SkippedImage
from rfcore.inactive import INACTIVE_SPEC
from rfcore.schema import SWEEP_ARRAYS, LayerAttrs, RunAttrs, spec
from rfcore.store import AtlasStore
from rfcore.virtual import VIRTUAL_ARRAYS

TINY = {"channels": {"conv1": 4, "layer1.0": 6}, "k": 3, "patch": 5, "images": 12}
RF = {"size": [7, 7], "stride": [2, 2], "offset": [0.0, 0.0]}
FLOW_RUN = "http://127.0.0.1:4200/runs/flow-run/00000000-0000-0000-0000-000000000000"


def make_tiny_atlas(url: str, *, labels: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Two complete layers (conv1: act-max images; layer1.0: an inactive channel, a channel with one
    hit, a virtual filter through conv1), image labels/paths/classes, a skipped image and the flow
    run URL. Returns {layer: {array path: values}}."""
    n, k, p = TINY["images"], TINY["k"], TINY["patch"]
    names = list(TINY["channels"])
    run = RunAttrs(
        model="resnet10t", weights=None, dataset=f"synthetic:{n}", num_images=n, image_size=32,
        config={"k": k, "patch_max": 8, "shard_size": 6, "batch_size": 6, "layers": names, "seed": 0},
    )  # fmt: skip
    layers = {
        name: LayerAttrs("conv" if name == "conv1" else "block", c, (8, 8), RF, {"factor": 1.0, "size": p})
        for name, c in TINY["channels"].items()
    }
    store = AtlasStore.create(url, run=run, layers=layers, num_images=n, shard_size=6, k=k)
    rng = np.random.default_rng(0)
    written: dict[str, dict[str, np.ndarray]] = {}
    for name, c in TINY["channels"].items():
        sizes = {"image": n, "channel": c, "k": k, "color": 3, "py": p, "px": p}
        data: dict[str, np.ndarray] = {}
        for s in SWEEP_ARRAYS:
            if not s.path.startswith("partial/"):
                data[s.path] = (rng.random(s.shape(sizes)) * 250).astype(s.dtype)
        data["topk/image"] = np.stack([rng.permutation(n)[:k] for _ in range(c)]).astype(np.int64)
        data["topk/value"] = -np.sort(-data["topk/value"], axis=1)
        if name == "layer1.0":
            data["topk/image"][2, 1:] = -1  # channel 2: a single hit
            data["topk/image"][1] = -1  # channel 1: inactive, no hit
            data["topk/value"][1] = 0.0
            data["max"][1] = 0.0
            data["mean_stimulus"][1] = np.nan
            data["inactive"] = np.arange(c) == 1
        for path, values in data.items():
            s = INACTIVE_SPEC if path == "inactive" else spec(path)
            store.require_array(s, values.shape, values.shape, layer=name)[...] = values
        store.set_layer_attrs(name, complete=True)
        written[name] = data
    # act-max images of conv1 (channels 0, 1 rendered; 2, 3 not) in [0, 1]
    c = TINY["channels"]["conv1"]
    for objective in ("channel", "neuron"):
        image = np.full((c, 3, 16, 16), np.nan, dtype=np.float32)
        image[:2] = rng.random((2, 3, 16, 16))
        store.require_array(
            ACTMAX_ARRAYS["image"], image.shape, image.shape, layer="conv1", objective=objective
        )[...] = image
        written["conv1"][f"actmax/{objective}/image"] = image
    crop = np.full((c, 3, 7, 7), np.nan, dtype=np.float32)
    crop[:2] = rng.random((2, 3, 7, 7))
    store.require_array(ACTMAX_ARRAYS["crop"], crop.shape, crop.shape, layer="conv1")[...] = crop
    written["conv1"]["actmax/neuron/crop"] = crop
    # virtual filter of layer1.0 through conv1
    c2, c1 = TINY["channels"]["layer1.0"], TINY["channels"]["conv1"]
    vf = rng.normal(size=(c2, c1, 3, 3)).astype(np.float32)
    coupling = -np.sort(-rng.random((c2, c1)), axis=1).astype(np.float32)
    index = np.stack([rng.permutation(c1) for _ in range(c2)]).astype(np.int64)
    for nm, values in (
        ("virtual_filter", vf),
        ("virtual_coupling", coupling),
        ("virtual_coupling_index", index),
    ):
        arr = store.require_array(VIRTUAL_ARRAYS[nm], values.shape, values.shape, layer="layer1.0")
        arr[...] = values
        arr.attrs.update({"layer": "layer1.0", "source": "conv1"})
        written["layer1.0"][nm] = values
    if labels:
        root = store.root
        lab = root.create_array("images/label", shape=(n,), dtype="int64", dimension_names=("image",))
        lab[...] = np.arange(n) % 3
        pth = root.create_array("images/path", shape=(n,), dtype=str, dimension_names=("image",))
        pth[...] = np.array([f"/data/val/img_{i:03d}.png" for i in range(n)])
        root.attrs.update({"classes": ["cat", "dog", "fish"]})
    store.root.attrs.update({"prefect_flow_run_url": FLOW_RUN})
    store.add_skipped([SkippedImage(4, "/data/bad <1>.jpg", "truncated")])
    return written


@pytest.fixture
def tiny_atlas(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    url = str(tmp_path / "tiny.zarr")
    return url, make_tiny_atlas(url)


@pytest.fixture
def tiny_kit() -> SimpleNamespace:
    """The tiny atlas's builder and constants (test modules cannot import conftest by name)."""
    return SimpleNamespace(make=make_tiny_atlas, TINY=TINY, FLOW_RUN=FLOW_RUN)


@pytest.fixture
def other_thread_forwards() -> Iterator[Callable[[], list[Exception]]]:
    """Forward passes of another model, in another thread, from the start of the test; the test
    calls the fixture's value to stop them and get the errors they met."""
    other, errors, stop = tvm.resnet18().eval(), [], threading.Event()

    def forward_loop() -> None:
        try:
            with torch.no_grad():
                while not stop.is_set():
                    other(torch.zeros(1, 3, 32, 32))
        except Exception as exc:  # reported to the test
            errors.append(exc)

    thread = threading.Thread(target=forward_loop)
    thread.start()

    def finish() -> list[Exception]:
        stop.set()
        thread.join()
        return errors

    yield finish
    finish()
