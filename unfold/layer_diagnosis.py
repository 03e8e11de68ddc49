r"""Real attention layers and blocks read as right-acting weights plus the structure no energy step has (MATH §1.7).

:func:`unfold.converters.check_layer` measures the weight constraints of MATH §1.7 on
:class:`~unfold.layer_weights.AttentionWeights`; this module turns the layers people use into those weights and
lists, measured, what else separates them from an energy step:

* ``nn.MultiheadAttention``, :class:`AttentionWeights`, a dict of reference weights (as before);
* :class:`energy.hessian.multihead.MultiHeadAttentionLayer` (the library's own multi-head value object; grouped
  K/V expanded per query head, ``d_v ≠ k`` padded with zero columns, which leaves the products unchanged);
* ``nn.TransformerEncoderLayer``: its ``self_attn`` plus the block (:func:`block_findings`);
* Hugging Face ``GPT2Attention`` (fused ``Conv1D`` ``c_attn`` ``(d, 3d)`` split into Q/K/V per head with
  :meth:`MultiHeadAttentionLayer.from_fused`) and ``GPT2Block``; LLaMA/Mistral-style attention (``q_proj``,
  ``k_proj``, ``v_proj``, ``o_proj``, rotary position embedding, grouped-query attention).

Structure that no weight change removes: a **causal mask** (the step of a symmetric pairwise energy
``Σ_{i<j} ρ(½‖y_i − y_j‖²_W)`` mixes every pair both ways, MATH §1.1), **RoPE** (the logits
:math:`q_i^\top R_{j-i} k_j` depend on positions, so they are no function of the token contents, let alone a
pairwise energy of them), linear attention, a fixed mask. Block structure: where the normalisation sits (Pre-LN
reads :math:`\mathrm{LN}(Y)`, so the update is no gradient step at :math:`Y`; Post-LN is a projected step,
MATH §1.4), the skip map (the block adds :math:`Y` with weight :math:`I`, the step's skip is
:math:`R = I - \alpha\sum_h V_h`, MATH §1.5) and the FFN (the library's FFN energy step is
:class:`energy.ffn.TiedReLUEnergy`: :math:`Y^+ = Y + \mathrm{ReLU}(Y W_1 + b_1)\,\alpha W_1^\top`, MATH §1.3, so
it needs ReLU, :math:`W_2 = \alpha W_1^\top` with :math:`\alpha > 0` and no output bias); dropout only in eval mode.

``transformers`` is never imported here: its modules are recognised by their attributes.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from energy._validation import EnergyInputError
from energy.hessian.multihead import MultiHeadAttentionLayer
from unfold.layer_weights import AttentionWeights, from_mha

__all__ = ["Diagnosis", "SUPPORTED", "diagnose", "block_findings", "probe_input", "PROBE"]

#: The types :func:`diagnose` accepts, as named in its error message.
SUPPORTED = ("nn.MultiheadAttention", "unfold.layer_weights.AttentionWeights", "dict of reference weights",
             "energy.hessian.multihead.MultiHeadAttentionLayer", "nn.TransformerEncoderLayer",
             "transformers GPT2Attention", "transformers GPT2Block",
             "transformers LLaMA/Mistral-style attention (q_proj, k_proj, v_proj, o_proj)")

#: The seeded probe input of the measured sizes: ``(batch, tokens, seed)``, tokens ``N(0, 1)`` in the layer's dtype.
PROBE = (2, 8, 0)


def probe_input(d: int, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """The seeded input ``Y ~ N(0, 1)`` of shape ``(2, 8, d)`` (generator seed 0) on which sizes are measured.

    Drawn on the CPU (so a seed gives the same input on every device) and moved to ``device`` (default: the CPU).
    """
    B, n, seed = PROBE
    return torch.randn(B, n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def probe_text(d: int) -> str:
    """How :func:`probe_input` is drawn, for messages."""
    B, n, seed = PROBE
    return f"Y ~ N(0, 1) of shape ({B}, {n}, {d}), torch.Generator seed {seed}"


@dataclass
class Diagnosis:
    """A layer read as attention weights plus its structural findings.

    Attributes:
        weights: the attention's right-acting weights (per query head; grouped K/V expanded).
        kind: the layer type, in words.
        causal: the attention is causal (by construction or as asked).
        tol: the relative tolerance of the checks.
        failures: violated constraints that are not attention weight products, each with its size.
        notes: facts that are not failures (e.g. grouped-query attention, Post-LN as a projection).
        measures: the numbers behind them.
        no_nearest: reasons why no constrained layer exists (empty: the attention part can be constrained).
    """

    weights: AttentionWeights
    kind: str
    causal: bool
    tol: float
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measures: dict[str, Any] = field(default_factory=dict)
    no_nearest: list[str] = field(default_factory=list)


def _rel(num: Tensor, den: Tensor) -> float:
    return float(num.norm() / den.norm().clamp_min(1e-300))


def _is_gpt2_attention(m: Any) -> bool:
    return isinstance(m, nn.Module) and hasattr(m, "c_attn") and hasattr(m, "c_proj") and hasattr(m, "num_heads")


def _is_gpt2_block(m: Any) -> bool:
    return isinstance(m, nn.Module) and all(hasattr(m, a) for a in ("ln_1", "attn", "ln_2", "mlp"))


def _is_llama_attention(m: Any) -> bool:
    return isinstance(m, nn.Module) and all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "head_dim"))


def diagnose(layer: Any, *, causal: bool = False, rtol: float | None = None) -> Diagnosis:
    """Read ``layer`` (one of :data:`SUPPORTED`) as attention weights plus structural findings.

    Args:
        layer: the layer.
        causal: the layer is applied with a causal mask (layers causal by construction are causal regardless).
        rtol: relative tolerance (default ``1e3·eps`` of the weights' dtype).

    Raises:
        EnergyInputError: an unsupported object (the message lists the supported types), cross-attention.
    """
    if isinstance(layer, (AttentionWeights, nn.MultiheadAttention, dict)):
        w = AttentionWeights.of(layer)
        return _new(w, "nn.MultiheadAttention" if isinstance(layer, nn.MultiheadAttention) else
                    type(layer).__name__, causal, rtol, "causal=True")
    if isinstance(layer, MultiHeadAttentionLayer):
        return _multihead(layer, causal, rtol)
    if isinstance(layer, nn.TransformerEncoderLayer):
        d = _new(from_mha(layer.self_attn), "nn.TransformerEncoderLayer", causal, rtol, "causal=True")
        lin1, lin2 = layer.linear1, layer.linear2
        act = layer.activation
        block_findings(d, norm_first=layer.norm_first, norms={"norm1": layer.norm1, "norm2": layer.norm2},
                       W_1=lin1.weight.detach().T, b_1=_b(lin1.bias), W_2=lin2.weight.detach().T, b_2=_b(lin2.bias),
                       activation=act, dropouts={"self_attn.dropout": layer.self_attn.dropout,
                                                 "dropout": layer.dropout.p, "dropout1": layer.dropout1.p,
                                                 "dropout2": layer.dropout2.p}, training=layer.training)
        return d
    if _is_gpt2_block(layer) and _is_gpt2_attention(layer.attn):
        d = _gpt2_attention(layer.attn, rtol, "GPT2Block")
        mlp = layer.mlp
        block_findings(d, norm_first=True, norms={"ln_1": layer.ln_1, "ln_2": layer.ln_2},
                       W_1=mlp.c_fc.weight.detach(), b_1=_b(mlp.c_fc.bias), W_2=mlp.c_proj.weight.detach(),
                       b_2=_b(mlp.c_proj.bias), activation=mlp.act,
                       dropouts={"attn.attn_dropout": layer.attn.attn_dropout.p,
                                 "attn.resid_dropout": layer.attn.resid_dropout.p, "mlp.dropout": mlp.dropout.p},
                       training=layer.training)
        return d
    if _is_gpt2_attention(layer):
        return _gpt2_attention(layer, rtol, type(layer).__name__)
    if _is_llama_attention(layer):
        return _llama_attention(layer, rtol)
    raise EnergyInputError(
        f"`layer` of type {type(layer).__name__} is not supported; check_layer accepts: {', '.join(SUPPORTED)}."
        + (f" Its attention sublayer `{a}` may be one of these." if (a := _attention_child(layer)) else "")
    )


def _attention_child(layer: Any) -> str:
    for name in ("self_attn", "attn", "attention"):
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    return ""


def _b(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.detach()


def _new(w: AttentionWeights, kind: str, causal: bool, rtol: float | None, why: str) -> Diagnosis:
    tol = 1e3 * torch.finfo(w.W_Q.dtype).eps if rtol is None else float(rtol)
    d = Diagnosis(w, kind, bool(causal), tol)
    if causal:
        d.measures["causal_source"] = why
        d.no_nearest.append(f"causal mask ({why}): no step of a symmetric pairwise energy is causal")
    return d


def _weights_of(mh: MultiHeadAttentionLayer) -> tuple[AttentionWeights, int]:
    """Per-query-head weights of ``mh`` (grouped K/V repeated, widths padded to ``max(k, d_v)``) and the group size."""
    g = mh.group_size
    W_K, W_V = mh.W_K.repeat_interleave(g, 0), mh.W_V.repeat_interleave(g, 0)
    H, d, k = mh.W_Q.shape
    d_v, d_out = mh.W_V.shape[2], mh.W_O.shape[2]
    if d_out != d:
        raise EnergyInputError(f"the layer maps width d = {d} to d_out = {d_out}; an energy step maps the tokens to "
                               "themselves (d_out = d). Use a square output projection.")
    r = max(k, d_v)

    def flat(A: Tensor) -> Tensor:  # (H, d, c ≤ r) -> zero-padded (d, H·r)
        return torch.cat([A, A.new_zeros(H, d, r - A.shape[2])], dim=2).permute(1, 0, 2).reshape(d, H * r)

    W_O = torch.cat([mh.W_O, mh.W_O.new_zeros(H, r - d_v, d)], dim=1).reshape(H * r, d)
    scale = float(mh.scale) if mh.scale is not None else 1.0 / math.sqrt(k)
    return AttentionWeights(flat(mh.W_Q.detach()), flat(W_K.detach()), flat(W_V.detach()), W_O.detach(), H,
                            scale=scale), g


def _gqa(d: Diagnosis, mh: MultiHeadAttentionLayer) -> None:
    d.measures["n_heads"], d.measures["n_kv_heads"] = mh.n_heads, mh.n_kv_heads
    if mh.group_size > 1:
        d.notes.append(
            f"grouped-query attention ({mh.n_kv_heads} K/V heads for {mh.n_heads} query heads, groups of "
            f"{mh.group_size}): the tying itself breaks no constraint; only the per-head products "
            "W_Q^h W_K^{g(h)ᵀ} and W_V^{g(h)} W_O^h matter (checked per query head). A constrained GQA layer exists "
            "(W_Q^h = W_K^g C_h with C_h symmetric PSD); the heads of a group then share range(W_K^g).")


def _multihead(mh: MultiHeadAttentionLayer, causal: bool, rtol: float | None) -> Diagnosis:
    w, _ = _weights_of(mh)
    d = _new(w, "MultiHeadAttentionLayer", causal or mh.causal, rtol,
             "MultiHeadAttentionLayer(causal=True)" if mh.causal else "causal=True")
    _gqa(d, mh)
    if mh.linear:
        d.failures.append("linear attention (linear=True): its weights are not normalised Gaussian kernels; no "
                          "softmax attention energy (MATH §1.1) has this step")
        d.no_nearest.append("linear attention")
    if mh.mask is not None:
        kept = float(mh.mask.to(torch.float64).mean())
        d.measures["mask_fraction_kept"] = kept
        d.failures.append(f"a fixed attention mask ({kept:.3g} of the pairs kept): the energy's step mixes every "
                          "pair of tokens; remove the mask")
        d.no_nearest.append("fixed attention mask")
    return d


def _gpt2_attention(m: Any, rtol: float | None, kind: str) -> Diagnosis:
    if getattr(m, "is_cross_attention", False):
        raise EnergyInputError("`layer` is a cross-attention GPT2Attention (is_cross_attention=True); an energy step "
                               "is self-attention. Pass a self-attention layer.")
    c_attn: Any = m.c_attn
    c_proj: Any = m.c_proj
    mh = MultiHeadAttentionLayer.from_fused(c_attn.weight.detach(), c_proj.weight.detach(), int(m.num_heads),
                                            scale=float(m.scaling), causal=True)
    w, _ = _weights_of(mh)
    if c_attn.bias is not None:
        w.b_Q, w.b_K, w.b_V = (b.detach() for b in c_attn.bias.chunk(3))
    w.b_O = _b(c_proj.bias)
    d = _new(w, kind, True, rtol, "GPT-2 attention is causal by construction")
    d.measures["scale"] = float(m.scaling)
    if getattr(m, "scale_attn_by_inverse_layer_idx", False):
        d.notes.append(f"scale_attn_by_inverse_layer_idx: logits scaled by κ = {float(m.scaling):.4g} (not "
                       "1/√d_head); the energy absorbs it (W_h = κ M_h M_hᵀ)")
    return d


def _llama_attention(m: Any, rtol: float | None) -> Diagnosis:
    q: Any = m.q_proj
    k: Any = m.k_proj
    v: Any = m.v_proj
    o: Any = m.o_proj
    dh = int(m.head_dim)
    d_model = q.weight.shape[1]

    def heads(W: Tensor) -> Tensor:  # nn.Linear weight (H·dh, d) -> right acting (H, d, dh)
        return W.detach().T.reshape(d_model, -1, dh).transpose(0, 1)

    W_O = o.weight.detach().T.reshape(-1, dh, o.weight.shape[0])
    mh = MultiHeadAttentionLayer(heads(q.weight), heads(k.weight), heads(v.weight), W_O, scale=float(m.scaling),
                                 causal=True)
    w, g = _weights_of(mh)
    if q.bias is not None:
        w.b_Q = q.bias.detach()
        w.b_K = k.bias.detach().reshape(-1, dh).repeat_interleave(g, 0).reshape(-1)
        w.b_V = v.bias.detach().reshape(-1, dh).repeat_interleave(g, 0).reshape(-1)
    w.b_O = _b(o.bias)
    kind = type(m).__name__
    d = _new(w, kind, True, rtol, f"{kind} is causal by construction")
    _gqa(d, mh)
    size = _rope_size(m, mh)
    d.measures["rope_logit_change"] = size
    how = "not measured (no rotary embedding found next to the class)" if size is None else \
        f"it changes the logits by ‖S_RoPE − S‖/‖S‖ = {size:.3g} on {probe_text(d_model)}"
    d.failures.append("rotary position embedding (RoPE): the logits q_iᵀ R_{j−i} k_j depend on the positions through "
                      "a position-dependent rotation, so they are no pairwise energy of the token contents; " + how)
    d.no_nearest.append("RoPE (position-dependent rotation)")
    window = getattr(getattr(m, "config", None), "sliding_window", None)
    if window is not None:
        d.failures.append(f"sliding-window mask (window {window}): the energy's step mixes every pair of tokens")
        d.measures["sliding_window"] = window
    return d


def _rope_size(m: Any, mh: MultiHeadAttentionLayer) -> float | None:
    """``‖S_RoPE − S‖/‖S‖`` of the query–key logits on :func:`probe_input`, RoPE from the module's own package."""
    mod = sys.modules.get(type(m).__module__)
    prefix = type(m).__name__.removesuffix("Attention")
    rotary = getattr(mod, f"{prefix}RotaryEmbedding", None)
    apply = getattr(mod, "apply_rotary_pos_emb", None)
    if rotary is None or apply is None:
        return None
    Y = probe_input(mh.d, mh.W_Q.dtype, mh.W_Q.device)
    Qh = torch.einsum("bnd,hdk->bhnk", Y, mh.W_Q.detach())
    Kh = torch.einsum("bnd,hdk->bhnk", Y, mh.W_K.detach().repeat_interleave(mh.group_size, 0))
    pos = torch.arange(Y.shape[1], device=Y.device).unsqueeze(0).expand(Y.shape[0], -1)
    try:  # the rotary class and function of the module's own transformers package (signatures vary by version)
        with torch.no_grad():
            cos, sin = rotary(config=m.config).to(Y.dtype)(Y, pos)
            Qr, Kr = apply(Qh, Kh, cos.to(Y.dtype), sin.to(Y.dtype))
    except (TypeError, AttributeError, ValueError):
        return None
    S, Sr = Qh @ Kh.transpose(-1, -2), Qr @ Kr.transpose(-1, -2)
    return _rel(Sr - S, S)


# --------------------------------------------------------------------------------------------------- the block


def _act_name(act: Any) -> str:
    return str(getattr(act, "__name__", type(act).__name__))


def _is_relu(act: Any) -> bool:
    return isinstance(act, nn.ReLU) or act is F.relu or act is torch.relu


def block_findings(d: Diagnosis, *, norm_first: bool, norms: dict[str, nn.Module], W_1: Tensor, b_1: Tensor | None,
                   W_2: Tensor, b_2: Tensor | None, activation: Any, dropouts: dict[str, float],
                   training: bool) -> None:
    r"""Add the block's findings to ``d``: normalisation placement, skip map, FFN, dropout (module docstring).

    ``W_1`` ``(d, m)``, ``W_2`` ``(m, d)`` act on the right (``FFN(y) = σ(y W_1 + b_1) W_2 + b_2``). Measured:
    the skip mismatch :math:`\|\sum_h W_V^h W_O^h\|_F/\|I\|_F` (the block adds :math:`Y`, the step
    :math:`Y R` with :math:`R = I - \sum_h W_V^h W_O^h`), the FFN tie
    :math:`\|W_2 - \alpha_f W_1^\top\|_F/\|W_2\|_F` with the least-squares :math:`\alpha_f`, bias and affine norms.
    """
    tol, w, m = d.tol, d.weights, d.measures
    placement = "Pre-LN" if norm_first else "Post-LN"
    m["norm_placement"] = placement
    if norm_first:
        d.failures.append("Pre-LN (normalisation before each sublayer): attention and FFN read LN(Y) and their "
                          "output is added to Y, so the update is no gradient step of an energy at Y (a Post-LN "
                          "block is a projected step, MATH §1.4)")
    else:
        d.notes.append("Post-LN: the normalisation after each residual sum is a projection onto a sphere (MATH "
                       "§1.4): a projected step, with no general descent guarantee (the set is not convex)")
    for name, ln in norms.items():
        gamma, beta = getattr(ln, "weight", None), getattr(ln, "bias", None)
        dev = 0.0 if gamma is None else float((gamma.detach() - 1).norm() / math.sqrt(gamma.numel()))
        bn = 0.0 if beta is None else float(beta.detach().norm())
        m[f"{name}_affine"] = {"rms(γ − 1)": dev, "‖b‖": bn}
        if dev > tol or bn > tol:
            d.failures.append(f"{name}: affine LayerNorm (rms(γ − 1) = {dev:.3g}, ‖b‖ = {bn:.3g}) is no projection "
                              "onto a sphere (MATH §1.4); use elementwise_affine=False or γ = 1, b = 0")
    skip = _rel(w.vo_products().sum(0), torch.eye(w.d, dtype=w.W_Q.dtype, device=w.W_Q.device))
    m["skip_mismatch"] = skip
    if skip > tol:
        d.failures.append(f"residual: the block adds Y with weight I, the step's skip map is R = I − Σ_h W_V^h W_O^h "
                          f"(MATH §1.5): ‖Σ_h W_V^h W_O^h‖/‖I‖ = {skip:.3g} (an energy block scales the skip path)")
    _ffn_findings(d, W_1.to(w.W_Q.dtype), b_1, W_2.to(w.W_Q.dtype), b_2, activation)
    active = {k: float(p) for k, p in dropouts.items() if float(p) > 0}
    m["dropout"] = active
    if active and training:
        d.failures.append(f"dropout active (training mode; p = {active}): a random map; call .eval()")
    elif active:
        d.notes.append(f"dropout p = {active} is inactive in eval mode (keep the layer in eval mode)")


def _ffn_findings(d: Diagnosis, W_1: Tensor, b_1: Tensor | None, W_2: Tensor, b_2: Tensor | None,
                  activation: Any) -> None:
    """FFN against the library's FFN energy step :class:`energy.ffn.TiedReLUEnergy` (MATH §1.3)."""
    tol, m = d.tol, d.measures
    name = _act_name(activation)
    m["ffn_activation"] = name
    if not _is_relu(activation):
        d.failures.append(f"FFN activation {name}: the library's FFN energy step (TiedReLUEnergy, MATH §1.3: "
                          "Y + ReLU(Y W_1 + b_1) α W_1ᵀ) needs ReLU")
    alpha = float((W_2 * W_1.T).sum() / (W_1 * W_1).sum().clamp_min(1e-300))
    tie = _rel(W_2 - alpha * W_1.T, W_2)
    m["ffn_alpha"], m["ffn_tie_distance"] = alpha, tie
    if tie > tol:
        d.failures.append(f"FFN weights not tied: ‖W_2 − α W_1ᵀ‖/‖W_2‖ = {tie:.3g} at the least-squares α = "
                          f"{alpha:.3g} (the FFN energy step needs W_2 = α W_1ᵀ, α > 0, MATH §1.3)")
    elif alpha <= 0:
        d.failures.append(f"FFN tied with α = {alpha:.3g} ≤ 0: an ascent step of the FFN energy (needs α > 0)")
    if b_2 is not None and float(b_2.abs().max()) > 0:
        m["ffn_b_2_norm"] = float(b_2.norm())
        d.failures.append(f"FFN output bias non-zero (‖b_2‖ = {float(b_2.norm()):.3g}); the FFN energy step has a "
                          "bias only inside the activation (b_1)")
