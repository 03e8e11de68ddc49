r"""Constrained standard attention layers ↔ attention energies and their descent steps (MATH §1.1, §1.2, §1.7).

A standard multi-head attention layer (``nn.MultiheadAttention`` or reference weights ``W_Q, W_K, W_V, W_O``, right
acting, MATH §0) computes, head by head with ``d_head = d / h`` and ``κ = 1/√d_head``,

.. math:: \mathrm{MHA}(Y) = \sum_h \mathrm{softmax}(\kappa\, Y W_Q^h W_K^{h\top} Y^\top)\, Y W_V^h W_O^h .

It is (the non-residual part of) a descent step of the attention energy ``Σ_h E_h`` with ``W_h = κ M_h M_hᵀ`` iff

1. **query–key constraint**: ``W_Q^h W_K^{hᵀ}`` is symmetric PSD (then ``= M_h M_hᵀ``; e.g. ``W_Q = W_K``);
2. **value constraint**: ``W_V W_O = I`` for one head, ``W_V^h W_O^h = P_h`` (projector onto ``range(M_h)``) for
   several heads, for step (a) (``preconditioner=Preconditioner.METRIC``, identity values), or
   ``W_V^h W_O^h = α W_h`` for step (b) (``preconditioner=Preconditioner.TOKEN``, values tied to ``W``);
3. **no biases** (in/out projection biases, ``bias_k``/``bias_v``, ``add_zero_attn``).

Then, with the skip map ``R = I − α Σ_h V_h`` (``V_h`` the value/output product of the step: ``I`` for one head and
``P_h`` for several heads in (a), ``W_h`` in (b); so ``R = (1 − α) I`` for one head in (a)) — MATH §1.5, residual =
step size —

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

Real layers and blocks (:mod:`unfold.layer_diagnosis`): :func:`check_layer` also reads
``nn.TransformerEncoderLayer``, Hugging Face ``GPT2Attention``/``GPT2Block`` and LLaMA/Mistral-style attention,
and :class:`energy.hessian.multihead.MultiHeadAttentionLayer`, and reports what no weight change removes — a causal
mask (sized by :func:`causal_gap`), RoPE, linear attention, a fixed mask — and the block's normalisation placement,
skip map, FFN tie and dropout; :attr:`ConstraintReport.nearest` says where the nearest constrained layer is, or why
none exists.

Unconstrained layers: :func:`check_layer` reports every violated constraint with its size (e.g. "W_Q W_Kᵀ is not
symmetric: ‖asym‖/‖W‖ = 0.43") and :func:`nearest_constrained` returns the nearest constrained layer (Frobenius-nearest
symmetric PSD rank-``d_head`` part of each ``W_Q^h W_K^{hᵀ}``, value maps set to the constraint) and the distances.
Distances are measured on the products ``W_Q^h W_K^{hᵀ}`` and ``W_V^h W_O^h`` (the layer depends on the weights only
through them), relative to the original product. The weights themselves: :mod:`unfold.layer_weights` (re-exported).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from energy._attention_args import check_preconditioner
from energy._validation import ConstraintError, EnergyInputError, check_real, check_tensor
from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy
from energy.core import Preconditioner
from energy.core.attention import apply_step, head_gamma, head_keys, key_bias, metric, value_output_maps
from unfold.layer_diagnosis import Diagnosis, diagnose, probe_input, probe_text
from unfold.layer_weights import AttentionWeights, from_mha, to_mha
from unfold.steps import AttentionStep

__all__ = [
    "AttentionWeights",
    "ConstraintReport",
    "EnergyStep",
    "from_mha",
    "to_mha",
    "check_layer",
    "causal_gap",
    "nearest_constrained",
    "to_energy",
    "to_standard",
    "skip_map",
    "key_bias_mask",
    "standard_step",
    "verify_equivalence",
]

AttentionEnergyLike = AttentionEnergy | MultiHeadAttentionEnergy

# the converters' former step vocabulary (``value=``), kept for one release: value map -> preconditioner
_DEPRECATED_VALUES = {"identity": Preconditioner.METRIC, "metric": Preconditioner.TOKEN}


def _preconditioner(preconditioner: Preconditioner | str | None, value: str | None = None,
                    function: str = "") -> Preconditioner:
    """The step as a :class:`~energy.core.Preconditioner` (default METRIC), from ``preconditioner`` or the deprecated
    ``value`` (``"identity"`` -> METRIC, step (a); ``"metric"`` -> TOKEN, step (b)).
    """
    if value is not None:
        if value not in _DEPRECATED_VALUES:
            raise EnergyInputError(
                f"`value` must be 'identity' (step (a)) or 'metric' (step (b)), got {value!r}; `value` is deprecated: "
                "pass preconditioner='metric' (step (a)) or preconditioner='token' (step (b))."
            )
        new = _DEPRECATED_VALUES[value]
        warnings.warn(
            f"{function}(value={value!r}) is deprecated; use preconditioner={new.value!r} (the energies' name of the "
            "same step: value='identity' is preconditioner='metric', value='metric' is preconditioner='token').",
            DeprecationWarning,
            stacklevel=3,
        )
        if preconditioner is not None and _preconditioner(preconditioner) is not new:
            raise EnergyInputError(f"`value`={value!r} (deprecated) contradicts `preconditioner`={preconditioner!r}; "
                                   "pass only `preconditioner`.")
        return new
    return Preconditioner.METRIC if preconditioner is None else check_preconditioner(preconditioner)


def _value_output_factors(M: Tensor, scale: float, preconditioner: Preconditioner) -> tuple[Tensor, Tensor]:
    r"""Value and output maps ``(V_h (h, d, r), O_h (h, r, d))`` of the step on head factors ``M (h, d, k)``: the
    core's rule (:func:`energy.core.attention.value_output_maps`) with the identity made explicit for one head.

    .. math:: \text{(a)}\ V_h O_h = I\ (h = 1),\quad U_h U_h^\top = P_h\ (h > 1);\qquad
        \text{(b)}\ V_h O_h = M_h\,\kappa M_h^\top = W_h

    (MATH §1.1, §1.2); the skip map is then :math:`R = I - \alpha \sum_h V_h O_h` (MATH §1.5).
    """
    values, out = value_output_maps(M, scale, preconditioner, single=M.shape[0] == 1)
    if values is None or out is None:  # step (a), one head: identity values, no output map
        eye = torch.eye(M.shape[1], dtype=M.dtype, device=M.device).unsqueeze(0)
        return eye, eye
    return values, out


# ------------------------------------------------------------------------------------------------ constraint check


@dataclass
class ConstraintReport:
    """Which constraints a standard layer satisfies (MATH §1.7), measured.

    Attributes:
        satisfied: all constraints hold (within ``rtol``): the layer is a descent-step layer.
        failures: one human-readable line per violated constraint, with its size.
        measures: the numbers (per head): ``qk_asymmetry`` ‖asym‖/‖S‖, ``qk_lambda_min`` (relative), value-map
            distances, bias norms; where they apply ``causal_gap`` and ``probe`` (:func:`causal_gap`),
            ``rope_logit_change``, ``n_heads``/``n_kv_heads``, and for blocks ``norm_placement``,
            ``skip_mismatch``, ``ffn_alpha``, ``ffn_tie_distance``, ``ffn_activation``, the LayerNorm affine
            sizes and ``dropout`` (:mod:`unfold.layer_diagnosis`).
        preconditioner: the step whose value constraint was checked (``METRIC`` = step (a), identity values;
            ``TOKEN`` = step (b), values tied to ``W``).
        alpha: the step size read off the value map (step (b): ``W_V W_O = α W``), else 1.
        heads_orthogonal: whether the heads' subspaces are mutually orthogonal (descent guarantee, MATH §1.2).
        kind: the layer type that was checked.
        notes: structural facts that are not failures (grouped-query attention, Post-LN, inactive dropout).
        nearest: where the nearest constrained layer is (:func:`nearest_constrained`), or why none exists.
    """

    satisfied: bool
    failures: list[str]
    measures: dict[str, Any]
    preconditioner: Preconditioner
    alpha: float
    heads_orthogonal: bool
    kind: str = ""
    notes: list[str] = field(default_factory=list)
    nearest: str = ""

    @property
    def value(self) -> str:
        """Deprecated: the former name of the step (``"identity"`` = step (a), ``"metric"`` = step (b))."""
        warnings.warn("ConstraintReport.value is deprecated; use ConstraintReport.preconditioner ('metric' = step (a), "
                      "'token' = step (b)).", DeprecationWarning, stacklevel=2)
        return "identity" if self.preconditioner is Preconditioner.METRIC else "metric"

    def __str__(self) -> str:
        if self.satisfied:
            g = "guaranteed descent" if self.heads_orthogonal else "heads not orthogonal: descent not guaranteed"
            step = "(a), identity values" if self.preconditioner is Preconditioner.METRIC else "(b), values tied to W"
            head = f"constrained layer (step {step}; α = {self.alpha:.6g}; {g})"
        else:
            head = "unconstrained layer:\n  - " + "\n  - ".join(self.failures)
        of = f"{self.kind}: " if self.kind else ""
        notes = "".join(f"\n  note: {n}" for n in self.notes)
        nearest = f"\n  nearest constrained layer: {self.nearest}" if self.nearest and not self.satisfied else ""
        return of + head + notes + nearest


def _rel(num: Tensor, den: Tensor) -> float:
    """``‖num‖_F / ‖den‖_F`` (the largest over leading batch dimensions)."""
    ratio = torch.linalg.matrix_norm(num) / torch.linalg.matrix_norm(den).clamp_min(1e-300)
    return float(ratio.max())


def _psd_factor(S: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Frobenius-nearest symmetric PSD matrix of rank ≤ ``rank`` to ``S`` and a factor ``F`` (``F Fᵀ``), per head."""
    lam, V = torch.linalg.eigh(0.5 * (S + S.transpose(-1, -2)))
    lam, V = lam[..., -rank:].clamp_min(0.0), V[..., -rank:]
    F = V * lam.sqrt().unsqueeze(-2)
    return F @ F.transpose(-1, -2), F


def check_layer(layer: Any, *, causal: bool = False, preconditioner: Preconditioner | str | None = None,
                rtol: float | None = None, value: str | None = None) -> ConstraintReport:
    """Measure the constraints of MATH §1.7 on a standard layer or block (see the module docstring).

    Args:
        layer: ``nn.MultiheadAttention``, :class:`AttentionWeights`, a dict of reference weights,
            :class:`energy.hessian.multihead.MultiHeadAttentionLayer`, ``nn.TransformerEncoderLayer``, or a Hugging
            Face ``GPT2Attention``, ``GPT2Block`` or LLaMA/Mistral-style attention (:mod:`unfold.layer_diagnosis`).
        causal: the layer is applied with a causal mask (GPT-2 and LLaMA attention are causal regardless); the
            report then names the mask with its size, :func:`causal_gap` of the step of the layer's metric (the
            PSD part of ``W_Q^h W_K^{hᵀ}``: the layer's own when the weights are constrained).
        preconditioner: the step whose value constraint is checked: ``Preconditioner.METRIC`` (default, step (a):
            ``W_V^h W_O^h = P_h``, identity for one head) or ``Preconditioner.TOKEN`` (step (b):
            ``W_V^h W_O^h = α W_h``); plain strings ``"metric"``/``"token"`` are accepted.
        rtol: relative tolerance (default ``1e3·eps`` of the dtype, i.e. exact up to rounding).
        value: deprecated former name of the step (``"identity"`` = METRIC, ``"metric"`` = TOKEN).

    Raises:
        EnergyInputError: an unsupported ``layer`` (the message lists the supported types).
    """
    prec = _preconditioner(preconditioner, value, "check_layer")
    if rtol is not None:
        check_real(rtol, "rtol", what="(a relative tolerance)")
    if not isinstance(causal, bool):
        raise EnergyInputError(f"`causal` must be True or False (whether the layer is applied with a causal mask), "
                               f"got {causal!r}.")
    diag = diagnose(layer, causal=causal, rtol=rtol)
    w, tol = diag.weights, diag.tol
    failures: list[str] = list(w.extras)
    measures: dict[str, Any] = {}
    for name in ("b_Q", "b_K", "b_V", "b_O"):
        b = getattr(w, name)
        if b is not None and float(b.abs().max()) > 0:
            measures[f"{name}_norm"] = float(b.norm())
            failures.append(f"bias {name} is non-zero (‖{name}‖ = {float(b.norm()):.3g}); energy steps have no bias "
                            "in the attention (set it to 0 or build the layer with bias=False)")
    S = w.qk_products()
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
    V = w.vo_products()
    values, outputs = _value_output_factors(F, w.kappa, prec)
    target = values @ outputs  # (h, d, d): I / P_h (step (a)) or W_h (step (b))
    alpha = 1.0
    if prec is Preconditioner.TOKEN:  # W_V^h W_O^h = α W_h: the least-squares α per head, one α for the layer
        c = (V * target).sum((-1, -2)) / (target * target).sum((-1, -2)).clamp_min(1e-300)
        alpha = float(c.mean())
        measures["alpha_per_head"] = c.tolist()
    dist = [_rel(v - alpha * t, alpha * t) if alpha != 0 else float("inf") for v, t in zip(V, target)]
    measures["value_distance"] = dist
    for h, dv in enumerate(dist):
        if dv <= tol:
            continue
        if prec is Preconditioner.TOKEN:
            failures.append(f"head {h}: value/output map W_V W_O is not α·W_h with one α for all heads "
                            f"(α = {alpha:.4g}): ‖W_V W_O − α W_h‖/‖α W_h‖ = {dv:.3g}")
        else:
            name = "the identity" if w.num_heads == 1 else "the projector P_h onto range(M_h)"
            failures.append(f"head {h}: value/output map W_V W_O is not {name}: ‖W_V W_O − P‖/‖P‖ = {dv:.3g}")
    if diag.causal:
        gap = causal_gap(F, w.kappa, prec, alpha)
        measures["causal_gap"] = gap
        measures["probe"] = probe_text(w.d)
        failures.append(
            f"causal mask ({diag.measures['causal_source']}): a symmetric pairwise energy's step is not causal; "
            f"the causal layer differs from the energy step it would otherwise reproduce by "
            f"‖causal − step‖/‖step‖ = {gap:.3g} on {probe_text(w.d)} (no weight change removes this)")
    failures += diag.failures
    measures.update(diag.measures)
    orthogonal = MultiHeadAttentionEnergy(F).heads_orthogonal() if w.num_heads > 1 else True
    report = ConstraintReport(not failures, failures, measures, prec, alpha, orthogonal, diag.kind, diag.notes,
                              _nearest_text(diag))
    return report


def _nearest_text(diag: Diagnosis) -> str:
    """Where the nearest constrained layer is, or why none exists."""
    if diag.no_nearest:
        return ("none exists: " + "; ".join(diag.no_nearest) + ". The weights alone can be constrained: "
                "nearest_constrained(unfold.layer_diagnosis.diagnose(layer).weights) drops the structure above.")
    part = "" if diag.kind in ("nn.MultiheadAttention", "AttentionWeights", "dict", "MultiHeadAttentionLayer") else \
        " (of its attention; the block findings above are structure, not attention weights)"
    return f"unfold.converters.nearest_constrained(layer) returns it{part}"


def causal_gap(M: Tensor, scale: float, preconditioner: Preconditioner, alpha: float = 1.0,
               Y: Tensor | None = None) -> float:
    r"""``‖Y⁺_causal − Y⁺‖_F/‖Y⁺‖_F`` on ``Y`` ``(..., n, d)`` (default :func:`~unfold.layer_diagnosis.probe_input`):
    the energy step ``Y⁺`` of the heads ``M (h, d, k)`` against the same layer with a causal mask.

    The causal layer keeps the step's value maps, skip map and key bias and restricts the mixing to ``j ≤ i``:

    .. math:: A^{c}_h = \frac{\Gamma_h \circ T}{(\Gamma_h \circ T)\,\mathbf 1},\qquad
        Y^{c} = Y - \alpha\textstyle\sum_h (V_h - A^{c}_h V_h)\, O_h,

    with ``T`` the lower-triangular ones and ``Γ_h`` the Gaussian kernel of the energy (MATH §1.1, §1.2); without
    ``T`` this is :func:`energy.core.attention.apply_step` of the energy's step.
    """
    energy = _energy_from_factors(M, scale)
    if Y is None:
        Y = probe_input(M.shape[1], M.dtype, M.device)
    else:
        check_tensor(Y, "Y", min_ndim=2)
        if Y.shape[-1] != M.shape[1] or Y.dtype != M.dtype:
            raise EnergyInputError(f"`Y` must be (..., n, d) with d = {M.shape[1]} and dtype {M.dtype} (those of "
                                   f"`M`), got shape {tuple(Y.shape)} and dtype {Y.dtype}.")
    M3 = _M3(energy)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = energy.step(Y, alpha, preconditioner=preconditioner.value)
        K = head_keys(Y, M3)
        _, Gamma = head_gamma(K, energy.scale, energy.kernel, None)
        n = Y.shape[-2]
        Gc = Gamma * torch.ones(n, n, dtype=Y.dtype, device=Y.device).tril()
        A = Gc / Gc.sum(-1, keepdim=True)
        values, out = value_output_maps(M3, energy.scale, preconditioner, single=M3.shape[0] == 1)
        Vals = Y.unsqueeze(-3) if values is None else head_keys(Y, values)
        causal = apply_step(Y, A, Vals, out, alpha, None)
    return float((causal - target).norm() / target.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------- energy <-> layer


class EnergyStep:
    r"""The descent step a constrained layer reproduces: ``Y ↦ energy.step(Y, α, preconditioner=...)``.

    Attributes: ``energy``, ``alpha``, ``preconditioner`` (a :class:`~energy.core.Preconditioner`: ``METRIC`` =
    step (a), value map identity/projector; ``TOKEN`` = step (b), value map tied to the metric), ``report``.
    """

    def __init__(self, energy: AttentionEnergyLike, alpha: float, preconditioner: Preconditioner | str = "metric",
                 report: ConstraintReport | None = None) -> None:
        self.energy, self.alpha, self.report = energy, alpha, report
        self.preconditioner = _preconditioner(preconditioner)

    def __call__(self, Y: Tensor) -> Tensor:
        return self.energy.step(Y, self.alpha, preconditioner=self.preconditioner.value)

    def __repr__(self) -> str:
        return (f"EnergyStep({type(self.energy).__name__}, alpha={self.alpha:g}, "
                f"preconditioner={self.preconditioner.value!r})")


def _energy_from_factors(M: Tensor, scale: float) -> AttentionEnergyLike:
    """The energy with ``W_h = κ M_h M_hᵀ`` of head factors ``M (h, d, k)`` (one head: AttentionEnergy); ``κ`` the
    layer's scale (``1/√d_head``, the softmax(Q Kᵀ/√d_head) convention of nn.MultiheadAttention, by default).
    """
    return AttentionEnergy(M[0], scale=scale) if M.shape[0] == 1 else MultiHeadAttentionEnergy(M, scale=scale)


def to_energy(layer: Any, *, preconditioner: Preconditioner | str | None = None, alpha: float | None = None,
              rtol: float | None = None, value: str | None = None) -> tuple[AttentionEnergyLike, EnergyStep]:
    r"""The energy and descent step a constrained standard layer reproduces.

    ``preconditioner=Preconditioner.METRIC`` (default): the step (a)
    :math:`Y^+ = Y R + \alpha\,\mathrm{MHA}_\beta(Y)`, ``α`` free (default 1);
    ``preconditioner=Preconditioner.TOKEN``: the step (b), ``α`` read off ``W_V^h W_O^h = α W_h``.
    ``value`` is the deprecated former name of the step (``"identity"`` = METRIC, ``"metric"`` = TOKEN).

    Returns:
        ``(energy, step)`` with ``energy`` an :class:`~energy.attention.AttentionEnergy` (one head) or
        :class:`~energy.attention.MultiHeadAttentionEnergy`, ``W_h = M_h M_hᵀ/√d_head``.

    Raises:
        ConstraintError: the layer violates a constraint; the message lists each violation with its size and points
            to :func:`nearest_constrained`.
    """
    prec = _preconditioner(preconditioner, value, "to_energy")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha)):
        raise EnergyInputError(f"`alpha` must be a finite real number (the step size) or None, got {alpha!r}.")
    report = check_layer(layer, preconditioner=prec, rtol=rtol)
    if not report.satisfied:
        raise ConstraintError(
            f"{report}\nThis layer is not a descent step of an attention energy"
            + ("." if report.nearest.startswith("none") else "; unfold.converters.nearest_constrained(layer) gives "
               "the nearest constrained layer and the distance to it.")
        )
    w = diagnose(layer).weights
    same = bool(torch.equal(w.W_Q, w.W_K))
    M = w.heads("W_Q") if same else _psd_factor(w.qk_products(), w.d_head)[1]  # M_h M_hᵀ = W_Q^h W_K^{hᵀ}
    energy = _energy_from_factors(M, w.kappa)
    if prec is Preconditioner.METRIC:
        return energy, EnergyStep(energy, 1.0 if alpha is None else float(alpha), prec, report)
    if alpha is not None and abs(alpha - report.alpha) > 1e-8 * max(1.0, abs(report.alpha)):
        raise EnergyInputError(f"`alpha` = {alpha} contradicts the layer's value map, which fixes α = {report.alpha}.")
    return energy, EnergyStep(energy, report.alpha, prec, report)


def _energy_of(obj: Any, alpha: float | None = None,
               preconditioner: Preconditioner | str | None = None) -> tuple[AttentionEnergyLike, float, Preconditioner]:
    """``(energy, α, preconditioner)`` of an energy or a step; explicit ``alpha``/``preconditioner`` win, then the
    step's own, then ``α = 1`` and step (a).
    """
    own_alpha: float | None = None
    own_prec: Preconditioner | str | None = None
    if isinstance(obj, EnergyStep):
        energy, own_alpha, own_prec = obj.energy, obj.alpha, obj.preconditioner
    elif isinstance(obj, AttentionStep):
        built = obj.build()
        if not isinstance(built, (AttentionEnergy, MultiHeadAttentionEnergy)):  # a kernel other than Gaussian
            raise EnergyInputError(f"the AttentionStep builds a {type(built).__name__}; only softmax attention "
                                   "energies (AttentionEnergy, MultiHeadAttentionEnergy) are nn.MultiheadAttention.")
        energy, own_alpha, own_prec = built, float(obj.alpha), obj.preconditioner
    elif isinstance(obj, (AttentionEnergy, MultiHeadAttentionEnergy)):
        energy = obj
    else:
        raise EnergyInputError(
            f"expected an AttentionEnergy, MultiHeadAttentionEnergy, AttentionStep or EnergyStep, got "
            f"{type(obj).__name__}."
        )
    a = alpha if alpha is not None else own_alpha
    return energy, 1.0 if a is None else float(a), _preconditioner(preconditioner or own_prec)


def _M3(energy: AttentionEnergyLike) -> Tensor:
    return energy.M.detach().unsqueeze(0) if energy.M.ndim == 2 else energy.M.detach()


def to_standard(energy_or_step: Any, *, preconditioner: Preconditioner | str | None = None,
                batch_first: bool = True) -> nn.MultiheadAttention:
    r"""An ``nn.MultiheadAttention`` (no biases) whose output is the non-residual part of the energy's step.

    With ``d_head = d/h``: ``W_Q^h = W_K^h = c [M_h, 0]`` (zero-padded to ``d_head`` columns) with
    ``c² /√d_head = κ``, so ``softmax(W_Q^h W_K^{hᵀ}/√d_head)`` uses exactly ``W_h = κ M_h M_hᵀ``; value/output
    ``[U_h, 0]``, ``[U_h, 0]ᵀ`` (``P_h``) for step (a) (``Preconditioner.METRIC``; one head: identity values),
    ``[M_h, 0]``, ``κ [M_h, 0]ᵀ`` (``W_h``) for step (b) (``Preconditioner.TOKEN``). The step is then
    :func:`standard_step` ``= Y R + α MHA_β(Y)`` (see the module docstring). ``preconditioner`` defaults to the
    step's own, else METRIC.

    Raises:
        EnergyInputError: ``h`` does not divide ``d``, or a head's factor is wider than ``d_head`` with rank above it.
    """
    energy, _, prec = _energy_of(energy_or_step, preconditioner=preconditioner)
    M = _M3(energy)
    h, d, k = M.shape
    if d % h:
        raise EnergyInputError(f"nn.MultiheadAttention needs num_heads | d; got h = {h}, d = {d}.")
    dh = d // h
    if k > dh:  # a wider factor is fine if its rank fits the head width
        S = M @ M.transpose(-1, -2)
        _, M = _psd_factor(S, dh)
        if _rel(M @ M.transpose(-1, -2) - S, S) > 1e3 * torch.finfo(M.dtype).eps:
            raise EnergyInputError(
                f"the energy's heads have factors of width k = {k} and rank > d_head = d/h = {dh}; an "
                "nn.MultiheadAttention head cannot represent them. Use k ≤ d/h (or fewer heads)."
            )
    kappa = energy.scale
    c = math.sqrt(kappa * math.sqrt(dh))

    def cat(A: Tensor) -> Tensor:  # (h, d, r ≤ dh) -> zero-padded to (h, d, dh) -> (d, h·dh)
        A = torch.cat([A, A.new_zeros(h, d, dh - A.shape[-1])], dim=-1)
        return A.permute(1, 0, 2).reshape(d, h * dh)

    values, outputs = _value_output_factors(M, kappa, prec)
    W_O = cat(outputs.transpose(-1, -2)).T  # (h·dh, d)
    return to_mha(AttentionWeights(cat(c * M), cat(c * M), cat(values), W_O, h), batch_first=batch_first)


def skip_map(energy_or_step: Any, alpha: float | None = None,
             preconditioner: Preconditioner | str | None = None) -> Tensor:
    r"""The residual weight of the step (MATH §1.5): :math:`R = I - \alpha \sum_h V_h O_h` with the step's
    value/output maps, i.e. ``R = (1 − α) I`` (step (a), one head), ``I − α Σ_h P_h`` (step (a), heads) or
    ``I − α Σ_h W_h`` (step (b)).
    """
    energy, alpha_, prec = _energy_of(energy_or_step, alpha, preconditioner)
    M = _M3(energy)
    values, outputs = _value_output_factors(M, energy.scale, prec)
    eye = torch.eye(M.shape[1], dtype=M.dtype, device=M.device)
    return eye - alpha_ * (values @ outputs).sum(0)


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
                  with_key_bias: bool = True, preconditioner: Preconditioner | str | None = None) -> Tensor:
    r""":math:`Y R + \alpha\,\mathrm{MHA}(Y)` computed by the torch layer (``batch_first``), with the key bias as
    ``attn_mask`` (``with_key_bias=True``) or without it (the plain standard layer).
    """
    energy, alpha_, prec = _energy_of(energy_or_step, alpha, preconditioner)
    Yb = Y if Y.ndim == 3 else Y.unsqueeze(0)
    mask = key_bias_mask(Yb, energy) if with_key_bias else None
    Yq = Yb if layer.batch_first else Yb.transpose(0, 1)
    out = layer(Yq, Yq, Yq, attn_mask=mask, need_weights=False)[0]
    out = out if layer.batch_first else out.transpose(0, 1)
    res = Yb @ skip_map(energy, alpha_, prec) + alpha_ * out
    return res if Y.ndim == 3 else res.squeeze(0)


def nearest_constrained(layer: Any, *, preconditioner: Preconditioner | str | None = None,
                        value: str | None = None) -> tuple[nn.MultiheadAttention, dict[str, Any]]:
    r"""The nearest constrained layer and the distance to it.

    Per head: ``W_Q^h W_K^{hᵀ}`` → its Frobenius-nearest symmetric PSD matrix of rank ≤ ``d_head`` (symmetric part,
    negative eigenvalues clipped, top ``d_head`` kept — Higham's nearest PSD matrix plus Eckart–Young), factored as
    ``M_h M_hᵀ``; value/output map → ``P_h`` (step (a), ``Preconditioner.METRIC``, the default) or ``α W_h`` with
    the least-squares ``α`` (step (b), ``Preconditioner.TOKEN``); biases → 0. ``value`` is the deprecated former
    name of the step (``"identity"`` = METRIC, ``"metric"`` = TOKEN).

    Returns:
        ``(layer, info)``; ``info`` has per-head relative distances ``qk_distance`` (‖S − S*‖/‖S‖),
        ``value_distance``, the bias norms, and ``report`` (the :class:`ConstraintReport` of the input). For a
        block (``nn.TransformerEncoderLayer``, ``GPT2Block``) the layer is that of its attention.

    Raises:
        ConstraintError: none exists: a causal mask, RoPE, linear attention or a fixed mask (no weight change
            removes them); the message names them.
    """
    prec = _preconditioner(preconditioner, value, "nearest_constrained")
    diag = diagnose(layer)
    if diag.no_nearest:
        raise ConstraintError(
            f"{diag.kind}: no constrained layer exists: {'; '.join(diag.no_nearest)}. No change of the weights "
            "removes this; nearest_constrained(unfold.layer_diagnosis.diagnose(layer).weights) gives the nearest "
            "constrained layer of the attention weights alone (the structure dropped)."
        )
    report = check_layer(layer, preconditioner=prec)
    w = diag.weights
    S = w.qk_products()
    S_star, F = _psd_factor(S, w.d_head)
    nearest = to_standard(_energy_from_factors(F, w.kappa), preconditioner=prec)
    if prec is Preconditioner.TOKEN:  # scale the value maps by the least-squares α
        with torch.no_grad():
            nearest.out_proj.weight.mul_(report.alpha)
    V = w.vo_products()
    V_star = from_mha(nearest).vo_products()
    info = {
        "qk_distance": [_rel(s - t, s) for s, t in zip(S, S_star)],
        "value_distance": [_rel(v - t, v) for v, t in zip(V, V_star)],
        "bias_norms": {n: float(b.norm()) for n in ("b_Q", "b_K", "b_V", "b_O") if (b := getattr(w, n)) is not None},
        "alpha": report.alpha,
        "report": report,
    }
    return nearest, info


def verify_equivalence(layer: nn.MultiheadAttention, step: Any, Y: Tensor, *, alpha: float | None = None,
                       preconditioner: Preconditioner | str | None = None) -> dict[str, Any]:
    r"""Compare the torch layer with the energy step on ``Y`` (``(B, n, d)`` or ``(n, d)``).

    The step is ``step``'s own (α, preconditioner) unless given; a bare energy means ``α = 1``, step (a).

    Returns a dict with ``max_abs_err`` (``Y R + α MHA_β(Y)`` via ``attn_mask`` vs the step), ``rel_err``,
    ``max_abs_err_without_key_bias`` (the plain layer, no mask), ``key_bias_spread`` (``max_j β_j − min_j β_j``,
    per batch element and head; 0 means the plain layer is exact), ``equal_W_norms`` (whether that spread is at
    rounding level), ``alpha`` and ``preconditioner``.
    """
    energy, alpha_, prec = _energy_of(step, alpha, preconditioner)
    with torch.no_grad():
        target = energy.step(Y, alpha_, preconditioner=prec.value)
        with_mask = standard_step(layer, Y, energy, alpha=alpha_, with_key_bias=True, preconditioner=prec)
        plain = standard_step(layer, Y, energy, alpha=alpha_, with_key_bias=False, preconditioner=prec)
    mask = key_bias_mask(Y, energy)
    spread = float((mask.amax(-1) - mask.amin(-1)).max())
    err = float((with_mask - target).abs().max())
    return {
        "max_abs_err": err,
        "rel_err": err / max(float(target.abs().max()), 1e-300),
        "max_abs_err_without_key_bias": float((plain - target).abs().max()),
        "key_bias_spread": spread,
        "equal_W_norms": spread <= 1e3 * torch.finfo(Y.dtype).eps * max(1.0, float(mask.abs().max())),
        "alpha": alpha_,
        "preconditioner": prec,
    }
