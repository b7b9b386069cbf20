"""The xarray coordinates of `AtlasLayer.to_xarray` and the analytics example `docs/analytics.py`,
executed as written (as a script and as a module)."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rfcore import open_atlas

DOC = Path(__file__).resolve().parents[2] / "docs" / "analytics.py"


def test_to_xarray_has_coordinates(
    tiny_atlas: tuple[str, dict[str, Any]], tiny_kit: Any, tmp_path: Path
) -> None:
    url, data = tiny_atlas
    n = tiny_kit.TINY["images"]
    ds = open_atlas(url).layer("layer1.0").to_xarray()
    assert ds["image"].values.tolist() == list(range(n)) and ds["channel"].values.tolist() == list(range(6))
    assert ds["k"].values.tolist() == [0, 1, 2]
    assert ds["label"].dims == ("image",) and ds["label"].values.tolist() == [i % 3 for i in range(n)]
    assert ds["class_name"].values[4] == "dog" and ds["path"].values[7] == "/data/val/img_007.png"
    by_label = ds["activation"].groupby("label").mean()
    act = data["layer1.0"]["activation"]
    want = np.stack([act[np.arange(n) % 3 == lab].mean(axis=0) for lab in range(3)])
    np.testing.assert_allclose(by_label.values, want, rtol=1e-6)
    assert ds["topk/value"].sel(channel=2, k=0).item() == data["layer1.0"]["topk/value"][2, 0]

    bare = str(tmp_path / "bare.zarr")
    tiny_kit.make(bare, labels=False)
    ds = open_atlas(bare).layer("conv1").to_xarray()
    assert "label" not in ds.coords and "path" not in ds.coords and "image" in ds.coords


def test_analytics_example_runs(tiny_atlas: tuple[str, dict[str, Any]]) -> None:
    url, data = tiny_atlas
    ns = runpy.run_path(str(DOC), run_name="analytics_doc")
    means = ns["class_means"](url, "layer1.0")
    assert means.dims == ("class_name", "channel") and list(means["class_name"].values) == [
        "cat",
        "dog",
        "fish",
    ]
    top = ns["most_selective"](means, n=3)
    assert len(top) == 3 and all(cls in ("cat", "dog", "fish") for _, cls, _ in top)
    hits = ns["top_images"](url, "layer1.0", 2)
    assert hits == [(int(data["layer1.0"]["topk/image"][2, 0]), float(data["layer1.0"]["topk/value"][2, 0]),
                     f"/data/val/img_{int(data['layer1.0']['topk/image'][2, 0]):03d}.png")]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(DOC), url, "layer1.0"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "prefers" in proc.stdout and "fish" in proc.stdout
