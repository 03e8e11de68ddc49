"""The figure ``unfold-accuracy-vs-params``: registered, computed from a real tiny study, drawn, summarised, and run
through ``python -m paper_figs`` (outputs and resume).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from paper_figs.__main__ import main as figs_main
from paper_figs.registry import REGISTRY, FigureConfig, load_figure_modules
from paper_figs.unfold_accuracy import TARGET_GAP_POINTS, study_config
from unfold.cost_models import STANDARD

load_figure_modules()
NAME = "unfold-accuracy-vs-params"
SIZES = {"sizes": (4, 8), "models": (STANDARD, "yang2022", "untied"), "steps": 2, "depth": 1,
         "certify_inputs": 8}


@pytest.fixture(scope="module")
def data() -> dict:
    return REGISTRY[NAME](FigureConfig(fidelity="tiny", seed=0, sizes=SIZES))


def test_registered_with_plot_and_summary() -> None:
    spec = REGISTRY[NAME]
    assert spec.plot_fn is not None and spec.summary_fn is not None and spec.single_thread
    assert "3 accuracy points" in spec.claim


def test_configs_per_fidelity() -> None:
    quick = study_config(FigureConfig(fidelity="quick"))
    assert quick.tasks == ("digits",) and quick.sizes == (8, 16) and quick.seeds == (0, 1, 2)
    assert quick.models is None and len(quick.lrs) == 1  # every family; the sweep is the full study's
    paper = study_config(FigureConfig(fidelity="paper", seed=5))
    assert paper.seeds == (5, 6, 7) and paper.tasks == ("digits", "addition", "text") and len(paper.lrs) == 4


def test_tiny_run_has_two_sizes_every_model_and_a_certified_trace(data: dict) -> None:
    per_size = data["results"]["digits"]
    assert list(per_size) == ["4", "8"] and "runs" not in data
    for size in per_size.values():
        assert set(size) == set(SIZES["models"])
        for e in size.values():
            assert len(e["test_accuracy"]["values"]) == 2  # error bars over two seeds
    params = [per_size[s][STANDARD]["parameters"] for s in per_size]
    assert params[0] < params[1]
    best = data["best_certified"]["digits"]
    assert best["model"] in ("yang2022", "untied")
    for cert in best["certificates"]:
        assert len(cert["energy_per_layer"]) == SIZES["depth"] + 1 and cert["violations"] == 0


def test_plot_draws_accuracy_and_energy_panels(data: dict) -> None:
    fig = REGISTRY[NAME].plot_fn(data, FigureConfig(fidelity="tiny"))  # type: ignore[misc]
    assert isinstance(fig, Figure)
    acc, energy = fig.axes[:2]
    assert acc.get_xscale() == "log" and len(acc.containers) == len(SIZES["models"])  # one errorbar per model
    assert len(energy.lines) == 2 and "best certified" in energy.get_title()


def test_summary_reports_gap_time_and_violations(data: dict) -> None:
    summary = REGISTRY[NAME].summarize(data)
    best = data["best_certified"]["digits"]
    assert summary["digits.gap_points"]["value"] == pytest.approx(best["gap_points"])
    assert summary["digits.gap_points"]["matches"] == (best["gap_points"] <= TARGET_GAP_POINTS)
    assert summary["digits.cpu_time_ratio"]["value"] == pytest.approx(best["cpu_time_ratio"])
    assert summary["digits.violations"] == {**summary["digits.violations"], "value": 0, "matches": True}


def test_cli_writes_outputs_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = REGISTRY[NAME]
    real = spec.compute
    monkeypatch.setattr(spec, "compute", lambda cfg: real(FigureConfig(
        fidelity=cfg.fidelity, seed=cfg.seed, out=cfg.out, options=cfg.options, sizes=SIZES)))
    assert figs_main([NAME, "--tiny", "--out", str(tmp_path)]) == 0
    for suffix in (".json", ".png", ".pdf"):
        assert (tmp_path / f"{NAME}{suffix}").stat().st_size > 0
    stored = json.loads((tmp_path / f"{NAME}.json").read_text())
    assert "unfold-accuracy-vs-params" in (tmp_path / "report.md").read_text()
    (tmp_path / f"{NAME}.png").unlink()
    monkeypatch.setattr(spec, "compute", lambda cfg: pytest.fail("resumed run must not recompute"))
    assert figs_main([NAME, "--tiny", "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{NAME}.png").exists()
    assert json.loads((tmp_path / f"{NAME}.json").read_text()) == stored
