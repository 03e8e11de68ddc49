"""Model families (unfold.families, MATH §7): every family builds, trains, saves, and keeps its stated guarantee."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from energy._validation import EnergyInputError
from unfold.certificate import descent_certificate
from unfold.families import FAMILIES, build_classifier, family_names
from unfold.modelfile import load_model, save_model
from unfold.train import train

f64 = torch.float64


def _model(family: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    args = {"d_in": 3, "d": 8, "depth": 2, "heads": 2, "n_outputs": 4, **kw}
    return build_classifier(family, **args).double()


def _X(seed: int = 0, b: int = 5, n: int = 6) -> torch.Tensor:
    return torch.randn(b, n, 3, dtype=f64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", family_names())
def test_every_family_builds_traces_and_certifies(family):
    spec = FAMILIES[family]
    assert spec.name == family and spec.description and "MATH §" in spec.guarantee
    model = _model(family, heads=1 if family.startswith("yang2022") else 2)  # yang2022: the paper's one head
    X = _X()
    logits, info = model(X, trace=True)
    assert logits.shape == (5, 4) and torch.equal(logits, model(X))
    assert info["energies"]["total"].shape[-1] == 5
    cert = descent_certificate(model, X)
    assert cert.family == family and cert.violations == 0
    if spec.certifiable:
        assert cert.certified, cert.summary()
    else:
        assert cert.guaranteed_share < 1.0 and any(e.guarantee == "none" for e in cert.steps)
    json.loads(cert.to_json())


@pytest.mark.parametrize("family", family_names())
def test_every_family_trains_a_few_steps_and_round_trips(family, tmp_path):
    torch.manual_seed(0)
    heads = 1 if family.startswith("yang2022") else 2
    model = build_classifier(family, d_in=3, d=8, depth=2, heads=heads, n_outputs=4)
    X, y = torch.randn(8, 5, 3), torch.randint(0, 4, (8,))
    res = train(model, torch.nn.functional.cross_entropy, [(X, y)] * 3, steps=3, lr=1e-2, progress=False, seed=0)
    assert len(res.history) == 3 and all(math.isfinite(v) for v in res.history)
    path = save_model(model, tmp_path / "m.pt")
    back = load_model(path)
    assert back.family == family
    torch.testing.assert_close(back(X), model(X), rtol=0, atol=0)


def test_learned_steps_stay_inside_their_ranges_after_training():
    torch.manual_seed(1)
    model = build_classifier("learned_steps", d_in=3, d=8, depth=2, heads=2, n_outputs=4)
    X, y = torch.randn(8, 5, 3), torch.randint(0, 4, (8,))
    train(model, torch.nn.functional.cross_entropy, [(X, y)] * 20, steps=20, lr=1.0, progress=False, seed=0)
    att, ffn, _ = model.body.layer(0)
    for step in (att, ffn):
        lo, hi = step.alpha_range
        assert lo < step.current_alpha() < hi or step.current_alpha() in (lo, hi)
        kind, _ = step.guarantee()
        assert kind in ("mm", "gradient")


def test_yang2022_with_general_heads_reports_no_guarantee_for_attention():
    with pytest.warns(UserWarning, match="not mutually orthogonal"):
        cert = descent_certificate(_model("yang2022", heads=2), _X())
    kinds = {e.steps: e.guarantee for e in cert.steps}
    assert kinds[("attention",)] == "none" and kinds[("ffn", "relu")] == "gradient"
    assert cert.guaranteed_share == 0.5 and not cert.certified


def test_unknown_family_lists_the_valid_ones():
    with pytest.raises(EnergyInputError, match=r"unknown family .yang.; valid families: .*yang2022_ln"):
        build_classifier("yang", d_in=3, d=8, depth=2, heads=1, n_outputs=2)


def test_heads_not_dividing_the_width_names_both_and_the_fix():
    with pytest.raises(EnergyInputError, match=r"`heads` = 3 does not divide the width d = 8.*\[1, 2, 4, 8\]"):
        build_classifier("untied", d_in=3, d=8, depth=2, heads=3, n_outputs=2)


def test_unknown_option_lists_the_family_options():
    with pytest.raises(EnergyInputError, match=r"no option\(s\) \['backtrak'\].*backtrack"):
        build_classifier("general_heads", d_in=3, d=8, depth=2, heads=2, n_outputs=2, backtrak=2)


@pytest.mark.parametrize("rng", [(0.5, 2.5), (-0.1, 1.0), (0.0, 2.0000001)])
def test_learned_range_outside_the_guarantee_is_an_error(rng):
    with pytest.raises(EnergyInputError, match=r"alpha_range.*outside.*guaranteed range.*choose"):
        build_classifier("learned_steps", d_in=3, d=8, depth=2, heads=2, n_outputs=2, att_range=rng)


@given(seed=st.integers(0, 2**16), b=st.integers(1, 3), n=st.integers(1, 6), heads=st.sampled_from([1, 2, 4]),
       family=st.sampled_from(["untied", "orthogonal_heads", "general_heads", "learned_steps", "sphere",
                               "recurrent", "energy_ffn", "sphere_mlp"]))
def test_certified_families_never_increase_a_guaranteed_term(seed, b, n, heads, family):
    """Property: inside the guaranteed ranges (float64), no certified step increases its term (MATH §7)."""
    if family == "sphere_mlp":
        model = _model("sphere", seed=seed, heads=heads, ffn="mlp")
    else:
        model = _model(family, seed=seed, heads=heads)
    X = _X(seed, b=b, n=n) * 3.0
    cert = descent_certificate(model, X, rtol=1e-12)
    assert cert.certified, cert.summary()


@given(seed=st.integers(0, 2**16), heads=st.sampled_from([2, 4, 8]), eta=st.floats(0.05, 1.95))
def test_general_heads_with_the_computed_bound_are_certified(seed, heads, eta):
    model = _model("general_heads", seed=seed, heads=heads, mode="bound", eta=eta)
    cert = descent_certificate(model, _X(seed) * 3.0, rtol=1e-12)
    assert cert.certified and {e.guarantee for e in cert.steps} == {"bound", "gradient"}


def test_sphere_ffn_option_must_be_known():
    with pytest.raises(EnergyInputError, match=r"`ffn` must be 'quadratic'.*or 'mlp'"):
        build_classifier("sphere", d_in=3, d=8, depth=1, heads=2, n_outputs=2, ffn="gated")


def test_general_heads_mode_must_be_known():
    with pytest.raises(EnergyInputError, match=r"`mode` must be 'backtrack' or 'bound'"):
        build_classifier("general_heads", d_in=3, d=8, depth=1, heads=2, n_outputs=2, mode="exact")


@given(seed=st.integers(0, 2**16), a=st.floats(0.0, 1.9), w=st.floats(0.05, 0.1), b=st.floats(0.0, 0.9),
       v=st.floats(0.05, 0.12))
def test_learned_steps_with_any_range_inside_the_guarantee_are_certified(seed, a, w, b, v):
    """Property: every interval inside (0, 2) (attention) and (0, 2/1.95) (FFN) is accepted and certified."""
    att, ffn = (a, min(a + w, 2.0)), (b, min(b + v, 2 / 1.95))
    model = _model("learned_steps", seed=seed, att_range=att, ffn_range=ffn, alpha_att=0.5 * sum(att),
                   alpha_ffn=0.5 * sum(ffn))
    cert = descent_certificate(model, _X(seed) * 2.0, rtol=1e-12)
    assert cert.certified
    alphas = {e.steps[0]: e.alpha for e in cert.steps}
    assert att[0] < alphas["attention"] < att[1] and ffn[0] < alphas["ffn"] < ffn[1]


def test_sphere_with_learned_steps_and_bool_options():
    model = _model("sphere", learn_steps=True)
    att, ffn = model.body.layer(0)
    assert att.alpha_range == (0.05, 1.0) and 0.05 < att.current_alpha() < 1.0 and ffn.alpha_range is not None
    assert descent_certificate(model, _X()).certified
    with pytest.raises(EnergyInputError, match=r"option `relu` must be a bool"):
        build_classifier("untied", d_in=3, d=8, depth=1, heads=1, n_outputs=2, relu="no")
