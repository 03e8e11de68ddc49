r"""Data-parallel curvature on ``torch.distributed``: every rank holds a shard of the data, products are summed
across ranks (docs/MATH.md §6.1).

The objective of a data set split into shards :math:`\mathcal D = \bigcup_r \mathcal D_r` is a weighted sum over
batches, so every curvature product is a sum over ranks of each rank's own batches:

.. math::
    \mathcal L(\theta) = \sum_r \sum_{b \in \mathcal D_r} w_b\,\ell_b(\theta),\qquad
    A V = \sum_r \Big(\sum_{b\in\mathcal D_r} w_b A_b V\Big),\qquad
    w_b = \frac{N_b}{\sum_r \sum_{b'\in\mathcal D_r} N_{b'}}\ \text{(mean)}\ \text{or}\ 1\ \text{(sum)},

with :math:`A \in \{H, H_o, H_f\}` (and :math:`J^\top U`, the token-space Hessian of a sum over examples). The
weights use the *global* count, all-reduced once at construction, so uneven shards give the operator of the union.
A product is one all-reduce of the local sums; every rank then holds the same result, and the estimators and Krylov
methods (:mod:`energy.hessian.estimators`, :mod:`energy.hessian.krylov`) run unchanged and in lockstep on every
rank, because their probes come from one seed (a CPU generator, identical on every rank).

What this module guards (so that a distributed run fails loudly instead of hanging or averaging the wrong thing):

* **consensus on failure**: each reduced product carries, per rank, a status flag and a fingerprint of the input
  vectors in the same all-reduce; a rank whose local computation raises still joins the collective, and then every
  rank raises (:class:`RankFailure`, naming the failed ranks and their messages) instead of waiting forever;
* **identical inputs**: the fingerprint (a fixed random projection of the probe vectors) must agree across ranks to
  rounding, else every rank raises :class:`InconsistentRanksError` (e.g. generators seeded per rank);
* **identical weights**: a SHA-256 checksum of every parameter and buffer is compared before any product;
* **bounded waits**: a collective that fails because a peer died or did not answer within the process group's
  timeout raises :class:`RankFailure` with that explanation (set the timeout in ``init_process_group``).

Only :func:`all_reduce_sum` is differentiable (for a second derivative through a reduced gradient); the products
themselves run without autograd.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from energy._validation import EnergyInputError

__all__ = [
    "ShardGroup",
    "RankFailure",
    "InconsistentRanksError",
    "resolve_shards",
    "all_reduce_sum",
    "parameter_checksum",
    "tensor_checksum",
    "shard_batches",
    "init_from_env",
]

T = TypeVar("T")

#: Relative tolerance of the probe fingerprints: products of the same vectors computed on different ranks agree
#: to rounding (bitwise after an all-reduce); anything larger means different vectors.
FINGERPRINT_RTOL = 1e-9


class RankFailure(RuntimeError):
    """A rank of the process group failed (its own error), or a collective failed because a peer stopped or did
    not answer within the process group's timeout. Raised on every rank, so that none waits forever.
    """


class InconsistentRanksError(EnergyInputError):
    """The ranks disagree on something that must be identical on all of them (weights, settings, probe vectors)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass(frozen=True)
class ShardGroup:
    """The processes of a ``torch.distributed`` group, each holding one shard of the data.

    Args:
        group: the process group (``None``: the default group of ``init_process_group``).
    """

    group: Any = None
    _projections: dict[tuple[int, torch.dtype, torch.device], Tensor] = field(default_factory=dict, repr=False,
                                                                               compare=False)

    @property
    def rank(self) -> int:
        return int(dist.get_rank(self.group))

    @property
    def world_size(self) -> int:
        return int(dist.get_world_size(self.group))

    def _where(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # -- collectives that fail with a message, never silently ---------------------------------------------------
    def _collective(self, op: Callable[[], T], what: str) -> T:
        try:
            return op()
        except RuntimeError as exc:  # gloo / nccl: peer closed the connection, timeout
            raise RankFailure(
                f"{self._where()}: the collective of {what} failed because another rank stopped or did not answer "
                f"within the process group's timeout ({_first_line(exc)}); the other rank's own message says why."
            ) from exc

    def _buffer_device(self, device: torch.device) -> torch.device:
        """Where a collective's buffer lives: the CPU for gloo, the current GPU for nccl (counts and flags are made
        on the CPU), else the tensor's own device.
        """
        backend = dist.get_backend(self.group)
        if backend == "gloo":
            return torch.device("cpu")
        if backend == "nccl" and device.type == "cpu":
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def all_reduce_(self, t: Tensor, what: str) -> Tensor:
        """Sum ``t`` over the ranks in place (no autograd); ``what`` names it in errors."""
        dev = self._buffer_device(t.device)
        buf = t if t.device == dev else t.to(dev)
        self._collective(lambda: dist.all_reduce(buf, group=self.group), what)
        if buf is not t:
            t.copy_(buf)
        return t

    def gather_rows(self, t: Tensor, what: str) -> Tensor:
        """Every rank's rows ``(n_r, …)`` concatenated in rank order, ``(Σ_r n_r, …)``: the counts by one
        all-reduce, then one ``all_gather`` of the rows padded to ``max_r n_r`` (each rank receives
        ``(W − 1) max_r n_r`` rows; an all-reduce of a zero-padded ``(Σ_r n_r, …)`` buffer moves about twice as much).
        """
        counts = torch.zeros(self.world_size, dtype=torch.float64)
        counts[self.rank] = float(t.shape[0])
        sizes = [int(n) for n in self.all_reduce_(counts, f"the row counts of {what}").tolist()]
        device = self._buffer_device(t.device)
        buf = t.new_zeros((max(sizes), *t.shape[1:]), device=device)
        buf[: t.shape[0]] = t.to(device)
        parts = [torch.empty_like(buf) for _ in sizes]
        self._collective(lambda: dist.all_gather(parts, buf, group=self.group), what)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(t.device)

    def gather_objects(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        out: list[Any] = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(out, obj, group=self.group), what)
        return out

    # -- consensus -----------------------------------------------------------------------------------------------
    def _raise_failures(self, failure: BaseException | None, what: str) -> None:
        messages = self.gather_objects(None if failure is None else _first_line(failure), f"the errors of {what}")
        failed = {r: m for r, m in enumerate(messages) if m is not None}
        if failure is not None:
            raise failure
        listing = "; ".join(f"rank {r}: {m}" for r, m in failed.items())
        raise RankFailure(f"{self._where()}: stopped because {len(failed)} rank(s) failed while {what} ({listing}).")

    def run(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every rank; if it raises on any rank, every rank raises (the failing rank its own error,
        the others :class:`RankFailure` naming it), so that no rank enters a later collective alone.
        """
        try:
            value, failure = fn(), None
        except Exception as exc:  # reported on every rank below
            value, failure = None, exc
        flag = torch.tensor([0.0 if failure is None else 1.0], dtype=torch.float64)
        self.all_reduce_(flag, what)
        if float(flag) != 0.0:
            self._raise_failures(failure, what)
        return value  # type: ignore[return-value]

    def check_same(self, value: Any, what: str) -> None:
        """Raise :class:`InconsistentRanksError` on every rank unless ``value`` (picklable) is equal on all ranks."""
        values = self.gather_objects(value, what)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise InconsistentRanksError(
                f"{self._where()}: the ranks disagree on {what}: rank 0 has {values[0]!r}, rank(s) {differ} have "
                f"{[values[r] for r in differ]!r}. Every rank must build the same operator on its own data shard."
            )

    def total(self, n: float, what: str) -> float:
        """``Σ_r n_r`` (counts, weights)."""
        t = torch.tensor([float(n)], dtype=torch.float64)
        return float(self.all_reduce_(t, what))

    def _projection(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (n, dtype, device)
        if key not in self._projections:
            g = torch.Generator().manual_seed(0x5EED + n)
            self._projections[key] = torch.randn(n, generator=g, dtype=torch.float64).to(device, dtype)
        return self._projections[key]

    def sum(self, compute: Callable[[], Tensor], shape: Sequence[int], like: Tensor, what: str, *,
            probe: Tensor | None = None) -> Tensor:
        r"""``Σ_r compute_r()`` with consensus on failure and, if ``probe`` (``(n, k)`` or ``(n,)``) is given, a
        check that every rank multiplied the same vectors (module docstring). One all-reduce of
        ``[local sum | per-rank status | per-rank fingerprint wᵀV and column norms ‖V_j‖]``.

        Args:
            compute: the rank's local sum, of ``shape``.
            shape: shape of the result.
            like: a tensor whose dtype and device the result takes.
            what: what is being reduced (for messages).
            probe: the input vectors of the product.
        """
        numel = 1
        for s in shape:
            numel *= int(s)
        k = 0 if probe is None else (1 if probe.ndim == 1 else int(probe.shape[1]))
        slot = 1 + 2 * k
        try:
            local, failure = compute().reshape(-1), None
        except Exception as exc:  # reported on every rank below
            local, failure = torch.zeros(numel, dtype=like.dtype, device=like.device), exc
        status = torch.zeros(self.world_size, slot, dtype=like.dtype, device=like.device)
        if failure is not None:
            status[self.rank, 0] = 1.0
        elif probe is not None:
            P = probe.reshape(probe.shape[0], -1)
            status[self.rank, 1 : 1 + k] = self._projection(P.shape[0], P.dtype, P.device) @ P
            status[self.rank, 1 + k :] = torch.linalg.vector_norm(P, dim=0)
        buf = self.all_reduce_(torch.cat([local, status.reshape(-1)]), what)
        status = buf[numel:].reshape(self.world_size, slot)
        if bool((status[:, 0] != 0).any()):
            self._raise_failures(failure, what)
        if probe is not None:
            self._check_fingerprints(status[:, 1:], k, probe.shape[0], what)
        return buf[:numel].reshape(tuple(shape))

    def _check_fingerprints(self, F: Tensor, k: int, n: int, what: str) -> None:
        proj, norms = F[:, :k], F[:, k:]
        w_norm = float(torch.linalg.vector_norm(self._projection(n, F.dtype, F.device)))
        scale = norms.amax(dim=0) * w_norm + torch.finfo(F.dtype).tiny
        gap = ((proj - proj[0]).abs().amax(dim=0) / scale).max()
        norm_gap = ((norms - norms[0]).abs().amax(dim=0) / (norms.amax(dim=0) + torch.finfo(F.dtype).tiny)).max()
        if float(torch.maximum(gap, norm_gap)) > FINGERPRINT_RTOL:
            raise InconsistentRanksError(
                f"{self._where()}: the ranks multiplied different vectors in {what} (relative fingerprint gap "
                f"{float(torch.maximum(gap, norm_gap)):.2e}). Probe vectors must be identical on every rank: draw "
                "them from a CPU generator seeded the same on every rank (energy.hessian.estimators.draw_probes), "
                "not per rank."
            )


def resolve_shards(distributed: object) -> ShardGroup | None:
    """``distributed`` of the operators: ``False``/``None`` (one process), ``True`` (the default group) or a
    :class:`ShardGroup`; checks that ``torch.distributed`` is initialised.
    """
    if distributed is None or distributed is False:
        return None
    if not (distributed is True or isinstance(distributed, ShardGroup)):
        raise EnergyInputError(f"`distributed` must be True, False or an energy.hessian.distributed.ShardGroup, got "
                               f"{type(distributed).__name__}.")
    if not (dist.is_available() and dist.is_initialized()):
        raise EnergyInputError(
            "`distributed=True` needs an initialised torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group() (or energy.hessian.distributed.init_from_env()) first."
        )
    return ShardGroup() if distributed is True else distributed  # type: ignore[return-value]


class _ReplicatedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: Tensor, shards: ShardGroup) -> Tensor:
        return shards.all_reduce_(t.detach().clone(), "all_reduce_sum")

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        return grad_out, None


def all_reduce_sum(t: Tensor, shards: ShardGroup | None = None) -> Tensor:
    r"""``Σ_r t_r`` held by every rank, differentiable for a replicated objective (MATH §6.1).

    When every rank then computes the same function ``φ`` of the sum (e.g. ``⟨∇\mathcal L, v⟩`` for an HVP by
    double backward), the derivative of rank ``r``'s objective with respect to its own ``t_r`` is
    ``∂φ/∂(Σ_s t_s)``: the backward is the identity, and the second derivatives are the sums of the ranks' local
    ones. (``torch.distributed.nn.functional.all_reduce`` instead all-reduces the gradients too, which
    differentiates ``Σ_r φ`` — ``world_size`` times this objective.)
    """
    if shards is None and not (dist.is_available() and dist.is_initialized()):
        raise EnergyInputError("all_reduce_sum needs an initialised torch.distributed process group (launch with "
                               "torchrun and call torch.distributed.init_process_group() first) or `shards`.")
    return _ReplicatedSum.apply(t, shards or ShardGroup())  # type: ignore[no-any-return]


def tensor_checksum(*tensors: Tensor, names: Sequence[str] | None = None) -> str:
    """SHA-256 of the tensors' (names,) dtypes, shapes and bytes: equal on two ranks iff they hold the same values
    bit for bit.
    """
    h = hashlib.sha256()
    for i, t in enumerate(tensors):
        data = t.detach().to("cpu").contiguous()
        h.update(f"{'' if names is None else names[i]}:{data.dtype}:{tuple(data.shape)};".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def parameter_checksum(model: nn.Module) -> str:
    """:func:`tensor_checksum` of every parameter and buffer with its name: equal iff the ranks hold the same
    weights.
    """
    named = [*model.named_parameters(), *model.named_buffers()]
    return tensor_checksum(*(t for _, t in named), names=[n for n, _ in named])


def check_same_model(shards: ShardGroup, model: nn.Module) -> None:
    """Compare the weights' checksum across ranks before any product (:class:`InconsistentRanksError`)."""
    sums = shards.gather_objects(parameter_checksum(model), "the parameter checksums")
    differ = [r for r, s in enumerate(sums) if s != sums[0]]
    if differ:
        raise InconsistentRanksError(
            f"{shards._where()}: rank(s) {differ} hold different weights from rank 0 (parameter checksums differ: "
            f"{sums[0][:12]}… vs {[sums[r][:12] + '…' for r in differ]}). Load or seed the same model on every rank "
            "(or broadcast rank 0's parameters) before building a distributed operator."
        )


def shard_batches(batches: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s contiguous share of ``batches`` (sizes differ by at most one; rank order = data order)."""
    n = len(batches)
    start = rank * n // world_size
    return list(batches[start : (rank + 1) * n // world_size])


def init_from_env(*, timeout: float = 600.0, backend: str | None = None) -> ShardGroup | None:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE > 1``), else ``None``.

    ``backend`` defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise; ``timeout`` (seconds) bounds
    every collective, so a rank that stops answering makes the others fail within it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(chosen, timeout=timedelta(seconds=timeout))
    return ShardGroup()
