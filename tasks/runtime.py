"""Per-worker caches: a Dask worker process loads each model and dataset once, not once per task."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from rfcore.data import ImageDataset, open_dataset
from rfcore.models import get_model, select_device

#: Environment variable the Dask cluster sets on its workers: torch intra-op threads per task.
THREADS_ENV = "RFATLAS_TORCH_THREADS"


_LOAD_LOCK = threading.Lock()


def cached_model(name: str, weights: str | None, device: str, seed: int = 0) -> nn.Module:
    """The model in eval mode on its device; shared by every task on this worker.

    The lock makes concurrent first calls from task threads build the model once, not once each."""
    with _LOAD_LOCK:
        return _load_model(name, weights, device, seed)


def run_model(run: Mapping[str, Any], device: str) -> nn.Module:
    """`cached_model` of an atlas's `run` attrs: the swept model, also when it was built from a seed."""
    return cached_model(run["model"], run.get("weights"), device, int(run["config"].get("seed", 0)))


@lru_cache(maxsize=4)
def _load_model(name: str, weights: str | None, device: str, seed: int) -> nn.Module:
    return get_model(name, weights=weights, seed=seed).to(select_device(device))


@lru_cache(maxsize=8)
def cached_dataset(spec: str, size: int, resize: int | None) -> ImageDataset:
    return open_dataset(spec, size=size, resize=resize)


def configure_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads so Dask worker processes do not oversubscribe the cores."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def configure_threads_from_env() -> int:
    """Apply `RFATLAS_TORCH_THREADS` (set by `flows.runner` on the workers it starts); returns the
    number of torch threads in use. Outside such a worker this leaves torch alone."""
    value = os.environ.get(THREADS_ENV, "")
    if value.isdigit() and int(value) > 0:
        configure_threads(int(value))
    return torch.get_num_threads()


def clear_caches() -> None:
    """Forget cached models and datasets (tests; a worker that must reload a checkpoint)."""
    _load_model.cache_clear()
    cached_dataset.cache_clear()


class WorkerResources:
    """`rfcore.analysis.Resources` of one atlas on this worker: its model and dataset, loaded once per
    worker (the caches above), on the device that `device` selects here."""

    def __init__(self, run: Mapping[str, Any], device: str) -> None:
        self._run = run
        self._device_spec = device
        self.device = select_device(device)

    def model(self) -> nn.Module:
        return run_model(self._run, self._device_spec)

    def dataset(self) -> ImageDataset:
        run = self._run
        return cached_dataset(run["dataset"], int(run["image_size"]), run["preprocessing"].get("resize"))
