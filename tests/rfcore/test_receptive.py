"""rfcore.receptive: analytic receptive fields against the paper and against gradients; boxes; table."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torchvision import models as tvm

from rfcore.errors import RfatlasError
from rfcore.layers import list_layers
from rfcore.receptive import (
    Box,
    RField,
    _hooked_geometry,
    _positive_probe,
    _support,
    _to_rfield,
    empirical_rf,
    format_rf_table,
    receptive_fields,
    rf_box,
)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return tvm.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def resnet34() -> nn.Module:
    return tvm.resnet34(weights=None).eval()


@pytest.fixture(scope="module")
def vgg16() -> nn.Module:
    return tvm.vgg16(weights=None).eval()


@pytest.fixture(scope="module")
def alexnet() -> nn.Module:
    return tvm.alexnet(weights=None).eval()


def test_resnet34_matches_paper_figures(resnet34: nn.Module) -> None:
    rfs = receptive_fields(resnet34, 224)
    assert rfs["conv1"] == RField((7, 7), (2, 2), (0.0, 0.0))
    assert rfs["maxpool"] == RField((11, 11), (4, 4), (0.0, 0.0))  # Fig. 4(a): 11x11
    assert rfs["layer1.0.conv2"].size == (27, 27)  # Fig. 4(b): "conv. layer in layer 3"
    assert rfs["layer1.2.conv2"].size == (59, 59)  # Fig. 4(c): "conv. layer in layer 7"
    assert rfs["layer1.2"].stride == (4, 4)
    assert rfs["layer2.0"] == RField((83, 83), (8, 8), (0.0, 0.0))
    assert rfs["layer2.0.downsample.0"] == RField((59, 59), (8, 8), (0.0, 0.0))  # skip: 1x1 conv, stride 2
    assert rfs["layer4.2"].stride == (32, 32)
    assert rfs["fc"] == RField((224, 224), (0, 0), (111.5, 111.5))  # whole input


def test_resnet50_bottlenecks() -> None:
    rfs = receptive_fields(tvm.resnet50(weights=None), 64)  # geometry does not depend on the input size
    assert rfs["layer1.0.conv1"].size == (11, 11)  # 1x1
    assert rfs["layer1.0"] == RField((19, 19), (4, 4), (0.0, 0.0))
    assert rfs["layer1.2"].size == (35, 35)
    assert rfs["layer2.0.conv1"] == RField((35, 35), (4, 4), (0.0, 0.0))
    assert rfs["layer2.0.conv2"] == RField((43, 43), (8, 8), (0.0, 0.0))  # stride on the 3x3 (v1.5)
    assert rfs["layer2.0.downsample.0"] == RField((35, 35), (8, 8), (0.0, 0.0))


def test_vgg16_and_alexnet_published_values(vgg16: nn.Module, alexnet: nn.Module) -> None:
    vgg = receptive_fields(vgg16, 224)
    assert vgg["features.4"] == RField((6, 6), (2, 2), (0.5, 0.5))  # 2x2 pool: centre between pixels
    assert vgg["features.29"].size == (196, 196)
    assert vgg["features.30"] == RField((212, 212), (32, 32), (15.5, 15.5))
    assert vgg["avgpool"] == vgg["features.30"]  # adaptive 7x7 -> 7x7 is the identity
    alex = receptive_fields(alexnet, 224)
    assert alex["features.0"] == RField((11, 11), (4, 4), (3.0, 3.0))
    assert alex["features.12"] == RField((195, 195), (32, 32), (31.0, 31.0))


def _interior_unit(rf: RField, shape: tuple[int, int], size: int) -> tuple[int, int]:
    y, x = shape[0] // 2, shape[1] // 2
    box = rf_box(rf, y, x, (size, size))
    assert box.clipped() == (box.y0, box.y1, box.x0, box.x1), "test unit must not be clipped"
    return y, x


def _check_against_gradients(model: nn.Module, size: int, layers: list[str]) -> None:
    shapes = {layer.name: layer.shape for layer in list_layers(model, size)}
    rfs = receptive_fields(model, size)
    probe = _positive_probe(model)
    for name in layers:
        y, x = _interior_unit(rfs[name], shapes[name], size)
        box = rf_box(rfs[name], y, x, (size, size))
        assert _support(probe, name, size, (y, x)) == (box.y0, box.y1, box.x0, box.x1), name


def test_analytic_equals_empirical_resnet18(resnet18: nn.Module) -> None:
    layers = [
        "conv1",
        "maxpool",
        "layer1.0.conv2",
        "layer1.1",
        "layer2.0.downsample.0",
        "layer2.0",
        "layer3.0",
    ]
    _check_against_gradients(resnet18, 160, layers)


def test_analytic_equals_empirical_vgg16(vgg16: nn.Module) -> None:
    _check_against_gradients(vgg16, 96, ["features.1", "features.4", "features.9", "features.16"])


def test_empirical_rf_default_position_and_model_untouched(resnet18: nn.Module) -> None:
    model = resnet18
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert empirical_rf(model, "layer1.0", 64) == (27, 27)
    assert empirical_rf(model, "fc", 64) == (64, 64)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(RfatlasError, match="outside"):
        empirical_rf(model, "conv1", 64, (40, 0))


def test_rf_box_and_clipping() -> None:
    rf = RField((11, 11), (4, 4), (0.0, 0.0))
    assert rf_box(rf, 0, 0, (224, 224)) == Box(-5, 6, -5, 6, 5, 0, 5, 0)
    assert rf_box(rf, 0, 0, (224, 224)).clipped() == (0, 6, 0, 6)
    box = rf_box(rf, 55, 2, (224, 224))  # centre (220, 8)
    assert (box.y0, box.y1, box.x0, box.x1) == (215, 226, 3, 14)
    assert (box.clip_bottom, box.clip_top, box.clipped()) == (2, 0, (215, 224, 3, 14))
    even = RField((6, 6), (2, 2), (0.5, 0.5))  # VGG pool1
    assert rf_box(even, 3, 1, (10, 10)) == Box(4, 10, 0, 6, 0, 0, 0, 0)
    whole = RField((64, 64), (0, 0), (31.5, 31.5))
    assert rf_box(whole, 0, 0, (64, 64)).clipped() == (0, 64, 0, 64)
    huge = rf_box(RField((899, 899), (32, 32), (0.0, 0.0)), 0, 6, (224, 224))
    assert huge.clipped() == (0, 224, 0, 224)
    assert huge.clip_top + huge.clip_bottom == 899 - 224


class _Inception(nn.Module):
    """Two branches of different kernel sizes concatenated along channels, then a pool."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 5, padding=2)
        self.c = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 2))  # "same" for even kernels
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(torch.cat([self.a(x), self.b(x), self.c(x)], dim=1))


def test_branch_union_through_concat() -> None:
    model = _Inception()
    rfs = receptive_fields(model, 32)
    assert rfs["a"] == RField((1, 1), (1, 1), (0.0, 0.0))
    assert rfs["b"] == RField((5, 5), (1, 1), (0.0, 0.0))
    assert rfs["c.1"] == RField((2, 2), (1, 1), (0.5, 0.5))
    assert rfs["pool"] == RField((7, 7), (2, 2), (0.0, 0.0))  # union of the branches is 5x5
    assert empirical_rf(model, "pool", 32) == (7, 7)


class _Untraceable(nn.Module):
    """A plain chain with data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, dilation=2, padding="same")

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if x.sum() > 0:
            x = x * 2
        return self.conv2(self.pool(x))


def test_fallback_when_fx_cannot_trace() -> None:
    model = _Untraceable()
    rfs = receptive_fields(model, 32)
    assert rfs["conv1"] == RField((3, 3), (2, 2), (0.0, 0.0))
    assert rfs["pool"] == RField((5, 5), (4, 4), (1.0, 1.0))
    assert rfs["conv2"] == RField((21, 21), (4, 4), (1.0, 1.0))
    assert empirical_rf(model, "conv2", 32) == (21, 21)


def test_empirical_rf_with_batch_statistics_norms() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False),  # normalizes a constant input to zero
        nn.ReLU(),
        nn.Conv2d(4, 4, 5, stride=2),
        nn.GroupNorm(2, 4),
    )
    assert receptive_fields(model, 32)["3"].size == (7, 7)
    assert empirical_rf(model, "3", 32) == (7, 7)


def test_hook_fallback_agrees_on_chains(alexnet: nn.Module) -> None:
    geos = _hooked_geometry(alexnet, 224)
    traced = receptive_fields(alexnet, 224)
    assert {name: _to_rfield(geos[name], 224) for name in traced} == traced


def test_unsupported_op_is_one_line_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3))
    with pytest.raises(RfatlasError, match="cannot derive receptive fields through") as info:
        receptive_fields(model, 32)
    assert "\n" not in str(info.value)


def test_tiny_models_and_plainnets(resnet18: nn.Module) -> None:
    models = pytest.importorskip("rfcore.models")
    tiny = models.get_model("resnet10t")
    rfs = receptive_fields(tiny)  # 64 px from its metadata
    assert rfs["layer2.0"] == RField((51, 51), (8, 8), (0.0, 0.0))
    assert rfs["fc"] == RField((64, 64), (0, 0), (31.5, 31.5))
    assert empirical_rf(tiny, "layer2.0") == (51, 51)
    plain = receptive_fields(models.get_model("plainnet18"), 64)
    resnet = receptive_fields(resnet18, 64)
    assert {k: v for k, v in resnet.items() if "downsample" not in k} == plain  # skips add no extent here


def test_format_rf_table(resnet34: nn.Module) -> None:
    table = format_rf_table(resnet34)
    lines = table.splitlines()
    assert lines[0] == "receptive fields of resnet at 224x224 input"
    assert lines[1].split() == ["layer", "kind", "channels", "shape", "RF", "size", "stride", "offset"]
    row = next(line for line in lines if line.startswith("layer1.2.conv2 "))
    assert row.split() == ["layer1.2.conv2", "conv", "64", "56x56", "59x59", "4x4", "0,0"]
    assert len({len(line) for line in lines[1:] if line.startswith("layer")}) <= 2  # aligned columns
    assert lines[1].index("kind") == row.index(" conv ") + 1


def test_tracing_leaves_other_threads_forward_passes_alone(
    resnet18: nn.Module, other_thread_forwards: Callable[[], list[Exception]]
) -> None:
    """fx patches `Module.__call__` process-wide while it traces: another model's forward pass in
    another thread meanwhile must run as usual (it raised "module is not installed as a submodule"),
    and the traced fields must not change."""
    together = [receptive_fields(resnet18, 64) for _ in range(4)]
    assert other_thread_forwards() == []
    assert all(rfs == receptive_fields(resnet18, 64) for rfs in together)
