r"""Beyond the papers: the exact curvature of a whole multi-head Transformer block (MATH §5).

Two figures from the closed-form block Hessian (:func:`energy.hessian.block.block_hessian_parts`, MATH §5.3):

* ``block-growth`` — how the Frobenius norm of every diagonal parameter block (per head Q/K/V/O, LayerNorm γ/b,
  FFN W_1/b_1/W_2/b_2) of ``H``, ``H_o`` and ``H_f`` grows with the data scale σ (``X → σX``), for a block without
  LayerNorm, a Pre-LN block and a Post-LN block, against the exponents derived in :data:`THEORY_BLOCK`;
* ``block-heterogeneity`` — the dense Hessian of a Pre-LN multi-head block with an unembedding and cross-entropy as a
  heat map, its block norms, and the share of ``‖H‖²_F`` in cross-head and cross-sublayer blocks: the curvature
  outside what the single-head theory of Ormaniec et al. describes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from energy.hessian.block import BlockHessian, random_block
from energy.hessian.block import block_hessian_parts as _parts
from energy.hessian.sweep import fit_window, sigma_sweep
from paper_figs.io import decode_array, encode_array
from paper_figs.registry import FigureConfig, figure, measured

__all__ = ["THEORY_BLOCK", "GROUPS", "compute_block_growth", "compute_block_heterogeneity"]

DTYPE = torch.float64
#: LayerNorm ε of the figures: small enough that ``σ² var(x) ≫ ε`` on the whole σ grid (``σ ≥ 10⁻²``), the regime
#: in which the normalisation is scale invariant and the exponents below hold.
EPS = 1e-6
VARIANTS: tuple[str, ...] = ("none", "pre", "post")
_VARIANT_LABEL = {"none": "no LayerNorm", "pre": "Pre-LN", "post": "Post-LN"}
#: The parameter groups of the growth figure (head-aggregated), in plotting order.
GROUPS: tuple[str, ...] = ("Q", "K", "V", "O", "ln1.gamma", "ln1.beta", "ln2.gamma", "ln2.beta", "ffn.W_1",
                           "ffn.b_1", "ffn.W_2", "ffn.b_2")


def _zero_all(exponent: int) -> dict[str, int | None]:
    return {"H": exponent, "H_o": exponent, "H_f": exponent}


def _linear_output(exponent: int) -> dict[str, int | None]:
    """A parameter the loss input is affine in, with nothing downstream: ``H_f`` vanishes identically."""
    return {"H": exponent, "H_o": exponent, "H_f": None}


#: Small-σ exponents ``p`` with ``‖part(block)‖_F = Θ(σ^p)`` for a block with the square loss on its output
#: (MATH §5.3, derived in docs/MATH.md §5.5); ``None``: the part vanishes identically.
#:
#: * no LayerNorm: the attention's input is ``σX``, so its blocks keep the single-layer rates of MATH §3.6 (Q/K:
#:   ``H_o`` σ⁶, ``H_f`` σ⁵; V/O: σ², now with ``H_f ≠ 0`` from the FFN's curvature); ``∂Out/∂W_1 ∝ Z = O(σ)``
#:   gives σ²; ``W_2``, the biases see ``O(1)`` inputs: σ⁰.
#: * Pre-LN: ``LN₁(σX) = LN₁(X)`` and the residual ``σX → 0``: every block tends to a σ-free limit, σ⁰.
#: * Post-LN: ``LN₁`` is 0-homogeneous, so its Jacobian at ``S₁ = O(σ)`` is ``O(σ⁻¹)`` and its curvature
#:   ``O(σ⁻²)``: Q/K (``∂S₁/∂W_Q = O(σ³)``) give σ⁴ in every part, everything else σ⁰.
THEORY_BLOCK: dict[str, dict[str, dict[str, int | None]]] = {
    "none": {"Q": {"H": 5, "H_o": 6, "H_f": 5}, "K": {"H": 5, "H_o": 6, "H_f": 5}, "V": _zero_all(2),
             "O": _zero_all(2), "ffn.W_1": _zero_all(2), "ffn.b_1": _zero_all(0), "ffn.W_2": _linear_output(0),
             "ffn.b_2": _linear_output(0)},
    "pre": {**{g: _zero_all(0) for g in GROUPS}, "ffn.W_2": _linear_output(0), "ffn.b_2": _linear_output(0)},
    "post": {**{g: _zero_all(0) for g in GROUPS}, "Q": _zero_all(4), "K": _zero_all(4),
             "ln2.gamma": _linear_output(0), "ln2.beta": _linear_output(0)},
}
PARTS: tuple[str, ...] = ("H", "H_o", "H_f")


def _group_of(name: str) -> str:
    """The head-aggregated group of a block parameter name (``attn.h1.Q`` → ``Q``)."""
    return name.rsplit(".", 1)[-1] if name.startswith("attn.") else name


def _diagonal_norms(parts: dict[str, BlockHessian], per_head: bool) -> dict[str, float]:
    """``‖part(g, g)‖_F`` of every group ``g`` (head-aggregated: all heads' Q together, …) and, ``per_head``,
    of every single parameter; keys ``"<name>|<part>"``.
    """
    out: dict[str, float] = {}
    slices = parts["H"].slices()
    groups: dict[str, list[slice]] = {}
    for name, sl in slices.items():
        groups.setdefault(_group_of(name), []).append(sl)
        if per_head and name.startswith("attn."):
            groups[name.removeprefix("attn.")] = [sl]
    for group, sls in groups.items():
        idx = torch.cat([torch.arange(s.start, s.stop) for s in sls])
        for part, H in parts.items():
            out[f"{group}|{part}"] = float(torch.linalg.matrix_norm(H.matrix[idx][:, idx]))
    return out


@figure(
    "block-growth",
    description="Exact block Hessian vs data scale σ: per head and per sublayer, no LN, Pre-LN, Post-LN (MATH §5).",
    claim=(
        "Without LayerNorm the attention blocks of a whole Transformer block keep the single-layer rates (Q/K: H_o "
        "σ⁶, H_f and H σ⁵; V/O: σ²) and W_1 grows like σ²; Pre-LN makes every block σ-independent; Post-LN leaves "
        "σ⁴ in every part of the query/key blocks and σ⁰ elsewhere (MATH §5.5)."
    ),
    caption=lambda d: (
        f"Exact Frobenius norms of the diagonal blocks of H, H_o, H_f of one Transformer block (d = {d['d']}, "
        f"{d['heads']} heads of width {d['d_head']}, GELU FFN of width {d['d_ff']}, causal; LayerNorm ε = {EPS:g}), "
        f"square loss on the block output, random N(0, 1) inputs scaled by σ and fixed random targets, "
        f"B = {d['batch']} sequences of L = {d['seq_len']}; mean over {d['n_inits']} initialisations, heads "
        "aggregated per group. Closed form (energy.hessian.block_hessian_parts), float64. Dashed: the derived "
        "exponents σ^p (MATH §5.5) anchored at the smallest σ; parts that vanish identically are not drawn."
    ),
    paper_seed=0,
)
def compute_block_growth(cfg: FigureConfig) -> dict[str, Any]:
    """σ-sweeps of the block norms of the three block variants; slopes fitted on the small-σ window."""
    d = cfg.pick(tiny=8, quick=8, paper=32, key="d")
    heads = cfg.pick(tiny=2, quick=2, paper=4, key="heads")
    d_head = cfg.pick(tiny=4, quick=4, paper=8, key="d_head")
    d_ff = cfg.pick(tiny=16, quick=16, paper=128, key="d_ff")
    batch = cfg.pick(tiny=2, quick=4, paper=8, key="batch")
    seq_len = cfg.pick(tiny=4, quick=6, paper=16, key="seq_len")
    n_sigma = cfg.pick(tiny=5, quick=9, paper=13, key="n_sigma")
    n_inits = cfg.pick(tiny=1, quick=3, paper=5, key="n_inits")
    sigmas = np.logspace(-2, 0, n_sigma)
    series: dict[str, Any] = {}
    for variant in VARIANTS:
        cache: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}

        def fn(sigma: float, seed: int, variant: str = variant,
               cache: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = cache) -> dict[str, float]:
            if seed not in cache:
                g = torch.Generator().manual_seed(cfg.seed * 1000 + seed)
                block = random_block(d, heads, d_head, d_ff, norm=variant, vocab=None, loss="mse",  # type: ignore[arg-type]
                                     eps=EPS, generator=g)
                cache[seed] = (block, torch.randn(batch, seq_len, d, generator=g, dtype=DTYPE),
                               torch.randn(batch, seq_len, d, generator=g, dtype=DTYPE))
            block, X, Y = cache[seed]
            return _diagonal_norms(_parts(block, sigma * X, Y), per_head=True)

        sweep = sigma_sweep(fn, sigmas, n_inits, progress=lambda it, desc, total: cfg.progress(it, desc, total),
                            desc=f"block-growth {variant}")
        series[variant] = {"mean": {k: v.tolist() for k, v in sweep.mean.items()},
                           "stderr": {k: v.tolist() for k, v in sweep.stderr.items()},
                           "slopes": _slopes(sigmas, sweep.mean)}
    return {"sigmas": sigmas.tolist(), "series": series, "d": d, "heads": heads, "d_head": d_head, "d_ff": d_ff,
            "batch": batch, "seq_len": seq_len, "n_inits": n_inits}


def _slopes(sigmas: np.ndarray, mean: dict[str, np.ndarray]) -> dict[str, dict[str, float] | None]:
    """Small-σ slope (:func:`fit_window`) of every curve; ``None`` for a curve that is 0 to round-off."""
    out: dict[str, dict[str, float] | None] = {}
    scale = max(float(np.max(v)) for v in mean.values())
    for key, v in mean.items():
        if np.all(v <= 1e-12 * scale):  # identically zero parts sit at round-off for every σ
            out[key] = None
            continue
        w = fit_window(sigmas, v, min_points=4, tol=0.05)
        out[key] = {"slope": w.fit.slope, "stderr": w.fit.stderr, "points": int(len(w.indices))}
    return out


@compute_block_growth.plot
def plot_block_growth(data: dict, cfg: FigureConfig) -> Figure:
    """Rows H, H_o, H_f; columns no LN, Pre-LN, Post-LN: head-aggregated group norms vs σ, dashed theory."""
    fig = Figure(figsize=(13, 10), layout="constrained")
    axes = fig.subplots(3, 3, sharex=True)
    sig = np.asarray(data["sigmas"])
    shown = ("Q", "K", "V", "O", "ln1.gamma", "ffn.W_1", "ffn.W_2")
    colors = {g: f"C{i}" for i, g in enumerate(shown)}
    for col, variant in enumerate(VARIANTS):
        mean = data["series"][variant]["mean"]
        for row, part in enumerate(PARTS):
            ax = axes[row, col]
            for group in shown:
                key = f"{group}|{part}"
                if key not in mean:
                    continue
                v = np.asarray(mean[key])
                if np.all(v <= 0):
                    continue
                ax.loglog(sig, v, "o-", ms=3, color=colors[group], label=group)
                p = THEORY_BLOCK[variant].get(group, {}).get(part)
                if p is not None and v[0] > 0:
                    ax.loglog(sig, v[0] * (sig / sig[0]) ** p, "--", lw=0.8, color=colors[group])
            ax.set_title(f"{_VARIANT_LABEL[variant]}: {part}")
            if row == 2:
                ax.set_xlabel("σ")
            if col == 0:
                ax.set_ylabel("‖block‖_F")
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.suptitle("Exact block Hessian of a multi-head Transformer block vs data scale σ (dashed: derived σ^p)")
    return fig


@compute_block_growth.summary
def summarize_block_growth(data: dict) -> dict[str, Any]:
    """Each group's small-σ slope of ``H`` (and of the parts where they differ) against :data:`THEORY_BLOCK`."""
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        slopes = data["series"][variant]["slopes"]
        for group, theory in THEORY_BLOCK[variant].items():
            for part in PARTS:
                fit = slopes.get(f"{group}|{part}")
                target = theory.get(part)
                key = f"{variant}.{group}.{part}"
                if target is None:
                    out[key] = measured("zero" if fit is None else "nonzero", target="zero",
                                        note="part that vanishes identically")
                elif fit is not None:
                    out[key] = measured(fit["slope"], target=float(target), tolerance=0.2,
                                        uncertainty=fit["stderr"], note="small-σ log–log slope")
        heads = [k.split("|")[0] for k in slopes if k.startswith("h") and k.endswith(".Q|H")]
        per_head = [slopes[f"{h}|H"]["slope"] for h in heads if slopes.get(f"{h}|H")]
        if per_head:
            out[f"{variant}.per-head-Q-spread"] = measured(float(np.ptp(per_head)), note="max − min of the heads' "
                                                           "Q-block slopes (each head alone)")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Heterogeneity
# ----------------------------------------------------------------------------------------------------------------------

#: Categories of block pairs for the Frobenius shares (each ordered pair of parameter blocks falls in one).
CATEGORIES: tuple[str, ...] = ("within head", "across heads", "attention × other sublayers", "within a sublayer",
                               "across other sublayers")


def _sublayer(name: str) -> str:
    return name.split(".", 1)[0]


def _head(name: str) -> str:
    """``h1`` for ``attn.h1.Q`` / ``attn.h1.O``; K/V groups ``kv1`` count as head 1 (no grouped-query here)."""
    part = name.split(".")[1]
    return "h" + part.removeprefix("kv").removeprefix("h")


def _category(a: str, b: str) -> str:
    attn_a, attn_b = _sublayer(a) == "attn", _sublayer(b) == "attn"
    if attn_a and attn_b:
        return "within head" if _head(a) == _head(b) else "across heads"
    if attn_a or attn_b:
        return "attention × other sublayers"
    return "within a sublayer" if _sublayer(a) == _sublayer(b) else "across other sublayers"


def _shares(H: BlockHessian) -> dict[str, float]:
    """Share of ``‖H‖²_F`` per :data:`CATEGORIES`."""
    sl = H.slices()
    total = float((H.matrix**2).sum())
    out = dict.fromkeys(CATEGORIES, 0.0)
    for a, sa in sl.items():
        for b, sb in sl.items():
            out[_category(a, b)] += float((H.matrix[sa, sb] ** 2).sum()) / total
    return out


@figure(
    "block-heterogeneity",
    description="Closed-form Hessian of a multi-head Pre-LN block: heat map, block norms, cross-head/-sublayer share.",
    claim=(
        "The single-head theory describes only the within-head blocks; in a whole block a measurable share of the "
        "curvature sits across heads and across sublayers, and the cross-head blocks acquire a functional part "
        "(zero in a lone multi-head layer, MATH §5.1) through the downstream LayerNorm and FFN curvature."
    ),
    caption=lambda d: (
        f"log10(|H| + 1e-12) of the exact Hessian ({d['n_params']:,} parameters) of one Pre-LN block (d = {d['d']}, "
        f"{d['heads']} heads of width {d['d_head']}, GELU FFN of width {d['d_ff']}, unembedding to {d['vocab']} "
        f"classes, cross-entropy), at initialisation on B = {d['batch']} random N(0, 1) sequences of L = "
        f"{d['seq_len']} with random labels; max-pooled {d['pool']}×{d['pool']}; lines separate parameters. Right: "
        "Frobenius norms of the parameter blocks of H (log10). Closed form (energy.hessian.block_hessian_parts)."
    ),
    paper_seed=0,
)
def compute_block_heterogeneity(cfg: FigureConfig) -> dict[str, Any]:
    """The dense closed-form ``H``, ``H_o``, ``H_f`` of one Pre-LN block: pooled heat map, block norms, shares."""
    d = cfg.pick(tiny=8, quick=16, paper=24, key="d")
    heads = cfg.pick(tiny=2, quick=4, paper=4, key="heads")
    d_head = cfg.pick(tiny=4, quick=4, paper=6, key="d_head")
    d_ff = cfg.pick(tiny=16, quick=64, paper=96, key="d_ff")
    vocab = cfg.pick(tiny=6, quick=16, paper=32, key="vocab")
    batch = cfg.pick(tiny=2, quick=8, paper=16, key="batch")
    seq_len = cfg.pick(tiny=4, quick=8, paper=16, key="seq_len")
    g = torch.Generator().manual_seed(cfg.seed)
    block = random_block(d, heads, d_head, d_ff, norm="pre", vocab=vocab, loss="ce", eps=1e-5, generator=g)
    X = torch.randn(batch, seq_len, d, generator=g, dtype=DTYPE)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=g)
    parts = _parts(block, X, labels, max_gib=8.0)
    H = parts["H"]
    p = H.matrix.shape[0]
    pool = max(1, math.ceil(p / 400))
    from paper_figs.ormaniec2024.common import max_pool

    heat = max_pool(torch.log10(H.matrix.abs() + 1e-12), pool)
    names = [n for n, _ in H.params]
    sl = H.slices()
    norms = {part: [[float(torch.linalg.matrix_norm(M.matrix[sl[a], sl[b]])) for b in names] for a in names]
             for part, M in parts.items()}
    return {"heat": encode_array(heat.numpy()), "pool": pool, "names": names,
            "bounds": [sl[n].stop for n in names], "norms": norms,
            "shares": {part: _shares(M) for part, M in parts.items()},
            "frobenius": {part: float(torch.linalg.matrix_norm(M.matrix)) for part, M in parts.items()},
            "n_params": p, "d": d, "heads": heads, "d_head": d_head, "d_ff": d_ff, "vocab": vocab, "batch": batch,
            "seq_len": seq_len}


@compute_block_heterogeneity.plot
def plot_block_heterogeneity(data: dict, cfg: FigureConfig) -> Figure:
    """Left: pooled heat map with parameter boundaries; right: log10 block norms of H; bottom: the shares."""
    fig = Figure(figsize=(15, 6.5), layout="constrained")
    ax_heat, ax_norm, ax_share = fig.subplots(1, 3, width_ratios=[1.2, 1.0, 0.8])
    heat = decode_array(data["heat"])
    im = ax_heat.imshow(heat, cmap="magma", interpolation="nearest")
    for b in data["bounds"][:-1]:
        ax_heat.axhline(b / data["pool"] - 0.5, color="w", lw=0.3)
        ax_heat.axvline(b / data["pool"] - 0.5, color="w", lw=0.3)
    ax_heat.set_title(f"log10 |H| (max over {data['pool']}×{data['pool']} tiles)")
    fig.colorbar(im, ax=ax_heat, shrink=0.8)
    names = data["names"]
    N = np.log10(np.asarray(data["norms"]["H"]) + 1e-30)
    im2 = ax_norm.imshow(N, cmap="viridis")
    ax_norm.set_xticks(range(len(names)), [n.removeprefix("attn.") for n in names], rotation=90, fontsize=6)
    ax_norm.set_yticks(range(len(names)), [n.removeprefix("attn.") for n in names], fontsize=6)
    ax_norm.set_title("log10 ‖H_ab‖_F per parameter block")
    fig.colorbar(im2, ax=ax_norm, shrink=0.8)
    x = np.arange(len(CATEGORIES))
    for i, part in enumerate(PARTS):
        ax_share.bar(x + (i - 1) * 0.27, [data["shares"][part][c] for c in CATEGORIES], 0.27, label=part)
    ax_share.set_xticks(x, CATEGORIES, rotation=35, ha="right", fontsize=8)
    ax_share.set_ylabel("share of ‖·‖²_F")
    ax_share.set_yscale("log")
    ax_share.legend()
    ax_share.set_title("where the curvature sits")
    fig.suptitle("Exact Hessian of a multi-head Pre-LN Transformer block (closed form)")
    return fig


@compute_block_heterogeneity.summary
def summarize_block_heterogeneity(data: dict) -> dict[str, Any]:
    """The Frobenius shares (no paper value: the single-head theory covers only the within-head blocks)."""
    out: dict[str, Any] = {}
    for part in PARTS:
        for cat in CATEGORIES:
            out[f"{part}.{cat}"] = measured(data["shares"][part][cat], note=f"share of ‖{part}‖²_F")
    out["H_f.across heads.nonzero"] = measured(data["shares"]["H_f"]["across heads"] > 1e-12, target=True,
                                               note="cross-head H_f is 0 in a lone MHA layer, not in a block")
    out["H.outside single-head theory"] = measured(1.0 - data["shares"]["H"]["within head"] -
                                                   data["shares"]["H"]["within a sublayer"],
                                                   note="share of ‖H‖²_F in cross-head and cross-sublayer blocks")
    return out
