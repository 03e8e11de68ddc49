r"""Standard (softmax and linear) multi-head attention as pure tensor functions (MATH §0, §3.1, §3.6).

Tokens are rows; weights act on the right (``Q = X W_Q``); multi-head weights are head-major along their output
axis, like ``nn.MultiheadAttention``. Pure: no validation, no warnings, no value reads (the validated public
functions are :mod:`energy.reference`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from energy.core.attention import Scale
from energy.core.attention import kappa as resolve_kappa

__all__ = [
    "affine",
    "split_heads",
    "merge_heads",
    "causal_mask",
    "combine_masks",
    "scores",
    "attention_weights",
    "linear_attention_weights",
    "softmax_jacobian_apply",
    "multi_head_attention",
]


def affine(X: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    r""":math:`X W + 1 b^\top` (weights act on the right)."""
    Z = torch.einsum("...nd,de->...ne", X, W)
    return Z if b is None else Z + b


def split_heads(Z: Tensor, num_heads: int) -> Tensor:
    """``(..., n, h·e) -> (..., h, n, e)`` (head-major columns, the ``nn.MultiheadAttention`` layout)."""
    return Z.unflatten(-1, (num_heads, Z.shape[-1] // num_heads)).transpose(-2, -3)


def merge_heads(Z: Tensor) -> Tensor:
    """``(..., h, n, e) -> (..., n, h·e)``, the inverse of :func:`split_heads`."""
    return Z.transpose(-2, -3).flatten(-2)


def causal_mask(n_q: int, n_k: int | None = None, *, device: torch.device | None = None) -> Tensor:
    r"""Boolean causal mask :math:`m_{ij} = [j \le i]` (``True`` = attend), top-left aligned like
    ``scaled_dot_product_attention(is_causal=True)``.
    """
    n_k = n_q if n_k is None else n_k
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()


def combine_masks(mask: Tensor | None, causal: bool, n_q: int, n_k: int, device: torch.device) -> Tensor | None:
    """A user mask (bool ``True`` = attend, or additive float) combined with the causal mask, or ``None``."""
    if not causal:
        return mask
    c = causal_mask(n_q, n_k, device=device)
    if mask is None:
        return c
    if mask.dtype == torch.bool:
        return mask & c
    return torch.where(c, mask, float("-inf"))


def scores(Q: Tensor, K: Tensor, kappa: Scale) -> Tensor:
    r""":math:`S = \kappa\, Q K^\top`, ``(..., n_q, d_k), (..., n_k, d_k) -> (..., n_q, n_k)``."""
    return kappa * torch.einsum("...ik,...jk->...ij", Q, K)


def attention_weights(Q: Tensor, K: Tensor, kappa: Scale, *, mask: Tensor | None = None,
                      key_bias: Tensor | None = None) -> Tensor:
    r"""Row-softmax attention weights (MATH §1.1, §3.1).

    .. math:: A_{ij} = \frac{\exp(\kappa\, q_i^\top k_j + \beta_j + m_{ij})}{\sum_l \exp(\kappa\, q_i^\top k_l
        + \beta_l + m_{il})}

    ``mask``: bool (``True`` = attend) or additive float, broadcastable to the scores; ``key_bias`` :math:`\beta`
    ``(..., n_k)``. A fully blocked row gives NaN (as in torch).
    """
    S = scores(Q, K, kappa)
    if key_bias is not None:
        S = S + key_bias.unsqueeze(-2)
    if mask is not None:
        S = S.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else S + mask
    return torch.softmax(S, dim=-1)


def linear_attention_weights(Q: Tensor, K: Tensor, kappa: Scale, *, mask: Tensor | None = None) -> Tensor:
    r"""Linear attention (no softmax, MATH §3.6): :math:`A = \kappa\, Q K^\top \odot m` (bool ``mask``, ``True`` =
    keep; blocked scores are 0).
    """
    A = scores(Q, K, kappa)
    return A if mask is None else torch.where(mask, A, 0.0)


def softmax_jacobian_apply(A: Tensor, V: Tensor) -> Tensor:
    r"""Row-wise softmax Jacobian times ``V``: ``r_i = J_i v_i``, ``J_i = diag(a_i) − a_i a_iᵀ`` (MATH §3.2).

    .. math:: r_{ij} = a_{ij}\,(v_{ij} - a_i^\top v_i)

    ``A`` holds the softmax rows ``a_i`` (last dimension), ``V`` the vectors ``v_i`` of the same shape. Then
    ``Σ_j r_ij = 0``; the curvature of ``a(t)ᵀ v`` is ``diag(r) − a rᵀ − r aᵀ``.
    """
    return A * (V - (A * V).sum(-1, keepdim=True))


def multi_head_attention(x_q: Tensor, x_kv: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor | None,
                         *, num_heads: int, b_Q: Tensor | None = None, b_K: Tensor | None = None,
                         b_V: Tensor | None = None, b_O: Tensor | None = None, scale: Scale | None = None,
                         mask: Tensor | None = None, causal: bool = False, linear: bool = False) -> Tensor:
    r"""Multi-head (cross- or self-) attention, softmax or linear (MATH §3.1, §3.6).

    .. math:: F = [A_1 V_1 | \dots | A_H V_H]\, W_O + 1 b_O^\top,\qquad A_h = \mathrm{softmax}(\kappa Q_h K_h^\top
        + m)\ \text{or}\ \kappa Q_h K_h^\top \odot m\ (\text{linear}),

    with ``Q = x_q W_Q + 1b_Qᵀ`` etc. split head-major, :math:`\kappa` = ``scale`` or :math:`1/\sqrt{d_k}`. ``mask``
    (broadcastable to ``(..., n_q, n_k)``) is shared by all heads; ``causal`` adds :func:`causal_mask`.
    """
    Q = split_heads(affine(x_q, W_Q, b_Q), num_heads)  # (..., H, n_q, d_k)
    K = split_heads(affine(x_kv, W_K, b_K), num_heads)  # (..., H, n_k, d_k)
    V = split_heads(affine(x_kv, W_V, b_V), num_heads)  # (..., H, n_k, d_v)
    k = resolve_kappa(scale, Q.shape[-1])
    m = combine_masks(mask, causal, x_q.shape[-2], x_kv.shape[-2], x_q.device)
    m = None if m is None else m.unsqueeze(-3)
    A = linear_attention_weights(Q, K, k, mask=m) if linear else attention_weights(Q, K, k, mask=m)
    heads = merge_heads(torch.einsum("...ij,...jv->...iv", A, V))  # (..., n_q, H·d_v)
    return heads if W_O is None else affine(heads, W_O, b_O)
