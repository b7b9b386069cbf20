"""Prefect tasks of the inactive-channel and noise-injection analyses (thin wrappers over rfcore)."""

from __future__ import annotations

from typing import Any

from prefect import Task, task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from rfcore.inactive import write_inactive
from rfcore.models import select_device
from rfcore.noise import noise_shard, summarize_store
from rfcore.store import AtlasStore
from tasks.runtime import cached_dataset, cached_model


def io_only(_task: Task[Any, Any], _run: TaskRun, state: State[Any]) -> bool:
    """Retry condition: retry only I/O failures (OSError), never bad input or logic errors."""
    return isinstance(state.data, OSError)


@task(name="inactive", retries=2, retry_delay_seconds=2, retry_condition_fn=io_only)
def detect_inactive_task(store_url: str, layer: str, threshold: float = 0.0) -> dict[str, Any]:
    """Write `layers/<layer>/inactive` from the sweep's max; return the inactive channels."""
    inactive = write_inactive(AtlasStore.open(store_url, "r+"), layer, threshold)
    return {"layer": layer, "threshold": threshold, "inactive": [int(i) for i in inactive.nonzero()[0]]}


@task(
    name="noise",
    task_run_name="noise[layer={layer}, cond={condition}, shard={shard:04d}/{n_shards:04d}]",
    tags=["gpu"],
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=io_only,
)
def noise_shard_task(
    store_url: str, layer: str, condition: str, shard: int, n_shards: int, device: str = "auto"
) -> dict[str, Any]:
    """Evaluate one shard under one noise condition; writes per-image results and the shard marker."""
    store = AtlasStore.open(store_url, "r+")
    run = store.run
    model = cached_model(run["model"], run.get("weights"), device)
    size = int(run["image_size"])
    dataset = cached_dataset(run["dataset"], size, run.get("preprocessing", {}).get("resize"))
    return noise_shard(
        store, layer, condition, shard, model=model, dataset=dataset, device=select_device(device)
    )


@task(name="noise-summary", retries=2, retry_delay_seconds=2, retry_condition_fn=io_only)
def noise_summary_task(store_url: str, layer: str, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Losses, accuracies, ΔL and bootstrap CIs into `noise/<layer>` attrs; returns the summary."""
    return summarize_store(AtlasStore.open(store_url, "r+"), layer, n_boot=n_boot, seed=seed)
