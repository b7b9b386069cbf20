"""`rfatlas` command line: demo, run, train, ingest, rf, ls, verify, report, serve (+ analysis commands of their modules).

Every bad input is one line on stderr (`rfatlas: error: ...`) and exit code 2, checked before Prefect or
Dask start. Runs use the Prefect API in `PREFECT_API_URL`, or a temporary local one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _err(message: str, code: int = EXIT_BAD_INPUT) -> int:
    first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    print(f"rfatlas: error: {first}", file=sys.stderr)
    return code


def _one_of(positional: str | None, option: str | None, what: str, flag: str) -> str | None:
    """The value given positionally or by option; both at once must agree."""
    if positional and option and positional != option:
        from rfcore.errors import RfatlasError

        raise RfatlasError(f"{what} is given twice ({positional!r} and {flag} {option!r})")
    return positional or option


def _out_url(url: str) -> str:
    """Local paths become absolute (Dask workers may run elsewhere in the file system view)."""
    if "://" in url:
        return url
    from pathlib import Path

    return str(Path(url).expanduser().resolve())


def _start_prefect(args: argparse.Namespace, server: Any = None, url: str | None = None) -> Any:
    """The Prefect API for a run (see `flows.runner.prefect_api`); `server`, `url`: from `_early_api`."""
    from flows.api import prefect_api, quiet_logs

    quiet_logs(getattr(args, "verbose", False))
    return prefect_api(server, url)


#: (API URL, server) started by `main` before its imports, for the command that needs it.
_EARLY: tuple[str, Any] | None = None
_API_COMMANDS = ("run",)


def _early_api(args: argparse.Namespace) -> tuple[str, Any]:
    """(API URL, server): the temporary Prefect API `main` started before importing anything heavy
    (or one started now), coming up in the background while the inputs are validated (server None
    when `PREFECT_API_URL` is set or a server already runs on this machine)."""
    global _EARLY
    from flows.api import quiet_logs, start_api

    quiet_logs(getattr(args, "verbose", False))
    early, _EARLY = _EARLY, None
    return early if early is not None else start_api()


def _start_api_first(argv: Sequence[str]) -> None:
    """For `run`: start the temporary API server first thing (its imports then overlap ours)."""
    global _EARLY
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in _API_COMMANDS or "-h" in argv or "--help" in argv or os.environ.get("PREFECT_API_URL"):
        return
    from flows.api import start_api

    _EARLY = start_api()


def _stop_early_api() -> None:
    global _EARLY
    early, _EARLY = _EARLY, None
    if early is not None and early[1] is not None:
        early[1].stop()


def _run_with_bar(fn: Any, *fargs: Any, **fkwargs: Any) -> Any:
    from flows.progress import listening, terminal_bar

    listener, close = terminal_bar()
    try:
        with listening(listener):
            return fn(*fargs, **fkwargs)
    finally:
        close()


# --- commands ---------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from flows.atlas import check_inputs
    from flows.progress import mark
    from flows.runner import ADDRESS_ENV, check_dask_address, cluster_kwargs, make_task_runner, start_cluster
    from rfcore.urls import redact

    out = _out_url(args.out)
    layers = args.layers
    params = dict(
        model=args.model, data=args.data, store_url=out, weights=args.weights, layers=layers, k=args.k,
        shard_size=args.shard_size, analyses=args.analyses, device=args.device, seed=args.seed,
        batch_size=args.batch_size, patch_max=args.patch_max,
    )  # fmt: skip
    mark("cli_start")
    options = parse_option_args(args.option)
    if args.dask_address:
        check_dask_address(args.dask_address)
    remote = bool(args.dask_address or os.environ.get(ADDRESS_ENV))
    if args.dask_address or (args.workers is None and os.environ.get(ADDRESS_ENV)):
        runner = make_task_runner(args.workers, args.dask_address, device=args.device)
        remote_runner = True
    else:
        remote_runner = False
        cluster_kwargs(
            args.workers, device=args.device
        )  # bad --workers/--device: fail before starting anything
    # Start-up work in parallel: the temporary API server imports and starts in its own process
    # while this one validates the inputs (loads the model, opens the store); then the Dask workers
    # start (and import the tasks) while the server finishes coming up.
    url, server = _early_api(args)
    cluster = None
    try:
        plan = check_inputs(**params, options=options, remote=remote)
        mark("inputs_checked")
        if not remote_runner:
            from tasks.atlas import warm_worker

            cluster = start_cluster(args.workers, device=args.device, api_url=url)
            cluster.warm(
                warm_worker, args.model, args.weights, args.device, args.seed, args.data,
                plan["image_size"], plan["resize"],
            )  # fmt: skip
        params["analyses"] = plan["analyses"]
        params["analysis_options"] = options
        print(
            f"rfatlas: {args.model} on {args.data}: {plan['num_images']} images, {plan['num_shards']} shard(s), "
            f"{len(plan['layers'])} layer(s) -> {redact(plan['store_url'])}",
            file=sys.stderr,
        )
        from flows.atlas import atlas

        if cluster is not None:
            from prefect_dask import DaskTaskRunner

            runner = DaskTaskRunner(address=cluster.wait())
        with _start_prefect(args, server, url):
            mark("api_ready")
            try:
                summary = _run_with_bar(atlas.with_options(task_runner=runner), **params)
                mark("flow_returned")
            finally:
                if cluster is not None:
                    cluster.close()  # workers deliver their logs while the API still runs
                    cluster = None
                mark("cluster_closed")
        server = None  # stopped by _start_prefect
        mark("api_stopped")
        global _CLEAN_EXIT
        _CLEAN_EXIT = True
    finally:  # an error: stop what was started, without waiting for a cluster still starting
        if cluster is not None:
            cluster.close(wait=False)
        if server is not None:
            server.stop()
    print(
        f"swept {summary['images_swept']} images ({summary['images_resumed']} resumed) into {summary['store_url']} "
        f"in {summary['wall_s']:.1f} s ({summary['images_per_s']:.1f} images/s); "
        f"{len(summary['layers'])} layers, {summary['channels']} channels, {summary['skipped']} skipped"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from flows.runner import check_dask_address, make_task_runner
    from flows.train import check_train_inputs

    out = _out_url(args.out)
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "num_workers": args.loader_workers,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    check_train_inputs(
        model=args.model,
        data=args.data,
        out=out,
        val_data=args.val_data,
        recipe=args.recipe,
        overrides=overrides,
    )
    from flows.atlas import check_device

    check_device(args.device, here=not args.dask_address)
    if args.dask_address:
        check_dask_address(args.dask_address)
    from flows.train import train

    flow_fn = train
    if args.dask_address:
        flow_fn = train.with_options(
            task_runner=make_task_runner(None, args.dask_address, device=args.device)
        )
    with _start_prefect(args):
        url = flow_fn(
            model=args.model, data=args.data, out=out, val_data=args.val_data, recipe=args.recipe,
            overrides=overrides, device=args.device, seed=args.seed,
        )  # fmt: skip
    print(url)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.atlas import check_device, parse_analyses
    from flows.demo import DEMO, format_findings
    from flows.runner import make_task_runner

    check_device(args.device)
    analyses = parse_analyses(args.analyses or DEMO["analyses"])
    from flows.demo import check_demo_out

    out = _out_url(args.out)
    check_demo_out(out)
    if os.path.exists(out) and not os.path.isdir(out):
        return _err(f"--out {out} is a file; give a directory")
    runner = make_task_runner(args.workers or DEMO["workers"], device=args.device)
    from flows.demo import demo

    t0 = time.perf_counter()
    print(
        f"rfatlas demo: training {', '.join(DEMO['models'])} and sweeping their atlases into {out}",
        file=sys.stderr,
    )
    with _start_prefect(args):
        results = _run_with_bar(
            demo.with_options(task_runner=runner), out=out, analyses=analyses, device=args.device
        )
    print(format_findings(results))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from rfcore.data import ingest

    size, resize = args.size, args.resize
    if args.model:
        from rfcore.models import default_preprocessing

        pre = default_preprocessing(args.model)
        size, resize = size or pre.size, resize or pre.resize
    if not size:
        return _err("ingest needs --size N or --model M (to take the model's input size)")
    url = _one_of(args.url, args.out, "the output URL", "--out")
    if url is None:
        return _err("ingest needs an output Zarr URL: rfatlas ingest SPEC --out URL")
    res = ingest(args.spec, _out_url(url), size=size, resize=resize, progress=not args.quiet)
    print(f"ingested {res.num_images} images into {res.url}; {len(res.skipped)} skipped; "
          f"read it with --data zarr:{res.url}")  # fmt: skip
    return 0


def cmd_rf(args: argparse.Namespace) -> int:
    from rfcore.models import get_model
    from rfcore.receptive import format_rf_table

    name = _one_of(args.model, args.model_opt, "the model", "--model")
    if name is None:
        return _err("rf needs a model: rfatlas rf --model NAME (see rfatlas models)")
    model = get_model(name, weights=args.weights)
    print(format_rf_table(model, args.input_size))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rfcore.models import default_preprocessing, list_models

    for name in list_models():
        pre = default_preprocessing(name)
        print(f"{name:<12} input {pre.size}x{pre.size} (resize {pre.resize})")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from rfcore.atlas import describe_store

    print(describe_store(args.url))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from rfcore.atlas import open_atlas, verify_store
    from rfcore.urls import redact

    open_atlas(args.url)  # unreadable / not an atlas: one-line error, exit 2
    problems = verify_store(args.url)
    for p in problems:
        print(f"problem: {p}")
    if problems:
        print(f"{redact(args.url)}: {len(problems)} problem(s)")
        return EXIT_FAILED
    print(f"{redact(args.url)}: ok (schema and completeness)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rfcore.site import write_site

    layers = [s.strip() for s in args.layers.split(",") if s.strip()] if args.layers else None
    res = write_site(
        [_out_url(u) for u in args.urls],
        _out_url(args.out),
        layers=layers,
        workers=args.workers or os.cpu_count() or 1,
    )
    n = sum(len(v) for v in res["layers"].values())
    print(
        f"wrote the site of {len(args.urls)} atlas(es), {n} layer pages, in {res['seconds']:.1f} s: {res['index']}"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve

    return serve(args.site, port=args.port)


def cmd_analyses(args: argparse.Namespace) -> int:
    from rfcore.analysis import get_analysis, list_analyses

    for name in list_analyses():
        a = get_analysis(name)
        arrays = ", ".join(s.path for s in a.arrays) or "no arrays"
        print(f"{name:<12} {a.description}; writes {arrays}")
    return 0


def parse_option_args(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """`["noise.sigma=2", ...]` -> {"noise": {"sigma": "2"}}; RfatlasError for a malformed item."""
    from rfcore.errors import RfatlasError

    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not (sep and dot and name and option):
            raise RfatlasError(f"bad --option {item!r}; expected NAME.KEY=VALUE, e.g. noise.sigma=2")
        out.setdefault(name, {})[option.replace("-", "_")] = value
    return out


# --- parser ---------------------------------------------------------------------------------------------
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2 (as argparse, minus the usage dump)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from rfcore.pipeline import DEFAULT_SHARD_SIZE

    parser = _Parser(
        prog="rfatlas", description="Receptive fields and preferred stimuli of every unit of a CNN."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Prefect and Dask logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("demo", help="train two tiny models and map their units, offline (< 5 min)")
    p.add_argument("--out", default="rfatlas-demo", help="output directory (default: ./rfatlas-demo)")
    p.add_argument("--workers", type=_positive, default=None, help="Dask worker processes (default 2)")
    p.add_argument(
        "--analyses", default=None, help="comma list, or 'all' (default: every analysis that exists)"
    )
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="sweep a model over a dataset into an atlas (the `atlas` flow)")
    p.add_argument("--model", required=True, help="registry name (see `rfatlas rf --help`)")
    p.add_argument("--weights", default=None, help="torchvision weights name or checkpoint path/URL")
    p.add_argument(
        "--data",
        required=True,
        help="synthetic[:N] | synthetic-train[:N] | imagefolder:PATH | imagenette[:val] | zarr:URL",
    )
    p.add_argument("--out", required=True, help="atlas URL (local path, s3://..., memory://...)")
    p.add_argument("--layers", default="default", help="default | all-conv | L1,L2,...")
    p.add_argument("--k", type=_positive, default=16, help="top-k images per channel")
    p.add_argument("--shard-size", type=_positive, default=DEFAULT_SHARD_SIZE, help="images per shard task")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--patch-max", type=_positive, default=64, help="largest stored patch side (px)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=_positive, default=None, help="local Dask worker processes")
    g.add_argument("--dask-address", default=None, help="existing Dask scheduler, tcp://HOST:8786")
    p.add_argument(
        "--analyses", default="sweep", help="comma list of sweep and analyses (see `rfatlas analyses`) | all"
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="an analysis option, e.g. noise.sigma=2 (repeatable; see `rfatlas NAME --help`)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train a model; prints the checkpoint URL (the `train` flow)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="training data spec, e.g. synthetic-train:3000")
    p.add_argument("--out", required=True, help="checkpoint path/URL (.pt)")
    p.add_argument(
        "--val-data", default=None, help="validation data spec (accuracy goes into the checkpoint)"
    )
    p.add_argument("--recipe", default="quick", choices=["quick", "paper"])
    p.add_argument("--epochs", type=_positive, default=None)
    p.add_argument("--batch-size", type=_positive, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--loader-workers", type=int, default=None, help="DataLoader worker processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dask-address", default=None, help="run the training task on this Dask cluster")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ingest", help="decode and preprocess a dataset once into a Zarr image store")
    p.add_argument("spec", help="data spec, e.g. imagefolder:/data/val")
    p.add_argument("url", nargs="?", help="output Zarr URL (or --out); read it back with --data zarr:URL")
    p.add_argument("--out", default=None, help="output Zarr URL (local path or s3://...)")
    p.add_argument("--model", default=None, help="take --size/--resize from this model's preprocessing")
    p.add_argument("--size", type=_positive, default=None)
    p.add_argument("--resize", type=_positive, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("rf", help="receptive-field table of a model's layers")
    p.add_argument("model", nargs="?", help="model name (or --model)")
    p.add_argument("--model", dest="model_opt", default=None, help="model name")
    p.add_argument("--weights", default=None)
    p.add_argument("--input-size", type=_positive, default=None)
    p.set_defaults(func=cmd_rf)

    p = sub.add_parser("models", help="model names the other commands accept")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("ls", help="what is in an atlas store")
    p.add_argument("url")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("verify", help="schema and completeness check of an atlas (exit 1 on problems)")
    p.add_argument("url")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("report", help="write the browsable site of atlases (several: with a comparison page)")
    p.add_argument("urls", nargs="+", metavar="URL", help="atlas URL(s)")
    p.add_argument("--out", required=True, help="site directory or URL (s3://bucket/prefix works)")
    p.add_argument("--layers", default=None, help="only these layers: L1,L2,... (default: all)")
    p.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="processes writing layers in parallel (default: one per core)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="serve a site on 127.0.0.1 for a quick look")
    p.add_argument("site", help="site directory (or fsspec URL) written by `rfatlas report`")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("analyses", help="the registered analyses, one a line: name, then what it writes")
    p.set_defaults(func=cmd_analyses)

    from flows import analysis, compare  # every registered analysis brings its command

    analysis.register_cli(sub)
    compare.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. As the process's entry point (`argv` None), a `run` that has cleaned up
    after itself (store written, cluster closed, logs delivered, API stopped) exits at once instead
    of waiting seconds for the interpreter's teardown (torch and thread pools)."""
    code = _main(argv)
    if argv is None and _CLEAN_EXIT:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return code


#: Set by a command once everything it started is stopped and delivered (see `main`).
_CLEAN_EXIT = False


def _main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if argv is None:  # the process is ours: keep freed buffers for reuse (rfcore.memory)
        from rfcore.memory import retain_freed_memory

        retain_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-v" not in argv and "--verbose" not in argv:
        from flows.api import quiet_logs

        quiet_logs()
    _start_api_first(argv)
    from rfcore.errors import RfatlasError

    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help (0) or a usage error (2, one line already printed)
            return int(e.code) if isinstance(e.code, int) else EXIT_BAD_INPUT
        code = args.func(args)
        return int(code or 0)
    except RfatlasError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        return _err("interrupted", 130)
    except BrokenPipeError:  # output piped into e.g. `head`, which has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        return _err(f"{e.strerror or type(e).__name__}: {e.filename or e}")
    except Exception as e:  # a failed run: still one line; details are in the Prefect UI / -v logs
        cause = _rfatlas_cause(e)
        if cause is not None:
            return _err(str(cause))
        if "-v" in argv or "--verbose" in argv:
            raise
        return _err(f"run failed: {type(e).__name__}: {e}", EXIT_FAILED)
    finally:
        _stop_early_api()  # not taken (bad arguments, another command): stop it


def _rfatlas_cause(e: BaseException) -> BaseException | None:
    from rfcore.errors import RfatlasError

    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, RfatlasError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
