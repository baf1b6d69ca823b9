"""Load a script of ``scripts/`` (its ``main`` and helpers) without running it, and run its ``main`` in-process."""

import contextlib
import os
import runpy
import types
from typing import Iterator, Optional, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist

from improved_diffusion import dist_util, logger
from improved_diffusion.errors import run_main

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def load_script(name: str) -> types.SimpleNamespace:
    """The globals of ``scripts/<name>`` (``"image_train.py"`` or ``"image_train"``) as attributes.

    A missing script is a failure (FileNotFoundError), never a skip: a renamed script must fail the suite.
    """
    filename = name if name.endswith(".py") else f"{name}.py"
    return types.SimpleNamespace(**runpy.run_path(os.path.join(SCRIPTS, filename), run_name="not_main"))


@contextlib.contextmanager
def main_effects_undone(outer_log_dir: str) -> Iterator[None]:
    """
    Undo what a script's main() does to this process (the process group, the current logger),
    and keep its logger off stdout, which pytest swaps per test.
    """
    previous = {name: os.environ.get(name) for name in ("OPENAI_LOG_FORMAT", "CUBLAS_WORKSPACE_CONFIG")}
    os.environ["OPENAI_LOG_FORMAT"] = "log,csv"
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    had_group = dist.is_initialized()
    # main() sets torch's process-wide arithmetic choices (precision.set_cuda_math): put them back.
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cuda_math = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "deterministic")]
    cuda_math += [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
    saved = [getattr(owner, name) for owner, name in cuda_math]
    try:
        with logger.scoped_configure(dir=outer_log_dir, format_strs=[]):
            yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        for (owner, name), value in zip(cuda_math, saved):
            setattr(owner, name, value)
        if not had_group and dist.is_initialized():
            dist_util.cleanup()


def run_script(module: types.SimpleNamespace, argv: Sequence[str], capsys: Optional[object] = None) -> Tuple[int, str]:
    """Run a script's main like the command line does; returns (exit status, stderr)."""
    with pytest.raises(SystemExit) as info:
        run_main(lambda: module.main(list(argv)))
    return info.value.code, capsys.readouterr().err if capsys else ""
