"""Helpers shared by the test files: ``from _helpers import DT, randn`` (pytest puts ``tests/`` on ``sys.path``).

Fixtures shared by the test files (``seed``, ``gen``, the one-thread autouse fixture) are in ``conftest.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DT", "randn"]

#: The dtype of every correctness test (float64 first).
DT = torch.float64


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = DT) -> Tensor:
    """``torch.randn(*shape)`` drawn from the test's seeded generator ``gen``, float64 unless told otherwise."""
    return torch.randn(*shape, generator=gen, dtype=dtype)
