"""check_layer on real layers: causal masks, TransformerEncoderLayer, GPT-2, LLaMA/Mistral, MultiHeadAttentionLayer
(MATH §1.1–§1.7), float64, tiny seeded models."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _helpers import DT
from torch import nn

from energy._validation import ConstraintError, EnergyInputError, StepSizeWarning
from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy
from energy.core import Preconditioner
from energy.ffn import TiedReLUEnergy
from energy.hessian.multihead import MultiHeadAttentionLayer
from unfold.converters import (
    causal_gap,
    check_layer,
    from_mha,
    key_bias_mask,
    nearest_constrained,
    skip_map,
    to_standard,
)
from unfold.layer_diagnosis import diagnose, probe_input


def _tied_mha(gen, d):
    """The issue's case: one head, W_Q = W_K, W_V = W_O = I, no biases (a constrained step (a) layer)."""
    mha = nn.MultiheadAttention(d, 1, bias=False, batch_first=True, dtype=DT)
    A = torch.randn(d, d, generator=gen, dtype=DT)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([A, A, torch.eye(d, dtype=DT)]))
        mha.out_proj.weight.copy_(torch.eye(d, dtype=DT))
    return mha


def _causal_additive(n):
    return torch.full((n, n), -math.inf, dtype=DT).triu(1)


def test_causal_tied_query_key_layer_is_reported(gen):
    """Regression (issue #11): a causal layer with tied Q/K was reported satisfied; now the causal mask fails, sized."""
    mha = _tied_mha(gen, 5)
    assert check_layer(mha).satisfied  # the same weights without the mask: a constrained layer
    report = check_layer(mha, causal=True)
    assert not report.satisfied
    [failure] = report.failures
    assert failure.startswith("causal mask (causal=True)") and "N(0, 1) of shape (2, 8, 5)" in failure
    assert report.measures["causal_gap"] > 1e-2 and f"{report.measures['causal_gap']:.3g}" in failure
    assert "none exists" in report.nearest and "causal" in str(report)


@pytest.mark.parametrize("h,d,prec,alpha", [(1, 5, "metric", 1.0), (1, 4, "token", 0.3), (2, 6, "metric", 0.7),
                                            (3, 6, "token", 0.2)])
def test_causal_gap_equals_torch_mha_with_causal_mask(gen, h, d, prec, alpha):
    """causal_gap (core formulas, masked kernel) equals the gap of nn.MultiheadAttention run with key-bias + causal
    mask against energy.step — two implementations; and the mask-free torch layer reproduces the step."""
    M = torch.randn(h, d, d // h, generator=gen, dtype=DT)
    E = AttentionEnergy(M[0]) if h == 1 else MultiHeadAttentionEnergy(M)
    mha = to_standard(E, preconditioner=prec)
    Y = probe_input(d, DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)  # non-orthogonal heads: descent not guaranteed, still a step
        target = E.step(Y, alpha, preconditioner=prec)
    R = skip_map(E, alpha, prec)
    mask = key_bias_mask(Y, E)
    with torch.no_grad():
        plain = Y @ R + alpha * mha(Y, Y, Y, attn_mask=mask, need_weights=False)[0]
        causal = Y @ R + alpha * mha(Y, Y, Y, attn_mask=mask + _causal_additive(Y.shape[1]), need_weights=False)[0]
    assert (plain - target).abs().max() < 1e-12
    expected = float((causal - target).norm() / target.norm())
    got = causal_gap(M, E.scale, Preconditioner(prec), alpha)
    assert abs(got - expected) <= 1e-10 * expected and expected > 1e-3


def _reference_attention(w, X, causal):
    """Σ_h softmax(κ Q_h K_hᵀ + mask) V_h W_O^h + b_O with biases, from AttentionWeights (per query head)."""
    z = torch.zeros(w.W_Q.shape[1], dtype=DT)
    Q, K, V = (X @ getattr(w, f"W_{c}") + (getattr(w, f"b_{c}") if getattr(w, f"b_{c}") is not None else z)
               for c in "QKV")
    h, dh = w.num_heads, w.d_head
    Q, K, V = (t.unflatten(-1, (h, dh)).transpose(1, 2) for t in (Q, K, V))
    logits = w.kappa * Q @ K.transpose(-1, -2) + (_causal_additive(X.shape[1]) if causal else 0)
    out = (torch.softmax(logits, -1) @ V).transpose(1, 2).flatten(-2) @ w.W_O
    return out + (w.b_O if w.b_O is not None else 0)


def _randomise_biases(module, gen):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))


@pytest.fixture(scope="module")
def gpt2():
    pytest.importorskip("transformers")
    from energy.hessian.hf import build_model
    return build_model("gpt2-tiny", seed=0)


def test_gpt2_attention_split_biases_and_causal(gpt2, gen):
    """The fused c_attn split into per-head Q/K/V reproduces GPT2Attention (with its biases, causal mask); the
    report names biases with their norms, the causal mask with its size, and that no nearest layer exists."""
    import copy
    attn = copy.deepcopy(gpt2.transformer.h[1].attn)
    _randomise_biases(attn, gen)
    w = diagnose(attn).weights
    X = torch.randn(2, 7, w.d, generator=gen, dtype=DT)
    with torch.no_grad():
        got = attn(X, attention_mask=_causal_additive(7)[None, None])[0]
    torch.testing.assert_close(got, _reference_attention(w, X, True), rtol=0, atol=1e-12)
    report = check_layer(attn)
    assert report.kind == "GPT2Attention" and not report.satisfied
    b_Q = attn.c_attn.bias.detach()[: w.d]
    assert math.isclose(report.measures["b_Q_norm"], float(b_Q.norm()), rel_tol=1e-12)
    assert any(f.startswith("bias b_O is non-zero") for f in report.failures)
    assert any(f.startswith("causal mask (GPT-2 attention is causal by construction)") for f in report.failures)
    assert len(report.measures["qk_asymmetry"]) == attn.num_heads
    assert "none exists" in report.nearest
    with pytest.raises(ConstraintError, match="causal mask"):
        nearest_constrained(attn)


def test_gpt2_block_report(gpt2):
    """A GPT-2 block: Pre-LN, GELU, untied FFN, causal; the skip mismatch equals ‖Σ_h W_V^h W_O^h‖/‖I‖ read off
    c_attn/c_proj directly."""
    block = gpt2.transformer.h[0]
    report = check_layer(block)
    text = str(report)
    assert text.startswith("GPT2Block: unconstrained layer:")
    for part in ("Pre-LN", "FFN activation NewGELUActivation", "FFN weights not tied", "causal mask", "residual"):
        assert part in text, part
    d = block.attn.embed_dim
    Wv, Wo = block.attn.c_attn.weight.detach()[:, 2 * d:], block.attn.c_proj.weight.detach()
    expected = float((Wv @ Wo).norm() / math.sqrt(d))  # Σ_h W_V^h W_O^h = W_V W_O
    assert math.isclose(report.measures["skip_mismatch"], expected, rel_tol=1e-12)
    assert report.measures["norm_placement"] == "Pre-LN" and "inactive in eval mode" in text
    block.train()
    try:
        assert any(f.startswith("dropout active") for f in check_layer(block).failures)
    finally:
        block.eval()


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny"])
def test_llama_style_attention_rope_gqa_causal(preset, gen):
    """LLaMA/Mistral attention: the GQA expansion reproduces the module (RoPE switched off by cos = 1, sin = 0);
    RoPE, causal and GQA are reported; no nearest constrained layer."""
    pytest.importorskip("transformers")
    from energy.hessian.hf import build_model, eager_attention
    model = build_model(preset, seed=1)
    attn = model.model.layers[0].self_attn
    w = diagnose(attn).weights
    X = torch.randn(2, 6, w.d, generator=gen, dtype=DT)
    cos, sin = torch.ones(2, 6, w.d_head, dtype=DT), torch.zeros(2, 6, w.d_head, dtype=DT)
    with torch.no_grad(), eager_attention(model):  # the float64 softmax (LLaMA's eager one rounds through float32)
        got = attn(X, position_embeddings=(cos, sin), attention_mask=_causal_additive(6)[None, None])[0]
    torch.testing.assert_close(got, _reference_attention(w, X, True), rtol=0, atol=1e-12)
    report = check_layer(attn)
    text = str(report)
    assert "rotary position embedding (RoPE)" in text and report.measures["rope_logit_change"] > 1e-2
    assert "grouped-query attention (2 K/V heads for 4 query heads" in text
    assert "causal mask" in text and "RoPE (position-dependent rotation)" in report.nearest
    with pytest.raises(ConstraintError, match="RoPE"):
        nearest_constrained(attn)


def _constrained_encoder(gen, d=6, h=2, m=10, norm_first=False, activation="relu"):
    M = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))[0][:, : d].reshape(d, h, d // h).transpose(0, 1)
    E = MultiHeadAttentionEnergy(M.contiguous())
    mha = to_standard(E)
    layer = nn.TransformerEncoderLayer(d, h, m, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first, dtype=DT).eval()
    W_1 = torch.randn(d, m, generator=gen, dtype=DT)
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(mha.in_proj_weight)
        layer.self_attn.out_proj.weight.copy_(mha.out_proj.weight)
        layer.self_attn.in_proj_bias.zero_()
        layer.self_attn.out_proj.bias.zero_()
        layer.linear1.weight.copy_(W_1.T)
        layer.linear1.bias.copy_(torch.randn(m, generator=gen, dtype=DT))
        layer.linear2.weight.copy_(0.4 * W_1)  # right acting W_2 = 0.4 W_1ᵀ
        layer.linear2.bias.zero_()
    return layer, E, W_1


def test_transformer_encoder_layer_constrained_parts(gen):
    """Constrained attention + tied ReLU FFN in a Post-LN encoder layer: only the residual fails, sized
    ‖Σ_h P_h‖/‖I‖; the FFN sublayer with its residual is TiedReLUEnergy's step (α = 0.4)."""
    layer, E, W_1 = _constrained_encoder(gen)
    report = check_layer(layer)
    assert [f.split(":")[0] for f in report.failures] == ["residual"]
    P = from_mha(layer.self_attn).vo_products().sum(0)
    assert math.isclose(report.measures["skip_mismatch"], float(P.norm() / math.sqrt(6)), rel_tol=1e-12)
    assert report.measures["ffn_tie_distance"] < 1e-12 and math.isclose(report.measures["ffn_alpha"], 0.4)
    assert any(n.startswith("Post-LN") for n in report.notes)
    Y = torch.randn(3, 5, 6, generator=gen, dtype=DT)
    with torch.no_grad():
        ffn = Y + layer._ff_block(Y)
    step = TiedReLUEnergy(W_1, layer.linear1.bias.detach()).step(Y, 0.4)
    torch.testing.assert_close(ffn, step, rtol=0, atol=1e-12)
    nearest, info = nearest_constrained(layer)
    assert max(info["qk_distance"]) < 1e-12 and isinstance(nearest, nn.MultiheadAttention)
    assert "nearest_constrained(layer) returns it" in report.nearest


def test_transformer_encoder_layer_failures(gen):
    """Pre-LN, GELU, untied FFN, output bias, affine LayerNorm, active dropout and causal=True are each reported."""
    layer, _, _ = _constrained_encoder(gen, norm_first=True, activation="gelu")
    with torch.no_grad():
        layer.linear2.bias.fill_(0.5)
        layer.norm1.weight.fill_(2.0)
    report = check_layer(layer, causal=True)
    heads = [f.split(" (")[0].split(":")[0] for f in report.failures]
    for part in ("causal mask", "Pre-LN", "norm1", "residual", "FFN activation gelu", "FFN output bias non-zero"):
        assert part in heads, (part, heads)
    assert math.isclose(report.measures["norm1_affine"]["rms(γ − 1)"], 1.0, rel_tol=1e-12)
    assert math.isclose(report.measures["ffn_b_2_norm"], 0.5 * math.sqrt(6), rel_tol=1e-12)
    with torch.no_grad():
        layer.linear2.weight.add_(torch.randn(layer.linear2.weight.shape, generator=gen, dtype=DT))
    assert any(f.startswith("FFN weights not tied") for f in check_layer(layer).failures)
    train = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.25, dtype=DT).train()
    assert any("dropout active" in f for f in check_layer(train).failures)


def test_multihead_attention_layer(gen):
    """The library's MultiHeadAttentionLayer: constrained (tied per head) is satisfied with the same report as its
    nn.MultiheadAttention; causal gives the same gap; GQA with W_Q^h = W_K^g C_h (C_h ⪰ 0) passes the
    query–key constraints; d_v ≠ k padding keeps the products; linear, mask and d_out ≠ d are reported."""
    M = torch.randn(2, 6, 3, generator=gen, dtype=DT)
    w = from_mha(to_standard(MultiHeadAttentionEnergy(M)))
    mh = MultiHeadAttentionLayer(w.heads("W_Q"), w.heads("W_K"), w.heads("W_V"), w.heads("W_O"))
    assert check_layer(mh).satisfied and check_layer(w).satisfied
    gap = check_layer(mh, causal=True).measures["causal_gap"]
    assert gap > 1e-3 and math.isclose(gap, check_layer(w, causal=True).measures["causal_gap"], rel_tol=1e-12)
    assert not check_layer(MultiHeadAttentionLayer(*mh_args(mh), causal=True)).satisfied
    # grouped-query attention: 4 query heads on 2 K/V groups, W_Q^h = W_K^g C_h, C_h = B Bᵀ
    W_K = torch.randn(2, 6, 3, generator=gen, dtype=DT)
    B = torch.randn(4, 3, 3, generator=gen, dtype=DT)
    W_Q = W_K.repeat_interleave(2, 0) @ (B @ B.transpose(-1, -2))
    gqa = MultiHeadAttentionLayer(W_Q, W_K, torch.randn(2, 6, 5, generator=gen, dtype=DT),
                                  torch.randn(4, 5, 6, generator=gen, dtype=DT))
    report = check_layer(gqa)
    assert max(report.measures["qk_asymmetry"]) < 1e-12 and min(report.measures["qk_lambda_min_rel"]) > -1e-12
    assert any(n.startswith("grouped-query attention") for n in report.notes)
    assert all(f.startswith("head") and "value/output" in f for f in report.failures)
    dw = diagnose(gqa).weights
    torch.testing.assert_close(dw.qk_products(), W_Q @ W_K.repeat_interleave(2, 0).transpose(-1, -2), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(dw.vo_products(), gqa.W_V.repeat_interleave(2, 0) @ gqa.W_O, rtol=0, atol=1e-12)
    assert math.isclose(dw.kappa, 1 / math.sqrt(3))
    assert any(f.startswith("linear attention") for f in check_layer(MultiHeadAttentionLayer(*mh_args(mh),
                                                                                             linear=True)).failures)
    masked = MultiHeadAttentionLayer(*mh_args(mh), mask=torch.ones(4, 4, dtype=torch.bool).tril())
    assert any(f.startswith("a fixed attention mask (0.625") for f in check_layer(masked).failures)
    with pytest.raises(EnergyInputError, match="d_out"):
        check_layer(MultiHeadAttentionLayer(W_Q, W_K, gqa.W_V, torch.randn(4, 5, 3, generator=gen, dtype=DT)))


def mh_args(mh):
    return mh.W_Q, mh.W_K, mh.W_V, mh.W_O


def test_unsupported_objects_list_the_supported_types():
    with pytest.raises(EnergyInputError, match="nn.TransformerEncoderLayer, transformers GPT2Attention, "
                                               "transformers GPT2Block"):
        check_layer(nn.Linear(3, 3))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(2, 2)

    with pytest.raises(EnergyInputError, match="attention sublayer `attn`"):
        check_layer(Wrapper())
    with pytest.raises(EnergyInputError, match="`causal` must be True or False"):
        check_layer(nn.MultiheadAttention(4, 1, dtype=DT), causal=1)


def test_import_unfold_does_not_import_transformers():
    code = "import sys, unfold, unfold.converters; assert 'transformers' not in sys.modules"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_gpt2_layer_scaled_attention_and_to_energy():
    """scale_attn_by_inverse_layer_idx: κ = 1/(√d_head·(layer_idx + 1)) is read off, reproduces the module, and is
    noted; to_energy of a GPT-2 block raises without pointing to a nearest layer that does not exist."""
    pytest.importorskip("transformers")
    from energy.hessian.hf import build_model
    from unfold.converters import to_energy
    model = build_model("gpt2-tiny", seed=2, scale_attn_by_inverse_layer_idx=True)
    attn = model.transformer.h[1].attn
    w = diagnose(attn).weights
    assert math.isclose(w.kappa, 1 / (2 * math.sqrt(w.d_head)), rel_tol=1e-15)
    X = torch.randn(1, 5, w.d, generator=torch.Generator().manual_seed(3), dtype=DT)
    with torch.no_grad():
        got = attn(X, attention_mask=_causal_additive(5)[None, None])[0]
    torch.testing.assert_close(got, _reference_attention(w, X, True), rtol=0, atol=1e-12)
    assert any("scale_attn_by_inverse_layer_idx" in n for n in check_layer(attn).notes)
    with pytest.raises(ConstraintError) as err:
        to_energy(model.transformer.h[0])
    assert "none exists" in str(err.value) and "gives the nearest" not in str(err.value)


@pytest.mark.parametrize("h,d,k", [(1, 5, 3), (2, 6, 3), (3, 7, 2)])
def test_multihead_attention_layer_with_own_scale_converts(gen, h, d, k):
    """A constrained MultiHeadAttentionLayer with κ = 0.3 (W_Q = W_K = M_h, W_V W_O = P_h, or I for one head)
    converts to the energy W_h = 0.3 M_h M_hᵀ (the scale travels through AttentionWeights.kappa)."""
    from unfold.converters import to_energy
    U = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))[0][:, : h * k].reshape(d, h, k).transpose(0, 1)
    M = U @ torch.randn(h, k, k, generator=gen, dtype=DT)
    if h == 1:  # one head: the value map is the identity
        W_V, W_O = torch.eye(d, dtype=DT)[None], torch.eye(d, dtype=DT)[None]
        W_Q = torch.cat([M, M.new_zeros(1, d, d - k)], -1)
    else:
        W_V, W_O, W_Q = U, U.transpose(-1, -2), M
    mh = MultiHeadAttentionLayer(W_Q, W_Q, W_V, W_O, scale=0.3)
    report = check_layer(mh)
    assert report.satisfied, str(report)
    E, _ = to_energy(mh)
    W_expected = 0.3 * M @ M.transpose(-1, -2)
    torch.testing.assert_close(E.W if h > 1 else E.W[None], W_expected, rtol=0, atol=1e-12)


def test_sliding_window_and_cross_attention():
    """A Mistral sliding window is a further mask failure; a cross-attention GPT2Attention is refused clearly."""
    pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    from energy.hessian.hf import build_model
    attn = build_model("mistral-tiny", seed=0, sliding_window=3).model.layers[0].self_attn
    report = check_layer(attn)
    assert any(f.startswith("sliding-window mask (window 3)") for f in report.failures)
    cross = GPT2Attention(build_model("gpt2-tiny").config, is_cross_attention=True, layer_idx=0)
    with pytest.raises(EnergyInputError, match="cross-attention GPT2Attention"):
        check_layer(cross)


@pytest.mark.parametrize("shape", [(1, 5), (3, 1, 5), (2, 4, 5), (4, 5)])
def test_causal_gap_on_given_tokens(gen, shape):
    """One token: the causal mask changes nothing (gap 0 to rounding); otherwise the gap equals the torch layer's."""
    M = torch.randn(1, 5, 5, generator=gen, dtype=DT)
    E = AttentionEnergy(M[0])
    Y = torch.randn(*shape, generator=gen, dtype=DT)
    gap = causal_gap(M, E.scale, Preconditioner.METRIC, 0.5, Y)
    if shape[-2] == 1:
        assert gap < 1e-15
        return
    Yb = Y if Y.ndim == 3 else Y[None]
    mha = to_standard(E)
    with torch.no_grad():
        out = mha(Yb, Yb, Yb, attn_mask=key_bias_mask(Yb, E) + _causal_additive(shape[-2]), need_weights=False)[0]
    causal = 0.5 * Yb + 0.5 * out
    target = E.step(Yb, 0.5)
    assert abs(gap - float((causal - target).norm() / target.norm())) <= 1e-10 * gap
    with pytest.raises(EnergyInputError, match="`Y` must be"):
        causal_gap(M, E.scale, Preconditioner.METRIC, 0.5, Y[..., :4])
