"""Verification cases of ``python -m energy.hessian verify`` beyond one head: LayerNorm, RMSNorm, FFN (MATH §5.2),
multi-head attention (§5.1), the attention input (§5.3a) and whole blocks (§5.3).

Each case draws odd sizes (``d ≠ d_ff ≠ d_out``, batch > 1, ``L = 1`` every third trial), evaluates the closed form
and its autograd twin, and hands the pairs to :mod:`energy.hessian.verify` (registered through its
``CASE_MODULES``).
"""

from __future__ import annotations

import torch

from energy.hessian.ffn_curvature import FFNLayer, autograd_ffn_ggn, autograd_ffn_hessian, ffn_hessian
from energy.hessian.norm_curvature import NormLayer, autograd_norm_ggn, autograd_norm_hessian, norm_hessian
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
