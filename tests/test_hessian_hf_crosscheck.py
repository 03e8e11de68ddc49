"""Cross-checks on the same tiny Hugging Face GPT-2 (float64): our H and H_o products against hessian-eigenthings'
and curvlinops' operators, and against a dense ``torch.func.hessian`` of the flat loss.

Each comparison is a relative error ``max|ours − theirs| / max|theirs| ≤ 1e-10`` on several random vectors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import DT

pytest.importorskip("transformers")

from energy.hessian import hf  # noqa: E402
from energy.hessian.curvature_operators import dense_hessian_reference  # noqa: E402

#: GPT-2 blocks compared: fused Q/K/V (c_attn), the MLP input weight, a LayerNorm gain and the token embedding.
NAMES = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight", "transformer.h.0.ln_1.weight",
         "transformer.wte.weight"]


def _gpt2(seed: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.build_model("gpt2-tiny", seed=seed, n_embd=8, n_layer=2, n_head=2, vocab_size=11, n_positions=8,
                              initializer_range=0.4)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_hessian_eigenthings(seed):
    he = pytest.importorskip("hessian_eigenthings")
    from hessian_eigenthings.loss_fns.huggingface import hf_lm_forward, hf_lm_loss_of_output

    model = _gpt2(seed)
    data = hf.synthetic_batches(model, batch=2, seq_len=5, num_batches=2, seed=seed)  # equal token counts
    batches = [x for x, _ in data]  # their batch: the dict with input_ids and labels
    loss = hf.CausalLMLoss()

    def loss_fn(m, batch):
        return loss(m(input_ids=batch["input_ids"]).logits, batch["labels"])

    keep = lambda name, _: name in NAMES  # noqa: E731
    H_he = he.operators.hessian.HessianOperator(model, batches, loss_fn, param_filter=keep)
    G_he = he.operators.ggn.GGNOperator(model, batches, hf_lm_forward(), hf_lm_loss_of_output(), param_filter=keep)
    order = [n for n, _ in model.named_parameters() if n in NAMES]  # their flat order: named_parameters
    H = hf.curvature_operator(model, data, part="H", params=order)
    G = hf.curvature_operator(model, data, part="H_o", params=order)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        v = torch.randn(H.shape[0], generator=gen, dtype=DT)
        assert _rel(H @ v, H_he.matvec(v)) < 1e-10
        assert _rel(G @ v, G_he.matvec(v)) < 1e-10


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_curvlinops(seed):
    curvlinops = pytest.importorskip("curvlinops")
    model = _gpt2(seed)
    tokens = torch.randint(0, 11, (5, 5), generator=torch.Generator().manual_seed(seed))
    data = hf.token_batches(model, tokens, batch=3)  # unequal batches (3 and 2 sequences)
    data[1][0]["labels"][1, 2:] = -100  # and a padded sequence: token-weighted batch weights
    # Without the LayerNorm gain: with it *and* the tied embedding, curvlinops' vmapped jvp-of-grad differs from
    # plain double backward by a few percent under torch 2.13 (ours agrees with double backward, test_hessian_hf.py).
    names = [n for n in NAMES if "ln_" not in n]
    H = hf.curvature_operator(model, data, part="H", params=names)
    G = hf.curvature_operator(model, data, part="H_o", params=names)
    named = dict(model.named_parameters())
    kw = dict(batch_size_fn=H.batch_size_fn, check_deterministic=False)
    H_cl = curvlinops.HessianLinearOperator(H.model, H.loss_fn, [named[n] for n in names], data, **kw)
    G_cl = curvlinops.GGNLinearOperator(H.model, H.loss_fn, [named[n] for n in names], data, **kw)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(seed), dtype=DT)
    assert _rel(H @ V, H_cl @ V) < 1e-10
    assert _rel(G @ V, G_cl @ V) < 1e-10


def test_matches_dense_torch_func_hessian():
    """Dense ``torch.func.hessian`` of the flat loss (the project's twin) on blocks without a LayerNorm gain (through
    whose weight torch 2.13's vmapped double derivative is wrong; those are checked by double backward in
    test_hessian_hf.py)."""
    model = _gpt2(2)
    data = hf.synthetic_batches(model, batch=2, seq_len=4, num_batches=2, seed=2)
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.bias", "transformer.wpe.weight"]
    H = hf.curvature_operator(model, data, part="H", params=names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = dense_hessian_reference(H.model, H.loss_fn, names, data, reduction="mean",
                                      batch_size_fn=H.batch_size_fn)
    assert _rel(H.dense(), ref) < 1e-10


def test_matches_double_backward_with_tied_embedding():
    """H v against ``torch.autograd.grad`` twice on the Hugging Face model itself (its tied ``lm_head`` is the same
    Parameter as ``wte``, so the unembedding's curvature is included), LayerNorm gain included."""
    model = _gpt2(3)
    data = hf.synthetic_batches(model, batch=3, seq_len=5, num_batches=2, seed=3)
    H = hf.curvature_operator(model, data, part="H", params=NAMES)
    named = dict(model.named_parameters())
    Ws = [named[n] for n in NAMES]
    loss = sum(w * H.loss_fn(model(input_ids=x["input_ids"]).logits, y) for x, y, w in H._batches())
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, Ws, create_graph=True)])
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        v = torch.randn(H.shape[0], generator=gen, dtype=DT)
        hv = torch.cat([t.reshape(-1) for t in torch.autograd.grad(g @ v, Ws, retain_graph=True)])
        assert _rel(H @ v, hv) < 1e-10
