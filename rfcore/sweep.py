"""Streaming, exactly mergeable per-layer reducers of the preferred-stimulus sweep (paper §3.3, eq. 4–5).

A `LayerReducer` consumes one layer's activations batch by batch (on the model's device) and keeps,
per channel: the top-k images by spatial max (value, dataset index, feature-map position), channel
statistics, and two integer sums of receptive-field patches (both divided, at the end, by the number
of *image* pixels that went into each patch cell, so receptive-field pixels outside the image are
not averaged in as black):

* `centre_sum` — eq. 4–5 as written: neuron i is the fixed unit at the centre (H // 2, W // 2) of
  the channel's map, X+ the images where that neuron is > 0, and the sum runs over x[r_i] for
  x in X+ (result: `mean_stimulus_centre`, `positive_count_centre`);
* `stimulus_sum` — a per-channel variant: the patch at each image's strongest unit (spatial argmax),
  over the images whose spatial max is > 0 (result: `mean_stimulus`, `positive_count`).

Its state is a few fixed-size arrays (memory flat in dataset size) and merging states is exact in
any order:

* top-k: a total order on (value desc, dataset index asc), so ties go to the lower index;
* spatial argmax: first occurrence in flat (y * W + x) order (torch's documented `max` behaviour);
* patch sums and pixel counts: int64; activation sums: fixed point, `round(sum * 2**FIXED_POINT_BITS)`
  per batch and channel, added as int64, where `sum` adds float32 row sums (over x, cascade-summed by
  torch) in float64 (resolution 2**-20 per batch; rounding of each row sum ~1e-7 relative).

Patches are kept at most `patch_max` pixels a side by sum-pooling the input by a power of two `f`
(`patch_geometry`); mean stimuli are reported in uint8 pixel units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rfcore.errors import RfatlasError
from rfcore.precision import autocast
from rfcore.receptive import RField

if TYPE_CHECKING:
    from rfcore.data import ImageDataset

FIXED_POINT_BITS = 20
_FIXED_SCALE = float(2**FIXED_POINT_BITS)
_GATHER_BUDGET = 1 << 23  # elements gathered at once by the patch accumulation (bounds memory)

STATE_KEYS = (
    "topk_value",
    "topk_image",
    "topk_y",
    "topk_x",
    "stimulus_sum",
    "positive_count",
    "max",
    "sum_fixed",
    "zero_count",
    "position_count",
    "pixel_count",
    "centre_sum",
    "centre_count",
    "centre_pixel_count",
)


@dataclass(frozen=True)
class SweepConfig:
    """Options of a sweep. `amp=None` means autocast (bf16, else fp16) on CUDA only."""

    k: int = 16
    patch_max: int = 64
    batch_size: int = 64
    device: str = "auto"
    amp: bool | str | None = None
    num_workers: int = 0


@dataclass(frozen=True)
class PatchGeometry:
    """How a layer's unit patches are cut from (sum-pooled) input images.

    The patch of unit (y, x) covers input pixels `first + (y, x) * stride` .. `+ size * factor`
    (the receptive-field box, extended at its far end to a multiple of `factor`, zeros outside the
    image) and is stored as a `size` x `size` grid of `factor` x `factor` pixel sums.
    """

    factor: int
    size: int
    first: tuple[int, int]
    stride: tuple[int, int]
    image_hw: tuple[int, int]

    @property
    def phase(self) -> tuple[int, int]:
        """Offset of the pooling grid: pooled cells start at `phase + j * factor`."""
        return (self.first[0] % self.factor, self.first[1] % self.factor)


def patch_geometry(rf: RField, image_hw: tuple[int, int], patch_max: int = 64) -> PatchGeometry:
    """Patch geometry of a layer: `f` is the smallest power of two with `ceil(side / f) <= patch_max`
    that divides the layer's stride (so box starts fall on the f-grid); when none does, `f` is the
    largest power of two dividing the stride and the patch is larger than `patch_max`. Patches are
    square with side `max(rf.size)`."""
    if patch_max < 1:
        raise RfatlasError(f"patch_max must be >= 1, got {patch_max}")
    side = max(rf.size)
    g = math.gcd(int(rf.stride[0]), int(rf.stride[1]))
    f = 1
    while -(-side // f) > patch_max and g % (2 * f) == 0:
        f *= 2
    first = (
        round(rf.offset[0] - (rf.size[0] - 1) / 2),
        round(rf.offset[1] - (rf.size[1] - 1) / 2),
    )
    return PatchGeometry(f, -(-side // f), first, (int(rf.stride[0]), int(rf.stride[1])), image_hw)


def _first_cell(factor: int, phase: int) -> int:
    """Pixel where the first cell of a `factor` grid with `phase` starts (cell -1 when phase > 0)."""
    return phase - factor if phase else 0


def _halve(sums: Tensor, pad: tuple[int, int]) -> Tensor:
    """2x2 sums of cell sums (B,3,H,W) after `pad` (top, left) zero cells and zeros to even sizes,
    float32 (strided adds, rows first: three times faster than `avg_pool2d` here)."""
    h, w = sums.shape[-2:]
    top, left = pad
    x = F.pad(sums, (left, (left + w) % 2, top, (top + h) % 2)).to(torch.float32)
    rows = x[..., 0::2, :] + x[..., 1::2, :]
    return rows[..., 0::2] + rows[..., 1::2]


def pool_images(
    images: Tensor,
    factor: int,
    phase: tuple[int, int],
    dtype: torch.dtype,
    cache: dict[tuple[int, int, int], Tensor] | None = None,
) -> Tensor:
    """Sum-pool uint8 (or integral float) images (B,3,H,W) over the `factor` grid whose cells start at
    `phase + j * factor` (zeros outside the image; cell -1 is included when `phase > 0`). Exact
    integers in `dtype`. `factor` is a power of two: the sums are built by halving, each level from
    the one below (float32 sums of at most 255·f² < 2**24: exact); `cache` keeps those levels by
    (factor, phase) for other factors of the same images (a float32 result is the cached tensor
    itself: not to be changed in place)."""
    if factor & (factor - 1) or factor < 1:
        raise ValueError(f"factor must be a power of two, got {factor}")
    if factor == 1:
        return images.to(dtype)
    levels = {} if cache is None else cache
    key = (factor, phase[0] % factor, phase[1] % factor)
    hit = levels.get(key)
    if hit is None:
        half = factor // 2
        below = (half, phase[0] % half, phase[1] % half)
        source = images if half == 1 else pool_images(images, half, below[1:], torch.float32, levels)
        pad = (
            (_first_cell(half, below[1]) - _first_cell(factor, key[1])) // half,
            (_first_cell(half, below[2]) - _first_cell(factor, key[2])) // half,
        )
        hit = levels[key] = _halve(source, pad)
    return hit.to(dtype)


_MARGIN = 64  # zero cells kept around pooled images: enough for patch_max-sized windows


class BatchPools:
    """Pooled images of one batch, shared by its layers: each (factor, phase, dtype) is pooled,
    padded and copied once per batch instead of once per layer."""

    def __init__(self, images: Tensor) -> None:
        self.images = images
        self._padded: dict[tuple[int, int, int, torch.dtype], tuple[Tensor, int]] = {}
        self._sums: dict[tuple[int, int, int], Tensor] = {}  # pooling levels, shared by factors

    def padded(
        self, factor: int, phase: tuple[int, int], dtype: torch.dtype, margin: int
    ) -> tuple[Tensor, int]:
        """The batch pooled as `pool_images` does, inside at least `margin` zero cells on every side,
        followed by one all-zero image: (buffer (B+1, 3, H', W'), its margin)."""
        key = (factor, *phase, dtype)
        hit = self._padded.get(key)
        if hit is None or hit[1] < margin:
            base = pool_images(self.images, factor, phase, dtype, self._sums)
            m = max(margin, _MARGIN)
            b, _, hh, ww = base.shape
            buffer = base.new_empty(b + 1, 3, hh + 2 * m, ww + 2 * m)
            for part in (buffer[b], buffer[:b, :, :m], buffer[:b, :, m + hh :]):
                part.zero_()
            for part in (buffer[:b, :, m : m + hh, :m], buffer[:b, :, m : m + hh, m + ww :]):
                part.zero_()
            buffer[:b, :, m : m + hh, m : m + ww] = base
            hit = self._padded[key] = (buffer, m)
        return hit

    def padded_any(self, factor: int, phase: tuple[int, int], margin: int) -> tuple[Tensor, int]:
        """Like `padded`, in whichever exact dtype is already pooled for (factor, phase) (float32
        when none is): for readers that convert their small window anyway."""
        for (f, py, px, _), (buffer, m) in self._padded.items():
            if (f, py, px) == (factor, *phase) and m >= margin:
                return buffer, m
        return self.padded(factor, phase, torch.float32, margin)


def row_sums(acts: Tensor) -> Tensor:
    """Float32 sums over x of a float32 (B,C,H,W) activation, (B,C,H): the first stage of the channel
    sums, and a cheap finiteness test (a NaN or inf makes its row's sum non-finite)."""
    return acts.sum(dim=3)


def spatial_max(flat: Tensor) -> tuple[Tensor, Tensor]:
    """`flat.max(dim=2)` of a (B, C, N) tensor: each row's max and the index of its first
    occurrence. Rows of 1024+ positions go through block maxima (a vectorized `amax` over blocks
    of 16–64, a `max` over the blocks, then one block's `max`), about twice as fast; the first block
    holding the max holds its first occurrence, so the indices agree."""
    b, c, n = flat.shape
    size = next((k for k in range(64, 15, -1) if n % k == 0), 0) if n >= 1024 else 0
    if not size:
        return flat.max(dim=2)
    blocks = flat.reshape(b, c, n // size, size)
    value, block = blocks.amax(dim=3).max(dim=2)
    inside = blocks.gather(2, block[:, :, None, None].expand(b, c, 1, size)).squeeze(2).max(dim=2)
    return value, block * size + inside.indices


def nonzero_counts(flat: Tensor) -> Tensor:
    """Per channel, the non-zero values of `flat` (B, C, N) over images and positions, int64: `ne`
    into a float32 buffer of a few images at a time (about 4 M values, reused; a full-size temporary
    costs three times as much, most of it page faults), summed per image in float32 (exact below
    2**24 positions)."""
    b, c, n = flat.shape
    step = max(1, min(b, (1 << 22) // max(1, c * n)))
    buffer = flat.new_empty((step, c, n))
    counts = torch.zeros(c, dtype=torch.int64, device=flat.device)
    for lo in range(0, b, step):
        part = buffer[: min(step, b - lo)]
        torch.ne(flat[lo : lo + step], 0, out=part)
        counts += part.sum(dim=2).to(torch.int64).sum(dim=0)
    return counts


def _order_key(value: Tensor, index: Tensor) -> Tensor:
    """int64 key ordering (value desc, index asc) as key desc: value bits (NaN canonical and above
    +inf, -0 == +0) in the high word, `2**32 - 1 - index` in the low word (index -1 lowest)."""
    v = torch.where(torch.isnan(value), torch.full_like(value, math.nan), value + 0.0)
    bits = v.view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits << 32) | ((0xFFFFFFFF - index) & 0xFFFFFFFF)


@dataclass(frozen=True)
class _Plan:
    """Where a layer's patch windows lie in a pooled image (for one feature-map shape)."""

    grid: tuple[int, int]  # feature-map (H, W)
    lo: tuple[int, int]  # first patch row/col ever inside the image
    extent: tuple[int, int]  # rows/cols of the patch ever inside the image (0: never)
    pad: tuple[int, int, int, int]  # (left, right, top, bottom) zeros added to the pooled image
    start: tuple[int, int]  # pooled (padded) row/col of unit (0, 0)'s window
    step: tuple[int, int]  # pooled rows/cols between neighbouring units
    image_rows: tuple[int, int]  # rows [lo, hi) of the padded, cut pooled image that hold pixels


def _plan(geo: PatchGeometry, grid: tuple[int, int]) -> _Plan:
    f, p = geo.factor, geo.size
    lo, ext, pad, start, step = [], [], [], [], []
    for a in range(2):
        phase = geo.first[a] % f
        j0 = -1 if phase else 0  # absolute cell index of pooled row 0
        length = -(-((f - phase) % f + geo.image_hw[a]) // f)
        st = geo.stride[a] // f or 1  # stride 0: a layer that sees the whole image (a 1x1 map)
        i0 = (geo.first[a] - phase) // f - j0  # pooled row of unit 0's window
        ilast = i0 + (grid[a] - 1) * st
        r_lo = max(0, -ilast)
        r_hi = max(r_lo, min(p, length - i0))
        before = max(0, -(i0 + r_lo))
        after = max(0, ilast + r_hi - length)
        lo.append(r_lo)
        ext.append(r_hi - r_lo)
        pad.append((before, after))
        start.append(i0 + r_lo + before)
        step.append(st)
        if a == 0:
            image_rows = (before - start[0], before - start[0] + length)
    return _Plan(
        grid,
        (lo[0], lo[1]),
        (ext[0], ext[1]),
        (pad[1][0], pad[1][1], pad[0][0], pad[0][1]),
        (start[0], start[1]),
        (step[0], step[1]),
        image_rows,
    )


class LayerReducer:
    """Streaming reducer of one layer (see the module docstring). State lives on `device`."""

    def __init__(
        self,
        channels: int,
        geometry: PatchGeometry,
        *,
        k: int = 16,
        device: str | torch.device = "cpu",
        gather: str = "auto",
    ) -> None:
        """`gather` picks the patch gather: "auto" (by cost), "rows" or "windows" (same results)."""
        if k < 1:
            raise RfatlasError(f"k must be >= 1, got {k}")
        if gather not in ("auto", "rows", "windows"):
            raise ValueError(f"gather must be auto, rows or windows, not {gather!r}")
        self.gather = gather
        dev = torch.device(device)
        p = geometry.size
        self.channels, self.geometry, self.k, self.device = channels, geometry, k, dev
        self.topk_value = torch.full((channels, k), -math.inf, dtype=torch.float32, device=dev)
        self.topk_image = torch.full((channels, k), -1, dtype=torch.int64, device=dev)
        self.topk_y = torch.full((channels, k), -1, dtype=torch.int32, device=dev)
        self.topk_x = torch.full((channels, k), -1, dtype=torch.int32, device=dev)
        self.stimulus_sum = torch.zeros((channels, 3, p, p), dtype=torch.int64, device=dev)
        self.positive_count = torch.zeros(channels, dtype=torch.int64, device=dev)
        self.max = torch.full((channels,), -math.inf, dtype=torch.float32, device=dev)
        self.sum_fixed = torch.zeros(channels, dtype=torch.int64, device=dev)
        self.zero_count = torch.zeros(channels, dtype=torch.int64, device=dev)
        self.position_count = torch.zeros((), dtype=torch.int64, device=dev)
        self.pixel_count = torch.zeros((channels, p, p), dtype=torch.int64, device=dev)
        self.centre_sum = torch.zeros((channels, 3, p, p), dtype=torch.int64, device=dev)
        self.centre_count = torch.zeros(channels, dtype=torch.int64, device=dev)
        self.centre_pixel_count = torch.zeros((channels, p, p), dtype=torch.int64, device=dev)
        self._plans: dict[tuple[int, int], _Plan] = {}
        self._coverage: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def add(
        self,
        acts: Tensor,
        images: Tensor,
        indices: Tensor,
        *,
        pooled: BatchPools | None = None,
        rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Feed one batch: `acts` (B,C,H,W) or (B,C) for a linear layer, uint8 `images` (B,3,S,S), increasing dataset `indices`
        (B,). `pooled` caches pooled images across the layers of one batch; `rows` is `row_sums`
        of the float32 `acts` when the caller has it. Returns the per-image spatial max (B,C)
        float32 and its flat argmax (B,C) int64 (first occurrence)."""
        if acts.dim() == 2:  # a linear layer: one unit per channel, seeing the whole image
            acts = acts[:, :, None, None]
        b, c, h, w = acts.shape
        if c != self.channels or images.shape[0] != b or indices.shape[0] != b:
            raise ValueError(f"batch shapes disagree: acts {tuple(acts.shape)}, images {tuple(images.shape)}")
        acts = acts.to(self.device, torch.float32)
        images = images.to(self.device)
        indices = indices.to(self.device, torch.int64)
        flat = acts.flatten(2)
        mx, arg = spatial_max(flat)
        self._add_topk(mx, arg, indices, w)
        positive = mx > 0
        self.positive_count += positive.sum(dim=0)
        self.max = torch.maximum(self.max, mx.amax(dim=0))
        rows = row_sums(acts) if rows is None else rows.to(self.device, torch.float32)
        s = rows.to(torch.float64).sum(dim=(0, 2))  # rows (over x) in float32, then float64
        self.sum_fixed += torch.round(s * _FIXED_SCALE).to(torch.int64)
        self.zero_count += b * h * w - nonzero_counts(flat)
        self.position_count += b * h * w
        pools = BatchPools(images) if pooled is None else pooled
        self._add_patches(positive, arg, (h, w), pools)
        self._add_pixel_counts(positive, arg, (h, w))
        self._add_centre(flat[:, :, (h // 2) * w + w // 2] > 0, (h, w), pools)
        return mx, arg

    def coverage(self, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Pixels of the image inside each patch cell, per unit row and column: (H, p) and (W, p)
        int64; unit (y, x)'s cell (i, j) holds `rows[y, i] * cols[x, j]` image pixels (0 outside)."""
        hit = self._coverage.get(grid)
        if hit is None:
            geo, out = self.geometry, []
            cells = torch.arange(geo.size, dtype=torch.int64) * geo.factor
            for a in range(2):
                start = (
                    geo.first[a] + torch.arange(grid[a], dtype=torch.int64)[:, None] * geo.stride[a] + cells
                )
                stop = torch.clamp(start + geo.factor, max=geo.image_hw[a])
                out.append(torch.clamp(stop - torch.clamp(start, min=0), min=0).to(self.device))
            hit = self._coverage[grid] = (out[0], out[1])
        return hit

    def _add_pixel_counts(self, positive: Tensor, arg: Tensor, grid: tuple[int, int]) -> None:
        """Per patch cell, the image pixels summed into `stimulus_sum` (RF pixels outside the image
        are not counted): a histogram of the positive argmax positions times the cell coverage."""
        rows, cols = self.coverage(grid)
        h, w = grid
        hist = torch.zeros((self.channels, h * w), dtype=torch.float64, device=self.device)
        hist.scatter_add_(1, arg.t(), positive.t().to(torch.float64))
        # float64 sums of integers below 2**53: exact
        part = torch.einsum("cyx,yp,xq->cpq", hist.view(-1, h, w), rows.double(), cols.double())
        self.pixel_count += torch.round(part).to(torch.int64)

    def _add_centre(self, positive: Tensor, grid: tuple[int, int], pools: BatchPools) -> None:
        """Eq. 4–5 for the fixed neuron at the map centre (H // 2, W // 2): add its receptive-field
        patch of every image where that neuron is > 0 (one window per image, a matmul, exact)."""
        plan = self._plans[grid]
        eh, ew = plan.extent
        h, w = grid
        yc, xc = h // 2, w // 2
        rows, cols = self.coverage(grid)
        count = positive.sum(dim=0)
        self.centre_count += count
        self.centre_pixel_count += count[:, None, None] * (rows[yc][:, None] * cols[xc][None, :])
        if eh == 0 or ew == 0:
            return
        geo = self.geometry
        f = geo.factor
        (sy, sx), (ty, tx) = plan.start, plan.step
        left, _, top, _ = plan.pad
        buffer, m = pools.padded_any(f, geo.phase, max(plan.pad))
        y0, x0 = sy - top + m + yc * ty, sx - left + m + xc * tx
        b = positive.shape[0]
        # float32 holds every sum exactly while it stays below 2**24, else float64
        exact = torch.float32 if b * 255 * f * f < 2**24 else torch.float64
        win = buffer[:b, :, y0 : y0 + eh, x0 : x0 + ew].reshape(b, -1).to(exact)
        part = positive.t().to(exact) @ win  # (C, 3 * eh * ew): integer sums, every step exact
        ly, lx = plan.lo
        self.centre_sum[:, :, ly : ly + eh, lx : lx + ew] += part.to(torch.int64).view(
            self.channels, 3, eh, ew
        )

    def _add_topk(self, mx: Tensor, arg: Tensor, indices: Tensor, w: int) -> None:
        c = self.channels
        y = (arg // w).to(torch.int32).t()
        x = (arg % w).to(torch.int32).t()
        self._merge_topk(mx.t(), indices.unsqueeze(0).expand(c, -1), y, x)

    def _merge_topk(self, value: Tensor, image: Tensor, y: Tensor, x: Tensor) -> None:
        value = torch.cat([self.topk_value, value], dim=1)
        image = torch.cat([self.topk_image, image], dim=1)
        key = _order_key(value, image)
        pick = key.topk(self.k, dim=1, sorted=True).indices
        self.topk_value = value.gather(1, pick)
        self.topk_image = image.gather(1, pick)
        self.topk_y = torch.cat([self.topk_y, y], dim=1).gather(1, pick)
        self.topk_x = torch.cat([self.topk_x, x], dim=1).gather(1, pick)

    def _add_patches(
        self,
        positive: Tensor,
        arg: Tensor,
        grid: tuple[int, int],
        pooled: BatchPools,
    ) -> None:
        """Add the patch of every (image, channel) with a positive max to `stimulus_sum`.

        Two exact gathers, picked by cost: "rows" cuts every patch row of every unit position once
        (`unfold` along x, B*3*rows*W*ew values) and sums each channel's rows over the batch with
        `embedding_bag` (float32, exact for integers below 2**24); "windows" gathers each image's C
        windows directly (int16 when f <= 8, else int32) and adds them up image by image; it wins
        when feature maps are large and channels few.
        """
        plan = self._plans.get(grid)
        if plan is None:
            plan = self._plans[grid] = _plan(self.geometry, grid)
        eh, ew = plan.extent
        if eh == 0 or ew == 0:
            return  # every patch lies entirely outside the image
        geo, c = self.geometry, self.channels
        f = geo.factor
        h, w = grid
        (sy, sx), (ty, tx) = plan.start, plan.step
        rows, cols = (h - 1) * ty + eh, (w - 1) * tx + ew
        # windows add up to 32+ images in int16 partials when f <= 2: then they win (measured)
        use_rows = f > 2 and rows * w <= c * eh if self.gather == "auto" else self.gather == "rows"
        # rows: float32 for embedding_bag; windows: the narrowest exact integer type (less to move)
        dtype = torch.float32 if use_rows else torch.int16 if 255 * f * f < 2**15 else torch.int32
        left, _, top, _ = plan.pad
        buffer, m = pooled.padded(f, geo.phase, dtype, max(plan.pad))
        img = buffer[:, :, sy - top + m : sy - top + m + rows, sx - left + m : sx - left + m + cols]
        y, x = (arg // w).t(), (arg % w).t()  # (C,B)
        ly, lx = plan.lo
        acc = self.stimulus_sum[:, :, ly : ly + eh, lx : lx + ew]  # a view: sums go straight in
        b = positive.shape[0]
        if use_rows:
            per_image = max(3 * rows * w * ew, c * 3 * eh)
            chunk = max(1, min((2**24 - 1) // (255 * f * f), _GATHER_BUDGET // per_image))
            i32, dev = torch.int32, self.device  # table rows < 2**31: int32 indices
            u = torch.arange(eh, dtype=i32, device=dev)
            y32, x32 = y.to(torch.int32), x.to(torch.int32)
            r_lo, r_hi = plan.image_rows
            for b0 in range(0, b, chunk):
                n = min(chunk, b - b0)
                # a table row per (image, cut row, unit column): its three colours' segments side by
                # side; then one zero row, at `zero`
                zero = n * rows * w
                table = img.new_empty(zero + 1, 3 * ew)
                table[zero].zero_()
                segments = img[b0 : b0 + n].unfold(3, ew, tx).permute(0, 2, 3, 1, 4)  # (n,rows,W,3,ew)
                table[:zero].view(n, rows, w, 3, ew).copy_(segments)
                local = torch.arange(n, dtype=i32, device=dev).view(1, n)
                yb = y32[:, b0 : b0 + n] * ty  # (C, n) first cut row of each window
                base = (local * rows + yb) * w + x32[:, b0 : b0 + n]
                idx = torch.empty((c, eh, n), dtype=i32, device=dev)  # contiguous: viewed as bags
                torch.add(base.view(c, 1, n), (u * w).view(1, eh, 1), out=idx)
                # rows outside the image and non-positive images read the zero row (it stays cached)
                row = yb.view(c, 1, n) + u.view(1, eh, 1)
                keep = (row >= r_lo) & (row < r_hi) & positive[b0 : b0 + n].t().view(c, 1, n)
                idx.masked_fill_(~keep, zero)
                part = F.embedding_bag(idx.view(c * eh, n), table, mode="sum")  # (C*eh, 3*ew)
                acc += part.view(c, eh, 3, ew).transpose(1, 2).to(torch.int64)
        else:
            win = img.unfold(2, eh, ty).unfold(3, ew, tx).permute(0, 2, 3, 1, 4, 5)  # (b+1,H,W,3,eh,ew)
            local = torch.arange(b, device=self.device).view(1, b)
            sel = torch.where(positive.t(), local, b)  # non-positive -> the zero image
            # One image at a time (a gather of C windows, then an elementwise add: far faster than a
            # reduction over the batch), into a partial sum of the gather's own type, flushed into
            # `acc` before it could overflow.
            per_partial = max(1, (torch.iinfo(dtype).max // (255 * f * f)))
            for j0 in range(0, b, per_partial):
                part = win[sel[:, j0], y[:, j0], x[:, j0]]
                for j in range(j0 + 1, min(b, j0 + per_partial)):
                    part += win[sel[:, j], y[:, j], x[:, j]]
                acc += part

    def merge(self, other: LayerReducer) -> None:
        """Fold another reducer of the same layer into this one (exact, order-independent)."""
        if (other.channels, other.k, other.geometry) != (self.channels, self.k, self.geometry):
            raise ValueError("cannot merge reducers of different layers or configurations")
        o = {n: t.to(self.device) for n, t in other._tensors().items()}
        self._merge_topk(o["topk_value"], o["topk_image"], o["topk_y"], o["topk_x"])
        self.stimulus_sum += o["stimulus_sum"]
        self.positive_count += o["positive_count"]
        self.max = torch.maximum(self.max, o["max"])
        self.sum_fixed += o["sum_fixed"]
        self.zero_count += o["zero_count"]
        self.position_count += o["position_count"]
        self.pixel_count += o["pixel_count"]
        self.centre_sum += o["centre_sum"]
        self.centre_count += o["centre_count"]
        self.centre_pixel_count += o["centre_pixel_count"]

    def _tensors(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in STATE_KEYS}

    @classmethod
    def state_layout(
        cls, channels: int, geometry: PatchGeometry, k: int
    ) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
        """(shape, dtype) of each `state_dict()` array, without allocating the state."""
        meta = cls(channels, geometry, k=k, device="meta")._tensors()
        return {n: (tuple(t.shape), np.dtype(str(t.dtype).removeprefix("torch."))) for n, t in meta.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state as NumPy arrays (keys `STATE_KEYS`; `position_count` is 0-d)."""
        return {n: t.cpu().numpy().copy() for n, t in self._tensors().items()}

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, np.ndarray],
        geometry: PatchGeometry,
        *,
        device: str | torch.device = "cpu",
    ) -> LayerReducer:
        """Rebuild a reducer from `state_dict()` output."""
        channels, k = np.shape(state["topk_value"])
        red = cls(int(channels), geometry, k=int(k), device=device)
        for n, t in red._tensors().items():
            a = np.asarray(state[n])
            if a.shape != tuple(t.shape):
                raise ValueError(f"state {n!r} has shape {a.shape}, expected {tuple(t.shape)}")
            setattr(red, n, torch.as_tensor(a).to(device=red.device, dtype=t.dtype).clone())
        return red

    def result(self) -> LayerResult:
        """Final per-channel results (NumPy)."""
        s = self.state_dict()
        n = int(s["position_count"])
        count = s["positive_count"]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_stim = s["stimulus_sum"] / s["pixel_count"][:, None].astype(np.float64)
            centre = s["centre_sum"] / s["centre_pixel_count"][:, None].astype(np.float64)
            mean = s["sum_fixed"] / _FIXED_SCALE / n if n else np.full(self.channels, np.nan)
            zero = s["zero_count"] / n if n else np.full(self.channels, np.nan)
        mx = s["max"] if n else np.full(self.channels, np.nan, np.float32)
        return LayerResult(
            topk_value=s["topk_value"],
            topk_image=s["topk_image"],
            topk_y=s["topk_y"],
            topk_x=s["topk_x"],
            mean_stimulus=mean_stim.astype(np.float32),
            positive_count=count,
            mean_stimulus_centre=centre.astype(np.float32),
            positive_count_centre=s["centre_count"],
            max=mx.astype(np.float32),
            mean=np.asarray(mean, dtype=np.float32),
            zero_fraction=np.asarray(zero, dtype=np.float32),
        )


def pack_state(state: Mapping[str, np.ndarray]) -> np.ndarray:
    """A `state_dict()` as one little-endian int64 vector: each array's bytes in `STATE_KEYS` order,
    zero-padded to whole words (one array, one write and one read per layer and group)."""
    parts = []
    for key in STATE_KEYS:
        a = np.asarray(state[key])
        raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
        parts += [raw, np.zeros(-raw.size % 8, np.uint8)]
    return np.concatenate(parts).view("<i8")


def packed_words(layout: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]]) -> int:
    """Length of `pack_state`'s vector for a `LayerReducer.state_layout`."""
    nbytes = [int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in layout.values()]
    return sum(-(-n // 8) for n in nbytes)


def unpack_state(
    words: np.ndarray, layout: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]]
) -> dict[str, np.ndarray]:
    """The inverse of `pack_state`, given `LayerReducer.state_layout`; ValueError on a size mismatch."""
    raw = np.ascontiguousarray(words, dtype="<i8").view(np.uint8)
    if raw.size != 8 * packed_words(layout):
        raise ValueError(f"packed state has {raw.size} bytes, the layout {8 * packed_words(layout)}")
    out, at = {}, 0
    for key in STATE_KEYS:
        shape, dtype = layout[key]
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out[key] = raw[at : at + size].view(dtype.newbyteorder("<")).reshape(shape).astype(dtype)
        at += size + (-size % 8)
    return out


@dataclass(frozen=True)
class LayerResult:
    """Final results of one layer. Mean stimuli divide each cell's pixel sum by the number of image
    pixels summed into it (receptive-field pixels outside the image are not counted as black): NaN
    where no image pixel ever fell (outside the image, or a channel never positive)."""

    topk_value: np.ndarray  # (C,k) float32, -inf padding
    topk_image: np.ndarray  # (C,k) int64, -1 padding
    topk_y: np.ndarray  # (C,k) int32
    topk_x: np.ndarray  # (C,k) int32
    mean_stimulus: np.ndarray  # (C,3,p,p) float32, uint8 pixel units; patch at each image's strongest unit
    positive_count: np.ndarray  # (C,) int64 images with max > 0
    mean_stimulus_centre: np.ndarray  # (C,3,p,p) float32: eq. 4 for the centre neuron (H//2, W//2)
    positive_count_centre: np.ndarray  # (C,) int64: |X+| of eq. 5 for the centre neuron
    max: np.ndarray  # (C,) float32
    mean: np.ndarray  # (C,) float32
    zero_fraction: np.ndarray  # (C,) float32 fraction of activations == 0


def crop_topk_patches(
    dataset: ImageDataset,
    geometry: PatchGeometry,
    topk_image: np.ndarray,
    topk_y: np.ndarray,
    topk_x: np.ndarray,
) -> np.ndarray:
    """uint8 (C,k,3,p,p) patches of the top-k hits, cut like the mean stimulus (pooled sums / f²,
    rounded half up); reads each winning image once; entries with image -1 stay zero."""
    c, k = topk_image.shape
    out = np.zeros((c, k, 3, geometry.size, geometry.size), dtype=np.uint8)
    wanted = np.unique(topk_image[topk_image >= 0])
    if len(wanted):
        images = np.stack([dataset.get(int(i))[0] for i in wanted])
        pooled = pool_uint8(images, geometry.factor, geometry.phase)
        cut_patches(pooled, wanted, geometry, topk_image, topk_y, topk_x, out)
    return out


def pool_uint8(images: np.ndarray, factor: int, phase: tuple[int, int], margin: int = 0) -> np.ndarray:
    """uint8 images (N,3,H,W) sum-pooled as `pool_images`, then divided by f² (rounded half up),
    inside `margin` zero cells on every side: the pixels of the top-k patches. float32 throughout:
    the sums are exact there and f² is a power of two."""
    source = torch.from_numpy(np.ascontiguousarray(images))
    if factor == 1:
        pooled = source
    else:
        sums = pool_images(source, factor, phase, torch.float32)
        pooled = sums.add_(factor * factor // 2).mul_(1.0 / (factor * factor)).floor_().to(torch.uint8)
    n, c, h, w = pooled.shape
    out = np.zeros((n, c, h + 2 * margin, w + 2 * margin), dtype=np.uint8)
    out[:, :, margin : margin + h, margin : margin + w] = pooled.numpy()
    return out


def cut_patches(
    pooled: np.ndarray,
    indices: np.ndarray,
    geometry: PatchGeometry,
    topk_image: np.ndarray,
    topk_y: np.ndarray,
    topk_x: np.ndarray,
    out: np.ndarray,
    margin: int = 0,
) -> None:
    """Write into `out` (C,k,3,p,p) the patch of every top-k hit whose image is among `indices`
    (sorted dataset indices of the rows of `pool_uint8(..., margin)` output `pooled`), in one
    gather; zeros outside the image."""
    f, p = geometry.factor, geometry.size
    ci, ki = np.nonzero(np.isin(topk_image, indices))
    if not len(ci):
        return
    rows = np.searchsorted(indices, topk_image[ci, ki])
    ph, pw = geometry.phase
    r = (
        (geometry.first[0] - ph) // f
        + (1 if ph else 0)
        + topk_y[ci, ki].astype(np.int64) * geometry.stride[0] // f
    )
    q = (
        (geometry.first[1] - pw) // f
        + (1 if pw else 0)
        + topk_x[ci, ki].astype(np.int64) * geometry.stride[1] // f
    )
    h, w = pooled.shape[-2] - 2 * margin, pooled.shape[-1] - 2 * margin
    need = int(max(0, -r.min(), -q.min(), (r + p).max() - h, (q + p).max() - w))
    extra = max(0, need - margin)
    big = np.pad(pooled, ((0, 0), (0, 0), (extra, extra), (extra, extra))) if extra else pooled
    windows = np.lib.stride_tricks.sliding_window_view(big, (p, p), axis=(2, 3))  # (N,3,H',W',p,p)
    out[ci, ki] = windows[rows, :, r + margin + extra, q + margin + extra]


@dataclass(frozen=True)
class LayerPlan:
    """What the sweep needs to know about one layer."""

    name: str
    channels: int
    shape: tuple[int, int]
    kind: str
    rf: RField
    geometry: PatchGeometry
    response: dict[str, Any] | None = None  # `rfcore.layers.Response.to_dict()`: the tensor captured


def plan_layers(model: nn.Module, layers: str | Sequence[str], patch_max: int = 64) -> list[LayerPlan]:
    """Resolve a layer spec and compute each layer's receptive field and patch geometry."""
    from rfcore.layers import list_layers, resolve_layers, response_module
    from rfcore.models import model_meta
    from rfcore.receptive import receptive_fields

    size = model_meta(model).preprocessing.size
    names = resolve_layers(model, layers)
    infos = {li.name: li for li in list_layers(model, size)}
    rfs = receptive_fields(model, size)
    return [
        LayerPlan(
            n,
            infos[n].channels,
            infos[n].shape,
            infos[n].kind,
            rfs[n],
            patch_geometry(rfs[n], (size, size), patch_max),
            response_module(model, n).to_dict(),
        )
        for n in names
    ]


class SweepRunner:
    """One forward pass per batch (through `rfcore.layers.capture`) feeding a reducer per layer;
    a conv layer's activation is its post-BN-ReLU response (`rfcore.layers.response_map`)."""

    def __init__(
        self,
        model: nn.Module,
        geometries: Mapping[str, PatchGeometry],
        channels: Mapping[str, int],
        *,
        k: int = 16,
        device: str | torch.device = "auto",
        amp: bool | str | None = None,
    ) -> None:
        from rfcore.models import model_meta, select_device

        self.device = select_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device)
        self.amp = amp
        self.preprocessing = model_meta(model).preprocessing
        self.reducers = {
            n: LayerReducer(channels[n], g, k=k, device=self.device) for n, g in geometries.items()
        }
        #: dataset indices of images with NaN/inf activations, per layer (kept out of the reducers)
        self.nonfinite: dict[str, list[int]] = {}

    def _add(
        self, name: str, r: LayerReducer, acts: Tensor, images: Tensor, indices: Tensor, pooled: BatchPools
    ) -> Tensor:
        """Feed the reducer only images whose activations in this layer are all finite (a NaN would
        poison the sums, the max and the top-k); the others get -inf maxima (NaN means a skipped
        image) and are listed in `nonfinite[name]`."""
        acts = acts.to(r.device, torch.float32)
        rows = row_sums(acts if acts.dim() == 4 else acts[:, :, None, None])
        if bool(torch.isfinite(rows).all()):  # nothing to check further (a NaN or inf shows here)
            return r.add(acts, images, indices, pooled=pooled, rows=rows)[0]
        bad = ~torch.isfinite(acts.flatten(1)).all(dim=1)  # exact: finite values may overflow a row
        if not bool(bad.any()):
            return r.add(acts, images, indices, pooled=pooled, rows=rows)[0]
        self.nonfinite.setdefault(name, []).extend(int(i) for i in indices[bad].tolist())
        keep = ~bad
        out = torch.full((acts.shape[0], r.channels), -math.inf, dtype=torch.float32, device=r.device)
        if bool(keep.any()):
            out[keep.to(r.device)] = r.add(acts[keep], images[keep], indices[keep])[0]
        return out

    def step(self, images: Tensor, indices: Tensor) -> dict[str, Tensor]:
        """Feed one batch (uint8 images, pinned on CUDA for async copies); returns each layer's
        per-image spatial maxima (B,C) float32 on the CPU."""
        from rfcore.layers import capture

        if images.shape[0] == 0:
            return {n: torch.empty((0, r.channels)) for n, r in self.reducers.items()}
        images = images.to(self.device, non_blocking=True)
        indices = indices.to(self.device, non_blocking=True)
        with (
            torch.inference_mode(),
            capture(self.model, list(self.reducers), stop_early=True, response=True) as cap,
        ):
            with autocast(self.device, self.amp):
                outputs = cap.run(self.preprocessing.normalize(images))
            pooled = BatchPools(images)
            maxima = [self._add(n, r, outputs[n], images, indices, pooled) for n, r in self.reducers.items()]
        host = torch.cat(maxima, dim=1).cpu()  # one device-to-host copy per batch
        sizes = [r.channels for r in self.reducers.values()]
        return dict(zip(self.reducers, torch.split(host, sizes, dim=1), strict=True))


def sweep_dataset(
    model: nn.Module,
    dataset: ImageDataset,
    layers: str | Sequence[str] = "default",
    config: SweepConfig = SweepConfig(),
    indices: range | None = None,
) -> dict[str, LayerReducer]:
    """In-memory sweep of `indices` (default: the whole dataset); returns the reducers by layer."""
    from rfcore.data import iter_batches

    plans = plan_layers(model, layers, config.patch_max)
    runner = SweepRunner(
        model,
        {p.name: p.geometry for p in plans},
        {p.name: p.channels for p in plans},
        k=config.k,
        device=config.device,
        amp=config.amp,
    )
    pin = runner.device.type == "cuda"
    rng = range(len(dataset)) if indices is None else indices
    for batch in iter_batches(
        dataset, rng, config.batch_size, num_workers=config.num_workers, pin_memory=pin
    ):
        runner.step(batch.images, batch.indices)
    return runner.reducers
