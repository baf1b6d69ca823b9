"""
Run by tests/test_dist_util.py under plain python, mpiexec and torchrun: exercises every
dist_util collective and the logger's cross-rank mean, prints "OK rank R/W launcher L".

Usage: python worker.py CHECKPOINT LOG_DIR
"""

import sys

import torch
import torch.distributed as dist

from improved_diffusion import dist_util, logger
from improved_diffusion.errors import UserError

TOL = dict(rtol=0.0, atol=0.0)


def values_for(rank: int) -> list:
    """Rank r logs r + 1 values: 1 for rank 0, 2, 4 for rank 1, ... (unequal counts)."""
    return [float(2 * r + rank) for r in range(rank + 1)]


def check_collectives(rank: int, world: int) -> None:
    t = torch.full((3,), float(rank))
    assert dist_util.all_reduce_mean_(t) is t
    torch.testing.assert_close(t, torch.full((3,), (world - 1) / 2), **TOL)

    x = torch.arange(2 * (rank + 1), dtype=torch.float32).reshape(rank + 1, 2) + 100 * rank
    gathered = dist_util.all_gather_tensors(x)
    assert len(gathered) == world
    for r, g in enumerate(gathered):
        expected = torch.arange(2 * (r + 1), dtype=torch.float32).reshape(r + 1, 2) + 100 * r
        torch.testing.assert_close(g, expected, **TOL)

    # Rank r sends r rows: rank 0 sends none.
    gathered = dist_util.all_gather_tensors(torch.full((rank, 2), rank, dtype=torch.int64))
    assert [tuple(g.shape) for g in gathered] == [(r, 2) for r in range(world)]
    assert all(bool((g == r).all()) for r, g in enumerate(gathered))

    # torch.distributed itself works after setup_dist, as code written for the original expects.
    ranks = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(ranks, torch.tensor([rank]))
    assert [int(r) for r in ranks] == list(range(world))
    dist_util.barrier()


def check_load_and_sync(rank: int, world: int, checkpoint: str) -> None:
    state = dist_util.load_state_dict(checkpoint)
    torch.testing.assert_close(state["w"], torch.arange(6.0).reshape(2, 3), **TOL)

    try:
        dist_util.load_state_dict(checkpoint + ".missing")
        raise AssertionError("loading a missing file did not raise")
    except UserError as exc:
        messages = [None] * world
        dist.all_gather_object(messages, str(exc))
        assert len(set(messages)) == 1 and "missing" in messages[0], messages

    # A 0-byte file: the loader's one-line error on every rank, not a crash of rank 0 alone.
    empty = checkpoint + ".empty"
    if rank == 0:
        open(empty, "wb").close()
    dist_util.barrier()
    try:
        dist_util.load_state_dict(empty)
        raise AssertionError("loading an empty file did not raise")
    except UserError as exc:
        messages = [None] * world
        dist.all_gather_object(messages, str(exc))
        assert len(set(messages)) == 1 and "is empty (0 bytes)" in messages[0], messages

    torch.manual_seed(rank)
    model = torch.nn.Linear(3, 2)
    dist_util.sync_params(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).unsqueeze(0)
    everyone = dist_util.all_gather_tensors(flat)
    torch.manual_seed(0)
    reference = torch.cat([p.detach().reshape(-1) for p in torch.nn.Linear(3, 2).parameters()])
    for params in everyone:
        torch.testing.assert_close(params[0], reference, **TOL)


def check_logger(rank: int, world: int, log_dir: str) -> None:
    logger.configure(dir=log_dir, format_strs=["log", "csv"])
    for v in values_for(rank):
        logger.logkv_mean("loss", v)
    logger.logkv("step", 7)
    kvs = logger.dumpkvs()
    all_values = [v for r in range(world) for v in values_for(r)]
    assert kvs["loss"] == sum(all_values) / len(all_values), kvs
    assert kvs["step"] == 7
    logger.get_current().close()
    # Without a folder argument or OPENAI_LOGDIR, every rank agrees on rank 0's time stamp.
    with logger.scoped_configure(format_strs=["log"]) as default:
        folders = [None] * world
        dist.all_gather_object(folders, default.get_dir())
        assert len(set(folders)) == 1 and folders[0].startswith("logs"), folders


def main() -> None:
    checkpoint, log_dir = sys.argv[1:3]
    dist_util.setup_dist()
    dist_util.setup_dist()  # idempotent
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    assert dist.is_initialized() and dist.get_rank() == rank and dist.get_world_size() == world
    assert dist_util.is_main_process() == (rank == 0)
    assert dist_util.dev() == torch.device("cpu")
    launcher = dist_util.detect_launch().launcher
    check_collectives(rank, world)
    check_load_and_sync(rank, world, checkpoint)
    check_logger(rank, world, log_dir)
    mpi = "mpi4py.MPI" in sys.modules
    print(f"OK rank {rank}/{world} launcher {launcher} local {dist_util.get_local_rank()} mpi {mpi}")
    dist_util.barrier()
    dist_util.cleanup()


if __name__ == "__main__":
    main()
