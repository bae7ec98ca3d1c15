"""Triton backend of ``linear_preference_loss``: the one-sweep preference head with a fused
epilogue (docs/ONE_SWEEP.md).

The sweep over the pairs is backend-neutral (``tisdpo_kernels/_one_sweep.py``); this module
supplies its chunk step and GEMMs. A chunk holds as many rows as ``TISDPO_DZ_MB`` has room
for with its [C, V] buffers (``_chunk_rows``). Per chunk of C rows:

1. the logits z = h·Wᵀ (+ b) [C, V] by cuBLAS in the input dtype, as eager and the torch
   backend form them (the reference head's z_r too, when it is given);
2. ``linear_preference_loss_fwd_kernel``: one program per block of ROWS rows, looping over
   the vocabulary in BLOCK_V tiles. Each tile is loaded, upcast to fp32 and softcapped (the
   same fp32 formula in every pass, so every pass sees the same logits):

   - pass 1: online max / Σ exp of the policy (and reference) logits and the target gather:
     logp = (z_y − m) − log S, ref_logp likewise;
   - pass 2 (KL(π‖ref) only): KL = Σ p·(log p − log q), which e needs whole;
   - pass 3 (when a gradient is wanted, and for KL(ref‖π), whose sum e does not need):

         e = c·(onehot(y) − p) + κ'·G        (× 1 − tanh² under a softcap)
         G = p·(log p − log q − KL)  (policy_ref),     G = p − q  (ref_policy)

     written in the GEMM dtype (``dz_dtype``: the input dtype on a GPU, tensor-core operands;
     fp32 under the interpreter), in place over the policy logits when the dtypes agree.
     Rows with c = κ' = 0 (ignored tokens, zero weights) get e = 0 exactly. A chunk of a
     long pair knows its coefficients up front: one launch, all passes. A chunk of whole
     pairs needs the statistics before its coefficients (s_b comes from the pairs' z_b): a
     first launch runs passes 1–2 and saves each row's max, log Σ exp and KL ([5, C]
     float32); a second runs pass 3 alone from them, with the coefficients scaled by s_b;
3. the gradient GEMMs e·W (d_hidden rows) and eᵀ·h (the d_weight sum, or a long pair's
   [V, D] fp32 buffer), and Σ e (``_GEMMs``: cuBLAS).

Traffic over the [C, V] buffers per chunk, for element size b (2 for bf16), policy head only:
the GEMM writes z, pass 1 reads it, pass 3 reads it and writes e over it: 4·C·V·b, then the
two gradient GEMMs read e. A bias adds one read and write of z (eager's rounding of z + b); a
reference head adds its GEMM's write, a read in pass 1 and one in pass 3 with a KL term;
KL(π‖ref) adds pass 2. The torch backend's chunk runs about ten fp32 passes instead. No
atomics (each row's statistics belong to one program; the GEMMs are cuBLAS) and no host syncs
(the per-pair scalar stays on the device). float64 is rejected (use impl="torch" or
"reference").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tisdpo_kernels._common import accumulate_mm, sweep_rows
from tisdpo_kernels._one_sweep import SweepBackend, run_sweep
from tisdpo_kernels._triton import configs
from tisdpo_kernels._triton.common import (
    check_dtype, device_guard, gather_cols, launch, mask_cols, online_lse_step, softcap_fwd,
    softcap_grad,
)
from tisdpo_kernels._triton.slabs import dz_dtype
from tisdpo_kernels.config import PairHeadOptions

__all__ = ["linear_preference_loss", "linear_preference_loss_fwd", "chunk_itemsize"]

_KL_MODE = {None: 0, "policy_ref": 1, "ref_policy": 2}
# the autotuner's key: each launch kind (passes run, e written or not) is timed on its own
_AUTOTUNE_KEY = ("V", "HAS_SOFTCAP", "HAS_REF", "KL", "WRITE_E", "STATS")

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _logit_tile(z_ptr, rows, cols, row_mask, col_mask, stride_z, cap,
                HAS_SOFTCAP: tl.constexpr):
    """fp32 [ROWS, BLOCK_V] tile of softcap(z) from the chunk's biased logits z (0 outside the
    masks: finite, so mask columns before any reduction)."""
    x = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x = softcap_fwd(x, cap)
    return x


@triton.jit
def linear_preference_loss_fwd_kernel(
        z_ptr, zr_ptr, t_ptr, c_ptr, kg_ptr, e_ptr, logp_ptr, ref_logp_ptr, kl_ptr, st_ptr,
        C, V, stride_z, stride_zr, stride_e, cap,
        HAS_SOFTCAP: tl.constexpr, HAS_REF: tl.constexpr, KL: tl.constexpr,
        WRITE_E: tl.constexpr, STATS: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """The chunk epilogue of one block of rows: logp, ref_logp, KL and e (see the module
    docstring). KL: 0 none, 1 policy_ref, 2 ref_policy (both need HAS_REF). STATS: 0 none,
    1 also save each row's (m, log S, m_ref, log S_ref, KL) to st [5, C], 2 load them
    instead of passes 1–2 and write e only."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < C
    rows = rows.to(tl.int64)            # C·V may exceed 2^31 elements
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=0)
    if STATS == 2:                      # the statistics a first launch saved, bit for bit
        m = tl.load(st_ptr + rows, mask=row_mask, other=0.0)
        ls = tl.load(st_ptr + C + rows, mask=row_mask, other=0.0)
        mq = tl.load(st_ptr + 2 * C + rows, mask=row_mask, other=0.0)
        lsq = tl.load(st_ptr + 3 * C + rows, mask=row_mask, other=0.0)
        kl = tl.load(st_ptr + 4 * C + rows, mask=row_mask, other=0.0)
    else:
        # pass 1: online logsumexp of each head and the target logits
        m = tl.full((ROWS,), float("-inf"), tl.float32)
        s = tl.zeros((ROWS,), tl.float32)
        zt = tl.zeros((ROWS,), tl.float32)
        mq = tl.full((ROWS,), float("-inf"), tl.float32)
        sq = tl.zeros((ROWS,), tl.float32)
        qt = tl.zeros((ROWS,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            z = _logit_tile(z_ptr, rows, cols, row_mask, col_mask, stride_z, cap, HAS_SOFTCAP)
            zt += gather_cols(z, cols, tgt)
            m, s = online_lse_step(m, s, mask_cols(z, col_mask))
            if HAS_REF:
                zr = _logit_tile(zr_ptr, rows, cols, row_mask, col_mask, stride_zr, cap,
                                 HAS_SOFTCAP)
                qt += gather_cols(zr, cols, tgt)
                mq, sq = online_lse_step(mq, sq, mask_cols(zr, col_mask))
        ls = tl.log(s)                  # log p = (z − m) − ls, as log_softmax forms it
        lsq = tl.zeros((ROWS,), tl.float32)
        if HAS_REF:
            lsq = tl.log(sq)
        kl = tl.zeros((ROWS,), tl.float32)
        # pass 2, KL(π‖ref) = Σ p (log p − log q): e needs it whole
        if KL == 1:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                col_mask = cols < V
                z = _logit_tile(z_ptr, rows, cols, row_mask, col_mask, stride_z, cap,
                                HAS_SOFTCAP)
                zr = _logit_tile(zr_ptr, rows, cols, row_mask, col_mask, stride_zr, cap,
                                 HAS_SOFTCAP)
                lp = (z - m[:, None]) - ls[:, None]
                lq = (zr - mq[:, None]) - lsq[:, None]
                kl += tl.sum(tl.where(col_mask[None, :], tl.exp(lp) * (lp - lq), 0.0), axis=1)
        if STATS == 1:
            tl.store(st_ptr + rows, m, mask=row_mask)
            tl.store(st_ptr + C + rows, ls, mask=row_mask)
            tl.store(st_ptr + 2 * C + rows, mq, mask=row_mask)
            tl.store(st_ptr + 3 * C + rows, lsq, mask=row_mask)
            tl.store(st_ptr + 4 * C + rows, kl, mask=row_mask)
    # pass 3: e (and KL(ref‖π) = Σ q (log q − log p), which e does not need)
    if WRITE_E or (KL == 2 and STATS != 2):
        c = tl.load(c_ptr + rows, mask=row_mask, other=0.0)
        kg = tl.load(kg_ptr + rows, mask=row_mask, other=0.0)
        live = (c != 0.0) | (kg != 0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            z = _logit_tile(z_ptr, rows, cols, row_mask, col_mask, stride_z, cap,
                            HAS_SOFTCAP)
            lp = (z - m[:, None]) - ls[:, None]
            p = tl.exp(lp)
            if KL == 0:
                e = p * (-c)[:, None]                                      # − c·p
            else:
                zr = _logit_tile(zr_ptr, rows, cols, row_mask, col_mask, stride_zr, cap,
                                 HAS_SOFTCAP)
                lq = (zr - mq[:, None]) - lsq[:, None]
                if KL == 1:
                    e = ((lp - lq) - kl[:, None]) * p * kg[:, None]         # κ'·G
                else:
                    q = tl.exp(lq)
                    if STATS != 2:
                        kl += tl.sum(tl.where(col_mask[None, :], q * (lq - lp), 0.0), axis=1)
                    e = (p - q) * kg[:, None]                              # κ'·(p − q)
                e -= p * c[:, None]                                        # − c·p
            if WRITE_E:
                e += tl.where(cols[None, :] == tgt[:, None], c[:, None], 0.0)   # + c·onehot
                if HAS_SOFTCAP:
                    e *= softcap_grad(z, cap)
                e = tl.where(live[:, None], e, 0.0)
                tl.store(e_ptr + rows[:, None] * stride_e + cols[None, :],
                         e.to(e_ptr.dtype.element_ty),
                         mask=row_mask[:, None] & col_mask[None, :])
    if STATS != 2:
        tl.store(logp_ptr + rows, (zt - m) - ls, mask=row_mask)
        if HAS_REF:
            tl.store(ref_logp_ptr + rows, (qt - mq) - lsq, mask=row_mask)
        if KL != 0:
            tl.store(kl_ptr + rows, kl, mask=row_mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def linear_preference_loss_fwd(z, zr, safe, c, kg, e, softcap, kl: str | None, stats=None):
    """(logp [C], ref_logp [C] | None, kl [C] | None) float32 of one chunk, and e written.

    z [C, V]: the policy logits h·Wᵀ + b (any float dtype, rows contiguous, not yet
    softcapped), zr the reference head's or None; safe [C] int64 targets (0 where ignored);
    c, kg [C] float32 the coefficients of e, or None with e (the statistics only); e [C, V]
    (may be z itself) or None when no gradient is wanted. kl: None, "policy_ref" or
    "ref_policy" (needs zr). stats: a float32 [5, C] buffer of per-row statistics; a launch
    without e fills it, and a launch with e then reads it instead of recomputing them, writes
    e only and returns None.
    """
    C, V = z.shape
    dev = z.device
    mode = 0 if stats is None else 1 if e is None else 2
    assert z.stride(1) == 1 and (zr is None or zr.stride(1) == 1)
    assert e is None or e.stride(1) == 1
    assert stats is None or (stats.shape == (5, C) and stats.is_contiguous())

    def out(on: bool):
        return torch.empty(C, dtype=torch.float32, device=dev) if on and mode != 2 else None

    logp, ref_logp, kl_out = out(True), out(zr is not None), out(kl is not None)
    any_f32 = logp if logp is not None else stats     # for pointers the kernel never touches
    zr_ = zr if zr is not None else z
    e_ = e if e is not None else z
    if e is None:        # KL(ref‖π)'s pass loads them but stores no e
        c = kg = any_f32
    args = (z, zr_, safe.contiguous(), c.contiguous(), kg.contiguous(), e_,
            *(any_f32 if t is None else t for t in (logp, ref_logp, kl_out, stats)),
            C, V, z.stride(0), zr_.stride(0), e_.stride(0), float(softcap or 1.0))
    flags = dict(HAS_SOFTCAP=softcap is not None, HAS_REF=zr is not None, KL=_KL_MODE[kl],
                 WRITE_E=e is not None, STATS=mode)
    with device_guard(z):
        launch("linear_preference_loss_fwd", linear_preference_loss_fwd_kernel,
               lambda meta: (triton.cdiv(C, meta["ROWS"]),), z, args, flags,
               autotune_key=_AUTOTUNE_KEY)
    return None if mode == 2 else (logp, ref_logp, kl_out)


class _GEMMs:
    """The sweep's gradient GEMMs (``SweepBackend.gemms``) from e in the GEMM dtype: e·W in
    the input dtype, eᵀ·h summed in float32 (on a GPU with 16-bit inputs, tensor-core GEMMs
    with fp32 accumulation: ``addmm_f32_`` / ``mm_f32``)."""

    acc_dtype = torch.float32

    def __init__(self, hidden, weight):
        dt = dz_dtype(hidden)
        self.w = weight if weight.dtype == dt else weight.to(dt)   # fp32 under the interpreter

    def e_w(self, e, out):
        if out.dtype == e.dtype and out.is_contiguous():
            torch.matmul(e, self.w, out=out)
        else:
            out.copy_(e @ self.w)
        return out

    def et_h(self, acc, e, h, dtype=None):
        h = h if h.dtype == e.dtype else h.to(e.dtype)
        if dtype is not None:                   # the whole d_weight in one product
            return (e.T @ h).to(dtype)
        return accumulate_mm(acc, e.T, h)


# --------------------------------------------------------------------------------------------
# the chunk step and the public backend entry
# --------------------------------------------------------------------------------------------


def _logits(h, weight, bias):
    """h·Wᵀ + b [C, V] in the input dtype, as eager (and the torch backend) forms it: the
    epilogue then reads the same logits the reference rounds."""
    z = h @ weight.T
    return z if bias is None else z.add_(bias)


def _chunk(h, weight, bias, ref_h, ref_weight, ref_bias, safe, opts: PairHeadOptions, sd,
           want_e, coef=None):
    """(logp, ref_logp | None, kl | None, e | grad | None) of one chunk
    (``SweepBackend.chunk``): cuBLAS logits, then the epilogue. With ``coef`` one launch gives
    the statistics and e. Without, a first launch gives the statistics and saves each row's
    (max, log Σ exp, KL), and ``grad(c, kg)`` launches again to write e from them, reading
    each head's logits once. e goes over the policy logits unless ``_own_e``."""
    cfg = opts.config
    kl_mode = cfg.kl if cfg.uses_kl else None
    z = _logits(h, weight, bias)
    zr = None if ref_h is None else _logits(ref_h, ref_weight, ref_bias)
    if not want_e:
        return (*linear_preference_loss_fwd(z, zr, safe, None, None, None, opts.softcap,
                                            kl_mode), None)
    e = torch.empty(z.shape, dtype=dz_dtype(h), device=z.device) if _own_e(h) else z
    if coef is not None:
        return (*linear_preference_loss_fwd(z, zr, safe, *coef, e, opts.softcap, kl_mode), e)
    stats = torch.empty((5, z.shape[0]), dtype=torch.float32, device=z.device)
    out = linear_preference_loss_fwd(z, zr, safe, None, None, None, opts.softcap, kl_mode,
                                     stats)

    def grad(c, kg):
        linear_preference_loss_fwd(z, zr, safe, c, kg, e, opts.softcap, kl_mode, stats)
        return e

    return (*out, grad)


_BACKEND = SweepBackend(chunk=_chunk, gemms=_GEMMs)


def _own_e(h) -> bool:
    """Whether a chunk's e needs a buffer of its own instead of overwriting the policy logits
    (which are in h's dtype): e in another dtype (the interpreter's float32), or autotuning
    (its trial runs would read e back as logits)."""
    return dz_dtype(h) != h.dtype or configs.autotuning(h)


def chunk_itemsize(hidden, ref_hidden) -> int:
    """Bytes per logit of every [C, V] buffer a chunk of the sweep holds: the logits of each
    head in its input dtype, and e when it cannot overwrite them (``_own_e``)."""
    per = hidden.element_size() + (
        torch.finfo(dz_dtype(hidden)).bits // 8 if _own_e(hidden) else 0)
    if ref_hidden is not None:
        per += ref_hidden.element_size()
    return per


def _chunk_rows(hidden, ref_hidden, v: int, chunk_tokens: int | None) -> int:
    """Rows per chunk of the sweep (``sweep_rows`` at ``chunk_itemsize``)."""
    return sweep_rows(hidden.shape[0], v, chunk_itemsize(hidden, ref_hidden), chunk_tokens)


def linear_preference_loss(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
                           ref_logp, weights, normalizer, opts: PairHeadOptions, *,
                           chunk_tokens: int | None = None):
    """Backend entry (see ``tisdpo_kernels.ops``), the torch backend's contract: (loss, logp,
    ref_logp, kl) for hidden [N, D], weight [V, D], targets [N] int64, the reference head
    (ref_hidden [N, D′], ref_weight [V, D′], ref_bias) or precomputed ref_logp [N] or neither,
    token weights [N] or None, normalizer a float64 0-d tensor or None and ``opts.pair_rows``.

    loss: 0-d float32, differentiable in hidden, weight and bias (those ``opts.needs`` names);
    logp, ref_logp, kl: [N] float32, detached, 0 where ignored. ``chunk_tokens``: rows per
    chunk (default: ``_chunk_rows``).
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias),
                    ("ref_hidden", ref_hidden), ("ref_weight", ref_weight),
                    ("ref_bias", ref_bias)):
        if t is not None:
            check_dtype("linear_preference_loss", name, t)
    if weight.shape[0] == 0:
        raise ValueError("linear_preference_loss: weight has V=0 rows; the vocabulary must be "
                         "non-empty")
    return run_sweep(_BACKEND, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
                     ref_logp, weights, normalizer, opts,
                     _chunk_rows(hidden, ref_hidden, weight.shape[0], chunk_tokens))
