"""Rules both backends share (tisdpo_kernels/_common.py): the float32 gradient accumulator."""
import pytest
import torch
from markers import requires_cuda
from numerics import assert_oracle, sum_magnitude

from tisdpo_kernels._common import addmm_f32_, stat_dtype


def _case(dtype, device):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 53, generator=g).to(dtype).to(device)
    b = torch.randn(53, 29, generator=g).to(dtype).to(device)
    acc = torch.randn(37, 29, generator=g).to(device)
    return a, b, acc


def _check(dtype, device):
    a, b, acc = _case(dtype, device)
    truth = acc.double() + a.double() @ b.double()
    eager = acc + a.float() @ b.float()
    out = addmm_f32_(acc.clone(), a, b)
    assert out.dtype == torch.float32
    terms = a.double().abs().unsqueeze(-1) * b.double().abs().unsqueeze(0)   # [37, 53, 29]
    assert_oracle(out, eager, truth, dtype=dtype, name="acc + a@b",
                  magnitude=sum_magnitude(terms, dim=1) + acc.double().abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_addmm_f32_on_cpu(dtype):
    _check(dtype, torch.device("cpu"))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_addmm_f32_on_cuda_accumulates_16_bit_products_in_fp32(dtype):
    _check(dtype, torch.device("cuda"))


def test_stat_dtype():
    assert stat_dtype(torch.float64) == torch.float64
    assert all(stat_dtype(t) == torch.float32 for t in (torch.float32, torch.bfloat16,
                                                        torch.float16))
