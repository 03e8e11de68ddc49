"""Ormaniec et al. (2024) figures, shared part: constants, seeds, the models and data of the protocol, the fast
scored-position forward, and the dense-Hessian helpers (MATH §3.7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn

from energy.hessian.operators import HessianOperator
from energy.hessian.sweep import THEORY_EXPONENTS
from energy.reference import layer_norm, linear_attention, multi_head_attention
from unfold.data import addition_batch, answer_positions
from unfold.standard import DecoderBlock, GPT2Config, GPT2Decoder, MLPBaseline

DTYPE = torch.float64
#: ``log10(|H| + eps)`` of the heat maps (MATH §3.7).
HEATMAP_EPS = 1e-6
#: The small-σ fit window: σ ≤ this value.
SMALL_SIGMA_MAX = 0.1
#: The curvature parts of the operators (``H_o`` = GGN, ``H_f`` = ``H − GGN``) and their plot labels.
PARTS: tuple[tuple[str, str], ...] = (("H_o", "H_o"), ("H_f", "H_f"), ("H", "H"))
#: Small-σ exponents of MATH §3.6 for the single self-attention layer (the one table, :mod:`energy.hessian.sweep`).
THEORY_RATES = THEORY_EXPONENTS


# ----------------------------------------------------------------------------------------------------------------------
# models, data, fast scored-position forward
# ----------------------------------------------------------------------------------------------------------------------


#: Seed offsets of the independent random streams of one figure seed ``s``: initialisation ``i`` uses ``s + i`` for the
#: weights, ``s + i + EMBEDDING_SEED`` for the embedding draw, ``s + i + PROBE_SEED`` for the Hutchinson probes, and the
#: data batch uses ``s + DATA_SEED``.
EMBEDDING_SEED, PROBE_SEED, DATA_SEED = 10_000, 20_000, 30_000


def addition_data(batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """One batch of 5-digit addition (uniform digits, MATH §3.7) from its own generator seeded with ``seed``."""
    return addition_batch(batch_size, generator=torch.Generator().manual_seed(seed))


def gpt2_model(config: GPT2Config, seed: int) -> GPT2Decoder:
    """A GPT-2-initialised decoder (``N(0, (0.8/√d)²)`` weights) in float64, seeded."""
    return GPT2Decoder(config, generator=torch.Generator().manual_seed(seed)).to(DTYPE)


def _ln(module: nn.LayerNorm | None, X: Tensor) -> Tensor:
    return X if module is None else layer_norm(X, module.weight, module.bias, module.eps)


class ScoredPositions(nn.Module):
    """The outputs of a causal :class:`GPT2Decoder` (or position-wise :class:`MLPBaseline`) at the answer positions
    only, computed without the work the loss never reads.

    The loss of the addition task reads the outputs at :func:`unfold.data.answer_positions` (11…16). With causal
    attention these depend on the tokens ``0…16`` only, and in the *last* block only the queries, the residual, the
    MLP and the unembedding at those positions matter. This module evaluates exactly that and returns a tensor of
    the full shape ``(B, n, vocab)`` with zeros at the unscored positions, so ``addition_loss`` /
    ``addition_mse_loss`` apply unchanged and give the same value and derivatives as on the full model.

    Args:
        model: a causal ``GPT2Decoder`` or an ``MLPBaseline``; its parameters are shared (names get ``model.``).
        n_digits: digits per operand of the addition task.
    """

    def __init__(self, model: GPT2Decoder | MLPBaseline, n_digits: int = 5) -> None:
        super().__init__()
        if isinstance(model, GPT2Decoder) and not model.config.causal:
            raise ValueError("ScoredPositions needs a causal GPT2Decoder (without the mask every position matters).")
        if not isinstance(model, (GPT2Decoder, MLPBaseline)):
            raise TypeError(f"`model` must be a GPT2Decoder or an MLPBaseline, got {type(model).__name__}.")
        self.model: GPT2Decoder | MLPBaseline = model
        positions = answer_positions(n_digits)
        self.positions: Tensor
        self.register_buffer("positions", positions, persistent=False)
        self.n_used = int(positions.max()) + 1  # read once here: the forward reads no tensor value

    def set_embedding_scale(self, sigma: float, generator: torch.Generator | None = None) -> None:
        """Redraw the embeddings ``N(0, σ²)`` (delegates to the wrapped model)."""
        self.model.set_embedding_scale(sigma, generator)

    def forward(self, tokens: Tensor) -> Tensor:
        pos = self.positions
        m = self.model
        X = m.embed(tokens[..., : self.n_used])
        if isinstance(m, MLPBaseline):
            scored = m.forward_embeddings(X[..., pos, :])
        else:
            blocks = cast(Sequence[DecoderBlock], m.blocks)
            for block in blocks[:-1]:
                X = block(X)
            scored = _ln(m.ln_f, self._last_block(blocks[-1], X, pos)) @ m.W_U + m.b_U
        out = scored.new_zeros(*scored.shape[:-2], tokens.shape[-1], scored.shape[-1])
        return out.index_copy(-2, pos, scored)

    @staticmethod
    def _last_block(block: DecoderBlock, X: Tensor, pos: Tensor) -> Tensor:
        """``DecoderBlock.forward`` (see :mod:`unfold.standard`) with queries restricted to ``pos``."""
        attn = block.attn
        attend = multi_head_attention if attn.kind == "softmax" else linear_attention
        mask = pos[:, None] >= torch.arange(X.shape[-2], device=X.device)[None, :]  # causal: key j ≤ query pos
        H = _ln(block.ln_1, X)
        out = attend(H[..., pos, :], H, attn.W_Q, attn.W_K, attn.W_V, attn.W_O, num_heads=attn.n_heads, mask=mask)
        s = block.attn_residual_scale
        Xq = X[..., pos, :]
        Y = (Xq if s == 1.0 else s * Xq) + out
        if block.mlp is not None:
            o = block.mlp(_ln(block.ln_2, Y))
            Y = Y + o if block.mlp_residual else o
        return Y


# ----------------------------------------------------------------------------------------------------------------------
# dense Hessian, heat maps and histograms
# ----------------------------------------------------------------------------------------------------------------------


def natural_order(model: GPT2Decoder) -> list[str]:
    """Parameter names in the order of the forward pass: embeddings, then per block ``W_Q, W_K, W_V, W_O``, LayerNorms
    and MLP, then ``LN_f`` and the unembedding (``named_parameters`` lists the model's own ``W_U, b_U`` first).
    """
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n.startswith(("W_U", "b_U", "ln_f"))]
    return [n for n in names if n not in head] + sorted(head, key=lambda n: not n.startswith("ln_f"))


def parameter_groups(model: nn.Module, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``[{"name", "start", "stop"}]``: where each parameter sits in the flat vector (``order``, default
    ``named_parameters`` order).
    """
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    groups, start = [], 0
    for name in order or list(sizes):
        groups.append({"name": name, "start": start, "stop": start + sizes[name]})
        start += sizes[name]
    return groups


def dense_loss_hessian(
    model: nn.Module, loss_fn: Callable, tokens: Tensor, targets: Tensor, params: Sequence[str] | None = None,
    *, max_vectors: int = 512,
) -> Tensor:
    """The dense loss Hessian over ``params`` (all parameters by default), by Hessian-vector products of the
    identity (:meth:`energy.hessian.operators.HessianOperator.dense`, column chunks of ``max_vectors``).
    """
    op = HessianOperator(model, loss_fn, params, [(tokens, targets)], reduction="mean", max_vectors=max_vectors)
    return op.dense()


def max_pool(A: Tensor, k: int) -> Tensor:
    """Max over ``k × k`` tiles (the last partial tile included), to draw a large matrix at screen resolution."""
    if k <= 1:
        return A.clone()
    m, n = A.shape
    pad = A.new_full((math.ceil(m / k) * k, math.ceil(n / k) * k), -math.inf)
    pad[:m, :n] = A
    return pad.reshape(pad.shape[0] // k, k, pad.shape[1] // k, k).amax(dim=(1, 3))


def log_histogram(values: Tensor, edges: np.ndarray) -> dict[str, Any]:
    """Counts of ``|values|`` in the log-spaced bins ``edges``; exact zeros are counted separately.

    Returns:
        ``{"counts", "zeros", "below", "above", "median", "n"}`` (``median`` of ``|values|``, zeros included).
    """
    a = values.abs().reshape(-1).double().numpy()
    pos = a[a > 0]
    counts, _ = np.histogram(pos, bins=edges)
    return {
        "counts": counts.tolist(),
        "zeros": int((a == 0).sum()),
        "below": int((pos < edges[0]).sum()),
        "above": int((pos > edges[-1]).sum()),
        "median": float(np.median(a)),
        "n": int(a.size),
    }


def _shared_log_edges(blocks: Sequence[Tensor], per_decade: int = 4) -> np.ndarray:
    nz = torch.cat([b.abs().reshape(-1) for b in blocks])
    nz = nz[nz > 0]
    lo, hi = math.floor(math.log10(float(nz.min()))), math.ceil(math.log10(float(nz.max())))
    return np.logspace(lo, hi, (hi - lo) * per_decade + 1)


def _block_histograms(H_blocks: dict[str, Tensor]) -> dict[str, Any]:
    edges = _shared_log_edges(list(H_blocks.values()))
    return {"edges": edges.tolist(), **{k: log_histogram(v, edges) for k, v in H_blocks.items()}}


def _ratio(hists: dict[str, Any]) -> float:
    return hists["V"]["median"] / hists["Q"]["median"]


def heterogeneity_config(d_model: int = 16, attention: Literal["softmax", "linear"] = "softmax") -> GPT2Config:
    """The model of Fig 1 (MATH §3.7): one block, ``d_model = d_head``, ``d_mlp = 4 d_model``, one head."""
    return GPT2Config(d_model=d_model, n_layers=1, d_head=d_model, d_mlp=4 * d_model, attention=attention)


def _attention_names(layer: int = 0) -> dict[str, str]:
    return {k: f"blocks.{layer}.attn.W_{k}" for k in ("Q", "K", "V", "O")}


