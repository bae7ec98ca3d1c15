"""Which device each torchrun process takes: an explicit CUDA device that is not here, or more
processes than GPUs, is a one-line error before any process group exists."""
import pytest
import torch

from tisdpo.train.config import DistributedConfig
from tisdpo.train.parallel import setup


def test_a_device_the_processes_cannot_have_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # cuda asked, none here
    with pytest.raises(ValueError, match="device='cuda' under distributed.mode='ddp': CUDA"):
        setup(DistributedConfig(mode="ddp"), device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)    # one GPU, two processes
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="LOCAL_RANK=1: this machine has 1 CUDA device"):
        setup(DistributedConfig(mode="ddp"), device="auto")
    assert not torch.distributed.is_initialized()            # nothing was set up
