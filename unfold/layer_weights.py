r"""Right-acting weights of a standard multi-head self-attention layer, and ``nn.MultiheadAttention`` ↔ weights.

A layer computes, head by head, :math:`\mathrm{softmax}(\kappa\, Y W_Q^h W_K^{h\top} Y^\top)\, Y W_V^h W_O^h`
(weights act on the right, MATH §0); it depends on its weights only through the products
:math:`S_h = W_Q^h W_K^{h\top}` and :math:`V_h = W_V^h W_O^h` (:meth:`AttentionWeights.qk_products`,
:meth:`AttentionWeights.vo_products`), which :mod:`unfold.converters` checks against the constraints of MATH §1.7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from energy._validation import EnergyInputError, check_tensor

__all__ = ["AttentionWeights", "from_mha", "to_mha"]


@dataclass
class AttentionWeights:
    """Right-acting weights of a multi-head self-attention layer (MATH §0): ``Q = Y W_Q``, ``out = heads · W_O``.

    Shapes: ``W_Q, W_K, W_V`` ``(d, h·d_head)``, ``W_O`` ``(h·d_head, d)``; biases optional (``None`` = absent).
    """

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    num_heads: int
    b_Q: Tensor | None = None
    b_K: Tensor | None = None
    b_V: Tensor | None = None
    b_O: Tensor | None = None
    extras: list[str] = field(default_factory=list)  # features of the layer that no energy step has
    scale: float | None = None  # the logits' scale κ (None: 1/√d_head, the nn.MultiheadAttention convention)

    def __post_init__(self) -> None:
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            check_tensor(getattr(self, name), name, ndim=2)
        d, hd = self.W_Q.shape
        if self.W_K.shape != (d, hd) or self.W_V.shape != (d, hd) or self.W_O.shape != (hd, d):
            raise EnergyInputError(
                f"self-attention weights must be W_Q, W_K, W_V of shape (d, h·d_head) and W_O of shape (h·d_head, d);"
                f" got W_Q {tuple(self.W_Q.shape)}, W_K {tuple(self.W_K.shape)}, W_V {tuple(self.W_V.shape)}, "
                f"W_O {tuple(self.W_O.shape)}."
            )
        if not isinstance(self.num_heads, int) or self.num_heads <= 0 or hd % self.num_heads:
            raise EnergyInputError(f"`num_heads` = {self.num_heads!r} must be a positive divisor of h·d_head = {hd}.")

    @property
    def d(self) -> int:
        return self.W_Q.shape[0]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[1] // self.num_heads

    @property
    def kappa(self) -> float:
        """The scale ``κ`` of the logits ``κ Y W_Q^h W_K^{hᵀ} Yᵀ`` (default ``1/√d_head``)."""
        return 1.0 / math.sqrt(self.d_head) if self.scale is None else float(self.scale)

    def heads(self, name: str) -> Tensor:
        """Per-head blocks: ``W_Q/W_K/W_V`` → ``(h, d, d_head)``, ``W_O`` → ``(h, d_head, d)``."""
        W = getattr(self, name)
        h, dh = self.num_heads, self.d_head
        if name == "W_O":
            return W.reshape(h, dh, W.shape[1])
        return W.reshape(W.shape[0], h, dh).permute(1, 0, 2)

    @classmethod
    def of(cls, layer: Any) -> AttentionWeights:
        """The weights of ``nn.MultiheadAttention``, an :class:`AttentionWeights` or a dict of reference weights."""
        if isinstance(layer, AttentionWeights):
            return layer
        if isinstance(layer, nn.MultiheadAttention):
            return from_mha(layer)
        if isinstance(layer, dict):
            try:
                return cls(**layer)
            except TypeError as exc:
                raise EnergyInputError(f"reference weights dict: {exc}; expected keys W_Q, W_K, W_V, W_O, num_heads "
                                       "(and optional b_Q, b_K, b_V, b_O).") from None
        hint = ""
        inner = getattr(layer, "self_attn", None)
        if isinstance(inner, nn.MultiheadAttention):
            hint = f"; pass its attention sublayer `layer.self_attn` instead (the {type(layer).__name__} itself " \
                   "also holds feed-forward and normalisation weights)"
        raise EnergyInputError(
            f"`layer` must be an nn.MultiheadAttention, an AttentionWeights or a dict of reference weights, "
            f"got {type(layer).__name__}{hint}."
        )

    def qk_products(self) -> Tensor:
        """``S_h = W_Q^h W_K^{hᵀ}``, ``(h, d, d)``."""
        return self.heads("W_Q") @ self.heads("W_K").transpose(-1, -2)

    def vo_products(self) -> Tensor:
        """``V_h = W_V^h W_O^h``, ``(h, d, d)``."""
        return self.heads("W_V") @ self.heads("W_O")


def from_mha(layer: nn.MultiheadAttention) -> AttentionWeights:
    """Right-acting weights of ``nn.MultiheadAttention`` (``W_Q = in_proj_weight[:d].T`` etc.)."""
    if not isinstance(layer, nn.MultiheadAttention):
        raise EnergyInputError(f"`layer` must be an nn.MultiheadAttention, got {type(layer).__name__}.")
    extras = []
    if layer.bias_k is not None or layer.bias_v is not None:
        extras.append("bias_k/bias_v (add_bias_kv=True) add an extra key/value slot")
    if layer.add_zero_attn:
        extras.append("add_zero_attn=True adds a zero key/value slot")
    if not layer._qkv_same_embed_dim:
        raise EnergyInputError(
            "`layer` has kdim/vdim ≠ embed_dim (cross-attention projections); an energy step is self-attention on "
            "tokens of one width. Use kdim = vdim = embed_dim."
        )
    W_Q, W_K, W_V = (w.detach().T for w in layer.in_proj_weight.chunk(3))
    b = layer.in_proj_bias
    b_Q, b_K, b_V = (None, None, None) if b is None else (x.detach() for x in b.chunk(3))
    b_O = None if layer.out_proj.bias is None else layer.out_proj.bias.detach()
    return AttentionWeights(W_Q, W_K, W_V, layer.out_proj.weight.detach().T, layer.num_heads, b_Q, b_K, b_V, b_O,
                            extras)


def to_mha(weights: AttentionWeights, *, batch_first: bool = True) -> nn.MultiheadAttention:
    """An ``nn.MultiheadAttention`` with exactly these weights (biases only if present)."""
    d, hd = weights.W_Q.shape
    if hd != d:
        raise EnergyInputError(
            f"nn.MultiheadAttention needs h·d_head = embed_dim, got h·d_head = {hd}, d = {d}; pad the head width."
        )
    has_bias = any(b is not None for b in (weights.b_Q, weights.b_K, weights.b_V, weights.b_O))
    layer = nn.MultiheadAttention(d, weights.num_heads, bias=has_bias, batch_first=batch_first,
                                  dtype=weights.W_Q.dtype, device=weights.W_Q.device)
    with torch.no_grad():
        layer.in_proj_weight.copy_(torch.cat([weights.W_Q.T, weights.W_K.T, weights.W_V.T], dim=0))
        layer.out_proj.weight.copy_(weights.W_O.T)
        if has_bias:
            zeros = torch.zeros(d, dtype=weights.W_Q.dtype, device=weights.W_Q.device)
            layer.in_proj_bias.copy_(torch.cat([b if b is not None else zeros
                                                for b in (weights.b_Q, weights.b_K, weights.b_V)]))
            layer.out_proj.bias.copy_(weights.b_O if weights.b_O is not None else zeros)
    return layer
