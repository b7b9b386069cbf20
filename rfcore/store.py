"""The atlas store: a zarr v3 group at any fsspec URL (local path, `memory://`, `s3://`).

`AtlasStore` is the write API used by every analysis (arrays via `rfcore.schema` specs, atomic
completion markers, a lease); `open_atlas` is the read API. Storage options (S3 endpoint,
credentials) come from the environment or `storage_options` and are never written to the store.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import fsspec
import numpy as np
import zarr
import zarr.codecs
import zarr.errors
import zarr.storage
from zarr.abc.store import Store

from rfcore import __version__
from rfcore.errors import (
    ConfigMismatchError,
    StoreError,
    StoreLockedError,
    UnknownLayerError,
)
from rfcore.schema import (
    SCHEMA_VERSION,
    SWEEP_ARRAYS,
    ArraySpec,
    LayerAttrs,
    RunAttrs,
    sweep_shard_key,
)

if TYPE_CHECKING:
    import xarray as xr

log = logging.getLogger(__name__)

_STATE = "_state"
_DONE = f"{_STATE}/done"
_LEASE = f"{_STATE}/lease"
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


class SkippedLike(Protocol):
    """Anything with the fields of `rfcore.data.SkippedImage`."""

    @property
    def index(self) -> int: ...
    @property
    def path(self) -> str: ...
    @property
    def reason(self) -> str: ...


class AtlasLayerNotFoundError(UnknownLayerError, StoreError):
    """The atlas has no such layer."""


_CREDENTIALS = re.compile(r"([a-z0-9+.-]+://)[^/@\s]*@", flags=re.IGNORECASE)


def redact(url: str) -> str:
    """`url` (or a data spec such as `zarr:s3://...`) without any user:password part (safe for messages)."""
    return _CREDENTIALS.sub(r"\1", url)


def refuse_credentials(value: str, what: str) -> None:
    """StoreError when `value` embeds a user:password part: a URL stored in attrs or named in a run
    must not carry secrets (they come from the environment, e.g. AWS_ACCESS_KEY_ID)."""
    if _CREDENTIALS.search(value):
        raise StoreError(
            f"{what} {redact(value)!r} embeds credentials; give them in the environment "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) instead"
        )


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """fsspec options; for s3:// the endpoint comes from AWS_ENDPOINT_URL unless given, and reads are
    single GETs (s3fs's concurrent reads first HEAD every key: slow for zarr's small objects)."""
    opts = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        opts.setdefault("max_concurrency", 1)
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in opts.get("client_kwargs", {}):
            opts["endpoint_url"] = endpoint
    return opts


class _Objects:
    """Raw small-object access under the store root (markers, lease); writes are atomic."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self._local = _local_path(url) if _is_local(url) else None
        self._fs: Any = None
        self._root = ""
        if self._local is None:
            self._fs, self._root = fsspec.core.url_to_fs(url, **options)
            self._root = self._root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}"

    def put(self, key: str, data: bytes) -> None:
        if self._local is None:
            self._fs.pipe_file(self._path(key), data)  # one PUT: atomic on object stores
            return
        dest = self._local / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def get(self, key: str) -> bytes | None:
        try:
            if self._local is None:
                data: bytes = self._fs.cat_file(self._path(key))
                return data
            return (self._local / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self._local is None:
                self._fs.rm_file(self._path(key))
            else:
                (self._local / key).unlink()

    def is_empty(self) -> bool:
        """Whether nothing exists at the root."""
        if self._local is not None:
            return not self._local.is_dir() or not any(self._local.iterdir())
        self._fs.invalidate_cache()
        try:
            return not self._fs.ls(self._root, detail=False)
        except FileNotFoundError:
            return True

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under the directory `prefix` ("" = all), hidden temp files excluded."""
        if self._local is None:
            base = self._path(prefix).rstrip("/")
            self._fs.invalidate_cache()
            try:
                found = self._fs.find(base)
            except FileNotFoundError:
                return []
            return [p[len(self._root) + 1 :] for p in found if p.startswith(self._root + "/")]
        base_dir = self._local / prefix
        out = []
        for dirpath, _, files in os.walk(base_dir):
            for f in files:
                if not f.startswith("."):
                    out.append((Path(dirpath) / f).relative_to(self._local).as_posix())
        return out


def _zarr_store(url: str, options: dict[str, Any], read_only: bool) -> Store:
    if _is_local(url):
        return zarr.storage.LocalStore(_local_path(url), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, storage_options=options, read_only=read_only)


def _attrs(group: zarr.Group) -> dict[str, Any]:
    """A group's attrs as a plain dict (fresh only if the group handle is)."""
    out: dict[str, Any] = group.attrs.asdict()
    return out


def _check_key(key: str) -> str:
    if not _KEY_RE.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"bad marker key {key!r}: use letters, digits, '._-' and '/' separators")
    return key


def _root_meta(objects: _Objects, url: str) -> bytes | None:
    """The root `zarr.json` (None if absent); StoreError if the store cannot be reached."""
    try:
        return objects.get("zarr.json")
    except Exception as exc:  # botocore/aiohttp/OS errors: report them as one line
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise StoreError(f"cannot read store {redact(url)}: {type(exc).__name__}: {detail}") from None


def _root_attrs(objects: _Objects, url: str) -> dict[str, Any]:
    """Root attrs of an existing atlas; StoreError if absent, not an atlas, or another version."""
    raw = _root_meta(objects, url)
    if raw is None:
        raise StoreError(f"no atlas at {redact(url)}")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise StoreError(f"{redact(url)} is not an rfatlas atlas (unreadable zarr.json)") from None
    attrs = meta.get("attributes") or {}
    info = attrs.get("rfatlas")
    if meta.get("node_type") != "group" or not isinstance(info, dict) or "run" not in attrs:
        raise StoreError(f"{redact(url)} is a zarr store but not an rfatlas atlas")
    if info.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"atlas {redact(url)} has schema version {info.get('schema_version')} "
            f"(written by rfatlas {info.get('version')}); this rfatlas {__version__} reads version {SCHEMA_VERSION}"
        )
    out: dict[str, Any] = attrs
    return out


def _mismatch_message(url: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = [k for k in new if old.get(k) != new[k]]
    if len(keys) == 1:
        what = f"{keys[0]} {old.get(keys[0])}, not {new[keys[0]]}"
    else:
        what = (
            ", ".join(f"{k} {old.get(k)}" for k in keys) + ", not " + ", ".join(f"{k} {new[k]}" for k in keys)
        )
    return f"store {redact(url)} was made for {what}; use another --out"


#: Chunk compression of the atlas arrays: Blosc LZ4 with bit shuffling encodes several times faster
#: than Zarr's default (Zstd), also smaller on these integer sums and activations (bench/end_to_end.py).
_COMPRESSORS = (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class AtlasStore:
    """Write handle on an atlas; make one with `create` or `open`."""

    url: str
    root: zarr.Group
    run: dict[str, Any]

    def __init__(self, url: str, options: dict[str, Any], read_only: bool) -> None:
        """Private: use `AtlasStore.create` / `AtlasStore.open`."""
        self.url = url
        self._read_only = read_only
        self._objects = _Objects(url, options)
        self._store = _zarr_store(url, options, read_only)
        attrs = _root_attrs(self._objects, url)
        self.root = zarr.open_group(self._store, mode="r" if read_only else "r+", zarr_format=3)
        self.run = dict(attrs["run"])
        self._layer_names: list[str] | None = None

    @classmethod
    def create(
        cls,
        url: str,
        *,
        run: RunAttrs,
        layers: Mapping[str, LayerAttrs],
        num_images: int,
        shard_size: int,
        k: int,
        storage_options: Mapping[str, Any] | None = None,
    ) -> AtlasStore:
        """Create an atlas, or reopen one made with the same run identity (resume)."""
        run_dict = run.to_dict()
        given = {"num_images": num_images, "shard_size": shard_size, "k": k}
        for key, value in given.items():
            have = run_dict.get(key, run_dict["config"].get(key))
            if have is not None and have != value:
                raise ValueError(f"run attrs say {key} {have} but create() was given {value}")
        run_dict["config"].update(
            shard_size=shard_size, k=k, layers=list(run_dict["config"].get("layers", layers))
        )
        run_dict["num_images"] = num_images
        if list(run_dict["config"]["layers"]) != list(layers):
            raise ValueError(f"run config layers {run_dict['config']['layers']} differ from the layers given")
        ident = RunAttrs.from_dict(run_dict).identity()

        options = _options(url, storage_options)
        objects = _Objects(url, options)
        if _is_local(url) and _local_path(url).exists() and not _local_path(url).is_dir():
            raise StoreError(f"{redact(url)} is a file, not an atlas; use another --out")
        if _root_meta(objects, url) is not None:
            old = RunAttrs.from_dict(_root_attrs(objects, url)["run"]).identity()
            if old != ident:
                raise ConfigMismatchError(_mismatch_message(url, old, ident))
        else:
            try:
                if not objects.is_empty():
                    raise StoreError(f"{redact(url)} exists and is not an rfatlas atlas; use another --out")
                zarr.open_group(
                    _zarr_store(url, options, read_only=False),
                    mode="w-",
                    attributes={
                        "rfatlas": {"schema_version": SCHEMA_VERSION, "version": __version__},
                        "run": run_dict,
                        "skipped": [],
                    },
                    zarr_format=3,
                )
            except OSError as exc:
                raise StoreError(
                    f"cannot create an atlas at {redact(url)}: {type(exc).__name__}: {exc}"
                ) from None
        store = cls(url, options, read_only=False)
        root = store.root
        if _STATE not in root:  # also completes a create() that died half-way
            root.create_group(_STATE, attributes={"doc": "rfatlas internal state: completion markers, lease"})
        if "layers" not in root:
            root.create_group("layers", attributes={"order": list(layers)})
        layers_group = zarr.open_group(store._store, path="layers", mode="r+", zarr_format=3)
        for name, la in layers.items():
            if name not in layers_group:
                layers_group.create_group(name, attributes={**la.to_dict(), "complete": False})
        return store

    @classmethod
    def open(
        cls, url: str, mode: str = "r", *, storage_options: Mapping[str, Any] | None = None
    ) -> AtlasStore:
        """Open an existing atlas ("r" read-only, "r+" read-write); StoreError if unusable."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        return cls(url, _options(url, storage_options), read_only=mode == "r")

    # --- layout -------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """Layer names in the order given at creation."""
        if self._layer_names is None:
            group = zarr.open_group(self._store, path="layers", mode="r", zarr_format=3)
            self._layer_names = list(_attrs(group).get("order", []))
        return list(self._layer_names)

    def _check_layer(self, layer: str) -> None:
        names = self.layer_names
        if layer not in names:
            close = difflib.get_close_matches(layer, names, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; it has {', '.join(names) or 'none'}"
            raise AtlasLayerNotFoundError(f"atlas {redact(self.url)} has no layer {layer}{hint}")

    @property
    def num_shards(self) -> int:
        """Number of sweep shards (`ceil(num_images / shard_size)`)."""
        return math.ceil(int(self.run["num_images"]) / int(self.run["config"]["shard_size"]))

    def layer_group(self, layer: str) -> zarr.Group:
        """The group `layers/<layer>` (fresh metadata); UnknownLayerError-like StoreError if absent."""
        self._check_layer(layer)
        return zarr.open_group(
            self._store, path=f"layers/{layer}", mode="r" if self._read_only else "r+", zarr_format=3
        )

    def _writable(self) -> None:
        if self._read_only:
            raise StoreError(f"atlas {redact(self.url)} was opened read-only")

    def _array_path(self, spec: ArraySpec, layer: str | None, placeholders: dict[str, str]) -> str:
        if spec.scope == "layer":
            if layer is None:
                raise ValueError(f"array {spec.path!r} lives in a layer group: pass layer=")
            self._check_layer(layer)
            return f"layers/{layer}/{spec.resolve(**placeholders)}"
        if layer is not None:
            placeholders = {**placeholders, "layer": layer}
        return spec.resolve(**placeholders)

    def require_array(
        self,
        spec: ArraySpec,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        *,
        layer: str | None = None,
        **placeholders: str,
    ) -> zarr.Array[Any]:
        """Create or open the array of `spec`; StoreError if an existing one has another shape/dtype."""
        shape, chunks = tuple(int(s) for s in shape), tuple(int(c) for c in chunks)
        if len(shape) != len(spec.dims) or len(chunks) != len(spec.dims):
            raise ValueError(f"array {spec.path!r} has dims {spec.dims}; got shape {shape}, chunks {chunks}")
        path = self._array_path(spec, layer, placeholders)
        mode = "r" if self._read_only else "r+"
        try:
            arr = zarr.open_array(self._store, path=path, mode=mode, zarr_format=3)
        except zarr.errors.ArrayNotFoundError:
            if self._read_only:
                raise StoreError(f"atlas {redact(self.url)} has no array {path} (opened read-only)") from None
            try:
                return zarr.create_array(
                    self._store,
                    name=path,
                    shape=shape,
                    chunks=chunks,
                    dtype=spec.dtype,
                    fill_value=spec.fill_value,
                    dimension_names=spec.dims,
                    compressors=_COMPRESSORS,
                )
            except zarr.errors.ContainsArrayError:  # a concurrent writer made it first
                arr = zarr.open_array(self._store, path=path, mode=mode, zarr_format=3)
        if arr.shape != shape or arr.dtype != np.dtype(spec.dtype):
            raise StoreError(
                f"array {path} in {redact(self.url)} has shape {arr.shape} dtype {arr.dtype}, "
                f"not {shape} {spec.dtype}; use another --out"
            )
        return arr

    def remove(self, path: str, *, layer: str | None = None) -> None:
        """Delete an array or group (e.g. `remove("partial", layer=name)`); absent is fine."""
        self._writable()
        full = f"layers/{layer}/{path}" if layer is not None else path
        if layer is not None:
            self._check_layer(layer)
        with contextlib.suppress(KeyError):
            del self.root[full]

    def require_group(self, path: str, *, config: Mapping[str, Any] | None = None) -> zarr.Group:
        """Create or open the group at `path` (root-relative). With `config`, the group records it in
        its `config` attr; an existing group made with another config raises ConfigMismatchError
        naming the differing keys (nothing is written then)."""
        want = json.loads(json.dumps(dict(config))) if config is not None else None
        node = self.root.get(path)
        if node is not None and not isinstance(node, zarr.Group):
            raise StoreError(f"{path} in {redact(self.url)} is an array, not a group")
        old = _attrs(node).get("config") if node is not None else None
        if want is not None and old is not None and old != want:
            diff = [f"{k} {old.get(k)!r} -> {want.get(k)!r}" for k in sorted({*old, *want}) if old.get(k) != want.get(k)]
            raise ConfigMismatchError(
                f"{path} in {redact(self.url)} was computed with other options ({', '.join(diff)}); "
                "use another --out or the same options"
            )
        self._writable()
        group = node if node is not None else self.root.require_group(path)
        if want is not None and old is None:
            group.attrs["config"] = want
        return group

    def pending(self, keys: Sequence[str]) -> list[str]:
        """The marker keys among `keys` that are not done yet, in the given order (one listing per
        marker directory, not one request per key)."""
        done: set[str] = set()
        for prefix in sorted({k.rpartition("/")[0] for k in keys}):
            done |= self.done_keys(prefix)
        return [k for k in keys if k not in done]

    # --- attrs --------------------------------------------------------------------------------
    def set_layer_attrs(self, layer: str, **attrs: Any) -> None:
        """Update attrs of `layers/<layer>` (e.g. `complete=True`)."""
        self._writable()
        self.layer_group(layer).attrs.update(json.loads(json.dumps(attrs)))

    def add_skipped(self, skipped: Sequence[SkippedLike]) -> None:
        """Record skipped images in root attrs (dedup by index, sorted). Read-modify-write of the
        root attrs: call it from one writer at a time (e.g. the flow or the merge step)."""
        self._writable()
        if not skipped:
            return
        root = zarr.open_group(self._store, mode="r+", zarr_format=3)
        current = {int(s["index"]): s for s in _attrs(root).get("skipped", [])}
        for s in skipped:
            current[int(s.index)] = {"index": int(s.index), "path": str(s.path), "reason": str(s.reason)}
        root.attrs.update({"skipped": [current[i] for i in sorted(current)]})

    # --- completion markers -------------------------------------------------------------------
    def mark_done(self, key: str) -> None:
        """Write the completion marker `key` (call after the data is written)."""
        self._writable()
        body = json.dumps({"key": _check_key(key), "time": _iso(time.time())}).encode()
        self._objects.put(f"{_DONE}/{key}", body)

    def is_done(self, key: str) -> bool:
        """Whether the marker `key` exists."""
        return self._objects.get(f"{_DONE}/{_check_key(key)}") is not None

    def done_keys(self, prefix: str = "") -> set[str]:
        """Every marker key under the directory `prefix` (e.g. "sweep"), as full keys."""
        prefix = prefix.strip("/")
        if prefix:
            _check_key(prefix)
        base = f"{_DONE}/{prefix}" if prefix else _DONE
        return {k[len(_DONE) + 1 :] for k in self._objects.keys(base)}

    # --- lease --------------------------------------------------------------------------------
    def _read_lease(self) -> dict[str, Any] | None:
        raw = self._objects.get(_LEASE)
        if raw is None:
            return None
        try:
            lease: dict[str, Any] = json.loads(raw)
        except ValueError:
            return None
        return lease

    def _check_lease(self, token: str) -> None:
        held = self._read_lease()
        if held is not None and held.get("token") != token and float(held.get("expires", 0)) > time.time():
            raise StoreLockedError(
                f"store {redact(self.url)} is leased by {held.get('owner')} until "
                f"{_iso(float(held['expires']))}; wait for it or use another --out"
            )

    def _write_lease(self, owner: str, token: str, ttl_s: float) -> None:
        expires = time.time() + ttl_s
        body = {"owner": owner, "token": token, "expires": expires, "expires_utc": _iso(expires)}
        self._objects.put(_LEASE, json.dumps(body).encode())

    @contextlib.contextmanager
    def lease(self, owner: str, ttl_s: float = 60.0) -> Iterator[None]:
        """Hold the store's lease (advisory lock) while the block runs; refreshed every ttl/3.

        StoreLockedError if another live lease is held; an expired one is taken over.
        """
        if ttl_s <= 0:
            raise ValueError("lease ttl_s must be positive")
        self._writable()
        token = uuid.uuid4().hex
        self._check_lease(token)
        self._write_lease(owner, token, ttl_s)
        time.sleep(min(0.25, ttl_s / 10))  # let a concurrent taker's write land, then re-check
        self._check_lease(token)
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(ttl_s / 3):
                try:
                    held = self._read_lease()
                    if held is None or held.get("token") != token:
                        log.warning("lease on %s was lost; stopped refreshing it", redact(self.url))
                        return
                    self._write_lease(owner, token, ttl_s)
                except Exception as exc:  # transient store errors: retry at the next beat
                    log.warning("could not refresh the lease on %s: %s", redact(self.url), type(exc).__name__)

        thread = threading.Thread(target=heartbeat, name=f"rfatlas-lease-{owner}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            held = self._read_lease()
            if held is not None and held.get("token") == token:
                self._objects.delete(_LEASE)


# --- read API ---------------------------------------------------------------------------------------
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
        return _attrs(self.group)

    @property
    def rf(self) -> dict[str, Any]:
        """Receptive field {size, stride, offset}."""
        return dict(_attrs(self.group)["rf"])

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
        return xr.Dataset(variables, attrs=self.attrs)


class Atlas:
    """Read-only view of an atlas."""

    def __init__(self, store: AtlasStore) -> None:
        self.store = store
        self.url = store.url
        self.run = store.run

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Skipped images [{index, path, reason}], sorted by index."""
        return list(_attrs(zarr.open_group(self.store._store, mode="r", zarr_format=3)).get("skipped", []))

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
    done = len(atlas.store.done_keys("sweep") & {sweep_shard_key(i) for i in range(n_shards)})
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
    return "\n".join(lines)


def verify_store(url: str, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Problems of an atlas (empty = valid): schema, completeness, arrays, sweep shards."""
    try:
        atlas = open_atlas(url, storage_options=storage_options)
    except StoreError as exc:
        return [str(exc)]
    problems = []
    missing = sorted(
        {sweep_shard_key(i) for i in range(atlas.store.num_shards)} - atlas.store.done_keys("sweep")
    )
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
    return problems
