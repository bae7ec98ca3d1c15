"""Opt-in gradient filtering (``filter_eps``) of linear_logprobs (docs/FILTERING.md).

A filtered backward may leave out, per chunk of rows, the vocabulary columns that no row of
the chunk targets and whose probability is below ε in every row of it. What it may lose is
therefore known exactly: for row i only terms a_i·p_ij·s_ij with p_ij < ε, j ≠ y_i
(a_i = ∂L/∂lse_i − ∂L/∂logp_i, s_ij the softcap slope). Each gradient is checked against the
float64 oracle (tests/numerics.py) with that loss added to its bound,

    |actual − truth| ≤ oracle bound + Σ_{dropped-able (i, j)} |a_i|·p_ij·s_ij·|x|,

x the other GEMM operand (|W_j·| for d_hidden, |h_i·| for d_weight, 1 for d_bias). The sets
are taken per row, so the bound holds for any chunking; it is tight enough that a filter
dropping columns above its ε fails it (``test_bound_fails_a_filter_above_its_eps``).
"""
from __future__ import annotations

import pytest
import torch

import magnitudes
import tisdpo_kernels as tk
from head_cases import exact, head_magnitudes, peaked_logprobs_case, run_logprobs, upstream
from markers import requires_triton
from numerics import allowed_error
from tisdpo import TISDPOLoss

N, D, V = 70, 12, 700
EPS = 2.0 ** -6
# the kernels' p carries a relative rounding error far below this at these sizes (fp32
# statistics of logits of size ~10); a column the kernel saw just under ε is under ε·(1+SLACK)
SLACK = 1e-3
F64 = torch.float64
IMPLS = ["torch", pytest.param("triton", marks=requires_triton)]


def _filter_loss(masters, y, grads, *, dtype, eps, softcap=None):
    """The most a correct filter at ``eps`` can change each output (float64, per element)."""
    x = exact(masters, dtype)
    z, _, slope = magnitudes.logits(x["hidden"], x["weight"], x["bias"], softcap)
    p = torch.softmax(z, -1)
    g_lp, g_lse = (upstream(g, dtype, F64) for g in grads)
    valid = y != -100
    a = torch.where(valid, (g_lse - g_lp).abs(), 0.0)
    onehot = torch.nn.functional.one_hot(y.clamp(min=0), z.shape[-1]).bool()
    drop = a[:, None] * p * (1.0 if slope is None else slope)
    drop = torch.where((p < eps * (1 + SLACK)) & ~onehot, drop, 0.0)
    h = torch.where(valid[:, None], x["hidden"], 0.0)
    return {"logp": torch.zeros_like(a), "lse": torch.zeros_like(a),
            "d_hidden": drop @ x["weight"].abs(), "d_weight": drop.T @ h.abs(),
            "d_bias": drop.sum(0)}


def _check(act, ref, truth, mags, extra, *, dtype):
    for k in truth:
        a, r, t = (v.detach().to(F64).cpu() for v in (act[k], ref[k], truth[k]))
        assert torch.isfinite(a).all(), k
        allowed, _ = allowed_error((r - t).abs(), t, mags[k], dtype=dtype,
                                   out_dtype=act[k].dtype)
        over = (a - t).abs() - allowed - extra[k]
        assert over.max().item() <= 0, (
            f"{k}: error beyond the oracle bound plus the filter's loss by "
            f"{over.max().item():.3e} at {tuple(torch.nonzero(over == over.max())[0].tolist())}")


@pytest.fixture
def kept(monkeypatch):
    """Records K, the columns each filtered chunk kept (or None: that chunk ran unfiltered)."""
    from tisdpo_kernels import _common
    from tisdpo_kernels._torch import linear_logprobs as torch_head
    seen = []

    def spy(*args):
        cols = _common.kept_columns(*args)
        seen.append(None if cols is None else cols.numel())
        return cols

    monkeypatch.setattr(torch_head, "kept_columns", spy)
    try:
        from tisdpo_kernels._triton import slabs
        monkeypatch.setattr(slabs, "kept_columns", spy)
    except ImportError:
        pass
    return seen


def _run_three(impl, masters, y, grads, *, dtype, device, eps, softcap=None):
    kw = dict(dtype=dtype, softcap=softcap)
    truth = run_logprobs("reference", masters, y, grads, as_dtype=F64, **kw)
    ref = run_logprobs("reference", masters, y, grads, **kw)
    act = run_logprobs(impl, masters, y, grads, device=device, filter_eps=eps, **kw)
    return act, ref, truth, head_magnitudes(run_logprobs, masters, y, grads, **kw)


@pytest.mark.parametrize("chunks", ["one", "several"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS + [pytest.param("triton-gemm", marks=requires_triton)])
def test_filtered_gradients_within_the_stated_bound(impl, dtype, chunks, device, kept,
                                                    monkeypatch):
    """triton-gemm: the Triton backward reading logits a GEMM wrote (TISDPO_HEAD_LOGITS)."""
    if impl == "triton-gemm":
        monkeypatch.setenv("TISDPO_HEAD_LOGITS", "gemm")
        impl = "triton"
    n = N
    if chunks == "several":
        monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "16")   # torch: chunks of 16 rows
        monkeypatch.setenv("TISDPO_DZ_MB", "1")           # triton: slabs of 374 rows
        n = 400 if impl == "triton" else N
    softcap = 6.0 if chunks == "several" else None
    masters, y, grads = peaked_logprobs_case(n, D, V)
    act, ref, truth, mags = _run_three(impl, masters, y, grads, dtype=dtype, device=device,
                                       eps=EPS, softcap=softcap)
    extra = _filter_loss(masters, y, grads, dtype=dtype, eps=EPS, softcap=softcap)
    _check(act, ref, truth, mags, extra, dtype=dtype)
    assert kept and all(k is not None and k < V // 2 for k in kept), kept   # work was skipped
    assert len(kept) == (1 if chunks == "one" else -(-n // (16 if impl == "torch" else 374)))
    # the forward is exact: logp equals the unfiltered op's bit for bit
    plain = run_logprobs(impl, masters, y, grads, dtype=dtype, device=device, softcap=softcap)
    assert torch.equal(act["logp"], plain["logp"])
    assert not torch.equal(act["d_hidden"], plain["d_hidden"])


def test_bound_fails_a_filter_above_its_eps(device):
    """A backward filtering at 8ε must not pass the bound stated for ε: the check has bite."""
    masters, y, grads = peaked_logprobs_case(N, D, V)
    act, ref, truth, mags = _run_three("torch", masters, y, grads, dtype=torch.float32,
                                       device=device, eps=8 * EPS)
    extra = _filter_loss(masters, y, grads, dtype=torch.float32, eps=EPS)
    with pytest.raises(AssertionError, match="d_hidden|d_weight|d_bias"):
        _check(act, ref, truth, mags, extra, dtype=torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_chunk_keeping_most_columns_runs_exact(impl, device, kept):
    """ε so small that every column is kept: the chunk runs unfiltered, bit for bit the
    exact backward (and filter_eps=None never calls the filter)."""
    masters, y, grads = peaked_logprobs_case(N, D, V)
    exact_run = run_logprobs(impl, masters, y, grads, dtype=torch.float32, device=device)
    assert kept == []
    tiny = run_logprobs(impl, masters, y, grads, dtype=torch.float32, device=device,
                        filter_eps=1e-30)
    assert kept == [None]
    for k in exact_run:
        assert torch.equal(exact_run[k], tiny[k]), k


@requires_triton
def test_filtered_triton_backward_is_bitwise_deterministic(device, monkeypatch):
    monkeypatch.setenv("TISDPO_DZ_MB", "1")
    masters, y, grads = peaked_logprobs_case(400, D, V)
    a, b = (run_logprobs("triton", masters, y, grads, dtype=torch.float32, device=device,
                         filter_eps=EPS) for _ in range(2))
    for k in ("d_hidden", "d_weight", "d_bias"):
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, float("nan"), "0.1", True])
def test_bad_filter_eps_is_refused(bad):
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="filter_eps"):
        tk.linear_logprobs(h, w, y, filter_eps=bad, impl="torch")
    with pytest.raises(ValueError, match="filter_eps"):
        TISDPOLoss("dpo", filter_eps=bad)


def test_refusals_name_the_option():
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="filter_eps=0.01 needs impl"):
        tk.linear_logprobs(h, w, y, filter_eps=0.01, impl="reference")
    for kw, msg in ((dict(method="tisdpo_paper"), "KL terms"),
                    (dict(strategy="one_sweep"), "one_sweep"),
                    (dict(impl="reference"), "exact oracle")):
        with pytest.raises(ValueError, match=msg):
            TISDPOLoss(**{"method": "dpo", **kw}, filter_eps=0.01)


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_passes_filter_eps_to_the_policy_head(impl, device, kept):
    """TISDPOLoss(filter_eps=ε) filters the policy head's backward (the gradients' bound is
    the op's, tested above) and leaves the loss value exact."""
    masters, y, _ = peaked_logprobs_case(4 * 15, D, V, ignored=(0, 1, 40))
    h = masters["hidden"].float().view(4, 15, D).to(device)
    w, labels = masters["weight"].float().to(device), y.view(4, 15).to(device)
    ref = torch.randn(4, 15, device=device)
    out = {}
    for eps in (None, EPS):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = TISDPOLoss("dpo", impl=impl, filter_eps=eps)(ww, hh, labels, ref_logps=ref)
        loss.backward()
        out[eps] = (loss.detach(), hh.grad, ww.grad)
    assert len(kept) == 1 and kept[0] is not None and kept[0] < V // 2, kept
    assert torch.equal(out[None][0], out[EPS][0])
    assert not torch.equal(out[None][1], out[EPS][1])


@pytest.mark.parametrize("impl", IMPLS)
def test_any_ignore_index(impl, device):
    """Ignored rows' targets never index the vocabulary, whatever ignore_index is (here an
    id past V): the same gradients as with -100."""
    masters, y, grads = peaked_logprobs_case(N, D, V)
    out = []
    for ignore in (-100, V + 3):
        h, w = (masters[k].float().to(device).requires_grad_() for k in ("hidden", "weight"))
        yy = torch.where(y == -100, ignore, y).to(device)
        tk.linear_logprobs(h, w, yy, ignore_index=ignore, filter_eps=EPS, impl=impl).backward(
            grads[0].float().to(device))
        out.append((h.grad, w.grad))
    assert all(torch.equal(a, b) for a, b in zip(*out))
