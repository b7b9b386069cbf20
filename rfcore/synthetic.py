"""Procedural image classes for the demo and the tests: deterministic, offline, and not trivially
separable, so trained models stay well below 100 % and architectures can differ.

Each image (seeded by split and index only) is built from:

* a 1/f ("pink") colour texture background (natural-image amplitude spectrum), random contrast;
* the class's *target*: an opponent-colour grating (`grating`) of the class's orientation, spatial
  frequency and colour axis, under a Gaussian envelope at a random position, random phase, contrast,
  ±7.5° orientation and ±10 % frequency jitter, sinusoid or square-wave edges;
* with probability `DISTRACTOR_P`, a *distractor*: the grating of another class (so it shares the
  orientation, the frequency or the colour axis of the target with many classes) of the same size,
  `DISTRACTOR_GAIN` times the target's contrast: usually weaker, sometimes stronger (those images
  are ambiguous: a ceiling below 100 % for any model);
* 2–5 occluding shapes (ellipses, rectangles) of flat random colours, which can hide part of the
  target;
* pixel noise.

Classes mix the cues: 0°/45°/90°/135° × (low frequency, red-green) and (high frequency, blue-yellow),
plus (0°, high, red-green) and (90°, low, blue-yellow), so no single cue identifies a class.
Labels are `index % 10` (no label noise).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

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
    """(3, H, W) float opponent-colour grating in [-amplitude, amplitude] · colour axis.

    ``coords`` = (x (1, W), y (H, 1)) in image-side units; bars at ``orientation`` degrees, ``cycles``
    periods per unit; ``square`` gives tanh-sharpened edges; ``sigma`` a Gaussian envelope around
    ``centre`` = (y, x) (None: none)."""
    x, y = coords
    theta = np.deg2rad(orientation)
    wave = np.sin(2 * np.pi * cycles * (-np.sin(theta) * x - np.cos(theta) * y) + phase)
    if square:
        wave = np.tanh(3.0 * wave) / np.tanh(3.0)
    if sigma is not None:
        wave = wave * np.exp(-((x - centre[1]) ** 2 + (y - centre[0]) ** 2) / (2 * sigma**2))
    out: np.ndarray = amplitude * np.asarray(OPPONENT[colour])[:, None, None] * wave[None]
    return out


def pink_noise(rng: np.random.Generator, resize: int, alpha: float = 1.0) -> np.ndarray:
    """(3, R, R) texture with a 1/f^alpha amplitude spectrum, unit std per channel; the channels
    share most of their structure (luminance) with some independent chroma."""
    f = np.hypot(np.fft.fftfreq(resize)[:, None], np.fft.rfftfreq(resize)[None, :])
    f[0, 0] = 1.0
    amp = f**-alpha
    amp[0, 0] = 0.0
    spec = rng.standard_normal((4, *amp.shape)) + 1j * rng.standard_normal((4, *amp.shape))
    fields = np.fft.irfft2(spec * amp, s=(resize, resize))
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-12
    out: np.ndarray = 0.8 * fields[0][None] + 0.45 * fields[1:]
    return out


def _occluders(rng: np.random.Generator, coords: tuple[np.ndarray, np.ndarray], image: np.ndarray) -> None:
    x, y = coords
    for _ in range(int(rng.integers(OCCLUDERS[0], OCCLUDERS[1] + 1))):
        cy, cx = rng.uniform(0.0, 1.0, size=2)
        ry, rx = rng.uniform(0.06, 0.22, size=2)
        if rng.random() < 0.5:
            mask = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
        else:
            mask = (np.abs(x - cx) <= rx) & (np.abs(y - cy) <= ry)
        colour = rng.uniform(0.1, 0.9, size=3)
        image[:, mask] = colour[:, None]


def synthetic_image(split: str, index: int, size: int, resize: int | None = None) -> tuple[np.ndarray, int]:
    """Image ``index`` of a synthetic split, rendered at ``resize`` and centre-cropped to ``size``
    (see the module doc); uint8 (3, size, size) and its label."""
    resize = size if resize is None else resize
    label = index % len(SYNTHETIC_CLASSES)
    cls = SYNTHETIC_CLASSES[label]
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    u = (np.arange(resize) + 0.5) / resize
    coords = (u[None, :], u[:, None])
    image = rng.uniform(0.4, 0.6) + rng.uniform(0.03, 0.09) * pink_noise(rng, resize)
    amplitude = rng.uniform(0.3, 0.8) * 0.8
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
    image += rng.uniform(0.01, 0.04) * rng.standard_normal(image.shape)
    top = round((resize - size) / 2)
    image = image[:, top : top + size, top : top + size]
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8), label


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

    def __len__(self) -> int:
        return self.n

    def get(self, index: int) -> tuple[np.ndarray, int]:
        return _RENDERS.get(self.split, self._check_index(index), self.size, self.resize)

    def get_original(self, index: int) -> tuple[np.ndarray, int]:
        """The whole ``resize`` x ``resize`` render (what training crops from)."""
        return _RENDERS.get(self.split, self._check_index(index), self.resize, self.resize)

    def describe(self, index: int) -> str:
        return f"{self.split}[{index}]"
