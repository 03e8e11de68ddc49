"""The figure framework: registry, CLI (outputs, resume, --force, errors, failures), atomic writes, JSON helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from paper_figs import io as pf_io
from paper_figs.__main__ import main
from paper_figs.registry import (
    FIGURE_MODULES,
    REGISTRY,
    FigureConfig,
    Registry,
    UnknownFigureError,
    load_figure_modules,
    measured,
)
from paper_figs.report import overall_match

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------------
# a tiny fake registry
# ----------------------------------------------------------------------------------------------------------------------


def _line_plot(data: dict, cfg: FigureConfig) -> Figure:
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot(data["x"])
    return fig


@pytest.fixture
def fake():
    """A registry with three figures and a log of compute calls: (name, cfg)."""
    reg = Registry()
    calls: list[tuple[str, FigureConfig]] = []

    @reg.figure("fake-a", description="Fake A.", claim="Sum of x is 6.", paper_seed=7)
    def compute_a(cfg: FigureConfig) -> dict:
        calls.append(("fake-a", cfg))
        return {"x": torch.tensor([1.0, 2.0, 3.0]), "n": cfg.pick(tiny=1, quick=2, paper=3, key="n")}

    compute_a.plot(_line_plot)

    @compute_a.summary
    def _sum_a(data: dict) -> dict:
        return {"sum": measured(float(sum(data["x"])), target=6.0, tolerance=1e-12, note="exact")}

    @reg.figure("fake-b", description="Fake B (no target).", claim="Report only.", options=("glove",))
    def compute_b(cfg: FigureConfig) -> dict:
        calls.append(("fake-b", cfg))
        return {"x": np.arange(4.0), "glove": cfg.options["glove"]}

    compute_b.plot(_line_plot)

    @compute_b.summary
    def _sum_b(data: dict) -> dict:
        return {"len": measured(len(data["x"]))}

    @reg.figure("fake-broken", description="Always fails.", claim="None.")
    def compute_broken(cfg: FigureConfig) -> dict:
        calls.append(("fake-broken", cfg))
        raise RuntimeError("deliberate failure in compute")

    compute_broken.plot(_line_plot)
    return reg, calls


def _names(calls) -> list[str]:
    return [name for name, _ in calls]


# ----------------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------------


def test_real_registry_names_unique_and_complete(capsys):
    load_figure_modules()
    names = REGISTRY.names()
    assert len(names) == len(set(names))
    for required in ("yang2022-apollonius", "yang2022-alternating-trace", "yang2022-alternating-energy",
                     "yang2022-divergence"):
        assert required in names
    for spec in REGISTRY:
        assert spec.plot_fn is not None, spec.name
        assert spec.summary_fn is not None, spec.name
        assert spec.description and "\n" not in spec.description
        assert spec.claim
    assert main(["--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(names)
    for line, spec in zip(out, REGISTRY):
        assert line.startswith(spec.name + " ")
        assert line.rstrip().endswith(spec.description)


def test_duplicate_and_invalid_names_rejected():
    reg = Registry()
    reg.figure("a", description="d", claim="c")(lambda cfg: {})
    with pytest.raises(ValueError, match="registered twice"):
        reg.figure("a", description="d", claim="c")(lambda cfg: {})
    with pytest.raises(ValueError, match="without spaces or slashes"):
        reg.figure("a b", description="d", claim="c")
    with pytest.raises(ValueError, match="one line"):
        reg.figure("c", description="two\nlines", claim="c")
    with pytest.raises(UnknownFigureError, match="valid names: a"):
        reg["zzz"]


def test_plot_and_summary_registered_once():
    reg = Registry()
    spec = reg.figure("a", description="d", claim="c")(lambda cfg: {})
    spec.plot(_line_plot)
    with pytest.raises(ValueError, match="already has a plot"):
        spec.plot(_line_plot)


def test_load_figure_modules_skips_missing_but_raises_inside_existing(tmp_path, monkeypatch):
    (tmp_path / "pf_fake_figmod_broken.py").write_text("import pf_this_dependency_does_not_exist_xyz\n")
    (tmp_path / "pf_fake_figmod_ok.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    missing = load_figure_modules(("pf_fake_figmod_absent_xyz", "pf_fake_figmod_ok"))
    assert missing == ["pf_fake_figmod_absent_xyz"]
    assert "pf_fake_figmod_ok" in sys.modules
    with pytest.raises(ModuleNotFoundError, match="pf_this_dependency_does_not_exist_xyz"):
        load_figure_modules(("pf_fake_figmod_broken",))
    assert FIGURE_MODULES[0] == "paper_figs.yang2022_synthetic"


def test_figure_config_pick_and_validation():
    assert FigureConfig(fidelity="tiny").pick(tiny=1, quick=2, paper=3) == 1
    assert FigureConfig(fidelity="paper").pick(tiny=1, quick=2, paper=3) == 3
    assert FigureConfig(fidelity="quick", sizes={"n": 9}).pick(tiny=1, quick=2, paper=3, key="n") == 9
    with pytest.raises(ValueError, match="fidelity must be one of"):
        FigureConfig(fidelity="fast")
    with pytest.raises(TypeError, match="seed must be an int"):
        FigureConfig(seed=None)


def test_measured_verdicts():
    assert measured(2.05, target=2.0, tolerance=0.1)["matches"] is True
    assert measured(2.2, target=2.0, tolerance=0.1)["matches"] is False
    assert measured(float("nan"), target=2.0, tolerance=0.1)["matches"] is False
    assert measured(3.0)["matches"] is None
    assert measured(True, target=True)["matches"] is True
    assert measured([1, 2], target=[0, 0], matches=True)["matches"] is True
    with pytest.raises(TypeError, match="numeric value and target"):
        measured([1.0], target=[1.0], tolerance=0.1)
    assert overall_match({"a": measured(1.0), "b": measured(1.0, target=1.0, tolerance=0.0)}) is True
    assert overall_match({"a": measured(1.0, target=0.0, tolerance=0.1), "b": measured(1.0, target=1.0,
                                                                                    tolerance=0.0)}) is False
    assert overall_match({"a": measured(1.0)}) is None


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_writes_data_pictures_summary_report(fake, tmp_path):
    reg, calls = fake
    assert main(["fake-a", "fake-b", "--tiny", "--out", str(tmp_path)], registry=reg) == 0
    assert _names(calls) == ["fake-a", "fake-b"]
    for name in ("fake-a", "fake-b"):
        for ext in ("json", "png", "pdf"):
            assert (tmp_path / f"{name}.{ext}").stat().st_size > 0
    payload = json.loads((tmp_path / "fake-a.json").read_text())
    assert payload["meta"]["fidelity"] == "tiny"
    assert payload["meta"]["seed"] == 7  # the figure's paper seed
    assert payload["data"] == {"x": [1.0, 2.0, 3.0], "n": 1}
    assert (tmp_path / "fake-a.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "fake-a.pdf").read_bytes().startswith(b"%PDF")

    summary = json.loads((tmp_path / "summary.json").read_text())["figures"]
    assert summary["fake-a"]["status"] == "ok"
    assert summary["fake-a"]["matches"] is True
    assert summary["fake-a"]["numbers"]["sum"]["value"] == 6.0
    assert summary["fake-a"]["numbers"]["sum"]["target"] == 6.0
    assert summary["fake-b"]["matches"] is None
    assert summary["fake-broken"]["status"] == "not run"

    report = (tmp_path / "report.md").read_text()
    assert "## fake-a" in report and "## fake-b" in report
    assert "![fake-a](fake-a.png)" in report
    assert "Sum of x is 6." in report  # the claim
    assert "n/a (no target)" in report
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_seed_and_fidelity_reach_compute(fake, tmp_path):
    reg, calls = fake
    assert main(["fake-a", "--paper", "--seed", "3", "--out", str(tmp_path)], registry=reg) == 0
    cfg = calls[-1][1]
    assert (cfg.fidelity, cfg.seed, cfg.out) == ("paper", 3, tmp_path)
    assert json.loads((tmp_path / "fake-a.json").read_text())["data"]["n"] == 3
    assert main(["fake-a", "--out", str(tmp_path)], registry=reg) == 0  # default fidelity: quick
    assert calls[-1][1].fidelity == "quick"


def test_cli_resume_skips_redraws_and_force_recomputes(fake, tmp_path, capsys):
    reg, calls = fake
    args = ["fake-a", "--tiny", "--out", str(tmp_path)]
    assert main(args, registry=reg) == 0
    assert main(args, registry=reg) == 0
    assert _names(calls) == ["fake-a"]  # up to date: skipped
    assert "up to date" in capsys.readouterr().out

    (tmp_path / "fake-a.png").unlink()
    assert main(args, registry=reg) == 0
    assert _names(calls) == ["fake-a"]  # redrawn from the JSON, not recomputed
    assert (tmp_path / "fake-a.png").exists()
    assert "redrawn" in capsys.readouterr().out

    assert main([*args, "--force"], registry=reg) == 0
    assert _names(calls) == ["fake-a"] * 2
    assert main([*args, "--seed", "11"], registry=reg) == 0  # other seed: recompute
    assert main(["fake-a", "--quick", "--out", str(tmp_path)], registry=reg) == 0  # other fidelity: recompute
    assert _names(calls) == ["fake-a"] * 4


def test_cli_recomputes_when_json_is_corrupt(fake, tmp_path):
    reg, calls = fake
    (tmp_path / "fake-a.json").write_text('{"meta": {"fidelity": "tiny", "se')  # a truncated foreign file
    assert main(["fake-a", "--tiny", "--out", str(tmp_path)], registry=reg) == 0
    assert _names(calls) == ["fake-a"]
    assert json.loads((tmp_path / "fake-a.json").read_text())["meta"]["seed"] == 7


def test_cli_options_declared_by_figure(fake, tmp_path):
    reg, calls = fake
    glove = tmp_path / "glove.txt"
    glove.write_text("the 0.1 0.2\n")
    out = tmp_path / "out"
    assert main(["fake-a", "fake-b", "--tiny", "--out", str(out), "--glove", str(glove)], registry=reg) == 0
    cfg_a, cfg_b = calls[0][1], calls[1][1]
    assert dict(cfg_a.options) == {}
    assert dict(cfg_b.options) == {"glove": glove}
    assert json.loads((out / "fake-b.json").read_text())["meta"]["options"] == {"glove": str(glove)}
    assert main(["fake-b", "--tiny", "--out", str(out)], registry=reg) == 0  # option removed: recompute
    assert _names(calls) == ["fake-a", "fake-b", "fake-b"]
    assert calls[-1][1].options == {"glove": None}


def test_cli_missing_data_path_is_a_usage_error(fake, tmp_path, capsys):
    reg, calls = fake
    assert main(["fake-b", "--out", str(tmp_path), "--glove", str(tmp_path / "nope.txt")], registry=reg) == 2
    assert "--glove" in capsys.readouterr().err
    assert calls == []


def test_cli_unknown_name_lists_valid_names(fake, tmp_path, capsys):
    reg, calls = fake
    assert main(["fake-a", "no-such-figure", "--out", str(tmp_path)], registry=reg) == 2
    err = capsys.readouterr().err
    assert "no-such-figure" in err
    assert "fake-a" in err and "fake-b" in err and "fake-broken" in err
    assert calls == []


def test_cli_failure_does_not_stop_others_and_exits_nonzero(fake, tmp_path, capsys):
    reg, calls = fake
    assert main(["fake-broken", "fake-a", "--tiny", "--out", str(tmp_path)], registry=reg) == 1
    assert _names(calls) == ["fake-broken", "fake-a"]
    assert (tmp_path / "fake-a.png").exists()
    assert not (tmp_path / "fake-broken.json").exists()
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "deliberate failure in compute" in captured.out
    summary = json.loads((tmp_path / "summary.json").read_text())["figures"]
    assert summary["fake-broken"]["status"] == "failed"
    assert "deliberate failure" in summary["fake-broken"]["error"]
    assert summary["fake-a"]["status"] == "ok"
    assert "**FAILED**" in (tmp_path / "report.md").read_text()

    # a later run of another figure keeps the earlier failure on record
    assert main(["fake-b", "--tiny", "--out", str(tmp_path)], registry=reg) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["figures"]
    assert summary["fake-broken"]["status"] == "failed"
    assert summary["fake-b"]["status"] == "ok"


def test_cli_plot_failure_keeps_data_and_next_run_only_redraws(tmp_path):
    reg = Registry()
    calls = []
    state = {"fail": True}

    @reg.figure("p", description="d", claim="c")
    def compute(cfg):
        calls.append(cfg)
        return {"x": [1.0, 2.0]}

    @compute.plot
    def plot(data, cfg):
        if state["fail"]:
            raise ValueError("plot bug")
        return _line_plot(data, cfg)

    assert main(["p", "--out", str(tmp_path)], registry=reg) == 1
    assert (tmp_path / "p.json").exists() and not (tmp_path / "p.png").exists()
    state["fail"] = False
    assert main(["p", "--out", str(tmp_path)], registry=reg) == 0
    assert len(calls) == 1 and (tmp_path / "p.png").exists()


@pytest.mark.slow
def test_python_dash_m_list_runs():
    res = subprocess.run([sys.executable, "-m", "paper_figs", "--list"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "yang2022-apollonius" in res.stdout


# ----------------------------------------------------------------------------------------------------------------------
# io
# ----------------------------------------------------------------------------------------------------------------------


def test_atomic_write_replaces_and_sets_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    pf_io.atomic_write_text(path, "one")
    pf_io.atomic_write_text(path, "two")
    assert path.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_atomic_write_failure_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    pf_io.write_json(path, {"a": 1})

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pf_io.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        pf_io.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert pf_io.read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_to_jsonable_and_array_records():
    obj = {"t": torch.tensor([[1.5, 2.0]], dtype=torch.float64), "a": np.arange(3), "s": np.float32(0.5),
           "p": Path("x/y"), "tup": (1, 2), "nan": float("nan")}
    out = pf_io.to_jsonable(obj)
    assert out["t"] == [[1.5, 2.0]] and out["a"] == [0, 1, 2] and out["s"] == 0.5
    assert out["p"] == "x/y" and out["tup"] == [1, 2]
    assert np.isnan(json.loads(json.dumps(out))["nan"])
    with pytest.raises(TypeError, match="cannot store an object of type object"):
        pf_io.to_jsonable({"bad": object()})
    with pytest.raises(TypeError, match="keys must be str"):
        pf_io.to_jsonable({1: 2})
    rng = np.random.default_rng(0)
    for a in (rng.random((5, 7)) > 0.5, rng.standard_normal((3, 4, 2)), np.arange(6, dtype=np.int32)):
        rec = json.loads(json.dumps(pf_io.encode_array(a)))
        b = pf_io.decode_array(rec)
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    with pytest.raises(ValueError, match="lacks keys"):
        pf_io.decode_array({"dtype": "<f8"})


def test_cli_broken_summary_is_a_failure(tmp_path):
    reg = Registry()

    @reg.figure("s", description="d", claim="c")
    def compute(cfg):
        return {"x": [1.0]}

    compute.plot(_line_plot)

    @compute.summary
    def summary(data):
        return {"x": data["x"][0]}  # not a measured(...) record

    assert main(["s", "--out", str(tmp_path)], registry=reg) == 1
    entry = json.loads((tmp_path / "summary.json").read_text())["figures"]["s"]
    assert entry["status"] == "failed" and "measured" in entry["error"]


def test_cli_version_bump_recomputes_and_stale_data_is_reported(tmp_path):
    def make(version: int, key: str):
        reg = Registry()
        calls = []

        @reg.figure("v", description="d", claim="c", version=version)
        def compute(cfg):
            calls.append(cfg)
            return {key: [1.0]}

        compute.plot(lambda data, cfg: _line_plot({"x": next(iter(data.values()))}, cfg))
        compute.summary(lambda data: {"first": measured(data["x"][0])})
        return reg, calls

    reg1, calls1 = make(1, "x")
    assert main(["v", "--out", str(tmp_path)], registry=reg1) == 0
    reg2, calls2 = make(2, "x")
    assert main(["v", "--out", str(tmp_path)], registry=reg2) == 0
    assert len(calls2) == 1  # new version: recomputed
    assert json.loads((tmp_path / "v.json").read_text())["meta"]["version"] == 2

    # same version, but stored data no longer fits the summary: reported, not silently reused
    (tmp_path / "v.json").write_text((tmp_path / "v.json").read_text().replace('"x"', '"y"'))
    assert main(["v", "--out", str(tmp_path)], registry=reg2) == 1
    entry = json.loads((tmp_path / "summary.json").read_text())["figures"]["v"]
    assert entry["status"] == "failed" and "--force" in entry["error"]
    assert main(["v", "--out", str(tmp_path), "--force"], registry=reg2) == 0
