r"""What the energy constraints cost (MATH §1.7): certified unfolded families against a standard encoder at equal
parameter counts, one training budget, a learning-rate sweep, three seeds.

``python -m unfold.constraint_cost --json OUT`` runs :func:`unfold.cost_study.run_study`: on every task
(:mod:`unfold.cost_tasks`: sklearn digits, 5-digit addition, a synthetic negation-sentiment text task), for every size
(a width of the standard encoder, whose parameter count every family matches, :func:`unfold.cost_models.match_width`),
every model (``standard`` = ``nn.TransformerEncoderLayer`` stack; every family of :data:`unfold.families.FAMILIES`),
every learning rate of the sweep and every seed, it trains with Adam for the same number of steps and batch size, and
records validation and test accuracy, training time (wall and CPU) and, for the certifiable families, the descent
certificate on test inputs. The best learning rate of each model is chosen on the validation split. Finished runs are
cached in ``OUT.runs.json`` (``--cache``), so an interrupted study resumes where it stopped.

The table printed at the end (and :func:`format_table`) gives, per task and size, each model's parameters, best
learning rate, test accuracy (mean ± std over seeds), CPU seconds per run and certificate.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from energy._io import atomic_write_text
from unfold.cost_models import build_model, energy_trace_summary, model_names
from unfold.cost_study import StudyConfig, run_study
from unfold.cost_tasks import TASKS, Task, make_task, with_positions

__all__ = ["Task", "make_task", "TASKS", "with_positions", "build_model", "energy_trace_summary", "StudyConfig",
           "run_study", "format_table", "main"]


def _fmt(ms: dict[str, Any], digits: int = 3) -> str:
    if ms.get("mean") is None:
        return "—"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def _cert_cell(entry: dict[str, Any]) -> str:
    cert = entry.get("certificate")
    if cert is None:
        return "not certifiable" if entry["model"] != "standard" else "—"
    state = "certified" if cert["certified"] else f"{100 * cert['guaranteed_share']:.0f}% guaranteed"
    return f"{state}, {cert['violations']} violations"


def format_table(report: dict[str, Any]) -> str:
    """Markdown table: per task, size and model the parameters, best LR, test accuracy (mean ± std over seeds),
    CPU and wall seconds per training run, and the certificate.
    """
    lines = ["| task | size | model | parameters | width d (heads) | best lr | test accuracy | cpu s / run | "
             "wall s / run | certificate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task, per_size in report["results"].items():
        for size, models in per_size.items():
            for model, e in models.items():
                extra = "".join(f"; {k} {_fmt(e[k])}" for k in e if k == "exact_match")
                lines.append(
                    f"| {task} | {size} | {model} | {e['parameters']:,} | {e['d']} ({e['heads']}) | {e['best_lr']:g} | "
                    f"{_fmt(e['test_accuracy'])}{extra} | {_fmt(e['cpu_s'], 1)} | {_fmt(e['wall_s'], 1)} | "
                    f"{_cert_cell({**e, 'model': model})} |")
    return "\n".join(lines)


def format_sweep(report: dict[str, Any]) -> str:
    """Markdown table of the learning-rate sweep: mean validation accuracy per task, size, model and LR."""
    lrs = [float(x) for x in report["settings"]["lrs"]]
    lines = ["| task | size | model | " + " | ".join(f"val @ lr {lr:g}" for lr in lrs) + " |",
             "|---|---|---|" + "---|" * len(lrs)]
    for task, per_size in report["sweep"].items():
        for size, models in per_size.items():
            for model, by_lr in models.items():
                cells = []
                for lr in lrs:
                    cell = by_lr.get(repr(lr))
                    cells.append("—" if cell is None else ("diverged" if cell["diverged"] else _fmt(cell["val"])))
                lines.append(f"| {task} | {size} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line ``python -m unfold.constraint_cost``: run (or resume) the study, print the tables.

    With ``--json OUT`` the full report is written atomically (the path is checked writable before training) and the
    finished runs are cached in ``--cache`` (default ``OUT`` with the suffix ``.runs.json``). Returns the exit
    status: 0 ok, 2 a usage error, 1 a failure (one line on stderr; ``--debug`` shows the traceback), 130 interrupted
    (the message says how many runs finished and where they are cached).
    """
    from energy._cli import run_command

    return run_command("python -m unfold.constraint_cost", lambda: _main(argv), argv)


def _int_list(text: str, flag: str, example: str) -> tuple[int, ...]:
    from energy._cli import UsageError

    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: not a comma-separated list of integers; e.g. {flag} {example}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{flag} must list integers of at least 1, got {text!r}; e.g. {flag} {example}")
    return values


def _main(argv: list[str] | None) -> int:
    from energy._cli import Parser, UsageError, check_writable_file

    parser = Parser(prog="python -m unfold.constraint_cost", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--json", metavar="OUT", help="write the report to this JSON file (atomically)")
    parser.add_argument("--cache", metavar="RUNS", help="JSON file of finished runs (default: OUT with suffix "
                                                        ".runs.json); reruns skip the runs found there")
    parser.add_argument("--tasks", default="digits,addition,text", help=f"comma-separated, of: {', '.join(TASKS)}")
    parser.add_argument("--models", default="all", help=f"comma-separated, of: {', '.join(model_names())}")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 … N-1), at least 1")
    parser.add_argument("--sweep-seeds", type=int, default=1, help="seeds that run every learning rate (the "
                                                                    "others run the best one)")
    parser.add_argument("--d", default="16,32", help="sizes: comma-separated widths of the standard encoder; every "
                                                      "family is matched to its parameter count")
    parser.add_argument("--depth", type=int, default=4, help="number of layers")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (standard and multi-head families)")
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps per run")
    parser.add_argument("--lr", default="1e-3,3e-3,1e-2,3e-2", help="learning rates of the sweep, comma-separated")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes)")
    args = parser.parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not tasks:
        raise UsageError(f"--tasks {args.tasks!r}: names no task; give a comma-separated list of: {', '.join(TASKS)}")
    for t in tasks:
        if t not in TASKS:
            raise UsageError(f"--tasks: unknown task {t!r}; valid tasks: {', '.join(TASKS)}")
    models = None
    if args.models != "all":
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        bad = [m for m in models if m not in model_names()]
        if bad or not models:
            raise UsageError(f"--models: unknown {bad or 'empty list'}; valid models: {', '.join(model_names())} "
                             "(or all)")
    for name in ("seeds", "sweep_seeds", "steps", "depth", "heads", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    sizes = _int_list(args.d, "--d", "16,32")
    if any(s % args.heads for s in sizes):
        raise UsageError(f"--d {args.d}: every size must be divisible by --heads {args.heads}; e.g. --d 16,32")
    try:
        lrs = tuple(float(x) for x in args.lr.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--lr {args.lr!r}: not a comma-separated list of numbers; e.g. --lr 1e-3,3e-3") from None
    if not lrs or not all(math.isfinite(lr) and lr > 0 for lr in lrs) or len(set(lrs)) != len(lrs):
        raise UsageError(f"--lr must list distinct positive learning rates, got {args.lr!r}; e.g. --lr 1e-3,3e-3")
    cache = args.cache
    if args.json:
        check_writable_file(args.json, "--json")
        cache = cache or str(Path(args.json).with_suffix(".runs.json"))
    if cache:
        check_writable_file(cache, "--cache")
    torch.set_num_threads(args.threads)
    cfg = StudyConfig(tasks=tasks, models=models, sizes=sizes, depth=args.depth, heads=args.heads, lrs=lrs,
                      seeds=tuple(range(args.seeds)), sweep_seeds=min(args.sweep_seeds, args.seeds),
                      steps=args.steps, batch_size=args.batch_size)
    report = run_study(cfg, cache=cache)
    print(format_table(report))
    print(format_sweep(report))
    print(f"[constraint_cost] total {report['wall_s']:.1f} s wall, {report['cpu_s']:.1f} s cpu "
          f"({report['trained_now']} runs trained now)")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1))
        print(f"[constraint_cost] wrote {args.json} (runs cached in {cache})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
