"""Public-edge checks of the attention energies' arguments (shapes, dtypes, masks, weights' constraints).

Used only by the validated entry points (:mod:`energy.attention`, :mod:`energy.fused`); the formulas live in
:mod:`energy.core.attention`. Checks of weights read their values (they are concrete at construction); per-call
checks of ``Y`` and ``token_mask`` are metadata checks plus the finiteness check of :func:`energy._validation.
check_finite` (skipped, by design, under tracing transforms).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from energy._validation import (
    EnergyInputError,
    check_psd,
    check_same_device,
    check_same_float_dtype,
    check_tensor,
    for_linalg,
    value_holds,
)
from energy.core.preconditioner import Preconditioner
from energy.kernels import GaussianKernel, Kernel

__all__ = [
    "check_ridge",
    "check_kernel",
    "check_preconditioner",
    "check_M",
    "check_Y",
    "check_token_mask",
    "check_W",
    "heads_orthogonal",
    "lambda_max",
]


def check_ridge(ridge: object) -> float:
    """λ ≥ 0, finite (the ridge of ``(λ/2)‖Y‖²_W``)."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise EnergyInputError(f"`ridge` must be a finite real number >= 0 (the λ of (λ/2)‖Y‖²_W), got {ridge!r}.")
    return float(ridge)


def check_kernel(kernel: object) -> Kernel:
    """A :class:`~energy.kernels.Kernel`; ``None`` means the Gaussian kernel."""
    if kernel is None:
        return GaussianKernel()
    if not isinstance(kernel, Kernel):
        raise EnergyInputError(
            f"`kernel` must be an energy.kernels.Kernel (e.g. GaussianKernel(), PowerKernel(p, eps), "
            f"CauchyKernel()), got {type(kernel).__name__}."
        )
    return kernel


def check_preconditioner(preconditioner: object) -> Preconditioner:
    """:class:`~energy.core.Preconditioner` from a member or its string (``"metric"``, ``"token"``)."""
    try:
        return Preconditioner(preconditioner)
    except ValueError:
        raise EnergyInputError(
            f"`preconditioner` must be 'metric' (step (a), identity values) or 'token' (step (b), values tied to "
            f"W), got {preconditioner!r}."
        ) from None


def check_M(M: object, ndim: int) -> Tensor:
    """The factor: ``(d, k)`` for one head (``ndim=2``), ``(h, d, k)`` for heads (``ndim=3``); finite, non-empty."""
    if ndim == 2 and isinstance(M, Tensor) and M.ndim == 3:
        raise EnergyInputError(
            f"`M` must have 2 dimensions (d, k) for a single head, got shape {tuple(M.shape)}; for a stack of heads "
            "(h, d, k) use MultiHeadAttentionEnergy."
        )
    M = check_tensor(M, "M", ndim=ndim)
    if M.numel() == 0:
        raise EnergyInputError(f"`M` must not be empty, got shape {tuple(M.shape)}.")
    return M


def check_Y(Y: object, M: Tensor) -> Tensor:
    """``Y`` of shape (..., n, d) matching ``M`` (d, k) / (h, d, k) in width and dtype."""
    Y = check_tensor(Y, "Y", min_ndim=2)
    d = M.shape[-2]
    if Y.shape[-1] != d:
        raise EnergyInputError(
            f"`Y` has width {Y.shape[-1]} (last dimension) but `M` has d = {d} rows; tokens are rows: Y is "
            f"(..., n, d) and M is (d, k) (or (h, d, k) for heads)."
        )
    if Y.shape[-2] == 0:
        raise EnergyInputError(f"`Y` must contain at least one token, got shape {tuple(Y.shape)}.")
    check_same_float_dtype(Y=Y, M=M)
    check_same_device(Y=Y, M=M)
    return Y


def check_token_mask(token_mask: object, Y: Tensor) -> Tensor | None:
    """A bool key-padding mask broadcastable to ``Y.shape[:-1]`` (``True`` = real token), or ``None``."""
    if token_mask is None:
        return None
    if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool:
        raise EnergyInputError(
            "`token_mask` must be a bool tensor of shape (..., n) with True = real token, False = padding, got "
            f"{token_mask.dtype if isinstance(token_mask, Tensor) else type(token_mask).__name__}; build it with "
            "e.g. `lengths[:, None] > torch.arange(n)`."
        )
    try:
        ok = torch.broadcast_shapes(token_mask.shape, Y.shape[:-1]) == Y.shape[:-1]
    except RuntimeError:
        ok = False
    if not ok:
        raise EnergyInputError(
            f"`token_mask` of shape {tuple(token_mask.shape)} does not broadcast to Y's token shape "
            f"{tuple(Y.shape[:-1])} (= Y.shape[:-1])."
        )
    if token_mask.shape[-1] != Y.shape[-2]:
        raise EnergyInputError(
            f"`token_mask` must have n = {Y.shape[-2]} entries in its last dimension, got {tuple(token_mask.shape)}."
        )
    if not value_holds(token_mask.any(dim=-1).all()):
        raise EnergyInputError(
            "`token_mask` has a sequence with no real token (a row of all False): its attention is undefined; "
            "mark at least one token True in every sequence, or drop the empty sequences from the batch."
        )
    return token_mask


def check_W(W: object, Y: Tensor) -> Tensor:
    """A symmetric PSD metric ``(..., d, d)`` matching ``Y``'s width and dtype."""
    W = check_tensor(W, "W", min_ndim=2)
    if W.shape[-1] != Y.shape[-1]:
        raise EnergyInputError(
            f"`W` must be (d, d) with d = {Y.shape[-1]} (the width of `Y`), got shape {tuple(W.shape)}."
        )
    check_same_float_dtype(Y=Y, W=W)
    return check_psd(W, "W")


def heads_orthogonal(M3: Tensor, atol: float | None = None) -> bool:
    r"""Whether :math:`\max_{h\ne g}|M_h^\top M_g| \le` ``atol`` (default ``1e3·eps·max_h‖M_h‖_F²``), ``M3``
    ``(h, d, k)`` (MATH §1.2). Reads the weights' values: for construction-time and public-call decisions only.
    """
    M = M3.detach()
    off = ~torch.eye(M.shape[0], dtype=torch.bool, device=M.device)
    err = float(torch.einsum("hdk,gdl->hgkl", M, M)[off].abs().max()) if M.shape[0] > 1 else 0.0
    if atol is None:
        atol = 1e3 * torch.finfo(M.dtype).eps * max(1.0, float((M * M).sum((-1, -2)).max()))
    return err <= atol


def lambda_max(M: Tensor, kappa: float) -> float:
    r""":math:`\lambda_{\max}(W) = \kappa\,\sigma_{\max}(M)^2` (for heads: :math:`\max_h`); reads the weights."""
    return kappa * float(torch.linalg.matrix_norm(for_linalg(M.detach()), ord=2).max()) ** 2
