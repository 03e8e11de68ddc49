"""Tasks and data: 5-digit addition, digits as token sequences, a synthetic task, and local text loaders.

Everything here is seeded and works offline. The text data of Yang et al. (IMDB / SST-2 with GloVe vectors, MATH §1.8)
cannot be downloaded on a fresh machine, so this module only *loads* it from local paths (a missing path raises
:class:`DataNotFoundError` saying where the data is expected and where to get it) and offers a documented offline
stand-in for the untrained text figure (:data:`FIXED_VOCABULARY`, :func:`zipf_sentences`,
:func:`seeded_embedding_table`).

Conventions (MATH §0): a batch of sequences of real vectors has shape ``(B, n, d)`` (tokens are rows); token ids are
``LongTensor`` of shape ``(B, n)``.

Contents (one submodule per concern; every name is re-exported here, so ``from unfold.data import X`` works):

- :mod:`unfold.data.addition` — 5-digit addition (MATH §3.7): :func:`addition_batch`, :class:`AdditionDataset`,
  :func:`answer_positions`, :func:`addition_loss`, :func:`addition_mse_loss`, :func:`encode_addition`,
  :func:`decode_addition`, :func:`addition_operands`, :func:`answer_accuracy`;
- :mod:`unfold.data.sequences` — sequence classification: :func:`load_digits_sequences` (sklearn's bundled 8×8 digits),
  :func:`synthetic_sequence_classification`, :class:`SequenceClassificationData`, :class:`ShuffledBatches`,
  :func:`iterate_batches`;
- :mod:`unfold.data.text` — text: :func:`load_imdb`, :func:`load_sst2`, :func:`load_glove`, :class:`WordVectors`,
  :func:`tokenize`, :func:`build_vocabulary`, :func:`embed_sentences`, :class:`DataNotFoundError`;
- :mod:`unfold.data.offline_text` — the offline stand-in: :data:`FIXED_VOCABULARY`, :func:`zipf_sentences`,
  :func:`seeded_embedding_table`.
"""

from __future__ import annotations

from unfold.data import addition, offline_text, sequences, text
from unfold.data.addition import *  # noqa: F403  (the public names of every submodule, listed in its __all__)
from unfold.data.offline_text import *  # noqa: F403
from unfold.data.sequences import *  # noqa: F403
from unfold.data.text import *  # noqa: F403

__all__: list[str] = []
__all__ += addition.__all__
__all__ += sequences.__all__
__all__ += text.__all__
__all__ += offline_text.__all__
