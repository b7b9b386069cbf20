"""Screenshots of a site for the README (docs/img/site-*.png), in headless Chromium.

    python scripts/site_screenshots.py SITE_DIR [OUT_DIR] [--layer resnet10t/layer2.0] [--channel 4]

SITE_DIR is a site written by `rfatlas report` of the demo's two atlases (or the demo's `site/`).
Each PNG is reduced to a 256-colour palette when that keeps it under 300 KB.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
LIMIT = 300_000


def _save(png: bytes, dest: Path) -> int:
    if len(png) > LIMIT:
        with Image.open(io.BytesIO(png)) as im:
            buf = io.BytesIO()
            im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
                buf, format="PNG", optimize=True
            )
            png = buf.getvalue()
    dest.write_bytes(png)
    return len(png)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("site")
    p.add_argument("out", nargs="?", default="docs/img")
    p.add_argument("--layer", default="resnet10t/layer2.0")
    p.add_argument("--channel", type=int, default=4)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    a = p.parse_args()
    site, out = Path(a.site).resolve(), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shots = {
        "site-index.png": site / "index.html",
        "site-layer.png": site / a.layer / "index.html",
        "site-channel.png": site / a.layer / f"c{a.channel:04d}.html",
        "site-compare.png": site / "compare.html",
    }
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 820})
        for name, path in shots.items():
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            page.evaluate(
                "document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })"
            )
            page.wait_for_function("Array.from(document.images).every(i => i.complete)")
            tall = name == "site-channel.png"  # down to the analyses' sections
            page.set_viewport_size({"width": 1200, "height": 1250 if tall else 820})
            size = _save(page.screenshot(), out / name)
            print(f"{out / name}: {size / 1000:.0f} KB")
        browser.close()


if __name__ == "__main__":
    main()
