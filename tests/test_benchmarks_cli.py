"""The ``python -m benchmarks`` command line (selection and report writing; no timing here)."""

from __future__ import annotations

from benchmarks.__main__ import main


def test_only_matching_nothing_is_a_one_line_error(capsys, tmp_path):
    out = tmp_path / "results.json"
    assert main(["--only", "no-benchmark-has-this-name", "--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "no-benchmark-has-this-name" in captured.err
    assert "matches no benchmark" in captured.err
    assert not out.exists()
