r"""Ormaniec, Dangel & Singh (ICLR 2025): the Hessian of self-attention, as figures (MATH §3.6–§3.7).

Figures (names are part of the CLI interface):

- ``ormaniec2024-heterogeneity``: the dense loss Hessian of a one-block GPT-2-style model (width 16) as a heat
  map, its attention part, and log-binned histograms of the exact ``H(W_Q,W_Q)`` and ``H(W_V,W_V)`` entries.
- ``ormaniec2024-linear-attention``: the same histograms for softmax and for linear attention.
- ``ormaniec2024-growth-single``, ``-growth-depth``, ``-growth-preln``, ``-growth-linear-depth``, ``-growth-mlp``:
  block Frobenius norms of ``H_o`` (= GGN), ``H_f`` (= ``H − GGN``) and ``H`` against the data scale ``σ``
  (Hutchinson estimates through the matrix-free operators of :mod:`energy.hessian.operators`), with the
  theoretical rates of MATH §3.6 as dashed guides and fitted small-``σ`` slopes.
- ``ormaniec2024-growth-closed-form``: the single self-attention layer of MATH §3.1 with the *exact* block norms of
  :mod:`energy.hessian.structure` (no sampling noise), all six distinct blocks.

Protocol (MATH §3.7): 5-digit addition, one batch, GPT-2 initialisation; for each ``σ`` the token and position
embeddings are redrawn i.i.d. ``N(0, σ²)``, every other weight keeps its initialisation. Two implementation choices,
both exact reformulations and documented in every caption:

* **Common random numbers.** Within one initialisation the embedding draw at every ``σ`` uses the *same* seed, so
  it is ``σ`` times one standard-normal draw (marginally exactly the ``N(0, σ²)`` of the protocol), and the
  Hutchinson probes are the same for every ``σ``. The fitted slope then measures how *one* network's curvature
  scales with ``σ`` instead of being blurred by independent redraws; with exactly homogeneous models (deep linear
  MLP, linear attention without residual) it is exact at any number of probes.
* **Only the scored positions are computed.** The loss reads the outputs at the answer positions only; with the
  causal mask nothing else influences them, so :class:`ScoredPositions` evaluates the last block's queries, MLP and
  unembedding at those positions only (keys/values at positions ``0..max``). The result equals the full model's
  loss (tested); for one layer it skips the queries, MLP and unembedding of 12 of the 18 positions.

All curvature is computed in float64.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from energy.hessian.estimators import draw_probes
from energy.hessian.operators import HessianOperator
from energy.hessian.sweep import THEORY_EXPONENTS, sigma_sweep
from energy.reference import layer_norm, linear_attention, multi_head_attention
from paper_figs.io import decode_array, encode_array
from paper_figs.registry import FigureConfig, figure, measured
from unfold.data import addition_batch, addition_loss, addition_mse_loss, answer_positions
from unfold.standard import GPT2Config, GPT2Decoder, MLPBaseline

__all__ = [
    "DTYPE",
    "EMBEDDING_SEED",
    "PROBE_SEED",
    "DATA_SEED",
    "HEATMAP_EPS",
    "SMALL_SIGMA_MAX",
    "THEORY_RATES",
    "ScoredPositions",
    "addition_data",
    "gpt2_model",
    "heterogeneity_config",
    "natural_order",
    "parameter_groups",
    "dense_loss_hessian",
    "log_histogram",
    "max_pool",
    "sigma_grid",
    "loglog_slope",
    "GrowthSweep",
    "growth_sweep",
    "linear_stack_config",
    "closed_form_sweep",
]

DTYPE = torch.float64
#: ``log10(|H| + eps)`` of the heat maps (MATH §3.7).
HEATMAP_EPS = 1e-6
#: The small-σ fit window: σ ≤ this value.
SMALL_SIGMA_MAX = 0.1
#: The curvature parts of the operators (``H_o`` = GGN, ``H_f`` = ``H − GGN``) and their plot labels.
PARTS: tuple[tuple[str, str], ...] = (("H_o", "H_o"), ("H_f", "H_f"), ("H", "H"))
#: Small-σ exponents of MATH §3.6 for the single self-attention layer (the one table, :mod:`energy.hessian.sweep`).
THEORY_RATES = THEORY_EXPONENTS


# ----------------------------------------------------------------------------------------------------------------------
# models, data, fast scored-position forward
# ----------------------------------------------------------------------------------------------------------------------


#: Seed offsets of the independent random streams of one figure seed ``s``: initialisation ``i`` uses ``s + i`` for the
#: weights, ``s + i + EMBEDDING_SEED`` for the embedding draw, ``s + i + PROBE_SEED`` for the Hutchinson probes, and the
#: data batch uses ``s + DATA_SEED``.
EMBEDDING_SEED, PROBE_SEED, DATA_SEED = 10_000, 20_000, 30_000


def addition_data(batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """One batch of 5-digit addition (uniform digits, MATH §3.7) from its own generator seeded with ``seed``."""
    return addition_batch(batch_size, generator=torch.Generator().manual_seed(seed))


def gpt2_model(config: GPT2Config, seed: int) -> GPT2Decoder:
    """A GPT-2-initialised decoder (``N(0, (0.8/√d)²)`` weights) in float64, seeded."""
    return GPT2Decoder(config, generator=torch.Generator().manual_seed(seed)).to(DTYPE)


def _ln(module: nn.LayerNorm | None, X: Tensor) -> Tensor:
    return X if module is None else layer_norm(X, module.weight, module.bias, module.eps)


class ScoredPositions(nn.Module):
    """The outputs of a causal :class:`GPT2Decoder` (or position-wise :class:`MLPBaseline`) at the answer positions
    only, computed without the work the loss never reads.

    The loss of the addition task reads the outputs at :func:`unfold.data.answer_positions` (11…16). With causal
    attention these depend on the tokens ``0…16`` only, and in the *last* block only the queries, the residual, the
    MLP and the unembedding at those positions matter. This module evaluates exactly that and returns a tensor of
    the full shape ``(B, n, vocab)`` with zeros at the unscored positions, so ``addition_loss`` /
    ``addition_mse_loss`` apply unchanged and give the same value and derivatives as on the full model.

    Args:
        model: a causal ``GPT2Decoder`` or an ``MLPBaseline``; its parameters are shared (names get ``model.``).
        n_digits: digits per operand of the addition task.
    """

    def __init__(self, model: GPT2Decoder | MLPBaseline, n_digits: int = 5) -> None:
        super().__init__()
        if isinstance(model, GPT2Decoder) and not model.config.causal:
            raise ValueError("ScoredPositions needs a causal GPT2Decoder (without the mask every position matters).")
        if not isinstance(model, (GPT2Decoder, MLPBaseline)):
            raise TypeError(f"`model` must be a GPT2Decoder or an MLPBaseline, got {type(model).__name__}.")
        self.model = model
        self.register_buffer("positions", answer_positions(n_digits), persistent=False)

    def set_embedding_scale(self, sigma: float, generator: torch.Generator | None = None) -> None:
        """Redraw the embeddings ``N(0, σ²)`` (delegates to the wrapped model)."""
        self.model.set_embedding_scale(sigma, generator)

    def forward(self, tokens: Tensor) -> Tensor:
        pos = self.positions
        n_used = int(pos.max()) + 1
        m = self.model
        X = m.embed(tokens[..., :n_used])
        if isinstance(m, MLPBaseline):
            scored = m.forward_embeddings(X[..., pos, :])
        else:
            for block in m.blocks[:-1]:
                X = block(X)
            scored = _ln(m.ln_f, self._last_block(m.blocks[-1], X, pos)) @ m.W_U + m.b_U
        out = scored.new_zeros(*scored.shape[:-2], tokens.shape[-1], scored.shape[-1])
        return out.index_copy(-2, pos, scored)

    @staticmethod
    def _last_block(block: nn.Module, X: Tensor, pos: Tensor) -> Tensor:
        """``DecoderBlock.forward`` (see :mod:`unfold.standard`) with queries restricted to ``pos``."""
        attn = block.attn
        attend = multi_head_attention if attn.kind == "softmax" else linear_attention
        mask = pos[:, None] >= torch.arange(X.shape[-2], device=X.device)[None, :]  # causal: key j ≤ query pos
        H = _ln(block.ln_1, X)
        out = attend(H[..., pos, :], H, attn.W_Q, attn.W_K, attn.W_V, attn.W_O, num_heads=attn.n_heads, mask=mask)
        s = block.attn_residual_scale
        Xq = X[..., pos, :]
        Y = (Xq if s == 1.0 else s * Xq) + out
        if block.mlp is not None:
            o = block.mlp(_ln(block.ln_2, Y))
            Y = Y + o if block.mlp_residual else o
        return Y


# ----------------------------------------------------------------------------------------------------------------------
# dense Hessian, heat maps and histograms
# ----------------------------------------------------------------------------------------------------------------------


def natural_order(model: GPT2Decoder) -> list[str]:
    """Parameter names in the order of the forward pass: embeddings, then per block ``W_Q, W_K, W_V, W_O``, LayerNorms
    and MLP, then ``LN_f`` and the unembedding (``named_parameters`` lists the model's own ``W_U, b_U`` first)."""
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n.startswith(("W_U", "b_U", "ln_f"))]
    return [n for n in names if n not in head] + sorted(head, key=lambda n: not n.startswith("ln_f"))


def parameter_groups(model: nn.Module, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``[{"name", "start", "stop"}]``: where each parameter sits in the flat vector (``order``, default
    ``named_parameters`` order)."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    groups, start = [], 0
    for name in order or list(sizes):
        groups.append({"name": name, "start": start, "stop": start + sizes[name]})
        start += sizes[name]
    return groups


def dense_loss_hessian(
    model: nn.Module, loss_fn: Callable, tokens: Tensor, targets: Tensor, params: Sequence[str] | None = None,
    *, max_vectors: int = 512,
) -> Tensor:
    """The dense loss Hessian over ``params`` (all parameters by default), by Hessian-vector products of the
    identity (:meth:`energy.hessian.operators.HessianOperator.dense`, column chunks of ``max_vectors``)."""
    op = HessianOperator(model, loss_fn, params, [(tokens, targets)], reduction="mean", max_vectors=max_vectors)
    return op.dense()


def max_pool(A: Tensor, k: int) -> Tensor:
    """Max over ``k × k`` tiles (the last partial tile included), to draw a large matrix at screen resolution."""
    if k <= 1:
        return A.clone()
    m, n = A.shape
    pad = A.new_full((math.ceil(m / k) * k, math.ceil(n / k) * k), -math.inf)
    pad[:m, :n] = A
    return pad.reshape(pad.shape[0] // k, k, pad.shape[1] // k, k).amax(dim=(1, 3))


def log_histogram(values: Tensor, edges: np.ndarray) -> dict[str, Any]:
    """Counts of ``|values|`` in the log-spaced bins ``edges``; exact zeros are counted separately.

    Returns:
        ``{"counts", "zeros", "below", "above", "median", "n"}`` (``median`` of ``|values|``, zeros included).
    """
    a = values.abs().reshape(-1).double().numpy()
    pos = a[a > 0]
    counts, _ = np.histogram(pos, bins=edges)
    return {
        "counts": counts.tolist(),
        "zeros": int((a == 0).sum()),
        "below": int((pos < edges[0]).sum()),
        "above": int((pos > edges[-1]).sum()),
        "median": float(np.median(a)),
        "n": int(a.size),
    }


def _shared_log_edges(blocks: Sequence[Tensor], per_decade: int = 4) -> np.ndarray:
    nz = torch.cat([b.abs().reshape(-1) for b in blocks])
    nz = nz[nz > 0]
    lo, hi = math.floor(math.log10(float(nz.min()))), math.ceil(math.log10(float(nz.max())))
    return np.logspace(lo, hi, (hi - lo) * per_decade + 1)


def _block_histograms(H_blocks: dict[str, Tensor]) -> dict[str, Any]:
    edges = _shared_log_edges(list(H_blocks.values()))
    return {"edges": edges.tolist(), **{k: log_histogram(v, edges) for k, v in H_blocks.items()}}


def _ratio(hists: dict[str, Any]) -> float:
    return hists["V"]["median"] / hists["Q"]["median"]


def heterogeneity_config(d_model: int = 16, attention: str = "softmax") -> GPT2Config:
    """The model of Fig 1 (MATH §3.7): one block, ``d_model = d_head``, ``d_mlp = 4 d_model``, one head."""
    return GPT2Config(d_model=d_model, n_layers=1, d_head=d_model, d_mlp=4 * d_model, attention=attention)


def _attention_names(layer: int = 0) -> dict[str, str]:
    return {k: f"blocks.{layer}.attn.W_{k}" for k in ("Q", "K", "V", "O")}


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
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("softmax", "linear")):
        _draw_histograms(ax, data[kind], f"{kind} attention: median ratio V/Q = {_ratio(data[kind]):.3g}")
    fig.suptitle("Ormaniec et al. 2024: query vs value Hessian entries, softmax vs linear attention")
    return fig


@compute_linear_attention.summary
def summarize_linear_attention(data: dict) -> dict[str, Any]:
    r_soft, r_lin = _ratio(data["softmax"]), _ratio(data["linear"])
    return {
        "median_ratio_softmax": measured(r_soft, target="≥ 10", matches=r_soft >= 10,
                                         note="median |H_VV| / median |H_QQ|, softmax attention"),
        "median_ratio_linear": measured(r_lin, target="within 10× of 1", matches=0.1 <= r_lin <= 10,
                                        note="median |H_VV| / median |H_QQ|, linear attention: same range"),
    }


# ----------------------------------------------------------------------------------------------------------------------
# σ sweeps: Hutchinson block norms through the matrix-free operators, slope fits
# ----------------------------------------------------------------------------------------------------------------------


def sigma_grid(n: int, lo: float = -2.0, hi: float = 1.0) -> np.ndarray:
    """``10^linspace(lo, hi, n)`` (the protocol's grid is ``n = 20`` on ``[10⁻², 10¹]``, MATH §3.7)."""
    return np.logspace(lo, hi, n)


def loglog_slope(sigmas: Sequence[float], values: Sequence[float], max_sigma: float = SMALL_SIGMA_MAX
                 ) -> tuple[float, float, int]:
    r"""Least-squares slope ``p`` of ``log10 v = p log10 σ + b`` over ``σ ≤ max_sigma`` (positive finite ``v``).

    Returns:
        ``(p, standard error of p from the residuals, number of points)``; ``nan`` when fewer than 2 points
        (standard error ``nan`` with 2 points).
    """
    s, v = np.asarray(sigmas, dtype=float), np.asarray(values, dtype=float)
    keep = (s <= max_sigma * (1 + 1e-12)) & np.isfinite(v) & (v > 0)
    x, y = np.log10(s[keep]), np.log10(v[keep])
    n = x.size
    if n < 2:
        return math.nan, math.nan, n
    xc = x - x.mean()
    p = float((xc * (y - y.mean())).sum() / (xc**2).sum())
    if n == 2:
        return p, math.nan, n
    resid = y - y.mean() - p * xc
    return p, float(math.sqrt((resid**2).sum() / (n - 2) / (xc**2).sum())), n


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
    progress: Callable = lambda it, desc, total=None: it,
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
        sigmas, n_inits, n_samples, batch, seed: protocol sizes and seed (streams: :data:`DATA_SEED` etc.); the
            data is one addition batch.
        progress: ``progress(iterable, desc, total)`` wrapper (e.g. ``cfg.progress``).
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


def _sweep_record(sweep: GrowthSweep, **meta: Any) -> dict[str, Any]:
    return {"curves": sweep.curves(), **meta}


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


def _growth_summary(data: dict, targets: dict[str, dict[str, float]], tol: float, note: str,
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


@figure(
    "ormaniec2024-growth-single",
    description="Ormaniec et al. 2024: block norms of H_o, H_f, H (value and query) vs data scale σ, one GPT-2 layer.",
    claim=(
        "At small σ the value block grows like σ² (H_o and H; H_f(V,V) = 0) while the query block grows like σ⁶ "
        "(H_o) and σ⁵ (H_f and H): a highly non-linear, block-heterogeneous dependence on the data (MATH §3.6)."
    ),
    caption=lambda d: (
        f"One-layer GPT-2-style model (width {d['width']}, d_mlp = {d['d_mlp']}, causal softmax attention, no "
        "LayerNorm), cross-entropy over the 6 answer positions. Frobenius norms of the diagonal blocks (W_V,W_V) "
        "and (W_Q,W_Q) of H_o, H_f and H against σ; dashed: σ^p from MATH §3.6 (table for one attention layer). "
        + _protocol(d) + " H_f(V,V) vanishes identically here (the logits are piecewise linear in W_V)."
    ),
    paper_seed=0,
)
def compute_growth_single(cfg: FigureConfig) -> dict[str, Any]:
    sizes = _sizes(cfg, width=(8, 128, 128), batch=(4, 64, 64), n_sigma=(5, 10, 20), n_inits=(2, 3, 20),
                   n_samples=(4, 10, 20))
    sweep, meta = _gpt2_growth(cfg, sizes, 1, "growth-single")
    series = [{"label": "layer 1", "key": "L1", "curves": _split_layers(sweep, [0])[0]["curves"],
               "guides": _SOFTMAX_GUIDES}]
    return {**meta, "series": series}


@compute_growth_single.plot
def plot_growth_single(data: dict, cfg: FigureConfig) -> Figure:
    return _plot_grid(data, f"Ormaniec et al. 2024: one GPT-2 layer (width {data['width']}), block norms vs σ")


@compute_growth_single.summary
def summarize_growth_single(data: dict) -> dict[str, Any]:
    return _growth_summary(data, _SINGLE_TARGETS, 0.15, "small-σ log–log slope (MATH §3.6 single-layer table)")


# -- depth -------------------------------------------------------------------------------------------------------------


@figure(
    "ormaniec2024-growth-depth",
    description="Ormaniec et al. 2024: block norms vs σ in a 5-layer GPT-2, one line per layer.",
    claim=(
        "With residual connections every layer's input stays O(σ), so the blocks of every layer follow the "
        "single-layer rates of MATH §3.6 (value σ², query σ⁶ for H_o and σ⁵ for H_f and H). Only the last layer's "
        "H_f(V,V) is 0: a lower layer's W_V feeds later softmaxes."
    ),
    caption=lambda d: (
        f"{d['n_layers']}-layer GPT-2-style model (width {d['width']}, d_mlp = {d['d_mlp']}, causal softmax "
        "attention, no LayerNorm), cross-entropy over the 6 answer positions; one line per layer (blocks "
        "(W_V,W_V) and (W_Q,W_Q) of that layer); dashed: single-layer rates of MATH §3.6. " + _protocol(d)
    ),
    paper_seed=0,
)
def compute_growth_depth(cfg: FigureConfig) -> dict[str, Any]:
    sizes = _sizes(cfg, width=(8, 32, 128), batch=(4, 16, 64), n_sigma=(5, 10, 20), n_inits=(2, 3, 20),
                   n_samples=(4, 8, 20))
    n_layers = cfg.pick(tiny=2, quick=5, paper=5, key="n_layers")
    sweep, meta = _gpt2_growth(cfg, sizes, n_layers, "growth-depth")
    series = [{"label": f"layer {s['layer'] + 1}", "key": f"L{s['layer'] + 1}", "curves": s["curves"],
               "guides": _SOFTMAX_GUIDES} for s in _split_layers(sweep, range(n_layers))]
    return {**meta, "series": series}


@compute_growth_depth.plot
def plot_growth_depth(data: dict, cfg: FigureConfig) -> Figure:
    return _plot_grid(data, f"Ormaniec et al. 2024: {data['n_layers']}-layer GPT-2 (width {data['width']}), "
                      "one line per layer")


@compute_growth_depth.summary
def summarize_growth_depth(data: dict) -> dict[str, Any]:
    out = _growth_summary(data, _SINGLE_TARGETS, 0.15,
                          "small-σ slope of this layer vs the single-layer rate of MATH §3.6")
    for s in data["series"]:
        cur = s["curves"]["V"]["H_f"]
        if math.isfinite(cur["slope"]):
            out[f"slope_V_H_f_{s['key']}"] = measured(
                cur["slope"], uncertainty=cur["slope_se"],
                note="H_f(V,V) of a lower layer (its W_V reaches the later softmaxes); 0 in the single-layer table",
            )
    return out


# -- Pre-LN ------------------------------------------------------------------------------------------------------------


@figure(
    "ormaniec2024-growth-preln",
    description="Ormaniec et al. 2024: block norms vs σ of a one-layer Pre-LN GPT-2.",
    claim="Pre-LayerNorm removes most of the σ-dependence of the attention blocks (MATH §3.6).",
    caption=lambda d: (
        f"One-layer Pre-LN GPT-2-style model (LayerNorm before attention, MLP and unembedding; width {d['width']}, "
        f"d_mlp = {d['d_mlp']}); dashed: σ⁰ (no dependence on σ). Without LayerNorm the same blocks grow like σ² "
        "(value) and σ⁶ / σ⁵ (query H_o / H_f, H), see ormaniec2024-growth-single. "
        + _protocol(d)
    ),
    paper_seed=0,
)
def compute_growth_preln(cfg: FigureConfig) -> dict[str, Any]:
    sizes = _sizes(cfg, width=(8, 64, 128), batch=(4, 32, 64), n_sigma=(5, 10, 20), n_inits=(2, 3, 20),
                   n_samples=(4, 10, 20))
    sweep, meta = _gpt2_growth(cfg, sizes, 1, "growth-preln", layernorm="pre")
    flat = {b: {"H_o": 0, "H_f": 0, "H": 0} for b in ("V", "Q")}
    series = [{"label": "Pre-LN", "key": "preLN", "curves": _split_layers(sweep, [0])[0]["curves"], "guides": flat}]
    return {**meta, "series": series}


@compute_growth_preln.plot
def plot_growth_preln(data: dict, cfg: FigureConfig) -> Figure:
    return _plot_grid(data, f"Ormaniec et al. 2024: one Pre-LN GPT-2 layer (width {data['width']}), block norms vs σ")


@compute_growth_preln.summary
def summarize_growth_preln(data: dict) -> dict[str, Any]:
    cur = data["series"][0]["curves"]
    out = {}
    for block in ("V", "Q"):
        for part in ("H_o", "H_f", "H"):
            c = cur[block][part]
            out[f"slope_{block}_{part}"] = measured(
                c["slope"], uncertainty=c["slope_se"],
                note=f"small-σ slope with Pre-LN (without LN: {THEORY_RATES['VV' if block == 'V' else 'QQ'][part]})",
            )
    return out


# -- linear attention without residual, 1-3 layers ---------------------------------------------------------------------


def linear_stack_config(width: int, n_layers: int) -> GPT2Config:
    """The model of MATH §3.6 whose output is homogeneous of degree ``3ⁿ`` in the embeddings ``X``.

    ``n`` causal linear-attention layers ``X ← κ (X W_Q W_Kᵀ Xᵀ ⊙ m) X W_V W_O`` (one head), *no* attention residual
    (``attn_residual_scale = 0``), no MLP, no LayerNorm, then the unembedding ``X W_U + b_U``. Each layer is cubic in
    its input, so the logits are ``σ^{3ⁿ}``-homogeneous in ``X`` (up to the constant ``b_U``) and, with the square
    loss, ``H_o = Jᵀ(2c)J`` of every block scales exactly like ``σ^{2·3ⁿ}``. (An MLP with its residual would break the
    homogeneity; the MLP without residual is positively homogeneous of degree 1 and would keep it.)
    """
    return GPT2Config(d_model=width, n_layers=n_layers, d_mlp=4 * width, attention="linear",
                      attn_residual_scale=0.0, mlp=False)


@figure(
    "ormaniec2024-growth-linear-depth",
    description="Ormaniec et al. 2024: linear attention without residual, 1-3 layers: H_o grows like σ^(2·3ⁿ).",
    claim=(
        "Linear attention without the attention residual is homogeneous of degree 3ⁿ in X for n layers, so H_o "
        "grows like σ^(2·3ⁿ): slopes 6, 18, 54 for 1, 2, 3 layers (MATH §3.6)."
    ),
    caption=lambda d: (
        f"Stacks of n = 1, 2, 3 causal linear-attention layers (width {d['width']}, one head, W_O, no attention "
        "residual, no MLP, no LayerNorm) followed by the unembedding, square loss against the one-hot answer "
        "digits (mean over the 6 answer positions). Blocks (W_V,W_V) and (W_Q,W_Q) of the first layer; dashed: "
        "σ^(2·3ⁿ) for H_o. " + _protocol(d)
    ),
    paper_seed=0,
)
def compute_growth_linear_depth(cfg: FigureConfig) -> dict[str, Any]:
    sizes = _sizes(cfg, width=(8, 32, 128), batch=(4, 16, 64), n_sigma=(5, 10, 20), n_inits=(2, 2, 20),
                   n_samples=(4, 8, 20))
    depths = cfg.pick(tiny=(1, 2), quick=(1, 2, 3), paper=(1, 2, 3), key="depths")


    sigmas = sigma_grid(sizes["n_sigma"])
    series = []
    for n in depths:
        config = linear_stack_config(sizes["width"], n)
        sweep = growth_sweep(
            lambda s, config=config: ScoredPositions(gpt2_model(config, s)), _gpt2_blocks([0]), addition_mse_loss,
            sigmas=sigmas, n_inits=sizes["n_inits"], n_samples=sizes["n_samples"], batch=sizes["batch"],
            seed=cfg.seed, progress=cfg.progress, desc=f"linear attention, {n} layer(s)",
        )
        p = 2 * 3**n
        series.append({"label": f"{n} layer{'s' if n > 1 else ''}", "key": f"n{n}", "depth": n,
                       "curves": _split_layers(sweep, [0])[0]["curves"],
                       "guides": {b: {"H_o": p, "H_f": None, "H": None} for b in ("V", "Q")}})
    return {**sizes, "d_mlp": None, "sigmas": sigmas, "fit_max": SMALL_SIGMA_MAX, "depths": list(depths),
            "series": series}


@compute_growth_linear_depth.plot
def plot_growth_linear_depth(data: dict, cfg: FigureConfig) -> Figure:
    return _plot_grid(data, "Ormaniec et al. 2024: linear attention without residual, first-layer blocks vs σ")


@compute_growth_linear_depth.summary
def summarize_growth_linear_depth(data: dict) -> dict[str, Any]:
    out = {}
    for k, s in enumerate(data["series"]):
        p = 2 * 3 ** s["depth"]
        out.update(_growth_summary(data, {"V": {"H_o": p}, "Q": {"H_o": p}}, 0.05,
                                   f"H_o slope, {s['depth']} layer(s): theory 2·3ⁿ (±5%)", series=[k], relative=True))
        for block in ("V", "Q"):
            cur = s["curves"][block]["H_f"]
            if math.isfinite(cur["slope"]):  # n = 1: the diagonal blocks are block-hollow (H_f ≡ 0, MATH §3.6)
                out[f"slope_{block}_H_f_n{s['depth']}"] = measured(
                    cur["slope"], uncertainty=cur["slope_se"],
                    note="H_f = Σ δ·∇²z with δ → −(one-hot) = O(1) and z of degree 3ⁿ in X: expected 3ⁿ",
                )
    return out


# -- MLP baseline ------------------------------------------------------------------------------------------------------


@figure(
    "ormaniec2024-growth-mlp",
    description="Ormaniec et al. 2024: deep linear MLP baseline: every layer's block grows like σ².",
    claim=(
        "For a deep linear MLP with the square loss every block H_o(W_k,W_k) is O(σ²) and the diagonal functional "
        "blocks vanish (MATH §3.6): unlike attention, the dependence on the data scale is homogeneous across blocks."
    ),
    caption=lambda d: (
        f"Deep linear MLP (MATH §3.6; {d['n_layers']} bias-free layers, width {d['width']}, applied to every position "
        "of the token + position embeddings), square loss against the one-hot answer digits. One line per layer "
        "(its diagonal block); dashed: σ². " + _protocol(d) + " H_f of the diagonal blocks is identically 0 "
        "(the output is linear in each W_k) and is not drawn."
    ),
    paper_seed=0,
)
def compute_growth_mlp(cfg: FigureConfig) -> dict[str, Any]:
    sizes = _sizes(cfg, width=(8, 64, 128), batch=(4, 16, 64), n_sigma=(5, 10, 20), n_inits=(2, 2, 20),
                   n_samples=(4, 8, 20))
    n_layers = cfg.pick(tiny=2, quick=4, paper=4, key="n_layers")


    w = sizes["width"]

    def make(s: int) -> nn.Module:
        return ScoredPositions(MLPBaseline(w, n_layers, generator=torch.Generator().manual_seed(s)).to(DTYPE))

    sigmas = sigma_grid(sizes["n_sigma"])
    blocks = {f"W{k}": f"model.layers.{k}.weight" for k in range(n_layers)}
    sweep = growth_sweep(make, blocks, addition_mse_loss, sigmas=sigmas, n_inits=sizes["n_inits"],
                         n_samples=sizes["n_samples"], batch=sizes["batch"], seed=cfg.seed, progress=cfg.progress,
                         desc="MLP baseline")
    curves = sweep.curves()
    series = [{"label": f"layer {k + 1}", "key": f"L{k + 1}", "curves": {"W": curves[f"W{k}"]},
               "guides": {"W": {"H_o": 2, "H_f": None, "H": 2}}} for k in range(n_layers)]
    max_hf = max(float(np.nanmax(sweep.norms[b]["H_f"] / sweep.norms[b]["H"])) for b in blocks)
    return {**sizes, "d_mlp": None, "n_layers": n_layers, "sigmas": sigmas, "fit_max": SMALL_SIGMA_MAX,
            "series": series, "max_relative_H_f": max_hf}


@compute_growth_mlp.plot
def plot_growth_mlp(data: dict, cfg: FigureConfig) -> Figure:
    return _plot_grid(data, f"Ormaniec et al. 2024: deep linear MLP ({data['n_layers']} layers), block norms vs σ",
                      blocks=("W",), parts=("H_o", "H"), block_titles={"W": r"$(W_k,W_k)$ of layer $k$"})


@compute_growth_mlp.summary
def summarize_growth_mlp(data: dict) -> dict[str, Any]:
    out = _growth_summary(data, {"W": {"H_o": 2, "H": 2}}, 0.1, "small-σ slope of the layer's block (MATH §3.6: σ²)")
    out["max_relative_H_f"] = measured(data["max_relative_H_f"], target=0.0, tolerance=1e-12,
                                       note="max over layers and σ of ||H_f||/||H|| (diagonal blocks: exactly 0)")
    return out


# -- closed form, single self-attention layer --------------------------------------------------------------------------


def closed_form_sweep(
    sigmas: np.ndarray, *, width: int, batch: int, n_inits: int, seed: int,
    progress: Callable = lambda it, desc, total=None: it,
) -> dict[str, dict[str, np.ndarray]]:
    r"""Exact block norms of the single self-attention layer of MATH §3.1 against σ (MATH §3.4–§3.6).

    ``X = σ X₀`` with ``X₀ = E[tokens] + P`` (token and position embeddings ``N(0, 1)``, one addition batch),
    ``W_Q, W_K, W_V`` of size ``width × width`` with GPT-2 init ``N(0, (0.8/√width)²)``, no mask, one head,
    ``κ = 1/√width``, loss ``ℓ = c Σ_b ‖F_b − Y_b‖² / B`` with ``c = 1/(L d_V)`` and the target ``Y = X₀`` shifted
    by one position (the unit-scale embedding of the next token; last row 0), which does not scale with σ, so
    ``δ = F − Y = O(1)``. Norms from :func:`energy.hessian.structure.block_norms` (exact, never materialised).

    Returns:
        ``{block: {part: (n_inits, n_sigma)}}`` for the six blocks of :data:`THEORY_RATES`, parts ``H_o, H_f, H``.
    """
    from energy.hessian.structure import block_norms

    tokens, _ = addition_data(batch, seed + DATA_SEED)
    out = {b: {p: np.full((n_inits, len(sigmas)), np.nan) for p in ("H_o", "H_f", "H")} for b in THEORY_RATES}
    steps = [(i, j) for i in range(n_inits) for j in range(len(sigmas))]
    for i, j in progress(steps, "closed-form σ sweep", total=len(steps)):
        if j == 0:
            g = torch.Generator().manual_seed(seed + i)
            E = torch.randn(tokens.max().item() + 1, width, generator=g, dtype=DTYPE)
            P = torch.randn(tokens.shape[1], width, generator=g, dtype=DTYPE)
            X0 = E[tokens] + P
            Y = torch.cat([X0[:, 1:], torch.zeros_like(X0[:, :1])], dim=1)
            W_Q, W_K, W_V = (torch.randn(width, width, generator=g, dtype=DTYPE) * (0.8 / math.sqrt(width))
                             for _ in range(3))
        norms = block_norms(float(sigmas[j]) * X0, W_Q, W_K, W_V, Y, reduction="mean")
        for b in THEORY_RATES:
            for p in ("H_o", "H_f", "H"):
                out[b][p][i, j] = norms[(b, p)]
    return out


_CF_BLOCK_LABEL = {"VV": "(V,V)", "VQ": "(V,Q)", "VK": "(V,K)", "QQ": "(Q,Q)", "KK": "(K,K)", "QK": "(Q,K)"}


@figure(
    "ormaniec2024-growth-closed-form",
    description="Single self-attention layer (MATH §3.1): exact block norms of H_o, H_f, H vs σ, all six blocks.",
    claim=(
        "Small-σ exponents of MATH §3.6: H_o grows like σ² (V,V), σ⁴ (V,Q),(V,K), σ⁶ (Q,Q),(K,K),(Q,K); H_f like "
        "σ³ (V,Q),(V,K), σ⁵ (Q,Q),(K,K), σ³ (Q,K) (bilinear term), and H_f(V,V) = 0."
    ),
    caption=lambda d: (
        f"Single self-attention layer of MATH §3.1 (width d_V = d_K = {d['width']}, one head, no mask, no W_O, "
        f"GPT-2 init), X = σ·X₀ with X₀ the N(0,1) token + position embeddings of {d['batch']} additions, square "
        "loss against the unit-scale embedding of the next token (δ = F − Y = O(1)), mean over sequences. Exact "
        "block Frobenius norms from the Kronecker structure (energy.hessian.structure; no sampling noise), "
        f"{d['n_inits']} initialisations (mean ± SE), σ on 10^linspace(-2, 1, {d['n_sigma']}); dashed: σ^p of "
        f"MATH §3.6; slopes fitted for σ ≤ {d['fit_max']}."
    ),
    paper_seed=0,
)
def compute_growth_closed_form(cfg: FigureConfig) -> dict[str, Any]:
    width = cfg.pick(tiny=6, quick=128, paper=128, key="width")
    batch = cfg.pick(tiny=2, quick=4, paper=8, key="batch")
    n_sigma = cfg.pick(tiny=5, quick=10, paper=20, key="n_sigma")
    n_inits = cfg.pick(tiny=2, quick=2, paper=5, key="n_inits")
    sigmas = sigma_grid(n_sigma)
    norms = closed_form_sweep(sigmas, width=width, batch=batch, n_inits=n_inits, seed=cfg.seed,
                              progress=cfg.progress)
    curves = {b: {p: _curve(a, sigmas) for p, a in parts.items()} for b, parts in norms.items()}
    return {"width": width, "batch": batch, "n_sigma": n_sigma, "n_inits": n_inits, "sigmas": sigmas,
            "fit_max": SMALL_SIGMA_MAX, "curves": curves, "theory": THEORY_RATES}


@compute_growth_closed_form.plot
def plot_growth_closed_form(data: dict, cfg: FigureConfig) -> Figure:
    series = [{"label": _CF_BLOCK_LABEL[b], "key": b, "curves": {"A": data["curves"][b]},
               "guides": {"A": data["theory"][b]}} for b in THEORY_RATES]
    return _plot_grid({**data, "series": series}, f"Single attention layer (MATH §3.1, width {data['width']}): "
                      "exact block norms vs σ", blocks=("A",), block_titles={"A": "of each block"})


@compute_growth_closed_form.summary
def summarize_growth_closed_form(data: dict) -> dict[str, Any]:
    out = {}
    for b, parts in data["theory"].items():
        for p, target in parts.items():
            if target is None:
                continue
            c = data["curves"][b][p]
            out[f"slope_{b}_{p}"] = measured(c["slope"], target=float(target), tolerance=0.15,
                                             uncertainty=c["slope_se"], note="exact norms, MATH §3.6 table")
    vv_f = float(np.nanmax(np.asarray(data["curves"]["VV"]["H_f"]["mean"], dtype=float)))
    out["norm_VV_H_f"] = measured(vv_f, target=0.0, tolerance=0.0, note="H_f(V,V) = 0 (MATH §3.5)")
    return out
