"""Reference Transformer maths vs torch's own modules (float64, tolerance 1e-10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import DT, randn
from torch import nn

from energy._validation import EnergyInputError
from energy.reference import (
    attention_weights,
    causal_mask,
    feed_forward,
    layer_norm,
    linear_attention,
    multi_head_attention,
    rms_norm,
    single_head_attention,
)

TOL = 1e-10


def mha_weights(m: nn.MultiheadAttention) -> dict:
    """Right-acting weights of an nn.MultiheadAttention (rows of in_proj_weight are output features)."""
    if m._qkv_same_embed_dim:
        W_q, W_k, W_v = m.in_proj_weight.detach().chunk(3)
    else:
        W_q, W_k, W_v = (m.q_proj_weight.detach(), m.k_proj_weight.detach(), m.v_proj_weight.detach())
    b_q, b_k, b_v = m.in_proj_bias.detach().chunk(3)
    return dict(W_Q=W_q.T, W_K=W_k.T, W_V=W_v.T, W_O=m.out_proj.weight.detach().T, b_Q=b_q, b_K=b_k, b_V=b_v,
                b_O=m.out_proj.bias.detach(), num_heads=m.num_heads)


def make_mha(E, heads, gen, kdim=None):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = nn.MultiheadAttention(E, heads, batch_first=True, kdim=kdim, vdim=kdim, dtype=DT).eval()
    with torch.no_grad():  # non-zero biases (the module initialises them to 0)
        m.in_proj_bias.normal_()
        m.out_proj.bias.normal_()
    return m


# --------------------------------------------------------------------------------------------- multi-head attention


@pytest.mark.parametrize("heads", [1, 3])
def test_mha_self_attention_matches_nn_module(gen, heads):
    B, n, E = 2, 5, 6
    m = make_mha(E, heads, gen)
    X = randn(B, n, E, gen=gen)
    ref, _ = m(X, X, X, need_weights=False)
    out = multi_head_attention(X, X, **mha_weights(m))
    assert out.shape == (B, n, E)
    assert (out - ref).abs().max() < TOL


def test_mha_cross_attention_kdim_and_key_padding(gen):
    B, n_q, n_k, E, kdim, heads = 3, 4, 7, 6, 5, 2
    m = make_mha(E, heads, gen, kdim=kdim)
    Xq, Xkv = randn(B, n_q, E, gen=gen), randn(B, n_k, kdim, gen=gen)
    pad = torch.zeros(B, n_k, dtype=torch.bool)
    pad[0, -2:] = True
    pad[2, 0] = True
    ref, _ = m(Xq, Xkv, Xkv, key_padding_mask=pad, need_weights=False)
    out = multi_head_attention(Xq, Xkv, **mha_weights(m), mask=~pad[:, None, :])
    assert (out - ref).abs().max() < TOL
    # padded keys really are ignored: changing them does not change the output
    Xkv2 = Xkv.clone()
    Xkv2[0, -2:] += 10.0
    out2 = multi_head_attention(Xq, Xkv2, **mha_weights(m), mask=~pad[:, None, :])
    assert (out2[0] - out[0]).abs().max() < TOL


def test_mha_causal_matches_nn_module_attn_mask(gen):
    B, n, E, heads = 2, 6, 8, 4
    m = make_mha(E, heads, gen)
    X = randn(B, n, E, gen=gen)
    # nn.MultiheadAttention's boolean attn_mask uses True = *blocked*
    blocked = ~causal_mask(n)
    ref, _ = m(X, X, X, attn_mask=blocked, need_weights=False)
    assert (multi_head_attention(X, X, **mha_weights(m), causal=True) - ref).abs().max() < TOL
    assert (multi_head_attention(X, X, **mha_weights(m), mask=~blocked) - ref).abs().max() < TOL
    # float additive mask, combined with causal=True
    add = randn(n, n, gen=gen)
    ref2, _ = m(X, X, X, attn_mask=add.masked_fill(blocked, float("-inf")), need_weights=False)
    assert (multi_head_attention(X, X, **mha_weights(m), mask=add, causal=True) - ref2).abs().max() < TOL


def test_mha_float_key_padding_mask_with_causal(gen):
    B, n, E, heads = 2, 5, 4, 2
    m = make_mha(E, heads, gen)
    X = randn(B, n, E, gen=gen)
    pad = torch.zeros(B, n, dtype=torch.bool)
    pad[1, -1] = True
    additive = torch.zeros(B, 1, n, dtype=DT).masked_fill(pad[:, None, :], float("-inf"))
    ref, _ = m(X, X, X, key_padding_mask=pad, attn_mask=~causal_mask(n), need_weights=False)
    out = multi_head_attention(X, X, **mha_weights(m), mask=additive, causal=True)
    assert (out - ref).abs().max() < TOL


def _sdpa_inputs(gen, *, B=2, n_q=4, n_k=6, d_q=5, d_kv=3, heads=2, d_k=3, d_v=4):
    Xq, Xkv = randn(B, n_q, d_q, gen=gen), randn(B, n_k, d_kv, gen=gen)
    W = dict(W_Q=randn(d_q, heads * d_k, gen=gen), W_K=randn(d_kv, heads * d_k, gen=gen),
             W_V=randn(d_kv, heads * d_v, gen=gen))
    split = lambda Z: Z.unflatten(-1, (heads, -1)).transpose(1, 2)
    return Xq, Xkv, W, split(Xq @ W["W_Q"]), split(Xkv @ W["W_K"]), split(Xkv @ W["W_V"]), heads


@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize("is_causal", [False, True])
def test_mha_matches_sdpa_dk_ne_dv(gen, scale, is_causal):
    Xq, Xkv, W, Q, K, V, heads = _sdpa_inputs(gen)
    ref = F.scaled_dot_product_attention(Q, K, V, is_causal=is_causal, scale=scale)
    ref = ref.transpose(1, 2).flatten(-2)
    out = multi_head_attention(Xq, Xkv, **W, num_heads=heads, scale=scale, causal=is_causal)
    assert out.shape == ref.shape == (2, 4, heads * 4)
    assert (out - ref).abs().max() < TOL


def test_mha_matches_sdpa_with_bool_mask_and_leading_batch_dims(gen):
    Xq, Xkv, W, Q, K, V, heads = _sdpa_inputs(gen)
    mask = torch.rand(2, 4, 6, generator=gen) > 0.3
    mask[..., 0] = True  # every row attends somewhere
    ref = F.scaled_dot_product_attention(Q, K, V, attn_mask=mask[:, None]).transpose(1, 2).flatten(-2)
    assert (multi_head_attention(Xq, Xkv, **W, num_heads=heads, mask=mask) - ref).abs().max() < TOL
    # extra leading batch dimension broadcasts
    out = multi_head_attention(Xq[None].expand(3, -1, -1, -1), Xkv, **W, num_heads=heads, mask=mask)
    assert (out - ref).abs().max() < TOL


def test_single_head_special_case_and_attention_weights_key_bias(gen):
    X = randn(2, 5, 4, gen=gen)
    W_Q, W_K, W_V = randn(4, 3, gen=gen), randn(4, 3, gen=gen), randn(4, 6, gen=gen)
    out = multi_head_attention(X, X, W_Q, W_K, W_V, num_heads=1)
    assert (out - single_head_attention(X, W_Q, W_K, W_V)).abs().max() < TOL
    beta = randn(2, 5, gen=gen)
    A = attention_weights(X @ W_Q, X @ W_K, key_bias=beta)
    ref = F.scaled_dot_product_attention((X @ W_Q)[:, None], (X @ W_K)[:, None], torch.eye(5, dtype=DT),
                                         attn_mask=beta[:, None, None, :])[:, 0]
    assert (A - ref).abs().max() < TOL


def test_mha_forward_mode_ad_and_vmap(gen):
    """jvp through the einsum form agrees with reverse mode: <u, J v> = <Jᵀ u, v>; vmap works too."""
    X = randn(2, 5, 6, gen=gen)
    W_Q, W_K, W_V, W_O = randn(6, 4, gen=gen), randn(6, 4, gen=gen), randn(6, 6, gen=gen), randn(6, 3, gen=gen)

    def f(W_Q):
        return multi_head_attention(X, X, W_Q, W_K, W_V, W_O, num_heads=2, causal=True)

    v, u = randn(6, 4, gen=gen), randn(2, 5, 3, gen=gen)
    out, Jv = torch.func.jvp(f, (W_Q,), (v,))
    _, vjp = torch.func.vjp(f, W_Q)
    (JTu,) = vjp(u)
    assert (out - f(W_Q)).abs().max() < TOL
    assert abs(float((u * Jv).sum() - (JTu * v).sum())) < TOL
    # forward-over-reverse Hessian-vector product through the reference layer
    hvp = torch.func.jvp(torch.func.grad(lambda W: f(W).square().sum()), (W_Q,), (v,))[1]
    H = torch.func.hessian(lambda W: f(W).square().sum())(W_Q).reshape(24, 24)
    assert (hvp.flatten() - H @ v.flatten()).abs().max() < 1e-9
    batched = torch.func.vmap(f)(torch.stack([W_Q, v]))
    assert (batched[1] - f(v)).abs().max() < TOL


def test_linear_attention_definition(gen):
    Xq, Xkv, W, Q, K, V, heads = _sdpa_inputs(gen)
    kappa = 0.5
    A = kappa * Q @ K.transpose(-1, -2)
    c = causal_mask(4, 6)
    ref = ((A * c) @ V).transpose(1, 2).flatten(-2)
    out = linear_attention(Xq, Xkv, **W, num_heads=heads, scale=kappa, causal=True)
    assert (out - ref).abs().max() < TOL
    ref_nc = ((Q @ K.transpose(-1, -2) / 3**0.5) @ V).transpose(1, 2).flatten(-2)  # default κ = 1/√d_k, d_k=3
    assert (linear_attention(Xq, Xkv, **W, num_heads=heads) - ref_nc).abs().max() < TOL


# ------------------------------------------------------------------------------------------------ FFN and the norms


@pytest.mark.parametrize("activation", ["relu", "gelu", None])
def test_feed_forward_matches_sequential(gen, activation):
    d, m, d_out = 5, 7, 3
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    act = {"relu": nn.ReLU(), "gelu": nn.GELU(), None: nn.Identity()}[activation]
    net = nn.Sequential(nn.Linear(d, m, dtype=DT), act, nn.Linear(m, d_out, dtype=DT))
    X = randn(2, 4, d, gen=gen)
    out = feed_forward(X, net[0].weight.detach().T, net[0].bias.detach(), net[2].weight.detach().T,
                       net[2].bias.detach(), activation=activation)
    assert (out - net(X)).abs().max() < TOL


@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_layer_norm_matches_nn_layernorm(gen, eps):
    d = 7
    ln = nn.LayerNorm(d, eps=eps, dtype=DT)
    with torch.no_grad():
        ln.weight.normal_(generator=gen)
        ln.bias.normal_(generator=gen)
    X = randn(3, 4, d, gen=gen)
    assert (layer_norm(X, ln.weight.detach(), ln.bias.detach(), eps=eps) - ln(X)).abs().max() < TOL
    assert (layer_norm(X, eps=eps) - F.layer_norm(X, (d,), eps=eps)).abs().max() < TOL


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm_matches_nn_rmsnorm(gen, eps):
    d = 6
    rn = nn.RMSNorm(d, eps=eps, dtype=DT)
    with torch.no_grad():
        rn.weight.normal_(generator=gen)
    X = randn(2, 5, d, gen=gen)
    assert (rms_norm(X, rn.weight.detach(), eps=eps) - rn(X)).abs().max() < TOL


# --------------------------------------------------------------------------------------------------------- bad input

_X = torch.zeros(2, 4, 6, dtype=DT)
_W = torch.zeros(6, 6, dtype=DT)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: multi_head_attention(_X, _X, _W, _W, _W, num_heads=4), "not divisible by num_heads"),
        (lambda: multi_head_attention(_X, _X, _W, _W, torch.zeros(6, 9, dtype=DT), num_heads=2), "W_V"),
        (lambda: multi_head_attention(_X, _X, _W, torch.zeros(6, 4, dtype=DT), _W, num_heads=2), "W_K"),
        (lambda: multi_head_attention(_X, _X, torch.zeros(5, 6, dtype=DT), _W, _W, num_heads=2), "W_Q"),
        (lambda: multi_head_attention(_X, _X, _W, _W, _W, num_heads=0), "num_heads"),
        (lambda: multi_head_attention(_X, _X, _W, _W, _W, num_heads=2, b_O=torch.zeros(6, dtype=DT)), "b_O"),
        (lambda: multi_head_attention(_X, _X, _W, _W, _W, num_heads=2, b_Q=torch.zeros(5, dtype=DT)), "b_Q"),
        (lambda: multi_head_attention(_X, _X, _W.float(), _W, _W, num_heads=2), "mixed dtypes"),
        (lambda: multi_head_attention(_X.long(), _X, _W, _W, _W, num_heads=2), "floating-point"),
        (lambda: multi_head_attention(_X, torch.zeros(3, 4, 6, dtype=DT), _W, _W, _W, num_heads=2), "broadcast"),
        (lambda: multi_head_attention(_X, _X, _W, _W, _W, num_heads=2, mask=torch.ones(5, 5, dtype=torch.bool)),
         "does not broadcast"),
        (lambda: multi_head_attention(_X, _X, _W, _W, _W, num_heads=2, mask=torch.ones(3, 2, 4, 4, dtype=torch.bool)),
         "does not broadcast"),
        (lambda: multi_head_attention(_X, _X, _W, _W, _W, num_heads=2, mask=torch.ones(4, 4, dtype=torch.long)),
         "bool"),
        (lambda: multi_head_attention(_X * float("nan"), _X, _W, _W, _W, num_heads=2), "NaN"),
        (lambda: multi_head_attention(_X, _X, _W, _W, _W, num_heads=2, scale=float("inf")), "scale"),
        (lambda: multi_head_attention(_X, _X, _W, _W, _W, num_heads=2, causal="yes"), "causal"),
        (lambda: linear_attention(_X, _X, _W, _W, _W, num_heads=2, mask=torch.zeros(4, 4, dtype=DT)), "boolean"),
        (lambda: feed_forward(_X, _W, None, _W, None, activation="tanh"), "activation"),
        (lambda: feed_forward(_X, torch.zeros(5, 3, dtype=DT), None, _W, None), "W_1"),
        (lambda: feed_forward(_X, _W, torch.zeros(5, dtype=DT), _W, None), "b_1"),
        (lambda: layer_norm(_X, torch.zeros(5, dtype=DT)), "weight"),
        (lambda: layer_norm(_X, eps=-1.0), "eps"),
        (lambda: rms_norm(_X, eps=float("nan")), "eps"),
    ],
)
def test_bad_input_rejected(call, match):
    with pytest.raises(EnergyInputError, match=match):
        call()
