"""Presets of the released checkpoints: flags, command-line expansion, parameter counts, error hints."""

import os
import re
import runpy

import pytest
import torch

from improved_diffusion import presets, script_util
from improved_diffusion.checkpoints import load_model_state
from improved_diffusion.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Counts the originals' own factories build on the meta device (SPEC.md / SPEC_GUIDED.md); the
# four marked "ours" are not in the spec and were measured with this implementation.
SPEC_PARAMS = {
    "iddpm-imagenet64-uncond": 121_063_942,
    "iddpm-imagenet64-uncond-vlb": 121_063_942,
    "iddpm-cifar10-uncond": 52_546_438,
    "iddpm-cifar10-uncond-vlb": 52_546_438,
    "iddpm-imagenet64-cond": 273_049_350,
    "iddpm-upsample64-256-cond": 279_792_390,
    "iddpm-lsun-uncond-bs128": 113_676_678,
    "iddpm-lsun-uncond-bs64": 113_676_678,
    "adm-imagenet64": 295_904_454,
    "adm-imagenet128": 421_529_606,
    "adm-imagenet256": 553_838_086,
    "adm-imagenet256-uncond": 552_814_086,
    "adm-imagenet512": 558_997_638,
    "adm-upsample64-256": 311_795_910,  # ours
    "adm-upsample128-512": 308_835_270,  # ours
    "adm-lsun-bedroom": 552_814_086,  # as 256x256 unconditional
    "adm-lsun-cat": 552_814_086,
    "adm-lsun-horse": 552_814_086,
    "adm-classifier64": 65_438_568,
    "adm-classifier128": 42_568_040,
    "adm-classifier256": 54_096_360,
    "adm-classifier512": 54_448_360,  # ours
}


def _meta_model(name: str):
    with torch.device("meta"):
        return script_util.create_preset_model(name)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _docs_counts() -> dict:
    """Preset name -> parameter count, from the table in docs/checkpoints.md."""
    text = open(os.path.join(REPO, "docs", "checkpoints.md"), encoding="utf-8").read()
    return {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"\| `([a-z0-9-]+)` \|[^|\n]*\| ([\d,]+) \|", text)}


def test_every_released_checkpoint_has_a_preset_and_a_documented_count():
    assert set(SPEC_PARAMS) == set(presets.PRESETS)
    assert _docs_counts() == SPEC_PARAMS


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_preset_builds_its_model_on_meta_with_the_documented_count(name):
    model = _meta_model(name)
    assert next(model.parameters()).device.type == "meta"
    assert _count(model) == SPEC_PARAMS[name]


def test_guided_presets_use_guided_diffusion_defaults():
    adm = presets.preset_flags("adm-imagenet64")
    assert adm["rescale_timesteps"] is False and adm["rescale_learned_sigmas"] is False
    assert (adm["num_head_channels"], adm["use_new_attention_order"], adm["resblock_updown"]) == (64, True, True)
    assert (adm["classifier_depth"], adm["classifier_scale"], adm["attention_resolutions"]) == (4, 1.0, "32,16,8")
    cifar = presets.preset_flags("iddpm-cifar10-uncond")
    assert cifar["rescale_timesteps"] is True and cifar["dropout"] == 0.3 and "classifier_scale" not in cifar
    assert presets.preset_flags("adm-classifier64")["classifier_depth"] == 4


def test_apply_preset_to_a_flag_dict_given_flags_win():
    flags = dict(script_util.model_and_diffusion_defaults(), batch_size=4)
    out = presets.apply_preset(flags, "adm-imagenet256", given={"num_res_blocks"})
    assert (out["num_channels"], out["image_size"], out["num_res_blocks"], out["batch_size"]) == (256, 256, 2, 4)
    out = presets.apply_preset(dict(flags, num_res_blocks=5), "adm-imagenet256", given={"num_res_blocks"})
    assert out["num_res_blocks"] == 5 and "classifier_scale" not in out  # only keys the dict has


def _image_sample_parser():
    return runpy.run_path(os.path.join(REPO, "scripts", "image_sample.py"), run_name="not_main")["create_argparser"]()


def test_preset_argv_through_a_scripts_parser_command_line_wins():
    parser = _image_sample_parser()
    known = [a.dest for a in parser._actions]
    for form in (["--preset", "adm-imagenet64"], ["--preset=adm-imagenet64"]):
        argv = presets.apply_preset_argv(["--num_samples", "8", *form, "--dropout", "0.0"], known)
        args = parser.parse_args(argv)
        assert (args.num_channels, args.num_head_channels, args.use_new_attention_order) == (192, 64, True)
        assert (args.rescale_timesteps, args.dropout, args.num_samples) == (False, 0.0, 8)
    assert not any(a.startswith("--classifier") for a in argv)  # image_sample has no classifier flags
    assert presets.apply_preset_argv(["--num_samples", "8"], known) == ["--num_samples", "8"]


def test_preset_list_prints_every_preset_and_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        presets.apply_preset_argv(["--preset", "list"], [])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(presets.PRESETS)
    assert "64x64_diffusion.pt" in lines[list(presets.PRESETS).index("adm-imagenet64")]


def test_unknown_or_missing_preset_is_a_one_line_error():
    with pytest.raises(
        UserError, match=r"^--preset 'adm-imagenet63': unknown preset \(known: iddpm-imagenet64-uncond, "
    ):
        presets.apply_preset_argv(["--preset", "adm-imagenet63"], [])
    with pytest.raises(UserError, match=r"^--preset needs a name"):
        presets.apply_preset_argv(["--preset"], [])


def test_mismatch_error_names_the_matching_preset():
    released = _meta_model("adm-imagenet64").state_dict()
    flags = script_util.model_and_diffusion_defaults()
    with torch.device("meta"):
        model = script_util.create_model_and_diffusion(**flags)[0]
    with pytest.raises(UserError) as info:
        load_model_state(model, released, "64x64_diffusion.pt", flags=flags)
    message = str(info.value)
    assert "\n" not in message
    assert "the checkpoint looks like --num_channels 192 --num_res_blocks 3 --learn_sigma True" in message
    assert "--resblock_updown True" in message
    assert "its shapes are those of --preset adm-imagenet64 (64x64_diffusion.pt)" in message
    assert "--use_new_attention_order and --rescale_timesteps (they change the outputs, not the shapes)" in message


def test_flags_guessed_from_released_shapes_include_adm_options():
    from improved_diffusion.checkpoints import guess_flags_from_state_dict

    guess = guess_flags_from_state_dict(_meta_model("adm-imagenet512").state_dict())
    assert (guess["num_channels"], guess["channel_mult"], guess["image_size"]) == (256, "0.5,1,1,2,2,4,4", 512)
    assert (guess["resblock_updown"], guess["num_res_blocks"], guess["attention_resolutions"]) == (True, 2, "32,16,8")
    guess = guess_flags_from_state_dict(_meta_model("iddpm-cifar10-uncond").state_dict())
    assert (guess["resblock_updown"], guess["num_res_blocks"], guess["image_size"]) == (False, 3, 32)
    # The 128 -> 512 upsampler has the 256 multipliers: no size is guessed for it.
    guess = guess_flags_from_state_dict(_meta_model("adm-upsample128-512").state_dict())
    assert guess["channel_mult"] == "1,1,2,2,4,4" and "large_size" not in guess
