"""The unroller (unfold.unroller): traces, energies with the step's own metric, bad input, checkpoints."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _helpers import DT
from hypothesis import given, settings
from hypothesis import strategies as st

from energy._validation import ConstraintError, EnergyInputError, StepSizeWarning
from energy.attention import softmax_beta
from energy.ffn import FFNEnergy
from unfold.modelfile import CheckpointError, constrained_state_dict, load_model, save_model
from unfold.parametrizations import SpectrumClip
from unfold.steps import AttentionStep, FFNStep
from unfold.unroller import Unrolled, unroll

TOL = dict(rtol=0, atol=1e-11)


def _model(seed: int, **kw) -> Unrolled:
    torch.manual_seed(seed)
    kw.setdefault("depth", 3)
    kw.setdefault("d", 6)
    return unroll(kw.pop("schedule", ["attention", "ffn", "relu"]), **kw).double()


def _Y(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=DT)


def test_trace_structure_and_plain_forward_equal(gen, seed):
    model = _model(seed)
    Y = _Y(gen, 2, 5, 6)
    out, info = model(Y, trace=True)
    torch.testing.assert_close(model(Y), out, rtol=0, atol=0)
    T = 3 * 3
    assert len(info["states"]) == T + 1 and info["states"][0] is Y
    torch.testing.assert_close(info["states"][-1], out, rtol=0, atol=0)
    assert info["step_names"] == ["attention", "ffn", "relu"] * 3
    assert set(info["energies"]) == {"E_att", "E_ffn", "total"}
    for v in info["energies"].values():
        assert v.shape == (T + 1, 2)
    torch.testing.assert_close(info["energies"]["total"], info["energies"]["E_att"] + info["energies"]["E_ffn"],
                               **TOL)


def test_states_only_trace_and_deferred_energies(gen):
    model = _model(3)
    Y = _Y(gen, 2, 5, 6)
    out, info = model(Y, trace=True)
    out2, info2 = model(Y, trace=True, energies=False)
    assert info2["energies"] == {} and len(info2["states"]) == len(info["states"])
    later = model.trace_energies(info2["states"])
    for k, v in info["energies"].items():
        torch.testing.assert_close(later[k], v, **TOL)
    with pytest.raises(EnergyInputError, match="states"):
        model.trace_energies(info2["states"][:-1])


def test_trace_energies_equal_independent_evaluation_with_the_forward_metric(gen, seed):
    """Regression (authors' defect: W Wᵀ in the energy, Wᵀ W in the forward): the traced E_att uses the metric of
    the forward step. Checked against a hand-written energy and step with W = M Mᵀ/√k, and against the transposed
    metric, which must differ."""
    torch.manual_seed(seed)
    d = 5
    model = unroll(["attention", "ffn"], depth=2, d=d, attention={"k": d}).double()
    Y = _Y(gen, 3, 4, d)
    out, info = model(Y, trace=True)
    M = model.layer(0)[0].M[0].detach()
    W = M @ M.T / math.sqrt(d)
    W_wrong = M.T @ M / math.sqrt(d)
    assert (W - W_wrong).abs().max() > 1e-3  # M is not normal: the two metrics differ

    def e_att(Z, W):
        G = Z @ W @ Z.transpose(-1, -2)
        g = G.diagonal(dim1=-2, dim2=-1)
        z = 0.5 * (g[..., :, None] + g[..., None, :]) - G
        iu = torch.triu_indices(Z.shape[-2], Z.shape[-2], 1)
        return -torch.exp(-z[..., iu[0], iu[1]]).sum(-1)

    # the forward step is softmax_β(Y W Yᵀ) Y with this W
    torch.testing.assert_close(info["states"][1], softmax_beta(Y, W) @ Y, **TOL)
    for t, state in enumerate(info["states"]):
        torch.testing.assert_close(info["energies"]["E_att"][t], e_att(state, W), **TOL)
        assert (info["energies"]["E_att"][t] - e_att(state, W_wrong)).abs().max() > 1e-6
    ffn = model.layer(0)[1]
    E_f = FFNEnergy(ffn.W_f.detach(), ffn.b.detach())
    for t, state in enumerate(info["states"]):
        torch.testing.assert_close(info["energies"]["E_ffn"][t], E_f.energy(state), **TOL)


def test_each_step_descends_its_own_energy_term(gen, seed):
    """Yang et al. model at init (α = 1, W_f spectrum in [0, 0.95]): the attention step never increases E_att, the
    FFN step never increases E_ffn, the ReLU projection after the FFN step never increases E_ffn (projected gradient
    from a feasible point) — MATH §1.1, §1.3. The sum need not decrease (MATH §1.6)."""
    model = _model(seed, depth=4)
    Y = torch.relu(_Y(gen, 4, 6, 6))
    _, info = model(Y, trace=True)
    E = info["energies"]
    for t, name in enumerate(info["step_names"]):
        if name == "attention":
            assert (E["E_att"][t + 1] <= E["E_att"][t] + 1e-10).all()
        if name == "ffn":
            assert (E["E_ffn"][t + 1] <= E["E_ffn"][t] + 1e-10).all()
        if name == "relu" and t >= 2:  # E_ffn + ι: from the feasible state before the FFN step
            assert (E["E_ffn"][t + 1] <= E["E_ffn"][t - 1] + 1e-10).all()


def test_plain_forward_evaluates_no_energy(gen, monkeypatch):
    model = _model(0)
    Y = _Y(gen, 2, 5, 6)

    def boom(*a, **k):
        raise AssertionError("energy evaluated in a plain forward")

    monkeypatch.setattr(AttentionStep, "energy_at", boom)
    monkeypatch.setattr(FFNStep, "energy_at", boom)
    model(Y)  # no trace: must not call .energy
    with pytest.raises(AssertionError, match="plain forward"):
        model(Y, trace=True)


def test_parametrisations_evaluated_once_per_forward(gen, monkeypatch):
    calls = {"n": 0}
    original = SpectrumClip.forward

    def counting(self, A):
        calls["n"] += 1
        return original(self, A)

    monkeypatch.setattr(SpectrumClip, "forward", counting)
    model = _model(0, depth=6)
    calls["n"] = 0
    model(_Y(gen, 2, 5, 6), trace=True)
    assert calls["n"] == 1  # depth 6, tied: one eigendecomposition per forward


def test_untied_layers_and_layer_of_state(gen):
    model = _model(1, tied=False, depth=3)
    assert len(model.layers) == 3
    assert model.layer(0)[0] is not model.layer(1)[0]
    Y = _Y(gen, 2, 4, 6)
    _, info = model(Y, trace=True)
    assert info["layer_of_state"] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    for t, state in enumerate(info["states"]):
        ell = info["layer_of_state"][t]
        E = model.layer(ell)[0].energy
        torch.testing.assert_close(info["energies"]["E_att"][t], E.energy(state), **TOL)
    assert set(model.energy(Y, layer=2)) == {"E_att", "E_ffn", "total"}
    E2 = model.composite_energy(2)
    torch.testing.assert_close(E2.energy(info["states"][-1]), info["energies"]["total"][-1], **TOL)
    assert unroll(["relu"], depth=1, d=6).composite_energy() is None


def test_duplicate_terms_are_named_apart_and_gradients_flow(gen):
    model = _model(2, schedule=["attention", "ffn", "attention"], depth=2)
    Y = _Y(gen, 2, 4, 6)
    out, info = model(Y, trace=True)
    assert set(info["energies"]) == {"E_att", "E_ffn", "E_att#2", "total"}
    (out.sum() + info["energies"]["total"].sum()).backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_step_modules_and_alphas_in_schedule(gen):
    step = AttentionStep(6, heads=2).double()
    model = Unrolled([step, ("ffn", {"spectrum": None})], depth=2, d=6, alphas={"ffn": 0.5})
    assert model.layer(0)[0] is step
    assert float(model.layer(0)[1].alpha) == 0.5
    model2 = unroll(["attention", "ffn", "relu"], depth=1, d=4, alphas=0.25)
    assert [float(getattr(s, "alpha", torch.tensor(-1.0))) for s in model2.layer(0)][:2] == [0.25, 0.25]



def test_nn_module_apply_initialises_every_unfolded_model(gen):
    """``nn.Module.apply(fn)`` (the standard weight-initialisation idiom) works on an unfolded model: the steps' own
    method is ``forward_prepared``, not ``apply``; the re-initialised model's trace still ends at the plain forward."""
    import unfold

    model = unfold.yang2022(d=8, depth=2).double()
    seen: list[torch.nn.Module] = []

    def init_fn(module: torch.nn.Module) -> None:
        seen.append(module)
        if isinstance(module, AttentionStep):
            with torch.no_grad():
                module.M.copy_(0.3 * torch.randn(module.M.shape, generator=gen, dtype=DT))

    assert model.apply(init_fn) is model
    assert any(isinstance(m, AttentionStep) for m in seen) and any(isinstance(m, FFNStep) for m in seen)
    Y = _Y(gen, 2, 5, 8)
    out, info = model(Y, trace=True)
    torch.testing.assert_close(out, model(Y), rtol=0, atol=0)
    torch.testing.assert_close(info["states"][-1], out, rtol=0, atol=0)


@pytest.mark.parametrize("trace", ["step", "layer"])
@pytest.mark.parametrize("schedule", [["hopfield"], ["energy_transformer"], ["attention", "layernorm"]])
def test_trace_under_torch_func_transforms_equals_eager(schedule, trace, gen):
    """The traced forward reads no tensor value back to Python: ``torch.func.grad`` of the traced total energy equals
    the eager autograd gradient, and ``jvp`` of the states and energies equals central differences (the other
    schedules and ``vmap`` join once every step is pure, issue #8)."""
    torch.manual_seed(12)
    model = unroll(schedule, depth=2, d=6, tied=False).double()
    Y, V = _Y(gen, 2, 4, 6), _Y(gen, 2, 4, 6)

    def run(Yb):
        out, info = model(Yb, trace=trace)
        return out, torch.stack(info["states"]), info["energies"]["total"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)  # the ET has no guaranteed step size
        out, states, total = run(Y)
        torch.testing.assert_close(out, model(Y), rtol=0, atol=0)
        g = torch.func.grad(lambda y: run(y)[2].sum())(Y)
        Yr = Y.clone().requires_grad_(True)
        (g_eager,) = torch.autograd.grad(run(Yr)[2].sum(), Yr)
        torch.testing.assert_close(g, g_eager, **TOL)
        if schedule[0] == "attention":  # the fused attention step writes the key bias in place (not jvp-safe yet)
            return
        primal, tangent = torch.func.jvp(run, (Y,), (V,))
        for a, b in zip(primal, (out, states, total)):
            torch.testing.assert_close(a, b, **TOL)
        eps = 1e-6
        plus, minus = run(Y + eps * V), run(Y - eps * V)
        for t, p, m in zip(tangent, plus, minus):
            torch.testing.assert_close(t, (p - m) / (2 * eps), rtol=1e-5, atol=1e-6)

# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_schedules_depth_widths():
    with pytest.raises(EnergyInputError, match=r"unknown step 'attn'.*valid names: attention, energy_transformer, ffn"):
        unroll(["attn", "ffn"], depth=2, d=4)
    with pytest.raises(EnergyInputError, match="depth"):
        unroll(["attention"], depth=0, d=4)
    with pytest.raises(EnergyInputError, match="depth"):
        unroll(["attention"], depth=-3, d=4)
    with pytest.raises(EnergyInputError, match="non-empty"):
        Unrolled([], depth=2, d=4)
    with pytest.raises(EnergyInputError, match="non-empty"):
        Unrolled("attention", depth=2, d=4)
    with pytest.raises(EnergyInputError, match=r"width d = 5, but the model width is d = 4"):
        Unrolled([AttentionStep(5), "ffn"], depth=2, d=4)
    with pytest.raises(EnergyInputError, match="step_kwargs.*'mlp'"):
        Unrolled(["ffn"], depth=1, d=4, step_kwargs={"mlp": {}})
    with pytest.raises(EnergyInputError, match="bad arguments for step 'ffn'"):
        unroll(["ffn"], depth=1, d=4, ffn={"heads": 2})
    with pytest.raises(EnergyInputError, match="tied=True"):
        Unrolled([FFNStep(4)], depth=2, d=4, tied=False)
    with pytest.raises(EnergyInputError, match=r"`alphas` must give each step a finite real step size, got nan"):
        unroll(["attention", "ffn"], depth=1, d=4, alphas={"ffn": float("nan")})
    with pytest.raises(EnergyInputError, match="finite real step size, got '1'"):
        unroll(["attention"], depth=1, d=4, alphas="1")
    model = unroll(["attention"], depth=1, d=4)
    with pytest.raises(EnergyInputError, match=r"`Y` must end with shape \(\*, 4\)"):
        model(torch.randn(2, 3, 5))


# --------------------------------------------------------------------------------------------------- checkpoints


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_roundtrip(tmp_path, gen):
    model = _model(3, attention={"heads": 2, "orthogonal_heads": True})
    path = tmp_path / "m.pt"
    save_model(model, path)
    loaded = load_model(path)
    Y = _Y(gen, 2, 4, 6)
    torch.testing.assert_close(loaded(Y), model(Y), rtol=0, atol=1e-12)  # rebuilt in the saved precision


def test_corrupt_and_mismatched_files(tmp_path):
    model = _model(4)
    path = tmp_path / "m.pt"
    save_model(model, path)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "trunc.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an unfold model file"):
        load_model(tmp_path / "other.pt")


def test_mismatched_state_dict_loads_nothing(gen):
    model = _model(5)
    other = _model(6, attention={"heads": 2})  # different keys? same keys, different M shape
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        model.load_state_dict(other.state_dict())
    assert _same(before, _snapshot(model))
    sd = other.state_dict()
    sd.pop("layers.0.1.b")
    with pytest.raises(CheckpointError, match=r"missing keys \['layers.0.1.b'\]"):
        model.load_state_dict(sd)
    deeper = _model(7, tied=False)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        model.load_state_dict(deeper.state_dict())
    assert _same(before, _snapshot(model))
    sd = model.state_dict()
    sd["layers.0.0.M"] = torch.full_like(sd["layers.0.0.M"], float("nan"))
    with pytest.raises(CheckpointError, match="NaN"):
        model.load_state_dict(sd)
    sd = {k: v.float() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="dtype torch.float32.*model.to"):
        model.load_state_dict(sd)
    assert _same(before, _snapshot(model))


def test_constrained_state_dict_checked_on_load(gen):
    model = _model(8)
    csd = constrained_state_dict(model)
    assert "layers.0.1.W_f" in csd and not any("original" in k for k in csd)
    fresh = _model(9)
    fresh.load_state_dict(csd)
    Y = _Y(gen, 2, 4, 6)
    torch.testing.assert_close(fresh(Y), model(Y), **TOL)
    before = _snapshot(fresh)
    bad = dict(csd)
    bad["layers.0.1.W_f"] = torch.diag(torch.linspace(0, 1.5, 6, dtype=DT))
    with pytest.raises(ConstraintError, match=r"SpectrumClip.*layers.0.1.W_f"):
        fresh.load_state_dict(bad)
    bad["layers.0.1.W_f"] = _Y(gen, 6, 6)
    with pytest.raises(ConstraintError, match="symmetric"):
        fresh.load_state_dict(bad)
    assert _same(before, _snapshot(fresh))


def test_orthogonal_heads_violation_on_load(gen):
    model = _model(10, attention={"heads": 2, "k": 2, "orthogonal_heads": True})
    csd = constrained_state_dict(model)
    other = _model(11, attention={"heads": 2, "k": 2, "orthogonal_heads": True})
    other.load_state_dict(csd)  # valid constrained M: loads, reproduces the model
    Y = _Y(gen, 2, 4, 6)
    torch.testing.assert_close(other(Y), model(Y), **TOL)
    before = _snapshot(other)
    csd["layers.0.0.M"] = _Y(gen, 2, 6, 2)
    with pytest.raises(ConstraintError, match="OrthogonalHeads"):
        other.load_state_dict(csd)
    assert _same(before, _snapshot(other))


@settings(max_examples=25)
@given(alpha_att=st.floats(0.05, 1.95), alpha_ffn=st.floats(0.05, 1.0), heads=st.sampled_from([1, 2]),
       n=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_property_steps_descend_own_terms_inside_guaranteed_ranges(alpha_att, alpha_ffn, heads, n, seed):
    """Inside the guaranteed ranges (MATH §1.1(a) Gaussian α ∈ (0, 2), orthogonal heads; §1.3 α < 2/λ_max(I + W_f),
    here ≤ 1 < 2/1.95), every attention step decreases E_att and every FFN step decreases E_ffn, at any depth."""
    torch.manual_seed(seed)
    model = unroll(["attention", "ffn"], depth=3, d=4, alphas={"attention": alpha_att, "ffn": alpha_ffn},
                   attention={"heads": heads, "orthogonal_heads": heads > 1}).double()
    Y = torch.randn(2, n, 4, generator=torch.Generator().manual_seed(seed), dtype=DT)
    with torch.no_grad():
        _, info = model(Y, trace=True)
    E = info["energies"]
    for t, name in enumerate(info["step_names"]):
        term = E["E_att"] if name == "attention" else E["E_ffn"]
        assert (term[t + 1] <= term[t] + 1e-9 * (1 + term[t].abs())).all()


@pytest.mark.parametrize("schedule,kw", [
    (["hopfield"], {}),
    (["energy_transformer"], {}),
    (["tied_ffn", "layernorm", "rmsnorm"], {}),
    (["attention", "ffn"], {"attention": {"kernel": "power", "kernel_kwargs": {"p": 1.0}, "preconditioner": "token",
                                          "learn_alpha": True}}),
])
def test_every_step_kind_saves_and_loads(tmp_path, schedule, kw):
    torch.manual_seed(0)
    model = unroll(schedule, depth=2, d=6, tied=False, **kw).double()
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    Y = torch.randn(2, 4, 6, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)  # the ET has no guaranteed step size
        torch.testing.assert_close(loaded(Y), model(Y), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ trace granularity, cost


def _explicit_energies(model: Unrolled, info: dict) -> dict[str, torch.Tensor]:
    """Every term at every recorded state, evaluated afterwards by the energy objects of the layer that acts next."""
    out = {}
    for j, name in enumerate(model.term_names):
        if name is None:
            continue
        out[name] = torch.stack([model.layer(ell)[j].energy.energy(Y)
                                 for Y, ell in zip(info["states"], info["layer_of_state"])])
    return out


TRACE_MODELS = [
    ("yang-fused", dict(schedule=["attention", "ffn", "relu"])),
    ("untied-2heads", dict(schedule=["attention", "ffn", "relu"], tied=False,
                           attention={"heads": 2, "orthogonal_heads": True})),
    ("power-token", dict(schedule=["attention", "ffn"], attention={"kernel": "power", "kernel_kwargs": {"p": 1.0},
                                                                   "preconditioner": "token", "alpha": 0.05})),
    ("attention-second", dict(schedule=["ffn", "attention", "relu", "attention"])),
]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
@pytest.mark.parametrize("trace", ["step", "layer"])
@pytest.mark.parametrize("name,kw", TRACE_MODELS, ids=[m[0] for m in TRACE_MODELS])
def test_traced_energies_equal_energies_evaluated_afterwards(name, kw, trace, grad, gen):
    """Energies the attention steps return in passing (z / log-normalisers of the step) and the ones evaluated
    during the pass equal the energy objects' ``energy`` on the recorded states, float64, 1e-12."""
    model = _model(int(gen.initial_seed()), depth=3, **kw)
    Y = _Y(gen, 2, 5, 6)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)
        out, info = model(Y, trace=trace)
        plain = model(Y)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-12)
    want = _explicit_energies(model, info)
    assert set(info["energies"]) == set(want) | {"total"}
    for key, v in want.items():
        assert info["energies"][key].shape == (len(info["states"]), 2)
        torch.testing.assert_close(info["energies"][key], v, rtol=0, atol=1e-12)
    torch.testing.assert_close(info["energies"]["total"], sum(want.values()), rtol=0, atol=1e-12)
    assert info["energies"]["total"].requires_grad == grad


@pytest.mark.parametrize("name,kw", TRACE_MODELS, ids=[m[0] for m in TRACE_MODELS])
def test_layer_trace_is_the_subsampled_step_trace(name, kw, gen):
    model = _model(3, depth=3, **kw)
    S = len(model.schedule)
    Y = _Y(gen, 2, 5, 6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSizeWarning)
        out_s, step = model(Y, trace=True)
        out_l, layer = model(Y, trace="layer")
    torch.testing.assert_close(out_l, out_s, rtol=0, atol=1e-12)
    assert step["trace"] == "step" and layer["trace"] == "layer"
    assert step["t"] == list(range(3 * S + 1)) and layer["t"] == list(range(0, 3 * S + 1, S))
    assert layer["step_names"] == step["step_names"]
    assert layer["layer_of_state"] == [step["layer_of_state"][t] for t in layer["t"]] == [0, 1, 2, 2]
    assert len(layer["states"]) == 4
    for i, t in enumerate(layer["t"]):
        torch.testing.assert_close(layer["states"][i], step["states"][t], rtol=0, atol=1e-12)
    for key, v in step["energies"].items():
        torch.testing.assert_close(layer["energies"][key], v[layer["t"]], rtol=0, atol=1e-12)
    later = model.trace_energies(layer["states"], trace="layer")  # deferred evaluation, same numbers
    for key, v in layer["energies"].items():
        torch.testing.assert_close(later[key], v, rtol=0, atol=1e-12)
    with pytest.raises(EnergyInputError, match="trace='layer'"):
        model.trace_energies(step["states"], trace="layer")


@pytest.mark.parametrize("fused", [True, False])
def test_attention_energy_is_evaluated_only_where_no_step_computed_it(fused, gen, monkeypatch):
    """Yang et al. schedule, depth D: the step trace needs E_att at 3D + 1 states, D of them come from the attention
    steps, so 2D + 1 explicit evaluations remain; the layer trace needs D + 1, explicit: 1 (the last state). E_ffn is
    evaluated at every recorded state. The plain forward evaluates none."""
    D = 4
    model = _model(1, depth=D, attention={"fused": fused})
    calls = {"E_att": 0, "E_ffn": 0}
    att_energy, ffn_energy = AttentionStep.energy_at, FFNStep.energy_at

    def counting(name, fn):
        def wrapped(self, *a, **k):
            calls[name] += 1
            return fn(self, *a, **k)
        return wrapped

    monkeypatch.setattr(AttentionStep, "energy_at", counting("E_att", att_energy))
    monkeypatch.setattr(FFNStep, "energy_at", counting("E_ffn", ffn_energy))
    Y = _Y(gen, 2, 5, 6)
    with torch.no_grad():
        model(Y)
        assert calls == {"E_att": 0, "E_ffn": 0}
        model(Y, trace="step")
        assert calls == {"E_att": 2 * D + 1, "E_ffn": 3 * D + 1}
        calls.update(E_att=0, E_ffn=0)
        model(Y, trace="layer")
        assert calls == {"E_att": 1, "E_ffn": D + 1}


def test_bad_trace_argument(gen):
    model = _model(0)
    _, info = model(_Y(gen, 2, 5, 6), trace="layer", energies=False)
    info["states"][2] = torch.full_like(info["states"][2], float("nan"))
    with pytest.raises(EnergyInputError, match=r"states\[2\]"):
        model.trace_energies(info["states"], trace="layer")
    with pytest.raises(EnergyInputError, match=r"`trace` must be False, True / 'step'.*'layer'.*got 'layers'"):
        model(_Y(gen, 2, 5, 6), trace="layers")
