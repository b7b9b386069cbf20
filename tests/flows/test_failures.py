"""The one failure policy (`flows.failures`): every future settles first; bad input fails as itself
(CLI exit 2), anything else as TaskFailedError naming the failed units (CLI exit 1); finished units
keep their markers, so a rerun resumes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from flows.cli import main
from flows.failures import TaskFailedError, gather
from rfcore.analysis import ANALYSES, Analysis, Resources, Unit, register
from rfcore.errors import DataError
from rfcore.pipeline import run_sweep
from rfcore.store import AtlasStore


class _Done:
    def __init__(self, value: Any) -> None:
        self.value = value
        self.asked = False

    def result(self) -> Any:
        self.asked = True
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


def test_gather_waits_for_all_then_names_the_crashed_units() -> None:
    futures = [_Done(1), _Done(RuntimeError("worker died")), _Done(DataError("bad image")), _Done(4)]
    with pytest.raises(TaskFailedError, match=r"1 of 4 x task\(s\) failed.*b: RuntimeError: worker died"):
        gather(futures, ["a", "b", "c", "d"], what="x")
    assert all(f.asked for f in futures)
    with pytest.raises(DataError, match="bad image"):
        gather([_Done(1), _Done(DataError("bad image"))], ["a", "b"], what="x")
    assert gather([_Done(1), _Done(2)], ["a", "b"], what="x") == [1, 2]


@dataclass(frozen=True)
class _CrashOptions:
    crash: str = field(default="", metadata={"help": "unit that crashes: 'bug' or 'input'"})


class _Crashing(Analysis):
    """Three units; the one named by the option fails (a bug, or bad input)."""

    name = "crash-test"
    description = "test analysis"
    Options: ClassVar[type[Any]] = _CrashOptions

    def plan(self, store: AtlasStore, opts: _CrashOptions) -> list[Unit]:
        units = [Unit(f"crash-test/u{i}", None, {"crash": opts.crash if i == 1 else ""}) for i in range(3)]
        pending = set(store.pending([u.key for u in units]))
        return [u for u in units if u.key in pending]

    def run(self, store: AtlasStore, unit: Unit, res: Resources) -> dict[str, Any]:
        if unit.args["crash"] == "bug":
            raise ZeroDivisionError("division by zero in a unit")
        if unit.args["crash"] == "input":
            raise DataError("label 12 is not a class of the model")
        return {}


@pytest.fixture
def crashing() -> Iterator[None]:
    register(_Crashing)
    try:
        yield
    finally:
        del ANALYSES["crash-test"]


@pytest.mark.usefixtures("prefect_harness", "crashing")
def test_cli_exit_codes_crash_1_bad_input_2_and_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through `rfatlas NAME`; the analysis exists only in this process, so its tasks run in Prefect's
    thread pool here instead of on Dask worker processes (which import only the installed analyses)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    monkeypatch.setattr("flows.runner.make_task_runner", lambda *a, **k: ThreadPoolTaskRunner(max_workers=2))
    url = str(tmp_path / "a.zarr")
    run_sweep(url, model_name="resnet10t", data_spec="synthetic:4", layers="conv1", k=1, shard_size=4,
              batch_size=4, device="cpu", progress=False)  # fmt: skip
    assert main(["crash-test", url, "--crash", "bug", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 crash-test task(s) failed" in err and "crash-test[u1]: ZeroDivisionError" in err
    assert AtlasStore.open(url).done_keys("crash-test") == {"crash-test/u0", "crash-test/u2"}
    assert main(["crash-test", url, "--crash", "input", "--device", "cpu"]) == 2
    assert "label 12 is not a class" in capsys.readouterr().err
    assert main(["crash-test", url, "--device", "cpu"]) == 0  # resumes: only u1 runs
    assert "1 unit(s) run now" in capsys.readouterr().out
