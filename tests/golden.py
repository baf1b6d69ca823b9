"""
The one loader for the golden vectors in tests/fixtures/ (copied from the original
implementation's outputs; see tests/fixtures/README.md). Failures name the file and key.
"""

import os
from functools import lru_cache
from typing import Any

import numpy as np
import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@lru_cache(maxsize=None)
def load_npz(name: str) -> dict:
    """All arrays of ``tests/fixtures/<name>`` as a dict (loaded once per session)."""
    with np.load(os.path.join(FIXTURES, name)) as f:
        return {k: f[k] for k in f.files}


def load_pt(name: str) -> Any:
    """A golden ``.pt`` file, loaded with ``weights_only=True``."""
    return torch.load(os.path.join(FIXTURES, name), weights_only=True)


def golden(name: str, key: str) -> np.ndarray:
    """One golden array; a missing key fails with the file and key named."""
    data = load_npz(name)
    assert key in data, f"golden key {key!r} not in {name}"
    return data[key]


def assert_golden(actual: Any, name: str, key: str, *, rtol: float, atol: float) -> None:
    """Compare a whole array with the golden one at explicit tolerances, naming the key on failure."""
    expected = golden(name, key)
    if isinstance(actual, torch.Tensor):
        actual = actual.detach().cpu().numpy()
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{name}:{key}: shape {actual.shape} != golden {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=f"golden {name}:{key}")
