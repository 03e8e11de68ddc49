r"""Hessian-vector products of a model whose parameters are sharded with FSDP2 (``fully_shard``), MATH §6.x.

Each rank holds one shard of every parameter (a ``DTensor`` with ``Shard(0)`` placement) and its own batches; the
objective is the mean over every rank's targets,

.. math::
    \mathcal L(\theta) = \sum_r \sum_{b \in r} \frac{c_b}{C}\, \ell_b(\theta), \qquad C = \sum_r \sum_{b\in r} c_b ,

and :class:`ShardedHessian` applies :math:`H = \nabla^2_\theta \mathcal L` to a vector given, like the parameters,
as local shards (``{name: local tensor}``); the product comes back as local shards.

Two methods (what works through ``fully_shard`` in torch 2.13 is recorded in the README, "Model sharding"):

* ``"finite_difference"`` (memory-scalable): gradients are what FSDP2 computes anyway (all-gather per unit in the
  forward and backward, reduce-scatter of the gradient), at :math:`\theta \pm \epsilon v` and
  :math:`\theta \pm \epsilon v / 2`, combined by central differences and one Richardson step,

  .. math::
      D(\epsilon) = \frac{\nabla\mathcal L(\theta+\epsilon v) - \nabla\mathcal L(\theta-\epsilon v)}{2\epsilon},
      \qquad R = \frac{4 D(\epsilon/2) - D(\epsilon)}{3} = Hv + O(\epsilon^4),

  with :math:`\epsilon\lVert v\rVert = (3u)^{1/5}` (``u`` = ``torch.finfo(dtype).eps``; the rounding/truncation balance,
  :func:`fd_step`, MATH §6.x).
  Every rank keeps only shards: θ, v, the gradient and the differences. The parameters are restored bit-exactly
  from the saved local shards after every product (copied back, never subtracted).
* ``"exact"``: double backward (reverse-over-reverse) through FSDP2's *unsharded* parameters. It works only with
  every unit unsharded for the whole product (FSDP2 frees the unsharded storage after forward/backward, and the
  graph of the first backward needs it in the second), so each rank holds the full parameters, the full gradient
  graph and a full ``v`` during the product; the result is reduce-scattered back to shards.

Cost per product: 4 gradients (``"finite_difference"``), 6 with :meth:`ShardedHessian.matvec_with_error`
(which also returns an error bound, :func:`fd_error_estimate`);
:func:`memory_model` gives the bytes per rank of both methods for a LLaMA-shaped model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Partial, distribute_tensor

from energy._validation import EnergyInputError
from energy.hessian.distributed import ShardGroup
from energy.hessian.parameter_space import _check_data, _check_deterministic_model, _floating_leaves

__all__ = [
    "ShardedHessian",
    "central_difference",
    "richardson",
    "fd_step",
    "fd_error_model",
    "fd_error_estimate",
    "MemoryModel",
    "memory_model",
    "llama_parameter_count",
    "saved_activation_bytes",
    "llama_activation_elements_per_token",
]

Method = Literal["exact", "finite_difference"]
Shards = dict[str, Tensor]


# --------------------------------------------------------------------------------------------------------------
# Pure formulas (MATH §6.x)
# --------------------------------------------------------------------------------------------------------------


def central_difference(g_plus: Tensor, g_minus: Tensor, eps: float) -> Tensor:
    r"""The central difference of two gradients along ``v`` (MATH §6.x).

    .. math::
        D(\epsilon) = \frac{g_+ - g_-}{2\epsilon} = Hv + \frac{\epsilon^2}{6}\nabla^4\mathcal L[v,v,v]
        + O(\epsilon^4).

    Args:
        g_plus: gradient (or a shard of it) at :math:`\theta + \epsilon v`.
        g_minus: the same at :math:`\theta - \epsilon v`.
        eps: the step :math:`\epsilon`.
    """
    return (g_plus - g_minus) / (2.0 * eps)


def richardson(d_coarse: Tensor, d_fine: Tensor) -> Tensor:
    r"""One Richardson step for an :math:`\epsilon^2` error series, steps :math:`\epsilon` and :math:`\epsilon/2`.

    .. math::
        R = \frac{4 D(\epsilon/2) - D(\epsilon)}{3} = Hv - \frac{\epsilon^4}{4}\, b + O(\epsilon^6),
        \qquad b = \frac{\nabla^6\mathcal L[v^{\otimes 5}]}{120}.
    """
    return (4.0 * d_fine - d_coarse) / 3.0


def fd_error_model(eps: float, delta: float, fifth: float) -> float:
    r"""Error model of :func:`richardson` over :func:`central_difference` (MATH §6.x).

    .. math::
        E(\epsilon) = \frac{3\delta}{\epsilon} + \frac{\epsilon^4}{4}\lVert b\rVert,

    ``delta`` the absolute rounding error of one computed gradient, ``fifth`` :math:`\lVert b\rVert`.
    """
    return 3.0 * delta / eps + eps**4 * fifth / 4.0


def fd_error_estimate(extrapolant_gap: Tensor | float, delta: Tensor | float, eps: float) -> Tensor | float:
    r"""A-posteriori error bound of :math:`R_1 = R(\epsilon, \epsilon/2)` from :math:`R_2 = R(\epsilon/2, \epsilon/4)`.

    .. math::
        \hat E = \tfrac{16}{15}\lVert R_1 - R_2\rVert + \tfrac{63}{5}\,\frac{\delta}{\epsilon}

    (MATH §6.x): :math:`R_1 - R_2 = \tfrac{15}{16}` of :math:`R_1`'s truncation error plus the two round-offs
    (:math:`\le 3\delta/\epsilon` and :math:`6\delta/\epsilon`); it bounds :math:`\lVert R_1 - Hv\rVert` when each
    gradient's absolute round-off is at most ``delta`` and the :math:`O(\epsilon^6)` terms are negligible.

    Args:
        extrapolant_gap: :math:`\lVert R_1 - R_2\rVert`.
        delta: the absolute round-off :math:`\delta` of one gradient.
        eps: the coarse step :math:`\epsilon`.
    """
    return 16.0 / 15.0 * extrapolant_gap + 12.6 * delta / eps


def fd_step(dtype: torch.dtype, *, delta: float | None = None, fifth: float = 1.0) -> float:
    r"""The step length :math:`\epsilon\lVert v\rVert` minimising :func:`fd_error_model` for a unit direction.

    .. math::
        \epsilon_\star = \Big(\frac{3\delta}{\lVert b\rVert}\Big)^{1/5},

    with the defaults :math:`\delta = u` (``torch.finfo(dtype).eps``) and :math:`\lVert b\rVert = 1` (gradient
    and fifth derivative of order one along the unit direction): :math:`\approx 8.0\cdot 10^{-4}` in float64.
    """
    d = float(torch.finfo(dtype).eps) if delta is None else delta
    return (3.0 * d / fifth) ** 0.2


# --------------------------------------------------------------------------------------------------------------
# The operator
# --------------------------------------------------------------------------------------------------------------


def _agree(problem: str | None, group: Any) -> None:
    """Raise the same :class:`EnergyInputError` on every rank if any rank found a problem (one collective, no hang)."""
    problems: list[str | None] = ShardGroup(group).gather_objects(problem, "each rank's input checks")
    ranks: dict[str, list[int]] = {}
    for r, p in enumerate(problems):
        if p is not None:
            ranks.setdefault(p, []).append(r)
    if ranks:
        raise EnergyInputError(" | ".join(f"rank {', '.join(map(str, rs))}: {p}" for p, rs in ranks.items()))


class ShardedHessian:
    r"""Hessian of the all-rank mean loss of an FSDP2-sharded model, applied to vectors held as local shards.

    Args:
        model: a module wrapped by ``torch.distributed.fsdp.fully_shard`` (the root at least; its parameters are
            ``DTensor`` shards). Parameters with ``requires_grad`` define the space.
        loss_fn: ``loss_fn(model(X), y) -> scalar``, the mean over the batch's ``c_b`` targets.
        data: this rank's batches ``(X, y)`` (a re-iterable collection, at least one batch per rank). Ranks may hold
            different numbers and sizes of batches: ranks with fewer batches repeat their last batch with weight 0
            so every rank runs the same FSDP collectives.
        method: ``"finite_difference"`` or ``"exact"`` (module docstring).
        batch_size_fn: ``c_b`` from ``X`` (default ``X.shape[0]``); the global count ``C`` is all-reduced once here.
        step: the step length :math:`\epsilon\lVert v\rVert` of the finite differences (default :func:`fd_step`).

    Every rank must call every method (they are collective), with its own shards.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Any], Tensor], data: Sequence[Any], *,
                 method: Method = "finite_difference", batch_size_fn: Callable[[Any], int] | None = None,
                 step: float | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise EnergyInputError("ShardedHessian needs an initialised process group: call "
                                   "torch.distributed.init_process_group(...) on every rank first (torchrun sets "
                                   "the env:// variables).")
        self.model, self.loss_fn, self.method = model, loss_fn, method
        self.batch_size_fn = batch_size_fn or (lambda X: int(X.shape[0]))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad} if isinstance(model, nn.Module) else {}
        one_mesh = bool(params) and all(isinstance(p, DTensor) and p.device_mesh.ndim == 1 for p in params.values())
        self.group = next(iter(params.values())).device_mesh.get_group() if one_mesh else dist.group.WORLD  # type: ignore[attr-defined]
        problem = None
        if method not in ("exact", "finite_difference"):
            problem = f"`method` must be 'exact' or 'finite_difference', got {method!r}."
        elif not callable(loss_fn):
            problem = f"`loss_fn` must be callable (o, y) -> scalar, got {type(loss_fn).__name__}."
        elif step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))
                                   or not math.isfinite(step) or step <= 0):
            problem = f"`step` must be a positive finite float (the step length ε‖v‖), got {step!r}."
        _agree(problem or self._local_problem(model, params, data), self.group)
        self.params: dict[str, DTensor] = params  # type: ignore[assignment]
        self.dtype = next(iter(params.values())).dtype
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        shards = ShardGroup(self.group)
        counts = [float(self.batch_size_fn(X)) for X, _ in data]
        self.num_targets = int(shards.total(sum(counts), "the number of targets"))
        most = max(shards.gather_objects(len(counts), "the number of batches per rank"))
        self.world_size = shards.world_size
        batches = list(data)
        self.batches = [*zip(batches, (c / self.num_targets for c in counts)),
                        *[(batches[-1], 0.0)] * (most - len(batches))]
        self.step = float(step) if step is not None else fd_step(self.dtype)

    def _local_problem(self, model: object, params: Mapping[str, Tensor], data: object) -> str | None:
        """What is wrong on this rank (checked before any collective), or ``None``."""
        if not isinstance(model, FSDPModule) or not params or not all(isinstance(p, DTensor) for p in params.values()):
            return (f"`model` ({type(model).__name__}) must be wrapped by torch.distributed.fsdp.fully_shard (its "
                    "parameters DTensor shards); call fully_shard(block) per layer, then fully_shard(model).")
        if any(p.device_mesh.ndim != 1 for p in params.values()):  # type: ignore[attr-defined]
            return ("`model` is sharded over a multi-dimensional device mesh (HSDP); ShardedHessian supports "
                    "fully_shard over a 1-D mesh.")
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            return f"`model` parameters must share one floating dtype, got {sorted(map(str, dtypes))}."
        for name, unit in [(n, m) for n, m in model.named_modules() if isinstance(m, FSDPModule)]:  # type: ignore[attr-defined]
            for group in unit._get_fsdp_state()._fsdp_param_groups:
                mp = group.mp_policy
                if group.gradient_divide_factor is not None or mp.reduce_dtype not in (None, *dtypes) or \
                        mp.param_dtype not in (None, *dtypes):
                    return (f"FSDP unit {name or 'root'!r} has a custom gradient divide factor or mixed precision; "
                            "Hessian products need FSDP's default (full-precision, mean-reduced) gradients.")
        try:
            _check_deterministic_model(model)  # type: ignore[arg-type]
            batches = list(_check_data(data))  # type: ignore[arg-type]
        except EnergyInputError as exc:
            return str(exc)
        if not batches:
            return "`data` holds no batch on this rank; give every rank at least one (X, y) batch."
        dtype = next(iter(dtypes))
        for i, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                return f"`data` batch {i} must be a pair (inputs, targets), got {type(batch).__name__}."
            for leaf in _floating_leaves(batch):
                if leaf.dtype != dtype or not bool(torch.isfinite(leaf).all()):
                    return f"`data` batch {i} must hold finite {dtype} tensors (got {leaf.dtype}); cast or clean it."
            try:
                count = int(self.batch_size_fn(batch[0]))
            except (KeyError, IndexError, AttributeError, TypeError, ValueError) as exc:
                return f"`batch_size_fn` fails on `data` batch {i}: {exc!r}; it must map the inputs to a count."
            if count <= 0:
                return f"`data` batch {i} has no counted target; drop it."
        return None

    # -- shards <-> full vectors (collective helpers for tests and estimators) --------------------------------------
    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the parameter blocks, in the order of the flat vector of :meth:`full`."""
        return tuple(self.params)

    @property
    def dim(self) -> int:
        """Length of the full flat parameter vector."""
        return sum(p.numel() for p in self.params.values())

    def full(self, shards: Mapping[str, Tensor]) -> Tensor:
        """The full flat vector (every rank gets it) from local shards; blocks in :attr:`param_names` order."""
        self._check_shards(shards, "shards")
        return torch.cat([self._dtensor(n, shards[n]).full_tensor().reshape(-1) for n in self.params])

    def shard(self, vector: Tensor) -> Shards:
        """This rank's shards of a full flat vector (the same vector on every rank); no data is communicated."""
        problem = None
        if not isinstance(vector, Tensor) or vector.shape != (self.dim,) or vector.dtype != self.dtype:
            got = f"{getattr(vector, 'dtype', type(vector).__name__)} {tuple(getattr(vector, 'shape', ()))}"
            problem = f"`vector` must be a {self.dtype} tensor of shape ({self.dim},), got {got}."
        _agree(problem, self.group)
        out, i = {}, 0
        for n, p in self.params.items():
            block = vector[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
            out[n] = distribute_tensor(block, p.device_mesh, p.placements, src_data_rank=None).to_local().clone()
        return out

    def dot(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
        r"""The global inner product :math:`\langle a, b\rangle` of two sharded vectors (one all-reduce)."""
        local = [(a[n] * b[n]).sum() for n in self.params]
        s = sum(local, torch.zeros((), dtype=self.dtype, device=local[0].device))
        return ShardGroup(self.group).all_reduce_(s, "an inner product of sharded vectors")

    def _dtensor(self, name: str, local: Tensor) -> DTensor:
        p = self.params[name]
        return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

    def _check_shards(self, shards: object, what: str) -> None:
        problem = None
        if not isinstance(shards, Mapping) or set(shards) != set(self.params):
            keys = sorted(shards) if isinstance(shards, Mapping) else type(shards).__name__
            problem = f"`{what}` must map every parameter name {list(self.params)} to its local shard, got {keys}."
        else:
            for n, p in self.params.items():
                t, want = shards[n], p.to_local()
                if not isinstance(t, Tensor) or t.shape != want.shape or t.dtype != want.dtype or \
                        not bool(torch.isfinite(t).all()):
                    got = f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
                    problem = (f"`{what}[{n!r}]` must be this rank's local shard, a finite {want.dtype} tensor of "
                               f"shape {tuple(want.shape)} (use .shard(full_vector)), got {got}.")
                    break
        _agree(problem, self.group)

    # -- products ---------------------------------------------------------------------------------------------------
    def _loss(self, X: Any, y: Any, w: float) -> Tensor:
        return self.loss_fn(self.model(X), y) * w

    @contextlib.contextmanager
    def _grads_set_aside(self) -> Iterator[None]:
        """The user's ``.grad`` fields are kept aside during a product and put back afterwards."""
        kept = {n: p.grad for n, p in self.params.items()}
        try:
            yield
        finally:
            for n, p in self.params.items():
                p.grad = kept[n]

    def gradient(self) -> Shards:
        r"""Local shards of :math:`\nabla\mathcal L(\theta)` (FSDP's mean reduce-scatter times the world size)."""
        with self._grads_set_aside():
            return self._gradient()

    def _gradient(self) -> Shards:
        for p in self.params.values():
            p.grad = None
        for (X, y), w in self.batches:
            (self._loss(X, y, w) * self.world_size).backward()
        return {n: p.grad.to_local().detach().clone() if isinstance(p.grad, DTensor) else torch.zeros_like(p.to_local())
                for n, p in self.params.items()}

    def _gradient_at(self, theta: Shards, v: Shards, eps: float) -> Shards:
        with torch.no_grad():
            for n, p in self.params.items():
                p.to_local().copy_(theta[n] + eps * v[n])
        return self._gradient()

    def _differences(self, v: Shards, steps: Sequence[float]) -> tuple[list[Shards], float]:
        r""":math:`D(\epsilon)` for every step and :math:`\lVert\nabla\mathcal L(\theta+\epsilon_0 v)\rVert`; the
        parameters are restored bit-exactly afterwards.
        """
        theta = {n: p.to_local().detach().clone() for n, p in self.params.items()}
        out: list[Shards] = []
        grad_norm = 0.0
        try:
            with self._grads_set_aside():
                for eps in steps:
                    g_plus = self._gradient_at(theta, v, eps)
                    if not out:
                        grad_norm = float(torch.sqrt(self.dot(g_plus, g_plus)))
                    g_minus = self._gradient_at(theta, v, -eps)
                    out.append({n: central_difference(g_plus[n], g_minus[n], eps) for n in self.params})
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.to_local().copy_(theta[n])
        return out, grad_norm

    def _steps(self, v: Shards, levels: int) -> list[float]:
        eps = self.step / float(torch.sqrt(self.dot(v, v)))
        return [eps / 2**k for k in range(levels)]

    def matvec(self, v: Mapping[str, Tensor]) -> Shards:
        """Local shards of :math:`Hv` from local shards of ``v`` (collective: every rank calls it)."""
        self._check_shards(v, "v")
        vv = dict(v)
        if self.method == "exact":
            return self._exact(vv)
        d, _ = self._differences(vv, self._steps(vv, 2))
        return {n: richardson(d[0][n], d[1][n]) for n in self.params}

    def matvec_with_error(self, v: Mapping[str, Tensor]) -> tuple[Shards, float]:
        r"""``(Hv shards, error bound)`` with one more pair of gradients: :func:`fd_error_estimate` with
        :math:`\delta = u\,\lVert\nabla\mathcal L\rVert` (``u`` = ``torch.finfo(dtype).eps``; measured round-off
        0.4-1.2 :math:`u\lVert\nabla\mathcal L\rVert` on the test models), MATH §6.x. ``method="exact"``: 0.0.
        """
        self._check_shards(v, "v")
        vv = dict(v)
        if self.method == "exact":
            return self._exact(vv), 0.0
        steps = self._steps(vv, 3)
        d, grad_norm = self._differences(vv, steps)
        r1 = {n: richardson(d[0][n], d[1][n]) for n in self.params}
        diff = {n: r1[n] - richardson(d[1][n], d[2][n]) for n in self.params}
        delta = float(torch.finfo(self.dtype).eps) * grad_norm
        return r1, float(fd_error_estimate(float(torch.sqrt(self.dot(diff, diff))), delta, steps[0]))

    @contextlib.contextmanager
    def _unsharded(self) -> Iterator[dict[str, Tensor]]:
        """Every FSDP unit unsharded and kept so through forward and both backwards (FSDP2's settings restored)."""
        kept = []
        for unit in self.units:
            state = unit._get_fsdp_state()
            kept.append((state, state._auto_reshard_after_forward,
                         [(g, g.post_forward_mesh_info, g.reshard_after_backward) for g in state._fsdp_param_groups]))
        try:
            for unit in self.units:
                unit.set_reshard_after_forward(False, recurse=False)
                unit.set_reshard_after_backward(False, recurse=False)
            for unit in self.units:
                unit.unshard()
            yield {n: p for n, p in self.model.named_parameters() if n in self.params}
        finally:
            for unit in self.units:
                unit.reshard()
            for state, auto, groups in kept:
                state._auto_reshard_after_forward = auto
                for g, info, after_backward in groups:
                    g.post_forward_mesh_info, g.reshard_after_backward = info, after_backward

    def _exact(self, v: Shards) -> Shards:
        v_full = {n: self._dtensor(n, v[n]).full_tensor() for n in self.params}
        with self._grads_set_aside(), self._unsharded() as unsharded:
            leaves = [unsharded[n] for n in self.params]
            hv = [torch.zeros_like(t) for t in v_full.values()]
            for (X, y), w in self.batches:
                g = torch.autograd.grad(self._loss(X, y, w), leaves, create_graph=True)
                gv = sum(((gi * vi).sum() for gi, vi in zip(g, v_full.values())),
                         torch.zeros((), dtype=self.dtype, device=g[0].device))
                for acc, h in zip(hv, torch.autograd.grad(gv, leaves)):
                    acc.add_(h)
        out = {}
        for (n, p), h in zip(self.params.items(), hv):
            part = DTensor.from_local(h, p.device_mesh, [Partial()] * len(p.placements), shape=p.shape,
                                      stride=p.stride())
            out[n] = part.redistribute(p.device_mesh, p.placements).to_local().clone()
        return out


# --------------------------------------------------------------------------------------------------------------
# Memory model (README "Model sharding")
# --------------------------------------------------------------------------------------------------------------


def llama_parameter_count(d: int, layers: int, ffn: int, vocab: int, *, heads: int = 1, kv_heads: int | None = None,
                          tied: bool = False) -> int:
    r"""Parameters of a LLaMA-shaped decoder (no biases; ``kv_heads`` < ``heads`` is grouped-query attention).

    .. math::
        P = V d\,(2 - [\text{tied}]) + L\Big(2d^2 + 2d\,\frac{d\,h_{kv}}{h} + 3 d f + 2d\Big) + d
    """
    kv = d * (kv_heads if kv_heads is not None else heads) // heads
    return vocab * d * (1 if tied else 2) + layers * (2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d) + d


def saved_activation_bytes(model: nn.Module, loss_fn: Callable[[Tensor, Any], Tensor], X: Any, y: Any, *,
                           create_graph: bool) -> int:
    """Bytes of the tensors autograd saves for the backward that follows: the forward's (``create_graph=False``),
    or the forward's plus the first backward's when that backward builds a graph for a second (double backward).
    Storage shared by several saved tensors is counted once; parameters and their views are not counted.

    Args:
        model: an unsharded module (the measurement runs in one process).
        loss_fn: ``loss_fn(model(X), y) -> scalar``.
        X: one batch's inputs.
        y: its targets.
        create_graph: count the first backward's saved tensors too (double backward).

    Returns:
        The bytes, as measured by ``torch.autograd.graph.saved_tensors_hooks``.
    """
    seen: dict[tuple[int, int], int] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:  # parameters (and views of them, e.g. Wᵀ) are not activations
            seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(X), y)
        if create_graph:
            torch.autograd.grad(loss, params, create_graph=True)
    return sum(seen.values())


@dataclass(frozen=True)
class MemoryModel:
    """Bytes per rank of one Hessian-vector product (see :func:`memory_model`)."""

    parameters: int
    gradients: int
    hvp_state: int
    unsharded_parameters: int
    activations: int

    @property
    def total(self) -> int:
        """Sum of the parts."""
        return self.parameters + self.gradients + self.hvp_state + self.unsharded_parameters + self.activations


def memory_model(num_params: int, largest_unit: int, *, ranks: int, bytes_per_element: int,
                 activation_elements_per_token: float, tokens_per_rank: int, method: Method,
                 double_backward_factor: float) -> MemoryModel:
    r"""Bytes per rank of one HVP of a model of ``num_params`` parameters sharded over ``ranks`` ranks.

    * ``"finite_difference"``: parameter shard, FSDP's gradient shard, the product's shards (θ kept for the
      bit-exact restore, ``v``, :math:`g_+`, :math:`D(\epsilon)`, :math:`D(\epsilon/2)`: 5 shards), two units
      unsharded at a time (FSDP's prefetch: parameters and their unsharded gradient), the ordinary backward's
      activations.
    * ``"exact"``: parameter shard, every unit unsharded (full ``P``), the full gradient (part of the double-backward
      graph), full ``v`` and ``Hv`` (3 ``P``), and activations times ``double_backward_factor`` (the saved bytes of
      forward + create_graph backward over those of the forward, :func:`saved_activation_bytes`).

    .. math::
        M_{\mathrm{fd}} = 7\,\lceil P/N\rceil b + 4 P_{\mathrm{unit}} b + A T b, \qquad
        M_{\mathrm{exact}} = \lceil P/N\rceil b + 4 P b + \phi A T b

    Args:
        num_params: :math:`P`.
        largest_unit: :math:`P_{\mathrm{unit}}`, parameters of the largest FSDP unit (one decoder layer).
        ranks: :math:`N`.
        bytes_per_element: :math:`b` (2 bf16, 4 fp32, 8 float64).
        activation_elements_per_token: :math:`A`, e.g. :func:`llama_activation_elements_per_token`.
        tokens_per_rank: :math:`T`.
        method: ``"finite_difference"`` or ``"exact"``.
        double_backward_factor: :math:`\phi`.

    Returns:
        The parts, in bytes.
    """
    shard = math.ceil(num_params / ranks) * bytes_per_element
    acts = activation_elements_per_token * tokens_per_rank * bytes_per_element
    if method == "exact":
        return MemoryModel(shard, 0, 3 * num_params * bytes_per_element, num_params * bytes_per_element,
                           int(acts * double_backward_factor))
    return MemoryModel(shard, shard, 5 * shard, 2 * 2 * largest_unit * bytes_per_element, int(acts))


def llama_activation_elements_per_token(d: int, layers: int, ffn: int, heads: int, vocab: int, seq_len: int, *,
                                        eager_attention: bool) -> int:
    r"""Elements a LLaMA decoder must keep per token for backward (the mathematical minimum; an implementation
    keeps more, see the README): per layer, the two RMSNorm inputs and outputs (:math:`4d`), q, k, v and the
    attention output (:math:`4d`), the MLP gate, up, SiLU(gate) and their product (:math:`4f`), and the attention
    probabilities :math:`h s` with eager attention (flash attention keeps :math:`h` log-sum-exps instead, and has no
    double backward); then the logits and their log-softmax (:math:`2V`).

    .. math::
        A = L\,(8d + 4f + h\,s) + 2V
    """
    return layers * (8 * d + 4 * ffn + (heads * seq_len if eager_attention else heads)) + 2 * vocab
