r"""Closed-form loss Hessian of one self-attention layer (MATH §3, Ormaniec, Dangel & Singh, ICLR 2025).

Setup (MATH §3.1): one head, no residual, no LayerNorm, optional output projection ``W_O``,

.. math::
    T = \kappa X W_Q W_K^\top X^\top,\quad A = \mathrm{softmax}(T),\quad F = A X W_V\,[W_O],\quad
    \ell = c\,\|F - Y\|_F^2,

with ``X (L × d_V)``, ``W_Q, W_K (d_V × d_K)``, ``W_V (d_V × d_V)``, ``W_O (d_V × d_O)`` and ``κ = 1/√d_K``
by default. The
Hessian splits as ``H = H_o + H_f``: the outer-product (Gauss–Newton) part ``H_o = 2c JᵀJ`` and the
functional part ``H_f = Σ_{lm} G_lm ∂²F_lm``, ``G = 2c (F − Y)``.

Everything is in ``vec_r`` order (row-major flattening, MATH §0), so a block indexes exactly like
``torch.func.hessian`` of the flattened weights; the assembled Hessian orders the parameters ``(Q, K, V)``
(``(Q, K, V, O)`` with an output projection).

How the closed form is organised. For query row ``i`` the layer sees the weights only through
``u_i = κ W_K W_Qᵀ x_i`` (logits ``T_i = X u_i``) and ``W_V``. With the attention moments of MATH §3.2
(``μ_i``, ``Σ_i = Xᵀ J_i X``, ``Ŝ_i``), ``B_i = W_Vᵀ Σ_i`` and ``q_i = W_Qᵀ x_i``:

.. math::
    du_i = \kappa (W_K\, dW_Q^\top x_i + dW_K\, q_i),\qquad
    \partial^2_{u_i} \ell = R_i/\kappa^2,\quad R_i = \kappa^2 (2c\,B_i^\top B_i + \hat S_i),

so ``H(Q,Q) = Σ_i x_i x_iᵀ ⊗ W_Kᵀ R_i W_K``, ``H(K,K) = Σ_i R_i ⊗ q_i q_iᵀ`` and
``H(Q,K) = Σ_i x_i ⊗ W_Kᵀ R_i ⊗ q_iᵀ + G_QK ⊗ I`` — the ``2cB_iᵀB_i`` half of ``R_i`` is ``H_o``, the ``Ŝ_i``
half and the bilinear term ``G_QK ⊗ I`` are ``H_f`` (MATH §3.4–§3.5). The value blocks come from the
mixed tensor ``E_i[n, m, a] = 2cκ μ_i[n] B_i[m, a] + κ Σ_i[n, a] g_i[m]`` (first half ``H_o``, second ``H_f``):
``H(V,K)[(n,m),(a,b)] = Σ_i E_i[n,m,a] q_i[b]`` and ``H(V,Q)[(n,m),(c,b)] = Σ_i (E_i W_K)[n,m,b] x_i[c]``.
These are the formulas of MATH §3.4–§3.5 written with shared factors. Every query row strip
``H(Q, ·)[(a', b'), :] = Σ_i x_i[a'] F_i[b', :]`` and key row strip ``H(K, ·)[(a', b'), :] = Σ_i q_i[b'] G_i[a', :]``
is one GEMM whose inner dimension is the stacked rows ``i`` (no Python loop over tokens or sequences), written
straight into the assembled Hessian; value rows are transposes plus the small value–value blocks.

Covered variants (each tested against ``torch.func.hessian`` in float64):

* a batch of sequences ``X (B, L, d_V)`` with ``reduction="sum"`` (``ℓ = Σ_b c‖F_b − Y_b‖²``) or ``"mean"``
  (divided by ``B``). The default ``c = 1/(L d_V)`` makes the per-sequence loss the mean squared error;
* a boolean attention ``mask`` (``True`` = attend), e.g. ``causal=True``: the mask only changes ``A``; the
  formulas hold with the masked ``a_i`` because ``J_i = diag(a_i) − a_i a_iᵀ`` vanishes on masked keys;
* linear attention (``linear=True``): ``A = κ X W_Q W_Kᵀ Xᵀ`` (times the mask), no softmax. Then
  ``J_i = diag(m_i)`` (``m_i`` the mask row, all ones without mask), ``Σ_i = Xᵀ diag(m_i) X`` and ``Ŝ_i = 0``;
  the same block formulas apply (MATH §3.6);
* the single-matrix ``W_QK`` parametrisation (:func:`qk_hessian_blocks`);
* an output projection ``W_O`` (pass ``W_O=``): the query/key side sees the value map ``Ṽ = W_V W_O``
  (``B_i = Ṽᵀ Σ_i``, ``Ŝ_i`` and ``G_QK`` with ``Ṽ g_i``); the value side is written with four per-row factors
  ``(α_i, B̃_i, S̃_i, γ_i)``, ``E_i[n, m, a] = 2cκ α_i[n] B̃_i[m, a] + κ S̃_i[n, a] γ_i[m]``: for ``V``
  ``(μ_i, W_O B_i, Σ_i, W_O g_i)``, for ``O`` ``(W_Vᵀ μ_i, B_i, W_Vᵀ Σ_i, g_i)``. The remaining blocks are
  ``H(V,V) = 2c M_1ᵀM_1 ⊗ W_O W_Oᵀ``, ``H(O,O) = 2c W_VᵀM_1ᵀM_1W_V ⊗ I`` (both ``H_o`` only) and
  ``H(V,O)[(n,m),(p,o)] = 2c (M_1ᵀM_1W_V)[n,p] W_O[m,o] + (M_1ᵀG)[n,o] δ_mp`` (``H_o`` + ``H_f``); the
  default ``c`` is then ``1/(L d_O)``.

Not covered: multiple heads, residual connections and LayerNorm. Use the matrix-free operators of
``energy.hessian.operators`` for those.

Code layout (this module re-exports it): :mod:`~energy.hessian.attention_layer` (the frozen
:class:`AttentionLayer`, its forward map and loss), :mod:`~energy.hessian.moments` (moments and Jacobians,
MATH §3.2–§3.3), :mod:`~energy.hessian.blocks` (factors, blocks and the dense assembly, §3.4–§3.5) and
:mod:`~energy.hessian.twins` (the autograd twins). Every public function takes either an :class:`AttentionLayer`
(``attention_moments(layer, X, Y)``) or the legacy keywords (``attention_moments(X, W_Q, W_K, W_V, Y, W_O=...,
c=..., reduction=..., scale=..., mask=..., causal=..., linear=...)``).
"""

from __future__ import annotations

from energy._validation import DenseSizeError, VerificationPrecisionWarning, warn_if_not_float64
from energy.hessian import attention_layer, blocks, moments, twins
from energy.hessian.attention_layer import *  # noqa: F403 - this module is the documented entry point
from energy.hessian.blocks import *  # noqa: F403
from energy.hessian.moments import *  # noqa: F403
from energy.hessian.twins import *  # noqa: F403

__all__ = ["DenseSizeError", "VerificationPrecisionWarning", "warn_if_not_float64"]
__all__ += attention_layer.__all__
__all__ += moments.__all__
__all__ += blocks.__all__
__all__ += twins.__all__
