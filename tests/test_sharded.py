"""Hessian-vector products of FSDP2-sharded models (energy.hessian.sharded, MATH §6.x).

The multi-process tests start 2 real ranks (gloo, loopback, tests/_dist.py) running
tests/dist_scripts/sharded_worker.py; the reference is the single-process exact ``HessianOperator`` on the unsharded
model with the union of every rank's data, computed here.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from energy._validation import EnergyInputError
from energy.hessian.curvature_operators import HessianOperator
from energy.hessian.sharded import (
    ShardedHessian,
    central_difference,
    fd_error_estimate,
    fd_error_model,
    fd_step,
    llama_activation_elements_per_token,
    llama_parameter_count,
    memory_model,
    richardson,
    saved_activation_bytes,
)
from tests._dist import SCRIPTS, describe, run_ranks

sys.path.insert(0, str(SCRIPTS))
import sharded_cases as cases  # noqa: E402

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _reference(case: str, names: tuple[str, ...], v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process exact ``Hv`` and gradient on the union of both ranks' data."""
    model = cases.build(case)
    loss_fn, count = cases.loss_and_count(case, model)
    data = [b for r in range(2) for b in cases.rank_data(case, model, r)]
    op = HessianOperator(model, loss_fn, list(names), data, reduction="mean", batch_size_fn=count)
    params = dict(model.named_parameters())

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        total = sum(count(X) for X, _ in data)
        return sum((count(X) / total * loss_fn(torch.func.functional_call(model, p, (X,)), y) for X, y in data),
                   torch.zeros((), dtype=torch.float64))

    g = torch.func.grad(loss)({n: params[n].detach() for n in names})
    return op @ v, torch.cat([g[n].reshape(-1) for n in names])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", ["mlp", "gpt"])
def test_sharded_hvp_equals_single_process(case: str, tmp_path: Path) -> None:
    out = tmp_path / "res.pt"
    ranks = run_ranks("sharded_worker.py", 2, [str(out), case, "products"], timeout=60)
    assert all(r.returncode == 0 for r in ranks), describe(ranks)
    res = torch.load(out)
    ref, grad = _reference(case, res["names"], res["v"])
    errors = {k: _rel(res[k], ref) for k in ("exact", "fd_checked")}
    print(f"{case}: relative errors {errors}, FD estimate {res['fd_estimate'] / float(ref.norm()):.2e}")
    assert errors["exact"] <= 1e-12, errors
    if case == "mlp":
        assert torch.equal(res["exact_again"], res["exact"])  # FSDP's state is restored after the exact product
        assert torch.equal(res["fd"], res["fd_checked"])  # matvec and matvec_with_error return the same R(ε, ε/2)
    # the a-posteriori estimate bounds the measured error, and is itself ≲ 1e-8 relative in float64
    assert errors["fd_checked"] * float(ref.norm()) <= res["fd_estimate"], (errors, res["fd_estimate"])
    assert res["fd_estimate"] <= 1e-8 * float(ref.norm())
    assert _rel(res["gradient"], grad) <= 1e-12
    # uneven shards: rank 0 holds 1 batch, rank 1 two of other sizes; the global count is the union's
    model = cases.build(case)
    _, count = cases.loss_and_count(case, model)
    assert res["num_targets"] == sum(count(X) for r in range(2) for X, _ in cases.rank_data(case, model, r))
    assert res["params_unchanged"] and res["grads_unchanged"]


def test_bad_inputs_raise_on_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "bad.pt"
    ranks = run_ranks("sharded_worker.py", 2, [str(out), "mlp", "bad"], timeout=60)
    assert all(r.returncode == 0 for r in ranks), describe(ranks)  # no hang, no crash: every rank got the error
    expected = {"not sharded": "fully_shard", "empty data on rank 1": "rank 1: `data` holds no batch",
                "bad method": "`method` must be", "v wrong shape on rank 1": "rank 1: `v['0.weight']`",
                "v missing a block": "`v` must map every parameter", "full vector of wrong length": "shape (111,)",
                "non-finite v on rank 0": "rank 0: `v['0.weight']` must be this rank's local shard, a finite",
                "model in training mode": "call `model.eval()`"}
    for r in range(2):
        messages = torch.load(f"{out}.{r}")
        for name, fragment in expected.items():
            assert messages[name] is not None and fragment in messages[name], (r, name, messages[name])
        assert messages["still works"] is True


def test_needs_an_initialised_process_group() -> None:
    assert not torch.distributed.is_initialized()
    model = cases.build("mlp")
    with pytest.raises(EnergyInputError, match="init_process_group"):
        ShardedHessian(model, nn.MSELoss(), cases.rank_data("mlp", model, 0))


@pytest.mark.parametrize("seed", [0, 1])
def test_central_difference_and_richardson_orders(seed: int) -> None:
    """Along a line through an analytic function the errors fall as ε² (central) and ε⁴ (Richardson)."""
    g = torch.Generator().manual_seed(seed)
    theta, v = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    grad = torch.cos  # ∇ Σ sin θ
    hv = -torch.sin(theta) * v
    steps = [0.2, 0.1, 0.05]

    def d(e: float) -> torch.Tensor:
        return central_difference(grad(theta + e * v), grad(theta - e * v), e)

    central = [float((d(e) - hv).norm()) for e in steps]
    extrapolated = [float((richardson(d(e), d(e / 2)) - hv).norm()) for e in steps]
    slope = [math.log(central[i] / central[i + 1]) / math.log(2) for i in range(2)]
    slope_r = [math.log(extrapolated[i] / extrapolated[i + 1]) / math.log(2) for i in range(2)]
    assert all(abs(s - 2) < 0.1 for s in slope), slope
    assert all(abs(s - 4) < 0.2 for s in slope_r), slope_r
    # where truncation dominates and O(ε⁶) is small, the a-posteriori bound holds and is tight (round-off negligible)
    u = float(torch.finfo(torch.float64).eps)
    for e in (0.05, 0.025):
        r1, r2 = richardson(d(e), d(e / 2)), richardson(d(e / 2), d(e / 4))
        bound = fd_error_estimate(float((r1 - r2).norm()), u * float(grad(theta).norm()), e)
        assert float((r1 - hv).norm()) <= bound <= 1.2 * float((r1 - hv).norm())


def test_default_step_minimises_the_error_model() -> None:
    u = float(torch.finfo(torch.float64).eps)
    eps = fd_step(torch.float64)
    grid = [eps * 2 ** (k / 8) for k in range(-16, 17)]
    best = min(grid, key=lambda e: fd_error_model(e, u, 1.0))
    assert best == eps
    assert fd_error_model(eps, u, 1.0) < 1e-12  # the float64 error floor the README quotes
    assert fd_step(torch.float32) > 1e-2  # single precision: a step of ~1/40 and an error ~1e-5


def test_parameter_count_is_the_transformers_llama() -> None:
    transformers = pytest.importorskip("transformers")
    shapes = [dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=50),
              dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, vocab_size=32000)]
    for kw in shapes:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, tie_word_embeddings=False))
        counted = sum(p.numel() for p in model.parameters())
        assert llama_parameter_count(kw["hidden_size"], kw["num_hidden_layers"], kw["intermediate_size"],
                                     kw["vocab_size"], heads=kw["num_attention_heads"],
                                     kv_heads=kw["num_key_value_heads"]) == counted


def test_memory_model_scaling() -> None:
    p, unit = llama_parameter_count(4096, 32, 11008, 32000, heads=32), 4 * 4096**2 + 3 * 4096 * 11008
    acts = llama_activation_elements_per_token(4096, 32, 11008, 32, 32000, 4096, eager_attention=False)
    kw = dict(bytes_per_element=4, activation_elements_per_token=acts, tokens_per_rank=4096,
              double_backward_factor=2.0)
    fd1, fd8 = (memory_model(p, unit, ranks=n, method="finite_difference", **kw) for n in (1, 8))
    ex1, ex8 = (memory_model(p, unit, ranks=n, method="exact", **kw) for n in (1, 8))
    assert fd1.parameters == p * 4 and fd8.parameters == math.ceil(p / 8) * 4
    assert fd8.hvp_state == 5 * fd8.parameters and fd8.gradients == fd8.parameters
    assert ex8.unsharded_parameters == p * 4 and ex8.hvp_state == 3 * p * 4  # not reduced by sharding
    assert ex1.activations == 2 * fd1.activations == 2 * acts * 4096 * 4
    assert fd8.total < ex8.total and fd8.total == sum(
        (fd8.parameters, fd8.gradients, fd8.hvp_state, fd8.unsharded_parameters, fd8.activations))


def test_saved_activation_bytes_counts_the_saved_tensors() -> None:
    model, loss = cases.build("mlp"), nn.MSELoss()
    X, y = cases.rank_data("mlp", model, 0)[0]
    n = X.shape[0]
    # Linear saves its input (X, tanh outputs), tanh its output (= the next input), MSE its input and target
    expected = 8 * n * (5 + 7 + 6 + 3 + 3)
    assert saved_activation_bytes(model, loss, X, y, create_graph=False) == expected
    assert saved_activation_bytes(model, loss, X, y, create_graph=True) > expected
