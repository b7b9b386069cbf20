"""AtlasStore / open_atlas against memory://, a local path and a real S3 API (moto_server)."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from rfcore.atlas import describe_store, open_atlas, verify_store
from rfcore.errors import ConfigMismatchError, StoreError, StoreLockedError, UnknownLayerError
from rfcore.schema import (
    PARTIAL_ARRAYS,
    SCHEMA_VERSION,
    SWEEP_ARRAYS,
    ArraySpec,
    LayerAttrs,
    RunAttrs,
    spec,
    sweep_shard_key,
)
from rfcore.store import AtlasStore, redact

LAYERS = ["conv1", "layer1.0.conv1"]  # dotted names are kept verbatim as group names
K, N, SHARD, C, P = 3, 10, 4, 5, 7


def make_run(model: str = "resnet10t", k: int = K, layers: list[str] = LAYERS) -> RunAttrs:
    return RunAttrs(
        model=model,
        weights=None,
        dataset="synthetic[:10]",
        num_images=N,
        image_size=64,
        preprocessing={"size": 64, "resize": 73, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        config={"k": k, "patch_max": 32, "shard_size": SHARD, "batch_size": 2, "layers": layers, "seed": 0},
    )


def make_layers() -> dict[str, LayerAttrs]:
    rf = {"size": [7, 7], "stride": [2, 2], "offset": [0.0, 0.0]}
    return {name: LayerAttrs("conv", C, (32, 32), rf, {"factor": 1.0, "size": P}) for name in LAYERS}


def create(url: str, run: RunAttrs | None = None) -> AtlasStore:
    run = run or make_run()
    layers = {name: make_layers()[name] for name in run.config["layers"]}
    return AtlasStore.create(url, run=run, layers=layers, num_images=N, shard_size=SHARD, k=run.config["k"])


@pytest.fixture(params=["memory", "local", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://rfatlas-test-{uuid.uuid4().hex}/atlas.zarr"
    if request.param == "local":
        return str(tmp_path / "atlas.zarr")
    return str(request.getfixturevalue("s3_bucket")) + "/atlas.zarr"


def sizes(layer: str | None = None) -> dict[str, int]:
    return {"image": N, "channel": C, "k": K, "color": 3, "py": P, "px": P, "shard": 3, "word": 8}


def write_sweep(store: AtlasStore, layer: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fill every final sweep array of `layer` with random data of the right dtype; returns it."""
    data = {}
    for s in SWEEP_ARRAYS:
        shape = s.shape(sizes())
        chunks = (SHARD, *shape[1:]) if s.dims[0] == "image" else shape
        arr = store.require_array(s, shape, chunks, layer=layer)
        values = (rng.random(shape) * 100).astype(s.dtype)
        arr[...] = values
        data[s.path] = values
    return data


def test_round_trip_attrs_arrays_and_xarray(url: str) -> None:
    store = create(url)
    rng = np.random.default_rng(0)
    data = {name: write_sweep(store, name, rng) for name in LAYERS}
    store.set_layer_attrs("layer1.0.conv1", complete=True)

    atlas = open_atlas(url)
    assert atlas.url == url
    assert atlas.run == make_run().to_dict()
    assert atlas.layers == LAYERS
    assert atlas.skipped == []
    layer = atlas.layer("layer1.0.conv1")
    assert layer.attrs == {**make_layers()["layer1.0.conv1"].to_dict(), "complete": True}
    assert atlas.layer("conv1").attrs["complete"] is False
    assert layer.rf == {"size": [7, 7], "stride": [2, 2], "offset": [0.0, 0.0]}
    want = data["layer1.0.conv1"]
    np.testing.assert_array_equal(layer.array("activation"), want["activation"])
    top = layer.topk(2)
    for f in ("value", "image", "y", "x", "patch"):
        np.testing.assert_array_equal(getattr(top, f), want[f"topk/{f}"][2])
    assert top.patch.shape == (K, 3, P, P) and top.patch.dtype == np.uint8
    np.testing.assert_array_equal(layer.mean_stimulus(4), want["mean_stimulus"][4])
    stats = layer.stats()
    assert set(stats) == {"max", "mean", "zero_fraction", "positive_count"}
    np.testing.assert_array_equal(stats["positive_count"], want["positive_count"])

    # every array carries dimension_names from the schema
    for s in SWEEP_ARRAYS:
        node = layer.group[s.path]
        assert isinstance(node, zarr.Array)
        assert tuple(node.metadata.dimension_names or ()) == s.dims  # type: ignore[union-attr]

    ds = layer.to_xarray()
    assert set(ds.data_vars) == {s.path for s in SWEEP_ARRAYS}
    for s in SWEEP_ARRAYS:
        assert ds[s.path].dims == s.dims
        assert ds[s.path].dtype == np.dtype(s.dtype)
        np.testing.assert_array_equal(ds[s.path].values, want[s.path])
    assert ds.sizes == {"image": N, "channel": C, "k": K, "color": 3, "py": P, "px": P}
    assert ds.attrs["kind"] == "conv"

    # an analysis array over a channel subset does not break the dataset: its clashing dim is renamed
    subset = ArraySpec("actmax/{objective}/activation", ("channel",), "float32", math.nan, "test")
    store.require_array(subset, (2,), (2,), layer="layer1.0.conv1", objective="neuron")
    ds = open_atlas(url).layer("layer1.0.conv1").to_xarray()
    assert ds["actmax/neuron/activation"].dims == ("actmax/neuron/channel",)
    assert ds["activation"].dims == ("image", "channel") and ds.sizes["channel"] == C
    coupling = ArraySpec("coupling", ("channel", "k"), "float32", math.nan, "test")  # k: not the sweep's k
    store.require_array(coupling, (C, 2 * K), (C, 2 * K), layer="layer1.0.conv1")
    ds = open_atlas(url).layer("layer1.0.conv1").to_xarray()
    assert ds["coupling"].dims == ("channel", "coupling/k")
    assert ds["topk/value"].dims == ("channel", "k") and ds.sizes["k"] == K


def test_plain_xarray_open_zarr_on_local_layer_group(tmp_path: Path) -> None:
    import xarray as xr

    url = str(tmp_path / "a.zarr")
    store = create(url)
    write_sweep(store, "layer1.0.conv1", np.random.default_rng(1))
    ds = xr.open_zarr(url, group="layers/layer1.0.conv1", consolidated=False)
    assert ds["activation"].dims == ("image", "channel")
    topk = xr.open_zarr(url, group="layers/layer1.0.conv1/topk", consolidated=False)
    assert topk["image"].dims == ("channel", "k") and topk["image"].dtype == np.int64


def test_fill_values_and_placeholders(url: str) -> None:
    store = create(url)
    act = store.require_array(spec("activation"), (N, C), (SHARD, C), layer="conv1")
    assert np.isnan(np.asarray(act[...])).all()
    img = store.require_array(spec("topk/image"), (C, K), (C, K), layer="conv1")
    assert (np.asarray(img[...]) == -1).all()
    templated = ArraySpec("actmax/{objective}/image", ("channel", "color", "y", "x"), "float32", 0.0, "test")
    arr = store.require_array(templated, (C, 3, 4, 4), (1, 3, 4, 4), layer="conv1", objective="channel")
    assert arr.path == "layers/conv1/actmax/channel/image"
    with pytest.raises(KeyError, match="objective"):
        store.require_array(templated, (C, 3, 4, 4), (1, 3, 4, 4), layer="conv1")
    rooted = ArraySpec("noise/{layer}/snr", ("channel",), "float32", 0.0, "test", scope="root")
    assert store.require_array(rooted, (C,), (C,), layer="layer1.0.conv1").path == "noise/layer1.0.conv1/snr"


def test_require_array_reopen_checks_shape_and_dtype(url: str) -> None:
    store = create(url)
    a = store.require_array(spec("max"), (C,), (C,), layer="conv1")
    a[...] = np.arange(C, dtype=np.float32)
    again = create(url).require_array(spec("max"), (C,), (C,), layer="conv1")
    np.testing.assert_array_equal(again[...], np.arange(C))
    with pytest.raises(StoreError, match=r"layers/conv1/max .* has shape \(5,\) dtype float32, not \(6,\)"):
        store.require_array(spec("max"), (C + 1,), (C + 1,), layer="conv1")
    other_dtype = ArraySpec("max", ("channel",), "int64", 0, "test")
    with pytest.raises(StoreError, match=r"not \(5,\) int64"):
        store.require_array(other_dtype, (C,), (C,), layer="conv1")
    with pytest.raises(StoreError, match="no layer conv2; did you mean conv1"):
        store.require_array(spec("max"), (C,), (C,), layer="conv2")
    reader = AtlasStore.open(url)
    with pytest.raises(StoreError, match="read-only"):
        reader.require_array(spec("mean"), (C,), (C,), layer="conv1")
    writes: list[Callable[[], object]] = [
        lambda: reader.mark_done("sweep/shard-0000"),
        lambda: reader.set_layer_attrs("conv1", complete=True),
        lambda: reader.remove("partial", layer="conv1"),
        lambda: reader.lease("x").__enter__(),
    ]
    for write in writes:
        with pytest.raises(StoreError, match="opened read-only"):
            write()


def test_reopen_same_identity_resumes(url: str) -> None:
    store = create(url)
    store.mark_done("sweep/shard-0000")
    store.set_layer_attrs("conv1", complete=True)
    again = create(url)
    assert again.is_done("sweep/shard-0000")
    assert open_atlas(url).layer("conv1").attrs["complete"] is True


def test_reopen_other_identity_is_config_mismatch(url: str) -> None:
    create(url)
    with pytest.raises(
        ConfigMismatchError, match=r"was made for model resnet10t, not plainnet10t; use another --out"
    ):
        create(url, make_run(model="plainnet10t"))
    with pytest.raises(
        ConfigMismatchError, match=r"made for model resnet10t, k 3, not model plainnet10t, k 4"
    ):
        create(url, make_run(model="plainnet10t", k=4))
    with pytest.raises(ConfigMismatchError, match=r"layers"):
        create(url, make_run(layers=["conv1"]))


def test_open_absent_not_an_atlas_and_other_version(url: str) -> None:
    with pytest.raises(StoreError, match=r"^no atlas at "):
        open_atlas(url)
    if url.startswith("s3://"):
        store_url = url
        opts = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    else:
        store_url, opts = url, {}
    plain = zarr.open_group(store_url, mode="w", attributes={"something": 1}, storage_options=opts or None)
    with pytest.raises(StoreError, match="is a zarr store but not an rfatlas atlas"):
        open_atlas(url)
    with pytest.raises(StoreError, match="not an rfatlas atlas"):
        create(url)
    plain.attrs.update({"rfatlas": {"schema_version": SCHEMA_VERSION + 1, "version": "9.9"}, "run": {}})
    with pytest.raises(
        StoreError, match=rf"schema version {SCHEMA_VERSION + 1} .* reads version {SCHEMA_VERSION}"
    ) as err:
        open_atlas(url)
    assert verify_store(url) == [str(err.value)]


def test_create_refuses_non_zarr_directory(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="exists and is not an rfatlas atlas"):
        create(str(tmp_path / "data"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        create(str(tmp_path / "file"))


def test_create_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run attrs say k 3 but create"):
        AtlasStore.create(
            str(tmp_path / "a"), run=make_run(), layers=make_layers(), num_images=N, shard_size=SHARD, k=4
        )
    with pytest.raises(ValueError, match="differ from the layers given"):
        AtlasStore.create(
            str(tmp_path / "a"),
            run=make_run(layers=["conv1"]),
            layers=make_layers(),
            num_images=N,
            shard_size=SHARD,
            k=K,
        )


def test_create_completes_a_half_made_store(tmp_path: Path) -> None:
    url = str(tmp_path / "a.zarr")
    create(url)
    root = zarr.open_group(url, mode="r+")
    del root["layers"]
    del root["_state"]
    store = create(url)  # as if the first create() died right after writing the root
    assert store.layer_names == LAYERS
    store.mark_done("sweep/shard-0000")
    assert open_atlas(url).layer("layer1.0.conv1").attrs["complete"] is False


def test_create_in_missing_bucket_is_store_error(s3_endpoint: str) -> None:
    with pytest.raises(StoreError, match=r"^cannot create an atlas at s3://rfatlas-no-such-bucket/a: "):
        create("s3://rfatlas-no-such-bucket/a")


def test_markers(url: str) -> None:
    store = create(url)
    assert not store.is_done("sweep/shard-0001")
    assert store.done_keys("sweep") == set()
    store.mark_done(sweep_shard_key(1))
    store.mark_done("sweep/shard-0003")
    store.mark_done("actmax/layer1.0.conv1/channel/block-0003")
    other = AtlasStore.open(url, "r+")  # another process's view
    assert other.is_done("sweep/shard-0001") and not other.is_done("sweep/shard-0002")
    assert other.done_keys("sweep") == {"sweep/shard-0001", "sweep/shard-0003"}
    assert other.done_keys("actmax/layer1.0.conv1") == {"actmax/layer1.0.conv1/channel/block-0003"}
    assert len(other.done_keys()) == 3
    with pytest.raises(ValueError, match="bad marker key"):
        store.mark_done("../escape")
    if not url.startswith(("memory://", "s3://")):  # local: atomic replace leaves no temp files
        assert not [p for p in Path(url).rglob("*") if p.name.endswith(".tmp")]


def test_skipped_dedup_sorted(url: str) -> None:
    @dataclass
    class Skipped:
        index: int
        path: str
        reason: str

    store = create(url)
    store.add_skipped([Skipped(7, "synthetic[7]", "corrupt"), Skipped(2, "a.jpg", "truncated")])
    store.add_skipped([Skipped(7, "synthetic[7]", "corrupt"), Skipped(5, "b.jpg", "empty")])
    assert [s["index"] for s in open_atlas(url).skipped] == [2, 5, 7]
    assert open_atlas(url).skipped[0] == {"index": 2, "path": "a.jpg", "reason": "truncated"}


def test_lease_exclusive_released_and_expired_takeover(url: str) -> None:
    a, b = create(url), AtlasStore.open(url, "r+")
    with a.lease("flow-a", ttl_s=30):
        with pytest.raises(StoreLockedError, match=r"is leased by flow-a until \d{4}-\d\d-\d\dT.*Z; wait"):
            with b.lease("flow-b"):
                pass
        with pytest.raises(StoreLockedError), a.lease("flow-a-again"):
            pass
    with b.lease("flow-b"):  # released on exit
        pass
    a._write_lease("dead-flow", "deadbeef", ttl_s=-1)  # a holder that died: its lease has expired
    with b.lease("flow-b"):
        with pytest.raises(StoreLockedError, match="leased by flow-b"), a.lease("flow-a"):
            pass


def test_lease_heartbeat_keeps_it_alive(url: str) -> None:
    a, b = create(url), AtlasStore.open(url, "r+")
    with a.lease("flow-a", ttl_s=0.6):
        time.sleep(1.5)  # > 2 ttl: only the heartbeat keeps it live
        with pytest.raises(StoreLockedError, match="flow-a"), b.lease("flow-b"):
            pass


def test_layer_lookup_suggests(url: str) -> None:
    create(url)
    with pytest.raises(
        UnknownLayerError, match=r"has no layer layer1.0.conv2; did you mean layer1.0.conv1\?"
    ) as e:
        open_atlas(url).layer("layer1.0.conv2")
    assert isinstance(e.value, StoreError)


def test_describe_and_verify(url: str) -> None:
    store = create(url)
    problems = verify_store(url)
    assert "3 sweep shard(s) not done: sweep/shard-0000, sweep/shard-0001, sweep/shard-0002" in problems
    assert (
        "layer conv1: not complete" in problems
        and f"layer conv1: missing array(s) {', '.join(s.path for s in SWEEP_ARRAYS)}" in problems
    )
    rng = np.random.default_rng(0)
    for name in LAYERS:
        store.require_array(PARTIAL_ARRAYS[0], PARTIAL_ARRAYS[0].shape(sizes()), (1, 8), layer=name)
        write_sweep(store, name, rng)
        store.set_layer_attrs(name, complete=True)
    for i in range(3):
        store.mark_done(sweep_shard_key(i))
    assert verify_store(url) == [f"layer {n}: complete but partial/ state was not removed" for n in LAYERS]
    for name in LAYERS:
        store.remove("partial", layer=name)
    assert verify_store(url) == []
    text = describe_store(url)
    assert "model resnet10t" in text and "sweep shards done 3/3" in text
    assert "layer1.0.conv1" in text and "yes" in text


def test_s3_endpoint_and_credentials_never_stored(s3_bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    import boto3

    caplog.set_level("DEBUG", logger="rfcore")

    url = s3_bucket + "/atlas.zarr"
    store = create(url)
    write_sweep(store, "conv1", np.random.default_rng(0))
    store.mark_done("sweep/shard-0000")
    with store.lease("flow"):
        store.set_layer_attrs("conv1", complete=True)
        store.add_skipped([])
    secret, key = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket.removeprefix("s3://")
    objects = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert any(o["Key"] == "atlas.zarr/zarr.json" for o in objects)  # it went to moto, not AWS
    for o in objects:
        body = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        assert secret.encode() not in body and key.encode() not in body, o["Key"]
    for text in (json.dumps(open_atlas(url).run), describe_store(url), *verify_store(url), caplog.text):
        assert secret not in text and key not in text


def test_redact_strips_userinfo() -> None:
    assert redact("s3://AKIA:secret@bucket/x") == "s3://bucket/x"
    assert redact("/tmp/a@b") == "/tmp/a@b"
