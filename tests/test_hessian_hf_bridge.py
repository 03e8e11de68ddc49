"""The closed-form block Hessian on a real Hugging Face GPT-2 layer (MATH §5.3; issue #11 item 4).

Tiny float64 GPT-2 models built offline (n_embd 8, 2–4 heads, 1–2 layers, d_ff 6 or 4d); the LayerNorm and MLP
parameters are perturbed away from Hugging Face's init (γ = 1, biases 0) so that a mix-up of the two LayerNorms or of
a bias would show. The reference is the Hugging Face ``GPT2Block`` itself, wrapped as a module of its captured input
(:class:`GPT2BlockModule`), through the matrix-free operators of :mod:`energy.hessian.curvature_operators`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import DT

from energy._validation import EnergyInputError
from energy.hessian.block import block_hessian, block_hessian_parts
from energy.hessian.curvature_operators import HessianOperator

pytest.importorskip("transformers")

from energy.hessian import hf  # noqa: E402
from energy.hessian.hf_bridge import (  # noqa: E402
    GPT2BlockModule,
    block_from_gpt2,
    capture_block_input,
    gpt2_block_parameter_map,
)

TOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _model(seed: int = 0, *, n_head: int = 2, n_layer: int = 2, n_inner: int | None = 6, b_K: bool = True,
           attn_implementation: str = "eager", config: dict | None = None, **biases: bool):
    """A tiny GPT-2 with perturbed LayerNorm / MLP parameters; the attention biases named in ``biases`` (``b_Q``,
    ``b_V``, ``b_O``) nonzero, the others zero; ``b_K`` nonzero unless told (it is exactly irrelevant).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.build_model("gpt2-tiny", seed=seed, n_embd=8, n_head=n_head, n_layer=n_layer, n_inner=n_inner,
                               vocab_size=13, n_positions=8, initializer_range=0.4,
                               attn_implementation=attn_implementation, **(config or {}))
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for blk in model.transformer.h:
            for p in (blk.ln_1.weight, blk.ln_1.bias, blk.ln_2.weight, blk.ln_2.bias, blk.mlp.c_fc.bias,
                      blk.mlp.c_proj.bias):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
            d = blk.attn.embed_dim
            on = {"b_Q": biases.get("b_Q", False), "b_K": b_K, "b_V": biases.get("b_V", False)}
            for i, role in enumerate(("b_Q", "b_K", "b_V")):
                part = blk.attn.c_attn.bias[i * d:(i + 1) * d]
                part.copy_(0.5 * torch.randn(d, generator=g, dtype=DT) if on[role] else torch.zeros(d, dtype=DT))
            blk.attn.c_proj.bias.copy_(0.5 * torch.randn(d, generator=g, dtype=DT) if biases.get("b_O", False)
                                       else torch.zeros(d, dtype=DT))
    return model


def _ids(seed: int, B: int, L: int) -> torch.Tensor:
    return torch.randint(0, 13, (B, L), generator=torch.Generator().manual_seed(seed))


def _operator_parts(model, layer: int, block, X: torch.Tensor, T: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """Dense ``H``, ``H_o``, ``H_f`` of the HF block's square loss over ``names``, by the matrix-free operators."""
    module = GPT2BlockModule(model, layer)
    X3, _, _ = block.attention.check_inputs(X)
    c = block.loss_constant(X3)
    op = HessianOperator(module, lambda z, y: block.loss_of_logits(z, y, c), list(names), [(X, T)], reduction="sum")
    eye = torch.eye(op.shape[0], dtype=DT)
    return op.products(eye, ("H", "H_o", "H_f"))


# ---------------------------------------------------------------------------------------------------------------
# (a) the forward map
# ---------------------------------------------------------------------------------------------------------------

FORWARD_CASES = [dict(n_head=2, layer=0, B=2, L=5), dict(n_head=4, layer=1, B=3, L=4, n_inner=None),
                 dict(n_head=2, layer=1, B=1, L=1), dict(n_head=4, layer=0, B=2, L=6, attn="sdpa"),
                 dict(n_head=1, layer=1, B=2, L=3, base=True),
                 dict(n_head=2, layer=1, B=2, L=4, inverse_layer_scale=True)]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_block_output_equals_the_hf_block(case: dict) -> None:
    """The library block on the captured input = the HF block inside its model (the next block's input or the
    model's last hidden state before ln_f) and = GPT2BlockModule, to 1e-12."""
    config = {"scale_attn_by_inverse_layer_idx": True} if case.get("inverse_layer_scale") else None
    lm = _model(1, n_head=case["n_head"], n_inner=case.get("n_inner", 6),
                attn_implementation=case.get("attn", "eager"), config=config)
    model = lm.transformer if case.get("base") else lm  # GPT2Model or GPT2LMHeadModel
    layer = case["layer"]
    ids = _ids(2, case["B"], case["L"])
    X = capture_block_input(model, ids, layer)
    assert X.dtype == DT and X.shape == (case["B"], case["L"], 8)
    block, report = block_from_gpt2(model, layer)
    assert report.exact  # b_K is nonzero here and does not matter
    X3, _, mask = block.attention.check_inputs(X)
    ours = block.logits(X3, mask)
    if case.get("inverse_layer_scale"):
        assert block.attention.scale == (8 // case["n_head"]) ** -0.5 / (layer + 1)
    if layer + 1 < len(lm.transformer.h):
        assert _rel(ours, capture_block_input(model, ids, layer + 1)) <= 1e-12
    else:  # the last block: the model's last hidden state is ln_f of its output
        with torch.no_grad():
            last = lm.transformer(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            assert _rel(lm.transformer.ln_f(ours), last) <= 1e-12
    with torch.no_grad():
        assert _rel(ours, GPT2BlockModule(model, layer)(X)) <= 1e-12


def test_the_mapped_weights_are_the_hf_weights() -> None:
    """Scale, eps, activation and the HF -> block index (a permutation; θ_HF[index] = block.flat() exactly)."""
    model = _model(3, n_head=4)
    block, _ = block_from_gpt2(model, 1)
    attn = model.transformer.h[1].attn
    assert block.attention.scale == attn.scaling == 0.5**0.5  # 1/√d_head, d_head = 2
    assert block.ln1 is not None and block.ln1.eps == model.config.layer_norm_epsilon
    assert block.ffn.activation == "gelu_tanh" and block.attention.causal
    names, index = gpt2_block_parameter_map(block, prefix="transformer.h.1.")
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].reshape(-1) for n in names])
    assert torch.equal(torch.sort(index).values, torch.arange(block.num_params))
    assert torch.equal(theta[index], block.flat())
    head = block.attention
    assert torch.equal(head.W_K[3], attn.c_attn.weight[:, 8 + 6:8 + 8])  # K columns of head 3
    assert torch.equal(head.W_O[1], attn.c_proj.weight[2:4])  # c_proj rows of head 1


# ---------------------------------------------------------------------------------------------------------------
# (b) H, H_o, H_f of the whole block against the operators on the HF block
# ---------------------------------------------------------------------------------------------------------------

HESSIAN_CASES = [dict(n_head=2, layer=0, B=2, L=4, seed=0), dict(n_head=4, layer=1, B=1, L=3, seed=1),
                 dict(n_head=2, layer=1, B=2, L=1, seed=2), dict(n_head=1, layer=0, B=3, L=2, seed=3)]


@pytest.mark.parametrize("case", HESSIAN_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_closed_form_equals_the_operators_on_the_hf_block(case: dict) -> None:
    """``block_hessian_parts`` of the bridged block = the dense H, H_o, H_f of the HF GPT2Block's square loss over
    every closed-form parameter (mapped by gpt2_block_parameter_map), ≤ 1e-10 relative (b_K nonzero)."""
    seed, layer = case["seed"], case["layer"]
    model = _model(seed, n_head=case["n_head"])
    X = capture_block_input(model, _ids(seed, case["B"], case["L"]), layer)
    block, report = block_from_gpt2(model, layer)
    assert report.exact and report.bias_max_abs["b_K"] > 0
    T = torch.randn(X.shape, generator=torch.Generator().manual_seed(7 + seed), dtype=DT)
    closed = block_hessian_parts(block, X, T)
    names, index = gpt2_block_parameter_map(block)
    ops = _operator_parts(model, layer, block, X, T, names)
    for part in ("H", "H_o", "H_f"):
        mapped = ops[part][index][:, index]
        assert _rel(closed[part].matrix, mapped) <= TOL, part
    assert _rel(closed["H_f"].matrix, closed["H"].matrix) > 1e-3  # the functional part is not negligible here


def test_key_bias_rows_of_the_operator_are_zero() -> None:
    """b_K never changes the layer: its rows of the operator's H are exactly zero, as the report says."""
    model = _model(4)
    X = capture_block_input(model, _ids(4, 2, 4), 0)
    block, report = block_from_gpt2(model, 0)
    assert any("b_K" in note and "exact" in note for note in report.notes)
    T = torch.randn(X.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    H = _operator_parts(model, 0, block, X, T, ["attn.c_attn.bias", "attn.c_attn.weight"])["H"]
    assert float(H[8:16].abs().max()) < 1e-13 * float(H.abs().max())  # the b_K third of c_attn.bias
    assert float(H[:8, :8].abs().max()) > 1e-3  # b_Q does have curvature


# ---------------------------------------------------------------------------------------------------------------
# (c) per-head Q/K/V blocks are column slices of the fused c_attn
# ---------------------------------------------------------------------------------------------------------------


def _c_attn_columns(d: int, d_head: int, role: int, h: int) -> torch.Tensor:
    """vec_r positions in ``c_attn.weight`` ``(d, 3d)`` of head ``h``'s Q (role 0), K (1) or V (2) columns."""
    rows = torch.arange(d)[:, None] * (3 * d)
    cols = role * d + h * d_head + torch.arange(d_head)[None, :]
    return (rows + cols).reshape(-1)


@pytest.mark.parametrize("n_head", [2, 4])
def test_per_head_blocks_are_slices_of_the_fused_c_attn(n_head: int) -> None:
    """Closed-form (Q_h, K_h), (V_h, V_h), (Q_0, V_last) … blocks = the slices of the operator's dense H, H_o,
    H_f over ``attn.c_attn.weight`` alone."""
    model = _model(5, n_head=n_head)
    X = capture_block_input(model, _ids(6, 2, 5), 1)
    block, _ = block_from_gpt2(model, 1)
    T = torch.randn(X.shape, generator=torch.Generator().manual_seed(8), dtype=DT)
    ops = _operator_parts(model, 1, block, X, T, ["attn.c_attn.weight"])
    d, dh = 8, 8 // n_head
    roles = {"Q": 0, "K": 1, "V": 2}
    pairs = [(("Q", h), ("K", h)) for h in range(n_head)] + [(("V", h), ("V", h)) for h in range(n_head)]
    pairs += [(("Q", 0), ("V", n_head - 1)), (("K", 1), ("Q", 0))]
    for part in ("H", "H_o", "H_f"):
        closed = block_hessian(block, X, T, part=part)
        for (ra, ha), (rb, hb) in pairs:
            name = {"Q": "attn.h{}.Q", "K": "attn.kv{}.K", "V": "attn.kv{}.V"}
            ours = closed.block(name[ra].format(ha), name[rb].format(hb))
            ia, ib = _c_attn_columns(d, dh, roles[ra], ha), _c_attn_columns(d, dh, roles[rb], hb)
            theirs = ops[part][ia][:, ib]
            assert _rel(ours, theirs) <= TOL, (part, ra, ha, rb, hb)


# ---------------------------------------------------------------------------------------------------------------
# (d) nonzero attention biases: flagged, and the closed form is measurably a different layer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", ["b_Q", "b_V", "b_O"])
def test_nonzero_biases_are_reported_not_silently_wrong(bias: str) -> None:
    model = _model(6, **{bias: True})
    X = capture_block_input(model, _ids(9, 2, 4), 0)
    block, report = block_from_gpt2(model, 0)
    assert not report.exact
    assert report.bias_max_abs[bias] > 0.1
    assert any(bias in note and "NOT this layer" in note for note in report.notes)
    assert "NOT exact" in report.summary()
    assert [name for name, _ in report.operator_only] == ["attn.c_attn.bias", "attn.c_proj.bias"]
    X3, _, mask = block.attention.check_inputs(X)
    with torch.no_grad():
        out_err = _rel(block.logits(X3, mask), GPT2BlockModule(model, 0)(X))
    T = torch.randn(X.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    names, index = gpt2_block_parameter_map(block)
    H_err = _rel(block_hessian(block, X, T).matrix, _operator_parts(model, 0, block, X, T, names)["H"][index][:, index])
    assert out_err > 1e-3 and H_err > 1e-3, (out_err, H_err)
    # ... and the closed form is exactly the same layer with the flagged biases set to zero
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.bias[:8].zero_()
        model.transformer.h[0].attn.c_attn.bias[16:].zero_()
        model.transformer.h[0].attn.c_proj.bias.zero_()
        assert _rel(block.logits(X3, mask), GPT2BlockModule(model, 0)(X)) <= 1e-12


def test_value_bias_is_an_output_bias_and_not_absorbable_after_the_ffn() -> None:
    """b_V acts as the constant row Σ_h b_V^h W_O^h added with b_O to the residual stream before ln_2 (exact), so it
    cannot be moved into the FFN's b_2: measured, doing so changes the block output at O(1)."""
    model = _model(7, b_V=True)
    X = capture_block_input(model, _ids(10, 2, 5), 0)
    blk = model.transformer.h[0]
    with torch.no_grad():
        before = GPT2BlockModule(model, 0)(X)
        b_V = blk.attn.c_attn.bias[16:].clone()
        shift = b_V @ blk.attn.c_proj.weight  # Σ_h b_V^h W_O^h (head rows of c_proj)
        blk.attn.c_attn.bias[16:].zero_()
        blk.attn.c_proj.bias.add_(shift)
        assert _rel(GPT2BlockModule(model, 0)(X), before) <= 1e-12
        block, report = block_from_gpt2(model, 0)  # b_O nonzero now
        assert not report.exact
        moved = block_from_gpt2(model, 0)[0]
        moved_ffn = type(moved.ffn)(moved.ffn.W_1, moved.ffn.b_1, moved.ffn.W_2, moved.ffn.b_2 + shift,
                                    moved.ffn.activation)
        X3, _, mask = block.attention.check_inputs(X)
        moved_block = type(moved)(moved.attention, moved_ffn, moved.ln1, moved.ln2, moved.norm)
        err = _rel(moved_block.logits(X3, mask), before)
    assert err > 1e-2, err


# ---------------------------------------------------------------------------------------------------------------
# losses and bad input
# ---------------------------------------------------------------------------------------------------------------


class _WithHead(torch.nn.Module):
    """``X ↦ lm_head(GPT2Block(X))``: the HF block followed by the tied unembedding (no ln_f)."""

    def __init__(self, model, layer: int) -> None:
        super().__init__()
        self.block = GPT2BlockModule(model, layer)
        self.lm_head = model.lm_head

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.block(X))


def test_cross_entropy_uses_the_tied_unembedding() -> None:
    """loss='ce': W_U = lm_head.weightᵀ, the logits are the HF block's through lm_head, and H, H_o, H_f (W_U
    included) equal the operators on the HF block with its lm_head, ≤ 1e-10."""
    model = _model(8)
    block, report = block_from_gpt2(model, 1, loss="ce")
    assert block.W_U is not None and torch.equal(block.W_U, model.transformer.wte.weight.T)
    assert any("ln_f" in note for note in report.notes)
    X = capture_block_input(model, _ids(11, 2, 3), 1)
    X3, _, mask = block.attention.check_inputs(X)
    head = _WithHead(model, 1)
    with torch.no_grad():
        assert _rel(block.logits(X3, mask), head(X)) <= 1e-12
    target = torch.randint(0, 13, (2, 3), generator=torch.Generator().manual_seed(12))
    closed = block_hessian_parts(block, X, target)
    names, index = gpt2_block_parameter_map(block, prefix="block.")
    assert names[-1] == "lm_head.weight" and names[0] == "block.ln_1.weight"
    c = block.loss_constant(X3)
    op = HessianOperator(head, lambda z, y: block.loss_of_logits(z, y, c), list(names), [(X, target)],
                         reduction="sum")
    ops = op.products(torch.eye(op.shape[0], dtype=DT), ("H", "H_o", "H_f"))
    for part in ("H", "H_o", "H_f"):
        assert _rel(closed[part].matrix, ops[part][index][:, index]) <= TOL, part


def test_bad_inputs_are_named() -> None:
    model = _model(0)
    with pytest.raises(EnergyInputError, match="GPT2LMHeadModel or GPT2Model"):
        block_from_gpt2(torch.nn.Linear(2, 2))
    with pytest.raises(EnergyInputError, match=r"`layer` must be an integer in \[0, 2\)"):
        block_from_gpt2(model, 2)
    with pytest.raises(EnergyInputError, match="`input_ids` must lie in"):
        capture_block_input(model, torch.tensor([[0, 13]]))
    with pytest.raises(EnergyInputError, match="integer tensor"):
        capture_block_input(model, torch.zeros(2, 3))
    with pytest.raises(EnergyInputError, match="n_positions"):
        capture_block_input(model, torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(EnergyInputError, match="loss='ce' needs an unembedding"):
        block_from_gpt2(model.transformer, 0, loss="ce")
    model.config.activation_function = "silu"
    with pytest.raises(EnergyInputError, match="activation_function"):
        block_from_gpt2(model, 0)
    with pytest.raises(EnergyInputError, match="block_from_gpt2"):
        gpt2_block_parameter_map("not a block")  # type: ignore[arg-type]
