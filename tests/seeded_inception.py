"""
The golden Inception README's seeded weights recipe (tests/fixtures/README.md, inception_fid_small.pt):
walk the state-dict entries in order with one seeded CPU generator. Shared by the Inception and
evaluator tests (seeded weights also keep activations away from the denormal floats that a
default initialisation decays into, which are very slow on CPUs).
"""

import math
from typing import Dict, Sequence, Tuple

import torch


def seeded_state_dict(key_shapes: Sequence[Tuple[str, Sequence[int]]], seed: int) -> Dict[str, torch.Tensor]:
    """The recipe's state dict for ``key_shapes`` ((name, shape) pairs in order)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in key_shapes:
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("running_mean"):
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bn.weight"):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bn.bias") or name == "fc.bias":
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 4:
            state[name] = torch.randn(shape, generator=g) * math.sqrt(2 / (shape[1] * shape[2] * shape[3]))
        elif name == "fc.weight":
            state[name] = torch.randn(shape, generator=g) * math.sqrt(1 / 2048)
        else:
            raise AssertionError(f"no recipe for {name}")
    return state
