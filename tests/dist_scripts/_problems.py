"""The problems the distributed tests solve twice: sharded over ranks (the workers) and in one process (pytest).

Everything here is seeded and built on the CPU in float64, so every rank and the reference see the same model,
data and probes; ``shard_batches`` gives uneven shards (batches of different sizes, and ranks with different
numbers of batches).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from energy.hessian.curvature_operators import GGNOperator, HessianOperator, JacobianOperator
from energy.hessian.estimators import hutchinson_diagonal, hutchinson_trace, hutchpp_trace
from energy.hessian.krylov import lanczos, slq_density
from energy.hessian.token_operator import TokenHessianOperator

DT = torch.float64
#: Batch sizes of the MLP problem: two ranks get 3 + 4 and 2 + 5 + 1 samples (mean weights need the global count).
SIZES = (3, 4, 2, 5, 1)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def mlp_batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 5, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)) for n in SIZES]


def probes(dim: int, k: int = 3) -> Tensor:
    return torch.randn(dim, k, generator=torch.Generator().manual_seed(2), dtype=DT)


def token_states() -> tuple[Tensor, Tensor]:
    """Token states ``(B, n, d) = (5, 3, 4)`` (sharded along B) and the weight of ``φ(Y) = Σ tanh(Y W)²``."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 3, 4, generator=g, dtype=DT), torch.randn(4, 4, generator=g, dtype=DT)


def token_fn(W: Tensor) -> Any:
    return lambda Y: (torch.tanh(Y @ W) ** 2).sum()


def cotangents(indices: list[int]) -> Tensor:
    """Output-space vectors ``U`` for ``Jᵀ U``: rows of batch ``b`` drawn from seed ``(5, b)`` (rows follow data)."""
    return torch.cat([torch.randn(SIZES[b] * 3, 2, generator=torch.Generator().manual_seed(50 + b), dtype=DT)
                      for b in indices])


def mlp_results(indices: list[int], Y: Tensor, *, distributed: bool = False) -> dict[str, Any]:
    """Every product and estimate of the MLP / token problems on the batches ``indices`` (a rank's shard, or all)
    and the token states ``Y`` (a rank's shard, or all).
    """
    batches = [mlp_batches()[b] for b in indices]
    model = mlp()
    loss = nn.MSELoss()
    H = HessianOperator(model, loss, None, batches, distributed=distributed)
    G = GGNOperator(model, loss, None, batches, distributed=distributed)
    V = probes(H.shape[0])
    out: dict[str, Any] = {"num_data": H.num_data}
    out.update({f"products_{k}": v for k, v in H.products(V).items()})
    out["ggn"] = G @ V
    out["gradient"] = H.gradient()
    out["loss"] = H.loss()
    out["block"] = H.block(["2.weight"]) @ V[H.space.slice("2.weight")]
    out["offblock"] = H.block(["0.weight"], ["2.bias"]) @ V[H.space.slice("2.bias")]
    gen = torch.Generator().manual_seed(4)
    out["hutchinson"] = hutchinson_trace(H, 12, generator=gen).value
    out["diagonal"] = hutchinson_diagonal(G, 8, generator=gen).value
    out["hutchpp"] = hutchpp_trace(H, 15, generator=gen).value
    out["lanczos"] = lanczos(H, 2, generator=gen).eigenvalues
    dens = slq_density(H, 3, 10, generator=gen)
    out["slq_nodes"], out["slq_weights"] = dens.nodes, dens.weights
    J = JacobianOperator(model, None, [X for X, _ in batches], distributed=distributed)
    out["jacobian_T"] = J.T @ cotangents(indices)
    out["jacobian_rows"] = J.shape[0]
    out["jacobian_V_rows"] = J @ probes(J.shape[1], 2)  # this rank's rows only (no communication)
    W = token_states()[1]
    T = TokenHessianOperator(token_fn(W), Y, distributed=distributed)
    out["token"] = T @ probes(T.shape[0], 2)
    out["token_lanczos"] = lanczos(T, 2, generator=torch.Generator().manual_seed(6)).eigenvalues
    return out
