"""The figure registry: one decorated compute function and one plot function per figure.

Adding a figure to ``python -m paper_figs`` takes three steps, all inside one module listed in
:data:`FIGURE_MODULES`::

    from paper_figs.registry import FigureConfig, figure, measured

    @figure(
        "family-name",                       # the CLI name (part of the interface)
        description="One line for --list.",
        claim="The statement of the paper / theory the figure tests.",
        paper_seed=23333,                    # used when the user gives no --seed
    )
    def compute_name(cfg: FigureConfig) -> dict:
        n = cfg.pick(tiny=8, quick=64, paper=512)     # sizes per fidelity
        ...                                           # use cfg.seed, cfg.progress(...) for long loops
        return {"x": [...], "y": [...]}               # JSON-serialisable data (tensors/arrays allowed)

    @compute_name.plot
    def plot_name(data: dict, cfg: FigureConfig) -> matplotlib.figure.Figure:
        ...                                           # draw from ``data`` only (it may come from the JSON file)

    @compute_name.summary
    def summarize_name(data: dict) -> dict:
        return {"slope_V": measured(data["slope"], target=2.0, tolerance=0.15, uncertainty=data["slope_se"])}

The decorator returns a :class:`FigureSpec` (callable like the compute function). ``plot`` must draw from ``data``
alone, because a resumed run redraws a missing picture from the stored JSON without recomputing. ``summary`` returns
the key measured numbers, each made by :func:`measured`, with the paper's or the theory's value beside it and a
``matches`` flag (``None`` when there is no target, e.g. "report what the trajectory does").
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "FIDELITIES",
    "FIGURE_MODULES",
    "FigureConfig",
    "FigureSpec",
    "Registry",
    "REGISTRY",
    "figure",
    "measured",
    "progress",
    "single_thread",
    "load_figure_modules",
    "UnknownFigureError",
]

#: Fidelities, cheapest first. ``tiny`` is for tests and smoke runs (numbers are not results); ``quick`` is what
#: ``make figures`` runs; ``paper`` is the papers' full protocol.
FIDELITIES: tuple[str, ...] = ("tiny", "quick", "paper")

#: Every module that registers figures, in the order the figures are listed and run. A module that does not exist
#: (yet) is skipped; an import error *inside* an existing module is raised.
FIGURE_MODULES: tuple[str, ...] = (
    "paper_figs.yang2022_synthetic",
    "paper_figs.yang2022_text",
    "paper_figs.ormaniec2024",
    "paper_figs.bridge",
    "paper_figs.bridge_curvature",
    "paper_figs.block_curvature",
    "paper_figs.zhang2024",
    "paper_figs.unfold_accuracy",
)

T = TypeVar("T")


class UnknownFigureError(KeyError):
    """A figure name that no registered module provides."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class FigureConfig:
    """What a figure's ``compute`` and ``plot`` receive.

    Attributes:
        fidelity: ``"tiny"`` (tests), ``"quick"`` (``make figures``) or ``"paper"`` (the full protocol).
        seed: the seed to use; already resolved (the user's ``--seed``, else the figure's ``paper_seed``, else 0).
        out: the output directory (figures may write nothing there themselves; the runner writes all files).
        options: the extra options the figure declared (e.g. ``{"imdb": "/path" or None}``), nothing else.
        sizes: size overrides for tests, e.g. ``{"n": 12}``; read them through :meth:`pick`.
    """

    fidelity: str = "quick"
    seed: int = 0
    out: Path = Path("paper_figs/out")
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sizes: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fidelity not in FIDELITIES:
            raise ValueError(f"fidelity must be one of {FIDELITIES}, got {self.fidelity!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int (resolved before compute), got {self.seed!r}")

    @property
    def quick(self) -> bool:
        """True unless the paper's full protocol is requested."""
        return self.fidelity != "paper"

    def pick(self, *, tiny: T, quick: T, paper: T, key: str | None = None) -> T:
        """The value for this fidelity; ``sizes[key]`` overrides it when given (tests use this).

        >>> FigureConfig(fidelity="paper").pick(tiny=4, quick=64, paper=512)
        512
        >>> FigureConfig(fidelity="tiny", sizes={"n": 3}).pick(tiny=4, quick=64, paper=512, key="n")
        3
        """
        if key is not None and key in self.sizes:
            return self.sizes[key]
        return {"tiny": tiny, "quick": quick, "paper": paper}[self.fidelity]

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """A progress bar over ``iterable`` (see :func:`progress`)."""
        return progress(iterable, desc, total=total)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread, then restore the previous setting.

    Figures made of thousands of small operations (batch-1 training steps, per-length buckets, 300×300 matrices)
    only pay synchronisation for a second intra-op thread. Measured on the 2-core machine under load (load average
    ≈ 10): the five text and bridge figures at ``--quick`` took 474 s wall (186 s CPU) with torch's default 2
    threads and 60 s (23 s CPU) with one. Figures opt in with ``@figure(..., single_thread=True)``.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap a long loop in a tqdm bar on stderr (redrawn at most twice a second; hidden when stderr is no TTY)."""
    from tqdm.auto import tqdm

    return iter(
        tqdm(iterable, desc=desc, total=total, mininterval=0.5, leave=False, disable=not sys.stderr.isatty())
    )


def measured(
    value: Any,
    *,
    target: Any = None,
    tolerance: float | None = None,
    uncertainty: float | None = None,
    matches: bool | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One key number of a figure's summary, with the value the paper or the theory predicts beside it.

    Args:
        value: the measured number (or bool / short string for qualitative findings).
        target: the paper's or the theory's value; ``None`` when there is none ("report what happens").
        tolerance: absolute tolerance; with a numeric ``target`` and no explicit ``matches``,
            ``matches = |value - target| <= tolerance``.
        uncertainty: e.g. a standard error of ``value`` (reported, not used for ``matches``).
        matches: explicit verdict; overrides the tolerance rule. Stays ``None`` when there is no target.
        note: one short sentence for the report (how it was measured, what the target means).

    Returns:
        ``{"value", "uncertainty", "target", "tolerance", "matches", "note"}``.
    """
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not math.isfinite(tolerance) or tolerance < 0):
        raise ValueError(f"`tolerance` must be a finite number ≥ 0 (an absolute tolerance) or None, got {tolerance!r}.")
    if matches is None and target is not None:
        if tolerance is not None:
            if not isinstance(value, (int, float)) or not isinstance(target, (int, float)):
                raise TypeError("a tolerance needs a numeric value and target; pass matches=... explicitly instead")
            matches = bool(math.isfinite(float(value)) and abs(float(value) - float(target)) <= tolerance)
        elif isinstance(target, (bool, str)) or isinstance(value, (bool, str)):
            matches = value == target
    if matches is not None:
        matches = bool(matches)
    return {
        "value": value,
        "uncertainty": uncertainty,
        "target": target,
        "tolerance": tolerance,
        "matches": matches,
        "note": note,
    }


ComputeFn = Callable[[FigureConfig], dict]
PlotFn = Callable[[dict, FigureConfig], Any]
SummaryFn = Callable[[dict], dict]


@dataclasses.dataclass
class FigureSpec:
    """A registered figure. Created by :func:`figure`; callable like its compute function.

    Attributes:
        name: CLI name, e.g. ``"yang2022-apollonius"``.
        description: one line for ``--list``.
        claim: the statement the figure tests (shown in the report).
        compute: ``compute(cfg) -> dict`` of JSON-serialisable data.
        caption: report caption; a string, or ``caption(data) -> str`` when it depends on the data (e.g. which
            dataset was used). Defaults to ``description``.
        paper_seed: the seed of the paper's protocol, used when the user gives none.
        options: names of the extra CLI options the figure reads (e.g. ``("imdb", "glove")``); only these reach
            ``cfg.options``, and they are part of the resume key.
        version: bump it when ``compute`` changes what it returns, so that stored JSON files are recomputed
            (part of the resume key).
        plot_fn: ``plot(data, cfg) -> matplotlib Figure`` (set with ``@spec.plot``).
        summary_fn: ``summary(data) -> {key: measured(...)}`` (set with ``@spec.summary``).
        single_thread: run ``compute`` under :func:`single_thread` (for figures of many small operations).
    """

    name: str
    description: str
    claim: str
    compute: ComputeFn
    caption: str | Callable[[dict], str] | None = None
    paper_seed: int | None = None
    options: tuple[str, ...] = ()
    version: int = 1
    plot_fn: PlotFn | None = None
    summary_fn: SummaryFn | None = None
    single_thread: bool = False

    def __call__(self, cfg: FigureConfig) -> dict:
        """Compute the figure's data (with one torch thread when the figure asked for it)."""
        with single_thread() if self.single_thread else contextlib.nullcontext():
            return self.compute(cfg)

    def plot(self, fn: PlotFn) -> PlotFn:
        """Decorator: register ``fn(data, cfg) -> matplotlib.figure.Figure`` as this figure's plot."""
        if self.plot_fn is not None:
            raise ValueError(f"figure {self.name!r} already has a plot function ({self.plot_fn.__name__})")
        self.plot_fn = fn
        return fn

    def summary(self, fn: SummaryFn) -> SummaryFn:
        """Decorator: register ``fn(data) -> {key: measured(...)}`` as this figure's summary."""
        if self.summary_fn is not None:
            raise ValueError(f"figure {self.name!r} already has a summary function ({self.summary_fn.__name__})")
        self.summary_fn = fn
        return fn

    def resolve_seed(self, seed: int | None) -> int:
        """The user's seed, else the paper's seed, else 0."""
        if seed is not None:
            return int(seed)
        return 0 if self.paper_seed is None else int(self.paper_seed)

    def caption_for(self, data: dict | None) -> str:
        """The report caption (calls ``caption(data)`` when it is a function and data is available)."""
        if callable(self.caption):
            return self.caption(data) if data is not None else self.description
        return self.caption or self.description

    def summarize(self, data: dict) -> dict[str, dict[str, Any]]:
        """Run the summary function (``{}`` if the figure has none) and check its shape."""
        if self.summary_fn is None:
            return {}
        out = self.summary_fn(data)
        if not isinstance(out, Mapping):
            raise TypeError(f"summary of {self.name!r} must return a dict of measured(...) records, got {type(out)}")
        for key, rec in out.items():
            if not isinstance(rec, Mapping) or "value" not in rec or "matches" not in rec:
                raise TypeError(f"summary of {self.name!r}: entry {key!r} must be made by measured(...)")
        return dict(out)


class Registry:
    """An ordered name → :class:`FigureSpec` map. The package uses :data:`REGISTRY`; tests make their own."""

    def __init__(self) -> None:
        self._figures: dict[str, FigureSpec] = {}

    def figure(
        self,
        name: str,
        *,
        description: str,
        claim: str,
        caption: str | Callable[[dict], str] | None = None,
        paper_seed: int | None = None,
        options: Iterable[str] = (),
        version: int = 1,
        single_thread: bool = False,
    ) -> Callable[[ComputeFn], FigureSpec]:
        """Decorator registering ``compute(cfg) -> dict`` under ``name``; returns the :class:`FigureSpec`."""
        if not name or any(c.isspace() or c in "/\\" for c in name):
            raise ValueError(f"figure name {name!r} must be non-empty, without spaces or slashes (it is a file name)")
        if "\n" in description:
            raise ValueError(f"description of {name!r} must be one line (it is printed by --list)")

        def deco(compute: ComputeFn) -> FigureSpec:
            if name in self._figures:
                raise ValueError(f"figure {name!r} is registered twice (second time by {compute.__module__})")
            spec = FigureSpec(
                name=name,
                description=description,
                claim=claim,
                compute=compute,
                caption=caption,
                paper_seed=paper_seed,
                options=tuple(options),
                version=int(version),
                single_thread=bool(single_thread),
            )
            self._figures[name] = spec
            return spec

        return deco

    def __contains__(self, name: object) -> bool:
        return name in self._figures

    def __getitem__(self, name: str) -> FigureSpec:
        if name not in self._figures:
            raise UnknownFigureError(
                f"unknown figure {name!r}; valid names: {', '.join(self._figures) or '(none registered)'}"
            )
        return self._figures[name]

    def __iter__(self) -> Iterator[FigureSpec]:
        return iter(list(self._figures.values()))

    def __len__(self) -> int:
        return len(self._figures)

    def names(self) -> list[str]:
        """All registered names, in registration order."""
        return list(self._figures)

    def select(self, names: Iterable[str]) -> list[FigureSpec]:
        """The specs for ``names`` (all figures when empty), in the order given, without duplicates.

        Raises:
            UnknownFigureError: listing every unknown name and all valid names.
        """
        names = list(dict.fromkeys(names))
        if not names:
            return list(self)
        unknown = [n for n in names if n not in self._figures]
        if unknown:
            raise UnknownFigureError(
                f"unknown figure name(s): {', '.join(unknown)}. "
                f"Valid names: {', '.join(self._figures) or '(none registered)'} "
                "(see `python -m paper_figs --list`)"
            )
        return [self._figures[n] for n in names]


#: The package-wide registry that ``python -m paper_figs`` runs.
REGISTRY = Registry()

#: ``@figure(name, *, description, claim, caption=None, paper_seed=None, options=(), version=1,
#: single_thread=False)`` on :data:`REGISTRY`.
figure = REGISTRY.figure


def load_figure_modules(modules: Iterable[str] = FIGURE_MODULES) -> list[str]:
    """Import every figure module (which registers its figures); return the names of modules that do not exist.

    A module that is absent is skipped, so a figure family can be added later without touching the CLI. Any error
    raised while importing a module that *does* exist (including a missing dependency inside it) propagates.
    """
    missing = []
    for mod in modules:
        if mod in sys.modules:
            continue
        if importlib.util.find_spec(mod) is None:
            missing.append(mod)
            continue
        importlib.import_module(mod)
    return missing
