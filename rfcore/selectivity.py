"""Category selectivity of units from per-image responses and class labels (pure math, no store I/O).

Inputs are the sweep's `activation` (image x channel; NaN rows = skipped images) and per-image
labels (-1 = unlabelled). Everything is accumulated over row blocks, so a zarr array is read out of
core (`row_blocks`: zarr slices, one block at a time) and gives the in-memory result.
Definitions and sources: docs/category.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse
import zarr
from numpy.typing import NDArray

from rfcore.errors import DataError

NEGATIVE_MODES = ("shift", "clip", "nan")
SPARSENESS_OVER = ("images", "classes")
_PERM_LABEL_BYTES = 64 * 2**20  # permuted labels held at once (int32) ...
_PERM_SUM_BYTES = 256 * 2**20  # ... and their class sums (float64): bound the memory of the test

F64 = NDArray[np.float64]


def row_blocks(activation: Any, chunk_rows: int | None = None) -> Iterator[tuple[int, F64]]:
    """(first row, float64 block) over the rows of a 2-D array, in order, one block in memory at a
    time: a zarr array is read slice by slice (default: its own row chunking), so it never needs to
    fit in memory; numpy arrays are cut likewise."""
    if isinstance(activation, zarr.Array):
        arr: Any = activation
        step = chunk_rows or int(activation.chunks[0])
    else:
        arr = np.asarray(activation)
        step = chunk_rows or max(arr.shape[0], 1)
    if len(arr.shape) != 2:
        raise DataError(f"activation must be 2-D (image, channel), got shape {arr.shape}")
    for start in range(0, int(arr.shape[0]), step):
        yield start, np.asarray(arr[start : start + step], dtype=np.float64)


@dataclass
class ClassStats:
    """Per-class response sums of every unit, and the rows they came from."""

    count: NDArray[np.int64]  # (K,) images per class
    total: F64  # (K, C) sum of responses
    total_sq: F64  # (K, C) sum of squared responses
    pos_sum: F64  # (C,) sum of max(r, 0) over used images (lifetime sparseness)
    pos_sq: F64  # (C,) sum of max(r, 0)^2
    valid: NDArray[np.bool_]  # (N,) labelled images with a finite response row

    @property
    def mean(self) -> F64:
        """(C, K) mean response per class (NaN for a class without images)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.total / self.count[:, None]).T

    @property
    def sem(self) -> F64:
        """(C, K) standard error of the class means (unbiased variance; NaN below 2 images)."""
        n = self.count[:, None].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            var = (self.total_sq - self.total**2 / n) / (n - 1)
            return np.asarray(np.sqrt(np.maximum(var, 0.0) / n).T)


def class_stats(
    activation: Any, labels: NDArray[np.integer[Any]], num_classes: int, *, chunk_rows: int | None = None
) -> ClassStats:
    """Sums per class over the images with a label in [0, num_classes) and a finite response row."""
    labels64 = np.asarray(labels, dtype=np.int64)
    if num_classes < 1:
        raise DataError("category selectivity needs labelled images (the dataset has no classes)")
    count = np.zeros(num_classes, np.int64)
    total = total_sq = None
    pos_sum = pos_sq = None
    valid = np.zeros(labels64.shape[0], bool)
    for start, block in row_blocks(activation, chunk_rows):
        if total is None:
            c = block.shape[1]
            total, total_sq = np.zeros((num_classes, c)), np.zeros((num_classes, c))
            pos_sum, pos_sq = np.zeros(c), np.zeros(c)
        lab = labels64[start : start + block.shape[0]]
        ok = (lab >= 0) & (lab < num_classes) & np.isfinite(block).all(axis=1)
        valid[start : start + block.shape[0]] = ok
        x, lab = block[ok], lab[ok]
        onehot = _onehot(lab, num_classes)
        total += onehot @ x
        total_sq += onehot @ (x * x)
        count += np.bincount(lab, minlength=num_classes)
        r = np.maximum(x, 0.0)
        pos_sum += r.sum(axis=0)
        pos_sq += (r * r).sum(axis=0)
    if total is None or total_sq is None or pos_sum is None or pos_sq is None:
        raise DataError("no images to measure selectivity on")
    if valid.sum() == 0:
        raise DataError("no labelled image with a response: nothing to measure selectivity on")
    return ClassStats(count, total, total_sq, pos_sum, pos_sq, valid)


def _onehot(lab: NDArray[np.int64], num_classes: int) -> Any:
    """Sparse (num_classes, len(lab)) indicator matrix: row lab[i] has a 1 in column i."""
    cols = np.arange(lab.shape[0])
    return scipy.sparse.csr_matrix((np.ones(lab.shape[0]), (lab, cols)), shape=(num_classes, lab.shape[0]))


def selectivity_index(means: F64, negative: str = "shift") -> F64:
    """(R_best - mean of the other classes) / (R_best + mean of the other classes) over the last axis
    (class means). Defined for non-negative responses; class means below 0 are handled by
    `negative`: "shift" subtracts the unit's lowest class mean (only when it is < 0), "clip" sets
    them to 0, "nan" gives NaN. NaN where the denominator is 0 (a silent unit)."""
    if negative not in NEGATIVE_MODES:
        raise DataError(f"negative must be one of {', '.join(NEGATIVE_MODES)}, not {negative!r}")
    m = np.asarray(means, dtype=np.float64)
    if m.shape[-1] < 2:
        raise DataError("selectivity needs at least two classes")
    low = m.min(axis=-1, keepdims=True)
    if negative == "shift":
        m = m - np.minimum(low, 0.0)
    elif negative == "clip":
        m = np.maximum(m, 0.0)
    best = m.max(axis=-1)
    others = (m.sum(axis=-1) - best) / (m.shape[-1] - 1)
    den = best + others
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, (best - others) / den, np.nan)
    if negative == "nan":
        out = np.where(low[..., 0] < 0, np.nan, out)
    return np.asarray(out, dtype=np.float64)


def lifetime_sparseness(mean_r: F64, mean_r2: F64, n: int | F64) -> F64:
    """Vinje & Gallant (2000): S = (1 - (sum r / n)^2 / (sum r^2 / n)) / (1 - 1/n), 0 (dense) .. 1
    (one stimulus), from the mean and mean square of the non-negative responses; NaN for a silent unit."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (1.0 - mean_r**2 / mean_r2) / (1.0 - 1.0 / n)
    return np.asarray(np.where(mean_r2 > 0, s, np.nan), dtype=np.float64)


def sparseness(stats: ClassStats, over: str = "images") -> F64:
    """Lifetime sparseness of every unit over the images ("images") or over its class means ("classes")."""
    if over == "images":
        n = int(stats.valid.sum())
        return lifetime_sparseness(stats.pos_sum / n, stats.pos_sq / n, n)
    if over == "classes":
        r = np.maximum(np.nan_to_num(stats.mean, nan=0.0), 0.0)
        k = r.shape[1]
        return lifetime_sparseness(r.mean(axis=1), (r * r).mean(axis=1), k)
    raise DataError(f"sparseness over must be one of {', '.join(SPARSENESS_OVER)}, not {over!r}")


def permutation_pvalue(
    activation: Any,
    labels: NDArray[np.integer[Any]],
    stats: ClassStats,
    observed: F64,
    *,
    n_permutations: int = 1000,
    seed: int = 0,
    negative: str = "shift",
    chunk_rows: int | None = None,
) -> F64:
    """Per-unit p-value of the selectivity index under label permutation: the labels of the used
    images are shuffled (seeded; the same shuffles whatever the chunking), the index recomputed, and
    p = (1 + #{index_perm >= index_obs}) / (1 + n_permutations) (Phipson & Smyth 2010). Permutations
    are done in groups whose labels fit in 64 MiB and class sums in 256 MiB, one pass over the rows
    per group."""
    if n_permutations < 1:
        raise DataError("n_permutations must be >= 1")
    labels = np.asarray(labels, dtype=np.int64)
    k, c = stats.total.shape
    used = np.flatnonzero(stats.valid)
    base = labels[used]
    group = min(
        n_permutations,
        _PERM_LABEL_BYTES // (4 * max(labels.shape[0], 1)),
        _PERM_SUM_BYTES // (8 * k * max(c, 1)),
    )
    group = max(group, 1)
    rng = np.random.default_rng(seed)
    tol = 1e-9 * np.abs(observed)
    exceed = np.zeros(c, np.int64)
    done = 0
    while done < n_permutations:
        p = min(group, n_permutations - done)
        perm = np.full((p, labels.shape[0]), -1, np.int32)
        for j in range(p):
            perm[j, used] = rng.permutation(base)
        sums = np.zeros((p * k, c))
        offsets = (np.arange(p, dtype=np.int64) * k)[:, None]
        for start, block in row_blocks(activation, chunk_rows):
            lab = perm[:, start : start + block.shape[0]]
            rows = np.flatnonzero(lab[0] >= 0)  # the used images: the same in every permutation
            if rows.size == 0:
                continue
            sub = lab[:, rows].astype(np.int64)  # (p, r); every permutation uses the same rows
            x = block[rows]
            onehot = scipy.sparse.csr_matrix(
                (np.ones(sub.size), ((sub + offsets).ravel(), np.tile(np.arange(rows.size), p))),
                shape=(p * k, rows.size),
            )
            sums += onehot @ x
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (sums.reshape(p, k, c) / stats.count[None, :, None]).transpose(0, 2, 1)
        index = selectivity_index(means, negative)
        exceed += np.sum(np.nan_to_num(index, nan=-np.inf) >= (observed - tol)[None], axis=0)
        done += p
    pvalue = (1.0 + exceed) / (1.0 + n_permutations)
    return np.asarray(np.where(np.isfinite(observed), pvalue, np.nan), dtype=np.float64)


@dataclass
class Selectivity:
    """Category selectivity of every unit of a layer (unit axis first)."""

    mean: F64  # (C, K)
    sem: F64  # (C, K)
    count: NDArray[np.int64]  # (K,)
    index: F64  # (C,)
    sparseness: F64  # (C,)
    p_value: F64  # (C,)
    preferred_class: NDArray[np.int64]  # (C,), -1 for a silent unit


def category_selectivity(
    activation: Any,
    labels: NDArray[np.integer[Any]],
    num_classes: int,
    *,
    n_permutations: int = 1000,
    seed: int = 0,
    negative: str = "shift",
    sparseness_over: str = "images",
    chunk_rows: int | None = None,
) -> Selectivity:
    """Class means/SEM, selectivity index, lifetime sparseness, permutation p-value and preferred
    class of every unit; `activation` may be a zarr array (read block by block)."""
    stats = class_stats(activation, labels, num_classes, chunk_rows=chunk_rows)
    mean = stats.mean
    index = selectivity_index(mean, negative)
    with np.errstate(invalid="ignore"):
        preferred = np.where(np.isfinite(index), np.argmax(np.nan_to_num(mean, nan=-np.inf), axis=1), -1)
    pvalue = permutation_pvalue(
        activation,
        labels,
        stats,
        index,
        n_permutations=n_permutations,
        seed=seed,
        negative=negative,
        chunk_rows=chunk_rows,
    )
    return Selectivity(
        mean=mean,
        sem=stats.sem,
        count=stats.count,
        index=index,
        sparseness=sparseness(stats, sparseness_over),
        p_value=pvalue,
        preferred_class=preferred.astype(np.int64),
    )


def distribution(index: F64, p_value: F64, alpha: float = 0.01) -> dict[str, Any]:
    """Summary of a layer's selectivity indices (JSON-able): quartiles, mean, significant units."""
    ok = index[np.isfinite(index)]
    if ok.size == 0:
        return {"units": int(index.size), "measured": 0, "significant": 0, "alpha": alpha}
    q25, median, q75 = (float(v) for v in np.quantile(ok, [0.25, 0.5, 0.75]))
    return {
        "units": int(index.size),
        "measured": int(ok.size),
        "median": median,
        "mean": float(ok.mean()),
        "q25": q25,
        "q75": q75,
        "max": float(ok.max()),
        "significant": int(np.sum(np.nan_to_num(p_value, nan=1.0) < alpha)),
        "alpha": alpha,
    }
