import os

# The Triton interpreter is chosen when @triton.jit runs (module import): set it before any
# kernel module is imported, and never on a machine with a GPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


#: test folders (and files elsewhere) that run on one CPU thread without datasets' progress
#: bars: their tiny models are faster so, and resume- and step-equality checks need one
#: summation order
ONE_THREAD_DIRS = ("pipeline", "integrations")
ONE_THREAD_FILES = ("test_trainer.py", "test_trainer_faults.py", "test_trainer_recovery.py")


@pytest.fixture(autouse=True)
def _one_thread(request):
    if request.node.path.parent.name not in ONE_THREAD_DIRS and \
            request.node.path.name not in ONE_THREAD_FILES:
        yield
        return
    import datasets

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def nan_poison(monkeypatch):
    """Every floating ``torch.empty`` / ``empty_like`` / ``Tensor.new_empty`` is NaN-filled, in
    every test.

    Kernels and backends allocate outputs with these; an element one forgets to write then
    shows up as NaN and fails the oracle loudly instead of passing on leftover memory.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like
    real_new_empty = torch.Tensor.new_empty

    def _poison(t):
        if t.dtype.is_floating_point:
            with torch.no_grad():       # a leaf made with requires_grad=True (checkpointing's)
                t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *a, **k: _poison(real_new_empty(self, *a, **k)))
    yield
