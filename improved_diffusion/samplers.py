"""
Fast samplers for any trained model of this project, and classifier-free guidance.

The respacing (:mod:`.respace`) decides where the model is evaluated; the sampler decides the
update. Every sampler runs over the diffusion's own steps j = N-1, ..., 0 (a
:class:`~.respace.SpacedDiffusion`'s respaced ones) and ends at the clean data (abar = 1, the
``alphas_cumprod_prev`` of step 0, as DDIM does):

- ``ancestral``: [DDPM Alg. 2], :meth:`~.gaussian_diffusion.GaussianDiffusion.p_sample_loop`;
- ``ddim``: [DDIM Eq. 12] (first order on the probability-flow ODE when eta = 0),
  :meth:`~.gaussian_diffusion.GaussianDiffusion.ddim_sample_loop`;
- ``dpm++2m``: DPM-Solver++(2M) [DPM-Solver++ Alg. 2] (Lu et al. 2022, "DPM-Solver++: Fast
  Solver for Guided Sampling of Diffusion Probabilistic Models"), multistep second order in the
  data-prediction form: :func:`dpm_solver_2m_update`;
- ``dpm++2m-sde``: the same multistep solver on the reverse diffusion SDE instead of the ODE
  (SDE-DPM-Solver++(2M) [DPM-Solver++, SDE variant]): each step solves the linear part exactly and adds the
  matching noise, so that, like the ancestral sampler, it corrects the model's errors instead of
  following them: :func:`dpm_solver_2m_sde_update`;
- ``heun``: Heun's second-order method on the probability-flow ODE [EDM Alg. 1] (Karras et al.
  2022, "Elucidating the Design Space of Diffusion-Based Generative Models", without churn), on
  [EDM Eq. 4] with sigma(t) = tan t, s(t) = cos t: the VP process at the angle
  t = arctan(sigma / alpha), smooth from noise to data: :func:`heun_update`.

The DPM-Solver++ and Heun solvers use only the model's prediction of x_0 (:meth:`p_mean_variance`'s
``pred_xstart``), so epsilon or x_0 prediction, fixed or learned variances, ``rescale_timesteps``,
class labels and ``low_res`` all work unchanged; classifier guidance enters in score form
[ADM Alg. 2] (:meth:`condition_score`), as for DDIM. The solvers' steps run through
the same loop driver as the ancestral and DDIM ones; a step is the only difference.

Classifier-free guidance [CFG Eq. 6] (Ho & Salimans 2022) is a model wrapper,
:func:`classifier_free_guidance`, so every sampler gets it without knowing about it.
"""

import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import UserError
from .gaussian_diffusion import CondFn, GaussianDiffusion, Model, _last_sample

ANCESTRAL, DDIM, DPM_SOLVER_2M, DPM_SOLVER_2M_SDE, HEUN = "ancestral", "ddim", "dpm++2m", "dpm++2m-sde", "heun"
SAMPLERS = (ANCESTRAL, DDIM, DPM_SOLVER_2M, DPM_SOLVER_2M_SDE, HEUN)

# denoise(x (N, C, ...), j) -> the model's pred_xstart at step j, (N, C, ...) float32.
Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
# (alpha, sigma), each (N + 1,) float64: position 0 is the clean data, position j + 1 is step j.
NoiseLevels = Tuple[np.ndarray, np.ndarray]


def resolve_sampler(sampler: str, use_ddim: bool = False) -> str:
    """
    The sampler a run uses: ``--use_ddim True`` is a synonym of ``--sampler ddim``.

    :raises UserError: for an unknown name, or ``--use_ddim True`` beside another sampler.
    """
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if use_ddim and sampler not in (ANCESTRAL, DDIM):
        raise UserError(f"--use_ddim True contradicts --sampler {sampler}: drop --use_ddim (it means --sampler ddim)")
    return DDIM if use_ddim else sampler


def check_sampler(sampler: str, num_steps: int) -> None:
    """
    A UserError naming the flag for an unknown sampler, or for ``heun`` with fewer than two
    steps (its single step would be the final Euler step, i.e. DDIM).

    :param num_steps: the diffusion's number of (respaced) steps.
    """
    resolve_sampler(sampler)
    if num_steps < 1:
        raise UserError(f"--timestep_respacing: {num_steps} steps, expected a positive number")
    if sampler == HEUN and num_steps < 2:
        raise UserError(
            f"--sampler heun needs at least 2 steps (--timestep_respacing gives {num_steps}): "
            "its last step is a plain Euler step; use --sampler ddim for one step"
        )


def network_evaluations(sampler: str, num_steps: int) -> int:
    """
    The number of network evaluations (NFE) per sample: one per step, except ``heun``, which
    evaluates twice per step but once on the last one (to sigma = 0): ``2 N - 1``.
    """
    check_sampler(sampler, num_steps)
    return 2 * num_steps - 1 if sampler == HEUN else num_steps


def sample_loop(diffusion: GaussianDiffusion, model: Model, shape: Sequence[int], **options: Any) -> torch.Tensor:
    """
    Generate samples: :func:`sample_loop_progressive` (same keyword arguments) drained.

    :return: (N, C, ...) the final samples.
    """
    return _last_sample(sample_loop_progressive(diffusion, model, shape, **options))


def sample_loop_progressive(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: Sequence[int],
    *,
    sampler: str = ANCESTRAL,
    noise: Optional[torch.Tensor] = None,
    clip_denoised: bool = True,
    denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    device: Optional[torch.device] = None,
    progress: bool = False,
    eta: float = 0.0,
    cond_fn: Optional[CondFn] = None,
) -> Iterator[Dict[str, torch.Tensor]]:
    """
    Sample with ``sampler`` from x_T = ``noise`` over the diffusion's steps, yielding
    ``{"sample", "pred_xstart"}`` (each (N, C, ...)) after every step; ``sample`` is the state
    at the next step (the clean data after step 0).

    :param diffusion: the (respaced) diffusion; its steps are where the model is evaluated.
    :param model: called as ``model(x, t_model, **model_kwargs)``, as in :meth:`p_mean_variance`.
    :param shape: (N, C, ...) of the samples.
    :param sampler: one of :data:`SAMPLERS`.
    :param noise: (N, C, ...) the start x_T; drawn with ``torch.randn`` when None.
    :param clip_denoised: clip the predicted x_0 to [-1, 1] (the ODE solvers then follow the
        clipped denoiser, as DDIM does).
    :param denoised_fn: applied to the predicted x_0 before clipping.
    :param device: where to sample; defaults to the model's parameters' device.
    :param progress: show a tqdm progress bar over the steps.
    :param eta: DDIM's noise (``ddim`` only).
    :param cond_fn: classifier guidance: of the mean for ``ancestral`` [ADM Alg. 1], of the
        score for the others [ADM Alg. 2].
    """
    check_sampler(sampler, diffusion.num_timesteps)
    if eta != 0.0 and sampler != DDIM:
        raise UserError(f"--eta {eta} only applies to --sampler ddim, not {sampler}")
    loop_args = (model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress)
    if sampler == ANCESTRAL:
        return diffusion.p_sample_loop_progressive(*loop_args, cond_fn=cond_fn)
    if sampler == DDIM:
        return diffusion.ddim_sample_loop_progressive(*loop_args, eta, cond_fn=cond_fn)
    update = {DPM_SOLVER_2M: dpm_solver_2m_update, DPM_SOLVER_2M_SDE: dpm_solver_2m_sde_update}.get(
        sampler, heun_update
    )
    # The ancestral/DDIM loop driver, with an ODE solver's step.
    return diffusion._sample_loop_progressive(_SolverStep(diffusion, update), *loop_args, cond_fn)


def noise_levels(diffusion: GaussianDiffusion) -> NoiseLevels:
    """
    alpha_j = sqrt(abar_j) and sigma_j = sqrt(1 - abar_j) of the VP process [DPM-Solver++ §2],
    float64, with the clean data (alpha = 1, sigma = 0) prepended.

    :return: (alpha, sigma), each (N + 1,): position 0 is the clean data, position j + 1 step j.
    """
    alphas_cumprod = np.append(1.0, np.asarray(diffusion.alphas_cumprod, dtype=np.float64))
    return np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod)


def dpm_solver_2m_update(
    denoise: Denoiser,
    x: torch.Tensor,
    j: int,
    levels: NoiseLevels,
    previous_xstart: Optional[torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """
    One step of DPM-Solver++(2M) [DPM-Solver++ Alg. 2] from step j to step j - 1 (to the clean
    data after step 0), with lambda = log(alpha / sigma) and h = lambda_{j-1} - lambda_j:

        x_{j-1} = (sigma_{j-1} / sigma_j) x_j - alpha_{j-1} (e^{-h} - 1) D,
        D = (1 + 1 / (2 r)) x0_j - 1 / (2 r) x0_{j+1},   r = h_prev / h,

    with D = x0_j (first order, the DDIM step) on the first step (no history) and on the last
    two: into step 0, whose lambda (abar_0 = 1 - beta_0) is far beyond the others, so that the
    linear extrapolation over h overshoots (the "lower order final" steps of Lu et al.'s and
    diffusers' implementations; first order there still leaves an error of order sigma_1^2 /
    alpha_1^2 ~ 1 / N^2), and to the clean data, where sigma = 0 and lambda is infinite, so
    x_{-1} = x0_0.

    :param denoise: the model's x_0 prediction at a step.
    :param x: (N, C, ...) x_j.
    :param j: the current step.
    :param levels: :func:`noise_levels` of the diffusion.
    :param previous_xstart: (N, C, ...) x0 predicted at step j + 1, or None on the first step.
    :return: dict with ``sample`` (x_{j-1}) and ``pred_xstart`` (x0_j), each (N, C, ...).
    """
    alpha, sigma = levels
    s, t = j + 1, j  # positions in levels: from step j to step j - 1
    pred_xstart = denoise(x, j)
    if sigma[t] == 0.0:
        return {"sample": pred_xstart, "pred_xstart": pred_xstart}
    h, r = _step_and_ratio(levels, j, previous_xstart)
    derivative = pred_xstart
    if r is not None:
        derivative = (1 + 1 / (2 * r)) * pred_xstart - (1 / (2 * r)) * previous_xstart
    sample = (sigma[t] / sigma[s]) * x - (alpha[t] * math.expm1(-h)) * derivative
    return {"sample": sample, "pred_xstart": pred_xstart}


def dpm_solver_2m_sde_update(
    denoise: Denoiser,
    x: torch.Tensor,
    j: int,
    levels: NoiseLevels,
    previous_xstart: Optional[torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """
    One step of SDE-DPM-Solver++(2M) [DPM-Solver++, SDE variant] from step j to step j - 1. In lambda the
    reverse diffusion SDE in data-prediction form has the exact solution

        x_{j-1} = (sigma_{j-1} / sigma_j) e^{-h} x_j + sigma_{j-1} sqrt(1 - e^{-2h}) z
                  + 2 alpha_{j-1} int e^{-2 (lambda_{j-1} - lambda)} x0(lambda) dlambda,   z ~ N(0, I),

    the integral over [lambda_j, lambda_{j-1}], h = lambda_{j-1} - lambda_j. With x0 held at x0_j
    (first order) the step is the posterior q(x_{j-1} | x_j, x_0 = x0_j) of [DDPM Eq. 6-7], i.e.
    DDIM with eta = 1; the second order takes x0 linear in lambda through the last two predictions,
    whose integral adds

        alpha_{j-1} (h - (1 - e^{-2h}) / 2) / (r h) (x0_j - x0_{j+1}),   r = h_prev / h.

    First order on the first step and into step 0, and x_{-1} = x0_0 at the clean data, as in
    :func:`dpm_solver_2m_update` (same reasons). The noise z comes from the global RNG, as in
    :meth:`~.gaussian_diffusion.GaussianDiffusion.p_sample`.

    Arguments and return value as in :func:`dpm_solver_2m_update`.
    """
    alpha, sigma = levels
    s, t = j + 1, j
    pred_xstart = denoise(x, j)
    if sigma[t] == 0.0:
        return {"sample": pred_xstart, "pred_xstart": pred_xstart}
    h, r = _step_and_ratio(levels, j, previous_xstart)
    fresh = -math.expm1(-2.0 * h)  # 1 - e^{-2h}: the share of new noise in x_{j-1}'s variance
    sample = (sigma[t] / sigma[s] * math.exp(-h)) * x + (alpha[t] * fresh) * pred_xstart
    if r is not None:
        sample = sample + (alpha[t] * (h - fresh / 2) / (r * h)) * (pred_xstart - previous_xstart)
    sample = sample + (sigma[t] * math.sqrt(fresh)) * torch.randn_like(x)
    return {"sample": sample, "pred_xstart": pred_xstart}


def heun_update(
    denoise: Denoiser,
    x: torch.Tensor,
    j: int,
    levels: NoiseLevels,
    previous_xstart: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """
    One step of Heun's method [EDM Alg. 1; no churn] on the probability-flow ODE [EDM Eq. 4]
    from step j to step j - 1: an Euler step, then, unless sigma = 0 there (the last step), the
    trapezoidal correction with a second evaluation at step j - 1.

    The ODE is [EDM Eq. 4] with sigma(t) = tan t and s(t) = cos t, i.e. the VP process
    x = cos(t) x_0 + sin(t) eps at the angle t = arctan(sigma / alpha), where it reads
    dx/dt = (cos(t) x - D(x)) / sin(t) = alpha eps - sigma x_0 (Alg. 1, line 4). In t the
    trajectories are smooth from pure noise to the data, so uniformly respaced steps suit it
    (for the cosine schedule they are uniform in t); EDM's sigma(t) = t would put the whole
    range sigma / alpha in [~6, ~1e4] of a cosine model's first respaced step into one
    trapezoid.

    Arguments as in :func:`dpm_solver_2m_update`; ``previous_xstart`` is not used (one step).

    :return: dict with ``sample`` (x_{j-1}) and ``pred_xstart`` (x0_j), each (N, C, ...).
    """
    s, t = j + 1, j
    step = _angle(levels, t) - _angle(levels, s)
    pred_xstart = denoise(x, j)
    d = _angle_slope(levels, s, x, pred_xstart)  # line 4
    sample = x + step * d  # line 5: Euler
    if levels[1][t] != 0.0:  # lines 6-8: the second-order correction
        d_next = _angle_slope(levels, t, sample, denoise(sample, j - 1))
        sample = x + step * (0.5 * d + 0.5 * d_next)
    return {"sample": sample, "pred_xstart": pred_xstart}


def _angle(levels: NoiseLevels, position: int) -> float:
    """t = arctan(sigma / alpha) at a position of :func:`noise_levels` (0 for the clean data)."""
    alpha, sigma = levels
    return float(np.arctan2(sigma[position], alpha[position]))


def _angle_slope(levels: NoiseLevels, position: int, x: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
    """dx/dt = (cos(t) x - x_0) / sin(t) [EDM Eq. 4 with sigma(t) = tan t, s(t) = cos t] at a noisy position."""
    alpha, sigma = levels
    return (alpha[position] * x - pred_xstart) / sigma[position]


def _step_and_ratio(
    levels: NoiseLevels, j: int, previous_xstart: Optional[torch.Tensor]
) -> Tuple[float, Optional[float]]:
    """
    The multistep solvers' step from step j to step j - 1 in lambda, h = lambda_{j-1} - lambda_j,
    and the ratio r = h_prev / h of the previous step to it, or None where the step stays first
    order: without history, and into step 0 (position 1 of :func:`noise_levels`).
    """
    s, t = j + 1, j
    h = _log_snr(levels, t) - _log_snr(levels, s)
    if previous_xstart is None or t <= 1:
        return h, None
    return h, (_log_snr(levels, s) - _log_snr(levels, s + 1)) / h


def _log_snr(levels: NoiseLevels, position: int) -> float:
    """lambda = log(alpha / sigma) at a position of :func:`noise_levels` (not the clean data)."""
    alpha, sigma = levels
    return float(np.log(alpha[position]) - np.log(sigma[position]))


class _SolverStep:
    """
    An ODE solver's update as a step of the diffusion's loop driver: it turns the driver's
    ``(model, x, t, ...)`` call into a denoiser (``pred_xstart`` of :meth:`p_mean_variance`,
    guided in score form by ``cond_fn`` [ADM Alg. 2]) and keeps the previous x_0 prediction
    for the multistep solver.
    """

    def __init__(self, diffusion: GaussianDiffusion, update: Callable[..., Dict[str, torch.Tensor]]):
        self.diffusion = diffusion
        self.update = update
        self.levels = noise_levels(diffusion)
        self.previous_xstart: Optional[torch.Tensor] = None

    def __call__(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]],
        model_kwargs: Optional[Dict[str, Any]],
        cond_fn: Optional[CondFn],
    ) -> Dict[str, torch.Tensor]:
        def denoise(x_j: torch.Tensor, j: int) -> torch.Tensor:
            t_j = torch.full((x_j.shape[0],), j, dtype=torch.long, device=x_j.device)
            out = self.diffusion.p_mean_variance(model, x_j, t_j, clip_denoised, denoised_fn, model_kwargs)
            if cond_fn is not None:
                out = self.diffusion.condition_score(cond_fn, out, x_j, t_j, model_kwargs)
            return out["pred_xstart"]

        out = self.update(denoise, x, int(t[0]), self.levels, self.previous_xstart)
        self.previous_xstart = out["pred_xstart"]
        return out


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance [CFG]


def classifier_free_guidance(model: Model, guidance_scale: float, null_label: int) -> Model:
    """
    A guided model from a conditional one trained with label dropout [CFG Eq. 6]: the
    conditional and unconditional (``y = null_label``) halves run in ONE batched forward pass,
    and the mean channels become ``uncond + w (cond - uncond)``, with w = 1 + the paper's w (so
    w = 1 is the plain conditional model, w = 0 the unconditional one). For epsilon (or x_0)
    prediction this is [CFG Eq. 6]'s eps~ = (1 + w') eps(z, c) - w' eps(z). Learned variance
    channels come from the conditional half.

    :param model: called as ``model(x, t, y=labels, **other_kwargs)``, returning (N, C_out, ...)
        with C_out = C or 2C for x's C channels.
    :param guidance_scale: w.
    :param null_label: the label index of "no label" (the label table's extra row).
    :return: a model with the same call and output shape; other tensor kwargs (e.g.
        ``low_res``) are repeated for both halves.
    """
    return _GuidedModel(model, guidance_scale, null_label)


class _GuidedModel:
    """See :func:`classifier_free_guidance`."""

    def __init__(self, model: Model, guidance_scale: float, null_label: int):
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.null_label = int(null_label)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The wrapped model's parameters (the sampling loops read the device from them)."""
        return iter(self.model.parameters()) if hasattr(self.model, "parameters") else iter(())

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, **kwargs: Any
    ) -> torch.Tensor:
        if y is None:
            raise UserError("--guidance_scale needs class labels y (a class-conditional model, --class_cond True)")
        channels = x.shape[1]
        null = torch.full_like(y, self.null_label)
        doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        both = self.model(torch.cat([x, x]), torch.cat([t, t]) if t.dim() else t, y=torch.cat([y, null]), **doubled)
        cond, uncond = both.chunk(2)  # (N, C_out, ...) each
        mean = uncond[:, :channels] + self.guidance_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([mean, cond[:, channels:]], dim=1)
