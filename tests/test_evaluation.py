"""
The sample-quality statistics on cases with known answers: identical sets (FID 0, precision =
recall = 1), Gaussians with closed-form Fréchet distances (diagonal, full and singular covariances),
disjoint clusters (precision = recall = 0), a hand-worked precision/recall case, the Inception
Score of uniform and one-hot predictions, and KID's unbiasedness by exact enumeration.
"""

import itertools
import warnings

import numpy as np
import pytest
import scipy.linalg

from improved_diffusion.evaluation import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    mmd2_unbiased,
    polynomial_kernel,
    precision_recall,
    warn_if_few,
)

TOL = dict(rtol=1e-9, atol=1e-9)  # float64 statistics


def _random_spd(rng, dim, rank=None):
    a = rng.standard_normal((dim, rank or dim))
    return a @ a.T + (0.0 if rank else 0.1 * np.eye(dim))


def test_identical_sets_have_fid_zero_and_full_precision_recall():
    features = np.random.default_rng(0).standard_normal((200, 16))
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, features.mean(0), **TOL)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), **TOL)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    assert precision_recall(features, features) == (1.0, 1.0)


def test_identical_sets_with_fewer_images_than_dimensions():
    # Rank 9 covariance in 64 dimensions: the symmetric square roots stay real and exact.
    features = np.random.default_rng(1).standard_normal((10, 64))
    mu, sigma = feature_statistics(features)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid = frechet_distance(mu, sigma, mu, sigma)
    assert abs(fid) < 1e-9 * np.trace(sigma)


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    var1, var2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)), expected, **TOL)


def test_full_2x2_covariances_closed_form():
    # For 2x2 M with real positive eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    rng = np.random.default_rng(3)
    for _ in range(5):
        s1, s2 = _random_spd(rng, 2), _random_spd(rng, 2)
        mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
        m = s1 @ s2
        tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), expected, **TOL)


@pytest.mark.parametrize("rank", [None, 3])
def test_scaled_full_covariance_closed_form(rank):
    # S2 = c^2 S1 (S1 full, or singular of rank 3): (S1 S2)^(1/2) = c S1, so FD = (1 - c)^2 tr S1.
    rng = np.random.default_rng(4)
    s1 = _random_spd(rng, 12, rank)
    mu = rng.standard_normal(12)
    np.testing.assert_allclose(frechet_distance(mu, s1, mu, 4.0 * s1), np.trace(s1), **TOL)


def test_full_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(5)
    s1, s2 = _random_spd(rng, 6), _random_spd(rng, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-8, atol=1e-8)


def test_frechet_reports_bad_statistics():
    mu = np.zeros(2)
    with pytest.warns(UserWarning, match="hold NaN or infinity; reporting NaN"):
        assert np.isnan(frechet_distance(mu, np.diag([1.0, np.nan]), mu, np.eye(2)))
    with pytest.warns(UserWarning, match=r"first covariance is not positive semi-definite \(eigenvalue -1"):
        assert np.isfinite(frechet_distance(mu, np.diag([1.0, -1.0]), mu, np.eye(2)))


def test_few_images_warning_names_the_counts():
    with pytest.warns(UserWarning, match=r"FID: 100 images for 2048-dimensional features, .*rank at most 99"):
        warn_if_few(100, 2048, "FID")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_few(2049, 2048, "FID")


def test_disjoint_clusters_have_zero_precision_and_recall():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((100, 5))
    fake = rng.standard_normal((80, 5)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_hand_worked_case():
    # Real 0..9 on a line, k = 3: radius 3 at both ends (9 reaches 12). Fakes -2.5 and 4.5 are
    # inside, 12.5 and 20 outside: precision 1/2. Each fake's 3rd neighbour is the farthest fake,
    # so -2.5's ball (radius 22.5) covers every real point: recall 1.
    real = np.arange(10.0)[:, None]
    fake = np.array([[-2.5], [4.5], [12.5], [20.0]])
    for batch_size in (1, 3, 512):
        assert precision_recall(real, fake, k=3, batch_size=batch_size) == (0.5, 1.0)
    # With k = 1 every real radius is 1: of the fakes only 4.5 is inside, precision 1/4.
    assert precision_recall(real, fake, k=1)[0] == 0.25


def test_inception_score_uniform_and_one_hot():
    classes, splits = 10, 10
    assert inception_score(np.zeros((100, classes)), splits) == pytest.approx((1.0, 0.0), abs=1e-12)
    one_hot = 1000.0 * np.eye(classes)[np.tile(np.arange(classes), splits)]  # every split holds each class once
    mean, std = inception_score(one_hot, splits)
    np.testing.assert_allclose([mean, std], [classes, 0.0], rtol=1e-12, atol=1e-12)
    collapsed = 1000.0 * np.eye(classes)[np.repeat(np.arange(classes), splits)]  # one class per split
    np.testing.assert_allclose(inception_score(collapsed, splits), [1.0, 0.0], rtol=1e-12, atol=1e-12)


def test_inception_score_closed_form_two_classes():
    # p(y|x) = (q, 1-q) for half, (1-q, q) for the other half: p(y) = (1/2, 1/2), IS = exp(log 2 - H(q)).
    q = 0.8
    logits = np.log(np.array([[q, 1 - q], [1 - q, q]] * 50))
    entropy = -(q * np.log(q) + (1 - q) * np.log(1 - q))
    np.testing.assert_allclose(inception_score(logits, 10)[0], np.exp(np.log(2) - entropy), rtol=1e-12)


def test_kid_estimator_is_unbiased_by_exact_enumeration():
    # X, Y: m = n = 2 i.i.d. draws from uniform distributions on 3 points each. The mean of the
    # estimator over all 3^2 x 3^2 equally likely draws must equal the population MMD^2.
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)) + 0.5
    population = polynomial_kernel(a, a).mean() + polynomial_kernel(b, b).mean() - 2 * polynomial_kernel(a, b).mean()
    draws = list(itertools.product(range(3), repeat=2))
    estimates = [mmd2_unbiased(a[list(i)], b[list(j)]) for i in draws for j in draws]
    np.testing.assert_allclose(np.mean(estimates), population, rtol=1e-12, atol=1e-12)
    assert population > 0.1  # a real difference, so the check is not trivially 0 = 0


def test_kid_of_one_distribution_is_near_zero_and_seeded():
    rng = np.random.default_rng(8)
    real, fake = rng.standard_normal((300, 8)), rng.standard_normal((300, 8))
    mean, std = kernel_inception_distance(real, fake, num_subsets=20, subset_size=100, seed=1)
    assert abs(mean) < 3 * std / np.sqrt(20) + 1e-3
    assert kernel_inception_distance(real, fake, 20, 100, seed=1) == (mean, std)
    shifted, _ = kernel_inception_distance(real, fake + 1.0, num_subsets=20, subset_size=100)
    assert shifted > 10 * abs(mean)
    # subset_size larger than both sets: all points in every subset, so every estimate is the same.
    _, spread = kernel_inception_distance(real[:40], fake[:40], num_subsets=3, subset_size=1000)
    assert spread == pytest.approx(0.0, abs=1e-12)
