"""Exact per-head block norms at scale (energy.hessian.head_norms) against the dense autograd Hessian of a head in a
multi-head layer and against energy.hessian.structure.block_norms (single head, square W_V), float64."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import DT
from torch import Tensor
from torch.func import hessian, jacrev, vmap

from energy._validation import EnergyInputError
from energy.hessian.attention import attention_moments
from energy.hessian.head_norms import (
    HEAD_BLOCKS,
    head_block_norms,
    head_inner_products,
    head_output,
    vech,
)
from energy.hessian.structure import block_norms

# (B, L, d, k, d_v, d_out): d ≠ k ≠ d_v, d_out > d_v and d_out < d_v (rank-deficient Ω = W_OW_Oᵀ), L = 1 included
SHAPES = [(2, 5, 5, 3, 4, 6), (3, 7, 6, 4, 3, 2), (2, 1, 5, 2, 3, 4), (None, 7, 4, 3, 2, 5)]


def _head(gen: torch.Generator, B: int | None, L: int, d: int, k: int, dv: int, do: int) -> dict[str, Tensor]:
    lead = () if B is None else (B,)
    return {
        "X": 0.9 * torch.randn(*lead, L, d, generator=gen, dtype=DT),
        "W_Q": torch.randn(d, k, generator=gen, dtype=DT),
        "W_K": torch.randn(d, k, generator=gen, dtype=DT),
        "W_V": torch.randn(d, dv, generator=gen, dtype=DT),
        "W_O": torch.randn(dv, do, generator=gen, dtype=DT),
        "F_rest": torch.randn(*lead, L, do, generator=gen, dtype=DT),  # the other heads' output
        "Y": torch.randn(*lead, L, do, generator=gen, dtype=DT),
    }


def _dense_blocks(p: dict[str, Tensor], c: float, scale: float | None, causal: bool) -> dict[str, dict[str, Tensor]]:
    """Blocks of the dense autograd ``H``, ``H_o = 2c JᵀJ`` and ``H_f = H − H_o`` of the loss
    ``c Σ‖F_h(θ) + F_rest − Y‖²`` in the head's flat parameters ``θ = (W_Q, W_K, W_V, W_O)``."""
    X = p["X"] if p["X"].ndim == 3 else p["X"][None]
    F_rest, Y = p["F_rest"].reshape(X.shape[0], X.shape[1], -1), p["Y"].reshape(X.shape[0], X.shape[1], -1)
    names = ("W_Q", "W_K", "W_V", "W_O")
    shapes = [p[n].shape for n in names]
    sizes = [s[0] * s[1] for s in shapes]
    theta = torch.cat([p[n].reshape(-1) for n in names])
    kappa = 1.0 / math.sqrt(p["W_Q"].shape[1]) if scale is None else scale

    def out(t: Tensor) -> Tensor:
        W_Q, W_K, W_V, W_O = (w.reshape(s) for w, s in zip(t.split(sizes), shapes))
        return head_output(X, W_Q, W_K, W_V, W_O, kappa, causal)

    def loss(t: Tensor) -> Tensor:
        return c * ((out(t) + F_rest - Y) ** 2).sum()

    H = hessian(loss)(theta)
    J = jacrev(lambda t: out(t).reshape(-1))(theta)
    Ho = 2.0 * c * J.T @ J
    edges = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    out_blocks = {}
    for name, a in zip(HEAD_BLOCKS, (0, 1, 2, 3)):
        s = slice(edges[a], edges[a + 1])
        out_blocks[name] = {"H": H[s, s], "H_o": Ho[s, s], "H_f": (H - Ho)[s, s]}
    return out_blocks


def _residual(p: dict[str, Tensor], c: float, scale: float | None, causal: bool) -> Tensor:
    """``G = 2c(F_h + F_rest − Y)``, the whole layer's residual."""
    X = p["X"] if p["X"].ndim == 3 else p["X"][None]
    kappa = 1.0 / math.sqrt(p["W_Q"].shape[1]) if scale is None else scale
    F = head_output(X, p["W_Q"], p["W_K"], p["W_V"], p["W_O"], kappa, causal).reshape(p["F_rest"].shape)
    return 2.0 * c * (F + p["F_rest"] - p["Y"])


def _check(ours: dict[tuple[str, str], float], dense: dict[str, dict[str, Tensor]], blocks=HEAD_BLOCKS) -> None:
    for name in blocks:
        ref = {part: float((dense[name][part] ** 2).sum()) for part in ("H", "H_o", "H_f")}
        cross = float((dense[name]["H_o"] * dense[name]["H_f"]).sum())
        if name in ("VV", "OO"):  # pure outer product: autograd's H − H_o is rounding noise, ours exactly 0
            assert ref["H_f"] <= 1e-24 * ref["H_o"] and ours[(name, "H_f")] == 0.0 and ours[(name, "cross")] == 0.0
            ref.pop("H_f")
            cross = 0.0
        for part, value in ref.items():
            assert abs(ours[(name, part)] - value) <= 1e-10 * value + 1e-300, (name, part, ours[(name, part)], value)
        scale = math.sqrt(ref["H_o"] * ref.get("H_f", 0.0)) + 1e-300
        got = ours[(name, "cross")]
        assert abs(got - cross) <= 1e-10 * max(scale, abs(cross)), (name, got, cross)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-L{}-d{}-k{}-v{}-o{}".format(*s))
def test_head_norms_match_autograd(gen, seed, shape, causal):
    p = _head(gen, *shape)
    c, scale = 0.37, (None, 0.8, 1.3)[seed]
    dense = _dense_blocks(p, c, scale, causal)
    G = _residual(p, c, scale, causal)
    args = (p["X"], p["W_Q"], p["W_K"], p["W_V"], p["W_O"], G)
    for chunk, tile in ((2048, 64), (3, 2), (1, 1)):  # one chunk/tile, and several (tiles of unequal size)
        ours = head_block_norms(*args, c=c, scale=scale, causal=causal, chunk=chunk, tile=tile, squared=True)
        _check(ours, dense)
    # H_f is not zero for (Q, Q) and (K, K) (L > 1): the test exercises the functional part and the cross term;
    # with L = 1 the softmax is constant and both blocks vanish (checked above: ours are 0 as well)
    assert shape[1] == 1 or min(float((dense[n]["H_f"] ** 2).sum()) for n in ("QQ", "KK")) > 1e-6


def test_norms_are_square_roots(gen):
    p = _head(gen, *SHAPES[0])
    G = _residual(p, 0.5, None, True)
    args = (p["X"], p["W_Q"], p["W_K"], p["W_V"], p["W_O"], G)
    sq = head_block_norms(*args, c=0.5, causal=True, squared=True)
    nm = head_block_norms(*args, c=0.5, causal=True, blocks=("KK", "QQ"))
    for name in ("QQ", "KK"):
        for part in ("H", "H_o", "H_f"):
            assert nm[(name, part)] == pytest.approx(math.sqrt(sq[(name, part)]), rel=1e-14)
        assert nm[(name, "cross")] == pytest.approx(sq[(name, "cross")], rel=1e-14)
    assert set(nm) == {(n, q) for n in ("QQ", "KK") for q in ("H", "H_o", "H_f", "cross")}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_structure_block_norms(gen, seed, causal):
    """Single head (no other heads, G = 2c(F − Y)), square W_V: the O(B²L⁴) token-space norms of structure.py."""
    B, L, d, k, do = ((2, 5, 4, 3, 6), (3, 4, 5, 2, 3), (1, 1, 3, 2, 4))[seed]
    X = torch.randn(B, L, d, generator=gen, dtype=DT)
    W_Q, W_K = (torch.randn(d, k, generator=gen, dtype=DT) for _ in range(2))
    W_V = torch.randn(d, d, generator=gen, dtype=DT)
    W_O = torch.randn(d, do, generator=gen, dtype=DT)
    Y = torch.randn(B, L, do, generator=gen, dtype=DT)
    c = 0.21
    ref = block_norms(X, W_Q, W_K, W_V, Y, W_O=W_O, c=c, causal=causal, blocks=list(HEAD_BLOCKS), squared=True)
    G = attention_moments(X, W_Q, W_K, W_V, Y, W_O=W_O, c=c, causal=causal).G.reshape(B, L, do)
    ours = head_block_norms(X, W_Q, W_K, W_V, W_O, G, c=c, causal=causal, squared=True, tile=2, chunk=2)
    for key, value in ref.items():
        tol = 1e-10 * max(abs(value), math.sqrt(ref[(key[0], "H_o")] * ref[(key[0], "H_f")]))
        assert abs(ours[key] - value) <= tol + 1e-300, (key, ours[key], value)


def test_vech_inner_product(gen):
    S1, S2 = (torch.randn(3, 5, 5, generator=gen, dtype=DT) for _ in range(2))
    S1, S2 = S1 + S1.transpose(1, 2), S2 + S2.transpose(1, 2)
    assert vech(S1).shape == (3, 15)
    torch.testing.assert_close((vech(S1) * vech(S2)).sum(-1), (S1 * S2).sum((1, 2)), rtol=1e-14, atol=0)


def test_inner_products_under_vmap(gen):
    """The pure core passes through vmap: a batch of residuals G gives the loop's values."""
    p = _head(gen, *SHAPES[0])
    Gs = torch.stack([_residual(p, 0.3, None, False), torch.randn(p["Y"].shape, generator=gen, dtype=DT)])

    def f(G: Tensor) -> Tensor:
        ips = head_inner_products(p["X"], p["W_Q"], p["W_K"], p["W_V"], p["W_O"], G, c=0.3, kappa=0.6, causal=False,
                                  chunk=4, tile=2)
        return torch.stack([torch.stack(ips[n]) for n in HEAD_BLOCKS])

    torch.testing.assert_close(vmap(f)(Gs), torch.stack([f(G) for G in Gs]), rtol=1e-12, atol=0)


def test_bad_inputs(gen):
    p = _head(gen, *SHAPES[0])
    G = _residual(p, 1.0, None, False)
    X, W_Q, W_K, W_V, W_O = p["X"], p["W_Q"], p["W_K"], p["W_V"], p["W_O"]
    with pytest.raises(EnergyInputError, match="W_O"):
        head_block_norms(X, W_Q, W_K, W_V, W_O.T, G, c=1.0)
    with pytest.raises(EnergyInputError, match="`G`"):
        head_block_norms(X, W_Q, W_K, W_V, W_O, G[..., :-1], c=1.0)
    with pytest.raises(EnergyInputError, match="structure.block_norms"):
        head_block_norms(X, W_Q, W_K, W_V, W_O, G, c=1.0, blocks=("QK",))
    with pytest.raises(EnergyInputError, match="`c`"):
        head_block_norms(X, W_Q, W_K, W_V, W_O, G, c=0.0)
    with pytest.raises(EnergyInputError, match="`chunk`"):
        head_block_norms(X, W_Q, W_K, W_V, W_O, G, c=1.0, chunk=0)
    with pytest.raises(EnergyInputError, match="`W_K`"):
        head_block_norms(X, W_Q, W_K[:, :-1], W_V, W_O, G, c=1.0)
    with pytest.raises(EnergyInputError, match="`blocks`"):
        head_block_norms(X, W_Q, W_K, W_V, W_O, G, c=1.0, blocks="QQ")
