r"""Constrained standard attention layers ↔ attention energies and their descent steps (MATH §1.1, §1.2, §1.7).

A standard multi-head attention layer (``nn.MultiheadAttention`` or reference weights ``W_Q, W_K, W_V, W_O``, right
acting, MATH §0) computes, head by head with ``d_head = d / h`` and ``κ = 1/√d_head``,

.. math:: \mathrm{MHA}(Y) = \sum_h \mathrm{softmax}(\kappa\, Y W_Q^h W_K^{h\top} Y^\top)\, Y W_V^h W_O^h .

It is (the non-residual part of) a descent step of the attention energy ``Σ_h E_h`` with ``W_h = κ M_h M_hᵀ`` iff

1. **query–key constraint**: ``W_Q^h W_K^{hᵀ}`` is symmetric PSD (then ``= M_h M_hᵀ``; e.g. ``W_Q = W_K``);
2. **value constraint**: ``W_V W_O = I`` for one head, ``W_V^h W_O^h = P_h`` (projector onto ``range(M_h)``) for
   several heads, for the metric step (a), or ``W_V^h W_O^h = W_h`` for the token step (b);
3. **no biases** (in/out projection biases, ``bias_k``/``bias_v``, ``add_zero_attn``).

Then, with the skip map ``R = (1 − α) I`` (one head) or ``R = I − α Σ_h P_h`` (heads) for (a), or
``R = I − α Σ_h W_h`` for (b) — MATH §1.5, residual = step size —

.. math:: Y^+ = Y R + \alpha\, \mathrm{MHA}_\beta(Y),

where ``MHA_β`` is the layer with the **key bias** ``β^h_j = −½‖y_j‖²_{W_h}`` added to its logits. A standard layer
has no such bias. What is and is not reproducible:

* *exactly, always*: pass ``β`` as a float ``attn_mask`` (:func:`key_bias_mask`, shape ``(B·h, n, n)``) — the mask
  depends on the input, so it is computed per call;
* *exactly, without a mask*: when every token has the same ``W_h``-norm (e.g. after a projection onto a sphere in the
  metric, or LayerNorm with ``W ∝ I``): then ``β`` is constant along each row and cancels in the softmax;
* *not otherwise*: the plain layer is a different map, and it can increase the energy (MATH §1.1).

Heads on mutually orthogonal subspaces keep the single-head descent guarantee; for general heads the summed step is
reproduced just as exactly, but it is not a guaranteed descent step (MATH §1.2) — the report says which case holds.

Unconstrained layers: :func:`check_layer` reports every violated constraint with its size (e.g. "W_Q W_Kᵀ is not
symmetric: ‖asym‖/‖W‖ = 0.43") and :func:`nearest_constrained` returns the nearest constrained layer (Frobenius-nearest
symmetric PSD rank-``d_head`` part of each ``W_Q^h W_K^{hᵀ}``, value maps set to the constraint) and the distances.
Distances are measured on the products ``W_Q^h W_K^{hᵀ}`` and ``W_V^h W_O^h`` (the layer depends on the weights only
through them), relative to the original product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from energy._validation import ConstraintError, EnergyInputError, check_tensor
from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy, head_bases, key_bias, metric
from unfold.steps import AttentionStep

__all__ = [
    "AttentionWeights",
    "ConstraintReport",
    "EnergyStep",
    "from_mha",
    "to_mha",
    "check_layer",
    "nearest_constrained",
    "to_energy",
    "to_standard",
    "skip_map",
    "key_bias_mask",
    "standard_step",
    "verify_equivalence",
]

_VALUES = ("identity", "metric")


# ------------------------------------------------------------------------------------------------------ weights


@dataclass
class AttentionWeights:
    """Right-acting weights of a multi-head self-attention layer (MATH §0): ``Q = Y W_Q``, ``out = heads · W_O``.

    Shapes: ``W_Q, W_K, W_V`` ``(d, h·d_head)``, ``W_O`` ``(h·d_head, d)``; biases optional (``None`` = absent).
    """

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    num_heads: int
    b_Q: Tensor | None = None
    b_K: Tensor | None = None
    b_V: Tensor | None = None
    b_O: Tensor | None = None
    extras: list[str] = field(default_factory=list)  # features of the layer that no energy step has

    def __post_init__(self) -> None:
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            check_tensor(getattr(self, name), name, ndim=2)
        d, hd = self.W_Q.shape
        if self.W_K.shape != (d, hd) or self.W_V.shape != (d, hd) or self.W_O.shape != (hd, d):
            raise EnergyInputError(
                f"self-attention weights must be W_Q, W_K, W_V of shape (d, h·d_head) and W_O of shape (h·d_head, d);"
                f" got W_Q {tuple(self.W_Q.shape)}, W_K {tuple(self.W_K.shape)}, W_V {tuple(self.W_V.shape)}, "
                f"W_O {tuple(self.W_O.shape)}."
            )
        if not isinstance(self.num_heads, int) or self.num_heads <= 0 or hd % self.num_heads:
            raise EnergyInputError(f"`num_heads` = {self.num_heads!r} must be a positive divisor of h·d_head = {hd}.")

    @property
    def d(self) -> int:
        return self.W_Q.shape[0]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[1] // self.num_heads

    def heads(self, name: str) -> Tensor:
        """Per-head blocks: ``W_Q/W_K/W_V`` → ``(h, d, d_head)``, ``W_O`` → ``(h, d_head, d)``."""
        W = getattr(self, name)
        h, dh = self.num_heads, self.d_head
        if name == "W_O":
            return W.reshape(h, dh, W.shape[1])
        return W.reshape(W.shape[0], h, dh).permute(1, 0, 2)


def from_mha(layer: nn.MultiheadAttention) -> AttentionWeights:
    """Right-acting weights of ``nn.MultiheadAttention`` (``W_Q = in_proj_weight[:d].T`` etc.)."""
    if not isinstance(layer, nn.MultiheadAttention):
        raise EnergyInputError(f"`layer` must be an nn.MultiheadAttention, got {type(layer).__name__}.")
    extras = []
    if layer.bias_k is not None or layer.bias_v is not None:
        extras.append("bias_k/bias_v (add_bias_kv=True) add an extra key/value slot")
    if layer.add_zero_attn:
        extras.append("add_zero_attn=True adds a zero key/value slot")
    if not layer._qkv_same_embed_dim:
        raise EnergyInputError(
            "`layer` has kdim/vdim ≠ embed_dim (cross-attention projections); an energy step is self-attention on "
            "tokens of one width. Use kdim = vdim = embed_dim."
        )
    W_Q, W_K, W_V = (w.detach().T for w in layer.in_proj_weight.chunk(3))
    b = layer.in_proj_bias
    b_Q, b_K, b_V = (None, None, None) if b is None else (x.detach() for x in b.chunk(3))
    b_O = None if layer.out_proj.bias is None else layer.out_proj.bias.detach()
    return AttentionWeights(W_Q, W_K, W_V, layer.out_proj.weight.detach().T, layer.num_heads, b_Q, b_K, b_V, b_O,
                            extras)


def to_mha(weights: AttentionWeights, *, batch_first: bool = True) -> nn.MultiheadAttention:
    """An ``nn.MultiheadAttention`` with exactly these weights (biases only if present)."""
    d, hd = weights.W_Q.shape
    if hd != d:
        raise EnergyInputError(
            f"nn.MultiheadAttention needs h·d_head = embed_dim, got h·d_head = {hd}, d = {d}; pad the head width."
        )
    has_bias = any(b is not None for b in (weights.b_Q, weights.b_K, weights.b_V, weights.b_O))
    layer = nn.MultiheadAttention(d, weights.num_heads, bias=has_bias, batch_first=batch_first,
                                  dtype=weights.W_Q.dtype, device=weights.W_Q.device)
    with torch.no_grad():
        layer.in_proj_weight.copy_(torch.cat([weights.W_Q.T, weights.W_K.T, weights.W_V.T], dim=0))
        layer.out_proj.weight.copy_(weights.W_O.T)
        if has_bias:
            zeros = torch.zeros(d, dtype=weights.W_Q.dtype)
            layer.in_proj_bias.copy_(torch.cat([b if b is not None else zeros
                                                for b in (weights.b_Q, weights.b_K, weights.b_V)]))
            layer.out_proj.bias.copy_(weights.b_O if weights.b_O is not None else zeros)
    return layer


def _as_weights(layer: Any) -> AttentionWeights:
    if isinstance(layer, AttentionWeights):
        return layer
    if isinstance(layer, nn.MultiheadAttention):
        return from_mha(layer)
    if isinstance(layer, dict):
        try:
            return AttentionWeights(**layer)
        except TypeError as exc:
            raise EnergyInputError(f"reference weights dict: {exc}; expected keys W_Q, W_K, W_V, W_O, num_heads "
                                   "(and optional b_Q, b_K, b_V, b_O).") from None
    raise EnergyInputError(
        f"`layer` must be an nn.MultiheadAttention, an AttentionWeights or a dict of reference weights, "
        f"got {type(layer).__name__}."
    )


# ------------------------------------------------------------------------------------------------ constraint check


@dataclass
class ConstraintReport:
    """Which constraints a standard layer satisfies (MATH §1.7), measured.

    Attributes:
        satisfied: all constraints hold (within ``rtol``): the layer is a descent-step layer.
        failures: one human-readable line per violated constraint, with its size.
        measures: the numbers (per head): ``qk_asymmetry`` ‖asym‖/‖S‖, ``qk_lambda_min`` (relative), value-map
            distances, bias norms.
        value: the value constraint checked (``"identity"`` = step (a), ``"metric"`` = step (b)).
        alpha: the step size read off the value map (``"metric"``: ``W_V W_O = α W``), else 1.
        heads_orthogonal: whether the heads' subspaces are mutually orthogonal (descent guarantee, MATH §1.2).
    """

    satisfied: bool
    failures: list[str]
    measures: dict[str, Any]
    value: str
    alpha: float
    heads_orthogonal: bool

    def __str__(self) -> str:
        if self.satisfied:
            g = "guaranteed descent" if self.heads_orthogonal else "heads not orthogonal: descent not guaranteed"
            return f"constrained layer (value map: {self.value}, α = {self.alpha:.6g}; {g})"
        return "unconstrained layer:\n  - " + "\n  - ".join(self.failures)


def _rel(num: Tensor, den: Tensor) -> float:
    """``‖num‖_F / ‖den‖_F`` (the largest over leading batch dimensions)."""
    ratio = torch.linalg.matrix_norm(num) / torch.linalg.matrix_norm(den).clamp_min(1e-300)
    return float(ratio.max())


def _qk_products(w: AttentionWeights) -> Tensor:
    """``S_h = W_Q^h W_K^{hᵀ}``, ``(h, d, d)``."""
    return w.heads("W_Q") @ w.heads("W_K").transpose(-1, -2)


def _vo_products(w: AttentionWeights) -> Tensor:
    """``V_h = W_V^h W_O^h``, ``(h, d, d)``."""
    return w.heads("W_V") @ w.heads("W_O")


def _psd_factor(S: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Frobenius-nearest symmetric PSD matrix of rank ≤ ``rank`` to ``S`` and a factor ``F`` (``F Fᵀ``), per head."""
    lam, V = torch.linalg.eigh(0.5 * (S + S.transpose(-1, -2)))
    lam, V = lam[..., -rank:].clamp_min(0.0), V[..., -rank:]
    F = V * lam.sqrt().unsqueeze(-2)
    return F @ F.transpose(-1, -2), F


def check_layer(layer: Any, *, value: str = "identity", rtol: float | None = None) -> ConstraintReport:
    """Measure the constraints of MATH §1.7 on a standard layer (see the module docstring).

    Args:
        layer: ``nn.MultiheadAttention``, :class:`AttentionWeights` or a dict of reference weights.
        value: ``"identity"`` (step (a): ``W_V^h W_O^h = P_h``) or ``"metric"`` (step (b): ``W_V^h W_O^h = α W_h``).
        rtol: relative tolerance (default ``1e3·eps`` of the dtype, i.e. exact up to rounding).
    """
    if value not in _VALUES:
        raise EnergyInputError(f"`value` must be 'identity' (step (a)) or 'metric' (step (b)), got {value!r}.")
    w = _as_weights(layer)
    tol = 1e3 * torch.finfo(w.W_Q.dtype).eps if rtol is None else float(rtol)
    failures: list[str] = list(w.extras)
    measures: dict[str, Any] = {}
    for name in ("b_Q", "b_K", "b_V", "b_O"):
        b = getattr(w, name)
        if b is not None and float(b.abs().max()) > 0:
            measures[f"{name}_norm"] = float(b.norm())
            failures.append(f"bias {name} is non-zero (‖{name}‖ = {float(b.norm()):.3g}); energy steps have no bias "
                            "in the attention (set it to 0 or build the layer with bias=False)")
    S = _qk_products(w)
    asym = [_rel(0.5 * (s - s.T), s) for s in S]
    measures["qk_asymmetry"] = asym
    for h, a in enumerate(asym):
        if a > tol:
            failures.append(f"head {h}: W_Q W_Kᵀ is not symmetric: ‖asym‖/‖W‖ = {a:.3g} (needs W_Q W_Kᵀ = M Mᵀ, "
                            "e.g. W_Q = W_K)")
    sym = 0.5 * (S + S.transpose(-1, -2))
    lam = torch.linalg.eigvalsh(sym)
    scale = torch.linalg.matrix_norm(S, ord=2).clamp_min(1e-300)
    lam_min_rel = (lam[..., 0] / scale).tolist()
    measures["qk_lambda_min_rel"] = lam_min_rel
    for h, lm in enumerate(lam_min_rel):
        if lm < -tol:
            failures.append(f"head {h}: the symmetric part of W_Q W_Kᵀ is not PSD: λ_min/‖W‖ = {lm:.3g}")
    # value maps, against the PSD part of the query–key product (the layer's metric if constrained)
    _, F = _psd_factor(S, w.d_head)
    V = _vo_products(w)
    alpha = 1.0
    if value == "identity":
        if w.num_heads == 1:  # one head: identity values whatever the rank (AttentionEnergy.step, MATH §1.1(a))
            P = torch.eye(w.d, dtype=S.dtype, device=S.device).unsqueeze(0)
        else:
            U = head_bases(F)
            P = U @ U.transpose(-1, -2)
        dist = [_rel(v - p, p) for v, p in zip(V, P)]
        measures["value_distance"] = dist
        for h, dv in enumerate(dist):
            if dv > tol:
                target = "the identity" if w.num_heads == 1 else "the projector P_h onto range(M_h)"
                failures.append(f"head {h}: value/output map W_V W_O is not {target}: "
                                f"‖W_V W_O − P‖/‖P‖ = {dv:.3g}")
    else:
        Wm = metric(F, 1.0 / math.sqrt(w.d_head))
        num = (V * Wm).sum((-1, -2))
        den = (Wm * Wm).sum((-1, -2)).clamp_min(1e-300)
        c = num / den
        alpha = float(c.mean())
        dist = [_rel(v - alpha * wm, alpha * wm) if alpha != 0 else float("inf") for v, wm in zip(V, Wm)]
        measures["value_distance"] = dist
        measures["alpha_per_head"] = c.tolist()
        for h, dv in enumerate(dist):
            if dv > tol:
                failures.append(f"head {h}: value/output map W_V W_O is not α·W_h with one α for all heads "
                                f"(α = {alpha:.4g}): ‖W_V W_O − α W_h‖/‖α W_h‖ = {dv:.3g}")
    orthogonal = MultiHeadAttentionEnergy(F).heads_orthogonal() if w.num_heads > 1 else True
    return ConstraintReport(not failures, failures, measures, value, alpha, orthogonal)


# ---------------------------------------------------------------------------------------------- energy <-> layer


class EnergyStep:
    r"""The descent step a constrained layer reproduces: ``Y ↦ energy.step(Y, α, preconditioner=...)``.

    Attributes: ``energy``, ``alpha``, ``preconditioner`` (``"metric"`` for value map identity/projector, ``"token"``
    for value map tied to the metric), ``report``.
    """

    def __init__(self, energy: AttentionEnergy | MultiHeadAttentionEnergy, alpha: float, preconditioner: str,
                 report: ConstraintReport | None = None) -> None:
        self.energy, self.alpha, self.preconditioner, self.report = energy, alpha, preconditioner, report

    def __call__(self, Y: Tensor) -> Tensor:
        return self.energy.step(Y, self.alpha, preconditioner=self.preconditioner)

    def __repr__(self) -> str:
        return f"EnergyStep({type(self.energy).__name__}, alpha={self.alpha:g}, preconditioner={self.preconditioner!r})"


def to_energy(layer: Any, *, value: str = "identity", alpha: float | None = None,
              rtol: float | None = None) -> tuple[AttentionEnergy | MultiHeadAttentionEnergy, EnergyStep]:
    r"""The energy and descent step a constrained standard layer reproduces.

    ``value="identity"``: the step (a) :math:`Y^+ = Y R + \alpha\,\mathrm{MHA}_\beta(Y)`, ``α`` free (default 1);
    ``value="metric"``: the step (b), ``α`` read off ``W_V^h W_O^h = α W_h``.

    Returns:
        ``(energy, step)`` with ``energy`` an :class:`~energy.attention.AttentionEnergy` (one head) or
        :class:`~energy.attention.MultiHeadAttentionEnergy`, ``W_h = M_h M_hᵀ/√d_head``.

    Raises:
        ConstraintError: the layer violates a constraint; the message lists each violation with its size and points
            to :func:`nearest_constrained`.
    """
    report = check_layer(layer, value=value, rtol=rtol)
    if not report.satisfied:
        raise ConstraintError(
            f"{report}\nThis layer is not a descent step of an attention energy. "
            "unfold.converters.nearest_constrained(layer) gives the nearest constrained layer and the distance to it."
        )
    w = _as_weights(layer)
    S = _qk_products(w)
    same = bool(torch.equal(w.W_Q, w.W_K))
    M = w.heads("W_Q") if same else _psd_factor(S, w.d_head)[1]  # M_h M_hᵀ = W_Q^h W_K^{hᵀ}
    scale = 1.0 / math.sqrt(w.d_head)
    energy = AttentionEnergy(M[0], scale=scale) if w.num_heads == 1 else MultiHeadAttentionEnergy(M, scale=scale)
    if value == "identity":
        a = 1.0 if alpha is None else float(alpha)
        return energy, EnergyStep(energy, a, "metric", report)
    if alpha is not None and abs(alpha - report.alpha) > 1e-8 * max(1.0, abs(report.alpha)):
        raise EnergyInputError(f"`alpha` = {alpha} contradicts the layer's value map, which fixes α = {report.alpha}.")
    return energy, EnergyStep(energy, report.alpha, "token", report)


def _energy_of(obj: Any) -> tuple[AttentionEnergy | MultiHeadAttentionEnergy, float | None, str | None]:
    if isinstance(obj, EnergyStep):
        return obj.energy, obj.alpha, obj.preconditioner
    if isinstance(obj, AttentionStep):
        return obj.build(), float(obj.alpha), obj.preconditioner
    if isinstance(obj, (AttentionEnergy, MultiHeadAttentionEnergy)):
        return obj, None, None
    raise EnergyInputError(
        f"expected an AttentionEnergy, MultiHeadAttentionEnergy, AttentionStep or EnergyStep, got {type(obj).__name__}."
    )


def _M3(energy: AttentionEnergy | MultiHeadAttentionEnergy) -> Tensor:
    return energy.M.detach().unsqueeze(0) if energy.M.ndim == 2 else energy.M.detach()


def to_standard(energy_or_step: Any, *, preconditioner: str | None = None,
                batch_first: bool = True) -> nn.MultiheadAttention:
    r"""An ``nn.MultiheadAttention`` (no biases) whose output is the non-residual part of the energy's step.

    With ``d_head = d/h``: ``W_Q^h = W_K^h = c [M_h, 0]`` (zero-padded to ``d_head`` columns) with
    ``c² /√d_head = κ``, so ``softmax(W_Q^h W_K^{hᵀ}/√d_head)`` uses exactly ``W_h = κ M_h M_hᵀ``; value/output
    ``[U_h, 0]``, ``[U_h, 0]ᵀ`` (``P_h``) for the metric step, ``[M_h, 0]``, ``κ [M_h, 0]ᵀ`` (``W_h``) for the token
    step (one head, metric step: identity values). The step is then :func:`standard_step`
    ``= Y R + α MHA_β(Y)`` (see the module docstring).

    Raises:
        EnergyInputError: ``h`` does not divide ``d``, or a head's factor is wider than ``d_head`` with rank above it.
    """
    energy, _, prec = _energy_of(energy_or_step)
    preconditioner = preconditioner or prec or "metric"
    if preconditioner not in ("metric", "token"):
        raise EnergyInputError(f"`preconditioner` must be 'metric' or 'token', got {preconditioner!r}.")
    M = _M3(energy)
    h, d, k = M.shape
    if d % h:
        raise EnergyInputError(f"nn.MultiheadAttention needs num_heads | d; got h = {h}, d = {d}.")
    dh = d // h
    if k > dh:  # a wider factor is fine if its rank fits the head width
        _, M = _psd_factor(M @ M.transpose(-1, -2), dh)
        lost = _rel(M @ M.transpose(-1, -2) - _M3(energy) @ _M3(energy).transpose(-1, -2), _M3(energy) @ _M3(energy).mT)
        if lost > 1e3 * torch.finfo(M.dtype).eps:
            raise EnergyInputError(
                f"the energy's heads have factors of width k = {k} and rank > d_head = d/h = {dh}; an "
                "nn.MultiheadAttention head cannot represent them. Use k ≤ d/h (or fewer heads)."
            )
        k = dh
    kappa = energy.scale
    c = math.sqrt(kappa * math.sqrt(dh))

    def pad(A: Tensor) -> Tensor:  # (h, d, r) -> (h, d, dh)
        return torch.cat([A, A.new_zeros(h, d, dh - A.shape[-1])], dim=-1)

    Qh = pad(c * M)
    if preconditioner == "metric" and h == 1:
        eye = torch.eye(d, dtype=M.dtype, device=M.device).unsqueeze(0)
        Vh, Oh = eye, eye
    elif preconditioner == "metric":
        U = head_bases(M)
        Vh, Oh = pad(U), pad(U).transpose(-1, -2)
    else:
        Vh, Oh = pad(M), kappa * pad(M).transpose(-1, -2)

    def cat(A: Tensor) -> Tensor:  # (h, d, dh) -> (d, h·dh)
        return A.permute(1, 0, 2).reshape(d, h * dh)

    weights = AttentionWeights(cat(Qh), cat(Qh), cat(Vh), Oh.reshape(h * dh, d), h)
    return to_mha(weights, batch_first=batch_first)


def skip_map(energy_or_step: Any, alpha: float | None = None, preconditioner: str | None = None) -> Tensor:
    r"""The residual weight of the step (MATH §1.5): metric step ``R = (1 − α) I`` (one head) or
    ``I − α Σ_h P_h`` (heads); token step ``R = I − α Σ_h W_h``."""
    energy, a, prec = _energy_of(energy_or_step)
    alpha = a if alpha is None else alpha
    alpha = 1.0 if alpha is None else float(alpha)
    preconditioner = preconditioner or prec or "metric"
    M = _M3(energy)
    eye = torch.eye(M.shape[1], dtype=M.dtype, device=M.device)
    if preconditioner == "metric" and M.shape[0] == 1:
        return (1.0 - alpha) * eye
    if preconditioner == "metric":
        U = head_bases(M)
        return eye - alpha * (U @ U.transpose(-1, -2)).sum(0)
    return eye - alpha * metric(M, energy.scale).sum(0)


def key_bias_mask(Y: Tensor, energy_or_step: Any) -> Tensor:
    r"""Float ``attn_mask`` carrying the key bias ``β^h_j = −½‖y_j‖²_{W_h}`` for ``nn.MultiheadAttention``.

    Shape ``(B·h, n, n)`` (batch-major, the layout ``nn.MultiheadAttention`` expects); row ``i`` of head ``h`` of
    batch element ``b`` is ``β^h`` of that element. ``Y`` is ``(B, n, d)`` or ``(n, d)``.
    """
    energy, _, _ = _energy_of(energy_or_step)
    check_tensor(Y, "Y", min_ndim=2)
    Yb = Y if Y.ndim == 3 else Y.unsqueeze(0)
    if Yb.ndim != 3:
        raise EnergyInputError(f"`Y` must be (B, n, d) or (n, d) for nn.MultiheadAttention, got {tuple(Y.shape)}.")
    W = metric(_M3(energy), energy.scale)  # (h, d, d)
    beta = key_bias(Yb.unsqueeze(1), W)  # (B, h, n)
    B, h, n = beta.shape
    return beta.unsqueeze(-2).expand(B, h, n, n).reshape(B * h, n, n)


def standard_step(layer: nn.MultiheadAttention, Y: Tensor, energy_or_step: Any, *, alpha: float | None = None,
                  with_key_bias: bool = True) -> Tensor:
    r""":math:`Y R + \alpha\,\mathrm{MHA}(Y)` computed by the torch layer (``batch_first``), with the key bias as
    ``attn_mask`` (``with_key_bias=True``) or without it (the plain standard layer)."""
    energy, a, prec = _energy_of(energy_or_step)
    alpha = a if alpha is None else alpha
    alpha = 1.0 if alpha is None else float(alpha)
    Yb = Y if Y.ndim == 3 else Y.unsqueeze(0)
    mask = key_bias_mask(Yb, energy) if with_key_bias else None
    Yq = Yb if layer.batch_first else Yb.transpose(0, 1)
    out = layer(Yq, Yq, Yq, attn_mask=mask, need_weights=False)[0]
    out = out if layer.batch_first else out.transpose(0, 1)
    res = Yb @ skip_map(energy_or_step, alpha, prec) + alpha * out
    return res if Y.ndim == 3 else res.squeeze(0)


def nearest_constrained(layer: Any, *, value: str = "identity") -> tuple[nn.MultiheadAttention, dict[str, Any]]:
    r"""The nearest constrained layer and the distance to it.

    Per head: ``W_Q^h W_K^{hᵀ}`` → its Frobenius-nearest symmetric PSD matrix of rank ≤ ``d_head`` (symmetric part,
    negative eigenvalues clipped, top ``d_head`` kept — Higham's nearest PSD matrix plus Eckart–Young), factored as
    ``M_h M_hᵀ``; value/output map → ``P_h`` (``"identity"``) or ``α W_h`` with the least-squares ``α``
    (``"metric"``); biases → 0.

    Returns:
        ``(layer, info)``; ``info`` has per-head relative distances ``qk_distance`` (‖S − S*‖/‖S‖),
        ``value_distance``, the bias norms, and ``report`` (the :class:`ConstraintReport` of the input).
    """
    report = check_layer(layer, value=value)
    w = _as_weights(layer)
    S = _qk_products(w)
    S_star, F = _psd_factor(S, w.d_head)
    scale = 1.0 / math.sqrt(w.d_head)
    energy = AttentionEnergy(F[0], scale=scale) if w.num_heads == 1 else MultiHeadAttentionEnergy(F, scale=scale)
    nearest = to_standard(energy, preconditioner="metric" if value == "identity" else "token")
    if value == "metric":  # scale the value maps by the least-squares α
        with torch.no_grad():
            nearest.out_proj.weight.mul_(report.alpha)
    V = _vo_products(w)
    V_star = _vo_products(from_mha(nearest))
    info = {
        "qk_distance": [_rel(s - t, s) for s, t in zip(S, S_star)],
        "value_distance": [_rel(v - t, v) for v, t in zip(V, V_star)],
        "bias_norms": {n: float(getattr(w, n).norm()) for n in ("b_Q", "b_K", "b_V", "b_O")
                       if getattr(w, n) is not None},
        "alpha": report.alpha,
        "report": report,
    }
    return nearest, info


def verify_equivalence(layer: nn.MultiheadAttention, step: Any, Y: Tensor, *, alpha: float | None = None) -> dict:
    r"""Compare the torch layer with the energy step on ``Y`` (``(B, n, d)`` or ``(n, d)``).

    Returns a dict with ``max_abs_err`` (``Y R + α MHA_β(Y)`` via ``attn_mask`` vs the step), ``rel_err``,
    ``max_abs_err_without_key_bias`` (the plain layer, no mask), ``key_bias_spread`` (``max_j β_j − min_j β_j``,
    per batch element and head; 0 means the plain layer is exact) and ``equal_W_norms`` (whether that spread is at
    rounding level).
    """
    energy, a, prec = _energy_of(step)
    alpha = a if alpha is None else alpha
    alpha = 1.0 if alpha is None else float(alpha)
    prec = prec or "metric"
    with torch.no_grad():
        target = energy.step(Y, alpha, preconditioner=prec)
        with_mask = standard_step(layer, Y, step, alpha=alpha, with_key_bias=True)
        plain = standard_step(layer, Y, step, alpha=alpha, with_key_bias=False)
    mask = key_bias_mask(Y, energy)
    spread = float((mask.amax(-1) - mask.amin(-1)).max())
    err = float((with_mask - target).abs().max())
    return {
        "max_abs_err": err,
        "rel_err": err / max(float(target.abs().max()), 1e-300),
        "max_abs_err_without_key_bias": float((plain - target).abs().max()),
        "key_bias_spread": spread,
        "equal_W_norms": spread <= 1e3 * torch.finfo(Y.dtype).eps * max(1.0, float(mask.abs().max())),
        "alpha": alpha,
        "preconditioner": prec,
    }
