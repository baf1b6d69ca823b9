"""
The project's one exception for user mistakes, and the wrapper scripts use to report it.

Anything a user can reach from a flag, a file or a checkpoint (missing data folder, unreadable
image, wrong flag value, mismatched checkpoint) raises :class:`UserError` with a one-line
message naming the flag or file, the bad value and what was expected. Scripts wrap ``main()``
with :func:`run_main`, which prints that line to stderr and exits with status 2; any other
exception keeps its traceback, because it is a bug.

This module imports nothing from the package, so every module can import it without cycles.
"""

import sys
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake in a flag, file or checkpoint that the user can fix; the message says how."""


def run_main(main: Callable[[], object]) -> NoReturn:
    """
    Run a script's ``main()`` and exit: 0 on success, 2 with a one-line ``error: ...`` on
    stderr for a :class:`UserError`, 130 on Ctrl-C. Other exceptions propagate unchanged.
    """
    try:
        main()
        _leave_job_together()
    except UserError as exc:
        if _reports_errors():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        _end_job_if_distributed(EXIT_USER_ERROR)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(0)


def _leave_job_together() -> None:
    """After a successful ``main`` in a job of several processes, leave it together: a barrier,
    then the process group torn down before the interpreter exits (a rank whose peers' stores
    vanish mid-teardown would otherwise abort)."""
    dist_util = sys.modules.get("improved_diffusion.dist_util")
    if dist_util is not None and dist_util.is_initialized():
        dist_util.barrier()
        dist_util.cleanup()


def _reports_errors() -> bool:
    """Whether this process prints a UserError (see ``dist_util.reports_errors``)."""
    dist_util = sys.modules.get("improved_diffusion.dist_util")  # only if already in use
    return dist_util is None or dist_util.reports_errors()


def _end_job_if_distributed(exit_code: int) -> None:
    """In a job of several processes, end every rank now rather than leave peers waiting."""
    dist_util = sys.modules.get("improved_diffusion.dist_util")  # only if already in use
    if dist_util is not None and dist_util.get_world_size() > 1:
        dist_util.abort_job(exit_code)
