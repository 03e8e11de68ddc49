"""Tasks and data: 5-digit addition, digits as token sequences, a synthetic task, and local text loaders.

Everything here is seeded and works offline. The text data of Yang et al. (IMDB / SST-2 with GloVe vectors, MATH §1.8)
cannot be downloaded on a fresh machine, so this module only *loads* it from local paths (a missing path raises
:class:`DataNotFoundError` saying where the data is expected and where to get it) and offers a documented offline
stand-in for the untrained text figure (:data:`FIXED_VOCABULARY`, :func:`zipf_sentences`,
:func:`seeded_embedding_table`).

Conventions (MATH §0): a batch of sequences of real vectors has shape ``(B, n, d)`` (tokens are rows); token ids are
``LongTensor`` of shape ``(B, n)``.

Contents:

- 5-digit addition (MATH §3.7): :func:`addition_batch`, :class:`AdditionDataset`, :func:`answer_positions`,
  :func:`addition_loss`, :func:`addition_mse_loss`, :func:`encode_addition`, :func:`decode_addition`,
  :func:`addition_operands`, :func:`answer_accuracy`.
- Sequence classification: :func:`load_digits_sequences` (sklearn's bundled 8×8 digits),
  :func:`synthetic_sequence_classification`, :class:`SequenceClassificationData`, :class:`ShuffledBatches`,
  :func:`iterate_batches`.
- Text: :func:`load_imdb`, :func:`load_sst2`, :func:`load_glove`, :class:`WordVectors`, :func:`tokenize`,
  :func:`build_vocabulary`, :func:`embed_sentences`, :func:`seeded_embedding_table`, :data:`FIXED_VOCABULARY`,
  :func:`zipf_sentences`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from energy._validation import EnergyInputError

__all__ = [
    "DataNotFoundError",
    "PLUS",
    "EQUALS",
    "ADDITION_VOCAB",
    "IGNORE_INDEX",
    "addition_length",
    "answer_positions",
    "addition_batch",
    "AdditionDataset",
    "encode_addition",
    "decode_addition",
    "addition_operands",
    "addition_loss",
    "addition_mse_loss",
    "answer_accuracy",
    "SequenceClassificationData",
    "load_digits_sequences",
    "synthetic_sequence_classification",
    "ShuffledBatches",
    "iterate_batches",
    "tokenize",
    "build_vocabulary",
    "WordVectors",
    "load_imdb",
    "load_sst2",
    "load_glove",
    "embed_sentences",
    "seeded_embedding_table",
    "FIXED_VOCABULARY",
    "zipf_sentences",
]


class DataNotFoundError(FileNotFoundError):
    """A local dataset is missing; the message says where it is expected and where to get it."""


# ----------------------------------------------------------------------------------------------------------------------
# 5-digit addition (MATH §3.7)
# ----------------------------------------------------------------------------------------------------------------------

PLUS = 10
"""Token id of ``+``."""
EQUALS = 11
"""Token id of ``=``."""
ADDITION_VOCAB = 12
"""Vocabulary of the addition task: the digits ``0``–``9`` (ids 0–9), ``+`` (10) and ``=`` (11)."""
IGNORE_INDEX = -100
"""Target value of positions that carry no loss (the ``ignore_index`` convention of ``F.cross_entropy``)."""

_SYMBOLS = "0123456789+="


def _check_n_digits(n_digits: int) -> int:
    if not isinstance(n_digits, int) or isinstance(n_digits, bool) or not 1 <= n_digits <= 17:
        raise EnergyInputError(
            f"`n_digits` must be an integer in [1, 17] (sums must fit in int64), got {n_digits!r}."
        )
    return n_digits


def addition_length(n_digits: int = 5) -> int:
    """Length of one sequence ``X…X+Y…Y=Z…Z``: ``n + 1 + n + 1 + (n + 1) = 3n + 3`` (18 for 5 digits)."""
    return 3 * _check_n_digits(n_digits) + 3


def _n_digits_from_length(length: int, name: str) -> int:
    if length < 6 or length % 3 != 0:
        raise EnergyInputError(
            f"`{name}` has sequence length {length}, which is not 3n + 3 for an n-digit addition task "
            "(18 for 5 digits); pass the full sequence produced by addition_batch."
        )
    return length // 3 - 1


def answer_positions(n_digits: int = 5) -> Tensor:
    """Positions whose next-token predictions are the ``n + 1`` answer digits.

    In ``XXXXX+YYYYY=ZZZZZZ`` the answer tokens sit at positions ``2n+2 … 3n+2`` (12…17 for 5 digits); with
    next-token prediction they are predicted by the outputs at positions ``2n+1 … 3n+1`` (11…16: the ``=`` sign and
    the first five answer digits). This returns the latter, the positions the loss is taken over.
    """
    n = _check_n_digits(n_digits)
    return torch.arange(2 * n + 1, 3 * n + 2)


def _digits_to_int(digits: Tensor) -> Tensor:
    """Integers from digit tensors ``(..., k)``, most significant digit first."""
    k = digits.shape[-1]
    powers = 10 ** torch.arange(k - 1, -1, -1, dtype=torch.int64, device=digits.device)
    return (digits.to(torch.int64) * powers).sum(-1)


def _int_to_digits(x: Tensor, k: int) -> Tensor:
    """Zero-padded ``k``-digit representation ``(..., k)`` of non-negative integers, most significant first."""
    powers = 10 ** torch.arange(k - 1, -1, -1, dtype=torch.int64, device=x.device)
    return torch.div(x.unsqueeze(-1), powers, rounding_mode="floor") % 10


def _assemble(x_digits: Tensor, y_digits: Tensor) -> tuple[Tensor, Tensor]:
    """Tokens ``x + y = z`` (with ``z`` zero-padded to n+1 digits) and their next-token targets."""
    n = x_digits.shape[-1]
    lead = x_digits.shape[:-1]
    z = _int_to_digits(_digits_to_int(x_digits) + _digits_to_int(y_digits), n + 1)
    plus = torch.full((*lead, 1), PLUS, dtype=torch.long)
    equals = torch.full((*lead, 1), EQUALS, dtype=torch.long)
    tokens = torch.cat([x_digits.long(), plus, y_digits.long(), equals, z.long()], dim=-1)
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[..., answer_positions(n)] = z.long()
    return tokens, targets


def addition_batch(
    batch_size: int,
    *,
    generator: torch.Generator,
    carry_rich: bool = False,
    n_digits: int = 5,
    carry_rich_rate: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """One batch of the addition task ``XXXXX+YYYYY=ZZZZZZ`` (MATH §3.7).

    The digits of both operands are i.i.d. uniform on ``0…9``. In a *carry-rich* batch every digit pair
    ``(x_k, y_k)`` (same place value) is, independently with probability ``carry_rich_rate`` (20 %), rewritten to
    ``y_k = 9 − x_k``: a pair summing to 9 passes an incoming carry on, so these batches contain long carry chains.
    The fraction of pairs summing to 9 is then ``rate + (1 − rate)/10`` (0.28) instead of 0.1.

    Args:
        batch_size: number of sequences ``B``.
        generator: the ``torch.Generator`` all randomness is drawn from.
        carry_rich: rewrite digit pairs as above.
        n_digits: digits per operand ``n`` (5 in the paper).
        carry_rich_rate: probability of rewriting a digit pair in a carry-rich batch.

    Returns:
        ``tokens`` ``(B, 3n+3)`` and ``targets`` ``(B, 3n+3)``, both ``LongTensor``. ``targets`` holds the next-token
        targets at the :func:`answer_positions` (``targets[:, t] = tokens[:, t+1]`` there) and
        :data:`IGNORE_INDEX` everywhere else.

    >>> tokens, targets = addition_batch(2, generator=torch.Generator().manual_seed(0))
    >>> tokens.shape, int((targets != IGNORE_INDEX).sum())
    (torch.Size([2, 18]), 12)
    """
    n = _check_n_digits(n_digits)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EnergyInputError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if not 0.0 <= carry_rich_rate <= 1.0:
        raise EnergyInputError(f"`carry_rich_rate` must lie in [0, 1], got {carry_rich_rate!r}.")
    if not isinstance(generator, torch.Generator):
        raise EnergyInputError(
            f"`generator` must be a torch.Generator, got {type(generator).__name__}; "
            "pass torch.Generator().manual_seed(seed)."
        )
    x = torch.randint(0, 10, (batch_size, n), generator=generator)
    y = torch.randint(0, 10, (batch_size, n), generator=generator)
    if carry_rich:
        rewrite = torch.rand(batch_size, n, generator=generator) < carry_rich_rate
        y = torch.where(rewrite, 9 - x, y)
    return _assemble(x, y)


class AdditionDataset:
    """Seeded, endless stream of addition batches (MATH §3.7).

    Each batch is carry-rich (see :func:`addition_batch`) with probability ``carry_rich_fraction``, decided by the same
    generator. MATH §3.7 says only that *some* batches are carry-rich; the default of one half is this project's
    choice. Every call of ``iter()`` restarts the stream from ``seed``, so two iterations yield identical batches
    (the training loop relies on this to resume a run exactly, see :func:`unfold.train.train`).

    >>> ds = AdditionDataset(4, seed=0)
    >>> a, b = next(iter(ds)), next(iter(ds))
    >>> bool((a[0] == b[0]).all())
    True
    """

    def __init__(
        self,
        batch_size: int,
        *,
        seed: int,
        carry_rich_fraction: float = 0.5,
        n_digits: int = 5,
        carry_rich_rate: float = 0.2,
    ) -> None:
        if not 0.0 <= carry_rich_fraction <= 1.0:
            raise EnergyInputError(f"`carry_rich_fraction` must lie in [0, 1], got {carry_rich_fraction!r}.")
        _check_n_digits(n_digits)
        self.batch_size = batch_size
        self.seed = seed
        self.carry_rich_fraction = carry_rich_fraction
        self.n_digits = n_digits
        self.carry_rich_rate = carry_rich_rate

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            carry_rich = bool(torch.rand((), generator=generator) < self.carry_rich_fraction)
            yield addition_batch(
                self.batch_size,
                generator=generator,
                carry_rich=carry_rich,
                n_digits=self.n_digits,
                carry_rich_rate=self.carry_rich_rate,
            )

    def take(self, n_batches: int) -> list[tuple[Tensor, Tensor]]:
        """The first ``n_batches`` batches of the stream (e.g. a fixed evaluation set with another seed)."""
        it = iter(self)
        return [next(it) for _ in range(n_batches)]


def encode_addition(a: Sequence[int] | Tensor, b: Sequence[int] | Tensor, n_digits: int = 5) -> tuple[Tensor, Tensor]:
    """Tokens and targets of the sums ``a + b`` (integers in ``[0, 10^n)``), as produced by :func:`addition_batch`."""
    n = _check_n_digits(n_digits)
    a_t = torch.as_tensor(a, dtype=torch.int64).reshape(-1)
    b_t = torch.as_tensor(b, dtype=torch.int64).reshape(-1)
    if a_t.shape != b_t.shape:
        raise EnergyInputError(f"`a` and `b` must have the same length, got {a_t.numel()} and {b_t.numel()}.")
    for name, v in (("a", a_t), ("b", b_t)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 10**n):
            raise EnergyInputError(f"`{name}` must hold integers in [0, 10^{n}) for {n}-digit addition.")
    return _assemble(_int_to_digits(a_t, n), _int_to_digits(b_t, n))


def _check_tokens(tokens: Tensor, name: str = "tokens") -> int:
    if not isinstance(tokens, Tensor) or tokens.dtype != torch.long or tokens.ndim < 1:
        raise EnergyInputError(f"`{name}` must be a LongTensor of shape (..., 3n+3).")
    return _n_digits_from_length(tokens.shape[-1], name)


def decode_addition(tokens: Tensor) -> list[str]:
    """Strings ``"XXXXX+YYYYY=ZZZZZZ"`` of a batch of token sequences ``(B, 3n+3)`` (or one sequence)."""
    _check_tokens(tokens)
    rows = tokens.reshape(-1, tokens.shape[-1]).tolist()
    if any(t < 0 or t >= ADDITION_VOCAB for row in rows for t in row):
        raise EnergyInputError(f"`tokens` must hold ids in [0, {ADDITION_VOCAB}).")
    return ["".join(_SYMBOLS[t] for t in row) for row in rows]


def addition_operands(tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The integers ``(a, b, c)`` written in ``a+b=c`` sequences ``(..., 3n+3)``; ``c`` is the written answer."""
    n = _check_tokens(tokens)
    a = _digits_to_int(tokens[..., :n])
    b = _digits_to_int(tokens[..., n + 1 : 2 * n + 1])
    c = _digits_to_int(tokens[..., 2 * n + 2 :])
    return a, b, c


def _answer_slices(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs ``(..., n+1, V)`` and target digits ``(..., n+1)`` at the answer-predicting positions."""
    if outputs.ndim != targets.ndim + 1 or outputs.shape[:-1] != targets.shape:
        raise EnergyInputError(
            f"`outputs` must have shape targets.shape + (vocab,), got outputs {tuple(outputs.shape)} and targets "
            f"{tuple(targets.shape)}."
        )
    pos = answer_positions(_n_digits_from_length(targets.shape[-1], "targets")).to(outputs.device)
    return outputs[..., pos, :], targets[..., pos]


def addition_loss(logits: Tensor, targets: Tensor) -> Tensor:
    r"""Mean cross-entropy over the ``n + 1`` answer positions (MATH §3.7).

    .. math:: \ell = -\frac{1}{B(n+1)} \sum_{b} \sum_{t \in \text{answer}} \log\mathrm{softmax}(z_{b,t})_{y_{b,t}}

    Args:
        logits: ``(B, 3n+3, V)`` model outputs.
        targets: ``(B, 3n+3)`` from :func:`addition_batch`.
    """
    z, y = _answer_slices(logits, targets)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))


def addition_mse_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    r"""Square loss against one-hot answer digits, the variant used for linear attention and the MLP (MATH §3.7).

    .. math:: \ell = \frac{1}{B (n+1) V} \sum_{b} \sum_{t \in \text{answer}} \lVert z_{b,t} - e_{y_{b,t}} \rVert^2

    (the mean over all answer entries, i.e. ``c = 1/((n+1) V)`` per sequence in the notation of MATH §3.1,
    averaged over the batch).
    """
    z, y = _answer_slices(outputs, targets)
    # written out rather than F.mse_loss: in torch 2.13 the backward of F.mse_loss fails inside
    # torch.func.jvp(torch.func.grad(...)) ("ZeroTensors are immutable"), which the Hessian tools need
    return ((z - F.one_hot(y, z.shape[-1]).to(z.dtype)) ** 2).mean()


def answer_accuracy(logits: Tensor, targets: Tensor) -> tuple[int, int]:
    """``(number of sequences whose n+1 answer digits are all predicted right, number of sequences)``.

    The predictions are the arg-max of each answer-predicting position (teacher forcing).
    """
    z, y = _answer_slices(logits, targets)
    correct = (z.argmax(-1) == y).all(-1)
    return int(correct.sum()), correct.numel()


# ----------------------------------------------------------------------------------------------------------------------
# Sequence classification: digits, synthetic task, batching
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# Text: tokenizer, word vectors, IMDB / SST-2 / GloVe loaders (MATH §1.8)
# ----------------------------------------------------------------------------------------------------------------------

_CONTRACTION = re.compile(r"(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-case the text and split it into words and punctuation marks.

    Every run of letters/digits/underscores is a word; every other non-space character is its own token; English
    contractions are split as in the Penn Treebank (``"doesn't" → ["does", "n't"]``, ``"it's" → ["it", "'s"]``),
    which is how SST-2 is written and how GloVe's vocabulary splits them.

    >>> tokenize("It's a GREAT film, isn't it?")
    ['it', "'s", 'a', 'great', 'film', ',', 'is', "n't", 'it', '?']
    """
    return _TOKEN.findall(_CONTRACTION.sub(r" \1", text.lower()))


def build_vocabulary(sentences: Iterable[str]) -> set[str]:
    """The set of :func:`tokenize` tokens of ``sentences`` (to pass as ``vocab`` to :func:`load_glove`)."""
    vocab: set[str] = set()
    for s in sentences:
        vocab.update(tokenize(s))
    return vocab


@dataclass
class WordVectors:
    """A word-embedding table: ``vectors[i]`` is the vector of ``words[i]``."""

    words: list[str]
    vectors: Tensor
    source: str = ""
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.words):
            raise EnergyInputError(
                f"`vectors` must have shape (len(words), d) = ({len(self.words)}, d), got {tuple(self.vectors.shape)}."
            )
        self.index = {}
        for i, w in enumerate(self.words):
            self.index.setdefault(w, i)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self.index

    def __getitem__(self, word: str) -> Tensor:
        return self.vectors[self.index[word]]


def _missing(what: str, path: Path, how: str) -> DataNotFoundError:
    return DataNotFoundError(f"expected {what} at {path}, but it is not there; {how}")


_IMDB_HOW = (
    "download https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz, unpack it and pass the folder "
    "with --imdb PATH/aclImdb (or path=... in Python)."
)
_SST2_HOW = (
    "download the GLUE SST-2 archive https://dl.fbaipublicfiles.com/glue/data/SST-2.zip, unzip it and pass the "
    "folder with --sst2 PATH/SST-2 (or path=... in Python)."
)
_GLOVE_HOW = (
    "download GloVe vectors, e.g. https://nlp.stanford.edu/data/glove.840B.300d.zip, unzip it and pass the .txt "
    "file with --glove PATH/glove.840B.300d.txt (or path=... in Python)."
)


def load_imdb(
    path: str | Path, split: str = "test", *, max_per_class: int | None = None
) -> tuple[list[str], Tensor]:
    """Reviews and labels of the IMDB sentiment data set (Maas et al. 2011) from its ``aclImdb`` folder.

    Expected layout: ``PATH/{train,test}/{pos,neg}/*.txt``, one review per file (``PATH`` may also be the folder
    that contains ``aclImdb``). The HTML line breaks ``<br />`` of the reviews are replaced by spaces.

    Args:
        path: the ``aclImdb`` folder.
        split: ``"train"`` or ``"test"``.
        max_per_class: read only the first ``max_per_class`` files of each class, in sorted file-name order.

    Returns:
        ``(texts, labels)`` with label 1 = positive, 0 = negative; negatives first, then positives.
    """
    if split not in ("train", "test"):
        raise EnergyInputError(f"`split` must be 'train' or 'test' for IMDB, got {split!r}.")
    root = Path(path)
    if not (root / split).is_dir() and (root / "aclImdb" / split).is_dir():
        root = root / "aclImdb"
    what = f"the aclImdb folder with {split}/pos and {split}/neg (one review per .txt file)"
    texts: list[str] = []
    labels: list[int] = []
    for label, sub in ((0, "neg"), (1, "pos")):
        folder = root / split / sub
        if not folder.is_dir():
            raise _missing(what, root, _IMDB_HOW)
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise _missing(what + f" (found no .txt file in {folder})", root, _IMDB_HOW)
        for f in files[:max_per_class]:
            texts.append(f.read_text(encoding="utf-8").replace("<br />", " "))
            labels.append(label)
    return texts, torch.tensor(labels, dtype=torch.long)


def load_sst2(path: str | Path, split: str = "dev") -> tuple[list[str], Tensor]:
    """Sentences and labels of SST-2 from the GLUE distribution (``train.tsv`` / ``dev.tsv``).

    Each file starts with the header ``sentence<TAB>label``; every further line is a sentence and its label
    (1 = positive, 0 = negative). GLUE's ``test.tsv`` has no labels and is not supported.

    Args:
        path: the ``SST-2`` folder (holding ``train.tsv`` and ``dev.tsv``) or one of the ``.tsv`` files.
        split: ``"train"`` or ``"dev"`` (ignored when ``path`` is a file).
    """
    if split not in ("train", "dev"):
        raise EnergyInputError(
            f"`split` must be 'train' or 'dev' for SST-2 (GLUE's test.tsv has no labels), got {split!r}."
        )
    p = Path(path)
    file = p if p.is_file() else p / f"{split}.tsv"
    if not file.is_file():
        raise _missing(f"the GLUE SST-2 file {split}.tsv (header 'sentence<TAB>label')", file, _SST2_HOW)
    lines = file.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip().split("\t") != ["sentence", "label"]:
        header = lines[0][:60] if lines else "<empty file>"
        raise EnergyInputError(
            f"{file} is not a GLUE SST-2 train/dev file: its header is {header!r}, expected 'sentence<TAB>label'."
        )
    sentences: list[str] = []
    labels: list[int] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        sentence, sep, label = line.rpartition("\t")
        if not sep or label.strip() not in ("0", "1"):
            raise EnergyInputError(f"{file}, line {lineno}: expected 'sentence<TAB>0|1', got {line[:80]!r}.")
        sentences.append(sentence.strip())
        labels.append(int(label))
    return sentences, torch.tensor(labels, dtype=torch.long)


def load_glove(
    path: str | Path,
    *,
    vocab: Iterable[str] | None = None,
    max_words: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> WordVectors:
    """Word vectors from a GloVe text file (one ``word v1 … vD`` per line).

    The file is read line by line and only the kept words are parsed, so memory stays bounded by
    ``len(vocab)`` (or ``max_words``) vectors even for the 5.6 GB ``glove.840B.300d.txt``. The dimension ``D`` is
    taken from the first line; a word may itself contain spaces (a few entries of the 840B file do), so the last
    ``D`` fields are the vector and everything before them is the word. The first occurrence of a word wins; reading
    stops early once every word of ``vocab`` has been found.

    Args:
        path: the ``.txt`` file.
        vocab: keep only these words (e.g. :func:`build_vocabulary` of the sentences); ``None`` keeps every word.
        max_words: stop after this many kept words (in file order; GloVe files are sorted by frequency).
        dtype: dtype of the vectors.
    """
    file = Path(path)
    if not file.is_file():
        raise _missing("a GloVe text file (one 'word v1 ... vD' per line)", file, _GLOVE_HOW)
    if max_words is not None and (not isinstance(max_words, int) or max_words < 1):
        raise EnergyInputError(f"`max_words` must be a positive integer or None, got {max_words!r}.")
    keep = None if vocab is None else set(vocab)
    words: list[str] = []
    rows: list[list[float]] = []
    seen: set[str] = set()
    dim: int | None = None
    with file.open(encoding="utf-8", errors="replace") as fh:  # a stray invalid byte must not abort a 5 GB read
        for lineno, line in enumerate(fh, start=1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if parts == [""]:
                continue
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise EnergyInputError(f"{file}, line 1: expected 'word v1 ... vD', got {line[:80]!r}.")
            if len(parts) < dim + 1:
                raise EnergyInputError(
                    f"{file}, line {lineno}: expected a word and {dim} numbers (as on line 1), got {len(parts)} fields."
                )
            word = " ".join(parts[: len(parts) - dim])
            if (keep is not None and word not in keep) or word in seen:
                continue
            try:
                rows.append([float(v) for v in parts[len(parts) - dim :]])
            except ValueError as err:
                raise EnergyInputError(f"{file}, line {lineno}: non-numeric vector entry ({err}).") from None
            words.append(word)
            seen.add(word)
            if (max_words is not None and len(words) >= max_words) or (keep is not None and len(words) == len(keep)):
                break  # enough words, or every requested word found: skip the rest of the file
    if dim is None:
        raise EnergyInputError(f"{file} is empty; expected one 'word v1 ... vD' per line.")
    vectors = torch.tensor(rows, dtype=dtype) if rows else torch.zeros(0, dim, dtype=dtype)
    return WordVectors(words, vectors, source=str(file))


def embed_sentences(
    sentences: Sequence[str] | Sequence[Sequence[str]],
    vectors: WordVectors,
    max_len: int,
) -> tuple[Tensor, Tensor]:
    """Embed sentences as zero-padded token matrices ``Y (B, max_len, d)``.

    Each sentence is split by :func:`tokenize` (or taken as is if it is already a list of tokens); tokens without a
    vector are dropped, then the first ``max_len`` remaining tokens are embedded; rows beyond a sentence's length are 0.

    Returns:
        ``(Y, lengths)``: ``Y`` of shape ``(B, max_len, d)`` in the dtype of the table, and ``lengths`` ``(B,)`` the
        number of embedded tokens (0 if no token of the sentence is in the table — filter those out before use).
    """
    if not isinstance(max_len, int) or max_len < 1:
        raise EnergyInputError(f"`max_len` must be a positive integer, got {max_len!r}.")
    Y = torch.zeros(len(sentences), max_len, vectors.dim, dtype=vectors.vectors.dtype)
    lengths = torch.zeros(len(sentences), dtype=torch.long)
    for b, s in enumerate(sentences):
        toks = tokenize(s) if isinstance(s, str) else list(s)
        ids = [vectors.index[t] for t in toks if t in vectors.index][:max_len]
        if ids:
            Y[b, : len(ids)] = vectors.vectors[torch.tensor(ids)]
        lengths[b] = len(ids)
    return Y, lengths


# ----------------------------------------------------------------------------------------------------------------------
# Offline stand-in for the untrained text figure
# ----------------------------------------------------------------------------------------------------------------------

FIXED_VOCABULARY: tuple[str, ...] = tuple(
    """the , . a and of to is in it that this 's i was as with for but film movie on are his have he be one
    not all at by an they you who from so like has her there or about what if out just some more very up when
    can time she good story which would only its even were no their my had than much been we will do most other
    well also bad into great how make see first get people characters best two love because really way any
    plot life many could after then me did too does n't never little better made man something these work
    acting them where being while scenes through show""".split()
)
"""A fixed vocabulary of 122 English tokens for the offline text figure.

It was written for this project as a list of very frequent words and punctuation marks of English film reviews
(articles, pronouns, auxiliaries, prepositions, conjunctions, ``,`` ``.`` ``'s`` ``n't``, and common review words such
as "film", "movie", "story", "plot", "acting", "good", "bad", "great"), ordered roughly from most to least frequent.
The order is used as the frequency rank by :func:`zipf_sentences`. It carries no vectors: pair it with
:func:`seeded_embedding_table`.
"""


def seeded_embedding_table(
    vocab: Sequence[str], d: int, seed: int, *, std: float | None = None, dtype: torch.dtype = torch.float32
) -> WordVectors:
    r"""A random embedding table: every word gets an i.i.d. Gaussian vector, ``v_w \sim N(0, \mathrm{std}^2 I_d)``.

    ``std`` defaults to ``1/√d`` (vectors of norm ≈ 1). The vectors are drawn in the order of ``vocab`` from
    ``torch.Generator().manual_seed(seed)``, so the table depends only on ``(vocab, d, seed, std)``. Duplicate words
    are rejected.
    """
    if not isinstance(d, int) or d < 1:
        raise EnergyInputError(f"`d` must be a positive integer, got {d!r}.")
    words = list(vocab)
    if len(set(words)) != len(words):
        raise EnergyInputError("`vocab` contains duplicate words; pass each word once.")
    sigma = 1.0 / math.sqrt(d) if std is None else float(std)
    if not sigma > 0:
        raise EnergyInputError(f"`std` must be positive, got {std!r}.")
    gen = torch.Generator().manual_seed(seed)
    vectors = sigma * torch.randn(len(words), d, generator=gen, dtype=torch.float64)
    return WordVectors(words, vectors.to(dtype), source=f"seeded N(0, {sigma:.4g}²) table, d={d}, seed={seed}")


def zipf_sentences(
    n_sentences: int,
    *,
    vocab: Sequence[str] = FIXED_VOCABULARY,
    min_len: int = 5,
    max_len: int = 40,
    exponent: float = 1.0,
    seed: int = 0,
) -> list[list[str]]:
    r"""Random token sequences with English-like (Zipf) word frequencies, for the offline text figure.

    Each sentence has a length uniform on ``[min_len, max_len]`` and i.i.d. tokens, the ``k``-th word of ``vocab``
    (rank ``k = 1, 2, …``) drawn with probability ``∝ k^{-exponent}``. These are *not* real sentences: they have
    no syntax, only the repetition statistics of text (frequent words recur within a sentence).
    """
    if not isinstance(n_sentences, int) or n_sentences < 1:
        raise EnergyInputError(f"`n_sentences` must be a positive integer, got {n_sentences!r}.")
    if not 1 <= min_len <= max_len:
        raise EnergyInputError(f"need 1 ≤ min_len ≤ max_len, got min_len={min_len!r}, max_len={max_len!r}.")
    words = list(vocab)
    gen = torch.Generator().manual_seed(seed)
    p = torch.arange(1, len(words) + 1, dtype=torch.float64) ** (-exponent)
    lengths = torch.randint(min_len, max_len + 1, (n_sentences,), generator=gen)
    out = []
    for L in lengths.tolist():
        ids = torch.multinomial(p, L, replacement=True, generator=gen)
        out.append([words[i] for i in ids.tolist()])
    return out
