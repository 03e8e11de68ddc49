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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

from energy._validation import (
    DenseSizeError,
    EnergyInputError,
    VerificationPrecisionWarning,
    check_same_float_dtype,
    check_tensor,
    warn_if_not_float64,
)
from energy.reference import single_head_attention

__all__ = [
    "PARAMS",
    "BLOCKS",
    "BLOCKS_O",
    "AttentionMoments",
    "DenseSizeError",
    "linear_attention",
    "attention_output",
    "attention_loss",
    "loss_constant",
    "attention_moments",
    "attention_jacobians",
    "hessian_block",
    "hessian_blocks",
    "attention_hessian",
    "bilinear_term",
    "qk_hessian_blocks",
    "qk_chain_matrix",
    "autograd_attention_hessian",
    "autograd_attention_ggn",
    "check_dense_budget",
    "VerificationPrecisionWarning",
    "warn_if_not_float64",
]

Part = Literal["H", "H_o", "H_f"]
Reduction = Literal["sum", "mean"]

#: Parameter order of the assembled Hessian.
PARAMS: tuple[str, ...] = ("Q", "K", "V")
#: The six distinct blocks (the other three are their transposes).
BLOCKS: tuple[tuple[str, str], ...] = (("V", "V"), ("V", "Q"), ("V", "K"), ("Q", "Q"), ("K", "K"), ("Q", "K"))
#: The extra distinct blocks with an output projection ``W_O``.
BLOCKS_O: tuple[tuple[str, str], ...] = (("O", "O"), ("V", "O"), ("O", "Q"), ("O", "K"))

_GIB = 1024**3
DEFAULT_MAX_GIB = 4.0


def check_dense_budget(rows: int, cols: int, dtype: torch.dtype, max_gib: float | None, what: str) -> None:
    """Raise :class:`DenseSizeError` if a dense ``rows × cols`` matrix would exceed ``max_gib`` GiB.

    Args:
        rows, cols: size of the requested matrix.
        dtype: its dtype.
        max_gib: budget in GiB (``None`` = :data:`DEFAULT_MAX_GIB`; ``float('inf')`` disables the guard).
        what: name of the requested object for the message.
    """
    budget = DEFAULT_MAX_GIB if max_gib is None else max_gib
    size = rows * cols * torch.empty((), dtype=dtype).element_size() / _GIB
    if size > budget:
        raise DenseSizeError(
            f"{what} would be a dense {rows} × {cols} matrix of {size:.2f} GiB, above the budget of {budget:g} GiB "
            "(`max_gib`). Use the exact structured norms/traces/diagonals of energy.hessian.structure, or the "
            "matrix-free operators of energy.hessian.operators; raise `max_gib` only if the memory is there."
        )


# ----------------------------------------------------------------------------------------------------------------
# forward pass and loss (the autograd twin differentiates exactly these)
# ----------------------------------------------------------------------------------------------------------------


def linear_attention(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, *, scale: float | None = None, mask: Tensor | None = None
) -> Tensor:
    r"""Linear (softmax-free) self-attention, MATH §3.6.

    .. math:: F = \big(\kappa\, X W_Q W_K^\top X^\top \odot m\big)\, X W_V,\qquad \kappa = 1/\sqrt{d_K}

    ``mask`` is boolean (``True`` = attend); ``m`` is its 0/1 version (no mask: all ones).
    (``energy.reference`` has no linear attention, so it is defined here, next to its Hessian.)
    """
    kappa = 1.0 / math.sqrt(W_Q.shape[-1]) if scale is None else scale
    A = kappa * (X @ W_Q) @ (X @ W_K).transpose(-1, -2)
    if mask is not None:
        A = A * mask.to(A.dtype)
    return A @ (X @ W_V)


def attention_output(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    *,
    W_O: Tensor | None = None,
    scale: float | None = None,
    mask: Tensor | None = None,
    linear: bool = False,
) -> Tensor:
    """``F``: :func:`energy.reference.single_head_attention` (softmax) or :func:`linear_attention`, times ``W_O``."""
    if linear:
        F = linear_attention(X, W_Q, W_K, W_V, scale=scale, mask=mask)
    else:
        F = single_head_attention(X, W_Q, W_K, W_V, scale=scale, mask=mask)
    return F if W_O is None else F @ W_O


def loss_constant(X: Tensor, c: float | None, reduction: Reduction, d_out: int | None = None) -> float:
    r"""The effective constant ``c_eff`` with ``ℓ = c_eff Σ_b ‖F_b − Y_b‖²``.

    ``c`` defaults to ``1/(L d_out)`` (per-sequence mean squared error, the paper's likely choice, MATH §3.1;
    ``d_out = d_V``, or ``d_O`` with an output projection); ``reduction="mean"`` divides by the number of
    sequences ``B``.
    """
    if reduction not in ("sum", "mean"):
        raise EnergyInputError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}.")
    L = X.shape[-2]
    d_out = X.shape[-1] if d_out is None else d_out
    c0 = 1.0 / (L * d_out) if c is None else float(c)
    if not math.isfinite(c0) or c0 <= 0:
        raise EnergyInputError(f"`c` must be a positive finite number, got {c!r}.")
    n_seq = X.shape[0] if X.ndim == 3 else 1
    return c0 / n_seq if reduction == "mean" else c0


def attention_loss(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    Y: Tensor,
    *,
    W_O: Tensor | None = None,
    c: float | None = None,
    reduction: Reduction = "sum",
    scale: float | None = None,
    mask: Tensor | None = None,
    linear: bool = False,
) -> Tensor:
    r"""The loss ``ℓ = c_eff Σ_b ‖F_b − Y_b‖²_F`` (MATH §3.1; ``c_eff`` from :func:`loss_constant`)."""
    F = attention_output(X, W_Q, W_K, W_V, W_O=W_O, scale=scale, mask=mask, linear=linear)
    return loss_constant(X, c, reduction, F.shape[-1]) * ((F - Y) ** 2).sum()


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------


def _validate(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, Y: Tensor | None, mask: Tensor | None, causal: bool,
    W_O: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Check shapes/dtypes; return ``X`` as ``(B, L, d_V)``, ``Y`` likewise, and the boolean mask."""
    check_tensor(X, "X")
    if X.ndim not in (2, 3):
        raise EnergyInputError(f"`X` must have shape (L, d_V) or (B, L, d_V), got {tuple(X.shape)}.")
    L, d_V = X.shape[-2], X.shape[-1]
    check_tensor(W_Q, "W_Q", ndim=2)
    check_tensor(W_K, "W_K", ndim=2)
    check_tensor(W_V, "W_V", ndim=2)
    if W_Q.shape[0] != d_V:
        raise EnergyInputError(f"`W_Q` must have shape (d_V, d_K) = ({d_V}, d_K), got {tuple(W_Q.shape)}.")
    if W_K.shape != W_Q.shape:
        raise EnergyInputError(f"`W_K` must have the shape of `W_Q` {tuple(W_Q.shape)}, got {tuple(W_K.shape)}.")
    if W_V.shape != (d_V, d_V):
        raise EnergyInputError(
            f"`W_V` must have shape (d_V, d_V) = ({d_V}, {d_V}) (put a rectangular map in `W_O`), got "
            f"{tuple(W_V.shape)}."
        )
    d_out = d_V
    if W_O is not None:
        check_tensor(W_O, "W_O", ndim=2)
        if W_O.shape[0] != d_V:
            raise EnergyInputError(f"`W_O` must have shape (d_V, d_O) = ({d_V}, d_O), got {tuple(W_O.shape)}.")
        d_out = W_O.shape[1]
    if Y is not None:
        check_tensor(Y, "Y")
        if Y.shape != (*X.shape[:-1], d_out):
            raise EnergyInputError(f"`Y` (the target of F) must have shape {(*X.shape[:-1], d_out)} (X's with the "
                                   f"output width), got {tuple(Y.shape)}.")
    check_same_float_dtype(X=X, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, Y=Y)
    if causal:
        if mask is not None:
            raise EnergyInputError("pass either `mask` or `causal=True`, not both.")
        mask = torch.ones(L, L, dtype=torch.bool, device=X.device).tril()
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise EnergyInputError(
                "`mask` must be a boolean tensor (True = attend), e.g. torch.ones(L, L, dtype=torch.bool).tril()."
            )
        if mask.shape[-2:] != (L, L) or mask.ndim not in (2, 3) or (mask.ndim == 3 and X.ndim == 2):
            raise EnergyInputError(
                f"`mask` must have shape (L, L) or (B, L, L) with L = {L}, got {tuple(mask.shape)}."
            )
        if not bool(mask.any(-1).all()):
            raise EnergyInputError("every query row of `mask` must attend to at least one key.")
    X3 = X if X.ndim == 3 else X.unsqueeze(0)
    Y3 = None if Y is None else (Y if Y.ndim == 3 else Y.unsqueeze(0))
    if mask is not None:
        if mask.ndim == 3 and mask.shape[0] != X3.shape[0]:
            raise EnergyInputError(f"`mask` has {mask.shape[0]} sequences but `X` has {X3.shape[0]}.")
        mask = mask.expand(X3.shape[0], L, L)
    return X3, Y3, mask


# ----------------------------------------------------------------------------------------------------------------
# moments (MATH §3.2)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionMoments:
    r"""The attention moments of MATH §3.2, computed once, with rows ``i`` of all sequences stacked.

    Row index ``i`` runs over the ``N = B·L`` query rows of the batch (sequence-major). Shapes use
    ``d = d_V``, ``k = d_K``. The ``d × d`` per-row moments ``Sigma``, ``S_hat``, ``B_V`` (cost ``O(N d²)``
    memory, ``O(N d³)`` for ``B_V``) are computed on first use; :mod:`energy.hessian.structure` never needs them.

    Attributes:
        x: query inputs ``x_i``, ``(N, d)``.
        X: the sequences, ``(B, L, d)``.
        A: attention matrices, ``(B, L, L)`` (softmax or linear, masked).
        M_1: first moments ``μ_i = Xᵀ a_i`` (``M_1 = A X``), ``(N, d)``.
        Sigma: ``Σ_i = Xᵀ J_i X``, ``(N, d, d)``; ``J_i = diag(a_i) − a_i a_iᵀ`` (softmax) or ``diag(m_i)``
            (linear attention).
        S_hat: ``Ŝ_i = Σ_j a_ij ((x_j − μ_i)ᵀ W_V g_i)(x_j − μ_i)(x_j − μ_i)ᵀ`` (0 for linear attention),
            ``(N, d, d)``.
        q: ``q_i = W_Qᵀ x_i``, ``(N, k)``.
        G: residual gradient rows ``g_i = 2 c_eff (f_i − y_i)``, ``(N, d_out)``.
        B_V: ``B_i = Ṽᵀ Σ_i``, ``(N, d_out, d)``, ``Ṽ = W_V W_O`` (``W_V`` without ``W_O``).
        G_QK: ``κ Σ_i x_i (Σ_i Ṽ g_i)ᵀ`` (the gradient w.r.t. ``W_Q W_Kᵀ``), ``(d, d)``.
        F: layer output, ``(B, L, d_out)`` (``(L, d_out)`` for a single sequence).
        kappa: ``κ``.
        c: the effective loss constant ``c_eff`` (reduction included).
        W_Q, W_K, W_V, W_O: the weights (``W_O`` may be ``None``).
        linear: whether the moments are those of linear attention.
        J_tok: the token-space Jacobians ``J_i`` (``Σ_i = Xᵀ J_i X``), ``(B, L, L, L)``.
        r: ``r_ij = a_ij (v_ij − a_iᵀ v_i)``, ``v_ij = x_jᵀ Ṽ g_i`` (``Ŝ_i = Xᵀ C_i X`` with
            ``C_i = diag(r_i) − a_i r_iᵀ − r_i a_iᵀ``; 0 for linear attention), ``(B, L, L)``.
        V_eff: ``Ṽ = W_V W_O`` (``W_V`` without output projection).
    """

    x: Tensor
    X: Tensor
    A: Tensor
    M_1: Tensor
    q: Tensor
    G: Tensor
    G_QK: Tensor
    F: Tensor
    kappa: float
    c: float
    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor | None
    linear: bool
    J_tok: Tensor
    r: Tensor
    V_eff: Tensor

    @cached_property
    def Sigma(self) -> Tensor:
        """``Σ_i = Xᵀ J_i X`` ``(N, d, d)``."""
        X = self.X
        if self.linear:
            Sigma = _weighted_outer(self.J_tok.diagonal(dim1=-2, dim2=-1), X)
        else:
            mu = self.M_1.reshape(X.shape)
            Sigma = _weighted_outer(self.A, X) - mu.unsqueeze(-1) * mu.unsqueeze(-2)
        return Sigma.reshape(-1, X.shape[-1], X.shape[-1])

    @cached_property
    def S_hat(self) -> Tensor:
        """``Ŝ_i = Xᵀ C_i X = Σ_j r_ij (x_j − μ_i)(x_j − μ_i)ᵀ`` ``(N, d, d)`` (uses ``Σ_j r_ij = 0``)."""
        X, r = self.X, self.r
        mu = self.M_1.reshape(X.shape)
        Xr = r @ X  # Σ_j r_ij x_j
        S = _weighted_outer(r, X) - mu.unsqueeze(-1) * Xr.unsqueeze(-2) - Xr.unsqueeze(-1) * mu.unsqueeze(-2)
        return S.reshape(-1, X.shape[-1], X.shape[-1])

    @cached_property
    def B_V(self) -> Tensor:
        """``B_i = Ṽᵀ Σ_i`` ``(N, d_out, d)``."""
        return torch.einsum("nm,inl->iml", self.V_eff, self.Sigma)

    @property
    def d_V(self) -> int:
        return self.x.shape[-1]

    @property
    def d_K(self) -> int:
        return self.q.shape[-1]

    @property
    def d_O(self) -> int:
        """Output width (``d_V`` without output projection)."""
        return self.G.shape[-1]

    @property
    def params(self) -> tuple[str, ...]:
        """Parameter names in Hessian order: ``("Q", "K", "V")`` plus ``"O"`` with an output projection."""
        return PARAMS if self.W_O is None else (*PARAMS, "O")

    @property
    def blocks(self) -> tuple[tuple[str, str], ...]:
        """The distinct blocks (:data:`BLOCKS`, plus :data:`BLOCKS_O` with an output projection)."""
        return BLOCKS if self.W_O is None else BLOCKS + BLOCKS_O

    @property
    def sizes(self) -> dict[str, int]:
        """Number of parameters per block name."""
        out = {"Q": self.d_V * self.d_K, "K": self.d_V * self.d_K, "V": self.d_V * self.d_V}
        if self.W_O is not None:
            out["O"] = self.d_V * self.d_O
        return out


def _weighted_outer(W: Tensor, X: Tensor) -> Tensor:
    """``out[b, i] = Σ_j W[b, i, j] x_j x_jᵀ`` as one batched GEMM, ``(B, L, d, d)``."""
    B, L, d = X.shape
    XX = (X.unsqueeze(-1) * X.unsqueeze(-2)).reshape(B, L, d * d)
    return (W @ XX).reshape(B, W.shape[1], d, d)


def attention_moments(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    Y: Tensor,
    *,
    W_O: Tensor | None = None,
    c: float | None = None,
    reduction: Reduction = "sum",
    scale: float | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
    linear: bool = False,
) -> AttentionMoments:
    r"""Compute the moments of MATH §3.2 once (cost ``O(B L² d²)``).

    .. math::
        \mu_i = X^\top a_i,\quad \Sigma_i = X^\top J_i X,\quad
        \hat S_i = \sum_j r_{ij} (x_j-\mu_i)(x_j-\mu_i)^\top,\ r_{ij} = a_{ij}\,(x_j-\mu_i)^\top \tilde V g_i

    ``Ŝ_i`` is ``Xᵀ (∇²_t a_i·v_i) X``, the curvature of ``v_iᵀ softmax(t)`` with ``v_i = X Ṽ g_i``,
    ``Ṽ = W_V W_O`` (``W_V`` without output projection).

    Args:
        X: ``(L, d_V)`` or ``(B, L, d_V)``.
        W_Q, W_K: ``(d_V, d_K)``; W_V: ``(d_V, d_V)``.
        Y: regression target of ``F``, shape of ``X`` with the output width.
        W_O: optional output projection ``(d_V, d_O)``.
        c: loss constant (default ``1/(L d_out)``); reduction: ``"sum"`` or ``"mean"`` over sequences.
        scale: ``κ`` (default ``1/√d_K``). mask: boolean ``(L, L)`` or ``(B, L, L)``, ``True`` = attend.
        causal: use the causal mask. linear: linear attention (no softmax).
    """
    X3, Y3, mask = _validate(X, W_Q, W_K, W_V, Y, mask, causal, W_O)
    V_eff = W_V if W_O is None else W_V @ W_O  # Ṽ
    c_eff = loss_constant(X, c, reduction, V_eff.shape[1])
    kappa = 1.0 / math.sqrt(W_Q.shape[1]) if scale is None else float(scale)
    d = X3.shape[-1]
    if linear:
        A = kappa * (X3 @ W_Q) @ (X3 @ W_K).transpose(-1, -2)
        if mask is not None:
            A = A * mask.to(A.dtype)
    else:
        from energy.reference import attention_weights

        A = attention_weights(X3 @ W_Q, X3 @ W_K, scale=kappa, mask=mask)
    M_1 = A @ X3  # (B, L, d)
    F = M_1 @ V_eff
    G = 2.0 * c_eff * (F - Y3)
    v = torch.einsum("bjd,bid->bij", X3 @ V_eff, G)  # v_ij = x_jᵀ Ṽ g_i
    if linear:
        m = torch.ones_like(A) if mask is None else mask.to(A.dtype)
        J_tok, r = torch.diag_embed(m), torch.zeros_like(A)
        Jv = m * v
    else:
        J_tok = torch.diag_embed(A) - A.unsqueeze(-1) * A.unsqueeze(-2)
        r = A * (v - (A * v).sum(-1, keepdim=True))  # r_ij = a_ij (v_ij − a_iᵀ v_i) = (J_i v_i)_j; Σ_j r_ij = 0
        Jv = r
    N = X3.shape[0] * X3.shape[1]
    x = X3.reshape(N, d)
    G = G.reshape(N, -1)
    # G_QK = κ Σ_i x_i (Σ_i Ṽ g_i)ᵀ with Σ_i Ṽ g_i = Xᵀ J_i X Ṽ g_i = Xᵀ (J_i v_i)
    G_QK = kappa * x.T @ (Jv @ X3).reshape(N, d)
    return AttentionMoments(
        x=x, X=X3, A=A, M_1=M_1.reshape(N, d), q=x @ W_Q, G=G, G_QK=G_QK,
        F=F if X.ndim == 3 else F[0], kappa=kappa, c=c_eff, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, linear=linear,
        J_tok=J_tok, r=r, V_eff=V_eff,
    )


# ----------------------------------------------------------------------------------------------------------------
# Jacobians (MATH §3.3)
# ----------------------------------------------------------------------------------------------------------------


def attention_jacobians(mom: AttentionMoments) -> dict[str, Tensor]:
    r"""Jacobians of ``vec_r(F)`` (all sequences stacked) w.r.t. the flattened weights (MATH §3.3).

    Row block ``i`` (``Ṽ = W_V W_O``; without output projection ``W_O = I``, ``Ṽ = W_V``):

    .. math::
        J_V = \mu_i^\top \otimes W_O^\top,\quad J_Q = \kappa\, x_i^\top \otimes (\tilde V^\top\Sigma_i W_K),\quad
        J_K = \kappa\, (\tilde V^\top \Sigma_i) \otimes q_i^\top,\quad J_O = (W_V^\top\mu_i)^\top \otimes I_{d_O}

    Returns:
        ``{"Q": (N d_O, d_V d_K), "K": (N d_O, d_V d_K), "V": (N d_O, d_V²)[, "O": (N d_O, d_V d_O)]}``,
        ``N = B L``.
    """
    N, d, k, o = mom.x.shape[0], mom.d_V, mom.d_K, mom.d_O
    C = mom.B_V @ mom.W_K  # Ṽᵀ Σ_i W_K
    eye_o = torch.eye(o, dtype=mom.x.dtype, device=mom.x.device)
    W_O = eye_o if mom.W_O is None else mom.W_O
    out = {
        "Q": mom.kappa * torch.einsum("ia,imb->imab", mom.x, C).reshape(N * o, d * k),
        "K": mom.kappa * torch.einsum("ima,ib->imab", mom.B_V, mom.q).reshape(N * o, d * k),
        "V": torch.einsum("in,po->ionp", mom.M_1, W_O).reshape(N * o, d * d),
    }
    if mom.W_O is not None:
        out["O"] = torch.einsum("ip,or->iopr", mom.M_1 @ mom.W_V, eye_o).reshape(N * o, d * o)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Hessian blocks (MATH §3.4–§3.5)
# ----------------------------------------------------------------------------------------------------------------


def _check_part(part: str) -> None:
    if part not in ("H", "H_o", "H_f"):
        raise EnergyInputError(f"`part` must be 'H', 'H_o' or 'H_f', got {part!r}.")


class _Factors:
    r"""Per-row factors shared by the blocks of one ``part`` (computed lazily, each once).

    * ``R_i = κ² (2c B_iᵀ B_i + Ŝ_i)`` (``H_o``: first term, ``H_f``: second), ``(N, d, d)``;
    * ``P_i = W_Kᵀ R_i W_K`` ``(N, k, k)`` and ``U_i = W_Kᵀ R_i`` ``(N, k, d)``;
    * per value-side weight ``w ∈ {V, O}``: ``E^w_i[n,m,a] = 2cκ α_i[n] B̃_i[m,a] + κ S̃_i[n,a] γ_i[m]``
      (module docstring) and ``E^w_i W_K``, stored as ``(a, i, n, m)`` and ``(i, b, n, m)`` (see :meth:`_E`);
    * ``S = 2c M_1ᵀ M_1`` (``0`` for ``H_f``), ``Ω_O = W_O W_Oᵀ`` and the bilinear ``G_QK`` (``0`` for ``H_o``);
    * with ``W_O``: ``S_O = 2c W_VᵀM_1ᵀM_1W_V``, ``P_VO = 2c M_1ᵀ M_1 W_V`` (``H_o``), ``Q_VO = M_1ᵀ G`` (``H_f``).
    """

    def __init__(self, mom: AttentionMoments, part: Part) -> None:
        _check_part(part)
        self.mom, self.part = mom, part
        self._cache: dict[str, Tensor] = {}
        x = mom.x
        self.eye_d = torch.eye(mom.d_V, dtype=x.dtype, device=x.device)
        self.eye_k = torch.eye(mom.d_K, dtype=x.dtype, device=x.device)
        self.eye_o = torch.eye(mom.d_O, dtype=x.dtype, device=x.device)
        self.use_o = part in ("H", "H_o")
        self.use_f = part in ("H", "H_f")

    def _get(self, name: str) -> Tensor:
        if name not in self._cache:
            self._cache[name] = getattr(self, "_make_" + name)()
        return self._cache[name]

    def _make_R(self) -> Tensor:
        mom, k2 = self.mom, self.mom.kappa**2
        R = None
        if self.part in ("H", "H_o"):
            R = (2.0 * mom.c * k2) * mom.B_V.transpose(-1, -2) @ mom.B_V
        if self.part in ("H", "H_f"):
            R = k2 * mom.S_hat if R is None else R + k2 * mom.S_hat
        return R

    def _make_P(self) -> Tensor:
        return self.mom.W_K.T @ self.R @ self.mom.W_K

    def _make_U(self) -> Tensor:
        return self.mom.W_K.T @ self.R

    def value_side(self, w: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(α_i, B̃_i, S̃_i, γ_i)`` of the value-side weight ``w ∈ {"V", "O"}`` (module docstring)."""
        mom = self.mom
        if w == "V":
            if mom.W_O is None:
                return mom.M_1, mom.B_V, mom.Sigma, mom.G
            return mom.M_1, mom.W_O @ mom.B_V, mom.Sigma, mom.G @ mom.W_O.T
        return mom.M_1 @ mom.W_V, mom.B_V, mom.W_V.T @ mom.Sigma, mom.G

    def _E(self, w: str, right: Tensor | None = None) -> Tensor:
        """``E^w`` laid out ``(a, i, n, m)``, or with ``right`` ``E^w · right`` laid out ``(i, b, n, m)``.

        ``E_i[n,m,a] = 2cκ α_i[n] B̃_i[m,a] + κ S̃_i[n,a] γ_i[m]``, written directly in the layout the row-strip
        GEMMs of :func:`_write_rows` read, with one pass per half.
        """
        mom, E = self.mom, None
        alpha, Bt, St, gamma = self.value_side(w)
        if right is None:  # (a, i, n, m)
            o1, o2 = alpha[None, :, :, None], Bt.permute(2, 0, 1)[:, :, None, :]
            f1, f2 = St.permute(2, 0, 1)[:, :, :, None], gamma[None, :, None, :]
        else:  # (i, b, n, m) with B̃_i right, S̃_i right
            Bt, St = Bt @ right, St @ right
            o1, o2 = alpha[:, None, :, None], Bt.permute(0, 2, 1)[:, :, None, :]
            f1, f2 = St.permute(0, 2, 1)[:, :, :, None], gamma[:, None, None, :]
        if self.use_o:
            E = torch.mul(o1, o2).mul_(2.0 * mom.c * mom.kappa)
        if self.use_f:
            E = mom.kappa * (f1 * f2) if E is None else E.addcmul_(f1, f2, value=mom.kappa)
        return E

    def _make_E(self) -> Tensor:
        return self._E("V")

    def _make_EW(self) -> Tensor:
        return self._E("V", self.mom.W_K)

    def _make_EO(self) -> Tensor:
        return self._E("O")

    def _make_EOW(self) -> Tensor:
        return self._E("O", self.mom.W_K)

    def _make_S(self) -> Tensor:
        scale = 2.0 * self.mom.c if self.use_o else 0.0
        return scale * self.mom.M_1.T @ self.mom.M_1

    def _make_Omega_O(self) -> Tensor:
        return self.eye_d if self.mom.W_O is None else self.mom.W_O @ self.mom.W_O.T

    def _make_S_O(self) -> Tensor:
        return self.mom.W_V.T @ self.S @ self.mom.W_V

    def _make_P_VO(self) -> Tensor:
        return self.S @ self.mom.W_V

    def _make_Q_VO(self) -> Tensor:
        Q = self.mom.M_1.T @ self.mom.G
        return Q if self.use_f else torch.zeros_like(Q)

    def _make_G(self) -> Tensor:
        return torch.zeros_like(self.mom.G_QK) if self.part == "H_o" else self.mom.G_QK

    R = property(lambda self: self._get("R"))
    P = property(lambda self: self._get("P"))
    U = property(lambda self: self._get("U"))
    E = property(lambda self: self._get("E"))
    EW = property(lambda self: self._get("EW"))
    S = property(lambda self: self._get("S"))
    G = property(lambda self: self._get("G"))
    EO = property(lambda self: self._get("EO"))
    EOW = property(lambda self: self._get("EOW"))
    Omega_O = property(lambda self: self._get("Omega_O"))
    S_O = property(lambda self: self._get("S_O"))
    P_VO = property(lambda self: self._get("P_VO"))
    Q_VO = property(lambda self: self._get("Q_VO"))


def _row_factor(f: _Factors, a: str, b: str, out: Tensor) -> None:
    """Write the row factor of block ``(a, b)``, ``a ∈ {Q, K}``, into ``out``.

    Query rows: ``H(Q, b)[(a', b'), col] = Σ_i x_i[a'] F_i[b', col]``, ``out`` is ``F`` ``(N, d_K, size_b)``.
    Key rows: ``H(K, b)[(a', b'), col] = Σ_i q_i[b'] G_i[a', col]``, ``out`` is ``G`` ``(d_V, N, size_b)``.
    The factors are those of :func:`hessian_block` (``P_i``, ``U_i``, ``R_i``, ``E_i``, ``E_i W_K``).
    """
    mom = f.mom
    x, q = mom.x, mom.q
    out4 = out.view(*out.shape[:2], mom.d_V, -1)
    if (a, b) == ("Q", "Q"):  # x_ic P_i[b', d']
        torch.mul(x[:, None, :, None], f.P[:, :, None, :], out=out4)
    elif (a, b) == ("Q", "K"):  # U_i[b', c] q_id'  (the bilinear term is added by the caller)
        torch.mul(f.U[:, :, :, None], q[:, None, None, :], out=out4)
    elif (a, b) == ("K", "Q"):  # x_ic U_i[d', a']
        torch.mul(x[None, :, :, None], f.U.permute(2, 0, 1)[:, :, None, :], out=out4)
    elif (a, b) == ("K", "K"):  # R_i[a', c] q_id'
        torch.mul(f.R.permute(1, 0, 2)[..., None], q[None, :, None, :], out=out4)
    elif a == "Q":  # (E_i W_K)[n, m, b'] (value side V or O)
        out4.copy_(f.EW if b == "V" else f.EOW)
    else:  # E_i[n, m, a']
        out4.copy_(f.E if b == "V" else f.EO)


def _write_rows(f: _Factors, a: str, bs: tuple[str, ...], out: Tensor) -> None:
    """Write the blocks ``(a, b)``, ``b ∈ bs``, of a query or key row strip into ``out`` (contiguous rows).

    The whole strip is one GEMM with inner dimension ``N`` (the stacked query rows), written straight into
    ``out``: ``out.view(d_V, d_K·cols) = Xᵀ F`` for query rows and a batched ``q``-GEMM over ``a'`` for key rows
    (:func:`_row_factor`). The bilinear term ``G_QK ⊗ I`` (``H_f``) is then added on its diagonal.
    """
    mom = f.mom
    N, d, k = mom.x.shape[0], mom.d_V, mom.d_K
    sizes = mom.sizes
    width = sum(sizes[b] for b in bs)
    lead = (N, k) if a == "Q" else (d, N)
    F = torch.empty(*lead, width, dtype=mom.x.dtype, device=mom.x.device)
    col, cols = 0, {}
    for b in bs:
        _row_factor(f, a, b, F[..., col : col + sizes[b]])
        cols[b] = slice(col, col + sizes[b])
        col += sizes[b]
    if a == "Q":
        torch.mm(mom.x.T, F.view(N, k * width), out=out.view(d, k * width))
    else:
        torch.bmm(mom.q.T.expand(d, k, N), F, out=out.view(d, k, width))
    partner = "K" if a == "Q" else "Q"
    if f.use_f and partner in bs:  # entries [(c, j), (a', j)] += G_QK[c, a'] (transposed for key rows)
        G = f.G if a == "Q" else f.G.T
        out[:, cols[partner]].view(d, k, d, k).diagonal(dim1=1, dim2=3).add_(G.unsqueeze(-1))


def _value_block(f: _Factors, a: str, b: str, out: Tensor) -> None:
    """Write a block between value-side weights (``V``, ``O``) into the 2-D view ``out``."""
    mom = f.mom
    d, o = mom.d_V, mom.d_O
    if (a, b) == ("V", "V"):  # S ⊗ Ω_O
        torch.mul(f.S[:, None, :, None], f.Omega_O[None, :, None, :], out=out.view(d, d, d, d))
    elif (a, b) == ("O", "O"):  # S_O ⊗ I
        torch.mul(f.S_O[:, None, :, None], f.eye_o[None, :, None, :], out=out.view(d, o, d, o))
    elif (a, b) == ("V", "O"):  # 2c (M_1ᵀM_1W_V)[n,p] W_O[m,o] + (M_1ᵀG)[n,o] δ_mp
        out4 = out.view(d, d, d, o)
        torch.mul(f.P_VO[:, None, :, None], mom.W_O[None, :, None, :], out=out4)
        out4.diagonal(dim1=1, dim2=2).add_(f.Q_VO.unsqueeze(-1))
    else:  # ("O", "V")
        tmp = torch.empty(mom.sizes["V"], mom.sizes["O"], dtype=out.dtype, device=out.device)
        _value_block(f, "V", "O", tmp)
        out.copy_(tmp.T)


def bilinear_term(mom: AttentionMoments) -> Tensor:
    r"""The bilinear (query–key) term of ``H_f(Q, K)``: ``G_QK ⊗ I_{d_K}`` (MATH §3.5), dense ``(d_V d_K)²``.

    It exists only because ``T`` is bilinear in ``(W_Q, W_K)``.
    """
    return torch.kron(mom.G_QK, torch.eye(mom.d_K, dtype=mom.x.dtype, device=mom.x.device))


def _block(f: _Factors, a: str, b: str) -> Tensor:
    sizes = f.mom.sizes
    if a in "VO" and b in "QK":  # value-side rows: transpose of the query/key row block
        return _block(f, b, a).T
    out = torch.empty(sizes[a], sizes[b], dtype=f.mom.x.dtype, device=f.mom.x.device)
    if a in "QK":
        _write_rows(f, a, (b,), out)
    else:
        _value_block(f, a, b, out)
    return out


def hessian_block(
    mom: AttentionMoments, a: str, b: str, part: Part = "H", *, max_gib: float | None = None
) -> Tensor:
    r"""One dense block ``part(a, b)`` of the loss Hessian, ``a, b ∈ mom.params`` (MATH §3.4–§3.5).

    .. math::
        H(V,V) &= 2c\,(M_1^\top M_1)\otimes W_O W_O^\top \quad (H_f(V,V) = 0;\ W_O = I\ \text{without projection})\\
        H(Q,Q) &= \textstyle\sum_i x_i x_i^\top \otimes W_K^\top R_i W_K,\qquad
        H(K,K) = \sum_i R_i \otimes q_i q_i^\top\\
        H(Q,K) &= \textstyle\sum_i x_i \otimes W_K^\top R_i \otimes q_i^\top + G_{QK}\otimes I_{d_K}\ (H_f\ only)\\
        H(V,K)[(n,m),(a,b)] &= \textstyle\sum_i E_i[n,m,a]\, q_i[b],\qquad
        H(V,Q)[(n,m),(c,b)] = \sum_i (E_i W_K)[n,m,b]\, x_i[c]

    with ``R_i`` and ``E_i`` as in the module docstring, restricted to the ``H_o`` or ``H_f`` half (blocks with
    ``O``: module docstring). Cost: ``O(N d_V² d_K²)`` for the query/key blocks, ``O(N d_V³ d_K)`` for the
    value–query/key blocks. A lower block is returned as the transpose (a view) of the computed upper one.

    Returns:
        dense ``(size_a, size_b)`` matrix in ``vec_r`` order.
    """
    _check_part(part)
    if a not in mom.params or b not in mom.params:
        raise EnergyInputError(f"block names must be among {mom.params}, got ({a!r}, {b!r}).")
    check_dense_budget(mom.sizes[a], mom.sizes[b], mom.x.dtype, max_gib, f"the dense block {part}({a}, {b})")
    return _block(_Factors(mom, part), a, b)


def hessian_blocks(
    mom: AttentionMoments, part: Part = "H", *, max_gib: float | None = None
) -> dict[tuple[str, str], Tensor]:
    """All blocks ``{(a, b): part(a, b)}`` (nine, or sixteen with ``W_O``; factors shared, lower blocks as views).

    ``max_gib`` bounds the memory of the distinct blocks together (default 4 GiB, :class:`DenseSizeError`).
    """
    _check_part(part)
    total = sum(mom.sizes[a] * mom.sizes[b] for a, b in mom.blocks)
    check_dense_budget(total, 1, mom.x.dtype, max_gib, f"the distinct dense blocks of {part}")
    f = _Factors(mom, part)
    out = {ab: _block(f, *ab) for ab in mom.blocks}
    for a, b in mom.blocks:
        out[(b, a)] = out[(a, b)].T
    return out


def _copy_transposed(dst: Tensor, src: Tensor, tile: int = 128) -> None:
    """``dst ← srcᵀ`` in column tiles of ``dst`` (a cache-friendly transpose: at width 48 the plain strided copy of
    the value rows took ~3× longer than this, measured)."""
    for i in range(0, dst.shape[1], tile):
        dst[:, i : i + tile] = src[i : i + tile].T


def attention_hessian(mom: AttentionMoments, part: Part = "H", *, max_gib: float | None = None) -> Tensor:
    """The assembled dense ``part`` of the loss Hessian, parameters ordered ``(Q, K, V[, O])`` (MATH §3).

    The query and key row strips are one GEMM each, written straight into the output (:func:`_write_rows`);
    the value-side rows are the transposes of their query/key columns plus the small value–value blocks.
    Memory: the ``p × p`` result, one strip factor of ``N d_K p`` numbers and ``O(N d_V³)`` value-side factors.

    Args:
        mom: from :func:`attention_moments`.
        part: ``"H"``, ``"H_o"`` (Gauss–Newton) or ``"H_f"`` (functional part).
        max_gib: memory budget of the dense result (default 4 GiB). Above it a :class:`DenseSizeError`
            states the size and points to ``energy.hessian.structure`` / the matrix-free operators.
    """
    _check_part(part)
    sizes = mom.sizes
    p = sum(sizes.values())
    check_dense_budget(p, p, mom.x.dtype, max_gib, f"the dense {part} of the attention layer")
    f = _Factors(mom, part)
    span, start = {}, 0
    for name in mom.params:
        span[name], start = slice(start, start + sizes[name]), start + sizes[name]
    H = torch.empty(p, p, dtype=mom.x.dtype, device=mom.x.device)
    for a in ("Q", "K"):
        _write_rows(f, a, mom.params, H[span[a]])
    for a in mom.params[2:]:  # V (and O)
        for b in ("Q", "K"):
            _copy_transposed(H[span[a], span[b]], H[span[b], span[a]])
        for b in mom.params[2:]:
            _value_block(f, a, b, H[span[a], span[b]])
    return H


# ----------------------------------------------------------------------------------------------------------------
# single-matrix W_QK parametrisation
# ----------------------------------------------------------------------------------------------------------------


def qk_hessian_blocks(
    X: Tensor,
    W_QK: Tensor,
    W_V: Tensor,
    Y: Tensor,
    *,
    scale: float | None = None,
    part: Part = "H",
    **kwargs,
) -> dict[tuple[str, str], Tensor]:
    r"""Blocks of the Hessian w.r.t. ``(W_QK, W_V)`` for ``F = softmax(κ X W_QK Xᵀ) X W_V`` (MATH §3.5).

    .. math::
        H_o(QK,QK) = 2c\kappa^2 \textstyle\sum_i x_i x_i^\top \otimes \Sigma_i W_V W_V^\top \Sigma_i,\qquad
        H_f(QK,QK) = \kappa^2 \textstyle\sum_i x_i x_i^\top \otimes \hat S_i

    This is the two-matrix layer at ``W_Q = W_QK``, ``W_K = I``: its ``(Q, ·)`` blocks are the ``W_QK`` blocks.
    ``scale`` defaults to ``1/√d_V`` (the query–key width of ``W_QK`` is ``d_V``). Further keyword arguments
    (``c``, ``reduction``, ``mask``, ``causal``, ``linear``) as in :func:`attention_moments`.

    Returns:
        ``{("QK","QK"), ("QK","V"), ("V","QK"), ("V","V")}`` → dense blocks.
    """
    check_tensor(W_QK, "W_QK", ndim=2)
    if W_QK.shape[0] != W_QK.shape[1]:
        raise EnergyInputError(f"`W_QK` must be square (d_V × d_V), got {tuple(W_QK.shape)}.")
    eye = torch.eye(W_QK.shape[0], dtype=W_QK.dtype, device=W_QK.device)
    kappa = 1.0 / math.sqrt(W_QK.shape[0]) if scale is None else scale
    mom = attention_moments(X, W_QK, eye, W_V, Y, scale=kappa, **kwargs)
    H_qq = hessian_block(mom, "Q", "Q", part)
    H_vq = hessian_block(mom, "V", "Q", part)
    return {("QK", "QK"): H_qq, ("V", "QK"): H_vq, ("QK", "V"): H_vq.T, ("V", "V"): hessian_block(mom, "V", "V", part)}


def qk_chain_matrix(W_Q: Tensor, W_K: Tensor) -> Tensor:
    r"""``𝒥 = [I ⊗ W_K | (W_Q ⊗ I) P_{d_V,d_K}]``: ``d vec_r(W_Q W_Kᵀ) = 𝒥 [d vec_r W_Q; d vec_r W_K]`` (MATH §3.5).

    The two-matrix query/key blocks are ``𝒥ᵀ H_{QK} 𝒥`` plus the bilinear term ``G_QK ⊗ I`` in the (Q, K) block.
    """
    d, k = W_Q.shape
    eye_d = torch.eye(d, dtype=W_Q.dtype, device=W_Q.device)
    # P_{d,k} vec_r(B) = vec_r(Bᵀ) for B (d × k): permutation of the identity
    P = torch.eye(d * k, dtype=W_Q.dtype, device=W_Q.device).reshape(d, k, d * k).transpose(0, 1).reshape(d * k, d * k)
    return torch.cat([torch.kron(eye_d, W_K), torch.kron(W_Q, eye_d) @ P], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# autograd twins
# ----------------------------------------------------------------------------------------------------------------


def _flatten(W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor | None) -> Tensor:
    return torch.cat([W.reshape(-1) for W in (W_Q, W_K, W_V, W_O) if W is not None])


def _split(theta: Tensor, d: int, k: int, o: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    s, v = d * k, d * d
    W_O = None if o is None else theta[2 * s + v :].reshape(d, o)
    return theta[:s].reshape(d, k), theta[s : 2 * s].reshape(d, k), theta[2 * s : 2 * s + v].reshape(d, d), W_O


def _twin_setup(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, Y: Tensor, W_O: Tensor | None, mask: Tensor | None, causal: bool
) -> tuple[Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor | None]], Tensor | None]:
    """Validated inputs of the autograd twins: ``(split, mask)`` with ``split(θ) = (W_Q, W_K, W_V, W_O)``."""
    _, _, mask = _validate(X, W_Q, W_K, W_V, Y, mask, causal, W_O)
    if mask is not None and X.ndim == 2:
        mask = mask[0]
    d, k = W_Q.shape
    o = None if W_O is None else W_O.shape[1]
    return (lambda theta: _split(theta, d, k, o)), mask


def autograd_attention_hessian(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    Y: Tensor,
    *,
    W_O: Tensor | None = None,
    c: float | None = None,
    reduction: Reduction = "sum",
    scale: float | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
    linear: bool = False,
) -> Tensor:
    """Autograd twin: ``torch.func.hessian`` of :func:`attention_loss` in the flattened ``(Q, K, V[, O])`` vector."""
    warn_if_not_float64(X.dtype, "autograd_attention_hessian")
    split, mask = _twin_setup(X, W_Q, W_K, W_V, Y, W_O, mask, causal)

    def loss(t: Tensor) -> Tensor:
        Q, K, V, O = split(t)
        return attention_loss(X, Q, K, V, Y, W_O=O, c=c, reduction=reduction, scale=scale, mask=mask, linear=linear)

    return torch.func.hessian(loss)(_flatten(W_Q, W_K, W_V, W_O))


def autograd_attention_ggn(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    Y: Tensor,
    *,
    W_O: Tensor | None = None,
    c: float | None = None,
    reduction: Reduction = "sum",
    scale: float | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
    linear: bool = False,
) -> Tensor:
    """Autograd twin of ``H_o``: ``2 c_eff JᵀJ`` with ``J = torch.func.jacrev`` of ``vec_r(F)``."""
    warn_if_not_float64(X.dtype, "autograd_attention_ggn")
    split, mask = _twin_setup(X, W_Q, W_K, W_V, Y, W_O, mask, causal)

    def out(t: Tensor) -> Tensor:
        Q, K, V, O = split(t)
        return attention_output(X, Q, K, V, W_O=O, scale=scale, mask=mask, linear=linear).reshape(-1)

    J = torch.func.jacrev(out)(_flatten(W_Q, W_K, W_V, W_O))
    d_out = W_V.shape[1] if W_O is None else W_O.shape[1]
    return 2.0 * loss_constant(X, c, reduction, d_out) * J.T @ J
