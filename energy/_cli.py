"""Command-line plumbing shared by every command of the project (``energy``, ``unfold``, ``paper-figs``, ...).

One place decides how a command ends:

* a usage error (a bad flag, a path that cannot be written, a flag that contradicts a loaded model) prints one line
  ``PROG: error: ...`` on stderr and exits with status **2** (:class:`UsageError`, or :meth:`Parser.error`);
* a failure while running prints one line ``PROG: error: ...`` and exits with status **1**;
* an interruption (Ctrl-C, ``KeyboardInterrupt``) prints one line and exits with status **130**;
* ``--debug`` (added to every parser by :class:`Parser`) re-raises instead, so the traceback is shown.

A command never ends in a traceback without ``--debug``. Output paths are checked before any computation with
:func:`check_writable_dir` / :func:`check_writable_file`, which create missing directories and write (then remove) a
probe file, so the check also holds for ``root``, for whom permission bits do not block writes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "CommandError",
    "Interrupted",
    "Parser",
    "UsageError",
    "check_writable_dir",
    "check_writable_file",
    "one_line",
    "prog_name",
    "run_command",
]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A failure with a message meant for the user of a command line; exits with :attr:`code` (1)."""

    code = EXIT_FAILURE


class UsageError(CommandError):
    """A bad argument (named in the message, with the fix); exits with status 2."""

    code = EXIT_USAGE


class Interrupted(CommandError):
    """The run was interrupted (``KeyboardInterrupt``); the message says what finished and how to resume (130)."""

    code = EXIT_INTERRUPTED


def one_line(text: object) -> str:
    """``text`` on one line (newlines folded to ``; ``), for a one-line error message."""
    return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def prog_name(module_form: str, script: str) -> str:
    """The program name for messages: ``script`` when run as the installed console script, else ``module_form``."""
    return script if Path(sys.argv[0]).name == script else module_form


class Parser(argparse.ArgumentParser):
    """:class:`argparse.ArgumentParser` with the project's conventions.

    ``--help`` shows every default (:class:`argparse.ArgumentDefaultsHelpFormatter`); ``--debug`` is added; a usage
    error prints ONE line ``PROG: error: MESSAGE (see PROG --help for the usage)`` and exits 2 (plain argparse prints
    the whole usage too).
    Sub-parsers made with ``add_subparsers().add_parser`` are of this class as well.
    """

    def __init__(self, *args: Any, debug_flag: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        if debug_flag:
            self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                              help="on an error, show the full traceback instead of one line")

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", type(self))
        return super().add_subparsers(**kwargs)

    def error(self, message: str) -> NoReturn:
        """Print one line on stderr and exit with status 2.

        A missing sub-command gets the list of the available commands (plain argparse names only the metavar).
        """
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and action.choices:
                name = action.metavar or action.dest
                if name and "required" in message and str(name) in message:
                    message = f"{message}; choose one of the commands: {', '.join(action.choices)}"
                    break
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help for the usage)\n")


def _debug_requested(argv: Sequence[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args


def run_command(prog: str, body: Callable[[], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``body()`` (a command's work, argument parsing included) and turn any exception into an exit status.

    ``argv`` is only looked at for ``--debug`` (then every exception is re-raised with its traceback).

    Returns:
        ``body()``'s status (``None`` → 0); 2 for :class:`UsageError`, 130 for an interruption, 1 for any other
        exception, each after ONE line ``PROG: error: ...`` (``PROG: interrupted: ...``) on stderr.
    """
    debug = _debug_requested(argv)
    try:
        status = body()
    except SystemExit as exc:  # argparse (--help, usage errors) and explicit exits pass through unchanged
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_FAILURE)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted (Ctrl-C); nothing was left half-written (all writes are atomic)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Interrupted as exc:
        if debug:
            raise
        print(f"{prog}: interrupted: {one_line(exc)}", file=sys.stderr)
        return exc.code
    except CommandError as exc:
        if debug:
            raise
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return exc.code
    except Exception as exc:
        if debug:
            raise
        print(f"{prog}: error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE
    return 0 if status is None else int(status)


def _probe(directory: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".write-probe.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)


def check_writable_dir(path: str | os.PathLike[str], flag: str) -> Path:
    """Create ``path`` if needed and check that files can be written into it; before any computation.

    Raises:
        UsageError: naming ``flag``, the path, the reason and the fix.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {os.fspath(path)}: exists and is not a directory; give a directory path")
    _accepts_files(p, f"{flag} {os.fspath(path)}: cannot write there", "give a writable directory")
    return p


def check_writable_file(path: str | os.PathLike[str], flag: str) -> Path:
    """Check that the file ``path`` can be (re)written: its directory is created if needed and must accept files.

    Raises:
        UsageError: naming ``flag``, the path, the reason and the fix.
    """
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {os.fspath(path)}: is a directory; give a file path (e.g. {p / 'out'})")
    if p.name in ("", ".", ".."):
        raise UsageError(f"{flag} {os.fspath(path)!r}: not a file name; give a file path")
    parent = p.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{flag} {os.fspath(path)}: {parent} is a file, not a directory; give a path in a "
                         "writable directory")
    _accepts_files(parent, f"{flag} {os.fspath(path)}: cannot write to {parent}", "give a path in a writable directory")
    return p


def _accepts_files(directory: Path, what: str, fix: str) -> None:
    """Create ``directory`` if needed and write-probe it; an ``OSError`` becomes ``UsageError`` "what (reason); fix"."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _probe(directory)
    except OSError as exc:
        raise UsageError(f"{what} ({exc.strerror or type(exc).__name__}); {fix}") from None
