r"""Parameter-space curvature operators for any ``nn.Module`` + loss + data: ``H``, ``H_o`` (GGN), ``H_f``
(``H − H_o``) and the output Jacobian ``J``, with their dense autograd twins (MATH §3.1, §3.7).

The objective, the weights ``w_b`` and how the products share work are described in
:mod:`energy.hessian.operators`. Everything about the data and the model is validated once at construction
(:mod:`energy.hessian.parameter_space`); a product is then a pure ``torch.func`` computation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, linearize, vjp, vmap

from energy._validation import EnergyInputError, warn_if_not_float64
from energy.hessian.distributed import ShardGroup, check_same_model, resolve_shards
from energy.hessian.linear_operator import LinearOperator, _SubmatrixOperator, _TransposedOperator
from energy.hessian.parameter_space import (
    ParameterSpace,
    Reduction,
    _check_data,
    _check_deterministic_model,
    _resolve_reduction,
    check_batches,
    check_first_batch,
    free_and_fixed,
)

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "FunctionalOperator",
    "JacobianOperator",
    "TransposedJacobianOperator",
    "Part",
    "dense_hessian_reference",
    "dense_ggn_reference",
]

#: The curvature parts: the Hessian ``H``, its outer-product (Gauss–Newton) part ``H_o`` and functional part ``H_f``.
Part = Literal["H", "H_o", "H_f"]
_PART_NAMES = {"H": "Hessian", "H_o": "GGN (outer-product part)", "H_f": "functional part H - GGN"}
#: Spellings of the previous release (``G`` = GGN, ``F`` = functional part), accepted with a DeprecationWarning.
_DEPRECATED_PARTS = {"G": "H_o", "F": "H_f"}


def resolve_parts(parts: Sequence[str]) -> dict[str, str]:
    """Check the requested curvature parts: ``{as requested: canonical}``, with the deprecated ``"G"`` / ``"F"``
    mapped to ``"H_o"`` / ``"H_f"`` (DeprecationWarning).
    """
    if isinstance(parts, str) or not parts:
        raise EnergyInputError(f"`parts` must be a non-empty sequence of {list(_PART_NAMES)}, got {parts!r}.")
    out = {}
    for asked in parts:
        p = asked
        if p in _DEPRECATED_PARTS:
            warnings.warn(
                f"curvature part {p!r} is deprecated; use {_DEPRECATED_PARTS[p]!r} (parts are 'H', 'H_o', 'H_f' "
                "everywhere in energy.hessian). The old spelling will be removed in the next release.",
                DeprecationWarning,
                stacklevel=3,
            )
            p = _DEPRECATED_PARTS[p]
        if p not in _PART_NAMES:
            raise EnergyInputError(f"`parts` must be a non-empty subset of {list(_PART_NAMES)}, got {list(parts)}.")
        out[asked] = p
    return out


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
            ``vjp`` function, the output gradient and a ``torch.func.linearize``-d tangent map for ``H_o`` /
            ``H_f``)
            and reuse it for every later product. Pays off for many sequential products (Lanczos) on few
            batches; memory = activations of every batch. The cache is built for the current parameter values;
            call :meth:`clear_cache` after changing the model.
        distributed: ``True`` (the default process group) or a :class:`~energy.hessian.distributed.ShardGroup`:
            ``data`` is this rank's shard, the weights ``w_b`` use the count over all ranks and every product,
            gradient and loss is summed over the ranks (MATH §6.1; :mod:`energy.hessian.distributed`). Every rank
            must construct the operator (same model, weights and settings) and call the same products.
    """

    part: Part = "H"

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
        distributed: bool | ShardGroup = False,
    ) -> None:
        self.shards = resolve_shards(distributed)
        if self.shards is None:
            self._setup(model, loss_fn, params, data, reduction, batch_size_fn)
        else:
            shards = self.shards
            shards.run(lambda: self._setup(model, loss_fn, params, data, reduction, batch_size_fn),
                       "checking each rank's model and data shard")
            shards.check_same((self.space.names, tuple(map(tuple, self.space.shapes)), str(self.space.dtype),
                               self.reduction, self.part, max_vectors),
                              "the parameter blocks, dtype, reduction, part and max_vectors (the column chunks: one "
                              "all-reduce each)")
            check_same_model(shards, model)
        self.local_num_data = sum(self.batch_sizes)
        self.num_data = self.local_num_data if self.shards is None else int(self.shards.total(
            self.local_num_data, "the number of samples"))
        if self.num_data == 0:
            raise EnergyInputError("`data` contains no samples; pass at least one non-empty batch"
                                   + ("." if self.shards is None else " on some rank."))
        super().__init__(
            (self.space.dim, self.space.dim),
            self.space.dtype,
            self.space.device,
            symmetric=True,
            max_vectors=max_vectors,
        )
        self.cache = cache
        self._cache: list[dict[str, Any]] | None = None

    def _setup(self, model: nn.Module, loss_fn: Callable[[Tensor, Any], Tensor], params: Sequence[str] | str | None,
               data: Iterable, reduction: Reduction | None, batch_size_fn: Callable[[Any], int] | None) -> None:
        """This rank's checks of the model, loss and data (a data shard may be empty when distributed)."""
        if not callable(loss_fn):
            raise EnergyInputError(f"`loss_fn` must be callable (o, y) -> scalar, got {type(loss_fn).__name__}.")
        self.space = ParameterSpace(model, params)
        _check_deterministic_model(model)
        self.model = model
        self.loss_fn = loss_fn
        self.reduction: Reduction = _resolve_reduction(loss_fn, reduction)
        self.data = _check_data(data)
        self.batch_size_fn = batch_size_fn or (lambda X: int(X.shape[0]))
        sizes = check_batches(self.data, self.batch_size_fn)
        if self.shards is None and (not sizes or sum(sizes) == 0):
            raise EnergyInputError("`data` contains no samples; pass at least one non-empty batch.")
        check_first_batch(model, loss_fn, self.data, self.space.dtype)
        self.batch_sizes = sizes

    # -- plumbing ------------------------------------------------------------------------------------------------
    @property
    def param_names(self) -> tuple[str, ...]:
        return self.space.names

    def _weights(self) -> list[float]:
        if self.reduction == "sum":
            return [1.0] * len(self.batch_sizes)
        return [n / self.num_data for n in self.batch_sizes]

    @property
    def kind(self) -> str:
        """Deprecated spelling of :attr:`part` (``"G"`` / ``"F"`` for ``"H_o"`` / ``"H_f"``)."""
        warnings.warn("`CurvatureOperator.kind` is deprecated; use `.part` ('H', 'H_o', 'H_f').",
                      DeprecationWarning, stacklevel=2)
        return {"H_o": "G", "H_f": "F"}.get(self.part, self.part)

    def _free_and_fixed(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return free_and_fixed(self.model, self.space)

    def _batches(self) -> Iterator[tuple[Any, Any, float]]:
        for (X, y), w in zip(self.data, self._weights()):
            yield X, y, w

    def _functions(
        self, X: Any, y: Any, fixed: dict[str, Tensor]
    ) -> tuple[Callable[[dict[str, Tensor]], Tensor], Callable[[Tensor], Tensor]]:
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
        """Fill ``state`` (one batch) with what the parts ``kinds`` need; entries already present are reused.

        * ``"hvp_fn"`` (``H`` alone): the ``vjp`` function of ``θ ↦ ∇_θ ℓ_b`` -- the batch linearised once;
          ``vjp`` of a gradient is ``Hᵀ v = H v`` (reverse-over-reverse).
        * ``"o", "vjp_fn", "g_o"`` (``H_o`` or ``H_f`` involved): outputs, the kept primal ``vjp`` and ``∇_o ℓ_b``;
          ``"lin"`` (with ``cache=True``): the ``linearize``-d map ``θ ↦ (Jᵀ g_o, f(θ))``.
        """
        f, ell = self._functions(X, y, fixed)
        state.setdefault("f", f)
        state.setdefault("ell", ell)
        f, ell = state["f"], state["ell"]
        if kinds == {"H"}:
            if "hvp_fn" not in state:

                def batch_loss(p: dict[str, Tensor]) -> Tensor:
                    return ell(f(p))

                state["hvp_fn"] = vjp(grad(batch_loss), free)[1]
            return
        if "vjp_fn" not in state:
            state["o"], state["vjp_fn"] = vjp(f, free)[:2]
            state["g_o"] = grad(ell)(state["o"])
        if self.cache and "lin" not in state and kinds != {"H_o"}:
            state["lin"] = linearize(self._functional_and_output(f, state["g_o"]), free)[1]

    @staticmethod
    def _functional_and_output(f: Callable, g_o: Tensor) -> Callable:
        """θ ↦ (Jᵀ g_o, f(θ)) with g_o held fixed; its tangent along v is (H_f v, J v)."""

        def h(p: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
            o, back = vjp(f, p)[:2]
            return back(g_o)[0], o

        return h

    def _output_hessian(self, ell: Callable, o: Tensor, U: Tensor) -> Tensor:
        """``∇²_o ℓ · U`` for ``U`` of shape ``(k, *o.shape)`` (output space, cheap).

        Reverse-over-reverse (``vjp`` of ``∇_o ℓ``, valid as the Hessian is symmetric): unlike forward-over-reverse
        it works for every torch loss (``jvp`` of ``grad`` of ``F.mse_loss`` fails in torch 2.x on ZeroTensors).
        """
        back = vjp(grad(ell), o)[1]
        return vmap(back)(U)[0]

    def _batch_products(self, state: dict[str, Any], free: dict, Vd: dict, kinds: frozenset[str]) -> dict:
        """One batch: ``{kind: {name: (k, *shape)}}``. The loss is only differentiated in reverse mode, the
        network in forward-over-reverse (``H_f``, ``J``) and reverse mode (``Jᵀ``, ``H`` alone).
        """
        if kinds == {"H"}:
            if next(iter(Vd.values())).shape[0] == 1:  # one column: the vjp itself (vmap costs ~15% on GPT-2)
                return {"H": {n: t.unsqueeze(0) for n, t in state["hvp_fn"]({n: v[0] for n, v in Vd.items()})[0]
                              .items()}}
            return {"H": vmap(state["hvp_fn"])(Vd)[0]}
        f, ell, o = state["f"], state["ell"], state["o"]
        out: dict[str, dict[str, Tensor]] = {}
        if kinds == {"H_o"}:
            JV = vmap(lambda v: jvp(f, (free,), (v,))[1])(Vd)
        else:
            if "lin" in state:
                FV, JV = vmap(state["lin"])(Vd)
            else:
                h = self._functional_and_output(f, state["g_o"])
                FV, JV = vmap(lambda v: jvp(h, (free,), (v,))[1])(Vd)
            out["H_f"] = FV
            if kinds == {"H_f"}:
                return out
        GV = vmap(state["vjp_fn"])(self._output_hessian(ell, o, JV))[0]
        out["H_o"] = GV
        if "H" in kinds:
            out["H"] = {n: GV[n] + out["H_f"][n] for n in GV}
        return out

    def _local_products(self, V: Tensor, kinds: frozenset[str]) -> dict[str, Tensor]:
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
        return {k: total[k] if k in total else torch.zeros_like(V) for k in kinds}

    def _products(self, V: Tensor, kinds: frozenset[str]) -> dict[str, Tensor]:
        """``{part: Σ_b w_b A_b V}``, summed over the ranks when distributed (one all-reduce for all parts)."""
        if self.shards is None:
            return self._local_products(V, kinds)
        order = sorted(kinds)

        def local() -> Tensor:
            out = self._local_products(V, kinds)
            return torch.cat([out[k] for k in order])

        flat = self.shards.sum(local, (len(order) * V.shape[0], V.shape[1]), V, f"the {'/'.join(order)} products",
                               probe=V)
        return dict(zip(order, flat.split(V.shape[0])))

    # -- public ----------------------------------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        return self._products(V, frozenset((self.part,)))[self.part]

    def products(
        self, V: Tensor, parts: Sequence[str] = ("H", "H_o", "H_f"), *, kinds: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Several curvature products of the same vectors in one traversal, sharing work (see module doc).

        Args:
            V: ``(dim,)`` or ``(dim, k)``.
            parts: any of ``"H"`` (Hessian), ``"H_o"`` (GGN), ``"H_f"`` (``H − H_o``); the previous spellings
                ``"G"`` / ``"F"`` still work for one release (DeprecationWarning).
            kinds: deprecated name of ``parts`` (DeprecationWarning).

        Returns:
            ``{part: A @ V}`` with the shape of ``V``.
        """
        if kinds is not None:
            warnings.warn("`products(kinds=...)` is deprecated; use `parts=`.", DeprecationWarning, stacklevel=2)
            parts = kinds
        asked = resolve_parts(parts)
        ks = frozenset(asked.values())
        V, is_vec = self._check_input(V, "V", self.shape[1])
        step = V.shape[1] if self.max_vectors is None else self.max_vectors
        chunks = [self._products(V[:, i : i + step], ks) for i in range(0, V.shape[1], step)]
        out = {k: torch.cat([p[k] for p in chunks], dim=1) for k in ks}
        return {a: (out[k][:, 0] if is_vec else out[k]) for a, k in asked.items()}

    def hessian_and_ggn(self, V: Tensor) -> tuple[Tensor, Tensor]:
        """``(H V, H_o V)`` computed together (``H_f V`` is then ``HV − H_o V``)."""
        out = self.products(V, ("H", "H_o"))
        return out["H"], out["H_o"]

    def _reduce(self, compute: Callable[[], Tensor], like: Tensor, what: str) -> Tensor:
        return compute() if self.shards is None else self.shards.sum(compute, like.shape, like, what)

    def gradient(self) -> Tensor:
        r"""The flat gradient :math:`\nabla_\theta \mathcal L` with the same weighting as the operator."""
        free, fixed = self._free_and_fixed()
        total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)

        def local() -> Tensor:
            for X, y, w in self._batches():
                f, ell = self._functions(X, y, fixed)
                g = grad(lambda p, f=f, ell=ell: ell(f(p)))(free)
                total.add_(self.space.flatten(g), alpha=w)
            return total

        return self._reduce(local, total, "the gradient")

    def loss(self) -> Tensor:
        r"""The objective :math:`\mathcal L(\theta) = \sum_b w_b \ell_b(\theta)` (module docstring)."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)

        def local() -> Tensor:
            with torch.no_grad():
                for X, y, w in self._batches():
                    total.add_(w * self.loss_fn(self.model(X), y))
            return total

        return self._reduce(local, total, "the loss")

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
                distributed=self.shards or False,
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

    part: Part = "H"


class GGNOperator(CurvatureOperator):
    r"""The generalised Gauss–Newton matrix :math:`G = \sum_b w_b J_b^\top \nabla^2_o \ell_b J_b`.

    For the square loss at an attention layer's output this is the outer-product part ``H_o`` (MATH §3.1); for
    cross-entropy :math:`\nabla^2_o \ell` is ``diag(p) − p pᵀ`` per scored position (computed by autograd, so any
    loss works; ``G`` is PSD whenever the loss is convex in ``o``).
    """

    part: Part = "H_o"


class FunctionalOperator(CurvatureOperator):
    r"""The functional part :math:`H_f = H - G = \sum_b w_b \sum_k (\nabla_o\ell_b)_k \nabla^2_\theta o_{b,k}`.

    Indefinite in general and proportional to the residual (MATH §3.1, §3.5); zero for a model linear in ``θ``.
    """

    part: Part = "H_f"




class JacobianOperator(LinearOperator):
    r"""The Jacobian :math:`J = \partial\, \mathrm{vec}_r(o) / \partial \theta` of the model outputs (batches stacked).

    Rows: the flattened outputs of batch 1, then batch 2, ... (``Σ_b o_b.numel()`` rows); columns: the flat
    parameter vector of ``params``. No loss and no weights are involved. ``.T`` is the transposed Jacobian
    (:class:`TransposedJacobianOperator`, products by ``vjp``).

    Args:
        model, params, data, max_vectors: as for :class:`CurvatureOperator` (targets in ``data`` are ignored).
        distributed: as for :class:`CurvatureOperator`: the rows are then this rank's outputs (the output space is
            sharded with the data), ``J V`` is local and ``Jᵀ U`` is summed over the ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[str] | str | None,
        data: Iterable,
        *,
        max_vectors: int | None = None,
        distributed: bool | ShardGroup = False,
    ) -> None:
        self.shards = resolve_shards(distributed)
        if self.shards is None:
            self._setup(model, params, data)
        else:
            self.shards.run(lambda: self._setup(model, params, data), "checking each rank's model and data shard")
            self.shards.check_same((self.space.names, tuple(map(tuple, self.space.shapes)), str(self.space.dtype)),
                                   "the parameter blocks and dtype")
            check_same_model(self.shards, model)
        super().__init__((sum(self._out_sizes), self.space.dim), self.space.dtype, self.space.device,
                         max_vectors=max_vectors)

    def _setup(self, model: nn.Module, params: Sequence[str] | str | None, data: Iterable) -> None:
        self.space = ParameterSpace(model, params)
        _check_deterministic_model(model)
        self.model = model
        self.data = _check_data(data)
        check_batches(self.data, lambda X: 0, pairs=False)
        check_first_batch(model, None, self.data, self.space.dtype)
        sizes = []
        with torch.no_grad():
            for X in self._inputs_iter():
                o = model(X)
                if not isinstance(o, Tensor):
                    raise EnergyInputError(f"`model` must return one tensor of outputs, got {type(o).__name__}.")
                sizes.append((tuple(o.shape), o.numel()))
        if not sizes and self.shards is None:
            raise EnergyInputError("`data` contains no batches.")
        self.output_shapes = tuple(s for s, _ in sizes)
        self._out_sizes = tuple(n for _, n in sizes)

    def _inputs_iter(self) -> Iterator[Any]:
        for batch in self.data:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch

    def _fixed(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return free_and_fixed(self.model, self.space)

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
        total = torch.zeros(self.shape[1], U.shape[1], dtype=self.dtype, device=self.device)

        def local() -> Tensor:
            i = 0
            with torch.no_grad():
                for X, shp, n in zip(self._inputs_iter(), self.output_shapes, self._out_sizes):
                    f = lambda p, X=X: functional_call(self.model, (p, fixed), (X,))
                    vjp_fn = vjp(f, free)[1]
                    Ub = U[i : i + n].T.reshape(U.shape[1], *shp)
                    i += n
                    total.add_(self.space.join(vmap(vjp_fn)(Ub)[0]))
            return total

        return local() if self.shards is None else self.shards.sum(local, total.shape, total, "the Jᵀ products")

    @property
    def T(self) -> TransposedJacobianOperator:  # noqa: N802
        return TransposedJacobianOperator(self)


class TransposedJacobianOperator(_TransposedOperator):
    """``Jᵀ``: output space -> parameter space, by vector-Jacobian products (one kept primal pass per batch)."""

    def __init__(self, J: JacobianOperator) -> None:
        super().__init__(J)




def _flat_functional(model: nn.Module, space: ParameterSpace) -> tuple[Tensor, Callable[[Tensor, Any], Tensor]]:
    free, fixed = free_and_fixed(model, space)
    theta = space.flatten(free)

    def out(flat: Tensor, X: Any) -> Tensor:
        return functional_call(model, (space.unflatten(flat), fixed), (X,))

    return theta, out


def _reference_setup(
    cls: type[CurvatureOperator], routine: str, model: nn.Module, loss_fn: Callable[[Tensor, Any], Tensor],
    params: Sequence[str] | str | None, data: Iterable, reduction: Reduction | None,
    batch_size_fn: Callable[[Any], int] | None,
) -> tuple[CurvatureOperator, Tensor, Callable[[Tensor, Any], Tensor]]:
    """The operator (for its checks and weights), the flat parameters and the flat forward of a dense twin."""
    op = cls(model, loss_fn, params, data, reduction=reduction, batch_size_fn=batch_size_fn)
    warn_if_not_float64(op.dtype, routine)
    theta, out = _flat_functional(model, op.space)
    return op, theta, out


def dense_hessian_reference(model: nn.Module, loss_fn: Callable[[Tensor, Any], Tensor],
                            params: Sequence[str] | str | None, data: Iterable, *, reduction: Reduction | None = None,
                            batch_size_fn: Callable[[Any], int] | None = None) -> Tensor:
    r"""Dense :math:`\nabla^2_\theta \mathcal L` by ``torch.func.hessian`` of the flattened objective (autograd twin).

    Straightforward and slow; for tests on small models. Warns if not float64.
    """
    op, theta, out = _reference_setup(HessianOperator, "dense_hessian_reference", model, loss_fn, params, data,
                                      reduction, batch_size_fn)

    def total(flat: Tensor) -> Tensor:
        return torch.stack([w * loss_fn(out(flat, X), y) for X, y, w in op._batches()]).sum()

    return torch.func.hessian(total)(theta)


def dense_ggn_reference(model: nn.Module, loss_fn: Callable[[Tensor, Any], Tensor],
                        params: Sequence[str] | str | None, data: Iterable, *, reduction: Reduction | None = None,
                        batch_size_fn: Callable[[Any], int] | None = None) -> Tensor:
    r"""Dense :math:`H_o = \sum_b w_b J_b^\top \nabla^2_o\ell_b J_b` from full Jacobians (``jacrev``) and the dense
    output-space loss Hessian (``torch.func.hessian``). Autograd twin for tests; warns if not float64.
    """
    op, theta, out = _reference_setup(GGNOperator, "dense_ggn_reference", model, loss_fn, params, data,
                                      reduction, batch_size_fn)
    G = torch.zeros(op.shape, dtype=op.dtype, device=op.device)
    for X, y, w in op._batches():
        o = out(theta, X)
        J = torch.func.jacrev(out)(theta, X).reshape(o.numel(), -1)
        H_o = torch.func.hessian(lambda z, y=y, shape=o.shape: loss_fn(z.reshape(shape), y))(o.reshape(-1))
        G += w * J.T @ H_o @ J
    return G
