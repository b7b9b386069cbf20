"""Thin Prefect tasks of the atlas sweep over `rfcore.pipeline`; each returns a small dict, never tensors.

Bulk results go only into the Zarr store: a shard writes its activation rows and reducer partials
into the store's own chunks, then its completion marker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from prefect import task

from rfcore import pipeline
from rfcore.store import AtlasStore
from tasks.policy import GPU_TAG, TASK_OPTIONS, task_logger
from tasks.runtime import cached_dataset, cached_model, configure_worker


def _fingerprint(store_url: str) -> str | None:
    """The data fingerprint the atlas was made with (a cached dataset that differs is reopened)."""
    fingerprint = AtlasStore.open(store_url).run.get("data_fingerprint")
    return None if fingerprint is None else str(fingerprint)


def _where() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dask_worker() -> Any:
    """The Dask worker running this task, or None."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def warm_worker(
    model: str, weights: str | None, device: str, seed: int, data: str, image_size: int, resize: int | None
) -> None:
    """Load a run's model and dataset into this worker's caches ahead of its first shard."""
    configure_worker()
    cached_model(model, weights, device, seed)
    cached_dataset(data, image_size, resize)


@task(name="prepare-store", task_run_name="prepare[{model}]", **TASK_OPTIONS)
def prepare_store(
    store_url: str,
    *,
    model: str,
    weights: str | None,
    data: str,
    layers: str | Sequence[str] = "default",
    k: int = 16,
    shard_size: int = pipeline.DEFAULT_SHARD_SIZE,
    batch_size: int = 64,
    patch_max: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Create the atlas (or reopen it when the run identity matches); returns its plan."""
    store = pipeline.prepare_store(
        store_url,
        model_name=model,
        weights=weights,
        data_spec=data,
        layers=layers,
        k=k,
        patch_max=patch_max,
        shard_size=shard_size,
        batch_size=batch_size,
        seed=seed,
    )
    run = store.run
    return {
        "store_url": store.url,  # `{weights_digest}` filled in
        "num_images": int(run["num_images"]),
        "num_shards": store.num_shards,
        "shard_size": int(run["config"]["shard_size"]),
        "layers": list(run["config"]["layers"]),
        "image_size": int(run["image_size"]),
        "resize": run["preprocessing"].get("resize"),
    }


@task(
    name="sweep-shard",
    task_run_name="sweep[shard={shard:04d}/{num_shards:04d}]",
    tags=[GPU_TAG],
    **TASK_OPTIONS,
)
def sweep_shard(
    store_url: str,
    shard: int,
    num_shards: int,
    *,
    model: str,
    weights: str | None,
    data: str,
    image_size: int,
    resize: int | None,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """One shard of images → activation rows and reducer partials in the store, then its marker.

    Returns {shard, images, skipped, seconds, cached, worker, load_seconds}."""
    t0 = time.perf_counter()
    threads = configure_worker()
    net = cached_model(model, weights, device, seed)  # keyed by the checkpoint's digest
    dataset = cached_dataset(data, image_size, resize, _fingerprint(store_url))
    load = time.perf_counter() - t0
    out = pipeline.sweep_shard(store_url, shard, model=net, dataset=dataset, device=device)
    out.update(worker=_where(), load_seconds=load, threads=threads)
    if not out["cached"]:
        task_logger().info(
            "shard %d/%d: %d images in %.2f s on %s (%d skipped)",
            shard, num_shards, out["images"], out["seconds"], out["worker"], len(out["skipped"]),
        )  # fmt: skip
    return out


@task(
    name="sweep-shards",
    task_run_name="sweep[shards={first:04d}-{last:04d}/{num_shards:04d}]",
    tags=[GPU_TAG],
    **TASK_OPTIONS,
)
def sweep_shards(
    store_url: str,
    shards: list[int],
    num_shards: int,
    *,
    first: int,
    last: int,
    model: str,
    weights: str | None,
    data: str,
    image_size: int,
    resize: int | None,
    device: str = "auto",
    seed: int = 0,
    progress_topic: str | None = None,
) -> list[dict[str, Any]]:
    """Several shards as one pipeline (`rfcore.pipeline.sweep_shards`: decoding ahead, each shard
    written while the next computes, the reducer state written once per group of shards with one
    marker listing them), so resume and retries redo only unmarked groups. On a Dask worker, each finished shard is also announced as a Dask
    event `{shard, images}` on `progress_topic` (the flow's progress bar and artifact, per shard).
    Returns one dict per shard (as `sweep_shard`)."""
    t0 = time.perf_counter()
    threads = configure_worker()
    net = cached_model(model, weights, device, seed)
    dataset = cached_dataset(data, image_size, resize)
    load = time.perf_counter() - t0
    log = task_logger()
    where = _where()
    worker = _dask_worker() if progress_topic else None

    def finished(out: dict[str, Any]) -> None:
        if worker is not None and not out["cached"]:
            with contextlib.suppress(Exception):  # progress is best effort
                worker.log_event(progress_topic, {"shard": int(out["shard"]), "images": int(out["images"])})
        if not out["cached"]:
            log.info(
                "shard %d/%d: %d images in %.2f s on %s (%d skipped)",
                out["shard"], num_shards, out["images"], out["seconds"], where, len(out["skipped"]),
            )  # fmt: skip

    outs = pipeline.sweep_shards(
        store_url, shards, model=net, dataset=dataset, device=device, on_shard=finished
    )
    for out in outs:
        out.update(worker=where, load_seconds=load, threads=threads)
    return outs


@task(name="merge-crop", task_run_name="merge-crop[{first}..{last}]", **TASK_OPTIONS)
def merge_crop(
    store_url: str,
    layers: list[str],
    *,
    first: str,
    last: str,
    data: str,
    image_size: int,
    resize: int | None,
) -> dict[str, Any]:
    """Merge, then crop, a group of layers in one task: merges run concurrently, crops read each
    winning image once for all the group's layers."""
    configure_worker()
    t0 = time.perf_counter()
    merged = pipeline.merge_layers(store_url, layers)
    t1 = time.perf_counter()
    cropped = pipeline.crop_layers(store_url, layers, dataset=cached_dataset(data, image_size, resize))
    t2 = time.perf_counter()
    task_logger().info("merged %d layers in %.2f s, cropped them in %.2f s", len(layers), t1 - t0, t2 - t1)
    return {
        "layers": layers,
        "merge_seconds": t1 - t0,
        "crop_seconds": t2 - t1,
        "merged": merged,
        "cropped": cropped,
    }


@task(name="merge-layer", task_run_name="merge[layer={layer}]", **TASK_OPTIONS)
def merge_layer(store_url: str, layer: str) -> dict[str, Any]:
    """Partials of every shard → the layer's final top-k, mean stimulus and stats."""
    out = pipeline.merge_layer(store_url, layer)
    task_logger().info("merged %s in %.2f s", layer, out["seconds"])
    return out


@task(name="crop-patches", task_run_name="crop[layer={layer}]", **TASK_OPTIONS)
def crop_patches(
    store_url: str, layer: str, *, data: str, image_size: int, resize: int | None
) -> dict[str, Any]:
    """Top-k patches of a merged layer; re-reads only the winning images."""
    configure_worker()
    dataset = cached_dataset(data, image_size, resize, _fingerprint(store_url))
    out = pipeline.crop_patches(store_url, layer, dataset=dataset)
    task_logger().info("cropped %s: %d images re-read in %.2f s", layer, out["images"], out["seconds"])
    return out
