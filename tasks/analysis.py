"""The Prefect tasks of every registered analysis (`rfcore.analysis`): plan, one task per unit, finish.
Thin: each opens the store and calls the analysis's step; bulk data moves only through Zarr."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.runtime import task_run

from rfcore.analysis import Unit, get_analysis
from rfcore.store import AtlasStore
from tasks.policy import TASK_OPTIONS
from tasks.runtime import WorkerResources, configure_worker


def unit_label(name: str, key: str) -> str:
    """`maxpool/control/shard-0003` for the key `noise/maxpool/control/shard-0003` of `noise`."""
    return key.removeprefix(f"{name}/")


def _unit_run_name() -> str:
    p = task_run.parameters
    return f"{p['name']}[{unit_label(p['name'], p['unit'].key)}]"


@task(name="analysis-plan", task_run_name="{name}-plan", **TASK_OPTIONS)
def plan_units(name: str, store_url: str, options: dict[str, Any]) -> list[Unit]:
    """Check the stored config, create the arrays; the units still to run."""
    analysis = get_analysis(name)
    return analysis.plan(AtlasStore.open(store_url, "r+"), analysis.options(options))


@task(name="analysis", task_run_name=_unit_run_name, **TASK_OPTIONS)
def run_unit(name: str, store_url: str, unit: Unit, device: str = "auto") -> dict[str, Any]:
    """Run one unit (skipped when its marker exists), then write its marker."""
    store = AtlasStore.open(store_url, "r+")
    if store.is_done(unit.key):
        return {"key": unit.key, "cached": True}
    configure_worker()
    analysis = get_analysis(name)
    out = analysis.run(store, unit, WorkerResources(store.run, device, labels=analysis.uses_labels))
    store.mark_done(unit.key)
    return {"key": unit.key, "cached": False, **out}


@task(name="analysis-finish", task_run_name="{name}-finish", **TASK_OPTIONS)
def finish_analysis(name: str, store_url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Summaries over every unit (small, JSON-able)."""
    analysis = get_analysis(name)
    return analysis.finish(AtlasStore.open(store_url, "r+"), analysis.options(options))
