"""Exact per-head Hessian block norms at GPT-2-small scale (energy.hessian.head_norms) against Hutchinson.

Entry ``hessian/exact-norms-gpt2-small-head``: one GPT-2-small head (``d = 768``, ``k = d_v = 64``,
``d_out = 768``, causal), ``B = 8`` sequences of ``L = 1024`` tokens (``--quick``: ``d = 128``, ``k = 16``,
``B = 2``, ``L ≤ 128``); the issue's target is every block norm in ≤ 60 s on this 2-core machine.

* ``(Q,Q)``, ``(V,V)``, ``(O,O)`` (parts ``H``, ``H_o``, ``H_f``, cross) are timed at the target size, and at
  ``L/4``, ``L/2`` for the fitted growth exponent in ``L`` (``energy.hessian.sweep.fit_loglog_slope``).
* ``(K,K)`` costs ``Θ(N d² k²)`` (module docstring of :mod:`energy.hessian.head_norms`): it is timed on one sequence
  (``B = 1``) at three lengths up to the target's ``L``; its work is additive over sequences, so the target's time
  is extrapolated as ``B ×`` the measured one-sequence time. Its multiply–add count at the target, divided by the
  float64 GEMM rate measured in the same run (a 2000² ``matmul``, at the start and at the end) and by the idle rate
  of this machine (160 GFLOP/s), bounds any implementation of this formulation from below.
* The same block norms by a 20-probe Hutchinson estimate (``‖H‖² ≈ mean ‖H z‖²``, Rademacher ``z``; block HVPs by
  forward-over-reverse, ``H_o z = 2c Jᵀ(J z)`` by a JVP and a VJP, ``H_f z = H z − H_o z``): its time and relative
  error next to the exact values (``(K,K)``: at the largest one-sequence size). The HVPs run on one thread: on
  this loaded machine two probes of ``(Q,Q)`` at the target took 9.6–11.1 s on one thread, 13.8–14.1 s on two.

Every timing is one run (these are minutes of CPU on a shared machine), wall and process CPU time, with the
1-minute load average beside it.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from benchmarks import benchmark
from energy.hessian.head_norms import head_inner_products, head_output
from energy.hessian.sweep import fit_loglog_slope

DT = torch.float64
PARTS = ("H", "H_o", "H_f", "cross")
FULL: dict[str, Any] = {"d": 768, "k": 64, "dv": 64, "do": 768, "B": 8, "L": 1024, "kk_L": (256, 512, 1024),
                        "probes": 20, "threads": None, "hutchinson_threads": 1}
QUICK: dict[str, Any] = {"d": 128, "k": 16, "dv": 16, "do": 128, "B": 2, "L": 128, "kk_L": (32, 64, 128), "probes": 20,
                         "threads": 1, "hutchinson_threads": 1}


def _problem(cfg: dict[str, Any], B: int, L: int, seed: int = 0) -> tuple[Tensor, ...]:
    """GPT-2-like scales: unit tokens, weights ``N(0, 1/fan_in)``, a residual ``G`` of the size of ``2c F``."""
    g = torch.Generator().manual_seed(seed)
    d, k, dv, do = cfg["d"], cfg["k"], cfg["dv"], cfg["do"]
    X = torch.randn(B, L, d, generator=g, dtype=DT)
    W_Q, W_K, W_V = (torch.randn(d, s, generator=g, dtype=DT) / math.sqrt(d) for s in (k, k, dv))
    W_O = torch.randn(dv, do, generator=g, dtype=DT) / math.sqrt(dv)
    c = 1.0 / (L * do)
    G = 2.0 * c * torch.randn(B, L, do, generator=g, dtype=DT)
    return X, W_Q, W_K, W_V, W_O, G, torch.tensor(c)


def _timed(res: dict[str, Any], key: str, fn: Callable[..., Any], *args: Any) -> tuple[float, float, Any]:
    """One call ``fn(*args)``: records ``key_s`` (wall), ``key_cpu_s`` (process CPU time, all threads; insensitive
    to time spent descheduled) and ``key_load_1min`` in ``res``; returns ``(wall, cpu, result)``.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    res[f"{key}_s"], res[f"{key}_cpu_s"], res[f"{key}_load_1min"] = wall, cpu, os.getloadavg()[0]
    return wall, cpu, out


def _exact(args: tuple[Tensor, ...], blocks: tuple[str, ...], kappa: float) -> dict[str, dict[str, float]]:
    X, W_Q, W_K, W_V, W_O, G, c = args
    ips = head_inner_products(X, W_Q, W_K, W_V, W_O, G, c=float(c), kappa=kappa, causal=True, blocks=blocks)
    out = {}
    for name, (oo, of, ff) in ips.items():
        o, f, x = float(oo), float(of), float(ff)
        out[name] = {"H": o + 2.0 * f + x, "H_o": o, "H_f": x, "cross": f}
    return out


def _hutchinson(args: tuple[Tensor, ...], block: str, kappa: float, probes: int, seed: int) -> dict[str, float]:
    """Hutchinson estimates of ``‖H_bb‖², ‖H_o‖², ‖H_f‖²`` and ``⟨H_o, H_f⟩`` of block ``bb`` (module docstring).

    The loss ``c‖F_h‖² + ⟨G − 2cF_h(θ₀), F_h⟩`` has the Hessian ``2cJᵀJ + ⟨G, ∇²F_h⟩`` of the head in its layer.
    """
    X, W_Q, W_K, W_V, W_O, G, c_t = args
    c = float(c_t)
    W = [W_Q, W_K, W_V, W_O]
    idx = "QKVO".index(block[0])
    R = G - 2.0 * c * head_output(X, W_Q, W_K, W_V, W_O, kappa, True)

    def out(Wb: Tensor) -> Tensor:
        Ws = list(W)
        Ws[idx] = Wb
        return head_output(X, Ws[0], Ws[1], Ws[2], Ws[3], kappa, True)

    def loss(Wb: Tensor) -> Tensor:
        F = out(Wb)
        return c * (F * F).sum() + (R * F).sum()

    grad = torch.func.grad(loss)
    vjp_fn = torch.func.vjp(out, W[idx])[1]
    gen = torch.Generator().manual_seed(seed)
    acc = dict.fromkeys(PARTS, 0.0)
    for _ in range(probes):
        z = (torch.randint(0, 2, W[idx].shape, generator=gen) * 2 - 1).to(DT)
        Hz = torch.func.jvp(grad, (W[idx],), (z,))[1]
        Hoz = 2.0 * c * vjp_fn(torch.func.jvp(out, (W[idx],), (z,))[1])[0]
        Hfz = Hz - Hoz
        for part, v in (("H", (Hz * Hz).sum()), ("H_o", (Hoz * Hoz).sum()),
                        ("H_f", (Hfz * Hfz).sum()), ("cross", (Hoz * Hfz).sum())):
            acc[part] += float(v) / probes
    return acc


def _rel_errors(est: dict[str, float], exact: dict[str, float]) -> dict[str, float]:
    """Relative error of the norm estimates ``√est/√exact − 1`` and of the cross term (vs ``‖H_o‖ ‖H_f‖``)."""
    out = {p: abs(math.sqrt(max(est[p], 0.0) / exact[p]) - 1.0) if exact[p] > 0 else abs(est[p]) for p in PARTS[:3]}
    scale = math.sqrt(exact["H_o"] * exact["H_f"])
    out["cross"] = abs(est["cross"] - exact["cross"]) / scale if scale > 0 else abs(est["cross"])
    return out


def _gemm_rate() -> tuple[float, float]:
    """Float64 GEMM rate (flop/s) of this machine now (median of 3 products of 2000² matrices) and the load."""
    A = torch.randn(2000, 2000, dtype=DT)
    A @ A
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        A @ A
        times.append(time.perf_counter() - t0)
    return 2 * 2000**3 / statistics.median(times), os.getloadavg()[0]


def kk_multiply_adds(B: int, L: int, d: int, k: int, r: int, tile: int = 64, functional: bool = True) -> float:
    """Multiply–adds of the ``(K,K)`` primal route of :func:`energy.hessian.head_norms.head_inner_products`:
    ``D_i`` (``B L² d r``), per tile ``R^o`` (``N t² r``) and ``R^f`` (``B L² t²``), and the GEMM
    ``N · 2|tile| · p`` (diagonal tiles packed), ``p = k(k+1)/2``; ``functional=False``: ``‖H_o‖²`` alone.
    """
    N, p = B * L, k * (k + 1) // 2
    full = packed = 0
    for i0 in range(0, d, tile):
        ti = min(tile, d - i0)
        for j0 in range(i0, d, tile):
            tj = min(tile, d - j0)
            full += ti * tj
            packed += ti * (ti + 1) // 2 if i0 == j0 else ti * tj
    if not functional:
        return float(B * L * L * d * r + N * full * r + N * packed * p)
    return float(B * L * L * d * r + N * full * r + B * L * L * full + N * 2 * packed * p)


def qq_multiply_adds(B: int, L: int, d: int, k: int, r: int) -> float:
    """Multiply–adds of the ``(Q,Q)`` Gram route: ``E_i``, ``KᵀC_iK`` (``B L² k (r + k)``), ``P^o`` (``N k² r``),
    the Gram weights (``N² d / 2``) and four Gram products on the upper half (``2 N² p``).
    """
    N, p = B * L, k * (k + 1) // 2
    return float(B * L * L * k * (r + k) + N * k * k * r + N * N * d / 2 + 2 * N * N * p)


@benchmark("hessian/exact-norms-gpt2-small-head")
def bench_exact_norms_gpt2_small_head(quick: bool) -> dict[str, Any]:
    """The entry (module docstring); ``--quick`` runs on one thread (its small kernels are fastest so, and on a
    loaded machine multithreaded small kernels wait for descheduled threads).
    """
    cfg = QUICK if quick else FULL
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"] or previous)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: dict[str, Any]) -> dict[str, Any]:
    d, k, dv, do, B, L = cfg["d"], cfg["k"], cfg["dv"], cfg["do"], cfg["B"], cfg["L"]
    kappa, r = 1.0 / math.sqrt(k), min(dv, do)
    res: dict[str, Any] = {"d": d, "k": k, "d_v": dv, "d_out": do, "B": B, "L": L, "causal": True,
                           "threads": torch.get_num_threads(), "target_s": 60.0}
    rate, load = _gemm_rate()
    res.update(gemm_gflops_start=rate / 1e9, gemm_load_1min_start=load)
    warm = _problem(QUICK, 1, 8)  # first calls (linalg, functorch) are not timed
    _exact(warm, ("QQ", "KK", "VV", "OO"), kappa)
    _hutchinson(warm, "QQ", kappa, 1, seed=0)

    # (Q,Q), (V,V), (O,O) at L/4, L/2, L (B sequences); exact values at the target kept for Hutchinson
    cheap = ("QQ", "VV", "OO")
    lengths = (L // 4, L // 2, L)
    per_size: dict[str, list[float]] = {name: [] for name in cheap}
    per_size_cpu: dict[str, list[float]] = {name: [] for name in cheap}
    exact_target: dict[str, dict[str, float]] = {}
    for Lx in lengths:
        args = _problem(cfg, B, Lx)
        for name in cheap:
            t, cpu, out = _timed(res, f"{name}_L{Lx}", _exact, args, (name,), kappa)
            per_size[name].append(t)
            per_size_cpu[name].append(cpu)
            if Lx == L:
                exact_target[name] = out[name]
        del args
    for name in cheap:
        res[f"{name}_growth_exponent_L"] = fit_loglog_slope(lengths, per_size[name]).slope
        res[f"{name}_growth_exponent_L_cpu"] = fit_loglog_slope(lengths, per_size_cpu[name]).slope
    res["QQ_multiply_adds_target"] = qq_multiply_adds(B, L, d, k, r)
    feasible_s = sum(per_size[name][-1] for name in cheap)
    res["QQ_VV_OO_target_s"] = feasible_s

    # (K,K) on one sequence at three lengths; the target is B x the one-sequence time at length L
    kk_times, kk_cpu, exact_kk = [], [], {}
    for Lx in cfg["kk_L"]:
        args = _problem(cfg, 1, Lx, seed=1)
        t, cpu, out = _timed(res, f"KK_B1_L{Lx}", _exact, args, ("KK",), kappa)
        kk_times.append(t)
        kk_cpu.append(cpu)
        res[f"KK_B1_L{Lx}_gflops"] = 2 * kk_multiply_adds(1, Lx, d, k, r) / t / 1e9
        exact_kk = out["KK"]
        kk_args = args
    res["KK_growth_exponent_L_B1"] = fit_loglog_slope(cfg["kk_L"], kk_times).slope
    res["KK_growth_exponent_L_B1_cpu"] = fit_loglog_slope(cfg["kk_L"], kk_cpu).slope
    t_one = kk_times[-1] * (L / cfg["kk_L"][-1]) ** res["KK_growth_exponent_L_B1"]
    res["KK_target_extrapolated_s"] = B * t_one
    mads = kk_multiply_adds(B, L, d, k, r)
    res["KK_multiply_adds_target"] = mads
    rate_end, load_end = _gemm_rate()
    res.update(gemm_gflops_end=rate_end / 1e9, gemm_load_1min_end=load_end)
    best = max(rate, rate_end)
    res["KK_target_s_at_measured_gemm_rate"] = 2 * mads / best  # flop count / the better of the two GEMM rates
    res["KK_target_s_at_160_gflops"] = 2 * mads / 160e9  # this machine's float64 GEMM rate when idle
    res["KK_H_o_only_multiply_adds_target"] = kk_multiply_adds(B, L, d, k, r, functional=False)
    res["KK_H_o_only_target_s_at_160_gflops"] = 2 * res["KK_H_o_only_multiply_adds_target"] / 160e9
    res["all_blocks_target_s"] = feasible_s + res["KK_target_extrapolated_s"]
    res["meets_target"] = bool(res["all_blocks_target_s"] <= 60.0)
    res["QQ_VV_OO_meet_target"] = bool(feasible_s <= 60.0)

    # Hutchinson, 20 probes: at the target for (Q,Q), (V,V), (O,O), (K,K) (time), errors vs the exact values
    probes = cfg["probes"]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["hutchinson_threads"])
    res["hutchinson_threads"] = cfg["hutchinson_threads"]
    args = _problem(cfg, B, L)
    hutch_s = 0.0
    for name in (*cheap, "KK"):
        t, _, est = _timed(res, f"hutchinson_{name}", _hutchinson, args, name, kappa, probes, 2)
        hutch_s += t
        if name in exact_target:
            for part, err in _rel_errors(est, exact_target[name]).items():
                res[f"hutchinson_{name}_{part}_rel_error"] = err
    _, _, est = _timed(res, "hutchinson_KK_B1", _hutchinson, kk_args, "KK", kappa, probes, 2)
    for part, err in _rel_errors(est, exact_kk).items():
        res[f"hutchinson_KK_B1_L{cfg['kk_L'][-1]}_{part}_rel_error"] = err
    torch.set_num_threads(threads)
    res["hutchinson_all_blocks_target_s"] = hutch_s
    res["ratio_exact_QQ_VV_OO_over_hutchinson"] = feasible_s / sum(res[f"hutchinson_{n}_s"] for n in cheap)
    res["ratio_exact_all_extrapolated_over_hutchinson"] = res["all_blocks_target_s"] / hutch_s
    for name in cheap:
        for part in PARTS:
            res[f"exact_{name}_{part}"] = exact_target[name][part]
    for part in PARTS:
        res[f"exact_KK_B1_{part}"] = exact_kk[part]
    res["load_average_1min_end"] = os.getloadavg()[0]
    return res
