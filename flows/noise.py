"""Inactive channels and the noise-injection test (Kobayashi & Shouno 2020, §3.5, Table 1) as Prefect
subflows, the `compare` flow, and the `rfatlas inactive|noise|compare` commands."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.lease import store_lease
from flows.runner import gpu_tasks
from rfcore.errors import RfatlasError
from rfcore.inactive import default_layer
from rfcore.models import get_model
from rfcore.noise import CONDITIONS, check_conditions, compare_table
from rfcore.store import Atlas, AtlasStore
from tasks.noise import detect_inactive_task, noise_shard_task, noise_summary_task, prepare_noise_task

TABLE_TITLE = "Inactive channels and noise injection (Kobayashi & Shouno 2020, Table 1)"


def _layer(store: AtlasStore, layer: str | None) -> str:
    """`layer`, else the model's first max-pool; must be a layer of the atlas."""
    name = layer or default_layer(get_model(store.run["model"]))
    Atlas(store).layer(name)  # AtlasLayerNotFoundError with a suggestion if not swept
    return name


@flow(name="inactive")
def inactive_analysis(store_url: str, *, layer: str | None = None, threshold: float = 0.0) -> dict[str, Any]:
    """Detect the inactive channels of `layer` (default: the first max-pool; "all": every swept
    layer) from the sweep's maxima. Returns {threshold, inactive: {layer: [channel, ...]}}."""
    store = AtlasStore.open(store_url, "r")
    names = store.layer_names if layer == "all" else [_layer(store, layer)]
    found = {name: detect_inactive_task(store_url, name, threshold)["inactive"] for name in names}
    return {"threshold": threshold, "inactive": found}


@flow(name="noise")
def noise_analysis(
    store_url: str,
    *,
    layer: str | None = None,
    conditions: Sequence[str] = CONDITIONS,
    sigma: float = 1.0,
    seed: int = 0,
    threshold: float = 0.0,
    device: str = "auto",
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Noise-injection test at `layer`: fan out (shard × condition) tasks, skip finished ones, summarise."""
    conds = check_conditions(conditions)
    store = AtlasStore.open(store_url, "r+")
    name = _layer(store, layer)
    pending = prepare_noise_task(store_url, name, conds, sigma, seed, threshold)
    n_shards = store.num_shards
    with gpu_tasks(device):
        futures = [noise_shard_task.submit(store_url, name, c, s, n_shards, device) for c, s in pending]
    failed = []
    for (cond, shard), fut in zip(pending, futures, strict=True):
        try:
            fut.result()
        except Exception as e:
            failed.append(f"{cond} shard {shard}: {e}")
    if failed:
        raise RfatlasError(
            f"{len(failed)} of {len(futures)} noise task(s) failed (rerun to resume; finished ones are kept): "
            + "; ".join(failed[:3])
        )
    return noise_summary_task(store_url, name, n_boot=n_boot, seed=seed)


@flow(name="compare")
def compare(urls: list[str]) -> str:
    """Table 1 for the atlases as markdown; also recorded as the `noise-compare` artifact."""
    table = compare_table(urls)
    create_markdown_artifact(
        markdown=f"## {TABLE_TITLE}\n\n{table}", key="noise-compare", description=TABLE_TITLE
    )
    return table


def _cmd_inactive(args: argparse.Namespace) -> int:
    with store_lease(args.url, "rfatlas inactive"):
        res = inactive_analysis(args.url, layer=args.layer, threshold=args.threshold)
    for name, channels in res["inactive"].items():
        print(f"{name}: {len(channels)} inactive channel(s) {channels}")
    return 0


def _cmd_noise(args: argparse.Namespace) -> int:
    with store_lease(args.url, "rfatlas noise"):
        noise_analysis(
            args.url,
            layer=args.layer,
            conditions=args.conditions.split(","),
            sigma=args.sigma,
            seed=args.seed,
            threshold=args.threshold,
            device=args.device,
        )
    print(compare_table([args.url]), end="")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    print(compare_table(args.urls) if args.no_artifact else compare(list(args.urls)), end="")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `rfatlas inactive`, `rfatlas noise` and `rfatlas compare` (handlers return the exit code)."""
    p = subparsers.add_parser("inactive", help="detect inactive channels of a swept layer (paper §3.5)")
    p.add_argument("url", help="atlas URL")
    p.add_argument("--layer", default=None, help="layer, or all (default: the model's first max-pool)")
    p.add_argument("--threshold", type=float, default=0.0, help="inactive when max activation <= this")
    p.set_defaults(func=_cmd_inactive)

    p = subparsers.add_parser("noise", help="noise-injection test into inactive channels (paper Table 1)")
    p.add_argument("url", help="atlas URL")
    p.add_argument("--layer", default=None, help="layer (default: the model's first max-pool)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help="comma-separated subset of conditions")
    p.add_argument("--sigma", type=float, default=1.0, help="noise scale: eps = max(x, 0), x ~ N(0, sigma^2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.0, help="inactive when max activation <= this")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=_cmd_noise)

    p = subparsers.add_parser("compare", help="print Table 1 (inactive channels, ΔL, ΔL_rnd) for atlases")
    p.add_argument("urls", nargs="+", metavar="URL", help="atlas URLs with noise results")
    p.add_argument(
        "--no-artifact", action="store_true", help="print only; skip the Prefect markdown artifact"
    )
    p.set_defaults(func=_cmd_compare)
