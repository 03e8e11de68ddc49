"""``python -m unfold train / trace`` (run in-process through ``unfold.__main__.main``)."""

from __future__ import annotations

import json

from unfold.__main__ import main


def test_train_save_resume_and_trace(tmp_path, capsys):
    ckpt, model = tmp_path / "run.ckpt", tmp_path / "model.pt"
    args = ["train", "--task", "synthetic", "--d", "8", "--depth", "2", "--steps", "6", "--batch-size", "16",
            "--checkpoint", str(ckpt), "--checkpoint-every", "3", "--quiet"]
    assert main(args + ["--save", str(model)]) == 0
    assert ckpt.exists() and model.exists()
    assert "test accuracy" in capsys.readouterr().out
    # a longer run of the same configuration resumes from the checkpoint
    assert main(args[:8] + ["9"] + args[9:]) == 0
    assert "resumed from step 6" in capsys.readouterr().out
    plot, out = tmp_path / "trace.png", tmp_path / "trace.json"
    assert main(["trace", "--model", str(model), "--task", "synthetic", "--n", "8", "--plot", str(plot),
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "E_att" in text and "E_ffn" in text and "total energy decreased" in text
    data = json.loads(out.read_text())
    assert len(data["mean_energies"]["total"]) == 2 * 3 + 1
    assert plot.stat().st_size > 1000


def test_trace_fresh_preset_variants(capsys):
    assert main(["trace", "--task", "digits", "--d", "8", "--depth", "2", "--n", "4", "--normalization",
                 "layernorm"]) == 0
    assert "layernorm" in capsys.readouterr().out


def test_bad_arguments(tmp_path, capsys):
    assert main(["train", "--depth", "0"]) == 2
    assert "--depth must be positive" in capsys.readouterr().err
    assert main(["trace", "--task", "imagenet"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main([]) == 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["trace", "--model", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["trace", "--model", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert main(["trace", "--model", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "empty.pt" in err and "empty (0 bytes)" in err and "Traceback" not in err


def test_trace_opens_a_training_checkpoint(tmp_path, capsys):
    """A training checkpoint is a model file too (same format, with the training state): ``trace`` opens it."""
    ckpt = tmp_path / "run.ckpt"
    assert main(["train", "--task", "synthetic", "--d", "8", "--depth", "2", "--steps", "2", "--batch-size", "16",
                 "--checkpoint", str(ckpt), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["trace", "--model", str(ckpt), "--task", "synthetic", "--n", "4"]) == 0
    assert "total energy decreased" in capsys.readouterr().out


def test_mismatched_training_checkpoint_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "run.ckpt"
    base = ["train", "--task", "synthetic", "--depth", "2", "--steps", "2", "--batch-size", "16", "--quiet",
            "--checkpoint", str(ckpt)]
    assert main(base + ["--d", "8"]) == 0
    capsys.readouterr()
    assert main(base[:6] + ["4"] + base[7:] + ["--d", "12"]) == 2
    assert "another size" in capsys.readouterr().err


def test_constraint_cost_pipeline_tiny(tmp_path):
    """The measurement script end to end at toy size (the numbers themselves are measured by running it; the study
    itself is tested in tests/test_constraint_cost_study.py).
    """
    from unfold.constraint_cost import StudyConfig, format_table, make_task, run_study
    from unfold.constraint_cost import main as cc_main

    task = make_task("addition", seed=0, batch_size=4)
    X, y = next(iter(task.train_batches))
    assert X.shape == (4, 12, 24) and y.shape == (4, 6) and task.n_outputs == 60
    report = run_study(StudyConfig(tasks=("digits", "addition"), models=("standard", "yang2022", "yang2022_ln"),
                                   sizes=(4,), depth=1, lrs=(3e-3,), seeds=(0, 1), steps=2, certify_inputs=8),
                       log=lambda s: None)
    for t in ("digits", "addition"):
        for kind in ("yang2022", "yang2022_ln", "standard"):
            acc = report["results"][t]["4"][kind]["test_accuracy"]
            assert len(acc["values"]) == 2 and 0.0 <= acc["mean"] <= 1.0
        assert len(report["best_certified"][t]["certificates"]) == 2
    assert "exact_match" in report["results"]["addition"]["4"]["standard"]
    assert "| digits | 4 | standard |" in format_table(report)
    assert cc_main(["--tasks", "mnist"]) == 2
    out = tmp_path / "cc.json"
    assert cc_main(["--tasks", "digits", "--seeds", "1", "--steps", "1", "--d", "4", "--depth", "1",
                    "--models", "standard", "--lr", "3e-3", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["steps"] == 1


def test_train_builds_every_family_and_writes_its_certificate(tmp_path, capsys):
    from unfold.families import family_names

    for family in family_names():
        cert = tmp_path / f"{family}.json"
        args = ["train", "--family", family, "--task", "synthetic", "--d", "8", "--depth", "2", "--heads", "2",
                "--steps", "2", "--batch-size", "8", "--quiet", "--certificate", str(cert)]
        assert main(args) == 0, family
        out = capsys.readouterr().out
        assert f"model: {family}" in out and "certificate:" in out
        data = json.loads(cert.read_text())
        assert data["family"] == family and 0.0 <= data["guaranteed_share"] <= 1.0


def test_family_options_and_model_files(tmp_path, capsys):
    model = tmp_path / "m.pt"
    assert main(["train", "--family", "recurrent", "--option", "tol=0.01", "--option", "min_depth=2", "--task",
                 "synthetic", "--d", "8", "--depth", "3", "--steps", "2", "--batch-size", "8", "--quiet", "--save",
                 str(model)]) == 0
    capsys.readouterr()
    assert main(["trace", "--model", str(model), "--n", "4"]) == 0
    assert "total energy decreased" in capsys.readouterr().out
    assert main(["trace", "--model", str(model), "--family", "sphere", "--n", "4"]) == 2
    assert "--family sphere: contradicts the model" in capsys.readouterr().err


def test_bad_family_arguments(capsys):
    assert main(["train", "--family", "yang", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--family yang: unknown family; valid families: " in err and "yang2022_ln" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["train", "--family", "untied", "--no-relu", "--steps", "1"]) == 2
    assert "--no-relu: does not apply to --family untied" in capsys.readouterr().err
    assert main(["train", "--family", "untied", "--option", "tied", "--steps", "1"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["train", "--family", "untied", "--option", "tide=1", "--steps", "1", "--task", "synthetic"]) == 2
    assert "no option(s) ['tide']" in capsys.readouterr().err
    assert main(["train", "--family", "untied", "--heads", "3", "--d", "8", "--steps", "1", "--task",
                 "synthetic"]) == 2
    assert "`heads` = 3 does not divide the width d = 8" in capsys.readouterr().err
    assert main(["train", "--option", "tied=false", "--steps", "1"]) == 2
    assert "--option: only for --family" in capsys.readouterr().err
