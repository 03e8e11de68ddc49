"""Matrix-free curvature operators vs dense torch.func twins (float64, odd sizes, unequal batches)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import DT
from torch import nn
from torch.func import functional_call

from energy._validation import EnergyInputError
from energy.hessian.operators import (
    DenseSizeError,
    FunctionalOperator,
    GGNOperator,
    HessianOperator,
    JacobianOperator,
    ParameterSpace,
    TokenHessianOperator,
    dense_ggn_reference,
    dense_hessian_reference,
)


class TinyAttention(nn.Module):
    """Single-head causal attention + tanh read-out; named W_Q, W_K, W_V like the paper's blocks (MATH §3.1)."""

    def __init__(self, d: int, d_k: int, out: int, gen: torch.Generator) -> None:
        super().__init__()
        self.W_Q = nn.Parameter(torch.randn(d, d_k, generator=gen, dtype=DT) / math.sqrt(d))
        self.W_K = nn.Parameter(torch.randn(d, d_k, generator=gen, dtype=DT) / math.sqrt(d))
        self.W_V = nn.Parameter(torch.randn(d, d, generator=gen, dtype=DT) / math.sqrt(d))
        self.head = nn.Linear(d, out, dtype=DT)
        self.register_buffer("scale", torch.tensor(1 / math.sqrt(d_k), dtype=DT))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        n = X.shape[-2]
        T = self.scale * (X @ self.W_Q) @ (X @ self.W_K).transpose(-1, -2)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        A = T.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.head(torch.tanh(A @ X @ self.W_V))[..., -2:, :]  # score the last two positions


def _mlp(gen: torch.Generator) -> nn.Module:
    torch.manual_seed(int(torch.randint(0, 10_000, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)


def _regression_data(gen: torch.Generator, sizes=(5, 2, 4)):
    N = sum(sizes)
    X = torch.randn(N, 5, generator=gen, dtype=DT)
    y = torch.randn(N, 3, generator=gen, dtype=DT)
    return X, y, list(zip(X.split(list(sizes)), y.split(list(sizes))))


def _attention_case(gen: torch.Generator):
    d, d_k, out, n = 5, 3, 4, 6
    model = TinyAttention(d, d_k, out, gen)
    X = torch.randn(7, n, d, generator=gen, dtype=DT)
    y = torch.randint(0, out, (7, 2), generator=gen)
    loss = lambda o, t: nn.functional.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1))
    return model, loss, list(zip(X.split([3, 4]), y.split([3, 4]))), X, y


def _full_data_hessian(model, names, loss_of_full):
    space = ParameterSpace(model, names)
    theta = space.flatten({n: p.detach() for n, p in model.named_parameters() if n in names})
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    fixed.update(dict(model.named_buffers()))
    return torch.func.hessian(lambda t: loss_of_full(lambda X: functional_call(model, (space.unflatten(t), fixed),
                                                                                 (X,))))(theta)


# ---------------------------------------------------------------------------------------------------------------
# Correctness of H, GGN, H - GGN
# ---------------------------------------------------------------------------------------------------------------


def test_mean_reduction_weights_unequal_batches(gen):
    """reduction='mean' over batches of sizes 5, 2, 4 == the Hessian of the mean loss over all 11 samples."""
    model = _mlp(gen)
    X, y, data = _regression_data(gen)
    names = ["0.weight", "2.weight", "2.bias"]
    H = HessianOperator(model, nn.MSELoss(), names, data)
    ref = _full_data_hessian(model, names, lambda f: nn.functional.mse_loss(f(X), y))
    assert torch.allclose(H.dense(), ref, atol=1e-12, rtol=0)


def test_sum_reduction(gen):
    model = _mlp(gen)
    X, y, data = _regression_data(gen, sizes=(3, 8))
    loss = nn.MSELoss(reduction="sum")
    H = HessianOperator(model, loss, None, data)
    ref = _full_data_hessian(model, H.param_names, lambda f: ((f(X) - y) ** 2).sum())
    assert torch.allclose(H.dense(), ref, atol=1e-11, rtol=0)


def test_attention_blocks_match_dense_twins(gen):
    model, loss, data, _, _ = _attention_case(gen)
    names = ["W_Q", "W_V", "head.bias"]
    Hd = dense_hessian_reference(model, loss, names, data, reduction="mean")
    Gd = dense_ggn_reference(model, loss, names, data, reduction="mean")
    V = torch.randn(Hd.shape[0], 5, generator=gen, dtype=DT)
    for op, ref in [
        (HessianOperator(model, loss, names, data, reduction="mean"), Hd),
        (GGNOperator(model, loss, names, data, reduction="mean"), Gd),
        (FunctionalOperator(model, loss, names, data, reduction="mean"), Hd - Gd),
    ]:
        assert torch.allclose(op @ V, ref @ V, atol=1e-12, rtol=0)
        assert torch.allclose(op @ V[:, 0], ref @ V[:, 0], atol=1e-12, rtol=0)
    # GGN is PSD, the Hessian of this model is not
    assert torch.linalg.eigvalsh(Gd).min() > -1e-12
    assert torch.linalg.norm(Hd - Gd) > 1e-3 * torch.linalg.norm(Hd)


def test_hessian_and_ggn_shared_equals_separate_and_cache(gen):
    model, loss, data, _, _ = _attention_case(gen)
    names = ["W_K", "W_Q"]
    H = HessianOperator(model, loss, names, data, reduction="mean")
    G = GGNOperator(model, loss, names, data, reduction="mean")
    F = FunctionalOperator(model, loss, names, data, reduction="mean")
    V = torch.randn(H.shape[0], 3, generator=gen, dtype=DT)
    HV, GV = H.hessian_and_ggn(V)
    assert torch.allclose(HV, H @ V, atol=1e-13) and torch.allclose(GV, G @ V, atol=1e-13)
    out = G.products(V, ("H_f", "H_o"))
    assert torch.allclose(out["H_f"], F @ V, atol=1e-13) and torch.allclose(out["H_f"] + out["H_o"], HV, atol=1e-13)


def test_old_part_names_deprecated_but_working(gen):
    """``"G"`` / ``"F"`` (previous release) are the ``"H_o"`` / ``"H_f"`` of today, with a DeprecationWarning."""
    model, loss, data, _, _ = _attention_case(gen)
    H = HessianOperator(model, loss, ["W_Q"], data, reduction="mean")
    V = torch.randn(H.shape[0], 2, generator=gen, dtype=DT)
    new = H.products(V, ("H_o", "H_f"))
    with pytest.warns(DeprecationWarning, match="'H_o'"):
        old = H.products(V, ("G", "F"))
    assert set(old) == {"G", "F"}
    assert torch.equal(old["G"], new["H_o"]) and torch.equal(old["F"], new["H_f"])
    with pytest.warns(DeprecationWarning, match="parts="):
        assert set(H.products(V, kinds=("H",))) == {"H"}
    with pytest.warns(DeprecationWarning, match=r"\.part"):
        assert GGNOperator(model, loss, ["W_Q"], data, reduction="mean").kind == "G"
    assert FunctionalOperator(model, loss, ["W_Q"], data, reduction="mean").part == "H_f"
    with pytest.raises(EnergyInputError, match="H_o"):
        H.products(V, ("X",))


@pytest.mark.slow  # torch.func.linearize traces the model (a few seconds)
def test_cached_linearisation_reused():
    model, loss, data, _, _ = _attention_case(torch.Generator().manual_seed(5))
    H = HessianOperator(model, loss, ["W_Q", "W_V"], data, reduction="mean")
    cached = HessianOperator(model, loss, ["W_Q", "W_V"], data, reduction="mean", cache=True)
    V = torch.randn(H.shape[0], 3, dtype=DT)
    HV, GV = H.hessian_and_ggn(V)
    for _ in range(2):  # the second call reuses the per-batch linearisation
        HVc, GVc = cached.hessian_and_ggn(V)
        assert torch.allclose(HVc, HV, atol=1e-13) and torch.allclose(GVc, GV, atol=1e-13)
    assert cached._cache is not None and len(cached._cache) == len(data)
    with torch.no_grad():
        model.W_Q.mul_(2.0)
    cached.clear_cache()
    assert torch.allclose(cached @ V, H @ V, atol=1e-13)


def test_linear_model_square_loss_hessian_is_ggn():
    """f linear in θ => H_f = 0 and H = G = (2/(N·m)) Jᵀ J for the mean square loss (MATH §3.6, linear MLP)."""
    gen = torch.Generator().manual_seed(3)
    model = nn.Linear(4, 3, dtype=DT)
    X = torch.randn(9, 4, generator=gen, dtype=DT)
    y = torch.randn(9, 3, generator=gen, dtype=DT)
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    H = HessianOperator(model, nn.MSELoss(), None, data)
    F = FunctionalOperator(model, nn.MSELoss(), None, data)
    J = JacobianOperator(model, None, data).dense()
    assert torch.allclose(H.dense(), 2 / (9 * 3) * J.T @ J, atol=1e-13)
    assert F.dense().abs().max() < 1e-13


def test_matmat_chunking_and_vector_forms(gen):
    model, loss, data, _, _ = _attention_case(gen)
    H = HessianOperator(model, loss, ["W_V"], data, reduction="mean")
    Hc = HessianOperator(model, loss, ["W_V"], data, reduction="mean", max_vectors=2)
    V = torch.randn(H.shape[0], 5, generator=gen, dtype=DT)
    cols = torch.stack([H.matvec(V[:, j]) for j in range(5)], dim=1)
    assert torch.allclose(H.matmat(V), cols, atol=1e-13)
    assert torch.allclose(Hc.matmat(V), cols, atol=1e-13)
    assert torch.allclose(Hc.dense(), H.dense(), atol=1e-13)
    assert H.T is H


def test_to_scipy_float64_numpy(gen):
    model, loss, data, _, _ = _attention_case(gen)
    G = GGNOperator(model, loss, ["W_Q"], data, reduction="mean")
    S = G.to_scipy()
    v = np.random.default_rng(0).standard_normal((G.shape[0], 3))
    out = S.matmat(v)
    assert out.dtype == np.float64 and out.shape == (G.shape[0], 3)
    assert np.allclose(out, (G @ torch.from_numpy(v)).numpy(), atol=1e-14)
    assert np.allclose(S.matvec(v[:, 0]), out[:, 0], atol=1e-14)
    assert np.allclose(S.rmatvec(v[:, 0]), out[:, 0], atol=1e-14)  # symmetric


def test_blocks_by_name(gen):
    model, loss, data, _, _ = _attention_case(gen)
    names = ["W_Q", "W_K", "W_V"]
    H = HessianOperator(model, loss, names, data, reduction="mean")
    D = H.dense()
    sQ, sV = H.space.slice("W_Q"), H.space.slice("W_V")
    assert torch.allclose(H.block("W_Q").dense(), D[sQ, sQ], atol=1e-13)
    off = H.block("W_V", "W_Q")
    assert off.shape == (sV.stop - sV.start, sQ.stop - sQ.start)
    assert torch.allclose(off.dense(), D[sV, sQ], atol=1e-13)
    u = torch.randn(off.shape[0], generator=gen, dtype=DT)
    assert torch.allclose(off.T @ u, D[sQ, sV] @ u, atol=1e-13)
    G = GGNOperator(model, loss, names, data, reduction="mean")
    assert torch.allclose(G.block(["W_V"]).dense(), G.dense()[sV, sV], atol=1e-13)


def test_gradient_and_loss_match_autograd(gen):
    model = _mlp(gen)
    X, y, data = _regression_data(gen)
    H = HessianOperator(model, nn.MSELoss(), None, data)
    model.zero_grad()
    L = nn.functional.mse_loss(model(X), y)
    L.backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(H.gradient(), g, atol=1e-14)
    assert torch.allclose(H.loss(), L.detach(), atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# Jacobians and token-state Hessians
# ---------------------------------------------------------------------------------------------------------------


def test_jacobian_and_transpose(gen):
    model, _, data, X, _ = _attention_case(gen)
    names = ["W_Q", "head.weight"]
    J = JacobianOperator(model, names, data)
    space = ParameterSpace(model, names)
    theta = space.flatten({n: p.detach() for n, p in model.named_parameters() if n in names})
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    fixed.update(dict(model.named_buffers()))
    rows = [torch.func.jacrev(lambda t, Xb=Xb: functional_call(model, (space.unflatten(t), fixed), (Xb,)))(theta)
            .reshape(-1, theta.numel()) for Xb, _ in data]
    Jd = torch.cat(rows)
    assert J.shape == tuple(Jd.shape)
    assert torch.allclose(J.dense(), Jd, atol=1e-13)
    U = torch.randn(J.shape[0], 3, generator=gen, dtype=DT)
    assert torch.allclose(J.T @ U, Jd.T @ U, atol=1e-13)
    assert torch.allclose(J.T.dense(), Jd.T, atol=1e-13)


def test_ggn_from_jacobian_cross_entropy(gen):
    """G = Σ_b w_b J_bᵀ (∇²_o ℓ_b) J_b with the softmax Hessian diag(p) − p pᵀ / (#scored rows) written out."""
    model, loss, data, X, y = _attention_case(gen)
    G = GGNOperator(model, loss, ["W_V"], data, reduction="mean").dense()
    J = JacobianOperator(model, ["W_V"], data).dense()
    o = model(X).detach()  # (7, 2, 4): all batches stacked in data order
    p = o.softmax(-1).reshape(-1, 4)
    blocks = [torch.diag(pi) - torch.outer(pi, pi) for pi in p]
    H_o = torch.block_diag(*blocks) / p.shape[0]  # mean over all 14 scored rows
    assert torch.allclose(G, J.T @ H_o @ J, atol=1e-13)


def test_token_hessian_operator(gen):
    W = torch.randn(4, 4, generator=gen, dtype=DT)
    W = W @ W.T

    def energy(Y: torch.Tensor) -> torch.Tensor:  # a smooth token energy: -logsumexp of pairwise similarities
        return -torch.logsumexp(Y @ W @ Y.T, dim=-1).sum() + 0.5 * (Y**2).sum()

    Y = torch.randn(5, 4, generator=gen, dtype=DT) * 0.3
    ref = torch.func.hessian(energy)(Y).reshape(20, 20)
    for op in (TokenHessianOperator(energy, Y), TokenHessianOperator(energy, Y, linearize_once=True)):
        assert torch.allclose(op.dense(), ref, atol=1e-12)
    model, loss, _, X, y = _attention_case(gen)
    op = TokenHessianOperator.from_model(model, loss, X[:2], y[:2])
    refX = torch.func.hessian(lambda Z: loss(model(Z), y[:2]))(X[:2]).reshape(op.shape)
    v = torch.randn(op.shape[0], generator=gen, dtype=DT)
    assert torch.allclose(op @ v, refX @ v, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_bad_parameter_names():
    model = _mlp(torch.Generator().manual_seed(0))
    data = [(torch.randn(2, 5, dtype=DT), torch.randn(2, 3, dtype=DT))]
    with pytest.raises(EnergyInputError, match=r"'0.wieght' is not a parameter.*Did you mean"):
        HessianOperator(model, nn.MSELoss(), ["0.wieght"], data)
    with pytest.raises(EnergyInputError, match="listed twice"):
        HessianOperator(model, nn.MSELoss(), ["0.weight", "0.weight"], data)
    with pytest.raises(EnergyInputError, match="empty"):
        HessianOperator(model, nn.MSELoss(), [], data)
    H = HessianOperator(model, nn.MSELoss(), ["0.weight"], data)
    with pytest.raises(EnergyInputError, match="not part of this operator"):
        H.block("2.weight")


def test_bad_vectors_and_dtypes():
    model = _mlp(torch.Generator().manual_seed(0))
    data = [(torch.randn(2, 5, dtype=DT), torch.randn(2, 3, dtype=DT))]
    H = HessianOperator(model, nn.MSELoss(), None, data)
    n = H.shape[0]
    assert n == 5 * 7 + 7 + 7 * 3 + 3
    with pytest.raises(EnergyInputError, match=rf"shape \({n},\) or \({n}, k\)"):
        H @ torch.zeros(n - 1, dtype=DT)
    with pytest.raises(EnergyInputError, match=rf"shape \({n},\) or \({n}, k\)"):
        H @ torch.zeros(n, 2, 2, dtype=DT)
    with pytest.raises(EnergyInputError, match="dtype torch.float32"):
        H @ torch.zeros(n, dtype=torch.float32)
    with pytest.raises(EnergyInputError, match="NaN"):
        H @ torch.full((n,), float("nan"), dtype=DT)
    with pytest.raises(EnergyInputError, match="torch.Tensor"):
        H @ np.zeros(n)


def test_bad_data_and_reduction():
    model = _mlp(torch.Generator().manual_seed(0))
    batches = [(torch.randn(2, 5, dtype=DT), torch.randn(2, 3, dtype=DT))]
    with pytest.raises(EnergyInputError, match="one-shot iterator"):
        HessianOperator(model, nn.MSELoss(), None, iter(batches))
    with pytest.raises(EnergyInputError, match="`reduction` is required"):
        HessianOperator(model, lambda o, y: ((o - y) ** 2).mean(), None, batches)
    with pytest.raises(EnergyInputError, match="contradicts"):
        HessianOperator(model, nn.MSELoss(reduction="sum"), None, batches, reduction="mean")
    with pytest.raises(EnergyInputError, match="pair"):
        HessianOperator(model, nn.MSELoss(), None, [torch.randn(2, 5, dtype=DT)])
    with pytest.raises(EnergyInputError, match="no samples"):
        HessianOperator(model, nn.MSELoss(), None, [])


def test_dense_memory_guard_points_to_matrix_free():
    model = _mlp(torch.Generator().manual_seed(0))
    data = [(torch.randn(2, 5, dtype=DT), torch.randn(2, 3, dtype=DT))]
    H = HessianOperator(model, nn.MSELoss(), None, data)
    need = 66 * 66 * 8 / 2**30
    with pytest.raises(DenseSizeError, match=rf"{need:.3g} GiB.*matrix-free"):
        H.dense(max_gib=1e-6)


def test_reference_warns_on_float32():
    model = nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.randn(4, 2))]
    with pytest.warns(UserWarning, match="float64"):
        dense_hessian_reference(model, nn.MSELoss(), None, data)
    with pytest.warns(UserWarning, match="float64"):
        dense_ggn_reference(model, nn.MSELoss(), None, data)


def test_training_mode_dropout_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(DT)
    data = [(torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT))]
    with pytest.raises(EnergyInputError, match=r"training mode.*model.eval\(\)"):
        HessianOperator(model, nn.MSELoss(), None, data)
    with pytest.raises(EnergyInputError, match="training mode"):
        JacobianOperator(model, None, data)
    model.eval()
    H = HessianOperator(model, nn.MSELoss(), None, data)
    assert torch.allclose(H.dense(), dense_hessian_reference(model, nn.MSELoss(), None, data), atol=1e-13)


class _SingleLayer(nn.Module):
    """F = softmax(κ X W_Q W_Kᵀ Xᵀ) X W_V of MATH §3.1 (one sequence X, no mask, no W_O)."""

    def __init__(self, d_V: int, d_K: int, gen: torch.Generator) -> None:
        super().__init__()
        self.W_Q = nn.Parameter(torch.randn(d_V, d_K, generator=gen, dtype=DT))
        self.W_K = nn.Parameter(torch.randn(d_V, d_K, generator=gen, dtype=DT))
        self.W_V = nn.Parameter(torch.randn(d_V, d_V, generator=gen, dtype=DT))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        kappa = 1 / math.sqrt(self.W_Q.shape[1])
        A = (kappa * X @ self.W_Q @ self.W_K.T @ X.T).softmax(-1)
        return A @ X @ self.W_V


def test_ggn_at_layer_output_is_outer_product_part_of_math_3_4(gen):
    """GGN of ℓ = c‖F − Y‖² at the attention output = H_o of MATH §3.4 (closed forms written out here):
    H_o(V,V) = 2c (M_1ᵀ M_1) ⊗ I, H_o(Q,Q) = 2cκ² Σ_i x_i x_iᵀ ⊗ (W_Kᵀ Σ_i W_V W_Vᵀ Σ_i W_K); H_f(V,V) = 0."""
    L, d_V, d_K = 5, 4, 3
    model = _SingleLayer(d_V, d_K, gen)
    X = torch.randn(L, d_V, generator=gen, dtype=DT) * 0.7
    Y = torch.randn(L, d_V, generator=gen, dtype=DT)
    c = 1 / (L * d_V)
    loss = lambda F, Y: c * ((F - Y) ** 2).sum()
    data = [(X, Y)]
    G = GGNOperator(model, loss, ["W_Q", "W_V"], data, reduction="sum", batch_size_fn=lambda X: 1)
    kappa = 1 / math.sqrt(d_K)
    W_Q, W_K, W_V = model.W_Q.detach(), model.W_K.detach(), model.W_V.detach()
    A = (kappa * X @ W_Q @ W_K.T @ X.T).softmax(-1)
    M1 = A @ X
    H_VV = 2 * c * torch.kron(M1.T @ M1, torch.eye(d_V, dtype=DT))
    H_QQ = torch.zeros(d_V * d_K, d_V * d_K, dtype=DT)
    for i in range(L):
        Sigma_i = X.T @ (torch.diag(A[i]) - torch.outer(A[i], A[i])) @ X
        H_QQ += torch.kron(torch.outer(X[i], X[i]), W_K.T @ Sigma_i @ W_V @ W_V.T @ Sigma_i @ W_K)
    H_QQ *= 2 * c * kappa**2
    sQ, sV = G.space.slice("W_Q"), G.space.slice("W_V")
    D = G.dense()
    assert torch.allclose(D[sV, sV], H_VV, atol=1e-12)
    assert torch.allclose(D[sQ, sQ], H_QQ, atol=1e-12)
    F_VV = FunctionalOperator(model, loss, ["W_V"], data, reduction="sum", batch_size_fn=lambda X: 1).dense()
    assert F_VV.abs().max() < 1e-14


def test_single_column_hessian_product_equals_the_batched_one(gen):
    """One column takes the kept vjp directly (no vmap); it must equal that column of a batched product."""
    model = _mlp(gen)
    _, _, data = _regression_data(gen)
    H = HessianOperator(model, nn.MSELoss(), None, data)
    V = torch.randn(H.shape[0], 3, generator=gen, dtype=torch.float64)
    batched = H @ V
    for j in range(3):
        single = H @ V[:, j]
        assert torch.allclose(single, batched[:, j], rtol=1e-13, atol=1e-15)
