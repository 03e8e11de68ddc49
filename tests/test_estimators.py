"""Estimators vs exact values on small dense cases: convergence with samples, standard errors, Lanczos vs eigsh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import DT
from scipy.sparse.linalg import LinearOperator as ScipyOp
from scipy.sparse.linalg import eigsh
from torch import nn

from energy._validation import EnergyInputError
from energy.hessian.estimators import (
    hutchinson_diagonal,
    hutchinson_squared_frobenius,
    hutchinson_trace,
    hutchpp_squared_frobenius,
    hutchpp_trace,
)
from energy.hessian.krylov import lanczos, slq_density
from energy.hessian.operators import HessianOperator


def _sym(n: int, gen: torch.Generator, *, decay: float = 0.0) -> torch.Tensor:
    """Symmetric test matrix with a few outlying eigenvalues (both signs) and a bulk; ``decay`` > 0 makes it
    low-rank-dominated (for Hutch++)."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    bulk = torch.randn(n - 6, generator=gen, dtype=DT) * (0.3 if decay == 0 else decay)
    lam = torch.cat([torch.tensor([-4.0, -3.0, -2.5], dtype=DT), bulk, torch.tensor([2.0, 3.5, 6.0], dtype=DT)])
    return (Q * lam) @ Q.T


def _mean_abs_errors(estimator, A, exact, counts, reps, seed):
    g = torch.Generator().manual_seed(seed)
    return [float(np.mean([abs(estimator(A, s, generator=g).value - exact) for _ in range(reps)])) for s in counts]


# ---------------------------------------------------------------------------------------------------------------
# Hutchinson family
# ---------------------------------------------------------------------------------------------------------------


def test_hutchinson_trace_converges_and_is_calibrated(seed):
    A = _sym(101, torch.Generator().manual_seed(seed))
    exact = float(torch.trace(A))
    errs = _mean_abs_errors(hutchinson_trace, A, exact, [4, 16, 64], reps=40, seed=seed)
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.75 * errs[0] / 2  # ~1/√S: 16× the samples, ~4× smaller error
    z = [(e.value - exact) / e.stderr for e in (hutchinson_trace(A, 32, generator=torch.Generator().manual_seed(s))
                                                for s in range(60))]
    assert abs(np.mean(z)) < 0.5 and 0.6 < np.std(z) < 1.5  # standard errors are honest
    assert max(abs(x) for x in z) < 5


def test_hutchinson_reproducible_with_generator():
    A = _sym(31, torch.Generator().manual_seed(0))
    a = hutchinson_trace(A, 10, generator=torch.Generator().manual_seed(7))
    b = hutchinson_trace(A, 10, generator=torch.Generator().manual_seed(7))
    c = hutchinson_trace(A, 10, generator=torch.Generator().manual_seed(8))
    assert a == b and a.value != c.value
    assert hutchinson_trace(A, 10) == hutchinson_trace(A, 10)  # default generator is seeded


def test_hutchinson_diagonal_converges(seed):
    A = _sym(61, torch.Generator().manual_seed(seed))
    d = torch.diagonal(A)
    g = torch.Generator().manual_seed(seed)
    errs = [float(np.mean([(hutchinson_diagonal(A, s, generator=g).value - d).abs().mean() for _ in range(10)]))
            for s in (4, 16, 60)]
    assert errs[0] > errs[1] > errs[2]
    est = hutchinson_diagonal(A, 60, generator=g)
    inside = ((est.value - d).abs() <= 3 * est.stderr).double().mean()
    assert inside > 0.9 and est.value.shape == (61,) and est.num_matvecs == 60


def test_hutchinson_squared_frobenius_rectangular(seed):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(37, 53, generator=gen, dtype=DT)  # m != n: probes live in R^53
    exact = float((A**2).sum())
    errs = _mean_abs_errors(hutchinson_squared_frobenius, A, exact, [4, 16, 50], reps=30, seed=seed)
    assert errs[0] > errs[1] > errs[2]
    est = hutchinson_squared_frobenius(A, 50, generator=gen, distribution="normal")
    assert abs(est.value - exact) < 5 * est.stderr


def test_hutchpp_beats_hutchinson_on_decaying_spectrum(seed):
    A = _sym(151, torch.Generator().manual_seed(seed), decay=0.01)
    tr, fro = float(torch.trace(A)), float((A**2).sum())
    g = torch.Generator().manual_seed(seed)
    e_h = np.mean([abs(hutchinson_trace(A, 30, generator=g).value - tr) for _ in range(20)])
    e_pp = np.mean([abs(hutchpp_trace(A, 30, generator=g).value - tr) for _ in range(20)])
    assert e_pp < 0.2 * e_h
    f_h = np.mean([abs(hutchinson_squared_frobenius(A, 30, generator=g).value - fro) for _ in range(20)])
    f_pp = np.mean([abs(hutchpp_squared_frobenius(A, 30, generator=g).value - fro) for _ in range(20)])
    assert f_pp < 0.2 * f_h
    est = hutchpp_trace(A, 30, generator=g)
    assert est.num_matvecs == 30 and abs(est.value - tr) < 5 * est.stderr + 1e-12
    est = hutchpp_squared_frobenius(A, 30, generator=g)
    assert abs(est.value - fro) < 5 * est.stderr + 1e-12


def test_too_many_samples_error_or_exact():
    A = _sym(13, torch.Generator().manual_seed(1))
    for fn in (hutchinson_trace, hutchinson_diagonal, hutchinson_squared_frobenius, hutchpp_trace,
               hutchpp_squared_frobenius):
        with pytest.raises(EnergyInputError, match="exceeds the dimension n=13"):
            fn(A, 14)
    assert hutchinson_trace(A, 14, exact_if_cheaper=True) == (pytest.approx(float(torch.trace(A)), abs=1e-12), 0.0,
                                                              13)
    d = hutchinson_diagonal(A, 20, exact_if_cheaper=True)
    assert torch.allclose(d.value, torch.diagonal(A)) and float(d.stderr.abs().max()) == 0
    assert hutchinson_squared_frobenius(A, 99, exact_if_cheaper=True).value == pytest.approx(float((A**2).sum()))
    assert hutchpp_trace(A, 15, exact_if_cheaper=True).value == pytest.approx(float(torch.trace(A)))
    with pytest.raises(EnergyInputError, match="≥ 1"):
        hutchinson_trace(A, 0)
    with pytest.raises(EnergyInputError, match="≥ 3"):
        hutchpp_trace(A, 2)
    with pytest.raises(EnergyInputError, match="rademacher"):
        hutchinson_trace(A, 3, distribution="uniform")


def test_operator_kinds_accepted():
    A = _sym(21, torch.Generator().manual_seed(2))
    ref = hutchinson_trace(A, 7, generator=torch.Generator().manual_seed(0)).value
    by_callable = hutchinson_trace(lambda v: A @ v, 7, dim=21, generator=torch.Generator().manual_seed(0)).value
    sp = ScipyOp((21, 21), matvec=lambda x: A.numpy() @ x, matmat=lambda X: A.numpy() @ X, dtype=np.float64)
    by_scipy = hutchinson_trace(sp, 7, generator=torch.Generator().manual_seed(0)).value
    assert by_callable == pytest.approx(ref, abs=1e-12) and by_scipy == pytest.approx(ref, abs=1e-12)

    class MatvecOnly:
        shape = (21, 21)

        def matvec(self, v: torch.Tensor) -> torch.Tensor:
            return A @ v

    by_matvec = hutchinson_trace(MatvecOnly(), 7, generator=torch.Generator().manual_seed(0)).value
    assert by_matvec == pytest.approx(ref, abs=1e-12)
    with pytest.raises(EnergyInputError, match="needs `dim`"):
        hutchinson_trace(lambda v: A @ v, 7)
    with pytest.raises(EnergyInputError, match="square"):
        hutchinson_trace(torch.zeros(3, 4, dtype=DT), 2)


# ---------------------------------------------------------------------------------------------------------------
# Lanczos and SLQ
# ---------------------------------------------------------------------------------------------------------------


def test_lanczos_top_and_bottom_vs_eigsh(seed):
    A = _sym(143, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    top = lanczos(A, 3, which="LA", generator=g)
    bottom = lanczos(A, 2, which="SA", generator=g)
    ref_top = np.sort(eigsh(A.numpy(), k=3, which="LA")[0])[::-1]
    ref_bottom = np.sort(eigsh(A.numpy(), k=2, which="SA")[0])
    assert top.converged and bottom.converged
    assert np.allclose(top.eigenvalues.numpy(), ref_top, atol=1e-8)
    assert np.allclose(bottom.eigenvalues.numpy(), ref_bottom, atol=1e-8)
    for r in (top, bottom):
        resid = A @ r.eigenvectors - r.eigenvectors * r.eigenvalues
        assert resid.norm(dim=0).max() < 1e-6
        assert torch.allclose(r.eigenvectors.T @ r.eigenvectors, torch.eye(r.eigenvectors.shape[1], dtype=DT),
                              atol=1e-8)
    lm = lanczos(A, 2, which="LM", generator=g)
    assert np.allclose(lm.eigenvalues.numpy(), [6.0, -4.0], atol=1e-8)


def test_lanczos_full_dimension_and_breakdown():
    """k = n with a rank-deficient matrix with repeated eigenvalues: restarts after breakdown give all of them."""
    lam = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0], dtype=DT)
    Q, _ = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(0), dtype=DT))
    A = (Q * lam) @ Q.T
    r = lanczos(A, 7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(r.eigenvalues, lam, atol=1e-10)
    with pytest.raises(EnergyInputError, match="k ≤ n"):
        lanczos(A, 8)
    with pytest.raises(EnergyInputError, match="'LA'"):
        lanczos(A, 2, which="BE")
    with pytest.warns(RuntimeWarning, match="not converged"):
        lanczos(_sym(201, torch.Generator().manual_seed(0)), 3, which="LA", max_iter=5, tol=1e-14)


def test_lanczos_on_hessian_operator_vs_dense():
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X, y = torch.randn(13, 4, generator=gen, dtype=DT), torch.randn(13, 3, generator=gen, dtype=DT)
    H = HessianOperator(model, nn.MSELoss(), None, [(X[:6], y[:6]), (X[6:], y[6:])])
    evals = torch.linalg.eigvalsh(H.dense())
    r = lanczos(H, 2, generator=gen, max_iter=H.shape[0])
    assert torch.allclose(r.eigenvalues, evals.flip(0)[:2], atol=1e-9)
    b = lanczos(H.to_scipy(), 1, which="SA", generator=gen, max_iter=H.shape[0])
    assert torch.allclose(b.eigenvalues, evals[:1], atol=1e-9)


def test_slq_quadrature_converges(seed):
    A = _sym(97, torch.Generator().manual_seed(seed))
    exact_m2 = float((A**2).sum()) / 97  # (1/n) tr A²: degree 2 < 2m, so only the probe average is random
    exact_m1 = float(torch.trace(A)) / 97
    g = torch.Generator().manual_seed(seed)
    errs = []
    for probes in (2, 8, 32):
        errs.append(np.mean([abs(slq_density(A, probes, 15, generator=g).quadrature(lambda t: t**2) - exact_m2)
                             for _ in range(8)]))
    assert errs[0] > errs[1] > errs[2]
    d = slq_density(A, 20, 25, generator=g)
    assert torch.allclose(d.weights.sum(), torch.tensor(1.0, dtype=DT), atol=1e-12)
    assert abs(d.quadrature(lambda t: t) - exact_m1) < 0.1
    mass = torch.trapezoid(d.density, d.grid)
    assert abs(float(mass) - 1.0) < 1e-3
    assert float(d.nodes.max()) == pytest.approx(6.0, abs=1e-6) and float(d.nodes.min()) == pytest.approx(-4.0,
                                                                                                          abs=1e-6)


def test_slq_exact_when_steps_equal_dimension_and_bad_input():
    """With m = n steps every probe's nodes are the eigenvalues of A (the Krylov space is all of R^n)."""
    A = _sym(9, torch.Generator().manual_seed(3))
    d = slq_density(A, 3, 9, generator=torch.Generator().manual_seed(0))
    evals = torch.linalg.eigvalsh(A)
    for p in range(3):
        assert torch.allclose(d.nodes[p].sort().values, evals, atol=1e-9)
        assert float(d.weights[p].sum()) == pytest.approx(1 / 3, abs=1e-12)
    with pytest.raises(EnergyInputError, match="num_steps.*exceeds the dimension n=9"):
        slq_density(A, 2, 10)
    with pytest.raises(EnergyInputError, match="num_probes"):
        slq_density(A, 0, 3)
