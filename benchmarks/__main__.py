"""``python -m benchmarks --json OUT``: run every registered ratio benchmark and write a JSON report."""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time

import torch

from benchmarks import MODULES, REGISTRY
from energy._cli import Parser, UsageError, check_writable_file, run_command
from energy._io import atomic_write_text

PROG = "python -m benchmarks"


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks, print one line per result and write the JSON report; return the exit status.

    Exit status 2 (with one line on stderr) for a usage error: ``--only`` matches no registered benchmark, or the
    ``--json`` path cannot be written (checked before any benchmark runs); 1 for a failure; ``--debug`` shows the
    traceback.
    """
    return run_command(PROG, lambda: _main(argv), argv)


def _main(argv: list[str] | None) -> int:
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--json", metavar="OUT", help="write the report to this JSON file (atomically)")
    parser.add_argument("--only", metavar="SUBSTRING", help="run only benchmarks whose name contains this")
    parser.add_argument("--quick", action="store_true", help="smaller sizes / fewer repeats (smoke run)")
    args = parser.parse_args(argv)

    if args.json:
        check_writable_file(args.json, "--json")
    for mod in MODULES:
        try:
            importlib.import_module(f"benchmarks.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmarks.{mod}":
                raise
    selected = [name for name in REGISTRY if not args.only or args.only in name]
    if not selected:
        raise UsageError(f"--only {args.only!r} matches no benchmark; give part of one of: {', '.join(REGISTRY)}")
    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    for name in selected:
        fn = REGISTRY[name]
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        res = fn(args.quick)
        res["wall_s"] = time.perf_counter() - t0
        results[name] = res
        summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())
        print(f"[bench] {name}: {summary}", flush=True)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "quick": args.quick,
        "results": results,
    }
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"[bench] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
