"""Sequence classification data: scikit-learn's 8×8 digits as row tokens, a synthetic task, and replayable batching.

Conventions (MATH §0): a batch of sequences of real vectors has shape ``(B, n, d)`` (tokens are rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from energy._validation import EnergyInputError, check_float_dtype

__all__ = [
    "SequenceClassificationData",
    "load_digits_sequences",
    "synthetic_sequence_classification",
    "ShuffledBatches",
    "iterate_batches",
]


@dataclass
class SequenceClassificationData:
    """A train/test split of sequences ``X (N, n, d)`` with integer labels ``y (N,)``."""

    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    n_classes: int
    description: str = ""

    @property
    def n_tokens(self) -> int:
        return self.X_train.shape[1]

    @property
    def d(self) -> int:
        return self.X_train.shape[2]


def _seeded_split(n: int, labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Stratified split: within each class, a seeded permutation sends ``round(test_fraction·n_c)`` items to test."""
    if not 0.0 < test_fraction < 1.0:
        raise EnergyInputError(f"`test_fraction` must lie in (0, 1), got {test_fraction!r}.")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = round(test_fraction * idx.numel())
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def load_digits_sequences(
    *, tokens: str = "rows", test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32
) -> SequenceClassificationData:
    """scikit-learn's bundled handwritten digits (1,797 images of 8×8 pixels, 10 classes) as token sequences.

    The data ships with scikit-learn (``sklearn.datasets.load_digits``), so it is available offline.
    Pixel intensities (0…16) are divided by 16, giving values in [0, 1]; no other preprocessing.

    Args:
        tokens: ``"rows"`` — each image is a sequence of 8 tokens (its rows) with 8 features (the pixels of the row);
            ``"half-rows"`` — 16 tokens of 4 features (each row split into its left and right half, read in order).
        test_fraction: fraction of each class held out as the test set (stratified, seeded split).
        seed: seed of the split.
        dtype: floating dtype of the features.
    """
    from sklearn.datasets import load_digits

    if tokens not in ("rows", "half-rows"):
        raise EnergyInputError(
            f"`tokens` must be 'rows' (8 tokens × 8 features) or 'half-rows' (16 × 4), got {tokens!r}."
        )
    check_float_dtype(dtype)
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=dtype) / 16.0  # (N, 8, 8)
    X = images if tokens == "rows" else images.reshape(-1, 16, 4)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    train, test = _seeded_split(len(y), y, test_fraction, seed)
    shape = "8 tokens (rows) × 8 features" if tokens == "rows" else "16 tokens (half rows) × 4 features"
    return SequenceClassificationData(
        X[train], y[train], X[test], y[test], n_classes=10,
        description=f"sklearn digits, {shape}, pixels/16, stratified split test_fraction={test_fraction}, seed={seed}",
    )


def synthetic_sequence_classification(
    n_train: int = 512,
    n_test: int = 512,
    *,
    n_tokens: int = 8,
    d: int = 8,
    n_classes: int = 4,
    n_signal: int = 2,
    signal: float = 3.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SequenceClassificationData:
    r"""A seeded "planted prototype" sequence-classification task.

    Rule: draw ``n_classes`` prototype directions ``u_c`` (i.i.d. Gaussian, normalised to unit length) once from the
    seed. A sequence of class ``c`` (uniform) has ``n_tokens`` i.i.d. ``N(0, I_d)`` tokens, of which ``n_signal``
    positions (uniform, without replacement) additionally carry ``signal · u_c``:

    .. math:: x_i = \varepsilon_i + \mathbb{1}[i \in S]\, s\, u_c,\qquad \varepsilon_i \sim N(0, I_d),\ |S| = k.

    The label is ``c``. It is learnable: the mean token already separates the classes (by ``s k / n`` along
    ``u_c``), and a model that attends to the signal tokens does better. Train and test share the prototypes.
    """
    for name, v in (("n_train", n_train), ("n_test", n_test), ("n_tokens", n_tokens), ("d", d)):
        if not isinstance(v, int) or v < 1:
            raise EnergyInputError(f"`{name}` must be a positive integer, got {v!r}.")
    if not isinstance(n_classes, int) or n_classes < 2:
        raise EnergyInputError(f"`n_classes` must be an integer ≥ 2, got {n_classes!r}.")
    if not isinstance(n_signal, int) or not 1 <= n_signal <= n_tokens:
        raise EnergyInputError(f"`n_signal` must be an integer in [1, n_tokens={n_tokens}], got {n_signal!r}.")
    check_float_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(n_classes, d, generator=gen, dtype=torch.float64)
    U = U / U.norm(dim=1, keepdim=True)

    def sample(m: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, n_classes, (m,), generator=gen)
        X = torch.randn(m, n_tokens, d, generator=gen, dtype=torch.float64)
        S = torch.rand(m, n_tokens, generator=gen).argsort(dim=1)[:, :n_signal]  # uniform subsets of size k
        planted = torch.zeros(m, n_tokens, dtype=torch.float64).scatter_(1, S, 1.0)
        X = X + signal * planted.unsqueeze(-1) * U[y].unsqueeze(1)
        return X.to(dtype), y

    X_train, y_train = sample(n_train)
    X_test, y_test = sample(n_test)
    return SequenceClassificationData(
        X_train, y_train, X_test, y_test, n_classes=n_classes,
        description=(
            f"planted prototypes: {n_tokens} tokens of N(0, I_{d}), {n_signal} of them + {signal}·u_c, "
            f"{n_classes} classes, seed={seed}"
        ),
    )


class ShuffledBatches:
    """Endless mini-batches ``(X[idx], y[idx])``: each epoch a fresh seeded permutation, full batches only.

    Every call of ``iter()`` restarts from ``seed`` (so a training run can be resumed exactly).
    """

    def __init__(self, X: Tensor, y: Tensor, batch_size: int, *, seed: int) -> None:
        if X.shape[0] != y.shape[0]:
            raise EnergyInputError(f"`X` and `y` must have the same length, got {X.shape[0]} and {y.shape[0]}.")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= X.shape[0]:
            raise EnergyInputError(
                f"`batch_size` must be an integer in [1, {X.shape[0]}] (the number of examples), got {batch_size!r}."
            )
        self.X, self.y, self.batch_size, self.seed = X, y, batch_size, seed

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        N, B = self.X.shape[0], self.batch_size
        while True:
            perm = torch.randperm(N, generator=gen)
            for start in range(0, N - B + 1, B):
                idx = perm[start : start + B]
                yield self.X[idx], self.y[idx]


def iterate_batches(X: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive batches of ``(X, y)`` in order, the last one possibly smaller (for evaluation)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EnergyInputError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    for start in range(0, X.shape[0], batch_size):
        yield X[start : start + batch_size], y[start : start + batch_size]
