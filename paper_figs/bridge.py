r"""Beyond the papers: figures that connect the energy view (Yang et al. 2022) with the Hessian view (Ormaniec et al.).

- ``unfold-equivalence``: the energy's descent step against the standard layer it claims to be (MATH §1.1):
  ``nn.MultiheadAttention`` built by :func:`unfold.converters.to_standard` (with the key bias ``β`` as an additive
  mask) and the fused ``F.scaled_dot_product_attention`` path (:func:`energy.attention.attention_step_fused`),
  across sequence lengths ``n`` and widths ``d``, float32 and float64, for step (a) (identity values) and step (b)
  (values tied to the metric).
- ``unfold-hessian-comparison``: block Frobenius norms of the loss Hessian against the data scale ``σ`` (MATH §3.6)
  for the standard attention layer (``Q``, ``K``, ``V`` blocks, exact closed forms of
  :mod:`energy.hessian.structure`) beside the energy-derived layer (one matrix ``M``, steps (a) and (b), closed form
  of :mod:`energy.hessian.energy_layer`, MATH §4.2), with and without the LayerNorm projection of the input
  (:func:`energy.normalization.layernorm_projection`, MATH §1.4); log–log exponents fitted by
  :func:`energy.hessian.sweep.fit_loglog_slope`.
- ``unfold-energy-curvature`` (in :mod:`paper_figs.bridge_curvature`): along an untrained unrolled model, per layer,
  the largest step sizes that the majoriser guarantees against the step size the model uses, and whether each step
  actually lowered the energy.

Power counting for the energy-derived layer (small ``σ``, ``X = σX₀``, a fixed target ``Y``; ``s = 1/√k``). With
``p_j = Mᵀx_j ∝ σ`` the logits are ``T_ij = s(p_iᵀp_j − ½‖p_j‖²) ∝ σ²`` and their Jacobian ``𝒯 ∝ σ²``. Step (a),
``F = softmax_β(T) X``: ``J = Σ_j a_ij (x_j − μ_i) 𝒯_ijᵀ ∝ σ³`` so ``H_o ∝ σ⁶``; in ``H_f`` the term
``s Σ_i (x_i ρ_iᵀ + ρ_i x_iᵀ − Xᵀ diag(r_i) X) ⊗ I`` (the curvature of the logits, quadratic in ``M``, with
``r_ij ∝ σ``, ``ρ_i = Xᵀ r_i ∝ σ²``) is ``∝ σ³`` and dominates ``𝒯ᵀ C 𝒯 ∝ σ⁵``: ``H_f, H ∝ σ³`` — the role the
bilinear term ``G_QK ⊗ I`` plays in the standard ``(Q, K)`` block (MATH §3.6), because ``W = s M Mᵀ`` is quadratic in
``M``. Step (b), ``F = X(I − αW) + α A X W``: the skip path's Jacobian ``−α s (I ⊗ (Mᵀe_i)ᵀ + e_iᵀ ⊗ M)`` with
``e_i = x_i − μ_i ∝ σ`` gives ``H_o ∝ σ²`` (like the value block) and ``H_f ∝ σ`` (the term
``−α s Σ_i (g_i e_iᵀ + e_i g_iᵀ) ⊗ I``). After the LayerNorm projection the input no longer depends on ``σ``
(``Π(σX₀) = Π(X₀)`` for ``σ > 0``), so every exponent is 0. These are the targets of the summary; the figure
measures them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from energy.attention import AttentionEnergy, attention_step_fused
from energy.hessian.energy_layer import energy_layer_hessian
from energy.hessian.structure import block_norms
from energy.hessian.sweep import fit_loglog_slope
from energy.normalization import layernorm_projection
from paper_figs.registry import FigureConfig, figure, measured
from unfold.converters import EnergyStep, to_standard, verify_equivalence

__all__ = [
    "HESSIAN_SERIES",
    "equivalence_errors",
    "hessian_norms_at",
    "compute_equivalence",
    "compute_hessian_comparison",
]

DTYPE = torch.float64

# ----------------------------------------------------------------------------------------------------------------------
# unfold-equivalence
# ----------------------------------------------------------------------------------------------------------------------

EQUIV_BATCH = 2


def _rel(a: Tensor, b: Tensor) -> float:
    """``max|a − b| / max|b|``."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(b.dtype).tiny))


def equivalence_errors(n: int, d: int, dtype: torch.dtype, generator: torch.Generator) -> dict[str, float]:
    r"""Relative errors ``max|out − step| / max|step|`` of the standard layers against the energy's step.

    One draw: ``M ~ N(0, 1/√d)`` entries (``d × d``, so ``W = M Mᵀ/√d`` with ``E[W] = I``), tokens
    ``Y ~ N(0, I_d/d)`` (batch of :data:`EQUIV_BATCH`; ``z_ij = ½‖y_i − y_j‖²_W ≈ 1``, so the attention is neither
    uniform nor one-hot at any ``d``), drawn in float64 and cast to ``dtype``. Step (a) uses ``α = 1``;
    step (b) ``α = 1/λ_max(W)`` (inside its guaranteed range ``(0, 2/λ_max(W))``). The standard layer is
    ``nn.MultiheadAttention`` from :func:`unfold.converters.to_standard`, run through
    :func:`unfold.converters.verify_equivalence` (skip map plus the layer with ``β`` as additive mask; also the plain
    layer without ``β``); the fused path is :func:`energy.attention.attention_step_fused` (SDPA with the ``β``
    augmentation). Every output is compared, in ``dtype``, with :meth:`AttentionEnergy.step` in ``dtype``.
    """
    M64 = torch.randn(d, d, generator=generator, dtype=DTYPE) * d**-0.25
    Y64 = torch.randn(EQUIV_BATCH, n, d, generator=generator, dtype=DTYPE) / math.sqrt(d)
    M, Y = M64.to(dtype), Y64.to(dtype)
    energy = AttentionEnergy(M)
    lam_W = float(torch.linalg.eigvalsh(energy.W.to(DTYPE))[-1])
    out: dict[str, float] = {}
    for prec, alpha in (("metric", 1.0), ("token", 1.0 / lam_W)):
        tag = "a" if prec == "metric" else "b"
        step = EnergyStep(energy, alpha, prec)
        layer = to_standard(energy, preconditioner=prec)
        res = verify_equivalence(layer, step, Y)
        out[f"mha_{tag}"] = res["rel_err"]
        with torch.no_grad():
            target = energy.step(Y, alpha, preconditioner=prec)
            fused = attention_step_fused(Y, M, alpha, scale=energy.scale, preconditioner=prec)
        assert isinstance(fused, Tensor)  # without return_energy=True the fused path returns the step alone
        out[f"plain_{tag}"] = res["max_abs_err_without_key_bias"] / float(target.abs().max())
        out[f"sdpa_{tag}"] = _rel(fused, target)
    return out


def _equiv_caption(data: dict) -> str:
    return (
        "Relative error max|standard − step| / max|step| of the energy's descent step against the standard attention "
        "layer it reproduces (MATH §1.1), over sequence lengths n (x axis) and widths d (colours), float64 (solid) "
        "and float32 (dashed). Left: step (a) Y+ = (1 − α)Y + α softmax_β(Y W Yᵀ) Y (α = 1, identity values); "
        "middle: step (b) Y+ = Y(I − αW) + α softmax_β(Y W Yᵀ) Y W (values tied to W, α = 1/λ_max(W)). Standard "
        "layer: torch's nn.MultiheadAttention built by unfold.converters.to_standard, with the key bias "
        "β_j = −½‖y_j‖²_W passed as additive attn_mask; dotted with crosses: the same layer without β (a different "
        "map). Right: the fused path through F.scaled_dot_product_attention with the β augmentation (worse of "
        "steps (a), (b)). M has N(0, d^-1/2) entries (W = M Mᵀ/√d, E[W] = I), tokens N(0, I/d) (so "
        f"½‖y_i − y_j‖²_W ≈ 1), batch {EQUIV_BATCH}, seed {data['seed']}; each point is the maximum over "
        f"{data['repeats']} draws."
    )


@figure(
    "unfold-equivalence",
    description="Energy descent step vs nn.MultiheadAttention and SDPA: relative error over (n, d), float32/float64.",
    claim=(
        "The metric-preconditioned step (a) and the token-preconditioned step (b) of the attention energy are exactly "
        "a standard attention layer with constrained weights (W_Q W_Kᵀ = W PSD, values identity or tied to W) plus "
        "the key bias β (MATH §1.1): the difference is rounding error (float64 ≤ 1e-10); without β it is not."
    ),
    caption=_equiv_caption,
    paper_seed=0,
    version=2,
    single_thread=True,
)
def compute_equivalence(cfg: FigureConfig) -> dict[str, Any]:
    """:func:`equivalence_errors` over the ``(dtype, d, n)`` grid, worst of ``repeats`` draws per point."""
    ns = cfg.pick(tiny=[3, 8], quick=[4, 16, 64, 256], paper=[4, 16, 64, 256, 1024], key="n")
    ds = cfg.pick(tiny=[4, 8], quick=[8, 32, 128], paper=[8, 32, 128, 512], key="d")
    repeats = cfg.pick(tiny=1, quick=2, paper=5, key="repeats")
    g = torch.Generator().manual_seed(cfg.seed)
    rows = []
    grid = [(dt, d, n) for dt in ("float64", "float32") for d in ds for n in ns]
    for dt, d, n in cfg.progress(grid, "equivalence grid"):
        errs = [equivalence_errors(n, d, getattr(torch, dt), g) for _ in range(repeats)]
        rows.append({"dtype": dt, "d": d, "n": n, **{k: max(e[k] for e in errs) for k in errs[0]}})
    return {"ns": ns, "ds": ds, "repeats": repeats, "seed": cfg.seed, "rows": rows,
            "eps": {dt: float(torch.finfo(getattr(torch, dt)).eps) for dt in ("float32", "float64")}}


@compute_equivalence.plot
def plot_equivalence(data: dict, cfg: FigureConfig) -> Figure:
    fig = Figure(figsize=(14, 4.3), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    panels = (("mha_a", "plain_a", "step (a) vs nn.MultiheadAttention"),
              ("mha_b", "plain_b", "step (b) vs nn.MultiheadAttention"),
              ("sdpa_a", "sdpa_b", "fused SDPA path vs energy step"))
    for ax, (key, other, title) in zip(axes, panels):
        for ci, d in enumerate(data["ds"]):
            for dt, ls in (("float64", "-"), ("float32", "--")):
                rows = [r for r in data["rows"] if r["d"] == d and r["dtype"] == dt]
                n = [r["n"] for r in rows]
                if key.startswith("sdpa"):
                    err = [max(r[key], r[other]) for r in rows]
                else:
                    err = [r[key] for r in rows]
                ax.plot(n, err, ls, marker="o", ms=3, color=f"C{ci}", label=f"d={d}, {dt}")
                if not key.startswith("sdpa") and dt == "float64":
                    ax.plot(n, [r[other] for r in rows], ":", marker="x", ms=3, color=f"C{ci}", lw=1, alpha=0.6,
                            label=f"d={d}, without β (float64)")
        for dt, eps in data["eps"].items():
            ax.axhline(eps, color="0.8", lw=0.8)
            ax.text(data["ns"][0], eps * 1.4, f"{dt} eps", fontsize=7, color="0.5")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens n")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("max |out − step| / max |step|")
    axes[0].legend(fontsize=7, ncol=2, loc="center right", bbox_to_anchor=(1, 0.4))
    axes[2].legend(fontsize=7, ncol=2, loc="center right", bbox_to_anchor=(1, 0.4))
    fig.suptitle("Energy descent steps are standard attention layers (with the key bias β)")
    return fig


@compute_equivalence.summary
def summarize_equivalence(data: dict) -> dict[str, Any]:
    def worst(dt: str, keys: tuple[str, ...]) -> float:
        return max(r[k] for r in data["rows"] if r["dtype"] == dt for k in keys)

    exact = ("mha_a", "mha_b", "sdpa_a", "sdpa_b")
    return {
        "max_rel_err_float64": measured(worst("float64", exact), target=0.0, tolerance=1e-10,
                                        note="over the (n, d) grid, both steps, MHA and SDPA paths"),
        "max_rel_err_float32": measured(worst("float32", exact),
                                        note=f"float32 machine epsilon {data['eps']['float32']:.2g}"),
        "min_rel_err_without_beta_float64": measured(
            min(r[k] for r in data["rows"] if r["dtype"] == "float64" for k in ("plain_a", "plain_b")),
            note="the plain layer without the key bias: not the energy step (error far above rounding)",
        ),
    }


# ----------------------------------------------------------------------------------------------------------------------
# unfold-hessian-comparison
# ----------------------------------------------------------------------------------------------------------------------

#: (series name, expected exponents {part: p} at small σ without the projection) — module docstring, MATH §3.6
HESSIAN_SERIES: dict[str, dict[str, float]] = {
    "standard Q": {"H_o": 6.0, "H_f": 5.0, "H": 5.0},
    "standard K": {"H_o": 6.0, "H_f": 5.0, "H": 5.0},
    "standard V": {"H_o": 2.0, "H": 2.0},
    "energy M (a)": {"H_o": 6.0, "H_f": 3.0, "H": 3.0},
    "energy M (b, tied values)": {"H_o": 2.0, "H_f": 1.0, "H": 1.0},
}
PARTS = ("H_o", "H_f", "H")
SLOPE_TOL = 0.15


def hessian_norms_at(X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, Y: Tensor) -> dict[str, dict[str, float]]:
    r"""Frobenius norms ``{series: {part: ‖·‖_F}}`` of the loss Hessians at inputs ``X`` (float64, exact).

    Standard layer ``F = softmax(κ X W_Q W_Kᵀ Xᵀ) X W_V`` (MATH §3.1): diagonal blocks ``(Q,Q)``, ``(K,K)``,
    ``(V,V)`` by :func:`energy.hessian.structure.block_norms`. Energy-derived layer with ``M = W_Q`` (MATH §4.2):
    steps (a) and (b) with ``α = 1`` by :func:`energy.hessian.energy_layer.energy_layer_hessian`. Same loss
    ``ℓ = c Σ‖F − Y‖²``, ``c = 1/(L d)``.
    """
    std = block_norms(X, W_Q, W_K, W_V, Y, blocks=["QQ", "KK", "VV"])
    out = {f"standard {b[0]}": {p: std[(b, p)] for p in PARTS if not (b == "VV" and p == "H_f")}
           for b in ("QQ", "KK", "VV")}
    for name, tied in (("energy M (a)", False), ("energy M (b, tied values)", True)):
        parts = {p: energy_layer_hessian(X, W_Q, Y, alpha=1.0, tied=tied, part=p) for p in ("H_o", "H_f")}
        parts["H"] = parts["H_o"] + parts["H_f"]
        out[name] = {p: float(torch.linalg.matrix_norm(h)) for p, h in parts.items()}
    return out


def _hess_caption(data: dict) -> str:
    return (
        "Frobenius norms of the loss-Hessian blocks against the data scale σ (inputs X = σX₀), outer-product part "
        "H_o, functional part H_f and H = H_o + H_f, mean over "
        f"{data['n_init']} initialisations: the standard self-attention layer F = softmax(XW_QW_KᵀXᵀ/√d_K) X W_V "
        "(blocks (Q,Q), (K,K), (V,V); exact closed forms, MATH §3.4–3.5) and the energy-derived layer with one "
        "matrix M = W_Q (step (a) F = softmax_β(X W Xᵀ) X and step (b) with values tied to W, α = 1, W = M Mᵀ/√k; "
        "closed form of MATH §4.2, tested against torch.func.hessian). Solid: raw input; dashed: input "
        "through the LayerNorm projection Π(X) (MATH §1.4), which removes σ entirely. Loss c Σ‖F − Y‖², c = 1/(Ld), "
        f"target Y ~ N(0, I) fixed; B = {data['B']} sequences of L = {data['L']} tokens, d = d_K = {data['d']}, "
        "weights N(0, 1/d). Legend: log-log slope of the mean curve on σ ≤ "
        f"{data['fit_max']:g} (grey band; energy.hessian.sweep.fit_loglog_slope); summary ± = standard error of the "
        "per-initialisation slopes; targets: MATH §3.6 for the standard blocks, power counting (bridge.py docstring) "
        "for the energy-derived layer."
    )


@figure(
    "unfold-hessian-comparison",
    description="Hessian block norms vs data scale: standard attention (Q, K, V) beside the energy layer (M), +/- LN.",
    claim=(
        "MATH §4.2: the energy-derived layer has one matrix M; its Hessian inherits the quadratic dependence of "
        "W = M Mᵀ/√k (the bilinear term of the standard (Q,K) block) and scales like σ³ (step (a)) or σ (step (b), "
        "tied values), against σ² (V) and σ⁵–σ⁶ (Q, K) for the standard layer (MATH §3.6); the LayerNorm projection "
        "removes the σ-dependence."
    ),
    caption=_hess_caption,
    paper_seed=0,
    single_thread=True,
)
def compute_hessian_comparison(cfg: FigureConfig) -> dict[str, Any]:
    """:func:`hessian_norms_at` over the σ grid and several initialisations; log–log slopes at small σ."""
    B = cfg.pick(tiny=2, quick=4, paper=8, key="B")
    L = cfg.pick(tiny=4, quick=8, paper=16, key="L")
    d = cfg.pick(tiny=3, quick=6, paper=8, key="d")
    n_init = cfg.pick(tiny=2, quick=5, paper=20, key="n_init")
    sigmas = np.logspace(-2, 1, cfg.pick(tiny=7, quick=16, paper=31, key="n_sigma"))
    fit_max = 0.1
    g = torch.Generator().manual_seed(cfg.seed)
    runs: dict[tuple[str, str, str], list[list[float]]] = {}  # (projection, series, part) -> per init, per σ
    for _ in cfg.progress(range(n_init), "initialisations"):
        X0 = torch.randn(B, L, d, generator=g, dtype=DTYPE)
        Y = torch.randn(B, L, d, generator=g, dtype=DTYPE)
        W_Q, W_K, W_V = (torch.randn(d, d, generator=g, dtype=DTYPE) / math.sqrt(d) for _ in range(3))
        per: dict[tuple[str, str, str], list[float]] = {}
        for sigma in sigmas:
            X = float(sigma) * X0
            for proj, Xin in (("raw", X), ("layernorm", layernorm_projection(X))):
                for series, values in hessian_norms_at(Xin, W_Q, W_K, W_V, Y).items():
                    for part, v in values.items():
                        per.setdefault((proj, series, part), []).append(v)
        for key, vals in per.items():
            runs.setdefault(key, []).append(vals)
    small = sigmas <= fit_max * (1 + 1e-12)
    norms: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    slopes: dict[str, dict[str, dict[str, list[float]]]] = {}
    for (proj, series, part), per_run in runs.items():
        arr = np.asarray(per_run)  # (n_init, n_sigma)
        per_init = [fit_loglog_slope(sigmas[small], r[small]).slope for r in arr]
        mean_fit = fit_loglog_slope(sigmas[small], arr.mean(axis=0)[small]).slope
        se = float(np.std(per_init, ddof=1) / math.sqrt(len(per_init))) if len(per_init) > 1 else 0.0
        norms.setdefault(proj, {}).setdefault(series, {})[part] = arr.mean(axis=0)
        slopes.setdefault(proj, {}).setdefault(series, {})[part] = [mean_fit, se]
    return {"sigmas": sigmas, "fit_max": fit_max, "B": B, "L": L, "d": d, "n_init": n_init, "seed": cfg.seed,
            "norms": norms, "slopes": slopes}


@compute_hessian_comparison.plot
def plot_hessian_comparison(data: dict, cfg: FigureConfig) -> Figure:
    sig = np.asarray(data["sigmas"])
    fig = Figure(figsize=(15, 5), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, part in zip(axes, PARTS):
        for ci, series in enumerate(HESSIAN_SERIES):
            for proj, ls in (("raw", "-"), ("layernorm", "--")):
                vals = data["norms"][proj][series].get(part)
                if vals is None:
                    continue
                p, se = data["slopes"][proj][series][part]
                ax.plot(sig, vals, ls, color=f"C{ci}", marker="o" if proj == "raw" else None, ms=2.5,
                        label=f"{series}{' + LN proj.' if proj == 'layernorm' else ''}: slope {p:.2f}")
        ax.axvspan(sig[0], data["fit_max"], color="0.93", zorder=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("σ")
        ax.set_title({"H_o": "outer-product part $H_o$", "H_f": "functional part $H_f$", "H": "$H = H_o + H_f$"}[part])
        ax.legend(fontsize=6.5)
    axes[0].set_ylabel("Frobenius norm of the block")
    fig.suptitle("Loss-Hessian blocks vs data scale: standard attention (Q, K, V) and the energy-derived layer (M)")
    return fig


@compute_hessian_comparison.summary
def summarize_hessian_comparison(data: dict) -> dict[str, Any]:
    out = {}
    for series, targets in HESSIAN_SERIES.items():
        for part, target in targets.items():
            p, se = data["slopes"]["raw"][series][part]
            out[f"slope {series} {part}"] = measured(p, target=target, tolerance=SLOPE_TOL, uncertainty=se,
                                                     note=f"log-log fit on σ ≤ {data['fit_max']:g}")
    worst = max(abs(v[0]) for ss in data["slopes"]["layernorm"].values() for v in ss.values())
    out["max |slope| with LN projection"] = measured(
        worst, target=0.0, tolerance=1e-6, note="Π(σX) = Π(X): every block is constant in σ"
    )
    return out


#: Names of the ``unfold-energy-curvature`` figure, moved to :mod:`paper_figs.bridge_curvature` (alias for one release).
_MOVED_TO_CURVATURE = frozenset({
    "SWEEP_ALPHAS", "ROUNDOFF", "curvature_along_model", "compute_energy_curvature", "plot_energy_curvature",
    "summarize_energy_curvature",
})


def __getattr__(name: str) -> Any:
    """Deprecated access to the names that moved to :mod:`paper_figs.bridge_curvature`."""
    if name in _MOVED_TO_CURVATURE:
        warnings.warn(f"paper_figs.bridge.{name} moved to paper_figs.bridge_curvature.{name}; import it from there "
                      "(the alias goes in the next release)", DeprecationWarning, stacklevel=2)
        from paper_figs import bridge_curvature

        return getattr(bridge_curvature, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
