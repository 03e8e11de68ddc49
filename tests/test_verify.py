"""The verification suite (python -m energy verify) meets its targets and its CLI behaves."""

import json
import subprocess
import sys

import pytest

from energy import verify


def test_every_case_meets_targets():
    results = verify.run(seed=7, trials=3)
    assert {r.case for r in results} == {c.name for c in verify.CASES}
    for r in results:
        if r.max_abs_err is not None:
            assert r.max_abs_err <= 1e-10, r
        else:
            assert not r.guaranteed  # only the measured trap compares nothing
        if r.guaranteed:
            assert r.descent_violations == 0, r


def test_plain_softmax_trap_is_visible():
    """Regression (MATH §1.1): without β, softmax attention increases the pairwise energy on some instances."""
    (r,) = verify.run(seed=0, trials=20, cases=["plain-softmax-without-beta"])
    assert not r.guaranteed
    assert r.descent_violations > 0


def test_unknown_case_is_rejected():
    with pytest.raises(ValueError, match="valid cases"):
        verify.run(cases=["no-such-case"])
    with pytest.raises(ValueError, match="trials"):
        verify.run(trials=0)


def test_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "energy", "verify", "--json", "--trials", "2", "--case", "ffn-step",
         "--case", "attention-step-a"],
        capture_output=True, text=True, check=True,
    )
    rows = json.loads(out.stdout)
    assert [r["case"] for r in rows] == ["attention-step-a", "ffn-step"]
    for r in rows:
        assert {"case", "reproduces", "reference", "max_abs_err", "descent_violations", "trials"} <= set(r)
        assert r["trials"] == 2 and r["max_abs_err"] <= 1e-10


def test_cli_usage_error():
    out = subprocess.run([sys.executable, "-m", "energy"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr
