"""`rfatlas` CLI: every bad input is one line on stderr and exit code 2, before Prefect or Dask start;
`ls`, `verify`, `rf` and `run` on tiny inputs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import build_parser, main
from rfcore.pipeline import run_sweep


@pytest.fixture(scope="module")
def small_atlas(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("cli") / "a.zarr")
    run_sweep(url, model_name="resnet10t", data_spec="synthetic:32", layers="conv1", k=2, shard_size=16,
              batch_size=16, device="cpu", progress=False)  # fmt: skip
    return url


BAD = [
    (
        ["run", "--model", "resnet10x", "--data", "synthetic:32", "--out", "{tmp}/a.zarr"],
        "did you mean 'resnet10t'",
    ),
    (
        ["run", "--model", "resnet10t", "--data", "synthetc:32", "--out", "{tmp}/a.zarr"],
        "did you mean 'synthetic:32'",
    ),
    (
        [
            "run",
            "--model",
            "resnet10t",
            "--data",
            "synthetic:32",
            "--layers",
            "layr1.0",
            "--out",
            "{tmp}/a.zarr",
        ],
        "did you mean 'layer1.0'",
    ),
    (
        [
            "run",
            "--model",
            "resnet10t",
            "--data",
            "synthetic:32",
            "--analyses",
            "sweep,actmx",
            "--out",
            "{tmp}/a.zarr",
        ],
        "unknown analysis",
    ),
    (
        ["run", "--model", "resnet10t", "--data", "synthetic:32", "--device", "tpu", "--out", "{tmp}/a.zarr"],
        "bad --device",
    ),
    (
        ["run", "--model", "resnet10t", "--data", "synthetic:32", "--k", "0", "--out", "{tmp}/a.zarr"],
        "positive integer",
    ),
    (
        [
            "run",
            "--model",
            "resnet10t",
            "--data",
            "synthetic:32",
            "--weights",
            "{tmp}/missing.pt",
            "--out",
            "{tmp}/a.zarr",
        ],
        "",
    ),
    (
        [
            "run",
            "--model",
            "resnet10t",
            "--data",
            "synthetic:32",
            "--dask-address",
            "tcp://127.0.0.1:1",
            "--out",
            "{tmp}/a.zarr",
        ],
        "no Dask scheduler",
    ),
    (["run", "--model", "resnet10t", "--data", "synthetic:32", "--out", "{tmp}/file.txt"], "not an atlas"),
    (["run", "--model", "resnet10t", "--data", "imagefolder:{tmp}/nothing", "--out", "{tmp}/a.zarr"], ""),
    (["ls", "{tmp}/nothing.zarr"], "no atlas"),
    (["verify", "{tmp}/file.txt"], ""),
    (["rf", "alexnett"], "did you mean 'alexnet'"),
    (["rf"], "needs a model"),
    (["rf", "resnet18", "--model", "resnet34"], "given twice"),
    (["ingest", "synthetic:4", "--size", "16"], "needs an output"),
    (
        ["train", "--model", "resnet10t", "--data", "synthetic-train:8", "--out", "{tmp}/m.pt"],
        "fewer than one batch",
    ),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize(
    ("argv", "needle"), BAD, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(BAD)]
)
def test_bad_input_is_one_line_exit_2(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file.txt").write_text("not a store")
    t0 = time.perf_counter()
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rfatlas"), err
    assert "Traceback" not in err and needle in lines[0]
    assert time.perf_counter() - t0 < 30  # validated before any Prefect server or Dask cluster


def test_store_of_another_run_is_refused(small_atlas: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--model", "resnet10t", "--data", "synthetic:32", "--layers", "conv1", "--k", "3",
                 "--shard-size", "16", "--batch-size", "16", "--out", small_atlas])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("rfatlas: error:")


def test_ls_verify_rf(small_atlas: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", small_atlas]) == 0
    out = capsys.readouterr().out
    assert "resnet10t" in out and "conv1" in out
    assert main(["verify", small_atlas]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["rf", "resnet10t"]) == 0
    table = capsys.readouterr().out
    assert "layer4.0" in table
    assert main(["rf", "--model", "resnet10t"]) == 0
    assert capsys.readouterr().out == table
    assert main(["models"]) == 0
    assert "resnet34" in capsys.readouterr().out


@pytest.mark.parametrize("form", ["positional", "option"])
def test_ingest_then_read_back(form: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = str(tmp_path / "images.zarr")
    out = [url] if form == "positional" else ["--out", url]
    assert main(["ingest", "synthetic:6", *out, "--model", "resnet10t", "--quiet"]) == 0
    assert f"ingested 6 images into {url}; 0 skipped" in capsys.readouterr().out
    from rfcore.data import open_dataset

    stored, original = open_dataset(f"zarr:{url}", size=64), open_dataset("synthetic:6", size=64)
    assert len(stored) == 6 and (stored.get(5)[0] == original.get(5)[0]).all()


def test_parser_surface() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"demo", "run", "train", "ingest", "rf", "models", "ls", "verify"} <= set(sub.choices)
    args = parser.parse_args(["run", "--model", "m", "--data", "d", "--out", "o"])
    assert args.k == 16 and args.layers == "default" and args.device == "auto" and args.analyses == "sweep"
    with pytest.raises(SystemExit):
        parser.parse_args(
            [
                "run",
                "--model",
                "m",
                "--data",
                "d",
                "--out",
                "o",
                "--workers",
                "2",
                "--dask-address",
                "tcp://x:1",
            ]
        )


def test_entry_point_runs_as_a_process(tmp_path: Path) -> None:
    """The installed console script: bad input → one line, exit 2 (no traceback)."""
    exe = Path(sys.executable).with_name("rfatlas")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    res = subprocess.run(
        [*cmd, "ls", str(tmp_path / "none.zarr")], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_analyses_command_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    from rfcore.analysis import get_analysis, list_analyses

    assert main(["analyses"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_analyses()
    for line, name in zip(lines, list_analyses(), strict=True):
        assert all(s.path in line for s in get_analysis(name).arrays)


@pytest.mark.parametrize(
    ("items", "message"),
    [(["noise.sigma"], "expected NAME.KEY=VALUE"), (["sigma=2"], "expected NAME.KEY=VALUE")],
)
def test_bad_option_flags_are_one_line_errors(
    items: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--model", "resnet10t", "--data", "synthetic:8", "--out", str(tmp_path / "a.zarr")]
    for item in items:
        argv += ["--option", item]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_options_for_analyses_not_run_or_unknown_are_refused_before_any_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["run", "--model", "resnet10t", "--data", "synthetic:8", "--out", str(tmp_path / "a.zarr")]
    assert main([*base, "--option", "noise.sigma=2"]) == 2
    assert "does not include" in capsys.readouterr().err
    assert main([*base, "--analyses", "noise", "--option", "noise.sigmaa=2"]) == 2
    assert "did you mean 'sigma'" in capsys.readouterr().err
    assert not (tmp_path / "a.zarr").exists()
