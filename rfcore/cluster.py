"""Clustering of a layer's units by their class-response profiles, and of classes by their population
response vectors (pure math, scikit-learn and scipy; no store I/O).

Both start from the (units x classes) matrix of class-mean responses, which `class_means` accumulates
block by block (a zarr activation array is read out of core, slice by slice). k-means (`KMeans`, or
`MiniBatchKMeans.partial_fit` over row chunks above `minibatch_above` items) and agglomerative Ward
clustering (scipy linkage, kept for the dendrogram) each pick k by the silhouette score over
`[k_min, k_max]`. Definitions and sources: docs/category.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rfcore.errors import DataError
from rfcore.selectivity import class_stats

UNIT_NORMS = ("zscore", "l2", "none")
CLASS_NORMS = ("zscore", "none")
_SILHOUETTE_SAMPLE = 5000  # silhouette on a seeded sample above this many items

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


def class_means(
    activation: Any, labels: NDArray[np.integer[Any]], num_classes: int, *, chunk_rows: int | None = None
) -> F64:
    """(units, classes) mean response per class, accumulated over row blocks."""
    return class_stats(activation, labels, num_classes, chunk_rows=chunk_rows).mean


def unit_features(means: F64, norm: str = "zscore") -> tuple[F64, NDArray[np.bool_]]:
    """Units' class-response profiles (rows) and which units are clusterable: "zscore" standardizes
    each profile across classes (its shape, not its gain), "l2" scales it to unit length, "none"
    keeps it. Units with a constant or non-finite profile are left out (a silent unit has no shape)."""
    if norm not in UNIT_NORMS:
        raise DataError(f"unit norm must be one of {', '.join(UNIT_NORMS)}, not {norm!r}")
    x = np.asarray(means, dtype=np.float64)
    finite: NDArray[np.bool_] = np.asarray(np.isfinite(x).all(axis=1))
    x = np.where(finite[:, None], x, 0.0)
    spread = x.std(axis=1)
    valid = finite & (spread > 1e-12 * np.maximum(np.abs(x).max(axis=1), 1e-300))
    if norm == "zscore":
        x = (x - x.mean(axis=1, keepdims=True)) / np.where(valid, spread, 1.0)[:, None]
    elif norm == "l2":
        length = np.linalg.norm(x, axis=1)
        x = x / np.where(length > 0, length, 1.0)[:, None]
    return x, valid


def class_features(means: F64, norm: str = "zscore") -> tuple[F64, NDArray[np.bool_]]:
    """Classes' population response vectors (rows: classes, columns: units); "zscore" standardizes
    each unit across classes (so that no unit dominates by its scale; a constant unit becomes 0).
    Classes with non-finite responses (no images) are left out."""
    if norm not in CLASS_NORMS:
        raise DataError(f"class norm must be one of {', '.join(CLASS_NORMS)}, not {norm!r}")
    x = np.asarray(means, dtype=np.float64).T
    valid: NDArray[np.bool_] = np.asarray(np.isfinite(x).all(axis=1))
    x = np.where(valid[:, None], x, 0.0)
    if norm == "zscore" and valid.any():
        mu, sd = x[valid].mean(axis=0), x[valid].std(axis=0)
        keep = sd > 1e-12 * np.maximum(np.abs(x[valid]).max(axis=0), 1e-300)
        x = np.where(keep, (x - mu) / np.where(keep, sd, 1.0), 0.0)
        x[~valid] = 0.0
    return x, valid


@dataclass
class Clustering:
    """k-means and Ward clusterings of one set of items; labels are -1 for items left out."""

    members: I64  # (n,) indices of the clustered items (linkage leaves refer to these rows)
    k_candidates: I64  # (m,) candidate numbers of clusters
    kmeans_label: I64  # (items,)
    kmeans_centroid: F64  # (k, features)
    kmeans_silhouette: F64  # (m,) silhouette per candidate (NaN: not computable)
    kmeans_k: int
    ward_label: I64  # (items,)
    linkage: F64  # (n - 1, 4) scipy linkage matrix over `members`
    ward_silhouette: F64  # (m,)
    ward_k: int


def k_candidates(n: int, k_min: int = 2, k_max: int = 10) -> I64:
    """Numbers of clusters whose silhouette is defined for n items: max(2, k_min) .. min(k_max, n - 1)."""
    return np.arange(max(2, k_min), min(k_max, n - 1) + 1, dtype=np.int64)


def _silhouette(x: F64, labels: I64, seed: int) -> float:
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) > x.shape[0] - 1:
        return float("nan")
    sample = _SILHOUETTE_SAMPLE if x.shape[0] > _SILHOUETTE_SAMPLE else None
    from sklearn.metrics import silhouette_score  # imported on use: 1.4 s of every CLI start otherwise

    return float(silhouette_score(x, labels, sample_size=sample, random_state=seed))


def kmeans(
    x: F64, k: int, *, seed: int = 0, n_init: int = 10, minibatch_above: int = 5000, batch_rows: int = 1024
) -> tuple[I64, F64]:
    """(labels, centroids) of k-means with k clusters: `KMeans` (k-means++, `n_init` starts), or for more
    than `minibatch_above` items `MiniBatchKMeans.partial_fit` over chunks of `batch_rows` rows
    (10 passes), so the items need not be clustered in one batch."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if x.shape[0] <= minibatch_above:
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
        return km.labels_.astype(np.int64), np.asarray(km.cluster_centers_, dtype=np.float64)
    mb = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_rows, n_init=n_init)
    order = np.random.default_rng(seed).permutation(x.shape[0])
    step = max(batch_rows, 3 * k)  # the first chunk initializes the centroids: it needs >= k rows
    for _ in range(10):
        for start in range(0, x.shape[0] - step // 2, step):  # a short tail joins the last chunk
            stop = start + step if start + 2 * step <= x.shape[0] + step // 2 else x.shape[0]
            mb.partial_fit(x[order[start:stop]])
    return mb.predict(x).astype(np.int64), np.asarray(mb.cluster_centers_, dtype=np.float64)


def cluster_items(
    features: F64,
    valid: NDArray[np.bool_],
    *,
    k_min: int = 2,
    k_max: int = 10,
    seed: int = 0,
    n_init: int = 10,
    minibatch_above: int = 5000,
    batch_rows: int = 1024,
) -> Clustering:
    """k-means and Ward clustering of the valid rows of `features`, each with the k of the highest
    silhouette among `k_candidates(len(features))` (ties: the smaller k; candidates above the
    number of valid items minus one, or of distinct ones, are skipped); with no candidate every item is one cluster."""
    n_items = features.shape[0]
    members = np.flatnonzero(valid).astype(np.int64)
    x = np.asarray(features[members], dtype=np.float64)
    ks = k_candidates(n_items, k_min, k_max)
    km_sil = np.full(len(ks), np.nan)
    ward_sil = np.full(len(ks), np.nan)
    fits: dict[int, tuple[I64, F64]] = {}
    distinct = np.unique(x, axis=0).shape[0] if len(members) else 0
    usable = min(len(members) - 1, distinct)  # no more clusters than distinct points
    for i, k in enumerate(ks):
        if k > usable:
            continue
        fits[int(k)] = kmeans(
            x, int(k), seed=seed, n_init=n_init, minibatch_above=minibatch_above, batch_rows=batch_rows
        )
        km_sil[i] = _silhouette(x, fits[int(k)][0], seed)
    from scipy.cluster.hierarchy import fcluster, linkage

    z = linkage(x, method="ward") if len(members) >= 2 else np.zeros((0, 4))
    ward_fits: dict[int, I64] = {}
    for i, k in enumerate(ks):
        if k > usable:
            continue
        ward_fits[int(k)] = (fcluster(z, int(k), criterion="maxclust") - 1).astype(np.int64)
        ward_sil[i] = _silhouette(x, ward_fits[int(k)], seed)

    def best(sil: F64) -> int:
        return int(ks[int(np.nanargmax(sil))]) if np.isfinite(sil).any() else 1

    k_km, k_ward = best(km_sil), best(ward_sil)
    km_label = np.full(n_items, -1, np.int64)
    ward_label = np.full(n_items, -1, np.int64)
    if k_km == 1:
        km_label[members], centroid = 0, x.mean(axis=0, keepdims=True)
    else:
        km_label[members], centroid = fits[k_km]
    ward_label[members] = ward_fits[k_ward] if k_ward > 1 else 0
    if len(members) == 0:
        centroid = np.zeros((0, features.shape[1]))
    return Clustering(
        members=members,
        k_candidates=ks,
        kmeans_label=km_label,
        kmeans_centroid=np.asarray(centroid, dtype=np.float64),
        kmeans_silhouette=km_sil,
        kmeans_k=k_km if len(members) else 0,
        ward_label=ward_label,
        linkage=np.asarray(z, dtype=np.float64),
        ward_silhouette=ward_sil,
        ward_k=k_ward if len(members) else 0,
    )
