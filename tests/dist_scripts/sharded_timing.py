"""Timing of ``ShardedHessian`` against one gradient, 2 ranks × 1 thread, GPT-2-shaped models of growing width.

Usage (from the repository root)::

    python -c "from tests._dist import run_ranks; run_ranks('sharded_timing.py', 2, ['out.json'], timeout=600)"

Rank 0 writes ``{"sizes": [{"width", "params", "gradient_s", "finite_difference_s", "exact_s"}, ...],
"exponents": {...}}`` (median seconds of ``REPEATS`` calls; exponents fitted to log time vs log parameters).
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sharded_cases as cases  # noqa: E402

from energy.hessian.sharded import ShardedHessian  # noqa: E402
from energy.hessian.sweep import fit_loglog_slope  # noqa: E402

WIDTHS = (128, 256, 512)
REPEATS = 5
SEQ_LEN = 64


def median_seconds(call: Callable[[], object]) -> float:
    call()  # warm-up
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(out: str) -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rows = []
    for width in WIDTHS:
        model = cases.build("gpt", width, SEQ_LEN)
        params = sum(p.numel() for p in model.parameters())
        for unit in cases.units("gpt", model):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        loss_fn, count = cases.loss_and_count("gpt", model)
        data = cases.rank_data("gpt", model, 0, seq_len=SEQ_LEN)  # the same amount of data on both ranks
        fd = ShardedHessian(model, loss_fn, data, batch_size_fn=count)
        ex = ShardedHessian(model, loss_fn, data, method="exact", batch_size_fn=count)
        v = fd.shard(cases.direction(model))
        rows.append({"width": width, "params": params, "gradient_s": median_seconds(fd.gradient),
                     "finite_difference_s": median_seconds(partial(fd.matvec, v)),
                     "exact_s": median_seconds(partial(ex.matvec, v))})
    p = [float(r["params"]) for r in rows]
    exponents = {}
    for key in ("gradient_s", "finite_difference_s", "exact_s"):
        fit = fit_loglog_slope(p, [float(r[key]) for r in rows])
        exponents[key] = {"slope": fit.slope, "stderr": fit.stderr}
    for r in rows:
        r["finite_difference_over_gradient"] = r["finite_difference_s"] / r["gradient_s"]
        r["exact_over_gradient"] = r["exact_s"] / r["gradient_s"]
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"world_size": dist.get_world_size(), "threads_per_rank": 1,
                                         "sizes": rows, "exponents": exponents}, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    try:
        main(sys.argv[1])
    finally:
        dist.destroy_process_group()
