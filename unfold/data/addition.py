"""The 5-digit addition task (MATH §3.7): token sequences ``XXXXX+YYYYY=ZZZZZZ``, batches, losses, accuracy.

Seeded and offline. Token ids ``0 … 9`` are digits, :data:`PLUS` and :data:`EQUALS` the two symbols; targets outside
the answer are :data:`IGNORE_INDEX`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from energy._validation import EnergyInputError

__all__ = [
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
]


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
