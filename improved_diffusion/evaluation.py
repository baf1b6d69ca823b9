"""
Sample-quality statistics computed from network features, in float64; no network inside.

- FID [Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash
  equilibrium"]: the Fréchet (2-Wasserstein) distance between
  Gaussians fit to the two feature sets, ``|mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``
  (:func:`feature_statistics`, :func:`frechet_distance`).
- sFID [Nash et al. 2021, "Generating images with sparse representations"]: the same distance
  on spatial features (the Inception network's intermediate 7 x 17 x 17 tensor).
- Inception Score [Salimans et al. 2016, "Improved techniques for training GANs", §4]:
  ``exp(E_x KL(p(y|x) || p(y)))`` over 10 splits (:func:`inception_score`).
- Improved precision and recall [Kynkäänniemi et al. 2019, "Improved precision and recall metric
  for assessing generative models"]: each set's manifold is the union of balls reaching
  each point's k-th nearest neighbour (k = 3); precision is the fraction of samples inside the
  reference manifold, recall the fraction of reference points inside the sample manifold
  (:func:`precision_recall`), computed in blocks so no N x N distance matrix is held.
- KID [Bińkowski et al. 2018, "Demystifying MMD GANs"]: the unbiased estimate of
  the squared MMD with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over
  random subsets (:func:`mmd2_unbiased`, :func:`kernel_inception_distance`).

Features are (N, D) arrays of any float dtype; every statistic is computed in float64.
"""

import warnings
from typing import Tuple

import numpy as np
import torch

# Eigenvalues below -NEGATIVE_EIGEN_TOL * (largest eigenvalue) mean a covariance is not positive
# semi-definite beyond rounding: reported, then clipped to 0.
NEGATIVE_EIGEN_TOL = 1e-6


def warn_if_few(num_images: int, dim: int, what: str) -> None:
    """Warn (with the counts) when ``num_images`` cannot give a full-rank ``dim``-dimensional covariance."""
    if num_images <= dim:
        warnings.warn(
            f"{what}: {num_images} images for {dim}-dimensional features, so the covariance has rank "
            f"at most {num_images - 1} and the Fréchet distance is unreliable (and biased upwards); "
            f"use more than {dim} images (50,000 is the usual number)",
            stacklevel=2,
        )


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """
    Mean and covariance of the Gaussian fit to the features [Heusel et al. 2017].

    :param features: (N, D), N >= 2.
    :return: ``(mu, sigma)``: (D,) and (D, D) float64; ``sigma`` is the unbiased (N - 1) estimate.
    """
    features = np.asarray(features, dtype=np.float64)
    assert features.ndim == 2 and len(features) >= 2, features.shape
    mu = features.mean(axis=0)
    centred = features - mu
    sigma = centred.T @ centred / (len(features) - 1)
    return mu, sigma


def _psd_eigenvalues(matrix: np.ndarray, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric matrix, eigenvalues within rounding of 0 set to 0 (negative ones reported)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    scale = max(float(np.abs(values).max(initial=0.0)), np.finfo(np.float64).tiny)
    if values.min(initial=0.0) < -NEGATIVE_EIGEN_TOL * scale:
        warnings.warn(
            f"Fréchet distance: {what} is not positive semi-definite (eigenvalue {values.min():.3g}, "
            f"largest {scale:.3g}); negative eigenvalues are clipped to 0",
            stacklevel=3,
        )
    # Eigenvalues within the decomposition's rounding (about D * eps * largest) of 0 are 0: their
    # square roots would otherwise add sqrt(rounding) each, 1e-6 and more for singular covariances.
    noise_floor = len(values) * np.finfo(np.float64).eps * scale
    return np.where(values > noise_floor, values, 0.0), vectors


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """
    ``tr((S_1 S_2)^(1/2))`` for symmetric positive semi-definite ``S_1``, ``S_2``.

    ``S_1 S_2`` is similar to the symmetric ``S_1^(1/2) S_2 S_1^(1/2)``, so the trace is the sum of
    the square roots of that matrix's eigenvalues. Only symmetric eigen-decompositions are used,
    which stay real and finite for singular or near-singular covariances (fewer images than
    dimensions), where a general matrix square root can fail or turn complex.
    """
    values, vectors = _psd_eigenvalues(sigma1, "the first covariance")
    sqrt1 = (vectors * np.sqrt(values)) @ vectors.T
    inner, _ = _psd_eigenvalues(sqrt1 @ sigma2 @ sqrt1, "S1^(1/2) S2 S1^(1/2)")
    return float(np.sqrt(inner).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """
    Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) [Heusel et al. 2017]: FID on
    ``pool_3`` features, sFID [Nash et al. 2021] on spatial features.

    :param mu1, mu2: (D,) means. :param sigma1, sigma2: (D, D) covariances.
    :return: the distance (>= 0 up to rounding), or NaN with a warning when an input is not finite.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2)]
    mu1, sigma1, mu2, sigma2 = arrays
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape == mu1.shape * 2, (mu1.shape, sigma1.shape)
    if not all(np.isfinite(a).all() for a in arrays):
        warnings.warn("Fréchet distance: the feature statistics hold NaN or infinity; reporting NaN", stacklevel=2)
        return float("nan")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def inception_score(logits: np.ndarray, splits: int = 10) -> Tuple[float, float]:
    """
    Inception Score [Salimans et al. 2016]: ``exp(mean_x KL(p(y|x) || p(y)))`` in each of
    ``splits`` consecutive parts of the samples, ``p(y)`` being that part's mean prediction.

    :param logits: (N, C) class logits (any float dtype), N >= splits.
    :return: ``(mean, std)`` of the per-split scores; between 1 (all predictions equal) and C.
    """
    logits = np.asarray(logits, dtype=np.float64)
    assert logits.ndim == 2 and len(logits) >= splits >= 1, (logits.shape, splits)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))  # log softmax
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        part = slice(i * len(p) // splits, (i + 1) * len(p) // splits)
        p_y = p[part].mean(axis=0)
        log_py = np.log(p_y, out=np.zeros_like(p_y), where=p_y > 0)  # a class no sample predicts adds 0
        kl = (p[part] * (log_p[part] - log_py)).sum(axis=1)  # where p underflowed to 0 the term is 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, D), (m, D) float64 -> (n, m) squared Euclidean distances, clipped at 0."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min_(0.0)


def manifold_radii(features: torch.Tensor, k: int = 3, batch_size: int = 512) -> torch.Tensor:
    """
    Squared distance from each point to its k-th nearest other point [Kynkäänniemi et al. 2019].

    :param features: (N, D) float64, N > k.
    :param batch_size: rows of the distance matrix computed at once ((batch_size, N) in memory).
    :return: (N,) float64 squared radii.
    """
    assert len(features) > k, (len(features), k)
    radii = [
        _squared_distances(block, features).kthvalue(k + 1, dim=1).values  # the point itself is the 1st
        for block in features.split(batch_size)
    ]
    return torch.cat(radii)


def fraction_in_manifold(
    points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, batch_size: int = 512
) -> float:
    """
    Fraction of ``points`` within distance ``sqrt(radii[j])`` of some ``manifold[j]``
    [Kynkäänniemi et al. 2019].

    :param points: (N, D) float64. :param manifold: (M, D) float64. :param radii: (M,) squared radii.
    """
    inside = [(_squared_distances(block, manifold) <= radii[None, :]).any(dim=1) for block in points.split(batch_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real: np.ndarray,
    fake: np.ndarray,
    k: int = 3,
    batch_size: int = 512,
    device: str = "cpu",
) -> Tuple[float, float]:
    """
    Improved precision and recall [Kynkäänniemi et al. 2019] with k-nearest-neighbour manifolds.

    :param real: (N, D) reference features. :param fake: (M, D) sample features; N, M > k.
    :param batch_size: distance rows per block, so at most (batch_size, max(N, M)) distances are held.
    :param device: where the float64 distances are computed.
    :return: ``(precision, recall)`` in [0, 1].
    """
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    real_radii = manifold_radii(real_t, k, batch_size)
    fake_radii = manifold_radii(fake_t, k, batch_size)
    precision = fraction_in_manifold(fake_t, real_t, real_radii, batch_size)
    recall = fraction_in_manifold(real_t, fake_t, fake_radii, batch_size)
    return precision, recall


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel [Bińkowski et al. 2018]: ``(x.y / D + 1)^3`` for (n, D), (m, D) -> (n, m) float64."""
    return (np.asarray(x, np.float64) @ np.asarray(y, np.float64).T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """
    Unbiased estimate of the squared MMD between the distributions of ``x`` and ``y``
    [Bińkowski et al. 2018; Gretton et al. 2012]: the kernel means with the ``i = j`` terms left out.

    :param x: (m, D), m >= 2. :param y: (n, D), n >= 2.
    """
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_inception_distance(
    real: np.ndarray,
    fake: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> Tuple[float, float]:
    """
    KID [Bińkowski et al. 2018]: :func:`mmd2_unbiased` averaged over ``num_subsets`` random subsets
    of ``min(subset_size, N, M)`` points drawn without replacement from each set.

    :param real: (N, D). :param fake: (M, D); N, M >= 2.
    :return: ``(mean, std)`` over the subsets.
    """
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(real), len(fake))
    values = [
        mmd2_unbiased(
            real[rng.choice(len(real), size, replace=False)],
            fake[rng.choice(len(fake), size, replace=False)],
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))
