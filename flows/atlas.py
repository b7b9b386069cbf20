"""The `atlas` flow: fan sweep shards out over the Dask cluster, merge per layer, crop patches, then run
the selected analyses as subflows on the same cluster.

Resume/idempotence live in the store: each shard writes its data, then its completion marker; a rerun
sweeps only the shards without a marker (a half-written shard is simply redone; marked ones return at
once with their skipped files), and merge/crop
steps skip layers already marked. The flow holds the store's lease while it runs, so a second run on
the same store refuses (`StoreLockedError`); the lease expires if this process dies.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
import time
from collections.abc import Sequence
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed
from prefect.logging import get_run_logger

from flows.analysis import analysis
from flows.failures import TaskFailedError
from flows.lease import hold_lease, lease_owner
from flows.monitoring import record_flow_run
from flows.progress import ProgressEvent, SweepProgress, emit, fmt_duration, mark
from flows.runner import gpu_tasks, make_task_runner, shared_runner
from rfcore.analysis import get_analysis, list_analyses, option_fields, options_config, parse_list
from rfcore.data import SkippedImage, check_run_labels
from rfcore.errors import RfatlasError
from rfcore.models import select_device
from rfcore.pipeline import DEFAULT_SHARD_SIZE
from rfcore.store import AtlasStore, redact
from tasks import atlas as T


def needs_labels(names: Sequence[str]) -> bool:
    """Whether any of the analyses compares the model's output with the data's labels (checked
    before the sweep starts: `rfcore.data.check_run_labels`)."""
    return any(getattr(get_analysis(n), "uses_labels", False) for n in names if n != "sweep")


def parse_analyses(spec: str | Sequence[str] | None) -> list[str]:
    """`"sweep,inactive"` / a list / `"all"` (every registered analysis) → names in run order, `sweep`
    (always included) first. RfatlasError for an unknown one, with a close match."""
    known = ["sweep", *list_analyses()]
    items = parse_list(spec) or ["sweep"]
    if "all" in items:
        return known
    for name in items:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RfatlasError(f"unknown analysis {name!r}{hint} (known: {', '.join(known)}, all)")
    return [name for name in known if name in items or name == "sweep"]


def resolve_options(
    names: Sequence[str], given: dict[str, dict[str, Any]] | None, seed: int
) -> dict[str, dict[str, Any]]:
    """The options of each analysis in `names`, validated (AnalysisError before anything runs); an
    analysis with a `seed` option takes the run's seed unless given. Unknown analyses refused."""
    given = dict(given or {})
    stray = sorted(set(given) - set(names))
    if stray:
        raise RfatlasError(
            f"options given for {', '.join(stray)}, which this run does not include (--analyses)"
        )
    out = {}
    for name in names:
        a = get_analysis(name)
        values = dict(given.get(name, {}))
        if "seed" in {f.name for f, _, _ in option_fields(a.Options)}:
            values.setdefault("seed", seed)
        out[name] = options_config(a.options(values))
    return out


def check_device(device: str, *, here: bool = True) -> str:
    """Validate `--device`; with `here`, also that this machine can use it (not when the tasks run
    on an existing Dask cluster, whose workers may have GPUs this machine lacks)."""
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise RfatlasError(f"bad --device {device!r}; expected auto, cpu, cuda or cuda:N")
    if not here:
        return device
    try:
        select_device(device)
    except RfatlasError:
        raise
    except Exception as e:
        raise RfatlasError(f"--device {device}: {e}") from None
    return device


def check_inputs(
    *,
    model: str,
    data: str,
    store_url: str,
    weights: str | None = None,
    layers: str | Sequence[str] = "default",
    k: int = 16,
    shard_size: int = DEFAULT_SHARD_SIZE,
    analyses: str | Sequence[str] | None = "sweep",
    device: str = "auto",
    seed: int = 0,
    batch_size: int = 64,
    patch_max: int = 64,
    options: dict[str, dict[str, Any]] | None = None,
    remote: bool = False,
) -> dict[str, Any]:
    """Validate every input of an atlas run without Prefect or Dask (the CLI calls this first, so bad
    input fails in a second with one line): model, weights, layers, data, device (on this machine
    unless the work runs on a `remote` cluster), analyses, and the store (reachable; same run identity
    if it exists; not leased by a live run). Creates the store's skeleton, exactly as the flow would.
    Returns the run plan."""
    check_device(device, here=not remote)
    names = parse_analyses(analyses)
    resolve_options(names[1:], options, seed)
    if k < 1 or shard_size < 1 or batch_size < 1 or patch_max < 1:
        raise RfatlasError(
            f"--k, --shard-size, --batch-size and --patch-max must be >= 1 (got {k}, {shard_size}, {batch_size}, {patch_max})"
        )
    plan = T.prepare_store.fn(
        store_url, model=model, weights=weights, data=data, layers=layers, k=k,
        shard_size=shard_size, batch_size=batch_size, patch_max=patch_max, seed=seed,
    )  # fmt: skip
    store = AtlasStore.open(plan["store_url"], "r+")
    if needs_labels(names):
        check_run_labels(store.run)  # label -1 / >= classes would fail only after the sweep
    with store.lease(lease_owner() + " (input check)", ttl_s=10.0):
        pass
    plan["analyses"] = names
    return plan


def _summary_markdown(s: dict[str, Any]) -> str:
    url = s["store_url"]
    lines = [
        f"# rfatlas: {s['model']} on {s['data']}",
        "",
        "| | |",
        "|---|---|",
        f"| images swept | {s['images_swept']} of {s['num_images']} ({s['images_resumed']} from an earlier run) |",
        f"| skipped files | {s['skipped']} |",
        f"| layers | {len(s['layers'])}: {', '.join(s['layers'])} |",
        f"| channels | {s['channels']} |",
        f"| shards | {s['num_shards']} × {s['shard_size']} images ({s['shards_run']} run now) |",
        f"| wall time | {fmt_duration(s['wall_s'])} ({s['wall_s']:.1f} s) |",
        f"| throughput | {s['images_per_s']:.1f} images/s |",
        f"| analyses | {', '.join(s['analyses'])} |",
        f"| store | `{url}` |",
        "",
        "Open it:",
        "",
        "```",
        f"rfatlas ls {url}",
        f"rfatlas verify {url}",
        f"python -c \"import rfcore; a = rfcore.open_atlas('{url}'); print(a.layers)\"",
        "```",
    ]
    if s.get("analysis_results"):
        lines += ["", "## Analyses", ""]
        for name, res in s["analysis_results"].items():
            lines.append(f"- **{name}**: {_short(res)}")
    return "\n".join(lines)


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@flow(
    name="atlas",
    flow_run_name="atlas-{model}-{data}",
    task_runner=make_task_runner(),
    validate_parameters=True,
)
def atlas(
    model: str,
    data: str,
    store_url: str,
    weights: str | None = None,
    layers: str | list[str] = "default",
    k: int = 16,
    shard_size: int = DEFAULT_SHARD_SIZE,
    analyses: str | list[str] = "sweep",
    device: str = "auto",
    seed: int = 0,
    batch_size: int = 64,
    patch_max: int = 64,
    analysis_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Preferred stimuli of every unit of `model` over `data`, into the Zarr atlas at `store_url`.

    Returns a small summary (images, layers, channels, wall time, throughput, store URL)."""
    log = get_run_logger()
    t0 = time.perf_counter()
    mark("flow_start")
    names = parse_analyses(analyses)
    options = resolve_options(names[1:], analysis_options, seed)
    check_device(device, here=not _external_cluster(_current_runner()))
    plan = T.prepare_store(
        store_url, model=model, weights=weights, data=data, layers=layers, k=k,
        shard_size=shard_size, batch_size=batch_size, patch_max=patch_max, seed=seed,
    )  # fmt: skip
    store_url = plan["store_url"]  # `{weights_digest}` filled in
    store = AtlasStore.open(store_url, "r+")
    if needs_labels(names):
        check_run_labels(store.run)
    label = f"atlas-{model}-{data}"
    safe_url = redact(store_url)
    with hold_lease(store):
        record_flow_run(store)  # the site links each atlas to the run that made it
        n, total = plan["num_shards"], plan["num_images"]
        pending = store.pending_shards()
        sizes = [min(plan["shard_size"], total - s * plan["shard_size"]) for s in range(n)]
        resumed = sum(sizes[s] for s in range(n) if s not in pending)
        log.info(
            "%s: %d/%d shards to sweep (%d images already done) into %s",
            label,
            len(pending),
            n,
            resumed,
            safe_url,
        )
        progress = SweepProgress(label, total, already=resumed)
        log.info("task runner: %s", _describe_runner(_current_runner()))
        common = dict(
            model=model, weights=weights, data=data, image_size=plan["image_size"],
            resize=plan["resize"], device=device, seed=seed,
        )  # fmt: skip
        t_sweep = time.perf_counter()
        mark("sweep_start")
        # Every shard is submitted: finished ones return at once (cached) with their skipped images,
        # so a resumed run still records the skipped files of shards an earlier run swept. Shards go
        # in contiguous groups, one task each (a pipeline on the worker: decoding ahead, each shard
        # written while the next computes, one state row and marker per group), one task per worker
        # when there is one, else about 2 per worker; each finished shard is announced as a Dask
        # event, so progress moves shard by shard.
        workers = _worker_count(_current_runner())
        groups = _shard_groups(pending, workers) + _shard_groups([s for s in range(n) if s not in pending], 1)
        reported: set[int] = set()
        lock = threading.Lock()

        def shard_done(shard: int) -> None:  # from the progress thread or this one, once per shard
            with lock:
                if shard in reported:
                    return
                reported.add(shard)
                progress.update(sizes[shard], shard=shard)

        topic, stop_progress = _progress_events(_current_runner(), shard_done)
        with gpu_tasks(device):
            futures = [
                T.sweep_shards.submit(store_url, g, n, first=g[0], last=g[-1], progress_topic=topic, **common)
                for g in groups
            ]
        mark("sweep_submitted", tasks=len(futures))
        failed: list[BaseException] = []
        swept = 0
        compute_s = 0.0
        stages: dict[str, float] = {}
        shard_results: list[dict[str, Any]] = []
        skipped: dict[int, SkippedImage] = {}
        for fut in as_completed(futures):
            try:
                outs = fut.result()
            except Exception as e:
                failed.append(e)
                continue
            for out in outs:
                shard_results.append(
                    {k_: out[k_] for k_ in ("shard", "images", "seconds", "cached", "worker")}
                )
                for sk in out["skipped"]:
                    skipped[int(sk["index"])] = SkippedImage(
                        int(sk["index"]), str(sk["path"]), str(sk["reason"])
                    )
                if not out["cached"]:
                    swept += out["images"]
                    compute_s += out["seconds"]
                    for key, value in out.get("timings", {}).items():
                        stages[key] = stages.get(key, 0.0) + float(value)
                    shard_done(int(out["shard"]))
        stop_progress()
        sweep_wall = time.perf_counter() - t_sweep
        mark("sweep_end", images=swept)
        if failed:
            bad_input = [e for e in failed if isinstance(e, RfatlasError)]
            if bad_input:
                raise bad_input[0]
            raise TaskFailedError(
                f"{len(failed)} of {len(futures)} shard task(s) failed (rerun to resume; finished shards are kept): "
                + "; ".join(f"{type(e).__name__}: {e}" for e in failed[:3])
            )
        store.add_skipped([skipped[i] for i in sorted(skipped)])  # one writer: this flow
        emit(ProgressEvent("merge", label, 0, len(plan["layers"]), 0.0, None))
        t_merge = time.perf_counter()
        # Merge and crop in one task per group of layers (as many groups as workers): merges of a
        # group run concurrently, its crops read each winning image once for all its layers.
        crop_data = dict(data=data, image_size=plan["image_size"], resize=plan["resize"])
        merge_futures = [
            T.merge_crop.submit(store_url, group, first=group[0], last=group[-1], **crop_data)
            for group in _layer_groups(plan["layers"], workers)
        ]
        merge_results = [f.result() for f in merge_futures]
        merge_wall = time.perf_counter() - t_merge
        mark("merge_end")
        channels = 0
        for L in plan["layers"]:
            channels += int(store.layer_group(L).attrs["channels"])
        analysis_results: dict[str, Any] = {}
        for name in names[1:]:
            emit(ProgressEvent("analysis", label, 0, 1, 0.0, None, {"analysis": name}))
            log.info("analysis %s on %s", name, safe_url)
            runner_for_sub = shared_runner()
            sub = (
                analysis.with_options(task_runner=runner_for_sub) if runner_for_sub is not None else analysis
            )
            analysis_results[name] = _small(sub(name, store_url, options[name], device))
    wall = time.perf_counter() - t0
    summary = {
        "model": model,
        "data": data,
        "store_url": safe_url,
        "num_images": total,
        "images_swept": swept,
        "images_resumed": resumed,
        "skipped": len(skipped),
        "layers": plan["layers"],
        "channels": channels,
        "num_shards": n,
        "shard_size": plan["shard_size"],
        "shards_run": len(pending),
        "analyses": names,
        "analysis_results": analysis_results,
        "wall_s": wall,
        "sweep_wall_s": sweep_wall,
        "shard_compute_s": compute_s,
        "merge_crop_wall_s": merge_wall,
        "merge_s": sum(r["merge_seconds"] for r in merge_results),  # in the tasks, summed over groups
        "crop_s": sum(r["crop_seconds"] for r in merge_results),
        "stages": stages,
        "images_per_s": swept / sweep_wall if sweep_wall > 0 and swept else 0.0,
    }
    try:
        create_markdown_artifact(
            _summary_markdown(summary), key=_artifact_key(f"atlas-{model}"), description=f"{label}: summary"
        )
    except Exception as e:  # the artifact is a convenience; the store is the result
        log.warning("could not write the summary artifact: %s", type(e).__name__)
    emit(ProgressEvent("done", label, total, total, summary["images_per_s"], 0.0, {"summary": summary}))
    log.info("%s: done in %.1f s, %s", label, wall, safe_url)
    mark("flow_end", summary=summary)
    return summary


def _progress_events(runner: Any, on_shard: Any) -> tuple[str | None, Any]:
    """Per-shard progress from the workers: (Dask event topic the sweep tasks announce finished
    shards on, stop function). A thread of this flow calls `on_shard(shard)` as events arrive (a
    blocking queue, no polling). (None, no-op) when the tasks do not run on Dask."""
    try:
        from prefect_dask import DaskTaskRunner

        if not isinstance(runner, DaskTaskRunner):
            return None, lambda: None
        client = runner.client
    except Exception:
        return None, lambda: None
    import queue
    import uuid

    topic = f"rfatlas-progress-{uuid.uuid4().hex}"
    events: queue.Queue[int | None] = queue.Queue()

    def handler(event: Any) -> None:  # on the Dask client's event loop: hand over, return at once
        with contextlib.suppress(Exception):
            events.put(int(event[1]["shard"]))

    def consume() -> None:
        while (shard := events.get()) is not None:
            with contextlib.suppress(Exception):
                on_shard(shard)

    try:
        client.subscribe_topic(topic, handler)
    except Exception:
        return None, lambda: None
    thread = threading.Thread(target=consume, name="rfatlas-progress", daemon=True)
    thread.start()

    def stop() -> None:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(topic)
        events.put(None)
        thread.join(5.0)

    return topic, stop


def _shard_groups(shards: list[int], workers: int) -> list[list[int]]:
    """`shards` cut into contiguous runs, one per worker when there is one, else about two per worker
    (at least one shard each): long pipelines (each shard written while the next computes, the
    reducer state once per run or checkpoint), and some load balancing where there are several."""
    if not shards:
        return []
    per_worker = 1 if workers <= 1 else 2
    size = max(1, -(-len(shards) // (per_worker * max(1, workers))))
    groups: list[list[int]] = []
    for s in shards:
        if groups and len(groups[-1]) < size and groups[-1][-1] == s - 1:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def _layer_groups(layers: list[str], workers: int) -> list[list[str]]:
    """Layers dealt round-robin into `workers` groups (none empty), each group in layer order."""
    n = max(1, min(workers, len(layers)))
    return [layers[i::n] for i in range(n) if layers[i::n]]


def _worker_count(runner: Any) -> int:
    """Dask workers of the flow's cluster (1 when unknown)."""
    try:
        from prefect_dask import DaskTaskRunner

        if isinstance(runner, DaskTaskRunner):
            return max(1, len(runner.client.scheduler_info().get("workers", {})))
    except Exception:
        pass
    return 1


def _current_runner() -> Any:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.task_runner if ctx else None


def _external_cluster(runner: Any) -> bool:
    """True when tasks run on a Dask cluster this flow connected to by address (not one it started)."""
    from prefect_dask import DaskTaskRunner

    return isinstance(runner, DaskTaskRunner) and runner._cluster is None


def _describe_runner(runner: Any) -> str:
    try:
        from prefect_dask import DaskTaskRunner

        if isinstance(runner, DaskTaskRunner):
            info = runner.client.scheduler_info()
            workers = info.get("workers", {})
            threads = sum(int(w.get("nthreads", 0)) for w in workers.values())
            return f"Dask cluster {info.get('address')} with {len(workers)} workers ({threads} threads)"
    except Exception:
        pass
    return type(runner).__name__


def _artifact_key(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:60] or "atlas"


def _small(value: Any) -> Any:
    """Subflow results as plain JSON-able values for the summary."""
    try:
        import json

        return json.loads(json.dumps(value, default=str))
    except Exception:
        return repr(value)
