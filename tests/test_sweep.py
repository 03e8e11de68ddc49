"""σ-sweep helpers on synthetic power laws with known exponents and noise (MATH §3.6)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from energy._validation import EnergyInputError
from energy.hessian.sweep import fit_loglog_slope, fit_window, sigma_sweep

SIGMAS = 10 ** np.linspace(-2, 1, 20)  # the grid of MATH §3.7


def test_exact_power_law():
    fit = fit_loglog_slope(SIGMAS, 3.0 * SIGMAS**6)
    assert fit.slope == pytest.approx(6.0, abs=1e-12)
    assert fit.intercept == pytest.approx(math.log10(3.0), abs=1e-12)
    assert fit.stderr < 1e-12


def test_noisy_slope_standard_error_is_calibrated(seed):
    """Multiplicative log-normal noise: the z-scores (p̂ − p)/se over many repetitions are ~N(0, 1)."""
    rng = np.random.default_rng(seed)
    z = []
    for _ in range(300):
        v = 0.5 * SIGMAS**2 * np.exp(rng.normal(0, 0.2, SIGMAS.size))
        fit = fit_loglog_slope(SIGMAS, v)
        z.append((fit.slope - 2.0) / fit.stderr)
    z = np.asarray(z)
    assert abs(z.mean()) < 0.25 and 0.8 < z.std() < 1.25


def test_weighted_fit_uses_standard_errors(seed):
    """Heteroscedastic noise: weighting by the given standard errors is closer to the truth on average."""
    rng = np.random.default_rng(seed)
    rel = np.where(np.arange(SIGMAS.size) % 2 == 0, 0.01, 0.5)  # every other point is very noisy
    err_w, err_u = [], []
    for _ in range(200):
        v = SIGMAS**6 * (1 + rel * rng.standard_normal(SIGMAS.size)).clip(0.05)
        w = fit_loglog_slope(SIGMAS, v, stderr=rel * SIGMAS**6)
        u = fit_loglog_slope(SIGMAS, v)
        err_w.append(abs(w.slope - 6))
        err_u.append(abs(u.slope - 6))
    assert np.mean(err_w) < 0.5 * np.mean(err_u)


def test_fit_window_finds_small_sigma_regime(seed):
    """v = σ⁶ / (1 + (σ/σ₀)⁸) bends over at σ₀ = 0.3: the window stays left of the bend and recovers 6."""
    rng = np.random.default_rng(seed)
    v = SIGMAS**6 / (1 + (SIGMAS / 0.3) ** 8) * np.exp(rng.normal(0, 0.01, SIGMAS.size))
    wf = fit_window(SIGMAS, v, tol=0.05)
    assert wf.fit.slope == pytest.approx(6.0, abs=0.05)
    assert SIGMAS[wf.indices].max() < 0.3 and wf.indices.size >= 6
    assert wf.max_residual <= 0.05
    whole = fit_loglog_slope(SIGMAS, v)
    assert abs(whole.slope - 6) > 1  # the naive fit over the whole grid is biased by saturation
    capped = fit_window(SIGMAS, v, max_sigma=0.05, min_points=3)
    assert SIGMAS[capped.indices].max() <= 0.05


def test_fit_bad_input():
    with pytest.raises(EnergyInputError, match="finite and > 0"):
        fit_loglog_slope([1, 2, 3], [1, 0, 2])
    with pytest.raises(EnergyInputError, match="same length"):
        fit_loglog_slope([1, 2, 3], [1, 2])
    with pytest.raises(EnergyInputError, match="two distinct"):
        fit_loglog_slope([1, 1], [1, 2])
    with pytest.raises(EnergyInputError, match="stderr"):
        fit_loglog_slope([1, 2, 3], [1, 2, 3], stderr=[1, -1, 1])
    assert math.isnan(fit_loglog_slope([1, 2], [1, 4]).stderr)
    with pytest.raises(EnergyInputError, match="min_points"):
        fit_window(SIGMAS, SIGMAS**2, max_sigma=0.02, min_points=4)


def _fake_block_norms(calls: list):
    def fn(sigma: float, seed: int) -> dict[str, float]:
        calls.append((sigma, seed))
        c = 1.0 + 0.1 * seed
        return {"H_V": c * sigma**2, "H_Q": c * sigma**6}

    return fn


def test_sigma_sweep_aggregates_and_resumes(tmp_path):
    sig = SIGMAS[:6]
    calls: list = []
    path = tmp_path / "sweep.json"
    res = sigma_sweep(_fake_block_norms(calls), sig, 3, progress=False, cache_path=path)
    assert len(calls) == 18 and path.exists()
    c = np.array([1.0, 1.1, 1.2])
    assert np.allclose(res.values["H_V"], np.outer(sig**2, c))
    assert np.allclose(res.mean["H_Q"], sig**6 * c.mean())
    assert np.allclose(res.stderr["H_V"], sig**2 * c.std(ddof=1) / math.sqrt(3))
    assert res.slope("H_Q").fit.slope == pytest.approx(6.0, abs=1e-10)
    # resume: a cached sweep calls fn only for new (σ, seed) pairs
    calls2: list = []
    res2 = sigma_sweep(_fake_block_norms(calls2), SIGMAS[:7], 3, progress=False, cache_path=path)
    assert len(calls2) == 3 and all(s == pytest.approx(SIGMAS[6]) for s, _ in calls2)
    assert np.allclose(res2.values["H_V"][:6], res.values["H_V"])
    stored = json.loads(path.read_text())
    assert len(stored["entries"]) == 21
    json.dumps(res2.to_json())


def test_sigma_sweep_bad_fn():
    with pytest.raises(EnergyInputError, match="dict"):
        sigma_sweep(lambda s, k: 1.0, [0.1], 1, progress=False)
    with pytest.raises(EnergyInputError, match="non-finite"):
        sigma_sweep(lambda s, k: {"a": float("nan")}, [0.1], 1, progress=False)
    with pytest.raises(EnergyInputError, match="keys"):
        sigma_sweep(lambda s, k: {"a": 1.0} if k == 0 else {"b": 1.0}, [0.1], 2, progress=False)
    with pytest.raises(EnergyInputError, match="n_inits"):
        sigma_sweep(lambda s, k: {"a": 1.0}, [0.1], 0, progress=False)
    res = sigma_sweep(lambda s, k: {"a": s}, [0.1, 0.2], 1, progress=False)
    assert np.all(np.isnan(res.stderr["a"]))
