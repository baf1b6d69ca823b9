"""Tests for improved_diffusion.flags: the one flag table, the scripts' --help and the README's flag section."""

import dataclasses
import os

import pytest
from script_loader import load_script

from improved_diffusion import flags
from improved_diffusion.errors import UserError
from improved_diffusion.gaussian_diffusion import NOISE_SCHEDULES
from improved_diffusion.nn import SpeedSettings
from improved_diffusion.resample import SCHEDULE_SAMPLERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = flags.README_BEGIN, flags.README_END


def test_readme_flag_section_is_the_generated_one():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert BEGIN in readme and END in readme, "README.md lost its flag-section markers"
    section = readme[readme.index(BEGIN) + len(BEGIN) : readme.index(END)]
    assert section == flags.reference_markdown(), "README flags are stale: python -m improved_diffusion.flags README.md"


@pytest.mark.parametrize("script", flags.SCRIPTS)
def test_help_groups_every_flag_with_help_and_default(script):
    text = load_script(script).create_argparser().format_help()
    for group, group_flags in flags.flags_for(script):
        assert f"\n{group.title}:\n" in text
        for flag in group_flags:
            assert f"--{flag.name} " in text
            assert flag.help.split(" ")[0] in text
    defaults = [f.help_line() for _, fl in flags.flags_for(script) for f in fl]
    assert all("[default: " in line for line in defaults)


POSITIONALS = {"image_evaluate": ["ref.npz", "samples.npz"]}  # the scripts' required positional arguments


@pytest.mark.parametrize("script", flags.SCRIPTS)
def test_parsed_defaults_are_the_table_defaults(script):
    args = load_script(script).create_argparser().parse_args(POSITIONALS.get(script, []))
    for _, group_flags in flags.flags_for(script):
        for flag in group_flags:
            assert getattr(args, flag.name) == flag.default, flag.name


def test_only_the_network_scripts_take_presets(capsys):
    evaluate = load_script("image_evaluate").create_argparser()
    assert "--preset" not in evaluate.format_help()
    assert evaluate.format_usage().endswith(" REF SAMPLES [--FLAG VALUE ...]\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args([*POSITIONALS["image_evaluate"], "--preset", "adm-imagenet64"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --preset adm-imagenet64" in capsys.readouterr().err
    assert all("--preset NAME" in load_script(s).create_argparser().format_usage() for s in flags.NETWORK_SCRIPTS)


def test_each_flag_appears_once_per_script():
    for script in flags.SCRIPTS:
        names = [f.name for _, fl in flags.flags_for(script) for f in fl]
        assert len(names) == len(set(names)), script


def test_closed_choices_are_the_library_ones():
    by_name = {f.name: f for g in flags.GROUPS for f in g.flags}
    assert by_name["noise_schedule"].choices == tuple(NOISE_SCHEDULES)
    assert by_name["schedule_sampler"].choices == tuple(SCHEDULE_SAMPLERS)
    assert flags.speed_defaults() == dataclasses.asdict(SpeedSettings())


def test_help_line_shows_choices_and_default():
    flag = flags.Flag("noise_schedule", "linear", "beta schedule", choices=("linear", "cosine"))
    assert flag.help_line() == "beta schedule (one of: linear, cosine) [default: linear]"
    assert flags.Flag("x", "", "a path").help_line() == 'a path [default: ""]'


def test_unknown_script_is_named():
    with pytest.raises(KeyError, match="unknown script 'image_train.py'"):
        flags.flags_for("image_train.py")


def test_update_readme_rewrites_only_the_section(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"# title\n\n{BEGIN}old\n{END}\n\nrest\n", encoding="utf-8")
    flags.update_readme(str(path))
    assert path.read_text(encoding="utf-8") == f"# title\n\n{BEGIN}{flags.reference_markdown()}{END}\n\nrest\n"
    path.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(UserError, match="has no <!-- flags:begin --> ... <!-- flags:end --> markers"):
        flags.update_readme(str(path))


@pytest.mark.parametrize("script", ["image_sample", "image_train", "super_res_sample", "image_nll"])
def test_every_script_takes_a_preset_and_given_flags_win(script):
    parser = load_script(script).create_argparser()
    assert "--preset NAME" in parser.format_help()
    name = "adm-upsample64-256" if script.startswith("super_res") else "adm-imagenet64"
    args = parser.parse_args(["--preset", name, "--num_res_blocks", "5"])
    assert (args.resblock_updown, args.rescale_timesteps, args.learn_sigma) == (True, False, True)
    assert (
        (args.large_size, args.num_heads) == (256, 4)
        if script.startswith("super_res")
        else args.num_head_channels == 64
    )
    assert args.num_res_blocks == 5  # given on the command line: wins over the preset
    with pytest.raises(UserError, match="adm-imagenet63"):
        parser.parse_args(["--preset", "adm-imagenet63"])
