"""Kernels ρ of the attention energy (MATH §1.1): derivatives, concavity, monotonicity, Γ ⪰ 0, bad parameters."""

from __future__ import annotations

import pytest
import torch

from energy._validation import EnergyInputError
from energy.kernels import CauchyKernel, GaussianKernel, Kernel, PowerKernel

KERNELS = [GaussianKernel(), PowerKernel(1.0, 0.1), PowerKernel(0.5, 0.3), PowerKernel(2.0, 1.0), CauchyKernel()]
IDS = [repr(k) for k in KERNELS]


def _z() -> torch.Tensor:
    return torch.linspace(0.0, 12.0, 61, dtype=torch.float64)


@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_derivatives_match_autograd(kernel: Kernel) -> None:
    z = _z().requires_grad_(True)
    (d1,) = torch.autograd.grad(kernel.rho(z).sum(), z, create_graph=True)
    (d2,) = torch.autograd.grad(kernel.drho(z).sum(), z)
    torch.testing.assert_close(d1, kernel.drho(z), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(d2, kernel.d2rho(z), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_concave_non_decreasing_with_positive_self_weight(kernel: Kernel) -> None:
    z = _z()
    assert bool((kernel.drho(z) >= 0).all())
    assert bool((kernel.d2rho(z) <= 0).all())
    assert float(kernel.drho(torch.zeros((), dtype=torch.float64))) > 0  # γ_ii = ρ'(0) > 0, so D ≻ 0


@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_gram_of_weights_is_psd_when_claimed(kernel: Kernel, gen: torch.Generator) -> None:
    """``psd_gram`` (Schoenberg: ρ' completely monotone) ⇒ Γ = [ρ'(½‖x_i − x_j‖²)] ⪰ 0 on random clouds."""
    assert kernel.psd_gram
    for n, dim, spread in [(9, 2, 0.3), (12, 5, 1.0), (15, 3, 3.0)]:
        X = spread * torch.randn(n, dim, generator=gen, dtype=torch.float64)
        z = 0.5 * torch.cdist(X, X) ** 2
        lam = torch.linalg.eigvalsh(kernel.drho(z))
        assert float(lam.min()) >= -1e-10 * float(lam.abs().max())


def test_gaussian_weights_are_exp_of_minus_z() -> None:
    z = _z()
    torch.testing.assert_close(GaussianKernel().drho(z), torch.exp(-z))
    torch.testing.assert_close(GaussianKernel().rho(z), -torch.exp(-z))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p": 0.0}, "`p`"),
        ({"p": 2.5}, "`p`"),
        ({"p": float("nan")}, "`p`"),
        ({"p": "1"}, "`p`"),
        ({"p": 1.0, "eps": 0.0}, "`eps`"),
        ({"p": 1.0, "eps": -1.0}, "`eps`"),
        ({"p": 1.0, "eps": float("inf")}, "`eps`"),
    ],
)
def test_power_kernel_rejects_bad_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(EnergyInputError, match=match):
        PowerKernel(**kwargs)


def test_user_kernel_defaults_to_no_psd_claim() -> None:
    assert Kernel.psd_gram is False
