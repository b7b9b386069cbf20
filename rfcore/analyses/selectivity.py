"""Category selectivity of every unit (`layers/<layer>/selectivity/`): class means and SEM, selectivity
index, lifetime sparseness, permutation p-value, preferred class; the layer's distribution in the
group's attrs. Reads the sweep's `activation` array and `images/label`; math in `rfcore.selectivity`."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from rfcore.analysis import (
    Analysis,
    AnalysisError,
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
from rfcore.errors import StoreError
from rfcore.schema import ArraySpec
from rfcore.selectivity import NEGATIVE_MODES, SPARSENESS_OVER, category_selectivity, distribution
from rfcore.store import AtlasStore, redact

_NAN = float("nan")
GROUP = "selectivity"

# --- helpers shared by the category analyses (selectivity, cluster, attribution) -----------------


def labelled(store: AtlasStore) -> tuple[np.ndarray, list[str]]:
    """(labels, class names) of the atlas; AnalysisError if the sweep is unfinished or unlabelled."""
    if store.pending_shards():
        raise AnalysisError(f"the sweep of {redact(store.url)} is not finished; run it first")
    atlas = Atlas(store)
    try:
        labels = atlas.labels()
    except StoreError as e:
        raise AnalysisError(str(e)) from None
    classes = atlas.classes
    if len(classes) < 2 or not np.any(labels >= 0):
        raise AnalysisError(f"atlas {redact(store.url)} has no labelled images of two or more classes")
    return labels, classes


def activation(store: AtlasStore, layer: str) -> zarr.Array[Any]:
    """The sweep's (image, channel) activation array of `layer` (not read: analyses stream it)."""
    node = store.layer_group(layer).get("activation")
    if not isinstance(node, zarr.Array):
        raise StoreError(f"layer {layer} of {redact(store.url)} has no activation array; sweep it first")
    return node


def stored_config(opts: Any, *, drop: tuple[str, ...] = ("layers", "chunk_rows")) -> dict[str, Any]:
    """The options that change results (what a result group records and checks on reuse)."""
    return {k: v for k, v in options_config(opts).items() if k not in drop}


def pending_units(store: AtlasStore, units: list[Unit]) -> list[Unit]:
    """The units whose marker is not written yet."""
    left = set(store.pending([u.key for u in units]))
    return [u for u in units if u.key in left]


def array_problems(
    store: AtlasStore, specs: tuple[ArraySpec, ...], layer: str, sizes: dict[str, int], **placeholders: str
) -> list[str]:
    """Differences of the stored arrays of `specs` from their declared shape/dtype/dims."""
    problems = []
    for spec in specs:
        path = (
            f"layers/{layer}/{spec.resolve(**placeholders)}"
            if spec.scope == "layer"
            else spec.resolve(layer=layer, **placeholders)
        )
        node = store.root.get(path)
        if not isinstance(node, zarr.Array):
            problems.append(f"{path}: missing")
            continue
        dims = tuple(node.metadata.dimension_names or ())  # type: ignore[union-attr]
        want = tuple(sizes[d] for d in spec.dims if d in sizes)
        if dims != spec.dims or node.dtype != np.dtype(spec.dtype) or node.shape[: len(want)] != want:
            problems.append(
                f"{path}: {node.shape} {node.dtype} {dims}, expected dims {spec.dims} {spec.dtype}"
            )
    return problems


def draw_axes(target: Any) -> Any:
    """The matplotlib Axes of what `Assets.figure` hands to a draw function (a Figure or an Axes)."""
    return target.gca() if hasattr(target, "gca") else target


def group_attrs(atlas: Atlas, path: str) -> dict[str, Any] | None:
    """Attrs of the group at root-relative `path`, None if absent."""
    node = zarr.open_group(atlas.store._store, mode="r", zarr_format=3).get(path)
    return dict(node.attrs.asdict()) if isinstance(node, zarr.Group) else None


def read(atlas: Atlas, path: str, where: Any = Ellipsis) -> np.ndarray | None:
    """The array at root-relative `path` (or a slice), None if absent."""
    node = zarr.open_group(atlas.store._store, mode="r", zarr_format=3).get(path)
    return np.asarray(node[where]) if isinstance(node, zarr.Array) else None


# --- the analysis ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectivityOptions:
    """Options of the category-selectivity analysis."""

    layers: str = field(default="all", metadata={"help": "all (every swept layer) or a comma list of layers"})
    n_permutations: int = field(
        default=1000, metadata={"help": "label permutations of the test (p >= 1 / (n + 1))"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the label permutations"})
    negative: str = field(
        default="shift",
        metadata={"help": f"class means < 0 in the index: {' | '.join(NEGATIVE_MODES)}"},
    )
    sparseness_over: str = field(
        default="images", metadata={"help": f"lifetime sparseness over {' | '.join(SPARSENESS_OVER)}"}
    )
    alpha: float = field(default=0.01, metadata={"help": "p-value threshold of a selective unit (summaries)"})
    chunk_rows: int = field(
        default=0, metadata={"help": "images per block read (0: the activation's chunking)"}
    )

    def __post_init__(self) -> None:
        check(bool(self.layers.strip()), "layers must name at least one layer")
        check(self.n_permutations >= 1, "n_permutations must be >= 1")
        check(self.negative in NEGATIVE_MODES, f"negative must be one of {', '.join(NEGATIVE_MODES)}")
        check(self.sparseness_over in SPARSENESS_OVER, f"sparseness_over: {', '.join(SPARSENESS_OVER)}")
        check(0.0 < self.alpha < 1.0, "alpha must be in (0, 1)")
        check(self.chunk_rows >= 0, "chunk_rows must be >= 0")


def _spec(path: str, dims: tuple[str, ...], dtype: str, fill: float | int, doc: str) -> ArraySpec:
    return ArraySpec(f"{GROUP}/{path}", dims, dtype, fill, doc, analysis="selectivity")


ARRAYS = (
    _spec("class_mean", ("channel", "class"), "float32", _NAN, "mean activation per class (NaN: no image)"),
    _spec("class_sem", ("channel", "class"), "float32", _NAN, "standard error of the class mean"),
    _spec(
        "index",
        ("channel",),
        "float32",
        _NAN,
        "(R_best - mean others) / (R_best + mean others) of class means",
    ),
    _spec("sparseness", ("channel",), "float32", _NAN, "lifetime sparseness (Vinje & Gallant 2000)"),
    _spec("p_value", ("channel",), "float32", _NAN, "permutation p-value of the index (labels shuffled)"),
    _spec("preferred_class", ("channel",), "int64", -1, "class of the highest mean; -1 = silent unit"),
)


@register
class SelectivityAnalysis(Analysis):
    """Per-unit category selectivity from the sweep's per-image activations and labels."""

    name = "selectivity"
    description = "category selectivity per unit: class means, index, sparseness, permutation p-value"
    arrays = ARRAYS
    Options = SelectivityOptions
    order = 60

    def plan(self, store: AtlasStore, opts: Any) -> list[Unit]:
        _, classes = labelled(store)
        units = []
        for layer in atlas_layers(store, opts.layers):
            channels = int(activation(store, layer).shape[1])
            store.require_group(f"layers/{layer}/{GROUP}", config=stored_config(opts))
            for spec in ARRAYS:
                shape = (channels, len(classes)) if len(spec.dims) == 2 else (channels,)
                store.require_array(spec, shape, shape, layer=layer)
            units.append(Unit(f"selectivity/{layer}", layer, {"options": options_config(opts)}))
        return pending_units(store, units)

    def run(self, store: AtlasStore, unit: Unit, res: Resources) -> dict[str, Any]:
        opts = self.options(unit.args["options"])
        layer = str(unit.layer)
        labels, classes = labelled(store)
        sel = category_selectivity(
            activation(store, layer),
            labels,
            len(classes),
            n_permutations=opts.n_permutations,
            seed=opts.seed,
            negative=opts.negative,
            sparseness_over=opts.sparseness_over,
            chunk_rows=opts.chunk_rows or None,
        )
        group = store.layer_group(layer)[GROUP]
        assert isinstance(group, zarr.Group)
        values = {
            "class_mean": sel.mean,
            "class_sem": sel.sem,
            "index": sel.index,
            "sparseness": sel.sparseness,
            "p_value": sel.p_value,
            "preferred_class": sel.preferred_class,
        }
        for spec in ARRAYS:
            name = spec.path.removeprefix(f"{GROUP}/")
            arr = group[name]
            assert isinstance(arr, zarr.Array)
            arr[...] = values[name].astype(spec.dtype)
        summary = distribution(sel.index, sel.p_value, opts.alpha)
        group.attrs.update({"distribution": summary, "classes": classes, "class_count": sel.count.tolist()})
        return {"layer": layer, **summary}

    def finish(self, store: AtlasStore, opts: Any) -> dict[str, Any]:
        atlas = Atlas(store)
        out = {}
        for layer in atlas_layers(store, opts.layers):
            attrs = group_attrs(atlas, f"layers/{layer}/{GROUP}") or {}
            if "distribution" in attrs:
                out[layer] = {k: attrs["distribution"].get(k) for k in ("median", "significant", "units")}
        return {"layers": out}

    def verify(self, store: AtlasStore) -> list[str]:
        problems = []
        for layer in store.layer_names:
            if GROUP not in store.layer_group(layer):
                continue
            done = not store.pending([f"selectivity/{layer}"])
            sizes = {"channel": int(activation(store, layer).shape[1])}
            found = array_problems(store, ARRAYS, layer, sizes)
            problems += [f"selectivity: {p}" for p in found if done or "missing" not in p]
        return problems

    def findings(self, atlas: Atlas) -> list[str]:
        out = []
        for layer in atlas.layers:
            d = (group_attrs(atlas, f"layers/{layer}/{GROUP}") or {}).get("distribution")
            if d and "median" in d:
                out.append(
                    f"{layer}: median class selectivity {d['median']:.2f} (IQR {d['q25']:.2f}-{d['q75']:.2f}); "
                    f"{d['significant']}/{d['units']} units class-selective at p < {d['alpha']:g}"
                )
        return out

    # --- the site ------------------------------------------------------------------------------
    def channel_columns(self, atlas: Atlas, layer: str) -> dict[str, np.ndarray]:
        base = f"layers/{layer}/{GROUP}"
        cols = {
            "selectivity": read(atlas, f"{base}/index"),
            "selectivity_p": read(atlas, f"{base}/p_value"),
            "preferred_class": read(atlas, f"{base}/preferred_class"),
        }
        alpha = ((group_attrs(atlas, base) or {}).get("distribution") or {}).get("alpha")
        if cols["selectivity_p"] is not None and alpha is not None:  # the badge: significant at alpha
            cols["category_selective"] = np.asarray(cols["selectivity_p"] < float(alpha))
        return {k: v for k, v in cols.items() if v is not None}

    def report_layer(self, atlas: Atlas, layer: str, assets: Assets) -> Section | None:
        base = f"layers/{layer}/{GROUP}"
        index = read(atlas, f"{base}/index")
        attrs = group_attrs(atlas, base) or {}
        d = attrs.get("distribution")
        if index is None or not d or "median" not in d:
            return None

        def draw(target: Any) -> None:
            ax = draw_axes(target)
            ax.hist(index[np.isfinite(index)], bins=20, range=(0, 1), color="#4a7")
            ax.axvline(d["median"], color="k", ls="--", lw=1)
            ax.set_xlabel("class selectivity index")
            ax.set_ylabel("units")

        url = assets.figure(f"selectivity-{layer}", draw, size=(4, 2.5))
        text = (
            f"median index {d['median']:.2f} (IQR {d['q25']:.2f}–{d['q75']:.2f}), "
            f"{d['significant']}/{d['units']} units with p &lt; {d['alpha']:g}"
        )
        return Section("Category selectivity", f'<p>{text}</p><img src="{html.escape(url)}" alt="histogram">')

    def report_channel(self, atlas: Atlas, layer: str, channel: int, assets: Assets) -> Section | None:
        base = f"layers/{layer}/{GROUP}"
        mean = read(atlas, f"{base}/class_mean", channel)
        if mean is None:
            return None
        sem = read(atlas, f"{base}/class_sem", channel)
        index = read(atlas, f"{base}/index", channel)
        p = read(atlas, f"{base}/p_value", channel)
        classes = list((group_attrs(atlas, base) or {}).get("classes") or atlas.classes)
        names = classes if len(classes) == mean.shape[0] else [str(i) for i in range(mean.shape[0])]

        def draw(target: Any) -> None:
            ax = draw_axes(target)
            pos = np.arange(mean.shape[0])
            ax.bar(pos, np.nan_to_num(mean), yerr=None if sem is None else np.nan_to_num(sem), color="#48a")
            ax.set_xticks(pos, names, rotation=90, fontsize=6)
            ax.set_ylabel("mean activation")
            longest = max((len(n) for n in names), default=1)
            ax.figure.subplots_adjust(bottom=min(0.5, 0.12 + 0.019 * longest))  # room for the class names

        url = assets.figure(f"selectivity-{layer}-{channel}", draw, size=(4, 3.4))
        best = int(np.nanargmax(mean)) if np.isfinite(mean).any() else -1
        text = f"index {float(index):.2f}, p {float(p):.3g}" if index is not None and p is not None else ""
        if best >= 0:
            text += f", prefers {html.escape(names[best])}"
        return Section(
            "Category selectivity", f'<p>{text}</p><img src="{html.escape(url)}" alt="class means">'
        )
