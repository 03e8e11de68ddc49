"""Former module path of :mod:`unfold.training` (renamed: ``unfold.train`` is also the function :func:`train`,
which :mod:`unfold` re-exports, so the module could not be reached as ``unfold.train`` after ``import unfold``).

``from unfold.train import X`` keeps working for every public name; new code imports from :mod:`unfold.training`.
"""

from __future__ import annotations

from unfold import training
from unfold.training import *  # noqa: F403  (every public name of unfold.training)

__all__: list[str] = []
__all__ += training.__all__
