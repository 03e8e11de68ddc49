"""The one atomic writer of the library (models, checkpoints, JSON, figures, benchmark results).

Every file the library writes goes through :func:`atomic_write`: the content is written to a temporary file in the
destination directory, flushed and ``fsync``-ed, given the mode a plain :func:`open` would give it (``0o666`` minus
the umask, not ``mkstemp``'s ``0o600``), and moved into place with :func:`os.replace`, which is atomic on POSIX and
Windows. An interrupted write leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "default_file_mode"]


def default_file_mode() -> int:
    """``0o666`` minus the process umask: the mode :func:`open` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary binary file beside ``path``, fsync it, then rename it onto ``path``.

    The parent directory is created if needed. On any error (or interruption) the temporary file is removed and
    ``path`` is left as it was.

    Args:
        path: destination.
        write: writes the content into the open binary file it is given (e.g. ``lambda f: torch.save(obj, f)``).

    Returns:
        The destination as a :class:`~pathlib.Path`.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> atomic_write(p, lambda f: f.write(b"abc")).read_bytes()
    b'abc'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def finite_json(x: Any) -> Any:
    """``x`` (nested dicts, lists, tuples, floats) with every non-finite float replaced by ``None``, so that
    ``json.dumps(..., allow_nan=False)`` writes strict JSON (``NaN``/``Infinity`` are not JSON).
    """
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x
