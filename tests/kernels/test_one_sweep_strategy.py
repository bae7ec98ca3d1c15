"""How ``strategy="auto"`` picks between the one-sweep head and the recompute path
(``tisdpo_kernels.strategy``, docs/ONE_SWEEP.md): from shapes, host metadata and free memory,
read off stand-in CUDA tensors, at the default chunk sizes."""
import math

import pytest
import torch

from markers import triton_importable
from tisdpo_kernels import get_preset
from tisdpo_kernels import strategy as S

pytestmark = pytest.mark.skipif(not triton_importable(), reason="needs triton")


@pytest.fixture(autouse=True)
def _default_chunks(monkeypatch):
    monkeypatch.delenv("TISDPO_CHUNK_TOKENS", raising=False)
    monkeypatch.delenv("TISDPO_AUTOTUNE", raising=False)
    monkeypatch.delenv("TISDPO_ONE_SWEEP_MIN_TOKENS", raising=False)
    monkeypatch.delenv("TISDPO_DZ_MB", raising=False)


class _Stub:
    """Just what ``choose_strategy`` reads of a bf16 CUDA tensor: device, dtype, shape, sizes."""

    def __init__(self, *shape, requires_grad=True, dtype=torch.bfloat16):
        self.shape, self.device = torch.Size(shape), torch.device("cuda")
        self.dtype = dtype
        self.requires_grad = requires_grad

    def numel(self):
        return math.prod(self.shape)

    def element_size(self):
        return 2


@pytest.mark.parametrize("tokens_per_pair,pairs,free_gb,method,impl,expect", [
    (8192, 1, 80, "tisdpo", "auto", "one_sweep"),
    (2048, 4, 80, "tdpo2", "torch", "one_sweep"),       # longer than a torch chunk (523 rows)
    (2046, 4, 80, "tisdpo", "torch", "recompute"),      # ... and below the threshold
    (512, 16, 80, "tisdpo", "torch", "one_sweep"),      # whole in a chunk: no fold to pay for
    (2046, 4, 80, "tisdpo", "auto", "one_sweep"),       # whole in a Triton chunk (4176 rows)
    (8192, 1, 1, "tisdpo", "auto", "recompute"),        # not enough free memory
    (8192, 1, 80, "tisdpo", "triton", "one_sweep"),     # cuBLAS + the Triton epilogue
    (8192, 1, 80, "tisdpo", "reference", "recompute"),  # the oracle never sweeps
    (8192, 1, 80, "cdpo_code", "auto", "recompute"),    # no per-pair scalar
])
def test_auto_rule(tokens_per_pair, pairs, free_gb, method, impl, expect, monkeypatch):
    monkeypatch.setattr(S, "device_free_bytes", lambda dev: free_gb << 30)
    hidden = _Stub(2 * pairs, tokens_per_pair // 2, 4096)
    weight = _Stub(128256, 4096)
    cfg = get_preset(method).config
    assert S.choose_strategy("auto", cfg, hidden=hidden, weight=weight, impl=impl) == expect
    # the threshold moves only pairs longer than a chunk
    triton = impl in ("auto", "triton")
    longer = tokens_per_pair > S.sweep_chunk_rows(hidden.numel() // 4096, 128256,
                                                  2 if triton else None)
    assert longer == (tokens_per_pair == 8192 or not triton and tokens_per_pair > 523)
    monkeypatch.setenv("TISDPO_ONE_SWEEP_MIN_TOKENS", str(tokens_per_pair + 1))
    assert S.choose_strategy("auto", cfg, hidden=hidden, weight=weight, impl=impl) == \
        ("recompute" if longer else expect)


def test_auto_rule_counts_the_reference_head_in_the_chunk(monkeypatch):
    """Pairs of 3000 tokens fit a Triton chunk of the policy head's logits (4176 rows at
    V = 128256 in bf16) but not one that also holds a reference head's (2080 rows): below
    the threshold, only the first goes one_sweep."""
    monkeypatch.setattr(S, "device_free_bytes", lambda dev: 80 << 30)
    monkeypatch.setenv("TISDPO_ONE_SWEEP_MIN_TOKENS", "3001")
    hidden, weight = _Stub(8, 1500, 4096), _Stub(128256, 4096)
    cfg = get_preset("tisdpo").config
    pick = lambda ref: S.choose_strategy("auto", cfg, hidden=hidden, weight=weight,  # noqa
                                         impl="triton", ref_hidden=ref)
    assert S.sweep_chunk_rows(12000, 128256, 4) == 2080
    assert pick(None) == "one_sweep" and pick(_Stub(8, 1500, 4096)) == "recompute"
    # under autotuning e has a buffer of its own: the same 4 bytes per logit, as the sweep
    # sizes its chunk (a pair of 3000 tokens then runs in two chunks, with a fold)
    monkeypatch.setenv("TISDPO_AUTOTUNE", "1")
    assert pick(None) == "recompute"
    monkeypatch.setenv("TISDPO_ONE_SWEEP_MIN_TOKENS", "3000")
    need = S.one_sweep_bytes(12000, 4, 128256, 4096, 2, 4)
    assert need == 12000 * 4096 * 2 + 2 * 128256 * 4096 * 4 + 2080 * 128256 * 4
    monkeypatch.setattr(S, "device_free_bytes", lambda dev: need - 1)
    assert pick(None) == "recompute"
    monkeypatch.setattr(S, "device_free_bytes", lambda dev: need)
    assert pick(None) == "one_sweep"


def test_auto_rule_packed_and_cpu(monkeypatch):
    monkeypatch.setattr(S, "device_free_bytes", lambda dev: 80 << 30)
    cfg = get_preset("tisdpo").config
    hidden, weight = _Stub(16384, 4096), _Stub(128256, 4096)
    off = torch.tensor([0, 4096, 8192, 12288, 16384])
    pick = lambda prs, o=off: S.choose_strategy("auto", cfg, hidden=hidden, weight=weight,  # noqa
                                                seq_offsets=o, pairs=prs)
    assert pick(torch.tensor([[0, 1], [2, 3]])) == "one_sweep"
    assert pick(torch.tensor([[0, 1], [2, 1]])) == "recompute"   # a sequence in two pairs
    assert pick(torch.tensor([[0, 1], [2, 3]]), off.to("meta")) == "recompute"   # off the host
    hidden.requires_grad = weight.requires_grad = False
    assert pick(torch.tensor([[0, 1], [2, 3]])) == "recompute"   # no gradient wanted
    h = torch.zeros(2, 8192, 8, requires_grad=True)               # CPU: never one_sweep
    assert S.choose_strategy("auto", cfg, hidden=h, weight=torch.zeros(64, 8)) == "recompute"


def test_auto_never_sweeps_float16(monkeypatch):
    """float16 gradients formed before the loss scale would underflow: auto recomputes, an
    explicit one_sweep is refused (bfloat16 at the same shapes sweeps)."""
    monkeypatch.setattr(S, "device_free_bytes", lambda dev: 80 << 30)
    cfg = get_preset("tisdpo").config
    weight = _Stub(128256, 4096)
    for dtype, expect in ((torch.bfloat16, "one_sweep"), (torch.float16, "recompute")):
        hidden = _Stub(2, 4096, 4096, dtype=dtype)
        assert S.choose_strategy("auto", cfg, hidden=hidden, weight=weight) == expect
    with pytest.raises(ValueError, match="float16"):
        S.choose_strategy("one_sweep", cfg, hidden=hidden, weight=weight)
    hidden.requires_grad = weight.requires_grad = False               # no gradient: no harm
    assert S.choose_strategy("one_sweep", cfg, hidden=hidden, weight=weight) == "one_sweep"


@pytest.mark.parametrize("impl,expect", [("triton", "one_sweep"), ("auto", "one_sweep"),
                                         ("torch", "recompute")])
def test_auto_counts_the_epilogue_buffers(impl, expect, monkeypatch):
    """3.25 GiB free at V = 128256, D = 4096, one pair of 8192 tokens: beside d_hidden and the
    fp32 d_weight, the Triton backend's chunk (the 1 GiB TISDPO_DZ_MB budget) fits, the torch
    backend's six fp32 523 × V buffers (1.5 GiB) do not."""
    monkeypatch.setattr(S, "device_free_bytes", lambda dev: 13 << 28)
    hidden, weight = _Stub(2, 4096, 4096), _Stub(128256, 4096)
    cfg = get_preset("tisdpo").config
    assert S.choose_strategy("auto", cfg, hidden=hidden, weight=weight, impl=impl) == expect
