"""Models and per-rank data of the sharded-HVP tests, built the same way in the workers and in the pytest process.

``case`` is ``"mlp"`` (an ``nn.Sequential`` MLP, MSE) or ``"gpt"`` (the ``gpt2-tiny`` preset through
``LogitsModel``, shifted cross-entropy). Rank ``r`` gets ``r + 1`` batches of unequal sizes (uneven shards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from energy.hessian import hf


def build(case: str, width: int = 16, positions: int = 16) -> nn.Module:
    """The unsharded model of ``case`` (float64, seeded); ``width`` and ``positions`` of the GPT-2 case."""
    if case == "gpt":
        return hf.LogitsModel(hf.build_model("gpt2-tiny", n_embd=width, n_positions=positions))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3),
                             nn.Dropout(0.1)).double().eval()  # dropout: inactive in eval mode, refused in train mode


def loss_and_count(case: str, model: nn.Module) -> tuple[nn.Module, Callable[[Any], int]]:
    """The loss and the per-batch target count of ``case``."""
    if case == "gpt":
        task = hf.task_of(model)
        return hf.loss_for(task), hf.count_targets(task)
    return nn.MSELoss(), lambda X: int(X.shape[0])


def rank_data(case: str, model: nn.Module, rank: int, seq_len: int = 5) -> list[tuple[Any, Tensor]]:
    """Rank ``rank``'s batches: ``rank + 1`` of them, sizes ``2 + rank + b``."""
    out: list[tuple[Any, Tensor]] = []
    for b in range(rank + 1):
        size, seed = 2 + rank + b, 100 * rank + b
        if case == "gpt":
            out += hf.synthetic_batches(model.hf, batch=size, seq_len=seq_len, seed=seed)  # type: ignore[union-attr]
        else:
            g = torch.Generator().manual_seed(seed)
            out.append((torch.randn(size, 5, generator=g, dtype=torch.float64),
                        torch.randn(size, 3, generator=g, dtype=torch.float64)))
    return out


def units(case: str, model: nn.Module) -> list[nn.Module]:
    """The sub-modules sharded as their own FSDP units (the root is sharded last)."""
    if case == "gpt":
        return list(model.hf.transformer.h)  # type: ignore[union-attr]
    return [model[0], model[2]]


def direction(model: nn.Module, seed: int = 7) -> Tensor:
    """A seeded full flat vector over ``model.named_parameters()`` (the same on every rank)."""
    n = sum(p.numel() for p in model.parameters())
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
