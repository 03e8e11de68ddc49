r"""Alternating gradient descent on two quadratic energies: the mathematics of Yang et al. (2022) figures 2 and 3.

``e1`` acts on the features (right multiplication), ``e2`` mixes the tokens (left multiplication); a Transformer
layer alternates such steps, each a descent step on its own term (MATH §1.6, §1.8). Besides the paper's protocol
(:func:`alternating_descent`, the reference :func:`gradient_descent_on_sum`) this module gives the exact minimiser
of the sum and the exact 2-cycle that alternating steps with a fixed step size converge to. The figures are
registered in :mod:`paper_figs.yang2022_synthetic`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ALT_LR",
    "REF_LR",
    "AlternatingProblem",
    "alternating_descent",
    "alternating_fixed_point",
    "e1",
    "e2",
    "exact_minimiser",
    "grad_e1",
    "grad_e2",
    "gradient_descent_on_sum",
    "make_alternating_problem",
    "pca2",
    "total_energy",
]

DTYPE = torch.float64

ALT_LR = 0.05  # step size of the alternating steps (MATH §1.8)
REF_LR = 0.01  # step size of the reference gradient descent on the sum


@dataclasses.dataclass(frozen=True)
class AlternatingProblem:
    """The two energies of MATH §1.8, Figs 2-3: ``e1`` acts on features (right), ``e2`` mixes tokens (left)."""

    W1: Tensor  # (d, d)
    W2: Tensor  # (n, n)
    B1: Tensor  # (n, d)
    B2: Tensor  # (n, d)
    Y0: Tensor  # (n, d)


def make_alternating_problem(n: int, d: int, generator: torch.Generator) -> AlternatingProblem:
    """``W1 = 0.1·randn(d, d)``, ``W2 = 0.1·randn(n, n)``, ``B1, B2 ~ U(0,1)^{n×d}``, ``Y⁰ = 2·U(0,1)^{n×d}``.

    Drawn in this order from ``generator``, float64 (MATH §1.8).
    """
    W1 = 0.1 * torch.randn(d, d, generator=generator, dtype=DTYPE)
    W2 = 0.1 * torch.randn(n, n, generator=generator, dtype=DTYPE)
    B1 = torch.rand(n, d, generator=generator, dtype=DTYPE)
    B2 = torch.rand(n, d, generator=generator, dtype=DTYPE)
    Y0 = 2 * torch.rand(n, d, generator=generator, dtype=DTYPE)
    return AlternatingProblem(W1=W1, W2=W2, B1=B1, B2=B2, Y0=Y0)


def e1(Y: Tensor, W1: Tensor, B1: Tensor) -> Tensor:
    r"""The feature energy (acts on ``Y`` from the right; MATH §1.8).

    .. math:: e_1(Y) = \|Y W_1\|_F^2 + \|Y - B_1\|_F^2
    """
    return (Y @ W1).square().sum() + (Y - B1).square().sum()


def grad_e1(Y: Tensor, W1: Tensor, B1: Tensor) -> Tensor:
    r"""Gradient of :func:`e1`.

    .. math:: \nabla e_1(Y) = 2\, Y W_1 W_1^\top + 2 (Y - B_1)
    """
    return 2 * (Y @ W1) @ W1.T + 2 * (Y - B1)


def e2(Y: Tensor, W2: Tensor, B2: Tensor) -> Tensor:
    r"""The token-mixing energy (``W_2`` acts on ``Y`` from the left; MATH §1.8).

    .. math:: e_2(Y) = \|W_2 Y\|_F^2 + \|Y - B_2\|_F^2
    """
    return (W2 @ Y).square().sum() + (Y - B2).square().sum()


def grad_e2(Y: Tensor, W2: Tensor, B2: Tensor) -> Tensor:
    r"""Gradient of :func:`e2`.

    .. math:: \nabla e_2(Y) = 2\, W_2^\top W_2 Y + 2 (Y - B_2)
    """
    return 2 * W2.T @ (W2 @ Y) + 2 * (Y - B2)


def total_energy(Y: Tensor, p: AlternatingProblem) -> Tensor:
    """The total energy of the problem ``p``.

    .. math:: E(Y) = e_1(Y) + e_2(Y)
    """
    return e1(Y, p.W1, p.B1) + e2(Y, p.W2, p.B2)


def exact_minimiser(p: AlternatingProblem) -> Tensor:
    r"""The minimiser ``Y*`` of ``E = e1 + e2`` in closed form (not part of the paper's protocol; a check of it).

    ``∇E = 0`` is the Sylvester equation ``(P + I) Y + Y (Q + I) = B_1 + B_2`` with ``P = W_2ᵀW_2``,
    ``Q = W_1 W_1ᵀ``. With ``P = U diag(λ) Uᵀ`` and ``Q = V diag(μ) Vᵀ``:

    .. math:: Y^* = U \left[ \frac{(U^\top (B_1 + B_2) V)_{ij}}{\lambda_i + \mu_j + 2} \right] V^\top
    """
    lam, U = torch.linalg.eigh(p.W2.T @ p.W2)
    mu, V = torch.linalg.eigh(p.W1 @ p.W1.T)
    rhs = U.T @ (p.B1 + p.B2) @ V
    return U @ (rhs / (lam[:, None] + mu[None, :] + 2)) @ V.T


def alternating_descent(
    p: AlternatingProblem, steps: int, lr: float, progress: Callable[..., Iterable[int]] | None = None
) -> dict[str, Tensor]:
    r"""Plain gradient steps, even steps on ``e1``, odd steps on ``e2``; record every iterate and energy.

    .. math:: Y^{t+1} = Y^t - \eta\, \nabla e_{1 + (t \bmod 2)}(Y^t)

    Args:
        p: the problem (energies and start ``Y⁰``).
        steps: number of steps (``e1`` and ``e2`` steps together).
        lr: the step size ``η``.
        progress: optional wrapper ``progress(iterable, desc)`` for a progress bar (e.g. :func:`registry.progress`).

    Returns:
        ``iterates`` (steps, n, d) = ``Y¹ … Y^steps``; ``E``, ``e1``, ``e2`` (steps,) after every step.
    """
    Y = p.Y0.clone()
    iterates = torch.empty((steps, *Y.shape), dtype=Y.dtype)
    E1, E2 = torch.empty(steps, dtype=Y.dtype), torch.empty(steps, dtype=Y.dtype)
    loop = range(steps) if progress is None else progress(range(steps), "alternating descent")
    for t in loop:
        Y = Y - lr * (grad_e1(Y, p.W1, p.B1) if t % 2 == 0 else grad_e2(Y, p.W2, p.B2))
        iterates[t] = Y
        E1[t], E2[t] = e1(Y, p.W1, p.B1), e2(Y, p.W2, p.B2)
    return {"iterates": iterates, "E": E1 + E2, "e1": E1, "e2": E2}


def gradient_descent_on_sum(p: AlternatingProblem, steps: int, lr: float) -> Tensor:
    """The paper's reference ``Y_h*``: ``steps`` gradient steps on ``E = e1 + e2`` from ``Y⁰``."""
    Y = p.Y0.clone()
    for _ in range(steps):
        Y = Y - lr * (grad_e1(Y, p.W1, p.B1) + grad_e2(Y, p.W2, p.B2))
    return Y


def alternating_fixed_point(p: AlternatingProblem, lr: float) -> dict[str, Any]:
    r"""Where alternating descent with a fixed step goes: the fixed point of one ``e1``-then-``e2`` pair of steps.

    The steps are affine: ``T_1(Y) = Y R_1 + 2ηB_1`` with ``R_1 = (1-2η)I - 2ηQ`` and
    ``T_2(Z) = L_2 Z + 2ηB_2`` with ``L_2 = (1-2η)I - 2ηP`` (``Q = W_1W_1ᵀ``, ``P = W_2ᵀW_2``). The pair map
    ``Φ = T_2∘T_1`` has the fixed point

    .. math:: Y_\Phi - L_2 Y_\Phi R_1 = 2\eta (L_2 B_1 + B_2), \quad
              (Y_\Phi)~ = \frac{(\cdot)~_{ij}}{1 - l_i r_j} \text{ in the eigenbases of } P, Q,

    and iterates approach it at the linear rate ``ρ = max_ij |l_i r_j|`` per pair (if ``ρ < 1``); after odd steps
    the trajectory tends to ``Y_Φ``, after even steps to ``T_1(Y_Φ)``. (Analysis added by this project.)

    Returns:
        ``rho``, ``Y_odd`` (= Y_Φ), ``Y_even`` (= T_1(Y_Φ)), and the step-size ratios ``lr·L_k`` (``L_k`` the
        Lipschitz constant of ``∇e_k``; a single step on ``e_k`` is a guaranteed descent step iff ``lr·L_k < 2``).
    """
    lam, U = torch.linalg.eigh(p.W2.T @ p.W2)
    mu, V = torch.linalg.eigh(p.W1 @ p.W1.T)
    l = 1 - 2 * lr - 2 * lr * lam
    r = 1 - 2 * lr - 2 * lr * mu
    L2 = U @ torch.diag(l) @ U.T
    rhs = U.T @ (2 * lr * (L2 @ p.B1 + p.B2)) @ V
    denom = 1 - l[:, None] * r[None, :]
    Y_odd = U @ (rhs / denom) @ V.T
    Y_even = Y_odd - lr * grad_e1(Y_odd, p.W1, p.B1)
    return {
        "rho": float((l[:, None] * r[None, :]).abs().max()),
        "Y_odd": Y_odd,
        "Y_even": Y_even,
        "lr_L1": float(lr * 2 * (mu.max() + 1)),
        "lr_L2": float(lr * 2 * (lam.max() + 1)),
    }


def pca2(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Principal components of the rows of ``X`` (T, D): ``(mean, components (2, D), explained variance ratio)``.

    Computed from the T×T Gram matrix of the centred rows (T ≪ D here): with ``X_c X_cᵀ = U Λ Uᵀ`` the
    components are ``X_cᵀ u_k / sqrt(λ_k)``. Signs are fixed so that each component's largest-magnitude entry is
    positive (eigenvector signs are arbitrary).
    """
    mean = X.mean(0)
    Xc = X - mean
    lam, U = torch.linalg.eigh(Xc @ Xc.T)  # ascending
    top = lam.flip(0)[:2]
    comps = (Xc.T @ U.flip(1)[:, :2] / top.clamp_min(torch.finfo(X.dtype).tiny).sqrt()).T
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    return mean, comps * sign, top / lam.clamp_min(0).sum()

