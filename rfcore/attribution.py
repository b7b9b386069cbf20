"""Attribution: what each unit contributes to each class's logit, and where in the input a unit looks
(pure math on a model; no store I/O).

* contribution (gradient x activation at the layer, Shrikumar et al. 2016 / Ancona et al. 2018):
  for image i of class k, `sum over positions of A_c(i) * d logit_k(i) / d A_c(i)`, averaged over the
  images of class k; for a ReLU network without biases after the layer the units' contributions add
  up to the logit (Euler's theorem for positively homogeneous functions);
* domination: a unit's share of its class's total absolute contribution, `contribution[c, k] /
  sum_c' |contribution[c', k]|`;
* focus: the saliency map (Simonyan et al. 2014: max over colours of |d A_c(y, x) / d input|) of a
  unit at one position, optionally SmoothGrad-averaged (Smilkov et al. 2017) over noisy copies,
  cut to the unit's patch box and averaged over factor x factor cells (the sweep's patch grid).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from rfcore.errors import DataError
from rfcore.layers import capture, eval_mode
from rfcore.sweep import PatchGeometry


def batch_contribution(model: nn.Module, layer: str, x: Tensor, labels: Tensor) -> Tensor:
    """(B, C) contribution of every unit of `layer` to the logit of each image's own label:
    activation x gradient summed over positions (the images of a batch are independent in eval mode)."""
    with torch.enable_grad(), eval_mode(model), capture(model, [layer]) as cap:
        logits = model(x)
        act = cap.outputs[layer]
        target = logits.gather(1, labels.view(-1, 1).to(logits.device)).sum()
        (grad,) = torch.autograd.grad(target, act)
    out = (act.detach() * grad).float()
    return out.flatten(2).sum(dim=2) if out.ndim > 2 else out


def contribution_table(sums: NDArray[np.float64], count: NDArray[np.int64]) -> NDArray[np.float64]:
    """(C, K) mean contribution per class from per-class sums (K, C) and image counts (NaN: no image)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray((sums / count[:, None]).T, dtype=np.float64)


def domination(contribution: NDArray[np.float64]) -> NDArray[np.float64]:
    """(C, K) each unit's share of its class's total absolute contribution (sums to 1 in |.| per class)."""
    total = np.nansum(np.abs(contribution), axis=0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(total > 0, contribution / total, np.nan), dtype=np.float64)


def top_units(contribution: NDArray[np.float64], n: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """(K, n) units with the largest contribution to each class, descending, and their contributions
    (-1 / NaN past the number of units)."""
    k = contribution.shape[1]
    order = np.argsort(-np.nan_to_num(contribution.T, nan=-np.inf), axis=1, kind="stable")[:, :n]
    units = np.full((k, n), -1, np.int64)
    values = np.full((k, n), np.nan)
    units[:, : order.shape[1]] = order
    values[:, : order.shape[1]] = np.take_along_axis(contribution.T, order, axis=1)
    return units, values


def input_saliency(
    model: nn.Module,
    layer: str,
    x: Tensor,
    channel: Tensor,
    y: Tensor,
    xpos: Tensor,
    *,
    samples: int = 0,
    noise: float = 0.15,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, H, W) saliency of unit (channel, y, x) of `layer` for each input of the batch: max over
    colours of |gradient of the unit's activation w.r.t. the model input|; with `samples` > 0, the
    mean over that many copies with Gaussian noise of std `noise` x (max - min) of each input (SmoothGrad)."""
    rows = torch.arange(x.shape[0], device=x.device)
    copies = [x]
    if samples > 0:
        spread = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1) * noise
        copies = [
            x + spread * torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
            for _ in range(samples)
        ]
    total = torch.zeros(x.shape[0], *x.shape[2:], device=x.device)
    with torch.enable_grad(), eval_mode(model), capture(model, [layer], stop_early=True) as cap:
        for xi in copies:
            xi = xi.detach().requires_grad_(True)
            act = cap.run(xi)[layer]
            unit = act[rows, channel] if act.ndim == 2 else act[rows, channel, y, xpos]
            (grad,) = torch.autograd.grad(unit.sum(), xi)
            total += grad.abs().amax(dim=1).float()
    return total / len(copies)


def to_patch_grid(
    maps: NDArray[np.float32], geometry: PatchGeometry, y: NDArray[np.int64], x: NDArray[np.int64]
) -> NDArray[np.float32]:
    """(B, size, size) mean of each full-resolution map over the factor x factor cells of the patch
    box of unit (y, x): the box of `topk/patch` (pixels `first + (y, x) * stride` on; 0 outside the image)."""
    f, p = geometry.factor, geometry.size
    side = p * f
    b, h, w = maps.shape
    big = np.zeros((b, h + 2 * side, w + 2 * side), np.float32)
    big[:, side : side + h, side : side + w] = maps
    out = np.zeros((b, p, p), np.float32)
    for i in range(b):
        r = geometry.first[0] + int(y[i]) * geometry.stride[0] + side
        q = geometry.first[1] + int(x[i]) * geometry.stride[1] + side
        if not (0 <= r <= big.shape[1] - side and 0 <= q <= big.shape[2] - side):
            continue  # the box lies wholly outside the image (cannot happen for swept units)
        cut = big[i, r : r + side, q : q + side]
        out[i] = cut.reshape(p, f, p, f).mean(axis=(1, 3))
    return out


def focus_maps(
    model: nn.Module,
    layer: str,
    images: NDArray[np.uint8],
    channel: NDArray[np.int64],
    y: NDArray[np.int64],
    x: NDArray[np.int64],
    *,
    normalize: Callable[[Tensor], Tensor],
    geometry: PatchGeometry,
    device: torch.device,
    samples: int = 0,
    noise: float = 0.15,
    seed: int = 0,
) -> NDArray[np.float32]:
    """(B, size, size) focus map of unit (channel, y, x) on each uint8 (3, S, S) image, on the patch grid."""
    if images.ndim != 4 or images.shape[0] != channel.shape[0]:
        raise DataError(
            f"focus maps need (B, 3, S, S) images and B units, got {images.shape}, {channel.shape}"
        )
    gen = torch.Generator().manual_seed(seed)
    xin = normalize(torch.from_numpy(np.ascontiguousarray(images)).to(device))
    sal = input_saliency(
        model,
        layer,
        xin,
        torch.as_tensor(channel, device=device),
        torch.as_tensor(y, device=device),
        torch.as_tensor(x, device=device),
        samples=samples,
        noise=noise,
        generator=gen,
    )
    return to_patch_grid(sal.cpu().numpy().astype(np.float32), geometry, y, x)
