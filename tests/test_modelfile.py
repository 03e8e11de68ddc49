"""unfold.modelfile: the one versioned model-file format (models and training checkpoints), its reader's errors,
the migration of the two older layouts, and the atomic writer's file mode."""

from __future__ import annotations

import os
import stat

import pytest
import torch
import torch.nn.functional as F
from _helpers import DT

from energy._io import default_file_mode
from unfold.modelfile import (
    FORMAT,
    VERSION,
    CheckpointError,
    load_model,
    read_model_file,
    save_model,
    write_model_file,
)
from unfold.parametrizations import SpectrumClip
from unfold.presets import yang2022
from unfold.standard import standard_encoder
from unfold.train import load_checkpoint, save_checkpoint, train


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return yang2022(6, 2, d_in=4, n_classes=3).double()


def _X(seed: int = 1):
    return torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_written_file_is_current_version_with_normal_mode(tmp_path):
    path = save_model(_model(), tmp_path / "sub" / "m.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["version"] == VERSION == 2
    assert payload["builder"] == "UnrolledClassifier" and payload["training"] is None
    assert stat.S_IMODE(os.stat(path).st_mode) == default_file_mode()  # not mkstemp's 0600
    assert os.listdir(tmp_path / "sub") == ["m.pt"]  # no temporary file left


def test_empty_directory_and_unreadable_files_name_the_file(tmp_path, monkeypatch):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt.*empty \(0 bytes\)"):
        load_model(empty)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_model(tmp_path)
    good = save_model(_model(), tmp_path / "m.pt")

    def failing_load(*args, **kwargs):
        raise RuntimeError("")  # an exception without a message must not break the error handler

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(CheckpointError, match=r"m\.pt.*corrupt or not a torch file \(RuntimeError\)"):
        read_model_file(good)


def test_foreign_newer_and_incomplete_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="not an unfold model file.*holds a list"):
        read_model_file(path)
    torch.save({"format": FORMAT, "version": VERSION + 1}, path)
    with pytest.raises(CheckpointError, match=f"version {VERSION + 1}, written by a newer unfold.*1 … {VERSION}"):
        read_model_file(path)
    torch.save({"format": FORMAT, "version": "2"}, path)
    with pytest.raises(CheckpointError, match="invalid version '2'"):
        read_model_file(path)
    torch.save({"format": FORMAT, "version": 2, "builder": None, "config": None, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"lacks the entries \['training'\]"):
        read_model_file(path)


def test_version_1_model_file_is_migrated(tmp_path):
    model = _model(3)
    path = tmp_path / "v1.pt"
    torch.save({"format": "unfold-model", "version": 1, "builder": "UnrolledClassifier", "config": model.config(),
                "state_dict": model.state_dict(), "extra": {"task": "digits"}}, path)
    payload = read_model_file(path)
    assert payload["version"] == VERSION and payload["training"] is None and payload["extra"] == {"task": "digits"}
    loaded = load_model(path)
    torch.testing.assert_close(loaded(_X()), model(_X()), rtol=0, atol=0)
    write_model_file(path, **payload)  # rewrite in the current version
    assert torch.load(path, weights_only=True)["version"] == VERSION
    torch.testing.assert_close(load_model(path)(_X()), model(_X()), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="without training state"):
        load_checkpoint(path, model)


def test_legacy_training_checkpoint_is_migrated_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = standard_encoder(8, 1, 2, n_classes=4, d_ff=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "old.ckpt"
    torch.save({"format": "unfold.train.checkpoint/1", "step": 1, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "rng_state": torch.get_rng_state(), "history": [0.5],
                "meta": {"optimizer": "sgd", "lr": 0.1, "seed": 0}}, path)
    payload = read_model_file(path, training=True)
    assert payload["builder"] is None and payload["training"]["step"] == 1
    fresh = standard_encoder(8, 1, 2, n_classes=4, d_ff=16)
    ckpt = load_checkpoint(path, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert ckpt["history"] == [0.5]
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    with pytest.raises(CheckpointError, match="records no builder.*load_checkpoint"):
        load_model(path)
    X, y = torch.randn(4, 3, 8), torch.randint(0, 4, (4,))
    res = train(fresh, F.cross_entropy, [(X, y)] * 3, steps=3, lr=0.1, checkpoint=path, progress=False)
    assert res.resumed_from == 1 and len(res.history) == 3
    assert torch.load(path, weights_only=True)["version"] == VERSION  # saved back in the current version


def test_training_checkpoint_of_a_registered_model_opens_with_load_model(tmp_path):
    model = _model(5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    path = save_checkpoint(tmp_path / "run.ckpt", model, opt, step=0, history=[])
    assert stat.S_IMODE(os.stat(path).st_mode) == default_file_mode()
    torch.testing.assert_close(load_model(path)(_X()), model(_X()), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="inconsistent step"):
        save_checkpoint(path, model, opt, step=2, history=[1.0])
        load_checkpoint(path, model)


def test_deprecated_read_checkpoint_warns_and_reads(tmp_path):
    from unfold.unroller import read_checkpoint

    path = save_model(_model(), tmp_path / "m.pt")
    with pytest.warns(DeprecationWarning, match="read_model_file"):
        assert read_checkpoint(path)["builder"] == "UnrolledClassifier"


def test_a_model_file_of_the_clipped_start_loads_unchanged(tmp_path):
    """Files written before the interior start of W_f (original = clip(sym(A)), spectrum on the band's edge) load
    with the same W_f and outputs: the state format did not change (the clip stays the default map)."""
    model = _model()
    ffn = model.body.layer(0)[1]
    A = torch.randn(6, 6, dtype=DT, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ffn.parametrizations.W_f.original.copy_(SpectrumClip(0.0, 0.95)(0.5 * (A + A.T)))
    path = save_model(model, tmp_path / "old.pt")
    back = load_model(path)
    torch.testing.assert_close(back.body.layer(0)[1].W_f, ffn.W_f, rtol=0, atol=0)
    torch.testing.assert_close(back(_X()), model(_X()), rtol=0, atol=0)


def test_family_models_with_their_new_steps_round_trip(tmp_path):
    from unfold.families import build_classifier

    for family, options in (("sphere", {}), ("sphere", {"ffn": "mlp", "learn_steps": True}), ("recurrent", {}),
                            ("energy_ffn", {}), ("learned_steps", {}), ("general_heads", {"mode": "bound"})):
        torch.manual_seed(0)
        model = build_classifier(family, d_in=4, d=6, depth=2, heads=2, n_outputs=3, **options).double()
        back = load_model(save_model(model, tmp_path / "m.pt"))
        assert type(back.body) is type(model.body) and back.family == family
        torch.testing.assert_close(back(_X()), model(_X()), rtol=0, atol=0)


def test_constrained_state_dict_of_a_smooth_spectrum_model_loads_through_the_right_inverse():
    """The constrained value of W_f (SpectrumSquash) loads into a fresh model through artanh: same outputs."""
    from unfold.modelfile import constrained_state_dict

    torch.manual_seed(0)
    a = yang2022(6, 2, d_in=4, n_classes=3, spectrum_map="smooth").double()
    torch.manual_seed(1)
    b = yang2022(6, 2, d_in=4, n_classes=3, spectrum_map="smooth").double()
    sd = constrained_state_dict(a)
    assert "body.layers.0.1.W_f" in sd
    b.load_state_dict(sd)
    torch.testing.assert_close(b(_X()), a(_X()), rtol=1e-12, atol=1e-12)
