r"""A two-matrix FFN that is a descent step of an energy bounded by a quadratic anchor (MATH §7.4).

.. math::
    E_{mlp}(Y) = \sum_i \Big(\tfrac12\|y_i - b\|^2 - \sum_k G(y_i^\top w_k + c_k)\Big),\qquad
    \nabla E_{mlp}(Y) = Y - 1b^\top - \sigma(YW + 1c^\top)\,W^\top ,\qquad G' = \sigma,

so the gradient step is the two-matrix FFN with tied weights ``W_2 = Wᵀ`` and a skip path,

.. math:: Y^+ = Y - \alpha\nabla E_{mlp}(Y) = (1 - \alpha)Y + \alpha 1 b^\top + \alpha\,\sigma(YW + 1c^\top)W^\top .

**Guarantee.** Per token :math:`\nabla^2 E = I - W\,\mathrm{diag}(\sigma'(\cdot))\,W^\top \preceq L\,I` with
:math:`L = 1 + s_-\|W\|_2^2`, :math:`s_- = \max(0, -\inf\sigma')`. The descent lemma (it needs only this upper
curvature bound) gives :math:`E(Y^+) \le E(Y) - \alpha(1 - \alpha L/2)\|\nabla E\|^2`, a descent for
:math:`\alpha \in (0, 2/L)`. The step takes :math:`\alpha = \omega\cdot 2/L` with the fraction
:math:`\omega \in (0, 1)` (the step's ``alpha``), ``L`` computed from the current ``W`` at every forward, so the
guarantee holds for every weight value:

* ``"relu"`` (:math:`G = \tfrac12\mathrm{ReLU}^2`) and ``"sigmoid"`` (:math:`G = \mathrm{softplus}`): :math:`\sigma'
  \ge 0`, :math:`L = 1`, :math:`\alpha = 2\omega` (``ω = ½``: ``Y⁺ = b + σ(YW + c)Wᵀ``);
* ``"gelu"`` (:math:`\sigma(t) = t\Phi(t)`, self-gated: the value ``t`` gated by ``Φ(t)``;
  :math:`G(t) = \tfrac12(t^2 - 1)\Phi(t) + \tfrac12 t\varphi(t)`): :math:`\inf\sigma' = \Phi(-\sqrt2) -
  \sqrt2\varphi(\sqrt2) \approx -0.1289`, so :math:`L = 1 + 0.1289\|W\|_2^2` — a bound computed from the weights.

A *general* gated FFN :math:`W_2(\sigma(W_1^\top y)\odot W_3^\top y)` with :math:`W_1 \ne W_3` is not a gradient
field (its Jacobian is not symmetric, MATH §7.4), so no energy has it as its descent step; tying the gate to the
value (:math:`W_1 = W_3`) gives the self-gated activation :math:`t\,\sigma(t)` above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from energy._validation import EnergyInputError, check_tensor, check_tokens
from energy.base import Energy, StepRange
from unfold.step_base import Step, positive_int

__all__ = ["ACTIVATIONS", "GELU_NEG_SLOPE", "mlp_energy", "mlp_grad", "mlp_curvature_bound", "MLPEnergy",
           "EnergyMLPStep", "gated_jacobian_asymmetry"]

#: :math:`-\inf_t \tfrac{d}{dt}(t\Phi(t)) = \sqrt2\varphi(\sqrt2) - \Phi(-\sqrt2)` (the minimum is at :math:`t=-\sqrt2`)
GELU_NEG_SLOPE = math.sqrt(2.0) * math.exp(-1.0) / math.sqrt(2.0 * math.pi) - 0.5 * math.erfc(1.0)


def _relu_G(T: Tensor) -> Tensor:
    return 0.5 * torch.relu(T) ** 2


def _gelu(T: Tensor) -> Tensor:
    return T * torch.special.ndtr(T)


def _gelu_G(T: Tensor) -> Tensor:
    phi = torch.exp(-0.5 * T * T) / math.sqrt(2.0 * math.pi)
    return 0.5 * (T * T - 1.0) * torch.special.ndtr(T) + 0.5 * T * phi


#: name → (activation σ = G', its antiderivative G, s₋ = max(0, −inf σ'))
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], float]] = {
    "relu": (torch.relu, _relu_G, 0.0),
    "sigmoid": (torch.sigmoid, torch.nn.functional.softplus, 0.0),
    "gelu": (_gelu, _gelu_G, GELU_NEG_SLOPE),
}


def mlp_energy(Y: Tensor, W: Tensor, b: Tensor, c: Tensor, activation: str) -> Tensor:
    r""":math:`E_{mlp}(Y) = \sum_i \tfrac12\|y_i - b\|^2 - \sum_{i,k} G(y_i^\top w_k + c_k)` per batch element
    (MATH §7.4). Pure.
    """
    G = ACTIVATIONS[activation][1]
    return 0.5 * ((Y - b) ** 2).sum((-1, -2)) - G(Y @ W + c).sum((-1, -2))


def mlp_grad(Y: Tensor, W: Tensor, b: Tensor, c: Tensor, activation: str) -> Tensor:
    r""":math:`\nabla E_{mlp}(Y) = Y - 1b^\top - \sigma(YW + 1c^\top)W^\top` (MATH §7.4). Pure."""
    return Y - b - ACTIVATIONS[activation][0](Y @ W + c) @ W.transpose(-1, -2)


def mlp_curvature_bound(W: Tensor, activation: str) -> Tensor:
    r""":math:`L = 1 + s_-\|W\|_2^2 \ge \lambda_{\max}(\nabla^2_{y} E_{mlp})` (MATH §7.4), a 0-dim tensor. Pure."""
    s = ACTIVATIONS[activation][2]
    return 1.0 + s * torch.linalg.matrix_norm(W, ord=2) ** 2


def gated_jacobian_asymmetry(y: Tensor, W_1: Tensor, W_3: Tensor, W_2: Tensor) -> Tensor:
    r""":math:`\|J - J^\top\|_F / \|J\|_F` of the gated map :math:`y \mapsto W_2(\mathrm{silu}(W_1^\top y)\odot
    W_3^\top y)` at ``y`` (MATH §7.4): 0 for every ``y`` iff the map can be a gradient field (autograd Jacobian).
    """
    def f(v: Tensor) -> Tensor:
        return W_2 @ (torch.nn.functional.silu(W_1.T @ v) * (W_3.T @ v))

    J = torch.func.jacrev(f)(y)
    return torch.linalg.matrix_norm(J - J.T) / torch.linalg.matrix_norm(J)


def _check_activation(activation: object) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise EnergyInputError(f"`activation` must be one of {sorted(ACTIVATIONS)} (an activation whose "
                               f"antiderivative gives the energy), got {activation!r}.")
    return activation


class MLPEnergy(Energy):
    r"""The anchored two-matrix energy :math:`E_{mlp}` (module docstring; MATH §7.4) with validated entries.

    Args:
        W: ``(d, m)``.
        b: ``(d,)`` anchor.
        c: ``(m,)`` hidden bias.
        activation: ``"relu"``, ``"sigmoid"`` or ``"gelu"``.
    """

    W: Tensor
    b: Tensor
    c: Tensor

    def __init__(self, W: Tensor, b: Tensor, c: Tensor, activation: str = "relu") -> None:
        super().__init__()
        check_tensor(W, "W", ndim=2)
        check_tensor(b, "b", ndim=1, trailing=(W.shape[0],))
        check_tensor(c, "c", ndim=1, trailing=(W.shape[1],))
        self.activation = _check_activation(activation)
        self.register_buffer("W", W)
        self.register_buffer("b", b)
        self.register_buffer("c", c)

    def _tokens(self, Y: Tensor) -> Tensor:
        return check_tokens(Y, self.W.shape[0], self.W.dtype)

    def energy(self, Y: Tensor) -> Tensor:
        """``E(Y)`` per batch element."""
        return mlp_energy(self._tokens(Y), self.W, self.b, self.c, self.activation)

    def grad(self, Y: Tensor) -> Tensor:
        """The closed-form gradient."""
        return mlp_grad(self._tokens(Y), self.W, self.b, self.c, self.activation)

    def step(self, Y: Tensor, alpha: float | Tensor = 1.0) -> Tensor:
        """``Y − α∇E(Y)``; warns (raises in strict mode) if ``α`` is outside :meth:`step_range`."""
        alpha = self.step_range().check(alpha)
        return Y - alpha * self.grad(Y)

    def step_range(self) -> StepRange:
        """``(0, 2/L)`` with ``L = 1 + s₋‖W‖₂²`` computed from the weights."""
        L = float(mlp_curvature_bound(self.W.detach(), self.activation))
        return StepRange(0.0, 2.0 / L, f"MATH §7.4: descent lemma, λ_max(∇²E) ≤ L = 1 + s₋‖W‖₂² = {L:.6g}")


class EnergyMLPStep(Step):
    r"""The gradient step on :math:`E_{mlp}` with :math:`\alpha = \omega \cdot 2/L(W)` (module docstring).

    ``alpha`` is the fraction ``ω ∈ (0, 1)`` of the weight-dependent bound ``2/L``; ``alpha_range`` (inside
    ``(0, 1)``) makes it learnable, ``backtrack`` is available (the step is affine in ``ω``).

    Args:
        d: token width.
        hidden: hidden width ``m`` (default ``2d``).
        activation: ``"relu"`` (default), ``"sigmoid"`` or ``"gelu"``.
        alpha: ``ω`` (default ½: ``α = 1`` for ReLU).
        learn_alpha, alpha_range, backtrack: step-size policy (:class:`~unfold.step_base.Step`).
        init_std: std of the entries of ``W`` (default ``1/√(d + m)``).
    """

    kind = "tied_mlp"
    term = "E_mlp"
    projection_compatible = True

    def __init__(self, d: int, *, hidden: int | None = None, activation: str = "relu", alpha: float = 0.5,
                 learn_alpha: bool = False, alpha_range: tuple[float, float] | None = None, backtrack: int = 0,
                 init_std: float | None = None) -> None:
        super().__init__(d, alpha=alpha, learn_alpha=learn_alpha)
        self.hidden = positive_int(hidden if hidden is not None else 2 * d, "hidden")
        self.activation = _check_activation(activation)
        self.init_std = init_std
        std = 1.0 / math.sqrt(d + self.hidden) if init_std is None else float(init_std)
        self.W = nn.Parameter(torch.randn(d, self.hidden) * std)
        self.b = nn.Parameter(torch.zeros(d))
        self.c = nn.Parameter(torch.zeros(self.hidden))
        r = self.guaranteed_range()
        if not learn_alpha and alpha_range is None and not backtrack:
            r.check(self.alpha_value, f"{self.kind}.alpha")
        self._setup_step_size(alpha_range, backtrack)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "hidden": self.hidden, "activation": self.activation, "init_std": self.init_std}

    def guarantee(self) -> tuple[str, str]:
        """As :meth:`Step.guarantee`; with ``s₋ > 0`` (``"gelu"``) the range is a bound computed from ``W``."""
        kind, statement = super().guarantee()
        if kind == "gradient" and ACTIVATIONS[self.activation][2] > 0:
            kind = "bound"
        return kind, statement

    def build(self) -> MLPEnergy:
        return MLPEnergy(self.W, self.b, self.c, self.activation)

    def guaranteed_range(self) -> StepRange:
        return StepRange(0.0, 1.0, "MATH §7.4: α = ω·2/L with L = 1 + s₋‖W‖₂² computed from the weights at every "
                                   "forward; the descent lemma needs ω ∈ (0, 1)")

    def _tensors(self) -> dict[str, Any]:
        return {"W": self.W, "b": self.b, "c": self.c, "L": mlp_curvature_bound(self.W, self.activation)}

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        alpha = self._alpha() * 2.0 / t["L"]
        return Y - alpha * mlp_grad(Y, t["W"], t["b"], t["c"], self.activation)

    def _energy_term(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        return mlp_energy(Y, t["W"], t["b"], t["c"], self.activation)
