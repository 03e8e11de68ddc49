r"""Self-attention as a descent step on a pairwise energy (MATH §1.1, §1.2).

The energy (tokens are rows, :math:`Y \in \mathbb{R}^{\dots\times n\times d}`, MATH §0):

.. math::
    E(Y) = \sum_{i<j} \rho(z_{ij}) + \tfrac{\lambda}{2}\|Y\|_W^2, \qquad
    z_{ij} = \tfrac12 \|y_i - y_j\|_W^2, \qquad W = \kappa\, M M^\top,

with :math:`\rho` concave and non-decreasing (:mod:`energy.kernels`), :math:`\gamma_{ij} = \rho'(z_{ij})`,
:math:`\Gamma = [\gamma_{ij}]` (including :math:`\gamma_{ii} = \rho'(0)`), :math:`D = \mathrm{diag}(\Gamma 1)`,
:math:`L = D - \Gamma`, and :math:`\nabla E = (L + \lambda I)\, Y W`.

**The 1/√d_k convention.** ``W = scale · M Mᵀ`` with ``scale`` defaulting to :math:`\kappa = 1/\sqrt{k}`,
``k = M.shape[-1]``. The *same* ``W`` enters the energy, the gradient, both steps and the standard layer the step
reproduces: with :math:`Q = K = Y M`, :math:`Y W Y^\top = Q K^\top / \sqrt{k}`, so the Gaussian metric step is
:math:`\mathrm{softmax}(Q K^\top/\sqrt{k} + \mathbf 1\beta^\top)\, Y` with :math:`\beta_j = -\tfrac12\|y_j\|_W^2
= -\tfrac{1}{2\sqrt k}\|k_j\|^2`. Pass ``scale=1.0`` to use :math:`W = M M^\top` unscaled.

**How the obstacles of MATH §1 (obstacle 1) are addressed.**

* *Softmax is not the gradient of a quadratic.* It is a *preconditioned* gradient step of the non-quadratic
  pairwise energy above with the Gaussian kernel :math:`\rho(z) = -e^{-z}`: the row normalisation :math:`D^{-1}`
  is the preconditioner, and the factors of :math:`\gamma_{ij}` that depend only on :math:`i` cancel in it, leaving
  the key bias :math:`\beta_j` (:func:`key_bias`). Step (a) ``preconditioner="metric"`` (preconditioner
  :math:`(D\otimes W)^{-1}`): :math:`Y^+ = (1-\alpha) Y + \alpha D^{-1}\Gamma Y`; step (b) ``"token"``
  (preconditioner :math:`D^{-1}\otimes I`): :math:`Y^+ = Y(I - \alpha W) + \alpha D^{-1}\Gamma Y W`.
* *Monotone descent* follows from majorisation–minimisation (ρ concave): see :func:`attention_step_range` for the
  guaranteed ranges and their proofs. Plain ``softmax(Y W Yᵀ) Y`` **without** β is not such a step and can increase
  the energy (regression-tested); it coincides with the β step when all tokens have equal W-norm.
* *Ridge* :math:`\lambda > 0`: the step normalises by :math:`\lambda + \sum_k \gamma_{ik}` (attention with a "null
  slot" of value 0). The plain ``softmax_β`` step is *not* provably monotone for the ridge energy.
* *Numerics.* :math:`z` is computed through the Gram matrix, :math:`z_{ij} = \tfrac12\|y_i\|_W^2 +
  \tfrac12\|y_j\|_W^2 - y_i^\top W y_j`, as one matrix product of augmented rows (never an :math:`n^2\times d`
  pair tensor). Rounding can make it slightly negative for nearly coincident tokens (and on the diagonal); it is
  clamped at 0 (``clamp_min(0)``; the exact value is :math:`\ge 0`).

**Multi-head (MATH §1.2, status "open" in MATH).** :class:`MultiHeadAttentionEnergy` uses
:math:`E = \sum_h E_h` with :math:`W_h = \kappa M_h M_h^\top`. Its step is the sum of per-head steps, each with
value/output map :math:`P_h` (the orthogonal projector onto the range of :math:`M_h`) for the metric step and
:math:`W_h` for the token step. *Orthogonal heads* (:math:`M_h^\top M_g = 0`, see
:meth:`~MultiHeadAttentionEnergy.heads_orthogonal`): the energy separates over the subspaces, the step is a
preconditioned gradient step and each head keeps the single-head guarantee. *General heads*: the summed step is
**not** one preconditioned gradient step; no step size is guaranteed, descent is only measured
(``tests/test_multihead_energy.py`` records the violation rate).

**Masks.** A symmetric pairwise energy gives symmetric weights :math:`\gamma_{ij} = \gamma_{ji}`, so
:math:`\Gamma` cannot be triangular: *causal attention is not a descent step of any energy of this form*
(a causal layer can only be run as a non-energy step; nothing here pretends otherwise). What can be provided
honestly is a *key-padding* mask ``token_mask`` (shape ``(..., n)``, ``True`` = real token): padded tokens are
removed from the energy (from the pair sum and the ridge term), so their gradient is zero, they are left unchanged
by every step, and the real tokens evolve exactly as for the unpadded sequence.

**Step and energy together.** The step needs :math:`z` and :math:`\Gamma` at ``Y``, and :math:`E(Y)` is the same
:math:`z` summed through ρ; ``step_and_energy`` returns both from one evaluation (for the Gaussian kernel,
:math:`\rho = -\rho'`, the energy is minus the off-diagonal sum of the step's own :math:`\Gamma`). The fused path
(``attention_step_fused(..., return_energy=True)``) gets it from the attention kernel's row log-normalisers,
:math:`D_{ii} = e^{\beta_i + \mathrm{lse}_i}`, with no pairwise work. The unroller uses this to trace the energy at
the input of every attention step for free.

Functional core: :func:`metric`, :func:`pairwise_sq_dist`, :func:`key_bias`, :func:`softmax_beta`,
:func:`head_bases`, :func:`attention_step_range`, :func:`attention_step_fused`; module shell:
:class:`AttentionEnergy`, :class:`MultiHeadAttentionEnergy`.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from energy._validation import (
    ConstraintError,
    EnergyInputError,
    check_psd,
    check_same_float_dtype,
    check_step_size,
    check_tensor,
)
from energy.base import Energy, StepRange
from energy.kernels import GaussianKernel, Kernel

__all__ = [
    "metric",
    "pairwise_sq_dist",
    "key_bias",
    "softmax_beta",
    "head_bases",
    "attention_step_range",
    "attention_step_fused",
    "AttentionEnergy",
    "MultiHeadAttentionEnergy",
]

_PRECONDITIONERS = ("metric", "token")


# ----------------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------------


def _resolve_scale(scale: float | None, k: int) -> float:
    """``scale`` or the default :math:`\\kappa = 1/\\sqrt{k}`; rejects non-positive / non-finite values."""
    if scale is None:
        return 1.0 / math.sqrt(k)
    if isinstance(scale, Tensor) and scale.numel() == 1:
        scale = float(scale)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise EnergyInputError(
            f"`scale` must be a finite real number > 0 (W = scale · M Mᵀ) or None for 1/sqrt(k), got {scale!r}."
        )
    return float(scale)


def _check_ridge(ridge: float) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise EnergyInputError(f"`ridge` must be a finite real number >= 0 (the λ of (λ/2)‖Y‖²_W), got {ridge!r}.")
    return float(ridge)


def _check_kernel(kernel: Kernel | None) -> Kernel:
    if kernel is None:
        return GaussianKernel()
    if not isinstance(kernel, Kernel):
        raise EnergyInputError(
            f"`kernel` must be an energy.kernels.Kernel (e.g. GaussianKernel(), PowerKernel(p, eps), "
            f"CauchyKernel()), got {type(kernel).__name__}."
        )
    return kernel


def _check_preconditioner(preconditioner: str) -> str:
    if preconditioner not in _PRECONDITIONERS:
        raise EnergyInputError(
            f"`preconditioner` must be 'metric' (step (a), identity values) or 'token' (step (b), values tied to "
            f"W), got {preconditioner!r}."
        )
    return preconditioner


def _check_M(M: object, ndim: int) -> Tensor:
    if ndim == 2 and isinstance(M, Tensor) and M.ndim == 3:
        raise EnergyInputError(
            f"`M` must have 2 dimensions (d, k) for a single head, got shape {tuple(M.shape)}; for a stack of heads "
            "(h, d, k) use MultiHeadAttentionEnergy."
        )
    M = check_tensor(M, "M", ndim=ndim)
    if M.numel() == 0:
        raise EnergyInputError(f"`M` must not be empty, got shape {tuple(M.shape)}.")
    return M


def _check_Y(Y: object, M: Tensor) -> Tensor:
    """``Y`` of shape (..., n, d) matching ``M`` (d, k) / (h, d, k) in width and dtype."""
    Y = check_tensor(Y, "Y", min_ndim=2)
    d = M.shape[-2]
    if Y.shape[-1] != d:
        raise EnergyInputError(
            f"`Y` has width {Y.shape[-1]} (last dimension) but `M` has d = {d} rows; tokens are rows: Y is "
            f"(..., n, d) and M is (d, k) (or (h, d, k) for heads)."
        )
    if Y.shape[-2] == 0:
        raise EnergyInputError(f"`Y` must contain at least one token, got shape {tuple(Y.shape)}.")
    check_same_float_dtype(Y=Y, M=M)
    return Y


def _check_token_mask(token_mask: object, Y: Tensor) -> Tensor | None:
    if token_mask is None:
        return None
    if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool:
        raise EnergyInputError(
            "`token_mask` must be a bool tensor of shape (..., n) with True = real token, False = padding, got "
            f"{token_mask.dtype if isinstance(token_mask, Tensor) else type(token_mask).__name__}; build it with "
            "e.g. `lengths[:, None] > torch.arange(n)`."
        )
    try:
        ok = torch.broadcast_shapes(token_mask.shape, Y.shape[:-1]) == Y.shape[:-1]
    except RuntimeError:
        ok = False
    if not ok:
        raise EnergyInputError(
            f"`token_mask` of shape {tuple(token_mask.shape)} does not broadcast to Y's token shape "
            f"{tuple(Y.shape[:-1])} (= Y.shape[:-1])."
        )
    if token_mask.shape[-1] != Y.shape[-2]:
        raise EnergyInputError(
            f"`token_mask` must have n = {Y.shape[-2]} entries in its last dimension, got {tuple(token_mask.shape)}."
        )
    return token_mask


def _check_W(W: object, Y: Tensor) -> Tensor:
    W = check_tensor(W, "W", min_ndim=2)
    if W.shape[-1] != Y.shape[-1]:
        raise EnergyInputError(
            f"`W` must be (d, d) with d = {Y.shape[-1]} (the width of `Y`), got shape {tuple(W.shape)}."
        )
    check_same_float_dtype(Y=Y, W=W)
    return check_psd(W, "W")


# ----------------------------------------------------------------------------------------------------------------
# functional core
# ----------------------------------------------------------------------------------------------------------------


def metric(M: Tensor, scale: float | None = None) -> Tensor:
    r"""The metric :math:`W = \kappa\, M M^\top` (MATH §1.1), :math:`\kappa` = ``scale`` or :math:`1/\sqrt{k}`.

    Args:
        M: factor ``(..., d, k)`` (a stack of heads ``(h, d, k)`` gives one metric per head).
        scale: :math:`\kappa`; ``None`` means :math:`1/\sqrt{k}`, matching ``softmax(Q Kᵀ/√d_k)`` with
            :math:`Q = K = Y M`.

    Returns:
        ``W`` of shape ``(..., d, d)``, symmetric positive semi-definite by construction.
    """
    M = check_tensor(M, "M", min_ndim=2)
    return _resolve_scale(scale, M.shape[-1]) * (M @ M.transpose(-1, -2))


def _sq_dist(A: Tensor, B: Tensor, h: Tensor) -> Tensor:
    r""":math:`z_{ij} = h_i + h_j - a_i^\top b_j` as one matrix product of augmented rows (MATH §1.1).

    .. math:: z_{ij} = [-a_i,\ h_i,\ 1]^\top [b_j,\ 1,\ h_j]

    With :math:`a_i = W y_i`, :math:`b_j = y_j`, :math:`h_i = \tfrac12\|y_i\|_W^2` this is
    :math:`\tfrac12\|y_i - y_j\|_W^2` through the Gram matrix (never an :math:`n^2\times d` pair tensor), with the
    diagonal terms folded into the same product (no extra passes over the :math:`n\times n` array). Rounding can
    make entries slightly negative for (nearly) coincident tokens, including the diagonal; they are clamped at 0
    (the exact value is non-negative).

    Args:
        A, B: ``(..., n, c)``; h: ``(..., n)``.
    """
    h = h.unsqueeze(-1)
    one = torch.ones_like(h)
    return (torch.cat([-A, h, one], dim=-1) @ torch.cat([B, one, h], dim=-1).transpose(-1, -2)).clamp_min(0.0)


def pairwise_sq_dist(Y: Tensor, W: Tensor) -> Tensor:
    r"""Half squared :math:`W`-distances :math:`z_{ij} = \tfrac12\|y_i - y_j\|_W^2` via the Gram matrix (MATH §1.1).

    .. math:: z_{ij} = \tfrac12 (G_{ii} + G_{jj}) - G_{ij}, \qquad G = Y W Y^\top .

    Tiny negative values from rounding are clamped to 0.

    Args:
        Y: tokens ``(..., n, d)``.
        W: symmetric PSD metric ``(d, d)`` (or broadcastable ``(..., d, d)``).

    Returns:
        ``z`` of shape ``(..., n, n)``.
    """
    Y = check_tensor(Y, "Y", min_ndim=2)
    W = _check_W(W, Y)
    YW = Y @ W
    Y = Y.expand_as(YW)  # a batched W (e.g. one metric per head) broadcasts the tokens
    return _sq_dist(YW, Y, 0.5 * (YW * Y).sum(-1))


def key_bias(Y: Tensor, W: Tensor) -> Tensor:
    r"""Key bias :math:`\beta_j = -\tfrac12 \|y_j\|_W^2` of the energy-derived softmax (MATH §1.1).

    Returns:
        ``β`` of shape ``(..., n)``.
    """
    Y = check_tensor(Y, "Y", min_ndim=2)
    W = _check_W(W, Y)
    return -0.5 * ((Y @ W) * Y).sum(-1)


def softmax_beta(Y: Tensor, W: Tensor) -> Tensor:
    r"""Energy-derived attention matrix :math:`\mathrm{softmax}_\beta(Y W Y^\top)` (MATH §1.1).

    .. math:: A_{ij} = \frac{\exp(y_i^\top W y_j + \beta_j)}{\sum_l \exp(y_i^\top W y_l + \beta_l)}
        = (D^{-1}\Gamma)_{ij}\ \text{for}\ \rho(z) = -e^{-z}.

    Returns:
        ``A`` of shape ``(..., n, n)``, rows summing to one.
    """
    beta = key_bias(Y, W)
    return torch.softmax(Y @ W @ Y.transpose(-1, -2) + beta.unsqueeze(-2), dim=-1)


def head_bases(M: Tensor) -> Tensor:
    r"""Orthonormal bases :math:`U_h` of the ranges of the heads' factors, :math:`P_h = U_h U_h^\top` (MATH §1.2).

    Computed from the thin SVD of each :math:`M_h`; columns belonging to singular values below
    ``max(d, k) · eps · σ_max`` are set to zero, so :math:`U_h U_h^\top` is the exact projector onto
    :math:`\mathrm{range}(M_h)` also for rank-deficient heads.

    Args:
        M: ``(h, d, k)`` (or ``(d, k)``, treated as one head).

    Returns:
        ``U`` of shape ``(h, d, min(d, k))`` (or ``(d, min(d, k))``).
    """
    M = check_tensor(M, "M", min_ndim=2)
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    tol = max(M.shape[-2], M.shape[-1]) * torch.finfo(M.dtype).eps * S[..., :1]
    return U * (S > tol).to(U.dtype).unsqueeze(-2)


def attention_step_range(
    kernel: Kernel, preconditioner: str, *, lambda_max_W: float, orthogonal_heads: bool = True
) -> StepRange:
    r"""Step sizes for which the attention steps provably do not increase the energy (MATH §1.1 "Guarantee").

    Proof sketch (MM). Since ρ is concave, :math:`E(Y) \le Q(Y\mid Y^t) = \tfrac12\mathrm{tr}(Y^\top (L + \lambda I)
    Y W) + c` with equality at :math:`Y^t`. In :math:`Z = (D + \lambda I)^{1/2} Y`, :math:`Q = \tfrac12
    \mathrm{tr}(Z^\top N Z W)`, :math:`N = I - (D + \lambda I)^{-1/2}\Gamma(D + \lambda I)^{-1/2}`; the eigenvalues of
    :math:`N` lie in :math:`[0, 2]` (Γ ≥ 0 entrywise, rows of :math:`(D+\lambda I)^{-1}\Gamma` sum to ≤ 1), and in
    :math:`[0, 1]` if :math:`\Gamma \succeq 0`. Step (a) is :math:`Z^+ = (I - \alpha N) Z` and multiplies each
    eigen-mode of :math:`N \otimes W` (eigenvalue :math:`\nu\mu`) by :math:`1 - \alpha\nu`; step (b) is
    :math:`Z^+ = Z - \alpha N Z W` and multiplies it by :math:`1 - \alpha\nu\mu`. :math:`Q` does not increase iff
    every factor lies in :math:`[-1, 1]`, and then :math:`E(Y^+) \le Q(Y^+) \le Q(Y^t) = E(Y^t)`. Hence

    * (a) ``"metric"``: :math:`\alpha \in (0, 2)` if ``kernel.psd_gram``, else :math:`\alpha \in (0, 1]`;
    * (b) ``"token"``: :math:`\alpha\lambda_{\max}(W) \in (0, 2)` if ``kernel.psd_gram``, else
      :math:`\alpha\lambda_{\max}(W) \in (0, 1]`.

    The ridge term and a key-padding mask keep these ranges (same proof). For orthogonal heads the energy separates
    over the heads' subspaces and each head keeps its range (:math:`\lambda_{\max}(W) = \max_h\lambda_{\max}(W_h)`).
    For general heads no range is guaranteed: the returned range is empty, ``(0, 0)``.

    Args:
        kernel: the energy's kernel.
        preconditioner: ``"metric"`` (step (a)) or ``"token"`` (step (b)).
        lambda_max_W: :math:`\lambda_{\max}(W)` (only used for ``"token"``).
        orthogonal_heads: ``False`` for multi-head energies whose heads are not mutually orthogonal.
    """
    _check_preconditioner(preconditioner)
    if not orthogonal_heads:
        return StepRange(
            0.0, 0.0,
            "MATH §1.2: the heads are not mutually orthogonal (M_hᵀ M_g ≠ 0), so the summed per-head step is not a "
            "preconditioned gradient step; no step size is guaranteed to descend (descent is measured, not assumed)",
        )
    psd = kernel.psd_gram
    if preconditioner == "metric":
        if psd:
            return StepRange(0.0, 2.0, f"MATH §1.1(a): Γ ⪰ 0 for the {kernel.name} kernel, so λ(N) ≤ 1")
        return StepRange(0.0, 1.0, "MATH §1.1(a): any concave non-decreasing ρ, λ(N) ≤ 2", high_inclusive=True)
    bound = 2.0 if psd else 1.0
    high = math.inf if lambda_max_W <= 0.0 else bound / lambda_max_W
    if psd:
        return StepRange(0.0, high, f"MATH §1.1(b): α·λ_max(W) < 2, Γ ⪰ 0 for the {kernel.name} kernel, "
                                    f"λ_max(W) = {lambda_max_W:.4g}")
    return StepRange(0.0, high, f"MATH §1.1(b): α·λ_max(W) ≤ 1 for any concave non-decreasing ρ, "
                                f"λ_max(W) = {lambda_max_W:.4g}", high_inclusive=True)


# --- head-batched core: M3 is (h, d, k), Y is (..., n, d); results carry a head dimension (..., h, ...) ---------


def _keys(Y: Tensor, M3: Tensor) -> Tensor:
    """:math:`K_h = Y M_h` for all heads with one matmul: ``(..., n, d), (h, d, k) -> (..., h, n, k)``."""
    h, d, k = M3.shape
    K = Y @ M3.permute(1, 0, 2).reshape(d, h * k)
    return K.unflatten(-1, (h, k)).transpose(-2, -3)


def _head_sq_dist(K: Tensor, kappa: float) -> Tensor:
    r""":math:`z^h_{ij} = \tfrac12\|y_i - y_j\|^2_{W_h} = \tfrac\kappa2\|k_i - k_j\|^2`, keys :math:`K_h = Y M_h`."""
    return _sq_dist(kappa * K, K, (0.5 * kappa) * (K * K).sum(-1))


def _pair_mask(token_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """:math:`m_i m_j` as ``(..., 1, n, n)`` (broadcasts over heads)."""
    m = token_mask.to(dtype)
    return (m.unsqueeze(-1) * m.unsqueeze(-2)).unsqueeze(-3)


def _head_gamma(K: Tensor, kappa: float, kernel: Kernel, token_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``z`` and :math:`\\Gamma = \\rho'(z)` per head (masked pairs set to zero)."""
    z = _head_sq_dist(K, kappa)
    return z, _masked(kernel.drho(z), token_mask)


def _energy_from_z(z: Tensor, Gamma: Tensor | None, K: Tensor, kappa: float, kernel: Kernel, ridge: float,
                   token_mask: Tensor | None) -> Tensor:
    r""":math:`E_h = \sum_{i<j} m_i m_j\rho(z^h_{ij}) + \tfrac\lambda2 \sum_i m_i\|y_i\|^2_{W_h}`, ``(..., h)``.

    The one place the energy is evaluated from the pairwise :math:`z` (``energy`` and ``step_and_energy`` both
    call it), as :math:`\sum_{i<j} R_{ij} = \tfrac12(\sum_{i,j} R_{ij} - \sum_i R_{ii})` (``R`` symmetric; no copy
    of the upper triangle). For the Gaussian kernel :math:`\rho = -\rho'`, so the energy is
    :func:`_gaussian_energy` of the off-diagonal row sums of :math:`\Gamma`, and a :math:`\Gamma` the step has
    already computed (``Gamma``, masked pairs zero) is reused (one exponential per pair in ``step_and_energy``); any
    other kernel evaluates :math:`\rho(z)`.
    """
    if type(kernel) is GaussianKernel:
        if Gamma is None:
            Gamma = _masked(kernel.drho(z), token_mask)
        E = _gaussian_energy(Gamma.sum(-1) - Gamma.diagonal(dim1=-2, dim2=-1))
    else:
        R = _masked(kernel.rho(z), token_mask)
        E = 0.5 * (R.sum((-1, -2)) - R.diagonal(dim1=-2, dim2=-1).sum(-1))
    if ridge:
        sq = kappa * (K * K).sum(-1)  # ‖y_i‖²_{W_h}
        if token_mask is not None:
            sq = sq * token_mask.to(sq.dtype).unsqueeze(-2)
        E = E + 0.5 * ridge * sq.sum(-1)
    return E


def _gaussian_energy(offdiag_row_sums: Tensor) -> Tensor:
    r"""Gaussian kernel, :math:`\rho(z) = -e^{-z} = -\gamma`: :math:`\sum_{i<j}\rho(z_{ij}) = -\tfrac12\sum_i
    \sum_{j\ne i}\gamma_{ij} = -\tfrac12\sum_i (D_{ii} - \gamma_{ii})` (MATH §1.1), from the off-diagonal row
    sums ``(..., n)`` of :math:`\Gamma` (masked rows zero). Used with the explicit :math:`\Gamma`
    (:func:`_energy_from_z`) and with the fused step's log-normalisers (:func:`_fused_gaussian_energy`)."""
    return -0.5 * offdiag_row_sums.sum(-1)


def _masked(R: Tensor, token_mask: Tensor | None) -> Tensor:
    """Pairwise ``R`` with every pair that involves a padded token set to zero."""
    return R if token_mask is None else R * _pair_mask(token_mask, R.dtype)


def _head_energy(Y: Tensor, M3: Tensor, kappa: float, kernel: Kernel, ridge: float,
                 token_mask: Tensor | None) -> Tensor:
    r""":math:`E_h` at ``Y`` (see :func:`_energy_from_z`), ``(..., h)``: one key product, one Gram product."""
    K = _keys(Y, M3)
    return _energy_from_z(_head_sq_dist(K, kappa), None, K, kappa, kernel, ridge, token_mask)


def _denominator(Gamma: Tensor, ridge: float, token_mask: Tensor | None) -> Tensor:
    r""":math:`D_{ii} + \lambda` on real tokens and 1 on padded ones (whose rows of Γ are zero), ``(..., h, n)``."""
    denom = Gamma.sum(-1) + ridge
    if token_mask is not None:
        denom = torch.where(token_mask.unsqueeze(-2), denom, torch.ones_like(denom))
    return denom


def _head_grad(Y: Tensor, M3: Tensor, kappa: float, kernel: Kernel, ridge: float,
               token_mask: Tensor | None) -> Tensor:
    r""":math:`\nabla E = \sum_h (L_h + \lambda I_m) Y W_h = \kappa \sum_h ((D_h + \lambda I_m) K_h - \Gamma_h K_h)
    M_h^\top` (``I_m`` = diag of the token mask)."""
    K = _keys(Y, M3)
    _, Gamma = _head_gamma(K, kappa, kernel, token_mask)
    diag = Gamma.sum(-1) + ridge
    if token_mask is not None:
        diag = diag * token_mask.to(diag.dtype).unsqueeze(-2)
    T = diag.unsqueeze(-1) * K - Gamma @ K  # (L_h + λ I_m) K_h,  (..., h, n, k)
    h, d, k = M3.shape
    return kappa * (T.transpose(-2, -3).flatten(-2) @ M3.permute(1, 0, 2).reshape(d, h * k).transpose(0, 1))


def _head_mixing(Y: Tensor, M3: Tensor, kappa: float, kernel: Kernel, ridge: float,
                 token_mask: Tensor | None) -> Tensor:
    r""":math:`A_h = (D_h + \lambda I)^{-1}\Gamma_h` (rows of padded tokens are zero), ``(..., h, n, n)``."""
    _, Gamma = _head_gamma(_keys(Y, M3), kappa, kernel, token_mask)
    return _mixing(Gamma, ridge, token_mask)


def _mixing(Gamma: Tensor, ridge: float, token_mask: Tensor | None) -> Tensor:
    r""":math:`A_h = (D_h + \lambda I)^{-1}\Gamma_h` from :math:`\Gamma_h`."""
    return Gamma / _denominator(Gamma, ridge, token_mask).unsqueeze(-1)


def _head_step(Y: Tensor, M3: Tensor, kappa: float, kernel: Kernel, ridge: float, token_mask: Tensor | None,
               values: Tensor | None, out: Tensor | None, alpha: float | Tensor,
               with_energy: bool) -> Tensor | tuple[Tensor, Tensor]:
    r"""The step :math:`Y^+` (:func:`_apply_step`) and, if ``with_energy``, :math:`E(Y) = \sum_h E_h(Y)` from the
    same keys, :math:`z` and :math:`\Gamma` (:func:`_energy_from_z`).

    ``values``: ``None`` for :math:`V = Y` (one head, ``out=None``), ``M3`` itself for :math:`V_h = K_h`
    (the keys are reused), else a ``(h, d, r)`` value factor.
    """
    K = _keys(Y, M3)
    z, Gamma = _head_gamma(K, kappa, kernel, token_mask)
    A = _mixing(Gamma, ridge, token_mask)
    V = Y.unsqueeze(-3) if values is None else K if values is M3 else _keys(Y, values)
    Yp = _apply_step(Y, A, V, out, alpha, token_mask)
    if not with_energy:
        return Yp
    return Yp, _energy_from_z(z, Gamma, K, kappa, kernel, ridge, token_mask).sum(-1)


_CHUNK_ENTRIES = 1 << 22  # pairwise entries (heads × n × n) per chunk: 16 MB in float32, the size of a typical L3


def _batch_chunks(fn, Y: Tensor, token_mask: Tensor | None, h: int) -> Tensor:
    """Apply ``fn(Y_chunk, mask_chunk)`` over chunks of the flattened leading batch dimensions and reassemble.

    Each batch element is computed independently, so chunking changes only the evaluation order, not the result.
    It keeps the ``(chunk, h, n, n)`` pairwise arrays small enough to stay in cache, which is several times faster
    than streaming them through memory at large batch sizes.
    """
    lead, (n, d) = Y.shape[:-2], Y.shape[-2:]
    Yf = Y.reshape(-1, n, d)
    mf = None if token_mask is None else token_mask.expand(*lead, n).reshape(-1, n)
    size = max(1, _CHUNK_ENTRIES // (h * n * n))
    if Yf.shape[0] <= size:
        out = fn(Yf, mf)
    else:
        parts = [fn(Yf[i:i + size], None if mf is None else mf[i:i + size]) for i in range(0, Yf.shape[0], size)]
        out = tuple(map(torch.cat, zip(*parts))) if isinstance(parts[0], tuple) else torch.cat(parts)
    if isinstance(out, tuple):  # several results per batch element (step_and_energy)
        return tuple(o.reshape(tuple(lead) + tuple(o.shape[1:])) for o in out)
    return out.reshape(tuple(lead) + tuple(out.shape[1:]))


def _heads_orthogonal(M3: Tensor, atol: float | None = None) -> bool:
    r"""Whether :math:`\max_{h\ne g}|M_h^\top M_g| \le` ``atol`` (default ``1e3·eps·max_h‖M_h‖_F²``), M3 (h, d, k)."""
    M = M3.detach()
    off = ~torch.eye(M.shape[0], dtype=torch.bool, device=M.device)
    err = float(torch.einsum("hdk,gdl->hgkl", M, M)[off].abs().max()) if off.any() else 0.0
    if atol is None:
        atol = 1e3 * torch.finfo(M.dtype).eps * max(1.0, float((M * M).sum((-1, -2)).max()))
    return err <= atol


def _apply_step(Y: Tensor, A: Tensor, V: Tensor, out: Tensor | None, alpha: float | Tensor,
                token_mask: Tensor | None) -> Tensor:
    r""":math:`Y^+ = Y - \alpha\, I_m \sum_h (V_h - A_h V_h)\, O_h`.

    ``V`` ``(..., h, n, r)`` are the values, ``out`` ``(h, r, d)`` the output maps :math:`O_h`; ``out=None`` means
    one head with :math:`V = Y` and :math:`O = I`.
    """
    R = V - A @ V
    if out is None:
        R = R.squeeze(-3)
    else:
        R = R.transpose(-2, -3).flatten(-2) @ out.flatten(0, 1)
    if token_mask is not None:
        R = R * token_mask.to(R.dtype).unsqueeze(-1)
    return Y - alpha * R


# ----------------------------------------------------------------------------------------------------------------
# module shell
# ----------------------------------------------------------------------------------------------------------------


class _PairwiseAttention(Energy):
    """Shared machinery of the single- and multi-head energies (the head-batched core above)."""

    M: Tensor

    def __init__(self, M: Tensor, *, ndim: int, kernel: Kernel | None, scale: float | None, ridge: float) -> None:
        super().__init__()
        M = _check_M(M, ndim)
        self.kernel = _check_kernel(kernel)
        self.scale = _resolve_scale(scale, M.shape[-1])
        self.ridge = _check_ridge(ridge)
        if isinstance(M, torch.nn.Parameter):
            self.M = M
        else:
            self.register_buffer("M", M)

    # subclasses: the (h, d, k) stack and the per-head value/output maps of the metric step
    def _M3(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _inputs(self, Y: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        Y = _check_Y(Y, self.M)
        return Y, _check_token_mask(token_mask, Y)

    @property
    def W(self) -> Tensor:
        r"""The metric :math:`W = \kappa M M^\top` (per head for multi-head energies)."""
        return self.scale * (self.M @ self.M.transpose(-1, -2))

    def lambda_max_W(self) -> float:
        r""":math:`\lambda_{\max}(W) = \kappa\,\sigma_{\max}(M)^2` (for heads: :math:`\max_h\lambda_{\max}(W_h)`)."""
        return self.scale * float(torch.linalg.matrix_norm(self.M.detach(), ord=2).max()) ** 2

    def energy(self, Y: Tensor, token_mask: Tensor | None = None, *, check: bool = True) -> Tensor:
        r"""Energy per batch element, shape ``Y.shape[:-2]`` (padded tokens excluded).

        ``check=False`` skips the input validation (a full pass over ``Y``): only for inputs known to be good, e.g.
        states a model produced itself (the unroller's traces); non-finite states then give non-finite energies.
        """
        if check:
            Y, token_mask = self._inputs(Y, token_mask)
        M3 = self._M3()
        return _batch_chunks(lambda Yc, mc: _head_energy(Yc, M3, self.scale, self.kernel, self.ridge, mc).sum(-1),
                             Y, token_mask, M3.shape[0])

    def grad(self, Y: Tensor, token_mask: Tensor | None = None) -> Tensor:
        r"""Closed-form gradient :math:`\nabla E = \sum_h (L_h + \lambda I) Y W_h` (MATH §1.1)."""
        Y, token_mask = self._inputs(Y, token_mask)
        M3 = self._M3()
        return _batch_chunks(lambda Yc, mc: _head_grad(Yc, M3, self.scale, self.kernel, self.ridge, mc),
                             Y, token_mask, M3.shape[0])

    def autograd_grad(self, Y: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """Autograd twin of :meth:`grad` (reverse-mode AD of :meth:`energy` alone)."""
        Y = Y.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.energy(Y, token_mask).sum(), Y)
        return g

    def _value_maps(self, M3: Tensor, preconditioner: str) -> tuple[Tensor | None, Tensor | None]:
        """The step's values and output maps (see :func:`_head_step`)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def step_and_energy(self, Y: Tensor, alpha: float | Tensor = 1.0, *, preconditioner: str = "metric",
                        token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""The step and the energy at its input, :math:`(Y^+, E(Y))`, from one evaluation of :math:`z` and
        :math:`\Gamma` at ``Y`` (MATH §1.1).

        The step needs :math:`z_{ij}` and :math:`\Gamma = \rho'(z)`; the energy :math:`\sum_{i<j}\rho(z_{ij})` is
        the same :math:`z` summed (for the Gaussian kernel, :math:`\rho = -\rho'`: the already computed
        :math:`\Gamma` summed). Equals ``(self.step(Y, alpha, ...), self.energy(Y, token_mask))``; the step size is
        checked as in :meth:`step`. The unroller uses it to trace :math:`E` at the input of every attention step.
        """
        return self._step(Y, alpha, preconditioner, token_mask, with_energy=True)

    def _step(self, Y: Tensor, alpha: float | Tensor, preconditioner: str, token_mask: Tensor | None,
              with_energy: bool) -> Tensor | tuple[Tensor, Tensor]:
        Y, token_mask = self._inputs(Y, token_mask)
        r = self.step_range(preconditioner)
        check_step_size(alpha, "alpha", low=r.low, high=r.high, reason=r.reason, high_inclusive=r.high_inclusive)
        M3 = self._M3()
        values, out = self._value_maps(M3, preconditioner)
        return _batch_chunks(
            lambda Yc, mc: _head_step(Yc, M3, self.scale, self.kernel, self.ridge, mc, values, out, alpha,
                                      with_energy),
            Y, token_mask, M3.shape[0])

    def _range(self, preconditioner: str, orthogonal: bool) -> StepRange:
        lam = self.lambda_max_W() if preconditioner == "token" else 0.0
        return attention_step_range(self.kernel, preconditioner, lambda_max_W=lam, orthogonal_heads=orthogonal)

    def extra_repr(self) -> str:
        return f"M={tuple(self.M.shape)}, kernel={self.kernel!r}, scale={self.scale:.4g}, ridge={self.ridge:g}"


class AttentionEnergy(_PairwiseAttention):
    r"""Single-head pairwise attention energy (MATH §1.1).

    .. math::
        E(Y) = \sum_{i<j}\rho\big(\tfrac12\|y_i - y_j\|_W^2\big) + \tfrac\lambda2\|Y\|_W^2,\quad W = \kappa M M^\top,
        \quad \nabla E = (L + \lambda I)\, Y W .

    Steps (``step``): (a) ``preconditioner="metric"``, :math:`Y^+ = (1-\alpha)Y + \alpha(D+\lambda I)^{-1}\Gamma Y`
    (Gaussian, λ = 0: :math:`\mathrm{softmax}_\beta(YWY^\top) Y`, i.e. self-attention with :math:`Q = K = YM`,
    scale :math:`\kappa`, identity values, key bias β and residual weight :math:`1-\alpha`); (b) ``"token"``,
    :math:`Y^+ = Y(I - \alpha W) + \alpha (D+\lambda I)^{-1}\Gamma Y W`.

    Args:
        M: factor ``(d, k)`` of the metric (a plain tensor is stored as a buffer, an ``nn.Parameter`` as a parameter).
        kernel: concave non-decreasing ρ (default :class:`~energy.kernels.GaussianKernel`).
        scale: :math:`\kappa` (default :math:`1/\sqrt{k}`).
        ridge: λ ≥ 0.

    >>> import torch
    >>> E = AttentionEnergy(torch.eye(3, dtype=torch.float64))
    >>> Y = torch.randn(2, 5, 3, dtype=torch.float64)
    >>> bool((E.energy(E.step(Y, 1.0)) <= E.energy(Y)).all())
    True
    """

    def __init__(self, M: Tensor, *, kernel: Kernel | None = None, scale: float | None = None,
                 ridge: float = 0.0) -> None:
        super().__init__(M, ndim=2, kernel=kernel, scale=scale, ridge=ridge)

    def _M3(self) -> Tensor:
        return self.M.unsqueeze(0)

    def weights(self, Y: Tensor, token_mask: Tensor | None = None) -> Tensor:
        r""":math:`\Gamma = [\rho'(z_{ij})]`, shape ``(..., n, n)`` (pairs with a padded token are 0)."""
        Y, token_mask = self._inputs(Y, token_mask)
        return _head_gamma(_keys(Y, self._M3()), self.scale, self.kernel, token_mask)[1].squeeze(-3)

    def attention_matrix(self, Y: Tensor, token_mask: Tensor | None = None) -> Tensor:
        r""":math:`A = (D + \lambda I)^{-1}\Gamma` (= :math:`\mathrm{softmax}_\beta(YWY^\top)` for Gaussian, λ = 0)."""
        Y, token_mask = self._inputs(Y, token_mask)
        return _head_mixing(Y, self._M3(), self.scale, self.kernel, self.ridge, token_mask).squeeze(-3)

    def step_range(self, preconditioner: str = "metric") -> StepRange:
        """Guaranteed descent range of :meth:`step` (see :func:`attention_step_range`)."""
        return self._range(_check_preconditioner(preconditioner), True)

    def step(self, Y: Tensor, alpha: float | Tensor = 1.0, *, preconditioner: str = "metric",
             token_mask: Tensor | None = None) -> Tensor:
        r"""Preconditioned descent step :math:`Y^+ = Y - \alpha P^{-1}\nabla E` (MATH §1.1 (a)/(b)).

        ``"metric"``: :math:`Y^+ = Y - \alpha (D+\lambda I)^{-1}\nabla E\, W^{-1} = (1-\alpha)Y + \alpha A Y`;
        ``"token"``: :math:`Y^+ = Y - \alpha (D+\lambda I)^{-1}\nabla E = Y - \alpha (Y - AY) W`, with
        :math:`A = (D+\lambda I)^{-1}\Gamma`. The closed forms need no inverse of :math:`W`. Warns (or raises in
        :func:`~energy.strict_mode`) if ``alpha`` is outside :meth:`step_range`. Padded tokens are unchanged.
        """
        return self._step(Y, alpha, preconditioner, token_mask, with_energy=False)

    def _value_maps(self, M3: Tensor, preconditioner: str) -> tuple[Tensor | None, Tensor | None]:
        # metric: identity values (V = Y, no output map); token: values K = Y M, output map κ Mᵀ
        return (None, None) if preconditioner == "metric" else (M3, self.scale * M3.transpose(-1, -2))

    def preconditioned_grad(self, Y: Tensor, G: Tensor | None = None, *, preconditioner: str = "metric",
                            token_mask: Tensor | None = None) -> Tensor:
        r"""Apply the inverse preconditioner of :meth:`step` to a gradient ``G`` (default: :meth:`grad`).

        ``"metric"``: :math:`(D + \lambda I)^{-1} G W^{-1}` (the preconditioner :math:`((D+\lambda I)\otimes W)^{-1}`;
        needs :math:`W \succ 0`, i.e. ``M`` of full row rank, ``k ≥ d``); ``"token"``: :math:`(D+\lambda I)^{-1} G`.
        Rows of padded tokens are 0. ``Y - alpha * preconditioned_grad(Y, autograd_grad(Y))`` equals :meth:`step`.
        """
        Y, token_mask = self._inputs(Y, token_mask)
        _check_preconditioner(preconditioner)
        G = self.grad(Y, token_mask) if G is None else check_tensor(G, "G")
        if G.shape != Y.shape:
            raise EnergyInputError(f"`G` must have the shape of `Y` {tuple(Y.shape)}, got {tuple(G.shape)}.")
        _, Gamma = _head_gamma(_keys(Y, self._M3()), self.scale, self.kernel, token_mask)
        inv = 1.0 / _denominator(Gamma, self.ridge, token_mask).squeeze(-2)
        if token_mask is not None:
            inv = inv * token_mask.to(inv.dtype)
        P = inv.unsqueeze(-1) * G
        if preconditioner == "token":
            return P
        W = check_psd(self.W, "W", strict_pd=True)
        return torch.linalg.solve(W, P.transpose(-1, -2)).transpose(-1, -2)  # P W⁻¹ (W symmetric)


class MultiHeadAttentionEnergy(_PairwiseAttention):
    r"""Multi-head attention energy :math:`E = \sum_h E_h`, :math:`W_h = \kappa M_h M_h^\top` (MATH §1.2).

    Step (sum of per-head steps, :math:`A_h = (D_h + \lambda I)^{-1}\Gamma_h`):

    * ``"metric"``: :math:`Y^+ = Y - \alpha\sum_h (Y - A_h Y) P_h`, :math:`P_h` = orthogonal projector onto
      :math:`\mathrm{range}(M_h)` (per-head value/output map :math:`P_h`);
    * ``"token"``: :math:`Y^+ = Y - \alpha\sum_h (Y - A_h Y) W_h`.

    **Guarantee only for orthogonal heads** (:meth:`heads_orthogonal`, :math:`M_h^\top M_g = 0`): then
    :math:`E(Y) = \sum_h E_h(Y P_h)`, the step acts independently in each subspace and equals the preconditioned
    gradient step :math:`Y - \alpha\sum_h (D_h+\lambda I)^{-1}\nabla E\, W_h^{+}` (resp. :math:`\ldots\nabla E\,P_h`),
    so every head keeps the single-head range. Components of ``Y`` outside all ranges are left unchanged (the
    energy does not depend on them). **General heads:** the summed step is not a single preconditioned gradient step
    and no step size is guaranteed; :meth:`step` warns (raises in strict mode), descent is measured in the tests.

    Args:
        M: ``(h, d, k)`` stack of per-head factors.
        kernel, scale, ridge: as for :class:`AttentionEnergy` (``scale`` defaults to :math:`1/\sqrt{k}`).
    """

    def __init__(self, M: Tensor, *, kernel: Kernel | None = None, scale: float | None = None,
                 ridge: float = 0.0) -> None:
        super().__init__(M, ndim=3, kernel=kernel, scale=scale, ridge=ridge)

    def _M3(self) -> Tensor:
        return self.M

    @property
    def num_heads(self) -> int:
        return self.M.shape[0]

    def heads_orthogonal(self, atol: float | None = None) -> bool:
        r"""Whether :math:`\max_{h\ne g}|M_h^\top M_g| \le` ``atol`` (default ``1e3·eps·max_h‖M_h‖_F²``)."""
        return _heads_orthogonal(self.M, atol)

    def projectors(self) -> Tensor:
        r""":math:`P_h = U_h U_h^\top`, shape ``(h, d, d)`` (see :func:`head_bases`)."""
        U = head_bases(self.M)
        return U @ U.transpose(-1, -2)

    def weights(self, Y: Tensor, token_mask: Tensor | None = None) -> Tensor:
        r"""Per-head :math:`\Gamma_h`, shape ``(..., h, n, n)``."""
        Y, token_mask = self._inputs(Y, token_mask)
        return _head_gamma(_keys(Y, self.M), self.scale, self.kernel, token_mask)[1]

    def attention_matrix(self, Y: Tensor, token_mask: Tensor | None = None) -> Tensor:
        r"""Per-head :math:`A_h = (D_h + \lambda I)^{-1}\Gamma_h`, shape ``(..., h, n, n)``."""
        Y, token_mask = self._inputs(Y, token_mask)
        return _head_mixing(Y, self.M, self.scale, self.kernel, self.ridge, token_mask)

    def step_range(self, preconditioner: str = "metric") -> StepRange:
        """Guaranteed range for orthogonal heads; the empty range ``(0, 0)`` for general heads (MATH §1.2)."""
        return self._range(_check_preconditioner(preconditioner), self.heads_orthogonal())

    def step(self, Y: Tensor, alpha: float | Tensor = 1.0, *, preconditioner: str = "metric",
             token_mask: Tensor | None = None) -> Tensor:
        r"""Sum of per-head steps (see the class docstring); guaranteed descent only for orthogonal heads."""
        return self._step(Y, alpha, preconditioner, token_mask, with_energy=False)

    def _value_maps(self, M3: Tensor, preconditioner: str) -> tuple[Tensor | None, Tensor | None]:
        if preconditioner == "metric":
            U = head_bases(M3)  # P_h = U_h U_hᵀ: values Y U_h, output map U_hᵀ
            return U, U.transpose(-1, -2)
        return M3, self.scale * M3.transpose(-1, -2)  # values K_h = Y M_h (the keys), output map κ M_hᵀ

    def preconditioned_grad(self, Y: Tensor, G: Tensor | None = None, *, preconditioner: str = "metric",
                            token_mask: Tensor | None = None) -> Tensor:
        r"""Orthogonal heads only: :math:`\sum_h (D_h+\lambda I)^{-1} G\, W_h^{+}` (``"metric"``) or
        :math:`\sum_h (D_h+\lambda I)^{-1} G\, P_h` (``"token"``), so that ``Y - α·preconditioned_grad(Y, ∇E)``
        equals :meth:`step`. Raises :class:`~energy.ConstraintError` for general heads, whose step is not a
        preconditioned gradient step."""
        Y, token_mask = self._inputs(Y, token_mask)
        _check_preconditioner(preconditioner)
        if not self.heads_orthogonal():
            raise ConstraintError(
                "the heads are not mutually orthogonal (M_hᵀ M_g ≠ 0 for some h ≠ g), so the summed per-head step "
                "is not a preconditioned gradient step (MATH §1.2); use orthogonal heads, e.g. M_h built from "
                "disjoint blocks of an orthogonal matrix."
            )
        G = self.grad(Y, token_mask) if G is None else check_tensor(G, "G")
        if G.shape != Y.shape:
            raise EnergyInputError(f"`G` must have the shape of `Y` {tuple(Y.shape)}, got {tuple(G.shape)}.")
        _, Gamma = _head_gamma(_keys(Y, self.M), self.scale, self.kernel, token_mask)
        inv = 1.0 / _denominator(Gamma, self.ridge, token_mask)  # (..., h, n)
        if token_mask is not None:
            inv = inv * token_mask.to(inv.dtype).unsqueeze(-2)
        right = torch.linalg.pinv(self.W, hermitian=True) if preconditioner == "metric" else self.projectors()
        return ((inv.unsqueeze(-1) * G.unsqueeze(-3)) @ right).sum(-3)


# ----------------------------------------------------------------------------------------------------------------
# fused fast path
# ----------------------------------------------------------------------------------------------------------------


def attention_step_fused(
    Y: Tensor,
    M: Tensor,
    alpha: float = 1.0,
    *,
    scale: float | None = None,
    preconditioner: str = "metric",
    token_mask: Tensor | None = None,
    value_basis: Tensor | None = None,
    check: bool = True,
    return_energy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Gaussian-kernel attention step (λ = 0) through ``F.scaled_dot_product_attention`` (MATH §1.1, fused β).

    The key bias is folded into an augmented query/key pair: with :math:`q_i = k_i = y_i M_h`,

    .. math:: \tilde q_i = [q_i, 1],\quad \tilde k_j = [k_j, -\tfrac12\|k_j\|^2],\qquad
        \kappa\, \tilde q_i^\top \tilde k_j = \kappa\, q_i^\top k_j + \beta_j,\quad
        \beta_j = -\tfrac{\kappa}{2}\|k_j\|^2 = -\tfrac12\|y_j\|^2_{W_h},

    and the scale :math:`\kappa` is passed explicitly (the augmented width would change SDPA's default).

    * ``M`` of shape ``(d, k)``: equals :meth:`AttentionEnergy.step` (metric: identity values; token: values
      :math:`K = YM`, output map :math:`\kappa M^\top`).
    * ``M`` of shape ``(h, d, k)``: equals :meth:`MultiHeadAttentionEnergy.step` (metric: values :math:`Y U_h`,
      output map :math:`U_h^\top`, :math:`P_h = U_h U_h^\top`; token: values :math:`K_h`, output :math:`\kappa
      M_h^\top`). All heads' queries (and values) come from one matmul with the stacked factors.

    Args:
        Y: tokens ``(..., n, d)``.
        M: ``(d, k)`` or ``(h, d, k)``.
        alpha: step size (checked against the guaranteed range unless ``check=False``).
        scale: :math:`\kappa` (default :math:`1/\sqrt{k}`).
        preconditioner: ``"metric"`` or ``"token"``.
        token_mask: optional key-padding mask ``(..., n)``, ``True`` = real token; padded rows are returned unchanged.
        value_basis: optional precomputed :func:`head_bases` ``(h, d, r)`` of ``M`` (multi-head metric step), to
            avoid an SVD per call. It is trusted, not re-checked.
        check: validate inputs and the step size (set ``False`` only in hot loops whose inputs are known good).
        return_energy: also return the energy at the input, :math:`E(Y) = \sum_h E_h(Y)` (shape ``Y.shape[:-2]``).
            Without autograd it comes from the attention kernel's row log-normalisers at no pairwise cost
            (:func:`_fused_gaussian_energy`); when autograd records it is evaluated explicitly (differentiable).

    Autograd: differentiable in ``Y``, ``M``, ``alpha`` (a tensor) and ``value_basis``; no tensor saved for
    backward is written in place (see :func:`_augmented_qkv`).

    Returns:
        ``Y⁺`` of the shape of ``Y``; with ``return_energy``, ``(Y⁺, E(Y))``.
    """
    single = isinstance(M, Tensor) and M.ndim == 2
    if check:
        M = check_tensor(M, "M")
        if M.ndim not in (2, 3):
            raise EnergyInputError(f"`M` must be (d, k) or (h, d, k), got shape {tuple(M.shape)}.")
        Y = _check_Y(Y, M)
        token_mask = _check_token_mask(token_mask, Y)
        _check_preconditioner(preconditioner)
    M3 = M.unsqueeze(0) if single else M
    h, d, k = M3.shape
    kappa = _resolve_scale(scale, k)
    if check and value_basis is not None:
        value_basis = check_tensor(value_basis, "value_basis", ndim=3, trailing=(h, d, None), finite=False)
        check_same_float_dtype(M=M, value_basis=value_basis)
    if check:
        orthogonal = single or _heads_orthogonal(M3)
        lam = kappa * float(torch.linalg.matrix_norm(M3.detach(), ord=2).max()) ** 2 if preconditioner == "token" else 0
        r = attention_step_range(GaussianKernel(), preconditioner, lambda_max_W=lam, orthogonal_heads=orthogonal)
        check_step_size(alpha, "alpha", low=r.low, high=r.high, reason=r.reason, high_inclusive=r.high_inclusive)

    lead, n = Y.shape[:-2], Y.shape[-2]
    if preconditioner == "metric" and not single:
        values = head_bases(M3) if value_basis is None else value_basis  # values Y U_h, output map U_hᵀ
        out = values.transpose(-1, -2)
    elif preconditioner == "metric":
        values, out = torch.eye(d, dtype=M3.dtype, device=M3.device).unsqueeze(0), None  # identity values
    else:
        values, out = M3, kappa * M3.transpose(-1, -2)  # values K_h = Y M_h, output map κ M_hᵀ
    q, kt, v = _augmented_qkv(Y.reshape(-1, n, d), M3, values)
    mask_flat = None if token_mask is None else token_mask.expand(*lead, n).reshape(-1, n)
    attn_mask = None if mask_flat is None else mask_flat.view(-1, 1, 1, n)
    r = values.shape[-1]
    energy = None
    if return_energy and not kt.requires_grad:
        O, lse = _sdpa_with_lse(q, kt, v, mask_flat, kappa)
        energy = _fused_gaussian_energy(lse, kt[..., k], kappa, mask_flat).reshape(lead)
    else:
        O = F.scaled_dot_product_attention(q, kt, v, attn_mask=attn_mask, scale=kappa)
        if return_energy:  # autograd records: the kernel's log-normalisers carry no gradient
            energy = _head_energy(Y, M3, kappa, GaussianKernel(), 0.0, token_mask).sum(-1)
    O = O[..., :r]
    Y2 = Y.reshape(-1, d)
    if out is None:  # Y⁺ = (1 − α) Y + α O
        O = O.reshape(-1, d)
        Yp = torch.lerp(Y2, O, alpha) if not isinstance(alpha, Tensor) else Y2 + alpha * (O - Y2)
    else:  # Y⁺ = Y + α Σ_h (O_h − V_h) out_h
        R = (O - v[..., :r]).transpose(1, 2).reshape(-1, h * r)
        out2 = out.reshape(h * r, d)
        Yp = torch.addmm(Y2, R, out2, alpha=alpha) if not isinstance(alpha, Tensor) else Y2 + alpha * (R @ out2)
    Yp = Yp.reshape(*lead, n, d)
    if token_mask is not None:
        Yp = torch.where(token_mask.unsqueeze(-1), Yp, Y)
    return (Yp, energy) if return_energy else Yp


def _fused_gaussian_energy(lse: Tensor, beta_over_kappa: Tensor, kappa: float, token_mask: Tensor | None) -> Tensor:
    r"""Gaussian energy :math:`\sum_h E_h` from the fused step's row log-normalisers (MATH §1.1), ``(B,)``.

    The step's logits are :math:`s_{ij} = y_i^\top W y_j + \beta_j` and :math:`z_{ij} = -\beta_i - s_{ij}`, so
    with :math:`\ell_i = \log\sum_j m_j e^{s_{ij}}` (what the attention kernel normalises by)

    .. math:: D_{ii} = \sum_j m_j\gamma_{ij} = e^{\beta_i + \ell_i}, \qquad
        \sum_{j\ne i} m_j\gamma_{ij} = D_{ii} - 1 = \operatorname{expm1}(\beta_i + \ell_i),

    (:math:`\gamma_{ii} = 1`), and :func:`_gaussian_energy` sums them over the real tokens: no pairwise work.

    Args:
        lse: :math:`\ell` ``(B, h, n)``; beta_over_kappa: :math:`\beta/\kappa = -\tfrac12\|k_i\|^2` ``(B, h, n)``
        (the keys' augmented column); kappa: :math:`\kappa`; token_mask: ``(B, n)`` or ``None``.
    """
    off = torch.expm1(torch.add(lse, beta_over_kappa, alpha=kappa))
    if token_mask is not None:
        off = off * token_mask.to(off.dtype).unsqueeze(-2)
    return _gaussian_energy(off.flatten(-2))  # sum over heads and tokens


@functools.cache
def _flash_lse_op():
    """torch's CPU flash-attention op, which also returns the row log-sum-exp (``None`` if this torch lacks it)."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


def _sdpa_with_lse(q: Tensor, kt: Tensor, v: Tensor, token_mask: Tensor | None,
                   kappa: float) -> tuple[Tensor, Tensor]:
    r"""Scaled-dot-product attention ``(B, h, n, w)`` and the log-sum-exp ``(B, h, n)`` of its logits (no autograd).

    On CPU, torch's flash kernel (the one ``F.scaled_dot_product_attention`` dispatches to) returns both in one
    pass; elsewhere, or if that op is unavailable, the logits are formed explicitly.
    """
    bias = None
    if token_mask is not None:  # additive key mask: 0 for real tokens, −∞ for padding
        bias = torch.zeros(token_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~token_mask, -math.inf)
        bias = bias.view(-1, 1, 1, token_mask.shape[-1])
    op = _flash_lse_op() if q.device.type == "cpu" else None
    if op is not None:
        O, lse = op(q, kt, v, attn_mask=bias, scale=kappa)
        return O, lse
    S = kappa * (q @ kt.transpose(-1, -2))
    if bias is not None:
        S = S + bias
    lse = torch.logsumexp(S, dim=-1)
    return torch.exp(S - lse.unsqueeze(-1)) @ v, lse


def _augmented_qkv(Y: Tensor, M3: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Augmented queries, keys and values of all heads from one matmul (MATH §1.1, fused β).

    .. math:: \tilde q_i = [y_i M_h,\ 1],\qquad \tilde k_j = [y_j M_h,\ -\tfrac12\|y_j M_h\|^2],\qquad
        \tilde v_j = [y_j U_h,\ 0]

    ``Y`` ``(B, n, d)``, ``M3`` ``(h, d, k)``, ``values`` ``(h, d, r)``. All three are padded with zero columns to
    one width ``w = max(k + 1, r)`` (zero columns change neither the scores nor the first ``r`` output columns),
    because the CPU flash kernel needs equal query/key and value widths. Returns ``(B, h, n, w)`` tensors with a
    contiguous last dimension: views of one buffer, except that when autograd records, the keys are a new tensor
    (the β column is added out of place, so no tensor saved for backward is modified).
    """
    B, n, d = Y.shape
    h, _, k = M3.shape
    r = values.shape[-1]
    w = max(k + 1, r)
    factor = M3.new_zeros(d, h, 3, w)
    factor[:, :, 0, :k] = M3.permute(1, 0, 2)
    factor[:, :, 1, :k] = M3.permute(1, 0, 2)
    factor[:, :, 2, :r] = values.permute(1, 0, 2)
    bias = M3.new_zeros(h, 3, w)
    bias[:, 0, k] = 1.0  # the query's constant 1
    X = torch.addmm(bias.reshape(-1), Y.reshape(-1, d), factor.reshape(d, -1)).view(B, n, h, 3, w)
    q, kt, v = X.unbind(3)  # views; under autograd one stacked gradient instead of three zero-filled ones
    beta = torch.linalg.vector_norm(kt[..., :k], dim=-1).square().mul(-0.5)  # -½‖k_j‖² = β_j/κ
    if torch.is_grad_enabled() and X.requires_grad:
        # autograd records: the norm saved a view of X, so X must not be written; add β as a one-hot column
        onehot = torch.zeros(w, dtype=X.dtype, device=X.device)
        onehot[k] = 1.0
        kt = kt + beta.unsqueeze(-1) * onehot
    else:  # no graph: write β into the zero column of the buffer (no copy of the keys)
        kt[..., k] = beta
    return q.transpose(1, 2), kt.transpose(1, 2), v.transpose(1, 2)
