r"""Normalisation as projection (MATH §1.4).

* :func:`layernorm_projection` — the Euclidean projection onto the *centred sphere*
  ``S_c = {z ∈ R^d : 1ᵀz = 0, ‖z‖ = √d}``; equals ``nn.LayerNorm`` without affine part at ``eps = 0``.
* :func:`rmsnorm_projection` — the Euclidean projection onto the sphere ``S = {z : ‖z‖ = √d}``; equals
  ``nn.RMSNorm`` without weight at ``eps = 0``.

**Why these are projections.** For ``z ∈ S_c``, ``‖y − z‖² = ‖y‖² − 2⟨y, z⟩ + d`` and ``⟨y, z⟩ = ⟨y − ȳ1, z⟩``
(``z ⊥ 1``), so the closest point maximises ``⟨y_c, z⟩`` over a sphere of the subspace ``1^⊥``: by Cauchy–Schwarz
``z* = √d · y_c/‖y_c‖`` — unique when ``y_c ≠ 0`` (and every point of ``S_c`` is closest when ``y_c = 0``; the functions
then raise). The same argument without centring gives RMSNorm. This holds for *any* ``y``, not only centred ones.

**eps > 0.** ``nn.LayerNorm`` with ``eps > 0`` is the projection followed by a radial shrink,
``LN_ε(y) = s(y) · Π_{S_c}(y)`` with ``s(y) = ‖y_c‖ / sqrt(‖y_c‖² + dε) ∈ [0, 1)``, so ``‖LN_ε(y) − Π(y)‖ =
√d (1 − s(y)) ≤ √d · dε / (2‖y_c‖²)`` (likewise RMSNorm with ``‖y‖``). It lands *inside* the sphere, not on it.

**No descent guarantee.** Spheres are not convex: a projected step ``Π(Y − α∇E)`` has no general descent guarantee
(the projection of a descent step can increase the energy). Unrolled models must record the energy trace and show
what happens rather than assume monotonicity.

**Decision on the affine part (γ, b) of LayerNorm.** We keep the projection pure and *absorb* the affine map
``a(p) = p diag(γ) + 1bᵀ`` into the attention energy that follows it:

* the pairwise attention energy (MATH §1.1) depends on tokens only through ``y_i − y_j``; with ``y_i = a(p_i)``,
  ``½‖y_i − y_j‖²_W = ½‖p_i − p_j‖²_{W̃}`` with ``W̃ = diag(γ) W diag(γ)`` (:func:`absorb_layernorm_affine`), so
  ``E_att(a(P); W) = E_att(P; W̃)`` and the shift ``b`` drops out;
* the metric-preconditioned step (a) commutes with ``a``: ``softmax_β`` is translation invariant
  (``S_ij + β_j = −½‖y_i − y_j‖²_W + ½‖y_i‖²_W``, the last term is constant along the row) and its rows sum to 1,
  so ``softmax_β(Y W Yᵀ) Y = softmax_β(P W̃ Pᵀ) P diag(γ) + 1bᵀ`` and hence
  ``step_a(a(P); W) = a(step_a(P; W̃))`` — the shift ``b`` passes through;
* the token-preconditioned step (b) does *not* commute with ``a`` unless ``γ² = 1``: in ``P`` coordinates it is a
  step with preconditioner ``D⁻¹ ⊗ diag(γ)⁻²`` instead of ``D⁻¹ ⊗ I``;
* energies that are not translation invariant (the FFN energy, MATH §1.3) do not absorb ``b``.

So "LayerNorm with affine, then attention energy with metric ``W``" is exactly "projection, then attention energy
with metric ``W̃``", and the library only ever needs the pure projection. (Tests check the identities numerically.)

**β after a projection.** When every token has the same ``W``-norm, the key bias ``β_j = −½‖y_j‖²_W`` of MATH §1.1
is constant and plain ``softmax`` equals ``softmax_β``; e.g. ``W ∝ I`` after either projection (``‖y_j‖² = d``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from energy._validation import EnergyInputError, check_same_float_dtype, check_tensor, value_holds
from energy.core import norm as core

__all__ = [
    "layernorm_projection",
    "rmsnorm_projection",
    "absorb_layernorm_affine",
    "LayerNormProjection",
    "RMSNormProjection",
]


def _check_Y(Y: object) -> Tensor:
    return check_tensor(Y, "Y", min_ndim=1)


def _check_nonzero(Z: Tensor, name: str) -> None:
    """Raise if a row of ``Z`` is exactly 0 (the projection is not unique there); a value check at the public call,
    skipped where a tracing transform makes the values unreadable (:func:`energy._validation.value_holds`).
    """
    if not value_holds((torch.linalg.vector_norm(Z, dim=-1) != 0).all()):
        raise EnergyInputError(
            f"`Y` has a token whose {name} is exactly 0: every point of the sphere is equally close, so the "
            "projection is not unique. Use energy.reference.layer_norm / rms_norm with eps > 0 for such inputs."
        )


def layernorm_projection(Y: Tensor) -> Tensor:
    r"""Euclidean projection of every token onto the centred sphere of radius ``√d`` (MATH §1.4).

    .. math:: \Pi_{S_c}(y) = \sqrt d\, \frac{y - \bar y 1}{\|y - \bar y 1\|} = \mathrm{LayerNorm}_{\varepsilon=0}(y)

    Args:
        Y: tokens ``(..., d)`` (rows are normalised independently).

    Raises:
        EnergyInputError: if a token is constant (centred norm 0; the projection is not unique).
    """
    _check_nonzero(core.centre(_check_Y(Y)), "centred norm")
    return core.layernorm_projection(Y)


def rmsnorm_projection(Y: Tensor) -> Tensor:
    r"""Euclidean projection of every token onto the sphere of radius ``√d`` (MATH §1.4).

    .. math:: \Pi_S(y) = \sqrt d\, \frac{y}{\|y\|} = \mathrm{RMSNorm}_{\varepsilon=0}(y)
    """
    _check_nonzero(_check_Y(Y), "norm")
    return core.rmsnorm_projection(Y)


def absorb_layernorm_affine(W: Tensor, gamma: Tensor) -> Tensor:
    r"""Metric that absorbs LayerNorm's scale into a translation-invariant attention energy (MATH §1.4).

    .. math:: \tilde W = \operatorname{diag}(\gamma)\, W \operatorname{diag}(\gamma),\qquad
              E_{att}(P \operatorname{diag}(\gamma) + 1 b^\top;\, W) = E_{att}(P;\, \tilde W)

    ``W̃`` is symmetric PSD whenever ``W`` is. For a factor ``W = κ M Mᵀ`` it is ``κ M̃ M̃ᵀ`` with
    ``M̃ = diag(γ) M``. The shift ``b`` needs no absorption (see the module docstring).

    Args:
        W: metric ``(..., d, d)``.
        gamma: LayerNorm weight ``(d,)``.
    """
    check_tensor(W, "W", min_ndim=2)
    if W.shape[-1] != W.shape[-2]:
        raise EnergyInputError(f"`W` must be square in its last two dimensions, got shape {tuple(W.shape)}.")
    check_tensor(gamma, "gamma", ndim=1, trailing=(W.shape[-1],))
    check_same_float_dtype(W=W, gamma=gamma)
    return core.absorb_layernorm_affine(W, gamma)


class _SphereProjection(nn.Module):
    """Shared shell: a projection with its set's indicator (``ι = 0`` on the set, ``+inf`` off it).

    Subclasses set ``centred`` (the set lies in ``1^⊥``) and :meth:`project`.
    """

    centred: bool = False

    def project(self, Y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, Y: Tensor) -> Tensor:
        return self.project(Y)

    def contains(self, Y: Tensor, atol: float = 1e-9) -> Tensor:
        """Per token: on the sphere (``|‖y‖ − √d| ≤ atol·√d``) and, for the centred sphere, centred
        (``|1ᵀy| ≤ atol·√d``).
        """
        _check_Y(Y)
        r = math.sqrt(Y.shape[-1])
        inside = (torch.linalg.vector_norm(Y, dim=-1) - r).abs() <= atol * r
        return inside & (Y.sum(dim=-1).abs() <= atol * r) if self.centred else inside

    def indicator(self, Y: Tensor, atol: float = 1e-9) -> Tensor:
        """``ι(Y)`` per batch element of tokens ``(..., n, d)``: 0 if every token lies on the set, else ``+inf``."""
        inside = self.contains(Y, atol).all(dim=-1)
        return torch.where(inside, 0.0, math.inf).to(Y.dtype)


class LayerNormProjection(_SphereProjection):
    """Module form of :func:`layernorm_projection` (projection onto ``{1ᵀz = 0, ‖z‖ = √d}``)."""

    centred = True

    def project(self, Y: Tensor) -> Tensor:
        return layernorm_projection(Y)


class RMSNormProjection(_SphereProjection):
    """Module form of :func:`rmsnorm_projection` (projection onto ``{‖z‖ = √d}``)."""

    def project(self, Y: Tensor) -> Tensor:
        return rmsnorm_projection(Y)
