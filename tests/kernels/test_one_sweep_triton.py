"""The Triton backend of the one-sweep preference head (``linear_preference_loss``,
impl="triton": cuBLAS logits and a Triton epilogue per chunk; docs/ONE_SWEEP.md).

Without a GPU the epilogue runs under TRITON_INTERPRET=1 (set by conftest.py). Every output
goes through the oracle (tests/numerics.py) as in tests/kernels/test_one_sweep.py: truth is
the float64 reference, and the comparison runs are the eager reference at the test dtype and
the torch backend of the same op. Op-level cases use odd shapes (V = 67, D = 24, T = 9),
some with GPU-like blocks (2 rows, or 1 as on sm_90 and sm_80, × 32 columns: several row
programs per chunk, three vocabulary tiles, the last one partial); module-level cases reuse
tests/loss_cases.py. Chunks of at most 8 tokens, so most sequences span two chunks of their
pair's sweep. The interpreter runs each chunk's kernel slowly, so the cases are few and small.
"""
import pytest
import torch

import magnitudes as M
from dispatch_probe import OpProbe
from loss_cases import IGNORE, case_with_ref_logps, check, make_case, module_magnitudes, run
from markers import requires_triton
from numerics import assert_oracle
from tisdpo_kernels import get_preset, linear_preference_loss
from tisdpo_kernels import reference as R
from tisdpo_kernels._triton import configs

pytestmark = requires_triton
# CPU tensors run Triton only under the interpreter, which conftest.py never enables on a GPU
# machine; there the op-level tests run the compiled kernel on CUDA tensors instead
interpreted = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="CPU tensors (tests/loss_cases.py): interpreter only")

ONE = {"strategy": "one_sweep"}
GPU_LIKE = configs.KernelConfig({"ROWS": 2, "BLOCK_V": 32})
ROW_LIKE = configs.KernelConfig({"ROWS": 1, "BLOCK_V": 32})     # one row per program (sm90)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "8")


# ---------------------------------------------------------------------------- op level

PAIRS, T, D, V = 2, 9, 24, 67


def op_case(seed=0):
    """float64 masters of a padded batch [2·PAIRS, T]: prompts ignored, one row of one
    response token, token weights, a reference head."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (2 * PAIRS, T), generator=g)
    for r, prompt in enumerate([2, 3, 1, 8]):       # row 3: a single response token
        y[r, :prompt] = IGNORE
    f64 = dict(dtype=torch.float64)
    return {"hidden": torch.randn(2 * PAIRS, T, D, generator=g, **f64),
            "weight": torch.randn(V, D, generator=g, **f64) * 0.4,
            "bias": torch.randn(V, generator=g, **f64) * 0.5,
            "ref_hidden": torch.randn(2 * PAIRS, T, D, generator=g, **f64),
            "ref_weight": torch.randn(V, D, generator=g, **f64) * 0.4,
            "weights": (0.5 + torch.rand(2 * PAIRS, T, generator=g, **f64)).float().double(),
            "labels": y}


def op_run(impl, case, method, dtype, softcap=None, grad=True, device="cpu"):
    """(loss, logp, ref_logp, kl) of the op and the gradients of hidden, weight, bias."""
    cfg = get_preset(method).config
    leaves = {k: case[k].detach().to(device, dtype).requires_grad_(grad)
              for k in ("hidden", "weight", "bias")}
    ref = {} if cfg.reference_free else {"ref_hidden": case["ref_hidden"].to(device, dtype),
                                         "ref_weight": case["ref_weight"].to(device, dtype)}
    wts = case["weights"].to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    y = case["labels"].to(device)
    out = linear_preference_loss(leaves["hidden"], leaves["weight"], y, config=cfg,
                                 bias=leaves["bias"], weights=wts, softcap=softcap, impl=impl,
                                 **ref)
    if grad:
        out[0].backward()
    return out, {k: t.grad for k, t in leaves.items()}


def op_magnitudes(case, method, dtype, softcap=None):
    """Rounding magnitudes (tests/magnitudes.py) of the op's outputs and gradients, composed
    as ``module_magnitudes`` composes them for the module."""
    cfg = get_preset(method).config
    x = {k: case[k].to(dtype).double() for k in ("hidden", "weight", "bias", "ref_hidden",
                                                 "ref_weight")}
    h, w, b, rh, rw = (x[k] for k in ("hidden", "weight", "bias", "ref_hidden", "ref_weight"))
    y = case["labels"]
    mask = y != IGNORE
    wt = torch.where(mask, case["weights"], 0.0)
    kl = m_kl = lr = m_lr = None
    if cfg.uses_kl:
        kl, lp, lr = R.linear_token_kl(h, w, rh, rw, y, bias=b, direction=cfg.kl, softcap=softcap)
        fm = M.token_kl(h, w, b, rh, rw, None, y, None, None, direction=cfg.kl, softcap=softcap,
                        grads=())
        m_lp, m_lr, m_kl = fm["logp"], fm["ref_logp"], fm["kl"]
    else:
        lp = R.linear_logprobs(h, w, y, bias=b, softcap=softcap)
        m_lp = M.logprobs(h, w, b, y, None, softcap=softcap, grads=())["logp"]
        if not cfg.reference_free:
            lr = R.linear_logprobs(rh, rw, y, softcap=softcap)
            m_lr = M.logprobs(rh, rw, None, y, None, softcap=softcap, grads=())["logp"]
    p = M.preference(lp, lr, wt, kl, mask, cfg, m_lp=m_lp, m_lr=m_lr, m_kl=m_kl)
    if cfg.uses_kl:
        g = M.token_kl(h, w, b, rh, rw, None, y, p["g_kl"], p["g_logp"], direction=cfg.kl,
                       softcap=softcap, g_mags=(p["m_g_kl"], p["m_g_logp"]))
    else:
        g = M.logprobs(h, w, b, y, p["g_logp"], None, softcap=softcap,
                       g_mags=(p["m_g_logp"], None))
    return {"loss": p["loss"], "logp": m_lp, "ref_logp": m_lr, "kl": m_kl,
            "hidden": g["d_hidden"], "weight": g["d_weight"], "bias": g["d_bias"]}


def op_check(method, dtype, device, softcap=None, blocks=None):
    case = op_case()
    with configs.override(**({} if blocks is None else {"linear_preference_loss_fwd": blocks})):
        actual = op_run("triton", case, method, dtype, softcap, device=device)
    truth = op_run("reference", case, method, torch.float64, softcap, device=device)
    eager = op_run("reference", case, method, dtype, softcap, device=device)
    torch_backend = op_run("torch", case, method, dtype, softcap, device=device)
    mags = op_magnitudes(case, method, dtype, softcap)
    names = ("loss", "logp", "ref_logp", "kl")
    for other, label in ((eager, "vs eager"), (torch_backend, "vs torch backend")):
        for name, a, r, t in zip(names, actual[0], other[0], truth[0]):
            assert (a is None) == (t is None), name
            if t is not None:
                assert a.dtype == r.dtype, f"{name}: dtype {a.dtype} != {r.dtype}"
                assert_oracle(a, r, t, dtype=dtype, name=f"{method} {name} ({label})",
                              magnitude=mags[name])
        for k in truth[1]:
            assert_oracle(actual[1][k], other[1][k], truth[1][k], dtype=dtype,
                          name=f"{method} d{k} ({label})", magnitude=mags[k])
    return actual


@pytest.mark.parametrize("method,dtype,softcap,blocks", [
    ("tisdpo_paper", torch.float32, 3.0, GPU_LIKE),   # KL(π‖ref), token-weighted, softcap
    ("tisdpo_paper", torch.bfloat16, None, None),
    ("tdpo2", torch.float32, None, None),             # KL(ref‖π), stop-gradient chosen KL
    ("tdpo2", torch.bfloat16, 3.0, GPU_LIKE),
    ("tisdpo", torch.float32, None, None),            # a reference head, no KL
    ("dpo", torch.bfloat16, None, ROW_LIKE),
    ("simpo", torch.float32, 3.0, None),              # reference-free, mean reduction
    ("ipo", torch.bfloat16, None, None),              # mean reduction
    ("tisdpo_paper", torch.float16, 3.0, GPU_LIKE),
], ids=["tisdpo_paper-fp32-softcap-blocks", "tisdpo_paper-bf16", "tdpo2-fp32",
        "tdpo2-bf16-softcap-blocks", "tisdpo-fp32", "dpo-bf16-row-blocks", "simpo-fp32-softcap",
        "ipo-bf16", "tisdpo_paper-fp16-softcap-blocks"])
@pytest.mark.parametrize("chunk", [8, 40], ids=["long-pairs", "whole-pairs"])
def test_op_matches_oracle_and_torch_backend(method, dtype, softcap, blocks, chunk, device,
                                             monkeypatch):
    """Every op input is used (bias, weights, a reference head unless reference-free). Chunks
    of 8 rows take each pair (18 rows) chunk by chunk; 40 takes both pairs in one chunk."""
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", str(chunk))
    op_check(method, dtype, device, softcap, blocks)


@pytest.mark.parametrize("chunk", [8, 40], ids=["long-pairs", "whole-pairs"])
def test_op_without_grad_and_deterministic(chunk, device, monkeypatch):
    """Under no_grad the epilogue skips e (WRITE_E off) yet gives the same loss and per-token
    outputs bit for bit; two runs with gradients agree bit for bit (no float atomics: the
    per-pair sums are segmented reductions)."""
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", str(chunk))
    case = op_case()
    (out_a, g_a), (out_b, g_b) = (op_run("triton", case, "tisdpo_paper", torch.float32,
                                         device=device) for _ in range(2))
    with torch.no_grad():
        out_c, _ = op_run("triton", case, "tisdpo_paper", torch.float32, grad=False,
                          device=device)
    for a, b, c in zip(out_a, out_b, out_c):
        assert torch.equal(a.detach(), b) and torch.equal(a.detach(), c)
    for k in g_a:
        assert torch.equal(g_a[k], g_b[k]), k


@interpreted
def test_op_refusals_and_dispatch(monkeypatch):
    case = op_case()
    cfg = get_preset("dpo").config
    h, w, y = case["hidden"], case["weight"], case["labels"]
    kw = dict(config=cfg, ref_hidden=case["ref_hidden"], ref_weight=case["ref_weight"])
    with pytest.raises(ValueError, match="impl='torch'"):
        linear_preference_loss(h, w, y, impl="triton", **kw)            # float64
    from tisdpo_kernels._triton import linear_preference_loss as K
    calls = []
    real = K.linear_preference_loss_fwd
    monkeypatch.setattr(K, "linear_preference_loss_fwd",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    f32 = {k: v.float() for k, v in kw.items() if torch.is_tensor(v)}
    linear_preference_loss(h.float(), w.float(), y, impl="auto", config=cfg, **f32)
    assert not calls                                 # auto on the CPU: the torch backend
    linear_preference_loss(h.float(), w.float(), y, impl="triton", config=cfg, **f32)
    assert len(calls) == 4 * 2                       # 4 rows of 9 tokens, chunks of ≤ 8


@pytest.mark.parametrize("kl", [None, "policy_ref", "ref_policy"])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_epilogue_from_saved_statistics_matches_one_launch(kl, softcap, device):
    """A chunk of whole pairs runs the epilogue twice: statistics saved, then e from them.
    That gives the same statistics and e, bit for bit, as the single launch a long pair's
    chunk makes (GPU-like blocks; dead rows with c = κ' = 0; C not a multiple of ROWS)."""
    from tisdpo_kernels._triton import linear_preference_loss as K
    g = torch.Generator().manual_seed(3)
    C = 7
    z, zr = (3 * torch.randn(C, V, generator=g) for _ in range(2))
    safe = torch.randint(0, V, (C,), generator=g)
    c, kg = torch.randn(C, generator=g), torch.randn(C, generator=g)
    c[2] = kg[2] = 0.0
    z, zr, safe, c, kg = (t.to(device) for t in (z, zr, safe, c, kg))
    zr = zr if kl is not None else None
    e_one, e_two = torch.full_like(z, float("nan")), torch.full_like(z, float("nan"))
    stats = torch.full((5, C), float("nan"), device=device)
    with configs.override(linear_preference_loss_fwd=GPU_LIKE):
        one = K.linear_preference_loss_fwd(z, zr, safe, c, kg, e_one, softcap, kl)
        saved = K.linear_preference_loss_fwd(z, zr, safe, None, None, None, softcap, kl, stats)
        assert K.linear_preference_loss_fwd(z, zr, safe, c, kg, e_two, softcap, kl,
                                            stats) is None
    assert torch.equal(e_one, e_two)
    assert e_one.isfinite().all() and (e_one[2] == 0).all()
    for a, b in zip(one, saved):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@pytest.mark.parametrize("chunk,launches", [
    (8, [(4, True, False), (5, True, False)] * 4),     # each sequence in two chunks: one launch
    (40, [(36, False, True), (36, True, True)]),      # both pairs whole: statistics, then e
], ids=["long-pairs", "whole-pairs"])
@interpreted
def test_epilogue_launches_per_chunk(chunk, launches, monkeypatch):
    """With a gradient, a chunk of a long pair launches the epilogue once (statistics and
    e); a chunk of whole pairs twice (statistics saved, then e). (rows, writes e, statistics
    buffer) per launch."""
    from tisdpo_kernels._triton import linear_preference_loss as K
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", str(chunk))
    calls, real = [], K.linear_preference_loss_fwd

    def spy(z, zr, safe, c, kg, e, *a, **k):
        stats = a[2] if len(a) > 2 else k.get("stats")
        calls.append((z.shape[0], e is not None, stats is not None))
        return real(z, zr, safe, c, kg, e, *a, **k)

    monkeypatch.setattr(K, "linear_preference_loss_fwd", spy)
    op_run("triton", op_case(), "tisdpo_paper", torch.float32)
    assert calls == launches


# ---------------------------------------------------------------------------- module level

def triton_ways(method, dtype, layout, case=None, *, module_kw=None, loss_kw=None, **call):
    """TISDPOLoss(strategy="one_sweep", impl="triton") checked against eager-at-dtype and
    against the torch backend of the same sweep."""
    case = make_case() if case is None else case
    kw = dict(loss_kw=loss_kw, **call)
    mkw = module_kw or {}
    truth = run(method, "reference", case, torch.float64, layout, module_kw=mkw, **kw)
    ref = run(method, "reference", case, dtype, layout, module_kw=mkw, **kw)
    torch_backend = run(method, "torch", case, dtype, layout, module_kw={**mkw, **ONE}, **kw)
    actual = run(method, "triton", case, dtype, layout, module_kw={**mkw, **ONE}, **kw)
    mags = module_magnitudes(method, case, dtype, module_kw=mkw, **kw)
    label = f"{method}/{layout}/{str(dtype)[6:]}"
    check(actual, ref, truth, dtype, f"triton one_sweep {label}", mags)
    check(actual, torch_backend, truth, dtype, f"triton one_sweep (vs torch) {label}", mags)


@pytest.mark.parametrize("method,layout,dtype", [
    ("dpo", "packed", torch.bfloat16),
    ("tisdpo", "padded", torch.float32),          # weights from pos/neg log-probs
    ("simpo", "packed", torch.float32),
    ("ipo", "padded", torch.bfloat16),
    ("tdpo2", "packed", torch.float32),
    ("tisdpo_paper", "padded", torch.bfloat16),
], ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("chunk", [8, 48])    # 48: whole pairs (as in test_one_sweep.py)
@interpreted
def test_module_preset(method, layout, dtype, chunk, monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", str(chunk))
    triton_ways(method, dtype, layout)


@interpreted
def test_module_softcap_and_normalizer():
    triton_ways("tisdpo_paper", torch.float32, "padded", module_kw={"softcap": 4.0},
                loss_kw={"normalizer": 7})


@interpreted
def test_module_precomputed_ref_logps():
    case = case_with_ref_logps()
    lr = case["ref_logps"].float()
    triton_ways("dpo", torch.float32, "packed", case, reference="logps",
                override={"ref_logps": lr.reshape(-1)[case["pack_index"]]})


def test_no_host_sync(monkeypatch, device):
    monkeypatch.setenv("TISDPO_CHECKS", "off")
    case = {k: v.to(device) for k, v in op_case().items()}
    cfg = get_preset("tisdpo_paper").config
    h, w, b = (case[k].float().requires_grad_() for k in ("hidden", "weight", "bias"))
    with OpProbe() as probe:
        loss = linear_preference_loss(h, w, case["labels"], config=cfg, bias=b,
                                      ref_hidden=case["ref_hidden"].float(),
                                      ref_weight=case["ref_weight"].float(),
                                      weights=case["weights"].float(), impl="triton")[0]
        loss.backward()
    assert not probe.sync_ops(), probe.sync_ops()


@interpreted
def test_default_chunk_fills_the_dz_budget(monkeypatch):
    """Unset TISDPO_CHUNK_TOKENS, the Triton sweep's chunk holds as many rows as the
    TISDPO_DZ_MB budget has room for, counting every [C, V] buffer it holds: each head's
    logits and, where e cannot overwrite the policy's (bf16 logits, float32 e under the
    interpreter, or autotuning), e. A budget of 512·V bytes: 64 rows of 8 bytes per logit."""
    from tisdpo_kernels import _env
    from tisdpo_kernels._triton import linear_preference_loss as K
    monkeypatch.delenv("TISDPO_CHUNK_TOKENS")
    monkeypatch.setattr(_env, "dz_budget_bytes", lambda: 512 * V)
    f32, bf16 = (torch.empty(1000, 2, dtype=dt) for dt in (torch.float32, torch.bfloat16))
    assert K._chunk_rows(f32, None, V, None) == 128                    # 4 bytes
    assert K._chunk_rows(f32, f32, V, None) == 64                      # 4 + 4
    assert K._chunk_rows(bf16, bf16, V, None) == 64                    # 2 + 4 (e) + 2
    assert K._chunk_rows(bf16, None, V, None) == 80                    # 6: 85, a multiple of 16
    assert K._chunk_rows(bf16, None, V, 7) == 7                        # chunk_tokens
    # autotuning: e in a buffer of its own (trial runs would read it back as logits)
    with monkeypatch.context() as tuning:
        tuning.setattr(configs, "autotuning", lambda t: True)
        assert K._chunk_rows(f32, None, V, None) == 64                 # 4 + 4 (e)
        assert K._chunk_rows(bf16, None, V, None) == 80                # 2 + 4 (e), as before
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "5")
    assert K._chunk_rows(bf16, None, V, None) == 5
    # the sweep takes them: 4 rows of 9 tokens, pairs of 18 rows, in chunks of at most 16 rows
    # (each sequence alone), 32 (each pair whole) or 64 (both pairs in one chunk)
    monkeypatch.delenv("TISDPO_CHUNK_TOKENS")
    case, calls = op_case(), []
    real = K.linear_preference_loss_fwd
    monkeypatch.setattr(K, "linear_preference_loss_fwd",
                        lambda z, *a, **k: calls.append(z.shape[0]) or real(z, *a, **k))
    for rows, seen in ((16, [9] * 4), (32, [18, 18]), (64, [36])):
        monkeypatch.setattr(_env, "dz_budget_bytes", lambda rows=rows: rows * 4 * V)
        calls.clear()
        with torch.no_grad():
            linear_preference_loss(case["hidden"].float(), case["weight"].float(),
                                   case["labels"], config=get_preset("simpo").config,
                                   impl="triton")
        assert calls == seen, (rows, calls)


# ---------------------------------------------------------------------------- the GPU build

def _aot_compile_epilogue():
    """Compile the epilogue with its sm90/sm80 configs (tests/aot.py; run through
    ``aot.offline``). Returns [(name, arch, shared bytes, ptx, regs, spills)]."""
    from aot import compile_kernel

    from tisdpo_kernels._triton import linear_preference_loss as L
    from tisdpo_kernels._triton.configs import CONFIGS

    fp32_ptrs = {"c_ptr", "kg_ptr", "logp_ptr", "ref_logp_ptr", "kl_ptr", "st_ptr"}
    out = []
    # every launch the sweep makes, with a reference head and either KL, with and without a
    # softcap: a long pair's chunk (statistics and e at once), a chunk of whole pairs
    # (statistics saved, then e from them)
    launches = [(kl, cap, write_e, stats) for kl in (1, 2) for cap in (True, False)
                for write_e, stats in ((True, 0), (False, 1), (True, 2))]
    for arch in (90, 80):
        cfg = CONFIGS["linear_preference_loss_fwd"]["sm90" if arch >= 90 else "sm80"]

        def ptr_type(n):
            return "*i64" if n == "t_ptr" else "*fp32" if n in fp32_ptrs else "*bf16"

        for kl, cap, write_e, stats in launches:
            flags = dict(HAS_SOFTCAP=cap, HAS_REF=True, KL=kl, WRITE_E=write_e, STATS=stats)
            out.append((f"epilogue-KL{kl}-cap{int(cap)}-E{int(write_e)}-STATS{stats}-sm{arch}",
                        arch,
                        *compile_kernel(L.linear_preference_loss_fwd_kernel, arch,
                                        {**flags, **cfg.meta}, ptr_type,
                                        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                        unaligned=("cap", "C"))))
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real tests compile it")
def test_epilogue_compiles_for_hopper_and_ampere():
    """The tuned configs compile (AOT, no GPU), fit in shared memory, do not spill registers
    and have no atomic instruction."""
    from aot import ATOMIC, SMEM_LIMIT, offline

    for name, arch, shared, ptx, regs, spills in offline(__file__, "_aot_compile_epilogue"):
        assert shared <= SMEM_LIMIT[arch], f"{name}: {shared} B shared memory"
        atomic = ATOMIC.search(ptx)
        assert atomic is None, f"{name}: atomic instruction {atomic and atomic.group(0)}"
        assert spills == 0, f"{name}: {spills} bytes of register spills ({regs} registers)"
