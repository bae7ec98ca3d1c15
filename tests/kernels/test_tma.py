"""The fused head kernels with the weight loaded, and the backward's dz slab stored, through
tensor descriptors (Hopper's tensor memory accelerator, TMA; ``TISDPO_TMA``,
tisdpo_kernels/_triton/common.py ``tma``).

On an H100/H200 ``TISDPO_TMA=auto`` takes this path for every weight whose layout allows it;
elsewhere ``TISDPO_TMA=1`` forces it (the interpreter emulates descriptors: out-of-range rows
and columns read as zeros). Each case checks that descriptors really were passed, then the
oracle (tests/numerics.py). The compiled sm_90 code is checked for bulk tensor copies without
a GPU (tests/aot.py).
"""
from functools import partial

import pytest
import torch

from head_cases import (
    check_three_way, kl_case, logprobs_case, run_kl, run_logprobs, several_slabs,
)
from markers import requires_triton

pytestmark = requires_triton

VARIANTS = [(False, None), (True, None), (False, 4.0), (True, 2.5)]
VARIANT_IDS = ["plain", "bias", "softcap", "bias+softcap"]
DTYPES = [torch.float32, torch.bfloat16]
DT_IDS = ["fp32", "bf16"]


@pytest.fixture
def descriptors(monkeypatch):
    """TISDPO_TMA=1, and a list that records the block shape of every descriptor launched."""
    from tisdpo_kernels._triton import common
    monkeypatch.setenv("TISDPO_TMA", "1")
    made = []
    real = common._descriptor

    def spy(w, block_shape):
        made.append(tuple(block_shape))
        return real(w, block_shape)

    monkeypatch.setattr(common, "_descriptor", spy)
    return made


def _logprobs_blocks(fwd_v=128):
    """GPU-like blocks within a TMA box: several token blocks, four vocabulary splits, a
    partial last D step (D = 40 in steps of 32)."""
    from tisdpo_kernels._triton import configs as C
    return C.override(
        linear_logprobs_fwd=C.KernelConfig({"BLOCK_N": 64, "BLOCK_V": fwd_v, "BLOCK_D": 32},
                                           host={"min_splits": 4}),
        linear_logprobs_fwd_combine=C.KernelConfig({"BLOCK_N": 64}),
        linear_logprobs_bwd=C.KernelConfig({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32,
                                            "GROUP_N": 3}))


def _kl_blocks():
    from tisdpo_kernels._triton import configs as C
    blk = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 16}
    return C.override(
        linear_token_kl_fwd=C.KernelConfig(blk, host={"min_splits": 3}),
        linear_token_kl_fwd_combine=C.KernelConfig({"BLOCK_N": 64}),
        linear_token_kl_bwd=C.KernelConfig(dict(blk, GROUP_N=2)))


@pytest.mark.parametrize("bias,softcap", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_logprobs_through_descriptors(dtype, bias, softcap, device, descriptors):
    """V = 1001 (the last tile 103 columns past V; dz rows padded to 16 bytes), ignored rows
    packing whole token blocks away: both passes take the weight, the backward stores dz,
    by descriptor."""
    masters, y, grads = logprobs_case(200, 40, 1001, bias=bias,
                                      ignored=list(range(30, 110)) + [199])
    with _logprobs_blocks():
        check_three_way(run_logprobs, "triton", masters, y, grads, dtype=dtype, device=device,
                        softcap=softcap, check_dtypes=True)
    assert (128, 32) in descriptors and (64, 128) in descriptors, descriptors   # W, dz


@pytest.mark.parametrize("direction", ["policy_ref", "ref_policy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_token_kl_through_descriptors(dtype, direction, device, descriptors):
    """Both heads by descriptor (D = 40 and D' = 24: the reference's last D step partial)."""
    masters, y, grads = kl_case(150, 40, 24, 300, ref_bias=True,
                                zeros=(slice(None, None, 5), slice(1, None, 4)))
    with _kl_blocks():
        check_three_way(run_kl, "triton", masters, y, grads, dtype=dtype, device=device,
                        direction=direction, softcap=3.0, check_dtypes=True)
    assert descriptors.count((64, 16)) >= 4, descriptors    # two heads × (forward, backward)
    assert (64, 64) in descriptors, descriptors              # the backward's dz slab


@pytest.mark.parametrize("op", ["linear_logprobs", "linear_token_kl"])
def test_column_bands_through_descriptors(op, device, descriptors, monkeypatch):
    """A backward in bands of vocabulary columns: each band's descriptor is built on the
    head's slice of rows v0..v0+W (its own bounds), and the oracle holds."""
    n, v = several_slabs(monkeypatch, "columns", d=40)
    if op == "linear_logprobs":
        masters, y, grads = logprobs_case(n, 40, v, ignored=(0, 7, 299))
        with _logprobs_blocks():
            check_three_way(run_logprobs, "triton", masters, y, grads, dtype=torch.bfloat16,
                            device=device, softcap=3.0, check_dtypes=True)
    else:
        masters, y, grads = kl_case(n, 40, 24, v, ref_bias=True, ignored=(0, 7, 299))
        with _kl_blocks():
            check_three_way(run_kl, "triton", masters, y, grads, dtype=torch.bfloat16,
                            device=device, direction="policy_ref", softcap=3.0,
                            check_dtypes=True)
    assert descriptors, "no descriptor was launched"


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter emulation only")
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_descriptor_loads_equal_pointer_loads_bit_for_bit(dtype, monkeypatch):
    """The interpreter feeds the same tiles to the same dots either way, so the results must
    be identical: a wrong descriptor offset or block shape cannot hide in the tolerance."""
    masters, y, grads = logprobs_case(150, 48, 701, ignored=(0, 7, 149))
    run = partial(run_logprobs, "triton", masters, y, grads, dtype=dtype, softcap=5.0)
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("TISDPO_TMA", mode)
        with _logprobs_blocks():
            out[mode] = run()
    for k in out["0"]:
        assert torch.equal(out["0"][k], out["1"][k]), k


def test_which_layouts_take_descriptors(monkeypatch):
    from tisdpo_kernels._triton.common import tma
    cpu = torch.empty(1)
    w = torch.randn(100, 48)
    for mode, on in (("auto", False), ("0", False), ("1", True), ("", False)):
        monkeypatch.setenv("TISDPO_TMA", mode)
        assert tma(cpu, w) is on, mode          # auto: Hopper only, so never on a CPU
    monkeypatch.setenv("TISDPO_TMA", "1")
    assert tma(cpu, w.bfloat16(), torch.randn(7, 8))
    assert not tma(cpu, torch.randn(100, 31))                   # rows 124 B apart
    assert not tma(cpu, torch.randn(48, 100).t())               # inner stride 48
    assert not tma(cpu, torch.randn(4801).narrow(0, 1, 4800).view(100, 48))  # base +4 B
    assert not tma(cpu, torch.randn(0, 48))
    assert not tma(cpu, torch.randn(1, 48).expand(100, 48))     # every row the same memory
    assert not tma(cpu, w, torch.randn(10, 7))                  # one head unfit: neither
    monkeypatch.setenv("TISDPO_TMA", "sometimes")
    with pytest.raises(ValueError, match="TISDPO_TMA"):
        tma(cpu, w)


def test_unfit_layout_and_oversized_box_fall_back_to_pointers(device, descriptors):
    """Odd D, or a config block beyond a TMA box (256), launch with pointer loads, correctly."""
    import tisdpo_kernels as tk
    h, w = torch.randn(70, 31, device=device), torch.randn(300, 31, device=device)
    y = torch.randint(0, 300, (70,), device=device)
    ref = tk.linear_logprobs(h, w, y, impl="reference")
    with _logprobs_blocks():
        torch.testing.assert_close(tk.linear_logprobs(h, w, y, impl="triton"), ref)
    assert descriptors == []
    h, w = torch.randn(70, 32, device=device), torch.randn(600, 32, device=device)
    y = torch.randint(0, 600, (70,), device=device)
    with _logprobs_blocks(fwd_v=512):
        torch.testing.assert_close(tk.linear_logprobs(h, w, y, impl="triton"),
                                   tk.linear_logprobs(h, w, y, impl="reference"))
    assert descriptors == []


def test_autotune_hook_sizes_each_descriptor_to_the_config():
    from triton.tools.tensor_descriptor import TensorDescriptor

    from tisdpo_kernels._triton.common import _descriptor, _set_block_shapes
    w = torch.randn(64, 32)
    nargs = {"w_ptr": _descriptor(w, [16, 16]), "b_ptr": w, "BLOCK_V": 32, "BLOCK_D": 16}
    _set_block_shapes((("w_ptr", ("BLOCK_V", "BLOCK_D")), ("b_ptr", ("BLOCK_V",))))(nargs)
    assert isinstance(nargs["w_ptr"], TensorDescriptor)
    assert nargs["w_ptr"].block_shape == [32, 16] and nargs["b_ptr"] is w


# --- the sm_90 build, checked without a GPU ----------------------------------------------


def _aot_token_kl():
    """linear_token_kl's forward and backward with their sm90 configs, both heads (and the dz
    slab) by descriptor, compiled for sm_90 in bf16: [(name, shared, ptx, regs, spills)]."""
    from aot import compile_kernel, head_ptr_type

    from tisdpo_kernels._triton import linear_token_kl as K
    from tisdpo_kernels._triton.configs import CONFIGS

    out = []
    for name, fn, extra in (("fwd", K.linear_token_kl_fwd_kernel, {"FINAL": False}),
                            ("bwd", K.linear_token_kl_bwd_kernel, {})):
        cfg = CONFIGS[f"linear_token_kl_{name}"]["sm90"]
        cx = dict(HAS_BIAS=True, HAS_REF_BIAS=True, HAS_SOFTCAP=True, POLICY_REF=True,
                  UPCAST=False, DOT_PRECISION="ieee", TMA=True, stride_hd=1, stride_wd=1,
                  stride_hrd=1, stride_wrd=1, **extra, **cfg.meta)
        out.append((name, *compile_kernel(fn, 90, cx, head_ptr_type(cx, "bf16"),
                                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real tests compile them")
def test_token_kl_compiles_with_tma_for_hopper():
    """(linear_logprobs' TMA builds are in test_linear_logprobs_triton's compile matrix.)"""
    from aot import ATOMIC, SMEM_LIMIT, offline

    for name, shared, ptx, regs, spills in offline(__file__, "_aot_token_kl", timeout=600):
        assert shared <= SMEM_LIMIT[90], f"{name}: {shared} B shared memory"
        assert "cp.async.bulk.tensor" in ptx, f"{name}: no TMA load"
        assert "wgmma" in ptx, f"{name}: no wgmma"
        assert spills == 0, f"{name}: {spills} bytes of register spills ({regs} registers)"
        if name == "bwd":
            assert ATOMIC.search(ptx) is None, f"{name}: atomic instruction"
