"""Worker of tests/test_sharded.py: one rank of an FSDP2-sharded model, ``ShardedHessian`` products saved to a file.

Usage: ``python sharded_worker.py OUT CASE MODE`` with ``MODE`` ``products`` (exact, finite differences, the
parameters and gradients afterwards) or ``bad`` (bad inputs, each must raise ``EnergyInputError`` on every rank).
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sharded_cases as cases  # noqa: E402

from energy._validation import EnergyInputError  # noqa: E402
from energy.hessian.sharded import ShardedHessian  # noqa: E402


def shard(case: str) -> nn.Module:
    model = cases.build(case)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for unit in cases.units(case, model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def products(out: str, case: str) -> None:
    rank = dist.get_rank()
    model = shard(case)
    loss_fn, count = cases.loss_and_count(case, model)
    data = cases.rank_data(case, model, rank)
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    marker = {n: torch.full_like(p.to_local(), 3.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # a user's gradient that the products must leave alone
        p.grad = torch.distributed.tensor.DTensor.from_local(marker[n].clone(), p.device_mesh, p.placements,
                                                             shape=p.shape, stride=p.stride())
    res: dict[str, object] = {}
    fd = ShardedHessian(model, loss_fn, data, method="finite_difference", batch_size_fn=count)
    ex = ShardedHessian(model, loss_fn, data, method="exact", batch_size_fn=count)
    v = fd.shard(cases.direction(model))
    res["v"] = fd.full(v)
    res["names"] = fd.param_names
    res["exact"] = ex.full(ex.matvec(v))
    hv, err = fd.matvec_with_error(v)
    res["fd_checked"], res["fd_estimate"] = fd.full(hv), err
    res["gradient"] = fd.full(fd.gradient())
    if case == "mlp":  # the cheap model also checks: matvec = matvec_with_error's R, and exact again after FD
        res["fd"] = fd.full(fd.matvec(v))
        res["exact_again"] = ex.full(ex.matvec(v))
    res["params_unchanged"] = all(torch.equal(p.to_local(), before[n]) for n, p in model.named_parameters())
    res["grads_unchanged"] = all(torch.equal(p.grad.to_local(), marker[n]) for n, p in model.named_parameters())
    res["num_targets"] = fd.num_targets
    if rank == 0:
        torch.save(res, out)


def bad(out: str, case: str) -> None:
    rank = dist.get_rank()
    model = shard(case)
    loss_fn, count = cases.loss_and_count(case, model)
    data = cases.rank_data(case, model, rank)
    ok = ShardedHessian(model, loss_fn, data, batch_size_fn=count)
    v = ok.shard(cases.direction(model))
    attempts = {
        "not sharded": lambda: ShardedHessian(cases.build(case), loss_fn, data, batch_size_fn=count),
        "empty data on rank 1": lambda: ShardedHessian(model, loss_fn, data if rank == 0 else [],
                                                       batch_size_fn=count),
        "bad method": lambda: ShardedHessian(model, loss_fn, data, method="newton"),  # type: ignore[arg-type]
        "v wrong shape on rank 1": lambda: ok.matvec(v if rank == 0 else {n: t[:-1] for n, t in v.items()}),
        "v missing a block": lambda: ok.matvec(dict(list(v.items())[1:])),
        "full vector of wrong length": lambda: ok.shard(torch.zeros(3, dtype=torch.float64)),
        "non-finite v on rank 0": lambda: ok.matvec({n: t * float("nan") if rank == 0 else t for n, t in v.items()}),
        "model in training mode": lambda: ShardedHessian(model.train(), loss_fn, data, batch_size_fn=count),
    }
    messages = {}
    for name, call in attempts.items():
        try:
            call()
            messages[name] = None
        except EnergyInputError as exc:
            messages[name] = str(exc)
    model.eval()
    messages["still works"] = bool(torch.isfinite(ok.full(ok.matvec(v))).all())
    torch.save(messages, f"{out}.{rank}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    {"products": products, "bad": bad}[sys.argv[3]](sys.argv[1], sys.argv[2])
    dist.barrier()  # leave together, then without the interpreter's teardown of gloo's and FSDP's threads (it can
    dist.destroy_process_group()  # abort: "terminate called without an active exception"); the results are saved
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
