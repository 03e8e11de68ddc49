"""Data-parallel curvature (issue #12, MATH §6.1): real processes, gloo on loopback, two ranks.

Every product, gradient, loss and estimate computed with the data split over two ranks (uneven shards: 7 and 8
samples in 2 and 3 batches; one and two GPT-2 batches) equals the one-process result on the union of the data to
1e-12 relative, on every quantity the operators expose; and every fault makes every rank stop with a message
within a bounded time (the harness kills a run that hangs and fails the test).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _dist import describe, outcomes, run_checked
from dist_scripts import _problems as P

from energy._validation import EnergyInputError
from energy.hessian.curvature_operators import HessianOperator
from energy.hessian.distributed import (
    InconsistentRanksError,
    ShardGroup,
    all_reduce_sum,
    parameter_checksum,
    resolve_shards,
    shard_batches,
)

TOL = 1e-12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _run(mode: str, out: Path, timeout: float = 90.0) -> list:
    return run_checked("dp_worker.py", mode, out, timeout=timeout)


def _compare(dist_res: dict, ref: dict) -> dict[str, float]:
    errs = {}
    for key, want in ref.items():
        if isinstance(want, torch.Tensor) or isinstance(want, float):
            errs[key] = _rel(dist_res[key], want)
    return errs


def test_products_and_estimates_equal_one_process(tmp_path):
    ranks = _run("equal", tmp_path / "r.pt")
    assert all(r.returncode == 0 for r in ranks), describe(ranks)
    got = torch.load(tmp_path / "r.pt")
    ref = P.mlp_results(list(range(len(P.SIZES))), P.token_states()[0])
    assert got["num_data"] == ref["num_data"] == sum(P.SIZES)
    rows = got.pop("jacobian_V_rows")
    assert _rel(rows, ref.pop("jacobian_V_rows")[: rows.shape[0]]) <= TOL  # J V: rank 0's rows of the union's
    errs = _compare(got, ref)
    assert set(errs) >= {"products_H", "products_H_o", "products_H_f", "ggn", "gradient", "loss", "block",
                         "offblock", "hutchinson", "diagonal", "hutchpp", "lanczos", "slq_nodes", "slq_weights",
                         "jacobian_T", "token", "token_lanczos"}
    assert max(errs.values()) <= TOL, errs
    assert got["jacobian_rows"] == 3 * sum(P.SIZES[:2])  # rank 0's outputs: the rows are sharded with the data


def test_hugging_face_block_curvature_equals_one_process(tmp_path):
    from dist_scripts._hf_problem import hf_results

    ranks = _run("hf", tmp_path / "r.pt", timeout=150)
    assert all(r.returncode == 0 for r in ranks), describe(ranks)
    got = torch.load(tmp_path / "r.pt")
    errs = _compare(got, hf_results(0, 1))
    assert len(errs) == 17 and max(errs.values()) <= TOL, errs


def test_second_derivative_through_the_reduced_gradient(tmp_path):
    """``∇_θ‖∇L‖² = 2 H ∇L`` on two ranks: backprop through ``all_reduce_sum`` (identity backward), then a sum."""
    ranks = _run("second_order", tmp_path / "r.pt")
    assert all(r.returncode == 0 for r in ranks), describe(ranks)
    got = torch.load(tmp_path / "r.pt")
    H = HessianOperator(P.mlp(), torch.nn.MSELoss(), None, P.mlp_batches())
    g = H.gradient()
    assert _rel(got["gradient"], g) <= TOL
    assert _rel(got["grad_norm_grad"], 2.0 * (H @ g)) <= TOL


@pytest.mark.parametrize(
    ("mode", "rank1", "rank0"),
    [
        ("raise", "ValueError rank 1's loss failed", "RankFailure .*rank 1: ValueError: rank 1's loss failed"),
        ("setup", "EnergyInputError `data` batch 0", "RankFailure .*rank 1: EnergyInputError: `data` batch 0"),
        ("weights", "InconsistentRanksError .*different weights", "InconsistentRanksError .*different weights"),
        ("probes", "InconsistentRanksError .*different vectors", "InconsistentRanksError .*different vectors"),
        ("exit", None, "RankFailure .*another rank stopped"),
        ("hang", "RankFailure", "RankFailure .*did not answer within the process group's timeout"),
    ],
)
def test_faults_stop_every_rank_with_a_message(tmp_path, mode, rank1, rank0):
    ranks = _run(mode, tmp_path / "r.pt", timeout=60)
    outcome = outcomes([r for r in ranks if mode != "exit" or r.rank == 0])
    assert all(r.returncode not in (0, None) for r in ranks), describe(ranks)
    assert re.match(rank0, outcome[0]), describe(ranks)
    if rank1 is not None:
        assert re.match(rank1, outcome[1]), describe(ranks)
    if mode == "hang":  # rank 0 gives up after the 4 s collective timeout, not after rank 1's 10 s sleep
        seconds = float(re.search(r"^SECONDS 0 (\S+)$", ranks[0].stdout, re.M).group(1))
        assert seconds < 9.0, describe(ranks)


def test_shard_batches_is_a_contiguous_partition():
    items = list(range(7))
    for world in (1, 2, 3, 5, 9):
        shards = [shard_batches(items, r, world) for r in range(world)]
        assert sum(shards, []) == items
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_single_process_edges():
    """Without an initialised process group: a clear error; ``False`` is one process."""
    assert resolve_shards(False) is None and resolve_shards(None) is None
    with pytest.raises(EnergyInputError, match="initialised torch.distributed process group"):
        resolve_shards(True)
    with pytest.raises(EnergyInputError, match="`distributed` must be True, False or"):
        resolve_shards("yes")
    with pytest.raises(EnergyInputError, match="initialised"):
        HessianOperator(P.mlp(), torch.nn.MSELoss(), None, P.mlp_batches(), distributed=True)
    assert issubclass(InconsistentRanksError, EnergyInputError)
    assert ShardGroup() == ShardGroup()


def test_parameter_checksum_sees_one_ulp():
    a, b = P.mlp(), P.mlp()
    assert parameter_checksum(a) == parameter_checksum(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] = torch.nextafter(next(b.parameters()).view(-1)[0], torch.tensor(2.0,
                                                                                                          dtype=P.DT))
    assert parameter_checksum(a) != parameter_checksum(b)


def test_all_reduce_sum_needs_a_group():
    with pytest.raises(EnergyInputError, match="all_reduce_sum needs an initialised torch.distributed process group"):
        all_reduce_sum(torch.ones(2))
