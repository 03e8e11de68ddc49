r"""The single-head attention layer of MATH §3.1 as one frozen value object, its forward map and its loss.

.. math::
    T = \kappa X W_Q W_K^\top X^\top,\quad A = \mathrm{softmax}(T)\ \text{(or } A = T \odot m \text{, linear)},\quad
    F = A X W_V\,[W_O],\quad \ell = c_\mathrm{eff} \textstyle\sum_b \|F_b - Y_b\|_F^2 .

:class:`AttentionLayer` carries what the closed forms, their autograd twins and the structured norms used to take
as eleven keywords (weights, ``scale``, ``mask`` / ``causal``, ``linear``, ``c``, ``reduction``). The weights are
validated once, when the layer is built; ``X`` and ``Y`` are checked (metadata, and finiteness where the values
can be read) at the public entry points. The formulas themselves (:meth:`AttentionLayer.output`,
:meth:`AttentionLayer.loss`) are pure: every ``torch.func`` transform passes through them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypedDict

import torch
from torch import Tensor

from energy._validation import (
    DenseSizeError,
    EnergyInputError,
    check_finite,
    check_same_device,
    check_same_float_dtype,
    check_tensor,
    value_holds,
)
from energy.core import attention as core_attention
from energy.core import standard as core_standard

__all__ = [
    "AttentionLayer",
    "LayerOptions",
    "Reduction",
    "check_dense_budget",
    "linear_attention",
    "loss_constant",
    "DEFAULT_MAX_GIB",
]

Reduction = Literal["sum", "mean"]

_GIB = 1024**3
#: Default memory budget (GiB) of a dense closed-form result.
DEFAULT_MAX_GIB = 4.0


class LayerOptions(TypedDict, total=False):
    """The keyword options of the legacy function signatures (``attention_moments(X, W_Q, W_K, W_V, Y, **options)``):
    the fields of :class:`AttentionLayer` besides the three weights.
    """

    W_O: Tensor | None
    c: float | None
    reduction: Reduction
    scale: float | None
    mask: Tensor | None
    causal: bool
    linear: bool


def check_dense_budget(rows: int, cols: int, dtype: torch.dtype, max_gib: float | None, what: str) -> None:
    """Raise :class:`DenseSizeError` if a dense ``rows × cols`` matrix would exceed ``max_gib`` GiB.

    Args:
        rows: number of rows of the requested matrix.
        cols: number of columns of the requested matrix.
        dtype: its dtype.
        max_gib: budget in GiB (``None`` = :data:`DEFAULT_MAX_GIB`; ``float('inf')`` disables the guard).
        what: name of the requested object for the message.
    """
    budget = DEFAULT_MAX_GIB if max_gib is None else max_gib
    size = rows * cols * dtype.itemsize / _GIB
    if size > budget:
        raise DenseSizeError(
            f"{what} would be a dense {rows} × {cols} matrix of {size:.2f} GiB, above the budget of {budget:g} GiB "
            "(`max_gib`). Use the exact structured norms/traces/diagonals of energy.hessian.structure, or the "
            "matrix-free operators of energy.hessian.operators; raise `max_gib` only if the memory is there."
        )


def _present(**tensors: Tensor | None) -> dict[str, Tensor]:
    """The given tensors without the ``None`` ones (optional arguments), for :func:`check_same_float_dtype`."""
    return {k: t for k, t in tensors.items() if t is not None}


def _check_array(x: object, name: str, ndim: int | None = None) -> Tensor:
    """Metadata checks, then :func:`energy._validation.check_finite` (skipped, by design, when a tracing
    transform makes the values unreadable).
    """
    return check_finite(check_tensor(x, name, ndim=ndim, finite=False), name)


def linear_attention(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, *, scale: float | None = None, mask: Tensor | None = None
) -> Tensor:
    r"""Linear (softmax-free) self-attention, MATH §3.6 (the core's weights, one head).

    .. math:: F = \big(\kappa\, X W_Q W_K^\top X^\top \odot m\big)\, X W_V,\qquad \kappa = 1/\sqrt{d_K}

    ``mask`` is boolean (``True`` = attend); ``m`` is its 0/1 version (no mask: all ones).
    """
    return attention_matrix(X, W_Q, W_K, _kappa(scale, W_Q.shape[-1]), mask, linear=True) @ (X @ W_V)


def attention_matrix(
    X: Tensor, W_Q: Tensor, W_K: Tensor, kappa: float, mask: Tensor | None, *, linear: bool
) -> Tensor:
    r"""``A``: ``softmax(κ X W_Q W_Kᵀ Xᵀ)`` (masked) or, linear, ``κ X W_Q W_Kᵀ Xᵀ ⊙ m`` (MATH §3.1, §3.6), from
    the pure core (:func:`energy.core.standard.attention_weights` / :func:`~energy.core.standard.
    linear_attention_weights`).
    """
    Q, K = X @ W_Q, X @ W_K
    if linear:
        return core_standard.linear_attention_weights(Q, K, kappa, mask=mask)
    return core_standard.attention_weights(Q, K, kappa, mask=mask)


def _kappa(scale: float | None, d_k: int) -> float:
    """``κ``: :func:`energy.core.attention.kappa` (``scale`` or ``1/√d_K``, MATH §3.1)."""
    return float(core_attention.kappa(scale, d_k))


def loss_constant(X: Tensor, c: float | None, reduction: Reduction, d_out: int | None = None) -> float:
    r"""The effective constant ``c_eff`` with ``ℓ = c_eff Σ_b ‖F_b − Y_b‖²``.

    ``c`` defaults to ``1/(L d_out)`` (per-sequence mean squared error, the paper's likely choice, MATH §3.1;
    ``d_out = d_v``, the value width, or ``d_O`` with an output projection); ``reduction="mean"`` divides by the
    number of sequences ``B``.
    """
    if reduction not in ("sum", "mean"):
        raise EnergyInputError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}.")
    L = X.shape[-2]
    d_out = X.shape[-1] if d_out is None else d_out
    c0 = 1.0 / (L * d_out) if c is None else float(c)
    if not math.isfinite(c0) or c0 <= 0:
        raise EnergyInputError(f"`c` must be a positive finite number, got {c!r}.")
    n_seq = X.shape[0] if X.ndim == 3 else 1
    return c0 / n_seq if reduction == "mean" else c0


@dataclass(frozen=True)
class AttentionLayer:
    r"""One single-head self-attention layer with its square loss (MATH §3.1), validated once at construction.

    Attributes:
        W_Q, W_K: ``(d_V, d_K)``; W_V: ``(d_V, d_v)`` (``d_v``, the value width, may differ from ``d_V``).
        W_O: optional output projection ``(d_v, d_O)``.
        scale: ``κ`` (default ``1/√d_K``).
        mask: boolean ``(L, L)`` or ``(B, L, L)``, ``True`` = attend; causal: use the causal mask instead.
        linear: linear attention (no softmax, MATH §3.6).
        c: loss constant (default ``1/(L d_out)``); reduction: ``"sum"`` or ``"mean"`` over sequences.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> W = [torch.randn(3, k, generator=g, dtype=torch.float64) for k in (2, 2, 3)]
        >>> layer = AttentionLayer(*W, causal=True)
        >>> X, Y = torch.randn(2, 4, 3, dtype=torch.float64), torch.zeros(2, 4, 3, dtype=torch.float64)
        >>> layer.output(X).shape
        torch.Size([2, 4, 3])
    """

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor | None = None
    scale: float | None = None
    mask: Tensor | None = None
    causal: bool = False
    linear: bool = False
    c: float | None = None
    reduction: Reduction = "sum"

    def __post_init__(self) -> None:
        W_Q = _check_array(self.W_Q, "W_Q", ndim=2)
        W_K = _check_array(self.W_K, "W_K", ndim=2)
        W_V = _check_array(self.W_V, "W_V", ndim=2)
        d_V = W_Q.shape[0]
        if W_K.shape != W_Q.shape:
            raise EnergyInputError(f"`W_K` must have the shape of `W_Q` {tuple(W_Q.shape)}, got {tuple(W_K.shape)}.")
        if W_V.shape[0] != d_V:
            raise EnergyInputError(
                f"`W_V` must have shape (d_V, d_v) = ({d_V}, d_v) (the rows of `W_Q`), got {tuple(W_V.shape)}."
            )
        if self.W_O is not None:
            W_O = _check_array(self.W_O, "W_O", ndim=2)
            if W_O.shape[0] != W_V.shape[1]:
                raise EnergyInputError(f"`W_O` must have shape (d_v, d_O) = ({W_V.shape[1]}, d_O) (d_v = the columns "
                                       f"of `W_V`), got {tuple(W_O.shape)}.")
        check_same_float_dtype(**_present(W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=self.W_O))
        if self.reduction not in ("sum", "mean"):
            raise EnergyInputError(f"`reduction` must be 'sum' or 'mean', got {self.reduction!r}.")
        if self.c is not None and not (math.isfinite(float(self.c)) and float(self.c) > 0):
            raise EnergyInputError(f"`c` must be a positive finite number, got {self.c!r}.")
        if self.scale is not None and (isinstance(self.scale, (bool, str)) or not math.isfinite(float(self.scale))
                                       or float(self.scale) <= 0):
            raise EnergyInputError(
                f"`scale` must be a finite real number > 0 (κ, the score scale) or None (= 1/√d_K), got {self.scale!r}."
            )
        if self.mask is not None:
            if self.causal:
                raise EnergyInputError("pass either `mask` or `causal=True`, not both.")
            if not isinstance(self.mask, Tensor) or self.mask.dtype != torch.bool:
                raise EnergyInputError(
                    "`mask` must be a boolean tensor (True = attend), e.g. torch.ones(L, L, dtype=torch.bool).tril()."
                )
            if not value_holds(self.mask.any(-1).all()):
                raise EnergyInputError("every query row of `mask` must attend to at least one key.")

    # -- derived sizes -------------------------------------------------------------------------------------------
    @property
    def d_V(self) -> int:
        return self.W_Q.shape[0]

    @property
    def d_K(self) -> int:
        return self.W_Q.shape[1]

    @property
    def d_v(self) -> int:
        """Value width: the columns of ``W_V``."""
        return self.W_V.shape[1]

    @property
    def d_out(self) -> int:
        """Output width: ``d_O`` with an output projection, else ``d_v``."""
        return self.d_v if self.W_O is None else self.W_O.shape[1]

    @property
    def kappa(self) -> float:
        return _kappa(self.scale, self.d_K)

    @property
    def weights(self) -> tuple[Tensor, ...]:
        """``(W_Q, W_K, W_V[, W_O])``, the order of the assembled Hessian."""
        return (self.W_Q, self.W_K, self.W_V) if self.W_O is None else (self.W_Q, self.W_K, self.W_V, self.W_O)

    def with_weights(self, *weights: Tensor) -> AttentionLayer:
        """The same layer with other weights ``(W_Q, W_K, W_V[, W_O])`` (for the autograd twins)."""
        W_O = weights[3] if len(weights) > 3 else None
        return AttentionLayer(weights[0], weights[1], weights[2], W_O, self.scale, self.mask, self.causal,
                              self.linear, self.c, self.reduction)

    @classmethod
    def from_weights(cls, W_Q: Tensor, W_K: Tensor, W_V: Tensor, **options: object) -> AttentionLayer:
        """The layer of the legacy keyword signature ``(W_Q, W_K, W_V, W_O=..., c=..., ..., linear=...)``."""
        unknown = set(options) - set(LayerOptions.__annotations__)
        if unknown:
            raise EnergyInputError(f"unknown attention-layer options {sorted(unknown)}; the options are "
                                   f"{sorted(LayerOptions.__annotations__)}.")
        return cls(W_Q, W_K, W_V, **options)  # type: ignore[arg-type]  # checked names; values in __post_init__

    # -- inputs ----------------------------------------------------------------------------------------------------
    def check_inputs(self, X: object, Y: object | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Check ``X`` (and ``Y``) against the layer: ``X`` as ``(B, L, d_V)``, ``Y`` likewise, and the mask
        ``(B, L, L)`` (``None`` without mask).
        """
        X = _check_array(X, "X")
        if X.ndim not in (2, 3):
            raise EnergyInputError(f"`X` must have shape (L, d_V) or (B, L, d_V), got {tuple(X.shape)}.")
        L, d_V = X.shape[-2], X.shape[-1]
        if X.numel() == 0:
            raise EnergyInputError(
                f"`X` must contain at least one sequence of at least one token, got shape {tuple(X.shape)}."
            )
        if d_V != self.d_V:
            raise EnergyInputError(f"`W_Q` must have shape (d_V, d_K) = ({d_V}, d_K), got {tuple(self.W_Q.shape)}.")
        Yt = None
        if Y is not None:
            Yt = _check_array(Y, "Y")
            if Yt.shape != (*X.shape[:-1], self.d_out):
                raise EnergyInputError(f"`Y` (the target of F) must have shape {(*X.shape[:-1], self.d_out)} (X's "
                                       f"with the output width), got {tuple(Yt.shape)}.")
        check_same_float_dtype(**_present(X=X, W_Q=self.W_Q, Y=Yt))
        check_same_device(**_present(X=X, W_Q=self.W_Q, Y=Yt))
        X3 = X if X.ndim == 3 else X.unsqueeze(0)
        Y3 = None if Yt is None else (Yt if Yt.ndim == 3 else Yt.unsqueeze(0))
        mask = self.mask
        if self.causal:
            mask = torch.ones(L, L, dtype=torch.bool, device=X.device).tril()
        if mask is not None:
            if mask.shape[-2:] != (L, L) or mask.ndim not in (2, 3) or (mask.ndim == 3 and X.ndim == 2):
                raise EnergyInputError(
                    f"`mask` must have shape (L, L) or (B, L, L) with L = {L}, got {tuple(mask.shape)}."
                )
            if mask.ndim == 3 and mask.shape[0] != X3.shape[0]:
                raise EnergyInputError(f"`mask` has {mask.shape[0]} sequences but `X` has {X3.shape[0]}.")
            mask = mask.expand(X3.shape[0], L, L)
        return X3, Y3, mask

    # -- the pure maps -----------------------------------------------------------------------------------------
    def output(self, X: Tensor, mask: Tensor | None = None) -> Tensor:
        """``F = A X W_V [W_O]`` (MATH §3.1) with ``A`` of :func:`attention_matrix`. ``mask`` overrides the
        layer's (already resolved, e.g. by :meth:`check_inputs`).
        """
        if mask is None:
            mask = self.mask
            if self.causal:
                mask = torch.ones(X.shape[-2], X.shape[-2], dtype=torch.bool, device=X.device).tril()
        F = attention_matrix(X, self.W_Q, self.W_K, self.kappa, mask, linear=self.linear) @ (X @ self.W_V)
        return F if self.W_O is None else F @ self.W_O

    def loss_constant(self, X: Tensor) -> float:
        """``c_eff`` of :func:`loss_constant` for inputs ``X``."""
        return loss_constant(X, self.c, self.reduction, self.d_out)

    def loss(self, X: Tensor, Y: Tensor, mask: Tensor | None = None) -> Tensor:
        r"""The loss ``ℓ = c_eff Σ_b ‖F_b − Y_b‖²_F`` (MATH §3.1)."""
        return self.loss_constant(X) * ((self.output(X, mask) - Y) ** 2).sum()
