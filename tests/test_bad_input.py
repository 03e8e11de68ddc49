"""Table-driven bad-input test: every public entry point rejects bad input with a message that names the argument.

Each row: (id, callable that must fail, exception type, a regex the message must contain).
"""

import math
import warnings

import pytest
import torch

import energy
from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy, attention_step_fused, softmax_beta
from energy.energy_transformer import EnergyTransformerEnergy
from energy.ffn import FFNEnergy, TiedReLUEnergy
from energy.hopfield import HopfieldEnergy
from energy.kernels import PowerKernel
from energy.normalization import layernorm_projection
from energy.reference import multi_head_attention

f64 = torch.float64
g = torch.Generator().manual_seed(0)
M = torch.randn(4, 5, generator=g, dtype=f64)
Y = torch.randn(2, 6, 4, generator=g, dtype=f64)
E = AttentionEnergy(M)
W_sym = torch.eye(4, dtype=f64) * 0.5
b = torch.zeros(4, dtype=f64)
nan_Y = Y.clone()
nan_Y[0, 1, 2] = math.nan
asym = torch.randn(4, 4, generator=g, dtype=f64)
not_psd = -torch.eye(4, dtype=f64)
heads = torch.randn(2, 4, 2, generator=g, dtype=f64)

CASES = [
    ("Y-not-a-tensor", lambda: E.energy(Y.tolist()), energy.EnergyInputError, r"`Y` must be a torch.Tensor"),
    ("Y-integer-dtype", lambda: E.energy(Y.long()), energy.EnergyInputError, r"`Y` must be a floating-point"),
    ("Y-rank-1", lambda: E.energy(Y[0, 0]), energy.EnergyInputError, r"`Y` must have at least 2 dimensions"),
    ("Y-width-mismatch", lambda: E.energy(Y[..., :3]), energy.EnergyInputError, r"`Y` has width 3"),
    ("Y-nan", lambda: E.step(nan_Y), energy.EnergyInputError, r"`Y` contains NaN or inf"),
    ("Y-mixed-dtype", lambda: E.grad(Y.float()), energy.EnergyInputError, r"mixed dtypes"),
    ("M-3d-for-single-head", lambda: AttentionEnergy(heads), energy.EnergyInputError, r"MultiHeadAttentionEnergy"),
    ("heads-width-mismatch", lambda: MultiHeadAttentionEnergy(heads).energy(Y[..., :3]), energy.EnergyInputError,
     r"`Y` has width 3"),
    ("bad-preconditioner", lambda: E.step(Y, 0.5, preconditioner="newton"), energy.EnergyInputError,
     r"`preconditioner` must be 'metric'"),
    ("negative-scale", lambda: AttentionEnergy(M, scale=-1.0), energy.EnergyInputError, r"`scale` must be"),
    ("negative-ridge", lambda: AttentionEnergy(M, ridge=-0.1), energy.EnergyInputError, r"`ridge` must be"),
    ("power-kernel-p", lambda: PowerKernel(3.0, eps=0.1), energy.EnergyInputError, r"`p`"),
    ("metric-step-needs-W-pd", lambda: AttentionEnergy(M[:, :2]).preconditioned_grad(Y), energy.ConstraintError,
     r"positive definite"),
    ("softmax-beta-W-not-psd", lambda: softmax_beta(Y, not_psd), energy.ConstraintError, r"`W`"),
    ("ffn-W-not-symmetric", lambda: FFNEnergy(asym, b), energy.ConstraintError, r"`W_f` must be symmetric"),
    ("ffn-unbounded", lambda: FFNEnergy(-2 * torch.eye(4, dtype=f64), b), energy.ConstraintError,
     r"unbounded below"),
    ("ffn-b-shape", lambda: FFNEnergy(W_sym, torch.zeros(3, dtype=f64)), energy.EnergyInputError, r"`b`"),
    ("tied-relu-Y-width", lambda: TiedReLUEnergy(M).energy(Y[..., :2]), energy.EnergyInputError, r"`Y`"),
    ("hopfield-beta", lambda: HopfieldEnergy(Y[0], beta=0.0), energy.EnergyInputError, r"`beta`"),
    ("hopfield-xi-width", lambda: HopfieldEnergy(Y[0], 1.0).step(Y[..., :3]), energy.EnergyInputError, r"`xi`"),
    ("et-gamma-vector", lambda: EnergyTransformerEnergy(heads, heads, M.T, ln_gamma=torch.ones(4, dtype=f64)),
     energy.EnergyInputError, r"`ln_gamma` must be a scalar"),
    ("et-one-token", lambda: EnergyTransformerEnergy(heads, heads, M.T).energy(Y[:, :1]), energy.EnergyInputError,
     r"at least 2 tokens"),
    ("fused-alpha-nan", lambda: attention_step_fused(Y, M, math.nan), energy.EnergyInputError,
     r"`alpha` must be a finite"),
    ("token-mask-dtype", lambda: E.energy(Y, token_mask=torch.ones(2, 6)), energy.EnergyInputError,
     r"`token_mask` must be a bool"),
    ("mha-heads-not-dividing", lambda: multi_head_attention(Y, Y, M[:, :4], M[:, :4], M[:, :4], num_heads=3),
     energy.EnergyInputError, r"num_heads"),
    ("layernorm-int", lambda: layernorm_projection(torch.ones(2, 3, dtype=torch.int64)), energy.EnergyInputError,
     r"floating-point"),
]


def test_table_is_large_enough():
    assert len(CASES) >= 15


def test_step_size_outside_range_warns_by_default_and_raises_in_strict_mode():
    with pytest.warns(energy.StepSizeWarning, match=r"`alpha` = 2.5 lies outside \(0, 2\)"):
        E.step(Y, 2.5)
    with energy.strict_mode(), pytest.raises(energy.StepSizeError, match="strict_mode"):
        E.step(Y, 2.5)
    assert not energy.is_strict()


def test_nothing_is_silently_symmetrised():
    """A non-symmetric W_f is rejected, and the user's tensor is left untouched."""
    before = asym.clone()
    with pytest.raises(energy.ConstraintError):
        FFNEnergy(asym, b)
    assert torch.equal(asym, before)


# ---------------------------------------------------------------------------------------------------------------
# issue 9: silent wrong answers and unclear errors of the public API (each: type + message names argument and fix)
# ---------------------------------------------------------------------------------------------------------------

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import unfold  # noqa: E402
from energy._validation import _WARNED_DTYPES, LowPrecisionWarning, check_float_dtype  # noqa: E402
from energy.base import StepRange  # noqa: E402
from energy.hessian import (  # noqa: E402
    GGNOperator,
    HessianOperator,
    JacobianOperator,
    TokenHessianOperator,
    attention_jacobians,
    attention_moments,
    block_diagonals,
    block_traces,
    hessian_frobenius_norms,
    lanczos,
    slq_density,
)
from unfold.data import (  # noqa: E402
    load_digits_sequences,
    load_glove,
    seeded_embedding_table,
    synthetic_sequence_classification,  # noqa: E402
)
from unfold.standard import standard_encoder  # noqa: E402
from unfold.train import accuracy, train  # noqa: E402

meta = {"device": "meta", "dtype": f64}
sym5 = torch.randn(5, 5, generator=g, dtype=f64)
sym5 = sym5 + sym5.T
nonsym5 = torch.randn(5, 5, generator=g, dtype=f64)
X_att = torch.randn(6, 4, generator=g, dtype=f64)
W4 = torch.randn(4, 4, generator=g, dtype=f64) * 0.3
lin = nn.Linear(3, 1).double()
X_lin = torch.randn(8, 3, generator=g, dtype=f64)
y_lin = torch.randn(8, 1, generator=g, dtype=f64)
mha_general = MultiHeadAttentionEnergy(torch.randn(2, 4, 3, generator=g, dtype=f64))
model32 = unfold.yang2022(d=8, depth=2, n_classes=3, fused=False)
body32 = unfold.Unrolled(["attention", "ffn"], 2, 8)


def _nan_fn(v):
    return v * float("nan")


CASES_ISSUE9 = [
    # non-finite results (overflow) name the input and its scale
    ("step-overflow-f64", lambda: E.step(Y * 1e200), energy.EnergyInputError, r"max \|Y\| = .*e\+200.*Rescale `Y`"),
    ("energy-overflow-f32", lambda: AttentionEnergy(M.float()).energy(Y.float() * 1e20), energy.EnergyInputError,
     r"max \|Y\| = .*overflowed torch.float32.*torch.float64"),
    ("grad-overflow", lambda: E.grad(Y * 1e200), energy.EnergyInputError, r"AttentionEnergy.grad\(Y"),
    ("mha-step-overflow", lambda: MultiHeadAttentionEnergy(heads).step(Y * 1e200, 0.5), energy.EnergyInputError,
     r"MultiHeadAttentionEnergy.step\(Y.*max \|Y\|"),
    ("ffn-energy-overflow", lambda: FFNEnergy(W_sym, b).energy(Y * 1e200), energy.EnergyInputError,
     r"FFNEnergy.energy\(Y.*Rescale `Y`"),
    ("tied-energy-overflow-f32", lambda: TiedReLUEnergy(M.float()).energy(Y.float() * 1e30),
     energy.EnergyInputError, r"max \|Y\|"),
    # step sizes
    ("alpha-two-elements", lambda: E.step(Y, torch.tensor([0.5, 0.5], dtype=f64)), energy.EnergyInputError,
     r"`alpha` must be a number or a one-element tensor.*shape \(2,\)"),
    ("alpha-two-elements-fused", lambda: attention_step_fused(Y, M, torch.tensor([0.5, 0.5], dtype=f64)),
     energy.EnergyInputError, r"`alpha` must be a number or a one-element"),
    ("alpha-two-elements-ffn", lambda: FFNEnergy(W_sym, b).step(Y, torch.ones(2, dtype=f64)),
     energy.EnergyInputError, r"`alpha`.*one-element"),
    ("alpha-integer-tensor", lambda: E.step(Y, torch.tensor(1)), energy.EnergyInputError,
     r"`alpha` must be a floating-point tensor"),
    ("alpha-two-elements-meta", lambda: AttentionEnergy(torch.empty(4, 5, **meta)).step(
        torch.empty(2, 3, 4, **meta), torch.ones(2, **meta)), energy.EnergyInputError, r"`alpha`.*one-element"),
    # zero tokens
    ("zero-tokens-energy", lambda: E.energy(Y[:, :0]), energy.EnergyInputError, r"`Y` must contain at least one"),
    ("zero-tokens-fused", lambda: attention_step_fused(Y[:, :0], M, 0.5), energy.EnergyInputError,
     r"`Y` must contain at least one"),
    ("zero-tokens-unrolled", lambda: body32(torch.zeros(2, 0, 8)), energy.EnergyInputError,
     r"`Y` must contain at least one token"),
    ("zero-tokens-classifier", lambda: model32(torch.zeros(2, 0, 8)), energy.EnergyInputError,
     r"`X` must contain at least one token"),
    ("zero-tokens-step-module", lambda: unfold.steps.AttentionStep(8)(torch.zeros(2, 0, 8)),
     energy.EnergyInputError, r"`Y` must contain at least one token"),
    ("zero-tokens-standard-encoder", lambda: standard_encoder(d=8, n_heads=2, n_layers=1, n_classes=3)(
        torch.zeros(2, 0, 8)), energy.EnergyInputError, r"`X` must contain at least one token"),
    ("zero-tokens-moments", lambda: attention_moments(X_att[:0], W4, W4, W4, X_att[:0]), energy.EnergyInputError,
     r"`X` must contain at least one sequence of at least one token"),
    # dtype of unfolded models (metadata check at the forward entry)
    ("f64-into-f32-unrolled", lambda: body32(torch.zeros(2, 3, 8, dtype=f64)), energy.EnergyInputError,
     r"`Y` has dtype torch.float64 but the model's weights are torch.float32.*model.to"),
    ("f64-into-f32-classifier", lambda: model32(torch.zeros(2, 3, 8, dtype=f64)), energy.EnergyInputError,
     r"`X` has dtype torch.float64.*`X.to\(torch.float32\)`"),
    ("f64-into-f32-step", lambda: unfold.steps.FFNStep(8)(torch.zeros(2, 3, 8, dtype=f64)),
     energy.EnergyInputError, r"`Y` has dtype torch.float64"),
    ("f64-into-f32-standard", lambda: standard_encoder(d=8, n_heads=2, n_layers=1, n_classes=3)(
        torch.zeros(2, 3, 8, dtype=f64)), energy.EnergyInputError, r"`X` has dtype torch.float64"),
    # meta tensors where values are needed
    ("meta-ffn", lambda: FFNEnergy(torch.empty(4, 4, **meta), torch.empty(4, **meta)), energy.EnergyInputError,
     r"`W_f` is a meta tensor.*materialise"),
    ("meta-step-range", lambda: AttentionEnergy(torch.empty(4, 5, **meta)).step_range("token"),
     energy.EnergyInputError, r"`M` is a meta tensor.*step_range"),
    ("meta-mha-step-range", lambda: MultiHeadAttentionEnergy(torch.empty(2, 4, 5, **meta)).step_range(),
     energy.EnergyInputError, r"`M` is a meta tensor"),
    ("meta-lanczos", lambda: lanczos(torch.empty(5, 5, **meta), 2), energy.EnergyInputError,
     r"`A` is a meta tensor"),
    # lanczos / slq: symmetry and NaN
    ("lanczos-nonsymmetric-dense", lambda: lanczos(nonsym5, 2), energy.ConstraintError,
     r"lanczos needs a symmetric matrix `A`.*\(A \+ A.T\) / 2"),
    ("slq-nonsymmetric-dense", lambda: slq_density(nonsym5, 2, 3), energy.ConstraintError,
     r"slq_density needs a symmetric matrix `A`"),
    ("lanczos-nonsymmetric-callable", lambda: lanczos(lambda v: nonsym5 @ v, 2, dim=5), energy.ConstraintError,
     r"random probe.*\(A \+ Aᵀ\)/2"),
    ("lanczos-nan-dense", lambda: lanczos(sym5 * float("nan"), 2), energy.EnergyInputError,
     r"`A` contains NaN or inf"),
    ("lanczos-nan-callable", lambda: lanczos(_nan_fn, 2, dim=5), energy.EnergyInputError,
     r"products of `A` are not finite"),
    ("hutchinson-nan-callable", lambda: energy.hessian.hutchinson_trace(_nan_fn, 4, dim=5), energy.EnergyInputError,
     r"`A @ V` of the estimator is not finite.*check the operator `A`"),
    ("lanczos-int-dense", lambda: lanczos(sym5.long(), 2), energy.EnergyInputError, r"`A` must be a floating"),
    # moments
    ("hessian-structure-tensor-not-moments", lambda: block_diagonals(X_att), energy.EnergyInputError,
     r"`mom` must be the moments.*attention_moments"),
    ("block-traces-tensor", lambda: block_traces(X_att), energy.EnergyInputError, r"`mom`.*attention_moments"),
    ("frobenius-norms-tensor", lambda: hessian_frobenius_norms(X_att), energy.EnergyInputError, r"`mom`"),
    ("jacobians-tensor", lambda: attention_jacobians(X_att), energy.EnergyInputError, r"`mom`"),
    # operators: data checked at construction
    ("operator-target-broadcast", lambda: HessianOperator(lin, F.mse_loss, None, [(X_lin, y_lin[:, 0])],
     reduction="mean"), energy.EnergyInputError, r"targets of shape \(8,\).*outputs have shape \(8, 1\).*broadcast"),
    ("ggn-target-broadcast", lambda: GGNOperator(lin, F.mse_loss, None, [(X_lin, y_lin.T)], reduction="mean"),
     energy.EnergyInputError, r"targets of shape \(1, 8\)"),
    ("operator-data-dtype", lambda: HessianOperator(lin, F.mse_loss, None, [(X_lin.float(), y_lin)],
     reduction="mean"), energy.EnergyInputError, r"`data` batch 0 has inputs of dtype torch.float32.*cast"),
    ("operator-data-shape", lambda: HessianOperator(lin, F.mse_loss, None, [(X_lin[:, :2], y_lin)],
     reduction="mean"), energy.EnergyInputError, r"`model` fails on `data` batch 0"),
    ("jacobian-data-shape", lambda: JacobianOperator(lin, None, [X_lin[:, :2]]), energy.EnergyInputError,
     r"`model` fails on `data` batch 0"),
    ("operator-loss-not-scalar", lambda: HessianOperator(lin, lambda o, y: (o - y) ** 2, None, [(X_lin, y_lin)],
     reduction="mean"), energy.EnergyInputError, r"must return a scalar"),
    ("operator-class-out-of-range", lambda: HessianOperator(nn.Linear(3, 2).double(), F.cross_entropy, None,
     [(X_lin, torch.full((8,), 5))], reduction="mean"), energy.EnergyInputError, r"`loss_fn` fails|not finite"),
    ("token-operator-target-broadcast", lambda: TokenHessianOperator.from_model(lin, F.mse_loss, X_lin,
     y_lin[:, 0]), energy.EnergyInputError, r"`y` has shape \(8,\) but `model\(X\)` has shape \(8, 1\)"),
    ("token-operator-fn-fails", lambda: TokenHessianOperator(lambda Z: (Z @ W4).sum(), X_lin), energy.EnergyInputError,
     r"`fn` fails on `Y`"),
    ("token-operator-overflow", lambda: TokenHessianOperator(lambda Z: (Z ** 4).sum(), X_lin * 1e100),
     energy.EnergyInputError, r"`fn\(Y\)` is not finite.*max \|Y\|"),
    ("reference-mha-overflow", lambda: multi_head_attention(Y * 1e200, Y * 1e200, M[:, :4], M[:, :4], M[:, :4],
     num_heads=2), energy.EnergyInputError, r"`multi_head_attention\(…\)` is not finite.*max \|x_q\|"),
    ("reference-ffn-overflow", lambda: energy.reference.feed_forward(Y * 1e200, W4, None, W4 * 1e200, None),
     energy.EnergyInputError, r"`feed_forward\(…\)` is not finite.*max \|X\|"),
    # presets and data
    ("yang2022-n-classes-0", lambda: unfold.yang2022(d=8, depth=1, n_classes=0), energy.EnergyInputError,
     r"`n_classes` must be a positive integer"),
    ("yang2022-d-in-0", lambda: unfold.yang2022(d=8, depth=1, d_in=0), energy.EnergyInputError,
     r"`d_in` must be a positive integer"),
    ("digits-long-dtype", lambda: load_digits_sequences(dtype=torch.long), energy.EnergyInputError,
     r"`dtype` must be a real floating torch dtype.*torch.int64"),
    ("synthetic-long-dtype", lambda: synthetic_sequence_classification(8, 8, dtype=torch.int32),
     energy.EnergyInputError, r"`dtype` must be a real floating"),
    ("seeded-table-bool-dtype", lambda: seeded_embedding_table(["a"], 4, 0, dtype=torch.bool),
     energy.EnergyInputError, r"`dtype`"),
    ("dtype-not-a-dtype", lambda: check_float_dtype("float32"), energy.EnergyInputError, r"`dtype`"),
    # training: out-of-range class targets
    ("train-targets-out-of-range", lambda: train(nn.Linear(3, 2), F.cross_entropy,
     [(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]))], steps=1, lr=0.1, progress=False), energy.EnergyInputError,
     r"`targets` of batch 0 contain class 2 but the model outputs C = 2 classes.*n_classes ≥ 3"),
    ("train-negative-target", lambda: train(nn.Linear(3, 2), F.cross_entropy,
     [(torch.randn(4, 3), torch.tensor([0, -1, 1, 1]))], steps=1, lr=0.1, progress=False), energy.EnergyInputError,
     r"contain class -1"),
    ("accuracy-targets-out-of-range", lambda: accuracy(torch.zeros(3, 2), torch.tensor([0, 1, 7])),
     energy.EnergyInputError, r"class 7.*C = 2"),
]


@pytest.mark.parametrize("name,fn,exc,pattern", CASES + CASES_ISSUE9, ids=[c[0] for c in CASES + CASES_ISSUE9])
def test_bad_input_is_rejected_clearly(name, fn, exc, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", energy.StepSizeWarning)
        with pytest.raises(exc, match=pattern):
            fn()


def test_glove_nan_and_overflow_rejected(tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("the 0.1 0.2\ncat nan 0.3\n")
    with pytest.raises(energy.EnergyInputError, match=r"line 2: the vector of 'cat' has a NaN or inf entry"):
        load_glove(f)
    f.write_text("the 0.1 inf\n")
    with pytest.raises(energy.EnergyInputError, match=r"line 1.*NaN or inf"):
        load_glove(f)
    f.write_text("the 0.1 1e50\n")
    with pytest.raises(energy.EnergyInputError, match=r"overflow torch.float32.*dtype=torch.float64"):
        load_glove(f)
    assert load_glove(f, dtype=torch.float64).vectors[0, 1] == 1e50
    with pytest.raises(energy.EnergyInputError, match=r"`dtype`"):
        load_glove(f, dtype=torch.long)


def test_results_are_checked_only_where_values_are_readable():
    """Under vmap the result check is skipped (value_holds), so no transform raises; in plain calls it raises."""
    big = Y * 1e200
    out = torch.func.vmap(lambda y: E.energy(y))(big)  # NaN, unchecked by design under the transform
    assert out.shape == (2,)
    with pytest.raises(energy.EnergyInputError):
        E.energy(big)


def test_finite_results_pass_unchanged():
    assert torch.equal(E.step(Y, 0.5), E.step(Y, 0.5))
    assert torch.isfinite(E.step(Y * 1e3, 0.5)).all()


def test_empty_step_range_prints_none():
    r = mha_general.step_range()
    assert r.empty and str(r).startswith("none (no step size is guaranteed to descend)")
    assert "heads are not mutually orthogonal" in str(r)
    assert not StepRange(0.0, 2.0, "x").empty and str(StepRange(0.0, 2.0, "x")).startswith("(0, 2)")
    assert str(StepRange(0.0, 1.0, "x", high_inclusive=True)).startswith("(0, 1]")


@pytest.mark.parametrize("dtype,rate", [(torch.float16, "94/1,200"), (torch.bfloat16, "56/1,200")])
def test_half_precision_warns_once_per_dtype_with_measured_rates(dtype, rate):
    _WARNED_DTYPES.discard(dtype)
    with pytest.warns(LowPrecisionWarning, match=rf"{dtype}.*{rate}") as rec:
        AttentionEnergy(M.to(dtype))
    assert len([w for w in rec if issubclass(w.category, LowPrecisionWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowPrecisionWarning)
        AttentionEnergy(M.to(dtype))  # once per dtype and process
        FFNEnergy(W_sym.to(dtype), b.to(dtype))
        E.energy(Y)  # float64: silent
    _WARNED_DTYPES.discard(dtype)
    with pytest.warns(LowPrecisionWarning, match="AttentionStep"):
        _half_step(dtype)


def _half_step(dtype):
    torch_default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        return unfold.steps.AttentionStep(4)
    finally:
        torch.set_default_dtype(torch_default)


def test_half_conversion_of_a_model_warns_once():
    for dtype in (torch.float16, torch.bfloat16):
        _WARNED_DTYPES.discard(dtype)
    with pytest.warns(LowPrecisionWarning, match=r"torch.float16.*94/1,200") as rec:
        unfold.yang2022(d=8, depth=2, fused=False).half()
    assert len([w for w in rec if issubclass(w.category, LowPrecisionWarning)]) == 1
    with pytest.warns(LowPrecisionWarning, match=r"torch.bfloat16.*56/1,200"):
        AttentionEnergy(M).to(torch.bfloat16)


def test_float32_and_float64_construct_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowPrecisionWarning)
        AttentionEnergy(M)
        AttentionEnergy(M.float())
        unfold.steps.AttentionStep(4)


def test_symmetric_operators_pass_the_probe():
    assert lanczos(sym5, 2).converged
    assert lanczos(lambda v: sym5 @ v, 2, dim=5).converged
    op = HessianOperator(lin, F.mse_loss, None, [(X_lin, y_lin)], reduction="mean")
    assert lanczos(op, 2).eigenvalues.shape == (2,)


def test_table_issue9_is_large_enough():
    assert len(CASES) + len(CASES_ISSUE9) >= 75
