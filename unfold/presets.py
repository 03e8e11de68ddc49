r"""Ready-made models: the weight-tied model of Yang et al. (2022), an Energy-Transformer block, and the standard
models of :mod:`unfold.standard` (re-exported).

>>> import torch
>>> from unfold.presets import yang2022
>>> model = yang2022(d=16, depth=4, d_in=8, n_classes=10)
>>> logits, info = model(torch.randn(3, 8, 8), trace=True)
>>> tuple(logits.shape), tuple(info["energies"]["total"].shape)
((3, 10), (13, 3))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from energy._validation import EnergyInputError, check_real, check_tensor
from unfold.recurrent import RecurrentUnrolled
from unfold.standard import (  # noqa: F401 - re-exported for compatibility
    GPT2Config,
    GPT2Decoder,
    MLPBaseline,
    StandardEncoderClassifier,
    standard_encoder,
)
from unfold.step_base import check_input_dtype, positive_int
from unfold.steps import FFNStep
from unfold.unroller import CheckpointError, Unrolled, register_builder, safe_load_state_dict

# the standard models are importable from here as before; their public list is unfold.standard.__all__
__all__ = ["UnrolledClassifier", "yang2022", "init_signal_preserving_", "energy_transformer_block", "parameter_count"]


class UnrolledClassifier(nn.Module):
    r"""Input map, an :class:`~unfold.unroller.Unrolled` body, mean pooling and a linear classification head.

    .. math:: \text{logits} = \tfrac1n \mathbf 1^\top\, \mathrm{body}(X W_{in})\; W_{head} + b_{head}

    ``forward(X, trace=True)`` returns ``(logits, info)`` with the body's trace (energies of the body's states; the
    input map and the head are not descent steps and carry no energy). Without ``n_classes`` the head is omitted
    and ``forward`` returns the body's output tokens.

    Args:
        body: the unrolled model.
        d_in: input feature width (``None`` or ``body.d``: no input map).
        n_classes: number of classes (``None``: no head).
        input_bias: give the input map a bias.
    """

    def __init__(self, body: Unrolled, *, d_in: int | None = None, n_classes: int | None = None,
                 input_bias: bool = False) -> None:
        super().__init__()
        if not isinstance(body, Unrolled):
            raise EnergyInputError(f"`body` must be an unfold.Unrolled, got {type(body).__name__}.")
        self.body = body
        if d_in is not None:
            d_in = positive_int(d_in, "d_in")
        if n_classes is not None:
            n_classes = positive_int(n_classes, "n_classes")
        self.d_in = body.d if d_in is None else int(d_in)
        self.n_classes = n_classes
        self.input_bias = input_bias
        self.input_proj = nn.Identity() if self.d_in == body.d else nn.Linear(self.d_in, body.d, bias=input_bias)
        self.head = nn.Linear(body.d, n_classes) if n_classes is not None else None
        #: the :mod:`unfold.families` family that built this model (``None``: built otherwise)
        self.family: str | None = None

    def config(self) -> dict[str, Any]:
        out = {"body": self.body.config(), "d_in": self.d_in, "n_classes": self.n_classes,
               "input_bias": self.input_bias}
        if self.family is not None:
            out["family"] = self.family
        body_builder = getattr(self.body, "BUILDER", None)
        if body_builder is not None:  # a body other than Unrolled (e.g. the recurrent one): how to rebuild it
            out["body_builder"] = body_builder
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UnrolledClassifier:
        try:
            body_builder = config.get("body_builder")
            if body_builder is None:
                body = Unrolled.from_config(config["body"])
            elif body_builder in _BODY_BUILDERS:
                body = _BODY_BUILDERS[body_builder](config["body"])
            else:
                raise CheckpointError(f"invalid UnrolledClassifier config: unknown body builder {body_builder!r} "
                                      f"(known: {sorted(_BODY_BUILDERS)}).")
            model = cls(body, d_in=config["d_in"], n_classes=config["n_classes"],
                        input_bias=config.get("input_bias", False))
            model.family = config.get("family")
            return model
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"invalid UnrolledClassifier config: {exc}") from None

    def embed(self, X: Tensor) -> Tensor:
        """The body's input ``Y⁰ = X W_in`` (``X`` itself without an input map); metadata checks only (type, rank,
        width), so the forward reads no value and every ``torch.func`` transform passes through it.
        """
        check_input_dtype(check_tensor(X, "X", min_ndim=2, trailing=(None, self.d_in), finite=False), self, "X")
        if X.shape[-2] == 0:
            raise EnergyInputError(f"`X` must contain at least one token, got shape {tuple(X.shape)}.")
        return self.input_proj(X)

    def _pool_and_classify(self, Y: Tensor) -> Tensor:
        return Y if self.head is None else self.head(Y.mean(dim=-2))

    def forward(self, X: Tensor, *, trace: bool | str = False,
                energies: bool = True) -> Tensor | tuple[Tensor, dict[str, Any]]:
        if trace:  # True / "step" or "layer": the body's granularity
            Y, info = self.body(self.embed(X), trace=trace, energies=energies)
            return self._pool_and_classify(Y), info
        return self._pool_and_classify(self.body(self.embed(X), trace=False, energies=energies))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Validated, all-or-nothing load (:func:`unfold.unroller.safe_load_state_dict`); ``strict=False`` is torch's
        own load.
        """
        if not strict:
            return super().load_state_dict(state_dict, strict=False, assign=assign)
        # safe_load_state_dict checks the type itself (CheckpointError for anything but a dict of tensors)
        return safe_load_state_dict(self, cast(dict[str, Tensor], state_dict), _inner=super().load_state_dict)


register_builder("UnrolledClassifier", UnrolledClassifier.from_config)

#: bodies other than :class:`~unfold.unroller.Unrolled` an UnrolledClassifier can be rebuilt with (name → from_config)
_BODY_BUILDERS: dict[str, Any] = {}


def register_body_builder(name: str, from_config: Any) -> None:
    """Make ``UnrolledClassifier.from_config`` rebuild bodies whose class sets ``BUILDER = name``."""
    _BODY_BUILDERS[name] = from_config


register_body_builder(RecurrentUnrolled.BUILDER, RecurrentUnrolled.from_config)


def yang2022(
    d: int = 300,
    depth: int = 12,
    *,
    relu: bool = True,
    heads: int = 1,
    d_in: int | None = None,
    n_classes: int | None = None,
    alpha_att: float = 1.0,
    alpha_ffn: float = 1.0,
    spectrum: tuple[float, float] | None = (0.0, 0.95),
    orthogonal_heads: bool = False,
    normalization: str | None = None,
    norm_eps: float = 0.0,
    tied: bool = True,
    fused: bool = True,
    spectrum_map: str = "clip",
) -> UnrolledClassifier:
    r"""The weight-tied unfolded Transformer of Yang, Huang & Wipf (2022), MATH §1.6, §1.8.

    One layer: attention step (a) with ``α = 1``, :math:`Y \leftarrow \mathrm{softmax}_\beta(Y W Y^\top) Y`,
    ``W = M Mᵀ/√k`` (PSD by its factorisation); FFN step with ``W_f`` constrained to the
    spectrum ``[0, 0.95]`` (:class:`~unfold.parametrizations.SpectrumClip`) and ``α = 1``,
    :math:`Y \leftarrow -Y W_f + 1 b^\top`; optional ReLU projection. ``depth`` layers share their weights. The
    model energy is ``E_att + E_ffn`` with the *same* metric as the steps. For training, a mean-pool + linear head
    (``n_classes``) and an input map (``d_in``) are added.

    Args:
        d: width (300 in the paper, GloVe vectors).
        depth: number of layers (12 in the paper).
        relu: add the ReLU projection after the FFN step.
        heads: attention heads (1 in the paper).
        d_in: input feature width (default ``d``: no input map).
        n_classes: classes of the head (default: no head).
        alpha_att: step size ``α`` of the attention step (1 in the paper).
        alpha_ffn: step size ``α`` of the FFN step (1 in the paper).
        spectrum: eigenvalue bounds of ``W_f`` (``None``: only symmetric).
        orthogonal_heads: constrain the heads to orthogonal subspaces.
        normalization: ``None``, ``"layernorm"`` or ``"rmsnorm"`` projection at the end of each layer (not in the
            paper; no descent guarantee, MATH §1.4).
        norm_eps: ``eps`` of that projection (0: the exact projection, undefined for constant tokens; > 0: the
            ``nn.LayerNorm`` / ``nn.RMSNorm`` map, defined everywhere).
        tied: share weights across layers (True in the paper).
        fused: fused SDPA attention path.
        spectrum_map: ``"clip"`` (the reference code's spectrum clip) or ``"smooth"`` (the smooth map into the
            band, :class:`~unfold.parametrizations.SpectrumSquash`, MATH §7.3).
    """
    for name, a in (("alpha_att", alpha_att), ("alpha_ffn", alpha_ffn)):
        check_real(a, name, what="(a step size)")
    schedule: list[Any] = [
        ("attention", {"heads": heads, "alpha": alpha_att, "orthogonal_heads": orthogonal_heads, "fused": fused}),
        ("ffn", {"alpha": alpha_ffn, "spectrum": spectrum, "spectrum_map": spectrum_map}),
    ]
    if relu:
        schedule.append("relu")
    if normalization is not None:
        if normalization not in ("layernorm", "rmsnorm"):
            raise EnergyInputError(f"`normalization` must be None, 'layernorm' or 'rmsnorm', got {normalization!r}.")
        schedule.append((normalization, {"eps": norm_eps}))
    body = Unrolled(schedule, depth, d, tied=tied)
    return UnrolledClassifier(body, d_in=d_in, n_classes=n_classes)


@torch.no_grad()
def init_signal_preserving_(
    model: UnrolledClassifier,
    *,
    ffn_band: tuple[float, float] = (0.85, 0.95),
    ffn_bias: float = 1.0,
    input_std: float | None = 1.0,
    generator: torch.Generator | None = None,
) -> UnrolledClassifier:
    r"""Re-initialise a :func:`yang2022` model so that a deep tied stack passes its input on (in place; MATH §1.3,
    §1.6).

    The paper fixes the model and the training protocol, not the initialisation. Two properties of the default
    initialisation of the FFN step make the 12-layer ``α = 1`` model forget its input (measured on the digits
    stand-in of ``yang2022-energy-trained``: the pooled output's input-dependent part shrinks by ``≈ 5·10⁻⁶``
    over 12 layers, and the gradients of ``M``, ``W_f`` and the input map are ``10⁻⁸ … 10⁻⁵`` against ``0.3`` for
    ``b``):

    * ``½(A + Aᵀ)`` with ``A_ij ~ N(0, 1/d)`` has a semicircle spectrum on ``[−√2, √2]``; the default start maps
      it into the band (``m + r tanh((λ − m)/r)``, MATH §7.3; before, it was clipped, putting about half of the
      eigenvalues at ``0``), so about half of the eigenvalues of ``W_f`` are still below ``0.12``. Once the
      attention steps have merged the tokens of a sequence (step (a) with ``α = 1`` is a convex combination of the
      tokens) and while the ReLU is inactive, one layer maps a perturbation ``δ`` of the state to ``−δ W_f``;
      ``depth`` tied layers transmit ``δ W_f^{depth}``, i.e. ``λ^{12}`` per eigen-direction (``0.95¹² = 0.54``,
      ``0.5¹² = 2.4·10⁻⁴``, ``0.1¹² = 10⁻¹²``).
    * ``b = 0`` with ``W_f ⪰ 0``: after the first ReLU the tokens are non-negative and ``ReLU(−Y W_f)`` removes
      every component along which ``Y W_f`` is positive (all of it for ``W_f ∝ I``).

    This initialiser sets, for every FFN step, ``W_f`` to ``Q diag(λ) Qᵀ`` (through the constraint's right inverse)
    with ``Q`` Haar-orthogonal and ``λ_i ~ U(ffn_band)`` (distinct, inside the constraint's band: the clip is the
    identity at initialisation and every eigenvalue receives a gradient), the bias to ``b = ffn_bias · 1``, and
    (``input_std`` not ``None``) the input map's weight to ``N(0, input_std²)`` entries (its bias to 0). The
    attention factor ``M`` keeps its default. The model's structure, its constraints and its step sizes are
    unchanged.

    Args:
        model: a model built by :func:`yang2022` (any width, depth, with or without ReLU).
        ffn_band: ``(low, high)`` of the initial spectrum of ``W_f``; must lie inside the step's spectrum bounds.
        ffn_bias: initial value of every entry of ``b`` (FFN steps without a learnable bias are left alone).
        input_std: standard deviation of the input map's entries (``None``: keep the default initialisation).
        generator: random generator (default: torch's global one).

    Returns:
        ``model`` (re-initialised in place).
    """
    if not isinstance(model, UnrolledClassifier):
        raise EnergyInputError(f"`model` must be an UnrolledClassifier from yang2022(), got {type(model).__name__}.")
    lo, hi = (float(x) for x in ffn_band)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise EnergyInputError(f"`ffn_band` must be finite (low, high) with low < high, got {ffn_band!r}.")
    if input_std is not None and not (math.isfinite(input_std) and input_std > 0):
        raise EnergyInputError(f"`input_std` must be a positive number or None, got {input_std!r}.")
    ffn_steps = [step for step in model.body.modules() if isinstance(step, FFNStep)]  # tied: each step once
    if not ffn_steps:
        raise EnergyInputError("`model` has no FFN step; init_signal_preserving_ expects a yang2022() model.")
    for step in ffn_steps:
        if step.spectrum is not None and not (step.spectrum[0] <= lo and hi <= step.spectrum[1]):
            raise EnergyInputError(
                f"`ffn_band` = {ffn_band!r} must lie inside the FFN spectrum bounds {step.spectrum}; choose a band "
                "within them."
            )
        original = step.get_parameter("parametrizations.W_f.original")  # the unconstrained original of W_f
        d = original.shape[-1]
        G = torch.randn(d, d, generator=generator, dtype=torch.float64)
        Q, R = torch.linalg.qr(G)
        Q = Q * torch.sign(torch.diagonal(R)).unsqueeze(-2)  # Haar-distributed
        lam = lo + (hi - lo) * torch.rand(d, generator=generator, dtype=torch.float64)
        # the constraint's right inverse: the clip's is the value itself, the smooth map's its preimage
        step.W_f = ((Q * lam.unsqueeze(-2)) @ Q.T).to(original.dtype)
        if step.bias:
            step.b.fill_(ffn_bias)
    if input_std is not None and isinstance(model.input_proj, nn.Linear):
        W_in = model.input_proj.weight
        W_in.copy_(torch.randn(W_in.shape, generator=generator, dtype=torch.float64).to(W_in.dtype) * input_std)
        if model.input_proj.bias is not None:
            model.input_proj.bias.zero_()
    return model


def energy_transformer_block(
    d: int = 64,
    depth: int = 12,
    *,
    heads: int = 4,
    k: int | None = None,
    memories: int | None = None,
    alpha: float = 0.1,
    d_in: int | None = None,
    n_classes: int | None = None,
) -> UnrolledClassifier:
    r"""An Energy-Transformer block (Hoover et al. 2023, MATH §2.2) unrolled for ``depth`` discrete steps.

    Every step is ``x ← x − α ∂E/∂g`` with ``g = LN(x)`` and ``E = E_att + E_hn`` (one shared set of weights, as in
    the paper: the block is a recurrent energy descent, not a stack of layers).
    """
    body = Unrolled([("energy_transformer", {"heads": heads, "k": k, "memories": memories, "alpha": alpha})],
                    depth, d, tied=True)
    return UnrolledClassifier(body, d_in=d_in, n_classes=n_classes)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars (the unconstrained originals, i.e. what the optimiser updates)."""
    if not isinstance(model, nn.Module):
        raise EnergyInputError(f"`model` must be an nn.Module, got {type(model).__name__}; pass the model itself.")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
