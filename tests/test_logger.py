"""Tests for improved_diffusion.logger (the cross-rank mean over real ranks: test_dist_util)."""

import csv
import io
import os
import subprocess
import sys

import pytest

from improved_diffusion import dist_util, logger
from improved_diffusion.errors import UserError


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.slow
def test_import_does_nothing(tmp_path):
    code = (
        "import os; from improved_diffusion import logger; "
        "assert logger._current is None; assert os.listdir('.') == [], os.listdir('.')"
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, OPENAI_LOGDIR=str(cwd / "should_not_exist"))
    subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, check=True, timeout=60)
    assert os.listdir(cwd) == []


def test_three_formats_hold_the_values(tmp_path, capsys):
    with logger.scoped_configure(dir=str(tmp_path), format_strs=["stdout", "log", "csv"]) as lg:
        assert logger.get_current() is lg and logger.get_dir() == str(tmp_path)
        logger.logkv("step", 3)
        logger.logkv_mean("loss", 1.0)
        logger.logkv_mean("loss", 2.0)
        logger.logkvs({"lr": 0.5})
        assert logger.getkvs() == {"step": 3, "loss": 1.5, "lr": 0.5}
        assert logger.dumpkvs() == {"step": 3, "loss": 1.5, "lr": 0.5}
        assert logger.getkvs() == {}
        logger.log("hello", 42)
    out = capsys.readouterr().out
    table = "-------------------\n| loss | 1.5      |\n| lr   | 0.5      |\n| step | 3        |\n-------------------\n"
    assert out == f"Logging to {tmp_path}\n" + table + "hello 42\n"
    with open(tmp_path / "log.txt") as f:
        assert f.read() == out
    assert read_csv(tmp_path / "progress.csv") == [["loss", "lr", "step"], ["1.5", "0.5", "3"]]


def test_table_formats_floats_tensors_and_long_keys():
    stream = io.StringIO()
    writer = logger.HumanOutputFormat(stream)
    torch = pytest.importorskip("torch")
    writer.writekvs({"k" * 40: torch.tensor(0.123456), "n": 100000, "s": "text"})
    lines = stream.getvalue().splitlines()
    assert lines[1] == "| " + "k" * 27 + "... | 0.123    |"
    assert lines[2] == "| n" + " " * 29 + " | 100000   |"
    assert lines[3] == "| s" + " " * 29 + " | text     |"
    assert lines[0] == lines[-1] == "-" * len(lines[1])


def test_csv_keys_appearing_later_extend_the_header(tmp_path):
    path = str(tmp_path / "progress.csv")
    writer = logger.CSVOutputFormat(path)
    writer.writekvs({"b": 1, "a": 2})
    writer.writekvs({"a": 3, "c": 4.5})
    writer.writekvs({"b": 5})
    writer.close()
    expected = [["a", "b"], ["2", "1"], ["3", "", "4.5"], ["", "5", ""]]
    expected[0].append("c")
    expected[1].append("")
    assert read_csv(path) == expected
    # A resumed run continues the file instead of overwriting it.
    writer = logger.CSVOutputFormat(path)
    writer.writekvs({"c": 6, "d": 7})
    writer.close()
    assert read_csv(path) == [
        ["a", "b", "c", "d"],
        ["2", "1", "", ""],
        ["3", "", "4.5", ""],
        ["", "5", "", ""],
        ["", "", "6", "7"],
    ]


def test_writers_accept_streams():
    stream = io.StringIO()
    lg = logger.Logger(None, [logger.CSVOutputFormat(stream), logger.JSONOutputFormat(stream)])
    lg.logkv("x", 1)
    lg.dumpkvs()
    lg.close()  # flushes but does not close a stream it was given
    assert stream.getvalue() == 'x\n1\n{"x": 1}\n'


def test_folder_choice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "from_env"))
    with logger.scoped_configure(dir=str(tmp_path / "explicit"), format_strs=["log"]):
        assert logger.get_dir() == str(tmp_path / "explicit")
    with logger.scoped_configure(format_strs=["log"]):
        assert logger.get_dir() == str(tmp_path / "from_env")
        with open(tmp_path / "from_env" / "log.txt") as f:
            assert f.read() == f"Logging to {tmp_path / 'from_env'}\n"
    monkeypatch.delenv("OPENAI_LOGDIR")
    with logger.scoped_configure(format_strs=["csv"]):
        folder = logger.get_dir()
    assert os.path.dirname(folder) == "logs"
    assert os.listdir(tmp_path / "logs") == [os.path.basename(folder)]
    assert len(os.path.basename(folder)) == len("2026-11-25-14-03-07-123456")


def test_scoped_configure_restores_and_closes(tmp_path):
    before = logger.get_current()
    with logger.scoped_configure(dir=str(tmp_path / "a"), format_strs=["log"]) as outer:
        inner = logger.configure(dir=str(tmp_path / "b"), format_strs=["log"])
        assert logger.get_current() is inner
        inner_file = inner.output_formats[0].file
        outer_file = outer.output_formats[0].file
    assert logger.get_current() is before
    assert inner_file.closed and outer_file.closed


def test_mean_is_weighted_by_counts_through_reduce(tmp_path):
    """A fake reduce standing for a second rank that logged 3 values with mean 4.0."""
    calls = []

    def reduce(means, counts):
        calls.append((dict(means), dict(counts)))
        return {k: (means[k] * counts[k] + 4.0 * 3) / (counts[k] + 3) for k in means}

    with logger.scoped_configure(dir=str(tmp_path), format_strs=["csv"], reduce=reduce):
        logger.logkv_mean("loss", 1.0)
        logger.logkv_mean("loss", 2.0)
        logger.logkv("step", 1)
        values = logger.dumpkvs()
    assert calls == [({"loss": 1.5}, {"loss": 2.0})]
    assert values == {"loss": (1.5 * 2 + 12.0) / 5, "step": 1}
    assert read_csv(tmp_path / "progress.csv") == [["loss", "step"], ["3.0", "1"]]


def test_logkv_replaces_a_running_mean():
    lg = logger.Logger(None, [], reduce=dist_util.all_reduce_scalar_means)
    lg.logkv_mean("x", 1.0)
    lg.logkv("x", 10.0)
    lg.logkv_mean("y", 3.0)
    assert lg.dumpkvs() == {"x": 10.0, "y": 3.0}


def test_levels(tmp_path):
    stream = io.StringIO()
    lg = logger.Logger(None, [logger.HumanOutputFormat(stream)])
    lg.set_level(logger.WARN)
    lg.log("quiet", level=logger.INFO)
    lg.log("loud", level=logger.ERROR)
    assert stream.getvalue() == "loud\n"


def test_other_ranks_write_nothing(tmp_path, monkeypatch, capsys):
    if dist_util.is_initialized():
        pytest.skip("a process group is initialised in this process")
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    with logger.scoped_configure(dir=str(tmp_path / "r1"), format_strs=["stdout", "log", "csv"]):
        logger.log("secret")
        logger.logkv("a", 1)
        assert logger.dumpkvs() == {"a": 1}
        assert logger.get_dir() == str(tmp_path / "r1")
    assert not (tmp_path / "r1").exists()
    assert capsys.readouterr().out == ""


def test_unknown_format_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown log format 'xml'; expected one of stdout, log"):
        logger.configure(dir=str(tmp_path), format_strs=["log", "xml"])


def test_tensorboard_needs_its_package(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs the tensorboard package"):
            logger.configure(dir=str(tmp_path), format_strs=["tensorboard"])
    else:
        with logger.scoped_configure(dir=str(tmp_path), format_strs=["tensorboard"]):
            logger.logkv("x", 1.0)
            logger.dumpkvs()
        assert os.listdir(tmp_path / "tb")


def test_original_aliases():
    assert logger.record_tabular is logger.logkv
    assert logger.dump_tabular is logger.dumpkvs
