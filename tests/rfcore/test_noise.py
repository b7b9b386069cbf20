"""Ground truth for the noise-injection test on hand-made nets (conv → ReLU → max-pool → ... → linear)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from rfcore.errors import RfatlasError
from rfcore.noise import (
    CONDITIONS,
    NoiseInjector,
    PerImage,
    block_channels,
    bootstrap_ci,
    check_conditions,
    evaluate,
    image_normal,
    injected,
    summarize,
)

DEAD = (1, 5)
CHANNELS = 8


@dataclass
class FakeBatch:
    images: Tensor
    labels: Tensor
    indices: Tensor


def make_net(*, downstream: str = "wired") -> nn.Sequential:
    """conv1 with channels DEAD forced off → ReLU → max-pool → conv2 → ReLU → avg → fc (4 classes).

    downstream: 'wired' (dead channels push class 0 through conv2/fc), 'zero' (their conv2 weights are 0).
    """
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, CHANNELS, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(CHANNELS, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )
    with torch.no_grad():
        conv1, conv2 = cast(nn.Conv2d, net[0]), cast(nn.Conv2d, net[3])
        fc = cast(nn.Linear, net[7])
        bias = conv1.bias
        assert bias is not None
        bias.fill_(0.2)
        conv1.weight[list(DEAD)] = 0.0
        bias[list(DEAD)] = -1.0
        conv2.weight[:, list(DEAD)] = 0.0
        if downstream == "wired":
            conv2.weight[0, list(DEAD), 1, 1] = 3.0
            fc.weight[0] = 0.0
            fc.weight[0, 0] = 4.0
    return net.eval()


def data(n: int = 48, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.ones(n, dtype=torch.int64)  # never class 0, which the dead channels push up
    return images, labels


def batches(images: Tensor, labels: Tensor, indices: range, batch_size: int) -> list[FakeBatch]:
    out = []
    for s in range(indices.start, indices.stop, batch_size):
        sl = slice(s, min(s + batch_size, indices.stop))
        out.append(FakeBatch(images[sl], labels[sl], torch.arange(sl.start, sl.stop)))
    return out


def normalize(x: Tensor) -> Tensor:
    return x.float() / 127.5 - 1.0


def dead_mask() -> np.ndarray:
    m = np.zeros(CHANNELS, dtype=bool)
    m[list(DEAD)] = True
    return m


def run(net: nn.Module, cond: str, bs: int = 8, idx: range = range(48), **kw: Any) -> PerImage:
    images, labels = data()
    return evaluate(
        net,
        "2",
        batches(images, labels, idx, bs),
        condition=cond,
        inactive=dead_mask(),
        normalize=normalize,
        block_size=bs,
        **kw,
    )


def all_conditions(net: nn.Module, **kw: Any) -> dict[str, PerImage]:
    return {c: run(net, c, **kw) for c in CONDITIONS}


def test_image_normal_is_standard_and_per_image_reproducible() -> None:
    idx = torch.arange(1000, 1400)
    z = image_normal(idx, (3, 25), seed=7, stream=1)
    assert z.shape == (400, 3, 25) and z.dtype == torch.float32
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1.0) < 0.02
    assert abs(float((z > 1.96).float().mean()) - 0.025) < 0.005
    # an image's noise depends only on (seed, stream, index), not on its batch
    again = image_normal(torch.tensor([1399, 1000]), (3, 25), seed=7, stream=1)
    assert torch.equal(again[0], z[-1]) and torch.equal(again[1], z[0])
    assert not torch.equal(image_normal(idx[:1], (3, 25), seed=7, stream=2)[0], z[0])
    assert not torch.equal(image_normal(idx[:1], (3, 25), seed=8, stream=1)[0], z[0])
    # neighbouring images are uncorrelated
    flat = z.flatten(1)
    assert abs(float(torch.corrcoef(torch.stack([flat[:-1].flatten(), flat[1:].flatten()]))[0, 1])) < 0.02


def test_block_channels_choices() -> None:
    mask = dead_mask()
    assert block_channels("baseline", mask, 0, seed=0).tolist() == []
    assert block_channels("all", mask, 0, seed=0).tolist() == list(DEAD)
    picks = {int(block_channels("random-one", mask, b, seed=0)[0]) for b in range(40)}
    assert picks == set(DEAD)
    for b in range(20):
        ctrl = block_channels("control", mask, b, seed=3)
        assert len(ctrl) == len(DEAD) and not mask[ctrl].any() and len(set(ctrl.tolist())) == len(DEAD)
    assert np.array_equal(
        block_channels("control", mask, 4, seed=3), block_channels("control", mask, 4, seed=3)
    )
    assert block_channels("random-one", np.zeros(4, bool), 0, seed=0).tolist() == []


def test_unknown_condition_is_a_one_line_error() -> None:
    with pytest.raises(RfatlasError, match="unknown noise condition 'loud'"):
        check_conditions(["all", "loud"])
    with pytest.raises(RfatlasError, match="unknown noise condition"):
        NoiseInjector("loud", dead_mask(), sigma=1.0, seed=0, block_size=4)


def test_injector_noises_exactly_the_chosen_channels() -> None:
    inj = NoiseInjector("all", dead_mask(), sigma=1.0, seed=0, block_size=4)
    out = torch.zeros(4, CHANNELS, 5, 5)
    inj.set_batch(torch.arange(4), torch.device("cpu"))
    noisy = inj(out)
    assert noisy is not None
    touched = (noisy != 0).flatten(2).any(dim=2).any(dim=0)
    assert touched.tolist() == dead_mask().tolist()
    assert bool((noisy >= 0).all())
    assert 0.3 < float((noisy[:, list(DEAD)] > 0).float().mean()) < 0.7  # max(z, 0): half the positions


@pytest.mark.parametrize("condition", ["random-one", "control"])
def test_random_conditions_noise_one_draw_per_block(condition: str) -> None:
    """random-one: exactly one inactive channel per mini-batch block; control: as many active ones;
    the draw is shared by the images of a block."""
    inj = NoiseInjector(condition, dead_mask(), sigma=1.0, seed=3, block_size=4)
    out = torch.zeros(12, CHANNELS, 5, 5)
    inj.set_batch(torch.arange(12), torch.device("cpu"))
    noisy = inj(out)
    assert noisy is not None
    touched = (noisy != 0).flatten(2).any(dim=2)  # (image, channel)
    want = 1 if condition == "random-one" else len(DEAD)
    pool = set(DEAD) if condition == "random-one" else set(range(CHANNELS)) - set(DEAD)
    per_block = [touched[b : b + 4].nonzero()[:, 1].unique().tolist() for b in range(0, 12, 4)]
    for b, chans in enumerate(per_block):
        assert len(chans) == want and set(chans) <= pool
        assert (touched[4 * b : 4 * b + 4].sum(dim=1) == want).all()  # each image: the block's channels
        assert chans == block_channels(condition, dead_mask(), b, seed=3).tolist()


def test_dead_channel_wired_to_classifier_raises_loss_with_ci_excluding_zero() -> None:
    res = all_conditions(make_net(downstream="wired"))
    s = summarize(
        {c: r.loss for c, r in res.items()},
        {c: r.correct1 for c, r in res.items()},
        {c: r.correct5 for c, r in res.items()},
    )
    assert s["all"]["delta_loss"] > 0 and s["all"]["delta_loss_ci"][0] > 0
    assert s["random-one"]["delta_loss"] > 0 and s["random-one"]["delta_loss_ci"][0] > 0
    assert s["all"]["images"] == 48 and s["baseline"]["top1"] >= s["all"]["top1"]


def test_dead_channel_with_zero_downstream_weights_changes_nothing_bitwise() -> None:
    res = all_conditions(make_net(downstream="zero"))
    for cond in ("all", "random-one"):
        assert res[cond].loss.tobytes() == res["baseline"].loss.tobytes()
    s = summarize(
        {c: r.loss for c, r in res.items()},
        {c: r.correct1 for c, r in res.items()},
        {c: r.correct5 for c, r in res.items()},
    )
    assert s["all"]["delta_loss"] == 0.0 and s["all"]["delta_loss_ci"] == [0.0, 0.0]
    assert s["random-one"]["delta_loss"] == 0.0
    assert s["control"]["delta_loss"] != 0.0  # ordinary channels do matter


def test_shards_merged_equal_one_pass() -> None:
    net = make_net()
    for cond in CONDITIONS:
        whole = run(net, cond, seed=5)
        parts = [run(net, cond, idx=r, seed=5) for r in (range(0, 16), range(16, 40), range(40, 48))]
        assert np.array_equal(np.concatenate([p.indices for p in parts]), whole.indices)
        assert np.concatenate([p.loss for p in parts]).tobytes() == whole.loss.tobytes()
        assert np.array_equal(np.concatenate([p.correct5 for p in parts]), whole.correct5)


def test_noise_is_independent_of_batch_composition_and_seeded() -> None:
    net = make_net()
    a = run(net, "all", bs=8, seed=1)
    later_first = [run(net, "all", bs=8, seed=1, idx=r) for r in (range(24, 48), range(0, 24))]
    assert np.concatenate([p.loss for p in later_first[::-1]]).tobytes() == a.loss.tobytes()
    images, labels = data()
    odd = evaluate(
        net,
        "2",
        batches(images, labels, range(48), 5),
        condition="all",
        inactive=dead_mask(),
        normalize=normalize,
        block_size=8,
        seed=1,
    )
    np.testing.assert_allclose(odd.loss, a.loss, rtol=1e-5)
    assert not np.array_equal(run(net, "all", seed=2).loss, a.loss)


def test_sigma_zero_equals_baseline() -> None:
    net = make_net()
    assert run(net, "all", sigma=0.0).loss.tobytes() == run(net, "baseline").loss.tobytes()


def test_bootstrap_ci_is_seeded_and_covers_mean() -> None:
    v = np.random.default_rng(0).normal(1.0, 1.0, 500)
    lo, hi = bootstrap_ci(v, seed=3)
    assert (lo, hi) == bootstrap_ci(v, seed=3)
    assert lo < v.mean() < hi and hi - lo < 0.3
    assert bootstrap_ci(np.zeros(10)) == (0.0, 0.0)


def test_summary_pairs_only_valid_images() -> None:
    base = np.array([1.0, np.nan, 2.0], np.float32)
    cond = np.array([2.0, np.nan, 2.5], np.float32)
    hits = np.array([True, False, False])
    s = summarize(
        {"baseline": base, "all": cond}, {"baseline": hits, "all": hits}, {"baseline": hits, "all": hits}
    )
    assert s["baseline"]["images"] == 2 and s["baseline"]["loss"] == 1.5 and s["baseline"]["top1"] == 0.5
    assert s["all"]["delta_loss"] == 0.75


def test_injected_noise_acts_only_on_its_own_threads_forward() -> None:
    """`injected` edits the layer through `capture`: a forward of the shared model in another thread
    is left alone."""
    import threading

    net = make_net()
    inj = NoiseInjector("all", dead_mask(), sigma=1.0, seed=0, block_size=4)
    inj.set_batch(torch.arange(4), torch.device("cpu"))
    x = normalize(data()[0][:4])
    with torch.inference_mode():
        clean = net(x)
        seen: list[torch.Tensor] = []
        with injected(net, "2", inj):
            t = threading.Thread(target=lambda: seen.append(net(x)))
            t.start()
            t.join()
            noisy = net(x)
    assert torch.equal(seen[0], clean) and not torch.equal(noisy, clean)


@pytest.mark.needs_cuda
def test_cuda_amp_path_matches_cpu_noise_and_is_shard_exact() -> None:
    cuda = torch.device("cuda")
    idx = torch.arange(100, 164)
    z_cpu = image_normal(idx, (3, 7, 7), seed=2, stream=1)
    z_gpu = image_normal(idx.to(cuda), (3, 7, 7), seed=2, stream=1).cpu()
    torch.testing.assert_close(z_gpu, z_cpu, rtol=1e-5, atol=1e-5)  # same integer hash on both devices
    net = make_net().to(cuda)
    images, labels = data()
    pinned = [FakeBatch(b.images.pin_memory(), b.labels.pin_memory(), b.indices.pin_memory())
              for b in batches(images, labels, range(48), 8)]  # fmt: skip
    kw: dict[str, Any] = {"inactive": dead_mask(), "normalize": normalize, "block_size": 8, "device": cuda}
    whole = {c: evaluate(net, "2", pinned, condition=c, **kw) for c in CONDITIONS}
    parts = [evaluate(net, "2", pinned[i : i + 2], condition="random-one", **kw) for i in range(0, 6, 2)]
    assert np.concatenate([p.loss for p in parts]).tobytes() == whole["random-one"].loss.tobytes()
    assert whole["all"].loss.mean() > whole["baseline"].loss.mean()  # the wired dead channels matter
    fp32 = evaluate(net, "2", pinned, condition="all", amp=False, **kw)
    np.testing.assert_allclose(fp32.loss, whole["all"].loss, rtol=0.05, atol=0.05)  # AMP bf16 ≈ fp32


def test_block_ids_mix_classes_and_are_seeded() -> None:
    from rfcore.noise import block_ids

    blocks = block_ids(100, 8, seed=5)
    assert np.array_equal(blocks, block_ids(100, 8, seed=5))
    assert not np.array_equal(blocks, block_ids(100, 8, seed=6))
    assert np.bincount(blocks).tolist() == [8] * 12 + [4]  # blocks of block_size, last smaller
    labels = np.arange(100) // 10  # a class-sorted folder: 10 classes of 10 consecutive images
    assert all(len(np.unique(labels[blocks == b])) > 1 for b in range(12))


def test_injector_draws_one_channel_set_per_permuted_block() -> None:
    from rfcore.noise import block_ids

    inj = NoiseInjector("random-one", dead_mask(), sigma=1.0, seed=3, block_size=4, num_images=12)
    blocks = block_ids(12, 4, seed=3)
    inj.set_batch(torch.arange(12), torch.device("cpu"))
    out = inj(torch.zeros(12, CHANNELS, 3, 3))
    touched = out.flatten(2).amax(dim=2) > 0
    for b in range(3):
        rows = touched[torch.from_numpy(blocks == b)]
        want = block_channels("random-one", dead_mask(), b, seed=3).tolist()
        assert rows.any(dim=0).nonzero()[:, 0].tolist() == want


def test_block_bootstrap_covers_the_true_mean_at_the_nominal_rate() -> None:
    """Simulated ΔL with a known mean: every block of 8 images shares a random effect (its channel
    draw), so images are dependent. The block bootstrap's 95% CIs cover the truth ≈95% of the time;
    the image bootstrap's are too narrow."""
    rng = np.random.default_rng(0)
    truth, reps, n_blocks, size = 0.3, 300, 40, 8
    blocks = np.repeat(np.arange(n_blocks), size)
    hit_block = hit_image = 0
    for r in range(reps):
        effect = rng.exponential(truth, n_blocks)  # mean `truth`, skewed like a loss increase
        values = effect[blocks] + rng.normal(0, 0.05, len(blocks))
        lo, hi = bootstrap_ci(values, blocks=blocks, seed=r, n_boot=600)
        hit_block += lo <= truth <= hi
        lo, hi = bootstrap_ci(values, seed=r, n_boot=600)
        hit_image += lo <= truth <= hi
    assert 0.89 <= hit_block / reps <= 0.98, hit_block / reps
    assert hit_image / reps < 0.6, hit_image / reps


def test_near_inactive_is_the_lowest_fraction_of_maxima() -> None:
    from rfcore.noise import near_inactive

    rng = np.random.default_rng(0)
    maxima = rng.uniform(0.1, 5.0, 64)
    maxima[[3, 9]] = 0.0  # two exactly inactive channels
    mask = near_inactive(maxima, 0.05)  # ceil(0.05 * 64) = 4 channels
    lowest = sorted(range(64), key=lambda c: (maxima[c], c))[:4]
    assert np.flatnonzero(mask).tolist() == sorted(lowest)
    assert mask[[3, 9]].all()  # contains the paper's inactive channels
    assert near_inactive(np.array([2.0, 1.0, 1.0]), 0.01).tolist() == [
        False,
        True,
        False,
    ]  # >= 1, tie -> low index
