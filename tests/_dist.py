"""Real multi-process runs for the distributed tests: ``world_size`` Python processes on this machine, gloo backend,
loopback only (no torchrun needed, though :func:`torchrun` runs the real launcher for the command-line tests).

Each rank is a fresh interpreter started with the ``env://`` variables (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) and one intra-op thread. A run that does not finish within
``timeout`` seconds is killed and reported as such (``Rank.timed_out``): a hang is a test failure, never a stuck
suite.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Worker scripts of the distributed tests.
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"


@dataclass(frozen=True)
class Rank:
    """What one process did: exit status (``None`` if killed on timeout), output, and its wall time."""

    rank: int
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def free_port() -> int:
    """A TCP port on the loopback interface that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": _loopback()})
    env.update(extra or {})
    return env


def _loopback() -> str:
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return "lo" if "lo" in names or not names else names[0]


def _collect(procs: list[subprocess.Popen], timeout: float, t0: float) -> list[Rank]:
    deadline = t0 + timeout
    out: list[Rank] = []
    for r, p in enumerate(procs):
        try:
            so, se = p.communicate(timeout=max(0.1, deadline - time.perf_counter()))
            out.append(Rank(r, p.returncode, so, se, time.perf_counter() - t0))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            so, se = p.communicate()
            out.append(Rank(r, None, so, se, time.perf_counter() - t0))
    return out


def run_ranks(script: str | Path, world_size: int, args: Sequence[str] = (), *, timeout: float = 120.0,
              env: dict[str, str] | None = None) -> list[Rank]:
    """Run ``python script *args`` as ranks ``0 … world_size − 1`` of one process group; wait for all of them."""
    port = str(free_port())
    path = Path(script) if Path(script).is_absolute() else SCRIPTS / script
    t0 = time.perf_counter()
    procs = []
    for r in range(world_size):
        e = _env(env)
        e.update({"MASTER_PORT": port, "RANK": str(r), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(r),
                  "LOCAL_WORLD_SIZE": str(world_size)})
        procs.append(subprocess.Popen([sys.executable, str(path), *args], cwd=ROOT, env=e, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    return _collect(procs, timeout, t0)


def torchrun(nproc: int, args: Sequence[str], *, timeout: float = 180.0,
             env: dict[str, str] | None = None) -> Rank:
    """``torchrun --nproc_per_node nproc --master-port <free> args…`` (the real launcher, as a user types it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *args]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(env), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    return _collect([p], timeout, t0)[0]


def describe(ranks: Sequence[Rank]) -> str:
    """Every rank's status and the tail of its output, for assertion messages."""
    return "\n".join(f"--- rank {r.rank}: rc={r.returncode} ({r.seconds:.1f} s)\n{r.stdout[-2000:]}\n"
                     f"{r.stderr[-4000:]}" for r in ranks)


def outcomes(ranks: Sequence[Rank]) -> dict[int, str]:
    """``{rank: "ok" | "<ExceptionType> <first line>"}`` from the workers' ``OUTCOME`` lines
    (``tests/dist_scripts/_protocol.py``)."""
    found = {}
    for r in ranks:
        m = re.search(r"^OUTCOME (\d+) (.*)$", r.stdout, re.M)
        assert m, describe(ranks)
        found[int(m.group(1))] = m.group(2)
    return found


def run_checked(script: str, mode: str, out: Path, *, timeout: float = 90.0, world_size: int = 2) -> list[Rank]:
    """``run_ranks(script, world_size, [mode, out])``, failing the test (with every rank's output) on a hang."""
    ranks = run_ranks(script, world_size, [mode, str(out)], timeout=timeout)
    assert not any(r.timed_out for r in ranks), describe(ranks)
    return ranks
