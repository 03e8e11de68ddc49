"""Device propagation (issue #12 item 5): public functions create their tensors on the device of their inputs.

* ``meta``, runs everywhere: PyTorch's ``meta`` device computes shapes and dtypes without values. A function fed
  only meta tensors that creates a tensor without ``device=`` (an implicit CPU tensor) then mixes devices and raises,
  so a clean run with a meta result proves device propagation without a GPU. :data:`META_CASES` and the tests after
  it cover the energies (value, gradient, step), the fused step, the reference functions, the energy curvature, the
  single-head, multi-head, input-side, energy-layer, token-wise and per-head closed forms, the block Hessian and its
  twins, the converters, every unrolled step kind, ``yang2022`` and the GPT-2 decoder. Not run on meta as they read
  values: ``FFNEnergy`` (its step range; it says so), exact norms and traces (floats), the curvature operators (a
  first-batch loss check), the estimators and Krylov routines, ``to_energy`` (constraint checks).
* ``cuda`` (marker ``cuda``, skipped without a GPU; ``pytest -m cuda tests/test_devices.py``): each case of
  :data:`CUDA_CASES` runs on the CPU and on ``cuda`` in float64 from the same seeded inputs (drawn on the CPU, moved),
  and the results agree to ``1e-10`` (``max|gpu − cpu| / max|cpu|`` per tensor; the numbers of a result jointly):
  the energies, every unrolled step kind, ``yang2022``, the attention, multi-head, block, per-head and token-wise
  closed forms, the operators (``H``, ``GGN``, ``H_f``, ``J``, ``Jᵀ``, blocks, token space, a Hugging Face GPT-2 and
  its ``BlockCurvature``) and each estimator (Hutchinson, Hutch++, Lanczos, SLQ) on an operator and a dense matrix
  (probes drawn on the CPU from a CPU generator, so both runs see the same probes).
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import pytest
import torch
from _helpers import DT
from torch import Tensor, nn

from energy import AttentionEnergy, MultiHeadAttentionEnergy, TiedReLUEnergy
from energy import reference as ref
from energy._validation import EnergyInputError
from energy.composite import CompositeEnergy
from energy.core import ffn as core_ffn
from energy.core import related as core_related
from energy.core import standard as core_standard
from energy.energy_transformer import EnergyTransformerEnergy
from energy.ffn import FFNEnergy
from energy.fused import attention_step_fused, attention_step_fused_and_energy
from energy.hessian import attention as att
from energy.hessian import block as blk
from energy.hessian import estimators as est
from energy.hessian import hf
from energy.hessian import multihead_structure as mhs
from energy.hessian.attention_input import head_input_hessian, head_input_jacobian, head_input_param_hessian
from energy.hessian.blocks import qk_chain_matrix
from energy.hessian.curvature_operators import FunctionalOperator, GGNOperator, HessianOperator, JacobianOperator
from energy.hessian.energy_curvature import attention_energy_hessian, majoriser_matrix, majoriser_step
from energy.hessian.energy_layer import energy_layer_hessian, energy_layer_jacobian, energy_layer_output
from energy.hessian.ffn_curvature import FFNLayer, ffn_hessian
from energy.hessian.head_norms import head_block_norms, head_inner_products, head_output
from energy.hessian.hf_blocks import BlockCurvature
from energy.hessian.hf_bridge import gpt2_block_parameter_map
from energy.hessian.krylov import lanczos, slq_density
from energy.hessian.linear_operator import LinearOperator
from energy.hessian.multihead import MultiHeadAttentionLayer, multihead_hessian, multihead_hessian_block
from energy.hessian.norm_curvature import NormLayer, norm_hessian
from energy.hessian.structure import block_diagonals, block_traces, hessian_frobenius_norms
from energy.hessian.token_operator import TokenHessianOperator
from energy.hessian.tokenwise import autograd_tokenwise_hessian
from energy.hopfield import HopfieldEnergy
from energy.normalization import LayerNormProjection, RMSNormProjection
from unfold.constraint_cost import with_positions
from unfold.converters import key_bias_mask, skip_map, standard_step
from unfold.layer_diagnosis import probe_input
from unfold.layer_weights import AttentionWeights, to_mha
from unfold.presets import yang2022
from unfold.standard import GPT2Config, GPT2Decoder
from unfold.unroller import unroll

META = torch.device("meta")
TOL = 1e-10
STEP_KINDS = ("attention", "energy_transformer", "ffn", "hopfield", "layernorm", "relu", "rmsnorm", "tied_ffn")


def _meta(*shape: int) -> Tensor:
    return torch.empty(*shape, dtype=DT, device=META)


def _is_meta(out: Any) -> None:
    tensors = [out] if isinstance(out, Tensor) else list(out.values()) if isinstance(out, Mapping) else list(out)
    assert tensors and all(isinstance(t, Tensor) and t.device.type == "meta" for t in tensors)


def _to(obj: Any, device: torch.device | str) -> Any:
    """A (nested, frozen) dataclass of tensors with every tensor moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to(getattr(obj, f.name), device) for f in dataclasses.fields(obj)
                                           if f.init})
    return obj


# ----------------------------------------------------------------------------------------------------------------
# meta: no implicit CPU tensors
# ----------------------------------------------------------------------------------------------------------------

B, N, D, K = 2, 5, 3, 4  # n != d, d_K != d


def _attention_energy() -> AttentionEnergy:
    return AttentionEnergy(_meta(D, K))


def _moments(causal: bool = False) -> Any:
    return att.attention_moments(_meta(B, N, D), _meta(D, K), _meta(D, K), _meta(D, D + 1), _meta(B, N, D + 1),
                             causal=causal)  # d_V != d


def _mh_layer() -> MultiHeadAttentionLayer:
    """Grouped-query (4 query heads, 2 K/V heads), causal, ``d = 6``, ``d_out = 5``."""
    return MultiHeadAttentionLayer(_meta(4, 6, 2), _meta(2, 6, 2), _meta(2, 6, 3), _meta(4, 3, 5), causal=True)


def _head() -> att.AttentionLayer:
    return att.AttentionLayer(_meta(D, K), _meta(D, K), _meta(D, D + 1))


def _block(norm: str = "pre") -> blk.TransformerBlock:
    return _to(blk.random_block(D, 2, 2, 5, kv_heads=1, norm=norm), META)  # type: ignore[arg-type]


def _et() -> EnergyTransformerEnergy:
    return EnergyTransformerEnergy(_meta(2, D, K), _meta(2, D, K), _meta(6, D), ln_bias=_meta(D))


def _value_grad_step(E: Any, Y: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    return E.energy(Y), E.grad(Y), E.step(Y, alpha)


class _Diag(LinearOperator):
    """``diag(w)`` as a matrix-free operator, on the device of ``w``."""

    def __init__(self, w: Tensor) -> None:
        super().__init__((w.shape[0], w.shape[0]), w.dtype, w.device)
        self.w = w

    def _matmat(self, V: Tensor) -> Tensor:
        return self.w[:, None] * V


META_CASES: dict[str, Callable[[Tensor], Any]] = {
    # energies: value, gradient, step
    "attention": lambda Y: _value_grad_step(_attention_energy(), Y, 0.5),
    "attention.step_masked": lambda Y: _attention_energy().step(Y, 0.5, token_mask=torch.ones(B, N, dtype=torch.bool,
                                                                                              device=META)),
    "multihead": lambda Y: _value_grad_step(MultiHeadAttentionEnergy(_meta(2, D, K)), Y, 0.5),
    "tied_relu": lambda Y: _value_grad_step(TiedReLUEnergy(_meta(D, 6)), Y, 0.5),
    "core.ffn_energy": lambda Y: core_ffn.ffn_energy(Y, _meta(D, D), _meta(D)),
    "core.ffn_step": lambda Y: core_ffn.descent_step(Y, core_ffn.ffn_grad(Y, _meta(D, D), _meta(D)), 0.5),
    "layernorm": lambda Y: LayerNormProjection()(Y),
    "layernorm.indicator": lambda Y: LayerNormProjection().indicator(Y),
    "rmsnorm": lambda Y: RMSNormProjection()(Y),
    "hopfield": lambda Y: _value_grad_step(HopfieldEnergy(_meta(7, D), beta=0.8), Y, 0.5),
    "energy_transformer": lambda Y: _value_grad_step(_et(), Y, 0.05),
    "composite.grad": lambda Y: CompositeEnergy({"a": _attention_energy(), "r": TiedReLUEnergy(_meta(D, 6))}).grad(Y),
    "core.et_normalize": lambda Y: core_related.et_normalize(Y, 1.0, None, 1e-5),
    "core.et_scores": lambda Y: core_related.et_scores(Y, _meta(2, D, K), _meta(2, D, K), 0.5, True),
    "fused.one_head": lambda Y: attention_step_fused(Y, _meta(D, K), 0.3),
    "fused.one_head_masked": lambda Y: attention_step_fused(Y, _meta(D, K), 0.3, token_mask=torch.ones(
        B, N, dtype=torch.bool, device=META)),
    "fused.heads": lambda Y: attention_step_fused(Y, _meta(2, D, K), 0.3),
    "fused.heads_token": lambda Y: attention_step_fused(Y, _meta(2, D, K), 0.3, preconditioner="token"),
    "fused.and_energy": lambda Y: attention_step_fused_and_energy(Y, _meta(2, D, K), 0.3),
    "reference.attention": lambda Y: [
        ref.single_head_attention(Y, _meta(D, K), _meta(D, K), _meta(D, D + 1)),
        ref.multi_head_attention(Y, Y, _meta(D, 4), _meta(D, 4), _meta(D, 4), _meta(4, D), num_heads=2, causal=True),
        ref.linear_attention(Y, Y, _meta(D, 4), _meta(D, 4), _meta(D, 4), num_heads=2, causal=True)],
    "reference.ffn_norms": lambda Y: [ref.feed_forward(Y, _meta(D, 7), _meta(7), _meta(7, D), _meta(D)),
                                      ref.layer_norm(Y), ref.rms_norm(Y), ref.causal_mask(3, 4, device=META)],
    "core.causal_mask": lambda Y: core_standard.causal_mask(3, 4, device=META),
    "core.multi_head_attention": lambda Y: core_standard.multi_head_attention(
        Y, Y, _meta(D, 4), _meta(D, 4), _meta(D, 4), _meta(4, D), num_heads=2, causal=True),
    # energy curvature
    "energy_curvature.attention": lambda Y: attention_energy_hessian(_attention_energy(), Y[0]),
    "majoriser.matrix": lambda Y: majoriser_matrix(_attention_energy(), Y[0]),
    "majoriser.step": lambda Y: majoriser_step(_attention_energy(), Y[0], Y[1], 0.5),
    "energy_layer.output": lambda Y: energy_layer_output(Y, _meta(D, K)),
    "energy_layer.jacobian": lambda Y: energy_layer_jacobian(Y, _meta(D, K)),
    "energy_layer.hessian": lambda Y: energy_layer_hessian(Y, _meta(D, K), _meta(B, N, D)),
    "energy_layer.hessian_tied": lambda Y: energy_layer_hessian(Y, _meta(D, D), _meta(B, N, D), tied=True),
    # one attention layer
    "attention_hessian": lambda Y: att.attention_hessian(_moments()),
    "attention_hessian.causal": lambda Y: att.attention_hessian(_moments(causal=True), "H_f"),
    "attention_jacobians": lambda Y: att.attention_jacobians(_moments(causal=True)),
    "hessian_blocks": lambda Y: att.hessian_blocks(_moments()),
    "bilinear_term": lambda Y: att.bilinear_term(_moments()),
    "block_diagonals": lambda Y: block_diagonals(_moments(causal=True)),
    "qk_chain_matrix": lambda Y: qk_chain_matrix(_meta(D, K), _meta(D, K)),
    "autograd_attention_hessian": lambda Y: att.autograd_attention_hessian(Y, _meta(D, K), _meta(D, K), _meta(D, D + 1),
                                                                       _meta(B, N, D + 1)),
    "head_input.jacobian": lambda Y: head_input_jacobian(_head(), Y, None),
    "head_input.hessian": lambda Y: head_input_hessian(_head(), Y, None, _meta(B, N, D + 1)),
    "head_input.param_hessian": lambda Y: head_input_param_hessian(_head(), Y, None, _meta(B, N, D + 1)),
    # multi-head, per-head, token-wise
    "multihead_hessian": lambda Y: multihead_hessian(_mh_layer(), _meta(B, N, 6), _meta(B, N, 5)),
    "multihead_block_diagonals": lambda Y: mhs.multihead_block_diagonals(_mh_layer(), _meta(B, N, 6), _meta(B, N, 5)),
    "head_output": lambda Y: head_output(_meta(B, N, 6), _meta(6, 3), _meta(6, 3), _meta(6, 4), _meta(4, 5), 0.5,
                                         True),
    "head_inner_products": lambda Y: sum(head_inner_products(
        _meta(B, N, 6), _meta(6, 3), _meta(6, 3), _meta(6, 4), _meta(4, 5), _meta(B, N, 5), c=0.1, kappa=0.5,
        causal=True, chunk=3, tile=2).values(), ()),  # {block: (oo, of, ff)} as 0-dim tensors
    "norm_hessian.layer": lambda Y: norm_hessian(NormLayer(_meta(D), _meta(D), 1e-5, "layer"), Y, _meta(B, N, D)),
    "norm_hessian.rms": lambda Y: norm_hessian(NormLayer(_meta(D), None, 1e-5, "rms"), Y, _meta(B, N, D), "H_f"),
    "ffn_hessian": lambda Y: ffn_hessian(FFNLayer(_meta(D, 7), _meta(7), _meta(7, 5), _meta(5), "gelu"), Y,
                                         _meta(B, N, 5)),
    "autograd_tokenwise_hessian": lambda Y: autograd_tokenwise_hessian(NormLayer(_meta(D), _meta(D), 1e-5, "layer"), Y,
                                                                       _meta(B, N, D)),
    # a whole block
    "block_hessian.pre": lambda Y: blk.block_hessian(_block("pre"), Y, _meta(B, N, D)).matrix,
    "block_hessian.post": lambda Y: blk.block_hessian(_block("post"), Y, _meta(B, N, D)).matrix,
    "block_hessian.none": lambda Y: blk.block_hessian(_block("none"), Y, _meta(B, N, D)).matrix,
    "block_token_hessian": lambda Y: blk.block_token_hessian(_block(), Y, _meta(B, N, D)),
    "block_hessian_parts": lambda Y: [p.matrix for p in blk.block_hessian_parts(_block("post"), Y,
                                                                             _meta(B, N, D)).values()],
    "block_loss": lambda Y: blk.block_loss(_block(), Y, _meta(B, N, D)),
    "autograd_block_hessian": lambda Y: blk.autograd_block_hessian(_block("none"), Y, _meta(B, N, D)),
    "random_block.device": lambda Y: blk.random_block(D, 2, 2, 5, device=META).flat(),
    "gpt2_block_parameter_map": lambda Y: gpt2_block_parameter_map(_to(blk.random_block(4, 2, 2, 5), META))[1],
    # unfold
    "constraint_cost.with_positions": with_positions,
    "converters.skip_map": lambda Y: skip_map(MultiHeadAttentionEnergy(_meta(2, D, K)), 0.5),
    "converters.standard_step": lambda Y: standard_step(nn.MultiheadAttention(D, 1, batch_first=True).to(DT).to(META),
                                                        Y, _attention_energy()),
    "layer_diagnosis.probe_input": lambda Y: probe_input(D, DT, META),
    "converters.key_bias_mask": lambda Y: key_bias_mask(Y, MultiHeadAttentionEnergy(_meta(2, D, K))),
    "unroll.attention_ffn_relu": lambda Y: unroll(["attention", "ffn", "relu"], depth=2, d=D).to(DT).to(META)(Y),
    "yang2022": lambda Y: [yang2022(d=6, depth=2, d_in=D, n_classes=3, heads=2, orthogonal_heads=orthogonal).to(DT)
                           .to(META)(Y) for orthogonal in (False, True)],
    "yang2022.layernorm": lambda Y: yang2022(d=D, depth=2, normalization="layernorm").to(DT).to(META)(Y),
    "converters.to_mha_zero_biases": lambda Y: [(m := to_mha(AttentionWeights(  # b_K, b_V, b_O: zeros on the device
        _meta(D, D), _meta(D, D), _meta(D, D), _meta(D, D), 1, b_Q=_meta(D)))).in_proj_bias, m.out_proj.bias,
        m(Y, Y, Y)[0]],
    "linear_operator.dense": lambda Y: _Diag(_meta(4)).dense(),  # unit columns and their indices on the device
    "gpt2_decoder": lambda Y: GPT2Decoder(GPT2Config(d_model=16, n_layers=1)).to(DT).to(META)(
        torch.zeros(B, 6, dtype=torch.long, device=META)),
}


@pytest.mark.filterwarnings("ignore::energy.StepSizeWarning")  # fixed step sizes outside a guaranteed range
@pytest.mark.parametrize("name", sorted(META_CASES))
def test_meta_inputs_give_meta_outputs(name: str) -> None:
    """A function of meta tensors only returns meta tensors (an implicit CPU tensor raises a device mismatch)."""
    _is_meta(META_CASES[name](_meta(B, N, D)))


@pytest.mark.filterwarnings("ignore::energy.StepSizeWarning")  # energy_transformer: no guaranteed step size
@pytest.mark.parametrize("step", STEP_KINDS)
def test_meta_every_step(step: str) -> None:
    """Each step kind of the unroller, alone, runs on meta (its forward creates nothing on the CPU)."""
    _is_meta(unroll([step], depth=1, d=4).to(DT).to(META)(_meta(B, N, 4)))


def test_value_reading_functions_say_so_on_meta() -> None:
    """Functions that need values refuse meta tensors with a message naming the argument (no silent CPU fallback)."""
    with pytest.raises(EnergyInputError, match="meta"):
        FFNEnergy(_meta(D, D), _meta(D))


def test_probes_are_seeded_on_the_cpu_and_moved() -> None:
    """``draw_probes`` gives the same values for a seed whatever ``device`` is, on that device."""
    Z = est.draw_probes(7, 3, generator=torch.Generator().manual_seed(1), device=META)
    assert Z.device.type == "meta" and Z.shape == (7, 3)
    a = est.draw_probes(7, 3, generator=torch.Generator().manual_seed(1), distribution="normal")
    b = est.draw_probes(7, 3, generator=torch.Generator().manual_seed(1), distribution="normal", device="cpu")
    assert torch.equal(a, b)
    assert not torch.equal(a, est.draw_probes(7, 3, generator=torch.Generator().manual_seed(2), distribution="normal"))


# ----------------------------------------------------------------------------------------------------------------
# cuda: the same numbers on the GPU as on the CPU (float64)
# ----------------------------------------------------------------------------------------------------------------

GPU = torch.device("cuda")
CPU = torch.device("cpu")
CaseFn = Callable[[torch.device], Any]
CUDA_CASES: dict[str, CaseFn] = {}


def _case(name: str) -> Callable[[CaseFn], CaseFn]:
    """Register ``fn(device) -> result`` (tensors, numbers, or tuples/dicts/named tuples of them) as a cuda case."""

    def deco(fn: CaseFn) -> CaseFn:
        assert name not in CUDA_CASES, name
        CUDA_CASES[name] = fn
        return fn

    return deco


class _Draw:
    """Seeded float64 normals drawn on the CPU (the same numbers for every device) and moved to ``device``."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device, self.g = device, torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, scale: float = 1.0) -> Tensor:
        return (scale * torch.randn(*shape, generator=self.g, dtype=DT)).to(self.device)


def _seeded(build: Callable[[], nn.Module], device: torch.device, seed: int = 0) -> nn.Module:
    """A module whose constructor draws from the global generator, built under ``seed`` and moved to ``device``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().to(DT).to(device)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaves(out: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, tensor or number)`` for every leaf of a nested result (dicts in key order), in a fixed order."""
    if isinstance(out, (Tensor, bool, int, float)):
        yield where, out
    elif isinstance(out, Mapping):
        for key in sorted(out, key=repr):
            yield from _leaves(out[key], f"{where}[{key!r}]")
    elif isinstance(out, (tuple, list)):
        for i, item in enumerate(out):
            yield from _leaves(item, f"{where}[{i}]")
    else:
        raise TypeError(f"cannot compare a {type(out).__name__} at {where}")


def _rel(a: Tensor, b: Tensor) -> float:
    """Norm-wise relative difference ``max|a − b| / max|b|`` (``b`` the CPU reference)."""
    a, b = a.detach().to(CPU, DT), b.detach().to(CPU, DT)
    return float((a - b).abs().max()) / max(float(b.abs().max()), torch.finfo(DT).tiny) if b.numel() else 0.0


def _agree(gpu: Any, cpu: Any) -> None:
    """Same structure; every tensor of ``gpu`` on the GPU and equal to its CPU twin, the numbers jointly (≤ TOL)."""
    lg, lc = list(_leaves(gpu)), list(_leaves(cpu))
    assert lc and [p for p, _ in lg] == [p for p, _ in lc]
    numbers = [(float(a), float(b)) for (_, a), (_, b) in zip(lg, lc) if not isinstance(b, Tensor)]
    for (path, a), (_, b) in zip(lg, lc):
        if isinstance(b, Tensor):
            assert isinstance(a, Tensor) and a.device.type == GPU.type and b.device.type == "cpu", path
            assert a.shape == b.shape and a.dtype == b.dtype and _rel(a, b) <= TOL, path
    if numbers:
        assert _rel(torch.tensor([a for a, _ in numbers], dtype=DT), torch.tensor([b for _, b in numbers], dtype=DT)) \
            <= TOL


# -- energies: value, gradient, step ------------------------------------------------------------------------------


@_case("energy.attention")
def _(dev: torch.device) -> Any:
    r = _Draw(dev)
    E, Y = AttentionEnergy(r(D, K)), r(B, N, D)
    mask = (torch.arange(N) < torch.tensor([[N], [N - 2]])).to(dev)  # the second sequence padded by two tokens
    return (*_value_grad_step(E, Y, 0.3), E.step(Y, 0.3, token_mask=mask),
            attention_step_fused(Y, E.M, 0.3), attention_step_fused(Y, E.M, 0.3, preconditioner="token"))


@_case("energy.multihead")
def _(dev: torch.device) -> Any:
    r = _Draw(dev, 1)
    E, Y = MultiHeadAttentionEnergy(r(2, D, K)), r(B, N, D)
    return (*_value_grad_step(E, Y, 0.3), *attention_step_fused_and_energy(Y, E.M, 0.3))


@_case("energy.tied_relu_ffn")
def _(dev: torch.device) -> Any:
    r = _Draw(dev, 2)
    R, Y = r(D, D, scale=0.05), r(B, N, D)
    return _value_grad_step(TiedReLUEnergy(r(D, 6)), Y, 0.3), _value_grad_step(FFNEnergy(R + R.T, r(D)), Y, 0.3)


@_case("energy.layernorm_rmsnorm")
def _(dev: torch.device) -> Any:
    Y = _Draw(dev, 4)(B, N, D)  # the step (projection) and the energy (indicator, 0 on the set)
    return [(P(Y), P.indicator(P(Y))) for P in (LayerNormProjection(), RMSNormProjection())]


@_case("energy.hopfield")
def _(dev: torch.device) -> Any:
    r = _Draw(dev, 5)
    E, xi = HopfieldEnergy(r(7, D), beta=0.8), r(B, N, D)
    return (*_value_grad_step(E, xi, 0.5), E.update(xi))


@_case("energy.energy_transformer")
def _(dev: torch.device) -> Any:
    r = _Draw(dev, 6)
    E = EnergyTransformerEnergy(r(2, 4, K, scale=0.5), r(2, 4, K, scale=0.5), r(6, 4), ln_bias=r(4, scale=0.3))
    x = r(B, N, 4)
    return (*_value_grad_step(E, x, 0.05), E.terms(x))


@_case("energy.curvature")
def _(dev: torch.device) -> Any:
    r = _Draw(dev, 7)
    E, Y = AttentionEnergy(r(D, K)), r(B, N, D)
    return attention_energy_hessian(E, Y[0]), majoriser_matrix(E, Y[0]), majoriser_step(E, Y[0], Y[1], 0.5)


# -- unrolled steps and models --------------------------------------------------------------------------------------

for _schedule in [(kind,) for kind in STEP_KINDS] + [("attention", "ffn", "relu")]:

    @_case("unroll." + "+".join(_schedule))
    def _(dev: torch.device, schedule: tuple[str, ...] = _schedule) -> Any:
        Y_out, info = _seeded(lambda: unroll(schedule, depth=2, d=4), dev)(_Draw(dev, 8)(B, N, 4), trace=True)
        return Y_out, info["energies"]


@_case("presets.yang2022")
def _(dev: torch.device) -> Any:
    X = _Draw(dev, 10)(B, N, 5)
    return [_seeded(partial(yang2022, d=6, depth=2, d_in=5, n_classes=3, heads=2, normalization=norm), dev)(X)
            for norm in (None, "layernorm")]


# -- closed forms ------------------------------------------------------------------------------------------------


@_case("closed.attention_moments_hessian")
def _(dev: torch.device) -> Any:
    r = _Draw(dev, 11)
    args = (r(B, N, D), r(D, K), r(D, K), r(D, D + 1), r(B, N, D + 1))  # d_V != d
    out = []
    for causal in (False, True):
        mom = att.attention_moments(*args, causal=causal)
        out += [{p: att.attention_hessian(mom, p) for p in ("H", "H_o", "H_f")}, att.attention_jacobians(mom),
                hessian_frobenius_norms(mom), block_traces(mom)]
    return out


@_case("closed.multihead")
def _(dev: torch.device) -> Any:
    r = _Draw(dev, 12)
    layer = MultiHeadAttentionLayer(r(4, 6, 2), r(2, 6, 2), r(2, 6, 3), r(4, 3, 5), causal=True)  # grouped-query
    X, Y = r(B, N, 6), r(B, N, 5)
    return ({p: multihead_hessian(layer, X, Y, p) for p in ("H", "H_o", "H_f")},
            multihead_hessian_block(layer, X, Y, "h0.Q", "kv0.K"), multihead_hessian_block(layer, X, Y, "h1.O", "h3.O"),
            mhs.multihead_block_norms(layer, X, Y), mhs.multihead_block_traces(layer, X, Y))


for _norm in ("pre", "post", "none"):

    @_case(f"closed.block_hessian.{_norm}")
    def _(dev: torch.device, norm: str = _norm) -> Any:
        block = blk.random_block(D, 2, 2, 5, kv_heads=1, norm=norm, generator=_gen(13), device=dev)  # type: ignore[arg-type]
        r = _Draw(dev, 14)
        X, target = r(B, N, D), r(B, N, D)
        return blk.block_hessian(block, X, target).matrix, blk.block_hessian(block, X, target, part="H_o").matrix, \
            blk.block_token_hessian(block, X, target)


@_case("closed.head_block_norms")
def _(dev: torch.device) -> Any:
    r = _Draw(dev, 15)
    X, W_Q, W_K, W_V, W_O, G = r(B, N, 6), r(6, 3), r(6, 3), r(6, 4), r(4, 5), r(B, N, 5, scale=0.1)
    return [head_block_norms(X, W_Q, W_K, W_V, W_O, G, c=0.1, causal=causal, chunk=3, tile=2)
            for causal in (False, True)]


@_case("closed.tokenwise_norm_ffn")
def _(dev: torch.device) -> Any:
    r = _Draw(dev, 16)
    X, Y, Y5 = r(B, N, D), r(B, N, D), r(B, N, 5)
    layers: list[tuple[Any, Any, Tensor]] = [
        (norm_hessian, NormLayer(1 + r(D, scale=0.1), r(D, scale=0.1), 1e-5, "layer"), Y),
        (norm_hessian, NormLayer(1 + r(D, scale=0.1), None, 1e-5, "rms"), Y),
        (ffn_hessian, FFNLayer(r(D, 7), r(7), r(7, 5), r(5), "gelu"), Y5),
    ]
    return [{p: fn(layer, X, T, p) for p in ("H", "H_o", "H_f")} for fn, layer, T in layers]


# -- operators and estimators -----------------------------------------------------------------------------------


def _mlp_problem(dev: torch.device) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """A small tanh MLP (26 parameters) and two uneven batches, on ``dev``."""
    model = _seeded(lambda: nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 2)), dev)
    r = _Draw(dev, 17)
    return model, [(r(6, D), r(6, 2)), (r(4, D), r(4, 2))]


@_case("operators.parameter_space")
def _(dev: torch.device) -> Any:
    model, data = _mlp_problem(dev)
    r = _Draw(dev, 18)
    V = r(26, 3)
    out: dict[str, Any] = {}
    for cls in (HessianOperator, GGNOperator, FunctionalOperator):
        A = cls(model, nn.MSELoss(), None, data)
        out[cls.__name__] = (A @ V, A.gradient(), A.loss(), A.block("0.weight", "2.weight") @ r(8, 2))
    J = JacobianOperator(model, None, data)
    out["jacobian"] = (J @ V, J.T @ r(J.shape[0], 2))
    return out


def _square_loss(out: Tensor, target: Tensor) -> Tensor:
    """``mean (out − target)²``, written out: torch 2.13's ``F.mse_loss`` fails forward-over-reverse (ZeroTensor)."""
    return ((out - target) ** 2).mean()


@_case("operators.token_hessian")
def _(dev: torch.device) -> Any:
    r = _Draw(dev, 19)
    E, Y, V = AttentionEnergy(r(D, K)), r(B, N, D), r(B * N * D, 2)
    lin = _seeded(lambda: nn.Linear(D, 2), dev)
    X, y = r(B, N, D), r(B, N, 2)
    return (TokenHessianOperator(lambda Z: E.energy(Z).sum(), Y) @ V,
            TokenHessianOperator(lambda Z: E.energy(Z).sum(), Y, linearize_once=True) @ V,
            TokenHessianOperator.from_model(lin, _square_loss, X, y) @ V)


def _gpt2_tiny(dev: torch.device) -> tuple[nn.Module, list]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Hugging Face's own notices, the same on both devices
        model = hf.build_model("gpt2-tiny", seed=0).to(dev)
    return model, hf.synthetic_batches(model, batch=2, seq_len=5, seed=0)  # drawn on the CPU, moved to the model


@_case("operators.hf_gpt2")
def _(dev: torch.device) -> Any:
    model, data = _gpt2_tiny(dev)
    out: dict[str, Any] = {}
    for part in ("H", "H_o", "H_f"):
        A = hf.curvature_operator(model, data, part=part)
        out[part] = A @ _Draw(dev, 20)(A.shape[1], 2)
    return out


@_case("operators.hf_block_curvature")
def _(dev: torch.device) -> Any:
    bc = BlockCurvature(*_gpt2_tiny(dev), exact_max=64)  # ln2: exact (32 entries); heads (68): estimated
    return ({p: bc.frobenius("layer1.ln2", part=p) for p in ("H", "H_o", "H_f")},
            bc.frobenius("layer0.head0.Q", "layer1.head2.V", num_matvecs=5, generator=_gen(21)),
            bc.frobenius("layer0.head3.O", num_matvecs=9, generator=_gen(22)),
            bc.trace("layer0.head0.Q", "H_o", num_matvecs=9, generator=_gen(23)),
            bc.top_eigenvalues("layer0.head0.Q", k=2, generator=_gen(24)).eigenvalues,
            bc.density("layer0.head1.K", num_probes=2, num_steps=6, generator=_gen(25))[:4])


def _symmetric_dense(dev: torch.device) -> Tensor:
    R = _Draw(dev, 23)(12, 12)
    return R + R.T


_ESTIMATORS: dict[str, Callable[[Any], Any]] = {
    "hutchinson_trace": lambda A: est.hutchinson_trace(A, 5, generator=_gen(24)),
    "hutchinson_diagonal": lambda A: est.hutchinson_diagonal(A, 5, generator=_gen(25)),
    "hutchinson_frobenius": lambda A: est.hutchinson_squared_frobenius(A, 5, generator=_gen(26)),
    "hutchpp_trace": lambda A: est.hutchpp_trace(A, 9, generator=_gen(27)),
    "hutchpp_frobenius": lambda A: est.hutchpp_squared_frobenius(A, 9, generator=_gen(28)),
    "lanczos": lambda A: lanczos(A, 2, generator=_gen(29)).eigenvalues,
    "slq": lambda A: slq_density(A, 3, 6, generator=_gen(30))[:4],  # nodes, weights, grid, density
}


def _mlp_hessian(dev: torch.device) -> HessianOperator:
    model, data = _mlp_problem(dev)
    return HessianOperator(model, nn.MSELoss(), None, data)


_OPERANDS: dict[str, Callable[[torch.device], Any]] = {"hessian_operator": _mlp_hessian, "dense": _symmetric_dense,
                                                       "callable": lambda dev: _OnDevice(_symmetric_dense(dev))}


class _OnDevice:  # a matvec callable answering on its own device (the probes stay on the CPU)
    def __init__(self, D: Tensor) -> None:
        self.D, self.shape = D, tuple(D.shape)

    def matvec(self, v: Tensor) -> Tensor:
        return self.D @ v.to(self.D.device)
for _est in _ESTIMATORS:
    for _op in _OPERANDS:

        @_case(f"estimators.{_est}.{_op}")
        def _(dev: torch.device, est: str = _est, op: str = _op) -> Any:
            return _ESTIMATORS[est](_OPERANDS[op](dev))


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore::energy.StepSizeWarning")  # the same warning on both devices, not the point here
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(CUDA_CASES))
def test_cuda_matches_cpu(name: str) -> None:
    """Each public function on ``cuda`` equals its CPU run (float64, norm-wise relative difference ≤ 1e-10)."""
    _agree(CUDA_CASES[name](GPU), CUDA_CASES[name](CPU))


def test_agreement_check_catches_a_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison of the cuda suite (run here with the CPU standing in for the GPU) rejects a relative difference
    of 1e-9, a tensor left on the wrong device and a missing number, and accepts equal nested results."""
    monkeypatch.setattr(sys.modules[__name__], "GPU", CPU)
    x = torch.linspace(1, 2, 7, dtype=DT)
    _agree({"a": (x, 2.0), "b": [x[:3]]}, {"a": (x.clone(), 2.0), "b": [x[:3].clone()]})
    for gpu, cpu in (((x * (1 + 1e-9)), x), ((x, 2.0 + 1e-8), (x, 2.0)), ((x, 1.0), (x, 1.0, 2.0))):
        with pytest.raises(AssertionError):
            _agree(gpu, cpu)
    monkeypatch.setattr(sys.modules[__name__], "GPU", META)
    with pytest.raises(AssertionError):
        _agree(x, x)
