r"""What the energy constraints cost (MATH §1.7), and what the energy does along trained models (MATH §1.6).

``python -m unfold.constraint_cost --json OUT`` trains, on each task and seed, with the same width ``d``, depth,
optimiser, learning rate, batch size and number of steps:

* **unfolded**: :func:`unfold.presets.yang2022` (weight-tied; attention step (a) with ``W = M Mᵀ/√k``, identity
  values, key bias ``β``; FFN step with ``W_f`` symmetric, spectrum in ``[0, 0.95]``; ReLU; ``α = 1``);
* **unfolded_ln**: the same plus a LayerNorm (no affine, ``eps = 1e-5`` as ``nn.LayerNorm``, so that tokens zeroed by
  the ReLU stay defined) at the end of every layer (MATH §1.4; no descent guarantee);
* **standard**: :func:`unfold.standard.standard_encoder` (``nn.TransformerEncoderLayer`` × depth, unconstrained
  ``W_Q, W_K, W_V, W_O``, ``W_1, W_2``, LayerNorms, residuals, untied),

both with the same input map and mean-pool + linear head, and reports test accuracy (mean ± std over seeds).

Tasks (real, offline; :func:`make_task`):

* ``digits`` — scikit-learn's 8×8 digits, each image a sequence of 8 row tokens (8 pixels / 16), 10 classes;
* ``addition`` — 5-digit addition ``XXXXX+YYYYY=`` → the 6 answer digits, predicted at once from the pooled
  representation (6 × 10-way; metric: per-digit accuracy, and exact match of all six digits); train batches from
  :class:`unfold.data.AdditionDataset` (half of them carry-rich), test on 2,048 fresh uniform sums of another seed;
* ``synthetic`` — :func:`unfold.data.synthetic_sequence_classification` (CLI only).

Every token gets a one-hot position appended (the models are permutation-equivariant and mean-pool, so without it
the row order of a digit or the place value of a digit would be invisible to both models).

Energy traces. On the trained unfolded models (and on an extra variant trained on digits without ReLU) the script
evaluates ``E = E_att + E_ffn`` at every layer boundary on the test
set and reports how often it decreases from layer to layer, how often each step decreases its own term, and the
mean energy per layer. Whatever it shows is the result.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energy._io import atomic_write_text
from energy._validation import EnergyInputError
from unfold.data import (
    AdditionDataset,
    ShuffledBatches,
    iterate_batches,
    load_digits_sequences,
    synthetic_sequence_classification,
)
from unfold.presets import parameter_count, yang2022
from unfold.standard import standard_encoder
from unfold.train import accuracy, evaluate, train
from unfold.unroller import Unrolled

__all__ = ["Task", "make_task", "TASKS", "build_model", "energy_trace_summary", "run", "main"]

TASKS = ("digits", "addition", "synthetic")
N_DIGITS = 5


@dataclass
class Task:
    """A supervised task in the form the training loop takes.

    Attributes:
        name: task name.
        train_batches: replayable endless iterable of ``(X, y)``.
        test_batches: callable returning a fresh iterable of test batches.
        d_in: input feature width.
        n_outputs: width of the model's output (classes, or 6·10 for addition).
        loss_fn: ``loss_fn(outputs, targets)``.
        metric: ``metric(outputs, targets) -> (correct, counted)``.
        extra_metrics: further named metrics (e.g. exact match).
        X_probe: a fixed batch of test inputs for energy traces.
        description: one line.
    """

    name: str
    train_batches: Iterable[tuple[Tensor, Tensor]]
    test_batches: Callable[[], Iterable[tuple[Tensor, Tensor]]]
    d_in: int
    n_outputs: int
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[Tensor, Tensor], tuple[int, int]]
    extra_metrics: dict[str, Callable[[Tensor, Tensor], tuple[int, int]]]
    X_probe: Tensor
    description: str


def with_positions(X: Tensor) -> Tensor:
    """Append a one-hot position to every token: ``(B, n, d) -> (B, n, d + n)``."""
    B, n, _ = X.shape
    return torch.cat([X, torch.eye(n, dtype=X.dtype, device=X.device).expand(B, n, n)], dim=-1)


def _addition_features(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``XXXXX+YYYYY=`` as one-hot tokens with positions, and the answer digits ``(B, 6)``."""
    n_in = 2 * N_DIGITS + 2
    X = F.one_hot(tokens[:, :n_in], 12).to(torch.get_default_dtype())
    return with_positions(X), tokens[:, n_in:]


def _digit_logits(outputs: Tensor) -> Tensor:
    return outputs.reshape(outputs.shape[0], N_DIGITS + 1, 10)


def _addition_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(_digit_logits(outputs).flatten(0, 1), targets.flatten())


def _addition_digit_accuracy(outputs: Tensor, targets: Tensor) -> tuple[int, int]:
    return accuracy(_digit_logits(outputs), targets)


def _addition_exact_match(outputs: Tensor, targets: Tensor) -> tuple[int, int]:
    correct = (_digit_logits(outputs).argmax(-1) == targets).all(-1)
    return int(correct.sum()), correct.numel()


class _Mapped:
    """A replayable iterable applying ``fn`` to every batch of ``source``."""

    def __init__(self, source: Iterable, fn: Callable) -> None:
        self.source, self.fn = source, fn

    def __iter__(self):
        for batch in self.source:
            yield self.fn(*batch)


def make_task(name: str, *, seed: int = 0, batch_size: int = 64) -> Task:
    """Build ``digits``, ``addition`` or ``synthetic`` (see the module docstring)."""
    if name not in TASKS:
        raise EnergyInputError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}.")
    if name == "addition":
        train_batches = _Mapped(AdditionDataset(batch_size, seed=seed, n_digits=N_DIGITS),
                                lambda tokens, _t: _addition_features(tokens))
        test_raw = AdditionDataset(256, seed=10_000 + seed, carry_rich_fraction=0.0, n_digits=N_DIGITS).take(8)
        test = [_addition_features(tokens) for tokens, _ in test_raw]
        return Task(
            name, train_batches, lambda: iter(test), d_in=test[0][0].shape[-1], n_outputs=(N_DIGITS + 1) * 10,
            loss_fn=_addition_loss, metric=_addition_digit_accuracy,
            extra_metrics={"exact_match": _addition_exact_match},
            X_probe=test[0][0][:128],
            description=f"{N_DIGITS}-digit addition, 12 one-hot tokens (+ position) → 6 answer digits; "
                        "metric: per-digit accuracy on 2048 uniform test sums",
        )
    data = (load_digits_sequences(seed=seed, dtype=torch.get_default_dtype()) if name == "digits"
            else synthetic_sequence_classification(seed=seed, dtype=torch.get_default_dtype()))
    Xtr, Xte = with_positions(data.X_train), with_positions(data.X_test)
    return Task(
        name, ShuffledBatches(Xtr, data.y_train, batch_size, seed=seed),
        lambda: iterate_batches(Xte, data.y_test, 256), d_in=Xtr.shape[-1], n_outputs=data.n_classes,
        loss_fn=F.cross_entropy, metric=accuracy, extra_metrics={}, X_probe=Xte[:128],
        description=data.description + " (+ one-hot positions)",
    )


def build_model(kind: str, task: Task, *, d: int, depth: int, heads: int = 1) -> nn.Module:
    """``"unfolded"`` (yang2022 with ReLU), ``"unfolded_norelu"``, ``"unfolded_ln"`` (ReLU + LayerNorm projection),
    or ``"standard"`` (nn.TransformerEncoderLayer stack), all with the task's input width and output head.
    """
    if kind == "standard":
        return standard_encoder(d, depth, heads, task.n_outputs, d_in=task.d_in)
    variants: dict[str, dict[str, Any]] = {"unfolded": {}, "unfolded_norelu": {"relu": False},
                "unfolded_ln": {"normalization": "layernorm", "norm_eps": 1e-5}}
    if kind not in variants:
        raise EnergyInputError(f"unknown model kind {kind!r}; valid: standard, {', '.join(variants)}.")
    return yang2022(d, depth, heads=heads, d_in=task.d_in, n_classes=task.n_outputs, **variants[kind])


@torch.no_grad()
def energy_trace_summary(model: nn.Module, X: Tensor) -> dict[str, Any]:
    """Energy along a (trained) unfolded classifier on the inputs ``X``.

    Returns the mean total energy at every layer boundary (``E(Y⁰), E(Y^1 layer), …``), the fraction of
    (layer, example) pairs where the total energy decreased over a layer, the fraction of examples whose energy after
    the last layer is below the initial one, and, per step kind, the fraction of (step, example) pairs where the
    step decreased its own term (attention → ``E_att``, FFN → ``E_ffn``) and the total.
    """
    body = getattr(model, "body", None)
    if not isinstance(body, Unrolled):
        raise EnergyInputError(f"`model` must be an unfolded classifier (an Unrolled `body`, e.g. unfold.yang2022), "
                               f"got a {type(model).__name__}.")
    _, info = model(X, trace=True)
    E = info["energies"]
    S = len(body.schedule)
    total = E["total"]
    boundaries = total[::S]  # states at the start of every layer and the output
    layer_dec = (boundaries[1:] < boundaries[:-1]).double()
    own = {"attention": "E_att", "ffn": "E_ffn"}
    per_step: dict[str, dict[str, float]] = {}
    for kind in sorted(set(info["step_names"])):
        idx = [t for t, s in enumerate(info["step_names"]) if s == kind]
        entry = {"total_decreased": float((total[[t + 1 for t in idx]] < total[idx]).double().mean())}
        if kind in own:
            term = E[own[kind]]
            entry["own_term_decreased"] = float((term[[t + 1 for t in idx]] <= term[idx] + 1e-6 * term[idx].abs()
                                                 ).double().mean())
        per_step[kind] = entry
    return {
        "mean_energy_per_layer": boundaries.mean(-1).tolist(),
        "layer_decrease_fraction": float(layer_dec.mean()),
        "layer_decrease_fraction_per_layer": layer_dec.mean(-1).tolist(),
        "final_below_initial_fraction": float((boundaries[-1] < boundaries[0]).double().mean()),
        "per_step": per_step,
    }


def _mean_std(xs: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def run(*, tasks: tuple[str, ...] = ("digits", "addition"), seeds: tuple[int, ...] = (0, 1, 2), d: int = 32,
        depth: int = 4, heads: int = 1, steps: int = 500, lr: float = 3e-3, batch_size: int = 64,
        trace_variants: bool = True, progress: bool = False) -> dict[str, Any]:
    """Train and evaluate every (task, model, seed); return the report dict (see :func:`main`)."""
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for task_name in tasks:
        per_model: dict[str, Any] = {}
        for kind in ("unfolded", "unfolded_ln", "standard"):
            accs: list[float] = []
            extras: dict[str, list[float]] = {}
            traces = []
            n_params = None
            for seed in seeds:
                task = make_task(task_name, seed=seed, batch_size=batch_size)
                torch.manual_seed(seed)
                model = build_model(kind, task, d=d, depth=depth, heads=heads)
                n_params = parameter_count(model)
                res = train(model, task.loss_fn, task.train_batches, steps=steps, lr=lr, optimizer="adam", seed=seed,
                            progress=progress, desc=f"{task_name}/{kind}/seed{seed}")
                accs.append(evaluate(model, task.test_batches(), task.metric))
                for name, m in task.extra_metrics.items():
                    extras.setdefault(name, []).append(evaluate(model, task.test_batches(), m))
                if kind.startswith("unfolded"):
                    traces.append(energy_trace_summary(model.eval(), task.X_probe))
                print(f"[constraint_cost] {task_name:9s} {kind:9s} seed {seed}: test {accs[-1]:.4f} "
                      f"(final train loss {res.final_loss:.3f})", flush=True)
            per_model[kind] = {"test_accuracy": _mean_std(accs), "parameters": n_params,
                               **{k: _mean_std(v) for k, v in extras.items()}}
            if traces:
                per_model[kind]["energy_traces"] = traces
        results[task_name] = per_model
    variants: dict[str, Any] = {}
    if trace_variants:
        for kind in ("unfolded_norelu",):
            task = make_task("digits", seed=0, batch_size=batch_size)
            torch.manual_seed(0)
            model = build_model(kind, task, d=d, depth=depth, heads=heads)
            train(model, task.loss_fn, task.train_batches, steps=steps, lr=lr, optimizer="adam", seed=0,
                  progress=progress, desc=f"digits/{kind}")
            acc = evaluate(model, task.test_batches(), task.metric)
            untrained = build_model(kind, task, d=d, depth=depth, heads=heads)
            variants[kind] = {"task": "digits", "seed": 0, "test_accuracy": acc,
                              "energy_trace_trained": energy_trace_summary(model.eval(), task.X_probe),
                              "energy_trace_untrained": energy_trace_summary(untrained.eval(), task.X_probe)}
            print(f"[constraint_cost] digits    {kind}: test {acc:.4f}", flush=True)
    return {
        "settings": {"tasks": list(tasks), "seeds": list(seeds), "d": d, "depth": depth, "heads": heads,
                     "steps": steps, "lr": lr, "optimizer": "adam", "batch_size": batch_size,
                     "standard": "unfold.standard.standard_encoder (nn.TransformerEncoderLayer, d_ff = 4d, post-LN)",
                     "unfolded": "unfold.presets.yang2022 (tied, α = 1, W_f spectrum [0, 0.95], ReLU)",
                     "unfolded_ln": "the same + LayerNorm (no affine, eps 1e-5) after every layer"},
        "results": results,
        "trace_variants": variants,
        "wall_s": time.perf_counter() - t0,
        "torch": torch.__version__,
    }


def format_table(report: dict[str, Any]) -> str:
    """Markdown table of the accuracies (mean ± std over seeds) and parameter counts."""
    kinds = ("unfolded", "unfolded_ln", "standard")
    lines = ["| task | metric | unfolded (yang2022) | unfolded + LayerNorm | standard (nn.TransformerEncoderLayer) |",
             "|---|---|---|---|---|"]
    for task, per_model in report["results"].items():
        metrics = ["test_accuracy"] + [k for k in per_model["unfolded"]
                                       if k not in ("test_accuracy", "parameters", "energy_traces")]
        for m in metrics:
            cells = [f"{per_model[k][m]['mean']:.4f} ± {per_model[k][m]['std']:.4f}" for k in kinds]
            lines.append(f"| {task} | {m} | " + " | ".join(cells) + " |")
        lines.append(f"| {task} | parameters | " + " | ".join(str(per_model[k]["parameters"]) for k in kinds) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line ``python -m unfold.constraint_cost``: train every model on every task and seed, print the table.

    With ``--json OUT`` the full report of :func:`run` is also written (atomically; the path is checked writable
    before training). Returns the exit status: 0 ok, 2 a usage error, 1 a failure (one line on stderr; ``--debug``
    shows the traceback), 130 interrupted.
    """
    from energy._cli import run_command

    return run_command("python -m unfold.constraint_cost", lambda: _main(argv), argv)


def _main(argv: list[str] | None) -> int:
    from energy._cli import Parser, UsageError, check_writable_file

    parser = Parser(prog="python -m unfold.constraint_cost", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--json", metavar="OUT", help="write the report to this JSON file (atomically)")
    parser.add_argument("--tasks", default="digits,addition", help=f"comma-separated, of: {', '.join(TASKS)}")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 … N-1), at least 1")
    parser.add_argument("--d", type=int, default=32, help="token width")
    parser.add_argument("--depth", type=int, default=4, help="number of layers")
    parser.add_argument("--heads", type=int, default=1, help="attention heads")
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per model")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--no-trace-variants", action="store_true", help="skip the extra no-ReLU trace model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not tasks:
        raise UsageError(f"--tasks {args.tasks!r}: names no task; give a comma-separated list of: {', '.join(TASKS)}")
    for t in tasks:
        if t not in TASKS:
            raise UsageError(f"--tasks: unknown task {t!r}; valid tasks: {', '.join(TASKS)}")
    for name in ("seeds", "steps", "d", "depth", "heads", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}; e.g. --lr 3e-3")
    if args.json:
        check_writable_file(args.json, "--json")
    torch.set_num_threads(args.threads)
    report = run(tasks=tasks, seeds=tuple(range(args.seeds)), d=args.d, depth=args.depth, heads=args.heads,
                 steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                 trace_variants=not args.no_trace_variants, progress=args.progress)
    print(format_table(report))
    print(f"[constraint_cost] total {report['wall_s']:.1f} s")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"[constraint_cost] wrote {args.json}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
