r"""Modern Hopfield energy (Ramsauer et al., ICLR 2021; MATH §2.1).

Stored patterns ``X ∈ R^{N×d}`` (rows ``x_i``), state (query) ``ξ ∈ R^d``, inverse temperature ``β > 0``:

.. math::
    E(\xi) = -\beta^{-1} \log \sum_{i=1}^N \exp(\beta\, x_i^\top \xi) + \tfrac12 \xi^\top \xi
             + \beta^{-1} \log N + \tfrac12 M^2 ,\qquad M = \max_i \|x_i\| ,

.. math:: \nabla E(\xi) = \xi - X^\top \mathrm{softmax}(\beta X \xi) .

**The update (CCCP).** ``E = E_vex + E_cave`` with the convex ``E_vex(ξ) = ½ξᵀξ`` and the concave
``E_cave(ξ) = −β⁻¹ lse(βXξ)`` (+ constants). The concave–convex procedure linearises the concave part at ``ξ``,
which gives the majoriser

.. math:: E(\xi') \le Q(\xi' \mid \xi) = \tfrac12 \|\xi' - X^\top \mathrm{softmax}(\beta X\xi)\|^2 + c(\xi),
          \qquad Q(\xi \mid \xi) = E(\xi),

whose minimiser is the Hopfield update ``ξ⁺ = Xᵀ softmax(βXξ)`` — one step of attention of the query ``ξ`` over
keys and values ``X``. It is *not* derived from a Lipschitz bound on ``∇E``; it coincides with the gradient step of
unit size, ``ξ − 1·∇E(ξ)``, because the convex part's Hessian is ``I``. :meth:`HopfieldEnergy.step` also accepts
the relaxed step ``ξ − α∇E(ξ) = (1 − α)ξ + α ξ⁺`` (``α = 1`` is the CCCP update). Since ``Q`` is an isotropic
quadratic around ``ξ⁺``,

.. math:: E(\xi_\alpha) \le Q(\xi_\alpha\mid\xi) = E(\xi) - \tfrac12\big(1 - (1-\alpha)^2\big)\,\|\xi - \xi^+\|^2 ,

so every ``α ∈ (0, 2)`` descends (MM sandwich, as step (a) of MATH §1.1), ``α = 1`` the most per the majoriser.
The energy is bounded below: ``E(ξ) ≥ ½(‖ξ‖ − M)² ≥ 0``.

**Cross-attention.** With queries ``ξ = R W_Q`` and stored patterns ``X = Y W_K`` the update is
``softmax(β R W_Q W_Kᵀ Yᵀ) Y W_K``: cross-attention with scale ``β`` and values tied to keys (``W_V = W_K``).
Ramsauer's Hopfield *layer* uses a free ``W_V``; only its attention weights come from this energy.

Shapes: rows are states. ``ξ`` of shape ``(d,)`` is one state; ``(..., n_q, d)`` is a set of ``n_q`` independent
states per batch element. :meth:`HopfieldEnergy.energy` returns one value per batch element (the sum over the
``n_q`` states, shape ``ξ.shape[:-2]``), as every :class:`~energy.base.Energy`;
:meth:`HopfieldEnergy.energy_per_query` returns one value per state (shape ``ξ.shape[:-1]``). A batch of single
states should be passed as ``(B, 1, d)`` to keep per-batch energies.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from energy._validation import EnergyInputError, check_real, check_tensor
from energy.base import Energy, StepRange
from energy.core import related as core
from energy.core.ffn import relaxed_step
from energy.core.standard import attention_weights

__all__ = ["HopfieldEnergy"]


class HopfieldEnergy(Energy):
    r"""Modern Hopfield energy with stored patterns ``X`` (MATH §2.1).

    Args:
        X: stored patterns ``(..., N, d)`` (rows); leading dimensions broadcast with the states' batch dims.
        beta: inverse temperature ``β > 0`` (the attention scale of the equivalent cross-attention).
    """

    #: the guaranteed range of the (relaxed) CCCP step
    RANGE: ClassVar[StepRange] = StepRange(
        0.0, 2.0, "MATH §2.1: CCCP majoriser ½‖ξ' − ξ⁺‖² + c; α = 1 is the Hopfield update, α ∈ (0, 2) descends"
    )

    X: Tensor

    def __init__(self, X: Tensor, beta: float) -> None:
        super().__init__()
        check_tensor(X, "X", min_ndim=2)
        if X.shape[-2] < 1:
            raise EnergyInputError("`X` must store at least one pattern (N ≥ 1 rows).")
        self.beta = check_real(float(beta) if isinstance(beta, Tensor) else beta, "beta", positive=True,
                               what="(inverse temperature)")
        self.register_buffer("X", X)

    @property
    def d(self) -> int:
        return self.X.shape[-1]

    def _states(self, xi: object) -> Tensor:
        """States as ``(..., n_q, d)`` (a single state ``(d,)`` becomes ``(1, d)``)."""
        xi = check_tensor(xi, "xi", min_ndim=1, trailing=(self.d,))
        if xi.dtype != self.X.dtype:
            raise EnergyInputError(
                f"`xi` has dtype {xi.dtype} but the stored patterns `X` are {self.X.dtype}; cast one of them."
            )
        return xi.unsqueeze(0) if xi.ndim == 1 else xi

    # pure evaluations on checked states S (..., n_q, d) (energy.core.related)
    def _update(self, S: Tensor) -> Tensor:
        return core.hopfield_update(S, self.X, self.beta)

    def _energy_per_query(self, S: Tensor) -> Tensor:
        return core.hopfield_energy_per_query(S, self.X, self.beta)

    @staticmethod
    def _unbatch(out: Tensor, xi: Tensor) -> Tensor:
        return out[..., 0, :] if xi.ndim == 1 else out

    def weights(self, xi: Tensor) -> Tensor:
        r"""``softmax(β ξ Xᵀ)`` row-wise: ``(..., n_q, N)`` (``(N,)`` for a single state)."""
        return self._unbatch(attention_weights(self._states(xi), self.X, self.beta), xi)

    def update(self, xi: Tensor) -> Tensor:
        r"""The CCCP update ``ξ⁺ = Xᵀ softmax(βXξ)`` (row form ``softmax(β ξ Xᵀ) X``)."""
        return self._unbatch(self._update(self._states(xi)), xi)

    def energy_per_query(self, xi: Tensor) -> Tensor:
        """``E(ξ)`` for every state: shape ``xi.shape[:-1]``."""
        E = self._energy_per_query(self._states(xi))
        return E[..., 0] if xi.ndim == 1 else E

    def energy(self, xi: Tensor) -> Tensor:
        """Sum of :meth:`energy_per_query` over the states of each batch element (a scalar for ``ξ`` of shape (d,))."""
        E = self._energy_per_query(self._states(xi))
        return E[..., 0] if xi.ndim == 1 else E.sum(-1)

    def grad(self, xi: Tensor) -> Tensor:
        r"""``∇E(ξ) = ξ − Xᵀ softmax(βXξ)``, for every state."""
        return xi - self.update(xi)

    def step(self, xi: Tensor, alpha: float | Tensor = 1.0) -> Tensor:
        r"""``ξ − α∇E(ξ) = (1 − α)ξ + α Xᵀ softmax(βXξ)``; ``α = 1`` (default) is the CCCP/Hopfield update."""
        alpha = self.step_range().check(alpha)
        xi_plus = self.update(xi)
        if not isinstance(alpha, Tensor) and alpha == 1.0:  # a Python number: the update itself, exactly
            return xi_plus
        return relaxed_step(xi, xi_plus, alpha)
