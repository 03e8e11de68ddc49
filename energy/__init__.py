"""energy: objectives whose descent steps are Transformer layers, and their curvature.

Every formula cites the section of ``docs/MATH.md`` it implements. The three questions each energy answers
(:class:`~energy.base.Energy`): its value ``energy(Y)``, its closed-form gradient ``grad(Y)``, and the descent step
``step(Y, alpha)`` that reproduces a Transformer layer, with ``step_range()`` saying where descent is guaranteed.

>>> import torch, energy
>>> Y = torch.randn(2, 5, 3, dtype=torch.float64)
>>> E = energy.AttentionEnergy(torch.randn(3, 4, dtype=torch.float64))
>>> bool((E.energy(E.step(Y, 1.0)) <= E.energy(Y)).all())
True
"""

from energy._validation import (
    ConstraintError,
    DenseSizeError,
    EnergyInputError,
    LowPrecisionWarning,
    StepSizeError,
    StepSizeWarning,
    is_strict,
    strict_mode,
)
from energy.attention import (
    AttentionEnergy,
    MultiHeadAttentionEnergy,
    attention_step_fused,
    attention_step_fused_and_energy,
    attention_step_range,
    head_bases,
    key_bias,
    metric,
    pairwise_sq_dist,
    softmax_beta,
)
from energy.base import Energy, StepRange
from energy.composite import CompositeEnergy
from energy.core import Preconditioner
from energy.energy_transformer import EnergyTransformerEnergy, et_lagrangian
from energy.ffn import FFNEnergy, TiedReLUEnergy, tied_relu_energy, tied_relu_grad
from energy.hopfield import HopfieldEnergy
from energy.kernels import CauchyKernel, GaussianKernel, Kernel, PowerKernel
from energy.normalization import (
    LayerNormProjection,
    RMSNormProjection,
    absorb_layernorm_affine,
    layernorm_projection,
    rmsnorm_projection,
)

__version__ = "0.5.0"

__all__ = [
    # errors and modes
    "ConstraintError",
    "DenseSizeError",
    "EnergyInputError",
    "StepSizeError",
    "StepSizeWarning",
    "LowPrecisionWarning",
    "is_strict",
    "strict_mode",
    # interface
    "Energy",
    "StepRange",
    "CompositeEnergy",
    # attention (MATH §1.1-§1.2)
    "Kernel",
    "GaussianKernel",
    "PowerKernel",
    "CauchyKernel",
    "AttentionEnergy",
    "MultiHeadAttentionEnergy",
    "attention_step_fused",
    "attention_step_fused_and_energy",
    "attention_step_range",
    "Preconditioner",
    "head_bases",
    "key_bias",
    "metric",
    "pairwise_sq_dist",
    "softmax_beta",
    # feed-forward (MATH §1.3), normalisation (§1.4)
    "FFNEnergy",
    "TiedReLUEnergy",
    "tied_relu_energy",
    "tied_relu_grad",
    "LayerNormProjection",
    "RMSNormProjection",
    "absorb_layernorm_affine",
    "layernorm_projection",
    "rmsnorm_projection",
    # related energies (MATH §2)
    "HopfieldEnergy",
    "EnergyTransformerEnergy",
    "et_lagrangian",
]
