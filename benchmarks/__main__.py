"""``python -m benchmarks --json OUT``: run every registered ratio benchmark and write a JSON report."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time

import torch

from benchmarks import MODULES, REGISTRY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--json", metavar="OUT", help="write the report to this JSON file (atomically)")
    parser.add_argument("--only", metavar="SUBSTRING", help="run only benchmarks whose name contains this")
    parser.add_argument("--quick", action="store_true", help="smaller sizes / fewer repeats (smoke run)")
    args = parser.parse_args(argv)

    for mod in MODULES:
        try:
            importlib.import_module(f"benchmarks.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmarks.{mod}":
                raise
    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    for name, fn in REGISTRY.items():
        if args.only and args.only not in name:
            continue
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
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.json)
        print(f"[bench] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
