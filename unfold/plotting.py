"""Plots of an unfolded model's trace: :func:`plot_trace` (used by ``python -m unfold trace --plot``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from energy._validation import EnergyInputError

__all__ = ["plot_trace"]


def _layer_totals(info: Mapping[str, Any]) -> torch.Tensor:
    """The total energy at the layer boundaries, shape ``(layers + 1, inputs)``, from a step or layer trace."""
    try:
        total = info["energies"]["total"]
    except (KeyError, TypeError):
        raise EnergyInputError("plot_trace: `info` must be the trace dict of `model(X, trace=True)` (with "
                               "info['energies']['total']); got "
                               f"{type(info).__name__} without it. Call the model with trace=True.") from None
    if not isinstance(total, torch.Tensor) or total.ndim < 1 or total.shape[0] < 1:
        raise EnergyInputError("plot_trace: info['energies']['total'] must be a tensor with one row per state; got "
                               f"{type(total).__name__}. Pass the info of `model(X, trace=True)` unchanged.")
    if "layer_of_state" in info and "t" in info:
        layers = list(info["layer_of_state"])
        t = list(info["t"])
        steps = info.get("step_names") or []
        depth = layers[-1] + 1 if layers else 0
        per_layer = len(steps) // depth if depth else 1
        keep = [i for i, ti in enumerate(t) if per_layer and ti % per_layer == 0]
        total = total[keep]
    total = total.detach().double()
    return total.reshape(total.shape[0], -1)


def plot_trace(info: Mapping[str, Any], path: str | os.PathLike[str] | None = None, *, title: str = "") -> Any:
    """Box plots (no fliers) and the mean of ``E(Yˡ) − min`` over the inputs, per layer ``ℓ`` (as MATH §1.8).

    Args:
        info: the trace of ``model(X, trace=True)`` or ``trace="layer"`` (its ``info["energies"]["total"]``).
        path: if given, the picture is written there (atomically; the format follows the suffix, PNG by default).
        title: the plot title.

    Returns:
        The :class:`matplotlib.figure.Figure` (closed when ``path`` is given).

    Raises:
        EnergyInputError: ``info`` is not a trace.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from energy._io import atomic_write

    E = _layer_totals(info)
    rel = (E - E.min()).detach().cpu().numpy()  # (layers + 1, inputs); matplotlib reads host memory
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.boxplot(list(rel), positions=list(range(rel.shape[0])), showfliers=False)
    ax.plot(range(rel.shape[0]), rel.mean(-1), "o-", color="C3", label="mean")
    ax.set_xlabel("layer ℓ")
    ax.set_ylabel("E(Yˡ) − E_min")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        try:
            atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=120))
        finally:
            plt.close(fig)
    return fig
