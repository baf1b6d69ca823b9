import os
import sys

import pytest
import torch

# The tests import their helpers (golden.py) from this folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same seed; the suite runs on the CPU."""
    torch.manual_seed(0)
    yield
