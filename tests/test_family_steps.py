"""The steps of the new families (MATH §7.2–§7.6): closed forms against autograd, guarantees as property tests
(float64), and the limits of every guarantee detected."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from energy import StepSizeWarning
from energy._validation import EnergyInputError
from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy
from energy.ffn import FFNEnergy
from tests._transforms import check_transforms
from unfold.certificate import descent_certificate
from unfold.energy_ffn import (
    ACTIVATIONS,
    GELU_NEG_SLOPE,
    EnergyMLPStep,
    MLPEnergy,
    gated_jacobian_asymmetry,
    mlp_curvature_bound,
    mlp_energy,
    mlp_grad,
)
from unfold.recurrent import RecurrentUnrolled
from unfold.sphere import (
    BoundedAttentionStep,
    SphereAttentionStep,
    SphereFFNStep,
    SphereMLPStep,
    attention_grad_and_curvature,
    head_lambda_max,
)
from unfold.steps import AttentionStep, FFNStep
from unfold.unroller import Unrolled

f64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _on_sphere(Y: torch.Tensor, r: float) -> torch.Tensor:
    return r * Y / torch.linalg.vector_norm(Y, dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------------- sphere (§7.5)


@pytest.mark.parametrize("shape", [(1, 1, 5, 1, 1), (2, 4, 5, 2, 3), (3, 6, 4, 3, 2), (1, 3, 7, 2, 2)])
def test_sphere_attention_gradient_and_curvature_match_autograd(seed, shape):
    """∇E_att (closed form) = autograd of the project's energy; μ_i = Σ_h D^h_ii λ_max(W_h) from explicit parts."""
    b, n, d, h, k = shape
    g = _gen(seed)
    M = torch.randn(h, d, k, dtype=f64, generator=g)
    Y = torch.randn(b, n, d, dtype=f64, generator=g)
    kappa = 1 / math.sqrt(k)
    grad, mu = attention_grad_and_curvature(Y, M, kappa)
    E = AttentionEnergy(M[0]) if h == 1 else MultiHeadAttentionEnergy(M)
    twin = torch.func.grad(lambda Z: E.energy(Z).sum())(Y)
    torch.testing.assert_close(grad, twin, rtol=1e-10, atol=1e-12)
    W = kappa * M @ M.transpose(-1, -2)
    lam = torch.linalg.eigvalsh(W)[..., -1]
    torch.testing.assert_close(head_lambda_max(M, kappa), lam, rtol=1e-10, atol=0)
    z = 0.5 * torch.einsum("bijd,hde,bije->bhij", Y[:, :, None] - Y[:, None], W, Y[:, :, None] - Y[:, None])
    D = torch.exp(-z).sum(-1)  # (b, h, n)
    torch.testing.assert_close(mu, (D * lam[:, None]).sum(1), rtol=1e-10, atol=0)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), heads=st.sampled_from([1, 2, 3]),
       scale=st.sampled_from([0.3, 1.0, 3.0]), shift=st.floats(-3, 3))
def test_sphere_attention_majoriser_bounds_the_energy_everywhere(seed, n, heads, scale, shift):
    """The derivation itself: E(Y) ≤ E(X) + ⟨∇E(X), Y − X⟩ + Σ_i μ_i/2 ‖y_i − x_i‖² for any X, Y (MATH §7.5)."""
    g = _gen(seed)
    d, k = 6, 2
    M = torch.randn(heads, d, k, dtype=f64, generator=g) * scale
    X = torch.randn(2, n, d, dtype=f64, generator=g)
    Y = X + torch.randn(2, n, d, dtype=f64, generator=g) * math.exp(shift)
    E = MultiHeadAttentionEnergy(M) if heads > 1 else AttentionEnergy(M[0])
    grad, mu = attention_grad_and_curvature(X, M, 1 / math.sqrt(k))
    bound = E.energy(X) + ((Y - X) * grad).sum((-1, -2)) + 0.5 * (mu * ((Y - X) ** 2).sum(-1)).sum(-1)
    assert bool((E.energy(Y) <= bound + 1e-12 * bound.abs().clamp_min(1)).all())


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), heads=st.sampled_from([1, 2, 3]),
       eta=st.floats(0.01, 1.0), scale=st.sampled_from([0.5, 1.0, 4.0]))
def test_sphere_attention_step_descends_on_the_sphere(seed, n, heads, eta, scale):
    torch.manual_seed(seed)
    step = SphereAttentionStep(6, heads=heads, k=2, alpha=eta, init_std=scale).double()
    Y = _on_sphere(torch.randn(3, n, 6, dtype=f64, generator=_gen(seed)), step.radius)
    p = step.prepare()
    Y1 = step.forward_prepared(p, Y)
    torch.testing.assert_close(torch.linalg.vector_norm(Y1, dim=-1), torch.full((3, n), step.radius, dtype=f64))
    E0, E1 = step.energy_at(p, Y), step.energy_at(p, Y1)
    floor = step.rounding_scale(Y)  # E_att is a difference of O(n·h) kernel sums (see Step.rounding_scale)
    assert bool((E1 <= E0 + 1e-12 * E0.abs().clamp_min(floor)).all())


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), alpha_frac=st.floats(0.01, 1.0))
def test_sphere_ffn_step_descends_on_the_sphere(seed, n, alpha_frac):
    torch.manual_seed(seed)
    step = SphereFFNStep(5, alpha=alpha_frac / 1.95).double()
    with torch.no_grad():
        step.b.copy_(torch.randn(5, dtype=f64, generator=_gen(seed)) * 3)
    Y = _on_sphere(torch.randn(2, n, 5, dtype=f64, generator=_gen(seed + 1)), step.radius)
    p = step.prepare()
    E0, E1 = step.energy_at(p, Y), step.energy_at(p, step.forward_prepared(p, Y))
    assert bool((E1 <= E0 + 1e-12 * E0.abs()).all())


@given(seed=st.integers(0, 2**16), n=st.integers(1, 5), activation=st.sampled_from(sorted(ACTIVATIONS)),
       omega=st.floats(0.01, 1.0), scale=st.sampled_from([0.3, 1.0, 3.0]))
def test_sphere_mlp_step_descends_on_the_sphere(seed, n, activation, omega, scale):
    torch.manual_seed(seed)
    step = SphereMLPStep(4, hidden=5, activation=activation, alpha=omega, init_std=scale).double()
    with torch.no_grad():
        step.b.copy_(torch.randn(4, dtype=f64, generator=_gen(seed)) * 2)
    Y = _on_sphere(torch.randn(2, n, 4, dtype=f64, generator=_gen(seed + 1)), step.radius)
    p = step.prepare()
    Y1 = step.forward_prepared(p, Y)
    torch.testing.assert_close(torch.linalg.vector_norm(Y1, dim=-1), torch.full((2, n), step.radius, dtype=f64))
    E0, E1 = step.energy_at(p, Y), step.energy_at(p, Y1)
    assert bool((E1 <= E0 + 1e-12 * E0.abs().clamp_min(1)).all())


def test_sphere_limits_are_detected():
    """Outside the ranges: η > 1 / α > 1/1.95 warn, the certificate calls the steps unguaranteed and finds the
    increases (W_f = 0.95 I, b ≠ 0: an overshooting step moves away from b on the sphere)."""
    with pytest.warns(StepSizeWarning):
        body = Unrolled([("sphere_ffn", {"alpha": 30.0})], 1, 3).double()
    step = body.layer(0)[0]
    step.W_f = 0.95 * torch.eye(3, dtype=f64)
    with torch.no_grad():
        step.b.copy_(torch.tensor([1.0, 0.0, 0.0], dtype=f64))
    g = _gen(0)
    Y = _on_sphere(torch.tensor([1.0, 0.0, 0.0], dtype=f64) + 0.3 * torch.randn(64, 1, 3, dtype=f64, generator=g),
                   step.radius)
    with pytest.warns(StepSizeWarning):
        cert = descent_certificate(body, Y)
    (entry,) = cert.steps
    assert entry.guarantee == "none" and entry.increases > 0 and entry.violations == 0
    with pytest.raises(EnergyInputError, match=r"alpha_range.*outside.*\(0, 1\]"):
        SphereAttentionStep(4, alpha_range=(0.1, 1.5))
    with pytest.raises(EnergyInputError, match=r"backtrack"):
        SphereAttentionStep(4, backtrack=2)
    with pytest.raises(EnergyInputError, match=r"radius"):
        SphereFFNStep(4, radius=-1.0)
    with pytest.raises(EnergyInputError, match=r"alpha_range.*outside.*\(0, 1\]"):
        SphereMLPStep(4, alpha=0.5, alpha_range=(0.1, 1.5))


def test_sphere_certificate_ignores_the_off_sphere_input_and_certifies_the_rest():
    torch.manual_seed(0)
    body = Unrolled([("sphere_attention", {"heads": 2}), "sphere_ffn"], 3, 6).double()
    cert = descent_certificate(body, torch.randn(4, 5, 6, dtype=f64) * 10)
    assert cert.certified and [e.guarantee for e in cert.steps] == ["mm"] * 6


# ---------------------------------------------------------------------------------------------- energy FFN (§7.4)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 7), (3, 5, 6, 2)])
def test_mlp_gradient_matches_autograd(seed, activation, shape):
    b, n, d, m = shape
    g = _gen(seed)
    W, bb, c = (torch.randn(*s, dtype=f64, generator=g) for s in ((d, m), (d,), (m,)))
    Y = torch.randn(b, n, d, dtype=f64, generator=g) * 2
    twin = torch.func.grad(lambda Z: mlp_energy(Z, W, bb, c, activation).sum())(Y)
    torch.testing.assert_close(mlp_grad(Y, W, bb, c, activation), twin, rtol=1e-10, atol=1e-12)
    E = MLPEnergy(W, bb, c, activation)
    torch.testing.assert_close(E.grad(Y), E.autograd_grad(Y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_curvature_bound_bounds_the_hessian(seed, activation):
    """λ_max(∇²_y E) ≤ L = 1 + s₋‖W‖₂² at many points (autograd Hessian per token); GELU attains nearly s₋."""
    g = _gen(seed)
    d, m = 4, 6
    W, bb, c = torch.randn(d, m, dtype=f64, generator=g), torch.zeros(d, dtype=f64), torch.randn(m, dtype=f64,
                                                                                               generator=g)
    L = float(mlp_curvature_bound(W, activation))
    for _ in range(20):
        y = torch.randn(1, 1, d, dtype=f64, generator=g) * 3
        H = torch.func.hessian(lambda z: mlp_energy(z.view(1, 1, d), W, bb, c, activation).sum())(y.view(d))
        assert float(torch.linalg.eigvalsh(H)[-1]) <= L + 1e-10


def test_gelu_negative_slope_is_the_minimum_of_its_derivative():
    t = torch.linspace(-8, 8, 400001, dtype=f64)
    deriv = torch.func.vmap(torch.func.grad(lambda s: s * torch.special.ndtr(s)))(t)
    assert float(deriv.min()) >= -GELU_NEG_SLOPE - 1e-15
    assert float(deriv.min()) == pytest.approx(-GELU_NEG_SLOPE, abs=1e-9)


@given(seed=st.integers(0, 2**16), activation=st.sampled_from(sorted(ACTIVATIONS)), omega=st.floats(0.01, 0.99),
       scale=st.sampled_from([0.3, 1.0, 3.0]), n=st.integers(1, 5))
def test_energy_mlp_step_descends_for_every_weight(seed, activation, omega, scale, n):
    torch.manual_seed(seed)
    step = EnergyMLPStep(4, hidden=5, activation=activation, alpha=omega, init_std=scale).double()
    Y = torch.randn(2, n, 4, dtype=f64, generator=_gen(seed)) * 3
    p = step.prepare()
    E0, E1 = step.energy_at(p, Y), step.energy_at(p, step.forward_prepared(p, Y))
    assert bool((E1 <= E0 + 1e-12 * E0.abs().clamp_min(1)).all())
    kind, _ = step.guarantee()
    assert kind == ("bound" if activation == "gelu" else "gradient")


def test_energy_mlp_limit_is_detected():
    """ω ≥ 1 leaves the descent lemma's range: warned, unguaranteed, and (ω = 1.9 on a quadratic well) increasing."""
    with pytest.warns(StepSizeWarning):
        body = Unrolled([("tied_mlp", {"alpha": 1.9, "hidden": 3})], 1, 4).double()
    with torch.no_grad():
        body.layer(0)[0].W.zero_()  # E = ½‖y − b‖²: α = 3.8 overshoots by a factor 2.8
    with pytest.warns(StepSizeWarning):
        cert = descent_certificate(body, torch.randn(5, 3, 4, dtype=f64))
    assert cert.steps[0].guarantee == "none" and cert.unguaranteed_increases == 5


def test_a_general_gated_ffn_is_not_a_gradient_field():
    """J − Jᵀ ≠ 0 for W_1 ≠ W_3 (no energy exists); the self-gated tie W_1 = W_3 = W_2 is symmetric (MATH §7.4)."""
    g = _gen(0)
    d, m = 5, 7
    W_1, W_3, W_2 = (torch.randn(d, m, dtype=f64, generator=g) for _ in range(3))
    y = torch.randn(d, dtype=f64, generator=g)
    assert float(gated_jacobian_asymmetry(y, W_1, W_3, W_2)) > 0.1
    assert float(gated_jacobian_asymmetry(y, W_1, W_3, W_3)) > 0.1  # tying W_2 to the value map is not enough
    assert float(gated_jacobian_asymmetry(y, W_1, W_1, W_1)) < 1e-14


# ----------------------------------------------------------------------------------------------- recurrent (§7.6)


def _recurrent(tol: float, max_depth: int = 12, min_depth: int = 1, seed: int = 0) -> RecurrentUnrolled:
    torch.manual_seed(seed)
    return RecurrentUnrolled(["attention", "ffn", "relu"], max_depth, 6, tol=tol, min_depth=min_depth).double()


def test_recurrent_output_is_the_tied_model_at_the_depth_used():
    """Each input's output is the plain tied model's output after exactly depth_used layers (stopped = frozen)."""
    body = _recurrent(tol=1e-2)
    Y = torch.randn(6, 5, 6, dtype=f64, generator=_gen(1))
    out, info = body(Y, trace="layer")
    used = info["depth_used"]
    assert torch.equal(out, body(Y)) and bool((used >= 1).all()) and bool((used <= 12).all())
    for i in range(6):
        plain = Unrolled(["attention", "ffn", "relu"], int(used[i]), 6).double()
        plain.load_state_dict(body.state_dict())
        torch.testing.assert_close(out[i], plain(Y[i : i + 1])[0], rtol=1e-13, atol=1e-13)


def test_recurrent_stops_where_the_relative_decrease_first_falls_below_tol():
    body = _recurrent(tol=5e-3, max_depth=20)
    Y = torch.randn(5, 4, 6, dtype=f64, generator=_gen(2))
    full = Unrolled(["attention", "ffn", "relu"], 20, 6).double()
    full.load_state_dict(body.state_dict())
    _, info_full = full(Y, trace="layer")
    E = info_full["energies"]["total"]  # (21, 5) at the layer boundaries, same tied weights
    _, info = body(Y, trace="layer")
    for i, used in enumerate(info["depth_used"].tolist()):
        rel = [(E[ell - 1, i] - E[ell, i]) / E[ell - 1, i].abs() for ell in range(1, 21)]
        first = next((ell for ell in range(1, 21) if rel[ell - 1] <= 5e-3), 20)
        assert used == first


def test_recurrent_tolerance_extremes_and_errors():
    Y = torch.randn(3, 4, 6, dtype=f64, generator=_gen(3))
    _, info = _recurrent(tol=1e9, min_depth=3)(Y, trace=True)
    assert info["depth_used"].tolist() == [3, 3, 3] and len(info["states"]) == 12 * 3 + 1
    with pytest.raises(EnergyInputError, match="min_depth"):
        RecurrentUnrolled(["attention"], 4, 6, min_depth=5)
    with pytest.raises(EnergyInputError, match="tol"):
        RecurrentUnrolled(["attention"], 4, 6, tol=-1.0)
    with pytest.raises(EnergyInputError, match="tied"):
        RecurrentUnrolled(["attention"], 4, 6, tied=False)
    with pytest.raises(EnergyInputError, match="no energy step"):
        RecurrentUnrolled(["relu"], 4, 6)


def test_recurrent_certificate_reports_the_depth_used():
    body = _recurrent(tol=1e-2)
    Y = torch.randn(4, 5, 6, dtype=f64, generator=_gen(4))
    cert = descent_certificate(body, Y)
    assert cert.certified and cert.depth_used == tuple(body(Y, trace="layer")[1]["depth_used"].tolist())


def test_ffn_energy_used_by_the_sphere_step_is_the_projects():
    """SphereFFNStep's energy term is FFNEnergy (the one the plain FFN step descends)."""
    torch.manual_seed(0)
    step = SphereFFNStep(4).double()
    Y = torch.randn(2, 3, 4, dtype=f64)
    torch.testing.assert_close(step.energy_at(step.prepare(), Y), FFNEnergy(step.W_f, step.b).energy(Y))


# ------------------------------------------------------------------------------- general heads, computed bound (§7.2)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), heads=st.sampled_from([1, 2, 3]), eta=st.floats(0.01, 1.99),
       scale=st.sampled_from([0.5, 1.0, 4.0]))
def test_bounded_attention_step_descends_for_any_heads(seed, n, heads, eta, scale):
    torch.manual_seed(seed)
    step = BoundedAttentionStep(6, heads=heads, k=3, alpha=eta, init_std=scale).double()
    Y = torch.randn(2, n, 6, dtype=f64, generator=_gen(seed)) * 2
    p = step.prepare()
    E0, E1 = step.energy_at(p, Y), step.energy_at(p, step.forward_prepared(p, Y))
    assert bool((E1 <= E0 + 1e-12 * E0.abs().clamp_min(step.rounding_scale(Y))).all())


def test_bounded_attention_step_is_the_preconditioned_gradient_step():
    """Y⁺ = Y − η ∇E/μ with the project's ∇E_att (autograd of AttentionEnergy) and μ from its parts."""
    torch.manual_seed(1)
    step = BoundedAttentionStep(5, heads=2, k=2, alpha=0.7).double()
    Y = torch.randn(3, 4, 5, dtype=f64)
    E = MultiHeadAttentionEnergy(step.M.detach())
    grad = torch.func.grad(lambda Z: E.energy(Z).sum())(Y)
    _, mu = attention_grad_and_curvature(Y, step.M.detach(), 1 / math.sqrt(2))
    torch.testing.assert_close(step(Y), Y - 0.7 * grad / mu[..., None], rtol=1e-12, atol=1e-12)


def test_bounded_attention_limit_is_detected():
    """η = 2 is the descent lemma's edge: beyond it (η = 6) the certificate reports unguaranteed increases."""
    torch.manual_seed(2)
    with pytest.warns(StepSizeWarning):
        body = Unrolled([("majorised_attention", {"heads": 2, "alpha": 6.0, "init_std": 0.3})], 2, 6).double()
        cert = descent_certificate(body, torch.randn(16, 5, 6, dtype=f64) * 0.5)
    assert all(e.guarantee == "none" for e in cert.steps) and cert.unguaranteed_increases > 0
    with pytest.raises(EnergyInputError, match=r"alpha_range.*outside.*\(0, 2\)"):
        BoundedAttentionStep(6, heads=2, alpha_range=(0.1, 2.5))


# ------------------------------------------------------------------------------- purity: torch.func through the steps


@pytest.mark.parametrize("name", ["sphere_attention", "sphere_ffn", "sphere_mlp", "tied_mlp", "majorised_attention",
                                  "backtracking_attention", "learned_ffn", "recurrent"])
def test_new_steps_pass_every_torch_func_transform(name):
    """grad, vjp, jvp, linearize, vmap (and hessian) through each new step agree with autograd (float64): the
    forwards are pure (the recurrent model's stopping reads go through value_holds)."""
    torch.manual_seed(0)
    build = {
        "sphere_attention": lambda: SphereAttentionStep(4, heads=2, k=2),
        "sphere_ffn": lambda: SphereFFNStep(4, spectrum_map="smooth"),
        "sphere_mlp": lambda: SphereMLPStep(4, hidden=3, activation="gelu"),
        "tied_mlp": lambda: EnergyMLPStep(4, hidden=3, activation="gelu"),
        "majorised_attention": lambda: BoundedAttentionStep(4, heads=2, k=2, alpha=1.5),
        "backtracking_attention": lambda: Unrolled([("attention", {"heads": 2, "fused": False, "alpha": 3.0,
                                                                    "backtrack": 3})], 1, 4),
        "learned_ffn": lambda: FFNStep(4, alpha=0.5, alpha_range=(0.1, 1.0), spectrum_map="smooth"),
        "recurrent": lambda: RecurrentUnrolled([("attention", {"fused": False}), "ffn"], 3, 4, tol=1e-2),
    }[name]
    module = build().double()
    g = _gen(1)
    x = torch.randn(2, 3, 4, dtype=f64, generator=g)
    if name.startswith("sphere"):
        x = _on_sphere(x, module.radius)
    U, v = torch.randn(2, 3, 4, dtype=f64, generator=g), torch.randn(2, 3, 4, dtype=f64, generator=g)
    check_transforms(module, lambda z: (module(z) * U).sum() + (module(z) ** 2).sum(), x, U, v,
                     second_order=name in ("tied_mlp", "majorised_attention"))


# -------------------------------------------------------------------------- orthogonal heads split exactly (§7.2)


@pytest.mark.parametrize("heads,k,d,alpha", [(2, 2, 5, 1.0), (3, 1, 4, 1.7), (2, 3, 6, 0.4), (2, 1, 2, 1.0)])
def test_orthogonal_heads_split_into_per_subspace_steps(seed, heads, k, d, alpha):
    """E_att(Y) = Σ_h E_h(Y P_h), and the multi-head step's P_h-component is head h's own step (a) on Y P_h, the
    complement unchanged (MATH §7.2) — so each head's MM guarantee carries over. (One head keeps the identity value
    map of step (a): it also mixes the complement, on which its energy does not depend.)"""
    torch.manual_seed(seed)
    step = AttentionStep(d, heads=heads, k=k, orthogonal_heads=True, fused=False, alpha=alpha).double()
    M = step.M.detach()
    Y = torch.randn(2, 4, d, dtype=f64, generator=_gen(seed))
    P = [torch.linalg.qr(M[h])[0] @ torch.linalg.qr(M[h])[0].T for h in range(heads)]
    per_head = [AttentionEnergy(M[h]) for h in range(heads)]
    torch.testing.assert_close(step.energy_at(step.prepare(), Y), sum(E.energy(Y @ P[h]) for h, E in
                                                                     enumerate(per_head)), rtol=1e-12, atol=1e-12)
    rest = torch.eye(d, dtype=f64) - sum(P)
    expected = Y @ rest + sum(E.step(Y @ P[h], alpha, preconditioner="metric") @ P[h] for h, E in
                              enumerate(per_head))
    torch.testing.assert_close(step(Y), expected, rtol=1e-11, atol=1e-12)
