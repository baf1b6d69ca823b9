"""
The one loader for the golden vectors in tests/fixtures/ (copied from the original
implementation's outputs; see tests/fixtures/README.md). Failures name the file and key.
"""

import os
from functools import lru_cache
from typing import Any

import numpy as np
import torch

# The 13 float64 per-timestep arrays a diffusion keeps, in the golden README's order.
SCHEDULE_ARRAYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

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
