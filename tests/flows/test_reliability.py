"""Reliability and bad input (issue 13): one writer per store, no silent wrong results, bad input
refused before work starts. Real components only: local disk, a real S3 API (moto_server), real
processes where it matters (kill -9, concurrent lease takers, a worker holding a stale token).
Every row of docs/bad-input.md names a test here."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from rfcore.data import (
    BadImageError,
    DataError,
    check_run_labels,
    clean_reason,
    ingest,
    iter_batches,
    open_dataset,
)
from rfcore.errors import (
    CheckpointError,
    ConfigMismatchError,
    LeaseLostError,
    StoreError,
    StoreLockedError,
)
from rfcore.models import get_model, model_meta, save_checkpoint
from rfcore.pipeline import merge_layer, prepare_store, sweep_shard
from rfcore.schema import spec, sweep_shard_key
from rfcore.store import AtlasStore, holder_identity
from rfcore.urls import redact, refuse_credentials

REPO = Path(__file__).resolve().parents[2]
TINY: dict[str, Any] = dict(
    model_name="resnet10t",
    weights=None,
    data_spec="synthetic:16",
    layers="conv1",
    k=2,
    shard_size=8,
    batch_size=8,
)


def tiny_store(url: str, **over: Any) -> AtlasStore:
    return prepare_store(url, **{**TINY, **over})


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "atlas.zarr")
    return str(request.getfixturevalue("s3_bucket")) + "/atlas.zarr"


# --- one writer: the lease ------------------------------------------------------------------------
_TAKER = textwrap.dedent(
    """
    import glob, os, sys, time
    from rfcore.errors import StoreLockedError
    from rfcore.store import AtlasStore
    url, ready, go, name, n = sys.argv[1:6]
    store = AtlasStore.open(url, "r+")
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.002)
    try:
        with store.lease(name, ttl_s=60):
            open(ready + ".tried", "w").close()
            print("WIN", flush=True)
            deadline = time.monotonic() + 60  # hold it until every other taker has tried
            while len(glob.glob(os.path.join(os.path.dirname(ready), "*.tried"))) < int(n):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
    except StoreLockedError:
        open(ready + ".tried", "w").close()
        print("LOST", flush=True)
    """
)


@pytest.mark.integration
def test_concurrent_lease_takers_exactly_one_wins(store_url: str, tmp_path: Path) -> None:
    """Three processes take the lease at the same instant: exactly one wins (atomic create: hard
    link locally, `If-None-Match: *` on S3); a put-then-check lease let two win."""
    tiny_store(store_url)
    go = tmp_path / "go"
    procs, readies = [], []
    for i in range(3):
        ready = tmp_path / f"ready-{i}"
        readies.append(ready)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _TAKER, store_url, str(ready), str(go), f"taker-{i}", "3"],
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in readies) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    results = [o.strip() for o, _ in outs]
    assert sorted(results) == ["LOST", "LOST", "WIN"], [e[-300:] for _, e in outs]


@pytest.mark.parametrize("backend", ["local", "s3", "memory"])
def test_concurrent_takeover_of_an_expired_lease_has_one_winner(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Eight threads (own handles) take over one expired lease at once: the compare-and-swap
    (flock + compare locally, `If-Match: <etag>` on S3) lets exactly one through."""
    url = {
        "local": str(tmp_path / "a.zarr"),
        "memory": f"memory://rfatlas-rel-{os.getpid()}-{time.monotonic_ns()}/a.zarr",
    }.get(backend) or str(request.getfixturevalue("s3_bucket")) + "/a.zarr"
    tiny_store(url)
    AtlasStore.open(url, "r+")._write_lease("dead-flow", "deadbeef", ttl_s=-1)  # expired
    stores = [AtlasStore.open(url, "r+") for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    wins: list[int] = []
    errors: list[BaseException] = []
    tried = threading.Semaphore(0)

    def take(i: int) -> None:
        barrier.wait()
        try:
            with stores[i].lease(f"t{i}", ttl_s=60):
                wins.append(i)
                tried.release()
                for _ in range(len(stores)):  # hold it until every other taker has tried
                    tried.acquire(timeout=30)
        except StoreLockedError:
            tried.release()
        except BaseException as e:  # anything else is a bug
            errors.append(e)
            tried.release()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(wins) == 1, (wins, errors)


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from flows.lease import hold_lease
    from rfcore.store import AtlasStore
    with hold_lease(AtlasStore.open(sys.argv[1], "r+"), "flow"):
        print("held", flush=True)
        time.sleep(600)
    """
)


@pytest.mark.integration
def test_kill9_flow_process_then_immediate_rerun_takes_over(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A process holding the lease as the flow does is killed with SIGKILL; a rerun at once (the
    CLI's input check, then the flow's lease) takes the lease over, with a log line, instead of
    waiting out the 60 s TTL. Also before the killed process is reaped (a zombie)."""
    from flows.atlas import check_inputs

    url = str(tmp_path / "atlas.zarr")
    tiny_store(url)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, url],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held", proc.stderr.read() if proc.stderr else ""
    held = AtlasStore.open(url)._read_lease()
    assert held is not None and held["pid"] == proc.pid and held["host"] == holder_identity()["host"]
    with pytest.raises(StoreLockedError, match=r"leased by .*\(flow\).*holder: host .* pid"):
        with AtlasStore.open(url, "r+").lease("too early"):
            pass  # alive: refused
    os.kill(proc.pid, signal.SIGKILL)
    time.sleep(0.3)  # dead but not reaped: a zombie
    t0 = time.monotonic()
    logging.getLogger("rfcore.store").addHandler(handler := logging.StreamHandler(sys.stderr))
    try:
        plan = check_inputs(
            model="resnet10t", data="synthetic:16", store_url=url, layers="conv1", k=2, shard_size=8, batch_size=8,
            device="cpu",
        )  # fmt: skip
    finally:
        logging.getLogger("rfcore.store").removeHandler(handler)
    proc.wait(10)
    with AtlasStore.open(url, "r+").lease("rerun flow", ttl_s=60):
        pass
    assert time.monotonic() - t0 < 20 and plan["num_shards"] == 2
    err = capfd.readouterr().err
    assert (
        f"taking over the lease on {url} at once" in err
        and f"(pid {proc.pid} on this host) no longer exists" in err
    )


def test_remote_or_live_holder_still_waits_for_the_ttl(tmp_path: Path) -> None:
    """Only a holder on this host (same kernel and pid namespace) that no longer exists is taken
    over at once; another host's lease (even with a pid that is free here) expires by TTL."""
    url = str(tmp_path / "a.zarr")
    store = tiny_store(url)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    for other in ({"host": "elsewhere"}, {"machine": "another-boot/pid:[1]"}):
        body = {
            "owner": "remote flow", "token": "r", **holder_identity(), "pid": dead_pid, "pid_start": 1,
            "expires": time.time() + 60, **other,
        }  # fmt: skip
        store._objects.put("_state/lease", json.dumps(body).encode())
        with pytest.raises(StoreLockedError, match="remote flow"), store.lease("me"):
            pass
    body = {"owner": "local dead", "token": "d", **holder_identity(), "pid": dead_pid, "pid_start": 1}
    store._objects.put("_state/lease", json.dumps({**body, "expires": time.time() + 60}).encode())
    with store.lease("me"):  # this host, process gone: taken over
        assert store._read_lease()["owner"] == "me"  # type: ignore[index]


_WORKER = textwrap.dedent(
    """
    import sys
    from rfcore.errors import LeaseLostError
    from rfcore.store import AtlasStore
    try:
        AtlasStore.open(sys.argv[1], "r+").mark_done(sys.argv[2])
        print("MARKED", flush=True)
    except LeaseLostError as e:
        print("LOST", e, flush=True)
    """
)


def test_lost_lease_stops_marking(store_url: str) -> None:
    """A run whose lease was taken over writes no completion marker, and its lease block ends with
    LeaseLostError once the heartbeat saw the loss; the new holder's lease is left alone."""
    store = tiny_store(store_url)
    with pytest.raises(LeaseLostError, match="lost the lease"):
        with store.lease("slow run", ttl_s=0.9):
            store.mark_done("sweep/shard-0000")  # held: fine
            AtlasStore.open(store_url, "r+")._write_lease("another run", "thief", ttl_s=60)  # taken over
            with pytest.raises(LeaseLostError, match="now held by another run"):
                store.mark_done("merge/conv1")
            time.sleep(0.8)  # a heartbeat notices
    assert store.done_keys() == {"sweep/shard-0000"}
    assert AtlasStore.open(store_url)._read_lease()["token"] == "thief"  # type: ignore[index]  # not deleted


@pytest.mark.integration
def test_a_worker_process_with_a_stale_token_stops_marking(tmp_path: Path) -> None:
    """A worker process that knows the run's token (RFATLAS_LEASE_TOKEN here; the task's tags under
    Prefect) marks while the run holds the lease, and refuses once another run took it over."""
    url = str(tmp_path / "a.zarr")
    store = tiny_store(url)
    worker = [sys.executable, "-c", _WORKER, url]
    with store.lease("run", ttl_s=60) as token:
        env = {**_env(), "RFATLAS_LEASE_TOKEN": token}
        out = subprocess.run(
            [*worker, "sweep/shard-0000"], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.stdout.startswith("MARKED"), out.stderr[-500:]
        AtlasStore.open(url, "r+")._write_lease("another run", "thief", ttl_s=60)
        out = subprocess.run(
            [*worker, "sweep/shard-0001"], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.stdout.startswith("LOST"), out.stdout + out.stderr[-500:]
        store.lease_token = None  # leave the block without the heartbeat's verdict
    assert store.done_keys() == {"sweep/shard-0000"}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_lease_token_travels_to_dask_tasks(dask_runner: Callable[[], Any], tmp_path: Path) -> None:
    """Tasks submitted under `hold_lease` carry the token in their tags to the Dask workers: a task
    that marks after the lease was taken over fails with LeaseLostError."""
    from prefect import flow, task

    from flows.lease import hold_lease

    url = str(tmp_path / "atlas.zarr")
    tiny_store(url)

    @task
    def mark(store_url: str, key: str) -> int:
        AtlasStore.open(store_url, "r+").mark_done(key)
        return os.getpid()

    @flow(task_runner=dask_runner())
    def run(store_url: str) -> tuple[int, str]:
        store = AtlasStore.open(store_url, "r+")
        with hold_lease(store, "test"):
            pid = mark.submit(store_url, "sweep/shard-0000").result()
            AtlasStore.open(store_url, "r+")._write_lease("thief", "thief", ttl_s=60)
            try:
                mark.submit(store_url, "sweep/shard-0001").result()
                return pid, "marked"
            except LeaseLostError as e:
                return pid, str(e)
            finally:
                store.lease_token = None

    pid, outcome = run(url)
    assert pid != os.getpid() and "lost the lease" in outcome
    assert AtlasStore.open(url).done_keys("sweep") == {"sweep/shard-0000"}


# --- stores ---------------------------------------------------------------------------------------
def test_require_array_concurrent_creation_and_one_line_errors(tmp_path: Path) -> None:
    url = str(tmp_path / "a.zarr")
    tiny_store(url)
    stores = [AtlasStore.open(url, "r+") for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    got: list[Any] = []

    def make(s: AtlasStore) -> None:
        barrier.wait()
        try:
            got.append(s.require_array(spec("activation"), (16, 16), (8, 16), layer="conv1").shape)
        except BaseException as e:
            got.append(e)

    threads = [threading.Thread(target=make, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == [(16, 16)] * 8
    stores[0].root.require_group("layers/conv1/topk/value")  # a group where an array belongs
    with pytest.raises(StoreError, match="is a group, not an array") as info:
        stores[0].require_array(spec("topk/value"), (16, 2), (16, 2), layer="conv1")
    assert "\n" not in str(info.value) and info.value.__cause__ is None
    (tmp_path / "a.zarr" / "layers" / "conv1" / "max").mkdir()
    (tmp_path / "a.zarr" / "layers" / "conv1" / "max" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="cannot open or create array layers/conv1/max") as info:
        stores[0].require_array(spec("max"), (16,), (16,), layer="conv1")
    assert "\n" not in str(info.value)


# --- checkpoints ----------------------------------------------------------------------------------
def test_overwritten_checkpoint_on_a_reused_worker_cache_is_detected(tmp_path: Path) -> None:
    """A worker's model cache is keyed by the checkpoint's contents: the same URL overwritten
    between two runs loads the new weights, and a task of the old atlas refuses them."""
    from tasks import runtime

    ckpt = str(tmp_path / "latest.pt")
    save_checkpoint(get_model("resnet10t", seed=0), ckpt, config={}, metrics={})
    store = tiny_store(str(tmp_path / "a.zarr"), weights=ckpt)
    runtime.clear_caches()
    old = runtime.run_model(store.run, "cpu")  # the worker caches it
    assert runtime.run_model(store.run, "cpu") is old
    save_checkpoint(get_model("resnet10t", seed=1), ckpt, config={}, metrics={})  # overwritten in place
    new = runtime.cached_model("resnet10t", ckpt, "cpu", 0)
    assert new is not old and model_meta(new).weights_digest != store.run["weights_digest"]
    assert not torch.equal(new.conv1.weight, old.conv1.weight)
    with pytest.raises(CheckpointError, match="changed since the atlas was made"):
        runtime.run_model(store.run, "cpu")
    with pytest.raises(CheckpointError, match="changed since the atlas was made"):
        sweep_shard(store.url, 0, model=new, dataset=open_dataset("synthetic:16", size=64), device="cpu")
    assert store.done_keys() == set()
    runtime.clear_caches()


def test_checkpoint_save_is_atomic_for_readers(tmp_path: Path) -> None:
    """Readers of a checkpoint being overwritten see the old or the new file, never half of one."""
    from rfcore.models import _read_checkpoint

    ckpt = str(tmp_path / "m.pt")
    models = [get_model("resnet10t", seed=s) for s in (0, 1)]
    save_checkpoint(models[0], ckpt, config={}, metrics={})
    stop, failures, reads = threading.Event(), [], [0]

    def read() -> None:
        while not stop.is_set():
            try:
                _read_checkpoint(ckpt)
                reads[0] += 1
            except CheckpointError as e:
                failures.append(str(e))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(12):
        save_checkpoint(models[i % 2], ckpt, config={}, metrics={})
    stop.set()
    reader.join(30)
    assert failures == [] and reads[0] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left


def test_non_checkpoint_files_are_named_as_such(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("true",))

    png, text, evil = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    png.write_bytes(buf.getvalue())
    text.write_text("weights: none\n")
    evil.write_bytes(pickle.dumps(Evil()))
    for path, what in ((png, "a PNG image"), (text, "text")):
        with pytest.raises(CheckpointError, match=rf"is not a torch checkpoint \({what}, ") as info:
            get_model("resnet10t", weights=str(path))
        assert "could run code" not in str(info.value)
    with pytest.raises(CheckpointError, match="could run code"):
        get_model("resnet10t", weights=str(evil))


# --- data -----------------------------------------------------------------------------------------
def test_ingest_refuses_a_foreign_non_empty_target(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="not empty and not an rfatlas image store; refusing"):
        ingest("synthetic:4", str(target), size=16, progress=False)
    assert (target / "thesis.tex").read_text() == "years of work"
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_array("x", shape=(1,), dtype="uint8")
    with pytest.raises(DataError, match="not an rfatlas image store"):
        ingest("synthetic:4", str(other), size=16, progress=False)
    res = ingest("synthetic:4", str(tmp_path / "new.zarr"), size=16, progress=False)
    ds = open_dataset(f"zarr:{res.url}", size=16)
    assert ds.fingerprint is not None and ds.fingerprint.startswith("zarr:")


def test_16bit_and_float_images_are_scaled_not_saturated(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(root / "a16.png")  # 0.502 -> 128
    Image.fromarray(np.full((8, 8), 0.25, np.float32), mode="F").save(root / "b_float.tif")  # -> 64
    Image.fromarray(np.full((8, 8), 3.0, np.float32), mode="F").save(root / "c_float_hdr.tif")
    ds = open_dataset(f"imagefolder:{root}", size=8)
    assert Image.open(root / "a16.png").mode.startswith("I")
    assert set(np.unique(ds.get(0)[0])) == {128}  # PIL's convert("RGB") gave 255
    assert set(np.unique(ds.get(1)[0])) == {64}  # PIL's convert("RGB") gave 0
    with pytest.raises(BadImageError, match=r"float image with values 3\.\.3, not in \[0, 1\]"):
        ds.get(2)
    batch = next(iter_batches(ds, range(3), 3))
    assert [s.index for s in batch.skipped] == [2] and batch.images.shape[0] == 2


def test_skipped_reasons_carry_no_object_addresses() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/rfatlas-rel-{os.getpid()}-{time.monotonic_ns()}"
    fs.pipe(f"{root}/broken.png", b"not an image at all")
    try:
        reasons = [_reason(f"imagefolder:memory://{root}") for _ in range(2)]  # two identical runs
    finally:
        fs.rm(root, recursive=True)
    assert reasons[0] == reasons[1] and "0x" not in reasons[0] and "cannot identify image file" in reasons[0]
    assert clean_reason("x <PIL.Image.Image image mode=RGB size=1x1 at 0x7F3A2B1C>  y") == (
        "x <PIL.Image.Image image mode=RGB size=1x1> y"
    )


def _reason(spec_: str) -> str:
    batch = next(iter_batches(open_dataset(spec_, size=8), range(1), 1))
    return batch.skipped[0].reason


def _wnid_folder(root: Path) -> Path:
    wnids = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
             "n03394916", "n03417042", "n03425413", "n03445777", "n03888605"]  # fmt: skip
    for w in wnids:
        (root / w).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / w / "x.png")
    return root


def _run(data: str, num_classes: int, size: int = 8) -> dict[str, Any]:
    return {
        "dataset": data,
        "image_size": size,
        "preprocessing": {"resize": size},
        "num_classes": num_classes,
    }


def test_labels_are_checked_before_the_sweep_and_imagenette_maps_to_imagenet(tmp_path: Path) -> None:
    from flows.atlas import check_inputs

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i, i, i)).save(flat / f"{i}.png")
    url = str(tmp_path / "a.zarr")
    with pytest.raises(DataError, match="has no class labels"):
        check_inputs(model="resnet10t", data=f"imagefolder:{flat}", store_url=url, layers="conv1",
                     analyses="sweep,noise", device="cpu")  # fmt: skip
    assert AtlasStore.open(url).done_keys() == set()  # nothing swept
    check_inputs(model="resnet10t", data=f"imagefolder:{flat}", store_url=str(tmp_path / "b.zarr"),
                 layers="conv1", analyses="sweep", device="cpu")  # fmt: skip  # no labels needed
    with pytest.raises(DataError, match="has 10 classes but the model has 1000"):
        check_run_labels(_run("synthetic:20", 1000))
    nette = _wnid_folder(tmp_path / "nette")
    check_run_labels(_run(f"imagefolder:{nette}", 1000))  # Imagenette wnids: mapped, accepted
    ds = open_dataset(f"imagefolder:{nette}", size=8).for_model(1000)
    labels = next(iter_batches(ds, range(10), 10)).labels.tolist()
    assert labels == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    check_run_labels(_run(f"imagefolder:{nette}", 10))  # a 10-class model keeps 0..9


def test_data_changed_since_the_atlas_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(root / c / f"{i}.png")
    url = str(tmp_path / "a.zarr")
    store = tiny_store(url, data_spec=f"imagefolder:{root}")
    assert str(store.run["data_fingerprint"]).startswith("files:")
    tiny_store(url, data_spec=f"imagefolder:{root}")  # unchanged: resumes
    Image.new("RGB", (64, 64), (0, 255, 0)).save(root / "a" / "1.png")  # replaced in place
    with pytest.raises(ConfigMismatchError, match="data_fingerprint"):
        tiny_store(url, data_spec=f"imagefolder:{root}")
    stale = open_dataset(f"imagefolder:{root}", size=64)
    stale.fingerprint = "files:old"
    with pytest.raises(DataError, match="changed since the atlas was made"):
        sweep_shard(url, 0, model=get_model("resnet10t"), dataset=stale, device="cpu")


# --- sweeps ---------------------------------------------------------------------------------------
def test_nan_activations_are_kept_out_of_the_statistics(tmp_path: Path) -> None:
    url = str(tmp_path / "a.zarr")
    tiny_store(url)
    model = get_model("resnet10t")
    ds = open_dataset("synthetic:16", size=64)

    def poison(_m: Any, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[0, 3, 0, 0] = float("nan")  # the first image of every batch
        return out

    handle = model.conv1.register_forward_hook(poison)
    try:
        for shard in (0, 1):
            sweep_shard(url, shard, model=model, dataset=ds, device="cpu")
    finally:
        handle.remove()
    merge_layer(url, "conv1")
    layer = AtlasStore.open(url).layer_group("conv1")
    attrs = dict(layer.attrs)
    assert attrs["nonfinite_images"] == 2 and attrs["nonfinite_examples"] == [0, 8]
    mean, mx = np.asarray(layer["mean"][...]), np.asarray(layer["max"][...])
    assert np.isfinite(mean).all() and np.isfinite(mx).all() and float(np.abs(mean).max()) < 1e3
    act = np.asarray(layer["activation"][...])
    assert np.isneginf(act[[0, 8]]).all() and np.isfinite(np.delete(act, [0, 8], axis=0)).all()
    assert not np.isin(np.asarray(layer["topk/image"][...]), [0, 8]).any()
    assert attrs["precision"] == "float32"


def test_a_resume_in_another_precision_is_refused(tmp_path: Path) -> None:
    url = str(tmp_path / "a.zarr")
    store = tiny_store(url)
    store.mark_done(sweep_shard_key(0), {"precision": "bfloat16"})  # swept on a GPU with autocast
    with pytest.raises(StoreError, match=r"was swept in bfloat16 .* would run in float32"):
        sweep_shard(
            url, 1, model=get_model("resnet10t"), dataset=open_dataset("synthetic:16", size=64), device="cpu"
        )
    assert store.done_keys("sweep") == {sweep_shard_key(0)}


# --- small ones -----------------------------------------------------------------------------------
def test_demo_refuses_a_remote_out(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from flows.cli import main

    os.chdir(tmp_path)
    assert main(["demo", "--out", "s3://bucket/demo", "--device", "cpu"]) == 2
    assert "writes its HTML reports into a local folder" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("s3://AKIA:se/cr+et@bucket/x", "s3://bucket/x"),  # unencoded / in the password
        ("zarr:s3://AKIA:secret@bucket/x", "zarr:s3://bucket/x"),
        (
            "https://b.s3.amazonaws.com/m.pt?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F2024&X-Amz-Signature=ab12",
            "https://b.s3.amazonaws.com/m.pt?X-Amz-Algorithm=AWS4&X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED",
        ),
        (
            "https://h/m.pt?AWSAccessKeyId=AKIA&Signature=xyz&Expires=1",
            "https://h/m.pt?AWSAccessKeyId=REDACTED&Signature=REDACTED&Expires=1",
        ),
        ("https://h/m.pt?token=abc", "https://h/m.pt?token=REDACTED"),
        (
            "https://acct.blob.core.windows.net/c/m.pt?sv=1&sig=abc",
            "https://acct.blob.core.windows.net/c/m.pt?sv=1&sig=REDACTED",
        ),
    ],
)
def test_url_hygiene_redacts_and_refuses(url: str, shown: str) -> None:
    assert redact(url) == shown
    with pytest.raises(StoreError, match="embeds credentials") as info:
        refuse_credentials(url, "weights")
    assert "secret" not in str(info.value) and "abc" not in str(info.value) and "xyz" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["/tmp/a@b/c.pt", "s3://bucket/img@2x.png", "s3://bucket/a:b/c", "https://h/x?v=1"]
)
def test_url_hygiene_leaves_plain_urls(url: str) -> None:
    assert redact(url) == url
    refuse_credentials(url, "weights")


def test_disk_full_and_read_only_are_not_retried() -> None:
    from tasks.policy import is_transient

    for code in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        assert not is_transient(OSError(code, os.strerror(code), "/data/atlas.zarr"))
    assert is_transient(ConnectionResetError(errno.ECONNRESET, "reset"))
    assert is_transient(OSError(errno.EIO, "I/O error"))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["actmax", "--block-size", "0"], "block_size must be >= 1"),
        (["noise", "--sigma", "-1"], "sigma"),
    ],
)
def test_invalid_analysis_options_leave_the_store_untouched(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rfatlas actmax URL --block-size 0` used to write its config first and poison the store:
    options are now validated before anything is written (the registry's Options.__post_init__)."""
    from flows.cli import main

    url = str(tmp_path / "a.zarr")
    tiny_store(url)
    before = _snapshot(tmp_path / "a.zarr")
    assert main([argv[0], url, *argv[1:], "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err
    assert _snapshot(tmp_path / "a.zarr") == before


@pytest.mark.integration
@pytest.mark.slow
def test_kill9_of_a_cli_run_then_immediate_rerun_resumes(tmp_path: Path) -> None:
    """The real thing: `rfatlas run` (flow, Prefect, Dask workers) is killed with SIGKILL while its
    flow holds the lease, and the same command run at once takes the lease over and resumes."""
    from rfcore.atlas import verify_store

    url = str(tmp_path / "a.zarr")
    cmd = [sys.executable, "-m", "flows.cli", "run", "--model", "resnet10t", "--data", "synthetic:384",
           "--out", url, "--layers", "conv1", "--shard-size", "32", "--batch-size", "16", "--workers", "1",
           "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            store = AtlasStore.open(url)
            held = store._read_lease() or {}
            if "flow run" in str(held.get("owner")) and store.done_keys("sweep"):
                break
        except StoreError:
            pass
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    swept_before = len(AtlasStore.open(url).done_keys("sweep"))
    t0 = time.monotonic()
    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "is leased by" not in rerun.stderr and "resumed" in rerun.stdout
    assert verify_store(url) == [] and swept_before < 12
    assert time.monotonic() - t0 < 600


def test_torchvision_weights_resolved_otherwise_are_refused() -> None:
    """`DEFAULT` names whatever torchvision's newest weights are: the atlas records the resolved
    member and file (`weights_version`), and a model that resolves to others is refused."""
    import dataclasses

    import torchvision

    from rfcore.models import check_model_matches

    member = torchvision.models.get_model_weights("resnet18")["DEFAULT"]
    version = f"{member.name}:{str(member.url).rsplit('/', 1)[-1]}"
    assert member.name != "DEFAULT" and version.endswith(".pth")
    model = get_model("resnet10t")
    model.rfatlas_meta = dataclasses.replace(model_meta(model), weights_version=version)  # type: ignore[assignment]
    check_model_matches(model, {"weights": "DEFAULT", "weights_version": version})
    with pytest.raises(
        CheckpointError, match=rf"weights DEFAULT resolve to {member.name}.*made with IMAGENET1K_V0"
    ):
        check_model_matches(model, {"weights": "DEFAULT", "weights_version": "IMAGENET1K_V0:old.pth"})
