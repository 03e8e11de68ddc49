"""Standard (unconstrained) models: the GPT-2-style decoder of the Hessian experiments, an MLP baseline, and a
``torch.nn.TransformerEncoderLayer`` classifier for the constraint-cost comparison.

The decoder follows MATH §3.7 (Ormaniec et al. 2024): one head by default, ReLU MLP, causal attention with scale
``1/√d_head``, GPT-2 initialisation (normal, std ``0.8/√d_model``), no LayerNorm unless asked, optional linear
attention and a scaled (or removed) attention residual. Its attention, MLP and LayerNorm are the pure functions
of :mod:`energy.core` (no validation, no value read inside the forward: the token ids are checked by metadata), so
every ``torch.func`` transform — ``grad``, ``vjp``, ``jvp``, ``linearize``, ``vmap``, ``hessian``, and forward-mode
AD over ``grad`` as the Hessian tools use it — works through the whole model.

Parameter names are those a reader expects (weights act on the right, MATH §0):

- ``token_embedding.weight`` ``(vocab, d_model)``: token embedding ``E``;
- ``position_embedding.weight`` ``(seq_len, d_model)``: position embedding ``P``;
- ``blocks.{i}.attn.W_Q``, ``.W_K``, ``.W_V`` ``(d_model, h·d_head)`` (``Q = X W_Q``) and ``.W_O``
  ``(h·d_head, d_model)``: attention, no biases;
- ``blocks.{i}.mlp.W_1`` ``(d_model, d_mlp)``, ``.b_1`` ``(d_mlp,)``, ``.W_2`` ``(d_mlp, d_model)``, ``.b_2``
  ``(d_model,)``: ReLU MLP;
- ``blocks.{i}.ln_1``, ``blocks.{i}.ln_2``, ``ln_f`` (Pre-LN only): ``nn.LayerNorm`` before attention, MLP and
  unembedding;
- ``W_U`` ``(d_model, vocab)``, ``b_U`` ``(vocab,)``: unembedding, ``logits = X W_U + 1 b_Uᵀ``.

With ``d_model = d_head = 16``, ``d_mlp = 64``, one block and the addition vocabulary this gives the 3,836 parameters
of the paper's heat-map model (1,024 of them in ``W_Q, W_K, W_V, W_O``), MATH §3.7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from energy._validation import EnergyInputError, check_positive_int, check_tensor
from energy.core.ffn import feed_forward
from energy.core.norm import layer_norm
from energy.core.standard import multi_head_attention
from unfold.step_base import check_input_dtype

__all__ = [
    "GPT2Config",
    "GPT2Decoder",
    "SelfAttention",
    "MLP",
    "DecoderBlock",
    "MLPBaseline",
    "StandardEncoderClassifier",
    "standard_encoder",
]

_T = TypeVar("_T")




def _check_token_ids(tokens: object, seq_len: int) -> Tensor:
    """Metadata checks of token ids (type, dtype, rank, length): transform-safe, no value is read.

    The id range is checked by the embedding lookup itself (see :meth:`_TokenModel.embed`).
    """
    if not isinstance(tokens, Tensor) or tokens.dtype != torch.long or tokens.ndim < 1:
        got = f"dtype {tokens.dtype}, shape {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens)
        raise EnergyInputError(f"`tokens` must be a LongTensor of token ids with shape (..., n); got {got}.")
    if tokens.shape[-1] == 0:
        raise EnergyInputError(f"`tokens` must contain at least one position, got shape {tuple(tokens.shape)}.")
    if tokens.shape[-1] > seq_len:
        raise EnergyInputError(
            f"`tokens` has {tokens.shape[-1]} positions but the model has seq_len={seq_len} position embeddings; "
            "build the model with a larger seq_len."
        )
    return tokens


def _resolved(value: _T | None, name: str) -> _T:
    """A :class:`GPT2Config` field that ``__post_init__`` has resolved (never ``None`` after construction)."""
    if value is None:  # only reachable if a field is reset to None after construction
        raise EnergyInputError(f"GPT2Config.{name} is None; build a new GPT2Config instead of resetting it.")
    return value


@dataclass
class GPT2Config:
    """Configuration of :class:`GPT2Decoder` (MATH §3.7).

    Attributes:
        d_model: residual-stream width.
        n_layers: number of blocks.
        n_heads: attention heads ``h``.
        d_head: per-head width; ``None`` means ``d_model // n_heads``.
        d_mlp: hidden width of the MLP; ``None`` means ``4·d_model``.
        vocab: vocabulary size (12 for addition).
        seq_len: number of position embeddings (18 for 5-digit addition).
        layernorm: ``"none"`` (the paper's default) or ``"pre"`` (LayerNorm before attention, MLP and unembedding).
        attention: ``"softmax"`` or ``"linear"`` (``A = κ Q Kᵀ`` masked, no softmax; MATH §3.6).
        causal: causal mask. (With ``causal=False`` the answer of the addition task is visible to its own
            predictions; the option exists for non-autoregressive uses.)
        attn_residual_scale: ``s`` in ``X ← s·X + Attn(X)``; 1 is the standard residual, 0 removes it.
        mlp: include the MLP sub-layer.
        mlp_residual: ``X ← X + MLP(X)`` (True) or ``X ← MLP(X)`` (False).
        init_std: std of the normal initialisation of every weight matrix and embedding; ``None`` means
            ``0.8/√d_model``. Biases start at 0, LayerNorm at (1, 0).
    """

    d_model: int
    n_layers: int
    n_heads: int = 1
    d_head: int | None = None
    d_mlp: int | None = None
    vocab: int = 12
    seq_len: int = 18
    layernorm: Literal["none", "pre"] = "none"
    attention: Literal["softmax", "linear"] = "softmax"
    causal: bool = True
    attn_residual_scale: float = 1.0
    mlp: bool = True
    mlp_residual: bool = True
    init_std: float | None = None

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "vocab", "seq_len"):
            check_positive_int(getattr(self, name), name)
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise EnergyInputError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; pass d_head explicitly."
                )
            self.d_head = self.d_model // self.n_heads
        check_positive_int(self.d_head, "d_head")
        self.d_mlp = 4 * self.d_model if self.d_mlp is None else check_positive_int(self.d_mlp, "d_mlp")
        if self.layernorm not in ("none", "pre"):
            raise EnergyInputError(f"`layernorm` must be 'none' or 'pre', got {self.layernorm!r}.")
        if self.attention not in ("softmax", "linear"):
            raise EnergyInputError(f"`attention` must be 'softmax' or 'linear', got {self.attention!r}.")
        if not math.isfinite(self.attn_residual_scale):
            raise EnergyInputError(f"`attn_residual_scale` must be finite, got {self.attn_residual_scale!r}.")
        if self.init_std is None:
            self.init_std = 0.8 / math.sqrt(self.d_model)
        elif not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            raise EnergyInputError(f"`init_std` must be a positive number, got {self.init_std!r}.")


def _normal_(t: Tensor, std: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * std)


class _TokenModel(nn.Module):
    r"""Token front end shared by :class:`GPT2Decoder` and :class:`MLPBaseline` (MATH §3.7).

    .. math:: X = E[\text{tokens}] + P_{[:n]},\qquad \text{forward}(\text{tokens}) = f(X)

    with ``f`` = :meth:`forward_embeddings` of the subclass. The forward reads no tensor value: the token ids are
    checked by metadata (dtype, rank, length), and an id outside ``[0, vocab)`` is reported by the embedding lookup
    itself (on CPU; a CUDA lookup fails with a device-side assert, so check data on the host first).
    """

    def __init__(self, vocab: int, seq_len: int, d_model: int) -> None:
        super().__init__()
        self.vocab, self.seq_len = vocab, seq_len
        self.token_embedding = nn.Embedding(vocab, d_model)
        self.position_embedding = nn.Embedding(seq_len, d_model)

    def set_embedding_scale(self, sigma: float, generator: torch.Generator | None = None) -> None:
        r"""Redraw the token and position embeddings i.i.d. :math:`N(0, \sigma^2)` (the σ sweep of MATH §3.7).

        All other weights are left as they are. The token table is drawn first, then the position table.
        """
        if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
            raise EnergyInputError(f"`sigma` must be a finite number ≥ 0, got {sigma!r}.")
        _normal_(self.token_embedding.weight, float(sigma), generator)
        _normal_(self.position_embedding.weight, float(sigma), generator)

    def embed(self, tokens: Tensor) -> Tensor:
        """``X = E[tokens] + P[:n]``, shape ``(..., n, d_model)``."""
        _check_token_ids(tokens, self.seq_len)
        try:
            X = self.token_embedding(tokens)
        except IndexError:  # torch's bounds check of the lookup: no extra read of the ids
            raise EnergyInputError(
                f"`tokens` must hold ids in [0, vocab={self.vocab}); the embedding lookup found an id outside it."
            ) from None
        return X + self.position_embedding.weight[: tokens.shape[-1]]

    def forward_embeddings(self, X: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(..., n, vocab)`` of the token ids ``(..., n)``."""
        return self.forward_embeddings(self.embed(tokens))


class SelfAttention(nn.Module):
    r"""Multi-head self-attention with right-acting weights (no biases), via :mod:`energy.core.standard`.

    Softmax: :math:`\mathrm{Attn}(X) = [\mathrm{softmax}(\kappa Q_h K_h^\top + m) V_h]_h W_O`; linear:
    :math:`[(\kappa Q_h K_h^\top) \odot m\; V_h]_h W_O`, with :math:`\kappa = 1/\sqrt{d_\text{head}}` and ``m`` the
    causal mask.
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        d, hd = config.d_model, config.n_heads * _resolved(config.d_head, "d_head")
        self.n_heads = config.n_heads
        self.causal = config.causal
        self.kind = config.attention
        self.W_Q = nn.Parameter(torch.empty(d, hd))
        self.W_K = nn.Parameter(torch.empty(d, hd))
        self.W_V = nn.Parameter(torch.empty(d, hd))
        self.W_O = nn.Parameter(torch.empty(hd, d))

    def forward(self, X: Tensor) -> Tensor:
        return multi_head_attention(X, X, self.W_Q, self.W_K, self.W_V, self.W_O, num_heads=self.n_heads,
                                    causal=self.causal, linear=self.kind == "linear")


class MLP(nn.Module):
    r"""ReLU feed-forward block :math:`\mathrm{MLP}(X) = \mathrm{ReLU}(X W_1 + 1 b_1^\top) W_2 + 1 b_2^\top`."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        d_mlp = _resolved(config.d_mlp, "d_mlp")
        self.W_1 = nn.Parameter(torch.empty(config.d_model, d_mlp))
        self.b_1 = nn.Parameter(torch.zeros(d_mlp))
        self.W_2 = nn.Parameter(torch.empty(d_mlp, config.d_model))
        self.b_2 = nn.Parameter(torch.zeros(config.d_model))

    def forward(self, X: Tensor) -> Tensor:
        return feed_forward(X, self.W_1, self.b_1, self.W_2, self.b_2, activation="relu")


def _ln(module: nn.LayerNorm | None, X: Tensor) -> Tensor:
    return X if module is None else layer_norm(X, module.weight, module.bias, module.eps)


class DecoderBlock(nn.Module):
    r"""One decoder block, Pre-LN when configured.

    With ``s`` = ``attn_residual_scale``:

    .. math::
        X \leftarrow s\,X + \mathrm{Attn}(\mathrm{LN}_1(X)),\qquad X \leftarrow X + \mathrm{MLP}(\mathrm{LN}_2(X))

    (without LayerNorm ``LN`` is the identity; ``mlp_residual=False`` drops the second ``X +``, ``mlp=False`` the
    whole second step).
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        pre = config.layernorm == "pre"
        self.ln_1 = nn.LayerNorm(config.d_model) if pre else None
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model) if pre and config.mlp else None
        self.mlp = MLP(config) if config.mlp else None
        self.attn_residual_scale = float(config.attn_residual_scale)
        self.mlp_residual = config.mlp_residual

    def forward(self, X: Tensor) -> Tensor:
        s = self.attn_residual_scale
        residual = X if s == 1.0 else s * X
        X = residual + self.attn(_ln(self.ln_1, X))
        if self.mlp is not None:
            out = self.mlp(_ln(self.ln_2, X))
            X = X + out if self.mlp_residual else out
        return X


class GPT2Decoder(_TokenModel):
    """GPT-2-style decoder of the Hessian experiments (MATH §3.7); see the module docstring for parameter names.

    Args:
        config: a :class:`GPT2Config`.
        generator: optional ``torch.Generator`` for a seeded initialisation.

    >>> model = GPT2Decoder(GPT2Config(d_model=16, n_layers=1), generator=torch.Generator().manual_seed(0))
    >>> model(torch.zeros(2, 18, dtype=torch.long)).shape
    torch.Size([2, 18, 12])
    """

    def __init__(self, config: GPT2Config, *, generator: torch.Generator | None = None) -> None:
        if not isinstance(config, GPT2Config):
            raise EnergyInputError(f"`config` must be a GPT2Config, got {type(config).__name__}.")
        super().__init__(config.vocab, config.seq_len, config.d_model)
        self.config = config
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model) if config.layernorm == "pre" else None
        self.W_U = nn.Parameter(torch.empty(config.d_model, config.vocab))
        self.b_U = nn.Parameter(torch.zeros(config.vocab))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation: every weight matrix and embedding ``~ N(0, init_std²)``, biases 0, LayerNorm (1, 0)."""
        std = _resolved(self.config.init_std, "init_std")
        for name, p in self.named_parameters():
            if name.endswith(("b_1", "b_2", "b_U")):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_f"):
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            else:
                _normal_(p, std, generator)

    def forward_embeddings(self, X: Tensor) -> Tensor:
        """Logits ``(..., n, vocab)`` from an embedded sequence ``X (..., n, d_model)``: blocks, ``LN_f``, then
        ``X W_U + 1 b_Uᵀ``.
        """
        for block in self.blocks:
            X = block(X)
        return _ln(self.ln_f, X) @ self.W_U + self.b_U


class MLPBaseline(_TokenModel):
    r"""Deep MLP baseline of MATH §3.6/§3.7, applied to every position separately.

    .. math:: X_0 = E[\text{tokens}] + P,\qquad X_k = \phi(X_{k-1} W_k^\top),\qquad \text{logits} = X_L

    with ``φ`` the identity (``activation=None``, the deep *linear* network of MATH §3.6 — "an MLP baseline without
    activations") or ReLU (not after the last layer). The layers are ``nn.Linear`` without bias, so the weights are
    named ``layers.{i}.weight`` with shape ``(out, in)``: they act on the *left* of column vectors, as in the formula
    ``H_o(W_k, W_l) = 2c (W_{L:k+1}^\top W_{L:l+1}) ⊗ (W_{k-1:1} Σ_xx W_{l-1:1}^\top)`` of MATH §3.6.

    Args:
        d_model: embedding width.
        n_layers: number of weight matrices ``L`` (``d_model → d_hidden → … → vocab``).
        d_hidden: hidden width (default ``d_model``).
        activation: ``None`` or ``"relu"``.
        vocab, seq_len: as in :class:`GPT2Config`.
        init_std: std of the normal initialisation (default ``0.8/√d_model``, as the decoder).
        generator: seeded initialisation.
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        *,
        d_hidden: int | None = None,
        activation: Literal["relu"] | None = None,
        vocab: int = 12,
        seq_len: int = 18,
        init_std: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        for name, v in (("d_model", d_model), ("n_layers", n_layers), ("vocab", vocab), ("seq_len", seq_len)):
            check_positive_int(v, name)
        d_hidden = d_model if d_hidden is None else check_positive_int(d_hidden, "d_hidden")
        if activation not in (None, "relu"):
            raise EnergyInputError(f"`activation` must be None (linear) or 'relu', got {activation!r}.")
        super().__init__(vocab, seq_len, d_model)
        self.activation = activation
        self.init_std = 0.8 / math.sqrt(d_model) if init_std is None else float(init_std)
        widths = [d_model] + [d_hidden] * (n_layers - 1) + [vocab]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:]))
        for p in self.parameters():
            _normal_(p, self.init_std, generator)

    def forward_embeddings(self, X: Tensor) -> Tensor:
        """Outputs ``(..., n, vocab)`` of real-valued inputs ``X (..., n, d_model)``."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            X = layer(X)
            if self.activation == "relu" and i < last:
                X = torch.relu(X)
        return X


class StandardEncoderClassifier(nn.Module):
    """Unconstrained baseline for the constraint-cost comparison (MATH §1.7): torch's own encoder layers.

    ``input_proj`` (a bias-free ``nn.Linear`` if ``d_in ≠ d``) → optional learned position embedding →
    ``n_layers`` × ``nn.TransformerEncoderLayer(d, n_heads, d_ff, dropout, ReLU, batch_first=True)`` →
    mean over the (non-padded) tokens → ``head`` (``nn.Linear(d, n_classes)``).
    """

    def __init__(
        self,
        d: int,
        n_layers: int,
        n_heads: int,
        n_classes: int,
        *,
        d_in: int | None = None,
        d_ff: int | None = None,
        n_positions: int | None = None,
        norm_first: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, v in (("d", d), ("n_layers", n_layers), ("n_heads", n_heads), ("n_classes", n_classes)):
            check_positive_int(v, name)
        if d % n_heads:
            raise EnergyInputError(f"`d`={d} must be divisible by `n_heads`={n_heads} (nn.MultiheadAttention).")
        self.d = d
        self.d_in = d if d_in is None else check_positive_int(d_in, "d_in")
        self.input_proj = nn.Identity() if self.d_in == d else nn.Linear(self.d_in, d, bias=False)
        self.position_embedding = None
        if n_positions is not None:
            n_positions = check_positive_int(n_positions, "n_positions")
            self.position_embedding = nn.Parameter(0.02 * torch.randn(n_positions, d))
        d_ff = 4 * d if d_ff is None else check_positive_int(d_ff, "d_ff")
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, n_heads, d_ff, dropout=dropout, activation="relu", batch_first=True, norm_first=norm_first
            )
            for _ in range(n_layers)
        )
        self.head = nn.Linear(d, n_classes)

    def forward(self, X: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Class logits ``(B, n_classes)`` of sequences ``X (B, n, d_in)``; ``lengths (B,)`` marks padding."""
        check_tensor(X, "X", ndim=3, trailing=(None, self.d_in), finite=False)  # metadata only: transform-safe
        check_input_dtype(X, self, "X")
        n = X.shape[1]
        if n == 0:
            raise EnergyInputError(f"`X` must contain at least one token, got shape {tuple(X.shape)}.")
        H = self.input_proj(X)
        if self.position_embedding is not None:
            if n > self.position_embedding.shape[0]:
                raise EnergyInputError(f"`X` has {n} tokens but only {self.position_embedding.shape[0]} positions.")
            H = H + self.position_embedding[:n]
        pad = None
        if lengths is not None:
            pad = torch.arange(n, device=X.device)[None, :] >= lengths[:, None]  # True = padding
        for layer in self.layers:
            H = layer(H, src_key_padding_mask=pad)
        if pad is None:
            pooled = H.mean(dim=1)
        else:
            keep = (~pad).to(H.dtype).unsqueeze(-1)
            pooled = (H * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.head(pooled)


def standard_encoder(
    d: int, n_layers: int, n_heads: int, n_classes: int = 2, **kwargs: Any
) -> StandardEncoderClassifier:
    """A stack of ``torch.nn.TransformerEncoderLayer`` with a mean-pooling classification head.

    The same width and depth as an unfolded model, for measuring what the energy constraints cost (MATH §1.7).
    Keyword arguments go to :class:`StandardEncoderClassifier` (``d_in``, ``d_ff``, ``n_positions``,
    ``norm_first``, ``dropout``).
    """
    return StandardEncoderClassifier(d, n_layers, n_heads, n_classes, **kwargs)

