"""Orchestration overhead of the atlas: Prefect + Dask cost per shard task vs the shard's compute time,
and sweep throughput with 1 vs 2 Dask workers, in one run.

    .venv/bin/python bench/orchestration.py [--images 4096] [--shard-size 1024] [--model resnet10t] [--json OUT]

For each worker count: a fresh LocalCluster (processes × 1 thread, torch threads = cores ÷ workers), then
(a) 32 no-op Prefect tasks through the DaskTaskRunner: the pure orchestration cost per task (submit →
state tracked → result), and (b) the `atlas` flow over `--images` synthetic images at `--shard-size`:
per-shard compute time (measured inside the task), sweep wall time, throughput. Overhead % =
per-task orchestration cost ÷ mean shard compute time (target < 5% at the default shard size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")

from prefect import flow, task


@task(name="noop", persist_result=False)
def noop(i: int) -> int:
    return i


@flow(name="bench-noop")
def noop_flow(n: int) -> list[float]:
    t0 = time.perf_counter()
    futs = [noop.submit(i) for i in range(n)]
    for f in futs:
        f.result()
    return [time.perf_counter() - t0]


def bench_workers(workers: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.atlas import atlas
    from flows.runner import cluster_kwargs

    kw = cluster_kwargs(workers, device="cpu")
    with LocalCluster(**kw) as cluster:
        runner = lambda: DaskTaskRunner(address=cluster.scheduler_address)  # noqa: E731
        noop_flow.with_options(task_runner=runner())(4)  # warm-up: workers import prefect
        wall = noop_flow.with_options(task_runner=runner())(args.noop_tasks)[0]
        per_task_ms = 1000.0 * wall * workers / args.noop_tasks  # worker-time per task when saturated
        url = str(tmp / f"atlas-{workers}w.zarr")
        # Warm the workers' caches (model, dataset) on a throw-away store so the timed run is steady state.
        atlas.with_options(task_runner=runner())(
            model=args.model, data=f"synthetic:{args.batch_size * workers}", store_url=str(tmp / f"warm-{workers}.zarr"),
            layers=args.layers, shard_size=args.batch_size, batch_size=args.batch_size, device="cpu",
        )  # fmt: skip
        t0 = time.perf_counter()
        summary = atlas.with_options(task_runner=runner())(
            model=args.model, data=f"synthetic:{args.images}", store_url=url, layers=args.layers,
            shard_size=args.shard_size, batch_size=args.batch_size, device="cpu",
        )  # fmt: skip
        flow_wall = time.perf_counter() - t0
    shards = summary["num_shards"]
    shard_s = summary["shard_compute_s"] / max(1, shards)
    ideal = summary["shard_compute_s"] / workers
    return {
        "workers": workers,
        "torch_threads": int(kw["env"]["RFATLAS_TORCH_THREADS"]),
        "noop_task_ms": per_task_ms,
        "shards": shards,
        "shard_compute_s": shard_s,
        "overhead_pct": 100.0 * (per_task_ms / 1000.0) / shard_s if shard_s > 0 else float("nan"),
        "sweep_wall_s": summary["sweep_wall_s"],
        "sweep_vs_ideal_pct": 100.0 * (summary["sweep_wall_s"] - ideal) / ideal
        if ideal > 0
        else float("nan"),
        "flow_wall_s": flow_wall,
        "images_per_s": summary["images_per_s"],
    }


def main(argv: list[str] | None = None) -> int:
    from rfcore.pipeline import DEFAULT_SHARD_SIZE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--layers", default="default")
    p.add_argument("--images", type=int, default=4 * DEFAULT_SHARD_SIZE)
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--noop-tasks", type=int, default=32)
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from flows.runner import prefect_api

    tmp = Path(tempfile.mkdtemp(prefix="rfatlas-bench-"))
    rows = []
    try:
        with prefect_api():
            for w in [int(x) for x in args.workers.split(",")]:
                rows.append(bench_workers(w, args, tmp))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"model {args.model}, {args.images} synthetic images, shard size {args.shard_size}, batch {args.batch_size}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    print(
        f"{'workers':>7} {'noop task ms':>12} {'shard s':>8} {'overhead %':>10} {'sweep s':>8} {'vs ideal %':>10} {'img/s':>8}"
    )
    for r in rows:
        print(f"{r['workers']:>7} {r['noop_task_ms']:>12.1f} {r['shard_compute_s']:>8.2f} {r['overhead_pct']:>10.2f} "
              f"{r['sweep_wall_s']:>8.2f} {r['sweep_vs_ideal_pct']:>10.1f} {r['images_per_s']:>8.1f}")  # fmt: skip
    if len(rows) >= 2:
        speedup = (
            rows[-1]["images_per_s"] / rows[0]["images_per_s"] if rows[0]["images_per_s"] else float("nan")
        )
        print(f"throughput {rows[-1]['workers']} vs {rows[0]['workers']} workers: ×{speedup:.2f}")
    worst = max(r["overhead_pct"] for r in rows)
    print(
        f"orchestration overhead at shard size {args.shard_size}: {worst:.2f}% of shard compute (target < 5%)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
