r"""The models of the constraint-cost study (MATH §1.7): the standard encoder and every certified family, built at
equal parameter counts, and the energy statistics of a trained unfolded model.

* ``standard`` — :func:`unfold.standard.standard_encoder` (``nn.TransformerEncoderLayer`` × depth, unconstrained
  ``W_Q, W_K, W_V, W_O``, ``W_1, W_2`` with ``d_ff = 4d``, post-LN, residuals, untied);
* every family of :data:`unfold.families.FAMILIES`, built by :func:`unfold.families.build_classifier`.

All share the input map ``d_in → d`` and the mean-pool + linear head. :func:`match_width` chooses, for a target
parameter count (that of the standard encoder of a given width), the width ``d`` of a family whose count
(:func:`unfold.presets.parameter_count`, the trainable scalars) is closest to the target; the families have far
fewer scalars per width (tied weights, one ``M`` for ``W_Q W_Kᵀ``, no value/output maps, symmetric ``W_f``), so at
equal parameters they are wider.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from energy._validation import ConstraintError, EnergyInputError
from unfold.families import FAMILIES, build_classifier, descent_certificate
from unfold.presets import parameter_count
from unfold.standard import standard_encoder
from unfold.unroller import Unrolled

__all__ = [
    "STANDARD",
    "SINGLE_HEAD",
    "model_names",
    "heads_for",
    "certifiable",
    "build_model",
    "match_width",
    "certificate",
    "energy_trace_summary",
]

STANDARD = "standard"
#: families kept at one head, as in the paper (Yang et al. 2022): with several heads their attention step is a sum of
#: general heads without a guarantee (MATH §1.2), and the orthogonal-head families cover several heads.
SINGLE_HEAD = frozenset({"yang2022", "yang2022_ln"})


def model_names() -> list[str]:
    """``"standard"`` followed by every family of :data:`unfold.families.FAMILIES` (in its order)."""
    return [STANDARD, *FAMILIES]


def _check_name(name: str) -> None:
    if name not in model_names():
        raise EnergyInputError(f"unknown model {name!r}; valid models: {', '.join(model_names())}.")


def heads_for(name: str, heads: int) -> int:
    """The head count the study gives model ``name`` when asked for ``heads`` (1 for :data:`SINGLE_HEAD`)."""
    _check_name(name)
    return 1 if name in SINGLE_HEAD else heads


def certifiable(name: str) -> bool:
    """Whether ``name`` is a family whose every step carries a descent guarantee (``FamilySpec.certifiable``)."""
    _check_name(name)
    return name != STANDARD and FAMILIES[name].certifiable


def build_model(name: str, *, d_in: int, n_outputs: int, d: int, depth: int, heads: int) -> nn.Module:
    """The model ``name`` (``"standard"`` or a family) with width ``d``, ``depth`` layers and ``heads`` heads."""
    _check_name(name)
    if name == STANDARD:
        return standard_encoder(d, depth, heads, n_outputs, d_in=d_in)
    return build_classifier(name, d_in=d_in, d=d, depth=depth, heads=heads, n_outputs=n_outputs)


def _count(name: str, d_in: int, n_outputs: int, d: int, depth: int, heads: int, attempts: int = 5) -> int:
    """The parameter count at width ``d`` (it does not depend on the values: a build that a constraint check refuses
    at initialisation, e.g. a float32 factorisation just outside its tolerance, is retried with another seed).
    """
    for attempt in range(attempts):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(attempt)
            try:
                net = build_model(name, d_in=d_in, n_outputs=n_outputs, d=d, depth=depth, heads=heads)
            except ConstraintError:
                if attempt == attempts - 1:
                    raise
                continue
        return parameter_count(net)
    raise AssertionError("unreachable")


def _match_heads(name: str, target: int, d_in: int, n_outputs: int, depth: int, heads: int,
                 max_width: int) -> dict[str, Any]:
    count: dict[int, int] = {}

    def at(m: int) -> int:
        if m not in count:
            count[m] = _count(name, d_in, n_outputs, heads * m, depth, heads)
        return count[m]

    hi = 1
    while at(hi) < target:  # doubling, so that no model much wider than needed is built
        if heads * hi >= max_width:
            raise EnergyInputError(f"model {name!r} has only {at(hi)} parameters at width {heads * hi} < target "
                                   f"{target}; lower the target size or raise `max_width`.")
        hi = min(2 * hi, max(1, max_width // heads))
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:  # the first m with count(m) >= target (the count grows with the width)
        mid = (lo + hi) // 2
        if at(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    m = lo if lo == 1 or abs(at(lo) - target) <= abs(at(lo - 1) - target) else lo - 1
    return {"d": heads * m, "heads": heads, "parameters": at(m), "target": target,
            "relative_gap": at(m) / target - 1.0}


def match_width(name: str, target: int, *, d_in: int, n_outputs: int, depth: int, heads: int,
                tolerance: float = 0.03, max_width: int = 4096) -> dict[str, Any]:
    """The width ``d`` (and head count) whose parameter count is closest to ``target``.

    With ``h = heads_for(name, heads)`` heads, the widths are the multiples of ``h``; the count grows with ``d``, so
    a doubling search and a bisection over ``d = h·m`` find the first count ≥ ``target``, and the closer of it and
    its predecessor is taken. When the step from one multiple of ``h`` to the next is too coarse (the relative gap
    exceeds ``tolerance``, e.g. an untied family whose count grows fast with ``d``), one head is tried as well and
    the closer match is returned.

    Returns:
        ``{"d", "heads", "parameters", "target", "relative_gap"}`` with ``relative_gap = parameters/target − 1``.

    Raises:
        EnergyInputError: ``target`` is not a positive integer, or no width up to ``max_width`` reaches it.
    """
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise EnergyInputError(f"`target` must be a positive integer (a parameter count), got {target!r}.")
    h = heads_for(name, heads)
    best = _match_heads(name, target, d_in, n_outputs, depth, h, max_width)
    if abs(best["relative_gap"]) > tolerance and h > 1:
        one = _match_heads(name, target, d_in, n_outputs, depth, 1, max_width)
        if abs(one["relative_gap"]) < abs(best["relative_gap"]):
            best = one
    return best


def certificate(model: nn.Module, X: Tensor) -> dict[str, Any]:
    """:func:`unfold.families.descent_certificate` of ``model`` on ``X`` as a dict (without the per-input trace).

    The per-layer energies of every input are summarised by their mean (``energy_per_layer``, from the certificate)
    and their standard deviation (``energy_per_layer_std``), and the share of inputs whose total energy decreased
    over every layer (``monotone_share``). Non-finite energies (an energy unbounded below reached ``-inf``) are kept
    as such (Python's JSON writes them as ``-Infinity``): a diverging trace is recorded, not hidden.
    """
    cert = descent_certificate(model, X)
    out: dict[str, Any] = json.loads(json.dumps(asdict(cert)))
    out.pop("energy_per_layer_per_example")
    out["certified"] = cert.certified
    per_example = torch.tensor(cert.energy_per_layer_per_example, dtype=torch.float64)  # (inputs, depth + 1)
    out["energy_per_layer_std"] = per_example.std(0, correction=0).tolist()
    out["monotone_share"] = float((per_example[:, 1:] < per_example[:, :-1]).all(1).double().mean())
    out["summary"] = cert.summary()
    return out


@torch.no_grad()
def energy_trace_summary(model: nn.Module, X: Tensor) -> dict[str, Any]:
    """Energy along a (trained) unfolded classifier on the inputs ``X``.

    Returns the mean total energy at every layer boundary (``E(Y⁰), E(Y^1 layer), …``), the fraction of
    (layer, example) pairs where the total energy decreased over a layer, the fraction of examples whose energy after
    the last layer is below the initial one, and, per step kind, the fraction of (step, example) pairs where the
    step decreased its own term (attention → ``E_att``, FFN → ``E_ffn``) and the total.
    """
    body = getattr(model, "body", None)
    if not isinstance(body, Unrolled):
        raise EnergyInputError(f"`model` must be an unfolded classifier (an Unrolled `body`, e.g. unfold.yang2022), "
                               f"got a {type(model).__name__}.")
    _, info = model(X, trace=True)
    E = info["energies"]
    S = len(body.schedule)
    total = E["total"]
    boundaries = total[::S]  # states at the start of every layer and the output
    layer_dec = (boundaries[1:] < boundaries[:-1]).double()
    own = {"attention": "E_att", "ffn": "E_ffn"}
    per_step: dict[str, dict[str, float]] = {}
    for kind in sorted(set(info["step_names"])):
        idx = [t for t, s in enumerate(info["step_names"]) if s == kind]
        entry = {"total_decreased": float((total[[t + 1 for t in idx]] < total[idx]).double().mean())}
        if kind in own:
            term = E[own[kind]]
            entry["own_term_decreased"] = float((term[[t + 1 for t in idx]] <= term[idx] + 1e-6 * term[idx].abs()
                                                 ).double().mean())
        per_step[kind] = entry
    return {
        "mean_energy_per_layer": boundaries.mean(-1).tolist(),
        "layer_decrease_fraction": float(layer_dec.mean()),
        "layer_decrease_fraction_per_layer": layer_dec.mean(-1).tolist(),
        "final_below_initial_fraction": float((boundaries[-1] < boundaries[0]).double().mean()),
        "per_step": per_step,
    }
