r"""The pairwise attention energy, its gradient and its steps as pure tensor functions (MATH §1.1, §1.2).

Tokens are rows, :math:`Y \in \mathbb{R}^{\dots\times n\times d}`. A stack of heads is a factor ``M3`` of shape
``(h, d, k)`` (one head is ``M.unsqueeze(0)``); per-head results carry a head dimension ``(..., h, ...)``.

.. math::
    E(Y) = \sum_h \sum_{i<j} \rho(z^h_{ij}) + \tfrac\lambda2 \sum_h \|Y\|^2_{W_h},\qquad
    z^h_{ij} = \tfrac12\|y_i - y_j\|^2_{W_h},\qquad W_h = \kappa M_h M_h^\top .

Everything here is pure: no validation, no warnings, no Python read of a tensor value (only shapes, dtypes and the
Python numbers passed in), so every ``torch.func`` transform passes through. The public, validated entry points are
:mod:`energy.attention` and :mod:`energy.fused`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from energy.core.preconditioner import Preconditioner
from energy.kernels import GaussianKernel, Kernel

__all__ = [
    "kappa",
    "metric",
    "sq_dist_augmented",
    "pairwise_sq_dist",
    "key_bias",
    "softmax_beta",
    "head_keys",
    "head_sq_dist",
    "pair_mask",
    "masked",
    "head_gamma",
    "denominator",
    "mixing",
    "gaussian_energy",
    "energy_from_z",
    "head_energy",
    "head_grad",
    "head_mixing",
    "head_bases",
    "value_output_maps",
    "apply_step",
    "head_step",
    "head_step_and_energy",
    "batch_chunks",
]

Scale = float | Tensor
_T = TypeVar("_T")


def kappa(scale: Scale | None, k: int) -> Scale:
    r"""The metric's scale :math:`\kappa`: ``scale`` if given, else :math:`1/\sqrt{k}` (MATH §1.1 "Scaling").

    The one place the ``softmax(QKᵀ/√d_k)`` convention is resolved. A tensor scale passes through unchanged (it may
    be traced). Range checks (:math:`\kappa > 0`, finite) belong to the public entry (:func:`energy._validation.
    check_scale`).
    """
    return 1.0 / math.sqrt(k) if scale is None else scale


def metric(M: Tensor, kappa: Scale) -> Tensor:
    r""":math:`W = \kappa\, M M^\top` (MATH §1.1); ``M`` ``(..., d, k)`` gives ``(..., d, d)``."""
    return kappa * (M @ M.transpose(-1, -2))


def sq_dist_augmented(A: Tensor, B: Tensor, h: Tensor) -> Tensor:
    r""":math:`z_{ij} = h_i + h_j - a_i^\top b_j` as one matrix product of augmented rows (MATH §1.1).

    .. math:: z_{ij} = [-a_i,\ h_i,\ 1]^\top [b_j,\ 1,\ h_j]

    With :math:`a_i = W y_i`, :math:`b_j = y_j`, :math:`h_i = \tfrac12\|y_i\|_W^2` this is
    :math:`\tfrac12\|y_i - y_j\|_W^2` through the Gram matrix (never an :math:`n^2\times d` pair tensor). Rounding
    can make entries slightly negative for nearly coincident tokens (and on the diagonal); they are clamped at 0
    (the exact value is non-negative). ``A, B``: ``(..., n, c)``; ``h``: ``(..., n)``.
    """
    h = h.unsqueeze(-1)
    one = torch.ones_like(h)
    return (torch.cat([-A, h, one], dim=-1) @ torch.cat([B, one, h], dim=-1).transpose(-1, -2)).clamp_min(0.0)


def pairwise_sq_dist(Y: Tensor, W: Tensor) -> Tensor:
    r""":math:`z_{ij} = \tfrac12\|y_i - y_j\|_W^2 = \tfrac12(G_{ii} + G_{jj}) - G_{ij}`, :math:`G = YWY^\top`
    (MATH §1.1); ``Y`` ``(..., n, d)``, ``W`` ``(..., d, d)`` (a batched ``W`` broadcasts the tokens).
    """
    YW = Y @ W
    Y = Y.expand_as(YW)
    return sq_dist_augmented(YW, Y, 0.5 * (YW * Y).sum(-1))


def key_bias(Y: Tensor, W: Tensor) -> Tensor:
    r"""Key bias :math:`\beta_j = -\tfrac12\|y_j\|_W^2` of the energy-derived softmax (MATH §1.1), ``(..., n)``."""
    return -0.5 * ((Y @ W) * Y).sum(-1)


def softmax_beta(Y: Tensor, W: Tensor) -> Tensor:
    r""":math:`\mathrm{softmax}_\beta(YWY^\top)_{ij} \propto \exp(y_i^\top W y_j + \beta_j)` (MATH §1.1) — equal to
    :math:`D^{-1}\Gamma` for :math:`\rho(z) = -e^{-z}`; ``(..., n, n)``, rows summing to one.
    """
    YW = Y @ W
    beta = -0.5 * (YW * Y).sum(-1)
    return torch.softmax(YW @ Y.transpose(-1, -2) + beta.unsqueeze(-2), dim=-1)


def head_keys(Y: Tensor, M3: Tensor) -> Tensor:
    """:math:`K_h = Y M_h` for all heads with one matmul: ``(..., n, d), (h, d, k) -> (..., h, n, k)``."""
    h, d, k = M3.shape
    K = Y @ M3.permute(1, 0, 2).reshape(d, h * k)
    return K.unflatten(-1, (h, k)).transpose(-2, -3)


def head_sq_dist(K: Tensor, kappa: Scale) -> Tensor:
    r""":math:`z^h_{ij} = \tfrac\kappa2\|k_i - k_j\|^2 = \tfrac12\|y_i - y_j\|^2_{W_h}` from the keys
    :math:`K_h = Y M_h` (MATH §1.1).
    """
    return sq_dist_augmented(kappa * K, K, (0.5 * kappa) * (K * K).sum(-1))


def pair_mask(token_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """:math:`m_i m_j` as ``(..., 1, n, n)`` (broadcasts over heads); ``token_mask`` ``(..., n)``, True = real."""
    m = token_mask.to(dtype)
    return (m.unsqueeze(-1) * m.unsqueeze(-2)).unsqueeze(-3)


def masked(R: Tensor, token_mask: Tensor | None) -> Tensor:
    """Pairwise ``R`` ``(..., h, n, n)`` with every pair that involves a padded token set to zero."""
    return R if token_mask is None else R * pair_mask(token_mask, R.dtype)


def head_gamma(K: Tensor, kappa: Scale, kernel: Kernel, token_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    r""":math:`z` and :math:`\Gamma = \rho'(z)` per head (masked pairs zero), ``(..., h, n, n)`` each (MATH §1.1)."""
    z = head_sq_dist(K, kappa)
    return z, masked(kernel.drho(z), token_mask)


def denominator(Gamma: Tensor, ridge: float, token_mask: Tensor | None) -> Tensor:
    r""":math:`D_{ii} + \lambda` on real tokens and 1 on padded ones (whose rows of Γ are zero), ``(..., h, n)``."""
    denom = Gamma.sum(-1) + ridge
    if token_mask is not None:
        denom = torch.where(token_mask.unsqueeze(-2), denom, torch.ones_like(denom))
    return denom


def mixing(Gamma: Tensor, ridge: float, token_mask: Tensor | None) -> Tensor:
    r""":math:`A_h = (D_h + \lambda I)^{-1}\Gamma_h` (MATH §1.1; rows of padded tokens are zero)."""
    return Gamma / denominator(Gamma, ridge, token_mask).unsqueeze(-1)


def gaussian_energy(offdiag_row_sums: Tensor) -> Tensor:
    r"""Gaussian kernel, :math:`\rho = -\rho'`: :math:`\sum_{i<j}\rho(z_{ij}) = -\tfrac12\sum_i\sum_{j\ne i}
    \gamma_{ij}` (MATH §1.1) from the off-diagonal row sums ``(..., n)`` of :math:`\Gamma` (masked rows zero).
    """
    return -0.5 * offdiag_row_sums.sum(-1)


def energy_from_z(z: Tensor, Gamma: Tensor | None, K: Tensor, kappa: Scale, kernel: Kernel, ridge: float,
                  token_mask: Tensor | None) -> Tensor:
    r""":math:`E_h = \sum_{i<j} m_i m_j\rho(z^h_{ij}) + \tfrac\lambda2 \sum_i m_i\|y_i\|^2_{W_h}`, ``(..., h)``
    (MATH §1.1).

    The one place the energy is evaluated from :math:`z`, as :math:`\sum_{i<j} R_{ij} = \tfrac12(\sum_{i,j} R_{ij}
    - \sum_i R_{ii})`. For the Gaussian kernel (``type(kernel) is GaussianKernel``, a Python check of the kernel
    object, not of a tensor) a :math:`\Gamma` the step already computed is reused (:func:`gaussian_energy`).
    """
    if type(kernel) is GaussianKernel:
        if Gamma is None:
            Gamma = masked(kernel.drho(z), token_mask)
        E = gaussian_energy(Gamma.sum(-1) - Gamma.diagonal(dim1=-2, dim2=-1))
    else:
        R = masked(kernel.rho(z), token_mask)
        E = 0.5 * (R.sum((-1, -2)) - R.diagonal(dim1=-2, dim2=-1).sum(-1))
    if ridge:
        sq = kappa * (K * K).sum(-1)  # ‖y_i‖²_{W_h}
        if token_mask is not None:
            sq = sq * token_mask.to(sq.dtype).unsqueeze(-2)
        E = E + 0.5 * ridge * sq.sum(-1)
    return E


def head_energy(Y: Tensor, M3: Tensor, kappa: Scale, kernel: Kernel, ridge: float,
                token_mask: Tensor | None) -> Tensor:
    r""":math:`E_h(Y)` per head, ``(..., h)`` (see :func:`energy_from_z`)."""
    K = head_keys(Y, M3)
    return energy_from_z(head_sq_dist(K, kappa), None, K, kappa, kernel, ridge, token_mask)


def head_grad(Y: Tensor, M3: Tensor, kappa: Scale, kernel: Kernel, ridge: float,
              token_mask: Tensor | None) -> Tensor:
    r""":math:`\nabla E = \sum_h (L_h + \lambda I_m) Y W_h = \kappa\sum_h((D_h + \lambda I_m)K_h - \Gamma_h K_h)
    M_h^\top` (MATH §1.1; ``I_m`` = diag of the token mask), ``(..., n, d)``.
    """
    K = head_keys(Y, M3)
    _, Gamma = head_gamma(K, kappa, kernel, token_mask)
    diag = Gamma.sum(-1) + ridge
    if token_mask is not None:
        diag = diag * token_mask.to(diag.dtype).unsqueeze(-2)
    T = diag.unsqueeze(-1) * K - Gamma @ K  # (L_h + λ I_m) K_h,  (..., h, n, k)
    h, d, k = M3.shape
    return kappa * (T.transpose(-2, -3).flatten(-2) @ M3.permute(1, 0, 2).reshape(d, h * k).transpose(0, 1))


def head_mixing(Y: Tensor, M3: Tensor, kappa: Scale, kernel: Kernel, ridge: float,
                token_mask: Tensor | None) -> Tensor:
    r""":math:`A_h = (D_h + \lambda I)^{-1}\Gamma_h` at ``Y``, ``(..., h, n, n)`` (MATH §1.1)."""
    return mixing(head_gamma(head_keys(Y, M3), kappa, kernel, token_mask)[1], ridge, token_mask)


def head_bases(M: Tensor) -> Tensor:
    r"""Orthonormal bases :math:`U_h` of :math:`\mathrm{range}(M_h)`, :math:`P_h = U_h U_h^\top` (MATH §1.2).

    Thin SVD of each :math:`M_h`; columns of singular values below ``max(d, k)·eps·σ_max`` are zeroed (a
    tensor mask, no value read), so :math:`U_h U_h^\top` is the exact projector also for rank-deficient heads.
    ``M`` ``(..., d, k)`` gives ``(..., d, min(d, k))``.
    """
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    tol = max(M.shape[-2], M.shape[-1]) * torch.finfo(M.dtype).eps * S[..., :1]
    return U * (S > tol).to(U.dtype).unsqueeze(-2)


def value_output_maps(M3: Tensor, kappa: Scale, preconditioner: Preconditioner | str, *, single: bool,
                      value_basis: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    r"""The values and output maps of step (a)/(b) (MATH §1.1, §1.2) — the one statement of that rule.

    Returns ``(values, out)`` with values :math:`V_h = Y\,\mathrm{values}_h` and output maps :math:`O_h` =
    ``out[h]``, so that :math:`Y^+ = Y - \alpha\sum_h (V_h - A_h V_h) O_h`:

    * ``METRIC``, one head (``single``): identity values, no output map — ``(None, None)``;
    * ``METRIC``, heads: values :math:`Y U_h`, output map :math:`U_h^\top` (:math:`P_h = U_h U_h^\top`,
      :func:`head_bases`, or the given ``value_basis``);
    * ``TOKEN``: values :math:`K_h = Y M_h` (the keys; ``values is M3``), output map :math:`\kappa M_h^\top`
      (values tied to :math:`W_h`).
    """
    if Preconditioner(preconditioner) is Preconditioner.TOKEN:
        return M3, kappa * M3.transpose(-1, -2)
    if single:
        return None, None
    U = head_bases(M3) if value_basis is None else value_basis
    return U, U.transpose(-1, -2)


def apply_step(Y: Tensor, A: Tensor, V: Tensor, out: Tensor | None, alpha: Scale,
               token_mask: Tensor | None) -> Tensor:
    r""":math:`Y^+ = Y - \alpha\, I_m \sum_h (V_h - A_h V_h)\, O_h` (MATH §1.1 (a)/(b), §1.2).

    ``V`` ``(..., h, n, r)`` are the values, ``out`` ``(h, r, d)`` the output maps; ``out=None`` means one head with
    :math:`V = Y`, :math:`O = I` (step (a): :math:`Y^+ = (1-\alpha)Y + \alpha AY`).
    """
    R = V - A @ V
    if out is None:
        R = R.squeeze(-3)
    else:
        R = R.transpose(-2, -3).flatten(-2) @ out.flatten(0, 1)
    if token_mask is not None:
        R = R * token_mask.to(R.dtype).unsqueeze(-1)
    return Y - alpha * R


def _step_parts(Y: Tensor, M3: Tensor, kappa: Scale, kernel: Kernel, ridge: float, token_mask: Tensor | None,
                values: Tensor | None, out: Tensor | None, alpha: Scale) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    K = head_keys(Y, M3)
    z, Gamma = head_gamma(K, kappa, kernel, token_mask)
    A = mixing(Gamma, ridge, token_mask)
    V = Y.unsqueeze(-3) if values is None else K if values is M3 else head_keys(Y, values)
    return apply_step(Y, A, V, out, alpha, token_mask), K, z, Gamma


def head_step(Y: Tensor, M3: Tensor, kappa: Scale, kernel: Kernel, ridge: float, token_mask: Tensor | None,
              values: Tensor | None, out: Tensor | None, alpha: Scale) -> Tensor:
    r"""The attention step :math:`Y^+` (MATH §1.1 (a)/(b), §1.2; :func:`apply_step` with
    :math:`A_h = (D_h+\lambda I)^{-1}\Gamma_h`). ``values``, ``out``: from :func:`value_output_maps`
    (``values is M3`` reuses the keys as values).
    """
    return _step_parts(Y, M3, kappa, kernel, ridge, token_mask, values, out, alpha)[0]


def head_step_and_energy(Y: Tensor, M3: Tensor, kappa: Scale, kernel: Kernel, ridge: float,
                         token_mask: Tensor | None, values: Tensor | None, out: Tensor | None,
                         alpha: Scale) -> tuple[Tensor, Tensor]:
    r"""``(Y⁺, E(Y))``: :func:`head_step` and :math:`E(Y) = \sum_h E_h(Y)` from the same keys, :math:`z` and
    :math:`\Gamma` (MATH §1.1; for the Gaussian kernel the step's own :math:`\Gamma` is summed).
    """
    Yp, K, z, Gamma = _step_parts(Y, M3, kappa, kernel, ridge, token_mask, values, out, alpha)
    return Yp, energy_from_z(z, Gamma, K, kappa, kernel, ridge, token_mask).sum(-1)


CHUNK_ENTRIES = 1 << 22  # pairwise entries (heads × n × n) per chunk: 16 MB in float32, the size of a typical L3


def batch_chunks(fn: Callable[[Tensor, Tensor | None], _T], Y: Tensor, token_mask: Tensor | None, h: int) -> _T:
    """``fn(Y_chunk, mask_chunk)`` over chunks of the flattened leading batch dimensions, reassembled.

    Each batch element is computed independently, so chunking changes only the evaluation order. It keeps the
    ``(chunk, h, n, n)`` pairwise arrays in cache (several times faster at large batch sizes). Shapes only: pure.
    """
    lead, (n, d) = Y.shape[:-2], Y.shape[-2:]
    Yf = Y.reshape(-1, n, d)
    mf = None if token_mask is None else token_mask.expand(*lead, n).reshape(-1, n)
    size = max(1, CHUNK_ENTRIES // (h * n * n))
    out: Any
    if Yf.shape[0] <= size:
        out = fn(Yf, mf)
    else:
        parts: list[Any] = [fn(Yf[i:i + size], None if mf is None else mf[i:i + size])
                            for i in range(0, Yf.shape[0], size)]
        out = tuple(map(torch.cat, zip(*parts))) if isinstance(parts[0], tuple) else torch.cat(parts)
    if isinstance(out, tuple):  # several results per batch element (step and energy)
        return cast(_T, tuple(o.reshape(tuple(lead) + tuple(o.shape[1:])) for o in out))
    return cast(_T, out.reshape(tuple(lead) + tuple(out.shape[1:])))
