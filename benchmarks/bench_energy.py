"""Ratio benchmarks of the attention energy (issue: "Speed (benchmarks, not tests)").

* ``energy/fused_step_vs_nn_mha``: energy-derived multi-head attention step through the fused SDPA path
  (:func:`energy.attention.attention_step_fused`, orthogonal heads, β folded into augmented queries/keys) vs
  ``nn.MultiheadAttention`` forward (eval, ``need_weights=False``: torch's native fast path) of the same batch,
  tokens, width and heads. Target: ratio ≤ 1.1. ``ratio_without_input_checks`` times the pure core the public
  function calls after its checks (:func:`energy.core.fused.fused_step`, what step modules call).
* ``energy/energy_eval_vs_attention_forward``: ``MultiHeadAttentionEnergy.energy`` vs the same attention forward.
  Target: ratio ≤ 2.
* ``energy/closed_form_grad_vs_autograd``: ``MultiHeadAttentionEnergy.grad`` vs ``autograd_grad`` (reported).

Full size: batch 8, n 512, d 256, 4 heads (head width 64), float32, ``torch.no_grad()`` for the forward entries.
``quick``: batch 2, n 128, d 64, 4 heads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import benchmark, compare
from energy.attention import MultiHeadAttentionEnergy, attention_step_fused, head_bases
from energy.core.attention import kappa
from energy.core.fused import fused_step


def _sizes(quick: bool) -> dict[str, Any]:
    return {"batch": 2, "n": 128, "d": 64, "heads": 4} if quick else {"batch": 8, "n": 512, "d": 256, "heads": 4}


def _setup(quick: bool) -> tuple[torch.Tensor, torch.Tensor, torch.nn.MultiheadAttention, dict[str, Any]]:
    """Tokens, orthogonal heads M (h, d, d/h) and a torch MHA of the same size (float32, eval)."""
    s = _sizes(quick)
    g = torch.Generator().manual_seed(0)
    d, h = s["d"], s["heads"]
    k = d // h
    Y = torch.randn(s["batch"], s["n"], d, generator=g)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    M = torch.stack([Q[:, i * k:(i + 1) * k] for i in range(h)]).float()
    mha = torch.nn.MultiheadAttention(d, h, batch_first=True).eval()
    return Y, M, mha, s


def _mha_forward(mha: torch.nn.MultiheadAttention, Y: torch.Tensor):
    return lambda: mha(Y, Y, Y, need_weights=False)


def _context() -> dict[str, Any]:
    """Threads and machine load at measurement time (shared machines: ratios drift with the load)."""
    return {"threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0]}


def _ratio_single_thread(candidate: Callable[[], Any], baseline: Callable[[], Any], repeat: int) -> float:
    """The same ratio with one intra-op thread (no thread-pool wake-ups; reported next to the default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compare(candidate, baseline, repeat=repeat)["ratio"]
    finally:
        torch.set_num_threads(threads)


def _against_mha(candidate: Callable[[], Any], mha: torch.nn.MultiheadAttention, Y: torch.Tensor,
                 s: dict[str, Any], *, repeat: int, target: float) -> dict[str, Any]:
    """``candidate`` vs the attention forward of the same size: the ratio (default threads and one thread)."""
    baseline = _mha_forward(mha, Y)
    res = compare(candidate, baseline, repeat=repeat, target=target, dtype="float32", **s)
    res["ratio_1thread"] = _ratio_single_thread(candidate, baseline, repeat)
    res.update(_context())
    return res


@benchmark("energy/fused_step_vs_nn_mha")
def fused_step_vs_nn_mha(quick: bool) -> dict[str, Any]:
    Y, M, mha, s = _setup(quick)
    U = head_bases(M)  # value bases of the heads, computed once (as a module would cache them)
    repeat = 5 if quick else 9
    with torch.no_grad():
        res = _against_mha(lambda: attention_step_fused(Y, M, 1.0, value_basis=U), mha, Y, s, repeat=repeat,
                           target=1.1)
        k, out = kappa(None, M.shape[-1]), U.transpose(-1, -2)
        unchecked = compare(lambda: fused_step(Y, M, 1.0, k, U, out), _mha_forward(mha, Y), repeat=repeat)
        # correctness of what is timed: the fused step equals the einsum step (float32 here; float64 in the tests)
        err = float((attention_step_fused(Y, M, 1.0, value_basis=U) - MultiHeadAttentionEnergy(M).step(Y, 1.0))
                    .abs().max())
    res["ratio_without_input_checks"] = unchecked["ratio"]
    res["max_abs_diff_vs_einsum_step_float32"] = err
    return res


@benchmark("energy/energy_eval_vs_attention_forward")
def energy_eval_vs_attention_forward(quick: bool) -> dict[str, Any]:
    Y, M, mha, s = _setup(quick)
    E = MultiHeadAttentionEnergy(M)
    with torch.no_grad():
        return _against_mha(lambda: E.energy(Y), mha, Y, s, repeat=5 if quick else 9, target=2.0)


@benchmark("energy/closed_form_grad_vs_autograd")
def closed_form_grad_vs_autograd(quick: bool) -> dict[str, Any]:
    Y, M, _, s = _setup(quick)
    E = MultiHeadAttentionEnergy(M)
    res = compare(lambda: E.grad(Y), lambda: E.autograd_grad(Y), repeat=5 if quick else 7, dtype="float32", **s)
    g, ga = E.grad(Y), E.autograd_grad(Y)
    res["max_rel_diff_float32"] = float((g - ga).abs().max() / ga.abs().max())
    res.update(_context())
    return res
