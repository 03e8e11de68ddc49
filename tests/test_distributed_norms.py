"""Exact structured norms over data shards (issue #12, MATH §6.2): real processes, gloo on loopback, two ranks.

``head_block_norms`` (every block and part; causal and not; several Gram units and (K,K) tiles; uneven shards 1 + 2
and 2 + 3, and a rank without sequences), ``block_hessian`` / ``block_hessian_parts`` / ``block_loss`` (Pre- and
Post-LN, cross-entropy and square error, mean and sum), ``block_token_hessian`` (each rank's own sequences) and the
multi-head diagonals and traces equal the one-process result on the union to 1e-12 relative on *both* ranks; a
rank with bad input or other weights makes every rank stop with a message. The pure pieces (the deal of the Gram
pairs, the row-reduction hooks) are checked in one process.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from _dist import describe, outcomes, run_checked
from dist_scripts import _norms_problems as P

from energy._validation import EnergyInputError
from energy.hessian.block import block_hessian
from energy.hessian.head_norms import HEAD_BLOCKS, RowShards, gram_units, head_block_norms, head_inner_products

TOL = 1e-12


def _run(mode: str, out: Path, timeout: float = 90.0) -> list:
    return run_checked("norms_worker.py", mode, out, timeout=timeout)


def _rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0


def _head_errors(got: dict, ref: dict) -> dict[tuple[str, str], float]:
    """Relative errors per (block, part); the cross term relative to ‖H_o‖‖H_f‖ (it may vanish), exact zeros
    ((V,V), (O,O) functional parts) must be zero."""
    errs = {}
    for (block, part), want in ref.items():
        if part == "cross":
            scale = (ref[(block, "H_o")] * ref[(block, "H_f")]) ** 0.5
            errs[(block, part)] = abs(got[(block, part)] - want) / scale if scale else abs(got[(block, part)])
        else:
            errs[(block, part)] = abs(got[(block, part)] - want) / want if want else abs(got[(block, part)])
    return errs


def test_head_block_norms_equal_one_process(tmp_path):
    ranks = _run("heads", tmp_path / "r.pt")
    assert all(r.returncode == 0 for r in ranks), describe(ranks)
    ref = P.head_results(0, 1, distributed=False)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"r.pt.{rank}")
        for case, want in ref.items():
            assert set(got[case]) == set(want) and len(want) == 4 * len(HEAD_BLOCKS)
            errs = _head_errors(got[case], want)
            assert max(errs.values()) <= TOL, (rank, case, errs)
            assert got[case][("VV", "H_f")] == got[case][("OO", "H_f")] == 0.0


def test_block_hessians_and_multihead_diagonals_equal_one_process(tmp_path):
    ranks = _run("blocks", tmp_path / "r.pt")
    assert all(r.returncode == 0 for r in ranks), describe(ranks)
    ref_blocks = P.block_results(0, 1, distributed=False)
    ref_mh = P.multihead_results(0, 1, distributed=False)
    tokens = []
    for rank in (0, 1):
        got = torch.load(tmp_path / f"r.pt.{rank}")
        for case, want in ref_blocks.items():
            for key, value in want.items():
                if key == "token":
                    continue
                assert _rel(got["blocks"][case][key], value) <= TOL, (rank, case, key)
        for part in ("H", "H_o", "H_f"):
            for name, value in ref_mh[f"diag_{part}"].items():
                assert _rel(got["multihead"][f"diag_{part}"][name], value) <= TOL, (rank, part, name)
        for name, value in ref_mh["traces"].items():
            assert _rel(got["multihead"]["traces"][name], value) <= TOL, (rank, name)
        tokens.append(got["blocks"])
    for case, want in ref_blocks.items():  # token Hessians: each rank its own sequences, concatenated in rank order
        assert [t[case]["token"].shape[0] for t in tokens] == [len(P.shard(P.B_BLOCK, r, 2)) for r in (0, 1)]
        assert _rel(torch.cat([t[case]["token"] for t in tokens]), want["token"]) <= TOL, case


@pytest.mark.parametrize(
    ("mode", "rank1", "rank0"),
    [
        ("nan", "EnergyInputError `X` contains NaN", "RankFailure .*rank 1: EnergyInputError: `X` contains NaN"),
        ("block_nan", "EnergyInputError `X` contains NaN", "RankFailure .*rank 1: EnergyInputError: `X` contains"),
        ("weights", "InconsistentRanksError .*the head's weights", "InconsistentRanksError .*the head's weights"),
    ],
)
def test_a_bad_rank_stops_every_rank_with_a_message(tmp_path, mode, rank1, rank0):
    ranks = _run(mode, tmp_path / "r.pt", timeout=40)
    outcome = outcomes(ranks)
    assert all(r.returncode not in (0, None) for r in ranks), describe(ranks)
    assert re.match(rank0, outcome[0]), describe(ranks)
    assert re.match(rank1, outcome[1]), describe(ranks)


# -- one process: the pure pieces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 2, 5, 18, 37])
@pytest.mark.parametrize(("chunk", "world"), [(4, 1), (100, 1), (4, 2), (100, 2), (3, 3), (7, 4)])
def test_gram_units_cover_every_pair_once_and_balance(N, chunk, world):
    count = torch.zeros(N, N, dtype=torch.int64)
    loads, biggest = [], 0
    for rank in range(world):
        load = 0
        for i0, i1, j0, j1 in gram_units(N, chunk, rank, world):
            assert j0 == i0 or j0 >= i1
            once = max(0, min(j1, i1) - j0)
            for i in range(i0, i1):
                for j in range(j0, j1):
                    weight = 1 if j - j0 < once else 2
                    count[i, j] += 1 if weight == 1 else 0
                    if weight == 2:  # a mirrored pair: (i, j) and (j, i)
                        count[i, j] += 1
                        count[j, i] += 1
            load += (i1 - i0) * (j1 - j0)
            biggest = max(biggest, (i1 - i0) * (j1 - j0))
        loads.append(load)
    assert bool((count == 1).all()), count
    if world > 1:  # longest-first greedy: the loads differ by at most the largest unit
        assert max(loads) - min(loads) <= biggest, loads


def test_simulated_shards_of_the_gram_route_add_up():
    """The ranks' shares of the (Q,Q) pairs, each on all rows (gather = identity), add up to one process."""
    p = P.head_problem(3, True)
    args = (p["X"], p["W_Q"], p["W_K"], p["W_V"], p["W_O"], p["G"])
    opts = {"c": p["c"], "kappa": 0.6, "causal": True, "blocks": ["QQ"], "chunk": 5}
    whole = torch.stack(head_inner_products(*args, **opts)["QQ"])
    for world in (2, 3):
        shares = [torch.stack(head_inner_products(*args, **opts, row_shards=RowShards(rank=r, world_size=world))
                              ["QQ"]) for r in range(world)]
        assert _rel(sum(shares), whole) <= TOL


def test_rows_without_sequences_give_zero_norms():
    p = P.head_problem(1, False)
    norms = head_block_norms(p["X"][:0], p["W_Q"], p["W_K"], p["W_V"], p["W_O"], p["G"][:0], c=p["c"], tile=3)
    assert set(norms.values()) == {0.0}


def test_distributed_needs_a_process_group():
    p = P.head_problem(1, False)
    with pytest.raises(EnergyInputError, match="initialised torch.distributed process group"):
        head_block_norms(p["X"], p["W_Q"], p["W_K"], p["W_V"], p["W_O"], p["G"], c=p["c"], distributed=True)
    block, X, T = P.block_problem("pre", "ce", "mean")
    with pytest.raises(EnergyInputError, match="initialised torch.distributed process group"):
        block_hessian(block, X, T, distributed=True)


def test_global_sequence_count_sets_the_mean_constant():
    """``c_eff`` of a mean over sequences with the count of all ranks: rank sums are the union's terms."""
    block, X, T = P.block_problem("pre", "mse", "mean")
    whole = block_hessian(block, X, T).matrix
    parts = [block_hessian(dataclasses.replace(block, c=block.loss_constant(X[i:i + 1], X.shape[0]), reduction="sum"),
                           X[i:i + 1], T[i:i + 1]).matrix for i in range(3)]
    assert _rel(sum(parts), whole) <= TOL
