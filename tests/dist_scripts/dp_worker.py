"""One rank of the data-parallel operator tests: ``dp_worker.py MODE OUT``.

Modes: ``equal`` (every product and estimate on this rank's shard, rank 0 saves them to OUT), ``hf`` (the same for
a Hugging Face GPT-2 through BlockCurvature), ``second_order`` (a derivative through a reduced gradient), and the
faults ``raise``, ``setup``, ``weights``, ``probes``, ``hang``, ``exit``. Each rank prints one ``OUTCOME`` line:
``OUTCOME <rank> ok`` or ``OUTCOME <rank> <ExceptionType> <first line of the message>``, and exits 1 on an error.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

from energy.hessian.curvature_operators import HessianOperator
from energy.hessian.distributed import all_reduce_sum, shard_batches
from energy.hessian.estimators import hutchinson_trace
from tests.dist_scripts import _problems as P
from tests.dist_scripts._protocol import run_rank


def _equal(rank: int, world: int) -> dict:
    indices = shard_batches(list(range(len(P.SIZES))), rank, world)
    Y = P.token_states()[0]
    Y_shard = Y[shard_batches(list(range(Y.shape[0])), rank, world)]
    return P.mlp_results(indices, Y_shard, distributed=True)


def _hf(rank: int, world: int) -> dict:
    from tests.dist_scripts._hf_problem import hf_results

    return hf_results(rank, world)


def _second_order(rank: int, world: int) -> dict:
    """``∇_θ ‖∇L‖² = 2 H ∇L`` through the reduced gradient: local graph, all_reduce_sum, backward, reduce."""
    indices = shard_batches(list(range(len(P.SIZES))), rank, world)
    batches = [P.mlp_batches()[b] for b in indices]
    model = P.mlp()
    params = list(model.parameters())
    total = sum(P.SIZES)
    local = sum(X.shape[0] / total * nn.functional.mse_loss(model(X), y) for X, y in batches)
    g_local = torch.autograd.grad(local, params, create_graph=True)
    g = all_reduce_sum(torch.cat([t.reshape(-1) for t in g_local]))
    (phi_grad,) = [torch.cat([t.reshape(-1) for t in torch.autograd.grad((g * g).sum(), params)])]
    return {"grad_norm_grad": all_reduce_sum(phi_grad.detach()), "gradient": g.detach()}


def _fault(mode: str, rank: int, world: int) -> None:
    indices = shard_batches(list(range(len(P.SIZES))), rank, world)
    batches = [P.mlp_batches()[b] for b in indices]
    model = P.mlp()
    loss = nn.MSELoss()
    if mode == "setup" and rank == 1:
        batches[0][0][0, 0] = float("nan")
    if mode == "weights" and rank == 1:
        with torch.no_grad():
            next(model.parameters())[0, 0] += 1e-12
    if mode == "raise" and rank == 1:
        calls = {"n": 0}

        def loss(o, y):  # noqa: F811 -- the failing loss of rank 1: fine at construction, raises at product 2
            calls["n"] += 1
            if calls["n"] > 2:
                raise ValueError("rank 1's loss failed on purpose")
            return nn.functional.mse_loss(o, y)

    H = HessianOperator(model, loss, None, batches, reduction="mean", distributed=True)
    seed = 7 + (rank if mode == "probes" else 0)
    for _ in range(3):
        if mode == "hang" and rank == 1:
            time.sleep(10)
        if mode == "exit" and rank == 1:
            os._exit(3)
        hutchinson_trace(H, 4, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]

    def body(rank: int, world: int) -> None:
        if mode in ("equal", "hf", "second_order"):
            res = {"equal": _equal, "hf": _hf, "second_order": _second_order}[mode](rank, world)
            if rank == 0:
                torch.save(res, out)
        else:
            _fault(mode, rank, world)

    run_rank(body, timeout=4.0 if mode == "hang" else 60.0)


if __name__ == "__main__":
    main()
