"""Normalisation as projection (MATH §1.4): LayerNorm/RMSNorm equivalences, projection property, affine absorption."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import DT, randn
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from energy._validation import EnergyInputError
from energy.normalization import (
    LayerNormProjection,
    RMSNormProjection,
    absorb_layernorm_affine,
    layernorm_projection,
    rmsnorm_projection,
)
from energy.reference import attention_weights, layer_norm, rms_norm

TOL = 1e-10


# ------------------------------------------------------------------------------------ equivalence with torch modules


def test_layernorm_projection_is_nn_layernorm_at_eps0(gen):
    Y = 3 * randn(2, 5, 7, gen=gen) + 1.0
    P = layernorm_projection(Y)
    ln = nn.LayerNorm(7, eps=0.0, elementwise_affine=False, dtype=DT)
    assert (P - ln(Y)).abs().max() < TOL
    assert (P.sum(-1)).abs().max() < TOL
    assert (P.norm(dim=-1) - math.sqrt(7)).abs().max() < TOL
    assert LayerNormProjection().contains(P).all()
    assert not LayerNormProjection().contains(Y).any()


def test_rmsnorm_projection_is_nn_rmsnorm_at_eps0(gen):
    Y = randn(3, 4, 6, gen=gen)
    P = rmsnorm_projection(Y)
    rn = nn.RMSNorm(6, eps=0.0, elementwise_affine=False, dtype=DT)
    assert (P - rn(Y)).abs().max() < TOL
    assert (P.norm(dim=-1) - math.sqrt(6)).abs().max() < TOL
    assert (RMSNormProjection()(Y) - P).abs().max() < TOL


@pytest.mark.parametrize("eps", [1e-5, 1e-2, 1.0])
def test_eps_is_a_radial_shrink_of_the_projection(gen, eps):
    """LN_ε(y) = s(y) Π(y), s = ‖y_c‖/sqrt(‖y_c‖² + dε), and ‖LN_ε − Π‖ ≤ √d dε / (2‖y_c‖²)."""
    d = 5
    Y = randn(4, 6, d, gen=gen)
    Yc = Y - Y.mean(-1, keepdim=True)
    nc = Yc.norm(dim=-1, keepdim=True)
    s = nc / torch.sqrt(nc**2 + d * eps)
    assert (F.layer_norm(Y, (d,), eps=eps) - s * layernorm_projection(Y)).abs().max() < TOL
    gap = (F.layer_norm(Y, (d,), eps=eps) - layernorm_projection(Y)).norm(dim=-1, keepdim=True)
    assert (gap <= math.sqrt(d) * d * eps / (2 * nc**2) + TOL).all()
    n = Y.norm(dim=-1, keepdim=True)
    assert (rms_norm(Y, eps=eps) - n / torch.sqrt(n**2 + d * eps) * rmsnorm_projection(Y)).abs().max() < TOL


# ------------------------------------------------------------------------------------------- projection property


def _random_centred_sphere(k, d, gen):
    Z = randn(k, d, gen=gen)
    Z = Z - Z.mean(-1, keepdim=True)
    return math.sqrt(d) * Z / Z.norm(dim=-1, keepdim=True)


@given(seed=st.integers(0, 2**20), d=st.integers(2, 9), shift=st.floats(-5, 5))
def test_layernorm_projection_is_closest_point(seed, d, shift):
    gen = torch.Generator().manual_seed(seed)
    y = randn(d, gen=gen) + shift  # not centred
    p = layernorm_projection(y)
    # (i) no random point of the centred sphere is closer (including points near p)
    # (tolerance 1e-9: sampled sphere points carry rounding errors of order eps·‖z‖/‖z_c‖ off the sphere)
    Z = _random_centred_sphere(2000, d, gen)
    near = layernorm_projection(p + 0.05 * randn(200, d, gen=gen))
    assert ((Z - y).norm(dim=-1) >= (p - y).norm() - 1e-9).all()
    assert ((near - y).norm(dim=-1) >= (p - y).norm() - 1e-9).all()
    # (ii) first-order optimality: y − p lies in the normal space span{1, p} of the centred sphere at p
    N = torch.stack([torch.ones(d, dtype=DT), p], dim=1)
    coef = torch.linalg.lstsq(N, y - p).solution
    assert (N @ coef - (y - p)).abs().max() < 1e-9


@given(seed=st.integers(0, 2**20), d=st.integers(2, 9))
def test_rmsnorm_projection_is_closest_point(seed, d):
    gen = torch.Generator().manual_seed(seed)
    y = 2 * randn(d, gen=gen)
    p = rmsnorm_projection(y)
    Z = randn(2000, d, gen=gen)
    Z = math.sqrt(d) * Z / Z.norm(dim=-1, keepdim=True)
    assert ((Z - y).norm(dim=-1) >= (p - y).norm() - 1e-9).all()
    # first-order optimality: the normal space of the sphere at p is span{p}, so y − p ∥ p
    r = y - p
    assert (r - (r @ p) / (p @ p) * p).abs().max() < 1e-9


def test_projection_is_idempotent_and_rejects_constant_tokens(gen):
    Y = randn(3, 5, gen=gen)
    P = layernorm_projection(Y)
    assert (layernorm_projection(P) - P).abs().max() < TOL
    with pytest.raises(EnergyInputError, match="not unique"):
        layernorm_projection(torch.ones(2, 4, dtype=DT))
    with pytest.raises(EnergyInputError, match="not unique"):
        rmsnorm_projection(torch.zeros(2, 4, dtype=DT))
    with pytest.raises(EnergyInputError, match="floating"):
        layernorm_projection(torch.ones(2, 4, dtype=torch.int64))
    # the indicator: 0 on the set, inf off it (per batch element of (…, n, d) tokens)
    ind = LayerNormProjection().indicator(torch.stack([P, Y]))
    assert ind[0] == 0 and math.isinf(ind[1])


def test_projected_step_is_not_monotone_in_general():
    """A projection onto a sphere (non-convex set) can undo a descent step: E(Π(y − α∇E)) > E(y) for y on the sphere.

    E(y) = ½‖y − c‖² with c just inside the circle next to y: a long (but descending, α < 2) gradient step
    overshoots past the origin, and the radial projection sends it to the far side of the circle.
    """
    c = torch.tensor([0.0, 0.1], dtype=DT)
    y = torch.tensor([0.0, math.sqrt(2.0)], dtype=DT)  # on the circle of radius √2 (d = 2)
    E = lambda v: 0.5 * (v - c).square().sum()
    step = y - 1.9 * (y - c)  # α = 1.9 < 2 = 2/L: the unprojected step descends
    assert E(step) < E(y)
    assert E(rmsnorm_projection(step)) > E(y)


# ------------------------------------------------------------------------------------------ affine part and β


def _pairwise_gaussian_energy(Y, W):
    """E_att = Σ_{i<j} −exp(−½‖y_i − y_j‖²_W), written directly from MATH §1.1 (n² pairs; tests only)."""
    D = Y[..., :, None, :] - Y[..., None, :, :]
    z = 0.5 * torch.einsum("...ijd,de,...ije->...ij", D, W, D)
    iu = torch.triu_indices(Y.shape[-2], Y.shape[-2], offset=1)
    return -torch.exp(-z[..., iu[0], iu[1]]).sum(-1)


def _softmax_beta(Y, W):
    beta = -0.5 * torch.einsum("...jd,de,...je->...j", Y, W, Y)
    return attention_weights(Y @ W, Y, scale=1.0, key_bias=beta)


def _step_a(Y, W, alpha):
    return (1 - alpha) * Y + alpha * _softmax_beta(Y, W) @ Y


def _psd(d, k, gen, scale):
    M = randn(d, k, gen=gen)
    return scale * M @ M.T


def test_absorb_layernorm_affine_energy_and_step_a(gen):
    n, d = 6, 5
    X = randn(2, n, d, gen=gen)
    gamma, b = randn(d, gen=gen), randn(d, gen=gen)
    W = _psd(d, 3, gen, 1 / math.sqrt(3) / d)
    P = layernorm_projection(X)
    Y = layer_norm(X, gamma, b, eps=0.0)  # LayerNorm with affine = a(Π(X))
    assert (Y - (P * gamma + b)).abs().max() < TOL
    W_t = absorb_layernorm_affine(W, gamma)
    assert (W_t - torch.diag(gamma) @ W @ torch.diag(gamma)).abs().max() < TOL
    # energy: E(a(P); W) = E(P; W̃)
    assert (_pairwise_gaussian_energy(Y, W) - _pairwise_gaussian_energy(P, W_t)).abs().max() < TOL
    # step (a) commutes with the affine map, b passes through
    alpha = 0.7
    assert (_step_a(Y, W, alpha) - (_step_a(P, W_t, alpha) * gamma + b)).abs().max() < TOL
    # step (b) does not (unless γ² = 1): Y − α D⁻¹ L Y W with L, D from the Gaussian weights
    def step_b(Y, W):
        A = _softmax_beta(Y, W)
        return Y - alpha * (Y - A @ Y) @ W
    assert (step_b(Y, W) - (step_b(P, W_t) * gamma + b)).abs().max() > 1e-6


def test_absorb_with_energy_attention_module(gen):
    attention = pytest.importorskip("energy.attention")
    n, d, k = 5, 4, 3
    X = randn(3, n, d, gen=gen)
    gamma, b = randn(d, gen=gen), randn(d, gen=gen)
    M = randn(d, k, gen=gen)
    E = attention.AttentionEnergy(M)
    E_t = attention.AttentionEnergy(gamma[:, None] * M)  # M̃ = diag(γ) M, same scale
    assert (E_t.W - absorb_layernorm_affine(E.W, gamma)).abs().max() < TOL
    P = layernorm_projection(X)
    Y = P * gamma + b
    assert (E.energy(Y) - E_t.energy(P)).abs().max() < TOL
    assert (E.step(Y, 0.5) - (E_t.step(P, 0.5) * gamma + b)).abs().max() < TOL


def test_plain_softmax_equals_softmax_beta_after_projection(gen):
    n, d = 7, 6
    X = randn(2, n, d, gen=gen)
    W = 0.3 * torch.eye(d, dtype=DT)
    for project in (layernorm_projection, rmsnorm_projection):
        Y = project(X)
        plain = attention_weights(Y @ W, Y, scale=1.0)
        assert (plain - _softmax_beta(Y, W)).abs().max() < TOL
    # control: without the projection the two differ (token norms differ)
    assert (attention_weights(X @ W, X, scale=1.0) - _softmax_beta(X, W)).abs().max() > 1e-3


def test_energy_attention_softmax_beta_is_plain_softmax_after_projection(gen):
    attention = pytest.importorskip("energy.attention")
    X = randn(3, 5, 4, gen=gen)
    W = attention.metric(torch.eye(4, dtype=DT))  # W ∝ I (scale 1/√k)
    Y = layernorm_projection(X)
    assert (attention.softmax_beta(Y, W) - torch.softmax(Y @ W @ Y.transpose(-1, -2), dim=-1)).abs().max() < TOL


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: absorb_layernorm_affine(torch.zeros(3, 4, dtype=DT), torch.ones(3, dtype=DT)), "square"),
        (lambda: absorb_layernorm_affine(torch.zeros(3, 3, dtype=DT), torch.ones(4, dtype=DT)), "gamma"),
        (lambda: absorb_layernorm_affine(torch.zeros(3, 3, dtype=DT), torch.ones(3)), "mixed dtypes"),
        (lambda: rmsnorm_projection(torch.tensor([1.0, float("inf")], dtype=DT)), "NaN or inf"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(EnergyInputError, match=match):
        call()
