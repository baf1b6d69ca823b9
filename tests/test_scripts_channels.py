"""
--image_channels end to end: grey (1 channel) and RGB (3 channels) models through training,
sampling (.npz NHWC with C channels, grey PNG grid), likelihood and checkpoint hints.
"""

import numpy as np
import pytest
from PIL import Image
from script_loader import load_script

from improved_diffusion import logger
from improved_diffusion.checkpoints import load_model_state
from improved_diffusion.errors import UserError
from improved_diffusion.image_datasets import load_data
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--image_size", 8, "--channel_mult", "1,2", "--num_channels", 32, "--num_res_blocks", 1,
    "--attention_resolutions", "4", "--diffusion_steps", 30, "--noise_schedule", "cosine", "--learn_sigma", True,
]  # fmt: skip


def _colour_folder(folder, n=4):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i % 2}_{i}.png")
    return folder


def _run(script, argv, log_dir):
    with logger.scoped_configure(dir=str(log_dir)):
        load_script(script).main([str(a) for a in argv] + ["--log_dir", str(log_dir)])


def test_colour_images_become_grey_for_a_one_channel_model(tmp_path):
    data = _colour_folder(tmp_path / "data")
    grey, _ = next(load_data(data_dir=str(data), batch_size=4, image_size=8, deterministic=True, image_channels=1))
    rgb, _ = next(load_data(data_dir=str(data), batch_size=4, image_size=8, deterministic=True, image_channels=3))
    assert grey.shape == (4, 1, 8, 8) and rgb.shape == (4, 3, 8, 8)
    pixels = np.round((rgb.numpy() + 1) * 127.5)  # PIL's luma L = (299 R + 587 G + 114 B) / 1000
    luma = (299 * pixels[:, 0] + 587 * pixels[:, 1] + 114 * pixels[:, 2]) / 1000
    np.testing.assert_allclose((grey[:, 0].numpy() + 1) * 127.5, luma, rtol=0, atol=0.51)


@pytest.mark.parametrize("channels", [1, 3])
def test_train_sample_and_nll_with_image_channels(tmp_path, channels):
    data = _colour_folder(tmp_path / "data")
    flags = TINY + ["--image_channels", channels, "--class_cond", True]
    _run("image_train.py", ["--data_dir", data, "--batch_size", 2, "--max_steps", 2, *flags], tmp_path / "run")
    model_path = tmp_path / "run" / "ema_0.9999_000002.pt"
    sample_argv = ["--model_path", model_path, "--num_samples", 3, "--batch_size", 3, "--use_ddim", True]
    _run("image_sample.py", [*sample_argv, "--timestep_respacing", "ddim3"], tmp_path / "samples")
    archive = np.load(tmp_path / "samples" / f"samples_3x8x8x{channels}.npz")
    assert archive["arr_0"].shape == (3, 8, 8, channels) and archive["arr_0"].dtype == np.uint8
    grid = Image.open(tmp_path / "samples" / f"samples_3x8x8x{channels}.png")
    assert grid.mode == ("L" if channels == 1 else "RGB")
    nll_argv = ["--model_path", model_path, "--data_dir", data, "--num_samples", 2, "--batch_size", 2]
    _run("image_nll.py", [*nll_argv, "--timestep_respacing", "ddim3"], tmp_path / "nll")
    assert (tmp_path / "nll" / "nll_summary.json").exists()


def test_a_checkpoint_of_other_channels_names_the_flag():
    flags = dict(model_and_diffusion_defaults(), image_size=8, channel_mult="1,2", num_channels=32, num_res_blocks=1)
    flags.update(attention_resolutions="4", learn_sigma=True)
    grey, _ = create_model_and_diffusion(**dict(flags, image_channels=1))
    rgb, _ = create_model_and_diffusion(**flags)
    with pytest.raises(
        UserError, match=r"the checkpoint looks like .*--image_channels 1 \(you passed .*--image_channels 3"
    ):
        load_model_state(rgb, grey.state_dict(), "grey.pt", flags=dict(flags, image_channels=3))


def test_unsupported_channel_count_names_the_flag():
    flags = dict(model_and_diffusion_defaults(), image_size=8, channel_mult="1,2", image_channels=5)
    with pytest.raises(UserError, match=r"--image_channels 5: expected 1 \(grey\)"):
        create_model_and_diffusion(**flags)
