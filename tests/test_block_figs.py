"""The whole-block figures (MATH §5.5): they run, their exponents match the derived ones, their shares add up."""

from __future__ import annotations

import math

import pytest
import torch

from energy.hessian.block import block_hessian_parts, random_block
from paper_figs.block_curvature import CATEGORIES, GROUPS, THEORY_BLOCK, _category, _diagonal_norms
from paper_figs.registry import REGISTRY, FigureConfig, load_figure_modules

load_figure_modules()


@pytest.fixture(scope="module")
def growth() -> tuple[dict, dict]:
    spec = REGISTRY["block-growth"]
    data = spec(FigureConfig(fidelity="tiny", sizes={"n_sigma": 7}))
    return data, spec.summary_fn(data)  # type: ignore[misc]


def test_growth_exponents_match_the_derived_table(growth: tuple[dict, dict]) -> None:
    data, summary = growth
    assert set(data["series"]) == set(THEORY_BLOCK)
    checked = [k for k, v in summary.items() if v["target"] is not None]
    assert len(checked) >= 80
    wrong = {k: summary[k]["value"] for k in checked if not summary[k]["matches"]}
    assert not wrong, wrong
    # the headline rates, explicitly
    assert summary["none.Q.H_o"]["value"] == pytest.approx(6.0, abs=0.2)
    assert summary["none.V.H"]["value"] == pytest.approx(2.0, abs=0.2)
    assert summary["post.K.H"]["value"] == pytest.approx(4.0, abs=0.2)
    assert summary["pre.Q.H"]["value"] == pytest.approx(0.0, abs=0.2)


def test_growth_curves_are_the_closed_form_norms(growth: tuple[dict, dict]) -> None:
    """One point of the sweep recomputed from the closed form directly (the figure draws what it says)."""
    data, _ = growth
    g = torch.Generator().manual_seed(0 * 1000 + 0)  # cfg.seed 0 (paper_seed), init seed 0
    block = random_block(data["d"], data["heads"], data["d_head"], data["d_ff"], norm="post", vocab=None,
                         loss="mse", eps=1e-6, generator=g)
    X = torch.randn(data["batch"], data["seq_len"], data["d"], generator=g, dtype=torch.float64)
    Y = torch.randn(data["batch"], data["seq_len"], data["d"], generator=g, dtype=torch.float64)
    sigma = data["sigmas"][2]
    norms = _diagonal_norms(block_hessian_parts(block, sigma * X, Y), per_head=True)
    for key in ("Q|H", "ffn.W_1|H_f", "kv1.V|H_o"):
        assert data["series"]["post"]["mean"][key][2] == pytest.approx(norms[key], rel=1e-12)


def test_theory_table_names_real_groups() -> None:
    for table in THEORY_BLOCK.values():
        assert set(table) <= set(GROUPS)
        for parts in table.values():
            assert set(parts) == {"H", "H_o", "H_f"}


def test_heterogeneity_shares_partition_the_norm() -> None:
    spec = REGISTRY["block-heterogeneity"]
    data = spec(FigureConfig(fidelity="tiny"))
    for part, shares in data["shares"].items():
        assert set(shares) == set(CATEGORIES)
        assert math.fsum(shares.values()) == pytest.approx(1.0, abs=1e-12), part
    summary = spec.summary_fn(data)  # type: ignore[misc]
    assert summary["H_f.across heads.nonzero"]["matches"] is True
    total = data["frobenius"]["H"] ** 2
    names = data["names"]
    assert sum(data["norms"]["H"][i][j] ** 2 for i in range(len(names)) for j in range(len(names))) == \
        pytest.approx(total, rel=1e-12)


def test_categories() -> None:
    assert _category("attn.h0.Q", "attn.kv0.K") == "within head"
    assert _category("attn.h0.Q", "attn.h1.O") == "across heads"
    assert _category("attn.h0.Q", "ffn.W_1") == "attention × other sublayers"
    assert _category("ffn.W_1", "ffn.b_2") == "within a sublayer"
    assert _category("ln1.gamma", "W_U") == "across other sublayers"
