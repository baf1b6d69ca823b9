"""
Crash a training script many times, cheaply: import it once, then fork one fresh training
process per planned crash (used by tests/test_faults.py).

Usage: ``python kill_runner.py PLAN.json``. The plan is a JSON object::

    {"script": "scripts/image_train.py", "argv": [...], "log_dir": "...", "out": "result.json",
     "state_prefixes": ["model", "ema_0.9_", "opt", "state"],  # the files of one checkpoint
     "runs": [{"kill": "delay", "seconds": 0.8},  # SIGKILL this long after the fork
              {"kill": "fsync", "n": 3},          # SIGKILL inside the n-th file write (before rename)
              {"kill": "replace", "n": 2},        # SIGKILL just after the n-th rename (between files)
              {"kill": "signal", "signal": 15, "after_rows": 2, "argv": [...]},  # SIGTERM/SIGINT
              {"kill": null, "extra_steps": 2}]}  # run to the newest complete step + 2

Every run continues the same log folder (the plan's argv should hold
``--resume_checkpoint auto``); a run's own ``argv`` is appended (argparse: last wins). Each
child's stdout and stderr go to ``run{i}.txt`` beside ``out``. The parent never runs a torch
operation, so forking after ``import torch`` is safe. ``out`` receives, per run: the exit
status (negative = killed by that signal), the seconds it lived, and the checkpoint files of the
log folder (name -> size) right after it ended.
"""

import inspect
import json
import os
import random
import runpy
import signal
import sys
import time


def _listing(folder):
    if not os.path.isdir(folder):
        return {}
    return {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def _newest_complete(folder, prefixes):
    """Newest step whose files ``{prefix}{step:06d}.pt`` all exist (by name only; 0 if none)."""
    names = set(_listing(folder))
    steps = [int(n[5:-3]) for n in names if n.startswith("model") and n.endswith(".pt") and n[5:-3].isdigit()]
    complete = [s for s in steps if all(f"{p}{s:06d}.pt" in names for p in prefixes)]
    return max(complete, default=0)


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm_kill_at_call(module, name, n, before):
    """Replace ``module.name`` so that its n-th call kills the process (before or after it runs)."""
    real = getattr(module, name)
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == n and before:
            _die()
        result = real(*args, **kwargs)
        if count[0] == n and not before:
            _die()
        return result

    setattr(module, name, wrapper)


def _child(main, argv, run, log_path):
    """Body of a forked training process; never returns."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        import torch

        from improved_diffusion import errors

        torch.set_num_threads(1)
        if run.get("kill") == "fsync":  # the temporary file is written, not yet renamed
            _arm_kill_at_call(os, "fsync", run["n"], before=True)
        elif run.get("kill") == "replace":  # between two files of one checkpoint
            _arm_kill_at_call(os, "replace", run["n"], before=False)
        sys.argv = [sys.argv[0]] + argv
        takes_argv = bool(inspect.signature(main).parameters)
        try:
            errors.run_main(lambda: main(argv) if takes_argv else main())
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _rows(path):
    try:
        with open(path) as f:
            return max(0, sum(1 for line in f if line.strip()) - 1)  # minus the header
    except OSError:
        return 0


def _supervise(pid, run, log_dir, started, timeout):
    """Wait for the child, killing or signalling it as planned; return its wait status."""
    kind = run.get("kill")
    if kind == "delay":
        deadline = started + run["seconds"]
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
    elif kind == "signal":
        csv = os.path.join(log_dir, "progress.csv")
        target = _rows(csv) + run["after_rows"]
        while _rows(csv) < target and time.time() < started + timeout:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            time.sleep(0.01)
        os.kill(pid, run["signal"])
    deadline = started + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    sys.argv = [plan["script"]]
    # Imports the training process would do lazily (AdamW pulls in torch._dynamo: seconds).
    import torch._dynamo  # noqa: F401
    from PIL import PngImagePlugin  # noqa: F401

    from improved_diffusion import checkpoints, train_util  # noqa: F401

    main_fn = runpy.run_path(plan["script"], run_name="not_main")["main"]
    out_dir = os.path.dirname(os.path.abspath(plan["out"]))
    results = []
    random.seed(0)
    for i, run in enumerate(plan["runs"]):
        argv = [str(a) for a in plan["argv"] + run.get("argv", [])]
        if "extra_steps" in run:  # run to the end: a few steps past the newest complete checkpoint
            argv += ["--max_steps", str(_newest_complete(plan["log_dir"], plan["state_prefixes"]) + run["extra_steps"])]
        log_path = os.path.join(out_dir, f"run{i}.txt")
        started = time.time()
        pid = os.fork()
        if pid == 0:
            _child(main_fn, argv, run, log_path)
        status = _supervise(pid, run, plan["log_dir"], started, plan.get("timeout", 60))
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        seconds = round(time.time() - started, 3)
        results.append(dict(run=run, status=code, seconds=seconds, files=_listing(plan["log_dir"]), log=log_path))
    with open(plan["out"], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
