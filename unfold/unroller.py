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
acts on a recorded state returns its own term at that state in passing (:meth:`unfold.steps.Step.forward_prepared_and_energy`):
the attention step gets ``E_att(Y)`` from the pairwise quantities it computes anyway (without autograd, on the fused
path, from the attention kernel's row log-normalisers: no pairwise work at all). Every other (term, state) value is
evaluated after the pass, in one batched call per term (and layer, if untied). For the Yang et al. schedule
``[attention, ffn, relu]`` the step trace needs ``E_att`` at ``3·depth + 1`` states, of which ``depth`` come free,
so ``2·depth + 1`` explicit evaluations remain (each a key product, a Gram product and an exponential per pair, about
the pairwise work of one attention step); the layer trace needs ``depth + 1``, of which ``depth`` come free. The
plain forward never evaluates an energy.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from energy._validation import ConstraintError, EnergyInputError, check_tensor
from energy.composite import CompositeEnergy
from unfold.parametrizations import check_constraints, constraints_of
from unfold.steps import STEP_TYPES, Step
from unfold.train import CheckpointError  # one error class for every checkpoint problem of the package

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
        if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
            raise EnergyInputError(f"`depth` must be a positive integer (number of layers), got {depth!r}.")
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise EnergyInputError(f"`d` must be a positive integer (token width), got {d!r}.")
        defaults = {k: dict(v) for k, v in (step_kwargs or {}).items()}
        for name in defaults:
            if name not in STEP_TYPES:
                raise EnergyInputError(f"`step_kwargs` names unknown step {name!r}; valid names: {_valid_names()}.")
        if alphas is not None:
            per_name = alphas if isinstance(alphas, dict) else {n: alphas for n in STEP_TYPES}
            for name, a in per_name.items():
                if name not in STEP_TYPES:
                    raise EnergyInputError(f"`alphas` names unknown step {name!r}; valid names: {_valid_names()}.")
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
        self.step_kinds = [s.kind for s in self.layers[0]]
        self.term_names = self._term_names()

    # -- structure -------------------------------------------------------------------------------------------------
    def _term_names(self) -> list[str | None]:
        names: list[str | None] = []
        for step in self.layers[0]:
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
        return self.layers[0 if self.tied else index]

    def config(self) -> dict[str, Any]:
        """JSON-serialisable arguments that rebuild this model (:meth:`from_config`)."""
        return {
            "schedule": [[s.kind, s.config()] for s in self.layers[0]],
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
        return [[s.build() for s in layer] for layer in self.layers]

    def composite_energy(self, layer: int = 0) -> CompositeEnergy | None:
        """The model energy of layer ``layer``: ``CompositeEnergy({"E_att": …, "E_ffn": …})`` built from the current
        weights (MATH §1.6); ``None`` if the schedule has only projections."""
        return self._composite([s.build() for s in self.layer(layer)])

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
        # metadata only (type, rank, width): a forward reads no tensor value, so it runs under torch.func transforms
        check_tensor(Y, "Y", min_ndim=2, trailing=(None, self.d), finite=False)
        granularity = _trace_granularity(trace)
        prepared = [[s.prepare() for s in layer] for layer in self.layers]  # parametrisations evaluated once
        if granularity is None:
            for ell in range(self.depth):
                li = 0 if self.tied else ell
                for step, prep in zip(self.layers[li], prepared[li]):
                    Y = step.forward_prepared(prep, Y)
            return Y
        S = len(self.step_kinds)
        states, ts = [Y], [0]
        values: dict[tuple[str, int], Tensor] = {}  # (term, index of the recorded state) -> its value
        t = 0
        for ell in range(self.depth):
            li = 0 if self.tied else ell
            for j, (step, prep) in enumerate(zip(self.layers[li], prepared[li])):
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
        ``"layer"``), ``{term: (len(states), *batch)}``, all evaluated explicitly."""
        granularity = _trace_granularity(trace) or "step"
        ts = self._trace_steps(granularity)
        if len(states) != len(ts):
            raise EnergyInputError(
                f"`states` must hold the {len(ts)} states of one forward pass traced with trace={granularity!r}, "
                f"got {len(states)}."
            )
        states = [check_tensor(Y, f"states[{i}]", min_ndim=2, trailing=(None, self.d)) for i, Y in enumerate(states)]
        prepared = [[s.prepare() for s in layer] for layer in self.layers]
        values: dict[tuple[str, int], Tensor] = {}
        for i, ell in enumerate(self._layer_of_state(ts)):
            self._evaluate_missing(states, 0 if self.tied else ell, prepared, values, i)
        return self._collect(values, len(states))

    def _evaluate_missing(self, states: list[Tensor], li: int, prepared: list[list[Any]],
                          values: dict[tuple[str, int], Tensor], i: int) -> None:
        """Evaluate every term of layer module ``li`` at recorded state ``i`` that ``values`` does not hold yet
        (:meth:`unfold.steps.Step.energy_at` with the pass's prepared energies).

        One state at a time: a state is small enough to stay in cache, a stack of all states is not (stacking them
        into one batched call was several times slower at the benchmark sizes).
        """
        for name, step, prep in zip(self.term_names, self.layers[li], prepared[li]):
            if name is not None and (name, i) not in values:
                values[(name, i)] = step.energy_at(prep, states[i])

    def _collect(self, values: dict[tuple[str, int], Tensor], n_states: int) -> dict[str, Tensor]:
        """``{term: (n_states, *batch)}`` plus ``"total"`` (empty if the schedule has only projections)."""
        names = [name for name in self.term_names if name is not None]
        if not names:
            return {}
        return _with_total({name: torch.stack([values[(name, i)] for i in range(n_states)]) for name in names})

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False):
        """Validated, all-or-nothing load (see :func:`safe_load_state_dict`)."""
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
    return Unrolled(list(schedule), depth, d, tied=tied, alphas=alphas, step_kwargs=step_kwargs)


# ---------------------------------------------------------------------------------------------------- state dicts


def _parametrized_tensors(module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{"prefix.tensor": (owner, tensor)}`` for every parametrised tensor of ``module`` (not counting tensors
    internal to a parametrisation, e.g. the orthogonal basis inside :class:`~unfold.parametrizations.OrthogonalHeads`,
    which its owner's ``right_inverse`` sets)."""
    out = {}
    for prefix, mod in module.named_modules():
        if "parametrizations." in prefix or prefix.startswith("parametrizations"):
            continue
        if parametrize.is_parametrized(mod):
            for tname in mod.parametrizations:
                out[f"{prefix}.{tname}" if prefix else tname] = (mod, tname)
    return out


def constrained_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """State dict with every parametrised tensor given by its *constrained value* (``"ffn.W_f"``) instead of its
    unconstrained original (``"ffn.parametrizations.W_f.original"``): a format independent of the
    parametrisation's internals, which :func:`safe_load_state_dict` checks against the constraints when loading."""
    sd = module.state_dict()
    ptensors = _parametrized_tensors(module)
    out = {}
    for key, value in sd.items():
        if any(key.startswith(_orig_prefix(q)) for q in ptensors):
            continue
        out[key] = value
    for q, (owner, tname) in ptensors.items():
        out[q] = getattr(owner, tname).detach().clone()
    return out


def _orig_prefix(qualified: str) -> str:
    owner, _, tname = qualified.rpartition(".")
    return (f"{owner}." if owner else "") + f"parametrizations.{tname}."


def safe_load_state_dict(module: nn.Module, state_dict: dict[str, Tensor], *, _inner=None):
    """Load ``state_dict`` into ``module`` all-or-nothing, with clear errors.

    Accepts the module's own state dict or a :func:`constrained_state_dict`. Checks, before anything is changed:
    the key sets (missing / unexpected keys are listed), shapes, finiteness, and — for constrained values — each
    named constraint (:class:`~energy.ConstraintError` naming it). The load happens on a copy first; the module is
    only touched once everything has passed.

    Raises:
        CheckpointError: keys, shapes or values do not match the model.
        ConstraintError: a constrained weight violates its constraint.
    """
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"a state dict must be a dict of tensors, got {type(state_dict).__name__}.")
    own = module.state_dict()
    ptensors = _parametrized_tensors(module)
    plain = {q: state_dict[q] for q in ptensors if q in state_dict}
    rest = {k: v for k, v in state_dict.items() if k not in plain}
    expected = {k for k in own if not any(q in plain and k.startswith(_orig_prefix(q)) for q in ptensors)}
    missing = sorted(expected - set(rest))
    unexpected = sorted(set(rest) - expected)
    if missing or unexpected:
        raise CheckpointError(
            "the state dict does not match the model: "
            + (f"missing keys {missing[:8]}{' …' if len(missing) > 8 else ''}; " if missing else "")
            + (f"unexpected keys {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}; " if unexpected else "")
            + "was it saved from a model with the same schedule, depth, tied flag and options? Nothing was loaded."
        )
    for k, v in state_dict.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"entry {k!r} is a {type(v).__name__}, not a tensor (corrupt checkpoint).")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"entry {k!r} contains NaN or inf (corrupt checkpoint); nothing was loaded.")
    wrong_dtype = [(k, v.dtype, own[k].dtype) for k, v in rest.items() if v.dtype != own[k].dtype]
    for q, v in plain.items():
        owner, tname = ptensors[q]
        if v.dtype != getattr(owner, tname).dtype:
            wrong_dtype.append((q, v.dtype, getattr(owner, tname).dtype))
    if wrong_dtype:
        k, a, b = wrong_dtype[0]
        raise CheckpointError(f"{k!r} has dtype {a} but the model's is {b}; convert the model with `model.to({a})` "
                              "before loading, so no value is silently cast. Nothing was loaded.")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in rest.items() if v.shape != own[k].shape]
    for q, v in plain.items():
        owner, tname = ptensors[q]
        want = tuple(getattr(owner, tname).shape)
        if tuple(v.shape) != want:
            bad.append((q, tuple(v.shape), want))
    if bad:
        lines = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in bad[:8])
        raise CheckpointError(f"shape mismatch ({lines}); the checkpoint was saved from a different model size. "
                              "Nothing was loaded.")
    candidate = copy.deepcopy(module)
    cand_p = _parametrized_tensors(candidate)
    for q, v in plain.items():
        owner, tname = cand_p[q]
        cons = constraints_of(owner).get(tname, [])
        if cons:
            cons[-1].check(v, q)
        with torch.no_grad():
            setattr(owner, tname, v)  # right_inverse checks the constraint chain
    cand_sd = candidate.state_dict()
    cand_sd.update(rest)
    nn.Module.load_state_dict(candidate, cand_sd, strict=True)
    check_constraints(candidate)
    inner = _inner if _inner is not None else module.load_state_dict
    return inner(candidate.state_dict(), strict=True)


# ------------------------------------------------------------------------------------------------- model files

_BUILDERS: dict[str, Any] = {"Unrolled": Unrolled.from_config}
_FORMAT = "unfold-model"
_VERSION = 1


def register_builder(name: str, from_config) -> None:
    """Register ``from_config(config) -> nn.Module`` so :func:`load_model` can rebuild models of that kind."""
    _BUILDERS[name] = from_config


def save_model(model: nn.Module, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> None:
    """Write ``{format, version, builder, config, state_dict, extra}`` atomically (temp file + rename).

    ``model`` must have ``config()`` and its class name registered with :func:`register_builder`.
    """
    kind = type(model).__name__
    if kind not in _BUILDERS or not hasattr(model, "config"):
        raise EnergyInputError(f"cannot save a {kind}: no builder registered (known: {sorted(_BUILDERS)}).")
    payload = {"format": _FORMAT, "version": _VERSION, "builder": kind, "config": model.config(),
               "state_dict": model.state_dict(), "extra": extra or {}}
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a model file written by :func:`save_model` (clear errors for corrupt files)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist.")
    try:
        with open(path, "rb") as f:
            payload = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / not a torch file / unpickling refused
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a torch file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}).") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path!r} is not an unfold model file (expected format {_FORMAT!r}).")
    if payload.get("version") != _VERSION:
        raise CheckpointError(f"{path!r} has version {payload.get('version')!r}; this library reads {_VERSION}.")
    for key in ("builder", "config", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path!r} lacks the entry {key!r} (corrupt checkpoint).")
    return payload


def load_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved with :func:`save_model` and load its weights (validated, all-or-nothing)."""
    payload = read_checkpoint(path)
    builder = _BUILDERS.get(payload["builder"])
    if builder is None:
        raise CheckpointError(
            f"{os.fspath(path)!r} holds a {payload['builder']!r}; known builders: {sorted(_BUILDERS)}."
        )
    model = builder(payload["config"])
    dtypes = {v.dtype for v in payload["state_dict"].values() if isinstance(v, Tensor) and v.is_floating_point()}
    if len(dtypes) == 1:  # rebuild in the precision the model was saved in
        model = model.to(dtypes.pop())
    try:
        model.load_state_dict(payload["state_dict"])
    except ConstraintError:
        raise
    except CheckpointError as exc:
        raise CheckpointError(f"{os.fspath(path)!r}: {exc}") from None
    return model
