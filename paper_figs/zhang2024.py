r"""Zhang et al. (2024), "Why Transformers Need Adam: A Hessian Perspective": blockwise Hessian spectra (MATH §3.7).

Zhang et al. compute the spectral density of every diagonal Hessian block (embeddings, per-head Q/K/V, attention
output, MLP, LayerNorm) of Transformers by stochastic Lanczos quadrature and call a model *block-heterogeneous*
when the block spectra differ, measured by pairwise Jensen–Shannon (JS) distances; Transformers are heterogeneous,
MLPs and CNNs homogeneous. This figure repeats the measurement with the library's block operators
(:class:`energy.hessian.hf_blocks.BlockCurvature`, SLQ from :func:`energy.hessian.krylov.slq_density`) on a
GPT-2-shaped model and on an MLP of comparable width on the same next-token task, at initialisation and after a
short Adam run.

Densities live on the *normalised* eigenvalue axis: each block's SLQ nodes ``θ`` are divided by the block's
spectral radius ``r = max |θ|`` (the extreme Ritz values, which Lanczos finds first), so every block's spectrum lies
in ``[-1, 1]`` and the JS distance compares shapes, not scales (the scales are reported separately as ``r`` and
``‖H_bb‖_F``). On a common grid ``t`` the smoothed density and the JS divergence (nats, in ``[0, ln 2]``) are

.. math::
    \phi_b(t) = \sum_{p,i} \tau^{(p)}_i\, \mathcal N\!\big(t;\ \theta^{(p)}_i / r_b,\ s^2\big), \qquad
    \mathrm{JS}(P, Q) = \tfrac12 \mathrm{KL}(P \,\|\, M) + \tfrac12 \mathrm{KL}(Q \,\|\, M),\ M = \tfrac12 (P + Q),

with ``P``, ``Q`` the grid-discretised densities normalised to unit mass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from energy.hessian.curvature_operators import HessianOperator
from energy.hessian.hf import CausalLMLoss, LogitsModel, build_model, count_targets, load_model, token_batches
from energy.hessian.hf_blocks import BlockCurvature
from energy.hessian.krylov import SpectralDensity, slq_density
from paper_figs.io import decode_array, encode_array
from paper_figs.registry import FigureConfig, figure, measured

__all__ = ["CASES", "TokenMLP", "compute_zhang_blockwise", "js_matrix", "markov_tokens", "normalised_density"]

DTYPE = torch.float64
#: The four measured models, in plotting order.
CASES: tuple[str, ...] = ("transformer_init", "transformer_trained", "mlp_init", "mlp_trained")
_CASE_LABEL = {"transformer_init": "GPT-2, init", "transformer_trained": "GPT-2, trained",
               "mlp_init": "MLP, init", "mlp_trained": "MLP, trained"}
#: Half-width of the common normalised grid (the spectra lie in [-1, 1]) and the Gaussian kernel width on it.
GRID_HALF = 1.15
KERNEL = 0.03


# --------------------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------------------


def markov_tokens(vocab: int, n_seq: int, seq_len: int, *, seed: int, successors: int = 16) -> Tensor:
    """Seeded token sequences of a random first-order Markov chain, so that a few Adam steps can learn something
    beyond the unigram distribution: each token has ``min(successors, vocab)`` random successors (drawn with
    repetition) with peaked probabilities ``softmax(3 z)``, ``z ~ N(0, 1)`` (memory ``vocab × successors``, so a
    GPT-2 vocabulary is fine).
    """
    g = torch.Generator().manual_seed(seed)
    k = min(successors, vocab)
    support = torch.randint(vocab, (vocab, k), generator=g)
    probs = torch.softmax(3.0 * torch.randn(vocab, k, generator=g, dtype=DTYPE), dim=1)
    tokens = torch.empty(n_seq, seq_len, dtype=torch.int64)
    tokens[:, 0] = torch.randint(vocab, (n_seq,), generator=g)
    for t in range(1, seq_len):
        prev = tokens[:, t - 1]
        pick = torch.multinomial(probs[prev], 1, generator=g)[:, 0]
        tokens[:, t] = support[prev, pick]
    return tokens


class TokenMLP(nn.Module):
    """The MLP baseline on the Transformer's task: per position ``logits = W_out g(… g(W_1 E[x_t]) …)``.

    Token embedding ``E`` (vocabulary × ``d``), ``n_hidden`` GELU layers alternating ``d → d_ff → d`` (the widths
    of the Transformer's MLPs, no attention, no residual, no normalisation), and an untied read-out ``d → V``.
    ``forward`` takes the batch dictionary of :func:`energy.hessian.hf.token_batches` (``labels`` ignored), so the
    same data and :class:`~energy.hessian.hf.CausalLMLoss` apply. Blocks: one per layer (weight and bias).
    """

    def __init__(self, vocab: int, d: int, d_ff: int, n_hidden: int, *, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, d)
            widths = [d] + [d_ff if i % 2 == 0 else d for i in range(n_hidden)]
            self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
            self.out = nn.Linear(widths[-1], vocab)
        self.to(DTYPE)
        self.eval()

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Logits of shape ``(batch, seq, vocab)`` for ``inputs["input_ids"]``."""
        h = self.embed(inputs["input_ids"])
        for layer in self.hidden:
            h = F.gelu(layer(h))
        out: Tensor = self.out(h)
        return out

    def blocks(self) -> dict[str, tuple[str, ...]]:
        """Block name -> the parameter tensors it holds (``embed``, ``fc1`` …, ``out``)."""
        named = {"embed": self.embed, **{f"fc{i + 1}": m for i, m in enumerate(self.hidden)}, "out": self.out}
        prefix = {"embed": "embed", "out": "out", **{f"fc{i + 1}": f"hidden.{i}" for i in range(len(self.hidden))}}
        return {b: tuple(f"{prefix[b]}.{n}" for n, _ in m.named_parameters()) for b, m in named.items()}


def _train(model: nn.Module, data: Sequence[tuple[dict[str, Tensor], Tensor]], steps: int, lr: float) -> list[float]:
    """``steps`` full-batch Adam steps on the mean causal-LM cross-entropy over ``data``; the losses before each."""
    loss_fn = CausalLMLoss()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.stack([loss_fn(model(x), y) for x, y in data]).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# --------------------------------------------------------------------------------------------------------------
# Normalised densities and JS distances
# --------------------------------------------------------------------------------------------------------------


def normalised_density(sd: SpectralDensity, grid: Tensor, width: float) -> tuple[Tensor, float]:
    r"""The SLQ density of ``sd`` on the normalised axis ``t = λ / r`` (``r = max |θ|``) and ``r``.

    .. math:: \phi(t) = \sum_{p,i} \tau^{(p)}_i\, \mathcal N(t;\ \theta^{(p)}_i / r,\ s^2)

    (module docstring; padded nodes carry weight 0). ``r`` is floored at 1e-300 so a zero block gives a spike at 0.
    """
    r = max(float(sd.nodes.abs().max()), 1e-300)
    diff = (grid[:, None] - (sd.nodes / r).reshape(1, -1)) / width
    kern = torch.exp(-0.5 * diff**2) / (width * math.sqrt(2 * math.pi))
    return (kern * sd.weights.reshape(1, -1)).sum(dim=1), r


def js_matrix(densities: Tensor) -> Tensor:
    r"""Pairwise Jensen–Shannon divergences (nats, in ``[0, ln 2]``) between the rows of ``densities``.

    Each row is normalised to unit mass on the grid; ``JS(P, Q) = ½ KL(P‖M) + ½ KL(Q‖M)``, ``M = (P + Q)/2``, with
    ``0 log 0 = 0`` (module docstring).
    """
    P = densities.clamp_min(0)
    P = P / P.sum(dim=1, keepdim=True)
    A, B = P[:, None, :], P[None, :, :]
    M = 0.5 * (A + B)
    kl_a = (torch.xlogy(A, A) - torch.xlogy(A, M)).sum(-1)
    kl_b = (torch.xlogy(B, B) - torch.xlogy(B, M)).sum(-1)
    js = 0.5 * (kl_a + kl_b)
    return 0.5 * (js + js.T)


def _case(names: list[str], sds: list[SpectralDensity], frob: list[float], grid: Tensor) -> dict[str, Any]:
    dens, radii = zip(*(normalised_density(sd, grid, KERNEL) for sd in sds), strict=True)
    D = torch.stack(list(dens))
    return {"names": names, "density": encode_array(D), "radius": list(radii), "frobenius": frob,
            "js": encode_array(js_matrix(D))}


def _transformer_blocks(n_layer: int, heads: int, blocks_layers: Sequence[int]) -> list[str]:
    names = ["embed", "pos_embed"]
    for i in blocks_layers:
        if i >= n_layer:
            continue
        names += [f"layer{i}.head{h}.{m}" for h in range(heads) for m in ("Q", "K", "V", "O")]
        names += [f"layer{i}.mlp", f"layer{i}.ln1", f"layer{i}.ln2"]
    return names


def _slq_frobenius(sd: SpectralDensity, n: int) -> float:
    r""":math:`\|A\|_F = \sqrt{\operatorname{tr} A^2}` from the SLQ quadrature, ``tr A² ≈ n Σ τ θ²`` (no products)."""
    return math.sqrt(max(n * sd.quadrature(lambda x: x**2), 0.0))


def _transformer_case(model: nn.Module, data: Any, names: list[str], probes: int, steps: int, seed: int,
                      grid: Tensor) -> dict[str, Any]:
    """Exact ``‖H_bb‖_F`` for blocks up to ``exact_max`` entries (dense, already formed for the SLQ), else the
    SLQ quadrature estimate.
    """
    bc = BlockCurvature(model, data, cache=True)
    g = torch.Generator().manual_seed(seed)
    sds, frob = [], []
    for name in names:
        sds.append(bc.density(name, num_probes=probes, num_steps=steps, generator=g))
        n = bc.operator(name).shape[1]
        frob.append(float(bc.frobenius(name).value) if n <= bc.exact_max else _slq_frobenius(sds[-1], n))
    return _case(names, sds, frob, grid)


def _mlp_case(mlp: TokenMLP, data: Any, probes: int, steps: int, seed: int, grid: Tensor) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    sds, frob = [], []
    for tensors in mlp.blocks().values():
        op = HessianOperator(mlp, CausalLMLoss(), list(tensors), data, reduction="mean",
                             batch_size_fn=count_targets("causal-lm"), cache=True)
        sds.append(slq_density(op, probes, min(steps, op.shape[1]), generator=g))
        frob.append(_slq_frobenius(sds[-1], op.shape[1]))
    return _case(list(mlp.blocks()), sds, frob, grid)


# --------------------------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------------------------


@figure(
    "zhang2024-blockwise-spectra",
    description="Zhang et al. 2024: SLQ spectra of Hessian blocks (embeddings, per-head Q/K/V/O, MLP, LayerNorm) of "
    "a GPT-2-shaped model vs an MLP, and their pairwise Jensen–Shannon distances.",
    claim=(
        "Transformers are block-heterogeneous: the spectral densities of their Hessian blocks differ much more "
        "(larger pairwise JS distance) than those of an MLP's layer blocks, at initialisation and during training "
        "(Zhang et al. 2024, Figs 2-3)."
    ),
    caption=lambda d: (
        f"Top: SLQ spectral densities ({d['probes']} probes × {d['steps']} Lanczos steps, Gaussian kernel "
        f"s = {KERNEL} on the normalised axis λ / max|λ|) of diagonal blocks of the loss Hessian of a GPT-2-shaped "
        f"model (d = {d['d']}, {d['n_layer']} layers, {d['n_head']} heads, vocabulary {d['vocab']}) and of an "
        f"MLP of the same widths ({d['mlp_hidden']} GELU layers) on the same next-token task (a random Markov chain, "
        f"16 successors per token; {d['n_seq']} sequences of length {d['seq_len']}), at initialisation and after "
        f"{d['train_steps']} full-batch Adam steps (lr {d['lr']}). Bottom: pairwise Jensen–Shannon divergence "
        "(nats) between the block densities. Float64; Hessian products by the library's block operators "
        "(energy.hessian.hf_blocks)."
    ),
    paper_seed=0,
    single_thread=True,
    options=("gpt2",),
)
def compute_zhang_blockwise(cfg: FigureConfig) -> dict[str, Any]:
    """Block densities, radii, Frobenius norms and JS matrices of the four cases (:data:`CASES`)."""
    t0 = time.perf_counter()
    d = cfg.pick(tiny=8, quick=16, paper=768, key="d")
    n_layer = cfg.pick(tiny=1, quick=2, paper=12, key="n_layer")
    n_head = cfg.pick(tiny=2, quick=4, paper=12, key="n_head")
    vocab = cfg.pick(tiny=20, quick=50, paper=50257, key="vocab")
    n_seq = cfg.pick(tiny=4, quick=8, paper=32, key="n_seq")
    seq_len = cfg.pick(tiny=6, quick=12, paper=64, key="seq_len")
    heads_shown = cfg.pick(tiny=1, quick=4, paper=3, key="heads_shown")
    layers_shown = cfg.pick(tiny=(0,), quick=(0, 1), paper=(0, 11), key="layers_shown")
    probes = cfg.pick(tiny=2, quick=4, paper=10, key="probes")
    steps = cfg.pick(tiny=8, quick=30, paper=60, key="steps")
    train_steps = cfg.pick(tiny=5, quick=40, paper=200, key="train_steps")
    lr = 1e-2 if cfg.quick else 1e-3
    path = cfg.options.get("gpt2")
    preset = "local directory"
    if path is not None:  # a user's GPT-2 (pretrained when its directory has weights): its own sizes
        model = load_model(path, seed=cfg.seed)
        conf: Any = model.config
        d, n_layer, n_head, vocab = conf.n_embd, conf.n_layer, conf.n_head, conf.vocab_size
        seq_len = min(seq_len, conf.n_positions)
        layers_shown = tuple(sorted({0, n_layer - 1}))
    else:
        preset = "gpt2-small-shaped" if cfg.fidelity == "paper" else "gpt2-tiny"
        overrides: dict[str, Any] = {} if cfg.fidelity == "paper" else {
            "n_embd": d, "n_layer": n_layer, "n_head": n_head, "vocab_size": vocab, "n_positions": seq_len}
        model = build_model(preset, seed=cfg.seed, **overrides)
    tokens = markov_tokens(vocab, n_seq, seq_len, seed=cfg.seed + 1)
    data = token_batches(model, tokens, batch=max(1, n_seq // 2), seed=cfg.seed)
    grid = torch.linspace(-GRID_HALF, GRID_HALF, 241, dtype=DTYPE)
    names = _transformer_blocks(n_layer, min(heads_shown, n_head), layers_shown)
    mlp = TokenMLP(vocab, d, 4 * d, 2 * n_layer, seed=cfg.seed)

    cases: dict[str, Any] = {}
    timing: dict[str, float] = {}

    def timed(key: str, fn: Any, *args: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args)
        timing[key] = time.perf_counter() - t
        return out

    cases["transformer_init"] = timed("transformer_init", _transformer_case, model, data, names, probes, steps,
                                      cfg.seed, grid)
    cases["mlp_init"] = timed("mlp_init", _mlp_case, mlp, data, probes, steps, cfg.seed, grid)
    for p in model.parameters():
        p.requires_grad_(True)
    losses_t = timed("train_transformer", _train, LogitsModel(model), data, train_steps, lr)
    losses_m = timed("train_mlp", _train, mlp, data, train_steps, lr)
    cases["transformer_trained"] = timed("transformer_trained", _transformer_case, model, data, names, probes,
                                         steps, cfg.seed, grid)
    cases["mlp_trained"] = timed("mlp_trained", _mlp_case, mlp, data, probes, steps, cfg.seed, grid)
    return {
        "grid": encode_array(grid), "cases": {c: cases[c] for c in CASES},
        "loss_transformer": losses_t, "loss_mlp": losses_m,
        "model": str(path) if path is not None else preset,
        "d": d, "n_layer": n_layer, "n_head": n_head, "vocab": vocab, "n_seq": n_seq, "seq_len": seq_len,
        "mlp_hidden": 2 * n_layer, "probes": probes, "steps": steps, "train_steps": train_steps, "lr": lr,
        "n_params_transformer": sum(p.numel() for p in model.parameters()),
        "n_params_mlp": sum(p.numel() for p in mlp.parameters()),
        "seconds": time.perf_counter() - t0, "timing": timing,
    }


def _offdiag(js: np.ndarray) -> np.ndarray:
    return js[~np.eye(js.shape[0], dtype=bool)]


def _colour(name: str) -> str:
    for key, col in (("embed", "tab:purple"), (".Q", "tab:blue"), (".K", "tab:cyan"), (".V", "tab:green"),
                     (".O", "tab:olive"), ("mlp", "tab:red"), ("ln", "tab:orange"), ("fc", "tab:red"),
                     ("out", "tab:brown")):
        if key in name:
            return col
    return "tab:gray"


@compute_zhang_blockwise.plot
def plot_zhang_blockwise(data: dict, cfg: FigureConfig) -> Figure:
    """Densities (top) and JS heat maps (bottom) of the four cases."""
    grid = decode_array(data["grid"])
    fig = Figure(figsize=(17, 8), layout="constrained")
    axes = fig.subplots(2, len(CASES))
    vmax = max(float(decode_array(data["cases"][c]["js"]).max()) for c in CASES) or math.log(2)
    im = None
    for k, case in enumerate(CASES):
        c = data["cases"][case]
        D, js = decode_array(c["density"]), decode_array(c["js"])
        ax = axes[0, k]
        seen: set[str] = set()
        for name, row in zip(c["names"], D, strict=True):
            col = _colour(name)
            label = name.rsplit(".", 1)[-1] if name.startswith("layer") else name
            ax.plot(grid, np.maximum(row, 1e-6), color=col, lw=0.9, alpha=0.8,
                    label=None if label in seen else label)
            seen.add(label)
        ax.set_yscale("log")
        ax.set_ylim(1e-4, None)
        ax.set_xlabel("λ / max|λ| (per block)")
        ax.set_title(f"{_CASE_LABEL[case]}: mean JS {_offdiag(js).mean():.3f}")
        ax.legend(fontsize=6, ncol=2)
        ax = axes[1, k]
        im = ax.imshow(js, cmap="viridis", vmin=0, vmax=vmax)
        short = [n.replace("layer", "L").replace(".head", ".h") for n in c["names"]]
        ax.set_xticks(range(len(short)), short, rotation=90, fontsize=5)
        ax.set_yticks(range(len(short)), short, fontsize=5)
    axes[0, 0].set_ylabel("SLQ density")
    if im is not None:
        fig.colorbar(im, ax=axes[1, :].tolist(), label="JS divergence (nats; ln 2 = disjoint)")
    return fig


@compute_zhang_blockwise.summary
def summarize_zhang_blockwise(data: dict) -> dict:
    """Mean and max off-diagonal JS per case, the Transformer/MLP ratios, and the block Frobenius norm spread."""
    out: dict[str, Any] = {}
    mean = {}
    for case in CASES:
        c = data["cases"][case]
        off = _offdiag(decode_array(c["js"]))
        mean[case] = float(off.mean())
        out[f"{case}.mean_js"] = measured(mean[case], note="mean pairwise JS divergence (nats) between block densities")
        out[f"{case}.max_js"] = measured(float(off.max()), note="max pairwise JS divergence (nats)")
        frob = np.asarray(c["frobenius"], dtype=float)
        hi, lo = int(frob.argmax()), int(frob.argmin())
        out[f"{case}.frobenius_max_over_min"] = measured(
            float(frob[hi] / max(frob[lo], 1e-300)),
            note=f"spread of the block norms ‖H_bb‖_F: largest {c['names'][hi]} = {frob[hi]:.3g}, smallest "
            f"{c['names'][lo]} = {frob[lo]:.3g} (all norms in the data)")
    for stage in ("init", "trained"):
        t, m = mean[f"transformer_{stage}"], mean[f"mlp_{stage}"]
        out[f"{stage}.transformer_over_mlp"] = measured(
            t / max(m, 1e-300), target="> 1", matches=t > m,
            note="mean JS (Transformer) / mean JS (MLP); Zhang et al.: Transformer blocks are heterogeneous")
    uniform = f"training loss before the last Adam step (uniform guess: ln V = {math.log(data['vocab']):.2f})"
    out["final_loss_transformer"] = measured(data["loss_transformer"][-1] if data["loss_transformer"] else None,
                                             note=uniform)
    out["final_loss_mlp"] = measured(data["loss_mlp"][-1] if data["loss_mlp"] else None, note=uniform)
    return out
