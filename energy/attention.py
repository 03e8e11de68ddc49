r"""Self-attention as a descent step on a pairwise energy (MATH §1.1, §1.2).

The energy (tokens are rows, :math:`Y \in \mathbb{R}^{\dots\times n\times d}`, MATH §0):

.. math::
    E(Y) = \sum_{i<j} \rho(z_{ij}) + \tfrac{\lambda}{2}\|Y\|_W^2, \qquad
    z_{ij} = \tfrac12 \|y_i - y_j\|_W^2, \qquad W = \kappa\, M M^\top,

with :math:`\rho` concave and non-decreasing (:mod:`energy.kernels`), :math:`\gamma_{ij} = \rho'(z_{ij})`,
:math:`\Gamma = [\gamma_{ij}]` (including :math:`\gamma_{ii} = \rho'(0)`), :math:`D = \mathrm{diag}(\Gamma 1)`,
:math:`L = D - \Gamma`, and :math:`\nabla E = (L + \lambda I)\, Y W`.

**The 1/√d_k convention.** ``W = scale · M Mᵀ`` with ``scale`` defaulting to :math:`\kappa = 1/\sqrt{k}`,
``k = M.shape[-1]``. The *same* ``W`` enters the energy, the gradient, both steps and the standard layer the step
reproduces: with :math:`Q = K = Y M`, :math:`Y W Y^\top = Q K^\top / \sqrt{k}`, so the Gaussian metric step is
:math:`\mathrm{softmax}(Q K^\top/\sqrt{k} + \mathbf 1\beta^\top)\, Y` with :math:`\beta_j = -\tfrac12\|y_j\|_W^2
= -\tfrac{1}{2\sqrt k}\|k_j\|^2`. Pass ``scale=1.0`` to use :math:`W = M M^\top` unscaled.

**How the obstacles of MATH §1 (obstacle 1) are addressed.**

* *Softmax is not the gradient of a quadratic.* It is a *preconditioned* gradient step of the non-quadratic
  pairwise energy above with the Gaussian kernel :math:`\rho(z) = -e^{-z}`: the row normalisation :math:`D^{-1}`
  is the preconditioner, and the factors of :math:`\gamma_{ij}` that depend only on :math:`i` cancel in it, leaving
  the key bias :math:`\beta_j` (:func:`key_bias`). Step (a) ``preconditioner="metric"`` (preconditioner
  :math:`(D\otimes W)^{-1}`): :math:`Y^+ = (1-\alpha) Y + \alpha D^{-1}\Gamma Y`; step (b) ``"token"``
  (preconditioner :math:`D^{-1}\otimes I`): :math:`Y^+ = Y(I - \alpha W) + \alpha D^{-1}\Gamma Y W`.
* *Monotone descent* follows from majorisation–minimisation (ρ concave): see :func:`attention_step_range` for the
  guaranteed ranges and their proofs. Plain ``softmax(Y W Yᵀ) Y`` **without** β is not such a step and can increase
  the energy (regression-tested); it coincides with the β step when all tokens have equal W-norm.
* *Ridge* :math:`\lambda > 0`: the step normalises by :math:`\lambda + \sum_k \gamma_{ik}` (attention with a "null
  slot" of value 0). The plain ``softmax_β`` step is *not* provably monotone for the ridge energy.
* *Numerics.* :math:`z` is computed through the Gram matrix, :math:`z_{ij} = \tfrac12\|y_i\|_W^2 +
  \tfrac12\|y_j\|_W^2 - y_i^\top W y_j`, as one matrix product of augmented rows (never an :math:`n^2\times d`
  pair tensor). Rounding can make it slightly negative for nearly coincident tokens (and on the diagonal); it is
  clamped at 0 (``clamp_min(0)``; the exact value is :math:`\ge 0`).

**Multi-head (MATH §1.2, status "open" in MATH).** :class:`MultiHeadAttentionEnergy` uses
:math:`E = \sum_h E_h` with :math:`W_h = \kappa M_h M_h^\top`. Its step is the sum of per-head steps, each with
value/output map :math:`P_h` (the orthogonal projector onto the range of :math:`M_h`) for the metric step and
:math:`W_h` for the token step. *Orthogonal heads* (:math:`M_h^\top M_g = 0`, see
:meth:`~MultiHeadAttentionEnergy.heads_orthogonal`): the energy separates over the subspaces, the step is a
preconditioned gradient step and each head keeps the single-head guarantee. *General heads*: the summed step is
**not** one preconditioned gradient step; no step size is guaranteed, descent is only measured
(``tests/test_multihead_energy.py`` records the violation rate).

**Masks.** A symmetric pairwise energy gives symmetric weights :math:`\gamma_{ij} = \gamma_{ji}`, so
:math:`\Gamma` cannot be triangular: *causal attention is not a descent step of any energy of this form*
(a causal layer can only be run as a non-energy step; nothing here pretends otherwise). What can be provided
honestly is a *key-padding* mask ``token_mask`` (shape ``(..., n)``, ``True`` = real token): padded tokens are
removed from the energy (from the pair sum and the ridge term), so their gradient is zero, they are left unchanged
by every step, and the real tokens evolve exactly as for the unpadded sequence.

**Step and energy together.** The step needs :math:`z` and :math:`\Gamma` at ``Y``, and :math:`E(Y)` is the same
:math:`z` summed through ρ; ``step_and_energy`` returns both from one evaluation (for the Gaussian kernel,
:math:`\rho = -\rho'`, the energy is minus the off-diagonal sum of the step's own :math:`\Gamma`). The fused path
(:func:`~energy.fused.attention_step_fused_and_energy`) gets it from the attention kernel's row log-normalisers,
:math:`D_{ii} = e^{\beta_i + \mathrm{lse}_i}`, with no pairwise work. The unroller uses this to trace the energy at
the input of every attention step for free.

Layout: the formulas are the pure core :mod:`energy.core.attention` (one function per equation, no checks); this
module is the validated public layer — :func:`metric`, :func:`pairwise_sq_dist`, :func:`key_bias`,
:func:`softmax_beta`, :func:`head_bases` and the energies :class:`AttentionEnergy`,
:class:`MultiHeadAttentionEnergy`. The guaranteed ranges are :mod:`energy.step_range`
(:func:`attention_step_range`), the fused SDPA path :mod:`energy.fused` (:func:`attention_step_fused`); both are
re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from energy._attention_args import (
    check_kernel,
    check_M,
    check_preconditioner,
    check_ridge,
    check_token_mask,
    check_W,
    check_Y,
    heads_orthogonal,
    lambda_max,
)
from energy._validation import (
    ConstraintError,
    EnergyInputError,
    check_alpha_shape,
    check_psd,
    check_readable,
    check_scale,
    check_tensor,
    is_readable,
)
from energy.base import Energy, StepRange
from energy.core import attention as core
from energy.core.preconditioner import Preconditioner
from energy.fused import attention_step_fused, attention_step_fused_and_energy
from energy.kernels import Kernel
from energy.step_range import attention_step_range

__all__ = [
    "metric",
    "pairwise_sq_dist",
    "key_bias",
    "softmax_beta",
    "head_bases",
    "attention_step_range",
    "attention_step_fused",
    "attention_step_fused_and_energy",
    "AttentionEnergy",
    "MultiHeadAttentionEnergy",
]


# ----------------------------------------------------------------------------------------------------------------
# validated functional layer (the formulas: energy.core.attention)
# ----------------------------------------------------------------------------------------------------------------


def metric(M: Tensor, scale: float | Tensor | None = None) -> Tensor:
    r"""The metric :math:`W = \kappa\, M M^\top` (MATH §1.1), :math:`\kappa` = ``scale`` or :math:`1/\sqrt{k}`.

    Args:
        M: factor ``(..., d, k)`` (a stack of heads ``(h, d, k)`` gives one metric per head).
        scale: :math:`\kappa`; ``None`` means :math:`1/\sqrt{k}`, matching ``softmax(Q Kᵀ/√d_k)`` with
            :math:`Q = K = Y M`.

    Returns:
        ``W`` of shape ``(..., d, d)``, symmetric positive semi-definite by construction.
    """
    M = check_tensor(M, "M", min_ndim=2)
    return core.metric(M, core.kappa(check_scale(scale), M.shape[-1]))


def pairwise_sq_dist(Y: Tensor, W: Tensor) -> Tensor:
    r"""Half squared :math:`W`-distances :math:`z_{ij} = \tfrac12\|y_i - y_j\|_W^2` via the Gram matrix (MATH §1.1).

    .. math:: z_{ij} = \tfrac12 (G_{ii} + G_{jj}) - G_{ij}, \qquad G = Y W Y^\top .

    Tiny negative values from rounding are clamped to 0.

    Args:
        Y: tokens ``(..., n, d)``.
        W: symmetric PSD metric ``(d, d)`` (or broadcastable ``(..., d, d)``).

    Returns:
        ``z`` of shape ``(..., n, n)``.
    """
    Y = check_tensor(Y, "Y", min_ndim=2)
    return core.pairwise_sq_dist(Y, check_W(W, Y))


def key_bias(Y: Tensor, W: Tensor) -> Tensor:
    r"""Key bias :math:`\beta_j = -\tfrac12 \|y_j\|_W^2` of the energy-derived softmax (MATH §1.1).

    Returns:
        ``β`` of shape ``(..., n)``.
    """
    Y = check_tensor(Y, "Y", min_ndim=2)
    return core.key_bias(Y, check_W(W, Y))


def softmax_beta(Y: Tensor, W: Tensor) -> Tensor:
    r"""Energy-derived attention matrix :math:`\mathrm{softmax}_\beta(Y W Y^\top)` (MATH §1.1).

    .. math:: A_{ij} = \frac{\exp(y_i^\top W y_j + \beta_j)}{\sum_l \exp(y_i^\top W y_l + \beta_l)}
        = (D^{-1}\Gamma)_{ij}\ \text{for}\ \rho(z) = -e^{-z}.

    Returns:
        ``A`` of shape ``(..., n, n)``, rows summing to one.
    """
    Y = check_tensor(Y, "Y", min_ndim=2)
    return core.softmax_beta(Y, check_W(W, Y))


def head_bases(M: Tensor) -> Tensor:
    r"""Orthonormal bases :math:`U_h` of the ranges of the heads' factors, :math:`P_h = U_h U_h^\top` (MATH §1.2).

    Computed from the thin SVD of each :math:`M_h`; columns belonging to singular values below
    ``max(d, k) · eps · σ_max`` are set to zero, so :math:`U_h U_h^\top` is the exact projector onto
    :math:`\mathrm{range}(M_h)` also for rank-deficient heads.

    Args:
        M: ``(h, d, k)`` (or ``(d, k)``, treated as one head).

    Returns:
        ``U`` of shape ``(h, d, min(d, k))`` (or ``(d, min(d, k))``).
    """
    return core.head_bases(check_tensor(M, "M", min_ndim=2))


# ----------------------------------------------------------------------------------------------------------------
# the energies
# ----------------------------------------------------------------------------------------------------------------


class _PairwiseAttention(Energy):
    """Shared shell of the single- and multi-head energies: checks once, then the head-batched core."""

    M: Tensor

    def __init__(self, M: Tensor, *, ndim: int, kernel: Kernel | None, scale: float | Tensor | None,
                 ridge: float) -> None:
        super().__init__()
        M = check_M(M, ndim)
        self.kernel = check_kernel(kernel)
        kappa = core.kappa(check_scale(scale), M.shape[-1])
        self.scale = float(kappa)  # a construction-time constant (a tensor scale is read once, here)
        self.ridge = check_ridge(ridge)
        if isinstance(M, torch.nn.Parameter):
            self.M = M
        else:
            self.register_buffer("M", M)

    @property
    def single(self) -> bool:
        """Whether this is the single-head energy (its metric step has identity values)."""
        return self.M.ndim == 2

    def _M3(self) -> Tensor:
        """The ``(h, d, k)`` stack of factors (one head: ``(1, d, k)``)."""
        return self.M.unsqueeze(0) if self.single else self.M

    def _inputs(self, Y: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        Y = check_Y(Y, self.M)
        return Y, check_token_mask(token_mask, Y)

    @property
    def W(self) -> Tensor:
        r"""The metric :math:`W = \kappa M M^\top` (per head for multi-head energies)."""
        return core.metric(self.M, self.scale)

    def lambda_max_W(self) -> float:
        r""":math:`\lambda_{\max}(W) = \kappa\,\sigma_{\max}(M)^2` (for heads: :math:`\max_h\lambda_{\max}(W_h)`)."""
        return lambda_max(self.M, self.scale)

    def energy(self, Y: Tensor, token_mask: Tensor | None = None) -> Tensor:
        r"""Energy per batch element, shape ``Y.shape[:-2]`` (padded tokens excluded)."""
        Y, token_mask = self._inputs(Y, token_mask)
        M3 = self._M3()
        return core.batch_chunks(
            lambda Yc, mc: core.head_energy(Yc, M3, self.scale, self.kernel, self.ridge, mc).sum(-1),
            Y, token_mask, M3.shape[0])

    def grad(self, Y: Tensor, token_mask: Tensor | None = None) -> Tensor:
        r"""Closed-form gradient :math:`\nabla E = \sum_h (L_h + \lambda I) Y W_h` (MATH §1.1)."""
        Y, token_mask = self._inputs(Y, token_mask)
        M3 = self._M3()
        return core.batch_chunks(lambda Yc, mc: core.head_grad(Yc, M3, self.scale, self.kernel, self.ridge, mc),
                                 Y, token_mask, M3.shape[0])

    def autograd_grad(self, Y: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """Autograd twin of :meth:`grad` (reverse-mode AD of :meth:`energy` alone)."""
        return super().autograd_grad(Y, token_mask)

    def weights(self, Y: Tensor, token_mask: Tensor | None = None) -> Tensor:
        r""":math:`\Gamma = [\rho'(z_{ij})]` (per head ``(..., h, n, n)``; one head ``(..., n, n)``; pairs with a
        padded token are 0).
        """
        Y, token_mask = self._inputs(Y, token_mask)
        Gamma = core.head_gamma(core.head_keys(Y, self._M3()), self.scale, self.kernel, token_mask)[1]
        return Gamma.squeeze(-3) if self.single else Gamma

    def attention_matrix(self, Y: Tensor, token_mask: Tensor | None = None) -> Tensor:
        r""":math:`A = (D + \lambda I)^{-1}\Gamma` (per head for multi-head energies; = :math:`\mathrm{softmax}_\beta
        (YWY^\top)` for the Gaussian kernel, λ = 0).
        """
        Y, token_mask = self._inputs(Y, token_mask)
        A = core.head_mixing(Y, self._M3(), self.scale, self.kernel, self.ridge, token_mask)
        return A.squeeze(-3) if self.single else A

    def _orthogonal(self) -> bool:
        return True if self.single else heads_orthogonal(self.M)

    def step_range(self, preconditioner: Preconditioner | str = "metric") -> StepRange:
        """Guaranteed descent range of :meth:`step` (see :func:`attention_step_range`); for general
        (non-orthogonal) heads the empty range (``StepRange.empty``, printed "none", MATH §1.2).
        """
        preconditioner = check_preconditioner(preconditioner)
        check_readable(self.M, "M", "step_range() (it reads λ_max(W) and the heads' orthogonality)")
        lam = self.lambda_max_W() if preconditioner is Preconditioner.TOKEN else 0.0
        return attention_step_range(self.kernel, preconditioner, lambda_max_W=lam, orthogonal_heads=self._orthogonal())

    def _step_args(self, Y: Tensor, alpha: float | Tensor, preconditioner: Preconditioner | str,
                   token_mask: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
        """Validate once (inputs, preconditioner, step size) and resolve the step's value/output maps."""
        Y, token_mask = self._inputs(Y, token_mask)
        preconditioner = check_preconditioner(preconditioner)
        check_alpha_shape(alpha)
        if is_readable(self.M):  # the range needs the weights' values (unreadable under tracing transforms)
            self.step_range(preconditioner).check(alpha)
        M3 = self._M3()
        values, out = core.value_output_maps(M3, self.scale, preconditioner, single=self.single)
        return Y, token_mask, M3, values, out

    def step(self, Y: Tensor, alpha: float | Tensor = 1.0, *, preconditioner: Preconditioner | str = "metric",
             token_mask: Tensor | None = None) -> Tensor:
        r"""Preconditioned descent step :math:`Y^+ = Y - \alpha P^{-1}\nabla E` (MATH §1.1 (a)/(b), §1.2).

        One head: ``"metric"``: :math:`Y^+ = Y - \alpha (D+\lambda I)^{-1}\nabla E\, W^{-1} = (1-\alpha)Y + \alpha
        A Y`; ``"token"``: :math:`Y^+ = Y - \alpha (D+\lambda I)^{-1}\nabla E = Y - \alpha (Y - AY) W`, with
        :math:`A = (D+\lambda I)^{-1}\Gamma` (no inverse of :math:`W` is formed). Heads: the sum of per-head steps
        (see :class:`MultiHeadAttentionEnergy`). Warns (or raises in :func:`~energy.strict_mode`) if ``alpha`` is
        outside :meth:`step_range`. Padded tokens are unchanged. ``alpha`` may be a (learnable) tensor.
        """
        Y, token_mask, M3, values, out = self._step_args(Y, alpha, preconditioner, token_mask)
        return core.batch_chunks(
            lambda Yc, mc: core.head_step(Yc, M3, self.scale, self.kernel, self.ridge, mc, values, out, alpha),
            Y, token_mask, M3.shape[0])

    def step_and_energy(self, Y: Tensor, alpha: float | Tensor = 1.0, *,
                        preconditioner: Preconditioner | str = "metric",
                        token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""The step and the energy at its input, :math:`(Y^+, E(Y))`, from one evaluation of :math:`z` and
        :math:`\Gamma` at ``Y`` (MATH §1.1).

        Equals ``(self.step(Y, alpha, ...), self.energy(Y, token_mask))``; the step size is checked as in
        :meth:`step`. The unroller uses it to trace :math:`E` at the input of every attention step.
        """
        Y, token_mask, M3, values, out = self._step_args(Y, alpha, preconditioner, token_mask)
        return core.batch_chunks(
            lambda Yc, mc: core.head_step_and_energy(Yc, M3, self.scale, self.kernel, self.ridge, mc, values, out,
                                                     alpha),
            Y, token_mask, M3.shape[0])

    def _preconditioner_inputs(self, Y: Tensor, G: Tensor | None, preconditioner: Preconditioner | str,
                               token_mask: Tensor | None) -> tuple[Preconditioner, Tensor, Tensor]:
        r"""Validated ``(preconditioner, G, inv)`` with ``inv`` :math:`= I_m (D_h+\lambda I)^{-1}`,
        ``(..., h, n)``.
        """
        Y, token_mask = self._inputs(Y, token_mask)
        preconditioner = check_preconditioner(preconditioner)
        G = self.grad(Y, token_mask) if G is None else check_tensor(G, "G")
        if G.shape != Y.shape:
            raise EnergyInputError(f"`G` must have the shape of `Y` {tuple(Y.shape)}, got {tuple(G.shape)}.")
        _, Gamma = core.head_gamma(core.head_keys(Y, self._M3()), self.scale, self.kernel, token_mask)
        inv = 1.0 / core.denominator(Gamma, self.ridge, token_mask)
        if token_mask is not None:
            inv = inv * token_mask.to(inv.dtype).unsqueeze(-2)
        return preconditioner, G, inv

    def extra_repr(self) -> str:
        return f"M={tuple(self.M.shape)}, kernel={self.kernel!r}, scale={self.scale:.4g}, ridge={self.ridge:g}"


class AttentionEnergy(_PairwiseAttention):
    r"""Single-head pairwise attention energy (MATH §1.1).

    .. math::
        E(Y) = \sum_{i<j}\rho\big(\tfrac12\|y_i - y_j\|_W^2\big) + \tfrac\lambda2\|Y\|_W^2,\quad W = \kappa M M^\top,
        \quad \nabla E = (L + \lambda I)\, Y W .

    Steps (``step``): (a) ``preconditioner="metric"``, :math:`Y^+ = (1-\alpha)Y + \alpha(D+\lambda I)^{-1}\Gamma Y`
    (Gaussian, λ = 0: :math:`\mathrm{softmax}_\beta(YWY^\top) Y`, i.e. self-attention with :math:`Q = K = YM`,
    scale :math:`\kappa`, identity values, key bias β and residual weight :math:`1-\alpha`); (b) ``"token"``,
    :math:`Y^+ = Y(I - \alpha W) + \alpha (D+\lambda I)^{-1}\Gamma Y W`.

    Args:
        M: factor ``(d, k)`` of the metric (a plain tensor is stored as a buffer, an ``nn.Parameter`` as a parameter).
        kernel: concave non-decreasing ρ (default :class:`~energy.kernels.GaussianKernel`).
        scale: :math:`\kappa` (default :math:`1/\sqrt{k}`).
        ridge: λ ≥ 0.

    >>> import torch
    >>> E = AttentionEnergy(torch.eye(3, dtype=torch.float64))
    >>> Y = torch.randn(2, 5, 3, dtype=torch.float64)
    >>> bool((E.energy(E.step(Y, 1.0)) <= E.energy(Y)).all())
    True
    """

    def __init__(self, M: Tensor, *, kernel: Kernel | None = None, scale: float | Tensor | None = None,
                 ridge: float = 0.0) -> None:
        super().__init__(M, ndim=2, kernel=kernel, scale=scale, ridge=ridge)

    def preconditioned_grad(self, Y: Tensor, G: Tensor | None = None, *,
                            preconditioner: Preconditioner | str = "metric",
                            token_mask: Tensor | None = None) -> Tensor:
        r"""Apply the inverse preconditioner of :meth:`step` to a gradient ``G`` (default: :meth:`grad`).

        ``"metric"``: :math:`(D + \lambda I)^{-1} G W^{-1}` (the preconditioner :math:`((D+\lambda I)\otimes W)^{-1}`;
        needs :math:`W \succ 0`, i.e. ``M`` of full row rank, ``k ≥ d``); ``"token"``: :math:`(D+\lambda I)^{-1} G`.
        Rows of padded tokens are 0. ``Y - alpha * preconditioned_grad(Y, autograd_grad(Y))`` equals :meth:`step`.
        """
        preconditioner, G, inv = self._preconditioner_inputs(Y, G, preconditioner, token_mask)
        P = inv.squeeze(-2).unsqueeze(-1) * G
        if preconditioner is Preconditioner.TOKEN:
            return P
        W = check_psd(self.W, "W", strict_pd=True)
        return torch.linalg.solve(W, P.transpose(-1, -2)).transpose(-1, -2)  # P W⁻¹ (W symmetric)


class MultiHeadAttentionEnergy(_PairwiseAttention):
    r"""Multi-head attention energy :math:`E = \sum_h E_h`, :math:`W_h = \kappa M_h M_h^\top` (MATH §1.2).

    Step (sum of per-head steps, :math:`A_h = (D_h + \lambda I)^{-1}\Gamma_h`):

    * ``"metric"``: :math:`Y^+ = Y - \alpha\sum_h (Y - A_h Y) P_h`, :math:`P_h` = orthogonal projector onto
      :math:`\mathrm{range}(M_h)` (per-head value/output map :math:`P_h`);
    * ``"token"``: :math:`Y^+ = Y - \alpha\sum_h (Y - A_h Y) W_h`.

    **Guarantee only for orthogonal heads** (:meth:`heads_orthogonal`, :math:`M_h^\top M_g = 0`): then
    :math:`E(Y) = \sum_h E_h(Y P_h)`, the step acts independently in each subspace and equals the preconditioned
    gradient step :math:`Y - \alpha\sum_h (D_h+\lambda I)^{-1}\nabla E\, W_h^{+}` (resp. :math:`\ldots\nabla E\,P_h`),
    so every head keeps the single-head range. Components of ``Y`` outside all ranges are left unchanged (the
    energy does not depend on them). **General heads:** the summed step is not a single preconditioned gradient step
    and no step size is guaranteed; :meth:`step` warns (raises in strict mode), descent is measured in the tests.

    Args:
        M: ``(h, d, k)`` stack of per-head factors.
        kernel, scale, ridge: as for :class:`AttentionEnergy` (``scale`` defaults to :math:`1/\sqrt{k}`).
    """

    def __init__(self, M: Tensor, *, kernel: Kernel | None = None, scale: float | Tensor | None = None,
                 ridge: float = 0.0) -> None:
        super().__init__(M, ndim=3, kernel=kernel, scale=scale, ridge=ridge)

    @property
    def num_heads(self) -> int:
        return self.M.shape[0]

    def heads_orthogonal(self, atol: float | None = None) -> bool:
        r"""Whether :math:`\max_{h\ne g}|M_h^\top M_g| \le` ``atol`` (default ``1e3·eps·max_h‖M_h‖_F²``)."""
        return heads_orthogonal(self.M, atol)

    def projectors(self) -> Tensor:
        r""":math:`P_h = U_h U_h^\top`, shape ``(h, d, d)`` (see :func:`head_bases`)."""
        U = head_bases(self.M)
        return U @ U.transpose(-1, -2)

    def preconditioned_grad(self, Y: Tensor, G: Tensor | None = None, *,
                            preconditioner: Preconditioner | str = "metric",
                            token_mask: Tensor | None = None) -> Tensor:
        r"""Orthogonal heads only: :math:`\sum_h (D_h+\lambda I)^{-1} G\, W_h^{+}` (``"metric"``) or
        :math:`\sum_h (D_h+\lambda I)^{-1} G\, P_h` (``"token"``), so that ``Y - α·preconditioned_grad(Y, ∇E)``
        equals :meth:`step`. Raises :class:`~energy.ConstraintError` for general heads, whose step is not a
        preconditioned gradient step.
        """
        if not self.heads_orthogonal():
            raise ConstraintError(
                "the heads are not mutually orthogonal (M_hᵀ M_g ≠ 0 for some h ≠ g), so the summed per-head step "
                "is not a preconditioned gradient step (MATH §1.2); use orthogonal heads, e.g. M_h built from "
                "disjoint blocks of an orthogonal matrix."
            )
        preconditioner, G, inv = self._preconditioner_inputs(Y, G, preconditioner, token_mask)
        metric_step = preconditioner is Preconditioner.METRIC
        right = torch.linalg.pinv(self.W, hermitian=True) if metric_step else self.projectors()
        return ((inv.unsqueeze(-1) * G.unsqueeze(-3)) @ right).sum(-3)
