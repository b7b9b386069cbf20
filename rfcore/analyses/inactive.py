"""Inactive channels (Kobayashi & Shouno 2020, §3.5) as a registered analysis: from the sweep's
per-channel maxima, the channels that never rise above a threshold."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from rfcore.analysis import Analysis, Assets, Resources, Section, Unit, atlas_layers, check, register
from rfcore.atlas import Atlas
from rfcore.data import iter_batches
from rfcore.errors import ConfigMismatchError, StoreError
from rfcore.inactive import INACTIVE_SPEC, channel_max, read_inactive, sweep_precision, write_inactive
from rfcore.models import model_meta
from rfcore.store import AtlasStore, redact


def check_threshold(store: AtlasStore, layer: str, threshold: float) -> bool:
    """Whether `layer` already has its inactive channels at `threshold`; ConfigMismatchError when
    they were detected at another threshold (one mask per layer: no silent replacement)."""
    try:
        _, attrs = read_inactive(store, layer)
    except StoreError:
        return False
    if float(attrs["threshold"]) != float(threshold):
        raise ConfigMismatchError(
            f"layers/{layer}/inactive in {redact(store.url)} was detected at threshold {attrs['threshold']}, "
            f"not {threshold}; use another --out or the same threshold"
        )
    return True


@dataclass(frozen=True)
class InactiveOptions:
    layers: str = field(
        default="default", metadata={"help": "default (the first max-pool), all, or a comma list of layers"}
    )
    threshold: float = field(default=0.0, metadata={"help": "inactive when the max activation <= this"})

    def __post_init__(self) -> None:
        check(bool(self.layers.strip()), "layers must name at least one layer")


def _key(layer: str) -> str:
    return f"inactive/{layer}"


@register
class Inactive(Analysis):
    name = "inactive"
    description = "channels whose max activation over the swept images is <= a threshold (paper §3.5)"
    arrays = (INACTIVE_SPEC,)
    Options: ClassVar[type[Any]] = InactiveOptions
    order = 10
    uses_model = True  # only to recompute the maxima in fp32 after a bf16/fp16 sweep
    uses_data = True

    def plan(self, store: AtlasStore, opts: InactiveOptions) -> list[Unit]:
        units = []
        for layer in atlas_layers(store, opts.layers):
            if "max" not in Atlas(store).layer(layer).group:
                raise StoreError(
                    f"layer {layer} of {redact(store.url)} has no sweep statistics yet; sweep it first"
                )
            check_threshold(store, layer, opts.threshold)
            units.append(Unit(_key(layer), layer, {"threshold": opts.threshold}))
        return [u for u in units if u.key in set(store.pending([u.key for u in units]))]

    def run(self, store: AtlasStore, unit: Unit, res: Resources) -> dict[str, Any]:
        assert unit.layer is not None
        maxima = None
        if sweep_precision(store) != "float32":  # bf16 can round a silent unit's -1e-3 up: redo in fp32
            model = res.model()
            batches = iter_batches(
                res.dataset(), range(int(store.run["num_images"])), int(store.run["config"]["batch_size"])
            )
            maxima = channel_max(
                model,
                unit.layer,
                batches,
                normalize=model_meta(model).preprocessing.normalize,
                device=res.device,
            )
        inactive = write_inactive(store, unit.layer, float(unit.args["threshold"]), maxima)
        return {"layer": unit.layer, "inactive": [int(i) for i in np.flatnonzero(inactive)]}

    def finish(self, store: AtlasStore, opts: InactiveOptions) -> dict[str, Any]:
        found = {}
        for layer in atlas_layers(store, opts.layers):
            mask, _ = read_inactive(store, layer)
            found[layer] = [int(i) for i in np.flatnonzero(mask)]
        return {"threshold": opts.threshold, "inactive": found}

    def _stored(self, atlas: Atlas) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        out = {}
        for layer in atlas.layers:
            try:
                out[layer] = read_inactive(atlas.store, layer)
            except StoreError:
                continue
        return out

    def verify(self, store: AtlasStore) -> list[str]:
        problems = []
        for layer, (mask, attrs) in self._stored(Atlas(store)).items():
            if int(attrs.get("count", -1)) != int(mask.sum()):
                problems.append(
                    f"inactive/{layer}: count attr {attrs.get('count')} != {int(mask.sum())} flagged"
                )
        return problems

    def findings(self, atlas: Atlas) -> list[str]:
        return [
            f"{layer}: {int(mask.sum())}/{len(mask)} inactive channel(s) (max <= {attrs['threshold']:g})"
            for layer, (mask, attrs) in self._stored(atlas).items()
        ]

    def channel_columns(self, atlas: Atlas, layer: str) -> dict[str, np.ndarray]:
        try:
            mask, _ = read_inactive(atlas.store, layer)
        except StoreError:
            return {}
        return {"inactive": mask}

    def report_channel(self, atlas: Atlas, layer: str, channel: int, assets: Assets) -> Section | None:
        columns = self.channel_columns(atlas, layer)
        if not columns:
            return None
        state = "inactive" if bool(columns["inactive"][channel]) else "active"
        return Section(
            "Inactive test", f"<p>This channel is <b>{html.escape(state)}</b> over the swept images.</p>"
        )
