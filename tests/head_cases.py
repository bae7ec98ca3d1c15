"""Shared cases and three-way oracle runs for the LM-head ops (linear_logprobs, linear_token_kl).

Builders return float64 masters, targets with ignored (-100) entries and upstream gradients
with zero entries; the ``run_*`` functions cast the masters, optionally put them in NaN buffers,
call the public op and take autograd gradients; ``check_three_way`` compares an implementation
against the reference at the test dtype and in float64 (tests/numerics.py), with the rounding
magnitudes of tests/magnitudes.py.
"""
import contextlib

import torch

import magnitudes
import tisdpo_kernels as tk
from dispatch_probe import OpProbe
from numerics import accumulation_dtype, assert_oracle, nan_buffer_view

POLICY = ("hidden", "weight", "bias")
REF = ("ref_hidden", "ref_weight", "ref_bias")
# (N, V) of a Triton backward in several dz slabs of each kind (slabs.slab_plan): chunks of
# rows when N ≥ V, bands of vocabulary columns when N < V
SLAB_SHAPES = {"rows": (300, 123), "columns": (300, 1100)}


def several_slabs(monkeypatch, kind: str, need_dh: bool = True, extra: int = 0, d: int = 31):
    """(N, V) of SLAB_SHAPES[kind], with the dz budget set to about a quarter of the float32
    (half of the bf16) logits of N × V, plus the band loop's [N, D] buffers for bands, and a
    check that the backward's plan is ``kind`` in several slabs for dz in float32 (the
    interpreter) and bf16 (a GPU); ``extra``: bytes per logit of other slab-shaped buffers
    (the KL head's reference logits under the gemm mode)."""
    from tisdpo_kernels import _env
    from tisdpo_kernels._triton.slabs import slab_plan
    n, v = SLAB_SHAPES[kind]
    budget = n * v if kind == "rows" else n * v * (2 + extra) // 2 + 8 * n * d
    monkeypatch.setattr(_env, "dz_budget_bytes", lambda: budget)
    for size in (4, 2):
        got, width = slab_plan(n, v, d, size, extra, need_dh, True, False)
        assert got == kind and width < (n if kind == "rows" else v), (size, got, width)
    return n, v


def _targets(v, shape, ignored):
    y = torch.randint(0, v, shape)
    flat = y.view(-1)
    for i in ignored:
        if i < flat.numel():
            flat[i] = -100
    return y


def _upstream(shape, *, zeros, silent=None, second_scale=1.0):
    """Two float64 upstream gradients; ``zeros``: a slice per gradient set to 0, ``silent``: a
    slice set to 0 in both (tokens with no upstream at all)."""
    g1 = torch.randn(shape, dtype=torch.float64)
    g2 = second_scale * torch.randn(shape, dtype=torch.float64)
    for g, s in zip((g1, g2), zeros):
        g.view(-1)[s] = 0.0
    if silent is not None:
        g1.view(-1)[silent] = 0.0
        g2.view(-1)[silent] = 0.0
    return g1, g2


def logprobs_case(n, d, v, *, bias=True, ignored=(3, 10, 11), scale=2.0, shape=None):
    """float64 masters hidden, weight, bias; targets; upstream grads on (logp, lse)."""
    shape = (n,) if shape is None else shape
    h = torch.randn(*shape, d, dtype=torch.float64)
    w = torch.randn(v, d, dtype=torch.float64) * (scale / d ** 0.5)
    b = torch.randn(v, dtype=torch.float64) if bias else None
    y = _targets(v, shape, ignored)
    grads = _upstream(shape, zeros=(slice(None, None, 5), slice(1, None, 4)), second_scale=0.5)
    return {"hidden": h, "weight": w, "bias": b}, y, grads


def peaked_logprobs_case(n, d, v, *, bias=True, ignored=(3, 10, 11), zipf=1.5, noise=2.0):
    """``logprobs_case`` with logits shaped like a trained model's: a Zipf prior −zipf·ln(1+v)
    carried by a constant hidden feature, noise of std ``noise`` in the other D−1, targets
    drawn from the prior (so most of a token's probability sits in few columns)."""
    h = torch.randn(n, d, dtype=torch.float64)
    h[:, 0] = 1.0
    w = torch.randn(v, d, dtype=torch.float64) * (noise / (d - 1) ** 0.5)
    prior = -zipf * torch.log1p(torch.arange(v, dtype=torch.float64))
    w[:, 0] = prior
    b = 0.1 * torch.randn(v, dtype=torch.float64) if bias else None
    y = torch.multinomial(torch.softmax(prior, 0), n, replacement=True)
    for i in ignored:
        if i < n:
            y[i] = -100
    grads = _upstream((n,), zeros=(slice(None, None, 5), slice(1, None, 4)), second_scale=0.5)
    return {"hidden": h, "weight": w, "bias": b}, y, grads


def kl_case(n, d, dr, v, *, bias=True, ref_bias=None, ignored=(3, 10, 11), scale=2.0,
            ref_scale=2.0, shape=None, zeros=(slice(None, None, 4), slice(1, None, 5)),
            silent=None):
    """float64 masters of both heads (``ref_bias`` defaults to ``bias``), targets, and
    upstream grads on (kl, logp)."""
    shape = (n,) if shape is None else shape
    ref_bias = bias if ref_bias is None else ref_bias
    m = {
        "hidden": torch.randn(*shape, d, dtype=torch.float64),
        "weight": torch.randn(v, d, dtype=torch.float64) * (scale / d ** 0.5),
        "bias": torch.randn(v, dtype=torch.float64) if bias else None,
        "ref_hidden": torch.randn(*shape, dr, dtype=torch.float64),
        "ref_weight": torch.randn(v, dr, dtype=torch.float64) * (ref_scale / dr ** 0.5),
        "ref_bias": torch.randn(v, dtype=torch.float64) if ref_bias else None,
    }
    y = _targets(v, shape, ignored)
    return m, y, _upstream(shape, zeros=zeros, silent=silent)


def _prepare(masters, y, *, dtype, ref_dtype, device, view, as_dtype, wrt):
    """Masters cast to ``dtype`` (the reference head to ``ref_dtype``), then to ``as_dtype``
    for the float64 truth (the same values, computed exactly), moved to ``device``."""
    ts = {}
    for k, t in masters.items():
        if t is None:
            ts[k] = None
            continue
        t = t.to(ref_dtype if (k in REF and ref_dtype is not None) else dtype)
        if as_dtype is not None:
            t = t.to(as_dtype)
        if device is not None:
            t = t.to(device)
        if view:
            t = nan_buffer_view(t)
        ts[k] = t.requires_grad_(k in wrt)
    yy = y if device is None else y.to(device)
    return ts, (nan_buffer_view(yy) if view else yy)


def upstream(g, dtype, out_dtype):
    """An upstream gradient as the op receives it: rounded to the outputs' dtype at ``dtype``
    (float32 unless float64), then held in ``out_dtype`` (float64 for the truth, which thus
    sees the same rounded values)."""
    return g.to(accumulation_dtype(dtype)).to(out_dtype)


def _grads(out, outs, grads, dtype, ts, wrt, device):
    """Add to ``out`` the gradients of ``outs`` (upstream ``grads``, see ``upstream``) with
    respect to the inputs named in ``wrt`` that exist."""
    names = [k for k in wrt if ts[k] is not None]
    if names:
        gd = outs[0].dtype
        gs = torch.autograd.grad(
            outs, [ts[k] for k in names],
            [upstream(g, dtype, gd) if device is None else upstream(g, dtype, gd).to(device)
             for g in grads])
        out.update({f"d_{k}": g for k, g in zip(names, gs)})
    return out


def run_logprobs(impl, masters, y, grads, *, dtype, device=None, softcap=None, wrt=POLICY,
                 view=False, as_dtype=None, filter_eps=None):
    """(logp, lse) of the public op and the gradients of the inputs named in ``wrt``."""
    ts, yy = _prepare(masters, y, dtype=dtype, ref_dtype=None, device=device, view=view,
                      as_dtype=as_dtype, wrt=wrt)
    extra = {} if filter_eps is None else {"filter_eps": filter_eps}
    logp, lse = tk.linear_logprobs(ts["hidden"], ts["weight"], yy, bias=ts["bias"],
                                   softcap=softcap, return_lse=True, impl=impl, **extra)
    return _grads({"logp": logp, "lse": lse}, [logp, lse], grads, dtype, ts, wrt, device)


def run_kl(impl, masters, y, grads, *, dtype, device=None, ref_dtype=None,
           direction="policy_ref", softcap=None, wrt=POLICY, view=False, as_dtype=None,
           use=("kl", "logp")):
    """(kl, logp, ref_logp) and policy gradients; ``use``: which outputs carry an upstream
    gradient."""
    ts, yy = _prepare(masters, y, dtype=dtype, ref_dtype=ref_dtype, device=device, view=view,
                      as_dtype=as_dtype, wrt=wrt)
    kl, logp, ref_logp = tk.linear_token_kl(
        ts["hidden"], ts["weight"], ts["ref_hidden"], ts["ref_weight"], yy, bias=ts["bias"],
        ref_bias=ts["ref_bias"], direction=direction, softcap=softcap, impl=impl)
    outs = {"kl": kl, "logp": logp}
    g = dict(zip(("kl", "logp"), grads))
    return _grads({"kl": kl, "logp": logp, "ref_logp": ref_logp}, [outs[u] for u in use],
                  [g[u] for u in use], dtype, ts, wrt, device)


def exact(masters, dtype, ref_dtype=None):
    """The masters as the test passes them (rounded to ``dtype``, the reference head to
    ``ref_dtype``), held exactly in float64."""
    return {k: None if t is None else
            t.to(ref_dtype if (k in REF and ref_dtype is not None) else dtype).double()
            for k, t in masters.items()}


def head_magnitudes(run_fn, masters, y, grads, *, dtype, softcap=None, wrt=POLICY,
                    ref_dtype=None, direction="policy_ref", use=("kl", "logp"), **_):
    """tests/magnitudes.py's rounding magnitudes of every output ``run_fn`` returns."""
    x = exact(masters, dtype, ref_dtype)
    g = [upstream(t, dtype, torch.float64) for t in grads]
    names = tuple(f"d_{k}" for k in wrt if x[k] is not None)
    if run_fn is run_logprobs:
        return magnitudes.logprobs(x["hidden"], x["weight"], x["bias"], y, g[0], g[1],
                                   softcap=softcap, grads=names)
    gk, gl = (g[0] if "kl" in use else None), (g[1] if "logp" in use else None)
    return magnitudes.token_kl(x["hidden"], x["weight"], x["bias"], x["ref_hidden"],
                               x["ref_weight"], x["ref_bias"], y, gk, gl, direction=direction,
                               softcap=softcap, grads=names)


def check_three_way(run_fn, impl, masters, y, grads, *, dtype, check_dtypes=False,
                    around_actual=contextlib.nullcontext, **kw):
    """truth = reference in float64, ref = reference at ``dtype``, actual = ``impl``; every
    output and gradient through assert_oracle with its rounding magnitude. ``check_dtypes``:
    also require actual and ref to have the same dtype. ``around_actual()``: a context the
    actual run (forward and backward) alone runs in."""
    truth = run_fn("reference", masters, y, grads, dtype=dtype, as_dtype=torch.float64, **kw)
    ref = run_fn("reference", masters, y, grads, dtype=dtype, **kw)
    with around_actual():
        act = run_fn(impl, masters, y, grads, dtype=dtype, **kw)
    mags = head_magnitudes(run_fn, masters, y, grads, dtype=dtype, **kw)
    assert act.keys() == truth.keys()
    for k in truth:
        if check_dtypes:
            assert act[k].dtype == ref[k].dtype, f"{k}: dtype {act[k].dtype} != {ref[k].dtype}"
        assert_oracle(act[k], ref[k], truth[k], dtype=dtype, name=k, magnitude=mags[k])
    return act


def assert_no_host_sync(run_fn, masters, y, grads, monkeypatch):
    """Forward and backward of the torch backend through the public op (value checks off, as
    on CUDA by default, chunks of 10 tokens): no host-synchronising op anywhere."""
    monkeypatch.setenv("TISDPO_CHECKS", "off")
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "10")
    with OpProbe() as probe:
        run_fn("torch", masters, y, grads, dtype=torch.float32, softcap=3.0)
    assert not probe.sync_ops(), probe.sync_ops()
