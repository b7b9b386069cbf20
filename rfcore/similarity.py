"""§3.3: "the characteristics of the same channel are similar in different layers due to the skip
connection" — measured per stage, so ResNet and PlainNet can be compared.

Within a stage (torchvision naming `layerN.i`), consecutive swept layers with the same number of
channels are paired: block i-1 and block i, and the stage's first block with the layer swept just
before it when it keeps the channel count (ResNet's stage 1, after the max-pool). For each pair and
channel c the measure compares channel c in both layers:

* `activation` (default): Pearson correlation over images of the per-image spatial max
  (`activation`, image × channel) — what makes channel c fire in one layer makes it fire in the next;
* `topk`: overlap |A ∩ B| / k of the top-k image sets (`topk/image`).

A stage's value is the mean over its pairs and channels (channels constant in either layer are
left out of the correlation). Chance level: ≈ 0 for `activation`, ≈ k / N for `topk`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from rfcore.atlas import Atlas

MEASURES = ("activation", "topk")
_STAGE = re.compile(r"^(?P<stage>(?:.*\.)?layer\d+)\.(?P<block>\d+)$")


def stage_pairs(layers: list[str], channels: dict[str, int]) -> dict[str, list[tuple[str, str]]]:
    """{stage: [(previous, block), ...]} of consecutive layers with equal channel counts (module doc)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for i, name in enumerate(layers):
        m = _STAGE.match(name)
        if m is None or i == 0:
            continue
        prev = layers[i - 1]
        if channels[prev] != channels[name]:
            continue
        pm = _STAGE.match(prev)
        if pm is not None and pm["stage"] != m["stage"]:
            continue  # the last block of the previous stage: another stage's channels
        out.setdefault(m["stage"], []).append((prev, name))
    return out


def channel_similarity(
    a: NDArray[np.floating], b: NDArray[np.floating], measure: str = "activation"
) -> NDArray[np.float64]:
    """Per-channel similarity of two layers' arrays: (image, channel) maxima for `activation` (NaN
    rows, skipped images, are dropped; NaN for constant channels), (channel, k) top-k indices for `topk`."""
    if measure == "activation":
        x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
        keep = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
        x, y = x[keep] - x[keep].mean(axis=0), y[keep] - y[keep].mean(axis=0)
        den = np.sqrt((x * x).sum(axis=0) * (y * y).sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            r: NDArray[np.float64] = np.where(den > 0, (x * y).sum(axis=0) / den, np.nan)
        return r
    if measure == "topk":
        ia, ib = np.asarray(a), np.asarray(b)
        k = ia.shape[1]
        return np.array(
            [
                len(set(ia[c][ia[c] >= 0].tolist()) & set(ib[c][ib[c] >= 0].tolist())) / k
                for c in range(len(ia))
            ],
            dtype=np.float64,
        )
    raise ValueError(f"measure must be one of {', '.join(MEASURES)}, not {measure!r}")


def cross_block_similarity(atlas: Atlas, measure: str = "activation") -> dict[str, float]:
    """{stage: mean similarity of the same channel in consecutive blocks} (module doc); stages
    without a pair of equal-width consecutive swept layers are absent."""
    path = {"activation": "activation", "topk": "topk/image"}.get(measure)
    if path is None:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, not {measure!r}")
    layers = list(atlas.layers)
    channels = {n: int(atlas.layer(n).attrs["channels"]) for n in layers}
    out = {}
    for stage, pairs in stage_pairs(layers, channels).items():
        values = [
            channel_similarity(atlas.layer(p).array(path), atlas.layer(q).array(path), measure)
            for p, q in pairs
        ]
        v = np.concatenate(values)
        out[stage] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out
