r"""Descent certificates of unfolded models (MATH §7.1): which step carries which guarantee, and what was measured.

>>> import torch
>>> from unfold.families import build_classifier
>>> from unfold.certificate import descent_certificate
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = build_classifier("yang2022", d_in=3, d=8, depth=2, heads=1, n_outputs=2).double()
>>> cert = descent_certificate(model, torch.randn(4, 5, 3, dtype=torch.float64))
>>> cert.guaranteed_share, cert.violations
(1.0, 0)

A *certified step* is one energy step together with the projections that follow it in the schedule (the FFN step
and its ReLU form one projected-gradient step). For every certified step of every layer the certificate records

* the guarantee (:meth:`unfold.step_base.Step.guarantee`): ``"mm"`` (an exact majorisation–minimisation step inside
  the guaranteed range), ``"gradient"``, ``"bound"`` (``α`` inside a range computed from the weights),
  ``"backtracking"`` (the forward enforces the decrease) or ``"none"`` — with its statement and MATH section;
* the measured change of the step's own energy term on every input, ``E(Y⁺) − E(Y)``: the term of the layer that acts,
  plus the indicator of the constraint set when the group projects onto one (``ι_{≥0}`` for ReLU, the sphere for the
  hyperspherical steps: the term is ``+∞`` at an infeasible input, so the first projection counts as a decrease);
* *violations*: guaranteed steps whose term increased by more than ``rtol`` relative to ``max(|E(Y)|, |E(Y⁺)|, s)``
  (``s``: :meth:`~unfold.step_base.Step.rounding_scale`, the size of what the term is computed from — for attention
  the ``n·h/2`` diagonal kernel values, so that a tiny energy's rounding is not an increase); increases of
  unguaranteed steps are counted separately (nothing was promised).

A LayerNorm / RMSNorm projection after a step removes the group's guarantee (the sphere is not convex, MATH §1.4),
except for the hyperspherical family, whose steps are themselves constrained steps with a descent statement
(MATH §7.5). A ReLU keeps it only after a (per-token scaled) gradient step inside its range — the projected-gradient
argument — not after an MM step in another metric or a backtracking step (whose test precedes the projection).
The model energy (the sum of the terms) along the layers is reported as a trace (mean and per input); it is not
certified (MATH §1.6: descent on each term does not imply descent on the sum).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from energy._io import finite_json
from energy._validation import EnergyInputError, check_real
from unfold.step_base import Step
from unfold.unroller import Unrolled

__all__ = ["StepCertificate", "Certificate", "descent_certificate", "GUARANTEE_KINDS"]

#: the guarantee kinds, strongest first
GUARANTEE_KINDS = ("mm", "gradient", "bound", "backtracking", "none")

#: projections onto a non-convex set: a group containing one has no guarantee (MATH §1.4)
_NONCONVEX = ("layernorm", "rmsnorm")


@dataclass(frozen=True)
class StepCertificate:
    """One certified step (an energy step and its projections) of one layer, measured on the inputs.

    Attributes:
        layer: layer index ``ℓ``.
        position: schedule index of the group's first step.
        steps: the step kinds of the group (e.g. ``("ffn", "relu")``).
        term: the energy term the guarantee is about (``None`` for a lone projection).
        guarantee: one of :data:`GUARANTEE_KINDS`.
        statement: the guarantee in words (MATH section, step size, range) or why there is none.
        alpha: the step size at certification (``None`` for a projection).
        increases: inputs on which the term increased (beyond ``rtol``).
        violations: ``increases`` of a guaranteed step (0 for ``"none"``).
        max_rel_increase: largest relative increase ``ΔE / max(|E(Y)|, |E(Y⁺)|)`` over the inputs (0 if none).
        mean_change: mean of ``E(Y⁺) − E(Y)`` over the inputs with a finite ``E(Y)``.
        unchanged: inputs the step left exactly as they were (a backtracking step that found no descent, a stopped
            input of a recurrent model).
    """

    layer: int
    position: int
    steps: tuple[str, ...]
    term: str | None
    guarantee: str
    statement: str
    alpha: float | None
    increases: int
    violations: int
    max_rel_increase: float
    mean_change: float
    unchanged: int = 0


@dataclass(frozen=True)
class Certificate:
    """The descent certificate of a model on inputs ``X`` (see the module docstring).

    Attributes:
        model: class name of the model.
        family: family name (``None`` if the model was not built by :func:`unfold.families.build_classifier`).
        n_inputs: number of inputs.
        rtol: relative tolerance of a measured increase.
        steps: one :class:`StepCertificate` per certified step and layer.
        guaranteed_share: share of ``steps`` with a guarantee (not ``"none"``).
        violations: total violations (guaranteed steps × inputs with an increase).
        max_rel_violation: the largest relative increase of a guaranteed step (0 if none).
        worst: where that happened (``layer``, ``position``, ``steps``) or ``None``.
        unguaranteed_increases: increases of steps without a guarantee.
        energy_per_layer: mean total energy at the layer boundaries ``t = 0, S, …`` (``depth + 1`` values).
        energy_per_layer_per_example: the same per input (``n_inputs`` rows).
        depth_used: layers used per input (recurrent models) or ``None``.
    """

    model: str
    family: str | None
    n_inputs: int
    rtol: float
    steps: tuple[StepCertificate, ...]
    guaranteed_share: float
    violations: int
    max_rel_violation: float
    worst: dict[str, Any] | None
    unguaranteed_increases: int
    energy_per_layer: tuple[float, ...]
    energy_per_layer_per_example: tuple[tuple[float, ...], ...]
    depth_used: tuple[int, ...] | None = None

    @property
    def certified(self) -> bool:
        """Every step carries a guarantee and none was violated."""
        return self.guaranteed_share == 1.0 and self.violations == 0

    def to_json(self, *, per_example: bool = True) -> str:
        """The certificate as JSON (``per_example=False`` drops the per-input energy trace)."""
        out = asdict(self)
        out["certified"] = self.certified
        if not per_example:
            out.pop("energy_per_layer_per_example")
        return json.dumps(finite_json(out), indent=1, allow_nan=False)  # a non-finite energy is written as null

    def summary(self) -> str:
        """One line: share of guaranteed steps, violations, worst relative increase."""
        return (f"{self.model}{f' ({self.family})' if self.family else ''}: {100 * self.guaranteed_share:.0f}% of "
                f"steps guaranteed, {self.violations} violations (max rel. {self.max_rel_violation:.2e}), "
                f"{self.unguaranteed_increases} increases of unguaranteed steps, on {self.n_inputs} inputs")


def _energy_body(model: object) -> tuple[Unrolled, Any, Any]:
    """``(body, embed, classifier)`` of an energy model; a clear error for anything else."""
    from unfold.presets import UnrolledClassifier

    if isinstance(model, UnrolledClassifier):
        return model.body, model.embed, model
    if isinstance(model, Unrolled):
        return model, (lambda X: X), model
    raise EnergyInputError(
        f"`model` is a {type(model).__name__}, which is not an energy model: a descent certificate needs an "
        "unfold.Unrolled body whose steps descend energies (an UnrolledClassifier or Unrolled, e.g. from "
        "unfold.families.build_classifier); a standard encoder has no energy, so it cannot be certified."
    )


def _groups(kinds: list[str], terms: list[str | None]) -> list[tuple[int, int]]:
    """Schedule index ranges ``[j0, j1)``: an energy step with the projections that follow it."""
    out: list[tuple[int, int]] = []
    for j, term in enumerate(terms):
        if term is not None or not out:
            out.append((j, j + 1))
        else:
            out[-1] = (out[-1][0], j + 1)
    return out


def _infeasible(step: Step, group_kinds: list[str], Y: Tensor) -> Tensor:
    """Per input: whether ``Y`` lies outside the group's constraint set (the indicator is ``+∞`` there)."""
    bad = torch.zeros(Y.shape[:-2], dtype=torch.bool, device=Y.device)
    if "relu" in group_kinds[1:]:
        bad = bad | (Y < 0).flatten(-2).any(-1)
    outside = getattr(step, "outside_constraint", None)
    if outside is not None:
        bad = bad | outside(Y)
    return bad


def _measure(Eb: Tensor, Ea: Tensor, infeasible: Tensor, rtol: float, floor: float) -> tuple[int, float, float]:
    """``(increases, max relative increase, mean change)`` over the inputs with a finite, feasible ``E(Y)``; an
    increase is relative to ``max(|E(Y)|, |E(Y⁺)|, floor)`` (``floor``: :meth:`Step.rounding_scale`).
    """
    ok = ~infeasible & torch.isfinite(Eb)
    delta = Ea - Eb
    scale = torch.maximum(Eb.abs(), Ea.abs()).clamp_min(max(floor, torch.finfo(Eb.dtype).tiny))
    rel = torch.where(ok, delta / scale, torch.zeros_like(delta))
    inc = rel > rtol
    n_ok = int(ok.sum())
    mean = float(torch.where(ok, delta, torch.zeros_like(delta)).sum()) / n_ok if n_ok else 0.0
    return int(inc.sum()), max(float(rel.max()), 0.0) if rel.numel() else 0.0, mean


def descent_certificate(model: nn.Module, X: Tensor, *, rtol: float | None = None) -> Certificate:
    r"""The descent certificate of ``model`` on the inputs ``X`` (module docstring; MATH §7.1).

    Args:
        model: an :class:`~unfold.presets.UnrolledClassifier` (any family of :mod:`unfold.families`) or an
            :class:`~unfold.unroller.Unrolled` body.
        X: inputs ``(batch, n, d_in)`` (the classifier's inputs; the body's tokens for an ``Unrolled``).
        rtol: relative tolerance of a measured increase (default ``1000·eps`` of the model's dtype).

    Raises:
        EnergyInputError: ``model`` is not an energy model (e.g. the standard encoder), or ``X`` does not fit it.
    """
    body, embed, top = _energy_body(model)
    if rtol is not None:
        rtol = check_real(rtol, "rtol", what="(relative tolerance of an energy increase)")
    with torch.no_grad():
        Y0 = embed(X)
        if Y0.ndim != 3:
            raise EnergyInputError(f"`X` must be a batch of sequences (batch, n, d_in), got shape {tuple(X.shape)}; "
                                   "add a batch dimension (X.unsqueeze(0)).")
        tol = 1e3 * torch.finfo(Y0.dtype).eps if rtol is None else rtol
        _, info = body(Y0, trace="step")
        states: list[Tensor] = info["states"]
        kinds: list[str] = list(body.step_kinds)
        S = len(kinds)
        depth = (len(states) - 1) // S
        prepared = body._prepare()
        entries: list[StepCertificate] = []
        for ell in range(depth):
            li = 0 if body.tied else ell
            steps = body._steps(li)
            for j0, j1 in _groups(kinds, [s.term for s in steps]):
                entries.append(_certify_group(steps, prepared[li], j0, j1, kinds[j0:j1], ell,
                                              states[ell * S + j0], states[ell * S + j1], tol))
        totals = info["energies"].get("total")
        per_layer = totals[::S] if totals is not None else torch.zeros(depth + 1, Y0.shape[0], dtype=Y0.dtype)
        depth_used = info.get("depth_used")
    guaranteed = [e for e in entries if e.guarantee != "none"]
    worst = max(guaranteed, key=lambda e: e.max_rel_increase, default=None)
    worst_at = None
    if worst is not None and worst.violations:
        worst_at = {"layer": worst.layer, "position": worst.position, "steps": list(worst.steps),
                    "guarantee": worst.guarantee, "max_rel_increase": worst.max_rel_increase}
    return Certificate(
        model=type(top).__name__,
        family=getattr(top, "family", None),
        n_inputs=int(Y0.shape[0]),
        rtol=float(tol),
        steps=tuple(entries),
        guaranteed_share=len(guaranteed) / len(entries) if entries else 0.0,
        violations=sum(e.violations for e in entries),
        max_rel_violation=max((e.max_rel_increase for e in guaranteed if e.violations), default=0.0),
        worst=worst_at,
        unguaranteed_increases=sum(e.increases for e in entries if e.guarantee == "none"),
        energy_per_layer=tuple(per_layer.mean(-1).tolist()),
        energy_per_layer_per_example=tuple(tuple(row) for row in per_layer.T.tolist()),
        depth_used=None if depth_used is None else tuple(int(v) for v in depth_used.tolist()),
    )


def _certify_group(steps: list[Step], prepared: list[Any], j0: int, j1: int, group_kinds: list[str], ell: int,
                   before: Tensor, after: Tensor, tol: float) -> StepCertificate:
    base = steps[j0]
    if base.term is None:  # a projection without a preceding energy step: nothing to measure it on
        return StepCertificate(ell, j0, tuple(group_kinds), None, "none",
                               f"the {base.kind} projection has no energy term and no preceding step (MATH §1.4)",
                               None, 0, 0, 0.0, 0.0, _unchanged(before, after))
    kind, statement = base.guarantee()
    broken = [k for k in group_kinds[1:] if k in _NONCONVEX]
    if broken and kind != "none":
        kind, statement = "none", (f"{statement}; but followed by the {broken[0]} projection onto a non-convex set: "
                                   "no descent guarantee (MATH §1.4)")
    elif "relu" in group_kinds[1:] and kind != "none":
        if base.projection_compatible and kind != "backtracking":
            statement += "; with the ReLU: a projected gradient step on the term + ι_{≥0} (MATH §1.3, §7.1)"
        else:
            kind, statement = "none", (f"{statement}; but followed by a ReLU projection, which keeps the guarantee of "
                                       "a (per-token scaled) gradient step only, not of this step (MATH §7.1)")
    Eb = cast(Tensor, base.energy_at(prepared[j0], before))
    Ea = cast(Tensor, base.energy_at(prepared[j0], after))
    increases, max_rel, mean = _measure(Eb, Ea, _infeasible(base, group_kinds, before), tol,
                                        base.rounding_scale(before))
    return StepCertificate(ell, j0, tuple(group_kinds), base.term, kind, statement, base.current_alpha(), increases,
                           increases if kind != "none" else 0, max_rel, mean, _unchanged(before, after))


def _unchanged(before: Tensor, after: Tensor) -> int:
    """Inputs whose tokens the step left exactly as they were."""
    return int((before == after).flatten(-2).all(-1).sum())
