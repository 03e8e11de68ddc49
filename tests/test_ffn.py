"""FFN energies (MATH §1.3): closed forms vs autograd, descent inside the ranges, failure outside, FFN equivalence."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import DT, randn
from hypothesis import given
from hypothesis import strategies as st

from energy._validation import ConstraintError, EnergyInputError, StepSizeError, StepSizeWarning, strict_mode
from energy.ffn import FFNEnergy, TiedReLUEnergy
from energy.reference import feed_forward

TOL = 1e-10


def sym_with_spectrum(d, lo, hi, gen):
    """Random symmetric matrix with eigenvalues drawn uniformly in [lo, hi]."""
    Q, _ = torch.linalg.qr(randn(d, d, gen=gen))
    lam = lo + (hi - lo) * torch.rand(d, generator=gen, dtype=DT)
    return (Q * lam) @ Q.T


def ffn_instance(gen, d=5, lo=-0.8, hi=2.0):
    W_f = sym_with_spectrum(d, lo, hi, gen)
    return FFNEnergy(W_f, randn(d, gen=gen))


# ------------------------------------------------------------------------------------------------------ FFNEnergy


def test_ffn_grad_matches_autograd_and_step_is_linear_ffn(gen):
    E = ffn_instance(gen, d=5)
    Y = randn(3, 4, 5, gen=gen)  # batch 3, n = 4 ≠ d = 5
    assert E.energy(Y).shape == (3,)
    assert (E.grad(Y) - E.autograd_grad(Y)).abs().max() < TOL
    alpha = 0.9 * E.step_range().high
    expected = (1 - alpha) * Y - alpha * Y @ E.W_f + alpha * E.b  # MATH §1.3 closed form of the step
    assert (E.step(Y, alpha) - expected).abs().max() < TOL
    # the same step is a reference FFN with linear activation: X (I - α(I + W_f)) + α 1bᵀ
    eye = torch.eye(5, dtype=DT)
    ref = feed_forward(Y, eye, None, eye - alpha * (eye + E.W_f), alpha * E.b, activation=None)
    assert (E.step(Y, alpha) - ref).abs().max() < TOL


def test_ffn_energy_formula_single_sequence(gen):
    E = ffn_instance(gen, d=4)
    Y = randn(6, 4, gen=gen)
    ref = 0.5 * torch.trace(Y @ E.W_f @ Y.T) + 0.5 * torch.linalg.matrix_norm(Y - E.b[None]) ** 2
    assert abs(float(E.energy(Y) - ref)) < TOL


@given(seed=st.integers(0, 2**20), frac=st.floats(0.01, 0.999))
def test_ffn_step_descends_inside_range(seed, frac):
    gen = torch.Generator().manual_seed(seed)
    E = ffn_instance(gen, d=4)
    Y = 3 * randn(2, 5, 4, gen=gen)
    alpha = frac * E.step_range().high
    Y1 = E.step(Y, alpha)
    E0, E1 = E.energy(Y), E.energy(Y1)
    assert (E1 <= E0 + 1e-10 * E0.abs().clamp_min(1)).all()


def test_ffn_step_beyond_range_increases_energy(gen):
    E = ffn_instance(gen, d=5, lo=0.0, hi=1.5)
    lam, V = torch.linalg.eigh(torch.eye(5, dtype=DT) + E.W_f)
    Y_star = torch.linalg.solve(torch.eye(5, dtype=DT) + E.W_f, E.b)  # minimiser row (symmetric H)
    # displacement along the top eigenvector: gradient = λ_max c v_maxᵀ, exact energy change > 0 iff α > 2/λ_max
    Y = Y_star + randn(6, 1, gen=gen) * V[:, -1]
    alpha = 1.1 * E.step_range().high
    with pytest.warns(StepSizeWarning, match="outside"):
        Y1 = E.step(Y, alpha)
    assert E.energy(Y1) > E.energy(Y)
    # from a generic start, repeated steps beyond the range diverge (the top mode grows like |1 − αλ_max|^t)
    Y = randn(6, 5, gen=gen)
    e0 = E.energy(Y)
    with pytest.warns(StepSizeWarning):
        for _ in range(60):
            Y = E.step(Y, alpha)
    assert E.energy(Y) > e0


def test_ffn_strict_mode_raises():
    E = FFNEnergy(torch.zeros(3, 3, dtype=DT), torch.zeros(3, dtype=DT))
    assert E.step_range().high == pytest.approx(2.0)
    with strict_mode(), pytest.raises(StepSizeError):
        E.step(torch.zeros(2, 3, dtype=DT), 2.0)


@given(seed=st.integers(0, 2**20), frac=st.floats(0.01, 0.999))
def test_projected_step_descends_from_feasible_start(seed, frac):
    gen = torch.Generator().manual_seed(seed)
    E = ffn_instance(gen, d=4)
    Y = randn(5, 4, gen=gen).abs()  # feasible
    alpha = frac * E.step_range().high
    Y1 = E.projected_step(Y, alpha)
    assert (Y1 >= 0).all()
    assert E.constrained_energy(Y1) <= E.constrained_energy(Y) + 1e-10 * max(1.0, abs(float(E.energy(Y))))


def test_projected_step_is_relu_of_step_and_constrained_energy(gen):
    E = ffn_instance(gen, d=3)
    Y = randn(2, 4, 3, gen=gen)
    assert torch.equal(E.projected_step(Y, 0.5), torch.relu(E.step(Y, 0.5)))
    ce = E.constrained_energy(Y)
    feasible = (Y >= 0).flatten(1).all(1)
    assert torch.equal(torch.isinf(ce), ~feasible)


def test_ffn_unbounded_energy_rejected_or_allowed(gen):
    W_f = -2.0 * torch.eye(3, dtype=DT)
    with pytest.raises(ConstraintError, match="unbounded below"):
        FFNEnergy(W_f, torch.zeros(3, dtype=DT))
    E = FFNEnergy(W_f, torch.zeros(3, dtype=DT), allow_unbounded=True)
    assert math.isinf(E.step_range().high)  # concave: every step descends (towards -inf)
    Y = randn(4, 3, gen=gen)
    assert E.energy(E.step(Y, 5.0)) < E.energy(Y)


# ------------------------------------------------------------------------------------------------- TiedReLUEnergy


def test_tied_relu_grad_matches_autograd_and_step_is_tied_ffn(gen):
    d, m = 5, 8
    E = TiedReLUEnergy(randn(d, m, gen=gen), randn(m, gen=gen))
    Y = randn(3, 4, d, gen=gen)
    assert E.energy(Y).shape == (3,)
    assert (E.grad(Y) - E.autograd_grad(Y)).abs().max() < TOL
    alpha = 0.37
    ref = Y + feed_forward(Y, E.W_1, E.b, alpha * E.W_1.T, None, activation="relu")
    assert (E.step(Y, alpha) - ref).abs().max() < TOL
    # energy formula
    ref_E = -0.5 * torch.relu(Y @ E.W_1 + E.b).square().sum(dim=(-2, -1))
    assert (E.energy(Y) - ref_E).abs().max() < TOL
    # without a bias
    E0 = TiedReLUEnergy(E.W_1)
    assert (E0.grad(Y) - E0.autograd_grad(Y)).abs().max() < TOL


@given(seed=st.integers(0, 2**20), log_alpha=st.floats(-4, 3))
def test_tied_relu_descends_for_every_alpha(seed, log_alpha):
    gen = torch.Generator().manual_seed(seed)
    E = TiedReLUEnergy(randn(4, 6, gen=gen), randn(6, gen=gen))
    Y = randn(2, 3, 4, gen=gen)
    alpha = 10.0**log_alpha
    g = E.grad(Y)
    E0, E1 = E.energy(Y), E.energy(E.step(Y, alpha))
    # the concavity bound, not just monotonicity: E(Y⁺) ≤ E(Y) − α‖∇E‖²
    bound = E0 - alpha * g.square().sum(dim=(-2, -1))
    assert (E1 <= bound + 1e-9 * bound.abs().clamp_min(1)).all()


# --------------------------------------------------------------------------------------------------------- bad input

_Z3 = torch.zeros(3, 3, dtype=DT)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: FFNEnergy(torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=DT), torch.zeros(2, dtype=DT)),
         ConstraintError, "symmetric"),
        (lambda: FFNEnergy(_Z3, torch.zeros(4, dtype=DT)), EnergyInputError, "`b`"),
        (lambda: FFNEnergy(_Z3, torch.zeros(3)), EnergyInputError, "mixed dtypes"),
        (lambda: FFNEnergy(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3)), EnergyInputError, "floating"),
        (lambda: FFNEnergy(_Z3, torch.zeros(3, dtype=DT)).energy(torch.zeros(2, 4, dtype=DT)), EnergyInputError,
         "`Y`"),
        (lambda: FFNEnergy(_Z3, torch.zeros(3, dtype=DT)).grad(torch.zeros(2, 3)), EnergyInputError, "dtype"),
        (lambda: FFNEnergy(_Z3, torch.zeros(3, dtype=DT)).step(torch.zeros(2, 3, dtype=DT), float("nan")),
         EnergyInputError, "alpha"),
        (lambda: TiedReLUEnergy(torch.zeros(3, 4, dtype=DT), torch.zeros(3, dtype=DT)), EnergyInputError, "`b`"),
        (lambda: TiedReLUEnergy(torch.zeros(3, 4, dtype=DT)).grad(torch.full((2, 3), math.nan, dtype=DT)),
         EnergyInputError, "NaN"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
