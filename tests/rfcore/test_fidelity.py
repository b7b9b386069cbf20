"""Kobayashi & Shouno (2020) fidelity: the activation is the post-nonlinearity response (§3.5)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rfcore.data import open_dataset
from rfcore.layers import capture, response_map, response_module
from rfcore.models import get_model, model_meta
from rfcore.sweep import SweepConfig, sweep_dataset


class ConvBnRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))  # type: ignore[no-any-return]


def test_response_follows_bn_and_relu_and_respects_negative_gamma() -> None:
    torch.manual_seed(0)
    net = ConvBnRelu().eval()
    with torch.no_grad():
        net.bn.weight[0] = -2.0  # planted γ < 0: the raw conv ranking of channel 0 is reversed
        net.bn.running_mean.uniform_(-0.1, 0.1)
    resp = response_module(net, "conv")
    assert (resp.module, resp.relu, resp.tensor) == ("relu", False, "relu(bn(conv))")
    assert response_module(net, "pool").module == "pool"
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        want = torch.relu(net.bn(net.conv(x)))
        raw = net.conv(x)
        with capture(net, ["conv"], response=True) as cap:
            got = cap.run(x)["conv"]
        with capture(net, ["conv"]) as cap:
            plain = cap.run(x)["conv"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(plain, raw, rtol=0, atol=0)  # the default stays the module output
    best_resp = want[:, 0].flatten(1).amax(1).argmax()
    worst_raw = raw[:, 0].flatten(1).amin(1).argmin()
    assert best_resp == worst_raw  # γ < 0: the strongest response is the most negative conv output


def test_shared_relu_is_applied_and_inplace_add_is_not_followed() -> None:
    model = get_model("resnet10t", seed=0)
    rm = response_map(model)
    assert (rm["conv1"].module, rm["conv1"].relu) == ("relu", False)  # the stem's own ReLU
    assert (rm["layer1.0.conv1"].module, rm["layer1.0.conv1"].relu) == ("layer1.0.bn1", True)  # shared relu
    # bn2's output is added to the skip in place before the ReLU: not rectified on its own
    assert (rm["layer1.0.conv2"].module, rm["layer1.0.conv2"].relu) == ("layer1.0.bn2", False)
    plain = response_map(get_model("plainnet10t", seed=0))
    assert (plain["layer1.0.conv2"].module, plain["layer1.0.conv2"].relu) == ("layer1.0.bn2", True)


def test_capture_keeps_an_output_the_skip_adds_to_in_place() -> None:
    """ResNet's `out += identity` changes bn2's output after its hook ran: the capture of the conv2
    response (and of bn2 itself) is bn2(conv2), not the block's pre-ReLU sum."""
    model = get_model("resnet10t", seed=0).eval()
    block = model.layer1[0]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        want = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h)))))
        for response in (True, False):
            layer = "layer1.0.conv2" if response else "layer1.0.bn2"
            with capture(model, [layer, "layer1.0"], response=response) as cap:
                out = cap.run(x)
            torch.testing.assert_close(out[layer], want, rtol=0, atol=0)
            torch.testing.assert_close(out["layer1.0"], block(h), rtol=0, atol=0)
            with capture(model, [layer], response=response, stop_early=True) as cap:  # stops before +=
                torch.testing.assert_close(cap.run(x)[layer], want, rtol=0, atol=0)


def test_sweep_ranks_conv_units_by_post_relu_response_with_negative_gamma() -> None:
    model = get_model("resnet10t", seed=0).eval()
    with torch.no_grad():
        model.bn1.weight[:] = model.bn1.weight.abs()
        model.bn1.weight[3] = -1.5  # planted γ < 0 channel
    pre = model_meta(model).preprocessing
    ds = open_dataset("synthetic:24", size=pre.size, resize=pre.resize)
    cfg = SweepConfig(k=5, batch_size=8, device="cpu", amp=False)
    red = sweep_dataset(model, ds, ["conv1"], cfg)["conv1"]
    images = torch.stack([torch.from_numpy(ds.get(i)[0]) for i in range(len(ds))])
    with torch.no_grad():
        x = pre.normalize(images)
        resp = torch.relu(model.bn1(model.conv1(x))).numpy()
        raw = model.conv1(x).numpy()
    mx = resp.reshape(len(ds), resp.shape[1], -1).max(axis=2)
    state = red.state_dict()
    for ch in range(resp.shape[1]):
        order = sorted(range(len(ds)), key=lambda i: (-float(mx[i, ch]), i))[:5]
        assert state["topk_image"][ch].tolist() == order, ch
        np.testing.assert_allclose(state["topk_value"][ch], mx[order, ch], rtol=1e-5, atol=1e-6)
    assert (state["max"] >= 0).all()  # post-ReLU: never negative
    raw_order = np.argsort(-raw[:, 3].reshape(len(ds), -1).max(axis=1), kind="stable")[:5]
    assert state["topk_image"][3].tolist() != raw_order.tolist()
