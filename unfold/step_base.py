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

__all__ = ["Prepared", "Step", "make_kernel", "positive_int", "check_input_dtype", "check_alpha_range", "backtracked"]


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
    #: learnable step size kept inside ``(lo, hi)`` (None: the plain ``alpha``); see :meth:`_setup_step_size`
    alpha_range: tuple[float, float] | None = None
    #: number of step-size halvings of the backtracking step (0: off)
    backtrack: int = 0
    #: what a certificate calls this step's guarantee when its ``α`` lies in the guaranteed range
    guarantee_kind: ClassVar[str] = "gradient"
    #: whether the step is a (per-token scaled) gradient step, so that a following projection onto a convex set
    #: separable per coordinate (ReLU) keeps its guarantee as a projected-gradient step (MATH §1.3, §7.1)
    projection_compatible: ClassVar[bool] = False

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
            self._range_of(energy).check(self.current_alpha(), f"{self.kind}.alpha")

    def current_alpha(self) -> float:
        """The step size now, as a Python number (reads a learnable ``α``; for reports, never inside a forward)."""
        a = self._alpha()
        return float(a.detach()) if isinstance(a, Tensor) else float(a)

    def guarantee(self) -> tuple[str, str]:
        """What this step guarantees now: ``(kind, statement)`` with ``kind`` one of ``"mm"`` (an exact
        majorisation–minimisation step inside the guaranteed range), ``"gradient"`` (a gradient step inside it),
        ``"bound"`` (``α`` inside a range computed from the current weights), ``"backtracking"`` (the decrease is
        enforced), ``"none"`` (MATH §7.1). Reads the weights (a report, never made inside a forward).
        """
        if self.term is None:
            return "none", f"the {self.kind} step is a projection with no energy term"
        if self.backtrack:
            return "backtracking", (f"MATH §7.2: α halved up to {self.backtrack} times per example until {self.term} "
                                    "does not increase, else the step is skipped (enforced by the forward)")
        alpha = self.current_alpha()
        r = self.guaranteed_range()
        if r is not None:
            if alpha in r:
                how = "learnable, kept inside by α = lo + (hi − lo)σ(a), MATH §7.3" if self.alpha_range else "fixed"
                return self.guarantee_kind, f"α = {alpha:.6g} ({how}) in the guaranteed range {r}"
            return "none", f"α = {alpha:.6g} outside the guaranteed range {r}"
        energy = self.build()
        if energy is None:
            return "none", f"the {self.kind} step has no energy object"
        computed = self._range_of(energy)
        if alpha in computed:
            return "bound", f"α = {alpha:.6g} in the range computed from the current weights {computed}"
        return "none", f"α = {alpha:.6g} outside the range computed from the current weights {computed}"

    def rounding_scale(self, Y: Tensor) -> float:
        """The magnitude of the quantities this step's energy term is computed from at ``Y`` (a Python number; 0:
        the term's own magnitude is the scale). A certificate measures an energy change relative to
        ``max(|E(Y)|, |E(Y⁺)|, rounding_scale)``, so that rounding in the evaluation is not reported as an increase.
        """
        return 0.0

    def prepare(self) -> Prepared:
        """Evaluate the parametrisations once for one forward pass; check a fixed ``α`` against
        :meth:`guaranteed_range` (a Python comparison, no tensor read). A backtracking step enforces its decrease
        itself, so its ``α`` is not checked.
        """
        r = self.guaranteed_range()
        if r is not None and not self.learn_alpha and not self.backtrack:
            r.check(self.alpha_value, f"{self.kind}.alpha")
        return Prepared(self._tensors(), self.build)

    def forward_prepared(self, prepared: Prepared, Y: Tensor) -> Tensor:
        """The descent step at ``Y`` with the prepared weights (pure core; ``Y``'s metadata checked)."""
        Y = self._check_Y(Y)
        if self.backtrack:
            return backtracked(self, prepared.tensors, Y)[0]
        return self._step(prepared.tensors, Y)

    def forward_prepared_and_energy(self, prepared: Prepared, Y: Tensor) -> tuple[Tensor, Tensor | None]:
        """The step and, if the step computes it in passing, its energy term at the input ``Y`` (else ``None``).

        The unroller's traces call this at recorded states; steps that can return ``E(Y)`` almost for free (the
        attention step: the same ``z`` / log-normalisers; a backtracking step, which needs it) override it.
        """
        if self.backtrack:
            return backtracked(self, prepared.tensors, self._check_Y(Y))
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
        out: dict[str, Any] = {"alpha": self.current_alpha(), "learn_alpha": self.learn_alpha}
        if self.alpha_range is not None:  # the state dict restores α itself; a rebuild needs a start inside
            lo, hi = self.alpha_range
            out["alpha_range"] = [lo, hi]
            if not lo < out["alpha"] < hi:  # σ(a) rounded to 0 or 1
                out["alpha"] = 0.5 * (lo + hi)
        if self.backtrack:
            out["backtrack"] = self.backtrack
        return out

    # -- step-size policies (MATH §7.3, §7.2) -----------------------------------------------------------------------
    def _setup_step_size(self, alpha_range: object = None, backtrack: object = 0) -> None:
        r"""Install the step-size policy; called at the end of a subclass's ``__init__`` (the guaranteed range may
        depend on the subclass's attributes).

        * ``alpha_range = (lo, hi)``: a learnable step size kept inside ``(lo, hi)`` by
          :math:`\alpha = lo + (hi - lo)\,\sigma(a)` (MATH §7.3); the interval must lie inside
          :meth:`guaranteed_range` (else :class:`EnergyInputError` naming both and the fix).
        * ``backtrack = K``: halve ``α`` up to ``K`` times, per example, until the step's own energy term does not
          increase, else stay (MATH §7.2): the decrease is enforced, whatever the weights.
        """
        if isinstance(backtrack, bool) or not isinstance(backtrack, int) or backtrack < 0:
            raise EnergyInputError(f"`backtrack` must be an int ≥ 0 (the number of step-size halvings; 0 = off), got "
                                   f"{backtrack!r}; e.g. backtrack=4.")
        if backtrack and self.term is None:
            raise EnergyInputError(f"`backtrack` needs an energy term, and the {self.kind} step has none.")
        self.backtrack = int(backtrack)
        self.alpha_range = None
        if alpha_range is None:
            return
        lo, hi = check_alpha_range(alpha_range, self.guaranteed_range(), self.kind, self.alpha_value)
        del self.alpha  # the plain α (parameter or buffer) is replaced by the bounded parametrisation
        self.alpha_range = (lo, hi)
        a0 = math.log((self.alpha_value - lo) / (hi - self.alpha_value))
        self.alpha_logit = nn.Parameter(torch.tensor(a0))
        self.learn_alpha = True

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
        """``α`` as the core takes it: the learnable tensor (bounded: ``lo + (hi − lo)·σ(a)``), or the fixed float."""
        if self.alpha_range is not None:
            lo, hi = self.alpha_range
            return lo + (hi - lo) * torch.sigmoid(self.alpha_logit)
        return self.alpha if self.learn_alpha else self.alpha_value

    def _check_Y(self, Y: Tensor) -> Tensor:
        Y = check_input_dtype(check_tensor(Y, "Y", min_ndim=2, trailing=(None, self.d), finite=False), self)
        if Y.shape[-2] == 0:
            raise EnergyInputError(f"`Y` must contain at least one token, got shape {tuple(Y.shape)}.")
        return Y


def check_alpha_range(alpha_range: object, guaranteed: StepRange | None, kind: str,
                      alpha: float) -> tuple[float, float]:
    """Validate a learnable step size's interval ``(lo, hi)`` against the step's guaranteed range (MATH §7.3).

    ``α = lo + (hi − lo)·σ(a)`` takes the values of the open interval ``(lo, hi)``, so ``guaranteed.low ≤ lo`` and
    ``hi ≤ guaranteed.high`` put every reachable ``α`` inside the guarantee; the initial ``alpha`` must lie in
    ``(lo, hi)``.
    """
    ok = (isinstance(alpha_range, (tuple, list)) and len(alpha_range) == 2
          and all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in alpha_range))
    if not ok:
        raise EnergyInputError(f"`alpha_range` must be a pair (lo, hi) of finite numbers, got {alpha_range!r}; "
                               "e.g. alpha_range=(0.05, 1.95).")
    lo, hi = float(alpha_range[0]), float(alpha_range[1])  # type: ignore[index]
    if not lo < hi:
        raise EnergyInputError(f"`alpha_range` = {alpha_range!r} must have lo < hi; pass ({min(lo, hi)}, "
                               f"{max(lo, hi)}) or a fixed alpha.")
    if guaranteed is None:
        raise EnergyInputError(
            f"`alpha_range` = {alpha_range!r}: the {kind} step's guaranteed range depends on its weights' values "
            "(e.g. no spectrum constraint, or the token preconditioner), so no fixed interval stays inside it; "
            "constrain the weights (spectrum=(lo, hi)), or use backtrack=K instead."
        )
    if guaranteed.empty:
        raise EnergyInputError(
            f"`alpha_range` = {alpha_range!r}: no step size is guaranteed for this {kind} step ({guaranteed.reason}); "
            "use orthogonal_heads=True (each head keeps its range) or backtrack=K (enforced decrease)."
        )
    if lo < guaranteed.low or hi > guaranteed.high:
        raise EnergyInputError(
            f"`alpha_range` = ({lo:g}, {hi:g}) lies outside the {kind} step's guaranteed range {guaranteed}; "
            f"choose lo ≥ {guaranteed.low:g} and hi ≤ {guaranteed.high:g}, e.g. alpha_range="
            f"({max(lo, guaranteed.low):g}, {min(hi, guaranteed.high):g})."
        )
    if not lo < alpha < hi:
        raise EnergyInputError(f"`alpha` = {alpha:g} (the initial step size) must lie inside alpha_range = "
                               f"({lo:g}, {hi:g}); pass e.g. alpha={0.5 * (lo + hi):g}.")
    return lo, hi


def backtracked(step: Step, t: dict[str, Any], Y: Tensor) -> tuple[Tensor, Tensor]:
    r"""The backtracking step (MATH §7.2) and the step's energy term at ``Y``: ``(Y⁺, E(Y))``.

    .. math:: Y^+ = Y + 2^{-k^*}\Delta,\quad \Delta = S_\alpha(Y) - Y,\quad
        k^* = \min\{k \le K : E(Y + 2^{-k}\Delta) \le E(Y)\}\ (\text{else } Y^+ = Y),

    per example (every batch index separately). The steps are affine in ``α`` (MATH §1.5), so ``Y + 2^{-k}Δ`` is the
    step with ``α 2^{-k}``. Pure tensor operations (``torch.where``), so the energy never increases — by
    construction, for any weights — and torch.func transforms pass through.
    """
    E0 = step._energy_term(t, Y)
    delta = step._step(t, Y) - Y
    out = Y
    for k in range(step.backtrack, -1, -1):  # the smallest k that descends wins (written last)
        cand = Y + (0.5 ** k) * delta
        ok = step._energy_term(t, cand) <= E0
        out = torch.where(ok[..., None, None], cand, out)
    return out, E0
