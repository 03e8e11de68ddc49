r"""Sums of energies, with each term's value reported separately (MATH §1.6).

.. math:: E(Y) = \sum_t E_t(Y), \qquad \nabla E(Y) = \sum_t \nabla E_t(Y).

A composite has a value and a gradient but **no step**: a Transformer layer descends *one term at a time*
(an attention step on :math:`E_{att}`, then an FFN step on :math:`E_{ffn}`, each with its own preconditioner and
step-size range). Those alternating steps are built by the unroller (``unfold``), and descent on each term does not
imply descent on the sum (MATH §1.6), so a composite reports every term (:meth:`CompositeEnergy.terms`) for the
energy trace instead of pretending to have a guaranteed step of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor

from energy._validation import EnergyInputError
from energy.base import Energy, StepRange

__all__ = ["CompositeEnergy"]

_NO_STEP = (
    "CompositeEnergy has no single descent step: a Transformer layer alternates steps on its terms (attention, "
    "then FFN, each with its own preconditioner and guaranteed range), and descent on each term does not imply "
    "descent on the sum (MATH §1.6). Call .step on the individual terms (composite[name].step(...)) or use the "
    "unroller in `unfold`, which records every term's energy per layer."
)


class CompositeEnergy(Energy):
    r"""A named sum of energies :math:`E = \sum_t E_t` (MATH §1.6).

    Args:
        terms: mapping ``name -> Energy`` (at least one term; names are non-empty strings without ``"."``).

    >>> import torch
    >>> from energy.attention import AttentionEnergy
    >>> E = CompositeEnergy({"att": AttentionEnergy(torch.eye(2)), "att2": AttentionEnergy(2 * torch.eye(2))})
    >>> sorted(E.terms(torch.zeros(3, 2)))
    ['att', 'att2']
    """

    def __init__(self, terms: Mapping[str, Energy]) -> None:
        super().__init__()
        if not isinstance(terms, Mapping) or len(terms) == 0:
            got = "an empty mapping" if isinstance(terms, Mapping) else type(terms).__name__
            raise EnergyInputError(
                "`terms` must be a non-empty mapping name -> Energy, e.g. {'att': AttentionEnergy(M), 'ffn': "
                f"FFNEnergy(W_f, b)}}, got {got}."
            )
        for name, term in terms.items():
            if not isinstance(name, str) or not name or "." in name:
                raise EnergyInputError(f"`terms` keys must be non-empty strings without '.', got {name!r}.")
            if not isinstance(term, Energy):
                raise EnergyInputError(
                    f"`terms[{name!r}]` must be an energy.base.Energy, got {type(term).__name__}."
                )
        self.components = torch.nn.ModuleDict(dict(terms))

    def _terms(self) -> list[tuple[str, Energy]]:
        return [(name, cast(Energy, term)) for name, term in self.components.items()]

    @property
    def names(self) -> list[str]:
        """The term names, in insertion order."""
        return list(self.components.keys())

    def __getitem__(self, name: str) -> Energy:
        if name not in self.components:
            raise KeyError(f"no term {name!r}; terms are {self.names}")
        return cast(Energy, self.components[name])

    def terms(self, Y: Tensor) -> dict[str, Tensor]:
        r"""Each term's value :math:`E_t(Y)` (per batch element), keyed by name."""
        return {name: term.energy(Y) for name, term in self._terms()}

    def energy(self, Y: Tensor) -> Tensor:
        r""":math:`E(Y) = \sum_t E_t(Y)`, per batch element."""
        values = list(self.terms(Y).values())
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total

    def grad(self, Y: Tensor) -> Tensor:
        r""":math:`\nabla E = \sum_t \nabla E_t` (each term's closed form)."""
        grads = [term.grad(Y) for _, term in self._terms()]
        total = grads[0]
        for g in grads[1:]:
            total = total + g
        return total

    def step(self, Y: Tensor, alpha: float = 1.0, *args: Any, **options: Any) -> Tensor:
        """Not defined for a composite; raises :class:`NotImplementedError` explaining why (MATH §1.6)."""
        raise NotImplementedError(_NO_STEP)

    def step_range(self, *args: Any, **options: Any) -> StepRange:
        """Not defined for a composite; raises :class:`NotImplementedError` explaining why (MATH §1.6)."""
        raise NotImplementedError(_NO_STEP)
