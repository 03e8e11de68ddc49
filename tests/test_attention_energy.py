"""Single-head attention energy (MATH §1.1): closed forms vs autograd, steps vs reference attention, descent.

Every check runs in float64 on odd shapes (n ≠ d, batch > 1, several batch dims) and several seeds.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import DT
from hypothesis import given
from hypothesis import strategies as st

import energy.core.fused as core_fused
from energy._validation import ConstraintError, EnergyInputError, StepSizeError, StepSizeWarning, strict_mode
from energy.attention import (
    AttentionEnergy,
    attention_step_fused,
    attention_step_fused_and_energy,
    key_bias,
    metric,
    pairwise_sq_dist,
    softmax_beta,
)
from energy.kernels import CauchyKernel, GaussianKernel, Kernel, PowerKernel
from energy.reference import attention_weights

TOL = 1e-10


class EpanechnikovKernel(Kernel):
    """ρ(z) = z − z²/(2c) on [0, c], c/2 beyond: concave, non-decreasing, but ρ'(z) = (1 − z/c)₊ is not completely
    monotone, so Γ can be indefinite (``psd_gram = False``): exercises the (0, 1] ranges."""

    name = "epanechnikov"
    psd_gram = False

    def __init__(self, c: float = 2.0) -> None:
        self.c = c

    def rho(self, z: torch.Tensor) -> torch.Tensor:
        zc = z.clamp(max=self.c)
        return zc - zc**2 / (2 * self.c)

    def drho(self, z: torch.Tensor) -> torch.Tensor:
        return (1 - z / self.c).clamp_min(0.0)

    def d2rho(self, z: torch.Tensor) -> torch.Tensor:
        return torch.where(z < self.c, -1.0 / self.c, 0.0).to(z.dtype)


KERNELS = [GaussianKernel(), PowerKernel(1.0, 0.1), CauchyKernel(), EpanechnikovKernel()]
KIDS = [repr(k) for k in KERNELS]
ALL_KERNELS = [*KERNELS, PowerKernel(0.6, 0.5), PowerKernel(2.0, 1.0)]  # for the property tests
# (batch dims, n, d, k) with k >= d so that W = κ M Mᵀ ≻ 0 (needed to write step (a) with W⁻¹)
SHAPES = [((), 5, 3, 4), ((2,), 7, 5, 6), ((2, 3), 6, 4, 9)]
SIDS = ["b0-n5-d3-k4", "b2-n7-d5-k6", "b2x3-n6-d4-k9"]


def _problem(gen: torch.Generator, batch: tuple, n: int, d: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens with unequal norms (so that the key bias β matters) and a random factor M."""
    Y = torch.randn(*batch, n, d, generator=gen, dtype=DT)
    Y = Y * (0.3 + 1.5 * torch.rand(*batch, n, 1, generator=gen, dtype=DT))
    M = torch.randn(d, k, generator=gen, dtype=DT)
    return Y, M


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), f"max abs err {err:.3e}"


def _alpha(E: AttentionEnergy, preconditioner: str, frac: float = 0.7) -> float:
    return frac * min(E.step_range(preconditioner).high, 2.0)


# --- metric, distances, bias -------------------------------------------------------------------------------------


def test_metric_scale_convention(gen: torch.Generator) -> None:
    M = torch.randn(5, 7, generator=gen, dtype=DT)
    _close(metric(M), M @ M.T / math.sqrt(7))
    _close(metric(M, scale=1.0), M @ M.T)
    _close(AttentionEnergy(M).W, M @ M.T / math.sqrt(7))
    _close(AttentionEnergy(M, scale=0.3).W, 0.3 * M @ M.T)


@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
def test_pairwise_sq_dist_matches_brute_force(shape: tuple, gen: torch.Generator) -> None:
    Y, M = _problem(gen, *shape)
    W = metric(M)
    diff = Y.unsqueeze(-2) - Y.unsqueeze(-3)  # the n²×d pair tensor, only in this test
    brute = 0.5 * torch.einsum("...ijc,cd,...ijd->...ij", diff, W, diff)
    z = pairwise_sq_dist(Y, W)
    _close(z, brute)
    assert bool((z >= 0).all())
    assert float(z.diagonal(dim1=-2, dim2=-1).abs().max()) <= 1e-12 * float(brute.abs().max())


def test_pairwise_sq_dist_clamps_rounding_of_coincident_tokens() -> None:
    y = torch.tensor([[0.1, 0.7, -0.3]], dtype=DT) * 1e4
    Y = torch.cat([y, y, y + 1e-12], dim=0)
    z = pairwise_sq_dist(Y, torch.eye(3, dtype=DT))
    assert bool((z >= 0).all())


@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
@pytest.mark.parametrize("kernel", KERNELS, ids=KIDS)
def test_energy_is_pair_sum(shape: tuple, kernel: Kernel, gen: torch.Generator) -> None:
    Y, M = _problem(gen, *shape)
    E = AttentionEnergy(M, kernel=kernel, ridge=0.4)
    W = E.W
    n = Y.shape[-2]
    brute = torch.zeros(Y.shape[:-2], dtype=DT)
    for i in range(n):
        for j in range(i + 1, n):
            dy = Y[..., i, :] - Y[..., j, :]
            brute = brute + kernel.rho(0.5 * ((dy @ W) * dy).sum(-1))
    brute = brute + 0.2 * ((Y @ W) * Y).sum((-1, -2))
    _close(E.energy(Y), brute)


# --- closed-form gradient vs autograd ------------------------------------------------------------------------------


@pytest.mark.parametrize("ridge", [0.0, 0.7])
@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
@pytest.mark.parametrize("kernel", KERNELS, ids=KIDS)
def test_grad_matches_autograd(kernel: Kernel, shape: tuple, ridge: float, gen: torch.Generator) -> None:
    Y, M = _problem(gen, *shape)
    E = AttentionEnergy(M, kernel=kernel, ridge=ridge)
    _close(E.grad(Y), E.autograd_grad(Y))


@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
def test_grad_is_L_Y_W(shape: tuple, gen: torch.Generator) -> None:
    Y, M = _problem(gen, *shape)
    E = AttentionEnergy(M, kernel=CauchyKernel())
    Gamma = E.weights(Y)
    L = torch.diag_embed(Gamma.sum(-1)) - Gamma
    _close(E.grad(Y), L @ Y @ E.W)


# --- steps vs the step built from the autograd gradient and an explicit preconditioner -------------------------------


@pytest.mark.parametrize("preconditioner", ["metric", "token"])
@pytest.mark.parametrize("ridge", [0.0, 0.5])
@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
@pytest.mark.parametrize("kernel", KERNELS, ids=KIDS)
def test_step_is_preconditioned_autograd_step(
    kernel: Kernel, shape: tuple, ridge: float, preconditioner: str, gen: torch.Generator
) -> None:
    Y, M = _problem(gen, *shape)
    E = AttentionEnergy(M, kernel=kernel, ridge=ridge)
    alpha = _alpha(E, preconditioner)
    G = E.autograd_grad(Y)
    # explicit preconditioner, written out here: (D + λI)⁻¹ [· W⁻¹ for the metric step]
    P = G / (E.weights(Y).sum(-1) + ridge).unsqueeze(-1)
    if preconditioner == "metric":
        P = torch.linalg.solve(E.W, P.transpose(-1, -2)).transpose(-1, -2)
    step = E.step(Y, alpha, preconditioner=preconditioner)
    _close(step, Y - alpha * P)
    _close(step, Y - alpha * E.preconditioned_grad(Y, G, preconditioner=preconditioner))


@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
def test_metric_step_closed_form_does_not_need_invertible_W(shape: tuple, gen: torch.Generator) -> None:
    batch, n, d, _ = shape
    Y, M = _problem(gen, batch, n, d, 2)  # k = 2 < d: W singular
    E = AttentionEnergy(M)
    A = E.attention_matrix(Y)
    _close(E.step(Y, 0.6), 0.4 * Y + 0.6 * A @ Y)
    with pytest.raises(ConstraintError, match="positive definite"):
        E.preconditioned_grad(Y, preconditioner="metric")
    E.preconditioned_grad(Y, preconditioner="token")  # the token preconditioner needs no W⁻¹


# --- the Gaussian step is standard attention (Q = K = Y M, scale 1/√k, key bias β) -----------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
def test_gaussian_metric_step_is_reference_attention(shape: tuple, gen: torch.Generator) -> None:
    Y, M = _problem(gen, *shape)
    E = AttentionEnergy(M)
    Q = K = Y @ M
    beta = key_bias(Y, E.W)
    _close(beta, -0.5 * (K * K).sum(-1) / math.sqrt(M.shape[1]))
    A_ref = attention_weights(Q, K, key_bias=beta)  # scale None = 1/√d_k
    _close(E.attention_matrix(Y), A_ref)
    _close(softmax_beta(Y, E.W), A_ref)
    for alpha in (1.0, 0.4, 1.7):
        _close(E.step(Y, alpha), (1 - alpha) * Y + alpha * A_ref @ Y)


@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
def test_gaussian_metric_step_is_torch_sdpa_with_beta_mask(shape: tuple, gen: torch.Generator) -> None:
    Y, M = _problem(gen, *shape)
    E = AttentionEnergy(M)
    Q = Y @ M
    beta = key_bias(Y, E.W)
    out = F.scaled_dot_product_attention(Q, Q, Y, attn_mask=beta.unsqueeze(-2))  # torch's default scale 1/√k
    _close(E.step(Y, 1.0), out)


def test_scale_mismatch_is_detected(gen: torch.Generator) -> None:
    """Regression for the classic trap: the energy's metric and the layer's scale must agree."""
    Y, M = _problem(gen, (2,), 7, 5, 6)
    E = AttentionEnergy(M)
    Q = Y @ M
    wrong = attention_weights(Q, Q, scale=1.0, key_bias=key_bias(Y, E.W)) @ Y
    assert float((E.step(Y, 1.0) - wrong).abs().max()) > 1e-3


@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
def test_gaussian_token_step_is_attention_with_tied_values(shape: tuple, gen: torch.Generator) -> None:
    Y, M = _problem(gen, *shape)
    E = AttentionEnergy(M)
    W = E.W
    alpha = _alpha(E, "token")
    A = softmax_beta(Y, W)
    I = torch.eye(W.shape[0], dtype=DT)
    _close(E.step(Y, alpha, preconditioner="token"), Y @ (I - alpha * W) + alpha * A @ Y @ W)


@pytest.mark.parametrize("preconditioner", ["metric", "token"])
@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
def test_fused_step_equals_einsum_step(shape: tuple, preconditioner: str, gen: torch.Generator) -> None:
    Y, M = _problem(gen, *shape)
    E = AttentionEnergy(M)
    alpha = _alpha(E, preconditioner)
    _close(attention_step_fused(Y, M, alpha, preconditioner=preconditioner),
           E.step(Y, alpha, preconditioner=preconditioner))
    E2 = AttentionEnergy(M, scale=0.37)
    alpha = _alpha(E2, preconditioner)
    _close(attention_step_fused(Y, M, alpha, scale=0.37, preconditioner=preconditioner),
           E2.step(Y, alpha, preconditioner=preconditioner))


# --- step and energy from one evaluation of z (the unroller traces) -----------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("ridge", [0.0, 0.3])
@pytest.mark.parametrize("preconditioner", ["metric", "token"])
@pytest.mark.parametrize("kernel", KERNELS, ids=KIDS)
def test_step_and_energy_equals_step_and_energy_separately(kernel: Kernel, preconditioner: str, ridge: float,
                                                           masked: bool, gen: torch.Generator) -> None:
    Y, M = _problem(gen, (2, 3), 6, 4, 5)
    E = AttentionEnergy(M, kernel=kernel, ridge=ridge)
    mask = None
    if masked:
        mask = torch.rand(2, 3, 6, generator=gen) > 0.4
        mask[..., 0] = True
    alpha = _alpha(E, preconditioner)
    Yp, e = E.step_and_energy(Y, alpha, preconditioner=preconditioner, token_mask=mask)
    assert e.shape == (2, 3)
    _close(Yp, E.step(Y, alpha, preconditioner=preconditioner, token_mask=mask), 1e-12)
    _close(e, E.energy(Y, mask), 1e-12)
    _close(e, _pair_sum_energy(Y, E, mask), 1e-12)  # and the definition Σ_{i<j} ρ(z_ij) + (λ/2)‖Y‖²_W itself


def _pair_sum_energy(Y: torch.Tensor, E: AttentionEnergy, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ_{i<j} m_i m_j ρ(½‖y_i − y_j‖²_W) + (λ/2) Σ_i m_i ‖y_i‖²_W by brute force over the pairs."""
    n = Y.shape[-2]
    W = E.W
    m = torch.ones(Y.shape[:-1], dtype=DT) if mask is None else mask.to(DT)
    diff = Y.unsqueeze(-2) - Y.unsqueeze(-3)
    z = 0.5 * torch.einsum("...ijd,de,...ije->...ij", diff, W, diff)
    iu = torch.triu_indices(n, n, 1)
    pair = (E.kernel.rho(z) * m.unsqueeze(-1) * m.unsqueeze(-2))[..., iu[0], iu[1]].sum(-1)
    return pair + 0.5 * E.ridge * (torch.einsum("...nd,de,...ne->...n", Y, W, Y) * m).sum(-1)


@pytest.mark.parametrize("flash", [True, False], ids=["flash-lse", "explicit-logits"])
@pytest.mark.parametrize("preconditioner", ["metric", "token"])
def test_fused_step_returns_the_energy_at_its_input(preconditioner: str, flash: bool, gen: torch.Generator,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``attention_step_fused_and_energy``: E(Y) from the kernel's row log-normalisers, MATH §1.1
    (``D_ii = exp(β_i + lse_i)``), equals ``energy(Y)``; both the flash op and the explicit-logit fallback; under
    autograd the energy is the explicit, differentiable one."""
    if not flash:
        monkeypatch.setattr(core_fused, "_flash_lse_op", lambda: None)
    Y, M = _problem(gen, (2, 3), 7, 4, 5)
    mask = torch.rand(2, 3, 7, generator=gen) > 0.4
    mask[..., 0] = True
    for scale in (None, 0.37):
        E = AttentionEnergy(M, scale=scale)
        alpha = _alpha(E, preconditioner)
        for mk in (None, mask):
            with torch.no_grad():
                Yp, e = attention_step_fused_and_energy(Y, M, alpha, scale=scale, preconditioner=preconditioner,
                                                        token_mask=mk)
            _close(Yp, E.step(Y, alpha, preconditioner=preconditioner, token_mask=mk))
            _close(e, E.energy(Y, mk), 1e-12)
    Yg = Y.clone().requires_grad_(True)
    _, e = attention_step_fused_and_energy(Yg, M, _alpha(AttentionEnergy(M), preconditioner),
                                           preconditioner=preconditioner)
    (g,) = torch.autograd.grad(e.sum(), Yg)
    _close(g, AttentionEnergy(M).grad(Y))


# --- the key bias β: regression and the equal-norm case --------------------------------------------------------------


def test_plain_softmax_without_beta_can_increase_the_energy() -> None:
    """Search a few random instances for one where softmax(Y W Yᵀ) Y (no β) increases E; the β step never does."""
    found = None
    for s in range(300):
        g = torch.Generator().manual_seed(s)
        Y, M = _problem(g, (), 6, 3, 3)
        E = AttentionEnergy(M)
        plain = torch.softmax(Y @ E.W @ Y.T, dim=-1) @ Y
        if float(E.energy(plain)) > float(E.energy(Y)) + 1e-9:
            found = (Y, E)
            break
    assert found is not None, "no instance found where plain softmax increases the energy"
    Y, E = found
    assert float(E.energy(E.step(Y, 1.0))) <= float(E.energy(Y))


def test_plain_softmax_is_exact_for_equal_W_norms(gen: torch.Generator) -> None:
    Y, M = _problem(gen, (3,), 7, 4, 5)
    W = metric(M)
    Y = 1.3 * Y / ((Y @ W) * Y).sum(-1, keepdim=True).sqrt()  # ‖y_i‖_W = 1.3 for every token
    beta = key_bias(Y, W)
    _close(beta, torch.full_like(beta, -0.5 * 1.3**2))
    plain = torch.softmax(Y @ W @ Y.transpose(-1, -2), dim=-1)
    _close(plain, softmax_beta(Y, W))
    _close(plain @ Y, AttentionEnergy(M).step(Y, 1.0))


# --- ridge: null-slot attention --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
def test_ridge_step_is_null_slot_attention(shape: tuple, gen: torch.Generator) -> None:
    Y, M = _problem(gen, *shape)
    lam = 0.8
    E = AttentionEnergy(M, ridge=lam)
    Gamma = E.weights(Y)
    null_slot = (Gamma @ Y) / (lam + Gamma.sum(-1, keepdim=True))  # y_i⁺ = Σ_j γ_ij y_j / (λ + Σ_k γ_ik)
    _close(E.step(Y, 1.0), null_slot)
    # the same as a softmax over n + 1 slots: logits y_iᵀWy_j + β_j, null logit log λ − β_i, null value 0
    W = E.W
    beta = key_bias(Y, W)
    logits = torch.cat([Y @ W @ Y.transpose(-1, -2) + beta.unsqueeze(-2),
                        (math.log(lam) - beta).unsqueeze(-1)], dim=-1)
    A = torch.softmax(logits, dim=-1)[..., :-1]
    _close(E.step(Y, 1.0), A @ Y)


def test_plain_softmax_beta_step_can_increase_the_ridge_energy() -> None:
    """The ridge term is not translation invariant but softmax_β is: after translating the tokens far along
    v = Σ_j (colsum_j(A) − 1) y_j, the plain step grows ‖Y‖²_W linearly in the offset; the null-slot step descends."""
    g = torch.Generator().manual_seed(0)
    Y0, _ = _problem(g, (), 6, 2, 2)
    M = torch.eye(2, dtype=DT)
    plain_energy = AttentionEnergy(M)  # its step is the plain softmax_β step
    A = plain_energy.attention_matrix(Y0)
    v = (A.sum(0) - 1) @ Y0
    Y = Y0 + 200.0 * v / v.norm()  # translation: A is unchanged
    _close(plain_energy.attention_matrix(Y), A, 1e-8)
    E = AttentionEnergy(M, ridge=1.0)
    assert float(E.energy(plain_energy.step(Y, 1.0))) > float(E.energy(Y))
    assert float(E.energy(E.step(Y, 1.0))) <= float(E.energy(Y))


# --- key-padding mask ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preconditioner", ["metric", "token"])
@pytest.mark.parametrize("kernel", [GaussianKernel(), CauchyKernel()], ids=["gauss", "cauchy"])
def test_padding_mask_equals_unpadded_sequence(kernel: Kernel, preconditioner: str, gen: torch.Generator) -> None:
    Y, M = _problem(gen, (3,), 7, 4, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 0], [0, 0, 1, 0, 0, 0, 1]], dtype=torch.bool)
    E = AttentionEnergy(M, kernel=kernel, ridge=0.3)
    alpha = _alpha(E, preconditioner)
    step = E.step(Y, alpha, preconditioner=preconditioner, token_mask=mask)
    grad = E.grad(Y, token_mask=mask)
    energy = E.energy(Y, token_mask=mask)
    _close(grad, E.autograd_grad(Y, token_mask=mask))
    _close(step, Y - alpha * E.preconditioned_grad(Y, grad, preconditioner=preconditioner, token_mask=mask))
    for b in range(3):
        m = mask[b]
        Yb = Y[b][m]
        _close(energy[b], E.energy(Yb))
        _close(grad[b][m], E.grad(Yb))
        _close(step[b][m], E.step(Yb, alpha, preconditioner=preconditioner))
        assert bool((step[b][~m] == Y[b][~m]).all())  # padded tokens untouched
        assert bool((grad[b][~m] == 0).all())
    if isinstance(kernel, GaussianKernel):
        E0 = AttentionEnergy(M)
        alpha = _alpha(E0, preconditioner)
        _close(attention_step_fused(Y, M, alpha, preconditioner=preconditioner, token_mask=mask),
               E0.step(Y, alpha, preconditioner=preconditioner, token_mask=mask))


def test_mask_broadcasts_over_leading_dims(gen: torch.Generator) -> None:
    Y, M = _problem(gen, (2, 3), 6, 4, 5)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    E = AttentionEnergy(M)
    _close(E.step(Y, 1.0, token_mask=mask)[..., mask, :], E.step(Y[..., mask, :], 1.0))


# --- step-size ranges ------------------------------------------------------------------------------------------------


def test_step_ranges(gen: torch.Generator) -> None:
    _, M = _problem(gen, (), 5, 3, 4)
    lam = float(torch.linalg.eigvalsh(metric(M)).max())
    for kernel in (GaussianKernel(), PowerKernel(1.0, 0.1), CauchyKernel()):
        E = AttentionEnergy(M, kernel=kernel)
        r = E.step_range("metric")
        assert (r.low, r.high, r.high_inclusive) == (0.0, 2.0, False)
        r = E.step_range("token")
        assert math.isclose(r.high, 2.0 / lam, rel_tol=1e-10) and not r.high_inclusive
    E = AttentionEnergy(M, kernel=EpanechnikovKernel())
    r = E.step_range("metric")
    assert (r.low, r.high, r.high_inclusive) == (0.0, 1.0, True)
    r = E.step_range("token")
    assert math.isclose(r.high, 1.0 / lam, rel_tol=1e-10) and r.high_inclusive


def test_epanechnikov_gamma_can_be_indefinite() -> None:
    """Justifies psd_gram = False for that kernel (and shows the Γ ⪰ 0 check in test_kernels can fail)."""
    kernel = EpanechnikovKernel(c=1.0)
    found = False
    for s in range(50):
        X = torch.randn(12, 3, generator=torch.Generator().manual_seed(s), dtype=DT)
        lam = torch.linalg.eigvalsh(kernel.drho(0.5 * torch.cdist(X, X) ** 2))
        if float(lam.min()) < -1e-6:
            found = True
            break
    assert found


def test_step_outside_range_warns_or_raises(gen: torch.Generator) -> None:
    Y, M = _problem(gen, (2,), 5, 3, 4)
    E = AttentionEnergy(M)
    with pytest.warns(StepSizeWarning, match="alpha"):
        E.step(Y, 2.5)
    with pytest.warns(StepSizeWarning):
        E.step(Y, 1.01 * E.step_range("token").high, preconditioner="token")
    with pytest.warns(StepSizeWarning):
        attention_step_fused(Y, M, -0.1)
    with strict_mode(), pytest.raises(StepSizeError):
        E.step(Y, 2.0)
    E1 = AttentionEnergy(M, kernel=EpanechnikovKernel())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E1.step(Y, 1.0)  # (0, 1] is inclusive: no warning
    with pytest.warns(StepSizeWarning):
        E1.step(Y, 1.2)


# --- monotone descent inside the guaranteed ranges (hypothesis) ------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    kernel_idx=st.integers(0, len(ALL_KERNELS) - 1),
    preconditioner=st.sampled_from(["metric", "token"]),
    frac=st.floats(0.02, 1.0),
    ridge=st.sampled_from([0.0, 0.3, 2.0]),
    n=st.integers(2, 7),
    d=st.integers(1, 4),
    k=st.integers(1, 5),
    spread=st.floats(0.1, 3.0),
)
def test_descent_inside_guaranteed_range(seed, kernel_idx, preconditioner, frac, ridge, n, d, k, spread) -> None:
    g = torch.Generator().manual_seed(seed)
    Y, M = _problem(g, (2,), n, d, k)
    Y = spread * Y
    E = AttentionEnergy(M, kernel=ALL_KERNELS[kernel_idx], ridge=ridge)
    r = E.step_range(preconditioner)
    alpha = frac * min(r.high, 1e6)
    if not r.high_inclusive and frac == 1.0:
        alpha = 0.999 * r.high
    before, after = E.energy(Y), E.energy(E.step(Y, alpha, preconditioner=preconditioner))
    assert bool((after <= before + 1e-10 * (1 + before.abs())).all()), (before, after, alpha)


# --- bad input -------------------------------------------------------------------------------------------------------

_M = torch.randn(4, 5, dtype=DT)
_Y = torch.randn(2, 6, 4, dtype=DT)
_E = AttentionEnergy(_M)

BAD_INPUT = [
    ("Y rank 1", lambda: _E.energy(torch.randn(4, dtype=DT)), EnergyInputError, "`Y`"),
    ("Y width", lambda: _E.energy(torch.randn(2, 6, 3, dtype=DT)), EnergyInputError, "width"),
    ("Y int", lambda: _E.grad(torch.ones(2, 6, 4, dtype=torch.int64)), EnergyInputError, "floating"),
    ("Y nan", lambda: _E.step(torch.full((6, 4), float("nan"), dtype=DT)), EnergyInputError, "NaN"),
    ("Y inf", lambda: _E.energy(torch.full((6, 4), float("inf"), dtype=DT)), EnergyInputError, "inf"),
    ("Y list", lambda: _E.energy([[1.0, 2.0, 3.0, 4.0]]), EnergyInputError, "torch.Tensor"),
    ("mixed dtypes", lambda: _E.energy(_Y.float()), EnergyInputError, "mixed dtypes"),
    ("empty sequence", lambda: _E.energy(torch.zeros(2, 0, 4, dtype=DT)), EnergyInputError, "at least one token"),
    ("M 3-d", lambda: AttentionEnergy(torch.randn(2, 4, 5, dtype=DT)), EnergyInputError, "MultiHeadAttentionEnergy"),
    ("M 1-d", lambda: AttentionEnergy(torch.randn(4, dtype=DT)), EnergyInputError, "`M`"),
    ("M int", lambda: AttentionEnergy(torch.ones(4, 5, dtype=torch.int32)), EnergyInputError, "floating"),
    ("M nan", lambda: AttentionEnergy(torch.full((4, 5), float("nan"))), EnergyInputError, "NaN"),
    ("kernel type", lambda: AttentionEnergy(_M, kernel="gaussian"), EnergyInputError, "`kernel`"),
    ("scale 0", lambda: AttentionEnergy(_M, scale=0.0), EnergyInputError, "`scale`"),
    ("scale nan", lambda: AttentionEnergy(_M, scale=float("nan")), EnergyInputError, "`scale`"),
    ("ridge < 0", lambda: AttentionEnergy(_M, ridge=-1.0), EnergyInputError, "`ridge`"),
    ("preconditioner", lambda: _E.step(_Y, 1.0, preconditioner="diag"), EnergyInputError, "`preconditioner`"),
    ("range preconditioner", lambda: _E.step_range("euclid"), EnergyInputError, "`preconditioner`"),
    ("alpha nan", lambda: _E.step(_Y, float("nan")), EnergyInputError, "`alpha`"),
    ("mask dtype", lambda: _E.step(_Y, 1.0, token_mask=torch.ones(2, 6)), EnergyInputError, "`token_mask`"),
    ("mask length", lambda: _E.energy(_Y, token_mask=torch.ones(2, 5, dtype=torch.bool)), EnergyInputError,
     "`token_mask`"),
    ("mask batch", lambda: _E.energy(_Y, token_mask=torch.ones(3, 6, dtype=torch.bool)), EnergyInputError,
     "broadcast"),
    ("mask more dims than Y", lambda: _E.energy(_Y[0], token_mask=torch.ones(3, 6, dtype=torch.bool)),
     EnergyInputError, "broadcast"),
    ("G shape", lambda: _E.preconditioned_grad(_Y, torch.zeros(6, 4, dtype=DT), preconditioner="token"),
     EnergyInputError, "`G`"),
    ("W not symmetric", lambda: pairwise_sq_dist(_Y, torch.triu(torch.ones(4, 4, dtype=DT))), ConstraintError,
     "symmetric"),
    ("W not PSD", lambda: key_bias(_Y, -torch.eye(4, dtype=DT)), ConstraintError, "semi-definite"),
    ("W width", lambda: softmax_beta(_Y, torch.eye(3, dtype=DT)), EnergyInputError, "`W`"),
    ("fused M 4-d", lambda: attention_step_fused(_Y, torch.randn(1, 2, 4, 5, dtype=DT)), EnergyInputError, "`M`"),
    ("fused Y width", lambda: attention_step_fused(_Y, torch.randn(3, 5, dtype=DT)), EnergyInputError, "width"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_rejected_with_clear_error(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


# --- batch chunking (an evaluation-order detail) must not change any result ------------------------------------------


@pytest.mark.parametrize("preconditioner", ["metric", "token"])
def test_batch_chunking_does_not_change_results(preconditioner: str, gen: torch.Generator,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import energy.core.attention as attention_module

    Y, M = _problem(gen, (2, 3), 6, 4, 5)
    mask = torch.rand(2, 3, 6, generator=gen) > 0.3
    E = AttentionEnergy(M, kernel=CauchyKernel(), ridge=0.2)
    alpha = _alpha(E, preconditioner)
    whole = (E.energy(Y, mask), E.grad(Y, mask), E.step(Y, alpha, preconditioner=preconditioner, token_mask=mask))
    monkeypatch.setattr(attention_module, "CHUNK_ENTRIES", 40)  # one batch element per chunk
    chunked = (E.energy(Y, mask), E.grad(Y, mask), E.step(Y, alpha, preconditioner=preconditioner, token_mask=mask))
    for a, b in zip(whole, chunked):
        _close(a, b, 1e-13)
    _close(E.autograd_grad(Y, mask), whole[1])


def test_pairwise_sq_dist_broadcasts_a_stack_of_metrics():
    """One metric per head, ``W (h, d, d)``, against tokens ``(B, 1, n, d)``: z per head (docstring promise)."""
    g = torch.Generator().manual_seed(3)
    Y = torch.randn(2, 1, 5, 3, generator=g, dtype=torch.float64)
    M = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    W = M @ M.transpose(-1, -2)
    z = pairwise_sq_dist(Y, W)
    assert z.shape == (2, 4, 5, 5)
    for h in range(4):
        diff = Y[:, 0].unsqueeze(-2) - Y[:, 0].unsqueeze(-3)
        ref = 0.5 * torch.einsum("bijd,de,bije->bij", diff, W[h], diff)
        torch.testing.assert_close(z[:, h], ref, rtol=0, atol=1e-12)
