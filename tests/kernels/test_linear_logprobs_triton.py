"""The fused Triton LM-head kernels (tisdpo_kernels/_triton/linear_logprobs.py) against the oracle.

Without a GPU every kernel runs under TRITON_INTERPRET=1 (set by conftest.py); on a GPU the
same tests run the compiled kernels. Each value and gradient is checked three ways
(tests/numerics.py): reference in float64 (truth), reference at the test dtype (eager), the
Triton backend (actual).
"""

from functools import partial

import pytest
import torch

import tisdpo_kernels as tk
from head_cases import POLICY as ALL
from head_cases import check_three_way, logprobs_case, run_logprobs, several_slabs
from markers import requires_cuda, requires_triton
from numerics import assert_oracle
from tisdpo_kernels._impl import Impl, resolve_impl

pytestmark = requires_triton

N, D, V = 47, 31, 123
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]


def make_inputs(n=N, d=D, v=V, **kw):
    return logprobs_case(n, d, v, **kw)


check = partial(check_three_way, run_logprobs, "triton", check_dtypes=True)


@pytest.mark.parametrize("bias,softcap,scale", [
    (False, None, 2.0), (True, None, 2.0), (False, 4.0, 2.0), (True, 2.5, 2.0),
    (True, None, 40.0),   # logits of ±100s: the online logsumexp must not overflow
], ids=["plain", "bias", "softcap", "bias+softcap", "large-logits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_matches_oracle(dtype, bias, softcap, scale, device):
    masters, y, grads = make_inputs(bias=bias, scale=scale)
    check(masters, y, grads, dtype=dtype, device=device, softcap=softcap)


@pytest.mark.parametrize("kind,wrt", [("rows", ALL), ("columns", ALL),
                                      ("columns", ("weight", "bias"))],
                         ids=["rows", "columns", "columns-no-d_hidden"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_in_several_dz_slabs(dtype, kind, wrt, device, monkeypatch):
    """A dz budget below the slab of all N rows: the backward runs in chunks of rows (d_weight
    and d_bias summed over them) or in bands of vocabulary columns (d_hidden summed over them,
    each band's d_weight and d_bias rows written once), and the oracle still holds."""
    n, v = several_slabs(monkeypatch, kind, need_dh="hidden" in wrt)
    masters, y, grads = make_inputs(n=n, v=v, ignored=(0, 5, 299))
    check(masters, y, grads, dtype=dtype, device=device, softcap=3.0, wrt=wrt)


def _probe_backward(n, v, dtype, device, need_dh=True, d=31):
    """The dispatch probe of ``linear_logprobs_bwd`` (d_weight wanted) on an n × v case."""
    from dispatch_probe import OpProbe

    from tisdpo_kernels._triton import linear_logprobs as L
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / 5
    h, w = h.to(device, dtype), w.to(device, dtype)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    lse = L.linear_logprobs_fwd(h, w, y, None, -100, None)[1]
    up = torch.randn(n, device=device)
    with OpProbe() as probe:
        grads = L.linear_logprobs_bwd(up, torch.zeros_like(up), h, w, y, None, lse, -100, None,
                                      need_dh, True, False)
    return probe, grads


def test_several_row_chunks_sum_d_weight_without_zero_fill(device, monkeypatch):
    """With several row chunks the float32 d_weight sum is written by the first chunk's GEMM
    and added to by the next: no [V, D] zero-fill, a full write and read of 4·V·D bytes saved."""
    n, v = several_slabs(monkeypatch, "rows")
    probe, _ = _probe_backward(n, v, torch.float32, device)
    ops = [name for name, shape in probe.out_shapes if shape == (v, 31)]
    assert not {"zeros", "zero_", "fill_", "new_zeros", "zeros_like"} & set(ops), ops
    assert sum(op in ("mm", "addmm", "addmm_") for op in ops) > 1, ops     # several slabs


@pytest.mark.parametrize("need_dh", [True, False])
def test_column_bands_write_d_weight_once_in_its_dtype(need_dh, device, monkeypatch):
    """In bands of columns no float32 [V, D] sum exists: the only [V, D] tensor made is
    d_weight in bf16 (and, under the interpreter, whose GEMM operands are float32, the float32
    copy of the weight that the d_hidden GEMM reads), and each band's GEMM writes its rows;
    d_hidden's float32 sum is [N, D]."""
    n, v = several_slabs(monkeypatch, "columns", need_dh)
    probe, (dh, dw, _) = _probe_backward(n, v, torch.bfloat16, device, need_dh)
    whole = [name for name, shape in probe.out_shapes if shape == (v, 31)]
    operand = need_dh and device.type == "cpu"
    assert whole.count("empty") == 1 and whole.count("_to_copy") == operand, whole
    assert set(whole) <= {"empty", "fill_", "_to_copy"}, whole
    write = "copy_" if device.type == "cpu" else "mm"    # interpreter: a float32 product
    bands = [shape[0] for name, shape in probe.out_shapes
             if name == write and len(shape) == 2 and shape[1] == 31 and shape[0] < v]
    assert len(bands) > 1 and sum(bands) == v, bands
    assert dw.dtype == torch.bfloat16 and (dh is not None) == need_dh


@pytest.mark.parametrize("d,width", [(128, 256), (256, 128)])
@pytest.mark.parametrize("need_dh", [True, False])
def test_column_bands_stay_within_d_weight_and_the_budget(need_dh, d, width, device,
                                                          monkeypatch):
    """The budget covers a band and the band loop's [N, D] buffers (masked hidden rows, and
    d_hidden's float32 sum, then its cast), so the backward holds at most d_weight +
    TISDPO_DZ_MB + O(N). Float32 (no operand copies); a budget of the [N, D] buffers and
    ``width`` columns, so a plan that left those buffers out would take wider bands."""
    from tisdpo_kernels import _env
    n, v = 300, 1100
    budget = n * (d * (8 if need_dh else 4) + 4 * width)
    monkeypatch.setattr(_env, "dz_budget_bytes", lambda: budget)
    probe, _ = _probe_backward(n, v, torch.float32, device, need_dh, d)
    widths = {shape[1] for name, shape in probe.out_shapes
              if name == "empty" and len(shape) == 2 and shape[0] == n and shape[1] != d}
    assert width in widths and max(widths) <= width, widths
    bound = 4 * v * d + budget + 64 * n
    assert probe.peak_live_bytes <= bound, (probe.peak_live_bytes, bound)


@pytest.mark.parametrize("chunks", ["one", "rows", "columns"])
def test_backward_is_bitwise_deterministic(chunks, device, monkeypatch):
    """No atomics: two backward passes give the same gradients bit for bit."""
    n, v = (300, 1100) if chunks == "one" else several_slabs(monkeypatch, chunks)
    masters, y, grads = make_inputs(n=n, v=v)
    a, b = (run_logprobs("triton", masters, y, grads, dtype=torch.float32, device=device)
            for _ in range(2))
    for k in ("d_hidden", "d_weight", "d_bias"):
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_views_in_nan_buffers(dtype, device):
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=dtype, device=device, softcap=3.0, view=True)


@pytest.mark.parametrize("logits", ["fused", "gemm"])
def test_autocast_does_not_change_the_math(logits, device, monkeypatch):
    """Under bf16 autocast around both passes, fp32 inputs still compute in fp32, the
    backward's gradient GEMMs (and the gemm mode's logits) included: fp32's oracle bound."""
    monkeypatch.setenv("TISDPO_HEAD_LOGITS", logits)
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=torch.float32, device=device, softcap=3.0,
          around_actual=partial(torch.autocast, device.type, dtype=torch.bfloat16))


@pytest.mark.parametrize("wrt", [("hidden",), ("weight",), ("bias",), ("weight", "bias"), ()],
                         ids=["hidden", "weight", "bias", "weight+bias", "none"])
def test_partial_requires_grad(wrt, device, monkeypatch):
    """Correct gradients for what requires grad, and kernel work only for that."""
    from tisdpo_kernels._triton import linear_logprobs as lm_head
    calls, real = [], lm_head.linear_logprobs_bwd

    def spy(*args):
        calls.append(args[-4:-1])   # need_dh, need_dw, need_db (then filter_eps)
        return real(*args)

    monkeypatch.setattr(lm_head, "linear_logprobs_bwd", spy)
    masters, y, grads = make_inputs()
    act = check(masters, y, grads, dtype=torch.float32, device=device, wrt=wrt)
    assert set(act) == {"logp", "lse"} | {f"d_{k}" for k in wrt}
    want = tuple(k in wrt for k in ALL)
    assert calls == ([want] if wrt else []), calls


def test_gradient_through_lse_only(device):
    """A z-loss-like use: only lse carries gradient (logp's upstream gradient is 0)."""
    masters, y, (_, g_lse) = make_inputs()
    check(masters, y, (torch.zeros_like(g_lse), g_lse), dtype=torch.float32, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_all_ignored(dtype, device):
    masters, y, grads = make_inputs(ignored=range(N))
    act = check(masters, y, grads, dtype=dtype, device=device, softcap=3.0)
    for k, t in act.items():
        assert torch.all(t == 0), f"{k} is not all zero"


def test_no_grad_forward_and_shapes(device):
    """[B, T] inputs, no autograd, logp only: shape of targets, finite, 0 where ignored."""
    h = torch.randn(3, 5, D, device=device)
    w = torch.randn(V, D, device=device) / D ** 0.5
    y = torch.randint(0, V, (3, 5), device=device)
    y[1, :2] = -100
    with torch.no_grad():
        logp = tk.linear_logprobs(h, w, y, impl="triton")
    ref = tk.linear_logprobs(h.double(), w.double(), y, impl="reference")
    assert logp.shape == y.shape and logp.dtype == torch.float32
    assert torch.all(logp[1, :2] == 0) and torch.all(logp <= 0)
    assert_oracle(logp, tk.linear_logprobs(h, w, y, impl="reference"), ref,
                  dtype=torch.float32, name="logp")


@pytest.mark.parametrize("n,d,v", [(0, 8, 20), (1, 1, 17), (2, 17, 1)])
def test_degenerate_sizes(n, d, v, device):
    """No tokens, D=1, a one-word vocabulary (logp = 0 exactly)."""
    masters, y, grads = make_inputs(n, d, v, ignored=())
    act = check(masters, y, grads, dtype=torch.float32, device=device, softcap=2.0)
    assert act["logp"].shape == (n,)


# GPU-like block sizes: several token blocks, 4 vocabulary splits (V=1000: 8 vocab tiles, 2 per
# split; V=1100: 9 tiles, 3 per split, so the last split is empty), cross-program atomics, a
# partial last group, and a run of 70 ignored rows so whole token blocks are packed away.
def _gpu_like():
    from tisdpo_kernels._triton import configs as C
    return C.override(
        linear_logprobs_fwd=C.KernelConfig({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32},
                                   num_warps=4, num_stages=2, host={"min_splits": 4}),
        linear_logprobs_fwd_combine=C.KernelConfig({"BLOCK_N": 64}),
        linear_logprobs_bwd=C.KernelConfig({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32,
                                    "GROUP_N": 3}, num_warps=4, num_stages=2),
    )


def _autotune_cases():
    from tisdpo_kernels._triton.configs import AUTOTUNE
    return [pytest.param(k, i, id=f"{k[16:]}-{i}") for k in ("linear_logprobs_fwd",
            "linear_logprobs_bwd") for i in range(len(AUTOTUNE[k]))]


@pytest.mark.parametrize("kernel,index", _autotune_cases())
def test_each_autotune_config_against_the_oracle(kernel, index, device):
    """Each config TISDPO_AUTOTUNE=1 may pick computes the same math: forced one at a time,
    with several token blocks and vocabulary splits, ignored rows, bias and softcap."""
    from tisdpo_kernels._triton import configs as C
    cfg = C.AUTOTUNE[kernel][index]
    masters, y, grads = make_inputs(300, 40, 700, ignored=list(range(20, 150)) + [299])
    with C.override(**{kernel: C.KernelConfig(cfg.meta, cfg.num_warps, cfg.num_stages,
                                              {"min_splits": 2})}):
        check(masters, y, grads, dtype=torch.bfloat16, device=device, softcap=20.0)


@pytest.mark.parametrize("module,stems", [
    ("linear_logprobs", ("linear_logprobs_fwd", "linear_logprobs_bwd")),
    ("linear_token_kl", ("linear_token_kl_fwd", "linear_token_kl_bwd")),
    ("linear_preference_loss", ("linear_preference_loss_fwd",))])
def test_autotune_key_names_every_launch_flag(module, stems):
    """Under TISDPO_AUTOTUNE=1 a config is chosen per key: the key names every constexpr of
    the kernel that no AUTOTUNE entry sets (the flags: bias, softcap, split or not...), so no
    launch kind reuses a choice timed on another; and it names nothing the kernels lack."""
    import importlib
    import inspect

    from tisdpo_kernels._triton import configs as C
    mod = importlib.import_module(f"tisdpo_kernels._triton.{module}")
    key, names = set(mod._AUTOTUNE_KEY), set()
    for stem in stems:
        fn = getattr(mod, f"{stem}_kernel")
        names |= set(fn.arg_names)
        tuned = {k for name in (stem, f"{stem}_z") for cfg in C.AUTOTUNE.get(name, ())
                 for k in cfg.meta}
        constexprs = {n for n, p in inspect.signature(fn.fn).parameters.items()
                      if "constexpr" in str(p.annotation)}    # jitted or interpreted
        flags = constexprs - tuned
        assert flags <= key, f"{stem}: {sorted(flags - key)} not in the autotune key"
    assert key <= names, sorted(key - names)


@pytest.mark.parametrize("dtype,bias,softcap,v", [(torch.float32, True, None, 1100),
                                                   (torch.bfloat16, False, 20.0, 1000)],
                         ids=["fp32-bias-V1100", "bf16-softcap-V1000"])
def test_gpu_like_blocks(dtype, bias, softcap, v, device):
    n, d = 256, 48
    masters, y, grads = make_inputs(n, d, v, bias=bias, ignored=list(range(60, 130)) + [5, 200])
    with _gpu_like():
        check(masters, y, grads, dtype=dtype, device=device, softcap=softcap)


def test_split_count_heuristic():
    """The split heuristic: at least min_splits, at most one per vocab tile."""
    from tisdpo_kernels._triton import configs as C
    from tisdpo_kernels._triton.common import num_splits as _num_splits
    cfg = C.KernelConfig({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32}, host={"min_splits": 16})
    cpu = torch.empty(1)
    assert _num_splits(cfg, cpu, 100, 1000) == 8          # capped by 8 vocab tiles
    assert _num_splits(cfg, cpu, 100, 128256) == 16
    assert _num_splits(cfg, cpu, 10, 100) == 1


# --- dispatch, dtype rejection, torch.library registration, torch.compile -------------------


def test_dispatch_rules(monkeypatch):
    assert resolve_impl("auto", torch.device("cuda"), op="x") is Impl.TRITON
    assert resolve_impl("auto", torch.device("cpu"), op="x") is Impl.TORCH
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, y = torch.randn(4, 8), torch.randn(16, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tk.linear_logprobs(h, w, y, impl="triton")


def test_float64_rejected_with_pointer_to_other_impls(device):
    h, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="impl='torch'"):
        tk.linear_logprobs(h.to(device), w.to(device), y.to(device), impl="triton")


def _op_args(device, requires_grad=True):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 24, generator=g).to(device).requires_grad_(requires_grad)
    w = (torch.randn(40, 24, generator=g) / 5).to(device).requires_grad_(requires_grad)
    b = torch.randn(40, generator=g).to(device).requires_grad_(requires_grad)
    y = torch.randint(0, 40, (20,), generator=g).to(device)
    y[3] = -100
    return h, w, y, b


def test_custom_op_opcheck(device):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the
    torch.library ops, on whatever device runs the tests (CPU: interpreted kernels)."""
    from tisdpo_kernels._triton.linear_logprobs import _ops
    fwd_op, bwd_op = _ops()
    h, w, y, b = _op_args(device)
    torch.library.opcheck(fwd_op, (h, w, y, b, -100, 3.0, None))
    torch.library.opcheck(fwd_op, (h, w, y, b, -100, 3.0, 0.05))
    with torch.no_grad():
        lp, lse = fwd_op(h, w, y, b, -100, 3.0, None)
    g = torch.randn(20, device=device)
    for eps in (None, 0.05):
        torch.library.opcheck(bwd_op, (g, -g, h.detach(), w.detach(), y, b.detach(), lse, -100,
                                       3.0, True, False, True, eps))


def _compiled_matches_eager(device, backend, monkeypatch):
    # TISDPO_CHECKS=off: the public op's data-dependent target check (a host sync on CPU) would
    # otherwise split the graph; the custom op itself must trace as one node (fullgraph=True).
    monkeypatch.setenv("TISDPO_CHECKS", "off")
    from tisdpo_kernels._triton.linear_logprobs import _ops
    _ops()   # registered before tracing (registration itself is not traceable)

    def step(h, w, y, b):
        logp, lse = tk.linear_logprobs(h, w, y, bias=b, softcap=5.0, return_lse=True,
                                       impl="triton")
        return (logp * torch.linspace(-1, 1, logp.shape[0], device=logp.device)).sum() \
            + 1e-2 * (lse ** 2).sum()

    h, w, y, b = _op_args(device)
    loss = step(h, w, y, b)
    grads = torch.autograd.grad(loss, (h, w, b))
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    loss_c = compiled(h, w, y, b)
    grads_c = torch.autograd.grad(loss_c, (h, w, b))
    torch.testing.assert_close(loss_c, loss)   # the same kernels ran: equal up to atomics order
    for a, e in zip(grads_c, grads):
        torch.testing.assert_close(a, e)


def test_torch_compile_traces_the_op(device, monkeypatch):
    """Dynamo + AOTAutograd through the custom op (aot_eager: no C++/Triton codegen, so it runs
    here with interpreted kernels); the full inductor compile runs in the CUDA test below."""
    _compiled_matches_eager(device, "aot_eager", monkeypatch)


@requires_cuda
def test_torch_compile_inductor_cuda(monkeypatch):
    _compiled_matches_eager(torch.device("cuda"), "inductor", monkeypatch)


@requires_cuda
def test_realistic_shape_cuda():
    """N=8192, D=4096, V=128256, bf16 with bias-free Llama-3-like head, against the reference
    computed in token chunks (float64 truth, bf16 eager)."""
    torch.manual_seed(0)
    n, d, v, chunk = 8192, 4096, 128256, 1024
    dev = torch.device("cuda")
    h = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(v, d, device=dev) / d ** 0.5 * 2).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), device=dev)
    y[:300] = -100
    g_logp = torch.randn(n, device=dev)
    g_logp[::7] = 0
    g_lse = 0.1 * torch.randn(n, device=dev)

    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, lse = tk.linear_logprobs(hh, ww, y, return_lse=True, impl="triton")
    torch.autograd.backward((logp, lse), (g_logp, g_lse))

    def chunked(dtype):
        wr = w.to(dtype).requires_grad_()
        lps, lses, dhs = [], [], []
        for s in range(0, n, chunk):
            hc = h[s:s + chunk].to(dtype).requires_grad_()
            lp, ls = tk.linear_logprobs(hc, wr, y[s:s + chunk], return_lse=True,
                                        impl="reference")
            torch.autograd.backward((lp, ls), (g_logp[s:s + chunk].to(lp.dtype),
                                               g_lse[s:s + chunk].to(lp.dtype)))
            lps.append(lp.detach())
            lses.append(ls.detach())
            dhs.append(hc.grad)
        return torch.cat(lps), torch.cat(lses), torch.cat(dhs), wr.grad

    truth = chunked(torch.float64)
    ref = chunked(torch.bfloat16)
    act = (logp, lse, hh.grad, ww.grad)
    for name, a, r, t in zip(("logp", "lse", "d_hidden", "d_weight"), act, ref, truth):
        assert_oracle(a, r, t, dtype=torch.bfloat16, name=name,
                      metric="max" if name in ("logp", "lse") else "rms")


# --- the GPU build, checked without a GPU ----------------------------------------------------


def _aot_compile_matrix():
    """Compile the kernels with the tuned configs for sm90/sm80 (tests/aot.py; run through
    ``aot.offline``), as they launch there: on sm_90 the weight and the dz slab through TMA
    descriptors (and once through pointers, as TISDPO_TMA=0 runs). Returns [(name, arch,
    shared bytes, ptx, regs, spills)]."""
    from aot import compile_kernel, head_ptr_type

    from tisdpo_kernels._triton import linear_logprobs as L
    from tisdpo_kernels._triton.configs import AUTOTUNE, CONFIGS

    fns = {"fwd": (L.linear_logprobs_fwd_kernel, "linear_logprobs_fwd"),
           "bwd": (L.linear_logprobs_bwd_kernel, "linear_logprobs_bwd"),
           "combine": (L.linear_logprobs_fwd_combine_kernel, "linear_logprobs_fwd_combine")}
    plain = dict(HAS_BIAS=False, HAS_SOFTCAP=False)
    out = []
    for kind, arch, dt, flags in [
            ("fwd", 90, "bf16", dict(HAS_BIAS=True, HAS_SOFTCAP=True, FINAL=False)),
            ("fwd", 90, "bf16", dict(HAS_BIAS=True, HAS_SOFTCAP=True, FINAL=False, TMA=False)),
            ("combine", 90, "fp32", {}),
            ("bwd", 90, "bf16", dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_FILTER=False)),
            ("bwd", 90, "bf16", dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_FILTER=True)),
            ("bwd", 90, "bf16", dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_FILTER=False,
                                     TMA=False)),
            ("bwd", 80, "bf16", dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_FILTER=False)),
            ("bwd", 80, "fp32", dict(HAS_BIAS=False, HAS_SOFTCAP=False, HAS_FILTER=False))] + [
            (f"{kind}-autotune{i}", 90, "bf16", flags)
            # (a head without bias or softcap, as most have: the softcap's tanh adds registers)
            for kind, flags in (("fwd", dict(plain, FINAL=False)),
                                ("bwd", dict(plain, HAS_FILTER=False)))
            for i in range(len(AUTOTUNE[fns[kind][1]]))]:
        kind, _, tuned = kind.partition("-autotune")
        fn, name = fns[kind]
        table = CONFIGS[name]
        cfg = table.get("sm90" if arch >= 90 else "sm80", table["default"])
        if tuned:     # every config TISDPO_AUTOTUNE=1 may pick
            cfg = AUTOTUNE[name][int(tuned)]
        cx = {**flags, **cfg.meta}
        if kind != "combine":   # what Triton specialises at a real launch: unit inner strides
            cx.update(stride_hd=1, stride_wd=1, UPCAST=False, DOT_PRECISION="ieee")
            cx["TMA"] = flags.get("TMA", arch >= 90)       # TISDPO_TMA=auto

        tag = (("-tma" if cx.get("TMA") else "") + ("-filter" if flags.get("HAS_FILTER")
                                                     else "")
               + (f"-autotune{tuned}" if tuned else ""))
        out.append((f"{kind}-sm{arch}-{dt}{tag}", arch,
                    *compile_kernel(fn, arch, cx, head_ptr_type(cx, dt),
                                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real tests compile them")
def test_kernels_compile_for_hopper_and_ampere():
    """The tuned GPU configs compile (AOT, no GPU), fit in shared memory, pipeline their loads
    (cp.async; on sm_90 the weight by TMA), use Hopper's wgmma for bf16, do not spill
    registers in bf16, and the backward has no atomic instruction."""
    from aot import ATOMIC, SMEM_LIMIT, offline

    for name, arch, shared, ptx, regs, spills in offline(__file__, "_aot_compile_matrix"):
        assert shared <= SMEM_LIMIT[arch], f"{name}: {shared} B shared memory"
        if not name.startswith("combine"):
            assert "cp.async" in ptx, f"{name}: loads are not pipelined"
        if "sm90-bf16" in name:
            assert "wgmma" in ptx, f"{name}: no wgmma"
        if "-tma" in name:             # the weight tiles arrive by bulk tensor copies
            assert "cp.async.bulk.tensor" in ptx, f"{name}: no TMA load"
        if name.startswith("bwd"):     # dz slabs + GEMMs: deterministic, no atomics
            atomic = ATOMIC.search(ptx)
            assert atomic is None, f"{name}: atomic instruction {atomic and atomic.group(0)}"
        if "bf16" in name:             # tensor-core tiles must fit the register file
            assert spills == 0, f"{name}: {spills} bytes of register spills ({regs} registers)"
