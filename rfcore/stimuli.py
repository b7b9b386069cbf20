"""Parametric stimuli for tuning and reverse correlation: sinusoidal gratings and Gaussian white noise.

Images are made in the model's image space ([0, 1] per channel, before `Preprocessing.normalize`'s
mean/std), on the requested device, in batches from generators (a stimulus set is never materialized
whole). `to_input` maps them to the model's input. Conventions (see docs/tuning.md):

    I(x, y) = mu + c * A * d * sin(2 pi f ((x - cx) cos(theta) + (y - cy) sin(theta)) + phi)

x = column, y = row (downwards), (cx, cy) = the measured unit's RF centre (phase 0 there), theta = the
direction of modulation (wave vector) in degrees in [0, 180), f in cycles/pixel, c the contrast, A the
amplitude scale, d the colour direction (per-channel weights, peak |d_k| = 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rfcore.errors import RfatlasError

# Colour directions in RGB, each scaled to peak |d_k| = 1 ("equal contrast": the same largest
# per-channel amplitude). The chromatic ones have zero sum, so they leave the RGB mean unchanged.
COLOUR_AXES: dict[str, tuple[float, float, float]] = {
    "luminance": (1.0, 1.0, 1.0),
    "red-green": (1.0, -1.0, 0.0),
    "blue-yellow": (-0.5, -0.5, 1.0),
}


def log_sfs(
    rf_side: float, n: int, *, image_size: int | None = None, nyquist: float = 0.5
) -> tuple[float, ...]:
    """`n` log-spaced spatial frequencies (cycles/pixel) from one cycle per RF to Nyquist (0.5 c/px).

    The RF side is clipped to the image size (deep units' RFs exceed the image; a grating cannot
    show fewer than one cycle per image there), and to at least 2 px (Nyquist)."""
    if n < 2:
        raise RfatlasError(f"need at least 2 spatial frequencies, got {n}")
    side = float(rf_side if image_size is None else min(rf_side, image_size))
    lo = 1.0 / max(side, 1.0 / nyquist)
    return tuple(
        float(v) for v in torch.logspace(math.log10(lo), math.log10(nyquist), n, dtype=torch.float64)
    )


def orientations(n: int = 12) -> tuple[float, ...]:
    """`n` evenly spaced orientations in degrees over [0, 180) (default 12 steps of 15 degrees)."""
    return tuple(180.0 * i / n for i in range(n))


def phases(n: int = 8) -> tuple[float, ...]:
    """`n` evenly spaced phases in radians over [0, 2 pi)."""
    return tuple(2.0 * math.pi * i / n for i in range(n))


def render_gratings(
    size: int,
    orientation: Tensor,
    sf: Tensor,
    phase: Tensor,
    contrast: Tensor,
    colour: Tensor,
    *,
    mean: Sequence[float],
    amplitude: float,
    centre: tuple[float, float] | None = None,
    radius: float | None = None,
) -> Tensor:
    """Gratings (B, 3, size, size) in image space, one per row of the (B,) parameter tensors.

    `orientation` degrees (modulation direction), `sf` cycles/pixel, `phase` radians, `contrast` c,
    `colour` (B, 3) direction. `centre` (cy, cx) is the phase origin (default: the image centre);
    with `radius`, pixels farther than it from `centre` are the mean (a disc aperture). Made on the
    device of `orientation`, float32."""
    device = orientation.device
    cy, cx = centre if centre is not None else ((size - 1) / 2.0, (size - 1) / 2.0)
    coords = torch.arange(size, device=device, dtype=torch.float32)
    y = (coords - cy).view(1, size, 1)
    x = (coords - cx).view(1, 1, size)
    theta = torch.deg2rad(orientation.to(device, torch.float32)).view(-1, 1, 1)
    f = sf.to(device, torch.float32).view(-1, 1, 1)
    arg = 2.0 * math.pi * f * (x * torch.cos(theta) + y * torch.sin(theta)) + phase.to(
        device, torch.float32
    ).view(-1, 1, 1)
    wave = torch.sin(arg) * (contrast.to(device, torch.float32).view(-1, 1, 1) * amplitude)
    if radius is not None:
        wave = wave * ((x**2 + y**2) <= radius**2).to(torch.float32)
    mu = torch.tensor(list(mean), device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return mu + wave[:, None] * colour.to(device, torch.float32)[:, :, None, None]


@dataclass(frozen=True)
class GratingSet:
    """A full factorial grating set: axes x contrasts x orientations x sfs x phases (row-major)."""

    size: int
    orientations: tuple[float, ...]
    sfs: tuple[float, ...]
    phases: tuple[float, ...]
    contrasts: tuple[float, ...] = (1.0,)
    axes: tuple[str, ...] = ("luminance",)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    amplitude: float = 0.5
    centre: tuple[float, float] | None = None
    radius: float | None = None

    def __post_init__(self) -> None:
        unknown = [a for a in self.axes if a not in COLOUR_AXES]
        if unknown:
            raise RfatlasError(f"unknown colour axis {unknown[0]!r}; choose from {', '.join(COLOUR_AXES)}")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(axes, contrasts, orientations, sfs, phases)."""
        return (len(self.axes), len(self.contrasts), len(self.orientations), len(self.sfs), len(self.phases))

    def __len__(self) -> int:
        return math.prod(self.shape)

    def params(self, start: int, stop: int, device: torch.device) -> tuple[Tensor, ...]:
        """(orientation, sf, phase, contrast, colour) of stimuli start..stop-1."""
        idx = torch.arange(start, stop, device=device)
        a, c, o, s, p = torch.unravel_index(idx, self.shape)

        def pick(values: Sequence[float], i: Tensor) -> Tensor:
            return torch.tensor(list(values), device=device, dtype=torch.float32)[i]

        colours = torch.tensor([COLOUR_AXES[n] for n in self.axes], device=device, dtype=torch.float32)
        return (
            pick(self.orientations, o),
            pick(self.sfs, s),
            pick(self.phases, p),
            pick(self.contrasts, c),
            colours[a],
        )

    def render(self, start: int, stop: int, device: torch.device) -> Tensor:
        """Stimuli start..stop-1 as (B, 3, size, size) image-space float32 on `device`."""
        o, s, p, c, col = self.params(start, stop, device)
        return render_gratings(
            self.size,
            o,
            s,
            p,
            c,
            col,
            mean=self.mean,
            amplitude=self.amplitude,
            centre=self.centre,
            radius=self.radius,
        )

    def batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[int, Tensor]]:
        """(start index, images) batches over the whole set, in row-major order."""
        for start in range(0, len(self), batch_size):
            yield start, self.render(start, min(start + batch_size, len(self)), device)


def noise_batches(
    n: int,
    size: int,
    batch_size: int,
    *,
    mean: Sequence[float],
    sigma: float,
    colour: bool,
    seed: int,
    device: torch.device,
    first_batch: int = 0,
) -> Iterator[Tensor]:
    """Gaussian white noise images (B, 3, size, size) in image space: mean + sigma * N(0, 1) per pixel,
    independent per channel (`colour`) or one value for all three (luminance). Not clipped to [0, 1]
    (the model sees the normalized values; clipping would make the noise non-Gaussian).

    Batch b (counted from `first_batch`) is drawn from its own generator seeded with (seed, b), so any
    split into shards at batch boundaries gives the same images as one pass."""
    mu = torch.tensor(list(mean), device=device, dtype=torch.float32).view(1, 3, 1, 1)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    for i, start in enumerate(range(0, n, batch_size)):
        b = min(batch_size, n - start)
        gen = torch.Generator(device=gen_device).manual_seed(seed * 1_000_003 + first_batch + i)
        shape = (b, 3 if colour else 1, size, size)
        z = torch.randn(shape, generator=gen, device=gen_device, dtype=torch.float32).to(device)
        yield mu + sigma * z.expand(b, 3, size, size)


def to_input(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Image-space float images -> the model's normalized input ((x - mean) / std per channel)."""
    m = torch.tensor(list(mean), device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(list(std), device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s
