"""Verification cases of ``python -m energy.hessian verify`` beyond one head: LayerNorm, RMSNorm, FFN (MATH §5.2),
multi-head attention (§5.1), the attention input (§5.3a) and whole blocks (§5.3).

Each case draws odd sizes (``d ≠ d_ff ≠ d_out``, batch > 1, ``L = 1`` every third trial), evaluates the closed form
and its autograd twin, and hands the pairs to :mod:`energy.hessian.verify` (registered through its
``CASE_MODULES``).
"""

from __future__ import annotations

import torch

from energy.hessian.attention_input import (
    autograd_head_input_hessian,
    autograd_head_input_jacobian,
    autograd_head_input_param_hessian,
    head_input_hessian,
    head_input_jacobian,
    head_input_param_hessian,
)
from energy.hessian.block import (
    autograd_block_ggn,
    autograd_block_hessian,
    autograd_block_token_hessian,
    block_hessian_parts,
    block_token_hessian,
    random_block,
)
from energy.hessian.ffn_curvature import FFNLayer, autograd_ffn_ggn, autograd_ffn_hessian, ffn_hessian
from energy.hessian.multihead import MultiHeadAttentionLayer, multihead_hessian
from energy.hessian.norm_curvature import NormLayer, autograd_norm_ggn, autograd_norm_hessian, norm_hessian
from energy.hessian.twins import autograd_multihead_ggn, autograd_multihead_hessian
from energy.hessian.verify import Pair, Trial, _randint, case, dims

__all__: list[str] = []

DT = torch.float64


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DT)


def _parts(closed: dict[str, torch.Tensor], H: torch.Tensor, G: torch.Tensor) -> list[Pair]:
    """``H``, ``H_o``, ``H_f`` against the twins, the parts on the scale of the whole ``H``."""
    return [("H", closed["H"], H), ("H_o", closed["H_o"], G, H), ("H_f", closed["H_f"], H - G, H)]


def _norm_case(g: torch.Generator, t: int, kind: str) -> Trial:
    s = dims(g, t)
    B, L, d = s["B"], s["L"], s["d_V"] + 1
    gamma = 1 + 0.3 * _randn(g, d)
    beta = 0.3 * _randn(g, d) if kind == "layer" else None
    norm = NormLayer(gamma, beta, 1e-5, kind)  # type: ignore[arg-type]
    X, Y = _randn(g, B, L, d), _randn(g, B, L, d)
    closed = {part: norm_hessian(norm, X, Y, part) for part in ("H", "H_o", "H_f")}
    return Trial({"B": B, "L": L, "d": d}, _parts(closed, autograd_norm_hessian(norm, X, Y),
                                                autograd_norm_ggn(norm, X, Y)))


@case("layernorm-hessian", compares="norm_hessian H, H_o, H_f (γ, b)", reference="torch.func.hessian / GGN")
def _layernorm(g: torch.Generator, t: int) -> Trial:
    return _norm_case(g, t, "layer")


@case("rmsnorm-layernorm-hessian", compares="norm_hessian H, H_o, H_f (RMSNorm γ)",
      reference="torch.func.hessian / GGN")
def _rmsnorm(g: torch.Generator, t: int) -> Trial:
    return _norm_case(g, t, "rms")


def _ffn_case(g: torch.Generator, t: int, activation: str) -> Trial:
    s = dims(g, t)
    B, L, d = s["B"], s["L"], s["d_V"]
    d_ff, d_out = d + _randint(g, 1, 3), _randint(g, 2, 4)
    ffn = FFNLayer(_randn(g, d, d_ff), _randn(g, d_ff), _randn(g, d_ff, d_out) / d_ff**0.5, _randn(g, d_out),
                   activation)  # type: ignore[arg-type]
    X, Y = _randn(g, B, L, d), _randn(g, B, L, d_out)
    closed = {part: ffn_hessian(ffn, X, Y, part) for part in ("H", "H_o", "H_f")}
    return Trial({"B": B, "L": L, "d": d, "d_ff": d_ff, "d_out": d_out},
                 _parts(closed, autograd_ffn_hessian(ffn, X, Y), autograd_ffn_ggn(ffn, X, Y)))


@case("ffn-relu-hessian", compares="ffn_hessian H, H_o, H_f (ReLU)", reference="torch.func.hessian / GGN")
def _ffn_relu(g: torch.Generator, t: int) -> Trial:
    return _ffn_case(g, t, "relu")


@case("ffn-gelu-hessian", compares="ffn_hessian H, H_o, H_f (GELU, erf)", reference="torch.func.hessian / GGN")
def _ffn_gelu(g: torch.Generator, t: int) -> Trial:
    return _ffn_case(g, t, "gelu")


@case("ffn-gelu-tanh-hessian", compares="ffn_hessian H, H_o, H_f (GPT-2 tanh GELU)",
      reference="torch.func.hessian / GGN")
def _ffn_gelu_tanh(g: torch.Generator, t: int) -> Trial:
    return _ffn_case(g, t, "gelu_tanh")


# ----------------------------------------------------------------------------------------------------------------
# Multi-head attention (MATH §5.1), the attention input (§5.3a), whole blocks (§5.3)
# ----------------------------------------------------------------------------------------------------------------


def _multihead_layer(g: torch.Generator, t: int, *, gqa: bool) -> tuple[MultiHeadAttentionLayer, dict[str, int]]:
    s = dims(g, t)
    d, k = s["d_V"] + 1, s["d_K"]
    H = 4 if gqa else _randint(g, 2, 3)
    h_kv = 2 if gqa else H
    d_v, d_out = _randint(g, 1, 3), _randint(g, 2, 4)
    layer = MultiHeadAttentionLayer(_randn(g, H, d, k) / d**0.5, _randn(g, h_kv, d, k) / d**0.5,
                                    _randn(g, h_kv, d, d_v), _randn(g, H, d_v, d_out), causal=t % 2 == 0)
    return layer, {"B": s["B"], "L": s["L"], "d": d, "d_K": k, "d_v": d_v, "d_out": d_out, "heads": H,
                   "kv_heads": h_kv}


def _multihead_case(g: torch.Generator, t: int, gqa: bool) -> Trial:
    layer, s = _multihead_layer(g, t, gqa=gqa)
    X, Y = _randn(g, s["B"], s["L"], s["d"]), _randn(g, s["B"], s["L"], s["d_out"])
    H, G = autograd_multihead_hessian(layer, X, Y), autograd_multihead_ggn(layer, X, Y)
    closed = {part: multihead_hessian(layer, X, Y, part) for part in ("H", "H_o", "H_f")}  # type: ignore[arg-type]
    return Trial(s, _parts(closed, H, G))


@case("multihead-hessian", compares="multihead_hessian H, H_o, H_f (causal on even trials)",
      reference="torch.func.hessian / GGN")
def _multihead(g: torch.Generator, t: int) -> Trial:
    return _multihead_case(g, t, gqa=False)


@case("multihead-gqa-hessian", compares="multihead_hessian H, H_o, H_f, 4 query heads sharing 2 K/V heads",
      reference="torch.func.hessian / GGN")
def _multihead_gqa(g: torch.Generator, t: int) -> Trial:
    return _multihead_case(g, t, gqa=True)


@case("multihead-attention-input", compares="head_input_jacobian, head_input_hessian, head_input_param_hessian",
      reference="torch.func.jacrev / hessian of ⟨G, F⟩")
def _attention_input(g: torch.Generator, t: int) -> Trial:
    layer, s = _multihead_layer(g, t, gqa=False)
    head = layer.heads()[0]
    U = _randn(g, s["B"], s["L"], s["d"])
    G = _randn(g, s["B"], s["L"], s["d_out"])
    mask = None if t % 2 else torch.ones(s["L"], s["L"], dtype=torch.bool).tril().expand(s["B"], s["L"], s["L"])
    twin = autograd_head_input_param_hessian(head, U, mask, G)
    H_UU = autograd_head_input_hessian(head, U, mask, G)
    # second derivatives on the scale of all of them (at L = 1 the head is linear in U and H_UU vanishes exactly)
    scale = torch.stack([H_UU.abs().max(), *(t.abs().max() for t in twin.values())]).max()
    pairs: list[Pair] = [
        ("J_U", head_input_jacobian(head, U, mask), autograd_head_input_jacobian(head, U, mask)),
        ("H_UU", head_input_hessian(head, U, mask, G), H_UU, scale),
    ]
    pairs += [(f"H_U{n}", v, twin[n], scale) for n, v in head_input_param_hessian(head, U, mask, G).items()]
    return Trial(s, pairs)


def _block_case(g: torch.Generator, t: int, norm: str, loss: str) -> Trial:
    s = dims(g, t)
    d, heads, d_head, d_ff = s["d_V"] + 1, _randint(g, 1, 3), s["d_K"], _randint(g, 3, 6)
    vocab = _randint(g, 2, 4) if loss == "ce" else None
    block = random_block(d, heads, d_head, d_ff, norm=norm, vocab=vocab, loss=loss, causal=t % 2 == 0,  # type: ignore[arg-type]
                         activation=("gelu", "relu", "gelu_tanh")[t % 3], generator=g)
    B, L = s["B"], s["L"]
    X = _randn(g, B, L, d)
    target = torch.randint(0, vocab, (B, L), generator=g) if vocab else _randn(g, B, L, d)
    H, G = autograd_block_hessian(block, X, target), autograd_block_ggn(block, X, target)
    closed = {part: M.matrix for part, M in block_hessian_parts(block, X, target).items()}
    pairs = _parts(closed, H, G)
    pairs.append(("tokens", block_token_hessian(block, X, target), autograd_block_token_hessian(block, X, target)))
    return Trial({"B": B, "L": L, "d": d, "heads": heads, "d_head": d_head, "d_ff": d_ff, "params": block.num_params},
                 pairs)


@case("block-pre-ln-ce", compares="block_hessian_parts H, H_o, H_f and block_token_hessian, Pre-LN, cross-entropy",
      reference="torch.func.hessian / GGN")
def _block_pre(g: torch.Generator, t: int) -> Trial:
    return _block_case(g, t, "pre", "ce")


@case("block-post-ln-mse", compares="block_hessian_parts H, H_o, H_f and block_token_hessian, Post-LN, square loss",
      reference="torch.func.hessian / GGN")
def _block_post(g: torch.Generator, t: int) -> Trial:
    return _block_case(g, t, "post", "mse")


@case("block-no-ln-mse", compares="block_hessian_parts H, H_o, H_f and block_token_hessian, no LayerNorm",
      reference="torch.func.hessian / GGN")
def _block_none(g: torch.Generator, t: int) -> Trial:
    return _block_case(g, t, "none", "mse")
