"""Zhang et al. 2024 blockwise spectra: the tiny run computes; its densities, JS matrices and norms are right."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from energy.hessian.hf import CausalLMLoss, LogitsModel, build_model, token_batches
from energy.hessian.krylov import slq_density
from paper_figs.io import decode_array, to_jsonable
from paper_figs.registry import REGISTRY, FigureConfig, load_figure_modules
from paper_figs.zhang2024 import (
    CASES,
    GRID_HALF,
    KERNEL,
    TokenMLP,
    _slq_frobenius,
    js_matrix,
    markov_tokens,
    normalised_density,
)

load_figure_modules()
NAME = "zhang2024-blockwise-spectra"


@pytest.fixture(scope="module")
def run() -> tuple[dict, dict]:
    spec = REGISTRY[NAME]
    data = spec(FigureConfig(fidelity="tiny", seed=0))
    return data, spec.summary_fn(data)  # type: ignore[misc]


def test_tiny_run_has_every_case_and_summary_key(run: tuple[dict, dict]) -> None:
    data, summary = run
    assert list(data["cases"]) == list(CASES)
    for case in CASES:
        c = data["cases"][case]
        n = len(c["names"])
        assert decode_array(c["density"]).shape == (n, decode_array(data["grid"]).shape[0])
        assert decode_array(c["js"]).shape == (n, n)
        assert len(c["radius"]) == len(c["frobenius"]) == n
        assert all(r > 0 for r in c["radius"]) and all(f > 0 for f in c["frobenius"])
        for stat in ("mean_js", "max_js", "frobenius_max_over_min"):
            assert math.isfinite(summary[f"{case}.{stat}"]["value"])
    assert {"init.transformer_over_mlp", "trained.transformer_over_mlp", "final_loss_transformer",
            "final_loss_mlp"} <= set(summary)
    names = data["cases"]["transformer_init"]["names"]
    assert {"embed", "pos_embed", "layer0.head0.Q", "layer0.head0.K", "layer0.head0.V", "layer0.head0.O",
            "layer0.mlp", "layer0.ln1", "layer0.ln2"} <= set(names)
    assert data["cases"]["mlp_init"]["names"] == ["embed", "fc1", "fc2", "out"]
    # Adam lowers the training loss of both models
    assert data["loss_transformer"][-1] < data["loss_transformer"][0]
    assert data["loss_mlp"][-1] < data["loss_mlp"][0]


def test_densities_integrate_to_one(run: tuple[dict, dict]) -> None:
    data, _ = run
    grid = decode_array(data["grid"])
    for case in CASES:
        for row in decode_array(data["cases"][case]["density"]):
            assert np.trapezoid(row, grid) == pytest.approx(1.0, abs=1e-6)
            assert (row >= 0).all()


def test_js_matrices_are_divergences(run: tuple[dict, dict]) -> None:
    data, summary = run
    for case in CASES:
        js = decode_array(data["cases"][case]["js"])
        np.testing.assert_allclose(js, js.T, rtol=0, atol=1e-15)
        np.testing.assert_allclose(np.diag(js), 0.0, atol=1e-12)
        assert js.min() >= -1e-15 and js.max() <= math.log(2) + 1e-12
        off = js[~np.eye(len(js), dtype=bool)]
        assert summary[f"{case}.mean_js"]["value"] == pytest.approx(off.mean(), rel=1e-12)
        assert summary[f"{case}.max_js"]["value"] == pytest.approx(off.max(), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_js_matrix_matches_scipy(seed: int) -> None:
    """Independent twin: scipy's Jensen–Shannon *distance* is the square root of the divergence (natural log)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.rand(5, 37, generator=g, dtype=torch.float64) ** 3
    D[1, :20] = 0.0  # zero entries: 0 log 0 = 0
    js = js_matrix(D).numpy()
    for i in range(5):
        for j in range(5):
            ref = jensenshannon(D[i].numpy(), D[j].numpy()) ** 2
            assert js[i, j] == pytest.approx(ref, rel=1e-10, abs=1e-15)
    disjoint = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]], dtype=torch.float64)
    assert float(js_matrix(disjoint)[0, 1]) == pytest.approx(math.log(2), rel=1e-12)


@pytest.mark.parametrize(("n", "seed"), [(7, 0), (12, 1), (30, 2)])
def test_normalised_density_and_slq_frobenius(n: int, seed: int) -> None:
    """On a diagonal matrix the normalised Rademacher probes give ``vᵀA²v = ‖A‖²_F / n`` exactly, ``r`` is at most
    the spectral radius (and equal to it when every probe runs n steps on a generic spectrum), the density has unit
    mass and sits inside [-1, 1].
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, n, dtype=torch.float64)
    A = torch.diag(a)
    sd = slq_density(A, 3, n, generator=g)
    assert _slq_frobenius(sd, n) == pytest.approx(float(torch.linalg.norm(a)), rel=1e-10)
    grid = torch.linspace(-GRID_HALF, GRID_HALF, 2001, dtype=torch.float64)
    dens, r = normalised_density(sd, grid, KERNEL)
    assert r == pytest.approx(float(a.abs().max()), rel=1e-10)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)
    # scaling the matrix leaves the normalised density unchanged
    sd2 = slq_density(7.5 * A, 3, n, generator=torch.Generator().manual_seed(seed))
    sd1 = slq_density(A, 3, n, generator=torch.Generator().manual_seed(seed))
    d1, r1 = normalised_density(sd1, grid, KERNEL)
    d2, r2 = normalised_density(sd2, grid, KERNEL)
    assert r2 == pytest.approx(7.5 * r1, rel=1e-12)
    torch.testing.assert_close(d1, d2, rtol=1e-9, atol=1e-9)


def test_dense_block_norm_is_the_autograd_hessian(run: tuple[dict, dict]) -> None:
    """The figure's ‖H_bb‖_F of layer0.ln1 (dense block) equals torch.func.hessian of the same loss on the same data
    (model and data rebuilt as the tiny run builds them; the init case is computed before any training).
    """
    data, _ = run
    model = build_model("gpt2-tiny", seed=0, n_embd=8, n_layer=1, n_head=2, vocab_size=20, n_positions=6)
    batches = token_batches(model, markov_tokens(20, 4, 6, seed=1), batch=2, seed=0)
    wrapped = LogitsModel(model)
    names = ["transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias"]
    params = dict(wrapped.named_parameters())
    loss_fn = CausalLMLoss()

    def loss(theta: torch.Tensor) -> torch.Tensor:
        p = {**params, names[0]: theta[:8], names[1]: theta[8:]}
        return torch.stack([loss_fn(torch.func.functional_call(wrapped, p, (x,)), y) for x, y in batches]).mean()

    H = torch.func.hessian(loss)(torch.cat([params[n].detach() for n in names]))
    c = data["cases"]["transformer_init"]
    got = c["frobenius"][c["names"].index("layer0.ln1")]
    assert got == pytest.approx(float(torch.linalg.matrix_norm(H.detach())), rel=1e-10)


def test_mlp_blocks_partition_its_parameters() -> None:
    mlp = TokenMLP(11, 5, 7, 3, seed=0)
    held = [t for ts in mlp.blocks().values() for t in ts]
    assert sorted(held) == sorted(n for n, _ in mlp.named_parameters())
    assert len(held) == len(set(held))
    out = mlp({"input_ids": torch.zeros(2, 4, dtype=torch.int64)})
    assert out.shape == (2, 4, 11) and out.dtype == torch.float64


def test_plot_draws_from_the_stored_json(run: tuple[dict, dict]) -> None:
    data, _ = run
    stored = json.loads(json.dumps(to_jsonable(data)))
    fig = REGISTRY[NAME].plot_fn(stored, FigureConfig(fidelity="tiny"))  # type: ignore[misc]
    assert len(fig.axes) >= 2 * len(CASES)
    REGISTRY[NAME].summary_fn(stored)  # type: ignore[misc]


@pytest.mark.parametrize("vocab", [3, 50, 50257])
def test_markov_tokens_are_seeded_and_have_few_successors(vocab: int) -> None:
    a = markov_tokens(vocab, 40, 30, seed=5, successors=4)
    assert torch.equal(a, markov_tokens(vocab, 40, 30, seed=5, successors=4))
    assert not torch.equal(a, markov_tokens(vocab, 40, 30, seed=6, successors=4))
    assert int(a.min()) >= 0 and int(a.max()) < vocab
    successors: dict[int, set[int]] = {}
    for u, v in zip(a[:, :-1].reshape(-1).tolist(), a[:, 1:].reshape(-1).tolist(), strict=True):
        successors.setdefault(u, set()).add(v)
    assert max(len(s) for s in successors.values()) <= 4


def test_a_local_gpt2_directory_is_measured_instead(tmp_path):
    """``--gpt2 PATH``: the figure measures the user's model (a config-only directory: seeded init), its sizes."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
        "vocab_size": 24, "n_positions": 8}), encoding="utf-8")
    from paper_figs.registry import REGISTRY, FigureConfig, load_figure_modules

    load_figure_modules()
    data = REGISTRY["zhang2024-blockwise-spectra"](FigureConfig(fidelity="tiny", options={"gpt2": str(tmp_path)}))
    assert data["model"] == str(tmp_path)
    assert (data["d"], data["n_layer"], data["vocab"]) == (8, 1, 24)
    assert data["seq_len"] <= 8
