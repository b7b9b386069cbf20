"""rfcore.panels (Fig. 3, 5, 7 arrays) and rfcore.similarity (§3.3 per-stage measure) against
brute-force NumPy and planted relations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from rfcore.panels import filter_and_stimuli, filter_image, stimulus_image, virtual_filter_panel
from rfcore.similarity import channel_similarity, cross_block_similarity, stage_pairs
from rfcore.virtual import compose


def test_filter_image_keeps_sign_around_grey() -> None:
    w = np.zeros((3, 2, 2))
    w[0, 0, 0], w[1, 1, 1] = 2.0, -1.0
    img = filter_image(w)
    assert img.shape == (2, 2, 3)
    assert img[0, 0, 0] == 1.0 and img[1, 1, 1] == 0.25 and img[0, 1, 2] == 0.5
    assert (filter_image(np.zeros((3, 1, 1))) == 0.5).all()


def test_stimulus_image_fills_cells_without_pixels() -> None:
    s = np.full((3, 2, 2), 255.0)
    s[:, 0, 0] = np.nan
    s[2] = 51.0
    s[2, 0, 0] = np.nan
    img = stimulus_image(s)
    np.testing.assert_allclose(img[0, 0], [1.0, 1.0, 0.2], rtol=1e-6)  # mean colour of the valid cells
    np.testing.assert_allclose(stimulus_image(s, fill=(0.5, 0.5, 0.5))[0, 0], 0.5)


def test_filter_and_stimuli_pick_the_same_channel_everywhere() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3))
    stims = {"a": rng.uniform(0, 255, (4, 3, 5, 5)), "b": rng.uniform(0, 255, (4, 3, 9, 9))}
    panel = filter_and_stimuli(2, w, stims, {"a": 7, "b": 3})
    np.testing.assert_array_equal(panel.filter, filter_image(w[2]))
    np.testing.assert_array_equal(panel.stimuli["b"], stimulus_image(stims["b"][2]))
    assert list(panel.stimuli) == ["a", "b"] and panel.positives == {"a": 7, "b": 3}
    with pytest.raises(ValueError):
        filter_and_stimuli(4, w, stims)


def test_virtual_filter_panel_matches_eq3_brute_force() -> None:
    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(5, 3, 3, 3))
    w2 = rng.normal(size=(4, 5, 3, 3))
    p = 2
    coupling = np.empty(5)
    for k in range(5):  # eq. 3: the tap of largest magnitude, with its sign
        i, j = np.unravel_index(np.abs(w2[p, k]).argmax(), (3, 3))
        coupling[k] = w2[p, k, i, j]
    virtual = sum(coupling[k] * w1[k] for k in range(5))
    panel = virtual_filter_panel(p, w1, w2)
    order = sorted(range(5), key=lambda k: -coupling[k])
    assert panel.order.tolist() == order
    np.testing.assert_allclose(panel.coupling, coupling[order], rtol=1e-6)
    np.testing.assert_allclose(panel.virtual, filter_image(virtual), rtol=1e-5, atol=1e-6)
    for j, k in enumerate(order):
        np.testing.assert_array_equal(panel.filters[j], filter_image(w1[k]))
    torch_virtual = compose(torch.from_numpy(w2).float(), torch.from_numpy(w1).float())[p].numpy()
    np.testing.assert_allclose(filter_image(torch_virtual), panel.virtual, atol=1e-5)
    stored = virtual_filter_panel(p, w1, coupling=coupling[order], order=np.array(order), virtual=virtual)
    np.testing.assert_allclose(stored.virtual, panel.virtual, atol=1e-6)


def test_stage_pairs_follow_equal_widths_within_a_stage() -> None:
    layers = ["conv1", "maxpool", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0"]
    ch = {
        "conv1": 8,
        "maxpool": 8,
        "layer1.0": 8,
        "layer1.1": 8,
        "layer2.0": 16,
        "layer2.1": 16,
        "layer3.0": 16,
    }
    assert stage_pairs(layers, ch) == {
        "layer1": [("maxpool", "layer1.0"), ("layer1.0", "layer1.1")],
        "layer2": [("layer2.0", "layer2.1")],
    }  # layer3.0 has as many channels as layer2.1 but starts another stage


def test_channel_similarity_brute_force() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    a[3] = np.nan  # a skipped image
    b[:, 2] = 1.0  # a constant channel
    got = channel_similarity(a, b)
    keep = np.arange(50) != 3
    for c in (0, 1, 3):
        assert got[c] == pytest.approx(np.corrcoef(a[keep, c], b[keep, c])[0, 1])
    assert np.isnan(got[2])
    ta = np.array([[1, 2, 3, -1], [4, 5, 6, 7]])
    tb = np.array([[3, 1, 9, 8], [0, 1, 2, 3]])
    assert channel_similarity(ta, tb, "topk").tolist() == [0.5, 0.0]


class _Layer:
    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.attrs = {"channels": arrays["activation"].shape[1]}

    def array(self, path: str) -> np.ndarray:
        return self.arrays[path]


class _Atlas:
    def __init__(self, layers: dict[str, dict[str, np.ndarray]]) -> None:
        self._layers = layers
        self.layers = list(layers)

    def layer(self, name: str) -> _Layer:
        return _Layer(self._layers[name])


def _fake(skip: bool, rng: np.random.Generator) -> Any:
    n, c = 400, 6
    pool = rng.exponential(size=(n, c))
    block = (pool if skip else 0.0) + rng.exponential(size=(n, c))  # planted: the skip carries channel c

    def arrays(act: np.ndarray) -> dict[str, np.ndarray]:
        return {"activation": act, "topk/image": np.argsort(-act, axis=0, kind="stable")[:8].T}

    return _Atlas({"maxpool": arrays(pool), "layer1.0": arrays(block)})


def test_cross_block_similarity_sees_a_planted_skip() -> None:
    rng = np.random.default_rng(3)
    res, plain = _fake(True, rng), _fake(False, rng)
    r, p = cross_block_similarity(res), cross_block_similarity(plain)
    assert r["layer1"] > 0.5 and abs(p["layer1"]) < 0.15
    assert cross_block_similarity(res, "topk")["layer1"] > cross_block_similarity(plain, "topk")["layer1"]
