r"""Randomised and Krylov estimators for matrices known only through products (MATH §3.7).

Every estimator accepts

* a :class:`energy.hessian.operators.LinearOperator` (products by ``matmat``: all probe vectors in one batch),
* anything with ``.shape`` and ``.matmat`` (e.g. a ``scipy.sparse.linalg.LinearOperator``), or with ``.shape``
  and ``@`` (torch-based operators such as curvlinops'), or ``.shape`` and ``.matvec``,
* a dense 2-D ``torch.Tensor``,
* or a callable ``matvec(v) -> A v`` together with ``dim=`` (applied column by column).

Randomness comes only from the ``generator`` argument (a ``torch.Generator``; ``None`` = a fresh generator
seeded with 0, so results are reproducible by default). Probe vectors are drawn in one batch.

Estimators and their equations (``z`` with i.i.d. Rademacher or standard normal entries, ``E z zᵀ = I``):

.. math::
    \operatorname{tr} A = \mathbb E\, z^\top A z, \qquad
    \operatorname{diag} A = \mathbb E\, z \odot A z \;(\text{Rademacher}), \qquad
    \|A\|_F^2 = \mathbb E\, \|A z\|^2 .

Each Hutchinson estimate is the sample mean over ``S`` probes and is returned with its standard error
``std / √S``. Hutch++ (Meyer, Musco, Musco, Woodruff 2021) removes the dominant range first:
``Q = orth(A S)``, ``tr A = tr(Qᵀ A Q) + tr(P⊥ A P⊥)`` with ``P⊥ = I − Q Qᵀ``; the second term by Hutchinson.
The same split gives ``‖A‖_F² = ‖A Q‖_F² + ‖A P⊥‖_F²`` (exact: ``tr(M P) = tr(P M P)`` for a projector ``P``).

Lanczos and stochastic Lanczos quadrature live in :mod:`energy.hessian.krylov` (same operator access and probes).

Asking for more probe vectors than the dimension ``n`` raises :class:`EnergyInputError` -- with ``n`` products the
exact value is available -- unless ``exact_if_cheaper=True``, in which case the exact value is computed from
``A I`` (``n`` products) and returned with standard error 0. Lanczos and SLQ refuse more eigenpairs/steps than ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from energy._validation import (
    ConstraintError,
    EnergyInputError,
    check_readable,
    check_result,
    check_tensor,
    default_tolerance,
)
from energy.hessian.curvature_operators import CurvatureOperator
from energy.hessian.token_operator import TokenHessianOperator

__all__ = [
    "Estimate",
    "as_matmat",
    "draw_probes",
    "hutchinson_trace",
    "hutchinson_diagonal",
    "hutchinson_squared_frobenius",
    "hutchpp_trace",
    "hutchpp_squared_frobenius",
    "check_symmetric_operator",
]

Distribution = Literal["rademacher", "normal"]


class Estimate(NamedTuple):
    """An estimate with its standard error and the number of operator products it cost."""

    value: Any  # float, or a Tensor for the diagonal
    stderr: Any
    num_matvecs: int


# --------------------------------------------------------------------------------------------------------------
# Operator access
# --------------------------------------------------------------------------------------------------------------


def as_matmat(
    A: Any, dim: int | None = None, *, dtype: torch.dtype = torch.float64
) -> tuple[Callable[[Tensor], Tensor], tuple[int, int], torch.dtype]:
    """Normalise ``A`` to ``(matmat, shape, dtype)`` (see :func:`_as_matmat`); a ``dim`` given with an operator or a
    tensor must agree with its shape (it is not silently ignored).
    """
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise EnergyInputError(f"`dim` must be a positive int or None, got {dim!r}.")
    mm, shape, op_dtype = _as_matmat(A, dim, dtype=dtype)
    if dim is not None and shape[1] != dim:
        raise EnergyInputError(
            f"`dim`={dim} does not match the shape {shape} of `A` (n = {shape[1]}); omit `dim` (it is only needed "
            "for a matvec callable) or pass dim={shape[1]}."
        )
    return mm, shape, op_dtype


def _as_matmat(
    A: Any, dim: int | None = None, *, dtype: torch.dtype = torch.float64
) -> tuple[Callable[[Tensor], Tensor], tuple[int, int], torch.dtype]:
    """Normalise ``A`` to ``(matmat, shape, dtype)`` with ``matmat: (n, k) -> (m, k)`` tensors in ``dtype``.

    Args:
        A: operator with ``.matmat`` and ``.shape``, dense 2-D tensor, or matvec callable (needs ``dim``).
        dim: the dimension when ``A`` is a callable.
        dtype: the dtype of the probes for a callable or a numpy-based operator.
    """
    if isinstance(A, Tensor):
        if A.ndim != 2:
            raise EnergyInputError(f"`A` must be a 2-D tensor, got shape {tuple(A.shape)}.")
        check_tensor(check_readable(A, "A", "an estimator"), "A", ndim=2)  # floating, finite, with values
        return (lambda V: A @ V.to(A.device, A.dtype)), (A.shape[0], A.shape[1]), A.dtype
    if hasattr(A, "matmat") and hasattr(A, "shape"):
        op_dtype = getattr(A, "dtype", dtype)
        if isinstance(op_dtype, torch.dtype):
            return A.matmat, (int(A.shape[0]), int(A.shape[1])), op_dtype

        def mm(V: Tensor) -> Tensor:  # numpy-based (e.g. scipy) operator
            return torch.as_tensor(np.asarray(A.matmat(V.detach().cpu().numpy())), dtype=V.dtype, device=V.device)

        return mm, (int(A.shape[0]), int(A.shape[1])), dtype
    if hasattr(A, "shape") and len(A.shape) == 2 and (hasattr(A, "matvec") or hasattr(A, "__matmul__")):
        shape = (int(A.shape[0]), int(A.shape[1]))
        op_dtype = getattr(A, "dtype", dtype)
        op_dtype = op_dtype if isinstance(op_dtype, torch.dtype) else dtype
        if hasattr(A, "__matmul__"):  # torch-based operators (e.g. curvlinops') multiply matrices with `@`
            device = _device_of(A)  # probes are moved to the operator's device (a CPU operator when it has none)
            return (lambda V: torch.as_tensor(A @ V.to(device, op_dtype))), shape, op_dtype

        def mv_cols(V: Tensor) -> Tensor:  # results brought to the probes' device (the CPU, see _device_of)
            return torch.stack([torch.as_tensor(A.matvec(V[:, j])).reshape(-1).to(V.device)
                                for j in range(V.shape[1])], dim=1)

        return mv_cols, shape, op_dtype
    if callable(A):
        if dim is None or not isinstance(dim, int) or dim < 1:
            raise EnergyInputError(f"a matvec callable needs `dim` (a positive int), got dim={dim!r}.")

        def mm_cols(V: Tensor) -> Tensor:  # a callable may answer on any device: results join the probes' device
            return torch.stack([torch.as_tensor(A(V[:, j])).reshape(-1).to(V.device) for j in range(V.shape[1])],
                               dim=1)

        return mm_cols, (dim, dim), dtype
    raise EnergyInputError(
        f"`A` must be a linear operator (with .matmat and .shape), a 2-D tensor or a matvec callable with `dim`, "
        f"got {type(A).__name__}."
    )


def _device_of(A: Any) -> torch.device | None:
    """The device of an operator or tensor (``None`` = CPU, e.g. for scipy operators and callables)."""
    device = getattr(A, "device", None)
    return device if isinstance(device, torch.device) else None


def check_symmetric_operator(A: Any, mm: Callable[[Tensor], Tensor], n: int, dtype: torch.dtype, what: str) -> None:
    r"""Raise unless ``A`` is symmetric, for the routines that assume it (:func:`lanczos`, :func:`slq_density`).

    A dense tensor is checked entrywise (``max |A − Aᵀ| ≤ 1e3·eps·max(1, max|A|)``, :class:`ConstraintError`).
    Any other operator gets one randomized probe at the start: two fixed random vectors ``u, v`` (their own
    generator, so the caller's random stream is unchanged) and one product with both,
    :math:`|u^	op(Av) - v^	op(Au)| \le 100\sqrt{arepsilon}\,(\|u\|\|Av\| + \|v\|\|Au\|)`; a non-finite product
    raises :class:`EnergyInputError`. The library's curvature operators are symmetric by construction and skip the
    probe (it costs one data pass there).
    """
    if isinstance(A, Tensor):
        Ad = A.detach()
        gap = float((Ad - Ad.T).abs().max()) if A.numel() else 0.0
        tol = default_tolerance(Ad)
        if gap > tol:
            raise ConstraintError(
                f"{what} needs a symmetric matrix `A` (max |A − Aᵀ| = {gap:.3e} > tol {tol:.1e}); its results for a "
                "non-symmetric matrix are unrelated to the eigenvalues. Pass the symmetric part (A + A.T) / 2, or use "
                "torch.linalg.eigvals / svdvals for a non-symmetric matrix."
            )
        return
    if isinstance(A, (CurvatureOperator, TokenHessianOperator)):
        return
    g = torch.Generator().manual_seed(20240)
    UV = torch.randn(n, 2, generator=g, dtype=torch.float64).to(dtype)
    AUV = torch.as_tensor(mm(UV)).to("cpu", torch.float64)  # a one-off check, on the CPU with u, v
    if not bool(torch.isfinite(AUV).all()):
        raise EnergyInputError(
            f"{what}: the products of `A` are not finite (NaN/inf) on random unit-scale vectors; check the operator "
            "(its data or weights) for NaN/inf entries."
        )
    u, v, Au, Av = UV[:, 0].double(), UV[:, 1].double(), AUV[:, 0], AUV[:, 1]
    gap = abs(float(u @ Av - v @ Au))
    tol = 100 * math.sqrt(torch.finfo(dtype).eps) * float(u.norm() * Av.norm() + v.norm() * Au.norm())
    if gap > tol:
        raise ConstraintError(
            f"{what} needs a symmetric operator `A`, but a random probe gives |uᵀ(Av) − vᵀ(Au)| = {gap:.3e} > "
            f"{tol:.1e}; pass the symmetric part (A + Aᵀ)/2, or use an SVD routine for a non-symmetric operator."
        )


def _square(shape: tuple[int, int], what: str) -> int:
    if shape[0] != shape[1]:
        raise EnergyInputError(f"{what} needs a square operator, got shape {shape}.")
    return shape[0]


def draw_probes(
    n: int,
    k: int,
    *,
    generator: torch.Generator | None = None,
    distribution: str = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """``k`` probe vectors of length ``n`` as the columns of an ``(n, k)`` tensor: the one place probes are drawn.

    Rademacher (``±1``) or standard normal entries, drawn on the CPU from ``generator`` (so a seed gives the same
    probes on every device) and moved to ``device`` (default: the CPU).
    """
    for name, value in (("n", n), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EnergyInputError(f"`{name}` must be an int ≥ 0 (probes are (n, k)), got {value!r}.")
    gen = _gen(generator)
    if distribution == "rademacher":
        Z = (torch.randint(0, 2, (n, k), generator=gen) * 2 - 1).to(dtype)
    elif distribution == "normal":
        Z = torch.randn(n, k, generator=gen, dtype=torch.float64).to(dtype)
    else:
        raise EnergyInputError(f"`distribution` must be 'rademacher' or 'normal', got {distribution!r}.")
    return Z if device is None else Z.to(device)


def _gen(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise EnergyInputError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
    if generator.device.type != "cpu":
        raise EnergyInputError(
            f"`generator` must be a CPU torch.Generator (probes are drawn on the CPU, so a seed gives the same probes "
            f"on every device, then moved to the operator's device), got one on {generator.device}; pass "
            "torch.Generator().manual_seed(seed)."
        )
    return generator


def _count(num: int, name: str, n: int, *, exact_if_cheaper: bool, minimum: int = 1) -> bool:
    """Validate a sample count; return True when the exact evaluation should be used instead."""
    if isinstance(num, bool) or not isinstance(num, int) or num < minimum:
        raise EnergyInputError(f"`{name}` must be an int ≥ {minimum}, got {num!r}.")
    if num > n:
        if exact_if_cheaper:
            return True
        raise EnergyInputError(
            f"`{name}`={num} exceeds the dimension n={n}: n operator products give the exact value. Use fewer "
            "samples, or pass exact_if_cheaper=True to evaluate exactly from A·I."
        )
    return False


def _apply(mm: Callable[[Tensor], Tensor], V: Tensor, batch_size: int | None) -> Tensor:
    """``A V`` in column chunks; a NaN/inf product raises (an estimate from it would be NaN without a word)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise EnergyInputError(
            f"`batch_size` must be a positive int (probes per operator product) or None (all at once), got "
            f"{batch_size!r}."
        )
    if batch_size is None or V.shape[1] <= batch_size:
        out = mm(V)
    else:
        out = torch.cat([mm(V[:, i : i + batch_size]) for i in range(0, V.shape[1], batch_size)], dim=1)
    check_result(out, "the product `A @ V` of the estimator", {"V": V},
                 hint="If the scale is moderate, check the operator `A` for NaN/inf entries.")
    return out


def _exact_matrix(mm: Callable, shape: tuple[int, int], dtype: torch.dtype, batch_size: int | None,
                  device: torch.device | None = None) -> Tensor:
    return _apply(mm, torch.eye(shape[1], dtype=dtype, device=device), batch_size).to(torch.float64)


def _mean_se(x: Tensor) -> tuple[Tensor, Tensor]:
    S = x.shape[0]
    se = x.std(dim=0, unbiased=True) / math.sqrt(S) if S > 1 else torch.full_like(x[0], float("nan"))
    return x.mean(dim=0), se


# --------------------------------------------------------------------------------------------------------------
# Hutchinson family
# --------------------------------------------------------------------------------------------------------------


def _exact_value(quantity: str, M: Tensor) -> float:
    """``tr M`` or ``‖M‖_F²`` of a dense matrix."""
    return float(torch.diagonal(M).sum()) if quantity == "trace" else float((M**2).sum())


def _sample_values(quantity: str, Z: Tensor, AZ: Tensor) -> Tensor:
    """Per-probe samples ``z_sᵀ A z_s`` (trace) or ``‖A z_s‖²`` (squared Frobenius norm), float64."""
    Z, AZ = Z.to(torch.float64), AZ.to(torch.float64)
    return (Z * AZ).sum(dim=0) if quantity == "trace" else (AZ**2).sum(dim=0)


def _hutchinson(
    quantity: str, A: Any, num_samples: int, generator: torch.Generator | None, distribution: str, dim: int | None,
    batch_size: int | None, exact_if_cheaper: bool,
) -> Estimate:
    """The Hutchinson estimator of ``tr A`` or ``‖A‖_F²`` (one code path for both quantities)."""
    mm, shape, dtype = as_matmat(A, dim)
    n = _square(shape, f"hutchinson_{quantity}") if quantity == "trace" else shape[1]
    if _count(num_samples, "num_samples", n, exact_if_cheaper=exact_if_cheaper):
        return Estimate(_exact_value(quantity, _exact_matrix(mm, shape, dtype, batch_size, _device_of(A))), 0.0, n)
    Z = draw_probes(n, num_samples, generator=generator, distribution=distribution, dtype=dtype,
                    device=_device_of(A))
    mean, se = _mean_se(_sample_values(quantity, Z, _apply(mm, Z, batch_size)))
    return Estimate(float(mean), float(se), num_samples)


def _hutchpp(
    quantity: str, A: Any, num_matvecs: int, generator: torch.Generator | None, distribution: str, dim: int | None,
    exact_if_cheaper: bool,
) -> Estimate:
    """Hutch++ for ``tr A`` or ``‖A‖_F²``: exact on the sketched range ``Q``, Hutchinson on its complement."""
    mm, shape, dtype = as_matmat(A, dim)
    n = _square(shape, f"hutchpp_{quantity}")
    exact, k = _hutchpp_split(num_matvecs, n, "num_matvecs", exact_if_cheaper)
    if exact:
        return Estimate(_exact_value(quantity, _exact_matrix(mm, shape, dtype, None, _device_of(A))), 0.0, n)
    g = _gen(generator)
    S = draw_probes(n, k, generator=g, distribution=distribution, dtype=dtype, device=_device_of(A))
    G = draw_probes(n, k, generator=g, distribution=distribution, dtype=dtype, device=_device_of(A))
    Q, _ = torch.linalg.qr(mm(S).to(torch.float64))
    top = float(_sample_values(quantity, Q, mm(Q.to(dtype))).sum())
    Gp = G.to(torch.float64) - Q @ (Q.T @ G.to(torch.float64))
    mean, se = _mean_se(_sample_values(quantity, Gp, mm(Gp.to(dtype))))
    return Estimate(top + float(mean), float(se), 3 * k)


def hutchinson_trace(A: Any, num_samples: int, *, generator: torch.Generator | None = None,
                     distribution: Distribution = "rademacher", dim: int | None = None,
                     batch_size: int | None = None, exact_if_cheaper: bool = False) -> Estimate:
    r"""Hutchinson: :math:`\operatorname{tr} A \approx \frac1S \sum_s z_s^\top A z_s`, with its standard error.

    Args:
        A: square operator (see module docstring).
        num_samples: ``S``; ``S > n`` raises unless ``exact_if_cheaper``.
        generator: source of the probes.
        distribution: ``"rademacher"`` (minimal variance ``2 Σ_{i≠j} A_ij²``) or ``"normal"``.
        dim: dimension if ``A`` is a callable.
        batch_size: probes per ``matmat`` call (memory bound); ``None`` = all at once.
        exact_if_cheaper: if ``S > n``, return the exact trace (n products).
    """
    return _hutchinson("trace", A, num_samples, generator, distribution, dim, batch_size, exact_if_cheaper)


def hutchinson_diagonal(A: Any, num_samples: int, *, generator: torch.Generator | None = None, dim: int | None = None,
                        batch_size: int | None = None, exact_if_cheaper: bool = False) -> Estimate:
    r"""Diagonal estimate :math:`\operatorname{diag} A \approx \frac1S \sum_s z_s \odot A z_s` (Rademacher ``z``).

    Entry ``i`` has variance :math:`\sum_{j\ne i} A_{ij}^2 / S`; the returned ``stderr`` is the per-entry sample
    standard error (a tensor like ``value``).
    """
    mm, shape, dtype = as_matmat(A, dim)
    n = _square(shape, "hutchinson_diagonal")
    if _count(num_samples, "num_samples", n, exact_if_cheaper=exact_if_cheaper):
        d = torch.diagonal(_exact_matrix(mm, shape, dtype, batch_size, _device_of(A))).clone()
        return Estimate(d, torch.zeros_like(d), n)
    Z = draw_probes(n, num_samples, generator=generator, dtype=dtype, device=_device_of(A))
    samples = (Z * _apply(mm, Z, batch_size)).T.to(torch.float64)  # (S, n)
    mean, se = _mean_se(samples)
    return Estimate(mean, se, num_samples)


def hutchinson_squared_frobenius(A: Any, num_samples: int, *, generator: torch.Generator | None = None,
                                 distribution: Distribution = "rademacher", dim: int | None = None,
                                 batch_size: int | None = None, exact_if_cheaper: bool = False) -> Estimate:
    r""":math:`\|A\|_F^2 = \operatorname{tr}(A^\top A) \approx \frac1S \sum_s \|A z_s\|^2` (any ``m × n`` operator).

    The protocol of MATH §3.7 takes the square root of this with 20 Rademacher probes per block.
    """
    return _hutchinson("squared_frobenius", A, num_samples, generator, distribution, dim, batch_size,
                       exact_if_cheaper)


def _hutchpp_split(num_matvecs: int, n: int, name: str, exact_if_cheaper: bool) -> tuple[bool, int]:
    if not isinstance(num_matvecs, int) or num_matvecs < 3:
        raise EnergyInputError(f"`{name}` must be an int ≥ 3 (sketch, projection, residual), got {num_matvecs!r}.")
    exact = _count(num_matvecs, name, n, exact_if_cheaper=exact_if_cheaper, minimum=3)
    return exact, num_matvecs // 3


def hutchpp_trace(A: Any, num_matvecs: int, *, generator: torch.Generator | None = None,
                  distribution: Distribution = "rademacher", dim: int | None = None,
                  exact_if_cheaper: bool = False) -> Estimate:
    r"""Hutch++ trace estimate with ``num_matvecs`` products (Meyer et al. 2021).

    With ``k = num_matvecs // 3``:

    .. math::
        Q = \operatorname{orth}(A S),\quad P_\perp = I - QQ^\top,\quad
        \mathrm{tr}\,A \approx \mathrm{tr}(Q^\top A Q) + \tfrac1k \mathrm{tr}(G^\top P_\perp A P_\perp G)

    with ``S, G`` of ``k`` random columns each. The standard error is that of the residual Hutchinson term.
    """
    return _hutchpp("trace", A, num_matvecs, generator, distribution, dim, exact_if_cheaper)


def hutchpp_squared_frobenius(A: Any, num_matvecs: int, *, generator: torch.Generator | None = None,
                              distribution: Distribution = "rademacher", dim: int | None = None,
                              exact_if_cheaper: bool = False) -> Estimate:
    r"""Hutch++ for :math:`\|A\|_F^2` of a symmetric ``A`` (curvature blocks).

    With ``k = num_matvecs // 3``,

    .. math::
        Q = \operatorname{orth}(A S),\qquad
        \|A\|_F^2 = \|A Q\|_F^2 + \|A P_\perp\|_F^2 \approx \|AQ\|_F^2 + \frac1k \sum_{s} \|A P_\perp g_s\|^2 .

    The split is exact for any ``A``; ``Q`` spans the dominant range of ``A`` when ``A`` is symmetric (the sketch
    ``A S`` lies in the column space, which for symmetric ``A`` is the row space that matters here).
    """
    return _hutchpp("squared_frobenius", A, num_matvecs, generator, distribution, dim, exact_if_cheaper)
