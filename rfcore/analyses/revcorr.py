"""White-noise reverse correlation (AWA, AWC eigen-filters with a shuffled null band) of every channel's
centre unit as a registered analysis: one unit per (layer, channel block), arrays under
`layers/<layer>/revcorr/`; `finish` compares the tuning the filters predict with the measured one
(when the tuning analysis ran). The science is `rfcore.revcorr`; definitions in docs/tuning.md."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import zarr

from rfcore.analyses.tuning import (
    array_node,
    item,
    layer_geometry,
    read,
    rf_side,
    stimulus_amplitude,
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
from rfcore.models import model_meta
from rfcore.revcorr import RevcorrReducer, accumulate, agreement, box_features, box_spec, predicted_surface
from rfcore.schema import ArraySpec
from rfcore.stimuli import GratingSet, log_sfs, orientations, phases
from rfcore.store import AtlasStore, attrs_of
from rfcore.tuning import preferred, rf_centre

_IMG = ("channel", "rc_color", "ry", "rx")
REVCORR_ARRAYS: dict[str, ArraySpec] = {
    "awa": ArraySpec(
        "revcorr/awa",
        _IMG,
        "float32",
        math.nan,
        "activation-weighted average of the (block-averaged, mean-subtracted) RF-box noise",
        analysis="revcorr",
    ),
    "eigval": ArraySpec(
        "revcorr/eigval",
        ("channel", "eig"),
        "float32",
        math.nan,
        "eigenvalues of AWC - stimulus covariance: k largest, then k most negative",
        analysis="revcorr",
    ),
    "eigvec": ArraySpec(
        "revcorr/eigvec",
        ("channel", "eig", "rc_color", "ry", "rx"),
        "float32",
        math.nan,
        "unit eigenvectors (eigen-RFs) of the eigenvalues in eigval",
        analysis="revcorr",
    ),
    "significant": ArraySpec(
        "revcorr/significant",
        ("channel", "eig"),
        "bool",
        False,
        "eigenvalue outside the shuffled null band",
        analysis="revcorr",
    ),
    "null": ArraySpec(
        "revcorr/null",
        ("channel", "bound"),
        "float32",
        math.nan,
        "null band [low, high]: null_margin x extreme eigenvalues over the shuffles",
        analysis="revcorr",
    ),
    "weight": ArraySpec(
        "revcorr/weight",
        ("channel",),
        "float32",
        math.nan,
        "sum of the rectified responses (0: never responded)",
        analysis="revcorr",
    ),
    **{
        f"pred_{q}_{src}": ArraySpec(
            f"revcorr/pred_{q}_{src}",
            ("channel",),
            "float32",
            math.nan,
            f"preferred {q} of the {'AWA (linear, rectified)' if src == 'awa' else 'significant AWC eigen-filter energy'}"
            f" response to luminance gratings ({'degrees' if q == 'orientation' else 'cycles/pixel'}); NaN: no filter",
            analysis="revcorr",
        )
        for q in ("orientation", "sf")
        for src in ("awa", "awc")
    },
}


@dataclass(frozen=True)
class RevcorrOptions:
    layers: str = field(default="all", metadata={"help": "all (every layer of the atlas) or a comma list"})
    num_images: int = field(default=20000, metadata={"help": "white-noise images per channel block"})
    sigma: float = field(default=0.2, metadata={"help": "noise standard deviation in [0,1] image units"})
    colour: bool = field(
        default=True, metadata={"help": "independent noise per RGB channel (else luminance)"}
    )
    max_side: int = field(
        default=16, metadata={"help": "RF box block-averaged to at most this many px per side"}
    )
    shuffles: int = field(default=2, metadata={"help": "shuffled-activation nulls (each costs one more AWC)"})
    null_margin: float = field(
        default=1.2, metadata={"help": "null band = this x the shuffles' extreme eigenvalues"}
    )
    n_eig: int = field(default=4, metadata={"help": "eigen-filters kept per sign"})
    channels_per_unit: int = field(
        default=256,
        metadata={
            "help": "channels per task: each task runs all the noise; memory ~ 12 x channels x D^2 bytes"
        },
    )
    n_orientations: int = field(default=12, metadata={"help": "orientations of the prediction gratings"})
    n_sfs: int = field(
        default=10, metadata={"help": "SFs of the prediction gratings (1 cycle/RF to 0.5 c/px)"}
    )
    n_phases: int = field(default=8, metadata={"help": "phases of the prediction gratings"})
    batch_size: int = field(
        default=256,
        metadata={"help": "noise images per forward pass (also the unit of noise seeds and shuffles)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the noise and of the shuffles"})
    precision: str = field(default="auto", metadata={"help": "autocast: off, auto, bf16, fp16"})

    def __post_init__(self) -> None:
        check(bool(self.layers.strip()), "layers must name at least one layer")
        check(self.num_images >= 2, f"num_images must be >= 2, got {self.num_images}")
        check(self.sigma > 0, f"sigma must be > 0, got {self.sigma}")
        check(self.max_side >= 1, f"max_side must be >= 1, got {self.max_side}")
        check(self.shuffles >= 0 and self.null_margin >= 1, "shuffles must be >= 0 and null_margin >= 1")
        check(self.n_eig >= 1 and self.channels_per_unit >= 1, "n_eig and channels_per_unit must be >= 1")
        check(
            self.n_orientations >= 4 and self.n_sfs >= 2 and self.n_phases >= 3, "prediction grid too small"
        )
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.precision in ("off", "auto", "bf16", "fp16"), f"unknown precision {self.precision!r}")


def _key(layer: str, block: int) -> str:
    return f"revcorr/{layer}/block-{block:04d}"


def _group(atlas: Atlas, layer: str) -> zarr.Group | None:
    node = atlas.layer(layer).group.get("revcorr")
    return node if isinstance(node, zarr.Group) and isinstance(node.get("awa"), zarr.Array) else None


def _complete(store: AtlasStore, layer: str) -> bool:
    group = store.root.get(f"layers/{layer}/revcorr")
    if not isinstance(group, zarr.Group) or "blocks" not in attrs_of(group):
        return False
    return len(store.done_keys(f"revcorr/{layer}")) >= int(attrs_of(group)["blocks"])


def _symmetric_uint8(chw: np.ndarray) -> np.ndarray:
    """Signed filter -> display values 0..255 with 0 at mid grey (128), scaled by the max |value|."""
    m = float(np.nanmax(np.abs(chw))) if np.isfinite(chw).any() else 0.0
    out = 127.5 + 127.5 * (np.nan_to_num(chw) / m if m > 0 else 0 * chw)
    return np.repeat(out, 3, axis=0) if out.shape[0] == 1 else out


@register
class Revcorr(Analysis):
    name = "revcorr"
    description = (
        "white-noise reverse correlation of each channel's centre unit: AWA, AWC eigen-RFs, predicted tuning"
    )
    arrays = tuple(REVCORR_ARRAYS.values())
    Options: ClassVar[type[Any]] = RevcorrOptions
    uses_model = True
    order = 81

    def plan(self, store: AtlasStore, opts: RevcorrOptions) -> list[Unit]:
        layers = atlas_layers(store, opts.layers)
        config = options_config(opts)
        for name in ("layers", "channels_per_unit"):  # batch_size stays: noise and shuffles are per batch
            config.pop(name)
        for layer in layers:
            store.require_group(f"layers/{layer}/revcorr", config=config)
        units = []
        for layer in layers:
            rf, shape, channels, size = layer_geometry(store, layer)
            box = box_spec(rf, shape, size, max_side=opts.max_side, colour=opts.colour)
            k = 2 * min(opts.n_eig, max(box.dim // 2, 1))
            img, cpu = (channels, *box.shape), max(1, min(opts.channels_per_unit, channels))
            dims = {
                "awa": (img, (cpu, *box.shape)),
                "eigval": ((channels, k), (cpu, k)),
                "eigvec": ((channels, k, *box.shape), (cpu, k, *box.shape)),
                "significant": ((channels, k), (cpu, k)),
                "null": ((channels, 2), (cpu, 2)),
                **{
                    n: ((channels,), (cpu,)) for n in REVCORR_ARRAYS if n.startswith("pred_") or n == "weight"
                },
            }
            for name, (full, chunks) in dims.items():
                store.require_array(REVCORR_ARRAYS[name], full, chunks, layer=layer)
            blocks = range(math.ceil(channels / cpu))
            store.require_group(f"layers/{layer}/revcorr").attrs.update(
                {"blocks": len(blocks), "box": [box.y0, box.y1, box.x0, box.x1], "factor": box.factor}
            )
            units += [
                Unit(
                    _key(layer, b),
                    layer,
                    {"start": b * cpu, "stop": min(channels, (b + 1) * cpu)},
                )
                for b in blocks
            ]
        pending = set(store.pending([u.key for u in units]))
        return [u for u in units if u.key in pending]

    def run(self, store: AtlasStore, unit: Unit, res: Resources) -> dict[str, Any]:
        """AWA/AWC of one channel block over the configured white noise; writes its rows."""
        layer, start, stop = str(unit.layer), int(unit.args["start"]), int(unit.args["stop"])
        group = store.require_group(f"layers/{layer}/revcorr")
        opts: RevcorrOptions = self.options(attrs_of(group)["config"])
        rf, shape, _, size = layer_geometry(store, layer)
        box = box_spec(rf, shape, size, max_side=opts.max_side, colour=opts.colour)
        model, device = res.model(), res.device
        pre = model_meta(model).preprocessing
        reducer = RevcorrReducer(stop - start, box.dim, shuffles=opts.shuffles, seed=opts.seed, device=device)
        accumulate(
            model,
            layer,
            reducer,
            box,
            channels=slice(start, stop),
            n=opts.num_images,
            batch_size=opts.batch_size,
            noise_mean=pre.mean,
            sigma=opts.sigma,
            seed=opts.seed,
            input_mean=pre.mean,
            input_std=pre.std,
            image_size=size,
            precision=opts.precision,
        )
        result = reducer.result(k=opts.n_eig, margin=opts.null_margin)
        # tuning predicted by the filters: full-field luminance gratings at contrast 1, same RF centre
        side = rf_side(rf, size)
        gs = GratingSet(
            size,
            orientations(opts.n_orientations),
            log_sfs(side, opts.n_sfs, image_size=size),
            phases(opts.n_phases),
            mean=pre.mean,
            amplitude=stimulus_amplitude(pre.mean, 0.0),
            centre=rf_centre(rf, shape, size),
        )
        feats = torch.cat(
            [box_features(img, pre.mean, box).cpu() for _, img in gs.batches(opts.batch_size, device)]
        )
        lin, energy = predicted_surface(result, feats, gs.shape)
        preds = {}
        for src, surf in (("awa", lin), ("awc", energy)):
            s = surf[:, 0, 0].max(-1)  # (C, O, S): max over phase
            finite = np.nan_to_num(s, nan=-np.inf)
            o, f = preferred(finite)
            bad = ~(finite.reshape(len(s), -1).max(1) > 0)  # no filter, or no grating drives it
            preds[f"pred_orientation_{src}"] = np.where(bad, np.nan, np.asarray(gs.orientations)[o])
            preds[f"pred_sf_{src}"] = np.where(bad, np.nan, np.asarray(gs.sfs)[f])
        rows = slice(start, stop)
        array_node(group, "awa")[rows] = result.awa.numpy().reshape(-1, *box.shape)
        array_node(group, "eigval")[rows] = result.eigvals.numpy()
        array_node(group, "eigvec")[rows] = result.eigvecs.numpy().reshape(
            *result.eigvecs.shape[:2], *box.shape
        )
        array_node(group, "significant")[rows] = result.significant.numpy()
        array_node(group, "null")[rows] = result.null.numpy()
        array_node(group, "weight")[rows] = result.total_weight.numpy()
        for name, value in preds.items():
            array_node(group, name)[rows] = value.astype(np.float32)
        return {
            "layer": layer,
            "channels": [start, stop],
            "images": reducer.n,
            "features": box.dim,
            "significant": int(result.significant.any(1).sum()),
        }

    def finish(self, store: AtlasStore, opts: RevcorrOptions) -> dict[str, Any]:
        """Per layer: agreement of the predicted preferences with the tuning analysis's (when it ran)."""
        out: dict[str, Any] = {}
        for layer in atlas_layers(store, opts.layers):
            agreed = self._agreement(Atlas(store), layer)
            if agreed is not None:
                store.require_group(f"layers/{layer}/revcorr").attrs["prediction_agreement"] = agreed
                out[layer] = agreed
        return out

    def _agreement(self, atlas: Atlas, layer: str) -> dict[str, Any] | None:
        rc = _group(atlas, layer)
        tu = atlas.layer(layer).group.get("tuning")
        if rc is None or not isinstance(tu, zarr.Group) or not isinstance(tu.get("osi"), zarr.Array):
            return None
        if not _complete(atlas.store, layer) or f"tuning/{layer}" not in atlas.store.done_keys("tuning"):
            return None
        oris = read(tu, "orientation").astype(np.float64)
        sfs = read(tu, "sf").astype(np.float64)
        step = 180.0 / len(oris)
        sf_step = float(np.log2(sfs[1] / sfs[0])) if len(sfs) > 1 else math.inf
        meas_o, meas_f = (read(tu, k).astype(np.float64) for k in ("preferred_orientation", "preferred_sf"))
        alive = read(tu, "f0").reshape(len(meas_o), -1).max(1) > 0  # units that respond to gratings
        meas_o, meas_f = np.where(alive, meas_o, np.nan), np.where(alive, meas_f, np.nan)
        result: dict[str, Any] = {}
        for src in ("awa", "awc"):
            a = agreement(
                read(rc, f"pred_orientation_{src}").astype(np.float64),
                meas_o,
                step,
                read(rc, f"pred_sf_{src}").astype(np.float64),
                meas_f,
                sf_step,
            )
            result[src] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in a.items()}
        return result

    # --- inspection --------------------------------------------------------------------------------
    def verify(self, store: AtlasStore) -> list[str]:
        problems = []
        atlas = Atlas(store)
        for layer in store.layer_names:
            group = _group(atlas, layer)
            if group is None or not _complete(store, layer):
                continue
            if np.isnan(read(group, "weight")).any():
                problems.append(
                    f"layers/{layer}/revcorr: every block is done but some channels have no result"
                )
        return problems

    def findings(self, atlas: Atlas) -> list[str]:
        lines = []
        for layer in atlas.layers:
            group = _group(atlas, layer)
            if group is None or not _complete(atlas.store, layer):
                continue
            sig = read(group, "significant")
            k = sig.shape[1] // 2
            n = sig.shape[0]
            line = (
                f"revcorr {layer}: {int(sig[:, :k].any(1).sum())}/{n} channels with a significant excitatory "
                f"AWC eigen-filter, {int(sig[:, k:].any(1).sum())}/{n} with a suppressive one"
            )
            agreed = attrs_of(group).get("prediction_agreement") or self._agreement(atlas, layer)
            if agreed:
                parts = [
                    f"{src.upper()} predicts {a['orientation_within_step']:.0%} of preferred orientations within one step"
                    for src, a in agreed.items()
                    if a.get("n") and a.get("orientation_within_step") is not None
                ]
                if parts:
                    line += "; " + ", ".join(parts)
            lines.append(line)
        return lines

    # --- the site ------------------------------------------------------------------------------------
    def report_layer(self, atlas: Atlas, layer: str, assets: Assets) -> Section | None:
        group = _group(atlas, layer)
        if group is None or not _complete(atlas.store, layer):
            return None
        sig = read(group, "significant")
        k, n = sig.shape[1] // 2, sig.shape[0]
        attrs = attrs_of(group)
        rows = [
            ("significant excitatory eigen-filter", int(sig[:, :k].any(1).sum())),
            ("significant suppressive eigen-filter", int(sig[:, k:].any(1).sum())),
        ]
        body = "".join(f"<tr><td>{a}</td><td>{b}/{n}</td></tr>" for a, b in rows)
        agreed = attrs.get("prediction_agreement") or self._agreement(atlas, layer)
        pred = ""
        if agreed:
            cells = "".join(
                f"<tr><td>{src.upper()}</td><td>{a.get('n')}</td><td>{_pct(a.get('orientation_within_step'))}</td>"
                f"<td>{_num(a.get('orientation_circular_correlation'))}</td><td>{_pct(a.get('sf_within_step'))}</td></tr>"
                for src, a in agreed.items()
            )
            pred = (
                "<p>RF predicts tuning (preferred grating of the filters vs measured):</p><table><tr><th>filter</th>"
                "<th>units</th><th>orientation within one step</th><th>circular r</th><th>SF within one step</th></tr>"
                f"{cells}</table>"
            )
        box = html.escape(f"RF box {attrs.get('box')} block-averaged by {attrs.get('factor')}")
        return Section("Reverse correlation", f"<table>{body}</table><p>{box}</p>{pred}")

    def report_channel(self, atlas: Atlas, layer: str, channel: int, assets: Assets) -> Section | None:
        group = _group(atlas, layer)
        if group is None:
            return None
        awa = np.asarray(array_node(group, "awa")[channel], np.float64)
        if np.isnan(awa).all():
            return None
        vals = np.asarray(array_node(group, "eigval")[channel], np.float64)
        sig = np.asarray(array_node(group, "significant")[channel], bool)
        vecs = np.asarray(array_node(group, "eigvec")[channel], np.float64)
        figs = [(assets.image(f"{layer}/c{channel:04d}-awa", _symmetric_uint8(awa)), "AWA")]
        for i in np.flatnonzero(sig):
            src = assets.image(f"{layer}/c{channel:04d}-awc{i}", _symmetric_uint8(vecs[i]))
            figs.append((src, f"AWC eigen-RF, λ = {vals[i]:.3g}"))
        parts = "".join(
            f'<figure><img src="{s}" alt="{t}"><figcaption>{html.escape(t)}</figcaption></figure>'
            for s, t in figs
        )
        pred = ", ".join(
            f"{src.upper()}: {item(group, f'pred_orientation_{src}', channel):.0f} deg, "
            f"{item(group, f'pred_sf_{src}', channel):.3g} c/px"
            for src in ("awa", "awc")
        )
        null = np.asarray(array_node(group, "null")[channel], np.float64)
        note = f"null band [{null[0]:.3g}, {null[1]:.3g}]; {int(sig.sum())} significant eigen-filter(s); predicted preference {pred}"
        return Section("Reverse correlation", f"{parts}<p>{html.escape(note)}</p>")


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.0f}%"


def _num(v: Any) -> str:
    return "–" if v is None else f"{float(v):.2f}"
