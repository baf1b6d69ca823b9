"""
What ``scripts/image_evaluate.py`` does between parsing and printing: read a side of the comparison
(images or a statistics file), run a feature network over the images in batches, save and load
statistics files, and compute every score with ``evaluation``.

A side is one of:

- an ``.npz`` whose ``arr_0`` holds uint8 images (N, H, W, C), C = 1 or 3 (what ``image_sample.py``
  writes; also guided-diffusion's reference batches), with optional class labels ``arr_1`` (N,);
- a folder of image files (jpg, jpeg, png, gif; searched recursively), all of one size;
- a statistics file written by an earlier run (``--save_ref_stats``): the features themselves
  (``pool``, ``logits``), the spatial features' mean and covariance, the labels and the image size.

A feature network is any module with ``evaluation_features(images)`` taking (N, 3, H, W) uint8 and
returning ``pool`` (N, D) and ``logits`` (N, C), and optionally ``spatial`` (N, S) (for sFID):
``inception.InceptionV3FID`` and ``digit_features.DigitClassifier``.
"""

import dataclasses
import os
import warnings
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from . import evaluation
from .digit_features import accuracy
from .errors import UserError
from .fileio import atomic_write
from .image_datasets import IMAGE_EXTENSIONS, list_image_files, read_image

STATS_FORMAT = "improved-diffusion feature statistics v1"
MIN_IMAGES = 10  # the Inception Score's 10 splits; also more than precision/recall's k = 3
IS_SPLITS = 10


@dataclasses.dataclass
class ImageSet:
    """Images read from one side: (N, H, W, C) uint8 and optional (N,) int64 labels."""

    path: str
    images: np.ndarray
    labels: Optional[np.ndarray] = None


@dataclasses.dataclass
class FeatureSet:
    """
    One side's features: ``pool`` (N, D) and ``logits`` (N, C) float32, the spatial features' mean
    (S,) and covariance (S, S) float64 (or None), labels (N,) or None, the image size (H, W).
    """

    path: str
    network: str
    image_size: Tuple[int, int]
    pool: np.ndarray
    logits: np.ndarray
    spatial_mu: Optional[np.ndarray] = None
    spatial_sigma: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None


# --------------------------------------------------------------------------- reading a side


def read_side(path: str) -> Union[ImageSet, FeatureSet]:
    """
    Read ``path`` as images (:class:`ImageSet`) or a statistics file (:class:`FeatureSet`).

    :raises UserError: in one line naming ``path`` for a missing file, an ``.npz`` without
        ``arr_0``, empty, non-uint8 or wrongly shaped images, or labels that do not fit.
    """
    if os.path.isdir(path):
        return read_image_folder(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file or folder (expected an .npz of images, a folder, or a stats file)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({str(exc).strip() or type(exc).__name__})") from exc
    if "format" in arrays:
        return _feature_set_from_arrays(path, arrays)
    if "arr_0" not in arrays:
        raise UserError(f"{path} has no arr_0 (keys: {', '.join(arrays) or 'none'}); expected uint8 images in arr_0")
    images = check_images(path, arrays["arr_0"])
    labels = _check_labels(path, arrays["arr_1"], len(images)) if "arr_1" in arrays else None
    return ImageSet(path, images, labels)


def check_images(path: str, images: np.ndarray) -> np.ndarray:
    """``images`` if they are non-empty uint8 (N, H, W, C), C = 1 or 3; else a UserError naming ``path``."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        hint = " (channels first? expected channels last)" if images.ndim == 4 and images.shape[1] in (1, 3) else ""
        raise UserError(f"{path}: images have shape {images.shape}, expected (N, H, W, C) with C = 1 or 3{hint}")
    if len(images) == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise UserError(f"{path}: holds no images (shape {images.shape})")
    if images.dtype != np.uint8:
        raise UserError(
            f"{path}: images have dtype {images.dtype}, expected uint8 in 0..255 (as image_sample.py writes)"
        )
    return images


def _check_labels(path: str, labels: np.ndarray, count: int) -> np.ndarray:
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"{path}: arr_1 has shape {labels.shape} and dtype {labels.dtype}, expected {count} integer labels"
        )
    return labels.astype(np.int64)


def read_image_folder(path: str) -> ImageSet:
    """All images under ``path`` (sorted, recursive) as (N, H, W, 3) uint8; they must share one size."""
    try:
        files = list_image_files(path)
    except UserError:
        raise UserError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found, searched recursively") from None
    images = [np.asarray(read_image(files[0]))]
    for file in files[1:]:
        image = np.asarray(read_image(file))
        if image.shape != images[0].shape:
            raise UserError(
                f"{path}: images differ in size ({file} is {image.shape[1]}x{image.shape[0]}, "
                f"{files[0]} is {images[0].shape[1]}x{images[0].shape[0]}); resize them to one size first"
            )
        images.append(image)
    return ImageSet(path, np.stack(images))


def check_count(side: Union[ImageSet, FeatureSet], what: str) -> None:
    """Raise a UserError unless the side holds at least :data:`MIN_IMAGES` images."""
    count = len(side.images if isinstance(side, ImageSet) else side.pool)
    if count < MIN_IMAGES:
        raise UserError(f"{what} {side.path}: {count} images; at least {MIN_IMAGES} are needed")


# --------------------------------------------------------------------------- features


def extract_features(
    network: torch.nn.Module,
    network_name: str,
    images: ImageSet,
    batch_size: int = 64,
    device: Optional[torch.device] = None,
    progress: bool = True,
    desc: str = "features",
) -> FeatureSet:
    """
    Run ``network.evaluation_features`` over the images in batches (grey images repeated to 3
    channels), under ``no_grad``, with a progress bar over the batches when ``progress``.
    """
    device = device or torch.device("cpu")
    batches = range(0, len(images.images), batch_size)
    if progress:
        batches = tqdm(batches, desc=desc, unit="batch", leave=False)
    outputs: Dict[str, list] = {}
    with torch.no_grad():
        for start in batches:
            x = torch.from_numpy(images.images[start : start + batch_size]).permute(0, 3, 1, 2)  # NHWC -> NCHW
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            for key, value in network.evaluation_features(x.to(device)).items():
                outputs.setdefault(key, []).append(value.float().cpu().numpy())
    features = {key: np.concatenate(values) for key, values in outputs.items()}
    spatial_mu, spatial_sigma = (
        evaluation.feature_statistics(features["spatial"]) if "spatial" in features else (None, None)
    )
    return FeatureSet(
        path=images.path,
        network=network_name,
        image_size=tuple(images.images.shape[1:3]),
        pool=features["pool"],
        logits=features["logits"],
        spatial_mu=spatial_mu,
        spatial_sigma=spatial_sigma,
        labels=images.labels,
    )


def save_feature_set(features: FeatureSet, path: str) -> None:
    """Write a statistics file (``.npz``, atomically) that :func:`read_side` reads back."""
    arrays = {
        "format": np.array(STATS_FORMAT),
        "network": np.array(features.network),
        "image_size": np.array(features.image_size, dtype=np.int64),
        "pool": features.pool,
        "logits": features.logits,
    }
    optional = {"spatial_mu": features.spatial_mu, "spatial_sigma": features.spatial_sigma, "labels": features.labels}
    arrays.update({key: value for key, value in optional.items() if value is not None})
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _feature_set_from_arrays(path: str, arrays: Dict[str, np.ndarray]) -> FeatureSet:
    if str(arrays["format"]) != STATS_FORMAT or not {"network", "image_size", "pool", "logits"} <= set(arrays):
        raise UserError(f"{path}: not a statistics file of this version ({STATS_FORMAT}); write it again")
    return FeatureSet(
        path=path,
        network=str(arrays["network"]),
        image_size=tuple(int(s) for s in arrays["image_size"]),
        pool=arrays["pool"],
        logits=arrays["logits"],
        spatial_mu=arrays.get("spatial_mu"),
        spatial_sigma=arrays.get("spatial_sigma"),
        labels=arrays.get("labels"),
    )


# --------------------------------------------------------------------------- scores


def compare_sizes(ref: FeatureSet, samples: FeatureSet, network_input: str) -> None:
    """Warn when the two sides' images differ in size (both are resized to the network's input)."""
    if tuple(ref.image_size) != tuple(samples.image_size):
        (rh, rw), (sh, sw) = ref.image_size, samples.image_size
        warnings.warn(
            f"reference images are {rw}x{rh} but samples are {sw}x{sh}: both are resized to {network_input}, "
            "so the scores also measure what the resize does to each",
            stacklevel=2,
        )


def compute_scores(
    ref: FeatureSet,
    samples: FeatureSet,
    nearest_k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    batch_size: int = 512,
    device: str = "cpu",
    class_accuracy: bool = False,
) -> Dict[str, float]:
    """
    Every score of ``samples`` against ``ref`` (see ``evaluation`` for the papers).

    :return: ``inception_score`` and ``inception_score_std`` (of the samples, 10 splits), ``fid``,
        ``sfid`` (when both sides have spatial features), ``precision``, ``recall``, ``kid`` and
        ``kid_std``; with ``class_accuracy`` (the logits are a digit classifier's) and labels on the
        samples, ``class_accuracy``: how often the logits' class is the sample's label.
        Warns (with the counts) when a side has no more images than feature dimensions.
    """
    scores = {}
    scores["inception_score"], scores["inception_score_std"] = evaluation.inception_score(samples.logits, IS_SPLITS)
    dim = ref.pool.shape[1]
    for side, name in ((ref, "reference"), (samples, "samples")):
        evaluation.warn_if_few(len(side.pool), dim, f"FID ({name} {side.path})")
    scores["fid"] = evaluation.frechet_distance(
        *evaluation.feature_statistics(ref.pool), *evaluation.feature_statistics(samples.pool)
    )
    if ref.spatial_mu is not None and samples.spatial_mu is not None:
        for side, name in ((ref, "reference"), (samples, "samples")):
            evaluation.warn_if_few(len(side.pool), len(side.spatial_mu), f"sFID ({name} {side.path})")
        scores["sfid"] = evaluation.frechet_distance(
            ref.spatial_mu, ref.spatial_sigma, samples.spatial_mu, samples.spatial_sigma
        )
    scores["precision"], scores["recall"] = evaluation.precision_recall(
        ref.pool, samples.pool, k=nearest_k, batch_size=batch_size, device=device
    )
    scores["kid"], scores["kid_std"] = evaluation.kernel_inception_distance(
        ref.pool, samples.pool, kid_subsets, kid_subset_size, seed
    )
    if class_accuracy and samples.labels is not None:
        scores["class_accuracy"] = accuracy(samples.logits, samples.labels)
    return scores
