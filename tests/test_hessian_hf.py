"""Hugging Face models in the curvature module: models, losses, batch weights, blocks by name, fused attention.

Tiny float64 models built offline from configs (d_model 8, 1–2 layers, 2–4 heads, vocabulary ≤ 13, length ≤ 5);
every operator is compared with the dense ``torch.func`` twins of :mod:`energy.hessian.curvature_operators`.
"""

from __future__ import annotations

import subprocess
import sys
import types
import warnings

import pytest
import torch
from _helpers import DT

from energy._validation import EnergyInputError
from energy.hessian.curvature_operators import dense_ggn_reference
from energy.hessian.parameter_space import free_and_fixed

pytest.importorskip("transformers")

from energy.hessian import hf  # noqa: E402
from energy.hessian.hf_blocks import BlockCurvature, _indices, block_catalogue, select_blocks  # noqa: E402

#: Tiny configurations (a larger init range than Hugging Face's 0.02, so that the curvature is not negligible).
TINY = {
    "gpt2-tiny": dict(n_embd=8, n_layer=1, n_head=2, vocab_size=13, n_positions=8, initializer_range=0.4),
    "llama-tiny": dict(hidden_size=8, intermediate_size=6, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=13, max_position_embeddings=8, initializer_range=0.4),
    "mistral-tiny": dict(hidden_size=8, intermediate_size=6, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=13, max_position_embeddings=8, initializer_range=0.4),
    "bert-tiny": dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=6, vocab_size=13,
                      max_position_embeddings=8, initializer_range=0.4),
    "bert-cls-tiny": dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=6,
                          vocab_size=13, max_position_embeddings=8, initializer_range=0.4),
    "tl-tiny": dict(n_layers=1, d_model=8, d_head=2, n_heads=4, n_key_value_heads=2, d_vocab=13, d_mlp=6, n_ctx=8,
                    positional_embedding_type="rotary"),
    "vit-tiny": dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=6, image_size=4,
                     patch_size=2, num_channels=1, initializer_range=0.4),
}
#: Parameters of each dense comparison: one attention layer's projections and a norm (a few hundred entries).
DENSE_PARAMS = {
    "gpt2-tiny": ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.ln_2.weight"],
    "llama-tiny": ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                   "model.layers.0.mlp.gate_proj.weight", "model.layers.0.input_layernorm.weight"],
    "mistral-tiny": ["model.layers.0.self_attn.v_proj.weight", "model.layers.0.post_attention_layernorm.weight"],
    "bert-tiny": ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.output.LayerNorm.bias"],
    "bert-cls-tiny": ["bert.encoder.layer.0.attention.self.value.weight", "classifier.weight"],
    "vit-tiny": ["vit.layers.0.attention.k_proj.weight", "vit.layers.0.layernorm_before.weight"],
    "tl-tiny": ["blocks.0._original_component.attn._original_component.k._original_component.weight",
                "blocks.0._original_component.ln2._original_component.weight"],
}


def _model(preset: str, seed: int = 0, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.build_model(preset, seed=seed, **{**TINY[preset], **kw})


def _dense_hessian(op) -> torch.Tensor:
    """Dense Hessian of the flat weighted loss by ``torch.autograd.functional.hessian`` (double backward, one
    column per pass). Not ``torch.func.hessian``: in torch 2.13 its vmapped double derivative through
    ``F.layer_norm`` with a weight is wrong (off by O(1) against finite differences), see the report."""
    free, fixed = free_and_fixed(op.model, op.space)

    def total(flat: torch.Tensor) -> torch.Tensor:
        p = op.space.unflatten(flat)
        return sum(w * op.loss_fn(torch.func.functional_call(op.model, (p, fixed), (X,)), y)
                   for X, y, w in op._batches())

    return torch.autograd.functional.hessian(total, op.space.flatten(free))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------------------------
# models, losses, data
# --------------------------------------------------------------------------------------------------------------


def test_import_without_transformers():
    code = ("import sys; import energy, energy.hessian, energy.hessian.hf, energy.hessian.hf_blocks, "
            "energy.hessian.analyze, energy.hessian.__main__; "
            "assert 'transformers' not in sys.modules, 'transformers imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


@pytest.mark.parametrize("preset", sorted(TINY))
def test_build_is_seeded_float64_eval(preset):
    a, b, c = _model(preset, 0), _model(preset, 0), _model(preset, 1)
    pa, pb, pc = (torch.cat([p.reshape(-1) for p in torch.nn.Module.parameters(m)]) for m in (a, b, c))
    assert pa.dtype == DT and not a.training
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_load_model_from_directory(tmp_path):
    m = _model("llama-tiny", seed=3)
    m.config.save_pretrained(tmp_path / "cfg")  # config.json only: seeded random init
    again = hf.load_model(tmp_path / "cfg", seed=3)
    assert type(again).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), again.parameters()))
    m2 = _model("gpt2-tiny", seed=5)
    with torch.no_grad():
        m2.transformer.h[0].ln_1.weight.add_(0.5)  # weights that no initialisation produces
    m2.save_pretrained(tmp_path / "weights")
    loaded = hf.load_model(tmp_path / "weights", seed=0)
    assert torch.equal(loaded.transformer.h[0].ln_1.weight, m2.transformer.h[0].ln_1.weight)
    with pytest.raises(EnergyInputError, match="config.json"):
        hf.load_model(tmp_path / "missing")


@pytest.mark.parametrize("preset", sorted(TINY))
@pytest.mark.parametrize("seed", [0, 1])
def test_operators_equal_dense_twins(preset, seed):
    """H, H_o, H_f of each architecture (RoPE + grouped-query attention for LLaMA/Mistral) against dense twins
    (double backward; ``jacrev`` Jacobians and the output-space loss Hessian for H_o), two batches."""
    m = _model(preset, seed)
    data = hf.synthetic_batches(m, batch=2, seq_len=4, num_batches=2, seed=seed)
    names = DENSE_PARAMS[preset]
    H = hf.curvature_operator(m, data, part="H", params=names)
    G = hf.curvature_operator(m, data, part="H_o", params=names)
    F = hf.curvature_operator(m, data, part="H_f", params=names)
    model, loss, counts = H.model, H.loss_fn, H.batch_size_fn
    H_ref = _dense_hessian(H)
    G_ref = dense_ggn_reference(model, loss, names, data, reduction="mean", batch_size_fn=counts)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(seed), dtype=DT)
    assert _rel(H @ V, H_ref @ V) < 1e-10
    assert _rel(G @ V, G_ref @ V) < 1e-10
    assert float((F @ V - (H_ref - G_ref) @ V).abs().max()) < 1e-10 * float((H_ref @ V).abs().max())
    out = H.products(V, ("H", "H_o", "H_f"))
    assert _rel(out["H_f"] + out["H_o"], out["H"]) < 1e-12


def test_loss_is_mean_over_union_of_batches():
    """Batches with different numbers of counted tokens: the operator and the loss over the batches equal those of
    one batch holding their union (masked LM: random mask counts; causal LM: a padded batch)."""
    m = _model("bert-tiny", 2)
    data = hf.synthetic_batches(m, batch=2, seq_len=5, num_batches=2, seed=4)
    counts = [hf.count_targets("masked-lm")(x) for x, _ in data]
    assert counts[0] != counts[1]
    union_x = {k: torch.cat([x[k] for x, _ in data]) for k in data[0][0]}
    union = [(union_x, union_x["labels"])]
    names = ["bert.encoder.layer.0.attention.self.key.weight", "bert.embeddings.LayerNorm.weight"]
    H2, H1 = (hf.curvature_operator(m, d, params=names) for d in (data, union))
    V = torch.randn(H1.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert _rel(H2 @ V, H1 @ V) < 1e-12
    assert float(H2.loss()) == pytest.approx(float(H1.loss()), rel=1e-13)
    g = _model("gpt2-tiny", 1)
    tokens = torch.randint(1, 13, (3, 5), generator=torch.Generator().manual_seed(1))
    batches = hf.token_batches(g, tokens, batch=2)
    batches[1][0]["labels"][0, 3:] = -100  # a padded sequence: 2 counted next tokens instead of 4
    batches[1] = (batches[1][0], batches[1][0]["labels"])
    ux = {k: torch.cat([x[k] for x, _ in batches]) for k in batches[0][0]}
    names = ["transformer.h.0.attn.c_proj.weight"]
    Hb, Hu = (hf.curvature_operator(g, d, params=names) for d in (batches, [(ux, ux["labels"])]))
    V = torch.randn(Hb.shape[0], 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    assert _rel(Hb @ V, Hu @ V) < 1e-12
    assert float(Hb.loss()) == pytest.approx(float(Hu.loss()), rel=1e-13)


def test_bad_data_is_rejected():
    m = _model("gpt2-tiny")
    with pytest.raises(EnergyInputError, match="vocabulary"):
        hf.token_batches(m, torch.full((2, 4), 99), batch=2)
    data = hf.synthetic_batches(m, batch=2, seq_len=3)
    data[0][0]["labels"][:] = -100
    with pytest.raises(EnergyInputError, match="no counted target"):
        hf.curvature_operator(m, data)
    with pytest.raises(EnergyInputError, match="dict holding 'labels'"):
        hf.curvature_operator(m, [(torch.zeros(2, 3, dtype=torch.long), None)])
    with pytest.raises(EnergyInputError, match="preset"):
        hf.build_model("gpt5-huge")


# --------------------------------------------------------------------------------------------------------------
# fused attention
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "vit-tiny"])
def test_sdpa_model_switched_to_eager_and_restored(preset):
    sdpa, eager = _model(preset, 1, attn_implementation="sdpa"), _model(preset, 1)
    assert sdpa.config._attn_implementation == "sdpa"
    data = hf.synthetic_batches(sdpa, batch=2, seq_len=4)
    if preset == "gpt2-tiny":  # the failure being avoided: forward-mode AD through SDPA on the CPU
        params = {n: p.detach() for n, p in sdpa.named_parameters()}
        f = lambda p: torch.func.functional_call(sdpa, p, (), {"input_ids": data[0][0]["input_ids"]}).logits  # noqa: E731
        with pytest.raises(NotImplementedError, match="forward AD"):
            torch.func.jvp(f, (params,), ({k: torch.ones_like(v) for k, v in params.items()},))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops = {p: hf.curvature_operator(sdpa, data, part=p) for p in ("H", "H_o", "H_f")}
    notes = [str(w.message) for w in caught if "attn_implementation='sdpa'" in str(w.message)]
    assert notes and all("\n" not in n and "eager" in n for n in notes)
    V = torch.randn(ops["H"].shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    for part, op in ops.items():
        ref = hf.curvature_operator(eager, data, part=part) @ V
        assert _rel(op @ V, ref) < 1e-12
    assert sdpa.config._attn_implementation == "sdpa"
    logits = sdpa(**{k: v for k, v in data[0][0].items() if k != "labels"}).logits
    assert torch.isfinite(logits).all() and sdpa.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("preset", ["gpt2-tiny", "bert-tiny", "vit-tiny", "llama-tiny", "mistral-tiny"])
def test_float64_attention_equals_the_models_own_sdpa(preset):
    """Logits through the switched model (float64 eager attention with the model's masks, RoPE, GQA) against the
    model's own SDPA forward, with a padded sequence (attention_mask) where the model takes one. LLaMA/Mistral's own
    RMSNorm rounds through float32; the reference runs with the float64 RMSNorm (checked separately below), so the
    comparison isolates the attention."""
    m = _model(preset, 3, attn_implementation="sdpa")
    x = hf.synthetic_batches(m, batch=2, seq_len=5, seed=3)[0][0]
    kwargs = {k: v for k, v in x.items() if k != "labels"}
    if "input_ids" in x:
        kwargs["attention_mask"] = torch.ones_like(x["input_ids"])
        kwargs["attention_mask"][1, 3:] = 0
    norms = [mod for mod in m.modules() if type(mod).__name__.endswith("RMSNorm")]
    for mod in norms:
        mod.forward = types.MethodType(hf._rms_norm_float64, mod)
    with torch.no_grad():
        ref = m(**kwargs).logits
    for mod in norms:
        del mod.forward
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ours = hf.LogitsModel(m)(kwargs)
    keep = kwargs["attention_mask"].bool() if "attention_mask" in kwargs else torch.ones(ref.shape[:-1], dtype=bool)
    assert _rel(ours[keep], ref[keep]) < 1e-12
    assert m.config._attn_implementation == "sdpa"
    if norms:  # the float64 RMSNorm is the model's own on float32 inputs
        h = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
        mod = type(norms[0])(8).to(torch.float32)
        with torch.no_grad():
            mod.weight.uniform_(0.5, 1.5)
            assert torch.allclose(hf._rms_norm_float64(mod, h), mod(h), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# blocks by name
# --------------------------------------------------------------------------------------------------------------


def _projection_outputs(model, module_names, inputs):
    """Outputs of the named sub-modules on ``inputs`` (forward hooks)."""
    out = {}
    mods = dict(torch.nn.Module.named_modules(model))
    hooks = [mods[n].register_forward_hook(lambda mod, a, o, n=n: out.__setitem__(n, o.detach().clone()))
             for n in module_names]
    with torch.no_grad():
        hf.LogitsModel(model)(inputs)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize(("preset", "proj", "block", "columns"), [
    ("gpt2-tiny", "transformer.h.0.attn.c_attn", "layer0.head1.K", range(8 + 4, 8 + 8)),
    ("gpt2-tiny", "transformer.h.0.attn.c_attn", "layer0.head0.V", range(16, 20)),
    ("llama-tiny", "model.layers.0.self_attn.q_proj", "layer0.head2.Q", range(4, 6)),
    ("llama-tiny", "model.layers.0.self_attn.k_proj", "layer0.kv_head1.K", range(2, 4)),
    ("bert-tiny", "bert.encoder.layer.0.attention.self.value", "layer0.head1.V", range(4, 8)),
    ("tl-tiny", "blocks.0._original_component.attn._original_component.v._original_component", "layer0.kv_head1.V",
     range(2, 4)),
])
def test_head_blocks_move_only_their_head(preset, proj, block, columns):
    """Perturbing a head block's entries changes exactly that head's columns of the projection output."""
    m = _model(preset)
    x = hf.synthetic_batches(m, batch=1, seq_len=4)[0][0]
    before = _projection_outputs(m, [proj], x)[proj]
    b = block_catalogue(m)[block]
    params = dict(torch.nn.Module.named_parameters(m))
    with torch.no_grad():
        for name, idx in b.pieces:
            params[name][idx] += 0.3
    after = _projection_outputs(m, [proj], x)[proj]
    changed = ((after - before).abs() > 1e-12).reshape(-1, after.shape[-1]).any(0)
    assert changed.nonzero().reshape(-1).tolist() == list(columns)


def test_catalogue_partitions_and_patterns():
    m = _model("llama-tiny", num_hidden_layers=2)
    cat = block_catalogue(m)
    assert [b.name for b in select_blocks(m, "layer1.head*.Q")] == [f"layer1.head{h}.Q" for h in range(4)]
    assert [b.name for b in select_blocks(m, "*.kv_head*.K")] == ["layer0.kv_head0.K", "layer0.kv_head1.K",
                                                                   "layer1.kv_head0.K", "layer1.kv_head1.K"]
    assert not select_blocks(m, "*.head*.K", allow_empty=True)  # grouped-query keys are kv heads
    H = hf.curvature_operator(m, hf.synthetic_batches(m, batch=1, seq_len=3))
    for part in "QO":
        heads = torch.cat([_indices(cat[f"layer0.head{h}.{part}"], H) for h in range(4)]).sort().values
        assert torch.equal(heads, _indices(cat[f"layer0.attn.{part}"], H).sort().values)
    g = _model("gpt2-tiny")
    assert sum(cat.numel({n: p.shape for n, p in g.named_parameters()})
               for cat in select_blocks(g, "layer0.head*.[QKV]")) == 8 * 24 + 24
    assert select_blocks(g, ["transformer.h.0.mlp.c_fc.weight"])[0].tensors == ("transformer.h.0.mlp.c_fc.weight",)


def test_block_errors():
    m = _model("gpt2-tiny")
    with pytest.raises(EnergyInputError, match=r"not a block name.*layer0\.head1\.Q"):
        select_blocks(m, "layer0.head1.q")
    with pytest.raises(EnergyInputError, match="matches no block"):
        select_blocks(m, "layer7.*")
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(EnergyInputError, match="no known attention layout"):
        select_blocks(plain, "*.head*.Q")
    bc = BlockCurvature(m, hf.synthetic_batches(m, batch=1, seq_len=3))
    with pytest.raises(EnergyInputError, match="pattern matching 2 blocks"):
        bc.operator("layer0.head*.Q")
    with pytest.raises(EnergyInputError, match="Close matches"):
        bc.frobenius("layer0.head1.q")
    m.config.n_embd = 12  # config and tensors disagree: not the layout the catalogue expects
    with pytest.raises(EnergyInputError, match="expected attention layout.*c_attn"):
        block_catalogue(m)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "tl-tiny"])
def test_block_operators_are_slices_of_the_full_operator(preset):
    """Diagonal and off-diagonal blocks (heads, fused Q/K/V slices, O, MLP, norms) of H, H_o, H_f equal the
    rows/columns of the full dense operator, and the estimators give the exact values."""
    m = _model(preset, 2)
    data = hf.synthetic_batches(m, batch=2, seq_len=4, num_batches=2)
    bc = BlockCurvature(m, data, exact_max=64)
    cat = bc.catalogue
    kv = "head1.K" if preset == "gpt2-tiny" else "kv_head1.K"
    pairs = [("layer0.head1.Q", f"layer0.{kv}"), ("layer0.head0.O", "layer0.ln2"), ("embed", "layer0.head1.Q")]
    full = {p: hf.curvature_operator(m, data, part=p) for p in ("H", "H_o", "H_f")}
    dense = {p: op.dense() for p, op in full.items()}
    for a, b in pairs:
        ia, ib = _indices(cat[a], full["H"]), _indices(cat[b], full["H"])
        for part in ("H", "H_o", "H_f"):
            A = bc.operator(a, b, part)
            assert _rel(A.dense(), dense[part][ia][:, ib]) < 1e-10
            assert _rel(A.T.dense(), dense[part][ib][:, ia]) < 1e-10
        M = dense["H"][ia][:, ia]
        k = len(ia) + 1  # exact: by columns (≤ exact_max entries) or with more probes than entries
        assert bc.frobenius(a, num_matvecs=k).value == pytest.approx(float(torch.linalg.matrix_norm(M)), rel=1e-10)
        assert bc.frobenius(a, b, num_matvecs=len(ib) + 1).value == pytest.approx(
            float(torch.linalg.matrix_norm(dense["H"][ia][:, ib])), rel=1e-10)
        assert bc.trace(a, num_matvecs=k).value == pytest.approx(float(torch.trace(M)), rel=1e-10, abs=1e-14)
        assert torch.allclose(bc.diagonal(a, num_samples=k).value, torch.diagonal(M), rtol=1e-10, atol=1e-14)
        top = bc.top_eigenvalues(a, k=2, tol=1e-10).eigenvalues
        assert torch.allclose(top, torch.linalg.eigvalsh(M).flip(0)[:2], rtol=1e-8, atol=1e-12)
    # a block larger than exact_max goes through Hutch++ / Hutchinson / SLQ
    big = "layer0.mlp"
    ib = _indices(cat[big], full["H"])
    M = dense["H"][ib][:, ib]
    n = M.shape[0]
    assert n > 64
    est = bc.frobenius(big, num_matvecs=n + 1, generator=torch.Generator().manual_seed(0))
    assert est.value == pytest.approx(float(torch.linalg.matrix_norm(M)), rel=1e-10)  # more products than n: exact
    dens = bc.density(big, num_probes=2, num_steps=6, generator=torch.Generator().manual_seed(0))
    assert float(dens.weights.sum()) == pytest.approx(1.0, rel=1e-12)
    ev = torch.linalg.eigvalsh(M)
    assert float(dens.nodes.min()) >= float(ev[0]) - 1e-10 and float(dens.nodes.max()) <= float(ev[-1]) + 1e-10
