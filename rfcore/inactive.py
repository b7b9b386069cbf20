"""Inactive channels (Kobayashi & Shouno 2020, §3.5): channels that never rise above a threshold."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np
import torch
import zarr
from numpy.typing import NDArray
from torch import Tensor, nn

from rfcore.atlas import Atlas
from rfcore.errors import DataError, StoreError, UnknownLayerError
from rfcore.layers import capture
from rfcore.schema import ArraySpec
from rfcore.store import AtlasStore, redact

INACTIVE_SPEC = ArraySpec(
    "inactive",
    ("channel",),
    "bool",
    False,
    "channel never > threshold over all swept images (attrs: threshold, num_images, count)",
    analysis="inactive",
)


class BatchLike(Protocol):
    """What `rfcore.data.iter_batches` yields (only the fields used here)."""

    images: Tensor
    labels: Tensor
    indices: Tensor


def detect_inactive(max_per_channel: Any, threshold: float = 0.0) -> NDArray[np.bool_]:
    """Inactive mask: a channel whose max over every position of every image is <= threshold
    (compared in the maxima's float precision)."""
    m = np.asarray(max_per_channel)
    if not np.issubdtype(m.dtype, np.floating):
        m = m.astype(np.float64)
    if m.ndim != 1 or not np.all(np.isfinite(m)):
        raise DataError(f"channel maxima must be a finite 1-D array, got shape {m.shape} with NaN/inf")
    return np.asarray(m <= np.asarray(threshold, dtype=m.dtype), dtype=np.bool_)  # in the stat's precision


def module_at(model: nn.Module, layer: str) -> nn.Module:
    """The submodule named `layer` (a `named_modules()` path); UnknownLayerError with a close match."""
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        close = difflib.get_close_matches(layer, [n for n in modules if n], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownLayerError(f"model has no layer {layer!r}{hint}")
    module: nn.Module = modules[layer]
    return module


def default_layer(model: nn.Module) -> str:
    """The model's first max-pool layer (the paper's layer)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.MaxPool2d):
            return str(name)
    raise UnknownLayerError("model has no max-pool layer; name a layer explicitly")


@torch.inference_mode()
def channel_max(
    model: nn.Module,
    layer: str,
    batches: Iterable[BatchLike],
    *,
    normalize: Callable[[Tensor], Tensor],
    device: torch.device | None = None,
) -> NDArray[np.float32]:
    """Per-channel max of `layer`'s response (`capture(response=True)`: a conv's after its ReLU, as
    the sweep records it) over every position of every image, in fp32 (no sweep needed)."""
    device = device or next(model.parameters()).device
    module_at(model, layer)  # UnknownLayerError with a suggestion
    best: Tensor | None = None
    with capture(model, [layer], stop_early=True, response=True) as cap:
        for batch in batches:
            if not len(batch.images):  # every image of the chunk unreadable
                continue
            out = cap.run(normalize(batch.images.to(device, non_blocking=True)))[layer]
            m = out.detach().float().transpose(0, 1).flatten(1).amax(dim=1)
            best = m if best is None else torch.maximum(best, m)
    if best is None:
        raise DataError("no images to measure channel maxima on")
    return np.asarray(best.cpu().numpy(), dtype=np.float32)


def sweep_precision(store: AtlasStore) -> str:
    """The float type the sweep's shards ran in (`float32`, `bfloat16`, `float16`; recorded in their
    markers, one for the whole atlas); `float32` when no shard recorded one."""
    done = sorted(set(store.swept_shards().values()))
    info = ((store.marker(done[0]) or {}).get("info") or {}) if done else {}
    return str(info.get("precision", "float32"))


def write_inactive(
    store: AtlasStore, layer: str, threshold: float = 0.0, maxima: NDArray[np.float32] | None = None
) -> NDArray[np.bool_]:
    """Detect from `maxima` (fp32 channel maxima measured over the swept images), by default the
    sweep's `layers/<layer>/max`; store `layers/<layer>/inactive` with attrs threshold, num_images
    (swept images), count (inactive channels) and maxima (`sweep` or `fp32 recomputed`)."""
    atlas = Atlas(store)
    group = atlas.layer(layer).group
    if "max" not in group:
        raise StoreError(f"layer {layer} of {redact(store.url)} has no sweep statistics yet; sweep it first")
    source = "sweep" if maxima is None else "fp32 recomputed"
    inactive = detect_inactive(atlas.layer(layer).array("max") if maxima is None else maxima, threshold)
    arr = store.require_array(INACTIVE_SPEC, inactive.shape, inactive.shape, layer=layer)
    arr[:] = inactive
    arr.attrs.update(
        threshold=float(threshold),
        num_images=int(store.run["num_images"]) - len(atlas.skipped),
        count=int(inactive.sum()),
        maxima=source,
    )
    return inactive


def read_inactive(store: AtlasStore, layer: str) -> tuple[NDArray[np.bool_], dict[str, Any]]:
    """The stored inactive mask of `layer` and its attrs; StoreError if not detected yet."""
    group = Atlas(store).layer(layer).group
    node = group.get(INACTIVE_SPEC.path)
    if not isinstance(node, zarr.Array):
        raise StoreError(
            f"layer {layer} of {redact(store.url)} has no inactive channels detected; run the inactive analysis"
        )
    return np.asarray(node[...], dtype=np.bool_), dict(node.attrs)
