"""Unroller benchmarks (ratios measured in the same run, see :mod:`benchmarks`).

* ``unfold/trace_vs_plain_forward`` — forward of the Yang et al. model with the full trace (every state and every
  energy term at every state) vs the plain forward of the same model, without autograd. Target ratio ≤ 1.5.
* ``unfold/trace_states_only_vs_plain_forward`` — the same with ``energies=False`` (states recorded, energies
  deferred to :meth:`unfold.unroller.Unrolled.trace_energies`): the cost of the tracing machinery itself.
* ``unfold/train_step_vs_transformer_encoder`` — one training step (forward, cross-entropy, backward, Adam step) of
  the unfolded model vs a stack of ``nn.TransformerEncoderLayer`` (unfold.standard.standard_encoder) of the same
  width, depth and heads, same batch. Target ratio ≤ 1.3.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import benchmark, compare
from unfold.presets import parameter_count, yang2022
from unfold.standard import standard_encoder


def _with_single_thread(res: dict[str, Any], candidate: Callable[[], Any], baseline: Callable[[], Any],
                        repeat: int, no_grad: bool) -> dict[str, Any]:
    """Add the machine load and the same ratio measured with one intra-op thread (less noisy on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = compare(candidate, baseline, repeat=repeat, no_grad=no_grad)
    finally:
        torch.set_num_threads(threads)
    res.update(threads=threads, load_average_1min=os.getloadavg()[0], ratio_1thread=single["ratio"],
               candidate_median_1thread_s=single["candidate_median_s"],
               baseline_median_1thread_s=single["baseline_median_s"])
    return res


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"d": 32, "depth": 4, "batch": 8, "n": 16, "repeat": 5}
    return {"d": 64, "depth": 12, "batch": 32, "n": 32, "repeat": 15}


@benchmark("unfold/trace_vs_plain_forward")
def trace_vs_plain(quick: bool) -> dict[str, Any]:
    s = _sizes(quick)
    torch.manual_seed(0)
    model = yang2022(s["d"], s["depth"]).eval()
    Y = torch.randn(s["batch"], s["n"], s["d"])
    _, info = model(Y, trace=True)
    n_states = len(info["states"])
    cand, base = (lambda: model(Y, trace=True)), (lambda: model(Y))
    res = compare(cand, base, repeat=s["repeat"], target=1.5, no_grad=True, sizes=s, states=n_states,
                  energy_terms=len(info["energies"]) - 1)
    return _with_single_thread(res, cand, base, s["repeat"], True)


@benchmark("unfold/trace_states_only_vs_plain_forward")
def trace_states_only(quick: bool) -> dict[str, Any]:
    s = _sizes(quick)
    torch.manual_seed(0)
    model = yang2022(s["d"], s["depth"]).eval()
    Y = torch.randn(s["batch"], s["n"], s["d"])
    cand, base = (lambda: model(Y, trace=True, energies=False)), (lambda: model(Y))
    res = compare(cand, base, repeat=s["repeat"], target=1.5, no_grad=True, sizes=s)
    return _with_single_thread(res, cand, base, s["repeat"], True)


@benchmark("unfold/train_step_vs_transformer_encoder")
def train_step(quick: bool) -> dict[str, Any]:
    s = _sizes(quick)
    depth = min(s["depth"], 6)
    classes = 10
    torch.manual_seed(0)
    unfolded = yang2022(s["d"], depth, n_classes=classes)
    standard = standard_encoder(s["d"], depth, 1, classes)
    X = torch.randn(s["batch"], s["n"], s["d"])
    y = torch.randint(0, classes, (s["batch"],))
    opt_u = torch.optim.Adam(unfolded.parameters(), lr=1e-3)
    opt_s = torch.optim.Adam(standard.parameters(), lr=1e-3)

    def step(model, opt):
        def run():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(X), y).backward()
            opt.step()
        return run

    cand, base = step(unfolded, opt_u), step(standard, opt_s)
    res = compare(cand, base, repeat=s["repeat"], target=1.3, sizes={**s, "depth": depth, "heads": 1},
                  parameters={"unfolded": parameter_count(unfolded), "standard": parameter_count(standard)})
    return _with_single_thread(res, cand, base, s["repeat"], False)
