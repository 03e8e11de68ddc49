"""The interface every energy answers (DESIGN: "energy objects answer three questions").

An :class:`Energy` is a function ``E: R^{... × n × d} → R^{...}`` (one value per batch element) with

* ``energy(Y)``  – the value, per batch element;
* ``grad(Y)``    – the closed-form gradient ``∇_Y E`` (tests compare it with :meth:`Energy.autograd_grad`);
* ``step(Y, alpha)`` – the preconditioned descent step that reproduces a Transformer layer;
* ``step_range()`` – the step sizes for which ``E(step(Y, α)) ≤ E(Y)`` is guaranteed, and why.

The preconditioner linking ``grad`` and ``step`` is documented (and, where it is a matrix, returned) by each
subclass: ``step(Y, α) = Y − α P(Y)⁻¹ ∇E(Y)``. Energies may take further options after ``Y`` (e.g. the attention
energies' ``token_mask`` and ``preconditioner``); the base signatures say so with ``*args, **options``, which every
subclass narrows to the options it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from energy._validation import check_step_size

__all__ = ["Energy", "StepRange"]


@dataclass(frozen=True)
class StepRange:
    """Step sizes ``α`` for which a step is guaranteed not to increase its energy.

    The range is ``(low, high)``, or ``(low, high]`` when ``high_inclusive``. ``reason`` cites the
    guarantee (section of MATH.md and the hypothesis it needs).
    """

    low: float
    high: float
    reason: str
    high_inclusive: bool = False

    def __contains__(self, alpha: float) -> bool:
        return self.low < alpha and (alpha <= self.high if self.high_inclusive else alpha < self.high)

    def __str__(self) -> str:
        return f"({self.low:g}, {self.high:g}{']' if self.high_inclusive else ')'}  [{self.reason}]"

    def check(self, alpha: float | Tensor, name: str = "alpha") -> float | Tensor:
        """Warn (raise in :func:`~energy.strict_mode`) if ``alpha`` is outside the range; returns ``alpha``
        (see :func:`energy._validation.check_step_size`; a traced tensor ``alpha`` is not read).
        """
        return check_step_size(alpha, name, low=self.low, high=self.high, reason=self.reason,
                               high_inclusive=self.high_inclusive)


class Energy(torch.nn.Module):
    """Base class: subclasses implement :meth:`energy`, :meth:`grad`, :meth:`step` and :meth:`step_range`.

    Energies are ``nn.Module``s so that their weights can be registered as buffers or parameters and moved
    with ``.to()``; they hold no other state. ``forward`` is :meth:`energy`. Each method validates its
    arguments (it is a public entry) and then evaluates the pure core (:mod:`energy.core`).
    """

    def energy(self, Y: Tensor, *args: Any, **options: Any) -> Tensor:  # pragma: no cover - abstract
        """``E(Y)`` per batch element, shape ``Y.shape[:-2]``."""
        raise NotImplementedError

    def grad(self, Y: Tensor, *args: Any, **options: Any) -> Tensor:  # pragma: no cover - abstract
        """The closed-form gradient ``∇_Y E``, shape of ``Y``."""
        raise NotImplementedError

    def step(self, Y: Tensor, alpha: float = 1.0, *args: Any, **options: Any) -> Tensor:  # pragma: no cover
        """The preconditioned descent step ``Y − α P⁻¹∇E(Y)``."""
        raise NotImplementedError

    #: the guaranteed range of energies whose range is a constant (``step_range()`` returns it)
    RANGE: ClassVar[StepRange | None] = None

    def step_range(self, *args: Any, **options: Any) -> StepRange:
        """The step sizes for which :meth:`step` is guaranteed to descend (default: the constant ``RANGE``)."""
        if self.RANGE is None:  # pragma: no cover - abstract
            raise NotImplementedError
        return self.RANGE

    def forward(self, Y: Tensor, *args: Any, **options: Any) -> Tensor:
        return self.energy(Y, *args, **options)

    def autograd_grad(self, Y: Tensor, *args: Any, **options: Any) -> Tensor:
        """The autograd twin of :meth:`grad`: ``∇_Y Σ_batch E(Y)`` by reverse-mode AD of :meth:`energy` alone."""
        Y = Y.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.energy(Y, *args, **options).sum(), Y)
        return g
