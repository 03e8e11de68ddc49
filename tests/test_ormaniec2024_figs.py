"""Ormaniec et al. 2024 figures (MATH §3.6–§3.7): helpers against autograd/brute force, each compute at tiny size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from energy.hessian.attention import attention_moments, hessian_block
from energy.hessian.operators import dense_hessian_reference
from paper_figs import ormaniec2024 as om
from paper_figs.io import decode_array
from paper_figs.registry import REGISTRY, FigureConfig, load_figure_modules
from unfold.data import addition_loss, addition_mse_loss
from unfold.standard import GPT2Config, MLPBaseline

TOL = 1e-10


def _tiny(**sizes) -> FigureConfig:
    return FigureConfig(fidelity="tiny", seed=0, sizes=sizes)


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"layernorm": "pre"},
        {"attention": "linear", "attn_residual_scale": 0.0, "mlp": False},
        {"n_heads": 2, "attn_residual_scale": 0.5, "mlp_residual": False},
    ],
)
@pytest.mark.parametrize("n_layers", [1, 2])
def test_scored_positions_equals_full_model(kw, n_layers, seed):
    """The restricted forward gives the full model's outputs at the answer positions, zeros elsewhere."""
    model = om.gpt2_model(GPT2Config(d_model=6, n_layers=n_layers, **kw), seed)
    tokens, targets = om.addition_data(3, seed)
    full, fast = model(tokens), om.ScoredPositions(model)(tokens)
    pos = om.answer_positions()
    torch.testing.assert_close(fast[:, pos], full[:, pos], rtol=0, atol=TOL)
    other = torch.ones(tokens.shape[1], dtype=torch.bool)
    other[pos] = False
    assert torch.all(fast[:, other] == 0)
    torch.testing.assert_close(addition_loss(fast, targets), addition_loss(full, targets), rtol=0, atol=TOL)


def test_scored_positions_hessian_equals_full_model(seed):
    """Same loss function, hence the same Hessian block (autograd twin on the full model)."""
    model = om.gpt2_model(GPT2Config(d_model=4, n_layers=2, d_mlp=6), seed)
    data = [om.addition_data(2, seed)]
    name = "blocks.1.attn.W_Q"
    H_full = dense_hessian_reference(model, addition_loss, [name], data, reduction="mean")
    H_fast = om.dense_loss_hessian(om.ScoredPositions(model), addition_loss, *data[0], ["model." + name])
    torch.testing.assert_close(H_fast, H_full, rtol=0, atol=TOL)


def test_scored_positions_mlp_baseline(seed):
    model = MLPBaseline(5, 3, generator=torch.Generator().manual_seed(seed)).double()
    tokens, targets = om.addition_data(3, seed)
    torch.testing.assert_close(addition_mse_loss(om.ScoredPositions(model)(tokens), targets),
                               addition_mse_loss(model(tokens), targets), rtol=0, atol=TOL)


def test_scored_positions_rejects_non_causal():
    with pytest.raises(ValueError, match="causal"):
        om.ScoredPositions(om.gpt2_model(GPT2Config(d_model=4, n_layers=1, causal=False), 0))


def test_dense_loss_hessian_matches_torch_func_hessian(seed):
    model = om.gpt2_model(GPT2Config(d_model=3, n_layers=1, d_mlp=4), seed)
    tokens, targets = om.addition_data(2, seed)
    H = om.dense_loss_hessian(model, addition_loss, tokens, targets, max_vectors=50)
    ref = dense_hessian_reference(model, addition_loss, None, [(tokens, targets)], reduction="mean")
    torch.testing.assert_close(H, ref, rtol=0, atol=TOL)


def test_max_pool_and_log_histogram():
    A = torch.arange(25.0).reshape(5, 5)
    P = om.max_pool(A, 2)
    assert P.shape == (3, 3)
    assert P[0, 0] == 6 and P[2, 2] == 24 and P[0, 2] == 9
    values = torch.tensor([0.0, 1e-3, 2e-3, 0.5, -0.5, 3.0], dtype=torch.float64)
    edges = np.logspace(-4, 1, 6)
    h = om.log_histogram(values, edges)
    assert h["zeros"] == 1 and h["n"] == 6
    assert h["counts"] == [0, 2, 0, 2, 1]
    assert math.isclose(h["median"], float(np.median(values.abs().numpy())))


def test_loglog_slope_exact_power_law():
    s = om.sigma_grid(12)
    p, se, n = om.loglog_slope(s, 3.0 * s**5.0)
    assert n == int((s <= om.SMALL_SIGMA_MAX * (1 + 1e-12)).sum()) and n >= 3
    assert abs(p - 5.0) < 1e-12 and se < 1e-10
    p, se, n = om.loglog_slope(s, np.where(s < 0.015, 0.0, s**2))  # zeros are skipped
    assert abs(p - 2.0) < 1e-12
    assert math.isnan(om.loglog_slope([0.5, 1.0], [1.0, 2.0])[0])  # no point in the window


def test_growth_sweep_matches_dense_blocks():
    """Hutchinson with more probes than needed is not allowed, so compare against exact norms statistically:
    with the dense block, ||A||_F² = E||Az||² and our estimate is the sample mean of exactly those numbers."""
    config = GPT2Config(d_model=3, n_layers=1, d_mlp=4)
    sweep = om.growth_sweep(lambda s: om.ScoredPositions(om.gpt2_model(config, s)),
                            {"Q": "model.blocks.0.attn.W_Q"}, addition_loss,
                            sigmas=np.array([0.3]), n_inits=1, n_samples=9, batch=2, seed=0)
    model = om.ScoredPositions(om.gpt2_model(config, 0))
    model.set_embedding_scale(0.3, torch.Generator().manual_seed(om.EMBEDDING_SEED))
    H = om.dense_loss_hessian(model, addition_loss, *om.addition_data(2, om.DATA_SEED), ["model.blocks.0.attn.W_Q"])
    Z = om._rademacher(9, 9, torch.Generator().manual_seed(om.PROBE_SEED))
    expected = float(((H @ Z) ** 2).sum(0).mean().sqrt())
    assert math.isclose(sweep.norms["Q"]["H"][0, 0], expected, rel_tol=1e-10)
    assert np.all(sweep.norms["Q"]["H_o"] > 0)


# ----------------------------------------------------------------------------------------------------------------------
# each figure at tiny size
# ----------------------------------------------------------------------------------------------------------------------


def test_all_ormaniec_figures_registered():
    load_figure_modules()
    names = {
        "ormaniec2024-heterogeneity", "ormaniec2024-linear-attention", "ormaniec2024-growth-single",
        "ormaniec2024-growth-depth", "ormaniec2024-growth-preln", "ormaniec2024-growth-linear-depth",
        "ormaniec2024-growth-mlp", "ormaniec2024-growth-closed-form",
    }
    assert names <= set(REGISTRY.names())


def test_paper_model_has_3836_parameters():
    model = om.gpt2_model(om.heterogeneity_config(), 0)
    groups = om.parameter_groups(model)
    assert groups[-1]["stop"] == 3836
    attn = [g for g in groups if ".attn." in g["name"]]
    assert attn[-1]["stop"] - attn[0]["start"] == 1024


def test_heterogeneity_tiny():
    cfg = _tiny(d_model=4)
    data = om.compute_heterogeneity(cfg)
    n = data["n_params"]
    assert n == om.parameter_groups(om.gpt2_model(om.heterogeneity_config(4), 0))[-1]["stop"]
    assert [g["name"] for g in data["groups"]][:3] == ["token_embedding.weight", "position_embedding.weight",
                                                        "blocks.0.attn.W_Q"]
    assert data["groups"][-1]["name"] == "b_U"
    assert data["symmetry_error"] < 1e-12
    img = decode_array(data["log_full"])
    assert img.shape == (n, n) and np.isfinite(img).all()
    assert img.max() <= math.log10(data["max_abs"] + om.HEATMAP_EPS) + 1e-2
    h = data["histograms"]
    assert sum(h["Q"]["counts"]) + h["Q"]["zeros"] == h["Q"]["n"] == 16**2
    summary = om.compute_heterogeneity.summarize(data)
    assert summary["median_ratio_value_over_query"]["value"] > 0
    om.plot_heterogeneity(data, cfg)


def test_linear_attention_tiny():
    cfg = _tiny(d_model=4)
    data = om.compute_linear_attention(cfg)
    for kind in ("softmax", "linear"):
        assert data[kind]["V"]["n"] == 16**2
        assert data[kind]["Q"]["median"] > 0
    om.compute_linear_attention.summarize(data)
    om.plot_linear_attention(data, cfg)


def _check_growth(spec, plot, cfg, n_series, blocks=("V", "Q")):
    data = spec(cfg)
    assert len(data["series"]) == n_series
    for s in data["series"]:
        for b in blocks:
            for part in ("H_o", "H"):
                mean = np.asarray(s["curves"][b][part]["mean"])
                assert mean.shape == (len(data["sigmas"]),)
                assert np.all(np.isfinite(mean)) and np.all(mean > 0)
    summary = spec.summarize(data)
    assert summary and all("value" in r for r in summary.values())
    plot(data, cfg)
    return data, summary


def test_growth_single_tiny():
    data, summary = _check_growth(om.compute_growth_single, om.plot_growth_single, _tiny(), 1)
    # the logits are piecewise linear in W_V: H_f(V,V) vanishes identically
    assert np.all(np.asarray(data["series"][0]["curves"]["V"]["H_f"]["mean"]) == 0)
    assert {"slope_V_H_o", "slope_Q_H_o", "slope_Q_H_f", "slope_V_H", "slope_Q_H"} <= set(summary)


def test_growth_depth_tiny():
    _check_growth(om.compute_growth_depth, om.plot_growth_depth, _tiny(), 2)


def test_growth_preln_tiny():
    _check_growth(om.compute_growth_preln, om.plot_growth_preln, _tiny(), 1)


def test_growth_linear_depth_tiny_is_exactly_homogeneous():
    data, summary = _check_growth(om.compute_growth_linear_depth, om.plot_growth_linear_depth, _tiny(), 2)
    for s in data["series"]:
        for b in ("V", "Q"):
            assert abs(s["curves"][b]["H_o"]["slope"] - 2 * 3 ** s["depth"]) < 1e-6
            if s["depth"] == 1:  # block-hollow: the diagonal functional blocks vanish (MATH §3.6)
                assert np.all(np.asarray(s["curves"][b]["H_f"]["mean"]) == 0)
            else:  # H_f = 2c (z − e)·∇²z → −2c e·∇²z, degree 3ⁿ
                assert abs(s["curves"][b]["H_f"]["slope"] - 3 ** s["depth"]) < 1e-3
    assert all(r["matches"] for r in summary.values() if r["target"] is not None)


def test_growth_mlp_tiny_every_layer_sigma_squared():
    data, summary = _check_growth(om.compute_growth_mlp, om.plot_growth_mlp, _tiny(), 2, blocks=("W",))
    assert data["max_relative_H_f"] < 1e-12
    for s in data["series"]:
        assert abs(s["curves"]["W"]["H_o"]["slope"] - 2) < 1e-6
    assert all(r["matches"] for r in summary.values())


def test_growth_closed_form_tiny_slopes_match_theory():
    cfg = _tiny()
    data = om.compute_growth_closed_form(cfg)
    summary = om.compute_growth_closed_form.summarize(data)
    for key, rec in summary.items():
        assert rec["matches"], (key, rec)
    om.plot_growth_closed_form(data, cfg)


def test_closed_form_sweep_matches_dense_closed_form():
    """The structured norms equal the Frobenius norms of the dense closed-form blocks (energy.hessian.attention)."""
    s = np.array([0.2])
    norms = om.closed_form_sweep(s, width=3, batch=2, n_inits=1, seed=0)
    tokens, _ = om.addition_data(2, om.DATA_SEED)
    g = torch.Generator().manual_seed(0)
    E = torch.randn(int(tokens.max()) + 1, 3, generator=g, dtype=torch.float64)
    P = torch.randn(tokens.shape[1], 3, generator=g, dtype=torch.float64)
    X0 = E[tokens] + P
    Y = torch.cat([X0[:, 1:], torch.zeros_like(X0[:, :1])], dim=1)
    W = [torch.randn(3, 3, generator=g, dtype=torch.float64) * (0.8 / math.sqrt(3)) for _ in range(3)]
    mom = attention_moments(0.2 * X0, *W, Y, reduction="mean")
    for block, (a, b) in (("QQ", "QQ"), ("VK", "VK"), ("QK", "QK")):
        for part in ("H_o", "H_f", "H"):
            dense = float(hessian_block(mom, a, b, part=part).norm())
            assert math.isclose(norms[block][part][0, 0], dense, rel_tol=1e-9), (block, part)
