"""Named weight constraints as ``torch.nn.utils.parametrize`` parametrisations (MATH §1.7).

Energy-derived layers need constrained weights: a symmetric PSD query–key metric ``W = M Mᵀ`` per head, symmetric
FFN weights (with a bounded spectrum so that ``α = 1`` is a descent step), heads on mutually orthogonal subspaces.
Each constraint here is an ``nn.Module`` usable with :func:`torch.nn.utils.parametrize.register_parametrization`:

* ``forward(original)`` maps an unconstrained tensor to a tensor that satisfies the constraint;
* ``right_inverse(value)`` checks a given constrained value (raising :class:`~energy.ConstraintError` if it
  violates the constraint) and returns an ``original`` that reproduces it, so ``module.W = value`` and loading
  plain constrained weights never silently change them;
* ``check(value, name)`` raises a :class:`~energy.ConstraintError` that names the constraint and how to satisfy it.

No constraint is ever applied silently: a model declares its parametrisations, and :func:`constraints_of` lists them.

Every ``forward`` is a pure tensor map (no validation, no value read), so every ``torch.func`` transform (``grad``,
``vjp``, ``jvp``, ``linearize``, ``vmap``, ``hessian``) passes through a parametrised model; the constraint checks
run where the values are concrete: at assignment/loading (``right_inverse``), in ``check`` and in
:func:`check_constraints`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from energy._validation import (
    ConstraintError,
    EnergyInputError,
    check_positive_int,
    check_psd,
    check_scale,
    check_symmetric,
    default_tolerance,
)
from energy.core.attention import kappa, metric

__all__ = [
    "Constraint",
    "PSDMetric",
    "Symmetric",
    "SpectrumClip",
    "SpectrumSquash",
    "OrthogonalHeads",
    "constraints_of",
    "check_constraints",
]


def _sym(A: Tensor) -> Tensor:
    return 0.5 * (A + A.transpose(-1, -2))


class Constraint(nn.Module):
    """Base class of the named constraints: subclasses define ``forward``, ``right_inverse`` and ``check``."""

    #: short human-readable name used in error messages and reports
    constraint_name: str = "constraint"

    def check(self, value: Tensor, name: str = "weight") -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_named(self, check: Callable[..., Tensor], W: Tensor, name: str) -> Tensor:
        """Run an :mod:`energy._validation` check on ``W`` with the default tolerance; a violation names this
        constraint.
        """
        try:
            return check(W, name, atol=default_tolerance(W))
        except ConstraintError as exc:
            raise ConstraintError(f"{self.describe()} violated: {exc}") from None

    def describe(self) -> str:
        """One line: what the constraint is (used in reports and error messages)."""
        return self.constraint_name

    def extra_repr(self) -> str:
        return self.describe()


class PSDMetric(Constraint):
    r"""Query–key metric of one or more heads as a PSD Gram matrix (MATH §1.1).

    .. math:: W_h = \kappa\, M_h M_h^\top,\qquad M_h \in \mathbb{R}^{d\times k},\quad \kappa = 1/\sqrt{k}
        \text{ by default}

    The original tensor is the factor ``M`` of shape ``(..., d, k)`` (``(h, d, k)`` for ``h`` heads); the
    parametrised value is ``W`` of shape ``(..., d, d)``. ``W`` is symmetric PSD of rank ``≤ k`` by construction;
    this is the metric of :func:`energy.attention.metric` (the same function is called, so the step, the
    energy and the reproduced standard layer share one metric).

    Args:
        k: columns of the factor (per-head query/key width).
        scale: ``κ``; ``None`` means ``1/√k`` (the ``softmax(Q Kᵀ/√d_k)`` convention).
    """

    constraint_name = "PSDMetric"

    def __init__(self, k: int, scale: float | None = None) -> None:
        super().__init__()
        if not isinstance(k, int) or k <= 0:
            raise EnergyInputError(f"`k` (factor width) must be a positive int, got {k!r}.")
        self.k = k
        self.scale = float(kappa(check_scale(scale), k))

    def describe(self) -> str:
        return f"PSDMetric(W = {self.scale:.4g}·M Mᵀ, rank ≤ {self.k})"

    def forward(self, M: Tensor) -> Tensor:
        return metric(M, self.scale)

    def check(self, W: Tensor, name: str = "W") -> Tensor:
        """``W`` must be symmetric PSD with rank ``≤ k``."""
        self._check_named(check_psd, W, name)
        lam = torch.linalg.eigvalsh(W.detach())
        rank = int((lam > default_tolerance(W)).sum(-1).max()) if lam.numel() else 0
        if rank > self.k:
            raise ConstraintError(
                f"{self.describe()} violated: `{name}` has rank {rank} > k = {self.k}, so it is not κ·M Mᵀ with "
                f"M of width {self.k}. Use a factor width k ≥ {rank}, or truncate `{name}` to its top-{self.k} "
                "eigenpairs (unfold.converters.nearest_constrained does this)."
            )
        return W

    def right_inverse(self, W: Tensor) -> Tensor:
        """A factor ``M`` (``(..., d, k)``) with ``κ M Mᵀ = W``: top-``k`` eigenpairs, ``M = V √(λ/κ)``."""
        self.check(W)
        lam, V = torch.linalg.eigh(W)
        lam, V = lam[..., -self.k :].clamp_min(0.0), V[..., -self.k :]
        if V.shape[-1] < self.k:  # k > d: pad with zero columns (they do not change M Mᵀ)
            pad = V.new_zeros(*V.shape[:-1], self.k - V.shape[-1])
            return torch.cat([V * torch.sqrt(lam / self.scale).unsqueeze(-2), pad], dim=-1)
        return V * torch.sqrt(lam / self.scale).unsqueeze(-2)


class Symmetric(Constraint):
    r"""Symmetric matrix from an unconstrained square one.

    .. math:: W = \tfrac12 (A + A^\top)

    Declared, not silent: a step that uses it lists it in :func:`constraints_of`. Assigning or loading a
    non-symmetric ``W`` raises (it is never symmetrised for you).
    """

    constraint_name = "Symmetric"

    def describe(self) -> str:
        return "Symmetric(W = (A + Aᵀ)/2)"

    def forward(self, A: Tensor) -> Tensor:
        return _sym(A)

    def check(self, W: Tensor, name: str = "W") -> Tensor:
        return self._check_named(check_symmetric, W, name)

    def right_inverse(self, W: Tensor) -> Tensor:
        return self.check(W)


def _daleckii_krein(lam: Tensor, V: Tensor, f: Tensor, fprime: Tensor, G: Tensor) -> Tensor:
    r""":math:`V\,(\Phi \circ (V^\top \mathrm{sym}(G)\, V))\,V^\top`: the derivative of the spectral function
    :math:`S \mapsto V f(\Lambda) V^\top` in direction ``G`` (self-adjoint, so it is also the vector–Jacobian
    product); ``fprime`` = :math:`f'(\lambda_i)`, used on (near-)ties. Tensor operations only.
    """
    dlam = lam.unsqueeze(-1) - lam.unsqueeze(-2)
    df = f.unsqueeze(-1) - f.unsqueeze(-2)
    tie = dlam.abs() <= 1e3 * torch.finfo(lam.dtype).eps * lam.abs().amax(-1, keepdim=True).unsqueeze(-1).clamp_min(1.0)
    deriv = 0.5 * (fprime.unsqueeze(-1) + fprime.unsqueeze(-2))  # ties: f' (equal eigenvalues share one value)
    Phi = torch.where(tie, deriv, df / torch.where(tie, torch.ones_like(dlam), dlam))
    Gs = 0.5 * (G + G.transpose(-1, -2))
    return V @ (Phi * (V.transpose(-1, -2) @ Gs @ V)) @ V.transpose(-1, -2)


def _clip_prime(lam: Tensor, lo: float, hi: float) -> Tensor:
    """The clip's derivative: 1 inside ``[lo, hi]``, 0 outside (one-sided at the bounds: they can move back)."""
    return ((lam >= lo) & (lam <= hi)).to(lam.dtype)


def squash(lam: Tensor, lo: float, hi: float) -> Tensor:
    r""":math:`g(\lambda) = m + r\tanh((\lambda - m)/r)`, :math:`m = (lo + hi)/2`, :math:`r = (hi - lo)/2`: a smooth
    increasing bijection of :math:`\mathbb{R}` onto :math:`(lo, hi)` with slope 1 at the centre (MATH §7.3); pure.
    """
    m, r = 0.5 * (lo + hi), 0.5 * (hi - lo)
    return m + r * torch.tanh((lam - m) / r)


def _squash_prime(lam: Tensor, lo: float, hi: float) -> Tensor:
    m, r = 0.5 * (lo + hi), 0.5 * (hi - lo)
    return 1.0 - torch.tanh((lam - m) / r) ** 2


class _ClipSpectrum(torch.autograd.Function):
    r"""``S ↦ V clip(Λ) Vᵀ`` for symmetric ``S = V Λ Vᵀ``, with the Daleckii–Krein derivative.

    .. math:: \mathrm{d}F = V\,\big(\Phi \circ (V^\top \mathrm{d}S\, V)\big)\,V^\top ,\qquad
        \Phi_{ij} = \frac{f(\lambda_i) - f(\lambda_j)}{\lambda_i - \lambda_j}\ (\lambda_i \ne \lambda_j),\quad
        \Phi_{ii} = f'(\lambda_i),

    ``f = clip(·, lo, hi)``. Autograd through ``eigh`` would form ``1/(λ_i − λ_j)`` for the eigenvectors, which is
    infinite for repeated eigenvalues (and clipping creates them); the divided differences are bounded by 1. The
    same formula serves ``backward`` and ``jvp``; ``setup_context`` and the generated vmap rule make the function
    usable under every ``torch.func`` transform. First derivatives are exact; a second derivative (``hessian``,
    double backward) differentiates the formula with ``V``, ``Λ`` held fixed, i.e. it omits the curvature of the
    eigendecomposition (whose derivative has the unbounded ``1/(λ_i − λ_j)``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(S: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lam, V = torch.linalg.eigh(S)
        f = lam.clamp(lo, hi)
        return (V * f.unsqueeze(-2)) @ V.transpose(-1, -2), lam, V, f

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        _, lo, hi = inputs
        _, lam, V, f = output
        ctx.mark_non_differentiable(lam, V, f)
        ctx.save_for_backward(lam, V, f)
        ctx.save_for_forward(lam, V, f)
        ctx.lo, ctx.hi = lo, hi

    @staticmethod
    def backward(ctx: Any, G: Tensor, *_: Any) -> tuple[Tensor, None, None]:
        lam, V, f = ctx.saved_tensors
        return _daleckii_krein(lam, V, f, _clip_prime(lam, ctx.lo, ctx.hi), G), None, None

    @staticmethod
    def jvp(ctx: Any, dS: Tensor, *_: Any) -> tuple[Tensor, None, None, None]:
        lam, V, f = ctx.saved_tensors
        return _daleckii_krein(lam, V, f, _clip_prime(lam, ctx.lo, ctx.hi), dS), None, None, None


class _SquashSpectrum(_ClipSpectrum):
    r"""``S ↦ V g(Λ) Vᵀ`` with the smooth :func:`squash` ``g`` (Daleckii–Krein derivative, :math:`\Phi > 0`
    everywhere: every eigen-direction receives a gradient, MATH §7.3).
    """

    @staticmethod
    def forward(S: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lam, V = torch.linalg.eigh(S)
        f = squash(lam, lo, hi)
        return (V * f.unsqueeze(-2)) @ V.transpose(-1, -2), lam, V, f

    @staticmethod
    def backward(ctx: Any, G: Tensor, *_: Any) -> tuple[Tensor, None, None]:
        lam, V, f = ctx.saved_tensors
        return _daleckii_krein(lam, V, f, _squash_prime(lam, ctx.lo, ctx.hi), G), None, None

    @staticmethod
    def jvp(ctx: Any, dS: Tensor, *_: Any) -> tuple[Tensor, None, None, None]:
        lam, V, f = ctx.saved_tensors
        return _daleckii_krein(lam, V, f, _squash_prime(lam, ctx.lo, ctx.hi), dS), None, None, None


class SpectrumClip(Constraint):
    r"""Symmetric matrix with eigenvalues clipped to ``[lo, hi]`` (MATH §1.3).

    .. math:: W = V\,\mathrm{clip}(\Lambda, lo, hi)\,V^\top,\qquad V \Lambda V^\top = \tfrac12 (A + A^\top)

    With ``[lo, hi] = [0, 0.95]`` the FFN energy's gradient step with ``α = 1`` is a descent step
    (``α < 2 / λ_max(I + W_f)``). One symmetric eigendecomposition per evaluation (never a squared matrix);
    the unroller evaluates each parametrised weight once per forward pass, however deep the model.

    Args:
        lo: lower bound of the spectrum.
        hi: upper bound of the spectrum (``hi ≥ lo``).
    """

    constraint_name = "SpectrumClip"

    def __init__(self, lo: float = 0.0, hi: float = 0.95) -> None:
        super().__init__()
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
            raise EnergyInputError(f"SpectrumClip needs finite bounds lo ≤ hi, got lo={lo!r}, hi={hi!r}.")
        self.lo, self.hi = float(lo), float(hi)

    def describe(self) -> str:
        return f"SpectrumClip(symmetric, eigenvalues in [{self.lo:g}, {self.hi:g}])"

    def forward(self, A: Tensor) -> Tensor:
        return _ClipSpectrum.apply(_sym(A), self.lo, self.hi)[0]

    def check(self, W: Tensor, name: str = "W") -> Tensor:
        self._check_named(check_symmetric, W, name)
        lam = torch.linalg.eigvalsh(W.detach())
        tol = default_tolerance(W)
        lmin, lmax = float(lam.min()), float(lam.max())
        if lmin < self.lo - tol or lmax > self.hi + tol:
            raise ConstraintError(
                f"{self.describe()} violated: `{name}` has eigenvalues in [{lmin:.4g}, {lmax:.4g}]. Rescale "
                f"`{name}` (e.g. by {self.hi / max(abs(lmax), 1e-300):.3g} if only the top is too large), or clip "
                "its spectrum explicitly with SpectrumClip(lo, hi)(W) before loading."
            )
        return W

    def right_inverse(self, W: Tensor) -> Tensor:
        return self.check(W)


class SpectrumSquash(SpectrumClip):
    r"""Symmetric matrix with eigenvalues mapped smoothly into the open band ``(lo, hi)`` (MATH §7.3).

    .. math:: W = V\,g(\Lambda)\,V^\top,\qquad g(\lambda) = m + r\tanh\big((\lambda - m)/r\big),\qquad
        V \Lambda V^\top = \tfrac12 (A + A^\top)

    (:func:`squash`: ``m = (lo + hi)/2``, ``r = (hi − lo)/2``). Unlike :class:`SpectrumClip`, whose derivative is 0
    for eigenvalues of the original outside the band (they stop learning), :math:`g' > 0` everywhere, so every
    eigen-direction gets a gradient. ``right_inverse`` is exact for values with eigenvalues strictly inside the band
    (:math:`g^{-1} = m + r\,\mathrm{artanh}((w - m)/r)`); a value on the band's edge is not reachable and raises.

    Args:
        lo: lower bound of the spectrum.
        hi: upper bound (``hi > lo``).
    """

    constraint_name = "SpectrumSquash"

    def __init__(self, lo: float = 0.0, hi: float = 0.95) -> None:
        super().__init__(lo, hi)
        if not self.lo < self.hi:
            raise EnergyInputError(f"SpectrumSquash needs lo < hi (an open band), got lo={lo!r}, hi={hi!r}; use "
                                   "SpectrumClip for a single value.")

    def describe(self) -> str:
        return f"SpectrumSquash(symmetric, eigenvalues in ({self.lo:g}, {self.hi:g}) by m + r·tanh((λ − m)/r))"

    def forward(self, A: Tensor) -> Tensor:
        return _SquashSpectrum.apply(_sym(A), self.lo, self.hi)[0]

    def right_inverse(self, W: Tensor) -> Tensor:
        """The original ``V g⁻¹(Λ) Vᵀ`` of a symmetric ``W`` with eigenvalues strictly inside ``(lo, hi)``."""
        self.check(W)
        lam, V = torch.linalg.eigh(W)
        m, r = 0.5 * (self.lo + self.hi), 0.5 * (self.hi - self.lo)
        u = (lam - m) / r
        if float(u.abs().max()) >= 1.0:
            raise ConstraintError(
                f"{self.describe()}: the value has an eigenvalue on the band's edge ({float(lam.min()):.6g} or "
                f"{float(lam.max()):.6g}), which the smooth map never reaches; move it inside (e.g. shrink towards "
                f"{m:g}) or use spectrum_map='clip'."
            )
        return (V * (m + r * torch.atanh(u)).unsqueeze(-2)) @ V.transpose(-1, -2)


def check_spectrum(spectrum: object) -> tuple[float, float]:
    """``spectrum = (lo, hi)``, the eigenvalue bounds of ``W_f``: finite, ``-1 < lo ≤ hi`` (else the FFN energy is
    unbounded below). Whether ``alpha`` lies in the range it guarantees, ``α < 2/(1 + hi)`` (MATH §1.3), is the
    step-size policy's question: a warning, or an error in :func:`energy.strict_mode` (see :class:`FFNStep`).
    """
    ok = (isinstance(spectrum, (tuple, list)) and len(spectrum) == 2
          and all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in spectrum))
    if not ok:
        raise EnergyInputError(f"`spectrum` must be a pair (lo, hi) of finite numbers (eigenvalue bounds of W_f, e.g. "
                               f"(0.0, 0.95)) or None, got {spectrum!r}.")
    lo, hi = float(spectrum[0]), float(spectrum[1])  # type: ignore[index]
    if lo > hi:
        raise EnergyInputError(f"`spectrum` must be (lo, hi) with lo ≤ hi, got {spectrum!r}; pass ({hi!r}, {lo!r}).")
    if lo <= -1:
        raise EnergyInputError(f"`spectrum` = {spectrum!r} allows eigenvalues of W_f ≤ -1, where the FFN energy is "
                               "unbounded below; use lo > -1, e.g. (0.0, 0.95).")
    return lo, hi


def interior_start(S: Tensor, lo: float, hi: float) -> Tensor:
    """``V g(Λ) Vᵀ`` for ``S = V Λ Vᵀ`` (``g`` = :func:`squash`, into the open band), or ``lo·I`` for a single-value
    band: the start of a spectrum-constrained ``W_f`` (MATH §7.3).
    """
    if not lo < hi:
        return lo * torch.eye(S.shape[-1], dtype=S.dtype)
    lam, V = torch.linalg.eigh(S)
    return (V * squash(lam, lo, hi).unsqueeze(-2)) @ V.T


class OrthogonalHeads(Constraint):
    r"""Head factors on mutually orthogonal subspaces (MATH §1.2).

    .. math:: M_h = Q_{[:,\,hk:(h+1)k]}\, R_h,\qquad Q^\top Q = I_d,\ R_h \in \mathbb{R}^{k\times k}

    so ``M_hᵀ M_g = 0`` for ``h ≠ g`` and each head keeps its own descent guarantee (the multi-head step splits
    into per-subspace steps). ``Q`` is kept orthogonal by torch's own parametrisation
    (:func:`torch.nn.utils.parametrizations.orthogonal`) on an internal ``d × d`` matrix; the original of the
    parametrised tensor is ``R`` of shape ``(h, k, k)``. Needs ``h·k ≤ d``.

    Args:
        heads: number of heads ``h``.
        d: feature width.
        k: per-head factor width.
    """

    constraint_name = "OrthogonalHeads"

    def __init__(self, heads: int, d: int, k: int) -> None:
        super().__init__()
        for name, v in (("heads", heads), ("d", d), ("k", k)):
            check_positive_int(v, name)
        if heads * k > d:
            raise EnergyInputError(
                f"OrthogonalHeads needs heads·k ≤ d (orthogonal subspaces of dimension k in R^d), got heads={heads}, "
                f"k={k}, d={d}; reduce k to ≤ {d // heads} or drop the orthogonality constraint."
            )
        self.heads, self.d, self.k = heads, d, k
        holder = nn.Linear(d, d, bias=False)
        nn.init.eye_(holder.weight)
        self.basis = nn.utils.parametrizations.orthogonal(holder)

    def describe(self) -> str:
        return f"OrthogonalHeads(h={self.heads}, k={self.k}: M_hᵀ M_g = 0 for h ≠ g)"

    @property
    def Q(self) -> Tensor:
        """The orthogonal ``d × d`` basis whose column blocks span the heads' subspaces.

        torch's parametrisation keeps ``basis.weight`` orthogonal to the precision it was built in; a QR with
        positive diagonal (the identity map on an exactly orthogonal matrix) makes it orthogonal to the working
        precision also after a dtype change (e.g. a model built in float32, then ``.double()``).
        """
        Q, R = torch.linalg.qr(self.basis.weight)
        return Q * torch.sign(R.diagonal()).unsqueeze(-2)

    def forward(self, R: Tensor) -> Tensor:
        Q = self.Q.to(R.dtype)[:, : self.heads * self.k]
        blocks = Q.reshape(self.d, self.heads, self.k).permute(1, 0, 2)  # (h, d, k)
        return blocks @ R

    def check(self, M: Tensor, name: str = "M") -> Tensor:
        if M.ndim != 3 or M.shape != (self.heads, self.d, self.k):
            raise ConstraintError(
                f"{self.describe()}: `{name}` must have shape (h, d, k) = {(self.heads, self.d, self.k)}, "
                f"got {tuple(M.shape)}."
            )
        G = torch.einsum("hdk,gdl->hgkl", M, M)
        off = G.clone()
        idx = torch.arange(self.heads, device=M.device)
        off[idx, idx] = 0.0
        scale = float(G[idx, idx].abs().max()) if G.numel() else 1.0
        worst = float(off.abs().max()) / max(scale, 1e-300)
        if worst > 1e3 * torch.finfo(M.dtype).eps:
            raise ConstraintError(
                f"{self.describe()} violated: `{name}` has max |M_hᵀ M_g| / max |M_hᵀ M_h| = {worst:.3e} for some "
                "h ≠ g. Orthogonalise the heads (e.g. QR of the stacked factors) or drop the constraint "
                "(general heads: the summed step is not a guaranteed descent step, MATH §1.2)."
            )
        return M

    def right_inverse(self, M: Tensor) -> Tensor:
        """Check ``M``, set the basis ``Q`` to span the heads and return ``R_h = Q_hᵀ M_h``."""
        self.check(M)
        stacked = M.permute(1, 0, 2).reshape(self.d, self.heads * self.k)  # [M_1 … M_h]
        Q, _ = torch.linalg.qr(stacked, mode="complete")
        with torch.no_grad():
            self.basis.weight = Q.to(self.basis.weight.dtype)
        Qb = Q[:, : self.heads * self.k].reshape(self.d, self.heads, self.k).permute(1, 0, 2)
        R = Qb.transpose(-1, -2) @ M
        err = float((Qb @ R - M).abs().max())
        if err > default_tolerance(M) * 10:
            raise ConstraintError(
                f"{self.describe()}: could not factor `M` as Q_h R_h (reconstruction error {err:.3e}); a head "
                "factor is rank-deficient in a way that mixes subspaces. Use full-rank head factors."
            )
        return R


def constraints_of(module: nn.Module) -> dict[str, list[Constraint]]:
    """All named constraints registered on ``module`` and its children: ``{"child.tensor": [constraints]}``."""
    out: dict[str, list[Constraint]] = {}
    for prefix, mod in module.named_modules():
        if parametrize.is_parametrized(mod):
            for tensor_name, plist in mod.parametrizations.items():
                cons = [p for p in plist if isinstance(p, Constraint)]
                if cons:
                    out[f"{prefix}.{tensor_name}" if prefix else tensor_name] = cons
    return out


def check_constraints(module: nn.Module) -> None:
    """Evaluate every parametrised tensor of ``module`` and run its constraints' checks (raises on violation)."""
    if not isinstance(module, nn.Module):
        raise EnergyInputError(f"`module` must be an nn.Module (a model or step with constrained weights), got "
                               f"{type(module).__name__}.")
    for qualified, cons in constraints_of(module).items():
        owner_name, _, tensor_name = qualified.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = getattr(owner, tensor_name).detach()
        if not bool(torch.isfinite(value).all()):
            raise ConstraintError(f"`{qualified}` contains NaN or inf entries (corrupt weights).")
        cons[-1].check(value, qualified)
