r"""The tasks of the constraint-cost study (MATH §1.7): train / validation / test splits, all offline and seeded.

* ``digits`` — scikit-learn's 8×8 digits, each image a sequence of 8 row tokens (8 pixels / 16), 10 classes. The
  seeded stratified split of :func:`unfold.data.load_digits_sequences` gives train and test; 15 % of the train part
  (stratified, seeded) is held out as the validation split.
* ``addition`` — 5-digit addition ``XXXXX+YYYYY=`` → the 6 answer digits, predicted at once from the pooled
  representation (6 × 10-way; metric: per-digit accuracy, plus exact match of all six digits); train batches from
  :class:`unfold.data.AdditionDataset` (half of them carry-rich), validation on 1,024 and test on 2,048 fresh uniform
  sums of two other seeds.
* ``text`` — **synthetic** sentiment with negation (:func:`negation_sentiment`): sentences of 12 words of the
  fixed English vocabulary :data:`unfold.data.FIXED_VOCABULARY` as seeded word vectors, label = the polarity of the
  one opinion word, flipped when the sentence holds a negator. It is not real text: it is a seeded generative rule
  that needs context (every single word is independent of the label; a bag of words is at chance).
* ``synthetic`` — :func:`unfold.data.synthetic_sequence_classification` (planted prototypes).

Every token gets a one-hot position appended (the models are permutation-equivariant and mean-pool, so without it
the row order of a digit, the place value of a digit or the scope of a negator would be invisible to every model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from energy._validation import EnergyInputError
from unfold.data import (
    FIXED_VOCABULARY,
    AdditionDataset,
    ShuffledBatches,
    iterate_batches,
    load_digits_sequences,
    seeded_embedding_table,
    synthetic_sequence_classification,
)
from unfold.data.sequences import _seeded_split
from unfold.train import accuracy

__all__ = [
    "TASKS",
    "N_DIGITS",
    "Task",
    "make_task",
    "with_positions",
    "negation_sentiment",
    "POSITIVE_WORDS",
    "NEGATIVE_WORDS",
    "NEGATORS",
]

TASKS = ("digits", "addition", "text", "synthetic")
N_DIGITS = 5

#: Opinion words of the synthetic text task and their polarity (+1 / −1); every word is in ``FIXED_VOCABULARY``.
POSITIVE_WORDS: tuple[str, ...] = ("good", "great", "best", "love", "better", "well")
NEGATIVE_WORDS: tuple[str, ...] = ("bad",)
#: Words that flip the polarity of the sentence's opinion word.
NEGATORS: tuple[str, ...] = ("not", "n't", "never", "no")


@dataclass
class Task:
    """A supervised task in the form the training loop takes.

    Attributes:
        name: task name.
        train_batches: replayable endless iterable of ``(X, y)``.
        val_batches: callable returning a fresh iterable of validation batches (used to pick the learning rate).
        test_batches: callable returning a fresh iterable of test batches.
        d_in: input feature width.
        n_outputs: width of the model's output (classes, or 6·10 for addition).
        loss_fn: ``loss_fn(outputs, targets)``.
        metric: ``metric(outputs, targets) -> (correct, counted)``.
        extra_metrics: further named metrics (e.g. exact match).
        X_probe: a fixed batch of test inputs (energy traces and certificates).
        description: one line.
    """

    name: str
    train_batches: Iterable[tuple[Tensor, Tensor]]
    val_batches: Callable[[], Iterable[tuple[Tensor, Tensor]]]
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


# ----------------------------------------------------------------------------------------------------------- addition


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

    def __init__(self, source: Iterable[tuple[Tensor, Tensor]],
                 fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> None:
        self.source, self.fn = source, fn

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for a, b in self.source:
            yield self.fn(a, b)


def _fixed_addition(seed: int, n_batches: int) -> list[tuple[Tensor, Tensor]]:
    raw = AdditionDataset(256, seed=seed, carry_rich_fraction=0.0, n_digits=N_DIGITS).take(n_batches)
    return [_addition_features(tokens) for tokens, _ in raw]


def _addition_task(seed: int, batch_size: int) -> Task:
    train = _Mapped(AdditionDataset(batch_size, seed=seed, n_digits=N_DIGITS), lambda t, _y: _addition_features(t))
    val, test = _fixed_addition(20_000 + seed, 4), _fixed_addition(10_000 + seed, 8)
    return Task(
        "addition", train, lambda: iter(val), lambda: iter(test), d_in=test[0][0].shape[-1],
        n_outputs=(N_DIGITS + 1) * 10, loss_fn=_addition_loss, metric=_addition_digit_accuracy,
        extra_metrics={"exact_match": _addition_exact_match}, X_probe=test[0][0][:128],
        description=f"{N_DIGITS}-digit addition, 12 one-hot tokens (+ position) → 6 answer digits; metric: per-digit "
                    "accuracy on 2048 uniform test sums (validation: 1024 sums of another seed)",
    )


# --------------------------------------------------------------------------------------------- synthetic text task


def negation_sentiment(n: int, *, seed: int, length: int = 12) -> tuple[list[list[str]], Tensor]:
    r"""Seeded synthetic sentences whose sentiment label needs context: one opinion word, flipped by a negation.

    Each sentence has ``length`` words of :data:`unfold.data.FIXED_VOCABULARY`: one opinion word (positive or
    negative with probability ½ each, uniform within :data:`POSITIVE_WORDS` / :data:`NEGATIVE_WORDS`), with
    probability ½ one negator (uniform in :data:`NEGATORS`), and filler words (the other vocabulary words, Zipf
    frequencies: rank ``k`` with probability ``∝ 1/k``), all at seeded random positions. With the polarity
    :math:`s = \pm 1` and the negation flag :math:`\nu \in \{0, 1\}`,

    .. math:: y = \mathbb 1\big[s\,(-1)^{\nu} > 0\big] .

    ``s`` and ``ν`` are independent and uniform, so every single word is independent of the label: a linear
    classifier on word counts (bag of words) is at chance (measured: 0.49–0.51), and a model must combine the opinion
    word with the negator it sees elsewhere in the sentence (an exclusive or of two words). This is a synthetic
    stand-in for sentence-level negation in sentiment, not real text (MATH §1.7).

    Returns:
        ``(sentences, labels)`` with ``labels`` a ``LongTensor`` of 0/1.
    """
    if not isinstance(length, int) or length < 2:
        raise EnergyInputError(f"`length` must be an integer ≥ 2 (an opinion word and a negator), got {length!r}.")
    special = set(POSITIVE_WORDS) | set(NEGATIVE_WORDS) | set(NEGATORS)
    fillers = [w for w in FIXED_VOCABULARY if w not in special]
    zipf = torch.arange(1, len(fillers) + 1, dtype=torch.float64).reciprocal()
    gen = torch.Generator().manual_seed(seed)

    def pick(words: tuple[str, ...]) -> str:
        return words[int(torch.randint(len(words), (), generator=gen))]

    sentences, labels = [], []
    for _ in range(n):
        positive = bool(torch.rand((), generator=gen) < 0.5)
        negated = bool(torch.rand((), generator=gen) < 0.5)
        words = [pick(POSITIVE_WORDS if positive else NEGATIVE_WORDS)] + ([pick(NEGATORS)] if negated else [])
        picks = torch.multinomial(zipf, length - len(words), replacement=True, generator=gen).tolist()
        words += [fillers[k] for k in picks]
        order = torch.randperm(length, generator=gen).tolist()
        sentences.append([words[k] for k in order])
        labels.append(int(positive != negated))
    return sentences, torch.tensor(labels, dtype=torch.long)


def _text_task(seed: int, batch_size: int, d_embed: int = 16) -> Task:
    table = seeded_embedding_table(FIXED_VOCABULARY, d_embed, seed=1234, dtype=torch.get_default_dtype())

    def encode(sentences: list[list[str]]) -> Tensor:
        ids = torch.tensor([[table.index[w] for w in s] for s in sentences], dtype=torch.long)
        return with_positions(table.vectors[ids])

    splits = {}
    for k, (name, size) in enumerate((("train", 2000), ("val", 500), ("test", 1000))):
        sentences, labels = negation_sentiment(size, seed=1000 * seed + k)
        splits[name] = (encode(sentences), labels)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = splits["train"], splits["val"], splits["test"]
    return Task(
        "text", ShuffledBatches(Xtr, ytr, batch_size, seed=seed), lambda: iterate_batches(Xva, yva, 256),
        lambda: iterate_batches(Xte, yte, 256), d_in=Xtr.shape[-1], n_outputs=2, loss_fn=F.cross_entropy,
        metric=accuracy, extra_metrics={}, X_probe=Xte[:128],
        description=f"synthetic sentiment with negation (negation_sentiment; not real text): 12 words of a "
                    f"fixed English vocabulary as seeded N(0, I/{d_embed}) vectors (+ one-hot positions), 2 classes; "
                    "2000 train / 500 validation / 1000 test sentences",
    )


# ----------------------------------------------------------------------------------------- classification tasks


def _classification_task(name: str, seed: int, batch_size: int) -> Task:
    dtype = torch.get_default_dtype()
    data = (load_digits_sequences(seed=seed, dtype=dtype) if name == "digits"
            else synthetic_sequence_classification(seed=seed, dtype=dtype))
    keep, held = _seeded_split(data.y_train.numel(), data.y_train, 0.15, seed + 7919)  # stratified
    Xall = with_positions(data.X_train)
    Xtr, ytr, Xva, yva = Xall[keep], data.y_train[keep], Xall[held], data.y_train[held]
    Xte = with_positions(data.X_test)
    return Task(
        name, ShuffledBatches(Xtr, ytr, batch_size, seed=seed), lambda: iterate_batches(Xva, yva, 256),
        lambda: iterate_batches(Xte, data.y_test, 256), d_in=Xtr.shape[-1], n_outputs=data.n_classes,
        loss_fn=F.cross_entropy, metric=accuracy, extra_metrics={}, X_probe=Xte[:128],
        description=data.description + f" (+ one-hot positions); {len(held)} of the {len(data.y_train)} train "
                    "examples held out for validation",
    )


def make_task(name: str, *, seed: int = 0, batch_size: int = 64) -> Task:
    """Build ``digits``, ``addition``, ``text`` or ``synthetic`` (see the module docstring)."""
    if name not in TASKS:
        raise EnergyInputError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}.")
    if name == "addition":
        return _addition_task(seed, batch_size)
    if name == "text":
        return _text_task(seed, batch_size)
    return _classification_task(name, seed, batch_size)
