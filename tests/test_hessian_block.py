"""The whole-block closed-form Hessian (MATH §5.3) against its autograd twins, at odd shapes, float64."""

from __future__ import annotations

import pytest
import torch

from energy._validation import EnergyInputError
from energy.hessian.block import (
    TransformerBlock,
    autograd_block_ggn,
    autograd_block_hessian,
    autograd_block_token_hessian,
    block_hessian,
    block_hessian_parts,
    block_loss,
    block_token_hessian,
    random_block,
)

DT = torch.float64
TOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _problem(seed: int, *, n_heads: int = 2, L: int = 5, B: int = 2, norm: str = "pre", loss: str = "mse",
             kv_heads: int | None = None, activation: str = "gelu", norm_kind: str = "layer", causal: bool = True,
             d: int = 4, d_head: int = 3, d_ff: int = 5, vocab: int | None = 3):
    g = torch.Generator().manual_seed(seed)
    block = random_block(d, n_heads, d_head, d_ff, kv_heads=kv_heads, norm=norm, norm_kind=norm_kind,  # type: ignore[arg-type]
                         activation=activation, vocab=vocab, loss=loss, causal=causal, generator=g)  # type: ignore[arg-type]
    X = torch.randn(B, L, d, generator=g, dtype=DT)
    if loss == "ce":
        assert vocab is not None
        target = torch.randint(0, vocab, (B, L), generator=g)
    else:
        target = torch.randn(B, L, block.d_z, generator=g, dtype=DT)
    return block, X, target


CASES = [
    dict(norm="pre", loss="mse"),
    dict(norm="pre", loss="ce", n_heads=3),
    dict(norm="post", loss="mse", n_heads=3, activation="relu"),
    dict(norm="post", loss="ce", activation="gelu_tanh"),
    dict(norm="none", loss="mse", vocab=None),
    dict(norm="pre", loss="mse", L=1, n_heads=1),
    dict(norm="pre", loss="ce", n_heads=4, kv_heads=2),
    dict(norm="pre", loss="mse", norm_kind="rms", causal=False),
    dict(norm="post", loss="mse", L=1, B=3, n_heads=2, vocab=None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1])
def test_block_hessian_parts_match_autograd(case: dict, seed: int) -> None:
    block, X, target = _problem(seed, **case)
    H = autograd_block_hessian(block, X, target)
    G = autograd_block_ggn(block, X, target)
    closed = {part: block_hessian(block, X, target, part=part).matrix for part in ("H", "H_o", "H_f")}
    assert _rel(closed["H"], H) <= TOL
    assert _rel(closed["H_o"], G) <= TOL
    assert _rel(closed["H_f"], H - G) <= 1e-9 * float(H.abs().max() / (H - G).abs().max())
    assert _rel(closed["H_o"] + closed["H_f"], closed["H"]) <= 1e-13


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_block_token_hessian_matches_autograd(case: dict) -> None:
    block, X, target = _problem(3, **case)
    assert _rel(block_token_hessian(block, X, target), autograd_block_token_hessian(block, X, target)) <= TOL


def test_block_hessian_index_and_symmetry() -> None:
    block, X, target = _problem(5, n_heads=3)
    H = block_hessian(block, X, target)
    assert H.matrix.shape == (block.num_params, block.num_params)
    assert _rel(H.matrix, H.matrix.T) <= 1e-13
    names = [n for n, _ in block.param_blocks()]
    assert names[0].startswith("attn.") and names[-1] == "W_U"
    assert H.block("attn.h0.Q", "ffn.W_1").shape == (4 * 3, 4 * 5)
    with pytest.raises(EnergyInputError, match="unknown parameter block"):
        H.block("attn.h9.Q", "ffn.W_1")


def test_block_loss_is_the_forward_of_the_twin() -> None:
    block, X, target = _problem(7, loss="ce")
    z = block.logits(X, torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 5, 5))
    expected = torch.nn.functional.cross_entropy(z.reshape(-1, 3), target.reshape(-1), reduction="sum") / 5
    assert torch.allclose(block_loss(block, X, target), expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(norm="side"), "`norm` must be one of"),
        (dict(loss="hinge"), "`loss` must be one of"),
        (dict(reduction="avg"), "`reduction`"),
        (dict(c=-1.0), "`c` must be a positive"),
        (dict(loss="ce", W_U=None), "needs an unembedding"),
    ],
)
def test_bad_blocks_are_named(kwargs: dict, match: str) -> None:
    block, _, _ = _problem(0)
    fields = {f: getattr(block, f) for f in block.__dataclass_fields__}
    fields.update(kwargs)
    with pytest.raises(EnergyInputError, match=match):
        TransformerBlock(**fields)


def test_bad_targets_are_named() -> None:
    block, X, _ = _problem(0, loss="ce")
    with pytest.raises(EnergyInputError, match="class indices must lie in"):
        block_hessian(block, X, torch.full((2, 5), 7))
    with pytest.raises(EnergyInputError, match="integer tensor"):
        block_hessian(block, X, torch.zeros(2, 5, dtype=DT))
    with pytest.raises(EnergyInputError, match="`part`"):
        block_hessian(block, X, torch.zeros(2, 5, dtype=torch.long), part="G")  # type: ignore[arg-type]


def test_chunked_symmetric_products_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """The column-chunked symmetric products (used for wide Jacobians) give the same Hessian."""
    import energy.hessian.block_sweep as sweep_module

    block, X, target = _problem(11, n_heads=3, loss="ce")
    H = autograd_block_hessian(block, X, target)
    monkeypatch.setattr(sweep_module, "_CHUNK", 7)
    assert _rel(block_hessian(block, X, target).matrix, H) <= TOL
    assert _rel(block_token_hessian(block, X, target), autograd_block_token_hessian(block, X, target)) <= TOL


def test_parts_from_one_sweep() -> None:
    block, X, target = _problem(13, norm="post", loss="ce")
    parts = block_hessian_parts(block, X, target)
    for part in ("H", "H_o", "H_f"):
        assert _rel(parts[part].matrix, block_hessian(block, X, target, part=part).matrix) <= 1e-13  # type: ignore[arg-type]


class _BlockModule(torch.nn.Module):
    """The block as an ``nn.Module`` of its flat parameter vector (for the matrix-free operators)."""

    def __init__(self, block: TransformerBlock, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.block, self.mask = block, mask
        self.theta = torch.nn.Parameter(block.flat().detach().clone())

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.block.with_flat(self.theta).logits(X, self.mask)


@pytest.mark.parametrize("case", [dict(norm="pre", loss="ce", n_heads=3), dict(norm="post", loss="mse")],
                         ids=["pre-ce", "post-mse"])
def test_matrix_free_operators_agree_with_the_closed_form(case: dict) -> None:
    """HessianOperator / GGNOperator / FunctionalOperator on the same block equal H, H_o, H_f (MATH §3.7, §5.3)."""
    from energy.hessian import FunctionalOperator, GGNOperator, HessianOperator

    block, X, target = _problem(17, **case)
    X3, T, mask = block.check_inputs(X, target)
    c = block.loss_constant(X3)
    module = _BlockModule(block, mask)
    data = [(X3, T)]
    closed = block_hessian_parts(block, X, target)
    for op, part in ((HessianOperator, "H"), (GGNOperator, "H_o"), (FunctionalOperator, "H_f")):
        dense = op(module, lambda z, y: block.loss_of_logits(z, y, c), None, data, reduction="sum").dense()
        assert _rel(dense, closed[part].matrix) <= TOL, part
