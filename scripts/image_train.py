"""
Train a diffusion model on a folder of images.

Flags: the original's MODEL/DIFFUSION and TRAIN groups, plus new ones (``--help`` lists them
all with their defaults). Every flag is saved as args.json in the log folder, which sampling
scripts read back. Checkpoints (model/ema/opt/state NNNNNN.pt, NNNNNN = steps done) go to the
log folder; ``--resume_checkpoint auto`` continues from the newest complete one there. SIGTERM
or Ctrl-C saves a checkpoint at the next step, then stops. Run alone, under mpiexec -n N, or
torchrun.
"""

import argparse
from typing import Optional, Sequence

from improved_diffusion.errors import run_main
from improved_diffusion.script_util import script_parser
from improved_diffusion.train_setup import train_main

SCRIPT = "image_train"


def main(argv: Optional[Sequence[str]] = None) -> None:
    train_main(SCRIPT, __doc__, argv)


def create_argparser() -> argparse.ArgumentParser:
    return script_parser(SCRIPT, __doc__)


if __name__ == "__main__":
    run_main(main)
