"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Every model in the suite is tiny: with several threads, and anything else running on a small
    # CPU, synchronisation costs far more than the arithmetic (up to ~100x measured on 2 cores).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
