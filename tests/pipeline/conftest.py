"""Pipeline tests run on one CPU thread (the tiny models are faster so, and resume-equality
checks need one summation order) and without datasets' progress bars."""
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
