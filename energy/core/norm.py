r"""Normalisation maps and the sphere projections as pure tensor functions (MATH §1.4, §2.2).

Pure: no validation, no warnings, no value reads (a token with zero (centred) norm gives a non-finite projection
here; the public :func:`energy.normalization.layernorm_projection` rejects it where the values can be read).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "centre",
    "radial",
    "layer_norm",
    "rms_norm",
    "layernorm_projection",
    "rmsnorm_projection",
    "absorb_layernorm_affine",
    "et_lagrangian",
    "layernorm_jacobian_vp",
]


def centre(Y: Tensor) -> Tensor:
    r""":math:`y - \bar y\,1` for every token (last dimension)."""
    return Y - Y.mean(dim=-1, keepdim=True)


def radial(Z: Tensor) -> Tensor:
    r""":math:`\sqrt d\, z/\|z\|` for every row (MATH §1.4)."""
    return math.sqrt(Z.shape[-1]) * Z / torch.linalg.vector_norm(Z, dim=-1, keepdim=True)


def layer_norm(X: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    r""":math:`\mathrm{LN}(x) = \gamma\odot\frac{x - \bar x1}{\sqrt{\frac1d\|x - \bar x1\|^2 + \varepsilon}} + b`,
    as ``nn.LayerNorm(d, eps)`` (MATH §1.4).
    """
    Xc = centre(X)
    Z = Xc / torch.sqrt((Xc * Xc).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        Z = Z * weight
    return Z if bias is None else Z + bias


def rms_norm(X: Tensor, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    r""":math:`\mathrm{RMS}(x) = \gamma\odot x/\sqrt{\frac1d\|x\|^2 + \varepsilon}`, as ``nn.RMSNorm(d, eps)``
    (``eps=None``: ``torch.finfo(dtype).eps``, the ``nn.RMSNorm`` default; MATH §1.4).
    """
    e = torch.finfo(X.dtype).eps if eps is None else eps
    Z = X / torch.sqrt((X * X).mean(dim=-1, keepdim=True) + e)
    return Z if weight is None else Z * weight


def layernorm_projection(Y: Tensor) -> Tensor:
    r"""Projection onto the centred sphere, :math:`\Pi_{S_c}(y) = \sqrt d\,y_c/\|y_c\|` (MATH §1.4;
    ``LayerNorm`` at ``eps = 0``).
    """
    return radial(centre(Y))


def rmsnorm_projection(Y: Tensor) -> Tensor:
    r"""Projection onto the sphere, :math:`\Pi_S(y) = \sqrt d\,y/\|y\|` (MATH §1.4; ``RMSNorm`` at ``eps = 0``)."""
    return radial(Y)


def absorb_layernorm_affine(W: Tensor, gamma: Tensor) -> Tensor:
    r""":math:`\tilde W = \operatorname{diag}(\gamma)\,W\operatorname{diag}(\gamma)` (MATH §1.4)."""
    return gamma[:, None] * W * gamma[None, :]


def et_lagrangian(x: Tensor, gamma: float, bias: Tensor | None, eps: float) -> Tensor:
    r"""The LayerNorm Lagrangian :math:`L(x) = d\gamma\sqrt{\mathrm{var}(x) + \varepsilon} + \delta^\top x` per
    token (MATH §2.2); :math:`\nabla L` is :func:`layer_norm` with weight :math:`\gamma 1`, bias :math:`\delta`.
    """
    L = x.shape[-1] * gamma * torch.sqrt(centre(x).square().mean(dim=-1) + eps)
    return L if bias is None else L + x @ bias


def layernorm_jacobian_vp(x: Tensor, V: Tensor, gamma: float, eps: float) -> Tensor:
    r""":math:`(\partial g/\partial x)\,v = \frac{\gamma}{\tilde\sigma}(v - \bar v 1 - \hat x(\hat x^\top v)/d)`,
    :math:`\hat x = x_c/\tilde\sigma` for every token (MATH §2.2; symmetric PSD for :math:`\gamma \ge 0`).
    """
    xc = centre(x)
    sigma = torch.sqrt(xc.square().mean(dim=-1, keepdim=True) + eps)
    xh = xc / sigma
    return gamma / sigma * (centre(V) - xh * (xh * V).sum(dim=-1, keepdim=True) / x.shape[-1])
