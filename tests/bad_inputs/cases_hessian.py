"""Bad inputs to ``energy.hessian``: closed forms, structure, operators, estimators, sweep, energy layer, curvature."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import energy
import energy.hessian as H

from ._case import FIX, Case
from ._gen import arg, enum_case, scalar_cases, tensor_cases, with_nan

f64 = torch.float64
g = torch.Generator().manual_seed(1)
n, d = 4, 3
X = torch.randn(n, d, generator=g, dtype=f64)
Wq = torch.randn(d, d, generator=g, dtype=f64)
Y = torch.randn(n, d, generator=g, dtype=f64)
M = torch.randn(d, d, generator=g, dtype=f64)
SPD = torch.eye(5, dtype=f64) + 0.1 * torch.ones(5, 5, dtype=f64)


def mom() -> H.AttentionMoments:
    return H.attention_moments(X, Wq, Wq, Wq, Y)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 2)).double()


def _data(x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> list:
    x = X if x is None else x
    y = torch.zeros(n, 2, dtype=f64) if y is None else y
    return [(x, y)]


def hess(data: list | None = None, **kw: object) -> torch.Tensor:
    return H.HessianOperator(_model(), nn.MSELoss(), None, _data() if data is None else data, **kw).dense()


CASES: list[Case] = []
add = CASES.extend

# --- closed forms of the attention layer ------------------------------------------------------------------------
add(tensor_cases("attention_moments", "X", lambda x: H.attention_moments(x, Wq, Wq, Wq, Y), X,
                 kinds=("list", "int", "bool", "complex", "float32", "nan", "inf", "meta", "rank", "zero")))
add(tensor_cases("attention_moments", "W_Q", lambda w: H.attention_moments(X, w, Wq, Wq, Y), Wq,
                 kinds=("int", "nan", "rank", "float32")))
add(tensor_cases("attention_moments", "Y", lambda y: H.attention_moments(X, Wq, Wq, Wq, y), Y,
                 kinds=("int", "nan", "float32")))
add(tensor_cases("attention_output", "X", lambda x: H.attention_output(x, Wq, Wq, Wq), X,
                 kinds=("list", "int", "nan", "meta", "zero")))
add(tensor_cases("attention_loss", "X", lambda x: H.attention_loss(x, Wq, Wq, Wq, Y), X, kinds=("nan", "zero")))
add([
    Case("attention_moments:Y-shape", lambda: H.attention_moments(X, Wq, Wq, Wq, Y[:3]), (arg("Y"), r"shape")),
    Case("attention_moments:W_K-shape", lambda: H.attention_moments(X, Wq, Wq[:2], Wq, Y), (arg("W_K"), r"shape")),
    Case("attention_moments:reduction", lambda: H.attention_moments(X, Wq, Wq, Wq, Y, reduction="avg"),
         (arg("reduction"), r"'mean'|'sum'")),
    Case("attention_moments:unknown-option", lambda: H.attention_moments(X, Wq, Wq, Wq, Y, causual=True),
         (r"causual", r"options|valid|expected")),
    Case("attention_moments:scale-neg", lambda: H.attention_moments(X, Wq, Wq, Wq, Y, scale=-1.0),
         (arg("scale"), FIX)),
    Case("attention_moments:mask-shape", lambda: H.attention_moments(X, Wq, Wq, Wq, Y,
                                                                     mask=torch.ones(2, 2, dtype=bool)),
         (arg("mask"), r"shape")),
    Case("attention_hessian:tensor-not-moments", lambda: H.attention_hessian(X), (r"AttentionMoments|mom",
                                                                                 r"attention_moments")),
    Case("hessian_blocks:tensor-not-moments", lambda: H.hessian_blocks(X), (r"AttentionMoments|mom",
                                                                           r"attention_moments")),
    enum_case("attention_hessian", "part", lambda p: H.attention_hessian(mom(), p)),
    enum_case("hessian_blocks", "part", lambda p: H.hessian_blocks(mom(), p), bad="h"),
    Case("hessian_block:block-name", lambda: H.hessian_block(mom(), "W_X", "W_Q"),
         (r"W_X", r"must be among|'Q'|valid|one of")),
    Case("attention_hessian:max_gib-neg", lambda: H.attention_hessian(mom(), max_gib=-1.0), (arg("max_gib"), FIX)),
    Case("attention_hessian:max_gib-tiny", lambda: H.attention_hessian(mom(), max_gib=1e-12),
         (arg("max_gib"), r"(?i)GiB|raise|estimator"), exc=energy.DenseSizeError),
    Case("loss_constant:reduction", lambda: H.loss_constant(X, None, "avg"), (arg("reduction"), r"'mean'|'sum'")),
    Case("qk_hessian_blocks:W_QK-shape", lambda: H.qk_hessian_blocks(X, Wq[:2], Wq, Y), (arg("W_QK"), r"shape|square")),
    Case("AttentionLayer:W_V-int", lambda: H.AttentionLayer(Wq, Wq, Wq.long()), (arg("W_V"), r"float")),
    Case("AttentionLayer:reduction", lambda: H.AttentionLayer(Wq, Wq, Wq, reduction="none"),
         (arg("reduction"), r"'mean'|'sum'")),
    Case("autograd_attention_hessian:X-nan", lambda: H.autograd_attention_hessian(with_nan(X), Wq, Wq, Wq, Y),
         (arg("X"), r"(?i)nan|finite")),
])

# --- structure ------------------------------------------------------------------------------------------------------
add([
    Case("block_norms:blocks-unknown", lambda: H.block_norms(X, Wq, Wq, Wq, Y, blocks=["W_Z"]),
         (r"W_Z", r"valid|one of|'Q'")),
    Case("block_norms:X-int", lambda: H.block_norms(X.long(), Wq, Wq, Wq, Y), (arg("X"), r"float")),
    enum_case("block_traces", "part", lambda p: H.block_traces(mom(), p)),
    enum_case("block_diagonals", "part", lambda p: H.block_diagonals(mom(), p)),
    Case("hessian_frobenius_norms:tensor", lambda: H.hessian_frobenius_norms(X), (r"AttentionMoments|mom",
                                                                                 r"attention_moments")),
])

# --- operators ----------------------------------------------------------------------------------------------------
add([
    Case("HessianOperator:data-nan", lambda: hess(_data(with_nan(X))), (r"(?i)data|input|batch", r"(?i)nan|finite")),
    Case("HessianOperator:data-float32", lambda: hess(_data(X.float())), (r"(?i)data|input|batch",
                                                                          r"(?i)dtype|float32|cast")),
    Case("HessianOperator:data-width", lambda: hess(_data(X[:, :2])), (r"(?i)data|input|batch", r"(?i)shape|width")),
    Case("HessianOperator:target-shape", lambda: hess(_data(y=torch.zeros(n, 1, dtype=f64))),
         (r"(?i)target|y\b", r"(?i)shape|broadcast")),
    Case("HessianOperator:data-empty", lambda: hess([]), (arg("data"), r"(?i)empty|at least|no batch")),
    Case("HessianOperator:params-unknown", lambda: hess(params=None) if False else H.HessianOperator(
        _model(), nn.MSELoss(), ["nope"], _data()), (r"nope", r"(?i)valid|one of|available")),
    Case("HessianOperator:model-not-module", lambda: H.HessianOperator(lambda x: x, nn.MSELoss(), None, _data()),
         (arg("model"), r"Module")),
    Case("HessianOperator:reduction", lambda: hess(reduction="avg"), (arg("reduction"), r"'mean'|'sum'")),
    Case("HessianOperator:max_vectors-zero", lambda: hess(max_vectors=0), (arg("max_vectors"), FIX)),
    Case("HessianOperator.matvec:v-shape", lambda: H.HessianOperator(_model(), nn.MSELoss(), None, _data())
         .matvec(torch.ones(3, dtype=f64)), (r"(?i)`v`|\bv\b|vector", r"(?i)shape|size|length")),
    Case("HessianOperator.matmat:V-int", lambda: H.HessianOperator(_model(), nn.MSELoss(), None, _data())
         .matmat(torch.ones(8, 1, dtype=torch.long)), (r"`V`|\bV\b", r"(?i)float|dtype")),
    Case("HessianOperator.dense:max_gib-tiny", lambda: hess(None) if False else H.HessianOperator(
        _model(), nn.MSELoss(), None, _data()).dense(max_gib=1e-15), (arg("max_gib"), r"(?i)GiB"),
         exc=energy.DenseSizeError),
    Case("GGNOperator:data-nan", lambda: H.GGNOperator(_model(), nn.MSELoss(), None, _data(with_nan(X))).dense(),
         (r"(?i)data|input|batch", r"(?i)nan|finite")),
    Case("JacobianOperator:data-int", lambda: H.JacobianOperator(_model(), None, _data(X.long())).dense(),
         (r"(?i)data|input|batch", r"(?i)float|dtype")),
    Case("TokenHessianOperator:Y-int", lambda: H.TokenHessianOperator(lambda y: (y ** 2).sum(), Y.long()),
         (arg("Y"), r"float")),
    Case("TokenHessianOperator:Y-nan", lambda: H.TokenHessianOperator(lambda y: (y ** 2).sum(), with_nan(Y)).dense(),
         (arg("Y"), r"(?i)nan|finite")),
    Case("TokenHessianOperator:fn-not-callable", lambda: H.TokenHessianOperator("energy", Y), (arg("fn"), r"callable")),
    Case("LinearOperator:shape-neg", lambda: H.LinearOperator((-1, 2), f64), (arg("shape"), FIX)),
    Case("LinearOperator:dtype-int", lambda: H.LinearOperator((2, 2), torch.long), (arg("dtype"), r"float")),
])

# --- estimators -----------------------------------------------------------------------------------------------------
NONSYM = torch.randn(5, 5, generator=g, dtype=f64)
add(tensor_cases("lanczos", "A", lambda a: H.lanczos(a, 2), SPD, kinds=("nan", "inf", "complex", "rank")))
add([
    Case("lanczos:A-not-symmetric", lambda: H.lanczos(NONSYM, 2), (arg("A"), r"symmetric")),
    Case("lanczos:A-not-square", lambda: H.lanczos(SPD[:3], 2), (arg("A") + r"|operator", r"square|shape")),
    Case("lanczos:A-list", lambda: H.lanczos([[1.0, 0.0], [0.0, 1.0]], 1), (arg("A"), r"(?i)tensor|operator")),
    Case("lanczos:which", lambda: H.lanczos(SPD, 2, which="XX"), (arg("which"), r"'LA'")),
    Case("lanczos:v0-shape", lambda: H.lanczos(SPD, 2, v0=torch.ones(3, dtype=f64)), (arg("v0"), r"shape|size")),
    Case("lanczos:tol-neg", lambda: H.lanczos(SPD, 2, tol=-1.0), (arg("tol"), FIX)),
    Case("hutchinson_trace:A-nan", lambda: H.hutchinson_trace(with_nan(SPD), 4), (arg("A"), r"(?i)nan|finite")),
    Case("hutchinson_trace:distribution", lambda: H.hutchinson_trace(SPD, 4, distribution="uniform"),
         (arg("distribution"), r"rademacher")),
    Case("hutchinson_trace:batch_size-zero", lambda: H.hutchinson_trace(SPD, 4, batch_size=0),
         (arg("batch_size"), FIX)),
    Case("hutchinson_diagonal:A-3d", lambda: H.hutchinson_diagonal(SPD[None], 4), (arg("A"), r"(?i)matrix|shape|2")),
    Case("hutchpp_trace:A-nan", lambda: H.hutchpp_trace(with_nan(SPD), 3), (arg("A"), r"(?i)nan|finite")),
    Case("hutchinson_squared_frobenius:dim-mismatch", lambda: H.hutchinson_squared_frobenius(SPD, 4, dim=3),
         (arg("dim"), r"shape|size|5")),
    Case("slq_density:A-not-symmetric", lambda: H.slq_density(NONSYM, 2, 3), (arg("A"), r"symmetric")),
    Case("slq_density:kernel_width-neg", lambda: H.slq_density(SPD, 2, 3, kernel_width=-1.0),
         (arg("kernel_width"), FIX)),
    Case("draw_probes:distribution", lambda: H.draw_probes(4, 2, distribution="cauchy"),
         (arg("distribution"), r"rademacher")),
    Case("as_matmat:dim-missing-for-callable", lambda: H.as_matmat(lambda V: V), (arg("dim"), FIX)),
])
add(scalar_cases("lanczos", "k", lambda v: H.lanczos(SPD, v), bad=(("zero", 0), ("neg", -1), ("float", 2.5),
                                                                    ("too-large", 9), ("bool", True))))
add(scalar_cases("hutchinson_trace", "num_samples", lambda v: H.hutchinson_trace(SPD, v),
                 bad=(("zero", 0), ("neg", -3), ("float", 2.5), ("nan", math.nan))))
add(scalar_cases("hutchpp_trace", "num_matvecs", lambda v: H.hutchpp_trace(SPD, v),
                 bad=(("zero", 0), ("two", 2), ("str", "6"))))
add(scalar_cases("slq_density", "num_steps", lambda v: H.slq_density(SPD, 2, v), bad=(("zero", 0), ("neg", -1))))
add(scalar_cases("draw_probes", "n", lambda v: H.draw_probes(v, 2), bad=(("neg", -1), ("float", 2.5))))

# --- sweep ----------------------------------------------------------------------------------------------------------
SIG = [0.1, 0.2, 0.4, 0.8, 1.6]
add([
    Case("fit_loglog_slope:sigma-negative", lambda: H.fit_loglog_slope([-1.0, 1.0, 2.0], [1.0, 2.0, 3.0]),
         (arg("sigma"), r"(?i)positive|> 0")),
    Case("fit_loglog_slope:values-nan", lambda: H.fit_loglog_slope(SIG, [1.0, math.nan, 2.0, 3.0, 4.0]),
         (arg("values"), r"(?i)nan|finite|positive")),
    Case("fit_loglog_slope:length-mismatch", lambda: H.fit_loglog_slope(SIG, [1.0, 2.0]),
         (r"sigma|values", r"(?i)length|same|shape")),
    Case("fit_loglog_slope:one-point", lambda: H.fit_loglog_slope([1.0], [1.0]), (r"(?i)points|sigma|σ",
                                                                                 r"(?i)at least|two|2")),
    Case("fit_window:min_points-zero", lambda: H.fit_window(SIG, SIG, min_points=0), (arg("min_points"), FIX)),
    Case("fit_window:tol-neg", lambda: H.fit_window(SIG, SIG, tol=-1.0), (arg("tol"), FIX)),
    Case("sigma_sweep:n_inits-zero", lambda: H.sigma_sweep(lambda s, k: {"a": 1.0}, SIG, 0, progress=False),
         (arg("n_inits"), FIX)),
    Case("sigma_sweep:sigmas-empty", lambda: H.sigma_sweep(lambda s, k: {"a": 1.0}, [], 1, progress=False),
         (arg("sigmas"), r"(?i)empty|at least")),
    Case("sigma_sweep:fn-returns-float", lambda: H.sigma_sweep(lambda s, k: 1.0, [0.1], 1, progress=False),
         (arg("fn"), r"dict")),
    Case("sigma_sweep:seeds-length", lambda: H.sigma_sweep(lambda s, k: {"a": 1.0}, SIG, 2, seeds=[1],
                                                           progress=False), (arg("seeds"), r"(?i)length|n_inits")),
    Case("sigma_sweep:cache_path-directory", lambda: H.sigma_sweep(lambda s, k: {"a": 1.0}, [0.1], 1, progress=False,
                                                                   cache_path="."), (arg("cache_path"),
                                                                                     r"(?i)directory|file"),
         exc=(ValueError, TypeError, OSError)),
    Case("SweepResult:values-shape", lambda: H.SweepResult(np.array(SIG), np.arange(2), {"a": np.ones((2, 2))}),
         (r"values|'a'", r"shape")),
])

# --- energy layer, energy curvature ---------------------------------------------------------------------------------
add(tensor_cases("energy_layer_output", "X", lambda x: H.energy_layer_output(x, M), X,
                 kinds=("list", "int", "nan", "meta", "zero", "float32")))
add(tensor_cases("energy_layer_hessian", "M", lambda m: H.energy_layer_hessian(X, m, Y), M,
                 kinds=("int", "nan", "rank")))
add(scalar_cases("energy_layer_output", "alpha", lambda a: H.energy_layer_output(X, M, alpha=a),
                 bad=(("nan", math.nan), ("inf", math.inf), ("str", "1"))))
add([
    Case("energy_layer_loss:Y-shape", lambda: H.energy_layer_loss(X, M, Y[:2]), (arg("Y"), r"shape")),
    Case("energy_layer_hessian:reduction", lambda: H.energy_layer_hessian(X, M, Y, reduction="avg"),
         (arg("reduction"), r"'mean'|'sum'")),
    # A non-square M (d, k) is valid for the tied layer too (W = s M Mᵀ is (d, d) for every k; the closed-form
    # Jacobian matches autograd), so the bad input is an M whose rows do not match X's width.
    Case("energy_layer_jacobian:tied-M-rows", lambda: H.energy_layer_jacobian(X, M[:2], tied=True),
         (arg("M"), r"(?i)shape")),
    Case("energy_layer_jacobian:tied-str", lambda: H.energy_layer_jacobian(X, M, tied="yes"), (arg("tied"), r"bool")),
    Case("attention_energy_hessian:energy-not-attention", lambda: H.attention_energy_hessian(
        energy.FFNEnergy(0.5 * torch.eye(d, dtype=f64), torch.zeros(d, dtype=f64)), Y),
         (arg("energy"), r"AttentionEnergy")),
    Case("attention_energy_hessian:Y-width", lambda: H.attention_energy_hessian(energy.AttentionEnergy(M), Y[:, :2]),
         (arg("Y"), r"width|shape")),
    Case("attention_energy_hessian:Y-nan", lambda: H.attention_energy_hessian(energy.AttentionEnergy(M),
                                                                              with_nan(Y)),
         (arg("Y"), r"(?i)nan|finite")),
    Case("ffn_energy_hessian:n-zero", lambda: H.ffn_energy_hessian(
        energy.FFNEnergy(0.5 * torch.eye(d, dtype=f64), torch.zeros(d, dtype=f64)), 0), (arg("n"), FIX)),
    Case("ffn_energy_hessian:energy-wrong", lambda: H.ffn_energy_hessian(energy.AttentionEnergy(M), 2),
         (arg("energy"), r"FFNEnergy")),
    Case("majoriser_step_bound:preconditioner", lambda: H.majoriser_step_bound(energy.AttentionEnergy(M), Y,
                                                                               "newton"),
         (arg("preconditioner"), r"'metric'")),
    Case("preconditioned_curvature:Y-int", lambda: H.preconditioned_curvature(energy.AttentionEnergy(M), Y.long()),
         (arg("Y"), r"float")),
    Case("autograd_energy_hessian:Y-list", lambda: H.autograd_energy_hessian(energy.AttentionEnergy(M), Y.tolist()),
         (arg("Y"), r"(?i)tensor")),
])
