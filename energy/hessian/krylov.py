r"""Krylov estimators for symmetric matrices known only through products: Lanczos and SLQ (MATH §3.7).

The operator access (:func:`~energy.hessian.estimators.as_matmat`), the symmetry check and the probes
(:func:`~energy.hessian.estimators.draw_probes`) are those of :mod:`energy.hessian.estimators`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from energy._validation import EnergyInputError
from energy.hessian.estimators import (
    _device_of,
    _gen,
    _square,
    as_matmat,
    check_symmetric_operator,
    draw_probes,
)

__all__ = ["LanczosResult", "SpectralDensity", "lanczos", "slq_density"]


class LanczosResult(NamedTuple):
    """Ritz pairs from :func:`lanczos`: ``A x_i ≈ λ_i x_i`` with ``‖A x_i − λ_i x_i‖ = residuals[i]``."""

    eigenvalues: Tensor  # (k,), float64
    eigenvectors: Tensor  # (n, k), float64
    residuals: Tensor  # (k,)
    num_iter: int
    converged: bool


class SpectralDensity(NamedTuple):
    r"""Stochastic Lanczos quadrature: nodes ``θ`` and weights ``τ`` (per probe) and a smoothed density.

    ``Σ τ f(θ)`` (all probes, weights already divided by the number of probes) estimates
    :math:`\frac1n \operatorname{tr} f(A)`; ``density`` is :math:`\sum \tau\, \mathcal N(t;\theta, s^2)` on ``grid``.
    """

    nodes: Tensor  # (num_probes, num_steps)
    weights: Tensor  # (num_probes, num_steps); padded nodes have weight 0
    grid: Tensor
    density: Tensor
    kernel_width: float

    def quadrature(self, f: Callable[[Tensor], Tensor]) -> float:
        """``Σ τ f(θ)`` ≈ ``tr f(A) / n``."""
        return float((self.weights * f(self.nodes)).sum())


# --------------------------------------------------------------------------------------------------------------
# Lanczos
# --------------------------------------------------------------------------------------------------------------


def _lanczos_basis(
    mm: Callable[[Tensor], Tensor],
    n: int,
    dtype: torch.dtype,
    q0: Tensor,
    num_steps: int,
    generator: torch.Generator,
    *,
    restart_on_breakdown: bool,
    stop: Callable[[Tensor, Tensor, float, int], bool] | None = None,
) -> tuple[Tensor, Tensor, Tensor, float]:
    r"""``num_steps`` Lanczos steps with full (twice-applied Gram–Schmidt) reorthogonalisation, in float64.

    Builds ``A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ`` with ``T_m`` tridiagonal (``α`` on, ``β`` off the diagonal).
    On breakdown (``β ≈ 0``, an invariant subspace is found) either stop or continue with a fresh random vector
    orthogonal to ``Q`` (``T`` then decouples; this is what makes ``num_steps = n`` exact).

    Returns:
        ``Q (n, m)``, ``alpha (m,)``, ``beta (m,)`` (``beta[j]`` couples ``q_j`` and ``q_{j+1}``), and the last ``β``.
    """
    device = q0.device  # the basis lives on the start vector's device (the operator's, see the callers)
    Q = torch.zeros(n, num_steps, dtype=torch.float64, device=device)
    alpha = torch.zeros(num_steps, dtype=torch.float64, device=device)
    beta = torch.zeros(num_steps, dtype=torch.float64, device=device)
    q = q0 / q0.norm()
    scale = 0.0
    m = 0
    last_beta = 0.0
    for j in range(num_steps):
        Q[:, j] = q
        w = mm(q.to(dtype)[:, None])[:, 0].to(device, torch.float64)
        alpha[j] = q @ w
        for _ in range(2):
            w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        b = float(w.norm())
        scale = max(scale, abs(float(alpha[j])), b)
        m = j + 1
        last_beta = b
        if stop is not None and stop(alpha[:m], beta[: m - 1], b, m):
            break
        if j + 1 == num_steps:
            break
        if b <= 1e-12 * max(scale, 1e-300):
            if not restart_on_breakdown:
                last_beta = 0.0
                break
            r = torch.randn(n, generator=generator, dtype=torch.float64).to(device)  # CPU draw: same on every device
            for _ in range(2):
                r = r - Q[:, : j + 1] @ (Q[:, : j + 1].T @ r)
            q, beta[j] = r / r.norm(), 0.0
        else:
            q, beta[j] = w / b, b
    return Q[:, :m], alpha[:m], beta[: max(m - 1, 0)], last_beta


def _tridiag(alpha: Tensor, beta: Tensor) -> Tensor:
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)[:k]
    if which == "SA":
        return torch.argsort(theta)[:k]
    return torch.argsort(theta.abs(), descending=True)[:k]


def lanczos(
    A: Any,
    k: int,
    *,
    which: Literal["LA", "SA", "LM"] = "LA",
    max_iter: int | None = None,
    tol: float = 1e-8,
    generator: torch.Generator | None = None,
    v0: Tensor | None = None,
    dim: int | None = None,
) -> LanczosResult:
    r"""``k`` extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Builds the Krylov basis ``Q_m`` of ``span{v0, A v0, …}`` and the tridiagonal ``T_m = Q_mᵀ A Q_m``; the Ritz
    pairs ``(θ_i, Q_m s_i)`` of ``T_m`` approximate eigenpairs, with residual ``‖A x_i − θ_i x_i‖ = β_m |s_{m,i}|``.
    Iterates until the ``k`` selected residuals are below ``tol · max|θ|`` or ``max_iter`` steps (default
    ``min(n, max(3k + 50, 100))``); with ``m = n`` the result is exact. Not converging emits a warning.

    Args:
        A: symmetric operator (see module docstring). Symmetry is checked at the start: entrywise for a dense
            tensor, by one randomized probe for other operators (:func:`check_symmetric_operator`).
        k: number of eigenpairs, ``1 ≤ k ≤ n``.
        which: ``"LA"`` largest algebraic (top-k, returned descending), ``"SA"`` smallest algebraic (bottom-k,
            ascending), ``"LM"`` largest magnitude (descending ``|λ|``).
        max_iter: maximal Krylov dimension.
        tol: relative residual tolerance.
        generator: a CPU generator for the start vector (and restarts after breakdown); the draws are moved to
            the operator's device, where the basis and the results live (the CPU for callables and scipy operators).
        v0: start vector (default: normal random).
        dim: dimension if ``A`` is a callable.
    """
    mm, shape, dtype = as_matmat(A, dim)
    n = _square(shape, "lanczos")
    check_symmetric_operator(A, mm, n, dtype, "lanczos")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise EnergyInputError(f"`k` must be a positive int, got {k!r}.")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise EnergyInputError(f"`tol` must be a finite number ≥ 0 (the relative residual tolerance; 0 runs every "
                               f"iteration), got {tol!r}.")
    if k > n:
        raise EnergyInputError(f"`k`={k} eigenpairs requested from an operator of dimension n={n}; use k ≤ n.")
    if which not in ("LA", "SA", "LM"):
        raise EnergyInputError(f"`which` must be 'LA' (top), 'SA' (bottom) or 'LM', got {which!r}.")
    m_max = min(n, max(3 * k + 50, 100)) if max_iter is None else int(max_iter)
    if m_max < k or m_max > n:
        raise EnergyInputError(f"`max_iter`={max_iter} must lie in [k, n] = [{k}, {n}].")
    g = _gen(generator)
    device = _device_of(A)  # None (CPU) for callables and scipy operators
    if v0 is None:
        q0 = torch.randn(n, generator=g, dtype=torch.float64).to(device)  # CPU draw: same on every device
    else:
        if not isinstance(v0, Tensor) or v0.shape != (n,):
            raise EnergyInputError(f"`v0` must be a tensor of shape ({n},), got {getattr(v0, 'shape', v0)!r}.")
        q0 = v0.to(device, torch.float64)

    def converged(alpha: Tensor, beta: Tensor, b: float, m: int) -> bool:
        if m < k or (m % 5 and m < m_max):
            return False
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        idx = _select(theta, k, which)
        res = b * S[-1, idx].abs()
        return bool((res <= tol * max(float(theta.abs().max()), 1e-300)).all())

    Q, alpha, beta, b = _lanczos_basis(mm, n, dtype, q0, m_max, g, restart_on_breakdown=True, stop=converged)
    theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
    idx = _select(theta, k, which)
    res = b * S[-1, idx].abs() if Q.shape[1] < n else torch.zeros(k, dtype=torch.float64, device=theta.device)
    ok = bool((res <= tol * max(float(theta.abs().max()), 1e-300)).all())
    if not ok:
        warnings.warn(
            f"lanczos: {k} Ritz pairs not converged after {Q.shape[1]} steps (max residual {float(res.max()):.2e}); "
            "raise `max_iter` or relax `tol`.",
            RuntimeWarning,
            stacklevel=2,
        )
    return LanczosResult(theta[idx], Q @ S[:, idx], res, Q.shape[1], ok)


# --------------------------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature
# --------------------------------------------------------------------------------------------------------------


def slq_density(
    A: Any,
    num_probes: int = 10,
    num_steps: int = 30,
    *,
    generator: torch.Generator | None = None,
    grid: Tensor | None = None,
    num_grid: int = 512,
    kernel_width: float | None = None,
    dim: int | None = None,
) -> SpectralDensity:
    r"""Spectral density by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; Ghorbani et al. 2019).

    For each probe ``v = z/‖z‖`` (Rademacher ``z``), ``m = num_steps`` Lanczos steps give ``T_m = S Θ Sᵀ``; the
    Gauss quadrature nodes are ``θ_i`` with weights ``τ_i = S_{1i}²`` and :math:`v^\top f(A) v \approx \sum_i \tau_i
    f(\theta_i)` (exact for polynomials of degree ``< 2m``). Averaging over probes,

    .. math::
        \frac1n \operatorname{tr} f(A) \approx \frac{1}{P}\sum_{p=1}^{P} \sum_{i} \tau^{(p)}_i f(\theta^{(p)}_i),
        \qquad \phi(t) = \frac1P \sum_{p,i} \tau^{(p)}_i\, \mathcal N(t; \theta^{(p)}_i, s^2).

    A probe whose Krylov space is invariant before ``m`` steps stops early (its quadrature is then exact); the
    missing nodes are padded with weight 0.

    Args:
        A: symmetric operator (see module docstring).
        num_probes: ``P``, the number of random probes.
        num_steps: ``m ≤ n``, Lanczos steps per probe.
        generator: a CPU generator, the source of the probes (moved to the operator's device, where the nodes,
            weights, grid and density live).
        grid: evaluation points of the density (default ``num_grid`` points over the node range ± 3 s).
        num_grid: number of points of the default ``grid`` (ignored when ``grid`` is given).
        kernel_width: Gaussian width ``s`` (default 1% of the node range, at least 1e-12).
        dim: dimension if ``A`` is a callable.
    """
    mm, shape, dtype = as_matmat(A, dim)
    n = _square(shape, "slq_density")
    check_symmetric_operator(A, mm, n, dtype, "slq_density")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise EnergyInputError(f"`num_probes` must be a positive int, got {num_probes!r}.")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise EnergyInputError(f"`num_steps` must be a positive int, got {num_steps!r}.")
    if num_steps > n:
        raise EnergyInputError(
            f"`num_steps`={num_steps} exceeds the dimension n={n}; use num_steps ≤ n (n steps are already exact)."
        )
    g = _gen(generator)
    device = _device_of(A)  # None (CPU) for callables and scipy operators
    nodes = torch.zeros(num_probes, num_steps, dtype=torch.float64, device=device)
    weights = torch.zeros(num_probes, num_steps, dtype=torch.float64, device=device)
    for p in range(num_probes):
        z = draw_probes(n, 1, generator=g, device=device)[:, 0]  # float64, on the operator's device
        _, alpha, beta, _ = _lanczos_basis(mm, n, dtype, z, num_steps, g, restart_on_breakdown=False)
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        m = theta.shape[0]
        nodes[p, :m] = theta
        nodes[p, m:] = theta[-1]
        weights[p, :m] = S[0] ** 2 / num_probes
    lo, hi = float(nodes.min()), float(nodes.max())
    s = kernel_width if kernel_width is not None else max(0.01 * (hi - lo), 1e-12)
    if s <= 0:
        raise EnergyInputError(f"`kernel_width` must be positive, got {kernel_width!r}.")
    if grid is None:
        grid = torch.linspace(lo - 3 * s, hi + 3 * s, num_grid, dtype=torch.float64, device=nodes.device)
    else:
        grid = torch.as_tensor(grid, dtype=torch.float64, device=nodes.device)
    diff = (grid[:, None] - nodes.reshape(1, -1)) / s
    density = (torch.exp(-0.5 * diff**2) / (s * math.sqrt(2 * math.pi)) * weights.reshape(1, -1)).sum(dim=1)
    return SpectralDensity(nodes, weights, grid, density, s)
