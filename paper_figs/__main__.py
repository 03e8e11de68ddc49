"""``python -m paper_figs``: compute, plot and report the papers' figures.

Usage::

    python -m paper_figs --list
    python -m paper_figs [NAME ...] [--quick | --paper | --tiny] [--out DIR] [--seed S] [--force]
                         [--threads N] [--imdb PATH] [--sst2 PATH] [--glove PATH]

Without names every registered figure runs. For each figure the command writes ``DIR/NAME.json`` (the data the
plot is drawn from, with the fidelity, seed, options and figure version it was computed with), ``DIR/NAME.png``
and ``DIR/NAME.pdf``, then rebuilds ``DIR/summary.json`` and ``DIR/report.md``. All writes are atomic.

Resume rule: a figure whose JSON exists with the same fidelity, seed, options and version is not recomputed (pass
``--force`` to recompute); if its picture is missing it is redrawn from the JSON. A failing figure is reported and
the others still run; the exit code is then 1 (2 for usage errors such as an unknown figure name or an output
directory that cannot be written, checked before anything is computed). Errors are one line on stderr; ``--debug``
shows the traceback. Ctrl-C stops the run: the summary and report of the figures finished so far are written, the
command says which figures finished and exits 130; rerunning the same command resumes (finished figures are skipped).

Installed as the console script ``paper-figs``. The default ``--out`` (``paper_figs/out``) is ignored by git; the
README gallery (``docs/img/figures``) is refreshed only by ``make gallery``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from energy._cli import Interrupted, Parser, UsageError, check_writable_dir, prog_name, run_command  # noqa: E402
from paper_figs.io import read_json, save_figure, to_jsonable, write_json  # noqa: E402
from paper_figs.registry import (  # noqa: E402
    REGISTRY,
    FigureConfig,
    FigureSpec,
    Registry,
    UnknownFigureError,
    load_figure_modules,
)
from paper_figs.report import REPORT_NAME, SUMMARY_NAME, write_summary_and_report  # noqa: E402

__all__ = ["main", "run_figure", "build_parser", "DATA_OPTIONS"]

#: Extra options a figure may declare (``@figure(..., options=(...))``): CLI flag name -> help text.
DATA_OPTIONS: dict[str, str] = {
    "imdb": "path to the IMDB dataset (Yang et al. figs 5-6 run the paper's exact setting when given)",
    "sst2": "path to the SST-2 dataset (Yang et al. figs 5-6)",
    "glove": "path to GloVe-840B-300d vectors (Yang et al. figs 5-6)",
    "gpt2": "path to a local Hugging Face GPT-2 directory (config.json, weights when present): "
            "zhang2024-blockwise-spectra measures that model instead of a seeded random one",
}


#: The default output directory (ignored by git; ``make gallery`` copies the pictures to ``docs/img/figures``).
DEFAULT_OUT = Path("paper_figs/out")


def build_parser(prog: str = "python -m paper_figs") -> argparse.ArgumentParser:
    """The command-line parser of ``python -m paper_figs`` (one option per data path in :data:`DATA_OPTIONS`)."""
    p = Parser(
        prog=prog,
        description="Reproduce the papers' figures: data (JSON), pictures (PNG, PDF), summary.json and report.md.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="figures to run (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="print the figure names with one-line descriptions")
    fid = p.add_mutually_exclusive_group()
    fid.add_argument("--quick", dest="fidelity", action="store_const", const="quick",
                     help="reduced protocol, minutes for all figures (the default fidelity)")
    fid.add_argument("--paper", dest="fidelity", action="store_const", const="paper",
                     help="the papers' full protocols")
    fid.add_argument("--tiny", dest="fidelity", action="store_const", const="tiny",
                     help="smoke-test sizes (seconds); the numbers are not results")
    p.set_defaults(fidelity="quick")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (created; must be writable)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for every figure (None: each figure's seed from the paper)")
    p.add_argument("--force", action="store_true", help="recompute figures even if their JSON is up to date")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (None: torch's choice; 1 can be faster on a busy machine)")
    for opt, text in DATA_OPTIONS.items():
        p.add_argument(f"--{opt}", type=Path, default=None, metavar="PATH", help=text)
    return p


def _meta_key(fidelity: str, seed: int, options: Mapping[str, Any], version: int) -> dict[str, Any]:
    """What a stored JSON must agree on to be reused (the resume rule)."""
    return {"fidelity": fidelity, "seed": seed, "options": to_jsonable(dict(options)), "version": version}


def _is_up_to_date(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored payload if ``path`` holds data computed with the same fidelity/seed/options, else ``None``."""
    if not path.exists():
        return None
    try:
        payload = read_json(path)
        meta = payload["meta"]
        same = all(meta.get(k) == v for k, v in key.items())
        return payload if same and "data" in payload else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or foreign file: recompute


def _draw(spec: FigureSpec, data: dict, cfg: FigureConfig) -> list[Path]:
    if spec.plot_fn is None:
        raise TypeError(f"figure {spec.name!r} has no plot function; add one with @{spec.compute.__name__}.plot")
    fig = spec.plot_fn(data, cfg)
    try:
        return [save_figure(fig, cfg.out / f"{spec.name}.{ext}") for ext in ("png", "pdf")]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def run_figure(
    spec: FigureSpec,
    *,
    fidelity: str,
    out: Path,
    seed: int | None = None,
    options: Mapping[str, Any] | None = None,
    force: bool = False,
    sizes: Mapping[str, Any] | None = None,
) -> str:
    """Compute (unless up to date), store and draw one figure.

    Returns:
        ``"computed"``, ``"redrawn"`` (JSON up to date, picture missing) or ``"up to date"``.
    """
    out = Path(out)
    opts = {k: (None if options is None else options.get(k)) for k in spec.options}
    cfg = FigureConfig(fidelity=fidelity, seed=spec.resolve_seed(seed), out=out, options=opts, sizes=dict(sizes or {}))
    key = _meta_key(cfg.fidelity, cfg.seed, opts, spec.version)
    json_path = out / f"{spec.name}.json"
    payload = None if force else _is_up_to_date(json_path, key)
    if payload is not None:
        try:
            spec.summarize(payload["data"])
        except Exception as exc:
            raise RuntimeError(
                f"{json_path} does not fit the current code of {spec.name!r} ({exc!r}); "
                f"recompute it with --force (and bump version= in its @figure)"
            ) from exc
        if all((out / f"{spec.name}.{ext}").exists() for ext in ("png", "pdf")):
            return "up to date"
        _draw(spec, payload["data"], cfg)
        return "redrawn"
    t0 = time.perf_counter()
    data = spec(cfg)
    seconds = time.perf_counter() - t0
    if not isinstance(data, Mapping):
        raise TypeError(f"compute of {spec.name!r} must return a dict, got {type(data).__name__}")
    data = to_jsonable(data)
    spec.summarize(data)  # a broken summary is a failure of this figure, found before anything is written
    meta = dict(key, created_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                compute_seconds=seconds, torch=torch.__version__, numpy=np.__version__)
    write_json(json_path, {"figure": spec.name, "meta": meta, "data": data})
    _draw(spec, data, cfg)
    return "computed"


def _check_data_options(args: argparse.Namespace) -> dict[str, Path | None]:
    options = {}
    for opt in DATA_OPTIONS:
        path = getattr(args, opt)
        if path is not None and not path.exists():
            raise UsageError(f"--{opt} {path}: no such file or directory; give an existing path or omit --{opt}")
        options[opt] = path
    return options


def main(argv: Sequence[str] | None = None, registry: Registry | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 a figure failed, 2 usage error, 130 interrupted)."""
    prog = prog_name("python -m paper_figs", "paper-figs")
    return run_command(prog, lambda: _main(argv, registry, prog), argv)


def _main(argv: Sequence[str] | None, registry: Registry | None, prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    if registry is None:
        missing = load_figure_modules()
        registry = REGISTRY
    else:
        missing = []
    if args.list:
        width = max((len(n) for n in registry.names()), default=0)
        for spec in registry:
            print(f"{spec.name:<{width}}  {spec.description}")
        if missing:
            print(f"(not available yet: {', '.join(missing)})", file=sys.stderr)
        return 0
    try:
        specs = registry.select(args.names)
    except UnknownFigureError as exc:
        raise UsageError(f"NAME: {exc}") from None
    options = _check_data_options(args)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be a positive integer, got {args.threads}; e.g. --threads 1")
        torch.set_num_threads(args.threads)
    out: Path = check_writable_dir(args.out, "--out")  # before anything is computed
    debug = getattr(args, "debug", False)
    failures: dict[str, str] = {}
    finished: list[str] = []
    t_all = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        tag = f"[{i}/{len(specs)}] {spec.name}"
        print(f"{tag} ...", flush=True)
        t0 = time.perf_counter()
        try:
            status = run_figure(spec, fidelity=args.fidelity, out=out, seed=args.seed, options=options,
                                force=args.force)
        except KeyboardInterrupt:
            if debug:
                raise
            write_summary_and_report(list(registry), out, failures)
            done = ", ".join(finished) if finished else "none"
            raise Interrupted(
                f"stopped during {spec.name} after {time.perf_counter() - t_all:.1f} s; finished {len(finished)}/"
                f"{len(specs)} ({done}); wrote {out / SUMMARY_NAME} and {out / REPORT_NAME}; rerun the same command "
                "to resume (finished figures are skipped)") from None
        except Exception as exc:
            if debug:
                raise
            failures[spec.name] = f"{type(exc).__name__}: {exc}"
            print(f"{tag}: FAILED after {time.perf_counter() - t0:.1f} s: {failures[spec.name]} "
                  f"(rerun with --debug for the traceback)", flush=True)
            continue
        finished.append(spec.name)
        note = {"up to date": " (JSON up to date, skipped; --force recomputes)",
                "redrawn": " (redrawn from JSON without recomputing)"}.get(status, "")
        print(f"{tag}: {status} in {time.perf_counter() - t0:.1f} s{note}", flush=True)
    write_summary_and_report(list(registry), out, failures)
    n_ok = len(specs) - len(failures)
    print(f"{n_ok}/{len(specs)} figures ok in {time.perf_counter() - t_all:.1f} s; "
          f"wrote {out / SUMMARY_NAME} and {out / REPORT_NAME}", flush=True)
    if failures:
        print(f"{prog}: error: {len(failures)} figure(s) failed: {', '.join(failures)} (see the FAILED lines above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
