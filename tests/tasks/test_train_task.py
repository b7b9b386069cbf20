"""`train_model` through `.fn()`: trains, writes the checkpoint, returns metadata (no tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rfcore.errors import RfatlasError
from rfcore.models import get_model
from tasks.train import train_config, train_model


def test_train_model_writes_checkpoint(tmp_path: Path) -> None:
    url = str(tmp_path / "m.pt")
    out = train_model.fn(
        "resnet10t", "synthetic-train:128", url, val_data="synthetic:64",
        overrides={"epochs": 1, "batch_size": 32}, device="cpu",
    )  # fmt: skip
    json.dumps(out)
    assert out["checkpoint_url"] == url and out["epochs"] == 1 and 0.0 <= out["val_accuracy"] <= 1.0
    model = get_model("resnet10t", weights=url)
    assert model.rfatlas_meta.num_classes == 10


def test_train_config() -> None:
    assert train_config("quick", epochs=2).epochs == 2
    assert train_config("paper").epochs == 90
    with pytest.raises(RfatlasError):
        train_config("fast")
