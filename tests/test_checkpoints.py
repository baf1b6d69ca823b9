"""Tests for improved_diffusion.checkpoints: strict loading and messages that name keys, shapes and flags."""

import re

import pytest
import torch
from golden import load_pt

from improved_diffusion import checkpoints, script_util
from improved_diffusion.checkpoints import guess_flags_from_state_dict, load_model_state
from improved_diffusion.errors import UserError
from improved_diffusion.unet import UNetModel

HEADS_NOTE = "--num_heads and --num_heads_upsample are not stored in a checkpoint"
UNSTORED_END = (
    "nor are --num_head_channels, --use_new_attention_order and --rescale_timesteps (they change the outputs, "
    "not the shapes): keep the training values, or for a released checkpoint use --preset NAME (--preset list)"
)


def _flags(**overrides) -> dict:
    flags = script_util.model_and_diffusion_defaults()
    flags.update(num_channels=32, num_res_blocks=1, num_heads=2)
    flags.update(overrides)
    return flags


def _model(flags: dict) -> UNetModel:
    return script_util.create_model_and_diffusion(**flags)[0]


def _small_flags(**overrides) -> dict:
    """The flags of unet_small.pt (32px, learned sigma, classes), with overrides."""
    return _flags(**{**load_pt("unet_small.pt")["kwargs"], **overrides})


def _error(model, state_dict, flags=None, source="model.pt") -> str:
    with pytest.raises(UserError) as info:
        load_model_state(model, state_dict, source, flags=flags)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"checkpoint {source} ")
    return message


@pytest.mark.parametrize(
    "name,expected",
    [
        (
            "unet_small.pt",
            dict(
                num_channels=32,
                image_channels=3,
                learn_sigma=True,
                class_cond=True,
                use_scale_shift_norm=True,
                resblock_updown=False,
                num_res_blocks=1,
                channel_mult="1,2,2,2",
                attention_downsample_factors=(2, 4),
                image_size=32,
                attention_resolutions="16,8",
            ),
        ),
        (
            "unet_small64.pt",
            dict(
                num_channels=32,
                image_channels=3,
                learn_sigma=False,
                class_cond=False,
                use_scale_shift_norm=False,
                resblock_updown=False,
                num_res_blocks=1,
                channel_mult="1,2,3,4",
                attention_downsample_factors=(4,),
                image_size=64,
                attention_resolutions="16",
            ),
        ),
        (
            # (1, 2) belongs to no known size, so no image size or attention sides are guessed.
            "unet_superres.pt",
            dict(
                num_channels=32,
                image_channels=3,
                learn_sigma=True,
                class_cond=True,
                use_scale_shift_norm=True,
                resblock_updown=False,
                num_res_blocks=1,
                channel_mult="1,2",
                attention_downsample_factors=(2,),
            ),
        ),
    ],
)
def test_guess_flags_from_golden_state_dicts(name, expected):
    assert guess_flags_from_state_dict(load_pt(name)["state_dict"]) == expected


@pytest.mark.parametrize(
    "in_channels, out_channels, expected",
    [
        (1, 1, dict(image_channels=1, learn_sigma=False)),
        (1, 2, dict(image_channels=1, learn_sigma=True)),
        (3, 6, dict(image_channels=3, learn_sigma=True)),
        (6, 3, dict(image_channels=3, learn_sigma=False)),  # super-resolution: x and low_res
        (6, 6, dict(image_channels=3, learn_sigma=True)),  # the original's upsampler with learned sigma
        (2, 1, dict(image_channels=1, learn_sigma=False)),  # a 1-channel upsampler
    ],
)
def test_guess_flags_reads_the_image_channels(in_channels, out_channels, expected):
    model = UNetModel(in_channels, 32, out_channels, num_res_blocks=1, attention_resolutions=(), channel_mult=(1, 2))
    guess = guess_flags_from_state_dict(model.state_dict())
    assert {k: guess[k] for k in expected} == expected


def test_guess_flags_sees_weightless_downsamples_and_super_resolution():
    model = UNetModel(
        6, 32, 3, num_res_blocks=2, attention_resolutions=(1, 4), channel_mult=(1, 1, 2, 2, 4, 4), conv_resample=False
    )
    guess = guess_flags_from_state_dict(model.state_dict())
    assert guess["num_res_blocks"] == 2 and guess["channel_mult"] == "1,1,2,2,4,4"
    # Upsamplers to 256 and to 512 share these multipliers: no size (and no sides) is guessed.
    assert guess["attention_downsample_factors"] == (1, 4) and "attention_resolutions" not in guess
    assert guess["learn_sigma"] is False and "image_size" not in guess and "large_size" not in guess
    model = UNetModel(6, 32, 3, num_res_blocks=1, attention_resolutions=(4,), channel_mult=(1, 2, 3, 4))
    assert guess_flags_from_state_dict(model.state_dict())["large_size"] == 64


def test_matching_checkpoint_loads_strictly_from_float16():
    data = load_pt("unet_small.pt")
    model = _model(_small_flags())
    load_model_state(model, data["state_dict"], "model.pt", flags=_small_flags())
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, data["state_dict"][key].float(), rtol=0, atol=0)


@pytest.mark.parametrize("pass_flags", [True, False])
def test_other_width_names_keys_shapes_and_flags(pass_flags):
    flags = _small_flags(num_channels=64, learn_sigma=False, class_cond=False)
    model = _model(flags)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = _error(model, load_pt("unet_small.pt")["state_dict"], flags if pass_flags else None)
    assert message.startswith(
        "checkpoint model.pt does not match the model built from the flags: "
        "input_blocks.0.0.weight is (32, 3, 3, 3) in the checkpoint but (64, 3, 3, 3) in the model, "
        "out.2.weight is (6, 32, 3, 3) in the checkpoint but (3, 64, 3, 3) in the model, "
    )
    assert "label_emb.weight (1000, 128) is in the checkpoint but not in the model" in message
    label = "you passed" if pass_flags else "the model has"
    assert (
        "the checkpoint looks like --num_channels 32 --learn_sigma True --class_cond True "
        f"({label} --num_channels 64 --learn_sigma False --class_cond False)"
    ) in message
    assert message.endswith(f"{HEADS_NOTE}, {UNSTORED_END}")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded


def test_other_image_size_names_the_image_size_flag():
    flags = _small_flags(image_size=64)
    message = _error(_model(flags), load_pt("unet_small.pt")["state_dict"], flags)
    # The multipliers follow from the size, and "16,8" means the same sides: neither is suggested.
    assert re.search(r"looks like --image_size 32 \(you passed --image_size 64\);", message), message
    assert "input_blocks.5.0.in_layers.2.weight is (64, 64, 3, 3) in the checkpoint but (96, 64, 3, 3)" in message


def test_other_blocks_attention_and_scale_shift_name_their_flags():
    flags = _flags(image_size=64, attention_resolutions="16,8", num_res_blocks=2, use_scale_shift_norm=True)
    message = _error(_model(flags), load_pt("unet_small64.pt")["state_dict"], flags)
    assert (
        "the checkpoint looks like --num_res_blocks 1 --use_scale_shift_norm False --attention_resolutions 16 "
        "(you passed --num_res_blocks 2 --use_scale_shift_norm True --attention_resolutions 16,8)"
    ) in message


def test_super_resolution_checkpoint_in_an_image_model():
    flags = _flags(image_size=64)
    message = _error(_model(flags), load_pt("unet_superres.pt")["state_dict"], flags, source="sr.pt")
    assert "input_blocks.0.0.weight is (32, 6, 3, 3) in the checkpoint but (32, 3, 3, 3) in the model" in message
    assert (
        "looks like --learn_sigma True --class_cond True --channel_mult 1,2 "
        '(you passed --learn_sigma False --class_cond False --channel_mult "")'
    ) in message
    assert "it is a super-resolution model (6 input channels): use the super_res scripts" in message


def test_ddp_prefixed_keys_get_a_hint():
    data = load_pt("unet_small.pt")
    prefixed = {f"module.{k}": v for k, v in data["state_dict"].items()}
    message = _error(_model(_small_flags()), prefixed)
    assert "time_embed.0.weight (128, 32) is missing from the checkpoint" in message
    assert "module.time_embed.0.weight (128, 32) is in the checkpoint but not in the model" in message
    assert "its keys start with 'module.' (saved from a DistributedDataParallel wrapper" in message


@pytest.mark.parametrize(
    "state_dict,found",
    [({"state": {}, "param_groups": []}, "a dict with keys state, param_groups"), ([1, 2], "list")],
)
def test_not_a_state_dict(state_dict, found):
    model = UNetModel(3, 32, 3, 1, (), channel_mult=(1,))
    with pytest.raises(UserError, match=rf"^checkpoint opt\.pt is not a model state_dict \(found {found}\)"):
        load_model_state(model, state_dict, "opt.pt")


@pytest.mark.parametrize("saved", [torch.zeros(16, dtype=torch.uint8), [torch.zeros(16, dtype=torch.uint8)] * 2])
def test_cuda_generator_state_that_cannot_be_restored_is_logged(monkeypatch, saved):
    """A checkpoint written on a GPU, resumed on a CPU: the other generators come back, the CUDA one is named."""
    lines = []
    monkeypatch.setattr(checkpoints.logger, "log", lines.append)
    monkeypatch.setattr(checkpoints.dist_util, "dev", lambda: torch.device("cpu"))
    torch.manual_seed(3)
    state = dict(checkpoints.get_rng_state(), cuda=saved)
    expected = torch.rand(3)
    checkpoints.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)
    assert lines == ["resume: the checkpoint's CUDA generator state is not restored: no GPU here"]


@pytest.mark.cuda
def test_each_rank_saves_and_restores_its_own_cuda_generator():
    state = checkpoints.get_rng_state()
    assert isinstance(state["cuda"], torch.Tensor)  # this device's generator, not a list of all
    expected = torch.rand(3, device=checkpoints.dist_util.dev())
    checkpoints.set_rng_state(state)
    assert torch.equal(torch.rand(3, device=checkpoints.dist_util.dev()), expected)


def test_classifier_checkpoint_of_another_shape_names_the_classifier_flags():
    from improved_diffusion.unet import EncoderUNetModel

    data = load_pt("guided/classifiers.pt")["models"]
    kwargs = dict(data["attention"]["kwargs"], model_channels=64, pool="adaptive")
    with pytest.raises(UserError) as info:
        load_model_state(EncoderUNetModel(**kwargs), data["attention"]["state_dict"], "clf.pt", flags={})
    message = str(info.value)
    assert "\n" not in message and message.startswith("checkpoint clf.pt does not match the model")
    assert (
        "the checkpoint looks like --classifier_width 32 --classifier_pool attention "
        "(you passed --classifier_width 64 --classifier_pool adaptive)"
    ) in message
    assert message.endswith("for a released classifier use --preset adm-classifier64 (128, 256, 512)")
    model = EncoderUNetModel(**data["spatial_v2"]["kwargs"])
    load_model_state(model, data["spatial_v2"]["state_dict"], "clf.pt")  # a matching one loads strictly
