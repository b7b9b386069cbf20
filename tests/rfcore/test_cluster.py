"""Clustering: two planted groups of units (disjoint class-response profiles) and the two groups of
classes they respond to are recovered (ARI > 0.9) by k-means and Ward; out of core == in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from scipy.cluster.hierarchy import fcluster
from sklearn.metrics import adjusted_rand_score

from rfcore.analysis import get_analysis
from rfcore.atlas import open_atlas
from rfcore.cluster import class_features, class_means, cluster_items, unit_features


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

K, N, C = 10, 600, 24
GROUP = np.r_[np.zeros(C // 2, int), np.ones(C // 2, int)]  # units 0..11: group 0, 12..23: group 1
CLASS_GROUP = (np.arange(K) >= K // 2).astype(int)  # classes 0..4 drive group 0, 5..9 group 1


def planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(activation, labels): a group-g unit responds (with its own gain and tuning within the group's
    classes) to the classes of group g only, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, N)
    tuning = np.where(CLASS_GROUP[None, :] == GROUP[:, None], rng.uniform(1.0, 2.0, (C, K)), 0.0)
    gain = rng.uniform(0.5, 3.0, C)
    act = gain * (tuning[:, labels].T + rng.normal(0, 0.3, (N, C))) + rng.uniform(0, 1, C)
    act[3] = np.nan
    labels[:4] = -1
    return act.astype(np.float32), labels


def test_planted_groups_of_units_and_classes_are_recovered() -> None:
    act, labels = planted()
    means = class_means(act, labels, K)
    units = cluster_items(*unit_features(means), k_max=6)
    assert units.kmeans_k == 2 and units.ward_k == 2
    assert adjusted_rand_score(GROUP, units.kmeans_label) > 0.9
    assert adjusted_rand_score(GROUP, units.ward_label) > 0.9
    assert (
        adjusted_rand_score(GROUP, fcluster(units.linkage, 2, "maxclust")) > 0.9
    )  # the dendrogram's top split
    classes = cluster_items(*class_features(means), k_max=6)
    assert adjusted_rand_score(CLASS_GROUP, classes.kmeans_label) > 0.9
    assert adjusted_rand_score(CLASS_GROUP, classes.ward_label) > 0.9
    assert classes.kmeans_centroid.shape == (2, C) and units.linkage.shape == (C - 1, 4)
    mini = cluster_items(*unit_features(means), k_max=3, minibatch_above=8, batch_rows=8, n_init=1)
    assert mini.kmeans_k == 2 and adjusted_rand_score(GROUP, mini.kmeans_label) > 0.9


def test_silent_units_are_left_out() -> None:
    act, labels = planted()
    act[:, 5] = 0.0  # a dead unit has no profile
    units = cluster_items(*unit_features(class_means(act, labels, K)), k_max=4)
    assert units.kmeans_label[5] == -1 and 5 not in units.members
    keep = np.arange(C) != 5
    assert adjusted_rand_score(GROUP[keep], units.kmeans_label[keep]) > 0.9


def test_out_of_core_equals_in_memory() -> None:
    act, labels = planted(2)
    z = zarr.create_array(zarr.storage.MemoryStore(), shape=act.shape, chunks=(50, C), dtype="float32")
    z[...] = act
    mem, lazy = class_means(act, labels, K), class_means(z, labels, K, chunk_rows=17)
    assert np.allclose(mem, lazy, rtol=1e-10)
    a, b = cluster_items(*unit_features(mem), k_max=5), cluster_items(*unit_features(lazy), k_max=5)
    assert np.array_equal(a.kmeans_label, b.kmeans_label) and np.array_equal(a.ward_label, b.ward_label)
    assert np.allclose(a.kmeans_centroid, b.kmeans_centroid) and np.allclose(a.linkage, b.linkage)
    assert np.allclose(a.kmeans_silhouette, b.kmeans_silhouette, equal_nan=True)


def test_analysis_on_a_store(tmp_path: Path) -> None:
    act, labels = planted()
    store = make_store(str(tmp_path / "a"), act, labels, [f"c{i}" for i in range(K)], shard=128)
    an = get_analysis("cluster")
    opts = an.options({"k_max": 5, "chunk_rows": 37})
    units = an.plan(store, opts)
    assert [u.key for u in units] == ["cluster/l"]
    out = an.run(store, units[0], None)  # type: ignore[arg-type]  # reads no model
    store.mark_done(units[0].key)
    assert out["units"]["kmeans_k"] == 2 and out["classes"]["kmeans_k"] == 2
    assert an.plan(store, opts) == [] and an.verify(store) == []
    atlas = open_atlas(store.url)
    root = zarr.open_group(store.url, mode="r")
    assert adjusted_rand_score(GROUP, root["clusters/l/units/kmeans_label"][...]) > 0.9
    assert adjusted_rand_score(CLASS_GROUP, root["clusters/l/classes/ward_label"][...]) > 0.9
    assert np.isfinite(root["clusters/l/units/linkage"][...]).all()
    assert an.finish(store, opts) == {"layers": {"l": {"unit_clusters": 2, "class_clusters": 2}}}
    (line,) = an.findings(atlas)
    assert line.startswith("l: 2 category clusters")
    section = an.report_layer(atlas, "l", FakeAssets(tmp_path))
    assert section is not None and "c0, c1, c2, c3, c4" in section.html
    assert an.channel_columns(atlas, "l")["unit_cluster"].shape == (C,)
