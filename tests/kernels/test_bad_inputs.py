"""Bad input to the public ops: one-line ValueErrors that name the argument, and garbage in
ignored positions (padding may hold anything, NaN and inf included) that changes nothing.

The garbage tests compare bit for bit: a run with NaN/inf planted in ignored rows must give
exactly the outputs and gradients of the same run with zeros there (zero gradient at the
ignored rows themselves), in every backend.
"""
import pytest
import torch
from markers import requires_triton

import tisdpo_kernels as tk
from tisdpo_kernels import PRESETS, linear_logprobs, linear_token_kl, preference_loss, token_weights

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # GPU: compiled kernels
IMPLS = ["torch", pytest.param("triton", marks=requires_triton)]
ALL_IMPLS = ["reference", *IMPLS]
IGNORE = -100


def _head_case(n=80, d=31, v=97, seed=0):
    """d = 31 and chunks of 40 rows: some CPU bfloat16 GEMM kernels (oneDNN's AMX path) read
    past a row's end at such widths, except in a GEMM's last tile of 32 rows, which is where
    a NaN in an ignored row could reach its neighbour's logits."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.randperm(n, generator=g)[: n // 3]] = IGNORE     # scattered ignored rows
    y[:3] = IGNORE                                            # and a run of them
    return {"hidden": torch.randn(n, d, generator=g),
            "weight": torch.randn(v, d, generator=g) * 0.3,
            "bias": torch.randn(v, generator=g) * 0.5,
            "ref_hidden": torch.randn(n, d, generator=g),
            "ref_weight": torch.randn(v, d, generator=g) * 0.3, "targets": y,
            "g1": torch.randn(n, generator=g), "g2": torch.randn(n, generator=g)}


def _planted(case, value, dtype):
    """Leaves (hidden, weight, bias) at dtype with ``value`` in every ignored row of hidden
    and ref_hidden."""
    ign = (case["targets"] == IGNORE)[:, None]
    hidden = case["hidden"].masked_fill(ign, value).to(dtype).to(DEV).requires_grad_(True)
    weight = case["weight"].to(dtype).to(DEV).requires_grad_(True)
    bias = case["bias"].to(dtype).to(DEV).requires_grad_(True)
    ref_hidden = case["ref_hidden"].masked_fill(ign, value).to(dtype).to(DEV)
    return hidden, weight, bias, ref_hidden


def _assert_same_run(run, case, dtype, garbage):
    """run(hidden, weight, bias, ref_hidden) -> (outputs, loss); garbage vs zeros, bitwise."""
    results = []
    for value in (0.0, garbage):
        hidden, weight, bias, ref_hidden = _planted(case, value, dtype)
        outs, loss = run(hidden, weight, bias, ref_hidden)
        loss.backward()
        results.append((outs, hidden.grad, weight.grad, bias.grad))
    (outs0, dh0, dw0, db0), (outs1, dh1, dw1, db1) = results
    for i, (a, b) in enumerate(zip(outs0, outs1)):
        assert torch.equal(a, b), f"output {i}"
    ign = (case["targets"] == IGNORE).to(DEV)
    assert torch.all(dh1[ign] == 0), "d_hidden at ignored rows"
    for name, a, b in (("d_hidden", dh0, dh1), ("d_weight", dw0, dw1), ("d_bias", db0, db1)):
        assert torch.isfinite(b).all(), name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("garbage", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_ignores_garbage_in_ignored_rows(impl, dtype, softcap, garbage,
                                                         monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "40")   # torch backend: several chunks
    case = _head_case()
    y = case["targets"].to(DEV)
    g1, g2 = case["g1"].to(DEV), case["g2"].to(DEV)

    def run(hidden, weight, bias, _ref):
        logp, lse = linear_logprobs(hidden, weight, y, bias=bias, softcap=softcap,
                                    return_lse=True, impl=impl)
        return (logp, lse), (logp * g1).sum() + (lse * g2).sum()

    _assert_same_run(run, case, dtype, garbage)


@requires_triton
@pytest.mark.parametrize("kind", ["rows", "columns"])
def test_triton_ignored_rows_in_several_dz_slabs(kind, monkeypatch):
    """A backward in several slabs (chunks of rows or bands of columns): the rows past the
    kept count reach the d_weight GEMM as zeros, not as their (NaN) hidden states."""
    from head_cases import several_slabs
    n, v = several_slabs(monkeypatch, kind, d=16)
    case = _head_case(n=n, d=16, v=v)
    y, g1 = case["targets"].to(DEV), case["g1"].to(DEV)

    def run(hidden, weight, bias, _ref):
        logp = linear_logprobs(hidden, weight, y, bias=bias, impl="triton")
        return (logp,), (logp * g1).sum()

    _assert_same_run(run, case, torch.float32, float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("direction", ["policy_ref", "ref_policy"])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_token_kl_ignores_garbage_in_ignored_rows(impl, direction, dtype, monkeypatch):
    """NaN in the ignored rows of both hidden and ref_hidden."""
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "40")
    case = _head_case()
    y = case["targets"].to(DEV)
    rw = case["ref_weight"].to(dtype).to(DEV)
    g1, g2 = case["g1"].to(DEV), case["g2"].to(DEV)

    def run(hidden, weight, bias, ref_hidden):
        kl, logp, ref_logp = linear_token_kl(hidden, weight, ref_hidden, rw, y, bias=bias,
                                             direction=direction, softcap=4.0, impl=impl)
        return (kl, logp, ref_logp), (kl * g1).sum() + (logp * g2).sum()

    _assert_same_run(run, case, dtype, float("nan"))


# ------------------------------------------------------------------ empty heads (V = 0, D = 0)

@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_empty_vocabulary_or_width_names_the_tensor(impl):
    h, w, y = torch.randn(5, 4, device=DEV), torch.randn(7, 4, device=DEV), \
        torch.zeros(5, dtype=torch.long, device=DEV)
    no_rows, no_cols = w[:0], torch.randn(7, 0, device=DEV)
    cases = [
        (lambda: linear_logprobs(h, no_rows, torch.full_like(y, IGNORE), impl=impl),
         r"^weight has 0 vocabulary rows"),
        (lambda: linear_logprobs(h[:, :0], no_cols, y, impl=impl), r"^hidden has 0 columns"),
        (lambda: linear_token_kl(h, w, h, no_rows, y, impl=impl),
         r"^ref_weight has 0 vocabulary rows"),
        (lambda: linear_token_kl(h, w, h[:, :0], no_cols, y, impl=impl),
         r"^ref_hidden has 0 columns"),
        (lambda: tk.contrastive_logscores(h, w, h[:, :0], no_cols, y, impl=impl),
         r"^hidden_neg has 0 columns"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            fn()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_reference_head_errors_name_it(impl):
    h, w, y = torch.randn(5, 4, device=DEV), torch.randn(7, 4, device=DEV), \
        torch.zeros(5, dtype=torch.long, device=DEV)
    cases = [
        (dict(ref_hidden=h.double()), "ref_hidden dtype torch.float64 differs from ref_weight"),
        (dict(ref_hidden=h[:4]), r"targets shape \(5,\) must equal ref_hidden shape"),
        (dict(ref_weight=w.double()), "ref_hidden dtype torch.float32 differs from ref_weight"),
        (dict(ref_bias=torch.zeros(8, device=DEV)), r"ref_bias must be \[V\]=\[7\]"),
        (dict(ref_weight=torch.randn(8, 4, device=DEV)), "ref_weight has V=8"),
    ]
    for change, match in cases:
        kw = {"ref_hidden": h, "ref_weight": w, **change}
        with pytest.raises(ValueError, match=match):
            linear_token_kl(h, w, kw.pop("ref_hidden"), kw.pop("ref_weight"), y, impl=impl, **kw)


# ------------------------------------------------------------------ packed preference ids

@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_packed_ids_are_checked(impl):
    """Four sequences of five tokens, pairs (0, 1) and (2, 3)."""
    lp, lr = -torch.rand(20, device=DEV), -torch.rand(20, device=DEV)
    ids = torch.arange(20, device=DEV) // 5
    cs, rs = torch.tensor([0, 2], device=DEV), torch.tensor([1, 3], device=DEV)
    cfg = PRESETS["dpo"].config

    def call(ids=ids, cs=cs, rs=rs):
        return preference_loss(lp, lr, config=cfg, seq_ids=ids, chosen_seq=cs, rejected_seq=rs,
                               impl=impl)

    cases = [
        (dict(rs=torch.tensor([1, 2], device=DEV)),
         "pair 1 names sequence 2 as both chosen_seq and rejected_seq"),
        (dict(cs=torch.tensor([0, 0], device=DEV), rs=torch.tensor([0, 1], device=DEV)),
         "pair 0 names sequence 0 as both chosen_seq and rejected_seq"),
        (dict(ids=ids + 10), r"seq_ids\[0\] = 10 names a sequence that no pair"),
        (dict(ids=torch.where(ids == 3, 4, ids)), r"seq_ids\[15\] = 4 names a sequence"),
        (dict(ids=torch.full_like(ids, 25)), r"seq_ids\[0\] = 25 names a sequence"),
        (dict(ids=ids - 3), "seq_ids must be >= -1"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            call(**change)
        assert "\n" not in str(err.value)
    call(ids=torch.where(ids == 3, -1, ids))   # -1 (outside every response) is fine


# ------------------------------------------------------------------ non-finite token scores

@pytest.mark.parametrize("method", ["rank_based", "binary", "exp_clamp", "threshold", "cdpo"])
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_token_weights_refuse_non_finite_kept_scores(impl, method):
    """A NaN score inside a sequence is a ValueError naming its argument (rank_based used to
    rank it as if by position, exp_clamp in Triton to clamp it); outside, it is never read."""
    pos, neg = -3 * torch.rand(12, device=DEV), -3 * torch.rand(12, device=DEV)
    ids = torch.tensor([0] * 5 + [1] * 5 + [-1] * 2, device=DEV)
    neg_arg = None if method == "cdpo" else neg

    def call(p, n):
        return token_weights(p, n, side="chosen", method=method, seq_ids=ids, impl=impl)

    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"^logp_pos\[3\] = .* is not finite"):
            call(pos.clone().index_fill_(0, torch.tensor([3], device=DEV), bad), neg_arg)
        if method != "cdpo":
            with pytest.raises(ValueError, match=r"^logp_neg\[7\] = .* is not finite"):
                call(pos, neg.clone().index_fill_(0, torch.tensor([7], device=DEV), bad))
    outside = torch.tensor([10, 11], device=DEV)
    w = call(pos.clone().index_fill_(0, outside, float("nan")),
             None if neg_arg is None else neg.clone().index_fill_(0, outside, float("nan")))
    assert torch.equal(w, call(pos, neg_arg))
    # padded: mask marks the kept tokens
    with pytest.raises(ValueError, match=r"^logp_pos\[1, 2\] = nan is not finite"):
        token_weights(torch.full((2, 4), float("nan"), device=DEV),
                      None if neg_arg is None else neg[:8].view(2, 4),
                      side="chosen", method=method, impl=impl,
                      mask=torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]], device=DEV).bool())


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_token_weights_padded_input_refuses_seq_ids(impl):
    """A padded [B, T] input's sequences are its rows (``mask`` marks the kept tokens):
    seq_ids there would be read by the reference and ignored by the fused backends."""
    p, n = torch.randn(3, 4, device=DEV), torch.randn(3, 4, device=DEV)
    ids = torch.tensor([[0] * 4, [1] * 4, [-1] * 4], device=DEV)
    with pytest.raises(ValueError, match=r"^seq_ids is for a packed \[N\] logp_pos; a padded "
                                         r"\[B, T\] one takes mask") as err:
        token_weights(p, n, side="chosen", method="rank_based", seq_ids=ids, impl=impl)
    assert "\n" not in str(err.value)
