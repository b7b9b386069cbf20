"""Procedural image classes for the demo and the tests: deterministic, offline, and not trivially
separable, so trained models stay well below 100 % and architectures can differ.

Each image (seeded by split and index only) is built from:

* a 1/f ("pink") colour texture background (natural-image amplitude spectrum, random phases;
  luminance plus red-green and blue-yellow fields), random contrast;
* the class's *target*: an opponent-colour grating (`grating`) of the class's orientation, spatial
  frequency and colour axis, under a Gaussian envelope at a random position, random phase, contrast,
  ±7.5° orientation and ±10 % frequency jitter, sinusoid or square-wave edges;
* with probability `DISTRACTOR_P`, a *distractor*: the grating of another class (so it shares the
  orientation, the frequency or the colour axis of the target with many classes) of the same size,
  `DISTRACTOR_GAIN` times the target's contrast: usually weaker, sometimes stronger (those images
  are ambiguous: a ceiling below 100 % for any model);
* 2–5 occluding shapes (ellipses, rectangles) of flat random colours, which can hide part of the
  target;
* uniform pixel noise.

Rendered in float32, only over the crop, with separable gratings (`RENDER_VERSION` 2: 4.8 ms for
a 256 px render cropped to 224 on one core; version 1 drew Gaussian spectra, four texture fields and
Gaussian noise in float64 over the whole render: 17.8 ms). The version is the datasets' fingerprint,
so an atlas of version-1 images is never resumed with version-2 images.

Classes mix the cues: 0°/45°/90°/135° × (low frequency, red-green) and (high frequency, blue-yellow),
plus (0°, high, red-green) and (90°, low, blue-yellow), so no single cue identifies a class.
Labels are `index % 10` (no label noise).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from rfcore.data import ImageDataset


@dataclass(frozen=True)
class SyntheticClass:
    """Ground truth of one synthetic class.

    ``orientation``: angle of the bars in degrees, counter-clockwise from horizontal (the grating's wave
    vector is perpendicular to it); ``cycles``: grating periods per image side; ``colour``: the opponent
    axis the grating modulates ("red-green" or "blue-yellow").
    """

    name: str
    orientation: float
    cycles: float
    colour: str


_LOW, _HIGH = 3.0, 8.0
OPPONENT = {"red-green": (0.5, -0.5, 0.0), "blue-yellow": (0.35, 0.35, -0.5)}
SYNTHETIC_CLASSES: tuple[SyntheticClass, ...] = tuple(
    SyntheticClass(f"{o:g}deg-{'low' if c == _LOW else 'high'}sf-{col.replace('-', '')}", o, c, col)
    for o, c, col in (
        (0.0, _LOW, "red-green"),
        (45.0, _LOW, "red-green"),
        (90.0, _LOW, "red-green"),
        (135.0, _LOW, "red-green"),
        (0.0, _HIGH, "blue-yellow"),
        (45.0, _HIGH, "blue-yellow"),
        (90.0, _HIGH, "blue-yellow"),
        (135.0, _HIGH, "blue-yellow"),
        (0.0, _HIGH, "red-green"),
        (90.0, _LOW, "blue-yellow"),
    )
)
RENDER_VERSION = 2
SPLIT_SEEDS = {"synthetic": 0x5EED_0A1, "synthetic-train": 0x5EED_7A1}
DISTRACTOR_P = 0.8  # probability of a distractor grating
DISTRACTOR_GAIN = (0.55, 1.15)  # its contrast relative to the target's (> 1: ambiguous images)
OCCLUDERS = (2, 5)  # number of occluding shapes, inclusive


def grating(
    coords: tuple[np.ndarray, np.ndarray],
    *,
    orientation: float,
    cycles: float,
    colour: str,
    phase: float = 0.0,
    square: bool = False,
    centre: tuple[float, float] = (0.5, 0.5),
    sigma: float | None = None,
    amplitude: float = 1.0,
) -> np.ndarray:
    """(3, H, W) opponent-colour grating in [-amplitude, amplitude] · colour axis, in the dtype of
    ``coords``.

    ``coords`` = (x (1, W), y (H, 1)) in image-side units; bars at ``orientation`` degrees, ``cycles``
    periods per unit; ``square`` gives tanh-sharpened edges; ``sigma`` a Gaussian envelope around
    ``centre`` = (y, x) (None: none). Wave and envelope are separable: sines, cosines and
    exponentials of one row and one column, combined by outer products."""
    x, y = coords
    theta, k = float(np.deg2rad(orientation)), 2 * np.pi * float(cycles)
    ax, by = -k * np.sin(theta) * x, -k * np.cos(theta) * y + float(phase)
    wave = np.sin(ax) * np.cos(by)  # sin(ax + by)
    wave += np.cos(ax) * np.sin(by)
    if square:
        wave = np.tanh(3.0 * wave) / np.tanh(3.0)
    if sigma is not None:
        cy, cx, s2 = float(centre[0]), float(centre[1]), 2 * float(sigma) ** 2
        wave *= np.exp(-((y - cy) ** 2) / s2) * np.exp(-((x - cx) ** 2) / s2)
    axis = np.asarray(OPPONENT[colour], dtype=wave.dtype) * float(amplitude)
    out: np.ndarray = axis[:, None, None] * wave[None]
    return out


@lru_cache(maxsize=8)
def _pink_amplitude(resize: int, alpha: float) -> np.ndarray:
    f = np.hypot(np.fft.fftfreq(resize)[:, None], np.fft.rfftfreq(resize)[None, :])
    f[0, 0] = 1.0
    amp: np.ndarray = (f**-alpha).astype(np.float32)
    amp[0, 0] = 0.0
    amp.flags.writeable = False
    return amp


#: the 256 phases of the texture's spectrum (1.4° apart: indistinguishable from continuous ones)
_PHASES = np.exp(2j * np.pi * np.arange(256) / 256).astype(np.complex64)
#: luminance + two opponent fields -> R, G, B: unit chroma variance per channel, chroma summing to 0
_MIX = np.array(
    [[0.8, 0.45 * np.sqrt(3 / 4), 0.45 * np.sqrt(1 / 4)],
     [0.8, -0.45 * np.sqrt(3 / 4), 0.45 * np.sqrt(1 / 4)],
     [0.8, 0.0, -0.45]],
    dtype=np.float32,
)  # fmt: skip


def pink_noise(rng: np.random.Generator, resize: int, alpha: float = 1.0) -> np.ndarray:
    """(3, R, R) float32 texture with a 1/f^alpha amplitude spectrum and random phases
    (random-phase noise): a luminance field shared by the channels plus two colour-opponent fields
    (red-green, blue-yellow), each of unit std."""
    amp = _pink_amplitude(resize, alpha)
    spec = _PHASES[rng.integers(0, 256, size=(3, *amp.shape), dtype=np.uint8)]
    spec *= amp
    fields: np.ndarray = np.fft.irfft2(spec, s=(resize, resize))
    fields /= fields.std(axis=(1, 2), keepdims=True) + np.float32(1e-12)
    out: np.ndarray = np.tensordot(_MIX, fields, axes=1)
    return out


def _occluders(rng: np.random.Generator, coords: tuple[np.ndarray, np.ndarray], image: np.ndarray) -> None:
    """Paint the occluders; each mask is evaluated only over its bounding box."""
    x, y = coords[0][0], coords[1][:, 0]
    for _ in range(int(rng.integers(OCCLUDERS[0], OCCLUDERS[1] + 1))):
        cy, cx = rng.uniform(0.0, 1.0, size=2)
        ry, rx = rng.uniform(0.06, 0.22, size=2)
        ellipse = rng.random() < 0.5
        colour = rng.uniform(0.1, 0.9, size=3)
        y0, y1 = np.searchsorted(y, [cy - ry, cy + ry])
        x0, x1 = np.searchsorted(x, [cx - rx, cx + rx])
        rows, cols = slice(y0, y1 + 1), slice(x0, x1 + 1)
        yy, xx = y[rows, None], x[None, cols]
        if ellipse:
            mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        else:
            mask = (np.abs(xx - cx) <= rx) & (np.abs(yy - cy) <= ry)
        image[:, rows, cols][:, mask] = colour[:, None]


def synthetic_image(split: str, index: int, size: int, resize: int | None = None) -> tuple[np.ndarray, int]:
    """Image ``index`` of a synthetic split, rendered at ``resize`` and centre-cropped to ``size``
    (see the module doc); uint8 (3, size, size) and its label. Only the crop is computed (float32),
    except the texture and the pixel noise, which are drawn over the whole render so that a crop
    equals the same region of a larger render."""
    resize = size if resize is None else resize
    label = index % len(SYNTHETIC_CLASSES)
    cls = SYNTHETIC_CLASSES[label]
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    top = round((resize - size) / 2)
    crop = (slice(None), slice(top, top + size), slice(top, top + size))
    u = ((np.arange(top, top + size) + 0.5) / resize).astype(np.float32)
    coords = (u[None, :], u[:, None])
    mean, contrast = float(rng.uniform(0.4, 0.6)), float(rng.uniform(0.03, 0.09))
    image = pink_noise(rng, resize)[crop]
    image *= contrast
    image += mean
    amplitude = float(rng.uniform(0.3, 0.8)) * 0.8
    image += grating(
        coords,
        orientation=cls.orientation + rng.uniform(-7.5, 7.5),
        cycles=cls.cycles * rng.uniform(0.9, 1.1),
        colour=cls.colour,
        phase=rng.uniform(0, 2 * np.pi),
        square=bool(rng.random() < 0.5),
        centre=(rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)),
        sigma=rng.uniform(0.2, 0.35),
        amplitude=amplitude,
    )
    if rng.random() < DISTRACTOR_P:
        other = SYNTHETIC_CLASSES[
            (label + int(rng.integers(1, len(SYNTHETIC_CLASSES)))) % len(SYNTHETIC_CLASSES)
        ]
        image += grating(
            coords,
            orientation=other.orientation + rng.uniform(-7.5, 7.5),
            cycles=other.cycles * rng.uniform(0.9, 1.1),
            colour=other.colour,
            phase=rng.uniform(0, 2 * np.pi),
            square=bool(rng.random() < 0.5),
            centre=(rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)),
            sigma=rng.uniform(0.17, 0.3),
            amplitude=amplitude * rng.uniform(*DISTRACTOR_GAIN),
        )
    _occluders(rng, coords, image)
    # zero-mean uniform pixel noise with std `noise`: [-√3, √3)·noise
    noise = float(rng.uniform(0.01, 0.04))
    grain = rng.random((3, resize, resize), dtype=np.float32)[crop]
    image += (grain - np.float32(0.5)) * np.float32(2 * math.sqrt(3) * noise)
    image *= np.float32(255.0)
    image += np.float32(0.5)
    return np.clip(image, 0, 255, out=image).astype(np.uint8), label


class _RenderCache:
    """The last renders of this process, up to `max_bytes` (least recently used out first): analyses
    and training epochs read the same images again, and a render costs ~1 ms at 64 px, far more
    than a copy. Memory is bounded, not proportional to the dataset."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[tuple[str, int, int, int], tuple[np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, split: str, index: int, size: int, resize: int) -> tuple[np.ndarray, int]:
        key = (split, index, size, resize)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0].copy(), hit[1]
        image, label = synthetic_image(split, index, size, resize)
        with self._lock:
            if key not in self._items and image.nbytes <= self.max_bytes:
                self._items[key] = (image.copy(), label)
                self.bytes += image.nbytes
                while self.bytes > self.max_bytes:
                    self.bytes -= self._items.popitem(last=False)[1][0].nbytes
        return image, label


_RENDERS = _RenderCache(128 << 20)


class SyntheticDataset(ImageDataset):
    """Procedural images whose 10 classes differ in orientation, spatial frequency and colour, mixed
    with distractors, occluders and 1/f textures (module doc)."""

    def __init__(self, split: str, n: int, size: int, resize: int) -> None:
        super().__init__(f"{split}:{n}", size, resize, [c.name for c in SYNTHETIC_CLASSES])
        self.split, self.n = split, n
        self.fingerprint = f"synthetic-render-{RENDER_VERSION}"

    def __len__(self) -> int:
        return self.n

    def get(self, index: int) -> tuple[np.ndarray, int]:
        return _RENDERS.get(self.split, self._check_index(index), self.size, self.resize)

    def get_original(self, index: int) -> tuple[np.ndarray, int]:
        """The whole ``resize`` x ``resize`` render (what training crops from)."""
        return _RENDERS.get(self.split, self._check_index(index), self.resize, self.resize)

    def describe(self, index: int) -> str:
        return f"{self.split}[{index}]"
