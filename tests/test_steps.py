"""Step modules (unfold.steps): each equals the descent step of its energy object, in float64."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _helpers import DT

from energy._validation import EnergyInputError, StepSizeWarning
from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy, metric, softmax_beta
from energy.energy_transformer import EnergyTransformerEnergy
from energy.ffn import FFNEnergy, TiedReLUEnergy
from energy.hopfield import HopfieldEnergy
from energy.normalization import layernorm_projection
from energy.reference import attention_weights
from unfold.parametrizations import SpectrumClip
from unfold.steps import (
    AttentionStep,
    EnergyTransformerStep,
    FFNStep,
    HopfieldStep,
    LayerNormProjection,
    ReLUProjection,
    RMSNormProjection,
    TiedReLUFFNStep,
)

TOL = dict(rtol=0, atol=1e-12)


def _Y(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=DT)


@pytest.mark.parametrize("heads,k,prec,orth", [(1, 5, "metric", False), (1, 3, "token", False),
                                               (2, 2, "metric", True), (3, 2, "token", True),
                                               (2, 3, "metric", False)])
def test_attention_step_fused_and_plain_equal_energy_step(gen, heads, k, prec, orth):
    torch.manual_seed(int(gen.initial_seed()))
    d = 7 if orth or heads == 1 else 6
    alpha = 0.6
    fused = AttentionStep(d, heads=heads, k=k, preconditioner=prec, alpha=alpha, orthogonal_heads=orth).double()
    plain = AttentionStep(d, heads=heads, k=k, preconditioner=prec, alpha=alpha, orthogonal_heads=orth,
                          fused=False).double()
    plain.load_state_dict(fused.state_dict())
    Y = _Y(gen, 2, 5, d)
    M = fused.M.detach()
    E = AttentionEnergy(M[0]) if heads == 1 else MultiHeadAttentionEnergy(M)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)  # general heads: no guaranteed range
        want = E.step(Y, alpha, preconditioner=prec)
        torch.testing.assert_close(fused(Y), want, **TOL)
        torch.testing.assert_close(plain(Y), want, **TOL)
    assert fused.uses_fused and not plain.uses_fused
    torch.testing.assert_close(fused.energy.energy(Y), E.energy(Y), **TOL)


@pytest.mark.parametrize("heads,k,prec,orth,kernel", [
    (1, 5, "metric", False, "gaussian"), (3, 2, "token", True, "gaussian"), (2, 3, "metric", False, "gaussian"),
    (1, 4, "metric", False, "cauchy"), (2, 3, "token", True, "power"),
])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_attention_forward_prepared_and_energy_equals_step_and_energy(gen, heads, k, prec, orth, kernel, grad):
    """``forward_prepared_and_energy`` (fused: the kernel's log-normalisers; otherwise ``head_step_and_energy``)
    equals ``(forward_prepared(Y), energy(Y))`` in float64; gradients flow through both outputs when autograd
    records."""
    torch.manual_seed(int(gen.initial_seed()))
    d = 7
    alpha = 0.05 if prec == "token" else 0.6
    step = AttentionStep(d, heads=heads, k=k, preconditioner=prec, alpha=alpha, orthogonal_heads=orth,
                         kernel=kernel, kernel_kwargs={"p": 1.0} if kernel == "power" else None).double()
    Y = _Y(gen, 2, 5, d)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)  # general heads: no guaranteed range
        prep = step.prepare()
        Yp, E = step.forward_prepared_and_energy(prep, Y)
        torch.testing.assert_close(Yp, step.forward_prepared(prep, Y), **TOL)
    torch.testing.assert_close(E, prep.energy.energy(Y), **TOL)
    assert E.requires_grad == grad
    assert step.uses_fused == (kernel == "gaussian")


def test_energy_at_equals_the_energy_objects_energy(gen):
    """``energy_at`` (the traces' explicit evaluation; the attention step skips re-validating its own states)."""
    torch.manual_seed(4)
    for step in (AttentionStep(5, heads=1).double(), AttentionStep(6, heads=2, kernel="cauchy").double(),
                 FFNStep(5).double()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StepSizeWarning)  # general heads: no guaranteed range
            prep = step.prepare()
        Y = _Y(gen, 2, 3, 4, step.d)
        torch.testing.assert_close(step.energy_at(prep, Y), prep.energy.energy(Y), rtol=0, atol=0)


def test_non_attention_steps_return_no_energy_in_passing(gen):
    step = FFNStep(4).double()
    prep = step.prepare()
    Y = _Y(gen, 2, 3, 4)
    Yp, E = step.forward_prepared_and_energy(prep, Y)
    assert E is None
    torch.testing.assert_close(Yp, step.forward_prepared(prep, Y), rtol=0, atol=0)


def test_attention_step_a_is_softmax_beta_attention(gen):
    """α = 1, metric step: Y⁺ = softmax_β(Y W Yᵀ) Y with W = M Mᵀ/√k (MATH §1.1(a))."""
    torch.manual_seed(0)
    step = AttentionStep(6, k=4).double()
    Y = _Y(gen, 3, 5, 6)
    W = step.M[0].detach() @ step.M[0].detach().T / math.sqrt(4)
    torch.testing.assert_close(step.W[0], W, **TOL)
    torch.testing.assert_close(step(Y), softmax_beta(Y, W) @ Y, **TOL)
    beta = -0.5 * torch.einsum("bnd,de,bne->bn", Y, W, Y)
    A = attention_weights(Y @ step.M[0].detach(), Y @ step.M[0].detach(), key_bias=beta)  # scale 1/√k
    torch.testing.assert_close(step(Y), A @ Y, **TOL)


@pytest.mark.parametrize("kernel,kw", [("power", {"p": 1.0}), ("cauchy", {})])
def test_attention_step_other_kernels(gen, kernel, kw):
    torch.manual_seed(1)
    step = AttentionStep(5, kernel=kernel, kernel_kwargs=kw, alpha=0.5).double()
    assert not step.uses_fused
    Y = _Y(gen, 2, 4, 5)
    E = AttentionEnergy(step.M[0].detach(), kernel=step.kernel)
    torch.testing.assert_close(step(Y), E.step(Y, 0.5), **TOL)
    assert (E.energy(step(Y)) <= E.energy(Y) + 1e-12).all()


def test_attention_learnable_alpha_value_and_gradient(gen):
    torch.manual_seed(2)
    step = AttentionStep(5, alpha=0.7, learn_alpha=True).double()
    fixed = AttentionStep(5, alpha=float(step.alpha.detach())).double()
    fixed.M = step.M
    Y = _Y(gen, 2, 4, 5)
    out = step(Y)
    torch.testing.assert_close(out, fixed(Y), **TOL)
    C = _Y(gen, 2, 4, 5)
    (g,) = torch.autograd.grad((out * C).sum(), step.alpha)
    # the step is affine in α: d/dα = T(Y) − Y with T the α = 1 step
    T = AttentionEnergy(step.M[0].detach()).step(Y, 1.0)
    torch.testing.assert_close(g, ((T - Y) * C).sum(), **TOL)


def test_ffn_step_formula_and_constraint(gen):
    torch.manual_seed(3)
    step = FFNStep(6, alpha=0.8).double()
    with torch.no_grad():
        step.b.copy_(_Y(gen, 6))
    Y = _Y(gen, 2, 4, 6)
    W_f, b = step.W_f.detach(), step.b.detach()
    lam = torch.linalg.eigvalsh(W_f)
    assert lam.min() >= -1e-12 and lam.max() <= 0.95 + 1e-12
    want = (1 - 0.8) * Y - 0.8 * Y @ W_f + 0.8 * b
    torch.testing.assert_close(step(Y), want, **TOL)
    torch.testing.assert_close(step.energy.energy(Y), FFNEnergy(W_f, b).energy(Y), **TOL)
    assert "SpectrumClip" in repr(step.parametrizations.W_f[0])
    sym = FFNStep(6, spectrum=None).double()
    assert "Symmetric" in repr(sym.parametrizations.W_f[0])


def test_ffn_learnable_alpha_matches_fixed(gen):
    torch.manual_seed(4)
    a = FFNStep(5, alpha=0.5, learn_alpha=True).double()
    b = FFNStep(5, alpha=float(a.alpha.detach())).double()
    b.load_state_dict({k: v for k, v in a.state_dict().items()}, strict=False)
    with torch.no_grad():
        b.parametrizations.W_f.original.copy_(a.parametrizations.W_f.original)
    Y = _Y(gen, 3, 4, 5)
    torch.testing.assert_close(a(Y), b(Y), **TOL)
    out = a(Y)
    out.sum().backward()
    assert a.alpha.grad is not None and torch.isfinite(a.alpha.grad)


def test_tied_relu_step(gen):
    torch.manual_seed(5)
    step = TiedReLUFFNStep(4, hidden=6, alpha=0.3).double()
    Y = _Y(gen, 2, 3, 4)
    W1, b = step.W_1.detach(), step.b.detach()
    torch.testing.assert_close(step(Y), Y + 0.3 * torch.relu(Y @ W1 + b) @ W1.T, **TOL)
    torch.testing.assert_close(step.energy.energy(Y), TiedReLUEnergy(W1, b).energy(Y), **TOL)


def test_projections_against_torch(gen):
    Y = _Y(gen, 2, 5, 6)
    torch.testing.assert_close(ReLUProjection(6)(Y), torch.relu(Y), rtol=0, atol=0)
    ln = torch.nn.LayerNorm(6, elementwise_affine=False, eps=0.0, dtype=DT)
    torch.testing.assert_close(LayerNormProjection(6)(Y), ln(Y), **TOL)
    rms = torch.nn.RMSNorm(6, elementwise_affine=False, eps=0.0, dtype=DT)
    torch.testing.assert_close(RMSNormProjection(6)(Y), rms(Y), **TOL)
    for P in (ReLUProjection, LayerNormProjection, RMSNormProjection):
        assert P(6).energy is None and P.term is None
    ln_eps = torch.nn.LayerNorm(6, elementwise_affine=False, eps=1e-5, dtype=DT)
    torch.testing.assert_close(LayerNormProjection(6, eps=1e-5)(Y), ln_eps(Y), **TOL)
    rms_eps = torch.nn.RMSNorm(6, elementwise_affine=False, eps=1e-5, dtype=DT)
    torch.testing.assert_close(RMSNormProjection(6, eps=1e-5)(Y), rms_eps(Y), **TOL)
    Z = Y.clone()
    Z[0, 1] = 0.0  # a token the ReLU zeroed: the exact projection is not unique, the eps map sends it to 0
    with pytest.raises(EnergyInputError, match="not unique"):  # the public function checks the values
        layernorm_projection(Z)
    # the step's forward reads no values (pure core): the non-unique projection shows as a non-finite token
    out = LayerNormProjection(6)(Z)
    assert not torch.isfinite(out[0, 1]).any() and torch.isfinite(out[1]).all()
    assert LayerNormProjection(6, eps=1e-5)(Z)[0, 1].abs().max() == 0
    with pytest.raises(EnergyInputError, match="eps"):
        LayerNormProjection(6, eps=-1.0)


def test_hopfield_step_is_attention_over_patterns(gen):
    torch.manual_seed(6)
    step = HopfieldStep(5, patterns=7, beta=0.8).double()
    Y = _Y(gen, 2, 3, 5)
    X = step.X.detach()
    A = attention_weights(Y, X.expand(2, 7, 5), scale=0.8)
    torch.testing.assert_close(step(Y), A @ X, **TOL)
    E = HopfieldEnergy(X, 0.8)
    assert (E.energy(step(Y)) <= E.energy(Y) + 1e-12).all()


def test_energy_transformer_step(gen):
    torch.manual_seed(7)
    step = EnergyTransformerStep(6, heads=2, k=3, memories=5, alpha=0.05).double()
    Y = _Y(gen, 2, 4, 6)
    E = EnergyTransformerEnergy(step.W_Q.detach(), step.W_K.detach(), step.xi.detach(), beta=step.beta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)
        torch.testing.assert_close(step(Y), E.step(Y, 0.05), **TOL)
    torch.testing.assert_close(step.energy.energy(Y), E.energy(Y), **TOL)


def test_step_energy_uses_the_steps_metric(gen):
    """`.energy` of an attention step is built from the same M (same metric W = κ M Mᵀ) as the step."""
    torch.manual_seed(8)
    step = AttentionStep(4, heads=2, k=2, orthogonal_heads=True).double()
    E = step.energy
    torch.testing.assert_close(E.W, metric(step.M.detach()), **TOL)
    Y = _Y(gen, 3, 6, 4)
    assert (E.energy(step(Y)) <= E.energy(Y) + 1e-12).all()  # orthogonal heads keep the guarantee


def test_bad_arguments():
    with pytest.raises(EnergyInputError, match="preconditioner"):
        AttentionStep(4, preconditioner="diag")
    with pytest.raises(EnergyInputError, match="does not divide"):
        AttentionStep(5, heads=2)
    with pytest.raises(EnergyInputError, match="unknown kernel 'laplace'"):
        AttentionStep(4, kernel="laplace")
    with pytest.raises(EnergyInputError, match="`d`"):
        FFNStep(0)
    with pytest.raises(EnergyInputError, match="alpha"):
        FFNStep(3, alpha=float("nan"))
    step = AttentionStep(4).double()
    with pytest.raises(EnergyInputError, match="Y"):
        step(torch.randn(2, 3, 5, dtype=DT))


# -------------------------------------------------------------------- the W_f gradient at initialisation (MATH §7.3)


def _eigen_gradients(step: FFNStep) -> torch.Tensor:
    """The singular values of the derivative of ``W_f`` with respect to its original on symmetric directions
    (``d(d+1)/2`` of them): a zero is a direction of the original that gets no gradient, whatever the loss."""
    A = step.parametrizations.W_f.original.detach()
    constraint = step.parametrizations.W_f[0]
    d = A.shape[-1]
    J = torch.func.jacrev(constraint)(A).reshape(d * d, d * d)
    iu = torch.triu_indices(d, d)
    B = torch.zeros(d, d, iu.shape[1], dtype=A.dtype)
    B[iu[0], iu[1], torch.arange(iu.shape[1])] = 1.0
    B[iu[1], iu[0], torch.arange(iu.shape[1])] = 1.0
    B = B / torch.linalg.vector_norm(B, dim=(0, 1))
    return torch.linalg.svdvals(J @ B.reshape(d * d, -1))


@pytest.mark.parametrize("spectrum_map", ["clip", "smooth"])
@pytest.mark.parametrize("d", [3, 8, 12])
def test_every_eigen_direction_of_w_f_gets_a_gradient_at_initialisation(seed, spectrum_map, d):
    torch.manual_seed(seed)
    step = FFNStep(d, spectrum_map=spectrum_map).double()
    g = _eigen_gradients(step)  # the clip: exactly 1; the squash: g' ≥ 1 − tanh²(1) at the interior start
    assert bool((g > (0.99 if spectrum_map == "clip" else 1 - math.tanh(1) ** 2 - 1e-12)).all()), g
    lam = torch.linalg.eigvalsh(step.W_f.detach())
    assert bool((lam > 0).all()) and bool((lam < 0.95).all())  # the start is strictly inside the band


def test_a_clipped_start_starves_eigen_directions_which_the_fix_avoids(seed):
    """The old start (original = clip(sym(A)), half of the spectrum on the edge 0) gives some eigen-directions no
    gradient — the defect the interior start removes."""
    torch.manual_seed(seed)
    step = FFNStep(12).double()
    A = torch.randn(12, 12, dtype=DT) / math.sqrt(12)
    with torch.no_grad():
        step.parametrizations.W_f.original.copy_(SpectrumClip(0.0, 0.95)(0.5 * (A + A.T)))
    g = _eigen_gradients(step)
    assert int((g < 1e-12).sum()) > 0


def test_smooth_spectrum_keeps_learning_where_the_clip_stops():
    """An eigenvalue of the original pushed past the band: the clip's derivative is 0 there, the squash's is not."""
    clip, smooth = FFNStep(4, spectrum_map="clip").double(), FFNStep(4, spectrum_map="smooth").double()
    for step in (clip, smooth):
        with torch.no_grad():
            step.parametrizations.W_f.original.copy_(torch.diag(torch.tensor([2.0, 0.3, 0.5, -1.0], dtype=DT)))
    assert int((_eigen_gradients(clip) < 1e-12).sum()) == 2  # the two diagonal directions outside the band
    assert bool((_eigen_gradients(smooth) > 1e-3).all())
    assert smooth.config()["spectrum_map"] == "smooth" and "spectrum_map" not in clip.config()
    with pytest.raises(EnergyInputError, match="spectrum_map"):
        FFNStep(4, spectrum_map="soft")


def test_bounded_learnable_alpha_and_backtracking_options():
    """alpha_range: α = lo + (hi − lo)σ(a) starts at alpha and receives a gradient; backtrack: E never rises."""
    torch.manual_seed(0)
    step = FFNStep(4, alpha=0.6, alpha_range=(0.1, 1.0)).double()
    assert step.current_alpha() == pytest.approx(0.6, rel=1e-7)  # the logit was made in float32
    assert "alpha" not in dict(step.named_parameters())
    Y = torch.randn(2, 3, 4, dtype=DT)
    step(Y).sum().backward()
    assert step.alpha_logit.grad is not None and float(step.alpha_logit.grad.abs()) > 0
    with pytest.raises(EnergyInputError, match=r"alpha` = 1.1 .*inside alpha_range"):
        FFNStep(4, alpha=1.1, alpha_range=(0.1, 1.0))
    with pytest.raises(EnergyInputError, match=r"depends on its weights"):
        FFNStep(4, spectrum=None, alpha=0.5, alpha_range=(0.1, 1.0))
    with pytest.raises(EnergyInputError, match=r"backtrack"):
        FFNStep(4, backtrack=-1)
    bad = AttentionStep(6, heads=2, alpha=30.0, fused=False).double()  # general heads: no range (warns in forwards)
    good = AttentionStep(6, heads=2, alpha=30.0, fused=False, backtrack=5).double()
    good.load_state_dict(bad.state_dict())
    Y = torch.randn(4, 5, 6, dtype=DT) * 2
    p = good.prepare()
    assert bool((good.energy_at(p, good(Y)) <= good.energy_at(p, Y)).all())
