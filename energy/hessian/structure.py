r"""Exact Frobenius norms, traces and diagonals of the attention Hessian blocks, never materialised (MATH §3.4–§3.5).

Every block of :mod:`energy.hessian.attention` is a sum over the ``N = B·L`` query rows ``i`` of Kronecker
products of small per-row factors. Inner products of such sums reduce to Gram matrices over rows:

.. math::
    \Big\|\sum_i A_i \otimes B_i\Big\|_F^2 = \sum_{i,j} \langle A_i, A_j\rangle\,\langle B_i, B_j\rangle,\qquad
    \mathrm{tr}\sum_i A_i \otimes B_i = \sum_i \mathrm{tr}A_i\,\mathrm{tr}B_i,\qquad
    \mathrm{diag}\sum_i A_i\otimes B_i = \sum_i \mathrm{diag}A_i \otimes \mathrm{diag}B_i .

With the factors of :class:`energy.hessian.attention._Factors` (``R_i``, ``E_i``; Gram matrices
``K^x_{ij} = x_iᵀx_j``, ``K^q_{ij} = q_iᵀq_j``, ``K^μ_{ij} = μ_iᵀμ_j``, ``K^g_{ij} = g_iᵀg_j``, ``Ω = W_K W_Kᵀ``):

* ``(Q,Q)``: ``⟨Σ x_ix_iᵀ⊗P_i, Σ x_jx_jᵀ⊗P'_j⟩ = Σ_ij (K^x_ij)² ⟨P_i, P'_j⟩``, ``P_i = W_KᵀR_iW_K``;
* ``(K,K)``: ``Σ_ij (K^q_ij)² ⟨R_i, R'_j⟩``;
* ``(Q,K)``: ``Σ_ij K^x_ij K^q_ij ⟨U_i, U'_j⟩`` (``U_i = W_KᵀR_i``), plus for ``H_f`` the bilinear term
  ``G_QK ⊗ I``: ``⟨Σ x_i⊗U_i⊗q_iᵀ, G_QK⊗I⟩ = Σ_i q_iᵀ U_i G_QKᵀ x_i`` and ``‖G_QK⊗I‖² = d_K ‖G_QK‖²``;
* ``(V,V)``: ``H_o = S ⊗ Ω_O`` (``S = 2c M_1ᵀM_1``, ``Ω_O = W_O W_Oᵀ`` or ``I``), ``‖·‖² = ‖S‖² ‖Ω_O‖²``;
  ``H_f(V,V) = 0``;
* ``(V,K)``: ``Σ_ij K^q_ij ⟨E_i, E'_j⟩`` and ``(V,Q)``: ``Σ_ij K^x_ij ⟨E_iΩ, E'_j⟩`` with the value-side factors
  ``(α_i, B̃_i, S̃_i, γ_i)`` of :mod:`energy.hessian.attention` (``(μ_i, B_i, Σ_i, g_i)`` without ``W_O``):
  ``⟨E^o_iΩ, E^o_j⟩ = (2cκ)² (α_iᵀα_j) ⟨B̃_iΩ, B̃_j⟩``, ``⟨E^f_iΩ, E^f_j⟩ = κ² (γ_iᵀγ_j) ⟨S̃_iΩ, S̃_j⟩``,
  ``⟨E^o_iΩ, E^f_j⟩ = 2cκ² α_iᵀ S̃_j Ω B̃_iᵀ γ_j`` (``Ω = I`` for ``(V,K)``); ``(O,Q)``, ``(O,K)`` alike;
* with ``W_O``: ``(O,O) = S_O ⊗ I`` (``‖·‖² = d_O ‖S_O‖²``) and ``(V,O) = P ⊠ W_O + Q ⊠ I`` with
  ``P = 2c M_1ᵀM_1W_V``, ``Q = M_1ᵀG``: ``‖H_o‖² = ‖P‖²‖W_O‖²``, ``‖H_f‖² = d_V‖Q‖²``,
  ``⟨H_o, H_f⟩ = ⟨P W_O, Q⟩``.

For each block the three numbers ``⟨H_o,H_o⟩``, ``⟨H_o,H_f⟩``, ``⟨H_f,H_f⟩`` are computed exactly, and
``‖H‖² = ‖H_o‖² + 2⟨H_o,H_f⟩ + ‖H_f‖²`` (in floating point this loses relative accuracy only where ``H_o`` and
``H_f`` nearly cancel).

Cost (``d = d_V``, ``k = d_K``): forming the factors ``O(N d³ + N d² k)``; the Gram sums
``O(N² (d² + k²))``; the mixed ``(V, ·)`` term ``O(N² d²)`` computed in row chunks of bounded memory. Nothing of
size ``p²`` or ``N d³ k`` is formed. At ``d = k = 128, L = 32`` that is ~10⁸ flops against ``p² ≈ 2.4·10⁹`` entries
of the dense Hessian.
"""

from __future__ import annotations

import torch
from torch import Tensor

from energy._validation import EnergyInputError
from energy.hessian.attention import (
    BLOCKS,
    BLOCKS_O,
    AttentionMoments,
    Part,
    Reduction,
    _Factors,
    attention_moments,
)

__all__ = [
    "BLOCK_NAMES",
    "BLOCK_NAMES_O",
    "block_inner_products",
    "block_norms",
    "block_norms_from_moments",
    "block_traces",
    "block_diagonals",
    "hessian_frobenius_norms",
]

#: Canonical block names, e.g. ``"VQ"`` for the (V, Q) block (its transpose ``"QV"`` has the same norm).
BLOCK_NAMES: tuple[str, ...] = tuple(a + b for a, b in BLOCKS)
#: The extra block names with an output projection.
BLOCK_NAMES_O: tuple[str, ...] = tuple(a + b for a, b in BLOCKS_O)


def _names(mom: AttentionMoments) -> tuple[str, ...]:
    return tuple(a + b for a, b in mom.blocks)


def _canonical(block: str, mom: AttentionMoments) -> str:
    names = _names(mom)
    if not isinstance(block, str) or (block not in names and block[::-1] not in names):
        raise EnergyInputError(f"block names are two letters of the layer's weights {mom.params}, e.g. 'QQ' or "
                               f"'VQ' (transposes allowed); got {block!r}.")
    return block if block in names else block[::-1]


def _gram(F: Tensor) -> Tensor:
    """``⟨F_i, F_j⟩`` for all row pairs, ``F`` of shape ``(N, ...)``."""
    F = F.reshape(F.shape[0], -1)
    return F @ F.T


def _cross_gram(F1: Tensor, F2: Tensor) -> Tensor:
    return F1.reshape(F1.shape[0], -1) @ F2.reshape(F2.shape[0], -1).T


def _mixed_value_term(
    alpha: Tensor, Bt: Tensor, SO: Tensor, gamma: Tensor, weight: Tensor, chunk: int = 64
) -> float:
    r"""``Σ_ij w_ij α_iᵀ (S̃_jΩ) B̃_iᵀ γ_j`` in row chunks (``SO`` = ``S̃_j Ω``); cost ``O(N² d²)``, memory bounded."""
    N = alpha.shape[0]
    total = 0.0
    for s in range(0, N, chunk):
        i = slice(s, min(N, s + chunk))
        z = torch.einsum("in,jna->ija", alpha[i], SO)  # (α_iᵀ S̃_j Ω)[a]
        y = torch.einsum("ima,jm->ija", Bt[i], gamma)  # (B̃_iᵀ γ_j)[a]
        total += float((weight[i] * (z * y).sum(-1)).sum())
    return total


def block_inner_products(mom: AttentionMoments, block: str) -> dict[str, float]:
    r"""``{"oo": ‖H_o‖², "of": ⟨H_o, H_f⟩_F, "ff": ‖H_f‖²}`` of one block, exactly (module docstring formulas).

    Args:
        mom: from :func:`energy.hessian.attention.attention_moments`.
        block: ``"VV"``, ``"VQ"``, ``"VK"``, ``"QQ"``, ``"KK"``, ``"QK"`` (or a transpose such as ``"QV"``);
            with an output projection also ``"OO"``, ``"VO"``, ``"OQ"``, ``"OK"``.
    """
    block = _canonical(block, mom)
    fo, ff = _Factors(mom, "H_o"), _Factors(mom, "H_f")
    kappa, c = mom.kappa, mom.c
    if block == "VV":
        return {"oo": float((fo.S**2).sum()) * float((fo.Omega_O**2).sum()), "of": 0.0, "ff": 0.0}
    if block == "OO":
        return {"oo": mom.d_O * float((fo.S_O**2).sum()), "of": 0.0, "ff": 0.0}
    if block == "VO":
        P, Q = fo.P_VO, ff.Q_VO
        return {
            "oo": float((P**2).sum()) * float((mom.W_O**2).sum()),
            "of": float(((P @ mom.W_O) * Q).sum()),
            "ff": mom.d_V * float((Q**2).sum()),
        }
    if block == "QQ":
        w = _gram(mom.x) ** 2
        Po, Pf = fo.P, ff.P
        pairs = {"oo": (Po, Po), "of": (Po, Pf), "ff": (Pf, Pf)}
        return {key: float((w * _cross_gram(A, B)).sum()) for key, (A, B) in pairs.items()}
    if block == "KK":
        w = _gram(mom.q) ** 2
        Ro, Rf = fo.R, ff.R
        pairs = {"oo": (Ro, Ro), "of": (Ro, Rf), "ff": (Rf, Rf)}
        return {key: float((w * _cross_gram(A, B)).sum()) for key, (A, B) in pairs.items()}
    if block == "QK":
        w = _gram(mom.x) * _gram(mom.q)
        Uo, Uf = fo.U, ff.U
        G = mom.G_QK
        # ⟨Σ_i x_i ⊗ U_i ⊗ q_iᵀ, G ⊗ I⟩ = Σ_i q_iᵀ U_i Gᵀ x_i
        with_G = {name: float(torch.einsum("ib,iba,ca,ic->", mom.q, U, G, mom.x)) for name, U in (("o", Uo), ("f", Uf))}
        return {
            "oo": float((w * _cross_gram(Uo, Uo)).sum()),
            "of": float((w * _cross_gram(Uo, Uf)).sum()) + with_G["o"],
            "ff": float((w * _cross_gram(Uf, Uf)).sum()) + 2.0 * with_G["f"] + mom.d_K * float((G**2).sum()),
        }
    # value-side × query/key ("VQ", "VK", "OQ", "OK"): Σ_ij w_ij ⟨E_i Ω, E'_j⟩
    alpha, Bt, St, gamma = fo.value_side(block[0])
    if block[1] == "K":
        w, BO, SO = _gram(mom.q), Bt, St
    else:  # query: Ω = W_K W_Kᵀ
        Omega = mom.W_K @ mom.W_K.T
        w, BO, SO = _gram(mom.x), Bt @ Omega, St @ Omega
    oo = (2 * c * kappa) ** 2 * float((w * _gram(alpha) * _cross_gram(BO, Bt)).sum())
    ff_ = kappa**2 * float((w * _gram(gamma) * _cross_gram(SO, St)).sum())
    of = 2 * c * kappa**2 * _mixed_value_term(alpha, Bt, SO, gamma, w)
    return {"oo": oo, "of": of, "ff": ff_}


def _parts(ip: dict[str, float], squared: bool) -> dict[str, float]:
    sq = {"H_o": ip["oo"], "H_f": ip["ff"], "H": ip["oo"] + 2.0 * ip["of"] + ip["ff"]}
    out = sq if squared else {k: max(v, 0.0) ** 0.5 for k, v in sq.items()}
    out["cross"] = ip["of"]
    return out


def block_norms_from_moments(
    mom: AttentionMoments, blocks: list[str] | None = None, *, squared: bool = False
) -> dict[tuple[str, str], float]:
    """Frobenius norms ``{(block, part): value}`` with parts ``"H"``, ``"H_o"``, ``"H_f"`` and ``"cross"``.

    ``"cross"`` is the inner product ``⟨H_o, H_f⟩_F`` of the block (not a norm). With ``squared=True`` the
    squared norms are returned (no square root; useful to sum blocks).
    """
    names = _names(mom) if blocks is None else [_canonical(b, mom) for b in blocks]
    out: dict[tuple[str, str], float] = {}
    for name in names:
        for part, value in _parts(block_inner_products(mom, name), squared).items():
            out[(name, part)] = value
    return out


def block_norms(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    Y: Tensor,
    *,
    W_O: Tensor | None = None,
    blocks: list[str] | None = None,
    squared: bool = False,
    c: float | None = None,
    reduction: Reduction = "sum",
    scale: float | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
    linear: bool = False,
) -> dict[tuple[str, str], float]:
    """Exact block Frobenius norms of the attention-layer Hessian, without forming any block (MATH §3.4–§3.5).

    Arguments as in :func:`energy.hessian.attention.attention_moments`; ``blocks`` defaults to all six
    (:data:`BLOCK_NAMES`). Returns ``{(block, part): value}``, see :func:`block_norms_from_moments`.
    Cost ``O(N d³ + N² d²)`` with ``N = B L`` (module docstring).
    """
    mom = attention_moments(
        X, W_Q, W_K, W_V, Y, W_O=W_O, c=c, reduction=reduction, scale=scale, mask=mask, causal=causal, linear=linear
    )
    return block_norms_from_moments(mom, blocks, squared=squared)


def hessian_frobenius_norms(mom: AttentionMoments) -> dict[str, float]:
    """Frobenius norms of the whole ``H``, ``H_o``, ``H_f`` (off-diagonal blocks counted twice)."""
    sq = block_norms_from_moments(mom, squared=True)
    out = {}
    for part in ("H", "H_o", "H_f"):
        total = sum((1.0 if b[0] == b[1] else 2.0) * sq[(b, part)] for b in _names(mom))
        out[part] = max(total, 0.0) ** 0.5
    return out


def _diag_factors(mom: AttentionMoments, part: Part) -> dict[str, Tensor]:
    f = _Factors(mom, part)
    diag_R = f.R.diagonal(dim1=-2, dim2=-1)  # (N, d)
    diag_P = f.P.diagonal(dim1=-2, dim2=-1)  # (N, k)
    out = {
        # diag Σ_i x_i x_iᵀ ⊗ P_i = Σ_i (x_i ∘ x_i) ⊗ diag P_i
        "Q": torch.einsum("ia,ib->ab", mom.x**2, diag_P).reshape(-1),
        # diag Σ_i R_i ⊗ q_i q_iᵀ = Σ_i diag R_i ⊗ (q_i ∘ q_i)
        "K": torch.einsum("ia,ib->ab", diag_R, mom.q**2).reshape(-1),
        # diag S ⊗ Ω_O
        "V": torch.outer(f.S.diagonal(), f.Omega_O.diagonal()).reshape(-1),
    }
    if mom.W_O is not None:  # diag S_O ⊗ I
        out["O"] = f.S_O.diagonal().repeat_interleave(mom.d_O)
    return out


def block_diagonals(mom: AttentionMoments, part: Part = "H") -> dict[str, Tensor]:
    r"""Diagonals of the diagonal blocks ``(Q,Q)``, ``(K,K)``, ``(V,V)`` [, ``(O,O)``] in ``vec_r`` order, exactly.

    .. math:: \mathrm{diag}\,H(Q,Q) = \textstyle\sum_i (x_i\circ x_i)\otimes \mathrm{diag}(W_K^\top R_i W_K),\quad
              \mathrm{diag}\,H(K,K) = \sum_i \mathrm{diag}R_i \otimes (q_i\circ q_i),\quad
              \mathrm{diag}\,H(V,V) = \mathrm{diag}(2c M_1^\top M_1)\otimes \mathrm{diag}(W_O W_O^\top)

    and ``diag H(O,O) = diag(2c W_VᵀM_1ᵀM_1W_V) ⊗ 1`` (the bilinear term sits off the diagonal blocks). Cost
    ``O(N d² k)``. Concatenated in the order of ``mom.params`` they are the diagonal of the whole Hessian.
    """
    if part not in ("H", "H_o", "H_f"):
        raise EnergyInputError(f"`part` must be 'H', 'H_o' or 'H_f', got {part!r}.")
    return _diag_factors(mom, part)


def block_traces(mom: AttentionMoments, part: Part = "H") -> dict[str, float]:
    r"""Traces of the diagonal blocks and of the whole Hessian: ``{"QQ", "KK", "VV"[, "OO"], "total"}``.

    .. math:: \mathrm{tr}\,H(Q,Q) = \textstyle\sum_i \|x_i\|^2\,\mathrm{tr}(W_K^\top R_i W_K),\quad
              \mathrm{tr}\,H(K,K) = \sum_i \mathrm{tr}R_i\,\|q_i\|^2,\quad
              \mathrm{tr}\,H(V,V) = \mathrm{tr}(2c M_1^\top M_1)\,\|W_O\|_F^2
    """
    diags = block_diagonals(mom, part)
    out = {name + name: float(v.sum()) for name, v in diags.items()}
    out["total"] = sum(out.values())
    return out
