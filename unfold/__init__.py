"""unfold: build unfolded Transformers whose layers are descent steps of energies (built on :mod:`energy`).

* :mod:`unfold.parametrizations` – named weight constraints (PSD metric ``M Mᵀ``, symmetric, clipped spectrum,
  orthogonal heads) as ``torch.nn.utils.parametrize`` parametrisations;
* :mod:`unfold.steps` – one ``nn.Module`` per descent step;
* :mod:`unfold.unroller` – :func:`unroll` a schedule of steps into a model whose forward can return its trace;
* :mod:`unfold.presets` – Yang et al.'s weight-tied model, an Energy-Transformer block;
* :mod:`unfold.converters` – constrained standard attention layer ↔ energy step, with the error between them;
* :mod:`unfold.standard` – the GPT-2-style decoder and MLP baseline of the Hessian experiments;
* :mod:`unfold.data`, :mod:`unfold.train` – tasks/data loaders and a small training loop with checkpoints.

The package exports the public names (``__all__``) of these modules, and :class:`~energy.core.Preconditioner` (the
step (a)/(b) enum). ``unfold.train`` is the training *module*; its loop is ``unfold.train.train(...)`` (or
``from unfold.train import train``), so that ``import unfold.train`` and ``unfold.train`` name the same thing.

:func:`plot_trace` (:mod:`unfold.plotting`) draws the per-layer energy of a trace. Command line: ``python -m unfold
train ...`` and ``python -m unfold trace ...`` (installed as ``unfold``).
"""

from energy.core import Preconditioner
from unfold import converters, parametrizations, presets, standard, steps, unroller
from unfold.converters import *  # noqa: F403
from unfold.parametrizations import *  # noqa: F403
from unfold.plotting import plot_trace
from unfold.presets import *  # noqa: F403
from unfold.standard import *  # noqa: F403
from unfold.steps import *  # noqa: F403
from unfold.train import TrainResult, evaluate
from unfold.unroller import *  # noqa: F403

__all__ = ["Preconditioner", "TrainResult", "evaluate", "plot_trace"]
__all__ += steps.__all__
__all__ += unroller.__all__
__all__ += parametrizations.__all__
__all__ += presets.__all__
__all__ += standard.__all__
__all__ += converters.__all__
