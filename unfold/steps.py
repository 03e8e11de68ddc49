r"""One ``nn.Module`` per descent step: the layers an unrolled Transformer is built from (MATH §1).

Every step module carries its weights through named parametrisations (:mod:`unfold.parametrizations`) and answers

* ``build()`` / ``.energy`` — the validated :mod:`energy` object made from the *current* (constrained) weights, or
  ``None`` for a projection (ReLU, LayerNorm, RMSNorm: indicator functions, zero on their set) — for users;
* ``prepare()`` — a :class:`Prepared`: the constrained weights (and e.g. the heads' value bases) evaluated once per
  forward pass, so a weight-tied model evaluates its parametrisations once however deep it is;
* ``forward_prepared(prepared, Y)`` — the descent step, straight through the pure core (:mod:`energy.core`);
* ``forward_prepared_and_energy(prepared, Y)`` — ``(Y⁺, E_term(Y))`` if the step computes its energy term at ``Y``
  in passing (the attention step), else ``(Y⁺, None)`` (used by the unroller's traces);
* ``forward(Y)`` = ``forward_prepared(prepare(), Y)``.

Forwards are pure: they check only ``Y``'s metadata (type, rank, width) and never read a tensor value back to
Python, so every ``torch.func`` transform passes through a step and a model made of steps.

Step sizes. A fixed ``alpha`` is a Python float (also kept as a non-persistent float64 buffer ``alpha`` and in
``config()``); with ``learn_alpha=True`` it is a parameter. Every step is affine in ``α`` (MATH §1.5), and the core
takes a tensor ``α`` directly. A fixed ``α`` is checked in :meth:`Step.prepare` against the range the step's
*constraints* guarantee (:meth:`Step.guaranteed_range`: no weight values needed; a warning, or an error in
``strict_mode``); :meth:`Step.check_alpha` checks the current ``α`` against the built energy's exact
``step_range()`` (it reads the weights: a public call, outside forwards).

Each step class has a schedule name (``kind``) and, if it descends an energy, the name of its energy term
(``term``) used in the unroller's traces.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from energy._attention_args import check_preconditioner
from energy._validation import EnergyInputError, check_real, check_scale
from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy
from energy.base import Energy, StepRange
from energy.core import attention as core_att
from energy.core import ffn as core_ffn
from energy.core import norm as core_norm
from energy.core import related as core_rel
from energy.core.fused import fused_step, fused_step_and_energy
from energy.core.preconditioner import Preconditioner
from energy.energy_transformer import EnergyTransformerEnergy
from energy.ffn import FFNEnergy, TiedReLUEnergy
from energy.hopfield import HopfieldEnergy
from energy.step_range import attention_step_range
from unfold.parametrizations import (
    OrthogonalHeads,
    PSDMetric,
    SpectrumClip,
    SpectrumSquash,
    Symmetric,
    check_spectrum,
    interior_start,
)
from unfold.step_base import Prepared, Step, make_kernel, positive_int

__all__ = [
    "Prepared",
    "Step",
    "AttentionStep",
    "FFNStep",
    "TiedReLUFFNStep",
    "ReLUProjection",
    "LayerNormProjection",
    "RMSNormProjection",
    "HopfieldStep",
    "EnergyTransformerStep",
    "make_kernel",
]


# ------------------------------------------------------------------------------------------------------- attention


class AttentionStep(Step):
    r"""Attention as a preconditioned descent step on the attention energy (MATH §1.1, §1.2).

    .. math::
        \text{(a) metric: } Y^+ = (1-\alpha) Y + \alpha\,\mathrm{softmax}_\beta(Y W Y^\top) Y ,\qquad
        \text{(b) token: } Y^+ = Y (I - \alpha W) + \alpha\,\mathrm{softmax}_\beta(Y W Y^\top) Y W ,

    with ``W_h = κ M_h M_hᵀ`` (:func:`energy.attention.metric`), one factor ``M_h ∈ R^{d×k}`` per head (parameter
    ``M`` of shape ``(h, d, k)``), and the key bias ``β_j = −½‖y_j‖²_W``. Other kernels replace the softmax by the
    normalised kernel weights ``D⁻¹Γ``.

    Args:
        d: token width.
        heads: number of heads ``h`` (energy ``Σ_h E_h``; MATH §1.2).
        k: per-head factor width (default ``d // heads``).
        kernel: ``"gaussian"`` (softmax), ``"power"``, ``"cauchy"`` or a :class:`energy.kernels.Kernel`.
        kernel_kwargs: arguments of the kernel (e.g. ``{"p": 1.0}``).
        preconditioner: ``"metric"`` (step (a)) or ``"token"`` (step (b)).
        alpha: step size; ``learn_alpha`` makes it a parameter.
        scale: ``κ`` of the metric (default ``1/√k``, the ``softmax(QKᵀ/√d_k)`` convention).
        orthogonal_heads: constrain the heads to mutually orthogonal subspaces (:class:`OrthogonalHeads`); each head
            then keeps its own descent guarantee.
        fused: use the fused core step :func:`energy.core.fused.fused_step` (scaled-dot-product attention with
            the β augmentation) for the Gaussian kernel, in inference and in training (its backward is autograd's);
            the result is the same map, tested against the energy's ``step`` (values and gradients). It passes
            ``grad``, ``vjp`` and ``vmap``; torch has no forward-mode derivative of its CPU flash-attention kernel,
            so for ``jvp``, ``linearize`` or ``hessian`` build the step with ``fused=False`` (the einsum core).
        init_std: standard deviation of the initial factor entries (default ``(k·d)^{-1/4}``, so that
            ``E[W] = I/√d``).
    """

    kind = "attention"
    term = "E_att"
    guarantee_kind = "mm"

    def __init__(
        self,
        d: int,
        *,
        heads: int = 1,
        k: int | None = None,
        kernel: str | Any = "gaussian",
        kernel_kwargs: dict[str, Any] | None = None,
        preconditioner: Preconditioner | str = "metric",
        alpha: float = 1.0,
        learn_alpha: bool = False,
        scale: float | None = None,
        orthogonal_heads: bool = False,
        fused: bool = True,
        init_std: float | None = None,
        alpha_range: tuple[float, float] | None = None,
        backtrack: int = 0,
    ) -> None:
        super().__init__(d, alpha=alpha, learn_alpha=learn_alpha)
        self.heads = positive_int(heads, "heads")
        if k is None:
            if d % heads:
                raise EnergyInputError(f"`heads` = {heads} does not divide d = {d}; pass the per-head width `k` "
                                       "or choose heads dividing d.")
            k = d // heads
        self.k = positive_int(k, "k")
        self.preconditioner = check_preconditioner(preconditioner).value
        self.kernel_name = kernel if isinstance(kernel, str) else None
        self.kernel_kwargs = dict(kernel_kwargs or {})
        self.kernel = make_kernel(kernel, **self.kernel_kwargs)
        self.scale = check_scale(scale)
        self.orthogonal_heads = bool(orthogonal_heads)
        self.fused = bool(fused)
        std = (self.k * d) ** -0.25 if init_std is None else float(init_std)
        self.init_std = init_std
        self.psd = PSDMetric(self.k, scale)  # W_h = κ M_h M_hᵀ: symmetric PSD by construction, named
        if self.orthogonal_heads:
            constraint = OrthogonalHeads(self.heads, d, self.k)  # checks heads·k ≤ d
            Q, _ = torch.linalg.qr(torch.randn(d, d))
            R = torch.randn(self.heads, self.k, self.k) * (std * math.sqrt(d / self.k))
            blocks = Q[:, : self.heads * self.k].reshape(d, self.heads, self.k).permute(1, 0, 2)
            self.M = nn.Parameter(blocks @ R)
            parametrize.register_parametrization(self, "M", constraint)
        else:
            self.M = nn.Parameter(torch.randn(self.heads, d, self.k) * std)
        self._setup_step_size(alpha_range, backtrack)

    def config(self) -> dict[str, Any]:
        if self.kernel_name is None:
            raise EnergyInputError(
                "this AttentionStep was built with a kernel object, which cannot be written to a config; build it with "
                "a kernel name ('gaussian', 'power', 'cauchy') and kernel_kwargs to save it."
            )
        return {
            **super().config(), "heads": self.heads, "k": self.k, "kernel": self.kernel_name,
            "kernel_kwargs": self.kernel_kwargs, "preconditioner": self.preconditioner, "scale": self.scale,
            "orthogonal_heads": self.orthogonal_heads, "fused": self.fused, "init_std": self.init_std,
        }

    @property
    def W(self) -> Tensor:
        """The per-head metric ``W_h = κ M_h M_hᵀ``, shape ``(h, d, d)`` (the named :class:`PSDMetric` of ``M``)."""
        return self.psd(self.M)

    @property
    def uses_fused(self) -> bool:
        """Whether the fused SDPA path computes this step (Gaussian kernel, no ridge)."""
        return self.fused and self.kernel.name == "gaussian"

    def build(self) -> AttentionEnergy | MultiHeadAttentionEnergy:
        M = self.M
        if self.heads == 1:
            return AttentionEnergy(M[0], kernel=self.kernel, scale=self.scale)
        return MultiHeadAttentionEnergy(M, kernel=self.kernel, scale=self.scale)

    def _range_of(self, energy: Energy) -> StepRange:
        return energy.step_range(preconditioner=self.preconditioner)

    def guaranteed_range(self) -> StepRange | None:
        r"""Step (a) of one head or of orthogonal heads: the kernel's range; general heads: the empty range
        (MATH §1.2); step (b): ``None`` (the range depends on :math:`\lambda_{\max}(W)`).
        """
        if self.preconditioner == Preconditioner.TOKEN:
            return None
        orthogonal = self.heads == 1 or self.orthogonal_heads
        return attention_step_range(self.kernel, Preconditioner.METRIC, lambda_max_W=0.0, orthogonal_heads=orthogonal)

    def _tensors(self) -> dict[str, Any]:
        M = self.M
        kappa = core_att.kappa(self.scale, self.k)
        values, out = core_att.value_output_maps(M, kappa, self.preconditioner, single=self.heads == 1)
        return {"M": M, "kappa": kappa, "values": values, "out": out}

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        alpha = self._alpha()
        if self.uses_fused:  # autograd- and torch.func-safe; the same map as the energy's step
            return fused_step(Y, t["M"], alpha, t["kappa"], t["values"], t["out"])
        return core_att.batch_chunks(
            lambda Yc, mc: core_att.head_step(Yc, t["M"], t["kappa"], self.kernel, 0.0, mc, t["values"], t["out"],
                                              alpha),
            Y, None, self.heads)

    def forward_prepared_and_energy(self, prepared: Prepared, Y: Tensor) -> tuple[Tensor, Tensor | None]:
        r"""``(Y⁺, E_att(Y))``: the step and the attention energy at its input from the same pairwise quantities
        (:func:`energy.core.attention.head_step_and_energy`; on the fused path the attention kernel's row
        log-normalisers, :func:`energy.core.fused.fused_step_and_energy`). ``Y⁺`` is the same map as
        :meth:`forward_prepared`.
        """
        if self.backtrack:
            return super().forward_prepared_and_energy(prepared, Y)
        t, Y, alpha = prepared.tensors, self._check_Y(Y), self._alpha()
        if self.uses_fused:
            return fused_step_and_energy(Y, t["M"], alpha, t["kappa"], t["values"], t["out"])
        return core_att.batch_chunks(
            lambda Yc, mc: core_att.head_step_and_energy(Yc, t["M"], t["kappa"], self.kernel, 0.0, mc, t["values"],
                                                         t["out"], alpha),
            Y, None, self.heads)

    def _energy_term(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        return core_att.batch_chunks(
            lambda Yc, mc: core_att.head_energy(Yc, t["M"], t["kappa"], self.kernel, 0.0, mc).sum(-1),
            Y, None, self.heads)

    def rounding_scale(self, Y: Tensor) -> float:
        r"""``½·n·h``: the energy is :math:`-\tfrac12(\sum_{ij}\gamma_{ij} - \sum_i\gamma_{ii})` per head
        (:func:`energy.core.attention.gaussian_energy`), so its rounding is relative to the diagonal's ``n`` ones,
        not to the (possibly tiny) result.
        """
        return 0.5 * Y.shape[-2] * self.heads


# ------------------------------------------------------------------------------------------------------------- FFN


class _GradientStep(Step):
    """A plain gradient step ``Y − α∇E(Y)`` (MATH §1.5) on an energy of :mod:`energy.ffn`, whose pure formulas are
    the energy class's ``FORMULAS`` (called as ``f(Y, W, b)``); subclasses give ``ENERGY`` and :meth:`_weights`.
    """

    ENERGY: ClassVar[type[FFNEnergy] | type[TiedReLUEnergy]]
    projection_compatible = True

    def _weights(self) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self) -> Energy:
        return self.ENERGY(*self._weights())  # type: ignore[arg-type]  # FFNEnergy's b is a tensor (a buffer)

    def _tensors(self) -> dict[str, Any]:
        return {"weights": self._weights()}

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        return core_ffn.descent_step(Y, self.ENERGY.FORMULAS[1](Y, *t["weights"]), self._alpha())

    def _energy_term(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        return self.ENERGY.FORMULAS[0](Y, *t["weights"])


class FFNStep(_GradientStep):
    r"""Gradient step on the feed-forward energy (MATH §1.3).

    .. math:: Y^+ = Y - \alpha\big(Y (I + W_f) - 1 b^\top\big) = (1-\alpha) Y - \alpha Y W_f + \alpha 1 b^\top

    ``W_f`` is constrained by :class:`SpectrumClip` (``spectrum=(lo, hi)``, default ``[0, 0.95]`` so that ``α = 1``
    descends; ``spectrum_map="smooth"``: :class:`SpectrumSquash`, the smooth map into the open band, whose every
    eigen-direction keeps a gradient during training, MATH §7.3) or, with ``spectrum=None``, only by
    :class:`Symmetric`. Both store an original whose spectrum lies strictly inside the band (the draw's spectrum
    mapped by :func:`~unfold.parametrizations.squash`), so every eigen-direction gets a gradient at
    initialisation.

    Args:
        d: token width.
        spectrum: eigenvalue bounds of ``W_f`` or ``None``.
        bias: learn ``b`` (else ``b = 0``, a buffer).
        alpha, learn_alpha: step size.
        init_std: std of the entries of the unconstrained matrix (default ``1/√d``).
        alpha_range, backtrack: step-size policy (:class:`~unfold.step_base.Step`).
        spectrum_map: ``"clip"`` (default; the reference code's map) or ``"smooth"``.
    """

    kind = "ffn"
    term = "E_ffn"
    ENERGY = FFNEnergy

    def __init__(
        self,
        d: int,
        *,
        spectrum: tuple[float, float] | None = (0.0, 0.95),
        bias: bool = True,
        alpha: float = 1.0,
        learn_alpha: bool = False,
        init_std: float | None = None,
        alpha_range: tuple[float, float] | None = None,
        backtrack: int = 0,
        spectrum_map: str = "clip",
    ) -> None:
        super().__init__(d, alpha=alpha, learn_alpha=learn_alpha)
        self.spectrum = None if spectrum is None else check_spectrum(spectrum)
        if spectrum_map not in ("clip", "smooth"):
            raise EnergyInputError(f"`spectrum_map` must be 'clip' (SpectrumClip) or 'smooth' (SpectrumSquash), got "
                                   f"{spectrum_map!r}.")
        if spectrum_map == "smooth" and self.spectrum is not None and not self.spectrum[0] < self.spectrum[1]:
            raise EnergyInputError(f"spectrum_map='smooth' needs an open band lo < hi, got spectrum={spectrum!r}; "
                                   "use spectrum_map='clip' for a single value.")
        self.spectrum_map = spectrum_map
        guaranteed = self.guaranteed_range()
        if guaranteed is not None:  # warn now (raise in strict mode), not only at the first forward
            guaranteed.check(self.alpha_value)
        self.bias = bool(bias)
        self.init_std = init_std
        std = 1.0 / math.sqrt(d) if init_std is None else float(init_std)
        A = torch.randn(d, d) * std
        A = 0.5 * (A + A.T)
        constraint: nn.Module
        if self.spectrum is not None:
            # the original has its spectrum *strictly inside* the band (the smooth map g of the draw's): the clip is
            # the identity there (derivative 1 on every eigen-direction; a clipped start would put about half of the
            # eigenvalues on the band's edge, where they get none), the squash has g' ≥ 1 − tanh²(1) ≈ 0.42 there
            # (a start W_f = g(g(S)), spectrum in about (0.12, 0.84) for [0, 0.95])
            A = interior_start(A, *self.spectrum)
            constraint = SpectrumSquash(*self.spectrum) if spectrum_map == "smooth" else SpectrumClip(*self.spectrum)
        else:
            constraint = Symmetric()
        if isinstance(constraint, SpectrumSquash):  # register on a valid value, then set the original itself
            self.W_f = nn.Parameter(0.5 * (constraint.lo + constraint.hi) * torch.eye(d))
            parametrize.register_parametrization(self, "W_f", constraint)
            with torch.no_grad():
                self.get_parameter("parametrizations.W_f.original").copy_(A)
        else:
            self.W_f = nn.Parameter(A)
            parametrize.register_parametrization(self, "W_f", constraint)
        if self.bias:
            self.b = nn.Parameter(torch.zeros(d))
        else:
            self.register_buffer("b", torch.zeros(d))
        self._setup_step_size(alpha_range, backtrack)

    def config(self) -> dict[str, Any]:
        out = {**super().config(), "spectrum": None if self.spectrum is None else list(self.spectrum),
               "bias": self.bias, "init_std": self.init_std}
        if self.spectrum_map != "clip":  # the default, and the meaning of files without the key
            out["spectrum_map"] = self.spectrum_map
        return out

    def _weights(self) -> tuple[Tensor, Tensor | None]:
        return self.W_f, self.b

    def guaranteed_range(self) -> StepRange | None:
        r"""With ``spectrum=(lo, hi)``: :math:`\lambda_{\max}(I + W_f) \le 1 + hi`, so ``(0, 2/(1 + hi))``
        descends (MATH §1.3); without it ``None``.
        """
        if self.spectrum is None:
            return None
        L = 1.0 + self.spectrum[1]
        if L <= 0:
            return StepRange(0.0, math.inf, "MATH §1.3: λ_max(I + W_f) ≤ 0 by the spectrum constraint")
        return StepRange(0.0, 2.0 / L, f"MATH §1.3: α < 2/λ_max(I + W_f), λ_max ≤ 1 + {self.spectrum[1]:g} by the "
                                       "spectrum constraint")



class TiedReLUFFNStep(_GradientStep):
    r"""Residual two-matrix ReLU FFN with tied weights ``W_2 = α W_1ᵀ`` (MATH §1.3; Energy Transformer's ``E_hn``).

    .. math:: Y^+ = Y + \alpha\,\mathrm{ReLU}(Y W_1 + 1 b^\top)\, W_1^\top

    the gradient step of the concave energy ``−½ Σ_i ‖ReLU(y_i W_1 + b)‖²`` (every ``α > 0`` descends).

    Args:
        d: token width.
        hidden: width ``m`` of ``W_1 ∈ R^{d×m}``.
        bias: learn ``b`` (else none).
    """

    kind = "tied_ffn"
    term = "E_hn"
    ENERGY = TiedReLUEnergy

    def __init__(self, d: int, *, hidden: int | None = None, bias: bool = True, alpha: float = 1.0,
                 learn_alpha: bool = False) -> None:
        super().__init__(d, alpha=alpha, learn_alpha=learn_alpha)
        self.hidden = positive_int(hidden if hidden is not None else 2 * d, "hidden")
        self.W_1 = nn.Parameter(torch.randn(d, self.hidden) / math.sqrt(d * self.hidden))
        self.b = nn.Parameter(torch.zeros(self.hidden)) if bias else None
        self.has_bias = bool(bias)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "hidden": self.hidden, "bias": self.has_bias}

    def _weights(self) -> tuple[Tensor, Tensor | None]:
        return self.W_1, self.b

    def guaranteed_range(self) -> StepRange | None:
        return TiedReLUEnergy.RANGE


# ------------------------------------------------------------------------------------------------------ projections


class _Projection(Step):
    """A projection onto a set (the proximal map of its indicator): no energy term, no step size."""

    def __init__(self, d: int) -> None:
        nn.Module.__init__(self)
        self.d = positive_int(d, "d")
        self.learn_alpha = False

    def config(self) -> dict[str, Any]:
        return {}


class ReLUProjection(_Projection):
    r"""Euclidean projection onto ``{Y ≥ 0}`` (MATH §1.3): ``Y ↦ ReLU(Y)``.

    After an FFN step this is the projected-gradient step on ``E_ffn + ι_{≥0}``.
    """

    kind = "relu"

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        return torch.relu(Y)


class _SphereProjection(_Projection):
    """Shared ``eps`` handling of the normalisation projections: ``eps = 0`` the exact projection, ``eps > 0`` the
    normalisation layer's map (both from :mod:`energy.core.norm`).
    """

    def __init__(self, d: int, *, eps: float = 0.0) -> None:
        super().__init__(d)
        self.eps = check_real(eps, "eps")

    def config(self) -> dict[str, Any]:
        return {"eps": self.eps}


class LayerNormProjection(_SphereProjection):
    r"""LayerNorm without affine part as a projection (MATH §1.4): centre each token, rescale it to norm ``√d``.

    ``eps = 0`` (default): the exact Euclidean projection :func:`energy.normalization.layernorm_projection`, which
    raises for a constant token (no unique projection). ``eps > 0``: ``nn.LayerNorm``'s map
    (:func:`energy.reference.layer_norm`), the projection followed by a radial shrink ``‖y_c‖/√(‖y_c‖² + dε)``;
    defined for every token (a constant token maps to 0), slightly inside the sphere. The affine ``(γ, b)`` of a
    standard LayerNorm is left out (it can be absorbed into the next attention metric, see
    :mod:`energy.normalization`). The sphere is not convex, so no descent guarantee is claimed — the unroller's
    trace shows what the energy does.
    """

    kind = "layernorm"

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        return core_norm.layernorm_projection(Y) if self.eps == 0.0 else core_norm.layer_norm(Y, eps=self.eps)


class RMSNormProjection(_SphereProjection):
    r"""RMSNorm without gain as the projection onto the sphere of radius ``√d`` (MATH §1.4).

    ``eps = 0``: :func:`energy.normalization.rmsnorm_projection` (raises for a zero token); ``eps > 0``:
    :func:`energy.reference.rms_norm`. No descent guarantee (non-convex set).
    """

    kind = "rmsnorm"

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        return core_norm.rmsnorm_projection(Y) if self.eps == 0.0 else core_norm.rms_norm(Y, eps=self.eps)


# ------------------------------------------------------------------------------------------------ related energies


class HopfieldStep(Step):
    r"""Modern Hopfield update of every token against learned stored patterns (MATH §2.1).

    .. math:: \xi^+ = X^\top \mathrm{softmax}(\beta X \xi)

    applied to each token ``ξ = y_i`` with stored patterns ``X ∈ R^{N×d}`` (a parameter): one CCCP step on
    :class:`energy.hopfield.HopfieldEnergy` (``α = 1``), which decreases monotonically; ``α ≠ 1`` gives the relaxed
    step ``(1−α)ξ + α ξ⁺`` (descent for ``α ∈ (0, 2)``, see that class).

    Args:
        d: token width.
        patterns: number ``N`` of stored patterns.
        beta: inverse temperature.
    """

    kind = "hopfield"
    term = "E_hopfield"

    def __init__(self, d: int, *, patterns: int = 16, beta: float = 1.0, alpha: float = 1.0,
                 learn_alpha: bool = False) -> None:
        super().__init__(d, alpha=alpha, learn_alpha=learn_alpha)
        self.patterns = positive_int(patterns, "patterns")
        self.beta = check_real(beta, "beta", positive=True, what="(the inverse temperature)")
        self.X = nn.Parameter(torch.randn(self.patterns, d) / math.sqrt(d))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "patterns": self.patterns, "beta": self.beta}

    def build(self) -> HopfieldEnergy:
        return HopfieldEnergy(self.X, self.beta)

    def guaranteed_range(self) -> StepRange | None:
        return HopfieldEnergy.RANGE

    def _tensors(self) -> dict[str, Any]:
        return {"X": self.X}

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        return core_ffn.relaxed_step(Y, core_rel.hopfield_update(Y, t["X"], self.beta), self._alpha())

    def _energy_term(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        return core_rel.hopfield_energy_per_query(Y, t["X"], self.beta).sum(-1)


class EnergyTransformerStep(Step):
    r"""One discrete step of the Energy Transformer (MATH §2.2): ``x ← x − α ∂E/∂g`` with ``g = LN(x)``.

    ``E = E_att + E_hn`` of :class:`energy.energy_transformer.EnergyTransformerEnergy`; the step is that
    object's ``step``. Parameters: per-head query/key maps ``W_Q, W_K`` (``(h, d, k)``) and the Hopfield memories
    ``ξ`` (``(m, d)``).

    Args:
        d: token width.
        heads: number of heads.
        k: per-head key width.
        memories: number of Hopfield memories.
        beta: attention inverse temperature (default ``1/√k``).
        alpha: step size.
    """

    kind = "energy_transformer"
    term = "E_et"

    def __init__(self, d: int, *, heads: int = 1, k: int | None = None, memories: int | None = None,
                 beta: float | None = None, alpha: float = 0.1, learn_alpha: bool = False) -> None:
        super().__init__(d, alpha=alpha, learn_alpha=learn_alpha)
        self.heads = positive_int(heads, "heads")
        self.k = positive_int(k if k is not None else max(1, d // heads), "k")
        self.memories = positive_int(memories if memories is not None else 2 * d, "memories")
        self.beta = float(core_att.kappa(beta, self.k))
        std = 1.0 / math.sqrt(d)
        self.W_Q = nn.Parameter(torch.randn(self.heads, d, self.k) * std)
        self.W_K = nn.Parameter(torch.randn(self.heads, d, self.k) * std)
        self.xi = nn.Parameter(torch.randn(self.memories, d) * std)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "heads": self.heads, "k": self.k, "memories": self.memories, "beta": self.beta}

    def build(self) -> EnergyTransformerEnergy:
        return EnergyTransformerEnergy(self.W_Q, self.W_K, self.xi, beta=self.beta)

    def guaranteed_range(self) -> StepRange | None:
        return EnergyTransformerEnergy.RANGE

    def _tensors(self) -> dict[str, Any]:
        return {"W_Q": self.W_Q, "W_K": self.W_K, "xi": self.xi}

    def _step(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        G = core_rel.et_normalize(Y, 1.0, None, EnergyTransformerEnergy.EPS)
        D = core_rel.et_grad_g(G, t["W_Q"], t["W_K"], t["xi"], self.beta, True)
        return core_ffn.descent_step(Y, D, self._alpha())

    def _energy_term(self, t: dict[str, Any], Y: Tensor) -> Tensor:
        G = core_rel.et_normalize(Y, 1.0, None, EnergyTransformerEnergy.EPS)
        return (core_rel.et_attention_energy(G, t["W_Q"], t["W_K"], self.beta, True)
                + core_ffn.tied_relu_energy(G, t["xi"].T))


#: schedule name → step class (the unroller's vocabulary)
STEP_TYPES: dict[str, type[Step]] = {
    cls.kind: cls
    for cls in (AttentionStep, FFNStep, TiedReLUFFNStep, ReLUProjection, LayerNormProjection, RMSNormProjection,
                HopfieldStep, EnergyTransformerStep)
}

# the steps of other modules join the vocabulary here, so that every model file can be rebuilt after importing the
# unroller (these modules import this one; the names they need are defined above)
from unfold.energy_ffn import EnergyMLPStep  # noqa: E402
from unfold.sphere import BoundedAttentionStep, SphereAttentionStep, SphereFFNStep, SphereMLPStep  # noqa: E402

_MORE_STEPS: tuple[type[Step], ...] = (SphereAttentionStep, SphereFFNStep, SphereMLPStep, EnergyMLPStep,
                                       BoundedAttentionStep)
STEP_TYPES.update({cls.kind: cls for cls in _MORE_STEPS})
