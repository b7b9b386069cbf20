"""The `train` and `demo` flows under the Prefect test harness, with tiny settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flows.demo import DEMO, demo, format_findings
from flows.train import train
from rfcore.atlas import verify_store
from rfcore.models import get_model

pytestmark = pytest.mark.usefixtures("prefect_harness", "one_thread")


def test_train_flow_returns_checkpoint_url(dask_runner: Any, tmp_path: Path) -> None:
    url = str(tmp_path / "ckpt" / "resnet10t.pt")
    out = train.with_options(task_runner=dask_runner())(
        model="resnet10t",
        data="synthetic-train:64",
        out=url,
        overrides={"epochs": 1, "batch_size": 32},
        device="cpu",
    )
    assert out == url and get_model("resnet10t", weights=url).rfatlas_meta.num_classes == 10


def test_demo_flow_small(dask_runner: Any, tmp_path: Path) -> None:
    analyses = ["sweep", "inactive"]
    res = demo.with_options(task_runner=dask_runner())(
        out=str(tmp_path / "demo"), train_data="synthetic-train:128", val_data="synthetic:64",
        train_overrides={"epochs": 1, "batch_size": 32}, layers="conv1,maxpool,layer4.0", k=4, shard_size=32,
        analyses=analyses, device="cpu",
    )  # fmt: skip
    assert set(res["models"]) == set(DEMO["models"])
    for m, r in res["models"].items():
        assert verify_store(r["store"]) == [], m
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["layers"] == ["conv1", "maxpool", "layer4.0"]
        assert len(r["notable"]) == 3 and r["notable"][0]["layer"] == "layer4.0"
        assert Path(r["report"]).exists() and any("inactive" in line for line in r["findings"])
        assert r["cross_block"] == {}  # no two consecutive equal-width layers in one stage swept here
    assert Path(res["site"]).exists() and (Path(res["site"]).parent / "compare.html").exists()
    text = format_findings(res)
    assert "resnet10t: validation accuracy" in text and "plainnet10t" in text and "store:" in text


def test_demo_defaults_are_small() -> None:
    assert DEMO["models"] == ["resnet10t", "plainnet10t"] and DEMO["workers"] == 2
    assert DEMO["val_data"].startswith("synthetic:") and DEMO["train_data"].startswith("synthetic-train:")
