r"""The unroller: a deep network as ``depth`` repetitions of a schedule of descent steps (MATH §1.5, §1.6).

>>> import torch
>>> from unfold.unroller import unroll
>>> model = unroll(["attention", "ffn", "relu"], depth=3, d=8)
>>> Y_out, info = model(torch.randn(2, 5, 8), trace=True)
>>> len(info["states"]), sorted(info["energies"]), tuple(info["energies"]["E_att"].shape)
(10, ['E_att', 'E_ffn', 'total'], (10, 2))

One layer is one pass through the schedule (e.g. attention step, FFN step, ReLU projection); the model energy is
the sum of the schedule's energy terms (``E = E_att + E_ffn`` for Yang et al.). With ``tied=True`` every layer shares
one step module per schedule entry (the weight-tied model of the paper); with ``tied=False`` each layer has its own.

Tracing. ``forward(Y, trace=...)`` returns ``(Y_out, info)``. ``trace=True`` or ``"step"`` records the state after
every step, ``trace="layer"`` only at the layer boundaries (``t = 0, S, 2S, …, T``, ``S = len(schedule)``: the
states the paper's figures plot). With ``T = depth · S``:

* ``info["states"]`` — the recorded states: ``[Y⁰, Y¹, …, Y^T]`` (step) or ``[Y⁰, Y^S, …, Y^T]`` (layer);
* ``info["t"]`` — the step index ``t`` of each recorded state;
* ``info["energies"]`` — ``{term: tensor (len(states), *batch)}``: every energy term at every recorded state,
  plus ``"total"`` (their sum; the model energy :meth:`Unrolled.composite_energy`, e.g. ``E_att + E_ffn``). The
  energy at state ``t`` is that of the layer whose step acts next (the last state uses the last layer); for a tied
  model this is one energy throughout;
* ``info["step_names"]`` — ``["attention", "ffn", "relu", "attention", …]`` (length ``T``, all steps);
* ``info["layer_of_state"]`` — the layer index whose energy was evaluated at each recorded state;
* ``info["trace"]`` — ``"step"`` or ``"layer"``.

Cost of the energies. Each energy is built once per forward pass from the constrained weights (one evaluation of each
parametrisation, the same object that makes the step, hence the same metric in the energy and the step). A step that
acts on a recorded state returns its own term at that state in passing
(:meth:`unfold.steps.Step.forward_prepared_and_energy`): the attention step gets ``E_att(Y)`` from the pairwise
quantities it computes anyway (without autograd, on the fused path, from the attention kernel's row log-normalisers:
no pairwise work at all). Every other (term, state) value is evaluated after the pass, in one batched call per term
(and layer, if untied). For the Yang et al. schedule ``[attention, ffn, relu]`` the step trace needs ``E_att`` at
``3·depth + 1`` states, of which ``depth`` come free, so ``2·depth + 1`` explicit evaluations remain (each a key
product, a Gram product and an exponential per pair, about the pairwise work of one attention step); the layer trace
needs ``depth + 1``, of which ``depth`` come free. The plain forward never evaluates an energy.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from energy._validation import EnergyInputError, check_positive_int, check_tensor, value_holds
from energy.composite import CompositeEnergy
from unfold.modelfile import (
    CheckpointError,
    constrained_state_dict,
    load_model,
    read_model_file,
    register_builder,
    safe_load_state_dict,
    save_model,
)
from unfold.step_base import check_input_dtype
from unfold.steps import STEP_TYPES, Prepared, Step

__all__ = [
    "Unrolled",
    "unroll",
    "CheckpointError",
    "safe_load_state_dict",
    "constrained_state_dict",
    "save_model",
    "load_model",
    "register_builder",
    "STEP_TYPES",
]

ScheduleEntry = str | tuple[str, dict[str, Any]] | Step


def _valid_names() -> str:
    return ", ".join(sorted(STEP_TYPES))


def _make_step(entry: ScheduleEntry, d: int, defaults: dict[str, dict[str, Any]], position: int) -> Step:
    if isinstance(entry, Step):
        if entry.d != d:
            raise EnergyInputError(
                f"schedule entry {position} ({entry.kind}) has width d = {entry.d}, but the model width is d = {d}; "
                "every step of an unrolled model acts on the same token width. Build the step with d={d}."
            )
        return entry
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], dict):
        name, kwargs = entry
    elif isinstance(entry, str):
        name, kwargs = entry, {}
    else:
        raise EnergyInputError(
            f"schedule entry {position} must be a step name, a (name, kwargs) pair or a Step module, got {entry!r}."
        )
    if name not in STEP_TYPES:
        raise EnergyInputError(f"unknown step {name!r} at schedule position {position}; valid names: {_valid_names()}.")
    kw = {**defaults.get(name, {}), **kwargs}
    try:
        return STEP_TYPES[name](d, **kw)
    except TypeError as exc:
        raise EnergyInputError(f"bad arguments for step {name!r} at schedule position {position}: {exc}") from None


class Unrolled(nn.Module):
    """An unrolled model: ``depth`` layers, each one pass through ``schedule`` (see the module docstring).

    Args:
        schedule: step names (``"attention"``, ``"ffn"``, ``"relu"``, ``"layernorm"``, ``"rmsnorm"``,
            ``"tied_ffn"``, ``"hopfield"``, ``"energy_transformer"``), ``(name, kwargs)`` pairs, or :class:`Step`
            modules (tied models only).
        depth: number of layers (``≥ 1``).
        d: token width shared by all steps.
        tied: share one step module per schedule entry across all layers.
        alphas: step size for all steps (a float) or per step name (``{"attention": 1.0, "ffn": 0.5}``).
        step_kwargs: default keyword arguments per step name (``{"attention": {"heads": 2}}``).
    """

    def __init__(
        self,
        schedule: Sequence[ScheduleEntry],
        depth: int,
        d: int,
        *,
        tied: bool = True,
        alphas: float | dict[str, float] | None = None,
        step_kwargs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(schedule, str) or not isinstance(schedule, Sequence) or len(schedule) == 0:
            raise EnergyInputError(
                f"`schedule` must be a non-empty list of steps, e.g. ['attention', 'ffn', 'relu'], got {schedule!r}; "
                f"valid step names: {_valid_names()}."
            )
        check_positive_int(depth, "depth", what="(number of layers)")
        check_positive_int(d, "d", what="(token width)")
        if not isinstance(tied, bool):
            raise EnergyInputError(f"`tied` must be a bool (True: one step module per schedule entry shared by all "
                                   f"layers; False: one per layer), got {tied!r}.")
        defaults = {k: dict(v) for k, v in (step_kwargs or {}).items()}
        for name in defaults:
            if name not in STEP_TYPES:
                raise EnergyInputError(f"`step_kwargs` names unknown step {name!r}; valid names: {_valid_names()}.")
        if alphas is not None:
            per_name = alphas if isinstance(alphas, dict) else {n: alphas for n in STEP_TYPES}
            for name, a in per_name.items():
                if name not in STEP_TYPES:
                    raise EnergyInputError(f"`alphas` names unknown step {name!r}; valid names: {_valid_names()}.")
                if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
                    raise EnergyInputError(f"`alphas` must give each step a finite real step size, got {a!r} for "
                                           f"{name!r}; e.g. alphas=1.0 or alphas={{'attention': 1.0, 'ffn': 0.5}}.")
                if getattr(STEP_TYPES[name], "term", None) is not None:
                    defaults.setdefault(name, {})["alpha"] = float(a)
        if not tied and any(isinstance(e, Step) for e in schedule):
            raise EnergyInputError(
                "Step modules in the schedule can only be used with tied=True (one module per entry)."
            )
        self.d, self.depth, self.tied = d, depth, tied
        n_layers = 1 if tied else depth
        self.layers = nn.ModuleList(
            nn.ModuleList(_make_step(e, d, defaults, j) for j, e in enumerate(schedule)) for _ in range(n_layers)
        )
        self.step_kinds = [s.kind for s in self._steps(0)]
        self.term_names = self._term_names()

    # -- structure -------------------------------------------------------------------------------------------------
    def _steps(self, li: int) -> list[Step]:
        """The step modules of layer module ``li`` (``self.layers[li]``; one module list for a tied model)."""
        return [cast(Step, s) for s in cast(nn.ModuleList, self.layers[li])]

    def _prepare(self) -> list[list[Prepared]]:
        """Every layer module's steps prepared for one pass (each parametrisation evaluated once)."""
        return [[s.prepare() for s in self._steps(li)] for li in range(len(self.layers))]

    def _term_names(self) -> list[str | None]:
        names: list[str | None] = []
        for step in self._steps(0):
            if step.term is None:
                names.append(None)
                continue
            name, i = step.term, 2
            while name in names:
                name, i = f"{step.term}#{i}", i + 1
            names.append(name)
        return names

    @property
    def schedule(self) -> list[str]:
        return list(self.step_kinds)

    def layer(self, index: int) -> nn.ModuleList:
        """The step modules of layer ``index`` (the shared ones for a tied model)."""
        if not 0 <= index < self.depth:
            raise EnergyInputError(f"`index` must lie in [0, {self.depth}), got {index}.")
        return cast(nn.ModuleList, self.layers[0 if self.tied else index])

    def config(self) -> dict[str, Any]:
        """JSON-serialisable arguments that rebuild this model (:meth:`from_config`)."""
        return {
            "schedule": [[s.kind, s.config()] for s in self._steps(0)],
            "depth": self.depth, "d": self.d, "tied": self.tied,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Unrolled:
        try:
            schedule = [(name, dict(kw)) for name, kw in config["schedule"]]
            return cls(schedule, config["depth"], config["d"], tied=config["tied"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid Unrolled config {config!r}: {exc}") from None

    def energies(self) -> list[list[Any]]:
        """The energy objects of every distinct layer (``None`` for projections), built from the current weights."""
        return [[s.build() for s in self._steps(li)] for li in range(len(self.layers))]

    def composite_energy(self, layer: int = 0) -> CompositeEnergy | None:
        """The model energy of layer ``layer``: ``CompositeEnergy({"E_att": …, "E_ffn": …})`` built from the current
        weights (MATH §1.6); ``None`` if the schedule has only projections.
        """
        return self._composite([cast(Step, s).build() for s in self.layer(layer)])

    def _composite(self, built: list[Any]) -> CompositeEnergy | None:
        terms = {name: e for name, e in zip(self.term_names, built) if name is not None}
        return CompositeEnergy(terms) if terms else None

    def energy(self, Y: Tensor, layer: int = 0) -> dict[str, Tensor]:
        """Every energy term of layer ``layer`` (and ``"total"``) at ``Y``, shape ``Y.shape[:-2]`` each."""
        E = self.composite_energy(layer)
        return {} if E is None else _with_total(E.terms(Y))

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, Y: Tensor, *, trace: bool | str = False,
                energies: bool = True) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """Run ``depth`` layers; with ``trace`` also return the trace dict (module docstring).

        Args:
            Y: tokens ``(..., n, d)``.
            trace: ``False`` (plain forward), ``True`` / ``"step"`` (state after every step) or ``"layer"``
                (states at the layer boundaries).
            energies: ``False`` records the states only (``info["energies"]`` is empty); evaluate them later with
                :meth:`trace_energies` (same numbers, with the weights of the time of that call).
        """
        # the input checks are metadata only (type, rank, width, device) and the steps read no tensor value, so the
        # forward runs under torch.func transforms; the result's finiteness is checked once, through value_holds
        # (skipped under vmap/linearize and for meta tensors): NaN/inf in Y or an overflow raises instead of
        # propagating silently
        check_input_dtype(check_tensor(Y, "Y", min_ndim=2, trailing=(None, self.d), finite=False), self)
        if Y.shape[-2] == 0:
            raise EnergyInputError(f"`Y` must contain at least one token, got shape {tuple(Y.shape)}.")
        _check_device(Y, self)
        _check_finite_input(Y)
        granularity = _trace_granularity(trace)
        out = self._forward(Y, granularity, energies)
        _check_finite_result(out[0] if isinstance(out, tuple) else out, Y)
        return out

    def _forward(self, Y: Tensor, granularity: str | None,
                 energies: bool) -> Tensor | tuple[Tensor, dict[str, Any]]:
        prepared = self._prepare()
        if granularity is None:
            for ell in range(self.depth):
                li = 0 if self.tied else ell
                for step, prep in zip(self._steps(li), prepared[li]):
                    Y = step.forward_prepared(prep, Y)
            return Y
        S = len(self.step_kinds)
        states, ts = [Y], [0]
        values: dict[tuple[str, int], Tensor] = {}  # (term, index of the recorded state) -> its value
        t = 0
        for ell in range(self.depth):
            li = 0 if self.tied else ell
            for j, (step, prep) in enumerate(zip(self._steps(li), prepared[li])):
                name = self.term_names[j]
                on_record = energies and ts[-1] == t  # the step acts on the last recorded state
                if on_record and name is not None:  # its own term at that state, in passing
                    Y, E = step.forward_prepared_and_energy(prep, Y)
                    if E is not None:
                        values[(name, len(states) - 1)] = E
                else:
                    Y = step.forward_prepared(prep, Y)
                if on_record:  # the remaining terms there, while that state is still in cache
                    self._evaluate_missing(states, li, prepared, values, len(states) - 1)
                t += 1
                if granularity == "step" or t % S == 0:
                    states.append(Y)
                    ts.append(t)
        info = {"states": states, "t": ts, "energies": {}, "step_names": self.step_kinds * self.depth,
                "layer_of_state": self._layer_of_state(ts), "trace": granularity}
        if energies:
            last = self.depth - 1
            self._evaluate_missing(states, 0 if self.tied else last, prepared, values, len(states) - 1)
            info["energies"] = self._collect(values, len(states))
        return Y, info

    def _layer_of_state(self, ts: Sequence[int]) -> list[int]:
        S = len(self.step_kinds)
        return [min(t // S, self.depth - 1) for t in ts]

    def _trace_steps(self, granularity: str) -> list[int]:
        """Step indices ``t`` of the states a trace of this granularity records."""
        S = len(self.step_kinds)
        T = self.depth * S
        return list(range(T + 1)) if granularity == "step" else list(range(0, T + 1, S))

    def trace_energies(self, states: Sequence[Tensor], trace: bool | str = "step") -> dict[str, Tensor]:
        """Every energy term (and ``"total"``) on the states of a trace of granularity ``trace`` (``"step"`` or
        ``"layer"``), ``{term: (len(states), *batch)}``, all evaluated explicitly.
        """
        granularity = _trace_granularity(trace) or "step"
        ts = self._trace_steps(granularity)
        if len(states) != len(ts):
            raise EnergyInputError(
                f"`states` must hold the {len(ts)} states of one forward pass traced with trace={granularity!r}, "
                f"got {len(states)}."
            )
        states = [check_tensor(Y, f"states[{i}]", min_ndim=2, trailing=(None, self.d)) for i, Y in enumerate(states)]
        prepared = self._prepare()
        values: dict[tuple[str, int], Tensor] = {}
        for i, ell in enumerate(self._layer_of_state(ts)):
            self._evaluate_missing(states, 0 if self.tied else ell, prepared, values, i)
        return self._collect(values, len(states))

    def _evaluate_missing(self, states: list[Tensor], li: int, prepared: list[list[Prepared]],
                          values: dict[tuple[str, int], Tensor], i: int) -> None:
        """Evaluate every term of layer module ``li`` at recorded state ``i`` that ``values`` does not hold yet
        (:meth:`unfold.steps.Step.energy_at` with the pass's prepared energies).

        One state at a time: a state is small enough to stay in cache, a stack of all states is not (stacking them
        into one batched call was several times slower at the benchmark sizes).
        """
        for name, step, prep in zip(self.term_names, self._steps(li), prepared[li]):
            if name is not None and (name, i) not in values:
                values[(name, i)] = step.energy_at(prep, states[i])

    def _collect(self, values: dict[tuple[str, int], Tensor], n_states: int) -> dict[str, Tensor]:
        """``{term: (n_states, *batch)}`` plus ``"total"`` (empty if the schedule has only projections)."""
        names = [name for name in self.term_names if name is not None]
        if not names:
            return {}
        return _with_total({name: torch.stack([values[(name, i)] for i in range(n_states)]) for name in names})

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Validated, all-or-nothing load (see :func:`unfold.modelfile.safe_load_state_dict`)."""
        if not strict:
            return super().load_state_dict(state_dict, strict=False, assign=assign)
        return safe_load_state_dict(self, state_dict, _inner=super().load_state_dict)


def _trace_granularity(trace: object) -> str | None:
    """``None`` (no trace), ``"step"`` or ``"layer"`` from the ``trace`` argument."""
    if trace is False or trace is None:
        return None
    if trace is True or trace == "step":
        return "step"
    if trace == "layer":
        return "layer"
    raise EnergyInputError(
        f"`trace` must be False, True / 'step' (the state after every step) or 'layer' (states at the layer "
        f"boundaries), got {trace!r}."
    )


def _check_device(Y: Tensor, module: nn.Module) -> None:
    """A metadata check (no value read): ``Y`` is on the device of the model's weights."""
    for p in module.parameters():
        if p.device != Y.device:
            raise EnergyInputError(
                f"`Y` is on device {Y.device} but the model's weights are on {p.device}; pass the input there "
                f"(`Y.to('{p.device}')`) or the model (`model.to('{Y.device}')`)."
            )
        break


def _check_finite_input(Y: Tensor) -> None:
    """NaN/inf in ``Y``, or tokens whose squared norm overflows the dtype (the attention scores ``y_i W y_jᵀ`` would
    overflow, and softmax turns them into a silent wrong answer), raise, naming ``Y``. One reduction read through
    :func:`energy._validation.value_holds` (skipped under tracing transforms and for meta tensors).
    """
    if Y.numel() == 0:
        return
    with torch.no_grad():
        sq = Y * Y
        if value_holds(torch.isfinite(sq.sum())) or value_holds(torch.isfinite(sq.sum(-1)).all()):
            return
        if not value_holds(torch.isfinite(Y).all()):
            raise EnergyInputError("`Y` contains NaN or inf entries; clean the input (e.g. `torch.nan_to_num`) "
                                   "before calling the unrolled model.")
        m = float(Y.abs().max())
    raise EnergyInputError(
        f"`Y` is too large for {Y.dtype} (max |Y| = {m:.3g}): the squared norms of its tokens overflow (largest finite "
        f"value {torch.finfo(Y.dtype).max:.3g}), so the attention scores would not be finite. Rescale `Y` (e.g. "
        "normalise the tokens)" + (" or use a wider dtype (`model.double()`, `Y.double()`)."
                                   if Y.dtype != torch.float64 else ".")
    )


def _check_finite_result(out: Tensor, Y: Tensor) -> None:
    """The one value check of an unrolled forward, at its public entry: a NaN/inf result raises, naming ``Y``.

    It goes through :func:`energy._validation.value_holds` (one reduction of the result), so it is skipped under
    tracing transforms (``vmap``, ``linearize``) and for meta tensors; the steps themselves read no value. The input
    is only inspected once the result is known to be bad, to say whether ``Y`` itself was not finite (clean it) or
    the computation overflowed (rescale ``Y``).
    """
    if not out.is_floating_point() or out.numel() == 0 or value_holds(torch.isfinite(out.sum())) \
            or value_holds(torch.isfinite(out).all()):
        return
    if not value_holds(torch.isfinite(Y).all()):
        raise EnergyInputError("`Y` contains NaN or inf entries, so the unrolled model's output is not finite; "
                               "clean the input (e.g. `torch.nan_to_num`) before calling the model.")
    m = float(Y.detach().abs().max())
    raise EnergyInputError(
        f"the unrolled model's output is not finite (NaN/inf) although `Y` is finite (max |Y| = {m:.3g}): the "
        f"computation overflowed {out.dtype}. Rescale `Y` (e.g. normalise the tokens)"
        + (" or use a wider dtype (`model.double()`, `Y.double()`)." if out.dtype != torch.float64 else ".")
    )


def _with_total(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """The terms plus ``"total"``, their sum."""
    return {**terms, "total": torch.stack(list(terms.values())).sum(0)}


def unroll(
    schedule: Sequence[ScheduleEntry] = ("attention", "ffn", "relu"),
    depth: int = 12,
    d: int = 64,
    *,
    tied: bool = True,
    alphas: float | dict[str, float] | None = None,
    **step_kwargs: dict[str, Any],
) -> Unrolled:
    """Builder: ``unroll(["attention", "ffn", "relu"], depth=12, d=300, attention={"heads": 1})``.

    Keyword arguments named after steps give that step's options (``attention={...}``, ``ffn={...}``).
    """
    if isinstance(schedule, str) or not isinstance(schedule, Sequence):
        raise EnergyInputError(
            f"`schedule` must be a list or tuple of steps, e.g. ['attention', 'ffn', 'relu'], got {schedule!r}; "
            + (f"for one step pass [{schedule!r}]." if isinstance(schedule, str) else f"valid names: {_valid_names()}.")
        )
    return Unrolled(list(schedule), depth, d, tied=tied, alphas=alphas, step_kwargs=step_kwargs)


register_builder("Unrolled", Unrolled.from_config)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Deprecated (one release): :func:`unfold.modelfile.read_model_file`, which reads every model-file version."""
    warnings.warn("unfold.unroller.read_checkpoint is deprecated; use unfold.modelfile.read_model_file (same "
                  "validation, and it migrates older versions).", DeprecationWarning, stacklevel=2)
    return read_model_file(path)
