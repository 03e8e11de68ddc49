"""``python -m energy verify [--json] [--seed S] [--trials N]``: run the equivalence suite (energy.verify)."""

import sys

from energy import verify

USAGE = "usage: python -m energy verify [--json] [--seed S] [--trials N] [--case NAME]"

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "verify":
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    sys.exit(verify.main(sys.argv[2:]))
