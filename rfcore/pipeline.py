"""Storage-facing sweep steps (no Prefect): prepare the atlas, sweep shards, merge layers, crop patches.

Every step is idempotent and resumable through the store's completion markers:
`sweep/shard-NNNN` (one per group of shards swept together), `merge/<layer>`, `crop/<layer>`.
Shards are contiguous index ranges whose size is a multiple of the batch size, so any sharding sees
the same batches and merging the groups' reducer states (`partial/*`, one row per group, at its
first shard) gives the same bits as a single pass.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from rfcore.atlas import image_coords
from rfcore.data import (
    BadImageError,
    ImageDataset,
    SkippedImage,
    _index_chunks,
    check_data_matches,
    iter_chunk_batches,
    open_dataset,
    shard_ranges,
)
from rfcore.errors import StoreError
from rfcore.models import check_model_matches, get_model, model_meta
from rfcore.precision import amp_mode
from rfcore.receptive import RField
from rfcore.schema import LayerAttrs, RunAttrs, spec, sweep_shard_key
from rfcore.store import AtlasStore, attrs_of, lease_tokens
from rfcore.sweep import (
    LayerReducer,
    PatchGeometry,
    SweepRunner,
    crop_topk_patches,
    cut_patches,
    pack_state,
    packed_words,
    plan_layers,
    pool_uint8,
    unpack_state,
)
from rfcore.urls import redact, refuse_credentials

DEFAULT_SHARD_SIZE = 1024
_CHANNEL_CHUNK = 16  # channels per chunk of mean_stimulus and topk/patch (the site reads blocks)


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


def write_coords(store: AtlasStore, layer: str, per_image: dict[str, np.ndarray]) -> None:
    """Coordinate arrays of a layer (`rfcore.schema.COORD_ARRAYS`) so that `xarray.open_zarr` of
    `layers/<layer>` or its `topk` group labels image, channel and k, with label, class_name and
    path along image (listed in the `coordinates` attr of `activation`, the CF convention)."""
    n, k = int(store.run["num_images"]), int(store.run["config"]["k"])
    channels = int(attrs_of(store.layer_group(layer))["channels"])
    chunk = min(max(n, 1), 1 << 16)
    values: dict[str, np.ndarray] = {
        "image": np.arange(n, dtype=np.int64),
        "channel": np.arange(channels, dtype=np.int64),
        "topk/channel": np.arange(channels, dtype=np.int64),
        "topk/k": np.arange(k, dtype=np.int64),
        **per_image,
    }
    for path, data in values.items():
        arr = store.require_array(
            spec(path), data.shape, (chunk,) if data.shape[0] == n else data.shape, layer=layer
        )
        arr[...] = data
    activation = store.layer_group(layer)["activation"]
    activation.attrs["coordinates"] = " ".join(p for p in ("label", "class_name", "path") if p in per_image)


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


def _state_array(store: AtlasStore, layer: str, words: int) -> Any:
    """`partial/state` of a layer: one row of `words` int64 per group of shards (at its first)."""
    return store.require_array(spec("partial/state"), (store.num_shards, words), (1, words), layer=layer)


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


class _ShardWriter:
    """Writes finished shards from one background thread, in order, while the next shard computes.

    Each submission's writes (a shard's activation rows; a group's `partial/state` rows: one write
    per array) run concurrently in a small thread pool (Zarr encodes and stores chunks outside the
    GIL), after everything submitted before; a group's marker only after all of them. `close()`
    waits for everything and raises the first error."""

    def __init__(self, store: AtlasStore, lease_tokens: Sequence[str] = (), threads: int = 8) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self._tokens = list(lease_tokens)  # read in the caller's thread: the writer's has no run context
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rfatlas-write")
        self._serial = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rfatlas-shard-writer")
        self._pending: list[Any] = []
        self._arrays: dict[tuple[str, str], Any] = {}
        self.seconds = 0.0  # time spent writing (in the background)

    def _array(self, layer: str, key: str, make: Callable[[], Any]) -> Any:
        arr = self._arrays.get((layer, key))
        if arr is None:
            arr = self._arrays[(layer, key)] = make()
        return arr

    def submit(
        self,
        jobs: list[Callable[[], None]],
        marker: tuple[str, Mapping[str, Any]] | None = None,
        done: Callable[[], None] | None = None,
    ) -> Any:
        """Run `jobs` concurrently, after everything submitted before; then write `marker`
        (key, info), if any, and call `done`."""

        def write() -> None:
            t0 = time.perf_counter()
            for f in [self._pool.submit(job) for job in jobs]:
                f.result()
            if marker is not None:
                self.store.check_lease(self._tokens)  # a run that lost the lease marks nothing done
                self.store.mark_done(*marker)
            self.seconds += time.perf_counter() - t0
            try:
                if done is not None:
                    done()
            except Exception:  # a progress callback never fails a written shard
                logging.getLogger("rfatlas.pipeline").warning("progress callback failed", exc_info=True)

        fut = self._serial.submit(write)
        self._pending.append(fut)
        return fut

    def close(self, wait_errors: bool = True) -> None:
        try:
            for fut in self._pending:
                if wait_errors:
                    fut.result()
                else:
                    fut.exception()
        finally:
            self._serial.shutdown(wait=True)
            self._pool.shutdown(wait=True)


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
    """Sweep one shard: activation rows and a `partial/*` row of every layer, then its marker.

    `amp`: None runs at the atlas's recorded precision (run identity); another mode is an error.
    Returns {shard, images, skipped: [{index, path, reason}], seconds, cached}; the caller records
    `skipped` in the root attrs (`AtlasStore.add_skipped`, one writer). `on_batch(n)` reports progress.
    """
    return sweep_shards(
        store_url, [shard_id], model=model, dataset=dataset, device=device, amp=amp,
        num_workers=num_workers, on_batch=on_batch,
    )[0]  # fmt: skip


def sweep_shards(
    store_url: str,
    shard_ids: Sequence[int],
    *,
    model: nn.Module,
    dataset: ImageDataset,
    device: str | torch.device = "auto",
    amp: bool | str | None = None,
    num_workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
    prefetch: int = 2,
    checkpoint_seconds: float = 300.0,
) -> list[dict[str, Any]]:
    """Sweep several shards back to back, as one pipeline: on an accelerator the next batches are
    decoded in a background thread (across shard boundaries) while the model runs (on a CPU, by all
    cores between forward passes), and each finished shard's
    activation rows are written (one write per array) from a background thread while the next one
    computes.

    The reducers run on across shards: the shards swept in (about) `checkpoint_seconds` form a
    group whose merged state is written once, as `partial/*` row L (L its first shard), followed by
    one marker `sweep/shard-L` listing the group's shards (`AtlasStore.swept_shards`). Merging is
    exact in any grouping, so the results are the same bits as shard by shard, with a fraction of
    the state writes and reads; a killed run redoes at most the unmarked groups.

    Returns one dict per shard, in `shard_ids` order: {shard, images, skipped, seconds, cached,
    timings: {data, compute, write}}; `on_shard(result)` is called as each shard's rows are written
    (from the writer thread), `on_batch(n)` per batch."""
    t_start = time.perf_counter()
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
    num_images = int(store.run["num_images"])
    shards = shard_ranges(num_images, int(cfg["shard_size"]))
    for shard_id in shard_ids:
        if not 0 <= shard_id < len(shards):
            raise StoreError(f"shard {shard_id} out of range: the atlas has {len(shards)} shards")
    check_model_matches(model, store.run)  # a checkpoint overwritten since the atlas was made
    check_data_matches(dataset, store.run)
    if len(dataset) != num_images:
        raise StoreError(f"dataset has {len(dataset)} images but the atlas was made for {num_images}")
    done = store.swept_shards()
    results: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for shard_id in shard_ids:
        rows = shards[shard_id]
        if shard_id in done:
            if on_batch is not None:
                on_batch(len(rows))
            results[shard_id] = {
                "shard": shard_id,
                "images": 0,
                "skipped": _skipped_in(store, layers[0], rows, dataset),
                "seconds": 0.0,
                "cached": True,
            }
            if on_shard is not None:
                on_shard(results[shard_id])
        elif shard_id not in todo:
            todo.append(shard_id)
    if not todo:
        return [results[s] for s in shard_ids]

    k, batch_size, shard_size = int(cfg["k"]), int(cfg["batch_size"]), int(cfg["shard_size"])
    geos = {name: layer_geometry(store, name) for name in layers}
    merged = {key.partition("/")[2] for key in store.done_keys("merge")}
    chunk_lists = [_index_chunks(shards[s], batch_size) for s in todo]

    def new_runner() -> SweepRunner:  # fresh reducers per group
        return SweepRunner(
            model,
            {n: g for n, (g, _, _) in geos.items()},
            {n: c for n, (_, c, _) in geos.items()},
            k=k,
            device=device,
            amp=amp,
        )

    runner = new_runner()
    precision = _check_precision(store, runner)
    writer = _ShardWriter(store, lease_tokens())  # the run's lease, checked before every marker
    # On a CPU the forward pass fills every core: a thread decoding ahead only preempts it (a 2.9 s
    # resnet34 batch took 4.6 s beside one), so each batch is decoded by all cores when it is due.
    cpu = runner.device.type == "cpu" and num_workers == 0
    stream = iter_chunk_batches(
        dataset,
        [c for chunks in chunk_lists for c in chunks],
        num_workers=num_workers,
        pin_memory=runner.device.type == "cuda",
        prefetch=0 if cpu else prefetch,
        decode_threads=torch.get_num_threads() if cpu else 1,
    )
    ok = False
    t_first = time.perf_counter()
    group: list[int] = []
    t_group = t_first
    try:
        for i, (shard_id, chunks) in enumerate(zip(todo, chunk_lists, strict=True)):
            t0 = time.perf_counter()
            rows = shards[shard_id]
            if not group:
                t_group = t0
            group.append(shard_id)
            act = {n: np.full((len(rows), c), np.nan, np.float32) for n, (_, c, _) in geos.items()}
            labels = np.full(len(rows), -1, np.int64)
            skipped: list[dict[str, Any]] = []
            images = 0
            t_data = t_compute = 0.0
            for _ in chunks:
                t1 = time.perf_counter()
                batch = next(stream)
                t2 = time.perf_counter()
                skipped += [{"index": s.index, "path": s.path, "reason": s.reason} for s in batch.skipped]
                maxima = runner.step(batch.images, batch.indices)
                local = batch.indices.numpy() - rows.start
                for name, m in maxima.items():
                    act[name][local] = m.numpy()
                labels[local] = batch.labels.numpy()
                images += int(batch.indices.numel())
                t_data += t2 - t1
                t_compute += time.perf_counter() - t2
                if on_batch is not None:
                    on_batch(int(batch.indices.numel()) + len(batch.skipped))
            jobs = _row_jobs(store, writer, rows, geos, act, shard_size, num_images)
            paths = np.array([dataset.describe(i) for i in rows], dtype="T")
            jobs.append(functools.partial(_write_images, store, rows, labels, paths))
            result = {
                "shard": shard_id,
                "images": images,
                "skipped": skipped,
                "seconds": time.perf_counter() - t0,
                "cached": False,
                "timings": {"data": t_data, "compute": t_compute},
            }
            results[shard_id] = result

            def finished(result: dict[str, Any] = result) -> None:
                if on_shard is not None:
                    on_shard(result)

            writer.submit(jobs, done=finished)
            if i == len(todo) - 1 or time.perf_counter() - t_group >= checkpoint_seconds:
                states = {name: runner.reducers[name].state_dict() for name in layers if name not in merged}
                nonfinite = {name: idx for name, idx in runner.nonfinite.items() if idx}
                info: dict[str, Any] = {
                    "precision": precision,
                    "shards": group,
                    **({"nonfinite": nonfinite} if nonfinite else {}),
                }
                state_jobs = _state_jobs(store, writer, group[0], states)
                writer.submit(state_jobs, marker=(sweep_shard_key(group[0]), info))
                group = []
                if i < len(todo) - 1:
                    runner = new_runner()
        ok = True
    finally:
        stream.close()
        t_wait = time.perf_counter()
        writer.close(wait_errors=ok)
        wait = time.perf_counter() - t_wait
    for shard_id in todo:  # the write of the last shard is on the critical path: count it there
        results[shard_id]["timings"]["write"] = writer.seconds / len(todo)
    results[todo[-1]]["seconds"] += wait
    results[todo[-1]]["timings"]["write_wait"] = wait
    results[todo[0]]["timings"]["setup"] = t_first - t_start
    return [results[s] for s in shard_ids]


def _write_images(store: AtlasStore, rows: range, labels: np.ndarray, paths: np.ndarray) -> None:
    """A shard's rows of `images/label` and `images/path`."""
    label_arr, path_arr = image_arrays(store)
    label_arr[rows.start : rows.stop] = labels
    path_arr[rows.start : rows.stop] = paths


def _row_jobs(
    store: AtlasStore,
    writer: _ShardWriter,
    rows: range,
    geos: dict[str, tuple[PatchGeometry, int, tuple[int, int]]],
    act: dict[str, np.ndarray],
    shard_size: int,
    num_images: int,
) -> list[Callable[[], None]]:
    """One write job per layer: the shard's rows of its `activation` (arrays opened once per sweep,
    cached by the writer)."""
    jobs: list[Callable[[], None]] = []
    for name, (_, channels, _) in geos.items():

        def write_act(name: str = name, channels: int = channels) -> None:
            arr = writer._array(
                name,
                "activation",
                lambda: store.require_array(
                    spec("activation"), (num_images, channels), (shard_size, channels), layer=name
                ),
            )
            arr[rows.start : rows.stop] = act[name]

        jobs.append(write_act)
    return jobs


def _state_jobs(
    store: AtlasStore, writer: _ShardWriter, row: int, states: dict[str, dict[str, np.ndarray]]
) -> list[Callable[[], None]]:
    """One write job per layer: its packed reducer state (`pack_state`) as row `row` of `partial/state`."""
    jobs: list[Callable[[], None]] = []
    for name, state in states.items():

        def write_state(name: str = name, state: dict[str, np.ndarray] = state) -> None:
            words = pack_state(state)
            arr = writer._array(name, "partial/state", lambda: _state_array(store, name, len(words)))
            arr[row] = words

        jobs.append(write_state)
    return jobs


def merge_layer(store_url: str, layer: str) -> dict[str, Any]:
    """Merge every shard's partial state of `layer` (in shard order) into the final arrays; removes
    the partials and marks `merge/<layer>`. StoreError if a shard is not swept yet."""
    t0 = time.perf_counter()
    store = AtlasStore.open(store_url, "r+")
    if store.is_done(f"merge/{layer}"):
        store.remove("partial", layer=layer)  # in case an earlier run stopped right after its marker
        return {"layer": layer, "seconds": 0.0, "cached": True}
    swept = store.swept_shards()
    missing = [s for s in range(store.num_shards) if s not in swept]
    if missing:
        raise StoreError(
            f"cannot merge layer {layer}: shard(s) {', '.join(map(str, missing[:8]))} not swept yet"
        )
    geo, channels, _ = layer_geometry(store, layer)
    k = int(store.run["config"]["k"])
    layout = LayerReducer.state_layout(channels, geo, k)
    state = _state_array(store, layer, packed_words(layout))
    total: LayerReducer | None = None
    for key in sorted(set(swept.values())):  # one state row per group, in shard order
        part = LayerReducer.from_state_dict(unpack_state(state[int(key.rpartition("-")[2])], layout), geo)
        if total is None:
            total = part
        else:
            total.merge(part)
    assert total is not None  # a store has at least one shard
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
    done = sorted(set(store.swept_shards().values()))
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
    for key in sorted(set(store.swept_shards().values())):
        info = (store.marker(key) or {}).get("info") or {}
        found += [int(i) for i in info.get("nonfinite", {}).get(layer, [])]
        precisions |= {str(info["precision"])} if "precision" in info else set()
    if len(precisions) > 1:
        raise StoreError(
            f"the shards of {redact(store.url)} were swept in different precisions ({', '.join(sorted(precisions))}); "
            "use another --out"
        )
    precision = {"precision": precisions.pop()} if precisions else {}
    return {"nonfinite_images": len(found), "nonfinite_examples": sorted(found)[:10], **precision}


def _read_all(arrays: dict[str, Any], threads: int = 8) -> dict[str, np.ndarray]:
    """Every array read whole, concurrently (Zarr decodes chunks outside the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    def read(array: Any) -> np.ndarray:
        return np.asarray(array[...])

    with ThreadPoolExecutor(max_workers=min(threads, max(1, len(arrays)))) as pool:
        futures = {key: pool.submit(read, arr) for key, arr in arrays.items()}
        return {key: f.result() for key, f in futures.items()}


def merge_layers(store_url: str, layers: Sequence[str]) -> list[dict[str, Any]]:
    """`merge_layer` of several layers, concurrently (their reads, decoding and torch merges overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(layers) <= 1:
        return [merge_layer(store_url, layer) for layer in layers]
    with ThreadPoolExecutor(max_workers=min(4, len(layers)), thread_name_prefix="rfatlas-merge") as pool:
        return list(pool.map(lambda layer: merge_layer(store_url, layer), layers))


def crop_layers(
    store_url: str, layers: Sequence[str], *, dataset: ImageDataset, images_per_pass: int = 256
) -> list[dict[str, Any]]:
    """`crop_patches` of several merged layers, reading each winning image once for all of them (in
    passes of at most `images_per_pass` images held in memory), with the same results."""
    t0 = time.perf_counter()
    store = AtlasStore.open(store_url, "r+")
    done = store.done_keys("crop")
    merged = store.done_keys("merge")
    out: dict[str, dict[str, Any]] = {}
    todo: list[str] = []
    for layer in layers:
        if f"crop/{layer}" in done:
            out[layer] = {"layer": layer, "images": 0, "seconds": 0.0, "cached": True}
        elif f"merge/{layer}" not in merged:
            raise StoreError(f"cannot crop patches of layer {layer}: it is not merged yet")
        else:
            todo.append(layer)
    info: dict[str, tuple[PatchGeometry, np.ndarray, np.ndarray, np.ndarray]] = {}
    for layer in todo:
        geo, _, _ = layer_geometry(store, layer)
        top = _read_all({key: store.layer_group(layer)[f"topk/{key}"] for key in ("image", "y", "x")})
        info[layer] = (geo, top["image"], top["y"], top["x"])
    wanted = np.unique(np.concatenate([i[1][i[1] >= 0] for i in info.values()] or [np.zeros(0, np.int64)]))
    patches = {
        layer: np.zeros((*image.shape, 3, geo.size, geo.size), dtype=np.uint8)
        for layer, (geo, image, _, _) in info.items()
    }
    margins: dict[tuple[int, int, int], int] = {}  # per pooling: room for its largest patch
    for geo, _, _, _ in info.values():
        key = (geo.factor, *geo.phase)
        margins[key] = max(margins.get(key, 0), geo.size)
    for lo in range(0, len(wanted), images_per_pass):
        group = wanted[lo : lo + images_per_pass]
        pixels = np.stack([dataset.get(int(i))[0] for i in group])
        pooled: dict[tuple[int, int, int], np.ndarray] = {}  # each pooling once per pass, padded once
        for layer, (geo, image, y, x) in info.items():
            key = (geo.factor, *geo.phase)
            if key not in pooled:
                pooled[key] = pool_uint8(pixels, geo.factor, geo.phase, margins[key])
            cut_patches(pooled[key], group, geo, image, y, x, patches[layer], margins[key])
    per_image = image_coords(store.root, int(store.run["num_images"])) if info else {}
    for layer, (geo, image, _, _) in info.items():
        k, p = image.shape[1], geo.size
        cc = min(_CHANNEL_CHUNK, len(image))
        arr = store.require_array(spec("topk/patch"), patches[layer].shape, (cc, k, 3, p, p), layer=layer)
        arr[...] = patches[layer]
        write_coords(store, layer, per_image)
        store.set_layer_attrs(layer, complete=True)
        store.mark_done(f"crop/{layer}")
        images = len(np.unique(image[image >= 0]))
        out[layer] = {"layer": layer, "images": images, "seconds": time.perf_counter() - t0, "cached": False}
    return [out[layer] for layer in layers]


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
    arr = store.require_array(
        spec("topk/patch"), patches.shape, (min(_CHANNEL_CHUNK, len(image)), k, 3, p, p), layer=layer
    )
    arr[...] = patches
    write_coords(store, layer, image_coords(store.root, int(store.run["num_images"])))
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
        for out in sweep_shards(
            url,
            range(store.num_shards),
            model=model,
            dataset=dataset,
            device=device,
            amp=amp,
            num_workers=num_workers,
            on_batch=bar.update,
        ):
            skipped += out["skipped"]
            images += out["images"]
    store.add_skipped([SkippedImage(**s) for s in skipped])
    layers = list(store.run["config"]["layers"])
    merge_layers(url, layers)
    crop_layers(url, layers, dataset=dataset)
    return {"url": url, "images": images, "skipped": len(skipped), "seconds": time.perf_counter() - t0}
