"""Input checks shared by every public entry point.

Every check raises an error that names the argument, says what was expected and how to fix it.
Nothing here ever rewrites a user's tensor (no silent symmetrisation, clipping or casting).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "check_positive_int",
    "check_scalar_objective",
    "EnergyInputError",
    "ConstraintError",
    "StepSizeError",
    "DenseSizeError",
    "StepSizeWarning",
    "LowPrecisionWarning",
    "warn_low_precision",
    "check_result",
    "check_readable",
    "VerificationPrecisionWarning",
    "warn_if_not_float64",
    "check_tensor",
    "value_holds",
    "is_readable",
    "check_finite",
    "check_scale",
    "check_same_float_dtype",
    "check_same_device",
    "check_tokens",
    "check_options",
    "check_real",
    "check_symmetric",
    "check_psd",
    "check_step_size",
    "check_alpha_shape",
    "check_float_dtype",
    "default_tolerance",
    "strict_mode",
    "is_strict",
]


class EnergyInputError(ValueError):
    """A public function received an argument it cannot use (shape, dtype, value)."""


class ConstraintError(EnergyInputError):
    """A weight violates a constraint the energy needs (symmetry, PSD, spectrum bound, orthogonality)."""


class DenseSizeError(EnergyInputError, MemoryError):
    """A dense matrix (a Hessian or one of its blocks) was requested that exceeds the memory budget."""


class StepSizeError(EnergyInputError):
    """A step size lies outside the range in which descent is guaranteed (strict mode only)."""


class VerificationPrecisionWarning(UserWarning):
    """A verification routine (an autograd twin) was called with a dtype other than float64."""


def warn_if_not_float64(dtype: torch.dtype, routine: str) -> None:
    """Warn that comparisons at the 1e-10 level need float64 (the closed forms themselves accept any float)."""
    if dtype != torch.float64:
        warnings.warn(
            f"{routine} is a verification routine; with {dtype} its agreement with the closed form is limited to "
            "that precision (about 1e-6 for float32). Cast to float64 (`.double()`, `model.double()`) to verify "
            "at 1e-10.",
            VerificationPrecisionWarning,
            stacklevel=3,
        )


class StepSizeWarning(UserWarning):
    """A step size lies outside the range in which descent is guaranteed (default mode)."""


class LowPrecisionWarning(UserWarning):
    """An energy or a step was built in float16 / bfloat16, where the descent guarantee holds only approximately."""


#: Measured violations of "the energy does not rise after a guaranteed step" (1,200 random instances, α = 1);
#: quoted by :func:`warn_low_precision` and by the precision policy in :mod:`energy.base`.
MEASURED_VIOLATIONS: dict[torch.dtype, str] = {
    torch.float32: "39/1,200 instances, each rise ≤ 9e-8 (rounding)",
    torch.float16: "94/1,200 instances, rises up to 7e-4",
    torch.bfloat16: "56/1,200 instances, rises up to 8e-3",
}

_WARNED_DTYPES: set[torch.dtype] = set()


def warn_low_precision(dtype: torch.dtype, where: str) -> None:
    """Warn ONCE per process and dtype that ``float16`` / ``bfloat16`` weaken the descent guarantee (the measured
    violation rates are quoted); float32 and float64 pass silently. Called at construction, never per call.
    """
    if dtype not in (torch.float16, torch.bfloat16) or dtype in _WARNED_DTYPES:
        return
    _WARNED_DTYPES.add(dtype)
    warnings.warn(
        f"{where} uses {dtype}: the descent guarantee (E(step(Y, α)) ≤ E(Y) for α in step_range()) holds exactly "
        f"only in float64 and within rounding (≤ 1e-7) in float32. Measured in {dtype} at α = 1: the energy rose "
        f"after a guaranteed step in {MEASURED_VIOLATIONS[dtype]}. Use float32/float64 for checks of descent "
        "(`.to(torch.float64)`); this warning is shown once per dtype.",
        LowPrecisionWarning,
        stacklevel=3,
    )


def check_readable(x: Tensor, name: str, what: str) -> Tensor:
    """Raise :class:`EnergyInputError` if ``x`` is a ``meta`` tensor where ``what`` needs its values."""
    if isinstance(x, Tensor) and x.device.type == "meta":
        raise EnergyInputError(
            f"`{name}` is a meta tensor (shape and dtype only, no values) but {what} needs its values; "
            f"materialise it first, e.g. `module.to_empty(device='cpu')` and load the weights, or pass a CPU/GPU "
            "tensor."
        )
    return x


_STRICT = False


def is_strict() -> bool:
    """Whether step sizes outside the guaranteed range raise (True) or warn (False)."""
    return _STRICT


@contextlib.contextmanager
def strict_mode(enabled: bool = True) -> Iterator[None]:
    """Context manager: inside it, step sizes outside the guaranteed range raise :class:`StepSizeError`.

    >>> import energy
    >>> with energy.strict_mode():
    ...     pass
    """
    global _STRICT
    previous, _STRICT = _STRICT, enabled
    try:
        yield
    finally:
        _STRICT = previous


def for_linalg(x: Tensor) -> Tensor:
    """``x`` in float32 when it is float16 / bfloat16 (torch's CPU eigen/SVD routines do not take half precision);
    for construction-time decisions (spectra, norms) only, never for a result.
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _shape_str(shape: Sequence[int | str | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def value_holds(condition: Tensor) -> bool:
    """The one place a per-call check reads a tensor value back to Python (decision 5 of the pure core).

    Returns ``bool(condition)`` when the value can be read, and ``True`` (the check is skipped, by design) when a
    tracing transform makes it unreadable: ``vmap``, ``linearize`` / ``make_fx`` tracing, fake or meta tensors. The
    transform is detected by attempting the read and catching the ``RuntimeError`` torch raises, never by testing
    private functorch state. Under ``grad``, ``vjp``, ``jvp`` and ``hessian`` the values are concrete and the check
    runs.

    >>> import torch
    >>> value_holds(torch.tensor(True)), value_holds(torch.tensor(False))
    (True, False)
    """
    value = _read(condition)
    return True if value is None else bool(value)


def _read(x: Tensor) -> float | None:
    """``x.item()``, or ``None`` when a tracing transform makes the value unreadable (see :func:`value_holds`)."""
    try:
        return x.item()
    except RuntimeError:  # a tracing tensor (vmap, make_fx/linearize, fake or meta tensors): unreadable by design
        return None


def is_readable(x: Tensor) -> bool:
    """Whether ``x``'s values can be read back to Python (``False`` under tracing transforms, see
    :func:`value_holds`); decides whether a per-call check that needs values (e.g. a spectral norm) runs.
    """
    return x.numel() == 0 or _read(x.detach().reshape(-1)[0]) is not None


def check_finite(x: Tensor, name: str) -> Tensor:
    """Raise :class:`EnergyInputError` if ``x`` has a NaN/inf entry (skipped when traced, see :func:`value_holds`)."""
    # One reduction first: a finite sum proves every entry finite (NaN/inf propagate); only then a full pass.
    if not value_holds(torch.isfinite(x.sum())) and not value_holds(torch.isfinite(x).all()):
        raise EnergyInputError(f"`{name}` contains NaN or inf entries; clean the input before calling.")
    return x


def check_result(out: Tensor | tuple[Tensor, ...], what: str, inputs: Mapping[str, Tensor], *,
                 hint: str = "") -> Tensor | tuple[Tensor, ...]:
    """Raise :class:`EnergyInputError` if a public result ``out`` has NaN/inf entries although its (checked,
    finite) ``inputs`` do not: the computation overflowed. The message names the inputs and their scale
    (``max |·|``) and the dtype's range (``hint``: a further possible cause). A value check through
    :func:`value_holds` (skipped under transforms). Returns ``out``.
    """
    outs = out if isinstance(out, tuple) else (out,)
    bad = [o for o in outs if isinstance(o, Tensor) and o.is_floating_point() and o.numel()
           and not value_holds(torch.isfinite(o.sum())) and not value_holds(torch.isfinite(o).all())]
    if not bad:
        return out
    dtype = bad[0].dtype
    scales = []
    for name, t in inputs.items():
        if isinstance(t, Tensor) and t.numel() and t.is_floating_point():
            m = _read(t.detach().abs().max())
            if m is not None:
                scales.append(f"max |{name}| = {m:.3g}")
    scale = ", ".join(scales) if scales else "inputs finite"
    names = ", ".join(f"`{n}`" for n in inputs) or "the input"
    raise EnergyInputError(
        f"{what} is not finite (NaN/inf) although {names} is finite ({scale}): the computation overflowed {dtype} "
        f"(largest finite value {torch.finfo(dtype).max:.3g}). Rescale {names} (e.g. normalise the tokens)"
        + (" or use a wider dtype (`.to(torch.float64)`)." if dtype != torch.float64 else ".")
        + (f" {hint}" if hint else "")
    )


def check_scale(scale: object, name: str = "scale") -> float | Tensor | None:
    r"""The public check of a metric scale :math:`\kappa` (``None`` = :math:`1/\sqrt{k}`, resolved by
    :func:`energy.core.attention.kappa`): a finite real number > 0, or a 0-dim floating tensor (checked by value
    through :func:`value_holds`, so it may be traced).
    """
    if scale is None:
        return None
    if isinstance(scale, Tensor):
        if scale.ndim != 0 or not scale.is_floating_point():
            raise EnergyInputError(
                f"`{name}` must be a real number or a 0-dim floating tensor, got a tensor of shape "
                f"{tuple(scale.shape)} and dtype {scale.dtype}."
            )
        ok = value_holds(torch.isfinite(scale) & (scale > 0))
    else:
        ok = not isinstance(scale, bool) and isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0
    if not ok:
        raise EnergyInputError(
            f"`{name}` must be a finite real number > 0 (W = {name} · M Mᵀ) or None for 1/sqrt(k), got {scale!r}."
        )
    return scale if isinstance(scale, Tensor) else float(scale)  # type: ignore[arg-type]


def check_tensor(
    x: object,
    name: str,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    trailing: Sequence[int | None] | None = None,
    finite: bool = True,
) -> Tensor:
    """Check that ``x`` is a finite floating-point tensor of a given rank / trailing shape.

    Args:
        x: the object to check.
        name: the argument's name, used in the error message.
        ndim: exact number of dimensions required.
        min_ndim: minimal number of dimensions (leading batch dimensions allowed).
        trailing: required sizes of the trailing dimensions (``None`` = any size).
        finite: reject NaN / inf entries.

    Returns:
        ``x`` itself (never a copy or a cast).
    """
    if not isinstance(x, Tensor):
        raise EnergyInputError(
            f"`{name}` must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.as_tensor(..., "
            "dtype=torch.float64)."
        )
    if not x.is_floating_point():
        raise EnergyInputError(
            f"`{name}` must be a floating-point tensor, got dtype {x.dtype}; convert it with "
            f"`{name}.to(torch.float64)` (float64 is recommended for verification)."
        )
    if ndim is not None and x.ndim != ndim:
        raise EnergyInputError(f"`{name}` must have {ndim} dimensions, got shape {tuple(x.shape)}.")
    if min_ndim is not None and x.ndim < min_ndim:
        raise EnergyInputError(
            f"`{name}` must have at least {min_ndim} dimensions (leading batch dimensions are allowed), "
            f"got shape {tuple(x.shape)}."
        )
    if trailing is not None:
        k = len(trailing)
        if x.ndim < k or any(t is not None and s != t for s, t in zip(x.shape[x.ndim - k :], trailing)):
            raise EnergyInputError(
                f"`{name}` must end with shape {_shape_str(trailing)}, got shape {tuple(x.shape)}."
            )
    if finite:
        check_finite(x, name)
    return x


def check_positive_int(value: object, name: str, *, what: str = "") -> int:
    """``value`` itself when it is a positive ``int`` (not a ``bool``), else an :class:`EnergyInputError` naming
    ``name`` (``what`` explains the argument, e.g. ``"(number of layers)"``).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        explain = f" {what}" if what else ""
        raise EnergyInputError(f"`{name}` must be a positive integer{explain}, got {value!r}.")
    return value


def check_real(value: object, name: str, *, positive: bool = False, what: str = "") -> float:
    """A finite Python real number ``≥ 0`` (``> 0`` if ``positive``), returned as ``float``; ``what`` explains it."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > 0 if positive else value >= 0))
    if not ok:
        bound = "> 0" if positive else "≥ 0"
        raise EnergyInputError(f"`{name}` {what + ' ' if what else ''}must be a finite number {bound}, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_options(options: Mapping[str, object], allowed: Iterable[str], function: str) -> None:
    """Raise ``TypeError`` (as Python does for an unknown keyword) if ``options`` has a key outside ``allowed``."""
    allowed = list(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword argument(s) {unknown}; its options are {allowed}.")


def check_tokens(Y: object, d: int, dtype: torch.dtype, name: str = "Y") -> Tensor:
    """Tokens ``(..., n, d)`` (finite) of the energy's weights' dtype ``dtype``."""
    Y = check_tensor(Y, name, min_ndim=2, trailing=(None, d))
    if Y.dtype != dtype:
        raise EnergyInputError(
            f"`{name}` has dtype {Y.dtype} but the energy's weights are {dtype}; cast one of them, e.g. "
            f"`{name}.to({dtype})` or `energy_module.to({Y.dtype})`."
        )
    return Y


def check_same_device(**tensors: Tensor | None) -> torch.device | None:
    """Check that all named tensors live on one device (a metadata check: tensors are never moved)."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"`{n}`: {d}" for n, d in devices.items())
        raise EnergyInputError(
            f"the arguments are on different devices ({listing}); move them to one device first, e.g. "
            f"`.to('cpu')` (a meta tensor has no values: pass a CPU/GPU tensor)."
        )
    return next(iter(devices.values()), None)


def check_same_float_dtype(**tensors: Tensor | None) -> torch.dtype:
    """Check that all named tensors share one floating dtype (mixed precision is rejected, not cast)."""
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"`{n}`: {d}" for n, d in dtypes.items())
        raise EnergyInputError(
            f"mixed dtypes ({listing}); cast every argument to one dtype, e.g. `.to(torch.float64)`."
        )
    return next(iter(dtypes.values()))


def default_tolerance(W: Tensor) -> float:
    """Tolerance of the constraint checks: ``1e3 · eps(dtype) · max(1, max|W|)`` (relative to the entries' size)."""
    scale = float(W.detach().abs().max()) if W.numel() else 1.0
    return 1e3 * torch.finfo(W.dtype).eps * max(1.0, scale)


def check_symmetric(W: Tensor, name: str, *, atol: float | None = None) -> Tensor:
    """Raise :class:`ConstraintError` if the trailing square matrix/matrices of ``W`` are not symmetric (a value
    check: skipped where a tracing transform makes the values unreadable, see :func:`value_holds`).
    """
    if W.ndim < 2 or W.shape[-1] != W.shape[-2]:
        raise EnergyInputError(f"`{name}` must be square in its last two dimensions, got {tuple(W.shape)}.")
    if not is_readable(W):  # a value check: skipped, by design, where a tracing transform hides the values
        return W
    tol = default_tolerance(W) if atol is None else atol
    Wd = W.detach()  # a check, not part of any graph
    asym = float((Wd - Wd.transpose(-1, -2)).abs().max()) if W.numel() else 0.0
    if asym > tol:
        raise ConstraintError(
            f"`{name}` must be symmetric (max |W - Wᵀ| = {asym:.3e} > tol {tol:.1e}). The energy's gradient is "
            "a symmetric operator, so only symmetric weights are steps of it; pass the symmetric part "
            "(W + Wᵀ)/2 explicitly or parametrise W = M Mᵀ (unfold.parametrizations)."
        )
    return W


def check_psd(W: Tensor, name: str, *, strict_pd: bool = False, atol: float | None = None) -> Tensor:
    """Raise :class:`ConstraintError` unless ``W`` is symmetric positive semi-definite (definite if asked)."""
    check_symmetric(W, name, atol=atol)
    if not is_readable(W):
        return W
    tol = default_tolerance(W) if atol is None else atol
    lam_min = float(torch.linalg.eigvalsh(for_linalg(W.detach())).min())
    if strict_pd and lam_min <= tol:
        raise ConstraintError(
            f"`{name}` must be positive definite (smallest eigenvalue {lam_min:.3e}); this step applies W⁻¹. "
            "Use a full-rank factor M (W = M Mᵀ with M of rank d) or use the token-preconditioned step."
        )
    if lam_min < -tol:
        raise ConstraintError(
            f"`{name}` must be positive semi-definite (smallest eigenvalue {lam_min:.3e} < 0); "
            "parametrise it as W = M Mᵀ."
        )
    return W


def check_float_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """A floating ``torch.dtype`` (data loaders' ``dtype=``); integer or other dtypes are rejected, not ignored."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise EnergyInputError(
            f"`{name}` must be a real floating torch dtype (torch.float32, torch.float64, ...), got {dtype!r}; the "
            "features are real numbers (labels are always torch.long)."
        )
    return dtype


def check_alpha_shape(alpha: object, name: str = "alpha") -> object:
    """A metadata check of a step size: a tensor ``alpha`` must be floating with one element (returns ``alpha``)."""
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1:
            raise EnergyInputError(
                f"`{name}` must be a number or a one-element tensor (one step size for the whole step), got a "
                f"tensor of shape {tuple(alpha.shape)}; pass e.g. `{name}=0.5` or `torch.tensor(0.5)`."
            )
        if not alpha.is_floating_point():
            raise EnergyInputError(f"`{name}` must be a floating-point tensor, got dtype {alpha.dtype}.")
    return alpha


def check_step_size(alpha: float | Tensor, name: str, *, low: float, high: float, reason: str,
                    high_inclusive: bool = False) -> float | Tensor:
    """Warn (or raise in :func:`strict_mode`) if ``alpha`` lies outside the guaranteed descent range.

    The guaranteed range is ``(low, high)`` (``(low, high]`` if ``high_inclusive``). ``reason`` names the
    guarantee, e.g. ``"MATH §1.1(a): Gaussian kernel, α ∈ (0, 2)"``. Returns ``alpha``: a Python number as a
    float, a (learnable) tensor unchanged (it is checked by value when it can be read, see :func:`value_holds`).
    """
    given = check_alpha_shape(alpha, name)
    if isinstance(alpha, Tensor):
        value = _read(alpha.detach())
        if value is None:
            return alpha
        alpha = value
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise EnergyInputError(f"`{name}` must be a finite real number, got {alpha!r}.")
    inside = low < alpha and (alpha <= high if high_inclusive else alpha < high)
    if not inside:
        bracket = "]" if high_inclusive else ")"
        msg = (
            f"`{name}` = {alpha:g} lies outside ({low:g}, {high:g}{bracket}, the range in which descent is "
            f"guaranteed ({reason}). The step is still computed, but the energy may increase."
        )
        if _STRICT:
            raise StepSizeError(msg + " Choose a step size inside the range, or leave strict_mode.")
        warnings.warn(msg + " Choose a step size inside the range to keep the guarantee.", StepSizeWarning,
                      stacklevel=3)
    return given if isinstance(given, Tensor) else float(alpha)


def check_scalar_objective(value: object, expr: str, *, where: str, fix_scalar: str, fix_finite: str) -> Tensor:
    """Raise :class:`EnergyInputError` unless ``value`` is a finite scalar tensor.

    For an objective evaluated once on concrete inputs at an operator's construction (its value can be read).

    Args:
        value: what the objective returned.
        expr: the call as the user wrote it, e.g. ``"loss_fn(o, y)"``.
        where: where it was evaluated, e.g. ``"on `data` batch 0"``.
        fix_scalar: how to make it a scalar.
        fix_finite: what to check when it is not finite.
    """
    if not isinstance(value, Tensor) or value.numel() != 1:
        got = f"tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise EnergyInputError(f"`{expr}` must return a scalar tensor, got {got}; {fix_scalar}.")
    if not bool(torch.isfinite(value).all()):
        raise EnergyInputError(
            f"`{expr}` is not finite {where} ({float(value)}); every curvature product would be NaN. {fix_finite}"
        )
    return value
