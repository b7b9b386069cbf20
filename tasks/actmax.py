"""Prefect tasks of the activation-maximization analysis (thin wrappers over rfcore.actmax / .virtual)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.runtime import task_run

from rfcore.actmax import actmax_block
from rfcore.store import AtlasStore
from rfcore.virtual import virtual_filter, write_virtual
from tasks.policy import GPU_TAG, TASK_OPTIONS
from tasks.runtime import run_model


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
    model = run_model(store.run, device)
    return actmax_block(store, model, layer, objective, block, channels)


@task(name="virtual-filter", task_run_name="virtual-filter[layer={layer}]", **TASK_OPTIONS)
def virtual_filter_task(store_url: str, layer: str, source: str) -> dict[str, Any]:
    """Write the virtual filters of `layer` through `source` (CPU: weights only)."""
    store = AtlasStore.open(store_url, "r+")
    vf = virtual_filter(run_model(store.run, "cpu"), layer, source)
    write_virtual(store, vf)
    return {"layer": layer, "source": source, "shape": list(vf.weight.shape)}
