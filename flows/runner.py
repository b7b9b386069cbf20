"""Dask task runners for the flows, and an API server for Prefect runs started from the CLI.

* default: a `LocalCluster` sized to the machine: worker processes × 1 task thread each, with torch's
  intra-op threads set so that workers × torch threads = cores (`RFATLAS_TORCH_THREADS`);
* `address="tcp://HOST:8786"`: an existing cluster (`dask-cuda`, `dask-kubernetes`, `dask-jobqueue`, ...);
* GPU machines: one worker per GPU (`LocalGPUCluster`: each worker sees only its own GPU) with
  `resources={"GPU": 1}`; tasks that run the model ask for it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from distributed import LocalCluster

from rfcore.errors import RfatlasError

ADDRESS_ENV = "RFATLAS_DASK_ADDRESS"  # deployments: point the flows at an existing Dask cluster
WORKERS_ENV = "RFATLAS_DASK_WORKERS"
GPU_RESOURCE = "GPU"


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_ids() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` names them (indices or UUIDs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return [g.strip() for g in visible.split(",") if g.strip()][: gpu_count()]
    return [str(i) for i in range(gpu_count())]


class LocalGPUCluster(LocalCluster):
    """A `LocalCluster` whose worker i sees only GPU `gpu_ids[i % len(gpu_ids)]` (its own
    `CUDA_VISIBLE_DEVICES`, as dask-cuda's LocalCUDACluster does), so `cuda` means that GPU there."""

    def __init__(self, *, gpu_ids: list[str], **kwargs: Any) -> None:
        if not gpu_ids:
            raise RfatlasError("LocalGPUCluster needs at least one GPU")
        self.gpu_ids = list(gpu_ids)
        super().__init__(**kwargs)

    async def _start(self) -> None:
        for i, name in enumerate(sorted(self.worker_spec)):
            spec = self.worker_spec[name]
            options = dict(spec.get("options", {}))
            options["env"] = {
                **options.get("env", {}),
                "CUDA_VISIBLE_DEVICES": self.gpu_ids[i % len(self.gpu_ids)],
            }
            self.worker_spec[name] = {**spec, "options": options}
        await super()._start()


def cluster_kwargs(
    workers: int | None = None, *, device: str = "auto", threads: int | None = None
) -> dict[str, Any]:
    """`LocalCluster` arguments sized to this machine (see the module doc); on GPU machines they
    include `gpu_ids`, the arguments of a `LocalGPUCluster`."""
    cores = cpu_count()
    gpus = gpu_count() if device in ("auto", "cuda") or device.startswith("cuda:") else 0
    if device.startswith("cuda") and gpus == 0:
        raise RfatlasError(f"--device {device}: no CUDA GPU is visible on this machine")
    if workers is not None and workers < 1:
        raise RfatlasError(f"--workers must be at least 1, not {workers}")
    if workers is None:
        env = os.environ.get(WORKERS_ENV, "")
        workers = int(env) if env.isdigit() and int(env) > 0 else None
    if workers is None:
        workers = gpus if gpus else min(cores, 4)
    torch_threads = threads or max(1, cores // workers)
    kw: dict[str, Any] = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:8787",  # loopback only (a busy port: another one)
        "env": {
            "RFATLAS_TORCH_THREADS": str(torch_threads),
            "OMP_NUM_THREADS": str(torch_threads),
            "MKL_NUM_THREADS": str(torch_threads),
        },
    }
    for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_HOME"):
        # Workers inherit the environment; make sure they report to the same API as the flow.
        if os.environ.get(key):
            kw["env"][key] = os.environ[key]
    if gpus:
        kw["resources"] = {GPU_RESOURCE: 1}
        if not device.startswith("cuda:"):  # cuda:N names a GPU of the machine: every worker sees all
            kw["gpu_ids"] = gpu_ids()
    return kw


def make_task_runner(
    workers: int | None = None,
    address: str | None = None,
    *,
    device: str = "auto",
    threads: int | None = None,
) -> Any:
    """A `DaskTaskRunner`: `address` connects to an existing scheduler; otherwise a local cluster."""
    from prefect_dask import DaskTaskRunner

    if address and workers is not None:
        raise RfatlasError("use either --workers (local cluster) or --dask-address (existing cluster)")
    if workers is None:
        address = address or os.environ.get(ADDRESS_ENV) or None
    if address:
        return DaskTaskRunner(address=address)
    kwargs = cluster_kwargs(workers, device=device, threads=threads)
    return DaskTaskRunner(
        cluster_class=LocalGPUCluster if "gpu_ids" in kwargs else LocalCluster, cluster_kwargs=kwargs
    )


def check_dask_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast (RfatlasError) when nothing answers at a Dask scheduler address."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme not in ("tcp", "tls") or not parsed.hostname:
        raise RfatlasError(f"bad --dask-address {address!r}; expected tcp://HOST:PORT")
    port = parsed.port or 8786
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        raise RfatlasError(f"no Dask scheduler answers at {address} ({e.strerror or e})") from None


def shared_runner() -> Any:
    """Inside a flow: a task runner for subflows that reuses this flow's Dask cluster (no new cluster)."""
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    ctx = FlowRunContext.get()
    runner = ctx.task_runner if ctx else None
    if isinstance(runner, DaskTaskRunner):
        return DaskTaskRunner(address=runner.client.scheduler.address)
    return runner.duplicate() if runner is not None else None


def gpu_annotation(runner: Any, device: str) -> dict[str, Any]:
    """`dask.annotate` arguments for model-running tasks: ask for a GPU when the cluster has them."""
    if device == "cpu":
        return {}
    try:
        from prefect_dask import DaskTaskRunner

        if not isinstance(runner, DaskTaskRunner):
            return {}
        workers = runner.client.scheduler_info().get("workers", {})
    except Exception:
        return {}
    if any(w.get("resources", {}).get(GPU_RESOURCE) for w in workers.values()):
        return {"resources": {GPU_RESOURCE: 1}}
    return {}


def gpu_tasks(device: str) -> contextlib.AbstractContextManager[Any]:
    """Context for submitting model-running tasks from a flow: on a cluster with GPU workers each
    task asks for one GPU (`dask.annotate`), so at most one runs per GPU."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    annotate = gpu_annotation(ctx.task_runner if ctx else None, device)
    if not annotate:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(**annotate)


def quiet_logs(verbose: bool = False) -> None:
    """Defaults for CLI runs: Prefect and Dask log warnings only (the CLI draws a progress bar)."""
    if verbose:
        return
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
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


class EarlyCluster:
    """The local Dask cluster of a run, started in a background thread now (its workers import
    torch, Prefect and the tasks while the caller does other start-up work), and closed fast: the
    workers' queued Prefect logs and events are delivered first, then the processes stop."""

    def __init__(self, kwargs: dict[str, Any], api_url: str | None) -> None:
        import threading

        kwargs = dict(kwargs)
        kwargs["env"] = dict(kwargs.get("env", {}))
        if api_url:
            kwargs["env"]["PREFECT_API_URL"] = api_url
        kwargs.setdefault("preload", ["tasks.atlas"])  # the imports of the first task, done early
        self._kwargs = kwargs
        self.cluster: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="rfatlas-cluster-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            kwargs = dict(self._kwargs)
            if "gpu_ids" in kwargs:
                self.cluster = LocalGPUCluster(**kwargs)
            else:
                self.cluster = LocalCluster(**kwargs)
        except BaseException as e:
            self._error = e

    def wait(self, timeout: float = 300.0) -> str:
        self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        if self.cluster is None:
            raise RfatlasError("the local Dask cluster did not start in time")
        return str(self.cluster.scheduler_address)

    def close(self, wait: bool = True) -> None:
        """Stop the cluster; `wait=False` leaves one still starting alone (its worker processes are
        daemonic: they end with this process)."""
        self._thread.join(60.0 if wait else 0.0)
        cluster, self.cluster = self.cluster, None
        if cluster is None:
            return
        with contextlib.suppress(Exception):
            from distributed import Client

            with Client(cluster, timeout=10, set_as_default=False) as client:
                client.run(drain_prefect_services, timeout=10)  # logs/events reach the API first
                client.register_plugin(_ExitOnClose(), name="rfatlas-exit-on-close")
        with contextlib.suppress(Exception):
            cluster.close(timeout=10)


try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover
    _WorkerPlugin = object  # type: ignore[assignment,misc]


class _ExitOnClose(_WorkerPlugin):  # type: ignore[misc,valid-type]
    """Worker plugin: when the worker closes, its process exits at once (`os._exit`), skipping an
    interpreter teardown (torch, threads) that takes seconds; registered only once every task is
    done and every log delivered, so nothing is lost."""

    def teardown(self, worker: Any) -> None:
        import sys

        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(0)


def start_cluster(
    workers: int | None, *, device: str = "auto", api_url: str | None = None
) -> EarlyCluster:
    """`EarlyCluster` of `cluster_kwargs(workers, device=device)` reporting to `api_url`."""
    return EarlyCluster(cluster_kwargs(workers, device=device), api_url)


def _restore(key: str, old: str | None) -> None:
    if old is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = old
