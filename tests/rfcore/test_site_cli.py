"""`rfatlas report` and `rfatlas serve` (flows.cli, flows.serve) on a tiny atlas."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from flows.cli import main
from flows.serve import make_server
from rfcore.site import write_site


def test_report_command_writes_the_site_and_a_comparison(tiny_kit: Any, tmp_path: Path, capsys: Any) -> None:
    a, b = tmp_path / "resnet.zarr", tmp_path / "plain.zarr"
    tiny_kit.make(str(a))
    tiny_kit.make(str(b))
    out = tmp_path / "site"
    assert main(["report", str(a), str(b), "--out", str(out), "--workers", "2"]) == 0
    said = capsys.readouterr().out
    assert "wrote the site of 2 atlas(es), 4 layer pages" in said and str(out / "index.html") in said
    assert (out / "compare.html").exists() and (out / "plain" / "layer1.0" / "c0005.html").exists()


def test_report_of_a_missing_store_is_one_line(tmp_path: Path, capsys: Any) -> None:
    assert main(["report", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rfatlas: error: no atlas at")


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers["Content-Type"], r.read()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_serve_gives_the_site_on_localhost(
    tiny_atlas: tuple[str, dict[str, Any]], tmp_path: Path, where: str
) -> None:
    site = str(tmp_path / "site") if where == "local" else f"memory://serve-test-{tmp_path.name}/site"
    write_site([tiny_atlas[0]], site)
    server = make_server(site, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        base = f"http://127.0.0.1:{port}"
        status, ctype, body = _get(f"{base}/")
        assert status == 200 and ctype.startswith("text/html") and b"tiny/layer1.0/index.html" in body
        status, ctype, body = _get(f"{base}/tiny/layer1.0/img/c0000-top00.png")
        assert ctype == "image/png" and body.startswith(b"\x89PNG")
        assert _get(f"{base}/site.js")[2].startswith(b"(function")
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(f"{base}/tiny/no-such-page.html")
        assert e.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_serve_refuses_a_directory_without_a_site(tmp_path: Path, capsys: Any) -> None:
    assert main(["serve", str(tmp_path)]) == 2
    assert "has no index.html" in capsys.readouterr().err
