r"""Hugging Face ``transformers`` and TransformerLens models in the curvature module: tiny models built offline,
standard losses, data, and fused attention switched to eager for the products (MATH §3.1, §3.7).

``transformers`` and ``transformer_lens`` are imported lazily (only when a model is built or loaded), so
``import energy.hessian`` works without them (extra ``hf``).

Models and tasks
----------------
:func:`build_model` builds a preset (:data:`PRESETS`: ``gpt2-tiny``, ``llama-tiny``, ``mistral-tiny``,
``bert-tiny``, ``bert-cls-tiny``, ``vit-tiny``, ``gpt2-small-shaped``, and ``tl-tiny``, a TransformerLens 4
``TransformerBridge`` around its native causal LM; TransformerLens 4 has no ``HookedTransformer``) from a config
with a seed (random init, float64, eval mode); :func:`load_model` reads a local directory (``config.json``; weights
when present, else the seeded random init). The task follows from the model class (:func:`task_of`):

* ``causal-lm`` (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``MistralForCausalLM``, ``TransformerBridge``): shifted
  cross-entropy, logits at position ``t`` score token ``t + 1``;
* ``masked-lm`` (``BertForMaskedLM``): cross-entropy at the masked positions (label ``-100`` elsewhere);
* ``sequence-classification`` / ``image-classification``: cross-entropy of one label per example.

Objective: the mean over every counted target of the data set
----------------------------------------------------------------
Each loss returns the mean over the counted targets ``c_b`` of its batch (tokens with a label ``≠ -100``, or
examples). The operators weight batch ``b`` by ``w_b = c_b / Σ_b' c_b'`` (``batch_size_fn`` = :func:`count_targets`,
``reduction="mean"``, :mod:`energy.hessian.operators`), so that

.. math::
    \mathcal L(\theta) = \sum_b \frac{c_b}{C}\,\frac{1}{c_b}\sum_{t \in \mathcal T_b} \ell_t(\theta)
    = \frac1C \sum_{t \in \cup_b \mathcal T_b} \ell_t(\theta), \qquad C = \sum_b c_b ,

the loss over the union of the batches whatever their sizes and masks.

Batches are ``(inputs, labels)`` pairs; ``inputs`` is a dict of the model's keyword inputs (``input_ids``,
``attention_mask``, ``pixel_values``) that also carries ``labels`` (so that :func:`count_targets` can count them);
:class:`LogitsModel` drops it before calling the model.

Fused attention
---------------
SDPA / flash attention kernels have no forward-mode derivative on the CPU (``jvp`` raises ``NotImplementedError``
for ``_scaled_dot_product_flash_attention_for_cpu``), which the ``H_o`` / ``H_f`` products need.
:class:`LogitsModel` runs every forward pass inside :func:`eager_attention`, which switches the model to
:func:`float64_attention` (the same function from differentiable ops, registered in ``transformers`` as
``"energy_eager"``) and restores the previous setting afterwards; a one-line ``UserWarning`` says so when the wrapper
is built. The models' own eager functions are not used: LLaMA's, Mistral's and ViT's take the softmax in float32,
and LLaMA/Mistral's RMSNorm rounds through float32, which limits float64 products to about 1e-7; inside the block
both run in the input dtype, and SiLU is computed as ``x·σ(x)`` (``aten::silu_backward`` has no forward-mode rule).

Padding tokens: ``nn.Embedding(padding_idx=p)`` zeroes the reverse-mode gradient of row ``p`` while forward mode
keeps it, so ``H`` and ``H_o + H_f`` disagree on that row when ``p`` occurs in the inputs; mark padding with
``attention_mask`` and label ``-100`` (:func:`synthetic_batches` never draws the padding id).
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from energy._validation import EnergyInputError
from energy.hessian.curvature_operators import (
    CurvatureOperator,
    FunctionalOperator,
    GGNOperator,
    HessianOperator,
)
from energy.hessian.distributed import ShardGroup, resolve_shards

__all__ = [
    "PRESETS",
    "TASKS",
    "CausalLMLoss",
    "MaskedLMLoss",
    "ClassificationLoss",
    "LogitsModel",
    "build_model",
    "load_model",
    "task_of",
    "loss_for",
    "count_targets",
    "synthetic_batches",
    "token_batches",
    "eager_attention",
    "curvature_operator",
]

IGNORE_INDEX = -100

#: Preset name -> (model class name in ``transformers``, config class name, config keyword arguments).
PRESETS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2-tiny": ("GPT2LMHeadModel", "GPT2Config",
                  {"n_embd": 16, "n_layer": 2, "n_head": 4, "vocab_size": 50, "n_positions": 16, "bos_token_id": 0,
                   "eos_token_id": 0}),
    "gpt2-small-shaped": ("GPT2LMHeadModel", "GPT2Config",
                          {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}),
    "llama-tiny": ("LlamaForCausalLM", "LlamaConfig",
                   {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "vocab_size": 50, "max_position_embeddings": 16}),
    "mistral-tiny": ("MistralForCausalLM", "MistralConfig",
                     {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "vocab_size": 50, "max_position_embeddings": 16,
                      "sliding_window": None}),
    "bert-tiny": ("BertForMaskedLM", "BertConfig",
                  {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 24,
                   "vocab_size": 50, "max_position_embeddings": 16}),
    "bert-cls-tiny": ("BertForSequenceClassification", "BertConfig",
                      {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 24,
                       "vocab_size": 50, "max_position_embeddings": 16, "num_labels": 3}),
    "tl-tiny": ("TransformerBridge", "native",
                {"n_layers": 2, "d_model": 16, "n_ctx": 16, "d_head": 4, "n_heads": 4, "n_key_value_heads": 2,
                 "d_vocab": 50, "d_mlp": 24, "act_fn": "gelu", "normalization_type": "LN"}),
    "vit-tiny": ("ViTForImageClassification", "ViTConfig",
                 {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 24,
                  "image_size": 8, "patch_size": 4, "num_channels": 3, "num_labels": 3}),
}

#: Model class name -> task.
_TASK_OF_CLASS = {
    "GPT2LMHeadModel": "causal-lm",
    "LlamaForCausalLM": "causal-lm",
    "MistralForCausalLM": "causal-lm",
    "BertForMaskedLM": "masked-lm",
    "BertForSequenceClassification": "sequence-classification",
    "ViTForImageClassification": "image-classification",
    "TransformerBridge": "causal-lm",
}
#: ``model_type`` -> class used when ``config.json`` names no ``architectures``.
_DEFAULT_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "bert": "BertForMaskedLM", "vit": "ViTForImageClassification"}
TASKS = ("causal-lm", "masked-lm", "sequence-classification", "image-classification")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the extra is installed for the tests
        raise EnergyInputError(
            "energy.hessian.hf needs the optional package `transformers`; install the extra: "
            "pip install 'energy-unfolding[hf]'."
        ) from exc
    return transformers


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def _finish(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    if any(p.dtype != dtype for p in nn.Module.parameters(model)):
        model = model.to(dtype)
    return model.eval()


def build_model(preset: str, *, seed: int = 0, dtype: torch.dtype = torch.float64,
                attn_implementation: str = "eager", **overrides: Any) -> nn.Module:
    """A Hugging Face model of a :data:`PRESETS` configuration with seeded random weights, offline.

    Args:
        preset: a key of :data:`PRESETS`.
        seed: seed of the weight initialisation (the global torch generator is left untouched).
        dtype: parameter dtype (float64 for verification).
        attn_implementation: ``"eager"`` or ``"sdpa"`` (products always run eager, see :func:`eager_attention`).
        **overrides: config entries replacing the preset's (e.g. ``n_layer=1``).

    Returns:
        The model, in eval mode.
    """
    if preset not in PRESETS:
        raise EnergyInputError(f"`preset` must be one of {sorted(PRESETS)}, got {preset!r}.")
    model_cls, config_cls, kwargs = PRESETS[preset]
    if model_cls == "TransformerBridge":
        return _build_transformer_lens({**kwargs, **overrides}, seed, dtype)
    tf = _transformers()
    config = getattr(tf, config_cls)(**{**kwargs, **overrides}, attn_implementation=attn_implementation)
    config.architectures = [model_cls]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= getattr(config, "vocab_size", value + 1):
            setattr(config, key, 0)  # the GPT-2 defaults (50256) lie outside a tiny vocabulary
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(tf, model_cls)(config)
    return _finish(model, dtype)


def _build_transformer_lens(config: dict[str, Any], seed: int, dtype: torch.dtype) -> nn.Module:
    """A TransformerLens 4 ``TransformerBridge`` around its native causal LM (``TransformerBridge.boot_native``)."""
    try:
        from transformer_lens.model_bridge.sources.native import boot
    except ImportError as exc:  # pragma: no cover - the extra is installed for the tests
        raise EnergyInputError("the preset needs the optional package `transformer-lens` (>= 4); install the extra: "
                               "pip install 'energy-unfolding[hf]'.") from exc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with contextlib.redirect_stdout(sys.stderr):  # its dtype notice is not the command's output
            model = boot(config, dtype=dtype)
    return _finish(model, dtype)


def load_model(path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A model from a local directory holding ``config.json`` (``architectures`` names the class).

    The weights (``model.safetensors`` / ``pytorch_model.bin``) are loaded when present, otherwise the model gets
    the seeded random initialisation of :func:`build_model`. Never downloads (``local_files_only``).
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise EnergyInputError(f"`path` {str(p)!r} must be a directory containing config.json (a Hugging Face "
                               "model directory), or use a preset name.")
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(str(p), local_files_only=True)
    names = list(getattr(config, "architectures", None) or [_DEFAULT_CLASS.get(config.model_type, "")])
    if not names or not hasattr(tf, names[0]):
        raise EnergyInputError(f"{p / 'config.json'}: `architectures` must name a transformers model class "
                               f"(e.g. ['GPT2LMHeadModel']), got {names!r}.")
    cls = getattr(tf, names[0])
    has_weights = any((p / w).is_file() for w in ("model.safetensors", "pytorch_model.bin"))
    if has_weights:
        model = cls.from_pretrained(str(p), local_files_only=True, torch_dtype=dtype)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
    return _finish(model, dtype)


def task_of(model: nn.Module) -> str:
    """The task of a model (:data:`TASKS`), from its class."""
    hf = model.hf if isinstance(model, LogitsModel) else model
    name = type(hf).__name__
    if name not in _TASK_OF_CLASS:
        raise EnergyInputError(f"`model` of class {name} has no known task; supported classes: "
                               f"{sorted(_TASK_OF_CLASS)} (or pass `loss_fn` and `batch_size_fn` yourself).")
    return _TASK_OF_CLASS[name]


# --------------------------------------------------------------------------------------------------------------
# Losses (pure: mean over the counted targets of one batch) and the per-batch counts
# --------------------------------------------------------------------------------------------------------------


class CausalLMLoss(nn.Module):
    r"""Shifted cross-entropy: :math:`\frac{1}{c_b}\sum_{t:\,y_{t+1}\ne -100} -\log \mathrm{softmax}(o_t)_{y_{t+1}}`."""

    reduction = "mean"

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean over the counted next-token targets of the batch."""
        v = logits.shape[-1]
        return F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


class MaskedLMLoss(nn.Module):
    r"""Cross-entropy at the masked positions: :math:`\frac{1}{c_b}\sum_{t:\,y_t\ne -100} -\log p_t(y_t)`."""

    reduction = "mean"

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean over the positions whose label is not -100."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


class ClassificationLoss(nn.Module):
    r"""Cross-entropy of one label per example, mean over the batch."""

    reduction = "mean"

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean over the examples of the batch."""
        return F.cross_entropy(logits, labels)


def loss_for(task: str) -> nn.Module:
    """The standard loss of ``task`` (:data:`TASKS`)."""
    losses = {"causal-lm": CausalLMLoss, "masked-lm": MaskedLMLoss}
    return losses.get(task, ClassificationLoss)()


def count_targets(task: str) -> Callable[[Mapping[str, Tensor]], int]:
    """``batch_size_fn`` of ``task``: the number ``c_b`` of targets a batch's loss averages over.

    Read once per batch when an operator is built (validation edge), from ``inputs["labels"]``.
    """

    def causal(inputs: Mapping[str, Tensor]) -> int:
        return int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())

    def masked(inputs: Mapping[str, Tensor]) -> int:
        return int((inputs["labels"] != IGNORE_INDEX).sum())

    def examples(inputs: Mapping[str, Tensor]) -> int:
        return int(inputs["labels"].shape[0])

    return {"causal-lm": causal, "masked-lm": masked}.get(task, examples)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def _config(model: nn.Module) -> Any:
    """The model's configuration: ``config`` (Hugging Face) or ``cfg`` (TransformerLens)."""
    return getattr(model, "config", None) or getattr(model, "cfg", None)


def _vocab_size(model: nn.Module) -> int:
    cfg = _config(model)
    return int(getattr(cfg, "vocab_size", None) or cfg.d_vocab)


def token_batches(model: nn.Module, tokens: Tensor, *, batch: int, seed: int = 0,
                  mask_prob: float = 0.25) -> list[tuple[dict[str, Tensor], Tensor]]:
    """Batches ``(inputs, labels)`` of ``model``'s task from token ids ``tokens`` of shape ``(N, T)``.

    Causal LM: the labels are the tokens. Masked LM: each position is masked with probability ``mask_prob``
    (replaced by the last token id of the vocabulary; at least one per batch), labels ``-100`` elsewhere.
    Sequence classification: seeded random labels. The last batch may be smaller.
    """
    task = task_of(model)
    if task == "image-classification":
        raise EnergyInputError("`tokens`: an image classifier takes pixel values; use synthetic_batches(model, ...).")
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        got = f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}"
        raise EnergyInputError(f"`tokens` must be an integer tensor of shape (N, T), got {got}.")
    vocab = _vocab_size(model)
    if tokens.numel() == 0 or int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise EnergyInputError(f"`tokens` must be non-empty ids in [0, {vocab}) (the model's vocabulary).")
    if task == "causal-lm" and tokens.shape[1] < 2:
        raise EnergyInputError("`tokens`: a causal LM needs sequences of length ≥ 2 (one next-token target).")
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, tokens.shape[0], batch):
        ids = tokens[i : i + batch].long()
        if task == "causal-lm":
            labels = ids.clone()
        elif task == "masked-lm":
            mask = torch.rand(ids.shape, generator=g) < mask_prob  # drawn on the CPU: the same on every device
            mask.view(-1)[int(torch.randint(ids.numel(), (1,), generator=g))] = True
            mask = mask.to(ids.device)
            labels = torch.where(mask, ids, torch.full_like(ids, IGNORE_INDEX))
            ids = torch.where(mask, torch.full_like(ids, vocab - 1), ids)
        else:
            labels = torch.randint(int(_config(model).num_labels), (ids.shape[0],), generator=g).to(ids.device)
        out.append(({"input_ids": ids, "labels": labels}, labels))
    return out


def synthetic_batches(model: nn.Module, *, batch: int = 2, seq_len: int = 5, num_batches: int = 1,
                      seed: int = 0) -> list[tuple[dict[str, Tensor], Tensor]]:
    """Seeded random batches for ``model``'s task: uniform token ids, or standard normal pixels for ViT.

    Drawn on the CPU (so a seed gives the same batches on every device) and moved to the device of ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    n = batch * num_batches
    if task_of(model) == "image-classification":
        c, s = int(_config(model).num_channels), int(_config(model).image_size)
        dtype = next(model.parameters()).dtype
        out = []
        for _ in range(num_batches):
            pixels = torch.randn(batch, c, s, s, generator=g, dtype=dtype).to(device)
            labels = torch.randint(int(_config(model).num_labels), (batch,), generator=g).to(device)
            out.append(({"pixel_values": pixels, "labels": labels}, labels))
        return out
    tokens = _ordinary_ids(model)[torch.randint(len(_ordinary_ids(model)), (n, seq_len), generator=g)].to(device)
    return token_batches(model, tokens, batch=batch, seed=seed + 1)


def _ordinary_ids(model: nn.Module) -> Tensor:
    """Token ids other than the padding id and the masked-LM mask id (the last id).

    ``nn.Embedding(padding_idx=p)`` zeroes the reverse-mode gradient of row ``p`` while forward mode keeps it,
    so products through the padding row disagree between ``H`` (reverse-over-reverse) and ``H_o``/``H_f``:
    pad with ``attention_mask`` and label ``-100`` instead of feeding the padding id as content.
    """
    vocab = _vocab_size(model)
    keep = torch.ones(vocab, dtype=torch.bool)
    pad = getattr(_config(model), "pad_token_id", None)
    if isinstance(pad, int) and 0 <= pad < vocab:
        keep[pad] = False
    if task_of(model) == "masked-lm":
        keep[vocab - 1] = False
    return torch.nonzero(keep).reshape(-1)


# --------------------------------------------------------------------------------------------------------------
# Fused attention and the logits wrapper
# --------------------------------------------------------------------------------------------------------------


def attn_implementation(model: nn.Module) -> str | None:
    """The attention implementation a Hugging Face model is set to (``None`` if it has none)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


def _composite_silu(self: Any, x: Tensor) -> Tensor:
    r""":math:`\mathrm{silu}(x) = x\,\sigma(x)` from primitives: ``aten::silu_backward`` has no forward-mode
    derivative, which the functional part ``H_f`` needs through gated MLPs.
    """
    return x * torch.sigmoid(x)


_SILU_CLASSES = ("SiLU", "SiLUActivation")


#: Name under which :func:`float64_attention` is registered in ``transformers``' attention interfaces.
EAGER = "energy_eager"


def float64_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor]:
    r"""Eager multi-head attention in the dtype of its inputs (grouped-query heads repeated).

    .. math::
        O_h = \mathrm{softmax}\big(s\, Q_h K_{g(h)}^\top + M\big)\, V_{g(h)}, \qquad g(h) = \lfloor h / r \rfloor,

    with ``r = num_key_value_groups``, the scaling ``s`` (default ``d_head^{-1/2}``) and the additive mask ``M``.
    The eager functions of LLaMA, Mistral and ViT take the softmax in float32, which limits float64 products to
    about 1e-7; this one is float64 throughout and has forward-mode derivatives. Dropout is not applied (the
    operators require eval mode).
    """
    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    s = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * s
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _register_attention() -> None:
    tf = _transformers()
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    tf.AttentionInterface.register(EAGER, float64_attention)
    AttentionMaskInterface.register(EAGER, eager_mask)


def _rms_norm_float64(self: Any, hidden_states: Tensor) -> Tensor:
    r"""LLaMA/Mistral RMSNorm :math:`w \odot x / \sqrt{\overline{x^2} + \epsilon}` without the float32 round trip."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


_RMS_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm")


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` on :func:`float64_attention` (registered as ``"energy_eager"``) and its SiLU
    and RMSNorm modules on differentiable float64 forms; restore everything afterwards.

    The attention implementation is switched with ``model.set_attn_implementation`` and set back to what it was
    (``"sdpa"``, ``"eager"``, ...). Fused kernels (SDPA, flash) have no forward-mode derivative; the model's own
    eager functions may round the softmax / RMSNorm through float32.
    """
    before = attn_implementation(model)
    if before is not None and before != EAGER:
        _register_attention()
        model.set_attn_implementation(EAGER)  # type: ignore[operator]
    patched = [m for m in model.modules() if type(m).__name__ in _RMS_CLASSES + _SILU_CLASSES]
    for m in patched:
        m.forward = types.MethodType(  # type: ignore[method-assign]
            _rms_norm_float64 if type(m).__name__ in _RMS_CLASSES else _composite_silu, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
        if before is not None and before != EAGER:
            model.set_attn_implementation(before)  # type: ignore[operator]


class LogitsModel(nn.Module):
    """``inputs -> logits`` view of a Hugging Face model (or a TransformerLens ``TransformerBridge``, called on
    ``inputs["input_ids"]``) for the curvature operators, with the model's own names.

    The wrapped model's top-level sub-modules are registered on the wrapper, so parameter names (and
    ``functional_call``'s tied weights, e.g. GPT-2's ``lm_head.weight`` = ``transformer.wte.weight``) are those of
    the Hugging Face model. The ``labels`` entry of ``inputs`` is dropped; every forward pass runs inside
    :func:`eager_attention`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module) or _config(model) is None:
            raise EnergyInputError(f"`model` must be a Hugging Face PreTrainedModel or a TransformerLens "
                                   f"TransformerBridge, got {type(model).__name__}.")
        if any(True for _ in nn.Module.named_parameters(model, recurse=False)) or any(
                True for _ in nn.Module.named_buffers(model, recurse=False)):
            raise EnergyInputError(f"`model` ({type(model).__name__}) has parameters or buffers at its top level; "
                                   "LogitsModel supports models whose weights live in sub-modules.")
        object.__setattr__(self, "_hf", model)
        for name, child in model.named_children():
            self.add_module(name, child)
        self.train(model.training)
        impl = attn_implementation(model)
        if impl is not None and impl != "eager":
            warnings.warn(
                f"energy.hessian.hf: {type(model).__name__} uses attn_implementation={impl!r}, which has no "
                "forward-mode AD; curvature products switch it to 'eager' (same function) during each forward pass "
                f"and restore {impl!r} afterwards.",
                UserWarning,
                stacklevel=3,
            )

    @property
    def hf(self) -> Any:
        """The wrapped Hugging Face model."""
        return self._hf

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """The model's logits for the keyword inputs (``labels`` ignored)."""
        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        if type(self.hf).__name__ == "TransformerBridge":
            out: Tensor = self.hf(kwargs["input_ids"])
            return out
        with eager_attention(self.hf):
            out = self.hf(**kwargs).logits
        return out


# --------------------------------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------------------------------

_PART_CLASS: dict[str, type[CurvatureOperator]] = {"H": HessianOperator, "H_o": GGNOperator, "H_f": FunctionalOperator}


def curvature_operator(model: nn.Module, data: Sequence[tuple[Mapping[str, Tensor], Tensor]], *, part: str = "H",
                       params: Sequence[str] | str | None = None, max_vectors: int | None = None,
                       cache: bool = False, distributed: bool | ShardGroup = False) -> CurvatureOperator:
    """The curvature operator ``part`` (``"H"``, ``"H_o"``, ``"H_f"``) of a Hugging Face model's standard loss.

    Args:
        model: a Hugging Face model (or its :class:`LogitsModel`).
        data: batches ``(inputs, labels)`` as :func:`synthetic_batches` / :func:`token_batches` make them.
        part: the curvature part.
        params: parameter names of the model (default: all).
        max_vectors: column chunk of the products (:class:`~energy.hessian.curvature_operators.CurvatureOperator`).
        cache: keep each batch's linearisation between products (same class).
        distributed: ``data`` is this rank's shard; products are summed over the ranks (MATH §6.1).

    Returns:
        The operator of the data-set mean over every counted target (module docstring).
    """
    if part not in _PART_CLASS:
        raise EnergyInputError(f"`part` must be one of {list(_PART_CLASS)}, got {part!r}.")
    wrapped = model if isinstance(model, LogitsModel) else LogitsModel(model)
    task = task_of(wrapped)
    counts = count_targets(task)

    def check_data() -> None:
        for i, batch in enumerate(data):
            inputs = batch[0] if isinstance(batch, (tuple, list)) else None
            if not isinstance(inputs, Mapping) or "labels" not in inputs:
                raise EnergyInputError(f"`data` batch {i} must be (inputs, labels) with inputs a dict holding "
                                       "'labels' (use synthetic_batches or token_batches).")
            if counts(inputs) == 0:
                raise EnergyInputError(f"`data` batch {i} has no counted target (every label is -100); drop it.")

    shards = resolve_shards(distributed)
    if shards is None:
        check_data()
    else:
        shards.run(check_data, "checking each rank's batches")
    return _PART_CLASS[part](wrapped, loss_for(task), params, data, reduction="mean", batch_size_fn=counts,
                             max_vectors=max_vectors, cache=cache, distributed=distributed)
