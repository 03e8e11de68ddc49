"""The whole-block closed-form Hessian (energy.hessian.block, MATH §5.3) against ``torch.func.hessian``.

Entry ``hessian/block-dense-vs-autograd``: a Pre-LN block (4 heads, GELU FFN of width 4d, square loss on the
output, L = 8, B = 2, float64) at widths d ∈ {16, 24, 28} (quick: {8, 12, 16}); per width the closed form
(:func:`energy.hessian.block.block_hessian`) and the autograd twin (``torch.func.hessian`` of the same loss) are timed
interleaved, with their agreement and the process's peak resident memory after each (``ru_maxrss``, monotone, so
an upper bound). The headline ``speedup`` is the one at the largest width where the twin's peak stays within 8 GiB
(at d = 32, p = 12,576, it needs about 9 GB). Target: speed-up ≥ 10. The closed form's growth with the parameter
count p is fitted over the widths (``exponent_closed``; the sweep's dominant products are ``O(N d p²)``).
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import benchmark, interleaved_medians
from energy.hessian.block import TransformerBlock, autograd_block_hessian, block_hessian, random_block
from energy.hessian.sweep import fit_loglog_slope

DT = torch.float64
_BUDGET_GIB = 8.0


def _peak_gib() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**3 if sys.platform == "darwin" else 1024**2)


def _pair(block: TransformerBlock, X: torch.Tensor, Y: torch.Tensor) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The closed form and its autograd twin on one problem, as argument-free callables."""
    return (lambda: block_hessian(block, X, Y, max_gib=_BUDGET_GIB)), (lambda: autograd_block_hessian(block, X, Y))


@benchmark("hessian/block-dense-vs-autograd")
def bench_block_dense(quick: bool) -> dict[str, Any]:
    widths = (8, 12, 16) if quick else (16, 24, 28)
    rows = []
    for d in widths:
        block = random_block(d, 4, d // 4, 4 * d, vocab=None, loss="mse", generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        X, Y = torch.randn(2, 8, d, generator=g, dtype=DT), torch.randn(2, 8, d, generator=g, dtype=DT)
        closed = block_hessian(block, X, Y, max_gib=_BUDGET_GIB).matrix
        after_closed = _peak_gib()
        twin = autograd_block_hessian(block, X, Y)
        after_twin = _peak_gib()
        err = float((closed - twin).abs().max() / twin.abs().max())
        del closed, twin
        tc, ta = interleaved_medians(*_pair(block, X, Y), repeat=3)
        rows.append({"d": d, "params": block.num_params, "closed_s": tc, "autograd_s": ta, "speedup": ta / tc,
                     "rel_err": err, "peak_gib_after_closed": after_closed, "peak_gib_after_autograd": after_twin})
        print(f"[bench]   d={d} p={block.num_params}: closed {tc:.3f}s autograd {ta:.3f}s (x{ta / tc:.1f}), "
              f"peak {after_twin:.2f} GiB", flush=True)
    fitting = [r for r in rows if r["peak_gib_after_autograd"] <= _BUDGET_GIB] or rows[:1]
    head = fitting[-1]
    fit = fit_loglog_slope([r["params"] for r in rows], [r["closed_s"] for r in rows])
    return {
        "speedup": head["speedup"], "params": head["params"], "d": head["d"], "candidate_median_s": head["closed_s"],
        "baseline_median_s": head["autograd_s"], "target": "speedup >= 10", "meets_target": head["speedup"] >= 10,
        "exponent_closed": fit.slope, "exponent_closed_stderr": fit.stderr, "rows": rows,
        "threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
        "note": "Pre-LN block, 4 heads, GELU FFN 4d, square loss, L = 8, B = 2; headline at the largest width whose "
                "autograd peak memory stays within 8 GiB",
    }
