r"""The attention moments and Jacobians of MATH §3.2–§3.3, computed once per layer and inputs.

Every closed form of :mod:`energy.hessian.attention` and :mod:`energy.hessian.structure` reads these moments. The
public entry :func:`attention_moments` validates its inputs once (:class:`~energy.hessian.attention_layer.
AttentionLayer`); :func:`layer_moments` is the pure computation, transparent to every ``torch.func`` transform.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from typing_extensions import Unpack

from energy._validation import EnergyInputError
from energy.core import standard as core_standard
from energy.hessian.attention_layer import AttentionLayer, LayerOptions, attention_matrix

__all__ = [
    "PARAMS",
    "BLOCKS",
    "BLOCKS_O",
    "AttentionMoments",
    "attention_moments",
    "layer_moments",
    "gradient_moments",
    "attention_jacobians",
    "as_layer",
    "check_moments",
]

#: Parameter order of the assembled Hessian.
PARAMS: tuple[str, ...] = ("Q", "K", "V")
#: The six distinct blocks (the other three are their transposes).
BLOCKS: tuple[tuple[str, str], ...] = (("V", "V"), ("V", "Q"), ("V", "K"), ("Q", "Q"), ("K", "K"), ("Q", "K"))
#: The extra distinct blocks with an output projection ``W_O``.
BLOCKS_O: tuple[tuple[str, str], ...] = (("O", "O"), ("V", "O"), ("O", "Q"), ("O", "K"))


def as_layer(
    args: tuple[Tensor | AttentionLayer, ...], options: LayerOptions, what: str
) -> tuple[AttentionLayer, Tensor, Tensor]:
    """``(layer, X, Y)`` from either call style: ``(layer, X, Y)`` or the legacy ``(X, W_Q, W_K, W_V, Y, **options)``.

    One helper for every public closed form, so the attention-layer keywords are described once
    (:class:`~energy.hessian.attention_layer.LayerOptions`).
    """
    if args and isinstance(args[0], AttentionLayer):
        if len(args) != 3 or options:
            raise TypeError(f"{what}(layer, X, Y) takes the layer and two tensors, no keyword options (they are "
                            "fields of the AttentionLayer).")
        return args[0], args[1], args[2]  # type: ignore[return-value]  # X, Y are checked by check_inputs
    if len(args) != 5:
        raise TypeError(f"{what} takes (layer, X, Y) or (X, W_Q, W_K, W_V, Y, **options), got {len(args)} "
                        "positional arguments.")
    X, W_Q, W_K, W_V, Y = args
    return AttentionLayer.from_weights(W_Q, W_K, W_V, **options), X, Y  # type: ignore[arg-type,return-value]


@dataclass(frozen=True)
class AttentionMoments:
    r"""The attention moments of MATH §3.2, computed once, with rows ``i`` of all sequences stacked.

    Row index ``i`` runs over the ``N = B·L`` query rows of the batch (sequence-major). Shapes use
    ``d = d_V``, ``k = d_K``. The ``d × d`` per-row moments ``Sigma``, ``S_hat``, ``B_V`` (cost ``O(N d²)``
    memory, ``O(N d³)`` for ``B_V``) are computed on first use; :mod:`energy.hessian.structure` never needs them.

    Attributes:
        x: query inputs ``x_i``, ``(N, d)``.
        X: the sequences, ``(B, L, d)``.
        A: attention matrices, ``(B, L, L)`` (softmax or linear, masked).
        M_1: first moments ``μ_i = Xᵀ a_i`` (``M_1 = A X``), ``(N, d)``.
        Sigma: ``Σ_i = Xᵀ J_i X``, ``(N, d, d)``; ``J_i = diag(a_i) − a_i a_iᵀ`` (softmax) or ``diag(m_i)``
            (linear attention).
        S_hat: ``Ŝ_i = Σ_j a_ij ((x_j − μ_i)ᵀ W_V g_i)(x_j − μ_i)(x_j − μ_i)ᵀ`` (0 for linear attention),
            ``(N, d, d)``.
        q: ``q_i = W_Qᵀ x_i``, ``(N, k)``.
        G: upstream gradient rows ``g_i = ∂ℓ/∂f_i`` (``2 c_eff (f_i − y_i)`` for the square loss), ``(N, d_out)``.
        B_V: ``B_i = Ṽᵀ Σ_i``, ``(N, d_out, d)``, ``Ṽ = W_V W_O`` (``W_V`` without ``W_O``).
        G_QK: ``κ Σ_i x_i (Σ_i Ṽ g_i)ᵀ`` (the gradient w.r.t. ``W_Q W_Kᵀ``), ``(d, d)``.
        F: layer output, ``(B, L, d_out)`` (``(L, d_out)`` for a single sequence).
        kappa: ``κ``.
        c: the effective loss constant ``c_eff`` (reduction included).
        W_Q, W_K, W_V, W_O: the weights (``W_O`` may be ``None``).
        linear: whether the moments are those of linear attention.
        J_tok: the token-space Jacobians ``J_i`` (``Σ_i = Xᵀ J_i X``), ``(B, L, L, L)``.
        r: ``r_ij = a_ij (v_ij − a_iᵀ v_i)``, ``v_ij = x_jᵀ Ṽ g_i`` (``Ŝ_i = Xᵀ C_i X`` with
            ``C_i = diag(r_i) − a_i r_iᵀ − r_i a_iᵀ``; 0 for linear attention), ``(B, L, L)``.
        V_eff: ``Ṽ = W_V W_O`` (``W_V`` without output projection).
    """

    x: Tensor
    X: Tensor
    A: Tensor
    M_1: Tensor
    q: Tensor
    G: Tensor
    G_QK: Tensor
    F: Tensor
    kappa: float
    c: float
    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor | None
    linear: bool
    J_tok: Tensor
    r: Tensor
    V_eff: Tensor

    @cached_property
    def Sigma(self) -> Tensor:
        """``Σ_i = Xᵀ J_i X`` ``(N, d, d)``."""
        X = self.X
        if self.linear:
            Sigma = _weighted_outer(self.J_tok.diagonal(dim1=-2, dim2=-1), X)
        else:
            mu = self.M_1.reshape(X.shape)
            Sigma = _weighted_outer(self.A, X) - mu.unsqueeze(-1) * mu.unsqueeze(-2)
        return Sigma.reshape(-1, X.shape[-1], X.shape[-1])

    @cached_property
    def S_hat(self) -> Tensor:
        """``Ŝ_i = Xᵀ C_i X = Σ_j r_ij (x_j − μ_i)(x_j − μ_i)ᵀ`` ``(N, d, d)`` (uses ``Σ_j r_ij = 0``)."""
        X, r = self.X, self.r
        mu = self.M_1.reshape(X.shape)
        Xr = r @ X  # Σ_j r_ij x_j
        S = _weighted_outer(r, X) - mu.unsqueeze(-1) * Xr.unsqueeze(-2) - Xr.unsqueeze(-1) * mu.unsqueeze(-2)
        return S.reshape(-1, X.shape[-1], X.shape[-1])

    @cached_property
    def B_V(self) -> Tensor:
        """``B_i = Ṽᵀ Σ_i`` ``(N, d_out, d)``."""
        return torch.einsum("nm,inl->iml", self.V_eff, self.Sigma)

    @property
    def d_V(self) -> int:
        return self.x.shape[-1]

    @property
    def d_K(self) -> int:
        return self.q.shape[-1]

    @property
    def d_v(self) -> int:
        """Value width: the columns of ``W_V``."""
        return self.W_V.shape[-1]

    @property
    def d_O(self) -> int:
        """Output width (``d_v`` without output projection)."""
        return self.G.shape[-1]

    @property
    def params(self) -> tuple[str, ...]:
        """Parameter names in Hessian order: ``("Q", "K", "V")`` plus ``"O"`` with an output projection."""
        return PARAMS if self.W_O is None else (*PARAMS, "O")

    @property
    def blocks(self) -> tuple[tuple[str, str], ...]:
        """The distinct blocks (:data:`BLOCKS`, plus :data:`BLOCKS_O` with an output projection)."""
        return BLOCKS if self.W_O is None else BLOCKS + BLOCKS_O

    @property
    def sizes(self) -> dict[str, int]:
        """Number of parameters per block name."""
        out = {"Q": self.d_V * self.d_K, "K": self.d_V * self.d_K, "V": self.d_V * self.d_v}
        if self.W_O is not None:
            out["O"] = self.d_v * self.d_O
        return out


def check_moments(mom: object, function: str) -> AttentionMoments:
    """Raise :class:`EnergyInputError` unless ``mom`` is an :class:`AttentionMoments` (a type check only)."""
    if not isinstance(mom, AttentionMoments):
        got = f"a tensor of shape {tuple(mom.shape)}" if isinstance(mom, Tensor) else type(mom).__name__
        raise EnergyInputError(
            f"{function}: `mom` must be the moments of a layer, got {got}; compute them first with "
            "`mom = energy.hessian.attention_moments(layer, X, Y)` (or attention_moments(X, W_Q, W_K, W_V, Y)) and "
            f"call {function}(mom)."
        )
    return mom


def _weighted_outer(W: Tensor, X: Tensor) -> Tensor:
    """``out[b, i] = Σ_j W[b, i, j] x_j x_jᵀ`` as one batched GEMM, ``(B, L, d, d)``."""
    B, L, d = X.shape
    XX = (X.unsqueeze(-1) * X.unsqueeze(-2)).reshape(B, L, d * d)
    return (W @ XX).reshape(B, W.shape[1], d, d)


def attention_moments(*args: Tensor | AttentionLayer, **options: Unpack[LayerOptions]) -> AttentionMoments:
    r"""Compute the moments of MATH §3.2 once (cost ``O(B L² d²)``), after checking the inputs.

    Call as ``attention_moments(layer, X, Y)`` with an :class:`~energy.hessian.attention_layer.AttentionLayer`, or
    in the legacy style ``attention_moments(X, W_Q, W_K, W_V, Y, W_O=..., c=..., reduction=..., scale=..., mask=...,
    causal=..., linear=...)`` (the fields of the layer).

    Args:
        *args: ``(layer, X, Y)`` with an :class:`~energy.hessian.attention_layer.AttentionLayer`, or the legacy
            ``(X, W_Q, W_K, W_V, Y)``; ``X`` is ``(L, d_V)`` or ``(B, L, d_V)`` and ``Y``, the regression target of
            ``F``, has the shape of ``X`` with the output width.
        **options: the layer's fields in the legacy style (``W_O``, ``c``, ``reduction``, ``scale``, ``mask``,
            ``causal``, ``linear``).

    The formulas are those of :func:`layer_moments`.
    """
    layer, X, Y = as_layer(args, options, "attention_moments")
    X3, Y3, mask = layer.check_inputs(X, Y)
    assert Y3 is not None
    return layer_moments(layer, X3, Y3, mask, single=X.ndim == 2)


def layer_moments(
    layer: AttentionLayer, X3: Tensor, Y3: Tensor, mask: Tensor | None, *, single: bool = False
) -> AttentionMoments:
    r"""The moments of MATH §3.2 for the square loss (pure; inputs as returned by
    :meth:`AttentionLayer.check_inputs`): :func:`gradient_moments` with the upstream gradient
    ``G = ∂ℓ/∂F = 2 c_eff (F − Y)``.

    .. math:: G = \partial\ell/\partial F = 2\,c_\mathrm{eff}\,(F - Y)

    Args:
        layer: the attention layer.
        X3: ``(B, L, d_V)`` inputs.
        Y3: ``(B, L, d_out)`` targets.
        mask: ``(B, L, L)`` boolean or ``None``.
        single: the inputs were one sequence (``F`` is then returned as ``(L, d_out)``).
    """
    c_eff = layer.loss_constant(X3[0] if single else X3)
    return _moments(layer, X3, lambda F: 2.0 * c_eff * (F - Y3), mask, c_eff, single)


def gradient_moments(
    layer: AttentionLayer, X3: Tensor, G3: Tensor, mask: Tensor | None, *, c: float | None = None,
    single: bool = False,
) -> AttentionMoments:
    r"""The moments of MATH §3.2 with a given upstream gradient ``G = ∂ℓ/∂F`` (pure).

    .. math::
        \mu_i = X^\top a_i,\quad \Sigma_i = X^\top J_i X,\quad
        \hat S_i = \sum_j r_{ij} (x_j-\mu_i)(x_j-\mu_i)^\top,\ r_{ij} = a_{ij}\,(x_j-\mu_i)^\top \tilde V g_i

    ``Ŝ_i`` is ``Xᵀ (∇²_t a_i·v_i) X``, the curvature of ``v_iᵀ softmax(t)`` with ``v_i = X Ṽ g_i``,
    ``Ṽ = W_V W_O`` (``W_V`` without output projection). The functional part built from these moments
    (``part="H_f"`` of :mod:`energy.hessian.blocks` and :mod:`energy.hessian.structure`) is the ``G``-contracted
    second derivative ``Σ_{b,l,m} G_{blm} ∇²_θ F_{blm}``, whatever loss ``G`` comes from: inside a multi-head
    layer (MATH §5.1) or a block, ``G`` is the gradient of the whole output. The outer-product part uses ``c``:
    ``H_o = 2c JᵀJ`` (the square loss's ``∇²_F ℓ = 2c I``).

    Args:
        layer: the attention layer.
        X3: ``(B, L, d_V)`` inputs.
        G3: ``(B, L, d_out)`` upstream gradient ``∂ℓ/∂F``.
        mask: ``(B, L, L)`` boolean or ``None``.
        c: ``c_eff`` of the outer-product part (default: the layer's square-loss constant for ``X3``).
        single: the inputs were one sequence (``F`` is then returned as ``(L, d_out)``).
    """
    c_eff = layer.loss_constant(X3[0] if single else X3) if c is None else c
    return _moments(layer, X3, lambda F: G3, mask, c_eff, single)


def _moments(
    layer: AttentionLayer, X3: Tensor, gradient: Callable[[Tensor], Tensor], mask: Tensor | None, c_eff: float,
    single: bool,
) -> AttentionMoments:
    """The moments with ``G = gradient(F)`` (:func:`layer_moments`, :func:`gradient_moments`)."""
    W_Q, W_K, W_V, W_O = layer.W_Q, layer.W_K, layer.W_V, layer.W_O
    V_eff = W_V if W_O is None else W_V @ W_O  # Ṽ
    kappa = layer.kappa
    d = X3.shape[-1]
    A = attention_matrix(X3, W_Q, W_K, kappa, mask, linear=layer.linear)
    M_1 = A @ X3  # (B, L, d)
    F = M_1 @ V_eff
    G = gradient(F)
    v = torch.einsum("bjd,bid->bij", X3 @ V_eff, G)  # v_ij = x_jᵀ Ṽ g_i
    if layer.linear:
        m = torch.ones_like(A) if mask is None else mask.to(A.dtype)
        J_tok, r = torch.diag_embed(m), torch.zeros_like(A)
        Jv = m * v
    else:
        J_tok = torch.diag_embed(A) - A.unsqueeze(-1) * A.unsqueeze(-2)
        r = core_standard.softmax_jacobian_apply(A, v)  # r_ij = a_ij (v_ij − a_iᵀ v_i) = (J_i v_i)_j; Σ_j r_ij = 0
        Jv = r
    N = X3.shape[0] * X3.shape[1]
    x = X3.reshape(N, d)
    G = G.reshape(N, -1)
    # G_QK = κ Σ_i x_i (Σ_i Ṽ g_i)ᵀ with Σ_i Ṽ g_i = Xᵀ J_i X Ṽ g_i = Xᵀ (J_i v_i)
    G_QK = kappa * x.T @ (Jv @ X3).reshape(N, d)
    return AttentionMoments(
        x=x, X=X3, A=A, M_1=M_1.reshape(N, d), q=x @ W_Q, G=G, G_QK=G_QK,
        F=F[0] if single else F, kappa=kappa, c=c_eff, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, linear=layer.linear,
        J_tok=J_tok, r=r, V_eff=V_eff,
    )


# ----------------------------------------------------------------------------------------------------------------
# Jacobians (MATH §3.3)
# ----------------------------------------------------------------------------------------------------------------


def attention_jacobians(mom: AttentionMoments) -> dict[str, Tensor]:
    r"""Jacobians of ``vec_r(F)`` (all sequences stacked) w.r.t. the flattened weights (MATH §3.3).

    Row block ``i`` (``Ṽ = W_V W_O``; without output projection ``W_O = I``, ``Ṽ = W_V``):

    .. math::
        J_V = \mu_i^\top \otimes W_O^\top,\quad J_Q = \kappa\, x_i^\top \otimes (\tilde V^\top\Sigma_i W_K),\quad
        J_K = \kappa\, (\tilde V^\top \Sigma_i) \otimes q_i^\top,\quad J_O = (W_V^\top\mu_i)^\top \otimes I_{d_O}

    Returns:
        ``{"Q": (N d_O, d_V d_K), "K": (N d_O, d_V d_K), "V": (N d_O, d_V d_v)[, "O": (N d_O, d_v d_O)]}``,
        ``N = B L``.
    """
    check_moments(mom, "attention_jacobians")
    N, d, k, o, v = mom.x.shape[0], mom.d_V, mom.d_K, mom.d_O, mom.d_v
    C = mom.B_V @ mom.W_K  # Ṽᵀ Σ_i W_K
    eye_o = torch.eye(o, dtype=mom.x.dtype, device=mom.x.device)
    W_O = eye_o if mom.W_O is None else mom.W_O
    out = {
        "Q": mom.kappa * torch.einsum("ia,imb->imab", mom.x, C).reshape(N * o, d * k),
        "K": mom.kappa * torch.einsum("ima,ib->imab", mom.B_V, mom.q).reshape(N * o, d * k),
        "V": torch.einsum("in,po->ionp", mom.M_1, W_O).reshape(N * o, d * v),
    }
    if mom.W_O is not None:
        out["O"] = torch.einsum("ip,or->iopr", mom.M_1 @ mom.W_V, eye_o).reshape(N * o, v * o)
    return out

