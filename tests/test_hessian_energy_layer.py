"""Energy-derived attention layer (MATH §4.2): closed-form loss Hessian in M against torch.func, float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import DT

from energy._validation import EnergyInputError
from energy.attention import AttentionEnergy, metric, softmax_beta
from energy.hessian.attention import DenseSizeError
from energy.hessian.energy_layer import (
    autograd_energy_layer_ggn,
    autograd_energy_layer_hessian,
    energy_layer_hessian,
    energy_layer_jacobian,
    energy_layer_output,
)
from energy.reference import attention_weights

SHAPES = [(None, 5, 3, 4), (2, 4, 3, 2), (3, 5, 4, 3)]
VARIANTS = [
    {},
    {"alpha": 0.7},
    {"tied": True, "alpha": 0.6},
    {"tied": True, "alpha": 1.3, "reduction": "mean"},
    {"alpha": 0.5, "scale": 0.8, "c": 0.3},
]


def _problem(gen, B, L, d, k):
    lead = () if B is None else (B,)
    X = torch.randn(*lead, L, d, generator=gen, dtype=DT)
    return X, torch.randn(d, k, generator=gen, dtype=DT), torch.randn(*lead, L, d, generator=gen, dtype=DT)


def _close(A, B, tol=1e-10):
    err = float((A - B).abs().max())
    assert err <= tol * max(1.0, float(B.abs().max())), err


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{a}={b}" for a, b in v.items()) or "plain")
def test_hessian_parts_match_autograd(gen, seed, variant):
    X, M, Y = _problem(gen, *SHAPES[seed])
    H = autograd_energy_layer_hessian(X, M, Y, **variant)
    H_o = autograd_energy_layer_ggn(X, M, Y, **variant)
    _close(energy_layer_hessian(X, M, Y, **variant), H)
    _close(energy_layer_hessian(X, M, Y, part="H_o", **variant), H_o)
    _close(energy_layer_hessian(X, M, Y, part="H_f", **variant), H - H_o)


@pytest.mark.parametrize("tied", [False, True])
def test_jacobian_matches_autograd(gen, tied):
    X, M, _ = _problem(gen, 2, 4, 3, 5)
    d, k = M.shape
    J = torch.func.jacrev(lambda m: energy_layer_output(X, m.reshape(d, k), alpha=0.8, tied=tied).reshape(-1))(
        M.reshape(-1)
    )
    _close(energy_layer_jacobian(X, M, alpha=0.8, tied=tied), J)


def test_layer_is_the_energy_step(gen):
    """F_(a) / F_(b) are AttentionEnergy(M).step with the metric / token preconditioner (MATH §1.1)."""
    X, M, _ = _problem(gen, 2, 5, 3, 4)
    E = AttentionEnergy(M)
    P = X @ M
    s = 0.5
    beta = -0.5 * s * (P * P).sum(-1)
    _close(attention_weights(P, P, scale=s, key_bias=beta), softmax_beta(X, metric(M)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step sizes outside the guaranteed range are fine for an identity check
        for alpha in (0.4, 1.0):
            _close(energy_layer_output(X, M, alpha=alpha), E.step(X, alpha, preconditioner="metric"))
            _close(energy_layer_output(X, M, alpha=alpha, tied=True), E.step(X, alpha, preconditioner="token"))


def test_errors(gen):
    X, M, Y = _problem(gen, 2, 4, 3, 2)
    with pytest.raises(EnergyInputError, match="`M`"):
        energy_layer_hessian(X, M[:2], Y)
    with pytest.raises(EnergyInputError, match="`Y`"):
        energy_layer_hessian(X, M, Y[:, :3])
    with pytest.raises(EnergyInputError, match="alpha"):
        energy_layer_hessian(X, M, Y, alpha=float("nan"))
    with pytest.raises(EnergyInputError, match="part"):
        energy_layer_hessian(X, M, Y, part="GGN")
    with pytest.raises(DenseSizeError, match="GiB"):
        energy_layer_hessian(X, M, Y, max_gib=1e-12)
