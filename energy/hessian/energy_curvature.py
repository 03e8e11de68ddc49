r"""Token-space curvature of the energies and the step sizes it allows (MATH §4.1, §1.1 "Guarantee", §1.3).

Attention energy (MATH §4.1), ``vec_r`` order (token, then feature; MATH §0):

.. math::
    \nabla^2_Y E_{att} = (L + \lambda I) \otimes W + \sum_{i<j} \rho''(z_{ij})\, v_{ij} v_{ij}^\top,\qquad
    v_{ij} = (e_i - e_j)\otimes u_{ij},\quad u_{ij} = W (y_i - y_j).

Derivation: ``∂z_ij/∂y_i = u_ij = −∂z_ij/∂y_j`` and ``∇²z_ij = [[W, −W], [−W, W]]`` on ``(y_i, y_j)``, so
``∇²ρ(z_ij) = ρ'(z_ij)∇²z_ij + ρ''(z_ij) v_ij v_ijᵀ``; summing the first terms gives ``L ⊗ W``. For the Gaussian
kernel ``ρ'' = −γ ≤ 0``: the true Hessian is the majoriser's curvature ``L ⊗ W`` minus a PSD correction. Multi-head
energies add one such term per head (``W_h``, ``Γ_h``).

FFN energy (MATH §1.3): ``E = ½ tr(Y W_f Yᵀ) + ½‖Y − 1bᵀ‖²`` acts on every token alike, so in ``vec_r`` order
``∇²E_ffn = I_n ⊗ (I + W_f)`` (block diagonal, one ``(I + W_f)`` per token).

Step sizes (MATH §1.1). With ``D̃ = D + λI`` and ``N = I − D̃^{-1/2} Γ D̃^{-1/2}`` the majoriser at ``Yᵗ`` is
``Q(Y | Yᵗ) = ½ tr(Yᵀ (L + λI) Y W) + const = ½ tr(Zᵀ N Z W) + const`` in ``Z = D̃^{1/2} Y``. With ``D``, ``Γ``
frozen at ``Yᵗ``, the two steps are linear maps:

* (a) ``Y⁺ = Y − α D̃⁻¹ ∇Q W⁻¹`` ⇔ ``Z⁺ = (I − αN) Z``: ``Q`` descends for every ``Z`` iff ``α λ_max(N) ≤ 2``;
* (b) ``Y⁺ = Y − α D̃⁻¹ ∇Q`` ⇔ ``Z⁺ = Z − α N Z W`` (a plain gradient step on the quadratic with Hessian ``N ⊗ W``):
  ``Q`` descends for every ``Z`` iff ``α λ_max(N) λ_max(W) ≤ 2``.

:func:`majoriser_step_bound` returns these bounds for the state ``Yᵗ`` (they are at least the kernel-generic
ranges of :func:`energy.attention.attention_step_range`, since ``λ_max(N) ≤ 1`` for ``Γ ⪰ 0`` and ``≤ 2`` always);
by the MM sandwich ``E(Y⁺) ≤ Q(Y⁺|Yᵗ) ≤ Q(Yᵗ|Yᵗ) = E(Yᵗ)`` every ``α`` up to the bound descends ``E``.
:func:`preconditioned_curvature` gives the local quantity ``λ_max(P^{-1/2} ∇²E P^{-1/2})`` of the *true* Hessian.

Not covered: token (padding) masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor

from energy._attention_args import check_preconditioner
from energy._validation import EnergyInputError, check_tensor
from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy, pairwise_sq_dist
from energy.core import Preconditioner
from energy.ffn import FFNEnergy
from energy.hessian.attention import check_dense_budget, warn_if_not_float64

__all__ = [
    "attention_energy_hessian",
    "ffn_energy_hessian",
    "autograd_energy_hessian",
    "majoriser_matrix",
    "majoriser_value",
    "majoriser_step",
    "majoriser_step_bound",
    "preconditioned_curvature",
]



def _check_Y(Y: object, d: int, dtype: torch.dtype) -> Tensor:
    Y = check_tensor(Y, "Y", min_ndim=2)
    if Y.shape[-1] != d:
        raise EnergyInputError(
            f"`Y` must have width d = {d} (tokens are rows, Y is (..., n, d)), got {tuple(Y.shape)}."
        )
    if Y.dtype != dtype:
        raise EnergyInputError(f"`Y` has dtype {Y.dtype} but the energy's weights are {dtype}; cast one of them.")
    return Y


def _check_single(Y: Tensor) -> Tensor:
    if Y.ndim != 2:
        raise EnergyInputError(
            f"`Y` must be one sequence (n, d) here, got shape {tuple(Y.shape)}; loop over the batch."
        )
    return Y


def attention_energy_hessian(
    energy: AttentionEnergy | MultiHeadAttentionEnergy, Y: Tensor, *, max_gib: float | None = None
) -> Tensor:
    r"""Closed-form ``∇²_Y E_att`` (MATH §4.1) in ``vec_r`` order, shape ``(..., n d, n d)``.

    .. math::
        \nabla^2_Y E = \sum_h \Big[(L_h + \lambda I)\otimes W_h + \sum_{i<j}\rho''(z^h_{ij})\,
        v^h_{ij} {v^h_{ij}}^\top\Big]

    Block ``(i, j)``, ``i ≠ j``, of the second term is ``−ρ''_ij u_ij u_ijᵀ``; block ``(i, i)`` is
    ``Σ_{j≠i} ρ''_ij u_ij u_ijᵀ``. Cost ``O(n² d²)`` memory and time per head and batch element; ``max_gib``
    (default 4 GiB) bounds the result (:class:`~energy.hessian.attention.DenseSizeError`).
    """
    if not isinstance(energy, (AttentionEnergy, MultiHeadAttentionEnergy)):
        raise EnergyInputError(f"`energy` must be an AttentionEnergy or MultiHeadAttentionEnergy, got "
                               f"{type(energy).__name__}.")
    W = energy.W
    W3 = W if W.ndim == 3 else W.unsqueeze(0)  # (h, d, d)
    Y = _check_Y(Y, W3.shape[-1], W3.dtype)
    n, d = Y.shape[-2], Y.shape[-1]
    batch = math.prod(Y.shape[:-2])
    check_dense_budget(batch * n * d, n * d, Y.dtype, max_gib, "the token-space energy Hessian")
    Gamma = energy.weights(Y)
    Gamma = Gamma if Gamma.ndim == Y.ndim + 1 else Gamma.unsqueeze(-3)  # (..., h, n, n)
    eye_n = torch.eye(n, dtype=Y.dtype, device=Y.device)
    L = torch.diag_embed(Gamma.sum(-1)) - Gamma + energy.ridge * eye_n  # L_h + λI
    H = torch.einsum("...hij,hab->...iajb", L, W3)
    Yh = Y.unsqueeze(-3).expand(*Y.shape[:-2], W3.shape[0], n, d)  # one copy of the tokens per head
    z = pairwise_sq_dist(Yh, W3)  # (..., h, n, n)
    c = energy.kernel.d2rho(z) * (1.0 - eye_n)  # ρ''(z_ij), i ≠ j
    YW = Y.unsqueeze(-3) @ W3  # rows (W y_i)ᵀ
    u = YW.unsqueeze(-2) - YW.unsqueeze(-3)  # u_ij = W (y_i − y_j), (..., h, n, n, d)
    T = torch.einsum("...hij,...hija,...hijb->...iajb", c, u, u)  # c_ij u_ij u_ijᵀ summed over heads
    H = H - T + _block_diag_rowsum(T)
    return H.reshape(*Y.shape[:-2], n * d, n * d)


def _block_diag_rowsum(T: Tensor) -> Tensor:
    """``out[i, :, i, :] = Σ_j T[i, :, j, :]`` and zero off the diagonal blocks, for ``T (..., n, d, n, d)``."""
    n = T.shape[-2]
    S = T.sum(-2)  # (..., n, d, d)
    eye_n = torch.eye(n, dtype=T.dtype, device=T.device)
    return torch.einsum("...iab,ij->...iajb", S, eye_n)


def ffn_energy_hessian(energy: FFNEnergy, n: int) -> Tensor:
    r"""``∇²_Y E_ffn = I_n ⊗ (I + W_f)`` in ``vec_r`` order (MATH §1.3), shape ``(n d, n d)``; independent of ``Y``."""
    if not isinstance(energy, FFNEnergy):
        raise EnergyInputError(f"`energy` must be an FFNEnergy, got {type(energy).__name__}.")
    if not isinstance(n, int) or n < 1:
        raise EnergyInputError(f"`n` (number of tokens) must be a positive int, got {n!r}.")
    W_f = cast(Tensor, energy.W_f)
    eye_d = torch.eye(W_f.shape[0], dtype=W_f.dtype, device=W_f.device)
    return torch.kron(torch.eye(n, dtype=W_f.dtype, device=W_f.device), eye_d + W_f)


def autograd_energy_hessian(energy: torch.nn.Module, Y: Tensor) -> Tensor:
    """Autograd twin: ``torch.func.hessian`` of ``energy.energy`` at one sequence ``Y (n, d)``, ``(n d, n d)``."""
    Y = _check_single(check_tensor(Y, "Y"))
    warn_if_not_float64(Y.dtype, "autograd_energy_hessian")
    n, d = Y.shape
    energy_fn = cast(Callable[[Tensor], Tensor], energy.energy)
    return torch.func.hessian(lambda y: energy_fn(y.reshape(n, d)))(Y.reshape(-1))


# ----------------------------------------------------------------------------------------------------------------
# the majoriser and the step sizes it allows (MATH §1.1 "Guarantee")
# ----------------------------------------------------------------------------------------------------------------


def _frozen(energy: AttentionEnergy, Y_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Γ, D̃ diagonal, L + λI)`` at the state ``Y_t`` (single head, one sequence)."""
    if not isinstance(energy, AttentionEnergy):
        raise EnergyInputError(
            f"`energy` must be a single-head AttentionEnergy (the majoriser bound of MATH §1.1), got "
            f"{type(energy).__name__}; for orthogonal heads apply it per head."
        )
    Y_t = _check_single(_check_Y(Y_t, energy.W.shape[-1], energy.W.dtype))
    Gamma = energy.weights(Y_t)
    deg = Gamma.sum(-1) + energy.ridge
    L = torch.diag(Gamma.sum(-1)) - Gamma + energy.ridge * torch.eye(Y_t.shape[0], dtype=Y_t.dtype, device=Y_t.device)
    return Gamma, deg, L


def majoriser_matrix(energy: AttentionEnergy, Y_t: Tensor) -> Tensor:
    r"""``N = I − D̃^{-1/2} Γ D̃^{-1/2}`` at ``Y_t`` (MATH §1.1), ``D̃ = D + λI``; symmetric PSD, ``λ(N) ⊂ [0, 2]``."""
    Gamma, deg, _ = _frozen(energy, Y_t)
    s = deg.rsqrt()
    return torch.eye(Gamma.shape[0], dtype=Gamma.dtype, device=Gamma.device) - s.unsqueeze(-1) * Gamma * s.unsqueeze(-2)


def majoriser_value(energy: AttentionEnergy, Y_t: Tensor, Y: Tensor) -> Tensor:
    r"""The non-constant part ``½ tr(Yᵀ (L + λI) Y W)`` of the majoriser ``Q(Y | Y_t)`` (weights frozen at ``Y_t``)."""
    _, _, L = _frozen(energy, Y_t)
    return 0.5 * torch.einsum("ia,ij,jb,ab->", Y, L, Y, energy.W)


def majoriser_step(
    energy: AttentionEnergy, Y_t: Tensor, Y: Tensor, alpha: float, preconditioner: Preconditioner | str = "metric"
) -> Tensor:
    r"""The step with ``D``, ``Γ`` frozen at ``Y_t``, applied to any ``Y``: ``Y − α D̃⁻¹ (L + λI) Y`` (a) or
    ``Y − α D̃⁻¹ (L + λI) Y W`` (b). At ``Y = Y_t`` this is :meth:`AttentionEnergy.step`.
    """
    preconditioner = check_preconditioner(preconditioner)
    _, deg, L = _frozen(energy, Y_t)
    G = (L @ Y) / deg.unsqueeze(-1)
    return Y - alpha * (G if preconditioner == "metric" else G @ energy.W)


def majoriser_step_bound(energy: AttentionEnergy, Y_t: Tensor,
                         preconditioner: Preconditioner | str = "metric") -> float:
    r"""Largest ``α`` for which the step descends the majoriser ``Q(· | Y_t)`` from every start (MATH §1.1).

    .. math:: \alpha_{(a)} = \frac{2}{\lambda_{\max}(N)},\qquad
              \alpha_{(b)} = \frac{2}{\lambda_{\max}(N)\,\lambda_{\max}(W)}

    (``inf`` if the denominator is 0). At ``α`` equal to the bound the worst-case start keeps ``Q`` unchanged;
    beyond it ``Q`` increases along the top eigenvector. Every ``α ∈ (0, bound]`` gives ``E(Y⁺) ≤ E(Y_t)``.
    """
    preconditioner = check_preconditioner(preconditioner)
    lam_N = float(torch.linalg.eigvalsh(majoriser_matrix(energy, Y_t))[-1])
    lam = lam_N if preconditioner == "metric" else lam_N * float(torch.linalg.eigvalsh(energy.W)[-1])
    return float("inf") if lam <= 0 else 2.0 / lam


def preconditioned_curvature(
    energy: AttentionEnergy, Y: Tensor, preconditioner: Preconditioner | str = "metric"
) -> dict[str, float]:
    r"""Local curvature ``λ_max(P^{-1/2} ∇²E P^{-1/2})`` of the true Hessian, and of the majoriser ``L ⊗ W``.

    ``P = D̃ ⊗ W`` (``"metric"``, needs ``W ≻ 0``) or ``D̃ ⊗ I`` (``"token"``). For the majoriser curvature the
    result equals ``λ_max(N)`` (a) resp. ``λ_max(N)λ_max(W)`` (b) — the quantity behind
    :func:`majoriser_step_bound`. For the Gaussian kernel the true value is at most the majoriser value (the true
    Hessian is ``L ⊗ W`` minus a PSD term). ``2/λ`` is the step size at which a quadratic model with this curvature
    stops descending along the top mode.

    Returns:
        ``{"true": λ_max(P^{-1/2} H P^{-1/2}), "majoriser": λ_max(P^{-1/2}(L̃⊗W)P^{-1/2}), "true_min": λ_min(...)}``.
    """
    preconditioner = check_preconditioner(preconditioner)
    _, deg, L = _frozen(energy, Y)
    W = energy.W
    lam_W, V_W = torch.linalg.eigh(W)
    if preconditioner == "metric":
        if float(lam_W[0]) <= 1e3 * torch.finfo(W.dtype).eps * float(lam_W[-1]):
            raise EnergyInputError("the 'metric' preconditioner needs W ≻ 0 (M of full row rank, k ≥ d); use 'token'.")
        W_isqrt = (V_W * lam_W.rsqrt()) @ V_W.T
    else:
        W_isqrt = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    P_isqrt = torch.kron(torch.diag(deg.rsqrt()), W_isqrt)
    H = attention_energy_hessian(energy, Y)
    H_maj = torch.kron(L, W)
    true = torch.linalg.eigvalsh(P_isqrt @ H @ P_isqrt)
    maj = torch.linalg.eigvalsh(P_isqrt @ H_maj @ P_isqrt)
    return {"true": float(true[-1]), "true_min": float(true[0]), "majoriser": float(maj[-1])}
