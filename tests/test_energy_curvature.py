"""Token-space energy Hessians (MATH §4.1, §1.3) and the majoriser step-size bounds (MATH §1.1) vs brute force."""

from __future__ import annotations

import pytest
import torch
from _helpers import DT

from energy._validation import EnergyInputError
from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy
from energy.ffn import FFNEnergy
from energy.hessian.energy_curvature import (
    attention_energy_hessian,
    autograd_energy_hessian,
    ffn_energy_hessian,
    majoriser_matrix,
    majoriser_step,
    majoriser_step_bound,
    majoriser_value,
    preconditioned_curvature,
)
from energy.kernels import CauchyKernel, GaussianKernel, PowerKernel

KERNELS = [GaussianKernel(), PowerKernel(1.0, 0.1), CauchyKernel()]


def _close(A, B, tol=1e-10):
    assert float((A - B).abs().max()) <= tol * max(1.0, float(B.abs().max()))


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: type(k).__name__)
@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_attention_energy_hessian_matches_autograd(gen, kernel, ridge):
    n, d, k = 5, 3, 4
    Y = torch.randn(n, d, generator=gen, dtype=DT)
    E = AttentionEnergy(torch.randn(d, k, generator=gen, dtype=DT), kernel=kernel, ridge=ridge)
    _close(attention_energy_hessian(E, Y), autograd_energy_hessian(E, Y))


def test_multihead_and_batch(gen):
    n, d, k = 4, 3, 2
    E = MultiHeadAttentionEnergy(torch.randn(3, d, k, generator=gen, dtype=DT), kernel=CauchyKernel())
    Y = torch.randn(2, n, d, generator=gen, dtype=DT)
    H = attention_energy_hessian(E, Y)
    assert H.shape == (2, n * d, n * d)
    for b in range(2):
        _close(H[b], autograd_energy_hessian(E, Y[b]))


def test_gaussian_hessian_is_majoriser_curvature_minus_psd(gen):
    """MATH §4.1: for ρ = −e^{−z}, ∇²E = L ⊗ W − (PSD)."""
    n, d = 6, 3
    Y = torch.randn(n, d, generator=gen, dtype=DT)
    E = AttentionEnergy(torch.randn(d, d, generator=gen, dtype=DT))
    Gamma = E.weights(Y)
    L = torch.diag(Gamma.sum(-1)) - Gamma
    gap = torch.linalg.eigvalsh(torch.kron(L, E.W) - attention_energy_hessian(E, Y))
    assert float(gap[0]) >= -1e-12
    assert float(gap[-1]) > 1e-6  # the correction is not zero


def test_ffn_energy_hessian(gen):
    n, d = 4, 3
    A = torch.randn(d, d, generator=gen, dtype=DT)
    F = FFNEnergy(0.2 * (A + A.T), torch.randn(d, generator=gen, dtype=DT), allow_unbounded=True)
    Y = torch.randn(n, d, generator=gen, dtype=DT)
    _close(ffn_energy_hessian(F, n), autograd_energy_hessian(F, Y))


def _brute_force_bound(E, Y_t, preconditioner):
    """2 / λ_max(P^{-1/2} ∇²Q P^{-1/2}) with ∇²Q from torch.func.hessian of the majoriser value."""
    n, d = Y_t.shape
    H_Q = torch.func.hessian(lambda y: majoriser_value(E, Y_t, y.reshape(n, d)))(Y_t.reshape(-1))
    deg = E.weights(Y_t).sum(-1) + E.ridge
    lam, V = torch.linalg.eigh(E.W)
    W_isqrt = (V * lam.rsqrt()) @ V.T if preconditioner == "metric" else torch.eye(d, dtype=DT)
    P = torch.kron(torch.diag(deg.rsqrt()), W_isqrt)
    return 2.0 / float(torch.linalg.eigvalsh(P @ H_Q @ P)[-1])


@pytest.mark.parametrize("preconditioner", ["metric", "token"])
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: type(k).__name__)
def test_majoriser_bound_is_exact(gen, preconditioner, kernel):
    n, d = 5, 3
    Y_t = torch.randn(n, d, generator=gen, dtype=DT)
    E = AttentionEnergy(torch.randn(d, d + 1, generator=gen, dtype=DT), kernel=kernel, ridge=0.1)
    bound = majoriser_step_bound(E, Y_t, preconditioner)
    assert bound == pytest.approx(_brute_force_bound(E, Y_t, preconditioner), rel=1e-10)
    assert bound == pytest.approx(2.0 / preconditioned_curvature(E, Y_t, preconditioner)["majoriser"], rel=1e-10)

    # worst-case start Z = v wᵀ (top eigenvectors of N and W), Y' = D̃^{-1/2} Z: Q unchanged at the bound,
    # decreasing just below it, increasing just above it
    deg = E.weights(Y_t).sum(-1) + E.ridge
    v = torch.linalg.eigh(majoriser_matrix(E, Y_t))[1][:, -1]
    w = torch.linalg.eigh(E.W)[1][:, -1]
    Y_worst = torch.outer(v, w) / deg.sqrt().unsqueeze(-1)
    Q0 = float(majoriser_value(E, Y_t, Y_worst))

    def dQ(alpha):
        return float(majoriser_value(E, Y_t, majoriser_step(E, Y_t, Y_worst, alpha, preconditioner))) - Q0

    assert abs(dQ(bound)) <= 1e-9 * Q0
    assert dQ(bound * (1 - 1e-3)) < 0 < dQ(bound * (1 + 1e-3))

    # random starts never increase Q for α ≤ bound
    for _ in range(5):
        Y0 = torch.randn(n, d, generator=gen, dtype=DT)
        q0 = float(majoriser_value(E, Y_t, Y0))
        for frac in (0.3, 0.9, 1.0):
            step = majoriser_step(E, Y_t, Y0, frac * bound, preconditioner)
            assert float(majoriser_value(E, Y_t, step)) <= q0 + 1e-12 * abs(q0)

    # at Y' = Y_t the frozen step is the energy's own step, and the MM sandwich gives descent of E up to the bound
    if preconditioner == "metric" or bound < 2:
        alpha = 0.5 * min(bound, 1.0) if preconditioner == "metric" else 0.5 * bound
        _close(majoriser_step(E, Y_t, Y_t, alpha, preconditioner), E.step(Y_t, alpha, preconditioner=preconditioner))
    Y_plus = majoriser_step(E, Y_t, Y_t, bound, preconditioner)
    assert float(E.energy(Y_plus)) <= float(E.energy(Y_t)) + 1e-12


def test_gaussian_true_curvature_below_majoriser(gen):
    n, d = 5, 3
    Y = torch.randn(n, d, generator=gen, dtype=DT)
    E = AttentionEnergy(torch.randn(d, d, generator=gen, dtype=DT))
    for pc in ("metric", "token"):
        curv = preconditioned_curvature(E, Y, pc)
        assert curv["true"] <= curv["majoriser"] + 1e-12
    # Γ ⪰ 0 for the Gaussian kernel, so λ_max(N) ≤ 1 and the bound (a) is at least 2 (MATH §1.1)
    assert majoriser_step_bound(E, Y, "metric") >= 2.0 - 1e-12


def test_errors(gen):
    Y = torch.randn(4, 3, generator=gen, dtype=DT)
    MH = MultiHeadAttentionEnergy(torch.randn(2, 3, 2, generator=gen, dtype=DT))
    with pytest.raises(EnergyInputError, match="single-head"):
        majoriser_step_bound(MH, Y)
    E = AttentionEnergy(torch.randn(3, 2, generator=gen, dtype=DT))  # k < d: W singular
    with pytest.raises(EnergyInputError, match="W ≻ 0"):
        preconditioned_curvature(E, Y, "metric")
    with pytest.raises(EnergyInputError, match="width"):
        attention_energy_hessian(E, torch.randn(4, 5, dtype=DT))
    with pytest.raises(EnergyInputError, match="preconditioner"):
        majoriser_step_bound(E, Y, "both")
    with pytest.raises(EnergyInputError, match="one sequence"):
        majoriser_step_bound(E, Y.unsqueeze(0))


def test_size_guard(gen):
    from energy.hessian.attention import DenseSizeError

    E = AttentionEnergy(torch.randn(3, 2, generator=gen, dtype=DT))
    with pytest.raises(DenseSizeError, match="GiB"):
        attention_energy_hessian(E, torch.randn(2, 4, 3, generator=gen, dtype=DT), max_gib=1e-9)
