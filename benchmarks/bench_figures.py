"""Figure-level benchmark (issue 5, "Speed"): one σ-step of ``ormaniec2024-growth-single`` against curvlinops.

* ``figures/growth_single_step_vs_curvlinops`` -- one step of the σ sweep of MATH §3.7 as the figure runs it
  (:mod:`paper_figs.ormaniec2024`): the Hutchinson norms ``‖H‖_F, ‖GGN‖_F, ‖H − GGN‖_F`` of the ``W_V`` and the
  ``W_Q`` block of a one-layer GPT-2-style model (width 128, ``d_mlp`` 512, batch 64, 20 Rademacher probes, float64)
  at ``σ = 0.1``. Candidate: the figure's route -- :class:`paper_figs.ormaniec2024.ScoredPositions` (only what the
  loss reads is computed) with one shared ``products(Z, ("H", "G", "F"))`` pass per block. Baseline: curvlinops
  3.0.1 on the plain :class:`unfold.standard.GPT2Decoder` -- ``HessianLinearOperator`` and ``GGNLinearOperator``
  each applied once to the 20-column probe matrix (the cheapest way to use it), ``H − GGN`` from the two products,
  the *same* probes. The estimates agree to round-off (reported). The full protocol has 20 σ × 20 initialisations
  of this step; ``protocol_estimate_*_s`` multiplies the step medians by 400 (initialisation and model set-up are
  negligible next to the products).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from benchmarks import benchmark, compare
from energy.hessian.estimators import draw_probes
from paper_figs.ormaniec2024 import DTYPE, ScoredPositions, addition_data, gpt2_model
from unfold.data import addition_loss
from unfold.standard import GPT2Config


class _AdditionLoss(nn.Module):
    """``unfold.data.addition_loss`` as a module with the ``reduction`` attribute curvlinops reads."""

    reduction = "mean"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return addition_loss(logits, targets)


def _norms(HZ: torch.Tensor, GZ: torch.Tensor, FZ: torch.Tensor) -> dict[str, float]:
    sq = lambda M: math.sqrt(float((M**2).sum(dim=0).mean()))
    return {"H": sq(HZ), "GGN": sq(GZ), "H-GGN": sq(FZ)}


@benchmark("figures/growth_single_step_vs_curvlinops")
def bench_growth_single_step(quick: bool) -> dict[str, Any]:
    import curvlinops  # the baseline; installed in the dev environment

    from energy.hessian.operators import HessianOperator

    width, batch, num_samples = (32, 16, 20) if quick else (128, 64, 20)
    model = gpt2_model(GPT2Config(d_model=width, n_layers=1, d_mlp=4 * width), 0)
    model.set_embedding_scale(0.1, torch.Generator().manual_seed(1))
    fast = ScoredPositions(model)
    data = [addition_data(batch, 1)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(2)
    blocks = {"W_V": "blocks.0.attn.W_V", "W_Q": "blocks.0.attn.W_Q"}
    ours_ops = {k: HessianOperator(fast, addition_loss, ["model." + n], data, reduction="mean")
                for k, n in blocks.items()}
    theirs_ops = {
        k: (curvlinops.HessianLinearOperator(model, _AdditionLoss(), [named[n]], data, check_deterministic=False),
            curvlinops.GGNLinearOperator(model, _AdditionLoss(), [named[n]], data, check_deterministic=False))
        for k, n in blocks.items()
    }
    probes = {k: draw_probes(named[n].numel(), num_samples, generator=g, dtype=DTYPE) for k, n in blocks.items()}

    def ours() -> dict[str, dict[str, float]]:
        out = {}
        for k, op in ours_ops.items():
            P = op.products(probes[k], ("H", "H_o", "H_f"))
            out[k] = _norms(P["H"], P["H_o"], P["H_f"])
        return out

    def theirs() -> dict[str, dict[str, float]]:
        out = {}
        for k, (H, G) in theirs_ops.items():
            HZ, GZ = H @ probes[k], G @ probes[k]
            out[k] = _norms(HZ, GZ, HZ - GZ)
        return out

    res = compare(ours, theirs, repeat=3 if quick else 5, warmup=1, target=2.0, target_kind=">=")
    a, b = ours(), theirs()
    reldiff = max(abs(a[k][p] - b[k][p]) / max(b[k]["H"], 1e-300) for k in a for p in a[k])
    return {
        **res,
        "what": "one σ-step of growth-single (W_V and W_Q blocks; H, GGN, H−GGN norms; same probes), float64",
        "width": width,
        "batch": batch,
        "num_samples": num_samples,
        "max_reldiff_ours_vs_curvlinops": reldiff,
        "norms_ours": a,
        "protocol_estimate_ours_s": 400 * res["candidate_median_s"],
        "protocol_estimate_curvlinops_s": 400 * res["baseline_median_s"],
        "threads": torch.get_num_threads(),
    }
