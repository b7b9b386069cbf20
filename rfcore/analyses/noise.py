"""The noise-injection test (Kobayashi & Shouno 2020, §3.5, Table 1) as a registered analysis: one
unit per (condition, shard) at one layer; the summary (ΔL with bootstrap CIs) in `noise/<layer>` attrs.
The science (noise, conditions, evaluation, statistics) is `rfcore.noise`."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import zarr
from numpy.typing import NDArray

from rfcore.analyses.inactive import check_threshold
from rfcore.analysis import Analysis, Assets, Resources, Section, Unit, atlas_layers, check, register
from rfcore.atlas import Atlas
from rfcore.data import iter_batches, shard_ranges
from rfcore.errors import StoreError
from rfcore.inactive import detect_inactive, read_inactive, write_inactive
from rfcore.models import model_meta
from rfcore.noise import (
    CONDITIONS,
    NEAR_INACTIVE_FRACTION,
    block_ids,
    check_conditions,
    compare_table,
    evaluate,
    jsonable,
    layer_group,
    near_inactive,
    summarize,
)
from rfcore.schema import ArraySpec
from rfcore.store import AtlasStore, redact

NOISE_FIELDS: tuple[str, ...] = ("loss", "correct1", "correct5")
_NOISE_DOCS = {
    "loss": (
        "float32",
        math.nan,
        "cross-entropy per image under the noise condition; NaN = skipped / not run",
    ),
    "correct1": ("bool", False, "top-1 correct per image under the noise condition"),
    "correct5": ("bool", False, "top-5 correct per image under the noise condition"),
}
NOISE_ARRAYS = {
    f: ArraySpec(
        f"noise/{{layer}}/{{condition}}/{f}", ("image",), dtype, fill, doc, scope="root", analysis="noise"
    )
    for f, (dtype, fill, doc) in _NOISE_DOCS.items()
}


NEAR = "near-"  # prefix of the conditions run on the near-inactive channels (own arrays, own Table 1 row)


def shard_key(layer: str, condition: str, shard: int) -> str:
    """Completion marker of one (shard × condition) evaluation."""
    return f"noise/{layer}/{condition}/shard-{shard:04d}"


@dataclass(frozen=True)
class NoiseOptions:
    layer: str = field(default="default", metadata={"help": "layer (default: the model's first max-pool)"})
    conditions: tuple[str, ...] = field(default=CONDITIONS, metadata={"help": "comma list of conditions"})
    sigma: float = field(default=1.0, metadata={"help": "noise scale: eps = max(x, 0), x ~ N(0, sigma^2)"})
    seed: int = field(default=0, metadata={"help": "seed of the noise and of the channel draws"})
    threshold: float = field(default=0.0, metadata={"help": "inactive when the max activation <= this"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples of the CIs"})
    near_inactive: float = field(
        default=NEAR_INACTIVE_FRACTION,
        metadata={
            "help": "when no channel is inactive, also test the lowest this fraction of channel maxima "
            "(own Table 1 row); 0: off"
        },
    )

    def __post_init__(self) -> None:
        check_conditions(self.conditions)
        check("," not in self.layer and self.layer != "all", "noise runs at one layer at a time")
        check(self.sigma >= 0, f"sigma must be >= 0, got {self.sigma}")
        check(self.n_boot >= 1, f"n_boot must be >= 1, got {self.n_boot}")
        check(0 <= self.near_inactive <= 1, f"near_inactive must be in [0, 1], got {self.near_inactive}")


def _arrays(store: AtlasStore, layer: str, condition: str) -> dict[str, zarr.Array[Any]]:
    n, shard_size = int(store.run["num_images"]), int(store.run["config"]["shard_size"])
    return {
        f: store.require_array(NOISE_ARRAYS[f], (n,), (shard_size,), layer=layer, condition=condition)
        for f in NOISE_FIELDS
    }


def _inactive_mask(store: AtlasStore, layer: str, threshold: float) -> tuple[NDArray[np.bool_], bool]:
    """The inactive mask at `threshold` and whether it must still be written (not detected yet);
    ConfigMismatchError when it was detected at another threshold."""
    if check_threshold(store, layer, threshold):
        return read_inactive(store, layer)[0], False
    group = Atlas(store).layer(layer).group
    if "max" not in group:
        raise StoreError(f"layer {layer} of {redact(store.url)} has no sweep statistics yet; sweep it first")
    return detect_inactive(Atlas(store).layer(layer).array("max"), threshold), True


@register
class Noise(Analysis):
    name = "noise"
    description = "validation loss with noise injected into inactive channels vs controls (paper Table 1)"
    arrays = (*NOISE_ARRAYS.values(),)
    Options: ClassVar[type[Any]] = NoiseOptions
    uses_model = True
    uses_data = True
    uses_labels = True  # cross-entropy and top-k accuracy against the labels
    order = 20

    def _layer(self, store: AtlasStore, opts: NoiseOptions) -> str:
        return atlas_layers(store, opts.layer)[0]

    def plan(self, store: AtlasStore, opts: NoiseOptions) -> list[Unit]:
        layer = self._layer(store, opts)
        mask, write = _inactive_mask(store, layer, opts.threshold)
        config: dict[str, Any] = {
            "sigma": float(opts.sigma),
            "seed": int(opts.seed),
            "threshold": float(opts.threshold),
            "block_size": int(store.run["config"]["batch_size"]),
            "blocks": "permutation",  # rfcore.noise.block_ids: blocks mix classes; CIs resample blocks
            "inactive": np.flatnonzero(mask).tolist(),
            "near_inactive": None,
        }
        conds = list(check_conditions(opts.conditions))
        if not mask.any() and opts.near_inactive > 0:
            maxima = Atlas(store).layer(layer).array("max")
            near = near_inactive(maxima, opts.near_inactive)
            config["near_inactive"] = {
                "fraction": float(opts.near_inactive),
                "channels": np.flatnonzero(near).tolist(),
                "max": float(maxima[near].max()),
            }
            conds += [NEAR + c for c in conds if c != "baseline"]
        store.require_group(f"noise/{layer}", config=config)  # refuses other options before any write
        if write:
            write_inactive(store, layer, opts.threshold)
        units = []
        for cond in conds:
            _arrays(store, layer, cond)
            units += [
                Unit(shard_key(layer, cond, s), layer, {"condition": cond, "shard": s})
                for s in range(store.num_shards)
            ]
        pending = set(store.pending([u.key for u in units]))
        return [u for u in units if u.key in pending]

    def run(self, store: AtlasStore, unit: Unit, res: Resources) -> dict[str, Any]:
        """Evaluate one shard under one condition with the config `plan` recorded; write its rows."""
        layer, condition, shard = str(unit.layer), str(unit.args["condition"]), int(unit.args["shard"])
        config: dict[str, Any] = dict(dict(layer_group(store, layer).attrs)["config"])  # type: ignore[arg-type]
        inactive, _ = read_inactive(store, layer)
        if condition.startswith(NEAR):  # the same test on the near-inactive channels
            condition = condition[len(NEAR) :]
            inactive = np.zeros(len(inactive), np.bool_)
            inactive[config["near_inactive"]["channels"]] = True
        cfg = store.run["config"]
        indices = shard_ranges(int(store.run["num_images"]), int(cfg["shard_size"]))[shard]
        model, device = res.model(), res.device
        result = evaluate(
            model,
            layer,
            iter_batches(res.dataset(), indices, int(cfg["batch_size"]), pin_memory=device.type == "cuda"),
            condition=condition,
            inactive=inactive,
            normalize=model_meta(model).preprocessing.normalize,
            block_size=int(config["block_size"]),
            sigma=float(config["sigma"]),
            seed=int(config["seed"]),
            device=device,
            num_images=int(store.run["num_images"]) if config.get("blocks") == "permutation" else None,
        )
        local = result.indices - indices.start
        values: dict[str, NDArray[Any]] = {
            "loss": np.full(len(indices), np.nan, np.float32),
            "correct1": np.zeros(len(indices), bool),
            "correct5": np.zeros(len(indices), bool),
        }
        values["loss"][local], values["correct1"][local], values["correct5"][local] = (
            result.loss,
            result.correct1,
            result.correct5,
        )
        for name, arr in _arrays(store, layer, str(unit.args["condition"])).items():
            arr[indices.start : indices.stop] = values[name]
        return {
            "layer": layer,
            "condition": str(unit.args["condition"]),
            "shard": shard,
            "images": len(result.loss),
            "loss_sum": math.fsum(result.loss.astype(np.float64).tolist()),
        }

    def finish(self, store: AtlasStore, opts: NoiseOptions) -> dict[str, Any]:
        """Every complete condition of `noise/<layer>` summarized into its `summary` attr."""
        layer = self._layer(store, opts)
        group = layer_group(store, layer)
        loss: dict[str, NDArray[np.float32]] = {}
        c1: dict[str, NDArray[np.bool_]] = {}
        c5: dict[str, NDArray[np.bool_]] = {}
        for cond in [*CONDITIONS, *(NEAR + c for c in CONDITIONS[1:])]:
            done = store.done_keys(f"noise/{layer}/{cond}")
            if not done:
                continue
            if len(done) < store.num_shards:
                raise StoreError(
                    f"noise/{layer}/{cond} in {redact(store.url)} has {len(done)}/{store.num_shards} shards done"
                )
            arrs = _arrays(store, layer, cond)
            loss[cond], c1[cond], c5[cond] = (np.asarray(arrs[f][...]) for f in NOISE_FIELDS)
        config: dict[str, Any] = dict(dict(group.attrs)["config"])  # type: ignore[arg-type]
        n, size = int(store.run["num_images"]), int(config["block_size"])
        blocks = (
            block_ids(n, size, seed=int(config["seed"]))
            if config.get("blocks") == "permutation"
            else np.arange(n, dtype=np.int64) // size
        )
        paper = [c for c in loss if not c.startswith(NEAR)]
        near_conds = {c[len(NEAR) :]: c for c in loss if c.startswith(NEAR)}
        near = None
        if config.get("near_inactive") and near_conds:
            pick = {"baseline": "baseline", **near_conds} if "baseline" in loss else near_conds
            near = {
                **config["near_inactive"],
                "conditions": summarize(
                    {c: loss[k] for c, k in pick.items()},
                    {c: c1[k] for c, k in pick.items()},
                    {c: c5[k] for c, k in pick.items()},
                    n_boot=opts.n_boot,
                    seed=opts.seed,
                    blocks=blocks,
                ),
            }
        summary = {
            "model": store.run["model"],
            "weights": store.run.get("weights"),
            "layer": layer,
            "num_inactive": len(config["inactive"]),
            **config,
            "n_boot": opts.n_boot,
            "ci_level": 0.95,
            "conditions": summarize(
                {c: loss[c] for c in paper},
                {c: c1[c] for c in paper},
                {c: c5[c] for c in paper},
                n_boot=opts.n_boot,
                seed=opts.seed,
                blocks=blocks,
            ),
            "near": near,
        }
        clean: dict[str, Any] = jsonable(summary)
        group.attrs["summary"] = clean
        return clean

    def _summaries(self, atlas: Atlas) -> list[dict[str, Any]]:
        noise = atlas.store.root.get("noise")
        if not isinstance(noise, zarr.Group):
            return []
        out: list[dict[str, Any]] = []
        for la in sorted(noise.group_keys()):
            summary = dict(layer_group(atlas.store, la).attrs).get("summary")
            if isinstance(summary, dict):
                out.append(summary)
        return out

    def verify(self, store: AtlasStore) -> list[str]:
        problems = []
        noise = store.root.get("noise")
        for layer in sorted(noise.group_keys()) if isinstance(noise, zarr.Group) else []:
            for cond in [*CONDITIONS, *(NEAR + c for c in CONDITIONS[1:])]:
                done = store.done_keys(f"noise/{layer}/{cond}")
                if done and len(done) < store.num_shards:
                    problems.append(f"noise/{layer}/{cond}: {len(done)}/{store.num_shards} shards done")
            if "summary" not in dict(layer_group(store, layer).attrs):
                problems.append(f"noise/{layer}: no summary (the analysis did not finish; rerun it)")
        return problems

    def findings(self, atlas: Atlas) -> list[str]:
        lines = []
        for s in self._summaries(atlas):
            if s["num_inactive"] == 0:
                lines.append(f"noise at {s['layer']}: no inactive channel to inject into")
                near = s.get("near")
                if near:
                    parts = []
                    for cond in ("all", "random-one", "control"):
                        e = near["conditions"].get(cond)
                        if e and e.get("delta_loss") is not None:
                            lo, hi = e["delta_loss_ci"]
                            parts.append(f"ΔL {cond} {e['delta_loss']:+.2e} [{lo:+.1e}, {hi:+.1e}]")
                    lines.append(
                        f"noise at {s['layer']}, near-inactive (lowest {100 * near['fraction']:g}% of maxima, "
                        f"{len(near['channels'])} channels): " + "; ".join(parts)
                    )
                continue
            parts = []
            for cond in ("all", "random-one", "control"):
                e = s["conditions"].get(cond)
                if e and e.get("delta_loss") is not None:
                    lo, hi = e["delta_loss_ci"]
                    parts.append(f"ΔL {cond} {e['delta_loss']:+.2e} [{lo:+.1e}, {hi:+.1e}]")
            lines.append(f"noise at {s['layer']} ({s['num_inactive']} inactive): " + "; ".join(parts))
        return lines

    def report_index(self, atlas: Atlas, assets: Assets) -> Section | None:
        if not self._summaries(atlas):
            return None
        rows = [r for r in compare_table([atlas.url]).strip().splitlines() if not r.startswith("|---")]
        cells = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in rows]
        head = "".join(f"<th>{c}</th>" for c in cells[0])
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
        return Section(
            "Inactive channels and noise injection (Kobayashi & Shouno 2020, Table 1)",
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
        )
