r"""Ormaniec, Dangel & Singh (ICLR 2025): the Hessian of self-attention, as figures (MATH §3.6–§3.7).

Figures (names are part of the CLI interface):

- ``ormaniec2024-heterogeneity``: the dense loss Hessian of a one-block GPT-2-style model (width 16) as a heat
  map, its attention part, and log-binned histograms of the exact ``H(W_Q,W_Q)`` and ``H(W_V,W_V)`` entries.
- ``ormaniec2024-linear-attention``: the same histograms for softmax and for linear attention.
- ``ormaniec2024-growth-single``, ``-growth-depth``, ``-growth-preln``, ``-growth-linear-depth``, ``-growth-mlp``:
  block Frobenius norms of ``H_o`` (= GGN), ``H_f`` (= ``H − GGN``) and ``H`` against the data scale ``σ``
  (Hutchinson estimates through the matrix-free operators of :mod:`energy.hessian.operators`), with the
  theoretical rates of MATH §3.6 as dashed guides and fitted small-``σ`` slopes.
- ``ormaniec2024-growth-closed-form``: the single self-attention layer of MATH §3.1 with the *exact* block norms of
  :mod:`energy.hessian.structure` (no sampling noise), all six distinct blocks.

Protocol (MATH §3.7): 5-digit addition, one batch, GPT-2 initialisation; for each ``σ`` the token and position
embeddings are redrawn i.i.d. ``N(0, σ²)``, every other weight keeps its initialisation. Two implementation choices,
both exact reformulations and documented in every caption:

* **Common random numbers.** Within one initialisation the embedding draw at every ``σ`` uses the *same* seed, so
  it is ``σ`` times one standard-normal draw (marginally exactly the ``N(0, σ²)`` of the protocol), and the
  Hutchinson probes are the same for every ``σ``. The fitted slope then measures how *one* network's curvature
  scales with ``σ`` instead of being blurred by independent redraws; with exactly homogeneous models (deep linear
  MLP, linear attention without residual) it is exact at any number of probes.
* **Only the scored positions are computed.** The loss reads the outputs at the answer positions only; with the
  causal mask nothing else influences them, so :class:`ScoredPositions` evaluates the last block's queries, MLP and
  unembedding at those positions only (keys/values at positions ``0..max``). The result equals the full model's
  loss (tested); for one layer it skips the queries, MLP and unembedding of 12 of the 18 positions.

All curvature is computed in float64.
"""


from __future__ import annotations

from paper_figs.ormaniec2024.common import (  # noqa: F401 - re-exported
    DATA_SEED,
    DTYPE,
    EMBEDDING_SEED,
    HEATMAP_EPS,
    PROBE_SEED,
    SMALL_SIGMA_MAX,
    THEORY_RATES,
    ScoredPositions,
    addition_data,
    dense_loss_hessian,
    gpt2_model,
    heterogeneity_config,
    log_histogram,
    max_pool,
    natural_order,
    parameter_groups,
)
from paper_figs.ormaniec2024.growth import (  # noqa: F401 - re-exported
    closed_form_sweep,
    compute_growth_closed_form,
    compute_growth_depth,
    compute_growth_linear_depth,
    compute_growth_mlp,
    compute_growth_preln,
    compute_growth_single,
    linear_stack_config,
    plot_growth_closed_form,
    plot_growth_depth,
    plot_growth_linear_depth,
    plot_growth_mlp,
    plot_growth_preln,
    plot_growth_single,
    summarize_growth_closed_form,
    summarize_growth_depth,
    summarize_growth_linear_depth,
    summarize_growth_mlp,
    summarize_growth_preln,
    summarize_growth_single,
)
from paper_figs.ormaniec2024.heterogeneity import (  # noqa: F401 - re-exported
    compute_heterogeneity,
    compute_linear_attention,
    plot_heterogeneity,
    plot_linear_attention,
    summarize_heterogeneity,
    summarize_linear_attention,
)
from paper_figs.ormaniec2024.sweep import (  # noqa: F401 - re-exported
    GrowthSweep,
    _rademacher,
    growth_sweep,
    loglog_slope,
    sigma_grid,
)
from unfold.data import answer_positions  # noqa: F401 - re-exported (the scored positions of the protocol)

__all__ = [
    "DTYPE",
    "EMBEDDING_SEED",
    "PROBE_SEED",
    "DATA_SEED",
    "HEATMAP_EPS",
    "SMALL_SIGMA_MAX",
    "THEORY_RATES",
    "ScoredPositions",
    "addition_data",
    "gpt2_model",
    "heterogeneity_config",
    "natural_order",
    "parameter_groups",
    "dense_loss_hessian",
    "log_histogram",
    "max_pool",
    "sigma_grid",
    "loglog_slope",
    "GrowthSweep",
    "growth_sweep",
    "linear_stack_config",
    "closed_form_sweep",
]

