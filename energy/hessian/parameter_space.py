"""Parameter space and data of the matrix-free operators: named blocks <-> one flat vector (``vec_r`` per block),
and the checks of ``model``, ``data`` and ``reduction`` run once when an operator is built (MATH §0, §3.7).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from energy._validation import EnergyInputError, check_scalar_objective

__all__ = ["ParameterSpace", "Reduction"]

Reduction = Literal["mean", "sum"]


class ParameterSpace:
    """The flat coordinate system of a list of named parameters: blocks concatenated, each ``vec_r``-flattened.

    Args:
        model: the module owning the parameters.
        names: parameter names as in ``model.named_parameters()``; ``None`` = all parameters requiring grad.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise EnergyInputError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        available = dict(model.named_parameters())
        if names is None:
            names = [n for n, p in available.items() if p.requires_grad]
        elif isinstance(names, str):
            names = [names]
        names = list(names)
        if not names:
            raise EnergyInputError("`params` is empty; name at least one parameter of the model.")
        seen = set()
        for n in names:
            if not isinstance(n, str):
                raise EnergyInputError(f"`params` must be parameter names (str), got {type(n).__name__} {n!r}.")
            if n not in available:
                close = difflib.get_close_matches(n, list(available), n=3)
                hint = f" Did you mean {close}?" if close else ""
                listing = ", ".join(list(available)[:12]) + (" ..." if len(available) > 12 else "")
                raise EnergyInputError(
                    f"`params`: {n!r} is not a parameter of the model.{hint} Available names: {listing}."
                )
            if n in seen:
                raise EnergyInputError(f"`params`: {n!r} is listed twice; each block may appear once.")
            seen.add(n)
        dtypes = {available[n].dtype for n in names}
        if len(dtypes) > 1:
            raise EnergyInputError(f"`params` mix dtypes {sorted(map(str, dtypes))}; cast the model with `.to(dtype)`.")
        self.names: tuple[str, ...] = tuple(names)
        self.shapes: tuple[torch.Size, ...] = tuple(available[n].shape for n in names)
        self.sizes: tuple[int, ...] = tuple(int(math.prod(s)) for s in self.shapes)
        self.offsets: tuple[int, ...] = tuple(int(o) for o in np.cumsum((0,) + self.sizes[:-1]))
        self.dim = int(sum(self.sizes))
        self.dtype = available[names[0]].dtype
        self.device = available[names[0]].device

    def slice(self, name: str) -> slice:
        """Index range of block ``name`` inside the flat vector."""
        if name not in self.names:
            raise EnergyInputError(f"block {name!r} is not part of this operator's parameters {list(self.names)}.")
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    def split(self, V: Tensor) -> dict[str, Tensor]:
        """``(dim, k)`` -> ``{name: (k, *shape)}`` (views where possible)."""
        k = V.shape[1]
        return {
            n: V[o : o + s].T.reshape(k, *shp)
            for n, o, s, shp in zip(self.names, self.offsets, self.sizes, self.shapes)
        }

    def join(self, blocks: dict[str, Tensor]) -> Tensor:
        """``{name: (k, *shape)}`` -> ``(dim, k)``."""
        return torch.cat([blocks[n].reshape(blocks[n].shape[0], -1) for n in self.names], dim=1).T

    def flatten(self, tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """One vector per block (dict by name, or a list in block order) -> flat ``(dim,)`` vector."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """Flat ``(dim,)`` vector -> ``{name: tensor of the parameter's shape}``."""
        return {n: v[o : o + s].reshape(shp) for n, o, s, shp in zip(self.names, self.offsets, self.sizes, self.shapes)}


# --------------------------------------------------------------------------------------------------------------
# Data and loss
# --------------------------------------------------------------------------------------------------------------


def _check_data(data: object) -> list[tuple[Any, Any]] | Iterable:
    if isinstance(data, (Iterator,)) or (hasattr(data, "__iter__") and iter(data) is data):  # type: ignore[arg-type]
        raise EnergyInputError(
            "`data` is a one-shot iterator; every product traverses the data again, so pass a re-iterable "
            "collection, e.g. `list(batches)` or a DataLoader."
        )
    if not hasattr(data, "__iter__"):
        raise EnergyInputError(f"`data` must be an iterable of (inputs, targets) batches, got {type(data).__name__}.")
    return data


def _check_deterministic_model(model: nn.Module) -> None:
    """Curvature of a random or batch-coupled forward pass is ill-defined: refuse active dropout / batch norm."""
    for name, m in model.named_modules():
        active_dropout = isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
        train_bn = isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        if active_dropout or train_bn:
            raise EnergyInputError(
                f"module {name or type(m).__name__!r} ({type(m).__name__}) is in training mode, so the forward pass is "
                "random or depends on the batch composition; call `model.eval()` before building the operator."
            )


def _resolve_reduction(loss_fn: Callable, reduction: str | None) -> Reduction:
    own = getattr(loss_fn, "reduction", None)
    if reduction is None:
        if own in ("mean", "sum"):
            return own  # type: ignore[return-value]
        raise EnergyInputError(
            "`reduction` is required: pass reduction='mean' (objective = Σ_b (N_b/N) ℓ_b, the data-set mean for a "
            "batch-averaging loss) or reduction='sum' (objective = Σ_b ℓ_b)."
        )
    if reduction not in ("mean", "sum"):
        raise EnergyInputError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")
    if own in ("mean", "sum") and own != reduction:
        raise EnergyInputError(
            f"`reduction`={reduction!r} contradicts `loss_fn.reduction`={own!r}; construct the loss with "
            f"reduction={reduction!r} so that the batch loss and the data-set weights agree."
        )
    if own == "none":
        raise EnergyInputError("`loss_fn` has reduction='none' but must return a scalar per batch.")
    return reduction  # type: ignore[return-value]



def free_and_fixed(model: nn.Module, space: ParameterSpace) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The detached free parameters of ``space`` (in block order: the ``vmap`` / ``jvp`` pytree structure) and
    everything held fixed (the other parameters and the buffers), as ``functional_call`` takes them.
    """
    named = dict(model.named_parameters())
    free = {n: named[n].detach() for n in space.names}
    fixed = {n: p.detach() for n, p in named.items() if n not in space.names}
    fixed.update(dict(model.named_buffers()))
    return free, fixed


def _check_finite_leaves(obj: Any, where: str) -> None:
    """Reject NaN/inf in every floating tensor of a batch (concrete data, read once at construction)."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            raise EnergyInputError(
                f"`data` {where} contains NaN or inf entries (it must be finite: every curvature product would be "
                "NaN). Remove or impute those samples before building the operator."
            )
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            _check_finite_leaves(item, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            _check_finite_leaves(item, f"{where}[{key!r}]")


def _floating_leaves(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _floating_leaves(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _floating_leaves(item)


def check_first_batch(model: nn.Module, loss_fn: Callable[[Tensor, Any], Tensor] | None, data: Iterable,
                      dtype: torch.dtype) -> None:
    """Run ``model`` (and ``loss_fn``) once on the first batch at construction, so that data of the wrong dtype or
    shape, or a target the loss would broadcast, is reported here (naming ``data``) and not by torch at the first
    product. Checks: the inputs' floating leaves have the parameters' ``dtype``; the forward succeeds and returns
    one tensor; a floating target has the outputs' shape (a different shape is broadcast by e.g. ``mse_loss`` into
    a different loss); the loss is a finite scalar.
    """
    batch = next(iter(data), None)
    if batch is None:
        return
    X, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
    for leaf in _floating_leaves(X):
        if leaf.dtype != dtype:
            raise EnergyInputError(
                f"`data` batch 0 has inputs of dtype {leaf.dtype} but the model's parameters are {dtype}; cast the "
                f"data (`X.to({dtype})`) or the model (`model.to({leaf.dtype})`)."
            )
    with torch.no_grad():
        try:
            o = model(X)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise EnergyInputError(
                f"`model` fails on `data` batch 0 (inputs of shape {_shape_of(X)}): {exc}. Check that the batches "
                "are (inputs, targets) pairs shaped as the model expects."
            ) from exc
        if not isinstance(o, Tensor):
            raise EnergyInputError(f"`model` must return one tensor of outputs, got {type(o).__name__}.")
        if loss_fn is None:
            return
        if isinstance(y, Tensor) and y.is_floating_point() and y.shape != o.shape:
            raise EnergyInputError(
                f"`data` batch 0 has targets of shape {tuple(y.shape)} but the model's outputs have shape "
                f"{tuple(o.shape)}; the loss would broadcast them into a different loss. Reshape the targets to "
                f"{tuple(o.shape)} (e.g. `y.reshape(o.shape)` / `y.unsqueeze(-1)`)."
            )
        try:
            loss = loss_fn(o, y)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise EnergyInputError(
                f"`loss_fn` fails on the outputs (shape {tuple(o.shape)}) and targets ({_shape_of(y)}) of `data` "
                f"batch 0: {exc}."
            ) from exc
    check_scalar_objective(
        loss, "loss_fn(o, y)", where="on `data` batch 0", fix_scalar="use reduction='mean' or 'sum' in the loss",
        fix_finite="Check the targets' range (e.g. class indices < number of outputs) and the data's scale.")


def _shape_of(obj: Any) -> str:
    return f"tensor of shape {tuple(obj.shape)}" if isinstance(obj, Tensor) else type(obj).__name__


def check_batches(data: Iterable, batch_size_fn: Callable[[Any], int], *, pairs: bool = True) -> tuple[int, ...]:
    """Validate every batch once (shape of the pair, finite floating entries) and return the batch sizes ``N_b``.

    Args:
        data: the re-iterable batches.
        batch_size_fn: ``N_b`` from a batch's inputs.
        pairs: batches must be ``(inputs, targets)`` pairs (else a bare input or a pair is accepted).
    """
    sizes = []
    for i, batch in enumerate(data):
        if pairs and (not isinstance(batch, (tuple, list)) or len(batch) != 2):
            raise EnergyInputError(f"`data` batch {i} must be a pair (inputs, targets), got {type(batch).__name__}.")
        _check_finite_leaves(batch, f"batch {i}")
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        sizes.append(int(batch_size_fn(inputs)))
    return tuple(sizes)
