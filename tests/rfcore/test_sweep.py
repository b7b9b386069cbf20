"""rfcore.sweep against a brute-force NumPy reference: top-k, mean stimulus, stats, merges."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import rfcore.sweep as sweep_module
from rfcore.data import ImageDataset
from rfcore.receptive import RField
from rfcore.sweep import (
    FIXED_POINT_BITS,
    LayerReducer,
    PatchGeometry,
    crop_topk_patches,
    pack_state,
    packed_words,
    patch_geometry,
    pool_images,
    unpack_state,
)

# Tiny net, its layers and their hand-computed receptive fields (input pixel units).
TINY_RF = {
    "a": RField((3, 3), (1, 1), (0.0, 0.0)),  # conv3 s1 p1
    "b": RField((7, 7), (2, 2), (0.0, 0.0)),  # conv5 s2 p2
    "c": RField((11, 11), (4, 4), (0.0, 0.0)),  # maxpool3 s2 p1
    "d": RField((19, 19), (8, 8), (4.0, 4.0)),  # conv3 s2 p0
}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, 1, 1)
        self.b = nn.Conv2d(4, 5, 5, 2, 2)
        with torch.no_grad():
            self.b.weight.sub_(0.012)  # biased negative: some channels never positive on some images
        self.c = nn.MaxPool2d(3, 2, 1)
        self.d = nn.Conv2d(5, 6, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.a(x)
        b = torch.relu(self.b(torch.relu(a)))
        c = self.c(b)
        return {"a": a, "b": b, "c": c, "d": self.d(c)}  # "a" and "d" are pre-ReLU (negatives, no zeros)


class ArrayDataset(ImageDataset):
    """Minimal ImageDataset over an in-memory uint8 array."""

    def __init__(self, images: np.ndarray) -> None:
        super().__init__("array", images.shape[-1], images.shape[-1], [])
        self.images = images
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int) -> tuple[np.ndarray, int]:
        self.reads.append(index)
        return self.images[index], 0


def make_images(n: int = 40, size: int = 36, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    images[7] = images[3]  # duplicates: ties must go to the lower index
    images[30] = images[3]
    images[12] = images[11]
    return images


def forward_acts(images: np.ndarray, batch: int) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = Tiny().eval()
    with torch.no_grad():
        out = []
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch]).float() / 255 - 0.5
            out.append(net(x))
    return out


def reference(acts: np.ndarray, images: np.ndarray, geo: PatchGeometry, k: int) -> dict[str, Any]:
    """Brute force: loops over channels and images, explicit boxes cut from a zero-padded image."""
    n, c, _, w = acts.shape
    flat = acts.reshape(n, c, -1)
    mx, arg = flat.max(axis=2), flat.argmax(axis=2)
    f, p = geo.factor, geo.size
    tv = np.full((c, k), -np.inf, np.float32)
    ti = np.full((c, k), -1, np.int64)
    ty = np.full((c, k), -1, np.int32)
    tx = np.full((c, k), -1, np.int32)
    stim = np.zeros((c, 3, p, p), np.int64)
    pix = np.zeros((c, p, p), np.int64)
    centre = np.zeros((c, 3, p, p), np.int64)
    centre_pix = np.zeros((c, p, p), np.int64)
    m = 4 * p * f
    big = np.pad(images.astype(np.int64), ((0, 0), (0, 0), (m, m), (m, m)))
    ones = np.pad(np.ones(images.shape[-2:], np.int64), m)  # 1 on image pixels, 0 outside

    def box(i: int, y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
        y0 = geo.first[0] + y * geo.stride[0] + m
        x0 = geo.first[1] + x * geo.stride[1] + m
        rgb = big[i, :, y0 : y0 + p * f, x0 : x0 + p * f].reshape(3, p, f, p, f).sum(axis=(2, 4))
        inside = ones[y0 : y0 + p * f, x0 : x0 + p * f].reshape(p, f, p, f).sum(axis=(1, 3))
        return rgb, inside

    h = acts.shape[2]
    yc, xc = h // 2, w // 2
    for ch in range(c):
        order = sorted(range(n), key=lambda i: (-float(mx[i, ch]), i))[:k]
        for j, i in enumerate(order):
            tv[ch, j], ti[ch, j] = mx[i, ch], i
            ty[ch, j], tx[ch, j] = divmod(int(arg[i, ch]), w)
        for i in range(n):
            if mx[i, ch] > 0:
                rgb, inside = box(i, *divmod(int(arg[i, ch]), w))
                stim[ch] += rgb
                pix[ch] += inside
            if acts[i, ch, yc, xc] > 0:  # eq. 5: the fixed centre neuron is positive on image i
                rgb, inside = box(i, yc, xc)
                centre[ch] += rgb
                centre_pix[ch] += inside
    a64 = acts.astype(np.float64)
    return {
        "topk_value": tv,
        "topk_image": ti,
        "topk_y": ty,
        "topk_x": tx,
        "stimulus_sum": stim,
        "pixel_count": pix,
        "centre_sum": centre,
        "centre_count": (acts[:, :, yc, xc] > 0).sum(axis=0),
        "centre_pixel_count": centre_pix,
        "positive_count": (mx > 0).sum(axis=0),
        "max": mx.max(axis=0),
        "mean": a64.mean(axis=(0, 2, 3)),
        "zero_fraction": (acts == 0).mean(axis=(0, 2, 3)),
        "spatial_max": mx,
        "spatial_arg": arg,
    }


def run_reducer(
    layer: str,
    images: np.ndarray,
    batches: list[dict[str, torch.Tensor]],
    batch: int,
    geo: PatchGeometry,
    k: int,
    gather: str = "auto",
) -> tuple[LayerReducer, np.ndarray, np.ndarray]:
    red = LayerReducer(batches[0][layer].shape[1], geo, k=k, gather=gather)
    mxs, args = [], []
    for bi, out in enumerate(batches):
        idx = torch.arange(bi * batch, bi * batch + out[layer].shape[0])
        mx, arg = red.add(out[layer], torch.from_numpy(images[idx.numpy()]), idx)
        mxs.append(mx.numpy())
        args.append(arg.numpy())
    return red, np.concatenate(mxs), np.concatenate(args)


def test_patch_geometry_rules() -> None:
    image = (36, 36)
    assert patch_geometry(TINY_RF["a"], image, 4) == PatchGeometry(1, 3, (-1, -1), (1, 1), image)
    assert patch_geometry(TINY_RF["b"], image, 4) == PatchGeometry(2, 4, (-3, -3), (2, 2), image)
    assert patch_geometry(TINY_RF["c"], image, 4) == PatchGeometry(4, 3, (-5, -5), (4, 4), image)
    assert patch_geometry(TINY_RF["d"], image, 4) == PatchGeometry(8, 3, (-5, -5), (8, 8), image)
    assert patch_geometry(TINY_RF["d"], image, 64).factor == 1
    # no power of two both shrinks the patch enough and divides the stride: largest dividing one
    assert patch_geometry(TINY_RF["b"], image, 2) == PatchGeometry(2, 4, (-3, -3), (2, 2), image)
    assert patch_geometry(RField((899, 899), (32, 32), (0.0, 0.0)), (224, 224), 64).factor == 16


def _brute_pool(a: np.ndarray, factor: int, phase: tuple[int, int]) -> np.ndarray:
    """Cell sums by loops: cells start at phase + factor * j, j from -1 when phase > 0."""
    firsts = [p - factor if p else 0 for p in phase]
    counts = [-(-(size - first) // factor) for size, first in zip(a.shape[-2:], firsts, strict=True)]
    out = np.zeros((*a.shape[:2], *counts), np.int64)
    for r in range(counts[0]):
        for q in range(counts[1]):
            y0, x0 = firsts[0] + factor * r, firsts[1] + factor * q
            out[:, :, r, q] = a[:, :, max(y0, 0) : y0 + factor, max(x0, 0) : x0 + factor].sum(axis=(2, 3))
    return out


def test_pool_images_sums_cells_exactly() -> None:
    img = torch.randint(0, 256, (2, 3, 37, 30), dtype=torch.uint8)
    a = img.numpy().astype(np.int64)
    cache: dict[tuple[int, int, int], torch.Tensor] = {}  # levels shared across factors and phases
    cases = [
        (f, (py, px)) for f in (16, 2, 8, 4, 1) for py in {0, 1, f - 1, f // 2} for px in {0, f - 1, 3 % f}
    ]
    for factor, phase in cases:
        for shared in (cache, None):
            out = pool_images(img, factor, phase, torch.int32, shared)
            np.testing.assert_array_equal(out.numpy(), _brute_pool(a, factor, phase), f"f{factor} {phase}")
    with pytest.raises(ValueError, match="power of two"):
        pool_images(img, 3, (0, 0), torch.int32)


@pytest.mark.parametrize(
    ("patch_max", "batch", "gather", "budget"),
    [
        (4, 8, "windows", None),
        (64, 16, "rows", None),
        (2, 7, "auto", None),
        (4, 8, "rows", 1),
        (4, 8, "windows", 1),
    ],
)
@pytest.mark.parametrize("layer", ["a", "b", "c", "d"])
def test_reducer_matches_numpy_reference(
    layer: str, patch_max: int, batch: int, gather: str, budget: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if budget is not None:  # one image per gather chunk
        monkeypatch.setattr(sweep_module, "_GATHER_BUDGET", budget)
    images = make_images()
    batches = forward_acts(images, batch)
    geo = patch_geometry(TINY_RF[layer], images.shape[-2:], patch_max)
    k = 5
    red, mx, arg = run_reducer(layer, images, batches, batch, geo, k, gather)
    acts = torch.cat([o[layer] for o in batches]).numpy()
    ref = reference(acts, images, geo, k)
    np.testing.assert_array_equal(mx, ref["spatial_max"])
    np.testing.assert_array_equal(arg, ref["spatial_arg"])
    state = red.state_dict()
    keys = ("topk_value", "topk_image", "topk_y", "topk_x", "stimulus_sum", "positive_count", "max")
    keys += ("pixel_count", "centre_sum", "centre_count", "centre_pixel_count")
    for key in keys:
        np.testing.assert_array_equal(state[key], ref[key], err_msg=key)
    assert state["stimulus_sum"].any() or not (ref["positive_count"] > 0).any()
    res = red.result()
    nb = len(batches)
    n = acts.shape[0] * acts.shape[2] * acts.shape[3]
    np.testing.assert_allclose(res.mean, ref["mean"], rtol=1e-6, atol=nb * 2.0**-FIXED_POINT_BITS / n + 1e-7)
    np.testing.assert_array_equal(res.zero_fraction, ref["zero_fraction"].astype(np.float32))
    # definition changed: divide by the image pixels under each cell (outside the image: not black)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = (ref["stimulus_sum"] / ref["pixel_count"][:, None]).astype(np.float32)
        want_c = (ref["centre_sum"] / ref["centre_pixel_count"][:, None]).astype(np.float32)
    np.testing.assert_array_equal(res.mean_stimulus, want)
    np.testing.assert_array_equal(res.mean_stimulus_centre, want_c)
    np.testing.assert_array_equal(res.positive_count_centre, ref["centre_count"])
    assert int(state["position_count"]) == n


def test_ties_go_to_lower_index_and_padding() -> None:
    images = make_images()[:6].copy()
    images[:] = images[0]  # six identical images: all values tie
    batches = forward_acts(images, 4)
    geo = patch_geometry(TINY_RF["b"], images.shape[-2:], 64)
    red, _, _ = run_reducer("b", images, batches, 4, geo, 8)
    st = red.state_dict()
    np.testing.assert_array_equal(st["topk_image"], np.tile([0, 1, 2, 3, 4, 5, -1, -1], (5, 1)))
    assert np.isneginf(st["topk_value"][:, 6:]).all()


def test_negative_zero_ties_with_zero() -> None:
    geo = PatchGeometry(1, 1, (0, 0), (1, 1), (2, 2))
    red = LayerReducer(1, geo, k=2)
    img = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    red.add(torch.full((1, 1, 2, 2), -0.0), img, torch.tensor([0]))
    red.add(torch.zeros(1, 1, 2, 2), img, torch.tensor([1]))
    assert red.state_dict()["topk_image"].tolist() == [[0, 1]]


@pytest.mark.parametrize("layer", ["b", "d"])
def test_merge_of_partials_equals_one_pass_bit_for_bit(layer: str) -> None:
    images = make_images()
    batch = 5
    batches = forward_acts(images, batch)
    geo = patch_geometry(TINY_RF[layer], images.shape[-2:], 4)
    whole, _, _ = run_reducer(layer, images, batches, batch, geo, 6)
    c = batches[0][layer].shape[1]
    parts = [LayerReducer(c, geo, k=6) for _ in range(4)]
    for bi, out in enumerate(batches):  # contiguous shards of 2 batches each
        idx = torch.arange(bi * batch, (bi + 1) * batch)
        parts[min(bi // 2, 3)].add(out[layer], torch.from_numpy(images[idx.numpy()]), idx)
    want = whole.state_dict()
    for order in list(itertools.permutations(range(4)))[::5]:
        acc = LayerReducer.from_state_dict(parts[order[0]].state_dict(), geo)
        for i in order[1:]:
            acc.merge(LayerReducer.from_state_dict(parts[i].state_dict(), geo))
        got = acc.state_dict()
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            assert np.array_equal(got[key], want[key]), (order, key)


def test_crop_topk_patches_matches_reference() -> None:
    images = make_images()
    batches = forward_acts(images, 8)
    ds = ArrayDataset(images)
    for layer, patch_max in (("a", 64), ("d", 4), ("d", 64), ("c", 4)):
        geo = patch_geometry(TINY_RF[layer], images.shape[-2:], patch_max)
        red, _, _ = run_reducer(layer, images, batches, 8, geo, 4)
        st = red.state_dict()
        st["topk_image"][0, -1] = -1  # a padding entry crops to zeros
        ds.reads.clear()
        got = crop_topk_patches(ds, geo, st["topk_image"], st["topk_y"], st["topk_x"])
        assert sorted(ds.reads) == sorted(set(st["topk_image"][st["topk_image"] >= 0].tolist()))
        f, p = geo.factor, geo.size
        m = 4 * p * f
        big = np.pad(images.astype(np.int64), ((0, 0), (0, 0), (m, m), (m, m)))
        for ch, j in np.ndindex(*st["topk_image"].shape):
            i = st["topk_image"][ch, j]
            if i < 0:
                assert not got[ch, j].any()
                continue
            y0 = geo.first[0] + int(st["topk_y"][ch, j]) * geo.stride[0] + m
            x0 = geo.first[1] + int(st["topk_x"][ch, j]) * geo.stride[1] + m
            s = big[i, :, y0 : y0 + p * f, x0 : x0 + p * f].reshape(3, p, f, p, f).sum(axis=(2, 4))
            np.testing.assert_array_equal(got[ch, j], np.floor(s / f**2 + 0.5).astype(np.uint8))


def test_state_dict_roundtrip_and_shape_check() -> None:
    geo = PatchGeometry(2, 3, (-1, -1), (2, 2), (8, 8))
    red = LayerReducer(3, geo, k=2)
    red.add(
        torch.rand(2, 3, 4, 4), torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), torch.tensor([4, 9])
    )
    again = LayerReducer.from_state_dict(red.state_dict(), geo)
    for key, val in red.state_dict().items():
        assert np.array_equal(again.state_dict()[key], val)
    bad = red.state_dict()
    bad["stimulus_sum"] = bad["stimulus_sum"][:, :, :2]
    with pytest.raises(ValueError, match="stimulus_sum"):
        LayerReducer.from_state_dict(bad, geo)


@pytest.mark.parametrize("shape", [(4, 3, 50), (3, 2, 2**21 + 7)])  # one buffer; one image per buffer
def test_nonzero_counts_match_a_brute_force_count(shape: tuple[int, int, int]) -> None:
    gen = torch.Generator().manual_seed(1)
    flat = torch.relu(torch.randn(shape, generator=gen))
    flat[0, 0, :5] = torch.tensor([-0.0, 0.0, -1.0, math.nan, math.inf])
    want = (flat.numpy() != 0).sum(axis=(0, 2))
    np.testing.assert_array_equal(sweep_module.nonzero_counts(flat).numpy(), want)


@pytest.mark.parametrize("positions", [49, 784, 1031, 1024, 3136, 12544])  # direct; prime; blocks
def test_spatial_max_matches_a_brute_force_first_argmax(positions: int) -> None:
    gen = torch.Generator().manual_seed(positions)
    flat = torch.randint(-3, 4, (5, 6, positions), generator=gen).float()  # many ties
    flat[0, 0] = 0.0
    flat[1, 1, -1] = 9.0  # the max in the last block
    value, index = sweep_module.spatial_max(flat)
    a = flat.numpy()
    np.testing.assert_array_equal(value.numpy(), a.max(axis=2))
    np.testing.assert_array_equal(index.numpy(), a.argmax(axis=2))  # NumPy: the first occurrence


def test_packed_state_roundtrip() -> None:
    """`pack_state` keeps every array's bits (odd sizes padded to whole words, NaN and -0 kept)."""
    geo = PatchGeometry(1, 3, (-1, -1), (1, 1), (5, 5))
    red = LayerReducer(3, geo, k=5)  # 3 x 5 int32 top-k rows: not a whole number of words
    red.add(
        torch.rand(2, 3, 5, 5) - 0.5,
        torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8),
        torch.tensor([0, 1]),
    )
    red.max[0], red.max[1] = math.nan, -0.0
    state = red.state_dict()
    layout = LayerReducer.state_layout(3, geo, 5)
    assert {key: (v.shape, v.dtype) for key, v in state.items()} == layout
    words = pack_state(state)
    assert words.dtype == np.dtype("<i8") and len(words) == packed_words(layout)
    back = unpack_state(words, layout)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key
    with pytest.raises(ValueError, match="bytes"):
        unpack_state(words[:-1], layout)


@pytest.mark.parametrize("patch_max", [64, 4])
def test_border_pixels_are_counted_not_black(patch_max: int) -> None:
    """A corner unit's receptive field hangs over the image edge: on a uniform image its mean
    stimulus is that colour on every cell with image pixels (per-pixel counts), NaN beyond; the
    centre unit's field lies inside the image and has counts = positives x f² everywhere."""
    geo = patch_geometry(TINY_RF["d"], (36, 36), patch_max)  # 19x19 field, first pixel (-5, -5)
    f, p = geo.factor, geo.size
    red = LayerReducer(2, geo, k=2)
    images = torch.full((3, 3, 36, 36), 200, dtype=torch.uint8)
    images[:, 1] = 50
    acts = torch.full((3, 2, 4, 4), -1.0)
    acts[:, 0, 0, 0] = 1.0  # channel 0: strongest at the corner; its centre neuron is never > 0
    acts[:, 1, 2, 2] = 1.0  # channel 1: strongest at the centre (H // 2, W // 2) = (2, 2)
    red.add(acts, images, torch.arange(3))
    res, st = red.result(), red.state_dict()
    corner = res.mean_stimulus[0]
    inside = st["pixel_count"][0] > 0
    assert (st["pixel_count"][0] < 3 * f * f).any()  # the corner field is partly outside the image
    np.testing.assert_array_equal(corner[0][inside], 200.0)
    np.testing.assert_array_equal(corner[1][inside], 50.0)
    assert np.isnan(corner[:, ~inside]).all()
    # brute force: a cell's count is (image pixels in it) x (positive images)
    ys = np.arange(p) * f + geo.first[0]
    cover = np.clip(np.minimum(ys + f, 36) - np.maximum(ys, 0), 0, f)
    np.testing.assert_array_equal(st["pixel_count"][0], 3 * np.outer(cover, cover))
    np.testing.assert_array_equal(
        res.mean_stimulus[1], np.broadcast_to([[[200.0]], [[50.0]], [[200.0]]], (3, p, p))
    )
    # the eq. 4-5 centre neuron: channel 1 positive on every image, channel 0 never
    assert res.positive_count_centre.tolist() == [0, 3]
    np.testing.assert_array_equal(res.mean_stimulus_centre[1], res.mean_stimulus[1])
    assert np.isnan(res.mean_stimulus_centre[0]).all()


def test_centre_neuron_mean_stimulus_brute_force() -> None:
    """Eq. 4–5 with a loop over images: the mean of x[r_i] over X+ = {x : f_i(x) > 0} for the fixed
    neuron i at the map centre, which differs from the strongest-position average."""
    images = make_images(40, 36, seed=3)
    batches = forward_acts(images, 6)
    geo = patch_geometry(TINY_RF["b"], images.shape[-2:], 64)  # f = 1: plain pixel means
    red, _, _ = run_reducer("b", images, batches, 6, geo, 3)
    acts = torch.cat([o["b"] for o in batches]).numpy()
    res = red.result()
    yc, xc = acts.shape[2] // 2, acts.shape[3] // 2
    y0, x0 = geo.first[0] + yc * geo.stride[0], geo.first[1] + xc * geo.stride[1]
    side = geo.size
    for ch in range(acts.shape[1]):
        xplus = [i for i in range(len(images)) if acts[i, ch, yc, xc] > 0]
        assert res.positive_count_centre[ch] == len(xplus)
        if not xplus:
            assert np.isnan(res.mean_stimulus_centre[ch]).all()
            continue
        want = np.full((3, side, side), np.nan)
        ya, xa = max(y0, 0), max(x0, 0)
        yb, xb = min(y0 + side, 36), min(x0 + side, 36)
        crop = images[xplus][:, :, ya:yb, xa:xb].astype(np.float64).mean(axis=0)
        want[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = crop
        np.testing.assert_allclose(res.mean_stimulus_centre[ch], want, rtol=1e-6)
