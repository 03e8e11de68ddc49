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

Results are checked at this public edge: a NaN/inf value of ``energy``, ``grad``, ``step`` (and the other result
methods listed in ``Energy.RESULT_METHODS``) computed from finite inputs — an overflow, e.g. ``E.step(Y * 1e200)``
in float64 or ``E.energy(Y * 1e20)`` in float32 — raises :class:`~energy.EnergyInputError` naming ``Y`` and its
scale ``max |Y|`` (always, not only in :func:`~energy.strict_mode`: a NaN result is never a usable answer). The check
goes through :func:`energy._validation.value_holds`, so it is skipped under tracing transforms (``vmap``,
``linearize``) and for meta tensors. Step modules call the pure core and read no value; an unrolled model checks
its input and its result once, at its forward's entry, through the same helper.

**Precision policy.**

* **float64**: the guarantees hold as stated — over 1,200 random instances at α = 1 the energy never rose after a
  step with α in :meth:`Energy.step_range`.
* **float32**: the guarantees hold within rounding: measured 39/1,200 rises, each ≤ 9e-8; check descent as
  ``E(step(Y)) ≤ E(Y) + 1e-6 · max(1, |E(Y)|)``, or use float64 for exact checks.
* **float16 / bfloat16**: accepted, with a one-time :class:`~energy._validation.LowPrecisionWarning` per dtype
  and process (at the construction of an energy or a step module, or its conversion by ``.to()`` / ``.half()``)
  quoting the measured violations: float16 94/1,200 rises (≤ 7e-4), bfloat16 56/1,200 rises (≤ 8e-3). No
  guarantee is claimed there.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from energy._validation import check_result, check_step_size, warn_low_precision

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

    @property
    def empty(self) -> bool:
        """Whether no step size is guaranteed (e.g. multi-head energies whose heads are not orthogonal)."""
        return not (self.low < self.high or (self.high_inclusive and self.low < self.high))

    def __str__(self) -> str:
        if self.empty:
            return f"none (no step size is guaranteed to descend)  [{self.reason}]"
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

    #: the public methods whose results are checked for NaN/inf (see the module docstring)
    RESULT_METHODS: ClassVar[tuple[str, ...]] = (
        "energy", "grad", "step", "step_and_energy", "preconditioned_grad", "projected_step",
    )  # not ``constrained_energy``: its +inf outside the feasible set is a value, not an overflow

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap each subclass's result methods with the NaN/inf check, and ``__init__`` with the one-time
        low-precision warning (see the module docstring); the wrapped methods are otherwise unchanged.
        """
        super().__init_subclass__(**kwargs)
        for name in cls.RESULT_METHODS:
            fn = cls.__dict__.get(name)
            if callable(fn) and not getattr(fn, "_result_checked", False):
                setattr(cls, name, _result_checked(fn, name))
        init = cls.__dict__.get("__init__")
        if callable(init) and not getattr(init, "_precision_checked", False):
            cls.__init__ = _precision_checked(init)  # type: ignore[method-assign]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``.to()`` / ``.half()`` / ``.bfloat16()`` also give the one-time low-precision warning."""
        out = super()._apply(fn, recurse)
        dtype = _weights_dtype(self)
        if dtype is not None:
            warn_low_precision(dtype, type(self).__name__)
        return out

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


def _weights_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of a module's first floating parameter or buffer (``None`` if it has none)."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _precision_checked(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def wrapped(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        dtype = _weights_dtype(self)
        if dtype is not None and type(self).__init__ is wrapped:  # once, after the outermost __init__
            warn_low_precision(dtype, type(self).__name__)

    wrapped._precision_checked = True  # type: ignore[attr-defined]
    return wrapped


def _result_checked(method: Callable[..., Any], what: str) -> Callable[..., Any]:
    params = list(inspect.signature(method).parameters)
    arg = params[1] if len(params) > 1 else "Y"  # the input's own name (Y, xi, x)

    @functools.wraps(method)
    def wrapped(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = method(self, *args, **kwargs)
        x = args[0] if args else kwargs.get(arg)
        inputs = {arg: x} if isinstance(x, Tensor) else {}
        return check_result(out, f"`{type(self).__name__}.{what}({arg}, …)`", inputs)

    wrapped._result_checked = True  # type: ignore[attr-defined]
    return wrapped
