r"""Steps from a per-token majoriser of the attention energy: hyperspherical steps (normalisation as a constraint of
the energy, MATH §7.5; in the spirit of Hyper-SET) and the general-heads step with a computed bound (MATH §7.2).

Tokens live on the sphere :math:`\|y_i\| = r` (``r = √d``, the radius of RMSNorm). For an energy :math:`E` whose
curvature along each token is bounded by :math:`\mu_i` at :math:`X` (a per-token majoriser),

.. math:: E(Y) \le E(X) + \sum_i \langle g_i, y_i - x_i\rangle + \tfrac{\mu_i}{2}\|y_i - x_i\|^2 ,
    \qquad g = \nabla E(X),

and on the sphere :math:`\|y_i - x_i\|^2 = 2r^2 - 2\langle x_i, y_i\rangle` is linear in :math:`y_i`, so the bound is
minimised over the sphere by the *normalised gradient step*

.. math:: y_i^+ = r\,\frac{x_i - \eta\, g_i/\mu_i}{\|x_i - \eta\, g_i/\mu_i\|},\qquad \eta \in (0, 1],

and :math:`E(Y^+) \le E(X)` whenever :math:`X` is on the sphere (MM: the minimiser of the bound is at least as
good as :math:`X`). ``η < 1`` uses the larger curvature :math:`\mu_i/η`, also a bound. Two energies:

* attention (:class:`SphereAttentionStep`): the MM majoriser of :math:`E_{att}` (MATH §1.1) has curvature
  :math:`L_h \otimes W_h \preceq D_h \otimes \lambda_{\max}(W_h) I` (Gaussian kernel, :math:`\Gamma_h \succeq 0`), so
  :math:`\mu_i = \sum_h D^h_{ii}\lambda_{\max}(W_h)` — for *any* heads, orthogonal or not;
* FFN (:class:`SphereFFNStep`): :math:`\nabla^2 E_{ffn} = I + W_f`, so :math:`\mu = \lambda_{\max}(I + W_f) \le 1 + hi`
  and the step is ``normalize(Y − α∇E_ffn)`` with :math:`\alpha \in (0, 1/(1 + hi)]`.

The steps are not affine in the step size (the normalisation), so they do not backtrack; their ranges are exact.
A token with :math:`x_i - \eta g_i/\mu_i = 0` has a constant bound on the sphere and stays where it is.

Without the sphere the same bound gives :class:`BoundedAttentionStep`, a gradient step preconditioned per token by
the majoriser's curvature, :math:`y_i^+ = y_i - \eta\, g_i/\mu_i`, which descends for :math:`\eta \in (0, 2)`
(descent lemma: :math:`E(Y^+) \le E(Y) - \sum_i \eta(1 - \eta/2)\|g_i\|^2/\mu_i`) for any heads: the computed step
bound for general (non-orthogonal) heads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from energy._validation import EnergyInputError
from energy.base import Energy, StepRange
from energy.core import attention as core_att
from energy.kernels import GaussianKernel
from unfold.energy_ffn import EnergyMLPStep, mlp_grad
from unfold.step_base import Prepared
from unfold.steps import AttentionStep, FFNStep

__all__ = ["SphereAttentionStep", "SphereFFNStep", "SphereMLPStep", "BoundedAttentionStep", "sphere_normalize",
           "sphere_attention_step", "bounded_attention_step", "attention_grad_and_curvature", "head_lambda_max"]

_GAUSSIAN = GaussianKernel()


def sphere_normalize(V: Tensor, Y: Tensor, radius: float) -> Tensor:
    r""":math:`r\, v_i / \|v_i\|` per token, and :math:`y_i` where :math:`v_i = 0` (every point of the sphere then
    minimises the bound; MATH §7.5). Pure.
    """
    n = torch.linalg.vector_norm(V, dim=-1, keepdim=True)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    return torch.where(n > 0, (radius / safe) * V, Y)


def head_lambda_max(M: Tensor, kappa: float | Tensor) -> Tensor:
    r""":math:`\lambda_{\max}(W_h) = \kappa\,\sigma_{\max}(M_h)^2` per head, ``(h,)`` (MATH §7.5)."""
    return kappa * torch.linalg.matrix_norm(M, ord=2) ** 2


def sphere_attention_step(Y: Tensor, M: Tensor, kappa: float | Tensor, eta: float | Tensor,
                          radius: float) -> Tensor:
    r"""The hyperspherical attention step (MATH §7.5), ``(..., n, d)``.

    .. math:: Y^+ = r\,\mathrm{normalize}\big(Y - \eta\,\mathrm{diag}(\mu)^{-1}\nabla E_{att}(Y)\big),\quad
        \mu_i = \sum_h D^h_{ii}\,\lambda_{\max}(W_h),\quad
        \nabla E_{att} = \sum_h (D_h - \Gamma_h) Y W_h ,

    with :math:`\Gamma_h = \exp(-\tfrac12\|y_i - y_j\|^2_{W_h})` (diagonal 1), :math:`D_h = \mathrm{diag}(\Gamma_h 1)`.
    """
    grad, mu = attention_grad_and_curvature(Y, M, kappa)
    return sphere_normalize(Y - eta * grad / mu.unsqueeze(-1), Y, radius)


def bounded_attention_step(Y: Tensor, M: Tensor, kappa: float | Tensor, eta: float | Tensor) -> Tensor:
    r"""The general-heads attention step with a computed bound (MATH §7.2), ``(..., n, d)``.

    .. math:: Y^+ = Y - \eta\,\mathrm{diag}(\mu)^{-1}\nabla E_{att}(Y),\qquad
        \mu_i = \sum_h D^h_{ii}\lambda_{\max}(W_h),\qquad \eta \in (0, 2).
    """
    grad, mu = attention_grad_and_curvature(Y, M, kappa)
    return Y - eta * grad / mu.unsqueeze(-1)


def attention_grad_and_curvature(Y: Tensor, M: Tensor, kappa: float | Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\nabla E_{att}(Y) = \sum_h (D_h - \Gamma_h) Y W_h` (Gaussian kernel, MATH §1.1) and the per-token
    curvature bound :math:`\mu_i = \sum_h D^h_{ii}\lambda_{\max}(W_h)` of its majoriser (MATH §7.5), from one
    :math:`\Gamma_h` per head; ``(..., n, d)`` and ``(..., n)``. Pure.
    """
    K = core_att.head_keys(Y, M)  # (..., h, n, k)
    _, Gamma = core_att.head_gamma(K, kappa, _GAUSSIAN, None)
    D = Gamma.sum(-1)  # (..., h, n), ≥ 1 (γ_ii = 1)
    T = D.unsqueeze(-1) * K - Gamma @ K  # L_h K_h
    h, d, k = M.shape
    grad = kappa * (T.transpose(-2, -3).flatten(-2) @ M.permute(1, 0, 2).reshape(d, h * k).transpose(0, 1))
    mu = (D * head_lambda_max(M, kappa).unsqueeze(-1)).sum(-2)
    return grad, mu


class _OnSphere:
    """Shared by the hyperspherical steps: the radius and the feasibility test of the certificate."""

    d: int
    radius: float

    def outside_constraint(self, Y: Tensor) -> Tensor:
        """Per input: whether some token is off the sphere (beyond ``1e3·eps`` relative), ``(...,)``."""
        n = torch.linalg.vector_norm(Y, dim=-1)
        tol = 1e3 * torch.finfo(Y.dtype).eps * self.radius
        return ((n - self.radius).abs() > tol).any(-1)

    def guaranteed_range(self) -> StepRange:  # pragma: no cover - overridden
        raise NotImplementedError

    def _range_of(self, energy: Energy) -> StepRange:
        """The exact range is the constrained step's own (:meth:`guaranteed_range`), not the free step's."""
        return self.guaranteed_range()


class SphereAttentionStep(_OnSphere, AttentionStep):
    r"""Attention as an MM step on the sphere (MATH §7.5; module docstring): ``alpha`` is ``η ∈ (0, 1]``, the
    fraction of the majoriser's step; guaranteed for any heads (Gaussian kernel). Tokens stay on ``‖y_i‖ = r``.

    Args:
        d: token width.
        heads: heads (orthogonal or not: the bound holds for both).
        alpha: ``η`` (default 1, the full MM step).
        radius: sphere radius (default ``√d``).
        **kwargs: ``k``, ``scale``, ``orthogonal_heads``, ``learn_alpha``, ``alpha_range``, ``init_std`` of
            :class:`~unfold.steps.AttentionStep`.
    """

    kind = "sphere_attention"
    guarantee_kind = "mm"

    def __init__(self, d: int, *, heads: int = 1, alpha: float = 1.0, radius: float | None = None,
                 **kwargs: Any) -> None:
        for bad in ("kernel", "kernel_kwargs", "preconditioner", "fused", "backtrack"):
            if bad in kwargs:
                raise EnergyInputError(f"the sphere_attention step has no option `{bad}` (Gaussian kernel, its own "
                                       "MM step, exact range); drop it.")
        super().__init__(d, heads=heads, alpha=alpha, fused=False, **kwargs)
        self.radius = _radius(radius, d)

    def config(self) -> dict[str, Any]:
        out = super().config()
        for key in ("kernel", "kernel_kwargs", "preconditioner", "fused"):
            out.pop(key)
        return {**out, "radius": self.radius}

    def guaranteed_range(self) -> StepRange:
        return StepRange(0.0, 1.0, "MATH §7.5: η ∈ (0, 1] of the per-token majoriser on the sphere, "
                                   "μ_i = Σ_h D^h_ii λ_max(W_h)", high_inclusive=True)

    def _tensors(self) -> dict[str, Any]:
        return {"M": self.M, "kappa": core_att.kappa(self.scale, self.k)}

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        return sphere_attention_step(Y, t["M"], t["kappa"], self._alpha(), self.radius)

    def forward_prepared_and_energy(self, prepared: Prepared, Y: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.forward_prepared(prepared, Y), None


class BoundedAttentionStep(AttentionStep):
    r"""Attention as a gradient step preconditioned by the per-token curvature of its majoriser (MATH §7.2): for
    any heads (orthogonal or not), ``alpha = η ∈ (0, 2)`` descends (module docstring). Gaussian kernel.

    Args:
        d: token width.
        heads: heads.
        alpha: ``η`` (default 1).
        **kwargs: ``k``, ``scale``, ``orthogonal_heads``, ``learn_alpha``, ``alpha_range``, ``backtrack``,
            ``init_std`` of :class:`~unfold.steps.AttentionStep`.
    """

    kind = "majorised_attention"
    guarantee_kind = "bound"
    projection_compatible = True  # per-token scaling: the orthant projection is the same in its metric

    def __init__(self, d: int, *, heads: int = 1, alpha: float = 1.0, **kwargs: Any) -> None:
        for bad in ("kernel", "kernel_kwargs", "preconditioner", "fused"):
            if bad in kwargs:
                raise EnergyInputError(f"the majorised_attention step has no option `{bad}` (Gaussian kernel, its own "
                                       "preconditioner); drop it.")
        super().__init__(d, heads=heads, alpha=alpha, fused=False, **kwargs)

    def config(self) -> dict[str, Any]:
        out = super().config()
        for key in ("kernel", "kernel_kwargs", "preconditioner", "fused"):
            out.pop(key)
        return out

    def guaranteed_range(self) -> StepRange:
        return StepRange(0.0, 2.0, "MATH §7.2: η ∈ (0, 2) for the per-token curvature bound μ_i = Σ_h D^h_ii "
                                   "λ_max(W_h) of the attention majoriser (any heads), computed at every forward")

    def _range_of(self, energy: Energy) -> StepRange:
        return self.guaranteed_range()

    def _tensors(self) -> dict[str, Any]:
        return {"M": self.M, "kappa": core_att.kappa(self.scale, self.k)}

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        return bounded_attention_step(Y, t["M"], t["kappa"], self._alpha())

    def forward_prepared_and_energy(self, prepared: Prepared, Y: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.backtrack:
            return super().forward_prepared_and_energy(prepared, Y)
        return self.forward_prepared(prepared, Y), None


class SphereFFNStep(_OnSphere, FFNStep):
    r"""FFN gradient step projected to the sphere (MATH §7.5):
    :math:`Y^+ = r\,\mathrm{normalize}(Y - \alpha\nabla E_{ffn}(Y))`, guaranteed for
    :math:`\alpha \in (0, 1/(1 + hi)]` (``spectrum = (lo, hi)``; default ``α = 1/(1 + hi)``).

    Args:
        d: token width.
        radius: sphere radius (default ``√d``).
        **kwargs: ``spectrum``, ``bias``, ``alpha``, ``learn_alpha``, ``alpha_range``, ``init_std`` of
            :class:`~unfold.steps.FFNStep` (``spectrum`` must not be ``None``).
    """

    kind = "sphere_ffn"
    guarantee_kind = "mm"

    def __init__(self, d: int, *, radius: float | None = None, alpha: float | None = None, **kwargs: Any) -> None:
        if "backtrack" in kwargs:
            raise EnergyInputError("the sphere_ffn step has no option `backtrack` (its range is exact); drop it.")
        spectrum = kwargs.get("spectrum", (0.0, 0.95))
        if spectrum is None:
            raise EnergyInputError("the sphere_ffn step needs `spectrum` = (lo, hi) (its range is 1/(1 + hi)); "
                                   "pass e.g. spectrum=(0.0, 0.95).")
        if alpha is None:
            alpha = 1.0 / (1.0 + float(spectrum[1])) if float(spectrum[1]) > -1 else 1.0
        super().__init__(d, alpha=alpha, **kwargs)
        self.radius = _radius(radius, d)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "radius": self.radius}

    def guaranteed_range(self) -> StepRange:
        assert self.spectrum is not None
        L = 1.0 + self.spectrum[1]
        return StepRange(0.0, 1.0 / L, f"MATH §7.5: α ≤ 1/λ_max(I + W_f) on the sphere, λ_max ≤ {L:g} by the "
                                       "spectrum constraint", high_inclusive=True)

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        return sphere_normalize(super()._step(t, Y), Y, self.radius)


class SphereMLPStep(_OnSphere, EnergyMLPStep):
    r"""The two-matrix FFN energy's step on the sphere (MATH §7.4, §7.5):
    :math:`Y^+ = r\,\mathrm{normalize}(Y - (\omega/L)\nabla E_{mlp}(Y))`, :math:`L = 1 + s_-\|W\|_2^2` computed from
    the weights, guaranteed for :math:`\omega \in (0, 1]` (``alpha`` is ``ω``; (7.5.1) with :math:`\mu_i = L`).

    Args:
        d: token width.
        radius: sphere radius (default ``√d``).
        **kwargs: ``hidden``, ``activation``, ``alpha``, ``learn_alpha``, ``alpha_range``, ``init_std`` of
            :class:`~unfold.energy_ffn.EnergyMLPStep`.
    """

    kind = "sphere_mlp"
    guarantee_kind = "mm"
    projection_compatible = False

    def __init__(self, d: int, *, radius: float | None = None, alpha: float = 1.0, **kwargs: Any) -> None:
        if "backtrack" in kwargs:
            raise EnergyInputError("the sphere_mlp step has no option `backtrack` (its range is exact); drop it.")
        super().__init__(d, alpha=alpha, **kwargs)
        self.radius = _radius(radius, d)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "radius": self.radius}

    def guaranteed_range(self) -> StepRange:
        return StepRange(0.0, 1.0, "MATH §7.5: α = ω/L on the sphere, L = 1 + s₋‖W‖₂² computed from the weights at "
                                   "every forward, ω ∈ (0, 1]", high_inclusive=True)

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        V = Y - (self._alpha() / t["L"]) * mlp_grad(Y, t["W"], t["b"], t["c"], self.activation)
        return sphere_normalize(V, Y, self.radius)


def _radius(radius: float | None, d: int) -> float:
    if radius is None:
        return math.sqrt(d)
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
        raise EnergyInputError(f"`radius` must be a positive finite number (the sphere's radius), got {radius!r}; "
                               "omit it for √d.")
    return float(radius)
