r"""The related energies of MATH §2 as pure tensor functions: the modern Hopfield energy (§2.1) and the Energy
Transformer (§2.2). Pure: no validation, no warnings, no value reads (the validated entry points are
:class:`energy.hopfield.HopfieldEnergy` and :class:`energy.energy_transformer.EnergyTransformerEnergy`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from energy.core import ffn, norm
from energy.core.standard import attention_weights, scores

__all__ = [
    "hopfield_update",
    "hopfield_energy_per_query",
    "et_scores",
    "et_attention_energy",
    "et_attention_grad_terms",
    "et_grad_g",
    "et_normalize",
]


def hopfield_update(S: Tensor, X: Tensor, beta: float) -> Tensor:
    r"""The CCCP update :math:`\xi^+ = X^\top\mathrm{softmax}(\beta X\xi)` for every state (rows of ``S``
    ``(..., n_q, d)``; stored patterns ``X`` ``(..., N, d)``; MATH §2.1).
    """
    return attention_weights(S, X, beta) @ X


def hopfield_energy_per_query(S: Tensor, X: Tensor, beta: float) -> Tensor:
    r""":math:`E(\xi) = -\beta^{-1}\log\sum_i e^{\beta x_i^\top\xi} + \tfrac12\xi^\top\xi + \beta^{-1}\log N +
    \tfrac12 M^2` for every state, ``(..., n_q)`` (MATH §2.1).
    """
    N = X.shape[-2]
    M2 = X.square().sum(-1).max(dim=-1).values  # M² = max_i ‖x_i‖², shape X.shape[:-2]
    E = (-torch.logsumexp(scores(S, X, beta), dim=-1) + math.log(N)) / beta
    return E + 0.5 * S.square().sum(-1) + 0.5 * M2.unsqueeze(-1)


def et_normalize(x: Tensor, gamma: float, bias: Tensor | None, eps: float) -> Tensor:
    r""":math:`g = \partial L/\partial x` = LayerNorm with weight :math:`\gamma 1`, bias :math:`\delta` (MATH §2.2)."""
    weight = torch.full((x.shape[-1],), gamma, dtype=x.dtype, device=x.device)
    return norm.layer_norm(x, weight, bias, eps=eps)


def et_scores(G: Tensor, W_Q: Tensor, W_K: Tensor, beta: float,
              exclude_diagonal: bool) -> tuple[Tensor, Tensor, Tensor]:
    r"""``Q_h = G W_Q[h]``, ``K_h = G W_K[h]`` ``(..., h, n, k)`` and the logits :math:`\beta Q_h K_h^\top` with the
    diagonal blocked (``-inf``) if ``exclude_diagonal`` (MATH §2.2).
    """
    Q = torch.einsum("...nd,hdk->...hnk", G, W_Q)
    K = torch.einsum("...nd,hdk->...hnk", G, W_K)
    S = scores(Q, K, beta)
    if exclude_diagonal:
        n = G.shape[-2]
        S = S.masked_fill(torch.eye(n, dtype=torch.bool, device=G.device), float("-inf"))
    return Q, K, S


def et_attention_energy(G: Tensor, W_Q: Tensor, W_K: Tensor, beta: float, exclude_diagonal: bool) -> Tensor:
    r""":math:`E_{att}(G) = -\beta^{-1}\sum_h\sum_C\log\sum_{B\ne C}\exp(\beta k_{hB}^\top q_{hC})` (MATH §2.2)."""
    S = et_scores(G, W_Q, W_K, beta, exclude_diagonal)[2]
    return -torch.logsumexp(S, dim=-1).sum(dim=(-2, -1)) / beta


def et_attention_grad_terms(G: Tensor, W_Q: Tensor, W_K: Tensor, beta: float,
                            exclude_diagonal: bool) -> tuple[Tensor, Tensor]:
    r"""``∂E_att/∂G`` as (query side :math:`-\sum_h A_h K_h W_Q[h]^\top`, key side :math:`-\sum_h A_h^\top Q_h
    W_K[h]^\top`) with :math:`A_h = \mathrm{softmax}(\beta Q_h K_h^\top)` (MATH §2.2).
    """
    Q, K, S = et_scores(G, W_Q, W_K, beta, exclude_diagonal)
    A = torch.softmax(S, dim=-1)  # (..., h, C, B)
    query_side = -torch.einsum("...hcb,...hbk,hdk->...cd", A, K, W_Q)
    key_side = -torch.einsum("...hcb,...hck,hdk->...bd", A, Q, W_K)
    return query_side, key_side


def et_grad_g(G: Tensor, W_Q: Tensor, W_K: Tensor, xi: Tensor, beta: float, exclude_diagonal: bool) -> Tensor:
    r""":math:`\partial E/\partial G` = query side + key side + Hopfield term :math:`-\mathrm{ReLU}(G\xi^\top)\xi`
    (MATH §2.2).
    """
    query_side, key_side = et_attention_grad_terms(G, W_Q, W_K, beta, exclude_diagonal)
    return query_side + key_side + ffn.tied_relu_grad(G, xi.T)
