"""One registry of analyses: a per-unit analysis is one module under `rfcore/analyses/` and its test.

An analysis declares its name (the `--analyses` value, the `rfatlas NAME` command and the marker
prefix), its arrays (`ArraySpec`s, collected by the schema doc and `verify`), a frozen `Options`
dataclass (CLI flags, flow parameters and the stored config all derive from its fields), whether it
runs the model or reads the dataset, and three steps:

* `plan(store, opts) -> [Unit]`: check the stored config, create every array, return the pending units
  (one writer: the flow calls it once, before any unit runs, so array creation never races);
* `run(store, unit, res) -> dict`: compute one unit, write its slice (idempotent); the caller writes the
  unit's completion marker afterwards;
* `finish(store, opts) -> dict`: summaries over all units (small, JSON-able).

plus what it shows in the HTML site (`report_*`). Registration is by decorator and refuses duplicate
names, as torchvision's `register_model` does. Pure library: no Prefect, no Dask.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import pkgutil
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from rfcore.errors import RfatlasError
from rfcore.schema import ArraySpec

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from rfcore.atlas import Atlas
    from rfcore.data import ImageDataset
    from rfcore.store import AtlasStore


class AnalysisError(RfatlasError):
    """An analysis is unknown, or one of its options is invalid."""


@dataclass(frozen=True)
class Unit:
    """One idempotent piece of an analysis: one task. `key` is its completion marker (and, after the
    analysis name, its task-run name)."""

    key: str
    layer: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)


class Resources(Protocol):
    """What a unit may use besides the store; loaded lazily and cached per worker by the caller."""

    @property
    def device(self) -> torch.device: ...
    def model(self) -> nn.Module: ...
    def dataset(self) -> ImageDataset: ...


@dataclass(frozen=True)
class Section:
    """A titled block of HTML that an analysis contributes to a page of the site."""

    title: str
    html: str


class Assets(Protocol):
    """Where report hooks put images: each call writes a file once and returns its relative URL."""

    def image(self, name: str, chw: np.ndarray, *, scale: str = "uint8") -> str: ...
    def figure(
        self,
        name: str,
        draw: Callable[[Any], None],
        *,
        size: tuple[float, float] = (3, 3),
        projection: str | None = None,  # e.g. "polar": the Axes handed to `draw`
    ) -> str: ...


@dataclass(frozen=True)
class NoOptions:
    """For analyses without options."""


class Analysis:
    """Base class of a registered analysis; subclasses set the class attributes and the steps."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line: what it measures and writes
    arrays: ClassVar[tuple[ArraySpec, ...]] = ()
    Options: ClassVar[type[Any]] = NoOptions
    uses_model: ClassVar[bool] = False  # runs the network: GPU tag, model cache
    uses_data: ClassVar[bool] = False  # reads the dataset
    uses_labels: ClassVar[bool] = False  # compares outputs with labels: checked before the sweep starts
    order: ClassVar[int] = 100  # run order in `--analyses all` (lower first)

    # --- the three steps -------------------------------------------------------------------------
    def plan(self, store: AtlasStore, opts: Any) -> list[Unit]:
        """Check the stored config, create the arrays, return the units without a marker."""
        raise NotImplementedError

    def run(self, store: AtlasStore, unit: Unit, res: Resources) -> dict[str, Any]:
        """Compute `unit` and write its slice (idempotent); a small dict for the logs."""
        raise NotImplementedError

    def finish(self, store: AtlasStore, opts: Any) -> dict[str, Any]:
        """Summaries once every unit is done; a small JSON-able dict."""
        return {}

    # --- inspection ------------------------------------------------------------------------------
    def verify(self, store: AtlasStore) -> list[str]:
        """Problems of this analysis's results in `store` (empty = fine, also when it never ran)."""
        return []

    def findings(self, atlas: Atlas) -> list[str]:
        """One-line findings with their numbers (e.g. "layer2.0: 12/64 orientation-selective"), for the
        demo's summary and the run's artifact; empty when the analysis did not run."""
        return []

    # --- the site ----------------------------------------------------------------------------------
    def report_index(self, atlas: Atlas, assets: Assets) -> Section | None:
        """A section of the atlas's index page."""
        return None

    def report_layer(self, atlas: Atlas, layer: str, assets: Assets) -> Section | None:
        """A section of a layer's page."""
        return None

    def channel_columns(self, atlas: Atlas, layer: str) -> dict[str, np.ndarray]:
        """Per-channel values of `layer` the layer grid can sort on or badge (name -> (channels,))."""
        return {}

    def report_channel(self, atlas: Atlas, layer: str, channel: int, assets: Assets) -> Section | None:
        """A section of one channel's page."""
        return None

    # --- options -----------------------------------------------------------------------------------
    def options(self, values: Mapping[str, Any] | None = None) -> Any:
        """`Options` from a mapping (flow parameters, stored config); AnalysisError for unknown keys
        or invalid values, before anything is written."""
        return make_options(self.Options, values or {}, where=self.name)


ANALYSES: dict[str, Analysis] = {}
_DISCOVERED = False


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator: add one instance of `cls` to the registry; a second `cls.name` is refused."""
    name = cls.name
    if not name or not all(ch.isalnum() or ch == "-" for ch in name):
        raise ValueError(f"analysis name {name!r}: use letters, digits and '-'")
    if name in ANALYSES or name == "sweep":
        raise ValueError(f"analysis {name!r} registered twice")
    for spec in cls.arrays:
        if spec.analysis != name:
            raise ValueError(f"array {spec.path!r} of analysis {name!r} says analysis={spec.analysis!r}")
    if not dataclasses.is_dataclass(cls.Options) or not cls.Options.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise ValueError(f"{cls.__name__}.Options must be a frozen dataclass")
    ANALYSES[name] = cls()
    return cls


def _discover() -> None:
    """Import every module of `rfcore.analyses` (each registers itself)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import rfcore.analyses as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def list_analyses() -> list[str]:
    """Registered analysis names in run order."""
    _discover()
    return [a.name for a in sorted(ANALYSES.values(), key=lambda a: (a.order, a.name))]


def get_analysis(name: str) -> Analysis:
    """The registered analysis `name`; AnalysisError with a close match otherwise."""
    _discover()
    if name not in ANALYSES:
        close = difflib.get_close_matches(name, list(ANALYSES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise AnalysisError(f"unknown analysis {name!r}{hint} (known: {', '.join(list_analyses())})")
    return ANALYSES[name]


def analysis_arrays() -> list[ArraySpec]:
    """Every array every registered analysis declares, in run order."""
    return [s for n in list_analyses() for s in ANALYSES[n].arrays]


# --- options: one frozen dataclass -> CLI flags, flow parameters, stored config ---------------------


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed) of an annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def option_fields(options_cls: type[Any]) -> list[tuple[dataclasses.Field[Any], Any, bool]]:
    """(field, base type, optional) of every option, in declaration order."""
    hints = typing.get_type_hints(options_cls)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(options_cls)]


def _convert(value: Any, tp: Any, optional: bool, what: str) -> Any:
    if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none")):
        if optional:
            return None
        raise AnalysisError(f"{what} needs a value")
    origin = typing.get_origin(tp)
    try:
        if origin is tuple:
            (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
            items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
            return tuple(_convert(v, item, False, what) for v in items)
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return tp(value)
    except (TypeError, ValueError):
        raise AnalysisError(f"{what}: bad value {value!r} (expected {getattr(tp, '__name__', tp)})") from None


def make_options(options_cls: type[Any], values: Mapping[str, Any], *, where: str) -> Any:
    """`options_cls(**values)` with values converted to the declared types (strings from the CLI,
    lists from JSON); AnalysisError names an unknown option or a bad value."""
    known = {f.name: (f, tp, opt) for f, tp, opt in option_fields(options_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise AnalysisError(
            f"{where} has no option {unknown[0]!r}{hint} (options: {', '.join(known) or 'none'})"
        )
    kwargs = {k: _convert(v, known[k][1], known[k][2], f"{where} option {k}") for k, v in values.items()}
    try:
        return options_cls(**kwargs)
    except RfatlasError as e:
        raise AnalysisError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise AnalysisError(f"{where}: {e}") from None


def options_config(opts: Any) -> dict[str, Any]:
    """The options as a JSON-normalized dict (tuples become lists): what the store records."""
    out: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(opts)))
    return out


def option_help(f: dataclasses.Field[Any]) -> str:
    """The help text of an option (`field(metadata={"help": ...})`)."""
    return str(f.metadata.get("help", ""))


def check(ok: bool, message: str) -> None:
    """For `Options.__post_init__`: AnalysisError(message) unless `ok`."""
    if not ok:
        raise AnalysisError(message)


def atlas_layers(store: AtlasStore, spec: str) -> list[str]:
    """The layers an analysis's `layers` option names: `all` (every swept layer, in the atlas's
    order), `default` (the model's first max-pool, the paper's layer) or a comma list; each must be a
    layer of the atlas (UnknownLayerError with a close match otherwise)."""
    from rfcore.atlas import Atlas

    if spec.strip() == "all":
        return store.layer_names
    if spec.strip() == "default":
        from rfcore.inactive import default_layer
        from rfcore.models import get_model

        names = [default_layer(get_model(store.run["model"]))]
    else:
        names = parse_list(spec)
    atlas = Atlas(store)
    for name in names:
        atlas.layer(name)
    return names


def parse_list(spec: str | Sequence[str] | None) -> list[str]:
    """`"a,b"` or a list -> names, blanks dropped."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    return [s.strip() for s in items if s.strip()]


class LocalResources:
    """`Resources` for one process: the atlas's model and dataset, each loaded on first use."""

    def __init__(self, run: Mapping[str, Any], device: str = "auto", *, labels: bool = False) -> None:
        from rfcore.models import select_device

        self._run = run
        self._labels = labels  # labels in the model's classes (rfcore.data.ImageDataset.for_model)
        self.device = select_device(device)
        self._model: nn.Module | None = None
        self._dataset: ImageDataset | None = None

    def model(self) -> nn.Module:
        if self._model is None:
            from rfcore.models import get_model

            run = self._run
            model = get_model(
                run["model"], weights=run.get("weights"), seed=int(run["config"].get("seed", 0))
            )
            from rfcore.models import check_model_matches

            check_model_matches(model, run)  # the weights the atlas was made with
            self._model = model.to(self.device).eval()
        return self._model

    def dataset(self) -> ImageDataset:
        if self._dataset is None:
            from rfcore.data import open_dataset

            run = self._run
            ds = open_dataset(
                run["dataset"], size=int(run["image_size"]), resize=run["preprocessing"].get("resize")
            )
            from rfcore.data import check_data_matches

            check_data_matches(ds, run)  # the data the atlas was made with
            if self._labels and run.get("num_classes"):
                ds = ds.for_model(int(run["num_classes"]))
            self._dataset = ds
        return self._dataset


def run_local(
    url: str, name: str, options: Mapping[str, Any] | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Run the analysis `name` on the atlas at `url` in this process, unit after unit, as the Prefect
    flow does on a cluster (plan, run, mark, finish): for notebooks, tests and debugging."""
    from rfcore.store import AtlasStore

    a = get_analysis(name)
    opts = a.options(options)
    store = AtlasStore.open(url, "r+")
    if a.uses_labels:  # labels the model cannot have: refused before anything is written
        from rfcore.data import check_run_labels

        check_run_labels(store.run)
    res = LocalResources(store.run, device, labels=a.uses_labels)
    units = a.plan(store, opts)
    for unit in units:
        a.run(store, unit, res)
        store.mark_done(unit.key)
    return {"units_run": len(units), **a.finish(store, opts)}
