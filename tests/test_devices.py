"""Device propagation (issue #12 item 5): public functions create their tensors on the device of their inputs.

Two layers of checks.

* ``meta``, runs everywhere: PyTorch's ``meta`` device computes shapes and dtypes without values. A function fed
  only meta tensors that creates a tensor without ``device=`` (an implicit CPU tensor) then mixes devices and raises,
  so a clean run with a meta result proves device propagation without a GPU. Covered: the attention, multi-head,
  tied-ReLU, LayerNorm/RMSNorm energies (value, gradient, step), the core FFN formulas, the energy curvature and
  majoriser closed forms, the closed-form attention Hessian, the unrolled model and each of its step kinds, the
  one-hot positions of ``constraint_cost``, the zero biases of ``to_mha``, ``block_hessian`` of a whole block and
  the dense materialisation of a :class:`LinearOperator`.
  Functions that legitimately read values are not run on meta (they raise a clear ``EnergyInputError`` instead):
  :class:`~energy.ffn.FFNEnergy` (its step range needs the eigenvalues of ``I + W_f``), the estimators and Krylov
  routines (probe statistics, Ritz convergence and ``float`` results).
* ``cuda`` (marker ``cuda``, skipped without a GPU): the same public functions on ``cuda`` and on the CPU in float64
  agree to ``1e-10`` relative error, including ``block_hessian``, a ``HessianOperator`` product and the
  Hutchinson/Lanczos estimators (whose probes are drawn on the CPU from a CPU generator and moved to the
  operator's device, so both runs see the same probes).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
from _helpers import DT
from torch import Tensor, nn

from energy import AttentionEnergy, MultiHeadAttentionEnergy, TiedReLUEnergy
from energy._validation import EnergyInputError
from energy.core import ffn as core_ffn
from energy.ffn import FFNEnergy
from energy.hessian.attention import attention_hessian, attention_moments
from energy.hessian.block import TransformerBlock, block_hessian, random_block
from energy.hessian.curvature_operators import HessianOperator
from energy.hessian.energy_curvature import attention_energy_hessian, majoriser_matrix, majoriser_step
from energy.hessian.estimators import draw_probes, hutchinson_trace
from energy.hessian.krylov import lanczos
from energy.hessian.linear_operator import LinearOperator
from energy.normalization import LayerNormProjection, RMSNormProjection
from unfold.constraint_cost import with_positions
from unfold.layer_weights import AttentionWeights, to_mha
from unfold.unroller import unroll

META = torch.device("meta")
TOL = 1e-10


def _meta(*shape: int) -> Tensor:
    return torch.empty(*shape, dtype=DT, device=META)


def _is_meta(out: Any) -> None:
    tensors = [out] if isinstance(out, Tensor) else list(out)
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


META_CASES: dict[str, Any] = {
    "attention.energy": lambda Y: _attention_energy().energy(Y),
    "attention.grad": lambda Y: _attention_energy().grad(Y),
    "attention.step": lambda Y: _attention_energy().step(Y, 0.5),
    "attention.step_masked": lambda Y: _attention_energy().step(Y, 0.5, token_mask=torch.ones(B, N, dtype=torch.bool,
                                                                                              device=META)),
    "multihead.energy": lambda Y: MultiHeadAttentionEnergy(_meta(2, D, K)).energy(Y),
    "multihead.step": lambda Y: MultiHeadAttentionEnergy(_meta(2, D, K)).step(Y, 0.5),
    "tied_relu.energy": lambda Y: TiedReLUEnergy(_meta(D, 6)).energy(Y),
    "tied_relu.step": lambda Y: TiedReLUEnergy(_meta(D, 6)).step(Y, 0.5),
    "core.ffn_energy": lambda Y: core_ffn.ffn_energy(Y, _meta(D, D), _meta(D)),
    "core.ffn_step": lambda Y: core_ffn.descent_step(Y, core_ffn.ffn_grad(Y, _meta(D, D), _meta(D)), 0.5),
    "layernorm": lambda Y: LayerNormProjection()(Y),
    "rmsnorm": lambda Y: RMSNormProjection()(Y),
    "energy_curvature.attention": lambda Y: attention_energy_hessian(_attention_energy(), Y[0]),
    "majoriser.matrix": lambda Y: majoriser_matrix(_attention_energy(), Y[0]),
    "majoriser.step": lambda Y: majoriser_step(_attention_energy(), Y[0], Y[1], 0.5),
    "attention_hessian": lambda Y: attention_hessian(attention_moments(Y, _meta(D, K), _meta(D, K), _meta(D, D),
                                                                       _meta(B, N, D))),
    "attention_hessian.causal": lambda Y: attention_hessian(attention_moments(
        Y, _meta(D, K), _meta(D, K), _meta(D, D), _meta(B, N, D), causal=True), "H_f"),
    "constraint_cost.with_positions": with_positions,
}


@pytest.mark.parametrize("name", sorted(META_CASES))
def test_meta_inputs_give_meta_outputs(name: str) -> None:
    """A function of meta tensors only returns meta tensors (an implicit CPU tensor raises a device mismatch)."""
    _is_meta(META_CASES[name](_meta(B, N, D)))


def test_meta_unrolled_model() -> None:
    """The unrolled attention/FFN/ReLU model (steps and their buffers) runs on meta after ``.to('meta')``."""
    model = unroll(["attention", "ffn", "relu"], depth=2, d=D).to(DT).to(META)
    _is_meta(model(_meta(B, N, D)))


@pytest.mark.filterwarnings("ignore::energy.StepSizeWarning")  # energy_transformer: no guaranteed step size
@pytest.mark.parametrize("step", ["attention", "energy_transformer", "ffn", "hopfield", "layernorm", "relu", "rmsnorm",
                                  "tied_ffn"])
def test_meta_every_step(step: str) -> None:
    """Each step kind of the unroller, alone, runs on meta (its forward creates nothing on the CPU)."""
    _is_meta(unroll([step], depth=1, d=4).to(DT).to(META)(_meta(B, N, 4)))


@pytest.mark.parametrize("norm", ["pre", "post", "none"])
def test_meta_block_hessian(norm: str) -> None:
    """The closed-form block Hessian (causal GQA attention, FFN, norms, MSE loss) of a block moved to meta is meta."""
    block = _to(random_block(D, 2, 2, 5, kv_heads=1, norm=norm), META)  # type: ignore[arg-type]
    _is_meta(block_hessian(block, _meta(B, N, D), _meta(B, N, D)).matrix)


class _Diag(LinearOperator):
    """``diag(w)`` as a matrix-free operator, on the device of ``w``."""

    def __init__(self, w: Tensor) -> None:
        super().__init__((w.shape[0], w.shape[0]), w.dtype, w.device)
        self.w = w

    def _matmat(self, V: Tensor) -> Tensor:
        return self.w[:, None] * V


def test_meta_dense_materialisation() -> None:
    """``LinearOperator.dense`` builds its unit columns (and their indices) on the operator's device."""
    _is_meta(_Diag(_meta(4)).dense())


def test_meta_to_mha_fills_missing_biases_on_the_weights_device() -> None:
    """``to_mha`` with only ``b_Q`` given fills the other biases with zeros on the weights' device."""
    layer = to_mha(AttentionWeights(_meta(D, D), _meta(D, D), _meta(D, D), _meta(D, D), 1, b_Q=_meta(D)))
    _is_meta([layer.in_proj_bias, layer.out_proj.bias, layer(_meta(B, N, D), _meta(B, N, D), _meta(B, N, D))[0]])


def test_value_reading_functions_say_so_on_meta() -> None:
    """Functions that need values refuse meta tensors with a message naming the argument (no silent CPU fallback)."""
    with pytest.raises(EnergyInputError, match="meta"):
        FFNEnergy(_meta(D, D), _meta(D))


def test_probes_are_seeded_on_the_cpu_and_moved() -> None:
    """``draw_probes`` gives the same values for a seed whatever ``device`` is, on that device."""
    Z = draw_probes(7, 3, generator=torch.Generator().manual_seed(1), device=META)
    assert Z.device.type == "meta" and Z.shape == (7, 3)
    a = draw_probes(7, 3, generator=torch.Generator().manual_seed(1), distribution="normal")
    b = draw_probes(7, 3, generator=torch.Generator().manual_seed(1), distribution="normal", device="cpu")
    assert torch.equal(a, b) and not torch.equal(a, draw_probes(7, 3, generator=torch.Generator().manual_seed(2),
                                                               distribution="normal"))


# ----------------------------------------------------------------------------------------------------------------
# cuda: the same numbers on the GPU as on the CPU (float64)
# ----------------------------------------------------------------------------------------------------------------


def _close(a: Tensor, b: Tensor) -> None:
    assert a.device.type == "cuda"
    a, b = a.detach().cpu(), b.detach()
    assert float((a - b).abs().max()) <= TOL * max(float(b.abs().max()), 1.0)


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore::energy.StepSizeWarning")  # the same warning on both devices, not the point here
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCudaMatchesCpu:
    """Each public function on ``cuda`` equals its CPU run (float64, relative error ≤ 1e-10)."""

    def _inputs(self, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(B, N, D, generator=g, dtype=DT), torch.randn(D, K, generator=g, dtype=DT),
                torch.randn(2, D, K, generator=g, dtype=DT))

    def test_energies_and_steps(self) -> None:
        Y, W, M = self._inputs()
        for E_cpu, E_gpu in ((AttentionEnergy(W), AttentionEnergy(W.cuda())),
                             (MultiHeadAttentionEnergy(M), MultiHeadAttentionEnergy(M.cuda())),
                             (TiedReLUEnergy(W), TiedReLUEnergy(W.cuda()))):
            _close(E_gpu.energy(Y.cuda()), E_cpu.energy(Y))
            _close(E_gpu.grad(Y.cuda()), E_cpu.grad(Y))
            _close(E_gpu.step(Y.cuda(), 0.3), E_cpu.step(Y, 0.3))
        R = torch.randn(D, D, generator=torch.Generator().manual_seed(3), dtype=DT)
        W_f = 0.05 * (R + R.T)
        F_cpu, F_gpu = FFNEnergy(W_f, W[:, 0]), FFNEnergy(W_f.cuda(), W[:, 0].cuda())
        _close(F_gpu.step(Y.cuda(), 0.3), F_cpu.step(Y, 0.3))
        E = AttentionEnergy(W)
        _close(attention_energy_hessian(AttentionEnergy(W.cuda()), Y[0].cuda()), attention_energy_hessian(E, Y[0]))

    def test_unrolled_model(self) -> None:
        Y, _, _ = self._inputs()
        torch.manual_seed(0)
        model = unroll(["attention", "ffn", "relu"], depth=2, d=D).to(DT)
        ref = model(Y)
        _close(model.cuda()(Y.cuda()), ref)

    def test_attention_hessian(self) -> None:
        Y, W, _ = self._inputs()
        g = torch.Generator().manual_seed(4)
        W_K, W_V, T = (torch.randn(*s, generator=g, dtype=DT) for s in ((D, K), (D, D), (B, N, D)))
        args = (Y, W, W_K, W_V, T)
        ref = attention_hessian(attention_moments(*args, causal=True))
        _close(attention_hessian(attention_moments(*(a.cuda() for a in args), causal=True)), ref)

    def test_block_hessian(self) -> None:
        block = random_block(D, 2, 2, 5, generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(6)
        X, target = torch.randn(B, N, D, generator=g, dtype=DT), torch.randn(B, N, D, generator=g, dtype=DT)
        gpu_block: TransformerBlock = _to(block, "cuda")
        _close(block_hessian(gpu_block, X.cuda(), target.cuda()).matrix, block_hessian(block, X, target).matrix)

    def test_operator_and_estimators(self) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
        g = torch.Generator().manual_seed(7)
        data = [(torch.randn(6, D, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT))]
        H_cpu = HessianOperator(model, nn.MSELoss(), None, data)
        gpu_data = [(x.cuda(), y.cuda()) for x, y in data]
        H_gpu = HessianOperator(copy.deepcopy(model).cuda(), nn.MSELoss(), None, gpu_data)
        V = torch.randn(H_cpu.shape[1], 3, generator=g, dtype=DT)
        _close(H_gpu.matmat(V.cuda()), H_cpu.matmat(V))
        t_cpu = hutchinson_trace(H_cpu, 5, generator=torch.Generator().manual_seed(8))
        t_gpu = hutchinson_trace(H_gpu, 5, generator=torch.Generator().manual_seed(8))
        assert abs(t_gpu.value - t_cpu.value) <= TOL * max(abs(t_cpu.value), 1.0)
        l_cpu = lanczos(H_cpu, 2, generator=torch.Generator().manual_seed(9))
        l_gpu = lanczos(H_gpu, 2, generator=torch.Generator().manual_seed(9))
        _close(l_gpu.eigenvalues, l_cpu.eigenvalues)
        A = H_cpu.dense()
        _close(lanczos(A.cuda(), 2, generator=torch.Generator().manual_seed(9)).eigenvalues,
               lanczos(A, 2, generator=torch.Generator().manual_seed(9)).eigenvalues)
