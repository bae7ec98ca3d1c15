"""Token weights in Triton (docs/ALGORITHMS.md §2, §6.2): one elementwise kernel for every rule.

The method is a constexpr, so each rule compiles to its own straight-line kernel from one
source. Per token (float64 throughout, as the reference computes; stored as float32, or
float64 for float64 inputs), with c = log π⁺ − log π⁻ (optionally rounded half-to-even to
``round_decimals``, as ``torch.round`` does) and s = μ·c:

    exp_clamp            k·exp(μ·clamp(c, L, U))
    threshold_and_scale  w_min + (clamp(s, lo, hi) − lo)/(hi − lo)·(w_max − w_min)
    threshold            clamp(s, lo, hi)
    origin               s
    cdpo                 chosen 1 (only_neg) or e^{lp}, rejected 1 − e^{lp}

Tokens with seq_id < 0 get 0 and are never read. The per-sequence rules rank_based and
binary use the kernel for s and then torch sorting (two stable argsorts, see
``_common.per_sequence_weights``): a segmented sort kernel would not pay at
these sizes, and torch's sort is already sync-free.

Parameters travel as a small float64 tensor, not as kernel scalars, because Triton passes
Python floats as float32 (0.7 would become 0.699999988…).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tisdpo_kernels._common import per_sequence_weights, stat_dtype
from tisdpo_kernels._triton import configs
from tisdpo_kernels._triton.common import f64_constants, upcast
from tisdpo_kernels.config import WeightParams

__all__ = ["token_weights", "token_weights_fwd"]

_ELEMENTWISE = ("exp_clamp", "threshold_and_scale", "threshold", "origin", "cdpo")


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _round_half_even(x):
    """nearbyint(x) for float64 x, exact: ties go to the even neighbour."""
    r = tl.floor(x)
    diff = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((diff > 0.5) | ((diff == 0.5) & odd), r + 1.0, r)


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def token_weights_fwd_kernel(
    POS, NEG, MU, IDS, PRM, OUT, N,
    stride_pos, stride_neg, stride_mu, stride_ids,
    METHOD: tl.constexpr, HAS_ROUND: tl.constexpr, ONLY_NEG: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):
    # PRM (float64): k, L, U, clip_lower, clip_upper, w_min, w_max, 10**round_decimals
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    sid = tl.load(IDS + offs * stride_ids, mask=inb, other=-1)
    valid = inb & (sid >= 0)
    lp = tl.load(POS + offs * stride_pos, mask=valid, other=0.0)
    if UPCAST:  # the interpreter computes bf16 on raw bits: go through fp32 there only
        lp = lp.to(tl.float32)
    lp = lp.to(tl.float64)
    mu = tl.load(MU + offs * stride_mu, mask=valid, other=1.0).to(tl.float64)
    if METHOD == "cdpo":
        s = tl.exp(lp)
        if ONLY_NEG:
            w = tl.where(mu > 0, 1.0, 1.0 - s)
        else:
            w = tl.where(mu > 0, s, 1.0 - s)
    else:
        ln = tl.load(NEG + offs * stride_neg, mask=valid, other=0.0)
        if UPCAST:
            ln = ln.to(tl.float32)
        c = lp - ln.to(tl.float64)
        if HAS_ROUND:
            scale = tl.load(PRM + 7)
            c = _round_half_even(c * scale) / scale
        if METHOD == "exp_clamp":
            w = tl.load(PRM + 0) * tl.exp(mu * _clamp(c, tl.load(PRM + 1), tl.load(PRM + 2)))
        else:
            s = mu * c
            lo = tl.load(PRM + 3)
            hi = tl.load(PRM + 4)
            if METHOD == "threshold_and_scale":
                w_min = tl.load(PRM + 5)
                w = w_min + (_clamp(s, lo, hi) - lo) / (hi - lo) * (tl.load(PRM + 6) - w_min)
            elif METHOD == "threshold":
                w = _clamp(s, lo, hi)
            else:  # origin
                w = s
    w = tl.where(valid, w, 0.0)
    tl.store(OUT + offs, w.to(OUT.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------- launchers

def token_weights_fwd(lp_pos, lp_neg, mu, seq_ids, method: str, params: WeightParams,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """Launch the elementwise kernel for ``method`` (one of the elementwise rules) -> [N]."""
    assert method in _ELEMENTWISE, method
    cfg = configs.get("token_weights_fwd", lp_pos)
    block = cfg.meta["BLOCK"]
    assert block >= 16, f"BLOCK={block} must be >= 16"
    n = lp_pos.shape[0]
    out = torch.empty(n, dtype=out_dtype, device=lp_pos.device)
    if n == 0:
        return out
    p = params
    scale = 10.0 ** p.round_decimals if p.round_decimals is not None else 1.0
    prm = f64_constants([p.k, p.lower, p.upper, p.clip_lower, p.clip_upper, p.w_min, p.w_max,
                         scale], lp_pos.device)
    neg = lp_pos if lp_neg is None else lp_neg
    token_weights_fwd_kernel[(triton.cdiv(n, block),)](
        lp_pos, neg, mu, seq_ids, prm, out, n,
        lp_pos.stride(0), neg.stride(0), mu.stride(0), seq_ids.stride(0),
        METHOD=method, HAS_ROUND=p.round_decimals is not None, ONLY_NEG=bool(p.only_neg),
        UPCAST=upcast(lp_pos, lp_neg), **cfg.meta, **cfg.launch_kwargs(lp_pos),
    )
    return out


# ----------------------------------------------------------------------------- public

def token_weights(lp_pos, lp_neg, mu, seq_ids, num_seqs: int, method: str,
                  params: WeightParams) -> torch.Tensor:
    """Weights [N] (backend contract of ``tisdpo_kernels.token_weights``); no host sync."""
    del num_seqs
    out_dtype = stat_dtype(lp_pos.dtype)
    if method in _ELEMENTWISE:
        return token_weights_fwd(lp_pos, lp_neg, mu, seq_ids, method, params, out_dtype)
    if method in ("rank_based", "binary"):
        s = token_weights_fwd(lp_pos, lp_neg, mu, seq_ids, "origin", params, torch.float64)
        w = per_sequence_weights(s, seq_ids, method, params)
        return torch.where(seq_ids >= 0, w, 0.0).to(out_dtype)
    raise ValueError(f"unknown weight method {method!r}")
