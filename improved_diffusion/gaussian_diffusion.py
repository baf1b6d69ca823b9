"""
The Gaussian diffusion process of [DDPM] with the improvements of [IDDPM]: the forward
process and its posterior (§2), learned reverse-process variances and the hybrid objective
(§3.1), the cosine noise schedule (§3.2), the variational bound in bits per dimension (§2,
§3.1) and deterministic DDIM sampling [DDIM §4]. Schedules and every per-timestep
coefficient are NumPy float64 arrays computed once; everything done with a model's output
is float32 (the network itself may run under autocast).

Paper equation -> function (equation numbers as printed in the papers):

- [IDDPM Eq. 7-9] q(x_t | x_0) and its reparametrised sample: ``q_mean_variance``, ``q_sample``
- [IDDPM Eq. 8] alpha_t, abar_t and every derived table: ``GaussianDiffusion.__init__``
- [IDDPM Eq. 10-12] posterior q(x_{t-1} | x_t, x_0): ``q_posterior_mean_variance``
- [IDDPM Eq. 2] reverse step p(x_{t-1} | x_t): ``p_mean_variance``
- [IDDPM Eq. 9] solved for x_0 / for eps: ``_predict_xstart_from_eps``, ``_predict_eps_from_xstart``
- [IDDPM Eq. 11] solved for x_0: ``_predict_xstart_from_xprev``
- [IDDPM Eq. 13] = [DDPM Eq. 11] mean from eps: ``p_mean_variance`` (posterior mean of pred_xstart)
- [IDDPM Eq. 15] learned-range variance: ``_model_variance`` (behind ``p_mean_variance``)
- [DDPM Alg. 2] ancestral sampling: ``p_sample``, ``p_sample_loop(_progressive)``
- [IDDPM Eq. 14] L_simple, [IDDPM Eq. 16] L_hybrid (stop-gradient on the mean): ``training_losses``
- [IDDPM Eq. 4, 5] bound terms L_0 and L_{t-1} in bits: ``_vb_terms_bpd``
- [DDPM Eq. 13] discretized decoder: :func:`.losses.discretized_gaussian_log_likelihood`
- [IDDPM Eq. 6] prior term L_T: ``_prior_bpd``
- [IDDPM Eq. 3] the whole bound in bits/dim: ``calc_bpd_loop``
- [IDDPM Eq. 17] and §3.2 (beta clipped at 0.999) cosine schedule: ``get_named_beta_schedule``,
  ``betas_for_alpha_bar`` (in :mod:`.schedules`, re-exported here)
- [DDIM Eq. 12] step with sigma_t(eta) of [DDIM Eq. 16]: ``ddim_sample``, ``ddim_sample_loop(_progressive)``
- [DDIM §4.3] (reversing the ODE of [DDIM Eq. 14]) DDIM encoding: ``ddim_reverse_sample``
- [ADM Alg. 1] classifier guidance of the ancestral mean: ``condition_mean`` (``p_sample(cond_fn=)``)
- [ADM Alg. 2] classifier guidance of the score (eps): ``condition_score`` (``ddim_sample(cond_fn=)``)

Strided (respaced) sampling, [IDDPM §4], lives in :mod:`.respace`; importance sampling of t
([IDDPM Eq. 18]) in :mod:`.resample`; the ODE solvers DPM-Solver++(2M) [DPM-Solver++ Alg. 2] and
Heun [EDM Alg. 1] and classifier-free guidance [CFG Eq. 6] in :mod:`.samplers` (through
``_sample_loop_progressive``).
"""

import enum
import functools
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import UserError
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat
from .schedules import NOISE_SCHEDULES as NOISE_SCHEDULES  # re-exported: the schedules were defined here
from .schedules import betas_for_alpha_bar as betas_for_alpha_bar
from .schedules import check_linear_steps as check_linear_steps
from .schedules import get_named_beta_schedule as get_named_beta_schedule
from .schedules import min_snr_weights

Model = Callable[..., torch.Tensor]
# cond_fn(x_t, t, **model_kwargs) -> the gradient s * grad_x log p(y | x_t), shaped like x_t [ADM §4].
CondFn = Callable[..., torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Enums


class ModelMeanType(enum.Enum):
    """What the model's mean channels predict."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise eps [DDPM Eq. 11]


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained."""

    LEARNED = enum.auto()  # the model outputs log-variances directly
    FIXED_SMALL = enum.auto()  # the posterior variance beta-tilde [IDDPM Eq. 12]
    FIXED_LARGE = enum.auto()  # beta (beta-tilde_1 at t = 0)
    LEARNED_RANGE = enum.auto()  # interpolation between the two in log space [IDDPM Eq. 15]


class LossType(enum.Enum):
    """The training objective."""

    MSE = enum.auto()  # L_simple [IDDPM Eq. 14], plus one bound term L_t for learned variances
    RESCALED_MSE = enum.auto()  # L_hybrid [IDDPM Eq. 16]: lambda = 0.001 times L_vlb ~ T * L_t
    KL = enum.auto()  # one variational bound term L_t [IDDPM Eq. 4, 5]
    RESCALED_KL = enum.auto()  # as KL, times T: an estimate of the whole bound [IDDPM Eq. 3]

    def is_vb(self) -> bool:
        """True for the pure variational-bound losses (KL, RESCALED_KL)."""
        return self in (LossType.KL, LossType.RESCALED_KL)


# ---------------------------------------------------------------------------------------------
# The one place schedule arrays become tensors

# (id(array), device) -> (weak reference to the array, its float64 copy on that device).
_DEVICE_TABLES: Dict[Tuple[int, torch.device], Tuple[weakref.ref, torch.Tensor]] = {}


def _device_table(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """A cached float64 copy of ``arr`` on ``device``; dropped when ``arr`` is garbage-collected."""
    key = (id(arr), device)
    hit = _DEVICE_TABLES.get(key)
    if hit is not None and hit[0]() is arr:
        return hit[1]
    table = torch.tensor(np.asarray(arr, dtype=np.float64), device=device)
    _DEVICE_TABLES[key] = (weakref.ref(arr, lambda _ref, key=key: _DEVICE_TABLES.pop(key, None)), table)
    return table


def _extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: Sequence[int]) -> torch.Tensor:
    """
    Gather ``arr[timesteps]`` from a float64 schedule array, cast to float32 and broadcast.

    The gather is done in float64 on the device (one cached copy per array and device), then
    cast to float32, so every coefficient is the float32 rounding of the float64 value.

    :param arr: (T,) float64 NumPy array.
    :param timesteps: (N,) int64 indices into ``arr``.
    :param broadcast_shape: the shape to broadcast to, starting with N.
    :return: float32 tensor of ``broadcast_shape`` (a broadcast view).
    """
    res = _device_table(arr, timesteps.device)[timesteps].float()
    while res.dim() < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


# ---------------------------------------------------------------------------------------------
# The diffusion process


class GaussianDiffusion:
    """
    Utilities for training and sampling diffusion models ([DDPM], [IDDPM]).

    :param betas: (T,) float64 betas, each in (0, 1), e.g. from :func:`get_named_beta_schedule`.
    :param model_mean_type: what the model's mean channels predict.
    :param model_var_type: how the variance is obtained (learned types need 2C output channels).
    :param loss_type: the training objective.
    :param rescale_timesteps: pass ``t * 1000 / T`` (float32) to the model instead of integer t,
        so that the model sees the same range whatever T is.
    """

    def __init__(
        self,
        *,
        betas: np.ndarray,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
        snr_gamma: float = 0.0,
    ) -> None:
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise UserError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas < 1).all()):
            raise UserError(
                f"betas must lie in (0, 1), got values in [{betas.min()}, {betas.max()}] "
                "(a linear schedule needs more than 20 diffusion steps)"
            )
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        # [IDDPM Eq. 8]: alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s.
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        # Min-SNR-gamma weights of the simple loss (None: unweighted, the original's loss).
        predicts = {ModelMeanType.EPSILON: "epsilon", ModelMeanType.START_X: "x_start"}.get(model_mean_type, "x_prev")
        self.mse_weights = min_snr_weights(self.alphas_cumprod, snr_gamma, predicts) if snr_gamma else None

        # q(x_t | x_0) [IDDPM Eq. 9] and its inversion for x_0.
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0) [IDDPM Eq. 10-12]. The variance is 0 at t = 0, so its log is
        # clipped to the value at t = 1 (to beta_0 for a single step, e.g. --timestep_respacing 1).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        first_variance = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first_variance, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # Private derived tables, kept so that each has one cached device copy.
        self._one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self._log_betas = np.log(betas)
        self._large_variance = np.append(first_variance, betas[1:])
        self._large_log_variance = np.log(self._large_variance)
        self._xprev_coef1 = 1.0 / self.posterior_mean_coef1
        self._xprev_coef2 = self.posterior_mean_coef2 / self.posterior_mean_coef1

    # -- forward process ----------------------------------------------------------------------

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The distribution q(x_t | x_0) [IDDPM Eq. 7].

        :param x_start: (N, C, ...) noiseless inputs.
        :param t: (N,) int64 timesteps (0 is the first step).
        :return: (mean, variance, log_variance), each broadcast to x_start's shape.
        """
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(self._one_minus_alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Diffuse the data by t steps: a sample of q(x_t | x_0) [IDDPM Eq. 9].

        :param x_start: (N, C, ...) noiseless inputs.
        :param t: (N,) int64 timesteps.
        :param noise: standard normal noise like x_start; drawn when None.
        :return: x_t, same shape as x_start.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The posterior q(x_{t-1} | x_t, x_0) [IDDPM Eq. 10-12].

        :param x_start: (N, C, ...) x_0.
        :param x_t: (N, C, ...) x_t.
        :param t: (N,) int64 timesteps.
        :return: (posterior_mean, posterior_variance, posterior_log_variance_clipped), each
            of x_t's shape.
        """
        assert x_start.shape == x_t.shape
        shape = x_t.shape
        posterior_mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, shape) * x_t
        )
        posterior_variance = _extract_into_tensor(self.posterior_variance, t, shape)
        posterior_log_variance_clipped = _extract_into_tensor(self.posterior_log_variance_clipped, t, shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # -- reverse process ----------------------------------------------------------------------

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the model receives for timesteps t: float32 ``t * 1000 / T`` or t itself."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def _call_model(
        self, fn: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, model_kwargs: Optional[Dict[str, Any]]
    ) -> torch.Tensor:
        """``fn(x, timesteps the model sees, **model_kwargs)``: the model, or a ``cond_fn``, which sees the same t."""
        return fn(x, self._scale_timesteps(t), **(model_kwargs or {}))

    def _model_output(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: Optional[Dict[str, Any]]
    ) -> torch.Tensor:
        """Run the model and return its output in float32 (the precision boundary)."""
        return self._call_model(model, x, t, model_kwargs).float()

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Apply the model to get p(x_{t-1} | x_t) [IDDPM Eq. 2] and a prediction of x_0.

        :param model: called as ``model(x, scaled_t, **model_kwargs)``; returns (N, C, ...) or,
            for learned variances, (N, 2C, ...).
        :param x: (N, C, ...) x_t.
        :param t: (N,) int64 timesteps.
        :param clip_denoised: clip the predicted x_0 to [-1, 1].
        :param denoised_fn: applied to the predicted x_0 before clipping.
        :param model_kwargs: extra keyword arguments for the model (e.g. ``y``, ``low_res``).
        :return: dict with ``mean``, ``variance``, ``log_variance`` and ``pred_xstart``, each
            (N, C, ...) float32.
        """
        model_output = self._model_output(model, x, t, model_kwargs)
        return self._p_from_model_output(model_output, x, t, clip_denoised, denoised_fn)

    def _p_from_model_output(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]],
    ) -> Dict[str, torch.Tensor]:
        """:meth:`p_mean_variance` for a float32 model output already computed."""
        assert t.shape == (x.shape[0],)
        # 1. Variance: learned [IDDPM Eq. 15] or fixed (beta-tilde [IDDPM Eq. 12], or beta).
        model_output, model_variance, model_log_variance = self._model_variance(model_output, x, t)

        # 2. Predicted x_0, then the mean as the posterior mean at that x_0 [IDDPM Eq. 11, 13].
        def process_xstart(pred: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                pred = denoised_fn(pred)
            return pred.clamp(-1, 1) if clip_denoised else pred

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        elif self.model_mean_type in (ModelMeanType.START_X, ModelMeanType.EPSILON):
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:
            raise NotImplementedError(self.model_mean_type)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _model_variance(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The reverse-process variance for ``model_var_type``.

        :param model_output: (N, C, ...) or, for learned variances, (N, 2C, ...) float32.
        :return: (mean channels (N, C, ...), variance, log_variance), the last two of x's shape.
        """
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x.shape[:2]
            assert model_output.shape == (B, C * 2, *x.shape[2:])
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                # [IDDPM Eq. 15]: v in [-1, 1] becomes the weight (v + 1) / 2 of log beta_t
                # against log beta-tilde_t.
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(self._log_betas, t, x.shape)
                frac = (model_var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
            return model_output, torch.exp(model_log_variance), model_log_variance
        if self.model_var_type == ModelVarType.FIXED_LARGE:
            # beta_t, with beta-tilde_1 at t = 0 so that the decoder variance is sensible.
            variance, log_variance = self._large_variance, self._large_log_variance
        else:
            variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
        return (
            model_output,
            _extract_into_tensor(variance, t, x.shape),
            _extract_into_tensor(log_variance, t, x.shape),
        )

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 from x_t and eps: [IDDPM Eq. 9] solved for x_0."""
        assert x_t.shape == eps.shape
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor) -> torch.Tensor:
        """x_0 from x_t and the posterior mean of x_{t-1}: [IDDPM Eq. 11] solved for x_0."""
        assert x_t.shape == xprev.shape
        return (
            _extract_into_tensor(self._xprev_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self._xprev_coef2, t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """eps from x_t and x_0: [IDDPM Eq. 9] solved for eps."""
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    # -- classifier guidance [ADM §4] ------------------------------------------------------------

    def _cond_gradient(
        self, cond_fn: CondFn, x: torch.Tensor, t: torch.Tensor, model_kwargs: Optional[Dict[str, Any]]
    ) -> torch.Tensor:
        """``cond_fn`` at (x_t, t) in float32, with gradients enabled (sampling loops run under no_grad)."""
        with torch.enable_grad():
            return self._call_model(cond_fn, x, t, model_kwargs).float()

    def condition_mean(
        self,
        cond_fn: CondFn,
        p_mean_var: Dict[str, torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> torch.Tensor:
        """
        The guided mean of an ancestral step, ``mean + variance * cond_fn(x_t, t)`` [ADM Alg. 1].

        :param cond_fn: called as ``cond_fn(x_t, t_model, **model_kwargs)`` with the timesteps
            the model sees (the original indices under respacing); returns s * grad log p(y|x_t).
        :param p_mean_var: the output of :meth:`p_mean_variance` at (x_t, t).
        :param x: (N, C, ...) x_t.
        :param t: (N,) int64 timesteps.
        :return: (N, C, ...) float32 mean.
        """
        gradient = self._cond_gradient(cond_fn, x, t, model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient

    def condition_score(
        self,
        cond_fn: CondFn,
        p_mean_var: Dict[str, torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Guidance of the score [ADM Alg. 2]: ``eps' = eps - sqrt(1 - abar_t) * cond_fn(x_t, t)``,
        then pred_xstart [IDDPM Eq. 9] and the posterior mean [IDDPM Eq. 11] from eps' (no clipping).

        Arguments as in :meth:`condition_mean`.

        :return: a copy of ``p_mean_var`` with ``pred_xstart`` and ``mean`` replaced.
        """
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * self._cond_gradient(
            cond_fn, x, t, model_kwargs
        )
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # -- sampling -----------------------------------------------------------------------------

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        *,
        cond_fn: Optional[CondFn] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        One ancestral sampling step, x_{t-1} ~ p(x_{t-1} | x_t) ([DDPM Alg. 2]).

        Draws one ``randn_like(x)`` even at t = 0, where no noise is added.

        :param x: (N, C, ...) x_t. Other parameters as in :meth:`p_mean_variance`.
        :param cond_fn: classifier guidance of the mean, :meth:`condition_mean` [ADM Alg. 1];
            keyword-only (guided-diffusion has it before ``model_kwargs``).
        :return: dict with ``sample`` (x_{t-1}) and ``pred_xstart``, each (N, C, ...).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = torch.randn_like(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs)
        sample = out["mean"] + _nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        eta: float = 0.0,
        *,
        cond_fn: Optional[CondFn] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        One DDIM step from x_t to x_{t-1} ([DDIM Eq. 12] with sigma_t(eta) of [DDIM Eq. 16]).

        eps is re-derived from the (clipped) predicted x_0. Draws one ``randn_like(x)`` even
        when eta = 0 (deterministic).

        :param eta: 0 = deterministic DDIM, 1 = the ancestral (DDPM) variance.
        :param cond_fn: classifier guidance of the score, :meth:`condition_score` [ADM Alg. 2].
        :return: dict with ``sample`` (x_{t-1}) and ``pred_xstart``, each (N, C, ...).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn_like(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        eta: float = 0.0,
    ) -> Dict[str, torch.Tensor]:
        """
        One deterministic DDIM step backwards, from x_t to x_{t+1} (encoding with the DDIM
        ODE, [DDIM §4.3]): ``pred_xstart * sqrt(abar_{t+1}) + sqrt(1 - abar_{t+1}) * eps``.

        :param eta: must be 0; the reverse ODE has no stochastic version.
        :return: dict with ``sample`` (x_{t+1}) and ``pred_xstart``, each (N, C, ...).
        """
        if eta != 0.0:
            raise UserError(f"ddim_reverse_sample needs eta=0 (the reverse ODE is deterministic), got eta={eta}")
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        progress: bool = False,
        *,
        cond_fn: Optional[CondFn] = None,
    ) -> torch.Tensor:
        """
        Generate samples by ancestral sampling from t = T-1 down to 0.

        :param shape: (N, C, ...) of the samples.
        :param noise: the start x_T; drawn with ``torch.randn`` when None.
        :param device: where to sample; defaults to the model's parameters' device.
        :param progress: show a tqdm progress bar.
        :param cond_fn: classifier guidance [ADM Alg. 1], see :meth:`condition_mean`.
        :return: (N, C, ...) the final samples.
        """
        return _last_sample(
            self.p_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, cond_fn=cond_fn
            )
        )

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        progress: bool = False,
        *,
        cond_fn: Optional[CondFn] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """
        Ancestral sampling, yielding the output of :meth:`p_sample` after every step.

        Arguments as in :meth:`p_sample_loop`.
        """
        return self._sample_loop_progressive(
            self.p_sample, model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, cond_fn
        )

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        progress: bool = False,
        eta: float = 0.0,
        *,
        cond_fn: Optional[CondFn] = None,
    ) -> torch.Tensor:
        """
        Generate samples with DDIM steps ([DDIM Eq. 12]) from t = T-1 down to 0.

        Arguments as in :meth:`p_sample_loop`; ``eta`` as in :meth:`ddim_sample`; ``cond_fn``
        guides the score [ADM Alg. 2], see :meth:`condition_score`.

        :return: (N, C, ...) the final samples.
        """
        return _last_sample(
            self.ddim_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, eta, cond_fn=cond_fn
            )
        )

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        progress: bool = False,
        eta: float = 0.0,
        *,
        cond_fn: Optional[CondFn] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """
        DDIM sampling, yielding the output of :meth:`ddim_sample` after every step.

        Arguments as in :meth:`ddim_sample_loop`.
        """
        step = functools.partial(self.ddim_sample, eta=eta)
        return self._sample_loop_progressive(
            step, model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, cond_fn
        )

    def _sample_loop_progressive(
        self,
        step: Callable[..., Dict[str, torch.Tensor]],
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor],
        clip_denoised: bool,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]],
        model_kwargs: Optional[Dict[str, Any]],
        device: Optional[torch.device],
        progress: bool,
        cond_fn: Optional[CondFn] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """The loop driver shared by ancestral, DDIM and the ODE solvers of :mod:`.samplers`; ``step`` differs."""
        if device is None:
            device = _model_device(model, noise)
        assert isinstance(shape, (tuple, list))
        img = noise if noise is not None else torch.randn(*shape, device=device)
        indices: Any = range(self.num_timesteps - 1, -1, -1)
        if progress:
            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            with torch.no_grad():
                out = step(
                    model,
                    img,
                    t,
                    clip_denoised=clip_denoised,
                    denoised_fn=denoised_fn,
                    model_kwargs=model_kwargs,
                    cond_fn=cond_fn,
                )
            yield out
            img = out["sample"]

    # -- training objective -------------------------------------------------------------------

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[Dict[str, Any]] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Training losses for one timestep per example.

        - KL / RESCALED_KL: the bound term L_t in bits [IDDPM Eq. 4, 5] (times T when rescaled).
        - MSE / RESCALED_MSE: L_simple [IDDPM Eq. 14]; with a learned variance, plus the bound
          term L_t computed with the mean output detached, so that it trains only the variance
          (L_hybrid [IDDPM Eq. 16]; RESCALED_MSE scales it by T/1000, i.e. lambda = 0.001
          times the estimate T * L_t of L_vlb).

        :param x_start: (N, C, ...) data.
        :param t: (N,) int64 timesteps.
        :param noise: the eps of q_sample; drawn when None.
        :return: dict with ``loss`` (N,) and, where they apply, ``mse`` (N,) and ``vb`` (N,).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type.is_vb():
            vb = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)
            terms["loss"] = vb["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        if self.loss_type not in (LossType.MSE, LossType.RESCALED_MSE):
            raise NotImplementedError(self.loss_type)
        model_output = self._model_output(model, x_t, t, model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            # 1. The bound term with the mean detached: it trains only the variance channels.
            C = x_t.shape[1]
            mean_output, var_values = torch.split(model_output, C, dim=1)
            frozen_output = torch.cat([mean_output.detach(), var_values], dim=1)
            vb = self._vb_terms_bpd(None, x_start, x_t, t, clip_denoised=False, model_output=frozen_output)
            terms["vb"] = vb["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # [IDDPM Eq. 16] with lambda = 0.001: L_vlb is estimated by T * L_t, so the
                # term is L_t * T / 1000.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            model_output = mean_output

        # 2. The simple loss on the mean channels [IDDPM Eq. 14].
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        assert model_output.shape == target.shape == x_start.shape
        terms["mse"] = mean_flat((target - model_output) ** 2)
        mse = terms["mse"]
        if self.mse_weights is not None:  # min-SNR-gamma [Hang et al. 2023, Eq. 5]; "mse" stays the plain one
            mse = _extract_into_tensor(self.mse_weights, t, mse.shape) * mse
        terms["loss"] = mse + terms["vb"] if "vb" in terms else mse
        return terms

    # -- variational bound --------------------------------------------------------------------

    def _vb_terms_bpd(
        self,
        model: Optional[Model],
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
        *,
        model_output: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        One term of the variational bound in bits per dimension: the decoder NLL L_0
        [IDDPM Eq. 4] where t = 0, else L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        [IDDPM Eq. 5].

        :param model: the model, or None when ``model_output`` (float32) is given instead.
        :return: dict with ``output`` (N,) bits/dim and ``pred_xstart`` (N, C, ...).
        """
        if model_output is None:
            model_output = self._model_output(model, x_t, t, model_kwargs)
        out = self._p_from_model_output(model_output, x_t, t, clip_denoised, None)
        # 1. KL between the true posterior and the model's reverse step, in bits.
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        # 2. The discretized decoder NLL [DDPM Eq. 13] for t = 0, in bits.
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """
        The prior term L_T = KL(q(x_T | x_0) || N(0, I)) [IDDPM Eq. 6] in bits per dimension.
        It does not depend on the model and is close to 0 for a good schedule.

        :param x_start: (N, C, ...) data.
        :return: (N,) bits/dim.
        """
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
        timestep_batch: int = 1,
        progress: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """
        The whole variational bound [IDDPM Eq. 3] in bits per dimension, plus per-step terms.

        Timesteps run from T-1 down to 0; for each one a fresh ``randn_like(x_start)`` noise
        is drawn, in that order, whatever ``timestep_batch`` is.

        :param x_start: (N, C, ...) data.
        :param timestep_batch: evaluate this many timesteps per model call (a batch of N * K);
            the results equal those of K = 1 up to float rounding inside the model.
        :param progress: show a tqdm progress bar over timesteps.
        :return: dict with ``total_bpd`` (N,) (= prior_bpd + vb.sum(1)), ``prior_bpd`` (N,),
            and (N, T) per-step ``vb`` (bits/dim), ``xstart_mse`` and ``mse`` (of eps), whose
            column j holds t = T-1-j.
        """
        if isinstance(timestep_batch, bool) or int(timestep_batch) != timestep_batch or timestep_batch < 1:
            raise UserError(f"--timestep_batch {timestep_batch!r}: expected a positive integer")
        timestep_batch = int(timestep_batch)
        order = list(range(self.num_timesteps - 1, -1, -1))
        chunks = [order[i : i + timestep_batch] for i in range(0, len(order), timestep_batch)]
        bar = None
        if progress:
            bar = tqdm(total=self.num_timesteps)
        columns: Dict[str, List[torch.Tensor]] = {"vb": [], "xstart_mse": [], "mse": []}
        for chunk in chunks:
            for key, value in self._bpd_terms(model, x_start, chunk, clip_denoised, model_kwargs).items():
                columns[key].append(value)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        result = {key: torch.cat(parts, dim=1) for key, parts in columns.items()}
        prior_bpd = self._prior_bpd(x_start)
        result["prior_bpd"] = prior_bpd
        result["total_bpd"] = result["vb"].sum(dim=1) + prior_bpd
        return result

    def _bpd_terms(
        self,
        model: Model,
        x_start: torch.Tensor,
        timesteps: Sequence[int],
        clip_denoised: bool,
        model_kwargs: Optional[Dict[str, Any]],
    ) -> Dict[str, torch.Tensor]:
        """
        The per-step terms of :meth:`calc_bpd_loop` for K timesteps in one model call: the N
        images are repeated K times (copy k at ``timesteps[k]``), with one noise draw per
        timestep in the given order.

        :return: dict with ``vb``, ``xstart_mse``, ``mse``, each (N, K), column k for ``timesteps[k]``.
        """
        num_images, num_steps = x_start.shape[0], len(timesteps)
        noise = torch.cat([torch.randn_like(x_start) for _ in timesteps])
        t = torch.tensor(timesteps, dtype=torch.long, device=x_start.device).repeat_interleave(num_images)
        x_rep = _repeat_batch(x_start, num_steps)
        kwargs_rep = {k: _repeat_batch(v, num_steps) for k, v in (model_kwargs or {}).items()}
        x_t = self.q_sample(x_start=x_rep, t=t, noise=noise)
        with torch.no_grad():
            out = self._vb_terms_bpd(model, x_rep, x_t, t, clip_denoised=clip_denoised, model_kwargs=kwargs_rep)
        eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
        terms = {
            "vb": out["output"],
            "xstart_mse": mean_flat((out["pred_xstart"] - x_rep) ** 2),
            "mse": mean_flat((eps - noise) ** 2),
        }
        # (K * N,) -> (K, N) -> (N, K)
        return {key: value.reshape(num_steps, num_images).t() for key, value in terms.items()}


# ---------------------------------------------------------------------------------------------
# Small private helpers


def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, 1, ...) float32: 0 where t == 0 (no noise on the last step), else 1."""
    return (t != 0).float().view(-1, *([1] * (x.dim() - 1)))


def _last_sample(progressive: Iterator[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """Drain a progressive sampling generator and return the final ``sample``."""
    final = None
    for final in progressive:
        pass
    assert final is not None
    return final["sample"]


def _model_device(model: Model, noise: Optional[torch.Tensor]) -> torch.device:
    """The device of the model's parameters, else of ``noise``, else the CPU."""
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        for p in parameters():
            return p.device
    return noise.device if noise is not None else torch.device("cpu")


def _repeat_batch(value: Any, times: int) -> Any:
    """Stack ``times`` copies of a tensor along the batch axis; other values pass through."""
    if times == 1 or not isinstance(value, torch.Tensor):
        return value
    return torch.cat([value] * times)
