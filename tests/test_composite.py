"""CompositeEnergy (MATH §1.6): value = sum of terms, per-term values, gradient = sum of closed forms, no step."""

from __future__ import annotations

import pytest
import torch
from _helpers import DT

from energy._validation import EnergyInputError
from energy.attention import AttentionEnergy, MultiHeadAttentionEnergy
from energy.composite import CompositeEnergy
from energy.ffn import FFNEnergy
from energy.kernels import CauchyKernel


def _composite(gen: torch.Generator, d: int = 4) -> CompositeEnergy:
    A = torch.randn(d, d, generator=gen, dtype=DT)
    W_f = 0.3 * (A @ A.T) / d  # symmetric PSD FFN weight with a small spectrum
    return CompositeEnergy({
        "att": AttentionEnergy(torch.randn(d, d + 1, generator=gen, dtype=DT)),
        "heads": MultiHeadAttentionEnergy(torch.randn(2, d, 3, generator=gen, dtype=DT), kernel=CauchyKernel()),
        "ffn": FFNEnergy(W_f, torch.randn(d, generator=gen, dtype=DT)),
    })


def test_energy_terms_and_grad(gen: torch.Generator) -> None:
    E = _composite(gen)
    Y = torch.randn(3, 7, 4, generator=gen, dtype=DT)
    terms = E.terms(Y)
    assert list(terms) == ["att", "heads", "ffn"] == E.names
    for name, value in terms.items():
        torch.testing.assert_close(value, E[name].energy(Y), atol=0, rtol=0)
        assert value.shape == (3,)
    torch.testing.assert_close(E.energy(Y), terms["att"] + terms["heads"] + terms["ffn"], atol=1e-12, rtol=0)
    torch.testing.assert_close(E.grad(Y), E.autograd_grad(Y), atol=1e-10, rtol=1e-10)


def test_step_is_not_defined(gen: torch.Generator) -> None:
    E = _composite(gen)
    Y = torch.randn(7, 4, generator=gen, dtype=DT)
    with pytest.raises(NotImplementedError, match="alternat"):
        E.step(Y, 1.0)
    with pytest.raises(NotImplementedError, match="MATH §1.6"):
        E.step_range()
    E["att"].step(Y, 1.0)  # the terms keep their own steps


def test_terms_are_registered_submodules(gen: torch.Generator) -> None:
    E = _composite(gen)
    assert {n for n, _ in E.named_buffers()} >= {"components.att.M", "components.heads.M"}
    with pytest.raises(KeyError, match="no term"):
        E["missing"]


@pytest.mark.parametrize(
    "terms, match",
    [
        ({}, "non-empty"),
        ([("att", None)], "mapping"),
        ({"att": "not an energy"}, "Energy"),
        ({"a.b": AttentionEnergy(torch.eye(2))}, "keys"),
        ({"": AttentionEnergy(torch.eye(2))}, "keys"),
    ],
)
def test_bad_terms_are_rejected(terms, match: str) -> None:
    with pytest.raises(EnergyInputError, match=match):
        CompositeEnergy(terms)
