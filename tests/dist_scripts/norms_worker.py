"""One rank of the exact-norm tests over data shards: ``norms_worker.py MODE OUT``.

Modes: ``heads`` (every case of ``head_block_norms``), ``blocks`` (block Hessians, parts, loss, token Hessians and
the multi-head diagonals), both saved by every rank to ``OUT.<rank>``; the faults ``nan`` (rank 1's ``X`` holds a
NaN), ``weights`` (rank 1's ``W_Q`` differs by one ulp), ``block_nan`` (a NaN in rank 1's block input); and
``time D K L B REPEAT [CHUNK]`` (timings of each block of ``head_block_norms``, rank 0 saves them). Each rank prints one
``OUTCOME <rank> ok`` or ``OUTCOME <rank> <ExceptionType> <first line of the message>`` and exits 1 on an error.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from energy.hessian.block import block_hessian
from energy.hessian.head_norms import HEAD_BLOCKS, head_block_norms
from tests.dist_scripts import _norms_problems as P
from tests.dist_scripts._protocol import run_rank


def _fault(mode: str, rank: int, world: int) -> None:
    if mode == "block_nan":
        block, X, T = P.block_problem("pre", "ce", "mean")
        idx = P.shard(X.shape[0], rank, world)
        Xr = X[idx].clone()
        if rank == 1:
            Xr[0, 1, 2] = float("nan")
        block_hessian(block, Xr, T[idx], distributed=True)
        return
    p = P.head_problem(3, True)
    idx = P.shard(3, rank, world)
    X, W_Q = p["X"][idx].clone(), p["W_Q"].clone()
    if mode == "nan" and rank == 1:
        X[1, 2, 3] = float("nan")
    if mode == "weights" and rank == 1:
        W_Q[0, 0] = torch.nextafter(W_Q[0, 0], torch.tensor(10.0, dtype=W_Q.dtype))
    head_block_norms(X, W_Q, p["W_K"], p["W_V"], p["W_O"], p["G"][idx], c=p["c"], causal=True, distributed=True)


def _time(rank: int, world: int, d: int, k: int, L: int, B: int, repeat: int, chunk: int = 2048) -> dict:
    """Best-of-``repeat`` seconds of each block on this rank's share of ``B`` sequences (a barrier before each)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    W = [torch.randn(d, k, generator=g, dtype=torch.float64) / d**0.5 for _ in range(3)]
    W_O = torch.randn(k, d, generator=g, dtype=torch.float64) / k**0.5
    G = torch.randn(B, L, d, generator=g, dtype=torch.float64) / (B * L * d)
    idx = P.shard(B, rank, world)
    out: dict = {}
    for block in HEAD_BLOCKS:
        best = float("inf")
        for _ in range(repeat):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            head_block_norms(X[idx], W[0], W[1], W[2], W_O, G[idx], c=1.0 / (B * L * d), causal=True,
                             blocks=[block], chunk=chunk, distributed=world > 1)
            best = min(best, time.perf_counter() - t0)
        out[block] = best
    return out


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]

    def body(rank: int, world: int) -> None:
        if mode == "heads":
            torch.save(P.head_results(rank, world, distributed=True), f"{out}.{rank}")
        elif mode == "blocks":
            res = {"blocks": P.block_results(rank, world, distributed=True),
                   "multihead": P.multihead_results(rank, world, distributed=True)}
            torch.save(res, f"{out}.{rank}")
        elif mode == "time":
            res = _time(rank, world, *(int(a) for a in sys.argv[3:]))
            if rank == 0:
                torch.save(res, out)
        else:
            _fault(mode, rank, world)

    run_rank(body, timeout=30.0)


if __name__ == "__main__":
    main()
