"""Virtual filters (Kobayashi & Shouno 2020, §3.2, eq. 3): a conv layer composed with the conv before it.

W̃[p,q,i,j] = Σ_k W²[p,k,ĩ,ĵ] · W¹[k,q,i,j], with (ĩ,ĵ) = argmax_(i',j') |W²[p,k,i',j']|.

The composition is linear in the weights only: it ignores everything between the two convs
(batch norm, ReLU, pooling, identity skips) and the spatial extent of W² (one tap per (p, k)),
so a virtual filter is an approximation of what the unit sees, as the paper says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rfcore.errors import UnknownLayerError
from rfcore.schema import ArraySpec
from rfcore.store import AtlasStore

VIRTUAL_ARRAYS: dict[str, ArraySpec] = {
    "virtual_filter": ArraySpec(
        "layers/{layer}/virtual_filter",
        ("channel", "in_channel", "ky", "kx"),
        "float32",
        math.nan,
        "virtual filter (eq. 3) through the source conv in attrs; ignores BN/ReLU/pooling between",
        scope="root",
        analysis="virtual",
    ),
    "virtual_coupling": ArraySpec(
        "layers/{layer}/virtual_coupling",
        ("channel", "k"),
        "float32",
        math.nan,
        "coupling weights W2[p,k,i~,j~] per channel, sorted descending (Fig. 3a)",
        scope="root",
        analysis="virtual",
    ),
    "virtual_coupling_index": ArraySpec(
        "layers/{layer}/virtual_coupling_index",
        ("channel", "k"),
        "int64",
        -1,
        "source channel k of each sorted coupling weight (Fig. 3b)",
        scope="root",
        analysis="virtual",
    ),
}


@dataclass(frozen=True)
class VirtualFilter:
    """Virtual filters of `layer` through `source`, with the coupling weights sorted per channel."""

    layer: str
    source: str
    weight: Tensor  # (channel, in_channel, ky, kx): in_channel/ky/kx are those of `source`
    coupling: Tensor  # (channel, k): W²[p,k,ĩ,ĵ] sorted in descending order
    coupling_index: Tensor  # (channel, k): the k (source output channel) of each coupling value


def coupling(w2: Tensor) -> Tensor:
    """(P, K) coupling weights W²[p,k,ĩ,ĵ]: for each (p, k) the tap of largest magnitude, with its sign."""
    flat = w2.flatten(2)
    idx = flat.abs().argmax(dim=2, keepdim=True)
    return flat.gather(2, idx).squeeze(2)


def compose(w2: Tensor, w1: Tensor) -> Tensor:
    """Eq. 3 on raw weights: W² (P, K, h2, w2) and W¹ (K, Q, h1, w1) -> W̃ (P, Q, h1, w1)."""
    if w2.dim() != 4 or w1.dim() != 4 or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"cannot compose conv weights {tuple(w2.shape)} and {tuple(w1.shape)}")
    return torch.einsum("pk,kqij->pqij", coupling(w2), w1)


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _conv(convs: dict[str, nn.Conv2d], name: str) -> nn.Conv2d:
    conv = convs.get(name)
    if conv is None:
        raise UnknownLayerError(f"{name!r} is not a conv layer of the model")
    if conv.groups != 1:
        raise UnknownLayerError(f"conv {name!r} is grouped; virtual filters need a dense conv")
    return conv


def previous_conv(model: nn.Module, layer: str) -> str:
    """The nearest conv before `layer` (module order) whose output channels feed `layer`'s input."""
    convs = _convs(model)
    target = _conv(convs, layer)
    names = list(convs)
    for name in reversed(names[: names.index(layer)]):
        if convs[name].out_channels == target.in_channels:
            return name
    raise UnknownLayerError(f"no conv before {layer!r} has {target.in_channels} output channels")


def default_virtual_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, source) pairs: the first conv after the stem conv, composed with it, and every
    down-sampling projection (`*.downsample.0`) that reads the stem conv's channels through identity
    skips (e.g. `layer2.0.downsample.0` of ResNet18/34, the paper's Fig. 3)."""
    convs = _convs(model)
    names = list(convs)
    if len(names) < 2:
        return []
    stem = names[0]
    pairs = [(names[1], stem)] if convs[names[1]].in_channels == convs[stem].out_channels else []
    for name in names[2:]:
        conv = convs[name]
        if (
            name.endswith("downsample.0")
            and conv.in_channels == convs[stem].out_channels
            and conv.groups == 1
        ):
            pairs.append((name, stem))
    return pairs


def virtual_filter(model: nn.Module, layer: str, source: str | None = None) -> VirtualFilter:
    """Virtual filters of conv `layer` through conv `source` (default: `previous_conv`), on CPU, float32."""
    convs = _convs(model)
    src = source if source is not None else previous_conv(model, layer)
    w2 = _conv(convs, layer).weight.detach().float().cpu()
    w1 = _conv(convs, src).weight.detach().float().cpu()
    if w2.shape[1] != w1.shape[0]:
        raise UnknownLayerError(
            f"{layer!r} reads {w2.shape[1]} channels but {src!r} writes {w1.shape[0]}; pick another source"
        )
    values, index = coupling(w2).sort(dim=1, descending=True, stable=True)
    return VirtualFilter(
        layer=layer, source=src, weight=compose(w2, w1), coupling=values, coupling_index=index
    )


def write_virtual(store: AtlasStore, vf: VirtualFilter) -> None:
    """Write `layers/<layer>/virtual_filter` and the sorted coupling weights; attrs name the source conv."""
    arrays = {
        "virtual_filter": vf.weight,
        "virtual_coupling": vf.coupling,
        "virtual_coupling_index": vf.coupling_index,
    }
    for name, data in arrays.items():
        shape = tuple(data.shape)
        arr = store.require_array(VIRTUAL_ARRAYS[name], shape, shape, layer=vf.layer)
        arr[...] = data.detach().cpu().numpy()
        arr.attrs.update({"layer": vf.layer, "source": vf.source})
