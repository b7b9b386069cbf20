"""rfcore.models: registry, tiny models, PlainNet wiring, seeding, checkpoints and their safety, devices."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import socket
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rfcore.errors import CheckpointError, RfatlasError, UnknownModelError
from rfcore.models import (
    CHECKPOINT_FORMAT,
    ModelMeta,
    Preprocessing,
    default_preprocessing,
    get_model,
    list_models,
    model_meta,
    save_checkpoint,
    select_device,
)

TINY = ["resnet10t", "plainnet10t"]


def test_registry_lists_every_contract_model() -> None:
    assert set(list_models()) == {
        "resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn", "alexnet",
        "plainnet18", "plainnet34", "resnet10t", "plainnet10t",
    }  # fmt: skip


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_shape_names_and_meta(name: str) -> None:
    model = get_model(name)
    assert not model.training
    meta = model_meta(model)
    family = "plainnet" if name.startswith("plain") else "resnet"
    assert meta == ModelMeta(name, None, 10, family, default_preprocessing(name))
    assert meta.preprocessing.size == meta.preprocessing.resize == 64
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 500_000
    names = {n for n, _ in model.named_modules()}
    for expected in ["conv1", "bn1", "relu", "maxpool", "avgpool", "fc", "layer1.0.conv1", "layer1.0.bn2",
                     "layer4.0.conv2", "layer4.0.bn2"]:  # fmt: skip
        assert expected in names
    assert "layer1.1" not in names  # one block per stage
    assert ("layer2.0.downsample" in names) == (name == "resnet10t")
    assert (
        isinstance(model.conv1, nn.Conv2d)
        and model.conv1.kernel_size == (7, 7)
        and model.conv1.stride == (2, 2)
    )
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = model(meta.preprocessing.normalize(x))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert get_model(name, num_classes=3)(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics so an eval-mode block is not close to an identity map by accident."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@pytest.mark.parametrize("block_name", ["layer1.0", "layer3.0"])
def test_plainnet_block_has_no_skip_and_resnet_block_has_one(block_name: str) -> None:
    for name in TINY:
        model = get_model(name)
        _randomize_bn(model)
        block: Any = model.get_submodule(block_name)  # a torchvision BasicBlock (untyped)
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        with torch.no_grad():
            main = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
            got = block(x.clone())
            if name == "plainnet10t":
                expected = F.relu(main)
            else:
                identity = block.downsample(x) if block.downsample is not None else x
                expected = F.relu(main + identity)
                assert not torch.allclose(got, F.relu(main), atol=1e-3)  # the skip does matter here
        torch.testing.assert_close(got, expected)


def test_plainnet18_is_resnet18_minus_skips() -> None:
    plain, res = get_model("plainnet18"), get_model("resnet18")
    plain_names = [n for n, _ in plain.named_modules()]
    res_names = [n for n, _ in res.named_modules()]
    assert not any("downsample" in n for n in plain_names)
    assert plain_names == [n for n in res_names if "downsample" not in n]
    assert "layer2.0.downsample" in res_names
    assert model_meta(plain).family == "plainnet"


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a = get_model("resnet10t", seed=3).state_dict()
    b = get_model("resnet10t", seed=3).state_dict()
    c = get_model("resnet10t", seed=4).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_unknown_model_suggests_close_match() -> None:
    with pytest.raises(UnknownModelError, match=r"unknown model 'resnet81'; did you mean 'resnet18'\?"):
        get_model("resnet81")
    with pytest.raises(UnknownModelError) as info:
        get_model("plainet10t")
    assert "did you mean 'plainnet10t'" in str(info.value) and "\n" not in str(info.value)


def test_model_meta_requires_registry_model() -> None:
    with pytest.raises(UnknownModelError, match="no rfatlas metadata"):
        model_meta(nn.Linear(2, 2))


def test_normalize_matches_formula_and_rejects_float() -> None:
    pre = Preprocessing(size=2, resize=2, mean=(0.1, 0.5, 0.9), std=(0.2, 0.25, 0.5))
    images = torch.tensor([0, 51, 255, 128], dtype=torch.uint8).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    out = pre.normalize(images)
    assert out.dtype == torch.float32 and out.device == images.device
    expected = torch.stack([(images[0, c].double() / 255 - pre.mean[c]) / pre.std[c] for c in range(3)])
    torch.testing.assert_close(out[0].double(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RfatlasError, match="uint8"):
        pre.normalize(images.float())


def _perturbed(name: str) -> nn.Module:
    """A model whose every tensor (BN running stats included) differs from a fresh one."""
    model = get_model(name, seed=11)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01)
    return model


@pytest.mark.parametrize("where", ["local", "memory"])
def test_checkpoint_round_trip(where: str, tmp_path: Path) -> None:
    url = str(tmp_path / "sub" / "ck.pt") if where == "local" else f"memory://ckpt/{os.getpid()}/ck.pt"
    model = _perturbed("plainnet10t")
    save_checkpoint(model, url, config={"lr": 0.1, "crop": (0.5, 1.0)}, metrics={"val_accuracy": 0.75})
    loaded = get_model("plainnet10t", weights=url)
    with fsspec.open(url, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    assert model_meta(loaded) == ModelMeta(
        "plainnet10t", url, 10, "plainnet", default_preprocessing("plainnet10t"), digest
    )
    assert not loaded.training
    ref, got = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with fsspec.open(url, "rb") as f:
        raw = torch.load(f, map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["model"] == "plainnet10t" and raw["num_classes"] == 10
    assert raw["config"] == {"lr": 0.1, "crop": (0.5, 1.0)} and raw["metrics"] == {"val_accuracy": 0.75}


def test_bare_state_dict_loads_and_infers_classes(tmp_path: Path) -> None:
    model = get_model("resnet10t", num_classes=4, seed=5)
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    loaded = get_model("resnet10t", weights=str(path))
    assert model_meta(loaded).num_classes == 4
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="has 4 classes, not num_classes=10"):
        get_model("resnet10t", weights=str(path), num_classes=10)


def test_checkpoint_for_other_architecture_is_refused(tmp_path: Path) -> None:
    url = str(tmp_path / "res.pt")
    save_checkpoint(get_model("resnet10t"), url, config={}, metrics={})
    with pytest.raises(CheckpointError, match=r"is for model 'resnet10t', not 'plainnet10t'"):
        get_model("plainnet10t", weights=url)


def test_key_mismatch_names_the_keys(tmp_path: Path) -> None:
    state = get_model("resnet10t").state_dict()
    path = tmp_path / "res_as_plain.pt"
    torch.save(state, path)  # a bare state_dict carries no model name: only the keys can tell
    with pytest.raises(CheckpointError) as info:
        get_model("plainnet10t", weights=str(path))
    msg = str(info.value)
    assert "unexpected keys layer2.0.downsample.0.weight" in msg and "\n" not in msg
    del state["fc.bias"], state["layer1.0.bn1.running_var"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys layer1\.0\.bn1\.running_var, fc\.bias"):
        get_model("resnet10t", weights=str(path))


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    state = get_model("resnet10t").state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(16, 16, 5, 5)
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"shape mismatch .*layer1\.0\.conv1\.weight \(16, 16, 5, 5\)"):
        get_model("resnet10t", weights=str(path))


class _Payload:
    """Unpickling this calls os.mkdir(marker): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_malicious_checkpoint_is_refused_without_running_it(container: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state: dict[str, Any] = dict(get_model("resnet10t").state_dict())
    state["fc.bias"] = _Payload(marker)
    if container == "torch-zip":
        torch.save(
            {"format": CHECKPOINT_FORMAT, "model": "resnet10t", "num_classes": 10, "state_dict": state}, path
        )
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(CheckpointError, match="refusing checkpoint") as info:
        get_model("resnet10t", weights=str(path))
    assert "\n" not in str(info.value)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it (so the assertion above can fail).
    if container == "torch-zip":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.is_dir()


def test_unreadable_checkpoints_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        get_model("resnet10t", weights=str(tmp_path / "absent.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError) as info:
        get_model("resnet10t", weights=str(junk))
    assert "\n" not in str(info.value)
    buf = io.BytesIO()
    torch.save({"format": "something-else", "weights": [1, 2]}, buf)
    (tmp_path / "other.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="neither an rfatlas-checkpoint-v1 checkpoint nor a state_dict"):
        get_model("resnet10t", weights=str(tmp_path / "other.pt"))


def test_save_checkpoint_refuses_values_that_would_not_reload() -> None:
    with pytest.raises(CheckpointError, match=r"config\.path must hold only"):
        save_checkpoint(get_model("resnet10t"), "memory://x/ck.pt", config={"path": Path("/x")}, metrics={})


def test_torchvision_weights_errors_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="plainnet18 has no torchvision weights 'IMAGENET1K_V1'"):
        get_model("plainnet18", weights="IMAGENET1K_V1")
    with pytest.raises(
        CheckpointError, match=r"unknown torchvision weights 'IMAGENET1K_V9' for resnet18 \(known: "
    ):
        get_model("resnet18", weights="IMAGENET1K_V9")
    with pytest.raises(CheckpointError, match="have 1000 classes, not num_classes=10"):
        get_model("resnet18", weights="DEFAULT", num_classes=10)

    # A real download attempt into an empty cache, with the network cut off: clean one-line error.
    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise OSError("network disabled in tests")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(
        CheckpointError, match=r"cannot load torchvision weights alexnet IMAGENET1K_V1 \("
    ) as info:
        get_model("alexnet", weights="DEFAULT")
    assert "\n" not in str(info.value)


def test_select_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RfatlasError, match="unknown device 'gpu0'"):
        select_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(RfatlasError, match="'cuda:1' requested but CUDA is not available"):
        select_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RfatlasError, match=r"'cuda:1' requested but only 1 CUDA device\(s\) exist"):
        select_device("cuda:1")
    assert select_device("cuda:0") == torch.device("cuda:0")
