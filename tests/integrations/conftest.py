"""Integration tests run on one CPU thread (tiny models; step-for-step equality with TRL needs
one summation order on both sides) and without datasets' progress bars."""
import datasets
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    yield
    torch.set_num_threads(n)
