"""Progress of a sweep: a Prefect progress artifact (images done / total, images/s, ETA) updated as
shards finish, plus in-process listeners (the CLI's terminal progress bar)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

Listener = Callable[["ProgressEvent"], None]
_listeners: list[Listener] = []


@dataclass
class ProgressEvent:
    stage: str  # "sweep" | "merge" | "analysis" | "done"
    label: str  # e.g. "atlas-resnet10t-synthetic:512"
    done: int
    total: int
    rate: float  # items/s since start (0 before the first item)
    eta_s: float | None
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call `listener` with every ProgressEvent emitted in this process while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def emit(event: ProgressEvent) -> None:
    for listener in list(_listeners):
        with contextlib.suppress(Exception):
            listener(event)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class SweepProgress:
    """Counts swept images; keeps a progress artifact in the Prefect UI up to date (best effort)."""

    def __init__(
        self, label: str, total: int, already: int = 0, *, key: str | None = None, unit: str = "images"
    ):
        self.label, self.total, self.unit = label, total, unit
        self.already = already  # done by an earlier (resumed) run: not counted in the rate
        self.done = already
        self.t0 = time.perf_counter()
        self._artifact: Any = None
        self._key = key
        self._last_push = 0.0
        emit(ProgressEvent("sweep", label, self.done, total, 0.0, None))
        self._push(force=True)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.t0
        new = self.done - self.already
        return new / elapsed if elapsed > 0 and new > 0 else 0.0

    @property
    def eta(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def description(self) -> str:
        resumed = f", {self.already} from an earlier run" if self.already else ""
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit} swept{resumed}; "
            f"{self.rate:.1f} {self.unit}/s; ETA {fmt_duration(self.eta)}"
        )

    def update(self, n: int, **extra: Any) -> None:
        self.done = min(self.total, self.done + n)
        emit(ProgressEvent("sweep", self.label, self.done, self.total, self.rate, self.eta, extra))
        self._push(force=self.done >= self.total)

    def _push(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_push < 1.0:  # at most one API call per second
            return
        self._last_push = now
        pct = 100.0 * self.done / self.total if self.total else 100.0
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact
            from prefect.context import FlowRunContext

            if FlowRunContext.get() is None:
                return
            if self._artifact is None:
                self._artifact = create_progress_artifact(pct, key=self._key, description=self.description())
            else:
                update_progress_artifact(self._artifact, pct, description=self.description())
        except Exception as e:  # the UI's progress is best effort, never a reason to fail a sweep
            import logging

            logging.getLogger("rfatlas.progress").warning("progress artifact not updated: %s", e)


def terminal_bar(desc: str = "sweep") -> tuple[Listener, Callable[[], None]]:
    """A tqdm bar fed by ProgressEvents: (listener, close). One bar per label, replaced as labels change."""
    from tqdm.auto import tqdm

    state: dict[str, Any] = {"label": None, "bar": None}

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None

    def listener(ev: ProgressEvent) -> None:
        if ev.stage != "sweep":
            close()
            note = {
                "train": f"training: {ev.done}/{ev.total} models done",
                "merge": f"{ev.label}: merging {ev.total} layers and cropping patches",
                "analysis": f"{ev.label}: analysis {ev.extra.get('analysis')}",
            }.get(ev.stage)
            if note:
                print(note, file=sys.stderr, flush=True)
            return
        if state["label"] != ev.label or state["bar"] is None:
            close()
            state["label"] = ev.label
            state["bar"] = tqdm(
                total=ev.total, initial=ev.done, unit="img", desc=ev.label, dynamic_ncols=True
            )
        bar = state["bar"]
        if ev.done > bar.n:
            bar.update(ev.done - bar.n)
        if ev.done >= ev.total:
            close()

    return listener, close


#: Environment variable naming a file where `mark` appends timing events (bench/end_to_end.py).
TIMING_ENV = "RFATLAS_TIMING"


def mark(stage: str, **info: Any) -> None:
    """Append `{"stage", "t" (wall clock), "pid", **info}` as one JSON line to the file named by
    `RFATLAS_TIMING` (nothing when unset): where a run spends its time, across processes."""
    import os

    path = os.environ.get(TIMING_ENV)
    if not path:
        return
    import json

    line = json.dumps({"stage": stage, "t": time.time(), "pid": os.getpid(), **info}, default=str)
    with contextlib.suppress(OSError), open(path, "a") as f:
        f.write(line + "\n")
