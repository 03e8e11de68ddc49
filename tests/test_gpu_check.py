"""``benchmarks/gpu_check.py``: the CPU smoke run writes every field of the report; without a GPU it refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check


def _finite_positive(*values: object) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)


def test_cpu_quick_run_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--device cpu --quick``: the suite runs (its cuda cases skipped here), every measurement is recorded."""
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--repeat", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"[gpu_check] {part}:" in printed for part in ("suite", "hvp", "head_norms", "fused"))
    rep = json.loads(out.read_text())
    assert rep["device"] == "cpu" and rep["card"] is None and rep["torch"] == torch.__version__ and rep["quick"]
    suite = rep["suite"]
    assert suite["returncode"] == 0 and "-m cuda tests/test_devices.py" in suite["command"]
    assert ("skipped" if not torch.cuda.is_available() else "passed") in suite["summary"]
    hvp = rep["hvp"]
    assert hvp["attention"] == "eager" and hvp["dtype"] == "float32" and hvp["num_params"] > 0
    assert _finite_positive(hvp["gradient_s"], hvp["hvp_s"], hvp["functional_gradient_s"], hvp["ratio"])
    assert hvp["ratio"] == pytest.approx(hvp["hvp_s"] / hvp["gradient_s"])
    assert hvp["functional_gradient_rel_diff"] < 1e-5 and isinstance(hvp["meets_target"], bool)
    norms = rep["head_norms"]
    for block in ("QQ", "VV", "OO", "KK"):  # all four fit the budget at the quick sizes
        parts = norms[block]
        assert set(parts) == {"H", "H_o", "H_f", "cross"} and _finite_positive(norms[f"{block}_s"], parts["H"])
        assert parts["H"] ** 2 == pytest.approx(parts["H_o"] ** 2 + 2 * parts["cross"] + parts["H_f"] ** 2)
    assert norms["VV"]["H_f"] == norms["OO"]["H_f"] == 0.0  # the value/output blocks have no functional part
    fused = rep["fused"]
    assert fused["flash_dtype"] in ("float32", "float16")
    assert _finite_positive(fused["fused_s"], fused["flash_sdpa_s"], fused["ratio"])
    assert 0 <= fused["max_abs_diff_fused_vs_float64_step"] < 1e-4 * fused["output_scale"]
    assert 0 <= fused["max_abs_diff_flash_vs_float64_attention"] < 1e-2


def test_budget_skips_the_kk_block(tmp_path: Path) -> None:
    """With no time left, ``(K,K)`` is predicted, skipped and said so (the other blocks still run)."""
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--repeat", "1", "--skip-suite", "--budget-s", "0",
                           "--json", str(out)]) == 0
    norms = json.loads(out.read_text())["head_norms"]
    assert "suite" not in json.loads(out.read_text()) and "KK" not in norms and "QQ" in norms
    assert "exceeds the remaining budget" in norms["KK_skipped"] and norms["KK_predicted_s"] > 0


@pytest.mark.parametrize("argv", [["--device", "cuda"], ["--device", "cpu"]], ids=["no-gpu", "cpu-without-quick"])
def test_refuses_with_one_line(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No CUDA device (or ``--device cpu`` without ``--quick``): exit status 2, one line on stderr, nothing written."""
    if argv[1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run")
    out = tmp_path / "gpu.json"
    assert gpu_check.main([*argv, "--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and not out.exists()
    assert captured.err.startswith(f"{gpu_check.PROG}: error:")
    assert ("pass --device cpu --quick" if argv[1] == "cuda" else "add --quick") in captured.err
