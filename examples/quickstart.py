"""Quickstart: build an unfolded Transformer, run it, trace its energy layer by layer, plot it.

    python examples/quickstart.py [PLOT.png]      (or set QUICKSTART_PLOT=PLOT.png)

The model is the weight-tied model of Yang et al. (2022): every layer is an attention step on the attention energy
(softmax_β attention with W = M Mᵀ/√k, α = 1), an FFN step on the FFN energy (W_f with spectrum in [0, 0.95]) and a
ReLU projection. ``model(Y, trace=True)`` returns the output and, in the same pass, every state and every energy term.
"""

import os
import sys

import torch

from unfold.presets import yang2022

torch.manual_seed(0)
model = yang2022(d=16, depth=6)  # the paper uses d = 300, depth 12
print(model.body.schedule, "× depth", model.body.depth, "(tied weights)")

Y = torch.randn(4, 10, 16)  # 4 sequences of 10 tokens (rows), width 16
with torch.no_grad():
    out, info = model(Y, trace=True)

S = len(model.body.schedule)
total = info["energies"]["total"]  # (number of states, batch)
print(f"{'state':>5} {'after':>10} {'E_att':>10} {'E_ffn':>10} {'total':>10}")
for t in range(total.shape[0]):
    name = "input" if t == 0 else info["step_names"][t - 1]
    e = {k: float(v[t].mean()) for k, v in info["energies"].items()}
    print(f"{t:>5} {name:>10} {e['E_att']:>10.4f} {e['E_ffn']:>10.4f} {e['total']:>10.4f}")

per_layer = total[::S].mean(-1)  # energy at the start of every layer and after the last one
print("energy per layer:", [round(float(e), 3) for e in per_layer])

path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("QUICKSTART_PLOT")
if path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(range(len(per_layer)), per_layer.numpy(), "o-")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean E_att + E_ffn")
    fig.tight_layout()
    from paper_figs.io import save_figure  # atomic: an interrupted run never leaves a truncated picture

    path = path if os.path.splitext(path)[1] else f"{path}.png"  # the suffix chooses the format
    save_figure(fig, path, dpi=100)
    print("wrote", path)
