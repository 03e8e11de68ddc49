"""python -m energy.hessian verify: every registered closed form meets 1e-10 against its twin, and the CLI's contract
(one-line errors, exit codes 0 / 1 / 2 / 130, --json checked before computing, --list, --case)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from energy._cli import UsageError
from energy.hessian import verify
from energy.hessian.__main__ import main as hessian_main
from energy.hessian.attention import attention_hessian, attention_moments, autograd_attention_hessian

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m energy.hessian verify"
ROW_KEYS = {"case", "max_rel_err", "shapes", "compares", "reference", "worst", "trials", "passed", "seconds"}
#: The single-head closed forms that existed when the command was written (issue #10 item 4).
SINGLE_HEAD = {
    "single-head-hessian", "single-head-hessian-W_O", "single-head-hessian-causal", "single-head-hessian-padding",
    "single-head-linear-attention", "single-head-jacobians", "single-head-W_QK", "single-head-bilinear-term",
    "single-head-structure-norms", "single-head-structure-diagonals", "single-head-energy-layer",
    "attention-energy-token-hessian", "single-head-feedforward-energy-token-hessian",
}


def _one_error_line(err: str, prog: str = PROG, kind: str = "error: ") -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith(f"{prog}: {kind}"), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return verify.run(seed=11, trials=1)


@pytest.fixture
def registry(monkeypatch) -> dict[str, verify.Case]:
    """A private copy of the registry: cases registered by a test vanish after it."""
    reg = dict(verify.REGISTRY)
    monkeypatch.setattr(verify, "REGISTRY", reg)
    return reg


# ----------------------------------------------------------------------------------------------------- the cases


def test_every_registered_case_passes_at_one_trial(rows):
    assert [r["case"] for r in rows] == list(verify.REGISTRY)
    for r in rows:
        assert r["passed"] and 0.0 <= r["max_rel_err"] <= verify.TOLERANCE, r


def test_every_single_head_closed_form_is_registered():
    assert SINGLE_HEAD <= set(verify.REGISTRY)
    assert all("single-head" in name or "attention" in name for name in SINGLE_HEAD)


def test_rows_have_the_documented_keys_and_odd_shapes(rows):
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["trials"] == len(r["shapes"]) == 1
        s = r["shapes"][0]
        assert s["B"] > 1, r
        if "d_K" in s and "d_V" in s:  # single-head cases: unequal widths and L ≠ d_V
            assert s["d_K"] != s["d_V"] and s["L"] != s["d_V"], r
        assert r["worst"].startswith("trial 0: ")


def test_default_trials_include_one_token_and_unequal_widths():
    for t in range(9):
        s = verify.dims(torch.Generator().manual_seed(t), t)
        assert (s["L"] == 1) == (t % 3 == 2)
        assert s["B"] in (2, 3) and s["d_K"] != s["d_V"] and 1 <= s["d_K"] <= 5 and 2 <= s["d_V"] <= 5


def test_rel_err_definition():
    twin = torch.tensor([[2.0, -4.0]], dtype=torch.float64)
    closed = twin + torch.tensor([[0.0, 1e-3]], dtype=torch.float64)
    assert verify.rel_err(closed, twin) == pytest.approx(1e-3 / 4)
    assert verify.rel_err(closed, twin, torch.tensor(8.0, dtype=torch.float64)) == pytest.approx(1e-3 / 8)
    zero = torch.zeros(3, dtype=torch.float64)
    assert verify.rel_err(zero, zero) == 0.0
    assert verify.rel_err(zero + 1e-300, zero) > 1.0  # an exactly-zero twin is compared (almost) absolutely
    assert math.isnan(verify.rel_err(torch.full((2,), math.nan, dtype=torch.float64), torch.ones(2)))
    assert math.isnan(verify.rel_err(torch.ones(2), torch.ones(3)))


def test_a_wrong_closed_form_is_caught(registry, tmp_path, capsys):
    """H_o in place of H (the functional part dropped) must fail, exit 1, name the case and still write the JSON."""

    @verify.case("single-head-hessian-without-H_f", compares="attention_hessian H_o (wrong on purpose)",
                 reference="autograd_attention_hessian")
    def _wrong(g: torch.Generator, t: int) -> verify.Trial:
        s = verify.dims(g, t)
        X = torch.randn(s["B"], s["L"], s["d_V"], generator=g, dtype=torch.float64)
        Y = torch.randn(s["B"], s["L"], s["d_V"], generator=g, dtype=torch.float64)
        W = [torch.randn(s["d_V"], k, generator=g, dtype=torch.float64) for k in (s["d_K"], s["d_K"], s["d_V"])]
        closed = attention_hessian(attention_moments(X, *W, Y), "H_o")
        return verify.Trial(s, [("H", closed, autograd_attention_hessian(X, *W, Y))])

    out = tmp_path / "rows.json"
    argv = ["--case", "single-head-hessian-without-H_f", "--case", "single-head-jacobians", "--trials", "1",
            "--json", str(out)]
    assert verify.main(argv) == 1
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert "1 of 2 case(s)" in line and "single-head-hessian-without-H_f" in line and "jacobians" not in line
    doc = json.loads(out.read_text())
    assert doc["all_passed"] is False
    # registration order, not command-line order: the built-in case comes first
    assert [r["case"] for r in doc["cases"]] == ["single-head-jacobians", "single-head-hessian-without-H_f"]
    by_name = {r["case"]: r for r in doc["cases"]}
    assert by_name["single-head-hessian-without-H_f"]["passed"] is False
    assert by_name["single-head-hessian-without-H_f"]["max_rel_err"] > 1e-3
    assert by_name["single-head-jacobians"]["passed"] is True
    assert "| NO |" in captured.out


def test_a_non_finite_closed_form_fails_and_the_json_stays_strict(registry, tmp_path):
    @verify.case("attention-nan", compares="nan", reference="ones")
    def _nan(g: torch.Generator, t: int) -> verify.Trial:
        return verify.Trial({"B": 2}, [("x", torch.full((2,), math.nan, dtype=torch.float64), torch.ones(2))])

    (row,) = verify.run(trials=2, cases=["attention-nan"])
    assert math.isnan(row["max_rel_err"]) and not row["passed"] and row["worst"] == "trial 0: x"
    out = tmp_path / "nan.json"
    assert verify.main(["--case", "attention-nan", "--json", str(out)]) == 1
    assert json.loads(out.read_text())["cases"][0]["max_rel_err"] is None  # strict JSON: no NaN token


def test_names_are_unique(registry):
    with pytest.raises(ValueError, match="already registered"):
        verify.case("single-head-hessian", compares="x", reference="y")(lambda g, t: verify.Trial({}, []))


def test_seeds_are_per_case_and_reproducible():
    a = verify.run(seed=4, trials=2, cases=["single-head-jacobians"])[0]
    both = verify.run(seed=4, trials=2, cases=["single-head-hessian", "single-head-jacobians"])
    assert both[1]["shapes"] == a["shapes"] and both[1]["max_rel_err"] == a["max_rel_err"]
    other = verify.run(seed=5, trials=2, cases=["single-head-hessian", "single-head-jacobians"])
    assert [r["shapes"] for r in other] != [r["shapes"] for r in both]


def test_run_rejects_bad_arguments():
    with pytest.raises(ValueError, match="valid cases"):
        verify.run(cases=["no-such-case"])
    with pytest.raises(ValueError, match="trials"):
        verify.run(trials=0)


def test_a_case_module_adds_a_case_with_one_decorated_function(registry, tmp_path, monkeypatch, capsys, request):
    """The documented extension path: a module named in CASE_MODULES registers its case when a run starts."""
    (tmp_path / "extra_hessian_cases.py").write_text(
        "import torch\n"
        "from energy.hessian.verify import Trial, case, dims\n\n\n"
        "@case('block-identity', compares='I', reference='torch.eye')\n"
        "def _identity(g, t):\n"
        "    s = dims(g, t)\n"
        "    return Trial(s, [('I', torch.eye(s['d_V'], dtype=torch.float64), torch.eye(s['d_V']).double())])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    request.addfinalizer(lambda: sys.modules.pop("extra_hessian_cases", None))  # a rerun imports (registers) again
    monkeypatch.setattr(verify, "CASE_MODULES", ["extra_hessian_cases"])
    assert verify.main(["--list"]) == 0
    assert "block-identity: I" in capsys.readouterr().out
    (row,) = verify.run(trials=2, cases=["block-identity"])
    assert row["passed"] and row["max_rel_err"] == 0.0 and len(row["shapes"]) == 2


def test_a_missing_case_module_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(verify, "CASE_MODULES", ["no_such_module_for_hessian_verify"])
    with pytest.raises(ModuleNotFoundError):
        verify.run(trials=1, cases=["single-head-hessian"])
    assert verify.main(["--list"]) == 1
    assert "no_such_module_for_hessian_verify" in _one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------------- the CLI


def test_cli_json_schema(tmp_path, capsys):
    out = tmp_path / "sub" / "verify.json"
    argv = ["--case", "single-head-W_QK", "--case", "single-head-hessian", "--trials", "2", "--seed", "3",
            "--json", str(out)]
    assert hessian_main(["verify", *argv]) == 0
    printed = capsys.readouterr().out
    assert "| single-head-hessian |" in printed and "all 2 case(s) meet" in printed
    doc = json.loads(out.read_text())
    assert set(doc) == {"command", "seed", "trials", "tolerance", "all_passed", "torch", "cases"}
    assert (doc["command"], doc["seed"], doc["trials"], doc["tolerance"], doc["all_passed"]) == (
        "verify", 3, 2, 1e-10, True)
    assert [r["case"] for r in doc["cases"]] == ["single-head-hessian", "single-head-W_QK"]  # registry order
    for r in doc["cases"]:
        assert set(r) == ROW_KEYS and r["trials"] == len(r["shapes"]) == 2 and r["max_rel_err"] <= 1e-10
    assert not list(out.parent.glob(".*.tmp"))  # the atomic writer left no temporary file


def test_cli_list(capsys):
    assert verify.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert [ln.split(":")[0] for ln in out.splitlines()] == list(verify.REGISTRY)


@pytest.mark.parametrize("argv, needles", [
    (["--case", "nope"], ("--case nope", "unknown case", "valid cases", "single-head-hessian-padding")),
    (["--case", "single-head-hessian", "--case", "nope"], ("--case nope", "valid cases")),
    (["--trials", "0"], ("--trials", "at least 1")),
    (["--trials", "x"], ("--trials", "invalid int", "--help")),
    (["--seed", "1.5"], ("--seed", "invalid int")),
    (["--trails", "3"], ("--trails", "unrecognized")),
])
def test_cli_usage_errors_are_one_line(argv, needles, capsys):
    assert verify.main(argv) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    for needle in needles:
        assert needle in line, (needle, line)
    assert captured.out == ""


@pytest.mark.parametrize("where, needles", [
    ("{file}/out.json", ("--json", "writable directory")),
    ("{dir}", ("--json", "is a directory", "file path")),
    ("/proc/no-such-dir/out.json", ("--json", "cannot write")),
])
def test_cli_unwritable_json_is_refused_before_computing(where, needles, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    calls: list[object] = []
    monkeypatch.setattr(verify, "run", lambda **kw: calls.append(kw) or [])
    path = where.format(file=tmp_path / "afile", dir=tmp_path / "adir")
    assert verify.main(["--json", path]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    for needle in needles:
        assert needle in line, (needle, line)
    assert calls == [] and captured.out == ""


def test_cli_ctrl_c_and_debug(registry, capsys):
    @verify.case("attention-interrupted", compares="-", reference="-")
    def _interrupt(g: torch.Generator, t: int) -> verify.Trial:
        raise KeyboardInterrupt

    assert verify.main(["--case", "attention-interrupted"]) == 130
    _one_error_line(capsys.readouterr().err, kind="interrupted (Ctrl-C)")
    with pytest.raises(UsageError, match="--case nope"):
        verify.main(["--case", "nope", "--debug"])


@pytest.mark.parametrize("argv, needles", [
    ([], ("COMMAND", "verify", "--help")),
    (["frobnicate"], ("frobnicate", "invalid choice", "verify")),
])
def test_dispatcher_usage_errors(argv, needles, capsys):
    assert hessian_main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, prog="python -m energy.hessian")
    for needle in needles:
        assert needle in line, (needle, line)


def test_dispatcher_help_and_subcommand_help(capsys):
    assert hessian_main(["--help"]) == 0
    assert "verify" in capsys.readouterr().out
    assert hessian_main(["verify", "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: {PROG}" in out and "--json OUT" in out and "(default: 3)" in out and "--debug" in out


@pytest.mark.parametrize("argv, status", [
    (["verify", "--case", "single-head-feedforward-energy-token-hessian", "--trials", "1"], 0),
    (["verify", "--case", "nope"], 2),
    ([], 2),
])
def test_python_m_subprocess(argv, status):
    res = subprocess.run([sys.executable, "-m", "energy.hessian", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == status, res.stderr
    assert "Traceback" not in res.stderr
    if status:
        assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1
