"""Prefect tasks of the inactive-channel and noise-injection analyses (thin wrappers over rfcore)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import task

from rfcore.inactive import write_inactive
from rfcore.models import select_device
from rfcore.noise import noise_shard, prepare_noise, summarize_store
from rfcore.store import AtlasStore
from tasks.policy import GPU_TAG, TASK_OPTIONS
from tasks.runtime import configure_threads_from_env, run_dataset, run_model


@task(name="inactive", task_run_name="inactive[layer={layer}]", **TASK_OPTIONS)
def detect_inactive_task(store_url: str, layer: str, threshold: float = 0.0) -> dict[str, Any]:
    """Write `layers/<layer>/inactive` from the sweep's max; return the inactive channels."""
    inactive = write_inactive(AtlasStore.open(store_url, "r+"), layer, threshold)
    return {"layer": layer, "threshold": threshold, "inactive": [int(i) for i in inactive.nonzero()[0]]}


@task(name="noise-prepare", task_run_name="noise-prepare[layer={layer}]", **TASK_OPTIONS)
def prepare_noise_task(
    store_url: str, layer: str, conditions: Sequence[str], sigma: float, seed: int, threshold: float
) -> list[tuple[str, int]]:
    """Inactive channels (if needed), noise config and arrays; the pending (condition, shard) pairs."""
    store = AtlasStore.open(store_url, "r+")
    return prepare_noise(store, layer, conditions=conditions, sigma=sigma, seed=seed, threshold=threshold)


@task(
    name="noise",
    task_run_name="noise[layer={layer}, cond={condition}, shard={shard:04d}/{num_shards:04d}]",
    tags=[GPU_TAG],
    **TASK_OPTIONS,
)
def noise_shard_task(
    store_url: str, layer: str, condition: str, shard: int, num_shards: int, device: str = "auto"
) -> dict[str, Any]:
    """Evaluate one shard under one noise condition (`num_shards` only names the run); writes the
    per-image results, then the shard's completion marker."""
    configure_threads_from_env()
    store = AtlasStore.open(store_url, "r+")
    run = store.run
    model = run_model(run, device)
    dataset = run_dataset(run, labels=True)  # labels in the model's classes (Imagenette -> ImageNet)
    return noise_shard(
        store, layer, condition, shard, model=model, dataset=dataset, device=select_device(device)
    )


@task(name="noise-summary", task_run_name="noise-summary[layer={layer}]", **TASK_OPTIONS)
def noise_summary_task(store_url: str, layer: str, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Losses, accuracies, ΔL and bootstrap CIs into `noise/<layer>` attrs; returns the summary."""
    return summarize_store(AtlasStore.open(store_url, "r+"), layer, n_boot=n_boot, seed=seed)
