r"""Closed-form first and second derivatives of the token-wise sublayers (LayerNorm, RMSNorm, FFN; MATH §5.2):
the shared containers and the standalone square-loss parameter Hessian built from them.

A token-wise map :math:`y_t = f(x_t; \theta)` acts on every token :math:`x_t \in \mathbb R^d` alone, so its
derivatives are per token: :math:`J_x = \partial y/\partial x \in \mathbb R^{d_\mathrm{out}\times d}`,
:math:`J_\theta = \partial y/\partial\theta`, and, contracted with an upstream gradient
:math:`g_t = \partial\ell/\partial y_t`,

.. math::
    \nabla^2_{xx}\langle g, y\rangle,\qquad \nabla^2_{x\theta}\langle g, y\rangle\ \text{(per token)},\qquad
    \textstyle\sum_t \nabla^2_{\theta\theta}\langle g_t, y_t\rangle\ \text{(summed over tokens)}.

These are what the second-order chain rule needs to compose the sublayers into a block Hessian (MATH §5.3). The
layer-specific formulas live in :mod:`energy.hessian.norm_curvature` and :mod:`energy.hessian.ffn_curvature`.
Parameters are flattened ``vec_r`` (row-major), block by block in the layer's :meth:`param_blocks` order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import torch
from torch import Tensor

from energy._validation import EnergyInputError, check_finite, check_tensor, warn_if_not_float64
from energy.hessian.attention_layer import Reduction, check_dense_budget, loss_constant

__all__ = [
    "TokenwiseDerivatives",
    "TokenwiseSecond",
    "TokenwiseLayer",
    "Part",
    "PARTS",
    "check_token_inputs",
    "tokenwise_hessian",
    "autograd_tokenwise_hessian",
    "autograd_tokenwise_ggn",
]

Part = Literal["H", "H_o", "H_f"]
#: the parts of a standalone parameter Hessian: the whole ``H = H_o + H_f``, the GGN ``H_o = 2c JᵀJ``, the
#: functional part ``H_f = Σ_t ∇²_θ⟨g_t, y_t⟩`` with ``g = 2c(y − Y)``
PARTS: tuple[str, ...] = ("H", "H_o", "H_f")


@dataclass(frozen=True)
class TokenwiseSecond:
    r"""Second derivatives of :math:`\langle G, y\rangle` for one upstream gradient ``G`` (MATH §5.2).

    Attributes:
        xx: ``(B, L, d, d)``, per token :math:`\nabla^2_{x_t x_t}\langle g_t, y_t\rangle` (symmetric).
        x_params: name -> ``(B, L, d, n_name)``, per token :math:`\partial^2\langle g_t, y_t\rangle/\partial x_t
            \partial\theta_\mathrm{name}` (``vec_r`` columns); every parameter of the layer has an entry, zero where
            the output is affine in ``x`` and the parameter jointly (LayerNorm ``beta``, FFN ``b_2``).
        params: ``(name_a, name_b)`` -> ``(n_a, n_b)``, :math:`\sum_t \partial^2\langle g_t, y_t\rangle/
            \partial\theta_a\partial\theta_b` summed over all ``B·L`` tokens; only the pairs that are not
            identically zero, each unordered pair once, ``name_a`` before ``name_b`` in :meth:`param_blocks` order
            (the diagonal pairs ``(a, a)`` are symmetric).
    """

    xx: Tensor
    x_params: dict[str, Tensor]
    params: dict[tuple[str, str], Tensor]


@dataclass(frozen=True)
class TokenwiseDerivatives:
    r"""Output and first derivatives of a token-wise layer at inputs ``X3`` ``(B, L, d)`` (MATH §5.2), and
    :meth:`second` for the contracted second derivatives.

    Attributes:
        output: ``(B, L, d_out)``, :math:`y_t`.
        J_x: ``(B, L, d_out, d)``, per token :math:`\partial y_t/\partial x_t`.
        J_params: name -> ``(B, L, d_out, n_name)``, per token :math:`\partial y_t/\partial\mathrm{vec}_r\theta`.
    """

    output: Tensor
    J_x: Tensor
    J_params: dict[str, Tensor]
    _second: Callable[[Tensor], TokenwiseSecond] = field(repr=False, compare=False)

    def second(self, G: Tensor) -> TokenwiseSecond:
        r"""The second derivatives of :math:`\langle G, y\rangle`, ``G`` ``(B, L, d_out)`` (pure: ``torch.func``
        transforms, e.g. ``vmap`` over a batch of ``G``, pass through).
        """
        return self._second(G)


class TokenwiseLayer(Protocol):
    """What the standalone Hessian needs of a token-wise layer (:class:`~energy.hessian.norm_curvature.NormLayer`,
    :class:`~energy.hessian.ffn_curvature.FFNLayer`).
    """

    def param_blocks(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Ordered ``(name, shape)`` of the present parameters."""
        ...

    def params(self) -> dict[str, Tensor]:
        """The present parameters by name."""
        ...

    def output_with(self, params: Mapping[str, Tensor], X: Tensor) -> Tensor:
        """The layer's output at ``X`` with the parameters ``params`` (pure)."""
        ...

    def check_inputs(self, X: object, Y: object | None = None) -> tuple[Tensor, Tensor | None]:
        """Checked ``(X3, Y3)``, ``(B, L, ·)``."""
        ...


LayerT = TypeVar("LayerT", bound=TokenwiseLayer)


def check_token_inputs(X: object, Y: object | None, d: int | None, d_out: int | None, ref: Tensor | None,
                       ref_name: str) -> tuple[Tensor, Tensor | None]:
    """Check ``X`` as ``(L, d)`` or ``(B, L, d)`` (finite, float, the layer's ``d``, dtype and device of the layer's
    tensor ``ref``) and ``Y`` as ``X``'s shape with width ``d_out`` (``None``: ``d``); returns them as 3-D.
    """
    X = check_tensor(X, "X")
    if X.ndim not in (2, 3) or X.numel() == 0:
        raise EnergyInputError(f"`X` must have shape (L, d) or (B, L, d) with at least one token, got "
                               f"{tuple(X.shape)}; add a batch or token dimension with `.unsqueeze(0)`.")
    if d is not None and X.shape[-1] != d:
        raise EnergyInputError(f"`X` must have width d = {d} (the width of `{ref_name}`), got shape "
                               f"{tuple(X.shape)}.")
    if ref is not None and (ref.dtype != X.dtype or ref.device != X.device):
        raise EnergyInputError(f"`X` ({X.dtype}, {X.device}) and `{ref_name}` ({ref.dtype}, {ref.device}) must "
                               f"share dtype and device; cast with `X.to({ref_name}.dtype)`.")
    Yt = None
    if Y is not None:
        width = X.shape[-1] if d_out is None else d_out
        Yt = check_finite(check_tensor(Y, "Y", finite=False), "Y")
        if Yt.shape != (*X.shape[:-1], width):
            raise EnergyInputError(f"`Y` (the target of the layer's output) must have shape "
                                   f"{(*X.shape[:-1], width)} (X's with the output width), got {tuple(Yt.shape)}.")
        if Yt.dtype != X.dtype or Yt.device != X.device:
            raise EnergyInputError(f"`Y` ({Yt.dtype}, {Yt.device}) must have `X`'s dtype and device "
                                   f"({X.dtype}, {X.device}).")
    X3 = X if X.ndim == 3 else X.unsqueeze(0)
    return X3, None if Yt is None else (Yt if Yt.ndim == 3 else Yt.unsqueeze(0))


def _check_part(part: object) -> str:
    if part not in PARTS:
        raise EnergyInputError(f"`part` must be one of {list(PARTS)} (the whole Hessian, the GGN 2c JᵀJ, the "
                               f"functional part), got {part!r}.")
    return str(part)


def _dense_params(blocks: tuple[tuple[str, tuple[int, ...]], ...], pairs: dict[tuple[str, str], Tensor],
                  like: Tensor) -> Tensor:
    """The symmetric dense ``(p, p)`` matrix from the upper-triangle blocks ``pairs`` (absent pairs are zero)."""
    sizes = [int(torch.Size(shape).numel()) for _, shape in blocks]
    offsets = dict(zip([n for n, _ in blocks], [sum(sizes[:i]) for i in range(len(sizes))]))
    p = sum(sizes)
    H = like.new_zeros(p, p)
    for (a, b), blk in pairs.items():
        ra, rb = offsets[a], offsets[b]
        H[ra:ra + blk.shape[0], rb:rb + blk.shape[1]] = blk
        if a != b:
            H[rb:rb + blk.shape[1], ra:ra + blk.shape[0]] = blk.T
    return H


def tokenwise_hessian(layer: LayerT, derivatives: Callable[[LayerT, Tensor], TokenwiseDerivatives],
                      X: object, Y: object, part: str = "H", *, d_out: int | None, c: float | None = None,
                      reduction: Reduction = "sum", max_gib: float | None = None) -> Tensor:
    r"""Dense parameter Hessian of :math:`\ell = c_\mathrm{eff}\sum_t\|y_t - Y_t\|^2` from the closed forms
    (MATH §5.2), ``vec_r`` blocks in :meth:`param_blocks` order.

    .. math:: H_o = 2c_\mathrm{eff}\textstyle\sum_t J_{\theta,t}^\top J_{\theta,t},\qquad
        H_f = \textstyle\sum_t \nabla^2_\theta\langle g_t, y_t\rangle,\ g = 2c_\mathrm{eff}(y - Y),\qquad
        H = H_o + H_f.

    Args:
        layer: the layer (validated at construction).
        derivatives: ``norm_derivatives`` / ``ffn_derivatives``.
        X: ``(L, d)`` or ``(B, L, d)``.
        Y: the target, ``X``'s shape with width ``d_out``.
        part: ``"H"``, ``"H_o"`` or ``"H_f"``.
        d_out: the output width (``None``: ``d``).
        c: loss constant (default ``1/(L d_out)``, :func:`energy.hessian.attention_layer.loss_constant`).
        reduction: ``"sum"`` or ``"mean"`` (divide by the number of sequences ``B``) over sequences.
        max_gib: memory budget of the dense result (:func:`~energy.hessian.attention_layer.check_dense_budget`).
    """
    part = _check_part(part)
    X3, Y3 = layer.check_inputs(X, Y)
    assert Y3 is not None  # Y was given
    c_eff = loss_constant(X if isinstance(X, Tensor) else X3, c, reduction, Y3.shape[-1] if d_out is None
                          else d_out)
    blocks = layer.param_blocks()
    p = sum(int(torch.Size(s).numel()) for _, s in blocks)
    check_dense_budget(p, p, X3.dtype, max_gib, "the token-wise parameter Hessian")
    D = derivatives(layer, X3)
    H = X3.new_zeros(p, p)
    if part in ("H", "H_o") and p:
        J = torch.cat([D.J_params[n] for n, _ in blocks], dim=-1)
        H = H + 2.0 * c_eff * torch.einsum("blop,bloq->pq", J, J)
    if part in ("H", "H_f") and p:
        H = H + _dense_params(blocks, D.second(2.0 * c_eff * (D.output - Y3)).params, X3)
    return H


def _flat_loss(layer: TokenwiseLayer, X: object, Y: object, c: float | None, reduction: Reduction,
               routine: str) -> tuple[Callable[[Tensor], Tensor], Tensor, float, Tensor]:
    """``(θ ↦ vec_r y(θ), θ, c_eff, Y3)`` of a twin (checked inputs, float64 warning)."""
    X3, Y3 = layer.check_inputs(X, Y)
    assert Y3 is not None
    warn_if_not_float64(X3.dtype, routine)
    c_eff = loss_constant(X if isinstance(X, Tensor) else X3, c, reduction, Y3.shape[-1])
    blocks = layer.param_blocks()
    params = layer.params()
    theta = torch.cat([params[n].reshape(-1) for n, _ in blocks]) if blocks else X3.new_zeros(0)
    sizes = [int(torch.Size(s).numel()) for _, s in blocks]

    def output(t: Tensor) -> Tensor:
        parts = {n: w.reshape(s) for (n, s), w in zip(blocks, t.split(sizes))}
        return layer.output_with(parts, X3).reshape(-1)

    return output, theta, c_eff, Y3


def autograd_tokenwise_hessian(layer: TokenwiseLayer, X: object, Y: object, *, c: float | None = None,
                               reduction: Reduction = "sum") -> Tensor:
    """Autograd twin of :func:`tokenwise_hessian` ``part="H"``: ``torch.func.hessian`` of the loss in the flat
    ``vec_r`` parameter vector.
    """
    output, theta, c_eff, Y3 = _flat_loss(layer, X, Y, c, reduction, "autograd_tokenwise_hessian")
    target = Y3.reshape(-1)
    return torch.func.hessian(lambda t: c_eff * (output(t) - target).square().sum())(theta)


def autograd_tokenwise_ggn(layer: TokenwiseLayer, X: object, Y: object, *, c: float | None = None,
                           reduction: Reduction = "sum") -> Tensor:
    """Autograd twin of ``part="H_o"``: ``2 c_eff JᵀJ`` with ``J = torch.func.jacrev`` of ``vec_r y``."""
    output, theta, c_eff, _ = _flat_loss(layer, X, Y, c, reduction, "autograd_tokenwise_ggn")
    J = torch.func.jacrev(output)(theta)
    return 2.0 * c_eff * J.T @ J
