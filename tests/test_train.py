"""Tests of unfold.train: learning, exact resume, atomic and validated checkpoints, evaluation."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from energy._validation import EnergyInputError
from unfold.data import (
    IGNORE_INDEX,
    AdditionDataset,
    ShuffledBatches,
    addition_loss,
    iterate_batches,
    synthetic_sequence_classification,
)
from unfold.standard import GPT2Config, GPT2Decoder, standard_encoder
from unfold.train import (
    CheckpointError,
    accuracy,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    train,
)


def _task():
    return synthetic_sequence_classification(256, 256, n_tokens=6, d=8, n_classes=4, seed=0)


def _classifier(seed: int = 0, d: int = 8, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return standard_encoder(d, 1, 2, n_classes=4, d_ff=16, dropout=dropout)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_decreases_and_model_learns_synthetic_task():
    data = _task()
    model = _classifier()
    chance_acc = evaluate(model, iterate_batches(data.X_test, data.y_test, 128))
    res = train(model, F.cross_entropy, ShuffledBatches(data.X_train, data.y_train, 32, seed=0),
                steps=150, lr=1e-2, optimizer="adam", progress=False)
    assert len(res.history) == 150 and res.resumed_from is None
    first, last = sum(res.history[:15]) / 15, sum(res.history[-15:]) / 15
    assert last < 0.6 * first, (first, last)
    acc = evaluate(model, iterate_batches(data.X_test, data.y_test, 128))
    assert acc > 0.6 and acc > chance_acc + 0.2, (chance_acc, acc)  # chance is 0.25


def test_loss_decreases_on_addition():
    model = GPT2Decoder(GPT2Config(d_model=16, n_layers=1), generator=torch.Generator().manual_seed(0))
    res = train(model, addition_loss, AdditionDataset(32, seed=0), steps=60, lr=3e-3, optimizer="adam",
                progress=False)
    first, last = sum(res.history[:5]) / 5, sum(res.history[-5:]) / 5
    assert last < first - 0.1, (first, last)


class _Interrupted(Exception):
    pass


class _InterruptAt:
    """Replays ``batches`` but raises after ``k`` batches, the first time only (a crash mid-run)."""

    def __init__(self, batches, k):
        self.batches, self.k, self.fired = batches, k, False

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.k and not self.fired:
                self.fired = True
                raise _Interrupted
            yield b


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, optimizer):
    """Crash after 7 steps (last checkpoint at 4), resume: parameters and history equal the uninterrupted run bit for
    bit. Dropout is on, so the saved RNG state matters too."""
    data = _task()
    batches = ShuffledBatches(data.X_train, data.y_train, 16, seed=3)
    kw = {"steps": 12, "lr": 1e-2, "optimizer": optimizer, "seed": 5, "progress": False}

    reference = _classifier(dropout=0.2)
    ref = train(reference, F.cross_entropy, batches, **kw)

    ckpt = tmp_path / "run" / "ckpt.pt"
    model = _classifier(dropout=0.2)
    crashing = _InterruptAt(batches, 7)
    with pytest.raises(_Interrupted):
        train(model, F.cross_entropy, crashing, checkpoint=ckpt, checkpoint_every=4, **kw)
    assert load_checkpoint(ckpt, _classifier())["step"] == 4

    fresh = _classifier(dropout=0.2)  # a new process would rebuild the model from scratch
    res = train(fresh, F.cross_entropy, crashing, checkpoint=ckpt, checkpoint_every=4, **kw)
    assert res.resumed_from == 4
    assert res.history == ref.history
    assert _same(_state(fresh), _state(reference))
    assert not [p for p in ckpt.parent.iterdir() if p.name != "ckpt.pt"]  # no temporary files left behind

    # a finished run resumes to a no-op; resume=False starts afresh and overwrites
    again = train(_classifier(dropout=0.2), F.cross_entropy, batches, checkpoint=ckpt, **kw)
    assert again.resumed_from == 12 and again.history == ref.history
    restart = train(_classifier(dropout=0.2), F.cross_entropy, batches, checkpoint=ckpt, resume=False, **kw)
    assert restart.resumed_from is None and restart.history == ref.history


def test_corrupt_checkpoint_raises_and_loads_nothing(tmp_path):
    data = _task()
    batches = ShuffledBatches(data.X_train, data.y_train, 16, seed=0)
    ckpt = tmp_path / "ckpt.pt"
    train(_classifier(), F.cross_entropy, batches, steps=3, lr=1e-2, checkpoint=ckpt, progress=False)
    good = ckpt.read_bytes()

    model = _classifier(seed=1)
    before = _state(model)
    ckpt.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        train(model, F.cross_entropy, batches, steps=5, lr=1e-2, checkpoint=ckpt, progress=False)
    assert _same(_state(model), before)
    ckpt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(ckpt, model)
    assert _same(_state(model), before)
    torch.save({"weights": torch.zeros(3)}, ckpt)  # readable, but not ours
    with pytest.raises(CheckpointError, match="not a checkpoint of unfold.train"):
        load_checkpoint(ckpt, model)
    # a NaN weight inside an otherwise valid checkpoint
    ckpt.write_bytes(good)
    payload = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][key] = payload["state_dict"][key].clone().fill_(float("nan"))
    torch.save(payload, ckpt)
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(ckpt, model)
    assert _same(_state(model), before)


def test_mismatched_checkpoint_raises_and_loads_nothing(tmp_path):
    data = _task()
    batches = ShuffledBatches(data.X_train, data.y_train, 16, seed=0)
    ckpt = tmp_path / "ckpt.pt"
    train(_classifier(d=8), F.cross_entropy, batches, steps=2, lr=1e-2, checkpoint=ckpt, progress=False)

    # same keys, other width: many entries match in name, none may be copied
    wide = standard_encoder(12, 1, 2, n_classes=4, d_ff=16)
    before = _state(wide)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(ckpt, wide)
    assert _same(_state(wide), before)

    # other depth: unexpected keys are named
    deep = standard_encoder(8, 2, 2, n_classes=4, d_ff=16)
    before = _state(deep)
    with pytest.raises(CheckpointError, match=r"missing keys \['layers\.1\."):
        train(deep, F.cross_entropy, batches, steps=4, lr=1e-2, checkpoint=ckpt, progress=False)
    assert _same(_state(deep), before)

    # same model, other optimiser / lr: refusing to resume a different run
    model = _classifier()
    before = _state(model)
    with pytest.raises(CheckpointError, match="optimizer='sgd'"):
        train(model, F.cross_entropy, batches, steps=4, lr=1e-2, optimizer="adam", checkpoint=ckpt, progress=False)
    with pytest.raises(CheckpointError, match="lr=0.01"):
        train(model, F.cross_entropy, batches, steps=4, lr=1e-3, checkpoint=ckpt, progress=False)
    assert _same(_state(model), before)

    # other dtype: no silent cast
    with pytest.raises(CheckpointError, match="dtype"):
        load_checkpoint(ckpt, _classifier().double())
    # beyond the requested number of steps
    with pytest.raises(CheckpointError, match="beyond"):
        train(_classifier(), F.cross_entropy, batches, steps=1, lr=1e-2, checkpoint=ckpt, progress=False)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = _classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, model, opt, step=0, history=[])
    good = ckpt.read_bytes()

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ckpt, model, opt, step=1, history=[1.0])
    assert ckpt.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_accuracy_and_evaluate():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == (2, 3)
    seq = torch.zeros(1, 3, 4)
    seq[0, :, 2] = 1.0  # predicts class 2 everywhere
    assert accuracy(seq, torch.tensor([[2, IGNORE_INDEX, 1]])) == (1, 2)
    with pytest.raises(EnergyInputError, match="shape"):
        accuracy(logits, torch.tensor([0, 1]))

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    model.train()
    X, y = torch.randn(10, 2, 2), torch.randint(0, 2, (10,))
    acc = evaluate(model, iterate_batches(X, y, 3))
    with torch.no_grad():
        expected = float((model(X).argmax(-1) == y).float().mean())
    assert acc == pytest.approx(expected) and model.training
    assert evaluate(model, iter(ShuffledBatches(X, y, 5, seed=0)), max_batches=2) >= 0.0
    with pytest.raises(EnergyInputError, match="nothing to evaluate"):
        evaluate(model, [])


def test_bad_arguments(tmp_path):
    model = _classifier()
    data = _task()
    batches = ShuffledBatches(data.X_train, data.y_train, 16, seed=0)
    with pytest.raises(EnergyInputError, match="steps"):
        train(model, F.cross_entropy, batches, steps=0, lr=0.1, progress=False)
    with pytest.raises(EnergyInputError, match="lr"):
        train(model, F.cross_entropy, batches, steps=1, lr=-0.1, progress=False)
    with pytest.raises(EnergyInputError, match="optimizer"):
        train(model, F.cross_entropy, batches, steps=1, lr=0.1, optimizer="rmsprop", progress=False)
    with pytest.raises(EnergyInputError, match="ran out after 2"):
        train(model, F.cross_entropy, list(batches.__iter__().__next__() for _ in range(2)), steps=3, lr=0.1,
              progress=False)
    nan_loss = lambda out, y: F.cross_entropy(out, y) * float("nan")
    with pytest.raises(FloatingPointError, match="step 1"):
        train(model, nan_loss, batches, steps=2, lr=0.1, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", model)


def test_resume_of_a_parametrized_unfolded_model(tmp_path):
    """Checkpoints of models with torch.nn.utils.parametrize weights (the unfolded preset) resume exactly too."""
    from unfold.presets import yang2022

    data = _task()
    batches = ShuffledBatches(data.X_train, data.y_train, 16, seed=0)

    def build():
        torch.manual_seed(0)
        return yang2022(8, 2, d_in=8, n_classes=4)

    kw = {"steps": 6, "lr": 1e-2, "optimizer": "adam", "progress": False}
    reference = build()
    ref = train(reference, F.cross_entropy, batches, **kw)
    assert any("parametrizations" in k for k in reference.state_dict())
    ckpt = tmp_path / "unfolded.pt"
    train(build(), F.cross_entropy, batches, checkpoint=ckpt, **{**kw, "steps": 3})
    resumed = build()
    res = train(resumed, F.cross_entropy, batches, checkpoint=ckpt, **kw)
    assert res.resumed_from == 3 and res.history == ref.history
    assert _same(_state(resumed), _state(reference))


def test_unfold_train_is_the_module_and_train_its_loop():
    """``import unfold.train`` and the attribute ``unfold.train`` name the same module (no function shadows it)."""
    import importlib

    import unfold

    module = importlib.import_module("unfold.train")
    assert unfold.train is module and module.__name__ == "unfold.train"
    assert callable(module.train) and "train" in module.__all__
