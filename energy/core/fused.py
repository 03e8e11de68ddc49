r"""The Gaussian attention step through ``F.scaled_dot_product_attention`` (MATH §1.1, "fused β"), pure.

The key bias is folded into an augmented query/key pair: with :math:`q_i = k_i = y_i M_h`,

.. math:: \tilde q_i = [q_i, 1],\quad \tilde k_j = [k_j, -\tfrac12\|k_j\|^2],\qquad
    \kappa\, \tilde q_i^\top \tilde k_j = \kappa\, q_i^\top k_j + \beta_j,\quad
    \beta_j = -\tfrac{\kappa}{2}\|k_j\|^2 = -\tfrac12\|y_j\|^2_{W_h},

and the scale :math:`\kappa` is passed explicitly (the augmented width would change SDPA's default). The values and
output maps are those of :func:`energy.core.attention.value_output_maps`. No validation here; the public entry is
:func:`energy.fused.attention_step_fused`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from energy.core.attention import Scale, gaussian_energy, head_energy
from energy.kernels import GaussianKernel

__all__ = ["fused_step", "fused_step_and_energy", "augmented_qkv", "fused_gaussian_energy"]


def augmented_qkv(Y: Tensor, M3: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Augmented queries, keys and values of all heads from one matmul (MATH §1.1, fused β).

    .. math:: \tilde q_i = [y_i M_h,\ 1],\qquad \tilde k_j = [y_j M_h,\ -\tfrac12\|y_j M_h\|^2],\qquad
        \tilde v_j = [y_j U_h,\ 0]

    ``Y`` ``(B, n, d)``, ``M3`` ``(h, d, k)``, ``values`` ``(h, d, r)``; all padded with zero columns to one width
    ``w = max(k + 1, r)`` (the CPU flash kernel needs equal widths; zero columns change neither the scores nor the
    first ``r`` output columns). Returns ``(B, h, n, w)`` tensors. The stacked factor is built out of place (it may
    be traced); the β column is written into the keys' zero column only when autograd does not record (otherwise it
    is added out of place, so no tensor saved for backward is modified).
    """
    B, n, d = Y.shape
    h, _, k = M3.shape
    r = values.shape[-1]
    w = max(k + 1, r)
    factor = M3.new_zeros(d, h, 3, w)  # new_zeros: at the weights' transform level, so writing them in is safe
    factor[:, :, 0, :k] = M3.permute(1, 0, 2)
    factor[:, :, 1, :k] = M3.permute(1, 0, 2)
    factor[:, :, 2, :r] = values.permute(1, 0, 2)
    bias = M3.new_zeros(h, 3, w)
    bias[:, 0, k] = 1.0  # the query's constant 1
    onehot = bias[0, 0]
    X = torch.addmm(bias.reshape(-1), Y.reshape(-1, d), factor.reshape(d, -1)).view(B, n, h, 3, w)
    beta = torch.linalg.vector_norm(X[..., 1, :k], dim=-1).square().mul(-0.5)  # -½‖k_j‖² = β_j/κ
    if torch.is_grad_enabled() and X.requires_grad:  # the norm saved a view of X: add β out of place
        kt = X[..., 1, :] + beta.unsqueeze(-1) * onehot
    else:  # no graph: write β into the keys' zero column of the buffer (no copy of the keys)
        X[..., 1, k] = beta
        kt = X[..., 1, :]
    q, v = X[..., 0, :], X[..., 2, :]
    return q.transpose(1, 2), kt.transpose(1, 2), v.transpose(1, 2)


def fused_gaussian_energy(lse: Tensor, beta_over_kappa: Tensor, kappa: Scale, token_mask: Tensor | None) -> Tensor:
    r"""Gaussian energy :math:`\sum_h E_h` from the step's row log-normalisers (MATH §1.1), ``(B,)``.

    The logits are :math:`s_{ij} = y_i^\top W y_j + \beta_j`, so with :math:`\ell_i = \log\sum_j m_j e^{s_{ij}}`,
    :math:`D_{ii} = e^{\beta_i + \ell_i}` and :math:`\sum_{j\ne i} m_j\gamma_{ij} = \operatorname{expm1}(\beta_i +
    \ell_i)`; :func:`~energy.core.attention.gaussian_energy` sums them over the real tokens: no pairwise work.
    """
    off = torch.expm1(lse + kappa * beta_over_kappa)
    if token_mask is not None:
        off = off * token_mask.to(off.dtype).unsqueeze(-2)
    return gaussian_energy(off.flatten(-2))


@functools.cache
def _flash_lse_op() -> Any:
    """Torch's CPU flash-attention op, which also returns the row log-sum-exp (``None`` if this torch lacks it)."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


def _sdpa_with_lse(q: Tensor, kt: Tensor, v: Tensor, token_mask: Tensor | None,
                   kappa: Scale) -> tuple[Tensor, Tensor]:
    """SDPA ``(B, h, n, w)`` and the log-sum-exp ``(B, h, n)`` of its logits (no autograd); one pass on CPU."""
    bias = None
    if token_mask is not None:  # additive key mask: 0 for real tokens, −∞ for padding
        bias = torch.zeros(token_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~token_mask, -math.inf)
        bias = bias.view(-1, 1, 1, token_mask.shape[-1])
    op = _flash_lse_op() if q.device.type == "cpu" and not isinstance(kappa, Tensor) else None
    if op is not None:
        O, lse = op(q, kt, v, attn_mask=bias, scale=kappa)
        return O, lse
    S = kappa * (q @ kt.transpose(-1, -2))
    if bias is not None:
        S = S + bias
    lse = torch.logsumexp(S, dim=-1)
    return torch.exp(S - lse.unsqueeze(-1)) @ v, lse


def _run(Y: Tensor, M3: Tensor, alpha: Scale, kappa: Scale, values: Tensor | None, out: Tensor | None,
         token_mask: Tensor | None, with_energy: bool) -> tuple[Tensor, Tensor | None]:
    lead, n = Y.shape[:-2], Y.shape[-2]
    h, d, k = M3.shape
    if values is None:  # one head, identity values
        values = torch.eye(d, dtype=M3.dtype, device=M3.device).unsqueeze(0)
    q, kt, v = augmented_qkv(Y.reshape(-1, n, d), M3, values)
    mask_flat = None if token_mask is None else token_mask.expand(*lead, n).reshape(-1, n)
    r = values.shape[-1]
    energy = None
    if with_energy and not kt.requires_grad:
        O, lse = _sdpa_with_lse(q, kt, v, mask_flat, kappa)
        energy = fused_gaussian_energy(lse, kt[..., k], kappa, mask_flat).reshape(lead)
    else:
        if isinstance(kappa, Tensor):  # a tensor scale: SDPA takes a Python float, so form the logits
            O = _sdpa_with_lse(q, kt, v, mask_flat, kappa)[0]
        else:
            attn_mask = None if mask_flat is None else mask_flat.view(-1, 1, 1, n)
            O = F.scaled_dot_product_attention(q, kt, v, attn_mask=attn_mask, scale=kappa)
        if with_energy:  # autograd records: the kernel's log-normalisers carry no gradient
            energy = head_energy(Y, M3, kappa, GaussianKernel(), 0.0, token_mask).sum(-1)
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
    return Yp, energy


def fused_step(Y: Tensor, M3: Tensor, alpha: Scale, kappa: Scale, values: Tensor | None, out: Tensor | None,
               token_mask: Tensor | None = None) -> Tensor:
    r"""The Gaussian attention step (λ = 0) of MATH §1.1 (a)/(b), §1.2 through SDPA; equal to
    :func:`energy.core.attention.head_step` with the same ``values``/``out`` (:func:`~energy.core.attention.
    value_output_maps`). ``Y`` ``(..., n, d)``, ``M3`` ``(h, d, k)``, ``token_mask`` ``(..., n)`` or ``None``.
    """
    return _run(Y, M3, alpha, kappa, values, out, token_mask, False)[0]


def fused_step_and_energy(Y: Tensor, M3: Tensor, alpha: Scale, kappa: Scale, values: Tensor | None,
                          out: Tensor | None, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""``(Y⁺, E(Y))``: :func:`fused_step` and the Gaussian energy at its input (``Y.shape[:-2]``). Without autograd
    the energy comes from the kernel's row log-normalisers (:func:`fused_gaussian_energy`), otherwise it is
    evaluated explicitly (differentiable).
    """
    Yp, E = _run(Y, M3, alpha, kappa, values, out, token_mask, True)
    return Yp, cast(Tensor, E)
