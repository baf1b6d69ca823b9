"""Tests for improved_diffusion.native: the compiled kernels against their torch references."""

import os

import pytest
import torch
import torch.nn.functional as F

from improved_diffusion import logger, native, winograd
from improved_diffusion import nn as inn
from improved_diffusion.nn import SpeedSettings
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

pytestmark = pytest.mark.usefixtures("one_thread")

# Each transform is a handful of additions with constants up to 8 per axis: float32 rounding only.
TRANSFORM_REL = 1e-5
FLOAT32_REL = 5e-5  # a whole convolution against the float64 direct one, as in test_winograd.py

needs_compiler = pytest.mark.skipif(not native._compilers(), reason="no C compiler on this machine")


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty library cache and no library loaded yet in this process."""
    monkeypatch.setenv("IMPROVED_DIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_LOADED", {})
    return tmp_path / "cache"


@needs_compiler
def test_library_loads_and_each_transform_equals_the_torch_ops_one():
    transforms = native.transforms(winograd.self_check)
    assert transforms is not None
    pairs = winograd.transform_pairs(transforms, torch.Generator().manual_seed(3))
    assert sorted(pairs) == ["grad_input_transform", "grad_output_transform", "input_transform", "output_transform"]
    for name, (ours, reference) in pairs.items():
        assert ours.shape == reference.shape, name
        assert _max_rel(ours, reference) < TRANSFORM_REL, name
    assert winograd.self_check(transforms) == ""


SHAPES = [
    # (N, C, O, H, W): whole tiles, remainders both ways, one channel, more channels than a block (64).
    (2, 3, 5, 8, 8),
    (1, 1, 1, 5, 4),
    (3, 70, 66, 10, 13),
    (2, 130, 64, 16, 16),
    (1, 64, 6, 7, 9),
]


@needs_compiler
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_convolution_matches_direct_and_torch_ops_transforms(shape, channels_last):
    n, c, o, h, w = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, c, h, w, generator=gen)
    x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    weight = (torch.randn(o, c, 3, 3, generator=gen) / (9 * c) ** 0.5).requires_grad_()
    bias = torch.randn(o, generator=gen).requires_grad_()
    grad_out = torch.randn(n, o, h, w, generator=gen)
    results = {}
    for compiled in (True, False):
        out = winograd.conv3x3(x, weight, bias, native=compiled)
        assert out.is_contiguous(memory_format=torch.channels_last)
        results[compiled] = (out, *torch.autograd.grad(out, (x, weight, bias), grad_out))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    ref = F.conv2d(x64, w64, b64, padding=1)
    reference = (ref, *torch.autograd.grad(ref, (x64, w64, b64), grad_out.double()))
    for got, torch_ops, want in zip(results[True], results[False], reference):
        assert got.shape == want.shape
        assert _max_rel(got, want) < FLOAT32_REL
        assert _max_rel(got, torch_ops) < FLOAT32_REL


@needs_compiler
def test_results_do_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 70, 12, 11, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(66, 70, 3, 3, generator=gen).requires_grad_()
    grad_out = torch.randn(5, 66, 12, 11, generator=gen)
    runs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out = winograd.conv3x3(x, weight)
        runs.append((out, *torch.autograd.grad(out, (x, weight), grad_out)))
    torch.set_num_threads(1)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@needs_compiler
def test_library_is_built_once_into_the_cache_and_reused(fresh_cache, monkeypatch):
    assert native.transforms(winograd.self_check) is not None
    (library,) = os.listdir(fresh_cache)  # no temporary file left beside it
    assert library.startswith("cpu_kernels-") and library.endswith(".so")
    built = os.path.getmtime(fresh_cache / library)
    monkeypatch.setattr(native, "_LOADED", {})
    calls = []
    real_run = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda cmd, **k: calls.append(cmd) or real_run(cmd, **k))
    assert native.transforms(winograd.self_check) is not None
    assert all("--version" in cmd for cmd in calls)  # asked the compiler's version, compiled nothing
    assert os.listdir(fresh_cache) == [library] and os.path.getmtime(fresh_cache / library) == built


@needs_compiler
def test_an_unwritable_cache_folder_falls_back_to_the_temporary_folder(fresh_cache, tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("IMPROVED_DIFFUSION_CACHE", str(blocked / "cache"))  # under a file: cannot be made
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert native.transforms(winograd.self_check) is not None
    assert [f.endswith(".so") for f in os.listdir(next((tmp_path / "tmp").iterdir()))] == [True]


def test_without_a_working_compiler_the_torch_ops_transforms_are_used(fresh_cache, tmp_path, monkeypatch):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["log"]):
        assert native.transforms(winograd.self_check) is None
        assert native.transforms(winograd.self_check) is None  # decided once per process
    text = (tmp_path / "log" / "log.txt").read_text()
    assert text.count("native kernels unavailable") == 1 and "broken-cc: cannot compile" in text
    assert not [f for f in os.listdir(fresh_cache) if f.endswith(".so")]
    x = torch.randn(2, 8, 9, 7, generator=torch.Generator().manual_seed(0))
    weight = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    assert winograd.transforms_for(x) is winograd.TORCH_TRANSFORMS
    assert _max_rel(winograd.conv3x3(x, weight), F.conv2d(x.double(), weight.double(), padding=1)) < FLOAT32_REL


def test_no_compiler_at_all(fresh_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["log"]):
        assert native.transforms(winograd.self_check) is None
    assert "no C compiler found" in (tmp_path / "log" / "log.txt").read_text()


@needs_compiler
def test_self_check_rejects_wrong_transforms():
    class Off:
        def __init__(self, transforms):
            self.transforms = transforms

        def __getattr__(self, name):
            def call(*args):
                return (
                    getattr(self.transforms, name)(*args).mul_(1.001)
                    if name == "output_transform"
                    else (getattr(self.transforms, name)(*args))
                )

            return call

    assert winograd.self_check(Off(native.transforms(winograd.self_check))) == "output_transform off by 1.0e-03"


@needs_compiler
def test_shape_and_layout_mistakes_are_refused():
    transforms = native.transforms(winograd.self_check)
    image = torch.zeros(1, 8, 8, 4)
    with pytest.raises(ValueError, match=r"\(36, 4, 4\)"):
        transforms.input_transform(image, torch.zeros(36, 3, 4))
    with pytest.raises(ValueError, match="float32"):
        transforms.output_transform(torch.zeros(36, 4, 4, dtype=torch.float64), None, image)
    with pytest.raises(ValueError, match="strided"):
        transforms.grad_input_transform(torch.zeros(36, 4, 4), torch.zeros(1, 8, 4, 8).transpose(2, 3))


@pytest.mark.parametrize("compiled", [True, False])
def test_speed_setting_selects_the_transforms(compiled, monkeypatch):
    flags = model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=64, num_res_blocks=1, channel_mult="1", attention_resolutions="")
    model, _ = create_model_and_diffusion(**flags, speed=SpeedSettings(winograd=True, native_kernels=compiled))
    seen = []
    real = winograd.transforms_for
    monkeypatch.setattr(winograd, "transforms_for", lambda x, n=True: seen.append(n) or real(x, n))
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    assert seen and set(seen) == {compiled}
    assert f"native_kernels={compiled}" in SpeedSettings(native_kernels=compiled).summary()


GN_SHAPES = [(2, 64, 8, 8, 32), (3, 12, 5, 3, 4), (1, 128, 4, 7, 32), (2, 6, 1, 9, 3)]


def _gn_case(shape, seed=0):
    n, c, h, w, _ = shape
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=gen) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
    return x, torch.randn(c, generator=gen), torch.randn(c, generator=gen), torch.randn(n, c, h, w, generator=gen)


@needs_compiler
@pytest.mark.parametrize("shape", GN_SHAPES)
def test_group_norm_equals_torch_forward_and_gradients(shape):
    x, weight, bias, grad = _gn_case(shape)
    groups = shape[-1]
    assert native.group_norm_applies(x, groups)
    results = []
    for fn in (native.group_norm, lambda *a: F.group_norm(*a[:4], eps=a[4])):
        inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        out = fn(inputs[0], groups, inputs[1], inputs[2], 1e-5)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)
    for ours, reference in zip(*results):
        assert ours.shape == reference.shape
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_group_norm_without_affine_and_thread_count_independent():
    x, _, _, grad = _gn_case((5, 64, 6, 6, 32), seed=1)
    runs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        xi = x.detach().requires_grad_()
        out = native.group_norm(xi, 32, None, None, 1e-6)
        runs.append((out, *torch.autograd.grad(out, xi, grad)))
    torch.set_num_threads(1)
    torch.testing.assert_close(runs[0][0], F.group_norm(x, 32, eps=1e-6), rtol=1e-5, atol=1e-5)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_group_norm_applies_only_to_channels_last_float32_cpu_images():
    x = torch.randn(2, 64, 4, 4)
    assert not native.group_norm_applies(x, 32)  # NCHW: torch's kernel is fast there
    cl = x.contiguous(memory_format=torch.channels_last)
    assert native.group_norm_applies(cl, 32)
    assert not native.group_norm_applies(cl.double(), 32)
    assert not native.group_norm_applies(torch.randn(2, 64, 1, 1).contiguous(memory_format=torch.channels_last), 32)
    assert not native.group_norm_applies(cl, 5)  # groups must divide the channels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not native.group_norm_applies(cl, 32)


@needs_compiler
@pytest.mark.parametrize("native_kernels", [True, False])
def test_groupnorm32_layer_takes_the_kernel_by_its_setting(native_kernels, monkeypatch):
    layer = inn.normalization(64)
    torch.nn.init.normal_(layer.weight)
    inn.apply_speed(torch.nn.Sequential(layer), SpeedSettings(native_kernels=native_kernels))
    calls = []
    real = native.group_norm
    monkeypatch.setattr(native, "group_norm", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    out = layer(x)
    assert len(calls) == int(native_kernels)
    torch.testing.assert_close(out, F.group_norm(x, 32, layer.weight, layer.bias, layer.eps), rtol=1e-5, atol=1e-5)
    layer(x.contiguous())  # NCHW input: never the kernel
    assert len(calls) == int(native_kernels)
    tokens = x.reshape(2, 64, 64)  # attention's positions-first view of the channels-last map
    out = layer(tokens)
    assert len(calls) == 2 * int(native_kernels) and out.shape == tokens.shape
    torch.testing.assert_close(out, F.group_norm(tokens, 32, layer.weight, layer.bias, layer.eps), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_group_norm_self_check_passes():
    assert native._check_group_norm(native._gn_signatures(native.library())) == ""


@needs_compiler
def test_first_use_and_self_checks_draw_no_global_random_numbers(fresh_cache):
    """The library is built and checked inside a caller's run: its checks must not move the global RNG."""
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(64, 64, 3, 3)
    state = torch.get_rng_state()
    native.group_norm(x, 32, None, None, 1e-5)
    winograd.conv3x3(x, weight)
    assert native._LOADED["group_norm"] is not None and native._LOADED["transforms"] is not None
    assert torch.equal(torch.get_rng_state(), state)
