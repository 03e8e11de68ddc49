"""Yang et al. 2022 figs 1-4 (MATH §1.8): closed forms vs autograd or brute force, each compute at a tiny size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import randn

from paper_figs import yang2022_synthetic as ys
from paper_figs.io import decode_array
from paper_figs.registry import FigureConfig

TOL = 1e-10


def _problem(gen: torch.Generator, n: int = 7, d: int = 5) -> ys.AlternatingProblem:
    return ys.make_alternating_problem(n, d, gen)


def _autograd(f, Y: torch.Tensor) -> torch.Tensor:
    Y = Y.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(Y), Y)
    return g


# ----------------------------------------------------------------------------------------------------------------------
# Figs 2-3: the two energies
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(7, 5), (4, 9), (1, 3)])
def test_gradients_closed_form_match_autograd(gen, n, d):
    p = _problem(gen, n, d)
    Y = randn(n, d, gen=gen)
    g1 = _autograd(lambda Z: ys.e1(Z, p.W1, p.B1), Y)
    g2 = _autograd(lambda Z: ys.e2(Z, p.W2, p.B2), Y)
    torch.testing.assert_close(ys.grad_e1(Y, p.W1, p.B1), g1, rtol=0, atol=TOL)
    torch.testing.assert_close(ys.grad_e2(Y, p.W2, p.B2), g2, rtol=0, atol=TOL)
    # e2 mixes tokens, e1 does not: permuting tokens commutes with the e1 gradient only
    perm = torch.randperm(n, generator=gen)
    torch.testing.assert_close(ys.grad_e1(Y[perm], p.W1, p.B1[perm]), ys.grad_e1(Y, p.W1, p.B1)[perm],
                               rtol=0, atol=TOL)


def test_energies_match_their_definitions(gen):
    p = _problem(gen)
    Y = randn(7, 5, gen=gen)
    e1 = torch.linalg.matrix_norm(Y @ p.W1) ** 2 + torch.linalg.matrix_norm(Y - p.B1) ** 2
    e2 = torch.linalg.matrix_norm(p.W2 @ Y) ** 2 + torch.linalg.matrix_norm(Y - p.B2) ** 2
    torch.testing.assert_close(ys.e1(Y, p.W1, p.B1), e1, rtol=1e-13, atol=0)
    torch.testing.assert_close(ys.e2(Y, p.W2, p.B2), e2, rtol=1e-13, atol=0)
    torch.testing.assert_close(ys.total_energy(Y, p), e1 + e2, rtol=1e-13, atol=0)


def test_problem_follows_the_protocol(gen):
    p = ys.make_alternating_problem(6, 4, gen)
    assert p.W1.shape == (4, 4) and p.W2.shape == (6, 6) and p.Y0.shape == p.B1.shape == p.B2.shape == (6, 4)
    assert p.W1.dtype == torch.float64
    assert 0 <= float(p.B1.min()) and float(p.B1.max()) < 1 and float(p.Y0.max()) < 2


def test_exact_minimiser_is_stationary_and_reached_by_gradient_descent(gen):
    p = _problem(gen, 9, 4)
    Y_star = ys.exact_minimiser(p)
    g = _autograd(lambda Z: ys.total_energy(Z, p), Y_star)
    assert float(g.abs().max()) < TOL
    Y_gd = ys.gradient_descent_on_sum(p, 2000, 0.01)
    torch.testing.assert_close(Y_gd, Y_star, rtol=0, atol=1e-9)
    E_star = ys.total_energy(Y_star, p)
    for _ in range(5):  # a strict minimum: random perturbations increase E
        assert ys.total_energy(Y_star + 1e-3 * randn(9, 4, gen=gen), p) > E_star


def test_alternating_descent_parity_and_recorded_energies(gen):
    p = _problem(gen)
    lr = 0.05
    run = ys.alternating_descent(p, 5, lr)
    Y1 = p.Y0 - lr * ys.grad_e1(p.Y0, p.W1, p.B1)  # step 0 is on e1
    Y2 = Y1 - lr * ys.grad_e2(Y1, p.W2, p.B2)  # step 1 is on e2
    torch.testing.assert_close(run["iterates"][0], Y1, rtol=0, atol=TOL)
    torch.testing.assert_close(run["iterates"][1], Y2, rtol=0, atol=TOL)
    for t in range(5):
        torch.testing.assert_close(run["E"][t], ys.total_energy(run["iterates"][t], p), rtol=1e-13, atol=0)


def test_alternating_fixed_point_is_the_limit_2_cycle(gen):
    p = _problem(gen, 6, 5)
    lr = 0.05
    fp = ys.alternating_fixed_point(p, lr)
    Y_even, Y_odd = fp["Y_even"], fp["Y_odd"]
    # an e1 step maps Y_odd to Y_even, an e2 step maps Y_even back to Y_odd
    torch.testing.assert_close(Y_odd - lr * ys.grad_e1(Y_odd, p.W1, p.B1), Y_even, rtol=0, atol=TOL)
    torch.testing.assert_close(Y_even - lr * ys.grad_e2(Y_even, p.W2, p.B2), Y_odd, rtol=0, atol=TOL)
    # the contraction rate is the spectral radius of the linear part of one (e1, e2) pair of steps
    n, d = p.Y0.shape
    step1 = torch.kron(torch.eye(n, dtype=torch.float64), (1 - 2 * lr) * torch.eye(d, dtype=torch.float64)
                       - 2 * lr * p.W1 @ p.W1.T)  # vec_r(Y R1) = (I ⊗ R1ᵀ) vec_r(Y), R1 symmetric
    step2 = torch.kron((1 - 2 * lr) * torch.eye(n, dtype=torch.float64) - 2 * lr * p.W2.T @ p.W2,
                       torch.eye(d, dtype=torch.float64))
    rho = float(torch.linalg.eigvals(step2 @ step1).abs().max())
    assert math.isclose(fp["rho"], rho, rel_tol=1e-10)
    if fp["rho"] < 1:  # then the iterates approach the cycle
        run = ys.alternating_descent(p, 400, lr)
        torch.testing.assert_close(run["iterates"][-1], Y_odd, rtol=0, atol=1e-6)


def test_pca2_matches_svd(gen):
    X = randn(12, 40, gen=gen) @ torch.diag(torch.linspace(3, 0.1, 40,
                                                                                             dtype=torch.float64))
    mean, comps, evr = ys.pca2(X)
    _, S, Vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    torch.testing.assert_close(comps.abs(), Vh[:2].abs(), rtol=0, atol=1e-9)
    torch.testing.assert_close(evr, S[:2] ** 2 / (S**2).sum(), rtol=1e-10, atol=0)
    torch.testing.assert_close(comps @ comps.T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-10)
    assert float(comps[0, comps[0].abs().argmax()]) > 0


def test_alternating_figures_tiny(seed):
    cfg = FigureConfig(fidelity="tiny", seed=seed)
    energy = ys.compute_alternating_energy(cfg)
    trace = ys.compute_alternating_trace(cfg)
    E = np.asarray(energy["E"])
    assert E.shape == (energy["steps"],) and np.isfinite(E).all()
    assert energy["E_star"] <= E.min()  # the exact minimiser of the sum is below every iterate
    assert math.isclose(energy["E_ref"], energy["E_star"], rel_tol=1e-9)  # tiny runs the 600-step reference
    np.testing.assert_allclose(E, np.asarray(energy["e1"]) + np.asarray(energy["e2"]), rtol=1e-13)
    assert np.asarray(trace["pca_traj"]).shape == (energy["steps"], 2)
    assert np.asarray(trace["pca_cycle"]).shape == (2, 2)
    s_energy = ys.summarize_alternating_energy(energy)
    assert s_energy["n_increases"]["value"] == int((np.diff(np.r_[energy["E0"], E]) > 0).sum())
    assert s_energy["E(Y_h*)_vs_exact_min"]["matches"] is True
    assert ys.summarize_alternating_trace(trace)["reference_Y_h*_error"]["matches"] is True


def test_alternating_quick_uses_exact_reference():
    cfg = FigureConfig(fidelity="quick", seed=1, sizes={"n": 8, "d": 3, "steps": 6})
    data = ys.compute_alternating_energy(cfg)
    assert data["ref_steps"] == 0 and data["E_ref"] == data["E_star"]
    assert "E(Y_h*)_vs_exact_min" not in ys.summarize_alternating_energy(data)


# ----------------------------------------------------------------------------------------------------------------------
# Fig 1: Apollonius regions
# ----------------------------------------------------------------------------------------------------------------------


def test_grid_axis_half_open():
    a = ys.grid_axis(-3.5, 3.5, 0.02)
    assert len(a) == 350 and float(a[0]) == -3.5 and float(a[-1]) < 3.5
    assert math.isclose(float(a[-1]), 3.48, abs_tol=1e-12)


def test_apollonius_region_and_circle(gen):
    y_f = randn(2, gen=gen)
    y_h = randn(2, gen=gen)
    X = 4 * randn(2000, 2, gen=gen)
    ratio = torch.linalg.vector_norm(X - y_f, dim=-1) / torch.linalg.vector_norm(X - y_h, dim=-1)
    prev = torch.zeros(2000, dtype=torch.bool)
    for C in (0.3, 0.7, 1.5, 3.0):
        mask = ys.apollonius_region(X, y_f, y_h, C)
        assert torch.equal(mask, ratio <= C)
        assert bool((mask | ~prev).all())  # regions grow with C
        prev = mask
        c, r = ys.apollonius_circle(y_f, y_h, C)
        angles = torch.linspace(0, 2 * math.pi, 17, dtype=torch.float64)
        on = c + r * torch.stack([angles.cos(), angles.sin()], -1)
        ratio_on = torch.linalg.vector_norm(on - y_f, dim=-1) / torch.linalg.vector_norm(on - y_h, dim=-1)
        torch.testing.assert_close(ratio_on, torch.full_like(ratio_on, C), rtol=1e-10, atol=0)
        assert bool(ys.apollonius_region(y_f, y_f, y_h, C)) and not bool(ys.apollonius_region(y_h, y_f, y_h, C))
    with pytest.raises(ValueError, match="C must be positive and != 1"):
        ys.apollonius_circle(y_f, y_h, 1.0)


def test_apollonius_figure_tiny(seed):
    data = ys.compute_apollonius(FigureConfig(fidelity="tiny", seed=seed))
    assert [p["C"] for p in data["panels"]] == [0.7, 1.5]
    fractions = [p["fraction"] for p in data["panels"]]
    assert 0 < fractions[0] < fractions[1] < 1  # monotone in C
    for p in data["panels"]:
        mask = decode_array(p["mask"])
        assert mask.shape == (data["n_grid"], data["n_grid"]) == (70, 70)
        assert math.isclose(mask.mean(), p["fraction"])
    for rec in ys.summarize_apollonius(data).values():
        assert rec["matches"] in (True, None)  # grid area agrees with the closed-form disc where it applies


def test_apollonius_mask_orientation():
    """Row index = x2, column index = x1 (what imshow(origin='lower') expects)."""
    cfg = FigureConfig(fidelity="tiny", seed=23333)
    data = ys.compute_apollonius(cfg)
    mask = decode_array(data["panels"][0]["mask"])
    axis = ys.grid_axis(-3.5, 3.5, data["step"]).numpy()
    i, j = 5, 50
    x = torch.tensor([axis[j], axis[i]], dtype=torch.float64)
    assert mask[i, j] == bool(ys.apollonius_region(x, torch.as_tensor(data["y_f"]), torch.as_tensor(data["y_h"]), 0.7))


# ----------------------------------------------------------------------------------------------------------------------
# Fig 4: divergence regions
# ----------------------------------------------------------------------------------------------------------------------


def test_divergence_formula_and_bounds(gen):
    A = randn(2, 2, gen=gen)
    W, b, alpha = A @ A.T, randn(1, 2, gen=gen), 0.25
    x = torch.tensor([0.3, -1.2], dtype=torch.float64)
    s = alpha * (x @ W + x - b[0])
    expected = sum(min(0.0, float(x[k] ** 2 - s[k] ** 2)) for k in range(2)) / float(s @ s)
    assert math.isclose(float(ys.divergence(x, W, b, alpha)), expected, rel_tol=1e-12)
    # s = alpha * grad h with h(x) = x W x^T / 2 + ||x - b||^2 / 2
    xg = x.clone().requires_grad_(True)
    h = 0.5 * xg @ W @ xg + 0.5 * ((xg - b[0]) ** 2).sum()
    (gh,) = torch.autograd.grad(h, xg)
    torch.testing.assert_close(ys.divergence_step(x, W, b, alpha)[0], alpha * gh, rtol=0, atol=TOL)
    X = 5 * randn(5000, 2, gen=gen)
    div = ys.divergence(X, W, b, alpha)
    assert float(div.min()) >= -1 and float(div.max()) <= 0
    # undefined (NaN) exactly where the step vanishes: with W = 0 that is x = b
    assert torch.isnan(ys.divergence(b, torch.zeros(2, 2, dtype=torch.float64), b, alpha)).all()


def test_divergence_figure_tiny(seed):
    data = ys.compute_divergence(FigureConfig(fidelity="tiny", seed=seed))
    fractions = [p["fraction"] for p in data["panels"]]
    assert [p["kappa"] for p in data["panels"]] == [0.2, 0.4, 0.6, 0.8]
    assert all(a <= b for a, b in zip(fractions, fractions[1:]))  # regions grow with kappa
    assert -1 <= data["div_min"] <= data["div_max"] <= 0
    W = torch.as_tensor(data["W"])
    torch.testing.assert_close(torch.as_tensor(data["x_star"]) @ (W + torch.eye(2, dtype=torch.float64)),
                               torch.as_tensor(data["b"]), rtol=0, atol=TOL)
    assert ys.summarize_divergence(data)["div_range_within_[-1,0]"]["matches"] is True


# ----------------------------------------------------------------------------------------------------------------------
# the four figures end to end through the CLI (tiny sizes)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_yang_synthetic_figures_through_cli(tmp_path):
    import json

    from paper_figs.__main__ import main

    names = ["yang2022-apollonius", "yang2022-alternating-trace", "yang2022-alternating-energy", "yang2022-divergence"]
    assert main([*names, "--tiny", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["figures"]
    for name in names:
        assert (tmp_path / f"{name}.png").exists() and (tmp_path / f"{name}.pdf").exists()
        assert summary[name]["status"] == "ok"
        assert summary[name]["matches"] is not False
    assert summary["yang2022-apollonius"]["seed"] == 23333 and summary["yang2022-alternating-trace"]["seed"] == 233
