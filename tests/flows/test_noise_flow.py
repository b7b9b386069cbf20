"""The inactive and noise analyses through the generic subflow and task, and `rfatlas compare`, on tiny
stores (Prefect test harness)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
import zarr
from prefect.artifacts import create_markdown_artifact
from prefect.testing.utilities import prefect_test_harness

from flows.analysis import analysis
from flows.compare import compare, register_cli
from rfcore.analyses.noise import NOISE_FIELDS, shard_key
from rfcore.analysis import Unit
from rfcore.errors import ConfigMismatchError, RfatlasError, StoreError
from rfcore.inactive import read_inactive
from rfcore.models import get_model, save_checkpoint
from rfcore.noise import CONDITIONS
from rfcore.pipeline import run_sweep
from rfcore.store import AtlasStore
from tasks.analysis import run_unit

DEAD = [2, 7, 11]
N, BATCH = 48, 8


@pytest.fixture(scope="module", autouse=True)
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """resnet10t with conv1 channels DEAD forced off (zero weights, negative BN bias before the ReLU)."""
    model = get_model("resnet10t", seed=3)
    with torch.no_grad():
        cast(torch.nn.Conv2d, model.conv1).weight[DEAD] = 0.0
        cast(torch.nn.BatchNorm2d, model.bn1).bias[DEAD] = -0.5
    path = str(tmp_path_factory.mktemp("ckpt") / "dead.pt")
    save_checkpoint(model, path, config={}, metrics={})
    return path


def make_store(url: str, weights: str | None, shard_size: int, model_name: str = "resnet10t") -> str:
    """A real sweep of `maxpool` and `layer1.0` on synthetic images."""
    run_sweep(
        url, model_name=model_name, weights=weights, data_spec=f"synthetic:{N}", layers=["maxpool", "layer1.0"],
        k=2, patch_max=16, shard_size=shard_size, batch_size=BATCH, device="cpu", progress=False,
    )  # fmt: skip
    return url


def per_image(url: str, cond: str) -> dict[str, np.ndarray]:
    root = AtlasStore.open(url, "r").root
    arrays = {f: root[f"noise/maxpool/{cond}/{f}"] for f in NOISE_FIELDS}
    return {f: np.asarray(a[...]) for f, a in arrays.items() if isinstance(a, zarr.Array)}


def test_inactive_then_noise_flow_detects_stores_and_resumes(tmp_path: Path, checkpoint: str) -> None:
    url = make_store(str(tmp_path / "a.zarr"), checkpoint, shard_size=16)
    found = analysis("inactive", url, {}, "cpu")
    assert found == {"units_run": 1, "threshold": 0.0, "inactive": {"maxpool": DEAD}}
    assert list(analysis("inactive", url, {"layers": "all"}, "cpu")["inactive"]) == ["maxpool", "layer1.0"]
    got, attrs = read_inactive(AtlasStore.open(url, "r"), "maxpool")
    assert np.flatnonzero(got).tolist() == DEAD and attrs == {
        "threshold": 0.0,
        "num_images": N,
        "count": 3,
        "maxima": "sweep",
    }
    summary = analysis("noise", url, {}, "cpu")
    assert summary.pop("units_run") == 12
    assert summary["num_inactive"] == 3 and summary["inactive"] == DEAD and summary["layer"] == "maxpool"
    conds = summary["conditions"]
    assert set(conds) == set(CONDITIONS) and all(c["images"] == N for c in conds.values())
    base = per_image(url, "baseline")["loss"].astype(np.float64)
    for cond in ("all", "random-one", "control"):
        diff = per_image(url, cond)["loss"].astype(np.float64) - base
        assert np.count_nonzero(diff) > N // 2  # noise into channels the next block reads moves the loss
        assert conds[cond]["delta_loss"] == pytest.approx(diff.mean(), rel=1e-9)
        lo, hi = conds[cond]["delta_loss_ci"]
        assert lo < hi
    store = AtlasStore.open(url, "r")
    assert all(store.is_done(shard_key("maxpool", c, s)) for c in CONDITIONS for s in range(3))
    stored = dict(store.root["noise/maxpool"].attrs)["summary"]
    assert stored == summary
    # resume: nothing left to do, same answer
    before = per_image(url, "all")
    assert analysis("noise", url, {}, "cpu") == {"units_run": 0, **summary}
    assert per_image(url, "all")["loss"].tobytes() == before["loss"].tobytes()
    with pytest.raises(ConfigMismatchError, match=r"sigma 1\.0 -> 2\.0"):
        analysis("noise", url, {"sigma": 2.0}, "cpu")
    with pytest.raises(ConfigMismatchError, match=r"detected at threshold 0\.0, not 0\.5"):
        analysis("noise", url, {"threshold": 0.5}, "cpu")
    assert read_inactive(AtlasStore.open(url, "r"), "maxpool")[1]["threshold"] == 0.0  # left as it was


def test_shards_merged_equal_one_pass(tmp_path: Path, checkpoint: str) -> None:
    sharded = make_store(str(tmp_path / "sharded.zarr"), checkpoint, shard_size=16)
    whole = make_store(str(tmp_path / "whole.zarr"), checkpoint, shard_size=48)
    a = analysis("noise", sharded, {"seed": 4}, "cpu")
    b = analysis("noise", whole, {"seed": 4}, "cpu")
    for cond in CONDITIONS:
        x, y = per_image(sharded, cond), per_image(whole, cond)
        assert all(x[f].tobytes() == y[f].tobytes() for f in NOISE_FIELDS)
    assert a["conditions"] == b["conditions"] and (a["units_run"], b["units_run"]) == (12, 4)


def test_task_fn_evaluates_one_shard(tmp_path: Path, checkpoint: str) -> None:
    url = make_store(str(tmp_path / "t.zarr"), checkpoint, shard_size=16)
    unit = Unit(shard_key("maxpool", "baseline", 1), "maxpool", {"condition": "baseline", "shard": 1})
    with pytest.raises(StoreError, match="no noise results"):
        run_unit.fn("noise", url, unit, "cpu")
    analysis("noise", url, {"conditions": "baseline"}, "cpu")
    assert run_unit.fn("noise", url, unit, "cpu") == {"key": unit.key, "cached": True}
    AtlasStore.open(url, "r+")._objects.delete(f"_state/done/{unit.key}")
    out = run_unit.fn("noise", url, unit, "cpu")
    assert out["images"] == 16 and out["condition"] == "baseline" and out["shard"] == 1
    assert AtlasStore.open(url).is_done(unit.key)
    loss = per_image(url, "baseline")["loss"]
    assert np.isclose(out["loss_sum"], float(loss[16:32].astype(np.float64).sum()))


def test_compare_flow_cli_and_errors(
    tmp_path: Path, checkpoint: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    res = make_store(str(tmp_path / "res.zarr"), checkpoint, shard_size=48)
    plain = make_store(str(tmp_path / "plain.zarr"), None, shard_size=48, model_name="plainnet10t")
    analysis("noise", res, {}, "cpu")
    analysis("noise", plain, {}, "cpu")
    recorded: list[dict[str, Any]] = []

    def spy(**kw: Any) -> Any:
        recorded.append(kw)
        return create_markdown_artifact(**kw)

    monkeypatch.setattr("flows.compare.create_markdown_artifact", spy)
    table = compare([res, plain])
    lines = table.splitlines()
    assert lines[0].startswith("| model | layer | # inactive | ΔL")
    assert lines[2].startswith("| resnet10t (dead.pt) | maxpool | 3 |")
    assert lines[3].startswith("| plainnet10t | maxpool | ")
    none_dead = lines[3].split(" | ")[2] == "0"
    assert ("– (no inactive channel)" in lines[3]) == none_dead and "no inactive" not in lines[2]
    # issue 14: with no inactive channel, the near-inactive channels (lowest 5 % of the maxima, at
    # least one) get a row of their own with numbers; never one for a layer with inactive channels
    assert len(lines) == (5 if none_dead else 4)
    if none_dead:
        channels = int(AtlasStore.open(plain).layer_group("maxpool").attrs["channels"])  # type: ignore[arg-type]
        assert lines[4].startswith("| plainnet10t | maxpool: near-inactive, lowest 5% of maxima (max ≤ ")
        assert lines[4].split(" | ")[2] == str(max(1, -(-5 * channels // 100)))
        assert "no near-inactive" not in lines[4]

    assert recorded and recorded[0]["key"] == "noise-compare" and table in recorded[0]["markdown"]

    parser = argparse.ArgumentParser(prog="rfatlas")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", res, plain, "--no-artifact"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == table

    empty = make_store(str(tmp_path / "empty.zarr"), None, shard_size=48)
    with pytest.raises(StoreError, match="no noise results"):
        compare([empty])
    with pytest.raises(RfatlasError, match="unknown noise condition 'al'"):
        analysis("noise", empty, {"conditions": ["al"]}, "cpu")
