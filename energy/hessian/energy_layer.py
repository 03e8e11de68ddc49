r"""Loss Hessian of the energy-derived attention layer with respect to its one matrix ``M`` (MATH §4.2).

The layers (MATH §1.1 steps (a) and (b) with the Gaussian kernel, ``W = s M Mᵀ``, ``s = 1/√k``):

.. math::
    F_{(a)} = (1-\alpha) X + \alpha\, A X,\qquad F_{(b)} = X (I - \alpha W) + \alpha\, A X W,\qquad
    A = \mathrm{softmax}(T),\ T_{ij} = x_i^\top W x_j + \beta_j,\ \beta_j = -\tfrac12\|x_j\|_W^2,

and the loss ``ℓ = c_eff Σ_b ‖F_b − Y_b‖²`` (``c`` default ``1/(L d)``, ``reduction`` as in
:mod:`energy.hessian.attention`). ``F_(a)`` is :meth:`energy.attention.AttentionEnergy.step` with
``preconditioner="metric"``, ``F_(b)`` the ``"token"`` step (tested).

Closed form (chain rule through the logits). With ``p_j = Mᵀ x_j`` the logits are quadratic in ``M``:

.. math::
    T_{ij} = s\,(p_i^\top p_j - \tfrac12\|p_j\|^2),\qquad
    \frac{\partial T_{ij}}{\partial M} = s\,\Phi_{ij},\ \ \Phi_{ij} = x_i p_j^\top + x_j (p_i - p_j)^\top,\qquad
    \nabla^2_M T_{ij} = s\,(x_i x_j^\top + x_j x_i^\top - x_j x_j^\top)\otimes I_k .

Let ``𝒯_i`` (``L × dk``) have rows ``s vec_r(Φ_ij)``, ``J_i = diag(a_i) − a_i a_iᵀ`` and
``μ_i = Xᵀ a_i``. The Jacobian of the attention mean is ``J_{μ,i} = Xᵀ J_i 𝒯_i = Σ_j a_ij (x_j − μ_i) s vec_r(Φ_ij)ᵀ``,
and with ``e_i = x_i − μ_i``:

.. math::
    J_{(a),i} = \alpha J_{\mu,i},\qquad
    J_{(b),i} = \alpha\big(W J_{\mu,i} - s\,(I_d\otimes (M^\top e_i)^\top + e_i^\top \otimes M)\big).

``H_o = 2 c_eff Σ_i J_iᵀ J_i``. For ``H_f = Σ_i g_iᵀ ∇²f_i`` (``g_i = 2c_eff(f_i − y_i)``) let ``h_i = g_i`` (a)
or ``W g_i`` (b), ``v_ij = x_jᵀ h_i``, ``r_ij = a_ij (v_ij − a_iᵀ v_i)`` and the softmax curvature
``C_i = diag(r_i) − a_i r_iᵀ − r_i a_iᵀ = ∇²_t (v_iᵀ softmax(t))`` (whose ``Xᵀ C_i X`` is the ``Ŝ_i`` of MATH §3.2):

.. math::
    H_f^{(\mu)} &= \alpha \sum_i \Big[\mathcal T_i^\top C_i \mathcal T_i
        + s\,\big(x_i \rho_i^\top + \rho_i x_i^\top - X^\top \mathrm{diag}(r_i) X\big)\otimes I_k\Big],
        \quad \rho_i = X^\top r_i,\\
    H_f^{(a)} &= H_f^{(\mu)},\qquad
    H_f^{(b)} = H_f^{(\mu)} - \alpha s \sum_i (g_i e_i^\top + e_i g_i^\top)\otimes I_k + \alpha (B + B^\top),\\
    B &= s \sum_i \big[g_i \otimes (M^\top J_{\mu,i}) + (M^\top g_i) \star J_{\mu,i}\big],\quad
    \big((M^\top g_i)\star J\big)[(a,c), q] = (M^\top g_i)[c]\, J[a, q].

(The ``(b)`` terms come from ``d²f_i = −α d²W e_i + 2α dW dμ_i + α W d²μ_i``.) Everything is explicit; the only
"non-Kronecker" object is the logit Jacobian ``𝒯`` of size ``B L² d k`` (cost ``O(B L² (dk)²)`` for
``Σ 𝒯ᵀ C 𝒯``). Tested against ``torch.func.hessian`` in float64.

Not covered: masks (a causal mask is not a step of a symmetric pairwise energy, see :mod:`energy.attention`),
multiple heads, ridge.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from energy._validation import (
    EnergyInputError,
    check_same_device,
    check_same_float_dtype,
    check_tensor,
    warn_if_not_float64,
)
from energy.core import standard as core_standard
from energy.core.attention import kappa, metric, softmax_beta
from energy.hessian.attention_layer import Reduction, _present, check_dense_budget, loss_constant
from energy.hessian.blocks import Part, _check_part

__all__ = [
    "energy_layer_output",
    "energy_layer_loss",
    "energy_layer_jacobian",
    "energy_layer_hessian",
    "autograd_energy_layer_hessian",
    "autograd_energy_layer_ggn",
]


def _scale(M: Tensor, scale: float | None) -> float:
    """``s = κ`` of the core (:func:`energy.core.attention.kappa`: ``scale`` or ``1/√k``)."""
    return float(kappa(scale, M.shape[1]))


def _check_tied(tied: object) -> None:
    if not isinstance(tied, bool):
        raise EnergyInputError(f"`tied` must be a bool (True: values tied to W, step (b)), got {tied!r}.")


def _validate(X: Tensor, M: Tensor, Y: Tensor | None, alpha: float) -> tuple[Tensor, Tensor | None]:
    check_tensor(X, "X")
    if X.ndim not in (2, 3):
        raise EnergyInputError(f"`X` must have shape (L, d) or (B, L, d), got {tuple(X.shape)}.")
    check_tensor(M, "M", ndim=2)
    if M.shape[0] != X.shape[-1]:
        raise EnergyInputError(f"`M` must have shape (d, k) with d = {X.shape[-1]} (the width of X), got "
                               f"{tuple(M.shape)}.")
    if Y is not None:
        check_tensor(Y, "Y")
        if Y.shape != X.shape:
            raise EnergyInputError(f"`Y` must have the shape of `X` {tuple(X.shape)}, got {tuple(Y.shape)}.")
    check_same_float_dtype(**_present(X=X, M=M, Y=Y))
    check_same_device(**_present(X=X, M=M, Y=Y))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise EnergyInputError(f"`alpha` must be a finite real number, got {alpha!r}.")
    X3 = X if X.ndim == 3 else X.unsqueeze(0)
    return X3, None if Y is None else (Y if Y.ndim == 3 else Y.unsqueeze(0))


def energy_layer_output(
    X: Tensor, M: Tensor, *, alpha: float = 1.0, tied: bool = False, scale: float | None = None
) -> Tensor:
    r"""``F_(a) = (1−α)X + α softmax_β(XWXᵀ) X`` or (``tied=True``) ``F_(b) = X(I − αW) + α softmax_β(XWXᵀ) X W``.

    ``softmax_β`` and ``W = s M Mᵀ`` are the pure core's :func:`energy.core.attention.softmax_beta` and
    :func:`energy.core.attention.metric` (MATH §1.1), so every ``torch.func`` transform runs through it.
    """
    _validate(X, M, None, alpha)
    _check_tied(tied)
    W = metric(M, _scale(M, scale))
    A = softmax_beta(X, W)
    if not tied:
        return (1.0 - alpha) * X + alpha * (A @ X)
    return X - alpha * (X - A @ X) @ W


def energy_layer_loss(
    X: Tensor, M: Tensor, Y: Tensor, *, alpha: float = 1.0, tied: bool = False, scale: float | None = None,
    c: float | None = None, reduction: Reduction = "sum",
) -> Tensor:
    """``ℓ = c_eff Σ_b ‖F_b − Y_b‖²`` (constant as in :func:`energy.hessian.attention.loss_constant`)."""
    _validate(X, M, Y, alpha)
    F = energy_layer_output(X, M, alpha=alpha, tied=tied, scale=scale)
    return loss_constant(X, c, reduction) * ((F - Y) ** 2).sum()


class _Terms:
    """Shared quantities of the closed form, rows ``i`` per sequence: ``(B, L, ...)``."""

    def __init__(self, X3: Tensor, M: Tensor, s: float, alpha: float, tied: bool) -> None:
        self.X, self.M, self.s, self.alpha, self.tied = X3, M, s, alpha, tied
        d, k = M.shape
        P = X3 @ M  # p_j = Mᵀ x_j
        self.W = metric(M, s)
        self.A = softmax_beta(X3, self.W)
        self.mu = self.A @ X3
        # 𝒯[b, i, j, (a, c)] = s (x_i[a] p_j[c] + x_j[a] (p_i − p_j)[c])
        D = P.unsqueeze(-2) - P.unsqueeze(-3)  # p_i − p_j, (B, i, j, k)
        T = torch.einsum("bia,bjc->bijac", X3, P) + torch.einsum("bja,bijc->bijac", X3, D)
        self.T = s * T.reshape(*T.shape[:3], d * k)
        # J_μ,i = Σ_j a_ij (x_j − μ_i) 𝒯_ijᵀ,  (B, L, d, dk)
        aT = torch.einsum("bij,bijq->biq", self.A, self.T)
        self.J_mu = torch.einsum("bij,bjm,bijq->bimq", self.A, X3, self.T) - self.mu.unsqueeze(-1) * aT.unsqueeze(-2)
        self.e = X3 - self.mu

    def jacobian(self) -> Tensor:
        """``J_i`` of ``f_i`` w.r.t. ``vec_r(M)``, ``(B, L, d, dk)`` (module docstring)."""
        if not self.tied:
            return self.alpha * self.J_mu
        d, k = self.M.shape
        eye = torch.eye(d, dtype=self.M.dtype, device=self.M.device)
        Me = self.e @ self.M  # (Mᵀ e_i)ᵀ
        dW_e = torch.einsum("ma,bic->bimac", eye, Me) + torch.einsum("bia,mc->bimac", self.e, self.M)
        return self.alpha * (self.W @ self.J_mu - self.s * dW_e.reshape(*dW_e.shape[:3], d * k))

    def functional(self, G: Tensor) -> Tensor:
        """``H_f = Σ_i g_iᵀ ∇²f_i`` for residual gradients ``G`` ``(B, L, d)`` (module docstring)."""
        d, k = self.M.shape
        X, A, s, alpha = self.X, self.A, self.s, self.alpha
        h = G @ self.W if self.tied else G  # W symmetric: rows (W g_i)ᵀ
        v = torch.einsum("bjm,bim->bij", X, h)
        r = core_standard.softmax_jacobian_apply(A, v)
        # Σ_i 𝒯_iᵀ C_i 𝒯_i with C_i = diag(r_i) − a_i r_iᵀ − r_i a_iᵀ
        Ta = torch.einsum("bij,bijq->biq", A, self.T)
        Tr = torch.einsum("bij,bijq->biq", r, self.T)
        H = torch.einsum("bij,bijp,bijq->pq", r, self.T, self.T)
        TaTr = torch.einsum("bip,biq->pq", Ta, Tr)
        H = H - TaTr - TaTr.T
        # Σ_i Σ_j r_ij ∇²T_ij = s Σ_i (x_i ρ_iᵀ + ρ_i x_iᵀ − Xᵀ diag(r_i) X) ⊗ I_k
        rho = r @ X
        xr = torch.einsum("bim,bin->mn", X, rho)
        S2 = xr + xr.T - torch.einsum("bij,bjm,bjn->mn", r, X, X)
        eye_k = torch.eye(k, dtype=X.dtype, device=X.device)
        H = alpha * (H + s * torch.kron(S2, eye_k))
        if not self.tied:
            return H
        ge = torch.einsum("bim,bin->mn", G, self.e)
        H = H - alpha * s * torch.kron(ge + ge.T, eye_k)
        MtJ = torch.einsum("mc,bimq->bicq", self.M, self.J_mu)
        Mg = G @ self.M
        B = s * (torch.einsum("bia,bicq->acq", G, MtJ) + torch.einsum("bic,biaq->acq", Mg, self.J_mu))
        B = B.reshape(d * k, d * k)
        return H + alpha * (B + B.T)


def energy_layer_jacobian(
    X: Tensor, M: Tensor, *, alpha: float = 1.0, tied: bool = False, scale: float | None = None
) -> Tensor:
    """Closed-form Jacobian of ``vec_r(F)`` (all sequences stacked) w.r.t. ``vec_r(M)``: ``(B L d, d k)``."""
    X3, _ = _validate(X, M, None, alpha)
    _check_tied(tied)
    J = _Terms(X3, M, _scale(M, scale), alpha, tied).jacobian()
    return J.reshape(-1, J.shape[-1])


def energy_layer_hessian(
    X: Tensor,
    M: Tensor,
    Y: Tensor,
    *,
    alpha: float = 1.0,
    tied: bool = False,
    scale: float | None = None,
    c: float | None = None,
    reduction: Reduction = "sum",
    part: Part = "H",
    max_gib: float | None = None,
) -> Tensor:
    r"""Closed-form ``part`` (``"H"``, ``"H_o"`` = ``2c JᵀJ``, ``"H_f"``) of ``∇²_M ℓ``, ``(dk, dk)`` (MATH §4.2).

    Args:
        X: tokens, ``(L, d)`` or ``(B, L, d)``.
        M: the layer's weight ``(d, k)`` (the variable of the Hessian).
        Y: target of ``F``, same shape as ``X``.
        alpha: step size ``α``.
        tied: layer ``(b)`` (values tied to ``W``) instead of ``(a)``.
        scale: ``s`` (default ``1/√k``).
        c: loss constant of ``ℓ = c ‖F − Y‖²`` (default ``1/(L d)``).
        reduction: ``"sum"`` over the sequences, or ``"mean"`` (divides ``c`` by their number).
        part: ``"H"`` (the full Hessian), ``"H_o"`` (outer-product part ``2c JᵀJ``) or ``"H_f"`` (functional part).
        max_gib: budget for the ``(dk)²`` result and the ``B L² dk`` logit Jacobian (default 4 GiB).
    """
    _check_part(part)
    X3, Y3 = _validate(X, M, Y, alpha)
    _check_tied(tied)
    d, k = M.shape
    check_dense_budget(d * k, d * k, M.dtype, max_gib, "the dense Hessian w.r.t. M")
    check_dense_budget(X3.shape[0] * X3.shape[1] ** 2, d * k, M.dtype, max_gib, "the logit Jacobian 𝒯")
    c_eff = loss_constant(X, c, reduction)
    terms = _Terms(X3, M, _scale(M, scale), alpha, tied)

    def outer() -> Tensor:
        J = terms.jacobian().reshape(-1, d * k)
        return 2.0 * c_eff * J.T @ J

    def functional() -> Tensor:
        assert Y3 is not None  # Y is required (checked by _validate)
        F = energy_layer_output(X3, M, alpha=alpha, tied=tied, scale=scale)
        return terms.functional(2.0 * c_eff * (F - Y3))

    if part == "H":
        return outer() + functional()
    return outer() if part == "H_o" else functional()


def _twin_setup(X: Tensor, M: Tensor, Y: Tensor, alpha: float, routine: str) -> tuple[int, int]:
    """Checks of an autograd twin (float64 advice, shapes); returns ``M``'s shape ``(d, k)``."""
    warn_if_not_float64(X.dtype, routine)
    _validate(X, M, Y, alpha)
    return M.shape[0], M.shape[1]


def autograd_energy_layer_hessian(
    X: Tensor, M: Tensor, Y: Tensor, *, alpha: float = 1.0, tied: bool = False, scale: float | None = None,
    c: float | None = None, reduction: Reduction = "sum",
) -> Tensor:
    """Autograd twin: ``torch.func.hessian`` of :func:`energy_layer_loss` in ``vec_r(M)``."""
    d, k = _twin_setup(X, M, Y, alpha, "autograd_energy_layer_hessian")

    def loss(m: Tensor) -> Tensor:
        return energy_layer_loss(X, m.reshape(d, k), Y, alpha=alpha, tied=tied, scale=scale, c=c, reduction=reduction)

    return torch.func.hessian(loss)(M.reshape(-1))


def autograd_energy_layer_ggn(
    X: Tensor, M: Tensor, Y: Tensor, *, alpha: float = 1.0, tied: bool = False, scale: float | None = None,
    c: float | None = None, reduction: Reduction = "sum",
) -> Tensor:
    """Autograd twin of ``H_o``: ``2 c_eff JᵀJ`` with ``J = torch.func.jacrev`` of ``vec_r(F)``."""
    d, k = _twin_setup(X, M, Y, alpha, "autograd_energy_layer_ggn")
    J = torch.func.jacrev(
        lambda m: energy_layer_output(X, m.reshape(d, k), alpha=alpha, tied=tied, scale=scale).reshape(-1)
    )(M.reshape(-1))
    return 2.0 * loss_constant(X, c, reduction) * J.T @ J
