"""Flag plumbing: defaults, strict booleans, flag -> enum mapping, args.json, one-line parser errors."""

import argparse
import json

import pytest

from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion.errors import UserError
from improved_diffusion.script_util import (
    FlagParser,
    add_dict_to_argparser,
    args_to_dict,
    attention_downsample_factors,
    channel_mult_for,
    check_choice,
    create_gaussian_diffusion,
    create_model,
    model_and_diffusion_defaults,
    parse_args_with_saved,
    save_args_json,
    speed_defaults,
    sr_model_and_diffusion_defaults,
    str2bool,
)

ORIGINAL_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False, class_cond=False,
    diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False,
    predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=False,
    use_scale_shift_norm=True,
)  # fmt: skip


# guided-diffusion's architecture flags at values that build the original's network.
ADM_DEFAULTS = dict(num_head_channels=-1, resblock_updown=False, use_new_attention_order=False)
# The label table's flags (classifier-free guidance) at the original's values: 1000 classes, no null row.
LABEL_DEFAULTS = dict(num_classes=1000, class_dropout_prob=0.0)


def test_defaults_are_the_originals_plus_channel_mult_adm_and_label_flags():
    expected = dict(ORIGINAL_DEFAULTS, channel_mult="", image_channels=3, **ADM_DEFAULTS, **LABEL_DEFAULTS)
    assert model_and_diffusion_defaults() == expected


def test_every_script_has_the_speed_flags():
    """--sdpa and --winograd, on by default, accepted by all five scripts (parsed as booleans)."""
    import os
    import runpy

    assert speed_defaults() == {"sdpa": True, "winograd": "auto", "winograd_cache": "", "native_kernels": True}
    scripts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
    for name in ("image_train.py", "super_res_train.py", "image_sample.py", "super_res_sample.py", "image_nll.py"):
        parser = runpy.run_path(os.path.join(scripts, name), run_name="not_main")["create_argparser"]()
        args = parser.parse_args(["--winograd", "False"])
        assert (args.sdpa, args.winograd) == (True, False), name


def test_super_res_defaults_drop_image_size_and_sigma_small():
    expected = {k: v for k, v in ORIGINAL_DEFAULTS.items() if k not in ("image_size", "sigma_small")}
    assert sr_model_and_diffusion_defaults() == dict(
        expected, large_size=256, small_size=64, channel_mult="", image_channels=3, **ADM_DEFAULTS, **LABEL_DEFAULTS
    )


@pytest.mark.parametrize("text, value", [("True", True), ("yes", True), ("1", True), ("f", False), ("NO", False)])
def test_str2bool_accepts(text, value):
    assert str2bool(text) is value


def test_str2bool_rejects_anything_else():
    with pytest.raises(argparse.ArgumentTypeError, match="boolean value expected.*'maybe'"):
        str2bool("maybe")


@pytest.mark.parametrize(
    "flags, mean, var, loss",
    [
        ({}, "EPSILON", "FIXED_LARGE", "MSE"),
        ({"sigma_small": True}, "EPSILON", "FIXED_SMALL", "MSE"),
        ({"learn_sigma": True, "rescale_learned_sigmas": True}, "EPSILON", "LEARNED_RANGE", "RESCALED_MSE"),
        ({"use_kl": True, "rescale_learned_sigmas": True}, "EPSILON", "FIXED_LARGE", "RESCALED_KL"),
        ({"predict_xstart": True, "learn_sigma": True}, "START_X", "LEARNED_RANGE", "MSE"),
    ],
)
def test_flags_map_to_enums_as_the_original(flags, mean, var, loss):
    diffusion = create_gaussian_diffusion(steps=30, **flags)
    assert diffusion.model_mean_type is gd.ModelMeanType[mean]
    assert diffusion.model_var_type is gd.ModelVarType[var]
    assert diffusion.loss_type is gd.LossType[loss]
    assert diffusion.num_timesteps == 30  # empty respacing keeps every step


def test_respacing_flag_is_applied():
    assert create_gaussian_diffusion(steps=100, timestep_respacing="ddim10").num_timesteps == 10


def test_channel_mult_table_flag_and_errors():
    assert channel_mult_for(64) == (1, 2, 3, 4)
    assert channel_mult_for(256) == (1, 1, 2, 2, 4, 4)
    assert channel_mult_for(48, "1,2,2") == (1, 2, 2)
    with pytest.raises(UserError, match=r"--image_size 48 has no default channel multipliers.*--channel_mult"):
        channel_mult_for(48)
    with pytest.raises(UserError, match=r"--channel_mult '1,x'"):
        channel_mult_for(32, "1,x")
    with pytest.raises(UserError, match=r"--channel_mult '1,0'.*positive"):
        channel_mult_for(32, "1,0")


def test_attention_resolutions_become_downsample_factors():
    assert attention_downsample_factors("16,8", 64) == (4, 8)
    assert attention_downsample_factors("", 64) == ()
    with pytest.raises(UserError, match=r"--attention_resolutions '16;8'"):
        attention_downsample_factors("16;8", 64)


@pytest.mark.parametrize(
    "flag, value, match",
    [("num_channels", 0, r"--num_channels 0: must be a positive"), ("dropout", 1.5, r"--dropout 1.5")],
)
def test_create_model_rejects_bad_values(flag, value, match):
    kwargs = {k: v for k, v in model_and_diffusion_defaults().items() if k in create_model.__code__.co_varnames}
    kwargs.update(image_size=32, num_channels=32, num_res_blocks=1)
    kwargs[flag] = value
    with pytest.raises(UserError, match=match):
        create_model(**kwargs)


def test_check_choice_lists_allowed_values():
    check_choice("schedule_sampler", "uniform", ["uniform", "loss-second-moment"])
    with pytest.raises(UserError, match=r"--schedule_sampler 'foo': expected one of 'uniform', 'loss-second-moment'"):
        check_choice("schedule_sampler", "foo", ["uniform", "loss-second-moment"])


def _parser():
    parser = FlagParser()
    add_dict_to_argparser(parser, dict(model_and_diffusion_defaults(), model_path=""))
    return parser


def test_flag_parser_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["--num_channels", "abc"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --num_channels: invalid int value: 'abc'")


def test_args_json_supplies_defaults_and_command_line_wins(tmp_path):
    saved = _parser().parse_args(["--num_channels", "64", "--learn_sigma", "True", "--image_size", "32"])
    path = save_args_json(saved, str(tmp_path))
    assert json.load(open(path))["num_channels"] == 64
    model_path = str(tmp_path / "model000010.pt")
    keys = model_and_diffusion_defaults().keys()
    args, taken = parse_args_with_saved(_parser(), keys, ["--model_path", model_path, "--image_size", "16"])
    assert (args.num_channels, args.learn_sigma, args.image_size) == (64, True, 16)
    assert taken["num_channels"] == 64
    assert args_to_dict(args, ["num_channels", "image_size"]) == {"num_channels": 64, "image_size": 16}


def test_no_args_json_leaves_defaults(tmp_path):
    args, taken = parse_args_with_saved(_parser(), ["num_channels"], ["--model_path", str(tmp_path / "m.pt")])
    assert taken == {} and args.num_channels == 128


def test_broken_args_json_is_a_user_error(tmp_path):
    (tmp_path / "args.json").write_text("{not json")
    with pytest.raises(UserError, match=r"could not read .*args.json"):
        parse_args_with_saved(_parser(), ["num_channels"], ["--model_path", str(tmp_path / "m.pt")])
