"""Ormaniec et al. (2024): the σ-sweep machinery of the growth figures — Hutchinson block norms on
:func:`energy.hessian.sweep.sigma_sweep`, slope fits, curves and the shared plot/summary helpers (MATH §3.6–§3.7).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from energy.hessian.estimators import draw_probes
from energy.hessian.operators import HessianOperator
from energy.hessian.sweep import THEORY_EXPONENTS, Progress, fit_loglog_slope, sigma_sweep
from paper_figs.ormaniec2024.common import (
    DATA_SEED,
    DTYPE,
    EMBEDDING_SEED,
    PARTS,
    PROBE_SEED,
    SMALL_SIGMA_MAX,
    THEORY_RATES,
    ScoredPositions,
    addition_data,
    gpt2_model,
)
from paper_figs.registry import FigureConfig, measured
from unfold.data import addition_loss
from unfold.standard import GPT2Config

# ----------------------------------------------------------------------------------------------------------------------
# σ sweeps: Hutchinson block norms through the matrix-free operators, slope fits
# ----------------------------------------------------------------------------------------------------------------------


def sigma_grid(n: int, lo: float = -2.0, hi: float = 1.0) -> np.ndarray:
    """``10^linspace(lo, hi, n)`` (the protocol's grid is ``n = 20`` on ``[10⁻², 10¹]``, MATH §3.7)."""
    return np.logspace(lo, hi, n)


def loglog_slope(sigmas: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray,
                 max_sigma: float = SMALL_SIGMA_MAX
                 ) -> tuple[float, float, int]:
    r"""Least-squares slope ``p`` of ``log10 v = p log10 σ + b`` over ``σ ≤ max_sigma`` (positive finite ``v``).

    Returns:
        ``(p, standard error of p from the residuals, number of points)``; ``nan`` when fewer than 2 points
        (standard error ``nan`` with 2 points).
    """
    s, v = np.asarray(sigmas, dtype=float), np.asarray(values, dtype=float)
    keep = (s <= max_sigma * (1 + 1e-12)) & np.isfinite(v) & (v > 0)
    n = int(keep.sum())
    if n < 2:
        return math.nan, math.nan, n
    fit = fit_loglog_slope(s[keep], v[keep])
    return fit.slope, fit.stderr, n


def _curve(norms: np.ndarray, sigmas: np.ndarray) -> dict[str, Any]:
    """Mean/SE over initialisations (rows) and the fitted small-σ slope with its uncertainty.

    The slope is that of the mean curve; its uncertainty is the standard error over initialisations of the
    per-initialisation slopes (with one initialisation: the least-squares standard error).
    """
    n_inits = norms.shape[0]
    mean = norms.mean(axis=0)
    se = norms.std(axis=0, ddof=1) / math.sqrt(n_inits) if n_inits > 1 else np.zeros_like(mean)
    slope, ls_se, n_fit = loglog_slope(sigmas, mean)
    per_init = np.array([loglog_slope(sigmas, row)[0] for row in norms])
    finite = per_init[np.isfinite(per_init)]
    slope_se = float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1 else ls_se
    return {"norms": norms, "mean": mean, "se": se, "slope": slope, "slope_se": slope_se, "n_fit": n_fit}


@dataclasses.dataclass
class GrowthSweep:
    """Block norms against σ: ``norms[block][part]`` has shape ``(n_inits, n_sigma)``; parts ``H_o, H_f, H``."""

    sigmas: np.ndarray
    norms: dict[str, dict[str, np.ndarray]]

    def curves(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{block: {part: _curve(...)}}``."""
        return {b: {p: _curve(a, self.sigmas) for p, a in parts.items()} for b, parts in self.norms.items()}


def _rademacher(n: int, k: int, generator: torch.Generator) -> Tensor:
    """Rademacher probes from :func:`energy.hessian.estimators.draw_probes` (the one place probes are drawn)."""
    return draw_probes(n, k, generator=generator, dtype=DTYPE)


def growth_sweep(
    make_model: Callable[[int], nn.Module],
    blocks: dict[str, str],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    sigmas: np.ndarray,
    n_inits: int,
    n_samples: int,
    batch: int,
    seed: int,
    progress: Progress | bool = False,
    desc: str = "σ sweep",
) -> GrowthSweep:
    r"""Hutchinson Frobenius norms of diagonal Hessian blocks against the embedding scale σ (MATH §3.7).

    For every initialisation ``i`` (``make_model(seed + i)``) and every σ the embeddings are set to σ times one
    fixed standard-normal draw (common random numbers, see the module docstring) and, for each block ``a``,

    .. math:: \|A_{aa}\|_F \approx \Big(\frac1S \sum_{s=1}^S \|A_{aa} z_s\|^2\Big)^{1/2},\qquad
              A \in \{H_o = \mathrm{GGN},\ H_f = H - \mathrm{GGN},\ H\},

    (the estimator of :func:`energy.hessian.estimators.hutchinson_squared_frobenius`, evaluated here on products
    the three matrices share) with ``S`` Rademacher probes ``z_s`` (the same for every σ), from one shared pass of
    :meth:`energy.hessian.operators.CurvatureOperator.products` (``H_f`` and ``J z`` by one forward-over-reverse
    pass, ``GGN z = Jᵀ ∇²ℓ J z`` by the kept ``vjp``, ``H z = GGN z + H_f z``).

    Args:
        make_model: ``seed -> model`` (float64) with ``set_embedding_scale(σ, generator)``; returns outputs for
            ``loss_fn``.
        blocks: ``{label: parameter name}``.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch.
        sigmas: the σ grid (the embedding scales).
        n_inits: number of initialisations, ``make_model(seed + i)`` for ``i < n_inits``.
        n_samples: Rademacher probes ``S`` per block (drawn once per initialisation, the same for every σ).
        batch: number of additions in the one data batch (drawn with seed ``seed + DATA_SEED``).
        seed: base seed of the initialisations; the data, probe and embedding streams are offset from it by
            :data:`DATA_SEED`, :data:`PROBE_SEED` and :data:`EMBEDDING_SEED`.
        progress: ``progress(iterable, desc, total)`` wrapper (e.g. ``cfg.progress``).
        desc: progress-bar label.
    """
    data = [addition_data(batch, seed + DATA_SEED)]
    parts = tuple(part for part, _ in PARTS)
    per_init: dict[int, tuple[Any, dict[str, HessianOperator], dict[str, Tensor]]] = {}

    def norms_at(sigma: float, init: int) -> dict[str, float]:
        if init not in per_init:  # one model, its operators and its probes per initialisation (seed-major sweep)
            per_init.clear()
            model = make_model(init)
            probe_gen = torch.Generator().manual_seed(init + PROBE_SEED)
            ops = {b: HessianOperator(model, loss_fn, [name], data, reduction="mean") for b, name in blocks.items()}
            per_init[init] = (model, ops, {b: _rademacher(op.shape[0], n_samples, probe_gen) for b, op in ops.items()})
        model, ops, probes = per_init[init]
        model.set_embedding_scale(sigma, torch.Generator().manual_seed(init + EMBEDDING_SEED))
        out = {}
        for b, op in ops.items():
            products = op.products(probes[b], parts)
            for part, label in PARTS:
                out[f"{b}|{label}"] = float((products[part] ** 2).sum(0).mean().sqrt())
        return out

    res = sigma_sweep(norms_at, sigmas, n_inits, seeds=[seed + i for i in range(n_inits)], progress=progress,
                      desc=desc)
    norms = {b: {label: res.values[f"{b}|{label}"].T for _, label in PARTS} for b in blocks}
    return GrowthSweep(np.asarray(sigmas, dtype=float), norms)


def _guide_exponents(block: str, rates: dict[str, dict[str, int | None]]) -> dict[str, int | None]:
    return rates["VV" if block == "V" else "QQ"]


def _plot_grid(data: dict, title: str, *, blocks: Sequence[str] = ("V", "Q"),
               parts: Sequence[str] = ("H_o", "H_f", "H"), block_titles: dict[str, str] | None = None) -> Figure:
    """Rows = blocks, columns = parts; one line per series (mean, shaded ± SE over inits), dashed guides ``σ^p``."""
    sig = np.asarray(data["sigmas"])
    fig = Figure(figsize=(4.2 * len(parts), 3.4 * len(blocks)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(blocks), len(parts), squeeze=False))
    fit_max = data.get("fit_max", SMALL_SIGMA_MAX)
    for r, block in enumerate(blocks):
        for c, part in enumerate(parts):
            ax = axes[r, c]
            zero_labels, guides = [], set()
            for k, series in enumerate(data["series"]):
                cur = series["curves"][block][part]
                mean, se = np.asarray(cur["mean"], dtype=float), np.asarray(cur["se"], dtype=float)
                ok = np.isfinite(mean) & (mean > 0)
                color = f"C{k % 10}"
                if not ok.any():
                    zero_labels.append(series["label"])
                    continue
                lab = f"{series['label']}: slope {cur['slope']:.3f} ± {cur['slope_se']:.3f}"
                ax.plot(sig[ok], mean[ok], color=color, marker="osv^Dx"[k % 6], ms=3.5, lw=1.2, label=lab,
                        mfc="none" if k % 2 else color)
                lo = np.where(mean - se > 0, mean - se, mean)
                ax.fill_between(sig[ok], lo[ok], (mean + se)[ok], color=color, alpha=0.2, lw=0)
                p = series["guides"][block][part]
                if p is not None:
                    i0 = int(np.flatnonzero(ok)[0])
                    ax.plot(sig, mean[i0] * (sig / sig[i0]) ** p, ls="--", lw=0.9, color=color, alpha=0.7)
                    guides.add(p)
            if guides:
                ax.plot([], [], ls="--", color="0.4", label="dashed: " + ", ".join(rf"$\sigma^{{{p}}}$"
                                                                                  for p in sorted(guides)))
            if zero_labels:
                ax.text(0.03, 0.97, f"≡ 0 at every σ: {', '.join(zero_labels)}", transform=ax.transAxes,
                        fontsize=7, va="top")
            ax.axvspan(sig[0], fit_max, color="0.92", zorder=0)
            ax.set_xscale("log")
            ax.set_yscale("log")
            where = (block_titles or {}).get(block, rf"$(W_{block},W_{block})$")
            ax.set_title(rf"$\|{part}\|_F$ " + where, fontsize=10)
            ax.set_xlabel(r"embedding scale $\sigma$")
            ax.set_xlim(sig[0] / 1.3, sig[-1] * 1.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6.5, loc="lower right")
            else:
                ax.set_yticks([])
    fig.suptitle(title + "  (grey: small-σ fit window)", fontsize=11)
    return fig


def _add_free_slope(out: dict[str, Any], key: str, cur: Mapping[str, Any], note: str) -> None:
    """Record a curve's fitted small-σ slope (± its SE, no target) as ``out[key]``, when the fit is finite.

    A non-finite slope means the curve is identically 0 (e.g. a block-hollow ``H_f``): there is nothing to report.
    """
    if math.isfinite(cur["slope"]):
        out[key] = measured(cur["slope"], uncertainty=cur["slope_se"], note=note)


def _growth_summary(data: dict, targets: Mapping[str, Mapping[str, float]], tol: float, note: str,
                    series: Sequence[int] | None = None, relative: bool = False) -> dict[str, Any]:
    out = {}
    chosen = range(len(data["series"])) if series is None else series
    for k in chosen:
        s = data["series"][k]
        for block, parts in targets.items():
            for part, target in parts.items():
                cur = s["curves"][block][part]
                key = f"slope_{block}_{part}" + (f"_{s['key']}" if len(data["series"]) > 1 else "")
                tolerance = tol * abs(target) if relative else tol
                out[key] = measured(cur["slope"], target=float(target), tolerance=tolerance,
                                    uncertainty=cur["slope_se"], note=note)
    return out


def _gpt2_blocks(layers: Sequence[int]) -> dict[str, str]:
    return {f"{b}{layer}": f"model.blocks.{layer}.attn.W_{b}" for layer in layers for b in ("V", "Q")}


def _split_layers(sweep: GrowthSweep, layers: Sequence[int]) -> list[dict[str, Any]]:
    curves = sweep.curves()
    return [{"layer": layer, "curves": {b: curves[f"{b}{layer}"] for b in ("V", "Q")}} for layer in layers]


_PROTOCOL = (
    "5-digit addition, one batch of {batch} sequences, GPT-2 init, token and position embeddings redrawn "
    "N(0, σ²) for each σ (same seed for all σ within an initialisation: common random numbers) on "
    "10^linspace(-2, 1, {n_sigma}); {n_inits} initialisations (mean ± standard error); Hutchinson with "
    "{n_samples} Rademacher probes per block (the same for all σ); H_o = GGN, H_f = H − GGN. Float64. Slopes: "
    "least squares on the log–log mean curve for σ ≤ {fit_max}, uncertainty = standard error of the per-init slopes."
)


def _protocol(d: dict) -> str:
    return _PROTOCOL.format(**{k: d[k] for k in ("batch", "n_sigma", "n_inits", "n_samples", "fit_max")})


def _sizes(cfg: FigureConfig, *, width: tuple[int, int, int], batch: tuple[int, int, int],
           n_sigma: tuple[int, int, int], n_inits: tuple[int, int, int], n_samples: tuple[int, int, int]
           ) -> dict[str, int]:
    def pick(name: str, v: tuple[int, int, int]) -> int:
        return cfg.pick(tiny=v[0], quick=v[1], paper=v[2], key=name)

    return {"width": pick("width", width), "batch": pick("batch", batch), "n_sigma": pick("n_sigma", n_sigma),
            "n_inits": pick("n_inits", n_inits), "n_samples": pick("n_samples", n_samples)}


def _gpt2_growth(cfg: FigureConfig, sizes: dict[str, int], n_layers: int, desc: str, **config_kw: Any
                 ) -> tuple[GrowthSweep, dict[str, Any]]:
    w = sizes["width"]
    config = GPT2Config(d_model=w, n_layers=n_layers, d_mlp=4 * w, **config_kw)
    sigmas = sigma_grid(sizes["n_sigma"])
    sweep = growth_sweep(
        lambda s: ScoredPositions(gpt2_model(config, s)), _gpt2_blocks(range(n_layers)), addition_loss,
        sigmas=sigmas, n_inits=sizes["n_inits"], n_samples=sizes["n_samples"], batch=sizes["batch"],
        seed=cfg.seed, progress=cfg.progress, desc=desc,
    )
    meta = {**sizes, "d_mlp": 4 * w, "n_layers": n_layers, "sigmas": sigmas, "fit_max": SMALL_SIGMA_MAX,
            "config": dataclasses.asdict(config)}
    return sweep, meta


_SINGLE_TARGETS = {b: {p: e for p, e in THEORY_EXPONENTS[bb].items() if e is not None} for b, bb in (("V", "VV"),
                                                                                                     ("Q", "QQ"))}
_SOFTMAX_GUIDES = {b: _guide_exponents(b, THEORY_RATES) for b in ("V", "Q")}

# -- one layer ---------------------------------------------------------------------------------------------------------


