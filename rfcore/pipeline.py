"""Storage-facing sweep steps (no Prefect): prepare the atlas, sweep shards, merge layers, crop patches.

Every step is idempotent and resumable through the store's completion markers:
`sweep/shard-NNNN`, `merge/<layer>`, `crop/<layer>`. Shards are contiguous index ranges whose size
is a multiple of the batch size, so any sharding sees the same batches and merging the per-shard
reducer states (`partial/*`, one row per shard) gives the same bits as a single pass.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from rfcore.data import (
    BadImageError,
    ImageDataset,
    SkippedImage,
    check_data_matches,
    iter_batches,
    open_dataset,
    shard_ranges,
)
from rfcore.errors import StoreError
from rfcore.models import check_model_matches, get_model, model_meta
from rfcore.precision import amp_mode
from rfcore.receptive import RField
from rfcore.schema import LayerAttrs, RunAttrs, spec, sweep_shard_key
from rfcore.store import AtlasStore
from rfcore.sweep import (
    STATE_KEYS,
    LayerReducer,
    PatchGeometry,
    SweepRunner,
    crop_topk_patches,
    plan_layers,
)
from rfcore.urls import redact, refuse_credentials

DEFAULT_SHARD_SIZE = 1024
_CHANNEL_CHUNK = 16  # channels per chunk of mean_stimulus (topk/patch: one channel per chunk)


WEIGHTS_DIGEST = "{weights_digest}"


def store_url_for(url: str, weights_digest: str | None) -> str:
    """`url` with `{weights_digest}` replaced by the checkpoint's digest: one atlas per checkpoint
    contents (a nightly sweep of `latest.pt` makes a new atlas when the file changed, and resumes
    the one it has when not). StoreError when the weights are no checkpoint file."""
    if WEIGHTS_DIGEST not in url:
        return url
    if weights_digest is None:
        raise StoreError(
            f"store URL {redact(url)} names {WEIGHTS_DIGEST}, but the weights are no checkpoint file"
        )
    return url.replace(WEIGHTS_DIGEST, weights_digest)


def prepare_store(
    url: str,
    *,
    model_name: str,
    weights: str | None,
    data_spec: str,
    layers: str | Sequence[str] = "default",
    k: int = 16,
    patch_max: int = 64,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 64,
    seed: int = 0,
    precision: bool | str | None = "auto",
) -> AtlasStore:
    """Create (or reopen, if the run identity matches) the atlas of a sweep; its `url` is the one
    `store_url_for` makes. `shard_size` is rounded up to a multiple of `batch_size`. `precision`
    (`rfcore.precision` mode, part of the run identity): 'auto' runs the sweep in bf16 on CUDA,
    fp32 on CPUs; 'off' is fp32 everywhere."""
    if k < 1 or patch_max < 1 or shard_size < 1 or batch_size < 1:
        raise StoreError(
            f"bad sweep options k={k} patch_max={patch_max} shard_size={shard_size} batch_size={batch_size}"
        )
    if weights:
        refuse_credentials(weights, "weights")
    refuse_credentials(data_spec, "data")
    model = get_model(model_name, weights=weights, seed=seed)
    meta = model_meta(model)
    url = store_url_for(url, meta.weights_digest)
    pre = meta.preprocessing
    dataset = open_dataset(data_spec, size=pre.size, resize=pre.resize)
    plans = plan_layers(model, layers, patch_max)
    shard_size = -(-shard_size // batch_size) * batch_size
    run = RunAttrs(
        model=model_name,
        weights=weights,
        weights_digest=meta.weights_digest,
        weights_version=meta.weights_version,
        data_fingerprint=dataset.fingerprint,
        num_classes=meta.num_classes,
        dataset=data_spec,
        num_images=len(dataset),
        image_size=pre.size,
        preprocessing=dataclasses.asdict(pre),
        config={
            "k": k,
            "patch_max": patch_max,
            "shard_size": shard_size,
            "batch_size": batch_size,
            "layers": [p.name for p in plans],
            "seed": seed,
            "precision": amp_mode(precision),
        },
    )
    layer_attrs = {
        p.name: LayerAttrs(
            kind=p.kind,
            channels=p.channels,
            shape=p.shape,
            rf={"size": list(p.rf.size), "stride": list(p.rf.stride), "offset": list(p.rf.offset)},
            patch={"factor": p.geometry.factor, "size": p.geometry.size, "first": list(p.geometry.first)},
            response=p.response,
        )
        for p in plans
    }
    store = AtlasStore.create(
        url, run=run, layers=layer_attrs, num_images=len(dataset), shard_size=shard_size, k=k
    )
    for p in plans:  # the filters of swept convs (rfcore.panels: Fig. 3b, 5a, 7a)
        module = model.get_submodule(p.name)
        if isinstance(module, nn.Conv2d):
            w = module.weight.detach().float().cpu().numpy()
            store.require_array(spec("layers/{layer}/weight"), w.shape, w.shape, layer=p.name)[...] = w
    image_arrays(store)
    if store.root.attrs.get("classes") != list(dataset.class_names):
        store.root.attrs["classes"] = list(dataset.class_names)
    return store


def image_arrays(store: AtlasStore) -> tuple[Any, Any]:
    """The root `images/label` and `images/path` arrays (created on first use; one chunk per shard,
    so shards write their rows without races)."""
    n, chunk = int(store.run["num_images"]), int(store.run["config"]["shard_size"])
    label = store.require_array(spec("images/label"), (n,), (chunk,))
    path = store.require_array(spec("images/path"), (n,), (chunk,))
    return label, path


def layer_geometry(store: AtlasStore, layer: str) -> tuple[PatchGeometry, int, tuple[int, int]]:
    """(patch geometry, channels, feature-map shape) of a layer, from its attrs."""
    attrs = LayerAttrs.from_dict(store.layer_group(layer).attrs.asdict())
    rf = RField(
        size=(int(attrs.rf["size"][0]), int(attrs.rf["size"][1])),
        stride=(int(attrs.rf["stride"][0]), int(attrs.rf["stride"][1])),
        offset=(float(attrs.rf["offset"][0]), float(attrs.rf["offset"][1])),
    )
    size = int(store.run["image_size"])
    first = (int(attrs.patch["first"][0]), int(attrs.patch["first"][1]))
    geo = PatchGeometry(int(attrs.patch["factor"]), int(attrs.patch["size"]), first, rf.stride, (size, size))
    return geo, attrs.channels, attrs.shape


def _partial_arrays(store: AtlasStore, layer: str, geo: PatchGeometry, channels: int) -> dict[str, Any]:
    n, k, p = store.num_shards, int(store.run["config"]["k"]), geo.size
    shapes = {
        "topk_value": (n, channels, k),
        "topk_image": (n, channels, k),
        "topk_y": (n, channels, k),
        "topk_x": (n, channels, k),
        "stimulus_sum": (n, channels, 3, p, p),
        "positive_count": (n, channels),
        "max": (n, channels),
        "sum_fixed": (n, channels),
        "zero_count": (n, channels),
        "position_count": (n,),
        "pixel_count": (n, channels, p, p),
        "centre_sum": (n, channels, 3, p, p),
        "centre_count": (n, channels),
        "centre_pixel_count": (n, channels, p, p),
    }
    return {
        key: store.require_array(spec(f"partial/{key}"), shape, (1, *shape[1:]), layer=layer)
        for key, shape in shapes.items()
    }


def _read(store: AtlasStore, layer: str, path: str, where: Any = Ellipsis) -> np.ndarray:
    node = store.layer_group(layer)[path]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"layer {layer} of {store.url} has a group, not an array, at {path}")
    return np.asarray(node[where])


def _skipped_in(store: AtlasStore, layer: str, rows: range, dataset: ImageDataset) -> list[dict[str, Any]]:
    """Images of a finished shard that were skipped: NaN activation rows, re-read for the reason."""
    values = _read(store, layer, "activation", np.s_[rows.start : rows.stop, :1])[:, 0]
    out = []
    for i in np.flatnonzero(np.isnan(values)):
        index = rows.start + int(i)
        try:
            dataset.get(index)
        except BadImageError as e:
            out.append({"index": index, "path": e.path, "reason": e.reason})
    return out


def sweep_shard(
    store_url: str,
    shard_id: int,
    *,
    model: nn.Module,
    dataset: ImageDataset,
    device: str | torch.device = "auto",
    amp: bool | str | None = None,
    num_workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Sweep one shard: activation rows and `partial/*` rows of every layer, then its marker.

    `amp`: None runs at the atlas's recorded precision (run identity); another mode is an error.
    Returns {shard, images, skipped: [{index, path, reason}], seconds, cached}; the caller records
    `skipped` in the root attrs (`AtlasStore.add_skipped`, one writer). `on_batch(n)` reports progress.
    """
    t0 = time.perf_counter()
    store = AtlasStore.open(store_url, "r+")
    cfg = store.run["config"]
    recorded = cfg.get("precision", "auto")
    if amp is not None and amp_mode(amp) != recorded:
        raise StoreError(
            f"the atlas records precision {recorded!r}, not {amp_mode(amp)!r}; "
            "the precision is part of the run identity"
        )
    amp = recorded
    layers: list[str] = list(cfg["layers"])
    shards = shard_ranges(int(store.run["num_images"]), int(cfg["shard_size"]))
    if not 0 <= shard_id < len(shards):
        raise StoreError(f"shard {shard_id} out of range: the atlas has {len(shards)} shards")
    rows = shards[shard_id]
    check_model_matches(model, store.run)  # a checkpoint overwritten since the atlas was made
    check_data_matches(dataset, store.run)
    if len(dataset) != int(store.run["num_images"]):
        raise StoreError(
            f"dataset has {len(dataset)} images but the atlas was made for {store.run['num_images']}"
        )
    if store.is_done(sweep_shard_key(shard_id)):
        if on_batch is not None:
            on_batch(len(rows))
        return {
            "shard": shard_id,
            "images": 0,
            "skipped": _skipped_in(store, layers[0], rows, dataset),
            "seconds": 0.0,
            "cached": True,
        }
    geos = {name: layer_geometry(store, name) for name in layers}
    runner = SweepRunner(
        model,
        {n: g for n, (g, _, _) in geos.items()},
        {n: c for n, (_, c, _) in geos.items()},
        k=int(cfg["k"]),
        device=device,
        amp=amp,
    )
    precision = _check_precision(store, runner)
    act = {n: np.full((len(rows), c), np.nan, np.float32) for n, (_, c, _) in geos.items()}
    skipped: list[dict[str, Any]] = []
    labels = np.full(len(rows), -1, np.int64)
    images = 0
    pin = runner.device.type == "cuda"
    for batch in iter_batches(dataset, rows, int(cfg["batch_size"]), num_workers=num_workers, pin_memory=pin):
        skipped += [{"index": s.index, "path": s.path, "reason": s.reason} for s in batch.skipped]
        maxima = runner.step(batch.images, batch.indices)
        local = batch.indices.numpy() - rows.start
        for name, m in maxima.items():
            act[name][local] = m.numpy()
        labels[local] = batch.labels.numpy()
        images += int(batch.indices.numel())
        if on_batch is not None:
            on_batch(int(batch.indices.numel()) + len(batch.skipped))
    n = int(store.run["num_images"])
    for name, (geo, channels, _) in geos.items():
        arr = store.require_array(
            spec("activation"), (n, channels), (int(cfg["shard_size"]), channels), layer=name
        )
        arr[rows.start : rows.stop] = act[name]
        if store.is_done(f"merge/{name}"):
            continue  # already merged: its partials are gone for good
        state = runner.reducers[name].state_dict()
        for key, parr in _partial_arrays(store, name, geo, channels).items():
            parr[shard_id] = state[key]
    label_arr, path_arr = image_arrays(store)
    label_arr[rows.start : rows.stop] = labels
    path_arr[rows.start : rows.stop] = np.array([dataset.describe(i) for i in rows], dtype="T")
    nonfinite = {name: idx for name, idx in runner.nonfinite.items() if idx}
    info: dict[str, Any] = {"precision": precision, **({"nonfinite": nonfinite} if nonfinite else {})}
    store.mark_done(sweep_shard_key(shard_id), info)
    seconds = time.perf_counter() - t0
    return {"shard": shard_id, "images": images, "skipped": skipped, "seconds": seconds, "cached": False}


def merge_layer(store_url: str, layer: str) -> dict[str, Any]:
    """Merge every shard's partial state of `layer` (in shard order) into the final arrays; removes
    the partials and marks `merge/<layer>`. StoreError if a shard is not swept yet."""
    t0 = time.perf_counter()
    store = AtlasStore.open(store_url, "r+")
    if store.is_done(f"merge/{layer}"):
        store.remove("partial", layer=layer)  # in case an earlier run stopped right after its marker
        return {"layer": layer, "seconds": 0.0, "cached": True}
    missing = [s for s in range(store.num_shards) if not store.is_done(sweep_shard_key(s))]
    if missing:
        raise StoreError(
            f"cannot merge layer {layer}: shard(s) {', '.join(map(str, missing[:8]))} not swept yet"
        )
    geo, channels, _ = layer_geometry(store, layer)
    k = int(store.run["config"]["k"])
    parts = _partial_arrays(store, layer, geo, channels)
    total = LayerReducer(channels, geo, k=k)
    for s in range(store.num_shards):
        total.merge(LayerReducer.from_state_dict({key: parts[key][s] for key in STATE_KEYS}, geo))
    res = total.result()
    value = np.where(res.topk_image < 0, np.float32(np.nan), res.topk_value).astype(np.float32)
    p = geo.size
    cc = min(_CHANNEL_CHUNK, channels)
    outputs: dict[str, tuple[np.ndarray, tuple[int, ...]]] = {
        "topk/value": (value, (channels, k)),
        "topk/image": (res.topk_image, (channels, k)),
        "topk/y": (res.topk_y, (channels, k)),
        "topk/x": (res.topk_x, (channels, k)),
        "mean_stimulus": (res.mean_stimulus, (cc, 3, p, p)),
        "positive_count": (res.positive_count, (channels,)),
        "mean_stimulus_centre": (res.mean_stimulus_centre, (cc, 3, p, p)),
        "positive_count_centre": (res.positive_count_centre, (channels,)),
        "max": (res.max, (channels,)),
        "mean": (res.mean, (channels,)),
        "zero_fraction": (res.zero_fraction, (channels,)),
    }
    for path, (data, chunks) in outputs.items():
        store.require_array(spec(path), data.shape, chunks, layer=layer)[...] = data
    store.set_layer_attrs(layer, **_nonfinite_attrs(store, layer))
    store.mark_done(f"merge/{layer}")
    store.remove("partial", layer=layer)
    return {"layer": layer, "seconds": time.perf_counter() - t0, "cached": False}


def _check_precision(store: AtlasStore, runner: SweepRunner) -> str:
    """The precision this shard runs in (float32, bfloat16, float16); StoreError when the shards
    already swept ran in another one (a resume on another kind of device would mix them)."""
    from rfcore.precision import autocast_dtype

    precision = str(autocast_dtype(runner.device, runner.amp) or torch.float32).removeprefix("torch.")
    done = sorted(store.done_keys("sweep"))
    before = ((store.marker(done[0]) or {}).get("info") or {}).get("precision") if done else None
    if before is not None and before != precision:
        raise StoreError(
            f"atlas {redact(store.url)} was swept in {before} ({done[0]}), but this shard would run in "
            f"{precision} on {runner.device}; resume on the same kind of device or use another --out"
        )
    return precision


def _nonfinite_attrs(store: AtlasStore, layer: str) -> dict[str, Any]:
    """From the shards' markers: images whose activations in `layer` held NaN/inf (kept out of every
    statistic; their activation rows are -inf) and the precision of the sweep:
    {nonfinite_images, nonfinite_examples, precision}."""
    found: list[int] = []
    precisions: set[str] = set()
    for s in range(store.num_shards):
        info = (store.marker(sweep_shard_key(s)) or {}).get("info") or {}
        found += [int(i) for i in info.get("nonfinite", {}).get(layer, [])]
        precisions |= {str(info["precision"])} if "precision" in info else set()
    if len(precisions) > 1:
        raise StoreError(
            f"the shards of {redact(store.url)} were swept in different precisions ({', '.join(sorted(precisions))}); "
            "use another --out"
        )
    precision = {"precision": precisions.pop()} if precisions else {}
    return {"nonfinite_images": len(found), "nonfinite_examples": sorted(found)[:10], **precision}


def crop_patches(store_url: str, layer: str, *, dataset: ImageDataset) -> dict[str, Any]:
    """Write `topk/patch` of a merged layer (re-reads only the winning images); marks `crop/<layer>`
    and sets the layer's `complete` attr."""
    t0 = time.perf_counter()
    store = AtlasStore.open(store_url, "r+")
    if store.is_done(f"crop/{layer}"):
        return {"layer": layer, "images": 0, "seconds": 0.0, "cached": True}
    if not store.is_done(f"merge/{layer}"):
        raise StoreError(f"cannot crop patches of layer {layer}: it is not merged yet")
    geo, _, _ = layer_geometry(store, layer)
    image = _read(store, layer, "topk/image")
    patches = crop_topk_patches(
        dataset, geo, image, _read(store, layer, "topk/y"), _read(store, layer, "topk/x")
    )
    k, p = image.shape[1], geo.size
    arr = store.require_array(spec("topk/patch"), patches.shape, (1, k, 3, p, p), layer=layer)
    arr[...] = patches
    store.set_layer_attrs(layer, complete=True)
    store.mark_done(f"crop/{layer}")
    images = len(np.unique(image[image >= 0]))
    return {"layer": layer, "images": images, "seconds": time.perf_counter() - t0, "cached": False}


def run_sweep(
    url: str,
    *,
    model_name: str,
    weights: str | None = None,
    data_spec: str,
    layers: str | Sequence[str] = "default",
    k: int = 16,
    patch_max: int = 64,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    amp: bool | str | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole sweep in one process: prepare, every shard, merge and crop every layer.
    Returns {url, images, skipped, seconds}."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    store = prepare_store(
        url,
        model_name=model_name,
        weights=weights,
        data_spec=data_spec,
        layers=layers,
        k=k,
        patch_max=patch_max,
        shard_size=shard_size,
        batch_size=batch_size,
        seed=seed,
        precision="auto" if amp is None else amp,
    )
    url = store.url
    model = get_model(model_name, weights=weights, seed=seed)
    pre = model_meta(model).preprocessing
    dataset = open_dataset(data_spec, size=pre.size, resize=pre.resize)
    skipped: list[dict[str, Any]] = []
    images = 0
    with tqdm(total=len(dataset), unit="img", desc="sweep", disable=not progress) as bar:
        for shard in range(store.num_shards):
            out = sweep_shard(
                url,
                shard,
                model=model,
                dataset=dataset,
                device=device,
                amp=amp,
                num_workers=num_workers,
                on_batch=bar.update,
            )
            skipped += out["skipped"]
            images += out["images"]
    store.add_skipped([SkippedImage(**s) for s in skipped])
    for layer in store.run["config"]["layers"]:
        merge_layer(url, layer)
        crop_patches(url, layer, dataset=dataset)
    return {"url": url, "images": images, "skipped": len(skipped), "seconds": time.perf_counter() - t0}
