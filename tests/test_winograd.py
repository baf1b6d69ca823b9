"""Tests for improved_diffusion.winograd: F(4x4, 3x3) against the direct convolution."""

import pytest
import torch
import torch.nn.functional as F

from improved_diffusion import nn as inn
from improved_diffusion import script_util, winograd
from improved_diffusion.errors import UserError
from improved_diffusion.nn import SpeedSettings

# float64: the algorithm is exact up to rounding.
FLOAT64 = dict(rtol=0, atol=1e-11)
# float32: the transforms' constants (up to 8 and 1/24) cost a few bits; measured max error
# ~1e-5 of the output's largest value (forward) and ~1e-5 (gradients).
FLOAT32_REL = 5e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()


SHAPES = [
    # (N, C, O, H, W): multiples of the 4x4 tile, remainders in either direction, one channel.
    (2, 3, 5, 8, 8),
    (1, 4, 6, 7, 9),
    (2, 8, 3, 13, 16),
    (1, 1, 1, 5, 4),
    (3, 16, 16, 18, 11),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_float64_equals_direct_convolution_forward_and_gradients(shape, bias):
    n, c, o, h, w = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(o, c, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(o, dtype=torch.float64, generator=gen, requires_grad=True) if bias else None
    grad_out = torch.randn(n, o, h, w, dtype=torch.float64, generator=gen)
    inputs = [t for t in (x, weight, b) if t is not None]

    out = winograd.conv3x3(x, weight, b)
    ref = F.conv2d(x, weight, b, padding=1)
    torch.testing.assert_close(out, ref, **FLOAT64)
    assert out.is_contiguous(memory_format=torch.channels_last)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **FLOAT64)


def test_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(winograd.conv3x3, (x, weight, b))


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_error_is_small_and_layout_independent(channels_last):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, 16, 20, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.randn(48, 32, 3, 3, generator=gen) / (32 * 9) ** 0.5).requires_grad_()
    b = torch.randn(48, generator=gen).requires_grad_()
    grad_out = torch.randn(4, 48, 16, 20, generator=gen)
    out = winograd.conv3x3(x, weight, b)
    ref = F.conv2d(x, weight, b, padding=1)
    assert _max_rel(out, ref) < FLOAT32_REL
    grads = torch.autograd.grad(out, (x, weight, b), grad_out)
    ref_grads = torch.autograd.grad(ref, (x, weight, b), grad_out)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert _max_rel(got, want) < FLOAT32_REL


def _conv(c_in: int = 64, c_out: int = 64, k: int = 3, **kwargs) -> inn.Conv2d:
    return inn.conv_nd(2, c_in, c_out, k, **{"padding": 1, **kwargs})


@pytest.mark.parametrize(
    "conv,size,expected",
    [
        (dict(), (16, 16), True),
        (dict(), (8, 8), True),
        (dict(), (8, 7), False),  # below MIN_SIZE
        (dict(), (10, 10), False),  # 12x12 computed: below MIN_TILE_USE
        (dict(), (20, 18), True),
        (dict(c_in=32), (16, 16), False),  # below MIN_CHANNELS
        (dict(c_out=32), (16, 16), False),
        (dict(c_in=192, c_out=64), (16, 16), True),
        (dict(stride=2), (16, 16), False),
        (dict(k=1, padding=0), (16, 16), False),
        (dict(dilation=2, padding=2), (16, 16), False),
        (dict(groups=2), (16, 16), False),
        (dict(padding_mode="reflect"), (16, 16), False),
        (dict(padding=0), (16, 16), False),
    ],
)
def test_applicable(conv, size, expected):
    module = _conv(**conv)
    assert winograd.applicable(module, torch.zeros(1, module.in_channels, *size)) is expected


def test_not_applicable_to_float64_or_under_autocast():
    module = _conv()
    x = torch.zeros(1, 64, 16, 16)
    assert not winograd.applicable(module.double(), x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not winograd.applicable(module.float(), x)


def test_conv2d_module_keeps_state_dict_and_switch_selects_the_path():
    module = _conv()
    assert list(module.state_dict()) == ["weight", "bias"]
    assert isinstance(module, torch.nn.Conv2d)
    x = torch.randn(2, 64, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = F.conv2d(x, module.weight, module.bias, padding=1)
        module.set_speed(SpeedSettings(winograd=False))
        torch.testing.assert_close(module(x), ref, rtol=0, atol=0)  # the direct convolution itself
        module.set_speed(SpeedSettings(winograd=True))
        fast = module(x)
    assert fast.is_contiguous(memory_format=torch.channels_last)  # the Winograd path ran
    assert 0 < _max_rel(fast, ref) < FLOAT32_REL


def test_unet_training_step_matches_direct_convolution(monkeypatch):
    """A whole UNet (16x16, 64 channels: sizes where the path is taken): loss and every gradient."""
    kwargs = script_util.model_and_diffusion_defaults()
    kwargs.update(image_size=16, channel_mult="1,2", num_channels=64, num_res_blocks=1, attention_resolutions="8")
    kwargs.update(learn_sigma=True)
    torch.manual_seed(0)
    model, diffusion = script_util.create_model_and_diffusion(**kwargs)
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised layers: every gradient is non-trivial
            if not p.any():
                p.normal_(0.0, 0.02)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    t = torch.tensor([10, 900])
    noise = torch.randn(x.shape, generator=gen)

    def loss_and_grads(fast: bool):
        model.zero_grad()
        model.set_speed(SpeedSettings(winograd=fast))
        loss = diffusion.training_losses(model, x, t, noise=noise)["loss"].mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    conv3x3 = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a, **k: calls.append(a[0].shape) or conv3x3(*a, **k))
    loss_fast, grads_fast = loss_and_grads(True)
    assert len(calls) >= 4 and {shape[1] for shape in calls} >= {64, 128}  # both levels took the path
    calls.clear()
    loss_ref, grads_ref = loss_and_grads(False)
    assert not calls
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-4, atol=0)
    # Compared on the scale of all gradients: biases right before a GroupNorm get only
    # ~1e-9 of rounding noise (their exact gradient is zero), which no relative test can match.
    scale = max(r.abs().max() for r in grads_ref)
    for got, want in zip(grads_fast, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * scale)


def test_empty_batch_and_no_double_backward():
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    empty = torch.zeros(0, 3, 8, 8, requires_grad=True)
    out = winograd.conv3x3(empty, weight)
    assert out.shape == (0, 4, 8, 8)
    out.sum().backward()
    assert empty.grad.shape == empty.shape and not weight.grad.any()
    # The backward uses transforms saved without a graph: differentiating it again must fail
    # loudly rather than give a silently wrong second derivative.
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    (grad_x,) = torch.autograd.grad(winograd.conv3x3(x, weight).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()


@pytest.mark.parametrize("shape", [(1, 2, 4, 4), (1, 2, 1, 5), (2, 3, 9, 8)])
def test_results_never_share_memory_with_the_workspace(shape):
    """Outputs and gradients of earlier calls survive later calls (which reuse the scratch buffers)."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(3, shape[1], 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    xs = [torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2)]
    grad_out = torch.randn(shape[0], 3, *shape[2:], dtype=torch.float64, generator=gen)
    outs = [winograd.conv3x3(x, weight) for x in xs]
    grads = [torch.autograd.grad(out, (x, weight), grad_out) for out, x in zip(outs, xs)]
    with torch.no_grad():
        later = winograd.conv3x3(torch.randn(shape, dtype=torch.float64, generator=gen), weight)
    assert later.abs().sum() > 0
    for out, (grad_x, grad_w), x in zip(outs, grads, xs):
        ref = F.conv2d(x, weight, padding=1)
        torch.testing.assert_close(out, ref, **FLOAT64)
        ref_x, ref_w = torch.autograd.grad(ref, (x, weight), grad_out)
        torch.testing.assert_close(grad_x, ref_x, **FLOAT64)
        torch.testing.assert_close(grad_w, ref_w, **FLOAT64)


def test_threads_have_their_own_workspace():
    import threading

    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 8, 3, 3, dtype=torch.float64, generator=gen)
    inputs = [torch.randn(2, 8, 4 * (i + 2), 12, dtype=torch.float64, generator=gen) for i in range(4)]
    results = {}

    def work(i):
        for _ in range(20):
            results[i] = winograd.conv3x3(inputs[i], weight)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(inputs):
        torch.testing.assert_close(results[i], F.conv2d(x, weight, padding=1), **FLOAT64)
    winograd.release_workspace()
    assert not winograd._WORKSPACE.buffers


def test_path_chooser_times_each_shape_once_and_keeps_the_decision(tmp_path):
    cache = tmp_path / "paths.json"
    chooser = winograd.PathChooser(str(cache), repeats=1)
    x = torch.randn(2, 64, 16, 16, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    first = chooser.use_winograd(64, 64, x, training=True)
    assert torch.equal(torch.get_rng_state(), state)  # timing draws no random numbers
    assert chooser.use_winograd(64, 64, x, training=True) == first
    (line,) = chooser.report()
    assert line.startswith("conv path 64->64 16x16 batch 2 contiguous train") and "direct" in line
    assert chooser.report() == []  # reported once
    decision = next(iter(chooser.decisions.values()))
    assert decision["winograd"] == (decision["winograd_s"] <= 0.95 * decision["direct_s"])
    again = winograd.PathChooser(str(cache))  # a later run reads the decision instead of timing
    assert again.decisions == chooser.decisions and again.use_winograd(64, 64, x, training=True) == first
    assert again.report() == []


def test_path_chooser_rejects_a_broken_cache_file(tmp_path):
    cache = tmp_path / "paths.json"
    cache.write_text("{not json")
    with pytest.raises(UserError, match=r"--winograd_cache .*paths.json: not a readable JSON file"):
        winograd.PathChooser(str(cache))


def test_auto_model_follows_the_measured_decisions(monkeypatch):
    """--winograd auto: each layer takes the path its chooser decided, whatever the size rule says."""
    kwargs = script_util.model_and_diffusion_defaults()
    kwargs.update(image_size=16, channel_mult="1,2", num_channels=32, num_res_blocks=1, attention_resolutions="8")
    model, _ = script_util.create_model_and_diffusion(**kwargs)  # default speed: winograd auto
    assert model.speed.winograd == "auto" and model.conv_chooser is not None
    monkeypatch.setattr(model.conv_chooser, "use_winograd", lambda *a, **k: True)
    calls = []
    conv3x3 = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a, **k: calls.append(a[0].shape) or conv3x3(*a, **k))
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16), torch.tensor([5]))
    # 32-channel layers, below the fixed rule's 64, took Winograd because the chooser said so
    assert any(shape[1] == 32 for shape in calls)
    model.set_speed(SpeedSettings(winograd=True))
    calls.clear()
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16), torch.tensor([5]))
    assert calls and all(shape[1] >= 64 for shape in calls)  # the fixed rule


def test_speed_settings_reject_other_winograd_values():
    with pytest.raises(UserError, match="--winograd 'maybe': expected True, False or auto"):
        SpeedSettings(winograd="maybe")


@pytest.mark.parametrize("in_channels", [1, 3])
def test_channels_last_network_keeps_its_layout_after_a_one_channel_input(in_channels, monkeypatch):
    """A one-channel input is both layouts, so the first convolution returned NCHW and every later
    layer changed layouts; the torso now keeps channels-last from the first block on."""
    kwargs = script_util.model_and_diffusion_defaults()
    kwargs.update(
        image_size=16,
        channel_mult="1,2",
        num_channels=64,
        num_res_blocks=1,
        attention_resolutions="8",
        image_channels=in_channels,
    )
    model, _ = script_util.create_model_and_diffusion(**kwargs, speed=SpeedSettings(winograd=True))
    layouts = []
    real = inn.Conv2d.forward

    def forward(self, x):
        if self.kernel_size == (3, 3) and self.in_channels > 1:
            layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return real(self, x)

    monkeypatch.setattr(inn.Conv2d, "forward", forward)
    x = torch.randn(2, in_channels, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([5, 6]))
        model.set_speed(SpeedSettings(winograd=False, sdpa=False, native_kernels=False))
        ref = model(x, torch.tensor([5, 6]))
    assert layouts and all(layouts[: len(layouts) // 2])  # the Winograd run: every layer channels-last
    assert not any(layouts[len(layouts) // 2 :])  # the plain run: NCHW throughout
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
