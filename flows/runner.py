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


from flows.api import (  # noqa: E402,F401  (re-exported: the API helpers used to live here)
    TemporaryAPI,
    drain_prefect_services,
    prefect_api,
    quiet_logs,
    running_api,
    start_api,
)


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
        # Workers exit at once on close (`_ExitOnClose`), leaving their nanny's queue semaphore to
        # the OS: keep multiprocessing's resource tracker (started with the cluster) from warning.
        quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
        if quiet not in os.environ.get("PYTHONWARNINGS", ""):
            os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet]))
        self._kwargs = kwargs
        self._warm: tuple[Any, tuple[Any, ...]] | None = None
        self._warmed = threading.Event()
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
            return
        self._warmed.wait()
        if self._warm is not None:
            with contextlib.suppress(Exception):  # best effort: the tasks load what they need anyway
                from distributed import Client

                fn, args = self._warm
                with Client(self.cluster, timeout=30, set_as_default=False) as client:
                    client.run(fn, *args)

    def warm(self, fn: Any = None, *args: Any) -> None:
        """Once the cluster is up, run `fn(*args)` on every worker (load the model and dataset into
        the workers' caches while the API server comes up); `warm()` alone: nothing to warm."""
        self._warm = (fn, args) if fn is not None else None
        self._warmed.set()

    def wait(self, timeout: float = 300.0) -> str:
        self._warmed.set()
        self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        if self.cluster is None:
            raise RfatlasError("the local Dask cluster did not start in time")
        return str(self.cluster.scheduler_address)

    def close(self, wait: bool = True) -> None:
        """Stop the cluster; `wait=False` leaves one still starting alone (its worker processes are
        daemonic: they end with this process)."""
        self._warmed.set()
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


def start_cluster(workers: int | None, *, device: str = "auto", api_url: str | None = None) -> EarlyCluster:
    """`EarlyCluster` of `cluster_kwargs(workers, device=device)` reporting to `api_url`."""
    return EarlyCluster(cluster_kwargs(workers, device=device), api_url)
