r"""The base matrix-free linear operator (products only, never stored) and its transpose / sub-matrix views.

An operator :math:`A \in \mathbb R^{m\times n}` is known through ``A @ V``; subclasses implement ``_matmat``
(and ``_rmatmat`` unless symmetric). Exports: ``to_scipy`` and a memory-guarded ``dense``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
from torch import Tensor

from energy._validation import DenseSizeError, EnergyInputError, check_result, check_tensor

__all__ = ["LinearOperator"]


def _available_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


_NAN_HINT = "If the scale is moderate, check the model's parameters (or the operator's data) for NaN/inf entries."


class LinearOperator:
    r"""A matrix :math:`A \in \mathbb R^{m\times n}` known only through products :math:`A V`.

    Subclasses implement ``_matmat(V)`` for ``V`` of shape ``(n, k)`` (and ``_rmatmat`` unless symmetric).

    Args:
        shape: ``(m, n)``.
        dtype: floating dtype of inputs and outputs.
        device: device of inputs and outputs.
        symmetric: whether ``A = Aᵀ`` (then ``A.T`` is ``A``).
        max_vectors: largest number of columns pushed through one (vmapped) pass; more columns are chunked.
            ``None`` = no chunking. Bounds the memory of ``matmat`` and ``dense``.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        *,
        symmetric: bool = False,
        max_vectors: int | None = None,
    ) -> None:
        if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
                or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in shape)):
            raise EnergyInputError(
                f"`shape` must be a pair (m, n) of ints ≥ 0 (the operator maps R^n to R^m), got {shape!r}."
            )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise EnergyInputError(
                f"`dtype` must be a real floating torch dtype (e.g. torch.float64) for the operator's inputs and "
                f"outputs, got {dtype!r}."
            )
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.device = torch.device(device)
        self.symmetric = symmetric
        if max_vectors is not None and (not isinstance(max_vectors, int) or max_vectors < 1):
            raise EnergyInputError(f"`max_vectors` must be a positive int or None, got {max_vectors!r}.")
        self.max_vectors = max_vectors

    # -- products --------------------------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rmatmat(self, U: Tensor) -> Tensor:
        if self.symmetric:
            return self._matmat(U)
        raise NotImplementedError(f"{type(self).__name__} has no transpose product.")

    def _check_input(self, V: object, name: str, size: int) -> tuple[Tensor, bool]:
        V = check_tensor(V, name)
        if V.ndim not in (1, 2) or V.shape[0] != size:
            raise EnergyInputError(
                f"`{name}` must have shape ({size},) or ({size}, k) to multiply a {self.shape[0]}×{self.shape[1]} "
                f"operator, got {tuple(V.shape)}; flatten per-parameter tensors with `ParameterSpace.flatten`."
            )
        if V.dtype != self.dtype:
            raise EnergyInputError(
                f"`{name}` has dtype {V.dtype} but the operator works in {self.dtype}; cast it with "
                f"`{name}.to({self.dtype})` (nothing is cast silently)."
            )
        is_vec = V.ndim == 1
        return (V[:, None] if is_vec else V).to(self.device), is_vec

    def _chunked(self, fn: Callable[[Tensor], Tensor], V: Tensor) -> Tensor:
        k = V.shape[1]
        step = k if self.max_vectors is None else self.max_vectors
        if k <= step:
            return fn(V)
        return torch.cat([fn(V[:, i : i + step]) for i in range(0, k, step)], dim=1)

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``A @ V`` for ``V`` of shape ``(n, k)`` (all ``k`` columns in one vmapped pass, or chunks)."""
        V, is_vec = self._check_input(V, "V", self.shape[1])
        out = check_result(self._chunked(self._matmat, V), f"`{type(self).__name__} @ V`", {"V": V}, hint=_NAN_HINT)
        assert isinstance(out, Tensor)
        return out[:, 0] if is_vec else out

    def rmatmat(self, U: Tensor) -> Tensor:
        """Return ``Aᵀ @ U`` for ``U`` of shape ``(m, k)``."""
        U, is_vec = self._check_input(U, "U", self.shape[0])
        out = check_result(self._chunked(self._rmatmat, U), f"`{type(self).__name__}.T @ U`", {"U": U}, hint=_NAN_HINT)
        assert isinstance(out, Tensor)
        return out[:, 0] if is_vec else out

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``A @ v`` for ``v`` of shape ``(n,)``."""
        v = check_tensor(v, "v", ndim=1)
        return self.matmat(v)

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.matmat(V)

    def __call__(self, V: Tensor) -> Tensor:
        return self.matmat(V)

    @property
    def T(self) -> LinearOperator:  # noqa: N802 - matrix notation
        """The transpose ``Aᵀ`` (itself when symmetric)."""
        return self if self.symmetric else _TransposedOperator(self)

    # -- exports -------------------------------------------------------------------------------------------------
    def to_scipy(self) -> ScipyLinearOperator:
        """Export as :class:`scipy.sparse.linalg.LinearOperator` (float64 numpy in and out).

        Inputs are converted to the operator's dtype; with a float32 operator the result therefore carries
        float32 round-off even though it is returned as float64.
        """

        def mm(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X)
            Xt = torch.as_tensor(X.reshape(X.shape[0], -1), dtype=self.dtype, device=self.device)
            return self.matmat(Xt).detach().cpu().to(torch.float64).numpy()

        def rmm(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X)
            Xt = torch.as_tensor(X.reshape(X.shape[0], -1), dtype=self.dtype, device=self.device)
            return self.rmatmat(Xt).detach().cpu().to(torch.float64).numpy()

        return ScipyLinearOperator(
            shape=self.shape,
            dtype=np.float64,
            matvec=lambda x: mm(x).reshape(-1),
            matmat=mm,
            rmatvec=lambda x: rmm(x).reshape(-1),
            rmatmat=rmm,
        )

    def dense(self, *, max_gib: float | None = None) -> Tensor:
        """Materialise ``A`` as an ``(m, n)`` tensor by multiplying the identity (in column chunks).

        Args:
            max_gib: refuse (with :class:`DenseSizeError`) if the matrix needs more than this many GiB.
                Default: half the memory currently available.
        """
        m, n = self.shape
        itemsize = self.dtype.itemsize
        need = m * n * itemsize / 2**30
        limit = _available_memory_bytes() / 2 / 2**30 if max_gib is None else float(max_gib)
        if need > limit:
            raise DenseSizeError(
                f"{type(self).__name__}.dense() would need {need:.3g} GiB for a {m}×{n} {self.dtype} matrix, more "
                f"than the allowed {limit:.3g} GiB (`max_gib`; default half the available memory). Use the "
                "matrix-free route instead: `op @ v` / `op.matmat(V)`, the estimators of energy.hessian.estimators "
                "(hutchinson_trace, hutchinson_squared_frobenius, lanczos, slq_density), or `op.block(names).dense()` "
                "for a smaller block."
            )
        step = n if self.max_vectors is None else self.max_vectors
        cols = []
        for i in range(0, n, step):
            E = torch.zeros(n, min(step, n - i), dtype=self.dtype, device=self.device)
            E[torch.arange(i, i + E.shape[1], device=E.device), torch.arange(E.shape[1], device=E.device)] = 1
            cols.append(self._matmat(E))
        return torch.cat(cols, dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class _TransposedOperator(LinearOperator):
    def __init__(self, A: LinearOperator) -> None:
        super().__init__((A.shape[1], A.shape[0]), A.dtype, A.device, max_vectors=A.max_vectors)
        self._A = A

    def _matmat(self, V: Tensor) -> Tensor:
        return self._A._rmatmat(V)

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self._A._matmat(U)

    @property
    def T(self) -> LinearOperator:  # noqa: N802
        return self._A


class _SubmatrixOperator(LinearOperator):
    def __init__(self, parent: LinearOperator, rows: list[slice], cols: list[slice]) -> None:
        m = sum(s.stop - s.start for s in rows)
        n = sum(s.stop - s.start for s in cols)
        super().__init__((m, n), parent.dtype, parent.device, max_vectors=parent.max_vectors)
        self._parent, self._rows, self._cols = parent, rows, cols

    @staticmethod
    def _embed(V: Tensor, slices: list[slice], dim: int) -> Tensor:
        full = V.new_zeros(dim, V.shape[1])
        i = 0
        for s in slices:
            full[s] = V[i : i + s.stop - s.start]
            i += s.stop - s.start
        return full

    def _matmat(self, V: Tensor) -> Tensor:
        out = self._parent._matmat(self._embed(V, self._cols, self._parent.shape[1]))
        return torch.cat([out[s] for s in self._rows])

    def _rmatmat(self, U: Tensor) -> Tensor:
        out = self._parent._matmat(self._embed(U, self._rows, self._parent.shape[1]))
        return torch.cat([out[s] for s in self._cols])


