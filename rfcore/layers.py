"""Analyzable layers of a CNN: listing them, resolving a layer spec, capturing their outputs with hooks."""

from __future__ import annotations

import copy
import difflib
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.nn.utils.fusion
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchvision.models.resnet import BasicBlock, Bottleneck

from rfcore.errors import RfatlasError, UnknownLayerError

_Hook = Callable[[nn.Module, tuple[Any, ...], Any], Any]


@dataclass(frozen=True)
class LayerInfo:
    """An analyzable layer: `named_modules()` path, kind, output channels, feature-map (H, W)."""

    name: str
    kind: str  # 'conv' | 'pool' | 'block' | 'relu' | 'linear'
    channels: int
    shape: tuple[int, int]  # (1, 1) for flat (B, C) outputs


def default_input_size(model: nn.Module, input_size: int | None = None) -> int:
    """`input_size`, else the model's `rfatlas_meta.preprocessing.size`, else 224."""
    if input_size is not None:
        return int(input_size)
    meta = getattr(model, "rfatlas_meta", None)
    return int(meta.preprocessing.size) if meta is not None else 224


def model_name(model: nn.Module) -> str:
    """The registry name (`rfatlas_meta.name`) or the lower-cased class name, for messages."""
    meta = getattr(model, "rfatlas_meta", None)
    return str(meta.name) if meta is not None else type(model).__name__.lower()


def dummy_input(model: nn.Module, input_size: int, fill: float = 0.0) -> Tensor:
    """A (1, 3, S, S) tensor filled with `fill`, on the model's device and in its dtype."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    return torch.full((1, 3, input_size, input_size), fill, device=device, dtype=dtype)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode (no BatchNorm statistics updates); restore the flags afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def run_dummy(model: nn.Module, x: Tensor) -> None:
    """Forward `x` in eval mode without gradients; a failing forward becomes a one-line RfatlasError."""
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RfatlasError(
            f"cannot run {model_name(model)} on a {x.shape[-2]}x{x.shape[-1]} input: {first}"
        ) from exc


def _kind(module: nn.Module, parent: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)):
        return "pool"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (BasicBlock, Bottleneck)):
        return "block"
    is_container = isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
    if isinstance(parent, nn.Sequential) and not is_container and next(module.children(), None) is not None:
        return "block"  # a composite stage element, e.g. a PlainNet block inside `layerN`
    return None


def list_layers(model: nn.Module, input_size: int | None = None) -> list[LayerInfo]:
    """Analyzable layers in forward order, with output shapes from one dummy forward pass.

    Analyzable: convs, pools, ReLUs, linears, and blocks (children of a `nn.Sequential` stage that
    are themselves composite, e.g. ResNet's `layer1.0`). Modules run more than once per forward pass
    (ResNet's shared per-block `relu`) or never run are not well-defined layers and are skipped.
    """
    size = default_input_size(model, input_size)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    shapes: dict[str, torch.Size] = {}

    def make_hook(name: str) -> _Hook:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, Tensor):
                shapes[name] = output.shape

        return hook

    with model_lock(model):
        handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items() if n]
        try:
            run_dummy(model, dummy_input(model, size))
        finally:
            for handle in handles:
                handle.remove()

    layers = []
    for name in calls:  # dicts keep insertion order: the order of first completion
        shape = shapes.get(name)
        if calls[name] != 1 or shape is None or len(shape) not in (2, 4):
            continue
        kind = _kind(modules[name], modules[name.rpartition(".")[0]])
        if kind is not None:
            hw = (int(shape[2]), int(shape[3])) if len(shape) == 4 else (1, 1)
            layers.append(LayerInfo(name, kind, int(shape[1]), hw))
    return layers


def _unknown(model: nn.Module, name: str, candidates: Sequence[str]) -> UnknownLayerError:
    close = difflib.get_close_matches(name, candidates, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"see `rfatlas rf --model {model_name(model)}`"
    return UnknownLayerError(f"unknown layer {name!r} for {model_name(model)}; {hint}")


def _default_layers(model: nn.Module, layers: list[LayerInfo]) -> list[str]:
    blocks = [layer.name for layer in layers if layer.kind == "block"]
    if blocks:  # ResNet-like: the stem's convs and pools (outside and before the blocks), then every block
        first = next(i for i, layer in enumerate(layers) if f"{layer.name}.".startswith(f"{blocks[0]}."))
        stem = [layer.name for layer in layers[:first] if layer.kind in ("conv", "pool")]
        return stem + blocks
    names = []  # VGG-like: every ReLU right after a conv, every max-pool
    for i, layer in enumerate(layers):
        after_conv = layer.kind == "relu" and i > 0 and layers[i - 1].kind == "conv"
        if after_conv or isinstance(model.get_submodule(layer.name), nn.MaxPool2d):
            names.append(layer.name)
    return names


def resolve_layers(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Layer names for a spec: 'default', 'all', 'all-conv', 'a,b,c' or a list; forward order, no repeats."""
    layers = list_layers(model)
    names = [layer.name for layer in layers]
    if isinstance(spec, str):
        if spec.strip() == "default":
            return _default_layers(model, layers)
        if spec.strip() == "all":
            return names
        if spec.strip() == "all-conv":
            return [layer.name for layer in layers if layer.kind == "conv"]
        requested = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        requested = [str(part).strip() for part in spec]
    if not requested:
        raise UnknownLayerError(f"no layers requested for {model_name(model)}")
    modules = dict(model.named_modules())
    for name in requested:
        if name in names:
            continue
        if name in modules and name:
            raise UnknownLayerError(
                f"layer {name!r} of {model_name(model)} is not analyzable "
                "(only convs, pools, blocks, ReLUs and linears run once per forward pass)"
            )
        raise _unknown(model, name, names)
    wanted = set(requested)
    return [name for name in names if name in wanted]


@dataclass(frozen=True)
class Response:
    """Which tensor stands for a layer's activation (paper §3.5: activation after the nonlinearity).

    `module` is the module whose output is captured; with `relu`, `max(output, 0)` is taken (the
    ReLU that follows is a module shared by several calls, e.g. ResNet's per-block `relu`).
    `tensor` says it in words for the layer attrs, e.g. "relu(bn1(conv1))". `pre` is the module
    whose output is the response before rectification (`pre_tensor`, e.g. "bn1(conv1)"): the
    act-max objective, which has the response's maximizer but a gradient where the ReLU is 0."""

    layer: str
    module: str
    relu: bool
    tensor: str
    pre: str
    pre_tensor: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (layer attrs `response`)."""
        return {"module": self.module, "relu": self.relu, "tensor": self.tensor}


_RESPONSES: weakref.WeakKeyDictionary[nn.Module, dict[str, Response]] = weakref.WeakKeyDictionary()
_MUTATED: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()


def _short(name: str) -> str:
    """The last part of a module path (two when it is an index: `downsample.0`)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def response_map(model: nn.Module, input_size: int | None = None) -> dict[str, Response]:
    """The post-nonlinearity response of every conv (the default capture of `capture(response=True)`).

    One dummy forward records which module consumes each module's output: a conv followed by a
    BatchNorm followed by a ReLU is captured after that ReLU (its output when the ReLU module runs
    once per forward pass, else the BatchNorm output rectified); a conv followed directly by a ReLU
    likewise; a conv whose BatchNorm output is not rectified next (ResNet's `bn2`, added to the skip
    first) is captured after its BatchNorm. So a BatchNorm with γ < 0 cannot reverse the ranking of
    a channel's units. Other layers (pools, blocks, ReLUs, linears) are their own response."""
    cached = _RESPONSES.get(model)
    if cached is not None:
        return cached
    size = default_input_size(model, input_size)
    modules = dict(model.named_modules())
    # (name, first input, its version before the call, output, its version after the call): a
    # tensor changed in place in between (ResNet's `out += identity`) is not the same activation
    events: list[tuple[str, Any, int, Any, int]] = []
    calls: dict[str, int] = {}
    before: dict[str, tuple[Any, int]] = {}

    def version(t: Any) -> int:
        return int(t._version) if isinstance(t, Tensor) else -1

    def pre_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            first = inputs[0] if inputs else None
            before[name] = (first, version(first))

        return hook

    def make_hook(name: str) -> _Hook:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            first, v = before.pop(name, (None, -1))
            events.append((name, first, v, output, version(output)))

        return hook

    leaves = [n for n, m in modules.items() if n and next(m.children(), None) is None]
    with model_lock(model):
        handles = [modules[n].register_forward_pre_hook(pre_hook(n)) for n in leaves]
        handles += [modules[n].register_forward_hook(make_hook(n)) for n in leaves]
        try:
            with torch.inference_mode(False):  # version counters (callers may be in inference mode)
                run_dummy(model, dummy_input(model, size))
        finally:
            for handle in handles:
                handle.remove()

    def consumer(after: int) -> int | None:
        """The next module fed the unchanged output of event `after`."""
        tensor, v = events[after][3], events[after][4]
        for j in range(after + 1, len(events)):
            if events[j][1] is tensor:
                return j if events[j][2] == v else None
        return None

    out: dict[str, Response] = {}
    for i, (name, *_) in enumerate(events):
        if not isinstance(modules[name], nn.Conv2d) or calls.get(name) != 1:
            continue
        chain, j = [name], consumer(i)
        if j is not None and isinstance(modules[events[j][0]], nn.modules.batchnorm._BatchNorm):
            chain.append(events[j][0])
            j = consumer(j)
        text = _short(name)
        for c in chain[1:]:
            text = f"{_short(c)}({text})"
        if j is not None and isinstance(modules[events[j][0]], nn.ReLU):
            relu = events[j][0]
            if calls.get(relu) == 1:
                out[name] = Response(name, relu, False, f"{_short(relu)}({text})", chain[-1], text)
            else:
                out[name] = Response(name, chain[-1], True, f"relu({text})", chain[-1], text)
        else:
            note = f"{text} (no ReLU follows it directly)"
            out[name] = Response(name, chain[-1], False, note, chain[-1], text)
    # outputs changed in place after their module returned by something other than an in-place
    # module (those run out of place in a capture): ResNet's bn2 by `out += identity`
    mutated = set()
    for i, (name, _, _, output, v) in enumerate(events):
        by_modules = sum(
            1 for e in events[i + 1 :] if e[1] is output and getattr(modules[e[0]], "inplace", False) is True
        )
        if version(output) - v > by_modules:
            mutated.add(name)
    _MUTATED[model] = frozenset(mutated)
    events.clear()
    _RESPONSES[model] = out
    return out


def _output_tensors(out: Any) -> list[Tensor]:
    """The tensors in a forward pass's output (a tensor, or nested tuples, lists and dicts of them)."""
    if isinstance(out, Tensor):
        return [out]
    items = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return [t for item in items for t in _output_tensors(item)]


def _uses(roots: list[Tensor]) -> dict[Any, int]:
    """How many times each autograd node of the graph behind `roots` is an input of another."""
    uses: dict[Any, int] = {}
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen = set(stack)
    while stack:
        for source, _ in stack.pop().next_functions:
            if source is not None:
                uses[source] = uses.get(source, 0) + 1
                if source not in seen:
                    seen.add(source)
                    stack.append(source)
    return uses


def folded_copy(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode `model` with frozen parameters and each BatchNorm2d folded into the
    Conv2d that feeds it (`fuse_conv_bn_weights`) and replaced by `nn.Identity`: the same function up
    to float rounding, without the BatchNorm's pass over each activation (about a tenth of an act-max
    step), module names kept (a capture of the BatchNorm's output reads the folded conv).

    One dummy forward of the copy (hooks on the copy only; symbolic tracing would patch
    `Module.__call__` for the whole process, under other threads' forward passes) picks the pairs:
    both modules run once, the BatchNorm's input is the conv's unchanged output, and in the autograd
    graph nothing else uses that output. A model in training mode, or one the dummy input does not
    fit, is copied unfolded."""
    net = copy.deepcopy(model)
    for p in net.parameters():
        p.requires_grad_(False)
    if model.training:
        return net
    modules = dict(net.named_modules())
    seen: dict[str, list[tuple[Tensor, int]]] = {}  # conv: its outputs; BatchNorm: its inputs

    def record(name: str, bn: bool) -> _Hook:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            tensor = inputs[0] if bn else output
            seen.setdefault(name, []).append((tensor, int(tensor._version)))

        return hook

    handles = [
        m.register_forward_hook(record(n, isinstance(m, nn.BatchNorm2d)))
        for n, m in modules.items()
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
    ]
    x = dummy_input(net, default_input_size(net)).requires_grad_(True)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            out = net(x)
    except Exception:  # the real run reports what is wrong with the model; fold nothing
        return net
    finally:
        for handle in handles:
            handle.remove()
    uses = _uses(_output_tensors(out))
    outputs = {  # conv outputs (each conv run once), by tensor
        id(calls[0][0]): (n, calls[0])
        for n, calls in seen.items()
        if len(calls) == 1 and isinstance(modules[n], nn.Conv2d)
    }
    for name, calls in seen.items():
        bn = modules[name]
        if not isinstance(bn, nn.BatchNorm2d) or len(calls) != 1 or bn.running_mean is None:
            continue
        tensor, version = calls[0]
        source = outputs.get(id(tensor))
        if source is None or source[1][1] != version:
            continue
        if int(tensor._version) != version or tensor.grad_fn is None or uses.get(tensor.grad_fn) != 1:
            continue  # changed in place after the BatchNorm read it, or used elsewhere too
        conv = modules[source[0]]
        assert isinstance(conv, nn.Conv2d) and bn.running_var is not None
        weight, bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight, conv.bias = weight.requires_grad_(False), bias.requires_grad_(False)
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent), leaf, nn.Identity())
    return net


def mutated_outputs(model: nn.Module) -> frozenset[str]:
    """Modules whose output the forward pass changes in place later (e.g. ResNet's `bn2`, by the
    skip's `out += identity`): a capture of them must keep a copy."""
    if model not in _MUTATED:
        response_map(model)
    return _MUTATED[model]


def response_module(model: nn.Module, layer: str) -> Response:
    """The response captured for `layer` (see `response_map`): for a conv, after the BN and ReLU
    that follow it; any other layer is its own response. For act-max objectives and noise hooks."""
    hit = response_map(model).get(layer)
    return hit if hit is not None else Response(layer, layer, False, _short(layer), layer, _short(layer))


_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serializes hook-based runs on one model object (`capture`, act-max): hooks and
    flags live on the module, and a worker's cached model serves every task thread."""
    with _LOCKS_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


class _StopForward(Exception):
    """Raised by a capture hook to end the forward pass once every requested output is in."""


class capture:  # lower-case: used like a function: `with capture(model, layers) as cap:`
    """Record the outputs of the named modules, and replace the outputs of the modules in `edit` by
    `fn(output)` (as baukit's `TraceDict(edit_output=...)`); hooks exist only inside the `with` block,
    which holds the model's lock, and act only on forward passes of the thread that entered it.

    While active, a module with an `inplace` flag (ReLU, ...) runs out of place when its input is a
    captured output, so a captured conv output is not overwritten by the following ReLU; elsewhere
    it stays in place (no extra memory). With `stop_early`, the forward pass is
    cut off right after the last requested output is produced. Outputs keep their autograd graph.

    With `response=True` a conv layer's output is its post-nonlinearity response (`response_map`:
    the BatchNorm and ReLU that follow it); outputs stay keyed by the requested layer names.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] = (),
        *,
        edit: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
        stop_early: bool = False,
        response: bool = False,
    ) -> None:
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.edit = dict(edit or {})
        self.stop_early = stop_early
        self.outputs: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        for name in [*self.layers, *self.edit]:
            if not name or name not in modules:
                raise _unknown(model, name, [n for n in modules if n])
        self.responses = {
            n: response_module(model, n) if response else Response(n, n, False, _short(n), n, _short(n))
            for n in self.layers
        }
        self._record = list(dict.fromkeys(r.module for r in self.responses.values()))
        self._copy = mutated_outputs(model) & set(self._record) if self._record else frozenset()
        hooked = list(dict.fromkeys([*self._record, *self.edit]))
        self._modules = [(name, modules[name]) for name in hooked]
        self._handles: list[RemovableHandle] = []
        self._inplace: list[nn.Module] = []
        self._active = False

    def _hook(self, name: str) -> _Hook:
        edit, record, copy = self.edit.get(name), name in self._record, name in self._copy

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            if threading.get_ident() != self._thread:
                return None  # a forward of the same (shared) model in another thread
            if edit is not None:
                output = edit(output)
            if record and isinstance(output, Tensor):
                last = (
                    self.stop_early
                    and name not in self.outputs
                    and len(self.outputs) + 1 == len(self._record)
                )
                # a copy of what a later in-place op would change (nothing runs after the last)
                kept = output.clone() if copy and not last else output
                self.outputs[name] = kept
                self._storages.add(kept.untyped_storage().data_ptr())
            if self.stop_early and len(self.outputs) == len(self._record):
                raise _StopForward
            return output if edit is not None else None

        return hook

    def _guard_inplace(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """Before an in-place module (ReLU, ...): run it out of place when it would overwrite a
        captured output (e.g. VGG's ReLU after a captured conv); elsewhere it stays in place."""
        if threading.get_ident() != self._thread:
            return
        module.inplace = not any(  # type: ignore[assignment]
            isinstance(t, Tensor) and t.untyped_storage().data_ptr() in self._storages for t in inputs
        )

    def __enter__(self) -> capture:
        self._lock = model_lock(self.model)
        self._lock.acquire()  # one capture at a time per model object
        self._thread = threading.get_ident()
        self._inplace = [m for m in self.model.modules() if getattr(m, "inplace", None) is True]
        self._storages: set[int] = set()
        self._handles = [m.register_forward_pre_hook(self._guard_inplace) for m in self._inplace]
        self._handles += [m.register_forward_hook(self._hook(n)) for n, m in self._modules]
        self._active = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        for m in self._inplace:
            m.inplace = True  # type: ignore[assignment]
        self._handles, self._inplace, self._active = [], [], False
        self._lock.release()

    def run(self, x: Tensor) -> dict[str, Tensor]:
        """Forward `x` (stopping early if asked) and return the captured outputs by layer name."""
        if not self._active:
            raise RuntimeError("capture.run() needs an active `with capture(...)` block")
        self.outputs = {}
        self._storages = set()
        try:
            self.model(x)
        except _StopForward:
            pass
        for name in self._record:
            if name not in self.outputs:
                raise UnknownLayerError(
                    f"layer {name!r} of {model_name(self.model)} produced no tensor output"
                )
        raw = self.outputs
        plain = {r.module for r in self.responses.values() if not r.relu}

        def rectified(module: str) -> Tensor:  # in place where nothing else reads the raw output
            t = raw[module]
            return torch.relu(t) if module in plain or t.requires_grad else torch.relu_(t)

        self.outputs = {
            n: rectified(r.module) if r.relu else raw[r.module] for n, r in self.responses.items()
        }
        return self.outputs
