"""
Process-group setup and the few collectives training, sampling and logging need.

One :func:`setup_dist` works for the three ways a script is started:

- ``python script.py``: one process. A ``torch.distributed`` group of size 1 is still
  initialised (on an in-process store, so no port or file is left behind), so code written for
  the original (``dist.get_rank()``, ``dist.all_gather``, ``dist.barrier``) keeps working.
  MPI is neither needed nor imported.
- ``mpiexec -n N python script.py``: rank and size come from the launcher's environment
  (``PMI_RANK``/``PMI_SIZE`` for MPICH's hydra, ``OMPI_COMM_WORLD_RANK``/``SIZE`` for Open MPI);
  mpi4py is imported only here, to let rank 0 announce the address of the rendezvous store.
- ``torchrun --nproc_per_node N script.py``: rank, size, local rank and the master address come
  from torchrun's environment variables.

The backend is NCCL when CUDA is available, else gloo. Each process uses the GPU of its local
rank (:func:`dev`); a ``CUDA_VISIBLE_DEVICES`` set by the user is respected and never written.
Every helper answers sensibly without a process group (rank 0, world size 1, no-op), so library
code and tests can call them unconditionally.

In a job of several processes, an uncaught exception in one rank would leave the others waiting
in a collective; :func:`setup_dist` therefore installs an exception hook (and scripts may use
:func:`abort_on_error`) that prints the error once and ends the whole job.
"""

import contextlib
import datetime
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch
import torch.distributed as dist

from . import fileio
from .errors import UserError

DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "IDDPM_DIST_TIMEOUT"

# (rank, size, local rank) environment variables of each MPI launcher, first match wins.
_MPI_ENV_VARS = (
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI (hydra)
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),  # PMIx-based launchers
)


@dataclass(frozen=True)
class LaunchInfo:
    """How this process was started: ``launcher`` is ``"none"``, ``"mpi"`` or ``"torchrun"``."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int


_launch: Optional[LaunchInfo] = None  # set by setup_dist, cleared by cleanup
_previous_excepthook = None


def detect_launch(environ: Optional[Dict[str, str]] = None) -> LaunchInfo:
    """
    Find out from the environment how this process was launched; imports nothing.

    :param environ: the environment to read (default ``os.environ``).
    :return: the launcher with this process's rank, world size and local rank.
    :raises UserError: if a launcher variable holds something that is not an integer.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        return LaunchInfo(
            "torchrun",
            _env_int(env, "RANK"),
            _env_int(env, "WORLD_SIZE"),
            _env_int(env, "LOCAL_RANK", 0),
        )
    for rank_var, size_var, local_var in _MPI_ENV_VARS:
        if rank_var in env and size_var in env:
            rank = _env_int(env, rank_var)
            return LaunchInfo("mpi", rank, _env_int(env, size_var), _env_int(env, local_var, rank))
    return LaunchInfo("none", 0, 1, 0)


def _env_int(env: Dict[str, str], name: str, default: Optional[int] = None) -> int:
    value = env.get(name)
    if value is None:
        assert default is not None
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def _timeout(timeout: Union[None, float, datetime.timedelta]) -> datetime.timedelta:
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout = float(text) if text else DEFAULT_TIMEOUT_S
        except ValueError:
            raise UserError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if timeout <= 0:
        raise UserError(f"distributed timeout must be positive, got {timeout} s")
    return datetime.timedelta(seconds=timeout)


def setup_dist(timeout: Union[None, float, datetime.timedelta] = None, backend: Optional[str] = None) -> None:
    """
    Initialise ``torch.distributed`` for however the script was launched; calling it again
    does nothing.

    :param timeout: how long a collective may wait for the other ranks, in seconds or as a
        timedelta; default ``$IDDPM_DIST_TIMEOUT`` or 30 minutes.
    :param backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
    :raises UserError: under mpiexec without mpi4py installed, or for a bad launcher variable.
    """
    global _launch
    if dist.is_initialized():
        if _launch is None:  # initialised by the caller, not by us
            _launch = detect_launch()
        return
    info = detect_launch()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: Dict[str, Any] = dict(backend=backend, timeout=_timeout(timeout))
    if info.world_size == 1:
        # In-process store: no port to pick, nothing left on disk.
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    elif info.launcher == "torchrun":
        kwargs.update(init_method="env://", rank=info.rank, world_size=info.world_size)
    else:
        info, store = _mpi_rendezvous(info, kwargs["timeout"])
        kwargs.update(store=store, rank=info.rank, world_size=info.world_size)
    if torch.cuda.is_available():  # one GPU per local rank, among those the user made visible
        gpu = _gpu_of(info.local_rank, backend)
        torch.cuda.set_device(gpu)
        if backend == "nccl":  # NCCL binds its communicator to this GPU at once, not at the first collective
            kwargs["device_id"] = torch.device("cuda", gpu)
    dist.init_process_group(**kwargs)
    _launch = info
    if info.world_size > 1:
        _install_excepthook()


def _gpu_of(local_rank: int, backend: str) -> int:
    """
    The visible GPU of the process with ``local_rank``: ``local_rank % device_count``. NCCL
    cannot put two processes on one GPU, so there a local rank beyond the GPUs is a UserError.
    """
    count = torch.cuda.device_count()
    if backend == "nccl" and local_rank >= count:
        raise UserError(
            f"local rank {local_rank} has no GPU of its own: {count} visible on this machine and NCCL cannot "
            f"share one between processes; start at most {count} processes per machine "
            f"(torchrun --nproc_per_node {count}, or fewer mpiexec ranks per host) or make more GPUs visible"
        )
    return local_rank % count


def _mpi_rendezvous(info: LaunchInfo, timeout: datetime.timedelta):
    """Rank 0 opens a TCP store on a free port and broadcasts its address over MPI."""
    try:
        import mpi4py

        # No MPI_Finalize at exit: it waits for the other ranks, so a rank leaving early (say
        # sys.exit(2) after a UserError) would hang instead of exiting, and its peers would
        # never see its gloo/NCCL connections close. MPI is only the rendezvous here.
        mpi4py.rc.finalize = False
        from mpi4py import MPI
    except ImportError:
        raise UserError(
            f"started by mpiexec ({info.world_size} processes) but mpi4py is not installed; "
            "install it (pip install mpi4py) or launch with torchrun"
        ) from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    info = LaunchInfo("mpi", comm.Get_rank(), comm.Get_size(), local.Get_rank())
    single_host = local.Get_size() == info.world_size
    local.Free()
    store = None
    address = None
    if info.rank == 0:
        host = "127.0.0.1" if single_host else _host_address()
        # Port 0: the OS picks a free port, so two jobs on one machine never collide.
        store = dist.TCPStore(host, 0, info.world_size, True, timeout=timeout, wait_for_workers=False)
        address = (host, store.port)
    host, port = comm.bcast(address, root=0)
    if store is None:
        store = dist.TCPStore(host, port, info.world_size, False, timeout=timeout)
    return info, store


def _host_address() -> str:
    """An address of this machine that other machines can reach."""
    try:
        return socket.gethostbyname(socket.getfqdn())
    except OSError:
        return socket.gethostname()


def cleanup() -> None:
    """Destroy the process group made by :func:`setup_dist` (no-op without one)."""
    global _launch
    if dist.is_initialized():
        dist.destroy_process_group()
    _launch = None
    _restore_excepthook()


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is set up."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """The number of processes; 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    """This process's rank among those on its machine; 0 without a process group."""
    if not is_initialized():
        return 0
    return (_launch or detect_launch()).local_rank


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the one process that writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; no-op for one process."""
    if get_world_size() > 1:
        dist.barrier()


def dev() -> torch.device:
    """
    The device for this process: GPU ``local_rank % device_count`` of those visible (the
    user's ``CUDA_VISIBLE_DEVICES`` is respected), or the CPU without CUDA.
    """
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """
    A CPU tensor's copy on ``device`` that does not make the host wait: on CUDA it goes through
    pinned (page-locked) memory with a non-blocking copy; elsewhere a plain ``.to``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _comm_device() -> torch.device:
    """Where tensors must live for the current backend's collectives."""
    if is_initialized() and dist.get_backend() == "nccl":
        return dev()
    return torch.device("cpu")


def load_state_dict(path: str, **kwargs: Any) -> Any:
    """
    Load a checkpoint on every rank, reading the file only once (on rank 0).

    :param path: local path or blobfile URL of a ``torch.save`` file.
    :param kwargs: passed to ``torch.load`` (``map_location`` defaults to the CPU;
        ``weights_only`` is always True).
    :return: the loaded object, typically a state_dict.
    :raises UserError: on every rank, with the same message, if the file is missing,
        unreadable, truncated or holds pickled objects.
    """
    if get_world_size() == 1:
        return fileio.safe_torch_load(path, **kwargs)
    data = _broadcast_file(path)
    return fileio.torch_load_bytes(data, path, **kwargs)


def _broadcast_file(path: str) -> bytes:
    """Rank 0 reads ``path``; every rank gets its bytes, or raises the same UserError."""
    device = _comm_device()
    data, error = b"", ""
    if get_rank() == 0:
        try:
            data = fileio.read_bytes(path)
        except UserError as exc:
            error = str(exc)
        except Exception as exc:  # blobfile and friends raise several types
            error = f"could not read {path}: {exc}"
    header = torch.tensor([len(error) > 0, len(data)], dtype=torch.int64, device=device)
    dist.broadcast(header, src=0)
    failed, length = (int(v) for v in header.tolist())
    if failed:
        message = [error]
        dist.broadcast_object_list(message, src=0, device=device)
        raise UserError(message[0])
    if length == 0:  # an empty file: every rank gets b"" (and the loader's one-line error)
        return b""
    if get_rank() == 0:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buffer = torch.empty(length, dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=0)
    return data if get_rank() == 0 else buffer.cpu().numpy().tobytes()


def reports_errors() -> bool:
    """
    Whether this process prints a :class:`UserError` that reached the script's ``main``. Such an
    error comes from the checks made before the process group exists (flags, data folder,
    checkpoint shapes), which every process of a job makes alike on the same inputs: rank 0
    speaks for all, so the job shows the message once. Errors after that are each printed by
    the rank that hit them (:func:`abort_on_error`).
    """
    try:
        return is_initialized() or detect_launch().rank == 0
    except UserError:  # a malformed launcher variable: speak rather than stay silent
        return True


def decided_by_rank0(decide: Callable[[], Any]) -> Any:
    """Run ``decide`` on rank 0 only and hand its (picklable) answer to every rank."""
    if get_world_size() == 1 or not is_initialized():
        return decide()
    box = [decide() if get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's picklable ``obj``, in rank order (a one-element list for one process)."""
    if get_world_size() == 1 or not is_initialized():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_rank0(obj: Any) -> Optional[List[Any]]:
    """Every rank's picklable ``obj`` in rank order on rank 0 only (None elsewhere); nothing is sent to other ranks."""
    if get_world_size() == 1 or not is_initialized():
        return [obj]
    out: Optional[List[Any]] = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def sync_params(params: Iterable[torch.Tensor]) -> None:
    """
    Copy rank 0's values into ``params`` on every rank (in place; no-op for one process).

    Tensors are flattened into one buffer per device and dtype, so a model costs a few
    broadcasts rather than one per parameter.
    """
    if get_world_size() == 1:
        return
    groups: Dict[Any, List[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    comm_device = _comm_device()
    with torch.no_grad():
        for tensors in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in tensors]).to(comm_device)
            dist.broadcast(flat, src=0)
            for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
                t.copy_(chunk.view_as(t))


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """
    Replace ``tensor`` in place by its average over all ranks (no-op for one process).

    :param tensor: a floating-point tensor of the same shape on every rank.
    :return: ``tensor`` itself.
    """
    if get_world_size() == 1:
        return tensor
    assert tensor.is_floating_point(), "all_reduce_mean_ averages floating-point tensors"
    work = tensor.to(_comm_device())
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    work.div_(get_world_size())
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_gather_tensors(tensor: torch.Tensor) -> List[torch.Tensor]:
    """
    Gather a tensor from every rank; the first dimension may differ between ranks.

    :param tensor: shape ``(n_r, ...)`` on rank r; trailing dims and dtype equal on all ranks.
    :return: one tensor per rank, in rank order, each with that rank's shape, on
        ``tensor``'s device.
    """
    assert tensor.dim() >= 1, "all_gather_tensors needs a leading dimension"
    if get_world_size() == 1:
        return [tensor]
    device = _comm_device()
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    if max(counts) == 0:
        return [tensor for _ in counts]
    padded = torch.zeros((max(counts),) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return [g[:n].to(tensor.device) for g, n in zip(gathered, counts)]


def all_reduce_scalar_means(means: Dict[str, float], counts: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """
    Average named scalars over all ranks, weighting each rank's value by its count.

    Ranks may report different keys; a key is averaged over the ranks that have it. This is
    the ``reduce`` callable the logger uses for :func:`improved_diffusion.logger.logkv_mean`.

    :param means: this rank's mean value per key.
    :param counts: how many values each mean summarises (default 1 for every key).
    :return: the global mean per key (identical on every rank).
    """
    counts = counts or {}
    local = {k: (float(v), float(counts.get(k, 1))) for k, v in means.items()}
    if get_world_size() == 1:
        return {k: v for k, (v, _) in local.items()}
    everyone: List[Any] = [None] * get_world_size()
    dist.all_gather_object(everyone, local)
    totals: Dict[str, List[float]] = {}
    for rank_values in everyone:
        for k, (v, n) in rank_values.items():
            acc = totals.setdefault(k, [0.0, 0.0])
            acc[0] += v * n
            acc[1] += n
    return {k: (s / n if n > 0 else float("nan")) for k, (s, n) in totals.items()}


# ---------------------------------------------------------------------------------------------
# Ending the whole job when one rank fails


def abort_job(exit_code: int = 1) -> None:
    """
    End this process at once, and the whole job with it: ``MPI_Abort`` under mpiexec (which
    kills every rank), else ``os._exit`` (torchrun then stops the other workers; a peer
    waiting in a collective gets a connection error or the timeout).
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        # MPI_Abort can tear down mpiexec's output forwarding before it has passed on what this
        # rank just printed: give it a moment.
        time.sleep(0.5)
        mpi.COMM_WORLD.Abort(exit_code)
    os._exit(exit_code)


# What gloo and NCCL say when another rank has died: a consequence, not a second error.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crash")


def _report_and_abort(exc_type, exc, tb) -> None:
    prefix = f"[rank {get_rank()}/{get_world_size()}]"
    if any(s in str(exc) for s in _PEER_GONE):
        print(f"{prefix} another rank has failed (see its error); exiting", file=sys.stderr)
    else:
        print(f"{prefix} uncaught {exc_type.__name__}; aborting the whole job", file=sys.stderr)
        traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
    abort_job(1)


def _excepthook(exc_type, exc, tb) -> None:
    if get_world_size() > 1 and not issubclass(exc_type, KeyboardInterrupt):
        _report_and_abort(exc_type, exc, tb)
    (_previous_excepthook or sys.__excepthook__)(exc_type, exc, tb)


def _install_excepthook() -> None:
    global _previous_excepthook
    if sys.excepthook is not _excepthook:
        _previous_excepthook = sys.excepthook
        sys.excepthook = _excepthook


def _restore_excepthook() -> None:
    global _previous_excepthook
    if sys.excepthook is _excepthook:
        sys.excepthook = _previous_excepthook or sys.__excepthook__
    _previous_excepthook = None


@contextlib.contextmanager
def abort_on_error() -> Iterator[None]:
    """
    Context for a script's body: in a job of several processes, an exception (including a
    ``UserError``) prints its message once, from the failing rank, and ends the whole job with
    a non-zero status instead of leaving the other ranks waiting. With one process it does
    nothing and the exception propagates.

    Use it inside ``errors.run_main``: ``with dist_util.abort_on_error(): ...``.
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except UserError as exc:
        if get_world_size() == 1:
            raise
        print(f"[rank {get_rank()}] error: {exc}", file=sys.stderr)
        abort_job(2)
    except BaseException:
        if get_world_size() == 1:
            raise
        _report_and_abort(*sys.exc_info())
