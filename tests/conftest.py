"""Fixtures every test gets; shared helpers live in helpers.py.

torch is imported inside the hooks and fixtures, not here: under pytest-xdist this file is also loaded by
the controller process, which runs no test and should not spend seconds importing torch before the workers
start.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Each xdist worker gets one core: torch's own threads would otherwise fight over the two.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_random_weights() -> None:
    """Every test starts from the same random state, so random weights cannot make a test flaky."""
    import torch

    torch.manual_seed(0)


@pytest.fixture
def images():  # noqa: ANN201  (a torch.Tensor; torch is not imported at module level, see above)
    """A batch of two odd-sized images, so rounding in strides and pooling shows up."""
    import torch

    return torch.randn(2, 3, 97, 130, generator=torch.Generator().manual_seed(1))
