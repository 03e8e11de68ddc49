"""Data of the Yang et al. (2022) text figures: the sequences the weight-tied model reads.

With ``--imdb``/``--sst2`` and ``--glove``: GloVe vectors of IMDB reviews and SST-2 sentences (the paper's setting).
Without them (offline stand-ins): the English dataset descriptions bundled with scikit-learn, embedded with a
seeded Gaussian table (untrained figure), and scikit-learn's handwritten digits as sequences of 8 row tokens
(trained figure). See :mod:`paper_figs.yang2022_text` for the protocol.
"""


from __future__ import annotations

import dataclasses
import importlib.resources
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from energy._validation import EnergyInputError
from paper_figs.registry import FigureConfig
from unfold.data import (
    build_vocabulary,
    embed_sentences,
    load_digits_sequences,
    load_glove,
    load_imdb,
    load_sst2,
    seeded_embedding_table,
    tokenize,
)

__all__ = ["BUNDLED_TEXT_PACKAGE", "TextSet", "bundled_text_sentences", "labels_of", "text_sets", "training_sets"]

BUNDLED_TEXT_PACKAGE = "sklearn.datasets.descr"
_MIN_TOKENS = 5

_RST_MARKUP = re.compile(r"^(\.\.|:|\||\*|-|=|\+|#|`)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def bundled_text_sentences(min_tokens: int = _MIN_TOKENS) -> tuple[list[str], str]:
    """English sentences from the dataset descriptions bundled with scikit-learn (available offline).

    The files ``sklearn/datasets/descr/*.rst`` (in sorted order) are split into paragraphs at blank lines and at
    reStructuredText markup lines (directives, field lists, tables, bullet items, section underlines, lines with
    column gaps of two spaces); each paragraph is split into sentences after ``.``, ``!`` or ``?`` followed by a
    capital letter. Sentences with fewer than ``min_tokens`` :func:`unfold.data.tokenize` tokens are dropped. The
    result is real but technical English text (some "sentences" are fragments of references).

    Returns:
        ``(sentences, description)``; the description names the scikit-learn version (the text depends on it).
    """
    import sklearn

    files = sorted(
        (p for p in importlib.resources.files(BUNDLED_TEXT_PACKAGE).iterdir() if p.name.endswith(".rst")),
        key=lambda p: p.name,
    )
    sentences: list[str] = []
    for f in files:
        paragraph: list[str] = []
        paragraphs: list[str] = []
        for line in f.read_text(encoding="utf-8").splitlines() + [""]:
            s = line.strip()
            if not s or _RST_MARKUP.match(s) or set(s) <= set("=-~^*+#| ") or "  " in s:
                if paragraph:
                    paragraphs.append(" ".join(paragraph))
                paragraph = []
            else:
                paragraph.append(s)
        for p in paragraphs:
            sentences.extend(s for s in _SENTENCE_END.split(p) if len(tokenize(s)) >= min_tokens)
    description = (
        f"{len(sentences)} sentences (>= {min_tokens} tokens) of the English dataset descriptions bundled with "
        f"scikit-learn {sklearn.__version__} (sklearn/datasets/descr/*.rst, {len(files)} files)"
    )
    return sentences, description


@dataclasses.dataclass
class TextSet:
    """Sequences of one data source, ready for the model.

    Attributes:
        name: ``"imdb"``, ``"sst2"``, ``"bundled-text"`` or ``"digits"``.
        sequences: one ``(n_i, d_in)`` tensor per sequence (no padding), float64.
        labels: class labels ``(N,)`` (``None`` for the untrained figure's bundled text).
        description: what the data is, for the caption.
    """

    name: str
    sequences: list[Tensor]
    labels: Tensor | None
    description: str


def _sample(n_total: int, n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n_total, generator=generator)[: min(n, n_total)].sort().values.tolist()


def _embed(sentences: Sequence[str], labels: Tensor | None, table: Any, max_len: int,
           name: str, description: str) -> TextSet:
    """Embed each sentence (first ``max_len`` tokens that have a vector); sentences with < 2 such tokens are dropped."""
    Y, lengths = embed_sentences(list(sentences), table, max_len)
    keep = [i for i, L in enumerate(lengths.tolist()) if L >= 2]
    seqs = [Y[i, : int(lengths[i])].to(torch.float64) for i in keep]
    lab = None if labels is None else labels[keep]
    return TextSet(name, seqs, lab, f"{description}; {len(seqs)} sequences: the first <= {max_len} tokens that have "
                                    "a vector (sentences with fewer than 2 dropped)")


def _check_text_options(cfg: FigureConfig) -> tuple[Path | None, Path | None, Path | None]:
    imdb, sst2, glove = (cfg.options.get(k) for k in ("imdb", "sst2", "glove"))
    if (imdb is not None or sst2 is not None) and glove is None:
        raise EnergyInputError(
            "--imdb/--sst2 need --glove PATH/glove.840B.300d.txt as well (the sentences are embedded with GloVe "
            "vectors); give --glove, or omit --imdb/--sst2 to run on the bundled data."
        )
    if glove is not None and imdb is None and sst2 is None:
        raise EnergyInputError("--glove was given without --imdb or --sst2; give at least one of them.")
    return imdb, sst2, glove


_RawText = tuple[str, list[str], Tensor, str]  # (name, texts, labels, description)


def _raw_text(imdb: Path | None, sst2: Path | None, *, split: str, n: int, seed: int) -> list[_RawText]:
    """``n`` seeded random IMDB reviews and SST-2 sentences of ``split``, each data set from its own files.

    ``split`` is ``"train"``, or ``"eval"`` (IMDB test / SST-2 dev).
    """
    g = torch.Generator().manual_seed(seed)
    raw: list[_RawText] = []
    if imdb is not None:
        texts, labels = load_imdb(imdb, "test" if split == "eval" else "train")
        idx = _sample(len(texts), n, g)
        raw.append(("imdb", [texts[i] for i in idx], labels[idx],
                    f"IMDB {'test' if split == 'eval' else 'train'} reviews ({imdb})"))
    if sst2 is not None:
        texts, labels = load_sst2(sst2, "dev" if split == "eval" else "train")
        idx = _sample(len(texts), n, g)
        raw.append(("sst2", [texts[i] for i in idx], labels[idx],
                    f"SST-2 {'dev' if split == 'eval' else 'train'} sentences ({sst2})"))
    return raw


def _glove_embed(groups: list[list[_RawText]], glove: Path, max_len: int) -> list[list[TextSet]]:
    """Embed every group of texts with GloVe vectors, reading the (large) GloVe file once for all of them."""
    vectors = load_glove(glove, vocab=build_vocabulary(s for raw in groups for _, texts, _, _ in raw for s in texts))
    return [
        [_embed(texts, labels, vectors, max_len, name, f"{desc}, GloVe vectors {Path(glove).name} (d={vectors.dim})")
         for name, texts, labels, desc in raw]
        for raw in groups
    ]


def text_sets(cfg: FigureConfig, *, d: int, n: int, max_len: int) -> list[TextSet]:
    """The evaluation sequences of ``yang2022-energy-untrained`` (paths given: IMDB / SST-2 with GloVe)."""
    imdb, sst2, glove = _check_text_options(cfg)
    if glove is not None:
        return _glove_embed([_raw_text(imdb, sst2, split="eval", n=n, seed=cfg.seed)], glove, max_len)[0]
    sentences, description = bundled_text_sentences()
    idx = _sample(len(sentences), n, torch.Generator().manual_seed(cfg.seed))
    chosen = [sentences[i] for i in idx]
    vocab = sorted(build_vocabulary(chosen))
    table = seeded_embedding_table(vocab, d, cfg.seed, dtype=torch.float64)
    return [_embed(chosen, None, table, max_len, "bundled-text",
                   f"{description}; {len(idx)} drawn; vectors: seeded N(0, 1/d) table ({len(vocab)} words, "
                   f"d={d}, seed={cfg.seed})")]



def labels_of(ts: TextSet) -> Tensor:
    """The class labels of ``ts``; raises if it has none (the untrained figure's bundled text is unlabelled)."""
    if ts.labels is None:
        raise ValueError(f"text set {ts.name!r} has no class labels; training needs a labelled set")
    return ts.labels


def training_sets(cfg: FigureConfig, *, steps: int, n_eval: int, max_len: int) -> list[tuple[TextSet, TextSet]]:
    """``(train, eval)`` pairs: IMDB / SST-2 with GloVe when given, else sklearn's digits."""
    imdb, sst2, glove = _check_text_options(cfg)
    if glove is not None:
        train_raw = _raw_text(imdb, sst2, split="train", n=steps, seed=cfg.seed)
        eval_raw = _raw_text(imdb, sst2, split="eval", n=n_eval, seed=cfg.seed + 1)
        train_sets, eval_sets = _glove_embed([train_raw, eval_raw], glove, max_len)
        return list(zip(train_sets, eval_sets))
    digits = load_digits_sequences(tokens="rows", seed=cfg.seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(cfg.seed)
    idx = _sample(len(digits.y_test), n_eval, g)
    return [(
        TextSet("digits", list(digits.X_train), digits.y_train, f"{digits.description} (train, {len(digits.y_train)})"),
        TextSet("digits", [digits.X_test[i] for i in idx], digits.y_test[idx],
                f"{digits.description} (test, {len(idx)} drawn)"),
    )]

