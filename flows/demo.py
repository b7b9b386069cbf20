"""The `demo` flow: synthetic data → train `resnet10t` and `plainnet10t` → atlas of both (with every
analysis that exists) → one browsable site of both (`rfcore.site`) and a short account of what was found. Offline, < 5 min on 2 cores.

Every demo default lives in `DEMO` below.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from flows.atlas import atlas, parse_analyses
from flows.compare import TABLE_TITLE, compare
from flows.progress import ProgressEvent, emit
from flows.runner import gpu_tasks, make_task_runner, shared_runner
from rfcore.site import SiteWriter, atlas_slug
from tasks.train import train_model

DEMO: dict[str, Any] = {
    "models": ["resnet10t", "plainnet10t"],
    # rfcore.synthetic: distractors, occluders, 1/f textures; measured (4 epochs, 1 core each, idle
    # 2-core machine): resnet10t 85.0 %, plainnet10t 81.8 % on synthetic:512; 13 s per model; the
    # whole demo 261 s
    "train_data": "synthetic-train:2000",
    "val_data": "synthetic:512",  # the images the atlas sweeps (and the validation set)
    "recipe": "quick",
    "train_overrides": {"epochs": 4},
    "layers": "default",
    "k": 16,
    "shard_size": 128,  # 4 shards: enough to show the fan-out
    "analyses": "all",  # every analysis that exists in this installation
    # reverse correlation at a demo-sized sample (its default, 20,000 noise images, is for real runs)
    "analysis_options": {"revcorr": {"num_images": 4000, "max_side": 8}},
    "workers": 2,  # Dask worker processes (× 1 torch thread each on 2 cores)
    "seed": 0,
}


def check_demo_out(out: str) -> None:
    """The demo writes HTML reports into local folders: RfatlasError for a remote `out` (s3://...)."""
    from rfcore.errors import RfatlasError
    from rfcore.urls import is_local, redact

    if not is_local(out):
        raise RfatlasError(
            f"demo --out {redact(out)}: the demo writes its HTML reports into a local folder; give a "
            "local path (sweep into S3 with `rfatlas run --out s3://...`)"
        )


def _abs_url(out: str) -> str:
    return out if "://" in out else str(Path(out).expanduser().resolve())


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


@flow(
    name="demo", flow_run_name="demo", task_runner=make_task_runner(DEMO["workers"]), validate_parameters=True
)
def demo(
    out: str = "rfatlas-demo",
    models: list[str] = DEMO["models"],
    train_data: str = DEMO["train_data"],
    val_data: str = DEMO["val_data"],
    recipe: str = DEMO["recipe"],
    train_overrides: dict[str, Any] | None = DEMO["train_overrides"],
    layers: str | list[str] = DEMO["layers"],
    k: int = DEMO["k"],
    shard_size: int = DEMO["shard_size"],
    analyses: str | list[str] = DEMO["analyses"],
    analysis_options: dict[str, dict[str, Any]] | None = None,
    device: str = "auto",
    seed: int = DEMO["seed"],
) -> dict[str, Any]:
    """Train the tiny models (in parallel on the Dask workers), sweep each into its own atlas under
    `out`, write the site (`out/site/index.html`, with a comparison page); returns the findings."""
    log = get_run_logger()
    check_demo_out(out)
    base = _abs_url(out)
    names = parse_analyses(analyses)
    defaults = {name: opts for name, opts in DEMO["analysis_options"].items() if name in names}
    options = {**defaults, **(analysis_options or {})}
    if "://" not in base:
        Path(base).mkdir(parents=True, exist_ok=True)
    emit(ProgressEvent("train", "train", 0, len(models), 0.0, None))
    with gpu_tasks(device):
        trains = {
            m: train_model.submit(
                m,
                train_data,
                _join(base, "checkpoints", f"{m}.pt"),
                val_data=val_data,
                recipe=recipe,
                overrides=train_overrides,
                device=device,
                seed=seed,
            )
            for m in models
        }
    trained = {m: f.result() for m, f in trains.items()}
    emit(ProgressEvent("train", "train", len(models), len(models), 0.0, None, {"trained": trained}))
    results: dict[str, Any] = {"out": base, "models": {}}
    stores = {m: _join(base, f"{m}.zarr") for m in models}
    with SiteWriter(list(stores.values()), _join(base, "site"), workers=DEMO["workers"]) as site_writer:
        for m in models:
            results["models"][m] = _atlas_of(m, stores[m], trained[m], val_data, layers, k, shard_size,
                                             names, device, seed, options)  # fmt: skip
            site_writer.add(stores[m])  # its pages are written while the next model is analysed
            log.info("demo: %s done (%s)", m, stores[m])
        site = str(site_writer.finish()["index"])
    results["site"] = site
    for r in results["models"].values():
        r["report"] = _join(site.rpartition("/")[0], atlas_slug(r["store"]), "index.html")
    if "noise" in names:
        results["noise_table"] = compare([r["store"] for r in results["models"].values()])
    create_markdown_artifact(format_findings(results), key="demo-findings", description="rfatlas demo")
    return results


def _atlas_of(
    m: str,
    store_url: str,
    trained: dict[str, Any],
    val_data: str,
    layers: str | list[str],
    k: int,
    shard_size: int,
    names: list[str],
    device: str,
    seed: int,
    options: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Sweep and analyse the atlas of trained model `m` (the `atlas` subflow); its demo summary."""
    runner = shared_runner()
    sub = atlas.with_options(task_runner=runner) if runner is not None else atlas
    summary = sub(
        model=m, data=val_data, store_url=store_url, weights=trained["checkpoint_url"], layers=layers,
        k=k, shard_size=shard_size, analyses=names, device=device, seed=seed, analysis_options=options,
    )  # fmt: skip
    return {
        "val_accuracy": trained["val_accuracy"],
        "train_seconds": trained["seconds"],
        "checkpoint": trained["checkpoint_url"],
        "store": store_url,
        "report": None,  # set once the site is written
        "layers": summary["layers"],
        "channels": summary["channels"],
        "images": summary["num_images"],
        "skipped": summary["skipped"],
        "atlas_seconds": summary["wall_s"],
        "images_per_s": summary["images_per_s"],
        "notable": notable_units(store_url, val_data),
        "findings": analysis_findings(store_url, names[1:]),
        "cross_block": cross_block(store_url),
    }


def notable_units(store_url: str, data: str, n: int = 3) -> list[dict[str, Any]]:
    """Units of the deepest layer whose top-k images agree most on one class (class-selective units)."""
    from rfcore.atlas import open_atlas
    from tasks.runtime import cached_dataset

    a = open_atlas(store_url)
    layer = a.layers[-1]
    al = a.layer(layer)
    images = al.array("topk/image")
    maxima = al.array("max")
    ds = cached_dataset(data, int(a.run["image_size"]), a.run["preprocessing"].get("resize"))
    labels: dict[int, int] = {}
    rows = []
    for c in range(images.shape[0]):
        idx = [int(i) for i in images[c] if i >= 0]
        if not idx:
            continue
        for i in idx:
            if i not in labels:
                labels[i] = int(ds.get(i)[1])
        cls, count = collections.Counter(labels[i] for i in idx).most_common(1)[0]
        rows.append(
            {
                "layer": layer,
                "channel": c,
                "class": ds.class_names[cls] if 0 <= cls < len(ds.class_names) else str(cls),
                "agree": count,
                "k": len(idx),
                "max": float(maxima[c]),
            }
        )
    rows.sort(key=lambda r: (-r["agree"] / r["k"], -r["max"], r["channel"]))
    return rows[:n]


def cross_block(store_url: str) -> dict[str, float]:
    """§3.3: {stage: similarity of the same channel in consecutive blocks} (rfcore.similarity)."""
    from rfcore.atlas import open_atlas
    from rfcore.similarity import cross_block_similarity

    return cross_block_similarity(open_atlas(store_url))


def analysis_findings(store_url: str, names: list[str]) -> list[str]:
    """Each analysis's one-line findings (with their numbers) on the atlas, in run order."""
    from rfcore.analysis import get_analysis
    from rfcore.atlas import open_atlas

    atlas = open_atlas(store_url)
    return [line for name in names for line in get_analysis(name).findings(atlas)]


def format_findings(results: dict[str, Any]) -> str:
    """What `rfatlas demo` prints at the end."""
    lines = [f"rfatlas demo: results in {results['out']}"]
    for m, r in results["models"].items():
        acc = r["val_accuracy"]
        acc_s = f"{100 * acc:.1f}%" if isinstance(acc, float) else "n/a"
        lines.append("")
        lines.append(f"{m}: validation accuracy {acc_s} (trained in {r['train_seconds']:.0f} s)")
        lines.append(
            f"  atlas: {r['images']} images, {len(r['layers'])} layers ({', '.join(r['layers'])}), "
            f"{r['channels']} channels, {r['skipped']} skipped, {r['images_per_s']:.0f} images/s"
        )
        for u in r["notable"]:
            lines.append(
                f"  notable: {u['layer']} channel {u['channel']}: {u['agree']}/{u['k']} top images are "
                f"'{u['class']}' (max {u['max']:.2f})"
            )
        if r.get("cross_block"):
            parts = [f"{k} {v:+.2f}" for k, v in r["cross_block"].items()]
            lines.append(f"  same channel across blocks (§3.3, activation correlation): {', '.join(parts)}")
        lines += [f"  {line}" for line in r.get("findings", [])]
        lines.append(f"  store:  {r['store']}")
        lines.append(f"  report: {r['report']}")
    if results.get("site"):
        lines += [
            "",
            f"browse the atlases: {results['site']} (or: rfatlas serve {results['site'].rpartition('/')[0]})",
        ]
    if results.get("noise_table"):
        lines += ["", f"{TABLE_TITLE}:", results["noise_table"].rstrip()]
    return "\n".join(lines)
