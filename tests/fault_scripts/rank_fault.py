"""
Run a training script with a fault injected into one rank (used by tests/test_faults.py).

Usage: ``mpiexec -n 2 python rank_fault.py MODE RANK STEP SCRIPT [script flags...]``: rank
``RANK`` hits the fault at the start of training step ``STEP`` (1-based), while the other
ranks go on into the step's gradient all-reduce. MODE is one of

- ``raise``: an uncaught ``RuntimeError`` (a bug: its traceback must appear once);
- ``sigkill``: the rank is killed by SIGKILL (as by the out-of-memory killer), printing nothing.
"""

import os
import runpy
import signal
import sys

from improved_diffusion import errors, train_util


def main() -> None:
    mode, rank, step, script = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    sys.argv = [script] + sys.argv[5:]
    real_run_step = train_util.TrainLoop.run_step

    def run_step(self, batch, cond):
        from improved_diffusion import dist_util

        if dist_util.get_rank() == rank and self.step + 1 == step:
            if mode == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault on rank {rank} at step {step}")
        return real_run_step(self, batch, cond)

    train_util.TrainLoop.run_step = run_step
    errors.run_main(runpy.run_path(script, run_name="not_main")["main"])


if __name__ == "__main__":
    main()
