"""Closed-form derivatives of LayerNorm, RMSNorm and the FFN (MATH §5.2) against torch.func, in float64."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import torch
from torch import Tensor

from energy._validation import EnergyInputError
from energy.core import ffn as core_ffn
from energy.hessian.ffn_curvature import (
    FFNLayer,
    autograd_ffn_ggn,
    autograd_ffn_hessian,
    ffn_derivatives,
    ffn_hessian,
)
from energy.hessian.norm_curvature import (
    NormLayer,
    autograd_norm_ggn,
    autograd_norm_hessian,
    norm_derivatives,
    norm_hessian,
)
from energy.hessian.tokenwise import TokenwiseDerivatives, TokenwiseLayer

DT = torch.float64
TOL = 1e-10

# (B, L, d) and (B, L, d, d_ff, d_out): odd widths, L = 1 and L = 5, batch > 1
NORM_SHAPES = [(2, 5, 7), (3, 1, 4)]
FFN_SHAPES = [(2, 5, 3, 7, 4), (3, 1, 5, 4, 2)]
SEEDS = [0, 1]


def assert_rel(actual: Tensor, expected: Tensor, what: str = "") -> None:
    """``max|a − e| ≤ TOL · max|e|`` (an exactly zero ``expected`` needs an exactly zero ``actual``)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= TOL * scale, f"{what}: max error {err:.3e}, scale {scale:.3e}"


def _make_norm(kind: str, affine: str, d: int, eps: float, g: torch.Generator) -> NormLayer:
    gamma = 1.0 + 0.5 * torch.randn(d, generator=g, dtype=DT) if affine in ("gamma", "both") else None
    beta = torch.randn(d, generator=g, dtype=DT) if affine == "both" else None
    return NormLayer(gamma, beta, eps, kind)  # type: ignore[arg-type]


def _make_ffn(activation: str, biases: str, shape: tuple[int, ...], g: torch.Generator) -> FFNLayer:
    _, _, d, d_ff, d_out = shape
    W_1 = torch.randn(d, d_ff, generator=g, dtype=DT)
    W_2 = torch.randn(d_ff, d_out, generator=g, dtype=DT)
    b_1 = torch.randn(d_ff, generator=g, dtype=DT) if biases in ("both", "b_1") else None
    b_2 = torch.randn(d_out, generator=g, dtype=DT) if biases in ("both", "b_2") else None
    return FFNLayer(W_1, b_1, W_2, b_2, activation)


def _token_fn(layer: TokenwiseLayer) -> Callable[[Mapping[str, Tensor], Tensor], Tensor]:
    """``(params, x) ↦ y`` for ONE token ``x`` ``(d,)`` through the layer's pure output map."""
    return lambda params, x: layer.output_with(params, x[None, None])[0, 0]


def _vmap_tokens(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    return torch.func.vmap(torch.func.vmap(fn))


def _check_against_autograd(layer: TokenwiseLayer, D: TokenwiseDerivatives, X3: Tensor, G: Tensor) -> None:
    """Every closed-form piece of ``D`` against ``torch.func`` (per token by ``vmap``, θθ on the token sum)."""
    B, L, _ = X3.shape
    params = layer.params()
    blocks = layer.param_blocks()
    f = _token_fn(layer)
    assert_rel(D.output, layer.output_with(params, X3), "output")
    assert_rel(D.J_x, _vmap_tokens(torch.func.jacrev(lambda x: f(params, x)))(X3), "J_x")
    assert list(D.J_params) == [n for n, _ in blocks]
    for name, _ in blocks:
        def f_name(t: Tensor, x: Tensor, name: str = name) -> Tensor:
            return f({**params, name: t}, x)
        J = _vmap_tokens(lambda x, name=name, f_name=f_name: torch.func.jacrev(f_name)(params[name], x))(X3)
        assert_rel(D.J_params[name], J.reshape(B, L, J.shape[2], -1), f"J_{name}")

    S = D.second(G)

    def inner(x: Tensor, g: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        return (f(p, x) * g).sum()

    assert_rel(S.xx, _vmap_tokens(torch.func.hessian(lambda x, g: inner(x, g, params)))(X3, G), "xx")
    assert list(S.x_params) == [n for n, _ in blocks]
    for name, _ in blocks:
        def grad_x(t: Tensor, x: Tensor, g: Tensor, name: str = name) -> Tensor:
            return torch.func.grad(lambda x_: inner(x_, g, {**params, name: t}))(x)
        M = _vmap_tokens(lambda x, g, grad_x=grad_x, name=name: torch.func.jacrev(grad_x)(params[name], x, g))(X3, G)
        assert_rel(S.x_params[name], M.reshape(B, L, M.shape[2], -1), f"x_{name}")

    if not blocks:
        assert S.params == {}
        return
    sizes = [int(torch.Size(s).numel()) for _, s in blocks]
    theta = torch.cat([params[n].reshape(-1) for n, _ in blocks])

    def total(t: Tensor) -> Tensor:
        p = {n: w.reshape(s) for (n, s), w in zip(blocks, t.split(sizes))}
        return (layer.output_with(p, X3) * G).sum()

    Hfull = torch.func.hessian(total)(theta)
    names = [n for n, _ in blocks]
    rows = dict(zip(names, Hfull.split(sizes, dim=0)))
    for i, a in enumerate(names):
        for b in names[i:]:
            ref = rows[a].split(sizes, dim=1)[names.index(b)]
            if (a, b) in S.params:
                assert_rel(S.params[(a, b)], ref, f"θθ {a},{b}")
                assert ref.abs().max() > 1e-3, f"θθ {a},{b} is listed but vanishes"
            else:  # documented as identically zero
                assert ref.abs().max().item() <= TOL * max(Hfull.abs().max().item(), 1.0), f"θθ {a},{b} ≠ 0"
    assert all(names.index(a) <= names.index(b) for a, b in S.params)


# -- activations -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_tanh", None])
def test_activation_derivatives_match_autograd(name: str | None) -> None:
    x = torch.cat([torch.linspace(-6.0, 6.0, 241, dtype=DT)[1::2], torch.randn(50, dtype=DT,
                   generator=torch.Generator().manual_seed(3))])
    phi = core_ffn.ACTIVATIONS[name]
    d1 = torch.func.vmap(torch.func.grad(phi))(x)
    d2 = torch.func.vmap(torch.func.grad(torch.func.grad(phi)))(x)
    c1, c2 = core_ffn.ACTIVATION_DERIVATIVES[name](x)
    assert_rel(c1, d1, "phi'")
    assert_rel(c2, d2, "phi''")
    if name in ("gelu", "gelu_tanh"):
        assert c2.abs().max() > 0.5  # φ'' is far from zero near the origin


def test_gelu_tanh_is_torch_tanh_gelu_and_differs_from_exact() -> None:
    x = torch.linspace(-5.0, 5.0, 101, dtype=DT)
    torch.testing.assert_close(core_ffn.gelu_tanh(x), torch.nn.GELU(approximate="tanh")(x), rtol=0, atol=0)
    assert (core_ffn.gelu_tanh(x) - torch.nn.functional.gelu(x)).abs().max() > 1e-4


# -- closed forms against torch.func ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("kind,affine", [("layer", "both"), ("layer", "gamma"), ("layer", "none"),
                                         ("rms", "gamma"), ("rms", "none")])
def test_norm_derivatives_match_autograd(kind: str, affine: str, eps: float, seed: int,
                                         shape: tuple[int, int, int]) -> None:
    g = torch.Generator().manual_seed(seed)
    B, L, d = shape
    norm = _make_norm(kind, affine, d, eps, g)
    X3 = 0.3 + torch.randn(B, L, d, generator=g, dtype=DT)
    G = torch.randn(B, L, d, generator=g, dtype=DT)
    D = norm_derivatives(norm, X3)
    _check_against_autograd(norm, D, X3, G)
    assert D.second(G).params == {}  # affine in (γ, b)


@pytest.mark.parametrize("shape", FFN_SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("biases", ["both", "none", "b_1", "b_2"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_ffn_derivatives_match_autograd(activation: str, biases: str, seed: int,
                                        shape: tuple[int, int, int, int, int]) -> None:
    g = torch.Generator().manual_seed(seed)
    ffn = _make_ffn(activation, biases, shape, g)
    B, L, d, _, d_out = shape
    X3 = torch.randn(B, L, d, generator=g, dtype=DT) / d**0.5  # pre-activations O(1): φ'' matters for GELU
    G = torch.randn(B, L, d_out, generator=g, dtype=DT)
    D = ffn_derivatives(ffn, X3)
    _check_against_autograd(ffn, D, X3, G)
    S = D.second(G)
    expected = {("W_1", "W_2")} | ({("b_1", "W_2")} if ffn.b_1 is not None else set())
    if activation != "relu":
        expected |= {("W_1", "W_1")} | ({("W_1", "b_1"), ("b_1", "b_1")} if ffn.b_1 is not None else set())
        assert S.xx.abs().max() > 1e-2  # the φ''-term is exercised, not negligible
    else:
        assert S.xx.abs().max() == 0  # ReLU: φ'' = 0
    assert set(S.params) == expected


# -- standalone parameter Hessians against the twins -------------------------------------------------------------

@pytest.mark.parametrize("reduction,c", [("sum", None), ("mean", None), ("sum", 0.7)])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_ffn_hessian_parts_match_twins(activation: str, reduction: str, c: float | None) -> None:
    g = torch.Generator().manual_seed(5)
    ffn = _make_ffn(activation, "both", FFN_SHAPES[0], g)
    B, L, d, _, d_out = FFN_SHAPES[0]
    X = torch.randn(B, L, d, generator=g, dtype=DT) / d**0.5
    Y = torch.randn(B, L, d_out, generator=g, dtype=DT)
    kw = {"c": c, "reduction": reduction}
    H, H_o = autograd_ffn_hessian(ffn, X, Y, **kw), autograd_ffn_ggn(ffn, X, Y, **kw)  # type: ignore[arg-type]
    assert_rel(ffn_hessian(ffn, X, Y, **kw), H, "H")  # type: ignore[arg-type]
    assert_rel(ffn_hessian(ffn, X, Y, "H_o", **kw), H_o, "H_o")  # type: ignore[arg-type]
    assert_rel(ffn_hessian(ffn, X, Y, "H_f", **kw), H - H_o, "H_f")  # type: ignore[arg-type]
    assert (H - H_o).abs().max() > 1e-3


@pytest.mark.parametrize("kind,affine", [("layer", "both"), ("layer", "gamma"), ("rms", "gamma")])
def test_norm_hessian_parts_match_twins(kind: str, affine: str) -> None:
    g = torch.Generator().manual_seed(6)
    B, L, d = NORM_SHAPES[0]
    norm = _make_norm(kind, affine, d, 1e-5, g)
    X = torch.randn(B, L, d, generator=g, dtype=DT)
    Y = torch.randn(B, L, d, generator=g, dtype=DT)
    H, H_o = autograd_norm_hessian(norm, X, Y, reduction="mean"), autograd_norm_ggn(norm, X, Y, reduction="mean")
    assert_rel(norm_hessian(norm, X, Y, reduction="mean"), H, "H")
    assert_rel(norm_hessian(norm, X, Y, "H_o", reduction="mean"), H_o, "H_o")
    assert norm_hessian(norm, X, Y, "H_f").abs().max() == 0  # affine in (γ, b)


def test_unbatched_input_equals_batch_of_one() -> None:
    g = torch.Generator().manual_seed(7)
    ffn = _make_ffn("gelu_tanh", "b_1", (1, 4, 3, 5, 2), g)
    X, Y = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 2, generator=g, dtype=DT)
    assert_rel(ffn_hessian(ffn, X, Y), ffn_hessian(ffn, X[None], Y[None]), "2-D vs 3-D")
    assert_rel(ffn_hessian(ffn, X, Y), autograd_ffn_hessian(ffn, X, Y), "2-D twin")


# -- outputs equal torch.nn ------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_norm_outputs_equal_torch_nn(eps: float) -> None:
    g = torch.Generator().manual_seed(8)
    d = 6
    X3 = torch.randn(2, 5, d, generator=g, dtype=DT)
    ln = torch.nn.LayerNorm(d, eps=eps, dtype=DT)
    rms = torch.nn.RMSNorm(d, eps=eps, dtype=DT)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(d, generator=g, dtype=DT))
        ln.bias.copy_(torch.randn(d, generator=g, dtype=DT))
        rms.weight.copy_(torch.randn(d, generator=g, dtype=DT))
        D_ln = norm_derivatives(NormLayer(ln.weight, ln.bias, eps, "layer"), X3)
        D_rms = norm_derivatives(NormLayer(rms.weight, None, eps, "rms"), X3)
        assert_rel(D_ln.output, ln(X3), "LayerNorm")
        assert_rel(D_rms.output, rms(X3), "RMSNorm")


@pytest.mark.parametrize("activation,module", [("relu", torch.nn.ReLU()), ("gelu", torch.nn.GELU()),
                                               ("gelu_tanh", torch.nn.GELU(approximate="tanh"))])
def test_ffn_output_equals_sequential(activation: str, module: torch.nn.Module) -> None:
    torch.manual_seed(9)
    d, d_ff, d_out = 3, 7, 4
    lin1, lin2 = torch.nn.Linear(d, d_ff, dtype=DT), torch.nn.Linear(d_ff, d_out, dtype=DT)
    seq = torch.nn.Sequential(lin1, module, lin2)
    X3 = torch.randn(2, 5, d, dtype=DT)
    with torch.no_grad():
        ffn = FFNLayer(lin1.weight.T, lin1.bias, lin2.weight.T, lin2.bias, activation)
        assert_rel(ffn_derivatives(ffn, X3).output, seq(X3), activation)


# -- purity -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["norm", "ffn"])
def test_second_is_pure_under_vmap(which: str) -> None:
    g = torch.Generator().manual_seed(10)
    layer: TokenwiseLayer
    if which == "norm":
        layer = _make_norm("layer", "both", 5, 1e-5, g)
        X3, d_out = torch.randn(2, 3, 5, generator=g, dtype=DT), 5
        D = norm_derivatives(layer, X3)  # type: ignore[arg-type]
    else:
        layer = _make_ffn("gelu", "both", (2, 3, 4, 6, 3), g)
        X3, d_out = torch.randn(2, 3, 4, generator=g, dtype=DT), 3
        D = ffn_derivatives(layer, X3)  # type: ignore[arg-type]
    Gs = torch.randn(4, 2, 3, d_out, generator=g, dtype=DT)
    def second(G: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[tuple[str, str], Tensor]]:
        S = D.second(G)
        return S.xx, S.x_params, S.params

    xx, x_params, params = torch.func.vmap(second)(Gs)
    for k, G in enumerate(Gs):
        S = D.second(G)
        assert_rel(xx[k], S.xx, "xx")
        assert set(x_params) == set(S.x_params) and set(params) == set(S.params)
        for name, M in S.x_params.items():
            assert_rel(x_params[name][k], M, name)
        for pair, M in S.params.items():
            assert_rel(params[pair][k], M, str(pair))


def test_param_blocks_order_and_shapes() -> None:
    g = torch.Generator().manual_seed(11)
    ffn = _make_ffn("relu", "both", (1, 1, 3, 5, 2), g)
    assert ffn.param_blocks() == (("W_1", (3, 5)), ("b_1", (5,)), ("W_2", (5, 2)), ("b_2", (2,)))
    assert _make_norm("layer", "both", 4, 0.0, g).param_blocks() == (("gamma", (4,)), ("beta", (4,)))
    assert _make_norm("rms", "none", 4, 0.0, g).param_blocks() == ()


# -- bad inputs ---------------------------------------------------------------------------------------------------

def _w(*shape: int) -> Tensor:
    return torch.ones(*shape, dtype=DT)


@pytest.mark.parametrize("build,match", [
    (lambda: NormLayer(_w(3), None, 1e-5, "batch"), r"`kind`.*'layer', 'rms'"),  # type: ignore[arg-type]
    (lambda: NormLayer(_w(3), _w(3), 1e-5, "rms"), r"`beta` must be None"),
    (lambda: NormLayer(_w(3, 1), None, 1e-5, "layer"), r"`gamma`"),
    (lambda: NormLayer(_w(3), _w(4), 1e-5, "layer"), r"`beta` must have `gamma`'s shape"),
    (lambda: NormLayer(_w(3), None, -1.0, "layer"), r"`eps`"),
    (lambda: NormLayer(_w(3), _w(3).float(), 1e-5, "layer"), r"mixed dtypes"),
    (lambda: FFNLayer(_w(3, 4), None, _w(4, 2), None, "tanh"), r"`activation`.*'relu', 'gelu', 'gelu_tanh'"),
    (lambda: FFNLayer(_w(3, 4), None, _w(5, 2), None, "relu"), r"`W_2` must have shape \(d_ff, d_out\)"),
    (lambda: FFNLayer(_w(3, 4), _w(5), _w(4, 2), None, "relu"), r"`b_1`"),
    (lambda: FFNLayer(_w(3, 4), None, _w(4, 2), _w(3), "relu"), r"`b_2`"),
    (lambda: FFNLayer(_w(3), None, _w(4, 2), None, "relu"), r"`W_1`"),
])
def test_bad_layers_are_rejected(build: Callable[[], object], match: str) -> None:
    with pytest.raises(EnergyInputError, match=match):
        build()


def test_bad_hessian_inputs_are_rejected() -> None:
    ffn = FFNLayer(_w(3, 4), _w(4), _w(4, 2), _w(2), "gelu")
    X, Y = _w(2, 5, 3), _w(2, 5, 2)
    with pytest.raises(EnergyInputError, match=r"`part`"):
        ffn_hessian(ffn, X, Y, "GGN")
    with pytest.raises(EnergyInputError, match=r"`X` must have width d = 3"):
        ffn_hessian(ffn, _w(2, 5, 4), Y)
    with pytest.raises(EnergyInputError, match=r"`X` must have shape \(L, d\) or \(B, L, d\)"):
        ffn_hessian(ffn, _w(3), Y)
    with pytest.raises(EnergyInputError, match=r"`Y`.*\(2, 5, 2\)"):
        ffn_hessian(ffn, X, _w(2, 5, 3))
    with pytest.raises(EnergyInputError, match=r"`X` .* and `W_1`"):
        ffn_hessian(ffn, X.float(), Y.float())
    with pytest.raises(EnergyInputError, match=r"`X` contains NaN"):
        ffn_hessian(ffn, torch.full_like(X, float("nan")), Y)
    with pytest.raises(EnergyInputError, match=r"`reduction`"):
        norm_hessian(NormLayer(_w(3), None, 1e-5, "layer"), X, _w(2, 5, 3), reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(EnergyInputError, match=r"`X` must have width d = 3 \(the width of `gamma`\)"):
        norm_hessian(NormLayer(_w(3), None, 1e-5, "layer"), _w(2, 5, 4), _w(2, 5, 4))
