r"""Feed-forward energies (MATH §1.3): the quadratic FFN energy, ReLU as a projection, and the tied ReLU energy.

Two energies whose gradient steps are feed-forward blocks:

* :class:`FFNEnergy` — ``E(Y) = ½ tr(Y W_f Yᵀ) + ½ ‖Y − 1bᵀ‖²_F``; its gradient step is the *linear* FFN
  ``Y⁺ = (1 − α) Y − α Y W_f + α 1bᵀ``, and ``ReLU`` applied after it is a projected-gradient step
  (:meth:`FFNEnergy.projected_step`).
* :class:`TiedReLUEnergy` — ``E(Y) = −½ Σ_i ‖ReLU(y_i W_1 + b)‖²``; its gradient step is the two-matrix ReLU FFN
  with tied weights ``W_2 = α W_1ᵀ`` plus the residual path (the Hopfield-layer form used by the Energy
  Transformer, MATH §2.2).

Tokens are rows, ``Y ∈ R^{... × n × d}``; energies are returned per batch element (shape ``Y.shape[:-2]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from energy._validation import (
    ConstraintError,
    EnergyInputError,
    check_readable,
    check_same_device,
    check_same_float_dtype,
    check_symmetric,
    check_tensor,
    check_tokens,
    for_linalg,
)
from energy.base import Energy, StepRange
from energy.core import ffn as core

__all__ = ["FFNEnergy", "TiedReLUEnergy", "tied_relu_energy", "tied_relu_grad"]


class _GradientStepEnergy(Energy):
    """An energy of tokens ``(..., n, d)`` whose step is the plain gradient step ``Y − α∇E(Y)`` (MATH §1.5).

    Subclasses name their pure formulas (``FORMULAS = (energy, gradient)`` of :mod:`energy.core.ffn`, both called
    as ``f(Y, W, b)``) and give :meth:`_weights` ``(W, b)`` (``W`` fixes ``d`` and the dtype) and their range; the
    checks are made here, once per call.
    """

    FORMULAS: ClassVar[tuple[Callable[..., Tensor], Callable[..., Tensor]]]

    def _weights(self) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def d(self) -> int:
        return self._weights()[0].shape[0]

    def _tokens(self, Y: Tensor) -> Tensor:
        return check_tokens(Y, self.d, self._weights()[0].dtype)

    def energy(self, Y: Tensor) -> Tensor:
        """``E(Y)`` per batch element."""
        return self.FORMULAS[0](self._tokens(Y), *self._weights())

    def grad(self, Y: Tensor) -> Tensor:
        """The closed-form gradient ``∇E(Y)``."""
        return self.FORMULAS[1](self._tokens(Y), *self._weights())

    def step(self, Y: Tensor, alpha: float | Tensor = 1.0) -> Tensor:
        """``Y − α∇E(Y)``; warns (raises in strict mode) if ``α`` is outside :meth:`step_range`."""
        alpha = self.step_range().check(alpha)
        return core.descent_step(Y, self.grad(Y), alpha)


# ----------------------------------------------------------------------------------------------------- FFN energy


class FFNEnergy(_GradientStepEnergy):
    r"""Quadratic feed-forward energy (MATH §1.3).

    .. math::
        E(Y) = \tfrac12 \operatorname{tr}(Y W_f Y^\top) + \tfrac12 \|Y - 1 b^\top\|_F^2 ,\qquad
        \nabla E(Y) = Y (I + W_f) - 1 b^\top ,

    and the gradient step (preconditioner ``I``, residual weight ``1 − α``, MATH §1.5)

    .. math:: Y^+ = Y - \alpha \nabla E(Y) = (1-\alpha) Y - \alpha Y W_f + \alpha 1 b^\top .

    **Guarantee.** ``E`` is quadratic with Hessian ``H = I + W_f`` acting on every row, so
    ``E(Y − αg) = E(Y) − α‖g‖² + ½α² tr(g H gᵀ) ≤ E(Y) − α(1 − αλ_max/2)‖g‖²``: descent for
    ``0 < α < 2/λ_max(I + W_f)`` (any ``α > 0`` if ``λ_max ≤ 0``), and beyond ``2/λ_max`` the step increases ``E``
    along the top eigenvector.

    **Boundedness.** If ``λ_min(I + W_f) ≤ 0`` the energy is unbounded below (no minimiser; descent steps diverge
    along the corresponding eigenvector). The constructor rejects such ``W_f`` unless ``allow_unbounded=True``.

    Args:
        W_f: symmetric ``(d, d)`` (checked, never symmetrised).
        b: ``(d,)``.
        allow_unbounded: accept ``W_f`` with ``λ_min(I + W_f) ≤ 0``.
    """

    FORMULAS = (core.ffn_energy, core.ffn_grad)
    W_f: Tensor
    b: Tensor

    def __init__(self, W_f: Tensor, b: Tensor, *, allow_unbounded: bool = False) -> None:
        super().__init__()
        if not isinstance(allow_unbounded, bool):
            raise EnergyInputError(
                f"`allow_unbounded` must be a bool (True or False), got {allow_unbounded!r}."
            )
        check_tensor(W_f, "W_f", ndim=2)
        check_readable(W_f, "W_f", "FFNEnergy (its step range needs the eigenvalues of I + W_f)")
        check_symmetric(W_f.detach(), "W_f")
        check_tensor(b, "b", ndim=1, trailing=(W_f.shape[0],))
        check_same_float_dtype(W_f=W_f, b=b)
        eye = torch.eye(W_f.shape[0], dtype=W_f.dtype, device=W_f.device)
        lam = torch.linalg.eigvalsh(for_linalg(eye + W_f.detach()))  # the step range is a constant, not differentiated
        self.lambda_min, self.lambda_max = float(lam[0]), float(lam[-1])
        if self.lambda_min <= 0 and not allow_unbounded:
            raise ConstraintError(
                f"`W_f`: λ_min(I + W_f) = {self.lambda_min:.3e} ≤ 0, so the FFN energy is unbounded below (it has no "
                "minimiser and descent steps diverge). Keep the spectrum of W_f above -1 (e.g. W_f ⪰ 0 with "
                "eigenvalues in [0, 0.95] as in Yang et al.), or pass allow_unbounded=True to accept it."
            )
        self.register_buffer("W_f", W_f)
        self.register_buffer("b", b)

    def _weights(self) -> tuple[Tensor, Tensor | None]:
        return self.W_f, self.b

    def step_range(self) -> StepRange:
        """``(0, 2/λ_max(I + W_f))`` (``(0, ∞)`` if ``λ_max ≤ 0``): exact for a quadratic."""
        if self.lambda_max <= 0:
            return StepRange(0.0, math.inf, "MATH §1.3: λ_max(I + W_f) ≤ 0, the energy is concave")
        return StepRange(0.0, 2.0 / self.lambda_max, f"MATH §1.3: α < 2/λ_max(I + W_f), λ_max = {self.lambda_max:.4g}")

    def projected_step(self, Y: Tensor, alpha: float = 1.0) -> Tensor:
        r"""Projected-gradient step ``ReLU(Y − α∇E(Y))`` on ``E + ι_{Y ≥ 0}`` (MATH §1.3).

        ``ReLU`` is the Euclidean projection ``Π`` onto the closed convex set ``{Y ≥ 0}``. From a feasible ``Y``
        (``Y ≥ 0``) the projection inequality ``⟨Y − α g − Y⁺, Y − Y⁺⟩ ≤ 0`` gives ``⟨g, Y⁺ − Y⟩ ≤ −‖Y⁺ − Y‖²/α``,
        and the descent lemma with ``L = λ_max(I + W_f)`` gives

        .. math:: E(Y^+) \le E(Y) + \langle g, Y^+ - Y\rangle + \tfrac L2 \|Y^+ - Y\|^2
                  \le E(Y) - \big(\tfrac1\alpha - \tfrac L2\big) \|Y^+ - Y\|^2 ,

        so the same range ``0 < α < 2/L`` as :meth:`step` guarantees descent of ``E + ι_{≥0}``. From an infeasible
        start the first step only makes the point feasible; no inequality with the infeasible ``E(Y)`` is claimed.
        """
        return torch.relu(self.step(Y, alpha))

    def constrained_energy(self, Y: Tensor) -> Tensor:
        """``E(Y) + ι_{≥0}(Y)``: the energy, or ``+inf`` for a batch element with a negative entry."""
        E = self.energy(Y)
        feasible = (Y >= 0).all(dim=-1).all(dim=-1)
        return torch.where(feasible, E, torch.full_like(E, math.inf))


# ------------------------------------------------------------------------------------------------ tied ReLU energy


class TiedReLUEnergy(_GradientStepEnergy):
    r"""Tied two-matrix ReLU energy (MATH §1.3, the Hopfield-network term of the Energy Transformer, §2.2).

    .. math::
        E(Y) = -\tfrac12 \sum_i \|\mathrm{ReLU}(y_i W_1 + b)\|^2 ,\qquad
        \nabla E(Y) = -\mathrm{ReLU}(Y W_1 + 1 b^\top)\, W_1^\top ,

    .. math:: Y^+ = Y - \alpha \nabla E(Y) = Y + \mathrm{ReLU}(Y W_1 + 1 b^\top)\,(\alpha W_1^\top),

    i.e. a residual two-matrix ReLU FFN whose second matrix is tied, ``W_2 = α W_1ᵀ`` (no second bias).

    **Guarantee: every α > 0 descends.** ``u ↦ ½ ReLU(u)²`` is convex and ``C¹``; composed with the affine map
    ``y ↦ yW_1 + b`` and negated, ``E`` is concave and differentiable. Concavity gives the tangent-plane upper bound
    ``E(Y') ≤ E(Y) + ⟨∇E(Y), Y' − Y⟩`` for every ``Y'``; with ``Y' = Y − α∇E(Y)``

    .. math:: E(Y^+) \le E(Y) - \alpha \|\nabla E(Y)\|_F^2 \le E(Y).

    The price: ``E`` is unbounded below (for ``W_1 ≠ 0``), so repeated steps grow the tokens without limit unless a
    normalisation (e.g. the Energy Transformer's LayerNorm, §2.2) keeps them bounded.

    Args:
        W_1: ``(d, m)`` (no symmetry needed: the tie is ``W_2 = α W_1ᵀ``).
        b: ``(m,)`` or ``None``.
    """

    FORMULAS = (core.tied_relu_energy, core.tied_relu_grad)
    RANGE = StepRange(0.0, math.inf, "MATH §1.3: concave C¹ energy, E(Y⁺) ≤ E(Y) − α‖∇E‖² for every α > 0")
    W_1: Tensor
    b: Tensor | None

    def __init__(self, W_1: Tensor, b: Tensor | None = None) -> None:
        super().__init__()
        check_tensor(W_1, "W_1", ndim=2)
        if b is not None:
            check_tensor(b, "b", ndim=1, trailing=(W_1.shape[1],))
        check_same_float_dtype(W_1=W_1, b=b)
        self.register_buffer("W_1", W_1)
        self.register_buffer("b", b)

    def _weights(self) -> tuple[Tensor, Tensor | None]:
        return self.W_1, self.b


def _tied_args(Y: object, W_1: object, b: object) -> tuple[Tensor, Tensor, Tensor | None]:
    """The public checks of :func:`tied_relu_energy` / :func:`tied_relu_grad` (metadata + finiteness of ``Y``)."""
    W_1 = check_tensor(W_1, "W_1", ndim=2)
    if b is not None:
        b = check_tensor(b, "b", ndim=1, trailing=(W_1.shape[1],))
    Y = check_tokens(Y, W_1.shape[0], W_1.dtype)
    check_same_float_dtype(Y=Y, W_1=W_1, b=b)  # type: ignore[arg-type]
    check_same_device(Y=Y, W_1=W_1, b=b)  # type: ignore[arg-type]
    return Y, W_1, b  # type: ignore[return-value]


def tied_relu_energy(Y: Tensor, W_1: Tensor, b: Tensor | None = None) -> Tensor:
    r""":math:`E(Y) = -\tfrac12\sum_i \|\mathrm{ReLU}(y_i W_1 + b)\|^2` per batch element (MATH §1.3, §2.2
    ``E_hn``); the validated entry of :func:`energy.core.ffn.tied_relu_energy`.
    """
    return core.tied_relu_energy(*_tied_args(Y, W_1, b))


def tied_relu_grad(Y: Tensor, W_1: Tensor, b: Tensor | None = None) -> Tensor:
    r""":math:`\nabla E(Y) = -\mathrm{ReLU}(Y W_1 + 1 b^\top) W_1^\top` (MATH §1.3); the validated entry of
    :func:`energy.core.ffn.tied_relu_grad`.
    """
    return core.tied_relu_grad(*_tied_args(Y, W_1, b))
