"""The pure functional core: every equation of docs/MATH.md once, free of validation, warnings and value reads."""

from energy.core.preconditioner import Preconditioner

__all__ = ["Preconditioner"]
