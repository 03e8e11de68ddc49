"""The real-model curvature path (:mod:`energy.hessian.hf`) on a Hugging Face GPT-2, against the two libraries
that apply curvature to the same ``nn.Module`` (issue 11, item 8). Ratios of interleaved medians from one run.

Model: ``GPT2LMHeadModel`` built offline from a seeded config (:func:`energy.hessian.hf.build_model`, preset
``gpt2-tiny`` with 2 layers, 4 heads, vocabulary 128, tied ``lm_head``), **float32**, eval mode; data: one batch of
8 random sequences of length 32 (:func:`energy.hessian.hf.synthetic_batches`), shifted cross-entropy (mean over the
248 next-token targets). All parameters are free.

* ``hessian/hf-gpt2-hvp-vs-gradient`` -- at widths ``d ∈ {64, 128, 256}`` (quick: ``{32, 48, 64}``) the median
  time of one Hessian-vector product over the median time of one gradient of the same loss, for three HVPs timed
  interleaved with the gradient in one loop: ours (``curvature_operator(model, data, part="H") @ v``),
  hessian-eigenthings' ``HessianOperator.matvec`` and curvlinops' ``HessianLinearOperator @ v``. The gradient is
  plain reverse mode on the model (``torch.autograd.grad`` of the loss through the same wrapper, so the same eager
  attention); our own functional ``gradient()`` is timed too. Target: ours ≤ 2.5 at the largest width. The growth
  exponent of our HVP time in the parameter count is fitted over the widths
  (:func:`energy.hessian.sweep.fit_loglog_slope`).
* ``hessian/hf-gpt2-block-slq`` -- per-block spectral density by SLQ, ``BlockCurvature.density`` (4 probes × 20
  Lanczos steps) of the per-head block ``layer0.head0.Q`` and of the block ``layer1.mlp``, against curvlinops with
  the same number of products: its ``HessianLinearOperator`` on the block's tensors restricted by
  ``SubmatrixLinearOperator`` to the block's entries, and ``fast_lanczos`` (Papyan 2020, the Lanczos underneath its
  ``lanczos_approximate_spectrum``; called directly so that the spectrum boundaries are not estimated by extra ARPACK
  products) once per probe. Ratio ours / curvlinops per block.

Times are medians of process CPU time (``time.process_time``), robust to the machine being shared; run with
``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import benchmark, interleaved_medians
from energy.hessian import hf
from energy.hessian.hf_blocks import BlockCurvature
from energy.hessian.sweep import fit_loglog_slope

DT = torch.float32
BATCH, SEQ, VOCAB, LAYERS, HEADS = 8, 32, 128, 2, 4


def _model(width: int) -> tuple[Any, list]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.build_model("gpt2-tiny", seed=0, dtype=DT, n_embd=width, n_layer=LAYERS, n_head=HEADS,
                               vocab_size=VOCAB, n_positions=SEQ)
    return model, hf.synthetic_batches(model, batch=BATCH, seq_len=SEQ, seed=0)


def _medians(fns: dict[str, Callable[[], Any]], *, repeat: int, warmup: int = 1) -> dict[str, float]:
    """Median process CPU time of each callable, all run in turn ``repeat`` times (interleaved, same conditions).

    CPU time (``time.process_time``) rather than wall time: on a shared machine a descheduled burst would otherwise
    land on whichever callable was running; run with ``OMP_NUM_THREADS=1`` so that it is also the wall time.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _hvps(model: Any, data: list) -> dict[str, Callable[[], Any]]:
    """The gradient and the three HVPs on the same model, loss, data and vector."""
    import curvlinops
    import hessian_eigenthings as he

    H = hf.curvature_operator(model, data, part="H")
    params = [p for _, p in H.model.named_parameters()]  # our flat order (the tied lm_head counted once)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    H_cl = curvlinops.HessianLinearOperator(H.model, H.loss_fn, params, data, batch_size_fn=H.batch_size_fn,
                                            check_deterministic=False)
    batches = [x for x, _ in data]

    def he_loss(m: Any, batch: dict) -> torch.Tensor:
        return H.loss_fn(m(input_ids=batch["input_ids"]).logits, batch["labels"])

    H_he = he.operators.hessian.HessianOperator(model, batches, he_loss)
    if H_he.size != H.shape[0]:
        raise RuntimeError(f"hessian-eigenthings sees {H_he.size} parameters, ours {H.shape[0]}")

    def gradient() -> torch.Tensor:
        loss = torch.stack([w * H.loss_fn(H.model(x), y) for x, y, w in H._batches()]).sum()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    return {"gradient": gradient, "gradient_functional_ours": H.gradient, "ours": lambda: H @ v,
            "hessian_eigenthings": lambda: H_he.matvec(v), "curvlinops": lambda: H_cl @ v}


@benchmark("hessian/hf-gpt2-hvp-vs-gradient")
def bench_hvp_vs_gradient(quick: bool) -> dict[str, Any]:
    widths = (32, 48, 64) if quick else (64, 128, 256)
    repeat = 3 if quick else 7
    out: dict[str, Any] = {"dtype": "float32", "batch": BATCH, "seq_len": SEQ, "vocab": VOCAB, "layers": LAYERS,
                           "heads": HEADS, "widths": list(widths), "repeat": repeat, "num_params": []}
    hvp_times = []
    for width in widths:
        model, data = _model(width)
        fns = _hvps(model, data)
        med = _medians(fns, repeat=repeat)
        out["num_params"].append(sum(p.numel() for p in model.parameters()))
        hvp_times.append(med["ours"])
        for k, t in med.items():
            out[f"d{width}_{k}_s"] = t
        for k in ("ours", "hessian_eigenthings", "curvlinops", "gradient_functional_ours"):
            out[f"d{width}_{k}_over_gradient"] = med[k] / med["gradient"]
    last = widths[-1]
    out["ratio"] = out[f"d{last}_ours_over_gradient"]
    out["ratio_hessian_eigenthings"] = out[f"d{last}_hessian_eigenthings_over_gradient"]
    out["ratio_curvlinops"] = out[f"d{last}_curvlinops_over_gradient"]
    fit = fit_loglog_slope(out["num_params"], hvp_times)
    out["exponent_ours_hvp_in_params"] = fit.slope
    out["exponent_stderr"] = fit.stderr
    out["what"] = "one HVP (all parameters) / one reverse-mode gradient of the same loss, at the largest width"
    out["target"] = "ratio <= 2.5"
    out["meets_target"] = bool(out["ratio"] <= 2.5)
    return out


@benchmark("hessian/hf-gpt2-block-slq")
def bench_block_slq(quick: bool) -> dict[str, Any]:
    import curvlinops
    from curvlinops.papyan2020traces.spectrum import fast_lanczos

    width = 32 if quick else 64
    num_probes, num_steps = (2, 10) if quick else (4, 20)
    model, data = _model(width)
    bc = BlockCurvature(model, data)
    out: dict[str, Any] = {"dtype": "float32", "width": width, "batch": BATCH, "seq_len": SEQ,
                           "num_probes": num_probes, "num_steps": num_steps}
    ratios = []
    for label, name in (("head_Q", "layer0.head0.Q"), ("mlp", "layer1.mlp")):
        A = bc.operator(name)
        params = [p for n, p in bc.model.named_parameters() if n in A.parent.param_names]
        cl_parent = curvlinops.HessianLinearOperator(bc.model, A.parent.loss_fn, params, data,
                                                     batch_size_fn=A.parent.batch_size_fn, check_deterministic=False)
        idx = A._r.tolist()
        cl = curvlinops.SubmatrixLinearOperator(cl_parent, idx, idx)

        def ours(name: str = name) -> Any:
            return bc.density(name, num_probes=num_probes, num_steps=num_steps,
                              generator=torch.Generator().manual_seed(0))

        def theirs(cl: Any = cl) -> list:
            torch.manual_seed(0)  # fast_lanczos draws its start vector from the global generator
            return [fast_lanczos(cl, num_steps) for _ in range(num_probes)]

        ours()
        theirs()
        t_ours, t_cl = interleaved_medians(ours, theirs, repeat=3, clock=time.process_time)
        ratios.append(t_ours / t_cl)
        nodes = ours().nodes
        out.update({f"{label}_block": name, f"{label}_size": len(idx), f"{label}_ours_s": t_ours,
                    f"{label}_curvlinops_s": t_cl, f"{label}_ratio": t_ours / t_cl,
                    f"{label}_ours_node_range": [float(nodes.min()), float(nodes.max())],
                    f"{label}_curvlinops_node_range": _range(theirs())})
    out["ratio"] = max(ratios)
    out["what"] = "SLQ density of one block, ours / curvlinops with the same number of Hessian-vector products"
    return out


def _range(runs: list) -> list[float]:
    evals = torch.cat([e for e, _ in runs])
    return [float(evals.min()), float(evals.max())]
