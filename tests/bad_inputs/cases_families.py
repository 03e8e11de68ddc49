"""Bad inputs to the model families and their certificates (``unfold.families``, ``unfold.certificate``, the step-size
policies of ``unfold.step_base``, the new steps, ``python -m unfold train --family``; MATH §7)."""

from __future__ import annotations

import functools
import math

import torch

import unfold.__main__ as unfold_main
from unfold.certificate import descent_certificate
from unfold.energy_ffn import EnergyMLPStep
from unfold.families import build_classifier
from unfold.recurrent import RecurrentUnrolled
from unfold.sphere import SphereAttentionStep, SphereFFNStep
from unfold.standard import standard_encoder
from unfold.steps import AttentionStep, FFNStep

from ._case import FIX, Case, run_main
from ._gen import arg

d = 8
SIZES = {"d_in": 3, "d": d, "depth": 1, "heads": 2, "n_outputs": 2}
TRAIN = ["train", "--d", "8", "--depth", "1", "--steps", "1", "--quiet", "--task", "synthetic"]


def build(family: str, **kw: object) -> torch.nn.Module:
    return build_classifier(family, **{**SIZES, **kw})  # type: ignore[arg-type]


@functools.cache
def _x() -> torch.Tensor:
    return torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))


def cli(id: str, argv: list[str], match: tuple[str, ...]) -> Case:
    return Case(id, lambda: run_main(unfold_main.main, argv), match, cli=True, codes=(2,))


CASES: list[Case] = [
    # --- step-size ranges outside the guarantee (MATH §7.3) ----------------------------------------------------------
    Case("families:att_range-above-guarantee", lambda: build("learned_steps", att_range=(0.5, 2.5)),
         (arg("alpha_range"), r"outside.*guaranteed range", r"hi ≤ 2")),
    Case("families:ffn_range-above-guarantee", lambda: build("learned_steps", ffn_range=(0.1, 1.5)),
         (arg("alpha_range"), r"1\.02564", FIX)),
    Case("families:att_range-negative", lambda: build("learned_steps", att_range=(-0.5, 1.0)),
         (arg("alpha_range"), r"lo ≥ 0", FIX)),
    Case("families:att_range-reversed", lambda: build("learned_steps", att_range=(1.5, 0.5)),
         (arg("alpha_range"), r"lo < hi", FIX)),
    Case("families:att_range-nan", lambda: build("learned_steps", att_range=(0.1, math.nan)),
         (arg("alpha_range"), r"(?i)finite", FIX)),
    Case("families:att_range-not-a-pair", lambda: build("learned_steps", att_range=0.5),
         (arg("alpha_range"), r"pair", FIX)),
    Case("families:initial-alpha-outside-range", lambda: build("learned_steps", alpha_att=1.99),
         (arg("alpha"), r"inside alpha_range", FIX)),
    Case("AttentionStep:alpha_range-general-heads", lambda: AttentionStep(d, heads=2, alpha_range=(0.1, 1.0)),
         (arg("alpha_range"), r"no step size is guaranteed", r"orthogonal_heads=True|backtrack")),
    Case("AttentionStep:alpha_range-token-preconditioner",
         lambda: AttentionStep(d, preconditioner="token", alpha_range=(0.1, 1.0)),
         (arg("alpha_range"), r"depends on its weights", FIX)),
    Case("FFNStep:alpha_range-unconstrained-spectrum",
         lambda: FFNStep(d, spectrum=None, alpha=0.5, alpha_range=(0.1, 1.0)),
         (arg("alpha_range"), r"spectrum=\(lo, hi\)|backtrack", FIX)),
    Case("SphereAttentionStep:alpha_range-above-1", lambda: SphereAttentionStep(d, alpha_range=(0.1, 1.5)),
         (arg("alpha_range"), r"\(0, 1\]", FIX)),
    Case("SphereFFNStep:alpha_range-above-1/(1+hi)", lambda: SphereFFNStep(d, alpha_range=(0.1, 0.9)),
         (arg("alpha_range"), r"0\.512821", FIX)),
    Case("EnergyMLPStep:alpha_range-above-1", lambda: EnergyMLPStep(d, alpha_range=(0.1, 1.2)),
         (arg("alpha_range"), r"hi ≤ 1", FIX)),
    Case("FFNStep:backtrack-negative", lambda: FFNStep(d, backtrack=-1), (arg("backtrack"), r"≥ 0", FIX)),
    Case("FFNStep:spectrum_map-unknown", lambda: FFNStep(d, spectrum_map="soft"),
         (arg("spectrum_map"), r"'clip'|'smooth'")),
    Case("SphereAttentionStep:backtrack", lambda: SphereAttentionStep(d, backtrack=2),
         (arg("backtrack"), r"drop it")),
    Case("EnergyMLPStep:activation-unknown", lambda: EnergyMLPStep(d, activation="swish"),
         (arg("activation"), r"one of", r"gelu")),
    # --- heads that do not divide the width -------------------------------------------------------------------------
    Case("families:heads-not-dividing-d", lambda: build("orthogonal_heads", heads=3),
         (arg("heads"), r"does not divide the width d = 8", r"choose heads in \[1, 2, 4, 8\]")),
    Case("families:heads-zero", lambda: build("untied", heads=0), (arg("heads"), r"positive")),
    Case("families:heads-float", lambda: build("untied", heads=2.0), (arg("heads"), r"int")),
    Case("AttentionStep:heads-not-dividing-d", lambda: AttentionStep(d, heads=3),
         (arg("heads"), r"does not divide d = 8", FIX)),
    # --- families, options ---------------------------------------------------------------------------------------
    Case("families:unknown-family", lambda: build("yang"), (r"'yang'", r"valid families: .*untied")),
    Case("families:unknown-option", lambda: build("untied", tide=True), (r"tide", r"valid options")),
    Case("families:bool-option-str", lambda: build("untied", relu="no"), (arg("relu"), r"must be a bool")),
    Case("families:general-heads-mode", lambda: build("general_heads", mode="exact"),
         (arg("mode"), r"'backtrack' or 'bound'")),
    Case("RecurrentUnrolled:min_depth-above-max", lambda: RecurrentUnrolled(["attention"], 2, d, min_depth=3),
         (arg("min_depth"), r"\[1, max_depth = 2\]")),
    Case("RecurrentUnrolled:tol-nan", lambda: RecurrentUnrolled(["attention"], 2, d, tol=math.nan),
         (arg("tol"), r"(?i)finite")),
    Case("RecurrentUnrolled:no-energy", lambda: RecurrentUnrolled(["relu"], 2, d),
         (r"no energy step", r"needs an energy")),
    # --- certificates of models that cannot be certified -------------------------------------------------------------
    Case("descent_certificate:standard-encoder", lambda: descent_certificate(standard_encoder(d, 1, 2, 2, d_in=3),
                                                                             _x()),
         (arg("model"), r"not an energy model", r"build_classifier")),
    Case("descent_certificate:plain-module", lambda: descent_certificate(torch.nn.Linear(3, 3), _x()),
         (arg("model"), r"Linear.*not an energy model", FIX)),
    Case("descent_certificate:X-width", lambda: descent_certificate(build("untied"), torch.randn(2, 4, 5)),
         (arg("X"), r"(?i)width|shape")),
    Case("descent_certificate:X-unbatched", lambda: descent_certificate(build("untied"), torch.randn(4, 3)),
         (arg("X"), r"batch", FIX)),
    Case("descent_certificate:rtol-negative", lambda: descent_certificate(build("untied"), _x(), rtol=-1.0),
         (arg("rtol"), r"≥ 0")),
    # --- the command line ---------------------------------------------------------------------------------------
    cli("unfold-train:family-unknown", [*TRAIN, "--family", "yang"],
        (r"--family yang", r"valid families: .*yang2022_ln")),
    cli("unfold-train:family-with-preset-flag", [*TRAIN, "--family", "untied", "--no-relu"],
        (r"--no-relu", r"does not apply to --family", r"--option")),
    cli("unfold-train:family-heads-not-dividing", [*TRAIN, "--family", "untied", "--heads", "3"],
        (r"heads", r"does not divide", r"choose")),
    cli("unfold-train:family-range-outside", [*TRAIN, "--family", "learned_steps", "--option", "att_range=[0.1, 3]"],
        (r"alpha_range", r"outside.*guaranteed range", r"choose")),
    cli("unfold-train:option-malformed", [*TRAIN, "--family", "untied", "--option", "tied"],
        (r"--option", r"KEY=VALUE")),
    cli("unfold-train:option-without-family", [*TRAIN, "--option", "tied=false"],
        (r"--option", r"only for --family")),
]
