"""Fused full-vocabulary per-token KL between a policy head and a reference head, in Triton.

Per token t, with policy logits z = softcap(W h_t + b) and reference logits
r = softcap(W' h'_t + b') (D' may differ from D), p = softmax(z), q = softmax(r):

    policy_ref:  KL_t = Σ_v p_v (log p_v − log q_v)        (TIS-DPO's η)
    ref_policy:  KL_t = Σ_v q_v (log q_v − log p_v)        (TDPO)
    logp_t = z[y_t] − lse(z),   ref_logp_t = r[y_t] − lse(r)

Forward: one sweep over vocabulary tiles; each tile forms both heads' logits (two ``tl.dot``
loops, over D and D') and folds them into fp32 online statistics: running maxima m_p, m_q,
sums S_p = Σ e^{z−m_p}, S_q = Σ e^{r−m_q}, the target logits, and the KL accumulator of the
weighting side w (p for policy_ref, q for ref_policy) against the other side o:

    A = Σ_v e^{x_w,v − m_w} ((x_w,v − m_w) − (x_o,v − m_o)),   KL = A / S_w − log S_w + log S_o

A is kept relative to the *current* maxima, so when they move it is rescaled and shifted:
A ← e^{m_w − m_w'} (A + S_w ((m_w − m_w') − (m_o − m_o'))). Every term is a product of a
finite shifted log-ratio and e^{≤0}: an underflowing probability contributes 0, never
0·log 0, and the log-ratio is centred so no large logits cancel. The vocabulary may be split
across programs (more parallelism at small N); the partial statistics of the splits combine
with the same rule in O(splits·N) torch ops. Saved for backward: m_p, log S_p, m_q,
log S_q and KL (fp32 [5, N]); log p = (z − m_p) − log S_p as eager log_softmax forms it.

Backward: one kernel over (token block × vocab block) tiles recomputes both logit tiles,
forms the per-logit gradient

    dz_v = g_logp (1[v = y] − p_v) + g_kl G_v,
    G_v = p_v (log p_v − log q_v − KL_t)   (policy_ref)      G_v = p_v − q_v   (ref_policy)

times the softcap derivative 1 − tanh², and pushes it into fp32 d_hidden, d_weight and d_bias
with atomic adds (CCE's scheme). Why atomics: the tile's logits are recomputed once
(2N(D+D')V flops) and feed both gradient GEMMs (4NDV); the deterministic alternative (a
token-parallel kernel for d_hidden plus a vocab-parallel kernel for d_weight) must recompute
both heads twice, 12NDV instead of 8NDV at D' = D. The price is run-to-run variation in the
last bits of the fp32 sums. Tiles whose tokens all have zero upstream gradient (ignored
prompt tokens) are skipped; only inputs that need a gradient get GEMMs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tisdpo_kernels.config import KLOptions

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_NEG_INIT = -1.0e30  # finite running-max start: keeps (m − m') finite on the first tile


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _tanh(x):
    """tanh in fp32, accurate near 0 (Cephes tanhf polynomial below |x| < 0.625)."""
    ax = tl.abs(x)
    x2 = x * x
    small = ((((-5.70498872745e-3 * x2 + 2.06390887954e-2) * x2 - 5.37397155531e-2) * x2
              + 1.33314422036e-1) * x2 - 3.33332819422e-1) * x2 * x + x
    big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.625, small, big)


@triton.jit
def _dot_tile(X, Wt, rows, cols, row_mask, col_mask, K, stride_xn, stride_xd, stride_wv,
              stride_wd, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """X[rows] @ Wt[cols].T over K in BLOCK_D chunks, fp32 accumulation: [BLOCK_N, BLOCK_V]."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xn
    w_rows = Wt + cols.to(tl.int64)[:, None] * stride_wv
    for k0 in range(0, K, BLOCK_D):
        d = k0 + offs_d
        d_mask = d < K
        x = tl.load(x_rows + d[None, :] * stride_xd, mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0)
        w = tl.load(w_rows + d[None, :] * stride_wd, mask=col_mask[:, None] & d_mask[None, :],
                    other=0.0)
        if UPCAST:  # the interpreter computes bf16 on raw bits: go through fp32 there only
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _head_logits(X, Wt, Bp, rows, cols, row_mask, col_mask, K, softcap, stride_xn, stride_xd,
                 stride_wv, stride_wd, stride_b, HAS_B: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(softcap(X W^T + b) tile, tanh tile or None): fp32 logits of one head for one tile."""
    z = _dot_tile(X, Wt, rows, cols, row_mask, col_mask, K, stride_xn, stride_xd, stride_wv,
                  stride_wd, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION)
    if HAS_B:
        b = tl.load(Bp + cols * stride_b, mask=col_mask, other=0.0).to(tl.float32)
        z = z + b[None, :]
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    else:
        t = z
    return z, t


@triton.jit
def linear_token_kl_fwd_kernel(
    H, W, B, HR, WR, BR, Y, PART,
    N, V, D, DR, ignore_index, softcap, tiles_per_split, num_splits,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
    stride_hrn, stride_hrd, stride_wrv, stride_wrd, stride_br,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    POLICY_REF: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial online statistics of one token block over one vocabulary split.

    Writes PART[k, split, row] for k = m_p, S_p, m_q, S_q, A, z[y], r[y] (see module doc).
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(Y + rows, mask=row_mask, other=ignore_index)

    m_p = tl.full((BLOCK_N,), _NEG_INIT, tl.float32)
    m_q = tl.full((BLOCK_N,), _NEG_INIT, tl.float32)
    s_p = tl.zeros((BLOCK_N,), tl.float32)
    s_q = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    zt_p = tl.zeros((BLOCK_N,), tl.float32)
    zt_q = tl.zeros((BLOCK_N,), tl.float32)

    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for t in range(t_begin, t_end):
        cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z, _ = _head_logits(H, W, B, rows, cols, row_mask, col_mask, D, softcap, stride_hn,
                            stride_hd, stride_wv, stride_wd, stride_b, HAS_BIAS, HAS_SOFTCAP,
                            BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION)
        r, _ = _head_logits(HR, WR, BR, rows, cols, row_mask, col_mask, DR, softcap,
                            stride_hrn, stride_hrd, stride_wrv, stride_wrd, stride_br,
                            HAS_REF_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
                            DOT_PRECISION)
        is_t = cols[None, :] == y[:, None]
        zt_p += tl.sum(tl.where(is_t, z, 0.0), 1)
        zt_q += tl.sum(tl.where(is_t, r, 0.0), 1)
        # padded vocabulary columns (finite logits from zero-filled loads) leave every max
        # and sum; masked after the softcap, which would map −inf to −softcap
        mp_new = tl.maximum(m_p, tl.max(tl.where(col_mask[None, :], z, float("-inf")), 1))
        mq_new = tl.maximum(m_q, tl.max(tl.where(col_mask[None, :], r, float("-inf")), 1))
        a_p = tl.exp(m_p - mp_new)
        a_q = tl.exp(m_q - mq_new)
        e_p = tl.where(col_mask[None, :], tl.exp(z - mp_new[:, None]), 0.0)
        e_q = tl.where(col_mask[None, :], tl.exp(r - mq_new[:, None]), 0.0)
        # shifted log-ratio (policy side minus reference side): finite everywhere
        lr = (z - mp_new[:, None]) - (r - mq_new[:, None])
        if POLICY_REF:
            acc = a_p * (acc + s_p * ((m_p - mp_new) - (m_q - mq_new))) + tl.sum(e_p * lr, 1)
        else:
            acc = a_q * (acc + s_q * ((m_q - mq_new) - (m_p - mp_new))) - tl.sum(e_q * lr, 1)
        s_p = s_p * a_p + tl.sum(e_p, 1)
        s_q = s_q * a_q + tl.sum(e_q, 1)
        m_p = mp_new
        m_q = mq_new

    stride_k = num_splits * N
    out = PART + split * N + rows
    tl.store(out, m_p, mask=row_mask)
    tl.store(out + stride_k, s_p, mask=row_mask)
    tl.store(out + 2 * stride_k, m_q, mask=row_mask)
    tl.store(out + 3 * stride_k, s_q, mask=row_mask)
    tl.store(out + 4 * stride_k, acc, mask=row_mask)
    tl.store(out + 5 * stride_k, zt_p, mask=row_mask)
    tl.store(out + 6 * stride_k, zt_q, mask=row_mask)


@triton.jit
def linear_token_kl_bwd_kernel(
    H, W, B, HR, WR, BR, Y, G_KL, G_LOGP, STATS, DH, DW, DB,
    N, V, D, DR, ignore_index, softcap,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
    stride_hrn, stride_hrd, stride_wrv, stride_wrd, stride_br,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    POLICY_REF: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """One (token block, vocab block) tile: recompute, dz, atomic dH/dW/db in fp32.

    STATS [5, N] = (m_p, log S_p, m_q, log S_q, KL) from the forward.
    """
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N, BLOCK_N)
    blocks_v = tl.cdiv(V, BLOCK_V)
    # grouped order: GROUP_N token blocks walk the vocabulary together (weight tiles in L2)
    per_group = GROUP_N * blocks_v
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(blocks_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    y = tl.load(Y + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (y != ignore_index)
    g_kl = tl.where(valid, tl.load(G_KL + rows, mask=row_mask, other=0.0), 0.0)
    g_lp = tl.where(valid, tl.load(G_LOGP + rows, mask=row_mask, other=0.0), 0.0)
    active = (g_kl != 0.0) | (g_lp != 0.0)
    if tl.sum(active.to(tl.int32), 0) > 0:
        m_p = tl.load(STATS + rows, mask=row_mask, other=0.0)
        ls_p = tl.load(STATS + N + rows, mask=row_mask, other=0.0)
        z, t = _head_logits(H, W, B, rows, cols, row_mask, col_mask, D, softcap, stride_hn,
                            stride_hd, stride_wv, stride_wd, stride_b, HAS_BIAS, HAS_SOFTCAP,
                            BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION)
        r, _ = _head_logits(HR, WR, BR, rows, cols, row_mask, col_mask, DR, softcap,
                            stride_hrn, stride_hrd, stride_wrv, stride_wrd, stride_br,
                            HAS_REF_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
                            DOT_PRECISION)
        m_q = tl.load(STATS + 2 * N + rows, mask=row_mask, other=0.0)
        ls_q = tl.load(STATS + 3 * N + rows, mask=row_mask, other=0.0)
        log_p = (z - m_p[:, None]) - ls_p[:, None]
        log_q = (r - m_q[:, None]) - ls_q[:, None]
        p = tl.exp(log_p)
        if POLICY_REF:
            kl = tl.load(STATS + 4 * N + rows, mask=row_mask, other=0.0)
            gv = p * (log_p - log_q - kl[:, None])
        else:
            gv = p - tl.exp(log_q)
        onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        dz = g_lp[:, None] * (onehot - p) + g_kl[:, None] * gv
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)
        dz = tl.where(active[:, None] & col_mask[None, :], dz, 0.0)

        if COMPUTE_DB:
            tl.atomic_add(DB + cols, tl.sum(dz, 0), mask=col_mask, sem="relaxed")
        if COMPUTE_DH or COMPUTE_DW:
            offs_d = tl.arange(0, BLOCK_D)
            rows64 = rows.to(tl.int64)
            cols64 = cols.to(tl.int64)
            for k0 in range(0, D, BLOCK_D):
                d = k0 + offs_d
                d_mask = d < D
                if COMPUTE_DH:
                    w = tl.load(W + cols64[:, None] * stride_wv + d[None, :] * stride_wd,
                                mask=col_mask[:, None] & d_mask[None, :], other=0.0)
                    if UPCAST:
                        w = w.to(tl.float32)
                    dh = tl.dot(dz.to(w.dtype), w, input_precision=DOT_PRECISION)
                    tl.atomic_add(DH + rows64[:, None] * D + d[None, :], dh,
                                  mask=row_mask[:, None] & d_mask[None, :], sem="relaxed")
                if COMPUTE_DW:
                    h = tl.load(H + rows64[:, None] * stride_hn + d[None, :] * stride_hd,
                                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                    if UPCAST:
                        h = h.to(tl.float32)
                    dw = tl.dot(tl.trans(dz.to(h.dtype)), h, input_precision=DOT_PRECISION)
                    tl.atomic_add(DW + cols64[:, None] * D + d[None, :], dw,
                                  mask=col_mask[:, None] & d_mask[None, :], sem="relaxed")


# ----------------------------------------------------------------------------- launchers

def _interpreting(t: torch.Tensor) -> bool:
    """Kernels on a non-CUDA tensor run in Triton's interpreter (resolve_impl allows nothing
    else), where bf16/fp16 tiles must be upcast after loading."""
    return t.device.type != "cuda"


def _dot_precision(*tensors: torch.Tensor) -> str:
    """fp32 dots follow torch's matmul precision (eager fp32 is IEEE unless tf32 is allowed)."""
    if any(t.dtype == torch.float32 for t in tensors) and \
            torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _check_blocks(cfg: dict, *names: str) -> None:
    for name in names:
        b = cfg[name]
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}={b}: Triton blocks must be powers of two >= 16")


def _check_dtypes(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in _SUPPORTED:
            raise ValueError(f"impl='triton' linear_token_kl: {name} has dtype {t.dtype}; "
                             f"supported are float32, bfloat16, float16 (use impl='torch' or "
                             f"'reference' for float64)")


# Untuned starting points (no GPU was available to tune them); the interpreter gets large
# blocks because it costs per program × tile, not per flop.
_CONFIGS = {
    ("fwd", "cuda"): dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3,
                          waves=2),
    ("bwd", "cuda"): dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3,
                          GROUP_N=8),
    ("fwd", "interpret"): dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64),
    ("bwd", "interpret"): dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64),
}


def _config(kind: str, device: torch.device) -> dict:
    return _CONFIGS[(kind, "cuda" if device.type == "cuda" else "interpret")]


def _num_splits(cfg: dict, blocks_n: int, tiles: int, device: torch.device) -> int:
    """Vocabulary splits per token block: enough programs for ~``waves`` waves on the GPU."""
    want = cfg.get("num_splits")
    if want is None:
        if device.type != "cuda":
            return 1
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = -(-cfg.get("waves", 2) * sms // blocks_n)
    want = max(1, min(int(want), tiles))
    per = -(-tiles // want)
    return -(-tiles // per)


def _bias_args(bias, fallback):
    return (fallback, 0, False) if bias is None else (bias, bias.stride(0), True)


def _combine(part: torch.Tensor, policy_ref: bool):
    """Merge the splits' partial statistics into stats [5, N] fp32 = (m_p, log S_p, m_q,
    log S_q, KL) and the target logits z[y], r[y]. The maxima and log-sums stay apart so that
    log p = (z − m) − log S is formed as eager log_softmax forms it: no lse of magnitude |z|
    rounded to fp32 (a per-row error that sums coherently into d_weight)."""
    m_p, s_p, m_q, s_q, acc, zt_p, zt_q = part.unbind(0)
    mp, mq = m_p.amax(0), m_q.amax(0)
    a_p, a_q = torch.exp(m_p - mp), torch.exp(m_q - mq)
    sp, sq = (s_p * a_p).sum(0), (s_q * a_q).sum(0)
    if policy_ref:
        a = (a_p * (acc + s_p * ((m_p - mp) - (m_q - mq)))).sum(0)
        kl = a / sp - torch.log(sp) + torch.log(sq)
    else:
        a = (a_q * (acc + s_q * ((m_q - mq) - (m_p - mp)))).sum(0)
        kl = a / sq - torch.log(sq) + torch.log(sp)
    return torch.stack((mp, torch.log(sp), mq, torch.log(sq), kl)), zt_p.sum(0), zt_q.sum(0)


def linear_token_kl_fwd(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias,
                        opts: KLOptions, cfg: dict | None = None):
    """Forward launch. Returns (kl, logp, ref_logp), fp32 [N], 0 where ignored, and the
    statistics the backward needs, fp32 [5, N] (see ``_combine``)."""
    _check_dtypes(hidden=hidden, weight=weight, ref_hidden=ref_hidden, ref_weight=ref_weight,
                  bias=bias, ref_bias=ref_bias)
    n, d = hidden.shape
    v, dr = weight.shape[0], ref_weight.shape[1]
    if v < 1:
        raise ValueError(f"weight must have at least one vocabulary row, got V={v}")
    cfg = dict(_config("fwd", hidden.device) if cfg is None else cfg)
    _check_blocks(cfg, "BLOCK_N", "BLOCK_V", "BLOCK_D")
    dev = hidden.device
    valid = targets != opts.ignore_index
    if n == 0:
        e = torch.zeros(0, dtype=torch.float32, device=dev)
        return (e, e.clone(), e.clone()), torch.zeros((5, 0), dtype=torch.float32, device=dev)
    blocks_n = triton.cdiv(n, cfg["BLOCK_N"])
    tiles = triton.cdiv(v, cfg["BLOCK_V"])
    splits = _num_splits(cfg, blocks_n, tiles, dev)
    part = torch.empty((7, splits, n), dtype=torch.float32, device=dev)
    b, sb, has_b = _bias_args(bias, weight)
    br, sbr, has_br = _bias_args(ref_bias, ref_weight)
    linear_token_kl_fwd_kernel[(blocks_n, splits)](
        hidden, weight, b, ref_hidden, ref_weight, br, targets, part,
        n, v, d, dr, opts.ignore_index, float(opts.softcap or 0.0), -(-tiles // splits), splits,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), sb,
        ref_hidden.stride(0), ref_hidden.stride(1), ref_weight.stride(0), ref_weight.stride(1),
        sbr,
        HAS_BIAS=has_b, HAS_REF_BIAS=has_br, HAS_SOFTCAP=opts.softcap is not None,
        POLICY_REF=opts.direction == "policy_ref", UPCAST=_interpreting(hidden),
        DOT_PRECISION=_dot_precision(hidden, ref_hidden),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    stats, zt_p, zt_q = _combine(part, opts.direction == "policy_ref")
    m_p, ls_p, m_q, ls_q, kl = stats.unbind(0)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    outs = (torch.where(valid, kl, zero), torch.where(valid, (zt_p - m_p) - ls_p, zero),
            torch.where(valid, (zt_q - m_q) - ls_q, zero))
    return outs, stats


def linear_token_kl_bwd(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias,
                        stats, g_kl, g_logp, opts: KLOptions,
                        needs=(True, True, True), cfg: dict | None = None):
    """Backward launch: (d_hidden, d_weight, d_bias), None where not in ``needs``."""
    need_dh, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    n, d = hidden.shape
    v, dr = weight.shape[0], ref_weight.shape[1]
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    dh = torch.zeros((n, d), **f32) if need_dh else None
    dw = torch.zeros((v, d), **f32) if need_dw else None
    db = torch.zeros((v,), **f32) if need_db else None
    if n > 0 and (need_dh or need_dw or need_db):
        cfg = dict(_config("bwd", dev) if cfg is None else cfg)
        _check_blocks(cfg, "BLOCK_N", "BLOCK_V", "BLOCK_D")
        zeros = None
        if g_kl is None or g_logp is None:
            zeros = torch.zeros(n, **f32)
        g_kl = zeros if g_kl is None else g_kl.float().contiguous()
        g_logp = zeros if g_logp is None else g_logp.float().contiguous()
        b, sb, has_b = _bias_args(bias, weight)
        br, sbr, has_br = _bias_args(ref_bias, ref_weight)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(v, cfg["BLOCK_V"]),)
        linear_token_kl_bwd_kernel[grid](
            hidden, weight, b, ref_hidden, ref_weight, br, targets, g_kl, g_logp,
            stats, stats if dh is None else dh, stats if dw is None else dw,
            stats if db is None else db,
            n, v, d, dr, opts.ignore_index, float(opts.softcap or 0.0),
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), sb,
            ref_hidden.stride(0), ref_hidden.stride(1), ref_weight.stride(0),
            ref_weight.stride(1), sbr,
            HAS_BIAS=has_b, HAS_REF_BIAS=has_br, HAS_SOFTCAP=opts.softcap is not None,
            POLICY_REF=opts.direction == "policy_ref", COMPUTE_DH=need_dh,
            COMPUTE_DW=need_dw, COMPUTE_DB=need_db, UPCAST=_interpreting(hidden),
            DOT_PRECISION=_dot_precision(hidden, ref_hidden),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
            GROUP_N=cfg.get("GROUP_N", 8),
            num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
        )
    return (None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


# ----------------------------------------------------------------------------- autograd

class LinearTokenKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias,
                opts: KLOptions):
        (kl, logp, ref_logp), stats = linear_token_kl_fwd(
            hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, opts)
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias,
                              stats)
        ctx.opts = opts
        ctx.mark_non_differentiable(ref_logp)
        ctx.set_materialize_grads(False)
        return kl, logp, ref_logp

    @staticmethod
    def backward(ctx, g_kl, g_logp, _g_ref_logp):
        (hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias,
         stats) = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[5])
        if (g_kl is None and g_logp is None) or not any(needs):
            return (None,) * 8
        dh, dw, db = linear_token_kl_bwd(
            hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, stats,
            g_kl, g_logp, ctx.opts, needs)
        return dh, dw, None, None, None, db, None, None


# ----------------------------------------------------------------------------- public

def linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias,
                    opts: KLOptions):
    """Backend entry (contract in ops.py): hidden [N, D], weight [V, D], ref_hidden [N, D'],
    ref_weight [V, D'], targets [N] int64, optional biases [V]. Returns (kl, logp, ref_logp),
    fp32 [N], 0 where ignored; differentiable in hidden, weight and bias (from kl and logp)."""
    return LinearTokenKLFunction.apply(hidden, weight, ref_hidden.detach(), ref_weight.detach(),
                                       targets, bias,
                                       None if ref_bias is None else ref_bias.detach(), opts)
