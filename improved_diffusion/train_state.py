"""
What a checkpoint holds beyond the weights, and how to find a complete one.

A bit-exact resume needs every random generator of every rank (torch CPU and CUDA, NumPy,
Python), the loss-aware sampler's loss history and the data position. They are stored as
tensors and plain containers, so the train-state file loads with ``weights_only=True``.
A checkpoint is complete when its model, EMA, optimizer and train-state files all exist and
load; the train-state file is written last, so it marks completeness.
"""

import os
import random
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from . import logger
from .errors import UserError
from .fileio import safe_torch_load


def checkpoint_files(folder: str, step: int, ema_rates: Sequence[float]) -> Dict[str, Any]:
    """Paths of one checkpoint: ``{"model": str, "ema": [str per rate], "opt": str, "state": str}``."""
    return {
        "model": os.path.join(folder, f"model{step:06d}.pt"),
        "ema": [os.path.join(folder, f"ema_{rate}_{step:06d}.pt") for rate in ema_rates],
        "opt": os.path.join(folder, f"opt{step:06d}.pt"),
        "state": os.path.join(folder, f"state{step:06d}.pt"),
    }


def get_rng_state() -> Dict[str, Any]:
    """torch (CPU and CUDA), NumPy and Python generator states as tensors and plain numbers."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`get_rng_state` (CUDA states only when this machine has the same GPUs)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def get_sampler_state(sampler: Any) -> Dict[str, Any]:
    """A sampler's state: its ``state_dict()``, else its NumPy array attributes as tensors."""
    if hasattr(sampler, "state_dict"):
        return sampler.state_dict()
    return {k: torch.from_numpy(np.array(v)) for k, v in vars(sampler).items() if isinstance(v, np.ndarray)}


def set_sampler_state(sampler: Any, state: Dict[str, Any]) -> None:
    """Restore :func:`get_sampler_state` (arrays keep the dtype the sampler had)."""
    if hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state)
        return
    for key, value in state.items():
        old = getattr(sampler, key, None)
        dtype = old.dtype if isinstance(old, np.ndarray) else None
        setattr(sampler, key, value.numpy().astype(dtype) if dtype is not None else value.numpy())


def newest_complete_checkpoint(folder: str, ema_rates: Sequence[float]) -> Optional[int]:
    """
    Step of the newest checkpoint in ``folder`` whose model, optimizer and train-state files
    exist and load (the state file is written last, so it marks a finished save). EMA files of
    the given rates are loaded when present; one missing because ``--ema_rate`` gained a rate
    does not disqualify the checkpoint (that EMA restarts from the weights). In a folder written
    by the original code (no state files at all), model and optimizer suffice. Incomplete
    checkpoints are skipped with a logged note.
    """
    if not os.path.isdir(folder):
        return None
    names = set(os.listdir(folder))
    steps = {int(n[5:-3]) for n in names if n.startswith("model") and n.endswith(".pt") and n[5:-3].isdigit()}
    original_layout = not any(n.startswith("state") and n.endswith(".pt") for n in names)
    for step in sorted(steps, reverse=True):
        files = checkpoint_files(folder, step, ema_rates)
        required = [files["model"], files["opt"]] + ([] if original_layout else [files["state"]])
        missing = [p for p in required if not os.path.isfile(p)]
        if missing:
            logger.log(f"resume: skipping incomplete checkpoint {step}: missing {os.path.basename(missing[0])}")
            continue
        saved_rates: list = []
        try:
            for path in required + [p for p in files["ema"] if os.path.isfile(p)]:
                loaded = safe_torch_load(path)
                if path == files["state"] and isinstance(loaded, dict):
                    saved_rates = [float(r) for r in loaded.get("ema_rate", [])]
        except UserError as exc:
            logger.log(f"resume: skipping checkpoint {step}: {exc}")
            continue
        lost = [p for r, p in zip(ema_rates, files["ema"]) if float(r) in saved_rates and not os.path.isfile(p)]
        if lost:  # that save wrote this EMA: its file is gone, not merely new
            logger.log(f"resume: skipping incomplete checkpoint {step}: missing {os.path.basename(lost[0])}")
            continue
        return step
    return None
    steps = set()
    for name in os.listdir(folder):
        if name.startswith("model") and name.endswith(".pt") and name[5:-3].isdigit():
            steps.add(int(name[5:-3]))
    for step in sorted(steps, reverse=True):
        files = checkpoint_files(folder, step, ema_rates)
        paths = [files["model"], *files["ema"], files["opt"], files["state"]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            logger.log(f"resume: skipping incomplete checkpoint {step}: missing {os.path.basename(missing[0])}")
            continue
        try:
            for path in paths:
                safe_torch_load(path)
        except UserError as exc:
            logger.log(f"resume: skipping checkpoint {step}: {exc}")
            continue
        return step
    return None
