"""Activation-maximization throughput (channels/s), same preset and steps, measured in one run:

  (a)  one channel per call through the full network, model parameters left trainable (Lucent's way:
       `render_vis` runs `model(x)` and reads the layer from a hook, one objective per call);
  (a') the same with the parameters frozen (isolates batching + truncation from weight gradients);
  (b)  rfatlas: every channel in one batch, forward cut at the layer, no weight gradients;
  (b') the same with bfloat16 autocast (`amp=True`: CUDA, or a CPU with native bfloat16).
  lucent `render_vis`, when torch-lucent is installed.

It also counts the arithmetic (FLOPs) of one step of (a) and of (b) per channel: their ratio is the
speed-up that less work alone gives, at equal FLOP rates.

(a)/(a') render `--single` channels and report their rate (each call costs the same, so the rate of
a few calls is the rate of all). Defaults (the paper's 31 steps) take about three minutes on a
2-core CPU.

    .venv/bin/python bench/actmax.py [--device cuda] [--steps 2] [--single 64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

import rfcore.actmax as am
from rfcore.models import get_model, select_device
from rfcore.precision import native_bf16


def lucent_way(model: nn.Module, layer: str, channel: int, objective: str, config: am.ActmaxConfig) -> None:
    """One channel, full forward with a hook on `layer` (what Lucent does), same parameterization."""
    out: dict[str, torch.Tensor] = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: out.__setitem__("a", o))
    device = next(model.parameters()).device
    size, mean, std = am._preprocessing(model, config.size)
    gens = [torch.Generator().manual_seed(am.channel_seed(0, channel))]
    image = am._Image(config, gens, size, mean.to(device), std.to(device), device)
    grey = (0.5 - mean.to(device)) / std.to(device)
    rows = torch.tensor([channel], device=device)
    optimizer = torch.optim.Adam([image.param], lr=config.lr, weight_decay=config.weight_decay)
    try:
        for _ in range(config.steps):
            optimizer.zero_grad()
            model(am._transform(image.render(), config, gens, grey))
            torch.autograd.backward(-am._objective(out["a"], rows, objective).sum())
            optimizer.step()
    finally:
        handle.remove()


def lucent_render_vis(model: nn.Module, layer: str, channel: int, config: am.ActmaxConfig) -> None:
    """torch-lucent's own `render_vis` on one channel (pixel image, no transforms, same Adam)."""
    from lucent.optvis import param, render

    size, _, _ = am._preprocessing(model, config.size)
    render.render_vis(
        model,
        f"{layer.replace('.', '_')}:{channel}",
        param_f=lambda: param.image(size, fft=False, decorrelate=False),
        optimizer=lambda p: torch.optim.Adam(p, lr=config.lr, weight_decay=config.weight_decay),
        transforms=[],
        thresholds=(config.steps,),
        show_image=False,
        progress=False,
    )


def arithmetic(model: nn.Module, layer: str, objective: str, config: am.ActmaxConfig) -> tuple[float, float]:
    """FLOPs of one optimization step for one channel: (a) Lucent's way, (b) rfatlas batched (per
    image; two runs of 1 and 2 steps cancel the final forward pass). Their ratio is the speed-up that
    (b) reaches by doing less arithmetic alone, at the same FLOP rate as (a)."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn: Callable[[], object]) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return int(counter.get_total_flops())

    one, two = replace(config, steps=1), replace(config, steps=2)
    loop = flops(lambda: lucent_way(model, layer, 0, objective, one))
    chans = list(range(4))
    per_step = flops(lambda: am.actmax(model, layer, chans, objective=objective, config=two)) - flops(
        lambda: am.actmax(model, layer, chans, objective=objective, config=one)
    )
    return loop / 1e9, per_step / len(chans) / 1e9


def timed(label: str, n: int, fn: Callable[[], None], sync: Callable[[], object]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    rate = n / (time.perf_counter() - t0)
    print(f"{label:<62} {rate:8.3f} channels/s", flush=True)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet34")
    ap.add_argument("--layer", default="layer3.0.conv2")
    ap.add_argument("--channels", type=int, default=64, help="channels rendered by (b), one batch")
    ap.add_argument("--single", type=int, default=4, help="channels rendered one per call by (a), (a')")
    ap.add_argument("--preset", default="kobayashi2020", choices=sorted(am.PRESETS))
    ap.add_argument("--steps", type=int, default=31, help="steps for every mode (the paper's 31)")
    ap.add_argument("--size", type=int, default=None, help="image side (default: preset / model)")
    ap.add_argument("--objective", default="channel", choices=am.OBJECTIVES)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = select_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = get_model(args.model).to(device)
    config = am.preset(args.preset, steps=args.steps, **({"size": args.size} if args.size else {}))
    size, _, _ = am._preprocessing(model, config.size)
    print(
        f"{args.model} {args.layer}, preset {args.preset}, {args.steps} steps, {size} px, objective "
        f"{args.objective}, {device} ({torch.get_num_threads()} threads)"
    )
    singles = list(range(args.single))
    warm = am.preset(args.preset, steps=1, size=size)
    lucent_way(model, args.layer, 0, args.objective, warm)
    am.actmax(model, args.layer, [0], objective=args.objective, config=warm)

    def one_per_call(render: Callable[[int], object]) -> Callable[[], None]:
        def run() -> None:
            for c in singles:
                render(c)

        return run

    def lucent_way_c(c: int) -> None:
        lucent_way(model, args.layer, c, args.objective, config)

    a = timed(
        "(a)  one channel per call, full network (Lucent's way)",
        len(singles),
        one_per_call(lucent_way_c),
        sync,
    )
    for p in model.parameters():
        p.requires_grad_(False)
    a2 = timed("(a') same, parameters frozen", len(singles), one_per_call(lucent_way_c), sync)
    for p in model.parameters():
        p.requires_grad_(True)

    def batched() -> None:
        am.actmax(model, args.layer, list(range(args.channels)), objective=args.objective, config=config)

    b = timed(f"(b)  rfatlas: {args.channels} channels in one batch, truncated", args.channels, batched, sync)
    b_amp = None
    if native_bf16(device):

        def batched_bf16() -> None:
            am.actmax(
                model, args.layer, list(range(args.channels)), objective=args.objective,
                config=replace(config, amp=True),
            )  # fmt: skip

        b_amp = timed("(b') the same, bfloat16 autocast", args.channels, batched_bf16, sync)
    try:
        import lucent  # noqa: F401
    except ImportError:
        print(f"{'lucent render_vis':<62} {'skipped (torch-lucent not installed)':>20}")
    else:
        timed(
            "lucent render_vis, one channel per call",
            len(singles),
            one_per_call(lambda c: lucent_render_vis(model, args.layer, c, config)),
            sync,
        )
    loop_gflop, batched_gflop = arithmetic(model, args.layer, args.objective, config)
    print(
        f"arithmetic per channel-step: (a) {loop_gflop:.2f} GFLOP, (b) {batched_gflop:.2f} GFLOP: "
        f"{loop_gflop / batched_gflop:.2f}x less work in (b)"
    )
    print(f"speed-up (b)/(a) = {b / a:.2f}x   (b)/(a') = {b / a2:.2f}x", end="")
    print(f"   (b')/(a) = {b_amp / a:.2f}x" if b_amp else "   (b') skipped: no native bfloat16 here")


if __name__ == "__main__":
    main()
