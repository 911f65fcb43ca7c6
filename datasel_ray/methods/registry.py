"""The method contract (:class:`SelectionMethod`) and the one list of selection methods (:data:`METHOD_REGISTRY`).

A selection method is one class. It declares its name, description and the feature columns it reads, and holds:

* ``fit(ctx)``: budget-independent statistics from every partition of the feature store (through
  ``ctx.executor``), written to ``stats/<name>/``; returns a JSON-ready summary (only for ``fits = True``);
* ``select(ctx, budget)``: a :class:`~datasel_ray.pipeline.fit.context.MethodSelection` of ``budget`` rows;
* ``load(run_dir, cfg, summary, cache)``: the frozen state the online scorer answers from (only for
  ``scored = True``), read from the files its ``fit``/``select`` wrote; the names of those files, their columns
  and the ``summary.json`` keys the state reads are class constants of the method, so writer and reader name
  them once;
* ``score_new(features, sample)`` on that state: one sample's answer from its feature row (the ``features/``
  columns, as the extract phase computes them) and its validated request sample (``task``, ``n_turns``, ...).

Everything that names methods iterates over :data:`METHOD_REGISTRY`: the config's choices
(``select.methods``), the aggregate phase (:func:`fitted_methods`), the select phase, the online scorer
(:func:`scored_methods`), the report and the CLI. A method defined outside the package joins them all with
:func:`register_method`; the built-in methods (:mod:`datasel_ray.pipeline.fit`) are registered on first use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:  # the method classes run on the pipeline; the registry itself imports none of it
    from datasel_ray.config import RunConfig
    from datasel_ray.io.rundir import RunDir
    from datasel_ray.pipeline.fit.context import FitContext, MethodSelection

__all__ = ["METHOD_REGISTRY", "MethodState", "SelectionMethod", "fitted_methods", "get_method", "method_names",
           "register_method", "scored_methods", "unregister_method"]


class MethodState(Protocol):
    """A method's frozen run state, as :meth:`SelectionMethod.load` returns it."""

    def score_new(self, features: Mapping[str, Any], sample: Any) -> dict:
        """JSON-ready answer for one sample: ``features`` maps each ``features/`` column to the sample's value
        (a vector column: float[d] as extracted; a scalar column: a numpy scalar); ``sample``: the
        :class:`~datasel_ray.scoring.request.ValidatedSample` (``task``, ``n_turns``, ...)."""
        ...


class SelectionMethod:
    """Base class of a selection method (see the module docstring for the contract).

    Class attributes: ``name`` (unique, used in ``select.methods``, ``stats/<name>/`` and
    ``selections/<name>/``); ``description`` (one line for the CLI and the docs); ``columns`` (the ``features/``
    columns ``fit``/``select`` read); ``needs_tive`` (reads the TIVE gradients: fitted only when
    ``tive.enabled``); ``fits`` (``fit`` writes ``stats/<name>/`` in the aggregate phase); ``scored`` (``load``
    returns a state whose ``score_new`` answers ``POST /score``); ``report_clusters`` (the title of the report's
    plot of ``stats/<name>/clusters.parquet``, with ``size`` and optionally ``density`` columns; None: no plot);
    ``config_section`` (the :class:`~datasel_ray.config.RunConfig` section holding its switches, recorded in
    ``stats/meta.json``; None: none); ``fit_fields`` (the fields of that section that decide what ``fit`` and
    ``select`` write, in the aggregate phase's fingerprint: a change re-runs aggregate; None: every field).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    columns: ClassVar[tuple[str, ...]] = ()
    needs_tive: ClassVar[bool] = False
    fits: ClassVar[bool] = False
    scored: ClassVar[bool] = False
    report_clusters: ClassVar[str | None] = None
    config_section: ClassVar[str | None] = None
    fit_fields: ClassVar[tuple[str, ...] | None] = None

    def fit(self, ctx: FitContext) -> dict:
        """Budget-independent statistics into ``ctx.stats(self.name)``; a JSON-ready summary for ``meta.json``.
        Methods with ``fits = False`` have none."""
        return {}

    def select(self, ctx: FitContext, budget: int) -> MethodSelection:
        raise NotImplementedError(f"{type(self).__name__} does not implement select(ctx, budget)")

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, summary: dict, cache: Any) -> MethodState:
        """The frozen state of a finished run (``summary``: the method's ``selections/<name>/summary.json``;
        ``cache``: the scorer's :class:`~datasel_ray.pipeline.fit.state.MemberCache`)."""
        raise NotImplementedError(f"{cls.__name__} is not scored online (scored = False)")


#: name -> method class, in registration order (the order of the aggregate phase's fits and of ``/info``).
METHOD_REGISTRY: dict[str, type[SelectionMethod]] = {}
_builtins_registered = False


def register_method(cls: type[SelectionMethod]) -> type[SelectionMethod]:
    """Add ``cls`` (a :class:`SelectionMethod` subclass) to the registry; usable as a class decorator.

    ValueError when it is not a subclass, lacks ``name``/``description``, declares ``columns`` that are not a
    tuple of strings, or its name is taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, SelectionMethod)):
        raise ValueError(f"register_method: {cls!r} is not a SelectionMethod subclass")
    for attr in ("name", "description"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise ValueError(f"register_method: {cls.__name__}.{attr} must be a non-empty string")
    if not (isinstance(cls.columns, tuple) and all(isinstance(c, str) for c in cls.columns)):
        raise ValueError(f"register_method: {cls.__name__}.columns must be a tuple of column names, "
                         f"got {cls.columns!r}")
    _ensure_builtins()
    existing = METHOD_REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"register_method: the name {cls.name!r} is taken by {existing.__module__}."
                         f"{existing.__qualname__}")
    METHOD_REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a method registered with :func:`register_method` (built-in methods stay)."""
    _ensure_builtins()
    if name in {cls.name for cls in _builtin_classes()}:
        raise ValueError(f"unregister_method: {name!r} is a built-in method")
    METHOD_REGISTRY.pop(name, None)


def _builtin_classes() -> tuple[type[SelectionMethod], ...]:
    """The built-in methods, in registry order (imported here, not at module import: they run on the pipeline,
    which imports the config, which validates method names against this registry)."""
    from datasel_ray.pipeline.fit.baselines import AnswerLoss, RandomGlobal, RandomPerTask
    from datasel_ray.pipeline.fit.coincide import Coincide
    from datasel_ray.pipeline.fit.datatailor import DataTailor
    from datasel_ray.pipeline.fit.tive import Tive

    return Coincide, DataTailor, Tive, RandomGlobal, RandomPerTask, AnswerLoss


def _ensure_builtins() -> None:
    """Register the built-in method classes once, before any other."""
    global _builtins_registered
    if _builtins_registered:
        return
    _builtins_registered = True
    try:
        builtins = _builtin_classes()
    except BaseException:
        _builtins_registered = False
        raise
    for cls in builtins:
        METHOD_REGISTRY[cls.name] = cls


def registry() -> dict[str, type[SelectionMethod]]:
    """:data:`METHOD_REGISTRY` with the built-in methods registered."""
    _ensure_builtins()
    return METHOD_REGISTRY


def method_names() -> tuple[str, ...]:
    return tuple(registry())


def scored_methods() -> tuple[str, ...]:
    return tuple(name for name, cls in registry().items() if cls.scored)


def fitted_methods(methods: list[str], tive_enabled: bool) -> list[str]:
    """Of ``methods``, those with budget-independent statistics to fit in the aggregate phase, in registry
    order (a method reading the TIVE gradients only when they are extracted)."""
    wanted = set(methods)
    return [name for name, cls in registry().items()
            if name in wanted and cls.fits and (tive_enabled or not cls.needs_tive)]


def get_method(name: str) -> SelectionMethod:
    """An instance of the method class registered as ``name``; ValueError listing the choices otherwise."""
    methods = registry()
    if not isinstance(name, str) or name not in methods:
        raise ValueError(f"Unknown method '{name}'. Choose from: {', '.join(sorted(methods))}")
    return methods[name]()
