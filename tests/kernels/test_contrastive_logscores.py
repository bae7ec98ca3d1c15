"""contrastive_logscores (cDPO's log s_t = log_softmax((1+b)·z⁺ − b·z⁻)[y_t]) against the
reference oracle, with each model's logits softcapped before they are combined.

Without a cap the op folds the two heads into one (``linear_logprobs`` on [W⁺ W⁻]); with one
it runs the torch backend's chunked forward. Heads of different widths, biases, ignored
tokens, chunks that do not divide N.
"""
import pytest
import torch

import tisdpo_kernels as tk
from markers import requires_triton
from numerics import assert_oracle

N, DP, DN, V = 37, 12, 20, 101


def _case(dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hp, hn = torch.randn(N, DP, generator=g), torch.randn(N, DN, generator=g)
    wp, wn = torch.randn(V, DP, generator=g) * 0.6, torch.randn(V, DN, generator=g) * 0.5
    bp, bn = (torch.randn(V, generator=g), torch.randn(V, generator=g)) if bias else (None,) * 2
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    return [t if t is None else t.to(dtype) for t in (hp, wp, hn, wn, bp, bn)] + [y]


def _run(impl, dtype, bias, softcap, b=1.5):
    hp, wp, hn, wn, bp, bn, y = _case(dtype, bias)
    return tk.contrastive_logscores(hp, wp, hn, wn, y, b=b, bias_pos=bp, bias_neg=bn,
                                    softcap=softcap, impl=impl)


@pytest.mark.parametrize("chunk", ["4", "2048"])
@pytest.mark.parametrize("softcap", [None, 3.0, 30.0], ids=["no-cap", "cap3", "cap30"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_oracle(dtype, bias, softcap, chunk, monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", chunk)
    truth = _run("reference", torch.float64, bias, softcap)
    ref = _run("reference", dtype, bias, softcap)
    actual = _run("torch", dtype, bias, softcap)
    assert_oracle(actual, ref, truth, dtype=dtype, name=f"log s (softcap={softcap})")
    assert not actual[::5].any()                                  # 0 where ignored
    if softcap is not None:      # the cap changes the scores: the check above could fail
        uncapped = _run("reference", torch.float64, bias, None)
        assert (uncapped - truth).abs().max() > 1e-2


def test_capped_scores_carry_no_gradient():
    hp, wp, hn, wn, bp, bn, y = _case(torch.float32, True)
    hp.requires_grad_()
    assert not tk.contrastive_logscores(hp, wp, hn, wn, y, softcap=3.0).requires_grad


@requires_triton
def test_capped_scores_have_no_triton_kernel():
    hp, wp, hn, wn, _, _, y = _case(torch.float32, False)
    with pytest.raises(ValueError, match=r"^contrastive_logscores with a softcap has no Triton "
                                         r"kernel: use impl='torch' or 'auto'"):
        tk.contrastive_logscores(hp, wp, hn, wn, y, softcap=3.0, impl="triton")
    torch.testing.assert_close(
        tk.contrastive_logscores(hp, wp, hn, wn, y, impl="triton"),
        tk.contrastive_logscores(hp, wp, hn, wn, y, impl="torch"), rtol=1e-5, atol=1e-5)
