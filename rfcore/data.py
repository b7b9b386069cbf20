"""Image datasets (synthetic, image folders, Imagenette, ingested Zarr), batching, sharding and ingest.

Every dataset yields *preprocessed but un-normalized* uint8 ``(3, S, S)`` images: the shorter side is
resized to ``resize`` (default ``size``) and the centre ``size x size`` crop is kept. Unreadable images
raise :class:`BadImageError`; :func:`iter_batches` leaves them out of their batch and lists them.
"""

from __future__ import annotations

import abc
import copy
import difflib
import hashlib
import json
import multiprocessing
import os
import posixpath
import re
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import zarr
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from rfcore.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
ZARR_FORMAT = "rfatlas-images-v1"
_SPEC_FORMS = "synthetic[:N], synthetic-train[:N], imagefolder:PATH, imagenette[:val|train], zarr:URL"
_SPEC_KINDS = ("synthetic", "synthetic-train", "imagefolder", "imagenette", "zarr")
_CHUNK_BYTES = 16 * 2**20  # target size of one Zarr image chunk


_ADDRESS = re.compile(r"\s+at\s+0x[0-9a-fA-F]+")


def clean_reason(reason: str) -> str:
    """One line, without object addresses (``<PIL... at 0x7f..>``): two identical runs store the
    same skipped-image reasons."""
    return " ".join(_ADDRESS.sub("", reason).split())


class BadImageError(DataError):
    """One image is unreadable or corrupt; carries the file (``path``) and a one-line ``reason``."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = clean_reason(reason)
        super().__init__(f"bad image {path}: {self.reason}")


@dataclass
class SkippedImage:
    """A dataset image left out of a batch: its index, file and why."""

    index: int
    path: str
    reason: str


@dataclass
class Batch:
    """Consecutive dataset indices, minus the unreadable ones (listed in ``skipped``)."""

    images: Tensor  # uint8 (B, 3, S, S)
    labels: Tensor  # int64 (B,)
    indices: Tensor  # int64 (B,), increasing
    skipped: list[SkippedImage] = field(default_factory=list)

    def pin_memory(self) -> Batch:
        """Copy of this batch in page-locked memory (used by DataLoader's pin_memory)."""
        return Batch(
            self.images.pin_memory(), self.labels.pin_memory(), self.indices.pin_memory(), self.skipped
        )


@dataclass(frozen=True)
class IngestResult:
    """What :func:`ingest` wrote."""

    url: str
    num_images: int
    skipped: list[SkippedImage]


class ImageDataset(abc.ABC):
    """Random-access dataset of preprocessed uint8 images; deterministic and picklable."""

    spec: str
    size: int
    resize: int
    class_names: list[str]
    #: Cheap content fingerprint of the data (file list with sizes/mtimes or ETags, an ingest store's
    #: digest, the synthetic renderer's version); None where the spec alone determines the images.
    fingerprint: str | None = None
    #: dataset label -> model class index (`for_model`); None = labels as they are.
    label_lut: np.ndarray | None = None

    def __init__(self, spec: str, size: int, resize: int, class_names: list[str]) -> None:
        self.spec, self.size, self.resize, self.class_names = spec, size, resize, class_names

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for unlabelled data)."""
        return len(self.class_names)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def get(self, index: int) -> tuple[np.ndarray, int]:
        """uint8 ``(3, S, S)`` image and label (-1 if unlabelled); BadImageError if unreadable."""

    def get_original(self, index: int) -> tuple[np.ndarray, int]:
        """uint8 ``(3, H, W)`` image before resizing and centre-cropping (what training crops from,
        paper §3.1), and its label; datasets that keep no original return :meth:`get`."""
        return self.get(index)

    def describe(self, index: int) -> str:
        """Where image ``index`` comes from: a file path or ``spec[index]``."""
        return f"{self.spec}[{index}]"

    def for_model(self, num_classes: int) -> ImageDataset:
        """This dataset with labels in the model's class indices (`model_label_lut`); DataError if
        its labels cannot be the model's classes."""
        lut = model_label_lut(self, num_classes)
        if lut is None:
            return self
        out = copy.copy(self)
        out.label_lut = lut
        return out

    def _check_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.spec} ({len(self)} images)")
        return int(index)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec!r} n={len(self)} size={self.size} resize={self.resize}>"


# ---------------------------------------------------------------------------------------------- synthetic

_SYNTHETIC_NAMES = ("SYNTHETIC_CLASSES", "SyntheticClass", "SyntheticDataset", "synthetic_image")


def __getattr__(name: str) -> Any:
    """The synthetic dataset lives in `rfcore.synthetic`; its names stay importable from here."""
    if name in _SYNTHETIC_NAMES:
        import rfcore.synthetic

        return getattr(rfcore.synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- files


def _preprocess(image: Image.Image, size: int, resize: int) -> np.ndarray:
    """Resize the shorter side to ``resize`` (bilinear, antialiased) and centre-crop ``size``; (3,S,S) uint8."""
    w, h = image.size
    if min(w, h) != resize:
        if w <= h:
            w, h = resize, int(resize * h / w)
        else:
            w, h = int(resize * w / h), resize
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    top, left = round((h - size) / 2), round((w - size) / 2)
    image = image.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


class FileDataset(ImageDataset):
    """Image files read through fsspec and decoded with PIL; labels from their class folder (or -1)."""

    def __init__(
        self,
        spec: str,
        size: int,
        resize: int,
        fs: fsspec.AbstractFileSystem,
        files: list[tuple[str, int]],
        class_names: list[str],
    ) -> None:
        super().__init__(spec, size, resize, class_names)
        self.fs, self.files = fs, files

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        path = self.files[self._check_index(index)][0]
        return path if "file" in _protocols(self.fs) else str(self.fs.unstrip_protocol(path))

    def decode(self, index: int) -> tuple[Image.Image, int]:
        """The full-size RGB image and its label; BadImageError if unreadable."""
        path, label = self.files[self._check_index(index)]
        try:
            with self.fs.open(path, "rb") as f, Image.open(f) as image:
                return to_rgb8(image), label
        except BadImageError as e:
            raise BadImageError(self.describe(index), e.reason) from e
        except Exception as e:  # any failure to read or decode this one untrusted file
            raise BadImageError(self.describe(index), f"{type(e).__name__}: {e}") from e

    def get(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.decode(index)
        return _preprocess(image, self.size, self.resize), label

    def get_original(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.decode(index)
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)), label


def to_rgb8(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image`, scaled correctly from 16-bit integer (/257) and float ([0, 1]
    -> *255) modes, which PIL's ``convert("RGB")`` would saturate or truncate. BadImageError for
    float images outside [0, 1] (their scale is unknown)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        data = np.asarray(image).astype(np.float64)
        if mode == "I" and (data.min() < 0 or data.max() > 65535):
            raise BadImageError(
                "", f"32-bit integer image with values {data.min():g}..{data.max():g}: unknown scale"
            )
        gray = np.clip(np.round(data / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        data = np.asarray(image).astype(np.float64)
        if not np.isfinite(data).all():
            raise BadImageError("", "float image with NaN or infinite values")
        lo, hi = float(data.min()), float(data.max())
        if lo < 0.0 or hi > 1.0:
            raise BadImageError("", f"float image with values {lo:g}..{hi:g}, not in [0, 1]: unknown scale")
        gray = np.clip(np.round(data * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGB;16", "RGBA;16", "RGB;16B"):  # rare 16-bit colour modes some plugins report
        raise BadImageError("", f"16-bit colour mode {mode} is not supported")
    return image.convert("RGB")


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _is_image(parts: list[str]) -> bool:
    """An image file not inside a hidden folder, by extension."""
    return (
        not any(p.startswith(".") for p in parts)
        and posixpath.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS
    )


def _open_folder(spec: str, location: str, size: int, resize: int) -> FileDataset:
    """``PATH/<class>/.../<image>`` (classes sorted) or a flat folder of images (label -1).

    When class folders exist, images directly under PATH are ignored (as torchvision's ImageFolder does).
    """
    try:
        fs, root = fsspec.core.url_to_fs(location)
        if not fs.isdir(root):
            raise DataError(f"{spec}: no such folder")
        root = root.rstrip("/")
        infos = fs.find(root, detail=True)
        rel = {p: p[len(root) + 1 :].split("/") for p in infos}
    except (OSError, ValueError) as e:
        raise DataError(f"{spec}: cannot list folder ({type(e).__name__}: {e})") from e
    paths = sorted(p for p, parts in rel.items() if _is_image(parts))
    nested = [p for p in paths if len(rel[p]) > 1]
    if nested:
        class_names = sorted({rel[p][0] for p in nested})
        index = {name: i for i, name in enumerate(class_names)}
        files = [(p, index[rel[p][0]]) for p in nested]
    else:
        class_names, files = [], [(p, -1) for p in paths]
    if not files:
        raise DataError(f"{spec}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder")
    ds = FileDataset(spec, size, resize, fs, files, class_names)
    ds.fingerprint = files_fingerprint([(rel_path(p, root), infos[p]) for p, _ in files])
    return ds


def rel_path(path: str, root: str) -> str:
    return path[len(root) + 1 :] if path.startswith(root + "/") else path


def files_fingerprint(entries: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Digest of a file list: relative path, size and version (ETag on object stores, mtime on disk)
    of each file, in order. Cheap (one listing, no reads): an image replaced, added or removed
    changes it."""
    h = hashlib.sha256()
    for rel, info in entries:
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
        if hasattr(version, "isoformat"):
            version = version.isoformat()
        h.update(f"{rel}\t{info.get('size')}\t{version}\n".encode())
    return "files:" + h.hexdigest()[:16]


def _open_imagenette(spec: str, split: str, size: int, resize: int) -> FileDataset:
    """Imagenette (full size) under $RFATLAS_DATA_DIR or ~/.cache/rfatlas; downloads unless RFATLAS_OFFLINE."""
    from torchvision.datasets import Imagenette

    root = Path(os.environ.get("RFATLAS_DATA_DIR") or Path.home() / ".cache" / "rfatlas")
    offline = os.environ.get("RFATLAS_OFFLINE", "") not in ("", "0")
    try:
        ds = Imagenette(str(root), split=split, download=not offline)
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError, ... when offline or corrupt
        hint = (
            "download disabled by RFATLAS_OFFLINE" if offline else f"download failed: {type(e).__name__}: {e}"
        )
        raise DataError(f"{spec}: Imagenette not found under {root} ({' '.join(hint.split())})") from e
    files = [(str(p), int(label)) for p, label in ds._samples]
    if not files:
        raise DataError(f"{spec}: no images under {root}")
    fs = fsspec.filesystem("file")
    out = FileDataset(spec, size, resize, fs, files, [names[0] for names in ds.classes])
    entries = []
    for p, _ in files:
        st = os.stat(p)
        entries.append((os.path.relpath(p, root), {"size": st.st_size, "mtime": st.st_mtime_ns}))
    out.fingerprint = files_fingerprint(entries)
    return out


# ---------------------------------------------------------------------------------------------- zarr


class ZarrDataset(ImageDataset):
    """Images ingested by :func:`ingest`; reads one chunk at a time and keeps the last one."""

    def __init__(self, spec: str, url: str, size: int, resize: int | None) -> None:
        self.url = url
        group = self._open_group()
        attrs: dict[str, Any] = group.attrs.asdict()
        if attrs.get("format") != ZARR_FORMAT:
            raise DataError(f"{spec}: not a complete rfatlas image store (missing format={ZARR_FORMAT!r})")
        stored_size, stored_resize = int(attrs["size"]), int(attrs["resize"])
        if size != stored_size or (resize is not None and resize != stored_resize):
            raise DataError(
                f"{spec}: holds images preprocessed at size {stored_size} (resize {stored_resize}), "
                f"not size {size} (resize {resize or size}); ingest again with those settings"
            )
        super().__init__(spec, size, stored_resize, list(attrs["class_names"]))
        self.source = str(attrs["spec"])
        self._labels = np.asarray(self._array(group, "labels")[:], dtype=np.int64)
        self._valid = np.asarray(self._array(group, "valid")[:], dtype=bool)
        self._bad = {int(s["index"]): (str(s["path"]), str(s["reason"])) for s in attrs.get("skipped", [])}
        self.fingerprint = "zarr:" + str(attrs.get("digest") or _digest_json(attrs))
        self._images: zarr.Array[Any] | None = None
        self._block: tuple[int, np.ndarray] | None = None

    def _open_group(self) -> zarr.Group:
        try:
            return zarr.open_group(self.url, mode="r")
        except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError) as e:
            raise DataError(f"zarr:{self.url}: cannot open image store ({type(e).__name__}: {e})") from e

    def _array(self, group: zarr.Group, name: str) -> zarr.Array[Any]:
        array = group.get(name)
        if not isinstance(array, zarr.Array):
            raise DataError(f"zarr:{self.url}: image store has no {name!r} array")
        return array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None, "_block": None}

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def get(self, index: int) -> tuple[np.ndarray, int]:
        index = self._check_index(index)
        if not self._valid[index]:
            path, reason = self._bad.get(index, (self.describe(index), "not ingested"))
            raise BadImageError(path, reason)
        if self._images is None:
            self._images = self._array(self._open_group(), "images")
        chunk = int(self._images.chunks[0])
        block = self._block
        if block is None or block[0] != index // chunk:
            start = index // chunk * chunk
            block = (index // chunk, np.asarray(self._images[start : start + chunk]))
            self._block = block
        return block[1][index % chunk].copy(), int(self._labels[index])


def _digest_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- labels

#: Imagenette's classes (WordNet id, first name) and their ImageNet-1k class indices.
IMAGENETTE_TO_IMAGENET: dict[str, int] = {
    "n01440764": 0,  # tench
    "n02102040": 217,  # English springer
    "n02979186": 482,  # cassette player
    "n03000684": 491,  # chain saw
    "n03028079": 497,  # church
    "n03394916": 566,  # French horn
    "n03417042": 569,  # garbage truck
    "n03425413": 571,  # gas pump
    "n03445777": 574,  # golf ball
    "n03888605": 701,  # parachute
}
_IMAGENETTE_NAMES = {
    "tench": 0,
    "English springer": 217,
    "cassette player": 482,
    "chain saw": 491,
    "church": 497,
    "French horn": 566,
    "garbage truck": 569,
    "gas pump": 571,
    "golf ball": 574,
    "parachute": 701,
}


def _stored_labels(ds: ImageDataset) -> np.ndarray | None:
    """Every label the dataset holds, when known without decoding images (files, ingested stores)."""
    if isinstance(ds, FileDataset):
        return np.asarray([label for _, label in ds.files], dtype=np.int64)
    if isinstance(ds, ZarrDataset):
        return np.asarray(ds._labels[ds._valid], dtype=np.int64)
    return None


def model_label_lut(ds: ImageDataset, num_classes: int) -> np.ndarray | None:
    """Dataset label -> model class index, or None when the labels are the model's own classes.

    Imagenette's 10 classes (by WordNet id or name) map to their ImageNet indices for a 1000-class
    model. DataError when the data has no labels, labels outside the model's classes, or another
    number of classes than the model (its labels would name other classes)."""
    names = list(ds.class_names)
    if not names:
        raise DataError(
            f"{ds.spec} has no class labels (a flat folder of images?); this analysis needs labels"
        )
    if num_classes == 1000 and len(names) == 10:
        mapped = [IMAGENETTE_TO_IMAGENET.get(n, _IMAGENETTE_NAMES.get(n)) for n in names]
        if all(m is not None for m in mapped):
            return np.asarray(mapped, dtype=np.int64)
    if len(names) != num_classes:
        raise DataError(
            f"{ds.spec} has {len(names)} classes but the model has {num_classes}: its labels are not the "
            "model's classes (only Imagenette maps onto ImageNet's 1000); use data labelled like the model"
        )
    labels = _stored_labels(ds)
    if labels is not None and labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{ds.spec} has labels {lo}..{hi}, outside the model's classes 0..{num_classes - 1}"
            )
    return None


def check_run_labels(run: Mapping[str, Any]) -> None:
    """Before an analysis that needs labels (noise) starts: DataError unless the labels of the
    atlas's data (`run` attrs) can be its model's classes (see `model_label_lut`)."""
    if not run.get("num_classes"):
        return
    pre = run.get("preprocessing") or {}
    ds = open_dataset(str(run["dataset"]), size=int(run["image_size"]), resize=pre.get("resize"))
    model_label_lut(ds, int(run["num_classes"]))


def check_data_matches(ds: ImageDataset, run: Mapping[str, Any]) -> None:
    """DataError when the data changed since the atlas (`run` attrs) was made: its fingerprint differs."""
    want = run.get("data_fingerprint")
    if want is not None and ds.fingerprint != want:
        raise DataError(
            f"the data {ds.spec} changed since the atlas was made (fingerprint {ds.fingerprint}, not "
            f"{want}): files were added, removed or replaced; sweep it into another --out"
        )


# ---------------------------------------------------------------------------------------------- open


def _parse_count(spec: str, text: str | None, default: int) -> int:
    if text is None:
        return default
    try:
        n = int(text)
    except ValueError:
        raise DataError(
            f"bad image count in {spec!r}: expected an integer, e.g. synthetic:{default}"
        ) from None
    if n < 0:
        raise DataError(f"bad image count in {spec!r}: must be >= 0")
    return n


def open_dataset(spec: str, *, size: int, resize: int | None = None) -> ImageDataset:
    """Open a dataset spec (see module doc); DataError if the spec is bad or the data missing or empty."""
    requested, resize = resize, size if resize is None else resize
    if size <= 0 or resize < size:
        raise DataError(f"bad preprocessing: size {size}, resize {resize} (need 0 < size <= resize)")
    kind, sep, arg = spec.partition(":")
    if kind in ("synthetic", "synthetic-train"):
        n = _parse_count(spec, arg if sep else None, 2000 if kind == "synthetic" else 10000)
        if n == 0:
            raise DataError(f"{spec}: empty dataset (0 images)")
        from rfcore.synthetic import SyntheticDataset

        return SyntheticDataset(kind, n, size, resize)
    if kind == "imagefolder" and arg:
        return _open_folder(spec, arg, size, resize)
    if kind == "imagenette" and arg in ("", "val", "train"):
        return _open_imagenette(spec, arg or "val", size, resize)
    if kind == "zarr" and arg:
        return ZarrDataset(spec, arg, size, requested)
    guess = difflib.get_close_matches(kind.strip("[]"), _SPEC_KINDS, n=1, cutoff=0.6)
    fixed = f"{guess[0]}{sep}{arg.strip('[]')}" if guess else spec
    hint = f" (did you mean {fixed!r}?)" if fixed != spec else ""
    raise DataError(f"unknown dataset spec {spec!r}{hint}; valid forms: {_SPEC_FORMS}")


# ---------------------------------------------------------------------------------------------- batches


def shard_ranges(n: int, shard_size: int) -> list[range]:
    """``range(0, n)`` cut into consecutive ranges of ``shard_size`` (the last may be shorter)."""
    if n < 0 or shard_size <= 0:
        raise DataError(f"bad sharding: {n} images in shards of {shard_size} (need n >= 0, shard size > 0)")
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def _index_chunks(indices: range, batch_size: int) -> list[range]:
    if batch_size <= 0:
        raise DataError(f"bad batch size {batch_size}: must be > 0")
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


_Item = tuple[np.ndarray, int, int] | SkippedImage


class _Items(Dataset[_Item]):
    """Map-style view for DataLoader: index -> (image, label, index), or SkippedImage if unreadable."""

    def __init__(self, ds: ImageDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> _Item:
        try:
            image, label = self.ds.get(index)
        except BadImageError as e:
            return SkippedImage(int(index), e.path, e.reason)
        lut = self.ds.label_lut
        if lut is not None and 0 <= label < len(lut):
            label = int(lut[label])
        return image, label, int(index)


class _Collate:
    """Stack the readable items of one index chunk into a Batch; list the others as skipped."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, items: Sequence[_Item]) -> Batch:
        good = [it for it in items if not isinstance(it, SkippedImage)]
        skipped = [it for it in items if isinstance(it, SkippedImage)]
        if good:
            images = torch.from_numpy(np.stack([it[0] for it in good]))
        else:
            images = torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)
        labels = torch.tensor([it[1] for it in good], dtype=torch.int64)
        indices = torch.tensor([it[2] for it in good], dtype=torch.int64)
        return Batch(images, labels, indices, skipped)


def loader_context() -> BaseContext:
    """Start method for DataLoader workers: forkserver (spawn where missing), never a plain fork.

    Forking a process that runs Prefect or Dask copies their threads' locks and exit hooks, and a
    forked worker then dies at exit; forkserver workers fork from a clean server that has already
    imported this module, so they start fast.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def iter_batches(
    ds: ImageDataset,
    indices: range,
    batch_size: int,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch: int = 0,
    decode_threads: int = 1,
) -> Iterator[Batch]:
    """Batches of consecutive ``batch_size``-index chunks of ``indices``, in order.

    Unreadable images are left out of their chunk's batch (which may then be empty) and listed in
    ``Batch.skipped``, so batch composition depends only on ``indices`` and ``batch_size``. With
    ``num_workers > 0`` a DataLoader decodes ahead in worker processes; with ``num_workers == 0`` and
    ``prefetch > 0`` one background thread decodes up to ``prefetch`` batches ahead (decoding, NumPy and
    PIL release the GIL, so it overlaps the forward pass); with neither, ``decode_threads`` threads
    decode each batch when it is asked for; ``pin_memory`` applies with CUDA.
    """
    yield from iter_chunk_batches(
        ds,
        _index_chunks(indices, batch_size),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch=prefetch,
        decode_threads=decode_threads,
    )


def iter_chunk_batches(
    ds: ImageDataset,
    chunks: Sequence[range],
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch: int = 0,
    decode_threads: int = 1,
) -> Generator[Batch, None, None]:
    """One Batch per index chunk, in order (as `iter_batches`, for chunks cut by the caller: e.g. the
    batches of several shards in one stream, so decoding runs ahead across shard boundaries).
    Without workers or prefetch, `decode_threads` threads decode each batch when it is asked for."""
    chunks = list(chunks)
    pin = pin_memory and torch.cuda.is_available()
    items, collate = _Items(ds), _Collate(ds.size)
    if num_workers == 0 and prefetch > 0 and len(chunks) > 1:
        yield from _prefetched(chunks, items, collate, pin, prefetch)
        return
    if num_workers > 0:
        loader = DataLoader(
            items,
            batch_sampler=[list(c) for c in chunks],
            collate_fn=collate,
            num_workers=num_workers,
            multiprocessing_context=loader_context(),
            pin_memory=pin,
        )
        yield from loader
        return
    if decode_threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(decode_threads, thread_name_prefix="rfatlas-decode") as pool:
            for chunk in chunks:
                batch = collate(list(pool.map(items.__getitem__, chunk)))
                yield batch.pin_memory() if pin else batch
        return
    for chunk in chunks:
        batch = collate([items[i] for i in chunk])
        yield batch.pin_memory() if pin else batch


def _prefetched(
    chunks: list[range], items: _Items, collate: _Collate, pin: bool, depth: int
) -> Iterator[Batch]:
    """Batches of `chunks` made by one daemon thread, at most `depth` ahead; errors re-raised here,
    in order. Stops the thread when the consumer stops early."""
    import queue
    import threading

    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                batch = collate([items[i] for i in chunk])
                if not put(("batch", batch.pin_memory() if pin else batch)):
                    return
        except BaseException as e:  # handed to the consumer
            put(("error", e))
            return
        put(("end", None))

    thread = threading.Thread(target=produce, name="rfatlas-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "batch":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        thread.join(timeout=5.0)


# ---------------------------------------------------------------------------------------------- ingest


def _check_ingest_target(spec: str, url: str) -> None:
    """DataError unless ``url`` is absent, empty, or an image store ingested from ``spec``."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        path = path.rstrip("/")
        if not fs.exists(path):
            return
        if not fs.isdir(path):
            raise DataError(f"ingest target {url} is a file; give a new or empty folder")
        entries = [
            e for e in fs.ls(path, detail=False) if not posixpath.basename(e.rstrip("/")).startswith(".")
        ]
        if not entries:
            return
        try:
            meta = json.loads(fs.cat_file(f"{path}/zarr.json"))
        except (FileNotFoundError, ValueError):
            meta = {}
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"cannot check ingest target {url} ({type(e).__name__}: {e})") from e
    attrs = meta.get("attributes") or {} if isinstance(meta, dict) else {}
    made_from = attrs.get("spec") if attrs.get("format") == ZARR_FORMAT else attrs.get("ingest_spec")
    if made_from is None:
        raise DataError(
            f"ingest target {url} is not empty and not an rfatlas image store; refusing to overwrite it "
            "(give a new or empty folder)"
        )
    if made_from != spec:
        raise DataError(
            f"ingest target {url} holds images ingested from {made_from!r}, not {spec!r}; "
            "refusing to overwrite it (give another folder)"
        )


def ingest(
    spec: str,
    url: str,
    *,
    size: int,
    resize: int | None = None,
    progress: bool = True,
    num_workers: int = 0,
) -> IngestResult:
    """Decode and preprocess ``spec`` once into a chunked uint8 Zarr group at ``url``.

    ``url`` must be absent, empty, or an image store ingested from the same ``spec`` (then it is
    overwritten); anything else is refused with DataError before anything is written.

    Layout: ``images`` (image, color, y, x) uint8, ``labels`` (image,) int64, ``valid`` (image,) bool;
    attrs ``format``, ``spec``, ``size``, ``resize``, ``class_names``, ``skipped``. Unreadable images
    keep their index (zero pixels, label -1, valid False) and are listed in ``skipped``. Read it back
    with ``open_dataset("zarr:" + url, size=size, resize=resize)``. The ``digest`` attr (sha256 of
    the pixels, labels and settings) is the store's content fingerprint.
    """
    from tqdm.auto import tqdm

    ds = open_dataset(spec, size=size, resize=resize)
    _check_ingest_target(spec, url)
    n, s = len(ds), ds.size
    chunk = max(1, min(512, _CHUNK_BYTES // (3 * s * s)))
    try:
        root = zarr.open_group(url, mode="w", attributes={"ingest_spec": spec})
    except (OSError, ValueError, zarr.errors.BaseZarrError) as e:
        raise DataError(f"cannot write image store {url} ({type(e).__name__}: {e})") from e
    digest = hashlib.sha256(json.dumps([spec, s, ds.resize, ds.class_names]).encode())
    images = root.create_array(
        "images", shape=(n, 3, s, s), chunks=(chunk, 3, s, s), dtype="uint8", fill_value=0,
        dimension_names=("image", "color", "y", "x"),
    )  # fmt: skip
    labels = root.create_array(
        "labels", shape=(n,), chunks=(n,), dtype="int64", fill_value=-1, dimension_names=("image",)
    )
    valid = root.create_array(
        "valid", shape=(n,), chunks=(n,), dtype="bool", fill_value=False, dimension_names=("image",)
    )
    all_labels = np.full(n, -1, dtype=np.int64)
    all_valid = np.zeros(n, dtype=bool)
    skipped: list[SkippedImage] = []
    ranges = shard_ranges(n, chunk)
    batches = iter_batches(ds, range(n), chunk, num_workers=num_workers)
    with tqdm(total=n, unit="img", desc=f"ingest {spec}", disable=not progress) as bar:
        for block_range, batch in zip(ranges, batches, strict=True):
            block = np.zeros((len(block_range), 3, s, s), dtype=np.uint8)
            rows = batch.indices.numpy() - block_range.start
            block[rows] = batch.images.numpy()
            images[block_range.start : block_range.stop] = block
            digest.update(block.tobytes())
            all_labels[batch.indices.numpy()] = batch.labels.numpy()
            all_valid[batch.indices.numpy()] = True
            skipped.extend(batch.skipped)
            bar.update(len(block_range))
    labels[:] = all_labels
    valid[:] = all_valid
    digest.update(all_labels.tobytes())
    digest.update(all_valid.tobytes())
    root.attrs.update(
        {
            "format": ZARR_FORMAT,
            "digest": digest.hexdigest()[:16],
            "spec": spec,
            "size": s,
            "resize": ds.resize,
            "class_names": ds.class_names,
            "skipped": [{"index": k.index, "path": k.path, "reason": k.reason} for k in skipped],
        }
    )
    return IngestResult(url, n, skipped)
