r"""``python -m energy verify``: the equivalence suite behind the library's promise.

For every case, on ``--trials`` random float64 instances (odd shapes, batch > 1, heads > 1 where relevant):

* **closed vs autograd** – the closed-form step against the step assembled from the *autograd* gradient of the energy
  alone and the stated preconditioner (``Y − α P⁻¹ ∇E``);
* **closed vs reference** – the step against the standard layer it claims to reproduce, built from torch's own modules
  (``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``, ``nn.Linear``, ``nn.LayerNorm``) under the matching
  weight constraints;
* **descent** – ``E(step(Y)) ≤ E(Y)`` at a random step size inside the guaranteed range (``guaranteed = False``
  marks cases without a guarantee, whose violations are *measured*, e.g. plain softmax without the key bias β).

``max_abs_err`` is the larger of the two errors, maximised over trials. Target: ≤ 1e-10, and 0 violations wherever
``guaranteed`` is true.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy, attention_step_fused, key_bias
from energy.core import attention as core
from energy.core import related as core_related
from energy.core.fused import fused_step
from energy.energy_transformer import EnergyTransformerEnergy
from energy.ffn import FFNEnergy, TiedReLUEnergy
from energy.hopfield import HopfieldEnergy
from energy.kernels import CauchyKernel, PowerKernel
from energy.normalization import layernorm_projection
from energy.reference import multi_head_attention

__all__ = ["CaseResult", "CASES", "run", "main"]

DTYPE = torch.float64


@dataclass
class CaseResult:
    """One row of the report: a case's worst errors and descent violations over its random trials.

    ``max_abs_err`` is the larger of ``err_autograd`` (closed form vs the autograd-assembled step) and
    ``err_reference`` (closed form vs the torch-module layer it reproduces), maximised over ``trials`` instances;
    ``None`` when the case compares nothing. ``descent_violations`` counts trials with ``E(step(Y)) > E(Y)``; they
    are failures only where ``guaranteed`` is true.
    """

    case: str
    reproduces: str
    reference: str
    max_abs_err: float | None  # None: the case compares nothing (a measured trap)
    err_autograd: float | None
    err_reference: float | None
    descent_violations: int
    guaranteed: bool
    trials: int


@dataclass
class _Trial:
    err_autograd: float | None
    err_reference: float | None
    violated: bool | None  # None: descent not applicable


@dataclass(frozen=True)
class _Case:
    name: str
    reproduces: str
    reference: str
    guaranteed: bool
    run: Callable[[torch.Generator], _Trial]


CASES: list[_Case] = []


def _case(name: str, reproduces: str, reference: str, guaranteed: bool = True):
    def deco(fn: Callable[[torch.Generator], _Trial]) -> Callable[[torch.Generator], _Trial]:
        CASES.append(_Case(name, reproduces, reference, guaranteed, fn))
        return fn

    return deco


# ---------------------------------------------------------------------------------------------------- helpers


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=DTYPE))


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=DTYPE)


def _err(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().abs().max())


def _increased(E_new: Tensor, E_old: Tensor) -> bool:
    tol = 1e-10 * E_old.abs().clamp_min(1.0)
    return bool((E_new > E_old + tol).any())


def _shapes(g: torch.Generator) -> tuple[int, int, int]:
    """Batch, tokens, width: odd and unequal on purpose (n ≠ d, B > 1)."""
    return _randint(g, 2, 3), _randint(g, 3, 9), _randint(g, 2, 6)


def _mha(d: int, heads: int, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor) -> nn.MultiheadAttention:
    """An ``nn.MultiheadAttention`` (float64, no biases) with right-acting weights ``W_Q, W_K, W_V`` (d × d)
    and output map ``W_O`` (d × d): torch stores them transposed.
    """
    mha = nn.MultiheadAttention(d, heads, bias=False, batch_first=True, dtype=DTYPE)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([W_Q.T, W_K.T, W_V.T], dim=0))
        mha.out_proj.weight.copy_(W_O.T)
    return mha.eval()


def _beta_mask(Y: Tensor, W: Tensor, heads: int = 1) -> Tensor:
    """Key bias β as an additive ``attn_mask`` of shape ``(B·heads, n, n)`` (per-head metrics stacked in ``W``)."""
    W = W.reshape(heads, *W.shape[-2:])
    beta = key_bias(Y.unsqueeze(-3), W)  # (B, heads, n)
    B, n = Y.shape[0], Y.shape[-2]
    return beta.unsqueeze(-2).expand(B, heads, n, n).reshape(B * heads, n, n)


def _attention_trial(E: AttentionEnergy | MultiHeadAttentionEnergy, Y: Tensor, alpha: float,
                     reference_err: Callable[[Tensor], float], preconditioner: str = "metric") -> _Trial:
    """The step ``Y⁺`` against the autograd twin ``Y − α P⁻¹∇E`` and against a reference (``reference_err(Y⁺)``),
    and whether ``E`` increased.
    """
    Yp = E.step(Y, alpha, preconditioner=preconditioner)
    via_autograd = Y - alpha * E.preconditioned_grad(Y, E.autograd_grad(Y), preconditioner=preconditioner)
    return _Trial(_err(Yp, via_autograd), reference_err(Yp), _increased(E.energy(Yp), E.energy(Y)))


def _head_shapes(g: torch.Generator) -> tuple[int, int, int, int, int]:
    """Batch, tokens, heads ``h``, head width ``k`` and ``d = h·k`` of a multi-head case."""
    B, n = _randint(g, 2, 3), _randint(g, 3, 9)
    h, k = _randint(g, 2, 3), _randint(g, 1, 3)
    return B, n, h, k, h * k


def _factor_problem(g: torch.Generator, width: Callable[[int], int]) -> tuple[int, int, int, int, Tensor, Tensor]:
    """Shapes ``B, n, d`` (:func:`_shapes`), a factor ``M`` ``(d, k)`` with ``k = width(d)`` and tokens ``Y``."""
    B, n, d = _shapes(g)
    k = width(d)
    return B, n, d, k, _randn(g, d, k), _randn(g, B, n, d)


# ---------------------------------------------------------------------------------------------------- cases


@_case("attention-step-a", "(1−α)Y + α·softmax_β(Y W Yᵀ) Y  (Gaussian ρ, metric preconditioner)",
       "SDPA and nn.MultiheadAttention (W_Q=W_K=M, W_V=W_O=I, β as attn_mask)")
def _attention_a(g: torch.Generator) -> _Trial:
    B, n, d, k, M, Y = _factor_problem(g, lambda d: d + _randint(g, 0, 2))  # k ≥ d: W ≻ 0, (D ⊗ W)⁻¹ exists
    E, alpha = AttentionEnergy(M), _uniform(g, 0.05, 1.95)
    Q = Y @ M
    sdpa = F.scaled_dot_product_attention(Q, Q, Y, attn_mask=_beta_mask(Y, E.W), scale=1 / math.sqrt(k))
    # nn.MultiheadAttention with one head of width d scales by 1/√d: tie W_Q = W_K = C with C Cᵀ = √d · W.
    C = torch.linalg.cholesky(math.sqrt(d) * E.W)
    eye = torch.eye(d, dtype=DTYPE)
    mha = _mha(d, 1, C, C, eye, eye)(Y, Y, Y, attn_mask=_beta_mask(Y, E.W), need_weights=False)[0]
    return _attention_trial(E, Y, alpha, lambda Yp: max(_err(Yp, (1 - alpha) * Y + alpha * sdpa),
                                                        _err(Yp, (1 - alpha) * Y + alpha * mha)))


@_case("attention-step-b", "Y(I − αW) + α·softmax_β(Y W Yᵀ) Y W  (Gaussian ρ, token preconditioner)",
       "SDPA with values Y·W and skip path Y(I − αW)")
def _attention_b(g: torch.Generator) -> _Trial:
    B, n, d, k, M, Y = _factor_problem(g, lambda d: _randint(g, 1, d + 1))  # any rank: no W⁻¹ needed
    E = AttentionEnergy(M)
    alpha = _uniform(g, 0.05, 1.95) / E.lambda_max_W()
    Q = Y @ M
    sdpa = F.scaled_dot_product_attention(Q, Q, Y @ E.W, attn_mask=_beta_mask(Y, E.W), scale=1 / math.sqrt(k))
    ref = Y @ (torch.eye(d, dtype=DTYPE) - alpha * E.W) + alpha * sdpa
    return _attention_trial(E, Y, alpha, lambda Yp: _err(Yp, ref), preconditioner="token")


@_case("attention-ridge", "(1−α)Y + α·Σ_j γ_ij y_j / (λ + Σ_k γ_ik)  (ridge λ, null slot)",
       "SDPA with an extra zero-value key (the null slot)")
def _attention_ridge(g: torch.Generator) -> _Trial:
    B, n, d, k, M, Y = _factor_problem(g, lambda d: d + 1)
    lam = _uniform(g, 0.1, 3.0)
    E, alpha = AttentionEnergy(M, ridge=lam), _uniform(g, 0.05, 1.95)
    # γ_ij = exp(−½‖y_i‖²_W) · exp(y_iᵀ W y_j + β_j): the null slot's logit is log λ + ½‖y_i‖²_W, its value 0.
    Q = Y @ M
    half_norm = 0.5 * torch.einsum("bid,de,bie->bi", Y, E.W, Y)
    mask = torch.cat([_beta_mask(Y, E.W), (math.log(lam) + half_norm).unsqueeze(-1)], dim=-1)
    K = torch.cat([Q, torch.zeros(B, 1, k, dtype=DTYPE)], dim=1)
    V = torch.cat([Y, torch.zeros(B, 1, d, dtype=DTYPE)], dim=1)
    null_slot = F.scaled_dot_product_attention(Q, K, V, attn_mask=mask, scale=1 / math.sqrt(k))
    ref = (1 - alpha) * Y + alpha * null_slot
    return _attention_trial(E, Y, alpha, lambda Yp: _err(Yp, ref))


@_case("attention-step-a-other-kernels", "(1−α)Y + α·D⁻¹ΓY with Cauchy / power (IRLS) weights γ_ij = ρ'(z_ij)",
       "brute-force pair loop over ‖y_i − y_j‖²_W (no Gram matrix)")
def _attention_other_kernels(g: torch.Generator) -> _Trial:
    B, n, d, k, M, Y = _factor_problem(g, lambda d: d + 1)
    kernel = CauchyKernel() if _randint(g, 0, 1) else PowerKernel(_uniform(g, 0.5, 2.0), eps=_uniform(g, 0.1, 1.0))
    E = AttentionEnergy(M, kernel=kernel)
    alpha = _uniform(g, 0.05, 0.975) * E.step_range().high  # both kernels have Γ ⪰ 0: range (0, 2)
    diff = Y.unsqueeze(-2) - Y.unsqueeze(-3)  # (B, n, n, d): fine for a reference at these sizes
    Gamma = kernel.drho(0.5 * torch.einsum("bijd,de,bije->bij", diff, E.W, diff))
    ref = (1 - alpha) * Y + alpha * (Gamma / Gamma.sum(-1, keepdim=True)) @ Y
    return _attention_trial(E, Y, alpha, lambda Yp: _err(Yp, ref))


def _orthogonal_heads(g: torch.Generator, d: int, h: int) -> Tensor:
    """``M`` of shape ``(h, d, d/h)``: heads on disjoint column blocks of a random orthogonal matrix, each mixed by
    a well-conditioned ``k × k`` factor (singular values in [0.5, 1.5]).
    """
    Qo, _ = torch.linalg.qr(_randn(g, d, d))
    k = d // h
    factors = [torch.linalg.qr(_randn(g, k, k))[0] * (0.5 + torch.rand(k, generator=g, dtype=DTYPE)) for _ in range(h)]
    return torch.stack([Qo[:, i * k:(i + 1) * k] @ factors[i] for i in range(h)])


@_case("attention-multihead-orthogonal", "Y − α Σ_h (Y − A_h Y) P_h  (orthogonal heads, metric preconditioner)",
       "nn.MultiheadAttention (W_Q,h = W_K,h = M_h, values/outputs U_h, β_h as attn_mask)")
def _multihead_orthogonal(g: torch.Generator) -> _Trial:
    B, n, h, k, d = _head_shapes(g)
    M, Y = _orthogonal_heads(g, d, h), _randn(g, B, n, d)
    E, alpha = MultiHeadAttentionEnergy(M), _uniform(g, 0.05, 1.95)
    U = torch.linalg.qr(M)[0]  # orthonormal bases U_h of range(M_h): P_h = U_h U_hᵀ
    stack = lambda T: torch.cat(list(T), dim=1)  # (h, d, k) → (d, h·k)
    mha = _mha(d, h, stack(M), stack(M), stack(U), stack(U).T)
    out = mha(Y, Y, Y, attn_mask=_beta_mask(Y, E.W, h), need_weights=False)[0]
    fused = attention_step_fused(Y, M, alpha)
    return _attention_trial(E, Y, alpha, lambda Yp: max(_err(Yp, (1 - alpha) * Y + alpha * out), _err(Yp, fused)))


@_case("attention-multihead-general", "Σ_h per-head steps, general (non-orthogonal) heads",
       "attention_step_fused (SDPA); descent measured, not guaranteed (MATH §1.2)", guaranteed=False)
def _multihead_general(g: torch.Generator) -> _Trial:
    B, n, d = _shapes(g)
    h, k = _randint(g, 2, 3), _randint(g, 1, d)
    M, Y = _randn(g, h, d, k), _randn(g, B, n, d)
    E, alpha = MultiHeadAttentionEnergy(M), _uniform(g, 0.05, 1.0)
    # No guaranteed range exists (that is the point): the public step would warn, so the pure core is compared,
    # the einsum step against the fused one, with the value/output maps of MultiHeadAttentionEnergy.step.
    kappa = core.kappa(None, k)
    values, out = core.value_output_maps(M, kappa, "metric", single=False)
    Yp = core.head_step(Y, M, kappa, E.kernel, 0.0, None, values, out, alpha)
    fused = fused_step(Y, M, alpha, kappa, values, out)
    return _Trial(None, _err(Yp, fused), _increased(E.energy(Yp), E.energy(Y)))


@_case("plain-softmax-without-beta", "softmax(Y W Yᵀ) Y without the key bias β  (a known trap)",
       "step (a) at α = 1; violations of E_att descent measured", guaranteed=False)
def _plain_softmax(g: torch.Generator) -> _Trial:
    B, n, d = _shapes(g)
    M = _randn(g, d, d)
    Y = _randn(g, B, n, d) * torch.exp(_randn(g, B, n, 1))  # unequal token norms: β is not constant
    E = AttentionEnergy(M)
    Yp = torch.softmax(Y @ E.W @ Y.transpose(-1, -2), dim=-1) @ Y
    return _Trial(None, None, _increased(E.energy(Yp), E.energy(Y)))


def _spd_spectrum(g: torch.Generator, d: int, lo: float, hi: float) -> Tensor:
    Qo, _ = torch.linalg.qr(_randn(g, d, d))
    lam = lo + (hi - lo) * torch.rand(d, generator=g, dtype=DTYPE)
    return Qo @ torch.diag(lam) @ Qo.T


def _ffn_problem(g: torch.Generator) -> tuple[int, int, int, FFNEnergy, float, nn.Linear]:
    """An FFN energy (``W_f`` spectrum in [0, 0.95]), a step size inside its range, and the ``nn.Linear`` its step
    is: weight ``(1 − α)I − αW_f``, bias ``αb``.
    """
    B, n, d = _shapes(g)
    W_f, b = _spd_spectrum(g, d, 0.0, 0.95), _randn(g, d)
    E = FFNEnergy(W_f, b)
    alpha = _uniform(g, 0.05, 1.95) * E.step_range().high / 2
    lin = nn.Linear(d, d, dtype=DTYPE)
    with torch.no_grad():
        lin.weight.copy_(((1 - alpha) * torch.eye(d, dtype=DTYPE) - alpha * W_f).T)
        lin.bias.copy_(alpha * b)
    return B, n, d, E, alpha, lin


@_case("ffn-step", "(1−α)Y − α Y W_f + α 1bᵀ  (gradient step of E_ffn)", "nn.Linear")
def _ffn(g: torch.Generator) -> _Trial:
    B, n, d, E, alpha, lin = _ffn_problem(g)
    Y = _randn(g, B, n, d)
    Yp = E.step(Y, alpha)
    ref = lin(Y).detach()
    return _Trial(_err(Yp, Y - alpha * E.autograd_grad(Y)), _err(Yp, ref), _increased(E.energy(Yp), E.energy(Y)))


@_case("ffn-relu-projected", "ReLU(Y − α∇E_ffn)  (projected gradient on E_ffn + ι_{≥0})", "ReLU ∘ nn.Linear")
def _ffn_relu(g: torch.Generator) -> _Trial:
    B, n, d, E, alpha, lin = _ffn_problem(g)
    Y = torch.rand(B, n, d, generator=g, dtype=DTYPE)  # feasible start
    Yp = E.projected_step(Y, alpha)
    ref = torch.relu(lin(Y)).detach()
    via_autograd = torch.relu(Y - alpha * E.autograd_grad(Y))
    return _Trial(_err(Yp, via_autograd), _err(Yp, ref),
                  _increased(E.constrained_energy(Yp), E.constrained_energy(Y)))


@_case("ffn-tied-relu", "Y + ReLU(Y W_1 + b)(α W_1ᵀ)  (step of −½Σ‖ReLU(yW_1+b)‖²)",
       "nn.Linear → ReLU → nn.Linear with W_2 = α W_1ᵀ, plus residual")
def _tied_relu(g: torch.Generator) -> _Trial:
    B, n, d = _shapes(g)
    m = _randint(g, 2, 9)
    W_1, b = _randn(g, d, m), _randn(g, m)
    E, alpha = TiedReLUEnergy(W_1, b), _uniform(g, 0.05, 3.0)
    Y = _randn(g, B, n, d)
    Yp = E.step(Y, alpha)
    first, second = nn.Linear(d, m, dtype=DTYPE), nn.Linear(m, d, bias=False, dtype=DTYPE)
    net = nn.Sequential(first, nn.ReLU(), second)
    with torch.no_grad():
        first.weight.copy_(W_1.T)
        first.bias.copy_(b)
        second.weight.copy_(alpha * W_1)
    ref = (Y + net(Y)).detach()
    return _Trial(_err(Yp, Y - alpha * E.autograd_grad(Y)), _err(Yp, ref), _increased(E.energy(Yp), E.energy(Y)))


@_case("hopfield-update", "ξ⁺ = Xᵀ softmax(β X ξ)  (CCCP step of the modern Hopfield energy)",
       "nn.MultiheadAttention cross-attention (1 head, scale β, values = keys = X)")
def _hopfield(g: torch.Generator) -> _Trial:
    B, n, d = _shapes(g)
    N = _randint(g, 3, 11)
    X, xi = _randn(g, B, N, d), _randn(g, B, n, d)
    beta = _uniform(g, 0.2, 2.0)
    E = HopfieldEnergy(X, beta)
    xp = E.step(xi)
    eye = torch.eye(d, dtype=DTYPE)
    mha = _mha(d, 1, beta * math.sqrt(d) * eye, eye, eye, eye)  # cancel MHA's 1/√d: scale β
    ref = mha(xi, X, X, need_weights=False)[0]
    return _Trial(_err(xp, xi - E.autograd_grad(xi)), _err(xp, ref), _increased(E.energy(xp), E.energy(xi)))


@_case("energy-transformer-step", "x − α ∂E/∂g at g = LN(x)  (Energy Transformer, Hoover et al.)",
       "autograd ∂E/∂g only; descent measured at α = 1e-3 (no uniform guarantee)", guaranteed=False)
def _energy_transformer(g: torch.Generator) -> _Trial:
    B, n, d = _shapes(g)
    h, k, m = _randint(g, 1, 3), _randint(g, 1, 4), _randint(g, 2, 8)
    E = EnergyTransformerEnergy(0.5 * _randn(g, h, d, k), 0.5 * _randn(g, h, d, k), 0.5 * _randn(g, m, d),
                                ln_bias=0.1 * _randn(g, d))
    x, alpha = _randn(g, B, n, d), 1e-3
    # No uniform range is known (MATH §2.2), so the public step would warn: the update is taken from the pure core.
    G0 = core_related.et_normalize(x, E.ln_gamma, E.ln_bias, E.eps)
    xp = x - alpha * core_related.et_grad_g(G0, E.W_Q, E.W_K, E.xi, E.beta, E.exclude_diagonal)
    G = E.normalize(x).detach().requires_grad_(True)
    (dG,) = torch.autograd.grad(E.energy_g(G).sum(), G)
    return _Trial(_err(xp, x - alpha * dG), None, _increased(E.energy(xp), E.energy(x)))


@_case("layernorm-projection", "centre each token and rescale it to norm √d  (projection, MATH §1.4)",
       "nn.LayerNorm(elementwise_affine=False, eps=0)")
def _layernorm(g: torch.Generator) -> _Trial:
    B, n, d = _shapes(g)
    Y = _randn(g, B, n, d + 1)
    ln = nn.LayerNorm(d + 1, eps=0.0, elementwise_affine=False, dtype=DTYPE)
    return _Trial(None, _err(layernorm_projection(Y), ln(Y)), None)


@_case("reference-mha", "energy.reference.multi_head_attention (unconstrained weights, biases, causal)",
       "nn.MultiheadAttention and SDPA")
def _reference_mha(g: torch.Generator) -> _Trial:
    B, n, h, dh, d = _head_shapes(g)
    mha = nn.MultiheadAttention(d, h, batch_first=True, dtype=DTYPE).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(_randn(g, *p.shape))
    W_Q, W_K, W_V = (w.T for w in mha.in_proj_weight.detach().chunk(3))
    b_Q, b_K, b_V = mha.in_proj_bias.detach().chunk(3)
    X = _randn(g, B, n, d)
    ours = multi_head_attention(X, X, W_Q, W_K, W_V, mha.out_proj.weight.detach().T, num_heads=h,
                                b_Q=b_Q, b_K=b_K, b_V=b_V, b_O=mha.out_proj.bias.detach(), causal=True)
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    theirs = mha(X, X, X, attn_mask=causal, need_weights=False)[0].detach()
    plain = multi_head_attention(X, X, W_Q, W_K, W_V, num_heads=h, causal=True)
    split = lambda T: T.reshape(B, n, h, dh).transpose(1, 2)
    sdpa = F.scaled_dot_product_attention(split(X @ W_Q), split(X @ W_K), split(X @ W_V), is_causal=True)
    sdpa = sdpa.transpose(1, 2).reshape(B, n, d)
    return _Trial(None, max(_err(ours, theirs), _err(plain, sdpa)), None)


# ---------------------------------------------------------------------------------------------------- driver


def run(*, seed: int = 0, trials: int = 20, cases: list[str] | None = None) -> list[CaseResult]:
    """Run the suite (float64); one :class:`CaseResult` per case."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__} {seed!r}; pass e.g. seed=0.")
    if isinstance(trials, bool) or not isinstance(trials, int):
        raise TypeError(f"`trials` must be an int ≥ 1, got {type(trials).__name__} {trials!r}.")
    if trials < 1:
        raise ValueError(f"`trials` must be ≥ 1, got {trials}.")
    names = [c.name for c in CASES]
    unknown = sorted(set(cases or []) - set(names))
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; valid cases: {names}")
    results = []
    for i, case in enumerate(CASES):
        if cases and case.name not in cases:
            continue
        g = torch.Generator().manual_seed(seed * 1000 + i)
        outcomes = [case.run(g) for _ in range(trials)]
        ea = [t.err_autograd for t in outcomes if t.err_autograd is not None]
        er = [t.err_reference for t in outcomes if t.err_reference is not None]
        errs = ea + er
        results.append(CaseResult(
            case=case.name,
            reproduces=case.reproduces,
            reference=case.reference,
            max_abs_err=max(errs) if errs else None,
            err_autograd=max(ea) if ea else None,
            err_reference=max(er) if er else None,
            descent_violations=sum(bool(t.violated) for t in outcomes),
            guaranteed=case.guaranteed,
            trials=trials,
        ))
    return results


def format_table(results: list[CaseResult]) -> str:
    """A Markdown table of the results (as shown in the README)."""
    fmt = lambda v: "—" if v is None else f"{v:.1e}"
    lines = [
        "| case | reproduces | reference | closed vs autograd | closed vs reference | descent violations |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        viol = f"{r.descent_violations}/{r.trials}" + ("" if r.guaranteed else " (not guaranteed)")
        lines.append(f"| {r.case} | {r.reproduces} | {r.reference} | {fmt(r.err_autograd)} | "
                     f"{fmt(r.err_reference)} | {viol} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Command line ``python -m energy verify [--json] [--seed S] [--trials N] [--case NAME ...]``.

    Prints the table (or a JSON list) of :func:`run`; returns the exit status: 0 when every target is met
    (``max_abs_err ≤ 1e-10``, no descent violation where guaranteed), 1 otherwise, 2 for a usage error (one line on
    stderr; ``--debug`` shows the traceback of any error).
    """
    from energy._cli import Parser, UsageError, prog_name, run_command

    prog = prog or prog_name("python -m energy verify", "energy-verify")

    def body() -> int:
        parser = Parser(prog=prog, description=__doc__.split("\n\n")[0])
        parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
        parser.add_argument("--seed", type=int, default=0, help="seed of the random instances")
        parser.add_argument("--trials", type=int, default=20, help="random instances per case (at least 1)")
        parser.add_argument("--case", action="append", dest="cases", metavar="NAME",
                            help=f"run only this case (repeatable; one of {', '.join(c.name for c in CASES)})")
        args = parser.parse_args(argv)
        if args.trials < 1:
            raise UsageError(f"--trials must be at least 1, got {args.trials}; e.g. --trials 20")
        unknown = sorted(set(args.cases or []) - {c.name for c in CASES})
        if unknown:
            raise UsageError(f"--case {', '.join(unknown)}: unknown case; valid cases: "
                             f"{', '.join(c.name for c in CASES)}")
        results = run(seed=args.seed, trials=args.trials, cases=args.cases)
        if args.json:
            print(json.dumps([asdict(r) for r in results], indent=2))
        else:
            print(format_table(results))
        ok = all(r.max_abs_err is None or r.max_abs_err <= 1e-10 for r in results) and all(
            r.descent_violations == 0 for r in results if r.guaranteed
        )
        if not args.json:
            print("\nall targets met (max_abs_err ≤ 1e-10, 0 violations where guaranteed)" if ok
                  else "\nTARGETS MISSED: see the rows above")
        return 0 if ok else 1

    return run_command(prog, body, argv)

if __name__ == "__main__":
    sys.exit(main())
