"""Shared check of the purity test matrix: every ``torch.func`` transform against an autograd reference (float64)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, hessian, jvp, linearize, vjp, vmap


def check_transforms(f: Callable[[Tensor], Tensor], loss: Callable[[Tensor], Tensor], x: Tensor, u: Tensor, v: Tensor,
                     *, second_order: bool = True) -> None:
    """``grad``/``hessian`` of ``loss``, ``vjp`` (cotangent ``u``), ``jvp``/``linearize`` (tangent ``v``) of ``f`` and
    ``vmap`` over tangents agree with reverse-mode autograd on one graph (double backward for forward-mode
    quantities: ``J v = d/dw ⟨Jᵀ w, v⟩``); tolerances at the 1e-10 level."""
    x_req = x.clone().requires_grad_(True)
    out = f(x_req)
    g_ref = torch.autograd.grad(loss(x_req), x_req, create_graph=True)[0]
    vjp_ref = torch.autograd.grad(out, x_req, u, retain_graph=True)[0]
    w = torch.zeros_like(out, requires_grad=True)
    jvp_ref = torch.autograd.grad((torch.autograd.grad(out, x_req, w, create_graph=True)[0] * v).sum(), w)[0]

    torch.testing.assert_close(grad(loss)(x), g_ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vjp(f, x)[1](u)[0], vjp_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jvp(f, (x,), (v,))[1], jvp_ref, rtol=1e-10, atol=1e-12)
    primal, lin = linearize(f, x)
    torch.testing.assert_close(primal, out.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin(v), jvp_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vmap(lin)(torch.stack([v, -2 * v])), torch.stack([jvp_ref, -2 * jvp_ref]),
                               rtol=1e-10, atol=1e-12)
    if not second_order:
        return
    n = x.numel()
    H_ref = torch.stack([torch.autograd.grad(gi, x_req, retain_graph=True)[0].reshape(-1) for gi in g_ref.reshape(-1)])
    torch.testing.assert_close(hessian(loss)(x).reshape(n, n), H_ref, rtol=1e-9, atol=1e-11)
    V = torch.stack([v, -v, torch.zeros_like(v)])  # Hessian-vector products, forward over reverse, batched
    hvps = vmap(lambda d: jvp(grad(loss), (x,), (d,))[1])(V)
    torch.testing.assert_close(hvps.reshape(3, n), V.reshape(3, n) @ H_ref, rtol=1e-9, atol=1e-11)
