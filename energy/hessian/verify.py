r"""``python -m energy.hessian verify``: every closed form of :mod:`energy.hessian` against its autograd twin.

Each registered case draws ``--trials`` random float64 instances (odd shapes: ``n ≠ d``, ``d_K ≠ d_V``, batch > 1;
every third trial has one token, ``L = 1``), evaluates a closed form and its twin (``torch.func.hessian`` /
``jacrev`` of the same loss or energy, or a dense reference named in the row) and reports the worst relative error

.. math::
    \mathrm{rel}(C, T) = \frac{\|C - T\|_{\max}}{\max(\|T\|_{\max},\ \mathrm{tiny})}

over the trials and over every quantity the case compares. A part of a matrix is measured on the scale of the
whole (``T`` in the denominator replaced by it): a block or part ``H_o``, ``H_f`` of a Hessian against the largest
entry of the twins of ``H`` and ``H_o``, a diagonal against the largest diagonal entry, a trace against the largest
sum of absolute diagonal entries. Otherwise a block that is exactly zero in closed form (``H_f(V,V)``, or all of
``H_f`` at ``L = 1``) would be compared with the round-off of the twin ``H − H_o``.

Target: ``max_rel_err ≤ 1e-10`` (:data:`TOLERANCE`); a case above it (or not finite) fails and the command exits 1
naming it. The formulas are those of MATH §3 (the attention-layer Hessian, its structure) and §4 (the
energy-derived layer and the token-space energy Hessians).

Rows (:func:`run`, ``--json OUT``) have the keys ``case``, ``max_rel_err``, ``shapes`` (one dict of sizes per
trial), ``compares`` (the closed forms), ``reference`` (the twin), ``worst`` (the comparison that gave the maximum),
``trials``, ``passed`` and ``seconds``. Trial ``t`` of a case draws from a generator seeded with ``--seed``, the case
name and ``t`` alone, so a case's numbers do not depend on which other cases run.

Adding a case (e.g. the multi-head, LayerNorm, FFN or whole-block closed forms) is one decorated function, here or
in a module listed in :data:`CASE_MODULES` (imported before every run; such a module imports ``case``, ``dims``
and ``Trial`` from here)::

    @case("multihead-hessian", compares="multihead_hessian H, H_o, H_f", reference="torch.func.hessian")
    def _multihead(g: torch.Generator, t: int) -> Trial:
        s = dims(g, t)                                   # odd sizes B, L, d_V, d_K (L = 1 when t % 3 == 2)
        ...
        return Trial(s, [("H", closed_H, twin_H), ...])  # (label, closed form, twin) pairs

Names contain what they verify (``single-head``, ``attention``, ``multihead``, ``layernorm``, ``ffn``, ``block``).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy
from energy.ffn import FFNEnergy
from energy.hessian.attention import (
    AttentionLayer,
    attention_hessian,
    attention_jacobians,
    attention_moments,
    autograd_attention_ggn,
    autograd_attention_hessian,
    bilinear_term,
    hessian_block,
    hessian_blocks,
    qk_hessian_blocks,
)
from energy.hessian.blocks import Part, qk_chain_matrix
from energy.hessian.energy_curvature import attention_energy_hessian, autograd_energy_hessian, ffn_energy_hessian
from energy.hessian.energy_layer import (
    autograd_energy_layer_ggn,
    autograd_energy_layer_hessian,
    energy_layer_hessian,
    energy_layer_jacobian,
    energy_layer_output,
)
from energy.hessian.structure import (
    BLOCK_NAMES,
    BLOCK_NAMES_O,
    block_diagonals,
    block_norms_from_moments,
    block_traces,
    hessian_frobenius_norms,
)
from energy.kernels import CauchyKernel, GaussianKernel, PowerKernel

__all__ = [
    "CASE_MODULES", "PARTS", "REGISTRY", "TOLERANCE", "Case", "Pair", "Trial", "case", "dims", "format_table",
    "load_cases", "main", "rel_err", "run", "run_case",
]

DTYPE = torch.float64
#: Target of every case: ``max_rel_err ≤ TOLERANCE``.
TOLERANCE = 1e-10
#: Floor of the denominator of :func:`rel_err` (a twin that is exactly zero is compared absolutely).
TINY = torch.finfo(DTYPE).tiny
#: The parts of a Hessian: the whole, the Gauss–Newton (outer-product) part and the functional part.
PARTS: tuple[Part, ...] = ("H", "H_o", "H_f")
#: Modules whose import registers further cases (with :func:`case`); imported by :func:`load_cases`.
CASE_MODULES: list[str] = ["energy.hessian.verify_block"]


#: One comparison: ``(label, closed form, twin)`` or ``(label, closed form, twin, scale)``.
Pair = tuple[str, Tensor, Tensor] | tuple[str, Tensor, Tensor, Tensor]


@dataclass
class Trial:
    """One random instance of a case: its sizes and the comparisons ``(label, closed form, twin[, scale])``.

    ``scale`` (optional) replaces ``twin`` in the denominator of :func:`rel_err`: a block or a diagonal is measured
    against the whole matrix it is part of (module docstring).
    """

    shapes: dict[str, int]
    pairs: Sequence[Pair]


@dataclass(frozen=True)
class Case:
    """A registered case: ``run(g, t)`` draws trial ``t`` from the generator ``g``."""

    name: str
    compares: str
    reference: str
    run: Callable[[torch.Generator, int], Trial]


#: Every case, by name, in registration order.
REGISTRY: dict[str, Case] = {}


def case(name: str, *, compares: str, reference: str) -> Callable[[Callable[[torch.Generator, int], Trial]],
                                                                      Callable[[torch.Generator, int], Trial]]:
    """Decorator registering ``fn(g, t) -> Trial`` as the case ``name`` (names are unique)."""

    def deco(fn: Callable[[torch.Generator, int], Trial]) -> Callable[[torch.Generator, int], Trial]:
        if name in REGISTRY:
            raise ValueError(f"a verification case named {name!r} is already registered")
        REGISTRY[name] = Case(name, compares, reference, fn)
        return fn

    return deco


def load_cases() -> dict[str, Case]:
    """Import the modules of :data:`CASE_MODULES` (registering their cases); the registry."""
    for module in CASE_MODULES:
        importlib.import_module(module)
    return REGISTRY


def rel_err(closed: Tensor, twin: Tensor, scale: Tensor | None = None) -> float:
    """``‖closed − twin‖_max / max(‖scale‖_max, tiny)`` (``scale`` defaults to ``twin``); ``nan`` if a value is not
    finite or the shapes differ.
    """
    if closed.shape != twin.shape:
        return math.nan
    if twin.numel() == 0:
        return 0.0
    closed, twin = closed.detach().to(DTYPE), twin.detach().to(DTYPE)
    ref = twin if scale is None else scale.detach().to(DTYPE)
    if not all(bool(torch.isfinite(x).all()) for x in (closed, twin, ref)):
        return math.nan
    return float((closed - twin).abs().max()) / max(float(ref.abs().max()), TINY)


# ---------------------------------------------------------------------------------------------------- instances


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=DTYPE)


def dims(g: torch.Generator, t: int) -> dict[str, int]:
    """Odd sizes of trial ``t``: batch ``B ∈ {2, 3}``, tokens ``L`` (``1`` when ``t % 3 == 2``, else 3–6 and
    ``≠ d_V``), widths ``d_V ∈ [2, 5]`` and ``d_K ∈ [1, 5]``, ``d_K ≠ d_V``.
    """
    B, d_V = _randint(g, 2, 3), _randint(g, 2, 5)
    d_K = _randint(g, 1, 4)
    d_K += d_K >= d_V  # skip d_V
    L = 1 if t % 3 == 2 else _randint(g, 3, 5)
    L += L != 1 and L >= d_V  # skip d_V
    return {"B": B, "L": L, "d_V": d_V, "d_K": d_K}


def _layer(g: torch.Generator, s: dict[str, int], **options: Any) -> tuple[AttentionLayer, Tensor, Tensor]:
    """A random single-head layer of sizes ``s`` (``d_O`` present: with ``W_O``), inputs ``X`` and targets ``Y``."""
    B, L, d, k = s["B"], s["L"], s["d_V"], s["d_K"]
    W_O = _randn(g, d, s["d_O"]) if "d_O" in s else None
    layer = AttentionLayer(_randn(g, d, k), _randn(g, d, k), _randn(g, d, d), W_O, **options)
    X = 0.8 * _randn(g, B, L, d)
    return layer, X, _randn(g, B, L, layer.d_out)


def _hessian_pairs(layer: AttentionLayer, X: Tensor, Y: Tensor) -> list[tuple[str, Tensor, Tensor, Tensor]]:
    """Dense ``H``, ``H_o``, ``H_f`` and every block of each, closed form vs autograd twin, on the Hessian's scale."""
    H_ad, Ho_ad = autograd_attention_hessian(layer, X, Y), autograd_attention_ggn(layer, X, Y)
    scale = _scale(H_ad, Ho_ad)
    mom = attention_moments(layer, X, Y)
    spans = _spans(mom.sizes, mom.params)
    pairs = []
    for part, twin in zip(PARTS, (H_ad, Ho_ad, H_ad - Ho_ad)):
        pairs.append((f"attention_hessian {part}", attention_hessian(mom, part), twin, scale))
        for (a, b), block in hessian_blocks(mom, part).items():
            pairs.append((f"hessian_blocks {part}({a},{b})", block, twin[spans[a], spans[b]], scale))
            pairs.append((f"hessian_block {part}({a},{b})", hessian_block(mom, a, b, part), twin[spans[a], spans[b]],
                          scale))
    return pairs


def _scale(*twins: Tensor) -> Tensor:
    """The scale of a Hessian's parts: the largest entry of the twins of ``H`` and ``H_o`` (``H_f = H − H_o``)."""
    return torch.stack([T.abs().max() for T in twins]).max()


def _spans(sizes: dict[str, int], params: tuple[str, ...]) -> dict[str, slice]:
    out, start = {}, 0
    for p in params:
        out[p], start = slice(start, start + sizes[p]), start + sizes[p]
    return out


def _padding_mask(g: torch.Generator, B: int, L: int) -> Tensor:
    """Key padding ``(B, L, L)``: sequence ``b`` attends to its first ``len_b`` keys; the first is padded if L > 1."""
    lengths = [max(1, L - 1 - _randint(g, 0, max(L - 2, 0))) if b == 0 else _randint(g, 1, L) for b in range(B)]
    keys = torch.arange(L)
    return torch.stack([(keys < n).expand(L, L) for n in lengths])


# ---------------------------------------------------------------------------------------------------- MATH §3

_TWINS = "autograd_attention_hessian, autograd_attention_ggn (torch.func; H_f = H − H_o)"



@case("single-head-hessian", compares="attention_hessian / hessian_block(s): H, H_o, H_f (softmax, no W_O)",
      reference=_TWINS)
def _plain(g: torch.Generator, t: int) -> Trial:
    s = dims(g, t)
    reduction = ("sum", "mean")[t % 2]
    return Trial(s, _hessian_pairs(*_layer(g, s, reduction=reduction)))


@case("single-head-hessian-W_O", compares="attention_hessian / hessian_block(s) with an output projection W_O",
      reference=_TWINS)
def _with_output(g: torch.Generator, t: int) -> Trial:
    s = dims(g, t)
    s["d_O"] = _randint(g, 1, 4) + (t % 2) * 2
    return Trial(s, _hessian_pairs(*_layer(g, s, c=0.37)))


@case("single-head-hessian-causal", compares="attention_hessian / hessian_block(s) with a causal mask (± W_O)",
      reference=_TWINS)
def _causal(g: torch.Generator, t: int) -> Trial:
    s = dims(g, t)
    if t % 2:
        s["d_O"] = _randint(g, 1, 4)
    return Trial(s, _hessian_pairs(*_layer(g, s, causal=True)))


@case("single-head-hessian-padding", compares="attention_hessian / hessian_block(s) with a key-padding mask (B, L, L)",
      reference=_TWINS)
def _padding(g: torch.Generator, t: int) -> Trial:
    s = dims(g, t)
    return Trial(s, _hessian_pairs(*_layer(g, s, mask=_padding_mask(g, s["B"], s["L"]), scale=0.7)))


@case("single-head-linear-attention",
      compares="attention_hessian / hessian_block(s), linear attention (± causal, ± W_O)", reference=_TWINS)
def _linear(g: torch.Generator, t: int) -> Trial:
    s = dims(g, t)
    if t % 2:
        s["d_O"] = _randint(g, 1, 4)
    return Trial(s, _hessian_pairs(*_layer(g, s, linear=True, causal=t % 2 == 0)))


@case("single-head-jacobians", compares="attention_jacobians J_Q, J_K, J_V[, J_O] (softmax / linear, ± W_O, ± causal)",
      reference="torch.func.jacrev of vec_r(F) (AttentionLayer.output)")
def _jacobians(g: torch.Generator, t: int) -> Trial:
    s = dims(g, t)
    if t % 2 == 0:
        s["d_O"] = _randint(g, 1, 4)
    layer, X, Y = _layer(g, s, linear=t % 3 == 1, causal=t % 2 == 1)
    mom = attention_moments(layer, X, Y)
    J = attention_jacobians(mom)
    pairs = []
    for i, name in enumerate(mom.params):
        def out(W: Tensor, i: int = i) -> Tensor:
            weights = list(layer.weights)
            weights[i] = W
            return layer.with_weights(*weights).output(X).reshape(-1)

        W = layer.weights[i]
        pairs.append((f"J_{name}", J[name], torch.func.jacrev(out)(W).reshape(-1, W.numel())))
    return Trial(s, pairs)


@case("single-head-W_QK", compares="qk_hessian_blocks (QK,QK), (V,QK), (V,V): H, H_o, H_f (± causal)",
      reference="autograd_attention_hessian / _ggn at W_Q = W_QK, W_K = I (its Q and V blocks)")
def _w_qk(g: torch.Generator, t: int) -> Trial:
    s = dims(g, t)
    B, L, d, k = s["B"], s["L"], s["d_V"], s["d_K"]
    W_QK, W_V = _randn(g, d, d) / math.sqrt(k), _randn(g, d, d)
    X, Y = 0.8 * _randn(g, B, L, d), _randn(g, B, L, d)
    options: dict[str, Any] = {"causal": t % 2 == 1, "scale": 1 / math.sqrt(k)}
    layer = AttentionLayer(W_QK, torch.eye(d, dtype=DTYPE), W_V, **options)
    H_ad, Ho_ad = autograd_attention_hessian(layer, X, Y), autograd_attention_ggn(layer, X, Y)
    sl = {"QK": slice(0, d * d), "V": slice(2 * d * d, 3 * d * d)}
    pairs = []
    for part, twin in zip(PARTS, (H_ad, Ho_ad, H_ad - Ho_ad)):
        for (a, b), block in qk_hessian_blocks(X, W_QK, W_V, Y, part=part, **options).items():
            pairs.append((f"{part}({a},{b})", block, twin[sl[a], sl[b]], _scale(H_ad, Ho_ad)))
    return Trial(s, pairs)


@case("single-head-bilinear-term", compares="bilinear_term G_QK ⊗ I (the H_f(Q,K) term of T's bilinearity)",
      reference="autograd H(Q,K) − 𝒥ᵀ H_QK 𝒥 (both torch.func.hessian; 𝒥 = qk_chain_matrix)")
def _bilinear(g: torch.Generator, t: int) -> Trial:
    s = dims(g, t)
    layer, X, Y = _layer(g, s, causal=t % 2 == 1)
    d, k = s["d_V"], s["d_K"]
    H = autograd_attention_hessian(layer, X, Y)
    # the same loss as a function of W_QK = W_Q W_Kᵀ (scale κ of the two-matrix layer): its (Q,Q) block
    qk = AttentionLayer(layer.W_Q @ layer.W_K.T, torch.eye(d, dtype=DTYPE), layer.W_V, scale=layer.kappa,
                        causal=layer.causal)
    H_qk = autograd_attention_hessian(qk, X, Y)[: d * d, : d * d]
    chain = qk_chain_matrix(layer.W_Q, layer.W_K)
    twin = H[: d * k, d * k : 2 * d * k] - (chain.T @ H_qk @ chain)[: d * k, d * k :]
    return Trial(s, [("G_QK ⊗ I", bilinear_term(attention_moments(layer, X, Y)), twin)])


def _structure_layer(g: torch.Generator, t: int) -> tuple[dict[str, int], AttentionLayer, Tensor, Tensor]:
    """The layers of the structure cases: plain, ``W_O``, causal + ``W_O``, in turn."""
    s = dims(g, t)
    if t % 3 != 0:
        s["d_O"] = _randint(g, 1, 4)
    layer, X, Y = _layer(g, s, causal=t % 3 == 2)
    return (s, layer, X, Y)


def _dense_parts(layer: AttentionLayer, X: Tensor, Y: Tensor) -> dict[Part, tuple[Tensor, Tensor]]:
    """``{part: (autograd twin, dense closed form)}`` for ``H``, ``H_o``, ``H_f``."""
    H, H_o = autograd_attention_hessian(layer, X, Y), autograd_attention_ggn(layer, X, Y)
    mom = attention_moments(layer, X, Y)
    return {p: (twin, attention_hessian(mom, p)) for p, twin in zip(PARTS, (H, H_o, H - H_o))}


@case("single-head-structure-norms",
      compares="block_norms_from_moments (H, H_o, H_f, ⟨H_o,H_f⟩ per block), hessian_frobenius_norms",
      reference="Frobenius norms of the dense autograd twin and of the dense closed form attention_hessian")
def _norms(g: torch.Generator, t: int) -> Trial:
    s, layer, X, Y = _structure_layer(g, t)
    mom = attention_moments(layer, X, Y)
    spans = _spans(mom.sizes, mom.params)
    names = BLOCK_NAMES if layer.W_O is None else BLOCK_NAMES + BLOCK_NAMES_O
    norms, whole = block_norms_from_moments(mom), hessian_frobenius_norms(mom)
    closed = torch.tensor([norms[(b, p)] for b in names for p in ("H", "H_o", "H_f", "cross")]
                          + [whole[p] for p in ("H", "H_o", "H_f")], dtype=DTYPE)
    pairs = []
    for source, dense in (("autograd", 0), ("dense closed form", 1)):
        D = {p: v[dense] for p, v in _dense_parts(layer, X, Y).items()}
        ref = []
        for b in names:
            blk = {p: D[p][spans[b[0]], spans[b[1]]] for p in D}
            ref += [blk["H"].norm(), blk["H_o"].norm(), blk["H_f"].norm(), (blk["H_o"] * blk["H_f"]).sum()]
        ref += [D[p].norm() for p in ("H", "H_o", "H_f")]
        pairs.append((f"norms vs {source}", closed, torch.stack(ref)))
    return Trial(s, pairs)


@case("single-head-structure-diagonals", compares="block_diagonals and block_traces (H, H_o, H_f)",
      reference="diagonal and traces of the dense autograd twin and of the dense closed form attention_hessian")
def _diagonals(g: torch.Generator, t: int) -> Trial:
    s, layer, X, Y = _structure_layer(g, t)
    mom = attention_moments(layer, X, Y)
    spans = _spans(mom.sizes, mom.params)
    parts = _dense_parts(layer, X, Y)
    # scales: the largest diagonal entry of H or H_o, and the largest sum of |diagonal| over a block
    diag_scale = _scale(parts["H"][0].diagonal(), parts["H_o"][0].diagonal())
    trace_scale = _scale(parts["H"][0].diagonal().abs().sum(), parts["H_o"][0].diagonal().abs().sum())
    pairs: list[Pair] = []
    for part, (twin, dense) in parts.items():
        diag = torch.cat([block_diagonals(mom, part)[p] for p in mom.params])
        tr = block_traces(mom, part)
        traces = torch.tensor([tr[p + p] for p in mom.params] + [tr["total"]], dtype=DTYPE)
        for source, D in (("autograd", twin), ("dense", dense)):
            pairs.append((f"block_diagonals {part} vs {source}", diag, D.diagonal(), diag_scale))
            ref = torch.stack([D[spans[p], spans[p]].trace() for p in mom.params] + [D.trace()])
            pairs.append((f"block_traces {part} vs {source}", traces, ref, trace_scale))
    return Trial(s, pairs)


# ---------------------------------------------------------------------------------------------------- MATH §4


@case("single-head-energy-layer", compares="energy_layer_hessian H, H_o, H_f and energy_layer_jacobian, "
      "layers (a) and (b) (tied)", reference="autograd_energy_layer_hessian / _ggn, torch.func.jacrev of F")
def _energy_layer(g: torch.Generator, t: int) -> Trial:
    s = dims(g, t)
    B, L, d, k = s["B"], s["L"], s["d_V"], s["d_K"]
    X, M, Y = _randn(g, B, L, d), _randn(g, d, k), _randn(g, B, L, d)
    opts: dict[str, Any] = {"alpha": 0.3 + 1.2 * float(torch.rand((), generator=g, dtype=DTYPE)), "tied": t % 2 == 1,
                            "reduction": ("sum", "mean")[t % 3 == 1], "c": (None, 0.3)[t % 3 == 2],
                            "scale": (None, 0.8)[t % 2 == 0]}
    H, H_o = autograd_energy_layer_hessian(X, M, Y, **opts), autograd_energy_layer_ggn(X, M, Y, **opts)
    fopts = {"alpha": opts["alpha"], "tied": opts["tied"], "scale": opts["scale"]}
    J = torch.func.jacrev(lambda m: energy_layer_output(X, m.reshape(d, k), **fopts).reshape(-1))(M.reshape(-1))
    return Trial(s, [
        ("H", energy_layer_hessian(X, M, Y, **opts), H, _scale(H, H_o)),
        ("H_o", energy_layer_hessian(X, M, Y, part="H_o", **opts), H_o, _scale(H, H_o)),
        ("H_f", energy_layer_hessian(X, M, Y, part="H_f", **opts), H - H_o, _scale(H, H_o)),
        ("J", energy_layer_jacobian(X, M, **fopts), J),
    ])


@case("attention-energy-token-hessian",
      compares="attention_energy_hessian ∇²_Y E_att (Gaussian / power / Cauchy kernel, ± ridge, 1 or 2–3 heads)",
      reference="autograd_energy_hessian (torch.func.hessian of energy.energy), per sequence")
def _token_attention(g: torch.Generator, t: int) -> Trial:
    s = dims(g, t)
    B, n, d, k = s["B"], s["L"], s["d_V"], s["d_K"]
    kernel = (GaussianKernel(), PowerKernel(1.0 + 0.5 * (t % 2), 0.1), CauchyKernel())[t % 3]
    ridge = 0.3 * (t % 2)
    if t % 2:
        s["heads"] = _randint(g, 2, 3)
        E: AttentionEnergy | MultiHeadAttentionEnergy = MultiHeadAttentionEnergy(
            _randn(g, s["heads"], d, k), kernel=kernel, ridge=ridge)
    else:
        E = AttentionEnergy(_randn(g, d, k), kernel=kernel, ridge=ridge)
    Y = _randn(g, B, n, d)
    closed = attention_energy_hessian(E, Y)
    return Trial(s, [(f"sequence {b}", closed[b], autograd_energy_hessian(E, Y[b])) for b in range(B)])


@case("single-head-feedforward-energy-token-hessian", compares="ffn_energy_hessian ∇²_Y E_ffn = I_n ⊗ (I + W_f)",
      reference="autograd_energy_hessian (torch.func.hessian of energy.energy), per sequence")
def _token_feedforward(g: torch.Generator, t: int) -> Trial:
    s = dims(g, t)
    B, n, d = s["B"], s["L"], s["d_V"]
    A = _randn(g, d, d)
    E = FFNEnergy(0.2 * (A + A.T), _randn(g, d), allow_unbounded=True)
    closed = ffn_energy_hessian(E, n)
    Y = _randn(g, B, n, d)
    return Trial(s, [(f"sequence {b}", closed, autograd_energy_hessian(E, Y[b])) for b in range(B)])


# ---------------------------------------------------------------------------------------------------- driver


def _seed(seed: int, name: str, t: int) -> int:
    """The seed of trial ``t`` of case ``name``: independent of which other cases run."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 101 + t) % (1 << 62)


def run_case(c: Case, *, seed: int = 0, trials: int = 3) -> dict[str, Any]:
    """One row: the worst relative error of case ``c`` over ``trials`` instances (module docstring for the keys)."""
    t0 = time.perf_counter()
    worst, where, shapes = 0.0, "", []
    for t in range(trials):
        trial = c.run(torch.Generator().manual_seed(_seed(seed, c.name, t)), t)
        shapes.append(dict(trial.shapes))
        for label, closed, twin, *scale in trial.pairs:
            err = rel_err(closed, twin, *scale)
            if not math.isnan(worst) and not err <= worst:  # a larger error, or the first nan (which then stays)
                worst, where = err, f"trial {t}: {label}"
    return {"case": c.name, "max_rel_err": worst, "shapes": shapes, "compares": c.compares, "reference": c.reference,
            "worst": where, "trials": trials, "passed": worst <= TOLERANCE,
            "seconds": round(time.perf_counter() - t0, 3)}


def run(*, seed: int = 0, trials: int = 3, cases: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the selected cases (all by default, in registration order); one row each (see :func:`run_case`).

    Raises:
        ValueError: ``trials < 1`` or an unknown case name (the message lists the valid ones).
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"`trials` must be an int ≥ 1, got {trials!r}; e.g. trials=3")
    registry = load_cases()
    unknown = [n for n in cases or [] if n not in registry]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; valid cases: {', '.join(registry)}")
    selected = [c for c in registry.values() if cases is None or c.name in cases]
    return [run_case(c, seed=seed, trials=trials) for c in selected]


def _shapes_text(shapes: list[dict[str, int]]) -> str:
    return "; ".join(" ".join(f"{k}={v}" for k, v in s.items()) for s in shapes)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows (case, error, pass, trials, shapes, closed forms, twin)."""
    lines = ["| case | max rel. err | ok | trials | shapes | closed form | twin |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['max_rel_err']:.1e} | {'yes' if r['passed'] else 'NO'} | {r['trials']} | "
                     f"{_shapes_text(r['shapes'])} | {r['compares']} | {r['reference']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str = "python -m energy.hessian verify") -> int:
    """``python -m energy.hessian verify [--case NAME ...] [--trials N] [--seed S] [--json OUT] [--list]``.

    Prints the table (and writes the rows as JSON to ``OUT``, atomically); returns the exit status: 0 when every
    case meets :data:`TOLERANCE`, 1 otherwise (one line on stderr naming the failed cases), 2 for a usage error
    (one line; ``--json`` is checked writable before anything is computed), 130 on Ctrl-C.
    """
    from energy._cli import CommandError, Parser, UsageError, check_writable_file, run_command
    from energy._io import atomic_write_text

    def body() -> int:
        registry = load_cases()
        names = ", ".join(registry)
        parser = Parser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
        parser.add_argument("--case", action="append", dest="cases", metavar="NAME",
                            help=f"run only this case (repeatable; one of {names})")
        parser.add_argument("--trials", type=int, default=3, help="random float64 instances per case (at least 1)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the random instances")
        parser.add_argument("--json", metavar="OUT", help="also write the rows to this JSON file")
        parser.add_argument("--list", action="store_true", help="list the cases and exit")
        args = parser.parse_args(argv)
        if args.list:
            for c in registry.values():
                print(f"{c.name}: {c.compares}  [twin: {c.reference}]")
            return 0
        if args.trials < 1:
            raise UsageError(f"--trials must be at least 1, got {args.trials}; e.g. --trials 3")
        unknown = [n for n in args.cases or [] if n not in registry]
        if unknown:
            raise UsageError(f"--case {', '.join(unknown)}: unknown case; valid cases: {names}")
        out = None if args.json is None else check_writable_file(args.json, "--json")
        rows = run(seed=args.seed, trials=args.trials, cases=args.cases)
        print(format_table(rows))
        if out is not None:
            finite = [{**r, "max_rel_err": r["max_rel_err"] if math.isfinite(r["max_rel_err"]) else None}
                      for r in rows]  # strict JSON: a non-finite error is null (and the row failed)
            doc = {"command": "verify", "seed": args.seed, "trials": args.trials, "tolerance": TOLERANCE,
                   "all_passed": all(r["passed"] for r in rows), "torch": torch.__version__, "cases": finite}
            atomic_write_text(out, json.dumps(doc, indent=2, allow_nan=False) + "\n")
        failed = [r["case"] for r in rows if not r["passed"]]
        if failed:
            raise CommandError(f"{len(failed)} of {len(rows)} case(s) above max_rel_err {TOLERANCE:.0e}: "
                               f"{', '.join(failed)}")
        print(f"\nall {len(rows)} case(s) meet max_rel_err <= {TOLERANCE:.0e}")
        return 0

    return run_command(prog, body, argv)


if __name__ == "__main__":
    sys.exit(main())
