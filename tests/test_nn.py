"""Tests for improved_diffusion.nn: embedding and mean_flat against golden vectors, layers, checkpointing."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from golden import assert_golden, golden

from improved_diffusion import nn as inn

FUNCS = "functions.npz"
TEMB_ATOL = 1e-6  # README: freqs computed in float32 as described -> atol 1e-6
# float32 exp differs by one unit in the last place between CPU math libraries (measured: 3 of 64
# frequencies on an AVX-512 machine, against the golden machine's). A frequency f < 1 off by one
# ulp (<= 2^-24) moves cos(t f) by at most t * 2^-24, so each row's tolerance grows with its t.
FREQ_ULP = 2.0**-24
FLOAT32 = dict(rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kind,dim,max_period,key",
    [
        ("float", 128, 10000, "temb.float.dim128"),
        ("float", 33, 10000, "temb.float.dim33"),
        ("float", 32, 10000, "temb.float.dim32"),
        ("float", 16, 100, "temb.float.dim16.maxperiod100"),
        ("int", 128, 10000, "temb.int.dim128"),
        ("int", 33, 10000, "temb.int.dim33"),
        ("int", 32, 10000, "temb.int.dim32"),
    ],
)
def test_timestep_embedding_matches_golden(kind, dim, max_period, key):
    t = torch.from_numpy(golden(FUNCS, f"temb.t_{kind}"))
    emb = inn.timestep_embedding(t, dim, max_period=max_period)
    assert emb.dtype == torch.float32
    expected = golden(FUNCS, key)
    assert emb.shape == expected.shape
    bound = TEMB_ATOL + t.double().abs().numpy()[:, None] * FREQ_ULP  # (N, 1)
    error = np.abs(emb.double().numpy() - expected)
    assert (error <= bound).all(), (
        f"golden {key}: max error {error.max():.3g}, worst excess {(error - bound).max():.3g}"
    )


def test_timestep_embedding_layout_cos_then_sin_and_zero_pad():
    emb = inn.timestep_embedding(torch.tensor([0, 5]), 7)
    # t = 0: cos = 1, sin = 0; the odd width gets one zero column.
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0]), rtol=0, atol=0)
    assert torch.all(emb[:, -1] == 0)


def test_mean_flat_matches_golden():
    out = inn.mean_flat(torch.from_numpy(golden(FUNCS, "mean_flat.x")))
    assert_golden(out, FUNCS, "mean_flat.out", **FLOAT32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalization_computes_in_float32_and_casts_back(dtype):
    norm = inn.normalization(64)
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 32
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 64, 4, 4) * 3 + 1).to(dtype)
    expected = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_and_pool_nd(dims):
    conv = inn.conv_nd(dims, 4, 8, 3, padding=1)
    pool = inn.avg_pool_nd(dims, kernel_size=2, stride=2)
    x = torch.randn((1, 4) + (4,) * dims)
    assert conv(x).shape == (1, 8) + (4,) * dims
    assert pool(x).shape == (1, 4) + (2,) * dims
    assert isinstance(inn.linear(3, 5), nn.Linear)


def test_conv_nd_rejects_other_dims():
    with pytest.raises(ValueError, match="unsupported dimensions for conv_nd: 4"):
        inn.conv_nd(4, 1, 1, 1)


def test_zero_and_scale_module():
    layer = nn.Linear(3, 4)
    weight = layer.weight.detach().clone()
    assert inn.scale_module(layer, 0.5) is layer
    torch.testing.assert_close(layer.weight.detach(), weight * 0.5, rtol=0, atol=0)
    assert inn.zero_module(layer) is layer
    assert all(torch.all(p == 0) for p in layer.parameters())


def test_update_ema():
    target, source = [torch.ones(3)], [torch.zeros(3)]
    inn.update_ema(target, source, rate=0.75)
    torch.testing.assert_close(target[0], torch.full((3,), 0.75), rtol=0, atol=0)


def _grads(module: nn.Module, x: torch.Tensor, flag: bool):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(0)  # dropout draws the same mask in both runs
    out = inn.checkpoint(module, (x,), module.parameters(), flag)
    out.square().sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return out.detach(), grads


def test_checkpoint_same_output_and_gradients():
    module = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Dropout(0.3), nn.Linear(8, 2))
    x = torch.randn(5, 6)
    out_plain, grads_plain = _grads(module, x, flag=False)
    out_ckpt, grads_ckpt = _grads(module, x, flag=True)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for g_ckpt, g_plain in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-6, atol=1e-7)


def test_speed_settings_summary_and_apply_to_every_layer():
    assert inn.SpeedSettings().summary() == "speed settings: sdpa=True, winograd=auto, native_kernels=True"
    assert (
        inn.SpeedSettings(winograd_cache="c.json", native_kernels=False).summary()
        == "speed settings: sdpa=True, winograd=auto, winograd_cache=c.json, native_kernels=False"
    )
    assert inn.PLAIN_SPEED.summary() == "speed settings: sdpa=False, winograd=False, native_kernels=False"
    net = torch.nn.Sequential(inn.conv_nd(2, 4, 4, 3, padding=1), torch.nn.Sequential(inn.conv_nd(2, 4, 4, 1)))
    assert all(m.use_winograd for m in net.modules() if isinstance(m, inn.Conv2d))
    inn.apply_speed(net, inn.PLAIN_SPEED)
    assert [m.use_winograd for m in net.modules() if isinstance(m, inn.Conv2d)] == [False, False]


@pytest.mark.parametrize("shape", [(4, 64, 16, 16), (3, 7, 5, 5)])
def test_dropout_draws_like_f_dropout_and_ignores_the_layout(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    layer = inn.Dropout(p=0.3).train()
    torch.manual_seed(5)
    expected = torch.nn.functional.dropout(x, 0.3, training=True)
    torch.manual_seed(5)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    torch.manual_seed(5)
    out = layer(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # same mask on the same activations
    assert 0.2 < (expected == 0).float().mean().item() < 0.4
    torch.testing.assert_close(layer.eval()(x), x, rtol=0, atol=0)
