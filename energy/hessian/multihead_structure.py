r"""Exact Frobenius norms, traces and diagonals of the multi-head Hessian blocks without forming them (MATH §5.1).

Blocks are indexed by pairs of names of :meth:`~energy.hessian.multihead.MultiHeadAttentionLayer.param_blocks`.
With ``J_a = Σ_{h uses a} J^{(h)}_a`` (:mod:`energy.hessian.multihead`) every block is

.. math:: H(a, b) = 2c\, J_a^\top J_b + \textstyle\sum_{h \in S} H_f^{(h)}(a, b),\qquad
          S = \{h : h\ \text{uses}\ a\ \text{and}\ b\},

and three cost classes occur (``N = B L`` rows, ``d`` input width, ``k`` query/key width, ``d_v`` value width):

* **within one head, untied** (``S = {h}`` and neither parameter shared, i.e. no GQA sharing): the single-head
  token-space norms of :mod:`energy.hessian.structure` on head ``h``'s moments with the whole layer's gradient
  (:func:`energy.hessian.moments.gradient_moments`): ``O(B² L⁴ + B² L² d)`` per block.
* **across heads** (``S = ∅``): pure outer product, ``H_f = 0`` and
  ``‖H_o(a,b)‖² = 4c² ⟨J_a J_aᵀ, J_b J_bᵀ⟩``. The output-space Grams are never formed: each is a sum of terms
  ``(J_aJ_aᵀ)_{(i,m),(j,m')} = s_{ij} (P_i P'^ᵀ_j)_{mm'}`` with scalar row Grams ``s`` (``x_iᵀx_j``, ``q_iᵀq'_j``,
  ``μ_iᵀμ'_j``, ``ν_iᵀν'_j``) and small per-row factors ``P_i`` (``d_out × r``), so
  ``⟨J_aJ_aᵀ, J_bJ_bᵀ⟩ = Σ_{ts} Σ_{ij} s^t_{ij} s^s_{ij} ⟨P^{t⊤}_i P^s_i, P'^{t⊤}_j P'^s_j⟩`` (:func:`_gram_terms`):
  ``O(N d_out r² + N² r²)`` per pair of terms, ``r ∈ {k, d, d_v, d_out}``; memory ``O(N² + N r²)``. A shared
  ``K_g``/``V_g`` has ``|g|²`` terms (one per pair of its heads), so its blocks cost ``|g|²`` (or ``|g|⁴``) times more.
* **GQA-shared** (``K_g``, ``V_g`` with groups of several heads, ``S ≠ ∅``): ``‖H_o‖²`` as across heads;
  ``‖H_f‖² = Σ_{h,h'∈S} ⟨H_f^{(h)}, H_f^{(h')}⟩`` by the single-head Kronecker sums of two heads
  (``(K,K)``: ``Σ_ij (q_iᵀq'_j)² ⟨R_i, R'_j⟩``; ``(V,K)``: ``κ² Σ_ij (q_iᵀq'_j)(γ_iᵀγ'_j)⟨Σ_i, Σ'_j⟩``;
  ``(V,V)``: 0), ``O(|S|² (B² L⁴ + B² L² d))``; ``⟨H_o, H_f⟩ = 2c Σ_{h∈S} Σ_r H_f^{(h)}[J_a^{(r)}, J_b^{(r)}]``,
  the bilinear form of each head's functional part (:func:`functional_bilinear`) on the ``N d_out`` Jacobian rows
  ``r``: ``O(|S| N d_out (B L² + d k) B L)`` time, ``O(N d_out p_a)`` memory (the rows).

Diagonal blocks ``(a, a)``: untied parameters take the single-head diagonals (``O(B L³ + B L² (d + k))``);
a GQA-shared one ``diag 2c J_aᵀJ_a + Σ_h diag H_f^{(h)}``, ``O(N d_out p_a)``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from energy._validation import EnergyInputError
from energy.hessian.attention_layer import loss_constant
from energy.hessian.blocks import Part, _check_part
from energy.hessian.distributed import ShardGroup, resolve_shards, tensor_checksum
from energy.hessian.moments import AttentionMoments, attention_jacobians
from energy.hessian.multihead import (
    _LOCAL,
    MultiHeadAttentionLayer,
    _columns,
    _gradient,
    check_param_name,
    head_moments,
)
from energy.hessian.structure import _core_gram, _gram, _TokenCores, block_diagonals, block_inner_products

__all__ = [
    "functional_bilinear",
    "multihead_block_inner_products",
    "multihead_block_norms",
    "multihead_block_diagonals",
    "multihead_block_traces",
]


def functional_bilinear(mom: AttentionMoments, d1: dict[str, Tensor], d2: dict[str, Tensor]) -> Tensor:
    r"""``H_f[δ₁, δ₂] = D²⟨G, F⟩[δ₁, δ₂]`` of one head for ``R`` pairs of weight directions (pure; MATH §3.4–§3.5).

    .. math::
        D^2\langle G, F\rangle = \langle v, D^2A\rangle + \langle v(D\tilde V_2), DA_1\rangle
        + \langle v(D\tilde V_1), DA_2\rangle + \langle v(D^2\tilde V), A\rangle,\qquad
        v(M)_{bij} = x_{bj}^\top M g_{bi},

    with ``DT_s = κ X(δW_Q^s W_Kᵀ + W_Q δW_K^{s⊤})Xᵀ``, ``D²T = κ X(δW_Q^1 δW_K^{2⊤} + δW_Q^2 δW_K^{1⊤})Xᵀ``,
    ``DA = a ⊙ ũ`` and ``D²A = a ⊙ (D²T − ⟨a, D²T⟩) + a ⊙ (ũ_1ũ_2 − ⟨a, ũ_1ũ_2⟩)`` row-wise (``ũ = DT − ⟨a, DT⟩``;
    linear attention: ``DA = DT ⊙ m``, ``D²A = D²T ⊙ m``), ``DṼ = δW_V W_O + W_V δW_O``,
    ``D²Ṽ = δW_V^1 δW_O^2 + δW_V^2 δW_O^1``. Cost ``O(R B L (L + d) (d + k + d_out))``.

    Args:
        mom: the head's moments (:func:`energy.hessian.moments.gradient_moments`: ``G`` is ``mom.G``).
        d1: ``{"Q"|"K"|"V"|"O": (R, *shape)}``, the first directions (missing weights: zero).
        d2: the second directions, likewise.

    Returns:
        ``(R,)`` values.
    """
    X, A, kappa = mom.X, mom.A, mom.kappa
    B, L, _ = X.shape
    G = mom.G.reshape(B, L, -1)
    W_O = mom.W_O if mom.W_O is not None else torch.eye(mom.d_v, dtype=X.dtype, device=X.device)
    XQ, XK = X @ mom.W_Q, X @ mom.W_K

    def proj(dW: Tensor) -> Tensor:  # X δW, (R, B, L, ·)
        return torch.einsum("bld,rdk->rblk", X, dW)

    def dT(dd: dict[str, Tensor]) -> Tensor | None:
        out = None
        if "Q" in dd:
            out = kappa * torch.einsum("rbik,bjk->rbij", proj(dd["Q"]), XK)
        if "K" in dd:
            t = kappa * torch.einsum("bik,rbjk->rbij", XQ, proj(dd["K"]))
            out = t if out is None else out + t
        return out

    def dV(dd: dict[str, Tensor]) -> Tensor | None:
        out = None
        if "V" in dd:
            out = dd["V"] @ W_O
        if "O" in dd:
            t = mom.W_V @ dd["O"]
            out = t if out is None else out + t
        return out

    def v(M: Tensor) -> Tensor:  # v(M)_{rbij} = x_jᵀ M_r g_i
        return torch.einsum("bjd,rde,bie->rbij", X, M, G)

    if mom.linear:
        m = mom.J_tok.diagonal(dim1=-2, dim2=-1)

        def DA(u: Tensor) -> Tensor:
            return u * m
    else:
        def center(u: Tensor) -> Tensor:
            return u - (A * u).sum(-1, keepdim=True)

        def DA(u: Tensor) -> Tensor:
            return A * center(u)

    T1, T2, V1, V2 = dT(d1), dT(d2), dV(d1), dV(d2)
    D2T = None
    for s1, s2 in ((d1, d2), (d2, d1)):
        if "Q" in s1 and "K" in s2:
            t = kappa * torch.einsum("rbik,rbjk->rbij", proj(s1["Q"]), proj(s2["K"]))
            D2T = t if D2T is None else D2T + t
    R = next(iter(d1.values())).shape[0]
    out = X.new_zeros(R)
    D2A = None if D2T is None else DA(D2T)
    if T1 is not None and T2 is not None and not mom.linear:
        curv = DA(center(T1) * center(T2))
        D2A = curv if D2A is None else D2A + curv
    if D2A is not None:
        out = out + (D2A * v(mom.V_eff[None])).sum((1, 2, 3))
    if T1 is not None and V2 is not None:
        out = out + (DA(T1) * v(V2)).sum((1, 2, 3))
    if T2 is not None and V1 is not None:
        out = out + (DA(T2) * v(V1)).sum((1, 2, 3))
    D2V = None
    for s1, s2 in ((d1, d2), (d2, d1)):
        if "V" in s1 and "O" in s2:
            t = s1["V"] @ s2["O"]
            D2V = t if D2V is None else D2V + t
    if D2V is not None:
        out = out + (A * v(D2V)).sum((1, 2, 3))
    return out


class _Context:
    """The per-head moments (whole-layer ``G``), token cores and Jacobians of one layer and input, each once."""

    def __init__(self, layer: MultiHeadAttentionLayer, X: Tensor, Y: Tensor) -> None:
        X3, Y3, mask = layer.check_inputs(X, Y)
        assert Y3 is not None
        self.layer, self.X3 = layer, X3
        self.c = layer.loss_constant(X3)
        self.moms = head_moments(layer, X3, _gradient(layer, X3, Y3, mask), mask)
        self._cores: dict[int, _TokenCores] = {}
        self._jacs: list[dict[str, Tensor]] | None = None
        self.sizes = {n: r * s for n, (r, s) in layer.param_blocks()}
        self.shapes = dict(layer.param_blocks())

    def cores(self, h: int) -> _TokenCores:
        if h not in self._cores:
            self._cores[h] = _TokenCores(self.moms[h])
        return self._cores[h]

    def columns(self, name: str) -> Tensor:
        """``J_a`` ``(N d_out, p_a)``."""
        if self._jacs is None:
            self._jacs = [attention_jacobians(m) for m in self.moms]
        return _columns(self.layer, self._jacs, name)

    def local(self, h: int, name: str) -> str:
        return dict(zip(self.layer.head_params(h), _LOCAL))[name]

    def tied(self, name: str) -> bool:
        return len(self.layer.users(name)) > 1


def _gram_terms(ctx: _Context, name: str) -> list[tuple[Tensor, Tensor, Tensor]]:
    r"""``J_a J_aᵀ = Σ_t s^t ⊙ (P^t_i P'^{t⊤}_j)``: terms ``(s (N, N), P (N, d_out, r), P' (N, d_out, r'))``.

    ``Q``: ``κ² x_iᵀx_j · C_iC_jᵀ`` (``C_i = Ṽᵀ Σ_i W_K``); ``K``: ``κ² q_iᵀq'_j · B_iB'^ᵀ_j`` (``B_i = ṼᵀΣ_i``)
    for every pair of heads of the group; ``V``: ``μ_iᵀμ'_j · W_OᵀW'_O``; ``O``: ``ν_iᵀν_j · I``
    (``ν_i = W_Vᵀμ_i``) — the single-head Jacobians of MATH §3.3.
    """
    moms, heads = ctx.moms, ctx.layer.users(name)
    kind = name.split(".")[1]
    N = moms[0].x.shape[0]
    out = []
    for h in heads:
        for h2 in heads:
            m1, m2 = moms[h], moms[h2]
            if kind == "Q":
                C = m1.kappa * (m1.B_V @ m1.W_K)
                out.append((_gram(m1.x), C, C))
            elif kind == "K":
                out.append((m1.q @ m2.q.T, m1.kappa * m1.B_V, m2.kappa * m2.B_V))
            elif kind == "V":
                assert m1.W_O is not None and m2.W_O is not None
                out.append((m1.M_1 @ m2.M_1.T, m1.W_O.T.expand(N, -1, -1), m2.W_O.T.expand(N, -1, -1)))
            else:
                nu = m1.M_1 @ m1.W_V
                eye = torch.eye(m1.d_O, dtype=nu.dtype, device=nu.device).expand(N, -1, -1)
                out.append((_gram(nu), eye, eye))
    return out


def _outer_sq(ctx: _Context, a: str, b: str) -> float:
    """``‖2c J_aᵀ J_b‖² = 4c² ⟨J_aJ_aᵀ, J_bJ_bᵀ⟩`` from :func:`_gram_terms`."""
    total = 0.0
    for s1, P1, Q1 in _gram_terms(ctx, a):
        for s2, P2, Q2 in _gram_terms(ctx, b):
            M = (P1.transpose(1, 2) @ P2).reshape(P1.shape[0], -1)  # P^tᵀ_i P^s_i
            Mp = (Q1.transpose(1, 2) @ Q2).reshape(Q1.shape[0], -1)  # P'^tᵀ_j P'^s_j
            total += float((s1 * s2 * (M @ Mp.T)).sum())
    return 4.0 * ctx.c**2 * total


def _functional_sq(ctx: _Context, a: str, b: str, heads: list[int]) -> float:
    """``‖Σ_{h∈S} H_f^{(h)}(a, b)‖²`` for shared ``K_g``/``V_g`` blocks (module docstring)."""
    kinds = {ctx.local(heads[0], a), ctx.local(heads[0], b)}
    if kinds == {"V"}:
        return 0.0
    total = 0.0
    for h in heads:
        for h2 in heads:
            m1, m2, c1, c2 = ctx.moms[h], ctx.moms[h2], ctx.cores(h), ctx.cores(h2)
            q12 = m1.q @ m2.q.T
            if kinds == {"K"}:
                core = _core_gram(c1.R["H_f"], c1.X, c1.X, c2.R["H_f"], c2.X, c2.X)
                total += float((q12**2 * core).sum())
            else:  # {K, V}: γ_i = W_O g_i
                assert m1.W_O is not None and m2.W_O is not None
                g12 = (m1.G @ m1.W_O.T) @ (m2.G @ m2.W_O.T).T
                core = _core_gram(c1.J, c1.X, c1.X, c2.J, c2.X, c2.X)
                total += m1.kappa**2 * float((q12 * g12 * core).sum())
    return total


def _mixed(ctx: _Context, a: str, b: str, heads: list[int], chunk: int = 1 << 22) -> float:
    """``⟨H_o(a,b), H_f(a,b)⟩ = 2c Σ_{h∈S} Σ_r H_f^{(h)}[J_a^{(r)}, J_b^{(r)}]`` (:func:`functional_bilinear`)."""
    Ja = ctx.columns(a).reshape(-1, *ctx.shapes[a])
    Jb = ctx.columns(b).reshape(-1, *ctx.shapes[b])
    B, L, d = ctx.X3.shape
    step = max(1, chunk // (B * L * (L + d + ctx.layer.d_k + ctx.layer.d_out)))
    total = 0.0
    for h in heads:
        la, lb = ctx.local(h, a), ctx.local(h, b)
        for r0 in range(0, Ja.shape[0], step):
            d1 = {la: Ja[r0:r0 + step]}
            d2 = {lb: Jb[r0:r0 + step]}
            total += float(functional_bilinear(ctx.moms[h], d1, d2).sum())
    return 2.0 * ctx.c * total


def _inner_products(ctx: _Context, a: str, b: str) -> dict[str, float]:
    layer = ctx.layer
    shared = sorted(set(layer.users(a)) & set(layer.users(b)))
    if not shared:  # across heads: pure outer product
        return {"oo": _outer_sq(ctx, a, b), "of": 0.0, "ff": 0.0}
    if not (ctx.tied(a) or ctx.tied(b)):  # one head, untied: the single-head structure
        h = shared[0]
        return block_inner_products(ctx.moms[h], ctx.local(h, a) + ctx.local(h, b), _cores=ctx.cores(h))
    if ctx.tied(a) and ctx.tied(b):
        ff = _functional_sq(ctx, a, b, shared)
    else:
        h = shared[0]
        ff = block_inner_products(ctx.moms[h], ctx.local(h, a) + ctx.local(h, b), _cores=ctx.cores(h))["ff"]
    return {"oo": _outer_sq(ctx, a, b), "of": _mixed(ctx, a, b, shared), "ff": ff}


def _pairs(ctx: _Context, blocks: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    names = [n for n, _ in ctx.layer.param_blocks()]
    if blocks is None:
        return [(a, b) for i, a in enumerate(names) for b in names[i:]]
    return [(check_param_name(ctx.layer, a, "blocks"), check_param_name(ctx.layer, b, "blocks")) for a, b in blocks]


def multihead_block_inner_products(
    layer: MultiHeadAttentionLayer, X: Tensor, Y: Tensor, blocks: list[tuple[str, str]] | None = None
) -> dict[tuple[str, str], dict[str, float]]:
    r"""``{(a, b): {"oo": ‖H_o‖², "of": ⟨H_o, H_f⟩, "ff": ‖H_f‖²}}`` of the blocks (default: every ``a ≤ b`` in flat
    order), exactly and without forming them (module docstring for the formulas and cost classes).
    """
    ctx = _Context(layer, X, Y)
    return {(a, b): _inner_products(ctx, a, b) for a, b in _pairs(ctx, blocks)}


def multihead_block_norms(
    layer: MultiHeadAttentionLayer, X: Tensor, Y: Tensor, blocks: list[tuple[str, str]] | None = None,
    *, squared: bool = False,
) -> dict[tuple[tuple[str, str], str], float]:
    r"""Exact Frobenius norms ``{((a, b), part): value}``, parts ``"H"``, ``"H_o"``, ``"H_f"`` and ``"cross"``
    (``⟨H_o, H_f⟩_F``, not a norm), of the multi-head blocks, cross-head ones included (MATH §5.1).

    .. math:: \|H\|^2 = \|H_o\|^2 + 2\langle H_o, H_f\rangle + \|H_f\|^2,\qquad
              \|H_o(a,b)\|^2 = 4c^2 \langle J_aJ_a^\top, J_bJ_b^\top\rangle

    Args:
        layer: the multi-head layer.
        X: ``(L, d)`` or ``(B, L, d)``.
        Y: the targets of ``F``.
        blocks: ``[(a, b), …]`` parameter names (default every distinct block).
        squared: return squared norms.
    """
    out: dict[tuple[tuple[str, str], str], float] = {}
    for ab, ip in multihead_block_inner_products(layer, X, Y, blocks).items():
        sq = {"H_o": ip["oo"], "H_f": ip["ff"], "H": ip["oo"] + 2.0 * ip["of"] + ip["ff"]}
        for part, value in sq.items():
            out[(ab, part)] = value if squared else math.sqrt(max(value, 0.0))
        out[(ab, "cross")] = ip["of"]
    return out


def _diagonals(ctx: _Context, part: Part) -> dict[str, Tensor]:
    """The diagonals of :func:`multihead_block_diagonals` on one context (the rows of one process or rank)."""
    layer = ctx.layer
    per_head: dict[tuple[int, str], dict[str, Tensor]] = {}

    def head_diagonals(h: int, p: Part) -> dict[str, Tensor]:
        if (h, p) not in per_head:
            per_head[(h, p)] = block_diagonals(ctx.moms[h], p)
        return per_head[(h, p)]

    out = {}
    for name, _ in layer.param_blocks():
        heads = layer.users(name)
        if len(heads) == 1:
            h = heads[0]
            out[name] = head_diagonals(h, part)[ctx.local(h, name)]
            continue
        diag = ctx.X3.new_zeros(ctx.sizes[name])
        if part in ("H", "H_o"):
            diag = diag + 2.0 * ctx.c * (ctx.columns(name) ** 2).sum(0)
        if part in ("H", "H_f"):
            for h in heads:
                diag = diag + head_diagonals(h, "H_f")[ctx.local(h, name)]
        out[name] = diag
    return out


def _sharded_layer(shards: ShardGroup, layer: MultiHeadAttentionLayer, X: Tensor, Y: Tensor
                   ) -> MultiHeadAttentionLayer:
    r"""The layer whose loss on this rank's sequences is this rank's share of the union's loss (MATH §6.2):
    ``reduction="sum"`` with ``c_eff = c_0 / Σ_r B_r`` for a mean over sequences (``c_0`` unchanged for a sum),
    after checking every rank's inputs (consensus) and that the ranks hold the same layer.
    """
    def check() -> Tensor:
        if not isinstance(layer, MultiHeadAttentionLayer):
            raise EnergyInputError("`layer` must be an energy.hessian.multihead.MultiHeadAttentionLayer, got "
                                   f"{type(layer).__name__}.")
        return layer.check_inputs(X, Y)[0]

    X3 = shards.run(check, "checking each rank's layer and sequences")
    theta = layer.flat()
    shards.check_same((layer.param_blocks(), str(theta.dtype), layer.c, layer.reduction, layer.causal, layer.linear,
                       layer.scale, tensor_checksum(theta)),
                      "the layer's weights and settings")
    B = shards.total(X3.shape[0], "the number of sequences")
    c0 = loss_constant(X3, layer.c, "sum", layer.d_out)
    return dataclasses.replace(layer, c=c0 / B if layer.reduction == "mean" else c0, reduction="sum")


def multihead_block_diagonals(
    layer: MultiHeadAttentionLayer, X: Tensor, Y: Tensor, part: Part = "H", *,
    distributed: bool | ShardGroup = False,
) -> dict[str, Tensor]:
    r"""Diagonals of the diagonal blocks ``part(a, a)``, ``{name: (p_a,)}`` in flat order (MATH §5.1).

    .. math:: \mathrm{diag}\,H(a,a) = \mathrm{diag}\,H^{(h)}(a,a)\ \ (a\ \text{of one head}),\qquad
              \mathrm{diag}\,H(a,a) = 2c\textstyle\sum_r (J_a)_{r\cdot}^{\circ 2} + \sum_{h\in S}\mathrm{diag}\,
              H_f^{(h)}(a,a)\ \ (\text{GQA-shared } a)

    ``distributed`` (``True`` or a :class:`~energy.hessian.distributed.ShardGroup`): ``X``, ``Y`` are this rank's
    sequences; the diagonals are sums over sequences, so each rank computes its own with the loss constant of the
    union (a mean divides by the number of sequences of all ranks) and one all-reduce of ``p`` numbers sums them
    (MATH §6.2).
    """
    _check_part(part)
    shards = resolve_shards(distributed)
    if shards is None:
        return _diagonals(_Context(layer, X, Y), part)
    shard_layer = _sharded_layer(shards, layer, X, Y)
    names = [(name, math.prod(shape)) for name, shape in layer.param_blocks()]
    like = layer.W_Q

    def local() -> Tensor:
        diags = _diagonals(_Context(shard_layer, X, Y), part)
        return torch.cat([diags[name] for name, _ in names])

    flat = shards.sum(local, (sum(n for _, n in names),), like, "the multi-head block diagonals")
    return dict(zip([name for name, _ in names], flat.split([n for _, n in names])))


def multihead_block_traces(layer: MultiHeadAttentionLayer, X: Tensor, Y: Tensor, part: Part = "H", *,
                           distributed: bool | ShardGroup = False) -> dict[str, float]:
    r"""Traces of the diagonal blocks ``{name: tr part(a, a)}`` and ``"total"`` (the trace of ``part``);
    ``distributed`` as for :func:`multihead_block_diagonals`.

    .. math:: \mathrm{tr}\,H = \textstyle\sum_a \mathrm{tr}\,H(a, a)
    """
    diags = multihead_block_diagonals(layer, X, Y, part, distributed=distributed)
    out = {name: float(v.sum()) for name, v in diags.items()}
    out["total"] = sum(out.values())
    return out
