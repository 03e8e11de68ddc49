r"""Exact per-head Hessian block norms at GPT-2-small scale (``d = 768``, ``k = d_v = 64``, ``L = 1024``, ``B = 8``).

One head ``F_h = A X W_V W_O`` (``A = softmax(κ X W_Q W_Kᵀ Xᵀ)``, causal or not) of a multi-head layer with the
square loss ``ℓ = c Σ_b ‖F_b − Y_b‖²`` on the whole layer output ``F = Σ_h F_h`` (MATH §5.1). For its
parameters ``θ_h`` the Hessian is ``H = H_o + H_f`` with ``H_o = 2c J_hᵀJ_h`` and ``H_f = ⟨G, ∇²_{θ_h} F_h⟩``,
``G = 2c(F − Y)`` the *whole* layer's residual (an input here, ``(B, L, d_out)``). Rows ``i`` (``N = B·L``),
``Ω = W_OW_Oᵀ = R_OᵀR_O`` (``R_O`` from a QR of ``W_Oᵀ``), per sequence ``K = XW_K``, ``V = XW_V``,
``Ṽ = V R_Oᵀ`` and the token-space softmax Jacobian ``J_i = diag(a_i) − a_ia_iᵀ`` and curvature
``C_i = diag(r_i) − a_ir_iᵀ − r_ia_iᵀ``, ``r_ij = a_ij(v_ij − a_iᵀv_i)``, ``v_ij = x_jᵀW_VW_O g_i``
(MATH §3.2–§3.5 with ``W_O``). The diagonal blocks are (docs/MATH.md §5.4)

.. math::
    H(Q,Q) = \sum_i x_ix_i^\top \otimes P_i,\quad P_i = 2c\kappa^2 E_iE_i^\top + \kappa^2 K^\top C_i K,\quad
    E_i = K^\top J_i \tilde V\ (k\times r),

    H(K,K) = \sum_i R_i \otimes q_iq_i^\top,\quad R_i = 2c\kappa^2 D_iD_i^\top + \kappa^2 X^\top C_i X,\quad
    D_i = X^\top J_i \tilde V\ (d\times r),

    H(V,V) = 2c\, M_1^\top M_1 \otimes \Omega,\qquad H(O,O) = 2c\, W_V^\top M_1^\top M_1 W_V \otimes I_{d_{out}},

and ``H_f(V,V) = H_f(O,O) = 0``. With ``‖Σ_i A_i⊗B_i‖² = Σ_ij ⟨A_i,A_j⟩⟨B_i,B_j⟩ = ‖Σ_i vec A_i vec B_iᵀ‖²``
each norm is computed by whichever side is cheaper (symmetric factors packed by :func:`vech`, ``p = k(k+1)/2``):

* ``(Q,Q)``, **Gram**: ``Σ_ij (x_iᵀx_j)² ⟨P_i, P'_j⟩``; the ``P_i`` come from token-space GEMMs
  ``E_i = Σ_j a_ij k_j ṽ_jᵀ − (Kᵀa_i)(Ṽᵀa_i)ᵀ``, ``KᵀC_iK = Σ_j r_ij k_jk_jᵀ − α_iβ_iᵀ − β_iα_iᵀ``.
  Cost ``O(B L² k (r + k) + N² (d + p))``: seconds at GPT-2 scale.
* ``(K,K)``, **primal**: ``M = Σ_i vec R_i vech(q_iq_iᵀ)ᵀ`` in ``t × t`` tiles of ``R`` (upper tiles only),
  ``‖H‖² = Σ_tiles w ‖M_tile‖²``. The Gram route needs ``⟨D_iD_iᵀ, D_jD_jᵀ⟩ = ‖D_iᵀD_j‖²`` for all pairs,
  ``Θ(N² d r²)``; the primal route costs ``Θ(N d² p)``: ``≈ N d²/2 (2p + L + r)`` multiply–adds with the
  functional part (``1.3·10¹³`` at GPT-2 scale, ≥ 166 s at 160 GFLOP/s), the one block that cannot meet a minute
  on two cores.
* ``(V,V)``, ``(O,O)``: ``‖S ⊗ Ω‖² = ‖S‖²‖Ω‖²``, ``O(N d² + d³)``.

No dense block nor any ``L × L`` core per row is formed. Memory: ``O(N d r)`` for ``D`` (3.2 GB in float64 at
GPT-2 scale) plus row chunks. Everything except the public :func:`head_block_norms` is pure (no validation, no
reads of tensor values; :func:`head_inner_products` returns 0-dim tensors).

**Data shards** (``distributed=``, docs/MATH.md §6.2): every block is a sum over rows ``i``, so with the rows
split over ranks ``(V,V)``, ``(O,O)`` all-reduce their Gram matrix ``S``, ``(K,K)`` all-reduces each tile ``M``
(a sum over rows) before its squared norm, and ``(Q,Q)``, whose Gram route couples every pair of rows, gathers the
packed row factors ``(x_i, vech P^o_i, vech P^f_i)`` of all ranks and splits the symmetric pairs between them
(:class:`RowShards`: the identity in one process, so the pure core is the same code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from energy._validation import (
    EnergyInputError,
    check_positive_int,
    check_real,
    check_same_device,
    check_same_float_dtype,
    check_scale,
    check_tensor,
)
from energy.core import attention as core_attention
from energy.core import standard as core_standard
from energy.hessian.attention_layer import attention_matrix
from energy.hessian.distributed import ShardGroup, resolve_shards, tensor_checksum
from energy.hessian.structure import _parts

__all__ = ["HEAD_BLOCKS", "RowShards", "head_output", "vech", "gram_units", "head_inner_products",
           "head_block_norms"]

#: The diagonal blocks of one head that :func:`head_block_norms` computes.
HEAD_BLOCKS: tuple[str, ...] = ("QQ", "KK", "VV", "OO")


def head_output(X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor, kappa: float, causal: bool) -> Tensor:
    r"""One head's output ``F_h = A X W_V W_O``, ``A = softmax(κ X W_Q W_Kᵀ Xᵀ + mask)`` (MATH §5.1), pure.

    Args:
        X: ``(B, L, d)``.
        W_Q: ``(d, k)``.
        W_K: ``(d, k)``.
        W_V: ``(d, d_v)``.
        W_O: ``(d_v, d_out)``.
        kappa: the score scale ``κ``.
        causal: mask the future (token ``i`` attends to ``j ≤ i``).

    Returns:
        ``(B, L, d_out)``.
    """
    return attention_matrix(X, W_Q, W_K, kappa, _mask(X, causal), linear=False) @ (X @ W_V) @ W_O


def _mask(X: Tensor, causal: bool) -> Tensor | None:
    L = X.shape[-2]
    return torch.ones(L, L, dtype=torch.bool, device=X.device).tril() if causal else None


def vech(S: Tensor) -> Tensor:
    r"""Weighted half-vectorisation of symmetric ``(..., n, n)``: ``⟨vech A, vech B⟩ = ⟨A, B⟩_F``.

    .. math:: \mathrm{vech}(S) = (S_{aa})_a \,\|\, (\sqrt2\, S_{ab})_{a<b}

    Returns ``(..., n(n+1)/2)``.
    """
    n = S.shape[-1]
    iu = torch.triu_indices(n, n, device=S.device)
    w = torch.full(iu.shape[1:], 2.0**0.5, dtype=S.dtype, device=S.device)
    w[iu[0] == iu[1]] = 1.0
    return S[..., iu[0], iu[1]] * w


def _same(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class RowShards:
    r"""How the row sums and row sets of a head combine over data shards (MATH §6.2); the identity in one process.

    The pure core calls only these hooks, so one process and a sharded run execute the same formulas.

    Attributes:
        sum: ``t ↦ Σ_r t_r`` for a tensor of the same shape on every rank (``(V,V)``, ``(O,O)``: ``S``;
            ``(K,K)``: each tile ``M``; ``(Q,Q)``: its three scalars).
        gather: ``(n_r, m) ↦ (Σ_r n_r, m)``, the rows of every rank in rank order (``(Q,Q)``'s row factors).
        rank: this shard's index; world_size: the number of shards (the share of the ``(Q,Q)`` pairs,
            :func:`gram_units`).
    """

    sum: Callable[[Tensor], Tensor] = _same
    gather: Callable[[Tensor], Tensor] = _same
    rank: int = 0
    world_size: int = 1

    @classmethod
    def of(cls, shards: ShardGroup) -> RowShards:
        """The hooks of a process group: sums by ``all_reduce``, rows by a padded ``all_gather``
        (:meth:`~energy.hessian.distributed.ShardGroup.gather_rows`).
        """
        return cls(sum=lambda t: shards.all_reduce_(t.clone(), "a row sum of the head norms"),
                   gather=lambda t: shards.gather_rows(t, "the rows of the (Q,Q) Gram route"), rank=shards.rank,
                   world_size=shards.world_size)


def gram_units(N: int, chunk: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int, int, int]]:
    r"""This rank's share ``[(i0, i1, j0, j1)]`` of the symmetric pair sum ``Σ_{ij} w_ij f(i, j)`` over ``N`` rows.

    A unit is the rectangle of rows ``i0:i1`` against columns ``j0:j1`` with ``j0 = i0`` (a diagonal block and the
    columns after it) or ``j0 ≥ i1`` (strictly above the diagonal); columns ``j < i1`` count once, the others twice
    (the mirrored pairs), so the units of all ranks cover every pair exactly once.

    * one shard: row chunks of ``chunk`` rows against all later columns (one wide GEMM per chunk);
    * ``W`` shards: ``n = max(⌈N/chunk⌉, 2W − 1)`` near-equal row chunks, the ``n(n+1)/2`` chunk pairs ``I ≤ J``
      dealt by longest-first greedy on their cost ``|I||J|`` (every rank computes the same deal), so each rank does
      ``≈ N²/(2W)(1 + 1/n)`` pairs.

    Pure Python on sizes (no tensors).
    """
    if world_size == 1:
        return [(i0, min(N, i0 + chunk), i0, N) for i0 in range(0, N, chunk)]
    n = min(N, max(-(-N // chunk), 2 * world_size - 1))
    edges = [N * t // n for t in range(n + 1)] if n else [0]
    units = [(edges[a], edges[a + 1], edges[b], edges[b + 1]) for a in range(n) for b in range(a, n)]
    units.sort(key=lambda u: -(u[1] - u[0]) * (u[3] - u[2]))  # stable: the same deal on every rank
    load, mine = [0] * world_size, []
    for u in units:
        r = min(range(world_size), key=lambda q: (load[q], q))
        load[r] += (u[1] - u[0]) * (u[3] - u[2])
        if r == rank:
            mine.append(u)
    return mine


class _Head:
    """Per-head quantities shared by the blocks (all pure tensor algebra; MATH §3.2 with ``W_O``)."""

    def __init__(self, X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor, G: Tensor, c: float,
                 kappa: float, causal: bool) -> None:
        self.X, self.W_V, self.W_O, self.c, self.kappa = X, W_V, W_O, c, kappa
        self.A = attention_matrix(X, W_Q, W_K, kappa, _mask(X, causal), linear=False)  # (B, L, L)
        self.K = X @ W_K  # (B, L, k)
        V = X @ W_V  # (B, L, d_v)
        v = (G @ W_O.T) @ V.transpose(-1, -2)  # v_ij = g_iᵀ W_Oᵀ W_Vᵀ x_j
        self.r = core_standard.softmax_jacobian_apply(self.A, v)  # r_i = J_i v_i
        R_O = torch.linalg.qr(W_O.T, mode="r")[1]  # Ω = W_O W_Oᵀ = R_Oᵀ R_O, (min(d_v, d_out), d_v)
        self.Vt = V @ R_O.T  # Ṽ, (B, L, r)
        self.q = (X @ W_Q).reshape(-1, W_Q.shape[1])  # (N, k)
        self.x = X.reshape(-1, X.shape[-1])  # (N, d)

    def jacobian_factor(self, U: Tensor, b: int) -> Tensor:
        r"""``U_bᵀ J_i Ṽ_b = Σ_j a_ij u_j ṽ_jᵀ − (U_bᵀa_i)(Ṽ_bᵀa_i)ᵀ`` for the rows ``i`` of sequence ``b``,
        ``(L, m, r)`` (``U`` is ``(B, L, m)``): one GEMM, ``O(L² m r)``.
        """
        L, m = U.shape[1:]
        A, Vt = self.A[b], self.Vt[b]
        UV = (U[b, :, :, None] * Vt[:, None, :]).reshape(L, -1)
        return (A @ UV).reshape(L, m, -1) - (A @ U[b])[:, :, None] * (A @ Vt)[:, None, :]

    def curvature_factor(self, U: Tensor, W: Tensor, b: int) -> Tensor:
        r"""``U_bᵀ C_i W_b = Σ_j r_ij u_j w_jᵀ − (U_bᵀa_i)(W_bᵀr_i)ᵀ − (U_bᵀr_i)(W_bᵀa_i)ᵀ`` for the rows of
        sequence ``b``, ``(L, m, n)``: one GEMM, ``O(L² m n)``.
        """
        L, m = U.shape[1:]
        A, r, Ub, Wb = self.A[b], self.r[b], U[b], W[b]
        UW = (Ub[:, :, None] * Wb[:, None, :]).reshape(L, -1)
        return ((r @ UW).reshape(L, m, -1) - (A @ Ub)[:, :, None] * (r @ Wb)[:, None, :]
                - (r @ Ub)[:, :, None] * (A @ Wb)[:, None, :])


def _gram_weighted(x: Tensor, P: Tensor, F: Tensor, units: list[tuple[int, int, int, int]]
                   ) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(Σ_ij w_ij ⟨P_i,P_j⟩, Σ_ij w_ij ⟨P_i,F_j⟩, Σ_ij w_ij ⟨F_i,F_j⟩)`` for symmetric ``w = (x_iᵀx_j)²`` over the
    pair units of :func:`gram_units`.

    ``x`` ``(N, d)``; ``P``, ``F`` are ``(N, p)`` packed rows. A unit ``(i0, i1, j0, j1)`` costs
    ``|I||J|(d + 4p)`` multiply–adds (one shard, chunk ``n``: ``≈ N²(d + 4p)/2 · (1 + n/N)`` in all).
    """
    zero = P.new_zeros(())
    oo, of, ff = zero, zero, zero
    for i0, i1, j0, j1 in units:
        W = (x[i0:i1] @ x[j0:j1].T) ** 2  # (|I|, |J|)
        once = max(0, min(j1, i1) - j0)  # the columns of the diagonal block count once, the others twice
        W = torch.cat([W[:, :once], 2.0 * W[:, once:]], dim=1)
        PI, FI, PJ, FJ = P[i0:i1], F[i0:i1], P[j0:j1], F[j0:j1]
        oo = oo + (W * (PI @ PJ.T)).sum()
        ff = ff + (W * (FI @ FJ.T)).sum()
        of = of + 0.5 * (W * (PI @ FJ.T + FI @ PJ.T)).sum()  # w symmetric: the pair (i, j) and (j, i)
    return oo, of, ff


def _qq(h: _Head, chunk: int, red: RowShards) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(‖H_o‖², ⟨H_o,H_f⟩, ‖H_f‖²)`` of ``(Q, Q)`` by the Gram route: ``Σ_ij (x_iᵀx_j)² ⟨P_i, P'_j⟩`` with
    ``P^o_i = 2cκ² E_iE_iᵀ``, ``P^f_i = κ² KᵀC_iK`` (module docstring). Cost ``O(B L² k(r + k) + N²(d + p))``.

    Sharded: the rows ``[x_i | vech P^o_i | vech P^f_i]`` of all ranks are gathered (``N(d + 2p)`` numbers), each
    rank sums its share of the pairs (:func:`gram_units`) and the three scalars are summed over the ranks.
    """
    k2 = h.kappa**2
    k = h.K.shape[-1]
    Po, Pf = [h.x.new_zeros(0, k * (k + 1) // 2)], [h.x.new_zeros(0, k * (k + 1) // 2)]
    for b in range(h.A.shape[0]):
        E = h.jacobian_factor(h.K, b)  # (L, k, r)
        Po.append(vech((2.0 * h.c * k2) * E @ E.transpose(1, 2)))
        Pf.append(vech(k2 * h.curvature_factor(h.K, h.K, b)))
    d, p = h.x.shape[1], Po[0].shape[1]
    rows = red.gather(torch.cat([h.x, torch.cat(Po), torch.cat(Pf)], dim=1))  # (N, d + 2p), all ranks' rows
    x, P, F = rows[:, :d], rows[:, d : d + p], rows[:, d + p :]
    oo, of, ff = _gram_weighted(x, P, F, gram_units(rows.shape[0], chunk, red.rank, red.world_size))
    oo, of, ff = red.sum(torch.stack([oo, of, ff])).unbind()
    return oo, of, ff


def _kk(h: _Head, chunk: int, tile: int, red: RowShards) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(‖H_o‖², ⟨H_o,H_f⟩, ‖H_f‖²)`` of ``(K, K)`` by the primal route, tile by tile of ``R_i``.

    .. math::
        \|H\|^2 = \sum_{I\le J} w_{IJ} \Big\|\sum_i \mathrm{vec}(R_i[I,J])\,\mathrm{vech}(q_iq_i^\top)^\top\Big\|^2,
        \quad w_{II} = 1,\ w_{IJ} = 2\ (I<J)

    (diagonal tiles packed by :func:`vech`) with ``R^o_i[I,J] = 2cκ² D_i[I] D_i[J]ᵀ`` and
    ``R^f_i[I,J] = κ² X[:,I]ᵀ C_i X[:,J]``, two GEMMs per tile and sequence group (``≥ 1`` sequence, about
    ``chunk`` rows). Cost ``≈ N d²/2 (2p + L + r)``
    multiply–adds, memory ``O(N d r + chunk·tile² + tile² p)``. Sharded: each tile ``[M^o | M^f]`` (a sum over
    rows) is summed over the ranks before its squared norm (one all-reduce of ``2|tile| p`` numbers per tile).
    """
    X = h.X
    B, L, d = X.shape
    r_dim = h.Vt.shape[-1]
    D = torch.cat([X.new_zeros(0, d, r_dim), *[h.jacobian_factor(X, b) for b in range(B)]])  # D_i = Xᵀ J_i Ṽ
    S = vech(h.q[:, :, None] * h.q[:, None, :])  # (N, p)
    mu, rho = h.A @ X, h.r @ X  # Xᵀa_i, Xᵀr_i: (B, L, d)
    co, cf = 2.0 * h.c * h.kappa**2, h.kappa**2
    group = max(1, chunk // L)
    zero = X.new_zeros(())
    oo, of, ff = zero, zero, zero
    for I0 in range(0, d, tile):
        I = slice(I0, min(d, I0 + tile))
        for J0 in range(I0, d, tile):
            J = slice(J0, min(d, J0 + tile))
            w = 1.0 if I0 == J0 else 2.0
            tI, tJ = I.stop - I.start, J.stop - J.start
            M = X.new_zeros(2, tI * (tI + 1) // 2 if I0 == J0 else tI * tJ, S.shape[1])  # [M^o, M^f]
            for b0 in range(0, B, group):
                bs = slice(b0, min(B, b0 + group))
                rows = slice(b0 * L, bs.stop * L)
                n = rows.stop - rows.start
                Ro = co * D[rows, I] @ D[rows, J].transpose(1, 2)  # (n, tI, tJ)
                XX = X[bs, :, I, None] * X[bs, :, None, J]  # (g, L, tI, tJ)
                Rf = h.r[bs] @ XX.flatten(2) - (mu[bs, :, I, None] * rho[bs, :, None, J]
                                                + rho[bs, :, I, None] * mu[bs, :, None, J]).flatten(2)
                Rf = cf * Rf.reshape(Ro.shape)
                if I0 == J0:  # a diagonal tile is symmetric: pack it (⟨vech A, vech B⟩ = ⟨A, B⟩)
                    Ro, Rf = vech(Ro), vech(Rf)
                M = M + torch.stack([Ro.reshape(n, -1).T @ S[rows],  # (tI tJ, p): the GEMMs that set the cost
                                     Rf.reshape(n, -1).T @ S[rows]])
            Mo, Mf = red.sum(M).unbind()
            oo = oo + w * (Mo * Mo).sum()
            of = of + w * (Mo * Mf).sum()
            ff = ff + w * (Mf * Mf).sum()
    return oo, of, ff


def _vv(h: _Head, red: RowShards) -> tuple[Tensor, Tensor, Tensor]:
    r"""``‖2c M_1ᵀM_1 ⊗ W_OW_Oᵀ‖² = (2c)² ‖M_1ᵀM_1‖² ‖W_OW_Oᵀ‖²``; ``H_f(V,V) = 0``. Sharded: ``S = M_1ᵀM_1`` (a
    sum over rows) is summed over the ranks.
    """
    M1 = (h.A @ h.X).reshape(-1, h.X.shape[-1])
    S, Om = red.sum(M1.T @ M1), h.W_O @ h.W_O.T
    zero = S.new_zeros(())
    return (2.0 * h.c) ** 2 * (S * S).sum() * (Om * Om).sum(), zero, zero


def _oo(h: _Head, red: RowShards) -> tuple[Tensor, Tensor, Tensor]:
    r"""``‖2c W_VᵀM_1ᵀM_1W_V ⊗ I_{d_out}‖² = (2c)² d_out ‖W_VᵀM_1ᵀM_1W_V‖²``; ``H_f(O,O) = 0``. Sharded: ``S`` is
    summed over the ranks.
    """
    MV = (h.A @ (h.X @ h.W_V)).reshape(-1, h.W_V.shape[1])
    S = red.sum(MV.T @ MV)
    zero = S.new_zeros(())
    return (2.0 * h.c) ** 2 * h.W_O.shape[1] * (S * S).sum(), zero, zero


def head_inner_products(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor, G: Tensor, *, c: float, kappa: float,
    causal: bool, blocks: Sequence[str] = HEAD_BLOCKS, chunk: int = 2048, tile: int = 64,
    row_shards: RowShards | None = None,
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    r"""``{block: (‖H_o‖², ⟨H_o, H_f⟩, ‖H_f‖²)}`` as 0-dim tensors (pure; module docstring, MATH §5.4).

    Args:
        X: ``(B, L, d)``.
        W_Q: ``(d, k)``.
        W_K: ``(d, k)``.
        W_V: ``(d, d_v)``.
        W_O: ``(d_v, d_out)``.
        G: the whole layer's residual ``2c(F − Y)``, ``(B, L, d_out)``.
        c: the loss constant ``c_eff``.
        kappa: the score scale ``κ``.
        causal: causal mask.
        blocks: names from :data:`HEAD_BLOCKS`.
        chunk: rows per step (Gram row chunk; sequence group of the primal route).
        tile: tile side of ``R_i`` in the primal route.
        row_shards: how rows combine over data shards (:class:`RowShards`; default one process). ``X`` and ``G``
            are then this rank's rows, and every rank gets the norms of the union of the rows (MATH §6.2).
    """
    red = RowShards() if row_shards is None else row_shards
    h = _Head(X, W_Q, W_K, W_V, W_O, G.reshape(X.shape[0], X.shape[1], W_O.shape[1]), c, kappa, causal)
    compute = {"QQ": lambda: _qq(h, chunk, red), "KK": lambda: _kk(h, chunk, tile, red), "VV": lambda: _vv(h, red),
               "OO": lambda: _oo(h, red)}
    return {name: compute[name]() for name in blocks}


def head_block_norms(
    X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor, G: Tensor, *, c: float,
    scale: float | None = None, causal: bool = False, blocks: Sequence[str] = HEAD_BLOCKS, chunk: int = 2048,
    tile: int = 64, squared: bool = False, distributed: bool | ShardGroup = False,
) -> dict[tuple[str, str], float]:
    r"""Exact Frobenius norms of one head's diagonal Hessian blocks in a multi-head layer (MATH §5.1, §5.4).

    .. math::
        H = 2c\,J_h^\top J_h + \langle G, \nabla^2_{\theta_h} F_h\rangle,\qquad
        \Big\|\sum_i A_i\otimes B_i\Big\|_F^2 = \sum_{ij}\langle A_i,A_j\rangle\langle B_i,B_j\rangle
        = \Big\|\sum_i \mathrm{vec}A_i\,\mathrm{vec}B_i^\top\Big\|_F^2

    Args:
        X: tokens ``(L, d)`` or ``(B, L, d)``.
        W_Q: ``(d, k)``.
        W_K: ``(d, k)``.
        W_V: ``(d, d_v)``.
        W_O: ``(d_v, d_out)``, the head's rows of the output projection.
        G: the residual of the whole layer, ``2c(F − Y)`` with ``F = Σ_h F_h``, shaped as ``X`` with ``d_out``
            features.
        c: the loss constant of ``ℓ = c Σ_b ‖F_b − Y_b‖²`` (> 0).
        scale: score scale ``κ`` (default ``1/√k``).
        causal: causal mask.
        blocks: any of ``"QQ"``, ``"KK"``, ``"VV"``, ``"OO"`` (the off-diagonal blocks of a single head are in
            :func:`energy.hessian.structure.block_norms`).
        chunk: rows per step (memory ``O(chunk · N)`` for ``(Q,Q)``, ``O(chunk · tile²)`` for ``(K,K)``).
        tile: tile side of the ``(K,K)`` primal route.
        squared: return squared norms.
        distributed: ``True`` (the default process group) or a :class:`~energy.hessian.distributed.ShardGroup`:
            ``X`` and ``G`` are this rank's sequences (its own rows of ``G``; any number, none included, and ``L``
            may differ between ranks), everything else is the same on every rank — ``c`` included, the constant of
            the loss of the *union* of the sequences (a mean over all sequences divides by the global count,
            e.g. ``ShardGroup.total(B_r)``). Every rank returns the norms of the union (MATH §6.2); the inputs are
            checked on every rank first and any rank's error stops all of them.

    Returns:
        ``{(block, part): value}`` with parts ``"H"``, ``"H_o"``, ``"H_f"`` (norms, squared with ``squared``) and
        ``"cross"`` = ``⟨H_o, H_f⟩_F``.

    Cost (``N = B L``, ``p = k(k+1)/2``, ``r = min(d_v, d_out)``): ``(Q,Q)`` ``O(B L² k (r + k) + N² (d + p))``,
    ``(K,K)`` ``Θ(N d² (p + L))``, ``(V,V)``, ``(O,O)`` ``O(N d² + d³)``; see the module docstring.
    """
    shards = resolve_shards(distributed)

    def checked(X: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor, G: Tensor, chunk: int, tile: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float, float, list[str], int, int]:
        X = check_tensor(X, "X", min_ndim=2)
        if X.ndim not in (2, 3):
            raise EnergyInputError(f"`X` must be (L, d) or (B, L, d), got shape {tuple(X.shape)}.")
        d = X.shape[-1]
        W_Q = check_tensor(W_Q, "W_Q", ndim=2, trailing=(d, None))
        k = W_Q.shape[1]
        W_K = check_tensor(W_K, "W_K", ndim=2, trailing=(d, k))
        W_V = check_tensor(W_V, "W_V", ndim=2, trailing=(d, None))
        W_O = check_tensor(W_O, "W_O", ndim=2, trailing=(W_V.shape[1], None))
        G = check_tensor(G, "G", ndim=X.ndim, trailing=(*X.shape[:-1], W_O.shape[1]))
        check_same_float_dtype(X=X, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, G=G)
        check_same_device(X=X, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, G=G)
        c_val = check_real(c, "c", positive=True, what="(the loss constant of ℓ = c Σ‖F − Y‖²)")
        sc = check_scale(scale)
        if isinstance(sc, Tensor):
            raise EnergyInputError("`scale` must be a Python number here (the norms are returned as floats).")
        if not isinstance(causal, bool):
            raise EnergyInputError(f"`causal` must be True or False, got {causal!r}.")
        if isinstance(blocks, str) or not all(isinstance(b, str) for b in blocks):
            raise EnergyInputError(f"`blocks` must be a sequence of block names such as ('QQ', 'KK'), got "
                                   f"{blocks!r}.")
        names = [b if b in HEAD_BLOCKS else b[::-1] for b in blocks]
        bad = [b for b in names if b not in HEAD_BLOCKS]
        if bad:
            raise EnergyInputError(f"`blocks` must be among {HEAD_BLOCKS}, got {bad}; for the off-diagonal blocks of "
                                   "one head use energy.hessian.structure.block_norms.")
        chunk = check_positive_int(chunk, "chunk", what="(rows per step)")
        tile = check_positive_int(tile, "tile", what="(tile side of the (K,K) primal route)")
        X3, G3 = (X[None], G[None]) if X.ndim == 2 else (X, G)
        kappa = float(core_attention.kappa(sc, k))
        return X3, W_Q, W_K, W_V, W_O, G3, c_val, kappa, names, chunk, tile

    if shards is None:
        X3, W_Q, W_K, W_V, W_O, G3, c_val, kappa, names, chunk, tile = checked(X, W_Q, W_K, W_V, W_O, G, chunk, tile)
        red = RowShards()
    else:
        X3, W_Q, W_K, W_V, W_O, G3, c_val, kappa, names, chunk, tile = shards.run(
            lambda: checked(X, W_Q, W_K, W_V, W_O, G, chunk, tile), "checking each rank's head and sequences")
        shards.check_same((W_Q.shape, W_V.shape, W_O.shape, str(X3.dtype), c_val, kappa, causal, names, chunk, tile,
                           squared, tensor_checksum(W_Q, W_K, W_V, W_O)),
                          "the head's weights and the settings (shapes, dtype, c, scale, causal, blocks, chunk, tile)")
        if shards.total(X3.shape[0] * X3.shape[1], "the number of rows") == 0:
            raise EnergyInputError("`X` holds no tokens on any rank; give at least one rank a sequence.")
        red = RowShards.of(shards)
    ips = head_inner_products(X3, W_Q, W_K, W_V, W_O, G3, c=c_val, kappa=kappa, causal=causal, blocks=names,
                              chunk=chunk, tile=tile, row_shards=red)
    out: dict[tuple[str, str], float] = {}
    for name, (oo, of, ff) in ips.items():
        for part, value in _parts({"oo": float(oo), "of": float(of), "ff": float(ff)}, squared).items():
            out[(name, part)] = value
    return out
