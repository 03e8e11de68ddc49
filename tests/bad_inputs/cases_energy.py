"""Bad inputs to ``energy``: energies, kernels, reference functions, normalisation, the fused step, verify."""

from __future__ import annotations

import math

import torch

import energy
from energy import reference, verify
from energy.attention import key_bias, metric, pairwise_sq_dist, softmax_beta

from ._case import FIX, Case
from ._gen import arg, enum_case, scalar_cases, tensor_cases

f64 = torch.float64
g = torch.Generator().manual_seed(0)
d, k, n = 4, 3, 5
M = torch.randn(d, k, generator=g, dtype=f64)
Y = torch.randn(2, n, d, generator=g, dtype=f64)
heads = torch.randn(2, d, 2, generator=g, dtype=f64)
W = M @ M.T / math.sqrt(k)
W_f = 0.5 * torch.eye(d, dtype=f64)
b = torch.zeros(d, dtype=f64)
W_1 = torch.randn(d, 6, generator=g, dtype=f64)
X_pat = torch.randn(7, d, generator=g, dtype=f64)
W_q = torch.randn(d, d, generator=g, dtype=f64)


def E() -> energy.AttentionEnergy:
    return energy.AttentionEnergy(M)


CASES: list[Case] = []
add = CASES.extend

# --- AttentionEnergy: the tokens of energy/grad/step, the weights of the constructor --------------------------
add(tensor_cases("AttentionEnergy.energy", "Y", lambda y: E().energy(y), Y))
add(tensor_cases("AttentionEnergy.step", "Y", lambda y: E().step(y, 0.5), Y, kinds=("list", "int", "nan", "meta",
                                                                                  "zero", "float32")))
add(tensor_cases("AttentionEnergy.grad", "Y", lambda y: E().grad(y), Y, kinds=("complex", "inf", "rank")))
add(tensor_cases("AttentionEnergy", "M", lambda m: energy.AttentionEnergy(m), M,
                 kinds=("list", "int", "bool", "complex", "nan", "inf", "meta", "rank", "zero"), zero_dim=-1))
add(tensor_cases("MultiHeadAttentionEnergy", "M", lambda m: energy.MultiHeadAttentionEnergy(m), heads,
                 kinds=("list", "int", "nan", "meta", "rank", "zero"), zero_dim=0))
add(tensor_cases("MultiHeadAttentionEnergy.energy", "Y", lambda y: energy.MultiHeadAttentionEnergy(heads).energy(y),
                 Y, kinds=("int", "nan", "float32", "zero")))
add(scalar_cases("AttentionEnergy", "scale", lambda s: energy.AttentionEnergy(M, scale=s)))
add(scalar_cases("AttentionEnergy", "ridge", lambda r: energy.AttentionEnergy(M, ridge=r),
                 bad=(("neg", -0.1), ("nan", math.nan), ("inf", math.inf), ("str", "0"))))
add(scalar_cases("AttentionEnergy.step", "alpha", lambda a: E().step(Y, a),
                 bad=(("nan", math.nan), ("inf", math.inf), ("str", "1"), ("two-element-tensor",
                                                                            torch.ones(2, dtype=f64)))))
add([
    Case("AttentionEnergy:M-3d-is-multihead", lambda: energy.AttentionEnergy(heads),
         (arg("M"), r"MultiHeadAttentionEnergy")),
    Case("AttentionEnergy.energy:Y-width", lambda: E().energy(Y[..., :3]),
         (arg("Y"), r"width|shape", r"Y is \(\.\.\., n, d\)")),
    Case("AttentionEnergy.energy:Y-mixed-dtype", lambda: E().grad(Y.float()), (arg("Y"), r"cast|\.to\(")),
    Case("AttentionEnergy.step:preconditioner", lambda: E().step(Y, 0.5, preconditioner="newton"),
         (arg("preconditioner"), r"'metric'")),
    Case("AttentionEnergy.energy:token_mask-float", lambda: E().energy(Y, token_mask=torch.ones(2, n)),
         (arg("token_mask"), r"bool")),
    Case("AttentionEnergy.energy:token_mask-shape", lambda: E().energy(Y, token_mask=torch.ones(3, n, dtype=bool)),
         (arg("token_mask"), r"shape", r"broadcast to")),
    Case("AttentionEnergy.energy:token_mask-all-false",
         lambda: E().energy(Y, token_mask=torch.zeros(2, n, dtype=bool)), (arg("token_mask"), FIX)),
    Case("AttentionEnergy.preconditioned_grad:W-not-pd", lambda: energy.AttentionEnergy(M[:, :2])
         .preconditioned_grad(Y), (r"positive definite", r"(?i)use|ridge|preconditioner")),
    Case("AttentionEnergy.step:Y-overflow-1e200", lambda: E().step(Y * 1e200, 0.5),
         (arg("Y"), r"(?i)overflow|scale|finite")),
    Case("AttentionEnergy.energy:Y-float32-overflow-1e20",
         lambda: energy.AttentionEnergy(M.float()).energy(Y.float() * 1e20), (arg("Y"), r"(?i)overflow|scale|finite")),
    Case("AttentionEnergy.energy:kernel-not-a-kernel", lambda: energy.AttentionEnergy(M, kernel="gaussian"),
         (arg("kernel"), FIX)),
])

# --- kernels ------------------------------------------------------------------------------------------------------
add(scalar_cases("PowerKernel", "p", lambda p: energy.PowerKernel(p, eps=0.1),
                 bad=(("three", 3.0), ("nan", math.nan), ("neg", -1.0), ("str", "1"))))
add(scalar_cases("PowerKernel", "eps", lambda e: energy.PowerKernel(1.0, eps=e),
                 bad=(("neg", -0.1), ("zero", 0.0), ("nan", math.nan), ("inf", math.inf))))

# --- attention helpers, the fused step ------------------------------------------------------------------------------
add(tensor_cases("softmax_beta", "Y", lambda y: softmax_beta(y, W), Y, kinds=("list", "int", "nan", "zero")))
add(tensor_cases("softmax_beta", "W", lambda w: softmax_beta(Y, w), W, kinds=("int", "nan", "rank", "float32")))
add(tensor_cases("pairwise_sq_dist", "Y", lambda y: pairwise_sq_dist(y, W), Y, kinds=("int", "meta", "rank")))
add(tensor_cases("key_bias", "W", lambda w: key_bias(Y, w), W, kinds=("list", "nan", "complex")))
add(tensor_cases("metric", "M", lambda m: metric(m), M, kinds=("int", "nan", "rank")))
add(scalar_cases("metric", "scale", lambda s: metric(M, s), bad=(("neg", -1.0), ("nan", math.nan),
                                                                   ("matrix", torch.ones(2, 2, dtype=f64)))))
add([
    Case("softmax_beta:W-not-psd", lambda: softmax_beta(Y, -torch.eye(d, dtype=f64)),
         (arg("W"), r"(?i)positive|psd")),
    Case("softmax_beta:W-width", lambda: softmax_beta(Y, W[:3, :3]), (arg("W"), r"shape|width", FIX)),
])
add(tensor_cases("attention_step_fused", "Y", lambda y: energy.attention_step_fused(y, M, 0.5), Y,
                 kinds=("list", "int", "nan", "meta", "zero", "float32")))
add(tensor_cases("attention_step_fused", "M", lambda m: energy.attention_step_fused(Y, m, 0.5), M,
                 kinds=("int", "inf", "rank")))
add(scalar_cases("attention_step_fused", "alpha", lambda a: energy.attention_step_fused(Y, M, a),
                 bad=(("nan", math.nan), ("inf", math.inf), ("str", "1"),
                      ("two-element-tensor", torch.ones(2, dtype=f64)))))
add([
    Case("attention_step_fused:unknown-option", lambda: energy.attention_step_fused(Y, M, 0.5, precond="metric"),
         (r"precond", r"options")),
    Case("attention_step_fused:preconditioner", lambda: energy.attention_step_fused(Y, M, 0.5,
                                                                                     preconditioner="newton"),
         (arg("preconditioner"), r"'metric'")),
    Case("attention_step_range:preconditioner", lambda: energy.attention_step_range(
        energy.GaussianKernel(), "newton", lambda_max_W=1.0), (arg("preconditioner"), r"'metric'")),
    Case("attention_step_range:lambda_max_W-nan", lambda: energy.attention_step_range(
        energy.GaussianKernel(), "metric", lambda_max_W=math.nan), (arg("lambda_max_W"), FIX)),
    Case("attention_step_range:kernel-str", lambda: energy.attention_step_range(
        "gaussian", "metric", lambda_max_W=1.0), (arg("kernel"), FIX)),
])

# --- feed-forward, Hopfield, Energy Transformer, composite ------------------------------------------------------
add(tensor_cases("FFNEnergy", "W_f", lambda w: energy.FFNEnergy(w, b), W_f,
                 kinds=("list", "int", "nan", "meta", "rank", "float32")))
add(tensor_cases("FFNEnergy", "b", lambda v: energy.FFNEnergy(W_f, v), b, kinds=("int", "inf", "complex"),
                 zero_dim=-1))
add(tensor_cases("FFNEnergy.energy", "Y", lambda y: energy.FFNEnergy(W_f, b).energy(y), Y,
                 kinds=("int", "nan", "rank", "zero", "float32")))
add([
    Case("FFNEnergy:W_f-not-symmetric", lambda: energy.FFNEnergy(W_q, b), (arg("W_f"), r"symmetric")),
    Case("FFNEnergy:W_f-unbounded", lambda: energy.FFNEnergy(-2 * torch.eye(d, dtype=f64), b),
         (r"unbounded below", r"allow_unbounded|spectrum|eigen")),
    Case("FFNEnergy:b-shape", lambda: energy.FFNEnergy(W_f, torch.zeros(3, dtype=f64)), (arg("b"), r"shape|size")),
    Case("FFNEnergy:allow_unbounded-str", lambda: energy.FFNEnergy(W_f, b, allow_unbounded="yes"),
         (arg("allow_unbounded"), r"bool")),
])
add(tensor_cases("TiedReLUEnergy", "W_1", lambda w: energy.TiedReLUEnergy(w), W_1, kinds=("int", "nan", "rank")))
add(tensor_cases("tied_relu_energy", "Y", lambda y: energy.tied_relu_energy(y, W_1), Y,
                 kinds=("list", "nan", "meta", "float32")))
add([
    Case("TiedReLUEnergy.energy:Y-width", lambda: energy.TiedReLUEnergy(W_1).energy(Y[..., :2]),
         (arg("Y"), r"width|shape")),
    Case("TiedReLUEnergy:b-shape", lambda: energy.TiedReLUEnergy(W_1, torch.zeros(2, dtype=f64)), (arg("b"),)),
])
add(tensor_cases("HopfieldEnergy", "X", lambda x: energy.HopfieldEnergy(x, 1.0), X_pat,
                 kinds=("list", "int", "nan", "meta", "rank", "zero")))
add(tensor_cases("HopfieldEnergy.step", "xi", lambda x: energy.HopfieldEnergy(X_pat, 1.0).step(x), Y,
                 kinds=("int", "nan", "float32")))
add(scalar_cases("HopfieldEnergy", "beta", lambda v: energy.HopfieldEnergy(X_pat, v)))
add([
    Case("HopfieldEnergy.step:xi-width", lambda: energy.HopfieldEnergy(X_pat, 1.0).step(Y[..., :3]), (arg("xi"),)),
    Case("EnergyTransformerEnergy:ln_gamma-vector", lambda: energy.EnergyTransformerEnergy(
        heads, heads, M.T, ln_gamma=torch.ones(d, dtype=f64)), (arg("ln_gamma"), r"scalar")),
    Case("EnergyTransformerEnergy.energy:one-token", lambda: energy.EnergyTransformerEnergy(heads, heads, M.T)
         .energy(Y[:, :1]), (r"at least 2 tokens",)),
    Case("EnergyTransformerEnergy:W_K-shape", lambda: energy.EnergyTransformerEnergy(heads, heads[:, :3], M.T),
         (arg("W_K"), r"shape")),
])
add(tensor_cases("EnergyTransformerEnergy", "W_Q", lambda w: energy.EnergyTransformerEnergy(w, heads, M.T), heads,
                 kinds=("int", "nan", "rank")))
add(scalar_cases("EnergyTransformerEnergy", "eps", lambda e: energy.EnergyTransformerEnergy(heads, heads, M.T, eps=e),
                 bad=(("neg", -1.0), ("nan", math.nan))))
add([
    Case("CompositeEnergy:empty", lambda: energy.CompositeEnergy({}), (arg("terms"), FIX)),
    Case("CompositeEnergy:not-an-energy", lambda: energy.CompositeEnergy({"att": M}), (arg("terms"), r"Energy")),
    Case("CompositeEnergy:dotted-key", lambda: energy.CompositeEnergy({"a.b": E()}), (arg("terms"), r"'\.'")),
    Case("CompositeEnergy.step:no-step", lambda: energy.CompositeEnergy({"att": E()}).step(Y),
         (r"(?i)composite|step", FIX), exc=NotImplementedError),
])

# --- normalisation -------------------------------------------------------------------------------------------------
add(tensor_cases("layernorm_projection", "Y", energy.layernorm_projection, Y,
                 kinds=("list", "int", "nan", "meta", "zero")))
add(tensor_cases("rmsnorm_projection", "Y", energy.rmsnorm_projection, Y, kinds=("int", "inf", "complex")))
add(tensor_cases("absorb_layernorm_affine", "gamma", lambda gm: energy.absorb_layernorm_affine(W, gm),
                 torch.ones(d, dtype=f64), kinds=("int", "nan", "rank"), zero_dim=-1))
add([
    Case("layernorm_projection:d=1", lambda: energy.layernorm_projection(torch.ones(2, 1, dtype=f64)),
         (arg("Y"), r"(?i)width|at least|d\b")),
    Case("absorb_layernorm_affine:gamma-size", lambda: energy.absorb_layernorm_affine(W, torch.ones(3, dtype=f64)),
         (arg("gamma"), r"shape|size")),
])

# --- reference (standard) layers -------------------------------------------------------------------------------------
add(tensor_cases("single_head_attention", "X", lambda x: reference.single_head_attention(x, W_q, W_q, W_q), Y,
                 kinds=("list", "int", "nan", "meta", "zero", "float32")))
add(tensor_cases("multi_head_attention", "x_q", lambda x: reference.multi_head_attention(x, Y, W_q, W_q, W_q,
                                                                                         num_heads=2), Y,
                 kinds=("int", "nan", "rank")))
add([
    Case("multi_head_attention:num_heads-not-dividing",
         lambda: reference.multi_head_attention(Y, Y, W_q, W_q, W_q, num_heads=3), (arg("num_heads"), r"divisib")),
    Case("multi_head_attention:num_heads=0",
         lambda: reference.multi_head_attention(Y, Y, W_q, W_q, W_q, num_heads=0), (arg("num_heads"), FIX)),
    Case("multi_head_attention:x_kv-width", lambda: reference.multi_head_attention(Y, Y[..., :3], W_q, W_q, W_q,
                                                                                  num_heads=2),
         (arg("x_kv"), r"shape|width")),
    Case("single_head_attention:mask-shape", lambda: reference.single_head_attention(
        Y, W_q, W_q, W_q, mask=torch.ones(3, 3, dtype=bool)), (arg("mask"), r"shape")),
    Case("single_head_attention:scale-neg", lambda: reference.single_head_attention(Y, W_q, W_q, W_q, scale=-1.0),
         (arg("scale"), FIX)),
    Case("feed_forward:activation", lambda: reference.feed_forward(Y, W_q, None, W_q, None, activation="swish"),
         (arg("activation"), r"relu")),
    Case("feed_forward:W_1-shape", lambda: reference.feed_forward(Y, W_q[:3], None, W_q, None),
         (arg("W_1"), r"shape")),
    Case("layer_norm:eps-neg", lambda: reference.layer_norm(Y, eps=-1.0), (arg("eps"), FIX)),
    Case("rms_norm:weight-shape", lambda: reference.rms_norm(Y, weight=torch.ones(3, dtype=f64)),
         (arg("weight"), r"shape")),
    Case("causal_mask:n_q-neg", lambda: reference.causal_mask(-1), (arg("n_q"), FIX)),
    Case("causal_mask:n_q-float", lambda: reference.causal_mask(2.5), (arg("n_q"), r"int")),
    Case("linear_attention:num_heads-bool", lambda: reference.linear_attention(Y, Y, W_q, W_q, W_q, num_heads=True),
         (arg("num_heads"), r"int")),
])

# --- verify -----------------------------------------------------------------------------------------------------------
add([
    Case("verify.run:trials=0", lambda: verify.run(trials=0), (arg("trials"), FIX)),
    Case("verify.run:unknown-case", lambda: verify.run(trials=1, cases=["nope"]), (r"nope", r"(?i)valid|one of|known"),
         exc=(ValueError, TypeError, KeyError)),
    Case("verify.run:seed-str", lambda: verify.run(seed="0", trials=1), (arg("seed"), r"int")),
])
add([enum_case("Preconditioner", "preconditioner", lambda p: E().step(Y, 0.5, preconditioner=p), bad="Metric")])
