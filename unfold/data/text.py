"""Text data of Yang et al. (MATH §1.8): a tokenizer, word vectors, and the local IMDB / SST-2 / GloVe loaders.

Nothing is downloaded: the loaders read local paths, and a missing path raises :class:`DataNotFoundError` saying where
the data is expected and where to get it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from energy._validation import EnergyInputError, check_float_dtype


class DataNotFoundError(FileNotFoundError):
    """A local dataset is missing; the message says where it is expected and where to get it."""


__all__ = [
    "DataNotFoundError",
    "tokenize",
    "build_vocabulary",
    "WordVectors",
    "load_imdb",
    "load_sst2",
    "load_glove",
    "embed_sentences",
]


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
    check_float_dtype(dtype)
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
                row = [float(v) for v in parts[len(parts) - dim :]]
            except ValueError as err:
                raise EnergyInputError(f"{file}, line {lineno}: non-numeric vector entry ({err}).") from None
            if not all(math.isfinite(v) for v in row):
                raise EnergyInputError(
                    f"{file}, line {lineno}: the vector of {word!r} has a NaN or inf entry; GloVe vectors are finite, "
                    "so the file is corrupt: re-download it or remove that line."
                )
            rows.append(row)
            words.append(word)
            seen.add(word)
            if (max_words is not None and len(words) >= max_words) or (keep is not None and len(words) == len(keep)):
                break  # enough words, or every requested word found: skip the rest of the file
    if dim is None:
        raise EnergyInputError(f"{file} is empty; expected one 'word v1 ... vD' per line.")
    vectors = torch.tensor(rows, dtype=dtype) if rows else torch.zeros(0, dim, dtype=dtype)
    if not bool(torch.isfinite(vectors).all()):
        raise EnergyInputError(
            f"{file}: some vector entries overflow {dtype} (max |v| = {max(abs(v) for r in rows for v in r):.3g}); "
            "load with dtype=torch.float64."
        )
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
