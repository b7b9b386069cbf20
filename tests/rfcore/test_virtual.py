"""Virtual filters (eq. 3) against a brute-force loop, and the default layer choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from rfcore.errors import UnknownLayerError
from rfcore.virtual import compose, default_virtual_layers, previous_conv, virtual_filter


def brute_force(w2: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Eq. 3 written as loops, straight from the paper."""
    p_n, k_n, h2, v2 = w2.shape
    _, q_n, h1, v1 = w1.shape
    out = torch.zeros(p_n, q_n, h1, v1, dtype=torch.float64)
    for p in range(p_n):
        for k in range(k_n):
            best, ti, tj = -1.0, 0, 0
            for i in range(h2):
                for j in range(v2):
                    if abs(float(w2[p, k, i, j])) > best:
                        best, ti, tj = abs(float(w2[p, k, i, j])), i, j
            for q in range(q_n):
                for i in range(h1):
                    for j in range(v1):
                        out[p, q, i, j] += float(w2[p, k, ti, tj]) * float(w1[k, q, i, j])
    return out


def test_compose_matches_brute_force_loop() -> None:
    g = torch.Generator().manual_seed(1)
    w2, w1 = torch.randn(5, 4, 3, 3, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    torch.testing.assert_close(compose(w2, w1).double(), brute_force(w2, w1), rtol=1e-5, atol=1e-5)


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 5, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, bias=False)


def test_virtual_filter_of_a_model_and_sorted_coupling() -> None:
    net = TwoConv()
    vf = virtual_filter(net, "conv2")
    assert vf.source == "conv1"
    w2, w1 = net.conv2.weight.detach(), net.conv1.weight.detach()
    torch.testing.assert_close(vf.weight.double(), brute_force(w2, w1), rtol=1e-5, atol=1e-5)
    assert vf.weight.shape == (6, 3, 5, 5)
    assert torch.all(vf.coupling[:, :-1] >= vf.coupling[:, 1:])
    for p in range(6):
        for rank, k in enumerate(vf.coupling_index[p].tolist()):
            taps = w2[p, k].flatten()
            assert float(vf.coupling[p, rank]) == float(taps[taps.abs().argmax()])
        assert sorted(vf.coupling_index[p].tolist()) == list(range(4))


def test_default_layers_of_resnet18_follow_the_paper() -> None:
    model = resnet18()
    assert default_virtual_layers(model) == [("layer1.0.conv1", "conv1"), ("layer2.0.downsample.0", "conv1")]
    assert previous_conv(model, "layer2.0.conv1") == "layer1.1.conv2"
    assert virtual_filter(model, "layer2.0.downsample.0", "conv1").weight.shape == (128, 3, 7, 7)


def test_bad_layers_raise_one_line_errors() -> None:
    model = resnet18()
    with pytest.raises(UnknownLayerError, match="not a conv layer"):
        virtual_filter(model, "layer1.0.bn1")
    with pytest.raises(UnknownLayerError, match="reads 128 channels"):
        virtual_filter(model, "layer3.0.conv1", "conv1")
