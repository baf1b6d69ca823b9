"""
Closed-form pieces of the variational bound: the KL divergence between two diagonal
Gaussians (every term L_{t-1} of [IDDPM Eq. 5] and the prior term L_T of [IDDPM Eq. 6]) and
the discretized Gaussian decoder likelihood of the data (L_0, [IDDPM Eq. 4], built as in
[DDPM Eq. 13]). All results are in nats; callers divide by ln 2 for bits.
"""

from typing import Union

import numpy as np
import torch

Number = Union[torch.Tensor, float]

# Half the width of one of the 256 quantisation bins of [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Probabilities are clamped to this before the log, so saturated tails stay finite.
_MIN_PROB = 1e-12
# Data at or beyond these values lies in the edge bins, which extend to -inf / +inf.
_EDGE = 0.999


def normal_kl(mean1: Number, logvar1: Number, mean2: Number, logvar2: Number) -> torch.Tensor:
    """
    KL divergence KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Arguments broadcast against each other; any of them may be a Python float (e.g. the
    standard-normal prior ``mean2=0.0, logvar2=0.0``). Floats take the dtype and device of
    the first tensor argument; with no tensor at all, the result is a float64 0-d tensor.

    :return: the broadcast shape, dtype of the tensor arguments.
    """
    like = next((obj for obj in (mean1, logvar1, mean2, logvar2) if isinstance(obj, torch.Tensor)), None)
    if like is None:
        like = torch.zeros((), dtype=torch.float64)
    mean1, logvar1, mean2, logvar2 = (
        obj if isinstance(obj, torch.Tensor) else torch.tensor(obj).to(like) for obj in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """
    A fast approximation of the standard normal CDF,
    ``0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``.

    :param x: any shape and float dtype.
    :return: same shape and dtype, values in [0, 1].
    """
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """
    Log-likelihood of 8-bit image data under a Gaussian discretized to 256 bins of [-1, 1]
    ([DDPM Eq. 13]): the Gaussian mass of the bin ``x +- 1/255``, where the first and last
    bins extend to -inf and +inf. Each probability is clamped to at least 1e-12 before the log.

    :param x: (N, C, ...) data quantized to ``k / 127.5 - 1`` for integer levels k in [0, 255].
    :param means: the Gaussian means, same shape as ``x``.
    :param log_scales: the Gaussian log standard deviations, same shape as ``x``.
    :return: the log-probabilities in nats, same shape as ``x``.
    """
    assert x.shape == means.shape == log_scales.shape
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + _HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - _HALF_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=_MIN_PROB))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=_MIN_PROB))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=_MIN_PROB))
    log_probs = torch.where(
        x < -_EDGE,
        log_cdf_plus,
        torch.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta),
    )
    assert log_probs.shape == x.shape
    return log_probs
