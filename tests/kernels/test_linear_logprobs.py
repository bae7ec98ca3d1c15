"""linear_logprobs through the public op with impl="torch", against the reference oracle.

Every value and gradient is checked three ways (tests/numerics.py): the reference in
float64 (truth), the reference at the test dtype (eager), and the chunked torch backend.
"""
from functools import partial

import pytest
import torch

import tisdpo_kernels as tk
from dispatch_probe import OpProbe
from head_cases import assert_no_host_sync, check_three_way, logprobs_case, run_logprobs
from markers import triton_importable
from numerics import assert_oracle
from tisdpo_kernels._impl import Impl, resolve_impl
from tisdpo_kernels._torch.linear_logprobs import linear_logprobs as torch_linear_logprobs
from tisdpo_kernels.config import HeadOptions


N, D, V = 47, 31, 123
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]


def make_inputs(n=N, d=D, v=V, **kw):
    return logprobs_case(n, d, v, **kw)


run = run_logprobs
check = partial(check_three_way, run_logprobs, "torch")


@pytest.mark.parametrize("chunk", [1, 5, 2048])
@pytest.mark.parametrize("bias,softcap,scale", [
    (False, None, 2.0), (True, None, 2.0), (False, 4.0, 2.0), (True, 2.5, 2.0), (True, None, 40.0),
], ids=["plain", "bias", "softcap", "bias+softcap", "large-logits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_matches_oracle(dtype, bias, softcap, scale, chunk, monkeypatch):
    """Odd shapes, ignored tokens, zero/negative upstream grads on logp and lse, chunk sizes
    that do not divide N (and chunk 1); logits of a few hundred ("large-logits"), whose
    exponentials overflow float32 unless the logsumexp takes out each row's max."""
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", str(chunk))
    masters, y, grads = make_inputs(bias=bias, scale=scale)
    act = check(masters, y, grads, dtype=dtype, softcap=softcap)
    ignored = y == -100
    assert torch.all(act["logp"][ignored] == 0) and torch.all(act["lse"][ignored] == 0)
    assert act["logp"].dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_all_ignored_gives_zeros(dtype, monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "8")
    masters, y, grads = make_inputs(ignored=range(N))
    act = check(masters, y, grads, dtype=dtype, softcap=3.0)
    for k, t in act.items():
        assert torch.all(t == 0), k


def test_lse_gradient_alone_is_softmax():
    """Only lse is used (a z-loss): d lse / d z = softmax flows to every input."""
    masters, y, grads = make_inputs()
    check(masters, y, (torch.zeros_like(grads[0]), grads[1]), dtype=torch.float32)


@pytest.mark.parametrize("wrt", [("hidden",), ("weight",), ("bias",), ("hidden", "bias")],
                         ids=lambda w: "+".join(w))
def test_partial_requires_grad(wrt, monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "16")
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=torch.float32, wrt=wrt)


def _backward_probe(wrt, chunk=16):
    masters, y, (g1, g2) = make_inputs()
    ts = {k: v.float().requires_grad_(k in wrt) for k, v in masters.items()}
    logp, lse = torch_linear_logprobs(ts["hidden"], ts["weight"], y, ts["bias"],
                                      HeadOptions(), chunk_tokens=chunk)
    with OpProbe() as probe:
        torch.autograd.backward((logp, lse), (g1.float(), g2.float()))
    return probe, [k for k in ts if ts[k].grad is not None]


def test_only_requested_gradients_get_work():
    probe, got = _backward_probe(("hidden",))
    assert got == ["hidden"]
    assert (V, D) not in [s for _, s in probe.out_shapes], "d_weight computed but not needed"
    probe, got = _backward_probe(("weight",))
    assert got == ["weight"]
    mm_shapes = [s for op, s in probe.out_shapes if op in ("mm", "addmm", "matmul")]
    assert all(s[-1] != D or s[0] == V for s in mm_shapes), "d_hidden computed but not needed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batched_hidden(dtype, monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "7")
    masters, y, grads = make_inputs(shape=(3, 13), ignored=(0, 13, 14, 38))
    act = check(masters, y, grads, dtype=dtype, softcap=5.0)
    assert act["logp"].shape == (3, 13) and act["d_hidden"].shape == (3, 13, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_views_in_nan_buffers(dtype, monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "6")
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=dtype, softcap=3.0, view=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_vocab(dtype, monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "4")
    masters, y, grads = make_inputs(n=6, d=24, v=32000, ignored=(2,), scale=4.0)
    check(masters, y, grads, dtype=dtype)


def test_autocast_does_not_change_the_math():
    """Under CPU autocast the op still computes in its input dtype, in both passes."""
    masters, y, grads = make_inputs()
    truth = run("reference", masters, y, grads, dtype=torch.float32, as_dtype=torch.float64)
    ref = run("reference", masters, y, grads, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        act = run("torch", masters, y, grads, dtype=torch.float32)
    for k in truth:
        assert_oracle(act[k], ref[k], truth[k], dtype=torch.float32, name=k)


def test_float64_inputs_give_float64():
    masters, y, grads = make_inputs()
    act = run("torch", masters, y, grads, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in act.values())


def test_empty_input():
    masters, y, grads = make_inputs(n=0, ignored=())
    act = check(masters, y, grads, dtype=torch.float32)
    assert act["logp"].shape == (0,) and torch.all(act["d_weight"] == 0)


def test_chunk_tokens_override_and_env_validation(monkeypatch):
    masters, y, _ = make_inputs()
    h, w, b = (masters[k].float() for k in ("hidden", "weight", "bias"))
    opts = HeadOptions(return_lse=True)
    truth = tk.linear_logprobs(h.double(), w.double(), y, bias=b.double(), impl="reference")
    ref = tk.linear_logprobs(h, w, y, bias=b, impl="reference")
    for chunk in (1, 3, 46, 47, 48):
        logp, _ = torch_linear_logprobs(h, w, y, b, opts, chunk_tokens=chunk)
        assert_oracle(logp, ref, truth, dtype=torch.float32, name=f"logp chunk={chunk}")
    for bad in (0, -2, True, 2.5):
        with pytest.raises(ValueError, match="chunk_tokens"):
            torch_linear_logprobs(h, w, y, b, opts, chunk_tokens=bad)
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "0")
    with pytest.raises(ValueError, match="TISDPO_CHUNK_TOKENS"):
        tk.linear_logprobs(h, w, y, impl="torch")


def test_never_allocates_tokens_by_vocab():
    """Every tensor any op creates (forward and backward) is at most chunk × V, and at most
    3 of them are alive at once: with N × V 32× larger, a materialised logits tensor (or its
    gradient, or chunks kept alive across iterations) cannot hide."""
    n, d, v, chunk = 512, 16, 1024, 16
    h = torch.randn(n, d, requires_grad=True)
    w = (0.3 * torch.randn(v, d)).requires_grad_()
    b = torch.randn(v, requires_grad=True)
    y = torch.randint(0, v, (n,))
    y[::7] = -100
    bound = 4 * max(chunk * v, n * d, v * d)
    assert 4 * n * v >= 32 * bound
    with OpProbe() as probe:
        logp, lse = torch_linear_logprobs(h, w, y, b, HeadOptions(softcap=10.0),
                                          chunk_tokens=chunk)
        (logp.sum() - 0.1 * lse.sum()).backward()
    assert probe.max_bytes <= bound, f"{probe.max_op} exceeds chunk x V"
    grads_and_stats = 4 * (n * d + v * d + v + 8 * n)   # d_hidden, d_weight, d_bias, [N]s
    # at most 3 chunk x V buffers alive at once (logits, a softmax temporary, the softcap factor)
    assert probe.peak_live_bytes <= 3 * 4 * chunk * v + grads_and_stats, probe.peak_live_bytes
    assert not probe.sync_ops(), probe.sync_ops()
    # the detector works: the materialising reference trips it
    with OpProbe() as probe:
        tk.linear_logprobs(h, w, y, bias=b, impl="reference").sum().backward()
    assert probe.max_bytes >= 4 * n * v


def test_no_host_sync_in_training_step(monkeypatch):
    """Forward and backward through the public op: no .item()/bool()/nonzero anywhere
    (value checks off, as they are on CUDA by default)."""
    assert_no_host_sync(run, *make_inputs(), monkeypatch)


# ----------------------------------------------------------------------------- validation

def _small():
    return torch.randn(5, 4), torch.randn(7, 4), torch.tensor([0, 6, -100, 3, 2])


def test_rejects_shape_and_dtype_mismatch():
    h, w, y = _small()
    with pytest.raises(ValueError, match="hidden has D=4 but weight has D=3"):
        tk.linear_logprobs(h, w[:, :3], y, impl="torch")
    with pytest.raises(ValueError, match="targets shape"):
        tk.linear_logprobs(h, w, y[:4], impl="torch")
    with pytest.raises(ValueError, match="dtype"):
        tk.linear_logprobs(h.bfloat16(), w, y, impl="torch")
    with pytest.raises(ValueError, match="bias must be"):
        tk.linear_logprobs(h, w, y, bias=torch.zeros(6), impl="torch")
    with pytest.raises(ValueError, match="integer"):
        tk.linear_logprobs(h, w, y.float(), impl="torch")
    with pytest.raises(ValueError, match="softcap"):
        tk.linear_logprobs(h, w, y, softcap=0.0, impl="torch")


def test_rejects_out_of_range_target_naming_index():
    h, w, y = _small()
    y[3] = 7
    with pytest.raises(ValueError, match=r"targets\[3\] = 7 lies outside \[0, 7\)"):
        tk.linear_logprobs(h, w, y, impl="torch")
    y[3] = -5
    with pytest.raises(ValueError, match=r"targets\[3\] = -5"):
        tk.linear_logprobs(h, w, y, impl="torch")


def test_impl_resolution(monkeypatch):
    h, w, y = _small()
    with pytest.raises(ValueError, match="valid choices are 'auto', 'triton', 'torch', "
                                         "'reference'"):
        tk.linear_logprobs(h, w, y, impl="cuda")
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu, op="x") is Impl.TORCH
    assert resolve_impl("torch", cpu, op="x") is Impl.TORCH
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='torch'"):
        resolve_impl("triton", cpu, op="linear_logprobs")



@pytest.mark.skipif(not triton_importable(), reason="needs triton")
@pytest.mark.parametrize("triton_v,numpy_v,blocked", [
    ("3.6.0", "2.4.6", True), ("3.6.1", "2.5.0", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False), ("3.8.0+git3f1a2b", "2.4.6", False)])
def test_triton_interpreter_versions(monkeypatch, triton_v, numpy_v, blocked):
    """impl='triton' on the CPU: triton 3.6's interpreter cannot run with numpy >= 2.4 (a
    one-line error naming both versions and the fix), every other pair can."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_v)
    monkeypatch.setattr(numpy, "__version__", numpy_v)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    if blocked:
        with pytest.raises(ValueError, match=rf"linear_logprobs: .*triton {triton_v}'s "
                                             rf"interpreter cannot run with numpy {numpy_v}; "
                                             r"install triton>=3.7 or numpy<2.4"):
            resolve_impl("triton", cpu, op="linear_logprobs")
    else:
        assert resolve_impl(Impl.TRITON, cpu, op="x") is Impl.TRITON
