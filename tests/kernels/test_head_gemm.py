"""TISDPO_HEAD_LOGITS=gemm: the Triton ``linear_logprobs`` and ``linear_token_kl`` with their
logits written by a GEMM (cuBLAS on CUDA) a chunk at a time, then read by the same kernels,
against the oracle.

The logits are rounded to the input dtype, as eager rounds them; the oracle's eager term
(tests/numerics.py) carries that rounding, so the bounds are the fused kernels' own.
"""

from functools import partial

import pytest
import torch

from dispatch_probe import OpProbe
from head_cases import (
    check_three_way, kl_case, logprobs_case, run_kl, run_logprobs, several_slabs,
)
from markers import requires_triton

pytestmark = requires_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]
check = partial(check_three_way, run_logprobs, "triton", check_dtypes=True)
check_kl = partial(check_three_way, run_kl, "triton", check_dtypes=True)


@pytest.fixture(autouse=True)
def gemm_logits(monkeypatch):
    monkeypatch.setenv("TISDPO_HEAD_LOGITS", "gemm")


@pytest.mark.parametrize("bias,softcap,scale", [
    (False, None, 2.0), (True, None, 2.0), (True, 2.5, 2.0), (True, None, 40.0),
], ids=["plain", "bias", "bias+softcap", "large-logits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_matches_oracle(dtype, bias, softcap, scale, device):
    masters, y, grads = logprobs_case(47, 31, 123, bias=bias, scale=scale)
    check(masters, y, grads, dtype=dtype, device=device, softcap=softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemm_writes_a_padded_slab_in_place(dtype):
    """V = 123 is not a multiple of 16 bytes, so the slab's rows are padded: the GEMM writes
    the view in place (no [C, V] temporary beside it), bit for bit the logits eager forms."""
    from tisdpo_kernels._triton.slabs import dz_slab, gemm_logits
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 16, generator=g).to(dtype), torch.randn(123, 16, generator=g).to(dtype)
    rows = torch.tensor([0, 3, 5, 8])
    out = dz_slab(4, 123, dtype, "cpu")
    assert not out.is_contiguous()
    with OpProbe() as probe:
        gemm_logits(h[rows], w, out)
    assert probe.peak_live_bytes < out.numel() * out.element_size(), probe.ops
    assert torch.equal(out, h[rows] @ w.T)


def _small_blocks(op="linear_logprobs"):
    """GPU-like launches of ``op``'s kernels under the interpreter: several token blocks, 4
    vocabulary splits and their combine in every chunk, several vocabulary tiles in backward."""
    from tisdpo_kernels._triton import configs as C
    return C.override(**{
        f"{op}_fwd_z": C.KernelConfig({"BLOCK_N": 32, "BLOCK_V": 128, "BLOCK_D": 16},
                                      host={"min_splits": 4}),
        f"{op}_fwd_combine": C.KernelConfig({"BLOCK_N": 32}),
        f"{op}_bwd_z": C.KernelConfig({"BLOCK_N": 32, "BLOCK_V": 128, "BLOCK_D": 16,
                                       "GROUP_N": 2}),
    })


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_several_chunks_splits_and_packed_rows(dtype, device, monkeypatch):
    """TISDPO_DZ_MB=1: forward in chunks of 224 rows, so the second chunk holds the last 4 of
    the 228 kept rows and then only rows past the kept count; each forward chunk split four
    ways; a run of ignored rows packed away. The backward (N < V) runs in bands of columns."""
    from tisdpo_kernels._triton.slabs import dz_chunk_rows
    monkeypatch.setenv("TISDPO_DZ_MB", "1")
    assert dz_chunk_rows(300, 1100, 4) == 224
    masters, y, grads = logprobs_case(300, 40, 1100, ignored=list(range(60, 130)) + [0, 299])
    with _small_blocks():
        check(masters, y, grads, dtype=dtype, device=device, softcap=3.0)


@pytest.mark.parametrize("kind", ["rows", "columns"])
@pytest.mark.parametrize("op", ["linear_logprobs", "linear_token_kl"])
def test_backward_slabs_of_each_kind(op, kind, device, monkeypatch):
    """The backward's dz slabs as chunks of rows (N ≥ V) or bands of columns (N < V), each
    slab's logits (both heads' for the KL head, sharing the budget) written by GEMMs first."""
    extra = 4 if op == "linear_token_kl" else 0
    n, v = several_slabs(monkeypatch, kind, extra=extra)
    if extra:
        masters, y, grads = _kl_inputs(n, v, ignored=[0, 7, 299])
        check_kl(masters, y, grads, dtype=torch.bfloat16, device=device,
                 direction="policy_ref", softcap=3.0)
    else:
        masters, y, grads = logprobs_case(n, 31, v, ignored=[0, 7, 299])
        check(masters, y, grads, dtype=torch.bfloat16, device=device, softcap=3.0)


def _backward_call(op, n, d, dr, v, device):
    """``op``'s backward launcher with its arguments after the forward (every gradient of the
    policy head but the bias; KL(π‖ref) for the KL head), on a float32 n × v case with
    ignored rows: call it to run the backward."""
    from tisdpo_kernels._triton import linear_logprobs as L
    from tisdpo_kernels._triton import linear_token_kl as K
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / 5
    hr, wr = torch.randn(n, dr, generator=g), torch.randn(v, dr, generator=g) / 5
    y = torch.randint(0, v, (n,), generator=g)
    y[[0, 7, n - 1]] = -100
    up = torch.randn(n, generator=g)
    h, w, hr, wr, y, up = (t.to(device) for t in (h, w, hr, wr, y, up))
    if op == "linear_token_kl":
        heads = (h, w, hr, wr, y, None, None)
        stats = K.linear_token_kl_fwd(*heads, "policy_ref", -100, None)[3]
        return partial(K.linear_token_kl_bwd, up, up, *heads, stats, "policy_ref", -100, None,
                       True, True, False)
    lse = L.linear_logprobs_fwd(h, w, y, None, -100, None)[1]
    return partial(L.linear_logprobs_bwd, up, torch.zeros_like(up), h, w, y, None, lse, -100,
                   None, True, True, False)


@pytest.mark.parametrize("op", ["linear_logprobs", "linear_token_kl"])
def test_column_bands_gather_the_hidden_rows_once_within_the_budget(op, device, monkeypatch):
    """Every band's logits GEMM reads the same hidden rows: each head's are gathered once for
    all bands (the policy's masked rows also feed the d_weight GEMM), and the budget counts
    them, so the backward holds at most d_weight + TISDPO_DZ_MB + O(N) (float32: no operand
    copies). The budget holds the band loop's [N, ·] buffers (masked hidden rows, d_hidden's
    float32 sum, the reference head's rows) and 128 columns of each head's slab, so a plan
    that left a buffer out would take wider bands."""
    from tisdpo_kernels import _env
    n, d, dr, v, width = 300, 160, 288, 1100, 128
    kl = op == "linear_token_kl"
    budget = n * (8 * d + 4 * dr * kl) + n * width * 4 * (1 + kl)
    monkeypatch.setattr(_env, "dz_budget_bytes", lambda: budget)
    backward = _backward_call(op, n, d, dr, v, device)
    with OpProbe() as probe:
        backward()
    gathers = [shape for name, shape in probe.out_shapes if name == "index_select"]
    assert gathers.count((n, d)) == 1 and gathers.count((n, dr)) == kl, gathers
    widths = {shape[1] for name, shape in probe.out_shapes
              if name == "empty" and len(shape) == 2 and shape[0] == n and shape[1] != d}
    assert width in widths and max(widths) <= width, widths
    bound = 4 * v * d + budget + 64 * n
    assert probe.peak_live_bytes <= bound, (probe.peak_live_bytes, bound)


class _Planned(Exception):
    pass


@pytest.mark.parametrize("op", ["linear_logprobs", "linear_token_kl"])
def test_autotuning_counts_its_separate_logits_slab(op, device, monkeypatch):
    """Under TISDPO_AUTOTUNE=1 the logits go to a slab of their own beside dz (trial runs
    would read dz back as logits): the plan counts it, so the slabs get narrower to stay
    within the budget. Autotuning needs a GPU; here the backward stops at its plan."""
    from tisdpo_kernels._triton import configs, slabs
    backward = _backward_call(op, 300, 160, 96, 1100, device)

    def plan(*args):
        seen.append(args[4])                        # extra bytes per logit
        raise _Planned

    monkeypatch.setattr(slabs, "slab_plan", plan)
    seen = []
    for tuning in (False, True):
        monkeypatch.setattr(configs, "autotuning", lambda t, on=tuning: on)
        with pytest.raises(_Planned):
            backward()
    ref = 4 if op == "linear_token_kl" else 0     # the reference head's logit slab
    assert seen == [ref, ref + 4], seen


@pytest.mark.parametrize("chunks", ["one", "several"])
def test_backward_is_bitwise_deterministic(chunks, device, monkeypatch):
    if chunks == "several":
        monkeypatch.setenv("TISDPO_DZ_MB", "1")
    masters, y, grads = logprobs_case(300, 31, 1100)
    a, b = (run_logprobs("triton", masters, y, grads, dtype=torch.float32, device=device)
            for _ in range(2))
    for k in ("logp", "lse", "d_hidden", "d_weight", "d_bias"):
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_views_in_nan_buffers(dtype, device):
    """Strided views inside NaN-filled buffers: NaN hidden rows of ignored tokens reach the
    GEMM's logits, and neither logp nor any gradient may see them."""
    masters, y, grads = logprobs_case(47, 31, 123)
    check(masters, y, grads, dtype=dtype, device=device, softcap=3.0, view=True)


@pytest.mark.parametrize("wrt", [("hidden",), ("weight", "bias"), ()],
                         ids=["hidden", "weight+bias", "none"])
def test_partial_requires_grad(wrt, device):
    masters, y, grads = logprobs_case(47, 31, 123)
    act = check(masters, y, grads, dtype=torch.float32, device=device, wrt=wrt)
    assert set(act) == {"logp", "lse"} | {f"d_{k}" for k in wrt}


def test_gradient_through_lse_only(device):
    masters, y, (_, g_lse) = logprobs_case(47, 31, 123)
    check(masters, y, (torch.zeros_like(g_lse), g_lse), dtype=torch.float32, device=device)


def test_all_ignored(device):
    masters, y, grads = logprobs_case(47, 31, 123, ignored=range(47))
    act = check(masters, y, grads, dtype=torch.bfloat16, device=device, softcap=3.0)
    for k, t in act.items():
        assert torch.all(t == 0), f"{k} is not all zero"


def test_no_host_sync(device, monkeypatch):
    """The chunk loop stays on the device: the kept count is clamped per chunk, never read."""
    monkeypatch.setenv("TISDPO_CHECKS", "off")
    monkeypatch.setenv("TISDPO_DZ_MB", "1")
    masters, y, grads = logprobs_case(300, 31, 1100)
    with OpProbe() as probe:
        run_logprobs("triton", masters, y, grads, dtype=torch.float32, device=device)
    assert not probe.sync_ops(), probe.sync_ops()


def test_bad_mode_is_named(device, monkeypatch):
    monkeypatch.setenv("TISDPO_HEAD_LOGITS", "cublas")
    masters, y, grads = logprobs_case(8, 8, 16)
    with pytest.raises(ValueError, match="TISDPO_HEAD_LOGITS='cublas'"):
        run_logprobs("triton", masters, y, grads, dtype=torch.float32, device=device)


# --- linear_token_kl: both heads' logits from GEMMs ------------------------------------------


def _kl_inputs(n=47, v=123, **kw):
    """kl_case with D ≠ D', upstream zeros every 5th kl / 4th logp, none every 7th token."""
    return kl_case(n, 31, 29, v, ref_bias=kw.pop("ref_bias", True),
                   zeros=(slice(None, None, 5), slice(1, None, 4)), silent=slice(2, None, 7),
                   **kw)


@pytest.mark.parametrize("bias,softcap,scale", [
    (False, None, 2.0), (True, 2.5, 2.0), (True, None, 40.0),
], ids=["plain", "biases+softcap", "large-logits"])
@pytest.mark.parametrize("direction", ["policy_ref", "ref_policy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_kl_matches_oracle(dtype, direction, bias, softcap, scale, device):
    masters, y, grads = _kl_inputs(bias=bias, ref_bias=bias, scale=scale, ref_scale=scale)
    act = check_kl(masters, y, grads, dtype=dtype, device=device, direction=direction,
                   softcap=softcap)
    ignored = (y == -100).to(device)
    for k in ("kl", "logp", "ref_logp", "d_hidden"):
        assert torch.all(act[k][ignored] == 0), k


@pytest.mark.parametrize("dtype,direction", [(torch.float32, "policy_ref"),
                                             (torch.bfloat16, "ref_policy")],
                         ids=["fp32-policy_ref", "bf16-ref_policy"])
def test_kl_several_chunks_splits_and_packed_rows(dtype, direction, device, monkeypatch):
    """TISDPO_DZ_MB=1: the two heads' logits share the budget, so chunks of 112 rows (half of
    the one-head 224): in forward the 228 kept rows fill two chunks and 4 rows of the third,
    whose other rows are past the kept count (the backward also packs away the tokens without
    upstream gradient); each forward chunk split four ways; 70 ignored rows packed away. The
    backward (N < V) runs in bands of columns of both heads' logits."""
    from tisdpo_kernels._triton.slabs import dz_chunk_rows
    monkeypatch.setenv("TISDPO_DZ_MB", "1")
    assert dz_chunk_rows(300, 1100, 4 + 4) == 112
    masters, y, grads = _kl_inputs(300, 1100, ignored=list(range(60, 130)) + [0, 299])
    with _small_blocks("linear_token_kl"):
        check_kl(masters, y, grads, dtype=dtype, device=device, direction=direction,
                 softcap=3.0)


@pytest.mark.parametrize("chunks", ["one", "several"])
def test_kl_backward_is_bitwise_deterministic(chunks, device, monkeypatch):
    if chunks == "several":
        monkeypatch.setenv("TISDPO_DZ_MB", "1")
    masters, y, grads = _kl_inputs(300, 1100)
    a, b = (run_kl("triton", masters, y, grads, dtype=torch.float32, device=device,
                   softcap=3.0) for _ in range(2))
    for k in ("kl", "logp", "ref_logp", "d_hidden", "d_weight", "d_bias"):
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_kl_views_in_nan_buffers(dtype, device):
    masters, y, grads = _kl_inputs()
    check_kl(masters, y, grads, dtype=dtype, device=device, direction="ref_policy", softcap=3.0,
             view=True)


@pytest.mark.parametrize("ref_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kl_reference_head_in_another_dtype(ref_dtype, device):
    """The two logit slabs in different dtypes: a bf16 policy against an fp32 reference head,
    and the other way round."""
    masters, y, grads = _kl_inputs()
    dtype = torch.bfloat16 if ref_dtype == torch.float32 else torch.float32
    check_kl(masters, y, grads, dtype=dtype, device=device, ref_dtype=ref_dtype,
             direction="policy_ref", softcap=4.0)


@pytest.mark.parametrize("use,wrt", [(("kl",), ("hidden",)), (("logp",), ("weight", "bias")),
                                     (("kl", "logp"), ())],
                         ids=["kl->hidden", "logp->weight+bias", "none"])
def test_kl_partial_upstream_and_requires_grad(use, wrt, device):
    masters, y, grads = _kl_inputs()
    act = check_kl(masters, y, grads, dtype=torch.float32, device=device, use=use, wrt=wrt)
    assert set(act) == {"kl", "logp", "ref_logp"} | {f"d_{k}" for k in wrt}


def test_kl_all_ignored(device):
    masters, y, grads = _kl_inputs(ignored=range(47))
    act = check_kl(masters, y, grads, dtype=torch.bfloat16, device=device, softcap=3.0)
    for k, t in act.items():
        assert torch.all(t == 0), f"{k} is not all zero"


# --- the GPU build, checked without a GPU ----------------------------------------------------


def _aot_compile_z_kernels():
    """The four kernels with Z_GIVEN and their tuned configs, compiled for sm90/sm80 in bf16
    with biases and a softcap (tests/aot.py): [(name, arch, shared, ptx, regs, spills)]."""
    from aot import compile_kernel, head_ptr_type

    from tisdpo_kernels._triton import linear_logprobs as L, linear_token_kl as K
    from tisdpo_kernels._triton.configs import CONFIGS

    out = []
    for op, kind, fn, flags in [
            ("linear_logprobs", "fwd", L.linear_logprobs_fwd_kernel, dict(FINAL=False)),
            ("linear_logprobs", "fwd", L.linear_logprobs_fwd_kernel, dict(FINAL=True)),
            ("linear_logprobs", "bwd", L.linear_logprobs_bwd_kernel, dict(HAS_FILTER=False)),
            ("linear_logprobs", "bwd", L.linear_logprobs_bwd_kernel, dict(HAS_FILTER=True)),
            ("linear_token_kl", "fwd", K.linear_token_kl_fwd_kernel,
             dict(FINAL=False, POLICY_REF=True)),
            ("linear_token_kl", "fwd", K.linear_token_kl_fwd_kernel,
             dict(FINAL=True, POLICY_REF=False)),
            ("linear_token_kl", "bwd", K.linear_token_kl_bwd_kernel, dict(POLICY_REF=True)),
            ("linear_token_kl", "bwd", K.linear_token_kl_bwd_kernel, dict(POLICY_REF=False))]:
        for arch in (90, 80):
            cfg = CONFIGS[f"{op}_{kind}_z"]["sm90" if arch >= 90 else "sm80"]
            cx = {**flags, **cfg.meta, "HAS_BIAS": True, "HAS_SOFTCAP": True, "Z_GIVEN": True,
                  "TMA": False, "UPCAST": False, "DOT_PRECISION": "ieee"}
            if op == "linear_token_kl":
                cx["HAS_REF_BIAS"] = True
            tag = "".join(f"-{k.lower()}" for k in ("FINAL", "HAS_FILTER", "POLICY_REF")
                          if flags.get(k))
            out.append((f"{op}-{kind}-z-sm{arch}-bf16{tag}", arch,
                        *compile_kernel(fn, arch, cx, head_ptr_type(cx, "bf16"),
                                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real tests compile them")
def test_z_kernels_compile_for_hopper_and_ampere():
    """Both heads' Z_GIVEN kernels: compiled for sm_90/sm_80 they fit in shared memory, do
    not spill, hold no matrix instruction (the GEMM is the framework's) and no atomic."""
    from aot import ATOMIC, SMEM_LIMIT, offline

    for name, arch, shared, ptx, regs, spills in offline(__file__, "_aot_compile_z_kernels"):
        assert shared <= SMEM_LIMIT[arch], f"{name}: {shared} B shared memory"
        assert "mma" not in ptx, f"{name}: a matrix instruction"
        atomic = ATOMIC.search(ptx)
        assert atomic is None, f"{name}: atomic instruction {atomic and atomic.group(0)}"
        assert spills == 0, f"{name}: {spills} bytes of register spills ({regs} registers)"
