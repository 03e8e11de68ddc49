r"""Closed-form loss Hessian of multi-head self-attention (MATH §5.1), built from the single-head value object.

.. math::
    F = \sum_h A_h X W_V^{g(h)} W_O^h,\qquad A_h = \mathrm{softmax}(\kappa X W_Q^h W_K^{g(h)\top} X^\top + m),
    \qquad \ell = c_\mathrm{eff} \textstyle\sum_b \|F_b - Y_b\|_F^2,

with ``g(h) = h // (n_heads / n_kv_heads)`` the key/value group of query head ``h`` (grouped-query attention;
``n_kv_heads = n_heads`` is ordinary multi-head attention). Each head is an
:class:`~energy.hessian.attention_layer.AttentionLayer` (:meth:`MultiHeadAttentionLayer.heads`), so no
single-head formula is copied here.

Because ``F`` is a **sum over heads**, ``∂²F/∂θ_h∂θ_{h'} = 0`` for parameters of different heads, so with
``G = ∂ℓ/∂F = 2c(F − Y)`` and the Jacobian ``J = ∂ vec_r F/∂θ``

.. math::
    H = \underbrace{2c\,J^\top J}_{H_o} + \underbrace{\textstyle\sum_h T_h^\top H_f^{(h)}(G)\, T_h}_{H_f},
    \qquad J = \textstyle\sum_h J^{(h)} T_h,

where ``H_f^{(h)}(G) = Σ ⟨G, ∇²F_h⟩`` is the single-head functional part of head ``h`` with the **whole layer's**
upstream gradient (:func:`energy.hessian.moments.gradient_moments`) and ``T_h`` selects (0/1) head ``h``'s
parameters ``(Q_h, K_{g(h)}, V_{g(h)}, O_h)`` from the flat vector. Every block between parameters of different
heads is therefore pure outer product ``2c J_aᵀ J_b``; a parameter shared by a group (GQA ``K_g, V_g``) sums the
blocks of the heads that use it (tying is linear: ``H_tied = Tᵀ H_untied T``).

Parameter order (:meth:`MultiHeadAttentionLayer.param_blocks`): **type-major**, ``h0.Q, …, h{H-1}.Q, kv0.K, …,
kv0.V, …, h0.O, …`` — the ``vec_r`` order of the stacked tensors ``W_Q (H, d, k)``, ``W_K``, ``W_V``, ``W_O``
concatenated; with one head it is the single-head order ``(Q, K, V, O)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from energy._validation import EnergyInputError, check_positive_int, check_same_float_dtype, check_tensor
from energy.hessian.attention_layer import (
    AttentionLayer,
    Reduction,
    check_dense_budget,
    loss_constant,
)
from energy.hessian.blocks import Part, _check_part, attention_hessian, hessian_block
from energy.hessian.moments import AttentionMoments, attention_jacobians, gradient_moments

__all__ = [
    "MultiHeadAttentionLayer",
    "multihead_jacobian",
    "multihead_functional_hessian",
    "multihead_hessian",
    "multihead_hessian_block",
    "head_moments",
]

#: Local (single-head) parameter names, the order of :meth:`AttentionLayer.weights`.
_LOCAL = ("Q", "K", "V", "O")


@dataclass(frozen=True)
class MultiHeadAttentionLayer:
    r"""Multi-head (optionally grouped-query) self-attention with its square loss (MATH §5.1), validated once.

    Attributes:
        W_Q: ``(H, d, k)``, one query map per head.
        W_K: ``(H_kv, d, k)``; W_V: ``(H_kv, d, d_v)``: one key/value map per group; ``H_kv`` divides ``H`` and
            query head ``h`` uses group ``h // (H / H_kv)``.
        W_O: ``(H, d_v, d_out)``: the rows of the output projection that act on head ``h``.
        scale: ``κ`` (default ``1/√k``).
        mask: boolean ``(L, L)`` or ``(B, L, L)``, ``True`` = attend, shared by the heads; causal: causal mask.
        linear: linear attention (MATH §3.6) in every head.
        c: loss constant (default ``1/(L d_out)``); reduction: ``"sum"`` or ``"mean"`` over sequences.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        >>> layer = MultiHeadAttentionLayer(r(4, 6, 2), r(2, 6, 2), r(2, 6, 3), r(4, 3, 6), causal=True)
        >>> layer.output(r(2, 5, 6)).shape, [name for name, _ in layer.param_blocks()][:5]
        (torch.Size([2, 5, 6]), ['h0.Q', 'h1.Q', 'h2.Q', 'h3.Q', 'kv0.K'])
    """

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    scale: float | None = None
    mask: Tensor | None = None
    causal: bool = False
    linear: bool = False
    c: float | None = None
    reduction: Reduction = "sum"

    def __post_init__(self) -> None:
        W_Q = check_tensor(self.W_Q, "W_Q", ndim=3, finite=False)
        W_K = check_tensor(self.W_K, "W_K", ndim=3, finite=False)
        W_V = check_tensor(self.W_V, "W_V", ndim=3, finite=False)
        W_O = check_tensor(self.W_O, "W_O", ndim=3, finite=False)
        H, d, k = W_Q.shape
        H_kv = W_K.shape[0]
        if H == 0 or H_kv == 0:
            raise EnergyInputError(f"`W_Q` and `W_K` need at least one head, got shapes {tuple(W_Q.shape)} and "
                                   f"{tuple(W_K.shape)}.")
        if W_K.shape[1:] != (d, k):
            raise EnergyInputError(f"`W_K` must have shape (H_kv, d, k) = (H_kv, {d}, {k}) (d, k those of `W_Q`), "
                                   f"got {tuple(W_K.shape)}.")
        if H % H_kv:
            raise EnergyInputError(f"`W_K` has {H_kv} key/value heads, which must divide the {H} query heads of "
                                   "`W_Q` (grouped-query attention); use as many K/V heads as query heads, or a "
                                   "divisor.")
        if W_V.shape[:2] != (H_kv, d):
            raise EnergyInputError(f"`W_V` must have shape (H_kv, d, d_v) = ({H_kv}, {d}, d_v) (the key/value heads "
                                   f"of `W_K`), got {tuple(W_V.shape)}.")
        if W_O.shape[:2] != (H, W_V.shape[2]):
            raise EnergyInputError(f"`W_O` must have shape (H, d_v, d_out) = ({H}, {W_V.shape[2]}, d_out) (one "
                                   f"block of rows per query head, d_v = the columns of `W_V`), got "
                                   f"{tuple(W_O.shape)}.")
        check_same_float_dtype(W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O)
        self.heads()  # the per-head value objects check the weights' values, scale, mask, c and reduction

    # -- sizes and heads ---------------------------------------------------------------------------------------
    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.W_K.shape[0]

    @property
    def group_size(self) -> int:
        """Query heads per key/value group."""
        return self.n_heads // self.n_kv_heads

    @property
    def d(self) -> int:
        """Input (model) width."""
        return self.W_Q.shape[1]

    @property
    def d_k(self) -> int:
        return self.W_Q.shape[2]

    @property
    def d_v(self) -> int:
        return self.W_V.shape[2]

    @property
    def d_out(self) -> int:
        return self.W_O.shape[2]

    def group(self, h: int) -> int:
        """The key/value group ``h // (H / H_kv)`` of query head ``h``."""
        return h // self.group_size

    @cached_property
    def _heads(self) -> tuple[AttentionLayer, ...]:
        return tuple(
            AttentionLayer(self.W_Q[h], self.W_K[self.group(h)], self.W_V[self.group(h)], self.W_O[h], self.scale,
                           self.mask, self.causal, self.linear, self.c, self.reduction)
            for h in range(self.n_heads)
        )

    def heads(self) -> tuple[AttentionLayer, ...]:
        """The query heads as single-head :class:`~energy.hessian.attention_layer.AttentionLayer` objects
        (``W_Q^h, W_K^{g(h)}, W_V^{g(h)}, W_O^h`` and the shared options).
        """
        return self._heads

    # -- parameter bookkeeping ----------------------------------------------------------------------------------
    def param_blocks(self) -> tuple[tuple[str, tuple[int, int]], ...]:
        """``((name, shape), …)`` in flat order (type-major): ``h{h}.Q`` for every head, ``kv{g}.K`` and then
        ``kv{g}.V`` for every group, ``h{h}.O`` for every head.
        """
        H, G = range(self.n_heads), range(self.n_kv_heads)
        return (tuple((f"h{h}.Q", (self.d, self.d_k)) for h in H) + tuple((f"kv{g}.K", (self.d, self.d_k)) for g in G)
                + tuple((f"kv{g}.V", (self.d, self.d_v)) for g in G)
                + tuple((f"h{h}.O", (self.d_v, self.d_out)) for h in H))

    def head_params(self, h: int) -> tuple[str, str, str, str]:
        """The global names of head ``h``'s local parameters ``(Q, K, V, O)``."""
        g = self.group(h)
        return (f"h{h}.Q", f"kv{g}.K", f"kv{g}.V", f"h{h}.O")

    def users(self, name: str) -> tuple[int, ...]:
        """The query heads that use parameter ``name`` (one head, or a whole group for ``kv{g}.K/V``)."""
        idx = int(check_param_name(self, name, "name").split(".")[0].lstrip("hkv"))
        if name.startswith("kv"):
            return tuple(range(idx * self.group_size, (idx + 1) * self.group_size))
        return (idx,)

    def spans(self) -> dict[str, slice]:
        """The slice of every parameter block in the flat vector."""
        out, start = {}, 0
        for name, (r, s) in self.param_blocks():
            out[name], start = slice(start, start + r * s), start + r * s
        return out

    @property
    def n_params(self) -> int:
        return sum(r * s for _, (r, s) in self.param_blocks())

    def flat(self) -> Tensor:
        """``θ = [vec_r W_Q; vec_r W_K; vec_r W_V; vec_r W_O]`` (the order of :meth:`param_blocks`)."""
        return torch.cat([W.reshape(-1) for W in (self.W_Q, self.W_K, self.W_V, self.W_O)])

    def with_flat(self, theta: Tensor) -> MultiHeadAttentionLayer:
        """The same layer with the weights of the flat vector ``theta`` (inverse of :meth:`flat`)."""
        Ws = (self.W_Q, self.W_K, self.W_V, self.W_O)
        parts = theta.split([W.numel() for W in Ws])
        W_Q, W_K, W_V, W_O = (t.reshape(W.shape) for t, W in zip(parts, Ws))
        return dataclasses.replace(self, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O)

    @classmethod
    def from_fused(cls, W_qkv: Tensor, W_proj: Tensor, n_heads: int, **options: object) -> MultiHeadAttentionLayer:
        """The layer of GPT-2's fused ``Conv1D`` weights (``y = x W + b``; biases are not part of this layer).

        ``W_qkv`` ``(d, 3e)`` is ``c_attn.weight`` with columns ``[Q | K | V]``, head ``h`` the columns
        ``h·e/H : (h+1)·e/H`` of each; ``W_proj`` ``(e, d_out)`` is ``c_proj.weight``, head ``h`` its rows of the
        same range. ``options`` are the other fields (``scale``, ``mask``, ``causal``, ``c``, ``reduction``).
        """
        W_qkv = check_tensor(W_qkv, "W_qkv", ndim=2, finite=False)
        W_proj = check_tensor(W_proj, "W_proj", ndim=2, finite=False)
        H = check_positive_int(n_heads, "n_heads", what="(number of heads)")
        d, width = W_qkv.shape
        if width % 3:
            raise EnergyInputError(f"`W_qkv` must have 3·e columns ([Q | K | V]), got {width}.")
        e = width // 3
        if e % H:
            raise EnergyInputError(f"`n_heads` = {H} must divide the fused width e = {e} of `W_qkv` (3e = {width} "
                                   "columns); pass the model's number of heads.")
        if W_proj.shape[0] != e:
            raise EnergyInputError(f"`W_proj` must have e = {e} rows (the width of each of Q, K, V in `W_qkv`), "
                                   f"got {tuple(W_proj.shape)}.")
        dh = e // H
        Q, K, V = (W_qkv[:, i * e:(i + 1) * e].reshape(d, H, dh).transpose(0, 1).contiguous() for i in range(3))
        W_O = W_proj.reshape(H, dh, W_proj.shape[1])
        return cls(Q, K, V, W_O, **options)  # type: ignore[arg-type]  # values checked in __post_init__

    # -- inputs and the pure maps ---------------------------------------------------------------------------------
    def check_inputs(self, X: object, Y: object | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Check ``X`` ``(L, d)`` or ``(B, L, d)`` (and ``Y`` ``(…, L, d_out)``) against the layer; returns
        ``(X3, Y3, mask)`` batched, the mask ``(B, L, L)`` resolved (``None`` without mask).
        """
        X = check_tensor(X, "X", finite=False)
        if X.ndim not in (2, 3) or X.shape[-1] != self.d:
            raise EnergyInputError(f"`X` must have shape (L, d) or (B, L, d) with d = {self.d} (the rows of `W_Q`), "
                                   f"got {tuple(X.shape)}.")
        return self.heads()[0].check_inputs(X, Y)

    def output(self, X: Tensor, mask: Tensor | None = None) -> Tensor:
        r"""``F = Σ_h A_h X W_V^{g(h)} W_O^h`` (pure). ``mask`` overrides the layer's (already resolved)."""
        outs = [head.output(X, mask) for head in self.heads()]
        return torch.stack(outs).sum(0)

    def loss_constant(self, X: Tensor) -> float:
        """``c_eff`` (:func:`~energy.hessian.attention_layer.loss_constant` with the output width ``d_out``)."""
        return loss_constant(X, self.c, self.reduction, self.d_out)

    def loss(self, X: Tensor, Y: Tensor, mask: Tensor | None = None) -> Tensor:
        r"""``ℓ = c_eff Σ_b ‖F_b − Y_b‖²_F`` (pure)."""
        return self.loss_constant(X) * ((self.output(X, mask) - Y) ** 2).sum()


# ----------------------------------------------------------------------------------------------------------------
# pure closed forms (inputs as returned by MultiHeadAttentionLayer.check_inputs)
# ----------------------------------------------------------------------------------------------------------------


def head_moments(layer: MultiHeadAttentionLayer, X3: Tensor, G3: Tensor, mask: Tensor | None) -> list[AttentionMoments]:
    """Per-head moments with the whole layer's upstream gradient ``G3`` (pure; ``c`` = the layer's ``c_eff``)."""
    c = layer.loss_constant(X3)
    return [gradient_moments(head, X3, G3, mask, c=c) for head in layer.heads()]


def _columns(layer: MultiHeadAttentionLayer, jacs: list[dict[str, Tensor]], name: str) -> Tensor:
    """``J_a = Σ_{h uses a} J^{(h)}_a``, the Jacobian columns of parameter ``name``."""
    local = name.split(".")[1]
    return torch.stack([jacs[h][local] for h in layer.users(name)]).sum(0)


def multihead_jacobian(layer: MultiHeadAttentionLayer, X3: Tensor, mask: Tensor | None) -> Tensor:
    r"""``J = ∂ vec_r F / ∂θ``, ``(B L d_out, p)``, from the single-head Jacobians (MATH §3.3, §5.1); pure.

    .. math:: J_a = \textstyle\sum_{h\,\text{uses}\,a} J^{(h)}_a

    (a shared GQA ``K_g``/``V_g`` adds the Jacobians of its heads). Cost ``O(B L d_out p)``.
    """
    G0 = X3.new_zeros(*X3.shape[:-1], layer.d_out)  # the Jacobians do not depend on G
    jacs = [attention_jacobians(m) for m in head_moments(layer, X3, G0, mask)]
    return torch.cat([_columns(layer, jacs, name) for name, _ in layer.param_blocks()], dim=1)


def _head_index(layer: MultiHeadAttentionLayer, h: int, device: torch.device) -> Tensor:
    """Global flat indices of head ``h``'s local parameters ``(Q, K, V, O)`` (the columns of ``T_h``)."""
    spans = layer.spans()
    return torch.cat([torch.arange(spans[n].start, spans[n].stop, device=device) for n in layer.head_params(h)])


def multihead_functional_hessian(layer: MultiHeadAttentionLayer, X3: Tensor, G3: Tensor, mask: Tensor | None) -> Tensor:
    r"""``H_f = Σ_{blm} G_{blm} ∇²_θ F_{blm}`` for an upstream gradient ``G = ∂ℓ/∂F`` (MATH §5.1), ``(p, p)``; pure.

    .. math:: H_f = \textstyle\sum_h T_h^\top H_f^{(h)}(G)\, T_h

    Per head the single-head closed form (:func:`energy.hessian.blocks.attention_hessian`, part ``"H_f"``) with the
    whole layer's ``G``; blocks between different heads are zero, and a GQA-shared ``K_g``/``V_g`` sums its heads'
    blocks (the scatter-add of ``T_h``). Cost ``O(H N d² k²)`` plus the ``p²`` result.
    """
    p = layer.n_params
    out = G3.new_zeros(p, p)
    for h, mom in enumerate(head_moments(layer, X3, G3, mask)):
        idx = _head_index(layer, h, X3.device)
        out = out.index_put((idx[:, None], idx[None, :]), attention_hessian(mom, "H_f", max_gib=math.inf),
                            accumulate=True)
    return out


def _gradient(layer: MultiHeadAttentionLayer, X3: Tensor, Y3: Tensor, mask: Tensor | None) -> Tensor:
    """``G = 2 c_eff (F − Y)``."""
    return 2.0 * layer.loss_constant(X3) * (layer.output(X3, mask) - Y3)


def multihead_hessian(
    layer: MultiHeadAttentionLayer, X: Tensor, Y: Tensor, part: Part = "H", *, max_gib: float | None = None
) -> Tensor:
    r"""The dense ``part`` of the loss Hessian in the flat order of :meth:`MultiHeadAttentionLayer.param_blocks`.

    .. math:: H_o = 2c\,J^\top J,\qquad H_f = \textstyle\sum_h T_h^\top H_f^{(h)}(G) T_h,\qquad H = H_o + H_f

    (:func:`multihead_jacobian`, :func:`multihead_functional_hessian`; cross-head blocks come from ``J`` alone).
    Cost ``O(N d_out p² + H N d² k²)``, memory ``p²`` (bounded by ``max_gib``, default 4 GiB).

    Args:
        layer: the multi-head layer.
        X: ``(L, d)`` or ``(B, L, d)`` inputs.
        Y: targets of ``F``, ``X``'s shape with width ``d_out``.
        part: ``"H"``, ``"H_o"`` (Gauss–Newton) or ``"H_f"`` (functional part).
        max_gib: memory budget of the dense result.
    """
    _check_part(part)
    X3, Y3, mask = layer.check_inputs(X, Y)
    assert Y3 is not None
    p = layer.n_params
    check_dense_budget(p, p, X3.dtype, max_gib, f"the dense {part} of the multi-head layer")
    out = X3.new_zeros(p, p)
    if part in ("H", "H_o"):
        J = multihead_jacobian(layer, X3, mask)
        out = out + 2.0 * layer.loss_constant(X3) * (J.T @ J)
    if part in ("H", "H_f"):
        out = out + multihead_functional_hessian(layer, X3, _gradient(layer, X3, Y3, mask), mask)
    return out


def check_param_name(layer: MultiHeadAttentionLayer, name: object, arg: str) -> str:
    """``name`` if it is one of ``layer.param_blocks()``'s names, else :class:`EnergyInputError` naming ``arg``."""
    names = [n for n, _ in layer.param_blocks()]
    if name not in names:
        raise EnergyInputError(f"`{arg}` must be a parameter name of the layer ({', '.join(names)}), got {name!r}.")
    return str(name)


def multihead_hessian_block(
    layer: MultiHeadAttentionLayer, X: Tensor, Y: Tensor, a: str, b: str, part: Part = "H",
    *, max_gib: float | None = None,
) -> Tensor:
    r"""One dense block ``part(a, b)``, ``a, b`` names of :meth:`MultiHeadAttentionLayer.param_blocks`.

    .. math::
        H_o(a, b) = 2c\,J_a^\top J_b,\quad J_a = \textstyle\sum_{h\,\text{uses}\,a} J^{(h)}_a,\qquad
        H_f(a, b) = \textstyle\sum_{h\,\text{uses}\,a\,\text{and}\,b} H_f^{(h)}(a_h, b_h)

    (zero across heads). Cost ``O(N d_out p_a p_b)`` plus the single-head blocks of the shared heads.
    """
    _check_part(part)
    a = check_param_name(layer, a, "a")
    b = check_param_name(layer, b, "b")
    X3, Y3, mask = layer.check_inputs(X, Y)
    assert Y3 is not None
    sizes = {n: r * s for n, (r, s) in layer.param_blocks()}
    check_dense_budget(sizes[a], sizes[b], X3.dtype, max_gib, f"the dense block {part}({a}, {b})")
    moms = head_moments(layer, X3, _gradient(layer, X3, Y3, mask), mask)
    out = X3.new_zeros(sizes[a], sizes[b])
    if part in ("H", "H_o"):
        jacs = [attention_jacobians(m) for m in moms]
        out = out + 2.0 * layer.loss_constant(X3) * (_columns(layer, jacs, a).T @ _columns(layer, jacs, b))
    if part in ("H", "H_f"):
        for h in sorted(set(layer.users(a)) & set(layer.users(b))):
            local = {n: loc for n, loc in zip(layer.head_params(h), _LOCAL)}
            out = out + hessian_block(moms[h], local[a], local[b], "H_f", max_gib=math.inf)
    return out
