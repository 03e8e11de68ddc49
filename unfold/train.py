"""A small, readable training loop with seeded, exactly resumable checkpoints.

:func:`train` runs ``steps`` optimiser steps of ``loss_fn(model(inputs), targets)`` over an iterable of
``(inputs, targets)`` batches, with a ``tqdm`` progress bar. With ``checkpoint=PATH`` it saves, every
``checkpoint_every`` steps and at the end, one file holding the model and optimiser state dicts, the step, the loss
history and the state of torch's random number generator; a later call with the same arguments resumes from it and
reproduces the uninterrupted run exactly (same parameters and loss history, bit for bit).

Checkpoints are model files of :mod:`unfold.modelfile` (one format for models and checkpoints) with the training
state, written atomically by :func:`energy._io.atomic_write`, so an interrupted save never leaves a half-written
checkpoint. Loading validates the *whole* checkpoint against the model and optimiser
(format, keys, shapes, dtypes, optimiser kind and state) before anything is copied, and rolls back if the copy fails:
a corrupt or mismatched checkpoint raises :class:`CheckpointError` and leaves the model untouched.

Exact resume needs batches that can be replayed: ``iter(batches)`` must yield the same sequence every time it is
called (as :class:`unfold.data.AdditionDataset`, :class:`unfold.data.ShuffledBatches` and lists do); on resume from
step ``k`` the first ``k`` batches are skipped.

``unfold.train`` is this module (``import unfold.train`` and ``unfold.train`` name the same thing); the loop is
``unfold.train.train(...)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from energy._validation import EnergyInputError
from unfold.data import IGNORE_INDEX
from unfold.modelfile import (
    FORMAT,
    CheckpointError,
    builder_of,
    check_state_dict,
    read_model_file,
    safe_load_state_dict,
    write_model_file,
)

__all__ = [
    "CheckpointError",
    "TrainResult",
    "train",
    "evaluate",
    "accuracy",
    "make_optimizer",
    "save_checkpoint",
    "load_checkpoint",
    "validate_state_dict",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = FORMAT
"""Value of the ``"format"`` entry of every checkpoint written by this module: the one model-file format of
:mod:`unfold.modelfile` (``"unfold.train.checkpoint/1"`` before its version 2; such files are still read)."""


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        history: training loss of every step ``1 … steps`` (including the steps done before a resume).
        steps: number of optimiser steps done in total.
        resumed_from: the step of the checkpoint the run resumed from (``None`` for a fresh run).
        checkpoint: path of the checkpoint file, if any.
    """

    history: list[float]
    steps: int
    resumed_from: int | None = None
    checkpoint: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Loss of the last step (``nan`` if no step was done)."""
        return self.history[-1] if self.history else math.nan


def make_optimizer(model: nn.Module, name: Literal["sgd", "adam"], lr: float) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` (plain, no momentum) or ``torch.optim.Adam`` (default betas) over the model's parameters."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise EnergyInputError(f"`lr` must be a positive finite number, got {lr!r}.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EnergyInputError("the model has no trainable parameters (requires_grad=True); nothing to train.")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise EnergyInputError(f"`optimizer` must be 'sgd' or 'adam', got {name!r}.")


# ----------------------------------------------------------------------------------------------------- checkpoints


def validate_state_dict(model: nn.Module, state: object, *, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``state`` can be loaded into ``model`` exactly as it is
    (:func:`unfold.modelfile.check_state_dict`: keys, tensors, dtypes, shapes, finite values). Nothing is loaded.
    """
    check_state_dict(model, state, source=source,
                     hint=", or start afresh (resume=False (--no-resume on the command line))")


def _validate_optimizer_state(optimizer: torch.optim.Optimizer, state: object, source: str) -> None:
    """The optimiser state must have the same parameter groups and per-parameter tensors shaped like the params."""
    if not isinstance(state, Mapping) or not {"state", "param_groups"} <= state.keys():
        raise CheckpointError(f"{source}: the optimizer state is not a torch optimizer state dict.")
    groups, ours = state["param_groups"], optimizer.param_groups
    if len(groups) != len(ours) or any(len(g.get("params", ())) != len(o["params"]) for g, o in zip(groups, ours)):
        raise CheckpointError(f"{source}: the optimizer state has other parameter groups than this optimizer.")
    params = [p for g in ours for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    by_id = dict(zip(ids, params))
    for pid, pstate in state["state"].items():
        if pid not in by_id or not isinstance(pstate, Mapping):
            raise CheckpointError(f"{source}: the optimizer state refers to an unknown parameter {pid!r}.")
        for name, value in pstate.items():
            if isinstance(value, Tensor) and value.ndim > 0 and value.shape != by_id[pid].shape:
                raise CheckpointError(
                    f"{source}: optimizer state {name!r} of parameter {pid} has shape {tuple(value.shape)}, "
                    f"the parameter has shape {tuple(by_id[pid].shape)}."
                )


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    expect_meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate a checkpoint completely, then load it into ``model`` (and ``optimizer``); all or nothing.

    Args:
        path: the checkpoint file written by :func:`save_checkpoint` / :func:`train` (any version
            :func:`unfold.modelfile.read_model_file` reads).
        model: receives the model state.
        optimizer: receives the optimiser state (``None``: weights only).
        expect_meta: entries the checkpoint's ``meta`` must have (e.g. the optimiser kind, lr and seed of the run).

    Returns:
        The training state (``step``, ``history``, ``rng_state``, ``meta``, ``optimizer``) plus ``model`` (the
        state dict). The RNG state is returned, not applied.

    Raises:
        CheckpointError: unreadable, foreign, or mismatched checkpoint; the model and optimiser are then unchanged.
    """
    payload = read_model_file(path, training=True)
    ckpt = {**payload["training"], "model": payload["state_dict"]}
    source = f"checkpoint {Path(path)}"
    for key, value in (expect_meta or {}).items():
        if ckpt["meta"].get(key) != value:
            raise CheckpointError(
                f"{source} was written by a run with {key}={ckpt['meta'].get(key)!r}, this run has {key}={value!r}; "
                "resuming would not continue the same run. Use the original settings, or pass resume=False "
                "(--no-resume on the command line) "
                "(or delete the file) to start afresh."
            )
    validate_state_dict(model, ckpt["model"], source=source)
    if optimizer is not None:
        _validate_optimizer_state(optimizer, ckpt["optimizer"], source)
    model_backup = {k: v.clone() for k, v in model.state_dict().items()}
    optim_backup = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    try:
        safe_load_state_dict(model, ckpt["model"], source=source)
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
    except Exception as err:  # e.g. a parametrisation refusing a value: roll back, so nothing is half-loaded
        nn.Module.load_state_dict(model, model_backup)
        if optimizer is not None and optim_backup is not None:
            optimizer.load_state_dict(optim_backup)
        raise CheckpointError(
            f"{source} could not be loaded ({type(err).__name__}: {err}); nothing was changed."
        ) from err
    return ckpt


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    history: list[float],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write model, optimiser, step, loss history, meta data and torch's RNG state to ``path`` as one model file
    (:mod:`unfold.modelfile`; atomic, fsync-ed; with builder and config when the model has a registered builder, so
    :func:`unfold.load_model` opens it too).
    """
    builder, config = builder_of(model)
    training = {"optimizer": optimizer.state_dict(), "step": int(step), "rng_state": torch.get_rng_state(),
                "history": [float(h) for h in history], "meta": dict(meta or {})}
    return write_model_file(path, model.state_dict(), builder=builder, config=config, training=training)


# ------------------------------------------------------------------------------------------------------- training


def _call(model: nn.Module, inputs: object) -> Tensor:
    """``model(*inputs)`` for a tuple/list of inputs (e.g. ``(Y, lengths)``), else ``model(inputs)``."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def check_class_targets(outputs: Tensor, targets: object, where: str) -> None:
    """Raise :class:`EnergyInputError` if integer class ``targets`` (shape ``outputs.shape[:-1]``, classes last)
    lie outside ``[0, C)`` with ``C = outputs.shape[-1]`` (``IGNORE_INDEX`` allowed). Other targets pass unchecked.
    """
    if (not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool
            or outputs.ndim != targets.ndim + 1 or outputs.shape[:-1] != targets.shape or targets.numel() == 0):
        return
    C = outputs.shape[-1]
    bad = ((targets < 0) | (targets >= C)) & (targets != IGNORE_INDEX)
    if bool(bad.any()):
        first = int(targets[bad].flatten()[0])
        raise EnergyInputError(
            f"`targets` of {where} contain class {first} but the model outputs C = {C} classes (targets must lie in "
            f"[0, {C - 1}], or be IGNORE_INDEX = {IGNORE_INDEX}); build the model with n_classes ≥ "
            f"{int(targets.max()) + 1} or fix the labels."
        )


def _batches_ran_out(k: int) -> EnergyInputError:
    return EnergyInputError(
        f"`batches` ran out after {k} batches; pass an endless iterable (e.g. unfold.data.AdditionDataset or "
        "ShuffledBatches) or at least `steps` batches."
    )


def train(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: Iterable[tuple[Any, Tensor]],
    *,
    steps: int,
    lr: float,
    optimizer: Literal["sgd", "adam"] = "sgd",
    seed: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` for ``steps`` optimiser steps; seeded, with optional exact checkpoint/resume.

    Each step draws the next ``(inputs, targets)`` batch, computes ``loss_fn(model(inputs), targets)`` (a tuple of
    inputs is unpacked: ``model(*inputs)``), back-propagates and takes one optimiser step. The global (CPU) torch RNG
    is seeded with ``seed`` for the run (dropout etc.) and restored afterwards, so the caller's random state is
    untouched. Model initialisation happens before, outside this function; seed it yourself.

    Args:
        model: the ``nn.Module`` to train (in place).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g. :func:`unfold.data.addition_loss` or
            ``torch.nn.functional.cross_entropy``.
        batches: iterable of ``(inputs, targets)``; replayable for exact resume (see the module docstring).
        steps: total number of optimiser steps of the run (including those done before a resume).
        lr: learning rate.
        optimizer: ``"sgd"`` (plain SGD) or ``"adam"``.
        seed: seed of torch's global RNG during the run.
        checkpoint: file to save to / resume from; ``None`` disables checkpointing.
        checkpoint_every: also save every this many steps (the final state is always saved).
        resume: continue from ``checkpoint`` if it exists (after validating it); ``False`` starts afresh and
            overwrites it.
        progress: show a ``tqdm`` progress bar.
        desc: label of the progress bar.

    Raises:
        CheckpointError: the checkpoint is corrupt or belongs to another model / optimiser / lr / seed.
        FloatingPointError: the loss became NaN or inf (lower the learning rate).
    """
    if not isinstance(model, nn.Module):
        raise EnergyInputError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise EnergyInputError(f"`loss_fn` must be callable as loss_fn(outputs, targets) -> scalar tensor, got "
                               f"{type(loss_fn).__name__} {loss_fn!r}; pass e.g. torch.nn.functional.cross_entropy.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EnergyInputError(f"`steps` must be a positive integer, got {steps!r}.")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise EnergyInputError(f"`checkpoint_every` must be a positive integer or None, got {checkpoint_every!r}.")
    opt = make_optimizer(model, optimizer, lr)
    meta = {"optimizer": optimizer, "lr": float(lr), "seed": int(seed)}
    path = None if checkpoint is None else Path(checkpoint)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        history: list[float] = []
        start = 0
        resumed_from = None
        if path is not None and resume and path.exists():
            ckpt = load_checkpoint(path, model, opt, expect_meta=meta)
            start, history = ckpt["step"], list(ckpt["history"])
            if start > steps:
                raise CheckpointError(
                    f"checkpoint {path} is at step {start}, beyond the requested steps={steps}; ask for at least "
                    f"{start} steps or start afresh (resume=False (--no-resume on the command line))."
                )
            torch.set_rng_state(ckpt["rng_state"])
            resumed_from = start

        it = iter(batches)
        for k in range(start):  # replay the batches the checkpointed run already consumed
            if next(it, None) is None:
                raise _batches_ran_out(k)

        model.train()
        with tqdm(total=steps, initial=start, desc=desc, disable=not progress, leave=False) as bar:
            for step in range(start, steps):
                batch = next(it, None)
                if batch is None:
                    raise _batches_ran_out(step)
                inputs, targets = batch
                opt.zero_grad(set_to_none=True)
                outputs = _call(model, inputs)
                check_class_targets(outputs, targets, f"batch {step}")
                loss = loss_fn(outputs, targets)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the training loss became {float(loss.detach())} at step {step + 1} (lr={lr}); "
                        "lower the learning rate."
                    )
                loss.backward()
                opt.step()
                history.append(float(loss.detach()))
                bar.update(1)
                if step % max(1, steps // 100) == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{history[-1]:.4g}")
                done = step + 1
                if path is not None and checkpoint_every is not None and done % checkpoint_every == 0:
                    save_checkpoint(path, model, opt, step=done, history=history, meta=meta)
        if path is not None and not (checkpoint_every is not None and steps % checkpoint_every == 0 and steps > start):
            save_checkpoint(path, model, opt, step=steps, history=history, meta=meta)
    return TrainResult(history=history, steps=steps, resumed_from=resumed_from, checkpoint=path, meta=meta)


# ----------------------------------------------------------------------------------------------------- evaluation


def accuracy(outputs: Tensor, targets: Tensor) -> tuple[int, int]:
    """``(correct, counted)`` of arg-max predictions.

    Works for class logits ``(B, C)`` with labels ``(B,)`` and for per-token logits ``(B, n, V)`` with targets
    ``(B, n)``; positions whose target is :data:`unfold.data.IGNORE_INDEX` are not counted.
    """
    if outputs.ndim != targets.ndim + 1 or outputs.shape[:-1] != targets.shape:
        raise EnergyInputError(
            f"`outputs` must have shape targets.shape + (classes,), got {tuple(outputs.shape)} and "
            f"{tuple(targets.shape)}."
        )
    check_class_targets(outputs, targets, "this batch")
    counted = targets != IGNORE_INDEX
    correct = (outputs.argmax(-1) == targets) & counted
    return int(correct.sum()), int(counted.sum())


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Any, Tensor]],
    metric: Callable[[Tensor, Tensor], tuple[int, int]] = accuracy,
    *,
    max_batches: int | None = None,
) -> float:
    """``Σ correct / Σ counted`` of ``metric(model(inputs), targets)`` over the batches, in eval mode without grad.

    ``metric`` returns ``(correct, counted)`` per batch (:func:`accuracy`, :func:`unfold.data.answer_accuracy`).
    ``max_batches`` limits endless iterables. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    correct = counted = 0
    try:
        with torch.no_grad():
            for k, (inputs, targets) in enumerate(batches):
                if max_batches is not None and k >= max_batches:
                    break
                c, n = metric(_call(model, inputs), targets)
                correct, counted = correct + c, counted + n
    finally:
        model.train(was_training)
    if counted == 0:
        raise EnergyInputError("`batches` produced nothing to evaluate (no batch, or every target ignored).")
    return correct / counted
