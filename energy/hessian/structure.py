r"""Exact Frobenius norms, traces and diagonals of the attention Hessian blocks, never materialised (MATH §3.4–§3.5).

Every block of :mod:`energy.hessian.attention` is a sum over the ``N = B·L`` query rows ``i`` of Kronecker
products of small per-row factors. Inner products of such sums reduce to Gram matrices over rows:

.. math::
    \Big\|\sum_i A_i \otimes B_i\Big\|_F^2 = \sum_{i,j} \langle A_i, A_j\rangle\,\langle B_i, B_j\rangle,\qquad
    \mathrm{tr}\sum_i A_i \otimes B_i = \sum_i \mathrm{tr}A_i\,\mathrm{tr}B_i,\qquad
    \mathrm{diag}\sum_i A_i\otimes B_i = \sum_i \mathrm{diag}A_i \otimes \mathrm{diag}B_i .

With the per-row factors of :mod:`energy.hessian.attention` (``R_i``, ``E_i``; Gram matrices
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
  ``P = 2c M_1ᵀM_1W_V``, ``Q = M_1ᵀG``: ``‖H_o‖² = ‖P‖²‖W_O‖²``, ``‖H_f‖² = d_v‖Q‖²``,
  ``⟨H_o, H_f⟩ = ⟨P W_O, Q⟩``.

For each block the three numbers ``⟨H_o,H_o⟩``, ``⟨H_o,H_f⟩``, ``⟨H_f,H_f⟩`` are computed exactly, and
``‖H‖² = ‖H_o‖² + 2⟨H_o,H_f⟩ + ‖H_f‖²`` (in floating point this loses relative accuracy only where ``H_o`` and
``H_f`` nearly cancel).

**Token space.** The per-row ``d × d`` factors are never formed either. Each is ``U_bᵀ F̃_i V_b`` with an
``L × L`` core (``Σ_i = XᵀJ_iX``, ``Ŝ_i = XᵀC_iX``, ``R_i = XᵀR̃_iX`` with ``R̃_i = κ²(2c J_i X Ṽ Ṽᵀ Xᵀ J_i + C_i)``,
``B̃_i = U_Bᵀ J_i X``; ``J_i``, ``C_i`` the softmax Jacobian and curvature, :class:`_TokenCores`), so
``⟨U_{1}ᵀF_iV_{1}, U_{2}ᵀF'_jV_{2}⟩ = tr(F_iᵀ (U_{1,b}U_{2,c}ᵀ) F'_j (V_{2,c}V_{1,b}ᵀ))`` needs only ``L × L``
products (:func:`_core_gram`).

Cost (``B`` sequences of length ``L``, ``d = d_V``, ``k = d_K``): ``O(B² L⁴ + B² L² d + B L² d)`` time and
``O(B L³ + B² L²)`` memory per block (sequence pairs processed in chunks), plus ``O(d³)`` for the value-only blocks.
Nothing of size ``p²`` and no ``d × d`` matrix per row is formed: at ``d = k = 128``, ``L = 18`` one sequence's
six blocks take milliseconds, against ``p² ≈ 2.4·10⁹`` entries of the dense Hessian. Diagonals cost
``O(B L³ + B L² (d + k))``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import Unpack

from energy._validation import EnergyInputError
from energy.hessian.attention_layer import AttentionLayer, LayerOptions
from energy.hessian.blocks import Part, _Factors
from energy.hessian.moments import BLOCKS, BLOCKS_O, AttentionMoments, attention_moments, check_moments

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


class _TokenCores:
    r"""Token-space (``L × L``) cores of the per-row factors, so that no ``d × d`` matrix per row is formed.

    Every per-row factor is ``U_bᵀ F̃_i V_b`` with an ``L × L`` core ``F̃_i`` and per-sequence factors
    ``U_b, V_b`` (``L × r``): ``Σ_i = X_bᵀ J_i X_b``, ``Ŝ_i = X_bᵀ C_i X_b``,
    ``R_i = X_bᵀ R̃_i X_b`` with ``R̃_i = κ²(2c J_i K^V_b J_i + C_i)``, ``K^V_b = X_b Ṽ Ṽᵀ X_bᵀ``, and
    ``B̃_i = U_Bᵀ J_i X_b``. Gram matrices then follow from
    ``⟨U_1ᵀF_iV_1, U_2ᵀF'_jV_2⟩ = tr(F_iᵀ (U_{1,b}U_{2,c}ᵀ) F'_j (V_{2,c}V_{1,b}ᵀ))`` (:func:`_core_gram`).
    """

    def __init__(self, mom: AttentionMoments) -> None:
        self.mom = mom
        X, A, r = mom.X, mom.A, mom.r
        self.X = X
        self.K = X @ mom.W_K  # (B, L, k)
        self.J = mom.J_tok  # (B, L, L, L)
        C = torch.diag_embed(r) - A.unsqueeze(-1) * r.unsqueeze(-2) - r.unsqueeze(-1) * A.unsqueeze(-2)
        XV = X @ mom.V_eff
        KV = XV @ XV.transpose(-1, -2)  # (B, L, L)
        k2 = mom.kappa**2
        self.R = {
            "H_o": (2.0 * mom.c * k2) * torch.einsum("bipq,bqs,bist->bipt", self.J, KV, self.J),
            "H_f": k2 * C,
        }
        self.R["H"] = self.R["H_o"] + self.R["H_f"]

    def value_side(self, w: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(α_i, U_B, U_S, γ_i)`` with ``B̃_i = U_Bᵀ J_i X`` and ``S̃_i = U_Sᵀ J_i X`` for ``w ∈ {V, O}``."""
        mom, X = self.mom, self.X
        XV = X @ mom.V_eff
        if w == "V":
            if mom.W_O is None:
                return mom.M_1, XV, X, mom.G
            return mom.M_1, XV @ mom.W_O.T, X, mom.G @ mom.W_O.T
        return mom.M_1 @ mom.W_V, XV, X @ mom.W_V, mom.G


def _core_gram(F1: Tensor, U1: Tensor, V1: Tensor, F2: Tensor, U2: Tensor, V2: Tensor, chunk: int = 1 << 22) -> Tensor:
    r"""``Gram[(b,i),(c,j)] = ⟨U_{1,b}ᵀ F1_{b,i} V_{1,b}, U_{2,c}ᵀ F2_{c,j} V_{2,c}⟩_F`` as an ``(N, N)`` matrix.

    ``= tr(F1_{b,i}ᵀ (U_{1,b}U_{2,c}ᵀ) F2_{c,j} (V_{2,c}V_{1,b}ᵀ))``; cores ``(B, L, L, L)``, factors ``(B, L, r)``.
    Cost ``O(B² L⁴ + B² L² r)``, memory bounded by processing sequences ``b`` in chunks.
    """
    B, L = F1.shape[:2]
    GU = torch.einsum("bpr,cqr->bcpq", U1, U2)  # U_{1,b} U_{2,c}ᵀ
    GV = torch.einsum("csr,bqr->cbsq", V2, V1)  # V_{2,c} V_{1,b}ᵀ
    out = torch.empty(B, L, B, L, dtype=F1.dtype, device=F1.device)
    step = max(1, chunk // (B * L**3))
    for b0 in range(0, B, step):
        b = slice(b0, min(B, b0 + step))
        X1 = torch.einsum("bipq,bcpr->bciqr", F1[b], GU[b])  # (F1ᵀ GU)[q, r]
        X2 = torch.einsum("cjrs,cbsq->bcjrq", F2, GV[:, b])  # (F2 GV)[r, q]
        out[b] = torch.einsum("bciqr,bcjrq->bicj", X1, X2)
    return out.reshape(B * L, B * L)


def _mixed_value_term(
    cores: _TokenCores, alpha: Tensor, U_B: Tensor, U_S: Tensor, gamma: Tensor, Rf: Tensor, weight: Tensor
) -> float:
    r"""``Σ_ij w_ij α_iᵀ S̃_j Ω B̃_iᵀ γ_j`` with ``S̃_j = U_Sᵀ J_j X``, ``B̃_i = U_Bᵀ J_i X``, ``XΩXᵀ = Rf Rfᵀ``.

    In token space: ``(J_j U_{S,c} α_i)ᵀ (Rf_c Rf_bᵀ) (J_i U_{B,b} γ_j)`` for ``i`` in sequence ``b``, ``j`` in
    ``c``. Cost ``O(B² L⁴)``, one sequence ``b`` at a time.
    """
    J = cores.J
    B, L = J.shape[:2]
    a1 = torch.einsum("cpd,id->icp", U_S, alpha)  # U_{S,c} α_i, (N, B, L)
    a2 = torch.einsum("bpd,jd->jbp", U_B, gamma)  # U_{B,b} γ_j, (N, B, L)
    Lam = torch.einsum("cpr,bqr->cbpq", Rf, Rf)  # Rf_c Rf_bᵀ
    w = weight.reshape(B, L, B, L)
    total = 0.0
    for b in range(B):
        rows = slice(b * L, (b + 1) * L)
        s_ = torch.einsum("cjpq,icq->icjp", J, a1[rows])  # J_j U_{S,c} α_i, (L, B, L, L)
        t_ = torch.einsum("ipq,cjq->icjp", J[b], a2.reshape(B, L, B, L)[:, :, b])  # J_i U_{B,b} γ_j
        val = torch.einsum("icjp,cpq,icjq->icj", s_, Lam[:, b], t_)
        total += float((w[b] * val).sum())
    return total


def block_inner_products(mom: AttentionMoments, block: str, *, _cores: _TokenCores | None = None) -> dict[str, float]:
    r"""``{"oo": ‖H_o‖², "of": ⟨H_o, H_f⟩_F, "ff": ‖H_f‖²}`` of one block, exactly (module docstring formulas).

    Args:
        mom: from :func:`energy.hessian.attention.attention_moments`.
        block: ``"VV"``, ``"VQ"``, ``"VK"``, ``"QQ"``, ``"KK"``, ``"QK"`` (or a transpose such as ``"QV"``);
            with an output projection also ``"OO"``, ``"VO"``, ``"OQ"``, ``"OK"``.
    """
    check_moments(mom, "block_inner_products")
    block = _canonical(block, mom)
    kappa, c = mom.kappa, mom.c
    if block in ("VV", "OO", "VO"):  # d-space, no per-row factors
        fo, ff = _Factors(mom, "H_o"), _Factors(mom, "H_f")
        if block == "VV":
            return {"oo": float((fo.S**2).sum()) * float((fo.Omega_O**2).sum()), "of": 0.0, "ff": 0.0}
        if block == "OO":
            return {"oo": mom.d_O * float((fo.S_O**2).sum()), "of": 0.0, "ff": 0.0}
        P, Q = fo.P_VO, ff.Q_VO
        assert mom.W_O is not None  # the block names were checked against the layer's weights
        return {
            "oo": float((P**2).sum()) * float((mom.W_O**2).sum()),
            "of": float(((P @ mom.W_O) * Q).sum()),
            "ff": mom.d_v * float((Q**2).sum()),
        }
    tc = _TokenCores(mom) if _cores is None else _cores
    X, K, Ro, Rf = tc.X, tc.K, tc.R["H_o"], tc.R["H_f"]
    if block in ("QQ", "KK", "QK"):
        if block == "QQ":  # P_i = W_Kᵀ R_i W_K = Kᵀ R̃_i K
            w, U, V = _gram(mom.x) ** 2, K, K
        elif block == "KK":  # R_i = Xᵀ R̃_i X
            w, U, V = _gram(mom.q) ** 2, X, X
        else:  # U_i = W_Kᵀ R_i = Kᵀ R̃_i X
            w, U, V = _gram(mom.x) * _gram(mom.q), K, X
        out = {
            "oo": float((w * _core_gram(Ro, U, V, Ro, U, V)).sum()),
            "of": float((w * _core_gram(Ro, U, V, Rf, U, V)).sum()),
            "ff": float((w * _core_gram(Rf, U, V, Rf, U, V)).sum()),
        }
        if block == "QK":  # bilinear term G_QK ⊗ I: ⟨Σ_i x_i⊗U_i⊗q_iᵀ, G⊗I⟩ = Σ_i (K q_i)ᵀ R̃_i (X Gᵀ x_i)
            B, L = X.shape[:2]
            kq = torch.einsum("bpk,bik->bip", K, mom.q.reshape(B, L, -1))
            xg = torch.einsum("bpd,bid->bip", X, (mom.x @ mom.G_QK).reshape(B, L, -1))
            with_G = {name: float(torch.einsum("bip,bipq,biq->", kq, R, xg)) for name, R in (("o", Ro), ("f", Rf))}
            out["of"] += with_G["o"]
            out["ff"] += 2.0 * with_G["f"] + mom.d_K * float((mom.G_QK**2).sum())
        return out
    # value side × query/key ("VQ", "VK", "OQ", "OK"): Σ_ij w_ij ⟨E_i Ω, E'_j⟩, Ω = W_K W_Kᵀ (Q) or I (K)
    alpha, U_B, U_S, gamma = tc.value_side(block[0])
    w, Rfac = (_gram(mom.q), X) if block[1] == "K" else (_gram(mom.x), K)
    J = tc.J
    oo = (2 * c * kappa) ** 2 * float((w * _gram(alpha) * _core_gram(J, U_B, Rfac, J, U_B, Rfac)).sum())
    ff_ = kappa**2 * float((w * _gram(gamma) * _core_gram(J, U_S, Rfac, J, U_S, Rfac)).sum())
    of = 2 * c * kappa**2 * _mixed_value_term(tc, alpha, U_B, U_S, gamma, Rfac, w)
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
    check_moments(mom, "block_norms_from_moments")
    names = _names(mom) if blocks is None else [_canonical(b, mom) for b in blocks]
    cores = _TokenCores(mom)
    out: dict[tuple[str, str], float] = {}
    for name in names:
        for part, value in _parts(block_inner_products(mom, name, _cores=cores), squared).items():
            out[(name, part)] = value
    return out


def block_norms(
    *args: Tensor | AttentionLayer,
    blocks: list[str] | None = None,
    squared: bool = False,
    **options: Unpack[LayerOptions],
) -> dict[tuple[str, str], float]:
    """Exact block Frobenius norms of the attention-layer Hessian, without forming any block (MATH §3.4–§3.5).

    Call as ``block_norms(layer, X, Y)`` or ``block_norms(X, W_Q, W_K, W_V, Y, **options)`` (as
    :func:`energy.hessian.attention.attention_moments`); ``blocks`` defaults to all six (:data:`BLOCK_NAMES`).
    Returns ``{(block, part): value}``, see :func:`block_norms_from_moments`.
    Cost ``O(N d³ + N² d²)`` with ``N = B L`` (module docstring).
    """
    mom = attention_moments(*args, **options)
    return block_norms_from_moments(mom, blocks, squared=squared)


def hessian_frobenius_norms(mom: AttentionMoments) -> dict[str, float]:
    """Frobenius norms of the whole ``H``, ``H_o``, ``H_f`` (off-diagonal blocks counted twice)."""
    check_moments(mom, "hessian_frobenius_norms")
    sq = block_norms_from_moments(mom, squared=True)
    out = {}
    for part in ("H", "H_o", "H_f"):
        total = sum((1.0 if b[0] == b[1] else 2.0) * sq[(b, part)] for b in _names(mom))
        out[part] = max(total, 0.0) ** 0.5
    return out


def _diag_factors(mom: AttentionMoments, part: Part) -> dict[str, Tensor]:
    f = _Factors(mom, part)
    tc = _TokenCores(mom)
    R = tc.R[part]
    # diag R_i = diag(Xᵀ R̃_i X), diag P_i = diag(Kᵀ R̃_i K): O(N L² d)
    diag_R = torch.einsum("bpa,bipq,bqa->bia", tc.X, R, tc.X).reshape(-1, mom.d_V)
    diag_P = torch.einsum("bpa,bipq,bqa->bia", tc.K, R, tc.K).reshape(-1, mom.d_K)
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
    check_moments(mom, "block_diagonals")
    if part not in ("H", "H_o", "H_f"):
        raise EnergyInputError(f"`part` must be 'H', 'H_o' or 'H_f', got {part!r}.")
    return _diag_factors(mom, part)


def block_traces(mom: AttentionMoments, part: Part = "H") -> dict[str, float]:
    r"""Traces of the diagonal blocks and of the whole Hessian: ``{"QQ", "KK", "VV"[, "OO"], "total"}``.

    .. math:: \mathrm{tr}\,H(Q,Q) = \textstyle\sum_i \|x_i\|^2\,\mathrm{tr}(W_K^\top R_i W_K),\quad
              \mathrm{tr}\,H(K,K) = \sum_i \mathrm{tr}R_i\,\|q_i\|^2,\quad
              \mathrm{tr}\,H(V,V) = \mathrm{tr}(2c M_1^\top M_1)\,\|W_O\|_F^2
    """
    check_moments(mom, "block_traces")
    diags = block_diagonals(mom, part)
    out = {name + name: float(v.sum()) for name, v in diags.items()}
    out["total"] = sum(out.values())
    return out
