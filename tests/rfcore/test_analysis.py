"""The analysis registry: registration rules, options parsing and validation (no Prefect)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from rfcore.analysis import (
    ANALYSES,
    Analysis,
    AnalysisError,
    check,
    get_analysis,
    list_analyses,
    make_options,
    options_config,
    register,
)
from rfcore.schema import ArraySpec, all_arrays, schema_markdown


@dataclass(frozen=True)
class _Opts:
    steps: int = field(default=3, metadata={"help": "steps"})
    names: tuple[str, ...] = ("a", "b")
    scale: float | None = None
    flag: bool = False

    def __post_init__(self) -> None:
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")


def test_registry_lists_the_ported_analyses_in_run_order() -> None:
    names = list_analyses()
    assert names[:4] == ["inactive", "noise", "actmax", "virtual"]
    for name in names:
        a = get_analysis(name)
        assert a.name == name and a.description and all(s.analysis == name for s in a.arrays)


def test_duplicate_and_malformed_registrations_are_refused() -> None:
    list_analyses()

    class Dup(Analysis):
        name = "noise"
        description = "x"

    with pytest.raises(ValueError, match="registered twice"):
        register(Dup)

    class Sweep(Analysis):
        name = "sweep"
        description = "x"

    with pytest.raises(ValueError, match="registered twice"):
        register(Sweep)

    class WrongArray(Analysis):
        name = "wrong-array"
        description = "x"
        arrays = (ArraySpec("x", ("channel",), "float32", 0.0, "x", analysis="other"),)

    with pytest.raises(ValueError, match="says analysis='other'"):
        register(WrongArray)

    @dataclass
    class Mutable:
        x: int = 1

    class NotFrozen(Analysis):
        name = "not-frozen"
        description = "x"
        Options: ClassVar[type[Any]] = Mutable

    with pytest.raises(ValueError, match="frozen dataclass"):
        register(NotFrozen)
    assert "wrong-array" not in ANALYSES and "not-frozen" not in ANALYSES


def test_unknown_analysis_suggests_a_close_name() -> None:
    with pytest.raises(AnalysisError, match="did you mean 'noise'"):
        get_analysis("nosie")


def test_options_convert_cli_strings_and_json_lists() -> None:
    o = make_options(_Opts, {"steps": "5", "names": "x, y", "scale": "none", "flag": "yes"}, where="t")
    assert o == _Opts(steps=5, names=("x", "y"), scale=None, flag=True)
    assert make_options(_Opts, {"names": ["z"], "scale": 2}, where="t") == _Opts(names=("z",), scale=2.0)
    assert options_config(o) == {"steps": 5, "names": ["x", "y"], "scale": None, "flag": True}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"stepz": 1}, "has no option 'stepz'; did you mean 'steps'"),
        ({"steps": "many"}, "bad value 'many'"),
        ({"steps": 2.5}, "bad value 2.5"),
        ({"flag": "maybe"}, "bad value 'maybe'"),
        ({"steps": 0}, "steps must be >= 1"),
    ],
)
def test_bad_options_are_one_line_errors(values: dict[str, Any], message: str) -> None:
    with pytest.raises(AnalysisError, match=message):
        make_options(_Opts, values, where="t")


@pytest.mark.parametrize("name", list_analyses())
def test_every_analysis_validates_its_options_before_writing(name: str) -> None:
    """Defaults are valid; an unknown option is refused (Options are checked before any store write)."""
    a = get_analysis(name)
    options_config(a.options({}))
    with pytest.raises(AnalysisError, match="has no option"):
        a.options({"no_such_option": 1})


def test_schema_collects_every_registered_array_once() -> None:
    specs = all_arrays()
    for name in list_analyses():
        for s in get_analysis(name).arrays:
            assert s in specs
            assert f"`{s.path}`" in schema_markdown()
    assert len({(s.scope, s.path) for s in specs}) == len(specs)
