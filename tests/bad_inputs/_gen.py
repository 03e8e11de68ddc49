"""Generators of the systematic kinds of bad input (one function per kind family), shared by the case tables."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

from ._case import FIX, Case

f64 = torch.float64


def arg(name: str) -> str:
    """The regex that a message names the argument ``name`` (backquoted or as a word)."""
    return rf"`{re.escape(name)}`|\b{re.escape(name)}\b"


def with_nan(x: torch.Tensor, value: float = math.nan) -> torch.Tensor:
    y = x.clone()
    y.view(-1)[0] = value
    return y


def _tensors(result: object) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _tensors(r)]
    if isinstance(result, dict):
        return [t for r in result.values() for t in _tensors(r)]
    if isinstance(result, torch.nn.Module):
        return [*result.parameters(), *result.buffers()]
    return []


def all_meta(result: object) -> bool:
    """Meta in, meta out: shape inference on the meta device is a correct answer."""
    ts = _tensors(result)
    return bool(ts) and all(t.is_meta for t in ts)


def all_finite(result: object) -> bool:
    """A finite (possibly empty) result: e.g. the empty output of an empty input is a correct answer."""
    ts = _tensors(result)
    return bool(ts) and all(not t.is_floating_point() or bool(torch.isfinite(t).all()) for t in ts)


def tensor_cases(prefix: str, name: str, make: Callable[[object], object], good: torch.Tensor, *,
                 kinds: tuple[str, ...] = ("list", "int", "bool", "complex", "float32", "nan", "inf", "meta",
                                           "rank", "zero"),
                 zero_dim: int = -2, exc=(ValueError, TypeError)) -> list[Case]:
    """Bad values of the tensor argument ``name``: ``make(x)`` makes the call with ``x`` in its place (``good`` is a
    valid value). ``zero_dim`` is the dimension emptied by the "zero" kind (tokens by default)."""
    a = arg(name)
    table: dict[str, tuple[Callable[[], object], tuple[str, ...]]] = {
        "list": (lambda: make(good.tolist()), (a, r"(?i)tensor")),
        "int": (lambda: make(good.round().long()), (a, r"(?i)float|cast|convert|\.to\(")),
        "bool": (lambda: make(good > 0), (a, r"(?i)float|cast|convert|\.to\(")),
        "complex": (lambda: make(good.to(torch.complex128)), (a, r"(?i)float|real|complex")),
        "float32": (lambda: make(good.float()), (a, r"(?i)dtype|float32|float64|cast")),
        "nan": (lambda: make(with_nan(good)), (a, r"(?i)nan|finite")),
        "inf": (lambda: make(with_nan(good, math.inf)), (a, r"(?i)inf|finite")),
        "meta": (lambda: make(good.to("meta")), (a, r"(?i)meta|device|cpu|cuda")),
        "rank": (lambda: make(good.reshape(-1) if good.ndim > 1 else good[None, None]),
                 (a, r"(?i)dimension|shape|ndim|rank")),
        "zero": (lambda: make(good.narrow(zero_dim, 0, 0)), (a, r"(?i)empty|zero|at least|size|shape|\b0\b")),
    }
    accept = {"meta": all_meta, "zero": all_finite}
    return [Case(f"{prefix}:{name}-{k}", table[k][0], table[k][1] + (FIX,), exc=exc, accept=accept.get(k))
            for k in kinds]


def scalar_cases(prefix: str, name: str, make: Callable[[object], object], *,
                 bad: tuple[tuple[str, object], ...] = (("neg", -1.0), ("zero", 0.0), ("nan", math.nan),
                                                          ("inf", math.inf), ("bool", True), ("str", "1")),
                 exc=(ValueError, TypeError)) -> list[Case]:
    """Out-of-range or wrong-type scalars for the argument ``name``."""
    return [Case(f"{prefix}:{name}={label}", (lambda v=v: make(v)), (arg(name), FIX), exc=exc) for label, v in bad]


def enum_case(prefix: str, name: str, make: Callable[[object], object], bad: object = "bogus",
              exc=(ValueError, TypeError)) -> Case:
    """A wrong string for the enum argument ``name``: the message must name it and list the valid choices."""
    return Case(f"{prefix}:{name}={bad}", lambda: make(bad), (arg(name), r"(?i)one of|valid|choose|must be|expected|"
                r"choices|options|'[a-z_]+'"), exc=exc)
