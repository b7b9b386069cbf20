"""End-to-end speed of `rfatlas run`, what the user waits for, against a bare forward pass, in one run.

    .venv/bin/python bench/end_to_end.py                          # CPU, resnet34, default layers
    .venv/bin/python bench/end_to_end.py --layers all-conv
    .venv/bin/python bench/end_to_end.py --model resnet10t --sizes 32 --verbose-exit   # fixed cost of a small run
    .venv/bin/python bench/end_to_end.py --device cuda --sizes 1024,4096 --shard-size 512 --batch-size 128

What it measures (alternating the sides, medians over `--repeats`):

* bare: `model(normalize(images))` on in-memory uint8 batches of `--batch-size` (same model, device,
  autocast and torch threads as one Dask worker), images/s, in plain PyTorch; and once more in a
  fresh process that keeps freed memory as rfatlas's workers do (`rfcore.memory`), a faster forward
  pass that the second ratio is taken against;
* CLI: `rfatlas run` as a subprocess (new process, temporary Prefect API, local Dask cluster with
  `--workers`, synthetic data, every sweep result written), on two dataset sizes; marginal throughput
  = extra images / extra wall time, so start-up and exit cancel;
* a per-stage breakdown of the larger run, from the timing events the CLI writes when
  `RFATLAS_TIMING` names a file (`flows.progress.mark`): start-up (imports, input check, API,
  cluster), sweep (data wait, forward, reducers, writes, orchestration), merge + crop, exit.
  "forward" is the bare forward time of the images swept; "reducers" the rest of the compute.

The ratio (CLI marginal throughput ÷ bare forward throughput) is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bare_throughput(args: argparse.Namespace, threads: int, batches: int) -> float:
    """Images/s of the bare forward pass (one warm-up batch, then `batches` timed)."""
    import torch

    from rfcore.models import get_model, model_meta, select_device
    from rfcore.precision import autocast

    torch.set_num_threads(threads)
    device = select_device(args.device)
    model = get_model(args.model).to(device).eval()
    pre = model_meta(model).preprocessing
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, pre.size, pre.size), dtype=torch.uint8, generator=gen)
    images = images.to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(), autocast(device, None):
        model(pre.normalize(images))
        sync()
        t0 = time.perf_counter()
        for _ in range(batches):
            model(pre.normalize(images))
        sync()
        return batches * args.batch_size / (time.perf_counter() - t0)


def bare_retained(args: argparse.Namespace, threads: int) -> float:
    """`bare_throughput` in a fresh process that keeps freed memory as rfatlas's workers do
    (`rfcore.memory.retain_freed_memory`: glibc reuses the activation buffers instead of
    page-faulting them in again); mallopt cannot be undone, hence the subprocess."""
    code = (
        "import argparse, sys; sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r});"
        "from rfcore.memory import retain_freed_memory; retain_freed_memory();"
        "import end_to_end as e;"
        "print(e.bare_throughput(argparse.Namespace(**{ns!r}), {threads}, {batches}))"
    ).format(
        root=str(ROOT),
        bench=str(ROOT / "bench"),
        ns={"model": args.model, "device": args.device, "batch_size": args.batch_size},
        threads=threads,
        batches=args.bare_batches,
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def data_seconds_per_image(args: argparse.Namespace, n: int = 32) -> float:
    """CPU seconds to produce one image of the run's data (`synthetic:`: rendering it), measured
    in this process on images the runs do not share: on a machine whose cores the forward pass
    already fills, data costs compute time the bare side never pays."""
    from rfcore.data import open_dataset
    from rfcore.models import get_model, model_meta

    pre = model_meta(get_model(args.model)).preprocessing
    ds = open_dataset(f"synthetic:{10**6}", size=pre.size, resize=pre.resize)
    t0 = time.process_time()
    for i in range(n):
        ds.get(10**6 - 1 - i)
    return (time.process_time() - t0) / n


def cli_run(
    args: argparse.Namespace, n: int, tmp: Path, tag: str, verbose: bool = False, root: Path = ROOT
) -> dict[str, Any]:
    """One `rfatlas run` subprocess on `synthetic:n`; wall time, exit code and its timing events."""
    out = tmp / f"{tag}-{n}.zarr"
    timing = tmp / f"{tag}-{n}.jsonl"
    shutil.rmtree(out, ignore_errors=True)
    timing.unlink(missing_ok=True)
    env = {**os.environ, "RFATLAS_TIMING": str(timing), "PYTHONPATH": str(root)}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    cmd = [sys.executable, "-m", "flows.cli", *(["-v"] if verbose else []), "run", "--model", args.model,
           "--data", f"synthetic:{n}", "--out", str(out), "--layers", args.layers, "--k", str(args.k),
           "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size), "--device", args.device,
           "--workers", str(args.workers)]  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, dict[str, float]]] = []
    sampler = threading.Thread(target=_sample_cpu, args=(proc, samples), daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    t1 = time.time()
    sampler.join(2.0)
    if proc.returncode != 0:
        print(stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"rfatlas run failed ({proc.returncode}): {' '.join(cmd)}")
    events = [json.loads(line) for line in timing.read_text().splitlines()] if timing.exists() else []
    shutil.rmtree(out, ignore_errors=True)
    return {"n": n, "wall": t1 - t0, "launch": t0, "exit": t1, "events": events, "cpu": samples}


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sample_cpu(proc: subprocess.Popen[str], out: list[tuple[float, dict[str, float]]]) -> None:
    """CPU seconds of the CLI process ("flow") and of its API server child ("api"), twice a second
    (Linux /proc; nothing elsewhere)."""
    if not os.path.exists("/proc/self/stat"):
        return
    while proc.poll() is None:
        row: dict[str, float] = {}
        try:
            row["flow"] = _cpu_seconds(proc.pid)
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
            for kid in kids:
                with open(f"/proc/{kid}/cmdline", "rb") as f:
                    if b"uvicorn" in f.read():
                        row["api"] = _cpu_seconds(kid)
        except (OSError, ValueError, IndexError):
            pass
        out.append((time.time(), row))
        time.sleep(0.5)


def _cpu_share(run: dict[str, Any], start: float, end: float, key: str) -> float:
    """Average share of one core used by `key` between wall-clock times `start` and `end`."""
    pts = [(t, row[key]) for t, row in run.get("cpu", []) if key in row and start <= t <= end]
    if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
        return float("nan")
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


def breakdown(run: dict[str, Any], bare_ips: float, workers: int) -> dict[str, float]:
    """Seconds per stage of one CLI run, from its timing events (first event of each stage)."""
    t: dict[str, float] = {}
    summary: dict[str, Any] = {}
    for ev in run["events"]:
        t.setdefault(ev["stage"], ev["t"])
        if ev["stage"] == "flow_end":
            summary = ev.get("summary", {})
    launch, end = run["launch"], run["exit"]

    def span(a: str, b: str) -> float:
        return t[b] - t[a] if a in t and b in t else float("nan")

    stages = summary.get("stages", {})
    images = summary.get("images_swept", 0)
    sweep = span("sweep_start", "sweep_end")
    forward = images / bare_ips if bare_ips else float("nan")
    compute = stages.get("compute", float("nan"))
    in_tasks = stages.get("data", 0.0) + compute + stages.get("write_wait", 0.0) + stages.get("setup", 0.0)
    return {
        "start-up: imports": t.get("cli_start", float("nan")) - launch,
        "start-up: input check": span("cli_start", "inputs_checked"),
        "start-up: API wait": span("inputs_checked", "api_ready"),
        "start-up: flow + cluster": span("api_ready", "flow_start"),
        "start-up: prepare + lease": span("flow_start", "sweep_start"),
        "sweep (wall)": sweep,
        "  data wait": stages.get("data", float("nan")),
        "  forward (bare equiv.)": forward,
        "  reducers + capture": compute - forward,
        "  writes (background)": stages.get("write", float("nan")),
        "  writes on critical path": stages.get("write_wait", float("nan")),
        "  orchestration": sweep - in_tasks / max(1, workers),
        "  flow process, % of a core": 100
        * _cpu_share(run, t.get("sweep_start", 0), t.get("sweep_end", 0), "flow"),
        "  API server, % of a core": 100
        * _cpu_share(run, t.get("sweep_start", 0), t.get("sweep_end", 0), "api"),
        "merge + crop": span("sweep_end", "merge_end"),
        "  merge (in tasks)": summary.get("merge_s", float("nan")),
        "  crop (in tasks)": summary.get("crop_s", float("nan")),
        "flow end (summary)": span("merge_end", "flow_end"),
        "exit: after flow end": end - t["flow_end"] if "flow_end" in t else float("nan"),
        "total wall": run["wall"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet34")
    p.add_argument("--layers", default="default")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", default="128,384", help="two dataset sizes (one: fixed cost only)")
    p.add_argument("--repeats", type=int, default=1, help="alternating repetitions (medians)")
    p.add_argument("--bare-batches", type=int, default=3)
    p.add_argument("--events", action="store_true", help="also print the raw timing events")
    p.add_argument("--verbose-exit", action="store_true", help="also time the exit of a `-v` run")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--compare",
        default=None,
        help="another checkout (e.g. the code before a change): its CLI runs too, alternating",
    )
    args = p.parse_args(argv)

    from flows.runner import cpu_count

    sizes = [int(x) for x in args.sizes.split(",")]
    threads = max(1, cpu_count() // args.workers)
    tmp = Path(tempfile.mkdtemp(prefix="rfatlas-e2e-"))
    bare: list[float] = []
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    other: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    try:
        for r in range(args.repeats):
            order = sizes if r % 2 == 0 else sizes[::-1]
            bare.append(bare_throughput(args, threads, args.bare_batches))
            for n in order:
                runs[n].append(cli_run(args, n, tmp, f"r{r}"))
                print(f"run {n} images: {runs[n][-1]['wall']:.1f} s", file=sys.stderr, flush=True)
                if args.compare:
                    other[n].append(cli_run(args, n, tmp, f"c{r}", root=Path(args.compare).resolve()))
                    print(f"compare {n} images: {other[n][-1]['wall']:.1f} s", file=sys.stderr, flush=True)
            bare.append(bare_throughput(args, threads, args.bare_batches))
            print(f"bare: {bare[-2]:.1f}, {bare[-1]:.1f} img/s", file=sys.stderr, flush=True)
        verbose = cli_run(args, sizes[0], tmp, "v", verbose=True) if args.verbose_exit else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    bare_ips = statistics.median(bare)
    retained = [bare_retained(args, threads) for _ in range(2)]
    data_s = data_seconds_per_image(args)
    walls = {n: statistics.median(r["wall"] for r in runs[n]) for n in sizes}
    big = max(sizes)
    median_run = {n: sorted(runs[n], key=lambda r: r["wall"])[len(runs[n]) // 2] for n in sizes}
    last = median_run[big]
    per_size = {n: breakdown(median_run[n], bare_ips, args.workers) for n in sizes}
    rows = per_size[big]
    res: dict[str, Any] = {
        "args": vars(args),
        "bare_images_per_s": bare_ips,
        "walls": walls,
        "stages": per_size,
    }
    print(f"{args.model}, layers {args.layers}, k {args.k}, shard {args.shard_size}, batch {args.batch_size}, "
          f"--workers {args.workers}, {args.device}, {cpu_count()} cores, torch threads {threads}")  # fmt: skip
    print(f"bare forward: {bare_ips:.2f} images/s (median of {len(bare)})")
    retained_ips = statistics.median(retained)
    res["bare_retained_images_per_s"] = retained_ips
    print(f"bare forward keeping freed memory, as rfatlas's workers do: {retained_ips:.2f} images/s")
    ceiling = (1 / bare_ips) / (1 / bare_ips + data_s / threads) if threads else float("nan")
    res["data_ms_per_image"], res["data_ceiling"] = 1000 * data_s, ceiling
    print(f"data: {1000 * data_s:.1f} CPU-ms per image; with the forward pass on every core, the best "
          f"ratio this data allows is {ceiling:.2f}x")  # fmt: skip
    for n in sizes:
        each = ", ".join(f"{r['wall']:.1f}" for r in runs[n])
        print(f"rfatlas run synthetic:{n}: {walls[n]:.1f} s wall (runs: {each})")
    if args.events:
        print("timing events of that run (s after launch):")
        for ev in last["events"]:
            print(f"  {ev['t'] - last['launch']:8.2f}  {ev['stage']}  (pid {ev['pid']})")
        print(f"  {last['exit'] - last['launch']:8.2f}  process exit")
    small = min(sizes)
    extra = big - small
    header = "".join(f"{f'{n} img':>10}" for n in sorted(sizes))
    print(f"stages (s){' ' * 20}{header}" + (f"{'ms/extra img':>14}" if extra else ""))
    for key, value in rows.items():
        cells = "".join(f"{per_size[n][key]:10.2f}" for n in sorted(sizes))
        share = key.endswith("% of a core")
        delta = "" if not extra or share else f"{1000 * (value - per_size[small][key]) / extra:14.1f}"
        print(f"  {key:<28}{cells}{delta}")
    if verbose is not None:
        vrows = breakdown(verbose, bare_ips, args.workers)
        res["verbose_exit_s"] = vrows["exit: after flow end"]
        print(f"exit after flow end with -v: {vrows['exit: after flow end']:.2f} s")
    if args.compare:
        owalls = {n: statistics.median(r["wall"] for r in other[n]) for n in sizes}
        res["compare_walls"] = owalls
        for n in sizes:
            print(f"compare ({args.compare}) synthetic:{n}: {owalls[n]:.1f} s wall")
        if len(sizes) >= 2:
            om = (
                (big - small) / (owalls[big] - owalls[small]) if owalls[big] > owalls[small] else float("nan")
            )
            res["compare_marginal_images_per_s"] = om
            print(f"compare marginal throughput: {om:.2f} images/s = {om / bare_ips:.2f}x bare")
    if len(sizes) >= 2:
        marginal = (big - small) / (walls[big] - walls[small]) if walls[big] > walls[small] else float("nan")
        res["marginal_images_per_s"] = marginal
        res["ratio"] = marginal / bare_ips
        # each repeat on its own: its two runs against the bare passes measured around them
        paired = []
        for r in range(args.repeats):
            dt = runs[big][r]["wall"] - runs[small][r]["wall"]
            ips = (big - small) / dt if dt > 0 else float("nan")
            rep_bare = statistics.mean(bare[2 * r : 2 * r + 2])
            paired.append(ips / rep_bare)
            print(f"repeat {r + 1}: {ips:.2f} images/s against {rep_bare:.2f} bare = {ips / rep_bare:.2f}x")
        res["paired_ratios"] = paired
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    if len(sizes) >= 2:
        print(f"rfatlas run marginal throughput: {res['marginal_images_per_s']:.2f} images/s")
        strict = res["marginal_images_per_s"] / retained_ips
        res["ratio_retained"] = strict
        print(f"ratio to the bare forward pass keeping freed memory: {strict:.2f}x")
        print(f"ratio to the bare forward pass: {res['ratio']:.2f}x")
    else:
        print(f"fixed cost (wall of a {sizes[0]}-image run): {walls[sizes[0]]:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
