"""linear_token_kl through the public op with impl="triton" (interpreted on CPU), against the
reference oracle.

Every value (kl, logp, ref_logp) and gradient (d_hidden, d_weight, d_bias) is checked three
ways (tests/numerics.py): the reference in float64 (truth), the reference at the test dtype
(eager) and the fused Triton kernels.
"""
from functools import partial

import pytest
import torch

import tisdpo_kernels as tk
from head_cases import POLICY, REF, check_three_way, kl_case, run_kl, several_slabs
from markers import requires_cuda, requires_triton
from numerics import assert_oracle

pytestmark = requires_triton

N, D, DR, V = 47, 31, 29, 123
DTYPES = [torch.float32, torch.bfloat16]
DT_IDS = ["fp32", "bf16"]
DIRECTIONS = ["policy_ref", "ref_policy"]


def make_inputs(n=N, d=D, dr=DR, v=V, *, ref_bias=True, **kw):
    """kl_case with upstream zeros every 5th kl / 4th logp and none at all every 7th token."""
    return kl_case(n, d, dr, v, ref_bias=ref_bias, zeros=(slice(None, None, 5), slice(1, None, 4)),
                   silent=slice(2, None, 7), **kw)


check = partial(check_three_way, run_kl, "triton", check_dtypes=True)


def blocks(bn, bv, bd, *, splits=1, group=1, warps=4):
    """Force the kernels' blocks (GPU-like sizes under the interpreter; also on a GPU)."""
    from tisdpo_kernels._triton import configs as C
    blk = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}
    return C.override(
        linear_token_kl_fwd=C.KernelConfig(blk, num_warps=warps, num_stages=2,
                                    host={"min_splits": splits}),
        linear_token_kl_fwd_combine=C.KernelConfig({"BLOCK_N": 64}),
        linear_token_kl_bwd=C.KernelConfig(dict(blk, GROUP_N=group), num_warps=warps, num_stages=2))


VARIANTS = [(False, False, None), (True, True, None), (False, False, 4.0), (True, False, 2.5),
            (False, True, 3.0)]
VARIANT_IDS = ["plain", "bias+refbias", "softcap", "bias+softcap", "refbias+softcap"]


@pytest.mark.parametrize("bias,ref_bias,softcap", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_matches_oracle(dtype, direction, bias, ref_bias, softcap, device):
    """Odd shapes with D ≠ D', ignored tokens, zero/negative upstream grads on kl and logp."""
    masters, y, grads = make_inputs(bias=bias, ref_bias=ref_bias)
    act = check(masters, y, grads, dtype=dtype, device=device, direction=direction,
                softcap=softcap)
    ignored = (y == -100).to(device)
    for k in ("kl", "logp", "ref_logp"):
        assert torch.all(act[k][ignored] == 0), k
    assert torch.all(act["d_hidden"][ignored] == 0)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_all_ignored_gives_zeros(dtype, direction, device):
    masters, y, grads = make_inputs(ignored=range(N))
    act = check(masters, y, grads, dtype=dtype, device=device, direction=direction, softcap=3.0)
    for k, t in act.items():
        assert torch.all(t == 0), k


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_single_active_token(direction, device):
    """One token in the batch: a block with a single packed row."""
    masters, y, grads = make_inputs(ignored=[i for i in range(N) if i != 20])
    check(masters, y, grads, dtype=torch.float32, device=device, direction=direction)


@pytest.mark.parametrize("dtype,direction", [(torch.float32, "policy_ref"),
                                             (torch.bfloat16, "ref_policy")],
                         ids=["fp32-policy_ref", "bf16-ref_policy"])
def test_smallest_blocks(dtype, direction, device):
    """16-wide blocks: 3 token blocks × 8 vocab tiles × 2 D-chunks, so the running maxima move
    between tiles (the KL accumulator's rescale and shift) and every edge is ragged."""
    masters, y, grads = make_inputs()
    with blocks(16, 16, 16, group=2, warps=1):
        check(masters, y, grads, dtype=dtype, device=device, direction=direction, softcap=5.0)


@pytest.mark.parametrize("use", [("kl",), ("logp",)], ids=["kl_only", "logp_only"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_single_upstream(direction, use, device):
    """Only one output carries a gradient (the other's upstream arrives as None)."""
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=torch.float32, device=device, direction=direction, use=use,
          softcap=5.0)


@pytest.mark.parametrize("wrt", [("hidden",), ("weight",), ("bias",), ("weight", "bias"), ()],
                         ids=["hidden", "weight", "bias", "weight+bias", "none"])
def test_partial_requires_grad(wrt, device):
    masters, y, grads = make_inputs()
    act = check(masters, y, grads, dtype=torch.float32, device=device, direction="policy_ref",
                wrt=wrt)
    assert set(act) == {"kl", "logp", "ref_logp"} | {f"d_{k}" for k in wrt}


def test_reference_inputs_get_no_gradient(device):
    masters, y, _ = make_inputs()
    ts = {k: t.float().to(device).requires_grad_() for k, t in masters.items()}
    kl, logp, ref_logp = tk.linear_token_kl(
        ts["hidden"], ts["weight"], ts["ref_hidden"], ts["ref_weight"], y.to(device),
        bias=ts["bias"], ref_bias=ts["ref_bias"], impl="triton")
    assert not ref_logp.requires_grad and kl.requires_grad and logp.requires_grad
    (kl.sum() + logp.sum()).backward()
    assert all(ts[k].grad is None for k in REF)
    assert all(ts[k].grad is not None for k in POLICY)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_extreme_logits_underflow(dtype, direction, device):
    """Logits spread over hundreds: many probabilities are ~e^-200 (zero in fp32). No NaN, the
    oracle still passes, also through the combine of 3 vocabulary splits. In fp32 the
    gradients are up to ~10× eager's error here, and allowed to be: the backward recomputes
    the logits (tokens without upstream gradient packed out, so at other tile rows, which
    numpy's BLAS rounds differently), and each logit's rounding, a few ulps of its dot
    product's magnitude, becomes a relative error of p even where p ≈ 1, where eager's
    softmax cancels it (tests/magnitudes.py)."""
    masters, y, grads = make_inputs(scale=60.0 * D ** 0.5, ref_scale=45.0 * DR ** 0.5)
    logp_all = torch.log_softmax(masters["hidden"] @ masters["weight"].T + masters["bias"], -1)
    logq_all = torch.log_softmax(masters["ref_hidden"] @ masters["ref_weight"].T
                                 + masters["ref_bias"], -1)
    assert logp_all.min() < -200 and logq_all.min() < -200   # the regime is really extreme
    with blocks(64, 32, 32, splits=3):
        act = check(masters, y, grads, dtype=dtype, device=device, direction=direction)
    assert act["kl"].max() > 10


@pytest.mark.parametrize("kind", ["rows", "columns"])
@pytest.mark.parametrize("direction,dtype", [("policy_ref", torch.float32),
                                             ("ref_policy", torch.bfloat16)],
                         ids=["policy_ref-fp32", "ref_policy-bf16"])
def test_backward_in_several_dz_slabs(direction, dtype, kind, device, monkeypatch):
    """A dz budget below the slab of all N rows: the backward runs in chunks of rows or bands
    of vocabulary columns (both heads sliced to the band) and the oracle still holds; two
    runs give the same gradients bit for bit (no atomics)."""
    n, v = several_slabs(monkeypatch, kind)
    masters, y, grads = make_inputs(n=n, v=v, ignored=(0, 5, 299))
    act = check(masters, y, grads, dtype=dtype, device=device, direction=direction,
                softcap=3.0)
    again = run_kl("triton", masters, y, grads, dtype=dtype, device=device,
                   direction=direction, softcap=3.0)
    for k in ("d_hidden", "d_weight", "d_bias"):
        assert torch.equal(act[k], again[k]), k


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_views_in_nan_buffers(dtype, device):
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=dtype, device=device, direction="ref_policy", softcap=3.0,
          view=True)


@pytest.mark.parametrize("logits", ["fused", "gemm"])
def test_autocast_does_not_change_the_math(logits, device, monkeypatch):
    """Under bf16 autocast around both passes, fp32 inputs still compute in fp32, the
    backward's gradient GEMMs (and the gemm mode's logits) included: fp32's oracle bound."""
    monkeypatch.setenv("TISDPO_HEAD_LOGITS", logits)
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=torch.float32, device=device, direction="policy_ref",
          around_actual=partial(torch.autocast, device.type, dtype=torch.bfloat16))


@pytest.mark.parametrize("ref_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_head_in_another_dtype(ref_dtype, device):
    """A bf16 policy against an fp32 reference head and an fp32 policy against a bf16 one."""
    masters, y, grads = make_inputs()
    dtype = torch.bfloat16 if ref_dtype == torch.float32 else torch.float32
    check(masters, y, grads, dtype=dtype, device=device, ref_dtype=ref_dtype,
          direction="policy_ref", softcap=4.0)


def test_batched_hidden(device):
    masters, y, grads = make_inputs(shape=(3, 13), ignored=(0, 13, 14, 38))
    act = check(masters, y, grads, dtype=torch.float32, device=device, direction="ref_policy")
    assert act["kl"].shape == (3, 13) and act["d_hidden"].shape == (3, 13, D)


# GPU-like blocks: 4 token blocks (a run of 70 ignored rows packs whole blocks away) × 8 or 9
# vocabulary tiles; the forward splits the vocabulary 4 ways (V=1100: 9 tiles, 3 per split, so
# the last split is empty); the backward's grouped order has a partial last group.
@pytest.mark.parametrize("direction,dtype,v", [("policy_ref", torch.bfloat16, 1000),
                                               ("ref_policy", torch.float32, 1100)],
                         ids=["policy_ref-bf16-V1000", "ref_policy-fp32-V1100"])
def test_gpu_like_blocks(direction, dtype, v, device):
    masters, y, grads = make_inputs(n=256, d=64, dr=48, v=v,
                                    ignored=list(range(60, 130)) + [5, 200, 255])
    with blocks(64, 128, 32, splits=4, group=3):
        check(masters, y, grads, dtype=dtype, device=device, direction=direction, softcap=6.0)


@pytest.mark.parametrize("n,d,dr,v,wrt", [(0, 8, 8, 20, POLICY), (1, 1, 3, 17, ("weight", "bias")),
                                          (2, 17, 5, 1, POLICY)])
def test_degenerate_sizes(n, d, dr, v, wrt, device):
    """No tokens, D=1, a one-word vocabulary (logp = ref_logp = kl = 0, zero gradients).
    With N=D=1, d_hidden is one 17-term cancelling sum whose eager error is 0 by luck about as
    often as not, for every backend: that case checks d_weight and d_bias (products)."""
    masters, y, grads = make_inputs(n, d, dr, v, ignored=())
    check(masters, y, grads, dtype=torch.float32, device=device, softcap=2.0, wrt=wrt)


def _aot_compile_kernels():
    """Compile the three kernels for sm_90 (tests/aot.py; run through ``aot.offline``)."""
    from aot import compile_kernel

    from tisdpo_kernels._triton import linear_token_kl as K

    def ptr_type(name):
        return {"t_ptr": "*i64", "rows_ptr": "*i64", "count_ptr": "*i32"}.get(
            name, "*bf16" if name[:2] in ("h_", "w_", "b_", "hr", "wr", "br") else "*fp32")

    flags = dict(HAS_BIAS=True, HAS_REF_BIAS=True, HAS_SOFTCAP=True, POLICY_REF=True,
                 FINAL=False, COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True, UPCAST=False,
                 DOT_PRECISION="ieee", BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, GROUP_N=8)
    out = []
    for fn in (K.linear_token_kl_fwd_kernel, K.linear_token_kl_fwd_combine_kernel,
               K.linear_token_kl_bwd_kernel):
        combine = fn is K.linear_token_kl_fwd_combine_kernel
        consts = {k: (1024 if combine and k == "BLOCK_N" else v)
                  for k, v in flags.items() if k in fn.arg_names}
        out.append(compile_kernel(fn, 90, consts, ptr_type, num_warps=8, num_stages=3)[0])
    return out


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects (e.g. a non-constexpr global read in
    a kernel). Compile the three kernels for sm_90 to a cubin (Triton's frontend, LLVM and the
    bundled ptxas; no driver needed) without TRITON_INTERPRET."""
    from aot import SMEM_LIMIT, offline

    shared = offline(__file__, "_aot_compile_kernels", timeout=600)
    assert len(shared) == 3 and all(s <= SMEM_LIMIT[90] for s in shared), shared


@pytest.mark.parametrize("logits,largest", [("fused", 1 << 20), ("gemm", 1 << 19)])
def test_no_host_sync_and_memory_within_the_dz_budget(logits, largest, monkeypatch):
    """The launchers (forward, backward) issue no host-synchronising aten op, and the largest
    tensor they allocate is one dz slab within TISDPO_DZ_MB (here 1 MiB, under half of the
    N·V·4 bytes of fp32 logits, so the backward must chunk); with TISDPO_HEAD_LOGITS=gemm
    the two heads' logit slabs share the budget, so none is above half of it. The launchers
    are called directly: a dispatch mode sees a torch.library custom op as one opaque call."""
    from dispatch_probe import OpProbe
    from tisdpo_kernels._triton.linear_token_kl import linear_token_kl_bwd, linear_token_kl_fwd
    monkeypatch.setenv("TISDPO_DZ_MB", "1")
    monkeypatch.setenv("TISDPO_HEAD_LOGITS", logits)
    masters, y, (g_kl, g_logp) = make_inputs(n=600, d=16, dr=12, v=1000,
                                             ignored=list(range(30, 90)))
    t = {k: v.float() for k, v in masters.items()}
    heads = (t["hidden"], t["weight"], t["ref_hidden"], t["ref_weight"], y, t["bias"],
             t["ref_bias"])
    with OpProbe() as probe:
        kl, logp, rlogp, stats = linear_token_kl_fwd(*heads, "policy_ref", -100, 4.0)
        dh, dw, db = linear_token_kl_bwd(g_kl.float(), g_logp.float(), *heads, stats,
                                         "policy_ref", -100, 4.0, True, True, True)
    assert not probe.sync_ops(), probe.sync_ops()
    assert probe.max_bytes <= largest <= 1 << 20 < 600 * 1000 * 4 / 2, probe.max_op
    assert dh.shape == t["hidden"].shape and dw.shape == t["weight"].shape and db.shape == (1000,)


def test_small_blocks_and_float64_raise(device):
    masters, y, _ = make_inputs()
    f = {k: t.float().to(device) for k, t in masters.items()}
    args = (f["hidden"], f["weight"], f["ref_hidden"], f["ref_weight"], y.to(device))
    with blocks(8, 128, 32), pytest.raises(AssertionError, match="BLOCK_N=8"):
        tk.linear_token_kl(*args, impl="triton")
    with pytest.raises(ValueError, match="impl='torch'"):
        tk.linear_token_kl(args[0], args[1], args[2].double(), args[3].double(), args[4],
                           impl="triton")


# --- torch.library registration, torch.compile ---------------------------------------------


def _op_args(device):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 24, generator=g).to(device).requires_grad_()
    w = (torch.randn(40, 24, generator=g) / 5).to(device).requires_grad_()
    b = torch.randn(40, generator=g).to(device).requires_grad_()
    hr = torch.randn(20, 17, generator=g).to(device)
    wr = (torch.randn(40, 17, generator=g) / 4).to(device)
    y = torch.randint(0, 40, (20,), generator=g).to(device)
    y[3] = -100
    return h, w, b, hr, wr, y


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_custom_op_opcheck(direction, device):
    """Schema, fake implementation, autograd registration and AOT dispatch of both ops."""
    from tisdpo_kernels._triton.linear_token_kl import _ops
    fwd_op, bwd_op = _ops()
    h, w, b, hr, wr, y = _op_args(device)
    torch.library.opcheck(fwd_op, (h, w, hr, wr, y, b, None, direction, -100, 3.0))
    with torch.no_grad():
        stats = fwd_op(h, w, hr, wr, y, b, None, direction, -100, 3.0)[3]
    g = torch.randn(20, device=device)
    torch.library.opcheck(bwd_op, (g, -g, h.detach(), w.detach(), hr, wr, y, b.detach(), None,
                                   stats, direction, -100, 3.0, True, False, True))


def _compiled_matches_eager(device, backend, monkeypatch):
    # TISDPO_CHECKS=off: the public op's data-dependent target check (a host sync on CPU) would
    # otherwise split the graph; the custom op itself must trace as one node (fullgraph=True).
    monkeypatch.setenv("TISDPO_CHECKS", "off")
    from tisdpo_kernels._triton.linear_token_kl import _ops
    _ops()

    def step(h, w, b, hr, wr, y):
        kl, logp, ref_logp = tk.linear_token_kl(h, w, hr, wr, y, bias=b, softcap=5.0,
                                                direction="policy_ref", impl="triton")
        return (logp * torch.linspace(-1, 1, logp.shape[0], device=logp.device)).sum() \
            + 0.5 * kl.sum() + 0.0 * ref_logp.sum()

    args = _op_args(device)
    loss = step(*args)
    grads = torch.autograd.grad(loss, args[:3])
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args[:3])
    torch.testing.assert_close(loss_c, loss)   # the same kernels ran: equal up to atomics order
    for a, e in zip(grads_c, grads):
        torch.testing.assert_close(a, e)


def test_torch_compile_traces_the_op(device, monkeypatch):
    """Dynamo + AOTAutograd through the custom op (aot_eager runs here with interpreted
    kernels); the inductor compile runs in the CUDA test below."""
    _compiled_matches_eager(device, "aot_eager", monkeypatch)


@requires_cuda
def test_torch_compile_inductor_cuda(monkeypatch):
    _compiled_matches_eager(torch.device("cuda"), "inductor", monkeypatch)


@requires_cuda
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_realistic_shape_cuda(direction):
    """N=8192, D=4096, V=128256, bf16 on a GPU: the fused kernels against the torch backend
    (eager-like bf16 error) and a float64 truth computed in token chunks."""
    from tisdpo_kernels import reference as R

    n, d, v, chunk = 8192, 4096, 128256, 512
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, d, device=dev, generator=g).bfloat16()
    w = (torch.randn(v, d, device=dev, generator=g) * d ** -0.5).bfloat16()
    hr = torch.randn(n, d, device=dev, generator=g).bfloat16()
    wr = (torch.randn(v, d, device=dev, generator=g) * d ** -0.5).bfloat16()
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    y[: n // 4] = -100  # a prompt
    g_kl = torch.randn(n, device=dev, generator=g)
    g_lp = torch.randn(n, device=dev, generator=g)

    def fused(impl):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        kl, lp, rlp = tk.linear_token_kl(hh, ww, hr, wr, y, direction=direction, impl=impl)
        dh, dw = torch.autograd.grad((kl, lp), (hh, ww), (g_kl, g_lp))
        return dict(kl=kl, logp=lp, ref_logp=rlp, d_hidden=dh, d_weight=dw)

    act = fused("triton")
    ref = fused("torch")
    truth = {k: [] for k in ("kl", "logp", "ref_logp", "d_hidden")}
    w64, wr64 = w.double().requires_grad_(), wr.double()
    dw64 = torch.zeros(v, d, dtype=torch.float64, device=dev)
    for s in range(0, n, chunk):
        hh = h[s:s + chunk].double().requires_grad_()
        kl, lp, rlp = R.linear_token_kl(hh, w64, hr[s:s + chunk].double(), wr64,
                                        y[s:s + chunk], direction=direction)
        dh, dw = torch.autograd.grad((kl, lp), (hh, w64),
                                     (g_kl[s:s + chunk].double(), g_lp[s:s + chunk].double()))
        for k, t in zip(("kl", "logp", "ref_logp", "d_hidden"), (kl, lp, rlp, dh)):
            truth[k].append(t.detach())
        dw64 += dw
    truth = {k: torch.cat(t) for k, t in truth.items()}
    truth["d_weight"] = dw64
    for k in truth:
        metric = "rms" if k.startswith("d_") else "max"
        assert_oracle(act[k], ref[k], truth[k], dtype=torch.bfloat16, name=k, metric=metric)
