"""The example scripts run (in-process with runpy, small sizes) and produce what they promise."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(monkeypatch, name: str, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


@pytest.mark.slow
def test_quickstart_writes_plot(monkeypatch, tmp_path, capsys):
    out = tmp_path / "energy.png"
    _run(monkeypatch, "quickstart.py", str(out))
    text = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 1000
    assert "energy per layer" in text and "E_att" in text


@pytest.mark.slow
def test_convert_layer(monkeypatch, capsys):
    _run(monkeypatch, "convert_layer.py")
    text = capsys.readouterr().out
    errs = [float(line.rsplit("=", 1)[1]) for line in text.splitlines() if "max |Δ|" in line and "plain" not in line]
    assert len(errs) == 2 and max(errs) < 1e-12
    assert "W_Q W_Kᵀ is not symmetric" in text and "nearest layer is constrained: True" in text


@pytest.mark.slow
def test_train_and_trace(monkeypatch, capsys):
    _run(monkeypatch, "train_and_trace.py", "20")
    text = capsys.readouterr().out
    assert "trained 20 steps" in text and "test accuracy" in text and text.count("mean energy per layer") == 2


@pytest.mark.slow
def test_hessian_blocks(monkeypatch, capsys):
    _run(monkeypatch, "hessian_blocks.py")
    text = capsys.readouterr().out
    err = float(text.split("max |closed form − autograd| = ")[1].split()[0])
    assert err < 1e-10
    dense = text.split("dense :")[1].splitlines()[0]
    lanczos = text.split("Lanczos:")[1].splitlines()[0]
    assert dense.strip() == lanczos.strip()
