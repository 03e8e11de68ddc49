r"""One ``nn.Module`` per descent step: the layers an unrolled Transformer is built from (MATH §1).

Every step module carries its weights through named parametrisations (:mod:`unfold.parametrizations`) and answers

* ``build()`` / ``.energy`` — the :mod:`energy` object made from the *current* (constrained) weights, or ``None``
  for a projection (ReLU, LayerNorm, RMSNorm: indicator functions, zero on their set);
* ``prepare()`` — a :class:`Prepared` (the built energy plus a per-pass cache; the step size is checked here, once);
* ``apply(prepared, Y)`` — the descent step (so a weight-tied model evaluates its parametrisations once per forward
  pass, however deep it is);
* ``apply_and_energy(prepared, Y)`` — ``(Y⁺, E_term(Y))`` if the step computes its energy term at ``Y`` in passing
  (the attention step), else ``(Y⁺, None)`` (used by the unroller's traces);
* ``forward(Y)`` = ``apply(prepare(), Y)``.

Step sizes. ``alpha`` is a non-persistent float64 buffer (fixed; part of ``config()``) or, with
``learn_alpha=True``, a parameter. A gradient step is affine in ``α`` (MATH §1.5: ``Y − α P⁻¹∇E = Y + α (T(Y) − Y)``
with ``T`` the ``α = 1`` step), which is how a learnable ``α`` keeps the graph where the energy's ``step`` takes a
float; the attention energies accept a tensor ``α`` directly.
``α`` is checked against the energy's ``step_range`` (warning, or error in ``strict_mode``).

Each step class has a schedule name (``kind``) and, if it descends an energy, the name of its energy term
(``term``) used in the unroller's traces.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from energy import kernels
from energy._validation import EnergyInputError, StepSizeWarning, check_step_size, check_tensor
from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy, attention_step_fused, head_bases
from energy.base import Energy
from energy.energy_transformer import EnergyTransformerEnergy
from energy.ffn import FFNEnergy, TiedReLUEnergy
from energy.hopfield import HopfieldEnergy
from energy.normalization import layernorm_projection, rmsnorm_projection
from energy.reference import layer_norm, rms_norm
from unfold.parametrizations import OrthogonalHeads, PSDMetric, SpectrumClip, Symmetric

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


def _positive_int(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise EnergyInputError(f"`{name}` must be a positive integer, got {v!r}.")
    return v


def make_kernel(kernel: str | Any, **kwargs: Any) -> Any:
    """Kernel from a name (``"gaussian"``, ``"power"``, ``"cauchy"``); an :class:`energy.kernels.Kernel` passes."""
    if not isinstance(kernel, str):
        if not isinstance(kernel, kernels.Kernel):
            raise EnergyInputError(f"`kernel` must be a name or an energy.kernels.Kernel, got {type(kernel).__name__}.")
        return kernel
    table = {"gaussian": kernels.GaussianKernel, "power": kernels.PowerKernel, "cauchy": kernels.CauchyKernel}
    if kernel not in table:
        raise EnergyInputError(f"unknown kernel {kernel!r}; valid names: {sorted(table)}.")
    return table[kernel](**kwargs)


@dataclass
class Prepared:
    """What one forward pass needs from a step's weights: the energy object and any per-pass cache."""

    energy: Energy | None
    cache: dict[str, Any] = field(default_factory=dict)


class Step(nn.Module):
    """Base class of the step modules (see the module docstring)."""

    #: schedule name of the step (``"attention"``, ``"ffn"``, ...)
    kind: ClassVar[str] = "step"
    #: name of the energy term this step descends (``None`` for projections)
    term: ClassVar[str | None] = None

    def __init__(self, d: int, *, alpha: float = 1.0, learn_alpha: bool = False) -> None:
        super().__init__()
        self.d = _positive_int(d, "d")
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise EnergyInputError(f"`alpha` must be a finite real number, got {alpha!r}.")
        if learn_alpha:
            self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        else:  # part of the configuration (saved in config(), not in the state dict); float64 keeps it exact
            self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float64), persistent=False)
        self.learn_alpha = learn_alpha

    # -- interface -------------------------------------------------------------------------------------------------
    def build(self) -> Energy | None:
        """The energy object made from the current (constrained) weights; ``None`` for projections."""
        return None

    def prepare(self) -> Prepared:
        """Evaluate the parametrisations once (and check the step size once) for one forward pass."""
        return Prepared(self.build())

    def apply(self, prepared: Prepared, Y: Tensor) -> Tensor:
        """The descent step ``energy.step(Y, α)`` of the prepared energy (projections and the attention step
        override this); a learnable ``α`` goes through :meth:`_affine_in_alpha`."""
        self._check_Y(Y)
        energy = prepared.energy
        if self.learn_alpha:
            return self._affine_in_alpha(Y, lambda Z: energy.step(Z, 1.0), energy.step_range)
        return energy.step(Y, float(self.alpha))

    def apply_and_energy(self, prepared: Prepared, Y: Tensor) -> tuple[Tensor, Tensor | None]:
        """The step and, if the step computes it in passing, its energy term at the input ``Y`` (else ``None``).

        The unroller's traces call this at recorded states; steps that can return ``E(Y)`` almost for free (the
        attention step: the same ``z`` / log-normalisers) override it.
        """
        return self.apply(prepared, Y), None

    def energy_at(self, prepared: Prepared, Y: Tensor) -> Tensor:
        """This step's energy term at ``Y`` from the prepared energy object (the unroller's traces)."""
        return prepared.energy.energy(Y)

    def forward(self, Y: Tensor) -> Tensor:
        return self.apply(self.prepare(), Y)

    @property
    def energy(self) -> Energy | None:
        """The energy this step descends, built from its current parameters (``None`` for a projection)."""
        return self.build()

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this step (JSON-serialisable), without ``d``."""
        return {"alpha": float(self.alpha.detach()), "learn_alpha": self.learn_alpha}

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _check_Y(self, Y: Tensor) -> Tensor:
        return check_tensor(Y, "Y", min_ndim=2, trailing=(None, self.d), finite=False)

    def _affine_in_alpha(self, Y: Tensor, unit_step, step_range) -> Tensor:
        """``Y + α (T(Y) − Y)`` with ``T`` the ``α = 1`` step (MATH §1.5), for a learnable ``α`` tensor."""
        r = step_range()
        check_step_size(float(self.alpha.detach()), f"{self.kind}.alpha", low=r.low, high=r.high, reason=r.reason,
                        high_inclusive=r.high_inclusive)
        with warnings.catch_warnings():  # the α = 1 evaluation is an algebraic device, not the step taken
            warnings.simplefilter("ignore", StepSizeWarning)
            T = unit_step(Y)
        return Y + self.alpha.to(Y.dtype) * (T - Y)


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
        fused: use :func:`energy.attention.attention_step_fused` (scaled-dot-product attention with the β
            augmentation) for the Gaussian kernel, in inference and in training (its backward is autograd's);
            the result is the same map, tested against the energy's ``step`` (values and gradients).
        init_std: standard deviation of the initial factor entries (default ``(k·d)^{-1/4}``, so that
            ``E[W] = I/√d``).
    """

    kind = "attention"
    term = "E_att"

    def __init__(
        self,
        d: int,
        *,
        heads: int = 1,
        k: int | None = None,
        kernel: str | Any = "gaussian",
        kernel_kwargs: dict[str, Any] | None = None,
        preconditioner: str = "metric",
        alpha: float = 1.0,
        learn_alpha: bool = False,
        scale: float | None = None,
        orthogonal_heads: bool = False,
        fused: bool = True,
        init_std: float | None = None,
    ) -> None:
        super().__init__(d, alpha=alpha, learn_alpha=learn_alpha)
        self.heads = _positive_int(heads, "heads")
        if k is None:
            if d % heads:
                raise EnergyInputError(f"`heads` = {heads} does not divide d = {d}; pass the per-head width `k`.")
            k = d // heads
        self.k = _positive_int(k, "k")
        if preconditioner not in ("metric", "token"):
            raise EnergyInputError(
                f"`preconditioner` must be 'metric' (step (a)) or 'token' (step (b)), got {preconditioner!r}."
            )
        self.preconditioner = preconditioner
        self.kernel_name = kernel if isinstance(kernel, str) else None
        self.kernel_kwargs = dict(kernel_kwargs or {})
        self.kernel = make_kernel(kernel, **self.kernel_kwargs)
        self.scale = scale
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

    def build(self) -> Energy:
        M = self.M
        if self.heads == 1:
            return AttentionEnergy(M[0], kernel=self.kernel, scale=self.scale)
        return MultiHeadAttentionEnergy(M, kernel=self.kernel, scale=self.scale)

    def prepare(self) -> Prepared:
        """Build the energy, check ``α`` against its guaranteed range once, cache the heads' value bases."""
        energy = self.build()
        r = energy.step_range(preconditioner=self.preconditioner)
        check_step_size(float(self.alpha.detach()), f"{self.kind}.alpha", low=r.low, high=r.high, reason=r.reason,
                        high_inclusive=r.high_inclusive)
        cache: dict[str, Any] = {}
        if self.uses_fused and self.heads > 1 and self.preconditioner == "metric":
            cache["value_basis"] = head_bases(energy.M)
        return Prepared(energy, cache)

    def apply(self, prepared: Prepared, Y: Tensor) -> Tensor:
        """Step (a) or (b) at ``Y``; ``α`` may be a learnable tensor (the steps are affine in ``α``)."""
        return self._step(prepared, Y, with_energy=False)

    def apply_and_energy(self, prepared: Prepared, Y: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(Y⁺, E_att(Y))``: the step and the attention energy at its input from the same pairwise quantities
        (:meth:`energy.attention.AttentionEnergy.step_and_energy`; on the fused path, the attention kernel's row
        log-normalisers, ``return_energy`` of :func:`energy.attention.attention_step_fused`). ``Y⁺`` is the same
        map as :meth:`apply`."""
        return self._step(prepared, Y, with_energy=True)

    def energy_at(self, prepared: Prepared, Y: Tensor) -> Tensor:
        """``E_att(Y)`` without re-validating ``Y`` (a state the model produced itself; one pass over it saved)."""
        return prepared.energy.energy(Y, check=False)

    def _step(self, prepared: Prepared, Y: Tensor, with_energy: bool) -> Tensor | tuple[Tensor, Tensor]:
        self._check_Y(Y)
        energy = prepared.energy
        alpha = self.alpha if self.learn_alpha else float(self.alpha)
        if self.uses_fused:  # autograd-safe (training included); same map as the energy's step
            return attention_step_fused(Y, energy.M, alpha, scale=energy.scale, preconditioner=self.preconditioner,
                                        value_basis=prepared.cache.get("value_basis"), check=False,
                                        return_energy=with_energy)
        with warnings.catch_warnings():  # α was checked once in prepare()
            warnings.simplefilter("ignore", StepSizeWarning)
            if with_energy:
                return energy.step_and_energy(Y, alpha, preconditioner=self.preconditioner)
            return energy.step(Y, alpha, preconditioner=self.preconditioner)


# ------------------------------------------------------------------------------------------------------------- FFN


class FFNStep(Step):
    r"""Gradient step on the feed-forward energy (MATH §1.3).

    .. math:: Y^+ = Y - \alpha\big(Y (I + W_f) - 1 b^\top\big) = (1-\alpha) Y - \alpha Y W_f + \alpha 1 b^\top

    ``W_f`` is constrained by :class:`SpectrumClip` (``spectrum=(lo, hi)``, default ``[0, 0.95]`` so that ``α = 1``
    descends) or, with ``spectrum=None``, only by :class:`Symmetric`.

    Args:
        d: token width.
        spectrum: eigenvalue bounds of ``W_f`` or ``None``.
        bias: learn ``b`` (else ``b = 0``, a buffer).
        alpha, learn_alpha: step size.
        init_std: std of the entries of the unconstrained matrix (default ``1/√d``).
    """

    kind = "ffn"
    term = "E_ffn"

    def __init__(
        self,
        d: int,
        *,
        spectrum: tuple[float, float] | None = (0.0, 0.95),
        bias: bool = True,
        alpha: float = 1.0,
        learn_alpha: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__(d, alpha=alpha, learn_alpha=learn_alpha)
        self.spectrum = None if spectrum is None else (float(spectrum[0]), float(spectrum[1]))
        self.bias = bool(bias)
        self.init_std = init_std
        std = 1.0 / math.sqrt(d) if init_std is None else float(init_std)
        A = torch.randn(d, d) * std
        A = 0.5 * (A + A.T)
        if self.spectrum is not None:
            constraint = SpectrumClip(*self.spectrum)
            A = constraint(A)  # a valid starting value (right_inverse checks it)
        else:
            constraint = Symmetric()
        self.W_f = nn.Parameter(A)
        parametrize.register_parametrization(self, "W_f", constraint)
        if self.bias:
            self.b = nn.Parameter(torch.zeros(d))
        else:
            self.register_buffer("b", torch.zeros(d))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "spectrum": None if self.spectrum is None else list(self.spectrum),
                "bias": self.bias, "init_std": self.init_std}

    def build(self) -> Energy:
        return FFNEnergy(self.W_f, self.b)


class TiedReLUFFNStep(Step):
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

    def __init__(self, d: int, *, hidden: int | None = None, bias: bool = True, alpha: float = 1.0,
                 learn_alpha: bool = False) -> None:
        super().__init__(d, alpha=alpha, learn_alpha=learn_alpha)
        self.hidden = _positive_int(hidden if hidden is not None else 2 * d, "hidden")
        self.W_1 = nn.Parameter(torch.randn(d, self.hidden) / math.sqrt(d * self.hidden))
        self.b = nn.Parameter(torch.zeros(self.hidden)) if bias else None
        self.has_bias = bool(bias)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "hidden": self.hidden, "bias": self.has_bias}

    def build(self) -> Energy:
        return TiedReLUEnergy(self.W_1, self.b)


# ------------------------------------------------------------------------------------------------------ projections


class _Projection(Step):
    """A projection onto a set (the proximal map of its indicator): no energy term, no step size."""

    def __init__(self, d: int) -> None:
        nn.Module.__init__(self)
        self.d = _positive_int(d, "d")
        self.learn_alpha = False

    def config(self) -> dict[str, Any]:
        return {}


class ReLUProjection(_Projection):
    r"""Euclidean projection onto ``{Y ≥ 0}`` (MATH §1.3): ``Y ↦ ReLU(Y)``.

    After an FFN step this is the projected-gradient step on ``E_ffn + ι_{≥0}``.
    """

    kind = "relu"

    def apply(self, prepared: Prepared, Y: Tensor) -> Tensor:
        self._check_Y(Y)
        return torch.relu(Y)


class _SphereProjection(_Projection):
    """Shared ``eps`` handling of the normalisation projections."""

    def __init__(self, d: int, *, eps: float = 0.0) -> None:
        super().__init__(d)
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise EnergyInputError(f"`eps` must be a finite number ≥ 0, got {eps!r}.")
        self.eps = float(eps)

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

    def apply(self, prepared: Prepared, Y: Tensor) -> Tensor:
        self._check_Y(Y)
        return layernorm_projection(Y) if self.eps == 0.0 else layer_norm(Y, eps=self.eps)


class RMSNormProjection(_SphereProjection):
    r"""RMSNorm without gain as the projection onto the sphere of radius ``√d`` (MATH §1.4).

    ``eps = 0``: :func:`energy.normalization.rmsnorm_projection` (raises for a zero token); ``eps > 0``:
    :func:`energy.reference.rms_norm`. No descent guarantee (non-convex set).
    """

    kind = "rmsnorm"

    def apply(self, prepared: Prepared, Y: Tensor) -> Tensor:
        self._check_Y(Y)
        return rmsnorm_projection(Y) if self.eps == 0.0 else rms_norm(Y, eps=self.eps)


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
        self.patterns = _positive_int(patterns, "patterns")
        self.beta = float(beta)
        self.X = nn.Parameter(torch.randn(self.patterns, d) / math.sqrt(d))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "patterns": self.patterns, "beta": self.beta}

    def build(self) -> Energy:
        return HopfieldEnergy(self.X, self.beta)


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
        self.heads = _positive_int(heads, "heads")
        self.k = _positive_int(k if k is not None else max(1, d // heads), "k")
        self.memories = _positive_int(memories if memories is not None else 2 * d, "memories")
        self.beta = 1.0 / math.sqrt(self.k) if beta is None else float(beta)
        std = 1.0 / math.sqrt(d)
        self.W_Q = nn.Parameter(torch.randn(self.heads, d, self.k) * std)
        self.W_K = nn.Parameter(torch.randn(self.heads, d, self.k) * std)
        self.xi = nn.Parameter(torch.randn(self.memories, d) * std)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "heads": self.heads, "k": self.k, "memories": self.memories, "beta": self.beta}

    def build(self) -> Energy:
        return EnergyTransformerEnergy(self.W_Q, self.W_K, self.xi, beta=self.beta)


#: schedule name → step class (the unroller's vocabulary)
STEP_TYPES: dict[str, type[Step]] = {
    cls.kind: cls
    for cls in (AttentionStep, FFNStep, TiedReLUFFNStep, ReLUProjection, LayerNormProjection, RMSNormProjection,
                HopfieldStep, EnergyTransformerStep)
}
