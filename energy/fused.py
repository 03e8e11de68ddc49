r"""The fused Gaussian attention step: validated public entry to :mod:`energy.core.fused` (MATH §1.1, §1.2).

:func:`attention_step_fused` computes the Gaussian-kernel step (λ = 0) through ``F.scaled_dot_product_attention``
with the key bias β folded into augmented queries and keys; :func:`attention_step_fused_and_energy` also returns
the energy at the input from the kernel's row log-normalisers. Both validate their arguments once and then call the
pure core, which step modules and models call directly.
"""

from __future__ import annotations

import warnings
from typing import TypedDict

from torch import Tensor
from typing_extensions import Unpack

from energy._attention_args import check_preconditioner, check_token_mask, check_Y, heads_orthogonal, lambda_max
from energy._validation import (
    EnergyInputError,
    check_alpha_shape,
    check_options,
    check_same_float_dtype,
    check_scale,
    check_tensor,
    is_readable,
)
from energy.core import attention as core
from energy.core.fused import fused_step, fused_step_and_energy
from energy.core.preconditioner import Preconditioner
from energy.kernels import GaussianKernel
from energy.step_range import attention_step_range

__all__ = ["attention_step_fused", "attention_step_fused_and_energy", "FusedStepOptions"]

_Args = tuple[Tensor, Tensor, "float | Tensor", "float | Tensor", "Tensor | None", "Tensor | None", "Tensor | None"]


class FusedStepOptions(TypedDict, total=False):
    """The keyword options of :func:`attention_step_fused` and :func:`attention_step_fused_and_energy`."""

    scale: float | Tensor | None
    preconditioner: Preconditioner | str
    token_mask: Tensor | None
    value_basis: Tensor | None


def _prepare(Y: object, M: object, alpha: float | Tensor, options: FusedStepOptions) -> _Args:
    """Validate once; returns the core's arguments ``(Y, M3, alpha, κ, values, out, token_mask)``."""
    check_options(options, FusedStepOptions.__annotations__, "attention_step_fused")
    scale, token_mask, value_basis = options.get("scale"), options.get("token_mask"), options.get("value_basis")
    M = check_tensor(M, "M")
    if M.ndim not in (2, 3):
        raise EnergyInputError(f"`M` must be (d, k) or (h, d, k), got shape {tuple(M.shape)}.")
    Y = check_Y(Y, M)
    mask = check_token_mask(token_mask, Y)
    preconditioner = check_preconditioner(options.get("preconditioner", "metric"))
    single = M.ndim == 2
    M3 = M.unsqueeze(0) if single else M
    h, d, k = M3.shape
    kappa = core.kappa(check_scale(scale), k)
    if value_basis is not None:
        value_basis = check_tensor(value_basis, "value_basis", ndim=3, trailing=(h, d, None), finite=False)
        check_same_float_dtype(M=M, value_basis=value_basis)
    check_alpha_shape(alpha)
    if is_readable(M3) and not isinstance(kappa, Tensor):  # the range needs the weights' values
        orthogonal = single or heads_orthogonal(M3)
        lam = lambda_max(M3, kappa) if preconditioner is Preconditioner.TOKEN else 0.0
        attention_step_range(GaussianKernel(), preconditioner, lambda_max_W=lam, orthogonal_heads=orthogonal).check(
            alpha)
    values, out = core.value_output_maps(M3, kappa, preconditioner, single=single, value_basis=value_basis)
    return Y, M3, alpha, kappa, values, out, mask


def attention_step_fused(
    Y: Tensor,
    M: Tensor,
    alpha: float | Tensor = 1.0,
    *,
    return_energy: bool = False,
    **options: Unpack[FusedStepOptions],
) -> Tensor:
    r"""Gaussian-kernel attention step (λ = 0) through ``F.scaled_dot_product_attention`` (MATH §1.1, fused β).

    .. math:: \tilde q_i = [q_i, 1],\quad \tilde k_j = [k_j, -\tfrac12\|k_j\|^2],\qquad
        \kappa\, \tilde q_i^\top \tilde k_j = \kappa\, q_i^\top k_j + \beta_j

    * ``M`` of shape ``(d, k)``: equals :meth:`AttentionEnergy.step <energy.attention.AttentionEnergy.step>`
      (metric: identity values; token: values :math:`K = YM`, output map :math:`\kappa M^\top`).
    * ``M`` of shape ``(h, d, k)``: equals :meth:`MultiHeadAttentionEnergy.step
      <energy.attention.MultiHeadAttentionEnergy.step>` (metric: values :math:`Y U_h`, output map :math:`U_h^\top`;
      token: values :math:`K_h`, output :math:`\kappa M_h^\top`) — the rule of
      :func:`energy.core.attention.value_output_maps`.

    Args:
        Y: tokens ``(..., n, d)``.
        M: ``(d, k)`` or ``(h, d, k)``.
        alpha: step size, checked against the guaranteed range (a warning, an error in strict mode).
        scale: :math:`\kappa` (default :math:`1/\sqrt{k}`).
        preconditioner: ``"metric"`` or ``"token"`` (:class:`energy.core.Preconditioner`).
        token_mask: optional key-padding mask ``(..., n)``, ``True`` = real token; padded rows are returned unchanged.
        value_basis: optional precomputed :func:`~energy.attention.head_bases` ``(h, d, r)`` of ``M`` (multi-head
            metric step), to avoid an SVD per call. It is trusted, not re-checked.
        return_energy: deprecated; use :func:`attention_step_fused_and_energy`.

    Autograd and ``torch.func``: differentiable in ``Y``, ``M``, ``alpha`` (a tensor) and ``value_basis``.

    Returns:
        ``Y⁺`` of the shape of ``Y``.
    """
    if return_energy:
        warnings.warn("attention_step_fused(..., return_energy=True) is deprecated; call "
                      "attention_step_fused_and_energy(...), which returns (Y⁺, E(Y)).", DeprecationWarning,
                      stacklevel=2)
        return attention_step_fused_and_energy(Y, M, alpha, **options)  # type: ignore[return-value]
    return fused_step(*_prepare(Y, M, alpha, options))


def attention_step_fused_and_energy(
    Y: Tensor, M: Tensor, alpha: float | Tensor = 1.0, **options: Unpack[FusedStepOptions]
) -> tuple[Tensor, Tensor]:
    r"""``(Y⁺, E(Y))``: :func:`attention_step_fused` and the energy at its input, :math:`E(Y) = \sum_h E_h(Y)`
    (shape ``Y.shape[:-2]``; MATH §1.1). Without autograd the energy comes from the attention kernel's row
    log-normalisers, :math:`D_{ii} = e^{\beta_i + \ell_i}`, at no pairwise cost; when autograd records it is
    evaluated explicitly (differentiable). Arguments as for :func:`attention_step_fused`.
    """
    return fused_step_and_energy(*_prepare(Y, M, alpha, options))
