"""Reverse correlation against planted units: linear (AWA = filter), energy (AWC spans the pair)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from rfcore.analysis import get_analysis
from rfcore.atlas import Atlas
from rfcore.models import get_model, model_meta
from rfcore.revcorr import (
    BoxSpec,
    RevcorrReducer,
    accumulate,
    agreement,
    axial_circular_correlation,
    box_features,
    box_spec,
    predicted_surface,
)
from rfcore.stimuli import GratingSet, orientations, phases
from rfcore.tuning import preferred
from tests.rfcore.test_tuning import FakeAssets, gabor, make_atlas, run_analysis

K, S = 9, 15  # kernel and image size of the toy units: 7x7 map, centre unit (3, 3) sees pixels 3..11
MEAN = (0.5, 0.5, 0.5)
TOY_RF = {"size": [K, K], "stride": [1, 1], "offset": [(K - 1) / 2, (K - 1) / 2]}


class Toy(nn.Module):
    """One conv of fixed luminance filters; `energy=True` sums their squares (a complex cell)."""

    def __init__(self, filters: np.ndarray, energy: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, len(filters), K, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(
                torch.as_tensor(filters, dtype=torch.float32)[:, None].expand(-1, 3, -1, -1) / 3
            )
        self.energy = energy
        self.out = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.out(y.square().sum(1, keepdim=True) if self.energy else y)


def _run(
    model: Toy, box: BoxSpec, n: int, first_batch: int = 0, shuffles: int = 2, flush: int = 1024
) -> RevcorrReducer:
    """Reducer of the toy's centre unit(s) over `n` luminance-noise images (batches of 250)."""
    with torch.no_grad():
        channels = model(torch.zeros(1, 3, S, S)).shape[1]
    red = RevcorrReducer(channels, box.dim, shuffles=shuffles, seed=5, flush_images=flush)
    return accumulate(
        model,
        "out",
        red,
        box,
        channels=slice(None),
        n=n,
        batch_size=250,
        noise_mean=MEAN,
        sigma=0.25,
        seed=1,
        input_mean=(0.0, 0.0, 0.0),
        input_std=(1.0, 1.0, 1.0),
        image_size=S,
        first_batch=first_batch,
    )


def test_box_spec_downsamples_by_an_integer_factor_and_pooled_features_are_block_means() -> None:
    rf = {"size": [45, 45], "stride": [4, 4], "offset": [1.5, 1.5]}
    box = box_spec(rf, (16, 16), 64, max_side=16, colour=True)
    assert box.factor == 3 and box.shape == (3, 15, 15) and (box.y1 - box.y0) == 45
    small = box_spec(TOY_RF, (7, 7), S, max_side=16, colour=False)
    assert (small.y0, small.y1, small.factor, small.shape) == (3, 12, 1, (1, 9, 9))
    img = torch.rand(2, 3, 64, 64)
    f = box_features(img, MEAN, box).view(2, 3, 15, 15)
    want = (img[0, 1, box.y0 : box.y0 + 3, box.x0 + 6 : box.x0 + 9] - 0.5).mean()
    assert torch.allclose(f[0, 1, 0, 2], want, atol=1e-6)


def test_linear_unit_awa_is_its_filter() -> None:
    g = gabor(7, 30.0, 4.0, 1.8)
    w = np.stack([g, 0.5 * g, -0.3 * g])  # a colour filter, so the colour noise must recover each plane
    model = get_model("resnet10t")
    with torch.no_grad():
        model.conv1.weight[0] = torch.as_tensor(w)
    meta = model_meta(model)
    rf = {"size": [7, 7], "stride": [2, 2], "offset": [0.0, 0.0]}
    box = box_spec(rf, (32, 32), meta.preprocessing.size, max_side=16, colour=True)
    assert box.shape == (3, 7, 7)
    red = RevcorrReducer(16, box.dim, shuffles=1, seed=0)
    accumulate(
        model,
        "conv1",
        red,
        box,
        channels=slice(None),
        n=3000,
        batch_size=500,
        noise_mean=MEAN,
        sigma=0.25,
        seed=0,
        input_mean=meta.preprocessing.mean,
        input_std=meta.preprocessing.std,
        image_size=meta.preprocessing.size,
    )
    res = red.result(k=2)
    # the model sees (x - mean) / std per channel, so its filter in image space is w / std
    filt = (w / np.asarray(meta.preprocessing.std)[:, None, None]).ravel()
    r = np.corrcoef(res.awa[0].numpy(), filt)[0, 1]
    assert r > 0.95, r


def _quadrature_pair() -> np.ndarray:
    return np.stack([gabor(K, 60.0, 4.0, 2.0, 0.0), gabor(K, 60.0, 4.0, 2.0, math.pi / 2)])


def test_energy_unit_has_flat_awa_and_awc_eigenvectors_span_the_pair() -> None:
    pair = _quadrature_pair()
    model = Toy(pair, energy=True)
    box = box_spec(TOY_RF, (S - K + 1, S - K + 1), S, max_side=16, colour=False)
    res = _run(model, box, 6000).result(k=3)
    assert res.significant[0, :2].all() and not res.significant[0, 2]
    awa_norm = float(res.awa[0].norm())
    # AWA of a phase-invariant unit is ~0: compare with the scale of a linear unit's AWA (same filters)
    lin = _run(Toy(pair[:1], energy=False), box, 6000).result(k=1)
    assert awa_norm < 0.15 * float(lin.awa[0].norm())
    q_true, _ = np.linalg.qr(pair.reshape(2, -1).T)
    q_est = res.eigvecs[0, :2].numpy().T.astype(np.float64)
    cosines = np.linalg.svd(q_true.T @ q_est, compute_uv=False)
    angles = np.degrees(np.arccos(np.clip(cosines, -1, 1)))
    assert angles.max() < 20.0, angles


@pytest.mark.parametrize("flush", [1, 1024])
def test_shards_merged_equal_one_pass(flush: int) -> None:
    model = Toy(_quadrature_pair(), energy=True)
    box = box_spec(TOY_RF, (7, 7), S, max_side=16, colour=False)
    one = _run(model, box, 1000, flush=flush)
    a = _run(model, box, 500, first_batch=0, flush=flush)
    b = RevcorrReducer.from_state_dict(_run(model, box, 500, first_batch=2, flush=flush).state_dict())
    a.merge(b)
    assert a.n == one.n and a.batches == one.batches
    # flush=1: identical float32 batch sums added to float64 in another order, equal to float64
    # rounding; flush=1024: one pass sums 4 batches in float32 before flushing, the shards 2: float32
    # rounding over <= 1024 images (~1e-7 relative per addition)
    tol = 1e-12 if flush == 1 else 1e-5
    sa, so = a.state_dict(), one.state_dict()  # state_dict flushes the float32 buffers
    for name in ("sum_a", "sum_ax", "sum_axx", "sum_x", "sum_xx"):
        torch.testing.assert_close(sa[name], so[name], rtol=tol, atol=tol)
    ra, ro = a.result(k=2), one.result(k=2)
    torch.testing.assert_close(ra.eigvals, ro.eigvals, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ra.null, ro.null, rtol=1e-4, atol=1e-6)
    assert torch.equal(ra.significant, ro.significant)


def test_filters_predict_grating_preferences() -> None:
    pair = _quadrature_pair()
    model = Toy(pair, energy=True)
    box = box_spec(TOY_RF, (7, 7), S, max_side=16, colour=False)
    res = _run(model, box, 6000).result(k=2)
    sfs = (0.125, 0.18, 0.25, 0.35, 0.5)
    gs = GratingSet(S, orientations(), sfs, phases(8), mean=MEAN, amplitude=0.5, centre=(7.0, 7.0))
    feats = torch.cat([box_features(img, MEAN, box) for _, img in gs.batches(10_000, torch.device("cpu"))])
    lin, energy = predicted_surface(res, feats, gs.shape)
    po, ps = preferred(energy[:, 0, 0].max(-1))
    assert lin.shape == energy.shape == (1, *gs.shape)
    assert gs.orientations[po[0]] == 60.0 and sfs[ps[0]] == 0.25
    ag = agreement(
        np.array([60.0, 10.0, 100.0, 170.0]),
        np.array([75.0, 5.0, 100.0, 120.0]),
        15.0,
        np.array([0.25, 0.1, 0.2, 0.3]),
        np.array([0.25, 0.2, 0.2, 0.35]),
        0.5,
    )
    assert ag["orientation_within_step"] == 0.75 and ag["sf_within_step"] == 0.75
    x = np.array([10.0, 50.0, 90.0, 130.0, 170.0])
    assert axial_circular_correlation(x, x) == 1.0 or abs(axial_circular_correlation(x, x) - 1) < 1e-12
    assert abs(axial_circular_correlation(x, (x + 180.0) % 360)) - 1 < 1e-12


def test_revcorr_analysis_recovers_a_planted_filter_and_compares_with_tuning() -> None:
    g = gabor(7, 30.0, 4.0, 1.8)
    model = get_model("resnet10t")
    with torch.no_grad():
        model.conv1.weight[0] = torch.as_tensor(np.stack([g, g, g]) / 3)
    store = make_atlas(model, ["conv1"])
    rc_opts = {"num_images": 1500, "batch_size": 500, "channels_per_unit": 8, "n_sfs": 8, "n_phases": 4}
    assert run_analysis("revcorr", store, model, rc_opts) == 2  # 16 channels in blocks of 8
    assert run_analysis("revcorr", store, model, rc_opts) == 0
    atlas = Atlas(store)
    layer = atlas.layer("conv1")
    awa = layer.array("revcorr/awa")
    assert awa.shape == (16, 3, 7, 7)
    std = np.asarray(model_meta(model).preprocessing.std)
    filt = (np.stack([g, g, g]) / 3 / std[:, None, None]).ravel()
    assert np.corrcoef(awa[0].ravel(), filt)[0, 1] > 0.9
    pred = layer.array("revcorr/pred_orientation_awa")
    assert abs(pred[0] - 30.0) <= 15.0
    analysis = get_analysis("revcorr")
    assert analysis.verify(store) == []
    assert analysis.finish(store, analysis.options(rc_opts)) == {}  # no tuning yet: nothing to compare
    run_analysis("tuning", store, model, {"n_sfs": 8, "n_phases": 4, "colour": False, "batch_size": 512})
    agreed = analysis.finish(store, analysis.options(rc_opts))["conv1"]
    assert set(agreed) == {"awa", "awc"} and agreed["awa"]["n"] >= 1
    assert 0.0 <= agreed["awa"]["orientation_within_step"] <= 1.0
    findings = analysis.findings(atlas)
    assert len(findings) == 1 and "AWA predicts" in findings[0]
    assets = FakeAssets()
    assert analysis.report_channel(atlas, "conv1", 0, assets) is not None and assets.names[0].endswith("-awa")
    section = analysis.report_layer(atlas, "conv1", assets)
    assert section is not None and "RF predicts tuning" in section.html


def test_downsampled_box_awa_is_the_block_averaged_filter() -> None:
    g = gabor(K, 45.0, 6.0, 2.5)
    model = Toy(g[None], energy=False)
    box = box_spec(TOY_RF, (7, 7), S, max_side=3, colour=False)
    assert box.factor == 3 and box.shape == (1, 3, 3)
    res = _run(model, box, 3000).result(k=1)
    # a linear unit's response to pooled white noise depends on the filter's block sums
    blocks = g.reshape(3, 3, 3, 3).sum(axis=(1, 3)).ravel()
    assert np.corrcoef(res.awa[0].numpy(), blocks)[0, 1] > 0.95
