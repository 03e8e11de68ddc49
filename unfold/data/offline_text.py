"""A documented offline stand-in for the text data of the untrained text figure (MATH §1.8): a fixed vocabulary,
Zipf-distributed sentences over it, and a seeded embedding table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from energy._validation import EnergyInputError, check_float_dtype
from unfold.data.text import WordVectors

__all__ = [
    "FIXED_VOCABULARY",
    "seeded_embedding_table",
    "zipf_sentences",
]


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
    check_float_dtype(dtype)
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
