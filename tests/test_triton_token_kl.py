"""linear_token_kl through the public op with impl="triton" (interpreted on CPU), against the
reference oracle.

Every value (kl, logp, ref_logp) and gradient (d_hidden, d_weight, d_bias) is checked three
ways (tests/numerics.py): the reference in float64 (truth), the reference at the test dtype
(eager) and the fused Triton kernels.
"""
import pytest
import torch

import tisdpo_kernels as tk
from markers import requires_cuda, requires_triton
from numerics import assert_oracle, nan_buffer_view

pytestmark = requires_triton

N, D, DR, V = 47, 31, 29, 123
DTYPES = [torch.float32, torch.bfloat16]
DT_IDS = ["fp32", "bf16"]
DIRECTIONS = ["policy_ref", "ref_policy"]
POLICY = ("hidden", "weight", "bias")
REF = ("ref_hidden", "ref_weight", "ref_bias")


def _token_kl_module():
    from tisdpo_kernels._triton import token_kl
    return token_kl


def make_inputs(n=N, d=D, dr=DR, v=V, *, bias=True, ref_bias=True, ignored=(3, 10, 11),
                scale=2.0, ref_scale=2.0, shape=None):
    """float64 masters of both heads, targets, and upstream grads for kl and logp with zero
    and negative entries."""
    shape = (n,) if shape is None else shape
    m = dict(
        hidden=torch.randn(*shape, d, dtype=torch.float64),
        weight=torch.randn(v, d, dtype=torch.float64) * (scale / d ** 0.5),
        bias=torch.randn(v, dtype=torch.float64) if bias else None,
        ref_hidden=torch.randn(*shape, dr, dtype=torch.float64),
        ref_weight=torch.randn(v, dr, dtype=torch.float64) * (ref_scale / dr ** 0.5),
        ref_bias=torch.randn(v, dtype=torch.float64) if ref_bias else None,
    )
    y = torch.randint(0, v, shape)
    flat = y.view(-1)
    for i in ignored:
        if i < flat.numel():
            flat[i] = -100
    g_kl = torch.randn(shape, dtype=torch.float64)
    g_logp = torch.randn(shape, dtype=torch.float64)
    g_kl.view(-1)[::5] = 0.0
    g_logp.view(-1)[1::4] = 0.0
    g_kl.view(-1)[2::7] = 0.0
    g_logp.view(-1)[2::7] = 0.0  # some tokens with no upstream at all
    return m, y, (g_kl, g_logp)


def run(impl, masters, y, grads, *, dtype, ref_dtype=None, direction="policy_ref",
        softcap=None, wrt=POLICY, view=False, as_dtype=None, use=("kl", "logp")):
    """Outputs and policy gradients of the public op. Masters are cast to ``dtype`` (the
    reference head to ``ref_dtype``), then to ``as_dtype`` for the float64 truth (the same
    values, computed exactly). ``use``: which outputs carry an upstream gradient."""
    ts = {}
    for k, t in masters.items():
        if t is None:
            ts[k] = None
            continue
        t = t.to(ref_dtype if (k in REF and ref_dtype is not None) else dtype)
        if as_dtype is not None:
            t = t.to(as_dtype)
        if view:
            t = nan_buffer_view(t)
        ts[k] = t.requires_grad_(k in wrt)
    yy = nan_buffer_view(y) if view else y
    kl, logp, ref_logp = tk.linear_token_kl(
        ts["hidden"], ts["weight"], ts["ref_hidden"], ts["ref_weight"], yy, bias=ts["bias"],
        ref_bias=ts["ref_bias"], direction=direction, softcap=softcap, impl=impl)
    out = {"kl": kl, "logp": logp, "ref_logp": ref_logp}
    names = [k for k in wrt if ts[k] is not None]
    if names:
        outs = {"kl": kl, "logp": logp}
        g = dict(zip(("kl", "logp"), grads))
        gs = torch.autograd.grad([outs[u] for u in use],
                                 [ts[k] for k in names],
                                 [g[u].to(kl.dtype) for u in use])
        out.update({f"d_{k}": t for k, t in zip(names, gs)})
    return out


def check(masters, y, grads, *, dtype, **kw):
    truth = run("reference", masters, y, grads, dtype=dtype, as_dtype=torch.float64, **kw)
    ref = run("reference", masters, y, grads, dtype=dtype, **kw)
    act = run("triton", masters, y, grads, dtype=dtype, **kw)
    assert act.keys() == truth.keys()
    for k in truth:
        assert_oracle(act[k], ref[k], truth[k], dtype=dtype, name=k)
    return act


@pytest.fixture
def blocks(monkeypatch):
    """Override the kernels' configs: blocks(fwd=dict(...), bwd=dict(...))."""
    mod = _token_kl_module()

    def set_(fwd=None, bwd=None):
        cfgs = dict(mod._CONFIGS)
        if fwd is not None:
            cfgs[("fwd", "interpret")] = fwd
        if bwd is not None:
            cfgs[("bwd", "interpret")] = bwd
        monkeypatch.setattr(mod, "_CONFIGS", cfgs)
    return set_


VARIANTS = [(False, False, None), (True, True, None), (False, False, 4.0), (True, False, 2.5),
            (False, True, 3.0)]
VARIANT_IDS = ["plain", "bias+refbias", "softcap", "bias+softcap", "refbias+softcap"]


@pytest.mark.parametrize("bias,ref_bias,softcap", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_matches_oracle(dtype, direction, bias, ref_bias, softcap):
    """Odd shapes with D ≠ D', ignored tokens, zero/negative upstream grads on kl and logp."""
    masters, y, grads = make_inputs(bias=bias, ref_bias=ref_bias)
    act = check(masters, y, grads, dtype=dtype, direction=direction, softcap=softcap)
    ignored = y == -100
    for k in ("kl", "logp", "ref_logp"):
        assert act[k].dtype == torch.float32
        assert torch.all(act[k][ignored] == 0), k
    assert torch.all(act["d_hidden"][ignored] == 0)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_all_ignored_gives_zeros(dtype, direction):
    masters, y, grads = make_inputs(ignored=range(N))
    act = check(masters, y, grads, dtype=dtype, direction=direction, softcap=3.0)
    for k, t in act.items():
        assert torch.all(t == 0), k


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_single_active_token(direction):
    """One token carries a gradient: its tile must not be skipped."""
    masters, y, (g_kl, g_logp) = make_inputs(ignored=[i for i in range(N) if i != 20])
    check(masters, y, (g_kl, g_logp), dtype=torch.float32, direction=direction)


@pytest.mark.parametrize("dtype,direction", [(torch.float32, "policy_ref"),
                                             (torch.bfloat16, "ref_policy")],
                         ids=["fp32-policy_ref", "bf16-ref_policy"])
def test_smallest_blocks(dtype, direction, blocks):
    """16-wide blocks: 3 token blocks × 8 vocab tiles × 2 D-chunks, so the running maxima
    move between tiles (the KL accumulator's rescale and shift) and every edge is ragged."""
    cfg = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_D=16)
    blocks(fwd=dict(cfg, num_splits=1), bwd=dict(cfg, GROUP_N=2))
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=dtype, direction=direction, softcap=5.0)


@pytest.mark.parametrize("use", [("kl",), ("logp",)], ids=["kl_only", "logp_only"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_single_upstream(direction, use):
    """Only one output carries a gradient (the other's upstream arrives as None)."""
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=torch.float32, direction=direction, use=use, softcap=5.0)


@pytest.mark.parametrize("wrt", [("hidden",), ("weight",), ("bias",), ("hidden", "bias")],
                         ids=lambda w: "+".join(w))
def test_partial_requires_grad(wrt):
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=torch.float32, direction="policy_ref", wrt=wrt)


def test_reference_inputs_get_no_gradient():
    masters, y, grads = make_inputs()
    ts = {k: t.float().requires_grad_() for k, t in masters.items()}
    kl, logp, ref_logp = tk.linear_token_kl(
        ts["hidden"], ts["weight"], ts["ref_hidden"], ts["ref_weight"], y, bias=ts["bias"],
        ref_bias=ts["ref_bias"], impl="triton")
    assert not ref_logp.requires_grad
    (kl.sum() + logp.sum()).backward()
    assert all(ts[k].grad is None for k in REF)
    assert all(ts[k].grad is not None for k in POLICY)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_extreme_logits_underflow(dtype, direction, blocks):
    """Logits spread over hundreds: many probabilities are ~e^-200 (zero in fp32). No NaN,
    oracle still passes, also through the vocabulary-split combine."""
    blocks(fwd=dict(BLOCK_N=64, BLOCK_V=32, BLOCK_D=32, num_splits=3))
    masters, y, grads = make_inputs(scale=60.0 * D ** 0.5, ref_scale=45.0 * DR ** 0.5)
    truth = run("reference", masters, y, grads, dtype=torch.float64, direction=direction)
    logp_all = torch.log_softmax(masters["hidden"] @ masters["weight"].T + masters["bias"], -1)
    assert logp_all.min() < -200 and truth["kl"].max() > 10  # the regime is really extreme
    check(masters, y, grads, dtype=dtype, direction=direction)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_views_in_nan_buffers(dtype):
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=dtype, direction="ref_policy", softcap=3.0, view=True)


def test_reference_head_in_another_dtype():
    """bf16 policy against an fp32 reference head (and D' ≠ D)."""
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=torch.bfloat16, ref_dtype=torch.float32,
          direction="policy_ref", softcap=4.0)


def test_batched_hidden():
    masters, y, grads = make_inputs(shape=(3, 13), ignored=(0, 13, 14, 38))
    act = check(masters, y, grads, dtype=torch.float32, direction="ref_policy")
    assert act["kl"].shape == (3, 13) and act["d_hidden"].shape == (3, 13, D)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gpu_like_blocks(direction, blocks):
    """Many programs: 4 token blocks (one fully ignored) × 8 vocab tiles, vocabulary split
    3 ways in the forward (uneven), ragged last group in the backward's grouped order."""
    blocks(fwd=dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_splits=3),
           bwd=dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, GROUP_N=3))
    n = 256
    masters, y, grads = make_inputs(n=n, d=64, dr=48, v=1000,
                                    ignored=list(range(64, 128)) + [5, 200, 255])
    check(masters, y, grads, dtype=torch.bfloat16, direction=direction, softcap=6.0)


def test_empty_input():
    masters, y, grads = make_inputs(n=0, ignored=())
    act = check(masters, y, grads, dtype=torch.float32)
    assert act["kl"].shape == (0,) and torch.all(act["d_weight"] == 0)


def test_bad_blocks_and_dtypes_raise(blocks):
    masters, y, _ = make_inputs()
    f = {k: None if t is None else t.float() for k, t in masters.items()}
    args = (f["hidden"], f["weight"], f["ref_hidden"], f["ref_weight"], y)
    blocks(fwd=dict(BLOCK_N=8, BLOCK_V=128, BLOCK_D=32))
    with pytest.raises(ValueError, match="BLOCK_N=8"):
        tk.linear_token_kl(*args, impl="triton")
    blocks(fwd=dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32))
    d = {k: None if t is None else t for k, t in masters.items()}
    with pytest.raises(ValueError, match="float64"):
        tk.linear_token_kl(d["hidden"], d["weight"], d["ref_hidden"], d["ref_weight"], y,
                           impl="triton")


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
    w64 = w.double().requires_grad_()
    dw64 = torch.zeros(v, d, dtype=torch.float64, device=dev)
    for s in range(0, n, chunk):
        hh = h[s:s + chunk].double().requires_grad_()
        kl, lp, rlp = R.linear_token_kl(hh, w64, hr[s:s + chunk].double(), wr.double(),
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
