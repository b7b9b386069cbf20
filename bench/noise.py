"""Noise-injection evaluation throughput per condition vs a bare validation pass, side by side.

    .venv/bin/python bench/noise.py --threads 1           # resnet18, CPU, ~1 min on a shared 2-core box
    .venv/bin/python bench/noise.py --device cuda --model resnet34 --size 224 --images 4096 --batch 256

Same model, images, batches and device for every mode; modes run round-robin batch by batch and,
per batch, the best of `--rounds` counts (robust on shared machines). The inactive set is
`--inactive` channels of the layer (the paper's 13 of ResNet34's 64 by default): a random-init model
has none, and the cost of injecting noise does not depend on which channels get it.
Target: every condition >= 0.8x the bare pass.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rfcore.inactive import default_layer
from rfcore.models import get_model, model_meta, select_device
from rfcore.noise import CONDITIONS, evaluate


class _Batch:
    def __init__(self, images: Tensor, labels: Tensor, indices: Tensor) -> None:
        self.images, self.labels, self.indices = images, labels, indices


def make_batches(n: int, size: int, batch: int, classes: int, pin: bool) -> list[_Batch]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    if pin:
        images, labels = images.pin_memory(), labels.pin_memory()
    return [
        _Batch(images[s : s + batch], labels[s : s + batch], torch.arange(s, min(s + batch, n)))
        for s in range(0, n, batch)
    ]


@torch.inference_mode()
def bare_pass(
    model: nn.Module, batches: list[_Batch], normalize: Callable[[Tensor], Tensor], amp: bool
) -> None:
    """A plain validation pass: forward, per-image cross-entropy, top-5, results to host."""
    device = next(model.parameters()).device
    out = []
    for b in batches:
        x = normalize(b.images.to(device, non_blocking=True))
        labels = b.labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        hits = logits.topk(5, dim=1).indices == labels[:, None]
        out.append((F.cross_entropy(logits, labels, reduction="none"), hits[:, 0], hits.any(dim=1)))
    torch.cat([o[0] for o in out]).cpu()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--layer", default=None, help="default: the first max-pool")
    ap.add_argument("--size", type=int, default=112, help="input side in pixels")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--inactive", type=int, default=13, help="number of channels treated as inactive")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (AMP bfloat16 by default)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    amp = device.type == "cuda" and not args.no_amp
    model = get_model(args.model).to(device)
    layer = args.layer or default_layer(model)
    normalize = model_meta(model).preprocessing.normalize
    batches = make_batches(
        args.images, args.size, args.batch, model_meta(model).num_classes, device.type == "cuda"
    )
    channels = _layer_channels(model, layer, args.size, device)
    inactive = np.zeros(channels, dtype=bool)
    inactive[np.random.default_rng(0).choice(channels, size=min(args.inactive, channels), replace=False)] = (
        True
    )

    def cond_fn(cond: str) -> Callable[[list[_Batch]], object]:
        return lambda bs: evaluate(
            model, layer, bs, condition=cond, inactive=inactive, normalize=normalize,
            block_size=args.batch, device=device, amp=amp,
        )  # fmt: skip

    modes: dict[str, Callable[[list[_Batch]], object]] = {
        "bare": lambda bs: bare_pass(model, bs, normalize, amp)
    }
    modes.update({c: cond_fn(c) for c in CONDITIONS})
    for fn in modes.values():  # warm-up: one batch each (allocator, kernels, autotuning)
        fn(batches[:1])
    # Round-robin per batch so every mode sees the same machine load; per batch, the best round counts.
    best = {name: [float("inf")] * len(batches) for name in modes}
    for _ in range(args.rounds):
        for i, b in enumerate(batches):
            for name, fn in modes.items():
                best[name][i] = min(best[name][i], timed(lambda fn=fn, b=b: fn([b]), device))  # type: ignore[misc]
    rate = {name: args.images / sum(t) for name, t in best.items()}
    print(
        f"{args.model} layer {layer} ({channels} ch, {int(inactive.sum())} noised as inactive), "
        f"{args.images} images {args.size}px, batch {args.batch}, {device}{' AMP bf16' if amp else ''}, "
        f"threads {torch.get_num_threads()}, best of {args.rounds}"
    )
    print(f"{'mode':<12} {'images/s':>10} {'vs bare':>8}  target >= 0.80x")
    for name, r in rate.items():
        ratio = r / rate["bare"]
        verdict = "" if name == "bare" else ("ok" if ratio >= 0.8 else "BELOW")
        print(f"{name:<12} {r:>10.1f} {ratio:>7.2f}x  {verdict}")
    print(json.dumps({"device": str(device), "model": args.model, "images_per_s": rate}))


def _layer_channels(model: nn.Module, layer: str, size: int, device: torch.device) -> int:
    seen: list[int] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size, device=device))
    handle.remove()
    return seen[0]


if __name__ == "__main__":
    main()
