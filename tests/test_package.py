"""The package namespace of unfold: built from the submodules' own public lists, no module shadowed by a function."""

from __future__ import annotations

import importlib
import types

import unfold
from energy.core import Preconditioner


def test_unfold_train_is_the_module():
    """``import unfold.train`` and ``unfold.train`` are the training module (its loop: ``unfold.train.train``)."""
    module = importlib.import_module("unfold.train")
    assert isinstance(unfold.train, types.ModuleType) and unfold.train is module
    assert callable(unfold.train.train) and unfold.evaluate is module.evaluate
    assert "train" not in unfold.__all__


def test_all_is_the_union_of_the_submodules_lists():
    names = unfold.__all__
    assert len(names) == len(set(names))
    assert all(hasattr(unfold, n) for n in names)
    for sub in (unfold.steps, unfold.unroller, unfold.parametrizations, unfold.presets, unfold.standard,
                unfold.converters):
        assert set(sub.__all__) <= set(names), sub.__name__
        assert all(getattr(unfold, n) is getattr(sub, n) for n in sub.__all__)
    assert unfold.Preconditioner is Preconditioner and "Preconditioner" in names
