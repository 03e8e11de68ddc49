"""energy: objectives whose descent steps are Transformer layers, and their curvature.

See MATH.md (shipped as docs/MATH.md) for the formulas each function implements.
"""

from energy._validation import (
    ConstraintError,
    EnergyInputError,
    StepSizeError,
    StepSizeWarning,
    is_strict,
    strict_mode,
)

__all__ = [
    "ConstraintError",
    "EnergyInputError",
    "StepSizeError",
    "StepSizeWarning",
    "is_strict",
    "strict_mode",
]
