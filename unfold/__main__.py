"""``python -m unfold``: train an unfolded model on an offline task, or trace its energy layer by layer.

Examples::

    python -m unfold train --task digits --d 32 --depth 4 --steps 300 --checkpoint runs/digits.ckpt --save runs/m.pt
    python -m unfold trace --model runs/m.pt --task digits --plot runs/trace.png
    python -m unfold trace --preset yang2022 --d 16 --depth 6 --task synthetic --json trace.json

``train`` uses :func:`unfold.train.train` (seeded; with ``--checkpoint`` it saves every ``--checkpoint-every`` steps
and resumes from an existing checkpoint of the same run) and writes the trained model with
:func:`unfold.unroller.save_model` (``--save``). ``trace`` loads such a model (or builds a fresh preset), runs the
forward pass with ``trace=True`` on test inputs of the task and prints the mean of every energy term at every state
(and optionally plots the per-layer total energy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from energy._io import atomic_write, atomic_write_text
from energy._validation import EnergyInputError
from unfold.constraint_cost import TASKS, make_task
from unfold.modelfile import CheckpointError, load_model, save_model
from unfold.presets import UnrolledClassifier, energy_transformer_block, yang2022
from unfold.train import evaluate, train

PRESETS = ("yang2022", "energy_transformer")


def _build(args: argparse.Namespace, d_in: int, n_outputs: int) -> UnrolledClassifier:
    if args.preset == "yang2022":
        return yang2022(args.d, args.depth, relu=not args.no_relu, heads=args.heads, d_in=d_in, n_classes=n_outputs,
                        normalization=args.normalization, norm_eps=args.norm_eps, tied=not args.untied)
    return energy_transformer_block(args.d, args.depth, heads=args.heads, d_in=d_in, n_classes=n_outputs)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default="yang2022", help="model preset (default: yang2022)")
    p.add_argument("--d", type=int, default=32, help="token width")
    p.add_argument("--depth", type=int, default=4, help="number of layers")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--no-relu", action="store_true", help="yang2022 without the ReLU projection")
    p.add_argument("--normalization", choices=("layernorm", "rmsnorm"), default=None,
                   help="projection at the end of every layer (yang2022)")
    p.add_argument("--norm-eps", type=float, default=1e-5,
                   help="eps of that normalisation (0 = the exact projection, undefined for constant tokens)")
    p.add_argument("--untied", action="store_true", help="one set of weights per layer")
    p.add_argument("--task", choices=TASKS, default="digits")
    p.add_argument("--seed", type=int, default=0)


def _check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(args, name)
        if v is not None and v <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {v}")


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``train``: build the preset, train it on the task (checkpoint / resume), print the test accuracy, save it."""
    _check_positive(parser, args, ("d", "depth", "heads", "steps", "lr", "batch_size", "checkpoint_every"))
    task = make_task(args.task, seed=args.seed, batch_size=args.batch_size)
    torch.manual_seed(args.seed)
    model = _build(args, task.d_in, task.n_outputs)
    print(f"[unfold] task: {task.description}")
    print(f"[unfold] model: {args.preset}, d={args.d}, depth={args.depth}, schedule={model.body.schedule}")
    res = train(model, task.loss_fn, task.train_batches, steps=args.steps, lr=args.lr, optimizer=args.optimizer,
                seed=args.seed, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                resume=not args.no_resume, progress=not args.quiet, desc=f"{args.task}/{args.preset}")
    if res.resumed_from is not None:
        print(f"[unfold] resumed from step {res.resumed_from}")
    acc = evaluate(model, task.test_batches(), task.metric)
    print(f"[unfold] final train loss {res.final_loss:.4f}; test accuracy {acc:.4f}")
    if args.save:
        save_model(model, args.save, extra={"task": args.task, "seed": args.seed, "test_accuracy": acc})
        print(f"[unfold] saved model to {args.save}")
    return 0


def _trace_table(info: dict[str, Any], S: int) -> tuple[list[str], dict[str, list[float]]]:
    energies = {k: v.mean(-1).tolist() for k, v in info["energies"].items()}
    names = list(energies)
    header = f"{'t':>4} {'layer':>5} {'after step':>11} " + " ".join(f"{n:>12}" for n in names) + "  Δtotal"
    lines = [header, "-" * len(header)]
    total = energies["total"]
    for t in range(len(info["states"])):
        step = "input" if t == 0 else info["step_names"][t - 1]
        layer = "" if t == 0 else str((t - 1) // S)
        delta = "" if t == 0 else f"{total[t] - total[t - 1]:+.4g}" + ("  ↑" if total[t] > total[t - 1] else "")
        lines.append(f"{t:>4} {layer:>5} {step:>11} " + " ".join(f"{energies[n][t]:>12.5g}" for n in names)
                     + f"  {delta}")
    return lines, energies


def cmd_trace(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``trace``: the per-state energy table of a saved (``--model``) or fresh model on probe inputs of the task.

    Optionally writes the mean energies as JSON (``--json``) and a per-layer plot of the total energy (``--plot``).
    """
    _check_positive(parser, args, ("d", "depth", "heads", "n"))
    task = make_task(args.task, seed=args.seed)
    if args.model:
        model = load_model(args.model)
        if not isinstance(model, UnrolledClassifier):
            parser.error(f"{args.model} holds a {type(model).__name__}, expected an UnrolledClassifier")
        if model.d_in != task.d_in:
            parser.error(f"{args.model} expects inputs of width {model.d_in}, task {args.task!r} has {task.d_in}; "
                         "use the task the model was trained on")
    else:
        torch.manual_seed(args.seed)
        model = _build(args, task.d_in, task.n_outputs)
    X = task.X_probe[: args.n]
    model.eval()
    with torch.no_grad():
        _, info = model(X, trace=True)
    S = len(model.body.schedule)
    lines, energies = _trace_table(info, S)
    print(f"[unfold] energy per state, mean over {X.shape[0]} test inputs of {args.task!r} "
          f"(schedule {model.body.schedule} × {model.body.depth}; ↑ = total increased)")
    print("\n".join(lines))
    boundaries = info["energies"]["total"][::S]
    frac = float((boundaries[1:] < boundaries[:-1]).double().mean())
    print(f"[unfold] total energy decreased over {100 * frac:.1f}% of (layer, input) pairs")
    if args.json:
        out = {"schedule": model.body.schedule, "depth": model.body.depth, "step_names": info["step_names"],
               "mean_energies": energies, "layer_decrease_fraction": frac}
        atomic_write_text(args.json, json.dumps(out, indent=2))
        print(f"[unfold] wrote {args.json}")
    if args.plot:
        plot_layer_energy(info["energies"]["total"][::S], args.plot, title=f"{args.task}: E = E_att + E_ffn per layer")
        print(f"[unfold] wrote {args.plot}")
    return 0


def plot_layer_energy(E_layers: torch.Tensor, path: str | os.PathLike[str], *, title: str = "") -> None:
    """Mean line plus box plots (no fliers) of ``E(Y^ℓ) − min`` over inputs, per layer ``ℓ`` (as MATH §1.8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E = E_layers.detach().double()
    rel = (E - E.min()).numpy()  # (layers + 1, inputs)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.boxplot(list(rel), positions=list(range(rel.shape[0])), showfliers=False)
    ax.plot(range(rel.shape[0]), rel.mean(-1), "o-", color="C3", label="mean")
    ax.set_xlabel("layer ℓ")
    ax.set_ylabel("E(Yˡ) − E_min")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=120))
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command line ``python -m unfold {train,trace}``: parse ``argv`` and run the sub-command; its exit status."""
    parser = argparse.ArgumentParser(prog="python -m unfold", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a preset on a task (checkpoint / resume)")
    _add_model_args(p_train)
    p_train.add_argument("--steps", type=int, default=300)
    p_train.add_argument("--lr", type=float, default=3e-3)
    p_train.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p_train.add_argument("--batch-size", type=int, default=64)
    p_train.add_argument("--checkpoint", default=None, help="training checkpoint (saved, and resumed if it exists)")
    p_train.add_argument("--checkpoint-every", type=int, default=None)
    p_train.add_argument("--no-resume", action="store_true", help="start afresh even if the checkpoint exists")
    p_train.add_argument("--save", default=None, help="write the trained model here (for `trace --model`)")
    p_train.add_argument("--quiet", action="store_true", help="no progress bar")
    p_trace = sub.add_parser("trace", help="per-layer energy table of a saved or fresh model")
    _add_model_args(p_trace)
    p_trace.add_argument("--model", default=None, help="model file written by `train --save`")
    p_trace.add_argument("--n", type=int, default=64, help="number of test inputs")
    p_trace.add_argument("--plot", default=None, help="PNG path for the per-layer energy plot")
    p_trace.add_argument("--json", default=None, help="write the mean energies to this JSON file")
    args = parser.parse_args(argv)
    try:
        return cmd_train(args, parser) if args.command == "train" else cmd_trace(args, parser)
    except (CheckpointError, EnergyInputError) as exc:  # clear one-line errors, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
