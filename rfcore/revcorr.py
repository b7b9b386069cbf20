"""White-noise reverse correlation of centre units: activation-weighted average (AWA) and covariance (AWC).

Streaming and mergeable: `RevcorrReducer.add` folds in one batch of (activations, RF-box pixels);
reducers over disjoint batches `merge` into the reducer of one pass (float64 sums fed by float32
GEMMs: equal up to summation order and float32 rounding). `result` gives the AWA, the AWC minus the
stimulus covariance, its leading eigen filters, and a null band from activations shuffled within
each batch. The RF box is block-averaged to
at most `max_side` pixels per side (integer factor, no overlap: the pooled noise stays white) so that
the covariance stays small. Definitions and sources: docs/tuning.md. Pure compute, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rfcore.errors import RfatlasError
from rfcore.layers import capture, response_module
from rfcore.precision import autocast
from rfcore.stimuli import noise_batches, to_input
from rfcore.tuning import centre_index, centre_response


@dataclass(frozen=True)
class BoxSpec:
    """The pixels a reducer sees: image rows y0:y1, cols x0:x1 (inside the image, sides multiples of
    `factor`), block-averaged by `factor`; `colour` keeps the three channels, else their mean."""

    y0: int
    y1: int
    x0: int
    x1: int
    factor: int
    colour: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        """(colours, rows, cols) of one feature vector."""
        return (
            3 if self.colour else 1,
            (self.y1 - self.y0) // self.factor,
            (self.x1 - self.x0) // self.factor,
        )

    @property
    def dim(self) -> int:
        """Length of one feature vector."""
        return math.prod(self.shape)


def box_spec(
    rf: Mapping[str, Any], fmap_shape: Sequence[int], image_size: int, *, max_side: int, colour: bool
) -> BoxSpec:
    """The centre unit's RF box clipped to the image, with the smallest integer factor k that brings
    each side to at most `max_side` after k x k block averaging; each side is trimmed symmetrically
    to a multiple of k (at most k - 1 edge pixels, where an RF's weight is lowest)."""
    if max_side < 1:
        raise RfatlasError(f"max_side must be positive, got {max_side}")
    cy, cx = centre_index(fmap_shape)
    spans = []
    for axis, i in ((0, cy), (1, cx)):
        size, stride, offset = int(rf["size"][axis]), float(rf["stride"][axis]), float(rf["offset"][axis])
        centre = offset + i * stride if stride > 0 else (image_size - 1) / 2.0
        lo = round(centre - (size - 1) / 2)
        spans.append((max(lo, 0), min(lo + size, image_size)))
    k = max(1, math.ceil(max(hi - lo for lo, hi in spans) / max_side))
    trimmed = []
    for lo, hi in spans:
        extra = (hi - lo) % k
        trimmed.append((lo + extra // 2, hi - (extra - extra // 2)))
    (y0, y1), (x0, x1) = trimmed
    if y1 <= y0 or x1 <= x0:
        raise RfatlasError(f"receptive field box {spans} is empty after trimming to factor {k}")
    return BoxSpec(y0, y1, x0, x1, k, colour)


def box_features(images: Tensor, mean: Sequence[float], box: BoxSpec) -> Tensor:
    """(B, D) float32 features: image-space `images` (B, 3, S, S) minus `mean`, cut to the box,
    block-averaged, channels averaged unless `box.colour`."""
    mu = torch.tensor(list(mean), device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    x = images[:, :, box.y0 : box.y1, box.x0 : box.x1].float() - mu
    if not box.colour:
        x = x.mean(1, keepdim=True)
    if box.factor > 1:
        x = F.avg_pool2d(x, box.factor)
    return x.reshape(x.shape[0], -1)


def _perm(n: int, seed: int, batch: int, shuffle: int, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + batch) * 101 + shuffle)
    return torch.randperm(n, generator=gen).to(device)


@dataclass(frozen=True)
class RevcorrResult:
    """Per-channel AWA, leading AWC eigen-filters (k largest positive then k most negative eigenvalues),
    the shuffled-null band and which eigenvalues lie outside it. Vectors are flat (D,) features."""

    awa: Tensor  # (C, D)
    eigvals: Tensor  # (C, 2k)
    eigvecs: Tensor  # (C, 2k, D)
    null: Tensor  # (C, 2): lowest and highest eigenvalue over the shuffles
    significant: Tensor  # (C, 2k) bool
    total_weight: Tensor  # (C,) sum of activations


class RevcorrReducer:
    """Sums for the AWA/AWC of C units over D features; row 0 of each sum uses the true activations,
    rows 1..shuffles the activations permuted within each batch (seeded by (seed, batch, shuffle), so
    shards give the same permutations as one pass). Covariances keep their upper triangle only.

    The outer-product sums go through float32 GEMMs into a float32 buffer that is added to the
    float64 sums every `flush_images` images (and before `state_dict`, `merge` and results): adding a
    (rows x C x T) buffer costs as much memory traffic as the GEMM itself, so not after every batch;
    float32 rounding builds up over at most `flush_images` images (relative ~1e-6, far below the
    sampling noise of a covariance)."""

    def __init__(
        self,
        channels: int,
        dim: int,
        *,
        shuffles: int = 2,
        seed: int = 0,
        device: torch.device | None = None,
        flush_images: int = 1024,
    ) -> None:
        self.channels, self.dim, self.shuffles, self.seed = channels, dim, shuffles, seed
        self.device = device or torch.device("cpu")
        self.flush_images = flush_images
        rows = 1 + shuffles
        dev, f64 = self.device, torch.float64
        self.iu = torch.triu_indices(dim, dim, device=self.device)
        self.n = 0
        self.sum_a = torch.zeros(rows, channels, dtype=f64, device=dev)
        self.sum_ax = torch.zeros(rows, channels, dim, dtype=f64, device=dev)
        self.sum_axx = torch.zeros(rows, channels, self.iu.shape[1], dtype=f64, device=dev)
        self.sum_x = torch.zeros(dim, dtype=f64, device=dev)
        self.sum_xx = torch.zeros(self.iu.shape[1], dtype=f64, device=dev)
        self.batches: set[int] = set()
        self._acc: Tensor | None = None  # float32 (rows*C, T) not yet in sum_axx
        self._acc_xx: Tensor | None = None
        self._pending = 0

    def add(self, act: Tensor, x: Tensor, batch: int, *, chunk: int = 128) -> None:
        """Fold in batch number `batch`: rectified activations (B, C) and features (B, D); the outer
        products go through float32 GEMMs of `chunk` images."""
        if batch in self.batches:
            raise RfatlasError(f"batch {batch} was already added")
        self.batches.add(batch)
        act, x = act.to(self.device, torch.float32), x.to(self.device, torch.float32)
        b = act.shape[0]
        weights = [act] + [
            act[_perm(b, self.seed, batch, s, self.device)] for s in range(1, self.shuffles + 1)
        ]
        w = torch.stack(weights)  # (rows, B, C)
        self.n += b
        self.sum_a += w.sum(1)
        self.sum_ax += torch.einsum("rbc,bd->rcd", w, x)
        self.sum_x += x.sum(0)
        wt = w.permute(0, 2, 1).reshape(-1, b)  # (rows*C, B)
        for lo in range(0, b, chunk):
            xc = x[lo : lo + chunk]
            outer = xc[:, self.iu[0]] * xc[:, self.iu[1]]  # (b, T)
            wc = wt[:, lo : lo + chunk]
            if self._acc is None or self._acc_xx is None:
                self._acc, self._acc_xx = wc @ outer, outer.sum(0)
            else:
                self._acc.addmm_(wc, outer)
                self._acc_xx.add_(outer.sum(0))
        self._pending += b
        if self._pending >= self.flush_images:
            self.flush()

    def flush(self) -> None:
        """Add the float32 buffer into the float64 sums."""
        if self._acc is not None and self._acc_xx is not None:
            self.sum_axx.view(self._acc.shape).add_(self._acc)
            self.sum_xx.add_(self._acc_xx)
        self._acc, self._acc_xx, self._pending = None, None, 0

    def merge(self, other: RevcorrReducer) -> None:
        """Add the sums of a reducer over other batches (same channels, features, shuffles, seed)."""
        if (other.channels, other.dim, other.shuffles, other.seed) != (
            self.channels,
            self.dim,
            self.shuffles,
            self.seed,
        ):
            raise RfatlasError("cannot merge reducers with different channels, features, shuffles or seed")
        if self.batches & other.batches:
            raise RfatlasError(f"batches {sorted(self.batches & other.batches)[:5]} are in both reducers")
        self.flush()
        other.flush()
        self.batches |= other.batches
        self.n += other.n
        for name in ("sum_a", "sum_ax", "sum_axx", "sum_x", "sum_xx"):
            getattr(self, name).add_(getattr(other, name).to(self.device))

    def state_dict(self) -> dict[str, Any]:
        """Tensors (CPU) and settings; `from_state_dict` rebuilds the reducer."""
        self.flush()
        return {
            "channels": self.channels,
            "dim": self.dim,
            "shuffles": self.shuffles,
            "seed": self.seed,
            "n": self.n,
            "batches": sorted(self.batches),
            **{k: getattr(self, k).cpu() for k in ("sum_a", "sum_ax", "sum_axx", "sum_x", "sum_xx")},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device | None = None) -> RevcorrReducer:
        """The reducer saved by `state_dict`."""
        r = cls(
            int(state["channels"]),
            int(state["dim"]),
            shuffles=int(state["shuffles"]),
            seed=int(state["seed"]),
            device=device,
        )
        r.n, r.batches = int(state["n"]), set(int(b) for b in state["batches"])
        for k in ("sum_a", "sum_ax", "sum_axx", "sum_x", "sum_xx"):
            getattr(r, k).copy_(state[k])
        return r

    def _full(self, tri: Tensor) -> Tensor:
        """Symmetric (..., D, D) from upper-triangle sums (..., T)."""
        out = torch.zeros(*tri.shape[:-1], self.dim, self.dim, dtype=tri.dtype, device=tri.device)
        out[..., self.iu[0], self.iu[1]] = tri
        out[..., self.iu[1], self.iu[0]] = tri
        return out

    def delta_cov(self) -> tuple[Tensor, Tensor]:
        """(AWA (rows, C, D), AWC minus the stimulus covariance (rows, C, D, D)), float64.

        AWC = sum a (x - awa)(x - awa)^T / sum a; stimulus covariance = sum (x - m)(x - m)^T / n."""
        if self.n == 0:
            raise RfatlasError("no images were added")
        self.flush()
        with torch.no_grad():
            wsum = self.sum_a.clamp_min(torch.finfo(torch.float64).tiny)[..., None]
            awa = self.sum_ax / wsum
            awc = self._full(self.sum_axx / wsum) - awa[..., :, None] * awa[..., None, :]
            m = self.sum_x / self.n
            cx = self._full(self.sum_xx / self.n) - m[:, None] * m[None, :]
            return awa, awc - cx

    def result(self, k: int = 4, margin: float = 1.2) -> RevcorrResult:
        """AWA and the k largest / k most negative eigenvalues and eigenvectors of AWC - C_stim per
        channel; null band = `margin` x [min, max] of the eigenvalues over all shuffles, significant =
        outside it (with few shuffles the extreme of each shuffle understates the null's tail: the
        margin keeps the noise eigenvalues of the true AWC, drawn from the same distribution, out).
        Units that never responded get zero filters and no significant eigenvalue."""
        awa, dc = self.delta_cov()
        k = min(k, self.dim // 2) if self.dim > 1 else 1
        # ΔC is formed in float64 (a difference of close covariances); its eigen-decomposition runs in
        # float32 (eigenvalues of interest are far above float32 rounding; 2x faster, and fast on GPUs)
        dc = dc.float()
        vals, vecs = torch.linalg.eigh(dc[0])  # ascending
        idx = torch.cat([torch.arange(self.dim - 1, self.dim - 1 - k, -1), torch.arange(0, k)]).to(
            vals.device
        )
        top_vals, top_vecs = vals[:, idx], vecs[:, :, idx].transpose(1, 2)
        # sign convention: each eigenvector's largest-magnitude entry is positive
        big = top_vecs.abs().argmax(-1, keepdim=True)
        top_vecs = top_vecs * torch.sign(torch.gather(top_vecs, -1, big))
        alive = self.sum_a[0] > 0
        if self.shuffles:
            null_vals = torch.linalg.eigvalsh(dc[1:])  # (shuffles, C, D)
            null = margin * torch.stack([null_vals[..., 0].amin(0), null_vals[..., -1].amax(0)], dim=1)
        else:
            null = torch.full((self.channels, 2), float("nan"), dtype=torch.float32, device=vals.device)
        sig = ((top_vals > null[:, 1:2]) | (top_vals < null[:, 0:1])) & alive[:, None]
        sig[:, :k] &= top_vals[:, :k] > 0
        sig[:, k:] &= top_vals[:, k:] < 0
        return RevcorrResult(
            awa=torch.where(alive[:, None], awa[0], 0.0).float().cpu(),
            eigvals=top_vals.float().cpu(),
            eigvecs=top_vecs.float().cpu(),
            null=null.float().cpu(),
            significant=sig.cpu(),
            total_weight=self.sum_a[0].float().cpu(),
        )


def accumulate(
    model: nn.Module,
    layer: str,
    reducer: RevcorrReducer,
    box: BoxSpec,
    *,
    channels: slice,
    n: int,
    batch_size: int,
    noise_mean: Sequence[float],
    sigma: float,
    seed: int,
    input_mean: Sequence[float],
    input_std: Sequence[float],
    image_size: int,
    first_batch: int = 0,
    precision: str = "auto",
) -> RevcorrReducer:
    """Run `n` white-noise images (batches first_batch, first_batch + 1, ...) through `model` up to
    `layer` and fold the rectified centre-unit responses of `channels` into `reducer`."""
    device = next(model.parameters()).device
    gen = noise_batches(
        n,
        image_size,
        batch_size,
        mean=noise_mean,
        sigma=sigma,
        colour=box.colour,
        seed=seed,
        device=device,
        first_batch=first_batch,
    )
    module = response_module(model, layer).module  # a conv's response: after its BN and ReLU
    with torch.no_grad(), capture(model, [module], stop_early=True) as cap:
        for i, images in enumerate(gen):
            with autocast(device, precision):
                out = cap.run(to_input(images, input_mean, input_std))[module]
            reducer.add(
                centre_response(out)[:, channels], box_features(images, noise_mean, box), first_batch + i
            )
    return reducer


def predicted_surface(
    res: RevcorrResult, grating_feats: Tensor, grid: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """(linear, energy) predicted responses (C, *grid) to gratings whose features (G, D) are
    `grating_feats` (G = prod(grid)): linear = relu(awa . s); energy = sum over significant
    eigen-filters of lambda_i (v_i . s)^2 (NaN for channels without a significant one)."""
    g = grating_feats.double()
    lin = torch.relu(g @ res.awa.double().T).T  # (C, G)
    proj = torch.einsum("gd,ced->ceg", g, res.eigvecs.double()) ** 2
    w = (res.eigvals.double() * res.significant.double())[..., None]
    energy = (w * proj).sum(1)
    energy[~res.significant.any(1)] = float("nan")
    return lin.reshape(-1, *grid).numpy(), energy.reshape(-1, *grid).numpy()


def axial_circular_correlation(a_deg: np.ndarray, b_deg: np.ndarray) -> float:
    """Circular correlation (Jammalamadaka & SenGupta 2001) of orientations (period 180 degrees, so
    the angles are doubled first); NaN pairs dropped; NaN with fewer than 3 pairs."""
    ok = ~(np.isnan(a_deg) | np.isnan(b_deg))
    if ok.sum() < 3:
        return float("nan")
    a, b = np.deg2rad(2 * a_deg[ok]), np.deg2rad(2 * b_deg[ok])
    sa = np.sin(a - np.angle(np.exp(1j * a).mean()))
    sb = np.sin(b - np.angle(np.exp(1j * b).mean()))
    den = math.sqrt(float((sa**2).sum() * (sb**2).sum()))
    return float((sa * sb).sum() / den) if den > 0 else float("nan")


def agreement(
    pred_ori: np.ndarray,
    meas_ori: np.ndarray,
    ori_step: float,
    pred_sf: np.ndarray,
    meas_sf: np.ndarray,
    sf_step_oct: float,
) -> dict[str, float]:
    """How well predicted preferences match measured ones over channels (NaN predictions dropped):
    fraction within one orientation step (axial difference), circular correlation, fraction of SFs
    within one grid step (in octaves)."""
    ok = ~(np.isnan(pred_ori) | np.isnan(meas_ori))
    d = np.abs((pred_ori[ok] - meas_ori[ok]) % 180.0)
    d = np.minimum(d, 180.0 - d)
    okf = ~(np.isnan(pred_sf) | np.isnan(meas_sf))
    sf_d = np.abs(np.log2(pred_sf[okf] / meas_sf[okf]))
    return {
        "n": int(ok.sum()),
        "orientation_within_step": float((d <= ori_step + 1e-9).mean()) if ok.any() else float("nan"),
        "orientation_circular_correlation": axial_circular_correlation(pred_ori, meas_ori),
        "sf_within_step": float((sf_d <= sf_step_oct + 1e-9).mean()) if okf.any() else float("nan"),
    }
