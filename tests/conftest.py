"""Fixtures every test gets; shared helpers live in helpers.py."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Each xdist worker gets one core: torch's own threads would otherwise fight over the two.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Property tests draw the same examples on every run, so CI cannot turn red on a new random draw.
# `pytest --hypothesis-profile default` draws afresh, to search for new failures.
settings.register_profile("reproducible", derandomize=True)
settings.load_profile("reproducible")


@pytest.fixture(autouse=True)
def _deterministic_random_weights() -> None:
    """Every test starts from the same random state, so random weights cannot make a test flaky."""
    torch.manual_seed(0)


@pytest.fixture
def images() -> torch.Tensor:
    """A batch of two odd-sized images, so rounding in strides and pooling shows up."""
    return torch.randn(2, 3, 97, 130, generator=torch.Generator().manual_seed(1))
