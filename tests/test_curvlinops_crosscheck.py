"""Cross-check against an independent implementation: curvlinops (same model, loss and data, float64)."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import DT
from torch import nn

from energy.hessian.estimators import hutchinson_squared_frobenius
from energy.hessian.operators import GGNOperator, HessianOperator, JacobianOperator

curvlinops = pytest.importorskip("curvlinops")
pytestmark = pytest.mark.curvlinops



class SequenceCE(nn.Module):
    """Cross-entropy over the scored positions of (B, P, C) logits; ``reduction`` as curvlinops expects it."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                           reduction=self.reduction)


class TinyDecoder(nn.Module):
    """Embedding + one causal single-head attention block with W_O, ReLU MLP, unembedding; scores the last 3 positions
    (a miniature of the GPT-2-style model of MATH §3.7)."""

    def __init__(self, vocab: int, n: int, d: int, d_mlp: int, gen: torch.Generator) -> None:
        super().__init__()
        std = 0.8 / math.sqrt(d)
        p = lambda *s: nn.Parameter(torch.randn(*s, generator=gen, dtype=DT) * std)
        self.tok, self.pos = p(vocab, d), p(n, d)
        self.W_Q, self.W_K, self.W_V, self.W_O = p(d, d), p(d, d), p(d, d), p(d, d)
        self.W_1, self.b_1, self.W_2 = p(d, d_mlp), p(d_mlp), p(d_mlp, d)
        self.W_U = p(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[-1]
        X = self.tok[tokens] + self.pos[:n]
        T = (X @ self.W_Q) @ (X @ self.W_K).transpose(-1, -2) / math.sqrt(self.W_Q.shape[1])
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        A = T.masked_fill(~mask, float("-inf")).softmax(-1)
        X = X + A @ X @ self.W_V @ self.W_O
        X = X + torch.relu(X @ self.W_1 + self.b_1) @ self.W_2
        return (X @ self.W_U)[:, -3:]


def _case(seed: int, reduction: str = "mean"):
    gen = torch.Generator().manual_seed(seed)
    vocab, n, d, d_mlp = 7, 6, 5, 9
    model = TinyDecoder(vocab, n, d, d_mlp, gen)
    tokens = torch.randint(0, vocab, (11, n), generator=gen)
    y = torch.randint(0, vocab, (11, 3), generator=gen)
    data = list(zip(tokens.split([4, 7]), y.split([4, 7])))  # unequal batches
    return model, SequenceCE(reduction), data, gen


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("names", [["W_Q"], ["W_V", "W_Q", "b_1"], None])
def test_hessian_and_ggn_match_curvlinops(seed, reduction, names):
    model, loss, data, gen = _case(seed, reduction)
    named = dict(model.named_parameters())
    use = list(named) if names is None else names
    params = [named[n] for n in use]
    kw = dict(check_deterministic=False)
    H_cl = curvlinops.HessianLinearOperator(model, loss, params, data, **kw)
    G_cl = curvlinops.GGNLinearOperator(model, loss, params, data, **kw)
    H = HessianOperator(model, loss, use, data)
    G = GGNOperator(model, loss, use, data)
    V = torch.randn(H.shape[0], 4, generator=gen, dtype=DT)
    HV, GV = H.hessian_and_ggn(V)
    HV_cl, GV_cl = H_cl @ V, G_cl @ V
    scale = max(float(HV_cl.abs().max()), 1e-300)
    assert (HV - HV_cl).abs().max() <= 1e-10 * scale
    assert (GV - GV_cl).abs().max() <= 1e-10 * max(float(GV_cl.abs().max()), 1e-300)
    assert torch.allclose(H @ V[:, 0], H_cl @ V[:, 0], atol=1e-10 * scale, rtol=0)
    assert torch.allclose(G @ V, GV_cl, atol=1e-10 * scale, rtol=0)


def test_jacobian_matches_curvlinops():
    model, _, data, gen = _case(0)
    names = ["W_K", "W_1"]
    named = dict(model.named_parameters())
    J_cl = curvlinops.JacobianLinearOperator(model, [named[n] for n in names], data, check_deterministic=False)
    J = JacobianOperator(model, names, data)
    assert J.shape == tuple(J_cl.shape)
    V = torch.randn(J.shape[1], 3, generator=gen, dtype=DT)
    assert torch.allclose(J @ V, J_cl @ V, atol=1e-12, rtol=0)
    U = torch.randn(J.shape[0], 2, generator=gen, dtype=DT)
    assert torch.allclose(J.T @ U, J_cl.adjoint() @ U, atol=1e-12, rtol=0)


def test_frobenius_estimates_agree_with_same_probes():
    """Same Rademacher probes through both operators -> identical Hutchinson estimates (to round-off)."""
    model, loss, data, _ = _case(1)
    H = HessianOperator(model, loss, ["W_Q"], data)
    H_cl = curvlinops.HessianLinearOperator(model, loss, [model.W_Q], data, check_deterministic=False)
    ours = hutchinson_squared_frobenius(H, 10, generator=torch.Generator().manual_seed(3))
    theirs = hutchinson_squared_frobenius(H_cl.to_scipy(), 10, generator=torch.Generator().manual_seed(3))
    theirs_torch = hutchinson_squared_frobenius(H_cl, 10, generator=torch.Generator().manual_seed(3))
    assert ours.value == pytest.approx(theirs.value, rel=1e-10)
    assert ours.value == pytest.approx(theirs_torch.value, rel=1e-10)
