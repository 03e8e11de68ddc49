"""Multi-head attention energy (MATH §1.2): Σ_h E_h, orthogonal-subspace step with its guarantee, general heads
(descent measured, not asserted), fused SDPA path and nn.MultiheadAttention equivalence."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _helpers import DT
from hypothesis import given
from hypothesis import strategies as st

from energy._validation import ConstraintError, EnergyInputError, StepSizeWarning
from energy.attention import (
    AttentionEnergy,
    MultiHeadAttentionEnergy,
    attention_step_fused,
    attention_step_fused_and_energy,
    head_bases,
)
from energy.kernels import CauchyKernel, GaussianKernel, Kernel, PowerKernel

TOL = 1e-10
KERNELS = [GaussianKernel(), PowerKernel(1.0, 0.2), CauchyKernel()]
KIDS = [repr(k) for k in KERNELS]
# (batch, n, d, h, k, r): h heads, factor width k, each head's range of dimension r (h·r ≤ d)
SHAPES = [((2,), 7, 6, 3, 4, 2), ((2, 3), 5, 7, 2, 5, 3), ((), 6, 5, 2, 3, 2)]
SIDS = ["b2-n7-d6-h3", "b2x3-n5-d7-h2", "b0-n6-d5-h2"]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = float((a - b).detach().abs().max())
    assert err <= tol * max(1.0, float(b.detach().abs().max())), f"max abs err {err:.3e}"


def _tokens(gen: torch.Generator, batch: tuple, n: int, d: int) -> torch.Tensor:
    Y = torch.randn(*batch, n, d, generator=gen, dtype=DT)
    return Y * (0.3 + 1.5 * torch.rand(*batch, n, 1, generator=gen, dtype=DT))


def _orthogonal_heads(gen: torch.Generator, d: int, h: int, k: int, r: int) -> torch.Tensor:
    """M_h = Q_h R_h with Q_h disjoint column blocks of a random orthogonal matrix: M_hᵀ M_g = 0 for h ≠ g."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
    return torch.stack([Q[:, i * r:(i + 1) * r] @ torch.randn(r, k, generator=gen, dtype=DT) for i in range(h)])


def _general_heads(gen: torch.Generator, d: int, h: int, k: int) -> torch.Tensor:
    return torch.randn(h, d, k, generator=gen, dtype=DT)


# --- energy, gradient --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orth", "general"])
@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
@pytest.mark.parametrize("kernel", KERNELS, ids=KIDS)
def test_energy_is_sum_of_heads_and_grad_matches_autograd(
    kernel: Kernel, shape: tuple, orthogonal: bool, gen: torch.Generator
) -> None:
    batch, n, d, h, k, r = shape
    Y = _tokens(gen, batch, n, d)
    M = _orthogonal_heads(gen, d, h, k, r) if orthogonal else _general_heads(gen, d, h, k)
    E = MultiHeadAttentionEnergy(M, kernel=kernel, ridge=0.4)
    assert E.heads_orthogonal() == orthogonal
    per_head = sum(AttentionEnergy(M[i], kernel=kernel, ridge=0.4).energy(Y) for i in range(h))
    _close(E.energy(Y), per_head)
    _close(E.grad(Y), E.autograd_grad(Y))
    _close(E.grad(Y), sum(AttentionEnergy(M[i], kernel=kernel, ridge=0.4).grad(Y) for i in range(h)))


# --- orthogonal heads: a preconditioned gradient step with the single-head guarantee ----------------------------------


@pytest.mark.parametrize("preconditioner", ["metric", "token"])
@pytest.mark.parametrize("ridge", [0.0, 0.6])
@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
@pytest.mark.parametrize("kernel", [GaussianKernel(), CauchyKernel()], ids=["gauss", "cauchy"])
def test_orthogonal_step_is_preconditioned_autograd_step(
    kernel: Kernel, shape: tuple, ridge: float, preconditioner: str, gen: torch.Generator
) -> None:
    batch, n, d, h, k, r = shape
    Y = _tokens(gen, batch, n, d)
    E = MultiHeadAttentionEnergy(_orthogonal_heads(gen, d, h, k, r), kernel=kernel, ridge=ridge)
    alpha = 0.8 * min(2.0, E.step_range(preconditioner).high)
    G = E.autograd_grad(Y)
    # explicit: Σ_h (D_h + λI)⁻¹ G W_h⁺ (metric) or Σ_h (D_h + λI)⁻¹ G P_h (token)
    D = E.weights(Y).sum(-1) + ridge  # (..., h, n)
    right = torch.linalg.pinv(E.W, hermitian=True) if preconditioner == "metric" else E.projectors()
    P = ((G.unsqueeze(-3) / D.unsqueeze(-1)) @ right).sum(-3)
    step = E.step(Y, alpha, preconditioner=preconditioner)
    _close(step, Y - alpha * P, 1e-9)
    _close(step, Y - alpha * E.preconditioned_grad(Y, G, preconditioner=preconditioner), 1e-9)


@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
def test_orthogonal_metric_step_acts_per_subspace(shape: tuple, gen: torch.Generator) -> None:
    batch, n, d, h, k, r = shape
    Y = _tokens(gen, batch, n, d)
    M = _orthogonal_heads(gen, d, h, k, r)
    E = MultiHeadAttentionEnergy(M, kernel=CauchyKernel())
    alpha = 1.3
    Yp = E.step(Y, alpha)
    P = E.projectors()
    for i in range(h):
        A = AttentionEnergy(M[i], kernel=CauchyKernel()).attention_matrix(Y)
        _close(Yp @ P[i], (1 - alpha) * Y @ P[i] + alpha * A @ Y @ P[i])
        head = AttentionEnergy(M[i], kernel=CauchyKernel())
        assert bool((head.energy(Yp) <= head.energy(Y) + 1e-12).all())  # every head keeps its guarantee
    rest = torch.eye(d, dtype=DT) - P.sum(0)
    _close(Yp @ rest, Y @ rest)  # the energy does not see the complement; the step leaves it alone


def test_single_full_rank_head_equals_single_head_energy(gen: torch.Generator) -> None:
    Y = _tokens(gen, (2,), 6, 4)
    M = torch.randn(4, 5, generator=gen, dtype=DT)
    E1, Eh = AttentionEnergy(M), MultiHeadAttentionEnergy(M.unsqueeze(0))
    for pc in ("metric", "token"):
        alpha = 0.7 * min(2.0, E1.step_range(pc).high)
        _close(Eh.step(Y, alpha, preconditioner=pc), E1.step(Y, alpha, preconditioner=pc))


@given(
    seed=st.integers(0, 2**31 - 1),
    kernel_idx=st.integers(0, len(KERNELS) - 1),
    preconditioner=st.sampled_from(["metric", "token"]),
    frac=st.floats(0.02, 0.999),
    ridge=st.sampled_from([0.0, 0.5]),
    n=st.integers(2, 6),
    h=st.integers(1, 3),
    r=st.integers(1, 2),
    extra=st.integers(0, 2),
    k=st.integers(1, 4),
)
def test_orthogonal_heads_descend_inside_range(seed, kernel_idx, preconditioner, frac, ridge, n, h, r, extra, k):
    g = torch.Generator().manual_seed(seed)
    d = h * r + extra
    r_eff = min(r, k)
    Y = 2.0 * _tokens(g, (2,), n, d)
    E = MultiHeadAttentionEnergy(_orthogonal_heads(g, d, h, k, r_eff), kernel=KERNELS[kernel_idx], ridge=ridge)
    assert E.heads_orthogonal()
    alpha = frac * min(E.step_range(preconditioner).high, 1e6)
    before, after = E.energy(Y), E.energy(E.step(Y, alpha, preconditioner=preconditioner))
    assert bool((after <= before + 1e-10 * (1 + before.abs())).all())


# --- general heads: not a preconditioned gradient step; descent measured ---------------------------------------------


def test_general_heads_step_is_sum_of_per_head_steps_and_has_no_guarantee(gen: torch.Generator) -> None:
    Y = _tokens(gen, (2,), 6, 5)
    M = _general_heads(gen, 5, 3, 2)
    E = MultiHeadAttentionEnergy(M)
    assert not E.heads_orthogonal()
    r = E.step_range("metric")
    assert r.high == 0.0 and 0.5 not in r
    with pytest.warns(StepSizeWarning, match="not mutually orthogonal"):
        Yp = E.step(Y, 0.5)
    P = E.projectors()
    expected = Y - 0.5 * sum((Y - AttentionEnergy(M[i]).attention_matrix(Y) @ Y) @ P[i] for i in range(3))
    _close(Yp, expected)
    with pytest.warns(StepSizeWarning):
        Yt = E.step(Y, 0.1, preconditioner="token")
    W = E.W
    _close(Yt, Y - 0.1 * sum((Y - AttentionEnergy(M[i]).attention_matrix(Y) @ Y) @ W[i] for i in range(3)))
    with pytest.raises(ConstraintError, match="not mutually orthogonal"):
        E.preconditioned_grad(Y)


def test_general_heads_descent_is_measured(record_property) -> None:
    """Measure (and record) how often the summed per-head step increases the energy for general (overlapping) heads.

    Nothing is asserted about the rate except what the measurement shows for this fixed seed set: the metric step
    does increase the energy on some instances at α = 1.5 (so the missing guarantee is real); orthogonal heads of
    the same size, which are guaranteed to descend, are asserted to have no increase.
    """
    trials = 25
    cases = [("metric", 0.5), ("metric", 1.0), ("metric", 1.5), ("token", 0.5), ("token", 1.0), ("token", 1.9)]
    violations = dict.fromkeys(cases, 0)
    for s in range(trials):
        g = torch.Generator().manual_seed(1000 + s)
        Y = 1.5 * _tokens(g, (), 6, 2)
        E_gen = MultiHeadAttentionEnergy(_general_heads(g, 2, 3, 2))  # 3 heads in a 2-d feature space
        E_orth = MultiHeadAttentionEnergy(_orthogonal_heads(g, 2, 2, 2, 1))
        lam_gen = float(torch.linalg.eigvalsh(E_gen.W.sum(0)).max())  # α is given as α·λ_max(Σ_h W_h) for "token"
        lam_orth = float(torch.linalg.eigvalsh(E_orth.W.sum(0)).max())
        for pc, a in cases:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", StepSizeWarning)
                alpha = a if pc == "metric" else a / lam_gen
                after = float(E_gen.energy(E_gen.step(Y, alpha, preconditioner=pc)))
            violations[(pc, a)] += int(after > float(E_gen.energy(Y)) + 1e-12)
            alpha = a if pc == "metric" else a / lam_orth
            assert float(E_orth.energy(E_orth.step(Y, alpha, preconditioner=pc))) <= float(E_orth.energy(Y)) + 1e-12
    rates = {f"{pc} alpha={a}": violations[(pc, a)] / trials for pc, a in cases}
    record_property("general_heads_violation_rate", rates)
    print("general-heads descent violation rate:", rates)
    assert violations[("metric", 1.5)] > 0


# --- fused SDPA path ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preconditioner", ["metric", "token"])
@pytest.mark.parametrize("shape", SHAPES, ids=SIDS)
def test_fused_multihead_equals_einsum_step(shape: tuple, preconditioner: str, gen: torch.Generator) -> None:
    batch, n, d, h, k, r = shape
    Y = _tokens(gen, batch, n, d)
    M = _orthogonal_heads(gen, d, h, k, r)
    E = MultiHeadAttentionEnergy(M)
    alpha = 0.7 * min(2.0, E.step_range(preconditioner).high)
    ref = E.step(Y, alpha, preconditioner=preconditioner)
    _close(attention_step_fused(Y, M, alpha, preconditioner=preconditioner), ref)
    _close(attention_step_fused(Y, M, alpha, preconditioner=preconditioner, value_basis=head_bases(M)), ref)
    mask = torch.rand(*batch, n, generator=gen) > 0.4
    mask[..., 0] = True
    _close(attention_step_fused(Y, M, alpha, preconditioner=preconditioner, token_mask=mask),
           E.step(Y, alpha, preconditioner=preconditioner, token_mask=mask))
    # general heads: same formula (sum of per-head steps), warned about
    Mg = _general_heads(gen, d, h, k)
    Eg = MultiHeadAttentionEnergy(Mg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)
        _close(attention_step_fused(Y, Mg, 0.1, preconditioner=preconditioner),
               Eg.step(Y, 0.1, preconditioner=preconditioner))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("orthogonal", [True, False], ids=["orth", "general"])
@pytest.mark.parametrize("preconditioner", ["metric", "token"])
@pytest.mark.parametrize("kernel", KERNELS, ids=KIDS)
def test_step_and_energy_equals_step_and_energy_separately(kernel: Kernel, preconditioner: str, orthogonal: bool,
                                                           masked: bool, gen: torch.Generator) -> None:
    batch, n, d, h, k, r = SHAPES[1]
    Y = _tokens(gen, batch, n, d)
    M = _orthogonal_heads(gen, d, h, k, r) if orthogonal else _general_heads(gen, d, h, k)
    mask = None
    if masked:
        mask = torch.rand(*batch, n, generator=gen) > 0.4
        mask[..., 0] = True
    for ridge in (0.0, 0.2):
        E = MultiHeadAttentionEnergy(M, kernel=kernel, ridge=ridge)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StepSizeWarning)  # general heads: no guaranteed range
            Yp, e = E.step_and_energy(Y, 0.3, preconditioner=preconditioner, token_mask=mask)
            _close(Yp, E.step(Y, 0.3, preconditioner=preconditioner, token_mask=mask), 1e-12)
        assert e.shape == batch
        _close(e, E.energy(Y, mask), 1e-12)
        if type(kernel) is GaussianKernel and ridge == 0.0:  # the fused path's energy (from the log-normalisers)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", StepSizeWarning)
                Yf, ef = attention_step_fused_and_energy(Y, M, 0.3, preconditioner=preconditioner,
                                                         token_mask=mask)
            _close(Yf, Yp)
            _close(ef, e, 1e-12)


def _grads_of_step(step, Y: torch.Tensor, M: torch.Tensor, alpha: torch.Tensor, C: torch.Tensor):
    """Gradients of ⟨C, step(Y, M, α)⟩ with respect to Y, M and α (reverse mode)."""
    Y, M, alpha = (t.detach().requires_grad_(True) for t in (Y, M, alpha))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)  # general heads: no guaranteed range
        out = step(Y, M, alpha)
    return out, torch.autograd.grad((out * C).sum(), (Y, M, alpha))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("heads", [0, 1, 3], ids=["single-2d", "h1", "h3"])
@pytest.mark.parametrize("preconditioner", ["metric", "token"])
def test_fused_step_gradients_equal_einsum_step_gradients(preconditioner: str, heads: int, masked: bool,
                                                          gen: torch.Generator) -> None:
    """Backward through attention_step_fused (SDPA with the β column added out of place while autograd records)
    equals backward through the einsum step, for ∂/∂Y, ∂/∂M and ∂/∂α (a tensor step size), float64."""
    batch, n, d, k = (2, 3), 5, 6, 4
    Y = _tokens(gen, batch, n, d)
    M = torch.randn(max(heads, 1), d, k, generator=gen, dtype=DT)  # general heads, full rank (distinct σ)
    if heads == 0:
        M = M[0]
    alpha = torch.tensor(0.3, dtype=DT)
    C = torch.randn(*batch, n, d, generator=gen, dtype=DT)
    mask = None
    if masked:
        mask = torch.rand(*batch, n, generator=gen) > 0.4
        mask[..., 0] = True

    def einsum_step(Y, M, a):
        E = AttentionEnergy(M) if M.ndim == 2 else MultiHeadAttentionEnergy(M)
        return E.step(Y, a, preconditioner=preconditioner, token_mask=mask)

    def fused_step(Y, M, a):
        return attention_step_fused(Y, M, a, preconditioner=preconditioner, token_mask=mask)

    out_ref, g_ref = _grads_of_step(einsum_step, Y, M, alpha, C)
    out, g = _grads_of_step(fused_step, Y, M, alpha, C)
    _close(out, out_ref)
    for a, b in zip(g, g_ref):
        _close(a, b)
    if M.ndim == 3 and preconditioner == "metric":  # a precomputed, differentiable value basis
        def cached(Y, M, a):
            return attention_step_fused(Y, M, a, token_mask=mask, value_basis=head_bases(M))

        for a, b in zip(_grads_of_step(cached, Y, M, alpha, C)[1], g_ref):
            _close(a, b)


def test_fused_step_passes_gradcheck(gen: torch.Generator) -> None:
    """Finite-difference check of the fused step's backward (float64, two general heads, token step)."""
    Y = torch.randn(2, 4, 5, generator=gen, dtype=DT, requires_grad=True)
    M = torch.randn(2, 5, 3, generator=gen, dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)
        assert torch.autograd.gradcheck(lambda Y, M: attention_step_fused(Y, M, 0.2, preconditioner="token"), (Y, M))
        assert torch.autograd.gradcheck(lambda Y, M: attention_step_fused(Y, M, 0.2), (Y, M))


# --- torch's nn.MultiheadAttention under the matching constraints -----------------------------------------------------


def _torch_mha(Y: torch.Tensor, Wq: torch.Tensor, Wv: torch.Tensor, Wo: torch.Tensor, h: int,
               beta: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention with W_Q = W_K = Wq (d×d), values Wv, output Wo (x ↦ x Wo), no biases, β as a float
    attention mask of shape (B·h, n, n)."""
    B, n, d = Y.shape
    mha = torch.nn.MultiheadAttention(d, h, bias=False, batch_first=True, dtype=DT)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([Wq.T, Wq.T, Wv.T]))
        mha.out_proj.weight.copy_(Wo.T)
    mask = beta.unsqueeze(-2).expand(B, h, n, n).reshape(B * h, n, n)
    return mha(Y, Y, Y, attn_mask=mask, need_weights=False)[0].detach()


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_orthogonal_metric_step_is_torch_multihead_attention(alpha: float, gen: torch.Generator) -> None:
    B, n, d, h = 3, 7, 6, 3
    k = d // h  # nn.MultiheadAttention: head width d/h for queries, keys and values
    Y = _tokens(gen, (B,), n, d)
    M = _orthogonal_heads(gen, d, h, k, k)
    E = MultiHeadAttentionEnergy(M)
    U = head_bases(M)  # P_h = U_h U_hᵀ, Σ_h P_h = I here
    cat = lambda T: T.permute(1, 0, 2).reshape(d, -1)  # (h, d, c) -> (d, h·c), heads in nn.MHA order
    K = torch.einsum("bnd,hdk->bhnk", Y, M)
    beta = -0.5 * (K * K).sum(-1) / math.sqrt(k)  # β_j per head = -½‖y_j‖²_{W_h}
    out = _torch_mha(Y, cat(M), cat(U), cat(U).T, h, beta)
    _close(E.step(Y, alpha), (1 - alpha) * Y + alpha * out)


def test_orthogonal_token_step_is_torch_multihead_attention_with_tied_values(gen: torch.Generator) -> None:
    B, n, d, h = 2, 5, 6, 2
    k = d // h
    Y = _tokens(gen, (B,), n, d)
    M = _orthogonal_heads(gen, d, h, k, k)
    E = MultiHeadAttentionEnergy(M)
    alpha = 0.9 * E.step_range("token").high
    kappa = 1 / math.sqrt(k)
    cat = lambda T: T.permute(1, 0, 2).reshape(d, -1)
    K = torch.einsum("bnd,hdk->bhnk", Y, M)
    beta = -0.5 * kappa * (K * K).sum(-1)
    out = _torch_mha(Y, cat(M), cat(M), alpha * kappa * cat(M).T, h, beta)  # W_V W_O = α W_h per head
    W = E.W.sum(0)
    _close(E.step(Y, alpha, preconditioner="token"), Y - alpha * Y @ W + out)


# --- bad input -------------------------------------------------------------------------------------------------------

_M3 = torch.randn(2, 4, 3, dtype=DT)
_Y = torch.randn(2, 5, 4, dtype=DT)

BAD_INPUT = [
    ("M 2-d", lambda: MultiHeadAttentionEnergy(torch.randn(4, 3, dtype=DT)), EnergyInputError, "3 dimensions"),
    ("Y width", lambda: MultiHeadAttentionEnergy(_M3).energy(torch.randn(5, 3, dtype=DT)), EnergyInputError, "width"),
    ("mixed dtypes", lambda: MultiHeadAttentionEnergy(_M3).grad(_Y.float()), EnergyInputError, "mixed dtypes"),
    ("Y int", lambda: MultiHeadAttentionEnergy(_M3).step(torch.ones(5, 4, dtype=torch.int64)), EnergyInputError,
     "floating"),
    ("kernel", lambda: MultiHeadAttentionEnergy(_M3, kernel=lambda z: z), EnergyInputError, "`kernel`"),
    ("fused width", lambda: attention_step_fused(torch.randn(5, 3, dtype=DT), _M3), EnergyInputError, "width"),
    ("fused value_basis", lambda: attention_step_fused(_Y, _M3, value_basis=torch.randn(3, 4, 2, dtype=DT)),
     EnergyInputError, "`value_basis`"),
    ("fused mask", lambda: attention_step_fused(_Y, _M3, token_mask=torch.ones(2, 5)), EnergyInputError,
     "`token_mask`"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_rejected_with_clear_error(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()
