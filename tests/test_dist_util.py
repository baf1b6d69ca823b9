"""
Tests for improved_diffusion.dist_util: launcher detection and the helpers in this process,
then real jobs of tests/dist_scripts/*.py under plain python (mpi4py unimportable),
``mpiexec -n 2`` and ``torchrun --nproc_per_node 2`` (gloo on the CPU).
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from improved_diffusion import dist_util
from improved_diffusion.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "dist_scripts")
BIN = os.path.dirname(sys.executable)
MPIEXEC = os.path.join(BIN, "mpiexec")
JOB_TIMEOUT_S = 120  # a hung job fails its test instead of hanging the suite
PROMPT_S = 60  # "promptly": far below the collective timeout the jobs run with
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "HYDRA_", "TORCHELASTIC_")

needs_mpiexec = pytest.mark.skipif(
    not os.path.exists(MPIEXEC) or importlib.util.find_spec("mpi4py") is None,
    reason=f"needs {MPIEXEC} and mpi4py",
)


@pytest.fixture
def no_process_group(monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    # init_process_group wraps sys.excepthook (a rank prefix) and never unwraps it.
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    yield
    dist_util.cleanup()


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name in LAUNCHER_VARS or name.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, ("none", 0, 1, 0)),
        ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1"}, ("mpi", 3, 4, 1)),
        ({"PMI_RANK": "2", "PMI_SIZE": "4"}, ("mpi", 2, 4, 2)),
        (
            {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
            ("mpi", 1, 2, 1),
        ),
        (
            {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"},
            ("torchrun", 5, 8, 1),
        ),
        ({"RANK": "0", "WORLD_SIZE": "2"}, ("none", 0, 1, 0)),  # no MASTER_ADDR: not torchrun
    ],
)
def test_detect_launch(env, expected):
    info = dist_util.detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == expected


def test_detect_launch_rejects_non_integers():
    with pytest.raises(UserError, match=r"environment variable PMI_RANK='x' is not an integer"):
        dist_util.detect_launch({"PMI_RANK": "x", "PMI_SIZE": "2"})


def test_timeout_from_argument_and_environment(monkeypatch):
    monkeypatch.delenv(dist_util.TIMEOUT_ENV, raising=False)
    assert dist_util._timeout(None).total_seconds() == dist_util.DEFAULT_TIMEOUT_S
    assert dist_util._timeout(12.5).total_seconds() == 12.5
    monkeypatch.setenv(dist_util.TIMEOUT_ENV, "90")
    assert dist_util._timeout(None).total_seconds() == 90.0
    monkeypatch.setenv(dist_util.TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match=r"IDDPM_DIST_TIMEOUT='soon' is not a number"):
        dist_util._timeout(None)
    with pytest.raises(UserError, match="must be positive, got 0 s"):
        dist_util._timeout(0)


def test_helpers_without_a_process_group(no_process_group, tmp_path):
    assert (dist_util.get_rank(), dist_util.get_world_size(), dist_util.get_local_rank()) == (
        0,
        1,
        0,
    )
    assert dist_util.is_main_process()
    dist_util.barrier()
    t = torch.tensor([1.0, 2.0])
    assert dist_util.all_reduce_mean_(t) is t
    torch.testing.assert_close(t, torch.tensor([1.0, 2.0]), rtol=0, atol=0)
    assert dist_util.all_gather_tensors(t)[0] is t
    dist_util.sync_params([t])
    assert dist_util.all_reduce_scalar_means({"a": 2.0}, {"a": 3.0}) == {"a": 2.0}
    assert dist_util.dev() == torch.device("cpu")
    path = str(tmp_path / "ck.pt")
    torch.save({"w": torch.arange(3.0)}, path)
    torch.testing.assert_close(dist_util.load_state_dict(path)["w"], torch.arange(3.0), rtol=0, atol=0)
    with pytest.raises(UserError, match="file not found: .*missing.pt"):
        dist_util.load_state_dict(str(tmp_path / "missing.pt"))


def test_single_process_group_in_process(no_process_group, clean_env):
    dist_util.setup_dist()
    dist_util.setup_dist()  # idempotent
    assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    gathered = [torch.zeros(2)]
    dist.all_gather(gathered, torch.ones(2))
    dist.barrier()
    assert dist_util.all_gather_tensors(torch.ones(3, 2))[0].shape == (3, 2)
    assert sys.excepthook is not dist_util._excepthook  # only for jobs of several processes
    dist_util.cleanup()
    assert not dist.is_initialized() and dist_util.get_world_size() == 1


def test_mpiexec_without_mpi4py_is_a_user_error(no_process_group, clean_env):
    clean_env.setenv("PMI_RANK", "0")
    clean_env.setenv("PMI_SIZE", "2")
    clean_env.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(UserError, match=r"started by mpiexec \(2 processes\) but mpi4py is not installed"):
        dist_util.setup_dist()
    assert not dist.is_initialized()


def test_user_cuda_visible_devices_is_respected(no_process_group, clean_env):
    """With (mocked) GPUs, the device follows the local rank among the visible ones and
    CUDA_VISIBLE_DEVICES is never written."""
    chosen = []
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 2)
    clean_env.setattr(torch.cuda, "set_device", chosen.append)
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    for name, value in [("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "3")]:
        clean_env.setenv(name, value)
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    dist_util.setup_dist(backend="gloo")
    assert chosen == [1]  # local rank 3 % 2 visible GPUs
    assert dist_util.dev() == torch.device("cuda", 1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"
    dist_util.cleanup()
    clean_env.delenv("CUDA_VISIBLE_DEVICES")
    dist_util.setup_dist(backend="gloo")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_more_nccl_ranks_than_gpus_is_one_line(no_process_group, clean_env):
    """NCCL refuses two processes on one GPU ("duplicate GPU"): say so before joining the group."""
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 2)
    clean_env.setattr(torch.cuda, "set_device", lambda gpu: None)
    for name, value in [("RANK", "2"), ("WORLD_SIZE", "3"), ("LOCAL_RANK", "2"), ("MASTER_ADDR", "127.0.0.1")]:
        clean_env.setenv(name, value)
    with pytest.raises(UserError, match=r"local rank 2 has no GPU of its own: 2 visible on this machine") as exc:
        dist_util.setup_dist(backend="nccl")
    assert "--nproc_per_node 2" in str(exc.value) and "\n" not in str(exc.value)
    assert not dist.is_initialized()


@pytest.mark.parametrize("error, code", [(UserError("bad flag"), 2), (RuntimeError("bug"), 1)])
def test_abort_on_error_ends_a_multi_process_job(monkeypatch, capsys, error, code):
    class Aborted(Exception):
        pass

    def fake_abort(exit_code):
        raise Aborted(exit_code)

    with pytest.raises(type(error)):  # one process: the exception propagates unchanged
        with dist_util.abort_on_error():
            raise error
    monkeypatch.setattr(dist_util, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist_util, "abort_job", fake_abort)
    with pytest.raises(Aborted) as aborted:
        with dist_util.abort_on_error():
            raise error
    assert aborted.value.args == (code,)
    assert capsys.readouterr().err.count(str(error)) == 1


# ---------------------------------------------------------------------------------------------
# Real jobs


def run_job(cmd, cwd):
    """Run a job in its own process group; kill the whole group if it outlives the timeout."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    env.pop("OPENAI_LOGDIR", None)
    env.update(
        PATH=BIN + os.pathsep + env.get("PATH", ""),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        IDDPM_DIST_TIMEOUT=str(JOB_TIMEOUT_S),
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"job did not finish in {JOB_TIMEOUT_S} s: {cmd}\n{out}")
    return proc.returncode, out, time.monotonic() - start


def mpiexec(n, *args):
    return [MPIEXEC, "-n", str(n), sys.executable, *args]


def torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), *args]


def no_mpi4py(*args):
    """python with mpi4py made unimportable, running a script."""
    shim = "import runpy, sys; sys.modules['mpi4py'] = None; sys.argv = sys.argv[1:]; "
    shim += "runpy.run_path(sys.argv[0], run_name='__main__')"
    return [sys.executable, "-c", shim, *args]


@pytest.fixture
def checkpoint(tmp_path):
    path = str(tmp_path / "ck.pt")
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, path)
    return path


@pytest.mark.parametrize(
    "launch, world, launcher, mpi",
    [
        pytest.param(no_mpi4py, 1, "none", False, id="python-without-mpi4py"),
        pytest.param(mpiexec, 2, "mpi", True, id="mpiexec", marks=[pytest.mark.mpi, needs_mpiexec]),
        pytest.param(torchrun, 2, "torchrun", False, id="torchrun"),
    ],
)
@pytest.mark.slow
def test_worker_job(tmp_path, checkpoint, launch, world, launcher, mpi):
    """setup_dist, all-reduce, uneven all-gather, load_state_dict, sync_params and the
    logger's weighted mean over ranks, in a real job (checks inside worker.py)."""
    log_dir = str(tmp_path / "job_logs")
    script = os.path.join(SCRIPTS, "worker.py")
    cmd = launch(world, script, checkpoint, log_dir) if world > 1 else launch(script, checkpoint, log_dir)
    code, out, _ = run_job(cmd, cwd=str(tmp_path))
    assert code == 0, out
    for rank in range(world):
        assert f"OK rank {rank}/{world} launcher {launcher} local {rank} mpi {mpi}" in out, out
    # Rank r logged r + 1 values: 2 r + rank for r in 0..rank; rank 0 alone wrote the files.
    values = [2 * r + rank for rank in range(world) for r in range(rank + 1)]
    with open(os.path.join(log_dir, "progress.csv")) as f:
        assert f.read() == f"loss,step\n{sum(values) / len(values)!r},7\n"
    assert sorted(os.listdir(log_dir)) == ["log.txt", "progress.csv"]


@pytest.mark.cuda
@pytest.mark.slow
def test_nccl_job_on_two_gpus(tmp_path, checkpoint):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two visible GPUs")
    code, out, _ = run_job(torchrun(2, os.path.join(SCRIPTS, "nccl.py"), checkpoint), cwd=str(tmp_path))
    assert code == 0, out
    assert "OK rank 0/2" in out and "OK rank 1/2" in out, out


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize(
    "mode, expected_code, message",
    [
        ("crash", 1, "RuntimeError: boom from the last rank"),
        ("usererror", 2, "error: bad flag from the last rank"),
    ],
)
@pytest.mark.slow
def test_one_rank_failing_ends_the_job(tmp_path, mode, expected_code, message):
    code, out, seconds = run_job(mpiexec(2, os.path.join(SCRIPTS, "fail.py"), mode), str(tmp_path))
    assert code != 0, out
    if mode == "crash":  # with a UserError, the peer's abort (code 1) may win the race
        assert code == expected_code, out
    assert seconds < PROMPT_S, out
    assert out.count(message) == 1, out
    assert "peer passed the barrier" not in out
