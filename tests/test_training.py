"""The shared training loop: schedules, NaN guard, checkpoints and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cfbench.config import TrainParams
from cfbench.errors import TrainingDiverged
from cfbench.models import build_model
from cfbench.testing.tiny import direct_fit_context
from cfbench.training import CKPT_NAME, augment, lr_at, train


def _ctx(tmp_path=None, epochs=3, **kw):
    tp = TrainParams(epochs=epochs, batch_size=64, lr=0.05, **kw)
    return direct_fit_context(train=tp, seed=3, checkpoint_dir=tmp_path)


def _model(digits):
    torch.manual_seed(0)
    return build_model("cnn8", (1, 8, 8), 10, digits.mean, digits.std, {"width": 8})


def _ce(model, x, y, batch):
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def test_lr_schedules():
    assert lr_at(1.0, "constant", 50, 100) == 1.0
    assert lr_at(1.0, "cosine", 0, 100) == 1.0
    assert lr_at(1.0, "cosine", 50, 100) == pytest.approx(0.5)
    assert lr_at(1.0, "cosine", 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert [lr_at(1.0, "step", s, 100) for s in (49, 50, 75)] == pytest.approx([1.0, 0.1, 0.01])


def test_augment_shifts_within_padding_and_flips():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1
    out = augment(x, "shift", g)
    assert out.shape == x.shape and out.sum() == x.sum()  # 1-pixel shifts of a centred blob lose nothing
    assert not torch.equal(out, x)
    x2 = torch.rand(32, 3, 32, 32)
    out2 = augment(x2, "flip-shift", g)
    assert out2.shape == x2.shape and 0 <= out2.min() and out2.max() <= 1
    assert augment(x2, "none", g) is x2


def test_training_reduces_loss_and_reaches_good_accuracy(digits_split):
    d = digits_split
    model = _model(d.dataset)
    hist = train(model, d.x_train, d.y_train, _ctx(epochs=8), _ce)
    assert hist[-1]["loss"] < hist[0]["loss"] / 3
    with torch.no_grad():
        acc = (model(d.x_test).argmax(1) == d.y_test).float().mean().item()
    assert acc > 0.75  # measured 0.83 after 8 epochs of a width-8 cnn8; chance is 0.1


def test_nan_loss_is_reported_with_the_epoch_and_a_hint(digits_split):
    d = digits_split
    model = _model(d.dataset)

    def bad(model, x, y, batch):
        return F.cross_entropy(model(x), y) * (math.nan if batch.step == 3 else 1.0)

    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step 4.*--set lr"):
        train(model, d.x_train, d.y_train, _ctx(), bad)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_killed_run_resumes_to_the_identical_model(tmp_path, digits_split, optimizer):
    d = digits_split
    x, y = d.x_train[:256], d.y_train[:256]
    straight = _model(d.dataset)
    train(straight, x, y, _ctx(epochs=4, optimizer=optimizer, augment=True), _ce)

    resumed = _model(d.dataset)

    def dies_in_epoch_3(model, xb, yb, batch):
        if batch.epoch == 2:
            raise _Killed
        return _ce(model, xb, yb, batch)

    with pytest.raises(_Killed):
        train(resumed, x, y, _ctx(tmp_path, epochs=4, optimizer=optimizer, augment=True), dies_in_epoch_3)
    assert (tmp_path / CKPT_NAME).exists()
    fresh = _model(d.dataset)  # a new process would start from fresh weights
    torch.manual_seed(1234)    # ... and a different global RNG state
    ctx = _ctx(tmp_path, epochs=4, optimizer=optimizer, augment=True)
    hist = train(fresh, x, y, ctx, _ce)
    assert ctx.notes["resumed_from_epoch"] == 2
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    for (k, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
