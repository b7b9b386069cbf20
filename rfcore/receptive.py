"""Receptive fields of CNN units: analytic (through the traced graph), boxes, gradient check, table."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from rfcore.errors import RfatlasError
from rfcore.layers import (
    LayerInfo,
    capture,
    default_input_size,
    dummy_input,
    eval_mode,
    list_layers,
    model_lock,
    model_name,
    run_dummy,
)


@dataclass(frozen=True)
class RField:
    """Receptive field of a layer's units, in input pixels (pixel centres are integers)."""

    size: tuple[int, int]  # (h, w)
    stride: tuple[int, int]  # jump between neighbouring units; 0 where every unit sees the whole input
    offset: tuple[float, float]  # centre of unit (0, 0)


@dataclass(frozen=True)
class Box:
    """A unit's receptive-field box (half-open, unclipped) and how much of it lies outside the image."""

    y0: int
    y1: int
    x0: int
    x1: int
    clip_top: int
    clip_bottom: int
    clip_left: int
    clip_right: int

    def clipped(self) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of the part inside the image."""
        return (
            self.y0 + self.clip_top,
            self.y1 - self.clip_bottom,
            self.x0 + self.clip_left,
            self.x1 - self.clip_right,
        )


def rf_box(rf: RField, y: int, x: int, image_hw: tuple[int, int]) -> Box:
    """Box of unit (y, x): centre `offset + (y, x) * stride`, first pixel `centre - (size - 1) / 2`."""
    y0 = round(rf.offset[0] + y * rf.stride[0] - (rf.size[0] - 1) / 2)
    x0 = round(rf.offset[1] + x * rf.stride[1] - (rf.size[1] - 1) / 2)
    y1, x1 = y0 + rf.size[0], x0 + rf.size[1]
    top, bottom = _clip(y0, y1, image_hw[0])
    left, right = _clip(x0, x1, image_hw[1])
    return Box(y0, y1, x0, x1, top, bottom, left, right)


def _clip(lo: int, hi: int, n: int) -> tuple[int, int]:
    """Pixels of [lo, hi) before 0 and at or after n (never more than the box holds)."""
    before = min(max(0, -lo), hi - lo)
    return before, min(max(0, hi - n), hi - lo - before)


@dataclass(frozen=True)
class _Axis:
    """Geometry along one axis: unit 0 sees input pixels [start, start + size); units are `jump` apart."""

    size: int
    jump: int
    start: int


_Geo = tuple[_Axis | None, _Axis | None]  # None: the unit sees the whole input along that axis
_Shape = tuple[int, ...]
_IDENTITY: _Geo = (_Axis(1, 1, 0), _Axis(1, 1, 0))
_WHOLE: _Geo = (None, None)
_PAD_MODULES = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
_UNSUPPORTED_MODULES = (
    nn.ConvTranspose2d,
    nn.Upsample,
    nn.Fold,
    nn.Unfold,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)
_UNSUPPORTED_FUNCTIONS = {  # spatial functionals whose geometry is not derived (use the module forms)
    "conv2d", "conv_transpose2d", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d",
    "lp_pool2d", "pad", "interpolate", "upsample", "unfold", "fold", "pixel_shuffle", "pixel_unshuffle", "roll",
}  # fmt: skip


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _window(axis: _Axis | None, k: int, s: int, p: int, d: int) -> _Axis | None:
    if axis is None:
        return None
    k_eff = d * (k - 1) + 1
    return _Axis(axis.size + (k_eff - 1) * axis.jump, axis.jump * s, axis.start - p * axis.jump)


def _union(geos: Sequence[_Geo], where: str) -> _Geo:
    out: list[_Axis | None] = []
    for dim in (0, 1):
        axes = [g[dim] for g in geos]
        if any(a is None for a in axes):
            out.append(None)
            continue
        known = [a for a in axes if a is not None]
        if len({a.jump for a in known}) > 1:
            raise RfatlasError(f"cannot merge branches with different strides at {where}")
        start = min(a.start for a in known)
        end = max(a.start + a.size for a in known)
        out.append(_Axis(end - start, known[0].jump, start))
    return (out[0], out[1])


def _step(op: Any, inputs: Sequence[tuple[_Geo, _Shape]], out_shape: _Shape, where: str) -> _Geo:
    """Geometry of an op's output from its data inputs' geometries and shapes."""
    if len(out_shape) != 4 or any(len(shape) != 4 for _, shape in inputs):
        return _WHOLE  # flatten, linear, global reductions
    geo, in_shape = inputs[0]
    if isinstance(op, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k, s = _pair(op.kernel_size), _pair(op.stride)
        d = _pair(getattr(op, "dilation", 1))
        if op.padding == "valid":
            p = (0, 0)
        elif op.padding == "same":  # PyTorch pads total // 2 on the top/left
            p = ((d[0] * (k[0] - 1)) // 2, (d[1] * (k[1] - 1)) // 2)
        else:
            p = _pair(op.padding)
        return (_window(geo[0], k[0], s[0], p[0], d[0]), _window(geo[1], k[1], s[1], p[1], d[1]))
    name = getattr(op, "__name__", op) if not isinstance(op, nn.Module) else ""
    if isinstance(op, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or name in (
        "adaptive_avg_pool2d",
        "adaptive_max_pool2d",
        "_adaptive_max_pool2d",
    ):
        axes: list[_Axis | None] = []
        for dim in (0, 1):
            n_in, n_out = in_shape[2 + dim], out_shape[2 + dim]
            if n_in == n_out:
                axes.append(geo[dim])
            elif n_out > 1 and n_in % n_out == 0:  # uniform windows: a plain pool with kernel = stride
                axes.append(_window(geo[dim], n_in // n_out, n_in // n_out, 0, 1))
            else:  # global pooling, or windows of varying size
                axes.append(None)
        return (axes[0], axes[1])
    if isinstance(op, _PAD_MODULES):
        left, _, top, _ = op.padding
        return (_window(geo[0], 1, 1, top, 1), _window(geo[1], 1, 1, left, 1))
    if isinstance(op, _UNSUPPORTED_MODULES) or name in _UNSUPPORTED_FUNCTIONS:
        raise RfatlasError(
            f"cannot derive receptive fields through {where} ({type(op).__name__ if name == '' else name})"
        )
    if any(shape[2:] != out_shape[2:] for _, shape in inputs):
        raise RfatlasError(f"cannot derive receptive fields through {where}: it changes the feature-map size")
    return _union([g for g, _ in inputs], where)  # pointwise ops (BN, ReLU, add, channel concat, ...)


class _Tracer(fx.Tracer):
    """fx tracer that remembers the graph node holding each module call's output."""

    def __init__(self) -> None:
        super().__init__()
        self.module_nodes: dict[str, fx.Node] = {}

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            self.path_of_module(m)
        except NameError:  # another model's module, run by another thread meanwhile: fx patches
            return forward(*args, **kwargs)  # `Module.__call__` process-wide while it traces
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.module_nodes[self.path_of_module(m)] = out.node
        return out


def _node_shape(node: fx.Node) -> _Shape | None:
    meta = node.meta.get("tensor_meta")
    return tuple(int(v) for v in meta.shape) if isinstance(meta, TensorMetadata) else None


def _traced_geometry(model: nn.Module, input_size: int) -> dict[str, _Geo] | None:
    """Per-module output geometry propagated through the torch.fx graph; None if fx cannot trace."""
    tracer = _Tracer()
    try:
        # no hooked forward pass of this model in another thread meanwhile: tracing patches module
        # calls and the shape propagation runs (and flips the mode flags of) the model's modules
        with model_lock(model):
            graph = tracer.trace(model)
            gm = fx.GraphModule(model, graph)
            with torch.no_grad(), eval_mode(model):
                ShapeProp(gm).propagate(dummy_input(model, input_size))
    except Exception:  # data-dependent control flow, untraceable ops, ...
        return None
    geos: dict[fx.Node, _Geo] = {}
    for node in graph.nodes:
        if node.op == "placeholder" and not geos:
            geos[node] = _IDENTITY
        elif node.op in ("call_module", "call_function", "call_method"):
            out_shape = _node_shape(node)
            inputs = [(geos[a], _node_shape(a) or ()) for a in node.all_input_nodes if a in geos]
            if out_shape is None or not inputs:
                continue  # sizes, constants, parameters
            op = gm.get_submodule(str(node.target)) if node.op == "call_module" else node.target
            geos[node] = _step(op, inputs, out_shape, f"{node.op} {node.target}")
    return {path: geos[node] for path, node in tracer.module_nodes.items() if node in geos}


def _hooked_geometry(model: nn.Module, input_size: int) -> dict[str, _Geo]:
    """Fallback: leaf modules applied in execution order as if the network were a plain chain."""
    with model_lock(model):  # hooks live on the (possibly shared) modules
        return _hooked_geometry_locked(model, input_size)


def _hooked_geometry_locked(model: nn.Module, input_size: int) -> dict[str, _Geo]:
    geos: dict[str, _Geo] = {}
    current = [_IDENTITY]
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        leaf = next(module.children(), None) is None

        def hook(
            m: nn.Module, inputs: tuple[Any, ...], output: Any, name: str = name, leaf: bool = leaf
        ) -> None:
            if not isinstance(output, Tensor):
                return
            if leaf and inputs and isinstance(inputs[0], Tensor):
                in_shape = tuple(inputs[0].shape)
                current[0] = _step(m, [(current[0], in_shape)], tuple(output.shape), name)
            geos[name] = current[0]

        handles.append(module.register_forward_hook(hook))
    try:
        run_dummy(model, dummy_input(model, input_size))
    finally:
        for handle in handles:
            handle.remove()
    return geos


def _to_rfield(geo: _Geo, input_size: int) -> RField:
    axes = [a if a is not None else _Axis(input_size, 0, 0) for a in geo]
    return RField(
        size=(axes[0].size, axes[1].size),
        stride=(axes[0].jump, axes[1].jump),
        offset=(axes[0].start + (axes[0].size - 1) / 2, axes[1].start + (axes[1].size - 1) / 2),
    )


def _receptive_fields(model: nn.Module, input_size: int, layers: list[LayerInfo]) -> dict[str, RField]:
    geos = _traced_geometry(model, input_size)
    if geos is None or any(layer.name not in geos for layer in layers):
        geos = _hooked_geometry(model, input_size)
    return {layer.name: _to_rfield(geos[layer.name], input_size) for layer in layers}


def receptive_fields(model: nn.Module, input_size: int | None = None) -> dict[str, RField]:
    """Analytic receptive field of every `list_layers()` layer.

    Propagates (size, jump, start) per axis through the torch.fx graph of the model: convs and pools
    grow and stride it, pointwise ops (BN, ReLU, add, channel concat) keep it, merging branches take
    the union of their boxes; global pooling, flatten and linear layers see the whole input (stride 0).
    If fx cannot trace the model, leaf modules are applied in execution order instead, which is only
    right for plain chains (no branches). Ops of unknown geometry raise RfatlasError.
    """
    size = default_input_size(model, input_size)
    return _receptive_fields(model, size, list_layers(model, size))


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _positive_probe(model: nn.Module) -> nn.Module:
    """Copy of the model whose every unit depends positively on every pixel of its receptive field."""
    probe = copy.deepcopy(model).eval()
    for name, module in list(probe.named_modules()):
        replacement: nn.Module | None = None
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                module.weight.fill_(1.0 / module.weight[0].numel())  # keeps activations near 1
                if module.bias is not None:
                    module.bias.zero_()
        elif isinstance(module, _NORMS):  # would rescale (or, on a constant input, zero) activations
            replacement = nn.Identity()
        elif isinstance(module, nn.MaxPool2d):  # max-pool gradients pick one input; average-pool keeps all
            if _pair(module.dilation) != (1, 1):
                raise RfatlasError(f"empirical_rf does not support the dilated max-pool {name!r}")
            replacement = nn.AvgPool2d(
                module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode
            )
        if replacement is not None:
            parent, _, child = name.rpartition(".")
            setattr(probe.get_submodule(parent), child, replacement)
    return probe.requires_grad_(False)


def _support(
    probe: nn.Module, layer: str, size: int, position: tuple[int, int] | None = None
) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the half-open extent of input pixels a probe unit's gradient reaches."""
    x = dummy_input(probe, size, fill=1.0).requires_grad_(True)
    with torch.enable_grad(), capture(probe, [layer], stop_early=True) as cap:
        out = cap.run(x)[layer]
        if out.dim() == 4:
            y, xx = position if position is not None else (out.shape[2] // 2, out.shape[3] // 2)
            if not (0 <= y < out.shape[2] and 0 <= xx < out.shape[3]):
                raise RfatlasError(
                    f"position {(y, xx)} is outside {layer!r}'s {out.shape[2]}x{out.shape[3]} map"
                )
            unit = out[0, :, y, xx].sum()
        else:
            unit = out[0].sum()
        (grad,) = torch.autograd.grad(unit, x)
    support = grad[0].abs().sum(0) > 0
    rows = torch.nonzero(support.any(1)).flatten()
    cols = torch.nonzero(support.any(0)).flatten()
    if rows.numel() == 0:
        raise RfatlasError(f"the unit of {layer!r} does not depend on the input")
    return (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


def empirical_rf(
    model: nn.Module, layer: str, input_size: int | None = None, position: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(h, w) of the input pixels on which the unit at `position` (default: map centre) depends.

    Measured as the support of d(unit)/d(input) on a copy of the model with positive constant weights,
    zero biases, no normalization layers and average- instead of max-pools, fed all ones; so every
    pixel of the (image-clipped) receptive field gets a nonzero gradient.
    """
    size = default_input_size(model, input_size)
    y0, y1, x0, x1 = _support(_positive_probe(model), layer, size, position)
    return (y1 - y0, x1 - x0)


def format_rf_table(model: nn.Module, input_size: int | None = None) -> str:
    """Aligned text table of every layer: kind, channels, shape, RF size, stride, offset."""
    size = default_input_size(model, input_size)
    layers = list_layers(model, size)
    rfs = _receptive_fields(model, size, layers)
    rows = [("layer", "kind", "channels", "shape", "RF size", "stride", "offset")]
    for layer in layers:
        rf = rfs[layer.name]
        rows.append((
            layer.name,
            layer.kind,
            str(layer.channels),
            f"{layer.shape[0]}x{layer.shape[1]}",
            f"{rf.size[0]}x{rf.size[1]}",
            f"{rf.stride[0]}x{rf.stride[1]}",
            f"{rf.offset[0]:g},{rf.offset[1]:g}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"receptive fields of {model_name(model)} at {size}x{size} input"]
    for i, row in enumerate(rows):
        cells = [
            cell.ljust(w) if j < 2 else cell.rjust(w)
            for j, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
