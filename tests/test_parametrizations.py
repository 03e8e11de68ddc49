"""Named constraint parametrisations (unfold.parametrizations, MATH §1.7)."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import DT
from torch import nn
from torch.nn.utils import parametrize

from energy._validation import ConstraintError, EnergyInputError
from energy.attention import metric
from tests._transforms import check_transforms
from unfold.parametrizations import (
    OrthogonalHeads,
    PSDMetric,
    SpectrumClip,
    SpectrumSquash,
    Symmetric,
    check_constraints,
    constraints_of,
    squash,
)


def _holder(name: str, value: torch.Tensor) -> nn.Module:
    m = nn.Module()
    setattr(m, name, nn.Parameter(value.clone()))
    return m


# ------------------------------------------------------------------------------------------------------ PSDMetric


@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 4), (3, 6, 2)])
def test_psd_metric_forward_is_energy_metric(gen, shape):
    M = torch.randn(*shape, generator=gen, dtype=DT)
    p = PSDMetric(k=shape[-1])
    W = p(M)
    torch.testing.assert_close(W, metric(M), rtol=0, atol=1e-14)
    torch.testing.assert_close(W, M @ M.transpose(-1, -2) / math.sqrt(shape[-1]), rtol=0, atol=1e-14)
    assert torch.linalg.eigvalsh(W).min() > -1e-12


def test_psd_metric_as_parametrization_roundtrip(gen):
    d, k = 5, 3
    W0 = metric(torch.randn(d, k, generator=gen, dtype=DT))
    m = _holder("W", W0)
    parametrize.register_parametrization(m, "W", PSDMetric(k))  # stored original: a factor M (d×k)
    assert m.W.shape == (d, d) and m.parametrizations.W.original.shape == (d, k)
    torch.testing.assert_close(m.W, W0, rtol=0, atol=1e-12)
    target = metric(torch.randn(d, k, generator=gen, dtype=DT))
    m.W = target  # right_inverse: checked factorisation
    torch.testing.assert_close(m.W, target, rtol=0, atol=1e-12)
    assert m.parametrizations.W.original.shape == (d, k)


def test_psd_metric_check_errors(gen):
    p = PSDMetric(k=2)
    A = torch.randn(4, 4, generator=gen, dtype=DT)
    with pytest.raises(ConstraintError, match="PSDMetric.*symmetric"):
        p.check(A)
    with pytest.raises(ConstraintError, match="PSDMetric.*positive semi-definite"):
        p.check(-(A @ A.T) - torch.eye(4, dtype=DT))
    with pytest.raises(ConstraintError, match="rank 4 > k = 2"):
        p.check(A @ A.T + torch.eye(4, dtype=DT))
    with pytest.raises(EnergyInputError, match="k"):
        PSDMetric(0)


# ------------------------------------------------------------------------------------------------------ Symmetric


def test_symmetric_forward_and_named_assignment(gen):
    A = torch.randn(4, 4, generator=gen, dtype=DT)
    torch.testing.assert_close(Symmetric()(A), 0.5 * (A + A.T), rtol=0, atol=0)
    m = _holder("W", A + A.T)
    parametrize.register_parametrization(m, "W", Symmetric())  # registration checks the current value
    with torch.no_grad():
        m.parametrizations.W.original.copy_(A)  # the unconstrained original may be anything
    torch.testing.assert_close(m.W, 0.5 * (A + A.T), rtol=0, atol=0)
    S = A + A.T + 1.0
    m.W = S
    torch.testing.assert_close(m.W, S, rtol=0, atol=1e-15)
    with pytest.raises(ConstraintError, match=r"Symmetric\(W = \(A \+ Aᵀ\)/2\) violated"):
        m.W = A  # never symmetrised silently
    assert list(constraints_of(m)) == ["W"]


# ---------------------------------------------------------------------------------------------------- SpectrumClip


def test_spectrum_clip_forward(gen):
    A = 2 * torch.randn(6, 6, generator=gen, dtype=DT)
    p = SpectrumClip(0.0, 0.95)
    W = p(A)
    torch.testing.assert_close(W, W.T, rtol=0, atol=1e-14)
    lam = torch.linalg.eigvalsh(W)
    assert lam.min() >= -1e-12 and lam.max() <= 0.95 + 1e-12
    # eigenvalues already inside the band are kept, eigenvectors are those of the symmetric part
    lam_s, V = torch.linalg.eigh(0.5 * (A + A.T))
    torch.testing.assert_close(W @ V, V * lam_s.clamp(0, 0.95), rtol=0, atol=1e-12)
    # identity on valid matrices (so right_inverse(W) = W is exact)
    torch.testing.assert_close(p(W), W, rtol=0, atol=1e-12)


def test_spectrum_clip_gradient_finite_and_matches_autograd_twin(gen):
    A = torch.randn(5, 5, generator=gen, dtype=DT, requires_grad=True)
    p = SpectrumClip(-0.5, 0.5)
    C = torch.randn(5, 5, generator=gen, dtype=DT)
    (g,) = torch.autograd.grad((p(A) * C).sum(), A)
    assert torch.isfinite(g).all()
    # finite-difference twin along a random direction
    D = torch.randn(5, 5, generator=gen, dtype=DT)
    eps = 1e-6
    with torch.no_grad():
        fd = ((p(A + eps * D) * C).sum() - (p(A - eps * D) * C).sum()) / (2 * eps)
    assert abs(float((g * D).sum()) - float(fd)) < 1e-6


def test_spectrum_clip_gradient_with_repeated_eigenvalues(gen):
    """Clipping creates repeated eigenvalues; the Daleckii–Krein backward stays finite and exact there."""
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=DT))
    lam = torch.tensor([-1.0, -1.0, 0.3, 0.3, 2.0], dtype=DT)
    A = ((Q * lam) @ Q.T).requires_grad_(True)
    C = torch.randn(5, 5, generator=gen, dtype=DT)
    p = SpectrumClip(0.0, 0.95)
    (g,) = torch.autograd.grad((p(A) * C).sum(), A)
    assert torch.isfinite(g).all()
    for _ in range(3):
        D = torch.randn(5, 5, generator=gen, dtype=DT)
        D = D + D.T
        eps = 1e-6
        with torch.no_grad():
            fd = ((p(A + eps * D) * C).sum() - (p(A - eps * D) * C).sum()) / (2 * eps)
        assert abs(float((g * D).sum()) - float(fd)) < 1e-6


def test_spectrum_clip_check_and_assignment(gen):
    m = _holder("W_f", torch.zeros(4, 4, dtype=DT))
    parametrize.register_parametrization(m, "W_f", SpectrumClip(0.0, 0.95))
    ok = torch.diag(torch.tensor([0.0, 0.3, 0.5, 0.95], dtype=DT))
    m.W_f = ok
    torch.testing.assert_close(m.W_f, ok, rtol=0, atol=1e-14)
    with pytest.raises(ConstraintError, match=r"SpectrumClip.*\[0, 0.95\].*eigenvalues in \[0, 1.5\]"):
        m.W_f = torch.diag(torch.tensor([0.0, 0.3, 0.5, 1.5], dtype=DT))
    with pytest.raises(ConstraintError, match="SpectrumClip.*symmetric"):
        m.W_f = torch.randn(4, 4, generator=gen, dtype=DT)
    torch.testing.assert_close(m.W_f, ok, rtol=0, atol=1e-14)  # failed assignments changed nothing
    with pytest.raises(EnergyInputError, match="lo ≤ hi"):
        SpectrumClip(1.0, 0.0)


# -------------------------------------------------------------------------------------- SpectrumSquash (MATH §7.3)


def test_spectrum_squash_forward_is_the_smooth_map_of_the_spectrum(gen):
    A = torch.randn(6, 6, generator=gen, dtype=DT)  # (tanh reaches ±1 in float64 beyond ~19 half-widths)
    W = SpectrumSquash(0.0, 0.95)(A)
    lam_s, V = torch.linalg.eigh(0.5 * (A + A.T))
    torch.testing.assert_close(W @ V, V * squash(lam_s, 0.0, 0.95), rtol=0, atol=1e-12)
    lam = torch.linalg.eigvalsh(W)
    assert bool((lam > 0).all()) and bool((lam < 0.95).all())
    # slope 1 at the centre of the band, and g(m) = m
    m = torch.tensor([0.475], dtype=DT, requires_grad=True)
    (slope,) = torch.autograd.grad(squash(m, 0.0, 0.95).sum(), m)
    assert float(slope) == pytest.approx(1.0, abs=1e-15) and float(squash(m, 0.0, 0.95)) == pytest.approx(0.475)


@pytest.mark.parametrize("repeated", [False, True])
def test_spectrum_squash_derivative_matches_autograd_through_eigh_and_finite_differences(gen, repeated):
    """Daleckii–Krein backward = autograd through eigh (distinct eigenvalues) and central differences (also with
    repeated eigenvalues, where autograd through eigh is not defined)."""
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=DT))
    lam = torch.tensor([-1.0, -1.0, 0.3, 0.3, 2.0] if repeated else [-1.3, -0.2, 0.3, 0.8, 2.0], dtype=DT)
    A = ((Q * lam) @ Q.T).requires_grad_(True)
    C = torch.randn(5, 5, generator=gen, dtype=DT)
    p = SpectrumSquash(-0.5, 0.5)
    (g,) = torch.autograd.grad((p(A) * C).sum(), A)
    if not repeated:
        def twin(S):
            e, U = torch.linalg.eigh(0.5 * (S + S.T))
            return ((U * squash(e, -0.5, 0.5).unsqueeze(-2)) @ U.T * C).sum()
        torch.testing.assert_close(g, torch.func.grad(twin)(A.detach()), rtol=1e-10, atol=1e-12)
    for _ in range(3):
        D = torch.randn(5, 5, generator=gen, dtype=DT)
        eps = 1e-6
        with torch.no_grad():
            fd = ((p(A + eps * D) * C).sum() - (p(A - eps * D) * C).sum()) / (2 * eps)
        assert abs(float((g * D).sum()) - float(fd)) < 1e-7


def test_spectrum_squash_right_inverse_is_exact_inside_and_refuses_the_edge(gen):
    m = _holder("W_f", 0.475 * torch.eye(4, dtype=DT))
    parametrize.register_parametrization(m, "W_f", SpectrumSquash(0.0, 0.95))
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=DT))
    ok = (Q * torch.tensor([0.01, 0.3, 0.5, 0.94], dtype=DT)) @ Q.T
    m.W_f = ok
    torch.testing.assert_close(m.W_f, ok, rtol=0, atol=1e-12)
    with pytest.raises(ConstraintError, match=r"SpectrumSquash.*edge.*spectrum_map='clip'"):
        m.W_f = torch.diag(torch.tensor([0.0, 0.3, 0.5, 0.9], dtype=DT))
    with pytest.raises(ConstraintError, match=r"SpectrumSquash.*eigenvalues in \[0, 1.5\]"):
        m.W_f = torch.diag(torch.tensor([0.0, 0.3, 0.5, 1.5], dtype=DT))
    with pytest.raises(EnergyInputError, match="lo < hi"):
        SpectrumSquash(0.5, 0.5)


# ------------------------------------------------------------------------------------------------ OrthogonalHeads


def _orth_heads(gen, h, d, k):
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
    R = torch.randn(h, k, k, generator=gen, dtype=DT)
    return Q[:, : h * k].reshape(d, h, k).permute(1, 0, 2) @ R


def test_orthogonal_heads_roundtrip_and_training_keeps_constraint(gen):
    h, d, k = 3, 7, 2
    M0 = _orth_heads(gen, h, d, k)
    m = _holder("M", M0)
    m.double()
    parametrize.register_parametrization(m, "M", OrthogonalHeads(h, d, k).double())
    torch.testing.assert_close(m.M, M0, rtol=0, atol=1e-12)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    target = torch.randn(h, d, k, generator=gen, dtype=DT)
    for _ in range(5):
        loss = ((m.M - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    M = m.M.detach()
    assert not torch.allclose(M, M0)  # it trained
    G = torch.einsum("hdk,gdl->hgkl", M, M)
    for a in range(h):
        for b in range(h):
            if a != b:
                assert G[a, b].abs().max() < 1e-12
    check_constraints(m)


def test_orthogonal_heads_errors(gen):
    with pytest.raises(EnergyInputError, match=r"heads·k ≤ d"):
        OrthogonalHeads(3, 5, 2)
    p = OrthogonalHeads(2, 5, 2).double()
    with pytest.raises(ConstraintError, match=r"OrthogonalHeads.*M_hᵀ M_g"):
        p.check(torch.randn(2, 5, 2, generator=gen, dtype=DT))
    with pytest.raises(ConstraintError, match="shape"):
        p.check(torch.randn(2, 5, 3, generator=gen, dtype=DT))


def test_check_constraints_flags_nan():
    m = _holder("W", torch.eye(3, dtype=DT))
    parametrize.register_parametrization(m, "W", Symmetric())
    with torch.no_grad():
        m.parametrizations.W.original.fill_(float("nan"))
    with pytest.raises(ConstraintError, match="NaN"):
        check_constraints(m)


# --------------------------------------------------------------- purity: every torch.func transform, float64


def _constraint_cases(gen):
    return {
        "psd": (PSDMetric(2).double(), torch.randn(2, 4, 2, generator=gen, dtype=DT)),
        "symmetric": (Symmetric(), torch.randn(4, 4, generator=gen, dtype=DT)),
        "clip": (SpectrumClip(-0.5, 0.5), torch.randn(4, 4, generator=gen, dtype=DT)),
        "orthogonal": (OrthogonalHeads(2, 5, 2).double(), torch.randn(2, 2, 2, generator=gen, dtype=DT)),
    }


@pytest.mark.parametrize("name", ["psd", "symmetric", "clip", "orthogonal"])
def test_parametrization_forward_under_every_transform(gen, name):
    """A parametrisation's forward reads no value: grad, vjp, jvp, linearize, vmap and hessian pass through it and
    agree with autograd; the first derivative also with central differences (SpectrumClip's is custom)."""
    c, x = _constraint_cases(gen)[name]
    U = torch.randn(c(x).shape, generator=gen, dtype=DT)
    v = torch.randn(x.shape, generator=gen, dtype=DT)
    eps = 1e-6
    with torch.no_grad():
        jvp_fd = (c(x + eps * v) - c(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(torch.func.jvp(c, (x,), (v,))[1], jvp_fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.func.vmap(c)(torch.stack([x, 2 * x])), torch.stack([c(x), c(2 * x)]),
                               rtol=1e-12, atol=1e-12)
    # SpectrumClip's second derivative holds the eigendecomposition fixed (documented): first order only
    check_transforms(c, lambda z: (c(z) * U).sum() + (c(z) ** 2).sum(), x, U, v, second_order=name != "clip")
