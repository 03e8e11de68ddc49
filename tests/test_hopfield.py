"""Modern Hopfield energy (MATH §2.1): gradient vs autograd, CCCP descent, equivalence with cross-attention."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import DT, randn
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from energy._validation import EnergyInputError, StepSizeWarning
from energy.hopfield import HopfieldEnergy
from energy.reference import multi_head_attention

TOL = 1e-10


def test_energy_formula_and_grad(gen):
    N, d, beta = 7, 4, 0.8
    X = randn(N, d, gen=gen)
    H = HopfieldEnergy(X, beta)
    xi = randn(d, gen=gen)
    M = X.norm(dim=-1).max()
    ref = -torch.logsumexp(beta * X @ xi, 0) / beta + 0.5 * xi @ xi + math.log(N) / beta + 0.5 * M**2
    assert abs(float(H.energy(xi) - ref)) < TOL
    assert H.energy(xi).shape == ()
    # closed-form gradient vs autograd, for batched sets of queries (batch 3, n_q = 5)
    Xi = randn(3, 5, d, gen=gen)
    assert H.energy(Xi).shape == (3,)
    assert H.energy_per_query(Xi).shape == (3, 5)
    assert (H.energy(Xi) - H.energy_per_query(Xi).sum(-1)).abs().max() < TOL
    assert (H.grad(Xi) - H.autograd_grad(Xi)).abs().max() < TOL
    g1 = torch.func.grad(lambda v: H.energy(v))(xi)
    assert (H.grad(xi) - g1).abs().max() < TOL


def test_batched_patterns_broadcast(gen):
    X = randn(2, 6, 3, gen=gen)
    H = HopfieldEnergy(X, 1.3)
    xi = randn(3, gen=gen)
    per_batch = torch.stack([HopfieldEnergy(X[b], 1.3).energy(xi) for b in range(2)])
    assert (H.energy(xi) - per_batch).abs().max() < TOL
    upd = torch.stack([HopfieldEnergy(X[b], 1.3).update(xi) for b in range(2)])
    assert (H.update(xi) - upd).abs().max() < TOL


def test_update_is_cccp_and_unit_gradient_step(gen):
    X, beta = randn(5, 4, gen=gen), 2.0
    H = HopfieldEnergy(X, beta)
    xi = randn(4, gen=gen)
    xi_plus = X.T @ torch.softmax(beta * X @ xi, 0)  # ξ⁺ = Xᵀ softmax(βXξ), column form of the paper
    assert (H.step(xi) - xi_plus).abs().max() < TOL
    assert (H.step(xi) - (xi - H.autograd_grad(xi))).abs().max() < TOL  # = gradient step of size 1
    assert (H.step(xi, 0.5) - (0.5 * xi + 0.5 * xi_plus)).abs().max() < TOL


@given(seed=st.integers(0, 2**20), log_beta=st.floats(-2, 2.5), alpha=st.floats(0.01, 1.99))
def test_step_descends_with_majoriser_bound(seed, log_beta, alpha):
    gen = torch.Generator().manual_seed(seed)
    H = HopfieldEnergy(randn(6, 4, gen=gen), math.exp(log_beta))
    xi = 2 * randn(2, 3, 4, gen=gen)
    E0 = H.energy_per_query(xi)
    E1 = H.energy_per_query(H.step(xi, alpha))
    gap = (xi - H.update(xi)).square().sum(-1)
    bound = E0 - 0.5 * (1 - (1 - alpha) ** 2) * gap  # E(ξ_α) ≤ Q(ξ_α | ξ)
    assert (E1 <= bound + 1e-10 * E0.abs().clamp_min(1)).all()
    assert (E0 >= -1e-12).all()  # E ≥ ½(‖ξ‖ − M)² ≥ 0


def test_iterated_updates_monotone(gen):
    H = HopfieldEnergy(randn(10, 6, gen=gen), 4.0)
    xi = randn(4, 6, gen=gen)
    energies = [H.energy_per_query(xi)]
    for _ in range(25):
        xi = H.step(xi)
        energies.append(H.energy_per_query(xi))
    E = torch.stack(energies)
    assert (E[1:] <= E[:-1] + 1e-12).all()


def test_step_beyond_two_increases_energy_single_pattern(gen):
    """N = 1: E(ξ) = ½‖ξ − x‖², the relaxed step maps ξ − x to (1 − α)(ξ − x): increase for α > 2."""
    x = randn(1, 3, gen=gen)
    H = HopfieldEnergy(x, 1.0)
    xi = randn(3, gen=gen)
    assert abs(float(H.energy(xi) - 0.5 * (xi - x[0]).square().sum())) < TOL
    with pytest.warns(StepSizeWarning):
        assert H.energy(H.step(xi, 2.5)) > H.energy(xi)


def test_update_equals_cross_attention(gen):
    """ξ = R W_Q, X = Y W_K: the update is cross-attention with scale β and values tied to keys (W_V = W_K)."""
    B, n_q, N, d_r, d_y, k, beta = 2, 3, 5, 4, 6, 4, 0.7
    R, Yk = randn(B, n_q, d_r, gen=gen), randn(B, N, d_y, gen=gen)
    W_Q, W_K, W_V = randn(d_r, k, gen=gen), randn(d_y, k, gen=gen), randn(d_y, 3, gen=gen)
    H = HopfieldEnergy(Yk @ W_K, beta)
    ref = multi_head_attention(R, Yk, W_Q, W_K, W_K, num_heads=1, scale=beta)
    assert (H.step(R @ W_Q) - ref).abs().max() < TOL
    # Hopfield layer with a free value map: the energy supplies the weights
    ref_v = multi_head_attention(R, Yk, W_Q, W_K, W_V, num_heads=1, scale=beta)
    assert (H.weights(R @ W_Q) @ (Yk @ W_V) - ref_v).abs().max() < TOL

    # nn.MultiheadAttention (query dim = embed dim = k): scale β via q_proj ← β√k · W_Qᵀ, v_proj = k_proj, W_O = I
    m = nn.MultiheadAttention(k, 1, batch_first=True, kdim=d_y, vdim=d_y, dtype=DT).eval()
    with torch.no_grad():
        m.q_proj_weight.copy_(beta * math.sqrt(k) * W_Q.T)
        m.k_proj_weight.copy_(W_K.T)
        m.v_proj_weight.copy_(W_K.T)
        m.in_proj_bias.zero_()
        m.out_proj.weight.copy_(torch.eye(k, dtype=DT))
        m.out_proj.bias.zero_()
    out, _ = m(R, Yk, Yk, need_weights=False)
    assert (H.step(R @ W_Q) - out).abs().max() < TOL


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: HopfieldEnergy(torch.zeros(3, dtype=DT), 1.0), "`X`"),
        (lambda: HopfieldEnergy(torch.zeros(3, 2, dtype=DT), 0.0), "beta"),
        (lambda: HopfieldEnergy(torch.zeros(3, 2, dtype=DT), float("inf")), "beta"),
        (lambda: HopfieldEnergy(torch.zeros(0, 2, dtype=DT), 1.0), "at least one pattern"),
        (lambda: HopfieldEnergy(torch.zeros(3, 2, dtype=DT), 1.0).energy(torch.zeros(3, dtype=DT)), "`xi`"),
        (lambda: HopfieldEnergy(torch.zeros(3, 2, dtype=DT), 1.0).step(torch.zeros(2)), "dtype"),
        (lambda: HopfieldEnergy(torch.zeros(3, 2, dtype=DT), 1.0).step(torch.zeros(2, dtype=DT), math.nan),
         "alpha"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(EnergyInputError, match=match):
        call()
