"""rfcore.pipeline: 1 shard == 4 shards bit for bit, resume after a lost marker, in-memory equality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import rfcore
from rfcore.data import BadImageError, ImageDataset, open_dataset
from rfcore.errors import ConfigMismatchError, StoreError
from rfcore.models import get_model
from rfcore.pipeline import (
    crop_patches,
    layer_geometry,
    merge_layer,
    prepare_store,
    run_sweep,
    sweep_shard,
    sweep_shards,
)
from rfcore.store import AtlasStore
from rfcore.sweep import LayerReducer, SweepConfig, crop_topk_patches, sweep_dataset, unpack_state

MODEL, DATA, N, BATCH, K = "resnet10t", "synthetic:24", 24, 6, 4
LAYERS = "conv1,layer1.0,layer4.0"  # layer4.0: RF 195 px > patch_max, pooled by 4


def read(url: str, path: str) -> np.ndarray:
    return np.asarray(zarr.open_array(url, path=path, mode="r")[...])


def attrs(url: str, path: str = "") -> dict[str, Any]:
    return dict(zarr.open_group(url, path=path, mode="r").attrs.asdict())


def arrays(url: str) -> dict[str, np.ndarray]:
    root = zarr.open_group(url, mode="r")
    out: dict[str, np.ndarray] = {}

    def walk(group: zarr.Group, prefix: str) -> None:
        for name, node in group.members():
            if isinstance(node, zarr.Array):
                out[prefix + name] = np.asarray(node[...])
            elif name != "_state":
                walk(node, prefix + name + "/")

    walk(root, "")
    return out


def assert_same_arrays(a: str, b: str) -> None:
    xa, xb = arrays(a), arrays(b)
    assert sorted(xa) == sorted(xb)
    assert not any("partial" in key for key in xa)
    for key in xa:
        assert xa[key].dtype == xb[key].dtype, key
        assert np.array_equal(xa[key], xb[key], equal_nan=xa[key].dtype.kind == "f"), key


def sweep(url: str, shard_size: int) -> dict[str, Any]:
    return run_sweep(
        url,
        model_name=MODEL,
        data_spec=DATA,
        layers=LAYERS,
        k=K,
        shard_size=shard_size,
        batch_size=BATCH,
        device="cpu",
        progress=False,
    )


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("atlas") / "one")
    out = sweep(url, N)
    assert out["images"] == N and out["skipped"] == 0
    return url


def test_one_shard_equals_four_shards(one_shard: str, tmp_path: Path) -> None:
    url = str(tmp_path / "four")
    sweep(url, 5)  # rounded up to 6 = one batch: 4 shards
    assert attrs(url)["run"]["config"]["shard_size"] == BATCH
    assert_same_arrays(one_shard, url)


def test_rerun_after_lost_shard_marker_gives_same_store(one_shard: str, tmp_path: Path) -> None:
    url = str(tmp_path / "resume")
    store = prepare_store(
        url,
        model_name=MODEL,
        weights=None,
        data_spec=DATA,
        layers=LAYERS,
        k=K,
        shard_size=12,
        batch_size=BATCH,
    )
    model = get_model(MODEL)
    ds = open_dataset(DATA, size=64)
    for shard in range(store.num_shards):
        sweep_shard(url, shard, model=model, dataset=ds, device="cpu")
    with pytest.raises(StoreError, match="not merged"):
        crop_patches(url, "conv1", dataset=ds)
    # shard 1 "crashed" after writing garbage, before its marker
    act = zarr.open_array(url, path="layers/conv1/activation", mode="r+")
    act[12:24] = 7.0
    part = zarr.open_array(url, path="layers/layer4.0/partial/state", mode="r+")
    part[1] = 123
    (Path(url) / "_state" / "done" / "sweep" / "shard-0001").unlink()
    with pytest.raises(StoreError, match="shard"):
        merge_layer(url, "conv1")
    assert sweep(url, 12)["images"] == 12  # only shard 1 is swept again
    assert_same_arrays(one_shard, url)
    assert sweep(url, 12)["images"] == 0  # everything done: nothing recomputed


def test_a_group_of_shards_has_one_state_row_and_one_marker(one_shard: str, tmp_path: Path) -> None:
    """Shards swept together keep one reducer state (row = first shard) and one marker listing them;
    a group killed before its marker is swept again as a whole, to the same bits."""
    url = str(tmp_path / "groups")
    prepare_store(url, model_name=MODEL, weights=None, data_spec=DATA, layers=LAYERS, k=K,
                  shard_size=BATCH, batch_size=BATCH)  # fmt: skip
    model, ds = get_model(MODEL), open_dataset(DATA, size=64)
    sweep_shards(url, [0, 1], model=model, dataset=ds, device="cpu")
    sweep_shards(url, [2, 3], model=model, dataset=ds, device="cpu", checkpoint_seconds=0.0)
    store = AtlasStore.open(url)
    assert store.swept_shards() == {0: "sweep/shard-0000", 1: "sweep/shard-0000", 2: "sweep/shard-0002",
                                    3: "sweep/shard-0003"}  # fmt: skip
    assert (store.marker("sweep/shard-0000") or {})["info"]["shards"] == [0, 1]
    geo, channels, _ = layer_geometry(store, "conv1")
    layout = LayerReducer.state_layout(channels, geo, K)
    rows = read(url, "layers/conv1/partial/state")
    positions = [int(unpack_state(row, layout)["position_count"]) for row in rows]
    assert positions[1] == 0 and positions[0] == 2 * positions[2] == 2 * positions[3] > 0
    # group [0, 1] "killed" before its marker, with garbage written
    zarr.open_array(url, path="layers/conv1/activation", mode="r+")[0:12] = 7.0
    zarr.open_array(url, path="layers/layer4.0/partial/state", mode="r+")[0] = 123
    (Path(url) / "_state" / "done" / "sweep" / "shard-0000").unlink()
    assert store.pending_shards() == [0, 1]
    assert sweep(url, BATCH)["images"] == 12
    assert_same_arrays(one_shard, url)


def test_store_matches_in_memory_reducers(one_shard: str) -> None:
    model = get_model(MODEL)
    ds = open_dataset(DATA, size=64)
    reducers = sweep_dataset(model, ds, LAYERS, SweepConfig(k=K, batch_size=BATCH, device="cpu"))
    for name, red in reducers.items():
        res = red.result()
        layer = f"layers/{name}"
        assert attrs(one_shard, layer)["complete"] is True
        assert attrs(one_shard, layer)["patch"]["factor"] == red.geometry.factor
        for path, want in (
            ("topk/image", res.topk_image),
            ("topk/value", res.topk_value),
            ("topk/y", res.topk_y),
            ("topk/x", res.topk_x),
            ("mean_stimulus", res.mean_stimulus),
            ("positive_count", res.positive_count),
            ("mean_stimulus_centre", res.mean_stimulus_centre),
            ("positive_count_centre", res.positive_count_centre),
            ("max", res.max),
            ("mean", res.mean),
            ("zero_fraction", res.zero_fraction),
        ):
            np.testing.assert_array_equal(read(one_shard, f"{layer}/{path}"), want, err_msg=path)
        act = read(one_shard, f"{layer}/activation")
        np.testing.assert_array_equal(act.max(axis=0), res.max)
        top = res.topk_image[:, 0]
        np.testing.assert_array_equal(act[top, np.arange(len(top))], res.topk_value[:, 0])
        shape = (red.channels, K, 3, red.geometry.size, red.geometry.size)
        assert read(one_shard, f"{layer}/topk/patch").shape == shape
        # crop_layers (each image read once for all layers) == crop_topk_patches of the layer alone
        want = crop_topk_patches(ds, red.geometry, res.topk_image, res.topk_y, res.topk_x)
        np.testing.assert_array_equal(read(one_shard, f"{layer}/topk/patch"), want)
    assert attrs(one_shard, "layers/layer4.0")["patch"]["factor"] == 4


class Flaky(ImageDataset):
    """Synthetic images, but image 4 is unreadable."""

    def __init__(self) -> None:
        self.inner = open_dataset(DATA, size=64)
        super().__init__("flaky", 64, 64, self.inner.class_names)
        self.fingerprint = self.inner.fingerprint  # the same images as the atlas's data

    def __len__(self) -> int:
        return len(self.inner)

    def get(self, index: int) -> tuple[np.ndarray, int]:
        if index == 4:
            raise BadImageError("flaky[4]", "truncated file")
        return self.inner.get(index)


def test_skipped_images_are_nan_rows_and_reported(tmp_path: Path) -> None:
    url = str(tmp_path / "skip")
    prepare_store(
        url,
        model_name=MODEL,
        weights=None,
        data_spec=DATA,
        layers="conv1",
        k=K,
        shard_size=12,
        batch_size=BATCH,
    )
    ds = Flaky()
    out = sweep_shard(url, 0, model=get_model(MODEL), dataset=ds, device="cpu")
    want = [{"index": 4, "path": "flaky[4]", "reason": "truncated file"}]
    assert out["skipped"] == want and out["images"] == 11
    act = read(url, "layers/conv1/activation")
    assert np.isnan(act[4]).all() and not np.isnan(act[:4]).any() and np.isnan(act[12:]).all()
    labels = read(url, "images/label")  # skipped and not yet swept images are unlabelled
    assert labels[4] == -1 and (labels[12:] == -1).all()
    assert labels[:12].tolist() == [-1 if i == 4 else ds.inner.get(i)[1] for i in range(12)]
    again = sweep_shard(url, 0, model=get_model(MODEL), dataset=ds, device="cpu")
    assert again["cached"] and again["skipped"] == want


def test_linear_layer_units_see_the_whole_image(tmp_path: Path) -> None:
    """`fc` (B, C) outputs are swept as 1x1 maps: top-k = the images with the highest logits."""
    import torch

    url = str(tmp_path / "fc")
    run_sweep(url, model_name=MODEL, data_spec=DATA, layers="fc", k=K, shard_size=12, batch_size=BATCH,
              device="cpu", progress=False)  # fmt: skip
    model, ds = get_model(MODEL), open_dataset(DATA, size=64)
    images = torch.from_numpy(np.stack([ds.get(i)[0] for i in range(N)]))
    with torch.inference_mode():
        logits = model(model.rfatlas_meta.preprocessing.normalize(images)).numpy()
    a = rfcore.open_atlas(url).layer("fc")
    order = np.argsort(-logits, axis=0, kind="stable")[:K].T  # (class, k), ties to the lower index
    np.testing.assert_array_equal(read(url, "layers/fc/topk/image"), order)
    np.testing.assert_allclose(read(url, "layers/fc/activation"), logits, rtol=1e-5, atol=1e-5)
    assert a.to_xarray()["topk/patch"].shape[-1] == 64 and (read(url, "layers/fc/topk/y") == 0).all()


def test_seed_of_a_random_model_is_part_of_the_identity(tmp_path: Path) -> None:
    url = str(tmp_path / "seeded")
    common: dict[str, Any] = dict(model_name=MODEL, weights=None, data_spec=DATA, layers="conv1", k=K,
                                  shard_size=12, batch_size=BATCH)  # fmt: skip
    prepare_store(url, seed=0, **common)
    prepare_store(url, seed=0, **common)  # same identity: reopens
    with pytest.raises(ConfigMismatchError, match="seed"):
        prepare_store(url, seed=1, **common)


@pytest.mark.parametrize(
    "field, value",
    [
        ("weights", "s3://key:secret@bucket/model.pt"),
        ("data_spec", "zarr:s3://key:secret@bucket/images.zarr"),
    ],
)
def test_urls_with_credentials_are_refused(tmp_path: Path, field: str, value: str) -> None:
    kwargs: dict[str, Any] = dict(model_name=MODEL, weights=None, data_spec=DATA, layers="conv1")
    kwargs[field] = value
    with pytest.raises(StoreError, match="embeds credentials") as info:
        prepare_store(str(tmp_path / "creds"), **kwargs)
    assert "secret" not in str(info.value)
    assert not (tmp_path / "creds").exists()


def test_corrupt_jpeg_is_skipped_and_listed_in_the_atlas(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "val"
    for k in range(5):
        (folder / "cls").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (40 * k, 100, 0)).save(folder / "cls" / f"i{k}.jpg", format="JPEG")
    bad = folder / "cls" / "i2.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    url = str(tmp_path / "folder.zarr")
    out = run_sweep(url, model_name=MODEL, data_spec=f"imagefolder:{folder}", layers="conv1", k=2,
                    shard_size=4, batch_size=2, device="cpu", progress=False)  # fmt: skip
    assert out["images"] == 4 and out["skipped"] == 1
    atlas = rfcore.open_atlas(url)
    assert [(s["index"], Path(s["path"]).name) for s in atlas.skipped] == [(2, "i2.jpg")]
    act = read(url, "layers/conv1/activation")
    assert np.isnan(act[2]).all() and not np.isnan(np.delete(act, 2, axis=0)).any()
    assert 2 not in read(url, "layers/conv1/topk/image")


def test_weights_digest_names_the_atlas_and_guards_its_identity(tmp_path: Path) -> None:
    """`{weights_digest}` in the store URL: one atlas per checkpoint contents; the same URL with
    new contents is refused, never mixed."""
    import torch

    from rfcore.models import model_meta, save_checkpoint

    ckpt = str(tmp_path / "latest.pt")
    common: dict[str, Any] = dict(model_name=MODEL, data_spec=DATA, layers="conv1", k=K, shard_size=12,
                                  batch_size=BATCH)  # fmt: skip
    save_checkpoint(get_model(MODEL, seed=1), ckpt, config={}, metrics={})
    first = prepare_store(str(tmp_path / "atlas-{weights_digest}.zarr"), weights=ckpt, **common)
    digest = model_meta(get_model(MODEL, weights=ckpt)).weights_digest
    assert (
        digest
        and first.url == str(tmp_path / f"atlas-{digest}.zarr")
        and first.run["weights_digest"] == digest
    )
    again = prepare_store(str(tmp_path / "atlas-{weights_digest}.zarr"), weights=ckpt, **common)
    assert again.url == first.url  # unchanged checkpoint: the same atlas (resume)
    model = get_model(MODEL, seed=2)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(model, ckpt, config={}, metrics={})  # a new `latest.pt`
    with pytest.raises(ConfigMismatchError, match="weights_digest"):
        prepare_store(first.url, weights=ckpt, **common)
    second = prepare_store(str(tmp_path / "atlas-{weights_digest}.zarr"), weights=ckpt, **common)
    assert second.url != first.url
    with pytest.raises(StoreError, match="no checkpoint file"):
        prepare_store(str(tmp_path / "random-{weights_digest}.zarr"), weights=None, **common)


def test_crop_in_small_passes_equals_one_pass(one_shard: str, tmp_path: Path) -> None:
    """Images held per pass do not change the patches (each image is still read once)."""
    import shutil

    from rfcore.pipeline import crop_layers
    from rfcore.store import AtlasStore

    url = str(tmp_path / "copy")
    shutil.copytree(one_shard, url)
    store = AtlasStore.open(url, "r+")
    layers = list(store.run["config"]["layers"])
    reads: list[int] = []

    class Counting(ImageDataset):
        def __init__(self) -> None:
            self.inner = open_dataset(DATA, size=64)
            super().__init__(DATA, 64, 64, [])

        def __len__(self) -> int:
            return len(self.inner)

        def get(self, index: int) -> tuple[np.ndarray, int]:
            reads.append(index)
            return self.inner.get(index)

    for layer in layers:
        store.remove("topk/patch", layer=layer)
        (Path(url) / "_state" / "done" / "crop" / layer).unlink()
    crop_layers(url, layers, dataset=Counting(), images_per_pass=3)
    assert len(reads) == len(set(reads))
    for layer in layers:
        path = f"layers/{layer}/topk/patch"
        np.testing.assert_array_equal(read(url, path), read(one_shard, path))


def test_plain_xarray_open_zarr_gets_coordinates(one_shard: str) -> None:
    """`xarray.open_zarr` of a layer group (no rfatlas code) labels image, channel and k, with each
    image's label, class name and path, so activations group by class."""
    import xarray as xr

    ds = xr.open_zarr(one_shard, group="layers/layer1.0", consolidated=False, chunks=None)
    labels = read(one_shard, "images/label")
    paths = read(one_shard, "images/path")
    classes = attrs(one_shard)["classes"]
    assert ds["image"].values.tolist() == list(range(N)) and ds["label"].values.tolist() == labels.tolist()
    assert ds["channel"].values.tolist() == list(range(ds.sizes["channel"]))
    assert ds["path"].values.tolist() == paths.tolist()
    assert ds["class_name"].values.tolist() == [classes[i] for i in labels]
    assert {"label", "class_name", "path"} <= set(ds.coords) and "activation" in ds.data_vars
    act = read(one_shard, "layers/layer1.0/activation")
    by_label = ds["activation"].groupby("label").mean()
    want = np.stack([act[labels == lab].mean(axis=0) for lab in by_label["label"].values])
    np.testing.assert_allclose(by_label.values, want, rtol=1e-6)
    topk = xr.open_zarr(one_shard, group="layers/layer1.0/topk", consolidated=False)
    assert topk["k"].values.tolist() == list(range(K)) and "channel" in topk.coords
    assert float(topk["value"].sel(channel=3, k=0)) == read(one_shard, "layers/layer1.0/topk/value")[3, 0]
