"""``python -m energy.hessian analyze``: a run on a tiny preset (JSON schema, values against the dense blocks),
``--data`` and local model directories, and one-line usage errors with exit status 2."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from energy.hessian import hf  # noqa: E402
from energy.hessian.__main__ import main as hessian_main  # noqa: E402
from energy.hessian.analyze import main  # noqa: E402
from energy.hessian.hf_blocks import BlockCurvature  # noqa: E402

SMALL = ["--seq-len", "4", "--batch", "2", "--quiet"]


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_preset_run_json_schema_and_values(tmp_path, capsys):
    out = tmp_path / "sub" / "blocks.json"
    code, stdout, _ = _run(["--model", "gpt2-tiny", "--json", str(out), "--blocks", "layer0.head1.Q", "layer0.ln1",
                            "--exact-max", "40", "--num-matvecs", "69", "--probes", "2", "--steps", "6", "--grid", "33",
                            *SMALL], capsys)
    assert code == 0 and "2 block(s)" in stdout
    doc = json.loads(out.read_text())
    assert doc["command"] == "analyze" and doc["model_class"] == "GPT2LMHeadModel" and doc["task"] == "causal-lm"
    assert doc["settings"]["parts"] == ["H", "H_o", "H_f"] and doc["num_targets"] == 2 * 3
    recs = {r["name"]: r for r in doc["blocks"]}
    assert list(recs) == ["layer0.head1.Q", "layer0.ln1"]
    assert recs["layer0.head1.Q"]["params"] == 16 * 4 + 4 and recs["layer0.ln1"]["params"] == 32
    # the same model and data, block by block, densely
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.build_model("gpt2-tiny", seed=0)
    bc = BlockCurvature(model, hf.synthetic_batches(model, batch=2, seq_len=4, num_batches=1, seed=0))
    for name, rec in recs.items():
        assert set(rec) >= {"name", "params", "tensors", "frobenius", "frobenius_stderr", "trace", "top_eigenvalues",
                            "density", "seconds", "exact"}
        assert rec["exact"]
        for part in ("H", "H_o", "H_f"):
            M = bc.operator(name, None, part).dense()
            assert rec["frobenius"][part] == pytest.approx(float(torch.linalg.matrix_norm(M)), rel=1e-9)
            top = torch.linalg.eigvalsh(M).flip(0)[:3]
            assert rec["top_eigenvalues"][part] == pytest.approx(top.tolist(), rel=1e-6, abs=1e-12 * float(top[0]))
            dens = rec["density"][part]
            grid, values = torch.tensor(dens["grid"]), torch.tensor(dens["values"])
            ev = torch.linalg.eigvalsh(M)
            spread = 0.04 * float(ev[-1] - ev[0])  # Ritz values lie in [λ_min, λ_max]; the grid adds 3 kernel widths
            assert len(grid) == 33 and bool((values >= 0).all())
            assert float(ev[0]) - spread <= float(grid[0]) and float(grid[-1]) <= float(ev[-1]) + spread
        assert rec["trace"] == pytest.approx(float(torch.trace(bc.operator(name).dense())), rel=1e-9)


def test_data_file_and_model_directory(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.build_model("llama-tiny", seed=4, num_hidden_layers=1)
    model.config.save_pretrained(tmp_path / "llama")  # config.json only: seeded random weights
    torch.save(torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(0)), tmp_path / "ids.pt")
    out = tmp_path / "o.json"
    code, _, _ = _run(["--model", str(tmp_path / "llama"), "--json", str(out), "--data", str(tmp_path / "ids.pt"),
                       "--blocks", "layer0.kv_head1.V", "--what", "norms", "--parts", "H,H_o", "--seed", "4",
                       *SMALL], capsys)
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["model_class"] == "LlamaForCausalLM" and doc["settings"]["num_batches"] == 2
    assert doc["num_targets"] == 3 * 4
    (rec,) = doc["blocks"]
    assert rec["name"] == "layer0.kv_head1.V" and set(rec["frobenius"]) == {"H", "H_o"}
    assert "top_eigenvalues" not in rec and "density" not in rec
    ids = torch.load(tmp_path / "ids.pt")
    bc = BlockCurvature(model, hf.token_batches(model, ids, batch=2, seed=4))
    assert rec["frobenius"]["H_o"] == pytest.approx(
        float(torch.linalg.matrix_norm(bc.operator("layer0.kv_head1.V", None, "H_o").dense())), rel=1e-9)


def test_list_blocks(capsys):
    code, stdout, _ = _run(["--model", "bert-tiny", "--list-blocks"], capsys)
    names = stdout.split()
    assert code == 0 and "layer1.head3.V" in names and "bert.embeddings.word_embeddings.weight" in names


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "gpt9"], "neither a directory with config.json nor a preset"),
    (["--model", "gpt2-tiny", "--blocks", "layer0.head1.q"], "not a block name"),
    (["--model", "gpt2-tiny", "--blocks", "layer9.*"], "matches no block"),
    (["--model", "gpt2-tiny", "--what", "norms,spectrum"], "unknown: spectrum"),
    (["--model", "gpt2-tiny", "--parts", "H,G2"], "--parts"),
    (["--model", "gpt2-tiny", "--seq-len", "99"], "exceeds the model's 16 positions"),
    (["--model", "gpt2-tiny", "--batch", "0"], "--batch must be at least 1"),
    (["--model", "gpt2-tiny", "--data", "/nonexistent/ids.pt"], "no such file"),
    (["--model", "vit-tiny", "--data", "FLOATS"], "integer tensor of token ids"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    if "FLOATS" in args:
        torch.save(torch.randn(2, 3), tmp_path / "f.pt")
        args = [str(tmp_path / "f.pt") if a == "FLOATS" else a for a in args]
    out = tmp_path / "o.json"
    code, _, err = _run([*args, "--json", str(out), "--quiet"], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("python -m energy.hessian analyze: error:") and message in line
    assert not out.exists()


def test_unwritable_json_is_checked_first(tmp_path, capsys):
    (tmp_path / "dir.json").mkdir()
    code, _, err = _run(["--model", "gpt2-tiny", "--json", str(tmp_path / "dir.json")], capsys)
    assert code == 2 and "is a directory" in err
    assert hessian_main(["analyze", "--model", "gpt9", "--json", str(tmp_path / "x.json")]) == 2
    assert "neither a directory" in capsys.readouterr().err
