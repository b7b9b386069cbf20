"""`rfatlas serve SITE`: serve a site written by `rfatlas report` on 127.0.0.1 (http.server), from a
local directory or any fsspec URL (e.g. `s3://bucket/prefix`), for a quick look."""

from __future__ import annotations

import functools
import http.server
import mimetypes
import posixpath
import sys
import urllib.parse
from typing import Any

from rfcore.errors import RfatlasError


class _FsspecHandler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of the files under an fsspec root (directories give their index.html)."""

    fs: Any
    root: str

    def _body(self) -> tuple[bytes, str] | None:
        path = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)).lstrip("/")
        if path.startswith(".."):
            return None
        if path in ("", ".") or self.path.endswith("/"):
            path = posixpath.join(path if path != "." else "", "index.html")
        try:
            data: bytes = self.fs.cat_file(f"{self.root}/{path}")
        except (FileNotFoundError, IsADirectoryError):
            return None
        return data, mimetypes.guess_type(path)[0] or "application/octet-stream"

    def _send(self, head_only: bool) -> None:
        found = self._body()
        if found is None:
            self.send_error(404)
            return
        data, ctype = found
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head_only:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(False)

    def do_HEAD(self) -> None:
        self._send(True)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per error only
        if args and str(args[1]).startswith(("4", "5")):
            sys.stderr.write(f"{self.address_string()} {format % args}\n")


def make_server(site: str, port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server for `site` bound to 127.0.0.1:`port` (0 = any free port); not started."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(site)
    root = str(root).rstrip("/")
    if not fs.exists(f"{root}/index.html"):
        raise RfatlasError(
            f"{site} has no index.html; write a site there with `rfatlas report URL --out {site}`"
        )
    handler: Any
    if "://" not in site or site.startswith("file://"):
        handler = functools.partial(_QuietFiles, directory=root)
    else:
        handler = type("Handler", (_FsspecHandler,), {"fs": fs, "root": root})
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as e:
        raise RfatlasError(f"cannot serve on 127.0.0.1:{port}: {e.strerror or e}") from None


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        if len(args) > 1 and str(args[1]).startswith(("4", "5")):
            sys.stderr.write(f"{self.address_string()} {format % args}\n")


def serve(site: str, port: int = 8000) -> int:
    """Serve until interrupted (Ctrl-C); prints the URL to open."""
    server = make_server(site, port)
    host, bound = server.server_address[:2]
    print(f"serving {site} at http://{host}:{bound}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
