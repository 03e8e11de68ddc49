r"""Concave, non-decreasing kernels ρ for the pairwise attention energy (MATH §1.1).

The attention energy is :math:`E(Y) = \sum_{i<j} \rho(z_{ij})` with :math:`z_{ij} = \tfrac12\|y_i-y_j\|_W^2`.
Each kernel provides

* ``rho(z)``   – :math:`\rho(z)`, concave and non-decreasing on :math:`z \ge 0`;
* ``drho(z)``  – :math:`\gamma = \rho'(z) \ge 0`, the (unnormalised) attention weight;
* ``d2rho(z)`` – :math:`\rho''(z) \le 0` (used by the curvature code);
* ``name`` and ``psd_gram``.

``psd_gram`` says whether the weight matrix :math:`\Gamma = [\rho'(z_{ij})]` is positive semi-definite for *every*
point cloud and every metric. It decides the guaranteed step-size range of the metric-preconditioned step
(MATH §1.1, "Guarantee"): :math:`\alpha \in (0, 2)` if :math:`\Gamma \succeq 0`, otherwise :math:`\alpha \in (0, 1]`.

**When is Γ ⪰ 0?** :math:`\Gamma_{ij} = \varphi(\|x_i - x_j\|^2)` with :math:`\varphi(t) = \rho'(t/2)` and
:math:`x_i = W^{1/2} y_i`. By Schoenberg's theorem (Schoenberg 1938; Wendland, *Scattered Data Approximation*,
2005, Ch. 7) such a matrix is positive semi-definite for all point sets in all dimensions whenever
:math:`\varphi` is *completely monotone* on :math:`[0, \infty)`, i.e. :math:`(-1)^m \varphi^{(m)} \ge 0` for all
:math:`m`. This holds for all three kernels below:

* Gaussian: :math:`\rho' = e^{-z}` (the Gaussian kernel);
* power, :math:`p < 2`: :math:`\rho' \propto (z + \varepsilon)^{p/2 - 1}` (an inverse multiquadric);
  :math:`p = 2`: :math:`\rho' \equiv 1` (the all-ones matrix, rank one);
* Cauchy: :math:`\rho' = (1 + z)^{-1}` (inverse multiquadric with exponent 1).

So all three carry ``psd_gram = True``; ``tests/test_kernels.py`` checks the smallest eigenvalue of Γ numerically.
MATH §1.1 only claims :math:`(0, 1]` for the non-Gaussian kernels; the wider range follows from the same
argument as for the Gaussian once Γ ⪰ 0 is known. A user-defined kernel (subclass :class:`Kernel`) defaults to
``psd_gram = False`` and therefore to the range :math:`(0, 1]`, which holds for any concave non-decreasing ρ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from energy._validation import EnergyInputError

__all__ = ["Kernel", "GaussianKernel", "PowerKernel", "CauchyKernel"]


class Kernel:
    r"""A concave, non-decreasing :math:`\rho: [0, \infty) \to \mathbb{R}` with :math:`\rho'(0) > 0`.

    Subclasses implement :meth:`rho`, :meth:`drho`, :meth:`d2rho` and set ``name``. Set ``psd_gram = True`` only
    if :math:`\Gamma = [\rho'(z_{ij})] \succeq 0` for every point cloud (e.g. :math:`\rho'` completely monotone);
    otherwise the metric-preconditioned step is only guaranteed to descend for :math:`\alpha \in (0, 1]`.
    """

    name: str = "kernel"
    psd_gram: bool = False

    def rho(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def drho(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def d2rho(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class GaussianKernel(Kernel):
    r"""Gaussian kernel :math:`\rho(z) = -e^{-z}`: its normalised weights are softmax attention (MATH §1.1).

    .. math:: \gamma_{ij} = \rho'(z_{ij}) = e^{-z_{ij}} = e^{-\frac12\|y_i - y_j\|_W^2},
        \qquad D^{-1}\Gamma Y = \mathrm{softmax}_\beta(Y W Y^\top)\, Y .

    >>> import torch
    >>> GaussianKernel().drho(torch.tensor([0.0]))
    tensor([1.])
    """

    name = "gaussian"
    psd_gram = True

    def rho(self, z: Tensor) -> Tensor:
        return -torch.exp(-z)

    def drho(self, z: Tensor) -> Tensor:
        return torch.exp(-z)

    def d2rho(self, z: Tensor) -> Tensor:
        return -torch.exp(-z)

    def __repr__(self) -> str:
        return "GaussianKernel()"


class PowerKernel(Kernel):
    r"""Power kernel :math:`\rho(z) = (z + \varepsilon)^{p/2}`, :math:`0 < p \le 2`, :math:`\varepsilon > 0`.

    With :math:`z = \tfrac12\|y_i - y_j\|^2_W` this is a smoothed :math:`\|y_i - y_j\|_W^p` penalty (robust for
    :math:`p < 2`); the weights are those of iteratively reweighted least squares (IRLS):

    .. math:: \gamma_{ij} = \tfrac{p}{2}\,(z_{ij} + \varepsilon)^{p/2 - 1}.

    ``eps`` keeps :math:`\rho'(0)` finite; it is also the self-weight :math:`\gamma_{ii} = \tfrac p2
    \varepsilon^{p/2-1}` of each token, so a small ``eps`` makes every token attend mostly to itself.

    Args:
        p: exponent in ``(0, 2]`` (``p = 2`` is the quadratic energy, uniform weights).
        eps: smoothing, ``> 0``.
    """

    psd_gram = True

    def __init__(self, p: float = 1.0, eps: float = 1e-2) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 < p <= 2.0:
            raise EnergyInputError(
                f"`p` must be a real number in (0, 2] (ρ(z) = (z + eps)^(p/2) is concave only there), got {p!r}."
            )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0.0:
            raise EnergyInputError(
                f"`eps` must be a finite real number > 0 (it keeps ρ'(0) = (p/2)·eps^(p/2-1) finite), got {eps!r}."
            )
        self.p = float(p)
        self.eps = float(eps)
        self.name = f"power(p={self.p:g}, eps={self.eps:g})"

    def rho(self, z: Tensor) -> Tensor:
        return (z + self.eps) ** (self.p / 2)

    def drho(self, z: Tensor) -> Tensor:
        return (self.p / 2) * (z + self.eps) ** (self.p / 2 - 1)

    def d2rho(self, z: Tensor) -> Tensor:
        return (self.p / 2) * (self.p / 2 - 1) * (z + self.eps) ** (self.p / 2 - 2)

    def __repr__(self) -> str:
        return f"PowerKernel(p={self.p:g}, eps={self.eps:g})"


class CauchyKernel(Kernel):
    r"""Cauchy (Lorentzian) kernel :math:`\rho(z) = \log(1 + z)`, weights :math:`\gamma_{ij} = 1/(1 + z_{ij})`.

    The weights decay polynomially, :math:`\gamma \sim 2/\|y_i - y_j\|_W^2`, instead of exponentially: a heavy-tailed
    attention.
    """

    name = "cauchy"
    psd_gram = True

    def rho(self, z: Tensor) -> Tensor:
        return torch.log1p(z)

    def drho(self, z: Tensor) -> Tensor:
        return 1.0 / (1.0 + z)

    def d2rho(self, z: Tensor) -> Tensor:
        return -1.0 / (1.0 + z) ** 2

    def __repr__(self) -> str:
        return "CauchyKernel()"
