"""Static checks as tests, so CI enforces them: ruff over the repo, strict mypy over rfcore,
and the layering rule that rfcore never imports prefect or dask."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_is_clean() -> None:
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_rfcore_is_strict_mypy_clean() -> None:
    result = _run("mypy", "rfcore")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rfcore_never_imports_orchestration() -> None:
    offenders = []
    for path in sorted((ROOT / "rfcore").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}" for n in names if n.split(".")[0] in {"prefect", "dask", "distributed"}
            ]
    assert offenders == []


def test_import_layers_contract() -> None:
    """import-linter (`[tool.importlinter]` in pyproject.toml): flows -> tasks -> rfcore, never upwards,
    and rfcore imports no orchestration library; bench sits on top (no package imports it)."""
    exe = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for package in ("rfcore", "tasks", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            assert "import bench" not in path.read_text() and "from bench" not in path.read_text(), path
