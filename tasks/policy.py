"""Shared task options: retries with backoff for transient I/O errors only, tags, no result caching."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable
from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from rfcore.errors import RfatlasError
from rfcore.store import set_lease_token_provider

#: Tag of tasks that run the model: `prefect concurrency-limit create gpu 1` caps them.
GPU_TAG = "gpu"
RETRIES = 3
RETRY_DELAYS = exponential_backoff(backoff_factor=2)(RETRIES)  # 2, 4, 8 s
RETRY_JITTER = 0.5

# Errors that say the input is wrong: retrying cannot help.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# OSErrors by errno that no retry fixes: disk full, quota, read-only file system, bad names, ...
_PERMANENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENAMETOOLONG,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.EINVAL,
        errno.EFBIG,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOTEMPTY,
        errno.EXDEV,
    }
)
# Transient errors of the network stacks fsspec/s3fs use, matched by class name (no hard imports).
_TRANSIENT_NAMES = frozenset(
    {
        "ClientError",  # aiohttp
        "ClientOSError",
        "ClientConnectionError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "EndpointConnectionError",  # botocore
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "CommClosedError",  # distributed
        "StreamClosedError",
    }
)


def task_logger() -> Any:
    """The Prefect run logger inside a task run (shows in the UI); a plain logger under `.fn()`."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rfatlas.tasks")


def is_transient(exc: BaseException | None) -> bool:
    """True for I/O hiccups worth retrying (network, timeouts, throttling); False for bad input."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RfatlasError) and exc.__cause__ is None:
            return False
        if isinstance(exc, _PERMANENT_OS_ERRORS):
            return False
        if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and not isinstance(exc, RfatlasError):
            return True
        if {c.__name__ for c in type(exc).__mro__} & _TRANSIENT_NAMES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the failure is a transient I/O error."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            result = state.result(raise_on_failure=False)
        except Exception as e:  # result not retrievable: judge the error we got
            result = e
        exc = result if isinstance(result, BaseException) else None
    return is_transient(exc)


TASK_OPTIONS: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_jitter_factor": RETRY_JITTER,
    "retry_condition_fn": retry_transient,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}

#: Prefect tag prefix that carries the store lease token of a run to its tasks (wherever they run).
LEASE_TAG_PREFIX = "rfatlas-lease:"


def lease_tag(token: str) -> str:
    """The tag `flows.lease.hold_lease` puts on every task of a run that holds a store's lease."""
    return f"{LEASE_TAG_PREFIX}{token}"


def _tokens_from_tags(tags: Iterable[str]) -> list[str]:
    return [t[len(LEASE_TAG_PREFIX) :] for t in tags if t.startswith(LEASE_TAG_PREFIX)]


def prefect_lease_tokens() -> list[str]:
    """Lease tokens in the tags of the current task run (on any worker), else of the tags context."""
    from prefect.context import TagsContext, TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is not None:
        return _tokens_from_tags(ctx.task_run.tags)
    return _tokens_from_tags(TagsContext.get().current_tags)


# Every task module imports this one, so tasks on Dask workers check their run's lease before they
# write a completion marker (`AtlasStore.mark_done`).
set_lease_token_provider(prefect_lease_tokens)
