"""Tests of the noised classifier's training step (in-process, with a tiny stand-in classifier)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from improved_diffusion import logger
from improved_diffusion.classifier_train_util import ClassifierTrainLoop, classification_stats
from improved_diffusion.errors import UserError
from improved_diffusion.script_util import create_gaussian_diffusion

CLOSE = dict(rtol=1e-5, atol=1e-6)  # float32 reductions in another order

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyClassifier(nn.Module):
    """A conv + linear stand-in for EncoderUNetModel: ``(x, t) -> (N, classes)`` logits; records its t."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.time = nn.Linear(1, 4)
        self.out = nn.Linear(4, classes)
        self.seen_t = []

    def forward(self, x, timesteps):
        self.seen_t.append(timesteps.detach().clone())
        h = F.silu(self.conv(x) + self.time(timesteps.float()[:, None] / 1000.0)[:, :, None, None])
        return self.out(h.mean(dim=(2, 3)))


def _batches(seed: int = 0, n: int = 4):
    """Endless (images (n, 3, 8, 8), {"y": (n,)}) batches, fixed per seed."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)
    while True:
        yield x, {"y": y}


@pytest.fixture
def log_dir(tmp_path):
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["log"]):
        yield str(tmp_path / "log")


def _loop(log_dir, **kw):
    args = dict(
        model=TinyClassifier(),
        diffusion=create_gaussian_diffusion(steps=20, noise_schedule="cosine", rescale_timesteps=True),
        data=_batches(),
        batch_size=4,
        microbatch=-1,
        lr=1e-2,
        log_interval=1,
        save_interval=0,
        resume_checkpoint="",
        log_dir=log_dir,
        max_steps=2,
        iterations=10,
    )
    args.update(kw)
    return ClassifierTrainLoop(**args)


def test_classification_stats():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    labels = torch.tensor([2, 0])
    stats = classification_stats(logits, labels, "val")
    torch.testing.assert_close(stats["val_loss"], F.cross_entropy(logits, labels, reduction="none"), **CLOSE)
    torch.testing.assert_close(stats["val_acc@1"], torch.tensor([0.0, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(stats["val_acc@5"], torch.tensor([1.0, 1.0]), rtol=0, atol=0)  # k capped at 3


def test_noised_steps_log_train_and_val_by_quartile(log_dir):
    loop = _loop(log_dir, val_data=_batches(seed=1), eval_interval=1)
    loop.run_loop()
    logged = loop.last_logged
    for key in ("train_loss", "train_acc@1", "train_acc@5", "val_loss", "val_acc@1", "val_acc@5"):
        assert key in logged and any(k.startswith(f"{key}_q") for k in logged), key
    assert logged["step"] == 2 and "ema" not in " ".join(logged)
    # The classifier sees the timesteps the diffusion model sees (rescaled to [0, 1000)).
    seen = torch.cat(loop.model.seen_t)
    assert seen.dtype == torch.float32 and seen.max() < 1000 and not torch.all(seen == 0)


def test_unnoised_training_classifies_clean_images_at_t0(log_dir, monkeypatch):
    loop = _loop(log_dir, noised=False)
    monkeypatch.setattr(loop.diffusion, "q_sample", lambda *a, **k: pytest.fail("q_sample called"))
    loop.run_loop()
    assert all(torch.equal(t, torch.zeros(4)) for t in loop.model.seen_t)
    assert "train_loss_q0" in loop.last_logged and "train_loss_q3" not in loop.last_logged


def test_microbatches_give_the_batch_gradient(log_dir):
    """With the same x_t and t, two microbatches of 2 accumulate the gradient of one batch of 4."""
    grads = []
    for microbatch in (-1, 2):
        torch.manual_seed(0)
        loop = _loop(log_dir, model=TinyClassifier(), noised=False, microbatch=microbatch)
        batch, cond = next(loop.data)
        loop.forward_backward(batch, cond)
        grads.append([p.grad.clone() for p in loop.params])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **CLOSE)


def test_anneal_lr_falls_linearly_over_iterations(log_dir):
    loop = _loop(log_dir, anneal_lr=True, iterations=4, max_steps=0)
    loop.run_loop()
    assert loop.step == 4
    np.testing.assert_allclose(loop.opt.param_groups[0]["lr"], 1e-2 * (1 - 3 / 4), rtol=1e-12)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(iterations=0), r"--iterations 0: must be a positive integer"),
        (dict(eval_interval=-1), r"--eval_interval -1: must be a positive integer"),
        (dict(batch_size=0), r"--batch_size 0"),
    ],
)
def test_bad_settings_name_the_flag(log_dir, kw, message):
    with pytest.raises(UserError, match=message):
        _loop(log_dir, **kw)


def test_unlabelled_data_is_a_one_line_error(log_dir):
    def unlabelled():
        while True:
            yield torch.zeros(4, 3, 8, 8), {}

    with pytest.raises(UserError, match="the classifier trains on labelled images"):
        _loop(log_dir, data=unlabelled()).run_loop()
