"""Golden and invariant tests for improved_diffusion.resample (see tests/fixtures/README.md)."""

import json
import os

import numpy as np
import pytest
import torch
from golden import assert_golden, golden

from improved_diffusion import dist_util
from improved_diffusion.errors import UserError
from improved_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from improved_diffusion.script_util import create_gaussian_diffusion

RS = "resample.npz"
WEIGHTS = dict(rtol=1e-12, atol=0)
SAMPLERS = {"default": {}, "h3_u0.1": dict(history_per_term=3, uniform_prob=0.1)}


def diffusion():
    return create_gaussian_diffusion(steps=int(golden(RS, "num_timesteps")), noise_schedule="cosine")


def test_golden_records_the_np_int_quirk_and_we_construct_on_numpy_2():
    # The original's constructor used the removed ``np.int`` alias; ours must build anyway.
    assert bool(golden(RS, "npint_bug")) is True
    assert int(np.__version__.split(".")[0]) >= 2
    sampler = LossSecondMomentResampler(diffusion())
    assert sampler.history_per_term == 10 and sampler.uniform_prob == 0.001


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_loss_second_moment_golden(name):
    sampler = LossSecondMomentResampler(diffusion(), **SAMPLERS[name])
    assert sampler.history_per_term == int(golden(RS, f"{name}.history_per_term"))
    assert sampler.uniform_prob == float(golden(RS, f"{name}.uniform_prob"))
    assert_golden(sampler.weights(), RS, f"{name}.weights_initial", **WEIGHTS)
    weights, warmed = [], []
    for ts, losses in zip(golden(RS, "calls.ts"), golden(RS, "calls.losses")):
        sampler.update_with_all_losses([int(t) for t in ts], [float(loss) for loss in losses])
        weights.append(sampler.weights())
        warmed.append(sampler._warmed_up())
    assert_golden(np.stack(weights), RS, f"{name}.weights_after_call", **WEIGHTS)
    np.testing.assert_array_equal(np.array(warmed), golden(RS, f"{name}.warmed_up_after_call"))
    assert_golden(sampler._loss_history, RS, f"{name}.final_loss_history", **WEIGHTS)
    np.testing.assert_array_equal(sampler._loss_counts, golden(RS, f"{name}.final_loss_counts"))
    np.random.seed(int(golden(RS, f"{name}.sample.np_seed")))
    indices, sample_weights = sampler.sample(16, "cpu")
    assert indices.dtype == torch.int64 and sample_weights.dtype == torch.float32
    np.testing.assert_array_equal(indices.numpy(), golden(RS, f"{name}.sample.indices"))
    np.testing.assert_array_equal(sample_weights.numpy(), golden(RS, f"{name}.sample.weights"))


def test_uniform_sampler_golden():
    sampler = UniformSampler(diffusion())
    assert_golden(sampler.weights(), RS, "uniform.weights", **WEIGHTS)
    big = create_gaussian_diffusion(steps=4000, noise_schedule="cosine")
    assert_golden(UniformSampler(big).weights(), RS, "uniform4000.weights", **WEIGHTS)
    np.random.seed(123)
    indices, weights = sampler.sample(16, "cpu")
    np.testing.assert_array_equal(indices.numpy(), golden(RS, "uniform.sample.indices"))
    np.testing.assert_array_equal(weights.numpy(), golden(RS, "uniform.sample.weights"))


def test_create_named_schedule_sampler():
    d = diffusion()
    assert type(create_named_schedule_sampler("uniform", d)) is UniformSampler
    assert type(create_named_schedule_sampler("loss-second-moment", d)) is LossSecondMomentResampler
    with pytest.raises(UserError, match=r"--schedule_sampler 'importance'.*'uniform', 'loss-second-moment'"):
        create_named_schedule_sampler("importance", d)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(history_per_term=0), r"history_per_term 0: expected a positive integer"),
        (dict(uniform_prob=1.5), r"uniform_prob 1.5: expected a probability in \[0, 1\]"),
    ],
)
def test_bad_resampler_arguments_raise_user_error(kwargs, match):
    with pytest.raises(UserError, match=match):
        LossSecondMomentResampler(diffusion(), **kwargs)


def test_update_with_local_losses_single_process_equals_all_losses():
    direct, local = LossSecondMomentResampler(diffusion()), LossSecondMomentResampler(diffusion())
    for ts, losses in zip(golden(RS, "calls.ts"), golden(RS, "calls.losses")):
        direct.update_with_all_losses(ts.tolist(), losses.tolist())
        local.update_with_local_losses(torch.from_numpy(ts), torch.from_numpy(losses).requires_grad_())
    np.testing.assert_array_equal(local.weights(), direct.weights())


def test_update_with_local_losses_uses_every_rank_in_rank_order(monkeypatch):
    # Two simulated ranks with unequal batch sizes: rank 0 has 2 examples, rank 1 has 3.
    other_rank = {False: torch.tensor([1, 2, 3]), True: torch.tensor([0.5, 0.25, 0.125])}
    monkeypatch.setattr(
        dist_util, "all_gather_tensors", lambda tensor: [tensor, other_rank[tensor.is_floating_point()]]
    )
    received = []
    sampler = LossSecondMomentResampler(diffusion())
    sampler.update_with_all_losses = lambda ts, losses: received.append((ts, losses))
    sampler.update_with_local_losses(torch.tensor([7, 8]), torch.tensor([2.0, 4.0]))
    assert received == [([7, 8, 1, 2, 3], [2.0, 4.0, 0.5, 0.25, 0.125])]


_TWO_RANK_SCRIPT = """
import json
from types import SimpleNamespace

import torch
from improved_diffusion import dist_util
from improved_diffusion.resample import LossSecondMomentResampler

dist_util.setup_dist()
rank = dist_util.get_rank()
sampler = LossSecondMomentResampler(SimpleNamespace(num_timesteps=10), history_per_term=2)
# Rank 0 has 3 examples per call, rank 1 has 7 (unequal batch sizes); together they cover all t twice.
for call in range(2):
    ts = torch.arange(10)[:3] if rank == 0 else torch.arange(10)[3:]
    sampler.update_with_local_losses(ts, (ts + 1.0 + call) * (rank + 1))
print("WEIGHTS", rank, json.dumps(sampler.weights().tolist()), flush=True)
dist_util.cleanup()
"""


@pytest.mark.slow
def test_update_with_local_losses_two_ranks_unequal_batches(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _TWO_RANK_SCRIPT], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    weights = [
        json.loads(line.split(" ", 2)[2]) for out in outputs for line in out.splitlines() if line.startswith("WEIGHTS")
    ]
    # Every rank saw every rank's losses: t < 3 from rank 0 (scale 1), t >= 3 from rank 1 (scale 2).
    t = np.arange(10)
    history = np.stack([(t + 1.0), (t + 2.0)], axis=1) * np.where(t < 3, 1, 2)[:, None]
    expected = np.sqrt(np.mean(history**2, axis=1))
    expected = expected / expected.sum() * (1 - 0.001) + 0.001 / 10
    assert len(weights) == 2
    for w in weights:
        np.testing.assert_allclose(w, expected, rtol=1e-12, atol=0)


def test_non_finite_losses_are_left_out_of_the_history():
    sampler = LossSecondMomentResampler(create_gaussian_diffusion(steps=4, noise_schedule="cosine"), history_per_term=2)
    sampler.update_with_local_losses(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, float("nan"), float("inf"), 2.0]))
    np.testing.assert_array_equal(sampler._loss_counts, [1, 0, 0, 1])


def test_importance_weights_table_follows_the_distribution():
    sampler = LossSecondMomentResampler(
        create_gaussian_diffusion(steps=3, noise_schedule="cosine"), history_per_term=1, uniform_prob=0.0
    )
    np.random.seed(0)
    _, weights = sampler.sample(5, torch.device("cpu"))
    assert torch.equal(weights, torch.ones(5))
    sampler.update_with_all_losses([0, 1, 2], [1.0, 2.0, 1.0])  # p = (1/4, 1/2, 1/4)
    t, weights = sampler.sample(50, torch.device("cpu"))
    expected = torch.tensor([4 / 3, 2 / 3, 4 / 3])[t]
    assert torch.equal(weights, expected) and set(t.tolist()) == {0, 1, 2}
