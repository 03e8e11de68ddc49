r"""The Hessian of a scalar function of a tensor (token states), matrix-free, in ``vec_r`` order (MATH §4.1).

Products are forward-over-reverse (``jvp`` of ``grad``), optionally through a tangent map traced once with
``torch.func.linearize``. The point ``Y`` is validated once at construction; the products themselves are pure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, linearize, vmap

from energy._validation import EnergyInputError, check_scalar_objective, check_tensor
from energy.hessian.distributed import ShardGroup, resolve_shards
from energy.hessian.linear_operator import LinearOperator

__all__ = ["TokenHessianOperator"]


class TokenHessianOperator(LinearOperator):
    r"""The Hessian :math:`\nabla^2_Y \phi(Y)` of a scalar function of a tensor (token states), in ``vec_r`` order.

    For an energy ``E(Y)`` with ``Y ∈ R^{n×d}`` this is the ``nd × nd`` token-space Hessian of MATH §4.1; for
    ``φ(Y) = ℓ(model(Y), y)`` it is the loss curvature with respect to the inputs (see :meth:`from_model`).

    Args:
        fn: ``fn(Y) -> scalar``, differentiable twice with ``torch.func``.
        Y: the point (any shape); it is not modified.
        max_vectors: column chunk for ``matmat`` / ``dense``.
        linearize_once: trace the tangent map with ``torch.func.linearize`` at construction and reuse it for every
            product (faster for many sequential products, costs one tracing pass).
        distributed: ``True`` or a :class:`~energy.hessian.distributed.ShardGroup`: ``Y`` is this rank's shard of
            the token states and ``fn`` its term of ``φ = Σ_r φ_r(Y_r)``. The operator is then the Hessian over the
            states of all ranks (rank 0's ``vec_r(Y_0)`` first, then rank 1's, …; block diagonal across ranks):
            every rank multiplies the same global vectors, computes its own rows and the rows are summed into the
            product every rank returns (MATH §6.1).
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        Y: Tensor,
        *,
        max_vectors: int | None = None,
        linearize_once: bool = False,
        distributed: bool | ShardGroup = False,
    ) -> None:
        self.shards = resolve_shards(distributed)
        if self.shards is None:
            self._setup(fn, Y)
            n, self.offset = Y.numel(), 0
        else:
            shards = self.shards
            shards.run(lambda: self._setup(fn, Y), "checking each rank's token states")
            shards.check_same(str(self.Y.dtype), "the dtype of the token states")
            sizes = [int(s) for s in shards.gather_objects(self.Y.numel(), "the sizes of the token shards")]
            n, self.offset = sum(sizes), sum(sizes[: shards.rank])
        super().__init__((n, n), self.Y.dtype, self.Y.device, symmetric=True, max_vectors=max_vectors)
        self._g = grad(lambda Z: fn(Z).reshape(()))
        self._lin = linearize(self._g, self.Y)[1] if linearize_once else None

    def _setup(self, fn: Callable[[Tensor], Tensor], Y: Tensor) -> None:
        Y = check_tensor(Y, "Y")
        if not callable(fn):
            raise EnergyInputError(f"`fn` must be callable Y -> scalar, got {type(fn).__name__}.")
        with torch.no_grad():
            try:
                value = fn(Y.detach())
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise EnergyInputError(
                    f"`fn` fails on `Y` (shape {tuple(Y.shape)}, dtype {Y.dtype}): {exc}."
                ) from exc
        check_scalar_objective(
            value, "fn(Y)", where=f"at `Y` (max |Y| = {float(Y.detach().abs().max()):.3g})",
            fix_scalar="sum over batch elements (e.g. `lambda Y: energy(Y).sum()`)",
            fix_finite="Rescale `Y` or check `fn`.")
        self.fn, self.Y = fn, Y.detach()

    @classmethod
    def from_model(
        cls, model: Callable[[Tensor], Tensor], loss_fn: Callable[[Tensor, Any], Tensor], X: Tensor, y: Any, **kw: Any
    ) -> TokenHessianOperator:
        r""":math:`\nabla^2_X \ell(\mathrm{model}(X), y)`: the loss Hessian with respect to the input states ``X``."""
        if isinstance(y, Tensor) and y.is_floating_point() and isinstance(X, Tensor):
            with torch.no_grad():
                out = model(X)
            if isinstance(out, Tensor) and out.shape != y.shape:
                raise EnergyInputError(
                    f"`y` has shape {tuple(y.shape)} but `model(X)` has shape {tuple(out.shape)}; the loss would "
                    f"broadcast them into a different loss. Reshape `y` to {tuple(out.shape)}."
                )
        return cls(lambda Z: loss_fn(model(Z), y), X, **kw)

    def _local_matmat(self, V: Tensor) -> Tensor:
        Vt = V.T.reshape(V.shape[1], *self.Y.shape)
        with torch.no_grad():
            if self._lin is not None:
                HV = vmap(self._lin)(Vt)
            else:
                HV = vmap(lambda v: jvp(self._g, (self.Y,), (v,))[1])(Vt)
        return HV.reshape(V.shape[1], -1).T

    def _matmat(self, V: Tensor) -> Tensor:
        if self.shards is None:
            return self._local_matmat(V)
        rows = slice(self.offset, self.offset + self.Y.numel())

        def local() -> Tensor:
            out = torch.zeros_like(V)
            out[rows] = self._local_matmat(V[rows])
            return out

        return self.shards.sum(local, V.shape, V, "the token-space Hessian products", probe=V)
