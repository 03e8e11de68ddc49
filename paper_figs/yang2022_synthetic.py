"""Yang, Huang & Wipf (NeurIPS 2022), figures 1-4: the synthetic illustrations of alternating descent.

The protocols follow MATH §1.8 (as the authors' public code makes the figures); the context is MATH §1.6: a
Transformer layer alternates an attention step and an FFN step, each a descent step on *its own* energy term, and
descent on each term does not imply descent on the sum.

- ``yang2022-apollonius`` (Fig 1): Apollonius regions ``‖x − y_f*‖ ≤ C ‖x − y_h*‖`` (an illustration).
- ``yang2022-alternating-trace`` (Fig 2) and ``yang2022-alternating-energy`` (Fig 3): alternating gradient steps
  on two quadratic energies ``e1`` (acts on features) and ``e2`` (mixes tokens); both figures share one run.
- ``yang2022-divergence`` (Fig 4): the regions ``div(x) ≥ −κ`` of a ReLU-truncation criterion.

Randomness comes from a :class:`torch.Generator` seeded with the authors' seeds (23333 for figs 1 and 4, 233 for
figs 2-3), float64. The authors' code draws its numbers in another order/dtype, so the random points and matrices,
and hence the pictures, are not pixel-identical to the paper's; the protocol is the same.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from torch import Tensor

from paper_figs.io import decode_array, encode_array
from paper_figs.registry import FigureConfig, figure, measured, progress
from paper_figs.yang2022_alternating import (
    ALT_LR,
    REF_LR,
    AlternatingProblem,
    alternating_descent,
    alternating_fixed_point,
    e1,
    e2,
    exact_minimiser,
    grad_e1,
    grad_e2,
    gradient_descent_on_sum,
    make_alternating_problem,
    pca2,
    total_energy,
)
from paper_figs.yang2022_regions import (
    APOLLONIUS_BOX,
    APOLLONIUS_C,
    DIVERGENCE_ALPHA,
    DIVERGENCE_BOX,
    DIVERGENCE_KAPPAS,
    apollonius_circle,
    apollonius_region,
    divergence,
    divergence_step,
    grid_axis,
    mesh,
    pixel_extent,
)

# The formulas live in paper_figs.yang2022_regions (figs 1, 4) and paper_figs.yang2022_alternating (figs 2-3); they are
# re-exported here beside the figures that use them.
__all__ = [
    "compute_apollonius",
    "compute_alternating_trace",
    "compute_alternating_energy",
    "compute_divergence",
    "grid_axis",
    "apollonius_region",
    "apollonius_circle",
    "AlternatingProblem",
    "make_alternating_problem",
    "e1",
    "grad_e1",
    "e2",
    "grad_e2",
    "total_energy",
    "exact_minimiser",
    "alternating_descent",
    "gradient_descent_on_sum",
    "alternating_fixed_point",
    "pca2",
    "divergence_step",
    "divergence",
]

DTYPE = torch.float64

# ----------------------------------------------------------------------------------------------------------------------
# Fig 1: Apollonius regions
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RegionGrid:
    """The raster of Figs 1 and 4: the square box, its grid step and points, and the figure's seeded generator."""

    box: tuple[float, float]
    step: float
    axis: Tensor
    X: Tensor
    generator: torch.Generator

    @classmethod
    def make(cls, cfg: FigureConfig, box: tuple[float, float], *, tiny_step: float) -> _RegionGrid:
        step = cfg.pick(tiny=tiny_step, quick=0.02, paper=0.02, key="step")
        axis, X = mesh(box[0], box[1], step)
        return cls(box, step, axis, X, torch.Generator().manual_seed(cfg.seed))

    def record(self) -> dict[str, Any]:
        """What the JSON stores about the grid (the plot redraws the masks from it)."""
        return {"box": list(self.box), "step": self.step, "n_grid": len(self.axis)}


def _mask_record(mask: Tensor) -> dict[str, Any]:
    """A rasterised region as stored: the packed boolean mask and the share of the box it covers."""
    return {"mask": encode_array(mask.numpy()), "fraction": float(mask.double().mean())}


def _draw_region(ax: Any, panel: dict, data: dict, cmap: str, title: str) -> None:
    """Draw one stored region mask of Fig 1 or 4 on the square plotting box (pixel k centred on grid point k)."""
    lo, hi = data["box"]
    extent = pixel_extent(lo, hi, data["step"])
    ax.imshow(decode_array(panel["mask"]), origin="lower", extent=extent, cmap=cmap, vmin=0, vmax=1.6,
              interpolation="nearest")
    ax.set_xlim(*extent[:2])
    ax.set_ylim(*extent[:2])
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.set_xlabel(r"$x_1$")


@figure(
    "yang2022-apollonius",
    description="Yang et al. 2022 Fig 1: Apollonius regions ||x-y_f*|| <= C ||x-y_h*||, C = 0.7, 1.5 (illustration).",
    claim=(
        "Illustration only (MATH §1.8): the set of points whose distance to the minimiser y_f* of one term is at most "
        "C times their distance to the minimiser y_h* of the sum. The paper's exact statement is open; no theorem is "
        "tested. What is checked: the rasterised region agrees with its closed-form boundary (an Apollonius circle)."
    ),
    caption=(
        "Shaded: points x in [-3.5, 3.5)^2 (grid step 0.02) with ||x - y_f*|| / ||x - y_h*|| <= C, for C = 0.7 (left) "
        "and C = 1.5 (right); y_f*, y_h* ~ N(0, I_2) drawn with seed 23333. Dashed: the Apollonius circle from its "
        "closed form. In the paper the figure motivates when a descent step on one energy term still moves towards "
        "the minimiser of the sum; it is an illustration, the precise theorem is open. Same protocol as the authors' "
        "code; the random points differ from the paper's (different random stream)."
    ),
    paper_seed=23333,
)
def compute_apollonius(cfg: FigureConfig) -> dict[str, Any]:
    """Draw ``y_f*, y_h* ~ N(0, I_2)`` and rasterise the region for each ``C`` (MATH §1.8, Fig 1)."""
    grid = _RegionGrid.make(cfg, APOLLONIUS_BOX, tiny_step=0.1)
    y_f = torch.randn(2, generator=grid.generator, dtype=DTYPE)
    y_h = torch.randn(2, generator=grid.generator, dtype=DTYPE)
    panels = []
    for C in APOLLONIUS_C:
        centre, radius = apollonius_circle(y_f, y_h, C)
        panels.append({"C": C, **_mask_record(apollonius_region(grid.X, y_f, y_h, C)),
                       "circle_centre": centre, "circle_radius": radius})
    return {"y_f": y_f, "y_h": y_h, **grid.record(), "panels": panels}


@compute_apollonius.plot
def plot_apollonius(data: dict, cfg: FigureConfig) -> Figure:
    fig = Figure(figsize=(9, 4.4), layout="constrained")
    axes = fig.subplots(1, len(data["panels"]))
    for ax, panel in zip(axes, data["panels"]):
        _draw_region(ax, panel, data, "Blues",
                     rf"$\|x-y_f^*\| \,/\, \|x-y_h^*\| \leq {panel['C']}$  (area {panel['fraction']:.1%})")
        ax.add_patch(Circle(panel["circle_centre"], panel["circle_radius"], fill=False, ls="--", lw=1.2,
                            color="k", label="Apollonius circle"))
        ax.plot(*data["y_f"], "r*", ms=13, label=r"$y_f^*$")
        ax.plot(*data["y_h"], "o", color="darkorange", ms=8, label=r"$y_h^*$")
        ax.set_ylabel(r"$x_2$")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Yang et al. 2022, Fig 1 (protocol): Apollonius regions — an illustration")
    return fig


@compute_apollonius.summary
def summarize_apollonius(data: dict) -> dict[str, Any]:
    lo, hi = data["box"]
    area = (hi - lo) ** 2
    h = data["step"]
    out = {}
    for panel in data["panels"]:
        C, c, r = panel["C"], np.asarray(panel["circle_centre"]), panel["circle_radius"]
        inside_box = bool(np.all(c - r >= lo) and np.all(c + r <= hi - h))
        disc = math.pi * r**2 / area
        target = (disc if C < 1 else 1 - disc) if inside_box else None
        # a grid cell of side h can only be misclassified if the circle crosses it: those cells cover at most
        # a band of width 2·sqrt(2)·h around the circle
        tol = 2 * math.sqrt(2) * h * 2 * math.pi * r / area
        out[f"area_fraction_C={C}"] = measured(
            panel["fraction"],
            target=target,
            tolerance=tol if inside_box else None,
            note=("closed-form Apollonius disc area / box area" if inside_box
                  else "circle leaves the plotting box: no closed-form area target"),
        )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Figs 2-3: alternating gradient descent on two quadratic energies
# ----------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _alternating_run(seed: int, n: int, d: int, steps: int, lr: float, ref_steps: int, ref_lr: float) -> dict:
    """The computation Figs 2 and 3 share (cached, so running both figures computes it once)."""
    p = make_alternating_problem(n, d, torch.Generator().manual_seed(seed))
    run = alternating_descent(p, steps, lr, progress=progress)
    Y_star = exact_minimiser(p)
    Y_ref = gradient_descent_on_sum(p, ref_steps, ref_lr) if ref_steps > 0 else Y_star
    fixed = alternating_fixed_point(p, lr)
    flat = run["iterates"].reshape(steps, -1)
    mean, comps, evr = pca2(flat)
    return {
        "n": n, "d": d, "steps": steps, "lr": lr, "ref_steps": ref_steps, "ref_lr": ref_lr,
        "E": run["E"], "e1": run["e1"], "e2": run["e2"],
        "E0": float(total_energy(p.Y0, p)),
        "e1_0": float(e1(p.Y0, p.W1, p.B1)),
        "e2_0": float(e2(p.Y0, p.W2, p.B2)),
        "E_ref": float(total_energy(Y_ref, p)),
        "E_star": float(total_energy(Y_star, p)),
        "E_cycle_even": float(total_energy(fixed["Y_even"], p)),
        "E_cycle_odd": float(total_energy(fixed["Y_odd"], p)),
        "rho": fixed["rho"], "lr_L1": fixed["lr_L1"], "lr_L2": fixed["lr_L2"],
        "dist_final_to_ref": float(torch.linalg.matrix_norm(run["iterates"][-1] - Y_ref)),
        "dist_Y0_to_ref": float(torch.linalg.matrix_norm(p.Y0 - Y_ref)),
        "dist_ref_to_star": float(torch.linalg.matrix_norm(Y_ref - Y_star)),
        "pca_traj": (flat - mean) @ comps.T,
        "pca_Y0": (p.Y0.reshape(-1) - mean) @ comps.T,
        "pca_ref": (Y_ref.reshape(-1) - mean) @ comps.T,
        "pca_cycle": (torch.stack([fixed["Y_even"].reshape(-1), fixed["Y_odd"].reshape(-1)]) - mean) @ comps.T,
        "pca_evr": evr,
    }


def _alternating(cfg: FigureConfig) -> dict:
    return _alternating_run(
        cfg.seed,
        cfg.pick(tiny=12, quick=500, paper=500, key="n"),
        cfg.pick(tiny=7, quick=128, paper=128, key="d"),
        cfg.pick(tiny=200, quick=200, paper=200, key="steps"),
        ALT_LR,
        cfg.pick(tiny=600, quick=0, paper=600, key="ref_steps"),  # 0: the exact minimiser replaces the reference
        REF_LR,
    )


_ALT_PROTOCOL = (
    "e1(Y) = ||Y W1||^2 + ||Y - B1||^2, e2(Y) = ||W2 Y||^2 + ||Y - B2||^2 (W2 mixes tokens), n = 500, d = 128, "
    "seed 233; 200 plain gradient steps with learning rate 0.05, even steps on e1, odd steps on e2, from "
    "Y0 = 2 U(0,1); reference Y_h* = 600 gradient steps (lr 0.01) on e1 + e2 (--paper; --quick takes the exact "
    "minimiser of e1 + e2 from its Sylvester equation, which those steps reach to ~1e-12 relative error)."
)


@figure(
    "yang2022-alternating-trace",
    description="Yang et al. 2022 Fig 2: PCA(2) of the iterates of alternating descent on two energies, with Y0, Y_h*.",
    claim=(
        "Alternating descent steps on two energy terms (the attention/FFN pattern of a Transformer layer) head for "
        "the minimiser of the sum (MATH §1.6). Reported, not tuned: where the trajectory ends relative to Y_h*."
    ),
    caption=(
        "Iterates of alternating gradient descent projected on their first two principal components (left: whole "
        "trajectory, colour = step; right: zoom around Y_h*), with the start Y0 and the reference minimiser Y_h* of "
        "the sum marked; crosses: the 2-cycle that alternating steps with this fixed step size converge to (exact "
        "fixed point of one e1-then-e2 pair of steps, an analysis added by this project). Protocol: "
        + _ALT_PROTOCOL
        + " Random matrices differ from the paper's (different random stream); the protocol is the same."
    ),
    paper_seed=233,
)
def compute_alternating_trace(cfg: FigureConfig) -> dict[str, Any]:
    """The PCA(2) projection of the shared alternating-descent run (Fig 2)."""
    run = _alternating(cfg)
    keys = ("n", "d", "steps", "lr", "ref_steps", "ref_lr", "pca_traj", "pca_Y0", "pca_ref", "pca_cycle", "pca_evr",
            "dist_final_to_ref", "dist_Y0_to_ref", "dist_ref_to_star", "rho")
    return {k: run[k] for k in keys}


@compute_alternating_trace.plot
def plot_alternating_trace(data: dict, cfg: FigureConfig) -> Figure:
    P = np.asarray(data["pca_traj"])
    y0, ref = np.asarray(data["pca_Y0"]), np.asarray(data["pca_ref"])
    t = np.arange(1, len(P) + 1)
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    ax_full, ax_zoom = fig.subplots(1, 2)
    tail = P[len(P) // 2:]
    half = 1.3 * max(float(np.abs(tail - ref).max()), 1e-12)
    for ax in (ax_full, ax_zoom):
        ax.plot(P[:, 0], P[:, 1], "-", color="0.75", lw=0.7, zorder=1)
        sc = ax.scatter(P[:, 0], P[:, 1], c=t, cmap="viridis", s=10, zorder=2)
        ax.plot(*ref, "r*", ms=14, zorder=3, label=r"$Y_h^*$ (minimiser of $e_1+e_2$)")
        cyc = np.asarray(data["pca_cycle"])
        ax.plot(cyc[:, 0], cyc[:, 1], "x", color="k", ms=9, mew=2, zorder=3,
                label="limit 2-cycle of the alternating steps")
        ax.set_xlabel(f"PC1 ({data['pca_evr'][0]:.1%} of variance)")
        ax.set_ylabel(f"PC2 ({data['pca_evr'][1]:.1%})")
    ax_full.plot(*y0, "ks", ms=8, zorder=3, label=r"$Y^0$")
    ax_full.set_title("alternating steps: even on $e_1$, odd on $e_2$")
    ax_full.legend(fontsize=8)
    ax_zoom.set_xlim(ref[0] - half, ref[0] + half)
    ax_zoom.set_ylim(ref[1] - half, ref[1] + half)
    ax_zoom.set_title(r"zoom around $Y_h^*$ (last half of the iterates)")
    fig.colorbar(sc, ax=ax_zoom, label="step t")
    fig.suptitle("Yang et al. 2022, Fig 2 (protocol): alternating descent on two energies")
    return fig


@compute_alternating_trace.summary
def summarize_alternating_trace(data: dict) -> dict[str, Any]:
    out = {
        "final_distance_to_Y_h*_relative": measured(
            data["dist_final_to_ref"] / data["dist_Y0_to_ref"],
            note="||Y^T - Y_h*||_F / ||Y^0 - Y_h*||_F after the last step (full space, not the PCA plane)",
        ),
        "pca_explained_variance_PC1_PC2": measured(
            [float(v) for v in data["pca_evr"]], note="share of the trajectory's variance in the plotted plane",
        ),
    }
    if data["ref_steps"] > 0:
        out["reference_Y_h*_error"] = measured(
            data["dist_ref_to_star"] / data["dist_Y0_to_ref"], target=0.0, tolerance=1e-6,
            note="||Y_h* - Y*||_F / ||Y^0 - Y_h*||_F, Y* = exact minimiser (Sylvester equation): reference converged",
        )
    return out


@figure(
    "yang2022-alternating-energy",
    description="Yang et al. 2022 Fig 3: total energy log E(Y^t) - log E_min along alternating descent.",
    claim=(
        "Descent on each term does not imply descent on the sum (MATH §1.6): the total energy of alternating steps "
        "has a decreasing trend but need not be monotone. Reported as measured, not tuned; beside it the exact "
        "linear-algebra prediction for this fixed step size (the 2-cycle the iterates converge to)."
    ),
    caption=(
        "log E(Y^t) - log E_min of the total energy E = e1 + e2 after each alternating step (E_min = minimum along the "
        "trajectory); dashed: the reference minimiser Y_h* of the sum; dotted: the energies of the 2-cycle that "
        "alternating steps with this fixed step size converge to. Protocol: " + _ALT_PROTOCOL + " Random matrices "
        "differ from the paper's (different random stream); the protocol is the same. The run is shared with "
        "yang2022-alternating-trace (computed once per process)."
    ),
    paper_seed=233,
)
def compute_alternating_energy(cfg: FigureConfig) -> dict[str, Any]:
    """The energies along the shared alternating-descent run and at its predicted 2-cycle (Fig 3)."""
    run = _alternating(cfg)
    keys = ("n", "d", "steps", "lr", "ref_steps", "ref_lr", "E", "e1", "e2", "E0", "e1_0", "e2_0", "E_ref", "E_star",
            "E_cycle_even", "E_cycle_odd", "rho", "lr_L1", "lr_L2")
    return {k: run[k] for k in keys}


@compute_alternating_energy.plot
def plot_alternating_energy(data: dict, cfg: FigureConfig) -> Figure:
    E = np.asarray(data["E"])
    E_min = E.min()
    t = np.arange(1, len(E) + 1)
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(t, np.log(E) - np.log(E_min), "-", color="C0", lw=1, label=r"$\log E(Y^t) - \log E_{\min}$")
    ax.plot(t[0::2], np.log(E[0::2]) - np.log(E_min), ".", color="C0", ms=3, label="after an $e_1$ step")
    ax.plot(t[1::2], np.log(E[1::2]) - np.log(E_min), ".", color="C3", ms=3, label="after an $e_2$ step")
    ax.axhline(np.log(data["E_ref"]) - np.log(E_min), ls="--", color="k", lw=1, label=r"$Y_h^*$")
    for key, lab in (("E_cycle_even", "2-cycle limit (after $e_1$)"), ("E_cycle_odd", "2-cycle limit (after $e_2$)")):
        ax.axhline(np.log(data[key]) - np.log(E_min), ls=":", color="0.4", lw=1, label=lab)
    ax.set_xlabel("step t")
    ax.set_ylabel(r"$\log E(Y^t) - \log E_{\min}$")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=8)
    ax.set_title("Yang et al. 2022, Fig 3 (protocol): total energy along alternating descent")
    return fig


@compute_alternating_energy.summary
def summarize_alternating_energy(data: dict) -> dict[str, Any]:
    E = np.asarray(data["E"])
    dE = np.diff(np.concatenate([[data["E0"]], E]))  # change made by step t (t = 0 … steps-1)
    up = dE > 0
    d1 = np.diff(np.concatenate([[data["e1_0"]], data["e1"]]))  # change of e1 made by step t
    d2 = np.diff(np.concatenate([[data["e2_0"]], data["e2"]]))
    final_even, final_odd = (E[-2], E[-1]) if len(E) % 2 == 0 else (E[-1], E[-2])
    out = {
        "E_monotone_nonincreasing": measured(bool(not up.any()), note="over all steps, from E(Y^0)"),
        "n_increases": measured(int(up.sum()), note=f"steps that increased E, out of {len(E)}"),
        "n_increases_on_e1_steps": measured(int(up[0::2].sum())),
        "n_increases_on_e2_steps": measured(int(up[1::2].sum())),
        "own_term_increases_on_e1_steps": measured(
            int((d1[0::2] > 0).sum()), note="e1 steps that increased e1 itself (not a descent step on their own term)"
        ),
        "own_term_increases_on_e2_steps": measured(
            int((d2[1::2] > 0).sum()), note="e2 steps that increased e2 itself"
        ),
        "largest_relative_increase": measured(float((dE / np.concatenate([[data["E0"]], E[:-1]])).max())),
        "final_gap_to_E(Y_h*)": measured(
            float(E[-1] / data["E_ref"] - 1), note="E(Y^T)/E(Y_h*) - 1 after the last step"
        ),
        "lr*L(e2)": measured(
            data["lr_L2"], note="step size times Lipschitz const. of grad e2; a lone e2 step is safe iff < 2"
        ),
        "pair_contraction_rho": measured(data["rho"], note="linear rate per (e1, e2) pair of steps; < 1: converges"),
        "final_E_after_e2_step_vs_2cycle": measured(
            float(final_odd), target=data["E_cycle_odd"], tolerance=1e-3 * data["E_cycle_odd"],
            note="converged to the predicted 2-cycle within 0.1% (only if rho^(steps/2) is small)",
        ),
        "final_E_after_e1_step_vs_2cycle": measured(
            float(final_even), target=data["E_cycle_even"], tolerance=1e-3 * data["E_cycle_even"],
        ),
    }
    if data["ref_steps"] > 0:
        out["E(Y_h*)_vs_exact_min"] = measured(
            data["E_ref"], target=data["E_star"], tolerance=1e-9 * abs(data["E_star"]),
            note="reference of the protocol (gradient descent on the sum) vs the exact minimum (Sylvester equation)",
        )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Fig 4: "divergence" regions
# ----------------------------------------------------------------------------------------------------------------------


@figure(
    "yang2022-divergence",
    description="Yang et al. 2022 Fig 4: regions div(x) >= -kappa of the ReLU-truncation criterion, kappa = 0.2..0.8.",
    claim=(
        "Probably the condition under which a ReLU-truncated step still counts as an inexact descent step [open, "
        "MATH §1.8]; no theorem is tested. What is checked: div(x) lies in [-1, 0] everywhere, as it must."
    ),
    caption=(
        "Shaded: points x in [-5, 5)^2 (grid step 0.02) with div(x) >= -kappa, div(x) = sum_k min(0, x_k^2 - "
        "s_k(x)^2) / ||s(x)||^2, s(x) = alpha (x W + x - b) = alpha grad h(x), h(x) = x^T W x / 2 + ||x - b||^2 / 2, "
        "W = A A^T, A ~ randn(2,2), b ~ randn(1,2), alpha = 0.25, seed 23333; kappa = 0.2, 0.4, 0.6, 0.8. The star "
        "marks the minimiser of h (s = 0). This is probably the condition under which a ReLU-truncated step still "
        "counts as an inexact descent step; [open]. Random draws differ from the paper's (different random stream)."
    ),
    paper_seed=23333,
)
def compute_divergence(cfg: FigureConfig) -> dict[str, Any]:
    """Draw ``W = AAᵀ``, ``b`` and rasterise ``div(x) ≥ −κ`` for each ``κ`` (MATH §1.8, Fig 4)."""
    grid = _RegionGrid.make(cfg, DIVERGENCE_BOX, tiny_step=0.25)
    A = torch.randn(2, 2, generator=grid.generator, dtype=DTYPE)
    b = torch.randn(1, 2, generator=grid.generator, dtype=DTYPE)
    W = A @ A.T
    alpha = DIVERGENCE_ALPHA
    div = divergence(grid.X, W, b, alpha)
    x_star = torch.linalg.solve((W + torch.eye(2, dtype=DTYPE)).T, b.reshape(2))  # x (W + I) = b
    valid = ~torch.isnan(div)
    panels = [{"kappa": kappa, **_mask_record((div >= -kappa) & valid)} for kappa in DIVERGENCE_KAPPAS]
    return {
        "A": A, "b": b.reshape(2), "W": W, "alpha": alpha, **grid.record(), "x_star": x_star,
        "div_min": float(div[valid].min()), "div_max": float(div[valid].max()),
        "n_undefined": int((~valid).sum()), "panels": panels,
    }


@compute_divergence.plot
def plot_divergence(data: dict, cfg: FigureConfig) -> Figure:
    fig = Figure(figsize=(13, 3.7), layout="constrained")
    axes = fig.subplots(1, len(data["panels"]))
    for ax, panel in zip(axes, data["panels"]):
        _draw_region(ax, panel, data, "Greens",
                     rf"$\mathrm{{div}}(x) \geq -{panel['kappa']}$  (area {panel['fraction']:.1%})")
        ax.axhline(0, color="0.5", lw=0.6)
        ax.axvline(0, color="0.5", lw=0.6)
        ax.plot(*data["x_star"], "r*", ms=12, label=r"minimiser of $h$ ($s=0$)")
    axes[0].set_ylabel(r"$x_2$")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(rf"Yang et al. 2022, Fig 4 (protocol): $s(x) = \alpha(xW + x - b)$, $\alpha = {data['alpha']}$")
    return fig


@compute_divergence.summary
def summarize_divergence(data: dict) -> dict[str, Any]:
    out = {
        f"area_fraction_kappa={p['kappa']}": measured(p["fraction"], note="share of the box with div >= -kappa")
        for p in data["panels"]
    }
    out["div_range_within_[-1,0]"] = measured(
        [data["div_min"], data["div_max"]],
        target=[-1.0, 0.0],
        matches=data["div_min"] >= -1.0 and data["div_max"] <= 0.0,
        note="min and max of div over the grid; the definition bounds it to [-1, 0]",
    )
    return out
