"""The one numerics oracle every test uses: a bound that holds for any correct summation order.

Three values per output: ``truth`` (the reference in float64 on the same, already rounded,
inputs), ``ref`` (the reference at the test dtype: what eager PyTorch gives) and ``actual``
(the implementation under test). ``assert_oracle`` passes when, for every element i,

    |actual_i − truth_i|  ≤  c·E_i  +  λ·u·M_i  +  u_out·|truth_i|  (+ η)             (1)

- E_i = min(E, ρ·M_i), E = max_j |ref_j − truth_j| eager's own error on this output and
  ρ = max_j |ref_j − truth_j| / M_j the largest ratio of eager's error to an element's
  magnitude, over the elements with M_j > η (E_i = 0 where M_i = 0: an exact zero). It carries what eager shares with every correct
  implementation: conditioning, and intermediates eager also rounds to a 16-bit input dtype
  (bf16 logits, bf16 operands of the gradient GEMMs), in proportion to each element's
  magnitude, as those roundings are.
- M_i, the rounding magnitude of element i (defined below), default max_j |truth_j|.
- u, the unit roundoff of the accumulation dtype: 2⁻²⁴ (float32) for float32, bfloat16 and
  float16 tests (every backend accumulates in float32 at least), 2⁻⁵³ for float64 tests.
- η, the smallest normal number of actual's dtype, added where |truth_i| is below η plus
  the rest of the bound (where the value may be computed below η): underflow, which no
  relative term covers (an implementation may flush subnormals to zero where eager keeps
  them).
- u_out·|truth_i|, u_out the unit roundoff of actual's dtype: the last rounding, to nearest,
  to the output's dtype (torch's casts and compiled Triton's round to nearest; under the
  Triton interpreter, whose float → 16-bit casts truncate, kernels write such outputs in
  float32 and torch rounds them).

Why eager alone is not a bound. Eager's error is one sample of a rounding process; another
equally correct summation order gives another. For a scalar or a short vector, two such
samples are about equally likely to be either size (their ratio is near Cauchy-distributed:
P(|X| > 2|Y|) ≈ 0.3), so "≤ 2 × eager" fails correct code on one machine and passes it on
another. The floor λ·u·M is what makes (1) hold for every order.

The magnitude M and the constant λ. To first order, the error of a computed output is
Σ_r δ_r·c_r over all roundings r of the computation, |δ_r| ≤ u, where c_r is the exact value
rounded at r times the output's sensitivity to it. Model the δ_r as independent with mean
zero (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019); Hoeffding's inequality then gives

    P(|error| ≥ λ·u·‖c‖₂) ≤ 2·exp(−λ²/2),

and M_i is a bound on ‖c‖₂ for element i. For a sum of n terms in *any* order (any binary
tree: n − 1 additions, each partial sum |s_k| ≤ Σ|x_j|) the sum's own part of ‖c‖₂ is at most
√n·Σ_j|x_j| — "the magnitude being summed", scaled by the square root of the number of
roundings; roundings of independent intermediates add in quadrature; a transcendental
function (exp, log, tanh) counts as 2 roundings. ``tests/magnitudes.py`` builds M this way for
the LM-head ops and the loss; other tests pass a documented proxy or keep the default (the
output's own scale: right when the terms summed are of the output's size). λ = 7 gives
2·e^{−24.5} = 4.6·10⁻¹¹ per element: below 10⁻⁴ over the ~10⁶ elements the suite checks.

The bound keeps its bite: a few ulps beyond it fails, and so does a 1% error on a bfloat16
output (tests/test_numerics.py), because the floor stays at float32 precision for 16-bit
inputs. Eager's allowance follows each element's magnitude: on bfloat16 gradients eager's
worst error is ~0.5% of the largest element, which, as one allowance for the whole output,
would let an error confined to small elements pass (a vocabulary row of d_weight left
unwritten does, in tests/test_numerics.py); scaled by M_i it fails. With the default M
(the output's own scale) E_i = E. metric="rms" compares root-mean-squares: rms(err) ≤
c·rms(ref − truth) + rms(floor).
"""
from __future__ import annotations

import math

import torch

LAMBDA = 7.0          # Hoeffding: P(violation) ≤ 2·exp(−λ²/2) per element


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps/2 of ``dtype`` (the largest relative error of round-to-nearest)."""
    return torch.finfo(dtype).eps / 2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision every backend accumulates in for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def allowed_error(ref_err: torch.Tensor, truth: torch.Tensor, magnitude, *, dtype, out_dtype,
                  c: float = 2.0, metric: str = "max"):
    """The right-hand side of (1): elementwise for metric="max", one number for "rms".
    Returns (allowed, E) with E eager's max (or rms) error."""
    u = unit_roundoff(accumulation_dtype(dtype))
    eta = torch.finfo(out_dtype).tiny
    floor = LAMBDA * u * magnitude + unit_roundoff(out_dtype) * truth.abs()
    if metric == "max":
        e = ref_err.max().item() if ref_err.numel() else 0.0
        allowed = c * _scaled(ref_err, magnitude, e, eta) + floor
        # underflow: a value that may be computed below η may be flushed to zero
        return allowed + torch.where(truth.abs() < eta + allowed, eta, 0.0), e
    if metric == "rms":
        e = _rms(ref_err)
        return c * e + _rms(floor), e
    raise ValueError(f"metric must be 'max' or 'rms', got {metric!r}")


def _scaled(ref_err: torch.Tensor, magnitude, e: float, eta: float) -> torch.Tensor:
    """Eager's error allowance per element: E, or less where the element's magnitude is
    smaller — eager's largest error relative to the magnitude, times the element's
    magnitude: min(E, ρ·M_i), ρ = max_j |ref_j − truth_j| / M_j over the elements the output
    can represent (M_j > η: one that underflows in every implementation would set ρ = 1);
    0 where M_i = 0 (an exact zero: every term of it is zero). E for every element when no
    magnitude exceeds η."""
    magnitude = torch.broadcast_to(torch.as_tensor(magnitude, dtype=ref_err.dtype),
                                   ref_err.shape)
    counted = magnitude > eta
    if not counted.any():
        return torch.full_like(magnitude, e)
    rel = torch.where(counted, ref_err / torch.where(counted, magnitude, 1.0), 0.0).max()
    return torch.clamp(rel * magnitude, max=e)


def _rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item() if x.numel() else 0.0


def _magnitude(magnitude, t: torch.Tensor, name: str) -> torch.Tensor:
    """The magnitude as a float64 tensor of truth's shape; default: the output's own scale."""
    if magnitude is None:
        scale = t.abs().max().item() if t.numel() else 0.0
        return torch.full_like(t, scale)
    m = torch.as_tensor(magnitude, dtype=torch.float64).detach().cpu()
    m = torch.broadcast_to(m, t.shape)
    assert torch.isfinite(m).all() and (m >= 0).all(), f"{name}: magnitude must be finite, ≥ 0"
    # a magnitude counts the output's own final rounding, so it is never below |truth|; below
    # 1e-150 the squares a magnitude is built from underflow, and |truth| stands in for it
    tiny = t.abs() < 1e-150
    m = torch.where(tiny, torch.maximum(m, t.abs()), m)
    short = m < t.abs() * (1 - 1e-9)
    if short.any():
        idx = tuple(torch.nonzero(short)[0].tolist())
        raise AssertionError(f"{name}: magnitude {m[idx].item():.3e} < |truth| "
                             f"{t[idx].abs().item():.3e} at {idx}: not a magnitude")
    return m


def _assert_finite(x: torch.Tensor, what: str) -> None:
    """AssertionError naming ``what``, the first non-finite value of ``x`` and its index."""
    bad = ~torch.isfinite(x)
    if bad.any():
        idx = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(f"{what} {x[idx].item()} at index {idx}")


def assert_oracle(actual, ref, truth, *, dtype, name="output", c=2.0, metric="max",
                  magnitude=None):
    """Check ``actual`` against float64 ``truth`` with bound (1) of the module docstring.

    dtype: the test's input dtype (sets u). magnitude: M (a tensor broadcastable to truth, or
    a number), the rounding magnitude of each element; None = max |truth|. metric: "max"
    (elementwise) or "rms". On failure the message names the output and the worst index.
    """
    assert actual is not None, f"{name}: implementation returned None"
    assert actual.shape == truth.shape, \
        f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    out_dtype = actual.dtype if actual.dtype.is_floating_point else torch.float64
    a, r, t = (x.detach().to(torch.float64).cpu() for x in (actual, ref, truth))
    assert torch.isfinite(t).all(), f"{name}: the float64 truth itself is not finite"
    _assert_finite(a, f"{name}: non-finite value")
    _assert_finite(r, f"{name}: the reference, whose error sets the bound, has a non-finite value")
    m = _magnitude(magnitude, t, name)
    err, ref_err = (a - t).abs(), (r - t).abs()
    allowed, e = allowed_error(ref_err, t, m, dtype=dtype, out_dtype=out_dtype, c=c,
                               metric=metric)
    if metric == "max":
        over = err - allowed
        if t.numel() == 0 or over.max().item() <= 0:
            return
        idx = tuple(torch.nonzero(over == over.max())[0].tolist())
        e_i = _scaled(ref_err, m, e, torch.finfo(out_dtype).tiny)[idx].item()
        raise AssertionError(
            f"{name}: error {err[idx].item():.3e} > allowed {allowed[idx].item():.3e} at "
            f"index {idx} (c={c} × eager error {e_i:.3e} here, {e:.3e} at most, + "
            f"{LAMBDA:g}·u·M with M={m[idx].item():.3e} + u_out·|truth| (+ η)): actual "
            f"{a[idx].item():.9g}, truth {t[idx].item():.9g}, eager {r[idx].item():.9g}")
    measured = _rms(err)
    if measured > allowed:
        raise AssertionError(
            f"{name}: rms error {measured:.3e} > allowed {allowed:.3e} (c={c} × eager rms "
            f"error {e:.3e} + rms floor); max error {err.max().item():.3e}")


def sum_magnitude(terms: torch.Tensor, dim=None) -> torch.Tensor:
    """√n·Σ|x| over ``dim``: the rounding magnitude of a sum of n exact terms in any order."""
    x = terms.detach().to(torch.float64).abs()
    if dim is None:
        return math.sqrt(max(x.numel(), 1)) * x.sum()
    n = x.shape[dim] if isinstance(dim, int) else math.prod(x.shape[d] for d in dim)
    return math.sqrt(max(n, 1)) * x.sum(dim)


def nan_buffer_view(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """A copy of ``t`` living as a strided view inside a larger NaN-filled buffer.

    Rows are padded by ``pad`` elements on the last dim and the view starts at an offset, so
    a kernel that reads outside its tensor, or assumes contiguity, picks up NaN.
    """
    if t.dim() == 0:
        return t.clone()
    shape = list(t.shape)
    big_shape = shape[:-1] + [shape[-1] + pad]
    fill = float("nan") if t.dtype.is_floating_point else -12345
    buf = torch.full([2] + big_shape, fill, dtype=t.dtype, device=t.device)
    view = buf[1][..., pad // 2: pad // 2 + shape[-1]]
    view.copy_(t)
    return view.requires_grad_(t.requires_grad) if t.dtype.is_floating_point else view
