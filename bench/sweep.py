"""Sweep throughput vs the bare forward pass, and peak memory vs dataset size.

    .venv/bin/python bench/sweep.py                       # CPU: ~3 min on 2 cores
    .venv/bin/python bench/sweep.py --device cuda --images 2048 --batch 128

Both sides run the same model (torchvision resnet34, random weights), batch and device, on the same
in-memory uint8 images; repetitions alternate (bare, sweep, sweep, bare, ...) to cancel drift, and
the median is reported. The bare forward is `model(normalize(images))` under the same autocast; the
sweep adds output capture (ReLUs out of place), the per-layer reducers and the copy of the per-image
maxima to the host. Peak memory is measured in a fresh subprocess per dataset size (ru_maxrss on
the CPU, torch.cuda.max_memory_allocated on CUDA).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rfcore.models import get_model, model_meta, select_device
from rfcore.precision import autocast
from rfcore.sweep import SweepConfig, SweepRunner, plan_layers


def batches(n: int, batch: int, size: int, pin: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic random uint8 batches, generated on the fly (nothing held across batches)."""
    gen = torch.Generator().manual_seed(0)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen)
        yield (images.pin_memory() if pin else images), torch.arange(start, start + b)


def make_runner(
    args: argparse.Namespace, layers: str, device: torch.device
) -> tuple[SweepRunner, torch.nn.Module]:
    model = get_model(args.model).to(device)
    plans = plan_layers(model, layers, args.patch_max)
    runner = SweepRunner(
        model,
        {p.name: p.geometry for p in plans},
        {p.name: p.channels for p in plans},
        k=args.k,
        device=device,
        amp=args.amp,
    )
    return runner, model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def throughput(args: argparse.Namespace, layers: str, device: torch.device) -> dict[str, float]:
    runner, model = make_runner(args, layers, device)
    pre = model_meta(model).preprocessing
    pin = device.type == "cuda"
    data = list(batches(args.images, args.batch, pre.size, pin))

    def bare() -> None:
        with torch.inference_mode(), autocast(device, args.amp):
            for images, _ in data:
                model(pre.normalize(images.to(device, non_blocking=True)))

    def sweep() -> None:
        for images, indices in data:
            runner.step(images, indices)

    bare()  # warm-up (allocator, cuDNN autotune, oneDNN primitives)
    sweep()
    t_bare: list[float] = []
    t_sweep: list[float] = []
    for rep in range(args.reps):
        order = [(bare, t_bare), (sweep, t_sweep)]
        for fn, out in order if rep % 2 == 0 else order[::-1]:
            out.append(timed(fn, device))
    bare_ips = args.images / statistics.median(t_bare)
    sweep_ips = args.images / statistics.median(t_sweep)
    return {
        "layers": len(runner.reducers),
        "bare": bare_ips,
        "sweep": sweep_ips,
        "ratio": sweep_ips / bare_ips,
    }


def peak_bytes(device: torch.device) -> int:
    sync(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child_memory(args: argparse.Namespace) -> None:
    """Sweep `args.child` images; print (JSON) the peak memory after the first batch and at the end."""
    device = select_device(args.device)
    runner, model = make_runner(args, "default", device)
    size = model_meta(model).preprocessing.size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = None
    for images, indices in batches(args.child, args.batch, size, device.type == "cuda"):
        runner.step(images, indices)
        first = first if first is not None else peak_bytes(device)
    print(json.dumps({"images": args.child, "first_batch": first, "peak": peak_bytes(device)}))


def memory(args: argparse.Namespace, n: int) -> dict[str, int]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(n),
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--model",
        args.model,
        "--k",
        str(args.k),
        "--patch-max",
        str(args.patch_max),
    ]
    if args.amp is not None:
        cmd.append("--amp" if args.amp else "--no-amp")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, int] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet34")
    ap.add_argument("--images", type=int, default=128, help="images per timed repetition")
    ap.add_argument("--batch", type=int, default=SweepConfig().batch_size)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--patch-max", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--layer-sets", default="default,all-conv")
    ap.add_argument("--memory-images", type=int, default=64, help="1x size for the memory check")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        child_memory(args)
        return
    device = select_device(args.device)
    torch.manual_seed(0)
    print(
        f"{args.model} on {device} ({torch.get_num_threads()} threads), batch {args.batch}, "
        f"{args.images} images x {args.reps} reps, amp={args.amp}, k={args.k}, patch_max={args.patch_max}"
    )
    print(f"{'layer set':<10} {'layers':>6} {'bare img/s':>11} {'sweep img/s':>12} {'sweep/bare':>11}")
    for layers in args.layer_sets.split(","):
        r = throughput(args, layers, device)
        print(f"{layers:<10} {r['layers']:>6} {r['bare']:>11.1f} {r['sweep']:>12.1f} {r['ratio']:>10.2f}x")
    if not args.no_memory:
        n = args.memory_images
        what = "cuda max_memory_allocated" if device.type == "cuda" else "ru_maxrss"
        print(f"peak memory ({what}, default layers, fresh process each):")
        runs = {size: memory(args, size) for size in (n, 4 * n)}
        for size, m in runs.items():
            grew = (m["peak"] - m["first_batch"]) / 2**20
            print(
                f"  {size:>5} images: {m['peak'] / 2**20:7.0f} MiB (after the first batch: {grew:+.0f} MiB)"
            )
        print(f"  ratio {4 * n} / {n} images: {runs[4 * n]['peak'] / runs[n]['peak']:.3f}")


if __name__ == "__main__":
    main()
