"""Activation maximization (Kobayashi & Shouno 2020, §2.3 eq. 2, settings §3.4) as a registered
analysis: one unit per (layer, objective, channel block). The optimizer is `rfcore.actmax`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import zarr

import rfcore.actmax as am
from rfcore.analysis import Analysis, Assets, Resources, Section, Unit, check, parse_list, register
from rfcore.atlas import Atlas
from rfcore.layers import list_layers, resolve_layers
from rfcore.models import get_model
from rfcore.store import AtlasStore


@dataclass(frozen=True)
class ActmaxOptions:
    layers: str = field(default="", metadata={"help": "comma list of layers (default: the atlas's layers)"})
    channels: str = field(default="all", metadata={"help": "channels, e.g. 0-63, 3,5,9-11 or all"})
    objectives: tuple[str, ...] = field(
        default=am.OBJECTIVES, metadata={"help": "comma list: neuron, channel"}
    )
    preset: str = field(default="kobayashi2020", metadata={"help": f"one of {', '.join(am.PRESETS)}"})
    steps: int | None = field(default=None, metadata={"help": "override the preset's number of steps"})
    init: str | None = field(
        default=None,
        metadata={
            "help": "override the preset's start image: zero or random (an untrained net with zero BN "
            "biases maps the zero image to all-zero activations, a stationary point: use random)"
        },
    )
    size: int | None = field(default=None, metadata={"help": "override the preset's image side (px)"})
    block_size: int = field(default=64, metadata={"help": "channels per task (one batch)"})
    seed: int = field(default=0, metadata={"help": "seed of the random start images and transforms"})

    def __post_init__(self) -> None:
        check(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        bad = [o for o in self.objectives if o not in am.OBJECTIVES]
        check(
            not bad and bool(self.objectives),
            f"objectives must be among {', '.join(am.OBJECTIVES)}, not {bad}",
        )
        self.config()  # unknown preset or bad knob: refused here, before anything is written

    def config(self) -> am.ActmaxConfig:
        knobs = {"steps": self.steps, "init": self.init, "size": self.size}
        return am.preset(self.preset, **{k: v for k, v in knobs.items() if v is not None})


def _model(store: AtlasStore, seed: int) -> Any:
    return get_model(store.run["model"], weights=store.run.get("weights"), seed=seed)


@register
class Actmax(Analysis):
    name = "actmax"
    description = (
        "optimized input per channel: neuron (centre unit) and channel objectives (paper §2.3, §3.4)"
    )
    arrays = (*am.ACTMAX_ARRAYS.values(),)
    Options: ClassVar[type[Any]] = ActmaxOptions
    uses_model = True
    order = 30

    def plan(self, store: AtlasStore, opts: ActmaxOptions) -> list[Unit]:
        model = _model(store, int(store.run["config"].get("seed", 0)))
        names = resolve_layers(model, parse_list(opts.layers)) if opts.layers else store.layer_names
        counts = {info.name: info.channels for info in list_layers(model)}
        config = opts.config()
        units = []
        for layer in names:
            wanted = am.parse_channels(opts.channels, counts[layer])
            for objective in opts.objectives:
                am.prepare_actmax(
                    store, model, layer, objective, config=config, seed=opts.seed, block_size=opts.block_size
                )
                for block, chans in am.plan_blocks(wanted, opts.block_size):
                    full = range(block * opts.block_size, min((block + 1) * opts.block_size, counts[layer]))
                    units.append(
                        Unit(
                            am.block_key(layer, objective, block, None if chans == list(full) else chans),
                            layer,
                            {"objective": objective, "block": block, "channels": chans},
                        )
                    )
        pending = set(store.pending([u.key for u in units]))
        return [u for u in units if u.key in pending]

    def run(self, store: AtlasStore, unit: Unit, res: Resources) -> dict[str, Any]:
        layer, objective = str(unit.layer), str(unit.args["objective"])
        attrs = am.settings(store, layer, objective)
        result = am.actmax(
            res.model(),
            layer,
            list(unit.args["channels"]),
            objective=objective,
            config=am.ActmaxConfig.from_dict(attrs["config"]),
            seed=int(attrs["seed"]),
        )
        am.write_actmax(store, result)
        return {"layer": layer, "objective": objective, "channels": len(result.channels),
                "mean_activation": float(result.activation.mean())}  # fmt: skip

    def _images(self, atlas: Atlas, layer: str) -> dict[str, zarr.Array[Any]]:
        out = {}
        for title, path in (
            ("act-max, channel objective", "channel/image"),
            ("act-max, neuron objective (RF crop)", "neuron/crop"),
        ):
            node = atlas.store.root.get(f"layers/{layer}/actmax/{path}")
            if isinstance(node, zarr.Array):
                out[title] = node
        return out

    def report_channel(self, atlas: Atlas, layer: str, channel: int, assets: Assets) -> Section | None:
        parts = []
        for i, (title, arr) in enumerate(self._images(atlas, layer).items()):
            image = np.asarray(arr[channel], dtype=np.float64)  # RGB display units, [0, 1]
            if np.isnan(image).all():
                continue
            src = assets.image(f"{layer}/c{channel:04d}-actmax{i}", 255.0 * image)
            parts.append(f'<figure><img src="{src}" alt="{title}"><figcaption>{title}</figcaption></figure>')
        return Section("Activation maximization", "".join(parts)) if parts else None

    def verify(self, store: AtlasStore) -> list[str]:
        problems = []
        for layer in store.layer_names:
            for objective in am.OBJECTIVES:
                node = store.root.get(f"layers/{layer}/actmax/{objective}")
                if isinstance(node, zarr.Group) and not isinstance(node.get("image"), zarr.Array):
                    problems.append(f"layers/{layer}/actmax/{objective}: settings but no image array")
        return problems
