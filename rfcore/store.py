"""The atlas store: a zarr v3 group at any fsspec URL (local path, `memory://`, `s3://`).

`AtlasStore` is the write API used by every analysis (arrays via `rfcore.schema` specs, atomic
completion markers, a lease); `rfcore.atlas.open_atlas` is the read API. Storage options (S3 endpoint,
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
    LeaseLostError,
    StoreError,
    StoreLockedError,
    UnknownLayerError,
)
from rfcore.schema import (
    SCHEMA_VERSION,
    ArraySpec,
    LayerAttrs,
    RunAttrs,
)
from rfcore.urls import is_local
from rfcore.urls import redact as redact  # re-export (moved to rfcore.urls)
from rfcore.urls import refuse_credentials as refuse_credentials  # re-export (moved to rfcore.urls)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

_STATE = "_state"
_DONE = f"{_STATE}/done"
_LEASE = f"{_STATE}/lease"
LEASE_TOKEN_ENV = "RFATLAS_LEASE_TOKEN"
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


def _is_local(url: str) -> bool:
    return is_local(url)


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


_MEMORY_LOCK = threading.Lock()  # memory:// lives in this process: one lock makes its writes atomic


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 error (as s3fs re-raises it) says a conditional request's precondition failed."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return True
        if "pre-conditions you specified did not hold" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _unsupported(exc: BaseException) -> bool:
    """Whether an S3-compatible server refused a conditional request as not implemented."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            if (
                str(error.get("Code", "")) in ("NotImplemented", "501")
                or "not implemented" in str(error.get("Message", "")).lower()
            ):
                return True
        cur = cur.__cause__ or cur.__context__
    return False


_WARNED: set[str] = set()


def _warn_unconditional(root: str) -> None:
    if root not in _WARNED:
        _WARNED.add(root)
        log.warning(
            "the object store of %s does not support conditional writes (If-None-Match/If-Match): "
            "the lease is best effort there (two runs started in the same instant could both write)",
            redact(root),
        )


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

    # --- conditional writes (the lease): compare-and-swap on a version --------------------------
    # Local disk: create = hard link of a complete temp file (fails if the name exists, like
    # O_EXCL, and never exposes a half-written file); replace/delete compare the bytes under an
    # flock. S3: conditional PUT/DELETE (If-None-Match: * to create, If-Match: <etag> to replace).
    # memory://: one in-process lock. Other fsspec backends: best effort (check, then write).

    def _is_s3(self) -> bool:
        protocol = getattr(self._fs, "protocol", "")
        names = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return "s3" in names and hasattr(self._fs, "call_s3")

    def _is_memory(self) -> bool:
        protocol = getattr(self._fs, "protocol", "")
        names = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return "memory" in names

    @contextlib.contextmanager
    def _local_lock(self, key: str) -> Iterator[None]:
        import fcntl

        assert self._local is not None
        dest = self._local / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest.with_name(f".{dest.name}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _s3_key(self, key: str) -> tuple[str, str]:
        bucket, path, _ = self._fs.split_path(self._path(key))
        return str(bucket), str(path)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, version) of `key`, or None if absent; the version is what `replace_if` and
        `delete_if` compare (the ETag on S3, a digest of the bytes elsewhere)."""
        if self._local is None and self._is_s3():
            from fsspec.asyn import sync

            bucket, path = self._s3_key(key)

            async def get() -> tuple[bytes, str]:
                resp = await self._fs._call_s3("get_object", Bucket=bucket, Key=path)
                async with resp["Body"] as body:
                    data = await body.read()
                return bytes(data), str(resp["ETag"])

            try:
                return sync(self._fs.loop, get)  # type: ignore[no-any-return]
            except FileNotFoundError:
                return None
        data = self.get(key)
        return None if data is None else (data, _digest(data))

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; False if it does (someone else created it)."""
        if self._local is not None:
            dest = self._local / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            try:
                os.link(tmp, dest)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: O_EXCL create under the flock
                with self._local_lock(key):
                    try:
                        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    except FileExistsError:
                        return False
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
            finally:
                tmp.unlink()
            return True
        if self._is_s3():
            bucket, path = self._s3_key(key)
            try:
                self._fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data, IfNoneMatch="*")
            except Exception as exc:
                if _precondition_failed(exc):
                    return False
                if not _unsupported(exc):
                    raise
                _warn_unconditional(self._root)
                if self.get(key) is not None:  # an S3 without conditional writes: best effort
                    return False
                self.put(key, data)
            return True
        with _MEMORY_LOCK if self._is_memory() else contextlib.nullcontext():
            if self.get(key) is not None:
                return False
            self.put(key, data)
            return True

    def replace_if(self, key: str, data: bytes, version: str) -> bool:
        """Overwrite `key` only if it still has `version`; False if it changed or vanished."""
        if self._local is not None:
            with self._local_lock(key):
                found = self.read_versioned(key)
                if found is None or found[1] != version:
                    return False
                self.put(key, data)
                return True
        if self._is_s3():
            bucket, path = self._s3_key(key)
            try:
                self._fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data, IfMatch=version)
            except Exception as exc:
                if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                    return False
                if not _unsupported(exc):
                    raise
                _warn_unconditional(self._root)
                found = self.read_versioned(key)  # an S3 without conditional writes: best effort
                if found is None or found[1] != version:
                    return False
                self.put(key, data)
            return True
        with _MEMORY_LOCK if self._is_memory() else contextlib.nullcontext():
            found = self.read_versioned(key)
            if found is None or found[1] != version:
                return False
            self.put(key, data)
            return True

    def delete_if(self, key: str, version: str) -> bool:
        """Delete `key` only if it still has `version`."""
        if self._local is not None:
            with self._local_lock(key):
                found = self.read_versioned(key)
                if found is None or found[1] != version:
                    return False
                self.delete(key)
                return True
        if self._is_s3():
            bucket, path = self._s3_key(key)
            try:
                self._fs.call_s3("delete_object", Bucket=bucket, Key=path, IfMatch=version)
            except Exception as exc:
                if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                    return False
                # an S3 without conditional deletes: mark it released (expired) instead, still only
                # if nobody took it over meanwhile
                return self.replace_if(key, json.dumps({"released": True, "expires": 0}).encode(), version)
            return True
        with _MEMORY_LOCK if self._is_memory() else contextlib.nullcontext():
            found = self.read_versioned(key)
            if found is None or found[1] != version:
                return False
            self.delete(key)
            return True

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


def attrs_of(group: zarr.Group) -> dict[str, Any]:
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


#: Chunk compression of numeric arrays: Blosc LZ4 encodes several times faster than Zarr's default
#: (Zstd); bit shuffling makes it smaller too on the integer sums and activations, while bytes
#: (image patches, masks) compress faster and smaller unshuffled. Strings keep Zarr's default.
_COMPRESSORS = {
    "shuffled": (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),),
    "bytes": (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"),),
}


def _compressors(dtype: str) -> Any:
    kind = np.dtype(dtype) if dtype != "T" else None
    if kind is None or kind.kind not in "biuf":
        return "auto"
    return _COMPRESSORS["bytes" if kind.itemsize == 1 else "shuffled"]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class AtlasStore:
    """Write handle on an atlas; make one with `create` or `open`."""

    url: str
    root: zarr.Group
    run: dict[str, Any]
    lease_token: str | None

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
        self.lease_token: str | None = None  # set while this handle holds the lease

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
            self._layer_names = list(attrs_of(group).get("order", []))
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
        arr = self._open_or_create(spec, path, shape, chunks)
        if arr.shape != shape or arr.dtype != np.dtype(spec.dtype):
            raise StoreError(
                f"array {path} in {redact(self.url)} has shape {arr.shape} dtype {arr.dtype}, "
                f"not {shape} {spec.dtype}; use another --out"
            )
        return arr

    def _open_or_create(
        self, spec: ArraySpec, path: str, shape: tuple[int, ...], chunks: tuple[int, ...]
    ) -> zarr.Array[Any]:
        """Open the array at `path`, or create it; concurrent creators are fine (the loser opens the
        winner's array; a half-written zarr.json is read again). Any zarr/storage error becomes one
        StoreError line, never a traceback."""
        mode = "r" if self._read_only else "r+"
        last: BaseException | None = None
        for attempt in range(6):
            try:
                try:
                    return zarr.open_array(self._store, path=path, mode=mode, zarr_format=3)
                except zarr.errors.ArrayNotFoundError:
                    if self._read_only:
                        raise StoreError(
                            f"atlas {redact(self.url)} has no array {path} (opened read-only)"
                        ) from None
                    return zarr.create_array(
                        self._store,
                        name=path,
                        shape=shape,
                        chunks=chunks,
                        dtype=spec.dtype,
                        fill_value=spec.fill_value,
                        dimension_names=spec.dims,
                        compressors=_compressors(spec.dtype),
                    )
            except StoreError:
                raise
            except (zarr.errors.ContainsGroupError, zarr.errors.NodeTypeValidationError):
                raise StoreError(
                    f"{path} in {redact(self.url)} is a group, not an array; use another --out"
                ) from None
            except zarr.errors.ContainsArrayError as exc:  # a concurrent writer made it first: open it
                last = exc
            except (ValueError, KeyError, OSError) as exc:  # zarr errors, a half-written zarr.json
                last = exc
            time.sleep(0.02 * (attempt + 1))
        if isinstance(last, OSError) and not isinstance(last, zarr.errors.BaseZarrError):
            raise last  # storage I/O: the task's retry policy judges it (transient or not)
        detail = " ".join(str(last).split())[:200] if last is not None else ""
        raise StoreError(
            f"cannot open or create array {path} in {redact(self.url)}: {type(last).__name__}: {detail}"
        ) from None

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
        old = attrs_of(node).get("config") if node is not None else None
        if want is not None and old is not None and old != want:
            diff = [
                f"{k} {old.get(k)!r} -> {want.get(k)!r}"
                for k in sorted({*old, *want})
                if old.get(k) != want.get(k)
            ]
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

    def swept_shards(self) -> dict[int, str]:
        """Swept shard id -> the marker that records it. A sweep marker `sweep/shard-L` covers the
        shards listed in its info's `shards` (a group swept together, whose merged reducer state is
        row L of the layers' `partial/*` arrays), by default L alone: one marker per group makes a
        group's shards done together or not at all."""
        out: dict[int, str] = {}
        for key in sorted(self.done_keys("sweep")):
            stem = key.rpartition("-")[2]
            if not (key.startswith("sweep/shard-") and stem.isdigit()):
                continue
            info = (self.marker(key) or {}).get("info") or {}
            for shard in info.get("shards", [int(stem)]):
                out[int(shard)] = key
        return out

    def pending_shards(self) -> list[int]:
        """Sweep shards not swept yet, in order."""
        swept = self.swept_shards()
        return [s for s in range(self.num_shards) if s not in swept]

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
        current = {int(s["index"]): s for s in attrs_of(root).get("skipped", [])}
        for s in skipped:
            current[int(s.index)] = {"index": int(s.index), "path": str(s.path), "reason": str(s.reason)}
        root.attrs.update({"skipped": [current[i] for i in sorted(current)]})

    # --- completion markers -------------------------------------------------------------------
    def marker(self, key: str) -> dict[str, Any] | None:
        """The body of marker `key` ({key, time, info?}), None if absent."""
        raw = self._objects.get(f"{_DONE}/{_check_key(key)}")
        if raw is None:
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def mark_done(self, key: str, info: Mapping[str, Any] | None = None) -> None:
        """Write the completion marker `key` (call after the data is written). When this run's lease
        token is known (`lease_token`, or the registered provider), LeaseLostError if the store's
        lease is no longer held by it."""
        self._writable()
        _check_key(key)
        self.check_lease()  # a run that lost the store's lease must not mark work done
        doc: dict[str, Any] = {"key": key, "time": _iso(time.time())}
        if info:
            doc["info"] = json.loads(json.dumps(dict(info)))
        body = json.dumps(doc).encode()
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
        found = self._read_lease_versioned()
        return None if found is None else found[0]

    def _read_lease_versioned(self) -> tuple[dict[str, Any], str] | None:
        found = self._objects.read_versioned(_LEASE)
        if found is None:
            return None
        try:
            lease = json.loads(found[0])
        except ValueError:
            lease = {}
        return (lease if isinstance(lease, dict) else {}), found[1]

    def _lease_body(self, owner: str, token: str, ttl_s: float) -> bytes:
        expires = time.time() + ttl_s
        body = {
            "owner": owner,
            "token": token,
            **holder_identity(),
            "expires": expires,
            "expires_utc": _iso(expires),
        }
        return json.dumps(body).encode()

    def _write_lease(self, owner: str, token: str, ttl_s: float) -> None:
        """Unconditional write of a lease (tests: simulate another holder)."""
        self._objects.put(_LEASE, self._lease_body(owner, token, ttl_s))

    def _held_by_other(self, held: Mapping[str, Any], token: str) -> bool:
        """Whether `held` is a live lease of someone else: not expired, and not held by a process of
        this host that no longer exists (taken over at once, with a log line)."""
        if held.get("token") in (None, token) or float(held.get("expires", 0)) <= time.time():
            return False
        if holder_is_dead(held):
            log.warning(
                "taking over the lease on %s at once: its holder %s (pid %s on this host) no longer exists",
                redact(self.url),
                held.get("owner"),
                held.get("pid"),
            )
            return False
        return True

    def _locked_message(self, held: Mapping[str, Any]) -> str:
        where = (
            f" (holder: host {held['host']} pid {held['pid']})" if "host" in held and "pid" in held else ""
        )
        return (
            f"store {redact(self.url)} is leased by {held.get('owner')} until "
            f"{_iso(float(held.get('expires', 0)))}; wait for it or use another --out{where}"
        )

    def _check_lease(self, token: str) -> None:
        held = self._read_lease()
        if held is not None and self._held_by_other(held, token):
            raise StoreLockedError(self._locked_message(held))

    def _acquire(self, owner: str, token: str, ttl_s: float) -> None:
        """Take the lease atomically: create it if absent, else replace an expired, released or
        dead-holder lease only if nobody changed it since we read it (so of two takers, one wins)."""
        for _ in range(5):
            found = self._read_lease_versioned()
            if found is None:
                if self._objects.create_exclusive(_LEASE, self._lease_body(owner, token, ttl_s)):
                    return
                continue  # another taker created it first: judge its lease
            held, version = found
            if self._held_by_other(held, token):
                raise StoreLockedError(self._locked_message(held))
            if self._objects.replace_if(_LEASE, self._lease_body(owner, token, ttl_s), version):
                return
        held = self._read_lease() or {}
        raise StoreLockedError(self._locked_message(held))

    def check_lease(self, tokens: str | Sequence[str] | None = None) -> None:
        """LeaseLostError unless the store's lease is live and held by `tokens` (one token or a set;
        default: this handle's `lease_token`, else the registered token provider's). No-op when no
        token is known (a run without a lease: library use, tests)."""
        if tokens is None:
            tokens = [self.lease_token] if self.lease_token else lease_tokens()
        wanted = {tokens} if isinstance(tokens, str) else set(tokens)
        if not wanted:
            return
        held = self._read_lease()
        if held is None or held.get("token") not in wanted:
            who = "nobody" if not held or not held.get("token") else str(held.get("owner"))
            raise LeaseLostError(
                f"this run lost the lease of {redact(self.url)} (now held by {who}); "
                "it stopped writing: another run owns the store"
            )
        if float(held.get("expires", 0)) <= time.time():
            raise LeaseLostError(
                f"this run's lease of {redact(self.url)} expired at {_iso(float(held.get('expires', 0)))} "
                "(not refreshed in time); it stopped writing: rerun to resume"
            )

    @contextlib.contextmanager
    def lease(self, owner: str, ttl_s: float = 60.0) -> Iterator[str]:
        """Hold the store's lease (one writer at a time) while the block runs; yields its token.

        Taken atomically (see `_acquire`); refreshed every ttl/3 by a compare-and-swap on the lease
        this run wrote. StoreLockedError if another live lease is held; an expired one, or one whose
        holder is a process of this host that no longer exists, is taken over. While held, this
        handle's `lease_token` is set and `mark_done` checks it; LeaseLostError when the block ends
        if another run took the lease over meanwhile.
        """
        if ttl_s <= 0:
            raise ValueError("lease ttl_s must be positive")
        self._writable()
        token = uuid.uuid4().hex
        self._acquire(owner, token, ttl_s)
        self.lease_token = token
        stop = threading.Event()
        lost = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(ttl_s / 3):
                try:
                    found = self._read_lease_versioned()
                    if (
                        found is None
                        or found[0].get("token") != token
                        or not self._objects.replace_if(
                            _LEASE, self._lease_body(owner, token, ttl_s), found[1]
                        )
                    ):
                        lost.set()
                        log.error(
                            "lease on %s was lost to another run; stopped refreshing it", redact(self.url)
                        )
                        return
                except Exception as exc:  # transient store errors: retry at the next beat
                    log.warning("could not refresh the lease on %s: %s", redact(self.url), type(exc).__name__)

        thread = threading.Thread(target=heartbeat, name=f"rfatlas-lease-{owner}", daemon=True)
        thread.start()
        try:
            yield token
        except BaseException:
            raise
        else:
            if lost.is_set():
                raise LeaseLostError(
                    f"this run lost the lease of {redact(self.url)} while it ran; another run owns the store now"
                )
        finally:
            stop.set()
            thread.join()
            self.lease_token = None
            with contextlib.suppress(Exception):
                found = self._read_lease_versioned()
                if found is not None and found[0].get("token") == token:
                    self._objects.delete_if(_LEASE, found[1])


# --- lease holders and tokens ------------------------------------------------------------------------
def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> int | None:
    """Start time of process `pid` (clock ticks since boot; Linux), to tell a reused pid apart."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _machine() -> str:
    """This kernel and pid namespace (boot id + pid namespace): processes of another container or
    machine with the same host name are not ours to judge."""
    ns = ""
    with contextlib.suppress(OSError):
        ns = os.readlink("/proc/self/ns/pid")
    return f"{_read_text('/proc/sys/kernel/random/boot_id') or ''}/{ns}"


def holder_identity() -> dict[str, Any]:
    """Structured identity of this process as a lease holder: host, pid, pid start, machine."""
    import getpass
    import socket

    user = ""
    with contextlib.suppress(Exception):
        user = getpass.getuser()
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": _proc_start(pid),
        "machine": _machine(),
        "user": user,
    }


def holder_is_dead(held: Mapping[str, Any]) -> bool:
    """True when the lease holder was a process on this host (same machine and pid namespace) that
    no longer exists (or whose pid now belongs to another process). A remote holder is never judged
    dead here: its lease expires by TTL."""
    import socket

    pid = held.get("pid")
    if not isinstance(pid, int) or held.get("host") != socket.gethostname():
        return False
    if not held.get("machine") or held.get("machine") != _machine():
        return False
    if pid == os.getpid():
        return False  # this very process holds it (another handle or thread): alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by another user
    stat = _read_text(f"/proc/{pid}/stat")
    if stat and stat.rpartition(")")[2].split()[:1] == ["Z"]:
        return True  # killed, not yet reaped
    start = held.get("pid_start")
    return isinstance(start, int) and _proc_start(pid) not in (None, start)


_TOKEN_PROVIDERS: list[Any] = []


def set_lease_token_provider(provider: Any) -> None:
    """Register `provider() -> iterable of lease tokens` of the run the calling code belongs to
    (`tasks.policy` reads them from the Prefect task run's tags, so tasks on Dask workers check the
    lease before every completion marker). The env var RFATLAS_LEASE_TOKEN is always consulted."""
    if provider not in _TOKEN_PROVIDERS:
        _TOKEN_PROVIDERS.append(provider)


def lease_tokens() -> list[str]:
    """Lease tokens of the current run (providers, then RFATLAS_LEASE_TOKEN); [] when unknown."""
    out: list[str] = []
    for provider in _TOKEN_PROVIDERS:
        with contextlib.suppress(Exception):
            out += [str(t) for t in provider() or ()]
    env = os.environ.get(LEASE_TOKEN_ENV, "")
    out += [t for t in env.split(",") if t]
    return out
