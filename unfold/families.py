r"""Model families of unfolded Transformers, each with a stated descent guarantee (MATH §7).

>>> import torch
>>> from unfold.families import FAMILIES, build_classifier
>>> "yang2022" in FAMILIES and FAMILIES["untied"].certifiable
True
>>> model = build_classifier("untied", d_in=3, d=8, depth=2, heads=2, n_outputs=4)
>>> logits, info = model(torch.randn(5, 6, 3), trace=True)
>>> tuple(logits.shape), tuple(info["energies"]["total"].shape)
((5, 4), (7, 5))

Every family builds an :class:`~unfold.presets.UnrolledClassifier` (input map, unrolled body, mean pool, linear
head): ``forward(X)`` gives the logits, ``forward(X, trace=True)`` the logits and the body's trace with the per-step
energies, so :func:`unfold.train.train` trains every family and :func:`unfold.certificate.descent_certificate`
certifies it. :data:`FAMILIES` states, for each family, what every step guarantees; ``certifiable`` says whether
*every* step carries a guarantee (the certificate then reports violations only if the guarantee fails numerically).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from energy._validation import EnergyInputError, check_positive_int
from unfold.certificate import Certificate, descent_certificate
from unfold.presets import UnrolledClassifier, yang2022
from unfold.recurrent import RecurrentUnrolled
from unfold.unroller import Unrolled

__all__ = ["FamilySpec", "FAMILIES", "build_classifier", "descent_certificate", "Certificate", "family_names",
           "ATTENTION_RANGE", "FFN_RANGE"]

#: default learnable step-size interval of the attention step (a), inside its guaranteed (0, 2) (MATH §1.1, §7.3)
ATTENTION_RANGE = (0.05, 1.95)
#: default learnable step-size interval of the FFN step with spectrum [0, 0.95], inside (0, 2/1.95) (MATH §1.3)
FFN_RANGE = (0.05, 1.0)


@dataclass(frozen=True)
class FamilySpec:
    """A model family: how to build it and what it guarantees.

    Attributes:
        name: the family's name (the key of :data:`FAMILIES`, ``--family`` on the command line).
        description: one line.
        guarantee: the stated descent guarantee of every step, in words, with its MATH section.
        certifiable: whether every step carries a guarantee (else the certificate marks the others "none").
        options: the family's keyword options of :func:`build_classifier` and their defaults.
    """

    name: str
    description: str
    guarantee: str
    certifiable: bool
    options: dict[str, Any] = field(default_factory=dict)
    build: Callable[..., UnrolledClassifier] | None = field(default=None, repr=False, compare=False)


def _heads_kwargs(heads: int, orthogonal: bool) -> dict[str, Any]:
    return {"heads": heads, "orthogonal_heads": orthogonal and heads > 1}


def _yang(d_in: int, d: int, depth: int, heads: int, n_outputs: int, o: dict[str, Any], *, tied: bool,
          orthogonal: bool, normalization: str | None = None) -> UnrolledClassifier:
    return yang2022(d, depth, relu=o["relu"], d_in=d_in, n_classes=n_outputs, tied=tied, fused=o["fused"],
                    normalization=normalization, norm_eps=1e-5, spectrum_map=o["spectrum_map"],
                    **_heads_kwargs(heads, orthogonal))


def _build_yang2022(d_in: int, d: int, depth: int, heads: int, n_outputs: int, **o: Any) -> UnrolledClassifier:
    return _yang(d_in, d, depth, heads, n_outputs, o, tied=True, orthogonal=False)


def _build_yang2022_ln(d_in: int, d: int, depth: int, heads: int, n_outputs: int, **o: Any) -> UnrolledClassifier:
    return _yang(d_in, d, depth, heads, n_outputs, o, tied=True, orthogonal=False, normalization="layernorm")


def _build_untied(d_in: int, d: int, depth: int, heads: int, n_outputs: int, **o: Any) -> UnrolledClassifier:
    return _yang(d_in, d, depth, heads, n_outputs, o, tied=False, orthogonal=True)


def _build_orthogonal(d_in: int, d: int, depth: int, heads: int, n_outputs: int, **o: Any) -> UnrolledClassifier:
    return _yang(d_in, d, depth, heads, n_outputs, o, tied=o["tied"], orthogonal=True)


def _schedule(attention: dict[str, Any], ffn: dict[str, Any], relu: bool) -> list[Any]:
    out: list[Any] = [("attention", attention), ("ffn", ffn)]
    return out + ["relu"] if relu else out


def _classifier(schedule: list[Any], depth: int, d: int, d_in: int, n_outputs: int, tied: bool) -> UnrolledClassifier:
    return UnrolledClassifier(Unrolled(schedule, depth, d, tied=tied), d_in=d_in, n_classes=n_outputs)


def _build_general(d_in: int, d: int, depth: int, heads: int, n_outputs: int, **o: Any) -> UnrolledClassifier:
    ffn = {"spectrum_map": o["spectrum_map"]}
    if o["mode"] == "bound":
        att: Any = ("majorised_attention", {"heads": heads, "alpha": o["eta"]})
        schedule = [att, ("ffn", ffn)] + (["relu"] if o["relu"] else [])
        return _classifier(schedule, depth, d, d_in, n_outputs, o["tied"])
    if o["mode"] != "backtrack":
        raise EnergyInputError(f"family 'general_heads': option `mode` must be 'backtrack' or 'bound', got "
                               f"{o['mode']!r}.")
    att = {"heads": heads, "fused": o["fused"], "backtrack": o["backtrack"]}
    return _classifier(_schedule(att, ffn, o["relu"]), depth, d, d_in, n_outputs, o["tied"])


def _build_learned(d_in: int, d: int, depth: int, heads: int, n_outputs: int, **o: Any) -> UnrolledClassifier:
    att = {**_heads_kwargs(heads, True), "fused": o["fused"], "learn_alpha": True, "alpha_range": o["att_range"],
           "alpha": o["alpha_att"]}
    ffn = {"learn_alpha": True, "alpha_range": o["ffn_range"], "alpha": o["alpha_ffn"],
           "spectrum_map": o["spectrum_map"]}
    return _classifier(_schedule(att, ffn, o["relu"]), depth, d, d_in, n_outputs, o["tied"])


def _build_sphere(d_in: int, d: int, depth: int, heads: int, n_outputs: int, **o: Any) -> UnrolledClassifier:
    att: dict[str, Any] = {"heads": heads, "alpha": o["eta"]}
    if o["ffn"] not in ("quadratic", "mlp"):
        raise EnergyInputError(f"family 'sphere': option `ffn` must be 'quadratic' (E_ffn, §1.3) or 'mlp' (E_mlp, "
                               f"§7.4), got {o['ffn']!r}.")
    if o["ffn"] == "mlp":
        ffn: tuple[str, dict[str, Any]] = ("sphere_mlp", {"activation": o["activation"], "hidden": o["hidden"]})
        top = 1.0
    else:
        ffn, top = ("sphere_ffn", {"spectrum_map": o["spectrum_map"]}), 1.0 / 1.95
    if o["learn_steps"]:  # α = lo + (hi − lo)σ(a) starts strictly inside its interval
        att.update(learn_alpha=True, alpha_range=(0.05, 1.0), alpha=min(o["eta"], 0.95))
        ffn[1].update(learn_alpha=True, alpha_range=(0.05, top), alpha=0.5 * top)
    return _classifier([("sphere_attention", att), ffn], depth, d, d_in, n_outputs, o["tied"])


def _build_recurrent(d_in: int, d: int, depth: int, heads: int, n_outputs: int, **o: Any) -> UnrolledClassifier:
    att = {**_heads_kwargs(heads, True), "fused": o["fused"]}
    ffn = {"spectrum_map": o["spectrum_map"]}
    body = RecurrentUnrolled(_schedule(att, ffn, o["relu"]), depth, d, tol=o["tol"], min_depth=o["min_depth"])
    return UnrolledClassifier(body, d_in=d_in, n_classes=n_outputs)


def _build_energy_ffn(d_in: int, d: int, depth: int, heads: int, n_outputs: int, **o: Any) -> UnrolledClassifier:
    att = {**_heads_kwargs(heads, True), "fused": o["fused"]}
    mlp = {"hidden": o["hidden"], "activation": o["activation"], "alpha": o["omega"]}
    return _classifier([("attention", att), ("tied_mlp", mlp)], depth, d, d_in, n_outputs, o["tied"])


#: options every family with a yang2022-style FFN step has; the new families use the smooth spectrum map (every
#: eigen-direction of W_f keeps a gradient, MATH §7.3), the paper's two keep the reference code's clip
_COMMON = {"relu": True, "fused": True, "spectrum_map": "smooth"}
_PAPER = {"relu": True, "fused": True, "spectrum_map": "clip"}

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            "yang2022",
            "Yang et al. (2022): weight-tied attention step (a) and FFN step with α = 1, ReLU.",
            "attention: exact MM step, α = 1 ∈ (0, 2) (MATH §1.1(a), one head; several heads are general heads, "
            "no guarantee, MATH §1.2); FFN + ReLU: projected gradient step on E_ffn + ι_{≥0}, α = 1 < 2/1.95 "
            "(MATH §1.3).",
            True, dict(_PAPER), _build_yang2022),
        FamilySpec(
            "yang2022_ln",
            "yang2022 plus a LayerNorm projection (no affine, eps 1e-5) at the end of every layer.",
            "attention: as yang2022; FFN + ReLU + LayerNorm: none (projection onto a non-convex set, MATH §1.4).",
            False, dict(_PAPER), _build_yang2022_ln),
        FamilySpec(
            "untied",
            "yang2022 with one set of weights per layer (several heads: orthogonal heads).",
            "every layer's steps as yang2022's (the guarantee is per step, so untying keeps it; orthogonal heads, "
            "MATH §7.2).",
            True, dict(_COMMON), _build_untied),
        FamilySpec(
            "orthogonal_heads",
            "several heads on mutually orthogonal subspaces (W_h = Q_h R_h R_hᵀ Q_hᵀ), tied or untied.",
            "attention: exact MM step per head subspace, α ∈ (0, 2) (MATH §7.2); FFN + ReLU as yang2022.",
            True, {**_COMMON, "tied": True}, _build_orthogonal),
        FamilySpec(
            "general_heads",
            "several unconstrained heads: the attention step backtracks on its energy (mode='backtrack', α halved "
            "≤ K times) or takes the per-token majoriser step (mode='bound').",
            "attention: backtracking, E_att(Y⁺) ≤ E_att(Y) enforced per input, or a step η ∈ (0, 2) of the per-token "
            "curvature bound μ_i = Σ_h D^h_ii λ_max(W_h) (MATH §7.2); FFN + ReLU as yang2022.",
            True, {**_COMMON, "tied": True, "mode": "backtrack", "backtrack": 4, "eta": 1.0}, _build_general),
        FamilySpec(
            "learned_steps",
            "learnable step sizes α = lo + (hi − lo)σ(a) inside the guaranteed ranges (orthogonal heads).",
            f"attention: exact MM step with α ∈ {ATTENTION_RANGE} ⊂ (0, 2); FFN + ReLU: projected gradient with "
            f"α ∈ {FFN_RANGE} ⊂ (0, 2/1.95) (MATH §7.3).",
            True, {**_COMMON, "tied": True, "att_range": ATTENTION_RANGE, "ffn_range": FFN_RANGE,
                   "alpha_att": 1.0, "alpha_ffn": 0.9}, _build_learned),
        FamilySpec(
            "sphere",
            "hyperspherical: tokens on ‖y_i‖ = √d, attention and FFN as normalised MM steps (Hyper-SET-like).",
            "attention: MM step on the sphere with η ∈ (0, 1], any heads (μ_i = Σ_h D^h_ii λ_max(W_h)); FFN: "
            "normalised gradient step, α ∈ (0, 1/1.95] (ffn='quadratic') or α = ω/L(W), ω ∈ (0, 1] (ffn='mlp', "
            "E_mlp of §7.4) (MATH §7.5); the first step projects onto the sphere.",
            True, {"tied": True, "eta": 1.0, "learn_steps": False, "spectrum_map": "smooth", "ffn": "quadratic",
                   "activation": "relu", "hidden": None}, _build_sphere),
        FamilySpec(
            "sphere_mlp",
            "sphere with the two-matrix FFN energy (tied W_2 = Wᵀ, anchor b): family 'sphere' with ffn='mlp'.",
            "attention: MM step on the sphere, η ∈ (0, 1], any heads; FFN: normalised gradient step on E_mlp with "
            "α = ω/L(W), ω ∈ (0, 1] (MATH §7.4, §7.5).",
            True, {"tied": True, "eta": 1.0, "learn_steps": False, "spectrum_map": "smooth", "ffn": "mlp",
                   "activation": "relu", "hidden": None}, _build_sphere),
        FamilySpec(
            "recurrent",
            "one weight-tied layer iterated until the energy's relative decrease falls below tol (depth = max).",
            "every step as yang2022 with orthogonal heads; the stopping rule reports the depth used per input "
            "(MATH §7.6).",
            True, {**_COMMON, "tol": 1e-3, "min_depth": 1}, _build_recurrent),
        FamilySpec(
            "energy_ffn",
            "attention step + a two-matrix FFN with tied W_2 = Wᵀ and skip, the gradient step of an anchored energy.",
            "attention: exact MM step (MATH §1.1); FFN: gradient step with α = ω·2/L, L = 1 + s₋‖W‖₂² computed from "
            "the weights (relu/sigmoid: L = 1; gelu: a bound) (MATH §7.4).",
            True, {"fused": True, "tied": True, "hidden": None, "activation": "relu", "omega": 0.5},
            _build_energy_ffn),
    )
}


def family_names() -> list[str]:
    """The valid family names, sorted."""
    return sorted(FAMILIES)


def build_classifier(family: str, *, d_in: int, d: int, depth: int, heads: int, n_outputs: int,
                     **options: Any) -> UnrolledClassifier:
    """Build a classifier of ``family`` (:data:`FAMILIES`): input map ``d_in → d``, ``depth`` layers, ``heads``
    attention heads, a mean pool and a linear head with ``n_outputs`` outputs.

    Args:
        family: a name of :data:`FAMILIES`.
        d_in: input feature width.
        d: token width (``heads`` must divide it).
        depth: number of layers (the maximal depth for a recurrent family).
        heads: attention heads.
        n_outputs: outputs of the head (classes).
        **options: the family's options (``FAMILIES[family].options`` lists them with their defaults).

    Raises:
        EnergyInputError: unknown family or option, a width or head count that does not fit, a step-size range
            outside the guarantee.
    """
    if not isinstance(family, str) or family not in FAMILIES:
        raise EnergyInputError(f"unknown family {family!r}; valid families: {', '.join(family_names())}.")
    spec = FAMILIES[family]
    for name, v in (("d_in", d_in), ("d", d), ("depth", depth), ("heads", heads), ("n_outputs", n_outputs)):
        check_positive_int(v, name)
    if d % heads:
        divisors = [h for h in range(1, d + 1) if d % h == 0]
        raise EnergyInputError(f"`heads` = {heads} does not divide the width d = {d} (each head needs d/heads "
                               f"features); choose heads in {divisors} or a width d divisible by {heads}.")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise EnergyInputError(f"family {family!r} has no option(s) {unknown}; valid options: "
                               f"{sorted(spec.options) or 'none'}.")
    for name, value in options.items():
        if isinstance(spec.options[name], bool) and not isinstance(value, bool):
            raise EnergyInputError(f"family {family!r}: option `{name}` must be a bool (True or False), got "
                                   f"{value!r}.")
    assert spec.build is not None
    model = spec.build(d_in, d, depth, heads, n_outputs, **{**spec.options, **options})
    model.family = family
    return model
