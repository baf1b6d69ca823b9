"""Golden and invariant tests for improved_diffusion.respace (see tests/fixtures/README.md)."""

import numpy as np
import pytest
import torch
from golden import SCHEDULE_ARRAYS, assert_golden, golden, load_npz

from improved_diffusion.errors import UserError
from improved_diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from improved_diffusion.respace import SpacedDiffusion, space_timesteps
from improved_diffusion.script_util import create_gaussian_diffusion

SCHEDULES = "schedules.npz"
SCHEDULE = dict(rtol=1e-12, atol=0)
SPACE_KEYS = sorted(k for k in load_npz(SCHEDULES) if k.startswith("space."))
ARRAYS = SCHEDULE_ARRAYS


@pytest.mark.parametrize("key", SPACE_KEYS)
def test_space_timesteps_golden(key):
    _, steps, spec = key.split(".", 2)
    kept = space_timesteps(int(steps), spec.replace("_", ","))
    np.testing.assert_array_equal(np.array(sorted(kept), dtype=np.int64), golden(SCHEDULES, key), err_msg=key)


def test_space_timesteps_accepts_ints_and_lists():
    assert space_timesteps(100, 25) == space_timesteps(100, "25") == space_timesteps(100, [25])
    assert space_timesteps(300, [10, 15, 20]) == space_timesteps(300, "10,15,20")
    assert space_timesteps(50, [50]) == set(range(50))


@pytest.mark.parametrize(
    "steps,spec,match",
    [
        (10, "ddim6", r"'ddim6': no integer stride gives exactly 6 of 10 steps"),
        (10, "3,9", r"section 1 has 5 of the 10 steps but asks for 9"),
        (100, "101", r"section 0 has 100 of the 100 steps but asks for 101"),
        (100, "fast", r"--timestep_respacing 'fast': expected an integer count"),
        (100, "ddimx", r"--timestep_respacing 'ddimx': expected .*'ddimN'"),
        (100, "10,0", r"counts must be positive integers"),
        (0, "1", r"--diffusion_steps 0: must be a positive integer"),
    ],
)
def test_bad_respacing_raises_user_error(steps, spec, match):
    with pytest.raises(UserError, match=match):
        space_timesteps(steps, spec)


@pytest.mark.parametrize(
    "key,steps,schedule,respacing",
    [("cosine4000.100", 4000, "cosine", "100"), ("linear1000.ddim50", 1000, "linear", "ddim50")],
)
def test_respaced_diffusion_arrays_golden(key, steps, schedule, respacing):
    diffusion = create_gaussian_diffusion(steps=steps, noise_schedule=schedule, timestep_respacing=respacing)
    prefix = f"resp.{key}."
    assert diffusion.num_timesteps == int(golden(SCHEDULES, prefix + "num_timesteps"))
    assert list(diffusion.timestep_map) == golden(SCHEDULES, prefix + "timestep_map").tolist()
    for array in ARRAYS:
        assert_golden(getattr(diffusion, array), SCHEDULES, prefix + array, **SCHEDULE)


@pytest.mark.parametrize("key", ["cosine4000", "linear1000", "cosine1000"])
def test_unrespaced_factory_recomputes_betas_golden(key):
    schedule, steps = key[:6], int(key[6:])
    diffusion = create_gaussian_diffusion(steps=steps, noise_schedule=schedule)
    assert list(diffusion.timestep_map) == golden(SCHEDULES, f"cgd.{key}.timestep_map").tolist()
    for array in ARRAYS:
        source = "cgd" if f"cgd.{key}.{array}" in load_npz(SCHEDULES) else "gd"
        assert_golden(getattr(diffusion, array), SCHEDULES, f"{source}.{key}.{array}", **SCHEDULE)


def _spaced(rescale_timesteps: bool) -> SpacedDiffusion:
    return SpacedDiffusion(
        use_timesteps=[0, 3, 7, 9],
        betas=get_named_beta_schedule("cosine", 10),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.MSE,
        rescale_timesteps=rescale_timesteps,
    )


@pytest.mark.parametrize("rescale_timesteps", [False, True])
def test_wrapper_maps_timesteps_and_forwards_model_kwargs(rescale_timesteps):
    diffusion = _spaced(rescale_timesteps)
    assert diffusion.num_timesteps == 4 and diffusion.timestep_map == [0, 3, 7, 9]
    calls = []

    def model(x, t, y=None, low_res=None):
        calls.append((t, y, low_res))
        return torch.zeros_like(x)

    x, y, low_res = torch.zeros(2, 3, 4, 4), torch.tensor([5, 6]), torch.ones(2, 3, 2, 2)
    diffusion.p_mean_variance(model, x, torch.tensor([1, 3]), model_kwargs=dict(y=y, low_res=low_res))
    t, seen_y, seen_low_res = calls[0]
    if rescale_timesteps:
        assert t.dtype == torch.float32
        assert torch.equal(t, torch.tensor([3.0, 9.0]) * (1000.0 / 10))
    else:
        assert t.dtype == torch.int64 and t.tolist() == [3, 9]
    assert seen_y is y and seen_low_res is low_res


def test_every_public_model_path_sees_mapped_timesteps():
    diffusion = _spaced(False)
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    x, t = torch.zeros(1, 3, 2, 2), torch.tensor([2])
    diffusion.training_losses(model, x, t)
    diffusion.p_sample(model, x, t)
    diffusion.ddim_sample(model, x, t)
    diffusion.ddim_reverse_sample(model, x, t)
    diffusion.calc_bpd_loop(model, x, timestep_batch=3)
    assert seen[:4] == [[7]] * 4
    assert seen[4:] == [[9, 7, 3], [0]]


def test_bad_use_timesteps_raise_user_error():
    with pytest.raises(UserError, match=r"use_timesteps must be a non-empty set of steps in \[0, 10\)"):
        SpacedDiffusion(
            use_timesteps=[0, 10],
            betas=get_named_beta_schedule("cosine", 10),
            model_mean_type=ModelMeanType.EPSILON,
            model_var_type=ModelVarType.FIXED_SMALL,
            loss_type=LossType.MSE,
        )
