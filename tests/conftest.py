"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Every test on one torch thread: the models here are tiny, where a second thread
    only adds synchronisation, and on a shared 2-core machine it can slow a test tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
