r"""Matrix-free curvature operators for any ``nn.Module`` + loss + data (MATH §3.1, §3.7).

Every operator here is a linear map that is never stored: it is applied to vectors through
``torch.func`` (``functional_call``, ``jvp``, ``vjp``, ``grad``, ``vmap``, optionally ``linearize``).

Objective and normalisation
---------------------------
The data is a re-iterable collection of batches ``(X_b, y_b)``, ``b = 1..B``, with ``N_b`` samples each
(``N_b = X_b.shape[0]`` unless ``batch_size_fn`` says otherwise), ``N = Σ_b N_b``. With the per-batch loss
``ℓ_b(θ) = loss_fn(f(X_b; θ), y_b)`` exactly as the user's ``loss_fn`` computes it, the objective is

.. math::
    \mathcal L(\theta) = \sum_b w_b\, \ell_b(\theta), \qquad
    w_b = \begin{cases} N_b / N & \text{reduction = "mean"} \\ 1 & \text{reduction = "sum"} \end{cases}

With ``reduction="mean"`` and a ``loss_fn`` that averages over its batch (``nn.CrossEntropyLoss()``,
``nn.MSELoss()``), :math:`\mathcal L` is the average over the whole data set whatever the (unequal) batch
sizes are -- provided every sample carries the same number of loss terms (e.g. every sequence is scored on
the same number of positions). With ``reduction="sum"`` and a summing ``loss_fn`` it is the total.

Curvature matrices (over the flattened parameter vector ``θ``, named blocks concatenated in the given
order, each block flattened row-major = ``vec_r`` of MATH §0):

.. math::
    H = \nabla^2_\theta \mathcal L, \qquad
    G = \sum_b w_b\, J_b^\top\, \nabla^2_{o}\ell_b\, J_b \;(\text{GGN}, = H_o \text{ of MATH §3.1}), \qquad
    H_f = H - G = \sum_b w_b \sum_k (\nabla_o \ell_b)_k\, \nabla^2_\theta o_{b,k}

where ``o_b = f(X_b; θ)`` are the model outputs and ``J_b = ∂o_b/∂θ``. ``G`` is PSD for losses that are
convex in the outputs (MSE, cross-entropy). Taken at the output of an attention layer with the square loss
``G`` is the outer-product part ``H_o`` and ``H − G`` the functional part ``H_f`` of MATH §3.1.

How products are computed (one batch, ``k`` vectors ``V`` at once with ``vmap``)
------------------------------------------------------------------------------
* The primal forward/backward of a batch runs once (``vmap`` does not batch it); the tangents and cotangents
  of all ``k`` vectors are batched.
* ``G V``: one primal ``vjp`` (kept), ``J V`` by ``jvp``, ``U = ∇²_o ℓ_b · JV`` in output space, ``Jᵀ U`` by the
  kept ``vjp`` function.
* ``H V`` alone: reverse-over-reverse, ``vjp`` of ``θ ↦ ∇_θ ℓ_b`` -- one linearisation of the batch (the kept
  ``vjp`` function) reused for all ``k`` vectors.
* ``H V`` with ``G V`` (:meth:`CurvatureOperator.hessian_and_ggn`) or ``H_f V``: the functional part is the
  forward-over-reverse derivative of ``θ ↦ Jᵀ g_o`` with the output gradient ``g_o = ∇_o ℓ_b`` held fixed,
  and the same pass returns ``J V`` as a by-product:

  .. math::
      \frac{d}{d\epsilon}\Big( J(\theta+\epsilon v)^\top g_o,\; f(\theta+\epsilon v)\Big)\Big|_0 = (H_f v,\; J v),
      \qquad G v = J^\top(\nabla^2_o \ell\, J v), \qquad H v = G v + H_f v .

  The reverse tangent of ``Jᵀ g_o`` carries only the second derivatives of the network (no loss-Hessian term
  flows back through it), and ``J V`` is not recomputed for the GGN (timings: benchmarks/bench_hessian.py).
  The loss itself is differentiated only in reverse mode (``∇²_o ℓ U`` by reverse-over-reverse in output
  space), so every torch loss works (forward-over-reverse through ``F.mse_loss`` fails in torch 2.x). Asking
  for ``G V`` alone skips the functional pass (``jvp`` then ``vjp``).

Public API: :class:`HessianOperator`, :class:`GGNOperator`, :class:`FunctionalOperator`,
:class:`JacobianOperator` (``.T`` = :class:`TransposedJacobianOperator`), :class:`TokenHessianOperator`,
the base :class:`LinearOperator` (``@``, ``matvec``, ``matmat``, ``to_scipy``, ``dense``), and the dense
autograd twins :func:`dense_hessian_reference`, :func:`dense_ggn_reference` used to verify them.
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, linearize, vjp, vmap

from energy._validation import DenseSizeError, EnergyInputError, check_tensor, warn_if_not_float64

__all__ = [
    "LinearOperator",
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "FunctionalOperator",
    "JacobianOperator",
    "TransposedJacobianOperator",
    "TokenHessianOperator",
    "ParameterSpace",
    "DenseSizeError",
    "dense_hessian_reference",
    "dense_ggn_reference",
]

Reduction = Literal["mean", "sum"]
Kind = Literal["H", "G", "F"]
_KIND_NAMES = {"H": "Hessian", "G": "GGN", "F": "functional part H - GGN"}


def _linearize(fn: Callable, primal: Any) -> Callable:
    """``torch.func.linearize(fn, primal)[1]`` (the traced tangent map), without its benign fx tracing warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
        return linearize(fn, primal)[1]


# --------------------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------------------


def _available_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


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
        out = self._chunked(self._matmat, V)
        return out[:, 0] if is_vec else out

    def rmatmat(self, U: Tensor) -> Tensor:
        """Return ``Aᵀ @ U`` for ``U`` of shape ``(m, k)``."""
        U, is_vec = self._check_input(U, "U", self.shape[0])
        out = self._chunked(self._rmatmat, U)
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
        itemsize = torch.empty((), dtype=self.dtype).element_size()
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
            E[torch.arange(i, i + E.shape[1]), torch.arange(E.shape[1])] = 1
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


# --------------------------------------------------------------------------------------------------------------
# Parameter space: named blocks <-> one flat vector (vec_r per block)
# --------------------------------------------------------------------------------------------------------------


class ParameterSpace:
    """The flat coordinate system of a list of named parameters: blocks concatenated, each ``vec_r``-flattened.

    Args:
        model: the module owning the parameters.
        names: parameter names as in ``model.named_parameters()``; ``None`` = all parameters requiring grad.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise EnergyInputError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        available = dict(model.named_parameters())
        if names is None:
            names = [n for n, p in available.items() if p.requires_grad]
        elif isinstance(names, str):
            names = [names]
        names = list(names)
        if not names:
            raise EnergyInputError("`params` is empty; name at least one parameter of the model.")
        seen = set()
        for n in names:
            if not isinstance(n, str):
                raise EnergyInputError(f"`params` must be parameter names (str), got {type(n).__name__} {n!r}.")
            if n not in available:
                close = difflib.get_close_matches(n, list(available), n=3)
                hint = f" Did you mean {close}?" if close else ""
                listing = ", ".join(list(available)[:12]) + (" ..." if len(available) > 12 else "")
                raise EnergyInputError(
                    f"`params`: {n!r} is not a parameter of the model.{hint} Available names: {listing}."
                )
            if n in seen:
                raise EnergyInputError(f"`params`: {n!r} is listed twice; each block may appear once.")
            seen.add(n)
        dtypes = {available[n].dtype for n in names}
        if len(dtypes) > 1:
            raise EnergyInputError(f"`params` mix dtypes {sorted(map(str, dtypes))}; cast the model with `.to(dtype)`.")
        self.names: tuple[str, ...] = tuple(names)
        self.shapes: tuple[torch.Size, ...] = tuple(available[n].shape for n in names)
        self.sizes: tuple[int, ...] = tuple(int(math.prod(s)) for s in self.shapes)
        self.offsets: tuple[int, ...] = tuple(int(o) for o in np.cumsum((0,) + self.sizes[:-1]))
        self.dim = int(sum(self.sizes))
        self.dtype = available[names[0]].dtype
        self.device = available[names[0]].device

    def slice(self, name: str) -> slice:
        """Index range of block ``name`` inside the flat vector."""
        if name not in self.names:
            raise EnergyInputError(f"block {name!r} is not part of this operator's parameters {list(self.names)}.")
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    def split(self, V: Tensor) -> dict[str, Tensor]:
        """``(dim, k)`` -> ``{name: (k, *shape)}`` (views where possible)."""
        k = V.shape[1]
        return {
            n: V[o : o + s].T.reshape(k, *shp)
            for n, o, s, shp in zip(self.names, self.offsets, self.sizes, self.shapes)
        }

    def join(self, blocks: dict[str, Tensor]) -> Tensor:
        """``{name: (k, *shape)}`` -> ``(dim, k)``."""
        return torch.cat([blocks[n].reshape(blocks[n].shape[0], -1) for n in self.names], dim=1).T

    def flatten(self, tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """One vector per block (dict by name, or a list in block order) -> flat ``(dim,)`` vector."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """Flat ``(dim,)`` vector -> ``{name: tensor of the parameter's shape}``."""
        return {n: v[o : o + s].reshape(shp) for n, o, s, shp in zip(self.names, self.offsets, self.sizes, self.shapes)}


# --------------------------------------------------------------------------------------------------------------
# Data and loss
# --------------------------------------------------------------------------------------------------------------


def _check_data(data: object) -> list[tuple[Any, Any]] | Iterable:
    if isinstance(data, (Iterator,)) or (hasattr(data, "__iter__") and iter(data) is data):  # type: ignore[arg-type]
        raise EnergyInputError(
            "`data` is a one-shot iterator; every product traverses the data again, so pass a re-iterable "
            "collection, e.g. `list(batches)` or a DataLoader."
        )
    if not hasattr(data, "__iter__"):
        raise EnergyInputError(f"`data` must be an iterable of (inputs, targets) batches, got {type(data).__name__}.")
    return data


def _check_deterministic_model(model: nn.Module) -> None:
    """Curvature of a random or batch-coupled forward pass is ill-defined: refuse active dropout / batch norm."""
    for name, m in model.named_modules():
        active_dropout = isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
        train_bn = isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        if active_dropout or train_bn:
            raise EnergyInputError(
                f"module {name or type(m).__name__!r} ({type(m).__name__}) is in training mode, so the forward pass is "
                "random or depends on the batch composition; call `model.eval()` before building the operator."
            )


def _resolve_reduction(loss_fn: Callable, reduction: str | None) -> Reduction:
    own = getattr(loss_fn, "reduction", None)
    if reduction is None:
        if own in ("mean", "sum"):
            return own  # type: ignore[return-value]
        raise EnergyInputError(
            "`reduction` is required: pass reduction='mean' (objective = Σ_b (N_b/N) ℓ_b, the data-set mean for a "
            "batch-averaging loss) or reduction='sum' (objective = Σ_b ℓ_b)."
        )
    if reduction not in ("mean", "sum"):
        raise EnergyInputError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")
    if own in ("mean", "sum") and own != reduction:
        raise EnergyInputError(
            f"`reduction`={reduction!r} contradicts `loss_fn.reduction`={own!r}; construct the loss with "
            f"reduction={reduction!r} so that the batch loss and the data-set weights agree."
        )
    if own == "none":
        raise EnergyInputError("`loss_fn` has reduction='none' but must return a scalar per batch.")
    return reduction  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------
# Curvature operators
# --------------------------------------------------------------------------------------------------------------


class CurvatureOperator(LinearOperator):
    r"""Shared machinery of :class:`HessianOperator`, :class:`GGNOperator` and :class:`FunctionalOperator`.

    Args:
        model: any ``nn.Module`` mapping a batch's inputs to a tensor of outputs ``o``.
        loss_fn: ``loss_fn(o, y) -> scalar``; it is evaluated inside ``torch.func`` transforms (use functional
            losses or ``nn`` loss modules, no in-place ops on ``o``).
        params: names of the parameter blocks (a subset of ``model.named_parameters()``), or ``None`` for all.
            All other parameters and buffers are held fixed at their current values.
        data: re-iterable batches ``(X_b, y_b)``.
        reduction: ``"mean"`` or ``"sum"``, see the module docstring; defaults to ``loss_fn.reduction``.
        batch_size_fn: ``N_b`` from ``X_b`` (default ``X_b.shape[0]``).
        max_vectors: column chunk for ``matmat`` / ``dense`` (memory bound).
        cache: keep, per batch, the linearisation (the ``vjp`` function of the gradient for ``H``; the primal
            ``vjp`` function, the output gradient and a ``torch.func.linearize``-d tangent map for ``G`` / ``F``)
            and reuse it for every later product. Pays off for many sequential products (Lanczos) on few
            batches; memory = activations of every batch. The cache is built for the current parameter values;
            call :meth:`clear_cache` after changing the model.
    """

    kind: Kind = "H"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        params: Sequence[str] | str | None,
        data: Iterable,
        *,
        reduction: Reduction | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        max_vectors: int | None = None,
        cache: bool = False,
    ) -> None:
        if not callable(loss_fn):
            raise EnergyInputError(f"`loss_fn` must be callable (o, y) -> scalar, got {type(loss_fn).__name__}.")
        self.space = ParameterSpace(model, params)
        _check_deterministic_model(model)
        super().__init__(
            (self.space.dim, self.space.dim),
            self.space.dtype,
            self.space.device,
            symmetric=True,
            max_vectors=max_vectors,
        )
        self.model = model
        self.loss_fn = loss_fn
        self.reduction: Reduction = _resolve_reduction(loss_fn, reduction)
        self.data = _check_data(data)
        self.batch_size_fn = batch_size_fn or (lambda X: int(X.shape[0]))
        sizes = []
        for i, batch in enumerate(self.data):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise EnergyInputError(
                    f"`data` batch {i} must be a pair (inputs, targets), got {type(batch).__name__}."
                )
            sizes.append(int(self.batch_size_fn(batch[0])))
        if not sizes or sum(sizes) == 0:
            raise EnergyInputError("`data` contains no samples; pass at least one non-empty batch.")
        self.batch_sizes = tuple(sizes)
        self.num_data = sum(sizes)
        self.cache = cache
        self._cache: list[dict[str, Any]] | None = None

    # -- plumbing ------------------------------------------------------------------------------------------------
    @property
    def param_names(self) -> tuple[str, ...]:
        return self.space.names

    def _weights(self) -> list[float]:
        if self.reduction == "sum":
            return [1.0] * len(self.batch_sizes)
        return [n / self.num_data for n in self.batch_sizes]

    def _free_and_fixed(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        named = dict(self.model.named_parameters())
        free = {n: named[n].detach() for n in self.space.names}  # in block order (vmap / jvp pytree structure)
        fixed = {n: p.detach() for n, p in named.items() if n not in self.space.names}
        fixed.update({n: b for n, b in self.model.named_buffers()})
        return free, fixed

    def _batches(self) -> Iterator[tuple[Any, Any, float]]:
        for (X, y), w in zip(self.data, self._weights()):
            yield X, y, w

    def _functions(self, X: Any, y: Any, fixed: dict[str, Tensor]):
        def f(p: dict[str, Tensor]) -> Tensor:
            o = functional_call(self.model, (p, fixed), (X,))
            if not isinstance(o, Tensor):
                raise EnergyInputError(f"`model` must return one tensor of outputs, got {type(o).__name__}.")
            return o

        def ell(o: Tensor) -> Tensor:
            return self.loss_fn(o, y)

        return f, ell

    def clear_cache(self) -> None:
        """Drop the cached per-batch linearisations (after changing parameters or data)."""
        self._cache = None

    # -- the per-batch kernels -------------------------------------------------------------------------------------
    def _state(self, X: Any, y: Any, free: dict, fixed: dict, state: dict[str, Any], kinds: frozenset[str]) -> None:
        """Fill ``state`` (one batch) with what ``kinds`` need; entries already present are reused.

        * ``"hvp_fn"`` (``H`` alone): the ``vjp`` function of ``θ ↦ ∇_θ ℓ_b`` -- the batch linearised once;
          ``vjp`` of a gradient is ``Hᵀ v = H v`` (reverse-over-reverse).
        * ``"o", "vjp_fn", "g_o"`` (``G`` or ``F`` involved): outputs, the kept primal ``vjp`` and ``∇_o ℓ_b``;
          ``"lin"`` (with ``cache=True``): the ``linearize``-d map ``θ ↦ (Jᵀ g_o, f(θ))``.
        """
        f, ell = self._functions(X, y, fixed)
        state.setdefault("f", f)
        state.setdefault("ell", ell)
        f, ell = state["f"], state["ell"]
        if kinds == {"H"}:
            if "hvp_fn" not in state:
                state["hvp_fn"] = vjp(grad(lambda p: ell(f(p))), free)[1]
            return
        if "vjp_fn" not in state:
            state["o"], state["vjp_fn"] = vjp(f, free)
            state["g_o"] = grad(ell)(state["o"])
        if self.cache and "lin" not in state and kinds != {"G"}:
            state["lin"] = _linearize(self._functional_and_output(f, state["g_o"]), free)

    @staticmethod
    def _functional_and_output(f: Callable, g_o: Tensor) -> Callable:
        """θ ↦ (Jᵀ g_o, f(θ)) with g_o held fixed; its tangent along v is (H_f v, J v)."""

        def h(p: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
            o, back = vjp(f, p)
            return back(g_o)[0], o

        return h

    def _output_hessian(self, ell: Callable, o: Tensor, U: Tensor) -> Tensor:
        """``∇²_o ℓ · U`` for ``U`` of shape ``(k, *o.shape)`` (output space, cheap).

        Reverse-over-reverse (``vjp`` of ``∇_o ℓ``, valid as the Hessian is symmetric): unlike forward-over-reverse
        it works for every torch loss (``jvp`` of ``grad`` of ``F.mse_loss`` fails in torch 2.x on ZeroTensors).
        """
        _, back = vjp(grad(ell), o)
        return vmap(back)(U)[0]

    def _batch_products(self, state: dict[str, Any], free: dict, Vd: dict, kinds: frozenset[str]) -> dict:
        """One batch: ``{kind: {name: (k, *shape)}}``. The loss is only differentiated in reverse mode, the
        network in forward-over-reverse (``H_f``, ``J``) and reverse mode (``Jᵀ``, ``H`` alone)."""
        if kinds == {"H"}:
            return {"H": vmap(state["hvp_fn"])(Vd)[0]}
        f, ell, o = state["f"], state["ell"], state["o"]
        out: dict[str, dict[str, Tensor]] = {}
        if kinds == {"G"}:
            JV = vmap(lambda v: jvp(f, (free,), (v,))[1])(Vd)
        else:
            if "lin" in state:
                FV, JV = vmap(state["lin"])(Vd)
            else:
                h = self._functional_and_output(f, state["g_o"])
                FV, JV = vmap(lambda v: jvp(h, (free,), (v,))[1])(Vd)
            out["F"] = FV
            if kinds == {"F"}:
                return out
        GV = vmap(state["vjp_fn"])(self._output_hessian(ell, o, JV))[0]
        out["G"] = GV
        if "H" in kinds:
            out["H"] = {n: GV[n] + out["F"][n] for n in GV}
        return out

    def _products(self, V: Tensor, kinds: frozenset[str]) -> dict[str, Tensor]:
        free, fixed = self._free_and_fixed()
        Vd = self.space.split(V)
        total: dict[str, Tensor] = {}
        if self.cache and self._cache is None:
            self._cache = [{} for _ in self.batch_sizes]
        for i, (X, y, w) in enumerate(self._batches()):
            state = self._cache[i] if self._cache is not None else {}
            self._state(X, y, free, fixed, state, kinds)
            with torch.no_grad():
                for kind, blocks in self._batch_products(state, free, Vd, kinds).items():
                    if kind not in kinds:
                        continue
                    flat = self.space.join(blocks)
                    total[kind] = total[kind].add_(flat, alpha=w) if kind in total else flat.mul_(w)
        return total

    # -- public ----------------------------------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        return self._products(V, frozenset(self.kind))[self.kind]

    def products(self, V: Tensor, kinds: Sequence[Kind] = ("H", "G", "F")) -> dict[str, Tensor]:
        """Several curvature products of the same vectors in one traversal, sharing work (see module doc).

        Args:
            V: ``(dim,)`` or ``(dim, k)``.
            kinds: any of ``"H"`` (Hessian), ``"G"`` (GGN), ``"F"`` (``H − G``).

        Returns:
            ``{kind: A @ V}`` with the shape of ``V``.
        """
        bad = [k for k in kinds if k not in _KIND_NAMES]
        if bad or not kinds:
            raise EnergyInputError(f"`kinds` must be a non-empty subset of {list(_KIND_NAMES)}, got {list(kinds)}.")
        V, is_vec = self._check_input(V, "V", self.shape[1])
        ks = frozenset(kinds)
        step = V.shape[1] if self.max_vectors is None else self.max_vectors
        parts = [self._products(V[:, i : i + step], ks) for i in range(0, V.shape[1], step)]
        out = {k: torch.cat([p[k] for p in parts], dim=1) for k in ks}
        return {k: (t[:, 0] if is_vec else t) for k, t in out.items()}

    def hessian_and_ggn(self, V: Tensor) -> tuple[Tensor, Tensor]:
        """``(H V, G V)`` computed together (``H − G`` is then ``HV − GV``)."""
        out = self.products(V, ("H", "G"))
        return out["H"], out["G"]

    def gradient(self) -> Tensor:
        r"""The flat gradient :math:`\nabla_\theta \mathcal L` with the same weighting as the operator."""
        free, fixed = self._free_and_fixed()
        total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for X, y, w in self._batches():
            f, ell = self._functions(X, y, fixed)
            g = grad(lambda p, f=f, ell=ell: ell(f(p)))(free)
            total.add_(self.space.flatten(g), alpha=w)
        return total

    def loss(self) -> Tensor:
        r"""The objective :math:`\mathcal L(\theta) = \sum_b w_b \ell_b(\theta)` (module docstring)."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for X, y, w in self._batches():
                total += w * self.loss_fn(self.model(X), y)
        return total

    def block(self, rows: Sequence[str] | str, cols: Sequence[str] | str | None = None) -> LinearOperator:
        """The sub-matrix with rows of blocks ``rows`` and columns of blocks ``cols`` (default: ``rows``).

        A diagonal block ``A[rows, rows]`` is the same curvature matrix with only ``rows`` free (all other
        parameters fixed), so it is returned as a new operator of the same kind over those names (cheaper
        products). Off-diagonal blocks are products of this operator with zero-padded vectors.
        """
        rows = [rows] if isinstance(rows, str) else list(rows)
        cols = rows if cols is None else ([cols] if isinstance(cols, str) else list(cols))
        for n in rows + cols:
            self.space.slice(n)  # validates the name
        if rows == cols:
            return type(self)(
                self.model,
                self.loss_fn,
                rows,
                self.data,
                reduction=self.reduction,
                batch_size_fn=self.batch_size_fn,
                max_vectors=self.max_vectors,
                cache=self.cache,
            )
        return _SubmatrixOperator(self, [self.space.slice(n) for n in rows], [self.space.slice(n) for n in cols])


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla^2_\theta \mathcal L` over named parameter blocks (module docstring).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 2).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))]
        >>> H = HessianOperator(model, nn.MSELoss(), ["weight"], data)
        >>> H.shape
        (6, 6)
    """

    kind: Kind = "H"


class GGNOperator(CurvatureOperator):
    r"""The generalised Gauss–Newton matrix :math:`G = \sum_b w_b J_b^\top \nabla^2_o \ell_b J_b`.

    For the square loss at an attention layer's output this is the outer-product part ``H_o`` (MATH §3.1); for
    cross-entropy :math:`\nabla^2_o \ell` is ``diag(p) − p pᵀ`` per scored position (computed by autograd, so any
    loss works; ``G`` is PSD whenever the loss is convex in ``o``).
    """

    kind: Kind = "G"


class FunctionalOperator(CurvatureOperator):
    r"""The functional part :math:`H_f = H - G = \sum_b w_b \sum_k (\nabla_o\ell_b)_k \nabla^2_\theta o_{b,k}`.

    Indefinite in general and proportional to the residual (MATH §3.1, §3.5); zero for a model linear in ``θ``.
    """

    kind: Kind = "F"


class _SubmatrixOperator(LinearOperator):
    def __init__(self, parent: CurvatureOperator, rows: list[slice], cols: list[slice]) -> None:
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


# --------------------------------------------------------------------------------------------------------------
# Jacobians
# --------------------------------------------------------------------------------------------------------------


class JacobianOperator(LinearOperator):
    r"""The Jacobian :math:`J = \partial\, \mathrm{vec}_r(o) / \partial \theta` of the model outputs (batches stacked).

    Rows: the flattened outputs of batch 1, then batch 2, ... (``Σ_b o_b.numel()`` rows); columns: the flat
    parameter vector of ``params``. No loss and no weights are involved. ``.T`` is the transposed Jacobian
    (:class:`TransposedJacobianOperator`, products by ``vjp``).

    Args:
        model, params, data, max_vectors: as for :class:`CurvatureOperator` (targets in ``data`` are ignored).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[str] | str | None,
        data: Iterable,
        *,
        max_vectors: int | None = None,
    ) -> None:
        self.space = ParameterSpace(model, params)
        _check_deterministic_model(model)
        self.model = model
        self.data = _check_data(data)
        sizes = []
        with torch.no_grad():
            for X in self._inputs_iter():
                o = model(X)
                if not isinstance(o, Tensor):
                    raise EnergyInputError(f"`model` must return one tensor of outputs, got {type(o).__name__}.")
                sizes.append((tuple(o.shape), o.numel()))
        if not sizes:
            raise EnergyInputError("`data` contains no batches.")
        self.output_shapes = tuple(s for s, _ in sizes)
        self._out_sizes = tuple(n for _, n in sizes)
        super().__init__((sum(self._out_sizes), self.space.dim), self.space.dtype, self.space.device,
                         max_vectors=max_vectors)

    def _inputs_iter(self) -> Iterator[Any]:
        for batch in self.data:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch

    def _fixed(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        named = dict(self.model.named_parameters())
        free = {n: named[n].detach() for n in self.space.names}  # in block order (vmap / jvp pytree structure)
        fixed = {n: p.detach() for n, p in named.items() if n not in self.space.names}
        fixed.update(dict(self.model.named_buffers()))
        return free, fixed

    def _matmat(self, V: Tensor) -> Tensor:
        free, fixed = self._fixed()
        Vd = self.space.split(V)
        rows = []
        with torch.no_grad():
            for X in self._inputs_iter():
                f = lambda p, X=X: functional_call(self.model, (p, fixed), (X,))
                JV = vmap(lambda v, f=f: jvp(f, (free,), (v,))[1])(Vd)
                rows.append(JV.reshape(JV.shape[0], -1).T)
        return torch.cat(rows, dim=0)

    def _rmatmat(self, U: Tensor) -> Tensor:
        free, fixed = self._fixed()
        total = None
        i = 0
        with torch.no_grad():
            for X, shp, n in zip(self._inputs_iter(), self.output_shapes, self._out_sizes):
                f = lambda p, X=X: functional_call(self.model, (p, fixed), (X,))
                _, vjp_fn = vjp(f, free)
                Ub = U[i : i + n].T.reshape(U.shape[1], *shp)
                i += n
                flat = self.space.join(vmap(vjp_fn)(Ub)[0])
                total = flat if total is None else total.add_(flat)
        return total

    @property
    def T(self) -> TransposedJacobianOperator:  # noqa: N802
        return TransposedJacobianOperator(self)


class TransposedJacobianOperator(_TransposedOperator):
    """``Jᵀ``: output space -> parameter space, by vector-Jacobian products (one kept primal pass per batch)."""

    def __init__(self, J: JacobianOperator) -> None:
        super().__init__(J)


# --------------------------------------------------------------------------------------------------------------
# Hessian with respect to an input / token-state tensor
# --------------------------------------------------------------------------------------------------------------


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
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        Y: Tensor,
        *,
        max_vectors: int | None = None,
        linearize_once: bool = False,
    ) -> None:
        Y = check_tensor(Y, "Y")
        if not callable(fn):
            raise EnergyInputError(f"`fn` must be callable Y -> scalar, got {type(fn).__name__}.")
        with torch.no_grad():
            value = fn(Y.detach())
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise EnergyInputError(
                f"`fn(Y)` must return a scalar tensor, got {getattr(value, 'shape', type(value).__name__)}; "
                "sum over batch elements (e.g. `lambda Y: energy(Y).sum()`)."
            )
        n = Y.numel()
        super().__init__((n, n), Y.dtype, Y.device, symmetric=True, max_vectors=max_vectors)
        self.fn, self.Y = fn, Y.detach()
        self._g = grad(lambda Z: fn(Z).reshape(()))
        self._lin = _linearize(self._g, self.Y) if linearize_once else None

    @classmethod
    def from_model(
        cls, model: Callable[[Tensor], Tensor], loss_fn: Callable[[Tensor, Any], Tensor], X: Tensor, y: Any, **kw: Any
    ) -> TokenHessianOperator:
        r""":math:`\nabla^2_X \ell(\mathrm{model}(X), y)`: the loss Hessian with respect to the input states ``X``."""
        return cls(lambda Z: loss_fn(model(Z), y), X, **kw)

    def _matmat(self, V: Tensor) -> Tensor:
        Vt = V.T.reshape(V.shape[1], *self.Y.shape)
        with torch.no_grad():
            if self._lin is not None:
                HV = vmap(self._lin)(Vt)
            else:
                HV = vmap(lambda v: jvp(self._g, (self.Y,), (v,))[1])(Vt)
        return HV.reshape(V.shape[1], -1).T


# --------------------------------------------------------------------------------------------------------------
# Dense autograd twins (verification)
# --------------------------------------------------------------------------------------------------------------


def _flat_functional(model: nn.Module, space: ParameterSpace):
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in space.names}
    fixed.update(dict(model.named_buffers()))
    named = dict(model.named_parameters())
    theta = space.flatten([named[n].detach() for n in space.names])

    def out(flat: Tensor, X: Any) -> Tensor:
        return functional_call(model, (space.unflatten(flat), fixed), (X,))

    return theta, out


def dense_hessian_reference(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor],
    params: Sequence[str] | str | None,
    data: Iterable,
    *,
    reduction: Reduction | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> Tensor:
    r"""Dense :math:`\nabla^2_\theta \mathcal L` by ``torch.func.hessian`` of the flattened objective (autograd twin).

    Straightforward and slow; for tests on small models. Warns if not float64.
    """
    op = HessianOperator(model, loss_fn, params, data, reduction=reduction, batch_size_fn=batch_size_fn)
    warn_if_not_float64(op.dtype, "dense_hessian_reference")
    theta, out = _flat_functional(model, op.space)

    def total(flat: Tensor) -> Tensor:
        return sum(w * loss_fn(out(flat, X), y) for X, y, w in op._batches())

    return torch.func.hessian(total)(theta)


def dense_ggn_reference(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor],
    params: Sequence[str] | str | None,
    data: Iterable,
    *,
    reduction: Reduction | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> Tensor:
    r"""Dense :math:`G = \sum_b w_b J_b^\top \nabla^2_o\ell_b J_b` from full Jacobians (``jacrev``) and the dense
    output-space loss Hessian (``torch.func.hessian``). Autograd twin for tests; warns if not float64."""
    op = GGNOperator(model, loss_fn, params, data, reduction=reduction, batch_size_fn=batch_size_fn)
    warn_if_not_float64(op.dtype, "dense_ggn_reference")
    theta, out = _flat_functional(model, op.space)
    G = torch.zeros(op.shape, dtype=op.dtype, device=op.device)
    for X, y, w in op._batches():
        o = out(theta, X)
        J = torch.func.jacrev(out)(theta, X).reshape(o.numel(), -1)
        H_o = torch.func.hessian(lambda z, y=y, shape=o.shape: loss_fn(z.reshape(shape), y))(o.reshape(-1))
        G += w * J.T @ H_o @ J
    return G
