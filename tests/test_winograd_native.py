"""Tests for improved_diffusion.winograd_native: the compiled tile transforms against the torch-ops ones."""

import os

import pytest
import torch
import torch.nn.functional as F

from improved_diffusion import logger, winograd, winograd_native
from improved_diffusion.nn import SpeedSettings
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

pytestmark = pytest.mark.usefixtures("one_thread")

# Each transform is a handful of additions with constants up to 8 per axis: float32 rounding only.
TRANSFORM_REL = 1e-5
FLOAT32_REL = 5e-5  # a whole convolution against the float64 direct one, as in test_winograd.py

needs_compiler = pytest.mark.skipif(not winograd_native._compilers(), reason="no C compiler on this machine")


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty library cache and no library loaded yet in this process."""
    monkeypatch.setenv("IMPROVED_DIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(winograd_native, "_LOADED", {})
    return tmp_path / "cache"


@needs_compiler
def test_library_loads_and_each_transform_equals_the_torch_ops_one():
    transforms = winograd_native.load(winograd.self_check)
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
    for native in (True, False):
        out = winograd.conv3x3(x, weight, bias, native=native)
        assert out.is_contiguous(memory_format=torch.channels_last)
        results[native] = (out, *torch.autograd.grad(out, (x, weight, bias), grad_out))
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
    assert winograd_native.load(winograd.self_check) is not None
    (library,) = os.listdir(fresh_cache)  # no temporary file left beside it
    assert library.startswith("winograd_transforms-") and library.endswith(".so")
    built = os.path.getmtime(fresh_cache / library)
    monkeypatch.setattr(winograd_native, "_LOADED", {})
    calls = []
    real_run = winograd_native.subprocess.run
    monkeypatch.setattr(winograd_native.subprocess, "run", lambda cmd, **k: calls.append(cmd) or real_run(cmd, **k))
    assert winograd_native.load(winograd.self_check) is not None
    assert all("--version" in cmd for cmd in calls)  # asked the compiler's version, compiled nothing
    assert os.listdir(fresh_cache) == [library] and os.path.getmtime(fresh_cache / library) == built


def test_without_a_working_compiler_the_torch_ops_transforms_are_used(fresh_cache, tmp_path, monkeypatch):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["log"]):
        assert winograd_native.load(winograd.self_check) is None
        assert winograd_native.load(winograd.self_check) is None  # decided once per process
    text = (tmp_path / "log" / "log.txt").read_text()
    assert text.count("compiled transforms unavailable") == 1 and "broken-cc: cannot compile" in text
    assert not [f for f in os.listdir(fresh_cache) if f.endswith(".so")]
    x = torch.randn(2, 8, 9, 7, generator=torch.Generator().manual_seed(0))
    weight = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    assert winograd.transforms_for(x) is winograd.TORCH_TRANSFORMS
    assert _max_rel(winograd.conv3x3(x, weight), F.conv2d(x.double(), weight.double(), padding=1)) < FLOAT32_REL


def test_no_compiler_at_all(fresh_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["log"]):
        assert winograd_native.load(winograd.self_check) is None
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

    assert winograd.self_check(Off(winograd_native.load(winograd.self_check))) == "output_transform off by 1.0e-03"


@needs_compiler
def test_shape_and_layout_mistakes_are_refused():
    transforms = winograd_native.load(winograd.self_check)
    image = torch.zeros(1, 8, 8, 4)
    with pytest.raises(ValueError, match=r"\(36, 4, 4\)"):
        transforms.input_transform(image, torch.zeros(36, 3, 4))
    with pytest.raises(ValueError, match="float32"):
        transforms.output_transform(torch.zeros(36, 4, 4, dtype=torch.float64), None, image)
    with pytest.raises(ValueError, match="strided"):
        transforms.grad_input_transform(torch.zeros(36, 4, 4), torch.zeros(1, 8, 4, 8).transpose(2, 3))


@pytest.mark.parametrize("native", [True, False])
def test_speed_setting_selects_the_transforms(native, monkeypatch):
    flags = model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=64, num_res_blocks=1, channel_mult="1", attention_resolutions="")
    model, _ = create_model_and_diffusion(**flags, speed=SpeedSettings(winograd=True, winograd_native=native))
    seen = []
    real = winograd.transforms_for
    monkeypatch.setattr(winograd, "transforms_for", lambda x, n=True: seen.append(n) or real(x, n))
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    assert seen and set(seen) == {native}
    assert f"winograd_native={native}" in SpeedSettings(winograd_native=native).summary()
