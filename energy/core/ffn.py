r"""Feed-forward maps and energies as pure tensor functions (MATH §1.3, §1.5).

Tokens are rows, ``Y ∈ R^{... × n × d}``; weights act on the right. Pure: no validation, no warnings, no value
reads (the validated entry points are :mod:`energy.ffn` and :func:`energy.reference.feed_forward`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from energy.core.standard import affine

__all__ = [
    "ACTIVATIONS",
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


#: activation name -> map: ``"relu"``, ``"gelu"`` (exact erf form, as ``nn.GELU()``), ``None`` (linear)
ACTIVATIONS: dict[str | None, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    None: _identity,
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
