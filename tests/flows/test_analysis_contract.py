"""The contract of every registered analysis (as torchvision's tests loop over `list_models()`): on a tiny
swept atlas it runs through the generic subflow, `verify` passes, a rerun recomputes nothing and leaves
the store identical, changed options refuse, a second writer refuses, its report hooks render, and its
command's `--help` lists every option. A new analysis gets all of this by registering."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

from flows.analysis import analysis
from flows.cli import main
from rfcore.analysis import Section, get_analysis, list_analyses, option_fields, options_config
from rfcore.atlas import Atlas, verify_store
from rfcore.errors import ConfigMismatchError
from rfcore.models import get_model, save_checkpoint
from rfcore.pipeline import run_sweep
from rfcore.store import AtlasStore

LAYERS = ["conv1", "maxpool", "layer1.0"]
DEAD = [2, 7, 11]  # conv1 channels forced off, so `inactive` and `noise` have something to find

#: Small options per analysis, so that each runs in seconds on the tiny atlas.
FAST: dict[str, dict[str, Any]] = {
    "noise": {"n_boot": 50, "conditions": "baseline,all,control"},
    "actmax": {"layers": "layer1.0", "channels": "0-5", "steps": 2, "block_size": 4, "init": "random"},
    "selectivity": {"n_permutations": 50},
    "cluster": {"k_max": 4, "n_init": 1},
    "attribution": {"batch_size": 32},
    "tuning": {"n_orientations": 4, "n_sfs": 3, "n_phases": 4},
    "revcorr": {
        "num_images": 64,
        "batch_size": 32,
        "max_side": 4,
        "channels_per_unit": 8,
        "n_sfs": 3,
        "n_phases": 3,
    },
}
#: One option whose change must be refused once results exist (None: the analysis stores no config).
CHANGED: dict[str, dict[str, Any] | None] = {
    "inactive": {"threshold": 0.25},
    "noise": {"sigma": 2.0},
    "actmax": {"steps": 3},
    "virtual": None,
    "selectivity": {"seed": 1},
    "cluster": {"k_max": 3},
    "attribution": {"top_units": 3},
    "tuning": {"cv_max": 0.5},
    "revcorr": {"sigma": 0.3},
}


@pytest.fixture(scope="module")
def base_atlas(tmp_path_factory: pytest.TempPathFactory) -> str:
    """resnet10t with dead conv1 channels, swept over 32 synthetic images (2 shards)."""
    model = get_model("resnet10t", seed=3)
    with torch.no_grad():
        cast(torch.nn.Conv2d, model.conv1).weight[DEAD] = 0.0
        cast(torch.nn.BatchNorm2d, model.bn1).bias[DEAD] = -0.5
    root = tmp_path_factory.mktemp("contract")
    ckpt = str(root / "dead.pt")
    save_checkpoint(model, ckpt, config={}, metrics={})
    url = str(root / "base.zarr")
    run_sweep(url, model_name="resnet10t", weights=ckpt, data_spec="synthetic:32", layers=LAYERS, k=2,
              patch_max=16, shard_size=16, batch_size=8, device="cpu", progress=False)  # fmt: skip
    return url


def _copy(base: str, tmp_path: Path) -> str:
    url = str(tmp_path / "atlas.zarr")
    shutil.copytree(base, url)
    return url


class _Assets:
    """A minimal `rfcore.analysis.Assets`: PNG files under a folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.written: list[Path] = []

    def _path(self, name: str) -> Path:
        path = self.root / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.written.append(path)
        return path

    def image(self, name: str, chw: np.ndarray, *, scale: str = "uint8") -> str:
        pixels = np.clip(np.rint(np.nan_to_num(np.asarray(chw, dtype=np.float64))), 0, 255).astype(np.uint8)
        Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB").save(self._path(name))
        return f"{name}.png"

    def figure(
        self,
        name: str,
        draw: Callable[[Any], None],
        *,
        size: tuple[float, float] = (3, 3),
        projection: str | None = None,
    ) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=size, subplot_kw={"projection": projection})
        try:
            draw(ax)
            fig.savefig(self._path(name))
        finally:
            plt.close(fig)
        return f"{name}.png"


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("name", list_analyses())
def test_analysis_contract(name: str, base_atlas: str, tmp_path: Path, same_store: Any) -> None:
    a = get_analysis(name)
    url = _copy(base_atlas, tmp_path)
    options = options_config(a.options(FAST.get(name, {})))

    first = analysis(name, url, options, "cpu")
    assert first["units_run"] > 0
    assert verify_store(url) == []
    assert len(AtlasStore.open(url).done_keys(name)) >= first["units_run"]

    snapshot = str(tmp_path / "snapshot.zarr")
    shutil.copytree(url, snapshot)
    again = analysis(name, url, options, "cpu")
    assert again["units_run"] == 0
    assert same_store(snapshot, url) == []

    changed = CHANGED[name]
    if changed is None:
        assert {f.name for f, _, _ in option_fields(a.Options)} <= {"layers"}
    else:
        with pytest.raises(ConfigMismatchError):
            analysis(name, url, {**options, **changed}, "cpu")
        assert same_store(snapshot, url) == []

    atlas = Atlas(AtlasStore.open(url))
    assets = _Assets(tmp_path / "site")
    shown: list[Any] = [a.report_index(atlas, assets), *a.findings(atlas)]
    for layer in atlas.layers:
        shown += [a.report_layer(atlas, layer, assets), *a.channel_columns(atlas, layer).values()]
        channels = int(atlas.layer(layer).attrs["channels"])
        shown += [a.report_channel(atlas, layer, c, assets) for c in (0, channels - 1)]
    shown = [s for s in shown if s is not None and (not isinstance(s, Section) or s.html)]
    assert shown, f"{name} ran but its report hooks show nothing"
    for path in assets.written:
        with Image.open(path) as im:
            assert im.size[0] > 0 and im.size[1] > 0


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("name", list_analyses())
def test_second_writer_refuses(name: str, base_atlas: str, tmp_path: Path, capsys: Any) -> None:
    url = _copy(base_atlas, tmp_path)
    with AtlasStore.open(url, "r+").lease("someone else", ttl_s=30):
        code = main([name, url, "--device", "cpu"])
    assert code == 2
    assert "is leased by someone else" in capsys.readouterr().err


@pytest.mark.parametrize("name", list_analyses())
def test_command_help_lists_every_option(name: str, capsys: Any) -> None:
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    for f, _, _ in option_fields(get_analysis(name).Options):
        assert "--" + f.name.replace("_", "-") in out


def test_bad_option_on_the_command_line_is_one_line_before_any_write(
    base_atlas: str, tmp_path: Path, capsys: Any
) -> None:
    url = _copy(base_atlas, tmp_path)
    before = sorted(p.relative_to(url).as_posix() for p in Path(url).rglob("*"))
    assert main(["actmax", url, "--block-size", "0", "--device", "cpu"]) == 2
    assert "block_size must be >= 1" in capsys.readouterr().err
    assert sorted(p.relative_to(url).as_posix() for p in Path(url).rglob("*")) == before
