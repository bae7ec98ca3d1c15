"""Skip markers shared by the tests."""
import pytest
import torch


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif(not triton_importable(), reason="needs triton")
