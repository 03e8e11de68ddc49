r"""Autograd twins of the attention-layer closed forms: ``torch.func`` derivatives of the loss and of ``F``
(MATH §3.1), the independent check of :func:`~energy.hessian.attention.attention_hessian` and its parts.

.. math::
    H = \nabla^2_\theta\, \ell(\theta),\qquad H_o = 2 c_\mathrm{eff}\, J^\top J,\quad J = \partial\,
    \mathrm{vec}_r F / \partial\theta,\qquad \theta = [\mathrm{vec}_r W_Q; \mathrm{vec}_r W_K; \mathrm{vec}_r W_V
    [; \mathrm{vec}_r W_O]].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from typing_extensions import Unpack

from energy._validation import warn_if_not_float64
from energy.hessian.attention_layer import AttentionLayer, LayerOptions
from energy.hessian.moments import as_layer
from energy.hessian.multihead import MultiHeadAttentionLayer

__all__ = [
    "autograd_attention_hessian",
    "autograd_attention_ggn",
    "attention_loss",
    "attention_output",
    "autograd_multihead_hessian",
    "autograd_multihead_ggn",
]


def attention_output(X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, **options: Unpack[LayerOptions]) -> Tensor:
    """``F``: :func:`energy.reference.single_head_attention` (softmax) or linear attention, times ``W_O``
    (:meth:`AttentionLayer.output`; the options are the fields of :class:`AttentionLayer`).
    """
    layer = AttentionLayer.from_weights(W_Q, W_K, W_V, **options)
    layer.check_inputs(X)
    return layer.output(X)


def attention_loss(*args: Tensor | AttentionLayer, **options: Unpack[LayerOptions]) -> Tensor:
    r"""The loss ``ℓ = c_eff Σ_b ‖F_b − Y_b‖²_F`` (MATH §3.1; :meth:`AttentionLayer.loss`).

    Call as ``attention_loss(layer, X, Y)`` or ``attention_loss(X, W_Q, W_K, W_V, Y, **options)``.
    """
    layer, X, Y = as_layer(args, options, "attention_loss")
    layer.check_inputs(X, Y)
    return layer.loss(X, Y)


def _flat_twin(
    args: tuple[Tensor | AttentionLayer, ...], options: LayerOptions, routine: str
) -> tuple[AttentionLayer, Tensor, Tensor, Tensor | None, Tensor, Callable[[Tensor], AttentionLayer]]:
    """Checked ``(layer, X, Y, mask, θ, layer_at)`` of a twin: ``layer_at(θ)`` is the layer with the weights of the
    flat vector ``θ`` (``vec_r`` blocks in the order ``Q, K, V[, O]``).
    """
    layer, X, Y = as_layer(args, options, routine)
    warn_if_not_float64(layer.W_Q.dtype, routine)
    _, _, mask = layer.check_inputs(X, Y)
    if mask is not None and X.ndim == 2:
        mask = mask[0]
    shapes = [W.shape for W in layer.weights]
    sizes = [W.numel() for W in layer.weights]
    theta = torch.cat([W.reshape(-1) for W in layer.weights])

    def layer_at(t: Tensor) -> AttentionLayer:
        return layer.with_weights(*(w.reshape(s) for w, s in zip(t.split(sizes), shapes)))

    return layer, X, Y, mask, theta, layer_at


def autograd_attention_hessian(*args: Tensor | AttentionLayer, **options: Unpack[LayerOptions]) -> Tensor:
    """Autograd twin: ``torch.func.hessian`` of the loss in the flattened ``(Q, K, V[, O])`` vector.

    Call as ``autograd_attention_hessian(layer, X, Y)`` or ``(X, W_Q, W_K, W_V, Y, **options)``.
    """
    _, X, Y, mask, theta, layer_at = _flat_twin(args, options, "autograd_attention_hessian")
    return torch.func.hessian(lambda t: layer_at(t).loss(X, Y, mask))(theta)


def autograd_attention_ggn(*args: Tensor | AttentionLayer, **options: Unpack[LayerOptions]) -> Tensor:
    """Autograd twin of ``H_o``: ``2 c_eff JᵀJ`` with ``J = torch.func.jacrev`` of ``vec_r(F)``.

    Call as ``autograd_attention_ggn(layer, X, Y)`` or ``(X, W_Q, W_K, W_V, Y, **options)``.
    """
    layer, X, _, mask, theta, layer_at = _flat_twin(args, options, "autograd_attention_ggn")
    J = torch.func.jacrev(lambda t: layer_at(t).output(X, mask).reshape(-1))(theta)
    return 2.0 * layer.loss_constant(X) * J.T @ J


def _multihead_twin(
    layer: MultiHeadAttentionLayer, X: Tensor, Y: Tensor, routine: str
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Checked ``(X, mask, θ)`` of a multi-head twin (``mask`` shaped like ``X``'s batch)."""
    warn_if_not_float64(layer.W_Q.dtype, routine)
    _, _, mask = layer.check_inputs(X, Y)
    if mask is not None and X.ndim == 2:
        mask = mask[0]
    return X, mask, layer.flat()


def autograd_multihead_hessian(layer: MultiHeadAttentionLayer, X: Tensor, Y: Tensor) -> Tensor:
    r"""Autograd twin of :func:`~energy.hessian.multihead.multihead_hessian`: ``torch.func.hessian`` of the loss in
    the flat vector ``θ`` (:meth:`MultiHeadAttentionLayer.flat`, MATH §5.1).

    .. math:: H = \nabla^2_\theta\, \ell(\theta)
    """
    X, mask, theta = _multihead_twin(layer, X, Y, "autograd_multihead_hessian")
    return torch.func.hessian(lambda t: layer.with_flat(t).loss(X, Y, mask))(theta)


def autograd_multihead_ggn(layer: MultiHeadAttentionLayer, X: Tensor, Y: Tensor) -> Tensor:
    r"""Autograd twin of ``H_o``: ``2 c_eff JᵀJ`` with ``J = torch.func.jacrev`` of ``vec_r F`` in the flat ``θ``.

    .. math:: H_o = 2 c_\mathrm{eff}\, J^\top J,\qquad J = \partial\, \mathrm{vec}_r F / \partial\theta
    """
    X, mask, theta = _multihead_twin(layer, X, Y, "autograd_multihead_ggn")
    J = torch.func.jacrev(lambda t: layer.with_flat(t).output(X, mask).reshape(-1))(theta)
    return 2.0 * layer.loss_constant(X) * J.T @ J
