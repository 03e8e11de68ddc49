"""Multi-head self-attention Hessian (MATH §5.1) and rectangular values against torch.func in float64."""

from __future__ import annotations

import pytest
import torch
from _helpers import DT
from torch import nn
from torch.func import grad, hessian, vmap

from energy._validation import EnergyInputError
from energy.core.standard import multi_head_attention
from energy.hessian.attention import (
    AttentionLayer,
    attention_hessian,
    attention_jacobians,
    attention_moments,
    autograd_attention_ggn,
    autograd_attention_hessian,
    gradient_moments,
    hessian_block,
    hessian_blocks,
)
from energy.hessian.multihead import (
    MultiHeadAttentionLayer,
    multihead_functional_hessian,
    multihead_hessian,
    multihead_hessian_block,
    multihead_jacobian,
)
from energy.hessian.multihead_structure import (
    functional_bilinear,
    multihead_block_diagonals,
    multihead_block_inner_products,
    multihead_block_norms,
    multihead_block_traces,
)
from energy.hessian.structure import block_diagonals, block_norms_from_moments
from energy.hessian.twins import autograd_multihead_ggn, autograd_multihead_hessian
from unfold.standard import GPT2Config, SelfAttention

TOL = 1e-10


def _rel(A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Max error relative to ``max |scale|`` (default ``B``; a block is measured against its whole matrix)."""
    return float((A - B).abs().max()) / max(float((B if scale is None else scale).abs().max()), 1e-300)


def _padding_mask(gen: torch.Generator, B: int, L: int) -> torch.Tensor:
    """Random key padding per sequence (each query keeps at least itself... and key 0), ``(B, L, L)``."""
    keep = torch.rand(B, L, generator=gen) < 0.6
    keep[:, 0] = True
    return keep[:, None, :].expand(B, L, L).clone()


#: (H, H_kv, B, L, d, k, d_v, d_out, options): d_head != d / H, d_v != d_k, L = 1 included, GQA (4, 2).
CASES = [
    (1, 1, 2, 5, 4, 3, 2, 5, {}),
    (2, 2, 3, 5, 5, 3, 2, 4, {"causal": True}),
    (3, 3, None, 5, 4, 2, 3, 3, {"reduction": "mean"}),
    (2, 2, 2, 1, 3, 2, 4, 3, {}),
    (4, 2, 2, 4, 5, 2, 3, 4, {"causal": True}),
    (4, 2, 2, 5, 3, 2, 1, 2, {"padding": True, "c": 0.3}),
    (3, 1, 2, 3, 4, 3, 2, 3, {"linear": True, "scale": 0.4}),
]


def _case(gen: torch.Generator, case: tuple) -> tuple[MultiHeadAttentionLayer, torch.Tensor, torch.Tensor]:
    H, H_kv, B, L, d, k, v, o, opts = case
    opts = dict(opts)
    if opts.pop("padding", False):
        opts["mask"] = _padding_mask(gen, B, L)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen, dtype=DT)

    layer = MultiHeadAttentionLayer(r(H, d, k), r(H_kv, d, k), r(H_kv, d, v), r(H, v, o), **opts)
    lead = () if B is None else (B,)
    return layer, 0.8 * r(*lead, L, d), r(*lead, L, o)


def _ids(case: tuple) -> str:
    H, H_kv, B, L = case[:4]
    return f"H{H}kv{H_kv}-B{B}-L{L}-" + "-".join(case[8]) if case[8] else f"H{H}kv{H_kv}-B{B}-L{L}"


# ---------------------------------------------------------------------------------------------------------------
# rectangular values and the upstream gradient (single head)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_O", [False, True])
@pytest.mark.parametrize("variant", [{}, {"causal": True}, {"linear": True}], ids=["plain", "causal", "linear"])
def test_rectangular_values_match_autograd(gen, seed, with_O, variant):
    B, L, d, k, v, o = [(2, 4, 3, 2, 5, 4), (3, 1, 4, 3, 2, 5), (None, 5, 3, 4, 2, 2)][seed]
    lead = () if B is None else (B,)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    layer = AttentionLayer(r(d, k), r(d, k), r(d, v), r(v, o) if with_O else None, **variant)
    X, Y = 0.8 * r(*lead, L, d), r(*lead, L, o if with_O else v)
    H_ad, Ho_ad = autograd_attention_hessian(layer, X, Y), autograd_attention_ggn(layer, X, Y)
    mom = attention_moments(layer, X, Y)
    assert mom.sizes["V"] == d * v and (not with_O or mom.sizes["O"] == v * o)
    for part, ref in (("H", H_ad), ("H_o", Ho_ad), ("H_f", H_ad - Ho_ad)):
        assert _rel(attention_hessian(mom, part), ref) <= TOL
    J = torch.cat(list(attention_jacobians(mom).values()), dim=1)
    assert _rel(2.0 * mom.c * J.T @ J, Ho_ad) <= TOL
    blocks = hessian_blocks(mom, "H")
    norms = block_norms_from_moments(mom, squared=True)
    for a, b in mom.blocks:
        ref = float((blocks[(a, b)] ** 2).sum())
        assert abs(norms[(a + b, "H")] - ref) <= TOL * ref
    diags = block_diagonals(mom, "H")
    for a in mom.params:
        assert _rel(diags[a], blocks[(a, a)].diagonal()) <= TOL


def test_gradient_moments_contract_an_arbitrary_upstream_gradient(gen):
    """``H_f`` from :func:`gradient_moments` is ``Σ ⟨G, ∇²_θ F⟩`` for any ``G`` (not only ``2c(F − Y)``)."""
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    layer = AttentionLayer(r(4, 2), r(4, 2), r(4, 3), r(3, 5), causal=True)
    X, G = r(2, 3, 4), r(2, 3, 5)
    X3, _, mask = layer.check_inputs(X)
    theta = torch.cat([W.reshape(-1) for W in layer.weights])
    sizes = [W.numel() for W in layer.weights]

    def contracted(t: torch.Tensor) -> torch.Tensor:
        Ws = [w.reshape(W.shape) for w, W in zip(t.split(sizes), layer.weights)]
        return (G * layer.with_weights(*Ws).output(X, mask)).sum()

    ref = hessian(contracted)(theta)
    assert _rel(attention_hessian(gradient_moments(layer, X3, G, mask), "H_f"), ref) <= TOL


def test_functional_bilinear_matches_the_dense_blocks(gen):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    for linear in (False, True):
        layer = AttentionLayer(r(4, 3), r(4, 3), r(4, 2), r(2, 5), causal=True, linear=linear)
        mom = attention_moments(layer, r(2, 4, 4), r(2, 4, 5))
        shapes = {"Q": (4, 3), "K": (4, 3), "V": (4, 2), "O": (2, 5)}
        for a in "QKVO":
            for b in "QKVO":
                U, V = r(3, *shapes[a]), r(3, *shapes[b])
                val = functional_bilinear(mom, {a: U}, {b: V})
                ref = torch.einsum("rp,pq,rq->r", U.reshape(3, -1), hessian_block(mom, a, b, "H_f"), V.reshape(3, -1))
                assert _rel(val, ref) <= TOL, (linear, a, b)


# ---------------------------------------------------------------------------------------------------------------
# the multi-head layer: forward map, bookkeeping, fused weights, errors
# ---------------------------------------------------------------------------------------------------------------


def _stacked(layer: MultiHeadAttentionLayer) -> tuple[torch.Tensor, ...]:
    """Stacked ``(d, H·k)`` weights of the core's multi-head attention, K/V heads repeated over their groups."""
    rep = layer.group_size
    W_Q = layer.W_Q.transpose(0, 1).reshape(layer.d, -1)
    W_K = layer.W_K.repeat_interleave(rep, 0).transpose(0, 1).reshape(layer.d, -1)
    W_V = layer.W_V.repeat_interleave(rep, 0).transpose(0, 1).reshape(layer.d, -1)
    return W_Q, W_K, W_V, layer.W_O.reshape(-1, layer.d_out)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_output_matches_the_core_multi_head_attention(gen, case):
    layer, X, _ = _case(gen, case)
    W_Q, W_K, W_V, W_O = _stacked(layer)
    ref = multi_head_attention(X, X, W_Q, W_K, W_V, W_O, num_heads=layer.n_heads, scale=layer.scale,
                               mask=layer.mask, causal=layer.causal, linear=layer.linear)
    assert _rel(layer.output(X), ref) <= 1e-12
    if layer.group_size > 1:  # GQA equals ordinary multi-head attention with K/V heads repeated
        rep = MultiHeadAttentionLayer(layer.W_Q, layer.W_K.repeat_interleave(layer.group_size, 0),
                                      layer.W_V.repeat_interleave(layer.group_size, 0), layer.W_O,
                                      layer.scale, layer.mask, layer.causal, layer.linear)
        assert _rel(layer.output(X), rep.output(X)) <= 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_output_matches_torch_multihead_attention(gen, causal):
    E, H, B, L = 6, 3, 2, 5
    mha = nn.MultiheadAttention(E, H, bias=False, batch_first=True, dtype=DT)
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    W_q, W_k, W_v = mha.in_proj_weight.detach().chunk(3)  # q = x W_qᵀ, head h = rows h·E/H : (h+1)·E/H
    split = lambda W: W.T.reshape(E, H, E // H).transpose(0, 1)  # noqa: E731
    layer = MultiHeadAttentionLayer(split(W_q), split(W_k), split(W_v),
                                    mha.out_proj.weight.detach().T.reshape(H, E // H, E), causal=causal)
    X = torch.randn(B, L, E, generator=gen, dtype=DT)
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    ref, _ = mha(X, X, X, need_weights=False, attn_mask=~mask if causal else None)
    assert _rel(layer.output(X), ref.detach()) <= 1e-12


def test_param_bookkeeping(gen):
    layer, X, Y = _case(gen, CASES[4])  # GQA H = 4, H_kv = 2
    names = [n for n, _ in layer.param_blocks()]
    assert names == ["h0.Q", "h1.Q", "h2.Q", "h3.Q", "kv0.K", "kv1.K", "kv0.V", "kv1.V",
                     "h0.O", "h1.O", "h2.O", "h3.O"]
    theta = layer.flat()
    assert theta.numel() == layer.n_params == sum(r * s for _, (r, s) in layer.param_blocks())
    sp = layer.spans()
    assert torch.equal(theta[sp["kv1.V"]], layer.W_V[1].reshape(-1))
    assert torch.equal(theta[sp["h2.O"]], layer.W_O[2].reshape(-1))
    assert layer.users("kv1.K") == (2, 3) and layer.head_params(3) == ("h3.Q", "kv1.K", "kv1.V", "h3.O")
    other = layer.with_flat(2.0 * theta)
    assert torch.equal(other.W_K, 2.0 * layer.W_K) and torch.equal(other.flat(), 2.0 * theta)
    heads = layer.heads()
    assert len(heads) == 4 and heads[3].W_K is not None and torch.equal(heads[3].W_K, layer.W_K[1])
    assert _rel(layer.output(X), sum(h.output(X) for h in heads)) <= 1e-14


def test_from_fused_matches_a_manual_split(gen):
    d, e, H, d_out = 5, 6, 3, 4
    W_qkv = torch.randn(d, 3 * e, generator=gen, dtype=DT)
    W_proj = torch.randn(e, d_out, generator=gen, dtype=DT)
    layer = MultiHeadAttentionLayer.from_fused(W_qkv, W_proj, H, causal=True)
    dh = e // H
    for h in range(H):
        cols = slice(h * dh, (h + 1) * dh)
        assert torch.equal(layer.W_Q[h], W_qkv[:, :e][:, cols])
        assert torch.equal(layer.W_K[h], W_qkv[:, e:2 * e][:, cols])
        assert torch.equal(layer.W_V[h], W_qkv[:, 2 * e:][:, cols])
        assert torch.equal(layer.W_O[h], W_proj[cols])
    X = torch.randn(2, 4, d, generator=gen, dtype=DT)
    # GPT-2: q, k, v = (X @ c_attn).split(e), heads = contiguous column blocks, then c_proj
    ref = multi_head_attention(X, X, W_qkv[:, :e], W_qkv[:, e:2 * e], W_qkv[:, 2 * e:], W_proj, num_heads=H,
                               causal=True)
    assert _rel(layer.output(X), ref) <= 1e-12


def test_bad_inputs_name_the_argument(gen):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    ok = dict(W_Q=r(4, 5, 2), W_K=r(2, 5, 2), W_V=r(2, 5, 3), W_O=r(4, 3, 5))
    bad = [
        ({"W_K": r(3, 5, 2), "W_V": r(3, 5, 3)}, "W_K.*divide"),
        ({"W_K": r(2, 5, 3)}, "W_K"),
        ({"W_V": r(2, 4, 3)}, "W_V"),
        ({"W_V": r(1, 5, 3)}, "W_V"),
        ({"W_O": r(4, 2, 5)}, "W_O"),
        ({"W_O": r(3, 3, 5)}, "W_O"),
        ({"W_Q": r(5, 2)}, "W_Q"),
        ({"W_O": r(4, 3, 5).float()}, "dtype"),
    ]
    for change, match in bad:
        with pytest.raises(EnergyInputError, match=match):
            MultiHeadAttentionLayer(**{**ok, **change})
    for options, match in (({"scale": -1.0}, "scale"), ({"c": 0.0}, "`c`"), ({"reduction": "avg"}, "reduction"),
                           ({"mask": torch.ones(3, 3)}, "mask")):
        with pytest.raises(EnergyInputError, match=match):
            MultiHeadAttentionLayer(**ok, **options)
    with pytest.raises(EnergyInputError, match="n_heads"):
        MultiHeadAttentionLayer.from_fused(r(5, 18), r(6, 5), 4)
    with pytest.raises(EnergyInputError, match="W_qkv"):
        MultiHeadAttentionLayer.from_fused(r(5, 17), r(6, 5), 3)
    with pytest.raises(EnergyInputError, match="W_proj"):
        MultiHeadAttentionLayer.from_fused(r(5, 18), r(5, 5), 3)
    with pytest.raises(EnergyInputError, match="n_heads"):
        MultiHeadAttentionLayer.from_fused(r(5, 18), r(6, 5), 0)
    layer = MultiHeadAttentionLayer(**ok)
    with pytest.raises(EnergyInputError, match="`X`"):
        multihead_hessian(layer, r(2, 3, 4), r(2, 3, 5))
    with pytest.raises(EnergyInputError, match="`Y`"):
        multihead_hessian(layer, r(2, 3, 5), r(2, 3, 4))
    with pytest.raises(EnergyInputError, match="part"):
        multihead_hessian(layer, r(2, 3, 5), r(2, 3, 5), "GGN")  # type: ignore[arg-type]
    with pytest.raises(EnergyInputError, match="`a`"):
        multihead_hessian_block(layer, r(2, 3, 5), r(2, 3, 5), "h9.Q", "h0.Q")
    with pytest.raises(EnergyInputError, match="blocks"):
        multihead_block_norms(layer, r(2, 3, 5), r(2, 3, 5), [("kv0.Q", "h0.Q")])


# ---------------------------------------------------------------------------------------------------------------
# closed forms against the autograd twins
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_dense_parts_and_blocks_match_autograd(gen, case):
    layer, X, Y = _case(gen, case)
    H_ad, Ho_ad = autograd_multihead_hessian(layer, X, Y), autograd_multihead_ggn(layer, X, Y)
    refs = {"H": H_ad, "H_o": Ho_ad, "H_f": H_ad - Ho_ad}
    for part, ref in refs.items():
        assert _rel(multihead_hessian(layer, X, Y, part), ref) <= TOL, part
    sp = layer.spans()
    names = [n for n, _ in layer.param_blocks()]
    firsts = ("h0.Q", "kv0.K", "kv0.V", "h0.O")  # against every parameter: within-head, cross-head and GQA blocks
    for a, b in [(a, b) for a in firsts for b in names] + [(names[-1], "h0.Q")]:
        for part, ref in refs.items():
            blk = multihead_hessian_block(layer, X, Y, a, b, part)
            assert _rel(blk, ref[sp[a], sp[b]], ref) <= TOL, (a, b, part)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_jacobian_matches_autograd(gen, case):
    layer, X, _ = _case(gen, case)
    X3, _, mask = layer.check_inputs(X)
    ref = torch.func.jacrev(lambda t: layer.with_flat(t).output(X3, mask).reshape(-1))(layer.flat())
    assert _rel(multihead_jacobian(layer, X3, mask), ref) <= TOL


def test_one_head_is_the_single_head_closed_form(gen):
    layer, X, Y = _case(gen, CASES[0])
    head = layer.heads()[0]
    for part in ("H", "H_o", "H_f"):
        assert _rel(multihead_hessian(layer, X, Y, part), attention_hessian(attention_moments(head, X, Y), part)) <= TOL


@pytest.mark.parametrize("seed_", [0, 1])
def test_cross_head_blocks_are_pure_outer_product(seed_):
    """MATH §5.1: across heads ``H − GGN`` vanishes (autograd, MSE, two heads, all 16 Q/K/V/O pairs)."""
    gen = torch.Generator().manual_seed(10 + seed_)
    layer, X, Y = _case(gen, (2, 2, 2, 4, 5, 3, 2, 4, {}))
    H_ad, Ho_ad = autograd_multihead_hessian(layer, X, Y), autograd_multihead_ggn(layer, X, Y)
    sp = layer.spans()
    pairs = 0
    for a in layer.head_params(0):
        for b in layer.head_params(1):
            for x, y in ((a, b), (b, a)):
                # relative to the Hessian's largest entry (autograd roundoff of H and of the GGN)
                assert _rel(H_ad[sp[x], sp[y]], Ho_ad[sp[x], sp[y]], H_ad) <= 1e-14
                assert float(multihead_hessian_block(layer, X, Y, x, y, "H_f").abs().max()) == 0.0
            pairs += 1
    assert pairs == 16
    within = H_ad[sp["h0.Q"], sp["kv0.K"]] - Ho_ad[sp["h0.Q"], sp["kv0.K"]]
    assert _rel(within, torch.zeros_like(within), H_ad) > 1e-3  # within a head the functional part is there


# ---------------------------------------------------------------------------------------------------------------
# structured norms, traces and diagonals against the dense closed form
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_structured_norms_traces_diagonals_match_dense(gen, case):
    layer, X, Y = _case(gen, case)
    dense = {part: multihead_hessian(layer, X, Y, part) for part in ("H", "H_o", "H_f")}
    sp = layer.spans()
    norms = multihead_block_norms(layer, X, Y, squared=True)
    names = [n for n, _ in layer.param_blocks()]
    assert len(norms) == 4 * len(names) * (len(names) + 1) // 2
    for ((a, b), part), value in norms.items():
        blk = {p: dense[p][sp[a], sp[b]] for p in dense}
        scale = float((blk["H_o"] ** 2).sum() + (blk["H_f"] ** 2).sum())
        ref = float((blk["H_o"] * blk["H_f"]).sum()) if part == "cross" else float((blk[part] ** 2).sum())
        assert abs(value - ref) <= TOL * scale, (a, b, part, value, ref)
    plain = multihead_block_norms(layer, X, Y, [(names[-1], names[0])])
    assert abs(plain[((names[-1], names[0]), "H")] - float(dense["H"][sp[names[-1]], sp[names[0]]].norm())) <= \
        TOL * float(dense["H"].norm())
    for part in ("H", "H_o", "H_f"):
        diags = multihead_block_diagonals(layer, X, Y, part)
        traces = multihead_block_traces(layer, X, Y, part)
        for name in names:
            ref = dense[part][sp[name], sp[name]].diagonal()
            assert _rel(diags[name], ref, dense[part].diagonal()) <= TOL, (name, part)
            assert abs(traces[name] - float(ref.sum())) <= TOL * float(ref.abs().sum())
        assert abs(traces["total"] - float(dense[part].trace())) <= TOL * float(dense[part].diagonal().abs().sum())


def test_inner_products_across_heads_are_pure_outer(gen):
    layer, X, Y = _case(gen, CASES[4])
    ip = multihead_block_inner_products(layer, X, Y, [("h0.Q", "h3.O"), ("kv0.V", "kv1.K")])
    for value in ip.values():
        assert value["of"] == 0.0 and value["ff"] == 0.0 and value["oo"] > 0.0


# ---------------------------------------------------------------------------------------------------------------
# purity: torch.func transforms through the pure closed forms
# ---------------------------------------------------------------------------------------------------------------


def test_vmap_and_grad_through_the_pure_closed_forms(gen):
    layer, _, _ = _case(gen, CASES[4])
    Xs = 0.8 * torch.randn(3, 2, 4, layer.d, generator=gen, dtype=DT)
    Gs = torch.randn(3, 2, 4, layer.d_out, generator=gen, dtype=DT)
    _, _, mask = layer.check_inputs(Xs[0])
    jac = vmap(lambda X: multihead_jacobian(layer, X, mask))(Xs)
    fun = vmap(lambda X, G: multihead_functional_hessian(layer, X, G, mask))(Xs, Gs)
    for i in range(3):
        assert _rel(jac[i], multihead_jacobian(layer, Xs[i], mask)) <= 1e-13
        assert _rel(fun[i], multihead_functional_hessian(layer, Xs[i], Gs[i], mask)) <= 1e-13
    # grad of a scalar of H_f w.r.t. the weights, against the same through a Python loop of single-head forms
    theta = layer.flat()
    w = torch.randn(layer.n_params, generator=gen, dtype=DT)

    def through_multihead(t: torch.Tensor) -> torch.Tensor:
        return w @ multihead_functional_hessian(layer.with_flat(t), Xs[0], Gs[0], mask) @ w

    def through_loop(t: torch.Tensor) -> torch.Tensor:
        lay, total = layer.with_flat(t), t.new_zeros(())
        for h, head in enumerate(lay.heads()):
            idx = torch.cat([torch.arange(lay.spans()[n].start, lay.spans()[n].stop) for n in lay.head_params(h)])
            Hh = attention_hessian(gradient_moments(head, Xs[0], Gs[0], mask), "H_f")
            total = total + w[idx] @ Hh @ w[idx]
        return total

    assert _rel(grad(through_multihead)(theta), grad(through_loop)(theta)) <= 1e-12
    Jg = grad(lambda t: (multihead_jacobian(layer.with_flat(t), Xs[0], mask) ** 2).sum())(theta)
    h = 1e-6
    v = torch.randn(theta.shape, generator=gen, dtype=DT)
    f = lambda t: (multihead_jacobian(layer.with_flat(t), Xs[0], mask) ** 2).sum()  # noqa: E731
    fd = (f(theta + h * v) - f(theta - h * v)) / (2 * h)
    assert abs(float(Jg @ v) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))


def test_fused_weights_are_a_reindexing_of_the_blocks(gen):
    """MATH §5.1: the Hessian in GPT-2's fused ``(c_attn, c_proj)`` is the multi-head Hessian, permuted."""
    d, e, H, B, L = 4, 6, 3, 2, 4
    W_qkv = torch.randn(d, 3 * e, generator=gen, dtype=DT)
    W_proj = torch.randn(e, d, generator=gen, dtype=DT)
    X, Y = torch.randn(B, L, d, generator=gen, dtype=DT), torch.randn(B, L, d, generator=gen, dtype=DT)
    layer = MultiHeadAttentionLayer.from_fused(W_qkv, W_proj, H, causal=True)
    # the fused position of every entry of θ: from_fused applied to the positions themselves
    pos = torch.arange(W_qkv.numel() + W_proj.numel(), dtype=DT)
    where = MultiHeadAttentionLayer.from_fused(pos[:W_qkv.numel()].reshape(d, 3 * e),
                                               pos[W_qkv.numel():].reshape(e, d), H).flat().long()
    assert torch.equal(where.sort().values, torch.arange(pos.numel()))

    def fused_loss(t: torch.Tensor) -> torch.Tensor:
        Wq, Wp = t[:W_qkv.numel()].reshape(d, 3 * e), t[W_qkv.numel():].reshape(e, d)
        F = multi_head_attention(X, X, Wq[:, :e], Wq[:, e:2 * e], Wq[:, 2 * e:], Wp, num_heads=H, causal=True)
        return layer.loss_constant(X) * ((F - Y) ** 2).sum()

    H_fused = hessian(fused_loss)(torch.cat([W_qkv.reshape(-1), W_proj.reshape(-1)]))
    assert _rel(multihead_hessian(layer, X, Y), H_fused[where][:, where]) <= TOL


def test_from_fused_is_the_library_self_attention(gen):
    module = SelfAttention(GPT2Config(d_model=5, n_layers=1, n_heads=2, d_head=3, seq_len=4)).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    W_qkv = torch.cat([module.W_Q, module.W_K, module.W_V], dim=1).detach()
    layer = MultiHeadAttentionLayer.from_fused(W_qkv, module.W_O.detach(), 2, causal=True)
    X = torch.randn(3, 4, 5, generator=gen, dtype=DT)
    assert layer.d_k == 3 and _rel(layer.output(X), module(X).detach()) <= 1e-12
