r"""Dense blocks and the assembled dense Hessian of one attention layer from shared per-row factors (MATH §3.4–§3.5).

The factors (``R_i``, ``P_i``, ``U_i``, ``E_i``, ...) and the row-strip GEMMs are described in
:mod:`energy.hessian.attention`. Everything here is pure (no validation beyond the part name and the memory
budget, no reads of tensor values): results are written into buffers allocated from the moments' own tensors, so
``torch.func`` transforms (``vmap`` included) pass through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from energy._validation import EnergyInputError, check_tensor
from energy.hessian.attention_layer import check_dense_budget
from energy.hessian.moments import AttentionMoments, attention_moments

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
    * per value-side weight ``w ∈ {V, O}``: ``E^w_i[n,m,a] = 2cκ α_i[n] B̃_i[m,a] + κ S̃_i[n,a] γ_i[m]``
      (module docstring) and ``E^w_i W_K``, stored as ``(a, i, n, m)`` and ``(i, b, n, m)`` (see :meth:`_E`);
    * ``S = 2c M_1ᵀ M_1`` (``0`` for ``H_f``), ``Ω_O = W_O W_Oᵀ`` and the bilinear ``G_QK`` (``0`` for ``H_o``);
    * with ``W_O``: ``S_O = 2c W_VᵀM_1ᵀM_1W_V``, ``P_VO = 2c M_1ᵀ M_1 W_V`` (``H_o``), ``Q_VO = M_1ᵀ G`` (``H_f``).
    """

    def __init__(self, mom: AttentionMoments, part: Part) -> None:
        _check_part(part)
        self.mom, self.part = mom, part
        self._cache: dict[str, Tensor] = {}
        x = mom.x
        self.eye_d = torch.eye(mom.d_V, dtype=x.dtype, device=x.device)
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

    def _E(self, w: str, right: Tensor | None = None) -> Tensor:
        """``E^w`` laid out ``(a, i, n, m)``, or with ``right`` ``E^w · right`` laid out ``(i, b, n, m)``.

        ``E_i[n,m,a] = 2cκ α_i[n] B̃_i[m,a] + κ S̃_i[n,a] γ_i[m]``, written directly in the layout the row-strip
        GEMMs of :func:`_write_rows` read, with one pass per half.
        """
        mom = self.mom
        alpha, Bt, St, gamma = self.value_side(w)
        if right is None:  # (a, i, n, m)
            o1, o2 = alpha[None, :, :, None], Bt.permute(2, 0, 1)[:, :, None, :]
            f1, f2 = St.permute(2, 0, 1)[:, :, :, None], gamma[None, :, None, :]
        else:  # (i, b, n, m) with B̃_i right, S̃_i right
            Bt, St = Bt @ right, St @ right
            o1, o2 = alpha[:, None, :, None], Bt.permute(0, 2, 1)[:, :, None, :]
            f1, f2 = St.permute(0, 2, 1)[:, :, :, None], gamma[:, None, None, :]
        return self._combine(lambda: (o1 * o2) * (2.0 * mom.c * mom.kappa), lambda: mom.kappa * (f1 * f2))

    def _make_E(self) -> Tensor:
        return self._E("V")

    def _make_EW(self) -> Tensor:
        return self._E("V", self.mom.W_K)

    def _make_EO(self) -> Tensor:
        return self._E("O")

    def _make_EOW(self) -> Tensor:
        return self._E("O", self.mom.W_K)

    def _make_S(self) -> Tensor:
        scale = 2.0 * self.mom.c if self.use_o else 0.0
        return scale * self.mom.M_1.T @ self.mom.M_1

    def _make_Omega_O(self) -> Tensor:
        return self.eye_d if self.mom.W_O is None else self.mom.W_O @ self.mom.W_O.T

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
        """The factor ``name`` (``R``, ``P``, ``U``, ``E``, ``EW``, ``S``, ``G``, ``EO``, ``EOW``, ``Omega_O``,
        ``S_O``, ``P_VO``, ``Q_VO``), built by ``_make_<name>`` on first use and cached.
        """
        if name.startswith("_") or not hasattr(type(self), "_make_" + name):
            raise AttributeError(name)
        return self._get(name)


def _row_factor(f: _Factors, a: str, b: str) -> Tensor:
    """The row factor of block ``(a, b)``, ``a ∈ {Q, K}``.

    Query rows: ``H(Q, b)[(a', b'), col] = Σ_i x_i[a'] F_i[b', col]``, the factor is ``F`` ``(N, d_K, size_b)``.
    Key rows: ``H(K, b)[(a', b'), col] = Σ_i q_i[b'] G_i[a', col]``, the factor is ``G`` ``(d_V, N, size_b)``.
    The factors are those of :func:`hessian_block` (``P_i``, ``U_i``, ``R_i``, ``E_i``, ``E_i W_K``).
    """
    mom = f.mom
    x, q = mom.x, mom.q
    if (a, b) == ("Q", "Q"):  # x_ic P_i[b', d']
        out4 = x[:, None, :, None] * f.P[:, :, None, :]
    elif (a, b) == ("Q", "K"):  # U_i[b', c] q_id'  (the bilinear term is added by the caller)
        out4 = f.U[:, :, :, None] * q[:, None, None, :]
    elif (a, b) == ("K", "Q"):  # x_ic U_i[d', a']
        out4 = x[None, :, :, None] * f.U.permute(2, 0, 1)[:, :, None, :]
    elif (a, b) == ("K", "K"):  # R_i[a', c] q_id'
        out4 = f.R.permute(1, 0, 2)[..., None] * q[None, :, None, :]
    elif a == "Q":  # (E_i W_K)[n, m, b'] (value side V or O)
        out4 = f.EW if b == "V" else f.EOW
    else:  # E_i[n, m, a']
        out4 = f.E if b == "V" else f.EO
    return out4.reshape(*out4.shape[:2], -1)


def _block_gemm(f: _Factors, a: str, b: str, *, transposed: bool = False) -> Tensor:
    """The block ``(a, b)``, ``a ∈ {Q, K}``, without the bilinear term: one GEMM with inner dimension ``N`` (the
    stacked query rows), ``Xᵀ F`` for query rows and a batched ``q``-GEMM over ``a'`` for key rows
    (:func:`_row_factor`). With ``transposed`` the block ``(b, a)`` is returned, computed by a batched GEMM over
    the columns of ``b`` whose output is already laid out row by row (no strided transpose of a large block).
    """
    mom = f.mom
    N, d, k = mom.x.shape[0], mom.d_V, mom.d_K
    F = _row_factor(f, a, b)
    if not transposed:
        if a == "Q":
            return (mom.x.T @ F.reshape(N, -1)).reshape(d * k, -1)
        return torch.bmm(mom.q.T.expand(d, k, N), F).reshape(d * k, -1)
    if a == "Q":  # (b-col, c, a') = Σ_i F[i, a', col] x[i, c]
        out = torch.matmul(mom.x.T, F.permute(2, 0, 1))
    else:  # (b-col, a', b') = Σ_i F[a', i, col] q[i, b']
        out = torch.matmul(F.permute(2, 0, 1), mom.q)
    return out.reshape(out.shape[0], d * k)


def _bilinear(f: _Factors, a: str, b: str) -> Tensor | None:
    """The bilinear term ``G_QK ⊗ I`` (``H_f``) of block ``(Q, K)`` (transposed for ``(K, Q)``), else ``None``:
    entries ``[(c, j), (a', j)] = G_QK[c, a']``.
    """
    if not f.use_f or {a, b} != {"Q", "K"}:
        return None
    d, k = f.mom.d_V, f.mom.d_K
    G = f.G if a == "Q" else f.G.T
    return (G[:, None, :, None] * f.eye_k[None, :, None, :]).reshape(d * k, d * k)


def _value_block(f: _Factors, a: str, b: str) -> Tensor:
    """A block between value-side weights (``V``, ``O``), dense ``(size_a, size_b)``."""
    mom = f.mom
    sizes = mom.sizes
    if (a, b) == ("V", "V"):  # S ⊗ Ω_O
        out = f.S[:, None, :, None] * f.Omega_O[None, :, None, :]
    elif (a, b) == ("O", "O"):  # S_O ⊗ I
        out = f.S_O[:, None, :, None] * f.eye_o[None, :, None, :]
    elif (a, b) == ("V", "O"):  # 2c (M_1ᵀM_1W_V)[n,p] W_O[m,o] + (M_1ᵀG)[n,o] δ_mp
        assert mom.W_O is not None
        delta = f.Q_VO[:, None, None, :] * f.eye_d[None, :, :, None]
        out = f.P_VO[:, None, :, None] * mom.W_O[None, :, None, :] + delta
    else:  # ("O", "V")
        return _value_block(f, "V", "O").T
    return out.reshape(sizes[a], sizes[b])


def bilinear_term(mom: AttentionMoments) -> Tensor:
    r"""The bilinear (query–key) term of ``H_f(Q, K)``: ``G_QK ⊗ I_{d_K}`` (MATH §3.5), dense ``(d_V d_K)²``.

    It exists only because ``T`` is bilinear in ``(W_Q, W_K)``.
    """
    return torch.kron(mom.G_QK, torch.eye(mom.d_K, dtype=mom.x.dtype, device=mom.x.device))


def _block(f: _Factors, a: str, b: str) -> Tensor:
    if a in "VO" and b in "QK":  # value-side rows: transpose of the query/key row block
        return _block(f, b, a).T
    if a in "VO":
        return _value_block(f, a, b)
    out, bil = _block_gemm(f, a, b), _bilinear(f, a, b)
    return out if bil is None else out + bil


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
    _check_part(part)
    if a not in mom.params or b not in mom.params:
        raise EnergyInputError(f"block names must be among {mom.params}, got ({a!r}, {b!r}).")
    check_dense_budget(mom.sizes[a], mom.sizes[b], mom.x.dtype, max_gib, f"the dense block {part}({a}, {b})")
    return _block(_Factors(mom, part), a, b)


def hessian_blocks(
    mom: AttentionMoments, part: Part = "H", *, max_gib: float | None = None
) -> dict[tuple[str, str], Tensor]:
    """All blocks ``{(a, b): part(a, b)}`` (nine, or sixteen with ``W_O``; factors shared, lower blocks as views).

    ``max_gib`` bounds the memory of the distinct blocks together (default 4 GiB, :class:`DenseSizeError`).
    """
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

    Every query/key block is one GEMM (:func:`_block_gemm`); the value-side rows are the transposes of their
    query/key columns plus the small value–value blocks. Memory: the ``p × p`` result, one block factor of
    ``N d_K size_b`` numbers and ``O(N d_V³)`` value-side factors. Pure (no value reads; slice writes into a
    buffer batched like the inputs): every ``torch.func`` transform applies.

    Args:
        mom: from :func:`attention_moments`.
        part: ``"H"``, ``"H_o"`` (Gauss–Newton) or ``"H_f"`` (functional part).
        max_gib: memory budget of the dense result (default 4 GiB). Above it a :class:`DenseSizeError`
            states the size and points to ``energy.hessian.structure`` / the matrix-free operators.
    """
    _check_part(part)
    sizes = mom.sizes
    p = sum(sizes.values())
    check_dense_budget(p, p, mom.x.dtype, max_gib, f"the dense {part} of the attention layer")
    f = _Factors(mom, part)
    span, start = {}, 0
    for name in mom.params:
        span[name], start = slice(start, start + sizes[name]), start + sizes[name]
    # The result buffer is allocated from the moments (``G`` depends on X, the weights and Y), so that under
    # ``vmap`` it is batched like every block written into it; slice writes are tracked by every transform.
    H = mom.G.new_empty(p, p)  # every entry is written below
    for a in ("Q", "K"):
        for b in mom.params:
            H[span[a], span[b]] = _block_gemm(f, a, b)
            bil = _bilinear(f, a, b)
            if bil is not None:
                H[span[a], span[b]] += bil
    for a in mom.params[2:]:  # V (and O): transposed query/key columns, then the value-side blocks
        for b in ("Q", "K"):
            H[span[a], span[b]] = _block_gemm(f, b, a, transposed=True)
        for b in mom.params[2:]:
            H[span[a], span[b]] = _value_block(f, a, b)
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


