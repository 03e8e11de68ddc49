r"""Yang, Huang & Wipf (NeurIPS 2022), figures 5-6: the energy of a weight-tied unfolded model against depth.

The model (MATH §1.6, §1.8; :func:`unfold.presets.yang2022`): 12 weight-tied layers, each an attention step (a) with
``α = 1``, :math:`Y \leftarrow \mathrm{softmax}_\beta(Y W Y^\top) Y` (``W = M Mᵀ/√k``), an FFN step with ``α = 1``
and ``W_f`` constrained to the spectrum ``[0, 0.95]``, :math:`Y \leftarrow -Y W_f + 1 b^\top`, and optionally a ReLU
projection. The energy ``E = E_att + E_ffn`` is recorded at the layer boundaries ``t = 0 … 12`` by the unroller's
trace (:meth:`unfold.unroller.Unrolled.forward` with ``trace=True``), which builds the energies from the same
constrained weights, hence the same metric, as the steps.

- ``yang2022-energy-untrained``: freshly initialised models, without and with the ReLU projection (the same
  initial weights; the ReLU model really has the ReLU — the authors' "ReLU" panel had none).
- ``yang2022-energy-trained``: the ReLU model after training with a per-sequence cross-entropy (mean-pool + linear
  head), beside the same model at its initialisation.

Initialisation (the paper fixes the model and the protocol, not the initialisation). The untrained figure uses the
preset's own initialisation. The trained figure uses :func:`unfold.presets.init_signal_preserving_` (``W_f``
spectrum uniform in ``[0.85, 0.95]``, ``b = 1``, input map ``N(0, 1)``), because with the preset's initialisation
the 12 tied ``α = 1`` layers forget the input (measured and reported by the figure itself, digits, ``d = 32``:
the input-dependent part of the pooled state shrinks by ``≈ 10⁻⁵``; the gradients of ``M``, ``W_f`` and the input
map are ``10⁻⁸ … 10⁻⁵`` against ``0.3 … 1`` for ``b`` and the head; trained with the paper's protocol that model
stays at chance and maps every input to the same state). The figure trains both and reports both, plus the same
protocol without the body (mean-pooled input map + head) as the reference for what 2000 SGD steps at lr 1e-2,
batch 1 can reach on the data. Each part of the initialisation was needed in a one-at-a-time check (digits,
``d = 32``, seed 2333, 2000 steps; test accuracy with all three: 0.37): ``b = 0`` gives a signal gain of
``3·10⁻¹⁸`` and chance accuracy (0.10); the default input map (kaiming-uniform, std 0.2) keeps a gain of 0.24 but
the features are too small for the head to learn at lr 1e-2 in 2000 steps (0.10); a ``W_f`` band ``[0, 0.95]``
gives a gain of 0.035 and 0.23; ``b = 0.5`` gives 0.29.

Data. With ``--imdb``/``--sst2`` and ``--glove`` the paper's setting runs: GloVe vectors of IMDB reviews (IMDB curves)
and of SST-2 sentences (SST-2 curves; the authors evaluated their SST-2 curves on IMDB sentences). Without them:

- untrained: the English dataset descriptions that ship with scikit-learn (``sklearn/datasets/descr/*.rst``; split
  into sentences by :func:`bundled_text_sentences`), embedded with a seeded Gaussian table
  (:func:`unfold.data.seeded_embedding_table`, entries ``N(0, 1/d)``) over their vocabulary;
- trained: scikit-learn's bundled handwritten digits as sequences of 8 row tokens with 8 pixels
  (:func:`unfold.data.load_digits_sequences`), through a learned linear input map to width ``d``.

Sequences have different lengths; they are run in buckets of equal length (no padding, so no padding token ever
enters the attention). ``E_min`` is the minimum of each sequence's own energies over ``t = 0 … 12`` (the paper does
not say which minimum it subtracts).

Defects of the authors' code that are not reproduced (MATH §1.8): different metrics in energy and forward pass;
``β`` computed but unused; the untrained "ReLU" model without ReLU; SST-2 curves evaluated on IMDB sentences; a
training loss that flattens all token logits of a batch into one softmax; the FFN weight normaliser squaring the
matrix on every call (here: a spectrum-clip parametrisation, :class:`unfold.parametrizations.SpectrumClip`).
"""
import functools
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from paper_figs.registry import FigureConfig, figure, measured, single_thread
from paper_figs.yang2022_text_data import (
    BUNDLED_TEXT_PACKAGE,
    TextSet,
    bundled_text_sentences,
    labels_of,
    text_sets,
    training_sets,
)
from paper_figs.yang2022_text_model import (
    DEPTH,
    GRAD_GROUPS,
    INIT_CHOICES,
    LR,
    MeanPoolLinear,
    classification_accuracy,
    gradient_norms,
    layer_energies,
    layer_spreads,
    layer_summary,
    make_model,
    pooled_features,
    representation_spread,
    train_classifier,
)
from unfold.presets import UnrolledClassifier

# The data and model helpers live in paper_figs.yang2022_text_data / _model; they are re-exported here, where the
# figures that use them are registered.
__all__ = [
    "BUNDLED_TEXT_PACKAGE",
    "DEPTH",
    "LR",
    "TextSet",
    "bundled_text_sentences",
    "text_sets",
    "training_sets",
    "layer_energies",
    "make_model",
    "train_classifier",
    "classification_accuracy",
    "pooled_features",
    "representation_spread",
    "layer_spreads",
    "gradient_norms",
    "GRAD_GROUPS",
    "MeanPoolLinear",
    "INIT_CHOICES",
    "layer_summary",
    "single_thread",
    "compute_energy_untrained",
    "compute_energy_trained",
]


#: What the two text figures register alike: the paper's seed, the data options (the paper's setting when given) and
#: one torch thread (thousands of small operations; see :func:`paper_figs.registry.single_thread`).
_text_figure = functools.partial(figure, paper_seed=2333, options=("imdb", "sst2", "glove"), single_thread=True)


# ----------------------------------------------------------------------------------------------------------------------
# plotting helpers
# ----------------------------------------------------------------------------------------------------------------------


def _panel(ax: Any, gap: np.ndarray, title: str, reference: np.ndarray | None = None) -> None:
    """Box plots (no fliers) of ``E(Yᵗ) − E_min`` per layer, the mean line, on a symlog axis."""
    t = np.arange(gap.shape[1])
    ax.boxplot([gap[:, k] for k in t], positions=t, showfliers=False, widths=0.5,
               medianprops={"color": "C1"}, boxprops={"color": "0.35"}, whiskerprops={"color": "0.35"},
               capprops={"color": "0.35"})
    ax.plot(t, gap.mean(axis=0), "o-", color="C0", ms=3, lw=1.4, label="mean")
    if reference is not None:
        ax.plot(t, reference, "s--", color="0.5", ms=2.5, lw=1, label="mean at initialisation")
    positive = gap[gap > 0]
    lin = float(np.quantile(positive, 0.05)) if positive.size else 1.0
    ax.set_yscale("symlog", linthresh=max(lin, 1e-12))
    ax.set_xticks(t)
    ax.set_xlabel("layer t")
    ax.set_ylabel(r"$E(Y^t) - E_{\min}$")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def _stats_record(E_total: np.ndarray, terms: dict[str, np.ndarray]) -> dict[str, Any]:
    rec = layer_summary(E_total)
    rec["mean_terms"] = {k: v.mean(axis=0) for k, v in terms.items()}
    return rec


# ----------------------------------------------------------------------------------------------------------------------
# yang2022-energy-untrained
# ----------------------------------------------------------------------------------------------------------------------


def _caption_untrained(data: dict) -> str:
    sets = "; ".join(f"{s['name']}: {s['description']}" for s in data["sets"])
    return (
        "Energy E = E_att + E_ffn of a freshly initialised 12-layer weight-tied unfolded Transformer (Yang et al. "
        "2022, Fig 5/6 protocol; attention step (a) with alpha = 1, i.e. softmax_beta(Y W Y^T) Y, W = M M^T/sqrt(k); "
        f"FFN step with alpha = 1 and W_f spectrum clipped to [0, 0.95]; d = {data['d']}), without (left) and with "
        "(right) the ReLU projection after the FFN step, the same initial weights (seed "
        f"{data['seed']}). Box plots (no fliers) of E(Y^t) - E_min per layer t over the sequences, E_min = minimum of "
        "each sequence's own energies over t; line: mean. Energies from the unroller's trace (same metric in energy "
        f"and step). Data: {sets}."
        + ("" if data["paper_setting"] else
           " Offline stand-in: IMDB/SST-2 and GloVe are not available, so the protocol runs on real English text "
           "bundled with scikit-learn and random (seeded) word vectors; pass --imdb/--sst2 and --glove for the "
           "paper's setting.")
    )


@_text_figure(
    "yang2022-energy-untrained",
    description="Yang et al. 2022 Fig 5/6: energy E_att + E_ffn vs layer, fresh weight-tied model, w/o and w/ ReLU.",
    claim=(
        "An unfolded Transformer whose layers are descent steps on E_att and E_ffn lowers the total energy with depth "
        "on average (MATH §1.6, §1.8); each step descends its own term only, so the sum need not be monotone."
    ),
    caption=_caption_untrained,
    version=4,
)
def compute_energy_untrained(cfg: FigureConfig) -> dict[str, Any]:
    """Energies against depth of fresh models, without and with ReLU, on every evaluation set."""
    # --quick runs the full protocol too (about 10 s of CPU time)
    d = cfg.pick(tiny=16, quick=300, paper=300, key="d")
    n = cfg.pick(tiny=6, quick=200, paper=200, key="n_sequences")
    max_len = cfg.pick(tiny=10, quick=64, paper=64, key="max_len")
    sets = text_sets(cfg, d=d, n=n, max_len=max_len)
    if cfg.options.get("glove") is not None:
        d = sets[0].sequences[0].shape[1]  # GloVe fixes the width
    panels = []
    for ts in sets:
        for relu in (False, True):
            model = make_model(d, relu=relu, seed=cfg.seed).double()
            E = layer_energies(model, ts.sequences)
            rec = _stats_record(E["total"], {k: v for k, v in E.items() if k != "total"})
            with torch.no_grad():
                Y0_pooled = torch.stack([s.mean(0) for s in ts.sequences])
            spreads = {"pooled_spread_output": representation_spread(pooled_features(model, ts.sequences)),
                       "pooled_spread_input": representation_spread(Y0_pooled)}
            panels.append({"set": ts.name, "relu": relu, **rec, **spreads})
    return {
        "d": d, "depth": DEPTH, "seed": cfg.seed, "max_len": max_len,
        "paper_setting": cfg.options.get("glove") is not None,
        "sets": [{"name": s.name, "description": s.description, "n": len(s.sequences),
                  "lengths": [int(x.shape[0]) for x in s.sequences]} for s in sets],
        "panels": panels,
    }


@compute_energy_untrained.plot
def plot_energy_untrained(data: dict, cfg: FigureConfig) -> Figure:
    names = [s["name"] for s in data["sets"]]
    fig = Figure(figsize=(11, 3.8 * len(names)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(names), 2, squeeze=False))
    for p in data["panels"]:
        ax = axes[names.index(p["set"]), int(p["relu"])]
        title = (f"{p['set']}, {'with' if p['relu'] else 'without'} ReLU: mean decreases at "
                 f"{p['n_layers_mean_decreases']}/{p['n_layers']} layers")
        _panel(ax, np.asarray(p["gap"]), title)
    fig.suptitle(f"Yang et al. 2022, Fig 5/6 (protocol): energy vs layer, untrained, d = {data['d']}")
    return fig


def _summary_panels(panels: list[dict], prefix: str = "") -> dict[str, Any]:
    out = {}
    for p in panels:
        key = f"{prefix}{p['set']}_{'relu' if p['relu'] else 'norelu'}"
        out[f"{key}_frac_layers_mean_decreases"] = measured(
            p["n_layers_mean_decreases"] / p["n_layers"],
            note=(f"{p['n_layers_mean_decreases']} of {p['n_layers']} layers t -> t+1 lowered the mean energy over "
                  "sequences (no target: reported as is)"),
        )
        out[f"{key}_mean_E_final_below_initial"] = measured(
            bool(p["mean_E"][-1] < p["mean_E"][0]), target=True,
            note="the paper's expectation: energy decreasing in depth on average (mean E(Y^12) < mean E(Y^0))",
        )
        out[f"{key}_mean_monotone"] = measured(p["mean_monotone"], note="mean energy non-increasing at every layer")
        out[f"{key}_frac_sequences_monotone"] = measured(
            p["frac_sequences_monotone"], note="share of sequences whose own energy never increased over the layers"
        )
        if "pooled_spread_output" in p:
            out[f"{key}_pooled_spread_output_vs_input"] = measured(
                [p["pooled_spread_output"], p["pooled_spread_input"]],
                note="‖P − mean‖_F / (√N ‖mean‖) of the mean-pooled tokens after layer 12 vs at Y^0 (0: every input "
                     "ends in the same state)",
            )
    return out


@compute_energy_untrained.summary
def summarize_energy_untrained(data: dict) -> dict[str, Any]:
    return _summary_panels(data["panels"])


# ----------------------------------------------------------------------------------------------------------------------
# yang2022-energy-trained
# ----------------------------------------------------------------------------------------------------------------------



def _caption_trained(data: dict) -> str:
    def run_text(r: dict) -> str:
        pre, sig = r["preset_init"], r["signal_init"]
        return (
            f"{r['set']}: trained on {r['train_description']}, energies on {r['eval_description']}. Test accuracy "
            f"{r['acc_before']:.3f} before / {r['acc_after']:.3f} after training (chance {1 / r['n_classes']:.3f}); "
            f"the same protocol without the body (mean-pooled input map + head) reaches {r['acc_reference']:.3f}. "
            f"Why the initialisation matters (measured, right panel): with the preset's initialisation the "
            f"input-dependent part of the pooled state shrinks by a factor {pre['gain']:.1e} over the 12 layers "
            f"(tokens of a sequence merged: relative token spread {pre['tokens'][0]:.2f} -> {pre['tokens'][2]:.1e} "
            f"after 2 layers), and the gradients at initialisation are {pre['grad_norms']['M']:.1e} (M), "
            f"{pre['grad_norms']['W_f']:.1e} (W_f), {pre['grad_norms']['input map']:.1e} (input map) against "
            f"{pre['grad_norms']['b']:.1e} (b), {pre['grad_norms']['head']:.1e} (head): SGD moves b and the head "
            "only; trained with the same protocol, that model ends at test accuracy "
            f"{pre['acc_after']:.3f} (last-10% loss {pre['loss_last_tenth']:.3f}) with pooled-output spread "
            f"{pre['pooled_spread_after']:.1e} (0: every input is mapped to the same state). With the "
            f"initialisation used here the factor is {sig['gain']:.2f} (gradients M {sig['grad_norms']['M']:.1e}, "
            f"W_f {sig['grad_norms']['W_f']:.1e}, input map {sig['grad_norms']['input map']:.1e}); the tokens still "
            f"merge (token spread after 12 layers {sig['tokens'][-1]:.1e}): step (a) with alpha = 1 is a convex "
            "combination of the tokens and the FFN + ReLU map is a contraction, so with tied weights no layer can "
            "separate them again. Train loss (mean of the first / last 10% of steps) "
            f"{r['loss_first_tenth']:.3f} / {r['loss_last_tenth']:.3f}"
        )

    runs = "; ".join(run_text(r) for r in data["runs"])
    return (
        "Energy E = E_att + E_ffn against layer t of the 12-layer weight-tied unfolded Transformer with ReLU "
        f"(Yang et al. 2022, Fig 5/6 protocol; d = {data['d']}) after {data['steps']} SGD steps (lr {data['lr']}, "
        "batch 1) of the per-sequence cross-entropy of a mean-pool + linear head (not the authors' flattened "
        "token softmax). Left: box plots (no fliers) of E(Y^t) - E_min, E_min = each sequence's minimum over t; "
        "solid: mean after training; dashed: mean of the same model at its initialisation. Right: spread of the "
        "states per layer. Energies from the unroller's trace on the body's input Y^0 (after the input map when "
        "there is one). Initialisation (not fixed by the paper; unfold.presets.init_signal_preserving_): W_f's "
        "unconstrained original Q diag(lambda) Q^T, Q Haar-orthogonal, lambda ~ U[0.85, 0.95] (inside the clip band "
        "[0, 0.95]: 12 tied layers pass lambda^12 of each eigen-direction, 0.95^12 = 0.54), FFN bias b = 1, input "
        "map entries N(0, 1) (when there is an input map); M keeps the preset's N(0, (kd)^(-1/2)) entries. Model "
        f"structure, alpha = 1, constraints, optimiser, lr and batch size as in the paper. {runs}."
        + ("" if data["paper_setting"] else
           " Offline stand-in for IMDB/SST-2 + GloVe: scikit-learn's bundled digits as sequences of 8 row tokens "
           "(no positional features).")
    )


def _init_diagnosis(model: UnrolledClassifier, eval_set: TextSet, probe: tuple[list[Tensor], Tensor]) -> dict:
    """Per-layer spreads, the signal gain over the body and the gradient norms of ``model`` (in float64)."""
    spreads = layer_spreads(model, eval_set.sequences)
    return {"tokens": spreads["tokens"], "pooled": spreads["pooled"],
            "gain": float(spreads["pooled"][-1] / spreads["pooled"][0]),
            "grad_norms": gradient_norms(model, *probe)}


@_text_figure(
    "yang2022-energy-trained",
    description="Yang et al. 2022 Fig 5/6: energy vs layer of the weight-tied ReLU model after training.",
    claim=(
        "After training (the layers stay descent steps of their energy terms; the weights only move within the "
        "constraints), the energy still decreases with depth on average (MATH §1.8)."
    ),
    caption=_caption_trained,
    version=5,
)
def compute_energy_trained(cfg: FigureConfig) -> dict[str, Any]:
    """Train the ReLU model (preset and signal-preserving initialisations) and record energies before and after."""
    # --quick: the paper's 2000 steps at a smaller width; two models trained (about 50 s on the 2-core machine)
    d = cfg.pick(tiny=8, quick=32, paper=300, key="d")
    steps = cfg.pick(tiny=20, quick=2000, paper=2000, key="steps")
    n_eval = cfg.pick(tiny=8, quick=200, paper=200, key="n_sequences")
    n_probe = cfg.pick(tiny=4, quick=50, paper=50, key="n_probe")
    max_len = cfg.pick(tiny=10, quick=40, paper=64, key="max_len")
    runs = []
    for train_set, eval_set in training_sets(cfg, steps=steps, n_eval=n_eval, max_len=max_len):
        train_labels, eval_labels = labels_of(train_set), labels_of(eval_set)
        d_in = train_set.sequences[0].shape[1]
        if cfg.options.get("glove") is not None:
            d = d_in  # the paper feeds the GloVe vectors directly
        n_classes = int(torch.cat([train_labels, eval_labels]).max()) + 1
        probe = ([s.to(torch.float64) for s in train_set.sequences[:n_probe]], train_labels[:n_probe])
        preset = make_model(d, relu=True, seed=cfg.seed, d_in=d_in, n_classes=n_classes, init="preset").double()
        preset_init = _init_diagnosis(preset, eval_set, probe)
        train_float = [s.float() for s in train_set.sequences]
        preset = preset.float()
        preset_history = train_classifier(preset, train_float, train_labels, steps=steps, seed=cfg.seed)
        preset = preset.double()
        preset_init["acc_after"] = classification_accuracy(preset, eval_set.sequences, eval_labels)
        preset_init["pooled_spread_after"] = representation_spread(pooled_features(preset, eval_set.sequences))
        preset_init["loss_last_tenth"] = float(np.mean(preset_history[-max(1, steps // 10):]))
        model = make_model(d, relu=True, seed=cfg.seed, d_in=d_in, n_classes=n_classes, init="signal").double()
        signal_init = _init_diagnosis(model, eval_set, probe)
        E0 = layer_energies(model, eval_set.sequences)
        acc_before = classification_accuracy(model, eval_set.sequences, eval_labels)
        spread_init = representation_spread(pooled_features(model, eval_set.sequences))
        model = model.float()
        history = train_classifier(model, train_float, train_labels, steps=steps, seed=cfg.seed)
        model = model.double()
        E = layer_energies(model, eval_set.sequences)
        acc_after = classification_accuracy(model, eval_set.sequences, eval_labels)
        spread = representation_spread(pooled_features(model, eval_set.sequences))
        after = layer_spreads(model, eval_set.sequences)
        with torch.no_grad():
            Y0_pooled = torch.stack([model.embed(s.to(torch.float64)).mean(0) for s in eval_set.sequences])
        input_spread = representation_spread(Y0_pooled)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            reference = MeanPoolLinear(d_in, d, n_classes)
        train_classifier(reference, train_float, train_labels, steps=steps, seed=cfg.seed)
        acc_reference = classification_accuracy(reference.double(), eval_set.sequences, eval_labels)
        rec = _stats_record(E["total"], {k: v for k, v in E.items() if k != "total"})
        init = layer_summary(E0["total"])
        k = max(1, len(history) // 10)
        runs.append({
            "set": train_set.name, "relu": True, "n_classes": n_classes, **rec,
            "init_mean_gap": init["mean_gap"], "init_n_layers_mean_decreases": init["n_layers_mean_decreases"],
            "acc_before": acc_before, "acc_after": acc_after, "acc_reference": acc_reference,
            "pooled_spread_output": spread, "pooled_spread_input": input_spread, "pooled_spread_init": spread_init,
            "preset_init": preset_init, "signal_init": signal_init,
            "trained": {"tokens": after["tokens"], "pooled": after["pooled"],
                        "gain": float(after["pooled"][-1] / after["pooled"][0])},
            "loss_first_tenth": float(np.mean(history[:k])), "loss_last_tenth": float(np.mean(history[-k:])),
            "train_description": train_set.description, "eval_description": eval_set.description,
        })
    return {"d": d, "depth": DEPTH, "steps": steps, "lr": LR, "seed": cfg.seed, "n_probe": n_probe,
            "paper_setting": cfg.options.get("glove") is not None, "runs": runs}


def _spread_panel(ax: Any, r: dict) -> None:
    """Per-layer spreads: pooled (absolute, solid) and tokens within a sequence (relative, dotted)."""
    t = np.arange(len(r["trained"]["pooled"]))
    for key, label, color in (("preset_init", "preset init", "C3"), ("signal_init", "init used", "C0"),
                              ("trained", "after training", "C2")):
        rec = r[key]
        ax.plot(t, np.maximum(rec["pooled"], 1e-300), "o-", ms=3, color=color, label=f"pooled, {label}")
        ax.plot(t, np.maximum(rec["tokens"], 1e-300), ":", color=color, label=f"tokens, {label}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-18)
    ax.set_xticks(t)
    ax.set_xlabel("layer t")
    ax.set_ylabel("spread")
    ax.set_title("pooled: ||P - mean||/sqrt(N); tokens: ||Y - 1 y_bar^T|| / ||Y||", fontsize=9)
    ax.legend(fontsize=7)


@compute_energy_trained.plot
def plot_energy_trained(data: dict, cfg: FigureConfig) -> Figure:
    runs = data["runs"]
    fig = Figure(figsize=(12, 4.4 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for (ax, ax_s), r in zip(axes, runs):
        title = (f"{r['set']}, ReLU, after {data['steps']} steps (acc {r['acc_after']:.2f}): mean decreases at "
                 f"{r['n_layers_mean_decreases']}/{r['n_layers']} layers")
        _panel(ax, np.asarray(r["gap"]), title, reference=np.asarray(r["init_mean_gap"]))
        _spread_panel(ax_s, r)
    fig.suptitle(f"Yang et al. 2022, Fig 5/6 (protocol): energy vs layer after training, d = {data['d']}")
    return fig


@compute_energy_trained.summary
def summarize_energy_trained(data: dict) -> dict[str, Any]:
    out = _summary_panels(data["runs"])
    for r in data["runs"]:
        out[f"{r['set']}_pooled_spread_at_initialisation"] = measured(
            r["pooled_spread_init"], note="the same spread of the pooled output before training"
        )
        out[f"{r['set']}_test_accuracy_after"] = measured(
            r["acc_after"], note=f"test accuracy after training (before: {r['acc_before']:.3f}; chance: 1/classes)"
        )
        out[f"{r['set']}_test_accuracy_reference_no_body"] = measured(
            r["acc_reference"], note="same protocol, mean-pooled input map + head without the 12 layers"
        )
        out[f"{r['set']}_test_accuracy_preset_init_trained"] = measured(
            r["preset_init"]["acc_after"],
            note=(f"the same protocol from the preset's initialisation (pooled-output spread after training "
                  f"{r['preset_init']['pooled_spread_after']:.1e})"),
        )
        out[f"{r['set']}_signal_gain_preset_init_vs_used_init_vs_trained"] = measured(
            [r["preset_init"]["gain"], r["signal_init"]["gain"], r["trained"]["gain"]],
            note="input-dependent part of the pooled state after 12 layers / at Y^0 (absolute spreads)",
        )
        out[f"{r['set']}_grad_norms_at_init_preset_vs_used"] = measured(
            {"preset": r["preset_init"]["grad_norms"], "used": r["signal_init"]["grad_norms"]},
            note="mean per-sequence gradient norm per parameter group at initialisation",
        )
        out[f"{r['set']}_train_loss_first_last_tenth"] = measured(
            [r["loss_first_tenth"], r["loss_last_tenth"]], note="mean cross-entropy over the first / last 10% of steps"
        )
    return out
