r"""The feed-forward sublayer: closed-form output, Jacobians and contracted second derivatives (MATH §5.2).

For one token (a row) :math:`x \in \mathbb R^d`, :math:`h = xW_1 + b_1 \in \mathbb R^{d_{ff}}`,
:math:`y = \varphi(h)W_2 + b_2 \in \mathbb R^{d_\mathrm{out}}`, an upstream gradient :math:`g`, and
:math:`\delta = W_2 g`:

.. math::
    \frac{\partial y}{\partial x} = W_2^\top\operatorname{diag}(\varphi'(h))W_1^\top,\qquad
    \nabla^2_{xx}\langle g, y\rangle = W_1\operatorname{diag}(\varphi''(h)\odot\delta)W_1^\top,

    \frac{\partial^2\langle g,y\rangle}{\partial x_i\,\partial (W_1)_{jf}} = (W_1)_{if}\,\varphi''(h_f)\delta_f\,x_j
    + \delta_{ij}\,\varphi'(h_f)\delta_f,\qquad
    \frac{\partial^2\langle g,y\rangle}{\partial x_i\,\partial (W_2)_{fo}} = (W_1)_{if}\,\varphi'(h_f)\,g_o .

Summed over tokens, the parameter pairs that are not identically zero are ``(W_1, W_1)``, ``(W_1, b_1)``,
``(b_1, b_1)`` (through :math:`\varphi''\odot\delta`, absent for ReLU whose :math:`\varphi''` is zero) and
``(W_1, W_2)``, ``(b_1, W_2)`` (through :math:`\varphi'`); ``(W_2, W_2)`` and every pair with ``b_2`` vanish
(:math:`y` is affine in :math:`(W_2, b_2)` and :math:`b_2` enters additively).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from energy._validation import EnergyInputError, check_same_device, check_same_float_dtype, check_tensor
from energy.core import ffn as core_ffn
from energy.core.standard import affine
from energy.hessian.attention_layer import Reduction
from energy.hessian.tokenwise import (
    TokenwiseDerivatives,
    TokenwiseSecond,
    autograd_tokenwise_ggn,
    autograd_tokenwise_hessian,
    check_token_inputs,
    tokenwise_hessian,
)

__all__ = ["FFNLayer", "FFN_ACTIVATIONS", "ffn_derivatives", "ffn_hessian", "autograd_ffn_hessian",
           "autograd_ffn_ggn"]

#: the activations with closed-form derivatives here (:data:`energy.core.ffn.ACTIVATION_DERIVATIVES`)
FFN_ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class FFNLayer:
    r"""A two-matrix feed-forward sublayer :math:`y = \varphi(xW_1 + b_1)W_2 + b_2` per token (MATH §1.3, §5.2),
    validated once at construction.

    Attributes:
        W_1: ``(d, d_ff)``; b_1: ``(d_ff,)`` or ``None``.
        W_2: ``(d_ff, d_out)``; b_2: ``(d_out,)`` or ``None``.
        activation: ``"relu"``, ``"gelu"`` (exact erf form) or ``"gelu_tanh"`` (GPT-2's tanh approximation).

    Example:
        >>> import torch
        >>> ffn = FFNLayer(torch.zeros(3, 5), None, torch.zeros(5, 2), torch.zeros(2), "gelu")
        >>> ffn.param_blocks()
        (('W_1', (3, 5)), ('W_2', (5, 2)), ('b_2', (2,)))
    """

    W_1: Tensor
    b_1: Tensor | None
    W_2: Tensor
    b_2: Tensor | None
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.activation not in FFN_ACTIVATIONS:
            raise EnergyInputError(f"`activation` must be one of {list(FFN_ACTIVATIONS)}, got {self.activation!r}.")
        check_tensor(self.W_1, "W_1", ndim=2)
        d_ff = self.W_1.shape[1]
        if self.b_1 is not None:
            check_tensor(self.b_1, "b_1", ndim=1, trailing=(d_ff,))
        check_tensor(self.W_2, "W_2", ndim=2)
        if self.W_2.shape[0] != d_ff:
            raise EnergyInputError(f"`W_2` must have shape (d_ff, d_out) with d_ff = {d_ff} (the columns of `W_1`), "
                                   f"got {tuple(self.W_2.shape)}.")
        if self.b_2 is not None:
            check_tensor(self.b_2, "b_2", ndim=1, trailing=(self.W_2.shape[1],))
        if 0 in self.W_1.shape or 0 in self.W_2.shape:
            raise EnergyInputError(f"`W_1` {tuple(self.W_1.shape)} and `W_2` {tuple(self.W_2.shape)} must have no "
                                   "zero dimension.")
        check_same_float_dtype(W_1=self.W_1, b_1=self.b_1, W_2=self.W_2, b_2=self.b_2)
        check_same_device(W_1=self.W_1, b_1=self.b_1, W_2=self.W_2, b_2=self.b_2)

    @property
    def d(self) -> int:
        """Input width ``d``."""
        return self.W_1.shape[0]

    @property
    def d_ff(self) -> int:
        """Hidden width ``d_ff``."""
        return self.W_1.shape[1]

    @property
    def d_out(self) -> int:
        """Output width ``d_out``."""
        return self.W_2.shape[1]

    def params(self) -> dict[str, Tensor]:
        """The present parameters by name, in :meth:`param_blocks` order."""
        return {n: t for n, t in (("W_1", self.W_1), ("b_1", self.b_1), ("W_2", self.W_2), ("b_2", self.b_2))
                if t is not None}

    def param_blocks(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Ordered ``(name, shape)``: ``W_1, b_1, W_2, b_2`` (those present; ``vec_r`` flattening)."""
        return tuple((n, tuple(t.shape)) for n, t in self.params().items())

    def check_inputs(self, X: object, Y: object | None = None) -> tuple[Tensor, Tensor | None]:
        """``X`` as ``(L, d)`` or ``(B, L, d)``, ``Y`` with width ``d_out``, returned 3-D."""
        return check_token_inputs(X, Y, self.d, self.d_out, self.W_1, "W_1")

    def output_with(self, params: Mapping[str, Tensor], X: Tensor) -> Tensor:
        """:func:`energy.core.ffn.feed_forward` of ``X`` with the parameters ``params`` (pure)."""
        return core_ffn.feed_forward(X, params["W_1"], params.get("b_1"), params["W_2"], params.get("b_2"),
                                     self.activation)

    def output(self, X: Tensor) -> Tensor:
        """The FFN of ``X`` (pure)."""
        return self.output_with(self.params(), X)


def ffn_derivatives(ffn: FFNLayer, X3: Tensor) -> TokenwiseDerivatives:
    r"""Output, :math:`\partial y/\partial x`, :math:`\partial y/\partial\theta` per token and the contracted
    second derivatives (:meth:`TokenwiseDerivatives.second`) of the FFN at ``X3`` ``(B, L, d)`` (MATH §5.2; pure).

    .. math::
        \frac{\partial y_o}{\partial (W_1)_{if}} = x_i\varphi'(h_f)(W_2)_{fo},\quad
        \frac{\partial y_o}{\partial (b_1)_f} = \varphi'(h_f)(W_2)_{fo},\quad
        \frac{\partial y_o}{\partial (W_2)_{fo'}} = \varphi(h_f)\,\delta_{oo'},\quad
        \frac{\partial y}{\partial b_2} = I .

    ``second(G)`` (:math:`\delta = W_2 g`, :math:`c_1 = \varphi'(h)\odot\delta`, :math:`c_2 = \varphi''(h)\odot
    \delta`): ``xx``, ``x_params`` as in the module docstring (``b_1``: :math:`(W_1)_{if}c_{2,f}`; ``b_2``: 0);
    ``params``, summed over tokens by GEMMs, :math:`\delta_{ff'}` the Kronecker delta:
    ``(W_1,W_1)`` :math:`= \delta_{ff'}\sum_t x_i x_j c_{2,f}`, ``(W_1,b_1)`` :math:`= \delta_{ff'}\sum_t x_i
    c_{2,f}`, ``(b_1,b_1)`` :math:`= \operatorname{diag}\sum_t c_2` (not for ReLU), ``(W_1,W_2)`` :math:`=
    \delta_{ff'}\sum_t x_i\varphi'(h_f)g_o`, ``(b_1,W_2)`` :math:`= \delta_{ff'}\sum_t\varphi'(h_f)g_o`.
    """
    W_1, b_1, W_2, b_2 = ffn.W_1, ffn.b_1, ffn.W_2, ffn.b_2
    B, L, d = X3.shape
    d_ff, d_out = W_2.shape
    H = affine(X3, W_1, b_1)
    act = core_ffn.ACTIVATIONS[ffn.activation](H)
    d1, d2 = core_ffn.ACTIVATION_DERIVATIVES[ffn.activation](H)
    eye_f = torch.eye(d_ff, dtype=X3.dtype, device=X3.device)
    eye_o = torch.eye(d_out, dtype=X3.dtype, device=X3.device)
    J_x = torch.einsum("fo,blf,if->bloi", W_2, d1, W_1)
    d1W2 = d1[..., None, :] * W_2.T  # (B, L, d_out, d_ff): φ'(h_f)(W_2)_fo
    J_params = {"W_1": (d1W2[..., None, :] * X3[:, :, None, :, None]).reshape(B, L, d_out, d * d_ff)}
    if b_1 is not None:
        J_params["b_1"] = d1W2
    J_params["W_2"] = (act[:, :, None, :, None] * eye_o[:, None, :]).reshape(B, L, d_out, d_ff * d_out)
    if b_2 is not None:
        J_params["b_2"] = eye_o.expand(B, L, d_out, d_out)
    curved = ffn.activation != "relu"  # ReLU: φ'' = 0, the φ''-terms vanish identically

    def second(G: Tensor) -> TokenwiseSecond:
        delta = torch.einsum("fo,blo->blf", W_2, G)
        c1, c2 = d1 * delta, d2 * delta
        xx = torch.einsum("if,blf,jf->blij", W_1, c2, W_1)
        eye_d = torch.eye(d, dtype=X3.dtype, device=X3.device)
        x_W1 = torch.einsum("if,blf,blj->blijf", W_1, c2, X3) + eye_d[:, :, None] * c1[:, :, None, None, :]
        x_params = {"W_1": x_W1.reshape(B, L, d, d * d_ff)}
        if b_1 is not None:
            x_params["b_1"] = W_1 * c2[..., None, :]
        x_params["W_2"] = torch.einsum("if,blf,blo->blifo", W_1, d1, G).reshape(B, L, d, d_ff * d_out)
        if b_2 is not None:
            x_params["b_2"] = X3.new_zeros(B, L, d, d_out)
        A12 = torch.einsum("bli,blf,blo->ifo", X3, d1, G)  # Σ_t x_i φ'(h_f) g_o
        params = {("W_1", "W_2"): (A12[:, :, None, :] * eye_f[:, :, None]).reshape(d * d_ff, d_ff * d_out)}
        if b_1 is not None:
            A = torch.einsum("blf,blo->fo", d1, G)
            params[("b_1", "W_2")] = (eye_f[:, :, None] * A[:, None, :]).reshape(d_ff, d_ff * d_out)
        if curved:
            A11 = torch.einsum("bli,blj,blf->ifj", X3, X3, c2)  # Σ_t x_i x_j c_{2,f}
            params[("W_1", "W_1")] = (A11[..., None] * eye_f[:, None, :]).reshape(d * d_ff, d * d_ff)
            if b_1 is not None:
                v = torch.einsum("bli,blf->if", X3, c2)
                params[("W_1", "b_1")] = (v[..., None] * eye_f).reshape(d * d_ff, d_ff)
                params[("b_1", "b_1")] = torch.diag(c2.sum(dim=(0, 1)))
        return TokenwiseSecond(xx=xx, x_params=x_params, params=params)

    return TokenwiseDerivatives(output=affine(act, W_2, b_2), J_x=J_x, J_params=J_params, _second=second)


def ffn_hessian(ffn: FFNLayer, X: object, Y: object, part: str = "H", *, c: float | None = None,
                reduction: Reduction = "sum", max_gib: float | None = None) -> Tensor:
    r"""Dense ``(p, p)`` Hessian in ``vec_r(W_1, b_1, W_2, b_2)`` of :math:`\ell = c_\mathrm{eff}\sum_t
    \|y_t - Y_t\|^2` (MATH §5.2), from :func:`ffn_derivatives`; ``part`` ``"H"``, ``"H_o"`` or ``"H_f"``. See
    :func:`energy.hessian.tokenwise.tokenwise_hessian` for the arguments.
    """
    return tokenwise_hessian(ffn, ffn_derivatives, X, Y, part, d_out=ffn.d_out, c=c, reduction=reduction,
                             max_gib=max_gib)


def autograd_ffn_hessian(ffn: FFNLayer, X: object, Y: object, *, c: float | None = None,
                         reduction: Reduction = "sum") -> Tensor:
    """Autograd twin of :func:`ffn_hessian` (``torch.func.hessian`` in the flat parameter vector)."""
    return autograd_tokenwise_hessian(ffn, X, Y, c=c, reduction=reduction)


def autograd_ffn_ggn(ffn: FFNLayer, X: object, Y: object, *, c: float | None = None,
                     reduction: Reduction = "sum") -> Tensor:
    """Autograd twin of ``ffn_hessian(..., part="H_o")`` (``2 c_eff JᵀJ``, ``J`` by ``torch.func.jacrev``)."""
    return autograd_tokenwise_ggn(ffn, X, Y, c=c, reduction=reduction)
