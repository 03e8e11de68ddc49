"""Atomic file output and JSON conversion for the figure pipeline.

Every file the pipeline writes goes through the library's one atomic writer (:mod:`energy._io`, re-exported here as
:func:`atomic_write_bytes` / :func:`atomic_write_text`): the content is written to a temporary file in the destination
directory, fsync-ed and moved into place with :func:`os.replace`, which is atomic on POSIX and Windows. An
interrupted run therefore leaves either the old file or the new one, never a truncated one — which is what makes
"skip figures whose JSON exists" a safe resume rule.

Large arrays (e.g. the boolean masks of region plots) are stored in the JSON as :func:`encode_array` records
(zlib-compressed, base64) so that the data file stays small and round-trips exactly.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from energy._io import atomic_write_bytes, atomic_write_text

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "read_json",
    "save_figure",
    "to_jsonable",
    "encode_array",
    "decode_array",
]


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` recursively into plain JSON types.

    Tensors and NumPy arrays become nested lists, NumPy/torch scalars become Python numbers, tuples become lists,
    paths become strings. Non-finite floats are kept (Python's ``json`` writes them as ``NaN``/``Infinity`` and
    reads them back); a diverging run must be recorded, not hidden.

    Raises:
        TypeError: for objects with no JSON meaning (names the offending type).
    """
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().numpy())
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be str, got key {k!r} of type {type(k).__name__}")
            out[k] = to_jsonable(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    raise TypeError(
        f"cannot store an object of type {type(obj).__name__} in figure JSON; "
        "return numbers, strings, lists, dicts, tensors or arrays from compute()"
    )


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` (after :func:`to_jsonable`) as indented JSON, atomically."""
    text = json.dumps(to_jsonable(obj), indent=1, allow_nan=True)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{os.fspath(path)}: not valid JSON ({exc}); the file is corrupt or truncated — delete "
                             "it and rerun the figure that writes it.") from None


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 150) -> Path:
    """Save a matplotlib figure atomically; the format is taken from the suffix of ``path`` (``.png``, ``.pdf``)."""
    if not callable(getattr(fig, "savefig", None)):
        raise TypeError(f"`fig` must be a matplotlib Figure (with a .savefig method), got {type(fig).__name__}; "
                        "pass e.g. the `fig` of `fig, ax = plt.subplots()`.")
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if not fmt:
        raise ValueError(f"path {str(path)!r} needs a suffix such as .png or .pdf to choose the image format")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def encode_array(a: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """Encode an array as a compact, exact JSON record ``{"dtype", "shape", "zlib_base64"}``.

    Use it for large arrays (image masks, grids) that would make a nested list of numbers unreadably long.
    :func:`decode_array` inverts it bit for bit.
    """
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.ascontiguousarray(a)
    payload = base64.b64encode(zlib.compress(a.tobytes(), 6)).decode("ascii")
    return {"dtype": a.dtype.str, "shape": list(a.shape), "zlib_base64": payload}


def decode_array(record: Mapping[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_array`."""
    missing = {"dtype", "shape", "zlib_base64"} - set(record)
    if missing:
        raise ValueError(f"array record lacks keys {sorted(missing)}; expected a dict made by encode_array()")
    raw = zlib.decompress(base64.b64decode(record["zlib_base64"]))
    shape = tuple(int(s) for s in record["shape"])
    a = np.frombuffer(raw, dtype=np.dtype(record["dtype"]))
    if a.size != math.prod(shape):
        raise ValueError(f"array record is corrupt: {a.size} elements for shape {shape}")
    return a.reshape(shape).copy()


