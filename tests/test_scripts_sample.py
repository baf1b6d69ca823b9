"""
End-to-end tests of the sampling and evaluation scripts (image_sample.py, super_res_sample.py,
image_nll.py) on tiny CPU models saved with their args.json. A few run the script as a
subprocess (exit codes, stderr); the rest call its ``main(argv)`` in-process.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from script_loader import load_script

from improved_diffusion import logger
from improved_diffusion.errors import UserError, run_main
from improved_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    save_args_json,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")

# Tolerances: float32 model outputs through a whole loop, and uint8 pixels (one grey level
# for batch-size dependent rounding of batched convolutions).
ATOL_FLOAT = 1e-5
ATOL_PIXEL = 1
ATOL_BF16_PIXEL = 12

TINY = dict(
    image_size=16,
    channel_mult="1,2",
    num_channels=32,
    num_res_blocks=1,
    attention_resolutions="8",
    num_heads=2,
    diffusion_steps=20,
    noise_schedule="cosine",
    learn_sigma=True,
)
TINY_SR = dict(TINY, large_size=16, small_size=8)
del TINY_SR["image_size"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_no_leftover_group():
    """
    One intra-op thread (tiny convolutions only lose from threads on a shared machine), and
    the process group the in-process scripts create is destroyed after this module.
    """
    import torch.distributed as dist

    from improved_diffusion import dist_util

    previous = torch.get_num_threads()
    had_group = dist.is_initialized()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    if not had_group and dist.is_initialized():
        dist_util.cleanup()


def _randomize(model: torch.nn.Module) -> None:
    """Perturb every weight (zero-initialised output layers included) so samples depend on them."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _save_checkpoint(folder, defaults, create_fn, **overrides) -> str:
    """Build a tiny model, save its state dict as model000000.pt and the flags as args.json."""
    flags = defaults()
    flags.update(overrides)
    torch.manual_seed(0)
    model, _ = create_fn(**flags)
    _randomize(model)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model000000.pt")
    torch.save(model.state_dict(), path)
    save_args_json(argparse.Namespace(**flags, lr=1e-4, batch_size=4), str(folder))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return _save_checkpoint(folder, model_and_diffusion_defaults, create_model_and_diffusion, **TINY)


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cond_ckpt")
    return _save_checkpoint(
        folder, model_and_diffusion_defaults, create_model_and_diffusion, **dict(TINY, class_cond=True)
    )


@pytest.fixture(scope="module")
def sr_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sr_ckpt")
    return _save_checkpoint(folder, sr_model_and_diffusion_defaults, sr_create_model_and_diffusion, **TINY_SR)


def _run_main(name, argv, log_dir):
    """Call ``scripts/<name>``'s main in-process with its log folder; restore the logger after."""
    main = load_script(name).main
    with logger.scoped_configure(dir=str(log_dir)):
        main([str(a) for a in argv] + ["--log_dir", str(log_dir)])


def _run_subprocess(name, argv, launcher=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        list(launcher) + [sys.executable, os.path.join(SCRIPTS, name)] + [str(a) for a in argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _load(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------------------
# image_sample.py


@pytest.mark.slow
def test_image_sample_subprocess_uses_args_json(ckpt, tmp_path):
    """No model flags on the command line: args.json beside the checkpoint supplies them."""
    out = tmp_path / "out"
    proc = _run_subprocess(
        "image_sample.py", ["--model_path", ckpt, "--num_samples", 3, "--batch_size", 2, "--log_dir", out]
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(os.listdir(out))
    assert "samples_3x16x16x3.npz" in files and "samples_3x16x16x3.png" in files
    arrays = _load(out / "samples_3x16x16x3.npz")
    assert list(arrays) == ["arr_0"]
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (3, 16, 16, 3)
    log = (out / "log.txt").read_text()
    assert "args.json" in log and "--num_channels 32" in log


def _exit_code_and_stderr(capsys, name, argv, log_dir):
    """Run the script's main through errors.run_main in-process: (exit code, stderr)."""
    main = load_script(name).main
    capsys.readouterr()
    with logger.scoped_configure(dir=str(log_dir)), pytest.raises(SystemExit) as info:
        run_main(lambda: main([str(a) for a in argv] + ["--log_dir", str(log_dir)]))
    return info.value.code, capsys.readouterr().err


def test_image_sample_missing_model_path_is_one_line(capsys, tmp_path):
    code, err = _exit_code_and_stderr(capsys, "image_sample.py", ["--num_samples", 1], tmp_path)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: --model_path is required")


def test_image_sample_wrong_flags_give_helpful_error(ckpt, capsys, tmp_path):
    code, err = _exit_code_and_stderr(
        capsys, "image_sample.py", ["--model_path", ckpt, "--num_channels", 64, "--num_samples", 1], tmp_path
    )
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and ckpt in line
    assert "input_blocks.0.0.weight" in line and "--num_channels" in line


def _sample(ckpt, log_dir, *extra):
    _run_main("image_sample.py", ["--model_path", ckpt, "--num_grid", 0] + list(extra), log_dir)
    (name,) = [f for f in os.listdir(log_dir) if f.endswith(".npz")]
    return _load(os.path.join(log_dir, name))


def test_ddim_eta0_is_deterministic_and_batch_size_independent(ckpt, tmp_path):
    flags = ["--use_ddim", True, "--timestep_respacing", "ddim5", "--num_samples", 3, "--seed", 7]
    a = _sample(ckpt, tmp_path / "a", *flags, "--batch_size", 3)["arr_0"]
    b = _sample(ckpt, tmp_path / "b", *flags, "--batch_size", 3)["arr_0"]
    c = _sample(ckpt, tmp_path / "c", *flags, "--batch_size", 1)["arr_0"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(c.astype(int), a.astype(int), rtol=0, atol=ATOL_PIXEL)
    assert len(np.unique(a.reshape(3, -1), axis=0)) == 3  # the samples differ from each other
    d = _sample(ckpt, tmp_path / "d", *flags[:-1], 8, "--batch_size", 3)["arr_0"]
    assert np.abs(d.astype(int) - a.astype(int)).max() > 10  # another seed, other samples


@pytest.mark.slow
@pytest.mark.mpi
def test_two_ranks_give_the_same_ddim_samples_as_one(ckpt, tmp_path):
    """Per-sample seeds and the ordered gather: the archive does not depend on the rank count."""
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    flags = ["--use_ddim", True, "--timestep_respacing", "ddim3", "--num_samples", 3, "--batch_size", 2]
    single = _sample(ckpt, tmp_path / "one", *flags)["arr_0"]
    out = tmp_path / "two"
    argv = ["--model_path", ckpt, "--log_dir", out, "--num_grid", 0] + flags
    proc = _run_subprocess("image_sample.py", argv, launcher=[mpiexec, "-n", "2"])
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(
        _load(out / "samples_3x16x16x3.npz")["arr_0"].astype(int), single.astype(int), rtol=0, atol=ATOL_PIXEL
    )


def test_speed_flags_select_the_plain_path_and_are_logged(ckpt, tmp_path):
    """--winograd/--sdpa/--native_kernels False: the original's computation; the samples agree within a grey level."""
    flags = ["--use_ddim", True, "--timestep_respacing", "ddim3", "--num_samples", 2]
    fast = _sample(ckpt, tmp_path / "fast", *flags)["arr_0"]
    plain_flags = ("--winograd", False, "--sdpa", False, "--native_kernels", False)
    plain = _sample(ckpt, tmp_path / "plain", *flags, *plain_flags)["arr_0"]
    np.testing.assert_allclose(plain.astype(int), fast.astype(int), rtol=0, atol=ATOL_PIXEL)
    lines = (
        ("fast", "sdpa=True, winograd=auto, native_kernels=True"),
        ("plain", "sdpa=False, winograd=False, native_kernels=False"),
    )
    for folder, line in lines:
        with open(tmp_path / folder / "log.txt") as f:
            assert f"speed settings: {line}\n" in f.read()


def test_ancestral_sampling_repeats_for_a_seed(ckpt, tmp_path):
    flags = ["--timestep_respacing", "4", "--num_samples", 2, "--batch_size", 2, "--seed", 3]
    a = _sample(ckpt, tmp_path / "a", *flags)["arr_0"]
    b = _sample(ckpt, tmp_path / "b", *flags)["arr_0"]
    np.testing.assert_array_equal(a, b)


def test_ddim_eta_positive_runs(ckpt, tmp_path):
    arrays = _sample(
        ckpt, tmp_path, "--use_ddim", True, "--eta", 0.5, "--timestep_respacing", "ddim4", "--num_samples", 2
    )
    assert arrays["arr_0"].shape == (2, 16, 16, 3)


def test_bf16_autocast_sampling_is_close_to_float32(ckpt, tmp_path):
    flags = ["--use_ddim", True, "--timestep_respacing", "ddim2", "--num_samples", 2]
    full = _sample(ckpt, tmp_path / "fp32", *flags)["arr_0"]
    half = _sample(ckpt, tmp_path / "bf16", *flags, "--use_bf16", True)["arr_0"]
    assert half.dtype == np.uint8 and half.shape == full.shape
    # bfloat16 keeps 8 bits of mantissa: a few grey levels, not a different image.
    np.testing.assert_allclose(half.astype(int), full.astype(int), rtol=0, atol=ATOL_BF16_PIXEL)


def test_class_conditional_samples_have_labels(cond_ckpt, tmp_path):
    flags = ["--timestep_respacing", "3", "--num_samples", 5, "--batch_size", 2]
    arrays = _sample(cond_ckpt, tmp_path / "given", *flags, "--class_labels", "5,7")
    assert sorted(arrays) == ["arr_0", "arr_1"]
    assert arrays["arr_0"].shape == (5, 16, 16, 3)
    assert arrays["arr_1"].dtype == np.int64
    np.testing.assert_array_equal(arrays["arr_1"], [5, 7, 5, 7, 5])
    rand = _sample(cond_ckpt, tmp_path / "random", *flags)["arr_1"]
    again = _sample(cond_ckpt, tmp_path / "again", *flags[:-1], 5)["arr_1"]
    assert rand.dtype == np.int64 and rand.shape == (5,)
    assert ((rand >= 0) & (rand < 1000)).all() and len(set(rand.tolist())) > 1
    np.testing.assert_array_equal(rand, again)  # per-sample labels: same for another batch size


def test_class_labels_grid_has_a_row_per_class(cond_ckpt, tmp_path):
    from PIL import Image

    _run_main(
        "image_sample.py",
        ["--model_path", cond_ckpt, "--timestep_respacing", "2", "--num_samples", 4, "--class_labels", "1,2"],
        tmp_path,
    )
    with Image.open(tmp_path / "samples_4x16x16x3.png") as im:
        assert im.size == (2 * 18 + 2, 2 * 18 + 2)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--class_labels", "1,x"], "--class_labels '1,x': expected a comma list"),
        (["--class_labels", "1000"], r"label 1000 is outside \[0, 1000\)"),
        (["--num_samples", "0"], "--num_samples 0"),
        (["--eta", "0.5"], "--use_ddim"),
    ],
)
def test_image_sample_rejects_bad_flags(cond_ckpt, tmp_path, extra, match):
    with pytest.raises(UserError, match=match):
        _run_main("image_sample.py", ["--model_path", cond_ckpt] + extra, tmp_path)


def test_class_labels_need_a_class_conditional_model(ckpt, tmp_path):
    with pytest.raises(UserError, match="--class_cond True"):
        _run_main("image_sample.py", ["--model_path", ckpt, "--class_labels", "1"], tmp_path)


# ------------------------------------------------------------------------------------------
# super_res_sample.py


def _base_samples(path, n=3, size=8, **arrays):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    np.savez(path, **(arrays or {"arr_0": images}))
    return images


def test_super_res_sample_upsamples_to_large_size(sr_ckpt, tmp_path):
    base = tmp_path / "base.npz"
    _base_samples(base)
    out = tmp_path / "out"
    _run_main(
        "super_res_sample.py",
        ["--model_path", sr_ckpt, "--base_samples", base, "--num_samples", 4, "--batch_size", 3]
        + ["--timestep_respacing", "3"],
        out,
    )
    arrays = _load(out / "samples_4x16x16x3.npz")
    assert list(arrays) == ["arr_0"]
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (4, 16, 16, 3)
    assert (out / "samples_4x16x16x3.png").exists()


def test_class_conditional_super_res_keeps_base_labels(tmp_path_factory, tmp_path):
    folder = tmp_path_factory.mktemp("sr_cond_ckpt")
    ckpt = _save_checkpoint(
        folder, sr_model_and_diffusion_defaults, sr_create_model_and_diffusion, **dict(TINY_SR, class_cond=True)
    )
    base = tmp_path / "base.npz"
    images = _base_samples(base, n=2)
    np.savez(base, images, np.array([4, 9]))
    _run_main(
        "super_res_sample.py",
        ["--model_path", ckpt, "--base_samples", base, "--num_samples", 3, "--timestep_respacing", 2],
        tmp_path / "out",
    )
    arrays = _load(tmp_path / "out" / "samples_3x16x16x3.npz")
    assert arrays["arr_0"].shape == (3, 16, 16, 3)
    assert arrays["arr_1"].dtype == np.int64
    np.testing.assert_array_equal(arrays["arr_1"], [4, 9, 4])  # base samples cycled


_GOOD = np.zeros((2, 8, 8, 3), np.uint8)


@pytest.mark.parametrize(
    "arrays, class_cond, match",
    [
        ({"arr_0": _GOOD.astype(np.float32)}, False, "arr_0 has dtype float32, expected uint8"),
        ({"arr_0": _GOOD.transpose(0, 3, 1, 2)}, False, r"arr_0 has shape \(2, 3, 8, 8\), expected \(N, 8, 8, 3\)"),
        ({"arr_0": np.zeros((2, 16, 16, 3), np.uint8)}, False, r"shape \(2, 16, 16, 3\)"),
        ({"images": _GOOD}, False, "no arr_0"),
        ({"arr_0": _GOOD}, True, r"no arr_1 \(class labels\)"),
        ({"arr_0": _GOOD, "arr_1": np.array([0, 1, 2])}, True, r"expected \(2,\) integers"),
        ({"arr_0": np.array([object()] * 2)}, False, "not a readable .npz"),
    ],
)
def test_bad_base_samples_name_file_and_problem(tmp_path, arrays, class_cond, match):
    path = str(tmp_path / "base.npz")
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=match) as info:
        load_script("super_res_sample.py").load_base_samples(path, 8, class_cond)
    assert path in str(info.value) and "\n" not in str(info.value)


def test_bad_base_samples_exit_code_and_one_line(sr_ckpt, capsys, tmp_path):
    path = tmp_path / "base.npz"
    path.write_text("not an archive")
    code, err = _exit_code_and_stderr(
        capsys, "super_res_sample.py", ["--model_path", sr_ckpt, "--base_samples", path], tmp_path / "o"
    )
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: --base_samples {path}: not a readable .npz archive")


# ------------------------------------------------------------------------------------------
# image_nll.py


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return str(folder)


def _nll(ckpt, image_dir, log_dir, *extra):
    argv = ["--model_path", ckpt, "--data_dir", image_dir, "--num_samples", 3, "--batch_size", 2]
    _run_main("image_nll.py", argv + list(extra), log_dir)
    terms = {name: _load(os.path.join(log_dir, f"{name}_terms.npz"))["arr_0"] for name in ("vb", "mse", "xstart_mse")}
    with open(os.path.join(log_dir, "nll_summary.json")) as f:
        return terms, json.load(f)


def test_image_nll_total_is_prior_plus_terms_and_matches_calc_bpd_loop(ckpt, image_dir, tmp_path):
    from improved_diffusion.image_datasets import load_data
    from improved_diffusion.sample_util import derive_seed

    terms, summary = _nll(ckpt, image_dir, tmp_path, "--timestep_respacing", "5")
    assert summary["count"] == 3
    for name in ("vb", "mse", "xstart_mse"):
        assert terms[name].shape == (5,)
    np.testing.assert_allclose(summary["total_bpd"], summary["prior_bpd"] + terms["vb"].sum(), rtol=1e-6)

    # The same numbers straight from calc_bpd_loop: batches of 2 then 1, the script's seed.
    flags = dict(model_and_diffusion_defaults(), **TINY, timestep_respacing="5")
    model, diffusion = create_model_and_diffusion(**flags)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    model.eval()
    data = load_data(data_dir=image_dir, batch_size=2, image_size=16, deterministic=True)
    torch.manual_seed(derive_seed(0, 0))
    metrics = []
    for take in (2, 1):
        batch, _ = next(data)
        with torch.no_grad():
            metrics.append(diffusion.calc_bpd_loop(model, batch[:take], clip_denoised=True))
    expected = {k: torch.cat([m[k] for m in metrics]).double().mean(dim=0).numpy() for k in metrics[0]}
    np.testing.assert_allclose(summary["total_bpd"], expected["total_bpd"], rtol=0, atol=ATOL_FLOAT)
    np.testing.assert_allclose(summary["prior_bpd"], expected["prior_bpd"], rtol=0, atol=ATOL_FLOAT)
    for name in ("vb", "mse", "xstart_mse"):
        np.testing.assert_allclose(terms[name], expected[name], rtol=0, atol=ATOL_FLOAT)


def test_image_nll_timestep_batch_matches_unbatched(ckpt, image_dir, tmp_path):
    flags = ["--timestep_respacing", "7", "--num_samples", 2]
    plain, plain_summary = _nll(ckpt, image_dir, tmp_path / "k1", *flags)
    batched, batched_summary = _nll(ckpt, image_dir, tmp_path / "k3", *flags, "--timestep_batch", 3)
    for name in plain:
        assert plain[name].shape == (7,)
        np.testing.assert_allclose(batched[name], plain[name], rtol=0, atol=ATOL_FLOAT)
    for key in ("total_bpd", "prior_bpd"):
        np.testing.assert_allclose(batched_summary[key], plain_summary[key], rtol=0, atol=ATOL_FLOAT)


@pytest.mark.slow
@pytest.mark.mpi
def test_image_nll_on_two_ranks_counts_every_image_once(ckpt, image_dir, tmp_path):
    """3 images in batches of 1 on 2 ranks: the second round leaves rank 1 idle."""
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    out = tmp_path / "out"
    argv = ["--model_path", ckpt, "--data_dir", image_dir, "--num_samples", 3, "--batch_size", 1]
    argv += ["--timestep_respacing", 3, "--log_dir", out]
    proc = _run_subprocess("image_nll.py", argv, launcher=[mpiexec, "-n", "2"])
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "nll_summary.json").read_text())
    vb = _load(out / "vb_terms.npz")["arr_0"]
    assert summary["count"] == 3 and vb.shape == (3,)
    np.testing.assert_allclose(summary["total_bpd"], summary["prior_bpd"] + vb.sum(), rtol=1e-6)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--data_dir", "x"], "--model_path is required"),
        (["--model_path", "m.pt"], "--data_dir is required"),
        (["--model_path", "m.pt", "--data_dir", "x", "--timestep_batch", "0"], "--timestep_batch 0"),
    ],
)
def test_image_nll_rejects_bad_flags(tmp_path, argv, match):
    with pytest.raises(UserError, match=match):
        _run_main("image_nll.py", argv, tmp_path)


# ------------------------------------------------------------------------------------------
# sample_util seeds


def test_sample_generators_are_per_index_and_per_script():
    from improved_diffusion.sample_util import IMAGE_SAMPLE_SCRIPT, SUPER_RES_SCRIPT, sample_generators

    def first_draws(seed, indices, script=IMAGE_SAMPLE_SCRIPT):
        return torch.stack([torch.randn(4, generator=g) for g in sample_generators(seed, indices, script)])

    both = first_draws(0, [0, 1])
    torch.testing.assert_close(first_draws(0, [1]), both[1:], rtol=0, atol=0)  # index, not position
    assert not torch.equal(both[0], both[1])
    assert not torch.equal(first_draws(1, [0])[0], both[0])  # another seed
    assert not torch.equal(first_draws(0, [0], SUPER_RES_SCRIPT)[0], both[0])  # another script


# ------------------------------------------------------------------------------------------
# samplers and classifier-free guidance


@pytest.fixture(scope="module")
def cfg_ckpt(tmp_path_factory):
    """A class-conditional checkpoint trained with label dropout: 10 classes and the null row."""
    folder = tmp_path_factory.mktemp("cfg_ckpt")
    flags = dict(TINY, class_cond=True, num_classes=10, class_dropout_prob=0.1)
    return _save_checkpoint(folder, model_and_diffusion_defaults, create_model_and_diffusion, **flags)


@pytest.mark.parametrize(
    "sampler, respacing, nfe", [("dpm++2m", "5", 5), ("dpm++2m-sde", "4", 4), ("heun", "5", 9), ("ancestral", "3", 3)]
)
def test_samplers_log_and_save_their_network_evaluations(ckpt, tmp_path, sampler, respacing, nfe):
    arrays = _sample(ckpt, tmp_path, "--sampler", sampler, "--timestep_respacing", respacing, "--num_samples", 2)
    assert arrays["arr_0"].shape == (2, 16, 16, 3)
    saved = json.loads((tmp_path / "args.json").read_text())
    assert (saved["sampler"], saved["nfe"], saved["timestep_respacing"]) == (sampler, nfe, respacing)
    log = (tmp_path / "log.txt").read_text()
    assert f"sampler {sampler}: {respacing} steps, {nfe} network evaluations per sample (NFE)" in log


def test_the_sde_solver_repeats_for_the_same_seed_and_batch_size(ckpt, tmp_path):
    flags = ["--sampler", "dpm++2m-sde", "--timestep_respacing", "3", "--num_samples", 3, "--batch_size", 2]
    first = _sample(ckpt, tmp_path / "a", *flags)["arr_0"]
    np.testing.assert_array_equal(_sample(ckpt, tmp_path / "b", *flags)["arr_0"], first)
    other = _sample(ckpt, tmp_path / "c", *flags, "--seed", 1)["arr_0"]
    assert np.abs(other.astype(int) - first.astype(int)).max() > 10


def test_use_ddim_is_a_synonym_of_sampler_ddim(ckpt, tmp_path):
    flags = ["--timestep_respacing", "ddim4", "--num_samples", 2]
    old = _sample(ckpt, tmp_path / "old", "--use_ddim", True, *flags)["arr_0"]
    new = _sample(ckpt, tmp_path / "new", "--sampler", "ddim", *flags)["arr_0"]
    np.testing.assert_array_equal(old, new)
    assert json.loads((tmp_path / "old" / "args.json").read_text())["sampler"] == "ddim"


def test_samples_in_the_checkpoint_folder_keep_its_args_json(ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(os.path.dirname(ckpt), folder)
    training = (folder / "args.json").read_text()
    _sample(str(folder / "model000000.pt"), folder, "--timestep_respacing", "2", "--num_samples", 1)
    assert (folder / "args.json").read_text() == training
    assert json.loads((folder / "sample_args.json").read_text())["nfe"] == 2


def test_guided_sampling_with_every_ode_solver(cfg_ckpt, tmp_path):
    for sampler in ("dpm++2m", "dpm++2m-sde", "heun"):
        flags = ["--sampler", sampler, "--timestep_respacing", "3", "--guidance_scale", 2.5, "--num_samples", 3]
        arrays = _sample(cfg_ckpt, tmp_path / sampler, *flags, "--class_labels", "9,0")
        np.testing.assert_array_equal(arrays["arr_1"], [9, 0, 9])
        saved = json.loads((tmp_path / sampler / "args.json").read_text())
        assert (saved["guidance_scale"], saved["class_dropout_prob"], saved["num_classes"]) == (2.5, 0.1, 10)
        assert "classifier-free guidance" in (tmp_path / sampler / "log.txt").read_text()
    rand = _sample(cfg_ckpt, tmp_path / "random", "--timestep_respacing", "2", "--num_samples", 6)["arr_1"]
    assert ((rand >= 0) & (rand < 10)).all()  # random labels drawn from --num_classes


def test_super_res_sample_with_heun(sr_ckpt, tmp_path):
    base = tmp_path / "base.npz"
    _base_samples(base)
    argv = ["--model_path", sr_ckpt, "--base_samples", base, "--num_samples", 2, "--sampler", "heun"]
    _run_main("super_res_sample.py", argv + ["--timestep_respacing", "3"], tmp_path / "out")
    assert _load(tmp_path / "out" / "samples_2x16x16x3.npz")["arr_0"].shape == (2, 16, 16, 3)
    assert json.loads((tmp_path / "out" / "args.json").read_text())["nfe"] == 5


@pytest.mark.parametrize(
    "which, extra, message",
    [
        (
            "ckpt",
            ["--sampler", "euler"],
            r"--sampler 'euler': expected one of ancestral, ddim, dpm\+\+2m, dpm\+\+2m-sde, heun$",
        ),
        ("ckpt", ["--sampler", "heun", "--timestep_respacing", "1"], r"--sampler heun needs at least 2 steps"),
        ("ckpt", ["--timestep_respacing", "-5"], r"--timestep_respacing '-5': counts must be positive integers"),
        ("ckpt", ["--timestep_respacing", "ddim-5"], r"--timestep_respacing 'ddim-5': no integer stride"),
        ("ckpt", ["--use_ddim", True, "--sampler", "heun"], r"--use_ddim True contradicts --sampler heun"),
        ("ckpt", ["--sampler", "dpm++2m", "--eta", 0.5], r"--eta 0.5 only applies to DDIM sampling"),
        ("ckpt", ["--guidance_scale", 3], r"--guidance_scale 3.0: .* this one is unconditional \(--class_cond False\)"),
        ("cond_ckpt", ["--guidance_scale", 3], r"--guidance_scale 3.0: .* 1000 rows = --num_classes 1000 \("),
        ("cfg_ckpt", ["--guidance_scale", -1], r"--guidance_scale -1.0: must be a finite number >= 0"),
        ("cfg_ckpt", ["--class_labels", "10"], r"--class_labels '10': label 10 is outside \[0, 10\) \(--num_classes\)"),
    ],
)
def test_bad_sampler_and_guidance_flags_are_one_line_errors(request, capsys, tmp_path, which, extra, message):
    argv = ["--model_path", request.getfixturevalue(which), "--num_samples", 1] + extra
    code, err = _exit_code_and_stderr(capsys, "image_sample.py", argv, tmp_path)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert re.search(r"^error: " + message, line), line
    assert not any(name.endswith(".npz") for name in os.listdir(tmp_path))


def test_checkpoint_with_a_null_row_names_class_dropout_prob(cfg_ckpt, tmp_path):
    folder = tmp_path / "no_args"
    folder.mkdir()
    shutil.copy(cfg_ckpt, folder / "model000000.pt")  # without its args.json
    flags = [f"--{k}={v}" for k, v in TINY.items()] + ["--class_cond", True, "--num_classes", 10]
    with pytest.raises(UserError, match=r"label table has 11 rows: .* --num_classes 10 with --class_dropout_prob > 0"):
        _run_main("image_sample.py", ["--model_path", folder / "model000000.pt"] + flags, tmp_path / "out")


def _two_class_images(folder) -> None:
    """8x8 images: class ``left`` bright on the left half, ``right`` on the right, with noise."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for label, name in enumerate(("left", "right")):
        for i in range(32):
            image = np.full((8, 8, 3), 40.0)
            image[:, 4 * label : 4 * label + 4] = 215.0
            image += rng.normal(0, 10, image.shape)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{name}_{i:02d}.png")


def _pixel_class(images: np.ndarray) -> np.ndarray:
    """The rule: class 1 (``right``) where the right half is brighter than the left. (N,) int64."""
    pixels = images.astype(np.float64)
    return (pixels[:, :, 4:].mean(axis=(1, 2, 3)) > pixels[:, :, :4].mean(axis=(1, 2, 3))).astype(np.int64)


@pytest.mark.slow
def test_classifier_free_guidance_follows_the_label(tmp_path):
    """
    A tiny model trained with --class_dropout_prob 0.2 on two classes: at w = 3 nearly every sample
    is of the requested class, at w = 0 (the unconditional model) both classes come out.
    """
    data, train = tmp_path / "data", tmp_path / "train"
    _two_class_images(data)
    model = ["--image_size", 8, "--num_channels", 32, "--channel_mult", "1,2", "--num_res_blocks", 1]
    model += ["--attention_resolutions", "", "--class_cond", True, "--num_classes", 2, "--diffusion_steps", 100]
    model += ["--noise_schedule", "cosine", "--winograd", False]
    argv = ["--data_dir", data, "--log_dir", train, "--class_dropout_prob", 0.2, "--lr", 3e-3, "--batch_size", 16]
    argv += ["--max_steps", 100, "--save_interval", 0, "--log_interval", 50, "--ema_rate", 0.9]
    proc = _run_subprocess("image_train.py", model + argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rates = {}
    for scale in (0, 3):
        out = tmp_path / f"w{scale}"
        argv = ["--model_path", train / "ema_0.9_000100.pt", "--log_dir", out, "--num_samples", 64, "--batch_size", 64]
        argv += ["--timestep_respacing", 10, "--sampler", "dpm++2m", "--guidance_scale", scale, "--class_labels", "0,1"]
        proc = _run_subprocess("image_sample.py", argv + ["--num_grid", 0, "--winograd", False])
        assert proc.returncode == 0, proc.stderr[-2000:]
        arrays = _load(out / "samples_64x8x8x3.npz")
        predicted = _pixel_class(arrays["arr_0"])
        rates[scale] = ((predicted == arrays["arr_1"]).mean(), predicted.mean())
    print("classifier-free guidance, (requested-class rate, class-1 share) per w:", rates)
    assert rates[3][0] >= 0.9, rates  # the requested class at w = 3
    assert 0.2 <= rates[0][1] <= 0.8, rates  # mixed classes at w = 0


@pytest.mark.parametrize("rank", [0, 1])
def test_samples_are_gathered_per_batch_to_rank_0_only(monkeypatch, rank):
    """Rank 1 of 2 never receives samples; each gather carries at most one batch per rank."""
    from improved_diffusion import dist_util, sample_util
    from improved_diffusion.script_util import create_gaussian_diffusion

    other = 1 - rank
    sent = []

    def gather_to_rank0(obj):
        sent.append(len(obj["index"]))
        if rank != 0:
            return None
        theirs = np.arange(other, 5, 2)[len(sent) * 2 - 2 : len(sent) * 2]  # the other rank's batch
        fake = {"index": theirs, "images": np.zeros((len(theirs), 4, 4, 3), np.uint8)}
        return [obj, fake] if rank == 0 else [fake, obj]

    monkeypatch.setattr(dist_util, "get_rank", lambda: rank)
    monkeypatch.setattr(dist_util, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist_util, "gather_to_rank0", gather_to_rank0)
    diffusion = create_gaussian_diffusion(steps=2, noise_schedule="cosine")
    images, _ = sample_util.sample_images(
        lambda x, t, **kw: torch.zeros_like(x),
        diffusion,
        num_samples=5,
        batch_size=2,
        image_shape=(3, 4, 4),
        seed=0,
        progress=False,
    )
    # Rank 0 holds samples 0, 2, 4 (batches of 2 and 1), rank 1 samples 1, 3 (one batch, then an empty one).
    assert sent == ([2, 1] if rank == 0 else [2, 0])
    assert (images is None) == (rank == 1)
    if rank == 0:
        assert images.shape == (5, 4, 4, 3) and images.dtype == np.uint8
