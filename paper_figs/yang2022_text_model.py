"""The model side of the Yang et al. (2022) text figures: the weight-tied unfolded classifier and its diagnostics.

:func:`make_model` builds :func:`unfold.presets.yang2022` (12 tied layers, ``α = 1``); the functions below record
its per-layer energies (MATH §1.6, §1.8), train it with the paper's protocol (SGD, lr 1e-2, batch 1) and measure how
much its states still depend on the input (spreads, gradient norms per parameter group).
"""


from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from energy._validation import EnergyInputError
from unfold.data import (
    ShuffledBatches,
)
from unfold.presets import UnrolledClassifier, init_signal_preserving_, yang2022
from unfold.train import train
from unfold.unroller import Unrolled

__all__ = [
    "DEPTH",
    "LR",
    "GRAD_GROUPS",
    "INIT_CHOICES",
    "MeanPoolLinear",
    "classification_accuracy",
    "gradient_norms",
    "layer_energies",
    "layer_spreads",
    "layer_summary",
    "make_model",
    "pooled_features",
    "representation_spread",
    "train_classifier",
]

DEPTH = 12  # layers of the paper's model
LR = 1e-2  # SGD learning rate of the paper's training run (batch 1)


INIT_CHOICES = ("preset", "signal")


def make_model(d: int, *, relu: bool, seed: int, d_in: int | None = None, n_classes: int | None = None,
               init: str = "preset") -> UnrolledClassifier:
    """:func:`unfold.presets.yang2022` (12 tied layers, ``α = 1``) initialised from ``seed``.

    ``init="preset"`` keeps the preset's initialisation; ``init="signal"`` then applies
    :func:`unfold.presets.init_signal_preserving_` with its defaults (``W_f`` spectrum uniform in ``[0.85, 0.95]``,
    ``b = 1``, input map entries ``N(0, 1)``). The same seed gives the same weights with and without ReLU (the
    projection has no parameters).
    """
    if init not in INIT_CHOICES:
        raise EnergyInputError(f"`init` must be one of {INIT_CHOICES}, got {init!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = yang2022(d, DEPTH, relu=relu, d_in=d_in, n_classes=n_classes)
        if init == "signal":
            init_signal_preserving_(model)
    return model


@torch.no_grad()
def layer_energies(model: UnrolledClassifier, sequences: Sequence[Tensor]) -> dict[str, np.ndarray]:
    """Every energy term at the layer boundaries ``t = 0 … depth`` of every sequence, ``(N, depth + 1)`` each.

    ``Y⁰`` is the body's input (``model.embed`` of the sequence). Sequences of equal length run as one batch
    (no padding). The energies come from the unroller's trace (MATH §1.6: ``E = E_att + E_ffn``, the same
    constrained weights as the steps); state ``t·S`` (``S`` steps per layer) is the state after layer ``t``.
    """
    body: Unrolled = model.body
    S = len(body.step_kinds)
    out: dict[str, np.ndarray] = {}
    dtype = next(model.parameters()).dtype
    for idx in _length_buckets(sequences):
        X = torch.stack([sequences[i] for i in idx]).to(dtype)
        _, info = body(model.embed(X), trace=True)
        for name, E in info["energies"].items():
            arr = out.setdefault(name, np.full((len(sequences), body.depth + 1), np.nan))
            arr[idx] = E[::S].T.to(torch.float64).numpy()
    return out


def layer_summary(E: np.ndarray) -> dict[str, Any]:
    """Statistics of ``E (N, T+1)`` against depth: the mean curve, ``E − E_min`` quartiles, monotonicity."""
    gap = E - E.min(axis=1, keepdims=True)
    mean = E.mean(axis=0)
    dmean = np.diff(mean)
    return {
        "mean_E": mean,
        "mean_gap": gap.mean(axis=0),
        "gap": gap,
        "n_layers_mean_decreases": int((dmean < 0).sum()),
        "n_layers": int(len(dmean)),
        "mean_monotone": bool((dmean <= 0).all()),
        "frac_sequences_monotone": float((np.diff(E, axis=1) <= 0).all(axis=1).mean()),
        "frac_sequences_final_below_initial": float((E[:, -1] < E[:, 0]).mean()),
        "frac_steps_increasing": float((np.diff(E, axis=1) > 0).mean()),
    }


def train_classifier(
    model: torch.nn.Module, sequences: Sequence[Tensor], labels: Tensor, *, steps: int, seed: int,
    progress: bool | None = None,
) -> list[float]:
    """``steps`` SGD steps (lr 1e-2, batch 1) of the per-sequence cross-entropy of the class logits.

    The loss of one sequence is ``−log softmax(logits)[label]`` over its ``C`` classes (``F.cross_entropy`` of the
    ``(1, C)`` logits) — not the authors' flattening of all token logits into one softmax. Sequences are visited in
    seeded random order (epochs of fresh permutations), one per step. Returns the loss history.
    """
    progress = sys.stderr.isatty() if progress is None else progress
    order = ShuffledBatches(torch.arange(len(sequences)), labels, 1, seed=seed)
    dtype = next(model.parameters()).dtype
    batches = ((sequences[int(i)].unsqueeze(0).to(dtype), y) for i, y in order)
    result = train(model, F.cross_entropy, batches, steps=steps, lr=LR, optimizer="sgd", seed=seed,
                   progress=progress, desc="train yang2022 model")
    return result.history


def _length_buckets(sequences: Sequence[Tensor]) -> list[list[int]]:
    """Indices of the sequences grouped by length (each group runs as one batch, without padding)."""
    by_length: dict[int, list[int]] = {}
    for i, seq in enumerate(sequences):
        by_length.setdefault(seq.shape[0], []).append(i)
    return list(by_length.values())


@torch.no_grad()
def pooled_features(model: UnrolledClassifier, sequences: Sequence[Tensor]) -> Tensor:
    """The head's input for every sequence: the mean over tokens of the body's output, ``(N, d)``."""
    dtype = next(model.parameters()).dtype
    out = torch.empty(len(sequences), model.body.d, dtype=dtype)
    for idx in _length_buckets(sequences):
        out[idx] = model.body(model.embed(torch.stack([sequences[i] for i in idx]).to(dtype))).mean(dim=-2)
    return out


@torch.no_grad()
def classification_accuracy(model: torch.nn.Module, sequences: Sequence[Tensor], labels: Tensor) -> float:
    """Fraction of sequences whose arg-max class ``model(X)`` is the label (buckets of equal length, no padding)."""
    dtype = next(model.parameters()).dtype
    correct = 0
    for idx in _length_buckets(sequences):
        logits = model(torch.stack([sequences[i] for i in idx]).to(dtype))
        correct += int((logits.argmax(-1) == labels[idx]).sum())
    return correct / len(sequences)


@torch.no_grad()
def layer_spreads(model: UnrolledClassifier, sequences: Sequence[Tensor]) -> dict[str, np.ndarray]:
    r"""How much the states differ, at the layer boundaries ``t = 0 … depth``.

    - ``"tokens"``: mean over sequences of :math:`\|Y^t - 1\bar y^{t\top}\|_F / \|Y^t\|_F` (0: the tokens of a
      sequence have merged into one point);
    - ``"pooled"``: :math:`\|P^t - 1\bar p^{t\top}\|_F / \sqrt N` of the mean-pooled states ``P^t (N, d)``
      across sequences (absolute: the input-dependent part of what a head on layer ``t`` would see).
    """
    body: Unrolled = model.body
    dtype = next(model.parameters()).dtype
    tokens = np.zeros((len(sequences), body.depth + 1))
    pooled = torch.zeros(body.depth + 1, len(sequences), body.d, dtype=torch.float64)
    for idx in _length_buckets(sequences):
        X = torch.stack([sequences[i] for i in idx]).to(dtype)
        _, info = body(model.embed(X), trace="layer", energies=False)
        for t, Y in enumerate(info["states"]):
            Y = Y.to(torch.float64)
            dev = torch.linalg.norm(Y - Y.mean(-2, keepdim=True), dim=(-2, -1))
            tokens[idx, t] = (dev / torch.linalg.norm(Y, dim=(-2, -1)).clamp_min(1e-300)).numpy()
            pooled[t, idx] = Y.mean(-2)
    spread = torch.linalg.norm(pooled - pooled.mean(1, keepdim=True), dim=(-2, -1)) / len(sequences) ** 0.5
    return {"tokens": tokens.mean(axis=0), "pooled": spread.numpy()}


GRAD_GROUPS = ("M", "W_f", "b", "input map", "head")


def _grad_group(name: str) -> str | None:
    """The parameter group of :func:`gradient_norms` a parameter name belongs to."""
    if name.startswith("input_proj."):
        return "input map"
    if name.startswith("head."):
        return "head"
    if ".M" in name:  # "….M" or "….parametrizations.M.original"
        return "M"
    if ".W_f" in name:
        return "W_f"
    return "b" if name.endswith(".b") else None


def gradient_norms(model: UnrolledClassifier, sequences: Sequence[Tensor], labels: Tensor) -> dict[str, float]:
    """Mean over the given sequences of the per-sequence cross-entropy gradient norm of each parameter group.

    Groups (:data:`GRAD_GROUPS`): the attention factor ``M``, the unconstrained original of ``W_f``, the FFN bias
    ``b``, the input map and the head (batch 1, the loss of :func:`train_classifier`). Gradients are cleared after.
    """
    dtype = next(model.parameters()).dtype
    totals = dict.fromkeys(GRAD_GROUPS, 0.0)
    for X, y in zip(sequences, labels):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(X.unsqueeze(0).to(dtype)), y.reshape(1)).backward()
        sq = dict.fromkeys(GRAD_GROUPS, 0.0)
        for name, p in model.named_parameters():
            group = _grad_group(name)
            if group is not None and p.grad is not None:
                sq[group] += float(p.grad.to(torch.float64).pow(2).sum())
        for group in GRAD_GROUPS:
            totals[group] += sq[group] ** 0.5 / len(sequences)
    model.zero_grad(set_to_none=True)
    return totals


class MeanPoolLinear(torch.nn.Module):
    """The model without its body: ``head(mean_tokens(X W_in))`` (the reference the protocol's budget is judged by).

    The input map (omitted when ``d_in == d``, as in :class:`~unfold.presets.UnrolledClassifier`) is initialised as
    with ``init="signal"`` (entries ``N(0, 1)``); the head is ``nn.Linear``'s default.
    """

    def __init__(self, d_in: int, d: int, n_classes: int) -> None:
        super().__init__()
        self.input_proj: torch.nn.Module = torch.nn.Identity()
        if d_in != d:
            self.input_proj = torch.nn.Linear(d_in, d, bias=False)
            torch.nn.init.normal_(self.input_proj.weight)
        self.head = torch.nn.Linear(d, n_classes)

    def forward(self, X: Tensor) -> Tensor:
        return self.head(self.input_proj(X).mean(dim=-2))


def representation_spread(P: Tensor) -> float:
    r"""How much the pooled features differ between inputs: :math:`\|P - 1\bar p^\top\|_F / (\sqrt N \|\bar p\|)`.

    0 means every input is mapped to the same feature vector (the head cannot tell the classes apart).
    """
    mean = P.mean(dim=0)
    return float(torch.linalg.norm(P - mean) / (P.shape[0] ** 0.5 * torch.linalg.norm(mean).clamp_min(1e-300)))

