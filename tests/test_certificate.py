"""Descent certificates (unfold.certificate, MATH §7.1): what is guaranteed, what is measured, and where it fails."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from energy import StepSizeWarning
from energy._validation import EnergyInputError
from unfold.certificate import GUARANTEE_KINDS, Certificate, descent_certificate
from unfold.families import build_classifier
from unfold.standard import standard_encoder
from unfold.unroller import Unrolled

f64 = torch.float64


def _ffn_body(alpha: float, d: int = 4) -> Unrolled:
    """One FFN step with W_f = 0.95 I (the top of its spectrum band) and b = 0."""
    with pytest.warns(StepSizeWarning) if alpha >= 2 / 1.95 else _nothing():
        body = Unrolled([("ffn", {"alpha": alpha, "bias": False})], 1, d).double()
    step = body.layer(0)[0]
    step.W_f = 0.95 * torch.eye(d, dtype=f64)
    return body


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def test_a_step_outside_its_range_is_reported_as_unguaranteed_with_its_increases():
    """α = 1.9 > 2/1.95: E_ffn(Y⁺) = (1 − 1.9·1.95)² E_ffn(Y) on W_f = 0.95 I — an increase on every input."""
    body = _ffn_body(1.9)
    Y = torch.randn(3, 5, 4, dtype=f64)
    with pytest.warns(StepSizeWarning):
        cert = descent_certificate(body, Y)
    (entry,) = cert.steps
    assert entry.guarantee == "none" and "outside the guaranteed range" in entry.statement
    assert entry.increases == 3 and entry.violations == 0 and cert.unguaranteed_increases == 3
    factor = (1 - 1.9 * 1.95) ** 2
    assert entry.max_rel_increase == pytest.approx((factor - 1) / factor, rel=1e-12)
    assert cert.guaranteed_share == 0.0 and not cert.certified


def test_inside_the_range_the_same_step_is_guaranteed_and_decreases_exactly():
    body = _ffn_body(1.0)
    Y = torch.randn(3, 5, 4, dtype=f64)
    cert = descent_certificate(body, Y)
    (entry,) = cert.steps
    assert entry.guarantee == "gradient" and entry.increases == 0
    factor = (1 - 1.95) ** 2  # E_ffn(Y⁺) = factor · E_ffn(Y)
    E0 = 0.5 * 1.95 * (Y**2).sum((-1, -2))
    assert entry.mean_change == pytest.approx(float(((factor - 1) * E0).mean()), rel=1e-12)
    assert cert.certified


def test_a_violated_guarantee_is_counted_and_located(monkeypatch):
    """If a step claims a guarantee and its term increases, the certificate says where (layer, position, kind)."""
    body = _ffn_body(1.9)
    step = body.layer(0)[0]
    monkeypatch.setattr(step, "guarantee", lambda: ("gradient", "claimed for the test"))
    with pytest.warns(StepSizeWarning):
        cert = descent_certificate(body, torch.randn(2, 3, 4, dtype=f64))
    assert cert.violations == 2 and cert.max_rel_violation > 0.8
    assert cert.worst == {"layer": 0, "position": 0, "steps": ["ffn"], "guarantee": "gradient",
                          "max_rel_increase": cert.max_rel_violation}
    assert not cert.certified


def test_backtracking_enforces_what_the_plain_step_breaks():
    """General heads with a huge α: the plain step increases E_att (no guarantee, reported); the backtracking step
    with the same weights never does."""
    torch.manual_seed(3)
    Y = torch.randn(4, 6, 8, dtype=f64) * 2
    with pytest.warns(StepSizeWarning):
        plain = Unrolled([("attention", {"heads": 2, "alpha": 40.0, "fused": False})], 2, 8).double()
        cert_plain = descent_certificate(plain, Y)
    assert all(e.guarantee == "none" for e in cert_plain.steps) and cert_plain.unguaranteed_increases > 0
    bt = Unrolled([("attention", {"heads": 2, "alpha": 40.0, "fused": False, "backtrack": 6})], 2, 8).double()
    bt.load_state_dict(plain.state_dict())
    cert_bt = descent_certificate(bt, Y, rtol=0.0)
    assert all(e.guarantee == "backtracking" for e in cert_bt.steps) and cert_bt.certified


def test_relu_indicator_makes_the_first_projection_a_decrease():
    """E_ffn + ι_{≥0} is +∞ at an input with negative entries: that group is not measured as an increase."""
    torch.manual_seed(0)
    model = build_classifier("untied", d_in=3, d=8, depth=3, heads=1, n_outputs=2).double()
    cert = descent_certificate(model, torch.randn(6, 5, 3, dtype=f64) * 5)
    assert cert.certified
    assert [e.steps for e in cert.steps[:2]] == [("attention",), ("ffn", "relu")]


def test_layernorm_after_a_step_removes_the_guarantee():
    torch.manual_seed(0)
    model = build_classifier("yang2022_ln", d_in=3, d=8, depth=2, heads=1, n_outputs=2).double()
    cert = descent_certificate(model, torch.randn(4, 5, 3, dtype=f64))
    ffn = [e for e in cert.steps if e.steps[0] == "ffn"]
    assert all(e.guarantee == "none" and "non-convex" in e.statement for e in ffn)
    assert cert.guaranteed_share == 0.5 and cert.violations == 0


def test_energy_trace_per_layer_matches_the_models_trace():
    torch.manual_seed(1)
    model = build_classifier("orthogonal_heads", d_in=3, d=8, depth=3, heads=2, n_outputs=2).double()
    X = torch.randn(5, 4, 3, dtype=f64)
    cert = descent_certificate(model, X)
    _, info = model(X, trace="layer")
    total = info["energies"]["total"]
    assert len(cert.energy_per_layer) == 4 and len(cert.energy_per_layer_per_example) == 5
    torch.testing.assert_close(torch.tensor(cert.energy_per_layer, dtype=f64), total.mean(-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(cert.energy_per_layer_per_example, dtype=f64), total.T, rtol=1e-12,
                               atol=0)


def test_to_json_holds_every_field():
    torch.manual_seed(0)
    model = build_classifier("learned_steps", d_in=3, d=8, depth=2, heads=2, n_outputs=2).double()
    cert = descent_certificate(model, torch.randn(3, 4, 3, dtype=f64))
    out = json.loads(cert.to_json())
    assert set(out) >= {"guaranteed_share", "violations", "steps", "energy_per_layer", "certified", "worst"}
    assert all(s["guarantee"] in GUARANTEE_KINDS for s in out["steps"])
    assert "energy_per_layer_per_example" not in json.loads(cert.to_json(per_example=False))
    assert isinstance(cert, Certificate) and math.isfinite(out["max_rel_violation"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cert.violations = 3  # type: ignore[misc]


def test_a_standard_encoder_cannot_be_certified():
    model = standard_encoder(8, 2, 2, 2, d_in=3)
    with pytest.raises(EnergyInputError, match=r"StandardEncoderClassifier.*not an energy model.*build_classifier"):
        descent_certificate(model, torch.randn(2, 4, 3))


def test_bad_inputs_to_the_certificate():
    torch.manual_seed(0)
    model = build_classifier("untied", d_in=3, d=8, depth=1, heads=1, n_outputs=2)
    with pytest.raises(EnergyInputError, match=r"`X`"):
        descent_certificate(model, torch.randn(2, 4, 5))
    with pytest.raises(EnergyInputError, match=r"`X`.*batch"):
        descent_certificate(model, torch.randn(4, 3))
    with pytest.raises(EnergyInputError, match=r"rtol"):
        descent_certificate(model, torch.randn(2, 4, 3), rtol=math.nan)


def test_unchanged_counts_skipped_backtracking_steps_and_stopped_inputs():
    """A backtracking step that finds no descent (K = 0 and a huge α) leaves the input as it was: counted."""
    torch.manual_seed(3)
    Y = torch.randn(6, 5, 8, dtype=f64) * 2
    bt = Unrolled([("attention", {"heads": 2, "alpha": 500.0, "fused": False, "backtrack": 1})], 1, 8).double()
    cert = descent_certificate(bt, Y, rtol=0.0)
    (entry,) = cert.steps
    assert entry.guarantee == "backtracking" and entry.increases == 0 and entry.unchanged > 0
    from unfold.recurrent import RecurrentUnrolled

    torch.manual_seed(0)
    rec = RecurrentUnrolled(["attention", "ffn", "relu"], 6, 8, tol=1e9, min_depth=2).double()
    cert = descent_certificate(rec, Y)
    assert cert.depth_used == (2,) * 6
    assert all(e.unchanged == 6 for e in cert.steps if e.layer >= 2)
    assert all(e.unchanged == 0 for e in cert.steps if e.layer < 2)


def test_relu_keeps_only_a_gradient_steps_guarantee():
    """[attention, relu]: the MM step (metric preconditioner) is not a Euclidean gradient step, so the projected
    pair has no guarantee; [ffn, relu] and [majorised_attention, relu] keep theirs; a backtracking step before a ReLU
    loses it (its test precedes the projection)."""
    torch.manual_seed(0)
    Y = torch.randn(3, 4, 6, dtype=f64)
    kinds = {}
    for first in ("attention", "ffn", "majorised_attention", ("ffn", {"backtrack": 2})):
        body = Unrolled([first, "relu"], 1, 6).double()
        (entry,) = descent_certificate(body, Y).steps
        kinds[str(first)] = (entry.guarantee, entry.statement)
    assert kinds["attention"][0] == "none" and "ReLU projection" in kinds["attention"][1]
    assert kinds["ffn"][0] == "gradient" and "projected gradient" in kinds["ffn"][1]
    assert kinds["majorised_attention"][0] == "bound"
    assert kinds[str(("ffn", {"backtrack": 2}))][0] == "none"


def test_to_json_writes_a_non_finite_energy_as_null():
    """A trained model can reach an energy of −inf (an unbounded FFN energy): the JSON stays strict, with null."""
    torch.manual_seed(0)
    model = build_classifier("learned_steps", d_in=3, d=8, depth=2, heads=2, n_outputs=2).double()
    cert = descent_certificate(model, torch.randn(3, 4, 3, dtype=f64))
    layers = list(cert.energy_per_layer)
    layers[-1] = -math.inf
    out = json.loads(dataclasses.replace(cert, energy_per_layer=layers).to_json())
    assert out["energy_per_layer"][-1] is None and out["energy_per_layer"][0] == cert.energy_per_layer[0]
