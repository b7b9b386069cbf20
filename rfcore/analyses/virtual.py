"""Virtual filters (Kobayashi & Shouno 2020, §3.2, eq. 3) as a registered analysis: weights only, one
unit per conv layer of the model's default set. The composition is `rfcore.virtual`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import zarr

from rfcore.analysis import Analysis, Assets, Resources, Section, Unit, parse_list, register
from rfcore.atlas import Atlas
from rfcore.models import get_model
from rfcore.store import AtlasStore
from rfcore.virtual import (
    VIRTUAL_ARRAYS,
    default_virtual_layers,
    previous_conv,
    virtual_filter,
    write_virtual,
)


@dataclass(frozen=True)
class VirtualOptions:
    layers: str = field(
        default="", metadata={"help": "comma list of conv layers (default: the model's default set)"}
    )


@register
class Virtual(Analysis):
    name = "virtual"
    description = (
        "virtual filters: a conv composed with the conv before it, and sorted coupling weights (§3.2)"
    )
    arrays = (*VIRTUAL_ARRAYS.values(),)
    Options: ClassVar[type[Any]] = VirtualOptions
    uses_model = True  # weights only: runs on the CPU copy of the model
    order = 40

    def plan(self, store: AtlasStore, opts: VirtualOptions) -> list[Unit]:
        model = get_model(store.run["model"])
        pairs = (
            [(L, previous_conv(model, L)) for L in parse_list(opts.layers)]
            if opts.layers
            else default_virtual_layers(model)
        )
        units = [Unit(f"virtual/{layer}", layer, {"source": source}) for layer, source in pairs]
        pending = set(store.pending([u.key for u in units]))
        return [u for u in units if u.key in pending]

    def run(self, store: AtlasStore, unit: Unit, res: Resources) -> dict[str, Any]:
        vf = virtual_filter(
            res.model(),
            str(unit.layer),
            str(unit.args["source"]),
        )
        write_virtual(store, vf)
        return {"layer": unit.layer, "source": vf.source, "shape": list(vf.weight.shape)}

    def _array(self, atlas: Atlas, layer: str, name: str) -> zarr.Array[Any] | None:
        node = atlas.store.root.get(f"layers/{layer}/{name}")
        return node if isinstance(node, zarr.Array) else None

    def _layers(self, atlas: Atlas) -> list[str]:
        keys = atlas.store.done_keys("virtual")
        return sorted(k.removeprefix("virtual/") for k in keys)

    def report_index(self, atlas: Atlas, assets: Assets) -> Section | None:
        """Fig. 3 of the paper: per layer, the virtual filters of its first channels."""
        parts = []
        for layer in self._layers(atlas):
            node = self._array(atlas, layer, "virtual_filter")
            if node is None:
                continue
            images = "".join(
                f'<img src="{src}" alt="{layer} channel {c}" title="channel {c}">'
                for c in range(min(16, int(node.shape[0])))
                if (src := self._filter_image(atlas, layer, c, assets))
            )
            parts.append(f"<h3>{layer} (through {node.attrs.get('source')})</h3><p>{images}</p>")
        return Section("Virtual filters (paper Fig. 3)", "".join(parts)) if parts else None

    def _filter_image(self, atlas: Atlas, layer: str, channel: int, assets: Assets) -> str | None:
        """An RGB virtual filter as an image, scaled symmetrically around grey (None if not RGB)."""
        node = self._array(atlas, layer, "virtual_filter")
        w = np.asarray(node[channel], dtype=np.float64) if node is not None else np.zeros(0)
        if w.ndim != 3 or w.shape[0] != 3:
            return None
        scale = max(float(np.abs(w).max()), 1e-12)
        return assets.image(f"{layer}/c{channel:04d}-virtual", 127.5 + 127.5 * w / scale)

    def report_channel(self, atlas: Atlas, layer: str, channel: int, assets: Assets) -> Section | None:
        node, weights = (
            self._array(atlas, layer, "virtual_filter"),
            self._array(atlas, layer, "virtual_coupling"),
        )
        if node is None or weights is None:
            return None
        coupling = np.asarray(weights[channel])
        source = str(node.attrs.get("source"))
        src = self._filter_image(atlas, layer, channel, assets)
        html = f'<img src="{src}" alt="virtual filter">' if src else ""

        def draw(ax: Any) -> None:
            ax.bar(range(len(coupling)), coupling, color="#4a7")
            ax.set_xlabel(f"{source} channel, sorted")
            ax.set_ylabel("coupling weight")

        html += f'<img src="{assets.figure(f"{layer}/c{channel:04d}-coupling", draw)}" alt="sorted coupling weights">'
        return Section(f"Virtual filter through {source}", html)
