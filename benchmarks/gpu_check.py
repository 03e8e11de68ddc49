"""``python -m benchmarks.gpu_check --json OUT``: the GPU checks of issue #12 item 5, one prepared run.

For a session lent a CUDA GPU (15 minutes of device time in all). Not registered in ``python -m benchmarks`` (it
needs a GPU). In order, printing progress:

1. **suite** -- ``pytest -m cuda tests/test_devices.py`` (every public energy, step, closed form, operator and
   estimator on ``cuda`` against the CPU in float64, ≤ 1e-10); its exit status and summary line.
2. **hvp** -- one Hessian-vector product over one gradient on a GPT-2-small-shaped Hugging Face model
   (:func:`energy.hessian.hf.build_model` ``"gpt2-small-shaped"``: 12 layers, d 768, 12 heads, vocabulary 50257,
   124M parameters), eager attention, float32, batch 8 × 128 tokens, shifted cross-entropy; the HVP is
   ``curvature_operator(model, data, part="H") @ v`` (forward-over-reverse), the gradient plain reverse mode of the
   same loss (``torch.autograd.grad``), our functional ``gradient()`` timed too. Target (issue #12): ratio ≤ 2.5.
3. **head_norms** -- the exact per-head Hessian block norms :func:`energy.hessian.head_norms.head_block_norms` at
   GPT-2-small shapes (d 768, k = d_v 64, d_out 768, L 1024, B 8, causal, float64), blocks ``(Q,Q)``, ``(V,V)``,
   ``(O,O)``, then ``(K,K)`` if its predicted time (its multiply–adds at the rate measured on ``(Q,Q)``) fits the
   remaining budget (``--budget-s``).
4. **fused** -- the energy step through SDPA (:func:`energy.fused.attention_step_fused`, 12 orthogonal heads of
   width 64, d 768, L 1024, B 8, float32) against ``F.scaled_dot_product_attention`` of the same heads under the
   flash backend (float32 when the backend takes it, else float16, recorded): the time ratio, the fused step's max
   abs difference from the float64 einsum step, and the flash output's from float64 attention.

Times are medians of ``--repeat`` calls, each between ``torch.cuda.synchronize()`` calls, after two warm-ups.
Without a CUDA device the script refuses (exit status 2, one line) unless ``--device cpu --quick`` is given, which
runs the same code at tiny sizes on the CPU (a smoke run, tested in ``tests/test_gpu_check.py``).

Estimated GPU time at full size on one H100 (not measured: no GPU was lent when this was written): suite ≈ 1 min
(42 small float64 cases, mostly the Python start and imports), hvp ≈ 20 s (model build on the CPU, then ~0.1 s per
call), head_norms ≈ 1 min (``(Q,Q)`` ≈ 3·10¹¹ and ``(K,K)`` ≈ 1.3·10¹³ float64 multiply–adds at a few Tflop/s),
fused ≈ 10 s: about 3 minutes in all, under the 8-minute bound that ``--budget-s 420`` guards.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.bench_hessian_scale import kk_multiply_adds, qq_multiply_adds
from energy._cli import Parser, UsageError, check_writable_file, run_command
from energy._io import atomic_write_text
from energy.attention import MultiHeadAttentionEnergy, attention_step_fused, head_bases
from energy.hessian import hf
from energy.hessian.head_norms import head_block_norms

PROG = "python -m benchmarks.gpu_check"
ROOT = Path(__file__).resolve().parent.parent
FULL: dict[str, Any] = {
    "hvp": {"preset": "gpt2-small-shaped", "batch": 8, "seq_len": 128},
    "head_norms": {"d": 768, "k": 64, "dv": 64, "do": 768, "B": 8, "L": 1024},
    "fused": {"batch": 8, "n": 1024, "d": 768, "heads": 12},
}
QUICK: dict[str, Any] = {
    "hvp": {"preset": "gpt2-tiny", "batch": 2, "seq_len": 8},
    "head_norms": {"d": 16, "k": 4, "dv": 4, "do": 16, "B": 2, "L": 16},
    "fused": {"batch": 2, "n": 32, "d": 32, "heads": 4},
}


def main(argv: list[str] | None = None) -> int:
    """Run the checks and write the JSON report; exit status 2 (one line) without a CUDA device unless
    ``--device cpu --quick``, 1 for a failure (``--debug`` shows the traceback).
    """
    return run_command(PROG, lambda: _main(argv), argv)


def _log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def _main(argv: list[str] | None) -> int:
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="OUT", default="gpu_check.json", help="write the report here (atomically)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: smoke run (needs --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (with --device cpu: a CPU smoke run)")
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per measurement (median)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip (K,K) if it would end after this")
    parser.add_argument("--skip-suite", action="store_true", help="do not run the cuda test suite")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.quick:
        raise UsageError("--device cpu runs only the smoke sizes; add --quick (full sizes need a CUDA GPU)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine, or pass "
                         "--device cpu --quick for a CPU smoke run of the same code")
    if args.repeat < 1:
        raise UsageError(f"--repeat must be ≥ 1, got {args.repeat}")
    check_writable_file(args.json, "--json")
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": device.type, "torch": torch.__version__, "cuda": torch.version.cuda, "quick": args.quick,
        "platform": platform.platform(), "repeat": args.repeat,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    _log(f"device {report['card'] or 'cpu'}, torch {report['torch']}, {'quick' if args.quick else 'full'} sizes")
    if not args.skip_suite:
        report["suite"] = _suite()
    report["hvp"] = _hvp(device, sizes["hvp"], args.repeat)
    report["head_norms"] = _head_norms(device, sizes["head_norms"], args.budget_s - (time.perf_counter() - t0))
    report["fused"] = _fused(device, sizes["fused"], args.repeat)
    report["wall_s"] = time.perf_counter() - t0
    atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    _log(f"wrote {args.json} ({report['wall_s']:.1f} s)")
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds, each call between two synchronisations."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _suite() -> dict[str, Any]:
    """``pytest -m cuda tests/test_devices.py`` in a subprocess: exit status, summary line, wall time."""
    _log("suite: pytest -m cuda tests/test_devices.py ...")
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_devices.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    out = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": lines[-1] if lines else "",
           "wall_s": time.perf_counter() - t}
    if proc.returncode not in (0, 5):  # 5: nothing collected
        out["failures"] = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:50]
    _log(f"suite: {out['summary']} (exit {proc.returncode})")
    return out


def _hvp(device: torch.device, s: dict[str, Any], repeat: int) -> dict[str, Any]:
    """HVP / gradient on a GPT-2-shaped Hugging Face model, float32, eager attention."""
    _log(f"hvp: building {s['preset']} (float32, eager) ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.build_model(s["preset"], seed=0, dtype=torch.float32, attn_implementation="eager").to(device)
    data = hf.synthetic_batches(model, batch=s["batch"], seq_len=s["seq_len"], seed=0)
    H = hf.curvature_operator(model, data, part="H")
    params = [p for _, p in H.model.named_parameters()]  # the operator's flat order (tied weights once)
    v = torch.randn(H.shape[1], generator=torch.Generator().manual_seed(1)).to(device)

    def gradient() -> torch.Tensor:
        loss = torch.stack([w * H.loss_fn(H.model(x), y) for x, y, w in H._batches()]).sum()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    _log(f"hvp: {H.shape[1]} parameters, batch {s['batch']} x {s['seq_len']}; timing ...")
    t_grad = _median(gradient, device, repeat)
    t_hvp = _median(lambda: H @ v, device, repeat)
    t_fgrad = _median(H.gradient, device, repeat)
    rel = float((H.gradient() - gradient()).norm() / gradient().norm())  # the functional and plain gradients agree
    out = {**s, "dtype": "float32", "attention": hf.attn_implementation(model), "num_params": H.shape[1],
           "gradient_s": t_grad, "hvp_s": t_hvp, "functional_gradient_s": t_fgrad, "ratio": t_hvp / t_grad,
           "functional_gradient_rel_diff": rel, "target": "ratio <= 2.5", "meets_target": t_hvp / t_grad <= 2.5}
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    _log(f"hvp: gradient {t_grad * 1e3:.1f} ms, HVP {t_hvp * 1e3:.1f} ms, ratio {out['ratio']:.2f}")
    return out


def _head_problem(s: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    """GPT-2-like scales (as the CPU benchmark ``hessian/exact-norms-gpt2-small-head``): unit tokens, weights
    ``N(0, 1/fan_in)``, a residual ``G`` of the size of ``2c F``; float64, drawn on the CPU and moved.
    """
    g = torch.Generator().manual_seed(0)
    d, k, dv, do, B, L = (s[n] for n in ("d", "k", "dv", "do", "B", "L"))

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    X, W_Q, W_K, W_V = r(B, L, d), r(d, k) / math.sqrt(d), r(d, k) / math.sqrt(d), r(d, dv) / math.sqrt(d)
    W_O, G = r(dv, do) / math.sqrt(dv), 2.0 / (L * do) * r(B, L, do)
    return tuple(t.to(device) for t in (X, W_Q, W_K, W_V, W_O, G))


def _head_norms(device: torch.device, s: dict[str, Any], budget_s: float) -> dict[str, Any]:
    """Exact per-head norms at GPT-2-small shapes, one block at a time; ``(K,K)`` if its predicted time fits."""
    X, W_Q, W_K, W_V, W_O, G = _head_problem(s, device)
    c = 1.0 / (s["L"] * s["do"])
    out: dict[str, Any] = {**s, "dtype": "float64", "causal": True, "c": c}
    deadline = time.perf_counter() + budget_s
    for block in ("QQ", "VV", "OO", "KK"):
        if block == "KK":
            ma = kk_multiply_adds(s["B"], s["L"], s["d"], s["k"], min(s["dv"], s["do"]))
            predicted = ma / out["QQ_multiply_adds_per_s"]
            out["KK_predicted_s"] = predicted
            if time.perf_counter() + predicted > deadline:
                out["KK_skipped"] = f"predicted {predicted:.0f} s exceeds the remaining budget"
                _log(f"head_norms: (K,K) skipped ({out['KK_skipped']})")
                continue
        _log(f"head_norms: ({block[0]},{block[1]}) at B {s['B']}, L {s['L']}, d {s['d']}, k {s['k']} ...")
        _sync(device)
        t = time.perf_counter()
        norms = head_block_norms(X, W_Q, W_K, W_V, W_O, G, c=c, causal=True, blocks=(block,))
        _sync(device)
        out[f"{block}_s"] = time.perf_counter() - t
        out[block] = {part: value for (_, part), value in norms.items()}
        if block == "QQ":
            qq = qq_multiply_adds(s["B"], s["L"], s["d"], s["k"], min(s["dv"], s["do"]))
            out["QQ_multiply_adds_per_s"] = qq / out["QQ_s"]
        _log(f"head_norms: ({block[0]},{block[1]}) {out[f'{block}_s']:.2f} s, ‖H‖_F = {out[block]['H']:.6g}")
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Callable[[], torch.Tensor], str]:
    """SDPA under the flash backend, in the inputs' dtype when the backend takes it, else in float16."""
    for dtype in (q.dtype, torch.float16):
        qd, kd, vd = (t.to(dtype) for t in (q, k, v))
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(qd, kd, vd)
        except RuntimeError:
            continue

        def run(qd: torch.Tensor = qd, kd: torch.Tensor = kd, vd: torch.Tensor = vd) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qd, kd, vd)

        return run, str(dtype).removeprefix("torch.")
    raise RuntimeError("the flash SDPA backend runs neither in float32 nor in float16 on this device")


def _fused(device: torch.device, s: dict[str, Any], repeat: int) -> dict[str, Any]:
    """The fused energy step (float32) against flash SDPA of the same heads: time ratio and accuracy."""
    g = torch.Generator().manual_seed(0)
    B, n, d, h = s["batch"], s["n"], s["d"], s["heads"]
    k = d // h
    Y64 = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    M64 = torch.stack([Q[:, i * k:(i + 1) * k] for i in range(h)])  # orthogonal heads: the guaranteed step
    Y64, M64 = Y64.to(device), M64.to(device)
    Y, M = Y64.float(), M64.float()
    U = head_bases(M)  # computed once, as a step module caches it
    q, kk, v = (torch.einsum("bnd,hdk->bhnk", Y, W) for W in (M, M, M))  # the heads' queries, keys and values
    flash, flash_dtype = _flash(q, kk, v)
    _log(f"fused: B {B}, n {n}, d {d}, {h} heads of {k}; flash SDPA in {flash_dtype} ...")
    with torch.no_grad():
        t_fused = _median(lambda: attention_step_fused(Y, M, 1.0, value_basis=U), device, repeat)
        t_flash = _median(flash, device, repeat)
        t_sdpa32 = _median(lambda: F.scaled_dot_product_attention(q, kk, v), device, repeat)
        ref = MultiHeadAttentionEnergy(M64).step(Y64, 1.0)
        err = float((attention_step_fused(Y, M, 1.0, value_basis=U).double() - ref).abs().max())
        q64, k64, v64 = (t.double() for t in (q, kk, v))
        with sdpa_kernel(SDPBackend.MATH):
            att64 = F.scaled_dot_product_attention(q64, k64, v64)
        flash_err = float((flash().double() - att64).abs().max())
    out = {**s, "head_width": k, "dtype": "float32", "flash_dtype": flash_dtype, "fused_s": t_fused,
           "flash_sdpa_s": t_flash, "sdpa_float32_default_backend_s": t_sdpa32, "ratio": t_fused / t_flash,
           "ratio_vs_sdpa_float32": t_fused / t_sdpa32, "max_abs_diff_fused_vs_float64_step": err,
           "max_abs_diff_flash_vs_float64_attention": flash_err, "output_scale": float(ref.abs().max())}
    _log(f"fused: {t_fused * 1e3:.2f} ms vs flash {t_flash * 1e3:.2f} ms (ratio {out['ratio']:.2f}); "
         f"max |fused − float64 step| {err:.2e}, max |flash − float64| {flash_err:.2e}")
    return out


if __name__ == "__main__":
    sys.exit(main())
