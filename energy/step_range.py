r"""Guaranteed step-size ranges of the attention steps (MATH §1.1 "Guarantee", §1.2)."""

from __future__ import annotations

import math

from torch import Tensor

from energy._attention_args import check_preconditioner
from energy._validation import EnergyInputError, check_real
from energy.base import StepRange
from energy.core.preconditioner import Preconditioner
from energy.kernels import Kernel

__all__ = ["attention_step_range"]


def attention_step_range(
    kernel: Kernel, preconditioner: Preconditioner | str, *, lambda_max_W: float, orthogonal_heads: bool = True
) -> StepRange:
    r"""Step sizes for which the attention steps provably do not increase the energy (MATH §1.1 "Guarantee").

    Proof sketch (MM). Since ρ is concave, :math:`E(Y) \le Q(Y\mid Y^t) = \tfrac12\mathrm{tr}(Y^\top (L + \lambda I)
    Y W) + c` with equality at :math:`Y^t`. In :math:`Z = (D + \lambda I)^{1/2} Y`, :math:`Q = \tfrac12
    \mathrm{tr}(Z^\top N Z W)`, :math:`N = I - (D + \lambda I)^{-1/2}\Gamma(D + \lambda I)^{-1/2}`; the eigenvalues of
    :math:`N` lie in :math:`[0, 2]` (Γ ≥ 0 entrywise, rows of :math:`(D+\lambda I)^{-1}\Gamma` sum to ≤ 1), and in
    :math:`[0, 1]` if :math:`\Gamma \succeq 0`. Step (a) is :math:`Z^+ = (I - \alpha N) Z` and multiplies each
    eigen-mode of :math:`N \otimes W` (eigenvalue :math:`\nu\mu`) by :math:`1 - \alpha\nu`; step (b) is
    :math:`Z^+ = Z - \alpha N Z W` and multiplies it by :math:`1 - \alpha\nu\mu`. :math:`Q` does not increase iff
    every factor lies in :math:`[-1, 1]`, and then :math:`E(Y^+) \le Q(Y^+) \le Q(Y^t) = E(Y^t)`. Hence

    * (a) ``"metric"``: :math:`\alpha \in (0, 2)` if ``kernel.psd_gram``, else :math:`\alpha \in (0, 1]`;
    * (b) ``"token"``: :math:`\alpha\lambda_{\max}(W) \in (0, 2)` if ``kernel.psd_gram``, else
      :math:`\alpha\lambda_{\max}(W) \in (0, 1]`.

    The ridge term and a key-padding mask keep these ranges (same proof). For orthogonal heads the energy separates
    over the heads' subspaces and each head keeps its range (:math:`\lambda_{\max}(W) = \max_h\lambda_{\max}(W_h)`).
    For general heads no range is guaranteed: the returned range is empty, ``(0, 0)``.

    Args:
        kernel: the energy's kernel.
        preconditioner: ``"metric"`` (step (a)) or ``"token"`` (step (b)).
        lambda_max_W: :math:`\lambda_{\max}(W)` (only used for ``"token"``).
        orthogonal_heads: ``False`` for multi-head energies whose heads are not mutually orthogonal.
    """
    preconditioner = check_preconditioner(preconditioner)
    if not isinstance(kernel, Kernel):
        raise EnergyInputError(
            f"`kernel` must be an energy.kernels.Kernel (e.g. GaussianKernel(), PowerKernel(p, eps), CauchyKernel()), "
            f"got {type(kernel).__name__}; pass the kernel object, not its name."
        )
    if isinstance(lambda_max_W, Tensor) and lambda_max_W.ndim == 0 and lambda_max_W.is_floating_point():
        lambda_max_W = float(lambda_max_W)
    lambda_max_W = check_real(lambda_max_W, "lambda_max_W", what="(the largest eigenvalue of the PSD metric W)")
    if not isinstance(orthogonal_heads, bool):
        raise EnergyInputError(f"`orthogonal_heads` must be a bool, got {type(orthogonal_heads).__name__}.")
    if not orthogonal_heads:
        return StepRange(
            0.0, 0.0,
            "MATH §1.2: the heads are not mutually orthogonal (M_hᵀ M_g ≠ 0), so the summed per-head step is not a "
            "preconditioned gradient step; no step size is guaranteed to descend (descent is measured, not assumed)",
        )
    psd = kernel.psd_gram
    if preconditioner is Preconditioner.METRIC:
        if psd:
            return StepRange(0.0, 2.0, f"MATH §1.1(a): Γ ⪰ 0 for the {kernel.name} kernel, so λ(N) ≤ 1")
        return StepRange(0.0, 1.0, "MATH §1.1(a): any concave non-decreasing ρ, λ(N) ≤ 2", high_inclusive=True)
    bound = 2.0 if psd else 1.0
    high = math.inf if lambda_max_W <= 0.0 else bound / lambda_max_W
    if psd:
        return StepRange(0.0, high, f"MATH §1.1(b): α·λ_max(W) < 2, Γ ⪰ 0 for the {kernel.name} kernel, "
                                    f"λ_max(W) = {lambda_max_W:.4g}")
    return StepRange(0.0, high, f"MATH §1.1(b): α·λ_max(W) ≤ 1 for any concave non-decreasing ρ, "
                                f"λ_max(W) = {lambda_max_W:.4g}", high_inclusive=True)
