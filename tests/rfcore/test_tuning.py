"""Grating stimuli and tuning metrics against planted filters and brute-force NumPy."""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np
import pytest
import torch

from rfcore.analysis import AnalysisError, get_analysis
from rfcore.atlas import Atlas
from rfcore.errors import ConfigMismatchError
from rfcore.layers import list_layers
from rfcore.models import get_model, model_meta
from rfcore.receptive import receptive_fields
from rfcore.schema import LayerAttrs, RunAttrs
from rfcore.stimuli import (
    COLOUR_AXES,
    GratingSet,
    log_sfs,
    noise_batches,
    orientations,
    phases,
    render_gratings,
)
from rfcore.store import AtlasStore
from rfcore.tuning import (
    circular_variance,
    measure_responses,
    orientation_bandwidth,
    osi,
    phase_summary,
    sf_bandwidth,
    tuning_metrics,
)


def gabor(size: int, theta_deg: float, period: float, sigma: float, phase: float = 0.0) -> np.ndarray:
    """(size, size) Gabor: x = column, y = row, theta = modulation direction."""
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size] - c
    th = math.radians(theta_deg)
    u = x * math.cos(th) + y * math.sin(th)
    return np.exp(-(x**2 + y**2) / (2 * sigma**2)) * np.cos(2 * math.pi * u / period + phase)


def test_render_gratings_matches_the_formula_pixel_by_pixel() -> None:
    size, th, f, ph, c = 9, 30.0, 0.2, 0.7, 0.8
    mean, amp, centre = (0.4, 0.5, 0.6), 0.3, (3.0, 5.0)
    img = render_gratings(
        size,
        torch.tensor([th]),
        torch.tensor([f]),
        torch.tensor([ph]),
        torch.tensor([c]),
        torch.tensor([COLOUR_AXES["blue-yellow"]]),
        mean=mean,
        amplitude=amp,
        centre=centre,
    )[0].numpy()
    want = np.zeros((3, size, size))
    d = COLOUR_AXES["blue-yellow"]
    for k in range(3):
        for yy in range(size):
            for xx in range(size):
                u = (xx - centre[1]) * math.cos(math.radians(th)) + (yy - centre[0]) * math.sin(
                    math.radians(th)
                )
                want[k, yy, xx] = mean[k] + c * amp * d[k] * math.sin(2 * math.pi * f * u + ph)
    np.testing.assert_allclose(img, want, atol=1e-5)
    # theta = 0 modulates along columns only, theta = 90 along rows only
    flat = render_gratings(
        8,
        *(torch.tensor([v]) for v in (0.0, 0.25, 0.0, 1.0)),
        torch.ones(1, 3),
        mean=(0.5,) * 3,
        amplitude=0.5,
    )
    assert torch.allclose(flat[0, 0, 0], flat[0, 0, 5]) and not torch.allclose(
        flat[0, 0, :, 0], flat[0, 0, :, 2]
    )
    disc = render_gratings(
        21,
        *(torch.tensor([v]) for v in (0.0, 0.25, 0.5, 1.0)),
        torch.ones(1, 3),
        mean=(0.5,) * 3,
        amplitude=0.5,
        radius=4.0,
    )
    assert (
        torch.all(disc[0, :, 0, 0] == 0.5)
        and torch.all(disc[0, :, 10, :6] == 0.5)
        and disc[0, 0, 10, 10] != 0.5
    )


def test_grating_set_batches_cover_the_factorial_set_in_order() -> None:
    gs = GratingSet(
        16, orientations(4), (0.1, 0.3), phases(3), contrasts=(0.5, 1.0), axes=("luminance", "red-green")
    )
    assert len(gs) == 2 * 2 * 4 * 2 * 3
    parts = list(gs.batches(7, torch.device("cpu")))
    assert [s for s, _ in parts] == list(range(0, len(gs), 7))
    allimg = torch.cat([b for _, b in parts])
    i = np.ravel_multi_index((1, 0, 2, 1, 2), gs.shape)
    one = render_gratings(
        16,
        torch.tensor([90.0]),
        torch.tensor([0.3]),
        torch.tensor([phases(3)[2]]),
        torch.tensor([0.5]),
        torch.tensor([COLOUR_AXES["red-green"]]),
        mean=gs.mean,
        amplitude=gs.amplitude,
    )
    assert torch.allclose(allimg[i], one[0])


def test_grids_and_noise_batches() -> None:
    sfs = log_sfs(7, 10)
    assert len(sfs) == 10 and sfs[0] == pytest.approx(1 / 7) and sfs[-1] == pytest.approx(0.5)
    assert log_sfs(500, 8, image_size=64)[0] == pytest.approx(1 / 64)
    assert orientations() == tuple(15.0 * i for i in range(12))
    dev = torch.device("cpu")
    kw = dict(mean=(0.5, 0.4, 0.3), sigma=0.2, seed=3, device=dev)
    one = torch.cat(list(noise_batches(10, 6, 4, colour=True, **kw)))  # type: ignore[arg-type]
    tail = torch.cat(list(noise_batches(2, 6, 4, colour=True, first_batch=2, **kw)))  # type: ignore[arg-type]
    assert torch.equal(one[8:], tail)
    lum = next(noise_batches(4, 6, 4, colour=False, **kw))  # type: ignore[arg-type]
    assert torch.allclose(lum[:, 0] - 0.5, lum[:, 2] - 0.3)
    assert abs(float(one[:, 1].mean()) - 0.4) < 0.05 and abs(float(one.std()) - 0.2) < 0.03


def test_phase_summary_f0_f1_of_a_cosine() -> None:
    ph = phases(8)
    resp = np.array([[2.0 + 1.5 * math.cos(p - 0.3) for p in ph]])
    rmax, f0, f1 = phase_summary(resp, ph)
    assert (
        f0[0] == pytest.approx(2.0) and f1[0] == pytest.approx(1.5) and rmax[0] == pytest.approx(max(resp[0]))
    )


def test_orientation_metrics_on_known_curves() -> None:
    oris = np.arange(0, 180, 1.0)
    sigma, theta0 = 12.0, 40.0
    d = np.minimum(np.abs(oris - theta0) % 180, 180 - np.abs(oris - theta0) % 180)
    curve = (np.exp(-(d**2) / (2 * sigma**2)) + 0.1)[None]
    pref = np.array([40])
    # brute-force circular variance
    num = abs(
        sum(
            r * complex(math.cos(2 * math.radians(t)), math.sin(2 * math.radians(t)))
            for r, t in zip(curve[0], oris, strict=True)
        )
    )
    assert circular_variance(curve, oris)[0] == pytest.approx(1 - num / curve.sum())
    r_orth = curve[0, 130]
    assert osi(curve, oris, pref)[0] == pytest.approx((curve[0, 40] - r_orth) / (curve[0, 40] + r_orth))
    # half-width at 1/sqrt(2) of a Gaussian (plus baseline b): solve exp(-d^2/2s^2) + b = (1 + b)/sqrt2
    b = 0.1
    half = sigma * math.sqrt(-2 * math.log((1 + b) / math.sqrt(2) - b))
    assert orientation_bandwidth(curve, oris, pref)[0] == pytest.approx(half, abs=0.1)
    flat = np.ones((1, 12))
    assert np.isnan(orientation_bandwidth(flat, orientations(), np.array([0]))[0])
    assert circular_variance(flat, orientations())[0] == pytest.approx(1.0)
    # SF: Gaussian in log2 f with sigma_oct -> full width at half height = 2 sigma sqrt(2 ln 2)
    sfs = np.logspace(np.log10(1 / 64), np.log10(0.5), 200)
    s_oct = 0.6
    sfc = np.exp(-((np.log2(sfs) - np.log2(0.1)) ** 2) / (2 * s_oct**2))[None]
    ps = np.array([int(np.argmax(sfc[0]))])
    assert sf_bandwidth(sfc, sfs, ps)[0] == pytest.approx(2 * s_oct * math.sqrt(2 * math.log(2)), abs=0.02)


def _planted(channel_weights: dict[int, np.ndarray]) -> torch.nn.Module:
    model = get_model("resnet10t")
    with torch.no_grad():
        for ch, w in channel_weights.items():
            model.conv1.weight[ch] = torch.as_tensor(w, dtype=torch.float32)
    return model


def test_planted_gabor_has_planted_preferences_and_colour_class() -> None:
    g = gabor(7, 30.0, 4.0, 1.8)
    lum = np.stack([g, g, g]) / 3
    rg = np.stack([g, -g, 0 * g]) / 2  # red-green double-opponent Gabor
    model = _planted({0: lum, 1: rg})
    pre = model_meta(model).preprocessing
    sfs = log_sfs(7, 10)
    mean = (0.5, 0.5, 0.5)
    gs = GratingSet(
        pre.size,
        orientations(),
        sfs,
        phases(8),
        axes=("luminance", "red-green", "blue-yellow"),
        mean=mean,
        amplitude=0.5,
        centre=(32.0, 32.0),
    )
    resp = measure_responses(
        model, "conv1", gs, input_mean=pre.mean, input_std=pre.std, batch_size=512
    ).numpy()
    assert resp.shape == (16, *gs.shape)
    rmax, f0, f1 = phase_summary(resp, gs.phases)
    res = tuning_metrics(rmax, f0, f1, axes=gs.axes, orientations=gs.orientations, sfs=sfs)
    for ch in (0,):
        d = abs(res.preferred_orientation[ch] - 30.0) % 180
        assert min(d, 180 - d) <= 15.0
        i = int(np.argmin(np.abs(np.log(np.asarray(sfs) / 0.25))))
        assert abs(sfs.index(res.preferred_sf[ch]) - i) <= 1
    assert res.is_orientation_selective[0] and not res.is_colour_opponent[0]
    assert res.is_colour_opponent[1] and res.is_double_opponent[1]
    # a linear-then-rectified filter with a Gabor is phase-sensitive (simple cell): F1/F0 > 1
    assert res.modulation_ratio[0] > 1.0


# --- the registered analysis on a small atlas ------------------------------------------------------


class FakeAssets:
    """Assets that check what the hooks hand over and run the figure callbacks on a real Figure."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def image(self, name: str, chw: np.ndarray, *, scale: str = "uint8") -> str:
        assert chw.ndim == 3 and chw.shape[0] == 3 and np.isfinite(chw).all()
        assert 0 <= chw.min() and chw.max() <= 255
        self.names.append(name)
        return f"{name}.png"

    def figure(
        self, name: str, draw: Any, *, size: tuple[float, float] = (3, 3), projection: str | None = None
    ) -> str:
        from matplotlib.figure import Figure

        fig = Figure(figsize=size)
        draw(fig.add_subplot() if len(self.names) % 2 == 0 else fig)  # both what Assets may hand over
        assert fig.axes and all(ax.has_data() for ax in fig.axes)
        self.names.append(name)
        return f"{name}.png"


class Res:
    """Resources of one worker: the atlas's model on the CPU."""

    device = torch.device("cpu")

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model

    def model(self) -> torch.nn.Module:
        return self._model

    def dataset(self) -> Any:
        raise AssertionError("the analysis must not read the dataset")


def make_atlas(model: torch.nn.Module, layers: list[str]) -> AtlasStore:
    """An empty atlas of `model` (resnet10t) with the given layers' real geometry."""
    rfs = receptive_fields(model)
    infos = {la.name: la for la in list_layers(model)}
    attrs = {
        name: LayerAttrs(
            infos[name].kind,
            infos[name].channels,
            infos[name].shape,
            {
                "size": list(rfs[name].size),
                "stride": list(rfs[name].stride),
                "offset": list(rfs[name].offset),
            },
            {"factor": 1.0, "size": 11, "first": [0, 0]},
        )
        for name in layers
    }
    run = RunAttrs(
        model="resnet10t",
        weights=None,
        dataset="synthetic:4",
        num_images=4,
        image_size=64,
        preprocessing={"size": 64, "resize": 64},
        config={"k": 2, "patch_max": 16, "shard_size": 4, "batch_size": 2, "layers": layers, "seed": 0},
    )
    url = f"memory://rfatlas-tuning-{uuid.uuid4().hex}/atlas.zarr"
    return AtlasStore.create(url, run=run, layers=attrs, num_images=4, shard_size=4, k=2)


def run_analysis(name: str, store: AtlasStore, model: torch.nn.Module, options: dict[str, Any]) -> int:
    """plan -> run every unit -> mark -> finish, as the generic flow does; returns the unit count."""
    analysis = get_analysis(name)
    opts = analysis.options(options)
    units = analysis.plan(store, opts)
    for unit in units:
        analysis.run(store, unit, Res(model))
        store.mark_done(unit.key)
    analysis.finish(store, opts)
    return len(units)


def test_tuning_analysis_writes_planted_preferences_and_reports_them() -> None:
    g = gabor(7, 30.0, 4.0, 1.8)
    model = _planted({0: np.stack([g, g, g]) / 3, 1: np.stack([g, -g, 0 * g]) / 2})
    store = make_atlas(model, ["conv1", "layer1.0"])
    opts = {"n_sfs": 8, "n_phases": 4, "batch_size": 512}
    assert run_analysis("tuning", store, model, opts) == 2
    assert run_analysis("tuning", store, model, opts) == 0  # done units are not planned again
    with pytest.raises(ConfigMismatchError, match="n_phases"):
        get_analysis("tuning").plan(store, get_analysis("tuning").options({**opts, "n_phases": 8}))
    atlas = Atlas(store)
    conv1 = atlas.layer("conv1")
    po = conv1.array("tuning/preferred_orientation")
    assert abs(po[0] - 30.0) <= 15.0
    sfs = conv1.array("tuning/sf")
    assert (
        abs(
            int(np.argmin(np.abs(np.log(sfs / 0.25))))
            - int(np.flatnonzero(sfs == conv1.array("tuning/preferred_sf")[0])[0])
        )
        <= 1
    )
    np.testing.assert_allclose(conv1.array("tuning/sf_per_rf"), sfs * 7, rtol=1e-6)
    assert conv1.array("tuning/max").shape == (16, 3, 1, 12, 8)
    flags = conv1.array("tuning/is_colour_opponent")
    assert not flags[0] and flags[1] and conv1.array("tuning/is_double_opponent")[1]
    analysis = get_analysis("tuning")
    assert analysis.verify(store) == []
    cols = analysis.channel_columns(atlas, "conv1")
    assert set(cols) == {"osi", "circular_variance", "is_orientation_selective", "is_colour_opponent"}
    assert all(v.shape == (16,) for v in cols.values())
    findings = analysis.findings(atlas)
    assert len(findings) == 2 and findings[0].startswith("tuning conv1: ")
    assets = FakeAssets()
    section = analysis.report_channel(atlas, "conv1", 0, assets)
    assert section is not None and len(assets.names) == 2
    layer_section = analysis.report_layer(atlas, "layer1.0", assets)
    assert layer_section is not None and "orientation-selective" in layer_section.html
    with pytest.raises(AnalysisError, match="aperture"):
        analysis.options({"aperture": "square"})


def test_metrics_use_the_highest_contrast_whatever_its_position() -> None:
    oris, sfs = orientations(4), (0.1, 0.2, 0.4)
    rmax = np.zeros((1, 1, 2, 4, 3))
    rmax[0, 0, 0, 2, 1] = 2.0  # contrast 1.0
    rmax[0, 0, 1, 0, 0] = 1.0  # contrast 0.5
    res = tuning_metrics(
        rmax, rmax, rmax, axes=("luminance",), orientations=oris, sfs=sfs, contrasts=(1.0, 0.5)
    )
    assert res.preferred_orientation[0] == oris[2] and res.preferred_sf[0] == 0.2
    assert res.circular_variance[0] == pytest.approx(0.0) and res.osi[0] == pytest.approx(1.0)
    assert np.isnan(res.colour_opponency[0]) and not res.is_colour_opponent[0]
