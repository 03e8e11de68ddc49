r"""Matrix-free curvature operators for any ``nn.Module`` + loss + data (MATH §3.1, §3.7).

Every operator here is a linear map that is never stored: it is applied to vectors through
``torch.func`` (``functional_call``, ``jvp``, ``vjp``, ``grad``, ``vmap``, optionally ``linearize``).

Objective and normalisation
---------------------------
The data is a re-iterable collection of batches ``(X_b, y_b)``, ``b = 1..B``, with ``N_b`` samples each
(``N_b = X_b.shape[0]`` unless ``batch_size_fn`` says otherwise), ``N = Σ_b N_b``. With the per-batch loss
``ℓ_b(θ) = loss_fn(f(X_b; θ), y_b)`` exactly as the user's ``loss_fn`` computes it, the objective is

.. math::
    \mathcal L(\theta) = \sum_b w_b\, \ell_b(\theta), \qquad
    w_b = \begin{cases} N_b / N & \text{reduction = "mean"} \\ 1 & \text{reduction = "sum"} \end{cases}

With ``reduction="mean"`` and a ``loss_fn`` that averages over its batch (``nn.CrossEntropyLoss()``,
``nn.MSELoss()``), :math:`\mathcal L` is the average over the whole data set whatever the (unequal) batch
sizes are -- provided every sample carries the same number of loss terms (e.g. every sequence is scored on
the same number of positions). With ``reduction="sum"`` and a summing ``loss_fn`` it is the total.

Curvature matrices (over the flattened parameter vector ``θ``, named blocks concatenated in the given
order, each block flattened row-major = ``vec_r`` of MATH §0):

.. math::
    H = \nabla^2_\theta \mathcal L, \qquad
    H_o = \sum_b w_b\, J_b^\top\, \nabla^2_{o}\ell_b\, J_b \;(\text{the GGN}), \qquad
    H_f = H - H_o = \sum_b w_b \sum_k (\nabla_o \ell_b)_k\, \nabla^2_\theta o_{b,k}

where ``o_b = f(X_b; θ)`` are the model outputs and ``J_b = ∂o_b/∂θ``. ``H_o`` is PSD for losses that are
convex in the outputs (MSE, cross-entropy). Taken at the output of an attention layer with the square loss
they are the outer-product part ``H_o`` and the functional part ``H_f`` of MATH §3.1 (one name per part:
``"H"``, ``"H_o"``, ``"H_f"``; the previous ``"G"`` / ``"F"`` are deprecated aliases).

How products are computed (one batch, ``k`` vectors ``V`` at once with ``vmap``)
------------------------------------------------------------------------------
* The primal forward/backward of a batch runs once (``vmap`` does not batch it); the tangents and cotangents
  of all ``k`` vectors are batched.
* ``H_o V``: one primal ``vjp`` (kept), ``J V`` by ``jvp``, ``U = ∇²_o ℓ_b · JV`` in output space, ``Jᵀ U`` by the
  kept ``vjp`` function.
* ``H V`` alone: reverse-over-reverse, ``vjp`` of ``θ ↦ ∇_θ ℓ_b`` -- one linearisation of the batch (the kept
  ``vjp`` function) reused for all ``k`` vectors.
* ``H V`` with ``H_o V`` (:meth:`CurvatureOperator.hessian_and_ggn`) or ``H_f V``: the functional part is the
  forward-over-reverse derivative of ``θ ↦ Jᵀ g_o`` with the output gradient ``g_o = ∇_o ℓ_b`` held fixed,
  and the same pass returns ``J V`` as a by-product:

  .. math::
      \frac{d}{d\epsilon}\Big( J(\theta+\epsilon v)^\top g_o,\; f(\theta+\epsilon v)\Big)\Big|_0 = (H_f v,\; J v),
      \qquad H_o v = J^\top(\nabla^2_o \ell\, J v), \qquad H v = H_o v + H_f v .

  The reverse tangent of ``Jᵀ g_o`` carries only the second derivatives of the network (no loss-Hessian term
  flows back through it), and ``J V`` is not recomputed for ``H_o`` (timings: benchmarks/bench_hessian.py).
  The loss itself is differentiated only in reverse mode (``∇²_o ℓ U`` by reverse-over-reverse in output
  space), so every torch loss works (forward-over-reverse through ``F.mse_loss`` fails in torch 2.x). Asking
  for ``H_o V`` alone skips the functional pass (``jvp`` then ``vjp``).

Public API: :class:`HessianOperator`, :class:`GGNOperator`, :class:`FunctionalOperator`,
:class:`JacobianOperator` (``.T`` = :class:`TransposedJacobianOperator`), :class:`TokenHessianOperator`,
the base :class:`LinearOperator` (``@``, ``matvec``, ``matmat``, ``to_scipy``, ``dense``), and the dense
autograd twins :func:`dense_hessian_reference`, :func:`dense_ggn_reference` used to verify them.

Modules: :mod:`~energy.hessian.linear_operator` (the base class), :mod:`~energy.hessian.parameter_space`
(flat coordinates, checks of model and data), :mod:`~energy.hessian.curvature_operators` (parameter space) and
:mod:`~energy.hessian.token_operator` (token space). This module re-exports them.
"""

from energy._validation import DenseSizeError
from energy.hessian import curvature_operators, linear_operator, parameter_space, token_operator
from energy.hessian.curvature_operators import *  # noqa: F403 - this module is the documented entry point
from energy.hessian.linear_operator import *  # noqa: F403
from energy.hessian.parameter_space import *  # noqa: F403
from energy.hessian.token_operator import *  # noqa: F403

__all__ = ["DenseSizeError"]
__all__ += linear_operator.__all__
__all__ += parameter_space.__all__
__all__ += curvature_operators.__all__
__all__ += token_operator.__all__
