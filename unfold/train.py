"""Former module path of :mod:`unfold.training` (renamed: ``unfold.train`` is also the function :func:`train`,
which :mod:`unfold` re-exports, so the module could not be reached as ``unfold.train`` after ``import unfold``).

``from unfold.train import X`` keeps working for every public name; new code imports from :mod:`unfold.training`.
"""

from __future__ import annotations

from unfold.training import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    TrainResult,
    accuracy,
    evaluate,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    train,
    validate_state_dict,
)

__all__ = [
    "CheckpointError",
    "TrainResult",
    "train",
    "evaluate",
    "accuracy",
    "make_optimizer",
    "save_checkpoint",
    "load_checkpoint",
    "validate_state_dict",
    "CHECKPOINT_FORMAT",
]
