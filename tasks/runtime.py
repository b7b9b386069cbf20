"""Per-worker caches: a Dask worker process loads each model and dataset once, not once per task.

Caches are keyed by content, not by URL: a checkpoint overwritten between two runs on a long-lived
cluster is loaded again (its cheap version stamp changed, so its digest is recomputed), and every
task that runs the model of an atlas checks its digest against the atlas's (`run_model`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from rfcore.data import ImageDataset, open_dataset
from rfcore.memory import retain_freed_memory
from rfcore.models import check_model_matches, get_model, model_meta, select_device, weights_stamp

#: Environment variable the Dask cluster sets on its workers: torch intra-op threads per task.
THREADS_ENV = "RFATLAS_TORCH_THREADS"


_LOAD_LOCK = threading.Lock()


def cached_model(name: str, weights: str | None, device: str, seed: int = 0) -> nn.Module:
    """The model in eval mode on its device; shared by every task on this worker, keyed by the
    checkpoint's contents (a checkpoint overwritten at the same URL is loaded anew).

    The lock makes concurrent first calls from task threads build the model once, not once each."""
    stamp = weights_stamp(weights)  # cheap: size/mtime/inode locally, ETag on object stores
    with _LOAD_LOCK:
        digest = _STAMPS.get((weights, stamp)) if weights is not None else None
        if weights is not None and digest is None:
            model = get_model(name, weights=weights, seed=seed)  # reads the file: its digest
            digest = model_meta(model).weights_digest
            _STAMPS[(weights, stamp)] = digest
            _PRELOADED[(name, weights, digest, seed)] = model
        try:
            return _load_model(name, weights, digest, device, seed)
        finally:
            _PRELOADED.pop((name, weights, digest, seed), None)  # used, or not needed (cached)


def run_model(run: Mapping[str, Any], device: str) -> nn.Module:
    """`cached_model` of an atlas's `run` attrs: the swept model, also when it was built from a seed.
    CheckpointError if its weights are not the ones the atlas was made with."""
    model = cached_model(run["model"], run.get("weights"), device, int(run["config"].get("seed", 0)))
    check_model_matches(model, run)
    return model


# (weights URL, version stamp) -> digest of the bytes; models loaded to learn a digest, not yet placed.
_STAMPS: dict[tuple[str, str | None], str | None] = {}
_PRELOADED: dict[tuple[str, str | None, str | None, int], nn.Module] = {}


@lru_cache(maxsize=4)
def _load_model(name: str, weights: str | None, digest: str | None, device: str, seed: int) -> nn.Module:
    """Keyed by digest: two contents of one URL are two entries."""
    model = _PRELOADED.pop((name, weights, digest, seed), None)
    if model is None:
        model = get_model(name, weights=weights, seed=seed)
        if weights is not None and model_meta(model).weights_digest != digest:
            _STAMPS.clear()  # overwritten between the stamp and this read: do not cache it
            raise RuntimeError(f"checkpoint {weights} changed while it was being loaded; retry")
    return model.to(select_device(device))


def cached_dataset(spec: str, size: int, resize: int | None, fingerprint: str | None = None) -> ImageDataset:
    """The dataset `spec`, opened once per worker. With `fingerprint` (an atlas's
    `data_fingerprint`), a cached dataset whose files changed since is opened again."""
    ds = _open_dataset(spec, size, resize)
    if fingerprint is not None and ds.fingerprint != fingerprint:
        _open_dataset.cache_clear()
        ds = _open_dataset(spec, size, resize)
    return ds


def run_dataset(run: Mapping[str, Any], *, labels: bool = False) -> ImageDataset:
    """`cached_dataset` of an atlas's `run` attrs (reopened if the data changed on this worker since
    it was cached); with `labels`, labels in the model's class indices (`ImageDataset.for_model`:
    Imagenette -> ImageNet; DataError where they cannot be the model's classes)."""
    ds = cached_dataset(
        run["dataset"],
        int(run["image_size"]),
        run["preprocessing"].get("resize"),
        run.get("data_fingerprint"),
    )
    if labels and run.get("num_classes"):
        return ds.for_model(int(run["num_classes"]))
    return ds


@lru_cache(maxsize=8)
def _open_dataset(spec: str, size: int, resize: int | None) -> ImageDataset:
    return open_dataset(spec, size=size, resize=resize)


def configure_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads so Dask worker processes do not oversubscribe the cores."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def configure_worker() -> int:
    """Set up this process for compute tasks (called first by every task; cheap after the first):
    apply `RFATLAS_TORCH_THREADS` (set by `flows.runner` on the workers it starts; outside such a
    worker torch is left alone) and keep freed buffers for reuse (`rfcore.memory`). Returns the
    number of torch threads in use."""
    retain_freed_memory()
    value = os.environ.get(THREADS_ENV, "")
    if value.isdigit() and int(value) > 0:
        configure_threads(int(value))
    return torch.get_num_threads()


def clear_caches() -> None:
    """Forget cached models and datasets (tests; a worker that must reload a checkpoint)."""
    with _LOAD_LOCK:
        _load_model.cache_clear()
        _STAMPS.clear()
        _PRELOADED.clear()
    _open_dataset.cache_clear()


class WorkerResources:
    """`rfcore.analysis.Resources` of one atlas on this worker: its model and dataset, loaded once per
    worker (the caches above), on the device that `device` selects here. The model is checked
    against the atlas's weights digest; with `labels`, the dataset's labels are the model's classes
    (Imagenette -> ImageNet indices for a 1000-class model)."""

    def __init__(self, run: Mapping[str, Any], device: str, *, labels: bool = False) -> None:
        self._run = run
        self._device_spec = device
        self._labels = labels
        self.device = select_device(device)

    def model(self) -> nn.Module:
        return run_model(self._run, self._device_spec)

    def dataset(self) -> ImageDataset:
        return run_dataset(self._run, labels=self._labels)
