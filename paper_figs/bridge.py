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
- ``unfold-energy-curvature``: along an untrained unrolled model (:func:`unfold.presets.yang2022`), per layer, the
  largest step sizes that the majoriser guarantees (MATH §1.1 "Guarantee", :func:`majoriser_step_bound`) and the
  local preconditioned curvature of the true token-space Hessian (MATH §4.1, :func:`preconditioned_curvature`)
  against the step size the model uses (``α = 1``), and whether each step actually lowered the energy.

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

from energy._validation import StepSizeWarning
from energy.attention import AttentionEnergy, attention_step_fused
from energy.hessian.energy_curvature import majoriser_step_bound, preconditioned_curvature
from energy.hessian.energy_layer import energy_layer_hessian
from energy.hessian.structure import block_norms
from energy.hessian.sweep import fit_loglog_slope
from energy.normalization import layernorm_projection
from paper_figs.registry import FigureConfig, figure, measured
from paper_figs.yang2022_text import DEPTH, bundled_text_sentences, make_model, single_thread
from unfold.converters import EnergyStep, to_standard, verify_equivalence
from unfold.data import build_vocabulary, embed_sentences, seeded_embedding_table

__all__ = [
    "equivalence_errors",
    "hessian_norms_at",
    "curvature_along_model",
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
)
def compute_equivalence(cfg: FigureConfig) -> dict[str, Any]:
    with single_thread():  # small operations: see paper_figs.yang2022_text.single_thread
        return _compute_equivalence(cfg)


def _compute_equivalence(cfg: FigureConfig) -> dict[str, Any]:
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
)
def compute_hessian_comparison(cfg: FigureConfig) -> dict[str, Any]:
    with single_thread():  # small operations: see paper_figs.yang2022_text.single_thread
        return _compute_hessian_comparison(cfg)


def _compute_hessian_comparison(cfg: FigureConfig) -> dict[str, Any]:
    B = cfg.pick(tiny=2, quick=4, paper=8, key="B")
    L = cfg.pick(tiny=4, quick=8, paper=16, key="L")
    d = cfg.pick(tiny=3, quick=6, paper=8, key="d")
    n_init = cfg.pick(tiny=2, quick=5, paper=20, key="n_init")
    sigmas = np.logspace(-2, 1, cfg.pick(tiny=7, quick=16, paper=31, key="n_sigma"))
    fit_max = 0.1
    g = torch.Generator().manual_seed(cfg.seed)
    norms: dict[str, dict[str, dict[str, list[list[float]]]]] = {}
    for _ in cfg.progress(range(n_init), "initialisations"):
        X0 = torch.randn(B, L, d, generator=g, dtype=DTYPE)
        Y = torch.randn(B, L, d, generator=g, dtype=DTYPE)
        W_Q, W_K, W_V = (torch.randn(d, d, generator=g, dtype=DTYPE) / math.sqrt(d) for _ in range(3))
        per: dict[str, dict[str, dict[str, list[float]]]] = {}
        for sigma in sigmas:
            X = float(sigma) * X0
            for proj, Xin in (("raw", X), ("layernorm", layernorm_projection(X))):
                for series, parts in hessian_norms_at(Xin, W_Q, W_K, W_V, Y).items():
                    for part, v in parts.items():
                        per.setdefault(proj, {}).setdefault(series, {}).setdefault(part, []).append(v)
        for proj, ss in per.items():
            for series, parts in ss.items():
                for part, vals in parts.items():
                    norms.setdefault(proj, {}).setdefault(series, {}).setdefault(part, []).append(vals)
    small = sigmas <= fit_max * (1 + 1e-12)
    slopes: dict[str, dict[str, dict[str, list[float]]]] = {}
    for proj, ss in norms.items():
        for series, parts in ss.items():
            for part, runs in parts.items():
                arr = np.asarray(runs)  # (n_init, n_sigma)
                per_init = [fit_loglog_slope(sigmas[small], r[small]).slope for r in arr]
                mean_fit = fit_loglog_slope(sigmas[small], arr.mean(axis=0)[small]).slope
                se = float(np.std(per_init, ddof=1) / math.sqrt(len(per_init))) if len(per_init) > 1 else 0.0
                slopes.setdefault(proj, {}).setdefault(series, {})[part] = [mean_fit, se]
    return {"sigmas": sigmas, "fit_max": fit_max, "B": B, "L": L, "d": d, "n_init": n_init, "seed": cfg.seed,
            "norms": {p: {s: {q: np.asarray(v).mean(axis=0) for q, v in parts.items()} for s, parts in ss.items()}
                      for p, ss in norms.items()},
            "slopes": slopes}


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


# ----------------------------------------------------------------------------------------------------------------------
# unfold-energy-curvature
# ----------------------------------------------------------------------------------------------------------------------


#: step sizes of the sweep in ``unfold-energy-curvature`` (the model itself uses α = 1)
SWEEP_ALPHAS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0)


@torch.no_grad()
def curvature_along_model(
    model: Any, sequences: list[Tensor], alphas: tuple[float, ...] = ()
) -> dict[str, np.ndarray]:
    r"""Per layer ``ℓ`` and sequence ``b``, at the state ``Y`` entering the attention step of layer ``ℓ``:

    - ``bound_a = 2/λ_max(N)``, ``bound_b = 2/(λ_max(N) λ_max(W))``: the largest step sizes for which steps (a)/(b)
      are guaranteed to descend (MATH §1.1, :func:`majoriser_step_bound`);
    - ``lam_true``, ``lam_true_min``, ``lam_maj``: extreme eigenvalues of the metric-preconditioned true Hessian
      ``(D ⊗ W)^{-1/2} ∇²E_att (D ⊗ W)^{-1/2}`` and ``λ_max`` of the majoriser's (MATH §4.1,
      :func:`preconditioned_curvature`);
    - the change of ``E_att`` made by the attention step, of ``E_ffn`` made by the FFN step, and of the total
      energy ``E_att + E_ffn`` made by each step (attention, FFN, ReLU), from the unroller's trace.

    - ``spread = ‖Y − 1ȳᵀ‖_F / ‖Y‖_F``: how far the tokens are from coinciding (0: all tokens equal, where
      ``E_att`` is at its minimum and every attention step is the identity);
    - ``up_a``, ``up_b`` of shape ``(depth, N, len(alphas))``: whether step (a) / (b) of the layer's attention
      energy with step size ``alphas[m]`` (instead of the model's) would have *increased* ``E_att`` (by more than
      ``1e-12·|E_att|``) — the sweep that shows where the guarantee is only sufficient and where descent fails.

    Other arrays have shape ``(depth, N)``. Single-head model, one sequence at a time (no padding).
    """
    body = model.body
    kinds = body.step_kinds
    S = len(kinds)
    depth = body.depth
    keys = ("bound_a", "bound_b", "lam_true", "lam_true_min", "lam_maj", "alpha", "spread")
    out = {k: np.zeros((depth, len(sequences))) for k in keys}
    for kind in kinds:
        out[f"dE_total_{kind}"] = np.zeros((depth, len(sequences)))
    out["dE_att_attention"] = np.zeros((depth, len(sequences)))
    out["dE_ffn_ffn"] = np.zeros((depth, len(sequences)))
    out["up_a"] = np.zeros((depth, len(sequences), len(alphas)), dtype=bool)
    out["up_b"] = np.zeros((depth, len(sequences), len(alphas)), dtype=bool)
    for b, seq in enumerate(sequences):
        _, info = body(model.embed(seq.unsqueeze(0).to(DTYPE)), trace=True)
        E = {k: v[:, 0].numpy() for k, v in info["energies"].items()}
        for ell in range(depth):
            att = body.layer(ell)[kinds.index("attention")]
            energy = att.build()
            Y = info["states"][ell * S][0]
            out["alpha"][ell, b] = float(att.alpha)
            out["spread"][ell, b] = float(torch.linalg.norm(Y - Y.mean(0)) / torch.linalg.norm(Y).clamp_min(1e-300))
            out["bound_a"][ell, b] = majoriser_step_bound(energy, Y, "metric")
            out["bound_b"][ell, b] = majoriser_step_bound(energy, Y, "token")
            curv = preconditioned_curvature(energy, Y, "metric")
            out["lam_true"][ell, b], out["lam_true_min"][ell, b] = curv["true"], curv["true_min"]
            out["lam_maj"][ell, b] = curv["majoriser"]
            E0 = energy.energy(Y)
            with warnings.catch_warnings():  # steps beyond the guaranteed range are the point of the sweep
                warnings.simplefilter("ignore", StepSizeWarning)
                for m, a in enumerate(alphas):
                    for prec, key in (("metric", "up_a"), ("token", "up_b")):
                        E1 = energy.energy(energy.step(Y, a, preconditioner=prec))
                        out[key][ell, b, m] = bool(E1 - E0 > 1e-12 * abs(float(E0)))
            for j, kind in enumerate(kinds):
                t = ell * S + j
                out[f"dE_total_{kind}"][ell, b] = E["total"][t + 1] - E["total"][t]
                if kind == "attention":
                    out["dE_att_attention"][ell, b] = E["E_att"][t + 1] - E["E_att"][t]
                if kind == "ffn":
                    out["dE_ffn_ffn"][ell, b] = E["E_ffn"][t + 1] - E["E_ffn"][t]
    return out


def _curv_caption(data: dict) -> str:
    return (
        f"Along a freshly initialised weight-tied unfolded model (unfold.presets.yang2022, d = {data['d']}, 12 "
        "layers, attention step (a) with α = 1, FFN step with W_f spectrum in [0, 0.95]; top row with the ReLU "
        "projection, bottom row without it, the same weights), at the state entering each layer's attention step. "
        "First column: the largest step sizes with guaranteed descent of E_att from the MM majoriser, 2/λ_max(N) for "
        "the step (a) the model takes and 2/(λ_max(N)λ_max(W)) for step (b) (had the model used the token "
        "preconditioner), and 2/λ_max of the metric-preconditioned true token-space Hessian (the step at which a "
        "quadratic model stops descending along its top mode; MATH §4.1); median with min–max band over the "
        "sequences; black: the step size α = 1 used. Second column: share of sequences in which each step lowered "
        "its own energy term and the total E_att + E_ffn. Third and fourth columns: the same states stepped with the "
        "attention energy's step (a) or (b) at the step sizes α of a sweep: share of sequences in which E_att "
        "increased, with the median guaranteed bound (dashed); below the bound no increase is possible. Inputs: "
        f"{data['description']}."
    )


@figure(
    "unfold-energy-curvature",
    description="Preconditioned token-space curvature and guaranteed step sizes per layer of an unrolled model vs α.",
    claim=(
        "MATH §1.1/§4.1: step (a) with the Gaussian kernel descends E_att for every α < 2/λ_max(N), and λ_max(N) ≤ 1, "
        "so α = 1 is always safe for its own term; step (b) needs α λ_max(N) λ_max(W) ≤ 2. Descent on each term "
        "does not imply descent on E_att + E_ffn (MATH §1.6)."
    ),
    caption=_curv_caption,
    paper_seed=2333,
    version=3,
)
def compute_energy_curvature(cfg: FigureConfig) -> dict[str, Any]:
    with single_thread():  # small operations: see paper_figs.yang2022_text.single_thread
        return _compute_energy_curvature(cfg)


def _compute_energy_curvature(cfg: FigureConfig) -> dict[str, Any]:
    d = cfg.pick(tiny=4, quick=12, paper=16, key="d")
    n_seq = cfg.pick(tiny=3, quick=12, paper=32, key="n_sequences")
    max_len = cfg.pick(tiny=5, quick=10, paper=12, key="max_len")
    sentences, text = bundled_text_sentences()
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(sentences), generator=g)[:n_seq].sort().values.tolist()
    chosen = [sentences[i] for i in idx]
    table = seeded_embedding_table(sorted(build_vocabulary(chosen)), d, cfg.seed, std=1.0, dtype=DTYPE)
    Yall, lengths = embed_sentences(chosen, table, max_len)
    sequences = [Yall[b, : int(lengths[b])] for b in range(len(chosen)) if int(lengths[b]) >= 2]
    alphas = cfg.pick(tiny=(0.5, 1.0, 3.0, 8.0), quick=SWEEP_ALPHAS, paper=SWEEP_ALPHAS, key="alphas")
    models = []
    for relu in (True, False):  # the same initial weights (make_model draws them from the seed)
        model = make_model(d, relu=relu, seed=cfg.seed).double()
        models.append({"relu": relu, **curvature_along_model(model, sequences, alphas)})
    return {"d": d, "alphas": alphas, "depth": DEPTH, "seed": cfg.seed, "n_sequences": len(sequences),
            "description": (f"{len(sequences)} sentences of {text} (first {max_len} tokens), embedded with a seeded "
                            f"N(0, 1) table (token norm ≈ √d), seed {cfg.seed}"),
            "models": models}


@compute_energy_curvature.plot
def plot_energy_curvature(data: dict, cfg: FigureConfig) -> Figure:
    fig = Figure(figsize=(22, 9), layout="constrained")
    axes = fig.subplots(2, 4)
    for row, m in zip(axes, data["models"]):
        name = "with ReLU" if m["relu"] else "without ReLU"
        _plot_bounds(row[0], m, f"{name}: largest guaranteed step sizes vs the step size used")
        _plot_descent(row[1], m, f"{name}: did the model's steps lower the energy?")
        for ax, key, bound, step in ((row[2], "up_a", "bound_a", "(a)"), (row[3], "up_b", "bound_b", "(b)")):
            _plot_sweep(ax, m, np.asarray(data["alphas"]), key, bound,
                        f"{name}: step {step} with step size α:\nshare of sequences where E_att increased")
    fig.suptitle(f"Unrolled model (d = {data['d']}, untrained): token-space curvature of the attention energy, "
                 "per layer")
    return fig


def _plot_bounds(ax: Any, m: dict, title: str) -> None:
    t = np.arange(len(m["alpha"]))
    series = (("bound_a", "2/λ_max(N): step (a) guaranteed", "C0"),
              ("bound_b", "2/(λ_max(N)λ_max(W)): step (b) guaranteed", "C1"),
              ("lam_true", "2/λ_max(true preconditioned Hessian)", "C2"))
    for key, label, color in series:
        v = np.asarray(m[key])
        v = 2.0 / v if key == "lam_true" else v
        ax.plot(t, np.median(v, axis=1), "o-", color=color, ms=3, label=label)
        ax.fill_between(t, v.min(axis=1), v.max(axis=1), color=color, alpha=0.2)
    ax.plot(t, np.asarray(m["alpha"])[:, 0], "k-", lw=2, label="α used by the model (step (a))")
    ax.set_yscale("log")
    ax.set_xlabel("layer ℓ")
    ax.set_ylabel("step size")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def _plot_descent(ax: Any, m: dict, title: str) -> None:
    t = np.arange(len(m["alpha"]))
    bars = [(k, lab) for k, lab in (("dE_att_attention", "attention step: E_att"),
                                    ("dE_total_attention", "attention step: total"),
                                    ("dE_ffn_ffn", "FFN step: E_ffn"), ("dE_total_ffn", "FFN step: total"),
                                    ("dE_total_relu", "ReLU: total")) if k in m]
    width = 0.8 / len(bars)
    for i, (key, label) in enumerate(bars):
        frac = (np.asarray(m[key]) <= 0).mean(axis=1)
        ax.bar(t + (i - len(bars) / 2 + 0.5) * width, frac, width, label=label, color=f"C{i}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer ℓ")
    ax.set_ylabel("share of sequences with ΔE ≤ 0")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")


def _plot_sweep(ax: Any, m: dict, alphas: np.ndarray, key: str, bound: str, title: str) -> None:
    depth = len(m["alpha"])
    frac = np.asarray(m[key], dtype=float).mean(axis=1)  # (depth, n_alpha)
    im = ax.imshow(frac.T, origin="lower", aspect="auto", cmap="Reds", vmin=0, vmax=1,
                   extent=(-0.5, depth - 0.5, -0.5, len(alphas) - 0.5))
    idx = np.arange(len(alphas))
    med = np.median(np.asarray(m[bound]), axis=1)  # drawn on the α-index axis by interpolation
    ax.plot(np.arange(depth), np.interp(med, alphas, idx, left=-0.5, right=len(alphas) - 0.5), "b--", lw=1.5,
            label="median guaranteed bound")
    ax.axhline(float(np.interp(1.0, alphas, idx)), color="k", lw=1, label="α = 1")
    ax.set_yticks(idx, [f"{a:g}" for a in alphas])
    ax.set_xlabel("layer ℓ")
    ax.set_ylabel("step size α of the sweep")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.figure.colorbar(im, ax=ax, shrink=0.8)


@compute_energy_curvature.summary
def summarize_energy_curvature(data: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in data["models"]:
        out.update(_curvature_summary(m, np.asarray(data["alphas"]), "relu" if m["relu"] else "norelu"))
    return out


#: energy changes below this (absolute; the energies here are O(1–100)) count as float64 round-off, not increases
ROUNDOFF = 1e-9


def _curvature_summary(m: dict, alphas: np.ndarray, tag: str) -> dict[str, Any]:
    alpha = np.asarray(m["alpha"])
    bound_a, bound_b = np.asarray(m["bound_a"]), np.asarray(m["bound_b"])
    lam_true, lam_maj = np.asarray(m["lam_true"]), np.asarray(m["lam_maj"])
    n = alpha.size
    up_a, up_b = np.asarray(m["up_a"], dtype=bool), np.asarray(m["up_b"], dtype=bool)
    within = int((up_a & (alphas <= bound_a[..., None])).sum() + (up_b & (alphas <= bound_b[..., None])).sum())
    first_a = float(alphas[up_a.any(axis=(0, 1))].min()) if up_a.any() else None
    first_b = float(alphas[up_b.any(axis=(0, 1))].min()) if up_b.any() else None

    def count_up(key: str) -> int:
        """Increases larger than float64 round-off: at collapsed states (all tokens equal) E_att sits at its minimum
        −n(n−1)/2 and the step is the identity, so recomputing it moves the last digits either way."""
        return int((np.asarray(m[key]) > ROUNDOFF).sum()) if key in m else 0

    out = {
        "min_bound_(a)": measured(float(bound_a.min()), note="smallest 2/λ_max(N) over layers and sequences; "
                                  "theory (Γ ⪰ 0 ⇒ λ_max(N) ≤ 1): ≥ 2"),
        "alpha_within_bound_(a)": measured(bool((alpha <= bound_a).all()), target=True,
                                           note="α = 1 guaranteed for step (a) at every layer and sequence"),
        "share_alpha_beyond_bound_(b)": measured(float((alpha > bound_b).mean()),
                                                 note="where α = 1 would not be guaranteed for the token step (b)"),
        "max_true_over_majoriser_curvature": measured(
            float((lam_true / lam_maj).max()), note="true preconditioned λ_max / majoriser λ_max; theory: ≤ 1"),
        "E_att_increases_by_attention_step": measured(
            count_up("dE_att_attention"), target=0, tolerance=0,
            note=f"out of {n} (layer, sequence) pairs; increases > {ROUNDOFF:g} (smaller: round-off)"),
        "E_ffn_increases_by_ffn_step": measured(count_up("dE_ffn_ffn"), target=0, tolerance=0,
                                                note=f"out of {n}; α = 1 < 2/λ_max(I + W_f)"),
        "total_increases_by_attention_step": measured(count_up("dE_total_attention"), note=f"out of {n}"),
        "total_increases_by_ffn_step": measured(count_up("dE_total_ffn"), note=f"out of {n}"),
        "median_token_spread_per_layer": measured(
            [float(f"{v:.3g}") for v in np.median(np.asarray(m["spread"]), axis=1)],
            note="‖Y − mean token‖_F / ‖Y‖_F entering each layer (0: tokens coincide)",
        ),
        "sweep_increases_within_guarantee": measured(
            within, target=0, tolerance=0,
            note="(layer, sequence, α) of the sweep with α ≤ the majoriser bound where E_att increased, steps (a)+(b)",
        ),
        "sweep_smallest_alpha_increasing_(a)": measured(first_a, note="smallest α of the sweep at which step (a) "
                                                        "increased E_att somewhere (None: never)"),
        "sweep_smallest_alpha_increasing_(b)": measured(first_b, note="the same for step (b)"),
    }
    if "dE_total_relu" in m:
        out["total_increases_by_relu"] = measured(count_up("dE_total_relu"), note=f"out of {n}")
    return {f"{tag}: {k}": v for k, v in out.items()}
