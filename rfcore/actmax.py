"""Activation maximization for many channels at once (Kobayashi & Shouno 2020, §2.3 eq. 2 and §3.4).

Image i of a batch serves channel cᵢ; the loss is the sum of the per-image objectives, the model is in
eval mode and every random draw (init, transforms) comes from a generator seeded by (seed, cᵢ), so a
channel rendered alone or inside any batch gets the same image (to float tolerance). The forward pass
stops at the target layer and runs on a private copy of the model with frozen parameters and its
BatchNorms folded into their convs (`rfcore.layers.folded_copy`).

The objective is read from a conv's response before its ReLU (`Response.pre`: the BatchNorm output,
e.g. `bn1(conv1)`, recorded as the `objective_tensor` attr): it has the same maximizer as the
post-ReLU activation the sweep ranks (ReLU is monotone, and a BN with γ < 0 is already applied) but a
gradient where the ReLU is zero, so the optimization can start from the mean image.

Parameterizations: `pixel` optimizes the model input itself (normalized units; the zero image is the
dataset mean colour), `fft` is lucid's: a 1/f-scaled spectrum, optional colour decorrelation, and a
sigmoid to [0, 1] RGB. Images come back in display units, RGB in [0, 1] (`x · std + mean` for `pixel`,
not clipped).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import Tensor, nn

from rfcore.errors import ConfigMismatchError, RfatlasError, StoreError, UnknownLayerError
from rfcore.layers import capture, folded_copy, list_layers, model_lock, resolve_layers, response_module
from rfcore.precision import autocast
from rfcore.receptive import Box, receptive_fields, rf_box
from rfcore.schema import ArraySpec
from rfcore.store import AtlasStore, redact

OBJECTIVES = ("neuron", "channel")
#: Input layout of the forward pass: NHWC convs are faster on CPU (oneDNN) and with AMP on CUDA.
CHANNELS_LAST = torch.channels_last

# lucid's colour-correlation square root (ImageNet), columns normalized to a max norm of 1.
_COLOR_SQRT = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32)
_COLOR = _COLOR_SQRT / np.max(np.linalg.norm(_COLOR_SQRT, axis=0))


def _spec(path: str, dims: tuple[str, ...], doc: str) -> ArraySpec:
    return ArraySpec(
        f"layers/{{layer}}/actmax/{path}", dims, "float32", math.nan, doc, scope="root", analysis="actmax"
    )


#: Root-scoped so that any layer of the model can be rendered, swept or not.
ACTMAX_ARRAYS: dict[str, ArraySpec] = {
    "image": _spec(
        "{objective}/image",
        ("channel", "color", "y", "x"),
        "optimized input per channel, RGB display units ([0, 1]; pixel parameterization unclipped)",
    ),
    "activation": _spec(
        "{objective}/activation",
        ("channel",),
        "objective (centre unit or map mean) of the final image, without penalty",
    ),
    "trace": _spec(
        "{objective}/trace", ("channel", "step"), "objective at each optimization step (before its update)"
    ),
    "crop": _spec(
        "neuron/crop",
        ("channel", "color", "ry", "rx"),
        "the image under the centre unit's receptive-field box; NaN outside the image",
    ),
}


class ActmaxError(RfatlasError):
    """An activation-maximization setting is invalid (unknown preset, knob or value)."""


@dataclass(frozen=True)
class ActmaxConfig:
    """Every knob of a run. `lam` weighs the penalty of eq. 2 (`l2`: λ‖x‖₂; `l2sq`: λ‖x‖²) on the model
    input; `weight_decay` is Adam's (on the optimized parameters). `size=None`: the model's input size.
    Transforms (lucid-style, per image and step): constant grey pad, then one random affine map with an
    integer shift in [-jitter, jitter], a scale from `scales` and an angle (degrees) from `angles`.
    `amp`: bfloat16 autocast of the forward pass, on CUDA and on CPUs with native bfloat16 (oneDNN);
    ignored on other CPUs, where it would be emulated and slow."""

    param: str = "pixel"
    decorrelate: bool = False
    init: str = "zero"
    init_std: float = 0.01
    lr: float = 0.1
    weight_decay: float = 1e-6
    steps: int = 31
    size: int | None = None
    penalty: str = "l2"
    lam: float = 0.0
    pad: int = 0
    jitter: int = 0
    scales: tuple[float, ...] = ()
    angles: tuple[float, ...] = ()
    amp: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.param in ("pixel", "fft"), f"param must be 'pixel' or 'fft', not {self.param!r}"),
            (self.init in ("zero", "random"), f"init must be 'zero' or 'random', not {self.init!r}"),
            (self.penalty in ("l2", "l2sq"), f"penalty must be 'l2' or 'l2sq', not {self.penalty!r}"),
            (not self.decorrelate or self.param == "fft", "decorrelate needs param='fft'"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.size is None or self.size >= 1, f"size must be >= 1, got {self.size}"),
            (
                min(self.pad, self.jitter, self.lam, self.weight_decay) >= 0,
                "pad, jitter, lam and weight_decay must be >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ActmaxError(message)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (store attrs)."""
        d = asdict(self)
        d["scales"], d["angles"] = list(self.scales), list(self.angles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActmaxConfig:
        """Inverse of `to_dict`."""
        return cls(**{**d, "scales": tuple(d["scales"]), "angles": tuple(d["angles"])})


PRESETS: dict[str, ActmaxConfig] = {
    # §3.4: pixels from a zero image, Adam lr 0.1, weight decay 1e-6, 31 iterations, the model's
    # input size (224 for the paper's ResNet34).
    "kobayashi2020": ActmaxConfig(),
    # lucid/lucent's render_vis defaults: FFT + decorrelated colour, standard transforms, 512 steps.
    "lucid": ActmaxConfig(
        param="fft",
        decorrelate=True,
        init="random",
        lr=0.05,
        weight_decay=0.0,
        steps=512,
        size=128,
        pad=12,
        jitter=8,
        scales=tuple(1 + (i - 5) / 50 for i in range(11)),
        angles=tuple(float(a) for a in [*range(-10, 11), 0, 0, 0, 0, 0]),
    ),
}


def preset(name: str, **overrides: Any) -> ActmaxConfig:
    """The named preset with any knob overridden."""
    if name not in PRESETS:
        raise ActmaxError(f"unknown actmax preset {name!r}; choose from {', '.join(PRESETS)}")
    known = {f.name for f in fields(ActmaxConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ActmaxError(
            f"unknown actmax setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class ActmaxResult:
    """One image per requested channel (row i serves `channels[i]`), on CPU."""

    layer: str
    objective: str
    channels: list[int]
    image: Tensor  # (B, 3, S, S) float32, RGB display units
    activation: Tensor  # (B,) objective of the final image (no transforms, no penalty)
    trace: Tensor  # (B, steps) objective at each step, before its update
    position: tuple[int, int] | None  # 'neuron': the feature-map unit (y, x)
    box: Box | None  # 'neuron': its receptive-field box in the image
    crop: Tensor | None  # 'neuron': (B, 3, rh, rw) image under the box, NaN outside it


def channel_seed(seed: int, channel: int) -> int:
    """Seed of the generator that serves `channel` (independent of the batch it runs in)."""
    return (seed * 1_000_003 + channel) % (2**63)


def parse_channels(spec: str, num_channels: int) -> list[int]:
    """'0-63', '3,5,9-11' or 'all' -> sorted channel indices, each checked against `num_channels`."""
    if spec.strip() == "all":
        return list(range(num_channels))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi if hi else lo) + 1))
    except ValueError:
        raise ActmaxError(f"bad channel list {spec!r}; use e.g. '0-63' or '3,5,9-11'") from None
    if not out or min(out) < 0 or max(out) >= num_channels:
        raise ActmaxError(f"channels {spec!r} are outside 0-{num_channels - 1}")
    return sorted(out)


def _fft_scale(size: int) -> Tensor:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    freqs = np.sqrt(fx * fx + fy * fy)
    return torch.from_numpy(1.0 / np.maximum(freqs, 1.0 / size)).float()


class _Image:
    """Batched image parameterization; `render()` gives the model input (normalized units)."""

    def __init__(
        self,
        config: ActmaxConfig,
        gens: list[torch.Generator],
        size: int,
        mean: Tensor,
        std: Tensor,
        device: torch.device,
    ) -> None:
        self.config, self.size, self.mean, self.std = config, size, mean, std
        shape = (3, size, size) if config.param == "pixel" else (3, size, size // 2 + 1, 2)
        std_init = config.init_std if config.init == "random" else 0.0
        init = torch.stack([torch.randn(shape, generator=g) * std_init for g in gens])
        self.param = init.to(device).requires_grad_(True)
        if config.param == "fft":
            self.scale = _fft_scale(size).to(device)[None, None, :, :, None]
            self.color = torch.from_numpy(_COLOR.T.copy()).to(device)

    def rgb(self) -> Tensor:
        """Display-unit RGB (B, 3, S, S)."""
        if self.config.param == "pixel":
            return self.param * self.std + self.mean
        spectrum = torch.view_as_complex((self.scale * self.param).contiguous())
        image = torch.fft.irfftn(spectrum, s=(self.size, self.size), norm="ortho") / 4.0
        if self.config.decorrelate:
            image = torch.einsum("bchw,cd->bdhw", image, self.color)
        return torch.sigmoid(image)

    def render(self) -> Tensor:
        if self.config.param == "pixel":
            return self.param
        return (self.rgb() - self.mean) / self.std


def _transform(x: Tensor, config: ActmaxConfig, gens: list[torch.Generator], grey: Tensor) -> Tensor:
    """Pad with grey, then one random affine map per image (shift, scale, rotation)."""
    if config.pad:
        x = F.pad(x - grey, [config.pad] * 4) + grey
    if not (config.jitter or config.scales or config.angles):
        return x
    side = x.shape[-1]
    thetas = []
    for g in gens:
        shift = torch.randint(-config.jitter, config.jitter + 1, (2,), generator=g).tolist()
        scale = (
            config.scales[int(torch.randint(len(config.scales), (1,), generator=g))] if config.scales else 1.0
        )
        angle = (
            config.angles[int(torch.randint(len(config.angles), (1,), generator=g))] if config.angles else 0.0
        )
        c, s = math.cos(math.radians(angle)) / scale, math.sin(math.radians(angle)) / scale
        thetas.append([[c, -s, 2 * shift[1] / side], [s, c, 2 * shift[0] / side]])
    theta = torch.tensor(thetas, dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _objective(act: Tensor, rows: Tensor, objective: str) -> Tensor:
    """Per-image objective (B,) from the layer output (B, C, H, W); image i serves channel rows[i]."""
    if act.dim() == 2:  # a linear layer: one unit per channel
        act = act[:, :, None, None]
    maps = act[torch.arange(act.shape[0], device=act.device), rows].float()
    if objective == "neuron":
        return maps[:, maps.shape[1] // 2, maps.shape[2] // 2]
    return maps.mean(dim=(1, 2))


def _penalty(x: Tensor, config: ActmaxConfig) -> Tensor:
    """Per-image λ‖x‖₂ or λ‖x‖² (vector_norm's gradient at x = 0 is 0, not NaN: the zero image is fine)."""
    norm: Tensor = torch.linalg.vector_norm(x.flatten(1), dim=1)
    return config.lam * (norm.square() if config.penalty == "l2sq" else norm)


def rf_crop(image: Tensor, box: Box) -> Tensor:
    """The part of `image` (B, 3, H, W) under `box`, NaN where the box leaves the image."""
    y0, y1, x0, x1 = box.clipped()
    out = image.new_full((image.shape[0], image.shape[1], box.y1 - box.y0, box.x1 - box.x0), math.nan)
    out[:, :, box.clip_top : box.clip_top + (y1 - y0), box.clip_left : box.clip_left + (x1 - x0)] = image[
        :, :, y0:y1, x0:x1
    ]
    return out


def _preprocessing(model: nn.Module, size: int | None) -> tuple[int, Tensor, Tensor]:
    meta = getattr(model, "rfatlas_meta", None)
    pre = getattr(meta, "preprocessing", None)
    side = size if size is not None else getattr(pre, "size", None)
    if side is None:
        raise ActmaxError("the model has no input size (rfatlas_meta); set size")
    mean = torch.tensor(getattr(pre, "mean", (0.0, 0.0, 0.0)), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(getattr(pre, "std", (1.0, 1.0, 1.0)), dtype=torch.float32).view(1, 3, 1, 1)
    return int(side), mean, std


def actmax(
    model: nn.Module,
    layer: str,
    channels: Sequence[int],
    *,
    objective: str = "channel",
    config: ActmaxConfig | None = None,
    seed: int = 0,
    micro_batch: int | None = None,
) -> ActmaxResult:
    """Maximize `objective` ('neuron': the centre unit; 'channel': the mean over the map) of every
    channel in `channels` of `layer`, all in one batch, on the model's device. `micro_batch` splits
    the forward/backward of a step into groups of that many images (same result; default: 8 on CPU,
    where large batches run out of cache, the whole batch elsewhere)."""
    cfg = config if config is not None else PRESETS["kobayashi2020"]
    if objective not in OBJECTIVES:
        raise ActmaxError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    if not channels:
        raise ActmaxError("no channels to render")
    device = next(model.parameters()).device
    size, mean, std = _preprocessing(model, cfg.size)
    mean, std = mean.to(device), std.to(device)
    grey = (0.5 - mean) / std
    gens = [torch.Generator().manual_seed(channel_seed(seed, c)) for c in channels]
    image = _Image(cfg, gens, size, mean, std, device)
    rows = torch.tensor(list(channels), device=device)
    target = response_module(model, layer).pre
    optimizer = torch.optim.Adam([image.param], lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = autocast(device, "bf16" if cfg.amp else "off")
    trace = torch.empty(cfg.steps, len(channels), device=device)
    micro = micro_batch or (8 if device.type == "cpu" else len(channels))
    chunks = [slice(lo, lo + micro) for lo in range(0, len(channels), micro)]
    with model_lock(model):  # no capture's hooks on the model while it is copied
        net = folded_copy(model)  # private: parameters frozen, BatchNorms folded into their convs
    with capture(net, [target], stop_early=True) as cap:
        for step in range(cfg.steps):
            optimizer.zero_grad(set_to_none=True)
            x = image.render()
            leaf = x.detach().requires_grad_(True)  # micro-batches accumulate into leaf.grad
            values = []
            for sl in chunks:
                with amp:
                    act = cap.run(
                        _transform(leaf[sl], cfg, gens[sl], grey).contiguous(memory_format=CHANNELS_LAST)
                    )[target]
                if step == 0 and (min(channels) < 0 or max(channels) >= act.shape[1]):
                    raise ActmaxError(f"channels must be in 0-{act.shape[1] - 1} for layer {layer!r}")
                value = _objective(act, rows[sl], objective)
                loss = (_penalty(leaf[sl], cfg) - value).sum() if cfg.lam else -value.sum()
                torch.autograd.backward(loss)
                values.append(value.detach())
            torch.autograd.backward(x, leaf.grad)
            optimizer.step()
            trace[step] = torch.cat(values)
        with torch.no_grad(), amp:
            x = image.render().contiguous(memory_format=CHANNELS_LAST)
            finals = []
            for sl in chunks:
                act = cap.run(x[sl])[target]
                finals.append(_objective(act, rows[sl], objective))
            final = torch.cat(finals).cpu()
            rgb = image.rgb().float().cpu()
    position = box = crop = None
    if objective == "neuron":
        height, width = act.shape[2:] if act.dim() == 4 else (1, 1)
        position = (height // 2, width // 2)
        rfs = receptive_fields(model, input_size=size)
        if layer not in rfs:
            raise UnknownLayerError(f"no receptive field known for layer {layer!r}")
        box = rf_box(rfs[layer], position[0], position[1], (size, size))
        crop = rf_crop(rgb, box)
    return ActmaxResult(
        layer=layer,
        objective=objective,
        channels=list(channels),
        image=rgb,
        activation=final,
        trace=trace.T.cpu().contiguous(),
        position=position,
        box=box,
        crop=crop,
    )


# --- the atlas: layers/<layer>/actmax/<objective>/{image, activation, trace, crop} --------------------


def block_key(layer: str, objective: str, block: int, channels: Sequence[int] | None = None) -> str:
    """Completion-marker key of channel block `block` (`AtlasStore.mark_done`); a part of a block
    (`channels`, not all of it) has its own key, so a full block is still rendered later."""
    key = f"actmax/{layer}/{objective}/block-{block:04d}"
    if channels is None:
        return key
    digest = hashlib.sha256(",".join(map(str, sorted(channels))).encode()).hexdigest()[:8]
    return f"{key}-part-{digest}"


def plan_blocks(channels: Sequence[int], block_size: int) -> list[tuple[int, list[int]]]:
    """(block, channels): block b holds the requested channels in [b·block_size, (b+1)·block_size)."""
    if block_size < 1:
        raise ActmaxError(f"block size must be >= 1, got {block_size}")
    blocks: dict[int, list[int]] = {}
    for c in sorted(set(channels)):
        blocks.setdefault(c // block_size, []).append(c)
    return sorted(blocks.items())


def _group(store: AtlasStore, layer: str, objective: str) -> zarr.Group:
    path = f"layers/{layer}/actmax/{objective}"
    node = store.root.get(path)
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{redact(store.url)} has no {path}; run prepare_actmax first")
    return node


def prepare_actmax(
    store: AtlasStore,
    model: nn.Module,
    layer: str,
    objective: str,
    *,
    config: ActmaxConfig,
    seed: int = 0,
    block_size: int = 64,
) -> dict[str, Any]:
    """Create the arrays of (layer, objective) and record the settings in the group attrs;
    ConfigMismatchError if the store already holds results made with other settings."""
    if objective not in OBJECTIVES:
        raise ActmaxError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    (name,) = resolve_layers(model, [layer])
    size, _, _ = _preprocessing(model, config.size)
    info = next(i for i in list_layers(model, input_size=size) if i.name == name)
    attrs: dict[str, Any] = {
        "config": {**config.to_dict(), "size": size},
        "seed": seed,
        "block_size": block_size,
        "channels": info.channels,
        "objective_tensor": response_module(model, name).pre_tensor,
    }
    c = info.channels
    arrays = [
        ("image", (c, 3, size, size), (1, 3, size, size)),
        ("activation", (c,), (block_size,)),
        ("trace", (c, config.steps), (block_size, config.steps)),
    ]
    if objective == "neuron":
        position = (info.shape[0] // 2, info.shape[1] // 2)
        box = rf_box(receptive_fields(model, input_size=size)[name], *position, (size, size))
        attrs.update(position=list(position), rf_box=[box.y0, box.y1, box.x0, box.x1])
        rh, rw = box.y1 - box.y0, box.x1 - box.x0
        arrays.append(("crop", (c, 3, rh, rw), (1, 3, rh, rw)))
    path = f"layers/{name}/actmax/{objective}"
    existing = store.root.get(path)
    if isinstance(existing, zarr.Group) and "block_size" in existing.attrs:  # written before the registry
        if dict(existing.attrs) != attrs:
            raise ConfigMismatchError(
                f"{redact(store.url)} holds {objective} act-max results for {name} made with other settings; "
                "use another --out"
            )
    else:
        store.require_group(path, config=attrs)
    for what, shape, chunks in arrays:
        keys = {"objective": objective} if what != "crop" else {}
        store.require_array(ACTMAX_ARRAYS[what], shape, chunks, layer=name, **keys)
    return attrs


def settings(store: AtlasStore, layer: str, objective: str) -> dict[str, Any]:
    """The settings `prepare_actmax` recorded for (layer, objective) (also in stores written before
    the analysis registry, which kept them at the top level of the group's attrs)."""
    attrs: dict[str, Any] = dict(_group(store, layer, objective).attrs)
    out: dict[str, Any] = attrs if "block_size" in attrs else dict(attrs["config"])
    return out


def write_actmax(store: AtlasStore, result: ActmaxResult) -> None:
    """Write the rows of `result` into the arrays made by `prepare_actmax`."""
    rows = np.asarray(result.channels)
    out = {"image": result.image, "activation": result.activation, "trace": result.trace}
    if result.crop is not None:
        out["crop"] = result.crop
    group = _group(store, result.layer, result.objective)
    for what, data in out.items():
        arr = group[what]
        assert isinstance(arr, zarr.Array)
        arr.set_orthogonal_selection((rows,) + (slice(None),) * (data.dim() - 1), data.numpy())
