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


@pytest.mark.parametrize("name,fn,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_clearly(name, fn, exc, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", energy.StepSizeWarning)
        with pytest.raises(exc, match=pattern):
            fn()


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
