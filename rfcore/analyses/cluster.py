"""Clustering of units and of classes per layer (`clusters/<layer>/{units,classes}/`, root scope):
units by their class-response profiles, classes by their population response vectors; k-means and
Ward (with its linkage matrix for the dendrogram), k by silhouette. The class means are accumulated
from the sweep's activation array block by block (zarr slices), so the atlas is read out of core; math in
`rfcore.cluster`."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from rfcore.analyses.selectivity import (
    activation,
    array_problems,
    draw_axes,
    group_attrs,
    labelled,
    pending_units,
    read,
    stored_config,
)
from rfcore.analysis import (
    Analysis,
    Assets,
    Resources,
    Section,
    Unit,
    atlas_layers,
    check,
    options_config,
    register,
)
from rfcore.atlas import Atlas
from rfcore.cluster import (
    CLASS_NORMS,
    UNIT_NORMS,
    class_features,
    class_means,
    cluster_items,
    k_candidates,
    unit_features,
)
from rfcore.schema import ArraySpec
from rfcore.store import AtlasStore

_NAN = float("nan")
ROOT = "clusters"
ITEMS = ("units", "classes")


def _spec(name: str, dims: tuple[str, ...], dtype: str, fill: float | int, doc: str) -> ArraySpec:
    return ArraySpec(
        f"{ROOT}/{{layer}}/{{items}}/{name}", dims, dtype, fill, doc, scope="root", analysis="cluster"
    )


ARRAYS = (
    _spec("feature", ("item", "feature"), "float32", _NAN, "normalized profile clustered (units: per class)"),
    _spec("member", ("item",), "int64", -1, "clustered items in linkage leaf order (-1 past them)"),
    _spec("k", ("candidate",), "int64", -1, "candidate numbers of clusters"),
    _spec("kmeans_label", ("item",), "int64", -1, "k-means cluster of each item (-1: left out)"),
    _spec("kmeans_centroid", ("cluster", "feature"), "float32", _NAN, "k-means centroids (NaN past k)"),
    _spec("kmeans_silhouette", ("candidate",), "float32", _NAN, "silhouette of k-means at each candidate k"),
    _spec("ward_label", ("item",), "int64", -1, "Ward cluster of each item (-1: left out)"),
    _spec("ward_silhouette", ("candidate",), "float32", _NAN, "silhouette of Ward at each candidate k"),
    _spec("linkage", ("merge", "column"), "float64", _NAN, "scipy Ward linkage matrix (NaN past n - 1)"),
)


@dataclass(frozen=True)
class ClusterOptions:
    """Options of the clustering analysis."""

    layers: str = field(default="all", metadata={"help": "all (every swept layer) or a comma list of layers"})
    k_min: int = field(default=2, metadata={"help": "smallest number of clusters tried"})
    k_max: int = field(default=10, metadata={"help": "largest number of clusters tried (at most items - 1)"})
    unit_norm: str = field(
        default="zscore", metadata={"help": f"unit profile normalization: {' | '.join(UNIT_NORMS)}"}
    )
    class_norm: str = field(
        default="zscore", metadata={"help": f"class vector normalization: {' | '.join(CLASS_NORMS)}"}
    )
    seed: int = field(default=0, metadata={"help": "seed of k-means and the silhouette sample"})
    n_init: int = field(default=4, metadata={"help": "k-means++ restarts per k"})
    minibatch_above: int = field(
        default=5000, metadata={"help": "items above which MiniBatchKMeans.partial_fit runs over chunks"}
    )
    batch_rows: int = field(default=1024, metadata={"help": "items per MiniBatchKMeans chunk"})
    chunk_rows: int = field(
        default=0, metadata={"help": "images per block read (0: the activation's chunking)"}
    )

    def __post_init__(self) -> None:
        check(bool(self.layers.strip()), "layers must name at least one layer")
        check(2 <= self.k_min <= self.k_max, "need 2 <= k_min <= k_max")
        check(self.unit_norm in UNIT_NORMS, f"unit_norm must be one of {', '.join(UNIT_NORMS)}")
        check(self.class_norm in CLASS_NORMS, f"class_norm must be one of {', '.join(CLASS_NORMS)}")
        check(self.n_init >= 1 and self.batch_rows >= 1 and self.minibatch_above >= 1, "counts must be >= 1")
        check(self.chunk_rows >= 0, "chunk_rows must be >= 0")


def _shapes(items: int, features: int, opts: Any) -> dict[str, tuple[int, ...]]:
    m = len(k_candidates(items, opts.k_min, opts.k_max))
    return {
        "feature": (items, features),
        "member": (items,),
        "k": (m,),
        "kmeans_label": (items,),
        "kmeans_centroid": (max(opts.k_max, 1), features),
        "kmeans_silhouette": (m,),
        "ward_label": (items,),
        "ward_silhouette": (m,),
        "linkage": (max(items - 1, 0), 4),
    }


@register
class ClusterAnalysis(Analysis):
    """k-means and Ward clustering of units (by class profile) and classes (by population vector)."""

    name = "cluster"
    description = "clusters of units by class-response profile and of classes by population response"
    arrays = ARRAYS
    Options = ClusterOptions
    order = 65

    def plan(self, store: AtlasStore, opts: Any) -> list[Unit]:
        _, classes = labelled(store)
        store.require_group(ROOT, config=stored_config(opts))
        units = []
        for layer in atlas_layers(store, opts.layers):
            channels = int(activation(store, layer).shape[1])
            dims = {"units": (channels, len(classes)), "classes": (len(classes), channels)}
            for items, (n, f) in dims.items():
                store.require_group(f"{ROOT}/{layer}/{items}")
                for spec in ARRAYS:
                    shape = _shapes(n, f, opts)[spec.path.rpartition("/")[2]]
                    chunks = tuple(max(s, 1) for s in shape)
                    store.require_array(spec, shape, chunks, layer=layer, items=items)
            units.append(Unit(f"cluster/{layer}", layer, {"options": options_config(opts)}))
        return pending_units(store, units)

    def run(self, store: AtlasStore, unit: Unit, res: Resources) -> dict[str, Any]:
        opts = self.options(unit.args["options"])
        layer = str(unit.layer)
        labels, classes = labelled(store)
        means = class_means(
            activation(store, layer), labels, len(classes), chunk_rows=opts.chunk_rows or None
        )
        out: dict[str, Any] = {"layer": layer}
        for items in ITEMS:
            feats, valid = (
                unit_features(means, opts.unit_norm)
                if items == "units"
                else class_features(means, opts.class_norm)
            )
            cl = cluster_items(
                feats,
                valid,
                k_min=opts.k_min,
                k_max=opts.k_max,
                seed=opts.seed,
                n_init=opts.n_init,
                minibatch_above=opts.minibatch_above,
                batch_rows=opts.batch_rows,
            )
            group = store.root[f"{ROOT}/{layer}/{items}"]
            assert isinstance(group, zarr.Group)
            member = np.full(feats.shape[0], -1, np.int64)
            member[: cl.members.size] = cl.members
            centroid = np.full(group["kmeans_centroid"].shape, np.nan)  # type: ignore[union-attr]
            centroid[: cl.kmeans_centroid.shape[0]] = cl.kmeans_centroid
            z = np.full(group["linkage"].shape, np.nan)  # type: ignore[union-attr]
            z[: cl.linkage.shape[0]] = cl.linkage
            values = {
                "feature": feats,
                "member": member,
                "k": cl.k_candidates,
                "kmeans_label": cl.kmeans_label,
                "kmeans_centroid": centroid,
                "kmeans_silhouette": cl.kmeans_silhouette,
                "ward_label": cl.ward_label,
                "ward_silhouette": cl.ward_silhouette,
                "linkage": z,
            }
            for spec in ARRAYS:
                name = spec.path.rpartition("/")[2]
                arr = group[name]
                assert isinstance(arr, zarr.Array)
                arr[...] = np.asarray(values[name]).astype(spec.dtype)
            best = {
                "kmeans_k": cl.kmeans_k,
                "ward_k": cl.ward_k,
                "kmeans_silhouette": _at(cl.kmeans_silhouette, cl.k_candidates, cl.kmeans_k),
                "ward_silhouette": _at(cl.ward_silhouette, cl.k_candidates, cl.ward_k),
                "clustered": int(cl.members.size),
            }
            group.attrs.update(best)
            out[items] = best
        return out

    def finish(self, store: AtlasStore, opts: Any) -> dict[str, Any]:
        atlas = Atlas(store)
        out = {}
        for layer in atlas_layers(store, opts.layers):
            u = group_attrs(atlas, f"{ROOT}/{layer}/units") or {}
            c = group_attrs(atlas, f"{ROOT}/{layer}/classes") or {}
            if "kmeans_k" in u and "kmeans_k" in c:
                out[layer] = {"unit_clusters": u["kmeans_k"], "class_clusters": c["kmeans_k"]}
        return {"layers": out}

    def verify(self, store: AtlasStore) -> list[str]:
        problems = []
        atlas = Atlas(store)
        for layer in store.layer_names:
            if group_attrs(atlas, f"{ROOT}/{layer}") is None:
                continue
            done = not store.pending([f"cluster/{layer}"])
            for items in ITEMS:
                found = array_problems(store, ARRAYS, layer, {}, items=items)
                problems += [f"cluster: {p}" for p in found if done or "missing" not in p]
        return problems

    def findings(self, atlas: Atlas) -> list[str]:
        out = []
        for layer in atlas.layers:
            u = group_attrs(atlas, f"{ROOT}/{layer}/units") or {}
            c = group_attrs(atlas, f"{ROOT}/{layer}/classes") or {}
            if "kmeans_k" in u and "kmeans_k" in c:
                out.append(
                    f"{layer}: {c['kmeans_k']} category clusters (k-means, silhouette "
                    f"{_fmt(c.get('kmeans_silhouette'))}; Ward {c['ward_k']}), "
                    f"{u['kmeans_k']} clusters of {u['clustered']} units by class profile"
                )
        return out

    def report_layer(self, atlas: Atlas, layer: str, assets: Assets) -> Section | None:
        base = f"{ROOT}/{layer}"
        if (
            group_attrs(atlas, f"{base}/classes") is None
            or read(atlas, f"{base}/classes/kmeans_label") is None
        ):
            return None
        from scipy.cluster.hierarchy import dendrogram

        classes = atlas.classes
        parts = []
        for items in ITEMS:
            attrs = group_attrs(atlas, f"{base}/{items}") or {}
            label = read(atlas, f"{base}/{items}/kmeans_label")
            z = read(atlas, f"{base}/{items}/linkage")
            member = read(atlas, f"{base}/{items}/member")
            if label is None or z is None or member is None or "kmeans_k" not in attrs:
                continue
            z = z[np.isfinite(z).all(axis=1)]
            member = member[member >= 0]
            names = [classes[i] if items == "classes" and i < len(classes) else str(i) for i in member]
            if z.shape[0] >= 1:

                def draw(target: Any, z: np.ndarray = z, names: list[str] = names) -> None:
                    ax = draw_axes(target)
                    dendrogram(z, ax=ax, labels=names, leaf_font_size=6, no_labels=len(names) > 60)
                    ax.set_ylabel("Ward distance")

                url = assets.figure(f"clusters-{layer}-{items}", draw, size=(6, 3))
                parts.append(f'<img src="{html.escape(url)}" alt="{items} dendrogram">')
            rows = []
            for k in range(int(attrs["kmeans_k"])):
                idx = np.flatnonzero(label == k)
                shown = [classes[i] if items == "classes" and i < len(classes) else str(i) for i in idx[:40]]
                more = f" … (+{idx.size - 40})" if idx.size > 40 else ""
                rows.append(
                    f"<tr><td>{k}</td><td>{idx.size}</td><td>{html.escape(', '.join(shown))}{more}</td></tr>"
                )
            parts.append(
                f"<p>{items}: {attrs['kmeans_k']} k-means clusters (silhouette "
                f"{_fmt(attrs.get('kmeans_silhouette'))}), Ward {attrs.get('ward_k')}</p>"
                f"<table><tr><th>cluster</th><th>size</th><th>members</th></tr>{''.join(rows)}</table>"
            )
        return Section("Clusters of units and categories", "".join(parts)) if parts else None

    def channel_columns(self, atlas: Atlas, layer: str) -> dict[str, np.ndarray]:
        label = read(atlas, f"{ROOT}/{layer}/units/kmeans_label")
        return {} if label is None else {"unit_cluster": label}


def _at(sil: np.ndarray, ks: np.ndarray, k: int) -> float | None:
    hit = np.flatnonzero(ks == k)
    return float(sil[hit[0]]) if hit.size and np.isfinite(sil[hit[0]]) else None


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{float(value):.2f}"
