r"""The exact Hessian of a whole Transformer block, composed from its sublayers' closed forms (MATH §5.3).

A block maps a token matrix ``X`` (``L × d`` per sequence) through multi-head attention (MHA), a feed-forward
sublayer (FFN), residual connections and, optionally, LayerNorm/RMSNorm before (Pre-LN) or after (Post-LN) each
sublayer; an optional unembedding ``W_U`` and a loss (square error or cross-entropy) close it:

.. math::
    \text{Pre-LN:}\quad Z = X + \mathrm{MHA}(\mathrm{LN}_1 X),\quad \mathrm{Out} = Z + \mathrm{FFN}(\mathrm{LN}_2 Z);
    \qquad
    \text{Post-LN:}\quad Z = \mathrm{LN}_1(X + \mathrm{MHA}(X)),\quad \mathrm{Out} = \mathrm{LN}_2(Z + \mathrm{FFN}(Z));

    \ell = \ell_\mathrm{out}(\mathrm{Out}\,W_U).

**Composition (the second-order chain rule).** Let ``θ`` collect every parameter. Each sublayer ``y = f(u; θ_f)``
supplies, in closed form, its Jacobians ``∂y/∂u`` and ``∂y/∂θ_f`` and its second derivatives contracted with the
adjoint ``g_y = ∂ℓ/∂y``: ``∇²_{uu}⟨g_y, y⟩``, ``∇²_{uθ_f}⟨g_y, y⟩``, ``∇²_{θ_fθ_f}⟨g_y, y⟩``. A forward sweep
carries the total Jacobian ``𝒯_v = ∂v/∂θ`` of every intermediate ``v`` (``𝒯_y = ∂_u f\,𝒯_u + ∂_{θ_f} f``), a
backward sweep the adjoints, and

.. math::
    \nabla^2_\theta \ell \;=\; \underbrace{𝒯_\mathrm{z}^\top\, \nabla^2 \ell_\mathrm{out}\, 𝒯_\mathrm{z}}_{H_o}
    \;+\; \underbrace{\sum_{f} \begin{bmatrix}𝒯_u\\ E_f\end{bmatrix}^{\!\top}
    \nabla^2_{(u,\theta_f)}\langle g_y, f\rangle \begin{bmatrix}𝒯_u\\ E_f\end{bmatrix}}_{H_f}

(``z`` the logits, ``E_f`` the selector of ``θ_f``). ``H_o`` is the Gauss–Newton (outer-product) part of the whole
block, ``H_f`` the functional part: the split of Ormaniec et al. applied to the block as one network. The residual
additions are linear and contribute no second-order term. With ``θ`` replaced by the block input ``X_b`` (one
sequence at a time) the same sweep gives the token-space Hessian ``∇²_{X_b} ℓ``.

The pieces, each a closed form with its own autograd twin and tests:

* attention parameters: :func:`energy.hessian.multihead.multihead_jacobian` and
  :func:`~energy.hessian.multihead.multihead_functional_hessian` (the single-head blocks of MATH §3, per head; the
  cross-head blocks are pure outer product, MATH §5.1);
* attention input: :mod:`energy.hessian.attention_input` (MATH §5.3a);
* LayerNorm, RMSNorm, FFN: :mod:`energy.hessian.norm_curvature` and :mod:`energy.hessian.ffn_curvature` (MATH
  §5.2), token-wise, so their Jacobians are ``L`` blocks of ``d × d``;
* unembedding (bilinear in ``Out`` and ``W_U``) and the output loss: here.

Cost: with ``P`` columns (``P = p`` parameters, or ``L d`` tokens) the sweep holds one ``(B L d) × P`` Jacobian per
intermediate and forms each contribution by one GEMM, ``O(B L d P²)`` in all, plus ``O(B L² d² P)`` for the
attention input Jacobian; memory ``O(P² + B L d P)``. Nothing is differentiated by autograd.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from energy._validation import EnergyInputError, check_same_float_dtype, check_tensor, warn_if_not_float64
from energy.hessian.attention_layer import Reduction, check_dense_budget
from energy.hessian.blocks import Part
from energy.hessian.distributed import ShardGroup, resolve_shards, tensor_checksum
from energy.hessian.ffn_curvature import FFNLayer
from energy.hessian.multihead import (
    MultiHeadAttentionLayer,
)
from energy.hessian.norm_curvature import NormLayer

__all__ = [
    "NormPosition",
    "OutputLoss",
    "TransformerBlock",
    "BlockHessian",
    "block_hessian",
    "block_hessian_parts",
    "block_token_hessian",
    "block_loss",
    "autograd_block_hessian",
    "autograd_block_ggn",
    "autograd_block_token_hessian",
    "random_block",
]

NormPosition = Literal["pre", "post", "none"]
OutputLoss = Literal["mse", "ce"]
_POSITIONS = ("pre", "post", "none")
_LOSSES = ("mse", "ce")


# ----------------------------------------------------------------------------------------------------------------
# The block as one value object
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerBlock:
    r"""One Transformer block with its output loss (MATH §5.3), validated once at construction.

    Attributes:
        attention: the multi-head self-attention sublayer (its ``c``/``reduction`` are not used here).
        ffn: the feed-forward sublayer ``φ(u W_1 + b_1) W_2 + b_2`` (``d_out = d``).
        ln1, ln2: the two normalisations (``None`` when ``norm == "none"``).
        norm: ``"pre"`` (GPT-2), ``"post"`` (the original Transformer, BERT) or ``"none"`` (residuals only).
        W_U: optional unembedding ``(d, V)``: logits ``Out W_U``.
        loss: ``"mse"``, ``ℓ = c_eff Σ‖z − Y‖²`` (``c`` default ``1/(L d_z)``), or ``"ce"``, ``ℓ = c_eff Σ_i
            (logsumexp z_i − z_{i,y_i})`` (``c`` default ``1/L``, the per-sequence mean; needs ``W_U``).
        c: loss constant; reduction: ``"sum"`` or ``"mean"`` over sequences (``"mean"`` divides ``c`` by ``B``).
    """

    attention: MultiHeadAttentionLayer
    ffn: FFNLayer
    ln1: NormLayer | None = None
    ln2: NormLayer | None = None
    norm: NormPosition = "pre"
    W_U: Tensor | None = None
    loss: OutputLoss = "mse"
    c: float | None = None
    reduction: Reduction = "sum"

    def __post_init__(self) -> None:
        if not isinstance(self.attention, MultiHeadAttentionLayer):
            raise EnergyInputError("`attention` must be an energy.hessian.multihead.MultiHeadAttentionLayer, got "
                                   f"{type(self.attention).__name__}.")
        if not isinstance(self.ffn, FFNLayer):
            raise EnergyInputError("`ffn` must be an energy.hessian.ffn_curvature.FFNLayer, got "
                                   f"{type(self.ffn).__name__}.")
        if self.norm not in _POSITIONS:
            raise EnergyInputError(f"`norm` must be one of {_POSITIONS}, got {self.norm!r}.")
        if self.loss not in _LOSSES:
            raise EnergyInputError(f"`loss` must be one of {_LOSSES}, got {self.loss!r}.")
        if self.reduction not in ("sum", "mean"):
            raise EnergyInputError(f"`reduction` must be 'sum' or 'mean', got {self.reduction!r}.")
        if self.c is not None and not (math.isfinite(float(self.c)) and float(self.c) > 0):
            raise EnergyInputError(f"`c` must be a positive finite number or None, got {self.c!r}.")
        d = self.d_model
        if self.attention.d_out != d:
            raise EnergyInputError(f"the attention output width must equal d_model = {d} (residual connection), got "
                                   f"`W_O` of output width {self.attention.d_out}.")
        W1, W2 = self.ffn.W_1, self.ffn.W_2
        if W1.shape[0] != d or W2.shape[1] != d:
            raise EnergyInputError(f"`ffn` must map width d_model = {d} to {d} (residual connection): W_1 "
                                   f"{tuple(W1.shape)}, W_2 {tuple(W2.shape)}.")
        for name in ("ln1", "ln2"):
            ln = getattr(self, name)
            if self.norm == "none":
                if ln is not None:
                    raise EnergyInputError(f"`{name}` must be None when norm='none' (no normalisation); pass "
                                           "norm='pre' or 'post' to use it.")
                continue
            if not isinstance(ln, NormLayer):
                raise EnergyInputError(f"`{name}` must be an energy.hessian.norm_curvature.NormLayer when norm="
                                       f"{self.norm!r}, got {type(ln).__name__}.")
            if ln.gamma is not None and ln.gamma.shape != (d,):
                raise EnergyInputError(f"`{name}.gamma` must have shape ({d},), got {tuple(ln.gamma.shape)}.")
        if self.W_U is not None:
            W_U = check_tensor(self.W_U, "W_U", ndim=2)
            if W_U.shape[0] != d:
                raise EnergyInputError(f"`W_U` must have shape (d_model, V) = ({d}, V), got {tuple(W_U.shape)}.")
        elif self.loss == "ce":
            raise EnergyInputError("loss='ce' needs an unembedding `W_U` (d_model, V) to produce logits.")
        check_same_float_dtype(**{name: t for name, t in self._named_params()})

    # -- sizes and parameter bookkeeping ---------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        """The residual width ``d``."""
        return int(self.attention.W_Q.shape[-2])

    @property
    def d_z(self) -> int:
        """Width of the loss input: ``V`` with an unembedding, else ``d``."""
        return self.d_model if self.W_U is None else int(self.W_U.shape[1])

    def _sublayers(self) -> list[tuple[str, MultiHeadAttentionLayer | NormLayer | FFNLayer]]:
        out: list[tuple[str, MultiHeadAttentionLayer | NormLayer | FFNLayer]] = [("attn", self.attention)]
        if self.ln1 is not None:
            out.append(("ln1", self.ln1))
        if self.ln2 is not None:
            out.append(("ln2", self.ln2))
        out.append(("ffn", self.ffn))
        return out

    def param_blocks(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Ordered ``(name, shape)`` of every parameter: ``attn.*``, ``ln1.*``, ``ln2.*``, ``ffn.*``, ``W_U``.

        The flat parameter vector (:meth:`flat`) concatenates their ``vec_r`` in this order.
        """
        out = [(f"{prefix}.{name}", tuple(shape)) for prefix, sub in self._sublayers()
               for name, shape in sub.param_blocks()]
        if self.W_U is not None:
            out.append(("W_U", tuple(self.W_U.shape)))
        return tuple(out)

    def _named_params(self) -> list[tuple[str, Tensor]]:
        out = [("W_Q", self.attention.W_Q), ("W_1", self.ffn.W_1)]
        for name in ("ln1", "ln2"):
            ln = getattr(self, name)
            if ln is not None and ln.gamma is not None:
                out.append((f"{name}.gamma", ln.gamma))
        if self.W_U is not None:
            out.append(("W_U", self.W_U))
        return out

    def slices(self) -> dict[str, slice]:
        """``{name: slice}`` of each parameter in the flat vector."""
        out, start = {}, 0
        for name, shape in self.param_blocks():
            n = math.prod(shape)
            out[name] = slice(start, start + n)
            start += n
        return out

    @property
    def num_params(self) -> int:
        """``p``, the length of the flat parameter vector."""
        return sum(math.prod(s) for _, s in self.param_blocks())

    def flat(self) -> Tensor:
        """The flat parameter vector (``vec_r`` of each parameter, in :meth:`param_blocks` order)."""
        values = {name: t for prefix, sub in self._sublayers() for name, t in _named(prefix, sub).items()}
        if self.W_U is not None:
            values["W_U"] = self.W_U
        return torch.cat([values[name].reshape(-1) for name, _ in self.param_blocks()])

    def with_flat(self, theta: Tensor) -> TransformerBlock:
        """The same block with the parameters of the flat vector ``theta`` (for the autograd twins; the value checks
        of the sublayers skip themselves inside transforms).
        """
        sl = self.slices()
        fields: dict[str, Any] = {"attention": self.attention.with_flat(theta[_span(sl, "attn.")])}
        for name in ("ln1", "ln2", "ffn"):
            sub = getattr(self, name)
            if sub is not None:
                fields[name] = dataclasses.replace(sub, **{n: theta[sl[f"{name}.{n}"]].reshape(shape)
                                                           for n, shape in sub.param_blocks()})
        if self.W_U is not None:
            fields["W_U"] = theta[sl["W_U"]].reshape(self.W_U.shape)
        return dataclasses.replace(self, **fields)

    # -- the pure forward map and loss -----------------------------------------------------------------------------
    def logits(self, X: Tensor, mask: Tensor | None) -> Tensor:
        """``z = Out W_U`` (or ``Out``) for inputs ``X`` ``(B, L, d)`` and the resolved attention mask (pure)."""
        out = _forward(self, X, mask)[-1]
        return out if self.W_U is None else out @ self.W_U

    def loss_constant(self, X3: Tensor, num_sequences: float | None = None) -> float:
        """``c_eff``: ``c`` (default ``1/(L d_z)`` for ``"mse"``, ``1/L`` for ``"ce"``), over ``B`` if ``"mean"``.

        ``num_sequences`` replaces ``B = X3.shape[0]`` (data shards: the count over all ranks, MATH §6.2).
        """
        L = X3.shape[-2]
        c0 = float(self.c) if self.c is not None else (1.0 / (L * self.d_z) if self.loss == "mse" else 1.0 / L)
        B = X3.shape[0] if num_sequences is None else num_sequences
        return c0 / B if self.reduction == "mean" else c0

    def loss_of_logits(self, z: Tensor, target: Tensor, c_eff: float) -> Tensor:
        """``ℓ_out(z)``: ``c_eff Σ‖z − Y‖²`` or ``c_eff Σ_i (logsumexp z_i − z_{i,y_i})`` (pure)."""
        if self.loss == "mse":
            return c_eff * ((z - target) ** 2).sum()
        picked = z.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return c_eff * (torch.logsumexp(z, dim=-1) - picked).sum()

    # -- inputs -----------------------------------------------------------------------------------------------
    def check_inputs(self, X: object, target: object) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(X3, target3, mask)``: ``X`` as ``(B, L, d)``; the target ``(B, L, d_z)`` floats (``"mse"``) or
        ``(B, L)`` class indices in ``[0, V)`` (``"ce"``); the resolved ``(B, L, L)`` attention mask or ``None``.
        """
        X3, _, mask = self.attention.check_inputs(X)
        single = isinstance(X, Tensor) and X.ndim == 2
        if not isinstance(target, Tensor):
            raise EnergyInputError(f"`target` must be a tensor, got {type(target).__name__}.")
        T = target.unsqueeze(0) if single else target
        B, L = X3.shape[:2]
        if self.loss == "mse":
            T = check_tensor(T, "target")
            if T.shape != (B, L, self.d_z):
                raise EnergyInputError(f"`target` (the regression target of the logits) must have shape "
                                       f"{(B, L, self.d_z)} for `X` of shape {tuple(X3.shape)}, got {tuple(T.shape)}.")
            check_same_float_dtype(X=X3, target=T)
        else:
            if T.dtype not in (torch.int64, torch.int32) or T.shape != (B, L):
                raise EnergyInputError(f"`target` must hold class indices: an integer tensor of shape {(B, L)}, got "
                                       f"{T.dtype} of shape {tuple(T.shape)}.")
            V = self.d_z
            if T.numel() and (int(T.min()) < 0 or int(T.max()) >= V):
                raise EnergyInputError(f"`target` class indices must lie in [0, {V}) (the unembedding width), got "
                                       f"values in [{int(T.min())}, {int(T.max())}].")
            T = T.long()
        return X3, T, mask


def _named(prefix: str, sub: MultiHeadAttentionLayer | NormLayer | FFNLayer) -> dict[str, Tensor]:
    """``{"<prefix>.<name>": tensor}`` of a sublayer's parameters."""
    if isinstance(sub, MultiHeadAttentionLayer):
        flat = sub.flat()
        out, start = {}, 0
        for name, shape in sub.param_blocks():
            n = math.prod(shape)
            out[f"{prefix}.{name}"] = flat[start:start + n]
            start += n
        return out
    return {f"{prefix}.{name}": t for name, t in sub.params().items()}


def _span(slices: dict[str, slice], prefix: str) -> slice:
    """The contiguous columns of the parameters whose names start with ``prefix``."""
    spans = [s for name, s in slices.items() if name.startswith(prefix)]
    return slice(spans[0].start, spans[-1].stop)


# ----------------------------------------------------------------------------------------------------------------
# Forward map (pure)
# ----------------------------------------------------------------------------------------------------------------


def _forward(block: TransformerBlock, X: Tensor, mask: Tensor | None) -> list[Tensor]:
    """The intermediates of MATH §5.3, ending with ``Out`` (pure)."""
    mha = block.attention
    if block.norm == "pre":
        assert block.ln1 is not None and block.ln2 is not None
        U1 = block.ln1.output(X)
        Z = X + mha.output(U1, mask)
        U2 = block.ln2.output(Z)
        return [U1, Z, U2, Z + block.ffn.output(U2)]
    if block.norm == "post":
        assert block.ln1 is not None and block.ln2 is not None
        Z = block.ln1.output(X + mha.output(X, mask))
        return [Z, block.ln2.output(Z + block.ffn.output(Z))]
    Z = X + mha.output(X, mask)
    return [Z, Z + block.ffn.output(Z)]


# ----------------------------------------------------------------------------------------------------------------
# Public entries: closed form, autograd twins
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockHessian:
    """A dense block Hessian with its parameter index: ``matrix`` ``(p, p)`` in :meth:`TransformerBlock.param_blocks`
    order.

    Example:
        >>> import torch
        >>> block = random_block(d=4, n_heads=2, d_head=3, d_ff=5, generator=torch.Generator().manual_seed(0))
        >>> X, Y = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
        >>> H = block_hessian(block, X, Y)
        >>> H.block("attn.h0.Q", "ffn.W_1").shape
        torch.Size([12, 20])
    """

    matrix: Tensor
    params: tuple[tuple[str, tuple[int, ...]], ...]

    def slices(self) -> dict[str, slice]:
        """``{name: slice}`` of each parameter's rows/columns."""
        out, start = {}, 0
        for name, shape in self.params:
            n = math.prod(shape)
            out[name] = slice(start, start + n)
            start += n
        return out

    def block(self, a: str, b: str) -> Tensor:
        """The ``(a, b)`` block, ``(numel a, numel b)``; the names are those of :attr:`params`."""
        sl = self.slices()
        for name in (a, b):
            if name not in sl:
                raise EnergyInputError(f"unknown parameter block {name!r}; choose one of {list(sl)}.")
        return self.matrix[sl[a], sl[b]]

    def frobenius(self) -> dict[tuple[str, str], float]:
        """``‖H_ab‖_F`` of every (ordered) pair of parameter blocks."""
        sl = self.slices()
        return {(a, b): float(torch.linalg.matrix_norm(self.matrix[sl[a], sl[b]])) for a in sl for b in sl}


def _checked(block: object, X: object, target: object, routine: str, shards: ShardGroup | None = None,
             dense: int = 0, max_gib: float | None = None) -> tuple[TransformerBlock, Tensor, Tensor, Tensor | None,
                                                                  float]:
    """``(block, X3, target3, mask, c_eff)`` after the checks; with ``dense`` rows, the ``(dense, p)`` budget.

    Data shards (``shards``): the checks run on every rank and any rank's error stops all of them; the ranks must
    hold the same block (weights checksum, settings), and ``c_eff`` of a mean over sequences divides by the number
    of sequences of *all* ranks, so that the rank sums are the terms of the union's loss (MATH §6.2).
    """
    def check() -> tuple[TransformerBlock, Tensor, Tensor, Tensor | None]:
        if not isinstance(block, TransformerBlock):
            raise EnergyInputError(f"{routine}: `block` must be an energy.hessian.block.TransformerBlock, got "
                                   f"{type(block).__name__}; build one with TransformerBlock(...) or "
                                   "random_block(...).")
        X3, T, mask = block.check_inputs(X, target)
        if dense:
            check_dense_budget(dense, block.num_params, X3.dtype, max_gib, routine)
        return block, X3, T, mask

    if shards is None:
        blk, X3, T, mask = check()
        return blk, X3, T, mask, blk.loss_constant(X3)
    blk, X3, T, mask = shards.run(check, f"checking each rank's block and sequences ({routine})")
    shards.check_same((blk.param_blocks(), str(X3.dtype), _settings(blk), tensor_checksum(blk.flat())),
                      f"the block's weights and settings ({routine})")
    B = shards.total(X3.shape[0], "the number of sequences")
    if B == 0:
        raise EnergyInputError(f"{routine}: `X` holds no sequence on any rank; give at least one rank a sequence.")
    return blk, X3, T, mask, blk.loss_constant(X3, B)


def _settings(blk: TransformerBlock) -> tuple[object, ...]:
    """The block's settings that are not weights (compared across ranks)."""
    mha = blk.attention
    norms = tuple((ln.eps, ln.kind) for ln in (blk.ln1, blk.ln2) if ln is not None)
    return (blk.norm, blk.loss, blk.c, blk.reduction, mha.scale, mha.causal, mha.linear, mha.c, mha.reduction,
            blk.ffn.activation, norms, mha.mask is None)


def _check_part(part: object) -> Part:
    if part not in ("H", "H_o", "H_f"):
        raise EnergyInputError(f"`part` must be 'H', 'H_o' or 'H_f', got {part!r}.")
    return part  # type: ignore[return-value]


def _summed(shards: ShardGroup | None, compute: Callable[[], Tensor], shape: tuple[int, ...], like: Tensor,
            what: str) -> Tensor:
    """``compute()`` in one process; ``Σ_r compute_r()`` with consensus on failure over data shards."""
    return compute() if shards is None else shards.sum(compute, shape, like, what)


def block_loss(block: TransformerBlock, X: Tensor, target: Tensor, *,
               distributed: bool | ShardGroup = False) -> Tensor:
    """The block's loss ``ℓ(X)`` (MATH §5.3), after checking the inputs; summed over the ranks with
    ``distributed`` (``X``, ``target``: this rank's sequences).
    """
    shards = resolve_shards(distributed)
    block, X3, T, mask, c = _checked(block, X, target, "block_loss", shards)
    return _summed(shards, lambda: block.loss_of_logits(block.logits(X3, mask), T, c), (), X3, "the block loss")


def block_hessian(block: TransformerBlock, X: Tensor, target: Tensor, *, part: Part = "H",
                  max_gib: float | None = None, distributed: bool | ShardGroup = False) -> BlockHessian:
    r"""The exact parameter Hessian of a whole block (or its ``H_o`` / ``H_f`` part) in closed form (MATH §5.3).

    .. math:: H = 𝒯_z^\top \nabla^2\ell_\mathrm{out}\, 𝒯_z + \sum_f [𝒯_u; E_f]^\top \nabla^2\langle g_y, f\rangle
              [𝒯_u; E_f]

    Args:
        block: the block and its loss.
        X: inputs ``(L, d)`` or ``(B, L, d)``.
        target: ``(B, L, d_z)`` regression targets (``loss="mse"``) or ``(B, L)`` class indices (``"ce"``).
        part: ``"H"``, ``"H_o"`` (Gauss–Newton of the whole block) or ``"H_f"`` (the functional rest).
        max_gib: memory budget of the dense ``(p, p)`` result (default 4 GiB).
        distributed: ``True`` (the default process group) or a :class:`~energy.hessian.distributed.ShardGroup`:
            ``X`` and ``target`` are this rank's sequences (uneven counts allowed); ``H = Σ_r H_r`` over the
            sequences of every rank, with the constant of a mean over *all* sequences, is returned on every rank
            (one all-reduce of ``p²`` numbers; MATH §6.2).
    """
    part = _check_part(part)
    shards = resolve_shards(distributed)
    block, X3, T, mask, c = _checked(block, X, target, "block_hessian", shards, _rows(block), max_gib)
    warn_if_not_float64(X3.dtype, "block_hessian")
    p = block.num_params
    from energy.hessian.block_sweep import sweep

    H = _summed(shards, lambda: sweep(block, X3, T, mask, c, "params", part), (p, p), X3, "the block Hessian")
    return BlockHessian(H, block.param_blocks())


def _rows(block: object, copies: int = 1) -> int:
    """Rows of the dense result checked against the memory budget (``copies · p``; 0 if ``block`` is invalid)."""
    return copies * block.num_params if isinstance(block, TransformerBlock) else 0


def block_hessian_parts(block: TransformerBlock, X: Tensor, target: Tensor, *, max_gib: float | None = None,
                        distributed: bool | ShardGroup = False) -> dict[str, BlockHessian]:
    """``{"H", "H_o", "H_f"}`` of :func:`block_hessian` from one sweep (``H = H_o + H_f``; three ``(p, p)``
    matrices, checked against ``max_gib`` together). ``distributed`` as for :func:`block_hessian` (one all-reduce
    of ``2p²`` numbers: ``H_o`` and ``H_f``).
    """
    shards = resolve_shards(distributed)
    block, X3, T, mask, c = _checked(block, X, target, "block_hessian_parts", shards, _rows(block, 3), max_gib)
    warn_if_not_float64(X3.dtype, "block_hessian_parts")
    p = block.num_params
    from energy.hessian.block_sweep import sweep

    H_o, H_f = _summed(shards, lambda: sweep(block, X3, T, mask, c, "params", "parts"), (2, p, p), X3,
                       "the block Hessian parts").unbind()
    index = block.param_blocks()
    return {"H": BlockHessian(H_o + H_f, index), "H_o": BlockHessian(H_o, index), "H_f": BlockHessian(H_f, index)}


def block_token_hessian(block: TransformerBlock, X: Tensor, target: Tensor, *, part: Part = "H",
                        distributed: bool | ShardGroup = False) -> Tensor:
    r"""The token-space Hessian ``∇²_{X_b} ℓ`` of every sequence, ``(B, L d, L d)`` (``vec_r`` of ``X_b``).

    The same composition as :func:`block_hessian` with the columns of one sequence's input in place of the
    parameters (MATH §5.3); ``part`` splits it the same way. With ``distributed`` (``X``, ``target``: this rank's
    sequences) each rank returns the Hessians of *its own* sequences, with the loss constant of the union (a mean
    divides by the number of sequences of all ranks): they are not a sum, and the one-process result is their
    concatenation along ``B`` in rank order (MATH §6.2). Nothing but the count is communicated.
    """
    part = _check_part(part)
    shards = resolve_shards(distributed)
    block, X3, T, mask, c = _checked(block, X, target, "block_token_hessian", shards)
    from energy.hessian.block_sweep import sweep

    return sweep(block, X3, T, mask, c, "tokens", part)


def autograd_block_hessian(block: TransformerBlock, X: Tensor, target: Tensor) -> Tensor:
    """Autograd twin of :func:`block_hessian`: ``torch.func.hessian`` of the loss in the flat parameter vector."""
    block, X3, T, mask, c = _checked(block, X, target, "autograd_block_hessian")
    return torch.func.hessian(lambda t: block.with_flat(t).loss_of_logits(block.with_flat(t).logits(X3, mask), T, c))(
        block.flat())


def autograd_block_ggn(block: TransformerBlock, X: Tensor, target: Tensor) -> Tensor:
    """Autograd twin of ``H_o``: ``Jᵀ ∇²ℓ_out J`` with ``J = torch.func.jacrev`` of the logits."""
    block, X3, T, mask, c = _checked(block, X, target, "autograd_block_ggn")
    theta = block.flat()
    J = torch.func.jacrev(lambda t: block.with_flat(t).logits(X3, mask).reshape(-1))(theta)
    z = block.logits(X3, mask)
    H_out = torch.func.hessian(lambda v: block.loss_of_logits(v.reshape(z.shape), T, c))(z.reshape(-1))
    return J.T @ H_out @ J


def autograd_block_token_hessian(block: TransformerBlock, X: Tensor, target: Tensor) -> Tensor:
    """Autograd twin of :func:`block_token_hessian`: the diagonal ``(L d)`` blocks of ``torch.func.hessian`` in
    ``X``.
    """
    block, X3, T, mask, c = _checked(block, X, target, "autograd_block_token_hessian")
    B, L, d = X3.shape
    H = torch.func.hessian(lambda x: block.loss_of_logits(block.logits(x.reshape(X3.shape), mask), T, c))(
        X3.reshape(-1))
    H = H.reshape(B, L * d, B, L * d)
    return torch.stack([H[b, :, b, :] for b in range(B)])


def random_block(d: int, n_heads: int, d_head: int, d_ff: int, *, kv_heads: int | None = None,
                 norm: NormPosition = "pre", norm_kind: Literal["layer", "rms"] = "layer",
                 activation: str = "gelu", vocab: int | None = None, loss: OutputLoss = "mse",
                 causal: bool = True, eps: float = 1e-5, scale: float = 1.0,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu") -> TransformerBlock:
    """A block with seeded random weights (entries ``N(0, scale²/fan_in)``; LayerNorm ``γ ≈ 1``, ``b ≈ 0`` perturbed).

    For tests, figures and benchmarks; every argument is a field of the sublayers (``kv_heads``: grouped-query
    attention with that many K/V heads). The weights are drawn on the CPU from ``generator`` (a seed gives the same
    block on every device) and moved to ``device``.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    h_kv = n_heads if kv_heads is None else kv_heads

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    def w(*shape: int) -> Tensor:
        return scale * r(*shape) / math.sqrt(shape[-2])

    attention = MultiHeadAttentionLayer(w(n_heads, d, d_head), w(h_kv, d, d_head), w(h_kv, d, d_head),
                                        w(n_heads, d_head, d), causal=causal)
    ffn = FFNLayer(w(d, d_ff), 0.1 * r(d_ff), w(d_ff, d), 0.1 * r(d), activation)  # type: ignore[arg-type]
    lns: list[NormLayer | None] = [None, None]
    if norm != "none":
        lns = [NormLayer(1 + 0.1 * r(d), None if norm_kind == "rms" else 0.1 * r(d), eps, norm_kind)
               for _ in range(2)]
    W_U = None if vocab is None else w(d, vocab)
    return TransformerBlock(attention, ffn, lns[0], lns[1], norm, W_U, loss)
