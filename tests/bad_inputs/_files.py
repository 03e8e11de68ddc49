"""Bad files, made once per process in a temporary directory: missing, a directory, 0 bytes, corrupt, wrong format."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path


@functools.cache
def tmp() -> Path:
    """The process's scratch directory, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    atexit.register(_remove, path)
    return path


def _remove(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_dir():
            os.chmod(p, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def missing() -> Path:
    return tmp() / "no_such_file.pt"


def directory() -> Path:
    p = tmp() / "a_directory"
    p.mkdir(exist_ok=True)
    return p


def empty() -> Path:
    p = tmp() / "empty.pt"
    p.write_bytes(b"")
    return p


def corrupt() -> Path:
    p = tmp() / "corrupt.pt"
    p.write_bytes(b"PK\x03\x04 this is not a torch file \x00\xff" * 4)
    return p


def json_file() -> Path:
    p = tmp() / "wrong_format.pt"
    p.write_text(json.dumps({"not": "a model"}))
    return p


def corrupt_json() -> Path:
    p = tmp() / "corrupt.json"
    p.write_text('{"a": [1, 2')
    return p


def a_file() -> Path:
    """A regular file, used as a parent directory (``<file>/sub``) to provoke NotADirectoryError."""
    p = tmp() / "plain_file"
    p.write_text("x")
    return p


def under_a_file(name: str = "out.pt") -> Path:
    return a_file() / name


def unwritable_dir() -> Path:
    """A directory without write permission (root can still write: the cases using it are skipped as root)."""
    p = tmp() / "read_only"
    p.mkdir(exist_ok=True)
    os.chmod(p, 0o500)
    return p


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
