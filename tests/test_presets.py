"""Presets: the weight-tied model of Yang et al. (2022), the Energy-Transformer block, re-exports."""

from __future__ import annotations

import pytest
import torch
from _helpers import DT

from energy._validation import EnergyInputError
from energy.attention import softmax_beta
from unfold import presets, standard
from unfold.presets import (
    UnrolledClassifier,
    energy_transformer_block,
    init_signal_preserving_,
    parameter_count,
    yang2022,
)
from unfold.unroller import load_model, save_model


def test_yang2022_structure():
    model = yang2022()
    body = model.body
    assert body.d == 300 and body.depth == 12 and body.tied
    assert body.schedule == ["attention", "ffn", "relu"]
    att, ffn, _ = body.layer(0)
    assert float(att.alpha) == 1.0 and float(ffn.alpha) == 1.0 and att.heads == 1
    assert ffn.spectrum == (0.0, 0.95)
    assert all(body.layer(i)[0] is att for i in range(12))  # one set of weights for all 12 layers
    assert model.head is None
    assert yang2022(relu=False).body.schedule == ["attention", "ffn"]
    assert yang2022(normalization="layernorm").body.schedule == ["attention", "ffn", "relu", "layernorm"]
    assert yang2022(d=8, depth=1, normalization="rmsnorm", norm_eps=1e-5).body.layer(0)[3].eps == 1e-5
    # tied: the parameter count does not grow with depth
    assert parameter_count(yang2022(d=8, depth=2)) == parameter_count(yang2022(d=8, depth=7))


def test_yang2022_one_layer_is_the_papers_update(gen):
    """Layer = Y ← softmax_β(Y W Yᵀ) Y, then Y ← ReLU(−Y W_f + 1bᵀ) (α = 1)."""
    torch.manual_seed(0)
    model = yang2022(d=6, depth=1).double()
    Y = torch.randn(2, 5, 6, generator=gen, dtype=DT)
    att, ffn, _ = model.body.layer(0)
    W = att.W[0].detach()
    Y1 = softmax_beta(Y, W) @ Y
    want = torch.relu(-Y1 @ ffn.W_f.detach() + ffn.b.detach())
    torch.testing.assert_close(model(Y), want, rtol=0, atol=1e-12)


def test_classifier_head_trace_and_training_step(gen):
    torch.manual_seed(1)
    model = yang2022(d=8, depth=3, d_in=5, n_classes=4).double()
    X = torch.randn(6, 7, 5, generator=gen, dtype=DT)
    logits, info = model(X, trace=True)
    assert logits.shape == (6, 4) and info["energies"]["total"].shape == (10, 6)
    torch.testing.assert_close(model(X), logits, rtol=0, atol=0)
    torch.testing.assert_close(info["states"][0], model.embed(X), rtol=0, atol=0)
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(6) % 4)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(EnergyInputError, match="X"):
        model(torch.randn(6, 7, 4, dtype=DT))


def test_save_load_classifier(tmp_path, gen):
    torch.manual_seed(2)
    model = yang2022(d=8, depth=2, d_in=3, n_classes=2, heads=2, orthogonal_heads=True).double()
    save_model(model, tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt")
    assert isinstance(loaded, UnrolledClassifier)
    X = torch.randn(2, 4, 3, generator=gen, dtype=DT)
    torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=1e-12)


def test_energy_transformer_block(gen):
    torch.manual_seed(3)
    model = energy_transformer_block(d=8, depth=4, heads=2, n_classes=3).double()
    assert model.body.schedule == ["energy_transformer"] and model.body.tied
    X = torch.randn(2, 5, 8, generator=gen, dtype=DT)
    with pytest.warns(UserWarning):  # no uniform step size is guaranteed for the ET (MATH §2.2)
        logits, info = model(X, trace=True)
    assert logits.shape == (2, 3) and set(info["energies"]) == {"E_et", "total"}


def test_bad_preset_arguments():
    with pytest.raises(EnergyInputError, match="normalization"):
        yang2022(d=4, depth=1, normalization="batchnorm")
    with pytest.raises(EnergyInputError, match="body"):
        UnrolledClassifier(torch.nn.Linear(2, 2))


def test_standard_models_reexported():
    for name in ("GPT2Config", "GPT2Decoder", "MLPBaseline", "StandardEncoderClassifier", "standard_encoder"):
        assert getattr(presets, name) is getattr(standard, name)


# ----------------------------------------------------------------------------------------------------------------------
# init_signal_preserving_
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True])
def test_init_signal_preserving_sets_spectrum_bias_and_input_map(seed, relu):
    torch.manual_seed(seed)
    model = yang2022(d=24, depth=3, relu=relu, d_in=5, n_classes=3).double()
    M_before = model.body.layer(0)[0].M.detach().clone()
    g = torch.Generator().manual_seed(seed)
    out = init_signal_preserving_(model, ffn_band=(0.6, 0.9), ffn_bias=0.5, input_std=2.0, generator=g)
    assert out is model
    att, ffn = model.body.layer(0)[:2]
    original = ffn.parametrizations.W_f.original.detach()
    lam = torch.linalg.eigvalsh(original)
    assert float(lam.min()) >= 0.6 and float(lam.max()) <= 0.9  # inside the band ...
    assert float(torch.diff(lam).min()) > 1e-8  # ... distinct ...
    torch.testing.assert_close(ffn.W_f.detach(), original, rtol=0, atol=1e-12)  # ... so the clip is the identity
    torch.testing.assert_close(ffn.b.detach(), torch.full((24,), 0.5, dtype=DT), rtol=0, atol=0)
    torch.testing.assert_close(att.M.detach(), M_before, rtol=0, atol=0)  # M untouched
    W_in = model.input_proj.weight.detach()
    assert abs(float(W_in.std()) - 2.0) < 0.5  # 120 entries of N(0, 4)
    assert float(att.alpha) == 1.0 and float(ffn.alpha) == 1.0 and ffn.spectrum == (0.0, 0.95)
    # every eigenvalue of W_f receives a gradient (none sits outside the band, where the clip's derivative is 0)
    Y = torch.rand(2, 4, 24, dtype=DT)
    (model.body(Y) ** 2).sum().backward()
    G = ffn.parametrizations.W_f.original.grad
    _, V = torch.linalg.eigh(original)
    assert float((V.T @ G @ V).diagonal().abs().min()) > 0


def test_init_signal_preserving_is_reproducible_and_keeps_the_default_input_map():
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = yang2022(d=8, depth=2, d_in=3, n_classes=2)
        W_in = m.input_proj.weight.detach().clone()
        init_signal_preserving_(m, input_std=None, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(m.input_proj.weight.detach(), W_in, rtol=0, atol=0)
        models.append(m)
    for (ka, va), (kb, vb) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_init_signal_preserving_passes_the_input_through_depth(gen):
    """The reason for the initialiser (measured): the input-dependent part of the output survives 12 tied layers."""

    def gain(model: UnrolledClassifier) -> float:
        X = torch.rand(64, 6, 4, generator=gen, dtype=DT)
        with torch.no_grad():
            P_in, P_out = model.embed(X).mean(-2), model.body(model.embed(X)).mean(-2)
        return float(torch.linalg.norm(P_out - P_out.mean(0)) / torch.linalg.norm(P_in - P_in.mean(0)))

    torch.manual_seed(0)
    preset = yang2022(d=16, depth=12, d_in=4, n_classes=3).double()
    signal = init_signal_preserving_(yang2022(d=16, depth=12, d_in=4, n_classes=3).double(),
                                     generator=torch.Generator().manual_seed(0))
    assert gain(preset) < 1e-3 < 1e-2 < gain(signal)


def test_init_signal_preserving_bad_arguments():
    model = yang2022(d=6, depth=1, d_in=3, n_classes=2)
    with pytest.raises(EnergyInputError, match="ffn_band"):
        init_signal_preserving_(model, ffn_band=(0.5, 1.2))  # outside the clip band [0, 0.95]
    with pytest.raises(EnergyInputError, match="ffn_band"):
        init_signal_preserving_(model, ffn_band=(0.9, 0.9))
    with pytest.raises(EnergyInputError, match="input_std"):
        init_signal_preserving_(model, input_std=0.0)
    with pytest.raises(EnergyInputError, match="model"):
        init_signal_preserving_(torch.nn.Linear(2, 2))
    with pytest.raises(EnergyInputError, match="FFN"):
        init_signal_preserving_(energy_transformer_block(d=8, depth=1, heads=2))


# ---------------------------------------------------------------------------- purity of the classifier wrapper


@pytest.mark.filterwarnings("ignore::energy._validation.StepSizeWarning")  # ET: no uniform guaranteed step size
@pytest.mark.parametrize("preset", ["yang2022", "energy_transformer_block"])
def test_preset_classifier_under_transforms(preset):
    """The classifier's own parts (input map metadata check, pooling, head) read no value: grad over the parameters
    (through the parametrised weights), jvp and vmap over the inputs agree with autograd / the batched call.
    (``linearize`` through the attention step waits on the steps' pure forwards.)"""
    from torch.func import functional_call, grad, jvp, vmap

    torch.manual_seed(0)
    if preset == "yang2022":
        model = yang2022(d=4, depth=2, d_in=3, n_classes=2, fused=False)
    else:
        model = energy_transformer_block(d=4, depth=2, heads=2, d_in=3, n_classes=2, alpha=0.01)
    model = model.double().eval()
    X = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return functional_call(model, p, (X,)).square().sum()

    p_req = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = dict(zip(p_req, torch.autograd.grad(loss(p_req), list(p_req.values()))))
    for k, g in grad(loss)(params).items():
        torch.testing.assert_close(g, ref[k], rtol=1e-10, atol=1e-12)
    V = torch.randn(X.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    X_req = X.clone().requires_grad_(True)
    out = model(X_req)
    w = torch.zeros_like(out, requires_grad=True)
    jvp_ref = torch.autograd.grad((torch.autograd.grad(out, X_req, w, create_graph=True)[0] * V).sum(), w)[0]
    torch.testing.assert_close(jvp(model, (X,), (V,))[1], jvp_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vmap(lambda x: model(x[None])[0])(X), model(X), rtol=1e-12, atol=1e-12)


def test_classifier_passes_the_trace_granularity_to_its_body():
    """``trace="layer"`` records the layer boundaries only (a regression: it once recorded every step)."""
    model = presets.yang2022(d=8, depth=3).double()
    X = torch.randn(2, 4, 8, dtype=torch.float64)
    _, layer = model(X, trace="layer")
    _, step = model(X, trace="step")
    assert layer["trace"] == "layer" and len(layer["states"]) == 3 + 1
    assert step["trace"] == "step" and len(step["states"]) == 3 * len(model.body.step_kinds) + 1
    for a, b in zip(layer["states"], step["states"][:: len(model.body.step_kinds)]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
