"""One subflow for every registered analysis (`rfcore.analysis`), and its `rfatlas NAME` command.

`analysis(name, store_url, options)` plans (one writer: checks the stored config, creates the arrays),
fans the pending units out as `analysis` tasks on the flow's task runner (GPU-tagged when the analysis
runs the model), gathers them under the one failure policy (`flows.failures`), and finishes."""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.failures import gather
from flows.lease import store_lease
from flows.runner import gpu_tasks
from rfcore.analysis import Analysis, get_analysis, list_analyses, option_fields, option_help, options_config
from rfcore.store import AtlasStore, redact
from tasks.analysis import finish_analysis, plan_units, run_unit, unit_label
from tasks.policy import GPU_TAG

#: An analysis that needs no data can make its own sweep-less atlas over this one-image data set.
QUICK_LOOK_DATA = "synthetic:1"


def _flow_run_name() -> str:
    """`noise[maxpool]`, `actmax[layer3.0.conv2]`: the analysis and the layers its options name."""
    p = flow_run.parameters
    options = p.get("options") or {}
    target = options.get("layers") or options.get("layer") or ""
    return f"{p['name']}[{target}]" if target else str(p["name"])


@flow(name="analysis", flow_run_name=_flow_run_name, validate_parameters=False)
def analysis(
    name: str, store_url: str, options: dict[str, Any] | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Run the registered analysis `name` on the atlas at `store_url`; finished units are skipped."""
    a = get_analysis(name)
    config = options_config(a.options(options))  # bad options: refused before anything is written
    if a.uses_labels:  # labels the model cannot have: refused before any unit runs
        from rfcore.data import check_run_labels

        check_run_labels(AtlasStore.open(store_url).run)
    units = plan_units(name, store_url, config)
    task = run_unit.with_options(tags=[GPU_TAG]) if a.uses_model else run_unit
    if a.uses_model:
        with gpu_tasks(device):
            futures = [task.submit(name, store_url, u, device) for u in units]
    else:
        futures = [task.submit(name, store_url, u, device) for u in units]
    results = gather(futures, [f"{name}[{unit_label(name, u.key)}]" for u in units], what=name)
    summary = finish_analysis(name, store_url, config)
    return {"units_run": sum(not r.get("cached") for r in results), **summary}


# --- rfatlas NAME URL [options]: flags derived from the analysis's Options ----------------------------


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_option_flags(parser: argparse.ArgumentParser, a: Analysis) -> None:
    """One flag per option (strings: parsed and validated by `Analysis.options`)."""
    for f, _, _ in option_fields(a.Options):
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(
            _flag(f.name),
            dest=f"opt_{f.name}",
            default=None,
            metavar=f.name.upper(),
            help=f"{option_help(f)} (default: {shown})",
        )


def options_from_args(args: argparse.Namespace, a: Analysis) -> dict[str, Any]:
    """The options given on the command line (the rest keep their defaults)."""
    given = {f.name: getattr(args, f"opt_{f.name}") for f, _, _ in option_fields(a.Options)}
    return {k: v for k, v in given.items() if v is not None}


def quick_look_store(url: str, model: str, weights: str | None, options: dict[str, Any]) -> None:
    """A sweep-less atlas at `url` for `model` (analyses without data, e.g. act-max), unless one is there."""
    from rfcore.errors import StoreError
    from rfcore.pipeline import prepare_store

    try:
        AtlasStore.open(url, "r")
        return
    except StoreError:
        pass
    layers = options.get("layers") or options.get("layer") or "default"
    prepare_store(url, model_name=model, weights=weights, data_spec=QUICK_LOOK_DATA, layers=layers,
                  k=1, shard_size=1, batch_size=1)  # fmt: skip


def command(args: argparse.Namespace) -> int:
    """`rfatlas NAME URL ...`: run one analysis on an atlas (holding its lease) and print its findings."""
    from flows.cli import _run_with_bar, _start_prefect
    from flows.runner import make_task_runner
    from rfcore.atlas import Atlas
    from rfcore.errors import ConfigMismatchError

    a = get_analysis(args.command)
    options = options_from_args(args, a)
    config = options_config(a.options(options))
    if getattr(args, "model", None):
        if a.uses_data:
            from rfcore.errors import RfatlasError

            raise RfatlasError(
                f"{a.name} reads the swept images: run `rfatlas run --analyses {a.name}` instead of --model"
            )
        quick_look_store(args.url, args.model, args.weights, config)
        store = AtlasStore.open(args.url, "r")
        if (store.run["model"], store.run.get("weights")) != (args.model, args.weights):
            raise ConfigMismatchError(
                f"{redact(args.url)} holds {store.run['model']} (weights {store.run.get('weights')}), "
                f"not {args.model} (weights {args.weights}); use another URL"
            )
    runner = make_task_runner(args.workers, device=args.device)
    with store_lease(args.url, f"rfatlas {a.name}"), _start_prefect(args):
        result = _run_with_bar(
            analysis.with_options(task_runner=runner), a.name, args.url, config, args.device
        )
    lines = a.findings(Atlas(AtlasStore.open(args.url, "r"))) or [
        f"{a.name}: {result.get('units_run', 0)} unit(s) run"
    ]
    print("\n".join(lines))
    print(f"{redact(args.url)}: {a.name} done ({result.get('units_run', 0)} unit(s) run now)")
    return 0


def register_cli(subparsers: Any) -> None:
    """`rfatlas NAME URL [--option VALUE ...]` for every registered analysis."""
    for name in list_analyses():
        a = get_analysis(name)
        p = subparsers.add_parser(name, help=a.description, description=a.description)
        p.add_argument("url", help="atlas URL (local path, s3://..., memory://...)")
        add_option_flags(p, a)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        p.add_argument("--workers", type=int, default=None, help="local Dask worker processes")
        if not a.uses_data:
            p.add_argument(
                "--model", default=None, help="make a sweep-less atlas of this model at URL if none"
            )
            p.add_argument("--weights", default=None, help="with --model: torchvision weights or checkpoint")
        p.set_defaults(func=command)
