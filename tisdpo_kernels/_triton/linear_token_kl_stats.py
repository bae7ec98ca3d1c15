"""The KL head's running statistics (linear_token_kl.py): one tile of both heads' logits
folded in, vocabulary splits merged, the per-token outputs stored.

Per token: the maxima m_p, m_q, the sums S_p = Σ e^{z−m_p}, S_q = Σ e^{r−m_q} and the KL
accumulator A of the weighting side w against the other side o, kept relative to the current
maxima (linear_token_kl.py's docstring has the update rule). All fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from tisdpo_kernels._triton.common import mask_cols

__all__ = ["M0", "kl_online_step", "kl_store", "linear_token_kl_fwd_combine_kernel"]

# finite running-max start: (m − m') stays finite on a split's first tile (a jit global must
# be a tl.constexpr instance; the interpreter does not check, the compiler does)
M0 = tl.constexpr(-1.0e30)


@triton.jit
def kl_online_step(m_p, s_p, m_q, s_q, acc, z, r, col_mask, POLICY_REF: tl.constexpr):
    """Fold one tile of policy logits z and reference logits r [BN, BV] into the statistics."""
    mp_new = tl.maximum(m_p, tl.max(mask_cols(z, col_mask), axis=1))
    mq_new = tl.maximum(m_q, tl.max(mask_cols(r, col_mask), axis=1))
    a_p = tl.exp(m_p - mp_new)
    a_q = tl.exp(m_q - mq_new)
    e_p = tl.where(col_mask[None, :], tl.exp(z - mp_new[:, None]), 0.0)
    e_q = tl.where(col_mask[None, :], tl.exp(r - mq_new[:, None]), 0.0)
    lr = (z - mp_new[:, None]) - (r - mq_new[:, None])     # centred log-ratio, finite
    if POLICY_REF:
        acc = a_p * (acc + s_p * ((m_p - mp_new) - (m_q - mq_new))) + tl.sum(e_p * lr, axis=1)
    else:
        acc = a_q * (acc + s_q * ((m_q - mq_new) - (m_p - mp_new))) - tl.sum(e_q * lr, axis=1)
    return mp_new, s_p * a_p + tl.sum(e_p, axis=1), mq_new, s_q * a_q + tl.sum(e_q, axis=1), acc


@triton.jit
def kl_store(rows, mask, m_p, s_p, m_q, s_q, acc, zt, rt, kl_ptr, logp_ptr, rlogp_ptr,
             stats_ptr, stride_s, POLICY_REF: tl.constexpr):
    """Final per-token outputs and the backward's statistics stats [5, stride_s], at the
    tokens' own rows."""
    ls_p = tl.log(tl.maximum(s_p, 1e-30))    # s ≥ 1 for every stored row
    ls_q = tl.log(tl.maximum(s_q, 1e-30))
    if POLICY_REF:
        kl = acc / tl.maximum(s_p, 1e-30) - ls_p + ls_q
    else:
        kl = acc / tl.maximum(s_q, 1e-30) - ls_q + ls_p
    tl.store(kl_ptr + rows, kl, mask=mask)
    tl.store(logp_ptr + rows, (zt - m_p) - ls_p, mask=mask)
    tl.store(rlogp_ptr + rows, (rt - m_q) - ls_q, mask=mask)
    tl.store(stats_ptr + rows, m_p, mask=mask)
    tl.store(stats_ptr + stride_s + rows, ls_p, mask=mask)
    tl.store(stats_ptr + 2 * stride_s + rows, m_q, mask=mask)
    tl.store(stats_ptr + 3 * stride_s + rows, ls_q, mask=mask)
    tl.store(stats_ptr + 4 * stride_s + rows, kl, mask=mask)


@triton.jit
def linear_token_kl_fwd_combine_kernel(
        part_ptr, tlogit_ptr, rows_ptr, count_ptr, kl_ptr, logp_ptr, rlogp_ptr, stats_ptr,
        N, NUM_SPLITS, stride_s, POLICY_REF: tl.constexpr, BLOCK_N: tl.constexpr):
    """Merge the splits' statistics part [5, S, N] of N slots (empty splits hold m = −1e30,
    S = A = 0 and vanish)."""
    slots = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = slots < tl.load(count_ptr)
    step = NUM_SPLITS.to(tl.int64) * N
    m_p = tl.full((BLOCK_N,), M0, tl.float32)
    m_q = tl.full((BLOCK_N,), M0, tl.float32)
    ptrs = part_ptr + slots
    for _ in range(0, NUM_SPLITS):
        m_p = tl.maximum(m_p, tl.load(ptrs, mask=mask, other=M0))
        m_q = tl.maximum(m_q, tl.load(ptrs + 2 * step, mask=mask, other=M0))
        ptrs += N
    s_p = tl.zeros((BLOCK_N,), tl.float32)
    s_q = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    ptrs = part_ptr + slots
    for _ in range(0, NUM_SPLITS):
        mp_i = tl.load(ptrs, mask=mask, other=M0)
        sp_i = tl.load(ptrs + step, mask=mask, other=0.0)
        mq_i = tl.load(ptrs + 2 * step, mask=mask, other=M0)
        sq_i = tl.load(ptrs + 3 * step, mask=mask, other=0.0)
        a_i = tl.load(ptrs + 4 * step, mask=mask, other=0.0)
        w_p = tl.exp(mp_i - m_p)
        w_q = tl.exp(mq_i - m_q)
        shift = (mp_i - m_p) - (mq_i - m_q)
        if POLICY_REF:
            acc += w_p * (a_i + sp_i * shift)
        else:
            acc += w_q * (a_i - sq_i * shift)
        s_p += w_p * sp_i
        s_q += w_q * sq_i
        ptrs += N
    rows = tl.load(rows_ptr + slots, mask=mask, other=0)
    zt = tl.load(tlogit_ptr + slots, mask=mask, other=0.0)
    rt = tl.load(tlogit_ptr + N + slots, mask=mask, other=0.0)
    kl_store(rows, mask, m_p, s_p, m_q, s_q, acc, zt, rt, kl_ptr, logp_ptr, rlogp_ptr,
             stats_ptr, stride_s, POLICY_REF)
