"""
End-to-end tests of scripts/classifier_train.py and scripts/classifier_sample.py with tiny networks,
their ``main(argv)`` called in this process.

The acceptance test of guidance trains, on a two-colour image set (red and blue 16x16 images,
classes from the file names), a tiny unconditional diffusion model and a tiny noised classifier,
then samples: with ``--classifier_scale 0`` both colours appear, with a large scale at least 90 %
of the samples have the requested colour (judged by the mean of the red vs the blue channel), in
ancestral and DDIM sampling.
"""

import csv
import glob
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from script_loader import load_script, run_script

from improved_diffusion import fileio, presets, script_util

EXACT = dict(rtol=0, atol=0)
COLOURS = {"blue": (40, 40, 220), "red": (220, 40, 40)}  # sorted names: blue = class 0, red = class 1
DIFFUSION = ["--image_size", "16", "--diffusion_steps", "50", "--noise_schedule", "cosine", "--winograd", "False"]
CLASSIFIER = [
    "--classifier_width", "32", "--classifier_depth", "1", "--classifier_attention_resolutions", "",
    "--classifier_pool", "spatial",
]  # fmt: skip
UNET = [
    "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "",
    "--num_heads", "1",
]  # fmt: skip
MIN_GUIDED_RATE = 0.9

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(name) for name in ("classifier_train", "classifier_sample", "image_train")}


def _write_colours(root, n: int, seed: int = 0) -> str:
    """``n`` 16x16 images, alternately blue and red with pixel noise, as ``{colour}_{i}.png``."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = sorted(COLOURS)
    for i in range(n):
        name = names[i % 2]
        pixels = np.array(COLOURS[name], dtype=np.float64) + rng.normal(0, 20, (16, 16, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(root, f"{name}_{i}.png"))
    return str(root)


def _is_red(images: np.ndarray) -> np.ndarray:
    """The pixel rule: (N, H, W, 3) uint8 -> (N,) bool, red channel brighter than blue on average."""
    pixels = images.astype(np.float64)
    return pixels[..., 0].mean(axis=(1, 2)) > pixels[..., 2].mean(axis=(1, 2))


@pytest.fixture
def colours(tmp_path):
    return _write_colours(tmp_path / "colours", 8)


def _train_classifier(module, data_dir, log_dir, *extra, capsys=None):
    argv = ["--data_dir", data_dir, "--log_dir", log_dir, *DIFFUSION, *CLASSIFIER, "--batch_size", "4"]
    return run_script(module, [*argv, "--log_interval", "1", "--save_interval", "2", *extra], capsys)


def test_classifier_train_checkpoints_load_into_create_classifier(isolated, scripts, colours, tmp_path):
    log_dir = str(tmp_path / "clf")
    val = _write_colours(tmp_path / "val", 4, seed=1)
    extra = ["--max_steps", "3", "--val_data_dir", val, "--eval_interval", "1", "--ema_rate", "0.9"]
    assert _train_classifier(scripts["classifier_train"], colours, log_dir, *extra)[0] == 0
    names = set(os.listdir(log_dir))
    assert {"model000003.pt", "opt000003.pt", "state000003.pt", "ema_0.9_000003.pt", "args.json"} <= names
    saved = json.load(open(os.path.join(log_dir, "args.json")))
    assert saved["classifier_pool"] == "spatial" and saved["random_crop"] is True and saved["noised"] is True
    classifier = script_util.create_classifier(**{k: saved[k] for k in script_util.classifier_defaults()})
    for name in ("model000003.pt", "ema_0.9_000003.pt"):
        classifier.load_state_dict(fileio.safe_torch_load(os.path.join(log_dir, name)), strict=True)
    log = open(os.path.join(log_dir, "log.txt")).read()
    for key in ("train_loss", "train_acc@1", "train_acc@5", "val_loss", "val_acc@1_q"):
        assert f"| {key}" in log, key


def test_classifier_train_resumes_exactly(isolated, scripts, colours, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    flags = ["--microbatch", "2", "--ema_rate", "0.9", "--anneal_lr", "True", "--iterations", "6"]
    module = scripts["classifier_train"]
    assert _train_classifier(module, colours, straight, "--max_steps", "5", *flags)[0] == 0
    assert _train_classifier(module, colours, split, "--max_steps", "3", *flags)[0] == 0
    assert _train_classifier(module, colours, split, "--max_steps", "5", "--resume_checkpoint", "auto", *flags)[0] == 0
    for name in ("model000005.pt", "ema_0.9_000005.pt", "opt000005.pt"):
        a = fileio.safe_torch_load(os.path.join(straight, name))
        b = fileio.safe_torch_load(os.path.join(split, name))
        torch.testing.assert_close(b, a, **EXACT, msg=lambda m, name=name: f"{name}: {m}")


def test_classifier_train_resumes_its_validation_batches_exactly(isolated, scripts, colours, tmp_path):
    """With --val_data_dir the resumed run validates on the batches the straight run does (same val_ rows)."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    val = _write_colours(tmp_path / "val", 6, seed=1)
    flags = ["--val_data_dir", val, "--eval_interval", "1", "--iterations", "6"]
    module = scripts["classifier_train"]
    assert _train_classifier(module, colours, straight, "--max_steps", "5", *flags)[0] == 0
    assert _train_classifier(module, colours, split, "--max_steps", "3", *flags)[0] == 0
    assert _train_classifier(module, colours, split, "--max_steps", "5", "--resume_checkpoint", "auto", *flags)[0] == 0

    def val_rows(folder):
        with open(os.path.join(folder, "progress.csv")) as f:
            rows = list(csv.DictReader(f))
        return [(row["step"], row["val_loss"]) for row in rows if row.get("val_loss")][-2:]

    rows = val_rows(straight)
    assert [step for step, _ in rows] == ["4", "5"] and val_rows(split) == rows


def test_classifier_train_stops_at_iterations(isolated, scripts, colours, tmp_path):
    log_dir = str(tmp_path / "clf")
    assert _train_classifier(scripts["classifier_train"], colours, log_dir, "--iterations", "2")[0] == 0
    assert sorted(n for n in os.listdir(log_dir) if n.startswith("model")) == ["model000002.pt"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--classifier_pool", "max"], r"error: --classifier_pool 'max': expected one of 'adaptive', 'attention'"),
        (["--iterations", "0"], r"error: --iterations 0: must be a positive integer"),
        (["--eval_interval", "0"], r"error: --eval_interval 0"),
        (["--val_data_dir", "/nonexistent/v"], r"error: --val_data_dir /nonexistent/v: no such folder"),
        (["--lr", "0"], r"error: --lr 0"),
    ],
)
def test_classifier_train_bad_flags_exit_2_with_one_line(isolated, scripts, colours, tmp_path, capsys, argv, message):
    log_dir = tmp_path / "clf"
    code, err = _train_classifier(scripts["classifier_train"], colours, str(log_dir), *argv, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and re.match(message, err), err
    assert not log_dir.exists()  # checked before any work


@pytest.fixture
def tiny_pair(isolated, scripts, colours, tmp_path):
    """(model path, classifier path) after two steps each: enough for the flag and error tests."""
    model_dir, clf_dir = str(tmp_path / "model"), str(tmp_path / "clf")
    argv = ["--data_dir", colours, "--log_dir", model_dir, *DIFFUSION, *UNET, "--max_steps", "1", "--batch_size", "2"]
    assert run_script(scripts["image_train"], argv)[0] == 0
    assert _train_classifier(scripts["classifier_train"], colours, clf_dir, "--max_steps", "1")[0] == 0
    return os.path.join(model_dir, "model000001.pt"), os.path.join(clf_dir, "model000001.pt")


def _sample(module, model_path, classifier_path, log_dir, *extra, capsys=None):
    argv = ["--model_path", model_path, "--classifier_path", classifier_path, "--log_dir", log_dir]
    return run_script(module, [*argv, "--winograd", "False", "--num_grid", "4", *extra], capsys)


def test_classifier_sample_reads_both_args_json_and_saves_labels(tiny_pair, scripts, tmp_path):
    out = str(tmp_path / "out")
    code, _ = _sample(scripts["classifier_sample"], *tiny_pair, out, "--num_samples", "3", "--class_labels", "1,0")
    assert code == 0
    archive = np.load(os.path.join(out, "samples_3x16x16x3.npz"))
    assert archive["arr_0"].shape == (3, 16, 16, 3) and archive["arr_1"].tolist() == [1, 0, 1]
    assert glob.glob(os.path.join(out, "*.png"))
    log = open(os.path.join(out, "log.txt")).read()
    assert "--classifier_pool spatial" in log and "--channel_mult 1,2" in log


def test_classifier_sample_errors_are_one_line(tiny_pair, scripts, tmp_path, capsys):
    model_path, classifier_path = tiny_pair
    module, out = scripts["classifier_sample"], str(tmp_path / "out")
    cases = [
        (["--classifier_path", ""], r"error: --classifier_path is required"),
        (["--classifier_width", "64"], r"error: checkpoint .*model000001\.pt does not match .*--classifier_width 32"),
        (["--image_size", "32"], r"error: --image_size 32: the classifier .* was trained with --image_size 16"),
        (["--class_labels", "0,x"], r"error: --class_labels '0,x'"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        code, err = _sample(module, model_path, classifier_path, out, "--num_samples", "1", *extra, capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and re.match(message, err), (extra, err)


def test_classifier_sample_takes_every_sampler(tiny_pair, scripts, tmp_path, capsys):
    """--sampler reaches the guided loop (NFE in the log); CFG on an unconditional model is a one-line error."""
    model_path, classifier_path = tiny_pair
    module = scripts["classifier_sample"]
    for sampler, nfe in (("dpm++2m", 5), ("heun", 9)):
        out = str(tmp_path / sampler)
        extra = ["--num_samples", "2", "--sampler", sampler, "--timestep_respacing", "5"]
        assert _sample(module, model_path, classifier_path, out, *extra)[0] == 0
        assert f"sampler {sampler}: 5 steps, {nfe} network evaluations" in open(os.path.join(out, "log.txt")).read()
    capsys.readouterr()
    out = str(tmp_path / "cfg")
    code, err = _sample(module, model_path, classifier_path, out, "--guidance_scale", "2", capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and re.match(r"error: --guidance_scale 2.0: classifier-free", err), err


def _write_greys(root, n: int, names=("dark", "light")) -> str:
    """``n`` grey 16x16 images, alternately of each class in ``names`` (brightness 40 + 170 i / (k - 1))."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        level = 40 + 170 * (i % len(names)) / (len(names) - 1)
        pixels = np.clip(level + rng.normal(0, 20, (16, 16)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(os.path.join(root, f"{names[i % len(names)]}_{i}.png"))
    return str(root)


def test_a_grey_classifier_of_the_datas_classes_guides_a_grey_model(isolated, scripts, tmp_path, capsys):
    """
    ``--classifier_num_classes 2 --classifier_image_channels 1``: two logits on grey images, saved
    in args.json, read back by classifier_sample.py, whose random labels then come from those two
    classes only (with 1000 logits they would come from 0..999, classes the classifier never saw).
    """
    data = _write_greys(tmp_path / "greys", 8)
    model_dir, clf_dir = str(tmp_path / "model"), str(tmp_path / "clf")
    argv = ["--data_dir", data, "--log_dir", model_dir, *DIFFUSION, *UNET, "--max_steps", "1", "--batch_size", "2"]
    assert run_script(scripts["image_train"], [*argv, "--image_channels", "1"])[0] == 0
    grey = ["--classifier_num_classes", "2", "--classifier_image_channels", "1", "--max_steps", "1"]
    assert _train_classifier(scripts["classifier_train"], data, clf_dir, *grey)[0] == 0
    saved = json.load(open(os.path.join(clf_dir, "args.json")))
    assert (saved["classifier_num_classes"], saved["classifier_image_channels"]) == (2, 1)
    classifier = script_util.create_classifier(**{k: saved[k] for k in script_util.classifier_defaults()})
    classifier.load_state_dict(fileio.safe_torch_load(os.path.join(clf_dir, "model000001.pt")), strict=True)
    logits = classifier(torch.zeros(3, 1, 16, 16), torch.zeros(3, dtype=torch.long))
    assert logits.shape == (3, 2)

    model_path, clf_path = os.path.join(model_dir, "model000001.pt"), os.path.join(clf_dir, "model000001.pt")
    out = str(tmp_path / "out")
    assert _sample(scripts["classifier_sample"], model_path, clf_path, out, "--num_samples", "8")[0] == 0
    archive = np.load(os.path.join(out, "samples_8x16x16x1.npz"))
    assert set(archive["arr_1"].tolist()) <= {0, 1} and len(set(archive["arr_1"].tolist())) == 2

    capsys.readouterr()
    rgb_clf = str(tmp_path / "rgb_clf")
    assert _train_classifier(scripts["classifier_train"], data, rgb_clf, "--max_steps", "1")[0] == 0
    code, err = _sample(
        scripts["classifier_sample"], model_path, os.path.join(rgb_clf, "model000001.pt"), out, capsys=capsys
    )
    message = r"error: --image_channels 1: the classifier classifies images of --classifier_image_channels 3"
    assert code == 2 and err.count("\n") == 1 and re.match(message, err), err


def test_classifier_data_with_more_classes_or_other_validation_classes_is_an_error(isolated, scripts, tmp_path, capsys):
    data = _write_greys(tmp_path / "three", 6, names=("a", "b", "c"))
    log_dir = tmp_path / "clf"
    cases = [
        (
            ["--classifier_num_classes", "2"],
            r"error: --data_dir \S+three has 3 classes \(file-name prefixes\), more than --classifier_num_classes 2: "
            r"pass --classifier_num_classes 3$",
        ),
        (
            ["--val_data_dir", _write_greys(tmp_path / "two", 4, names=("a", "c"))],
            r"error: --val_data_dir \S+two: its classes differ from --data_dir \S+three's "
            r"\(missing \['b'\], extra \[\]\)",
        ),
        (["--classifier_image_channels", "5"], r"error: --classifier_image_channels 5: expected 1 \(grey\)"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        code, err = _train_classifier(scripts["classifier_train"], data, str(log_dir), *argv, capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and re.match(message, err), (argv, err)
        assert not log_dir.exists()


@pytest.mark.slow
def test_guidance_steers_samples_to_the_requested_class(isolated, scripts, tmp_path, capsys):
    """
    Unguided sampling gives both colours; guided sampling (scale 10) gives the requested one in at
    least 90 % of the samples, for ancestral and DDIM sampling. Measured (CPU, this seed):
    unguided 69 % (ancestral) / 56 % (DDIM) red, guided 100 % / 100 % of the requested colour.
    """
    data = _write_colours(tmp_path / "colours", 32)
    model_dir, clf_dir = str(tmp_path / "model"), str(tmp_path / "clf")
    train = [*DIFFUSION, "--batch_size", "8", "--log_interval", "50", "--save_interval", "0"]
    argv = ["--data_dir", data, "--log_dir", model_dir, *train, *UNET, "--lr", "1e-3", "--ema_rate", "0.99"]
    assert run_script(scripts["image_train"], [*argv, "--max_steps", "150"])[0] == 0
    argv = ["--data_dir", data, "--log_dir", clf_dir, *train, *CLASSIFIER, "--iterations", "100"]
    assert run_script(scripts["classifier_train"], argv)[0] == 0

    rates = {}
    for mode, respacing in (("ancestral", "25"), ("ddim", "ddim25")):
        for scale in ("0", "10"):
            out = str(tmp_path / f"{mode}_{scale}")
            extra = ["--classifier_scale", scale, "--use_ddim", str(mode == "ddim"), "--timestep_respacing", respacing]
            extra += ["--class_labels", "0,1", "--num_samples", "16", "--batch_size", "16"]
            model_path, clf_path = (
                os.path.join(model_dir, "ema_0.99_000150.pt"),
                os.path.join(clf_dir, "model000100.pt"),
            )
            assert _sample(scripts["classifier_sample"], model_path, clf_path, out, *extra)[0] == 0
            archive = np.load(glob.glob(os.path.join(out, "samples_*.npz"))[0])
            red, labels = _is_red(archive["arr_0"]), archive["arr_1"]
            rates[mode, scale] = (red.mean(), (red == (labels == 1)).mean())
    print("red fraction, requested-class rate:", rates)
    for mode in ("ancestral", "ddim"):
        red_fraction, _ = rates[mode, "0"]
        assert 0 < red_fraction < 1, (mode, rates)  # both classes without guidance
        assert rates[mode, "10"][1] >= MIN_GUIDED_RATE, (mode, rates)


@pytest.mark.parametrize("name", ["adm-imagenet64", "adm-imagenet256-uncond"])
def test_guided_presets_set_every_flag_of_classifier_sample(scripts, name):
    """``--preset`` expands to the model, classifier and scale flags, all known to the script; given flags win."""
    parser = scripts["classifier_sample"].create_argparser()
    known = list(vars(parser.parse_args([])))
    values = presets.preset_flags(name)
    assert set(values) <= set(known)
    args = parser.parse_args(presets.apply_preset_argv(["--preset", name, "--classifier_scale", "2.5"], known))
    assert args.classifier_scale == 2.5 and args.classifier_depth == values["classifier_depth"]
    assert args.num_channels == values["num_channels"] and args.class_cond == values["class_cond"]
