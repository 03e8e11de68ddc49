"""Train the unfolded model on sklearn's digits (offline), then trace its energy layer by layer.

    python examples/train_and_trace.py [STEPS]

Uses the library's pieces directly: a task from unfold.constraint_cost.make_task (digits as 8 row tokens with one-hot
positions), the preset yang2022 with an input map and a classification head, unfold.train.train / evaluate, and
energy_trace_summary for the trace statistics. Small sizes, CPU, a few seconds.
"""

import sys

import torch

from unfold.constraint_cost import energy_trace_summary, make_task
from unfold.presets import yang2022
from unfold.train import evaluate, train

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 150
torch.manual_seed(0)
task = make_task("digits", seed=0, batch_size=64)
model = yang2022(d=24, depth=4, d_in=task.d_in, n_classes=task.n_outputs)

before = energy_trace_summary(model.eval(), task.X_probe)
result = train(model, task.loss_fn, task.train_batches, steps=steps, lr=3e-3, optimizer="adam", seed=0,
               progress=False)
acc = evaluate(model, task.test_batches(), task.metric)
after = energy_trace_summary(model.eval(), task.X_probe)

print(f"trained {steps} steps: final loss {result.final_loss:.3f}, test accuracy {acc:.3f}")
for name, s in (("untrained", before), ("trained", after)):
    print(f"{name:>9}: mean energy per layer {[round(e, 2) for e in s['mean_energy_per_layer']]}")
    print(f"{'':>9}  energy decreased over {100 * s['layer_decrease_fraction']:.0f}% of (layer, input) pairs; "
          f"attention steps decreased E_att in {100 * s['per_step']['attention']['own_term_decreased']:.0f}%, "
          f"FFN steps decreased E_ffn in {100 * s['per_step']['ffn']['own_term_decreased']:.0f}%")
