"""``python -m energy`` (installed as ``energy``): the library's command line.

Sub-commands: ``verify [--json] [--seed S] [--trials N] [--case NAME ...]`` runs the equivalence suite
(:mod:`energy.verify`). ``python -m energy --help`` lists them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from energy._cli import Parser, prog_name, run_command

__all__ = ["main"]


def build_parser(prog: str) -> Parser:
    """The parser of ``python -m energy``: one sub-command per tool; the rest of the line goes to that tool."""
    p = Parser(prog=prog, description="Energies of attention and feed-forward layers: command-line tools.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("verify", help="run the equivalence suite (closed forms vs autograd and references)",
                   add_help=False, debug_flag=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m energy COMMAND ...``; returns the exit status (0 ok, 1 failure, 2 usage error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    prog = prog_name("python -m energy", "energy")
    if args and args[0] == "verify":
        from energy import verify

        return verify.main(args[1:], prog=f"{prog} verify")

    def body() -> int:
        build_parser(prog).parse_args(args)  # only --help or an error get here; both exit
        return 0

    return run_command(prog, body, args)


if __name__ == "__main__":
    sys.exit(main())
