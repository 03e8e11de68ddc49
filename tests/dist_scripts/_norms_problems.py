"""The exact-norm problems the distributed tests solve twice: sharded over ranks (norms_worker.py) and in one
process (tests/test_distributed_norms.py). Seeded, CPU, float64: every rank and the reference see the same weights
and the same union of sequences; ``shard`` gives each rank its contiguous share (uneven: 3 sequences → 1 + 2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from energy.hessian.block import (
    TransformerBlock,
    block_hessian,
    block_hessian_parts,
    block_loss,
    block_token_hessian,
    random_block,
)
from energy.hessian.distributed import shard_batches
from energy.hessian.head_norms import head_block_norms, head_output
from energy.hessian.multihead import MultiHeadAttentionLayer
from energy.hessian.multihead_structure import multihead_block_diagonals, multihead_block_traces

DT = torch.float64
#: Head shapes of the issue: d 7, k 3, d_v 4, d_out 5, L 6; B sequences per case.
D, K, DV, DO, L = 7, 3, 4, 5, 6
#: (name, B, causal, chunk, tile): chunk/tile small enough for several Gram units and (K,K) tiles; ``empty``
#: gives rank 0 no sequence (B = 1 over 2 ranks).
HEAD_CASES = [("plain", 3, False, 2048, 64), ("causal", 3, True, 2048, 64), ("chunked", 3, True, 4, 3),
              ("several", 5, False, 7, 2), ("empty", 1, True, 2048, 64)]
#: (name, norm, loss, reduction): Pre-LN cross-entropy and square error, mean and sum over sequences.
BLOCK_CASES = [("pre_ce_mean", "pre", "ce", "mean"), ("pre_mse_sum", "pre", "mse", "sum"),
               ("pre_mse_mean", "pre", "mse", "mean"), ("post_ce_mean", "post", "ce", "mean")]
B_BLOCK = 3


def shard(n: int, rank: int, world: int) -> list[int]:
    """The sequence indices of rank ``rank`` (contiguous, sizes differ by at most one)."""
    return shard_batches(list(range(n)), rank, world)


def head_problem(B: int, causal: bool, seed: int = 0) -> dict[str, Any]:
    """One head's weights, the union of ``B`` sequences and the whole layer's residual ``G = 2c(F − Y)``, with
    ``c`` the constant of a mean over all ``B`` sequences (``1/(B L d_out)``): every rank passes its rows of ``G``.
    """
    g = torch.Generator().manual_seed(seed)
    p: dict[str, Any] = {"X": 0.9 * torch.randn(B, L, D, generator=g, dtype=DT),
                         "W_Q": torch.randn(D, K, generator=g, dtype=DT),
                         "W_K": torch.randn(D, K, generator=g, dtype=DT),
                         "W_V": torch.randn(D, DV, generator=g, dtype=DT),
                         "W_O": torch.randn(DV, DO, generator=g, dtype=DT)}
    F_rest = torch.randn(B, L, DO, generator=g, dtype=DT)
    Y = torch.randn(B, L, DO, generator=g, dtype=DT)
    c = 1.0 / (B * L * DO)
    F = head_output(p["X"], p["W_Q"], p["W_K"], p["W_V"], p["W_O"], 1.0 / math.sqrt(K), causal)
    p["G"], p["c"] = 2.0 * c * (F + F_rest - Y), c
    return p


def head_results(rank: int, world: int, *, distributed: bool) -> dict[str, dict]:
    """``{case: head_block_norms(..., squared=True)}`` on this rank's sequences (or all, ``world = 1``)."""
    out = {}
    for name, B, causal, chunk, tile in HEAD_CASES:
        p = head_problem(B, causal)
        idx = shard(B, rank, world)
        out[name] = head_block_norms(p["X"][idx], p["W_Q"], p["W_K"], p["W_V"], p["W_O"], p["G"][idx], c=p["c"],
                                     causal=causal, chunk=chunk, tile=tile, squared=True, distributed=distributed)
    return out


def block_problem(norm: str, loss: str, reduction: str) -> tuple[TransformerBlock, Tensor, Tensor]:
    """A two-head block (d 4, head width 3, FFN 5, vocabulary 6), ``B_BLOCK`` sequences of 4 tokens, targets."""
    g = torch.Generator().manual_seed(1)
    block = random_block(d=4, n_heads=2, d_head=3, d_ff=5, norm=norm, vocab=6, loss=loss,  # type: ignore[arg-type]
                         generator=g)
    block = dataclasses.replace(block, reduction=reduction)  # type: ignore[arg-type]
    X = torch.randn(B_BLOCK, 4, 4, generator=g, dtype=DT)
    T = torch.randint(0, 6, (B_BLOCK, 4), generator=g) if loss == "ce" else torch.randn(B_BLOCK, 4, 6, generator=g,
                                                                                       dtype=DT)
    return block, X, T


def block_results(rank: int, world: int, *, distributed: bool) -> dict[str, dict[str, Tensor]]:
    """Every sharded quantity of the block cases on this rank's sequences (or all)."""
    out: dict[str, dict[str, Tensor]] = {}
    for name, norm, loss, reduction in BLOCK_CASES:
        block, X, T = block_problem(norm, loss, reduction)
        idx = shard(B_BLOCK, rank, world)
        res = {f"parts_{k}": v.matrix for k, v in block_hessian_parts(block, X[idx], T[idx],
                                                                      distributed=distributed).items()}
        res["H"] = block_hessian(block, X[idx], T[idx], distributed=distributed).matrix
        res["H_f"] = block_hessian(block, X[idx], T[idx], part="H_f", distributed=distributed).matrix
        res["loss"] = block_loss(block, X[idx], T[idx], distributed=distributed)
        res["token"] = block_token_hessian(block, X[idx], T[idx], distributed=distributed)
        out[name] = res
    return out


def multihead_problem() -> tuple[MultiHeadAttentionLayer, Tensor, Tensor]:
    """A grouped-query layer (4 query heads, 2 key/value heads; a shared ``K_g``/``V_g``), mean over 3 sequences."""
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    layer = MultiHeadAttentionLayer(r(4, 5, 2), r(2, 5, 2), r(2, 5, 3), r(4, 3, 4), causal=True, reduction="mean")
    return layer, r(3, 4, 5), r(3, 4, 4)


def multihead_results(rank: int, world: int, *, distributed: bool) -> dict[str, Any]:
    layer, X, Y = multihead_problem()
    idx = shard(X.shape[0], rank, world)
    out: dict[str, Any] = {}
    for part in ("H", "H_o", "H_f"):
        out[f"diag_{part}"] = multihead_block_diagonals(layer, X[idx], Y[idx], part, distributed=distributed)  # type: ignore[arg-type]
    out["traces"] = multihead_block_traces(layer, X[idx], Y[idx], distributed=distributed)
    return out
