"""``python -m energy.hessian COMMAND ...``: command-line tools of the Hessian module.

Sub-commands (``python -m energy.hessian --help`` lists them):

* ``verify [--case NAME ...] [--trials N] [--seed S] [--json OUT] [--list]``: every closed form against its
  autograd twin (:mod:`energy.hessian.verify`).

Adding a sub-command is one row of :data:`COMMANDS`: ``name: (module, help)``, where ``module`` has
``main(argv, *, prog) -> int`` built on :func:`energy._cli.run_command` (one-line errors, exit codes 0 / 1 / 2 / 130,
``--debug``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from energy._cli import Parser, run_command

__all__ = ["COMMANDS", "main"]

PROG = "python -m energy.hessian"

#: ``name: (module whose main(argv, prog=...) runs it, one-line help)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("energy.hessian.verify", "every closed form against its autograd twin (max relative error ≤ 1e-10)"),
    "analyze": ("energy.hessian.analyze", "blockwise curvature (per-head Q/K/V, O, MLP, norms) of an HF model"),
}


def build_parser(prog: str = PROG) -> Parser:
    """The parser of ``python -m energy.hessian``: one sub-command per row of :data:`COMMANDS`."""
    p = Parser(prog=prog, description="Closed-form Hessians of attention layers and energies: command-line tools.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False, debug_flag=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m energy.hessian COMMAND ...``; returns the exit status (0 ok, 1 failure, 2 usage error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[args[0]][0])
        return int(module.main(args[1:], prog=f"{PROG} {args[0]}"))

    def body() -> int:
        build_parser().parse_args(args)  # only --help or an error get here; both exit
        return 0

    return run_command(PROG, body, args)


if __name__ == "__main__":
    sys.exit(main())
