"""The read API of an atlas: `open_atlas(url)` -> `Atlas` -> `AtlasLayer` (arrays, top-k, mean
stimuli, xarray views), and what `rfatlas ls` / `rfatlas verify` print. Writes go through
`rfcore.store.AtlasStore`; this module only reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from rfcore.errors import StoreError
from rfcore.schema import SCHEMA_VERSION, SWEEP_ARRAYS, sweep_shard_key
from rfcore.store import AtlasStore, attrs_of
from rfcore.urls import redact

if TYPE_CHECKING:
    import xarray as xr


@dataclass(frozen=True)
class TopK:
    """Top-k hits of one channel, best first (-1 / NaN where fewer than k hits)."""

    value: np.ndarray
    image: np.ndarray
    y: np.ndarray
    x: np.ndarray
    patch: np.ndarray


class AtlasLayer:
    """Read access to `layers/<name>`."""

    def __init__(self, store: AtlasStore, name: str) -> None:
        self.name = name
        self._store = store
        self.group = store.layer_group(name)

    @property
    def attrs(self) -> dict[str, Any]:
        """Layer attrs: kind, channels, shape, rf, patch, complete."""
        return attrs_of(self.group)

    @property
    def rf(self) -> dict[str, Any]:
        """Receptive field {size, stride, offset}."""
        return dict(attrs_of(self.group)["rf"])

    def array(self, path: str, **placeholders: str) -> np.ndarray:
        """The whole array at `path` (relative to the layer; placeholders filled) as numpy."""
        full = path.format(**placeholders) if placeholders else path
        try:
            node = self.group[full]
        except KeyError:
            raise StoreError(f"layer {self.name} of {redact(self._store.url)} has no array {full}") from None
        if not isinstance(node, zarr.Array):
            raise StoreError(f"{full} in layer {self.name} is a group, not an array")
        return np.asarray(node[...])

    def _row(self, path: str, channel: int) -> np.ndarray:
        node = self.group.get(path)
        if not isinstance(node, zarr.Array):
            raise StoreError(
                f"layer {self.name} has no {path} yet (the run that writes it has not finished; "
                "`rfatlas verify` tells what is missing)"
            )
        if not 0 <= channel < node.shape[0]:
            raise StoreError(f"layer {self.name} has channels 0..{node.shape[0] - 1}, not {channel}")
        return np.asarray(node[channel])

    def topk(self, channel: int) -> TopK:
        """Top-k activations of `channel` with their images, positions and patches."""
        return TopK(*(self._row(f"topk/{f}", channel) for f in ("value", "image", "y", "x", "patch")))

    def mean_stimulus(self, channel: int) -> np.ndarray:
        """Mean stimulus (color, py, px) of `channel`, uint8 pixel units."""
        return self._row("mean_stimulus", channel)

    def stats(self) -> dict[str, np.ndarray]:
        """Per-channel summaries: max, mean, zero_fraction, positive_count."""
        return {p: self.array(p) for p in ("max", "mean", "zero_fraction", "positive_count")}

    def dim_sizes(self) -> dict[str, int]:
        """Size of each sweep dimension (image, channel, k, color, py, px, shard) in this layer."""
        run, attrs = self._store.run, self.attrs
        return {
            "image": int(run["num_images"]),
            "channel": int(attrs["channels"]),
            "k": int(run["config"]["k"]),
            "color": 3,
            "py": int(attrs["patch"]["size"]),
            "px": int(attrs["patch"]["size"]),
            "shard": self._store.num_shards,
        }

    def to_xarray(self) -> xr.Dataset:
        """Every array of the layer as a lazy Dataset; variables are named by path (e.g. "topk/value").

        A dim whose size clashes with the sweep's (`dim_sizes`, e.g. an analysis's `channel` subset)
        is renamed `<group>/<dim>` (`<array>/<dim>` for arrays directly in the layer group).

        Coordinates: `image` (dataset index) with `label`, `class_name` and `path` along it when the
        store records them (`images/label`, `images/path`, root attr `classes`), `channel` and `k`;
        so `ds["activation"].groupby("label").mean()` gives each class's mean per channel.
        """
        import xarray as xr

        base = f"layers/{self.name}"
        parents = {""} | {p.rpartition("/")[0] for p, n in self.group.members(max_depth=None)}
        sizes = self.dim_sizes()
        variables: dict[str, Any] = {}
        for parent in sorted(parents, key=lambda p: (p not in ("", "topk"), p)):
            group = f"{base}/{parent}" if parent else base
            ds = xr.open_zarr(self._store._store, group=group, consolidated=False, chunks=None)
            for var_name, var in ds.data_vars.items():
                name = f"{parent}/{var_name}" if parent else str(var_name)
                scope = parent or name
                clash = {d: f"{scope}/{d}" for d, n in var.sizes.items() if sizes.setdefault(str(d), n) != n}
                variables[name] = (var.rename(clash) if clash else var).variable
        ds = xr.Dataset(variables, attrs=self.attrs)
        return ds.assign_coords(self._coords(set(map(str, ds.dims))))

    def _coords(self, dims: set[str]) -> dict[str, Any]:
        """Coordinates of the sweep dims among `dims` (see `to_xarray`)."""
        sizes = self.dim_sizes()
        coords: dict[str, Any] = {d: np.arange(sizes[d]) for d in ("image", "channel", "k") if d in dims}
        if "image" not in dims:
            return coords
        per_image = image_coords(self._store.root, sizes["image"])
        coords.update({name: ("image", values) for name, values in per_image.items()})
        return coords


def image_coords(root: zarr.Group, n: int) -> dict[str, np.ndarray]:
    """Per-image coordinates of an atlas of `n` images: `label` and `path` (root `images/` arrays)
    and `class_name` when the root attr `classes` names the classes; those the store lacks are left
    out. The layer groups' coordinate arrays (`rfcore.pipeline.write_coords`) and
    `AtlasLayer.to_xarray` both come from here."""
    out: dict[str, np.ndarray] = {}
    label, path = root.get("images/label"), root.get("images/path")
    if isinstance(label, zarr.Array) and label.shape == (n,):
        out["label"] = np.asarray(label[...]).astype(np.int64)
        classes = attrs_of(root).get("classes")
        if isinstance(classes, list) and classes:
            names = [str(classes[i]) if 0 <= i < len(classes) else "" for i in out["label"].tolist()]
            out["class_name"] = np.array(names, dtype=object)
    if isinstance(path, zarr.Array) and path.shape == (n,):
        out["path"] = np.array([str(p) for p in np.asarray(path[...]).tolist()], dtype=object)
    return out


class Atlas:
    """Read-only view of an atlas."""

    def __init__(self, store: AtlasStore) -> None:
        self.store = store
        self.url = store.url
        self.run = store.run

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Skipped images [{index, path, reason}], sorted by index."""
        return list(attrs_of(zarr.open_group(self.store._store, mode="r", zarr_format=3)).get("skipped", []))

    @property
    def classes(self) -> list[str]:
        """Class names of the swept dataset (root attr `classes`; empty when unlabelled)."""
        root = zarr.open_group(self.store._store, mode="r", zarr_format=3)
        return [str(c) for c in attrs_of(root).get("classes", [])]

    def labels(self) -> np.ndarray:
        """Class index of every image (int64, -1 = unlabelled or skipped); StoreError if the sweep
        that made this atlas did not record labels."""
        return self._image_array("images/label").astype(np.int64)

    def paths(self) -> np.ndarray:
        """File name (or `split[index]`) of every image, as str objects."""
        return self._image_array("images/path").astype(object)

    def _image_array(self, path: str) -> np.ndarray:
        node = self.store.root.get(path)
        if not isinstance(node, zarr.Array):
            raise StoreError(f"atlas {redact(self.url)} has no {path}; sweep it again with this rfatlas")
        return np.asarray(node[...])

    @property
    def layers(self) -> list[str]:
        """Layer names in the stored order."""
        return self.store.layer_names

    def layer(self, name: str) -> AtlasLayer:
        """One layer; UnknownLayerError (a StoreError too) with a suggestion if absent."""
        return AtlasLayer(self.store, name)


def open_atlas(url: str, *, storage_options: Mapping[str, Any] | None = None) -> Atlas:
    """Open an atlas for reading; StoreError if absent, not an atlas, or of another schema version."""
    return Atlas(AtlasStore.open(url, "r", storage_options=storage_options))


def describe_store(url: str, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """Human summary of an atlas (what `rfatlas ls` prints)."""
    atlas = open_atlas(url, storage_options=storage_options)
    run, cfg = atlas.run, atlas.run["config"]
    n_shards = atlas.store.num_shards
    done = n_shards - len(atlas.store.pending_shards())
    lines = [
        f"atlas {redact(url)} (schema {SCHEMA_VERSION})",
        f"model {run['model']} (weights {run.get('weights')}) on {run['dataset']}: "
        f"{run['num_images']} images at {run['image_size']} px, k {cfg.get('k')}, "
        f"shard size {cfg.get('shard_size')}, sweep shards done {done}/{n_shards}, "
        f"{len(atlas.skipped)} skipped images",
    ]
    width = max([5, *(len(n) for n in atlas.layers)])
    lines.append(
        f"{'layer':<{width}} {'kind':<6} {'channels':>8} {'shape':>9} {'rf':>8} {'stride':>6}  complete"
    )
    for name in atlas.layers:
        a = atlas.layer(name).attrs
        shape = "x".join(str(s) for s in a["shape"])
        rf = "x".join(str(s) for s in a["rf"]["size"])
        stride = "x".join(str(s) for s in a["rf"]["stride"])
        lines.append(
            f"{name:<{width}} {a['kind']:<6} {a['channels']:>8} {shape:>9} {rf:>8} {stride:>6}  "
            f"{'yes' if a.get('complete') else 'no'}"
        )
    from rfcore.analysis import list_analyses

    ran = [(name, len(atlas.store.done_keys(name))) for name in list_analyses()]
    lines.append("analyses: " + (", ".join(f"{n} ({k} unit(s) done)" for n, k in ran if k) or "none run"))
    return "\n".join(lines)


def verify_store(url: str, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Problems of an atlas (empty = valid): schema, completeness, arrays, sweep shards."""
    try:
        atlas = open_atlas(url, storage_options=storage_options)
    except StoreError as exc:
        return [str(exc)]
    problems = []
    missing = [sweep_shard_key(i) for i in atlas.store.pending_shards()]
    if missing:
        more = ", ..." if len(missing) > 5 else ""
        problems.append(f"{len(missing)} sweep shard(s) not done: {', '.join(missing[:5])}{more}")
    for name in atlas.layers:
        layer = atlas.layer(name)
        attrs = layer.attrs
        if not attrs.get("complete"):
            problems.append(f"layer {name}: not complete")
        sizes = layer.dim_sizes()
        absent = []
        for spec in SWEEP_ARRAYS:
            try:
                node = layer.group[spec.path]
            except KeyError:
                absent.append(spec.path)
                continue
            if not isinstance(node, zarr.Array):
                problems.append(f"layer {name}: {spec.path} is not an array")
                continue
            want = spec.shape(sizes)
            dims = tuple(node.metadata.dimension_names or ())  # type: ignore[union-attr]
            if node.shape != want or node.dtype != np.dtype(spec.dtype) or dims != spec.dims:
                problems.append(
                    f"layer {name}: {spec.path} is {node.shape} {node.dtype} {dims}, "
                    f"expected {want} {spec.dtype} {spec.dims}"
                )
        if absent:
            problems.append(f"layer {name}: missing array(s) {', '.join(absent)}")
        if attrs.get("complete") and "partial" in layer.group:
            problems.append(f"layer {name}: complete but partial/ state was not removed")
    from rfcore.analysis import get_analysis, list_analyses

    for analysis in list_analyses():
        problems += get_analysis(analysis).verify(atlas.store)
    return problems
