"""Helpers of the category-analysis tests (loaded by path: the tests are no package): a tiny atlas
holding one layer's activation and the labels, and report Assets that draw into matplotlib."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rfcore.pipeline import image_arrays
from rfcore.schema import LayerAttrs, RunAttrs, spec, sweep_shard_key
from rfcore.store import AtlasStore


def make_store(
    url: str, act: np.ndarray, labels: np.ndarray, classes: list[str], *, shard: int = 64, layer: str = "l"
) -> AtlasStore:
    """An atlas holding only what the category analyses read: one layer's activation and the labels."""
    n, c = act.shape
    run = RunAttrs("resnet10t", None, f"synthetic:{n}", n, 64, config={"batch_size": shard, "seed": 0})
    la = LayerAttrs(
        "conv",
        c,
        (4, 4),
        {"size": [7, 7], "stride": [2, 2], "offset": [0.0, 0.0]},
        {"factor": 1, "size": 7, "first": [-3, -3]},
    )
    store = AtlasStore.create(url, run=run, layers={layer: la}, num_images=n, shard_size=shard, k=2)
    store.require_array(spec("activation"), (n, c), (shard, c), layer=layer)[...] = act
    label_arr, path_arr = image_arrays(store)
    label_arr[...] = labels
    path_arr[...] = np.array([f"img{i}.png" for i in range(n)], dtype="T")
    store.root.attrs["classes"] = classes
    for i in range(store.num_shards):
        store.mark_done(sweep_shard_key(i))
    return store


class FakeAssets:
    """Assets that draw figures into a matplotlib Figure and keep images in memory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.names = tmp, []

    def image(self, name: str, chw: np.ndarray, *, scale: str = "uint8") -> str:
        assert chw.ndim == 3 and np.isfinite(chw).all()
        self.names.append(name)
        return f"img/{name}.png"

    def figure(
        self,
        name: str,
        draw: Callable[[Any], None],
        *,
        size: tuple[float, float] = (3, 3),
        projection: str | None = None,
    ) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=size)
        draw(fig)
        fig.savefig(self.tmp / f"{name}.png")
        plt.close(fig)
        self.names.append(name)
        return f"img/{name}.png"
