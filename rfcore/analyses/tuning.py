"""Grating tuning of every channel's centre unit (orientation x SF surface, OSI, circular variance,
bandwidths, F1/F0, colour opponency) as a registered analysis: one unit per layer, arrays under
`layers/<layer>/tuning/`. The science is `rfcore.tuning` and `rfcore.stimuli`; definitions in
docs/tuning.md."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import zarr

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
from rfcore.schema import ArraySpec
from rfcore.stimuli import COLOUR_AXES, GratingSet, log_sfs, orientations, phases
from rfcore.store import AtlasStore, attrs_of
from rfcore.tuning import CRITERIA, measure_responses, phase_summary, rf_centre, tuning_metrics

_SURFACE_DIMS = ("channel", "axis", "contrast", "orientation", "sf")
_SURFACES = {
    "max": "centre-unit response (rectified) to gratings, max over phase; NaN = not run",
    "f0": "mean response over phase (F0)",
    "f1": "first-harmonic amplitude of the response over phase (F1)",
}
_METRICS = {
    "preferred_orientation": "preferred modulation direction, degrees in [0, 180) (luminance, top contrast)",
    "preferred_sf": "preferred spatial frequency, cycles/pixel",
    "osi": "(R_pref - R_orth) / (R_pref + R_orth) of the orientation curve at the preferred SF",
    "circular_variance": "1 - abs(sum R e^(2i theta)) / sum R (Ringach et al. 2002)",
    "orientation_bandwidth": "half-width at 1/sqrt(2) of the peak, degrees; NaN if it never drops",
    "sf_bandwidth": "full width at half height of the SF curve, octaves; NaN if open-ended",
    "modulation_ratio": "F1/F0 at the preferred grating (> 1: simple-like)",
    "colour_opponency": "(R_chrom - R_lum) / (R_chrom + R_lum), best gratings at equal contrast",
}
_CLASSES = {
    "is_orientation_selective": "orientation-selective by the `criterion` option (default CV < 0.6)",
    "is_colour_opponent": "colour_opponency > opponency_min",
    "is_double_opponent": "colour-opponent and orientation-selective on its best chromatic axis",
}
TUNING_ARRAYS: dict[str, ArraySpec] = {
    **{
        k: ArraySpec(f"tuning/{k}", _SURFACE_DIMS, "float32", math.nan, doc, analysis="tuning")
        for k, doc in _SURFACES.items()
    },
    "orientation": ArraySpec(
        "tuning/orientation", ("orientation",), "float32", math.nan, "grid: degrees", analysis="tuning"
    ),
    "sf": ArraySpec("tuning/sf", ("sf",), "float32", math.nan, "grid: cycles/pixel", analysis="tuning"),
    "sf_per_rf": ArraySpec(
        "tuning/sf_per_rf",
        ("sf",),
        "float32",
        math.nan,
        "grid: cycles per RF (side clipped to the image)",
        analysis="tuning",
    ),
    "contrast": ArraySpec(
        "tuning/contrast", ("contrast",), "float32", math.nan, "grid: contrasts", analysis="tuning"
    ),
    **{
        k: ArraySpec(f"tuning/{k}", ("channel",), "float32", math.nan, doc, analysis="tuning")
        for k, doc in _METRICS.items()
    },
    **{
        k: ArraySpec(f"tuning/{k}", ("channel",), "bool", False, doc, analysis="tuning")
        for k, doc in _CLASSES.items()
    },
}


def layer_geometry(store: AtlasStore, layer: str) -> tuple[dict[str, Any], tuple[int, int], int, int]:
    """(rf {size, stride, offset}, feature-map (H, W), channels, image size) of an atlas layer."""
    attrs = attrs_of(store.layer_group(layer))
    shape = (int(attrs["shape"][0]), int(attrs["shape"][1]))
    return dict(attrs["rf"]), shape, int(attrs["channels"]), int(store.run["image_size"])


def rf_side(rf: dict[str, Any], image_size: int) -> float:
    """The RF side used for the SF grid and the aperture: the larger side, clipped to the image."""
    return float(min(max(int(rf["size"][0]), int(rf["size"][1])), image_size))


def stimulus_amplitude(mean: Sequence[float], amplitude: float) -> float:
    """`amplitude`, or with 0 the largest A keeping mean +- A inside [0, 1] on every channel."""
    return amplitude if amplitude > 0 else float(min(min(m, 1.0 - m) for m in mean))


@dataclass(frozen=True)
class TuningOptions:
    layers: str = field(default="all", metadata={"help": "all (every layer of the atlas) or a comma list"})
    n_orientations: int = field(
        default=12, metadata={"help": "orientations over [0, 180) (12: 15 deg steps)"}
    )
    n_sfs: int = field(default=10, metadata={"help": "log-spaced SFs from 1 cycle per RF to 0.5 c/px (>= 2)"})
    n_phases: int = field(default=8, metadata={"help": "spatial phases over [0, 2 pi)"})
    contrasts: tuple[float, ...] = field(
        default=(1.0,), metadata={"help": "contrasts c (metrics use the highest); comma list"}
    )
    colour: bool = field(default=True, metadata={"help": "also red-green and blue-yellow gratings"})
    aperture: str = field(
        default="full", metadata={"help": "full (full field) or rf (disc of the RF's side)"}
    )
    amplitude: float = field(
        default=0.0,
        metadata={"help": "contrast scale A in [0,1] image units; 0: min over channels of min(mu, 1-mu)"},
    )
    criterion: str = field(
        default="cv", metadata={"help": "orientation-selective by cv, osi, either or both"}
    )
    cv_max: float = field(default=0.6, metadata={"help": "selective when circular variance < this"})
    osi_min: float = field(default=0.5, metadata={"help": "selective when OSI > this"})
    opponency_min: float = field(
        default=0.0, metadata={"help": "colour-opponent when the opponency index > this"}
    )
    batch_size: int = field(default=256, metadata={"help": "gratings per forward pass"})
    precision: str = field(default="auto", metadata={"help": "autocast: off, auto, bf16, fp16"})

    def __post_init__(self) -> None:
        check(bool(self.layers.strip()), "layers must name at least one layer")
        check(
            self.n_orientations >= 4 and self.n_orientations % 2 == 0, "n_orientations must be even and >= 4"
        )
        check(self.n_sfs >= 2, f"n_sfs must be >= 2, got {self.n_sfs}")
        check(self.n_phases >= 3, f"n_phases must be >= 3 (F1 needs them), got {self.n_phases}")
        check(
            len(self.contrasts) > 0 and all(0 < c <= 1 for c in self.contrasts), "contrasts must be in (0, 1]"
        )
        check(self.aperture in ("full", "rf"), f"aperture must be full or rf, not {self.aperture!r}")
        check(0 <= self.amplitude <= 0.5, f"amplitude must be in [0, 0.5], got {self.amplitude}")
        check(self.criterion in CRITERIA, f"criterion must be one of {', '.join(CRITERIA)}")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.precision in ("off", "auto", "bf16", "fp16"), f"unknown precision {self.precision!r}")


def array_node(group: zarr.Group, name: str) -> zarr.Array[Any]:
    """The array `name` of `group` (StoreError-free: callers checked the group is complete)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise TypeError(f"{name} is a group, not an array")
    return node


def read(group: zarr.Group, name: str) -> np.ndarray:
    """The whole array `name` of `group` as numpy."""
    return np.asarray(array_node(group, name)[...])


def item(group: zarr.Group, name: str, index: int) -> Any:
    """Element `index` of the 1-d array `name` as a Python scalar."""
    return np.asarray(array_node(group, name)[index]).item()


def canvas(target: Any, projection: str | None = None) -> Any:
    """The matplotlib Axes to draw on from what `Assets.figure` hands a callback (a Figure or an Axes);
    an Axes of another projection is replaced by one of `projection` (e.g. "polar") in its figure."""
    if hasattr(target, "add_subplot"):  # a Figure
        return target.add_subplot(projection=projection)
    if projection is None or getattr(target, "name", None) == projection:
        return target
    fig = target.figure
    target.remove()
    return fig.add_subplot(projection=projection)


def _key(layer: str) -> str:
    return f"tuning/{layer}"


def _config(opts: TuningOptions) -> dict[str, Any]:
    config = options_config(opts)
    for k in ("layers", "batch_size"):
        config.pop(k)
    return config


def _axes(colour: bool) -> tuple[str, ...]:
    return tuple(COLOUR_AXES) if colour else ("luminance",)


def _group(atlas: Atlas, layer: str) -> zarr.Group | None:
    node = atlas.layer(layer).group.get("tuning")
    return node if isinstance(node, zarr.Group) and isinstance(node.get("osi"), zarr.Array) else None


def _done_layers(atlas: Atlas) -> list[str]:
    done = atlas.store.done_keys("tuning")
    return [la for la in atlas.layers if _key(la) in done]


@register
class Tuning(Analysis):
    name = "tuning"
    description = (
        "grating tuning of each channel's centre unit: orientation x SF surface, OSI, CV, bandwidths, colour"
    )
    arrays = tuple(TUNING_ARRAYS.values())
    Options: ClassVar[type[Any]] = TuningOptions
    uses_model = True
    order = 80

    def plan(self, store: AtlasStore, opts: TuningOptions) -> list[Unit]:
        layers = atlas_layers(store, opts.layers)
        config = _config(opts)
        for layer in layers:
            store.require_group(f"layers/{layer}/tuning", config=config)
        units = []
        for layer in layers:
            rf, _, channels, size = layer_geometry(store, layer)
            side = rf_side(rf, size)
            sfs = log_sfs(side, opts.n_sfs, image_size=size)
            shape = (channels, len(_axes(opts.colour)), len(opts.contrasts), opts.n_orientations, opts.n_sfs)
            for k in _SURFACES:
                store.require_array(TUNING_ARRAYS[k], shape, shape, layer=layer)
            grids = {
                "orientation": orientations(opts.n_orientations),
                "sf": sfs,
                "sf_per_rf": tuple(f * side for f in sfs),
                "contrast": opts.contrasts,
            }
            for k, values in grids.items():
                store.require_array(TUNING_ARRAYS[k], (len(values),), (len(values),), layer=layer)[...] = (
                    np.asarray(values, np.float32)
                )
            for k in (*_METRICS, *_CLASSES):
                store.require_array(TUNING_ARRAYS[k], (channels,), (channels,), layer=layer)
            units.append(Unit(_key(layer), layer, {"batch_size": opts.batch_size}))
        pending = set(store.pending([u.key for u in units]))
        return [u for u in units if u.key in pending]

    def run(self, store: AtlasStore, unit: Unit, res: Resources) -> dict[str, Any]:
        """Measure every channel of one layer with the grid `plan` recorded; write its arrays."""
        layer = str(unit.layer)
        config = attrs_of(store.require_group(f"layers/{layer}/tuning"))["config"]
        opts: TuningOptions = self.options({**config, "batch_size": unit.args.get("batch_size", 256)})
        rf, shape, channels, size = layer_geometry(store, layer)
        model = res.model()
        pre = model_meta(model).preprocessing
        grid = store.require_group(f"layers/{layer}/tuning")
        sfs = tuple(float(v) for v in read(grid, "sf"))
        gs = GratingSet(
            size,
            orientations(opts.n_orientations),
            sfs,
            phases(opts.n_phases),
            contrasts=opts.contrasts,
            axes=_axes(opts.colour),
            mean=pre.mean,
            amplitude=stimulus_amplitude(pre.mean, opts.amplitude),
            centre=rf_centre(rf, shape, size),
            radius=rf_side(rf, size) / 2 if opts.aperture == "rf" else None,
        )
        resp = (
            measure_responses(
                model,
                layer,
                gs,
                input_mean=pre.mean,
                input_std=pre.std,
                batch_size=opts.batch_size,
                precision=opts.precision,
            )
            .cpu()
            .numpy()
        )
        rmax, f0, f1 = phase_summary(resp, gs.phases)
        result = tuning_metrics(
            rmax,
            f0,
            f1,
            axes=gs.axes,
            orientations=gs.orientations,
            sfs=sfs,
            criterion=opts.criterion,
            cv_max=opts.cv_max,
            osi_min=opts.osi_min,
            opponency_min=opts.opponency_min,
            contrasts=opts.contrasts,
        )
        for k, v in (("max", rmax), ("f0", f0), ("f1", f1)):
            array_node(grid, k)[...] = v.astype(np.float32)
        for k in (*_METRICS, *_CLASSES):
            value = getattr(result, k)
            array_node(grid, k)[...] = value.astype(np.float32 if k in _METRICS else bool)
        return {
            "layer": layer,
            "channels": channels,
            "gratings": len(gs),
            "orientation_selective": int(result.is_orientation_selective.sum()),
            "colour_opponent": int(result.is_colour_opponent.sum()),
        }

    # --- inspection --------------------------------------------------------------------------------
    def layer_summary(self, atlas: Atlas, layer: str) -> dict[str, Any] | None:
        """Counts and fractions of the classes in `layer` (None when not measured)."""
        group = _group(atlas, layer)
        if group is None or _key(layer) not in atlas.store.done_keys("tuning"):
            return None
        n = int(array_node(group, "osi").shape[0])
        out: dict[str, Any] = {"channels": n}
        for k in _CLASSES:
            count = int(read(group, k).sum())
            out[k] = count
            out[f"fraction_{k[3:]}"] = count / n if n else math.nan
        return out

    def verify(self, store: AtlasStore) -> list[str]:
        problems = []
        done = store.done_keys("tuning")
        atlas = Atlas(store)
        for layer in store.layer_names:
            if _key(layer) not in done:
                continue
            group = _group(atlas, layer)
            if group is None:
                problems.append(f"layers/{layer}/tuning: marked done but has no metrics")
                continue
            surface = read(group, "max")
            if np.isnan(surface).any():
                problems.append(f"layers/{layer}/tuning/max: NaN responses in a done layer")
        return problems

    def findings(self, atlas: Atlas) -> list[str]:
        lines = []
        for layer in _done_layers(atlas):
            s = self.layer_summary(atlas, layer)
            if s is None:
                continue
            n = s["channels"]
            lines.append(
                f"tuning {layer}: {s['is_orientation_selective']}/{n} orientation-selective "
                f"({100 * s['fraction_orientation_selective']:.0f}%), {s['is_colour_opponent']}/{n} colour-opponent, "
                f"{s['is_double_opponent']}/{n} double-opponent"
            )
        return lines

    # --- the site ------------------------------------------------------------------------------------
    def channel_columns(self, atlas: Atlas, layer: str) -> dict[str, np.ndarray]:
        group = _group(atlas, layer)
        if group is None:
            return {}
        return {
            k: read(group, k)
            for k in ("osi", "circular_variance", "is_orientation_selective", "is_colour_opponent")
        }

    def report_layer(self, atlas: Atlas, layer: str, assets: Assets) -> Section | None:
        s = self.layer_summary(atlas, layer)
        if s is None:
            return None
        group = _group(atlas, layer)
        assert group is not None
        config = attrs_of(group).get("config", {})
        n = s["channels"]
        rows = [
            ("orientation-selective", s["is_orientation_selective"]),
            ("colour-opponent", s["is_colour_opponent"]),
            ("double-opponent", s["is_double_opponent"]),
        ]
        body = "".join(
            f"<tr><td>{k}</td><td>{v}/{n}</td><td>{100 * v / max(n, 1):.0f}%</td></tr>" for k, v in rows
        )
        crit = html.escape(
            f"criterion {config.get('criterion')} (CV < {config.get('cv_max')}, OSI > {config.get('osi_min')})"
        )
        return Section(
            "Grating tuning",
            f"<table><tr><th>class</th><th>channels</th><th>fraction</th></tr>{body}</table><p>{crit}</p>",
        )

    def report_channel(self, atlas: Atlas, layer: str, channel: int, assets: Assets) -> Section | None:
        group = _group(atlas, layer)
        if group is None:
            return None
        oris = read(group, "orientation").astype(np.float64)
        sfs = read(group, "sf").astype(np.float64)
        surface = np.asarray(
            array_node(group, "max")[channel, 0, int(np.argmax(read(group, "contrast")))], np.float64
        )  # luminance, top contrast
        if np.isnan(surface).all():
            return None
        po = float(item(group, "preferred_orientation", channel))
        ps = float(item(group, "preferred_sf", channel))
        io, js = int(np.argmin(np.abs(oris - po))), int(np.argmin(np.abs(sfs - ps)))
        ori_curve, sf_curve = surface[:, js], surface[io, :]

        def polar(fig: Any) -> None:
            from matplotlib.ticker import MaxNLocator

            ax = canvas(fig, "polar")
            th = np.deg2rad(np.concatenate([oris, oris + 180.0, oris[:1] + 360.0]))
            r = np.concatenate([ori_curve, ori_curve, ori_curve[:1]])
            ax.plot(th, r, "-o", ms=3)
            ax.set_xticks(np.deg2rad([0, 90, 180, 270]))  # fewer labels: text is most of the drawing time
            ax.yaxis.set_major_locator(MaxNLocator(3))
            ax.tick_params(labelsize=7)
            ax.set_title(f"orientation at {ps:.3g} c/px", fontsize=8)

        def sf_plot(fig: Any) -> None:
            ax = canvas(fig)
            ax.semilogx(sfs, sf_curve, "-o", ms=3)
            ax.set_xlabel("cycles/pixel")
            ax.set_ylabel("response")
            ax.set_title(f"SF at {po:.0f} deg", fontsize=8)

        a = assets.figure(f"{layer}/c{channel:04d}-tuning-orientation", polar, projection="polar")
        b = assets.figure(f"{layer}/c{channel:04d}-tuning-sf", sf_plot)
        vals = {k: float(item(group, k, channel)) for k in _METRICS}
        vals["preferred_sf (cycles/RF)"] = float(read(group, "sf_per_rf")[js])
        cls = [k[3:].replace("_", "-") for k in _CLASSES if bool(item(group, k, channel))]
        table = "".join(f"<tr><td>{k}</td><td>{v:.3g}</td></tr>" for k, v in vals.items())
        return Section(
            "Grating tuning",
            f'<figure><img src="{a}" alt="orientation tuning"></figure><figure><img src="{b}" alt="SF tuning"></figure>'
            f"<table>{table}</table><p>{html.escape(', '.join(cls) or 'no class')}</p>",
        )
