"""Attribution on a resnet10t with planted weights: the one unit wired alone to a logit has the largest
contribution to that class (and units' contributions add up to the logit, brute force); the focus map
of a planted-weight conv1 unit peaks at its planted pixel, and a max-pool unit's saliency lies inside
its receptive field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from rfcore.analysis import Unit, get_analysis, options_config
from rfcore.atlas import open_atlas
from rfcore.attribution import input_saliency
from rfcore.data import ImageDataset, open_dataset
from rfcore.models import get_model, model_meta
from rfcore.pipeline import crop_patches, layer_geometry, merge_layer, prepare_store, sweep_shard
from rfcore.receptive import receptive_fields, rf_box
from rfcore.store import AtlasStore


def load_helpers() -> Any:
    """tests/rfcore/_category_helpers.py as a module (the tests are no package)."""
    import importlib.util

    path = Path(__file__).with_name("_category_helpers.py")
    spec_ = importlib.util.spec_from_file_location("_category_helpers", path)
    assert spec_ is not None and spec_.loader is not None
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module


FakeAssets = load_helpers().FakeAssets

DATA, N, LAYERS = "synthetic:30", 30, "conv1,maxpool,layer4.0"
CLASS, UNIT = 4, 9  # layer4.0 unit UNIT alone drives the logit of CLASS
FOCUS, PIXEL = 5, (5, 2)  # conv1 channel FOCUS sees only kernel pixel PIXEL


def planted_model() -> nn.Module:
    model = get_model("resnet10t", seed=3)
    with torch.no_grad():
        model.fc.weight[CLASS] = 0.0
        model.fc.weight[CLASS, UNIT] = 1.0
        model.fc.bias.zero_()
        model.layer4[0].bn2.bias[UNIT] = 3.0  # the unit is active on every image
        model.conv1.weight[FOCUS] = 0.0
        model.conv1.weight[FOCUS, :, PIXEL[0], PIXEL[1]] = 1.0
        bn = model.bn1
        bn.weight[FOCUS], bn.bias[FOCUS], bn.running_mean[FOCUS], bn.running_var[FOCUS] = 1.0, 0.0, 0.0, 1.0
    return model


class Res:
    """Resources of the tests: the planted model and the dataset, on the CPU."""

    def __init__(self, model: nn.Module, dataset: ImageDataset) -> None:
        self.device = torch.device("cpu")
        self._model, self._dataset = model, dataset

    def model(self) -> nn.Module:
        return self._model

    def dataset(self) -> ImageDataset:
        return self._dataset


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[AtlasStore, Res]:
    url = str(tmp_path_factory.mktemp("attr") / "a")
    store = prepare_store(
        url,
        model_name="resnet10t",
        weights=None,
        data_spec=DATA,
        layers=LAYERS,
        k=3,
        shard_size=15,
        batch_size=15,
    )
    model = planted_model()
    pre = model_meta(model).preprocessing
    ds = open_dataset(DATA, size=pre.size, resize=pre.resize)
    for shard in range(store.num_shards):
        sweep_shard(url, shard, model=model, dataset=ds, device="cpu")
    for layer in store.layer_names:
        merge_layer(url, layer)
        crop_patches(url, layer, dataset=ds)
    res = Res(model, ds)
    an = get_analysis("attribution")
    head = an.plan(store, an.options({"layers": "layer4.0", "focus": False, "batch_size": 30}))
    stem = an.plan(store, an.options({"layers": "conv1,maxpool", "batch_size": 48}))
    assert len(head) == 1 and len(stem) == 4
    for unit in head + stem:
        an.run(store, unit, res)
        store.mark_done(unit.key)
    return store, res


def test_planted_unit_has_the_largest_contribution(swept: tuple[AtlasStore, Res]) -> None:
    store, res = swept
    root = zarr.open_group(store.url, mode="r")
    table = root["layers/layer4.0/attribution/contribution"][...]
    assert int(np.argmax(table[:, CLASS])) == UNIT and table[UNIT, CLASS] > 0
    assert np.allclose(np.delete(table[:, CLASS], UNIT), 0.0, atol=1e-6)  # nothing else drives it
    assert root["layers/layer4.0/attribution/top_unit"][CLASS, 0] == UNIT
    assert np.isclose(root["layers/layer4.0/attribution/domination"][UNIT, CLASS], 1.0)
    # brute force: after layer4.0 come avg-pool and fc only, so per class the units' contributions
    # add up to the mean (logit - bias) of the class's images (Euler, positively homogeneous head)
    model, ds = res.model(), res.dataset()
    pre = model_meta(model).preprocessing
    images = torch.from_numpy(np.stack([ds.get(i)[0] for i in range(N)]))
    labels = np.array([ds.get(i)[1] for i in range(N)])
    with torch.no_grad():
        logits = (model(pre.normalize(images)) - model.fc.bias).double().numpy()
    for c in np.unique(labels):
        assert np.isclose(table[:, c].sum(), logits[labels == c, c].mean(), rtol=1e-4, atol=1e-4)
    assert root["layers/layer4.0/attribution/count"][...].sum() == N


def test_logits_follow_the_models_class_of_each_label(swept: tuple[AtlasStore, Res], tmp_path: Path) -> None:
    """With labels mapped to other model classes (`ImageDataset.label_lut`, e.g. Imagenette ->
    ImageNet), a class's contribution is to its model class's logit: the planted unit now drives the
    dataset class whose label maps to logit CLASS."""
    import copy
    import shutil

    store, res = swept
    url = str(tmp_path / "copy")
    shutil.copytree(store.url, url)
    mapped = copy.copy(res.dataset())
    mapped.label_lut = (np.arange(10) + 3) % 10  # dataset class c -> logit c + 3
    an = get_analysis("attribution")
    unit = Unit(
        "attribution/layer4.0/contribution",
        "layer4.0",
        {
            "options": options_config(an.options({"layers": "layer4.0", "focus": False})),
            "part": "contribution",
        },
    )
    an.run(AtlasStore.open(url, "r+"), unit, Res(res.model(), mapped))
    top = zarr.open_group(url, mode="r")["layers/layer4.0/attribution/top_unit"][...]
    assert top[(CLASS - 3) % 10, 0] == UNIT and top[CLASS, 0] != UNIT


def test_focus_map_peaks_at_the_planted_pixel(swept: tuple[AtlasStore, Res]) -> None:
    store, _ = swept
    root = zarr.open_group(store.url, mode="r")
    focus = root["layers/conv1/attribution/focus"][FOCUS]
    geo, _, _ = layer_geometry(store, "conv1")
    assert focus.shape == (3, geo.size, geo.size) and geo.factor == 1
    for r in range(focus.shape[0]):
        assert np.unravel_index(np.argmax(focus[r]), focus[r].shape) == PIXEL
        assert np.isclose(focus[r][PIXEL], 1.0) and np.isclose(focus[r].sum(), 1.0)  # |w| = 1 only there


def test_saliency_of_a_pool_unit_lies_inside_its_rf(swept: tuple[AtlasStore, Res]) -> None:
    store, res = swept
    model, ds = res.model(), res.dataset()
    pre = model_meta(model).preprocessing
    topk = open_atlas(store.url).layer("maxpool").topk(FOCUS)
    rf = receptive_fields(model)["maxpool"]
    x = pre.normalize(torch.from_numpy(np.stack([ds.get(int(i))[0] for i in topk.image])))
    t = torch.as_tensor
    for samples in (0, 4):
        sal = input_saliency(
            model,
            "maxpool",
            x,
            t([FOCUS] * 3),
            t(topk.y.astype(np.int64)),
            t(topk.x.astype(np.int64)),
            samples=samples,
        ).numpy()
        for i in range(3):
            box = rf_box(rf, int(topk.y[i]), int(topk.x[i]), (pre.size, pre.size))
            inside = np.zeros_like(sal[i], dtype=bool)
            inside[max(box.y0, 0) : box.y1, max(box.x0, 0) : box.x1] = True
            peak = np.unravel_index(np.argmax(sal[i]), sal[i].shape)
            assert inside[peak] and sal[i].max() > 0
            assert np.allclose(sal[i][~inside], 0.0)
    focus = zarr.open_group(store.url, mode="r")["layers/maxpool/attribution/focus"][FOCUS]
    assert np.isfinite(focus).all() and (focus.reshape(3, -1).max(axis=1) > 0).all()


def test_report_and_findings(swept: tuple[AtlasStore, Res], tmp_path: Path) -> None:
    store, _ = swept
    an = get_analysis("attribution")
    atlas = open_atlas(store.url)
    assert an.verify(store) == []
    assert an.plan(store, an.options({"layers": "layer4.0", "focus": False, "batch_size": 10})) == []
    assert any(line.startswith("layer4.0: the top unit") for line in an.findings(atlas))
    assets = FakeAssets(tmp_path)
    section = an.report_channel(atlas, "conv1", FOCUS, assets)
    assert (
        section is not None
        and section.html.count('alt="focus"') == 3
        and section.html.count('alt="patch"') == 3
    )
    layer = an.report_layer(atlas, "layer4.0", assets)
    assert layer is not None and f"<td>{UNIT} (" in layer.html
    assert an.channel_columns(atlas, "layer4.0")["max_contribution"].shape == (128,)
    ds = atlas.layer("conv1").to_xarray()  # the new arrays are labelled like the sweep's
    assert ds["attribution/focus"].dims == ("channel", "k", "py", "px")
    assert ds["attribution/contribution"].dims == ("channel", "class")
