"""energy.hessian: curvature of attention layers and of the energies (MATH §3, §4).

* :mod:`~energy.hessian.attention` – closed-form Hessian of one self-attention layer (MATH §3): moments, Jacobians,
  every block of ``H_o`` (Gauss–Newton) and ``H_f`` (functional), the bilinear term, ``W_QK``, linear attention,
  masks, ``W_O``; autograd twins ``autograd_attention_hessian`` / ``autograd_attention_ggn``.
* :mod:`~energy.hessian.structure` – exact Frobenius norms, traces and diagonals of those blocks from their
  Kronecker-sum structure, without materialising them.
* :mod:`~energy.hessian.multihead` / :mod:`~energy.hessian.multihead_structure` – multi-head attention (grouped-query
  included): per-head and cross-head blocks, exact norms, traces, diagonals (MATH §5.1).
* :mod:`~energy.hessian.norm_curvature`, :mod:`~energy.hessian.ffn_curvature` – LayerNorm, RMSNorm and the FFN:
  Jacobians and second derivatives, token-wise (MATH §5.2); :mod:`~energy.hessian.attention_input` – the input-side
  derivatives of an attention head (MATH §5.3a).
* :mod:`~energy.hessian.block` – the exact Hessian of a whole Transformer block (Pre-LN, Post-LN), parameters and
  tokens (MATH §5.3); :mod:`~energy.hessian.head_norms` – exact per-head block norms at GPT-2 scale (MATH §5.4).
* :mod:`~energy.hessian.energy_layer` – the energy-derived layer's loss Hessian with respect to ``M`` (MATH §4.2).
* :mod:`~energy.hessian.energy_curvature` – token-space Hessians of the energies and safe step sizes (MATH §4.1).
* :mod:`~energy.hessian.operators` – matrix-free Hessian / GGN / ``H − GGN`` / Jacobian operators for any
  ``nn.Module`` + loss + data, exportable to ``scipy.sparse.linalg.LinearOperator``.
* :mod:`~energy.hessian.estimators` – Hutchinson and Hutch++ (traces, diagonals, Frobenius norms), the probes;
* :mod:`~energy.hessian.krylov` – Lanczos and stochastic Lanczos quadrature.
* :mod:`~energy.hessian.sweep` – σ-sweeps and log–log slope fits with uncertainties.
"""

from energy._validation import DenseSizeError
from energy.hessian import estimators, krylov
from energy.hessian.attention import (
    BLOCKS,
    PARAMS,
    AttentionLayer,
    AttentionMoments,
    attention_hessian,
    attention_jacobians,
    attention_loss,
    attention_moments,
    attention_output,
    autograd_attention_ggn,
    autograd_attention_hessian,
    bilinear_term,
    hessian_block,
    hessian_blocks,
    loss_constant,
    qk_hessian_blocks,
)
from energy.hessian.attention_input import (
    autograd_head_input_hessian,
    autograd_head_input_jacobian,
    autograd_head_input_param_hessian,
    head_input_hessian,
    head_input_jacobian,
    head_input_param_hessian,
)
from energy.hessian.block import (
    BlockHessian,
    TransformerBlock,
    autograd_block_ggn,
    autograd_block_hessian,
    autograd_block_token_hessian,
    block_hessian,
    block_hessian_parts,
    block_loss,
    block_token_hessian,
    random_block,
)
from energy.hessian.distributed import (
    InconsistentRanksError,
    RankFailure,
    ShardGroup,
    all_reduce_sum,
    init_from_env,
    shard_batches,
)
from energy.hessian.energy_curvature import (
    attention_energy_hessian,
    autograd_energy_hessian,
    ffn_energy_hessian,
    majoriser_step_bound,
    preconditioned_curvature,
)
from energy.hessian.energy_layer import (
    autograd_energy_layer_hessian,
    energy_layer_hessian,
    energy_layer_jacobian,
    energy_layer_loss,
    energy_layer_output,
)
from energy.hessian.estimators import *  # noqa: F403 - Hutchinson, Hutch++ and draw_probes
from energy.hessian.ffn_curvature import FFNLayer, autograd_ffn_ggn, autograd_ffn_hessian, ffn_derivatives, ffn_hessian
from energy.hessian.krylov import *  # noqa: F403 - Lanczos and SLQ
from energy.hessian.moments import gradient_moments
from energy.hessian.multihead import (
    MultiHeadAttentionLayer,
    multihead_functional_hessian,
    multihead_hessian,
    multihead_hessian_block,
    multihead_jacobian,
)
from energy.hessian.multihead_structure import multihead_block_diagonals, multihead_block_norms, multihead_block_traces
from energy.hessian.norm_curvature import (
    NormLayer,
    autograd_norm_ggn,
    autograd_norm_hessian,
    norm_derivatives,
    norm_hessian,
)
from energy.hessian.operators import (
    FunctionalOperator,
    GGNOperator,
    HessianOperator,
    JacobianOperator,
    LinearOperator,
    TokenHessianOperator,
)
from energy.hessian.structure import block_diagonals, block_norms, block_traces, hessian_frobenius_norms
from energy.hessian.sweep import THEORY_EXPONENTS, SweepResult, fit_loglog_slope, fit_window, sigma_sweep
from energy.hessian.twins import autograd_multihead_ggn, autograd_multihead_hessian

__all__ = [
    "DenseSizeError",
    # MATH §6.1 data-parallel curvature
    "ShardGroup",
    "RankFailure",
    "InconsistentRanksError",
    "all_reduce_sum",
    "init_from_env",
    "shard_batches",
    # MATH §3 closed forms
    "PARAMS",
    "BLOCKS",
    "AttentionLayer",
    "AttentionMoments",
    "attention_moments",
    "attention_jacobians",
    "attention_output",
    "attention_loss",
    "loss_constant",
    "hessian_block",
    "hessian_blocks",
    "attention_hessian",
    "bilinear_term",
    "qk_hessian_blocks",
    "autograd_attention_hessian",
    "autograd_attention_ggn",
    "block_norms",
    "block_traces",
    "block_diagonals",
    "hessian_frobenius_norms",
    "gradient_moments",
    # MATH §5: multi-head attention, token-wise sublayers, whole blocks
    "MultiHeadAttentionLayer",
    "multihead_jacobian",
    "multihead_functional_hessian",
    "multihead_hessian",
    "multihead_hessian_block",
    "multihead_block_norms",
    "multihead_block_traces",
    "multihead_block_diagonals",
    "autograd_multihead_hessian",
    "autograd_multihead_ggn",
    "NormLayer",
    "norm_derivatives",
    "norm_hessian",
    "autograd_norm_hessian",
    "autograd_norm_ggn",
    "FFNLayer",
    "ffn_derivatives",
    "ffn_hessian",
    "autograd_ffn_hessian",
    "autograd_ffn_ggn",
    "head_input_jacobian",
    "head_input_hessian",
    "head_input_param_hessian",
    "autograd_head_input_jacobian",
    "autograd_head_input_hessian",
    "autograd_head_input_param_hessian",
    "TransformerBlock",
    "BlockHessian",
    "block_hessian",
    "block_hessian_parts",
    "block_token_hessian",
    "block_loss",
    "autograd_block_hessian",
    "autograd_block_ggn",
    "autograd_block_token_hessian",
    "random_block",
    # MATH §4
    "energy_layer_output",
    "energy_layer_loss",
    "energy_layer_jacobian",
    "energy_layer_hessian",
    "autograd_energy_layer_hessian",
    "attention_energy_hessian",
    "ffn_energy_hessian",
    "autograd_energy_hessian",
    "majoriser_step_bound",
    "preconditioned_curvature",
    # matrix-free
    "LinearOperator",
    "HessianOperator",
    "GGNOperator",
    "FunctionalOperator",
    "JacobianOperator",
    "TokenHessianOperator",
    "fit_loglog_slope",
    "fit_window",
    "sigma_sweep",
    "SweepResult",
    "THEORY_EXPONENTS",
]
__all__ += estimators.__all__
__all__ += krylov.__all__
