"""Input-side derivatives of one attention head (docs/MATH.md §5.3a) against torch.func in float64.

The closed forms (``head_input_jacobian``, ``head_input_hessian``, ``head_input_param_hessian``) are compared with
their autograd twins (``torch.func`` of ``AttentionLayer.output``) and, summed over heads, with autograd on the
core's ``multi_head_attention``: odd shapes (``L ∈ {1, 4, 5}``, ``d ≠ d_K``, ``d_out ≠ d``, several sequences),
causal and padding masks, with and without ``W_O``, given and default scale, softmax and linear attention.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _helpers import randn
from torch import Tensor
from torch.func import grad, hessian, jacrev, vmap

from energy.core.standard import multi_head_attention
from energy.hessian.attention_input import (
    autograd_head_input_hessian,
    autograd_head_input_jacobian,
    autograd_head_input_param_hessian,
    head_input_hessian,
    head_input_jacobian,
    head_input_param_hessian,
)
from energy.hessian.attention_layer import AttentionLayer

TOL = 1e-10

#: (B, L, d, d_K, d_O) per seed: L = 5, 1, 4; d ≠ d_K; d_O ≠ d (used with an output projection).
SHAPES = [(2, 5, 4, 3, 6), (3, 1, 3, 5, 2), (2, 4, 5, 2, 3)]
VARIANTS: list[dict[str, Any]] = [
    {},
    {"causal": True},
    {"padding": True},
    {"scale": 0.3},
    {"linear": True},
    {"linear": True, "causal": True},
    {"linear": True, "padding": True, "scale": 0.6},
]


def _id(v: dict[str, Any]) -> str:
    return "-".join(f"{a}={b}" for a, b in v.items()) or "plain"


def _close(A: Tensor, B: Tensor) -> float:
    """Assert ``max|A − B| ≤ TOL · max(1, max|B|)``; return the relative error."""
    assert A.shape == B.shape, (A.shape, B.shape)
    scale = max(1.0, float(B.abs().max()))
    err = float((A - B).abs().max()) / scale
    assert err <= TOL, f"relative error {err:.3e} (scale {scale:.2e})"
    return err


def _padding_mask(gen: torch.Generator, B: int, L: int) -> Tensor:
    """Key padding: sequence ``b`` has ``n_b ∈ [1, L]`` valid tokens, every query attends to those keys."""
    n = torch.randint(1, L + 1, (B,), generator=gen)
    n[0] = max(1, L - 1)  # at least one sequence really padded when L > 1
    keep = torch.arange(L).unsqueeze(0) < n.unsqueeze(1)  # (B, L)
    return keep.unsqueeze(1).expand(B, L, L).clone()


def _case(gen: torch.Generator, shape: tuple[int, ...], variant: dict[str, Any], with_O: bool):
    """``(layer, U3, mask, G)`` with the resolved mask of :meth:`AttentionLayer.check_inputs`."""
    B, L, d, k, o = shape
    W_Q, W_K, W_V = randn(d, k, gen=gen), randn(d, k, gen=gen), randn(d, d, gen=gen)
    W_O = randn(d, o, gen=gen) if with_O else None
    options = {a: b for a, b in variant.items() if a != "padding"}
    if variant.get("padding"):
        options["mask"] = _padding_mask(gen, B, L)
    layer = AttentionLayer(W_Q, W_K, W_V, W_O, **options)
    U3, _, mask = layer.check_inputs(0.8 * randn(B, L, d, gen=gen))
    G = randn(B, L, layer.d_out, gen=gen)
    return layer, U3, mask, G


@pytest.mark.parametrize("with_O", [False, True], ids=["no_W_O", "W_O"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_head_input_derivatives_match_autograd(gen, seed, variant, with_O):
    shape = SHAPES[seed]
    layer, U3, mask, G = _case(gen, shape, variant, with_O)
    B, L, d, k, _ = shape
    o = layer.d_out

    J = head_input_jacobian(layer, U3, mask)
    assert J.shape == (B, L * o, L * d)
    _close(J, autograd_head_input_jacobian(layer, U3, mask))

    H = head_input_hessian(layer, U3, mask, G)
    assert H.shape == (B, L * d, L * d)
    _close(H, autograd_head_input_hessian(layer, U3, mask, G))

    P = head_input_param_hessian(layer, U3, mask, G)
    P_ad = autograd_head_input_param_hessian(layer, U3, mask, G)
    sizes = {"Q": d * k, "K": d * k, "V": d * d} | ({"O": d * o} if with_O else {})
    assert set(P) == set(P_ad) == set(sizes)
    for name, size in sizes.items():
        assert P[name].shape == (B, L * d, size)
        _close(P[name], P_ad[name])


@pytest.mark.parametrize("linear", [False, True], ids=["softmax", "linear"])
def test_head_input_hessian_is_symmetric_and_the_derivative_of_the_jacobian(gen, seed, linear):
    """``H`` is symmetric, and equals autograd's Jacobian (in ``U``) of the closed-form ``Jᵀ vec G``; the
    mixed blocks equal autograd's Jacobian in the weights of the same product (a second, independent route that
    also runs ``jacrev`` through the closed forms).
    """
    layer, U3, mask, G = _case(gen, SHAPES[seed], {"linear": linear, "causal": seed == 1}, with_O=True)
    B, L, d = U3.shape
    H = head_input_hessian(layer, U3, mask, G)
    _close(H, H.transpose(-1, -2))
    assert float(H.abs().max()) > 0

    def grad_u(U: Tensor, weights: tuple[Tensor, ...]) -> Tensor:  # ∇_U ⟨G, F⟩ = Jᵀ vec G, per sequence
        J = head_input_jacobian(layer.with_weights(*weights), U, mask)
        return torch.einsum("bn,bnm->bm", G.reshape(B, -1), J)

    H_J = jacrev(grad_u)(U3, layer.weights)  # (B, Ld, B, L, d): block-diagonal across sequences
    _close(H, torch.stack([H_J[b, :, b].reshape(L * d, L * d) for b in range(B)]))
    P = head_input_param_hessian(layer, U3, mask, G)
    P_J = jacrev(grad_u, argnums=1)(U3, layer.weights)
    for name, block in zip(("Q", "K", "V", "O"), P_J):
        _close(P[name], block.reshape(B, L * d, -1))


def _split(W: Tensor, h: int, heads: int, rows: bool = False) -> Tensor:
    """Head ``h``'s columns (rows for ``W_O``) of a head-major fused weight."""
    n = (W.shape[0] if rows else W.shape[1]) // heads
    return W[h * n:(h + 1) * n] if rows else W[:, h * n:(h + 1) * n]


MHA_VARIANTS: list[dict[str, Any]] = [{}, {"causal": True}, {"padding": True, "scale": 0.7}, {"linear": True},
                                      {"linear": True, "causal": True}]


@pytest.mark.parametrize("variant", MHA_VARIANTS, ids=_id)
def test_heads_sum_to_multi_head_attention(gen, seed, variant):
    """MATH §5.1: ``F = Σ_h F_h``, so the input Jacobian and Hessian of a 2-head layer are the sums of the heads',
    and each head's mixed blocks are the slices of the layer's (autograd on ``energy.core.standard``).
    """
    heads = 2
    B, L, d, k, o = SHAPES[seed]
    W_Q, W_K = randn(d, heads * k, gen=gen), randn(d, heads * k, gen=gen)
    W_V, W_O = randn(d, heads * d, gen=gen), randn(heads * d, o, gen=gen)
    scale, linear = variant.get("scale"), variant.get("linear", False)
    mask = None
    if variant.get("causal"):
        mask = torch.ones(L, L, dtype=torch.bool).tril().expand(B, L, L)
    elif variant.get("padding"):
        mask = _padding_mask(gen, B, L)
    U3, G = 0.8 * randn(B, L, d, gen=gen), randn(B, L, o, gen=gen)
    layers = [AttentionLayer(_split(W_Q, h, heads), _split(W_K, h, heads), _split(W_V, h, heads),
                             _split(W_O, h, heads, rows=True), scale=scale, linear=linear) for h in range(heads)]
    J = sum(head_input_jacobian(lay, U3, mask) for lay in layers)
    H = sum(head_input_hessian(lay, U3, mask, G) for lay in layers)
    P = [head_input_param_hessian(lay, U3, mask, G) for lay in layers]
    weights = (W_Q, W_K, W_V, W_O)
    for b in range(B):
        m = None if mask is None else mask[b]

        def mha(u: Tensor, ws: tuple[Tensor, ...] = weights, m: Tensor | None = m) -> Tensor:
            return multi_head_attention(u, u, *ws, num_heads=heads, scale=scale, mask=m, linear=linear)

        def s(u: Tensor, ws: tuple[Tensor, ...], g: Tensor = G[b], f: Any = mha) -> Tensor:
            return (g * f(u, ws)).sum()

        _close(J[b], jacrev(lambda u, f=mha: f(u).reshape(-1))(U3[b]).reshape(L * o, L * d))
        _close(H[b], hessian(s)(U3[b], weights).reshape(L * d, L * d))
        mixed = jacrev(grad(s), argnums=1)(U3[b], weights)  # (L, d, *W.shape) per weight
        for h in range(heads):
            _close(P[h]["Q"][b], mixed[0].reshape(L, d, d, heads, k)[:, :, :, h].reshape(L * d, d * k))
            _close(P[h]["K"][b], mixed[1].reshape(L, d, d, heads, k)[:, :, :, h].reshape(L * d, d * k))
            _close(P[h]["V"][b], mixed[2].reshape(L, d, d, heads, d)[:, :, :, h].reshape(L * d, d * d))
            _close(P[h]["O"][b], mixed[3].reshape(L, d, heads, d, o)[:, :, h].reshape(L * d, d * o))


@pytest.mark.parametrize("linear", [False, True], ids=["softmax", "linear"])
def test_rectangular_value_weight(gen, seed, linear):
    """``W_V`` ``(d, d_v)`` with ``d_v ≠ d`` (with and without ``W_O``): the closed forms read only the weights, so a
    plain namespace stands in for the layer until :class:`AttentionLayer` accepts a rectangular ``W_V``; the
    reference is autograd on the core's one-head ``multi_head_attention``.
    """
    B, L, d, k, o = SHAPES[seed]
    d_v = d + 2
    W_Q, W_K, W_V = randn(d, k, gen=gen), randn(d, k, gen=gen), randn(d, d_v, gen=gen)
    U3 = 0.8 * randn(B, L, d, gen=gen)
    for W_O in (None, randn(d_v, o, gen=gen)):
        layer: Any = SimpleNamespace(W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, kappa=k**-0.5, linear=linear)
        weights = (W_Q, W_K, W_V) if W_O is None else (W_Q, W_K, W_V, W_O)
        G = randn(B, L, d_v if W_O is None else o, gen=gen)
        J, H = head_input_jacobian(layer, U3, None), head_input_hessian(layer, U3, None, G)
        P = head_input_param_hessian(layer, U3, None, G)

        def f(u: Tensor, ws: tuple[Tensor, ...]) -> Tensor:
            W_O_ = ws[3] if len(ws) > 3 else None
            return multi_head_attention(u, u, ws[0], ws[1], ws[2], W_O_, num_heads=1, linear=linear)

        for b in range(B):

            def s(u: Tensor, ws: tuple[Tensor, ...], g: Tensor = G[b]) -> Tensor:
                return (g * f(u, ws)).sum()

            _close(J[b], jacrev(lambda u, ws=weights: f(u, ws).reshape(-1))(U3[b]).reshape(J.shape[1:]))
            _close(H[b], hessian(s)(U3[b], weights).reshape(L * d, L * d))
            mixed = jacrev(grad(s), argnums=1)(U3[b], weights)
            for name, block in zip(("Q", "K", "V", "O"), mixed):
                _close(P[name][b], block.reshape(L * d, -1))


@pytest.mark.filterwarnings("error")  # includes functorch's "no batching rule" fallback warning
def test_closed_forms_are_pure_under_vmap(gen, seed):
    """``vmap`` over a stack of problems (inputs, upstream gradients) equals the loop, with a batching rule for every
    operation; the Hessian is linear in ``G`` (the stack holds ``G``, ``−2G`` and a fresh draw).
    """
    layer, U3, mask, G = _case(gen, SHAPES[seed], {"causal": True}, with_O=True)
    Us = torch.stack([U3, U3, 0.5 * U3 + 0.1])
    Gs = torch.stack([G, -2 * G, randn(*G.shape, gen=gen)])
    J_v = vmap(lambda U: head_input_jacobian(layer, U, mask))(Us)
    H_v = vmap(lambda U, g: head_input_hessian(layer, U, mask, g))(Us, Gs)
    P_v = vmap(lambda U, g: head_input_param_hessian(layer, U, mask, g))(Us, Gs)
    for t in range(3):
        _close(J_v[t], head_input_jacobian(layer, Us[t], mask))
        _close(H_v[t], head_input_hessian(layer, Us[t], mask, Gs[t]))
        P = head_input_param_hessian(layer, Us[t], mask, Gs[t])
        for name in P:
            _close(P_v[name][t], P[name])
    _close(H_v[1], -2 * H_v[0])
