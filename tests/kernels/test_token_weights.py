"""tisdpo_kernels.token_weights through the public op, torch and triton against the reference.

Truth is the reference in float64 on the same (dtype-rounded) inputs, so discrete rules
(ranks, top-p%) must agree exactly; inputs live inside NaN buffers, and tokens outside
every sequence hold NaN too, so a read or a rank that leaks shows up.
"""
import math

import pytest
import torch
from markers import requires_triton
from numerics import assert_oracle, nan_buffer_view

from tisdpo_kernels import WeightParams, token_weights
from tisdpo_kernels._triton import configs


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # GPU: compiled kernels
IMPLS = ["torch", pytest.param("triton", marks=requires_triton)]
ALL_IMPLS = ["reference", *IMPLS]
DTYPES = [torch.float32, torch.bfloat16]
ELEMENTWISE = ["exp_clamp", "threshold_and_scale", "threshold", "origin", "cdpo"]
PARAMS = {
    "default": WeightParams(),
    "custom": WeightParams(k=2.0, lower=-1.0, upper=0.5, clip_lower=-0.8, clip_upper=0.6,
                           w_min=0.5, w_max=1.5, only_neg=False, round_decimals=2),
}


def _inputs(layout, method, *, ties=False, n=47, rows=4, cols=13):
    """float64 (pos, neg, seq_ids | None, mask | None, side tensor) for a layout."""
    shape = (n,) if layout == "packed" else (rows, cols)
    if ties:  # few distinct values, exact in bf16: lots of ties inside each sequence
        pos = torch.randint(-3, 4, shape).double() / 4
        neg = torch.zeros(shape, dtype=torch.float64)
    elif method == "cdpo":
        pos, neg = -torch.rand(shape, dtype=torch.float64) * 4, None
    else:
        pos = torch.randn(shape, dtype=torch.float64) * 1.5
        neg = torch.randn(shape, dtype=torch.float64)
    if layout == "packed":
        # unsorted, interleaved, sparse ids; -1 outside sequences; a length-1 sequence (id 31)
        ids = torch.tensor([5, 2, 5, 9, 2, 2, -1, 9, 5, 31] + [7] * 3 + [-1] * 2, dtype=torch.long)
        ids = torch.cat([ids, torch.randint(-1, 12, (n - ids.numel(),))])[torch.randperm(n)]
        mask, outside = None, ids < 0
    else:
        mask = torch.rand(shape) > 0.3
        mask[1] = False          # an empty row
        mask[2, :] = False
        mask[2, 5] = True        # a length-1 row
        ids, outside = None, ~mask
    pos = pos.masked_fill(outside, float("nan"))
    if neg is not None:
        neg = neg.masked_fill(outside, float("nan"))
    return pos, neg, ids, mask, torch.rand(shape) > 0.5


def _dev(t):
    return t.to(DEV) if isinstance(t, torch.Tensor) else t


def _check(impl, dtype, pos, neg, *, name, **kw):
    kw = {k: _dev(v) for k, v in kw.items()}
    p, q = _dev(pos.to(dtype)), None if neg is None else _dev(neg.to(dtype))
    actual = token_weights(nan_buffer_view(p), None if q is None else nan_buffer_view(q),
                           impl=impl, **kw)
    ref = token_weights(p, q, impl="reference", **kw)
    truth = token_weights(p.double(), None if q is None else q.double(), impl="reference", **kw)
    assert actual.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_oracle(actual, ref, truth, dtype=dtype, name=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method", ELEMENTWISE)
@pytest.mark.parametrize("params", list(PARAMS), ids=str)
def test_elementwise_methods(impl, dtype, layout, method, params):
    pos, neg, ids, mask, side_t = _inputs(layout, method)
    for side, label in (("chosen", "chosen"), ("rejected", "rejected"), (side_t, "tensor")):
        _check(impl, dtype, pos, neg, side=side, method=method, params=PARAMS[params],
               seq_ids=ids, mask=mask, name=f"{method}/{layout}/{label}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method", ["rank_based", "binary"])
@pytest.mark.parametrize("ties", [True, False], ids=["ties", "distinct"])
def test_per_sequence_methods(impl, dtype, layout, method, ties):
    pos, neg, ids, mask, side_t = _inputs(layout, method, ties=ties)
    params = [WeightParams(top_percent=tp) for tp in (100.0, 50.0, 33.0, 1.0)] \
        if method == "binary" else [WeightParams(), WeightParams(w_min=0.5, w_max=2.0)]
    if not ties:
        params.append(params[0].replace(round_decimals=1))  # rounding creates ties
    for p in params:
        for side in ("chosen", side_t):
            _check(impl, dtype, pos, neg, side=side, method=method, params=p, seq_ids=ids,
                   mask=mask, name=f"{method}/{layout}/{p}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", ["rank_based", "binary", "exp_clamp"])
def test_packed_with_mask_and_padded_agree(impl, method):
    """[B, T] + mask, and the same tokens packed (with seq_ids, and with a mask on top)."""
    pos, neg, _, mask, _ = _inputs("padded", method, ties=True)
    pos, neg, mask = _dev(pos.nan_to_num(0.0).float()), _dev(neg.float()), _dev(mask)
    kw = dict(side="rejected", method=method, params=WeightParams(top_percent=40.0))
    padded = token_weights(pos, neg, mask=mask, impl=impl, **kw)
    rows = torch.arange(pos.shape[0], device=DEV).unsqueeze(1).expand_as(pos)
    ids = torch.where(mask, rows, -1).flatten()
    packed = token_weights(pos.flatten(), neg.flatten(), seq_ids=ids, impl=impl, **kw)
    masked = token_weights(pos.flatten(), neg.flatten(), seq_ids=rows.flatten(),
                           mask=mask.flatten(), impl=impl, **kw)
    truth = token_weights(pos.double(), neg.double(), mask=mask, impl="reference", **kw)
    ref = token_weights(pos, neg, mask=mask, impl="reference", **kw)
    for name, actual in (("padded", padded), ("packed", packed.view_as(pos)),
                         ("packed+mask", masked.view_as(pos))):
        assert_oracle(actual, ref, truth, dtype=torch.float32, name=name)


# --------------------------------------------------------------------- hand-computed cases

def _hand(impl, pos, neg, expected, **kw):
    dt = torch.float32
    kw = {k: _dev(v) for k, v in kw.items()}
    got = token_weights(torch.tensor(pos, dtype=dt, device=DEV),
                        None if neg is None else torch.tensor(neg, dtype=dt, device=DEV),
                        impl=impl, **kw)
    want = torch.tensor(expected, dtype=torch.float64)
    assert_oracle(got, want, want, dtype=dt, name=f"{kw.get('method')}")


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_rank_based_by_hand(impl):
    c = [0.5, 0.125, 0.5, 0.25]  # ties: the earlier position gets the lower rank
    z = [0.0] * 4
    lin = lambda r: 0.7 + r / 3 * 0.6  # noqa: E731  rank r of n = 4 onto [0.7, 1.3]
    _hand(impl, c, z, [lin(2), lin(0), lin(3), lin(1)], side="chosen", method="rank_based")
    # rejected: s = −c, ranks reverse except that ties still go in position order
    _hand(impl, c, z, [lin(0), lin(3), lin(1), lin(2)], side="rejected", method="rank_based")
    # two sequences, one of length 1 (→ the middle of the range), one token outside (→ 0)
    _hand(impl, [0.5, 3.0, 0.125, 9.0], z, [1.3, 1.0, 0.7, 0.0], side="chosen",
          method="rank_based", seq_ids=torch.tensor([4, 0, 4, -1]))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_binary_by_hand(impl):
    z = [0.0] * 4
    _hand(impl, [0.5, 0.125, 0.5, 0.25], z, [1, 0, 1, 0], side="chosen", method="binary",
          params=WeightParams(top_percent=50))
    # ceil(4·25%) = 1 token, but every token tied at the threshold gets 1
    _hand(impl, [0.5, 0.5, 0.5, 0.125], z, [1, 1, 1, 0], side="chosen", method="binary",
          params=WeightParams(top_percent=25))
    # top_percent = 100 (the official default): all ones, i.e. DPO
    _hand(impl, [0.5, -7.0, 0.5, 0.125], z, [1, 1, 1, 1], side="rejected", method="binary")
    # a tiny percent still keeps the single best token; rejected ranks by −c
    _hand(impl, [0.5, -7.0, 0.25, 0.125], z, [0, 1, 0, 0], side="rejected", method="binary",
          params=WeightParams(top_percent=1))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_elementwise_by_hand(impl):
    c, z = [-1.0, 0.0, 2.0, 0.75], [0.0] * 4
    e = math.exp
    _hand(impl, c, z, [e(-0.5), 1.0, e(1.5), e(0.75)], side="chosen", method="exp_clamp")
    _hand(impl, c, z, [e(0.5), 1.0, e(-1.5), e(-0.75)], side="rejected", method="exp_clamp")
    _hand(impl, c, z, [2 * e(-0.25), 2.0, 2 * e(1.0), 2 * e(0.75)], side="chosen",
          method="exp_clamp", params=WeightParams(k=2.0, lower=-0.25, upper=1.0))
    # 1 + 0.2·clip(s, −1.5, 1.5)
    _hand(impl, [-2.0, 0.0, 0.75, 3.0], z, [0.7, 1.0, 1.15, 1.3], side="chosen",
          method="threshold_and_scale")
    _hand(impl, c, z, [1.0, 0.0, -1.0, -0.75], side="rejected", method="threshold",
          params=WeightParams(clip_lower=-1.0, clip_upper=1.0))
    _hand(impl, c, z, [1.0, 0.0, -2.0, -0.75], side="rejected", method="origin")
    # round half to even, as torch.round: 12.5 → 12, 37.5 → 38, −0.5 → −0
    _hand(impl, [0.125, 0.375, -0.005, 1.0], [0.0, 0.0, 0.0, 1.0], [0.12, 0.38, -0.0, 0.0],
          side="chosen", method="origin", params=WeightParams(round_decimals=2))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_cdpo_by_hand(impl):
    lp = [math.log(0.25), math.log(0.5), math.log(0.125)]
    side = torch.tensor([True, False, False])
    _hand(impl, lp, None, [1.0, 0.5, 0.875], side=side, method="cdpo")
    _hand(impl, lp, None, [0.25, 0.5, 0.875], side=side, method="cdpo",
          params=WeightParams(only_neg=False))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_all_outside(impl):
    empty = torch.zeros(0, device=DEV)
    assert token_weights(empty, empty, side="chosen", method="rank_based",
                         seq_ids=torch.zeros(0, dtype=torch.long, device=DEV),
                         impl=impl).shape == (0,)
    x = torch.full((2, 5), float("nan"), device=DEV)
    for method in ("exp_clamp", "rank_based", "binary"):
        w = token_weights(x, x, side="chosen", method=method,
                          mask=torch.zeros(2, 5, dtype=torch.bool, device=DEV), impl=impl)
        assert_oracle(w, torch.zeros(2, 5), torch.zeros(2, 5), dtype=torch.float32, name=method)


@pytest.mark.parametrize("impl", IMPLS)
def test_validation(impl):
    x = torch.zeros(6, device=DEV)
    with pytest.raises(ValueError, match="logp_neg"):
        token_weights(x, torch.zeros(5, device=DEV), side="chosen", impl=impl)
    with pytest.raises(ValueError, match="logp_neg"):
        token_weights(x, None, side="chosen", method="rank_based", impl=impl)
    with pytest.raises(ValueError, match="seq_ids"):
        token_weights(x, x, side="chosen", method="rank_based",
                      seq_ids=torch.zeros(5, dtype=torch.long, device=DEV), impl=impl)
    with pytest.raises(ValueError, match="side"):
        token_weights(x, x, side="winner", impl=impl)
    with pytest.raises(ValueError, match="side"):
        token_weights(x, x, side=torch.ones(5, dtype=torch.bool, device=DEV), impl=impl)
    with pytest.raises(ValueError, match="method"):
        token_weights(x, x, side="chosen", method="random", impl=impl)
    with pytest.raises(ValueError, match="lower"):
        token_weights(x, x, side="chosen", params=WeightParams(lower=1.0, upper=0.0), impl=impl)
    with pytest.raises(ValueError, match="top_percent"):
        WeightParams(top_percent=0.0)


@requires_triton
def test_triton_many_programs():
    """GPU-like small blocks: many programs per launch, ragged last block, multiple sequences."""
    pos, neg, ids, _, side = _inputs("packed", "exp_clamp", n=301)
    with configs.override(token_weights_fwd=configs.KernelConfig({"BLOCK": 16})):
        for method in ("exp_clamp", "threshold_and_scale", "rank_based"):
            _check("triton", torch.float32, pos, neg, side=side, method=method, seq_ids=ids,
                   params=PARAMS["custom"], name=method)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", IMPLS)
def test_no_host_sync_on_cuda(impl):
    pos, neg, ids, _, side = (_dev(t) for t in _inputs("packed", "exp_clamp", n=301))
    for method in ("exp_clamp", "rank_based", "binary", "cdpo"):  # warm-up: compile kernels
        token_weights(pos, neg, side=side, method=method, seq_ids=ids, impl=impl)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for method in ("exp_clamp", "rank_based", "binary", "cdpo"):
            token_weights(pos, neg, side=side, method=method, seq_ids=ids, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode("default")
