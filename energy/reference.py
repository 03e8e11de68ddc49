"""Reference (standard) Transformer maths as plain functions.

These are the layers the energies are compared with. They are written with ``einsum`` and an explicit
softmax, so every ``torch.func`` transform (including forward-mode AD) works through them; tests compare
them with ``torch.nn.MultiheadAttention``, ``scaled_dot_product_attention`` and ``torch.nn.LayerNorm``.

Conventions (MATH §0): tokens are rows, ``X ∈ R^{... × n × d}``; weights act on the right, ``Q = X W_Q``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attention_weights", "single_head_attention"]


def attention_weights(
    Q: Tensor,
    K: Tensor,
    *,
    scale: float | None = None,
    mask: Tensor | None = None,
    key_bias: Tensor | None = None,
) -> Tensor:
    r"""Row-softmax attention weights.

    .. math::
        A_{ij} = \frac{\exp(\kappa\, q_i^\top k_j + \beta_j + m_{ij})}
                      {\sum_l \exp(\kappa\, q_i^\top k_l + \beta_l + m_{il})}

    Args:
        Q: queries ``(..., n_q, d_k)``.
        K: keys ``(..., n_k, d_k)``.
        scale: ``κ``; ``None`` means the standard ``1/√d_k``.
        mask: additive mask broadcastable to ``(..., n_q, n_k)`` (``-inf`` = blocked) or a boolean mask
            where ``True`` means *attend* (the ``scaled_dot_product_attention`` convention).
        key_bias: ``β`` of shape ``(..., n_k)``, added to every row (MATH §1.1).
    """
    kappa = 1.0 / math.sqrt(Q.shape[-1]) if scale is None else scale
    S = kappa * torch.einsum("...ik,...jk->...ij", Q, K)
    if key_bias is not None:
        S = S + key_bias.unsqueeze(-2)
    if mask is not None:
        if mask.dtype == torch.bool:
            S = S.masked_fill(~mask, float("-inf"))
        else:
            S = S + mask
    return torch.softmax(S, dim=-1)


def single_head_attention(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, *, scale: float | None = None, mask: Tensor | None = None
) -> Tensor:
    r"""Single-head self-attention without output projection (MATH §3.1).

    .. math:: F = \mathrm{softmax}(\kappa\, X W_Q W_K^\top X^\top)\, X W_V,\qquad \kappa = 1/\sqrt{d_K}
    """
    A = attention_weights(X @ W_Q, X @ W_K, scale=scale, mask=mask)
    return A @ (X @ W_V)
