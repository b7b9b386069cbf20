"""The Prefect API of a CLI run: `PREFECT_API_URL`, else a server already running on this machine,
else a temporary local API server started in the background (no heavy imports here: the CLI starts
it before importing torch, Prefect or Dask, so their imports overlap the server's own)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


def quiet_logs(verbose: bool = False) -> None:
    """Defaults for CLI runs: the terminal shows warnings only (the CLI draws a progress bar), while
    flow and task logs still reach the Prefect API at INFO (the UI's Logs tab): only the console
    handler of Prefect's logging config is raised (`PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL`), not
    `PREFECT_LOGGING_LEVEL`, which would stop them at the API handler too. Set before Prefect is
    imported; Dask workers inherit the environment."""
    if verbose:
        return
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "error")


def _healthy(api_url: str, timeout: float = 0.5) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return bool(r.status == 200)
    except Exception:
        return False


def running_api() -> str | None:
    """The API of a Prefect server already running on this machine at the configured host and port
    (`prefect server start`: 127.0.0.1:4200 by default), or None. One quick local request."""
    host = os.environ.get("PREFECT_SERVER_API_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    port = os.environ.get("PREFECT_SERVER_API_PORT", "4200")
    url = f"http://{host}:{port}/api"
    return url if _healthy(url, timeout=0.3) else None


class TemporaryAPI:
    """A temporary local Prefect API server (what Prefect's ephemeral mode starts), started in the
    background: `start()` returns at once (the server imports while the caller validates inputs),
    `wait()` blocks until it answers. `stop()` first delivers every queued log and event, then stops
    it. Built without importing `prefect.server` here (seconds of imports the server does itself)."""

    def __init__(self) -> None:
        import subprocess

        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.port = 0
        self.ready = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TemporaryAPI:
        import importlib.util
        import socket
        import subprocess
        import sys

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.submodule_search_locations
        app_dir = os.path.dirname(next(iter(spec.submodule_search_locations)))
        env = {  # settings come from the environment and the profile, as for this process
            # no automations on a server that lives for one run: no trigger/action loops using CPU
            "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        env.pop("PREFECT_API_URL", None)
        import tempfile

        self._log = tempfile.TemporaryFile()  # the server's own output: shown only if it fails
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
                "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        return self

    def wait(self, timeout: float = 180.0) -> str:
        """Block until the server answers (restarting it on another port if its port was taken)."""
        import time

        deadline = time.monotonic() + timeout
        while not self.ready:
            assert self.proc is not None
            code = self.proc.poll()
            if code == 3:  # uvicorn: port in use (taken since we picked it)
                self.start()
                continue
            if code is not None:
                self._log.seek(0)
                tail = self._log.read()[-2000:].decode(errors="replace").strip()
                raise RuntimeError(f"the temporary Prefect API server exited with code {code}: {tail}")
            if _healthy(self.api_url, timeout=1.0):
                self.ready = True
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("timed out waiting for the temporary Prefect API server")
            time.sleep(0.05)
        return self.api_url

    def stop(self) -> None:
        import subprocess

        if self.proc is None:
            return
        if self.ready:
            drain_prefect_services()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self.ready = False


def drain_prefect_services(timeout: float = 10.0) -> None:
    """Send every log and event this process has queued for the API, and stop their workers (so
    nothing is left to ship, and nothing waits, at interpreter exit). Safe to call from an event
    loop's thread (a Dask worker's `client.run`): the draining then runs in a thread of its own."""
    import asyncio
    import threading

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        thread = threading.Thread(target=drain_prefect_services, args=(timeout,), daemon=True)
        thread.start()
        thread.join(timeout + 1.0)
        return
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout)
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout)


@contextlib.contextmanager
def prefect_api(server: TemporaryAPI | None = None, url: str | None = None) -> Iterator[str | None]:
    """Use `PREFECT_API_URL` when set, else a Prefect server already running on this machine, else
    a temporary local API server for this process and its Dask workers, stopped afterwards with every
    log delivered. `server`/`url`: what `start_api()` returned, when the caller started it early."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if server is None:
        url = url or PREFECT_API_URL.value() or running_api()
        if not url:
            server = TemporaryAPI().start()
    try:
        api_url = server.wait() if server is not None else url
        assert api_url
        old = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = api_url
        try:
            with temporary_settings({PREFECT_API_URL: api_url}):
                yield api_url
                drain_prefect_services()  # while the server still runs
        finally:
            _restore("PREFECT_API_URL", old)
    finally:
        if server is not None:
            server.stop()


def start_api() -> tuple[str, TemporaryAPI | None]:
    """(API URL, server): `PREFECT_API_URL`, else a server already running here, else a temporary
    API server started now, in the background (its URL is known at once; it answers after
    `server.wait()`). Pass both to `prefect_api`."""
    url = os.environ.get("PREFECT_API_URL") or running_api()
    if url:
        return url, None
    server = TemporaryAPI().start()  # first, before the seconds of importing Prefect's settings
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():  # set in the Prefect profile
        server.stop()
        return str(PREFECT_API_URL.value()), None
    return server.api_url, server


def _restore(key: str, old: str | None) -> None:
    if old is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = old
