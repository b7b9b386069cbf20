"""Noise injection into inactive channels (Kobayashi & Shouno 2020, §3.5, Table 1).

Conditions: `baseline` (no noise); `all` (noise into every inactive channel); `random-one` (into one
inactive channel per mini-batch); `control` (into as many random *active* channels per mini-batch).
Noise is ε = max(σ·z, 0), z ~ N(0, 1) i.i.d. per position, added by a forward hook at the layer.

Reproducibility: each image's noise comes from a counter-based hash of (seed, condition, dataset
index, element), and channel choices from (seed, condition, block), where a block holds block_size
images (the run's batch size, the paper's "mini-batch"); so results do not depend on sharding or on
how batches are formed. Blocks: with `num_images` given, `block_ids` deals the images into blocks by
a seeded permutation, so a block mixes classes even when the dataset is sorted by class (an image
folder); without it (legacy), block = index // block_size (consecutive images).

Confidence intervals: images that share a block share its channel draw, so they are not
independent; `summarize(blocks=...)` bootstraps over blocks (a cluster bootstrap), not images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from numpy.typing import NDArray
from torch import Tensor, nn

from rfcore.errors import RfatlasError, StoreError
from rfcore.inactive import BatchLike, module_at
from rfcore.layers import capture
from rfcore.precision import autocast
from rfcore.store import AtlasStore, redact

CONDITIONS: tuple[str, ...] = ("baseline", "all", "random-one", "control")

_M32 = 0xFFFFFFFF


#: Near-inactive channels (a row of its own beside the paper's Table 1 when no channel is exactly
#: inactive): the lowest NEAR_INACTIVE_FRACTION of a layer's per-channel maxima (at least one channel).
NEAR_INACTIVE_FRACTION = 0.05


def near_inactive(maxima: NDArray[Any], fraction: float = NEAR_INACTIVE_FRACTION) -> NDArray[np.bool_]:
    """Mask of the `max(1, ceil(fraction * C))` channels with the lowest maxima over all positions and
    images (ties: lower channel index first). Not the paper's definition (max <= 0), which it
    contains whenever that set is no larger; used so that Table 1 is never empty."""
    m = np.asarray(maxima, dtype=np.float64)
    if m.ndim != 1 or len(m) == 0 or not np.isfinite(m).all():
        raise RfatlasError(f"channel maxima must be a finite, non-empty 1-D array, got shape {m.shape}")
    if not 0 < fraction <= 1:
        raise RfatlasError(f"near-inactive fraction must be in (0, 1], got {fraction}")
    n = max(1, math.ceil(fraction * len(m)))
    mask = np.zeros(len(m), dtype=np.bool_)
    mask[np.argsort(m, kind="stable")[:n]] = True
    return mask


def check_conditions(conditions: Iterable[str]) -> tuple[str, ...]:
    """The conditions in canonical order; RfatlasError for an unknown one."""
    wanted = tuple(conditions)
    unknown = [c for c in wanted if c not in CONDITIONS]
    if unknown:
        raise RfatlasError(f"unknown noise condition {unknown[0]!r}; choose from {', '.join(CONDITIONS)}")
    return tuple(c for c in CONDITIONS if c in wanted)


_Word = TypeVar("_Word", Tensor, int)


def _mul32(x: _Word, c: int) -> _Word:
    """(x * c) mod 2**32 for 0 <= x < 2**32 in int64 without overflow."""
    return (((x & 0xFFFF) * c) + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix(x: _Word) -> _Word:
    """lowbias32 integer hash (C. Wellons) on uint32 values (Python ints or int64 tensors)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def image_normal(indices: Tensor, shape: tuple[int, ...], *, seed: int, stream: int) -> Tensor:
    """Standard normal noise (B, *shape), float32 on `indices.device`; image b's values depend only
    on (seed, stream, indices[b]) and the element's flat position."""
    device = indices.device
    n = math.prod(shape)
    pairs = (n + 1) // 2
    counter = torch.arange(pairs, device=device, dtype=torch.int64)
    base = _mix((seed & _M32) ^ 0x9E3779B9)  # host ints: no transfer, no device sync
    base = _mix(base ^ ((seed >> 32) & _M32) ^ _mix(stream & _M32))
    key = _mix(_mix(indices.to(torch.int64) & _M32) ^ base)[:, None]
    a = _mix(_mix(2 * counter)[None] ^ key)
    b = _mix(_mix(2 * counter + 1)[None] ^ key)
    u1 = ((a >> 8) + 1).to(torch.float32) * 2.0**-24  # (0, 1]
    u2 = (b >> 8).to(torch.float32) * 2.0**-24  # [0, 1)
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = (2.0 * math.pi) * u2
    z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=1)[:, :n]
    return z.reshape(indices.shape[0], *shape)


def block_ids(num_images: int, block_size: int, *, seed: int) -> NDArray[np.int64]:
    """Block of every image (N,): images are dealt into blocks of `block_size` by a seeded random
    permutation of the indices (the last block may be smaller); deterministic in (N, block_size, seed)."""
    if block_size < 1 or num_images < 0:
        raise RfatlasError(f"bad blocks: {num_images} images in blocks of {block_size}")
    order = np.random.default_rng([seed & _M32, 0xB10C]).permutation(num_images)
    blocks = np.empty(num_images, np.int64)
    blocks[order] = np.arange(num_images, dtype=np.int64) // block_size
    return blocks


def block_channels(
    condition: str, inactive: NDArray[np.bool_], block: int, *, seed: int
) -> NDArray[np.int64]:
    """Channels that get noise under `condition` in mini-batch block `block` (sorted)."""
    dead = np.flatnonzero(inactive).astype(np.int64)
    live = np.flatnonzero(~inactive).astype(np.int64)
    if condition == "baseline":
        return dead[:0]
    if condition == "all":
        return dead
    rng = np.random.default_rng([seed & _M32, CONDITIONS.index(condition), block])
    if condition == "random-one":
        return dead[rng.integers(len(dead))][None] if len(dead) else dead
    k = min(len(dead), len(live))
    return np.sort(rng.choice(live, size=k, replace=False)).astype(np.int64)


class NoiseInjector:
    """Output edit (`capture(model, edit={layer: injector})`) adding ε = max(σ·z, 0) to the chosen
    channels of a layer's output; `capture` scopes it to the thread running the forward pass."""

    def __init__(
        self,
        condition: str,
        inactive: NDArray[np.bool_],
        *,
        sigma: float,
        seed: int,
        block_size: int,
        num_images: int | None = None,
    ) -> None:
        """`num_images`: deal images into blocks by `block_ids` (classes mixed); None: consecutive."""
        check_conditions([condition])
        if block_size < 1:
            raise RfatlasError(f"block size must be >= 1, got {block_size}")
        self.blocks = None if num_images is None else block_ids(num_images, block_size, seed=seed)
        self.condition = condition
        self.inactive = np.asarray(inactive, dtype=np.bool_)
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.block_size = int(block_size)
        self._indices: Tensor | None = None
        self._channels: Tensor | None = None

    def set_batch(self, indices: Tensor, device: torch.device) -> None:
        """Dataset indices (host tensor) of the next forward pass, which runs on `device`."""
        idx = indices.numpy().astype(np.int64)
        blocks = idx // self.block_size if self.blocks is None else self.blocks[idx]
        uniq, inverse = np.unique(blocks, return_inverse=True)
        table = torch.from_numpy(
            np.stack([block_channels(self.condition, self.inactive, int(b), seed=self.seed) for b in uniq])[
                inverse
            ]
        )
        if device.type == "cuda":  # page-locked (cached host allocator) so the copies stay asynchronous
            indices, table = indices.pin_memory(), table.pin_memory()
        self._indices = indices.to(device, non_blocking=True)
        self._channels = table.to(device, non_blocking=True)

    def __call__(self, out: Tensor) -> Tensor:
        if self._indices is None or self._channels is None:
            raise RuntimeError("NoiseInjector.set_batch was not called before the forward pass")
        if out.shape[1] != len(self.inactive):
            raise RfatlasError(
                f"layer has {out.shape[1]} channels but the inactive mask has {len(self.inactive)}"
            )
        chans = self._channels
        k = chans.shape[1]
        if k == 0:
            return out
        spatial = tuple(out.shape[2:])
        stream = CONDITIONS.index(self.condition)
        eps = (image_normal(self._indices, (k, *spatial), seed=self.seed, stream=stream) * self.sigma).clamp_(
            min=0
        )
        index = chans.view(chans.shape[0], k, *([1] * len(spatial))).expand(eps.shape)
        return out.scatter_add(1, index, eps.to(out.dtype))


def injected(model: nn.Module, layer: str, injector: NoiseInjector | None) -> capture:
    """The hook context that applies `injector` to `layer`'s output (nothing for None)."""
    module_at(model, layer)  # UnknownLayerError with a suggestion
    return capture(model, edit={layer: injector} if injector is not None else None)


@dataclass(frozen=True)
class PerImage:
    """Per-image results of one condition: dataset indices, cross-entropy, top-1/top-5 hits."""

    indices: NDArray[np.int64]
    loss: NDArray[np.float32]
    correct1: NDArray[np.bool_]
    correct5: NDArray[np.bool_]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    layer: str,
    batches: Iterable[BatchLike],
    *,
    condition: str,
    inactive: NDArray[np.bool_],
    normalize: Callable[[Tensor], Tensor],
    block_size: int,
    sigma: float = 1.0,
    seed: int = 0,
    device: torch.device | None = None,
    amp: bool = False,
    num_images: int | None = None,
) -> PerImage:
    """Validation pass under `condition`; per-image loss and accuracy. fp32 by default (the paper's
    effects are ~1e-6 for PlainNet: below bf16 resolution); `amp=True`: bf16 on CUDA only.
    `num_images`: blocks by `block_ids` (see `NoiseInjector`)."""
    device = device or next(model.parameters()).device
    check_conditions([condition])
    injector = None
    if condition != "baseline":
        injector = NoiseInjector(
            condition, inactive, sigma=sigma, seed=seed, block_size=block_size, num_images=num_images
        )
    use_amp = amp and device.type == "cuda"
    idx: list[Tensor] = []
    losses: list[Tensor] = []
    hit1: list[Tensor] = []
    hit5: list[Tensor] = []
    with injected(model, layer, injector):
        for batch in batches:
            if len(batch.indices) == 0:
                continue
            labels = batch.labels.to(device, non_blocking=True)
            x = normalize(batch.images.to(device, non_blocking=True))
            if injector is not None:
                injector.set_batch(batch.indices, device)
            with autocast(device, "bf16" if use_amp else "off"):
                logits = model(x)
            logits = logits.float()
            losses.append(F.cross_entropy(logits, labels, reduction="none"))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels[:, None]
            hit1.append(hits[:, 0])
            hit5.append(hits.any(dim=1))
            idx.append(batch.indices)
    if not idx:
        return PerImage(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, bool))
    return PerImage(
        indices=torch.cat(idx).numpy().astype(np.int64),
        loss=torch.cat(losses).cpu().numpy().astype(np.float32),
        correct1=torch.cat(hit1).cpu().numpy(),
        correct5=torch.cat(hit5).cpu().numpy(),
    )


def _mean(x: NDArray[Any]) -> float:
    """Exactly rounded mean (order-independent)."""
    return math.fsum(x.astype(np.float64).tolist()) / len(x) if len(x) else math.nan


def bootstrap_ci(
    values: NDArray[Any],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    blocks: NDArray[Any] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (seeded). With `blocks` (a block id per value)
    whole blocks are resampled with replacement (cluster bootstrap: values of a block share a noise
    draw, so they are dependent) and each replicate is the pooled mean of its blocks' values; without,
    values are resampled one by one (independent images)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    alpha = (1.0 - level) / 2.0
    if blocks is not None:
        _, inverse = np.unique(np.asarray(blocks), return_inverse=True)
        sums = np.bincount(inverse, weights=v)
        counts = np.bincount(inverse).astype(np.float64)
        nb = len(sums)
        means = np.empty(n_boot)
        step = max(1, 4_000_000 // nb)
        for start in range(0, n_boot, step):
            stop = min(n_boot, start + step)
            pick = rng.integers(0, nb, size=(stop - start, nb))
            means[start:stop] = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
        lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
        return (float(lo), float(hi))
    means = np.empty(n_boot)
    step = max(1, 4_000_000 // len(v))
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        means[start:stop] = v[rng.integers(0, len(v), size=(stop - start, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def summarize(
    loss: dict[str, NDArray[np.float32]],
    correct1: dict[str, NDArray[np.bool_]],
    correct5: dict[str, NDArray[np.bool_]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    blocks: NDArray[np.int64] | None = None,
) -> dict[str, Any]:
    """Mean loss and accuracies per condition; ΔL vs baseline with a paired bootstrap CI.

    Arrays are aligned per image (NaN loss = image not evaluated); pairs use images valid in both.
    `blocks` (block id per image, `block_ids`): the CI resamples blocks (see `bootstrap_ci`)."""
    out: dict[str, Any] = {}
    base = loss.get("baseline")
    for cond in check_conditions(loss):
        valid = np.isfinite(loss[cond])
        entry: dict[str, Any] = {
            "images": int(valid.sum()),
            "loss": _mean(loss[cond][valid]),
            "top1": _mean(correct1[cond][valid]),
            "top5": _mean(correct5[cond][valid]),
        }
        if base is not None and cond != "baseline":
            both = valid & np.isfinite(base)
            diff = loss[cond][both].astype(np.float64) - base[both].astype(np.float64)
            entry["delta_loss"] = _mean(diff)
            bl = None if blocks is None else np.asarray(blocks)[both]
            entry["delta_loss_ci"] = list(
                bootstrap_ci(diff, n_boot=n_boot, seed=seed, level=level, blocks=bl)
            )
            entry["ci_resamples"] = "images" if blocks is None else "blocks"
        out[cond] = entry
    return out


# --- reading stored results ---------------------------------------------------------------------------


def _attrs(node: zarr.Group | zarr.Array[Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(node.attrs)
    return out


def layer_group(store: AtlasStore, layer: str) -> zarr.Group:
    """The group `noise/<layer>`; StoreError if the noise analysis has not run there."""
    node = store.root.get(f"noise/{layer}")
    if not isinstance(node, zarr.Group):
        raise StoreError(
            f"{redact(store.url)} has no noise results for layer {layer}; run the noise analysis"
        )
    return node


def jsonable(x: Any) -> Any:
    """Plain JSON types; non-finite floats become None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def _table_row(model: str, layer: str, count: int, c: dict[str, Any], what: str = "inactive") -> str:
    base, cells = c.get("baseline"), []
    for cond in ("all", "random-one", "control"):
        e = c.get(cond)
        if count == 0:  # nothing to inject into: ΔL is 0 by construction
            cells.append(f"– (no {what} channel)")
        else:
            cells.append(_fmt(e.get("delta_loss"), e.get("delta_loss_ci")) if e else "–")
    return (
        f"| {model} | {layer} | {count} | {' | '.join(cells)} "
        f"| {_pct(base, 'top1')} / {_pct(c.get('all'), 'top1')} "
        f"| {_pct(base, 'top5')} / {_pct(c.get('all'), 'top5')} |"
    )


def _fmt(value: float | None, ci: list[float] | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    text = f"{value:+.5e}"
    return f"{text} [{ci[0]:+.2e}, {ci[1]:+.2e}]" if ci else text


def _pct(entry: dict[str, Any] | None, key: str) -> str:
    return f"{100 * entry[key]:.1f}%" if entry else "–"


def compare_table(urls: Sequence[str]) -> str:
    """Markdown Table 1 (Kobayashi & Shouno 2020) for the noise results of each atlas.

    One row per layer with the paper's definition (max <= threshold). When a run also tested the
    near-inactive channels (summary `near`: the lowest `fraction` of the layer's per-channel maxima,
    run when no channel is inactive), they get a row of their own, labelled "<layer>: near-inactive,
    lowest 5% of maxima (max <= ...)", so the table always has numbers and never mixes definitions."""
    rows = [
        "| model | layer | # inactive | ΔL (all) [95% CI] | ΔL_rnd (random-one) [95% CI] | control ΔL [95% CI] "
        "| top-1 base / all | top-5 base / all |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    for url in urls:
        store = AtlasStore.open(url, "r")
        noise = store.root.get("noise")
        layers = sorted(noise.group_keys()) if isinstance(noise, zarr.Group) else []
        summaries = [s for s in (_attrs(layer_group(store, la)).get("summary") for la in layers) if s]
        if not summaries:
            raise StoreError(f"{redact(url)} has no noise results; run the noise analysis first")
        for s in summaries:
            model = s["model"] + (f" ({Path(str(s['weights'])).name})" if s.get("weights") else "")
            rows.append(_table_row(model, s["layer"], int(s["num_inactive"]), s["conditions"]))
            near = s.get("near")
            if near:
                pct = f"{100 * float(near['fraction']):g}%"
                label = (
                    f"{s['layer']}: near-inactive, lowest {pct} of maxima (max ≤ {float(near['max']):.3g})"
                )
                rows.append(
                    _table_row(model, label, len(near["channels"]), near["conditions"], "near-inactive")
                )
    return "\n".join(rows) + "\n"
