r"""The second-order chain rule through a Transformer block: forward Jacobian sweep, backward adjoints (MATH §5.3).

Pure tensor algebra on the closed-form derivatives of the sublayers (see :mod:`energy.hessian.block` for the
equations). The sweep runs over ``P`` columns, either the block's flat parameter vector (``mode="params"``: the
contributions are summed over sequences) or the ``L d`` entries of one sequence's input (``mode="tokens"``: one
``(L d) × (L d)`` Hessian per sequence).

Layouts: a total Jacobian ``𝒯_v`` is ``(B, L, w, P)`` (token ``i`` of sequence ``b``, feature ``m``, column); the
token-wise sublayers give per-token ``(B, L, w_out, w_in)`` Jacobians, the attention input Jacobian is dense per
sequence, ``(B, L w_out, L w_in)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import Tensor

from energy.hessian.attention_input import head_input_hessian, head_input_jacobian, head_input_param_hessian
from energy.hessian.blocks import Part
from energy.hessian.ffn_curvature import ffn_derivatives
from energy.hessian.multihead import MultiHeadAttentionLayer, multihead_functional_hessian, multihead_jacobian
from energy.hessian.norm_curvature import norm_derivatives
from energy.hessian.tokenwise import TokenwiseDerivatives

if TYPE_CHECKING:
    from energy.hessian.block import TransformerBlock

__all__ = ["Mode", "sweep"]

Mode = Literal["params", "tokens"]

#: The operations of each block topology: (kind, sublayer, input(s), output), in forward order.
_OPS: dict[str, list[tuple[str, str, tuple[str, ...], str]]] = {
    "pre": [("norm", "ln1", ("X",), "U1"), ("mha", "attention", ("U1",), "A"), ("add", "", ("X", "A"), "Z"),
            ("norm", "ln2", ("Z",), "U2"), ("ffn", "ffn", ("U2",), "F"), ("add", "", ("Z", "F"), "Out")],
    "post": [("mha", "attention", ("X",), "A"), ("add", "", ("X", "A"), "S1"), ("norm", "ln1", ("S1",), "Z"),
             ("ffn", "ffn", ("Z",), "F"), ("add", "", ("Z", "F"), "S2"), ("norm", "ln2", ("S2",), "Out")],
    "none": [("mha", "attention", ("X",), "A"), ("add", "", ("X", "A"), "Z"), ("ffn", "ffn", ("Z",), "F"),
             ("add", "", ("Z", "F"), "Out")],
}

_PREFIX = {"attention": "attn", "ln1": "ln1", "ln2": "ln2", "ffn": "ffn"}


@dataclass(frozen=True)
class _Jac:
    """A total Jacobian that is zero outside the columns ``lo : lo + n``: ``T`` ``(B, L, w, n)``."""

    T: Tensor
    lo: int

    @property
    def hi(self) -> int:
        return self.lo + self.T.shape[-1]

    def widen(self, lo: int, hi: int) -> _Jac:
        """The same Jacobian over the columns ``min(lo, self.lo) : max(hi, self.hi)`` (zeros padded)."""
        lo, hi = min(lo, self.lo), max(hi, self.hi)
        if (lo, hi) == (self.lo, self.hi):
            return self
        pads = [self.T.new_zeros(*self.T.shape[:-1], n) for n in (self.lo - lo, hi - self.hi)]
        return _Jac(torch.cat([pads[0], self.T, pads[1]], dim=-1), lo)  # out of place: a new, traced tensor


def _apply(J: Tensor, jac: _Jac | None, dense: bool) -> _Jac | None:
    """``J 𝒯``: token-wise ``J`` ``(B, L, w_out, w_in)`` or, ``dense``, per sequence ``(B, L w_out, L w_in)``."""
    if jac is None:
        return None
    if not dense:
        return _Jac(J @ jac.T, jac.lo)
    B, L, w, n = jac.T.shape
    return _Jac((J @ jac.T.reshape(B, L * w, n)).reshape(B, L, -1, n), jac.lo)


def _add(a: _Jac | None, b: _Jac | None) -> _Jac | None:
    """``𝒯_a + 𝒯_b`` over the union of their columns."""
    if a is None or b is None:
        return b if a is None else a
    a, b = a.widen(b.lo, b.hi), b.widen(a.lo, a.hi)
    return _Jac(a.T + b.T, a.lo)


def _inject(jac: _Jac | None, cols: slice, J: Tensor) -> _Jac:
    """``𝒯 + J E``: the local parameter Jacobian ``J`` ``(B, L, w, n)`` added into the columns ``cols``.

    Out of place (one copy of ``𝒯``): in-place writes into column views are what ``linearize``'s traced graph got
    wrong.
    """
    if jac is None:
        return _Jac(J, cols.start)
    jac = jac.widen(cols.start, cols.stop)
    a, b = cols.start - jac.lo, cols.stop - jac.lo
    return _Jac(torch.cat([jac.T[..., :a], jac.T[..., a:b] + J, jac.T[..., b:]], dim=-1), jac.lo)


#: Column chunk of the symmetric products (:meth:`_Accumulator.quad`): wide enough for efficient GEMMs.
_CHUNK = 1024


class _Accumulator:
    """The Hessian being summed: ``(P, P)`` (params, summed over sequences) or ``(B, P, P)`` (tokens)."""

    def __init__(self, mode: Mode, B: int, P: int, like: Tensor) -> None:
        self.mode = mode
        shape = (P, P) if mode == "params" else (B, P, P)
        # Zeros that depend on `like` in the traced graph: linearize's constant folding would otherwise turn the
        # buffer into a constant that the in-place accumulation below changes from one call to the next.
        self.H = (0.0 * like.sum()).expand(shape).contiguous()  # one pass over the P² buffer

    def _flat(self, T: Tensor) -> Tensor:
        """``(B·n, P)`` (params) or ``(B, n, P)`` (tokens) view of a ``(B, ..., P)`` Jacobian."""
        P = T.shape[-1]
        return T.reshape(-1, P) if self.mode == "params" else T.reshape(T.shape[0], -1, P)

    def quad(self, jac: _Jac | None, MT: Tensor) -> None:
        """``H += Σ 𝒯ᵀ (M 𝒯)`` on the columns of ``𝒯``, given ``M𝒯`` in the layout of ``𝒯`` (``M`` symmetric).

        The result is symmetric, so only the column-chunk pairs ``i ≤ j`` are multiplied (GEMMs of at least
        ``_CHUNK`` columns) and mirrored: about half the flops of one full GEMM when ``𝒯`` is wide.
        """
        if jac is None:
            return
        T, MT = self._flat(jac.T), self._flat(MT)
        n = T.shape[-1]
        k = max(1, min(8, n // _CHUNK))
        edges = [jac.lo + (n * i) // k for i in range(k + 1)]
        for i in range(k):
            rows = slice(edges[i], edges[i + 1])
            Ti = T[..., rows.start - jac.lo:rows.stop - jac.lo].transpose(-1, -2)
            for j in range(i, k):
                cols = slice(edges[j], edges[j + 1])
                Hij = Ti @ MT[..., cols.start - jac.lo:cols.stop - jac.lo]
                self.H[..., rows, cols] += Hij
                if j > i:
                    self.H[..., cols, rows] += Hij.transpose(-1, -2)

    def cross(self, jac: _Jac | None, M: Tensor, cols: slice) -> None:
        """``H[𝒯's columns, cols] += Σ 𝒯ᵀ M`` and its transpose (params mode), ``M`` of layout ``(B, ..., n)``."""
        if jac is not None:
            self.add_cross(jac, self._flat(jac.T).transpose(-1, -2) @ M.reshape(-1, M.shape[-1]), cols)

    def add_cross(self, jac: _Jac, C: Tensor, cols: slice) -> None:
        """``H[𝒯's columns, cols] += C`` and its transpose."""
        self.H[jac.lo:jac.hi, cols] += C
        self.H[cols, jac.lo:jac.hi] += C.T

    def block(self, rows: slice, cols: slice, value: Tensor) -> None:
        """``H[rows, cols] += value`` (and the transposed block when it lies off the diagonal)."""
        self.H[rows, cols] += value
        if rows != cols:
            self.H[cols, rows] += value.T


def _attention_columns(layer: MultiHeadAttentionLayer, slices: dict[str, slice]) -> slice:
    """The contiguous columns of the attention parameters in the block's flat vector."""
    names = [name for name, _ in layer.param_blocks()]
    return slice(slices["attn." + names[0]].start, slices["attn." + names[-1]].stop)


def _attention_jacobian_input(layer: MultiHeadAttentionLayer, U: Tensor, mask: Tensor | None) -> Tensor:
    """``∂ vec_r MHA(U) / ∂ vec_r U`` per sequence: the sum of the heads' input Jacobians."""
    heads = layer.heads()
    out = head_input_jacobian(heads[0], U, mask)
    for head in heads[1:]:
        out = out + head_input_jacobian(head, U, mask)
    return out


def _attention_input_hessian(layer: MultiHeadAttentionLayer, U: Tensor, mask: Tensor | None, G: Tensor) -> Tensor:
    """``∇²_U ⟨G, MHA(U)⟩`` per sequence: the sum of the heads' input Hessians."""
    heads = layer.heads()
    out = head_input_hessian(heads[0], U, mask, G)
    for head in heads[1:]:
        out = out + head_input_hessian(head, U, mask, G)
    return out


def _attention_input_param_blocks(layer: MultiHeadAttentionLayer, U: Tensor, mask: Tensor | None, G: Tensor) -> Tensor:
    """``∂²⟨G, MHA(U)⟩/∂U ∂θ_attn`` as ``(B, L d, p_attn)`` in the layer's parameter order (GQA: tied K/V add)."""
    group = layer.W_Q.shape[0] // layer.W_K.shape[0]
    blocks: dict[str, Tensor] = {}
    for h, head in enumerate(layer.heads()):
        names = {"Q": f"h{h}.Q", "K": f"kv{h // group}.K", "V": f"kv{h // group}.V", "O": f"h{h}.O"}
        for key, value in head_input_param_hessian(head, U, mask, G).items():
            name = names[key]
            blocks[name] = blocks[name] + value if name in blocks else value
    return torch.cat([blocks[name] for name, _ in layer.param_blocks()], dim=-1)  # out of place (linearize)


def sweep(block: TransformerBlock, X3: Tensor, target: Tensor, mask: Tensor | None, c_eff: float, mode: Mode,
          part: Part | Literal["parts"]) -> Tensor:
    r"""``∇²ℓ`` (its ``part``) w.r.t. the parameters (``(p, p)``) or each sequence's tokens (``(B, L d, L d)``).

    ``part="parts"`` returns ``H_o`` and ``H_f`` of one sweep stacked along a new first dimension.

    ``block`` is a :class:`~energy.hessian.block.TransformerBlock`, ``X3`` ``(B, L, d)``, ``target`` as checked by
    its ``check_inputs``, ``mask`` the resolved attention mask. Equations: :mod:`energy.hessian.block`.
    """
    B, L, d = X3.shape
    use_o, use_f = part in ("H", "H_o", "parts"), part in ("H", "H_f", "parts")
    slices = {name: sl for name, sl in block.slices().items()}
    P = block.num_params if mode == "params" else L * d
    # ---- forward: values, local derivatives, total Jacobians -------------------------------------------------
    vals: dict[str, Tensor] = {"X": X3}
    T: dict[str, _Jac | None] = {"X": None}  # params: the input does not depend on θ
    if mode == "tokens":
        T["X"] = _Jac(torch.eye(P, dtype=X3.dtype, device=X3.device).reshape(L, d, P).expand(B, L, d, P), 0)
    local: dict[str, Tensor | TokenwiseDerivatives] = {}
    ops = _OPS[block.norm]
    for kind, sub, inputs, out in ops:
        if kind == "add":
            vals[out] = vals[inputs[0]] + vals[inputs[1]]
            T[out] = _add(T[inputs[0]], T[inputs[1]])
            continue
        u = vals[inputs[0]]
        if kind == "mha":
            layer = block.attention
            vals[out] = layer.output(u, mask)
            J_U = _attention_jacobian_input(layer, u, mask)
            T[out] = _apply(J_U, T[inputs[0]], dense=True)
            if mode == "params":
                T[out] = _inject(T[out], _attention_columns(layer, slices),
                                 multihead_jacobian(layer, u, mask).reshape(B, L, d, -1))
            local[out] = J_U
        else:
            der = norm_derivatives(getattr(block, sub), u) if kind == "norm" else ffn_derivatives(block.ffn, u)
            vals[out] = der.output
            T[out] = _apply(der.J_x, T[inputs[0]], dense=False)
            if mode == "params":
                for name, J in der.J_params.items():
                    T[out] = _inject(T[out], slices[f"{_PREFIX[sub]}.{name}"], J)
            local[out] = der
    out_val, T_out = vals["Out"], T["Out"]
    assert T_out is not None  # every block has parameters upstream of its output (tokens: the identity)
    if block.W_U is not None:
        z = out_val @ block.W_U
        T_z: _Jac = _Jac(block.W_U.T @ T_out.T, T_out.lo)
        if mode == "params":
            V = block.W_U.shape[1]
            eye_v = torch.eye(V, dtype=X3.dtype, device=X3.device)
            T_z = _inject(T_z, slices["W_U"], torch.einsum("bla,vw->blvaw", out_val, eye_v).reshape(B, L, V, d * V))
    else:
        z, T_z = out_val, T_out
    # ---- the outer-product part: 𝒯_zᵀ ∇²ℓ_out 𝒯_z -------------------------------------------------------------
    if block.loss == "mse":
        g_z = 2.0 * c_eff * (z - target)
    else:
        prob = torch.softmax(z, dim=-1)
        onehot = (target.unsqueeze(-1) == torch.arange(z.shape[-1], device=z.device)).to(z.dtype)  # no value reads
        g_z = c_eff * (prob - onehot)
    # The result buffers are allocated from g_z, which depends on every input, so that under vmap they are batched
    # like everything written into them.
    acc = acc_o = _Accumulator(mode, B, P, g_z)  # H_o goes to acc_o, H_f to acc (the same unless part="parts")
    if part == "parts":
        acc = _Accumulator(mode, B, P, g_z)
    if block.loss == "mse":
        if use_o:
            acc_o.quad(T_z, (2.0 * c_eff) * T_z.T)
    else:
        if use_o:  # ∇²_z = c (diag p − p pᵀ) per token
            MT = c_eff * (prob.unsqueeze(-1) * T_z.T - prob.unsqueeze(-1) * (prob.unsqueeze(-2) @ T_z.T))
            acc_o.quad(T_z, MT)
    # ---- backward: adjoints and the functional part ---------------------------------------------------------------
    g: dict[str, Tensor] = {"Out": g_z if block.W_U is None else g_z @ block.W_U.T}
    if block.W_U is not None and use_f and mode == "params":  # ∂²⟨g_z, Out W_U⟩/∂Out ∂W_U = I ⊗ g_z
        acc.add_cross(T_out, torch.einsum("blap,blv->pav", T_out.T, g_z).reshape(T_out.T.shape[-1], -1),
                      slices["W_U"])
    for kind, sub, inputs, out in reversed(ops):
        g_out = g[out]
        if kind == "add":
            for name in inputs:
                g[name] = g[name] + g_out if name in g else g_out
            continue
        u_name = inputs[0]
        u, T_u = vals[u_name], T[u_name]
        if kind == "mha":
            layer = block.attention
            J_U = cast(Tensor, local[out])
            g_u = (g_out.reshape(B, 1, L * d) @ J_U).reshape(B, L, d)
            if use_f:
                UU = _attention_input_hessian(layer, u, mask, g_out)
                if T_u is not None:
                    acc.quad(T_u, (UU @ T_u.T.reshape(B, L * d, -1)).reshape(T_u.T.shape))
                if mode == "params":
                    cols = _attention_columns(layer, slices)
                    acc.cross(T_u, _attention_input_param_blocks(layer, u, mask, g_out), cols)
                    acc.block(cols, cols, multihead_functional_hessian(layer, u, g_out, mask))
        else:
            der = cast(TokenwiseDerivatives, local[out])
            g_u = torch.einsum("bloi,blo->bli", der.J_x, g_out)
            if use_f:
                s = der.second(g_out)
                if T_u is not None:
                    acc.quad(T_u, s.xx @ T_u.T)
                if mode == "params":
                    prefix = _PREFIX[sub]
                    for name, M in s.x_params.items():
                        acc.cross(T_u, M, slices[f"{prefix}.{name}"])
                    for (a, b), value in s.params.items():
                        acc.block(slices[f"{prefix}.{a}"], slices[f"{prefix}.{b}"], value)
        g[u_name] = g[u_name] + g_u if u_name in g else g_u
    return torch.stack([acc_o.H, acc.H]) if part == "parts" else acc.H
