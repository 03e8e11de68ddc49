r"""Energy Transformer energy (Hoover et al., NeurIPS 2023; MATH §2.2).

Token states ``x_B ∈ R^d`` (rows of ``x ∈ R^{... × n × d}``) are normalised by a LayerNorm written as the gradient
of a convex Lagrangian,

.. math::
    L(x) = d\,\gamma \sqrt{\tfrac1d \textstyle\sum_j (x_j - \bar x)^2 + \varepsilon} + \delta^\top x ,

.. math::
    g = \frac{\partial L}{\partial x}
      = \gamma\, \frac{x - \bar x 1}{\sqrt{\tfrac1d \|x - \bar x 1\|^2 + \varepsilon}} + \delta ,

i.e. ``g = nn.LayerNorm(d, eps)(x)`` with weight ``γ·1`` and bias ``δ`` (computed by
:func:`energy.reference.layer_norm`). Its Hessian is

.. math:: \frac{\partial g}{\partial x} = \frac{\gamma}{\tilde\sigma}\Big(I - \tfrac1d 11^\top - u u^\top\Big),
          \qquad \tilde\sigma = \sqrt{\tfrac1d\|x_c\|^2 + \varepsilon},\quad u = \frac{x_c}{\sqrt d\,\tilde\sigma},

with ``u ⊥ 1`` and ``‖u‖² = ‖x_c‖²/(‖x_c‖² + dε) < 1``: positive semi-definite **iff γ ≥ 0**. ``γ`` must be a
*scalar*: with a per-feature weight ``diag(γ)``, ``∂g/∂x = diag(γ) J`` is not symmetric, so ``g`` is the gradient of
no Lagrangian. The constructor requires a scalar ``γ > 0``.

The energy of the normalised tokens ``G`` (rows ``g_B``), with heads ``h``, ``Q_h = G W_Q[h]``, ``K_h = G W_K[h]``:

.. math::
    E_{att}(G) = -\frac1\beta \sum_h \sum_C \log \sum_{B \ne C} \exp\big(\beta\, k_{hB}^\top q_{hC}\big),\qquad
    E_{hn}(G) = -\tfrac12 \sum_\mu \sum_B \mathrm{ReLU}(\xi_\mu^\top g_B)^2 ,

``E = E_att + E_hn``. ``E_hn`` is :func:`energy.ffn.tied_relu_energy` with ``W_1 = ξᵀ`` and no bias.

**Diagonal convention.** The paper's equation excludes ``B = C`` (a token does not attend to itself); public ports
differ. ``exclude_diagonal=True`` (default) follows the paper's equation and needs ``n ≥ 2``; ``False`` includes it.

**Gradient with respect to g** (closed form, two attention terms): with ``A_h = softmax_row(β Q_h K_hᵀ)`` (diagonal
blocked if excluded),

.. math::
    \frac{\partial E}{\partial G} = -\sum_h \Big( A_h K_h W_Q[h]^\top + A_h^\top Q_h W_K[h]^\top \Big)
                                    - \mathrm{ReLU}(G \xi^\top)\, \xi ,

the query-side and key-side terms. Their value maps are tied to the query–key weights
(``A_h G (W_K W_Qᵀ)[h]`` and ``A_hᵀ G (W_Q W_Kᵀ)[h]``): attention-like, but not ``softmax(QKᵀ)V`` with a free ``V``.

**Dynamics and descent.** The update is ``x ← x − α ∂E/∂g`` (:meth:`EnergyTransformerEnergy.step`). The true
gradient is ``∇_x E = (∂g/∂x) ∂E/∂g`` (token-wise; :meth:`EnergyTransformerEnergy.grad`), so the continuous dynamics
``ẋ = −∂E/∂g`` satisfy ``dE/dt = −Σ_B (∂E/∂g_B)ᵀ (∂g/∂x_B) (∂E/∂g_B) ≤ 0`` by the PSD Hessian of ``L``
(:meth:`~EnergyTransformerEnergy.descent_rate`). A *finite* step is a gradient step preconditioned by the singular
``(∂g/∂x)⁻¹`` and is **not** guaranteed to descend: the first-order decrease ``α · descent_rate`` is non-negative,
but the threshold ``ᾱ(x)`` below which it dominates the higher-order terms depends on the instance — ``∂g/∂x`` has
eigenvalues ``0`` (along ``1``), ``γε/σ̃³`` (along ``x_c``) and ``γ/σ̃`` (elsewhere), so the same ``α`` moves ``g``
by amounts that differ by orders of magnitude with the token scale ``σ̃`` and with ``ε``. No uniform range is known,
so :meth:`~EnergyTransformerEnergy.step_range` is empty and every step warns (an error in strict mode). Descent is
*measured* in the tests: none violated at ``α = 0.01`` on bounded random instances, occasional increases at
``α ∈ {1, 10}`` for small tokens (``σ̃ ≈ 0.01``).
"""

from __future__ import annotations

import math
from typing import ClassVar

from torch import Tensor

from energy._validation import (
    ConstraintError,
    EnergyInputError,
    check_real,
    check_same_float_dtype,
    check_tensor,
    check_tokens,
)
from energy.base import Energy, StepRange
from energy.core import ffn as core_ffn
from energy.core import norm as core_norm
from energy.core import related as core
from energy.core.attention import kappa
from energy.core.norm import et_lagrangian

__all__ = ["EnergyTransformerEnergy", "et_lagrangian"]


class EnergyTransformerEnergy(Energy):
    r"""Energy Transformer energy ``E(x) = E_att(LN(x)) + E_hn(LN(x))`` (MATH §2.2; see the module docstring).

    Args:
        W_Q: query weights ``(h, d, k)``, acting on the right (``Q_h = G W_Q[h]``).
        W_K: key weights ``(h, d, k)``.
        xi: Hopfield memories ``(m, d)`` (rows ``ξ_μ``).
        beta: attention inverse temperature ``β > 0``; ``None`` means ``1/√k``.
        ln_gamma: scalar LayerNorm scale ``γ > 0`` (a scalar keeps ``∂g/∂x`` symmetric PSD).
        ln_bias: LayerNorm bias ``δ`` ``(d,)`` or ``None`` (zero).
        eps: LayerNorm ``ε ≥ 0`` (``ε = 0`` fails on constant tokens).
        exclude_diagonal: exclude ``B = C`` from the attention sum (the paper's equation; needs ``n ≥ 2``).
    """

    #: the default LayerNorm ε
    EPS: ClassVar[float] = 1e-5
    #: the (empty) guaranteed range of the finite step
    RANGE: ClassVar[StepRange] = StepRange(
        0.0,
        0.0,
        "MATH §2.2: no uniform step size is known; x − α∂E/∂g descends only for α below an instance-dependent "
        "threshold (continuous-time guarantee). Measure descent, e.g. with descent_rate",
    )

    W_Q: Tensor
    W_K: Tensor
    xi: Tensor
    ln_bias: Tensor | None

    def __init__(
        self,
        W_Q: Tensor,
        W_K: Tensor,
        xi: Tensor,
        *,
        beta: float | None = None,
        ln_gamma: float = 1.0,
        ln_bias: Tensor | None = None,
        eps: float = EPS,
        exclude_diagonal: bool = True,
    ) -> None:
        super().__init__()
        check_tensor(W_Q, "W_Q", ndim=3)
        h, d, k = W_Q.shape
        check_tensor(W_K, "W_K", ndim=3, trailing=(h, d, k))
        check_tensor(xi, "xi", ndim=2, trailing=(None, d))
        if ln_bias is not None:
            check_tensor(ln_bias, "ln_bias", ndim=1, trailing=(d,))
        check_same_float_dtype(W_Q=W_Q, W_K=W_K, xi=xi, ln_bias=ln_bias)
        temperature = kappa(beta, k)  # the attention inverse temperature: 1/√k by default, like κ
        self.beta = check_real(float(temperature) if isinstance(temperature, Tensor) else temperature, "beta",
                               positive=True)
        if isinstance(ln_gamma, Tensor):
            if ln_gamma.numel() != 1:
                raise EnergyInputError(
                    f"`ln_gamma` must be a scalar, got shape {tuple(ln_gamma.shape)}: a per-feature LayerNorm weight "
                    "makes ∂g/∂x non-symmetric, so g is not the gradient of a Lagrangian (MATH §2.2)."
                )
            ln_gamma = float(ln_gamma)
        if not isinstance(ln_gamma, (int, float)) or not math.isfinite(ln_gamma):
            raise EnergyInputError(f"`ln_gamma` must be a finite scalar, got {ln_gamma!r}.")
        if ln_gamma <= 0:
            raise ConstraintError(
                f"`ln_gamma` = {ln_gamma:g} must be > 0: the Hessian of the LayerNorm Lagrangian is γ·(PSD matrix), "
                "so the dynamics descend the energy only for γ > 0."
            )
        self.ln_gamma = float(ln_gamma)
        self.eps = check_real(eps, "eps")
        self.exclude_diagonal = bool(exclude_diagonal)
        self.register_buffer("W_Q", W_Q)
        self.register_buffer("W_K", W_K)
        self.register_buffer("xi", xi)
        self.register_buffer("ln_bias", ln_bias)

    @property
    def d(self) -> int:
        return self.W_Q.shape[1]

    def _check_tokens(self, Y: Tensor, name: str = "x", *, pairs: bool = True) -> Tensor:
        """Tokens ``(..., n, d)`` of the weights' dtype; ``pairs``: the attention term needs ``n ≥ 2`` if B ≠ C."""
        check_tokens(Y, self.d, self.W_Q.dtype, name)
        if pairs and self.exclude_diagonal and Y.shape[-2] < 2:
            raise EnergyInputError(
                f"`{name}` has {Y.shape[-2]} token(s); with exclude_diagonal=True the attention sum over B ≠ C is "
                "empty. Pass at least 2 tokens or use exclude_diagonal=False."
            )
        return Y

    # -------------------------------------------------------------------------------------- LayerNorm (Lagrangian)

    def lagrangian(self, x: Tensor) -> Tensor:
        """``L(x)`` per token (shape ``x.shape[:-1]``)."""
        self._check_tokens(x, pairs=False)
        return core_norm.et_lagrangian(x, self.ln_gamma, self.ln_bias, self.eps)

    def normalize(self, x: Tensor) -> Tensor:
        """``g = ∂L/∂x = LayerNorm(x)`` with weight ``γ·1``, bias ``δ``, ``eps``."""
        self._check_tokens(x, pairs=False)
        return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        return core.et_normalize(x, self.ln_gamma, self.ln_bias, self.eps)

    def lagrangian_hvp(self, x: Tensor, V: Tensor) -> Tensor:
        r"""``(∂g/∂x) v`` for every token: ``γ/σ̃ · (v − v̄1 − x̂ (x̂ᵀv)/d)``, ``x̂ = x_c/σ̃`` (symmetric PSD)."""
        self._check_tokens(x, pairs=False)
        self._check_tokens(V, "V", pairs=False)
        return core_norm.layernorm_jacobian_vp(x, V, self.ln_gamma, self.eps)

    # ------------------------------------------------------------------------------------ energy of the normalised G

    # pure evaluations (energy.core.related; no checks): the public methods below check once, then call these
    def _attention_energy_g(self, G: Tensor) -> Tensor:
        return core.et_attention_energy(G, self.W_Q, self.W_K, self.beta, self.exclude_diagonal)

    def _hopfield_energy_g(self, G: Tensor) -> Tensor:
        return core_ffn.tied_relu_energy(G, self.xi.T)

    def _attention_grad_terms(self, G: Tensor) -> tuple[Tensor, Tensor]:
        return core.et_attention_grad_terms(G, self.W_Q, self.W_K, self.beta, self.exclude_diagonal)

    def _grad_g(self, G: Tensor) -> Tensor:
        return core.et_grad_g(G, self.W_Q, self.W_K, self.xi, self.beta, self.exclude_diagonal)

    def _x(self, x: Tensor) -> Tensor:
        """Checked tokens ``x`` for the methods that also evaluate the attention term (``n ≥ 2`` if B ≠ C)."""
        return self._check_tokens(x)

    def attention_energy_g(self, G: Tensor) -> Tensor:
        """``E_att(G)`` per batch element."""
        return self._attention_energy_g(self._check_tokens(G, "G"))

    def hopfield_energy_g(self, G: Tensor) -> Tensor:
        """``E_hn(G) = −½ Σ_{μ,B} ReLU(ξ_μᵀ g_B)²`` per batch element."""
        return self._hopfield_energy_g(self._check_tokens(G, "G"))

    def energy_g(self, G: Tensor) -> Tensor:
        """``E_att(G) + E_hn(G)``: the energy as a function of the normalised tokens."""
        G = self._check_tokens(G, "G")
        return self._attention_energy_g(G) + self._hopfield_energy_g(G)

    def attention_grad_terms(self, G: Tensor) -> tuple[Tensor, Tensor]:
        r"""The two terms of ``∂E_att/∂G``: ``(query side, key side)``.

        .. math:: \text{query side} = -\sum_h A_h K_h W_Q[h]^\top ,\qquad
                  \text{key side} = -\sum_h A_h^\top Q_h W_K[h]^\top .

        The query side is standard multi-head attention with scale ``β``, values tied to keys (``W_V = W_K``),
        output map ``W_O = [W_Q[1]ᵀ; …; W_Q[h]ᵀ]`` and (if excluded) the diagonal masked — tests compare it with
        :func:`energy.reference.multi_head_attention`. The key side uses ``A_hᵀ`` (columns of the softmax), which
        is not row-stochastic: no standard attention layer computes it.
        """
        return self._attention_grad_terms(self._check_tokens(G, "G"))

    def grad_g(self, G: Tensor) -> Tensor:
        r"""``∂E/∂G`` in closed form: query-side + key-side attention terms + Hopfield term ``−ReLU(Gξᵀ)ξ``."""
        return self._grad_g(self._check_tokens(G, "G"))

    # ------------------------------------------------------------------------------------- the Energy interface (x)

    def energy(self, x: Tensor) -> Tensor:
        """``E(x) = E_att(g(x)) + E_hn(g(x))`` per batch element."""
        G = self._normalize(self._x(x))
        return self._attention_energy_g(G) + self._hopfield_energy_g(G)

    def terms(self, x: Tensor) -> dict[str, Tensor]:
        """The two terms separately: ``{"attention": E_att, "hopfield": E_hn}``."""
        G = self._normalize(self._x(x))
        return {"attention": self._attention_energy_g(G), "hopfield": self._hopfield_energy_g(G)}

    def grad(self, x: Tensor) -> Tensor:
        r"""``∇_x E = (∂g/∂x)(∂E/∂g)`` token-wise (closed form; tests compare with :meth:`autograd_grad`)."""
        x = self._x(x)
        return core_norm.layernorm_jacobian_vp(x, self._grad_g(self._normalize(x)), self.ln_gamma, self.eps)

    def descent_rate(self, x: Tensor) -> Tensor:
        r"""``−dE/dα`` at ``α = 0`` along the step: ``Σ_B (∂E/∂g_B)ᵀ (∂g/∂x_B) (∂E/∂g_B) ≥ 0`` per batch element."""
        x = self._x(x)
        D = self._grad_g(self._normalize(x))
        return (D * core_norm.layernorm_jacobian_vp(x, D, self.ln_gamma, self.eps)).sum(dim=(-2, -1))

    def step(self, x: Tensor, alpha: float | Tensor = 0.1) -> Tensor:
        r"""``x − α ∂E/∂g`` evaluated at ``g = LN(x)`` (the Energy Transformer update; warns, see step_range)."""
        alpha = self.step_range().check(alpha)
        x = self._x(x)
        return core_ffn.descent_step(x, self._grad_g(self._normalize(x)), alpha)
