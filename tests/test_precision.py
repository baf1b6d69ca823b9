"""Tests for improved_diffusion.precision: --use_bf16 auto, the flag checks and the model-call boundary."""

import pytest
import torch

from improved_diffusion.errors import UserError
from improved_diffusion.precision import AUTO, MixedPrecision, ModelCall, check_precision_flags, native_bf16


def test_bf16_auto_follows_the_device():
    lines = []
    precision = MixedPrecision(torch.device("cpu"), use_bf16=AUTO, log=lines.append)
    expected = torch.bfloat16 if native_bf16(torch.device("cpu")) else None
    assert precision.dtype == expected and precision.scaler is None
    assert lines[0] == f"--use_bf16 auto: {'bfloat16 autocast' if expected else 'float32'} on cpu"


@pytest.mark.parametrize(
    "fp16, bf16, growth, match",
    [
        (True, True, 1e-3, "--use_fp16 and --use_bf16 exclude each other"),
        (True, AUTO, 1e-3, "--use_fp16 and --use_bf16 exclude each other"),
        (False, "maybe", 1e-3, "--use_bf16 'maybe': expected True, False or auto"),
        (True, False, 0.0, "--fp16_scale_growth 0.0: must be positive"),
    ],
)
def test_precision_flags_are_checked(fp16, bf16, growth, match):
    with pytest.raises(UserError, match=match):
        check_precision_flags(fp16, bf16, growth)


def test_model_call_returns_float32_and_converts_the_layout():
    seen = []

    def model(x, t, **kwargs):
        seen.append((x.is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cpu"), kwargs))
        return (x * 2).to(torch.bfloat16)

    x = torch.randn(2, 3, 4, 4)
    out = ModelCall(model, MixedPrecision(torch.device("cpu"), use_bf16=True), channels_last=True)(x, None, y=1)
    assert out.dtype == torch.float32 and seen == [(True, True, {"y": 1})]
    torch.testing.assert_close(out, (x * 2).to(torch.bfloat16).float(), rtol=0, atol=0)
    out = ModelCall(model)(x, None)
    assert seen[-1][:2] == (False, False) and out.dtype == torch.float32
