"""Ormaniec et al. (2024): the heterogeneity heat map and the softmax vs linear attention histograms (MATH §3.7)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from paper_figs.io import decode_array, encode_array
from paper_figs.ormaniec2024.common import (
    DATA_SEED,
    HEATMAP_EPS,
    _attention_names,
    _block_histograms,
    _ratio,
    addition_data,
    dense_loss_hessian,
    gpt2_model,
    heterogeneity_config,
    max_pool,
    natural_order,
    parameter_groups,
)
from paper_figs.registry import FigureConfig, figure, measured
from unfold.data import addition_loss


@figure(
    "ormaniec2024-heterogeneity",
    description="Ormaniec et al. 2024 Fig 1: dense loss Hessian of a one-block GPT-2 (width 16) and |entries| of "
    "its exact query and value blocks.",
    claim=(
        "The Hessian of a Transformer is block-heterogeneous: the entries of the query block H(W_Q,W_Q) are orders "
        "of magnitude smaller than those of the value block H(W_V,W_V) (MATH §3.7, Fig 1)."
    ),
    caption=lambda d: (
        f"Left: log10(|H| + 1e-6) of the dense loss Hessian ({d['n_params']:,} parameters: embeddings, W_Q, W_K, "
        f"W_V, W_O, MLP, unembedding with bias) of a one-block GPT-2-style model (d_model = d_head = {d['d_model']}, "
        f"d_mlp = {4 * d['d_model']}, one head, causal softmax attention, no LayerNorm, GPT-2 init) at "
        f"initialisation, cross-entropy over the 6 answer positions of one batch of {d['batch']} 5-digit additions; "
        f"each pixel is the maximum over a {d['pool_full']}×{d['pool_full']} tile. Middle: the attention part "
        f"(W_Q, W_K, W_V, W_O; {d['n_attention_params']:,} parameters, tiles {d['pool_attn']}×{d['pool_attn']}). "
        "Right: log-binned histograms of the absolute entries of the exact blocks H(W_Q,W_Q) and H(W_V,W_V) (from "
        "the same dense matrix). Float64, Hessian-vector products of the identity (torch.func forward-over-reverse)."
    ),
    paper_seed=0,
)
def compute_heterogeneity(cfg: FigureConfig) -> dict[str, Any]:
    """Dense loss Hessian of a one-block GPT-2 (width 16): max-pooled log heat maps, exact (Q,Q), (V,V) block data."""
    batch = cfg.pick(tiny=2, quick=16, paper=64, key="batch")
    d = cfg.pick(tiny=16, quick=16, paper=16, key="d_model")
    model = gpt2_model(heterogeneity_config(d), cfg.seed)
    tokens, targets = addition_data(batch, cfg.seed + DATA_SEED)
    order = natural_order(model)
    H = dense_loss_hessian(model, addition_loss, tokens, targets, order)
    groups = parameter_groups(model, order)
    where = {g["name"]: slice(g["start"], g["stop"]) for g in groups}
    names = _attention_names()
    attn = slice(where[names["Q"]].start, where[names["O"]].stop)
    logH = torch.log10(H.abs() + HEATMAP_EPS)
    pool_full = max(1, math.ceil(H.shape[0] / 960))
    pool_attn = max(1, math.ceil((attn.stop - attn.start) / 512))
    blocks = {k: H[where[names[k]], where[names[k]]] for k in ("Q", "V")}
    return {
        "n_params": H.shape[0],
        "d_model": d,
        "n_attention_params": attn.stop - attn.start,
        "batch": batch,
        "groups": groups,
        "attention_range": [attn.start, attn.stop],
        "pool_full": pool_full,
        "pool_attn": pool_attn,
        "log_full": encode_array(max_pool(logH, pool_full).to(torch.float16)),
        "log_attention": encode_array(max_pool(logH[attn, attn], pool_attn).to(torch.float16)),
        "symmetry_error": float((H - H.T).abs().max()),
        "max_abs": float(H.abs().max()),
        "histograms": _block_histograms(blocks),
        "frobenius": {k: float(v.norm()) for k, v in blocks.items()},
    }


def _short(name: str) -> str:
    return {
        "token_embedding.weight": "E", "position_embedding.weight": "P", "W_U": "W_U", "b_U": "b_U",
    }.get(name, name.split(".")[-1])


def _draw_heatmap(ax, img: np.ndarray, groups: list[dict], offset: int, pool: int, fig: Figure, title: str) -> None:
    n = img.shape[0] * pool
    im = ax.imshow(img.astype(np.float64), cmap="viridis", extent=(0, n, n, 0), interpolation="nearest")
    ticks, labels = [], []
    for g in groups:
        a, b = g["start"] - offset, g["stop"] - offset
        if b <= 0 or a >= n:
            continue
        if a > 0:
            ax.axhline(a, color="w", lw=0.4)
            ax.axvline(a, color="w", lw=0.4)
        ticks.append((max(a, 0) + min(b, n)) / 2)
        labels.append(_short(g["name"]))
    ax.set_xticks(ticks, labels, rotation=90, fontsize=6)
    ax.set_yticks(ticks, labels, fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.7, label=r"$\log_{10}(|H|+10^{-6})$")


def _draw_histograms(ax, hists: dict[str, Any], title: str) -> None:
    edges = np.asarray(hists["edges"])
    for key, color, label in (("Q", "tab:blue", r"$H(W_Q,W_Q)$"), ("V", "tab:orange", r"$H(W_V,W_V)$")):
        h = hists[key]
        ax.stairs(h["counts"], edges, color=color, fill=True, alpha=0.45,
                  label=f"{label}, median {h['median']:.1e}" + (f", {h['zeros']} zeros" if h["zeros"] else ""))
    ax.set_xscale("log")
    ax.set_xlabel("|entry|")
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


@compute_heterogeneity.plot
def plot_heterogeneity(data: dict, cfg: FigureConfig) -> Figure:
    """Heat maps of the whole Hessian and of its attention part, and the histograms of the two exact blocks."""
    fig = Figure(figsize=(16, 4.8), layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 1.1])
    _draw_heatmap(axes[0], decode_array(data["log_full"]), data["groups"], 0, data["pool_full"], fig,
                  f"whole Hessian ({data['n_params']:,} parameters)")
    a0 = data["attention_range"][0]
    _draw_heatmap(axes[1], decode_array(data["log_attention"]), data["groups"], a0, data["pool_attn"], fig,
                  f"attention part W_Q, W_K, W_V, W_O ({data['n_attention_params']:,})")
    _draw_histograms(axes[2], data["histograms"], "exact query and value blocks")
    fig.suptitle("Ormaniec et al. 2024, Fig 1: Hessian heterogeneity of a one-block GPT-2 at initialisation")
    return fig


@compute_heterogeneity.summary
def summarize_heterogeneity(data: dict) -> dict[str, Any]:
    """Median-entry and Frobenius ratios of the value over the query block (≥ 10), and the parameter count."""
    ratio = _ratio(data["histograms"])
    fro = data["frobenius"]["V"] / data["frobenius"]["Q"]
    return {
        "median_ratio_value_over_query": measured(
            ratio, target="≥ 10 (orders of magnitude)", matches=ratio >= 10,
            note="median |H(W_V,W_V)| entry / median |H(W_Q,W_Q)| entry of the exact blocks",
        ),
        "frobenius_ratio_value_over_query": measured(
            fro, target="≥ 10", matches=fro >= 10, note="||H(W_V,W_V)||_F / ||H(W_Q,W_Q)||_F",
        ),
        "n_params": measured(data["n_params"], target=3836, tolerance=0,
                             note="parameters of the paper's heat-map model (with embeddings and unembedding bias)"),
    }


# ----------------------------------------------------------------------------------------------------------------------
# softmax vs linear attention histograms
# ----------------------------------------------------------------------------------------------------------------------


@figure(
    "ormaniec2024-linear-attention",
    description="Ormaniec et al. 2024: |entries| of the exact query and value Hessian blocks, softmax vs linear "
    "attention (one block, width 16).",
    claim=(
        "Without the softmax the query block is no longer suppressed: for linear attention the entries of "
        "H(W_Q,W_Q) move up to the range of H(W_V,W_V) (MATH §3.6–§3.7)."
    ),
    caption=lambda d: (
        "Log-binned histograms of the absolute entries of the exact diagonal blocks H(W_Q,W_Q) and H(W_V,W_V) of a "
        "one-block GPT-2-style model (width 16, d_mlp = 64) at initialisation, for causal softmax attention (left) "
        "and linear attention A = κ Q Kᵀ ⊙ causal mask (right); identical weights (same seed), same batch of "
        f"{d['batch']} additions, the same cross-entropy loss over the 6 answer positions (only the attention "
        "nonlinearity differs). Float64, exact blocks by Hessian-vector products of the identity."
    ),
    paper_seed=0,
)
def compute_linear_attention(cfg: FigureConfig) -> dict[str, Any]:
    """Histograms of the exact (Q,Q) and (V,V) blocks for softmax and for linear attention (same weights, data)."""
    batch = cfg.pick(tiny=2, quick=32, paper=64, key="batch")
    d = cfg.pick(tiny=16, quick=16, paper=16, key="d_model")
    tokens, targets = addition_data(batch, cfg.seed + DATA_SEED)
    names = _attention_names()
    out: dict[str, Any] = {"batch": batch, "d_model": d}
    for kind in ("softmax", "linear"):
        model = gpt2_model(heterogeneity_config(d, kind), cfg.seed)
        blocks = {k: dense_loss_hessian(model, addition_loss, tokens, targets, [names[k]]) for k in ("Q", "V")}
        out[kind] = _block_histograms(blocks)
    return out


@compute_linear_attention.plot
def plot_linear_attention(data: dict, cfg: FigureConfig) -> Figure:
    """Side by side, the block histograms of softmax and of linear attention with their median ratio V/Q."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("softmax", "linear")):
        _draw_histograms(ax, data[kind], f"{kind} attention: median ratio V/Q = {_ratio(data[kind]):.3g}")
    fig.suptitle("Ormaniec et al. 2024: query vs value Hessian entries, softmax vs linear attention")
    return fig


@compute_linear_attention.summary
def summarize_linear_attention(data: dict) -> dict[str, Any]:
    """The median ratio V/Q: ≥ 10 for softmax, within 10× of 1 for linear attention."""
    r_soft, r_lin = _ratio(data["softmax"]), _ratio(data["linear"])
    return {
        "median_ratio_softmax": measured(r_soft, target="≥ 10", matches=r_soft >= 10,
                                         note="median |H_VV| / median |H_QQ|, softmax attention"),
        "median_ratio_linear": measured(r_lin, target="within 10× of 1", matches=0.1 <= r_lin <= 10,
                                        note="median |H_VV| / median |H_QQ|, linear attention: same range"),
    }


