"""Activation maximization and virtual filters (Kobayashi & Shouno 2020, §2.3, §3.2, §3.4) as a Prefect
subflow of `atlas` (`--analyses actmax`), and the `rfatlas actmax` quick-look command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from prefect import flow

import rfcore.actmax as am
from flows.lease import store_lease
from flows.runner import gpu_tasks
from rfcore.errors import ConfigMismatchError, StoreError
from rfcore.layers import list_layers, resolve_layers
from rfcore.models import get_model
from rfcore.pipeline import prepare_store
from rfcore.store import AtlasStore, redact
from rfcore.virtual import default_virtual_layers
from tasks.actmax import actmax_block_task, virtual_filter_task

#: The quick look writes into a sweep-less atlas over this one-image data set (nothing is swept).
QUICK_LOOK_DATA = "synthetic:1"


@flow(name="actmax")
def actmax_analysis(
    store_url: str,
    *,
    layers: list[str] | None = None,
    channels: str | None = None,
    objectives: Sequence[str] = am.OBJECTIVES,
    preset: str = "kobayashi2020",
    overrides: dict[str, Any] | None = None,
    block_size: int = 64,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Render every channel (or `channels`, e.g. '0-63') of `layers` (default: the atlas's layers) for
    each objective, one task per (layer, objective, channel block); done blocks are skipped. Then
    write the virtual filters of the model's default conv layers."""
    config = am.preset(preset, **(overrides or {}))
    store = AtlasStore.open(store_url, "r+")
    model = get_model(store.run["model"], weights=store.run.get("weights"))
    names = resolve_layers(model, layers) if layers else store.layer_names
    counts = {info.name: info.channels for info in list_layers(model)}
    futures, skipped = [], 0
    for layer in names:
        wanted = am.parse_channels(channels or "all", counts[layer])
        for objective in objectives:
            am.prepare_actmax(store, model, layer, objective, config=config, seed=seed, block_size=block_size)
            for block, chans in am.plan_blocks(wanted, block_size):
                if store.is_done(am.block_key(layer, objective, block)):
                    skipped += 1
                else:
                    with gpu_tasks(device):
                        futures.append(
                            actmax_block_task.submit(store_url, layer, objective, block, chans, device)
                        )
    virtual = [
        virtual_filter_task.submit(store_url, L, source) for L, source in default_virtual_layers(model)
    ]
    blocks = [f.result() for f in futures]
    return {
        "layers": names,
        "objectives": list(objectives),
        "preset": preset,
        "blocks_run": len(blocks),
        "blocks_skipped": skipped,
        "virtual_filters": [f.result() for f in virtual],
    }


def quick_look_store(url: str, model: str | None, weights: str | None, layer: str) -> AtlasStore:
    """The atlas at `url` if it holds `model`/`weights` (or any, when `model` is None), else a new
    sweep-less one there."""
    try:
        store = AtlasStore.open(url, "r+")
    except StoreError:
        if model is None:
            raise StoreError(
                f"{redact(url)} is no atlas yet: give --model (and --weights) to make one"
            ) from None
        return prepare_store(
            url,
            model_name=model,
            weights=weights,
            data_spec=QUICK_LOOK_DATA,
            layers=[layer],
            k=1,
            shard_size=1,
            batch_size=1,
        )
    if model is not None and (store.run["model"], store.run.get("weights")) != (model, weights):
        raise ConfigMismatchError(
            f"{redact(url)} holds {store.run['model']} (weights {store.run.get('weights')}), "
            f"not {model} (weights {weights}); use another --out"
        )
    return store


def _cmd_actmax(args: argparse.Namespace) -> int:
    quick_look_store(args.out, args.model, args.weights, args.layer)
    overrides: dict[str, Any] = {"steps": args.steps} if args.steps else {}
    if args.init:
        overrides["init"] = args.init
    with store_lease(args.out, "rfatlas actmax"):
        res = actmax_analysis(
            args.out,
            layers=[args.layer],
            channels=args.channels,
            objectives=args.objectives.split(","),
            preset=args.preset,
            overrides=overrides,
            block_size=args.block_size,
            device=args.device,
            seed=args.seed,
        )
    print(
        f"{redact(args.out)}: {args.layer} channels {args.channels} ({', '.join(res['objectives'])}, "
        f"preset {args.preset}): {res['blocks_run']} block(s) rendered, {res['blocks_skipped']} already done; "
        f"arrays under layers/{args.layer}/actmax/"
    )
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `rfatlas actmax` (quick look: render some channels of one layer into an atlas)."""
    p = subparsers.add_parser("actmax", help="activation maximization of a layer's channels (paper §3.4)")
    p.add_argument(
        "--model", default=None, help="model name (see `rfatlas models`); default: the --out atlas's"
    )
    p.add_argument("--weights", default=None, help="torchvision weights name or checkpoint path/URL")
    p.add_argument("--layer", required=True, help="layer name, e.g. layer3.0.conv2")
    p.add_argument("--channels", default="0-63", help="channels, e.g. 0-63, 3,5,9-11 or all")
    p.add_argument("--objectives", default="neuron,channel", help="comma-separated: neuron, channel")
    p.add_argument("--preset", default="kobayashi2020", choices=sorted(am.PRESETS))
    p.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    p.add_argument(
        "--init",
        choices=["zero", "random"],
        default=None,
        help="override the preset's start image (an untrained net with zero BN biases maps "
        "the zero image to all-zero activations, a stationary point: use random)",
    )
    p.add_argument("--block-size", type=int, default=64, help="channels per task (one batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, help="atlas URL (created if absent)")
    p.set_defaults(func=_cmd_actmax)
