"""Bridge figures: equivalence errors, Hessian norms vs autograd, curvature along an unrolled model, tiny computes.

The autograd twins use ``torch.autograd.functional.hessian`` (no ``torch.func`` start-up cost of several seconds).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _helpers import DT, randn

from energy.hessian.attention import attention_loss
from energy.hessian.energy_curvature import majoriser_step_bound
from energy.hessian.energy_layer import energy_layer_loss
from paper_figs import bridge, bridge_curvature
from paper_figs.registry import FigureConfig
from paper_figs.yang2022_text_model import DEPTH, make_model


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _cfg(seed: int = 0) -> FigureConfig:
    return FigureConfig(fidelity="tiny", seed=seed)


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(3, 4), (7, 5)])
def test_equivalence_errors_float64_exact_and_beta_matters(gen, n, d):
    err = bridge.equivalence_errors(n, d, DT, gen)
    assert set(err) == {"mha_a", "mha_b", "sdpa_a", "sdpa_b", "plain_a", "plain_b"}
    for k in ("mha_a", "mha_b", "sdpa_a", "sdpa_b"):
        assert err[k] < 1e-12, k
    assert min(err["plain_a"], err["plain_b"]) > 1e-6  # without β the standard layer is another map
    err32 = bridge.equivalence_errors(n, d, torch.float32, gen)
    assert max(err32[k] for k in ("mha_a", "mha_b", "sdpa_a", "sdpa_b")) < 1e-4


def test_hessian_norms_match_autograd(gen):
    B, L, d = 2, 3, 3
    X = 0.7 * randn(B, L, d, gen=gen)
    Y = randn(B, L, d, gen=gen)
    W_Q, W_K, W_V = (randn(d, d, gen=gen) / math.sqrt(d) for _ in range(3))
    norms = bridge.hessian_norms_at(X, W_Q, W_K, W_V, Y)
    assert set(norms) == set(bridge.HESSIAN_SERIES)
    weights = {"Q": W_Q, "K": W_K, "V": W_V}
    for name in ("Q", "K", "V"):
        def loss(w, name=name):
            ws = dict(weights, **{name: w.reshape(d, d)})
            return attention_loss(X, ws["Q"], ws["K"], ws["V"], Y)

        H = torch.autograd.functional.hessian(loss, weights[name].reshape(-1))
        assert norms[f"standard {name}"]["H"] == pytest.approx(float(torch.linalg.matrix_norm(H)), rel=1e-9)
    for series, tied in (("energy M (a)", False), ("energy M (b, tied values)", True)):
        H = torch.autograd.functional.hessian(
            lambda m, t=tied: energy_layer_loss(X, m.reshape(d, d), Y, alpha=1.0, tied=t), W_Q.reshape(-1))
        assert norms[series]["H"] == pytest.approx(float(torch.linalg.matrix_norm(H)), rel=1e-9)
        assert norms[series]["H_o"] > 0 and norms[series]["H_f"] > 0


def test_curvature_along_model_is_consistent(gen):
    d = 4
    model = make_model(d, relu=True, seed=int(gen.initial_seed())).double()
    seqs = [randn(n, d, gen=gen) for n in (3, 5)]
    alphas = (0.5, 1.0, 3.0, 8.0)
    res = bridge_curvature.curvature_along_model(model, seqs, alphas)
    assert res["bound_a"].shape == (DEPTH, 2) and res["up_a"].shape == (DEPTH, 2, len(alphas))
    # Gaussian kernel: Γ ⪰ 0, so λ_max(N) ≤ 1 and step (a) is guaranteed up to α = 2 at least
    assert (res["bound_a"] >= 2 - 1e-9).all()
    assert (res["lam_true"] <= res["lam_maj"] + 1e-9).all()
    # no increase of E_att for any α within the majoriser bound (the MM guarantee)
    a = np.asarray(alphas)
    assert not (res["up_a"] & (a <= res["bound_a"][..., None])).any()
    assert not (res["up_b"] & (a <= res["bound_b"][..., None])).any()
    # the model's own steps: each lowers its own term (α = 1 is inside both guarantees)
    assert (res["dE_att_attention"] <= 1e-12).all() and (res["dE_ffn_ffn"] <= 1e-12).all()
    # layer 0: the bound equals the direct computation at the input state
    energy = model.body.layer(0)[0].build()
    assert res["bound_a"][0, 1] == pytest.approx(majoriser_step_bound(energy, seqs[1], "metric"), rel=1e-12)
    # total energy changes add up to the trace's first-to-last change
    with torch.no_grad():
        _, info = model.body(seqs[0].unsqueeze(0), trace=True)
    total = info["energies"]["total"][:, 0]
    summed = sum(res[f"dE_total_{k}"][:, 0].sum() for k in model.body.step_kinds)
    assert summed == pytest.approx(float(total[-1] - total[0]), abs=1e-10)


# ----------------------------------------------------------------------------------------------------------------------
# the figures at tiny size
# ----------------------------------------------------------------------------------------------------------------------


def test_equivalence_figure_tiny():
    spec = bridge.compute_equivalence
    data = spec(_cfg())
    assert len(data["rows"]) == 2 * len(data["ns"]) * len(data["ds"])
    summary = spec.summarize(data)
    assert summary["max_rel_err_float64"]["matches"] is True
    assert summary["max_rel_err_float32"]["value"] < 1e-4
    assert summary["min_rel_err_without_beta_float64"]["value"] > 1e-6
    assert len(spec.plot_fn(data, _cfg()).axes) == 3


def test_hessian_comparison_figure_tiny():
    spec = bridge.compute_hessian_comparison
    data = spec(_cfg())
    assert set(data["norms"]) == {"raw", "layernorm"}
    ln = data["norms"]["layernorm"]["energy M (a)"]["H"]
    assert np.allclose(ln, ln[0], rtol=1e-10)  # the projection removes σ
    summary = spec.summarize(data)
    # the small-σ exponents: MATH §3.6 for the standard layer, power counting for the energy layer
    assert all(rec["matches"] for rec in summary.values()), {k: v["value"] for k, v in summary.items()}
    assert len(spec.plot_fn(data, _cfg()).axes) == 3


def test_energy_curvature_figure_tiny():
    spec = bridge_curvature.compute_energy_curvature
    data = spec(_cfg(2333))
    n = data["n_sequences"]
    assert [m["relu"] for m in data["models"]] == [True, False] and n >= 2
    for m in data["models"]:
        assert np.asarray(m["bound_a"]).shape == (DEPTH, n)
        assert ("dE_total_relu" in m) == m["relu"]
    summary = spec.summarize(data)
    for tag in ("relu", "norelu"):
        assert summary[f"{tag}: alpha_within_bound_(a)"]["matches"] is True
        assert summary[f"{tag}: sweep_increases_within_guarantee"]["matches"] is True
        assert summary[f"{tag}: E_att_increases_by_attention_step"]["value"] == 0
    assert "relu: total_increases_by_relu" in summary and "norelu: total_increases_by_relu" not in summary
    assert len(spec.plot_fn(data, _cfg()).axes) >= 8


def test_moved_curvature_names_keep_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="moved to paper_figs.bridge_curvature.curvature_along_model"):
        assert bridge.curvature_along_model is bridge_curvature.curvature_along_model
    with pytest.raises(AttributeError):
        bridge.no_such_name
