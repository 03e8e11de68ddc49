"""Convert a standard attention layer to the energy whose descent step it is, and back; check to float64 precision.

    python examples/convert_layer.py

1. A constrained ``nn.MultiheadAttention`` (W_Q = W_K, W_V = W_O = I, no biases) is step (a)
   (``Preconditioner.METRIC``, identity values) of an attention energy: ``to_energy`` finds the energy;
   ``verify_equivalence`` compares torch's layer (with the key bias β passed as ``attn_mask``) with the energy's
   step, and also reports how far the plain layer (no β) is.
2. An energy with two orthogonal heads becomes an ``nn.MultiheadAttention`` with ``to_standard``, for step (a) and
   for step (b) (``Preconditioner.TOKEN``, values tied to the metric).
3. An unconstrained layer: ``check_layer`` says which constraint fails and by how much; ``nearest_constrained``
   gives the nearest constrained layer and the distance to it.
"""

import torch
from torch import nn

from energy.attention import MultiHeadAttentionEnergy
from energy.core import Preconditioner
from unfold.converters import check_layer, nearest_constrained, to_energy, to_standard, verify_equivalence

torch.manual_seed(0)
dt = torch.float64
d = 6

# 1. constrained standard layer -> energy
layer = nn.MultiheadAttention(d, 1, bias=False, batch_first=True, dtype=dt)
A = torch.randn(d, d, dtype=dt)
with torch.no_grad():
    layer.in_proj_weight.copy_(torch.cat([A, A, torch.eye(d, dtype=dt)]))  # W_Q = W_K = Aᵀ, W_V = I
    layer.out_proj.weight.copy_(torch.eye(d, dtype=dt))
energy, step = to_energy(layer, preconditioner=Preconditioner.METRIC)
Y = torch.randn(3, 8, d, dtype=dt)
res = verify_equivalence(layer, step, Y)
print("1.", check_layer(layer))
print(f"   layer (β as attn_mask) vs energy step: max |Δ| = {res['max_abs_err']:.2e}")
print(f"   plain layer (no β)    vs energy step: max |Δ| = {res['max_abs_err_without_key_bias']:.2e}")
print(f"   energy before / after the step: {energy.energy(Y).tolist()} -> {energy.energy(step(Y)).tolist()}")

# 2. energy (two orthogonal heads) -> standard layer
Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=dt))
M = Q.reshape(d, 2, 3).permute(1, 0, 2) @ torch.randn(2, 3, 3, dtype=dt)
E2 = MultiHeadAttentionEnergy(M)
errors = []
for prec in Preconditioner:
    mha = to_standard(E2, preconditioner=prec)
    alpha = 0.5 if prec is Preconditioner.METRIC else 1.0 / float(E2.lambda_max_W())  # inside the descent range
    errors.append(verify_equivalence(mha, E2, Y, alpha=alpha, preconditioner=prec)["max_abs_err"])
print(f"2. two orthogonal heads -> nn.MultiheadAttention(num_heads={mha.num_heads}), steps (a) METRIC and (b) TOKEN: "
      f"max |Δ| = {max(errors):.2e}")

# 3. an unconstrained layer
free = nn.MultiheadAttention(d, 2, bias=False, batch_first=True, dtype=dt)
print("3.", check_layer(free))
near, info = nearest_constrained(free)
print("   nearest constrained layer: relative distance of W_Q W_Kᵀ per head",
      [round(x, 3) for x in info["qk_distance"]], "; of W_V W_O", [round(x, 3) for x in info["value_distance"]])
print("   nearest layer is constrained:", check_layer(near).satisfied)
