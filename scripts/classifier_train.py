"""
Train a noised image classifier [ADM §4] on a folder of class-labelled images ({class}_{name}.png).

Flags: guided-diffusion's (CLASSIFIER, DIFFUSION, CLASSIFIER_TRAIN and the TRAIN flags it shares
with image_train.py) plus new ones (``--help`` lists them all with their defaults). Each step
noises the batch to x_t at timesteps from ``--schedule_sampler`` and minimises the cross-entropy
of the classifier's logits; loss, acc@1 and acc@5 are logged by quartile of t, for validation
images too every ``--eval_interval`` steps when ``--val_data_dir`` is given. Every flag is saved
as args.json in the log folder, which classifier_sample.py reads back. Checkpoints
(model/opt/state NNNNNN.pt, ema_RATE_NNNNNN.pt with ``--ema_rate``) go to the log folder and load
into ``create_classifier``; ``--resume_checkpoint auto`` continues exactly from the newest complete
one. SIGTERM or Ctrl-C saves a checkpoint at the next step, then stops.
"""

import argparse
from typing import Optional, Sequence

from improved_diffusion.errors import run_main
from improved_diffusion.script_util import script_parser
from improved_diffusion.train_setup import train_main

SCRIPT = "classifier_train"


def main(argv: Optional[Sequence[str]] = None) -> None:
    train_main(SCRIPT, __doc__, argv)


def create_argparser() -> argparse.ArgumentParser:
    return script_parser(SCRIPT, __doc__)


if __name__ == "__main__":
    run_main(main)
