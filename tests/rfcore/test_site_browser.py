"""The generated site in a real browser (headless Chromium through Playwright, from file://): every
image loads, the navigation links lead where they say, the grid sorts and filters, and no page logs
a console error. Screenshots go to pytest's tmp_path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rfcore.site import write_site

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Chromium at {CHROMIUM}")


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[tuple[Any, list[str]]]:
    """A Chromium page and the list its console errors and page errors are collected into."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        # a lazy thumbnail still loading when the test navigates away is aborted (net::ERR_ABORTED):
        # not a broken image; a missing file fails with another error (and an unloaded <img>)
        page.on(
            "requestfailed",
            lambda r: (
                None
                if "ERR_ABORTED" in (r.failure or "")
                else errors.append(f"request failed: {r.url} ({r.failure})")
            ),
        )
        try:
            yield page, errors
        finally:
            browser.close()


def assert_images_loaded(page: Any) -> int:
    """Every <img> of the page (lazy ones included) decodes to a real image; returns how many."""
    page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=20_000)
    broken = page.evaluate(
        "Array.from(document.images).filter(i => !(i.naturalWidth > 0)).map(i => i.getAttribute('src'))"
    )
    assert broken == [], f"{page.url}: broken images {broken}"
    return int(page.evaluate("document.images.length"))


def _visible_channels(page: Any) -> list[int]:
    return [
        int(c)
        for c in page.eval_on_selector_all(
            "#grid .card:not([hidden])", "els => els.map(e => e.dataset.channel)"
        )
    ]


def test_site_in_a_real_browser(
    tiny_atlas: tuple[str, dict[str, Any]], tmp_path: Path, browser_page: tuple[Any, list[str]]
) -> None:
    url, data = tiny_atlas
    out = tmp_path / "site"
    write_site([url], str(out))
    page, errors = browser_page
    shots = tmp_path / "screenshots"
    shots.mkdir()

    # index -> layer grid
    page.goto((out / "index.html").as_uri())
    assert page.title() == "rfatlas"
    page.screenshot(path=str(shots / "index.png"))
    page.click("text=layer1.0")
    page.wait_for_load_state("load")
    assert page.url.endswith("/tiny/layer1.0/index.html")
    assert assert_images_loaded(page) >= 6
    page.screenshot(path=str(shots / "grid.png"), full_page=True)

    # the grid is sorted by max activation (descending) at first; sort by channel; filter
    maxima = data["layer1.0"]["max"]
    assert _visible_channels(page) == sorted(range(6), key=lambda c: (-float(maxima[c]), c))
    page.select_option("#sort", "channel")
    assert _visible_channels(page) == list(range(6))
    page.select_option("#sort", "zero_fraction")
    zf = data["layer1.0"]["zero_fraction"]
    assert _visible_channels(page) == sorted(range(6), key=lambda c: (-float(zf[c]), c))
    page.fill("#filter", "inactive")
    assert _visible_channels(page) == [1]
    assert page.inner_text("#count") == "1 of 6 channels"
    top = sorted(float(m) for m in maxima)
    page.fill("#filter", f"max>{(top[-2] + top[-3]) / 2:.6f}")  # the two largest
    assert sorted(_visible_channels(page)) == sorted(int(c) for c in (-maxima).argsort()[:2])
    page.fill("#filter", "")
    assert len(_visible_channels(page)) == 6

    # a channel page, next channel, back to the layer
    page.click('#grid a.card[data-channel="2"]')
    page.wait_for_load_state("load")
    assert page.url.endswith("/tiny/layer1.0/c0002.html")
    assert "layer1.0 · channel 2" in page.inner_text("h1")
    assert assert_images_loaded(page) >= 3
    page.screenshot(path=str(shots / "channel.png"), full_page=True)
    page.click("a[rel=next] >> nth=0")
    page.wait_for_load_state("load")
    assert page.url.endswith("/c0003.html")
    assert_images_loaded(page)
    page.keyboard.press("ArrowLeft")  # keyboard navigation: previous channel
    page.wait_for_url("**/c0002.html")
    page.click("a[rel=up] >> nth=0")
    page.wait_for_load_state("load")
    assert page.url.endswith("/tiny/layer1.0/index.html")

    # a conv1 channel page with the act-max images of its analysis's hook; the layer pager; the atlas index
    page.goto((out / "tiny" / "conv1" / "c0001.html").as_uri())
    assert "Activation maximization" in page.inner_text("main")
    assert assert_images_loaded(page) >= 3 + 2 + 2  # top-k, mean stimuli, act-max
    page.goto((out / "tiny" / "conv1" / "index.html").as_uri())
    page.click("text=layer layer1.0 →")
    page.wait_for_load_state("load")
    assert page.url.endswith("/tiny/layer1.0/index.html")
    page.click("text=all layers")
    page.wait_for_load_state("load")
    assert page.url.endswith("/tiny/index.html")
    assert_images_loaded(page)
    page.screenshot(path=str(shots / "atlas.png"), full_page=True)

    assert errors == []
    assert {p.name for p in shots.iterdir()} == {"index.png", "grid.png", "channel.png", "atlas.png"}


def test_the_check_catches_a_broken_image_and_a_script_error(
    tiny_atlas: tuple[str, dict[str, Any]], tmp_path: Path, browser_page: tuple[Any, list[str]]
) -> None:
    """The browser checks above can fail: a missing PNG and a broken site.js are both caught."""
    out = tmp_path / "site"
    write_site([tiny_atlas[0]], str(out))
    (out / "tiny" / "layer1.0" / "img" / "c0004-top00.png").unlink()
    (out / "site.js").write_text("(function () { undefinedFunction(); })();\n")
    page, errors = browser_page
    page.goto((out / "tiny" / "layer1.0" / "index.html").as_uri())
    with pytest.raises(AssertionError, match="broken images"):
        assert_images_loaded(page)
    assert any("undefinedFunction" in e for e in errors)
