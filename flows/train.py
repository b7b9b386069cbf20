"""The `train` flow: train a registry model on a dataset and return the checkpoint URL."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.runner import gpu_tasks
from rfcore.errors import RfatlasError
from rfcore.models import default_preprocessing
from tasks.train import train_config, train_model


def check_train_inputs(
    *, model: str, data: str, out: str, val_data: str | None, recipe: str, overrides: dict[str, Any] | None
) -> None:
    """Validate before Prefect starts: model, recipe/options, data specs, checkpoint URL."""
    from rfcore.data import open_dataset
    from rfcore.errors import DataError

    pre = default_preprocessing(model)  # UnknownModelError with a close match
    config = train_config(recipe, **(overrides or {}))
    ds = open_dataset(data, size=pre.resize, resize=pre.resize)
    if ds.num_classes < 2:
        raise DataError(f"{data}: training needs labelled data with at least 2 classes")
    if len(ds) < config.batch_size:
        raise DataError(f"{data}: {len(ds)} images, fewer than one batch of {config.batch_size}")
    if val_data:
        open_dataset(val_data, size=pre.size, resize=pre.resize)
    if "://" not in out or out.startswith("file://"):
        from pathlib import Path

        parent = Path(out.removeprefix("file://")).expanduser().resolve().parent
        if parent.exists() and not parent.is_dir():
            raise RfatlasError(f"cannot write the checkpoint {out}: {parent} is not a directory")


@flow(name="train", flow_run_name="train-{model}-{data}", validate_parameters=True)
def train(
    model: str,
    data: str,
    out: str,
    val_data: str | None = None,
    recipe: str = "quick",
    overrides: dict[str, Any] | None = None,
    device: str = "auto",
    seed: int = 0,
) -> str:
    """Train `model` on `data` (recipe `quick` or `paper`, with TrainConfig field overrides such as
    `{"epochs": 3}`); returns the checkpoint URL."""
    with gpu_tasks(device):
        future = train_model.submit(
            model, data, out, val_data=val_data, recipe=recipe, overrides=overrides, device=device, seed=seed
        )
    result = future.result()
    return str(result["checkpoint_url"])
