"""Fused full-vocabulary per-token KL between a policy head and a reference head, in Triton.

Per token t, with policy logits z = softcap(W h_t + b) and reference logits
r = softcap(W' h'_t + b') (D' may differ from D), p = softmax(z), q = softmax(r):

    policy_ref:  KL_t = Σ_v p_v (log p_v − log q_v)        (TIS-DPO's η)
    ref_policy:  KL_t = Σ_v q_v (log q_v − log p_v)        (TDPO)
    logp_t = log p_{y_t},   ref_logp_t = log q_{y_t}

Nothing of size tokens × vocab is stored in either pass.

Forward (``linear_token_kl_fwd_kernel``): one program per (token block, vocabulary split) walks
its split's tiles; each tile forms both heads' logits (two GEMM loops, over D and D', fp32
accumulation; on sm_90 both weights' tiles by TMA, ``common.logits_tile``) and folds them into
fp32 online statistics: maxima m_p, m_q, sums S_p = Σ e^{z−m_p}, S_q = Σ e^{r−m_q}, the two
target logits, and the KL accumulator of the weighting side w (p for policy_ref, q for
ref_policy) against the other side o:

    A = Σ_v e^{x_w,v − m_w} ((x_w,v − m_w) − (x_o,v − m_o)),   KL = A / S_w − log S_w + log S_o

A is kept relative to the *current* maxima: when they move it is rescaled and shifted,
A ← e^{m_w − m_w'} (A + S_w ((m_w − m_w') − (m_o − m_o'))). Every term is a finite, centred
log-ratio times e^{≤0}: a probability that underflows contributes 0 (never 0·log 0) and no
large logits cancel. With several splits, ``linear_token_kl_fwd_combine_kernel`` merges the
partial statistics by the same rule. Saved for backward: m_p, log S_p, m_q, log S_q, KL
(fp32 [5, N]); log p = (z − m_p) − log S_p is formed as eager log_softmax forms it (a single
fp32 lse of magnitude |z| would add a per-row error that sums coherently into d_weight).
Flops: 2·N·(D + D')·V.

Backward, per dz slab of rows or of vocabulary columns (``slabs.slab_backward``, as in
linear_logprobs.py): ``linear_token_kl_bwd_kernel``, one program per (token block, vocab
block) tile of the slab, grouped GROUP_N token blocks at a time for L2 reuse, recomputes both
logit tiles and writes

    dz_v = g_logp (1[v = y] − p_v) + g_kl G_v,
    G_v = p_v (log p_v − log q_v − KL_t)  (policy_ref),     G_v = p_v − q_v  (ref_policy)

(× softcap′ on the policy side) for arbitrary per-token upstream gradients into a dz slab;
then d_hidden = dz·W, d_weight (+)= dzᵀ·H and d_bias = Σ_rows dz are GEMMs and a sum through
torch, without atomics, so the gradients are the same bit for bit run to run. The logits are
recomputed once and the slab feeds both GEMMs. Flops: 2·N·(D + D')·V (recompute) + 2·N·D·V per
requested gradient. Exact mode only: no tile is skipped for a small softmax.

Ignored tokens (and, in backward, tokens whose two upstream gradients are both 0) are packed
out on the device (``common.compact_rows``, no host sync): they cost no GEMM work and get
kl = logp = ref_logp = 0 and zero gradient. The reference head gets no gradient.

Logits from GEMMs (``TISDPO_HEAD_LOGITS=gemm``, docs/DESIGN.md §3): per slab (chunks of rows
in the forward, the backward's slabs in the backward), the framework's GEMM (cuBLAS on CUDA)
writes both heads' logits h·Wᵀ and h'·W'ᵀ in their input dtypes (the two slabs share the dz
budget) and both kernels read their tiles from them (``Z_GIVEN``) instead of multiplying; the
backward's dz overwrites the policy's logits in place. The same math and outputs, the logits
rounded as eager rounds them; no TMA, no host sync.

Dispatch as linear_logprobs.py: compiled on CUDA; interpreted on CPU with 16-bit tiles upcast after
loading (UPCAST). The public function goes through ``torch.library`` custom ops so that
torch.compile sees one node. float64 is rejected (use impl="torch" or "reference").
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from tisdpo_kernels import _env
from tisdpo_kernels._common import first_order
from tisdpo_kernels._triton import configs
from tisdpo_kernels._triton.common import (
    check_blocks, check_dtype, compact_rows, device_guard, dot_precision, gather_cols,
    given_logits, grouped_tile, head_logits, launch, num_splits, softcap_grad, split_rows,
    store_tile, tma, upcast,
)
from tisdpo_kernels._triton.linear_token_kl_stats import (
    M0, kl_online_step, kl_store, linear_token_kl_fwd_combine_kernel,
)
from tisdpo_kernels._triton.slabs import (
    column_band, dz_dtype, dz_slab, gemm_logits, logit_chunks, slab_backward,
)

__all__ = ["linear_token_kl", "linear_token_kl_fwd", "linear_token_kl_bwd",
           "LinearTokenKLFunction"]

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _both_logits(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, z_ptr, r_ptr, rows, local, cols,
                 col0, row_mask, col_mask, D, DR, stride_hn, stride_hd, stride_wv, stride_wd,
                 stride_b, stride_hrn, stride_hrd, stride_wrv, stride_wrd, stride_br, stride_z,
                 stride_r, cap, HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 TMA: tl.constexpr, Z_GIVEN: tl.constexpr):
    """The policy's and the reference's fp32 logit tiles at (rows, cols): multiplied from the
    heads, or with Z_GIVEN read from rows ``local`` of the GEMMs' logits z and r."""
    if Z_GIVEN:
        z = given_logits(z_ptr, local, cols, row_mask, col_mask, stride_z, b_ptr, stride_b, cap,
                         HAS_BIAS, HAS_SOFTCAP)
        r = given_logits(r_ptr, local, cols, row_mask, col_mask, stride_r, br_ptr, stride_br,
                         cap, HAS_REF_BIAS, HAS_SOFTCAP)
    else:
        z = head_logits(h_ptr, w_ptr, b_ptr, rows, cols, col0, row_mask, col_mask, D,
                        stride_hn, stride_hd, stride_wv, stride_wd, stride_b, cap, HAS_BIAS,
                        HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION, TMA)
        r = head_logits(hr_ptr, wr_ptr, br_ptr, rows, cols, col0, row_mask, col_mask, DR,
                        stride_hrn, stride_hrd, stride_wrv, stride_wrd, stride_br, cap,
                        HAS_REF_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
                        DOT_PRECISION, TMA)
    return z, r


@triton.jit
def linear_token_kl_fwd_kernel(
        h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, t_ptr, rows_ptr, count_ptr,
        part_ptr, tlogit_ptr, kl_ptr, logp_ptr, rlogp_ptr, stats_ptr, z_ptr, r_ptr,
        N, V, D, DR, NUM_SPLITS,
        stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
        stride_hrn, stride_hrd, stride_wrv, stride_wrd, stride_br, stride_t, stride_s,
        stride_z, stride_r, cap,
        HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        POLICY_REF: tl.constexpr, FINAL: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        TMA: tl.constexpr = False, Z_GIVEN: tl.constexpr = False):
    """Over the N slots of rows_ptr; stats [5, stride_s] by row id. Z_GIVEN: both heads'
    logit tiles are read from z and r [N, V] (slot i's logits in row i; the heads' h·Wᵀ,
    ``TISDPO_HEAD_LOGITS=gemm``) instead of multiplied."""
    split, slots, row_mask, rows, tgt, v_lo, v_hi, n_tiles = split_rows(
        tl.program_id(0), NUM_SPLITS, rows_ptr, count_ptr, t_ptr, stride_t, V, BLOCK_N, BLOCK_V)
    m_p = tl.full((BLOCK_N,), M0, tl.float32)
    m_q = tl.full((BLOCK_N,), M0, tl.float32)
    s_p = tl.zeros((BLOCK_N,), tl.float32)
    s_q = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    rt = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(0, n_tiles):
        col0 = v_lo + i * BLOCK_V
        cols = col0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z, r = _both_logits(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, z_ptr, r_ptr, rows,
                            slots, cols, col0, row_mask, col_mask, D, DR, stride_hn, stride_hd,
                            stride_wv, stride_wd, stride_b, stride_hrn, stride_hrd, stride_wrv,
                            stride_wrd, stride_br, stride_z, stride_r, cap, HAS_BIAS,
                            HAS_REF_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
                            DOT_PRECISION, TMA, Z_GIVEN)
        zt += gather_cols(z, cols, tgt)
        rt += gather_cols(r, cols, tgt)
        m_p, s_p, m_q, s_q, acc = kl_online_step(m_p, s_p, m_q, s_q, acc, z, r, col_mask,
                                                 POLICY_REF)
    if FINAL:
        kl_store(rows, row_mask, m_p, s_p, m_q, s_q, acc, zt, rt, kl_ptr, logp_ptr,
                 rlogp_ptr, stats_ptr, stride_s, POLICY_REF)
    else:
        # part [5, S, N] by slot: m_p, S_p, m_q, S_q, A; the split holding the target writes
        # the target logits tlogit [2, N]
        ptrs = part_ptr + split.to(tl.int64) * N + slots
        step = NUM_SPLITS.to(tl.int64) * N
        tl.store(ptrs, m_p, mask=row_mask)
        tl.store(ptrs + step, s_p, mask=row_mask)
        tl.store(ptrs + 2 * step, m_q, mask=row_mask)
        tl.store(ptrs + 3 * step, s_q, mask=row_mask)
        tl.store(ptrs + 4 * step, acc, mask=row_mask)
        owns_target = row_mask & (tgt >= v_lo) & (tgt < v_hi)
        tl.store(tlogit_ptr + slots, zt, mask=owns_target)
        tl.store(tlogit_ptr + N + slots, rt, mask=owns_target)


@triton.jit
def linear_token_kl_bwd_kernel(
        h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, t_ptr, rows_ptr, count_ptr, stats_ptr,
        gk_ptr, gl_ptr, z_ptr, r_ptr, dz_ptr,
        lo, C, N, V, D, DR,
        stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
        stride_hrn, stride_hrd, stride_wrv, stride_wrd, stride_br,
        stride_t, stride_gk, stride_gl, stride_z, stride_r, stride_dz, cap,
        HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        POLICY_REF: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        GROUP_N: tl.constexpr, TMA: tl.constexpr = False, Z_GIVEN: tl.constexpr = False):
    """One [BLOCK_N, BLOCK_V] tile of the policy's dz slab for slots lo..lo+C (module
    docstring): both heads' logits recomputed; zeros for slots past the kept count.
    Z_GIVEN: the tiles are read from the chunk's logits z and r [C, V] (the heads' h·Wᵀ)
    instead of multiplied; z may be the dz slab itself (each program reads, then writes, only
    its own tile)."""
    pid_n, pid_v = grouped_tile(tl.program_id(0), C, V, BLOCK_N, BLOCK_V, GROUP_N)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    count = tl.load(count_ptr)
    if lo + pid_n * BLOCK_N < count:
        slots = lo + local
        row_mask = (local < C) & (slots < count)
        rows = tl.load(rows_ptr + slots, mask=row_mask, other=0)
        tgt = tl.load(t_ptr + rows * stride_t, mask=row_mask, other=-1)
        g_kl = tl.load(gk_ptr + rows * stride_gk, mask=row_mask, other=0.0).to(tl.float32)
        g_lp = tl.load(gl_ptr + rows * stride_gl, mask=row_mask, other=0.0).to(tl.float32)
        col0 = pid_v * BLOCK_V
        z, r = _both_logits(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, z_ptr, r_ptr, rows,
                            local, cols, col0, row_mask, col_mask, D, DR, stride_hn, stride_hd,
                            stride_wv, stride_wd, stride_b, stride_hrn, stride_hrd, stride_wrv,
                            stride_wrd, stride_br, stride_z, stride_r, cap, HAS_BIAS,
                            HAS_REF_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
                            DOT_PRECISION, TMA, Z_GIVEN)
        m_p = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
        ls_p = tl.load(stats_ptr + N + rows, mask=row_mask, other=0.0)
        m_q = tl.load(stats_ptr + 2 * N + rows, mask=row_mask, other=0.0)
        ls_q = tl.load(stats_ptr + 3 * N + rows, mask=row_mask, other=0.0)
        log_p = (z - m_p[:, None]) - ls_p[:, None]
        log_q = (r - m_q[:, None]) - ls_q[:, None]
        p = tl.exp(log_p)
        if POLICY_REF:
            kl = tl.load(stats_ptr + 4 * N + rows, mask=row_mask, other=0.0)
            gv = p * (log_p - log_q - kl[:, None])
        else:
            gv = p - tl.exp(log_q)
        dz = g_kl[:, None] * gv - g_lp[:, None] * p
        dz += tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0)
        if HAS_SOFTCAP:
            dz *= softcap_grad(z, cap)
        dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    else:
        dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    store_tile(dz_ptr, dz, pid_n * BLOCK_N, pid_v * BLOCK_V, C, V, stride_dz, BLOCK_N, BLOCK_V,
               TMA)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


# both heads' weights (and the backward's dz slab) go through tensor descriptors when TMA is
# on (common.launch)
_DESCRIPTORS = (("w_ptr", ("BLOCK_V", "BLOCK_D")), ("wr_ptr", ("BLOCK_V", "BLOCK_D")))
_BWD_DESCRIPTORS = _DESCRIPTORS + (("dz_ptr", ("BLOCK_N", "BLOCK_V")),)
# the autotuner's key, both kernels (a name a kernel lacks is left out of its key): the shapes,
# and the flags, so that each launch kind is timed on its own
_AUTOTUNE_KEY = ("V", "D", "DR", "HAS_BIAS", "HAS_REF_BIAS", "HAS_SOFTCAP", "POLICY_REF",
                 "FINAL", "UPCAST", "DOT_PRECISION", "TMA", "Z_GIVEN")


def _common_flags(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, direction,
                  softcap, gemm: bool) -> dict:
    fp32 = torch.float32 in (hidden.dtype, ref_hidden.dtype)
    return dict(HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None,
                HAS_SOFTCAP=softcap is not None, POLICY_REF=direction == "policy_ref",
                UPCAST=upcast(hidden) or upcast(ref_hidden),
                DOT_PRECISION=dot_precision(torch.float32 if fp32 else hidden.dtype),
                TMA=not gemm and tma(hidden, weight, ref_weight), Z_GIVEN=gemm)


def _head_args(hidden, weight, bias, ref_hidden, ref_weight, ref_bias):
    b = bias if bias is not None else weight
    br = ref_bias if ref_bias is not None else ref_weight
    return ((hidden, weight, b, ref_hidden, ref_weight, br),
            (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), b.stride(0),
             ref_hidden.stride(0), ref_hidden.stride(1), ref_weight.stride(0),
             ref_weight.stride(1), br.stride(0)))


def linear_token_kl_fwd(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias,
                        direction: str, ignore_index: int, softcap: float | None):
    """(kl, logp, ref_logp) float32 [N], 0 where ignored, and the backward's statistics
    stats [5, N] = (m_p, log S_p, m_q, log S_q, KL). Inputs may be strided views. Under
    ``TISDPO_HEAD_LOGITS=gemm``, chunk by chunk of the dz budget (both heads' logits within
    it): the two heads' logits by GEMMs, then the same kernel reading them."""
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    kl, logp, rlogp = (torch.zeros(N, **f32) for _ in range(3))
    stats = torch.zeros(5, N, **f32)
    if N == 0:
        return kl, logp, rlogp, stats
    rows, count = compact_rows(targets != ignore_index)
    gemm = _env.head_logits() == "gemm"
    flags = _common_flags(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, direction,
                          softcap, gemm)
    heads = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    outs = (kl, logp, rlogp, stats)
    with device_guard(hidden):
        if not gemm:
            _fwd_rows(heads, targets, rows, count, outs, softcap, flags)
            return kl, logp, rlogp, stats
        for sl, kept, (z, r) in logit_chunks(rows, count,
                                             [(hidden, weight), (ref_hidden, ref_weight)]):
            _fwd_rows(heads, targets, sl, kept, outs, softcap, flags, z, r)
    return kl, logp, rlogp, stats


def _fwd_rows(heads, targets, rows, count, outs, softcap, flags, z=None, r=None):
    """The forward kernel (and the split combine) over the slots of ``rows`` (``count`` [1]
    of them kept), writing outs = (kl, logp, ref_logp, stats) at the rows' ids; ``z``, ``r``
    [slots, V]: the two heads' logits (Z_GIVEN) or None."""
    hidden, weight, ref_hidden, ref_weight = heads[0], heads[1], heads[3], heads[4]
    kl, logp, rlogp, stats = outs
    n, D = rows.shape[0], hidden.shape[1]
    V, DR = weight.shape[0], ref_weight.shape[1]
    name = "linear_token_kl_fwd_z" if flags["Z_GIVEN"] else "linear_token_kl_fwd"
    cfg = configs.get(name, hidden)
    splits = num_splits(cfg, hidden, n, V)   # with autotuning: from the default blocks
    final = splits == 1
    f32 = dict(dtype=torch.float32, device=hidden.device)
    part = torch.empty((5, splits, n) if not final else (1,), **f32)
    tlogit = torch.empty((2, n) if not final else (1,), **f32)
    ptrs, strides = _head_args(*heads)
    z = z if z is not None else hidden
    r = r if r is not None else ref_hidden
    args = (*ptrs, targets, rows, count, part, tlogit, kl, logp, rlogp, stats, z, r,
            n, V, D, DR, splits, *strides, targets.stride(0), stats.stride(0), z.stride(0),
            r.stride(0), float(softcap or 1.0))
    launch(name, linear_token_kl_fwd_kernel,
           lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,), hidden, args,
           dict(flags, FINAL=final), autotune_key=_AUTOTUNE_KEY, descriptors=_DESCRIPTORS)
    if not final:
        cc = configs.get("linear_token_kl_fwd_combine", hidden)
        check_blocks("linear_token_kl_fwd_combine", **cc.meta)
        linear_token_kl_fwd_combine_kernel[(triton.cdiv(n, cc.meta["BLOCK_N"]),)](
            part, tlogit, rows, count, kl, logp, rlogp, stats, n, splits, stats.stride(0),
            POLICY_REF=flags["POLICY_REF"], **cc.meta, **cc.launch_kwargs(hidden))


def linear_token_kl_bwd(g_kl, g_logp, hidden, weight, ref_hidden, ref_weight, targets, bias,
                        ref_bias, stats, direction: str, ignore_index: int,
                        softcap: float | None, need_dh: bool, need_dw: bool, need_db: bool):
    """(d_hidden, d_weight, d_bias) in the policy inputs' dtypes, each None unless requested.

    g_kl, g_logp: [N] upstream gradients (any values; may be strided or expanded); stats: the
    forward's [5, N]. dz slabs, then GEMMs (``slab_backward``). Under
    ``TISDPO_HEAD_LOGITS=gemm`` GEMMs first write each chunk's logits of both heads (the
    policy's into the dz slab, which the kernel overwrites with dz; the reference's into a
    second slab, the two within the dz budget).
    """
    N, D = hidden.shape
    DR = ref_weight.shape[1]
    need_db = need_db and bias is not None
    keep = (targets != ignore_index) & ((g_kl != 0) | (g_logp != 0))
    rows, count = compact_rows(keep)
    gemm = _env.head_logits() == "gemm"
    name = "linear_token_kl_bwd_z" if gemm else "linear_token_kl_bwd"
    flags = _common_flags(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, direction,
                          softcap, gemm)
    dtr = dz_dtype(ref_hidden)
    rbuf = []                          # the reference logits' slab, made on first use

    autotuning = gemm and configs.autotuning(hidden)

    def write_dz(dz, lo, _pmax, v0, hs):  # (no gradient filtering for the KL head)
        C, W = dz.shape      # slots lo..lo+C, columns v0..v0+W: a band is the heads' slices
        w, bb, wr, br, t = column_band(v0, W, targets, weight, bias, ref_weight, ref_bias)
        ptrs, strides = _head_args(hidden, w, bb, ref_hidden, wr, br)
        z, r = hidden, ref_hidden
        if gemm:     # in place, except under autotuning (its trials would read dz as z)
            z = dz if not autotuning else torch.empty_like(dz)
            if not rbuf:             # the first slab is the largest
                rbuf.append(dz_slab(C, W, dtr, dz.device))
            gemm_logits(hs[0], w, z)
            r = gemm_logits(hs[1], wr, rbuf[0][:C, :W])
        args = (*ptrs, t, rows, count, stats, g_kl, g_logp, z, r, dz, lo, C, N, W, D,
                DR, *strides, t.stride(0), g_kl.stride(0), g_logp.stride(0),
                z.stride(0), r.stride(0), dz.stride(0), float(softcap or 1.0))
        launch(name, linear_token_kl_bwd_kernel,
               lambda meta: (triton.cdiv(C, meta["BLOCK_N"]) * triton.cdiv(W, meta["BLOCK_V"]),),
               hidden, args, flags, autotune_key=_AUTOTUNE_KEY, descriptors=_BWD_DESCRIPTORS)

    # the reference logits' slab, and z's own under autotuning, share the budget
    extra = (torch.finfo(dtr).bits // 8 if gemm else 0) + (
        torch.finfo(dz_dtype(hidden)).bits // 8 if autotuning else 0)
    with device_guard(hidden):
        return slab_backward(write_dz, hidden, weight, bias, rows, count, need_dh, need_dw,
                             need_db, extra_itemsize=extra,
                             logit_hidden=(hidden, ref_hidden) if gemm else ())


# --------------------------------------------------------------------------------------------
# autograd (registered on torch.library custom ops so torch.compile sees one opaque node)
# --------------------------------------------------------------------------------------------


class LinearTokenKLFunction:
    """The autograd formula of ``tisdpo::linear_token_kl_fwd`` (``register_autograd``).
    Gradients flow from kl and logp into the policy hidden, weight and bias only; ref_logp
    and the statistics are non-differentiable. Only inputs that need a gradient get work."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        (hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, direction,
         ignore_index, softcap) = inputs
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias,
                              output[3])
        ctx.direction, ctx.ignore_index, ctx.softcap = direction, ignore_index, softcap
        ctx.mark_non_differentiable(output[2], output[3])

    @staticmethod
    @first_order("linear_token_kl")
    def backward(ctx, g_kl, g_logp, _g_ref_logp, _g_stats):
        hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, stats = \
            ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]
        need_db = ctx.needs_input_grad[5] and bias is not None
        nones = (None,) * 10
        if not (need_dh or need_dw or need_db) or (g_kl is None and g_logp is None):
            return nones
        zeros = stats[0].new_zeros(()).expand(stats.shape[1])
        g_kl = zeros if g_kl is None else g_kl
        g_logp = zeros if g_logp is None else g_logp
        dh, dw, db = _ops()[1](g_kl, g_logp, hidden, weight, ref_hidden, ref_weight, targets,
                               bias, ref_bias, stats, ctx.direction, ctx.ignore_index,
                               ctx.softcap, need_dh, need_dw, need_db)
        return (dh if need_dh else None, dw if need_dw else None, None, None, None,
                db if need_db else None, None, None, None, None)


_OPS: tuple = ()


def _ops():
    """The custom ops (forward op, backward op), registered on first use, never at import."""
    global _OPS
    if not _OPS:
        _OPS = _register_ops()
    return _OPS


def _register_ops():
    @torch.library.custom_op("tisdpo::linear_token_kl_fwd", mutates_args=())
    def fwd_op(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor,
               targets: Tensor, bias: Optional[Tensor], ref_bias: Optional[Tensor],
               direction: str, ignore_index: int, softcap: Optional[float]
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return linear_token_kl_fwd(hidden, weight, ref_hidden, ref_weight, targets, bias,
                                   ref_bias, direction, ignore_index, softcap)

    @fwd_op.register_fake
    def _(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, direction,
          ignore_index, softcap):
        n = hidden.shape[0]
        return (*(hidden.new_empty(n, dtype=torch.float32) for _ in range(3)),
                hidden.new_empty(5, n, dtype=torch.float32))

    @torch.library.custom_op("tisdpo::linear_token_kl_bwd", mutates_args=())
    def bwd_op(g_kl: Tensor, g_logp: Tensor, hidden: Tensor, weight: Tensor,
               ref_hidden: Tensor, ref_weight: Tensor, targets: Tensor, bias: Optional[Tensor],
               ref_bias: Optional[Tensor], stats: Tensor, direction: str, ignore_index: int,
               softcap: Optional[float], need_dh: bool, need_dw: bool, need_db: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
        dh, dw, db = linear_token_kl_bwd(g_kl, g_logp, hidden, weight, ref_hidden, ref_weight,
                                         targets, bias, ref_bias, stats, direction,
                                         ignore_index, softcap, need_dh, need_dw, need_db)
        empty = hidden.new_empty(0)   # custom ops cannot return None: unrequested = empty
        return (empty if dh is None else dh, empty.clone() if dw is None else dw,
                empty.clone() if db is None else db)

    @bwd_op.register_fake
    def _(g_kl, g_logp, hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, stats,
          direction, ignore_index, softcap, need_dh, need_dw, need_db):
        return (torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
                torch.empty_like(weight) if need_dw else hidden.new_empty(0),
                torch.empty_like(bias) if need_db and bias is not None else hidden.new_empty(0))

    fwd_op.register_autograd(LinearTokenKLFunction.backward,
                             setup_context=LinearTokenKLFunction.setup_context)
    return fwd_op, bwd_op


# --------------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------------


def linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, opts):
    """Backend entry (see ``tisdpo_kernels.ops``): hidden [N, D], weight [V, D], ref_hidden
    [N, D'], ref_weight [V, D'], targets [N] int64, biases [V] or None, opts: ``KLOptions``
    -> (kl, logp, ref_logp), float32 [N], 0 where ignored; differentiable (from kl and logp)
    in hidden, weight and bias; the reference head is a constant."""
    for name, t in (("hidden", hidden), ("weight", weight), ("ref_hidden", ref_hidden),
                    ("ref_weight", ref_weight), ("bias", bias), ("ref_bias", ref_bias)):
        if t is not None:
            check_dtype("linear_token_kl", name, t)
    if weight.shape[0] == 0:
        raise ValueError("linear_token_kl: weight has V=0 rows; the vocabulary must be non-empty")
    kl, logp, ref_logp, _ = _ops()[0](
        hidden, weight, ref_hidden.detach(), ref_weight.detach(), targets, bias,
        None if ref_bias is None else ref_bias.detach(), opts.direction, opts.ignore_index,
        opts.softcap)
    return kl, logp, ref_logp
