"""
The samplers of :mod:`improved_diffusion.samplers`: convergence order of the ODE solvers against
the exact probability-flow solution for Gaussian data, what they need from a model (x_0 only:
any mean or variance type, rescaled timesteps, guidance in score form), their number of
network evaluations, their errors, and the classifier-free guidance wrapper.
"""

from typing import List

import numpy as np
import pytest
import torch

from improved_diffusion import flags, samplers
from improved_diffusion.errors import UserError
from improved_diffusion.script_util import create_gaussian_diffusion

ATOL = 1e-5  # float32 sampling loops compared with each other
ATOL_EPS_TO_XSTART = 1e-4  # eps -> x_0 at abar_T ~ 4e-5 (linear schedule) loses ~1e-5 in float32
SHAPE = (256, 2, 4, 4)  # (N, C, H, W) of the toy problem
STEPS = (10, 20, 40)  # respaced step counts, each half the next one's step size
# Error ratio per halving of the step: about 2 for first order, 4 for second order.
RATIO_BOUNDS = {"ddim": (1.8, 2.3), "heun": (3.6, 4.8), "dpm++2m": (3.5, 9.5)}

pytestmark = pytest.mark.usefixtures("one_thread")


class GaussianDenoiser:
    """
    The ideal model for data x_0 ~ N(mu, s^2) per pixel: E[x_0 | x_t] = mu + a s^2 (x_t - a mu) /
    (a^2 s^2 + sigma^2) with a = sqrt(abar_t), sigma^2 = 1 - abar_t, returned as eps or x_0
    (float32, computed in float64), plus variance channels for learned variances.
    """

    def __init__(self, base_alphas_cumprod: np.ndarray, mu: torch.Tensor, s: torch.Tensor, **kinds):
        self.alphas_cumprod = torch.tensor(base_alphas_cumprod)
        self.mu, self.s = mu, s
        self.rescaled = kinds.get("rescale_timesteps", False)
        self.xstart = kinds.get("predict_xstart", False)
        self.learned = kinds.get("learn_sigma", False)
        self.calls: List[int] = []  # batch size of each call

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls.append(x.shape[0])
        steps = len(self.alphas_cumprod)
        index = torch.round(t.double() * steps / 1000).long() if self.rescaled else t.long()
        abar = self.alphas_cumprod[index].view(-1, 1, 1, 1)
        a, sigma2, x = abar.sqrt(), 1 - abar, x.double()
        pred_xstart = self.mu + a * self.s**2 / (abar * self.s**2 + sigma2) * (x - a * self.mu)
        out = pred_xstart if self.xstart else (x - a * pred_xstart) / sigma2.sqrt()
        if self.learned:
            out = torch.cat([out, torch.full_like(out, 0.3)], dim=1)  # any v in [-1, 1]: unused by ODE solvers
        return out.float()


def exact_solution(x_T: torch.Tensor, abar_T: float, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """
    The probability-flow ODE's x_0 from x_T: with x' = x / sqrt(abar) and sigma' = sqrt((1 - abar) / abar),
    dx'/dsigma' = eps = sigma' (x' - mu) / (s^2 + sigma'^2), so x' - mu grows as sqrt(s^2 + sigma'^2).
    """
    sigma_T = np.sqrt((1 - abar_T) / abar_T)
    return mu + (x_T.double() / np.sqrt(abar_T) - mu) * s / torch.sqrt(s**2 + sigma_T**2)


@pytest.fixture(scope="module")
def toy():
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(SHAPE[1:], generator=gen, dtype=torch.float64) - 0.5
    s = 0.3 + 0.4 * torch.rand(SHAPE[1:], generator=gen, dtype=torch.float64)
    x_T = torch.randn(SHAPE, generator=gen)
    return mu, s, x_T


def _toy_run(toy, sampler, steps, schedule="linear", **kinds):
    """(samples, exact solution, model) for the toy data, ``steps`` respaced steps of 1000."""
    mu, s, x_T = toy
    flags = dict(steps=1000, noise_schedule=schedule, **kinds)
    diffusion = create_gaussian_diffusion(**flags, timestep_respacing=str(steps))
    base = create_gaussian_diffusion(steps=1000, noise_schedule=schedule)
    model = GaussianDenoiser(base.alphas_cumprod, mu, s, **kinds)
    out = samplers.sample_loop(diffusion, model, SHAPE, sampler=sampler, noise=x_T, clip_denoised=False)
    return out, exact_solution(x_T, diffusion.alphas_cumprod[-1], mu, s), model


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small", "learned_range"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "heun"])
def test_error_against_the_exact_ode_solution_falls_with_the_order(toy, sampler, schedule, variance):
    kinds = {"learn_sigma": variance == "learned_range", "sigma_small": variance == "fixed_small"}
    errors = []
    for steps in STEPS:
        out, exact, _ = _toy_run(toy, sampler, steps, schedule, **kinds)
        errors.append(((out.double() - exact) ** 2).mean().sqrt().item())  # RMS over all samples and pixels
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    low, high = RATIO_BOUNDS[sampler]
    assert all(low <= r <= high for r in ratios), f"{sampler} {schedule}: RMS errors {errors}, ratios {ratios}"


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "heun"])
def test_the_solvers_use_only_the_x0_prediction(toy, sampler):
    """
    eps or x_0 prediction, integer or rescaled timesteps, fixed or learned variance: the same samples, up to
    the float32 rounding of x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) at the noisiest steps.
    """
    reference, _, _ = _toy_run(toy, sampler, 10)
    other, _, _ = _toy_run(toy, sampler, 10, predict_xstart=True, rescale_timesteps=True, learn_sigma=True)
    torch.testing.assert_close(other, reference, atol=ATOL_EPS_TO_XSTART, rtol=0)


@pytest.mark.parametrize(
    "sampler, steps", [("ancestral", 5), ("ddim", 5), ("dpm++2m", 5), ("dpm++2m-sde", 5), ("heun", 5), ("heun", 2)]
)
def test_network_evaluations_count_the_model_calls(toy, sampler, steps):
    torch.manual_seed(0)
    _, _, model = _toy_run(toy, sampler, steps)
    assert len(model.calls) == samplers.network_evaluations(sampler, steps)
    assert samplers.network_evaluations(sampler, steps) == (2 * steps - 1 if sampler == "heun" else steps)


def test_one_dpm_solver_step_and_the_first_one_are_ddim_steps(toy):
    """DPM-Solver++(2M) is first order without history [DPM-Solver++ Alg. 2]: its first step is DDIM's."""
    one_dpm, _, _ = _toy_run(toy, "dpm++2m", 1)
    one_ddim, _, _ = _toy_run(toy, "ddim", 1)
    torch.testing.assert_close(one_dpm, one_ddim, atol=ATOL, rtol=0)
    mu, s, x_T = toy
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="10")
    model = GaussianDenoiser(create_gaussian_diffusion(steps=1000).alphas_cumprod, mu, s)
    first = [
        next(samplers.sample_loop_progressive(diffusion, model, SHAPE, sampler=name, noise=x_T, clip_denoised=False))
        for name in ("dpm++2m", "ddim")
    ]
    torch.testing.assert_close(first[0]["sample"], first[1]["sample"], atol=ATOL, rtol=0)
    torch.testing.assert_close(first[0]["pred_xstart"], first[1]["pred_xstart"], atol=ATOL, rtol=0)


def test_the_sde_solvers_first_step_is_the_posterior_step_of_ddim_with_eta_1(toy):
    """SDE-DPM-Solver++(2M) without history: q(x_{j-1} | x_j, x0_j) with the same noise draw as DDIM's eta = 1."""
    mu, s, x_T = toy
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="10")
    model = GaussianDenoiser(create_gaussian_diffusion(steps=1000).alphas_cumprod, mu, s)
    first = []
    for name, eta in (("dpm++2m-sde", 0.0), ("ddim", 1.0)):
        torch.manual_seed(5)
        loop = samplers.sample_loop_progressive(diffusion, model, SHAPE, sampler=name, eta=eta, noise=x_T)
        first.append(next(loop)["sample"])
    torch.testing.assert_close(first[0], first[1], atol=ATOL, rtol=0)
    torch.manual_seed(6)
    assert (
        first[0]
        - next(samplers.sample_loop_progressive(diffusion, model, SHAPE, sampler="dpm++2m-sde", noise=x_T))["sample"]
    ).abs().max() > 0.1


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_sde_solver_samples_gaussian_data_more_exactly_than_first_order(schedule):
    """
    For data N(mu, s^2) and the ideal denoiser, the worst error of the samples' mean and standard
    deviation (relative to s; 50,000 samples, Monte Carlo error ~0.5 %) falls with the number of
    steps, and the second-order SDE solver's is below the first-order SDE step's (DDIM eta = 1, i.e.
    ancestral with the posterior variance), by more than 2x at 40 steps.
    """
    mu = torch.tensor([0.3, -0.2], dtype=torch.float64).view(2, 1, 1)
    s = torch.tensor([0.2, 0.5], dtype=torch.float64).view(2, 1, 1)
    model = GaussianDenoiser(create_gaussian_diffusion(steps=1000, noise_schedule=schedule).alphas_cumprod, mu, s)
    errors = {}
    for name, eta in (("dpm++2m-sde", 0.0), ("ddim", 1.0)):
        for steps in (10, 20, 40):
            diffusion = create_gaussian_diffusion(steps=1000, noise_schedule=schedule, timestep_respacing=str(steps))
            torch.manual_seed(0)
            out = samplers.sample_loop(diffusion, model, (50_000, 2, 1, 1), sampler=name, eta=eta, clip_denoised=False)
            mean_error = ((out.double().mean(0) - mu).abs() / s).max().item()
            std_error = (out.double().std(0) / s - 1).abs().max().item()
            errors[name, steps] = max(mean_error, std_error)
    for name in ("dpm++2m-sde", "ddim"):
        assert errors[name, 10] > errors[name, 20] > errors[name, 40], errors
    assert all(errors["dpm++2m-sde", n] < errors["ddim", n] for n in (10, 20, 40)), errors
    assert errors["dpm++2m-sde", 40] < errors["ddim", 40] / 2, errors


def test_ancestral_and_ddim_are_the_diffusions_own_loops(toy):
    mu, s, x_T = toy
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="10", learn_sigma=True)
    model = GaussianDenoiser(create_gaussian_diffusion(steps=100).alphas_cumprod, mu, s, learn_sigma=True)
    torch.manual_seed(3)
    ours = samplers.sample_loop(diffusion, model, SHAPE, sampler="ancestral", noise=x_T)
    torch.manual_seed(3)
    torch.testing.assert_close(ours, diffusion.p_sample_loop(model, SHAPE, noise=x_T), atol=0, rtol=0)
    torch.manual_seed(3)
    ours = samplers.sample_loop(diffusion, model, SHAPE, sampler="ddim", noise=x_T, eta=0.5)
    torch.manual_seed(3)
    torch.testing.assert_close(ours, diffusion.ddim_sample_loop(model, SHAPE, noise=x_T, eta=0.5), atol=0, rtol=0)


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m-sde", "heun"])
def test_classifier_guidance_enters_in_score_form_with_the_models_timesteps(toy, sampler):
    """cond_fn sees the original (rescaled) timesteps the model sees; one dpm++2m step is DDIM's guided step."""
    mu, s, x_T = toy
    kinds = dict(rescale_timesteps=True)
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="4", **kinds)
    model = GaussianDenoiser(create_gaussian_diffusion(steps=1000).alphas_cumprod, mu, s, **kinds)
    seen = []

    def cond_fn(x, t, **kwargs):
        seen.append(float(t[0]))
        return torch.full_like(x, 0.5)

    guided = samplers.sample_loop(diffusion, model, SHAPE, sampler=sampler, noise=x_T, cond_fn=cond_fn)
    plain = samplers.sample_loop(diffusion, model, SHAPE, sampler=sampler, noise=x_T)
    assert (guided - plain).abs().max() > 0.01
    original = [1000.0 * diffusion.timestep_map[j] / 1000 for j in range(3, -1, -1)]
    assert sorted(set(seen), reverse=True) == original
    assert len(seen) == samplers.network_evaluations(sampler, 4)
    one = create_gaussian_diffusion(steps=1000, timestep_respacing="1", **kinds)
    torch.testing.assert_close(
        samplers.sample_loop(one, model, SHAPE, sampler="dpm++2m", noise=x_T, cond_fn=cond_fn),
        samplers.sample_loop(one, model, SHAPE, sampler="ddim", noise=x_T, cond_fn=cond_fn),
        atol=ATOL,
        rtol=0,
    )


def test_given_noise_and_progress_bar_give_the_same_samples(toy):
    a, _, _ = _toy_run(toy, "heun", 5)
    mu, s, x_T = toy
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="5")
    model = GaussianDenoiser(create_gaussian_diffusion(steps=1000).alphas_cumprod, mu, s)
    b = samplers.sample_loop(diffusion, model, SHAPE, sampler="heun", noise=x_T, clip_denoised=False, progress=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sampler_names_and_the_use_ddim_synonym():
    assert samplers.resolve_sampler("ancestral", use_ddim=True) == "ddim"
    assert samplers.resolve_sampler("ddim", use_ddim=True) == "ddim"
    assert [samplers.resolve_sampler(name) for name in samplers.SAMPLERS] == list(samplers.SAMPLERS)
    with pytest.raises(
        UserError, match=r"^--sampler 'euler': expected one of ancestral, ddim, dpm\+\+2m, dpm\+\+2m-sde, heun$"
    ):
        samplers.resolve_sampler("euler")
    with pytest.raises(UserError, match=r"--use_ddim True contradicts --sampler heun"):
        samplers.resolve_sampler("heun", use_ddim=True)


def test_the_flag_table_lists_the_samplers():
    (flag,) = [f for f in flags.SAMPLE.flags if f.name == "sampler"]
    assert flag.choices == samplers.SAMPLERS == flags.SAMPLERS
    assert flag.default == samplers.ANCESTRAL and "two per step except the last" in flag.help


def test_bad_sampler_settings_are_one_line_errors_naming_the_flag(toy):
    with pytest.raises(UserError, match=r"^--sampler heun needs at least 2 steps \(--timestep_respacing gives 1\)"):
        samplers.network_evaluations("heun", 1)
    with pytest.raises(UserError, match=r"^--sampler heun needs at least 2 steps"):
        _toy_run(toy, "heun", 1)
    with pytest.raises(UserError, match=r"^--sampler 'plms'"):
        _toy_run(toy, "plms", 5)
    with pytest.raises(UserError, match=r"^--eta 0.5 only applies to --sampler ddim, not dpm\+\+2m$"):
        diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="5")
        samplers.sample_loop(diffusion, lambda x, t: x, SHAPE, sampler="dpm++2m", eta=0.5)
    with pytest.raises(UserError, match=r"^--timestep_respacing '-5': counts must be positive"):
        create_gaussian_diffusion(steps=100, timestep_respacing="-5")


# ---------------------------------------------------------------------------------------------
# classifier-free guidance


class LabelModel(torch.nn.Module):
    """out = x * (1 + y) + t + low_res, with 2C channels (the variance half also depends on y); counts calls."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.batches: List[int] = []

    def forward(self, x, t, y, low_res=None):
        self.batches.append(x.shape[0])
        out = self.weight * x * (1 + y.view(-1, 1, 1, 1).float()) + t.view(-1, 1, 1, 1)
        if low_res is not None:
            out = out + low_res
        return torch.cat([out, -out], dim=1)


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_guidance_combines_the_halves_of_one_batched_pass(scale):
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 2, 4, 4, generator=gen), torch.tensor([5, 6, 7])
    y, low_res = torch.tensor([1, 2, 0]), torch.randn(3, 2, 4, 4, generator=gen)
    model, null = LabelModel(), 9
    guided = samplers.classifier_free_guidance(model, scale, null_label=null)
    out = guided(x, t, y=y, low_res=low_res)
    assert model.batches == [6]  # one forward pass of both halves
    cond = model(x, t, y=y, low_res=low_res)
    uncond = model(x, t, y=torch.full_like(y, null), low_res=low_res)
    expected_mean = uncond[:, :2] + scale * (cond[:, :2] - uncond[:, :2])  # [CFG Eq. 6] with w = 1 + w'
    torch.testing.assert_close(out[:, :2], expected_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[:, 2:], cond[:, 2:], atol=0, rtol=0)  # the variance of the conditional half
    assert list(guided.parameters()) == list(model.parameters())


def test_guidance_works_in_every_sampler(toy):
    """A guided model is a model: each sampler runs it with two-fold batches and the NFE of the sampler."""
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="3", learn_sigma=True)
    x_T = toy[2][:4]
    for sampler in samplers.SAMPLERS:
        model = LabelModel()
        guided = samplers.classifier_free_guidance(model, 2.0, null_label=3)
        samplers.sample_loop(
            diffusion,
            guided,
            x_T.shape,
            sampler=sampler,
            noise=x_T,
            model_kwargs={"y": torch.ones(4, dtype=torch.long)},
        )
        assert model.batches == [8] * samplers.network_evaluations(sampler, 3), sampler


def test_guidance_needs_labels():
    guided = samplers.classifier_free_guidance(LabelModel(), 2.0, null_label=3)
    with pytest.raises(UserError, match=r"^--guidance_scale needs class labels y"):
        guided(torch.zeros(1, 2, 4, 4), torch.zeros(1))
