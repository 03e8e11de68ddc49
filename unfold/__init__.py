"""unfold: build unfolded Transformers whose layers are descent steps of energies (built on :mod:`energy`).

* :mod:`unfold.parametrizations` – named weight constraints (PSD metric ``M Mᵀ``, symmetric, clipped spectrum,
  orthogonal heads) as ``torch.nn.utils.parametrize`` parametrisations;
* :mod:`unfold.steps` – one ``nn.Module`` per descent step;
* :mod:`unfold.unroller` – :func:`unroll` a schedule of steps into a model whose forward can return its trace;
* :mod:`unfold.presets` – Yang et al.'s weight-tied model, an Energy-Transformer block (and the standard models);
* :mod:`unfold.converters` – constrained standard attention layer ↔ energy step, with the error between them;
* :mod:`unfold.standard` – the GPT-2-style decoder and MLP baseline of the Hessian experiments;
* :mod:`unfold.data`, :mod:`unfold.train` – tasks/data loaders and a small training loop with checkpoints.

Command line: ``python -m unfold train ...`` and ``python -m unfold trace ...``.
"""

from unfold.converters import check_layer, nearest_constrained, to_energy, to_standard, verify_equivalence
from unfold.parametrizations import (
    Constraint,
    OrthogonalHeads,
    PSDMetric,
    SpectrumClip,
    Symmetric,
    check_constraints,
    constraints_of,
)
from unfold.presets import UnrolledClassifier, energy_transformer_block, init_signal_preserving_, yang2022
from unfold.standard import GPT2Config, GPT2Decoder, MLPBaseline, standard_encoder
from unfold.steps import (
    AttentionStep,
    EnergyTransformerStep,
    FFNStep,
    HopfieldStep,
    LayerNormProjection,
    ReLUProjection,
    RMSNormProjection,
    Step,
    TiedReLUFFNStep,
)
from unfold.train import TrainResult, evaluate, train
from unfold.unroller import STEP_TYPES, CheckpointError, Unrolled, load_model, save_model, unroll

__all__ = [
    # building models
    "unroll",
    "Unrolled",
    "STEP_TYPES",
    "Step",
    "AttentionStep",
    "FFNStep",
    "TiedReLUFFNStep",
    "ReLUProjection",
    "LayerNormProjection",
    "RMSNormProjection",
    "HopfieldStep",
    "EnergyTransformerStep",
    # constraints
    "Constraint",
    "PSDMetric",
    "Symmetric",
    "SpectrumClip",
    "OrthogonalHeads",
    "constraints_of",
    "check_constraints",
    # presets and standard models
    "yang2022",
    "init_signal_preserving_",
    "energy_transformer_block",
    "UnrolledClassifier",
    "GPT2Config",
    "GPT2Decoder",
    "MLPBaseline",
    "standard_encoder",
    # converters
    "to_energy",
    "to_standard",
    "verify_equivalence",
    "check_layer",
    "nearest_constrained",
    # training and checkpoints
    "train",
    "evaluate",
    "TrainResult",
    "save_model",
    "load_model",
    "CheckpointError",
]
