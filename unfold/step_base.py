r"""The base of the step modules (:mod:`unfold.steps`): :class:`Step` and the per-pass :class:`Prepared` weights.

A step's forward is pure: it checks ``Y``'s metadata only and evaluates the pure core (:mod:`energy.core`) with
weights prepared once per forward pass (:meth:`Step.prepare`); no tensor value is read back to Python. The
validated energy object (:meth:`Step.build`) is for users, and for the explicit :meth:`Step.check_alpha`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from energy import kernels
from energy._validation import EnergyInputError, check_positive_int, check_tensor, warn_low_precision
from energy.base import Energy, StepRange, _precision_checked, _weights_dtype

__all__ = ["Prepared", "Step", "make_kernel", "positive_int", "check_input_dtype"]


def check_input_dtype(Y: Tensor, module: nn.Module, name: str = "Y") -> Tensor:
    """Raise :class:`EnergyInputError` unless ``Y`` has the dtype of ``module``'s floating weights (a metadata
    check: it reads no value, so it runs under every transform). Modules without floating weights accept any float.
    """
    for p in module.parameters():
        if p.is_floating_point():
            if Y.dtype != p.dtype:
                raise EnergyInputError(
                    f"`{name}` has dtype {Y.dtype} but the model's weights are {p.dtype}; cast the input "
                    f"(`{name}.to({p.dtype})`) or the model (`model.to({Y.dtype})`)."
                )
            break
    return Y


positive_int = check_positive_int  # the steps' name for the one positive-integer check


def make_kernel(kernel: str | kernels.Kernel, **kwargs: Any) -> kernels.Kernel:
    """Kernel from a name (``"gaussian"``, ``"power"``, ``"cauchy"``); an :class:`energy.kernels.Kernel` passes."""
    if not isinstance(kernel, str):
        if not isinstance(kernel, kernels.Kernel):
            raise EnergyInputError(f"`kernel` must be a name or an energy.kernels.Kernel, got {type(kernel).__name__}.")
        return kernel
    table: dict[str, Callable[..., kernels.Kernel]] = {
        "gaussian": kernels.GaussianKernel, "power": kernels.PowerKernel, "cauchy": kernels.CauchyKernel}
    if kernel not in table:
        raise EnergyInputError(f"unknown kernel {kernel!r}; valid names: {sorted(table)}.")
    return table[kernel](**kwargs)


@dataclass
class Prepared:
    """What one forward pass needs from a step's weights: the tensors the pure core takes (the constrained weights
    evaluated once, and any per-pass cache such as the heads' value bases), and how to build the energy object.
    """

    tensors: dict[str, Any] = field(default_factory=dict)
    builder: Callable[[], Energy | None] | None = None

    @property
    def energy(self) -> Energy | None:
        """The validated energy object of the step's current weights (built on demand; for users and tests)."""
        return None if self.builder is None else self.builder()


class Step(nn.Module):
    """Base class of the step modules (see the module docstring).

    Subclasses implement :meth:`_tensors` (the weights the core needs), :meth:`_step` (the pure step) and, if they
    descend an energy, :meth:`build` and :meth:`_energy_term`.
    """

    #: schedule name of the step (``"attention"``, ``"ffn"``, ...)
    kind: ClassVar[str] = "step"
    #: name of the energy term this step descends (``None`` for projections)
    term: ClassVar[str | None] = None

    alpha: Tensor
    alpha_value: float

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each step module's ``__init__`` ends with the one-time low-precision warning (policy in
        :mod:`energy.base`: float16 / bfloat16 weaken the descent guarantee).
        """
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if callable(init) and not getattr(init, "_precision_checked", False):
            cls.__init__ = _precision_checked(init)  # type: ignore[method-assign]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``.to()`` / ``.half()`` / ``.bfloat16()`` (e.g. of a whole model) also give the one-time low-precision
        warning.
        """
        out = super()._apply(fn, recurse)
        dtype = _weights_dtype(self)
        if dtype is not None:
            warn_low_precision(dtype, type(self).__name__)
        return out

    def __init__(self, d: int, *, alpha: float = 1.0, learn_alpha: bool = False) -> None:
        super().__init__()
        self.d = positive_int(d, "d")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise EnergyInputError(f"`alpha` must be a finite real number, got {alpha!r}.")
        if alpha < 0:
            raise EnergyInputError(f"`alpha` must be ≥ 0 (a step size; a negative one ascends the energy), got "
                                   f"{alpha!r}; use e.g. alpha=1.0.")
        self.alpha_value = float(alpha)  # the fixed step size as a Python number (forwards read no tensor)
        if learn_alpha:
            self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        else:  # part of the configuration (saved in config(), not in the state dict); float64 keeps it exact
            self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float64), persistent=False)
        self.learn_alpha = learn_alpha

    # -- interface -------------------------------------------------------------------------------------------------
    def build(self) -> Energy | None:
        """The validated energy object made from the current (constrained) weights; ``None`` for projections."""
        return None

    def guaranteed_range(self) -> StepRange | None:
        """The step sizes the step's *constraints* guarantee to descend, known without reading weight values
        (``None``: the range depends on the weights' values; see :meth:`check_alpha`).
        """
        return None

    def check_alpha(self) -> None:
        """Check the current ``α`` against the built energy's exact ``step_range()`` (reads the weights; a public
        call, never made inside a forward). Warns, or raises in ``strict_mode``.
        """
        energy = self.build()
        if energy is not None:
            self._range_of(energy).check(self.alpha.detach() if self.learn_alpha else self.alpha_value,
                                         f"{self.kind}.alpha")

    def prepare(self) -> Prepared:
        """Evaluate the parametrisations once for one forward pass; check a fixed ``α`` against
        :meth:`guaranteed_range` (a Python comparison, no tensor read).
        """
        r = self.guaranteed_range()
        if r is not None and not self.learn_alpha:
            r.check(self.alpha_value, f"{self.kind}.alpha")
        return Prepared(self._tensors(), self.build)

    def forward_prepared(self, prepared: Prepared, Y: Tensor) -> Tensor:
        """The descent step at ``Y`` with the prepared weights (pure core; ``Y``'s metadata checked)."""
        return self._step(prepared.tensors, self._check_Y(Y))

    def forward_prepared_and_energy(self, prepared: Prepared, Y: Tensor) -> tuple[Tensor, Tensor | None]:
        """The step and, if the step computes it in passing, its energy term at the input ``Y`` (else ``None``).

        The unroller's traces call this at recorded states; steps that can return ``E(Y)`` almost for free (the
        attention step: the same ``z`` / log-normalisers) override it.
        """
        return self.forward_prepared(prepared, Y), None

    def energy_at(self, prepared: Prepared, Y: Tensor) -> Tensor:
        """This step's energy term at ``Y`` (a state the model produced itself: the pure core, no checks)."""
        return self._energy_term(prepared.tensors, Y)

    def forward(self, Y: Tensor) -> Tensor:
        return self.forward_prepared(self.prepare(), Y)

    @property
    def energy(self) -> Energy | None:
        """The energy this step descends, built from its current parameters (``None`` for a projection)."""
        return self.build()

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this step (JSON-serialisable), without ``d``."""
        alpha = float(self.alpha.detach()) if self.learn_alpha else self.alpha_value
        return {"alpha": alpha, "learn_alpha": self.learn_alpha}

    # -- for subclasses ---------------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, Any]:
        return {}

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _energy_term(self, t: dict[str, Any], Y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no energy term")

    def _range_of(self, energy: Energy) -> StepRange:
        return energy.step_range()

    def _alpha(self) -> float | Tensor:
        """``α`` as the core takes it: the learnable tensor, or the fixed Python float."""
        return self.alpha if self.learn_alpha else self.alpha_value

    def _check_Y(self, Y: Tensor) -> Tensor:
        Y = check_input_dtype(check_tensor(Y, "Y", min_ndim=2, trailing=(None, self.d), finite=False), self)
        if Y.shape[-2] == 0:
            raise EnergyInputError(f"`Y` must contain at least one token, got shape {tuple(Y.shape)}.")
        return Y
