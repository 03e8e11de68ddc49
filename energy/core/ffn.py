r"""Feed-forward maps and energies as pure tensor functions (MATH §1.3, §1.5).

Tokens are rows, ``Y ∈ R^{... × n × d}``; weights act on the right. Pure: no validation, no warnings, no value
reads (the validated entry points are :mod:`energy.ffn` and :func:`energy.reference.feed_forward`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from energy.core.standard import affine

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_DERIVATIVES",
    "gelu_tanh",
    "relu_derivatives",
    "gelu_derivatives",
    "gelu_tanh_derivatives",
    "feed_forward",
    "ffn_energy",
    "ffn_grad",
    "tied_relu_energy",
    "tied_relu_grad",
    "descent_step",
    "relaxed_step",
]


def _identity(Z: Tensor) -> Tensor:
    return Z


#: :math:`\sqrt{2/\pi}` and the cubic coefficient of the tanh approximation of GELU (GPT-2's ``gelu_new``).
_TANH_K = math.sqrt(2.0 / math.pi)
_TANH_A = 0.044715


def gelu_tanh(Z: Tensor) -> Tensor:
    r"""GPT-2's tanh approximation of GELU, as ``torch.nn.functional.gelu(Z, approximate="tanh")`` (MATH §5.2).

    .. math:: \varphi(x) = \tfrac12 x\,(1 + \tanh u),\qquad u = \sqrt{2/\pi}\,(x + 0.044715\,x^3)
    """
    return torch.nn.functional.gelu(Z, approximate="tanh")


#: activation name -> map: ``"relu"``, ``"gelu"`` (exact erf form, as ``nn.GELU()``), ``"gelu_tanh"`` (tanh
#: approximation, as ``nn.GELU(approximate="tanh")``), ``None`` (linear)
ACTIVATIONS: dict[str | None, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": gelu_tanh,
    None: _identity,
}


def relu_derivatives(Z: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`(\varphi', \varphi'') = (1[x > 0],\ 0)` of ReLU (MATH §5.2; at :math:`x = 0` the value autograd
    uses, :math:`\varphi'(0) = 0`).
    """
    return (Z > 0).to(Z.dtype), torch.zeros_like(Z)


def gelu_derivatives(Z: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`(\varphi', \varphi'')` of the exact GELU :math:`\varphi(x) = x\Phi(x)` (MATH §5.2).

    .. math:: \varphi'(x) = \Phi(x) + x\phi(x),\qquad \varphi''(x) = \phi(x)\,(2 - x^2),\qquad
        \phi(x) = e^{-x^2/2}/\sqrt{2\pi}
    """
    pdf = torch.exp(-0.5 * Z * Z) / math.sqrt(2.0 * math.pi)
    cdf = 0.5 * (1.0 + torch.erf(Z / math.sqrt(2.0)))
    return cdf + Z * pdf, pdf * (2.0 - Z * Z)


def gelu_tanh_derivatives(Z: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`(\varphi', \varphi'')` of the tanh-approximate GELU (:func:`gelu_tanh`, MATH §5.2).

    With :math:`t = \tanh u`, :math:`u' = k(1 + 3a x^2)`, :math:`u'' = 6akx` (:math:`k = \sqrt{2/\pi}`,
    :math:`a = 0.044715`):

    .. math:: \varphi' = \tfrac12(1 + t) + \tfrac12 x (1 - t^2) u',\qquad
        \varphi'' = (1 - t^2)\,\big(u' - x\,t\,u'^2 + \tfrac12 x\,u''\big)
    """
    t = torch.tanh(_TANH_K * (Z + _TANH_A * Z**3))
    sech2 = 1.0 - t * t
    du = _TANH_K * (1.0 + 3.0 * _TANH_A * Z * Z)
    d2u = 6.0 * _TANH_A * _TANH_K * Z
    return 0.5 * (1.0 + t) + 0.5 * Z * sech2 * du, sech2 * (du - Z * t * du * du + 0.5 * Z * d2u)


def _identity_derivatives(Z: Tensor) -> tuple[Tensor, Tensor]:
    return torch.ones_like(Z), torch.zeros_like(Z)


#: activation name -> ``Z ↦ (φ'(Z), φ''(Z))`` elementwise, for every key of :data:`ACTIVATIONS` (MATH §5.2)
ACTIVATION_DERIVATIVES: dict[str | None, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "relu": relu_derivatives,
    "gelu": gelu_derivatives,
    "gelu_tanh": gelu_tanh_derivatives,
    None: _identity_derivatives,
}


def feed_forward(X: Tensor, W_1: Tensor, b_1: Tensor | None, W_2: Tensor, b_2: Tensor | None,
                 activation: str | None = "relu") -> Tensor:
    r""":math:`\mathrm{FFN}(X) = \sigma(X W_1 + 1 b_1^\top)\, W_2 + 1 b_2^\top` (MATH §1.3)."""
    return affine(ACTIVATIONS[activation](affine(X, W_1, b_1)), W_2, b_2)


def ffn_energy(Y: Tensor, W_f: Tensor, b: Tensor) -> Tensor:
    r""":math:`E(Y) = \tfrac12\operatorname{tr}(Y W_f Y^\top) + \tfrac12\|Y - 1b^\top\|_F^2` per batch element
    (MATH §1.3).
    """
    quad = ((Y @ W_f) * Y).sum(dim=(-2, -1))  # tr(Y W_f Yᵀ): one GEMM
    return 0.5 * quad + 0.5 * (Y - b).square().sum(dim=(-2, -1))


def ffn_grad(Y: Tensor, W_f: Tensor, b: Tensor) -> Tensor:
    r""":math:`\nabla E(Y) = Y (I + W_f) - 1 b^\top` (MATH §1.3)."""
    return Y + Y @ W_f - b


def _tied_preactivation(Y: Tensor, W_1: Tensor, b: Tensor | None) -> Tensor:
    return affine(Y, W_1, b)


def tied_relu_energy(Y: Tensor, W_1: Tensor, b: Tensor | None = None) -> Tensor:
    r""":math:`E(Y) = -\tfrac12\sum_i \|\mathrm{ReLU}(y_i W_1 + b)\|^2` per batch element (MATH §1.3, §2.2
    ``E_hn``).
    """
    return -0.5 * torch.relu(_tied_preactivation(Y, W_1, b)).square().sum(dim=(-2, -1))


def tied_relu_grad(Y: Tensor, W_1: Tensor, b: Tensor | None = None) -> Tensor:
    r""":math:`\nabla E(Y) = -\mathrm{ReLU}(Y W_1 + 1 b^\top) W_1^\top` (MATH §1.3; exact everywhere, ``½ReLU(u)²``
    is ``C¹``).
    """
    return -torch.einsum("...nm,dm->...nd", torch.relu(_tied_preactivation(Y, W_1, b)), W_1)


def descent_step(Y: Tensor, G: Tensor, alpha: float | Tensor) -> Tensor:
    r"""The gradient step :math:`Y^+ = Y - \alpha G` (MATH §1.5, preconditioner ``I``)."""
    return Y - alpha * G


def relaxed_step(Y: Tensor, T: Tensor, alpha: float | Tensor) -> Tensor:
    r""":math:`Y^+ = Y + \alpha (T - Y)`: a step affine in :math:`\alpha` from its :math:`\alpha = 1` value
    :math:`T` (MATH §1.5: :math:`Y - \alpha P^{-1}\nabla E = Y + \alpha(T(Y) - Y)`).
    """
    return Y + alpha * (T - Y)
