"""Prefect tasks of the activation-maximization analysis (thin wrappers over rfcore.actmax / .virtual)."""

from __future__ import annotations

import threading
from typing import Any

from prefect import task
from prefect.runtime import task_run
from torch import nn

from rfcore.actmax import actmax_block
from rfcore.store import AtlasStore
from rfcore.virtual import virtual_filter, write_virtual
from tasks.policy import GPU_TAG, TASK_OPTIONS
from tasks.runtime import cached_model

_MODEL_LOCK = threading.Lock()


def _model(name: str, weights: str | None, device: str) -> nn.Module:
    """`cached_model`, one thread at a time: random-init builds seed the process-global RNG, so
    concurrent first calls from task threads would interleave their draws and build other weights."""
    with _MODEL_LOCK:
        return cached_model(name, weights, device)


def _block_run_name() -> str:
    p = task_run.parameters
    channels = p["channels"]
    return f"actmax[layer={p['layer']}, {p['objective']}, channels={channels[0]}-{channels[-1]}]"


@task(name="actmax", task_run_name=_block_run_name, tags=[GPU_TAG], **TASK_OPTIONS)
def actmax_block_task(
    store_url: str, layer: str, objective: str, block: int, channels: list[int], device: str = "auto"
) -> dict[str, Any]:
    """Render one (layer, objective, channel block) with the settings in the store; skips a done block."""
    store = AtlasStore.open(store_url, "r+")
    model = _model(store.run["model"], store.run.get("weights"), device)
    return actmax_block(store, model, layer, objective, block, channels)


@task(name="virtual-filter", task_run_name="virtual-filter[layer={layer}]", **TASK_OPTIONS)
def virtual_filter_task(store_url: str, layer: str, source: str) -> dict[str, Any]:
    """Write the virtual filters of `layer` through `source` (CPU: weights only)."""
    store = AtlasStore.open(store_url, "r+")
    vf = virtual_filter(_model(store.run["model"], store.run.get("weights"), "cpu"), layer, source)
    write_virtual(store, vf)
    return {"layer": layer, "source": source, "shape": list(vf.weight.shape)}
