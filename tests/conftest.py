import os
import sys

import pytest
import torch

# The tests import their helpers (golden.py) from this folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, with one reason, where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same seed; the suite runs on the CPU."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """
    One intra-op thread for a whole test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the suite's tiny models run fastest on one thread, and two threads per process only spin
    against each other on a shared 2-core machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_logger(tmp_path):
    """Every test logs into its own folder (tmp_path/logger, log.txt + progress.csv, no stdout);
    the previous logger is restored afterwards, so no test leaks logger state."""
    from improved_diffusion import logger

    with logger.scoped_configure(dir=str(tmp_path / "logger"), format_strs=["log", "csv"]):
        yield


@pytest.fixture
def isolated(tmp_path):
    """Undo what a script's main() does to this process (:func:`script_loader.main_effects_undone`)."""
    from script_loader import main_effects_undone

    with main_effects_undone(str(tmp_path / "outer_log")):
        yield
