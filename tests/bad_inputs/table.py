"""All cases of the bad-input suite, by area."""

from __future__ import annotations

from . import cases_block, cases_cli, cases_energy, cases_families, cases_hessian, cases_unfold
from ._case import Case

AREAS: dict[str, list[Case]] = {
    "energy": cases_energy.CASES,
    "energy.hessian": cases_hessian.CASES,
    "energy.hessian (MATH §5: heads, LayerNorm/FFN, blocks)": cases_block.CASES,
    "unfold + paper_figs (API)": cases_unfold.CASES,
    "command lines": cases_cli.CASES,
    "unfold families and certificates (MATH §7)": cases_families.CASES,
}
ALL_CASES: list[Case] = [c for cases in AREAS.values() for c in cases]
