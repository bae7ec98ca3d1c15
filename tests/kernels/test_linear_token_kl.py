"""linear_token_kl through the public op with impl="torch", against the reference oracle.

Values (kl, logp, ref_logp) and policy gradients (from kl and logp) are checked three ways
(tests/numerics.py). The reference head has its own width D' != D and is a constant.
"""
from functools import partial

import pytest
import torch

import tisdpo_kernels as tk
from dispatch_probe import OpProbe
from head_cases import POLICY, assert_no_host_sync, check_three_way, kl_case, run_kl
from numerics import assert_oracle
from tisdpo_kernels._torch.linear_token_kl import linear_token_kl as torch_token_kl
from tisdpo_kernels.config import KLOptions


N, D, DR, V = 47, 31, 20, 123
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]
DIRECTIONS = ["policy_ref", "ref_policy"]


def make_inputs(n=N, d=D, dr=DR, v=V, **kw):
    return kl_case(n, d, dr, v, **kw)


run = run_kl
check = partial(check_three_way, run_kl, "torch")


@pytest.mark.parametrize("chunk", [1, 7, 2048])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 3.0)],
                         ids=["plain", "bias+softcap"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_matches_oracle(dtype, direction, bias, softcap, chunk, monkeypatch):
    """D' != D, ignored tokens, zero/negative upstream grads on kl and logp, chunk sizes
    that do not divide N (and chunk 1)."""
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", str(chunk))
    masters, y, grads = make_inputs(bias=bias)
    act = check(masters, y, grads, dtype=dtype, direction=direction, softcap=softcap)
    ignored = y == -100
    for k in ("kl", "logp", "ref_logp"):
        assert torch.all(act[k][ignored] == 0), k
    assert torch.all(act["kl"][~ignored] >= -1e-5)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_underflowing_probabilities_stay_finite(dtype, direction, monkeypatch):
    """Logits spanning hundreds of nats: most probabilities are exactly 0 in float32, where
    softmax(z).log() would give 0·(−inf) = NaN. The log-softmax forms stay finite and accurate.

    The oracle runs in one chunk: with KL ≈ 300 nats the error is set by the fp32 rounding of
    the few dominant logits, and a chunk's matmul rounds them differently from the eager
    full-N matmul (a different draw of the same size, up to 2× apart here). Chunked runs are
    checked for finiteness here, and against the oracle at moderate logits in
    test_matches_oracle.
    """
    masters, y, grads = make_inputs(scale=150.0, ref_scale=150.0)
    z = masters["hidden"].float() @ masters["weight"].float().T
    assert (torch.softmax(z, -1) == 0).float().mean() > 0.5      # the premise holds
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", str(N))
    check(masters, y, grads, dtype=dtype, direction=direction)
    for chunk in ("1", "9"):
        monkeypatch.setenv("TISDPO_CHUNK_TOKENS", chunk)
        act = run("torch", masters, y, grads, dtype=dtype, direction=direction)
        assert all(torch.isfinite(t).all() for t in act.values()), chunk


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_identical_heads_give_zero_kl(direction):
    masters, y, grads = make_inputs(d=D, dr=D)
    for k in ("hidden", "weight", "bias"):
        masters[f"ref_{k}"] = masters[k]
    act = check(masters, y, grads, dtype=torch.float32, direction=direction)
    assert torch.all(act["kl"].abs() < 1e-5)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_all_ignored_gives_zeros(direction, monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "8")
    masters, y, grads = make_inputs(ignored=range(N))
    act = check(masters, y, grads, dtype=torch.bfloat16, direction=direction, softcap=3.0)
    for k, t in act.items():
        assert torch.all(t == 0), k


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_reference_in_another_dtype(direction):
    """fp32 policy against an fp16 reference (the official TIS-DPO setup)."""
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=torch.float32, ref_dtype=torch.float16, direction=direction)


@pytest.mark.parametrize("wrt", [("hidden",), ("weight",), ("bias",)], ids=lambda w: w[0])
def test_partial_requires_grad(wrt, monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "16")
    masters, y, grads = make_inputs()
    check(masters, y, grads, dtype=torch.float32, wrt=wrt, direction="ref_policy")


def test_reference_inputs_get_no_gradient():
    masters, y, _ = make_inputs()
    ts = {k: v.float().requires_grad_() for k, v in masters.items()}
    kl, logp, ref_logp = tk.linear_token_kl(
        ts["hidden"], ts["weight"], ts["ref_hidden"], ts["ref_weight"], y, bias=ts["bias"],
        ref_bias=ts["ref_bias"], impl="torch")
    assert not ref_logp.requires_grad
    (kl.sum() + logp.sum()).backward()
    assert all(ts[k].grad is not None for k in POLICY)
    assert all(ts[k].grad is None for k in ("ref_hidden", "ref_weight", "ref_bias"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batched_views_in_nan_buffers(dtype, monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "5")
    masters, y, grads = make_inputs(shape=(2, 11), ignored=(0, 11, 20))
    act = check(masters, y, grads, dtype=dtype, direction="policy_ref", softcap=4.0, view=True)
    assert act["kl"].shape == (2, 11) and act["d_hidden"].shape == (2, 11, D)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_vocab(dtype, direction, monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "3")
    masters, y, grads = make_inputs(n=5, d=24, dr=16, v=32000, ignored=(1,), scale=4.0)
    check(masters, y, grads, dtype=dtype, direction=direction)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_never_allocates_tokens_by_vocab(direction):
    """Every tensor created in forward and backward is at most chunk × V and at most 5 are
    alive at once, with N × V 32× larger; the materialising reference trips the probe."""
    n, d, dr, v, chunk = 512, 16, 12, 1024, 16
    h = torch.randn(n, d, requires_grad=True)
    w = (0.3 * torch.randn(v, d)).requires_grad_()
    b = torch.randn(v, requires_grad=True)
    rh, rw = torch.randn(n, dr), 0.3 * torch.randn(v, dr)
    y = torch.randint(0, v, (n,))
    bound = 4 * max(chunk * v, n * d, v * d)
    assert 4 * n * v >= 32 * bound
    opts = KLOptions(direction=direction, softcap=10.0)
    with OpProbe() as probe:
        kl, logp, _ = torch_token_kl(h, w, rh, rw, y, b, None, opts, chunk_tokens=chunk)
        (kl.sum() + logp.sum()).backward()
    assert probe.max_bytes <= bound, f"{probe.max_op} exceeds chunk x V"
    grads_and_stats = 4 * (n * d + v * d + v + 8 * n)   # d_hidden, d_weight, d_bias, [N]s
    # at most 5 chunk x V buffers alive at once (both heads' log-probs, p, a temporary, the softcap factor)
    assert probe.peak_live_bytes <= 5 * 4 * chunk * v + grads_and_stats, probe.peak_live_bytes
    assert not probe.sync_ops(), probe.sync_ops()
    with OpProbe() as probe:
        kl, logp, _ = tk.linear_token_kl(h, w, rh, rw, y, bias=b, direction=direction,
                                         impl="reference")
        (kl.sum() + logp.sum()).backward()
    assert probe.max_bytes >= 4 * n * v


def test_no_host_sync_in_training_step(monkeypatch):
    assert_no_host_sync(run, *make_inputs(), monkeypatch)


def test_chunk_tokens_override():
    masters, y, _ = make_inputs()
    f = {k: (None if t is None else t.float()) for k, t in masters.items()}
    args = (f["hidden"], f["weight"], f["ref_hidden"], f["ref_weight"], y)
    truth = tk.linear_token_kl(*(a.double() if a.is_floating_point() else a for a in args),
                               bias=f["bias"].double(), ref_bias=f["ref_bias"].double(),
                               impl="reference")[0]
    ref = tk.linear_token_kl(*args, bias=f["bias"], ref_bias=f["ref_bias"],
                             impl="reference")[0]
    for chunk in (1, 46, 47, 48):
        kl = torch_token_kl(*args, f["bias"], f["ref_bias"], KLOptions(), chunk_tokens=chunk)[0]
        assert_oracle(kl, ref, truth, dtype=torch.float32, name=f"kl chunk={chunk}")
    with pytest.raises(ValueError, match="chunk_tokens"):
        torch_token_kl(*args, None, None, KLOptions(), chunk_tokens=0)


# ----------------------------------------------------------------------------- validation

def test_rejects_bad_inputs():
    h, w = torch.randn(5, 4), torch.randn(7, 4)
    rh, rw = torch.randn(5, 3), torch.randn(7, 3)
    y = torch.tensor([0, 6, -100, 3, 2])
    with pytest.raises(ValueError, match="ref_hidden has D=3 but ref_weight has D=2"):
        tk.linear_token_kl(h, w, rh, rw[:, :2], y, impl="torch")
    with pytest.raises(ValueError, match="ref_weight has V=6 but weight has V=7"):
        tk.linear_token_kl(h, w, rh, rw[:6], y, impl="torch")
    with pytest.raises(ValueError, match="direction must be"):
        tk.linear_token_kl(h, w, rh, rw, y, direction="forward", impl="torch")
    with pytest.raises(ValueError, match="ref_hidden dtype"):
        tk.linear_token_kl(h, w, rh.half(), rw, y, impl="torch")
    with pytest.raises(ValueError, match="ref_hidden shape without"):
        tk.linear_token_kl(h, w, rh[:4], rw, y, impl="torch")
    y[1] = 9
    with pytest.raises(ValueError, match=r"targets\[1\] = 9 lies outside \[0, 7\)"):
        tk.linear_token_kl(h, w, rh, rw, y, impl="torch")
    with pytest.raises(ValueError, match="valid choices"):
        tk.linear_token_kl(h, w, rh, rw, y, impl="fused")
