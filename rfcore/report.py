"""Static HTML atlas: an index page plus one page per layer with every channel's preferred stimuli.

Each channel row shows its mean stimulus, its top-k patches (PNG files under ``out_dir/img/``; the
tooltip gives dataset image, feature-map position and activation), its activation-maximization
images where the act-max analysis ran (channel objective; neuron objective cut at the unit's
receptive field) and its statistics; inactive channels are flagged. The index page lists the layers
and, where the noise analysis ran, the paper's Table 1. Reads only through
:func:`rfcore.store.open_atlas`.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image

from rfcore.errors import StoreError
from rfcore.noise import compare_table
from rfcore.store import AtlasLayer, open_atlas, redact

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
td, th { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }
img { image-rendering: pixelated; height: 64px; margin-right: 2px; }
img.mean { outline: 2px solid #4a7; }
tr.inactive { background: #f3f3f3; color: #999; }
.flag { color: #c33; font-weight: bold; }
""".strip()
_STATS = ("max", "mean", "zero_fraction", "positive_count")
#: (column title, array under layers/<layer>/) of the act-max images shown when present
_ACTMAX = (("act-max channel", "actmax/channel/image"), ("act-max neuron (RF)", "actmax/neuron/crop"))


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _save_png(chw: np.ndarray, path: Path) -> None:
    """(3, H, W) image in uint8 pixel units (NaN -> 0) as an RGB PNG."""
    pixels = np.clip(np.rint(np.nan_to_num(np.asarray(chw, dtype=np.float64))), 0, 255).astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB").save(path)


def _optional(layer: AtlasLayer, path: str) -> np.ndarray | None:
    try:
        return layer.array(path)
    except (StoreError, KeyError):
        return None


def _actmax_arrays(layer: AtlasLayer) -> dict[str, zarr.Array[Any]]:
    """The act-max image arrays this layer has (read one channel at a time: they can be large)."""
    found = {}
    for title, path in _ACTMAX:
        node = layer.group.get(path)
        if isinstance(node, zarr.Array):
            found[title] = node
    return found


def _markdown_table_html(markdown: str) -> str:
    """The HTML of a markdown table (header, separator, rows), cells escaped."""
    lines = [ln.strip().strip("|").split("|") for ln in markdown.strip().splitlines()]
    head, rows = lines[0], lines[2:]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in rows]
    return "".join(out) + "</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if np.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def _layer_page(layer: AtlasLayer, out_dir: Path) -> tuple[str, int | None]:
    """Write one layer's page and images; returns its file name and inactive count (None if unknown)."""
    attrs = layer.attrs
    slug = _slug(layer.name)
    img_dir = out_dir / "img" / slug
    img_dir.mkdir(parents=True, exist_ok=True)
    inactive = _optional(layer, "inactive")
    stats = {name: _optional(layer, name) for name in _STATS}
    rf = attrs.get("rf", {})
    head = (
        f'<p><a href="index.html">index</a></p><h1>{html.escape(layer.name)}</h1>'
        f"<p>{html.escape(str(attrs.get('kind')))}, {attrs.get('channels')} channels, feature map "
        f"{'x'.join(map(str, attrs.get('shape', [])))}, receptive field {'x'.join(map(str, rf.get('size', [])))}"
        f" px, stride {'x'.join(map(str, rf.get('stride', [])))}</p>"
    )
    if _optional(layer, "topk/value") is None:
        note = "complete" if attrs.get("complete") else "not complete"
        return _write_layer(out_dir, slug, layer.name, head + f"<p>No results yet ({note}).</p>"), None
    actmax = _actmax_arrays(layer)
    rows = [
        "<table><tr><th>channel</th><th>mean stimulus</th><th>top-k patches</th>"
        + "".join(f"<th>{title}</th>" for title in actmax)
        + "".join(f"<th>{name.replace('_', ' ')}</th>" for name in _STATS)
        + "</tr>"
    ]
    for c in range(int(attrs["channels"])):
        _save_png(layer.mean_stimulus(c), img_dir / f"c{c:04d}-mean.png")
        cells = [f'<img class="mean" src="img/{slug}/c{c:04d}-mean.png" title="mean stimulus">']
        top = layer.topk(c)
        for j in range(top.value.shape[0]):
            if top.image[j] < 0:
                continue
            _save_png(top.patch[j], img_dir / f"c{c:04d}-top{j:02d}.png")
            tip = f"image {top.image[j]} at ({top.y[j]}, {top.x[j]}): {top.value[j]:.4g}"
            cells.append(f'<img src="img/{slug}/c{c:04d}-top{j:02d}.png" title="{html.escape(tip)}">')
        is_inactive = inactive is not None and bool(inactive[c])
        flag = ' <span class="flag">inactive</span>' if is_inactive else ""
        row_class = ' class="inactive"' if is_inactive else ""
        stat_cells = "".join(f"<td>{_fmt(s[c]) if s is not None else '–'}</td>" for s in stats.values())
        am_cells = ""
        for j, (title, arr) in enumerate(actmax.items()):
            image = np.asarray(arr[c], dtype=np.float64)  # RGB display units, [0, 1]
            if np.isnan(image).all():  # this channel was not rendered
                am_cells += "<td>–</td>"
                continue
            _save_png(255.0 * image, img_dir / f"c{c:04d}-actmax{j}.png")
            am_cells += f'<td><img src="img/{slug}/c{c:04d}-actmax{j}.png" title="{html.escape(title)}"></td>'
        rows.append(
            f'<tr id="c{c}"{row_class}><td>{c}{flag}</td><td>{cells[0]}</td>'
            f"<td>{''.join(cells[1:])}</td>{am_cells}{stat_cells}</tr>"
        )
    rows.append("</table>")
    count = None if inactive is None else int(np.count_nonzero(inactive))
    return _write_layer(out_dir, slug, layer.name, head + "\n".join(rows)), count


def _write_layer(out_dir: Path, slug: str, name: str, body: str) -> str:
    page = f"layer-{slug}.html"
    (out_dir / page).write_text(_page(f"rfatlas: {name}", body), encoding="utf-8")
    return page


def write_report(atlas_url: str, out_dir: str | Path) -> Path:
    """Write the static HTML atlas of the store at ``atlas_url`` into ``out_dir``; returns index.html."""
    atlas = open_atlas(atlas_url)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run, cfg = atlas.run, atlas.run.get("config", {})
    rows = []
    for name in atlas.layers:
        layer = atlas.layer(name)
        page, inactive = _layer_page(layer, out)
        a = layer.attrs
        rf = a.get("rf", {})
        rows.append(
            f'<tr><td><a href="{page}">{html.escape(name)}</a></td><td>{html.escape(str(a.get("kind")))}</td>'
            f"<td>{a.get('channels')}</td><td>{'x'.join(map(str, a.get('shape', [])))}</td>"
            f"<td>{'x'.join(map(str, rf.get('size', [])))}</td><td>{'x'.join(map(str, rf.get('stride', [])))}</td>"
            f"<td>{'yes' if a.get('complete') else 'no'}</td><td>{'–' if inactive is None else inactive}</td></tr>"
        )
    try:
        noise = "<h2>Inactive channels and noise injection (Table 1)</h2>" + _markdown_table_html(
            compare_table([atlas_url])
        )
    except StoreError:  # no noise analysis in this atlas
        noise = ""
    skipped = atlas.skipped
    skipped_items = "".join(
        f"<li>{int(s['index'])}: {html.escape(str(s['path']))} ({html.escape(str(s['reason']))})</li>"
        for s in skipped
    )
    body = (
        f"<h1>rfatlas: {html.escape(str(run.get('model')))}</h1>"
        f"<p>weights {html.escape(str(run.get('weights')))}, dataset {html.escape(str(run.get('dataset')))}, "
        f"{run.get('num_images')} images at {run.get('image_size')} px, top-{cfg.get('k')} per channel.</p>"
        f"<p>store {html.escape(redact(atlas_url))}</p>"
        "<table><tr><th>layer</th><th>kind</th><th>channels</th><th>shape</th><th>rf</th><th>stride</th>"
        "<th>complete</th><th>inactive</th></tr>"
        + "".join(rows)
        + "</table>"
        + noise
        + f"<h2>Skipped images ({len(skipped)})</h2><ul>{skipped_items}</ul>"
    )
    index = out / "index.html"
    index.write_text(_page(f"rfatlas: {run.get('model')}", body), encoding="utf-8")
    return index
