"""How every worker script of the distributed tests runs one rank and reports what happened.

``run_rank(body, timeout=…)`` joins the gloo group from the ``env://`` variables, runs ``body(rank, world_size)``
with one thread, and prints one ``OUTCOME <rank> ok`` or ``OUTCOME <rank> <ExceptionType> <first line>`` plus
``SECONDS <rank> <s>`` on failure, which the tests read (``tests/_dist.py::outcomes``). Every rank leaves with
``os._exit`` — as the analyze command line does — so that no interpreter teardown of gloo's threads runs after a
peer has left (it can abort: "terminate called without an active exception"); a successful rank first waits for
the others (a barrier) and leaves the group.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist


def run_rank(body: Callable[[int, int], None], *, timeout: float = 60.0) -> NoReturn:
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        body(rank, world)
    except Exception as exc:  # the test reads every rank's outcome
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"OUTCOME {rank} {type(exc).__name__} {first}", flush=True)
        print(f"SECONDS {rank} {time.perf_counter() - t0:.2f}", flush=True)
        sys.stderr.flush()
        os._exit(1)
    print(f"OUTCOME {rank} ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown of gloo's threads either (it can abort after the group is gone)
