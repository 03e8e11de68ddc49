"""``torchrun --nproc_per_node 2 -m energy.hessian analyze ...`` (issue #12 item 2): the real launcher, two ranks,
gloo on loopback. The JSON equals the one-process JSON (timings aside) to 1e-12 relative, is written once by rank 0
and records ``world_size``; bad usage and a failing rank end every rank with one line each, no traceback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from _dist import describe, torchrun

from energy.hessian.analyze import main as analyze_main

ARGS = ["--model", "gpt2-tiny", "--num-batches", "3", "--blocks", "layer0.head0.Q", "layer1.ln2", "--probes", "2",
        "--steps", "6", "--top-k", "2", "--num-matvecs", "6", "--quiet"]


def _differences(a: object, b: object, path: str = "") -> list[tuple[str, float]]:
    """Relative differences of every float (arrays relative to their largest entry); other values must be equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        return [d for k in a if k != "seconds" for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        if a and all(isinstance(x, float) for x in a):
            scale = max(abs(x) for x in a) or 1.0
            return [(path, max(abs(x - y) for x, y in zip(a, b)) / scale)]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float):
        return [(path, abs(a - b) / max(abs(a), 1e-300))]
    assert a == b, (path, a, b)
    return []


@pytest.mark.slow
def test_torchrun_analyze_equals_one_process(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert analyze_main([*ARGS, "--json", str(one)]) == 0
    run = torchrun(2, ["-m", "energy.hessian", "analyze", *ARGS, "--json", str(two)])
    assert run.returncode == 0, describe([run])
    assert run.stdout.count(f"-> {two}") == 1  # written by rank 0 only
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    a.pop("world_size"), b.pop("world_size")
    diffs = _differences(a["blocks"], b["blocks"]) + _differences({k: v for k, v in a.items() if k != "blocks"},
                                                                   {k: v for k, v in b.items() if k != "blocks"})
    assert len(diffs) > 20 and max(d for _, d in diffs) <= 1e-12, sorted(diffs, key=lambda d: -d[1])[:5]


def test_torchrun_usage_error_stops_every_rank_with_one_line(tmp_path):
    run = torchrun(2, ["-m", "energy.hessian", "analyze", "--model", "gpt2-tiny", "--num-batches", "1",
                       "--json", str(tmp_path / "x.json")], timeout=90)
    assert run.returncode not in (0, None), describe([run])
    lines = {r: [ln for ln in run.stderr.splitlines() if f"analyze [rank {r}/2]: " in ln] for r in (0, 1)}
    assert all(len(v) == 1 for v in lines.values()), describe([run])  # one line per rank: its error, or that
    assert any("error: 1 batch(es) cannot be shared by 2 ranks" in v[0] for v in lines.values())  # torchrun
    assert all("cannot be shared" in v[0] or "stopped by the launcher (SIGTERM)" in v[0] for v in lines.values())
    assert not re.search(r'File ".*/(energy|unfold)/', run.stderr), describe([run])  # no traceback of ours


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_torchrun_unwritable_output_stops_the_other_rank(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        run = torchrun(2, ["-m", "energy.hessian", "analyze", *ARGS, "--json", str(locked / "x.json")], timeout=90)
    finally:
        locked.chmod(0o700)
    assert run.returncode not in (0, None), describe([run])
    assert "analyze [rank 0/2]: error: --json" in run.stderr, describe([run])
    assert "analyze [rank 1/2]: error: RankFailure" in run.stderr and "rank 0: UsageError" in run.stderr, \
        describe([run])
    assert not Path(locked / "x.json").exists()
