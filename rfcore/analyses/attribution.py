"""Attribution (`layers/<layer>/attribution/`): each unit's contribution to each class's logit
(activation x gradient, averaged over the class's images), its domination, the top contributing
units per class, and input focus maps of every channel's top-k images on the sweep's patch grid.
Runs the model over the dataset; math in `rfcore.attribution`."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr

from rfcore.analyses.selectivity import (
    activation,
    array_problems,
    group_attrs,
    labelled,
    pending_units,
    read,
    stored_config,
)
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
from rfcore.attribution import batch_contribution, contribution_table, domination, focus_maps, top_units
from rfcore.data import iter_batches
from rfcore.errors import StoreError
from rfcore.models import model_meta
from rfcore.pipeline import layer_geometry
from rfcore.schema import ArraySpec
from rfcore.store import AtlasStore, redact

_NAN = float("nan")
GROUP = "attribution"
_FOCUS_CHANNELS = 16  # channels per focus chunk (and per write)


def _spec(name: str, dims: tuple[str, ...], dtype: str, fill: float | int, doc: str) -> ArraySpec:
    return ArraySpec(f"{GROUP}/{name}", dims, dtype, fill, doc, analysis="attribution")


ARRAYS = (
    _spec(
        "contribution",
        ("channel", "class"),
        "float32",
        _NAN,
        "mean over the class's images of sum over positions of activation x d logit / d activation",
    ),
    _spec(
        "domination", ("channel", "class"), "float32", _NAN, "contribution / sum over units of |contribution|"
    ),
    _spec("count", ("class",), "int64", 0, "images of each class the contributions average over"),
    _spec("top_unit", ("class", "rank"), "int64", -1, "units of the largest contribution per class"),
    _spec("top_value", ("class", "rank"), "float32", _NAN, "their contributions"),
    _spec(
        "focus",
        ("channel", "k", "py", "px"),
        "float32",
        _NAN,
        "saliency of the unit at each top-k hit on the patch grid (mean |d unit / d input| per cell)",
    ),
)
_SPECS = {s.path.removeprefix(f"{GROUP}/"): s for s in ARRAYS}


@dataclass(frozen=True)
class AttributionOptions:
    """Options of the attribution analysis."""

    layers: str = field(default="all", metadata={"help": "all (every swept layer) or a comma list of layers"})
    top_units: int = field(default=10, metadata={"help": "top contributing units stored per class"})
    max_images: int = field(
        default=0, metadata={"help": "contributions over the first N images only (0: all)"}
    )
    focus: bool = field(default=True, metadata={"help": "compute focus maps of the top-k images"})
    focus_k: int = field(default=0, metadata={"help": "top-k images per channel (0: the sweep's k)"})
    smoothgrad_samples: int = field(
        default=0, metadata={"help": "SmoothGrad noisy copies per focus map (0: plain gradient)"}
    )
    smoothgrad_noise: float = field(
        default=0.15, metadata={"help": "SmoothGrad noise std as a fraction of the input's range"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the SmoothGrad noise"})
    batch_size: int = field(default=32, metadata={"help": "images per forward/backward pass"})

    def __post_init__(self) -> None:
        check(bool(self.layers.strip()), "layers must name at least one layer")
        check(self.top_units >= 1, "top_units must be >= 1")
        check(self.max_images >= 0, "max_images must be >= 0")
        check(self.focus_k >= 0, "focus_k must be >= 0")
        check(self.smoothgrad_samples >= 0, "smoothgrad_samples must be >= 0")
        check(self.smoothgrad_noise > 0, "smoothgrad_noise must be > 0")
        check(self.batch_size >= 1, "batch_size must be >= 1")


def _focus_k(store: AtlasStore, opts: Any) -> int:
    k = int(store.run["config"]["k"])
    return min(k, int(opts.focus_k)) if opts.focus_k else k


@register
class AttributionAnalysis(Analysis):
    """Per-unit contributions to the class logits and input focus maps of the top-k images."""

    name = "attribution"
    description = "per-unit contribution to each class logit (activation x gradient) and input focus maps"
    arrays = ARRAYS
    Options = AttributionOptions
    uses_model = True
    uses_data = True
    uses_labels = True  # the logit of each image's class: labels in the model's class indices
    order = 70

    def plan(self, store: AtlasStore, opts: Any) -> list[Unit]:
        _, classes = labelled(store)
        units = []
        args = {"options": options_config(opts)}
        for layer in atlas_layers(store, opts.layers):
            channels = int(activation(store, layer).shape[1])
            store.require_group(
                f"layers/{layer}/{GROUP}", config=stored_config(opts, drop=("layers", "batch_size"))
            )
            kc = (channels, len(classes))
            rank = (len(classes), min(opts.top_units, channels))
            for name, shape in {
                "contribution": kc,
                "domination": kc,
                "count": (len(classes),),
                "top_unit": rank,
                "top_value": rank,
            }.items():
                store.require_array(_SPECS[name], shape, shape, layer=layer)
            units.append(Unit(f"attribution/{layer}/contribution", layer, {**args, "part": "contribution"}))
            if opts.focus:
                if not store.is_done(f"merge/{layer}"):
                    raise AnalysisError(
                        f"layer {layer} of {redact(store.url)} has no top-k hits yet (merge the sweep)"
                    )
                geo, _, _ = layer_geometry(store, layer)
                k, p = _focus_k(store, opts), geo.size
                shape = (channels, k, p, p)
                store.require_array(
                    _SPECS["focus"], shape, (min(_FOCUS_CHANNELS, channels), k, p, p), layer=layer
                )
                units.append(Unit(f"attribution/{layer}/focus", layer, {**args, "part": "focus"}))
        return pending_units(store, units)

    def run(self, store: AtlasStore, unit: Unit, res: Resources) -> dict[str, Any]:
        opts = self.options(unit.args["options"])
        layer = str(unit.layer)
        if unit.args["part"] == "focus":
            return self._focus(store, layer, opts, res)
        return self._contribution(store, layer, opts, res)

    def _contribution(self, store: AtlasStore, layer: str, opts: Any, res: Resources) -> dict[str, Any]:
        labels, classes = labelled(store)  # the dataset's classes, as the sweep recorded them
        model, dataset = res.model(), res.dataset()  # its batches' labels: the model's class indices
        normalize = model_meta(model).preprocessing.normalize
        k = len(classes)
        n = min(len(dataset), opts.max_images) if opts.max_images else len(dataset)
        sums: np.ndarray | None = None
        count = np.zeros(k, np.int64)
        for batch in iter_batches(dataset, range(n), opts.batch_size):
            cls = labels[batch.indices.numpy()]
            keep = (cls >= 0) & (cls < k) & (batch.labels.numpy() >= 0)
            if not keep.any():
                continue
            mask = torch.from_numpy(keep)
            x = normalize(batch.images[mask].to(res.device))
            contrib = batch_contribution(model, layer, x, batch.labels[mask]).double().cpu().numpy()
            if sums is None:
                sums = np.zeros((k, contrib.shape[1]))
            np.add.at(sums, cls[keep], contrib)
            count += np.bincount(cls[keep], minlength=k)
        if sums is None:
            raise StoreError(f"no labelled image of {dataset.spec} to attribute")
        table = contribution_table(sums, count)
        group = store.layer_group(layer)[GROUP]
        assert isinstance(group, zarr.Group)
        rank = group["top_unit"].shape[1]  # type: ignore[union-attr]
        top, value = top_units(table, int(rank))
        dom = domination(table)
        for name, data in {
            "contribution": table,
            "domination": dom,
            "count": count,
            "top_unit": top,
            "top_value": value,
        }.items():
            arr = group[name]
            assert isinstance(arr, zarr.Array)
            arr[...] = data.astype(_SPECS[name].dtype)
        top_share = [float(np.abs(dom[top[c, 0], c])) for c in range(k) if top[c, 0] >= 0 and count[c] > 0]
        summary = {
            "images": int(count.sum()),
            "median_top_domination": float(np.median(top_share)) if top_share else None,
        }
        group.attrs.update({"contribution": summary, "classes": classes})
        return {"layer": layer, **summary}

    def _focus(self, store: AtlasStore, layer: str, opts: Any, res: Resources) -> dict[str, Any]:
        model, dataset = res.model(), res.dataset()
        normalize = model_meta(model).preprocessing.normalize
        geo, channels, _ = layer_geometry(store, layer)
        group = store.layer_group(layer)
        arr = group[f"{GROUP}/focus"]
        assert isinstance(arr, zarr.Array)
        k = int(arr.shape[1])
        image = np.asarray(group["topk/image"][:, :k])  # type: ignore[index]
        ys = np.asarray(group["topk/y"][:, :k])  # type: ignore[index]
        xs = np.asarray(group["topk/x"][:, :k])  # type: ignore[index]
        maps = 0
        for c0 in range(0, channels, _FOCUS_CHANNELS):
            c1 = min(c0 + _FOCUS_CHANNELS, channels)
            out = np.full((c1 - c0, *arr.shape[1:]), np.nan, np.float32)
            ci, ri = np.nonzero(image[c0:c1] >= 0)
            for b0 in range(0, ci.size, opts.batch_size):
                sel_c, sel_r = ci[b0 : b0 + opts.batch_size], ri[b0 : b0 + opts.batch_size]
                idx = image[c0:c1][sel_c, sel_r]
                imgs = np.stack([dataset.get(int(i))[0] for i in idx])
                out[sel_c, sel_r] = focus_maps(
                    model,
                    layer,
                    imgs,
                    (sel_c + c0).astype(np.int64),
                    ys[c0:c1][sel_c, sel_r].astype(np.int64),
                    xs[c0:c1][sel_c, sel_r].astype(np.int64),
                    normalize=normalize,
                    geometry=geo,
                    device=res.device,
                    samples=opts.smoothgrad_samples,
                    noise=opts.smoothgrad_noise,
                    seed=opts.seed + c0 * k + b0,
                )
                maps += len(idx)
            arr[c0:c1] = out
        return {"layer": layer, "maps": maps}

    def finish(self, store: AtlasStore, opts: Any) -> dict[str, Any]:
        atlas = Atlas(store)
        out = {}
        for layer in atlas_layers(store, opts.layers):
            attrs = group_attrs(atlas, f"layers/{layer}/{GROUP}") or {}
            if "contribution" in attrs:
                out[layer] = attrs["contribution"]
        return {"layers": out}

    def verify(self, store: AtlasStore) -> list[str]:
        problems = []
        for layer in store.layer_names:
            if GROUP not in store.layer_group(layer):
                continue
            sizes = {"channel": int(activation(store, layer).shape[1])}
            for part, specs in (
                ("contribution", tuple(s for s in ARRAYS if not s.path.endswith("focus"))),
                ("focus", tuple(s for s in ARRAYS if s.path.endswith("focus"))),
            ):
                done = not store.pending([f"attribution/{layer}/{part}"])
                if done:
                    problems += [f"attribution: {p}" for p in array_problems(store, specs, layer, sizes)]
        return problems

    def findings(self, atlas: Atlas) -> list[str]:
        out = []
        for layer in atlas.layers:
            s = (group_attrs(atlas, f"layers/{layer}/{GROUP}") or {}).get("contribution")
            if s and s.get("median_top_domination") is not None:
                out.append(
                    f"{layer}: the top unit of a class carries a median {100 * s['median_top_domination']:.0f}% "
                    f"of the class's absolute contribution (domination; {s['images']} images)"
                )
        return out

    # --- the site ------------------------------------------------------------------------------
    def channel_columns(self, atlas: Atlas, layer: str) -> dict[str, np.ndarray]:
        table = read(atlas, f"layers/{layer}/{GROUP}/contribution")
        if table is None:
            return {}
        return {"max_contribution": np.nanmax(np.where(np.isnan(table), -np.inf, table), axis=1)}

    def report_layer(self, atlas: Atlas, layer: str, assets: Assets) -> Section | None:
        base = f"layers/{layer}/{GROUP}"
        top = read(atlas, f"{base}/top_unit")
        value = read(atlas, f"{base}/top_value")
        if top is None or value is None or not np.isfinite(value).any():
            return None
        classes = atlas.classes
        rows = []
        for c in range(top.shape[0]):
            name = classes[c] if c < len(classes) else str(c)
            cells = ", ".join(
                f"{int(u)} ({v:.3g})" for u, v in zip(top[c, :5], value[c, :5], strict=True) if u >= 0
            )
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{cells}</td></tr>")
        return Section(
            "Top contributing units per class",
            "<table><tr><th>class</th><th>units (contribution to its logit)</th></tr>"
            + "".join(rows)
            + "</table>",
        )

    def report_channel(self, atlas: Atlas, layer: str, channel: int, assets: Assets) -> Section | None:
        base = f"layers/{layer}/{GROUP}"
        focus = read(atlas, f"{base}/focus", channel)
        contrib = read(atlas, f"{base}/contribution", channel)
        parts = []
        if contrib is not None and np.isfinite(contrib).any():
            classes = atlas.classes
            order = np.argsort(-np.nan_to_num(contrib, nan=-np.inf))[:3]
            text = ", ".join(
                f"{html.escape(classes[c] if c < len(classes) else str(c))} {contrib[c]:.3g}" for c in order
            )
            parts.append(f"<p>largest contributions to class logits: {text}</p>")
        if focus is not None and np.isfinite(focus).any():
            try:
                patches = atlas.layer(layer).topk(channel).patch
            except StoreError:
                patches = None
            scale = float(np.nanmax(focus)) or 1.0
            cells = []
            for r in range(focus.shape[0]):
                if not np.isfinite(focus[r]).all():
                    continue
                heat = _heat(focus[r] / scale)
                src = assets.image(f"focus-{layer}-{channel}-{r}", heat)
                pic = ""
                if patches is not None and r < patches.shape[0]:
                    pic = f'<img src="{html.escape(assets.image(f"patch-{layer}-{channel}-{r}", patches[r]))}" alt="patch">'
                cells.append(f'<td>{pic}<img src="{html.escape(src)}" alt="focus"></td>')
            parts.append("<table><tr>" + "".join(cells) + "</tr></table>")
        return Section("Attribution and input focus", "".join(parts)) if parts else None


def _heat(values: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8-range 'inferno' colouring of a [0, 1] map."""
    from matplotlib import colormaps

    rgb = colormaps["inferno"](np.clip(np.nan_to_num(values), 0.0, 1.0))[..., :3]
    return np.asarray(np.rint(rgb * 255).transpose(2, 0, 1), dtype=np.float32)
