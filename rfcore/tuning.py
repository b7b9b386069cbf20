"""Grating tuning of every channel's centre unit: responses, the orientation x SF surface and its metrics.

Pure compute (torch + numpy, no I/O). The measured unit of a channel is the centre unit of the feature
map, `(H // 2, W // 2)` (as act-max's 'neuron' objective), and its response is the layer's response
tensor of the atlas (`rfcore.layers.response_module`: for a conv, after the BN and ReLU that follow
it), rectified once more (`relu`, a no-op after a ReLU; it makes pools, linears and convs without a
ReLU rate-like too). Definitions and sources are in docs/tuning.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rfcore.layers import capture, response_module
from rfcore.precision import autocast
from rfcore.stimuli import GratingSet, to_input

CRITERIA = ("cv", "osi", "either", "both")


def centre_index(shape: Sequence[int]) -> tuple[int, int]:
    """(y, x) of the centre unit of an (H, W) feature map."""
    return int(shape[0]) // 2, int(shape[1]) // 2


def rf_centre(rf: Mapping[str, Any], shape: Sequence[int], image_size: int) -> tuple[float, float]:
    """Input-pixel (cy, cx) of the centre unit's RF; the image centre where the stride is 0 (units that
    see the whole input)."""
    cy, cx = centre_index(shape)
    out = []
    for axis, i in ((0, cy), (1, cx)):
        stride, offset = float(rf["stride"][axis]), float(rf["offset"][axis])
        out.append(offset + i * stride if stride > 0 else (image_size - 1) / 2.0)
    return out[0], out[1]


def centre_response(output: Tensor) -> Tensor:
    """(B, C) rectified response of the centre unit of each channel, float32, from a layer output
    (B, C, H, W) or (B, C)."""
    if output.dim() == 4:
        y, x = centre_index(output.shape[2:])
        output = output[:, :, y, x]
    return torch.relu(output.float())


def measure_responses(
    model: nn.Module,
    layer: str,
    gratings: GratingSet,
    *,
    input_mean: Sequence[float],
    input_std: Sequence[float],
    batch_size: int = 256,
    precision: str = "auto",
) -> Tensor:
    """Centre-unit responses (C, axes, contrasts, orientations, sfs, phases) of every channel of
    `layer` to `gratings`, on the model's device (stimuli made there batch by batch)."""
    device = next(model.parameters()).device
    module = response_module(model, layer).module
    chunks = []
    with torch.no_grad(), capture(model, [module], stop_early=True) as cap:
        for _, images in gratings.batches(batch_size, device):
            with autocast(device, precision):
                out = cap.run(to_input(images, input_mean, input_std))[module]
            chunks.append(centre_response(out))
    resp = torch.cat(chunks)  # (N, C)
    return resp.T.reshape(resp.shape[1], *gratings.shape)


def phase_summary(resp: np.ndarray, phases: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(max, F0, F1) over the last (phase) axis: F0 = mean, F1 = (2/n) |sum_k R_k exp(-i phi_k)|, the
    amplitude of the response's first harmonic in the grating's spatial phase."""
    ph = np.asarray(phases, dtype=np.float64)
    f1 = 2.0 / len(ph) * np.abs((resp * np.exp(-1j * ph)).sum(-1))
    return resp.max(-1), resp.mean(-1), f1.astype(resp.dtype)


def _axial_diff(a: np.ndarray, b: np.ndarray | float) -> np.ndarray:
    """|a - b| for orientations (period 180 degrees), in [0, 90]."""
    d = np.abs((np.asarray(a) - b) % 180.0)
    return np.minimum(d, 180.0 - d)


def circular_variance(curve: np.ndarray, orientations: Sequence[float] | np.ndarray) -> np.ndarray:
    """1 - |sum R(theta) e^{2 i theta}| / sum R(theta) over the last axis (Ringach et al. 2002); NaN for
    an all-zero curve."""
    th = np.deg2rad(np.asarray(orientations, dtype=np.float64))
    total = curve.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1.0 - np.abs((curve * np.exp(2j * th)).sum(-1)) / total, np.nan)


def osi(curve: np.ndarray, orientations: Sequence[float] | np.ndarray, pref: np.ndarray) -> np.ndarray:
    """(R_pref - R_orth) / (R_pref + R_orth) of each row; R_orth at the grid orientation nearest to
    pref + 90 degrees; NaN where both are 0."""
    oris = np.asarray(orientations, dtype=np.float64)
    rows = np.arange(curve.shape[0])
    orth = np.argmin(_axial_diff(oris[None, :], (oris[pref] + 90.0)[:, None]), axis=1)
    rp, ro = curve[rows, pref], curve[rows, orth]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rp + ro > 0, (rp - ro) / (rp + ro), np.nan)


def _crossing(values: np.ndarray, coords: np.ndarray, start: int, step: int, level: float) -> float | None:
    """Coordinate where `values` first drops below `level` walking from `start` by `step` (linear
    interpolation between grid points); None if it never does before the end of the array."""
    i, j = start, start + step
    while 0 <= j < len(values):
        if values[j] < level:
            t = (values[i] - level) / (values[i] - values[j])
            return float(coords[i] + t * (coords[j] - coords[i]))
        i, j = j, j + step
    return None


def orientation_bandwidth(
    curve: np.ndarray,
    orientations: Sequence[float] | np.ndarray,
    pref: np.ndarray,
    level: float = 1 / math.sqrt(2),
) -> np.ndarray:
    """Half-width (degrees) at `level` x peak of each orientation curve: the mean of the distances from
    the peak to where the curve first drops below the level on either side (interpolated; the grid
    is circular with period 180); NaN if it never drops (untuned) or the curve is all 0."""
    oris = np.asarray(orientations, dtype=np.float64)
    n = len(oris)
    # unwrapped coordinates so that interpolation across 180 -> 0 works: walk on an extended axis
    out = np.full(curve.shape[0], np.nan)
    for c in range(curve.shape[0]):
        peak = curve[c, pref[c]]
        if not peak > 0:
            continue
        ext = np.concatenate([curve[c]] * 3)
        coords = np.concatenate([oris - 180.0, oris, oris + 180.0])
        widths = []
        for step in (1, -1):
            x = _crossing(ext, coords, n + int(pref[c]), step, level * peak)
            if x is None or abs(x - oris[pref[c]]) > 90.0:
                break
            widths.append(abs(x - oris[pref[c]]))
        if len(widths) == 2:
            out[c] = float(np.mean(widths))
    return out


def sf_bandwidth(
    curve: np.ndarray, sfs: Sequence[float] | np.ndarray, pref: np.ndarray, level: float = 0.5
) -> np.ndarray:
    """Full bandwidth in octaves, log2(f_high / f_low), at `level` x peak of each SF curve
    (interpolated in log2 f); NaN where the curve does not drop below the level on both sides inside
    the grid."""
    logf = np.log2(np.asarray(sfs, dtype=np.float64))
    out = np.full(curve.shape[0], np.nan)
    for c in range(curve.shape[0]):
        peak = curve[c, pref[c]]
        if not peak > 0:
            continue
        hi = _crossing(curve[c], logf, int(pref[c]), 1, level * peak)
        lo = _crossing(curve[c], logf, int(pref[c]), -1, level * peak)
        if hi is not None and lo is not None:
            out[c] = hi - lo
    return out


def preferred(surface: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(orientation index, sf index) of each channel's maximum of a (C, O, S) surface."""
    flat = surface.reshape(surface.shape[0], -1).argmax(1)
    o, s = np.unravel_index(flat, surface.shape[1:])
    return o.astype(np.int64), s.astype(np.int64)


def is_selective(
    cv: np.ndarray, osi_: np.ndarray, criterion: str, cv_max: float, osi_min: float
) -> np.ndarray:
    """Orientation-selective by `criterion`: 'cv' (cv < cv_max), 'osi' (osi > osi_min), 'either',
    'both'; NaN counts as not selective."""
    by_cv = np.nan_to_num(cv, nan=1.0) < cv_max
    by_osi = np.nan_to_num(osi_, nan=-1.0) > osi_min
    table: dict[str, np.ndarray] = {
        "cv": by_cv,
        "osi": by_osi,
        "either": by_cv | by_osi,
        "both": by_cv & by_osi,
    }
    return table[criterion]


@dataclass(frozen=True)
class TuningResult:
    """Per-channel tuning metrics (all (C,) numpy arrays) of one layer."""

    preferred_orientation: np.ndarray  # degrees, [0, 180)
    preferred_sf: np.ndarray  # cycles/pixel
    osi: np.ndarray
    circular_variance: np.ndarray
    orientation_bandwidth: np.ndarray  # degrees, half-width at 1/sqrt(2)
    sf_bandwidth: np.ndarray  # octaves
    modulation_ratio: np.ndarray  # F1/F0 at the preferred grating
    colour_opponency: np.ndarray  # (R_chrom - R_lum) / (R_chrom + R_lum), NaN without chromatic axes
    is_orientation_selective: np.ndarray
    is_colour_opponent: np.ndarray
    is_double_opponent: np.ndarray


def tuning_metrics(
    rmax: np.ndarray,
    f0: np.ndarray,
    f1: np.ndarray,
    *,
    axes: Sequence[str],
    orientations: Sequence[float] | np.ndarray,
    sfs: Sequence[float],
    criterion: str = "cv",
    cv_max: float = 0.6,
    osi_min: float = 0.5,
    opponency_min: float = 0.0,
    ori_level: float = 1 / math.sqrt(2),
    sf_level: float = 0.5,
    contrasts: Sequence[float] | None = None,
) -> TuningResult:
    """Metrics from phase summaries (C, axes, contrasts, O, S) at the highest of `contrasts` (default:
    the last index).

    Orientation and SF tuning use the luminance surface (max over phase): the preferred grating is its
    argmax, the orientation curve is taken at the preferred SF and the SF curve at the preferred
    orientation. Colour opponency compares the best chromatic and best luminance responses at equal
    contrast; double-opponent = colour-opponent and orientation-selective on its best chromatic axis."""
    lum = list(axes).index("luminance")
    top = int(np.argmax(contrasts)) if contrasts is not None else rmax.shape[2] - 1
    rmax, f0, f1 = rmax[:, :, top : top + 1], f0[:, :, top : top + 1], f1[:, :, top : top + 1]
    oris, sf = np.asarray(orientations, dtype=np.float64), np.asarray(sfs, dtype=np.float64)
    rows = np.arange(rmax.shape[0])
    surf = rmax[:, lum, -1].astype(np.float64)
    po, ps = preferred(surf)
    ori_curve, sf_curve = surf[rows, :, ps], surf[rows, po, :]
    cv = circular_variance(ori_curve, oris)
    o_si = osi(ori_curve, oris, po)
    sel = is_selective(cv, o_si, criterion, cv_max, osi_min)
    with np.errstate(invalid="ignore", divide="ignore"):
        f0p, f1p = f0[rows, lum, -1, po, ps], f1[rows, lum, -1, po, ps]
        mod = np.where(f0p > 0, f1p / f0p, np.nan)
    chrom = [i for i, a in enumerate(axes) if a != "luminance"]
    if chrom:
        per_axis = rmax[:, chrom, -1].reshape(rmax.shape[0], len(chrom), -1).max(-1)  # (C, chromatic axes)
        best_axis = np.asarray(chrom)[per_axis.argmax(1)]
        r_c, r_l = per_axis.max(1).astype(np.float64), surf.reshape(surf.shape[0], -1).max(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            coi = np.where(r_c + r_l > 0, (r_c - r_l) / (r_c + r_l), np.nan)
        opponent = np.nan_to_num(coi, nan=-1.0) > opponency_min
        csurf = rmax[rows, best_axis, -1].astype(np.float64)
        co, cs = preferred(csurf)
        ccurve = csurf[rows, :, cs]
        csel = is_selective(
            circular_variance(ccurve, oris), osi(ccurve, oris, co), criterion, cv_max, osi_min
        )
        double = opponent & csel
    else:
        coi = np.full(rmax.shape[0], np.nan)
        opponent = double = np.zeros(rmax.shape[0], dtype=bool)
    return TuningResult(
        preferred_orientation=oris[po],
        preferred_sf=sf[ps],
        osi=o_si,
        circular_variance=cv,
        orientation_bandwidth=orientation_bandwidth(ori_curve, oris, po, ori_level),
        sf_bandwidth=sf_bandwidth(sf_curve, sf, ps, sf_level),
        modulation_ratio=mod,
        colour_opponency=coi,
        is_orientation_selective=sel,
        is_colour_opponent=opponent,
        is_double_opponent=double,
    )
