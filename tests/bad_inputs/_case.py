"""One bad-input case and its classification: clear / unclear / silent / traceback.

* ``clear``: an API call raises the expected error type (a ValueError/TypeError/OSError-family error, or emits the
  expected warning), and the message matches every regex (the argument's name and the fix); a command line exits
  with an expected code (2 usage, 1 runtime), no traceback, and its one error line on stderr matches every regex.
* ``unclear``: another exception type, or a message that does not match.
* ``silent``: the call returned (a command line exited 0) without an error: a silent wrong answer.
* ``traceback``: a command line printed a traceback or let an exception escape ``main``.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: The fix, in the words error messages use: what to do, or what was expected.
FIX = (r"(?i)\b(use|pass|give|cast|convert|call|choose|set|remove|drop|try|must|expected|expects|should|one of|"
       r"valid|instead|omit|rerun|check|clean|wrap|at least|at most|needs?|requires?)\b")

STATUSES = ("clear", "unclear", "silent", "traceback", "skipped")


@dataclass
class Outcome:
    """What a command line did: its exit code (``None`` = an exception escaped), stdout and stderr."""

    code: int | None
    out: str
    err: str
    escaped: BaseException | None = None


@dataclass
class Case:
    """A bad call and the clear answer it must get.

    ``call`` makes the bad call (for a command line it returns an :class:`Outcome`, see :func:`run_main` and
    :func:`run_module`); ``exc`` the accepted exception type(s) (or ``warns``: the accepted warning, for inputs
    that are accepted with a warning); ``match`` regexes the message must all match (``re.search``); ``codes`` the
    accepted exit codes of a command line.
    """

    id: str
    call: Callable[[], object]
    match: Sequence[str] = ()
    exc: type[BaseException] | tuple[type[BaseException], ...] = (ValueError, TypeError)
    warns: type[Warning] | None = None
    cli: bool = False
    codes: tuple[int, ...] = (2,)
    skip: Callable[[], str | None] | None = None
    """A reason to skip the case here (e.g. running as root, where no directory is unwritable), or None."""
    accept: Callable[[object], bool] | None = None
    """A return value that is a correct answer (e.g. meta in → meta out, an empty result for zero tokens)."""
    marks: list = field(default_factory=list)


def run_main(main: Callable[[list[str]], int | None], argv: list[str]) -> Outcome:
    """Run a command line's ``main(argv)`` in-process, capturing stdout/stderr, ``SystemExit`` and escapes."""
    out, err = io.StringIO(), io.StringIO()
    code: int | None
    escaped = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ret = main(argv)
            code = 0 if ret is None else int(ret)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - an escape is what we classify
            code, escaped = None, exc
    return Outcome(code, out.getvalue(), err.getvalue(), escaped)


def run_module(module: str, argv: list[str], *, timeout: float = 60, cwd: Path | None = None) -> Outcome:
    """Run ``python -m module argv`` as a subprocess (the real entry, ``__main__`` included)."""
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or ROOT, env=_env())
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    return env


def _error_lines(err: str) -> list[str]:
    """stderr without argparse's usage block (``usage:`` and its indented continuation lines) and blank lines."""
    lines, in_usage = [], False
    for line in err.splitlines():
        if line.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and line.startswith(" "):
            continue
        in_usage = False
        if line.strip():
            lines.append(line)
    return lines


def _matches(text: str, patterns: Sequence[str]) -> list[str]:
    """The patterns that ``text`` does NOT match."""
    return [p for p in patterns if not re.search(p, text)]


def classify(case: Case) -> tuple[str, str]:
    """``(status, detail)`` of one case; never raises. The global torch RNG is left as it was (cases seed it)."""
    import torch

    from ._files import tmp

    with torch.random.fork_rng():
        status, detail = _classify(case)
    return status, detail.replace(str(tmp()), "<tmp>")


def _classify(case: Case) -> tuple[str, str]:
    reason = case.skip() if case.skip is not None else None
    if reason:
        return "skipped", reason
    if case.cli:
        return _classify_cli(case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = case.call()
        except case.exc as exc:
            msg = str(exc)
            missing = _matches(msg, case.match)
            if missing:
                return "unclear", f"{type(exc).__name__}: {msg[:300]!r} does not match {missing}"
            return "clear", f"{type(exc).__name__}: {msg[:300]}"
        except Exception as exc:  # noqa: BLE001
            return "unclear", f"{type(exc).__name__} (expected {_names(case.exc)}): {str(exc)[:300]!r}"
    if case.warns is not None:
        for w in caught:
            if issubclass(w.category, case.warns):
                msg = str(w.message)
                missing = _matches(msg, case.match)
                if missing:
                    return "unclear", f"{w.category.__name__}: {msg[:300]!r} does not match {missing}"
                return "clear", f"{w.category.__name__}: {msg[:300]}"
    if case.accept is not None and case.accept(result):
        return "clear", f"returned a correct answer: {_describe(result)}"
    seen = "; ".join(f"{w.category.__name__}: {str(w.message)[:120]}" for w in caught)
    return "silent", "returned without an error" + (f" (warnings: {seen})" if seen else "")


def _describe(result: object) -> str:
    import torch

    if isinstance(result, torch.Tensor):
        return f"tensor of shape {tuple(result.shape)} on {result.device}"
    return type(result).__name__


def _names(exc: type[BaseException] | tuple[type[BaseException], ...]) -> str:
    return "/".join(e.__name__ for e in (exc if isinstance(exc, tuple) else (exc,)))


def _classify_cli(case: Case) -> tuple[str, str]:
    try:
        res = case.call()
    except subprocess.TimeoutExpired:
        return "silent", "timed out: the bad input was not rejected up front"
    except Exception as exc:  # noqa: BLE001 - a broken case setup
        return "traceback", f"{type(exc).__name__} escaped: {str(exc)[:300]!r}"
    assert isinstance(res, Outcome), case.id
    if res.escaped is not None:
        return "traceback", f"{type(res.escaped).__name__} escaped main(): {str(res.escaped)[:300]!r}"
    if "Traceback (most recent call last)" in res.err or "Traceback (most recent call last)" in res.out:
        last = _error_lines(res.err)[-1:] or [""]
        return "traceback", f"exit {res.code}, printed a traceback: {last[0][:300]!r}"
    if res.code == 0:
        return "silent", "exit 0" + (f", stderr {res.err.strip()[:200]!r}" if res.err.strip() else "")
    lines = _error_lines(res.err) or [line for line in res.err.splitlines() if line.strip()]
    if res.code not in case.codes:
        return "unclear", f"exit {res.code} (expected {case.codes}): {' | '.join(lines)[:300]!r}"
    if len(lines) != 1:
        return "unclear", f"exit {res.code}, {len(lines)} error lines on stderr: {' | '.join(lines)[:300]!r}"
    missing = _matches(lines[0], case.match)
    if missing:
        return "unclear", f"exit {res.code}: {lines[0][:300]!r} does not match {missing}"
    return "clear", f"exit {res.code}: {lines[0][:300]}"
