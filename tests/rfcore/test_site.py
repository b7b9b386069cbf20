"""rfcore.site: the static atlas site shows exactly what the store holds, every link and image
resolves, analyses' report hooks land on their pages, and any fsspec URL takes the output."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import numpy as np
import pytest
from PIL import Image

from rfcore import analysis
from rfcore.analysis import Analysis, Section
from rfcore.errors import StoreError
from rfcore.site import SiteError, SiteWriter, to_pixels, write_layer, write_site

_REF = re.compile(r'(?:src|href)="([^"#]+)"')


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


def check_links(root: Path) -> int:
    """Every src/href of every page points at an existing file; returns how many were checked."""
    checked = 0
    for page in root.rglob("*.html"):
        for ref in _REF.findall(page.read_text()):
            if "://" in ref:
                continue
            target = (page.parent / ref).resolve()
            assert target.is_file(), f"{page.relative_to(root)} links to missing {ref}"
            checked += 1
    return checked


def test_site_shows_the_stored_results(
    tiny_atlas: tuple[str, dict[str, Any]], tiny_kit: Any, tmp_path: Path
) -> None:
    url, data = tiny_atlas
    TINY, FLOW_RUN = tiny_kit.TINY, tiny_kit.FLOW_RUN
    out = tmp_path / "site"
    res = write_site([url], str(out))
    assert res["index"] == str(out / "index.html")
    assert check_links(out) > 100
    index = (out / "index.html").read_text()
    assert 'href="tiny/index.html"' in index and 'href="tiny/layer1.0/index.html"' in index
    atlas_index = (out / "tiny" / "index.html").read_text()
    assert "bad &lt;1&gt;.jpg" in atlas_index and "Skipped images (1)" in atlas_index
    assert FLOW_RUN in atlas_index and "compare.html" not in index

    # layer grid: one card per channel, the inactive badge, the stats as sort keys
    grid = (out / "tiny" / "layer1.0" / "index.html").read_text()
    cards = re.findall(r'<a class="card( inactive)?" href="c(\d{4}).html" data-channel="(\d+)"', grid)
    assert [int(c[2]) for c in cards] == list(range(TINY["channels"]["layer1.0"]))
    assert [c[0] for c in cards] == ["", " inactive", "", "", "", ""]
    assert '<option value="max" selected>' in grid and '<option value="zero_fraction">' in grid
    assert '"max":[' in grid

    # channel pages: every stored hit as an exact PNG with its activation, image index, class and file
    k = TINY["k"]
    layer = data["layer1.0"]
    for c in range(TINY["channels"]["layer1.0"]):
        page = (out / "tiny" / "layer1.0" / f"c{c:04d}.html").read_text()
        for j in range(k):
            png = out / "tiny" / "layer1.0" / "img" / f"c{c:04d}-top{j:02d}.png"
            idx = int(layer["topk/image"][c, j])
            assert png.exists() == (idx >= 0)
            if idx >= 0:
                assert np.array_equal(_png(png), layer["topk/patch"][c, j])
                assert f"image {idx}<br>{['cat', 'dog', 'fish'][idx % 3]}<br>img_{idx:03d}.png" in page
                assert f"<b>{float(layer['topk/value'][c, j]):.4g}</b>" in page
        assert f"c{c + 1:04d}.html" in page or c == TINY["channels"]["layer1.0"] - 1
        assert 'href="index.html">back to the layer' in page and FLOW_RUN in page
        assert "<h2>Virtual filter through conv1</h2>" in page  # the virtual analysis's hook
        assert f'src="img/c{c:04d}-layer1.0_c{c:04d}-coupling.png"' in page
        mean = out / "tiny" / "layer1.0" / "img" / f"c{c:04d}-mean.png"
        assert mean.exists() == (c != 1)  # channel 1 was never positive: no mean stimulus
    inactive = (out / "tiny" / "layer1.0" / "c0001.html").read_text()
    assert "<b>inactive</b></td><td>yes" in inactive and "<h2>Inactive test</h2>" in inactive

    # act-max images (the act-max analysis's hook) where rendered, nothing for the channels that were not
    conv = data["conv1"]
    img = out / "tiny" / "conv1" / "img"
    for c in range(TINY["channels"]["conv1"]):
        page = (out / "tiny" / "conv1" / f"c{c:04d}.html").read_text()
        assert ("Activation maximization" in page) == (c < 2)
        assert (img / f"c{c:04d}-conv1_c{c:04d}-actmax0.png").exists() == (c < 2)
    want = np.clip(np.rint(255.0 * conv["actmax/channel/image"][1].astype(np.float64)), 0, 255)
    assert np.array_equal(_png(img / "c0001-conv1_c0001-actmax0.png"), want)
    assert _png(img / "c0000-conv1_c0000-actmax1.png").shape == (3, 7, 7)
    assert "Virtual filter" not in (out / "tiny" / "conv1" / "c0000.html").read_text()


@dataclass(frozen=True)
class _Opts:
    pass


class _Tuning(Analysis):
    """A registered analysis with every report hook (as the tuning/selectivity analyses will have)."""

    name: ClassVar[str] = "fake-tuning"
    description: ClassVar[str] = "test"

    def channel_columns(self, atlas: Any, layer: str) -> dict[str, np.ndarray]:
        n = int(atlas.layer(layer).attrs["channels"])
        return {"osi": np.linspace(0, 1, n), "orientation_selective": np.arange(n) % 2 == 0}

    def report_channel(self, atlas: Any, layer: str, channel: int, assets: Any) -> Section | None:
        if channel == 3:
            return None
        curve = assets.figure("tuning", lambda ax: ax.plot([0, 45, 90], [1, channel, 2]), size=(3, 2))
        again = assets.figure("tuning", lambda ax: pytest.fail("drawn twice"))  # written once
        image = assets.image("awa", np.full((3, 4, 4), 0.5), scale="unit")
        return Section(
            "Orientation tuning",
            f'<img src="{curve}" alt="t"><img src="{again}" alt="t"><img src="{image}" alt="a">',
        )

    def report_layer(self, atlas: Any, layer: str, assets: Any) -> Section | None:
        return Section(
            "Tuning of the layer",
            f'<img src="{assets.image("osi-map", np.zeros((8, 8)), scale="auto")}" alt="m">',
        )

    def report_index(self, atlas: Any, assets: Any) -> Section | None:
        return Section("Tuning findings", "<p>fake finding 42</p>")


def test_report_hooks_of_registered_analyses(
    tiny_atlas: tuple[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = tiny_atlas
    monkeypatch.setitem(analysis.ANALYSES, "fake-tuning", _Tuning())
    out = tmp_path / "site"
    write_site(url, str(out))
    check_links(out)
    layer = out / "tiny" / "layer1.0"
    grid = (layer / "index.html").read_text()
    assert '<option value="osi">osi</option>' in grid and "Tuning of the layer" in grid
    assert grid.count('<span class="badge orientation_selective">orientation selective</span>') == 3
    assert '"osi":[0.0,0.2,' in grid
    page = (layer / "c0002.html").read_text()
    assert "<h2>Orientation tuning</h2>" in page and 'src="img/c0002-tuning.png"' in page
    assert "<b>osi</b></td><td>0.4" in page and "<b>orientation selective</b></td><td>yes" in page
    assert (layer / "img" / "c0002-tuning.png").exists() and (layer / "img" / "c0002-awa.png").exists()
    assert "Orientation tuning" not in (layer / "c0003.html").read_text()
    assert "fake finding 42" in (out / "tiny" / "index.html").read_text()
    assert _png(layer / "img" / "c0000-awa.png").max() == 128


def test_a_failing_hook_names_the_analysis(
    tiny_atlas: tuple[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken(_Tuning):
        name: ClassVar[str] = "broken"

        def report_channel(self, atlas: Any, layer: str, channel: int, assets: Any) -> Section | None:
            raise ValueError("boom")

    monkeypatch.setitem(analysis.ANALYSES, "broken", Broken())
    with pytest.raises(
        SiteError, match=r"analysis broken: report_channel\(conv1, 0\) failed: ValueError: boom"
    ):
        write_site(tiny_atlas[0], str(tmp_path / "site"))


def test_two_atlases_get_a_comparison_page_and_any_fsspec_url(tiny_kit: Any, tmp_path: Path) -> None:
    a, b = str(tmp_path / "resnet.zarr"), str(tmp_path / "plain.zarr")
    tiny_kit.make(a)
    tiny_kit.make(b, labels=False)
    res = write_site([a, b], "memory://site-test/out")
    fs = fsspec.filesystem("memory")
    assert res["index"] == "memory://site-test/out/index.html"
    index = fs.cat_file("/site-test/out/index.html").decode()
    assert (
        'href="compare.html"' in index
        and 'href="resnet/index.html"' in index
        and 'href="plain/index.html"' in index
    )
    compare = fs.cat_file("/site-test/out/compare.html").decode()
    assert "Layers side by side" in compare and "No noise results" in compare
    assert compare.count('href="plain/layer1.0/index.html"') == 1
    page = fs.cat_file("/site-test/out/plain/layer1.0/c0000.html").decode()
    assert "img_0" not in page  # no labels/paths in that store: none shown
    assert fs.exists("/site-test/out/plain/layer1.0/img/c0000-top00.png")
    fs.rm("/site-test", recursive=True)


def test_one_layer_at_a_time(tiny_atlas: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    summary = write_layer(tiny_atlas[0], str(tmp_path / "site"), "layer1.0")
    assert summary["name"] == "layer1.0" and summary["channels"] == 6 and summary["badges"] == {"inactive": 1}
    assert (tmp_path / "site" / "tiny" / "layer1.0" / "c0005.html").exists()
    assert not (tmp_path / "site" / "tiny" / "conv1").exists()


def test_missing_store_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        write_site([str(tmp_path / "nope.zarr")], str(tmp_path / "out"))


def test_pixel_scales() -> None:
    assert to_pixels(np.array([[[-1.0, 0.0, 1.0]]]), "signed").tolist() == [[0, 128, 255]]
    assert to_pixels(np.array([[2.0, 4.0, np.nan]]), "auto").tolist() == [[0, 255, 0]]
    assert to_pixels(np.full((3, 1, 1), 0.5), "unit").shape == (1, 1, 3)
    with pytest.raises(SiteError):
        to_pixels(np.zeros((2, 2, 2)))


def test_real_atlas_with_actmax_and_noise(tmp_path: Path) -> None:
    """A real atlas (sweep, act-max of two conv1 channels, noise test at maxpool): the channel pages
    show each rendered act-max image as an exact PNG, the atlas index the paper's Table 1."""
    from rfcore.analysis import run_local
    from rfcore.pipeline import run_sweep
    from rfcore.store import AtlasStore

    url = str(tmp_path / "real.zarr")
    run_sweep(url, model_name="resnet10t", data_spec="synthetic:8", layers="conv1,maxpool", k=2,
              shard_size=8, batch_size=4, device="cpu", progress=False)  # fmt: skip
    run_local(url, "actmax", {"layers": "conv1", "channels": "0,1", "steps": 2, "block_size": 4})
    run_local(url, "noise", {"n_boot": 50})
    store = AtlasStore.open(url)

    out = tmp_path / "site"
    write_site([url], str(out))
    check_links(out)
    index = (out / "real" / "index.html").read_text()
    assert "Table 1" in index and "<td>resnet10t</td><td>maxpool</td>" in index
    image = np.asarray(store.root["layers/conv1/actmax/channel/image"][1], dtype=np.float64)
    want = np.clip(np.rint(255.0 * image), 0, 255)
    img = out / "real" / "conv1" / "img"
    assert np.array_equal(_png(img / "c0001-conv1_c0001-actmax0.png"), want)
    assert (img / "c0000-conv1_c0000-actmax1.png").exists()
    assert not (img / "c0002-conv1_c0002-actmax0.png").exists()  # channel 2 was not rendered
    assert "Activation maximization" in (out / "real" / "conv1" / "c0001.html").read_text()
    assert "Activation maximization" not in (out / "real" / "maxpool" / "c0001.html").read_text()


def test_layers_subset_and_worker_processes(tiny_atlas: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    """Only the chosen layers get pages and links (no link to a layer that was not written); worker
    processes write the same pages as one process."""
    url, _ = tiny_atlas
    one = tmp_path / "one"
    write_site([url], str(one), layers=["layer1.0"])
    check_links(one)
    assert not (one / "tiny" / "conv1").exists()
    assert "../conv1/" not in (one / "tiny" / "layer1.0" / "c0000.html").read_text()
    two = tmp_path / "two"
    res = write_site([url], str(two), workers=2)
    assert [s["name"] for s in res["layers"]["tiny"]] == ["conv1", "layer1.0"]
    full = tmp_path / "full"
    write_site([url], str(full))
    for page in full.rglob("*.html"):
        assert (two / page.relative_to(full)).read_text() == page.read_text(), page


def test_site_writer_adds_atlases_as_they_arrive(
    tiny_atlas: tuple[str, dict[str, Any]], tiny_kit: Any, tmp_path: Path
) -> None:
    """`SiteWriter.add` starts one atlas's pages in the background (the demo analyses the next model
    meanwhile); `finish` writes the indexes and the comparison page: the same site as `write_site`."""
    url, _ = tiny_atlas
    other = str(tmp_path / "other.zarr")
    tiny_kit.make(other)
    staged = tmp_path / "staged"
    with SiteWriter([url, other], str(staged), workers=2) as writer:
        writer.add(url)
        res = writer.finish()  # adds `other`, never added explicitly
    assert sorted(res["layers"]) == ["other", "tiny"] and (staged / "compare.html").exists()
    whole = tmp_path / "whole"
    write_site([url, other], str(whole))
    for page in whole.rglob("*.html"):
        assert (staged / page.relative_to(whole)).read_text() == page.read_text(), page
    check_links(staged)


def test_site_on_s3(tiny_atlas: tuple[str, dict[str, Any]], s3_bucket: str) -> None:
    """`--out s3://...` (a real S3 API: moto_server): every page and image lands under the prefix."""
    url, data = tiny_atlas
    res = write_site([url], f"{s3_bucket}/sites/tiny")
    assert res["index"] == f"{s3_bucket}/sites/tiny/index.html"
    fs = fsspec.filesystem("s3")
    root = f"{s3_bucket[len('s3://') :]}/sites/tiny"
    keys = {k[len(root) + 1 :] for k in fs.find(root)}
    assert {"index.html", "site.css", "site.js", "tiny/index.html", "tiny/layer1.0/c0005.html"} <= keys
    png = fs.cat_file(f"{root}/tiny/layer1.0/img/c0000-top00.png")
    with Image.open(io.BytesIO(png)) as im:
        assert np.array_equal(
            np.asarray(im.convert("RGB")).transpose(2, 0, 1), data["layer1.0"]["topk/patch"][0, 0]
        )


@pytest.mark.parametrize("kind", ["mapping", "matrix", "real"])
def test_comparison_shows_cross_block_similarity(
    tiny_kit: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The comparison page shows `rfcore.similarity.cross_block_similarity`: a {stage: value} result
    as one table with a column per atlas, a matrix as a matplotlib heat map; the real measure finds no
    stage in the tiny atlas (one block per stage) and says so."""
    import sys
    import types

    if kind != "real":
        fake = types.ModuleType("rfcore.similarity")
        values: Any = {"layer1": 0.25, "layer2": 0.5} if kind == "mapping" else np.eye(3)
        fake.cross_block_similarity = lambda atlas: values  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "rfcore.similarity", fake)
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    tiny_kit.make(a)
    tiny_kit.make(b)
    out = tmp_path / "site"
    write_site([a, b], str(out))
    check_links(out)
    compare = (out / "compare.html").read_text()
    assert "<h2>Cross-block similarity</h2>" in compare
    if kind == "mapping":
        assert '<td>layer2</td><td class="num">0.5</td><td class="num">0.5</td>' in compare
    elif kind == "matrix":
        assert 'src="img/similarity-a.png"' in compare and (out / "img" / "similarity-b.png").exists()
    else:
        assert "No stage has two consecutive swept blocks of equal width." in compare
