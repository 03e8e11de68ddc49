"""The one model-file format of the library: models, training checkpoints, and their validated loading.

A model file is a ``torch.save`` dict (read back with ``weights_only=True``)::

    {"format": "unfold-model", "version": 2,
     "builder": "Unrolled" | "UnrolledClassifier" | None,   # how load_model rebuilds it (None: no builder)
     "config": {...} | None,                                 # the builder's JSON-serialisable arguments
     "state_dict": {...},                                    # model.state_dict()
     "training": None | {"optimizer": {...}, "step": int, "rng_state": uint8 tensor, "history": [float], "meta": {}},
     "extra": {...}}                                         # free-form (task, seed, accuracy, …)

:func:`save_model` writes a model (``training = None``); :func:`unfold.train.save_checkpoint` writes the same format
with the training state (and, when the model has a registered builder, its builder and config, so
:func:`load_model` opens a training checkpoint as well). Every write goes through :func:`energy._io.atomic_write`
(fsync, normal file mode, atomic rename).

Version history (:data:`VERSION`):

* ``"unfold-model"`` version 1 — ``builder, config, state_dict, extra`` (models of :func:`save_model` only);
* ``"unfold.train.checkpoint/1"`` — the training checkpoints of :mod:`unfold.train` (then ``unfold.train``)
  before version 2: ``step, model, optimizer, rng_state, history, meta``;
* ``"unfold-model"`` version 2 — one format for both: the fields above, ``builder`` / ``config`` optional,
  ``training`` optional.

:func:`read_model_file` migrates both older layouts to version 2 in memory (nothing to convert by hand); to rewrite
an old file in the current version, ``write_model_file(path, **read_model_file(path))``. A file of a newer version
is refused with a message naming both versions.

Loading a state dict (:func:`safe_load_state_dict`) is validated and all-or-nothing: keys, dtypes, shapes, finite
values and the named constraints of parametrised weights are checked before the module is touched.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from energy._io import atomic_write
from energy._validation import ConstraintError, EnergyInputError
from unfold.parametrizations import check_constraints, constraints_of

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "register_builder",
    "builder_of",
    "save_model",
    "load_model",
    "write_model_file",
    "read_model_file",
    "check_state_dict",
    "safe_load_state_dict",
    "constrained_state_dict",
]

FORMAT = "unfold-model"
"""Value of the ``"format"`` entry of every model file and training checkpoint the library writes."""
VERSION = 2
"""Version of the layout :func:`write_model_file` writes (see the module docstring for the history)."""
_LEGACY_TRAIN_FORMAT = "unfold.train.checkpoint/1"
_TRAINING_KEYS = ("optimizer", "step", "rng_state", "history", "meta")

Builder = Callable[[dict[str, Any]], nn.Module]


class CheckpointError(EnergyInputError):
    """A model file or state dict cannot be used: unreadable, not ours, or not matching the model / optimiser.
    Nothing was loaded.
    """


# ---------------------------------------------------------------------------------------------------- state dicts


def _parametrized_tensors(module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{"prefix.tensor": (owner, tensor)}`` for every parametrised tensor of ``module`` (not counting tensors
    internal to a parametrisation, e.g. the orthogonal basis inside :class:`~unfold.parametrizations.OrthogonalHeads`,
    which its owner's ``right_inverse`` sets).
    """
    out: dict[str, tuple[nn.Module, str]] = {}
    for prefix, mod in module.named_modules():
        if "parametrizations." in prefix or prefix.startswith("parametrizations"):
            continue
        if parametrize.is_parametrized(mod):
            for tname in mod.parametrizations:
                out[f"{prefix}.{tname}" if prefix else tname] = (mod, tname)
    return out


def _orig_prefix(qualified: str) -> str:
    owner, _, tname = qualified.rpartition(".")
    return (f"{owner}." if owner else "") + f"parametrizations.{tname}."


def constrained_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """State dict with every parametrised tensor given by its *constrained value* (``"ffn.W_f"``) instead of its
    unconstrained original (``"ffn.parametrizations.W_f.original"``): a format independent of the
    parametrisation's internals, which :func:`safe_load_state_dict` checks against the constraints when loading.
    """
    ptensors = _parametrized_tensors(module)
    prefixes = tuple(_orig_prefix(q) for q in ptensors)
    out = {key: value for key, value in module.state_dict().items() if not key.startswith(prefixes)}
    for q, (owner, tname) in ptensors.items():
        out[q] = getattr(owner, tname).detach().clone()
    return out


def _listing(keys: list[str], limit: int = 8) -> str:
    return f"{keys[:limit]}{' …' if len(keys) > limit else ''}"


def check_state_dict(module: nn.Module, state_dict: object, *, source: str = "the state dict",
                     hint: str = "") -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` can be loaded into ``module`` exactly as it is.

    Accepts the module's own state dict or a :func:`constrained_state_dict`. Checks: a mapping of tensors; the key
    sets (missing and unexpected keys are listed); dtypes (no silent cast); shapes; floating-point entries finite.
    Nothing is loaded. ``source`` names the file in the messages, ``hint`` is appended to the architecture message.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: a state dict must be a dict of tensors, got {type(state_dict).__name__}.")
    own = module.state_dict()
    ptensors = _parametrized_tensors(module)
    plain = {q: (getattr(o, t).dtype, tuple(getattr(o, t).shape)) for q, (o, t) in ptensors.items() if q in state_dict}
    replaced = tuple(_orig_prefix(q) for q in plain)
    want = {k: (v.dtype, tuple(v.shape)) for k, v in own.items() if not k.startswith(replaced)} | plain
    missing = sorted(want.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - want.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model: "
            + (f"missing keys {_listing(missing)}; " if missing else "")
            + (f"unexpected keys {_listing(unexpected)}; " if unexpected else "")
            + "it was saved from another architecture (schedule, depth, tied flag, options). Build the model with "
            f"the configuration it was saved with{hint}. Nothing was loaded."
        )
    for k, v in state_dict.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor (corrupt file).")
    wrong_dtype = [(k, state_dict[k].dtype, dt) for k, (dt, _) in want.items() if state_dict[k].dtype != dt]
    if wrong_dtype:
        k, a, b = wrong_dtype[0]
        raise CheckpointError(f"{source}: {k!r} has dtype {a} but the model's is {b}; convert the model with "
                              f"`model.to({a})` before loading, so no value is silently cast. Nothing was loaded.")
    bad = [(k, tuple(state_dict[k].shape), s) for k, (_, s) in want.items() if tuple(state_dict[k].shape) != s]
    if bad:
        lines = "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in bad[:8])
        raise CheckpointError(f"{source}: shape mismatch ({lines}); it was saved from a model of another size. "
                              "Nothing was loaded.")
    for k, v in state_dict.items():  # values are concrete here: a file or a state dict, never a traced input
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: entry {k!r} contains NaN or inf (corrupt or diverged); nothing was "
                                  "loaded.")


def safe_load_state_dict(module: nn.Module, state_dict: Mapping[str, Any], *,
                         _inner: Callable[..., Any] | None = None, source: str = "the state dict") -> Any:
    """Load ``state_dict`` into ``module`` all-or-nothing, with clear errors.

    :func:`check_state_dict` first; then, for constrained values, each named constraint
    (:class:`~energy.ConstraintError` naming it). The load happens on a copy first; the module is only touched once
    everything has passed.

    Raises:
        CheckpointError: keys, dtypes, shapes or values do not match the model.
        ConstraintError: a constrained weight violates its constraint.
    """
    check_state_dict(module, state_dict, source=source)
    ptensors = _parametrized_tensors(module)
    plain = {q: state_dict[q] for q in ptensors if q in state_dict}
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
    cand_sd.update({k: v for k, v in state_dict.items() if k not in plain})
    nn.Module.load_state_dict(candidate, cand_sd, strict=True)
    check_constraints(candidate)
    inner = _inner if _inner is not None else (lambda sd, strict: nn.Module.load_state_dict(module, sd, strict=strict))
    return inner(candidate.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------------------- the format

_BUILDERS: dict[str, Builder] = {}


def register_builder(name: str, from_config: Builder) -> None:
    """Register ``from_config(config) -> nn.Module`` so :func:`load_model` rebuilds models of class ``name``."""
    if not isinstance(name, str) or not name:
        raise EnergyInputError(f"`name` must be a non-empty string (the model's class name), got {name!r}.")
    if not callable(from_config):
        raise EnergyInputError(f"`from_config` must be a callable builder `from_config(config) -> nn.Module` (e.g. "
                               f"the model class's from_config classmethod), got {type(from_config).__name__} "
                               f"{from_config!r}.")
    _BUILDERS[name] = from_config


def builder_of(model: nn.Module) -> tuple[str | None, dict[str, Any] | None]:
    """``(class name, model.config())`` if :func:`load_model` can rebuild ``model``, else ``(None, None)``."""
    kind = type(model).__name__
    config = getattr(model, "config", None)
    if kind in _BUILDERS and callable(config):
        return kind, config()
    return None, None


def write_model_file(path: str | os.PathLike[str], state_dict: Mapping[str, Any], *, builder: str | None = None,
                     config: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
                     extra: dict[str, Any] | None = None, **_ignored: Any) -> Path:
    """Write one model file of the current :data:`VERSION` atomically (:func:`energy._io.atomic_write`).

    ``training`` holds ``optimizer, step, rng_state, history, meta`` (a training checkpoint) or is ``None`` (a model).
    Extra keyword arguments (``format``, ``version`` of a dict returned by :func:`read_model_file`) are ignored, so
    ``write_model_file(p, **read_model_file(p))`` rewrites an old file in the current version.
    """
    if training is not None and set(training) != set(_TRAINING_KEYS):
        raise EnergyInputError(f"`training` must have exactly the entries {list(_TRAINING_KEYS)}, "
                               f"got {sorted(training)}.")
    payload = {"format": FORMAT, "version": VERSION, "builder": builder, "config": config,
               "state_dict": dict(state_dict), "training": training, "extra": dict(extra or {})}
    return atomic_write(path, lambda f: torch.save(payload, f))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _migrate(payload: dict[str, Any], where: str) -> dict[str, Any]:
    """The payload of any known format / version as a version-2 dict."""
    fmt, version = payload.get("format"), payload.get("version")
    if fmt == _LEGACY_TRAIN_FORMAT:  # the training checkpoints of unfold.train before version 2
        missing = [k for k in ("model", *_TRAINING_KEYS) if k not in payload]
        if missing:
            raise CheckpointError(f"{where} (a training checkpoint of format {fmt!r}) lacks the entries {missing}.")
        training = {k: payload[k] for k in _TRAINING_KEYS}
        return {"format": FORMAT, "version": VERSION, "builder": None, "config": None,
                "state_dict": payload["model"], "training": training, "extra": {}}
    if fmt != FORMAT:
        got = repr(fmt) if "format" in payload else "no 'format' entry"
        raise CheckpointError(f"{where} is not an unfold model file (format {got}; expected {FORMAT!r}): not a "
                              "model of unfold.save_model, not a checkpoint of unfold.train.")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where} has an invalid version {version!r} (expected an integer 1 … {VERSION}).")
    if version > VERSION:
        raise CheckpointError(f"{where} has version {version}, written by a newer unfold; this library reads versions "
                              f"1 … {VERSION}. Upgrade unfold to read it.")
    required = ("builder", "config", "state_dict") if version == 1 else ("builder", "config", "state_dict", "training")
    missing = [k for k in required if k not in payload]
    if missing:
        raise CheckpointError(f"{where} (version {version}) lacks the entries {missing} (corrupt file).")
    out = {"format": FORMAT, "version": VERSION, "training": None, "extra": {}, **payload}
    out["version"] = VERSION
    return out


def _check_training(training: object, where: str) -> None:
    if not isinstance(training, Mapping) or any(k not in training for k in _TRAINING_KEYS):
        raise CheckpointError(f"{where}: the training state must hold {list(_TRAINING_KEYS)} (corrupt file).")
    step, history = training["step"], training["history"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(history, list) \
            or len(history) != step:
        n = len(history) if isinstance(history, list) else type(history).__name__
        raise CheckpointError(f"{where}: inconsistent step ({step!r}) and loss history (length {n}).")
    rng = training["rng_state"]
    if not isinstance(rng, Tensor) or rng.dtype != torch.uint8:
        raise CheckpointError(f"{where}: the saved random number generator state is invalid.")
    if not isinstance(training["meta"], Mapping) or not isinstance(training["optimizer"], Mapping):
        raise CheckpointError(f"{where}: the saved meta data or optimizer state is not a dict (corrupt file).")


def read_model_file(path: str | os.PathLike[str], *, training: bool = False) -> dict[str, Any]:
    """Read, validate and migrate a model file to a version-2 dict (see the module docstring).

    Args:
        path: a file written by :func:`save_model`, :func:`unfold.train.save_checkpoint`, or an older version.
        training: require the training state (a checkpoint to resume from).

    Raises:
        CheckpointError: the file is missing, empty, unreadable, foreign, of a newer version, or incomplete; the
            message names the file and what is wrong.
    """
    p = Path(path)
    where = f"model file {os.fspath(path)!r}"
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {os.fspath(path)!r}: the file does not exist.")
    if not p.is_file():
        raise CheckpointError(f"{where} is not a regular file (a directory?); pass the path of the file itself.")
    data = p.read_bytes()
    if not data:
        raise CheckpointError(f"cannot read the {where}: it is empty (0 bytes), so it is corrupt or its write never "
                              "finished. Write it again (or pass resume=False (--no-resume on the command line) to "
                              "start a run afresh).")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / not a torch file / unpickling refused: the file is unusable, say so
        raise CheckpointError(f"cannot read the {where}: it is corrupt or not a torch file ({_first_line(exc)}). "
                              "Write it again (or pass resume=False (--no-resume on the command line) to start a run "
                              "afresh).") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{where} is not an unfold model file (it holds a {type(payload).__name__}, expected "
                              f"a dict of format {FORMAT!r}).")
    out = _migrate(payload, where)
    if not isinstance(out["state_dict"], Mapping):
        raise CheckpointError(f"{where}: the state dict is a {type(out['state_dict']).__name__}, not a dict "
                              "(corrupt file).")
    if out["training"] is not None:
        _check_training(out["training"], where)
    elif training:
        raise CheckpointError(f"{where} holds a model without training state (written by save_model), so no run "
                              "can resume from it; load it with unfold.load_model, or start afresh (resume=False "
                              "(--no-resume on the command line)).")
    return out


def save_model(model: nn.Module, path: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (builder, config, state dict, ``extra``) as a model file (atomic, fsync-ed).

    ``model`` must have ``config()`` and its class name registered with :func:`register_builder`.
    """
    builder, config = builder_of(model)
    if builder is None:
        raise EnergyInputError(f"cannot save a {type(model).__name__}: no builder registered (known: "
                               f"{sorted(_BUILDERS)}); save it with unfold.train.save_checkpoint instead.")
    return write_model_file(path, model.state_dict(), builder=builder, config=config, extra=extra)


def load_model(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model from a model file (or a training checkpoint of a registered model) and load its weights
    (validated, all-or-nothing), in the precision it was saved in.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise EnergyInputError(f"`path` must be a file path (str or os.PathLike), got {type(path).__name__} {path!r}; "
                               "pass the path of a file written by unfold.save_model.")
    payload = read_model_file(path)
    where = f"model file {os.fspath(path)!r}"
    name = payload["builder"]
    if name is None:
        raise CheckpointError(f"{where} records no builder (a training checkpoint of a model unfold cannot rebuild); "
                              "build the model yourself and load it with unfold.train.load_checkpoint(path, model).")
    builder = _BUILDERS.get(name)
    if builder is None:
        raise CheckpointError(f"{where} holds a {name!r}; known builders: {sorted(_BUILDERS)}.")
    if not isinstance(payload["config"], dict):
        raise CheckpointError(f"{where}: the config is a {type(payload['config']).__name__}, not a dict.")
    model = builder(payload["config"])
    dtypes = {v.dtype for v in payload["state_dict"].values() if isinstance(v, Tensor) and v.is_floating_point()}
    if len(dtypes) == 1:  # rebuild in the precision the model was saved in
        model = model.to(dtypes.pop())
    try:
        model.load_state_dict(payload["state_dict"])
    except ConstraintError:
        raise
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return model
