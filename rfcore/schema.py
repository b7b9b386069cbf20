"""The atlas layout: the single source of truth for every array, its dims, dtype and fill value.

An analysis declares its own arrays (`Analysis.arrays` in `rfcore/analyses/`); `all_arrays()` collects
them, and `python -m rfcore.schema` regenerates the table in `docs/atlas-schema.md`.
"""

from __future__ import annotations

import json
import math
import os
import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 2  # 2: post-ReLU conv responses, per-pixel-count mean stimuli, eq. 4–5 arrays

#: Run identity: these keys must match when a store is reopened (resume).
IDENTITY_KEYS = (
    "model",
    "weights",
    "weights_digest",  # a checkpoint's bytes: the same URL with new contents is another run
    "weights_version",  # torchvision weights resolved (DEFAULT -> IMAGENET1K_V2:<file>)
    "dataset",
    "data_fingerprint",  # the data's content (file list with sizes/mtimes or ETags, ingest digest)
    "num_images",
    "image_size",
    "k",
    "patch_max",
    "shard_size",
    "batch_size",
    "layers",
    "seed",  # builds the weights of a model without `weights` (None in the identity otherwise)
    "precision",  # rfcore.precision mode of the sweep's forward passes ('auto': bf16 on CUDA, fp32 on CPU)
)
_RUN_KEYS = (
    "model",
    "weights",
    "weights_digest",
    "weights_version",
    "dataset",
    "data_fingerprint",
    "num_images",
    "image_size",
)


@dataclass(frozen=True)
class ArraySpec:
    """One array of the atlas.

    `path` is relative to the layer group `layers/<layer>` (scope "layer") or to the root (scope
    "root") and may hold `{placeholder}`s; for root-scoped specs `{layer}` is filled with the layer.
    """

    path: str
    dims: tuple[str, ...]
    dtype: str
    fill_value: float | int | bool | str | None
    doc: str
    scope: str = "layer"
    analysis: str = "sweep"

    @property
    def placeholders(self) -> tuple[str, ...]:
        """Names of the `{...}` placeholders in `path`, in order."""
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.path) if f)

    def resolve(self, **placeholders: str) -> str:
        """The concrete path with every placeholder filled; KeyError names a missing one."""
        missing = [p for p in self.placeholders if p not in placeholders]
        if missing:
            raise KeyError(f"array {self.path!r} needs placeholder(s) {', '.join(missing)}")
        extra = sorted(set(placeholders) - set(self.placeholders))
        if extra:
            raise KeyError(f"array {self.path!r} has no placeholder(s) {', '.join(extra)}")
        return self.path.format(**placeholders)

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The shape given the size of every dimension."""
        return tuple(sizes[d] for d in self.dims)


@dataclass(frozen=True)
class RunAttrs:
    """Root `run` attrs: what was analyzed and how. `config` holds k, patch_max, shard_size,
    batch_size, layers (list of names), seed and precision (`rfcore.precision` mode)."""

    model: str
    weights: str | None
    dataset: str
    num_images: int
    image_size: int
    preprocessing: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    weights_digest: str | None = None  # sha256 (16 hex digits) of a checkpoint file's bytes
    weights_version: str | None = None  # torchvision weights as resolved (member:file)
    data_fingerprint: str | None = None  # `ImageDataset.fingerprint` of the data swept
    num_classes: int | None = None  # the model's classes (labels are checked against them)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        out: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunAttrs:
        """Inverse of `to_dict`; unknown keys are ignored."""
        return cls(
            model=d["model"],
            weights=d.get("weights"),
            dataset=d["dataset"],
            num_images=int(d["num_images"]),
            image_size=int(d["image_size"]),
            preprocessing=dict(d.get("preprocessing") or {}),
            config=dict(d.get("config") or {}),
            weights_digest=d.get("weights_digest"),
            weights_version=d.get("weights_version"),
            data_fingerprint=d.get("data_fingerprint"),
            num_classes=None if d.get("num_classes") is None else int(d["num_classes"]),
        )

    def identity(self) -> dict[str, Any]:
        """The keys that must match when a store is reopened (JSON-normalized)."""
        d = self.to_dict()
        ident = {k: d[k] for k in _RUN_KEYS}
        ident.update({k: d["config"].get(k) for k in IDENTITY_KEYS if k not in _RUN_KEYS})
        if d["weights"] is not None:
            ident["seed"] = None  # loaded weights: the seed changes nothing that the store holds
        return ident


@dataclass(frozen=True)
class LayerAttrs:
    """Attrs of `layers/<name>`: rf = {size, stride, offset} (each (h, w) / (y, x)),
    patch = {factor, size, first} (patch side = size cells of factor² pixels; first = input pixel
    (y, x) of unit (0, 0)'s patch corner); response = {module, relu, tensor}: the tensor captured
    as the layer's activation (a conv's post-BN-ReLU response, `rfcore.layers.response_map`)."""

    kind: str
    channels: int
    shape: tuple[int, int]
    rf: dict[str, Any]
    patch: dict[str, Any]
    response: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        out: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerAttrs:
        """Inverse of `to_dict`; extra keys (e.g. `complete`) are ignored."""
        shape = tuple(int(s) for s in d["shape"])
        if len(shape) != 2:
            raise ValueError(f"layer shape must be (H, W), got {shape}")
        return cls(
            kind=d["kind"],
            channels=int(d["channels"]),
            shape=(shape[0], shape[1]),
            rf=dict(d["rf"]),
            patch=dict(d["patch"]),
            response=dict(d["response"]) if d.get("response") is not None else None,
        )


def sweep_shard_key(index: int) -> str:
    """Completion-marker key of sweep shard `index` (`AtlasStore.mark_done`)."""
    return f"sweep/shard-{index:04d}"


_NAN = math.nan

# --- Sweep results (per layer) -------------------------------------------------------------------
SWEEP_ARRAYS: list[ArraySpec] = [
    ArraySpec(
        "activation",
        ("image", "channel"),
        "float32",
        _NAN,
        "max activation of each channel over positions per image; NaN = skipped image",
    ),
    ArraySpec("topk/value", ("channel", "k"), "float32", _NAN, "top-k activations, descending"),
    ArraySpec("topk/image", ("channel", "k"), "int64", -1, "dataset index of each top-k hit; -1 = none"),
    ArraySpec("topk/y", ("channel", "k"), "int32", -1, "feature-map row of each top-k hit"),
    ArraySpec("topk/x", ("channel", "k"), "int32", -1, "feature-map column of each top-k hit"),
    ArraySpec(
        "topk/patch",
        ("channel", "k", "color", "py", "px"),
        "uint8",
        0,
        "input patch under the receptive field of each top-k hit (uint8 pixels)",
    ),
    ArraySpec(
        "mean_stimulus",
        ("channel", "color", "py", "px"),
        "float32",
        _NAN,
        "strongest-position mean stimulus (not eq. 4): mean patch at each image's spatial argmax, over "
        "images whose spatial max is > 0; per-pixel counts (RF pixels outside the image not averaged "
        "in; NaN where none); uint8 pixel units",
    ),
    ArraySpec(
        "positive_count",
        ("channel",),
        "int64",
        0,
        "number of images whose spatial max is > 0 (the images of `mean_stimulus`)",
    ),
    ArraySpec(
        "mean_stimulus_centre",
        ("channel", "color", "py", "px"),
        "float32",
        _NAN,
        "eq. 4–5 mean preferred stimulus: mean of x[r_i] over X+ for the fixed neuron i at the map "
        "centre (H//2, W//2); per-pixel counts as `mean_stimulus`; uint8 pixel units",
    ),
    ArraySpec(
        "positive_count_centre",
        ("channel",),
        "int64",
        0,
        "size of X+ (eq. 5): images where the centre neuron's activation is > 0",
    ),
    ArraySpec("max", ("channel",), "float32", _NAN, "max activation over all images and positions"),
    ArraySpec("mean", ("channel",), "float32", _NAN, "mean activation over all images and positions"),
    ArraySpec(
        "zero_fraction",
        ("channel",),
        "float32",
        _NAN,
        "fraction of activations == 0 over all images and positions",
    ),
]

# --- Per-image metadata written by the sweep (root scope; each shard writes its rows) -------------
IMAGE_ARRAYS: list[ArraySpec] = [
    ArraySpec(
        "images/label",
        ("image",),
        "int64",
        -1,
        "class index of each image (root attr `classes` names them); -1 = unlabelled or skipped",
        scope="root",
    ),
    ArraySpec(
        "images/path",
        ("image",),
        "T",
        "",
        "file (or `split[index]`) of each image (variable-length UTF-8)",
        scope="root",
    ),
]

# --- Coordinates of the layer groups, so `xarray.open_zarr(url, group="layers/<layer>")` labels its
# dims (an array named like its dim is xarray's index; `label`, `class_name`, `path` are listed in
# the `coordinates` attr of `activation`). Written when the layer completes.
COORD_ARRAYS: list[ArraySpec] = [
    ArraySpec("image", ("image",), "int64", -1, "coordinate: dataset index of each image"),
    ArraySpec("channel", ("channel",), "int64", -1, "coordinate: channel index"),
    ArraySpec(
        "label", ("image",), "int64", -1, "coordinate: class index of each image (copy of `images/label`)"
    ),
    ArraySpec(
        "class_name", ("image",), "T", "", "coordinate: class name of each image (root attr `classes`)"
    ),
    ArraySpec("path", ("image",), "T", "", "coordinate: file of each image (copy of `images/path`)"),
    ArraySpec("topk/channel", ("channel",), "int64", -1, "coordinate: channel index"),
    ArraySpec("topk/k", ("k",), "int64", -1, "coordinate: rank of each top-k hit (0 = best)"),
]

# --- Sweep reducer state (per layer; removed once the layer is merged) ------------------------------
PARTIAL_ARRAYS: list[ArraySpec] = [
    ArraySpec(
        "partial/state",
        ("shard", "word"),
        "int64",
        0,
        "merged reducer state of the group of shards starting at this row (`rfcore.sweep.pack_state`)",
    ),
]

# filters of the swept conv layers (written when the atlas is prepared): the first-layer filters of
# Fig. 5a / 7a and the W¹ of Fig. 3b, drawn by `rfcore.panels`
FILTER_ARRAYS: list[ArraySpec] = [
    ArraySpec(
        "layers/{layer}/weight",
        ("channel", "in_channel", "ky", "kx"),
        "float32",
        _NAN,
        "conv layers only: the layer's filters (float32, as trained)",
        scope="root",
        analysis="sweep",
    ),
]

_LISTS = [SWEEP_ARRAYS, COORD_ARRAYS, IMAGE_ARRAYS, PARTIAL_ARRAYS, FILTER_ARRAYS]
ARRAYS: dict[str, ArraySpec] = {s.path: s for specs in _LISTS for s in specs}
if len(ARRAYS) != sum(map(len, _LISTS)):
    raise RuntimeError("duplicate ArraySpec path in rfcore.schema")


def spec(path: str) -> ArraySpec:
    """The sweep spec registered under `path` (the unresolved path, placeholders included)."""
    try:
        return ARRAYS[path]
    except KeyError:
        raise KeyError(f"no array {path!r} in the atlas schema") from None


def all_arrays() -> list[ArraySpec]:
    """The sweep's arrays, then every registered analysis's (`rfcore.analysis`), in run order."""
    from rfcore.analysis import analysis_arrays

    specs = [*ARRAYS.values(), *analysis_arrays()]
    paths = [(s.scope, s.path) for s in specs]
    if len(set(paths)) != len(paths):
        raise RuntimeError("two analyses declare the same array path")
    return specs


def _fill_text(value: object) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return "–" if value is None else str(value)


_DOC_BEGIN = "<!-- generated by rfcore.schema.schema_markdown()"
_DOC_END = "<!-- end of generated table -->"


def schema_markdown() -> str:
    """Markdown table of every array (what `docs/atlas-schema.md` embeds)."""
    lines = [
        f"{_DOC_BEGIN}; schema version {SCHEMA_VERSION}; refresh: python -m rfcore.schema -->",
        "| scope | path | dims | dtype | fill | analysis | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in all_arrays():
        where = "`layers/<layer>/`" if s.scope == "layer" else "`/`"
        dims = "(" + ", ".join(s.dims) + (",)" if len(s.dims) == 1 else ")")
        lines.append(
            f"| {where} | `{s.path}` | {dims} | {s.dtype} | {_fill_text(s.fill_value)} | {s.analysis} | {s.doc} |"
        )
    return "\n".join([*lines, _DOC_END]) + "\n"


def update_schema_doc(path: str) -> None:
    """Replace the generated table in the markdown file `path` with `schema_markdown()`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.find(_DOC_BEGIN), text.find(_DOC_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no generated schema table to replace")
    text = text[:start] + schema_markdown() + text[end + len(_DOC_END) + 1 :]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    update_schema_doc(os.path.join(os.path.dirname(__file__), os.pardir, "docs", "atlas-schema.md"))
