"""The pure functional core: every equation of docs/MATH.md once, free of validation, warnings and value reads.

Modules: :mod:`energy.core.attention` (κ, W, z, β, softmax_β, Γ, the pairwise energy, its gradient and steps
(a)/(b) with their value/output maps, MATH §1.1–§1.2), :mod:`energy.core.fused` (the same step through
scaled-dot-product attention), :mod:`energy.core.standard` (softmax and linear multi-head attention, MATH §3.1,
§3.6), :mod:`energy.core.ffn` (feed-forward maps and energies, MATH §1.3, §1.5), :mod:`energy.core.norm`
(LayerNorm, RMSNorm, the sphere projections, MATH §1.4, §2.2), :mod:`energy.core.preconditioner` (the step enum).
"""

from energy.core.preconditioner import Preconditioner

__all__ = ["Preconditioner"]
