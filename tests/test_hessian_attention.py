"""Closed-form self-attention Hessian (MATH §3) against torch.func in float64."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import DT

from energy._validation import EnergyInputError
from energy.hessian.attention import (
    BLOCKS,
    PARAMS,
    DenseSizeError,
    attention_hessian,
    attention_jacobians,
    attention_loss,
    attention_moments,
    autograd_attention_ggn,
    autograd_attention_hessian,
    hessian_block,
    hessian_blocks,
    qk_chain_matrix,
    qk_hessian_blocks,
)

TOL = 1e-10


def _problem(gen: torch.Generator, B: int | None, L: int, d: int, k: int, x_scale: float = 0.8):
    lead = () if B is None else (B,)
    X = x_scale * torch.randn(*lead, L, d, generator=gen, dtype=DT)
    Y = torch.randn(*lead, L, d, generator=gen, dtype=DT)
    W_Q = torch.randn(d, k, generator=gen, dtype=DT)
    W_K = torch.randn(d, k, generator=gen, dtype=DT)
    W_V = torch.randn(d, d, generator=gen, dtype=DT)
    return X, W_Q, W_K, W_V, Y


def _random_mask(gen: torch.Generator, B: int, L: int) -> torch.Tensor:
    m = torch.rand(B, L, L, generator=gen) < 0.6
    return m | torch.eye(L, dtype=torch.bool)  # every query attends to itself


def _slices(d: int, k: int) -> dict[str, slice]:
    s = d * k
    return {"Q": slice(0, s), "K": slice(s, 2 * s), "V": slice(2 * s, 2 * s + d * d)}


def _close(A: torch.Tensor, B: torch.Tensor) -> None:
    scale = max(1.0, float(B.abs().max()))
    err = float((A - B).abs().max())
    assert err <= TOL * scale, f"max error {err:.3e} (scale {scale:.2e})"


SHAPES = [(None, 5, 3, 4), (2, 4, 3, 5), (3, 5, 4, 2)]
VARIANTS = [
    {},
    {"reduction": "mean"},
    {"c": 0.37},
    {"causal": True},
    {"linear": True},
    {"linear": True, "causal": True},
    {"scale": 0.3},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{a}={b}" for a, b in v.items()) or "plain")
def test_all_blocks_match_autograd(gen, seed, variant):
    shape = SHAPES[seed]  # each seed its own odd shape: every variant is checked on all three shapes
    X, W_Q, W_K, W_V, Y = _problem(gen, *shape)
    H_ad = autograd_attention_hessian(X, W_Q, W_K, W_V, Y, **variant)
    Ho_ad = autograd_attention_ggn(X, W_Q, W_K, W_V, Y, **variant)
    mom = attention_moments(X, W_Q, W_K, W_V, Y, **variant)
    sl = _slices(shape[2], shape[3])
    for part, ref in (("H", H_ad), ("H_o", Ho_ad), ("H_f", H_ad - Ho_ad)):
        blocks = hessian_blocks(mom, part)
        assert set(blocks) == {(a, b) for a in PARAMS for b in PARAMS}
        for (a, b), blk in blocks.items():
            _close(blk, ref[sl[a], sl[b]])
        _close(attention_hessian(mom, part), ref)


@pytest.mark.parametrize("variant", [{}, {"causal": True, "reduction": "mean"}, {"linear": True}],
                         ids=["plain", "causal-mean", "linear"])
def test_output_projection_blocks_match_autograd(gen, seed, variant):
    B, L, d, k = SHAPES[seed]
    X, W_Q, W_K, W_V, _ = _problem(gen, B, L, d, k)
    d_O = (2, 5, 3)[seed]
    W_O = torch.randn(d, d_O, generator=gen, dtype=DT)
    Y = torch.randn(*X.shape[:-1], d_O, generator=gen, dtype=DT)
    H_ad = autograd_attention_hessian(X, W_Q, W_K, W_V, Y, W_O=W_O, **variant)
    Ho_ad = autograd_attention_ggn(X, W_Q, W_K, W_V, Y, W_O=W_O, **variant)
    mom = attention_moments(X, W_Q, W_K, W_V, Y, W_O=W_O, **variant)
    assert mom.params == ("Q", "K", "V", "O")
    sl = {**_slices(d, k), "O": slice(2 * d * k + d * d, 2 * d * k + d * d + d * d_O)}
    for part, ref in (("H", H_ad), ("H_o", Ho_ad), ("H_f", H_ad - Ho_ad)):
        blocks = hessian_blocks(mom, part)
        assert len(blocks) == 16
        for (a, b), blk in blocks.items():
            _close(blk, ref[sl[a], sl[b]])
        _close(attention_hessian(mom, part), ref)
    J = attention_jacobians(mom)
    Jall = torch.cat([J[p] for p in mom.params], dim=1)
    _close(2 * mom.c * Jall.T @ Jall, Ho_ad)
    n_seq = 1 if B is None or variant.get("reduction") != "mean" else B
    assert mom.c == pytest.approx(1.0 / (L * d_O) / n_seq)


def test_random_mask_and_batch_mask(gen):
    X, W_Q, W_K, W_V, Y = _problem(gen, 3, 5, 3, 2)
    mask = _random_mask(gen, 3, 5)
    for linear in (False, True):
        H = attention_hessian(attention_moments(X, W_Q, W_K, W_V, Y, mask=mask, linear=linear))
        _close(H, autograd_attention_hessian(X, W_Q, W_K, W_V, Y, mask=mask, linear=linear))


def test_ggn_is_2c_JtJ_and_jacobians_match(gen):
    X, W_Q, W_K, W_V, Y = _problem(gen, 2, 5, 3, 4)
    mom = attention_moments(X, W_Q, W_K, W_V, Y, reduction="mean")
    J = attention_jacobians(mom)
    for name in PARAMS:
        def out(W, name=name):
            args = {"Q": W_Q, "K": W_K, "V": W_V}
            args[name] = W
            from energy.reference import single_head_attention

            return single_head_attention(X, args["Q"], args["K"], args["V"]).reshape(-1)

        J_ad = torch.func.jacrev(out)({"Q": W_Q, "K": W_K, "V": W_V}[name]).reshape(J[name].shape)
        _close(J[name], J_ad)
    Jall = torch.cat([J[p] for p in PARAMS], dim=1)
    _close(attention_hessian(mom, "H_o"), 2 * mom.c * Jall.T @ Jall)
    assert mom.c == pytest.approx(1.0 / (5 * 3) / 2)


def test_default_constant_is_mse_and_mean_divides_by_batch(gen):
    X, W_Q, W_K, W_V, Y = _problem(gen, 4, 5, 3, 2)
    from energy.reference import single_head_attention

    F = single_head_attention(X, W_Q, W_K, W_V)
    per_seq_mse = ((F - Y) ** 2).mean(dim=(-1, -2))
    assert torch.allclose(attention_loss(X, W_Q, W_K, W_V, Y), per_seq_mse.sum())
    assert torch.allclose(attention_loss(X, W_Q, W_K, W_V, Y, reduction="mean"), per_seq_mse.mean())
    H_sum = attention_hessian(attention_moments(X, W_Q, W_K, W_V, Y))
    H_mean = attention_hessian(attention_moments(X, W_Q, W_K, W_V, Y, reduction="mean"))
    _close(H_mean * 4, H_sum)


def test_linear_attention_is_block_hollow(gen):
    """MATH §3.6: with linear attention Ŝ_i = 0, so the diagonal H_f blocks vanish exactly."""
    X, W_Q, W_K, W_V, Y = _problem(gen, 2, 5, 3, 4)
    mom = attention_moments(X, W_Q, W_K, W_V, Y, linear=True)
    for a in PARAMS:
        assert float(hessian_block(mom, a, a, "H_f").abs().max()) == 0.0
    # ... while the softmax layer's are not
    mom_s = attention_moments(X, W_Q, W_K, W_V, Y)
    assert float(hessian_block(mom_s, "Q", "Q", "H_f").abs().max()) > 1e-6


def test_single_matrix_qk_variant(gen):
    X, W_Q, W_K, W_V, Y = _problem(gen, 2, 4, 3, 5)
    W_QK = W_Q @ W_K.T
    d = 3
    kappa = 1 / math.sqrt(5)
    blocks = qk_hessian_blocks(X, W_QK, W_V, Y, scale=kappa)

    def loss(theta):
        return attention_loss(X, theta[: d * d].reshape(d, d), torch.eye(d, dtype=DT), theta[d * d :].reshape(d, d),
                              Y, scale=kappa)

    H_ad = torch.func.hessian(loss)(torch.cat([W_QK.reshape(-1), W_V.reshape(-1)]))
    sl = {"QK": slice(0, d * d), "V": slice(d * d, 2 * d * d)}
    for (a, b), blk in blocks.items():
        _close(blk, H_ad[sl[a], sl[b]])

    # two-matrix blocks = 𝒥ᵀ H_QK 𝒥 (+ bilinear term in (Q, K)), and H(V, [Q K]) = H(V, QK) 𝒥  (MATH §3.5)
    mom = attention_moments(X, W_Q, W_K, W_V, Y)
    chain = qk_chain_matrix(W_Q, W_K)
    H = attention_hessian(mom)
    s = 2 * 3 * 5
    expected = chain.T @ blocks[("QK", "QK")] @ chain
    expected[: s // 2, s // 2 :] += torch.kron(mom.G_QK, torch.eye(5, dtype=DT))
    expected[s // 2 :, : s // 2] += torch.kron(mom.G_QK, torch.eye(5, dtype=DT)).T
    _close(H[:s, :s], expected)
    _close(H[s:, :s], blocks[("V", "QK")] @ chain)


def test_bilinear_term_is_the_only_qk_difference(gen):
    """H_f(Q,K) minus the bilinear term is the 𝒥-chained W_QK part, i.e. G_QK ⊗ I is exactly the extra term."""
    from energy.hessian.attention import bilinear_term

    X, W_Q, W_K, W_V, Y = _problem(gen, None, 5, 3, 2)
    mom = attention_moments(X, W_Q, W_K, W_V, Y)
    full = hessian_block(mom, "Q", "K", "H_f")
    chain = qk_chain_matrix(W_Q, W_K)
    Hqk = qk_hessian_blocks(X, W_Q @ W_K.T, W_V, Y, scale=1 / math.sqrt(2), part="H_f")[("QK", "QK")]
    _close(full - bilinear_term(mom), (chain.T @ Hqk @ chain)[:6, 6:])


def test_errors(gen):
    X, W_Q, W_K, W_V, Y = _problem(gen, 2, 4, 3, 2)
    with pytest.raises(EnergyInputError, match="W_K"):
        attention_moments(X, W_Q, W_K[:, :1], W_V, Y)
    with pytest.raises(EnergyInputError, match="W_V"):
        attention_moments(X, W_Q, W_K, W_V[:2], Y)
    with pytest.raises(EnergyInputError, match="Y"):
        attention_moments(X, W_Q, W_K, W_V, Y[:, :3])
    with pytest.raises(EnergyInputError, match="W_O"):
        attention_moments(X, W_Q, W_K, W_V, Y, W_O=W_V[:2])
    with pytest.raises(EnergyInputError, match="output width"):
        attention_moments(X, W_Q, W_K, W_V, Y, W_O=W_V[:, :2])
    with pytest.raises(EnergyInputError, match="dtype"):
        attention_moments(X.float(), W_Q, W_K, W_V, Y)
    with pytest.raises(EnergyInputError, match="reduction"):
        attention_moments(X, W_Q, W_K, W_V, Y, reduction="avg")
    with pytest.raises(EnergyInputError, match="mask"):
        attention_moments(X, W_Q, W_K, W_V, Y, mask=torch.ones(4, 4))
    with pytest.raises(EnergyInputError, match="at least one key"):
        attention_moments(X, W_Q, W_K, W_V, Y, mask=torch.zeros(4, 4, dtype=torch.bool))
    mom = attention_moments(X, W_Q, W_K, W_V, Y)
    with pytest.raises(EnergyInputError, match="part"):
        hessian_block(mom, "Q", "Q", "GGN")
    with pytest.raises(EnergyInputError, match="block names"):
        hessian_block(mom, "O", "Q")
    with pytest.raises(DenseSizeError, match=r"GiB.*energy\.hessian\.structure"):
        attention_hessian(mom, max_gib=1e-9)


def test_size_guard_reports_the_size():
    d = 96
    X = torch.zeros(2, d, dtype=DT)
    W = torch.zeros(d, d, dtype=DT)
    mom = attention_moments(X, W, W, W, X)
    p = 3 * d * d
    with pytest.raises(DenseSizeError, match=f"{p} × {p}.*{p * p * 8 / 1024**3:.2f} GiB"):
        attention_hessian(mom)  # default budget 4 GiB < 5.70 GiB


def test_blocks_listed_once():
    assert len(BLOCKS) == 6 and len({frozenset(b) for b in BLOCKS}) == 6


def test_block_size_guards(gen):
    X, W_Q, W_K, W_V, Y = _problem(gen, 2, 4, 3, 2)
    mom = attention_moments(X, W_Q, W_K, W_V, Y)
    with pytest.raises(DenseSizeError, match=r"block H_o\(Q, K\)"):
        hessian_block(mom, "Q", "K", "H_o", max_gib=1e-9)
    with pytest.raises(DenseSizeError, match="distinct dense blocks"):
        hessian_blocks(mom, max_gib=1e-9)


def test_float32_verification_warns(gen):
    from energy.hessian.attention import VerificationPrecisionWarning

    X, W_Q, W_K, W_V, Y = (t.float() for t in _problem(gen, None, 4, 3, 2))
    with pytest.warns(VerificationPrecisionWarning, match="verification routine"):
        H_ad = autograd_attention_hessian(X, W_Q, W_K, W_V, Y)
    H = attention_hessian(attention_moments(X, W_Q, W_K, W_V, Y))  # the closed form accepts float32
    assert H.dtype == torch.float32
    assert float((H - H_ad).abs().max()) <= 1e-4 * max(1.0, float(H_ad.abs().max()))
