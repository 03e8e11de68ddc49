r"""Curvature blocks of Hugging Face Transformers by name, down to single attention heads (MATH §3.7).

A *block* is a named set of parameter entries: whole tensors (``transformer.h.0.mlp.c_fc.weight``), the Q/K/V
column ranges of GPT-2's fused ``c_attn`` (a ``Conv1D``: ``x W + b`` with ``W`` of shape ``(d, 3d)``), one head's
rows of LLaMA's ``q_proj`` (``nn.Linear``: ``x Wᵀ + b``), a key/value head shared by ``n_heads / n_kv_heads`` query
heads (grouped-query attention), one head's input slice of the output projection, and groups (a layer's MLP, its
norms, the embeddings). :func:`block_catalogue` lists them for a model; :func:`select_blocks` resolves names and
glob patterns (``layer*.head*.Q``).

For blocks ``a`` and ``b`` with index sets ``I_a``, ``I_b`` in the flat parameter vector ``θ`` and ``A ∈ {H, H_o,
H_f}``, the block operator is

.. math::
    A_{ab}\, v = \big(A\, E_b v\big)_{I_a}, \qquad E_b v = \text{the zero vector with } v \text{ placed at } I_b ,

computed by the operator over the tensors that hold ``I_a ∪ I_b`` only (a sub-matrix of the Hessian is the
Hessian with every other parameter held fixed). It is a :class:`~energy.hessian.linear_operator.LinearOperator`,
so the estimators of :mod:`energy.hessian.estimators` and :mod:`energy.hessian.krylov` apply unchanged.

Names (``i`` a layer, ``h`` a query head, ``g`` a key/value head):

* ``layer{i}.head{h}.Q`` (weight and bias entries producing head ``h``'s queries), ``.K``, ``.V`` (when
  ``n_kv_heads = n_heads``), ``layer{i}.kv_head{g}.K`` / ``.V`` (grouped-query attention), ``layer{i}.head{h}.O``
  (the output projection's input slice of head ``h``; its bias belongs to no head);
* ``layer{i}.attn.Q`` / ``.K`` / ``.V`` / ``.O`` (all heads, biases included);
* ``layer{i}.mlp``, ``layer{i}.ln1`` (norm before / after attention), ``layer{i}.ln2``, ``embed``, ``pos_embed``,
  ``final_norm``;
* every parameter tensor under its own name.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from energy._validation import EnergyInputError
from energy.hessian.curvature_operators import CurvatureOperator, resolve_parts
from energy.hessian.distributed import ShardGroup
from energy.hessian.estimators import (
    Estimate,
    hutchinson_diagonal,
    hutchinson_squared_frobenius,
    hutchpp_squared_frobenius,
    hutchpp_trace,
)
from energy.hessian.krylov import LanczosResult, SpectralDensity, lanczos, slq_density
from energy.hessian.linear_operator import LinearOperator

__all__ = ["ATTENTION_LAYOUTS", "Block", "BlockCurvature", "BlockOperator", "block_catalogue", "select_blocks"]

Index = tuple[slice, ...]


@dataclass(frozen=True)
class Block:
    """A named set of parameter entries: ``pieces`` = ``(parameter name, index)`` with ``index`` a tuple of
    slices into that parameter tensor (``()`` = the whole tensor).
    """

    name: str
    pieces: tuple[tuple[str, Index], ...]

    @property
    def tensors(self) -> tuple[str, ...]:
        """The parameter tensors the block touches, in order, without repeats."""
        return tuple(dict.fromkeys(n for n, _ in self.pieces))

    def numel(self, shapes: dict[str, torch.Size]) -> int:
        """Number of entries of the block."""
        return sum(int(torch.empty(shapes[n], device="meta")[idx].numel()) for n, idx in self.pieces)


ALL: Index = ()


def _cols(a: int, b: int) -> Index:
    return (slice(None), slice(a, b))


def _rows(a: int, b: int) -> Index:
    return (slice(a, b),)


# --------------------------------------------------------------------------------------------------------------
# Attention layouts
# --------------------------------------------------------------------------------------------------------------

#: ``model_type``: (layer prefix, {"q","k","v","o": module path}, fused?, ln1, ln2, MLP paths, embed, pos, final).
ATTENTION_LAYOUTS: dict[str, dict[str, Any]] = {
    "gpt2": {"layers": "transformer.h.{i}", "fused": "attn.c_attn", "o": "attn.c_proj", "ln1": ["ln_1"],
             "ln2": ["ln_2"], "mlp": ["mlp"], "embed": ["transformer.wte"], "pos_embed": ["transformer.wpe"],
             "final_norm": ["transformer.ln_f"]},
    "llama": {"layers": "model.layers.{i}", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
              "v": "self_attn.v_proj", "o": "self_attn.o_proj", "ln1": ["input_layernorm"],
              "ln2": ["post_attention_layernorm"], "mlp": ["mlp"], "embed": ["model.embed_tokens"], "pos_embed": [],
              "final_norm": ["model.norm"]},
    "bert": {"layers": "bert.encoder.layer.{i}", "q": "attention.self.query", "k": "attention.self.key",
             "v": "attention.self.value", "o": "attention.output.dense", "ln1": ["attention.output.LayerNorm"],
             "ln2": ["output.LayerNorm"], "mlp": ["intermediate.dense", "output.dense"],
             "embed": ["bert.embeddings.word_embeddings"], "pos_embed": ["bert.embeddings.position_embeddings"],
             "final_norm": []},
    "vit": {"layers": "vit.layers.{i}", "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
            "o": "attention.o_proj", "ln1": ["layernorm_before"], "ln2": ["layernorm_after"], "mlp": ["mlp"],
            "embed": ["vit.embeddings.patch_embeddings.projection"],
            "pos_embed": ["vit.embeddings.position_embeddings"], "final_norm": ["vit.layernorm"]},
}
ATTENTION_LAYOUTS["mistral"] = ATTENTION_LAYOUTS["llama"]
_TL = "._original_component"
ATTENTION_LAYOUTS["transformer-lens"] = {
    "layers": f"blocks.{{i}}{_TL}", **{p: f"attn{_TL}.{p}{_TL}" for p in "qkvo"}, "ln1": ["ln1"], "ln2": ["ln2"],
    "mlp": ["mlp"], "embed": ["embed"], "pos_embed": ["pos_embed"], "final_norm": ["ln_final"]}


def _model_type(model: nn.Module) -> str | None:
    """The key of :data:`ATTENTION_LAYOUTS` for ``model`` (``config.model_type``; ``"transformer-lens"`` for a
    TransformerLens 4 ``TransformerBridge``, whose layers are ``blocks.{i}._original_component``).
    """
    hf = getattr(model, "hf", model)
    if type(hf).__name__ == "TransformerBridge":
        return "transformer-lens"
    mt = getattr(getattr(hf, "config", None), "model_type", None)
    return mt if isinstance(mt, str) else None


def _heads(config: Any) -> tuple[int, int, int, int, int]:
    """``(n_layers, d_model, n_heads, n_kv_heads, d_head)`` from a Hugging Face config."""
    def first(*keys: str) -> Any:
        return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)

    n_layers = int(first("num_hidden_layers", "n_layer", "n_layers") or 0)
    d = int(first("hidden_size", "n_embd", "d_model") or 0)
    n_heads = int(first("num_attention_heads", "n_head", "n_heads") or 0)
    n_kv = first("num_key_value_heads", "n_key_value_heads")
    n_kv = n_heads if n_kv is None else int(n_kv)
    d_head = first("head_dim", "d_head")
    d_head = d // max(n_heads, 1) if d_head is None else int(d_head)
    return n_layers, d, n_heads, n_kv, d_head


def _with_prefix(shapes: dict[str, torch.Size], prefix: str) -> list[str]:
    return [n for n in shapes if n.startswith(prefix + ".")]


def _need(shapes: dict[str, torch.Size], name: str, shape: tuple[int, ...], model_type: str) -> None:
    if name not in shapes or tuple(shapes[name]) != shape:
        got = tuple(shapes[name]) if name in shapes else "missing"
        raise EnergyInputError(
            f"`model` ({model_type}) does not have the expected attention layout: {name} should have shape {shape} "
            f"(from the config's sizes), got {got}. Select whole tensors by name instead of head blocks."
        )


def _layer_attention(shapes: dict[str, torch.Size], lay: dict[str, Any], pre: str, i: int, sizes: tuple,
                     model_type: str) -> list[Block]:
    _, d, n_heads, n_kv, dh = sizes
    out: list[Block] = []

    def add(name: str, *pieces: tuple[str, Index]) -> None:
        out.append(Block(f"layer{i}.{name}", tuple(p for p in pieces if p[0] in shapes)))

    if "fused" in lay:  # GPT-2 Conv1D: y = x W + b, W (d, 3d) = [W_Q | W_K | W_V]
        w, b = f"{pre}.{lay['fused']}.weight", f"{pre}.{lay['fused']}.bias"
        _need(shapes, w, (d, 3 * d), model_type)
        for j, part in enumerate("QKV"):
            add(f"attn.{part}", (w, _cols(j * d, (j + 1) * d)), (b, _rows(j * d, (j + 1) * d)))
        for h in range(n_heads):
            for j, part in enumerate("QKV"):
                a = j * d + h * dh
                add(f"head{h}.{part}", (w, _cols(a, a + dh)), (b, _rows(a, a + dh)))
        wo, bo = f"{pre}.{lay['o']}.weight", f"{pre}.{lay['o']}.bias"
        _need(shapes, wo, (n_heads * dh, d), model_type)
        add("attn.O", (wo, ALL), (bo, ALL))
        out.extend(Block(f"layer{i}.head{h}.O", ((wo, _rows(h * dh, (h + 1) * dh)),)) for h in range(n_heads))
        return out
    # separate nn.Linear projections: y = x Wᵀ + b, head h = rows h·d_head ... (h+1)·d_head of W
    names = {p: (f"{pre}.{lay[p]}.weight", f"{pre}.{lay[p]}.bias") for p in "qkvo"}
    _need(shapes, names["q"][0], (n_heads * dh, d), model_type)
    for p in "kv":
        _need(shapes, names[p][0], (n_kv * dh, d), model_type)
    _need(shapes, names["o"][0], (d, n_heads * dh), model_type)
    for p in "qkvo":
        add(f"attn.{p.upper()}", (names[p][0], ALL), (names[p][1], ALL))
    kv_name = "head" if n_kv == n_heads else "kv_head"
    for h in range(n_heads):
        add(f"head{h}.Q", (names["q"][0], _rows(h * dh, (h + 1) * dh)), (names["q"][1], _rows(h * dh, (h + 1) * dh)))
        if h < n_kv:
            for p in "kv":
                add(f"{kv_name}{h}.{p.upper()}", (names[p][0], _rows(h * dh, (h + 1) * dh)),
                    (names[p][1], _rows(h * dh, (h + 1) * dh)))
        add(f"head{h}.O", (names["o"][0], _cols(h * dh, (h + 1) * dh)))
    return out


def block_catalogue(model: nn.Module) -> dict[str, Block]:
    """Every block name of ``model`` (a Hugging Face model, a TransformerLens ``TransformerBridge``, or their
    :class:`~energy.hessian.hf.LogitsModel`; names as ``nn.Module.named_parameters`` gives them).

    Structured names (module docstring) for the model types of :data:`ATTENTION_LAYOUTS`, then every parameter
    tensor under its own name. Raises :class:`EnergyInputError` if a known model type's attention tensors do not
    have the shapes its config implies.
    """
    shapes = {n: p.shape for n, p in nn.Module.named_parameters(model)}
    out: dict[str, Block] = {}
    config = getattr(model, "config", None) or getattr(model, "cfg", None)
    model_type = _model_type(model)
    lay = ATTENTION_LAYOUTS.get(model_type or "")
    if lay is not None:
        sizes = _heads(config)
        for i in range(sizes[0]):
            pre = lay["layers"].format(i=i)
            blocks = _layer_attention(shapes, lay, pre, i, sizes, str(model_type))
            for key in ("mlp", "ln1", "ln2"):
                tensors = [n for m in lay[key] for n in _with_prefix(shapes, f"{pre}.{m}")]
                blocks.append(Block(f"layer{i}.{key}", tuple((n, ALL) for n in tensors)))
            out.update((b.name, b) for b in blocks if b.pieces)
        for key in ("embed", "pos_embed", "final_norm"):
            tensors = [n for m in lay[key] for n in ([m] if m in shapes else _with_prefix(shapes, m))]
            if tensors:
                out[key] = Block(key, tuple((n, ALL) for n in tensors))
    out.update((n, Block(n, ((n, ALL),))) for n in shapes)
    return out


def select_blocks(model: nn.Module, patterns: Sequence[str] | str, *, allow_empty: bool = False) -> list[Block]:
    """The blocks matching ``patterns`` (exact names or ``fnmatch`` globs), in catalogue order, without repeats.

    Raises:
        EnergyInputError: an exact name that is not a block (with close matches and the available names), or a
            pattern that matches nothing (unless ``allow_empty``, which only drops such patterns).
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    catalogue = block_catalogue(model)
    names = list(catalogue)
    chosen: dict[str, Block] = {}
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise EnergyInputError(f"`blocks` must be non-empty names or glob patterns, got {pat!r}.")
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits and not allow_empty:
            close = difflib.get_close_matches(pat, names, n=4, cutoff=0.5)
            structured = [n for n in names if "." not in n or n.startswith("layer")]
            hint = f" Close matches: {close}." if close else ""
            layout = "" if _model_type(model) in ATTENTION_LAYOUTS else (
                f" This model type has no known attention layout (known: {sorted(ATTENTION_LAYOUTS)}), so only "
                "whole tensors are blocks.")
            what = "is not a block name" if not any(c in pat for c in "*?[") else "matches no block"
            raise EnergyInputError(
                f"`blocks`: {pat!r} {what}.{hint}{layout} Available: {', '.join(structured[:20])}"
                f"{' ...' if len(structured) > 20 else ''} and every parameter name "
                f"(e.g. {names[-1]!r}); list them with block_catalogue(model)."
            )
        for n in hits:
            chosen[n] = catalogue[n]
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen.values(), key=lambda b: order[b.name])


# --------------------------------------------------------------------------------------------------------------
# Block operators
# --------------------------------------------------------------------------------------------------------------


def _indices(block: Block, op: CurvatureOperator) -> Tensor:
    """Positions of the block's entries in the flat vector of ``op`` (its tensors in ``op.space`` order)."""
    parts = []
    for name, idx in block.pieces:
        sl = op.space.slice(name)
        shape = op.space.shapes[op.space.names.index(name)]
        parts.append(torch.arange(sl.start, sl.stop, device=op.device).reshape(shape)[idx].reshape(-1))
    return torch.cat(parts)


class BlockOperator(LinearOperator):
    r"""The block :math:`A_{ab}` (rows ``a``, columns ``b``) of a curvature operator ``parent`` whose free
    parameters are the tensors of ``a`` and ``b`` (module docstring). Symmetric when ``a == b``.
    """

    def __init__(self, parent: CurvatureOperator, rows: Block, cols: Block) -> None:
        self.parent, self.rows, self.cols = parent, rows, cols
        self._r, self._c = _indices(rows, parent), _indices(cols, parent)
        super().__init__((len(self._r), len(self._c)), parent.dtype, parent.device, symmetric=rows == cols,
                         max_vectors=parent.max_vectors)

    def _embed(self, V: Tensor, idx: Tensor) -> Tensor:
        full = V.new_zeros(self.parent.shape[1], V.shape[1])
        full[idx.to(V.device)] = V
        return full

    def _matmat(self, V: Tensor) -> Tensor:
        return self.parent._matmat(self._embed(V, self._c))[self._r.to(V.device)]

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self.parent._matmat(self._embed(U, self._r))[self._c.to(U.device)]

    def products(self, V: Tensor, parts: Sequence[str]) -> dict[str, Tensor]:
        """Several parts of the same block in one traversal: ``{part: A_ab V}`` (``V`` of shape ``(n_b, k)``)."""
        out = self.parent.products(self._embed(V, self._c), parts)
        return {p: out[p][self._r.to(V.device)] for p in out}


# --------------------------------------------------------------------------------------------------------------
# Blockwise curvature of one model and data set
# --------------------------------------------------------------------------------------------------------------


class BlockCurvature:
    """Blocks ``A_ab`` (``A ∈ {H, H_o, H_f}``) of a Hugging Face model's loss on ``data``, and their norms, traces,
    diagonals, top eigenvalues and spectral densities.

    Exact values come from the ``n_b`` columns ``A_ab I`` (computed once per block and part, then reused) when the
    column block has at most ``exact_max`` entries; larger blocks use Hutch++ (traces, ``‖A_aa‖_F``), Hutchinson
    (diagonals, off-diagonal norms), Lanczos and SLQ (:mod:`energy.hessian.estimators`, :mod:`energy.hessian.krylov`).

    Args:
        model: a Hugging Face model (see :mod:`energy.hessian.hf`).
        data: batches ``(inputs, labels)`` (:func:`energy.hessian.hf.synthetic_batches`).
        max_vectors: column chunk of the products (memory bound).
        cache: keep each batch's linearisation between products (fast Lanczos on few batches).
        exact_max: largest column block computed exactly.
        distributed: ``data`` is this rank's shard and every product is summed over the ranks
            (:class:`~energy.hessian.curvature_operators.CurvatureOperator`, MATH §6.1); all estimates are then
            computed identically on every rank.
    """

    def __init__(self, model: nn.Module, data: Sequence[Any], *, max_vectors: int | None = None, cache: bool = False,
                 exact_max: int = 256, distributed: bool | ShardGroup = False) -> None:
        from energy.hessian.hf import LogitsModel

        self.model = model if isinstance(model, LogitsModel) else LogitsModel(model)
        self.data = data
        self.max_vectors, self.cache, self.exact_max = max_vectors, cache, int(exact_max)
        self.distributed = distributed
        self.catalogue = block_catalogue(self.model.hf)
        self._parents: dict[tuple[tuple[str, ...], str], CurvatureOperator] = {}
        self._dense: dict[tuple[str, str, str], Tensor] = {}

    def blocks(self, patterns: Sequence[str] | str, *, allow_empty: bool = False) -> list[Block]:
        """The blocks matching names or glob patterns (:func:`select_blocks`)."""
        return select_blocks(self.model.hf, patterns, allow_empty=allow_empty)

    def _block(self, b: Block | str) -> Block:
        if isinstance(b, Block):
            return b
        if b not in self.catalogue:
            hits = self.blocks([b])  # raises for an unknown name, with close matches
            raise EnergyInputError(f"block {b!r} is a pattern matching {len(hits)} blocks ({hits[0].name}, ...); an "
                                   "operator takes one block name (loop over bc.blocks(pattern)).")
        return self.catalogue[b]

    def operator(self, rows: Block | str, cols: Block | str | None = None, part: str = "H") -> BlockOperator:
        """The block ``A_{rows, cols}`` of the part ``A`` (default ``cols = rows``) as a linear operator."""
        from energy.hessian.hf import curvature_operator

        r = self._block(rows)
        c = r if cols is None else self._block(cols)
        canon = resolve_parts([part])[part]
        tensors = tuple(dict.fromkeys(r.tensors + c.tensors))
        key = (tensors, canon)
        if key not in self._parents:
            self._parents[key] = curvature_operator(self.model, self.data, part=canon, params=list(tensors),
                                                    max_vectors=self.max_vectors, cache=self.cache,
                                                    distributed=self.distributed)
        return BlockOperator(self._parents[key], r, c)

    def _exact(self, A: BlockOperator, part: str) -> Tensor | None:
        """The dense block ``A I`` (one vmapped pass) if it has at most ``exact_max`` columns; kept for reuse."""
        if A.shape[1] > self.exact_max:
            return None
        key = (A.rows.name, A.cols.name, part)
        if key not in self._dense:
            self._dense[key] = A.dense()
        return self._dense[key]

    def frobenius(self, rows: Block | str, cols: Block | str | None = None, part: str = "H", *,
                  num_matvecs: int = 30, generator: torch.Generator | None = None) -> Estimate:
        r""":math:`\|A_{ab}\|_F` (exact, or Hutch++ for a diagonal block, Hutchinson for an off-diagonal one); the
        standard error of the squared estimate ``s`` is carried to the norm as ``s / (2‖A‖_F)``.
        """
        A = self.operator(rows, cols, part)
        M = self._exact(A, part)
        if M is not None:
            return Estimate(float(torch.linalg.matrix_norm(M)), 0.0, A.shape[1])
        if A.symmetric:
            est = hutchpp_squared_frobenius(A, num_matvecs, generator=generator, exact_if_cheaper=True)
        else:
            est = hutchinson_squared_frobenius(A, num_matvecs, generator=generator, exact_if_cheaper=True)
        norm = max(float(est.value), 0.0) ** 0.5
        return Estimate(norm, float(est.stderr) / (2 * norm) if norm > 0 else 0.0, est.num_matvecs)

    def trace(self, block: Block | str, part: str = "H", *, num_matvecs: int = 30,
              generator: torch.Generator | None = None) -> Estimate:
        r""":math:`\operatorname{tr} A_{aa}` (exact, or Hutch++)."""
        A = self.operator(block, None, part)
        M = self._exact(A, part)
        if M is not None:
            return Estimate(float(torch.trace(M)), 0.0, A.shape[1])
        return hutchpp_trace(A, num_matvecs, generator=generator, exact_if_cheaper=True)

    def diagonal(self, block: Block | str, part: str = "H", *, num_samples: int = 30,
                 generator: torch.Generator | None = None) -> Estimate:
        r""":math:`\operatorname{diag} A_{aa}` (exact, or Hutchinson with Rademacher probes)."""
        A = self.operator(block, None, part)
        M = self._exact(A, part)
        if M is not None:
            d = torch.diagonal(M).clone()
            return Estimate(d, torch.zeros_like(d), A.shape[1])
        return hutchinson_diagonal(A, num_samples, generator=generator, exact_if_cheaper=True)

    def top_eigenvalues(self, block: Block | str, part: str = "H", k: int = 3, *,
                        generator: torch.Generator | None = None, tol: float = 1e-8) -> LanczosResult:
        r"""The ``k`` largest eigenvalues of :math:`A_{aa}`: from the dense block (``eigh``) up to ``exact_max``
        entries, else by Lanczos (:func:`~energy.hessian.krylov.lanczos`).
        """
        A = self.operator(block, None, part)
        M = self._exact(A, part)
        if M is not None:
            ev = torch.linalg.eigh(M)
            top = torch.argsort(ev.eigenvalues, descending=True)[: min(k, A.shape[1])]
            vecs = ev.eigenvectors[:, top]
            res = torch.linalg.vector_norm(M @ vecs - vecs * ev.eigenvalues[top], dim=0)
            return LanczosResult(ev.eigenvalues[top], vecs, res, A.shape[1], True)
        return lanczos(A, min(k, A.shape[1]), generator=generator, tol=tol)

    def density(self, block: Block | str, part: str = "H", *, num_probes: int = 4, num_steps: int = 20,
                num_grid: int = 128, generator: torch.Generator | None = None) -> SpectralDensity:
        r"""Spectral density of :math:`A_{aa}` by stochastic Lanczos quadrature (:func:`~energy.hessian.krylov.
        slq_density`; on the dense block up to ``exact_max`` entries, so no further products).
        """
        A = self.operator(block, None, part)
        M = self._exact(A, part)
        return slq_density(A if M is None else M, num_probes, min(num_steps, A.shape[1]), generator=generator,
                           num_grid=num_grid)
