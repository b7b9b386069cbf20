"""Per-worker caches: a Dask worker process loads each model and dataset once, not once per task."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from rfcore.data import ImageDataset, open_dataset
from rfcore.models import get_model, select_device


@lru_cache(maxsize=4)
def cached_model(name: str, weights: str | None, device: str) -> nn.Module:
    """The model in eval mode on its device; shared by every task on this worker."""
    model = get_model(name, weights=weights)
    return model.to(select_device(device))


@lru_cache(maxsize=8)
def cached_dataset(spec: str, size: int, resize: int | None) -> ImageDataset:
    return open_dataset(spec, size=size, resize=resize)


def configure_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads so Dask worker processes do not oversubscribe the cores."""
    if threads:
        torch.set_num_threads(threads)
