"""The Hugging Face problem of the distributed tests: a seeded tiny GPT-2, three batches (one rank gets one, the
other two), block norms, traces, top eigenvalues and SLQ densities through :class:`BlockCurvature`."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from energy.hessian import hf
from energy.hessian.distributed import shard_batches
from energy.hessian.hf_blocks import BlockCurvature

#: A per-head block (68 entries: exact norms from columns) and the attention's fused Q (272: estimated, Lanczos).
BLOCKS = ("layer0.head1.Q", "layer1.attn.Q")


def hf_results(rank: int, world: int) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.build_model("gpt2-tiny", seed=0)
        data = hf.synthetic_batches(model, batch=2, seq_len=5, num_batches=3, seed=0)
        bc = BlockCurvature(model, shard_batches(data, rank, world), exact_max=100, distributed=world > 1)
        out: dict[str, Any] = {}
        for name in BLOCKS:
            for part in ("H", "H_o"):
                gen = torch.Generator().manual_seed(11)
                out[f"{name}/{part}/frobenius"] = bc.frobenius(name, part=part, num_matvecs=12, generator=gen).value
                out[f"{name}/{part}/trace"] = bc.trace(name, part=part, num_matvecs=12, generator=gen).value
                out[f"{name}/{part}/top"] = bc.top_eigenvalues(name, part=part, k=2, generator=gen).eigenvalues
                dens = bc.density(name, part=part, num_probes=2, num_steps=8, generator=gen)
                out[f"{name}/{part}/density"] = dens.weights
        out["cross/H/frobenius"] = bc.frobenius(BLOCKS[0], "layer0.head1.K", num_matvecs=6,
                                                generator=torch.Generator().manual_seed(12)).value
        return out
