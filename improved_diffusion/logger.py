"""
Key-value and text logging for training and evaluation scripts.

A :class:`Logger` holds its folder, its writers (``stdout``, ``log`` = ``log.txt``, ``csv`` =
``progress.csv``, ``json`` = ``progress.json``, ``tensorboard`` when that package is
installed), the values logged since the last dump and a ``reduce`` callable that averages
:func:`logkv_mean` values over ranks (by default
:func:`improved_diffusion.dist_util.all_reduce_scalar_means`; this module never imports MPI).
Only rank 0 writes; other ranks keep no files and print nothing, but take part in the
averaging. The module-level functions the original's users call (:func:`configure`,
:func:`log`, :func:`logkv`, :func:`logkv_mean`, :func:`dumpkvs`, :func:`get_dir`, ...)
delegate to the current logger. Importing the module does nothing: no folder, no
environment read; until :func:`configure` is called the current logger prints to stdout only.

Folder choice in :func:`configure`: the ``dir`` argument (scripts pass ``--log_dir``), else
``$OPENAI_LOGDIR``, else a new ``./logs/<date-time>`` folder; it is logged at start.
"""

import contextlib
import csv
import datetime
import io
import json
import os
import sys
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Union

import torch.distributed as dist

from . import dist_util
from .errors import UserError

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50

FORMATS = ("stdout", "log", "csv", "json", "tensorboard")
DEFAULT_FORMATS = "stdout,log,csv"

# reduce(means, counts) -> global means; see dist_util.all_reduce_scalar_means.
Reduce = Callable[[Dict[str, float], Dict[str, float]], Dict[str, float]]

_MAX_CELL = 30


class _Output:
    """A text stream given by the caller, or a file this writer opens (and closes)."""

    def __init__(self, target: Union[str, TextIO], mode: str = "a"):
        if isinstance(target, str):
            self.file: TextIO = open(target, mode, encoding="utf-8")
            self._owned = True
        else:
            self.file = target
            self._owned = False

    def close(self) -> None:
        if self._owned:
            self.file.close()
        elif not getattr(self.file, "closed", False):  # a borrowed stream someone else may have closed
            self.file.flush()


class HumanOutputFormat(_Output):
    """Key-value tables in a box and plain text lines (stdout and ``log.txt``)."""

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        if not kvs:
            return
        rows = [(_truncate(k), _truncate(_format_value(v))) for k, v in sorted(kvs.items())]
        key_width = max(len(k) for k, _ in rows)
        val_width = max(len(v) for _, v in rows)
        rule = "-" * (key_width + val_width + 7)
        lines = [rule]
        lines += [f"| {k.ljust(key_width)} | {v.ljust(val_width)} |" for k, v in rows]
        lines.append(rule)
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def writeseq(self, seq: Sequence[Any]) -> None:
        self.file.write(" ".join(str(s) for s in seq) + "\n")
        self.file.flush()


def _format_value(value: Any) -> str:
    if isinstance(value, float) or (hasattr(value, "__float__") and not isinstance(value, int)):
        return "%-8.3g" % float(value)
    return str(value)


def _plain(value: Any) -> Any:
    """A tensor or NumPy scalar as a Python number; anything else unchanged."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def _truncate(text: str) -> str:
    return text[: _MAX_CELL - 3] + "..." if len(text) > _MAX_CELL else text


class CSVOutputFormat(_Output):
    """
    ``progress.csv``: one row per dump. A key first seen later adds a column; the file is
    rewritten with the longer header and empty cells in earlier rows. An existing file
    (a resumed run in the same folder) is continued, not overwritten.
    """

    def __init__(self, target: Union[str, TextIO]):
        exists = isinstance(target, str) and os.path.exists(target)
        super().__init__(target, "r+" if exists else "w+")
        self.keys: List[str] = []
        if exists:
            header = self.file.readline()
            self.keys = next(csv.reader([header]), []) if header.strip() else []
            self.file.seek(0, io.SEEK_END)

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        new_keys = sorted(k for k in kvs if k not in self.keys)
        if new_keys:
            self._add_columns(new_keys)
        writer = csv.writer(self.file, lineterminator="\n")
        writer.writerow(["" if kvs.get(k) is None else _plain(kvs[k]) for k in self.keys])
        self.file.flush()

    def _add_columns(self, new_keys: List[str]) -> None:
        self.file.seek(0)
        old_rows = self.file.read().splitlines()[1:] if self.keys else []
        self.keys.extend(new_keys)
        self.file.seek(0)
        self.file.truncate()
        csv.writer(self.file, lineterminator="\n").writerow(self.keys)
        padding = "," * len(new_keys)
        for row in old_rows:
            self.file.write(row + padding + "\n")


class JSONOutputFormat(_Output):
    """``progress.json``: one JSON object per dump, one per line."""

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        clean = {k: _plain(v) for k, v in kvs.items()}
        self.file.write(json.dumps(clean, sort_keys=True) + "\n")
        self.file.flush()


class TensorBoardOutputFormat:
    """Scalars for TensorBoard (needs the ``tensorboard`` package), one step per dump."""

    def __init__(self, folder: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "log format 'tensorboard' needs the tensorboard package (pip install tensorboard)"
            ) from None
        self.writer = SummaryWriter(log_dir=folder)
        self.step = 0

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        for key, value in kvs.items():
            if hasattr(value, "__float__"):
                self.writer.add_scalar(key, float(value), self.step)
        self.writer.flush()
        self.step += 1

    def close(self) -> None:
        self.writer.close()


Writer = Union[HumanOutputFormat, CSVOutputFormat, JSONOutputFormat, TensorBoardOutputFormat]


def make_output_format(fmt: str, folder: str, log_suffix: str = "") -> Writer:
    """
    Build one writer.

    :param fmt: one of ``stdout``, ``log``, ``csv``, ``json``, ``tensorboard``.
    :param folder: the log folder (created if needed).
    :param log_suffix: appended to the file names (``log{suffix}.txt`` ...).
    :raises UserError: for an unknown format name.
    """
    if fmt == "stdout":
        return HumanOutputFormat(sys.stdout)
    if fmt not in FORMATS:
        raise UserError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    os.makedirs(folder, exist_ok=True)
    if fmt == "log":
        return HumanOutputFormat(os.path.join(folder, f"log{log_suffix}.txt"))
    if fmt == "csv":
        return CSVOutputFormat(os.path.join(folder, f"progress{log_suffix}.csv"))
    if fmt == "json":
        return JSONOutputFormat(os.path.join(folder, f"progress{log_suffix}.json"))
    return TensorBoardOutputFormat(os.path.join(folder, f"tb{log_suffix}"))


class Logger:
    """
    Buffers key-values until :meth:`dumpkvs` and writes them and text lines to its writers.

    :param dir: the log folder (None: no folder, e.g. the stdout-only default).
    :param output_formats: writers; those with ``writekvs`` get tables, those with
        ``writeseq`` get text lines. Empty on ranks other than 0.
    :param reduce: averages :meth:`logkv_mean` values over ranks at :meth:`dumpkvs`;
        None = values stay local.
    """

    def __init__(
        self,
        dir: Optional[str],
        output_formats: Sequence[Writer],
        reduce: Optional[Reduce] = None,
        level: int = INFO,
    ):
        self.dir = dir
        self.output_formats = list(output_formats)
        self.reduce = reduce
        self.level = level
        self.name2val: Dict[str, Any] = {}
        self.name2cnt: Dict[str, int] = defaultdict(int)

    def logkv(self, key: str, val: Any) -> None:
        """Record ``val`` for ``key`` (replacing any earlier value) until the next dump."""
        self.name2val[key] = val
        self.name2cnt.pop(key, None)

    def logkv_mean(self, key: str, val: Any) -> None:
        """Add ``val`` to the running mean of ``key``; the mean is averaged over ranks at dump."""
        count = self.name2cnt[key]
        old = float(self.name2val.get(key, 0.0)) if count else 0.0
        self.name2val[key] = old + (float(val) - old) / (count + 1)
        self.name2cnt[key] = count + 1

    def dumpkvs(self) -> Dict[str, Any]:
        """
        Write the buffered values (means averaged over ranks) and clear the buffer.

        Every rank must call it at the same point when ``reduce`` is a collective.

        :return: the values written (the same on every rank for the averaged keys).
        """
        values = dict(self.name2val)
        if self.reduce is not None:
            means = {k: values[k] for k in self.name2cnt}
            values.update(self.reduce(means, {k: float(n) for k, n in self.name2cnt.items()}))
        for fmt in self.output_formats:
            if hasattr(fmt, "writekvs"):
                fmt.writekvs(values)
        self.name2val.clear()
        self.name2cnt.clear()
        return values

    def log(self, *args: Any, level: int = INFO) -> None:
        """Write ``args`` joined by spaces as one line, if ``level`` is at least the logger's."""
        if self.level <= level:
            for fmt in self.output_formats:
                if hasattr(fmt, "writeseq"):
                    fmt.writeseq(args)

    def set_level(self, level: int) -> None:
        """Ignore :meth:`log` calls below ``level`` (DEBUG, INFO, WARN, ERROR, DISABLED)."""
        self.level = level

    def get_dir(self) -> Optional[str]:
        """The log folder, or None for a logger without one."""
        return self.dir

    def close(self) -> None:
        """Close the writers' files."""
        for fmt in self.output_formats:
            fmt.close()
        self.output_formats = []


_current: Optional[Logger] = None


def get_current() -> Logger:
    """The logger the module-level functions use (a stdout-only one until configured)."""
    global _current
    if _current is None:
        writers = [HumanOutputFormat(sys.stdout)] if _launch_rank() == 0 else []
        _current = Logger(None, writers, reduce=dist_util.all_reduce_scalar_means)
    return _current


def _launch_rank() -> int:
    """Rank of this process, from the process group or, before setup, the launcher's env."""
    if dist_util.is_initialized():
        return dist_util.get_rank()
    return dist_util.detect_launch().rank


def _default_dir() -> str:
    folder = os.environ.get("OPENAI_LOGDIR")
    if folder:
        return folder
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S-%f")
    folder = os.path.join("logs", stamp)
    if dist_util.get_world_size() > 1:  # every rank must agree on rank 0's time stamp
        shared = [folder]
        dist.broadcast_object_list(shared, src=0)
        folder = shared[0]
    return folder


def configure(
    dir: Optional[str] = None,
    format_strs: Optional[Sequence[str]] = None,
    log_suffix: str = "",
    reduce: Optional[Reduce] = None,
) -> Logger:
    """
    Make a new current logger and return it.

    :param dir: log folder; default ``$OPENAI_LOGDIR``, else a new ``./logs/<date-time>``.
    :param format_strs: writers to use; default ``$OPENAI_LOG_FORMAT`` or
        ``stdout,log,csv``.
    :param log_suffix: appended to the names of the files written.
    :param reduce: averages logkv_mean values over ranks; default
        :func:`dist_util.all_reduce_scalar_means` (a no-op for one process).
    :raises UserError: for an unknown format.
    """
    global _current
    folder = os.path.expanduser(dir) if dir else _default_dir()
    if format_strs is None:
        format_strs = os.environ.get("OPENAI_LOG_FORMAT", DEFAULT_FORMATS).split(",")
    format_strs = [f.strip() for f in format_strs if f.strip()]
    writers: List[Writer] = []
    if _launch_rank() == 0:
        os.makedirs(folder, exist_ok=True)
        try:
            for fmt in format_strs:
                writers.append(make_output_format(fmt, folder, log_suffix))
        except BaseException:
            for writer in writers:
                writer.close()
            raise
    logger = Logger(folder, writers, reduce or dist_util.all_reduce_scalar_means)
    _current = logger
    logger.log(f"Logging to {folder}")
    return logger


@contextlib.contextmanager
def scoped_configure(
    dir: Optional[str] = None,
    format_strs: Optional[Sequence[str]] = None,
    log_suffix: str = "",
    reduce: Optional[Reduce] = None,
) -> Iterator[Logger]:
    """
    Configure a logger for the duration of a ``with`` block, then close it (and any logger
    configured inside the block) and restore the previous one. Arguments as :func:`configure`.
    """
    global _current
    previous = _current
    logger = configure(dir=dir, format_strs=format_strs, log_suffix=log_suffix, reduce=reduce)
    try:
        yield logger
    finally:
        if _current is not None and _current is not logger and _current is not previous:
            _current.close()
        logger.close()
        _current = previous


def log(*args: Any, level: int = INFO) -> None:
    """Write one line (the args joined by spaces) to stdout and ``log.txt`` on rank 0."""
    get_current().log(*args, level=level)


def debug(*args: Any) -> None:
    """:func:`log` at DEBUG level."""
    log(*args, level=DEBUG)


def info(*args: Any) -> None:
    """:func:`log` at INFO level."""
    log(*args, level=INFO)


def warn(*args: Any) -> None:
    """:func:`log` at WARN level."""
    log(*args, level=WARN)


def error(*args: Any) -> None:
    """:func:`log` at ERROR level."""
    log(*args, level=ERROR)


def set_level(level: int) -> None:
    """Ignore log lines below ``level``."""
    get_current().set_level(level)


def logkv(key: str, val: Any) -> None:
    """Record a value for the next :func:`dumpkvs` (the last value logged wins)."""
    get_current().logkv(key, val)


def logkv_mean(key: str, val: Any) -> None:
    """Add a value to a running mean, averaged over ranks at the next :func:`dumpkvs`."""
    get_current().logkv_mean(key, val)


def logkvs(d: Dict[str, Any]) -> None:
    """:func:`logkv` for every item of ``d``."""
    for key, val in d.items():
        logkv(key, val)


def dumpkvs() -> Dict[str, Any]:
    """Write the buffered values as one row / table and return them."""
    return get_current().dumpkvs()


def getkvs() -> Dict[str, Any]:
    """The values buffered since the last dump."""
    return get_current().name2val


def get_dir() -> Optional[str]:
    """The current log folder (None before :func:`configure`)."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs
