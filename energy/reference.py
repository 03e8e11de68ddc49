"""Reference (standard) Transformer maths as plain functions.

These are the layers the energies are compared with. They are written with ``einsum`` and an explicit
softmax, so every ``torch.func`` transform (including forward-mode AD and ``vmap``) works through them; tests compare
them with ``torch.nn.MultiheadAttention``, ``scaled_dot_product_attention``, ``torch.nn.LayerNorm`` and
``torch.nn.RMSNorm``.

Conventions (MATH §0): tokens are rows, ``X ∈ R^{... × n × d}``; weights act on the right, ``Q = X W_Q``.
Multi-head weights are stored head-major along their output axis, like ``nn.MultiheadAttention``: columns
``[h·d_k, (h+1)·d_k)`` of ``W_Q`` belong to head ``h``.

Every function validates its arguments once (shapes, dtypes, NaN/inf) and then evaluates the pure core
(:mod:`energy.core.standard`, :mod:`energy.core.ffn`, :mod:`energy.core.norm`), where each formula is written once.
The NaN/inf check reads values through :func:`energy._validation.value_holds`, so it runs under ``grad``, ``vjp``,
``jvp`` and ``hessian`` and is skipped, by design, where a tracing transform (``vmap``, ``linearize``) makes the
values unreadable; shape and dtype checks always run.
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor
from typing_extensions import Unpack

from energy._validation import (
    EnergyInputError,
    check_options,
    check_result,
    check_same_float_dtype,
    check_scale,
    check_tensor,
    value_holds,
)
from energy.core import ffn as core_ffn
from energy.core import norm as core_norm
from energy.core import standard as core
from energy.core.attention import kappa as resolve_kappa

__all__ = [
    "attention_weights",
    "single_head_attention",
    "multi_head_attention",
    "linear_attention",
    "causal_mask",
    "feed_forward",
    "layer_norm",
    "rms_norm",
]


# ----------------------------------------------------------------------------------------------- validation helpers


def _finite(out: Tensor, function: str, **inputs: Tensor) -> Tensor:
    """The result check of the public reference functions (:func:`energy._validation.check_result`)."""
    check_result(out, f"`{function}(…)`", inputs,
                 hint="A query whose keys are all masked also gives NaN: keep at least one key per query.")
    return out


def _check_optional(x: object | None, name: str, **kwargs: Any) -> Tensor | None:
    return None if x is None else check_tensor(x, name, **kwargs)


def _check_mask(mask: object, name: str, target: tuple[int, ...]) -> Tensor:
    """A boolean (``True`` = attend) or additive float mask broadcastable to ``target``."""
    if not isinstance(mask, Tensor):
        raise EnergyInputError(f"`{name}` must be a torch.Tensor (bool: True = attend, or additive float), "
                               f"got {type(mask).__name__}.")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise EnergyInputError(
            f"`{name}` must be a bool tensor (True = attend) or an additive float tensor (-inf = blocked), "
            f"got dtype {mask.dtype}; convert an integer 0/1 mask with `{name}.bool()`."
        )
    try:
        fits = torch.broadcast_shapes(mask.shape, target) == torch.Size(target)
    except RuntimeError:
        fits = False
    if not fits:
        raise EnergyInputError(
            f"`{name}` of shape {tuple(mask.shape)} does not broadcast to the attention scores of shape {target} "
            "(..., n_q, n_k); a key-padding mask of shape (B, n_k) must be passed as `mask=~padding[:, None, :]`."
        )
    if mask.is_floating_point() and not value_holds(~((mask == float("inf")).any() | mask.isnan().any())):
        raise EnergyInputError(f"`{name}` contains +inf or NaN; an additive mask may only contain finite values "
                               "and -inf (blocked).")
    return mask


class AttentionOptions(TypedDict, total=False):
    """The keyword options of :func:`multi_head_attention` and :func:`linear_attention` (all optional)."""

    b_Q: Tensor | None
    b_K: Tensor | None
    b_V: Tensor | None
    b_O: Tensor | None
    scale: float | Tensor | None
    mask: Tensor | None
    causal: bool


# ------------------------------------------------------------------------------------------------------- attention


def attention_weights(
    Q: Tensor,
    K: Tensor,
    *,
    scale: float | None = None,
    mask: Tensor | None = None,
    key_bias: Tensor | None = None,
) -> Tensor:
    r"""Row-softmax attention weights.

    .. math::
        A_{ij} = \frac{\exp(\kappa\, q_i^\top k_j + \beta_j + m_{ij})}
                      {\sum_l \exp(\kappa\, q_i^\top k_l + \beta_l + m_{il})}

    Args:
        Q: queries ``(..., n_q, d_k)``.
        K: keys ``(..., n_k, d_k)``.
        scale: ``κ``; ``None`` means the standard ``1/√d_k``.
        mask: additive mask broadcastable to ``(..., n_q, n_k)`` (``-inf`` = blocked) or a boolean mask
            where ``True`` means *attend* (the ``scaled_dot_product_attention`` convention). A row with every
            entry blocked has no softmax and gives NaN (as in torch).
        key_bias: ``β`` of shape ``(..., n_k)``, added to every row (MATH §1.1).
    """
    check_tensor(Q, "Q", min_ndim=2)
    check_tensor(K, "K", min_ndim=2, trailing=(None, Q.shape[-1]))
    _check_optional(key_bias, "key_bias", min_ndim=1, trailing=(K.shape[-2],))
    check_same_float_dtype(Q=Q, K=K, key_bias=key_bias)
    kappa = resolve_kappa(check_scale(scale), Q.shape[-1])
    if mask is not None:
        batch = torch.broadcast_shapes(Q.shape[:-2], K.shape[:-2])
        _check_mask(mask, "mask", (*batch, Q.shape[-2], K.shape[-2]))
    return core.attention_weights(Q, K, kappa, mask=mask, key_bias=key_bias)


def single_head_attention(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, *, scale: float | None = None, mask: Tensor | None = None
) -> Tensor:
    r"""Single-head self-attention without output projection (MATH §3.1).

    .. math:: F = \mathrm{softmax}(\kappa\, X W_Q W_K^\top X^\top)\, X W_V,\qquad \kappa = 1/\sqrt{d_K}
    """
    check_tensor(X, "X", min_ndim=2)
    d = X.shape[-1]
    check_tensor(W_Q, "W_Q", ndim=2, trailing=(d, None))
    check_tensor(W_K, "W_K", ndim=2, trailing=(d, W_Q.shape[-1]))
    check_tensor(W_V, "W_V", ndim=2, trailing=(d, None))
    check_same_float_dtype(X=X, W_Q=W_Q, W_K=W_K, W_V=W_V)
    A = attention_weights(X @ W_Q, X @ W_K, scale=scale, mask=mask)
    return _finite(A @ (X @ W_V), "single_head_attention", X=X)


def _check_projections(
    x_q: Tensor,
    x_kv: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    W_O: Tensor | None,
    num_heads: int,
    b_Q: Tensor | None,
    b_K: Tensor | None,
    b_V: Tensor | None,
    b_O: Tensor | None,
) -> None:
    """Shape/dtype checks shared by :func:`multi_head_attention` and :func:`linear_attention`."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise EnergyInputError(f"`num_heads` must be a positive int, got {num_heads!r}.")
    check_tensor(x_q, "x_q", min_ndim=2)
    check_tensor(x_kv, "x_kv", min_ndim=2)
    try:
        torch.broadcast_shapes(x_q.shape[:-2], x_kv.shape[:-2])
    except RuntimeError:
        raise EnergyInputError(
            f"the batch dimensions of `x_q` {tuple(x_q.shape[:-2])} and `x_kv` {tuple(x_kv.shape[:-2])} "
            "do not broadcast."
        ) from None
    for x_name, x, w_name, W in (("x_q", x_q, "W_Q", W_Q), ("x_kv", x_kv, "W_K", W_K), ("x_kv", x_kv, "W_V", W_V)):
        if isinstance(W, Tensor) and W.ndim == 2 and W.shape[0] != x.shape[-1]:
            raise EnergyInputError(
                f"`{x_name}` has width {x.shape[-1]} (last dimension, shape {tuple(x.shape)}) but `{w_name}` has "
                f"{W.shape[0]} rows; `{x_name}` must be (..., n, {W.shape[0]}) to match `{w_name}` (weights act on "
                "the right)."
            )
    check_tensor(W_Q, "W_Q", ndim=2, trailing=(x_q.shape[-1], None))
    check_tensor(W_K, "W_K", ndim=2, trailing=(x_kv.shape[-1], W_Q.shape[1]))
    check_tensor(W_V, "W_V", ndim=2, trailing=(x_kv.shape[-1], None))
    for name, W in (("W_Q", W_Q), ("W_V", W_V)):
        if W.shape[1] % num_heads:
            raise EnergyInputError(
                f"`{name}` has {W.shape[1]} output columns, not divisible by num_heads={num_heads}; its width "
                "must be num_heads · (per-head width)."
            )
    _check_optional(W_O, "W_O", ndim=2, trailing=(W_V.shape[1], None))
    _check_optional(b_Q, "b_Q", ndim=1, trailing=(W_Q.shape[1],))
    _check_optional(b_K, "b_K", ndim=1, trailing=(W_K.shape[1],))
    _check_optional(b_V, "b_V", ndim=1, trailing=(W_V.shape[1],))
    if b_O is not None:
        if W_O is None:
            raise EnergyInputError("`b_O` was given without `W_O`; pass an output projection or drop the bias.")
        check_tensor(b_O, "b_O", ndim=1, trailing=(W_O.shape[1],))
    check_same_float_dtype(x_q=x_q, x_kv=x_kv, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, b_Q=b_Q, b_K=b_K, b_V=b_V,
                           b_O=b_O)


def _check_scores_mask(mask: object, causal: object, x_q: Tensor, x_kv: Tensor, *, linear: bool = False) -> None:
    """Check a user mask (shared by all heads) against the scores ``(..., n_q, n_k)`` and the ``causal`` flag."""
    if not isinstance(causal, bool):
        raise EnergyInputError(f"`causal` must be a bool, got {causal!r}.")
    if linear and isinstance(mask, Tensor) and mask.dtype != torch.bool:
        raise EnergyInputError(
            f"`mask` must be boolean (True = keep) for linear attention, got dtype {mask.dtype}; an additive "
            "mask only makes sense inside a softmax."
        )
    if mask is not None:
        batch = torch.broadcast_shapes(x_q.shape[:-2], x_kv.shape[:-2])
        _check_mask(mask, "mask", (*batch, x_q.shape[-2], x_kv.shape[-2]))


def multi_head_attention(x_q: Tensor, x_kv: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor | None = None,
                         *, num_heads: int, **options: Unpack[AttentionOptions]) -> Tensor:
    r"""Multi-head (cross- or self-) attention, einsum form.

    With ``Q = x_q W_Q + 1 b_Qᵀ``, ``K = x_kv W_K + 1 b_Kᵀ``, ``V = x_kv W_V + 1 b_Vᵀ`` split head-major into
    ``Q_h ∈ R^{n_q×d_k}``, ``K_h ∈ R^{n_k×d_k}``, ``V_h ∈ R^{n_k×d_v}``:

    .. math::
        \mathrm{MHA} = \big[\mathrm{softmax}(\kappa Q_1 K_1^\top + m)\,V_1 \;\big|\; \dots \;\big|\;
                       \mathrm{softmax}(\kappa Q_H K_H^\top + m)\,V_H\big]\, W_O + 1 b_O^\top ,
        \qquad \kappa = 1/\sqrt{d_k}\ \text{by default.}

    Self-attention is ``multi_head_attention(X, X, ...)``. ``nn.MultiheadAttention(batch_first=True)`` maps to it by
    ``W_Q, W_K, W_V = in_proj_weight.chunk(3)`` transposed, ``W_O = out_proj.weight.T`` (tests check this).

    Args:
        x_q: query tokens ``(..., n_q, d_q)``.
        x_kv: key/value tokens ``(..., n_k, d_kv)``; batch dimensions broadcast with ``x_q``'s.
        W_Q: ``(d_q, H·d_k)``.
        W_K: ``(d_kv, H·d_k)``.
        W_V: ``(d_kv, H·d_v)`` (``d_v ≠ d_k`` is allowed).
        W_O: ``(H·d_v, d_out)`` or ``None`` (then the concatenated heads are returned).
        num_heads: ``H``; must divide the widths of ``W_Q`` and ``W_V``.
        b_Q, b_K, b_V, b_O: optional biases of the matching widths.
        scale: ``κ``; ``None`` means ``1/√d_k`` with the per-head width ``d_k``.
        mask: bool (``True`` = attend) or additive float mask broadcastable to ``(..., n_q, n_k)``, shared by all
            heads. A key-padding mask ``pad (B, n_k)`` (``True`` = padding) is ``mask=~pad[:, None, :]``.
        causal: also apply :func:`causal_mask` (top-left aligned, like ``is_causal=True``).

    Returns:
        ``(..., n_q, d_out)`` (or ``(..., n_q, H·d_v)`` without ``W_O``).
    """
    return _attention(x_q, x_kv, W_Q, W_K, W_V, W_O, num_heads, options, linear=False)


def linear_attention(x_q: Tensor, x_kv: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor | None = None, *,
                     num_heads: int = 1, **options: Unpack[AttentionOptions]) -> Tensor:
    r"""Linear attention (no softmax), the variant of MATH §3.6, same arguments as :func:`multi_head_attention`.

    .. math:: A_h = \kappa\, Q_h K_h^\top \odot m ,\qquad F = [A_1 V_1 | \dots | A_H V_H]\, W_O + 1 b_O^\top

    ``mask`` must be boolean here (``True`` = keep, blocked scores are set to 0): an additive ``-inf`` mask has no
    meaning without the exponential.
    """
    return _attention(x_q, x_kv, W_Q, W_K, W_V, W_O, num_heads, options, linear=True)


def _attention(x_q: Tensor, x_kv: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor | None, num_heads: int,
               options: AttentionOptions, *, linear: bool) -> Tensor:
    """Validate once (shapes, dtypes, masks, κ), then the core's multi-head attention (softmax or linear)."""
    check_options(options, AttentionOptions.__annotations__, "linear_attention" if linear else "multi_head_attention")
    b_Q, b_K, b_V, b_O = options.get("b_Q"), options.get("b_K"), options.get("b_V"), options.get("b_O")
    mask, causal = options.get("mask"), options.get("causal", False)
    _check_projections(x_q, x_kv, W_Q, W_K, W_V, W_O, num_heads, b_Q, b_K, b_V, b_O)
    _check_scores_mask(mask, causal, x_q, x_kv, linear=linear)
    out = core.multi_head_attention(x_q, x_kv, W_Q, W_K, W_V, W_O, num_heads=num_heads, b_Q=b_Q, b_K=b_K, b_V=b_V,
                                    b_O=b_O, scale=check_scale(options.get("scale")), mask=mask, causal=causal,
                                    linear=linear)
    return _finite(out, "linear_attention" if linear else "multi_head_attention", x_q=x_q, x_kv=x_kv)


# ------------------------------------------------------------------------------------------- feed-forward and norms

def feed_forward(
    X: Tensor,
    W_1: Tensor,
    b_1: Tensor | None,
    W_2: Tensor,
    b_2: Tensor | None,
    activation: Literal["relu", "gelu", "gelu_tanh"] | None = "relu",
) -> Tensor:
    r"""Two-matrix feed-forward block (weights act on the right).

    .. math:: \mathrm{FFN}(X) = \sigma(X W_1 + 1 b_1^\top)\, W_2 + 1 b_2^\top

    Args:
        X: ``(..., n, d)``.
        W_1: ``(d, m)``.
        b_1: ``(m,)`` or ``None`` (no bias).
        W_2: ``(m, d_out)``.
        b_2: ``(d_out,)`` or ``None`` (no bias).
        activation: ``"relu"``, ``"gelu"`` (exact, erf form, as ``nn.GELU()``), ``"gelu_tanh"`` (GPT-2's tanh
            approximation) or ``None`` (linear).
    """
    if activation not in core_ffn.ACTIVATIONS:
        raise EnergyInputError(f"`activation` must be 'relu', 'gelu', 'gelu_tanh' or None, got {activation!r}.")
    check_tensor(X, "X", min_ndim=2)
    check_tensor(W_1, "W_1", ndim=2, trailing=(X.shape[-1], None))
    _check_optional(b_1, "b_1", ndim=1, trailing=(W_1.shape[1],))
    check_tensor(W_2, "W_2", ndim=2, trailing=(W_1.shape[1], None))
    _check_optional(b_2, "b_2", ndim=1, trailing=(W_2.shape[1],))
    check_same_float_dtype(X=X, W_1=W_1, b_1=b_1, W_2=W_2, b_2=b_2)
    return _finite(core_ffn.feed_forward(X, W_1, b_1, W_2, b_2, activation), "feed_forward", X=X)


def _check_norm_args(X: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float | None) -> None:
    check_tensor(X, "X", min_ndim=1)
    _check_optional(weight, "weight", ndim=1, trailing=(X.shape[-1],))
    _check_optional(bias, "bias", ndim=1, trailing=(X.shape[-1],))
    check_same_float_dtype(X=X, weight=weight, bias=bias)
    if eps is not None and (not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0):
        raise EnergyInputError(f"`eps` must be a finite number ≥ 0, got {eps!r}.")


def layer_norm(X: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    r"""LayerNorm over the last dimension, as ``nn.LayerNorm(d, eps)``.

    .. math:: \mathrm{LN}(x) = \gamma \odot \frac{x - \bar x\,1}{\sqrt{\tfrac1d \|x - \bar x 1\|^2 + \varepsilon}} + b

    With ``eps = 0`` and no affine part this is the projection onto the centred sphere of radius ``√d``
    (:func:`energy.normalization.layernorm_projection`, MATH §1.4).
    """
    _check_norm_args(X, weight, bias, eps)
    return core_norm.layer_norm(X, weight, bias, eps)


def rms_norm(X: Tensor, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    r"""RMSNorm over the last dimension, as ``nn.RMSNorm(d, eps)``.

    .. math:: \mathrm{RMS}(x) = \gamma \odot \frac{x}{\sqrt{\tfrac1d \|x\|^2 + \varepsilon}}

    ``eps = None`` uses ``torch.finfo(X.dtype).eps``, the ``nn.RMSNorm`` default. With ``eps = 0`` and no weight
    this is the projection onto the sphere of radius ``√d`` (MATH §1.4).
    """
    _check_norm_args(X, weight, None, eps)
    return core_norm.rms_norm(X, weight, eps)


def causal_mask(n_q: int, n_k: int | None = None, *, device: torch.device | None = None) -> Tensor:
    r"""Boolean causal mask :math:`m_{ij} = [j \le i]` (``True`` = attend) of shape ``(n_q, n_k)``, top-left aligned
    like ``scaled_dot_product_attention(is_causal=True)``; ``n_k`` defaults to ``n_q``.
    """
    for name, value in (("n_q", n_q), ("n_k", n_k)):
        if value is None and name == "n_k":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EnergyInputError(f"`{name}` must be an int ≥ 0 (a number of tokens), got {value!r}.")
    return core.causal_mask(n_q, n_k, device=device)
