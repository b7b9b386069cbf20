"""The paper's figure panels as arrays the site can draw (Kobayashi & Shouno 2020, Fig. 3, 5, 7).

Pure functions: display images are float32 (H, W, 3) in [0, 1]; nothing is drawn here.

* Fig. 5a/7a: a first-layer filter beside the mean preferred stimuli of the same channel in later
  layers (`filter_and_stimuli`, from an atlas: `atlas_filter_and_stimuli`);
* Fig. 3: a virtual filter (eq. 3), its coupling weights sorted in descending order (3a) and the
  first-layer filters in that order (3b) (`virtual_filter_panel`, from an atlas:
  `atlas_virtual_filter_panel`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from rfcore.atlas import Atlas

Image = NDArray[np.float32]


def filter_image(weight: NDArray[np.floating] | NDArray[np.integer]) -> Image:
    """A (3, kh, kw) conv filter as an (kh, kw, 3) image: 0.5 + w / (2 max|w|), so 0 is mid grey and
    the sign is kept (the paper's filter display); an all-zero filter is flat grey."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 3 or w.shape[0] != 3:
        raise ValueError(f"a filter image needs a (3, kh, kw) weight, got {w.shape}")
    scale = float(np.abs(w).max())
    img = 0.5 + (w / (2 * scale) if scale > 0 else np.zeros_like(w))
    return np.ascontiguousarray(img.transpose(1, 2, 0)).astype(np.float32)


def stimulus_image(stimulus: NDArray[np.floating], fill: Sequence[float] | None = None) -> Image:
    """A (3, p, p) mean stimulus in uint8 pixel units as an (p, p, 3) image in [0, 1]. Cells without
    image pixels (NaN: outside the image, or never positive) get `fill` (RGB in [0, 1]; default:
    the mean colour of the valid cells, grey if none)."""
    s = np.asarray(stimulus, dtype=np.float64) / 255.0
    if s.ndim != 3 or s.shape[0] != 3:
        raise ValueError(f"a stimulus image needs a (3, p, p) array, got {s.shape}")
    valid = np.isfinite(s)
    if fill is None:
        means = [float(s[c][valid[c]].mean()) if valid[c].any() else 0.5 for c in range(3)]
        fill = means
    out = np.where(valid, s, np.asarray(fill, dtype=np.float64)[:, None, None])
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0).transpose(1, 2, 0)).astype(np.float32)


@dataclass(frozen=True)
class FilterStimuli:
    """Fig. 5 / 7 for one channel: its first-layer filter and its mean stimuli layer by layer."""

    channel: int
    filter: Image  # (kh, kw, 3)
    stimuli: dict[str, Image]  # layer -> (p, p, 3), in the given layer order
    positives: dict[str, int]  # layer -> |X+| behind each mean


def filter_and_stimuli(
    channel: int,
    first_weight: NDArray[np.floating],
    stimuli: Mapping[str, NDArray[np.floating]],
    positives: Mapping[str, int] | None = None,
) -> FilterStimuli:
    """Fig. 5a–d / 7a–d: `first_weight` (C, 3, kh, kw) of the first conv, `stimuli` {layer: (C, 3, p, p)}
    mean stimuli; channel `channel` of each (the same channel index across layers, as in the paper)."""
    w = np.asarray(first_weight)
    if not 0 <= channel < w.shape[0]:
        raise ValueError(f"channel {channel} not in the first layer's {w.shape[0]} filters")
    images = {}
    for layer, s in stimuli.items():
        arr = np.asarray(s)
        if not 0 <= channel < arr.shape[0]:
            raise ValueError(f"channel {channel} not in layer {layer}'s {arr.shape[0]} channels")
        images[layer] = stimulus_image(arr[channel])
    return FilterStimuli(channel, filter_image(w[channel]), images, dict(positives or {}))


@dataclass(frozen=True)
class VirtualPanel:
    """Fig. 3 for one channel p of the second conv."""

    channel: int
    virtual: Image  # (kh, kw, 3) the virtual filter W̃_p (eq. 3)
    coupling: NDArray[np.float32]  # (K,) W²[p,k,ĩ,ĵ] sorted in descending order (Fig. 3a)
    order: NDArray[np.int64]  # (K,) the first-layer channel k of each coupling value
    filters: Image  # (K, kh, kw, 3) the first-layer filters in that order (Fig. 3b)


def coupling_weights(w2: NDArray[np.floating]) -> NDArray[np.float64]:
    """(P, K) W²[p,k,ĩ,ĵ] with (ĩ,ĵ) = argmax |W²[p,k]| (the tap of largest magnitude, signed)."""
    flat = np.asarray(w2, dtype=np.float64).reshape(w2.shape[0], w2.shape[1], -1)
    idx = np.abs(flat).argmax(axis=2)[..., None]
    return np.take_along_axis(flat, idx, axis=2)[..., 0]


def virtual_filter_panel(
    channel: int,
    first_weight: NDArray[np.floating],
    second_weight: NDArray[np.floating] | None = None,
    *,
    coupling: NDArray[np.floating] | None = None,
    order: NDArray[np.integer] | None = None,
    virtual: NDArray[np.floating] | None = None,
) -> VirtualPanel:
    """Fig. 3 for `channel` p: from the raw weights (`first_weight` W¹ (K, 3, kh, kw), `second_weight`
    W² (P, K, h, w)), or from stored values (`coupling` and `order` sorted, `virtual` (3, kh, kw); the
    atlas's `virtual_coupling`, `virtual_coupling_index`, `virtual_filter` rows)."""
    w1 = np.asarray(first_weight, dtype=np.float64)
    if second_weight is not None:
        c = coupling_weights(np.asarray(second_weight))[channel]
        order_ = np.argsort(-c, kind="stable").astype(np.int64)
        values = c[order_]
        virt = np.einsum("k,kqij->qij", c, w1)
    elif coupling is not None and order is not None and virtual is not None:
        values = np.asarray(coupling, dtype=np.float64)
        order_ = np.asarray(order, dtype=np.int64)
        virt = np.asarray(virtual, dtype=np.float64)
    else:
        raise ValueError("give second_weight, or coupling, order and virtual")
    filters = np.stack([filter_image(w1[k]) for k in order_]) if len(order_) else np.zeros((0, 1, 1, 3))
    return VirtualPanel(
        channel, filter_image(virt), values.astype(np.float32), order_, filters.astype(np.float32)
    )


def _first_conv(atlas: Atlas) -> str:
    for name in atlas.layers:
        if atlas.store.root.get(f"layers/{name}/weight") is not None:
            return name
    raise LookupError(f"{atlas.url} stores no conv filters (layers/<layer>/weight); sweep a conv layer")


def _root_array(atlas: Atlas, path: str) -> NDArray[np.floating]:
    import zarr

    node = atlas.store.root.get(path)
    if not isinstance(node, zarr.Array):
        raise LookupError(f"{atlas.url} has no array {path}")
    return np.asarray(node[...])


def atlas_filter_and_stimuli(
    atlas: Atlas, channel: int, layers: Sequence[str] | None = None, *, centre: bool = True
) -> FilterStimuli:
    """Fig. 5 / 7 from an atlas: the first swept conv's filter and the mean stimuli of `layers`
    (default: every swept layer with at least `channel + 1` channels); `centre`: eq. 4–5's
    `mean_stimulus_centre`, else the strongest-position `mean_stimulus`."""
    first = _first_conv(atlas)
    weight = _root_array(atlas, f"layers/{first}/weight")
    names = list(layers) if layers is not None else list(atlas.layers)
    path, count = (
        ("mean_stimulus_centre", "positive_count_centre") if centre else ("mean_stimulus", "positive_count")
    )
    stimuli, positives = {}, {}
    for name in names:
        layer = atlas.layer(name)
        if int(layer.attrs["channels"]) <= channel and layers is None:
            continue
        stimuli[name] = layer.array(path)
        positives[name] = int(layer.array(count)[channel])
    return filter_and_stimuli(channel, weight, stimuli, positives)


def atlas_virtual_filter_panel(atlas: Atlas, layer: str, channel: int) -> VirtualPanel:
    """Fig. 3 from an atlas: the stored virtual filter of `layer` (act-max analysis) and the stored
    filters of its source conv."""
    node = atlas.store.root.get(f"layers/{layer}/virtual_filter")
    if node is None:
        raise LookupError(f"{atlas.url} has no virtual filter of {layer}; run the actmax analysis")
    source = str(dict(node.attrs)["source"])
    return virtual_filter_panel(
        channel,
        _root_array(atlas, f"layers/{source}/weight"),
        coupling=_root_array(atlas, f"layers/{layer}/virtual_coupling")[channel],
        order=_root_array(atlas, f"layers/{layer}/virtual_coupling_index")[channel].astype(np.int64),
        virtual=_root_array(atlas, f"layers/{layer}/virtual_filter")[channel],
    )
