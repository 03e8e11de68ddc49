"""Every command line answers a bad input with ONE line on stderr (exit 2 usage / 1 failure / 130 interrupted).

Table-driven: each case runs a command's ``main`` in-process and asserts the exit status, exactly one line on
stderr prefixed with the program name, no traceback, and that the line names the argument and the fix. Output
paths are checked writable *before* any computation (asserted through stdout staying empty, or a compute function
that is never called). Unwritable paths are made without chmod (tests may run as root, for whom chmod does not
block writes): a path under a regular FILE, or under ``/proc``; one chmod case runs only when not root.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from energy.__main__ import main as energy_main
from energy._cli import UsageError
from energy.verify import main as verify_main
from paper_figs.__main__ import main as figs_main
from paper_figs.registry import FigureConfig, Registry, measured
from unfold.__main__ import NORM_EPS_DEFAULT
from unfold.__main__ import main as unfold_main
from unfold.constraint_cost import main as cc_main

ROOT = Path(__file__).resolve().parents[1]


def _bench_main(argv: list[str]) -> int:
    from benchmarks.__main__ import main

    return main(argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A regular file (to put paths under), an empty model file, a directory, and a small trained model."""
    d = tmp_path_factory.mktemp("cli")
    (d / "afile").write_text("x")
    (d / "empty.pt").write_bytes(b"")
    (d / "adir").mkdir()
    model = d / "m.pt"
    assert unfold_main(["train", "--task", "digits", "--d", "8", "--depth", "2", "--steps", "2", "--batch-size",
                        "16", "--quiet", "--save", str(model)]) == 0
    ckpt = d / "run.ckpt"
    assert unfold_main(["train", "--task", "synthetic", "--d", "8", "--depth", "2", "--steps", "2", "--batch-size",
                        "16", "--quiet", "--checkpoint", str(ckpt)]) == 0
    return {"file": str(d / "afile"), "empty": str(d / "empty.pt"), "dir": str(d / "adir"), "model": str(model),
            "ckpt": str(ckpt), "tmp": str(d)}


# (id, main, prog, argv with {placeholders}, exit status, substrings the one stderr line must contain)
CASES: list[tuple[str, Callable[[list[str]], int], str, list[str], int, tuple[str, ...]]] = [
    # python -m energy
    ("energy-no-command", energy_main, "python -m energy", [], 2, ("COMMAND", "--help")),
    ("energy-unknown-command", energy_main, "python -m energy", ["frobnicate"], 2, ("frobnicate", "verify")),
    ("verify-trials-0", verify_main, "python -m energy verify", ["--trials", "0"], 2, ("--trials", "at least 1")),
    ("verify-unknown-case", verify_main, "python -m energy verify", ["--case", "nope"], 2,
     ("--case nope", "valid cases")),
    ("verify-seed-not-int", verify_main, "python -m energy verify", ["--seed", "x"], 2, ("--seed", "--help")),
    # python -m unfold train
    ("train-depth-0", unfold_main, "python -m unfold", ["train", "--depth", "0"], 2, ("--depth", "> 0")),
    ("train-lr-negative", unfold_main, "python -m unfold", ["train", "--lr", "-1"], 2, ("--lr", "> 0")),
    ("train-save-under-file", unfold_main, "python -m unfold", ["train", "--save", "{file}/m.pt"], 2,
     ("--save", "not a directory", "writable directory")),
    ("train-save-under-proc", unfold_main, "python -m unfold", ["train", "--save", "/proc/no-such/m.pt"], 2,
     ("--save", "cannot write", "writable directory")),
    ("train-save-is-dir", unfold_main, "python -m unfold", ["train", "--save", "{dir}"], 2,
     ("--save", "is a directory", "file path")),
    ("train-checkpoint-under-file", unfold_main, "python -m unfold", ["train", "--checkpoint", "{file}/c.ckpt"], 2,
     ("--checkpoint", "writable directory")),
    ("train-unknown-task", unfold_main, "python -m unfold train", ["train", "--task", "imagenet"], 2,
     ("--task", "invalid choice", "--help")),
    ("train-resume-mismatch", unfold_main, "python -m unfold",
     ["train", "--task", "synthetic", "--d", "12", "--depth", "2", "--steps", "3", "--batch-size", "16", "--quiet",
      "--checkpoint", "{ckpt}"], 2, ("--no-resume",)),
    # python -m unfold trace
    ("trace-model-empty", unfold_main, "python -m unfold", ["trace", "--model", "{empty}"], 2,
     ("--model", "empty (0 bytes)", "Write it again")),
    ("trace-model-missing", unfold_main, "python -m unfold", ["trace", "--model", "{tmp}/missing.pt"], 2,
     ("--model", "does not exist")),
    ("trace-model-dir", unfold_main, "python -m unfold", ["trace", "--model", "{dir}"], 2,
     ("--model", "not a regular file", "path of the file")),
    ("trace-contradicting-d-depth", unfold_main, "python -m unfold",
     ["trace", "--model", "{model}", "--d", "64", "--depth", "9"], 2,
     ("--d 64", "--depth 9", "d=8", "depth=2", "drop these flags")),
    ("trace-contradicting-heads", unfold_main, "python -m unfold", ["trace", "--model", "{model}", "--heads", "2"], 2,
     ("--heads 2", "heads=1", "drop these flags")),
    ("trace-contradicting-untied", unfold_main, "python -m unfold", ["trace", "--model", "{model}", "--untied"], 2,
     ("--untied", "untied=False", "drop these flags")),
    ("trace-task-other-than-trained", unfold_main, "python -m unfold",
     ["trace", "--model", "{model}", "--task", "synthetic"], 2,
     ("--task synthetic", "'digits'", "10 outputs", "4", "--task digits")),
    ("trace-plot-under-file", unfold_main, "python -m unfold", ["trace", "--plot", "{file}/p.png"], 2,
     ("--plot", "writable directory")),
    ("trace-json-under-proc", unfold_main, "python -m unfold", ["trace", "--json", "/proc/no-such/t.json"], 2,
     ("--json", "writable directory")),
    ("trace-n-0", unfold_main, "python -m unfold", ["trace", "--n", "0"], 2, ("--n", "> 0")),
    ("trace-depth-not-int", unfold_main, "python -m unfold trace", ["trace", "--depth", "x"], 2,
     ("--depth", "invalid int", "--help")),
    ("unfold-no-command", unfold_main, "python -m unfold", [], 2, ("COMMAND", "--help")),
    # python -m paper_figs
    ("figs-out-under-file", figs_main, "python -m paper_figs", ["yang2022-apollonius", "--tiny", "--out", "{file}/sub"],
     2, ("--out", "Not a directory", "writable directory")),
    ("figs-out-is-file", figs_main, "python -m paper_figs", ["yang2022-apollonius", "--tiny", "--out", "{file}"], 2,
     ("--out", "not a directory", "give a directory")),
    ("figs-out-under-proc", figs_main, "python -m paper_figs", ["yang2022-apollonius", "--tiny", "--out", "/proc/x"],
     2, ("--out", "cannot write", "writable directory")),
    ("figs-unknown-name", figs_main, "python -m paper_figs", ["no-such-figure", "--tiny", "--out", "{tmp}/o"], 2,
     ("no-such-figure", "Valid names")),
    ("figs-threads-0", figs_main, "python -m paper_figs", ["--threads", "0", "--out", "{tmp}/o"], 2,
     ("--threads", "e.g. --threads 1")),
    ("figs-missing-glove", figs_main, "python -m paper_figs", ["--glove", "{tmp}/nope.txt", "--out", "{tmp}/o"], 2,
     ("--glove", "omit --glove")),
    ("figs-two-fidelities", figs_main, "python -m paper_figs", ["--tiny", "--paper"], 2,
     ("--paper", "not allowed", "--help")),
    # python -m benchmarks
    ("bench-only-no-match", _bench_main, "python -m benchmarks", ["--only", "zzz-no-match"], 2,
     ("--only", "give part of one of")),
    ("bench-json-under-file", _bench_main, "python -m benchmarks", ["--only", "energy", "--json", "{file}/b.json"], 2,
     ("--json", "writable directory")),
    ("bench-json-is-dir", _bench_main, "python -m benchmarks", ["--json", "{dir}"], 2,
     ("--json", "is a directory", "file path")),
    # python -m unfold.constraint_cost
    ("cc-unknown-task", cc_main, "python -m unfold.constraint_cost", ["--tasks", "mnist"], 2,
     ("--tasks", "valid tasks")),
    ("cc-no-task", cc_main, "python -m unfold.constraint_cost", ["--tasks", ","], 2, ("--tasks", "comma-separated")),
    ("cc-seeds-0", cc_main, "python -m unfold.constraint_cost", ["--seeds", "0"], 2, ("--seeds", "at least 1")),
    ("cc-lr-0", cc_main, "python -m unfold.constraint_cost", ["--lr", "0"], 2, ("--lr", "e.g. --lr")),
    ("cc-json-under-file", cc_main, "python -m unfold.constraint_cost", ["--json", "{file}/r.json"], 2,
     ("--json", "writable directory")),
]


def _one_error_line(err: str, prog: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line(case, files, capsys):
    name, main, prog, argv, status, needles = case
    argv = [a.format(**files) for a in argv]
    capsys.readouterr()
    assert main(argv) == status
    captured = capsys.readouterr()
    line = _one_error_line(captured.err, prog)
    for needle in needles:
        assert needle.format(**files) in line, f"{needle!r} not in {line!r}"
    assert "resume=False" not in line  # the API's words; the flag is --no-resume
    if main in (unfold_main, cc_main, _bench_main) and name != "train-resume-mismatch":
        # refused before any computation (the resume check needs the model built): nothing printed
        assert captured.out == ""


def test_cases_cover_every_command_line():
    assert {c[1] for c in CASES} == {energy_main, verify_main, unfold_main, figs_main, _bench_main, cc_main}
    assert len(CASES) >= 40


def test_debug_shows_the_exception(files):
    with pytest.raises(UsageError, match="--save"):
        unfold_main(["train", "--save", f"{files['file']}/m.pt", "--debug"])
    with pytest.raises(UsageError, match="--out"):
        figs_main(["yang2022-apollonius", "--tiny", "--out", f"{files['file']}/sub", "--debug"])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes through chmod 0o500")
def test_unwritable_directory_by_permissions(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert unfold_main(["train", "--save", str(locked / "m.pt")]) == 2
        assert "--save" in _one_error_line(capsys.readouterr().err, "python -m unfold")
        assert figs_main(["--tiny", "--out", str(locked)]) == 2
        assert "--out" in _one_error_line(capsys.readouterr().err, "python -m paper_figs")
    finally:
        locked.chmod(0o700)


# ----------------------------------------------------------------------------------------------------------------------
# paper_figs: nothing is computed when --out is bad; Ctrl-C writes the summary and says how to resume
# ----------------------------------------------------------------------------------------------------------------------


def _registry(calls: list[str], interrupt_at: str | None = None) -> Registry:
    reg = Registry()

    def make(name: str) -> None:
        @reg.figure(name, description=f"Fake {name}.", claim="None.")
        def compute(cfg: FigureConfig) -> dict:
            calls.append(name)
            if name == interrupt_at:
                raise KeyboardInterrupt
            return {"x": [1.0, 2.0]}

        @compute.plot
        def _plot(data: dict, cfg: FigureConfig):
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots()
            ax.plot(data["x"])
            return fig

        @compute.summary
        def _summary(data: dict) -> dict:
            return {"n": measured(float(len(data["x"])), target=2.0, tolerance=0.0)}

    for n in ("f-one", "f-two", "f-three"):
        make(n)
    return reg


@pytest.mark.parametrize("out", ["{file}/sub", "{file}", "/proc/no-such-dir"])
def test_figs_bad_out_computes_nothing(out, files, capsys):
    calls: list[str] = []
    assert figs_main(["--tiny", "--out", out.format(**files)], registry=_registry(calls)) == 2
    assert calls == []
    _one_error_line(capsys.readouterr().err, "python -m paper_figs")


def test_figs_interrupt_writes_summary_and_says_how_to_resume(tmp_path, capsys):
    import json

    calls: list[str] = []
    assert figs_main(["--tiny", "--out", str(tmp_path)], registry=_registry(calls, interrupt_at="f-two")) == 130
    assert calls == ["f-one", "f-two"]
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("python -m paper_figs: interrupted: ")
    assert "during f-two" in lines[0] and "finished 1/3 (f-one)" in lines[0] and "rerun the same command" in lines[0]
    summary = json.loads((tmp_path / "summary.json").read_text())["figures"]
    assert summary["f-one"]["status"] == "ok" and summary["f-two"]["status"] == "not run"
    assert (tmp_path / "report.md").exists()
    # resuming skips the finished figure
    calls.clear()
    assert figs_main(["--tiny", "--out", str(tmp_path)], registry=_registry(calls)) == 0
    assert calls == ["f-two", "f-three"]


def test_figs_failure_is_one_line_without_traceback(tmp_path, capsys):
    reg = Registry()

    @reg.figure("broken", description="Fails.", claim="None.")
    def compute(cfg: FigureConfig) -> dict:
        raise RuntimeError("boom")

    assert figs_main(["--tiny", "--out", str(tmp_path)], registry=reg) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "FAILED" in captured.out and "RuntimeError: boom" in captured.out and "--debug" in captured.out
    assert "1 figure(s) failed: broken" in _one_error_line(captured.err, "python -m paper_figs")


# ----------------------------------------------------------------------------------------------------------------------
# unfold train: Ctrl-C names the checkpoint and how to resume
# ----------------------------------------------------------------------------------------------------------------------


def _interrupting_train(*args, **kwargs):
    raise KeyboardInterrupt


def test_train_interrupt_with_checkpoint(files, monkeypatch, capsys):
    import unfold.__main__ as cli

    monkeypatch.setattr(cli, "train", _interrupting_train)
    argv = ["train", "--task", "synthetic", "--d", "8", "--depth", "2", "--steps", "5", "--batch-size", "16",
            "--quiet", "--checkpoint", files["ckpt"]]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("python -m unfold: interrupted: ")
    assert files["ckpt"] in lines[0] and "holds step 2" in lines[0] and "rerun the same command" in lines[0]


def test_train_interrupt_without_checkpoint(monkeypatch, capsys):
    import unfold.__main__ as cli

    monkeypatch.setattr(cli, "train", _interrupting_train)
    assert cli.main(["train", "--task", "synthetic", "--d", "8", "--depth", "2", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "--checkpoint PATH" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------------
# --help, defaults, console scripts, plot_trace
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("main, argv", [
    (energy_main, ["--help"]), (verify_main, ["--help"]), (unfold_main, ["train", "--help"]),
    (unfold_main, ["trace", "--help"]), (figs_main, ["--help"]), (_bench_main, ["--help"]), (cc_main, ["--help"]),
])
def test_help_exits_0_and_shows_defaults(main, argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--debug" in out
    if main is not energy_main:
        assert "(default:" in out


def test_norm_eps_default_agrees_with_the_api(capsys):
    from unfold.presets import yang2022

    assert NORM_EPS_DEFAULT == inspect.signature(yang2022).parameters["norm_eps"].default == 0.0
    assert unfold_main(["train", "--help"]) == 0
    assert "--norm-eps" in capsys.readouterr().out


def test_console_scripts_resolve():
    import importlib

    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"energy", "energy-verify", "unfold", "paper-figs"} <= set(scripts)
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_plot_trace_public(tmp_path):
    import torch

    import unfold
    from energy._validation import EnergyInputError

    model = unfold.yang2022(d=8, depth=3, d_in=4, n_classes=3)
    _, info = model(torch.randn(5, 6, 4), trace=True)
    fig = unfold.plot_trace(info)
    assert len(fig.axes[0].lines[-1].get_xdata()) == 3 + 1  # one point per layer boundary
    path = unfold.plot_trace(info, tmp_path / "t.png", title="x")
    assert (tmp_path / "t.png").stat().st_size > 1000 and path is not None
    with pytest.raises(EnergyInputError, match="trace=True"):
        unfold.plot_trace({"states": []})


# ----------------------------------------------------------------------------------------------------------------------
# real processes: python -m ... (no traceback, exit codes)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, status", [
    (["energy", "--help"], 0),
    (["unfold", "trace", "--model", "{empty}"], 2),
    (["paper_figs", "yang2022-apollonius", "--tiny", "--out", "{file}/sub"], 2),
])
def test_python_m_subprocess(argv, status, files):
    argv = [a.format(**files) for a in argv]
    res = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == status, res.stderr
    assert "Traceback" not in res.stderr
    if status:
        assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1
