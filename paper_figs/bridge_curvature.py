r"""Beyond the papers: step sizes and token-space curvature along an unrolled model (``unfold-energy-curvature``).

Along an untrained unrolled model (:func:`unfold.presets.yang2022`), per layer: the largest step sizes that the
majoriser guarantees (MATH §1.1 "Guarantee", :func:`majoriser_step_bound`) and the local preconditioned curvature of
the true token-space Hessian (MATH §4.1, :func:`preconditioned_curvature`) against the step size the model uses
(``α = 1``), whether each step actually lowered the energy, and a sweep of step sizes beyond the guarantee. The other
figures that connect the energy view with the Hessian view are in :mod:`paper_figs.bridge`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from energy.attention import AttentionEnergy
from energy.core import Preconditioner
from energy.core.attention import head_step, value_output_maps
from energy.hessian.energy_curvature import majoriser_step_bound, preconditioned_curvature
from paper_figs.registry import FigureConfig, figure, measured
from paper_figs.yang2022_text_data import bundled_text_sentences
from paper_figs.yang2022_text_model import DEPTH, make_model
from unfold.data import build_vocabulary, embed_sentences, seeded_embedding_table

__all__ = ["SWEEP_ALPHAS", "curvature_along_model", "compute_energy_curvature"]

DTYPE = torch.float64

#: step sizes of the sweep in ``unfold-energy-curvature`` (the model itself uses α = 1)
SWEEP_ALPHAS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0)


def _sweep_step(energy: AttentionEnergy, Y: Tensor, alpha: float, preconditioner: Preconditioner) -> Tensor:
    """Step (a) or (b) of ``energy`` with any step size, through the pure core (MATH §1.1).

    Step sizes beyond the guaranteed range are the point of the sweep, so it calls the core formula directly
    (which never warns) instead of :meth:`AttentionEnergy.step` (which warns outside its ``step_range``).
    """
    M3 = energy.M.unsqueeze(0)
    values, out = value_output_maps(M3, energy.scale, preconditioner, single=True)
    return head_step(Y, M3, energy.scale, energy.kernel, energy.ridge, None, values, out, alpha)


@torch.no_grad()
def curvature_along_model(
    model: Any, sequences: list[Tensor], alphas: tuple[float, ...] = ()
) -> dict[str, np.ndarray]:
    r"""Step-size bounds, curvature and energy changes per layer and sequence of an unrolled model.

    Per layer ``ℓ`` and sequence ``b``, at the state ``Y`` entering the attention step of layer ``ℓ``:

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
            for m, a in enumerate(alphas):
                for prec, key in ((Preconditioner.METRIC, "up_a"), (Preconditioner.TOKEN, "up_b")):
                    E1 = energy.energy(_sweep_step(energy, Y, a, prec))
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
    single_thread=True,
)
def compute_energy_curvature(cfg: FigureConfig) -> dict[str, Any]:
    """Embed bundled sentences and measure :func:`curvature_along_model` with and without the ReLU projection."""
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
        """Count the increases larger than float64 round-off.

        At collapsed states (all tokens equal) E_att sits at its minimum −n(n−1)/2 and the step is the identity,
        so recomputing it moves the last digits either way.
        """
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

