"""Prefect task that trains a model (rfcore.train) and returns its checkpoint URL and metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import task

from rfcore.train import TrainConfig
from rfcore.train import train as _train
from tasks.policy import GPU_TAG, TASK_OPTIONS, task_logger
from tasks.runtime import configure_worker


def train_config(recipe: str = "quick", **overrides: Any) -> TrainConfig:
    """`quick` (≈1 min on CPU for the tiny models) or `paper` (§3.1), with field overrides."""
    if recipe not in ("quick", "paper"):
        from rfcore.errors import RfatlasError

        raise RfatlasError(f"unknown training recipe {recipe!r} (known: quick, paper)")
    base = TrainConfig.quick() if recipe == "quick" else TrainConfig()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for key in ("crop_scale", "crop_ratio"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return dataclasses.replace(base, **overrides)


@task(name="train-model", task_run_name="train[model={model}]", tags=[GPU_TAG], **TASK_OPTIONS)
def train_model(
    model: str,
    data: str,
    out_url: str,
    *,
    val_data: str | None = None,
    recipe: str = "quick",
    overrides: dict[str, Any] | None = None,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Train `model` on `data`; the checkpoint goes to `out_url`. Returns {checkpoint_url, val_accuracy,
    train_loss, epochs, seconds, model}."""
    threads = configure_worker()
    config = train_config(recipe, **(overrides or {}))
    result = _train(
        model,
        data,
        out_url=out_url,
        config=config,
        val_spec=val_data,
        device=device,
        seed=seed,
        progress=False,
    )
    out = {"model": model, **dataclasses.asdict(result), "threads": threads}
    task_logger().info(
        "trained %s: val accuracy %s, loss %.3f, %d epochs in %.0f s",
        model, out["val_accuracy"], out["train_loss"], out["epochs"], out["seconds"],
    )  # fmt: skip
    return out
