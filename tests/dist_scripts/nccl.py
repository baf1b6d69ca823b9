"""
Run by tests/test_dist_util.py under ``torchrun --nproc_per_node 2`` on a machine with two GPUs:
setup_dist picks NCCL and one GPU per rank; collectives, broadcast loading and parameter sync
work on CUDA tensors; a DDP training step keeps the ranks' weights equal. Prints "OK rank R/W".

Usage: torchrun --nproc_per_node 2 nccl.py CHECKPOINT
"""

import sys

import torch
import torch.distributed as dist

from improved_diffusion import dist_util


def main() -> None:
    dist_util.setup_dist()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    assert dist.get_backend() == "nccl", dist.get_backend()
    device = dist_util.dev()
    assert device == torch.device("cuda", dist_util.get_local_rank()) and torch.cuda.current_device() == device.index
    t = torch.full((3,), float(rank), device=device)
    dist_util.all_reduce_mean_(t)
    torch.testing.assert_close(t, torch.full((3,), (world - 1) / 2, device=device), rtol=0, atol=0)
    parts = dist_util.all_gather_tensors(torch.full((rank + 1, 2), rank, device=device))
    assert [tuple(p.shape) for p in parts] == [(r + 1, 2) for r in range(world)]
    state = dist_util.load_state_dict(sys.argv[1])
    torch.testing.assert_close(state["w"], torch.arange(6.0).reshape(2, 3), rtol=0, atol=0)
    torch.manual_seed(rank)
    model = torch.nn.Linear(3, 2).to(device)
    dist_util.sync_params(model.parameters())
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device])
    ddp(torch.randn(4, 3, device=device)).square().mean().backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])[None]
    grads = dist_util.all_gather_tensors(flat)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    print(f"OK rank {rank}/{world}", flush=True)
    dist_util.barrier()
    dist_util.cleanup()


if __name__ == "__main__":
    main()
