"""Data-parallel curvature (issue #12 item 7, MATH §6.1): two processes × one thread against one process × one
thread on the same total data, ratio of wall times measured in the same run.

Model: a Hugging Face GPT-2 built offline from a seeded config (:func:`energy.hessian.hf.build_model`, 2 layers,
4 heads, vocabulary 128), float32, at widths ``d ∈ {64, 128, 256}`` (quick: ``{32, 48, 64}``); data: 8 batches of
8 random sequences of 32 tokens (quick: 4 × 4 × 16), the mean shifted cross-entropy over all of them. One process
holds all batches; each of two processes (gloo, loopback) holds four (:func:`energy.hessian.distributed.
shard_batches`) and every product ends with one all-reduce.

* ``hessian/data-parallel-efficiency``: per width, the median wall time of one Hessian-vector product
  (``curvature_operator(..., part="H") @ v``, all parameters) and of one Hutchinson trace estimate
  (:func:`energy.hessian.estimators.hutchinson_trace`, 4 Rademacher probes in one 4-column product), for one
  process (``T₁``) and for two (``T₂``, rank 0's clock: every rank leaves the all-reduce together); the parallel
  efficiency ``T₁ / (2 T₂)`` (1 = perfect; target ≥ 0.8 at the largest width), the speed-up ``T₁ / T₂`` and the
  growth exponent of ``T₁`` in the parameter count (:func:`energy.hessian.sweep.fit_loglog_slope`). The products
  of the two runs are compared too (``max_rel_diff``: they must agree to float32 rounding). The machine's own
  limit is measured alongside: the same two shards in two processes without a process group (no all-reduce),
  ``T₁ / (2 T_indep)`` (``machine_limit``): on a shared machine it separates the library's overhead from the
  machine's.

Each configuration runs in fresh processes started by ``torch.multiprocessing`` (spawn) with one intra-op
thread, median of ``repeat`` calls after a warm-up; the three configurations (one process, two ranks, two independent
processes) run in turn, ``rounds`` times, and each time is the median over the rounds, so that a change of the
machine's load during the run falls on all three alike. The machine needs two idle cores for the numbers to mean
anything (``cpus`` and the load average before and after are recorded).
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks import benchmark
from energy.hessian.sweep import fit_loglog_slope

DT = torch.float32
LAYERS, HEADS, VOCAB = 2, 4, 128


def _problem(width: int, quick: bool) -> tuple[Any, list]:
    from energy.hessian import hf

    num_batches, batch, seq = (4, 4, 16) if quick else (8, 8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.build_model("gpt2-tiny", seed=0, dtype=DT, n_embd=width, n_layer=LAYERS, n_head=HEADS,
                               vocab_size=VOCAB, n_positions=seq)
    return model, hf.synthetic_batches(model, batch=batch, seq_len=seq, num_batches=num_batches, seed=0)


def _worker(rank: int, world: int, port: int, width: int, quick: bool, repeat: int, out: Any,
            independent: bool = False) -> None:
    """One rank: build the operator on its shard, time ``repeat`` HVPs and Hutchinson estimates (after a warm-up).

    ``independent``: the ranks run on their shards without a process group (no all-reduce): the machine's own limit
    for two processes sharing it.
    """
    from energy.hessian import hf
    from energy.hessian.distributed import shard_batches
    from energy.hessian.estimators import hutchinson_trace

    torch.set_num_threads(1)
    shared = world > 1 and not independent
    if shared:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    model, data = _problem(width, quick)
    H = hf.curvature_operator(model, shard_batches(data, rank, world), part="H", distributed=shared)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)

    def hutchinson() -> Any:
        return hutchinson_trace(H, 4, generator=torch.Generator().manual_seed(2), batch_size=4)

    times: dict[str, list[float]] = {"hvp": [], "hutchinson": []}
    for i in range(repeat + 1):  # the first round is the warm-up
        for name, fn in (("hvp", lambda: H @ v), ("hutchinson", hutchinson)):
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    Hv = H @ v  # every rank takes part in every product
    if rank == 0:  # a file, not a pipe: the parent joins the ranks before it reads
        torch.save({"hvp_s": statistics.median(times["hvp"]), "hutchinson_s": statistics.median(times["hutchinson"]),
                    "num_params": H.shape[0], "Hv": Hv}, out)
    if shared:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(world: int, width: int, quick: bool, repeat: int, independent: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.start_processes(_worker, args=(world, _free_port(), width, quick, repeat, out, independent), nprocs=world,
                           join=True, start_method="spawn")
        return torch.load(out)  # type: ignore[no-any-return]


@benchmark("hessian/data-parallel-efficiency")
def bench_data_parallel(quick: bool) -> dict[str, Any]:
    widths = (32, 48, 64) if quick else (64, 128, 256)
    repeat, rounds = (2, 1) if quick else (3, 3)
    out: dict[str, Any] = {"dtype": "float32", "layers": LAYERS, "heads": HEADS, "vocab": VOCAB,
                           "widths": list(widths), "repeat": repeat, "rounds": rounds, "cpus": os.cpu_count(),
                           "load_before": os.getloadavg()[0], "num_params": []}
    one_hvp = []
    for width in widths:
        runs: dict[str, list[dict[str, Any]]] = {"one": [], "two": [], "independent": []}
        for _ in range(rounds):
            runs["one"].append(_run(1, width, quick, repeat))
            runs["two"].append(_run(2, width, quick, repeat))
            runs["independent"].append(_run(2, width, quick, repeat, independent=True))
        med = {k: {op: statistics.median(r[f"{op}_s"] for r in v) for op in ("hvp", "hutchinson")}
               for k, v in runs.items()}
        out["num_params"].append(runs["one"][0]["num_params"])
        one_hvp.append(med["one"]["hvp"])
        a, b = runs["one"][0]["Hv"], runs["two"][0]["Hv"]
        out[f"d{width}_max_rel_diff"] = float((a - b).abs().max() / a.abs().max())
        for op in ("hvp", "hutchinson"):
            t1, t2, t_ind = med["one"][op], med["two"][op], med["independent"][op]
            out.update({f"d{width}_{op}_one_process_s": t1, f"d{width}_{op}_two_processes_s": t2,
                        f"d{width}_{op}_speedup": t1 / t2, f"d{width}_{op}_efficiency": t1 / (2 * t2),
                        f"d{width}_{op}_machine_limit": t1 / (2 * t_ind)})
    last = widths[-1]
    out["efficiency_hvp"] = out[f"d{last}_hvp_efficiency"]
    out["efficiency_hutchinson"] = out[f"d{last}_hutchinson_efficiency"]
    out["machine_limit_hvp"] = out[f"d{last}_hvp_machine_limit"]
    out["ratio"] = out["efficiency_hvp"]
    fit = fit_loglog_slope(out["num_params"], one_hvp)
    out["exponent_one_process_hvp_in_params"] = fit.slope
    out["exponent_stderr"] = fit.stderr
    out["load_after"] = os.getloadavg()[0]
    out["what"] = ("parallel efficiency T1 / (2 T2) of one HVP on 2 processes x 1 thread vs 1 process x 1 thread, "
                   "same total data, at the largest width")
    out["target"] = "efficiency >= 0.8"
    out["meets_target"] = bool(min(out["efficiency_hvp"], out["efficiency_hutchinson"]) >= 0.8)
    return out
