"""
Run by tests/test_dist_util.py: the last rank fails while the others wait in a collective;
the job must end promptly with a non-zero status and the error shown once.

Usage: python fail.py MODE, MODE one of
  crash      an uncaught RuntimeError (ended by the exception hook setup_dist installs)
  usererror  a UserError inside errors.run_main, as scripts do (that rank exits with 2; its
             peers see its connections close and abort)
"""

import sys

from improved_diffusion import dist_util, errors


def main() -> None:
    mode = sys.argv[1]
    dist_util.setup_dist()
    if dist_util.get_rank() == dist_util.get_world_size() - 1:
        if mode == "crash":
            raise RuntimeError("boom from the last rank")
        raise errors.UserError("bad flag from the last rank")
    dist_util.barrier()  # without the abort, the other ranks would wait here
    print("peer passed the barrier", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "crash":
        main()
    errors.run_main(main)
