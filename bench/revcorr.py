"""White-noise reverse-correlation throughput (AWA + AWC of every channel of one layer) vs a bare forward
pass of the same images to that layer, side by side.

    .venv/bin/python bench/revcorr.py --threads 2                      # resnet18 layer2.0, CPU
    .venv/bin/python bench/revcorr.py --device cuda --images 8192 --batch 256 --layer layer3.0

Same model, images, batches and device for both modes; the modes run round-robin batch by batch and,
per batch, the best of `--rounds` timings counts (robust on a shared machine). Images are generated
once up front (generation is the same for both modes and reported on its own). The reducer holds
every channel of the layer at once (the analysis's `channels_per_unit` = all), with the analysis's
defaults (colour noise, RF box <= 16 px per side, 2 shuffles). Target: revcorr >= 0.5x the bare pass.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import Tensor

from rfcore.layers import capture, list_layers, response_module
from rfcore.models import get_model, model_meta
from rfcore.precision import autocast
from rfcore.receptive import receptive_fields
from rfcore.revcorr import RevcorrReducer, box_features, box_spec
from rfcore.stimuli import noise_batches, to_input
from rfcore.tuning import centre_response


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--layer", default="layer2.0")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-side", type=int, default=16)
    p.add_argument("--shuffles", type=int, default=2)
    p.add_argument("--luminance", action="store_true", help="luminance noise (default: colour)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = get_model(args.model).to(device)
    pre = model_meta(model).preprocessing
    size = pre.size
    info = {la.name: la for la in list_layers(model)}[args.layer]
    rf = receptive_fields(model)[args.layer]
    rfd = {"size": list(rf.size), "stride": list(rf.stride), "offset": list(rf.offset)}
    box = box_spec(rfd, info.shape, size, max_side=args.max_side, colour=not args.luminance)

    t0 = time.perf_counter()
    batches = list(
        noise_batches(
            args.images,
            size,
            args.batch,
            mean=pre.mean,
            sigma=0.2,
            colour=not args.luminance,
            seed=0,
            device=device,
        )
    )
    _sync(device)
    gen_s = time.perf_counter() - t0
    reducer = RevcorrReducer(info.channels, box.dim, shuffles=args.shuffles, device=device)

    def bare(i: int, images: Tensor, cap: capture) -> None:
        with autocast(device, args.precision):
            out = cap.run(to_input(images, pre.mean, pre.std))[module]
        centre_response(out).cpu()

    def revcorr(i: int, images: Tensor, cap: capture, r: int) -> None:
        with autocast(device, args.precision):
            out = cap.run(to_input(images, pre.mean, pre.std))[module]
        reducer.add(centre_response(out), box_features(images, pre.mean, box), r * len(batches) + i)

    best = {"bare": [float("inf")] * len(batches), "revcorr": [float("inf")] * len(batches)}
    module = response_module(model, args.layer).module
    with torch.no_grad(), capture(model, [module], stop_early=True) as cap:
        bare(0, batches[0], cap)  # warm-up
        for r in range(args.rounds):
            for i, images in enumerate(batches):
                for mode in ("bare", "revcorr"):
                    _sync(device)
                    t = time.perf_counter()
                    if mode == "bare":
                        bare(i, images, cap)
                    else:
                        revcorr(i, images, cap, r)
                    _sync(device)
                    best[mode][i] = min(best[mode][i], time.perf_counter() - t)
    t = time.perf_counter()
    reducer.result(k=4)
    _sync(device)
    result_s = time.perf_counter() - t
    rate = {m: args.images / sum(v) for m, v in best.items()}
    state_mb = (
        sum(v.numel() * v.element_size() for v in reducer.state_dict().values() if isinstance(v, Tensor))
        / 2**20
    )
    print(
        json.dumps(
            {
                "model": args.model,
                "layer": args.layer,
                "channels": info.channels,
                "box": [box.y1 - box.y0, box.x1 - box.x0],
                "factor": box.factor,
                "features": box.dim,
                "shuffles": args.shuffles,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "images": args.images,
                "batch": args.batch,
                "bare_img_s": round(rate["bare"], 1),
                "revcorr_img_s": round(rate["revcorr"], 1),
                "noise_generation_img_s": round(args.images / gen_s, 1),
                "result_eigh_s": round(result_s, 2),
                "reducer_state_mib": round(state_mb, 1),
            }
        )
    )
    print(f"revcorr / bare = {rate['revcorr'] / rate['bare']:.2f}x")


if __name__ == "__main__":
    main()
