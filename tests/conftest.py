"""Test-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny shapes: one thread is fastest, and OpenMP threads spin badly on a shared, busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
