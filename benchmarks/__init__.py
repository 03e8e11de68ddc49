"""Ratio benchmarks: every entry times a candidate against a baseline measured in the same run.

Machines here are shared and noisy, so absolute times mean little; the ratio of two medians measured
interleaved in one process is what we report. Register an entry with :func:`benchmark`; it returns a dict
made by :func:`compare` (plus any extra numbers, e.g. an estimator's relative error).

Run all: ``python -m benchmarks --json OUT [--only SUBSTRING] [--quick]``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["benchmark", "compare", "interleaved_medians", "median_time", "REGISTRY"]

REGISTRY: dict[str, Callable[[bool], dict[str, Any]]] = {}
MODULES = (
    "bench_energy", "bench_unfold", "bench_hessian", "bench_hessian_closed", "bench_figures", "bench_hessian_scale",
    "bench_hessian_block", "bench_hessian_hf", "bench_distributed",
)


def benchmark(name: str) -> Callable:
    """Decorator: register ``fn(quick: bool) -> dict`` under ``name``."""

    def deco(fn: Callable[[bool], dict[str, Any]]) -> Callable[[bool], dict[str, Any]]:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        REGISTRY[name] = fn
        return fn

    return deco


def median_time(fn: Callable[[], Any], *, repeat: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(
    candidate: Callable[[], Any], baseline: Callable[[], Any], *, repeat: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float]:
    """Median ``clock`` time of ``candidate`` and of ``baseline``, run alternately ``repeat`` times (no warm-up).

    ``clock=time.process_time`` measures process CPU time, insensitive to time spent descheduled.
    """
    tc, tb = [], []
    for _ in range(repeat):
        t0 = clock()
        candidate()
        t1 = clock()
        baseline()
        t2 = clock()
        tc.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(tc), statistics.median(tb)


def compare(
    candidate: Callable[[], Any],
    baseline: Callable[[], Any],
    *,
    repeat: int = 7,
    warmup: int = 2,
    target: float | None = None,
    target_kind: str = "<=",
    **extra: Any,
) -> dict[str, Any]:
    """Time ``candidate`` and ``baseline`` interleaved; return medians and ``ratio = candidate / baseline``.

    ``target`` (optional) is the ratio the issue asks for; ``target_kind`` is ``"<="`` (ratio at most) or
    ``">="`` (speed-up at least, i.e. ``baseline / candidate >= target``).
    """
    with torch.no_grad() if extra.pop("no_grad", False) else contextlib.nullcontext():
        for _ in range(warmup):
            candidate()
            baseline()
        mc, mb = interleaved_medians(candidate, baseline, repeat=repeat)
    out: dict[str, Any] = {
        "candidate_median_s": mc,
        "baseline_median_s": mb,
        "ratio": mc / mb,
        "speedup": mb / mc,
        "repeat": repeat,
    }
    if target is not None:
        value = out["ratio"] if target_kind == "<=" else out["speedup"]
        out["target"] = f"{'ratio' if target_kind == '<=' else 'speedup'} {target_kind} {target}"
        out["meets_target"] = bool(value <= target if target_kind == "<=" else value >= target)
    out.update(extra)
    return out

