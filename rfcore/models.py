"""Model registry: torchvision CNNs, their skip-less PlainNet twins, and tiny test/demo models.

Every model comes back in eval mode with ``model.rfatlas_meta`` (a :class:`ModelMeta`) attached, so the
preprocessing that fits its weights travels with it. Weights are random (seeded), a torchvision weights
name, or an rfatlas checkpoint / bare state_dict at any fsspec URL, always loaded with
``weights_only=True`` so a checkpoint can never run code.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import os
import pickle
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torchvision
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

from rfcore.errors import CheckpointError, RfatlasError, UnknownModelError

_INIT_LOCK = threading.Lock()
CHECKPOINT_FORMAT = "rfatlas-checkpoint-v1"

# A torchvision weights enum member name ("IMAGENET1K_V1", "DEFAULT"); anything else is a path or URL.
_WEIGHTS_NAME = re.compile(r"[A-Z][A-Z0-9_]*")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_WIDTHS = (16, 32, 64, 128)


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a model: resize + centre crop to ``size``, then mean/std in [0,1] units."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def normalize(self, images: Tensor) -> Tensor:
        """Map uint8 ``(B, 3, S, S)`` images to the model's float32 input, on the images' device."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise RfatlasError(
                f"normalize expects uint8 images of shape (B, 3, S, S), got {images.dtype} {tuple(images.shape)}"
            )
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        return (images.to(torch.float32) / 255.0 - mean) / std


IMAGENET_PREPROCESSING = Preprocessing(size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
TINY_PREPROCESSING = Preprocessing(size=64, resize=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@dataclass(frozen=True)
class ModelMeta:
    """What a model is: registry name, weights it was loaded with, head size, family, preprocessing."""

    name: str
    weights: str | None
    num_classes: int
    family: str  # 'resnet' | 'plainnet' | 'vgg' | 'alexnet'
    preprocessing: Preprocessing
    weights_digest: str | None = None  # checkpoints: sha256 of the file's bytes (first 16 hex digits)
    weights_version: str | None = None  # torchvision: resolved member and file (DEFAULT -> IMAGENET1K_V2:...)


class PlainBasicBlock(BasicBlock):  # type: ignore[misc]  # torchvision ships no type information
    """torchvision's BasicBlock with the skip connection removed: ``relu(bn2(conv2(relu(bn1(conv1(x))))))``.

    The down-sampling projection (``downsample``, a strided 1x1 conv + BN on the skip path) is dropped
    together with its skip, since there is nothing left to project: the main branch's strided ``conv1``
    does the down-sampling. Module names of the main branch stay identical to torchvision's.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        del downsample  # built by ResNet._make_layer for the skip path, which a PlainNet does not have
        super().__init__(inplanes, planes, stride, None, groups, base_width, dilation, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out)  # type: ignore[no-any-return]


class TinyResNet(ResNet):  # type: ignore[misc]  # torchvision ships no type information
    """A ResNet with one block per stage and narrow widths (~310k parameters), for tests and the demo.

    Same stem (7x7/2 conv, 3x3/2 max-pool), module names and forward as torchvision's ResNet, built with
    its ``_make_layer``; only the widths and the block counts differ. Meant for 64 px inputs.
    """

    def __init__(self, block: type[BasicBlock], num_classes: int, widths: tuple[int, int, int, int]) -> None:
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes the ImageNet widths
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], 1)
        self.layer2 = self._make_layer(block, widths[1], 1, stride=2)
        self.layer3 = self._make_layer(block, widths[2], 1, stride=2)
        self.layer4 = self._make_layer(block, widths[3], 1, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


@dataclass(frozen=True)
class _Entry:
    family: str
    build: Callable[[int], nn.Module]  # num_classes -> randomly initialised model
    num_classes: int
    preprocessing: Preprocessing
    torchvision_name: str | None  # has torchvision weights under this name


def _torchvision(name: str, family: str) -> _Entry:
    return _Entry(
        family=family,
        build=lambda n: torchvision.models.get_model(name, weights=None, num_classes=n),
        num_classes=1000,
        preprocessing=IMAGENET_PREPROCESSING,
        torchvision_name=name,
    )


def _plainnet(layers: list[int]) -> _Entry:
    return _Entry(
        "plainnet",
        lambda n: ResNet(PlainBasicBlock, layers, num_classes=n),
        1000,
        IMAGENET_PREPROCESSING,
        None,
    )


def _tiny(block: type[BasicBlock], family: str) -> _Entry:
    return _Entry(family, lambda n: TinyResNet(block, n, TINY_WIDTHS), 10, TINY_PREPROCESSING, None)


_REGISTRY: dict[str, _Entry] = {
    "resnet18": _torchvision("resnet18", "resnet"),
    "resnet34": _torchvision("resnet34", "resnet"),
    "resnet50": _torchvision("resnet50", "resnet"),
    "vgg16": _torchvision("vgg16", "vgg"),
    "vgg16_bn": _torchvision("vgg16_bn", "vgg"),
    "alexnet": _torchvision("alexnet", "alexnet"),
    "plainnet18": _plainnet([2, 2, 2, 2]),
    "plainnet34": _plainnet([3, 4, 6, 3]),
    "resnet10t": _tiny(BasicBlock, "resnet"),
    "plainnet10t": _tiny(PlainBasicBlock, "plainnet"),
}

# The classifier weight whose first dimension is the number of classes, per family.
_HEAD_KEY = {
    "resnet": "fc.weight",
    "plainnet": "fc.weight",
    "vgg": "classifier.6.weight",
    "alexnet": "classifier.6.weight",
}


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`."""
    return list(_REGISTRY)


def default_preprocessing(name: str) -> Preprocessing:
    """Preprocessing of registry model ``name`` with random or checkpoint weights, without building it."""
    return _entry(name).preprocessing


def _entry(name: str) -> _Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownModelError(f"unknown model {name!r}{hint} (known: {', '.join(_REGISTRY)})")


def get_model(
    name: str, *, weights: str | None = None, num_classes: int | None = None, seed: int = 0
) -> nn.Module:
    """Build registry model ``name`` in eval mode with ``rfatlas_meta`` attached.

    ``weights``: None (random init from ``seed``, global RNG untouched), a torchvision weights name
    (``"IMAGENET1K_V1"``, ``"DEFAULT"``: any all-caps identifier; downloads where online), or else a
    checkpoint path / fsspec URL (rfatlas checkpoint or bare state_dict; ``num_classes`` then defaults
    to the checkpoint's).
    """
    entry = _entry(name)
    if num_classes is not None and num_classes < 1:
        raise RfatlasError(f"num_classes must be positive, got {num_classes}")
    # Random init draws from torch's global RNG: the lock keeps concurrent builds (task threads)
    # from interleaving their draws, fork_rng keeps the caller's RNG state untouched.
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if weights is None:
            model = entry.build(num_classes or entry.num_classes)
            meta = ModelMeta(name, None, num_classes or entry.num_classes, entry.family, entry.preprocessing)
        elif _WEIGHTS_NAME.fullmatch(weights):
            model, meta = _load_torchvision(name, entry, weights, num_classes)
        else:
            model, meta = _load_checkpoint(name, entry, weights, num_classes)
    model.eval()
    model.rfatlas_meta = meta  # type: ignore[assignment]  # a plain attribute; the stub only types tensors/modules
    return model


def model_meta(model: nn.Module) -> ModelMeta:
    """The :class:`ModelMeta` that :func:`get_model` attached to ``model``."""
    meta = getattr(model, "rfatlas_meta", None)
    if not isinstance(meta, ModelMeta):
        raise UnknownModelError(
            f"{type(model).__name__} has no rfatlas metadata; build it with rfcore.models.get_model"
        )
    return meta


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _load_torchvision(
    name: str, entry: _Entry, weights: str, num_classes: int | None
) -> tuple[nn.Module, ModelMeta]:
    if entry.torchvision_name is None:
        raise CheckpointError(
            f"{name} has no torchvision weights {weights!r}; pass a checkpoint path or URL instead"
        )
    enum = torchvision.models.get_model_weights(entry.torchvision_name)
    try:
        member = enum[weights]
    except KeyError:
        known = ", ".join([m.name for m in enum] + ["DEFAULT"])
        raise CheckpointError(
            f"unknown torchvision weights {weights!r} for {name} (known: {known})"
        ) from None
    classes = len(member.meta["categories"])
    if num_classes is not None and num_classes != classes:
        raise CheckpointError(
            f"{name} weights {member.name} have {classes} classes, not num_classes={num_classes}"
        )
    try:
        model = torchvision.models.get_model(entry.torchvision_name, weights=member)
    except Exception as exc:  # download / cache / hash failures come in many types
        raise CheckpointError(
            f"cannot load torchvision weights {name} {member.name} ({_one_line(exc)})"
        ) from exc
    tf = member.transforms()
    pre = Preprocessing(
        size=int(tf.crop_size[0]),
        resize=int(tf.resize_size[0]),
        mean=(float(tf.mean[0]), float(tf.mean[1]), float(tf.mean[2])),
        std=(float(tf.std[0]), float(tf.std[1]), float(tf.std[2])),
    )
    version = f"{member.name}:{str(member.url).rsplit('/', 1)[-1]}"  # the file name carries its hash
    return model, ModelMeta(name, member.name, classes, entry.family, pre, weights_version=version)


def _read_checkpoint(url: str) -> tuple[Any, str]:
    """Fetch and unpickle ``url`` with the weights-only unpickler (anything that would run code is
    refused); returns the object and the digest of the bytes read."""
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {url}") from None
    except Exception as exc:  # fsspec backends raise backend-specific errors
        raise CheckpointError(f"cannot read checkpoint {url} ({_one_line(exc)})") from exc
    digest = hashlib.sha256(data).hexdigest()[:16]
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), digest
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_refusal(url, data, exc)) from None
    except Exception as exc:  # truncated files, non-torch files, ...
        raise CheckpointError(f"{url} is not a readable torch checkpoint ({_one_line(exc)})") from None


_CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"})
_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"\x1f\x8b": "a gzip file",
    b"\x93NUMPY": "a numpy .npy file",
    b"{": "JSON text",
}


def _refusal(url: str, data: bytes, exc: BaseException) -> str:
    """Why the weights-only unpickler refused `data`: a file that could run code (a pickle with
    globals), or no checkpoint at all (an image, text, ...): said as such, not as a security risk."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "")
    is_zip = data[:4] == b"PK\x03\x04"
    is_pickle = len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5
    if is_zip and "global" in detail.lower():
        return (
            f"refusing checkpoint {url}: it holds more than plain weights and could run code ({detail[:160]})"
        )
    if is_pickle:
        import pickletools

        names: set[str] = set()
        with contextlib.suppress(Exception):
            names = {op.name for op, _, _ in pickletools.genops(data)}
        if names & _CODE_OPCODES:
            return f"refusing checkpoint {url}: it holds more than plain weights and could run code ({detail[:160]})"
    if not (is_zip or is_pickle):
        what = next((w for m, w in _MAGIC.items() if data.startswith(m)), None)
        if what is None:
            what = "text" if data[:64].isascii() and data[:64].strip() else "not a pickle"
        return (
            f"{url} is not a torch checkpoint ({what}, {len(data)} bytes): give a file written by torch.save"
        )
    return f"{url} is not a readable torch checkpoint ({detail[:160] or _one_line(exc)})"


def weights_stamp(weights: str | None) -> str | None:
    """A cheap version stamp of a checkpoint file (size + mtime/inode locally, ETag on object
    stores; no download), None for random or torchvision weights. Caches use it to notice that a
    checkpoint was overwritten without reading it again."""
    if weights is None or _WEIGHTS_NAME.fullmatch(weights):
        return None
    try:
        fs, path = fsspec.core.url_to_fs(weights)
        if isinstance(fs, LocalFileSystem):
            st = os.stat(path)
            return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        fs.invalidate_cache(path)
        info = fs.info(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {weights}") from None
    except Exception as exc:  # fsspec backends raise backend-specific errors
        raise CheckpointError(f"cannot read checkpoint {weights} ({_one_line(exc)})") from exc
    tag = (
        info.get("ETag")
        or info.get("etag")
        or info.get("md5Hash")
        or info.get("mtime")
        or info.get("LastModified")
    )
    return f"{info.get('size')}:{tag}"


def check_model_matches(model: nn.Module, run: Mapping[str, Any]) -> None:
    """CheckpointError unless `model` has the weights the atlas `run` attrs were made with (checkpoint
    digest, torchvision weights version): a checkpoint overwritten since would mix two models."""
    meta = model_meta(model)
    want, have = run.get("weights_digest"), meta.weights_digest
    if want is not None and have != want:
        raise CheckpointError(
            f"the weights {run.get('weights')} changed since the atlas was made (digest {have}, "
            f"not {want}); write the new checkpoint to a new atlas (e.g. --out '...{{weights_digest}}...')"
        )
    want_v = run.get("weights_version")
    if want_v is not None and meta.weights_version != want_v:
        raise CheckpointError(
            f"weights {run.get('weights')} resolve to {meta.weights_version}, but the atlas was made "
            f"with {want_v}; use another --out"
        )


def _few(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _load_checkpoint(
    name: str, entry: _Entry, url: str, num_classes: int | None
) -> tuple[nn.Module, ModelMeta]:
    obj, digest = _read_checkpoint(url)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("model") != name:
            raise CheckpointError(f"checkpoint {url} is for model {obj.get('model')!r}, not {name!r}")
        state = obj.get("state_dict")
        saved_classes: int | None = int(obj["num_classes"])
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        state = obj
        head = obj.get(_HEAD_KEY[entry.family])
        saved_classes = int(head.shape[0]) if isinstance(head, Tensor) and head.ndim == 2 else None
    else:
        raise CheckpointError(f"{url} is neither an {CHECKPOINT_FORMAT} checkpoint nor a state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {url} has no state_dict")
    if num_classes is not None and saved_classes is not None and num_classes != saved_classes:
        raise CheckpointError(f"checkpoint {url} has {saved_classes} classes, not num_classes={num_classes}")
    classes = num_classes or saved_classes or entry.num_classes
    model = entry.build(classes)
    _check_state_dict(model, state, f"checkpoint {url} does not fit {name}")
    model.load_state_dict(state)
    return model, ModelMeta(name, url, classes, entry.family, entry.preprocessing, digest)


def _check_state_dict(model: nn.Module, state: Mapping[str, Any], what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [
            f"missing keys {_few(missing)}" if missing else "",
            f"unexpected keys {_few(unexpected)}" if unexpected else "",
        ]
        raise CheckpointError(f"{what}: " + "; ".join(p for p in parts if p))
    bad = [
        f"{k} {tuple(state[k].shape) if isinstance(state[k], Tensor) else type(state[k]).__name__} "
        f"vs {tuple(v.shape)}"
        for k, v in expected.items()
        if not isinstance(state[k], Tensor) or state[k].shape != v.shape
    ]
    if bad:
        raise CheckpointError(f"{what}: shape mismatch (checkpoint vs model) {_few(bad, 3)}")


def _check_plain(value: Any, where: str) -> None:
    """Refuse values the weights-only unpickler could not load back (so a saved checkpoint always reloads)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(v, where)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where} keys must be strings, got {k!r}")
            _check_plain(v, f"{where}.{k}")
        return
    raise CheckpointError(
        f"{where} must hold only str/int/float/bool/None/list/dict values, got {type(value).__name__}"
    )


def save_checkpoint(model: nn.Module, url: str, *, config: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Write an ``rfatlas-checkpoint-v1`` file (CPU state_dict + config + metrics) to any fsspec URL,
    atomically (temp file + rename on local disk; a single PUT on object stores)."""
    meta = model_meta(model)
    _check_plain(config, "config")
    _check_plain(metrics, "metrics")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": meta.name,
        "num_classes": meta.num_classes,
        "state_dict": {
            k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()
        },
        "config": config,
        "metrics": metrics,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if isinstance(fs, LocalFileSystem):
            # temp name + rename: a reader (or a crash) never sees a half-written checkpoint
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(buf.getvalue())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:  # object stores: one PUT (or one multipart upload) appears whole or not at all
            fs.pipe_file(path, buf.getvalue())
    except Exception as exc:  # fsspec backends raise backend-specific errors
        raise CheckpointError(f"cannot write checkpoint {url} ({_one_line(exc)})") from exc


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; CUDA must actually be usable."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise RfatlasError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise RfatlasError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise RfatlasError(f"device {spec!r} requested but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise RfatlasError(f"device {spec!r} requested but only {count} CUDA device(s) exist")
    return device
