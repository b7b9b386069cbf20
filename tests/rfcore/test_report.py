"""rfcore.report: the static HTML atlas shows exactly the stored stimuli, stats and inactive flags."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rfcore.data import SkippedImage
from rfcore.errors import StoreError
from rfcore.inactive import INACTIVE_SPEC
from rfcore.report import write_report
from rfcore.schema import SWEEP_ARRAYS, LayerAttrs, RunAttrs, spec
from rfcore.store import AtlasStore

C, K, P, N = 3, 2, 5, 8
RF = {"size": [7, 7], "stride": [2, 2], "offset": [0.0, 0.0]}


def _make_atlas(url: str) -> dict[str, np.ndarray]:
    """Layer 'layer1.0' fully written (channel 1 inactive, channel 2 with one top hit), 'fc/x' empty."""
    run = RunAttrs(
        model="resnet10t", weights=None, dataset="synthetic:8", num_images=N, image_size=32,
        config={"k": K, "patch_max": 8, "shard_size": 4, "batch_size": 4, "layers": ["layer1.0", "features.0"], "seed": 0},
    )  # fmt: skip
    layers = {
        "layer1.0": LayerAttrs("block", C, (8, 8), RF, {"factor": 1.0, "size": P}),
        "features.0": LayerAttrs("conv", 4, (4, 4), RF, {"factor": 1.0, "size": P}),
    }
    store = AtlasStore.create(url, run=run, layers=layers, num_images=N, shard_size=4, k=K)
    rng = np.random.default_rng(0)
    sizes = {"image": N, "channel": C, "k": K, "color": 3, "py": P, "px": P}
    data: dict[str, np.ndarray] = {}
    for s in SWEEP_ARRAYS:
        shape = s.shape(sizes)
        data[s.path] = (rng.random(shape) * 250).astype(s.dtype)
    data["topk/image"] = np.array([[3, 5], [0, 1], [7, -1]], dtype=np.int64)
    data["mean_stimulus"][1] = np.nan  # never positive
    data["inactive"] = np.array([False, True, False])
    for path, values in data.items():
        s = INACTIVE_SPEC if path == "inactive" else spec(path)
        store.require_array(s, values.shape, values.shape, layer="layer1.0")[...] = values
    store.set_layer_attrs("layer1.0", complete=True)
    store.add_skipped([SkippedImage(4, "/data/bad <1>.jpg", "truncated")])
    return data


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


def test_report_shows_stored_stimuli_stats_and_flags(tmp_path: Path) -> None:
    url = str(tmp_path / "atlas.zarr")
    data = _make_atlas(url)
    index = write_report(url, tmp_path / "report")
    out = tmp_path / "report"
    assert index == out / "index.html"
    text = index.read_text()
    assert 'href="layer-layer1.0.html"' in text and 'href="layer-features.0.html"' in text
    assert "bad &lt;1&gt;.jpg" in text and "Skipped images (1)" in text

    page = (out / "layer-layer1.0.html").read_text()
    assert len(re.findall(r'<tr id="c\d+"', page)) == C
    assert re.search(r'<tr id="c1" class="inactive"><td>1 <span class="flag">inactive</span>', page)
    assert '<tr id="c0">' in page and '<tr id="c2">' in page
    assert f"{float(data['max'][0]):.4g}" in page
    # Every stored hit is an exact PNG of its patch; the missing one (image -1) is not drawn.
    for c in range(C):
        for j in range(K):
            png = out / "img" / "layer1.0" / f"c{c:04d}-top{j:02d}.png"
            assert png.exists() == (data["topk/image"][c, j] >= 0)
            if png.exists():
                assert np.array_equal(_png(png), data["topk/patch"][c, j])
        mean = _png(out / "img" / "layer1.0" / f"c{c:04d}-mean.png")
        expected = np.nan_to_num(data["mean_stimulus"][c])
        assert np.abs(mean.astype(float) - expected).max() <= 0.5
    assert f"image 7 at ({data['topk/y'][2, 0]}, {data['topk/x'][2, 0]})" in page
    assert "No results yet (not complete)" in (out / "layer-features.0.html").read_text()


def test_report_of_missing_store_is_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        write_report(str(tmp_path / "nope.zarr"), tmp_path / "out")


def test_report_shows_actmax_images_and_the_noise_table(tmp_path: Path) -> None:
    """A real atlas (sweep, act-max of two conv1 channels, noise test at maxpool): the layer page
    shows each rendered act-max image as an exact PNG, the index page the paper's Table 1."""
    from rfcore.analysis import run_local
    from rfcore.pipeline import run_sweep

    url = str(tmp_path / "real.zarr")
    run_sweep(url, model_name="resnet10t", data_spec="synthetic:8", layers="conv1,maxpool", k=2,
              shard_size=8, batch_size=4, device="cpu", progress=False)  # fmt: skip
    run_local(url, "actmax", {"layers": "conv1", "channels": "0,1", "steps": 2, "block_size": 4})
    run_local(url, "noise", {"n_boot": 50})
    store = AtlasStore.open(url)

    out = tmp_path / "report"
    index = write_report(url, out).read_text()
    assert "Table 1" in index and "<td>resnet10t</td><td>maxpool</td>" in index
    page = (out / "layer-conv1.html").read_text()
    assert "<th>act-max channel</th><th>act-max neuron (RF)</th>" in page
    image = np.asarray(store.root["layers/conv1/actmax/channel/image"][1], dtype=np.float64)
    want = np.clip(np.rint(255.0 * image), 0, 255)
    assert np.array_equal(_png(out / "img" / "conv1" / "c0001-actmax0.png"), want)
    assert (out / "img" / "conv1" / "c0000-actmax1.png").exists()
    assert not (out / "img" / "conv1" / "c0002-actmax0.png").exists()  # channel 2 was not rendered
    assert "act-max" not in (out / "layer-maxpool.html").read_text()
