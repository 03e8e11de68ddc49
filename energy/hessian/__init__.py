"""energy.hessian: curvature of attention layers and of the energies (MATH §3, §4).

* :mod:`~energy.hessian.attention` – closed-form Hessian of one self-attention layer (MATH §3): moments, Jacobians,
  every block of ``H_o`` (Gauss–Newton) and ``H_f`` (functional), the bilinear term, ``W_QK``, linear attention,
  masks, ``W_O``; autograd twins ``autograd_attention_hessian`` / ``autograd_attention_ggn``.
* :mod:`~energy.hessian.structure` – exact Frobenius norms, traces and diagonals of those blocks from their
  Kronecker-sum structure, without materialising them.
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
from energy.hessian.krylov import *  # noqa: F403 - Lanczos and SLQ
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

__all__ = [
    "DenseSizeError",
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
