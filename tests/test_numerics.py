"""The oracle (tests/numerics.py) still bites: every op's outputs pass as computed and fail
once pushed past their bound, and the bound is far below the errors real bugs make.

Each op runs three ways (float64 truth, eager at the test dtype, the torch backend) on a small
case with ignored tokens. For every output and gradient:
- pushed a few float32 ulps (float32 tests) or 1e-2 relative (bfloat16 tests) beyond its
  bound at one element (the largest, then the smallest non-zero one), the check fails;
- float32: the output rounded to bfloat16 (a precision bug) fails;
- bfloat16 inputs: a 1e-2 relative error fails the log-probs, lse, weights, the loss and its
  metrics. Not the per-token KL nor the gradients stored in bfloat16: eager forms the logits
  in bfloat16 (the dtype convention), which alone puts 0.5–1% of error into a full-vocabulary
  KL and 0.5–3% into the gradients (measured on these cases), so twice eager's error is at or
  above 1e-2 there; the first check still holds them to that.
"""
import pytest
import torch
from head_cases import check_three_way, head_magnitudes, kl_case, logprobs_case, run_kl
from head_cases import run_logprobs
from numerics import _magnitude, accumulation_dtype, allowed_error, assert_oracle

import tisdpo_kernels as tk
from tisdpo_kernels import get_preset
from tisdpo_kernels import reference as R

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


def _head_outputs(run_fn, masters, y, grads, dtype, **kw):
    truth = run_fn("reference", masters, y, grads, dtype=dtype, as_dtype=F64, **kw)
    ref = run_fn("reference", masters, y, grads, dtype=dtype, **kw)
    act = run_fn("torch", masters, y, grads, dtype=dtype, **kw)
    mags = head_magnitudes(run_fn, masters, y, grads, dtype=dtype, **kw)
    return {k: (act[k], ref[k], truth[k], mags[k]) for k in truth}


def _pref_inputs(dtype):
    g = torch.Generator().manual_seed(11)
    lp = -3 * torch.rand(6, 9, generator=g, dtype=F64)
    x = {"lp": lp, "lr": lp + 0.5 * torch.randn(6, 9, generator=g, dtype=F64),
         "w": 0.5 + torch.rand(6, 9, generator=g, dtype=F64),
         "kl": 0.3 * torch.rand(6, 9, generator=g, dtype=F64)}
    mask = torch.rand(6, 9, generator=g) > 0.3
    return {k: v.to(dtype) for k, v in x.items()}, mask


def _pref_run(impl, x, mask, cfg):
    x = {k: v.clone().requires_grad_(k in ("lp", "kl")) for k, v in x.items()}
    loss, met = tk.preference_loss(x["lp"], x["lr"], x["w"], config=cfg, mask=mask,
                                   kl=x["kl"], impl=impl)
    loss.backward()
    return {"loss": loss, **{k: met[k] for k in ("rewards/margins", "logps/chosen")},
            "dlp": x["lp"].grad, "dkl": x["kl"].grad}


def _pref_outputs(dtype):
    x, mask = _pref_inputs(dtype)
    cfg = get_preset("tdpo2").config
    truth = _pref_run("reference", {k: v.to(F64) for k, v in x.items()}, mask, cfg)
    ref = _pref_run("reference", x, mask, cfg)
    act = _pref_run("torch", x, mask, cfg)
    return {k: (act[k], ref[k], truth[k], None) for k in truth}


def _weights_outputs(dtype):
    x, mask = _pref_inputs(dtype)
    side = (torch.arange(6) < 3)[:, None].expand(6, 9)
    out = {}
    for method in ("exp_clamp", "rank_based", "threshold_and_scale"):
        def w(impl, pos, neg):
            return tk.token_weights(pos, neg, side=side, method=method, mask=mask, impl=impl)
        out[method] = (w("torch", x["lp"], x["lr"]), w("reference", x["lp"], x["lr"]),
                       w("reference", x["lp"].to(F64), x["lr"].to(F64)), None)
    return out


def _loss_module_outputs(dtype):
    from loss_cases import make_case, module_magnitudes, run

    case = make_case()
    runs = [run("tisdpo_paper", impl, case, dt, "padded")
            for impl, dt in (("torch", dtype), ("reference", dtype), ("reference", F64))]
    mags = module_magnitudes("tisdpo_paper", case, dtype)
    out = {"loss": tuple(r[0] for r in runs) + (mags["loss"],)}
    for k in ("rewards/margins", "kl/chosen", "weights/rejected"):
        out[k] = tuple(r[1][k] for r in runs) + (mags["metrics"][k],)
    for k in ("hidden", "weight", "bias"):
        out[f"d{k}"] = tuple(r[2][k] for r in runs) + (mags["grads"][k],)
    return out


def _outputs(op, dtype):
    if op == "linear_logprobs":
        masters, y, grads = logprobs_case(23, 17, 61)
        return _head_outputs(run_logprobs, masters, y, grads, dtype, softcap=5.0)
    if op == "linear_token_kl":
        masters, y, grads = kl_case(23, 17, 13, 61)
        return _head_outputs(run_kl, masters, y, grads, dtype, direction="ref_policy")
    if op == "preference_loss":
        return _pref_outputs(dtype)
    if op == "token_weights":
        return _weights_outputs(dtype)
    return _loss_module_outputs(dtype)


OPS = ["linear_logprobs", "linear_token_kl", "preference_loss", "token_weights", "TISDPOLoss"]


def _allowed(actual, ref, truth, magnitude, dtype, name):
    t = truth.detach().to(F64)
    m = _magnitude(magnitude, t, name)
    return allowed_error((ref.detach().to(F64) - t).abs(), t, m, dtype=dtype,
                         out_dtype=actual.dtype)[0]


def _fails(bad, ref, truth, dtype, name, magnitude):
    with pytest.raises(AssertionError, match=name):
        assert_oracle(bad, ref, truth, dtype=dtype, name=name, magnitude=magnitude)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("op", OPS)
def test_just_beyond_the_bound_fails(op, dtype):
    """Every output passes; moved past its bound at one element (its largest, then its
    smallest non-zero), by 4 float32 ulps or 1e-2 relative, it fails."""
    for name, (act, ref, truth, mag) in _outputs(op, dtype).items():
        assert_oracle(act, ref, truth, dtype=dtype, name=name, magnitude=mag)
        t = truth.detach().to(F64).reshape(-1)
        allowed = _allowed(act, ref, truth, mag, dtype, name).reshape(-1)
        nonzero = torch.nonzero(t != 0).flatten()
        assert nonzero.numel(), f"{name}: an all-zero output cannot show the bound biting"
        for i in (t.abs().argmax(), nonzero[t[nonzero].abs().argmin()]):
            # past the bound, plus one ulp of the moved value so that its rounding to the
            # output dtype cannot bring it back
            extra = (4 * torch.finfo(torch.float32).eps if dtype == torch.float32 else 1e-2) \
                * t[i].abs() + torch.finfo(act.dtype).eps * (t[i].abs() + allowed[i])
            bad = act.detach().to(F64).reshape(-1).clone()
            bad[i] = t[i] + allowed[i] + extra
            _fails(bad.reshape(act.shape).to(act.dtype), ref, truth, dtype, name, mag)


@pytest.mark.parametrize("op", OPS)
def test_fp32_output_rounded_to_bf16_fails(op):
    """An fp32 op whose result passed through bfloat16 somewhere (relative error up to
    2⁻⁹) is caught."""
    for name, (act, ref, truth, mag) in _outputs(op, torch.float32).items():
        bad = act.detach().to(torch.bfloat16).to(act.dtype)
        if torch.equal(bad, act.detach()):
            continue      # every value already bf16-representable (ranks, clamps)
        _fails(bad, ref, truth, torch.float32, name, mag)


# the outputs of a bfloat16 run that eager itself gets to well within 1e-2 (module docstring)
ONE_PERCENT = {
    "linear_logprobs": ("logp", "lse"),
    "linear_token_kl": ("logp", "ref_logp"),
    "preference_loss": ("loss", "rewards/margins", "logps/chosen"),
    "token_weights": ("exp_clamp", "rank_based", "threshold_and_scale"),
    "TISDPOLoss": ("loss", "rewards/margins", "kl/chosen", "weights/rejected"),
}


@pytest.mark.parametrize("op", OPS)
def test_one_percent_error_on_a_bf16_run_fails(op):
    """bfloat16 inputs: a 1e-2 relative error on the log-probs, lse, weights, loss and
    metrics fails."""
    outs = _outputs(op, torch.bfloat16)
    for name in ONE_PERCENT[op]:
        act, ref, truth, mag = outs[name]
        assert act.dtype == torch.float32, f"{name}: expected an output carried in float32"
        t = truth.detach().to(F64)
        bad = (act.detach().to(F64) + 1e-2 * t.abs()).to(act.dtype)
        _fails(bad, ref, truth, torch.bfloat16, name, mag)


def test_a_wrong_small_vocabulary_row_of_a_bf16_gradient_fails():
    """Eager's allowance is scaled to each element's magnitude: a bfloat16 d_weight whose
    least used vocabulary row is zero fails, though that error is below twice eager's largest
    error on d_weight (the whole allowance before it was scaled)."""
    act, ref, truth, mag = _outputs("linear_logprobs", torch.bfloat16)["d_weight"]
    t = truth.detach().to(F64)
    largest = t.abs().amax(-1)
    row = int(torch.argmin(torch.where(largest > 0, largest, torch.inf)))
    bad = act.detach().to(F64).clone()
    bad[row] = 0.0                                  # the row never written
    e = (ref.detach().to(F64) - t).abs().max()
    assert (bad[row] - t[row]).abs().max() < 2 * e           # within the unscaled allowance
    _fails(bad.to(act.dtype), ref, truth, torch.bfloat16, "d_weight", mag)


def test_the_bound_is_a_bound_not_a_table():
    """One formula for every test: the float32 floor is 7 unit roundoffs of the magnitude
    plus the output's own rounding, the eager term twice eager's error."""
    t = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    ref_err = torch.tensor([0.0, 1e-7, 0.0], dtype=F64)
    allowed, e = allowed_error(ref_err, t, torch.full_like(t, 4.0), dtype=torch.bfloat16,
                               out_dtype=torch.float32)
    u = torch.finfo(accumulation_dtype(torch.bfloat16)).eps / 2
    want = 2 * 1e-7 + 7 * u * 4.0 + torch.finfo(torch.float32).eps / 2 * t.abs()
    assert e == 1e-7 and torch.allclose(allowed, want, rtol=0, atol=0)
    # eager's term scaled to each element's magnitude, never above 2E: 2·min(E, ρ·M_i), and
    # none at an exact zero (M = 0)
    m = torch.tensor([8.0, 2.0, 0.0], dtype=F64)
    allowed, e = allowed_error(ref_err, t, m, dtype=torch.bfloat16, out_dtype=torch.float32)
    want = 2 * torch.tensor([1e-7, 1e-7, 0.0], dtype=F64) + 7 * u * m \
        + torch.finfo(torch.float32).eps / 2 * t.abs()
    assert torch.allclose(allowed, want, rtol=0, atol=0)
    m = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    allowed, _ = allowed_error(ref_err, t, m, dtype=torch.bfloat16, out_dtype=torch.float32)
    want = 2 * torch.tensor([0.5e-7, 1e-7, 0.25e-7], dtype=F64) + 7 * u * m \
        + torch.finfo(torch.float32).eps / 2 * t.abs()
    assert torch.allclose(allowed, want, rtol=1e-15, atol=0)
    # ρ over the elements the output can represent: one below η does not set it
    ref_err = torch.tensor([1e-39, 1e-7, 0.0], dtype=F64)
    m = torch.tensor([1e-39, 2.0, 0.5], dtype=F64)
    allowed, _ = allowed_error(ref_err, t, m, dtype=torch.bfloat16, out_dtype=torch.float32)
    want = 2 * torch.tensor([0.5e-46, 1e-7, 0.25e-7], dtype=F64) + 7 * u * m \
        + torch.finfo(torch.float32).eps / 2 * t.abs()
    assert torch.allclose(allowed, want, rtol=1e-15, atol=0)


def test_a_subnormal_flushed_to_zero_passes_and_nothing_else_gains():
    """Underflow is allowed for where it can happen: an implementation may flush subnormal
    outputs to zero where eager keeps them (float16 gradients of tiny elements), which no
    relative term covers; a value in the normal range gets no such allowance, and an exact
    zero (magnitude 0) none of eager's error either."""
    t = torch.tensor([0.5, 3e-6, -1e-5, 1e-2, 0.0], dtype=F64)
    ref = t.to(torch.float16)                                  # eager keeps the subnormals
    ref[0] += 1e-3                                             # and errs on the largest
    m = t.abs().clamp(min=1e-6)
    m[4] = 0.0
    flushed = t.to(torch.float16)
    flushed[1:3] = 0.0
    assert_oracle(flushed, ref, t, dtype=torch.float16, name="x", magnitude=m)
    eta = torch.finfo(torch.float16).tiny
    for i, bad in ((3, 1e-2 + 0.9 * eta), (4, 2 * eta)):
        off = t.to(torch.float16)
        off[i] = bad
        _fails(off, ref, t, torch.float16, "x", m)


def test_magnitude_below_the_value_is_refused():
    t = torch.tensor([3.0], dtype=F64)
    with pytest.raises(AssertionError, match="not a magnitude"):
        assert_oracle(t.float(), t, t, dtype=torch.float32, name="x", magnitude=1.0)


def test_non_finite_output_or_reference_is_named():
    """A NaN in the output fails naming it; so does one in the reference, which would
    otherwise make the bound NaN (and no element could be judged against it)."""
    t = torch.tensor([3.0, 1.0], dtype=F64)
    nan = torch.tensor([3.0, float("nan")])
    with pytest.raises(AssertionError, match=r"x: non-finite value nan at index \(1,\)"):
        assert_oracle(nan, t.float(), t, dtype=torch.float32, name="x")
    with pytest.raises(AssertionError, match=r"x: the reference, .* nan at index \(1,\)"):
        assert_oracle(t.float(), nan, t, dtype=torch.float32, name="x")


def test_three_way_uses_the_model_on_the_kernels():
    """check_three_way passes the torch backend on an odd case (the wiring of the model)."""
    masters, y, grads = logprobs_case(7, 5, 11, ignored=(2,))
    check_three_way(run_logprobs, "torch", masters, y, grads, dtype=torch.float32)
    assert R.stat_dtype(torch.bfloat16) == torch.float32
