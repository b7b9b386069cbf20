"""Category selectivity: a planted class-evidence unit is the most selective (right class, p < 0.01);
definitions against brute force; out of core (zarr slices, small chunks) == in memory; the analysis on a store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

import rfcore.selectivity
from rfcore.analysis import AnalysisError, get_analysis
from rfcore.atlas import open_atlas
from rfcore.data import open_dataset
from rfcore.errors import UnknownLayerError
from rfcore.models import default_preprocessing, get_model
from rfcore.pipeline import merge_layer, prepare_store, run_sweep, sweep_shard
from rfcore.selectivity import (
    category_selectivity,
    lifetime_sparseness,
    selectivity_index,
)
from rfcore.synthetic import SYNTHETIC_CLASSES, grating


def load_helpers() -> Any:
    """tests/rfcore/_category_helpers.py as a module (the tests are no package)."""
    import importlib.util

    path = Path(__file__).with_name("_category_helpers.py")
    spec_ = importlib.util.spec_from_file_location("_category_helpers", path)
    assert spec_ is not None and spec_.loader is not None
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module


_helpers = load_helpers()
make_store, FakeAssets = _helpers.make_store, _helpers.FakeAssets

K, N, C, PLANTED, CLASS = 10, 400, 12, 7, 3
CLASSES = [f"class{i}" for i in range(K)]


def planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(activation, labels): unit PLANTED responds to the evidence of class CLASS; the others are
    noise with small random class offsets; a few unlabelled and skipped images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, N)
    act = rng.gamma(2.0, 1.0, (N, C)) + rng.uniform(0, 0.3, (K, C))[labels]
    act[:, PLANTED] = np.maximum(rng.normal(0.2, 0.3, N) + 2.0 * (labels == CLASS), 0)
    labels[:5] = -1
    act[10:13] = np.nan
    return act.astype(np.float32), labels


def test_planted_class_evidence_unit_is_most_selective() -> None:
    act, labels = planted()
    sel = category_selectivity(act, labels, K, n_permutations=300, seed=1)
    assert int(np.nanargmax(sel.index)) == PLANTED
    assert sel.preferred_class[PLANTED] == CLASS
    assert sel.p_value[PLANTED] < 0.01
    assert np.nanargmax(sel.sparseness) == PLANTED  # a one-class unit is also the sparsest
    ok = (labels >= 0) & np.isfinite(act).all(axis=1)
    assert sel.count.tolist() == np.bincount(labels[ok], minlength=K).tolist()


def test_a_unit_wired_to_one_synthetic_class_is_the_most_selective(tmp_path: Path) -> None:
    """resnet10t whose conv1 channel 0 is the grating of one synthetic class (its orientation, spatial
    frequency and colour axis, drawn by the dataset's own renderer under a small Gaussian window),
    thresholded by its BatchNorm: after the max-pool it carries that class's evidence; the sweep,
    then the analysis find it the most selective unit, preferring that class."""
    pre = default_preprocessing("resnet10t")
    target = max(
        (i for i, c in enumerate(SYNTHETIC_CLASSES) if c.colour == "blue-yellow"),
        key=lambda i: (SYNTHETIC_CLASSES[i].cycles, SYNTHETIC_CLASSES[i].orientation),
    )  # a fine grating: one that a 7x7 filter resolves
    cls = SYNTHETIC_CLASSES[target]
    u = (np.arange(7) - 3) / pre.resize
    w = grating((u[None, :], u[:, None]), orientation=cls.orientation, cycles=cls.cycles, colour=cls.colour,
                centre=(0.0, 0.0), sigma=2.5 / pre.resize)  # fmt: skip
    w = 8.0 * (w - w.mean()) / np.abs(w - w.mean()).sum()
    model = get_model("resnet10t", seed=0)
    with torch.no_grad():
        model.conv1.weight[0] = torch.tensor(w, dtype=torch.float32)
        bn = model.bn1
        bn.weight[0], bn.bias[0], bn.running_mean[0], bn.running_var[0] = 1.0, -0.5, 0.0, 1.0
    url, data = str(tmp_path / "w"), "synthetic:200"
    store = prepare_store(
        url,
        model_name="resnet10t",
        weights=None,
        data_spec=data,
        layers="maxpool",
        k=2,
        shard_size=100,
        batch_size=100,
    )
    ds = open_dataset(data, size=pre.size, resize=pre.resize)
    for shard in range(store.num_shards):
        sweep_shard(url, shard, model=model, dataset=ds, device="cpu")
    merge_layer(url, "maxpool")
    sel = get_analysis("selectivity")
    (unit,) = sel.plan(store, sel.options({"n_permutations": 200}))
    sel.run(store, unit, None)  # type: ignore[arg-type]  # reads no model
    cols = sel.channel_columns(open_atlas(url), "maxpool")
    assert int(np.nanargmax(cols["selectivity"])) == 0
    assert cols["preferred_class"][0] == target and cols["selectivity_p"][0] < 0.01


def test_definitions_match_brute_force() -> None:
    act, labels = planted(3)
    sel = category_selectivity(act, labels, K, n_permutations=20)
    ok = (labels >= 0) & np.isfinite(act).all(axis=1)
    for c in (0, PLANTED):
        means = np.array([act[ok & (labels == k), c].astype(np.float64).mean() for k in range(K)])
        sems = np.array([act[ok & (labels == k), c].astype(np.float64).std(ddof=1) for k in range(K)])
        sems /= np.sqrt(np.bincount(labels[ok], minlength=K))
        best = means.max()
        others = (means.sum() - best) / (K - 1)
        assert np.allclose(sel.mean[c], means) and np.allclose(sel.sem[c], sems)
        assert np.isclose(sel.index[c], (best - others) / (best + others))
        r = act[ok, c].astype(np.float64)
        n = r.size
        s = (1 - (r.sum() / n) ** 2 / (r @ r / n)) / (1 - 1 / n)
        assert np.isclose(sel.sparseness[c], s)
    # extremes: a one-class unit has index 1, a flat one 0; one-stimulus sparseness is 1, flat 0
    assert selectivity_index(np.array([[0.0, 0.0, 5.0], [2.0, 2.0, 2.0]])).tolist() == [1.0, 0.0]
    assert np.isnan(selectivity_index(np.zeros((1, 3))))[0]
    assert np.isclose(selectivity_index(np.array([[-1.0, 1.0]]), "shift")[0], 1.0)
    assert np.isnan(selectivity_index(np.array([[-1.0, 1.0]]), "nan")[0])
    r = np.array([0.0, 0.0, 0.0, 4.0])
    assert np.isclose(lifetime_sparseness(r.mean(), (r * r).mean(), 4), 1.0)
    assert np.isclose(lifetime_sparseness(np.float64(1.0), np.float64(1.0), 4), 0.0)


def test_out_of_core_equals_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    act, labels = planted(5)
    z = zarr.create_array(zarr.storage.MemoryStore(), shape=act.shape, chunks=(64, C), dtype="float32")
    z[...] = act
    memory = category_selectivity(act, labels, K, n_permutations=50, seed=2)
    monkeypatch.setattr(rfcore.selectivity, "_PERM_SUM_BYTES", 8 * K * C * 7)  # 8 passes of <= 7 shuffles
    lazy = category_selectivity(z, labels, K, n_permutations=50, seed=2, chunk_rows=23)
    for name in ("mean", "sem", "index", "sparseness"):
        assert np.allclose(getattr(memory, name), getattr(lazy, name), rtol=1e-10, equal_nan=True), name
    assert np.array_equal(memory.p_value, lazy.p_value)
    assert np.array_equal(memory.preferred_class, lazy.preferred_class)


def test_analysis_writes_the_layer_group(tmp_path: Path) -> None:
    act, labels = planted()
    store = make_store(str(tmp_path / "a"), act, labels, CLASSES)
    sel = get_analysis("selectivity")
    opts = sel.options({"n_permutations": "300", "seed": 1, "chunk_rows": 50})
    units = sel.plan(store, opts)
    assert [u.key for u in units] == ["selectivity/l"]
    for unit in units:
        sel.run(store, unit, None)  # type: ignore[arg-type]  # reads no model
        store.mark_done(unit.key)
    assert sel.plan(store, opts) == []
    assert sel.verify(store) == []
    atlas = open_atlas(store.url)
    assert atlas.labels().tolist() == labels.tolist() and atlas.classes == CLASSES
    cols = sel.channel_columns(atlas, "l")
    assert int(np.nanargmax(cols["selectivity"])) == PLANTED
    assert cols["preferred_class"][PLANTED] == CLASS and cols["selectivity_p"][PLANTED] < 0.01
    g = atlas.layer("l").group["selectivity"]
    assert g.attrs["distribution"]["units"] == C and g.attrs["classes"] == CLASSES
    assert 0 < g.attrs["distribution"]["median"] < 1
    assert sel.finish(store, opts)["layers"]["l"]["units"] == C
    (line,) = sel.findings(atlas)
    assert line.startswith("l: median class selectivity")
    assets = FakeAssets(tmp_path)
    section = sel.report_channel(atlas, "l", PLANTED, assets)
    assert section is not None and "prefers class3" in section.html
    assert sel.report_layer(atlas, "l", assets) is not None
    # other options on the same results: refused before anything is written
    with pytest.raises(Exception, match="other options"):
        sel.plan(store, sel.options({"n_permutations": 10}))
    with pytest.raises(UnknownLayerError, match="has no layer nope"):
        sel.plan(store, sel.options({"layers": "nope"}))


def test_options_are_checked() -> None:
    sel = get_analysis("selectivity")
    for bad in ({"n_permutations": 0}, {"negative": "abs"}, {"alpha": 2}, {"sparseness_over": "x"}):
        with pytest.raises(AnalysisError):
            sel.options(bad)


def test_unlabelled_atlas_is_refused(tmp_path: Path) -> None:
    act, _ = planted()
    store = make_store(str(tmp_path / "u"), act, np.full(N, -1), [])
    with pytest.raises(AnalysisError, match="no labelled images"):
        get_analysis("selectivity").plan(store, get_analysis("selectivity").options())


def test_sweep_records_labels_and_paths(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    run_sweep(
        url,
        model_name="resnet10t",
        data_spec="synthetic:12",
        layers="conv1",
        k=2,
        shard_size=6,
        batch_size=6,
        device="cpu",
        progress=False,
    )
    atlas = open_atlas(url)
    pre = default_preprocessing("resnet10t")
    ds = open_dataset("synthetic:12", size=pre.size, resize=pre.resize)
    assert atlas.classes == ds.class_names
    assert atlas.labels().tolist() == [ds.get(i)[1] for i in range(12)]
    assert atlas.paths().tolist() == [ds.describe(i) for i in range(12)]
