r"""Dense blocks and the assembled dense Hessian of one attention layer from shared per-row factors (MATH §3.4–§3.5).

The factors (``R_i``, ``P_i``, ``U_i``, ``E_i``, ...) are described in :mod:`energy.hessian.attention`. Each block,
viewed as a 4-tensor over the two weights' indices, is a sum of one or two GEMMs ``Σ_i L_i ⊗ R_i`` of small per-row
factors (inner dimension ``N``, the stacked rows), computed in row chunks that stay in cache and copied permuted
into the result, so no temporary of the block's size exists (:func:`_terms`, :func:`_write_block`).

Everything here is pure (no validation beyond the part name and the memory budget, no reads of tensor values):
results are written into buffers allocated from the moments' own tensors, so ``torch.func`` transforms (``vmap``
included) pass through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from energy._validation import EnergyInputError, check_tensor
from energy.hessian.attention_layer import check_dense_budget
from energy.hessian.moments import AttentionMoments, attention_moments, check_moments

__all__ = [
    "Part",
    "hessian_block",
    "hessian_blocks",
    "attention_hessian",
    "bilinear_term",
    "qk_hessian_blocks",
    "qk_chain_matrix",
]

Part = Literal["H", "H_o", "H_f"]


def _check_part(part: str) -> None:
    if part not in ("H", "H_o", "H_f"):
        raise EnergyInputError(f"`part` must be 'H', 'H_o' or 'H_f', got {part!r}.")


class _Factors:
    r"""Per-row factors shared by the blocks of one ``part`` (computed lazily, each once).

    * ``R_i = κ² (2c B_iᵀ B_i + Ŝ_i)`` (``H_o``: first term, ``H_f``: second), ``(N, d, d)``;
    * ``P_i = W_Kᵀ R_i W_K`` ``(N, k, k)`` and ``U_i = W_Kᵀ R_i`` ``(N, k, d)``;
    * per value-side weight ``w ∈ {V, O}``: the four row factors ``(α_i, B̃_i, S̃_i, γ_i)`` of
      ``E^w_i[n,m,a] = 2cκ α_i[n] B̃_i[m,a] + κ S̃_i[n,a] γ_i[m]`` (:meth:`value_side`; ``E`` is never formed);
    * ``S = 2c M_1ᵀ M_1`` (``0`` for ``H_f``), ``Ω_O = W_O W_Oᵀ`` and the bilinear ``G_QK`` (``0`` for ``H_o``);
    * with ``W_O``: ``S_O = 2c W_VᵀM_1ᵀM_1W_V``, ``P_VO = 2c M_1ᵀ M_1 W_V`` (``H_o``), ``Q_VO = M_1ᵀ G`` (``H_f``).
    """

    def __init__(self, mom: AttentionMoments, part: Part) -> None:
        _check_part(part)
        self.mom, self.part = mom, part
        self._cache: dict[str, Tensor] = {}
        x = mom.x
        self.eye_v = torch.eye(mom.d_v, dtype=x.dtype, device=x.device)
        self.eye_k = torch.eye(mom.d_K, dtype=x.dtype, device=x.device)
        self.eye_o = torch.eye(mom.d_O, dtype=x.dtype, device=x.device)
        self.use_o = part in ("H", "H_o")
        self.use_f = part in ("H", "H_f")

    def _get(self, name: str) -> Tensor:
        if name not in self._cache:
            self._cache[name] = getattr(self, "_make_" + name)()
        return self._cache[name]

    def _make_R(self) -> Tensor:
        mom, k2 = self.mom, self.mom.kappa**2
        return self._combine(lambda: (2.0 * mom.c * k2) * mom.B_V.transpose(-1, -2) @ mom.B_V,
                             lambda: k2 * mom.S_hat)

    def _combine(self, outer: Callable[[], Tensor], functional: Callable[[], Tensor]) -> Tensor:
        """The ``part`` of a factor from its ``H_o`` and ``H_f`` halves (each computed only if needed)."""
        if self.use_o and self.use_f:
            return outer() + functional()
        return outer() if self.use_o else functional()

    def _make_P(self) -> Tensor:
        return self.mom.W_K.T @ self.R @ self.mom.W_K

    def _make_U(self) -> Tensor:
        return self.mom.W_K.T @ self.R

    def value_side(self, w: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(α_i, B̃_i, S̃_i, γ_i)`` of the value-side weight ``w ∈ {"V", "O"}`` (module docstring)."""
        mom = self.mom
        if w == "V":
            if mom.W_O is None:
                return mom.M_1, mom.B_V, mom.Sigma, mom.G
            return mom.M_1, mom.W_O @ mom.B_V, mom.Sigma, mom.G @ mom.W_O.T
        return mom.M_1 @ mom.W_V, mom.B_V, mom.W_V.T @ mom.Sigma, mom.G

    def _make_S(self) -> Tensor:
        scale = 2.0 * self.mom.c if self.use_o else 0.0
        return scale * self.mom.M_1.T @ self.mom.M_1

    def _make_Omega_O(self) -> Tensor:
        return self.eye_v if self.mom.W_O is None else self.mom.W_O @ self.mom.W_O.T

    def _make_S_O(self) -> Tensor:
        return self.mom.W_V.T @ self.S @ self.mom.W_V

    def _make_P_VO(self) -> Tensor:
        return self.S @ self.mom.W_V

    def _make_Q_VO(self) -> Tensor:
        Q = self.mom.M_1.T @ self.mom.G
        return Q if self.use_f else torch.zeros_like(Q)

    def _make_G(self) -> Tensor:
        return torch.zeros_like(self.mom.G_QK) if self.part == "H_o" else self.mom.G_QK

    def __getattr__(self, name: str) -> Tensor:
        """The factor ``name`` (``R``, ``P``, ``U``, ``S``, ``G``, ``Omega_O``, ``S_O``, ``P_VO``, ``Q_VO``), built
        by ``_make_<name>`` on first use and cached.
        """
        if name.startswith("_") or not hasattr(type(self), "_make_" + name):
            raise AttributeError(name)
        return self._get(name)


#: One GEMM term ``(L, R, perm)`` of a block: ``L (n, l1, l2)``, ``R (n, r1, r2)``; the block viewed as a 4-tensor
#: (row weight's two indices, column weight's two indices) is ``(Σ_j L_j ⊗ R_j)[l1, l2, r1, r2]`` permuted by ``perm``.
_Term = tuple[Tensor, Tensor, tuple[int, int, int, int]]
#: A diagonal term ``(dim1, dim2, v)``: ``v`` is added to ``block4.diagonal(dim1, dim2)``.
_Diag = tuple[int, int, Tensor]


def _outer(u: Tensor, v: Tensor, scale: float = 1.0) -> Tensor:
    """Row-wise outer products ``scale · u_i v_iᵀ``, ``(n, size_u, size_v)``."""
    return (scale * u)[:, :, None] * v[:, None, :]


def _value_terms(f: _Factors, a: str, b: str) -> list[_Term]:
    """Terms of a query/key–value block: ``a ∈ {Q, K}`` and ``b ∈ {V, O}`` or the reverse.

    With ``E_i[n,m,a] = 2cκ α_i[n] B̃_i[m,a] + κ S̃_i[n,a] γ_i[m]`` (first half ``H_o``, second ``H_f``):
    ``H(K,w)[(r,s),(n,m)] = Σ_i q_i[s] E_i[n,m,r]``, ``H(Q,w)[(r,s),(n,m)] = Σ_i x_i[r] (E_i W_K)[n,m,s]`` and
    their transposes. Each half is one GEMM of two small row factors, grouped so that the output's last index is
    the block's last index (the permuted write is then contiguous along it).
    """
    mom = f.mom
    w, qk = (b, a) if a in "QK" else (a, b)
    alpha, Bt, St, gamma = f.value_side(w)
    x, q, o, k = mom.x, mom.q, 2.0 * mom.c * mom.kappa, mom.kappa
    if qk == "Q":
        Bt, St = Bt @ mom.W_K, St @ mom.W_K  # (E W_K): B̃W (N, m, s), S̃W (N, n, s)
    half_o: _Term
    half_f: _Term
    if (a, b) == ("Q", w):  # [r,s,n,m]
        half_o = (_outer(x, alpha, o), Bt.transpose(1, 2).contiguous(), (0, 2, 1, 3))
        half_f = (St, _outer(x, gamma, k), (2, 1, 0, 3))
    elif (a, b) == ("K", w):  # [r,s,n,m]
        half_o = (_outer(q, alpha, o), Bt.transpose(1, 2).contiguous(), (2, 0, 1, 3))
        half_f = (St.transpose(1, 2).contiguous(), _outer(q, gamma, k), (0, 2, 1, 3))
    elif b == "Q":  # [n,m,r,s]
        half_o = (_outer(alpha, x, o), Bt, (0, 2, 1, 3))
        half_f = (_outer(gamma, x, k), St, (2, 0, 1, 3))
    else:  # (w, K) [n,m,r,s]
        half_o = (Bt, _outer(alpha, q, o), (2, 0, 1, 3))
        half_f = (St, _outer(gamma, q, k), (0, 2, 1, 3))
    return ([half_o] if f.use_o else []) + ([half_f] if f.use_f else [])


def _terms(f: _Factors, a: str, b: str) -> tuple[list[_Term], list[_Diag]]:
    """The GEMM terms and diagonal terms of block ``(a, b)`` (:data:`_Term`, :data:`_Diag`), MATH §3.4–§3.5.

    ``H(Q,Q) = Σ_i x_i x_iᵀ ⊗ P_i``, ``H(K,K) = Σ_i R_i ⊗ q_i q_iᵀ``, ``H(Q,K)[(r,s),(r',s')] =
    Σ_i x_i[r] U_i[s,r'] q_i[s'] + G_QK[r,r'] δ_ss'`` (its transpose for ``(K, Q)``), value blocks
    (:func:`_value_terms`) and the value–value blocks ``S ⊗ Ω_O``, ``S_O ⊗ I`` and
    ``H(V,O)[(n,m),(p,o)] = P_VO[n,p] W_O[m,o] + Q_VO[n,o] δ_mp``.
    """
    mom = f.mom
    x, q = mom.x, mom.q
    if a in "VO" and b in "VO":
        if (a, b) == ("V", "V"):
            return [(f.S[None], f.Omega_O[None], (0, 2, 1, 3))], []
        if (a, b) == ("O", "O"):
            return [(f.S_O[None], f.eye_o[None], (0, 2, 1, 3))], []
        assert mom.W_O is not None
        assert (a, b) == ("V", "O"), "(O, V) is written as the transpose of (V, O)"  # [n,m,p,o]
        return [(f.P_VO[None], mom.W_O[None], (0, 2, 1, 3))], [(1, 2, f.Q_VO[:, :, None])]
    if a in "VO" or b in "VO":
        return _value_terms(f, a, b), []
    bil = [(1, 3, (f.G if a == "Q" else f.G.T)[:, :, None])] if f.use_f and a != b else []
    if (a, b) == ("Q", "Q"):
        return [(_outer(x, x), f.P, (0, 2, 1, 3))], []
    if (a, b) == ("K", "K"):
        return [(f.R, _outer(q, q), (0, 2, 1, 3))], []
    if (a, b) == ("Q", "K"):
        return [(f.U, _outer(x, q), (2, 0, 1, 3))], bil
    return [(_outer(q, x), f.U.transpose(1, 2).contiguous(), (2, 0, 1, 3))], bil


#: Target size (numbers) of one GEMM output chunk (8 MB in float64): below glibc's 32 MB mmap threshold, so the
#: allocator reuses it without page faults, and few chunks (few multithreaded ops) per block.
_CHUNK = 1 << 20


def _write_block(f: _Factors, a: str, b: str, dest: Tensor, mirror: Tensor | None = None) -> None:
    """Write block ``(a, b)`` into ``dest`` (a view of shape ``(size_a, size_b)``), chunk by chunk of its rows,
    and with ``mirror`` (a view of shape ``(size_b, size_a)``) its transpose ``(b, a)`` as well.

    Per chunk of the first index of ``a``, each term is one GEMM into a small temporary, copied (then added)
    permuted into ``dest``; the finished chunk (still in cache) is copied transposed into ``mirror``. No temporary
    larger than :data:`_CHUNK` numbers is created and every entry of ``dest`` (and ``mirror``) is written. Pure:
    only slice writes into ``dest`` and ``mirror``.
    """
    mom = f.mom
    shape = {"Q": (mom.d_V, mom.d_K), "K": (mom.d_V, mom.d_K), "V": (mom.d_V, mom.d_v), "O": (mom.d_v, mom.d_O)}
    dest4 = dest.view(*shape[a], *shape[b])
    mirror4 = None if mirror is None else mirror.view(*shape[b], *shape[a])
    terms, diags = _terms(f, a, b)
    rows = shape[a][0]
    step = max(1, _CHUNK // (shape[a][1] * shape[b][0] * shape[b][1]))
    # the chunked index is the outer index of one factor (perm[0] ∈ {0, 2}): a column slice of its matrix
    mats = [(L.reshape(L.shape[0], -1), R.reshape(R.shape[0], -1), tuple(L.shape[1:]), tuple(R.shape[1:]), perm)
            for L, R, perm in terms]
    for t0 in range(0, rows, step):
        n = min(step, rows - t0)
        view = dest4.narrow(0, t0, n)
        for j, (L, R, ls, rs, perm) in enumerate(mats):
            if perm[0] == 0:
                L, ls = L[:, t0 * ls[1]:(t0 + n) * ls[1]], (n, ls[1])
            else:
                R, rs = R[:, t0 * rs[1]:(t0 + n) * rs[1]], (n, rs[1])
            out = (L.T @ R).view(*ls, *rs).permute(perm)
            if j == 0:
                view.copy_(out)
            else:
                view.add_(out)
        for d1, d2, v in diags:  # d1, d2 > 0
            view.diagonal(dim1=d1, dim2=d2).add_(v.narrow(0, t0, n))
        if mirror4 is not None:
            mirror4.narrow(2, t0, n).copy_(view.permute(2, 3, 0, 1))


def bilinear_term(mom: AttentionMoments) -> Tensor:
    r"""The bilinear (query–key) term of ``H_f(Q, K)``: ``G_QK ⊗ I_{d_K}`` (MATH §3.5), dense ``(d_V d_K)²``.

    It exists only because ``T`` is bilinear in ``(W_Q, W_K)``.
    """
    return torch.kron(mom.G_QK, torch.eye(mom.d_K, dtype=mom.x.dtype, device=mom.x.device))


def _block(f: _Factors, a: str, b: str) -> Tensor:
    """The dense block ``(a, b)`` in a fresh buffer allocated from the moments (batched like them under ``vmap``)."""
    out = f.mom.G_QK.new_empty(f.mom.sizes[a], f.mom.sizes[b])
    _write_block(f, a, b, out)
    return out


def hessian_block(
    mom: AttentionMoments, a: str, b: str, part: Part = "H", *, max_gib: float | None = None
) -> Tensor:
    r"""One dense block ``part(a, b)`` of the loss Hessian, ``a, b ∈ mom.params`` (MATH §3.4–§3.5).

    .. math::
        H(V,V) &= 2c\,(M_1^\top M_1)\otimes W_O W_O^\top \quad (H_f(V,V) = 0;\ W_O = I\ \text{without projection})\\
        H(Q,Q) &= \textstyle\sum_i x_i x_i^\top \otimes W_K^\top R_i W_K,\qquad
        H(K,K) = \sum_i R_i \otimes q_i q_i^\top\\
        H(Q,K) &= \textstyle\sum_i x_i \otimes W_K^\top R_i \otimes q_i^\top + G_{QK}\otimes I_{d_K}\ (H_f\ only)\\
        H(V,K)[(n,m),(a,b)] &= \textstyle\sum_i E_i[n,m,a]\, q_i[b],\qquad
        H(V,Q)[(n,m),(c,b)] = \sum_i (E_i W_K)[n,m,b]\, x_i[c]

    with ``R_i`` and ``E_i`` as in the module docstring, restricted to the ``H_o`` or ``H_f`` half (blocks with
    ``O``: module docstring). Cost: ``O(N d_V² d_K²)`` for the query/key blocks, ``O(N d_V³ d_K)`` for the
    value–query/key blocks. A lower block is returned as the transpose (a view) of the computed upper one.

    Returns:
        dense ``(size_a, size_b)`` matrix in ``vec_r`` order.
    """
    mom = check_moments(mom, "hessian_block")
    _check_part(part)
    if a not in mom.params or b not in mom.params:
        raise EnergyInputError(f"block names must be among {mom.params}, got ({a!r}, {b!r}).")
    check_dense_budget(mom.sizes[a], mom.sizes[b], mom.x.dtype, max_gib, f"the dense block {part}({a}, {b})")
    f = _Factors(mom, part)
    return _block(f, a, b) if (a, b) in mom.blocks else _block(f, b, a).T


def hessian_blocks(
    mom: AttentionMoments, part: Part = "H", *, max_gib: float | None = None
) -> dict[tuple[str, str], Tensor]:
    """All blocks ``{(a, b): part(a, b)}`` (nine, or sixteen with ``W_O``; factors shared, lower blocks as views).

    ``max_gib`` bounds the memory of the distinct blocks together (default 4 GiB, :class:`DenseSizeError`).
    """
    mom = check_moments(mom, "hessian_blocks")
    _check_part(part)
    total = sum(mom.sizes[a] * mom.sizes[b] for a, b in mom.blocks)
    check_dense_budget(total, 1, mom.x.dtype, max_gib, f"the distinct dense blocks of {part}")
    f = _Factors(mom, part)
    out = {ab: _block(f, *ab) for ab in mom.blocks}
    for a, b in mom.blocks:
        out[(b, a)] = out[(a, b)].T
    return out


def attention_hessian(mom: AttentionMoments, part: Part = "H", *, max_gib: float | None = None) -> Tensor:
    """The assembled dense ``part`` of the loss Hessian, parameters ordered ``(Q, K, V[, O])`` (MATH §3).

    Every upper block is written straight into the result in row chunks by GEMMs of small per-row factors, and
    each finished chunk, still in cache, is copied transposed into the lower block (:func:`_write_block`; no
    factor or temporary of the block's size). Memory: the
    ``p × p`` result, chunk temporaries of at most :data:`_CHUNK` numbers and ``O(N d_V²)`` factors. Pure (no
    value reads; slice writes into a buffer batched like the inputs): every ``torch.func`` transform applies.

    Args:
        mom: from :func:`attention_moments`.
        part: ``"H"``, ``"H_o"`` (Gauss–Newton) or ``"H_f"`` (functional part).
        max_gib: memory budget of the dense result (default 4 GiB). Above it a :class:`DenseSizeError`
            states the size and points to ``energy.hessian.structure`` / the matrix-free operators.
    """
    mom = check_moments(mom, "attention_hessian")
    _check_part(part)
    sizes = mom.sizes
    p = sum(sizes.values())
    check_dense_budget(p, p, mom.x.dtype, max_gib, f"the dense {part} of the attention layer")
    f = _Factors(mom, part)
    span, start = {}, 0
    for name in mom.params:
        span[name], start = slice(start, start + sizes[name]), start + sizes[name]
    # The result buffer is allocated from the moments (``G_QK`` depends on X, the weights and G), so that under
    # ``vmap`` it is batched like every block written into it; slice writes are tracked by every transform.
    H = mom.G_QK.new_empty(p, p)  # every entry is written below
    for i, a in enumerate(mom.params):  # upper blocks, each with its transpose
        for b in mom.params[i:]:
            _write_block(f, a, b, H[span[a], span[b]], None if a == b else H[span[b], span[a]])
    return H


# ----------------------------------------------------------------------------------------------------------------
# single-matrix W_QK parametrisation
# ----------------------------------------------------------------------------------------------------------------


def qk_hessian_blocks(
    X: Tensor,
    W_QK: Tensor,
    W_V: Tensor,
    Y: Tensor,
    *,
    scale: float | None = None,
    part: Part = "H",
    **kwargs: Any,
) -> dict[tuple[str, str], Tensor]:
    r"""Blocks of the Hessian w.r.t. ``(W_QK, W_V)`` for ``F = softmax(κ X W_QK Xᵀ) X W_V`` (MATH §3.5).

    .. math::
        H_o(QK,QK) = 2c\kappa^2 \textstyle\sum_i x_i x_i^\top \otimes \Sigma_i W_V W_V^\top \Sigma_i,\qquad
        H_f(QK,QK) = \kappa^2 \textstyle\sum_i x_i x_i^\top \otimes \hat S_i

    This is the two-matrix layer at ``W_Q = W_QK``, ``W_K = I``: its ``(Q, ·)`` blocks are the ``W_QK`` blocks.
    ``scale`` defaults to ``1/√d_V`` (the query–key width of ``W_QK`` is ``d_V``). Further keyword arguments
    (``c``, ``reduction``, ``mask``, ``causal``, ``linear``) as in :func:`attention_moments`.

    Returns:
        ``{("QK","QK"), ("QK","V"), ("V","QK"), ("V","V")}`` → dense blocks.
    """
    check_tensor(W_QK, "W_QK", ndim=2)
    if W_QK.shape[0] != W_QK.shape[1]:
        raise EnergyInputError(f"`W_QK` must be square (d_V × d_V), got {tuple(W_QK.shape)}.")
    eye = torch.eye(W_QK.shape[0], dtype=W_QK.dtype, device=W_QK.device)
    kappa = 1.0 / math.sqrt(W_QK.shape[0]) if scale is None else scale
    mom = attention_moments(X, W_QK, eye, W_V, Y, scale=kappa, **kwargs)
    H_qq = hessian_block(mom, "Q", "Q", part)
    H_vq = hessian_block(mom, "V", "Q", part)
    return {("QK", "QK"): H_qq, ("V", "QK"): H_vq, ("QK", "V"): H_vq.T, ("V", "V"): hessian_block(mom, "V", "V", part)}


def qk_chain_matrix(W_Q: Tensor, W_K: Tensor) -> Tensor:
    r"""``𝒥 = [I ⊗ W_K | (W_Q ⊗ I) P_{d_V,d_K}]``: ``d vec_r(W_Q W_Kᵀ) = 𝒥 [d vec_r W_Q; d vec_r W_K]`` (MATH §3.5).

    The two-matrix query/key blocks are ``𝒥ᵀ H_{QK} 𝒥`` plus the bilinear term ``G_QK ⊗ I`` in the (Q, K) block.
    """
    d, k = W_Q.shape
    eye_d = torch.eye(d, dtype=W_Q.dtype, device=W_Q.device)
    # P_{d,k} vec_r(B) = vec_r(Bᵀ) for B (d × k): permutation of the identity
    P = torch.eye(d * k, dtype=W_Q.dtype, device=W_Q.device).reshape(d, k, d * k).transpose(0, 1).reshape(d * k, d * k)
    return torch.cat([torch.kron(eye_d, W_K), torch.kron(W_Q, eye_d) @ P], dim=1)


