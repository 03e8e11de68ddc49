"""Structured (never materialised) norms, traces and diagonals against the dense closed form (itself vs autograd)."""

from __future__ import annotations

import pytest
import torch
from _helpers import DT

from energy._validation import EnergyInputError
from energy.hessian.attention import (
    attention_hessian,
    attention_moments,
    autograd_attention_ggn,
    autograd_attention_hessian,
    hessian_blocks,
)
from energy.hessian.structure import (
    BLOCK_NAMES,
    BLOCK_NAMES_O,
    block_diagonals,
    block_inner_products,
    block_norms,
    block_norms_from_moments,
    block_traces,
    hessian_frobenius_norms,
)

SHAPES = [(None, 5, 3, 4), (2, 4, 3, 5), (3, 5, 4, 2)]
VARIANTS = [{}, {"reduction": "mean"}, {"causal": True}, {"linear": True}]


def _problem(gen, B, L, d, k):
    lead = () if B is None else (B,)
    X = 0.8 * torch.randn(*lead, L, d, generator=gen, dtype=DT)
    Y = torch.randn(*lead, L, d, generator=gen, dtype=DT)
    return X, *(torch.randn(d, s, generator=gen, dtype=DT) for s in (k, k, d)), Y


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(b))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v) or "plain")
def test_block_norms_match_dense(gen, seed, variant):
    X, W_Q, W_K, W_V, Y = _problem(gen, *SHAPES[seed])
    mom = attention_moments(X, W_Q, W_K, W_V, Y, **variant)
    dense = {part: hessian_blocks(mom, part) for part in ("H", "H_o", "H_f")}
    norms = block_norms_from_moments(mom)
    sq = block_norms_from_moments(mom, squared=True)
    for name in BLOCK_NAMES:
        ab = (name[0], name[1])
        for part in ("H", "H_o", "H_f"):
            ref = float(dense[part][ab].norm())
            assert _rel(norms[(name, part)], ref) < 1e-12, (name, part)
            assert _rel(sq[(name, part)], ref**2) < 1e-11, (name, part)
        cross = float((dense["H_o"][ab] * dense["H_f"][ab]).sum())
        assert _rel(norms[(name, "cross")], cross) < 1e-11, name
    whole = hessian_frobenius_norms(mom)
    for part in ("H", "H_o", "H_f"):
        assert _rel(whole[part], float(attention_hessian(mom, part).norm())) < 1e-12


@pytest.mark.parametrize("variant", [{}, {"causal": True}, {"linear": True}], ids=["plain", "causal", "linear"])
def test_output_projection_structure(gen, seed, variant):
    X, W_Q, W_K, W_V, _ = _problem(gen, *SHAPES[seed])
    d_O = (2, 5, 3)[seed]
    W_O = torch.randn(X.shape[-1], d_O, generator=gen, dtype=DT)
    Y = torch.randn(*X.shape[:-1], d_O, generator=gen, dtype=DT)
    mom = attention_moments(X, W_Q, W_K, W_V, Y, W_O=W_O, **variant)
    norms = block_norms_from_moments(mom)
    assert {b for b, _ in norms} == set(BLOCK_NAMES) | set(BLOCK_NAMES_O)
    dense = {part: hessian_blocks(mom, part) for part in ("H", "H_o", "H_f")}
    for (name, part), value in norms.items():
        ab = (name[0], name[1])
        if part == "cross":
            assert _rel(value, float((dense["H_o"][ab] * dense["H_f"][ab]).sum())) < 1e-11, name
        else:
            assert _rel(value, float(dense[part][ab].norm())) < 1e-12, (name, part)
    for part in ("H", "H_o", "H_f"):
        H = attention_hessian(mom, part)
        assert _rel(hessian_frobenius_norms(mom)[part], float(H.norm())) < 1e-12
        diag = torch.cat([block_diagonals(mom, part)[p] for p in mom.params])
        torch.testing.assert_close(diag, H.diagonal(), rtol=1e-12, atol=1e-13)
        assert _rel(block_traces(mom, part)["total"], float(H.trace())) < 1e-12


def test_norms_match_autograd_directly(gen):
    """Closing the loop: structured norms vs torch.func.hessian (not only vs the dense closed form)."""
    X, W_Q, W_K, W_V, Y = _problem(gen, 2, 5, 3, 4)
    H = autograd_attention_hessian(X, W_Q, W_K, W_V, Y, causal=True)
    H_o = autograd_attention_ggn(X, W_Q, W_K, W_V, Y, causal=True)
    norms = block_norms(X, W_Q, W_K, W_V, Y, causal=True)
    sl = {"Q": slice(0, 12), "K": slice(12, 24), "V": slice(24, 33)}
    for name in BLOCK_NAMES:
        a, b = sl[name[0]], sl[name[1]]
        assert _rel(norms[(name, "H")], float(H[a, b].norm())) < 1e-10
        assert _rel(norms[(name, "H_o")], float(H_o[a, b].norm())) < 1e-10
        assert _rel(norms[(name, "H_f")], float((H - H_o)[a, b].norm())) < 1e-10


def test_traces_and_diagonals(gen, seed):
    X, W_Q, W_K, W_V, Y = _problem(gen, *SHAPES[seed])
    mom = attention_moments(X, W_Q, W_K, W_V, Y)
    for part in ("H", "H_o", "H_f"):
        H = hessian_blocks(mom, part)
        diags = block_diagonals(mom, part)
        traces = block_traces(mom, part)
        for a in "QKV":
            torch.testing.assert_close(diags[a], H[(a, a)].diagonal(), rtol=1e-12, atol=1e-13)
            assert _rel(traces[a + a], float(H[(a, a)].trace())) < 1e-12
        assert _rel(traces["total"], float(attention_hessian(mom, part).trace())) < 1e-12


def test_transposed_names_and_errors(gen):
    X, W_Q, W_K, W_V, Y = _problem(gen, None, 4, 3, 2)
    mom = attention_moments(X, W_Q, W_K, W_V, Y)
    assert block_inner_products(mom, "QV") == block_inner_products(mom, "VQ")
    with pytest.raises(EnergyInputError, match="block names"):
        block_inner_products(mom, "QO")  # no output projection in this layer
    with pytest.raises(EnergyInputError, match="block names"):
        block_inner_products(mom, "QX")
    with pytest.raises(EnergyInputError, match="part"):
        block_diagonals(mom, "GGN")


def test_linear_attention_diagonal_functional_blocks_vanish(gen):
    X, W_Q, W_K, W_V, Y = _problem(gen, 2, 5, 3, 4)
    norms = block_norms(X, W_Q, W_K, W_V, Y, linear=True)
    for name in ("QQ", "KK", "VV"):
        assert norms[(name, "H_f")] == 0.0
    assert norms[("QK", "H_f")] > 0.0  # the bilinear term survives (MATH §3.6)


def test_core_gram_chunking_and_definition(gen):
    """_core_gram equals the Gram of the explicitly formed factors U_bᵀ F_i V_b, whatever the chunk size."""
    from energy.hessian.structure import _core_gram

    B, L, r1, r2 = 3, 4, 5, 2
    F1, F2 = (torch.randn(B, L, L, L, generator=gen, dtype=DT) for _ in range(2))
    U1, U2 = (torch.randn(B, L, r1, generator=gen, dtype=DT) for _ in range(2))
    V1, V2 = (torch.randn(B, L, r2, generator=gen, dtype=DT) for _ in range(2))
    M1 = torch.einsum("bpr,bipq,bqs->birs", U1, F1, V1).reshape(B * L, -1)
    M2 = torch.einsum("bpr,bipq,bqs->birs", U2, F2, V2).reshape(B * L, -1)
    ref = M1 @ M2.T
    torch.testing.assert_close(_core_gram(F1, U1, V1, F2, U2, V2), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_core_gram(F1, U1, V1, F2, U2, V2, chunk=1), ref, rtol=1e-12, atol=1e-12)
