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
def triton_blocker() -> str | None:
    """Why Triton kernels cannot run here (no package; on CPU, an unusable interpreter)."""
    if not triton_importable():
        return "needs triton"
    if torch.cuda.is_available():
        return None
    from tisdpo_kernels._impl import interpreter_blocker
    return interpreter_blocker()


requires_triton = pytest.mark.skipif(triton_blocker() is not None,
                                     reason=triton_blocker() or "")
