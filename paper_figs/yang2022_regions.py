r"""Geometry of Yang, Huang & Wipf (NeurIPS 2022) figures 1 and 4: grids, Apollonius regions, "divergence" regions.

The figures themselves (rasterised masks, plots, summaries) are registered in :mod:`paper_figs.yang2022_synthetic`;
this module holds the formulas they rasterise (MATH §1.8), in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "APOLLONIUS_BOX",
    "APOLLONIUS_C",
    "DIVERGENCE_ALPHA",
    "DIVERGENCE_BOX",
    "DIVERGENCE_KAPPAS",
    "apollonius_circle",
    "apollonius_region",
    "divergence",
    "divergence_step",
    "grid_axis",
    "mesh",
    "pixel_extent",
]

DTYPE = torch.float64

APOLLONIUS_C = (0.7, 1.5)
APOLLONIUS_BOX = (-3.5, 3.5)


def grid_axis(lo: float, hi: float, step: float) -> Tensor:
    """The points ``lo, lo + step, …`` below ``hi`` (the half-open interval ``[lo, hi)``), float64.

    Built as ``lo + step·k`` with an integer count, so rounding never adds or drops an end point.
    """
    count = round((hi - lo) / step)
    return lo + step * torch.arange(count, dtype=DTYPE)


def apollonius_region(X: Tensor, y_f: Tensor, y_h: Tensor, C: float) -> Tensor:
    r"""Boolean mask of the points ``x`` (rows of ``X``, shape ``(..., 2)``) with ``‖x − y_f‖ / ‖x − y_h‖ ≤ C``.

    .. math:: \mathcal{A}_C = \{x : \|x - y_f^*\|^2 \le C^2 \|x - y_h^*\|^2\}

    (squared form: no division; the point ``y_h*`` itself, where the ratio is infinite, is outside). MATH §1.8.
    """
    return ((X - y_f) ** 2).sum(-1) <= C**2 * ((X - y_h) ** 2).sum(-1)


def apollonius_circle(y_f: Tensor, y_h: Tensor, C: float) -> tuple[Tensor, float]:
    r"""Centre and radius of the circle bounding :func:`apollonius_region` (``C ≠ 1``).

    Expanding ``‖x − a‖² = C²‖x − b‖²`` (``a = y_f*``, ``b = y_h*``) gives ``‖x − c‖² = r²`` with

    .. math:: c = \frac{a - C^2 b}{1 - C^2}, \qquad r = \frac{C \|a - b\|}{|1 - C^2|}.

    For ``C < 1`` the region is the disc (it contains ``y_f*``); for ``C > 1`` it is the outside of the disc (which
    then contains ``y_h*``).
    """
    if C <= 0 or C == 1:
        raise ValueError(f"C must be positive and != 1 for the region to be bounded by a circle, got C={C}")
    c = (y_f - C**2 * y_h) / (1 - C**2)
    r = C * float(torch.linalg.vector_norm(y_f - y_h)) / abs(1 - C**2)
    return c, r


def pixel_extent(lo: float, hi: float, step: float) -> tuple[float, float, float, float]:
    """Give the imshow extent that centres pixel k on the grid point ``lo + k·step``."""
    return (lo - step / 2, hi - step / 2, lo - step / 2, hi - step / 2)


def mesh(lo: float, hi: float, step: float) -> tuple[Tensor, Tensor]:
    """The grid axis and the ``(n, n, 2)`` points of the square ``[lo, hi)²``, in image layout (rows: ``x₂``)."""
    axis = grid_axis(lo, hi, step)
    x1, x2 = torch.meshgrid(axis, axis, indexing="xy")  # x1 varies along columns, x2 along rows (image layout)
    return axis, torch.stack([x1, x2], dim=-1)


DIVERGENCE_KAPPAS = (0.2, 0.4, 0.6, 0.8)
DIVERGENCE_ALPHA = 0.25
DIVERGENCE_BOX = (-5.0, 5.0)


def divergence_step(X: Tensor, W: Tensor, b: Tensor, alpha: float) -> Tensor:
    """The step vector ``s(x) = α(xW + x − b) = α∇h(x)`` of ``h(x) = ½xᵀWx + ½‖x − b‖²`` (rows of ``X``)."""
    return alpha * (X @ W + X - b)


def divergence(X: Tensor, W: Tensor, b: Tensor, alpha: float) -> Tensor:
    r"""The criterion of Fig 4 (MATH §1.8), NaN where ``s(x) = 0``.

    .. math:: \operatorname{div}(x) = \frac{\sum_k \min(0,\, x_k^2 - s_k(x)^2)}{\|s(x)\|^2} \in [-1, 0].

    The bound ``≥ −1`` holds because ``min(0, x_k² − s_k²) ≥ −s_k²``.
    """
    s = divergence_step(X, W, b, alpha)
    num = torch.clamp(X**2 - s**2, max=0).sum(-1)
    den = s.square().sum(-1)
    return torch.where(den > 0, num / den, torch.full_like(den, float("nan")))


