"""Census of the bad-input suite: classify every case as clear / unclear / silent / traceback, print the counts and
the non-clear cases, and write them to ``docs/results/bad_inputs.json``.

Run from the repository root: ``python -m tests.bad_inputs.census [--json PATH] [--no-write] [--quiet]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from energy._io import atomic_write_text

from . import _files as F
from ._case import ROOT, STATUSES, classify
from .known import NOT_YET
from .table import AREAS

DEFAULT_JSON = ROOT / "docs" / "results" / "bad_inputs.json"


def run() -> dict:
    """Classify every case; the report (counts overall and per area, and every non-clear case with its detail)."""
    t0 = time.perf_counter()
    counts: Counter[str] = Counter()
    per_area: dict[str, dict[str, int]] = {}
    not_clear: list[dict[str, str]] = []
    stale: list[str] = []
    for area, cases in AREAS.items():
        area_counts: Counter[str] = Counter()
        for case in cases:
            status, detail = classify(case)
            counts[status] += 1
            area_counts[status] += 1
            if status not in ("clear", "skipped"):
                not_clear.append({"id": case.id, "area": area, "status": status, "detail": detail,
                                  "known": NOT_YET.get(case.id, "")})
            elif case.id in NOT_YET:
                stale.append(case.id)
        per_area[area] = {s: area_counts[s] for s in STATUSES}
    return {
        "total": sum(counts.values()),
        "counts": {s: counts[s] for s in STATUSES},
        "per_area": per_area,
        "not_clear": not_clear,
        "fixed_but_still_marked_xfail": stale,
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }


def _reason(row: dict[str, str]) -> str:
    """What is missing, from the census detail (kept short: one line of ``known.py``)."""
    detail = row["detail"].replace("\n", " ").replace(str(F.tmp()), "<tmp>")
    return f"{row['status']}: {detail[:90]}"


def write_known(not_clear: list[dict[str, str]]) -> None:
    """Rewrite ``known.py`` from the census (a tool for after merging fixes; strict xfail keeps it honest)."""
    path = Path(__file__).with_name("known.py")
    text = path.read_text()
    head = text[: text.index("NOT_YET")]
    lines = ["NOT_YET: dict[str, str] = {"]
    for row in not_clear:
        reason = row["known"] or _reason(row)
        lines.append(f"    {row['id']!r}:\n        {reason!r},")
    lines.append("}")
    atomic_write_text(path, head + "\n".join(lines) + "\n")
    print(f"wrote {path} ({len(not_clear)} cases)")


def main(argv: list[str] | None = None) -> int:
    """Print the census; write the JSON report. Exit 1 if a case is neither clear nor marked as not yet handled."""
    parser = argparse.ArgumentParser(prog="python -m tests.bad_inputs.census", description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="report path (default %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no report")
    parser.add_argument("--quiet", action="store_true", help="counts only, not the list of non-clear cases")
    parser.add_argument("--update-known", action="store_true",
                        help="rewrite known.py: the non-clear cases now (a reason kept if already written there)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = run()
    if not args.quiet:
        for row in report["not_clear"]:
            print(f"{row['status']:9} {row['id']}: {row['detail']}")
    print(f"{report['total']} cases in {report['wall_s']} s: "
          + ", ".join(f"{s} {n}" for s, n in report["counts"].items()))
    for area, c in report["per_area"].items():
        print(f"  {area:28} " + ", ".join(f"{s} {n}" for s, n in c.items() if n))
    if report["fixed_but_still_marked_xfail"]:
        print("fixed, remove from known.NOT_YET: " + ", ".join(report["fixed_but_still_marked_xfail"]))
    if not args.no_write:
        atomic_write_text(args.json, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")
    if args.update_known:
        write_known(report["not_clear"])
        return 0
    unmarked = [r["id"] for r in report["not_clear"] if not r["known"]]
    if unmarked:
        print(f"not clear and not in known.NOT_YET: {', '.join(unmarked)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
