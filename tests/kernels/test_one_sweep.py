"""The one-sweep preference head: ``TISDPOLoss(strategy="one_sweep")`` and the op under it,
``tisdpo_kernels.linear_preference_loss`` (docs/ONE_SWEEP.md).

Every loss and gradient goes through the oracle (tests/numerics.py) twice: against the eager
reference at the test dtype, and against the recompute path (``strategy="recompute"``) as the
comparison run; truth is the float64 reference module. Chunks of 4 tokens, so every sequence
of more than 4 tokens spans several chunks of its pair's sweep.
"""
import pytest
import torch

from dispatch_probe import OpProbe
from loss_cases import (
    B, D, IGNORE, ROWS, T, V, call_kwargs, case_with_ref_logps, check, inputs, make_case,
    module_magnitudes, run,
)
from markers import requires_triton
from numerics import assert_oracle
from tisdpo import TISDPOLoss
from tisdpo_kernels import PRESETS, get_preset, linear_preference_loss

SEQ = [m for m in PRESETS if PRESETS[m].config.granularity == "seq"]
ONE = {"strategy": "one_sweep"}
IMPLS = ["torch", pytest.param("triton", marks=requires_triton)]   # the op's backends
MATMULS = {"mm", "addmm", "addmm_", "matmul", "bmm", "baddbmm", "baddbmm_", "addbmm", "addbmm_",
           "linear", "mv", "addmv", "addmv_", "dot", "vdot", "_addmm_activation"}


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "4")


def both_ways(method, dtype, layout, case=None, *, module_kw=None, loss_kw=None, **call):
    """One-sweep run checked against eager-at-dtype and against the recompute path."""
    case = make_case() if case is None else case
    kw = dict(loss_kw=loss_kw, **call)
    mkw = module_kw or {}
    truth = run(method, "reference", case, torch.float64, layout, module_kw=mkw, **kw)
    ref = run(method, "reference", case, dtype, layout, module_kw=mkw, **kw)
    recompute = run(method, "torch", case, dtype, layout,
                    module_kw={**mkw, "strategy": "recompute"}, **kw)
    actual = run(method, "torch", case, dtype, layout, module_kw={**mkw, **ONE}, **kw)
    mags = module_magnitudes(method, case, dtype, module_kw=mkw, **kw)
    label = f"{method}/{layout}/{str(dtype)[6:]}"
    check(actual, ref, truth, dtype, f"one_sweep {label}", mags)
    check(actual, recompute, truth, dtype, f"one_sweep (vs recompute) {label}", mags)
    return actual


# ---------------------------------------------------------------------------- every preset

# Chunks of 4 rows: every pair goes chunk by chunk (a [V, D] buffer per pair, folded at its
# end). 19: packed, pair 0 (20 rows) so; pairs 1 and 2 (18 and 9 rows) whole, one chunk each,
# their two sequences gathered; padded pairs (22 rows) chunk by chunk. 48: padded pairs 0 and 1
# share a chunk, pair 2 has its own; packed, all three pairs in one chunk.
@pytest.mark.parametrize("chunk", [4, 19, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", SEQ)
def test_preset(method, layout, dtype, chunk, monkeypatch):
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", str(chunk))
    both_ways(method, dtype, layout)


@pytest.mark.parametrize("method,layout", [("tisdpo_paper", "packed"), ("ipo", "padded")])
def test_fp64(method, layout):
    both_ways(method, torch.float64, layout)


@pytest.mark.parametrize("method,weights", [("tisdpo_paper", "given"), ("tisdpo_paper", None),
                                            ("tisdpo", "given"), ("tdpo2", "given")])
def test_weights_given_or_unit(method, weights):
    both_ways(method, torch.float32, "packed", weights=weights)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", ["dpo", "ipo", "tisdpo"])
def test_precomputed_ref_logps(method, layout):
    case = case_with_ref_logps()
    both_ways(method, torch.float32, layout, case, reference="logps",
              override=_ref_logps_override(case, layout))


def _ref_logps_override(case, layout):
    lr = case["ref_logps"].float()
    return {"ref_logps": lr.reshape(-1)[case["pack_index"]] if layout == "packed" else lr}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", ["dpo", "tisdpo_paper", "tdpo1"])
def test_softcap_and_normalizer(method, layout):
    both_ways(method, torch.float32, layout, module_kw={"softcap": 4.0},
              loss_kw={"normalizer": 7})


def test_without_bias():
    case = make_case()
    res = []
    for impl, dt, kw in (("torch", torch.float32, ONE), ("reference", torch.float32, {}),
                         ("reference", torch.float64, {})):
        leaves, args = inputs(case, dt, "padded")
        args["bias"] = None
        loss, _ = TISDPOLoss("tisdpo_token_level", impl=impl, **kw)(
            **call_kwargs("tisdpo_token_level", args))
        loss.backward()
        res.append((loss, leaves["hidden"].grad, leaves["weight"].grad, leaves["bias"].grad))
    (la, ha, wa, ba), (lr, hr, wr, _), (lt, ht, wt, _) = res
    assert ba is None
    assert_oracle(la, lr, lt, dtype=torch.float32, name="loss")
    assert_oracle(ha, hr, ht, dtype=torch.float32, name="dhidden")
    assert_oracle(wa, wr, wt, dtype=torch.float32, name="dweight")


@pytest.mark.parametrize("wrt", ["hidden", "weight", "bias", "none"])
def test_only_requested_gradients(wrt):
    """Gradients only where asked (the others None); under no_grad the loss alone."""
    (h, w, y), kw = _op_case(2, 96)
    full = linear_preference_loss(h, w, y, impl="torch", **kw)[0]
    full.backward()
    want = {"hidden": h, "weight": w, "bias": kw["bias"]}
    expect = {k: t.grad.clone() for k, t in want.items()}
    leaves = {k: t.detach().requires_grad_(k == wrt) for k, t in want.items()}
    kw = {**kw, "bias": leaves["bias"]}
    if wrt == "none":
        with torch.no_grad():
            loss = linear_preference_loss(leaves["hidden"], leaves["weight"], y, **kw)[0]
        assert not loss.requires_grad and torch.equal(loss, full.detach())
        return
    with OpProbe() as probe:
        loss = linear_preference_loss(leaves["hidden"], leaves["weight"], y, **kw)[0]
    loss.backward()
    assert torch.equal(loss, full.detach())
    for k, t in leaves.items():
        assert (t.grad is not None) == (k == wrt), k
    assert torch.equal(leaves[wrt].grad, expect[wrt])
    # 24 chunks of 4 tokens: both heads' logits (2 GEMMs each), plus d_hidden's or d_weight's
    n_mm = sum(op in MATMULS for op in probe.ops)
    assert n_mm == 48 + (24 if wrt in ("hidden", "weight") else 0), n_mm


# ---------------------------------------------------------------------------- ignored tokens

@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_empty_pairs_and_one_token_sequences(layout):
    """Pair 2 has no response token at all (it counts nowhere, not even in the default
    normaliser); row 5 of make_case is one token long."""
    case = make_case()
    case["labels"][2] = IGNORE
    case["labels"][2 + B] = IGNORE
    both_ways("tisdpo_paper", torch.float32, layout, case)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", ["tisdpo", "tdpo2", "simpo"])
def test_all_ignored_batch_zero_loss_and_grads(method, layout):
    case = make_case()
    case["labels"] = torch.full_like(case["labels"], IGNORE)
    loss, metrics, grads = run(method, "torch", case, torch.float32, layout, module_kw=ONE)
    assert loss.item() == 0.0
    for k, g in grads.items():
        assert torch.equal(g, torch.zeros_like(g)), f"d{k}"
    assert all(torch.isfinite(v) for v in metrics.values())


def test_packed_unpaired_sequence_counts_nowhere():
    """A trailing sequence no pair names (one labelled token): zero d_hidden there."""
    case = make_case()
    case["seq_offsets"] = torch.cat([case["seq_offsets"],
                                     torch.tensor([len(case["pack_index"])], dtype=torch.int32)])
    truth = run("tisdpo", "reference", case, torch.float64, "packed")
    ref = run("tisdpo", "reference", case, torch.float32, "packed")
    actual = run("tisdpo", "torch", case, torch.float32, "packed", module_kw=ONE)
    check(actual, ref, truth, torch.float32, "unpaired", module_magnitudes("tisdpo", case,
                                                                           torch.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_per_token_outputs_are_zero_in_no_pair(impl):
    """Packed rows that no pair names (6–8): logp and a given ref_logp come back 0 there, as
    the reference gives them, even where the given ref_logp holds NaN."""
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(9, 6, generator=g), torch.randn(11, 6, generator=g)
    y = torch.randint(0, 11, (9,), generator=g)
    ref = -1.0 - torch.rand(9, generator=g)
    ref[7] = float("nan")
    kw = dict(config=get_preset("dpo").config, seq_offsets=torch.tensor([0, 3, 6, 9]),
              pairs=torch.tensor([[1, 0]]))
    want = linear_preference_loss(h.double(), w.double(), y, ref_logp=ref.double(),
                                  impl="reference", **kw)
    got = linear_preference_loss(h, w, y, ref_logp=ref, impl=impl, **kw)
    for name, a, b in zip(("loss", "logp", "ref_logp"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=name)
    assert not got[1][6:].any() and not got[2][6:].any()


# ---------------------------------------------------------------------------- accumulation

def _sub_case(case, ids):
    """The pairs ``ids`` of ``case`` as a batch of their own (padded rows and its packing)."""
    rows = list(ids) + [b + B for b in ids]
    sub = {k: (v[rows] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[0] == 2 * B else v)
           for k, v in case.items()}
    idx, offsets, pairs = [], [0], []
    for j in range(len(ids)):
        pairs.append([len(offsets) - 1, len(offsets)])
        for new, old in ((j, rows[j]), (j + len(ids), rows[j + len(ids)])):
            p, n = ROWS[old]
            idx += [new * T + t for t in range(p + n)]
            offsets.append(len(idx))
    sub.update(pack_index=torch.tensor(idx), pairs=torch.tensor(pairs),
               seq_offsets=torch.tensor(offsets, dtype=torch.int32))
    return sub, rows


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradient_accumulation_with_normalizer_equals_one_batch(layout):
    """Micro-batches {0, 2} and {1}, each with normalizer=3 (the pairs of the whole batch):
    summed losses and accumulated gradients are the one big batch's."""
    method, case = "tisdpo_paper", make_case()
    truth = run(method, "reference", case, torch.float64, layout)
    ref = run(method, "reference", case, torch.float32, layout)
    loss = torch.zeros(())
    grads = {"hidden": torch.zeros(2 * B, T, D), "weight": torch.zeros(V, D),
             "bias": torch.zeros(V)}
    for ids in ([0, 2], [1]):
        sub, rows = _sub_case(case, ids)
        l_mb, _, g_mb = run(method, "torch", sub, torch.float32, layout, module_kw=ONE,
                            loss_kw={"normalizer": 3})
        loss += l_mb.detach()
        grads["hidden"][rows] += g_mb["hidden"]
        grads["weight"] += g_mb["weight"]
        grads["bias"] += g_mb["bias"]
    mags = module_magnitudes(method, case, torch.float32)
    assert_oracle(loss, ref[0], truth[0], dtype=torch.float32, name="loss",
                  magnitude=mags["loss"])
    for k in grads:
        assert_oracle(grads[k], ref[2][k], truth[2][k], dtype=torch.float32, name=f"d{k}",
                      magnitude=mags["grads"][k])


# ---------------------------------------------------------------------------- tied head

def test_tied_embeddings():
    """One weight as the input embedding and the LM head: both gradient paths reach it."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    labels = make_case()["labels"]
    masters = {"emb": 0.4 * torch.randn(V, D, generator=g, dtype=torch.float64),
               "mix": torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5}
    ref_hidden = torch.randn(2 * B, T, D, generator=g, dtype=torch.float64)
    out = []
    for impl, dt, kw in (("torch", torch.float32, ONE), ("reference", torch.float32, {}),
                         ("reference", torch.float64, {})):
        p = {k: v.to(dt).requires_grad_() for k, v in masters.items()}
        hidden = torch.tanh(torch.nn.functional.embedding(ids, p["emb"]) @ p["mix"])
        loss, _ = TISDPOLoss("tdpo1", impl=impl, **kw)(
            p["emb"], hidden, labels, ref_hidden=ref_hidden.to(dt),
            ref_weight=masters["emb"].to(dt))
        loss.backward()
        out.append((loss, {k: v.grad for k, v in p.items()}))
    (la, ga), (lr, gr), (lt, gt) = out
    assert_oracle(la, lr, lt, dtype=torch.float32, name="loss")
    for k in gt:
        assert_oracle(ga[k], gr[k], gt[k], dtype=torch.float32, name=f"d{k}")


# ---------------------------------------------------------------------------- the schedule

def test_schedule_long_pairs_in_chunks_short_pairs_whole():
    """Long pairs (more rows than a chunk) first, each range in balanced chunks; then the
    others whole, in order, packed into chunks, adjacent ranges merged; every paired row
    exactly once, tagged 2·pair + side."""
    from tisdpo_kernels._one_sweep import _schedule
    pair_rows = ((((0, 5),), ((5, 9),)),          # 9 rows
                 (((9, 30),), ((40, 45),)),        # 26 rows: longer than a chunk of 10
                 (((45, 47),), ((50, 53),)),       # 5 rows
                 (((60, 60),), ((60, 60),)),       # no rows
                 (((53, 55),), ((47, 50),)))       # 5 rows
    steps, order, side, bounds, seg_pair = _schedule(pair_rows, 10)
    assert [(st.pair, st.last, st.ranges) for st in steps] == [
        (1, False, ((9, 16),)), (1, False, ((16, 23),)), (1, False, ((23, 30),)),
        (1, True, ((40, 45),)), (-1, True, ((0, 9),)),
        (-1, True, ((45, 47), (50, 55), (47, 50)))]
    # a pair's rows are consecutive within a step: one segment each
    assert [(bounds[st.offs].tolist(), seg_pair[st.segs].tolist()) for st in steps] == [
        ([0, 7], [1]), ([0, 7], [1]), ([0, 7], [1]), ([0, 5], [1]), ([0, 9], [0]),
        ([0, 5, 10], [2, 4])]
    parts = [(9, 30, 2), (40, 45, 3), (0, 5, 0), (5, 9, 1), (45, 47, 4), (50, 53, 5),
             (53, 55, 8), (47, 50, 9)]
    assert order.tolist() == [r for a, b, _ in parts for r in range(a, b)]
    assert side.tolist() == [tag for a, b, tag in parts for _ in range(a, b)]
    assert [(st.lo, st.hi) for st in steps] == [(0, 7), (7, 14), (14, 21), (21, 26), (26, 35),
                                               (35, 45)]
    steps, *rest = _schedule(pair_rows[3:4], 10)                  # no row in any pair
    assert steps == [] and all(t.dtype == torch.long and t.numel() == 0 for t in rest)


# ---------------------------------------------------------------------------- cost

def _op_case(pairs, tokens, d=16, v=1024, seed=0):
    """Padded inputs of ``pairs`` pairs at ``tokens`` tokens in all (fp32, KL preset)."""
    g = torch.Generator().manual_seed(seed)
    t = tokens // (2 * pairs)
    h = torch.randn(2 * pairs, t, d, generator=g).requires_grad_()
    w = (0.3 * torch.randn(v, d, generator=g)).requires_grad_()
    b = torch.randn(v, generator=g).requires_grad_()
    y = torch.randint(0, v, (2 * pairs, t), generator=g)
    y[:, :3] = IGNORE
    rh = torch.randn(2 * pairs, t, d, generator=g)
    cfg = get_preset("tisdpo_paper").config
    kw = dict(config=cfg, bias=b, ref_hidden=rh, ref_weight=w.detach() * 0.9,
              weights=0.7 + 0.6 * torch.rand(2 * pairs, t, generator=g), softcap=10.0)
    return (h, w, y), kw


@pytest.mark.parametrize("impl", IMPLS)
def test_peak_memory_does_not_grow_with_tokens_per_pair(impl, monkeypatch):
    """At 512 tokens in all, 1, 2 or 8 pairs: the peak of live op outputs (forward and
    backward) stays flat — d_hidden, d_weight, the [V, D] scratch and a few chunk × V buffers —
    and no tensor is tokens × vocab (chunk × V = 16 × 1024 against N × V = 512 × 1024)."""
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "16")
    n, d, v, chunk = 512, 16, 1024, 16
    peaks = {}
    for pairs in (8, 2, 1):
        (h, w, y), kw = _op_case(pairs, n, d, v)
        with OpProbe() as probe:
            loss, *_ = linear_preference_loss(h, w, y, impl=impl, **kw)
            loss.backward()
        peaks[pairs] = probe.peak_live_bytes
        assert probe.max_bytes <= 4 * max(chunk * v, n * d, v * d), probe.max_op
        grads = 4 * (2 * n * d + 3 * v * d + 3 * v + 16 * n)   # d_hidden (+ its scaled copy),
        # d_weight (scratch, sum, scaled copy), d_bias alike, per-token [N]s
        assert peaks[pairs] <= 6 * 4 * chunk * v + grads, (pairs, peaks[pairs])
    assert max(peaks.values()) <= 1.05 * peaks[8], peaks
    # the detector works: the materialising reference allocates tokens × vocab
    (h, w, y), kw = _op_case(1, n, d, v)
    with OpProbe() as probe:
        linear_preference_loss(h, w, y, impl="reference", **kw)[0].backward()
    assert probe.max_bytes >= 4 * n * v


@pytest.mark.parametrize("impl", IMPLS)
def test_whole_pairs_need_no_pair_buffer(impl, monkeypatch):
    """Pairs that fit a chunk go whole, their gradients straight into the sums: 8 pairs of 64
    tokens in chunks of 128 never open a long pair's [V, D] buffer, and their peak stays
    below that of 2 pairs of 256 tokens, which hold two (the sum and one pair's M_b)."""
    from tisdpo_kernels import _one_sweep as OS
    monkeypatch.setenv("TISDPO_CHUNK_TOKENS", "128")
    n, d, v = 512, 256, 1024
    real, long_chunks, peaks = OS._Grads.add_unscaled, [], {}
    monkeypatch.setattr(OS._Grads, "add_unscaled",
                        lambda self, *a: long_chunks.append(1) or real(self, *a))
    for pairs in (8, 2):
        (h, w, y), kw = _op_case(pairs, n, d, v)
        long_chunks.clear()
        with OpProbe() as probe:
            linear_preference_loss(h, w, y, impl=impl, **kw)[0].backward()
        peaks[pairs] = probe.peak_live_bytes
        assert bool(long_chunks) == (pairs == 2), (pairs, len(long_chunks))
    assert peaks[8] <= peaks[2] - 2 * v * d, peaks       # half a float32 [V, D] less at least


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", ["tisdpo_paper", "dpo"])
def test_backward_runs_no_head_matmul(preset, impl):
    (h, w, y), kw = _op_case(2, 96)
    if not get_preset(preset).config.uses_kl:
        kw["config"] = get_preset(preset).config
    with OpProbe() as fwd:
        loss, *_ = linear_preference_loss(h, w, y, impl=impl, **kw)
    with OpProbe() as bwd:
        loss.backward()
    assert MATMULS & set(fwd.ops), "the forward should run the gradient GEMMs"
    assert not MATMULS & set(bwd.ops), sorted(MATMULS & set(bwd.ops))
    assert h.grad is not None and w.grad is not None and kw["bias"].grad is not None
    # the probe sees matmuls: the recompute path's backward has them
    loss, _ = TISDPOLoss("dpo", impl="torch", strategy="recompute")(
        w, h, y, ref_hidden=kw["ref_hidden"], ref_weight=kw["ref_weight"])
    with OpProbe() as bwd:
        loss.backward()
    assert MATMULS & set(bwd.ops)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_no_host_sync(layout, monkeypatch):
    monkeypatch.setenv("TISDPO_CHECKS", "off")
    _, args = inputs(make_case(), torch.float32, layout)
    kw = call_kwargs("tisdpo_token_level", args)
    with OpProbe() as probe:
        loss, _ = TISDPOLoss("tisdpo_token_level", impl="torch", **ONE)(**kw)
        loss.backward()
    assert not probe.sync_ops(), probe.sync_ops()


# ---------------------------------------------------------------------------- the strategy

def test_cdpo_code_refuses_one_sweep_in_one_line():
    with pytest.raises(ValueError, match="cdpo_code.*granularity='pos'") as err:
        TISDPOLoss("cdpo_code", strategy="one_sweep")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown strategy='fast'"):
        TISDPOLoss("dpo", strategy="fast")
    three = run("cdpo_code", "torch", make_case(), torch.float32, "padded")   # auto: recompute
    assert torch.isfinite(three[0])


def test_op_refusals():
    (h, w, y), kw = _op_case(1, 64)
    with pytest.raises(ValueError, match="granularity='pos'"):
        linear_preference_loss(h, w, y, **{**kw, "config": get_preset("cdpo_code").config})
    hp, yp = h.detach().reshape(-1, h.shape[-1]), y.reshape(-1)
    with pytest.raises(ValueError, match="sequence 1 is in pairs 0 and 1"):
        linear_preference_loss(hp, w, yp, seq_offsets=torch.tensor([0, 20, 40, 64]),
                               pairs=torch.tensor([[0, 1], [2, 1]]),
                               **{**kw, "ref_hidden": kw["ref_hidden"].reshape(hp.shape),
                                  "weights": kw["weights"].reshape(-1)})
    ref_logp = torch.zeros(y.shape)                 # a reference head with it: never read
    with pytest.raises(ValueError, match="ref_weight/ref_bias given without ref_hidden"):
        linear_preference_loss(h, w, y, **{**kw, "ref_hidden": None, "ref_logp": ref_logp,
                                           "config": get_preset("dpo").config})


def test_torch_backend_runs_on_another_device(monkeypatch):
    """"Any device": the sweep's host-built schedule goes to the inputs' device whatever it
    is ('meta' stands in for mps/xpu; value checks off, as they read values)."""
    monkeypatch.setenv("TISDPO_CHECKS", "off")
    (h, w, y), kw = _op_case(1, 64)
    meta = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in kw.items()}
    loss = linear_preference_loss(h.detach().to("meta").requires_grad_(), w.detach().to("meta"),
                                  y.to("meta"), **{**meta, "impl": "torch"})[0]
    assert loss.device.type == "meta"


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_scales_the_stored_gradients_in_place(impl):
    """The backward allocates nothing the size of d_hidden or d_weight: it scales the stored
    gradients and autograd takes them as .grad. Under retain_graph=True each backward scales a
    copy, so a second backward adds the same gradients again, bit for bit."""
    (h, w, y), kw = _op_case(2, 96)
    for keep in (False, True):
        h.grad = w.grad = kw["bias"].grad = None
        loss = 3 * linear_preference_loss(h, w, y, impl=impl, **kw)[0]
        with OpProbe() as bwd:
            loss.backward(retain_graph=keep)
        fresh = bwd.peak_live_bytes
        assert (fresh >= 4 * (h.numel() + w.numel())) if keep else fresh < 4 * h.numel(), fresh
        first = [t.grad.clone() for t in (h, w, kw["bias"])]
        if keep:
            loss.backward()
            assert all(torch.equal(t.grad, 2 * f) for t, f in zip((h, w, kw["bias"]), first))
        else:
            once = first
    assert all(torch.equal(a, b) for a, b in zip(once, first))


@pytest.mark.parametrize("preset", ["tisdpo", "tisdpo_paper"])
@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits(impl, preset):
    """Logits of a few hundred (hidden × 60, no cap): every exponential of the sweep (the
    softmax, the KL's two heads) must take out its row's max, or float32 overflows. The
    reference head is the policy's (lp − lr = 0), so the pair margins are not saturated."""
    (h, w, y), kw = _op_case(2, 48)
    kw["config"] = get_preset(preset).config
    out = {}
    for name, dt in (("actual", torch.float32), ("ref", torch.float32), ("truth", torch.float64)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (60 * h, w, kw["bias"])]
        args = {**kw, "softcap": None, "bias": leaves[2], "ref_hidden": leaves[0].detach(),
                "ref_weight": leaves[1].detach(), "ref_bias": leaves[2].detach(),
                "weights": kw["weights"].to(dt)}
        loss = linear_preference_loss(leaves[0], leaves[1], y, impl=impl if name == "actual"
                                      else "reference", **args)[0]
        loss.backward()
        out[name] = [loss.detach()] + [t.grad for t in leaves]
    assert out["truth"][2].abs().max() > 1e-3           # the gradients are not all saturated
    for i, what in enumerate(("loss", "dhidden", "dweight", "dbias")):
        assert_oracle(out["actual"][i], out["ref"][i], out["truth"][i], dtype=torch.float32,
                      name=what)
