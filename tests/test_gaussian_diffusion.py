"""
Golden and invariant tests for improved_diffusion.gaussian_diffusion.

Every diffusion_*.npz config is rebuilt with the real factory and checked against the
original's outputs with the toy model of tests/fixtures/README.md.
"""

import functools
import json
import os

import numpy as np
import pytest
import torch
from golden import FIXTURES, SCHEDULE_ARRAYS, assert_golden, golden, load_npz

from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion.errors import UserError
from improved_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from improved_diffusion.script_util import create_gaussian_diffusion

CONFIGS = sorted(name for name in os.listdir(FIXTURES) if name.startswith("diffusion_") and name.endswith(".npz"))
SHORT_CONFIGS = [name for name in CONFIGS if int(load_npz(name)["num_timesteps"]) <= 50]

SCHEDULE = dict(rtol=1e-12, atol=0)
Q = dict(rtol=1e-6, atol=1e-6)
P = dict(rtol=1e-5, atol=1e-5)
DDIM = dict(rtol=1e-5, atol=1e-4)
LOOP = dict(rtol=1e-4, atol=1e-4)
# Names of the 11 derived schedule arrays (betas and alphas_cumprod are checked for every config).
DERIVED = SCHEDULE_ARRAYS[2:]


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """float32 tanh, correctly rounded (through float64): vectorised float32 tanh differs by an
    ulp between CPU math libraries, and pred_xstart near t = T multiplies that by ~1e4."""
    return torch.tanh(x.double()).to(x.dtype)


class ToyModel:
    """The README's toy model; records the timesteps it was called with."""

    def __init__(self, learn_sigma: bool):
        self.learn_sigma = learn_sigma
        self.seen = []

    def __call__(self, x, s, **kwargs):
        self.seen.append(s)
        s_ = s.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        a = 0.5 * _tanh(x + 1e-3 * s_)
        if not self.learn_sigma:
            return a
        return torch.cat([a, 0.3 * _tanh(x - 2e-3 * s_)], dim=1)


@functools.lru_cache(maxsize=None)
def config(name: str) -> dict:
    return json.loads(str(golden(name, "config_json")))


@functools.lru_cache(maxsize=None)
def diffusion_for(name: str) -> GaussianDiffusion:
    return create_gaussian_diffusion(**config(name))


def toy_for(name: str) -> ToyModel:
    return ToyModel(config(name)["learn_sigma"])


def tensor(name: str, key: str) -> torch.Tensor:
    return torch.from_numpy(golden(name, key))


def x_t_for(name: str, prefix: str):
    diffusion = diffusion_for(name)
    x_start, t = tensor(name, "x_start"), tensor(name, prefix + "t")
    return diffusion, x_start, t, diffusion.q_sample(x_start, t, noise=tensor(name, "noise"))


def assert_seed_reproduces(name: str, key: str, shape):
    """The recorded noise is what torch.randn draws right after seeding (RNG convention)."""
    torch.manual_seed(int(golden(name, key + ".seed")))
    np.testing.assert_array_equal(torch.randn(shape).numpy(), golden(name, key + ".noise"))


# ---------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1000, 4000, 100, 20])
def test_named_beta_schedules_golden(schedule, steps):
    betas = get_named_beta_schedule(schedule, steps)
    assert betas.dtype == np.float64
    assert_golden(betas, "schedules.npz", f"betas.{schedule}.{steps}", **SCHEDULE)


def test_cosine_schedule_is_clipped_at_max_beta():
    assert get_named_beta_schedule("cosine", 1000)[-1] == 0.999
    betas = gd.betas_for_alpha_bar(10, lambda u: 1.0 - u, max_beta=0.5)
    assert betas.max() == 0.5 and betas[-1] == 0.5


@pytest.mark.parametrize("key", ["cosine4000", "linear1000", "cosine1000"])
def test_plain_gaussian_diffusion_arrays_golden(key):
    schedule, steps = key[:6], int(key[6:])
    diffusion = GaussianDiffusion(
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_LARGE,
        loss_type=LossType.MSE,
    )
    assert diffusion.num_timesteps == steps
    for array in ("betas", "alphas_cumprod") + DERIVED:
        assert getattr(diffusion, array).dtype == np.float64
        assert_golden(getattr(diffusion, array), "schedules.npz", f"gd.{key}.{array}", **SCHEDULE)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_meta_and_schedule_arrays(name):
    diffusion, data = diffusion_for(name), load_npz(name)
    assert diffusion.model_mean_type.name == str(data["model_mean_type"])
    assert diffusion.model_var_type.name == str(data["model_var_type"])
    assert diffusion.loss_type.name == str(data["loss_type"])
    assert diffusion.num_timesteps == int(data["num_timesteps"])
    assert diffusion.original_num_steps == int(data["original_num_steps"])
    assert list(diffusion.timestep_map) == data["timestep_map"].tolist()
    for array in ("betas", "alphas_cumprod") + DERIVED:
        if array in data:
            assert_golden(getattr(diffusion, array), name, array, **SCHEDULE)


# ---------------------------------------------------------------------------------------------
# Forward process and one reverse step, for both timestep sets A and B of every config


@pytest.mark.parametrize("prefix", ["A.", "B."])
@pytest.mark.parametrize("name", CONFIGS)
def test_forward_process_golden(name, prefix):
    diffusion, x_start, t, x_t = x_t_for(name, prefix)
    assert x_t.dtype == torch.float32
    assert_golden(x_t, name, prefix + "q_sample", **Q)
    for key, value in zip(("mean", "variance", "log_variance"), diffusion.q_mean_variance(x_start, t)):
        assert_golden(value, name, f"{prefix}q_mean_variance.{key}", **Q)
    posterior = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    for key, value in zip(("mean", "variance", "log_variance_clipped"), posterior):
        assert_golden(value, name, f"{prefix}q_posterior_mean_variance.{key}", **Q)


@pytest.mark.parametrize("prefix", ["A.", "B."])
@pytest.mark.parametrize("name", CONFIGS)
def test_p_mean_variance_golden(name, prefix):
    diffusion, _, t, x_t = x_t_for(name, prefix)
    model = toy_for(name)
    out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=True)
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert out[key].dtype == torch.float32
        assert_golden(out[key], name, f"{prefix}p_mean_variance.{key}", **P)
    seen = model.seen[0]
    assert str(seen.dtype).replace("torch.", "") == str(golden(name, prefix + "model_t_dtype"))
    assert_golden(seen, name, prefix + "model_t", rtol=0, atol=0)
    out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=False)
    for key in ("mean", "pred_xstart"):
        assert_golden(out[key], name, f"{prefix}p_mean_variance_noclip.{key}", **P)


@pytest.mark.parametrize("prefix", ["A.", "B."])
@pytest.mark.parametrize("name", CONFIGS)
def test_p_sample_and_ddim_steps_golden(name, prefix):
    diffusion, _, t, x_t = x_t_for(name, prefix)
    model = toy_for(name)
    key = prefix + "p_sample"
    assert_seed_reproduces(name, key, x_t.shape)
    torch.manual_seed(int(golden(name, key + ".seed")))
    out = diffusion.p_sample(model, x_t, t, clip_denoised=True)
    assert_golden(out["sample"], name, key + ".sample", **P)
    assert_golden(out["pred_xstart"], name, key + ".pred_xstart", **P)
    for eta in ("0", "0.5"):
        key = f"{prefix}ddim_sample.eta{eta}"
        assert_seed_reproduces(name, key, x_t.shape)
        torch.manual_seed(int(golden(name, key + ".seed")))
        out = diffusion.ddim_sample(model, x_t, t, clip_denoised=True, eta=float(eta))
        assert_golden(out["sample"], name, key + ".sample", **DDIM)
        assert_golden(out["pred_xstart"], name, key + ".pred_xstart", **DDIM)
    out = diffusion.ddim_reverse_sample(model, x_t, t, clip_denoised=True, eta=0.0)
    assert_golden(out["sample"], name, prefix + "ddim_reverse_sample.sample", **DDIM)


@pytest.mark.parametrize("prefix", ["A.", "B."])
@pytest.mark.parametrize("name", CONFIGS)
def test_training_losses_golden(name, prefix):
    diffusion = diffusion_for(name)
    x_start, t, noise = tensor(name, "x_start"), tensor(name, prefix + "t"), tensor(name, "noise")
    before = torch.get_rng_state()
    terms = diffusion.training_losses(toy_for(name), x_start, t, noise=noise)
    assert torch.equal(torch.get_rng_state(), before), "training_losses with noise= must not draw"
    expected = sorted(k.split(".")[-1] for k in load_npz(name) if k.startswith(prefix + "training_losses."))
    assert sorted(terms) == expected
    for key, value in terms.items():
        assert value.shape == (3,) and value.dtype == torch.float32
        assert_golden(value, name, f"{prefix}training_losses.{key}", **P)


# ---------------------------------------------------------------------------------------------
# Sampling loops and the bound, for the configs with at most 50 steps


@pytest.mark.parametrize("name", SHORT_CONFIGS)
def test_sampling_loops_golden(name):
    diffusion, model = diffusion_for(name), toy_for(name)
    start, shape = tensor(name, "loop.start_noise"), (2, 3, 8, 8)
    common = dict(noise=start, clip_denoised=True, device="cpu")
    out = diffusion.ddim_sample_loop(model, shape, eta=0.0, **common)
    assert_golden(out, name, "loop.ddim_eta0.output", **LOOP)
    torch.manual_seed(int(golden(name, "loop.ddim_eta0.5.seed")))
    out = diffusion.ddim_sample_loop(model, shape, eta=0.5, **common)
    assert_golden(out, name, "loop.ddim_eta0.5.output", **LOOP)
    seed = int(golden(name, "loop.p_sample.seed"))
    torch.manual_seed(seed)
    noises = torch.stack([torch.randn(shape) for _ in range(diffusion.num_timesteps)])
    np.testing.assert_array_equal(noises.numpy(), golden(name, "loop.p_sample.step_noises"))
    torch.manual_seed(seed)
    out = diffusion.p_sample_loop(model, shape, **common)
    assert_golden(out, name, "loop.p_sample.output", **LOOP)


@pytest.mark.parametrize("name", SHORT_CONFIGS)
def test_progressive_loops_yield_every_step(name):
    diffusion, model = diffusion_for(name), toy_for(name)
    start = tensor(name, "loop.start_noise")
    for loop in (diffusion.p_sample_loop_progressive, diffusion.ddim_sample_loop_progressive):
        steps = list(loop(model, (2, 3, 8, 8), noise=start, device="cpu"))
        assert len(steps) == diffusion.num_timesteps
        assert all(set(step) == {"sample", "pred_xstart"} for step in steps)
    assert_golden(steps[-1]["sample"], name, "loop.ddim_eta0.output", **LOOP)


@pytest.mark.parametrize("name", SHORT_CONFIGS)
def test_calc_bpd_loop_golden(name):
    diffusion, model = diffusion_for(name), toy_for(name)
    torch.manual_seed(int(golden(name, "bpd.seed")))
    out = diffusion.calc_bpd_loop(model, tensor(name, "x_start")[:2], clip_denoised=True)
    assert set(out) == {"total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"}
    for key in out:
        assert_golden(out[key], name, "bpd." + key, **P)
    seen = torch.stack(model.seen).double()
    assert_golden(seen, name, "bpd.model_t", rtol=0, atol=0)
    # The bound is the prior term plus every per-step term.
    torch.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb"].sum(dim=1))


@pytest.mark.parametrize("timestep_batch", [3, 7])
def test_calc_bpd_loop_timestep_batch_equals_plain_loop(timestep_batch):
    name = "diffusion_f_learnsigma_linear1000_ddim20.npz"  # T = 20, divisible by neither 3 nor 7
    diffusion, model = diffusion_for(name), toy_for(name)
    x_start = tensor(name, "x_start")[:2]
    torch.manual_seed(int(golden(name, "bpd.seed")))
    plain = diffusion.calc_bpd_loop(model, x_start)
    torch.manual_seed(int(golden(name, "bpd.seed")))
    batched = diffusion.calc_bpd_loop(model, x_start, timestep_batch=timestep_batch, progress=True)
    for key in plain:
        torch.testing.assert_close(batched[key], plain[key], rtol=1e-5, atol=1e-5)
        assert_golden(batched[key], name, "bpd." + key, **P)


def test_calc_bpd_loop_timestep_batch_repeats_model_kwargs():
    diffusion = create_gaussian_diffusion(steps=10, noise_schedule="cosine", learn_sigma=True)
    toy = ToyModel(learn_sigma=True)

    def model(x, t, y=None):
        return toy(x + 0.1 * y.float().view(-1, 1, 1, 1), t)

    x_start, y = torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([1, -2])
    results = []
    for timestep_batch in (1, 4, 10, 16):
        torch.manual_seed(5)
        results.append(diffusion.calc_bpd_loop(model, x_start, model_kwargs={"y": y}, timestep_batch=timestep_batch))
    for result in results[1:]:
        for key in result:
            torch.testing.assert_close(result[key], results[0][key], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Invariants


def test_ddim_eta0_is_deterministic_and_reverse_inverts_it():
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear", timestep_respacing="100")

    def smooth(x, t):  # eps varies slowly with x, so one step nearly inverts the other
        return 0.02 * torch.tanh(x)

    x_start = torch.rand(2, 3, 4, 4) * 1.6 - 0.8
    x = x_start
    # Encode: x_0 -> x_1 -> ... -> x_{T-1}, where the sampling loop starts.
    for i in range(diffusion.num_timesteps - 1):
        t = torch.full((2,), i, dtype=torch.long)
        x = diffusion.ddim_reverse_sample(smooth, x, t, clip_denoised=False)["sample"]
    samples = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        samples.append(diffusion.ddim_sample_loop(smooth, x.shape, noise=x, clip_denoised=False, device="cpu"))
    assert torch.equal(samples[0], samples[1])
    torch.testing.assert_close(samples[0], x_start, rtol=0, atol=1e-2)  # measured 5e-3


@pytest.mark.parametrize("loss_type", [LossType.MSE, LossType.RESCALED_MSE])
def test_hybrid_loss_vb_term_gives_no_gradient_to_the_mean(loss_type):
    diffusion = create_gaussian_diffusion(steps=20, noise_schedule="cosine", learn_sigma=True)
    diffusion.loss_type = loss_type
    mean_weight = torch.tensor(0.5, requires_grad=True)
    var_weight = torch.tensor(0.3, requires_grad=True)

    def model(x, t):
        return torch.cat([mean_weight * torch.tanh(x), var_weight * torch.tanh(x)], dim=1)

    x_start = torch.rand(3, 3, 4, 4) * 2 - 1
    terms = diffusion.training_losses(model, x_start, torch.tensor([0, 7, 19]))
    mean_grad, var_grad = torch.autograd.grad(
        terms["vb"].sum(), [mean_weight, var_weight], allow_unused=True, retain_graph=True
    )
    assert mean_grad is None or float(mean_grad) == 0.0
    assert float(var_grad) != 0.0
    mean_grad, var_grad = torch.autograd.grad(terms["mse"].sum(), [mean_weight, var_weight], allow_unused=True)
    assert float(mean_grad) != 0.0
    assert var_grad is None or float(var_grad) == 0.0


@pytest.mark.parametrize("mean_type", list(ModelMeanType))
@pytest.mark.parametrize("var_type", list(ModelVarType))
@pytest.mark.parametrize("loss_type", list(LossType))
def test_every_enum_combination_gives_finite_losses_and_steps(mean_type, var_type, loss_type):
    diffusion = GaussianDiffusion(
        betas=get_named_beta_schedule("cosine", 12),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=True,
    )
    learned = var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    model = ToyModel(learn_sigma=learned)
    x_start, t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([0, 5])
    terms = diffusion.training_losses(model, x_start, t)
    expected = {"loss"} if loss_type.is_vb() else ({"loss", "mse", "vb"} if learned else {"loss", "mse"})
    assert set(terms) == expected
    assert all(v.shape == (2,) and bool(torch.isfinite(v).all()) for v in terms.values())
    assert torch.equal(model.seen[0], t.float() * (1000.0 / 12))
    out = diffusion.p_sample(model, diffusion.q_sample(x_start, t), t)
    assert out["sample"].shape == x_start.shape and bool(torch.isfinite(out["sample"]).all())


def test_model_output_in_low_precision_is_used_in_float32():
    name = "diffusion_g_hybrid_cosine20.npz"
    diffusion, _, t, x_t = x_t_for(name, "A.")
    toy = toy_for(name)
    out = diffusion.p_mean_variance(lambda x, s: toy(x, s).bfloat16(), x_t, t)
    reference = diffusion.p_mean_variance(lambda x, s: toy(x, s).bfloat16().float(), x_t, t)
    for key in out:
        assert out[key].dtype == torch.float32
        assert torch.equal(out[key], reference[key])


def test_extract_into_tensor_gathers_in_float64_then_casts():
    arr = np.array([0.1, 1.0 / 3.0, 2.0 / 3.0, 0.9], dtype=np.float64)
    t = torch.tensor([2, 0])
    out = gd._extract_into_tensor(arr, t, (2, 3, 5))
    assert out.shape == (2, 3, 5) and out.dtype == torch.float32
    assert torch.equal(out[:, 0, 0], torch.from_numpy(arr[[2, 0]].astype(np.float32)))
    table = gd._device_table(arr, t.device)
    assert gd._device_table(arr, t.device) is table  # cached: no host-to-device copy per step


def test_device_table_cache_entry_goes_away_with_its_array():
    arr = np.linspace(0.1, 0.9, 5)
    gd._extract_into_tensor(arr, torch.tensor([1]), (1,))
    key = (id(arr), torch.device("cpu"))
    assert key in gd._DEVICE_TABLES
    del arr
    assert key not in gd._DEVICE_TABLES


@pytest.mark.cuda
def test_cuda_matches_golden():
    name = "diffusion_g_hybrid_cosine20.npz"
    diffusion, model, device = diffusion_for(name), toy_for(name), torch.device("cuda")
    _, x_start, t, x_t = x_t_for(name, "A.")
    out = diffusion.p_mean_variance(model, x_t.to(device), t.to(device))
    for key in ("mean", "log_variance", "pred_xstart"):
        assert_golden(out[key], name, f"A.p_mean_variance.{key}", **P)
    noise = tensor(name, "noise").to(device)
    terms = diffusion.training_losses(model, x_start.to(device), t.to(device), noise=noise)
    assert_golden(terms["loss"], name, "A.training_losses.loss", **P)
    out = diffusion.ddim_sample_loop(model, (2, 3, 8, 8), noise=tensor(name, "loop.start_noise").to(device))
    assert_golden(out, name, "loop.ddim_eta0.output", **LOOP)


def test_no_other_code_turns_schedules_into_tensors():
    import improved_diffusion

    package = os.path.dirname(improved_diffusion.__file__)
    for module in ("gaussian_diffusion.py", "respace.py"):
        with open(os.path.join(package, module)) as f:
            assert "from_numpy" not in f.read(), module


def test_loops_show_a_progress_bar(capsys):
    name = "diffusion_g_hybrid_cosine20.npz"
    diffusion = diffusion_for(name)
    diffusion.p_sample_loop(toy_for(name), (1, 3, 4, 4), device="cpu", progress=True)
    assert "20/20" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize(
    "schedule,steps,match",
    [
        ("quadratic", 1000, r"unknown noise schedule 'quadratic'.*'linear', 'cosine'"),
        ("linear", 0, r"--diffusion_steps 0: must be a positive integer"),
        ("cosine", -5, r"--diffusion_steps -5: must be a positive integer"),
        ("linear", 10, r"--diffusion_steps 10: the linear noise schedule needs more than 20 steps"),
        ("cosine", "ten", r"--diffusion_steps 'ten': expected a positive integer"),
        ("cosine", 2.5, r"--diffusion_steps 2.5: expected a positive integer"),
    ],
)
def test_bad_schedule_arguments_raise_user_error(schedule, steps, match):
    with pytest.raises(UserError, match=match):
        get_named_beta_schedule(schedule, steps)


@pytest.mark.parametrize("steps", [10, 20])
def test_linear_schedule_flag_needs_more_than_20_steps(steps):
    with pytest.raises(UserError, match=rf"--diffusion_steps {steps}: the linear noise schedule needs more than 20"):
        create_gaussian_diffusion(steps=steps, noise_schedule="linear")
    assert create_gaussian_diffusion(steps=21, noise_schedule="linear").num_timesteps == 21
    assert create_gaussian_diffusion(steps=steps, noise_schedule="cosine").num_timesteps == steps


def test_bad_diffusion_arguments_raise_user_error():
    kwargs = dict(
        model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_LARGE, loss_type=LossType.MSE
    )
    with pytest.raises(UserError, match=r"betas must lie in \(0, 1\).*more than 20 diffusion steps"):
        GaussianDiffusion(betas=get_named_beta_schedule("linear", 20), **kwargs)
    diffusion = GaussianDiffusion(betas=get_named_beta_schedule("cosine", 10), **kwargs)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(UserError, match=r"--timestep_batch 0: expected a positive integer"):
        diffusion.calc_bpd_loop(ToyModel(False), x, timestep_batch=0)
    with pytest.raises(UserError, match=r"ddim_reverse_sample needs eta=0"):
        diffusion.ddim_reverse_sample(ToyModel(False), x, torch.tensor([3]), eta=0.5)


# ---------------------------------------------------------------------------------------------
# Min-SNR-gamma weighting [Hang et al. 2023]


@pytest.mark.parametrize("predict_xstart", [False, True])
def test_min_snr_weights_closed_form(predict_xstart):
    diffusion = create_gaussian_diffusion(
        steps=100, noise_schedule="cosine", predict_xstart=predict_xstart, snr_gamma=5
    )
    snr = diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod)
    expected = np.minimum(snr, 5.0) / (1.0 if predict_xstart else snr)
    np.testing.assert_allclose(diffusion.mse_weights, expected, rtol=1e-12, atol=0)
    low_noise = snr > 5  # early steps: weight gamma / SNR < 1 (epsilon) or the cap (x0)
    assert low_noise[:5].all() and not low_noise[-5:].any()
    if not predict_xstart:
        np.testing.assert_allclose(diffusion.mse_weights[~low_noise], 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_min_snr_loss_weights_only_the_simple_term(learn_sigma):
    kwargs = dict(steps=50, noise_schedule="cosine", learn_sigma=learn_sigma, rescale_learned_sigmas=True)
    plain, weighted = create_gaussian_diffusion(**kwargs), create_gaussian_diffusion(**kwargs, snr_gamma=2.0)
    gen = torch.Generator().manual_seed(0)
    x_start = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    t, noise = torch.tensor([0, 5, 30, 49]), torch.randn(4, 3, 8, 8, generator=gen)
    model = ToyModel(learn_sigma)
    a = plain.training_losses(model, x_start, t, noise=noise)
    b = weighted.training_losses(model, x_start, t, noise=noise)
    torch.testing.assert_close(b["mse"], a["mse"], rtol=0, atol=0)  # the logged term is the plain one
    w = torch.from_numpy(weighted.mse_weights[t.numpy()]).float()
    expected = w * a["mse"] + (a["vb"] if learn_sigma else 0)
    torch.testing.assert_close(b["loss"], expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(b["loss"], a["loss"])


def test_min_snr_rejects_bad_settings():
    with pytest.raises(UserError, match=r"--snr_gamma -1: must be positive"):
        create_gaussian_diffusion(steps=50, noise_schedule="cosine", snr_gamma=-1)
