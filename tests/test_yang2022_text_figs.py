"""Yang et al. 2022 figs 5/6 (MATH §1.8): energies vs depth, data paths (bundled and IMDB/SST-2/GloVe fixtures)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import randn

from energy._validation import EnergyInputError
from paper_figs import yang2022_text as yt
from paper_figs.registry import FigureConfig
from unfold.data import ShuffledBatches, tokenize


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _cfg(fidelity: str = "tiny", seed: int = 2333, **options) -> FigureConfig:
    opts = {k: options.get(k) for k in ("imdb", "sst2", "glove")}
    return FigureConfig(fidelity=fidelity, seed=seed, options=opts)


# ----------------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------------


def test_bundled_text_is_real_english_from_sklearn():
    import sklearn

    sentences, description = yt.bundled_text_sentences()
    assert len(sentences) >= 200  # enough for the paper's 200 sentences
    assert all(len(tokenize(s)) >= 5 for s in sentences)
    assert sklearn.__version__ in description and "sklearn/datasets/descr" in description
    text = " ".join(sentences).lower()
    assert "digits" in text and "iris" in text  # descriptions of bundled datasets
    assert not any(s.startswith("..") or "====" in s for s in sentences)  # no reStructuredText markup
    assert yt.bundled_text_sentences() == (sentences, description)  # deterministic


def _write_fixtures(root: Path) -> dict[str, Path]:
    """A tiny aclImdb folder, a GLUE SST-2 folder and a GloVe file whose words tell the data sets apart."""
    imdb = root / "aclImdb"
    reviews = {"pos": ["a great film , great acting", "the film was great fun"],
               "neg": ["a bad film with bad acting", "the film was bad <br /> bad"]}
    for split in ("train", "test"):
        for label, texts in reviews.items():
            (imdb / split / label).mkdir(parents=True)
            for i, t in enumerate(texts):
                (imdb / split / label / f"{i}_{7 if label == 'pos' else 2}.txt").write_text(t, encoding="utf-8")
    sst2 = root / "SST-2"
    sst2.mkdir()
    rows = ["sentence\tlabel", "wonderful story indeed\t1", "dull story sadly\t0", "wonderful plot twist\t1",
            "dull plot and dull story\t0"]
    for split in ("train", "dev"):
        (sst2 / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    # IMDB words have vectors with a positive first entry, SST-2 words a negative one
    imdb_words = ["a", "great", "film", ",", "acting", "the", "was", "fun", "bad", "with"]
    sst2_words = ["wonderful", "story", "indeed", "dull", "sadly", "plot", "twist", "and"]
    g = torch.Generator().manual_seed(5)
    lines = []
    for words, sign in ((imdb_words, 1.0), (sst2_words, -1.0)):
        for w in words:
            v = torch.randn(6, generator=g, dtype=torch.float64)
            v[0] = sign * (1.0 + v[0].abs())
            lines.append(w + " " + " ".join(f"{x:.6f}" for x in v.tolist()))
    glove = root / "glove.6d.txt"
    glove.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"imdb": imdb, "sst2": sst2, "glove": glove}


def test_text_sets_with_paths_use_each_datasets_own_sentences(tmp_path):
    paths = _write_fixtures(tmp_path)
    sets = yt.text_sets(_cfg(**paths), d=99, n=10, max_len=8)
    assert [s.name for s in sets] == ["imdb", "sst2"]
    for s, sign in zip(sets, (1.0, -1.0)):
        assert s.sequences and all(x.shape[1] == 6 for x in s.sequences)  # GloVe fixes the width
        # every token of the IMDB set is an IMDB word, every token of the SST-2 set an SST-2 word
        assert all(bool((sign * x[:, 0] > 0).all()) for x in s.sequences)
        assert set(s.labels.tolist()) == {0, 1}
    assert "IMDB test" in sets[0].description and "SST-2 dev" in sets[1].description


def test_text_options_need_glove(tmp_path):
    paths = _write_fixtures(tmp_path)
    with pytest.raises(EnergyInputError, match="--glove"):
        yt.text_sets(_cfg(imdb=paths["imdb"]), d=8, n=4, max_len=8)
    with pytest.raises(EnergyInputError, match="--imdb or --sst2"):
        yt.text_sets(_cfg(glove=paths["glove"]), d=8, n=4, max_len=8)


# ----------------------------------------------------------------------------------------------------------------------
# model and energies
# ----------------------------------------------------------------------------------------------------------------------


def test_models_with_and_without_relu_share_weights():
    a = yt.make_model(8, relu=False, seed=3)
    b = yt.make_model(8, relu=True, seed=3)
    assert b.body.step_kinds == ["attention", "ffn", "relu"] and a.body.step_kinds == ["attention", "ffn"]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    W_f = b.body.layers[0][1].W_f.detach().double()
    lam = torch.linalg.eigvalsh(W_f)
    assert float(lam.min()) >= -1e-6 and float(lam.max()) <= 0.95 + 1e-6


@pytest.mark.parametrize("init", yt.INIT_CHOICES)
def test_model_gradients_are_finite_after_sgd_steps(init):
    """Regression: the preset stores the clipped W_f as its original (eigenvalues tied at 0 and 0.95); the
    spectrum clip's tie-aware backward keeps every gradient finite."""
    model = yt.make_model(8, relu=True, seed=0, d_in=4, n_classes=3, init=init)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(1, 5, 4, generator=g)), torch.tensor([1])).backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        opt.step()


def test_make_model_inits():
    preset = yt.make_model(8, relu=True, seed=5, d_in=3, n_classes=2)
    signal = yt.make_model(8, relu=True, seed=5, d_in=3, n_classes=2, init="signal")
    torch.testing.assert_close(signal.body.layers[0][0].M, preset.body.layers[0][0].M, rtol=0, atol=0)
    ffn = signal.body.layers[0][1]
    lam = torch.linalg.eigvalsh(ffn.W_f.detach().double())
    assert float(lam.min()) >= 0.85 - 1e-6 and float(lam.max()) <= 0.95 + 1e-6
    assert torch.equal(ffn.b.detach(), torch.ones(8))
    with pytest.raises(EnergyInputError, match="init"):
        yt.make_model(8, relu=True, seed=5, init="xavier")


def test_layer_spreads_match_a_step_by_step_run(gen):
    model = yt.make_model(6, relu=True, seed=1, d_in=3, n_classes=2, init="signal").double()
    seqs = [randn(n, 3, gen=gen) for n in (4, 5, 4)]
    out = yt.layer_spreads(model, seqs)
    assert out["tokens"].shape == out["pooled"].shape == (yt.DEPTH + 1,)
    with torch.no_grad():
        states = [model.embed(X) for X in seqs]
        tokens, pooled = [], []
        for ell in range(yt.DEPTH + 1):
            if ell:
                for step in model.body.layer(ell - 1):
                    states = [step(Y) for Y in states]
            tokens.append(np.mean([float(torch.linalg.norm(Y - Y.mean(0)) / torch.linalg.norm(Y)) for Y in states]))
            P = torch.stack([Y.mean(0) for Y in states])
            pooled.append(float(torch.linalg.norm(P - P.mean(0)) / math.sqrt(len(seqs))))
    np.testing.assert_allclose(out["tokens"], tokens, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(out["pooled"], pooled, rtol=1e-9, atol=1e-14)


def test_gradient_norms_by_group(gen):
    model = yt.make_model(6, relu=True, seed=2, d_in=3, n_classes=4, init="signal").double()
    seqs = [randn(5, 3, gen=gen) for _ in range(3)]
    labels = torch.tensor([0, 3, 1])
    got = yt.gradient_norms(model, seqs, labels)
    assert set(got) == set(yt.GRAD_GROUPS)
    want = dict.fromkeys(yt.GRAD_GROUPS, 0.0)
    ffn = model.body.layers[0][1]
    for X, y in zip(seqs, labels):
        params = {"M": model.body.layers[0][0].M, "W_f": ffn.parametrizations.W_f.original, "b": ffn.b,
                  "input map": model.input_proj.weight, "head_w": model.head.weight, "head_b": model.head.bias}
        # M is a plain parameter here; W_f's gradient is the one of its unconstrained original
        grads = torch.autograd.grad(F.cross_entropy(model(X.unsqueeze(0)), y.reshape(1)), list(params.values()))
        g = dict(zip(params, grads))
        for k in ("M", "W_f", "b", "input map"):
            want[k] += float(g[k].norm()) / 3
        want["head"] += float(torch.sqrt(g["head_w"].pow(2).sum() + g["head_b"].pow(2).sum())) / 3
    for k in yt.GRAD_GROUPS:
        assert got[k] == pytest.approx(want[k], rel=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_classification_accuracy_of_any_model():
    seqs = [torch.tensor([[1.0, 0.0]] * 3), torch.tensor([[0.0, 1.0]] * 2), torch.tensor([[0.0, 1.0]] * 3)]
    ref = yt.MeanPoolLinear(2, 2, 2)  # widths agree: no input map
    assert isinstance(ref.input_proj, torch.nn.Identity)
    with torch.no_grad():
        ref.head.weight.copy_(torch.eye(2))
        ref.head.bias.zero_()
    assert yt.classification_accuracy(ref, seqs, torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)
    assert isinstance(yt.MeanPoolLinear(3, 5, 2).input_proj, torch.nn.Linear)


def _energies_by_hand(model, Y: torch.Tensor) -> list[float]:
    """E_att + E_ffn after every layer, stepping through the schedule with the step modules themselves."""
    body = model.body
    out = [float(body.energy(Y)["total"])]
    for ell in range(body.depth):
        for step in body.layer(ell):
            Y = step(Y)
        out.append(float(body.energy(Y, ell)["total"]))
    return out


@pytest.mark.parametrize("relu", [False, True])
def test_layer_energies_match_step_by_step_evaluation(gen, relu):
    model = yt.make_model(6, relu=relu, seed=int(gen.initial_seed())).double()
    seqs = [randn(n, 6, gen=gen) for n in (3, 5, 3, 4)]
    E = yt.layer_energies(model, seqs)
    assert set(E) == {"E_att", "E_ffn", "total"} and E["total"].shape == (4, yt.DEPTH + 1)
    np.testing.assert_allclose(E["total"], E["E_att"] + E["E_ffn"], rtol=1e-13, atol=1e-12)
    with torch.no_grad():
        for i, Y in enumerate(seqs):
            np.testing.assert_allclose(E["total"][i], _energies_by_hand(model, Y), rtol=1e-10, atol=1e-10)


def test_layer_summary_counts():
    E = np.array([[5.0, 4.0, 4.5, 3.0], [3.0, 2.0, 1.0, 0.5]])  # mean: 4, 3, 2.75, 1.75
    s = yt.layer_summary(E)
    assert s["n_layers"] == 3 and s["n_layers_mean_decreases"] == 3 and s["mean_monotone"]
    assert s["frac_sequences_monotone"] == 0.5 and s["frac_sequences_final_below_initial"] == 1.0
    np.testing.assert_allclose(s["gap"][0], [2.0, 1.0, 1.5, 0.0])
    E2 = np.array([[1.0, 2.0, 0.5]])
    assert yt.layer_summary(E2)["n_layers_mean_decreases"] == 1 and not yt.layer_summary(E2)["mean_monotone"]


def test_training_loss_is_per_sequence_cross_entropy():
    torch.manual_seed(0)
    model = yt.make_model(6, relu=True, seed=1, d_in=3, n_classes=4)
    seqs = [torch.randn(n, 3) for n in (2, 5, 3, 4)]
    labels = torch.tensor([0, 3, 2, 1])
    first = int(next(iter(ShuffledBatches(torch.arange(4), labels, 1, seed=7)))[0])
    with torch.no_grad():
        expected = float(F.cross_entropy(model(seqs[first].unsqueeze(0)), labels[first : first + 1]))
    history = yt.train_classifier(model, seqs, labels, steps=5, seed=7, progress=False)
    assert len(history) == 5 and np.isfinite(history).all()
    assert history[0] == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# the figures at tiny size
# ----------------------------------------------------------------------------------------------------------------------


def test_untrained_figure_offline():
    spec = yt.compute_energy_untrained
    data = spec(_cfg())
    assert not data["paper_setting"] and [s["name"] for s in data["sets"]] == ["bundled-text"]
    assert [p["relu"] for p in data["panels"]] == [False, True]
    for p in data["panels"]:
        gap = np.asarray(p["gap"])
        assert gap.shape == (data["sets"][0]["n"], yt.DEPTH + 1)
        assert (gap >= 0).all() and np.allclose(gap.min(axis=1), 0.0)
        assert 0 <= p["n_layers_mean_decreases"] <= p["n_layers"] == yt.DEPTH
    summary = spec.summarize(data)
    assert "bundled-text_relu_frac_layers_mean_decreases" in summary
    assert all(p["pooled_spread_input"] > 0 for p in data["panels"])
    assert "scikit-learn" in spec.caption_for(data) and "seeded" in spec.caption_for(data)
    fig = spec.plot_fn(data, _cfg())
    assert len(fig.axes) == 2


def test_untrained_figure_with_paths(tmp_path):
    paths = _write_fixtures(tmp_path)
    data = yt.compute_energy_untrained(_cfg(**paths))
    assert data["paper_setting"] and data["d"] == 6
    assert [(p["set"], p["relu"]) for p in data["panels"]] == [("imdb", False), ("imdb", True), ("sst2", False),
                                                                ("sst2", True)]
    assert "GloVe" in yt.compute_energy_untrained.caption_for(data)


def test_trained_figure_offline_digits():
    spec = yt.compute_energy_trained
    data = spec(_cfg())
    (run,) = data["runs"]
    assert run["set"] == "digits" and run["relu"]
    assert data["steps"] == 20 and np.isfinite([run["loss_first_tenth"], run["loss_last_tenth"]]).all()
    assert 0.0 <= run["acc_before"] <= 1.0 and 0.0 <= run["acc_after"] <= 1.0
    assert len(run["init_mean_gap"]) == len(run["mean_gap"]) == yt.DEPTH + 1
    assert "digits" in spec.caption_for(data)
    assert "digits_test_accuracy_after" in spec.summarize(data)
    assert run["pooled_spread_input"] > 0 and run["pooled_spread_output"] >= 0 and run["pooled_spread_init"] >= 0
    assert 0.0 <= run["acc_reference"] <= 1.0 and 0.0 <= run["preset_init"]["acc_after"] <= 1.0
    for key in ("preset_init", "signal_init", "trained"):
        assert len(run[key]["pooled"]) == len(run[key]["tokens"]) == yt.DEPTH + 1 and run[key]["gain"] >= 0
    assert set(run["signal_init"]["grad_norms"]) == set(yt.GRAD_GROUPS)
    summary = spec.summarize(data)
    assert {"digits_test_accuracy_reference_no_body", "digits_test_accuracy_preset_init_trained",
            "digits_signal_gain_preset_init_vs_used_init_vs_trained"} <= set(summary)
    assert "init_signal_preserving_" in spec.caption_for(data)
    assert len(spec.plot_fn(data, _cfg()).axes) == 2


def test_representation_spread():
    P = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    assert yt.representation_spread(P) == 0.0
    Q = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=torch.float64)  # mean (0, 1), deviations (±1, ∓1)
    assert yt.representation_spread(Q) == pytest.approx(math.sqrt(4.0) / (math.sqrt(2) * 1.0))


def test_trained_figure_with_paths(tmp_path):
    paths = _write_fixtures(tmp_path)
    data = yt.compute_energy_trained(_cfg(**paths))
    assert [r["set"] for r in data["runs"]] == ["imdb", "sst2"] and data["d"] == 6
    assert all("GloVe" in r["train_description"] for r in data["runs"])
    assert "IMDB train" in data["runs"][0]["train_description"] and "IMDB test" in data["runs"][0]["eval_description"]
