"""Converters: constrained nn.MultiheadAttention <-> attention energy step, in float64 (MATH §1.1, §1.2, §1.7)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _helpers import DT
from torch import nn

from energy._validation import ConstraintError, EnergyInputError, StepSizeWarning
from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy, metric
from energy.reference import multi_head_attention
from unfold.converters import (
    AttentionWeights,
    EnergyStep,
    check_layer,
    from_mha,
    key_bias_mask,
    nearest_constrained,
    to_energy,
    to_standard,
    verify_equivalence,
)
from unfold.steps import AttentionStep


def _energy(gen, h, d, k, orthogonal=False):
    if orthogonal:
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
        M = Q[:, : h * k].reshape(d, h, k).permute(1, 0, 2) @ torch.randn(h, k, k, generator=gen, dtype=DT)
    else:
        M = torch.randn(h, d, k, generator=gen, dtype=DT)
    return AttentionEnergy(M[0]) if h == 1 else MultiHeadAttentionEnergy(M)


CASES = [(1, 6, 6, "metric"), (1, 5, 3, "metric"), (2, 6, 3, "metric"), (3, 6, 2, "token"), (1, 4, 4, "token"),
         (2, 8, 4, "token"), (2, 6, 2, "metric")]


@pytest.mark.parametrize("h,d,k,prec", CASES)
def test_energy_step_equals_torch_mha_with_key_bias_mask(gen, h, d, k, prec):
    """Y R + α·nn.MultiheadAttention(Y; attn_mask = β) equals the energy's step, batch > 1, n ≠ d."""
    E = _energy(gen, h, d, k, orthogonal=(h > 1 and prec == "metric"))
    alpha = 0.6
    mha = to_standard(E, preconditioner=prec)
    assert isinstance(mha, nn.MultiheadAttention) and mha.num_heads == h
    Y = torch.randn(3, 7, d, generator=gen, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)
        res = verify_equivalence(mha, EnergyStep(E, alpha, prec), Y)
    assert res["max_abs_err"] < 1e-12
    assert res["max_abs_err_without_key_bias"] > 1e-6  # the plain layer is a different map for generic tokens
    assert not res["equal_W_norms"]


@pytest.mark.parametrize("h,d,k,prec", CASES[:4])
def test_roundtrip_layer_to_energy(gen, h, d, k, prec):
    E = _energy(gen, h, d, k, orthogonal=(h > 1 and prec == "metric"))
    mha = to_standard(E, preconditioner=prec)
    E2, step = to_energy(mha, preconditioner=prec)
    assert step.preconditioner == prec and math.isclose(step.alpha, 1.0, rel_tol=1e-12)
    torch.testing.assert_close(E2.W, E.W, rtol=0, atol=1e-12)  # same metric, W_h = κ M_h M_hᵀ
    Y = torch.randn(2, 5, d, generator=gen, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)
        torch.testing.assert_close(step(Y), E.step(Y, 1.0, preconditioner=prec), rtol=0, atol=1e-12)


def test_hand_built_mha_with_tied_query_key_is_step_a(gen):
    """nn.MultiheadAttention with W_Q = W_K, W_V = W_O = I, no biases: plain MHA(Y) = softmax(YWYᵀ)Y; with the
    β mask it is step (a) with α = 1."""
    d = 5
    mha = nn.MultiheadAttention(d, 1, bias=False, batch_first=True, dtype=DT)
    A = torch.randn(d, d, generator=gen, dtype=DT)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([A, A, torch.eye(d, dtype=DT)]))
        mha.out_proj.weight.copy_(torch.eye(d, dtype=DT))
    report = check_layer(mha)
    assert report.satisfied, str(report)
    E, step = to_energy(mha)
    torch.testing.assert_close(E.W, A.T @ A / math.sqrt(d), rtol=0, atol=1e-12)
    Y = torch.randn(4, 6, d, generator=gen, dtype=DT)
    res = verify_equivalence(mha, step, Y)
    assert res["max_abs_err"] < 1e-12
    # the reference functions agree with torch's module on the same weights
    w = from_mha(mha)
    torch.testing.assert_close(multi_head_attention(Y, Y, w.W_Q, w.W_K, w.W_V, w.W_O, num_heads=1),
                               mha(Y, Y, Y, need_weights=False)[0], rtol=0, atol=1e-12)


def test_asymmetric_factorisation_with_psd_product(gen):
    """W_Q ≠ W_K but W_Q W_Kᵀ symmetric PSD (here W_Q = ½ M, W_K = 2 M): still a descent-step layer; the factor is
    recovered from the product, not from W_Q."""
    d, h = 6, 2
    E = _energy(gen, h, d, d // h, orthogonal=True)
    w = from_mha(to_standard(E))
    w2 = AttentionWeights(0.5 * w.W_Q, 2.0 * w.W_K, w.W_V, w.W_O, h)
    assert not torch.equal(w2.W_Q, w2.W_K)
    E2, step = to_energy(w2)
    torch.testing.assert_close(E2.W, E.W, rtol=0, atol=1e-12)
    Y = torch.randn(2, 5, d, generator=gen, dtype=DT)
    torch.testing.assert_close(step(Y), E.step(Y, 1.0), rtol=0, atol=1e-12)


def test_equal_w_norm_tokens_make_the_plain_layer_exact(gen):
    """β is constant along rows when all tokens have the same W-norm: then the plain layer (no mask) is exact."""
    d = 5
    E = _energy(gen, 1, d, d)
    W = E.W.detach()
    Z = torch.randn(3, 6, d, generator=gen, dtype=DT)
    Y = Z / torch.einsum("bnd,de,bne->bn", Z, W, Z).sqrt().unsqueeze(-1)  # ‖y_j‖_W = 1 for all j
    res = verify_equivalence(to_standard(E), EnergyStep(E, 1.0, "metric"), Y)
    assert res["equal_W_norms"]
    assert res["max_abs_err_without_key_bias"] < 1e-12


def test_key_bias_mask_layout(gen):
    E = _energy(gen, 2, 6, 3, orthogonal=True)
    Y = torch.randn(3, 4, 6, generator=gen, dtype=DT)
    mask = key_bias_mask(Y, E)
    assert mask.shape == (3 * 2, 4, 4)
    W = metric(E.M)
    for b in range(3):
        for h in range(2):
            beta = -0.5 * torch.einsum("nd,de,ne->n", Y[b], W[h], Y[b])
            torch.testing.assert_close(mask[b * 2 + h], beta.expand(4, 4), rtol=0, atol=1e-13)


def test_attention_step_module_converts(gen):
    torch.manual_seed(0)
    step = AttentionStep(6, heads=2, orthogonal_heads=True, alpha=0.5).double()
    mha = to_standard(step)
    Y = torch.randn(2, 5, 6, generator=gen, dtype=DT)
    res = verify_equivalence(mha, step, Y)
    assert res["max_abs_err"] < 1e-12 and res["alpha"] == 0.5
    torch.testing.assert_close(step(Y), step.energy.step(Y, 0.5), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- unconstrained layers


def test_unconstrained_layer_report_names_each_constraint(gen):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(6, 2, batch_first=True, dtype=DT)  # random weights, with biases
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    report = check_layer(mha)
    assert not report.satisfied
    text = str(report)
    w = from_mha(mha)
    S0 = w.heads("W_Q")[0] @ w.heads("W_K")[0].T
    asym = float(torch.linalg.matrix_norm(0.5 * (S0 - S0.T)) / torch.linalg.matrix_norm(S0))
    assert f"head 0: W_Q W_Kᵀ is not symmetric: ‖asym‖/‖W‖ = {asym:.3g}" in text
    assert "bias b_Q is non-zero" in text and "value/output map" in text
    with pytest.raises(ConstraintError, match="(?s)not symmetric.*nearest_constrained"):
        to_energy(mha)


def test_nearest_constrained_layer(gen):
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(6, 2, bias=False, batch_first=True, dtype=DT)
    near, info = nearest_constrained(mha)
    assert check_layer(near).satisfied
    assert all(0 < q < 2 for q in info["qk_distance"])
    w, wn = from_mha(mha), from_mha(near)
    S = w.heads("W_Q") @ w.heads("W_K").transpose(-1, -2)
    Sn = wn.heads("W_Q") @ wn.heads("W_K").transpose(-1, -2)
    for h in range(2):
        rel = float(torch.linalg.matrix_norm(S[h] - Sn[h]) / torch.linalg.matrix_norm(S[h]))
        assert abs(rel - info["qk_distance"][h]) < 1e-12
        # nearer than another constrained candidate: W_Q W_Qᵀ (tie the keys to the queries)
        other = w.heads("W_Q")[h] @ w.heads("W_Q")[h].T
        assert rel <= float(torch.linalg.matrix_norm(S[h] - other) / torch.linalg.matrix_norm(S[h])) + 1e-12
        # and nearer than random PSD rank-d_head matrices
        for _ in range(5):
            F = torch.randn(6, 3, generator=gen, dtype=DT)
            assert torch.linalg.matrix_norm(S[h] - Sn[h]) <= torch.linalg.matrix_norm(S[h] - F @ F.T) + 1e-12
    # a constrained layer is its own nearest layer
    _, info2 = nearest_constrained(near)
    assert max(info2["qk_distance"]) < 1e-12 and max(info2["value_distance"]) < 1e-12


def test_bad_inputs(gen):
    with pytest.raises(EnergyInputError,
                       match="not supported; check_layer accepts: nn.MultiheadAttention, .*AttentionWeights, dict"):
        check_layer(nn.Linear(3, 3))
    with pytest.raises(EnergyInputError, match="value"):
        check_layer(nn.MultiheadAttention(4, 1, dtype=DT), value="free")
    with pytest.raises(EnergyInputError, match="kdim"):
        check_layer(nn.MultiheadAttention(4, 1, kdim=3, vdim=3, dtype=DT))
    kv = nn.MultiheadAttention(4, 1, add_bias_kv=True, bias=False, dtype=DT)
    assert any("bias_k" in f for f in check_layer(kv).failures)
    with pytest.raises(EnergyInputError, match="num_heads"):
        AttentionWeights(*(torch.zeros(4, 4, dtype=DT),) * 4, num_heads=3)
    E = _energy(gen, 3, 6, 3)  # k = 3 > d/h = 2 with full rank: not representable by an MHA head
    with pytest.raises(EnergyInputError, match="d_head"):
        to_standard(E)


def test_reference_weights_dict_and_reference_attention(gen):
    """Reference weights (right-acting dict) convert as well, and energy.reference.multi_head_attention with the key
    bias as an additive mask reproduces step (a) (one head: the mask is shared by the heads there)."""
    d = 5
    E = _energy(gen, 1, d, 3)
    w = from_mha(to_standard(E))
    weights = {"W_Q": w.W_Q, "W_K": w.W_K, "W_V": w.W_V, "W_O": w.W_O, "num_heads": 1}
    E2, step = to_energy(weights)
    Y = torch.randn(3, 6, d, generator=gen, dtype=DT)
    torch.testing.assert_close(step(Y), E.step(Y, 1.0), rtol=0, atol=1e-12)
    beta = key_bias_mask(Y, E)[:, :1, :]  # (B, 1, n): β_j for every query row
    ref = multi_head_attention(Y, Y, w.W_Q, w.W_K, w.W_V, w.W_O, num_heads=1, mask=beta)
    torch.testing.assert_close(ref, E.step(Y, 1.0), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- one step vocabulary (issue #8)


@pytest.mark.parametrize("prec", ["metric", "token"])
def test_preconditioner_vocabulary_and_deprecated_value(gen, prec):
    """Converters name the step as the energies do (Preconditioner METRIC = (a), TOKEN = (b)); the former
    ``value="identity"|"metric"`` still works for one release, with a DeprecationWarning, mapped identity->metric and
    metric->token."""
    from energy.core import Preconditioner

    E = _energy(gen, 2, 6, 3, orthogonal=True)
    member = Preconditioner(prec)
    mha = to_standard(E, preconditioner=member)
    report = check_layer(mha, preconditioner=member)
    assert report.satisfied and report.preconditioner is member
    assert check_layer(mha, preconditioner=prec).preconditioner is member  # plain strings accepted
    _, step = to_energy(mha, preconditioner=member)
    assert step.preconditioner is member and f"preconditioner={prec!r}" in repr(step)
    old = "identity" if prec == "metric" else "metric"
    with pytest.warns(DeprecationWarning, match=f"preconditioner='{prec}'"):
        _, old_step = to_energy(mha, value=old)
    assert old_step.preconditioner is member and old_step.alpha == step.alpha
    with pytest.warns(DeprecationWarning):
        assert check_layer(mha, value=old).preconditioner is member
    with pytest.warns(DeprecationWarning):
        _, info = nearest_constrained(mha, value=old)
    assert max(info["value_distance"]) < 1e-12
    with pytest.warns(DeprecationWarning, match="ConstraintReport.preconditioner"):
        assert report.value == old
    other = "token" if prec == "metric" else "metric"
    with pytest.warns(DeprecationWarning), pytest.raises(EnergyInputError, match="contradicts"):
        check_layer(mha, value=old, preconditioner=other)
    with pytest.raises(EnergyInputError, match="'metric' .*step \\(a\\).*'token'"):
        to_energy(mha, preconditioner="identity")


@pytest.mark.parametrize("h,prec", [(1, "metric"), (2, "metric"), (2, "token")])
def test_skip_map_is_identity_minus_alpha_value_maps(gen, h, prec):
    """R = I − α Σ_h V_h O_h with the value/output maps of the converted layer (MATH §1.5)."""
    from unfold.converters import skip_map

    E = _energy(gen, h, 6, 3, orthogonal=True)
    w = from_mha(to_standard(E, preconditioner=prec))
    VO = (w.heads("W_V") @ w.heads("W_O")).sum(0)
    torch.testing.assert_close(skip_map(E, 0.3, prec), torch.eye(6, dtype=DT) - 0.3 * VO, rtol=0, atol=1e-13)
