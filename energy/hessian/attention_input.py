r"""Input-side derivatives of one self-attention head in closed form (docs/MATH.md §5.3a): the Jacobian of ``F`` with
respect to the token matrix ``U``, the Hessian ``∇²_U ⟨G, F⟩`` and the mixed derivatives ``∂²⟨G, F⟩/∂U ∂θ``.

.. math::
    T = \kappa\, U W_Q W_K^\top U^\top,\quad A = \mathrm{softmax}(T + \text{mask})\ \text{(or } T \odot m\text{)},
    \quad P = U W_V W_O,\quad F = A P,\quad s = \langle G, F\rangle = \textstyle\sum_i a_i^\top P g_i .

These are the attention factors of the whole-block Hessian (MATH §5.3): the integrator composes them with the
token-wise LayerNorm / FFN factors by the second-order chain rule. Everything is per sequence: the results are
``(B, ·, ·)``, one block per sequence (sequences do not interact).

Notation (one sequence; ``M = W_Q W_Kᵀ``, ``Ṽ = W_V W_O``, ``W_O = I`` without output projection):
``Q = U W_Q``, ``K = U W_K``, ``Q̃ = U M`` (``= Q W_Kᵀ``), ``K̃ = U Mᵀ`` (``= K W_Qᵀ``), ``G̃ = G Ṽᵀ``,
``v_ij = g_iᵀ p_j`` (``V = G̃ Uᵀ``), ``J_i = ∂a_i/∂t_i`` (``diag(a_i) − a_i a_iᵀ``; linear: ``diag(m_i)``),
``r_i = J_i v_i = ∂s/∂t_i`` and ``C_i = ∇²_{t_i}(a_iᵀ v_i) = diag(r_i) − a_i r_iᵀ − r_i a_iᵀ`` (linear: 0).
The gradient is ``∇_U s = κ (R K̃ + Rᵀ Q̃) + Aᵀ G̃``; every formula below differentiates it once more, never with
autograd. The functions are pure (no validation, no reads of tensor values, in-place additions only into tensors
they created, every operation with a ``vmap`` rule): their inputs are those of
:meth:`~energy.hessian.attention_layer.AttentionLayer.check_inputs` (``U3`` ``(B, L, d)``, the resolved
``(B, L, L)`` mask or ``None``) and an upstream gradient ``G = ∂ℓ/∂F`` ``(B, L, d_out)``.

The autograd twins (``torch.func`` of the layer's own forward map) are at the end of the module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from energy.core import standard as core_standard
from energy.hessian.attention_layer import AttentionLayer, attention_matrix

__all__ = [
    "head_input_jacobian",
    "head_input_hessian",
    "head_input_param_hessian",
    "autograd_head_input_jacobian",
    "autograd_head_input_hessian",
    "autograd_head_input_param_hessian",
]


class _Head(NamedTuple):
    """Per-sequence factors of one head (batched over ``B``; ``i``: query, ``l``: key)."""

    kappa: float
    softmax: bool
    A: Tensor  # (B, L, L) attention matrix
    Jd: Tensor  # (B, L, L) diagonal of J_i: a_il (softmax) or m_il (linear)
    Q: Tensor  # (B, L, k) U W_Q
    K: Tensor  # (B, L, k) U W_K
    Qt: Tensor  # (B, L, d) Q̃ = U W_Q W_Kᵀ
    Kt: Tensor  # (B, L, d) K̃ = U W_K W_Qᵀ
    V_eff: Tensor  # (d, d_out) Ṽ = W_V W_O


def _head(layer: AttentionLayer, U3: Tensor, mask: Tensor | None) -> _Head:
    """``A`` (the core's :func:`~energy.core.standard.attention_weights` through :func:`attention_matrix`), the
    diagonal of ``J_i``, the projections ``Q, K, Q̃, K̃`` and ``Ṽ``; cost ``O(L² k + L d k)`` per sequence.
    """
    W_Q, W_K, W_O = layer.W_Q, layer.W_K, layer.W_O
    A = attention_matrix(U3, W_Q, W_K, layer.kappa, mask, linear=layer.linear)
    if layer.linear:
        Jd = torch.ones_like(A) if mask is None else mask.to(A.dtype)
    else:
        Jd = A
    Q, K = U3 @ W_Q, U3 @ W_K
    V_eff = layer.W_V if W_O is None else layer.W_V @ W_O
    return _Head(layer.kappa, not layer.linear, A, Jd, Q, K, Q @ W_K.T, K @ W_Q.T, V_eff)


def _apply_J(h: _Head, Z: Tensor) -> Tensor:
    """``[J_i Z]_i`` for a token matrix ``Z`` ``(B, L, n)`` shared by all queries: ``(B, L_i, L_l, n)``, cost
    ``O(L² n)`` (``J_i = diag(a_i) − a_i a_iᵀ`` or ``diag(m_i)``).
    """
    JZ = h.Jd.unsqueeze(-1) * Z.unsqueeze(1)
    if h.softmax:
        JZ = JZ - h.A.unsqueeze(-1) * (h.A @ Z).unsqueeze(2)
    return JZ


def _apply_C(h: _Head, R: Tensor, Z: Tensor) -> Tensor:
    """``[C_i Z]_i = r_i ⊙ Z − a_i (r_iᵀ Z) − r_i (a_iᵀ Z)`` ``(B, L_i, L_l, n)`` (softmax only), cost ``O(L² n)``."""
    return (R.unsqueeze(-1) * (Z.unsqueeze(1) - (h.A @ Z).unsqueeze(2))
            - h.A.unsqueeze(-1) * (R @ Z).unsqueeze(2))


def _score_gradient(h: _Head, Gt: Tensor, U3: Tensor) -> Tensor:
    """``R = ∂s/∂T``, rows ``r_i = J_i v_i`` with ``v_ij = g̃_iᵀ u_j`` ``(B, L, L)``, cost ``O(L² d)``."""
    v = Gt @ U3.transpose(-1, -2)
    return core_standard.softmax_jacobian_apply(h.A, v) if h.softmax else h.Jd * v


def _plus_diagonal(T: Tensor, M: Tensor, dim1: int, dim2: int) -> Tensor:
    """``T`` plus ``M`` on the diagonal of its dimensions ``dim1, dim2`` (``M`` broadcast to
    ``T.diagonal(dim1=dim1, dim2=dim2)``, diagonal last), out of place: in-place writes into views are what
    ``linearize``'s traced graph got wrong here.
    """
    shape = T.diagonal(dim1=dim1, dim2=dim2).shape
    return T + torch.diag_embed(M.expand(shape), dim1=dim1, dim2=dim2)


def head_input_jacobian(layer: AttentionLayer, U3: Tensor, mask: Tensor | None) -> Tensor:
    r"""Jacobian of one head's output with respect to its input, per sequence (docs/MATH.md §5.3a).

    .. math::
        \frac{\partial F_{im}}{\partial U_{ja}} = a_{ij}\tilde V_{am} + \kappa\,(J_i P)_{jm}\,\tilde Q_{ia}
        + \kappa\,\delta_{ij}\,\big(K̃^\top J_i P\big)_{am}

    (``dF = dA P + A dU Ṽ``, ``dA_i = J_i dt_i``, ``dt_il = κ (du_iᵀ K̃_l + Q̃_iᵀ du_l)``; softmax:
    ``(J_i P)_{jm} = a_ij (p_j − f_i)_m``). Cost ``O(L² d d_out + L d (k + d_out))`` per sequence, the size of
    the result.

    Args:
        layer: the head (its weights, ``κ``, ``linear``; ``W_V`` may be rectangular ``(d, d_v)``).
        U3: the inputs ``(B, L, d)``.
        mask: the resolved boolean mask ``(B, L, L)`` (``True`` = attend) or ``None``.

    Returns:
        ``(B, L d_out, L d)``: ``∂ vec_r F_b / ∂ vec_r U_b`` (rows ``i d_out + m``, columns ``j d + a``).
    """
    h = _head(layer, U3, mask)
    B, L, d = U3.shape
    o = h.V_eff.shape[1]
    JP = _apply_J(h, U3 @ h.V_eff).transpose(-1, -2)  # (B, i, m, j): (J_i P)_{jm}
    KtJP = h.kappa * torch.einsum("bimj,bja->bima", JP, h.Kt)  # (B, i, m, a): κ (K̃ᵀ J_i P)_{am}
    eye = torch.eye(L, dtype=U3.dtype, device=U3.device)
    # the three terms as one batched product over r = 0, 1, 2 that writes the result once:
    # left[b, i, m, j, r] = (a_ij, (J_i P)_jm, δ_ij), right[b, i, m, r, a] = (Ṽ_am, κ Q̃_ia, κ (K̃ᵀ J_i P)_am)
    left = torch.stack([h.A.unsqueeze(2).expand(B, L, o, L), JP, eye[:, None, :].expand(B, L, o, L)], -1)
    right = torch.stack([h.V_eff.T.expand(B, L, o, d), h.kappa * h.Qt.unsqueeze(2).expand(B, L, o, d), KtJP], -2)
    return (left @ right).reshape(B, L * o, L * d)


def head_input_hessian(layer: AttentionLayer, U3: Tensor, mask: Tensor | None, G: Tensor) -> Tensor:
    r"""Hessian ``∇²_U ⟨G_b, F_b⟩`` of one head with respect to its input, per sequence (docs/MATH.md §5.3a).

    Second-order chain rule through ``T`` (bilinear in ``U``) and ``P`` (linear in ``U``; ``∂²s/∂P² = 0``):

    .. math::
        H = J_T^\top C J_T + J_T^\top \mathcal K J_P + J_P^\top \mathcal K^\top J_T
            + \kappa\,(R \otimes M + R^\top \otimes M^\top),\qquad
        \mathcal K_{(il),(nm)} = (J_i)_{ln}\, g_{im},

    written as ``H = X + Xᵀ`` with ``X`` the sum of

    * pair terms ``X_{ja,j'a'} = κ K̃_{j'a} (κ r_{jj'} Q̃_{ja'} + a_{jj'} G̃_{ja'}) + κ r_{jj'} M_{aa'}``,
    * token-diagonal blocks ``δ_{jj'} [½κ² (K̃ᵀ diag(r_j) K̃ + Σ_i r_ij q̃_i q̃_iᵀ) + κ Σ_i a_ij q̃_i g̃_iᵀ]``,
    * the rank-``L`` part of the softmax Jacobian and curvature, ``−Σ_i z_i (w_i + y_i)ᵀ`` with
      ``z_i = κ(e_i ⊗ K̃ᵀa_i + a_i ⊙ q̃_i)``, ``w_i = κ(e_i ⊗ K̃ᵀr_i + r_i ⊙ q̃_i)``, ``y_i = a_i ⊙ g̃_i``
      (``(a ⊙ q)_{ja} = a_j q_a``).

    Linear attention: ``J_i = diag(m_i)``, ``C_i = 0``, ``r_i = m_i ⊙ v_i``: the ``κ²`` terms and the rank-``L``
    part vanish, ``a`` becomes ``m`` in the pair and diagonal terms.

    The pair terms are read through ``W_Q`` (``K̃_{j'a} = Σ_c (W_Q)_{ac} K_{j'c}``, ``M_{aa'} = Σ_c (W_Q)_{ac}
    (W_K)_{a'c}``), so that ``X_pair`` and ``X_pairᵀ`` are two GEMMs with inner dimension ``k``, and the rank-``L``
    part is one GEMM with inner dimension ``2L``: the ``(Ld)²`` result is written three times, never permuted.

    Cost per sequence: ``O(L² d² k + L d (k + d_out))`` for linear attention; softmax adds the rank-``L`` part,
    ``O(L³ d²)``: a sum of ``L`` Kronecker products ``(a_i b_iᵀ) ⊗ (q̃_i c_iᵀ)``, that is a ``(L² × L)(L × d²)``
    product, which no reordering avoids for the dense result (linear attention has no such part).

    Args:
        layer: the head.
        U3: the inputs ``(B, L, d)``.
        mask: the resolved boolean mask ``(B, L, L)`` or ``None``.
        G: the upstream gradient ``∂ℓ/∂F`` ``(B, L, d_out)``.

    Returns:
        ``(B, L d, L d)``, symmetric, indices ``j d + a``.
    """
    h = _head(layer, U3, mask)
    B, L, d = U3.shape
    kap, W_Q, W_K = h.kappa, layer.W_Q, layer.W_K
    k = W_Q.shape[1]
    Gt = G @ h.V_eff.T  # (B, L, d): G̃ = G Ṽᵀ
    R = _score_gradient(h, Gt, U3)
    # Pair terms through W_Q (K̃_{j'a} = Σ_c W_Q[a,c] K_{j'c}, M_{aa'} = Σ_c W_Q[a,c] W_K[a',c]):
    # X_pair[j,a,j',a'] = Σ_c W_Q[a,c] Ω[j,c,j',a'], Ω[j,c,j',a'] = K_{j'c} w_{jj'a'} + κ r_jj' W_K[a',c]
    w = kap * h.Jd.unsqueeze(-1) * Gt.unsqueeze(2)  # (B, j, j', a')
    if h.softmax:
        w = w + kap * kap * R.unsqueeze(-1) * h.Qt.unsqueeze(2)
    Omega = (h.K.transpose(-1, -2)[:, None, :, :, None] * w.unsqueeze(2)
             + kap * R[:, :, None, :, None] * W_K.T[None, None, :, None, :])  # (B, j, c, j', a')
    # token-diagonal blocks (each symmetric half of X + Xᵀ)
    diag = kap * torch.einsum("bij,bia,bic->bjac", h.Jd, h.Qt, Gt)  # κ Σ_i a_ij q̃_i g̃_iᵀ
    if h.softmax:  # ½κ² (K̃ᵀ diag(r_j) K̃ + Σ_i r_ij q̃_i q̃_iᵀ); the first through W_Q, into Ω
        Omega = _plus_diagonal(Omega, 0.5 * kap * kap * torch.einsum("bjl,blc,bla->bcaj", R, h.K, h.Kt), 1, 3)
        diag = diag + 0.5 * kap * kap * torch.einsum("bij,bia,bic->bjac", R, h.Qt, h.Qt)
    # H = X + Xᵀ in three products, each writing the (Ld)² result once (out-of-place: every op has a vmap rule)
    H = (W_Q @ Omega.reshape(B, L, k, L * d)).reshape(-1, d)  # X_pair, rows (b, j, a, j')
    H = torch.addmm(H, Omega.permute(0, 3, 4, 1, 2).reshape(-1, k), W_Q.T).reshape(B, L * d, L * d)  # + X_pairᵀ
    H = _plus_diagonal(H.view(B, L, d, L, d), (diag + diag.transpose(-1, -2)).permute(0, 2, 3, 1), 1, 3).reshape(
        B, L * d, L * d)
    if h.softmax:  # rank-L part −Σ_i (z_i u_iᵀ + u_i z_iᵀ), u_i = w_i + y_i: one GEMM with inner dimension 2L
        eye = torch.eye(L, dtype=U3.dtype, device=U3.device)
        Z = kap * (torch.einsum("ij,bia->bija", eye, h.A @ h.Kt) + h.A.unsqueeze(-1) * h.Qt.unsqueeze(2))
        Wu = (kap * (torch.einsum("ij,bia->bija", eye, R @ h.Kt) + R.unsqueeze(-1) * h.Qt.unsqueeze(2))
              + h.A.unsqueeze(-1) * Gt.unsqueeze(2))
        ZW = torch.cat([Z.reshape(B, L, L * d), Wu.reshape(B, L, L * d)], 1)  # (B, 2L, Ld)
        WZ = torch.cat([Wu.reshape(B, L, L * d), Z.reshape(B, L, L * d)], 1)
        H = torch.baddbmm(H, ZW.transpose(-1, -2), WZ, alpha=-1)
    return H


def head_input_param_hessian(layer: AttentionLayer, U3: Tensor, mask: Tensor | None, G: Tensor) -> dict[str, Tensor]:
    r"""Mixed derivatives ``∂²⟨G_b, F_b⟩ / ∂U_b ∂θ`` of one head, per sequence (docs/MATH.md §5.3a).

    Differentiate ``∇_U s = κ (R K̃ + Rᵀ Q̃) + Aᵀ G̃`` in ``θ``: ``dR_i = C_i dt_i + J_i dv_i``, ``dA_i = J_i dt_i``,
    and the explicit dependence of ``K̃, Q̃, Ṽ`` on the weights. With ``E^Z_i = C_i Z`` and ``F^Z_i = J_i Z`` for
    the token matrices ``Z ∈ {K, U, U W_V}`` (``C_i = 0`` for linear attention), ``G_O = G W_Oᵀ``:

    .. math::
        \begin{aligned}
        H_{UQ}[ja,bc] &= \kappa^2 U_{jb} (\tilde K^\top E^K_j)_{ac}
            + \textstyle\sum_i U_{ib} (\kappa^2 \tilde Q_{ia} E^K_{i,jc} + \kappa \tilde G_{ia} F^K_{i,jc})
            + \kappa\,\delta_{ab} (RK)_{jc} + \kappa (R^\top U)_{jb} (W_K)_{ac} \\
        H_{UK}[ja,bc] &= \kappa^2 Q_{jc} (\tilde K^\top E^U_j)_{ab}
            + \textstyle\sum_i Q_{ic} (\kappa^2 \tilde Q_{ia} E^U_{i,jb} + \kappa \tilde G_{ia} F^U_{i,jb})
            + \kappa (RU)_{jb} (W_Q)_{ac} + \kappa\,\delta_{ab} (R^\top Q)_{jc} \\
        H_{UV}[ja,bc] &= \kappa (G_O)_{jc} (\tilde K^\top F^U_j)_{ab}
            + \kappa \textstyle\sum_i \tilde Q_{ia} (G_O)_{ic} F^U_{i,jb} + \delta_{ab} (A^\top G_O)_{jc} \\
        H_{UO}[ja,bc] &= \kappa G_{jc} (\tilde K^\top F^{UW_V}_j)_{ab}
            + \kappa \textstyle\sum_i \tilde Q_{ia} G_{ic} F^{UW_V}_{i,jb} + (A^\top G)_{jc} (W_V)_{ab}
        \end{aligned}

    Cost per sequence: ``O(L² d p)`` for a block of ``p`` parameters (``p = d k``, ``d d_v``, ``d_v d_out``), ``L``
    times the size of the block (the sums over the queries ``i`` are GEMMs with inner dimension ``L``).

    Args:
        layer: the head.
        U3: the inputs ``(B, L, d)``.
        mask: the resolved boolean mask ``(B, L, L)`` or ``None``.
        G: the upstream gradient ``∂ℓ/∂F`` ``(B, L, d_out)``.

    Returns:
        ``{"Q": (B, L d, d k), "K": (B, L d, d k), "V": (B, L d, d d_v)[, "O": (B, L d, d_v d_out)]}``; rows
        ``j d + a`` (``vec_r U``), columns ``vec_r`` of the weight (the order of
        :func:`energy.hessian.moments.attention_jacobians`).
    """
    h = _head(layer, U3, mask)
    B, L, d = U3.shape
    kap = h.kappa
    W_Q, W_K, W_V, W_O = layer.W_Q, layer.W_K, layer.W_V, layer.W_O
    Gt = G @ h.V_eff.T  # G̃ = G Ṽᵀ
    R = _score_gradient(h, Gt, U3)
    F_K, F_U = _apply_J(h, h.K), _apply_J(h, U3)  # J_i K, J_i U: (B, i, l, ·)
    kGtT, kQtT = (kap * Gt).transpose(-1, -2), (kap * h.Qt).transpose(-1, -2)  # (B, a, i)
    # Each block is one GEMM over the queries i that writes it once: H[j, a] = Uᵀ Y[j, a] (W_Q), Y[j, a] Q (W_K),
    # Y[j, a] G_O (W_V), Y[j, a] G (W_O); the δ_ab terms are added on the diagonal, the rank-one remainder
    # of W_K by one addcmul.

    # W_Q: Y[j,a,i,c] = κ G̃_ia F^K_{i,jc} + κ r_ij W_K[a,c] (+ κ² Q̃_ia E^K_{i,jc} + δ_ij κ² (K̃ᵀ E^K_j)_ac)
    Y = (kGtT[:, None, :, :, None] * F_K.transpose(1, 2).unsqueeze(2)
         + kap * R.transpose(-1, -2)[:, :, None, :, None] * W_K[None, None, :, None, :])
    if h.softmax:
        E_K = _apply_C(h, R, h.K)
        Y = Y + kap * kQtT[:, None, :, :, None] * E_K.transpose(1, 2).unsqueeze(2)
        Y = _plus_diagonal(Y, kap * kap * torch.einsum("bla,bjlc->bacj", h.Kt, E_K), 1, 3)
    H_Q = torch.einsum("nib,njaic->njabc", U3, Y)
    H_Q = _plus_diagonal(H_Q, (kap * R @ h.K).unsqueeze(-1), 2, 3)  # κ δ_ab (RK)_jc

    # W_K: Y[j,a,b,i] = κ G̃_ia F^U_{i,jb} (+ κ² Q̃_ia E^U_{i,jb} + δ_ij κ² (K̃ᵀ E^U_j)_ab)
    F_Ut = F_U.permute(0, 2, 3, 1).unsqueeze(2)  # (B, j, 1, b, i)
    Y = kGtT[:, None, :, None, :] * F_Ut
    if h.softmax:
        E_U = _apply_C(h, R, U3)
        Y = Y + kap * kQtT[:, None, :, None, :] * E_U.permute(0, 2, 3, 1).unsqueeze(2)
        Y = _plus_diagonal(Y, kap * kap * torch.einsum("nla,njlb->nabj", h.Kt, E_U), 1, 4)
    H_K = (Y.reshape(B, -1, L) @ h.Q).reshape(B, L, d, d, -1)  # (B, j, a, b, c)
    H_K = torch.addcmul(H_K, (kap * R @ U3)[:, :, None, :, None], W_Q[None, None, :, None, :])  # κ (RU)_jb W_Q[a,c]
    H_K = _plus_diagonal(H_K, (kap * R.transpose(-1, -2) @ h.Q).unsqueeze(-1), 2, 3)  # κ δ_ab (RᵀQ)_jc

    def value_side(F: Tensor, W: Tensor | None, S: Tensor) -> Tensor:
        """``Y[j,a,b,i] = κ Q̃_ia F_{i,jb} + δ_ij κ (K̃ᵀ F_j)_ab + a_ij W_ab`` (``W = I`` if ``None``), times ``S``."""
        Y = kQtT[:, None, :, None, :] * F.permute(0, 2, 3, 1).unsqueeze(2)
        Y = _plus_diagonal(Y, kap * torch.einsum("nla,njlb->nabj", h.Kt, F), 1, 4)
        A_t = h.A.transpose(-1, -2)  # (B, j, i)
        if W is None:
            Y = _plus_diagonal(Y, A_t.unsqueeze(-1), 2, 3)
        else:
            Y = torch.addcmul(Y, A_t[:, :, None, None, :], W[None, None, :, :, None])
        return (Y.reshape(B, -1, L) @ S).reshape(B, L, d, -1, S.shape[-1])

    # W_V: dv_il = U_lb (G W_Oᵀ)_ic, and the explicit Aᵀ G W_Oᵀ dW_Vᵀ
    out = {"Q": H_Q, "K": H_K, "V": value_side(F_U, None, G if W_O is None else G @ W_O.T)}
    if W_O is not None:  # dv_il = (U W_V)_lb G_ic, and the explicit Aᵀ G dW_Oᵀ W_Vᵀ
        out["O"] = value_side(_apply_J(h, U3 @ W_V), W_V, G)
    return {n: H.reshape(B, L * d, -1) for n, H in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# Autograd twins (torch.func of the layer's own forward map, one sequence at a time)
# ----------------------------------------------------------------------------------------------------------------


def _sequences(U3: Tensor, mask: Tensor | None) -> list[tuple[Tensor, Tensor | None]]:
    """The sequences of a batch with their ``(L, L)`` masks."""
    return [(U3[b], None if mask is None else mask[b]) for b in range(U3.shape[0])]


def autograd_head_input_jacobian(layer: AttentionLayer, U3: Tensor, mask: Tensor | None) -> Tensor:
    """Autograd twin of :func:`head_input_jacobian`: ``torch.func.jacrev`` of ``vec_r F_b`` in ``U_b``."""
    L, d = U3.shape[1:]
    return torch.stack([
        torch.func.jacrev(lambda u, m=m: layer.output(u, m).reshape(-1))(u0).reshape(-1, L * d)
        for u0, m in _sequences(U3, mask)
    ])


def autograd_head_input_hessian(layer: AttentionLayer, U3: Tensor, mask: Tensor | None, G: Tensor) -> Tensor:
    """Autograd twin of :func:`head_input_hessian`: ``torch.func.hessian`` of ``⟨G_b, F_b⟩`` in ``U_b``."""
    L, d = U3.shape[1:]
    return torch.stack([
        torch.func.hessian(lambda u, m=m, g=g: (g * layer.output(u, m)).sum())(u0).reshape(L * d, L * d)
        for (u0, m), g in zip(_sequences(U3, mask), G)
    ])


def autograd_head_input_param_hessian(
    layer: AttentionLayer, U3: Tensor, mask: Tensor | None, G: Tensor
) -> dict[str, Tensor]:
    """Autograd twin of :func:`head_input_param_hessian`: ``torch.func.jacrev`` in the weights of
    ``torch.func.grad`` in ``U_b`` of ``⟨G_b, F_b⟩``.
    """
    L, d = U3.shape[1:]
    names = ("Q", "K", "V", "O")[: len(layer.weights)]
    blocks: dict[str, list[Tensor]] = {n: [] for n in names}
    for (u0, m), g in zip(_sequences(U3, mask), G):

        def s(u: Tensor, weights: tuple[Tensor, ...], m: Tensor | None = m, g: Tensor = g) -> Tensor:
            return (g * layer.with_weights(*weights).output(u, m)).sum()

        jac = torch.func.jacrev(torch.func.grad(s, argnums=0), argnums=1)(u0, layer.weights)
        for n, J in zip(names, jac):
            blocks[n].append(J.reshape(L * d, -1))
    return {n: torch.stack(v) for n, v in blocks.items()}
