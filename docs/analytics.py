"""Analytics on an atlas with xarray: which classes drive which channels.

Run it on any atlas (`python docs/analytics.py ATLAS_URL [LAYER]`); `tests/rfcore/test_analytics_doc.py`
runs it on a small one. `AtlasLayer.to_xarray()` labels every dimension: `image` (dataset index, with
`label`, `class_name` and `path` when the store records them), `channel` and `k`.
"""

from __future__ import annotations

import sys

import numpy as np
import xarray as xr

from rfcore import open_atlas


def class_means(url: str, layer: str | None = None) -> xr.DataArray:
    """Mean of each channel's per-image max activation over the images of each class: (label, channel)."""
    atlas = open_atlas(url)
    ds = atlas.layer(layer or atlas.layers[-1]).to_xarray()
    act = ds["activation"]  # (image, channel); NaN rows are skipped images
    key = "class_name" if "class_name" in act.coords else "label"
    return act.groupby(key).mean()


def most_selective(means: xr.DataArray, n: int = 5) -> list[tuple[int, str, float]]:
    """Channels whose best class beats their mean over classes the most: (channel, class, ratio)."""
    dim = means.dims[0]
    best = means.max(dim)
    ratio = (best / means.mean(dim)).fillna(0.0)
    order = np.argsort(-ratio.values)[:n]
    winner = means[dim].values[means.argmax(dim).values]
    return [(int(c), str(winner[c]), float(ratio.values[c])) for c in order]


def top_images(url: str, layer: str, channel: int) -> list[tuple[int, float, str]]:
    """(dataset index, activation, file path or "") of a channel's top-k hits, best first."""
    ds = open_atlas(url).layer(layer).to_xarray()
    top = ds[["topk/value", "topk/image"]].sel(channel=channel)
    paths = ds["path"].values if "path" in ds.coords else None
    hits = []
    for v, i in zip(top["topk/value"].values, top["topk/image"].values, strict=True):
        if i >= 0:
            hits.append((int(i), float(v), str(paths[i]) if paths is not None else ""))
    return hits


if __name__ == "__main__":
    url = sys.argv[1]
    layer = sys.argv[2] if len(sys.argv) > 2 else None
    means = class_means(url, layer)
    print(means.to_pandas().round(3))
    for channel, cls, ratio in most_selective(means):
        print(f"channel {channel}: prefers {cls} ({ratio:.2f}x its mean over classes)")
