"""Tests of unfold.standard: the GPT-2-style decoder (MATH §3.7), the MLP baseline and the encoder baseline.

The decoder is checked against a pipeline built from torch's own modules (nn.MultiheadAttention, nn.Linear,
nn.LayerNorm) in float64, for softmax attention, Pre-LN and scaled/removed attention residuals.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import DT
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from energy._validation import EnergyInputError
from tests._transforms import check_transforms
from unfold.data import addition_batch, addition_loss, addition_mse_loss
from unfold.standard import GPT2Config, GPT2Decoder, MLPBaseline, standard_encoder


def _model(gen: torch.Generator, **kw) -> GPT2Decoder:
    cfg = GPT2Config(**{"d_model": 8, "n_layers": 2, "d_mlp": 12, **kw})
    model = GPT2Decoder(cfg, generator=gen).to(DT)
    with torch.no_grad():  # non-trivial biases and LayerNorm parameters, so the comparison can fail
        for name, p in model.named_parameters():
            if name.endswith(("b_1", "b_2", "b_U")) or "ln_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=DT))
    return model


def _tokens(gen: torch.Generator, B: int = 3, n: int = 18, vocab: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (B, n), generator=gen)


def _torch_modules_logits(model: GPT2Decoder, tokens: torch.Tensor) -> torch.Tensor:
    """The same network assembled from torch's own modules, weights copied (transposed: torch's act on the left)."""
    cfg = model.config
    d, n = cfg.d_model, tokens.shape[-1]
    X = model.token_embedding.weight[tokens] + model.position_embedding.weight[:n]
    blocked = torch.ones(n, n, dtype=torch.bool).triu(1) if cfg.causal else None  # True = not allowed (torch)

    def ln(src: nn.LayerNorm | None) -> nn.Module:
        if src is None:
            return nn.Identity()
        m = nn.LayerNorm(d, eps=src.eps, dtype=DT)
        m.load_state_dict(src.state_dict())
        return m

    with torch.no_grad():
        for blk in model.blocks:
            mha = nn.MultiheadAttention(d, cfg.n_heads, bias=False, batch_first=True, dtype=DT)
            mha.in_proj_weight.copy_(torch.cat([blk.attn.W_Q.T, blk.attn.W_K.T, blk.attn.W_V.T]))
            mha.out_proj.weight.copy_(blk.attn.W_O.T)
            H = ln(blk.ln_1)(X)
            X = cfg.attn_residual_scale * X + mha(H, H, H, attn_mask=blocked, need_weights=False)[0]
            if blk.mlp is not None:
                lin1, lin2 = nn.Linear(d, cfg.d_mlp, dtype=DT), nn.Linear(cfg.d_mlp, d, dtype=DT)
                lin1.weight.copy_(blk.mlp.W_1.T)
                lin1.bias.copy_(blk.mlp.b_1)
                lin2.weight.copy_(blk.mlp.W_2.T)
                lin2.bias.copy_(blk.mlp.b_2)
                out = lin2(torch.relu(lin1(ln(blk.ln_2)(X))))
                X = X + out if cfg.mlp_residual else out
        return ln(model.ln_f)(X) @ model.W_U + model.b_U


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"n_heads": 2},
        {"layernorm": "pre"},
        {"layernorm": "pre", "n_heads": 4, "attn_residual_scale": 0.5},
        {"attn_residual_scale": 0.0},
        {"mlp_residual": False},
        {"causal": False},
    ],
    ids=["plain", "heads2", "preln", "preln-heads4-half-res", "no-attn-res", "no-mlp-res", "noncausal"],
)
def test_decoder_matches_torch_modules(gen, kw):
    model = _model(gen, **kw)
    tokens = _tokens(gen)
    ours = model(tokens)
    assert ours.shape == (3, 18, 12)
    torch.testing.assert_close(ours, _torch_modules_logits(model, tokens), rtol=0, atol=1e-11)


def test_parameter_names_and_shapes():
    model = GPT2Decoder(GPT2Config(d_model=6, n_layers=2, n_heads=3, d_head=5, d_mlp=7, layernorm="pre"))
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    assert shapes["token_embedding.weight"] == (12, 6)
    assert shapes["position_embedding.weight"] == (18, 6)
    for i in range(2):
        for w in ("W_Q", "W_K", "W_V"):
            assert shapes[f"blocks.{i}.attn.{w}"] == (6, 15)
        assert shapes[f"blocks.{i}.attn.W_O"] == (15, 6)
        assert shapes[f"blocks.{i}.mlp.W_1"] == (6, 7) and shapes[f"blocks.{i}.mlp.b_1"] == (7,)
        assert shapes[f"blocks.{i}.mlp.W_2"] == (7, 6) and shapes[f"blocks.{i}.mlp.b_2"] == (6,)
        assert shapes[f"blocks.{i}.ln_1.weight"] == (6,) and shapes[f"blocks.{i}.ln_2.bias"] == (6,)
    assert shapes["ln_f.weight"] == (6,) and shapes["W_U"] == (6, 12) and shapes["b_U"] == (12,)
    # one head of width 5, d_head ≠ d_model / n_heads: the forward still runs
    assert model(torch.zeros(2, 7, dtype=torch.long)).shape == (2, 7, 12)
    no_ln = GPT2Decoder(GPT2Config(d_model=6, n_layers=1))
    assert not any("ln" in k for k, _ in no_ln.named_parameters())


def test_parameter_count_of_the_paper_heat_map_model():
    """MATH §3.7: one block, d_model = d_head = 16, d_mlp = 64 has 3,836 parameters, 1,024 of them in attention."""
    model = GPT2Decoder(GPT2Config(d_model=16, n_layers=1, d_mlp=64))
    assert sum(p.numel() for p in model.parameters()) == 3836
    assert sum(p.numel() for n, p in model.named_parameters() if ".attn." in n) == 1024


def test_gpt2_init_std_and_seed():
    cfg = GPT2Config(d_model=64, n_layers=1)
    a = GPT2Decoder(cfg, generator=torch.Generator().manual_seed(3))
    b = GPT2Decoder(cfg, generator=torch.Generator().manual_seed(3))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    W = a.blocks[0].mlp.W_1.detach()  # 64 × 256 entries
    assert abs(float(W.std()) / (0.8 / 8) - 1) < 0.05
    assert float(a.blocks[0].mlp.b_1.detach().abs().max()) == 0.0


@pytest.mark.parametrize("kw", [{}, {"attention": "linear"}, {"causal": False, "n_heads": 2}])
def test_causal_masking(gen, kw):
    model = _model(gen, **kw)
    tokens = _tokens(gen)
    t = 9
    changed = tokens.clone()
    changed[:, t:] = (changed[:, t:] + 1 + torch.randint(0, 10, changed[:, t:].shape, generator=gen)) % 12
    a, b = model(tokens), model(changed)
    early = (a[:, :t] - b[:, :t]).abs().max()
    late = (a[:, t:] - b[:, t:]).abs().max()
    assert late > 1e-6  # the perturbation matters where it may
    if model.config.causal:
        assert early == 0.0  # ...and never before position t
    else:
        assert early > 1e-6


@pytest.mark.parametrize("kw", [{}, {"attention": "linear"}, {"layernorm": "pre", "n_heads": 2}])
def test_forward_mode_ad_through_model(kw):
    """torch.func.jvp, jvp-of-grad (Hessian-vector products) and vmap work through the model; agree with autograd."""
    gen = torch.Generator().manual_seed(7)
    model = _model(gen, **kw)
    tokens, targets = addition_batch(2, generator=gen)
    params = {k: v.detach() for k, v in model.named_parameters()}
    v = {k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in params.items()}
    loss_fn = addition_mse_loss if model.config.attention == "linear" else addition_loss

    def loss(p):
        return loss_fn(functional_call(model, p, (tokens,)), targets)

    # reverse-mode references: ⟨∇ℓ, v⟩ and the double-backward Hessian-vector product
    p_req = {k: t.clone().requires_grad_(True) for k, t in params.items()}
    g = torch.autograd.grad(loss(p_req), list(p_req.values()), create_graph=True)
    gv = sum((gi * v[k]).sum() for gi, k in zip(g, p_req))
    hvp_ref = torch.autograd.grad(gv, list(p_req.values()))

    _, dloss = jvp(loss, (params,), (v,))
    torch.testing.assert_close(dloss, gv.detach(), rtol=1e-10, atol=1e-12)
    _, hvp = jvp(grad(loss), (params,), (v,))  # forward-over-reverse, as the Hessian tools do
    for k, ref in zip(p_req, hvp_ref):
        torch.testing.assert_close(hvp[k], ref, rtol=1e-9, atol=1e-11)

    # batched over several directions with vmap (Hutchinson-style), and per example over the token batch
    V = {k: torch.stack([torch.zeros_like(t), v[k], 2 * v[k]]) for k, t in params.items()}
    hvps = vmap(lambda u: jvp(grad(loss), (params,), (u,))[1])(V)
    for k in params:
        torch.testing.assert_close(hvps[k][1], hvp[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(hvps[k][2], 2 * hvp[k], rtol=1e-10, atol=1e-12)
        assert float(hvps[k][0].abs().max()) == 0.0
    per_example = vmap(lambda t: model(t[None])[0])(tokens)
    torch.testing.assert_close(per_example, model(tokens), rtol=1e-12, atol=1e-12)


def test_set_embedding_scale_changes_only_embeddings():
    model = GPT2Decoder(GPT2Config(d_model=16, n_layers=2), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_embedding_scale(3.0, torch.Generator().manual_seed(1))
    after = model.state_dict()
    emb = {"token_embedding.weight", "position_embedding.weight"}
    for k in before:
        if k in emb:
            assert not torch.equal(before[k], after[k])
        else:
            assert torch.equal(before[k], after[k]), k
    E = torch.cat([after[k].flatten() for k in sorted(emb)])  # 480 i.i.d. N(0, 9) entries
    assert abs(float(E.std()) / 3.0 - 1) < 0.15 and abs(float(E.mean())) < 0.5
    again = GPT2Decoder(GPT2Config(d_model=16, n_layers=2), generator=torch.Generator().manual_seed(0))
    again.set_embedding_scale(3.0, torch.Generator().manual_seed(1))
    assert all(torch.equal(after[k], again.state_dict()[k]) for k in after)
    with pytest.raises(EnergyInputError, match="sigma"):
        model.set_embedding_scale(-1.0)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_linear_attention_without_residual_is_homogeneous_of_degree_3_to_the_n(gen, n_layers):
    """MATH §3.6: linear attention without the attention residual (and no MLP) is homogeneous of degree 3ⁿ."""
    model = _model(gen, n_layers=n_layers, attention="linear", attn_residual_scale=0.0, mlp=False)
    with torch.no_grad():
        model.b_U.zero_()  # the unembedding bias (0 at initialisation) is the only non-homogeneous part left
    X = torch.randn(2, 18, 8, generator=gen, dtype=DT)
    s = 1.7
    torch.testing.assert_close(
        model.forward_embeddings(s * X), s ** (3**n_layers) * model.forward_embeddings(X), rtol=1e-10, atol=1e-12
    )
    softmax = _model(gen, n_layers=n_layers, attn_residual_scale=0.0, mlp=False)
    with torch.no_grad():
        softmax.b_U.zero_()
    ratio = softmax.forward_embeddings(s * X) / softmax.forward_embeddings(X)
    assert (ratio - s ** (3**n_layers)).abs().max() > 1e-3  # softmax attention is not


def test_linear_attention_formula(gen):
    """One linear-attention block (single head, causal) written out: X + ((κ Q Kᵀ) ⊙ tril) V W_O, then W_U."""
    model = _model(gen, n_layers=1, attention="linear", mlp=False)
    tokens = _tokens(gen)
    X = model.embed(tokens)
    a = model.blocks[0].attn
    T = (X @ a.W_Q) @ (X @ a.W_K).transpose(-1, -2) / 8**0.5
    A = T * torch.ones(18, 18, dtype=DT).tril()
    expected = (X + A @ X @ a.W_V @ a.W_O) @ model.W_U + model.b_U
    torch.testing.assert_close(model(tokens), expected, rtol=1e-12, atol=1e-12)


def test_mlp_baseline(gen):
    model = MLPBaseline(6, 3, d_hidden=5, generator=gen).to(DT)
    names = [k for k, _ in model.named_parameters()]
    assert names == ["token_embedding.weight", "position_embedding.weight"] + [f"layers.{i}.weight" for i in range(3)]
    tokens = _tokens(gen)
    X = model.embed(tokens)
    W = [layer.weight for layer in model.layers]
    torch.testing.assert_close(model(tokens), X @ (W[2] @ W[1] @ W[0]).T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.forward_embeddings(2.5 * X), 2.5 * model.forward_embeddings(X))
    relu = MLPBaseline(6, 3, d_hidden=5, activation="relu", generator=gen).to(DT)
    Xr = relu.embed(tokens)
    Wr = [layer.weight for layer in relu.layers]
    torch.testing.assert_close(relu(tokens), torch.relu(torch.relu(Xr @ Wr[0].T) @ Wr[1].T) @ Wr[2].T)
    before = [w.clone() for w in W]
    model.set_embedding_scale(0.1, gen)
    assert all(torch.equal(a, b) for a, b in zip(before, W))
    assert float(model.token_embedding.weight.detach().std()) < 0.2


def test_standard_encoder_shapes_and_padding(gen):
    torch.manual_seed(0)
    model = standard_encoder(8, 2, 2, n_classes=3, d_in=5, n_positions=10).to(DT).eval()
    X = torch.randn(4, 7, 5, generator=gen, dtype=DT)
    assert model(X).shape == (4, 3)
    # padded positions (marked by lengths) do not influence the logits
    lengths = torch.tensor([7, 5, 3, 6])
    X2 = X.clone()
    for b, L in enumerate(lengths.tolist()):
        X2[b, L:] = 100.0
    torch.testing.assert_close(model(X, lengths), model(X2, lengths), rtol=1e-10, atol=1e-10)
    assert isinstance(model.layers[0], nn.TransformerEncoderLayer)
    with pytest.raises(EnergyInputError, match="divisible"):
        standard_encoder(9, 1, 2)


def test_bad_input():
    model = GPT2Decoder(GPT2Config(d_model=4, n_layers=1))
    with pytest.raises(EnergyInputError, match="ids in"):
        model(torch.full((1, 5), 12, dtype=torch.long))
    with pytest.raises(EnergyInputError, match="seq_len"):
        model(torch.zeros(1, 19, dtype=torch.long))
    with pytest.raises(EnergyInputError, match="LongTensor"):
        model(torch.zeros(1, 5))
    with pytest.raises(EnergyInputError, match="layernorm"):
        GPT2Config(d_model=4, n_layers=1, layernorm="post")
    with pytest.raises(EnergyInputError, match="attention"):
        GPT2Config(d_model=4, n_layers=1, attention="relu")
    with pytest.raises(EnergyInputError, match="n_heads"):
        GPT2Config(d_model=5, n_layers=1, n_heads=2)
    with pytest.raises(EnergyInputError, match="n_layers"):
        GPT2Config(d_model=4, n_layers=0)
    with pytest.raises(EnergyInputError, match="activation"):
        MLPBaseline(4, 2, activation="tanh")


# ------------------------------------------------------------------ purity: every torch.func transform, float64


def _pure_model(name: str, n_layers: int = 2) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small float64 model, a batch of token ids and targets (the issue-#8 sizes: d_model = 3, n = 5)."""
    gen = torch.Generator().manual_seed(11)
    if name.startswith("gpt2"):
        kw = {"plain": {}, "preln-heads": {"layernorm": "pre", "n_heads": 3, "d_head": 2},
              "linear": {"attention": "linear"}}[name.split("-", 1)[1]]
        model: torch.nn.Module = _model(gen, d_model=3, n_layers=n_layers, d_mlp=4, seq_len=5, **kw)
    else:
        model = MLPBaseline(3, 3, d_hidden=4, activation="relu" if name.endswith("relu") else None, seq_len=5,
                            generator=gen).to(DT)
    tokens = torch.randint(0, 12, (2, 5), generator=gen)
    return model.eval(), tokens, torch.randint(0, 12, (2, 5), generator=gen)


PURE_MODELS = ["gpt2-plain", "gpt2-preln-heads", "gpt2-linear", "mlp-linear", "mlp-relu"]


def _ce(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1))


def _flat_fns(model, tokens, targets):
    """Logits and loss as functions of one flat parameter vector (so hessian/linearize give plain matrices)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def unflat(t):
        return dict(zip(names, (c.reshape(s) for c, s in zip(t.split([s.numel() for s in shapes]), shapes))))

    def logits(t):
        return functional_call(model, unflat(t), (tokens,))

    return theta, logits, lambda t: _ce(logits(t), targets)


@pytest.mark.parametrize("name", PURE_MODELS)
def test_every_transform_through_the_model(name):
    """grad, vjp, jvp, linearize, vmap and hessian pass through the model and agree with autograd (float64)."""
    model, tokens, targets = _pure_model(name)
    theta, logits, loss = _flat_fns(model, tokens, targets)
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(theta.shape, generator=gen, dtype=DT)
    u = torch.randn(logits(theta).shape, generator=gen, dtype=DT)
    check_transforms(logits, loss, theta, u, v)
    # vmap over the examples of the batch
    per_example = vmap(lambda t: model(t[None])[0])(tokens)
    torch.testing.assert_close(per_example, model(tokens), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cache", [False, True])
def test_curvature_operators_through_gpt2(cache):
    """Issue #8: ``FunctionalOperator(GPT2Decoder, ..., cache=True)`` crashed in ``linearize``; every part, cached or
    not, equals the dense autograd Hessian / GGN of the same loss."""
    from energy.hessian import FunctionalOperator, GGNOperator, HessianOperator

    model, tokens, targets = _pure_model("gpt2-preln-heads", n_layers=1)
    theta, logits, loss = _flat_fns(model, tokens, targets)
    t_req = theta.clone().requires_grad_(True)
    g = torch.autograd.grad(loss(t_req), t_req, create_graph=True)[0]
    H = torch.stack([torch.autograd.grad(g[i], t_req, retain_graph=True)[0] for i in range(theta.numel())])
    J = torch.autograd.functional.jacobian(logits, theta).reshape(-1, theta.numel())
    o = logits(theta).detach()
    H_o = torch.autograd.functional.hessian(lambda z: _ce(z.reshape(o.shape), targets), o.reshape(-1))
    G = J.T @ H_o @ J
    data = [(tokens, targets)]
    V = torch.randn(theta.numel(), 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    ops = {kind: cls(model, _ce, None, data, reduction="mean", cache=cache)
           for kind, cls in (("H", HessianOperator), ("G", GGNOperator), ("F", FunctionalOperator))}
    for _ in range(2):  # the second product reuses the cache
        torch.testing.assert_close(ops["H"] @ V, H @ V, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(ops["G"] @ V, G @ V, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(ops["F"] @ V, (H - G) @ V, rtol=1e-9, atol=1e-11)
        HV, GV = ops["H"].hessian_and_ggn(V)
        torch.testing.assert_close(HV, H @ V, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(GV, G @ V, rtol=1e-9, atol=1e-11)


def test_standard_encoder_transforms():
    """The encoder baseline (torch's own layers, eval mode, no padding) is transform-safe too: grad and vmap."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = standard_encoder(4, 1, 2, n_classes=3, d_ff=6).to(DT).eval()
    X = torch.randn(2, 5, 4, generator=gen, dtype=DT)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return functional_call(model, p, (X,)).square().sum()

    p_req = {k: t.clone().requires_grad_(True) for k, t in params.items()}
    ref = torch.autograd.grad(loss(p_req), list(p_req.values()))
    for k, r in zip(params, grad(loss)(params).values()):
        torch.testing.assert_close(r, ref[list(params).index(k)], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vmap(lambda x: model(x[None])[0])(X), model(X), rtol=1e-12, atol=1e-12)
