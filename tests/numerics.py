"""The one numerics oracle every test uses (design.md §4).

Three values per output: ``truth`` (the reference in float64), ``ref`` (the reference at the
test dtype, i.e. what eager PyTorch would give) and ``actual`` (the implementation under
test). Pass when

    max |actual − truth| ≤ c · max |ref − truth| + eps(dtype) · max |truth|

(or the same with relative RMS in place of max, for large reductions). On failure the
message names the output and the worst index.
"""
from __future__ import annotations

import torch

_EPS = {
    torch.float64: torch.finfo(torch.float64).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
}


def assert_oracle(actual, ref, truth, *, dtype, name="output", c=2.0, metric="max"):
    """Check ``actual`` against float64 ``truth`` relative to the eager error of ``ref``.

    dtype: the test's input dtype (sets the epsilon term). metric: "max" or "rms".
    """
    assert actual is not None, f"{name}: implementation returned None"
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    a, r, t = (x.detach().to(torch.float64).cpu() for x in (actual, ref, truth))
    assert torch.isfinite(t).all(), f"{name}: the float64 truth itself is not finite"
    bad = ~torch.isfinite(a)
    if bad.any():
        idx = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(f"{name}: non-finite value {a[idx].item()} at index {idx}")
    err, ref_err = (a - t).abs(), (r - t).abs()
    scale = t.abs().max().item() if t.numel() else 0.0
    eps = _EPS[dtype] * max(scale, 1e-30)
    if metric == "max":
        measured, allowed = err.max().item() if err.numel() else 0.0, None
        allowed = c * (ref_err.max().item() if ref_err.numel() else 0.0) + eps
    elif metric == "rms":
        rms = lambda x: x.pow(2).mean().sqrt().item() if x.numel() else 0.0  # noqa: E731
        measured = rms(err)
        allowed = c * rms(ref_err) + _EPS[dtype] * max(rms(t), 1e-30)
    else:
        raise ValueError(metric)
    if measured > allowed:
        idx = tuple(torch.nonzero(err == err.max())[0].tolist())
        raise AssertionError(
            f"{name}: {metric} error {measured:.3e} > allowed {allowed:.3e} "
            f"(c={c} × eager error {ref_err.max().item():.3e} + eps); worst at index {idx}: "
            f"actual {a[idx].item():.8g}, truth {t[idx].item():.8g}, eager {r[idx].item():.8g}"
        )


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
