"""The atlas as a browsable static site (Microscope-style): HTML + CSS + PNG and a little vanilla JS.

Layout under the output URL (a local directory or any fsspec URL, e.g. ``s3://bucket/prefix``)::

    index.html                      every atlas and its layers (+ compare.html with two or more atlases)
    site.css, site.js
    <atlas>/index.html              run, layers table, analyses' index sections, Table 1, skipped images
    <atlas>/<layer>/index.html      grid of every channel: thumbnail, badges, sort, filter
    <atlas>/<layer>/c0012.html      one channel: top-k, mean stimuli, act-max, virtual filter, analyses
    <atlas>/<layer>/img/...         images (each written once)

Everything reads through :func:`rfcore.atlas.open_atlas`, one layer at a time and one channel block
at a time (memory: one layer's per-channel summaries plus one block of images). `write_layer` is
the unit of work (a flow can run layers in parallel); `write_site` does it all in order. Display
only: nothing here computes an analysis. The sweep's results (top-k, mean stimuli, statistics,
receptive field) are rendered here; every registered analysis (`rfcore.analysis`) contributes through
its report hooks: `report_index`, `report_layer`, `channel_columns` (sort keys; booleans are badges)
and `report_channel`.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import posixpath
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
from PIL import Image

from rfcore.analysis import Analysis, Section, get_analysis, list_analyses
from rfcore.atlas import Atlas, AtlasLayer, open_atlas
from rfcore.errors import RfatlasError, StoreError
from rfcore.memory import retain_freed_memory
from rfcore.store import redact

log = logging.getLogger(__name__)

#: channel-axis block read at once from the image arrays (patches, stimuli, act-max images)
BLOCK = 64
#: sweep statistics shown and sortable (name, title)
STATS = (
    ("max", "max activation"),
    ("mean", "mean activation"),
    ("zero_fraction", "zero fraction"),
    ("positive_count", "images > 0"),
)
#: root attr where the atlas flow may record the Prefect flow run's UI URL
FLOW_RUN_ATTR = "prefect_flow_run_url"


class SiteError(RfatlasError):
    """The site cannot be written (bad output, an analysis's report hook failed)."""


# --- output -------------------------------------------------------------------------------------------
class SiteOutput:
    """Files under the output URL; each path is written at most once per instance."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") or url
        fs, root = fsspec.core.url_to_fs(self.url)
        self.fs: Any = fs
        self.root = str(root).rstrip("/")
        self.local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        self._written: set[str] = set()
        self._dirs: set[str] = set()

    def write(self, rel: str, data: bytes | str) -> None:
        """Write `rel` (a path relative to the site root)."""
        body = data.encode("utf-8") if isinstance(data, str) else data
        path = f"{self.root}/{rel}"
        parent = posixpath.dirname(path)
        if self.local and parent not in self._dirs:
            self.fs.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        self.fs.pipe_file(path, body)
        self._written.add(rel)

    def has(self, rel: str) -> bool:
        """Whether `rel` was written by this instance."""
        return rel in self._written

    def href(self, rel: str) -> str:
        """A URL for `rel` (a local path for local sites)."""
        return f"{self.root}/{rel}" if self.local else f"{self.url}/{rel}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "_"


def to_pixels(chw: np.ndarray, scale: str = "uint8") -> np.ndarray:
    """(C, H, W) or (H, W) values -> (H, W, 3) or (H, W) uint8 for a PNG.

    `scale`: "uint8" values are pixels (clipped), "unit" values in [0, 1], "auto" min-max of the
    finite values, "signed" symmetric around 0 (0 is mid grey). NaN becomes 0 (grey for "signed").
    """
    a = np.asarray(chw, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise SiteError(f"an image must be (1 or 3, H, W) or (H, W), got shape {a.shape}")
    finite = a[np.isfinite(a)]
    if scale == "uint8":
        v = a
    elif scale == "unit":
        v = 255.0 * a
    elif scale == "auto":
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        v = 255.0 * (a - lo) / (hi - lo if hi > lo else 1.0)
    elif scale == "signed":
        m = float(np.abs(finite).max()) if finite.size else 1.0
        v = 127.5 + 127.5 * a / (m if m > 0 else 1.0)
        v = np.where(np.isfinite(v), v, 127.5)
    else:
        raise SiteError(f"unknown image scale {scale!r} (uint8, unit, auto, signed)")
    pixels = np.clip(np.rint(np.nan_to_num(v)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))


def png_bytes(chw: np.ndarray, scale: str = "uint8") -> bytes:
    """PNG of an image (see `to_pixels`)."""
    pixels = to_pixels(chw, scale)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def figure_bytes(
    draw: Callable[[Any], None],
    size: tuple[float, float] = (3, 3),
    dpi: int = 80,
    projection: str | None = None,
) -> bytes:
    """PNG of a matplotlib figure (Agg canvas, no pyplot state) with one Axes (of `projection`)
    that `draw` fills."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    w, h = size  # fixed margins (tight_layout would double the cost of a small plot)
    if projection == "polar":  # angle labels all round, the title above them
        fig.subplots_adjust(left=0.12, bottom=0.1, right=0.88, top=1 - min(0.2, 0.55 / h))
    else:  # room for a small title
        fig.subplots_adjust(
            left=min(0.4, 0.7 / w), bottom=min(0.4, 0.55 / h), right=0.97, top=1 - min(0.15, 0.3 / h)
        )
    ax = fig.add_subplot(projection=projection)
    draw(ax)
    for axes in fig.axes:
        _plain_log_ticks(axes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plain_log_ticks(ax: Any) -> None:
    """Log axes labelled `0.05`, `0.1` instead of mathtext `10^{-1}` and unlabelled minor ticks: the
    mathtext layout was 3/4 of a small plot's drawing time (and a few decades need no minor labels)."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=6))
            axis.set_major_formatter(StrMethodFormatter("{x:g}"))
            axis.set_minor_formatter(NullFormatter())


class SiteAssets:
    """`rfcore.analysis.Assets` for the pages of one directory: files go to `<dir>/img/<prefix><name>`
    and the returned href is relative to that directory. Each file is written once."""

    def __init__(self, out: SiteOutput, directory: str, prefix: str = "") -> None:
        self.out = out
        self.dir = directory.strip("/")
        self.prefix = prefix

    def _rel(self, name: str) -> tuple[str, str]:
        base = _slug(self.prefix + name)
        if not base.endswith(".png"):
            base += ".png"
        href = f"img/{base}"
        return href, f"{self.dir}/{href}" if self.dir else href

    def image(self, name: str, chw: np.ndarray, *, scale: str = "uint8") -> str:
        href, rel = self._rel(name)
        if not self.out.has(rel):
            self.out.write(rel, png_bytes(chw, scale))
        return href

    def figure(
        self,
        name: str,
        draw: Callable[[Any], None],
        *,
        size: tuple[float, float] = (3, 3),
        projection: str | None = None,
    ) -> str:
        href, rel = self._rel(name)
        if not self.out.has(rel):
            self.out.write(rel, figure_bytes(draw, size, projection=projection))
        return href


# --- page frame -----------------------------------------------------------------------------------------
CSS = """
:root { --fg: #1d2330; --muted: #6b7385; --line: #e3e6ec; --accent: #2f6fdb; --bg: #f7f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: var(--fg); background: #fff; }
header.top { background: #1d2330; color: #fff; padding: .6em 1.5em; display: flex; gap: 1em; align-items: baseline; flex-wrap: wrap; }
header.top a { color: #cfe0ff; text-decoration: none; }
header.top .crumbs a:after { content: " /"; color: #8b93a7; }
main { padding: 1em 1.5em 3em; max-width: 1400px; }
h1 { font-size: 1.5em; margin: .3em 0; } h2 { font-size: 1.15em; margin: 1.4em 0 .5em; border-bottom: 1px solid var(--line); padding-bottom: .2em; }
a { color: var(--accent); }
.muted { color: var(--muted); }
table { border-collapse: collapse; margin: .4em 0; }
td, th { border-bottom: 1px solid var(--line); padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
nav.pager { display: flex; gap: 1.2em; margin: .4em 0 .8em; flex-wrap: wrap; }
nav.pager .off { color: #b5bac6; }
.controls { display: flex; gap: 1em; align-items: center; margin: .6em 0 1em; flex-wrap: wrap; position: sticky; top: 0; background: #fff; padding: .4em 0; z-index: 2; }
.controls input { padding: 4px 8px; width: 22em; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(104px, 1fr)); gap: 8px; }
.card { display: block; text-decoration: none; color: var(--fg); border: 1px solid var(--line); border-radius: 4px; padding: 4px; background: #fff; }
.card:hover { border-color: var(--accent); box-shadow: 0 1px 4px rgba(0,0,0,.12); }
.card img, .card .noimg { width: 100%; aspect-ratio: 1; display: block; image-rendering: pixelated; background: var(--bg); object-fit: contain; }
.card .meta { display: flex; justify-content: space-between; font-size: 12px; margin-top: 2px; }
.card.inactive img { opacity: .35; }
.badge { display: inline-block; font-size: 10.5px; line-height: 1.4; border-radius: 3px; padding: 0 4px; margin: 1px 2px 0 0; background: #e8eefb; color: #2450a8; }
.badge.inactive { background: #eee; color: #777; }
.badges { min-height: 15px; }
figure { display: inline-block; margin: 0 10px 10px 0; vertical-align: top; text-align: center; font-size: 12px; }
figure img { image-rendering: pixelated; width: 112px; height: 112px; object-fit: contain; background: var(--bg); display: block; }
figure img.plot { image-rendering: auto; width: auto; height: auto; max-width: 420px; }
figure figcaption { max-width: 112px; overflow-wrap: anywhere; color: var(--muted); }
figure figcaption b { color: var(--fg); }
figure img.plot + figcaption { max-width: none; }
.layers a { margin-right: .6em; white-space: nowrap; }
section.analysis { margin-top: 1em; }
.glance { display: flex; flex-wrap: wrap; gap: 0 2.5em; align-items: flex-start; }
.glance h2 { margin-top: .3em; }
""".strip()

JS = r"""
(function () {
  "use strict";
  var grid = document.getElementById("grid");
  if (grid) {
    var data = JSON.parse(document.getElementById("columns").textContent);
    var cards = Array.prototype.slice.call(grid.children);
    var sortSel = document.getElementById("sort"), filter = document.getElementById("filter");
    var count = document.getElementById("count");
    var value = function (card, key) {
      var c = +card.dataset.channel;
      if (key === "channel") return c;
      var v = data.values[key] ? data.values[key][c] : null;
      return v === null || v === undefined ? NaN : +v;
    };
    var fmt = function (v) { return isNaN(v) ? "–" : (Math.abs(v) >= 1000 || Number.isInteger(v) ? String(v) : v.toPrecision(3)); };
    var sort = function () {
      var key = sortSel.value, desc = key !== "channel";
      cards.sort(function (a, b) {
        var va = value(a, key), vb = value(b, key);
        if (isNaN(va) !== isNaN(vb)) return isNaN(va) ? 1 : -1;
        if (isNaN(va) || va === vb) return value(a, "channel") - value(b, "channel");
        return desc ? vb - va : va - vb;
      });
      cards.forEach(function (c) {
        grid.appendChild(c);
        c.querySelector(".val").textContent = key === "channel" ? "" : fmt(value(c, key));
      });
    };
    var test = function (card, token) {
      var m = /^([A-Za-z_][\w-]*)\s*(<=|>=|<|>|=)\s*(-?[\d.]+(?:e[-+]?\d+)?)$/i.exec(token);
      if (m) {
        var v = value(card, m[1]), x = +m[3];
        return m[2] === "<" ? v < x : m[2] === ">" ? v > x : m[2] === "<=" ? v <= x : m[2] === ">=" ? v >= x : v === x;
      }
      if (/^\d+$/.test(token)) return card.dataset.channel === token;
      return (card.dataset.badges || "").toLowerCase().indexOf(token.toLowerCase()) >= 0;
    };
    var apply = function () {
      var tokens = filter.value.trim().split(/\s+/).filter(Boolean), shown = 0;
      cards.forEach(function (c) {
        var ok = tokens.every(function (t) { return test(c, t); });
        c.hidden = !ok;
        if (ok) shown++;
      });
      count.textContent = shown + " of " + cards.length + " channels";
    };
    sortSel.addEventListener("change", sort);
    filter.addEventListener("input", apply);
    sort(); apply();
  }
  document.addEventListener("keydown", function (e) {
    if (e.target && /INPUT|SELECT|TEXTAREA/.test(e.target.tagName)) return;
    var rel = e.key === "ArrowLeft" ? "prev" : e.key === "ArrowRight" ? "next" : null;
    var a = rel && document.querySelector('a[rel="' + rel + '"]');
    if (a) location.href = a.href;
  });
})();
""".strip()


def _page(title: str, body: str, *, root: str, crumbs: Sequence[tuple[str, str]] = ()) -> str:
    """One HTML page; `root` is the relative URL of the site root ("" or "../..")."""
    prefix = f"{root}/" if root else ""
    trail = "".join(f'<a href="{html.escape(h)}">{html.escape(t)}</a> ' for t, h in crumbs)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        f'<link rel="stylesheet" href="{prefix}site.css"></head>\n<body>\n'
        f'<header class="top"><a href="{prefix}index.html"><b>rfatlas</b></a>'
        f'<span class="crumbs">{trail}</span></header>\n<main>\n{body}\n</main>\n'
        f'<script src="{prefix}site.js"></script>\n</body></html>\n'
    )


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(float(value)) else f"{float(value):.4g}"
    return _e(value)


def _xy(values: Sequence[Any]) -> str:
    return "×".join(str(v) for v in values)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], num: Sequence[int] = ()) -> str:
    """HTML table; cells are HTML already; columns in `num` right-aligned."""
    out = ["<table>" + ("<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" if head else "")]
    for r in rows:
        out.append(
            "<tr>"
            + "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(r))
            + "</tr>"
        )
    return "".join(out) + "</table>"


def markdown_table_html(markdown: str) -> str:
    """The HTML of a markdown table (header, separator, rows), cells escaped."""
    lines = [ln.strip().strip("|").split("|") for ln in markdown.strip().splitlines()]
    return _table([_e(c.strip()) for c in lines[0]], [[_e(c.strip()) for c in r] for r in lines[2:]])


def _section(s: Section, cls: str = "analysis") -> str:
    return f'<section class="{cls}"><h2>{_e(s.title)}</h2>\n{s.html}\n</section>'


# --- what the site reads ------------------------------------------------------------------------------
def registered() -> list[Analysis]:
    """Every registered analysis, in run order."""
    return [get_analysis(n) for n in list_analyses()]


def _hook(analysis: Analysis, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        raise SiteError(f"analysis {analysis.name}: {what} failed: {type(exc).__name__}: {exc}") from exc


def _node(group: zarr.Group, path: str) -> zarr.Array[Any] | None:
    try:
        node = group.get(path)
    except (KeyError, ValueError):
        return None
    return node if isinstance(node, zarr.Array) else None


@dataclass(frozen=True)
class ImageInfo:
    """What the store knows of the swept images (labels and paths when recorded)."""

    labels: np.ndarray | None
    paths: np.ndarray | None
    classes: list[str]

    def describe(self, index: int) -> tuple[str, str]:
        """(class name or label, file name) of dataset image `index`; "" when unknown."""
        cls = name = ""
        if self.labels is not None and 0 <= index < self.labels.shape[0]:
            label = int(self.labels[index])  # -1: unlabelled
            cls = (
                self.classes[label] if 0 <= label < len(self.classes) else (str(label) if label >= 0 else "")
            )
        if self.paths is not None and 0 <= index < self.paths.shape[0]:
            name = posixpath.basename(str(self.paths[index]).replace("\\", "/"))
        return cls, name


def image_info(atlas: Atlas) -> ImageInfo:
    """Labels (`images/label`), paths (`images/path`) and class names (root attr `classes`)."""
    root = atlas.store.root
    labels, paths = _node(root, "images/label"), _node(root, "images/path")
    classes = root.attrs.get("classes") or atlas.run.get("classes") or []
    classes = classes if isinstance(classes, list) else []
    return ImageInfo(
        None if labels is None else np.asarray(labels[...]),
        None if paths is None else np.asarray(paths[...]),
        [str(c) for c in classes],
    )


def flow_run_url(atlas: Atlas) -> str | None:
    """The Prefect UI URL of the flow run that made the atlas, when the flow recorded it."""
    url = atlas.store.root.attrs.get(FLOW_RUN_ATTR)
    return str(url) if url else None


def _blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


class _Block:
    """Rows [start, stop) of some (channel, ...) arrays, read at once."""

    def __init__(self, nodes: Mapping[str, zarr.Array[Any] | None], start: int, stop: int) -> None:
        self.start = start
        self.rows = {k: np.asarray(v[start:stop]) for k, v in nodes.items() if v is not None}

    def get(self, name: str, channel: int) -> np.ndarray | None:
        rows = self.rows.get(name)
        return None if rows is None else rows[channel - self.start]


@dataclass(frozen=True)
class Column:
    """A per-channel value of the layer grid: numeric (sortable) or boolean (a badge)."""

    name: str
    values: np.ndarray
    source: str

    @property
    def badge(self) -> bool:
        return self.values.dtype == np.bool_


def _columns(atlas: Atlas, layer: AtlasLayer, channels: int) -> list[Column]:
    cols: list[Column] = []
    for name, _ in STATS:
        node = _node(layer.group, name)
        if node is not None:
            cols.append(Column(name, np.asarray(node[...]), "sweep"))
    for a in registered():
        got = _hook(a, f"channel_columns({layer.name})", a.channel_columns, atlas, layer.name)
        for name, values in (got or {}).items():
            v = np.asarray(values)
            if v.shape != (channels,):
                raise SiteError(
                    f"analysis {a.name}: column {name!r} of {layer.name} has shape {v.shape}, not ({channels},)"
                )
            cols.append(
                Column(str(name), v.astype(np.bool_) if v.dtype == np.bool_ else v.astype(np.float64), a.name)
            )
    return cols


def _jsonable(v: Any) -> Any:
    f = float(v)
    return f if math.isfinite(f) else None


# --- layer pages -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Ctx:
    atlas: Atlas
    slug: str
    out: SiteOutput
    info: ImageInfo


def _layer_dir(slug: str, layer: str) -> str:
    return f"{slug}/{_slug(layer)}"


def _chan_page(c: int) -> str:
    return f"c{c:04d}.html"


def write_layer(
    atlas_url: str, out_url: str, layer: str, *, slug: str | None = None, layers: Sequence[str] | None = None
) -> dict[str, Any]:
    """Write `layer`'s grid page, its channel pages and their images; returns a small summary
    (for the index pages). Independent of the other layers: flows can run layers in parallel.
    `layers`: the layers the site has (previous/next links; default every layer of the atlas)."""
    atlas = open_atlas(atlas_url)
    out = SiteOutput(out_url)
    ctx = _Ctx(atlas, slug or atlas_slug(atlas_url), out, image_info(atlas))
    return _write_layer(ctx, layer, layers)


def _write_layer(ctx: _Ctx, name: str, site_layers: Sequence[str] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    atlas, out = ctx.atlas, ctx.out
    layer = atlas.layer(name)
    attrs = layer.attrs
    channels = int(attrs["channels"])
    directory = _layer_dir(ctx.slug, name)
    names = list(site_layers) if site_layers is not None else atlas.layers
    i = names.index(name)
    crumbs = [(ctx.slug, "../index.html"), (name, "index.html")]
    rf = attrs.get("rf", {})
    head = (
        f"<h1>{_e(name)}</h1>"
        + _layer_nav(names, i)
        + f'<p class="muted">{_e(atlas.run.get("model"))} · {_e(attrs.get("kind"))} · {channels} channels · '
        f"feature map {_xy(attrs.get('shape', []))} · receptive field {_xy(rf.get('size', []))} px, "
        f"stride {_xy(rf.get('stride', []))} · patch {attrs.get('patch', {}).get('size')} px"
        f"{'' if attrs.get('complete') else ' · <b>not complete</b>'}</p>"
    )
    summary: dict[str, Any] = {
        "name": name, "href": f"{_slug(name)}/index.html", "channels": channels, "kind": attrs.get("kind"),
        "shape": list(attrs.get("shape", [])), "rf": list(rf.get("size", [])), "stride": list(rf.get("stride", [])),
        "complete": bool(attrs.get("complete")), "badges": {}, "stats": {},
    }  # fmt: skip
    values = _node(layer.group, "topk/value")
    if values is None:
        body = head + f"<p>No results yet ({'complete' if attrs.get('complete') else 'not complete'}).</p>"
        out.write(f"{directory}/index.html", _page(f"{name} · rfatlas", body, root="../..", crumbs=crumbs))
        summary["seconds"] = time.perf_counter() - t0
        return summary

    top = {f: np.asarray(layer.array(f"topk/{f}")) for f in ("value", "image", "y", "x")}
    cols = _columns(atlas, layer, channels)
    layer_assets = SiteAssets(out, directory)
    sections = []
    for a in registered():
        s = _hook(a, f"report_layer({name})", a.report_layer, atlas, name, layer_assets)
        if s is not None:
            sections.append(_section(s))
    maxima = next((c.values for c in cols if c.name == "max"), None)
    if maxima is not None and np.isfinite(maxima).any():
        finite = maxima[np.isfinite(maxima)]

        def hist(ax: Any) -> None:
            ax.hist(finite, bins=min(40, max(5, channels // 4)), color="#2f6fdb")
            ax.set_xlabel("max activation")
            ax.set_ylabel("channels")

        plot = layer_assets.figure("layer-max-hist", hist, size=(4, 2.2))
        sections.insert(
            0, f'<figure><img class="plot" src="{plot}" alt="histogram of channel maxima"></figure>'
        )

    nodes = {"patch": _node(layer.group, "topk/patch"), "mean": _node(layer.group, "mean_stimulus")}
    cards = []
    for start, stop in _blocks(channels, BLOCK):
        block = _Block(nodes, start, stop)
        for c in range(start, stop):
            assets = SiteAssets(out, directory, prefix=f"c{c:04d}-")
            thumb = _channel_page(ctx, layer, c, channels, top, cols, block, assets, crumbs, rf)
            cards.append(_card(c, thumb, cols))
    for col in cols:
        if col.badge:
            summary["badges"][col.name] = int(np.count_nonzero(col.values))
        elif np.isfinite(col.values).any():
            summary["stats"][col.name] = float(np.nanmedian(col.values))
    sort_opts = '<option value="channel">channel</option>' + "".join(
        f'<option value="{_e(c.name)}"{" selected" if c.name == "max" else ""}>{_e(c.name.replace("_", " "))}</option>'
        for c in cols
        if not c.badge
    )
    badge_counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in summary["badges"].items())
    columns_json = json.dumps(
        {"values": {c.name: [_jsonable(v) for v in c.values] for c in cols if not c.badge}},
        separators=(",", ":"),
    ).replace("</", "<\\/")
    body = (
        head
        + (f"<p>{_e(badge_counts)}</p>" if badge_counts else "")
        + '<div class="controls"><label>sort by <select id="sort">'
        + sort_opts
        + '</select></label><input id="filter" type="search" placeholder="filter: 12 · inactive · max>1.5" '
        'aria-label="filter channels"><span id="count" class="muted"></span></div>\n'
        + f'<div id="grid">\n{"".join(cards)}\n</div>\n'
        + f'<script type="application/json" id="columns">{columns_json}</script>'
        + ("<h2>The layer</h2>" if sections else "")
        + "\n".join(sections)  # below the grid: the grid is what one browses
    )
    out.write(
        f"{directory}/index.html", _page(f"{name} · {ctx.slug} · rfatlas", body, root="../..", crumbs=crumbs)
    )
    summary["seconds"] = time.perf_counter() - t0
    log.info("site: layer %s (%d channels) in %.1f s", name, channels, summary["seconds"])
    return summary


def _layer_nav(names: Sequence[str], i: int) -> str:
    prev = f'<a href="../{_slug(names[i - 1])}/index.html">← layer {_e(names[i - 1])}</a>' if i > 0 else ""
    nxt = (
        f'<a href="../{_slug(names[i + 1])}/index.html">layer {_e(names[i + 1])} →</a>'
        if i + 1 < len(names)
        else ""
    )
    return f'<nav class="pager">{prev}<a href="../index.html">all layers</a>{nxt}</nav>'


def _card(c: int, thumb: str | None, cols: Sequence[Column]) -> str:
    badges = [col.name for col in cols if col.badge and bool(col.values[c])]
    img = f'<img src="{thumb}" loading="lazy" alt="channel {c}">' if thumb else '<div class="noimg"></div>'
    cls = " inactive" if "inactive" in badges else ""
    tags = "".join(f'<span class="badge {_e(_slug(b))}">{_e(b.replace("_", " "))}</span>' for b in badges)
    return (
        f'<a class="card{cls}" href="{_chan_page(c)}" data-channel="{c}" data-badges="{_e(" ".join(badges))}">'
        f'{img}<span class="meta"><b>{c}</b><span class="val"></span></span><div class="badges">{tags}</div></a>\n'
    )


def _finite(a: np.ndarray | None) -> bool:
    return a is not None and bool(np.isfinite(a).any())


def _channel_page(
    ctx: _Ctx,
    layer: AtlasLayer,
    c: int,
    channels: int,
    top: Mapping[str, np.ndarray],
    cols: Sequence[Column],
    block: _Block,
    assets: SiteAssets,
    crumbs: Sequence[tuple[str, str]],
    rf_attrs: Mapping[str, Any],
) -> str | None:
    """Write channel `c`'s page and images; returns the grid thumbnail's href (None if no image)."""
    atlas, name = ctx.atlas, layer.name
    rf = rf_attrs
    parts: list[str] = []  # sections below the top row
    glance: list[str] = []  # next to the facts: mean stimuli
    thumb: str | None = None

    # top-k patches
    figs = []
    patches = block.get("patch", c)
    for j in range(top["value"].shape[1]):
        idx = int(top["image"][c, j])
        if idx < 0:
            continue
        src = assets.image(f"top{j:02d}", patches[j]) if patches is not None else None
        thumb = thumb or src
        cls, fname = ctx.info.describe(idx)
        y, x = int(top["y"][c, j]), int(top["x"][c, j])
        cap = f"<b>{_fmt(top['value'][c, j])}</b><br>image {idx}" + (f"<br>{_e(cls)}" if cls else "")
        cap += (f"<br>{_e(fname)}" if fname else "") + f"<br>at ({y}, {x})"
        tip = f"#{j + 1}: activation {float(top['value'][c, j]):.4g}, image {idx} {fname} {cls}".strip()
        img = f'<img src="{src}" alt="top {j + 1}" title="{_e(tip)}">' if src else ""
        figs.append(f"<figure>{img}<figcaption>{cap}</figcaption></figure>")
    parts.append(
        f"<h2>Top-{top['value'].shape[1]} patches</h2>" + ("".join(figs) or "<p>No positive activation.</p>")
    )

    # mean stimuli
    means = []
    mean = block.get("mean", c)
    if _finite(mean):
        assert mean is not None
        src = assets.image("mean", mean)
        thumb = thumb or src
        pc = _col(cols, "positive_count", c)
        cap = "mean stimulus<br>(every image > 0" + (f", n = {_fmt(pc)})" if pc is not None else ")")
        means.append(f'<figure><img src="{src}" alt="mean stimulus"><figcaption>{cap}</figcaption></figure>')
    if patches is not None:
        ok = top["image"][c] >= 0
        if ok.any():
            src = assets.image("topk-mean", patches[ok].astype(np.float64).mean(axis=0))
            means.append(
                f'<figure><img src="{src}" alt="mean of the top-k patches"><figcaption>mean of the '
                f"top-{int(ok.sum())} patches</figcaption></figure>"
            )
    if means:
        glance.append("<div><h2>Mean stimuli</h2>" + "".join(means) + "</div>")

    for a in registered():
        s = _hook(a, f"report_channel({name}, {c})", a.report_channel, atlas, name, c, assets)
        if s is not None:
            parts.append(_section(s))

    # facts
    facts = [("layer", _e(name)), ("channel", f"{c} of {channels}")]
    for col in cols:
        v = col.values[c]
        facts.append((col.name.replace("_", " "), _fmt(bool(v)) if col.badge else _fmt(v)))
    facts.append(
        ("receptive field", f"{_xy(rf.get('size', []))} px, stride {_xy(rf.get('stride', []))}, "
         f"centre of unit (0, 0) at {_xy(rf.get('offset', []))}")
    )  # fmt: skip
    if int(top["image"][c, 0]) >= 0:
        y, x = int(top["y"][c, 0]), int(top["x"][c, 0])
        box = _rf_box(rf, y, x)
        if box is not None:
            facts.append(
                ("top hit", f"unit ({y}, {x}): input rows {box[0]}–{box[1]}, columns {box[2]}–{box[3]}")
            )
    run_url = flow_run_url(atlas)
    if run_url:
        facts.append(("flow run", f'<a href="{_e(run_url)}">Prefect flow run</a>'))
    fact_table = _table([], [[f"<b>{k}</b>", v] for k, v in facts])

    pager = _channel_nav(c, channels)
    top_row = f'<div class="glance"><div>{fact_table}</div>{"".join(glance)}</div>'
    body = f"<h1>{_e(name)} · channel {c}</h1>{pager}{top_row}" + "\n".join(parts) + pager
    page_crumbs = [*crumbs, (f"channel {c}", _chan_page(c))]
    ctx.out.write(
        f"{assets.dir}/{_chan_page(c)}",
        _page(f"{name} channel {c} · {ctx.slug} · rfatlas", body, root="../..", crumbs=page_crumbs),
    )
    return thumb


def _col(cols: Sequence[Column], name: str, c: int) -> Any:
    for col in cols:
        if col.name == name:
            return col.values[c]
    return None


def _rf_box(rf: Mapping[str, Any], y: int, x: int) -> tuple[int, int, int, int] | None:
    """Input box [y0, y1) × [x0, x1) of unit (y, x) (as `rfcore.receptive.rf_box`, unclipped)."""
    try:
        size, stride, offset = rf["size"], rf["stride"], rf["offset"]
        y0 = round(offset[0] + y * stride[0] - (size[0] - 1) / 2)
        x0 = round(offset[1] + x * stride[1] - (size[1] - 1) / 2)
    except (KeyError, IndexError, TypeError):
        return None
    return int(y0), int(y0 + size[0]), int(x0), int(x0 + size[1])


def _channel_nav(c: int, channels: int) -> str:
    prev = (
        f'<a rel="prev" href="{_chan_page(c - 1)}">← channel {c - 1}</a>'
        if c > 0
        else '<span class="off">← first</span>'
    )
    nxt = (
        f'<a rel="next" href="{_chan_page(c + 1)}">channel {c + 1} →</a>'
        if c + 1 < channels
        else '<span class="off">last →</span>'
    )
    return f'<nav class="pager">{prev}<a rel="up" href="index.html">back to the layer</a>{nxt}</nav>'


# --- atlas and site index, comparison ---------------------------------------------------------------
def atlas_slug(url: str) -> str:
    """Directory name of an atlas in the site: its store's base name without `.zarr`."""
    base = posixpath.basename(url.rstrip("/").replace("\\", "/")) or "atlas"
    return _slug(base[:-5] if base.endswith(".zarr") else base)


def _slugs(urls: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for u in urls:
        s = atlas_slug(u)
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}-{seen[s]}")
    return out


def write_atlas_index(atlas_url: str, out_url: str, slug: str, layers: Sequence[Mapping[str, Any]]) -> str:
    """Write `<slug>/index.html` from the layer summaries; returns its relative path."""
    atlas, out = open_atlas(atlas_url), SiteOutput(out_url)
    run, cfg = atlas.run, atlas.run.get("config", {})
    badge_names = sorted({b for la in layers for b in la["badges"]})
    rows = []
    for la in layers:
        rows.append(
            [f'<a href="{_e(la["href"])}">{_e(la["name"])}</a>', _e(la["kind"]), str(la["channels"]),
             _xy(la["shape"]), _xy(la["rf"]), _xy(la["stride"]), "yes" if la["complete"] else "no",
             _fmt(la["stats"].get("max", float("nan")))]
            + [str(la["badges"].get(b, "–")) for b in badge_names]
        )  # fmt: skip
    head = ["layer", "kind", "channels", "shape", "rf", "stride", "complete", "median max"]
    head += [_e(b.replace("_", " ")) for b in badge_names]
    assets = SiteAssets(out, slug)
    sections = []
    for a in registered():
        s = _hook(a, "report_index", a.report_index, atlas, assets)
        if s is not None:
            sections.append(_section(s))
    run_url = flow_run_url(atlas)
    skipped = atlas.skipped
    skipped_rows = [[str(int(s["index"])), _e(s["path"]), _e(s["reason"])] for s in skipped]
    body = (
        f"<h1>{_e(run.get('model'))} <span class='muted'>({_e(slug)})</span></h1>"
        f"<p>weights {_e(run.get('weights'))} · dataset {_e(run.get('dataset'))} · {run.get('num_images')} images at "
        f"{run.get('image_size')} px · top-{cfg.get('k')} per channel</p>"
        f"<p class='muted'>store {_e(redact(atlas_url))}"
        + (f' · <a href="{_e(run_url)}">Prefect flow run</a>' if run_url else "")
        + "</p><h2>Layers</h2>"
        + _table(head, rows, num=[2, 7, *range(8, 8 + len(badge_names))])
        + "\n".join(sections)
        + f"<h2>Skipped images ({len(skipped)})</h2>"
        + (_table(["index", "path", "reason"], skipped_rows) if skipped else "<p>None.</p>")
    )
    rel = f"{slug}/index.html"
    out.write(rel, _page(f"{run.get('model')} · rfatlas", body, root="..", crumbs=[(slug, "index.html")]))
    return rel


def _noise_table(urls: Sequence[str]) -> str:
    if not any(isinstance(open_atlas(u).store.root.get("noise"), zarr.Group) for u in urls):
        return ""  # (and no torch import for rfcore.noise)
    from rfcore.noise import compare_table

    try:
        return markdown_table_html(compare_table(list(urls)))
    except StoreError:  # an atlas without noise results
        return ""


def _similarities(atlases: Sequence[Atlas], slugs: Sequence[str], assets: SiteAssets) -> str:
    """The cross-block similarity of each atlas (`rfcore.similarity`, when that module exists): one
    table with a column per atlas for {stage: value} results, a heat map each for matrices."""
    try:
        from rfcore.similarity import cross_block_similarity
    except ImportError:
        return ""
    results = [cross_block_similarity(a) for a in atlases]
    title = (
        "<h2>Cross-block similarity</h2><p class='muted'>the same channel in consecutive blocks of a "
        "stage (rfcore.similarity; ≈ 0 by chance)</p>"
    )
    if all(isinstance(r, Mapping) for r in results):
        stages: list[str] = []
        for r in results:
            stages += [str(k) for k in r if str(k) not in stages]
        if not stages:
            return title + "<p>No stage has two consecutive swept blocks of equal width.</p>"
        head = ["stage"] + [_e(a.run.get("model")) for a in atlases]
        rows = [[_e(st)] + [_fmt(r.get(st, float("nan"))) for r in results] for st in stages]
        return title + _table(head, rows, num=list(range(1, len(head))))
    figs = []
    for a, slug, result in zip(atlases, slugs, results, strict=True):
        arr = np.asarray(result, dtype=np.float64)

        def draw(ax: Any, arr: np.ndarray = arr) -> None:
            im = ax.imshow(arr, cmap="viridis")
            ax.figure.colorbar(im, ax=ax)

        src = assets.figure(f"similarity-{slug}", draw, size=(3.4, 3))
        figs.append(
            f'<figure><img class="plot" src="{src}" alt="cross-block similarity of {_e(slug)}">'
            f"<figcaption>{_e(a.run.get('model'))}</figcaption></figure>"
        )
    return title + "".join(figs)


def write_compare(
    urls: Sequence[str], out_url: str, slugs: Sequence[str], summaries: Sequence[Sequence[Mapping[str, Any]]]
) -> str:
    """Write `compare.html`: Table 1, the layers side by side, cross-block similarity; returns its path."""
    out = SiteOutput(out_url)
    atlases = [open_atlas(u) for u in urls]
    parts = ["<h1>Comparison</h1>"]
    table = _noise_table(urls)
    parts.append(
        "<h2>Inactive channels and noise injection (Table 1)</h2>"
        + (table or "<p>No noise results in these atlases.</p>")
    )
    head = ["layer"] + [
        f'<a href="{s}/index.html">{_e(a.run.get("model"))}</a>' for s, a in zip(slugs, atlases, strict=True)
    ]
    order: list[str] = []
    for layers in summaries:
        order += [x["name"] for x in layers if x["name"] not in order]
    rows = []
    for name in order:
        row = [_e(name)]
        for s, layers in zip(slugs, summaries, strict=True):
            la: Mapping[str, Any] | None = next((x for x in layers if x["name"] == name), None)
            if la is None:
                row.append("–")
                continue
            bits = [f'<a href="{s}/{_e(la["href"])}">{la["channels"]} ch</a>']
            if "max" in la["stats"]:
                bits.append(f"median max {_fmt(la['stats']['max'])}")
            if "zero_fraction" in la["stats"]:
                bits.append(f"zeros {100 * la['stats']['zero_fraction']:.0f}%")
            bits += [f"{n} {b.replace('_', ' ')}" for b, n in la["badges"].items()]
            row.append(" · ".join(bits))
        rows.append(row)
    parts.append("<h2>Layers side by side</h2>" + _table(head, rows))
    parts.append(_similarities(atlases, slugs, SiteAssets(out, "")))
    out.write(
        "compare.html",
        _page("comparison · rfatlas", "\n".join(parts), root="", crumbs=[("comparison", "compare.html")]),
    )
    return "compare.html"


def write_root(
    out_url: str, urls: Sequence[str], slugs: Sequence[str], summaries: Sequence[Sequence[Mapping[str, Any]]]
) -> str:
    """Write the site's `index.html` (every atlas and its layers), `site.css` and `site.js`."""
    out = SiteOutput(out_url)
    out.write("site.css", CSS + "\n")
    out.write("site.js", JS + "\n")
    items = []
    for url, slug, layers in zip(urls, slugs, summaries, strict=True):
        a = open_atlas(url)
        links = " ".join(f'<a href="{slug}/{_e(la["href"])}">{_e(la["name"])}</a>' for la in layers)
        channels = sum(int(la["channels"]) for la in layers)
        items.append(
            f'<h2><a href="{slug}/index.html">{_e(a.run.get("model"))}</a> <span class="muted">{_e(slug)}</span></h2>'
            f'<p class="muted">{_e(a.run.get("dataset"))} · {a.run.get("num_images")} images · {len(layers)} layers · '
            f"{channels} channels</p><p class='layers'>{links}</p>"
        )
    compare = '<p><a href="compare.html">Compare the atlases</a></p>' if len(urls) > 1 else ""
    body = "<h1>Atlases</h1>" + compare + "\n".join(items)
    out.write("index.html", _page("rfatlas", body, root=""))
    return "index.html"


class SiteWriter:
    """Writes the site of `urls` while their atlases arrive: `add(url)` starts that atlas's layer
    pages (in `workers` spawned processes, in the background; with one worker, at once), `finish()`
    waits for every page and writes the atlas indexes, the comparison page (two or more atlases) and
    the root. So a pipeline can write one atlas's pages while it computes the next atlas."""

    def __init__(
        self,
        urls: Sequence[str],
        out_url: str,
        *,
        layers: Sequence[str] | None = None,
        workers: int = 1,
    ) -> None:
        self.urls = list(urls)
        if not self.urls:
            raise SiteError("no atlas to write a site for")
        self.t0 = time.perf_counter()
        self.slugs = _slugs(self.urls)
        self.out_url, self.layers = out_url, layers
        self.out = SiteOutput(out_url)
        self._pool: Any = None
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")  # no fork of zarr's event-loop threads
            self._pool = ProcessPoolExecutor(workers, mp_context=ctx)
        self._pages: dict[str, list[Any]] = {}  # slug -> layer summaries, or futures of them

    def add(self, url: str) -> None:
        """Start the layer pages of atlas `url` (one of `urls`)."""
        slug = self.slugs[self.urls.index(url)]
        atlas = open_atlas(url)  # fail early on a bad URL
        names = tuple(n for n in atlas.layers if self.layers is None or n in self.layers)
        if self._pool is not None:
            self._pages[slug] = [
                self._pool.submit(_layer_job, (url, self.out_url, slug, n, names)) for n in names
            ]
        else:
            ctx = _Ctx(atlas, slug, self.out, image_info(atlas))
            self._pages[slug] = [_write_layer(ctx, n, names) for n in names]

    def close(self) -> None:
        """Stop the page processes (pages not started yet are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> SiteWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def finish(self) -> dict[str, Any]:
        """Wait for the pages (`add`s any atlas not added yet), then write the indexes; returns
        {"index": URL of index.html, "seconds", "layers": {slug: [summary, ...]}}."""
        try:
            for url, slug in zip(self.urls, self.slugs, strict=True):
                if slug not in self._pages:
                    self.add(url)
            summaries = [
                [p.result() if hasattr(p, "result") else p for p in self._pages[slug]] for slug in self.slugs
            ]
        finally:
            self.close()
        for url, slug, layer_summaries in zip(self.urls, self.slugs, summaries, strict=True):
            write_atlas_index(url, self.out_url, slug, layer_summaries)
        if len(self.urls) > 1:
            write_compare(self.urls, self.out_url, self.slugs, summaries)
        write_root(self.out_url, self.urls, self.slugs, summaries)
        return {
            "index": self.out.href("index.html"),
            "seconds": time.perf_counter() - self.t0,
            "layers": dict(zip(self.slugs, summaries, strict=True)),
        }


def write_site(
    urls: Sequence[str] | str,
    out_url: str,
    *,
    layers: Sequence[str] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Write the whole site of one or more atlases (a comparison page with two or more) under
    `out_url`; returns {"index": URL of index.html, "seconds", "layers": {slug: [summary, ...]}}.

    `layers` limits the pages to those layers; `workers` > 1 writes layers in that many processes."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    for url in urls:
        open_atlas(url)  # fail early on a bad URL, before any page is written
    return SiteWriter(urls, out_url, layers=layers, workers=workers).finish()


def _layer_job(job: tuple[str, str, str, str, tuple[str, ...]]) -> dict[str, Any]:
    url, out_url, slug, layer, names = job
    retain_freed_memory()  # a spawned page process
    return write_layer(url, out_url, layer, slug=slug, layers=names)
