"""
The noise schedules [IDDPM §3.2]: the linear betas of [DDPM §4] scaled to any number of steps
and the cosine schedule of [IDDPM Eq. 17], as float64 NumPy arrays. Re-exported by
:mod:`improved_diffusion.gaussian_diffusion`, where they were first defined.
"""

import math
from typing import Callable

import numpy as np

from .errors import UserError

NOISE_SCHEDULES = ("linear", "cosine")


LINEAR_MIN_STEPS = 20  # fewer: betas above 1; exactly this many: the last beta is 1


def check_linear_steps(steps: int) -> None:
    """A UserError naming ``--diffusion_steps`` unless the linear schedule has more than 20 steps."""
    if steps <= LINEAR_MIN_STEPS:
        raise UserError(
            f"--diffusion_steps {steps}: the linear noise schedule needs more than {LINEAR_MIN_STEPS} steps (with "
            "fewer its betas exceed 1, at exactly 20 the last is 1); use more steps or --noise_schedule cosine"
        )


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """
    The beta schedule called ``schedule_name`` with ``num_diffusion_timesteps`` steps.

    - ``"linear"``: [DDPM §4]'s linear betas from 1e-4 to 0.02 at T=1000, both ends scaled by
      1000/T so that any T gives a similar process. T < 20 makes betas exceed 1 (an error); at
      T = 20, as in the original, the last beta is exactly 1, which a diffusion refuses
      (:func:`check_linear_steps` is the flag-level check: more than 20 steps).
    - ``"cosine"``: [IDDPM Eq. 17] with s = 0.008, betas clipped at 0.999 ([IDDPM §3.2]).

    :return: (T,) float64 betas.
    """
    steps = _check_num_steps(num_diffusion_timesteps)
    if schedule_name == "linear":
        if steps < LINEAR_MIN_STEPS:
            check_linear_steps(steps)
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(steps, lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2)
    allowed = ", ".join(repr(name) for name in NOISE_SCHEDULES)
    raise UserError(f"unknown noise schedule {schedule_name!r} (--noise_schedule): expected one of {allowed}")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """
    Discretize a continuous cumulative product of alphas into betas,
    ``beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)`` ([IDDPM §3.2]).

    :param alpha_bar: maps u in [0, 1] to the fraction of signal kept up to time u.
    :param max_beta: the clip that keeps the last steps from being singular.
    :return: (T,) float64 betas.
    """
    steps = _check_num_steps(num_diffusion_timesteps)
    betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)]
    return np.array(betas, dtype=np.float64)


def _check_num_steps(num_diffusion_timesteps: int) -> int:
    try:
        is_int = (
            not isinstance(num_diffusion_timesteps, bool) and int(num_diffusion_timesteps) == num_diffusion_timesteps
        )
    except (TypeError, ValueError):
        is_int = False
    if not is_int:
        raise UserError(f"--diffusion_steps {num_diffusion_timesteps!r}: expected a positive integer")
    if num_diffusion_timesteps <= 0:
        raise UserError(f"--diffusion_steps {num_diffusion_timesteps}: must be a positive integer")
    return int(num_diffusion_timesteps)


def min_snr_weights(alphas_cumprod: np.ndarray, gamma: float, predicts: str) -> np.ndarray:
    """
    Min-SNR-gamma loss weights [Hang et al. 2023, Eq. 5]: per timestep, the weight of the
    simple (MSE) loss that caps the signal-to-noise ratio SNR_t = abar_t / (1 - abar_t) at
    ``gamma``, so that low-noise steps stop dominating training.

    :param alphas_cumprod: (T,) float64 abar_t.
    :param gamma: the cap (> 0); the paper uses 5.
    :param predicts: what the network predicts: ``"epsilon"`` (weight min(SNR, gamma) / SNR)
        or ``"x_start"`` (weight min(SNR, gamma)).
    :return: (T,) float64 weights.
    """
    if not gamma > 0:
        raise UserError(f"--snr_gamma {gamma}: must be positive (0 turns the weighting off)")
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    capped = np.minimum(snr, gamma)
    if predicts == "epsilon":
        return capped / snr
    if predicts == "x_start":
        return capped
    raise UserError(f"--snr_gamma needs a model predicting epsilon or x_start, not {predicts}")
