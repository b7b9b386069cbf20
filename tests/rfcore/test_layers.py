"""rfcore.layers: layer listing, spec resolution, and the capture context manager."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from rfcore.errors import RfatlasError, UnknownLayerError
from rfcore.layers import LayerInfo, capture, folded_copy, list_layers, resolve_layers


def _with_meta(model: nn.Module, name: str, size: int) -> nn.Module:
    """Attach the bits of `rfatlas_meta` that rfcore.layers reads (registry name, input size)."""
    model.rfatlas_meta = SimpleNamespace(name=name, preprocessing=SimpleNamespace(size=size))
    return model.eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return _with_meta(tvm.resnet18(weights=None), "resnet18", 64)  # small default input keeps tests fast


@pytest.fixture(scope="module")
def vgg16() -> nn.Module:
    return _with_meta(tvm.vgg16(weights=None), "vgg16", 64)


def test_list_layers_resnet18(resnet18: nn.Module) -> None:
    layers = {layer.name: layer for layer in list_layers(resnet18, 224)}
    names = list(layers)
    assert layers["conv1"] == LayerInfo("conv1", "conv", 64, (112, 112))
    assert layers["maxpool"] == LayerInfo("maxpool", "pool", 64, (56, 56))
    assert layers["layer1.0"] == LayerInfo("layer1.0", "block", 64, (56, 56))
    assert layers["layer2.0.downsample.0"] == LayerInfo("layer2.0.downsample.0", "conv", 128, (28, 28))
    assert layers["layer4.1"] == LayerInfo("layer4.1", "block", 512, (7, 7))
    assert layers["fc"] == LayerInfo("fc", "linear", 1000, (1, 1))
    # forward order: a block comes after its convs and before the next block's
    order = ["conv1", "maxpool", "layer1.0.conv1", "layer1.0.conv2", "layer1.0", "layer1.1.conv1", "fc"]
    assert [n for n in names if n in order] == order
    assert names.index("layer2.0.downsample.0") < names.index("layer2.0") < names.index("layer2.1.conv1")
    # per-block ReLUs run twice per forward pass: not well-defined layers; BN is not analyzable
    assert not [n for n in names if n.endswith(".relu") or "bn" in n or n.startswith("layer1.0.downsample")]
    assert "layer1" not in names  # stage containers are not layers, their elements are


def test_list_layers_bottleneck_and_input_size() -> None:
    model = tvm.resnet50(weights=None)
    layers = {layer.name: layer for layer in list_layers(model, 64)}
    assert layers["layer1.0"] == LayerInfo("layer1.0", "block", 256, (16, 16))
    assert layers["layer1.0.conv3"].kind == "conv"
    assert layers["layer4.2"].shape == (2, 2)


def test_list_layers_vgg_and_alexnet(vgg16: nn.Module) -> None:
    kinds = {layer.name: layer.kind for layer in list_layers(vgg16, 64)}
    assert (kinds["features.0"], kinds["features.1"], kinds["features.4"]) == ("conv", "relu", "pool")
    assert "classifier.2" not in kinds  # dropout
    alex = {layer.name: layer for layer in list_layers(tvm.alexnet(weights=None), 224)}
    assert alex["features.0"].shape == (55, 55) and alex["features.12"].shape == (6, 6)


def test_list_layers_leaves_model_state_alone() -> None:
    model = tvm.resnet18(weights=None).train()
    before = model.bn1.running_mean.clone(), int(model.bn1.num_batches_tracked)
    list_layers(model, 64)
    assert model.training and model.layer1[0].bn1.training
    assert torch.equal(model.bn1.running_mean, before[0]) and int(model.bn1.num_batches_tracked) == before[1]
    assert all(not m._forward_hooks for m in model.modules())


def test_list_layers_default_size_from_meta(resnet18: nn.Module) -> None:
    assert list_layers(resnet18)[0].shape == (32, 32)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    assert list_layers(plain) == [
        LayerInfo("0", "conv", 4, (222, 222)),  # no meta: 224 px input
        LayerInfo("1", "relu", 4, (222, 222)),
        LayerInfo("2", "pool", 4, (111, 111)),
    ]
    with pytest.raises(UnknownLayerError, match=r"^unknown layer '3' for sequential; see `rfatlas rf"):
        resolve_layers(plain, "3")  # no meta: the class name; no close match


def test_list_layers_too_small_input_is_one_line_error(vgg16: nn.Module) -> None:
    with pytest.raises(RfatlasError, match=r"cannot run vgg16 on a 4x4 input") as info:
        list_layers(vgg16, 4)
    assert "\n" not in str(info.value)


def test_resolve_default(resnet18: nn.Module, vgg16: nn.Module) -> None:
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert resolve_layers(resnet18, "default") == ["conv1", "maxpool", *blocks]
    relus_and_pools = [1, 3, 4, 6, 8, 9, 11, 13, 15, 16, 18, 20, 22, 23, 25, 27, 29, 30]
    assert resolve_layers(vgg16, "default") == [f"features.{i}" for i in relus_and_pools]
    alex = resolve_layers(tvm.alexnet(weights=None), "default")
    assert alex == [f"features.{i}" for i in (1, 2, 4, 5, 7, 9, 11, 12)]


def test_resolve_all_conv_and_lists(resnet18: nn.Module) -> None:
    convs = resolve_layers(resnet18, "all-conv")
    assert len(convs) == 20 and convs[0] == "conv1" and "layer3.0.downsample.0" in convs
    # explicit specs come back in forward order, without repeats
    assert resolve_layers(resnet18, " layer1.0 , conv1,layer1.0") == ["conv1", "layer1.0"]
    assert resolve_layers(resnet18, ["maxpool", "fc"]) == ["maxpool", "fc"]
    assert resolve_layers(resnet18, "all")[-1] == "fc"


def test_resolve_unknown_layer_suggests(resnet18: nn.Module) -> None:
    with pytest.raises(UnknownLayerError) as info:
        resolve_layers(resnet18, "conv1,layer1.0.cnv2")
    assert str(info.value) == "unknown layer 'layer1.0.cnv2' for resnet18; did you mean 'layer1.0.conv2'?"
    with pytest.raises(UnknownLayerError, match="not analyzable"):
        resolve_layers(resnet18, ["layer1.0.bn1"])
    with pytest.raises(UnknownLayerError, match="no layers"):
        resolve_layers(resnet18, " , ")


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_capture_conv_output_is_pre_relu_and_exact(vgg16: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    assert vgg16.features[1].inplace
    with capture(vgg16, ["features.0", "features.1", "features.2"]) as cap:
        out = cap.run(x)
        assert not vgg16.features[1].inplace  # its input was captured: it ran out of place
    assert vgg16.features[1].inplace and _no_hooks(vgg16)
    conv0 = F.conv2d(x, vgg16.features[0].weight, vgg16.features[0].bias, padding=1)
    torch.testing.assert_close(out["features.0"], conv0)
    assert (out["features.0"] < 0).any()  # not overwritten by the in-place ReLU
    torch.testing.assert_close(out["features.1"], conv0.relu())
    conv2 = vgg16.features[2]
    torch.testing.assert_close(out["features.2"], F.conv2d(conv0.relu(), conv2.weight, conv2.bias, padding=1))


def test_capture_block_output_matches_manual(resnet18: nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), capture(resnet18, ["layer1.0", "maxpool"]) as cap:
        out = cap.run(x)
        assert resnet18.relu.inplace  # the stem's ReLU overwrites bn1's output, which is not captured
        stem = resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x))))
        torch.testing.assert_close(out["maxpool"], stem)
        torch.testing.assert_close(out["layer1.0"], resnet18.layer1[0](stem))


def test_capture_removes_hooks_on_exception(resnet18: nn.Module) -> None:
    with pytest.raises(RuntimeError), capture(resnet18, ["layer1.0"]) as cap:
        cap.run(torch.randn(1, 5, 32, 32))  # wrong channel count: the forward raises
    assert _no_hooks(resnet18) and resnet18.relu.inplace and resnet18.layer1[0].relu.inplace
    with pytest.raises(ValueError), capture(resnet18, ["conv1"]):
        raise ValueError("boom")
    assert _no_hooks(resnet18) and resnet18.relu.inplace


def test_capture_stop_early_stops(resnet18: nn.Module) -> None:
    fired: list[str] = []
    handle = resnet18.layer2.register_forward_hook(lambda m, i, o: fired.append("layer2"))
    try:
        with capture(resnet18, ["layer1.1", "conv1"], stop_early=True) as cap:
            out = cap.run(torch.randn(1, 3, 64, 64))
        assert set(out) == {"conv1", "layer1.1"} and fired == []
        with capture(resnet18, ["layer1.1"]) as cap:
            cap.run(torch.randn(1, 3, 64, 64))
        assert fired == ["layer2"]
    finally:
        handle.remove()
    assert _no_hooks(resnet18)


def test_capture_keeps_autograd_graph(resnet18: nn.Module) -> None:
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    with capture(resnet18, ["layer1.0"], stop_early=True) as cap:
        cap.run(x)["layer1.0"][0, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_capture_errors(resnet18: nn.Module) -> None:
    with pytest.raises(UnknownLayerError, match=r"did you mean 'layer1\.0\.conv1'"):
        capture(resnet18, ["layer1.0.cnv1"])
    cap = capture(resnet18, ["conv1"])
    with pytest.raises(RuntimeError, match="with capture"):
        cap.run(torch.randn(1, 3, 32, 32))


def test_tiny_models_and_plainnets() -> None:
    models = pytest.importorskip("rfcore.models")
    tiny = models.get_model("resnet10t")
    assert resolve_layers(tiny, "default") == [
        "conv1",
        "maxpool",
        "layer1.0",
        "layer2.0",
        "layer3.0",
        "layer4.0",
    ]
    assert list_layers(tiny)[0].shape == (32, 32)  # 64 px input from its metadata
    plain = models.get_model("plainnet10t")
    names = [layer.name for layer in list_layers(plain)]
    assert "layer2.0" in names and not [n for n in names if "downsample" in n]
    assert resolve_layers(plain, "default") == resolve_layers(tiny, "default")
    plain18 = [layer for layer in list_layers(models.get_model("plainnet18"), 64) if layer.kind == "block"]
    assert len(plain18) == 8


def test_capture_ignores_other_threads_and_serializes_captures(resnet18: nn.Module) -> None:
    """A worker's cached model serves several task threads: a forward in another thread while a
    capture is open is not recorded, and a second capture waits for the first to close."""
    import threading

    x, other = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 64, 64)
    entered = threading.Event()
    with torch.no_grad(), capture(resnet18, ["layer1.0"]) as cap:
        worker = threading.Thread(target=lambda: resnet18(other))
        worker.start()
        worker.join()
        assert cap.outputs == {}  # the other thread's forward left no output here
        out = cap.run(x)["layer1.0"]

        def second() -> None:
            with capture(resnet18, ["conv1"]):
                entered.set()

        waiter = threading.Thread(target=second)
        waiter.start()
        assert not entered.wait(0.3)  # blocked while this capture is open
    waiter.join(timeout=10)
    assert entered.is_set() and _no_hooks(resnet18)
    assert out.shape[0] == 1


class _SharedConvOutput(nn.Module):
    """The conv's output feeds its BatchNorm and the sum: folding would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


class _ConvRunTwice(_SharedConvOutput):
    """`conv` runs twice (one fold would serve both calls) and `conv2`'s output is changed in place
    after its BatchNorm read it: neither pair may be folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.bn(self.conv(self.conv(x))))
        out = self.bn2(y)
        y.mul_(2.0)
        return out + y.mean()


def _randomize_batchnorms(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            with torch.no_grad():
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


@pytest.mark.parametrize(
    ("make", "folded"),
    [(tvm.resnet18, 20), (_SharedConvOutput, 1), (_ConvRunTwice, 0)],
    ids=["resnet18", "shared-output", "run-twice-changed-later"],
)
def test_folded_copy_computes_the_same_function(make: Callable[[], nn.Module], folded: int) -> None:
    model = _randomize_batchnorms(make())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = folded_copy(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-4)
    assert sum(isinstance(m, nn.Identity) for m in net.modules()) == folded
    assert not any(p.requires_grad for p in net.parameters())
    # the model itself is untouched
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (20 if folded == 20 else 2)
    # a model in training mode keeps its BatchNorms (their batch statistics cannot be folded)
    assert not any(isinstance(m, nn.Identity) for m in folded_copy(model.train()).modules())


def test_folded_copy_leaves_other_threads_forward_passes_alone(
    resnet18: nn.Module, other_thread_forwards: Callable[[], list[Exception]]
) -> None:
    """Folding inspects only its own copy: a forward pass in another thread meanwhile is untouched
    (symbolic tracing patches `Module.__call__` process-wide and broke such passes)."""
    for _ in range(4):
        folded_copy(resnet18)
    assert other_thread_forwards() == []
