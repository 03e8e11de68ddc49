r"""LayerNorm and RMSNorm: closed-form output, Jacobians and contracted second derivatives per token (MATH §5.2).

For one token :math:`x \in \mathbb R^d`, with :math:`P = I - 11^\top/d` (LayerNorm) or :math:`P = I` (RMSNorm),

.. math::
    \hat x = Px/s,\quad s^2 = \tfrac1d\|Px\|^2 + \varepsilon,\quad y = \gamma\odot\hat x + b,\qquad
    \frac{\partial y}{\partial x} = \operatorname{diag}(\gamma)\,\hat J,\quad
    \hat J = \frac{\partial\hat x}{\partial x} = s^{-1}\big(P - \hat x\hat x^\top/d\big),

and, for an upstream gradient :math:`g`, with :math:`u = \gamma\odot g`, :math:`w = Pu`,
:math:`\alpha = \hat x^\top u/d`,

.. math::
    \nabla^2_{xx}\langle g, y\rangle = s^{-2}\big[-(w\hat x^\top + \hat x w^\top)/d + 3\alpha\,\hat x\hat x^\top/d
    - \alpha P\big],\qquad \frac{\partial^2\langle g, y\rangle}{\partial x\,\partial\gamma} = \hat J
    \operatorname{diag}(g),\qquad \frac{\partial^2\langle g, y\rangle}{\partial x\,\partial b} = 0 .

The output is affine in :math:`(\gamma, b)`, so every parameter-parameter block is zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from energy._validation import EnergyInputError, check_real, check_same_device, check_same_float_dtype, check_tensor
from energy.core import norm as core_norm
from energy.hessian.attention_layer import Reduction
from energy.hessian.tokenwise import (
    TokenwiseDerivatives,
    TokenwiseSecond,
    autograd_tokenwise_ggn,
    autograd_tokenwise_hessian,
    check_token_inputs,
    tokenwise_hessian,
)

__all__ = ["NormLayer", "NORM_KINDS", "norm_derivatives", "norm_hessian", "autograd_norm_hessian",
           "autograd_norm_ggn"]

NormKind = Literal["layer", "rms"]
#: ``"layer"``: LayerNorm (centred, affine ``γ, b``); ``"rms"``: RMSNorm (not centred, weight ``γ`` only)
NORM_KINDS: tuple[str, ...] = ("layer", "rms")


@dataclass(frozen=True)
class NormLayer:
    r"""A LayerNorm / RMSNorm over the last dimension (MATH §1.4, §5.2), validated once at construction.

    Attributes:
        gamma: the weight ``(d,)`` or ``None`` (no elementwise affine weight).
        beta: the bias ``(d,)`` or ``None``; RMSNorm has none.
        eps: :math:`\varepsilon \ge 0` added to the (centred) mean square.
        kind: ``"layer"`` (as ``nn.LayerNorm(d, eps)``) or ``"rms"`` (as ``nn.RMSNorm(d, eps)``).

    Example:
        >>> import torch
        >>> norm = NormLayer(torch.ones(3, dtype=torch.float64), None, 1e-5, "rms")
        >>> norm.param_blocks()
        (('gamma', (3,)),)
    """

    gamma: Tensor | None = None
    beta: Tensor | None = None
    eps: float = 1e-5
    kind: NormKind = "layer"

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise EnergyInputError(f"`kind` must be one of {list(NORM_KINDS)} (LayerNorm, RMSNorm), got "
                                   f"{self.kind!r}.")
        object.__setattr__(self, "eps", check_real(self.eps, "eps", what="(added to the mean square)"))
        if self.kind == "rms" and self.beta is not None:
            raise EnergyInputError("`beta` must be None for kind='rms' (RMSNorm has no bias); drop it or use "
                                   "kind='layer'.")
        for name in ("gamma", "beta"):
            t = getattr(self, name)
            if t is not None:
                check_tensor(t, name, ndim=1)
                if t.numel() == 0:
                    raise EnergyInputError(f"`{name}` must have at least one entry, got shape {tuple(t.shape)}.")
        if self.gamma is not None and self.beta is not None and self.gamma.shape != self.beta.shape:
            raise EnergyInputError(f"`beta` must have `gamma`'s shape {tuple(self.gamma.shape)}, got "
                                   f"{tuple(self.beta.shape)}.")
        if self.params():
            check_same_float_dtype(**self.params())
            check_same_device(**self.params())

    @property
    def d(self) -> int | None:
        """The width ``d`` fixed by the parameters (``None`` without parameters: any width)."""
        t = self.gamma if self.gamma is not None else self.beta
        return None if t is None else t.shape[0]

    def params(self) -> dict[str, Tensor]:
        """The present parameters by name, in :meth:`param_blocks` order."""
        return {n: t for n, t in (("gamma", self.gamma), ("beta", self.beta)) if t is not None}

    def param_blocks(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Ordered ``(name, shape)``: ``("gamma", (d,))``, ``("beta", (d,))`` for those present."""
        return tuple((n, tuple(t.shape)) for n, t in self.params().items())

    def check_inputs(self, X: object, Y: object | None = None) -> tuple[Tensor, Tensor | None]:
        """``X`` as ``(L, d)`` or ``(B, L, d)`` and ``Y`` likewise, returned as ``(B, L, d)``."""
        ref_name = "gamma" if self.gamma is not None else "beta"
        return check_token_inputs(X, Y, self.d, None, self.params().get(ref_name), ref_name)

    def output_with(self, params: Mapping[str, Tensor], X: Tensor) -> Tensor:
        """The norm of ``X`` with the parameters ``params`` (:func:`energy.core.norm.layer_norm` / ``rms_norm``)."""
        if self.kind == "layer":
            return core_norm.layer_norm(X, params.get("gamma"), params.get("beta"), self.eps)
        return core_norm.rms_norm(X, params.get("gamma"), self.eps)

    def output(self, X: Tensor) -> Tensor:
        """The norm of ``X`` (pure)."""
        return self.output_with(self.params(), X)


def norm_derivatives(norm: NormLayer, X3: Tensor) -> TokenwiseDerivatives:
    r"""Output, :math:`\partial y/\partial x`, :math:`\partial y/\partial(\gamma, b)` per token and the contracted
    second derivatives (:meth:`TokenwiseDerivatives.second`) of a LayerNorm / RMSNorm at ``X3`` ``(B, L, d)``
    (MATH §5.2; pure).

    .. math::
        \frac{\partial y}{\partial x} = \operatorname{diag}(\gamma)\,s^{-1}(P - \hat x\hat x^\top/d),\quad
        \frac{\partial y}{\partial\gamma} = \operatorname{diag}(\hat x),\quad \frac{\partial y}{\partial b} = I.

    ``second(G)``: ``xx`` = :math:`s^{-2}[-(w\hat x^\top + \hat xw^\top)/d + 3\alpha\hat x\hat x^\top/d - \alpha P]`
    (:math:`u = \gamma\odot g`, :math:`w = Pu`, :math:`\alpha = \hat x^\top u/d`); ``x_params["gamma"]`` =
    :math:`\hat J\operatorname{diag}(g)`, ``x_params["beta"]`` = 0; ``params`` is empty (the norm is affine in
    :math:`\gamma, b`).
    """
    d = X3.shape[-1]
    centred = norm.kind == "layer"
    Xc = core_norm.centre(X3) if centred else X3
    s = torch.sqrt(Xc.square().mean(dim=-1, keepdim=True) + norm.eps)  # (B, L, 1)
    xh = Xc / s
    eye = torch.eye(d, dtype=X3.dtype, device=X3.device)
    P = eye - 1.0 / d if centred else eye
    outer = xh[..., :, None] * xh[..., None, :]  # x̂ x̂ᵀ, (B, L, d, d)
    J_hat = (P - outer / d) / s[..., None]
    gamma, beta = norm.gamma, norm.beta
    J_x = J_hat if gamma is None else gamma[:, None] * J_hat
    J_params: dict[str, Tensor] = {}
    if gamma is not None:
        J_params["gamma"] = torch.diag_embed(xh)
    if beta is not None:
        J_params["beta"] = eye.expand(*X3.shape[:-1], d, d)

    def second(G: Tensor) -> TokenwiseSecond:
        u = G if gamma is None else gamma * G
        w = core_norm.centre(u) if centred else u
        alpha = ((xh * u).sum(dim=-1) / d)[..., None, None]  # (B, L, 1, 1)
        wx = w[..., :, None] * xh[..., None, :]
        xx = (-(wx + wx.transpose(-1, -2)) / d + 3.0 * alpha * outer / d - alpha * P) / s[..., None].square()
        x_params: dict[str, Tensor] = {}
        if gamma is not None:
            x_params["gamma"] = J_hat * G[..., None, :]
        if beta is not None:
            x_params["beta"] = X3.new_zeros(*X3.shape, d)
        return TokenwiseSecond(xx=xx, x_params=x_params, params={})

    return TokenwiseDerivatives(output=norm.output(X3), J_x=J_x, J_params=J_params, _second=second)


def norm_hessian(norm: NormLayer, X: object, Y: object, part: str = "H", *, c: float | None = None,
                 reduction: Reduction = "sum", max_gib: float | None = None) -> Tensor:
    r"""Dense ``(p, p)`` Hessian in ``vec(γ, b)`` of :math:`\ell = c_\mathrm{eff}\sum_t\|y_t - Y_t\|^2` (MATH §5.2),
    from :func:`norm_derivatives`; ``part`` ``"H"``, ``"H_o"`` (:math:`2c\,J^\top J`) or ``"H_f"`` (zero: the
    norm is affine in its parameters). See :func:`energy.hessian.tokenwise.tokenwise_hessian` for the arguments.
    """
    return tokenwise_hessian(norm, norm_derivatives, X, Y, part, d_out=None, c=c, reduction=reduction,
                             max_gib=max_gib)


def autograd_norm_hessian(norm: NormLayer, X: object, Y: object, *, c: float | None = None,
                          reduction: Reduction = "sum") -> Tensor:
    """Autograd twin of :func:`norm_hessian` (``torch.func.hessian`` in the flat ``(γ, b)`` vector)."""
    return autograd_tokenwise_hessian(norm, X, Y, c=c, reduction=reduction)


def autograd_norm_ggn(norm: NormLayer, X: object, Y: object, *, c: float | None = None,
                      reduction: Reduction = "sum") -> Tensor:
    """Autograd twin of ``norm_hessian(..., part="H_o")`` (``2 c_eff JᵀJ``, ``J`` by ``torch.func.jacrev``)."""
    return autograd_tokenwise_ggn(norm, X, Y, c=c, reduction=reduction)
