"""Energy Transformer (MATH §2.2): Lagrangian LayerNorm, closed-form gradients, measured descent of finite steps."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _helpers import DT
from torch import nn

from energy._validation import ConstraintError, EnergyInputError, StepSizeError, StepSizeWarning, strict_mode
from energy.energy_transformer import EnergyTransformerEnergy, et_lagrangian
from energy.ffn import TiedReLUEnergy
from energy.reference import multi_head_attention

TOL = 1e-10


def instance(gen, *, h=2, d=6, k=4, m=7, n=5, B=3, w=1.0, x_scale=1.0, gamma=1.3, eps=1e-5, exclude=True):
    """Random instance with weight entries N(0, w²/d) (bounded weights) and tokens N(0, x_scale²)."""
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)
    c = w / math.sqrt(d)
    E = EnergyTransformerEnergy(c * r(h, d, k), c * r(h, d, k), c * r(m, d), ln_gamma=gamma, ln_bias=0.3 * r(d),
                                eps=eps, exclude_diagonal=exclude)
    return E, x_scale * r(B, n, d)


def quiet_step(E, x, alpha):
    """E.step always warns (its guaranteed range is empty); the tests measure descent instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)
        return E.step(x, alpha)


# ------------------------------------------------------------------------------------------- LayerNorm as gradient


def test_layernorm_is_gradient_of_lagrangian(gen):
    E, x = instance(gen)
    g = E.normalize(x)
    ln = nn.LayerNorm(6, eps=E.eps, dtype=DT)
    with torch.no_grad():
        ln.weight.fill_(E.ln_gamma)
        ln.bias.copy_(E.ln_bias)
    assert (g - ln(x)).abs().max() < TOL
    x_ = x.clone().requires_grad_(True)
    (dL,) = torch.autograd.grad(et_lagrangian(x_, E.ln_gamma, E.ln_bias, E.eps).sum(), x_)
    assert (dL - g).abs().max() < TOL
    assert (E.lagrangian(x) - et_lagrangian(x, E.ln_gamma, E.ln_bias, E.eps)).abs().max() == 0


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_lagrangian_hessian_is_symmetric_psd_and_matches_autograd(gen, eps):
    E, x = instance(gen, eps=eps)
    v = torch.randn(x.shape, generator=gen, dtype=DT)
    token = x[0, 1]
    J = torch.func.jacrev(lambda t: E.normalize(t[None, None])[0, 0])(token)  # (d, d)
    assert (J - J.T).abs().max() < TOL
    assert torch.linalg.eigvalsh(J).min() > -1e-12
    assert (E.lagrangian_hvp(token[None, None], v[0, 1][None, None])[0, 0] - J @ v[0, 1]).abs().max() < TOL
    # the smallest eigenvalue on 1⊥ is γε/σ̃³ (along x_c), the 1 direction is the null space
    xc = token - token.mean()
    sig = torch.sqrt(xc.square().mean() + eps)
    assert abs(float(xc @ J @ xc / (xc @ xc)) - E.ln_gamma * eps / sig**3) < 1e-9
    assert (J @ torch.ones(6, dtype=DT)).abs().max() < TOL


# -------------------------------------------------------------------------------------------------- energy, grads


def _attention_energy_loops(E, G):
    """E_att written with explicit loops over heads and query tokens (independent of the vectorised code)."""
    total = torch.zeros(G.shape[:-2], dtype=DT)
    n = G.shape[-2]
    for h in range(E.W_Q.shape[0]):
        Q, K = G @ E.W_Q[h], G @ E.W_K[h]
        for C in range(n):
            keys = [B for B in range(n) if not (E.exclude_diagonal and B == C)]
            logits = E.beta * torch.stack([(K[..., B, :] * Q[..., C, :]).sum(-1) for B in keys], dim=-1)
            total = total - torch.logsumexp(logits, dim=-1) / E.beta
    return total


@pytest.mark.parametrize("exclude", [True, False])
def test_energy_terms_match_definition(gen, exclude):
    E, x = instance(gen, exclude=exclude)
    G = E.normalize(x)
    assert (E.attention_energy_g(G) - _attention_energy_loops(E, G)).abs().max() < TOL
    assert (E.hopfield_energy_g(G) - TiedReLUEnergy(E.xi.T).energy(G)).abs().max() < TOL
    ref_hn = -0.5 * torch.relu(torch.einsum("md,...nd->...nm", E.xi, G)).square().sum((-2, -1))
    assert (E.hopfield_energy_g(G) - ref_hn).abs().max() < TOL
    t = E.terms(x)
    assert (E.energy(x) - (t["attention"] + t["hopfield"])).abs().max() < TOL
    assert E.energy(x).shape == (3,)
    assert E.beta == pytest.approx(1 / math.sqrt(4))  # default β = 1/√k


@pytest.mark.parametrize("exclude", [True, False])
def test_grad_g_closed_form_matches_autograd(gen, exclude):
    E, x = instance(gen, exclude=exclude, h=3, n=6, d=5, k=3, m=9)
    G = E.normalize(x)
    G_ = G.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(E.energy_g(G_).sum(), G_)
    assert (E.grad_g(G) - ref).abs().max() < TOL
    # the two attention terms separately: query side (through W_Q) and key side (through W_K)
    (ref_att,) = torch.autograd.grad(E.attention_energy_g(G_).sum(), G_)
    (ref_hn,) = torch.autograd.grad(E.hopfield_energy_g(G_).sum(), G_)
    assert (E.grad_g(G) - ref_att - ref_hn).abs().max() < TOL


@pytest.mark.parametrize("exclude", [True, False])
def test_query_side_is_standard_multi_head_attention(gen, exclude):
    """−Σ_h A_h K_h W_Q[h]ᵀ = MHA(G) with W_V = W_K (tied values), W_O = [W_Q[h]ᵀ]_h, scale β, diagonal masked."""
    E, x = instance(gen, exclude=exclude, h=3, d=5, k=2)
    G = E.normalize(x)
    h, d, k = E.W_Q.shape
    cat = lambda W: W.permute(1, 0, 2).reshape(d, h * k)  # (h, d, k) -> (d, h·k), head-major columns
    W_O = E.W_Q.transpose(1, 2).reshape(h * k, d)
    mask = ~torch.eye(G.shape[-2], dtype=torch.bool) if exclude else None
    mha = multi_head_attention(G, G, cat(E.W_Q), cat(E.W_K), cat(E.W_K), W_O, num_heads=h, scale=E.beta, mask=mask)
    query_side, key_side = E.attention_grad_terms(G)
    assert (query_side + mha).abs().max() < TOL
    # the key side is the other half of the autograd gradient of E_att
    G_ = G.clone().requires_grad_(True)
    (ref_att,) = torch.autograd.grad(E.attention_energy_g(G_).sum(), G_)
    assert (query_side + key_side - ref_att).abs().max() < TOL


def test_grad_x_is_lagrangian_hessian_times_grad_g(gen):
    E, x = instance(gen)
    assert (E.grad(x) - E.autograd_grad(x)).abs().max() < TOL
    # shift invariance of LN: the energy does not see per-token shifts along 1, so ∇_x E ⊥ 1 per token
    assert E.grad(x).sum(-1).abs().max() < TOL


def test_step_is_update_with_grad_g(gen):
    E, x = instance(gen)
    with pytest.warns(StepSizeWarning, match="instance-dependent"):
        x1 = E.step(x, 0.05)
    assert (x1 - (x - 0.05 * E.grad_g(E.normalize(x)))).abs().max() < TOL
    with strict_mode(), pytest.raises(StepSizeError):
        E.step(x, 0.05)


# ------------------------------------------------------------------------------------------------ measured descent


def test_descent_rate_is_the_first_order_decrease(gen):
    E, x = instance(gen)
    rate = E.descent_rate(x)
    assert (rate > 0).all()
    for alpha in (1e-4, 1e-5):
        fd = (E.energy(x) - E.energy(quiet_step(E, x, alpha))) / alpha
        assert ((fd - rate).abs() / rate < 50 * alpha * max(1.0, float(rate.max()))).all()


def test_small_steps_descend_on_bounded_instances():
    """α = 0.01, weights N(0, 1/d), tokens N(0, 1), 50 fixed instances × 2 token sets: a measurement, not a theorem
    (no uniform range is known), so the instances are fixed rather than drawn by hypothesis."""
    for seed in range(50):
        E, x = instance(torch.Generator().manual_seed(seed), B=2)
        e0, e1 = E.energy(x), E.energy(quiet_step(E, x, 0.01))
        assert (e1 <= e0 + 1e-12 * e0.abs().clamp_min(1)).all(), seed


def test_trajectory_small_steps_monotone(gen):
    E, x = instance(gen)
    energies = [E.energy(x)]
    for _ in range(40):
        x = quiet_step(E, x, 0.01)
        energies.append(E.energy(x))
    e = torch.stack(energies)
    assert (e[1:] <= e[:-1] + 1e-12 * e[:-1].abs()).all()


def test_finite_steps_can_increase_the_energy(record_property):
    """The discrete update is not a guaranteed descent step. Violations are rare on random instances (LayerNorm keeps
    the states bounded), so count them over 8 fixed instances × 64 token sets with small tokens (σ̃ ≈ 0.01, hence
    ∂g/∂x ≈ 100·γ): none for small α, at least one for α ∈ {1, 10} although every first-order rate is positive."""
    alphas = (0.01, 0.1, 1.0, 10.0)
    counts = dict.fromkeys(alphas, 0)
    for s in range(8):
        E, x = instance(torch.Generator().manual_seed(s), B=64, x_scale=0.01, gamma=1.0)
        assert (E.descent_rate(x) > 0).all()
        e0 = E.energy(x)
        for alpha in alphas:
            e1 = E.energy(quiet_step(E, x, alpha))
            counts[alpha] += int((e1 > e0 + 1e-12 * e0.abs()).sum())
    for alpha, c in counts.items():
        record_property(f"et_violations_alpha_{alpha}", f"{c}/512")
    assert counts[0.01] == 0
    assert counts[1.0] + counts[10.0] > 0


# --------------------------------------------------------------------------------------------------------- bad input

_W = torch.zeros(2, 4, 3, dtype=DT)
_xi = torch.zeros(5, 4, dtype=DT)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: EnergyTransformerEnergy(_W, _W, _xi, ln_gamma=torch.ones(4, dtype=DT)), EnergyInputError,
         "scalar"),
        (lambda: EnergyTransformerEnergy(_W, _W, _xi, ln_gamma=-1.0), ConstraintError, "> 0"),
        (lambda: EnergyTransformerEnergy(_W, _W, _xi, beta=0.0), EnergyInputError, "beta"),
        (lambda: EnergyTransformerEnergy(_W, _W, _xi, eps=-1e-3), EnergyInputError, "eps"),
        (lambda: EnergyTransformerEnergy(_W, torch.zeros(2, 4, 2, dtype=DT), _xi), EnergyInputError, "W_K"),
        (lambda: EnergyTransformerEnergy(_W[0], _W[0], _xi), EnergyInputError, "W_Q"),
        (lambda: EnergyTransformerEnergy(_W, _W, torch.zeros(5, 3, dtype=DT)), EnergyInputError, "xi"),
        (lambda: EnergyTransformerEnergy(_W, _W, _xi, ln_bias=torch.zeros(3, dtype=DT)), EnergyInputError,
         "ln_bias"),
        (lambda: EnergyTransformerEnergy(_W, _W, _xi.float()), EnergyInputError, "mixed dtypes"),
        (lambda: EnergyTransformerEnergy(_W, _W, _xi).energy(torch.ones(2, 1, 4, dtype=DT)), EnergyInputError,
         "exclude_diagonal"),
        (lambda: EnergyTransformerEnergy(_W, _W, _xi).energy(torch.ones(2, 3, 5, dtype=DT)), EnergyInputError,
         "`x`"),
        (lambda: EnergyTransformerEnergy(_W, _W, _xi).grad_g(torch.ones(3, 4)), EnergyInputError, "`G`"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
