"""``python -m unfold``: train an unfolded model on an offline task, or trace its energy layer by layer.

Examples::

    python -m unfold train --task digits --d 32 --depth 4 --steps 300 --checkpoint runs/digits.ckpt --save runs/m.pt
    python -m unfold train --family learned_steps --heads 4 --option tied=false --certificate runs/cert.json
    python -m unfold trace --model runs/m.pt --task digits --plot runs/trace.png
    python -m unfold trace --preset yang2022 --d 16 --depth 6 --task synthetic --json trace.json

``train`` uses :func:`unfold.train.train` (seeded; with ``--checkpoint`` it saves every ``--checkpoint-every`` steps
and resumes from an existing checkpoint of the same run) and writes the trained model with
:func:`unfold.unroller.save_model` (``--save``). ``--family NAME`` builds a model family of :mod:`unfold.families`
instead of ``--preset`` (family options as ``--option KEY=VALUE``, the value read as JSON, e.g. ``tied=false``);
after training the descent certificate (:func:`unfold.certificate.descent_certificate`) on the probe inputs is
summarised, and written as JSON with ``--certificate``. ``trace`` loads such a model (or builds a fresh preset),
runs the forward pass with ``trace=True`` on test inputs of the task and prints the mean of every energy term at
every state (and optionally plots the per-layer total energy with :func:`unfold.plot_trace`).

Installed as the console script ``unfold``. Every output path (``--save``, ``--checkpoint``, ``--json``, ``--plot``)
is checked writable before anything is computed. With ``trace --model`` the model file fixes the architecture and
the task: a flag that contradicts it (``--d``, ``--depth``, ``--task`` ...) is an error, and ``--task`` defaults to
the task the model was trained on. Errors are one line on stderr (exit 2 for usage errors, 1 for failures;
``--debug`` shows the traceback); Ctrl-C during ``train`` says whether a checkpoint holds the run and how to resume
(exit 130).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from energy._cli import Interrupted, Parser, UsageError, check_writable_file, prog_name, run_command
from energy._io import atomic_write_text
from energy._validation import EnergyInputError
from unfold.certificate import descent_certificate
from unfold.constraint_cost import TASKS, make_task
from unfold.families import build_classifier, family_names
from unfold.modelfile import CheckpointError, load_model, read_model_file, save_model
from unfold.plotting import plot_trace
from unfold.presets import UnrolledClassifier, energy_transformer_block, yang2022
from unfold.train import evaluate, train

PRESETS = ("yang2022", "energy_transformer")

#: ``--norm-eps`` defaults to the API's default (:func:`unfold.presets.yang2022`), so the two cannot disagree.
NORM_EPS_DEFAULT: float = inspect.signature(yang2022).parameters["norm_eps"].default

#: The flags that describe the architecture (checked against the model file by ``trace --model``).
MODEL_FLAGS = ("preset", "family", "d", "depth", "heads", "no_relu", "normalization", "norm_eps", "untied")

#: the preset flags that a family does not take (it fixes its own schedule; its options go through --option)
_PRESET_ONLY = {"no_relu": "--no-relu", "normalization": "--normalization", "untied": "--untied"}


def _family_options(items: Sequence[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs as keyword arguments (the value as JSON, else as a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE, e.g. --option tied=false")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.replace("-", "_")] = tuple(value) if isinstance(value, list) else value
    return out


def _check_family_flags(args: argparse.Namespace) -> None:
    """``--family`` / ``--option`` against the preset flags, before anything is computed."""
    if getattr(args, "family", None) is None:
        if getattr(args, "option", None):
            raise UsageError("--option: only for --family (family options); drop it or pass --family NAME")
        return
    if args.family not in family_names():
        raise UsageError(f"--family {args.family}: unknown family; valid families: {', '.join(family_names())}")
    given = [flag for dest, flag in _PRESET_ONLY.items() if getattr(args, dest)]
    given += ["--preset"] if args.preset != "yang2022" else []
    if given:
        raise UsageError(f"{', '.join(given)}: does not apply to --family {args.family} (a family fixes its "
                         "schedule); drop it, or pass family options as --option KEY=VALUE")
    _family_options(args.option)


def _build(args: argparse.Namespace, d_in: int, n_outputs: int) -> UnrolledClassifier:
    _check_family_flags(args)
    if args.family is not None:
        return build_classifier(args.family, d_in=d_in, d=args.d, depth=args.depth, heads=args.heads,
                                n_outputs=n_outputs, **_family_options(args.option))
    if args.preset == "yang2022":
        return yang2022(args.d, args.depth, relu=not args.no_relu, heads=args.heads, d_in=d_in, n_classes=n_outputs,
                        normalization=args.normalization, norm_eps=args.norm_eps, tied=not args.untied)
    return energy_transformer_block(args.d, args.depth, heads=args.heads, d_in=d_in, n_classes=n_outputs)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default="yang2022", help="model preset")
    p.add_argument("--family", default=None, metavar="NAME",
                   help=f"model family of unfold.families instead of a preset ({', '.join(family_names())})")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a family option (repeatable; the value as JSON), e.g. --option tied=false")
    p.add_argument("--d", type=int, default=32, help="token width")
    p.add_argument("--depth", type=int, default=4, help="number of layers")
    p.add_argument("--heads", type=int, default=1, help="attention heads")
    p.add_argument("--no-relu", action="store_true", help="yang2022 without the ReLU projection")
    p.add_argument("--normalization", choices=("layernorm", "rmsnorm"), default=None,
                   help="projection at the end of every layer (yang2022)")
    p.add_argument("--norm-eps", type=float, default=NORM_EPS_DEFAULT,
                   help="eps of that normalisation, as in unfold.yang2022 (0 = the exact projection, undefined for "
                        "constant tokens; 1e-5 is nn.LayerNorm's)")
    p.add_argument("--untied", action="store_true", help="one set of weights per layer")
    p.add_argument("--task", choices=TASKS, default="digits",
                   help="offline task (trace --model: the task the model was trained on)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation")


def _check_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {v}; give a number > 0")


def _cli_message(exc: Exception, command: str) -> str:
    """A library message in command-line words (``resume=False`` is the flag ``--no-resume``)."""
    text = str(exc).replace(" (--no-resume on the command line)", "")  # the API message names both; keep the flag
    if command != "train":  # resuming is not a choice of this command: drop the hint
        text = re.sub(r"\s*\(or pass resume=False[^)]*\)", "", text)
        text = re.sub(r",? or start afresh \(resume=False\)", "", text)
    return text.replace("resume=False", "--no-resume")


def _checkpoint_note(path: str | None) -> str:
    if path is None:
        return "nothing was saved (pass --checkpoint PATH to make a run resumable)"
    if not Path(path).is_file():
        return (f"no checkpoint was written yet at {path} (one is written every --checkpoint-every steps); "
                "rerun the same command to start again")
    try:
        step = read_model_file(path, training=True)["training"]["step"]
        held = f" holds step {step}"
    except CheckpointError:
        held = ""
    return f"the checkpoint {path}{held}; rerun the same command to resume from it (--no-resume starts afresh)"


def cmd_train(args: argparse.Namespace) -> int:
    """``train``: build the preset, train it on the task (checkpoint / resume), print the test accuracy, save it."""
    _check_positive(args, ("d", "depth", "heads", "steps", "lr", "batch_size", "checkpoint_every"))
    _check_family_flags(args)
    if args.save:
        check_writable_file(args.save, "--save")
    if args.checkpoint:
        check_writable_file(args.checkpoint, "--checkpoint")
    if args.certificate:
        check_writable_file(args.certificate, "--certificate")
    task = make_task(args.task, seed=args.seed, batch_size=args.batch_size)
    torch.manual_seed(args.seed)
    model = _build(args, task.d_in, task.n_outputs)
    print(f"[unfold] task: {task.description}")
    print(f"[unfold] model: {args.family or args.preset}, d={args.d}, depth={args.depth}, "
          f"schedule={model.body.schedule}")
    try:
        res = train(model, task.loss_fn, task.train_batches, steps=args.steps, lr=args.lr, optimizer=args.optimizer,
                    seed=args.seed, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                    resume=not args.no_resume, progress=not args.quiet, desc=f"{args.task}/{args.preset}")
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        raise Interrupted(f"training stopped before step {args.steps}; {_checkpoint_note(args.checkpoint)}") from None
    if res.resumed_from is not None:
        print(f"[unfold] resumed from step {res.resumed_from}")
    acc = evaluate(model, task.test_batches(), task.metric)
    print(f"[unfold] final train loss {res.final_loss:.4f}; test accuracy {acc:.4f}")
    model.eval()
    cert = descent_certificate(model, task.X_probe)
    print(f"[unfold] certificate: {cert.summary()}")
    if args.certificate:
        atomic_write_text(args.certificate, cert.to_json())
        print(f"[unfold] wrote the certificate to {args.certificate}")
    if args.save:
        save_model(model, args.save, extra={"task": args.task, "seed": args.seed, "test_accuracy": acc})
        print(f"[unfold] saved model to {args.save}")
    return 0


def _model_flags(model: UnrolledClassifier) -> dict[str, Any]:
    """The values of :data:`MODEL_FLAGS` that describe ``model``."""
    cfg = model.body.config()
    kinds = [entry[0] for entry in cfg["schedule"]]
    kwargs = [entry[1] for entry in cfg["schedule"]]
    norm = next((k for k in kinds if k in ("layernorm", "rmsnorm")), None)
    return {
        "preset": "energy_transformer" if "energy_transformer" in kinds else "yang2022",
        "family": model.family,
        "d": cfg["d"],
        "depth": cfg["depth"],
        "heads": kwargs[0].get("heads", 1) if kwargs else 1,
        "no_relu": "relu" not in kinds,
        "normalization": norm,
        "norm_eps": kwargs[kinds.index(norm)].get("eps") if norm else None,
        "untied": not cfg["tied"],
    }


def _check_against_model(explicit: dict[str, Any], model: UnrolledClassifier, path: str) -> None:
    """Raise if a flag given on the command line contradicts the model read from ``path``."""
    saved = _model_flags(model)
    bad = {k: v for k, v in explicit.items() if k in saved and saved[k] != v}
    if bad:
        given = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in bad.items())
        has = ", ".join(f"{k.replace('_', '-')}={saved[k]}" for k in bad)
        raise UsageError(f"{given}: contradicts the model in --model {path} ({has}); drop these flags (the model "
                         "file fixes the architecture) or trace a model trained with them")


def _explicit_flags(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: Sequence[str]) -> dict[
        str, Any]:
    """The model flags given on the command line (``argv`` re-parsed with the defaults of ``sub`` suppressed)."""
    for action in sub._actions:
        if action.dest in MODEL_FLAGS or action.dest == "task":
            action.default = argparse.SUPPRESS
    ns = parser.parse_args(list(argv))
    return {k: v for k, v in vars(ns).items() if k in MODEL_FLAGS or k == "task"}


def _load_for_trace(args: argparse.Namespace, explicit: dict[str, Any]) -> tuple[UnrolledClassifier, str]:
    """Load ``--model``, check the flags and the task against it; returns the model and the task name."""
    try:
        extra = read_model_file(args.model).get("extra") or {}
        model = load_model(args.model)
    except CheckpointError as exc:
        raise UsageError(f"--model {args.model}: {_cli_message(exc, 'trace')}") from None
    if not isinstance(model, UnrolledClassifier):
        raise UsageError(f"--model {args.model}: holds a {type(model).__name__}, expected an UnrolledClassifier "
                         "(a file written by `unfold train --save`)")
    _check_against_model({k: v for k, v in explicit.items() if k != "task"}, model, args.model)
    trained_on = extra.get("task")
    task_name = args.task
    if trained_on in TASKS:
        if "task" in explicit and explicit["task"] != trained_on:
            other = make_task(explicit["task"], seed=args.seed)
            raise UsageError(
                f"--task {explicit['task']}: contradicts --model {args.model}, trained on task {trained_on!r} "
                f"({model.n_classes} outputs, inputs of width {model.d_in}; {explicit['task']!r} has "
                f"{other.n_outputs} and {other.d_in}); pass --task {trained_on} or omit --task")
        task_name = trained_on
    return model, task_name


def cmd_trace(args: argparse.Namespace, explicit: dict[str, Any]) -> int:
    """``trace``: the per-state energy table of a saved (``--model``) or fresh model on probe inputs of the task.

    Optionally writes the mean energies as JSON (``--json``) and a per-layer plot of the total energy (``--plot``).
    """
    _check_positive(args, ("d", "depth", "heads", "n"))
    _check_family_flags(args)
    if args.json:
        check_writable_file(args.json, "--json")
    if args.plot:
        check_writable_file(args.plot, "--plot")
    if args.model:
        model, task_name = _load_for_trace(args, explicit)
        task = make_task(task_name, seed=args.seed)
        if model.d_in != task.d_in or model.n_classes != task.n_outputs:
            raise UsageError(f"--task {task_name}: has inputs of width {task.d_in} and {task.n_outputs} outputs, but "
                             f"--model {args.model} expects width {model.d_in} and {model.n_classes} outputs; pass "
                             "the task the model was trained on")
    else:
        task_name = args.task
        task = make_task(task_name, seed=args.seed)
        torch.manual_seed(args.seed)
        model = _build(args, task.d_in, task.n_outputs)
    X = task.X_probe[: args.n]
    model.eval()
    with torch.no_grad():
        _, info = model(X, trace=True)
    S = len(model.body.schedule)
    lines, energies = _trace_table(info, S)
    print(f"[unfold] energy per state, mean over {X.shape[0]} test inputs of {task_name!r} "
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
        plot_trace(info, args.plot, title=f"{task_name}: E = E_att + E_ffn per layer")
        print(f"[unfold] wrote {args.plot}")
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


def build_parser(prog: str = "python -m unfold") -> tuple[Parser, dict[str, Parser]]:
    """The parser of ``python -m unfold`` and its sub-parsers ``{"train": ..., "trace": ...}``."""
    parser = Parser(prog=prog, description=(__doc__ or "").split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p_train = sub.add_parser("train", help="train a preset on a task (checkpoint / resume)")
    _add_model_args(p_train)
    p_train.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p_train.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    p_train.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="optimizer")
    p_train.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p_train.add_argument("--checkpoint", default=None, help="training checkpoint (saved, and resumed if it exists)")
    p_train.add_argument("--checkpoint-every", type=int, default=None,
                         help="steps between checkpoints (None: unfold.train's default)")
    p_train.add_argument("--no-resume", action="store_true", help="start afresh even if the checkpoint exists")
    p_train.add_argument("--save", default=None, help="write the trained model here (for `trace --model`)")
    p_train.add_argument("--certificate", default=None,
                         help="write the descent certificate on the probe inputs here (JSON)")
    p_train.add_argument("--quiet", action="store_true", help="no progress bar")
    p_trace = sub.add_parser("trace", help="per-layer energy table of a saved or fresh model")
    _add_model_args(p_trace)
    p_trace.add_argument("--model", default=None, help="model file written by `train --save`")
    p_trace.add_argument("--n", type=int, default=64, help="number of test inputs")
    p_trace.add_argument("--plot", default=None, help="picture path for the per-layer energy plot (PNG, PDF, ...)")
    p_trace.add_argument("--json", default=None, help="write the mean energies to this JSON file")
    return parser, {"train": p_train, "trace": p_trace}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line ``python -m unfold {train,trace}``: parse ``argv`` and run the sub-command; its exit status.

    0 ok, 1 a failure, 2 a usage error (one line on stderr; ``--debug`` shows the traceback), 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog_name("python -m unfold", "unfold")

    def body() -> int:
        parser, subs = build_parser(prog)
        args = parser.parse_args(argv)
        try:
            if args.command == "train":
                return cmd_train(args)
            explicit = _explicit_flags(parser, subs["trace"], argv)
            return cmd_trace(args, explicit)
        except (CheckpointError, EnergyInputError) as exc:  # bad flags or files: a usage error, in CLI words
            if getattr(args, "debug", False):
                raise
            text = _cli_message(exc, args.command)
            if isinstance(exc, CheckpointError) and args.command == "train" and "--no-resume" not in text:
                text += (f" Fix: give the flags of the run that wrote --checkpoint {args.checkpoint}, or pass "
                         "--no-resume to start afresh (overwrites it).")
            raise UsageError(text) from None

    return run_command(prog, body, argv)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
