"""Activation maximization: analytic optimum of a linear unit, batch invariance, a trained model."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from rfcore.actmax import ActmaxConfig, ActmaxError, actmax, parse_channels, preset
from rfcore.data import open_dataset
from rfcore.layers import capture
from rfcore.models import get_model

SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny convs: one intra-op thread is faster than two, and far faster on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_input(image: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Display-unit RGB back to the model's (normalized) input."""
    pre = model.rfatlas_meta.preprocessing
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return (image - mean) / std


def oriented_filter() -> torch.Tensor:
    """A 7×7 Gabor at 30°, different gain per colour: the planted weight w of one conv1 channel."""
    yy, xx = torch.meshgrid(torch.arange(7.0) - 3, torch.arange(7.0) - 3, indexing="ij")
    u = xx * math.cos(math.radians(30)) + yy * math.sin(math.radians(30))
    gabor = torch.exp(-(xx**2 + yy**2) / 8) * torch.cos(2 * math.pi * u / 4)
    return torch.stack([gabor, -0.5 * gabor, 0.25 * gabor])


@pytest.mark.parametrize("gamma", [1.5, -1.5])
def test_linear_unit_reaches_the_analytic_optimum(gamma: float) -> None:
    """conv1 → bn1 is affine in x: the objective (the pre-ReLU response) γ·w·x + β − λ‖x‖² has
    x* = γw/(2λ) inside the RF and 0 outside, also for γ < 0 (the BN does not flip the unit), and
    β < 0 makes the post-ReLU activation 0 at the start: the run must still climb."""
    model = get_model("resnet10t")
    w, lam, beta = oriented_filter(), 0.5, -0.3
    with torch.no_grad():
        model.conv1.weight[3] = w
        bn = model.bn1
        bn.weight[3], bn.bias[3], bn.running_mean[3], bn.running_var[3] = gamma, beta, 0.0, 1.0 - bn.eps
    cfg = ActmaxConfig(penalty="l2sq", lam=lam, weight_decay=0.0, lr=0.05, steps=400, size=SIZE)
    res = actmax(model, "conv1", [3], objective="neuron", config=cfg)
    x = model_input(res.image, model)[0]
    # conv1 is 7×7, stride 2, pad 3: the centre unit (16, 16) sees input rows/cols 29..35.
    assert res.position == (16, 16)
    assert res.box is not None and (res.box.y0, res.box.y1, res.box.x0, res.box.x1) == (29, 36, 29, 36)
    inside = x[:, 29:36, 29:36]
    expected = gamma * w / (2 * lam)
    corr = np.corrcoef(inside.flatten().numpy(), expected.flatten().numpy())[0, 1]
    assert corr > 0.99
    assert torch.allclose(inside, expected, atol=0.03)
    outside = x.clone()
    outside[:, 29:36, 29:36] = 0
    assert float(outside.abs().max()) == 0.0
    assert res.crop is not None
    torch.testing.assert_close(res.crop[0], res.image[0, :, 29:36, 29:36])
    # f(x*) = γ²·w·w/(2λ) + β is the optimum; the trace climbs to it from β (the mean image)
    optimum = gamma**2 * (w * w).sum() / (2 * lam) + beta
    torch.testing.assert_close(res.activation[0], optimum, rtol=1e-2, atol=1e-2)
    assert res.trace.shape == (1, 400)
    assert float(res.trace[0, 0]) == pytest.approx(beta, abs=1e-6)


def test_l2_penalty_of_eq2_from_the_zero_image_stays_finite() -> None:
    """λ‖x‖₂ has no gradient at x = 0; the run must take the zero subgradient, not NaN."""
    model = get_model("resnet10t")
    cfg = preset("kobayashi2020", lam=0.01, penalty="l2", steps=5, size=SIZE)
    res = actmax(model, "conv1", [0, 1], objective="channel", config=cfg)
    assert torch.isfinite(res.image).all() and torch.isfinite(res.trace).all()
    assert torch.all(res.activation > 0)


@pytest.mark.parametrize("name", ["kobayashi2020", "lucid"])
@pytest.mark.parametrize("objective", ["neuron", "channel"])
def test_batched_and_single_channel_runs_agree(name: str, objective: str) -> None:
    model = get_model("resnet10t", seed=3)
    cfg = preset(name, steps=6, size=SIZE, lr=0.05)
    channels = [0, 5, 9, 30]
    batch = actmax(model, "layer2.0", channels, objective=objective, config=cfg, seed=7)
    for i, c in enumerate(channels):
        alone = actmax(model, "layer2.0", [c], objective=objective, config=cfg, seed=7)
        torch.testing.assert_close(alone.image[0], batch.image[i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(alone.activation[0], batch.activation[i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(alone.trace[0], batch.trace[i], rtol=1e-4, atol=1e-4)
    assert batch.image.shape == (4, 3, SIZE, SIZE) and batch.trace.shape == (4, 6)
    split = actmax(model, "layer2.0", channels, objective=objective, config=cfg, seed=7, micro_batch=3)
    torch.testing.assert_close(split.image, batch.image, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(split.trace, batch.trace, rtol=1e-4, atol=1e-4)
    again = actmax(model, "layer2.0", channels, objective=objective, config=cfg, seed=7)
    assert torch.equal(again.image, batch.image)
    if name == "lucid":  # random init and transforms: another seed gives other images
        other = actmax(model, "layer2.0", channels, objective=objective, config=cfg, seed=8)
        assert not torch.equal(other.image, batch.image)


@pytest.fixture(scope="module")
def trained_model() -> nn.Module:
    """resnet10t after a short SGD run on the synthetic training set (a few seconds on 2 cores)."""
    torch.manual_seed(0)
    model = get_model("resnet10t", seed=0)
    ds = open_dataset("synthetic-train:256", size=SIZE)
    pre = model.rfatlas_meta.preprocessing
    images = pre.normalize(torch.from_numpy(np.stack([ds.get(i)[0] for i in range(len(ds))])))
    labels = torch.tensor([ds.get(i)[1] for i in range(len(ds))])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()
    for epoch in range(4):
        for idx in torch.randperm(len(ds), generator=torch.Generator().manual_seed(epoch)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(images[idx]), labels[idx]).backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("objective", ["neuron", "channel"])
def test_paper_preset_beats_zero_and_100_random_images(trained_model: nn.Module, objective: str) -> None:
    layer, channels = "layer2.0.conv2", list(range(0, 32, 4))
    res = actmax(trained_model, layer, channels, objective=objective, config=preset("kobayashi2020"))
    assert res.image.shape[-1] == SIZE
    ds = open_dataset("synthetic:100", size=SIZE)
    pre = trained_model.rfatlas_meta.preprocessing
    images = pre.normalize(torch.from_numpy(np.stack([ds.get(i)[0] for i in range(100)])))
    probe = torch.cat([torch.zeros(1, 3, SIZE, SIZE), images])
    with torch.no_grad(), capture(trained_model, [layer]) as cap:
        maps = cap.run(probe)[layer][:, channels]
    h, w = maps.shape[-2:]
    baseline = maps[:, :, h // 2, w // 2] if objective == "neuron" else maps.mean(dim=(2, 3))
    assert torch.all(res.activation > baseline.max(dim=0).values)
    assert torch.all(res.trace[:, -1] >= res.trace[:, 0])


def test_presets_follow_the_paper_and_lucid() -> None:
    k = preset("kobayashi2020")
    assert (k.param, k.init, k.lr, k.weight_decay, k.steps) == ("pixel", "zero", 0.1, 1e-6, 31)
    assert preset("kobayashi2020", size=224).size == 224
    lucid = preset("lucid")
    assert (lucid.param, lucid.decorrelate, lucid.lr, lucid.steps, lucid.size) == (
        "fft",
        True,
        0.05,
        512,
        128,
    )
    assert lucid.pad and lucid.jitter and lucid.scales and lucid.angles


def test_bad_settings_raise_one_line_errors() -> None:
    model = get_model("resnet10t")
    with pytest.raises(ActmaxError, match="unknown actmax preset 'foo'"):
        preset("foo")
    with pytest.raises(ActmaxError, match="unknown actmax setting"):
        preset("lucid", stepz=3)
    with pytest.raises(ActmaxError, match="decorrelate needs"):
        ActmaxConfig(decorrelate=True)
    with pytest.raises(ActmaxError, match="objective must be"):
        actmax(model, "conv1", [0], objective="pixel")
    with pytest.raises(ActmaxError, match="channels must be in 0-15"):
        actmax(model, "conv1", [16], config=preset("kobayashi2020", steps=1))
    assert parse_channels("0-3,7", 16) == [0, 1, 2, 3, 7]
    assert parse_channels("all", 3) == [0, 1, 2]
    with pytest.raises(ActmaxError, match="outside 0-15"):
        parse_channels("10-20", 16)
    with pytest.raises(ActmaxError, match="bad channel list"):
        parse_channels("a-b", 16)
