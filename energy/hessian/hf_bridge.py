r"""The closed-form block Hessian on a real Hugging Face GPT-2 layer (MATH §5.3; issue #11 item 4).

A GPT-2 block (``GPT2Block``) is the Pre-LN, causal block of :class:`energy.hessian.block.TransformerBlock` with

.. math::
    Z = X + \mathrm{MHA}(\mathrm{LN}_1 X) + b_O^\mathrm{eff},\qquad
    \mathrm{Out} = Z + \varphi(\mathrm{LN}_2(Z)\,W_1 + b_1)\,W_2 + b_2,

where every projection is a ``Conv1D`` (``y = x W + b``, ``W`` of shape ``(in, out)``), ``c_attn.weight`` ``(d, 3d)``
holds the columns ``[Q | K | V]`` (head ``h`` the columns ``h·d_h : (h+1)·d_h`` of each), ``c_proj.weight`` the rows
of the heads in the same order, the score scale is ``attn.scaling`` (``1/√d_h``, divided by ``layer + 1`` when
``scale_attn_by_inverse_layer_idx``) and ``φ`` is GELU in its tanh form (``gelu_new``).

What is closed form and what is operator-only
---------------------------------------------
:func:`block_from_gpt2` maps ``ln_1 → ln1``, ``attn.c_attn.weight``/``attn.c_proj.weight`` →
:meth:`~energy.hessian.multihead.MultiHeadAttentionLayer.from_fused`, ``ln_2 → ln2``, ``mlp.c_fc``/``mlp.c_proj``
(weights and biases) → :class:`~energy.hessian.ffn_curvature.FFNLayer`. The library's attention sublayer has no
biases, and the bridge treats GPT-2's four attention biases exactly as follows:

* **key bias** ``b_K`` (``c_attn.bias[d:2d]``): adds ``κ q_i·b_K`` to every score of row ``i``, a constant over the
  keys ``j``, which the softmax removes, for **every** parameter value. The block is the same function of all
  other parameters, so the closed form is exact whatever ``b_K`` is, and ``b_K``'s own Hessian rows are zero.
* **query bias** ``b_Q``: ``(q_i + b_Q)·k_j`` varies over ``j``; it changes the attention weights and all their
  derivatives. Not representable: operator-only.
* **value bias** ``b_V`` and **output bias** ``b_O`` (``c_proj.bias``): rows of the softmax sum to one, so they add
  the constant row ``b_O^\mathrm{eff} = b_O + Σ_h b_V^h W_O^h`` to the residual stream ``Z``. In a Pre-LN block
  ``Z`` is the input of ``LN_2`` and of the FFN, so this constant is **not** a shift of the block output and cannot
  be moved into ``b_2`` or the target (the tests measure the error of doing so); ``b_V`` also multiplies ``W_O``.
  Operator-only.

So the closed form equals the real layer exactly (output, ``H``, ``H_o``, ``H_f`` over every weight, LayerNorm and
MLP parameter) when ``b_Q = b_V = b_O = 0``; :class:`GPT2BridgeReport` lists the bias values and says whether that
holds. The curvature of the biases themselves, and of every parameter when they are nonzero, comes from the
matrix-free operators on :class:`GPT2BlockModule` (:mod:`energy.hessian.curvature_operators`).

``transformers`` is imported only inside the functions that need it (extra ``hf``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from energy._validation import EnergyInputError
from energy.hessian.attention_layer import Reduction
from energy.hessian.block import OutputLoss, TransformerBlock
from energy.hessian.ffn_curvature import FFNLayer
from energy.hessian.multihead import MultiHeadAttentionLayer
from energy.hessian.norm_curvature import NormLayer

__all__ = [
    "GPT2_ACTIVATIONS",
    "GPT2BridgeReport",
    "GPT2BlockModule",
    "capture_block_input",
    "block_from_gpt2",
    "gpt2_block_parameter_map",
    "gpt2_blocks",
]

#: GPT-2 ``activation_function`` -> the FFN activation of :class:`~energy.hessian.ffn_curvature.FFNLayer`.
GPT2_ACTIVATIONS: dict[str, str] = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                                    "relu": "relu"}

#: The HF parameters of a block, in the order of :func:`gpt2_block_parameter_map` (names relative to the block).
_CLOSED_FORM_NAMES = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight",
                      "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
_OPERATOR_ONLY_NAMES = ("attn.c_attn.bias", "attn.c_proj.bias")


# --------------------------------------------------------------------------------------------------------------
# Finding the blocks of a GPT-2 model (validation edge)
# --------------------------------------------------------------------------------------------------------------


def gpt2_blocks(model: object) -> nn.ModuleList:
    """The ``GPT2Block`` list ``h`` of a ``GPT2LMHeadModel`` (``model.transformer.h``) or ``GPT2Model``
    (``model.h``); :class:`~energy._validation.EnergyInputError` for anything else.
    """
    body = getattr(model, "transformer", model)
    h = getattr(body, "h", None)
    if not isinstance(model, nn.Module) or not isinstance(h, nn.ModuleList) or not all(
            type(b).__name__ == "GPT2Block" for b in h):
        raise EnergyInputError(f"`model` must be a Hugging Face GPT2LMHeadModel or GPT2Model (blocks in "
                               f"`transformer.h` / `h`), got {type(model).__name__}; build one with "
                               "energy.hessian.hf.build_model('gpt2-tiny').")
    return h


def _block_at(model: object, layer: object) -> Any:
    """Block ``layer`` of a GPT-2 model (``Any``: the ``transformers`` classes are untyped here)."""
    blocks = gpt2_blocks(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
        raise EnergyInputError(f"`layer` must be an integer in [0, {len(blocks)}) (the model's n_layer = "
                               f"{len(blocks)} blocks), got {layer!r}.")
    return blocks[layer]


# --------------------------------------------------------------------------------------------------------------
# The block's input
# --------------------------------------------------------------------------------------------------------------


def capture_block_input(model: nn.Module, input_ids: Tensor, layer: int = 0) -> Tensor:
    """The hidden states entering block ``layer`` of an HF GPT-2 for ``input_ids``, float64 ``(B, L, d)``.

    Runs the model once (no gradients) with a forward pre-hook on ``h[layer]`` that records its input: the token
    plus position embeddings for ``layer = 0``, else the output of block ``layer − 1``. The model should be in eval
    mode (dropout would make the captured states random) and float64 (a float32 model's states are only upcast).

    Args:
        model: a ``GPT2LMHeadModel`` or ``GPT2Model``.
        input_ids: token ids ``(L,)`` or ``(B, L)`` in ``[0, vocab_size)``, ``L ≤ n_positions``.
        layer: the block index.

    Returns:
        ``X`` ``(B, L, d)``, detached, float64.
    """
    block = _block_at(model, layer)
    cfg: Any = model.config
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32) or \
            input_ids.ndim not in (1, 2) or input_ids.numel() == 0:
        got = f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}"
        raise EnergyInputError(f"`input_ids` must be a non-empty integer tensor of shape (L,) or (B, L), got {got}.")
    ids = input_ids.long().reshape(-1, input_ids.shape[-1])
    if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
        raise EnergyInputError(f"`input_ids` must lie in [0, {cfg.vocab_size}) (the vocabulary), got values in "
                               f"[{int(ids.min())}, {int(ids.max())}].")
    if ids.shape[1] > cfg.n_positions:
        raise EnergyInputError(f"`input_ids` has length {ids.shape[1]} > n_positions = {cfg.n_positions}; pass at "
                               f"most {cfg.n_positions} tokens per sequence.")
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(args[0] if args else kwargs["hidden_states"])

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0].detach().to(torch.float64).clone()


# --------------------------------------------------------------------------------------------------------------
# The HF block as a module of its hidden states (for the matrix-free operators)
# --------------------------------------------------------------------------------------------------------------


def _causal_mask(L: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """GPT-2's additive causal mask ``(1, 1, L, L)``: 0 where ``j ≤ i``, the dtype's most negative value elsewhere
    (``exp`` of it underflows to an exact 0, as with a boolean mask).
    """
    keep = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    neg = torch.full((L, L), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(keep, torch.zeros((), dtype=dtype, device=device), neg)[None, None]


class GPT2BlockModule(nn.Module):
    """``X ↦ GPT2Block(X)``: one HF GPT-2 block as a module of the hidden states entering it, causal.

    The block's sub-modules are registered on the wrapper, so its parameter names are the block's own
    (``ln_1.weight``, ``attn.c_attn.weight``, …) and ``torch.func.functional_call`` replaces the block's tensors.
    Each forward pass runs inside :func:`energy.hessian.hf.eager_attention` (forward-mode derivatives) with the
    additive causal mask GPT-2 builds for a sequence without padding.

    Args:
        model: the ``GPT2LMHeadModel`` / ``GPT2Model`` holding the block.
        layer: the block index.
    """

    _model: nn.Module
    _block: Any

    def __init__(self, model: nn.Module, layer: int = 0) -> None:
        super().__init__()
        block = _block_at(model, layer)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_block", block)
        for name, child in block.named_children():
            self.add_module(name, child)
        self.train(block.training)

    def forward(self, X: Tensor) -> Tensor:
        """The block's output hidden states ``(B, L, d)`` for inputs ``X`` ``(B, L, d)``."""
        from energy.hessian.hf import eager_attention

        mask = _causal_mask(X.shape[-2], X.dtype, X.device)
        with eager_attention(self._model):
            out: Tensor = self._block(X, attention_mask=mask)
        return out


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPT2BridgeReport:
    """What :func:`block_from_gpt2` could and could not put into the closed form.

    Attributes:
        layer: the block index.
        closed_form: ``(HF parameter, block parameters)`` pairs (names relative to the HF block).
        operator_only: HF parameters outside the closed form (the attention biases), with why.
        biases: the attention biases by role: ``"b_Q"``, ``"b_K"``, ``"b_V"`` (the thirds of ``c_attn.bias``) and
            ``"b_O"`` (``c_proj.bias``), detached float64 copies.
        bias_max_abs: ``max |b|`` of each.
        exact: ``True`` when ``b_Q``, ``b_V`` and ``b_O`` are all zero: then the closed form is the real layer (the
            key bias never matters, module docstring).
        notes: one line per caveat (nonzero biases with their effect, float32 reordering, the loss).
    """

    layer: int
    closed_form: tuple[tuple[str, str], ...]
    operator_only: tuple[tuple[str, str], ...]
    biases: dict[str, Tensor] = field(repr=False)
    bias_max_abs: dict[str, float]
    exact: bool
    notes: tuple[str, ...]

    def summary(self) -> str:
        """A readable multi-line account."""
        lines = [f"GPT-2 block {self.layer}: closed form {'EXACT' if self.exact else 'NOT exact'} for this layer."]
        lines += [f"  closed form   {hf:22s} -> {ours}" for hf, ours in self.closed_form]
        lines += [f"  operator-only {hf:22s}: {why}" for hf, why in self.operator_only]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _report(layer: int, d: int, b_qkv: Tensor, b_O: Tensor, loss: str, upcast: bool) -> GPT2BridgeReport:
    biases = {"b_Q": b_qkv[:d], "b_K": b_qkv[d:2 * d], "b_V": b_qkv[2 * d:], "b_O": b_O}
    biases = {k: v.detach().to(torch.float64).clone() for k, v in biases.items()}
    max_abs = {k: float(v.abs().max()) for k, v in biases.items()}
    blocking = [k for k in ("b_Q", "b_V", "b_O") if max_abs[k] != 0.0]
    notes = []
    if max_abs["b_K"] != 0.0:
        notes.append(f"b_K is nonzero (max |b_K| = {max_abs['b_K']:.3g}) but exact: it shifts each score row by a "
                     "constant, which the softmax removes; its Hessian rows are zero.")
    if "b_Q" in blocking:
        notes.append(f"b_Q is nonzero (max |b_Q| = {max_abs['b_Q']:.3g}): it changes the attention weights; the "
                     "closed form is the layer with b_Q = 0, NOT this layer. Use the operators on GPT2BlockModule.")
    if "b_V" in blocking or "b_O" in blocking:
        notes.append(f"b_V / b_O are nonzero (max |b_V| = {max_abs['b_V']:.3g}, max |b_O| = {max_abs['b_O']:.3g}): "
                     "they add the constant row b_O + Σ_h b_V^h W_O^h to the residual stream before ln_2, which the "
                     "closed form lacks (not absorbable into the FFN bias or the target in a Pre-LN block); the "
                     "closed form is the layer with them zero, NOT this layer. Use the operators on GPT2BlockModule.")
    if upcast:
        notes.append("config.reorder_and_upcast_attn: the real eager layer takes its scores in float32; the closed "
                     "form (and GPT2BlockModule) compute them in the parameters' dtype.")
    if loss == "ce":
        notes.append("loss='ce' scores Out·W_U directly: the final LayerNorm ln_f and any later blocks are not part "
                     "of the closed-form loss.")
    why_qkv = ("Q/K/V biases: b_Q and b_V have no closed form (b_K is exactly irrelevant); curvature by the "
               "matrix-free operators")
    why_o = "output bias: shifts the residual stream before ln_2; curvature by the matrix-free operators"
    closed = (("ln_1.weight", "ln1.gamma"), ("ln_1.bias", "ln1.beta"),
              ("attn.c_attn.weight", "attn.h*.Q | attn.kv*.K | attn.kv*.V (column thirds, heads of d_head columns)"),
              ("attn.c_proj.weight", "attn.h*.O (rows of d_head per head)"), ("ln_2.weight", "ln2.gamma"),
              ("ln_2.bias", "ln2.beta"), ("mlp.c_fc.weight", "ffn.W_1"), ("mlp.c_fc.bias", "ffn.b_1"),
              ("mlp.c_proj.weight", "ffn.W_2"), ("mlp.c_proj.bias", "ffn.b_2"))
    return GPT2BridgeReport(layer, closed, (("attn.c_attn.bias", why_qkv), ("attn.c_proj.bias", why_o)), biases,
                            max_abs, not blocking, tuple(notes))


# --------------------------------------------------------------------------------------------------------------
# The bridge
# --------------------------------------------------------------------------------------------------------------


def block_from_gpt2(model: nn.Module, layer: int = 0, *, loss: OutputLoss = "mse", W_U: Tensor | None = None,
                    c: float | None = None, reduction: Reduction = "sum",
                    dtype: torch.dtype = torch.float64) -> tuple[TransformerBlock, GPT2BridgeReport]:
    r"""The library's closed-form :class:`~energy.hessian.block.TransformerBlock` of GPT-2 block ``layer``.

    .. math::
        W_Q^h = W_\mathrm{attn}[:, h d_h : (h+1) d_h],\quad W_K^h = W_\mathrm{attn}[:, d + h d_h : \cdot],\quad
        W_V^h = W_\mathrm{attn}[:, 2d + h d_h : \cdot],\quad W_O^h = W_\mathrm{proj}[h d_h : (h+1) d_h, :]

    (Conv1D weights are ``(in, out)``: no transpose), ``κ`` = ``attn.scaling``, Pre-LN, causal, the LayerNorms'
    ``eps``, ``FFN(u) = φ(u W_fc + b_fc) W_mproj + b_mproj``. The attention biases are left out and reported
    (module docstring): the block is the real layer exactly when ``report.exact``.

    Args:
        model: a ``GPT2LMHeadModel`` or ``GPT2Model``.
        layer: the block index.
        loss: ``"mse"`` (square loss on the block output, or on ``Out W_U`` when ``W_U`` is given) or ``"ce"``
            (cross-entropy of ``Out W_U``; ``W_U`` defaults to ``lm_head.weight.T``).
        W_U: optional unembedding ``(d, V)``.
        c: the block's loss constant (:class:`TransformerBlock`; default ``1/(L d_z)`` or ``1/L``).
        reduction: ``"sum"`` or ``"mean"`` over sequences (:class:`TransformerBlock`).
        dtype: the block's dtype (float64 for verification).

    Returns:
        ``(block, report)``.
    """
    hf_block = _block_at(model, layer)
    cfg: Any = model.config
    if getattr(cfg, "add_cross_attention", False):
        raise EnergyInputError("`model` has cross-attention blocks (config.add_cross_attention=True); the bridge "
                               "covers GPT-2 self-attention blocks only.")
    act = getattr(cfg, "activation_function", None)
    if act not in GPT2_ACTIVATIONS:
        raise EnergyInputError(f"config.activation_function must be one of {sorted(GPT2_ACTIVATIONS)} (closed-form "
                               f"FFN activations), got {act!r}.")
    if loss not in ("mse", "ce"):
        raise EnergyInputError(f"`loss` must be 'mse' or 'ce', got {loss!r}.")
    if loss == "ce" and W_U is None:
        head = getattr(model, "lm_head", None)
        if head is None:
            raise EnergyInputError("loss='ce' needs an unembedding: pass `W_U` (d, V) or a GPT2LMHeadModel (its "
                                   "lm_head.weight.T is used).")
        W_U = head.weight.T
    attn = hf_block.attn

    def t(x: Tensor) -> Tensor:
        return x.detach().to(dtype).clone()

    scale = float(attn.scaling)
    mha = MultiHeadAttentionLayer.from_fused(t(attn.c_attn.weight), t(attn.c_proj.weight), int(attn.num_heads),
                                             scale=scale, causal=True)
    ln1, ln2 = (NormLayer(t(ln.weight), t(ln.bias), float(ln.eps), "layer") for ln in (hf_block.ln_1, hf_block.ln_2))
    mlp = hf_block.mlp
    ffn = FFNLayer(t(mlp.c_fc.weight), t(mlp.c_fc.bias), t(mlp.c_proj.weight), t(mlp.c_proj.bias),
                   GPT2_ACTIVATIONS[act])
    block = TransformerBlock(mha, ffn, ln1, ln2, "pre", None if W_U is None else t(W_U), loss, c, reduction)
    report = _report(layer, int(attn.embed_dim), attn.c_attn.bias, attn.c_proj.bias, loss,
                     bool(getattr(cfg, "reorder_and_upcast_attn", False)))
    return block, report


def gpt2_block_parameter_map(block: TransformerBlock, *, prefix: str = "",
                             unembedding: str = "lm_head.weight") -> tuple[tuple[str, ...], Tensor]:
    r"""The HF parameter names of a GPT-2 block and the index that puts their flat vector in the block's order.

    With ``θ_HF`` the concatenated ``vec_r`` of the returned names (in that order; ``Conv1D`` weights ``(in, out)``)
    and ``index`` the returned ``(p,)`` long tensor,

    .. math:: \theta_\mathrm{block} = \theta_\mathrm{HF}[\mathrm{index}], \qquad
              H_\mathrm{block} = H_\mathrm{HF}[\mathrm{index}][:, \mathrm{index}],

    ``θ_block`` = :meth:`TransformerBlock.flat` (type-major heads ``h{h}.Q, …, kv{g}.K, …, kv{g}.V, …, h{h}.O``,
    then ``ln1``, ``ln2``, ``ffn``, and ``W_U`` = ``lm_head.weight``ᵀ when the block has one). The attention
    biases are not in the list (operator-only). The index is built by applying the slicing of
    :meth:`~energy.hessian.multihead.MultiHeadAttentionLayer.from_fused` to the positions of the entries.

    Args:
        block: a block from :func:`block_from_gpt2`.
        prefix: prepended to every block parameter's name (e.g. ``"transformer.h.0."`` for the whole model).
        unembedding: the name of the ``(V, d)`` unembedding weight whose transpose is ``W_U`` (not prefixed; used
            only when the block has ``W_U``).

    Returns:
        ``(names, index)``.
    """
    if not isinstance(block, TransformerBlock) or block.norm != "pre" or \
            block.ln1 is None or block.ln2 is None or block.ln1.beta is None or block.ffn.b_1 is None or \
            block.ffn.b_2 is None or block.attention.n_kv_heads != block.attention.n_heads:
        raise EnergyInputError("`block` must be a GPT-2 block from block_from_gpt2 (Pre-LN, LayerNorm with bias, "
                               "FFN biases, as many K/V heads as heads).")
    mha = block.attention
    d, H, dh, d_ff = mha.d, mha.n_heads, mha.d_k, block.ffn.d_ff
    shapes = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d),
              "attn.c_proj.weight": (d, d), "ln_2.weight": (d,), "ln_2.bias": (d,), "mlp.c_fc.weight": (d, d_ff),
              "mlp.c_fc.bias": (d_ff,), "mlp.c_proj.weight": (d_ff, d), "mlp.c_proj.bias": (d,)}
    pos, start, device = {}, 0, mha.W_Q.device
    for name in _CLOSED_FORM_NAMES:
        n = math.prod(shapes[name])
        pos[name] = torch.arange(start, start + n, device=device).reshape(shapes[name])
        start += n
    qkv = pos["attn.c_attn.weight"]
    Q, K, V = (qkv[:, i * d:(i + 1) * d].reshape(d, H, dh).transpose(0, 1) for i in range(3))
    O_ = pos["attn.c_proj.weight"].reshape(H, dh, d)
    order: Sequence[Tensor] = (Q, K, V, O_, pos["ln_1.weight"], pos["ln_1.bias"], pos["ln_2.weight"],
                               pos["ln_2.bias"], pos["mlp.c_fc.weight"], pos["mlp.c_fc.bias"],
                               pos["mlp.c_proj.weight"], pos["mlp.c_proj.bias"])
    names = tuple(prefix + n for n in _CLOSED_FORM_NAMES)
    if block.W_U is not None:  # W_U[i, v] = lm_head.weight[v, i]
        d_z = block.d_z
        order = (*order, torch.arange(start, start + d_z * d, device=device).reshape(d_z, d).T)
        names = (*names, unembedding)
    index = torch.cat([p.reshape(-1) for p in order])
    return names, index
