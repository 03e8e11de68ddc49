r"""σ-sweeps and log–log slope fits for the data-scale experiments (MATH §3.6, §3.7).

The growth-rate figures measure block norms ``‖H_block‖_F`` as functions of the embedding scale σ and compare the
small-σ slope in log–log coordinates with the exponents of MATH §3.6 (``σ²`` for value blocks, ``σ⁶`` for
query/key blocks, ...). Three helpers:

* :func:`fit_loglog_slope` -- least squares of ``log10 v = intercept + slope · log10 σ`` with the slope's
  standard error (optionally weighted by the values' standard errors),
* :func:`fit_window` -- the same fit restricted to the small-σ regime, chosen from the data,
* :func:`sigma_sweep` -- runs ``fn(sigma, seed) -> {name: value}`` over a grid of σ and initialisations, with a
  progress bar and an optional resumable JSON cache (written atomically), and aggregates mean ± standard error.

:data:`THEORY_EXPONENTS` is the one copy of the §3.6 exponent table; the figures and the benchmarks read it here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from energy._io import atomic_write_text
from energy._validation import EnergyInputError

#: Small-σ exponents of MATH §3.6 for a single self-attention layer, ``{block: {part: p}}`` with
#: ``‖part(block)‖_F = Θ(σ^p)`` (``None``: the part vanishes identically). ``H`` has the smaller exponent of its two
#: parts. The one copy of the table (figures, benchmarks and tests read it from here).
THEORY_EXPONENTS: dict[str, dict[str, int | None]] = {
    "VV": {"H_o": 2, "H_f": None, "H": 2},
    "VQ": {"H_o": 4, "H_f": 3, "H": 3},
    "VK": {"H_o": 4, "H_f": 3, "H": 3},
    "QQ": {"H_o": 6, "H_f": 5, "H": 5},
    "KK": {"H_o": 6, "H_f": 5, "H": 5},
    "QK": {"H_o": 6, "H_f": 3, "H": 3},
}

#: A progress wrapper ``progress(iterable, desc, total) -> iterable`` (e.g. a figure config's ``progress``).
Progress = Callable[[Iterable[Any], str, int], Iterable[Any]]

__all__ = ["SlopeFit", "WindowFit", "SweepResult", "fit_loglog_slope", "fit_window", "sigma_sweep"]


class SlopeFit(NamedTuple):
    """``v ≈ 10**intercept · σ**slope``; ``stderr`` is the slope's standard error (NaN with only two points)."""

    slope: float
    stderr: float
    intercept: float


class WindowFit(NamedTuple):
    """A :class:`SlopeFit` on the small-σ window ``sigma[indices]`` (indices into the caller's arrays)."""

    fit: SlopeFit
    indices: np.ndarray
    max_residual: float  # largest |log10 v − fit| inside the window, in decades


def _as_positive(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise EnergyInputError(f"`{name}` is empty.")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        bad = a[~(np.isfinite(a) & (a > 0))][:3]
        raise EnergyInputError(
            f"`{name}` must be finite and > 0 for a log–log fit, found {bad.tolist()}; drop those points "
            "(e.g. exact zeros of a block that vanishes identically)."
        )
    return a


def fit_loglog_slope(
    sigma: Sequence[float] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    *,
    stderr: Sequence[float] | np.ndarray | None = None,
) -> SlopeFit:
    r"""Least-squares line through ``(log10 σ_i, log10 v_i)`` with the standard error of its slope.

    Unweighted: ordinary least squares with
    :math:`\mathrm{se}(\hat p)^2 = \frac{\mathrm{RSS}/(n-2)}{\sum_i (x_i-\bar x)^2}`.
    With ``stderr`` (standard errors ``s_i`` of the ``v_i``) each point gets the weight :math:`w_i = 1/\delta_i^2`,
    :math:`\delta_i = s_i / (v_i \ln 10)` (delta method for ``log10 v``), and the covariance is
    :math:`(X^\top W X)^{-1}` scaled by the reduced :math:`\chi^2` (as ``scipy.optimize.curve_fit`` with
    ``absolute_sigma=False``), so the error reflects both the stated uncertainties and the scatter.

    Args:
        sigma: σ values (> 0).
        values: measured ``v(σ)`` (> 0), one per σ.
        stderr: optional standard errors of ``values`` (then the fit is weighted, see above).

    Returns:
        :class:`SlopeFit` ``(slope, stderr, intercept)``.
    """
    s = _as_positive(sigma, "sigma")
    v = _as_positive(values, "values")
    if s.shape != v.shape:
        raise EnergyInputError(f"`sigma` and `values` must have the same length, got {s.size} and {v.size}.")
    if s.size < 2 or np.unique(s).size < 2:
        raise EnergyInputError(f"need at least two distinct σ values for a slope, got {s.size} point(s).")
    x, y = np.log10(s), np.log10(v)
    if stderr is None:
        w = np.ones_like(x)
    else:
        se = np.asarray(stderr, dtype=np.float64).reshape(-1)
        if se.shape != v.shape or not np.all(np.isfinite(se)) or np.any(se <= 0):
            raise EnergyInputError(
                f"`stderr` must hold one finite positive standard error per value ({v.size}), got {se.tolist()[:5]}."
            )
        w = 1.0 / (se / (v * math.log(10))) ** 2
    X = np.stack([np.ones_like(x), x], axis=1)
    XtW = X.T * w
    cov = np.linalg.inv(XtW @ X)
    intercept, slope = cov @ (XtW @ y)
    resid = y - (intercept + slope * x)
    dof = x.size - 2
    if dof <= 0:
        return SlopeFit(float(slope), float("nan"), float(intercept))
    chi2_red = float((w * resid**2).sum() / dof)
    return SlopeFit(float(slope), float(math.sqrt(cov[1, 1] * chi2_red)), float(intercept))


def fit_window(
    sigma: Sequence[float] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    *,
    stderr: Sequence[float] | np.ndarray | None = None,
    min_points: int = 4,
    tol: float = 0.05,
    max_sigma: float | None = None,
) -> WindowFit:
    r"""Fit the small-σ power law: the largest window of the smallest σ that stays on one line in log–log.

    The points are sorted by σ (``σ ≤ max_sigma`` if given); for each prefix of ``k ≥ min_points`` smallest σ a
    line is fitted (:func:`fit_loglog_slope`), and the largest ``k`` whose residuals all satisfy
    :math:`|\log_{10} v_i - \text{fit}| \le` ``tol`` (decades; 0.05 ≈ 12 %) is returned. The small-σ
    asymptote of MATH §3.6 is a straight line there; saturation at large σ bends it away, which ends the window.
    If even ``min_points`` points do not meet ``tol``, the ``min_points``-point fit is returned (check
    ``max_residual``).
    """
    s = _as_positive(sigma, "sigma")
    v = _as_positive(values, "values")
    if s.shape != v.shape:
        raise EnergyInputError(f"`sigma` and `values` must have the same length, got {s.size} and {v.size}.")
    se = None if stderr is None else np.asarray(stderr, dtype=np.float64).reshape(-1)
    if not isinstance(min_points, int) or min_points < 2:
        raise EnergyInputError(f"`min_points` must be an int ≥ 2, got {min_points!r}.")
    if not (tol > 0):
        raise EnergyInputError(f"`tol` must be > 0 (decades), got {tol!r}.")
    order = np.argsort(s, kind="stable")
    if max_sigma is not None:
        order = order[s[order] <= max_sigma]
    if order.size < min_points:
        raise EnergyInputError(
            f"only {order.size} point(s) with σ ≤ max_sigma={max_sigma}; need min_points={min_points}."
        )
    def window(k: int) -> WindowFit:
        idx = order[:k]
        fit = fit_loglog_slope(s[idx], v[idx], stderr=None if se is None else se[idx])
        r = float(np.abs(np.log10(v[idx]) - (fit.intercept + fit.slope * np.log10(s[idx]))).max())
        return WindowFit(fit, idx.copy(), r)

    best = window(min_points)
    for k in range(min_points + 1, order.size + 1):
        candidate = window(k)
        if candidate.max_residual > tol:
            break
        best = candidate
    return best


# --------------------------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """Raw values ``values[key][i, j]`` at ``sigmas[i]`` and init seed ``seeds[j]``, with mean and standard error
    over inits (``std / √n_inits``, ``ddof = 1``; NaN for one init).
    """

    sigmas: np.ndarray
    seeds: np.ndarray
    values: dict[str, np.ndarray]
    mean: dict[str, np.ndarray] = field(init=False)
    stderr: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        sigmas, seeds = np.asarray(self.sigmas), np.asarray(self.seeds)
        if sigmas.ndim != 1 or seeds.ndim != 1:
            raise EnergyInputError(
                f"`sigmas` and `seeds` must be 1-D arrays, got shapes {sigmas.shape} and {seeds.shape}."
            )
        if not isinstance(self.values, dict):
            raise EnergyInputError(
                f"`values` must be a dict of arrays keyed by quantity, got {type(self.values).__name__}."
            )
        expected = (sigmas.size, seeds.size)
        for k, a in self.values.items():
            if np.shape(a) != expected:
                raise EnergyInputError(
                    f"`values[{k!r}]` must have shape (len(sigmas), len(seeds)) = {expected} (row i: sigmas[i], "
                    f"column j: seeds[j]), got shape {np.shape(a)}."
                )
        n = self.seeds.size
        self.mean = {k: a.mean(axis=1) for k, a in self.values.items()}
        self.stderr = {
            k: (a.std(axis=1, ddof=1) / math.sqrt(n) if n > 1 else np.full(a.shape[0], np.nan))
            for k, a in self.values.items()
        }

    def slope(self, key: str, **window_kw: Any) -> WindowFit:
        """:func:`fit_window` of ``mean[key]`` against σ (weighted by ``stderr`` when available)."""
        se = self.stderr[key]
        use = se if np.all(np.isfinite(se)) and np.all(se > 0) else None
        return fit_window(self.sigmas, self.mean[key], stderr=use, **window_kw)

    def to_json(self) -> dict[str, Any]:
        return {
            "sigmas": self.sigmas.tolist(),
            "seeds": self.seeds.tolist(),
            "values": {k: a.tolist() for k, a in self.values.items()},
            "mean": {k: a.tolist() for k, a in self.mean.items()},
            "stderr": {k: a.tolist() for k, a in self.stderr.items()},
        }


def _atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj))


def _tqdm_progress(iterable: Iterable[Any], desc: str, total: int) -> Iterable[Any]:
    return tqdm(iterable, desc=desc, total=total)


def _no_progress(iterable: Iterable[Any], desc: str, total: int) -> Iterable[Any]:
    return iterable


def _entry_key(sigma: float, seed: int) -> str:
    return f"{float(sigma)!r}|{int(seed)}"


def _finite_scalars(raw: object, s: float, seed: int) -> dict[str, float]:
    if not isinstance(raw, dict) or not raw:
        raise EnergyInputError(f"`fn` must return a non-empty dict of scalars, got {type(raw).__name__} at σ={s}.")
    out = {}
    for k, val in raw.items():
        fv = float(val)
        if not math.isfinite(fv):
            raise EnergyInputError(f"`fn` returned a non-finite value for {k!r} at σ={s}, seed {seed}.")
        out[str(k)] = fv
    return out


def sigma_sweep(
    fn: Callable[[float, int], dict[str, float]],
    sigmas: Sequence[float] | np.ndarray,
    n_inits: int,
    *,
    seeds: Sequence[int] | None = None,
    progress: bool | Progress = True,
    cache_path: str | os.PathLike | None = None,
    desc: str = "σ sweep",
) -> SweepResult:
    """Evaluate ``fn(sigma, seed)`` for every init seed and σ and aggregate mean ± standard error per key.

    The calls run seed-major (all σ of the first seed, then the next seed), so ``fn`` may keep one model per seed.

    Args:
        fn: returns a dict of finite scalars (floats or 0-d tensors), the same keys every call (e.g. block norms
            ``{"H_V": ..., "GGN_V": ...}``). The seed selects the initialisation (MATH §3.7: 20 inits).
        sigmas: the σ grid.
        n_inits: inits per σ (seeds ``0..n_inits-1`` unless ``seeds`` is given).
        seeds: the ``n_inits`` init seeds passed to ``fn``, when not ``0..n_inits-1``.
        progress: show a tqdm progress bar (``True``), none (``False``), or a wrapper
            ``progress(iterable, desc, total)``.
        cache_path: JSON file; finished ``(σ, seed)`` entries are stored after every evaluation (atomic replace)
            and skipped when the sweep is run again, so an interrupted sweep resumes.
        desc: progress-bar label.
    """
    if not callable(fn):
        raise EnergyInputError(f"`fn` must be callable (sigma, seed) -> dict, got {type(fn).__name__}.")
    sig = _as_positive(sigmas, "sigmas")
    if not isinstance(n_inits, int) or n_inits < 1:
        raise EnergyInputError(f"`n_inits` must be a positive int, got {n_inits!r}.")
    seed_list = list(range(n_inits)) if seeds is None else [int(s) for s in seeds]
    if len(seed_list) != n_inits:
        raise EnergyInputError(f"`seeds` must have n_inits={n_inits} entries, got {len(seed_list)}.")
    cache: dict[str, dict[str, float]] = {}
    if cache_path is not None and os.path.isdir(cache_path):
        raise EnergyInputError(
            f"`cache_path` {os.fspath(cache_path)!r} is a directory; pass the path of a JSON file to store the sweep "
            "in (e.g. 'sweep_cache.json'), or None for no cache."
        )
    if cache_path is not None and os.path.exists(cache_path):
        with open(cache_path) as fh:
            stored = json.load(fh)
        cache = dict(stored.get("entries", {}))
    keys: list[str] | None = None
    results: dict[tuple[int, int], dict[str, float]] = {}
    wrap: Progress = _tqdm_progress if progress is True else _no_progress if progress is False else progress
    steps = [(i, j) for j in range(n_inits) for i in range(sig.size)]
    for i, j in wrap(steps, desc, len(steps)):
        s, seed = sig[i], seed_list[j]
        key = _entry_key(s, seed)
        if key in cache:
            out = cache[key]
        else:
            out = _finite_scalars(fn(float(s), int(seed)), s, seed)
            if cache_path is not None:
                cache[key] = out
                _atomic_write_json(os.fspath(cache_path), {"entries": cache})
        if keys is None:
            keys = sorted(out)
        elif sorted(out) != keys:
            raise EnergyInputError(f"`fn` returned keys {sorted(out)} at σ={s}, seed {seed}; expected {keys}.")
        results[(i, j)] = out
    assert keys is not None
    values = {k: np.array([[results[(i, j)][k] for j in range(n_inits)] for i in range(sig.size)]) for k in keys}
    return SweepResult(sig, np.asarray(seed_list), values)
