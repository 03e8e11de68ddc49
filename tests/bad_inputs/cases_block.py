"""Bad inputs to the MATH §5 closed forms: multi-head layers, LayerNorm/FFN, whole blocks, GPT-2-scale head norms."""

from __future__ import annotations

import torch

import energy.hessian as H
from energy.hessian.head_norms import head_block_norms

from ._case import FIX, Case
from ._gen import arg, scalar_cases, tensor_cases

f64 = torch.float64
g = torch.Generator().manual_seed(2)
B, L, d = 2, 4, 4
X = torch.randn(B, L, d, generator=g, dtype=f64)
Y = torch.randn(B, L, d, generator=g, dtype=f64)
BLOCK = H.random_block(d, 2, 2, 6, norm="pre", generator=torch.Generator().manual_seed(0))
BLOCK_CE = H.random_block(d, 2, 2, 6, norm="post", vocab=3, loss="ce", generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 3, (B, L), generator=g)
W = [torch.randn(2, d, 2, generator=g, dtype=f64) for _ in range(3)] + [torch.randn(2, 2, d, generator=g, dtype=f64)]


def _fields(block: H.TransformerBlock, **kw: object) -> dict:
    out = {f: getattr(block, f) for f in block.__dataclass_fields__}
    out.update(kw)
    return out


CASES: list[Case] = []
add = CASES.extend

# --- whole blocks -------------------------------------------------------------------------------------------------
add(tensor_cases("block_hessian", "X", lambda x: H.block_hessian(BLOCK, x, Y), X,
                 kinds=("list", "int", "complex", "float32", "nan", "inf", "rank")))
add(tensor_cases("block_hessian", "target", lambda y: H.block_hessian(BLOCK, X, y), Y,
                 kinds=("list", "nan", "float32")))
add([
    Case("block_hessian:target-shape", lambda: H.block_hessian(BLOCK, X, Y[:, :3]), (arg("target"), r"shape", FIX)),
    Case("block_hessian:labels-out-of-range", lambda: H.block_hessian(BLOCK_CE, X, LABELS + 3),
         (arg("target"), r"\[0, 3\)", FIX)),
    Case("block_hessian:labels-float", lambda: H.block_hessian(BLOCK_CE, X, LABELS.double()),
         (arg("target"), r"integer", FIX)),
    Case("block_hessian:part", lambda: H.block_hessian(BLOCK, X, Y, part="G"),  # type: ignore[arg-type]
         (arg("part"), r"'H'", FIX)),
    Case("block_hessian:block-not-a-block", lambda: H.block_hessian("gpt2", X, Y),  # type: ignore[arg-type]
         (arg("block"), r"TransformerBlock", FIX)),
    Case("block_hessian:budget", lambda: H.block_hessian(BLOCK, X, Y, max_gib=1e-9),
         (arg("max_gib"), r"GiB", FIX)),
    Case("block_hessian:distributed-without-group", lambda: H.block_hessian(BLOCK, X, Y, distributed=True),
         (arg("distributed"), r"process group", r"torchrun")),
    Case("block_hessian:distributed-not-a-group", lambda: H.block_hessian(BLOCK, X, Y, distributed="all"),
         (arg("distributed"), r"ShardGroup", FIX)),
    Case("head_block_norms:distributed-without-group",
         lambda: head_block_norms(X, *(w[0] for w in W[:3]), W[3][0], Y, c=0.5, distributed=True),
         (arg("distributed"), r"process group", r"torchrun")),
    Case("HessianOperator:distributed-without-group",
         lambda: H.HessianOperator(torch.nn.Linear(d, d).double(), torch.nn.MSELoss(), None, [(X[0], Y[0])],
                                   distributed=True),
         (arg("distributed"), r"process group", r"torchrun")),
    Case("all_reduce_sum:without-group", lambda: H.all_reduce_sum(X),
         (arg("shards"), r"process group", r"torchrun")),
    Case("TransformerBlock:norm", lambda: H.TransformerBlock(**_fields(BLOCK, norm="middle")),
         (arg("norm"), r"one of", FIX)),
    Case("TransformerBlock:ce-without-unembedding", lambda: H.TransformerBlock(**_fields(BLOCK, loss="ce")),
         (arg("W_U"), r"needs", FIX)),
    Case("TransformerBlock:W_U-shape", lambda: H.TransformerBlock(**_fields(BLOCK, W_U=torch.zeros(d + 1, 3,
                                                                                                 dtype=f64))),
         (arg("W_U"), r"shape", FIX)),
    Case("TransformerBlock:ln-with-none", lambda: H.TransformerBlock(**_fields(BLOCK, norm="none")),
         (arg("ln1"), r"None", FIX)),
    Case("BlockHessian.block:unknown", lambda: H.block_hessian(BLOCK, X, Y).block("attn.h7.Q", "W_U"),
         (r"attn\.h7\.Q", r"choose one of", FIX)),
])
add(scalar_cases("TransformerBlock", "c", lambda c: H.TransformerBlock(**_fields(BLOCK, c=c)),
                 bad=(("neg", -1.0), ("zero", 0.0), ("nan", float("nan")))))

# --- multi-head layers --------------------------------------------------------------------------------------------
add([
    Case("MultiHeadAttentionLayer:kv-heads-not-dividing", lambda: H.MultiHeadAttentionLayer(
        torch.zeros(3, d, 2, dtype=f64), torch.zeros(2, d, 2, dtype=f64), torch.zeros(2, d, 2, dtype=f64),
        torch.zeros(3, 2, d, dtype=f64)), (r"(?i)divide|group|heads", FIX)),
    Case("MultiHeadAttentionLayer:W_O-heads", lambda: H.MultiHeadAttentionLayer(*W[:3], W[3][:1]),
         (arg("W_O"), r"shape", FIX)),
    Case("MultiHeadAttentionLayer.from_fused:heads", lambda: H.MultiHeadAttentionLayer.from_fused(
        torch.zeros(d, 3 * d, dtype=f64), torch.zeros(d, d, dtype=f64), 3), (r"(?i)n_heads|divide", FIX)),
])
add(tensor_cases("multihead_hessian", "X", lambda x: H.multihead_hessian(H.MultiHeadAttentionLayer(*W), x, Y), X,
                 kinds=("list", "nan", "float32", "rank")))

# --- LayerNorm, RMSNorm, FFN --------------------------------------------------------------------------------------
ones = torch.ones(d, dtype=f64)
add([
    Case("NormLayer:kind", lambda: H.NormLayer(ones, None, 1e-5, "batch"), (arg("kind"), r"layer", FIX)),  # type: ignore[arg-type]
    Case("NormLayer:rms-with-beta", lambda: H.NormLayer(ones, ones, 1e-5, "rms"), (arg("beta"), FIX)),
    Case("FFNLayer:activation", lambda: H.FFNLayer(torch.zeros(d, 5, dtype=f64), None, torch.zeros(5, d, dtype=f64),
                                                   None, "swish"), (arg("activation"), r"relu", FIX)),  # type: ignore[arg-type]
    Case("FFNLayer:W_2-shape", lambda: H.FFNLayer(torch.zeros(d, 5, dtype=f64), None, torch.zeros(6, d, dtype=f64),
                                                  None, "relu"), (arg("W_2"), r"shape|rows|d_ff", FIX)),
])
add(tensor_cases("ffn_hessian", "X", lambda x: H.ffn_hessian(BLOCK.ffn, x, Y), X, kinds=("nan", "float32", "rank")))

# --- exact head norms at scale ------------------------------------------------------------------------------------
Wq, Wv, Wo = W[0][0], W[2][0], W[3][0]
add(tensor_cases("head_block_norms", "X", lambda x: head_block_norms(x, Wq, Wq, Wv, Wo, Y, c=0.1), X,
                 kinds=("list", "nan", "float32", "rank")))
add([
    Case("head_block_norms:blocks", lambda: head_block_norms(X, Wq, Wq, Wv, Wo, Y, c=0.1, blocks=("QV",)),
         (arg("blocks"), FIX)),
])
add(scalar_cases("head_block_norms", "c", lambda c: head_block_norms(X, Wq, Wq, Wv, Wo, Y, c=c),
                 bad=(("neg", -1.0), ("nan", float("nan")))))
