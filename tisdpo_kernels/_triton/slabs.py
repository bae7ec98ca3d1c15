"""The chunked backward of the fused heads: dz slabs, then GEMMs through torch.

A backward kernel writes the per-logit gradient dz of a chunk of rows into a slab [C, V] in
the compute dtype; d_hidden, d_weight and d_bias then come from plain GEMMs and a column sum
(cuBLAS on CUDA), with no atomics. The chunk size comes from ``TISDPO_DZ_MB``. Under
``TISDPO_HEAD_LOGITS=gemm`` the framework's GEMM also writes a chunk's logits
(:func:`gemm_logits`) for the kernels to read instead of multiplying.
"""
from __future__ import annotations

import torch
import triton

from tisdpo_kernels._common import (
    accumulate_mm, addmm_f32_, dz_chunk_rows, kept_columns, no_autocast,
)
from tisdpo_kernels._triton.common import upcast


def dz_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dz slab's dtype: the inputs' on a GPU (tensor-core GEMM operands), float32 under the
    interpreter (whose 16-bit arithmetic is not faithful) and for float32 inputs."""
    return torch.float32 if upcast(hidden) else hidden.dtype


def dz_slab(rows: int, v: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised dz slab [rows, v] whose rows start 16-byte aligned (a view of a slab
    with its row length rounded up), so a TMA store can write it whatever V is."""
    per = 128 // torch.finfo(dtype).bits          # elements in 16 bytes
    return torch.empty(rows, triton.cdiv(v, per) * per, dtype=dtype, device=device)[:, :v]


def gemm_logits(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
    """``out`` [C, V] = hidden[rows] @ weightᵀ, rounded to the input dtype as eager rounds
    the logits (``TISDPO_HEAD_LOGITS=gemm``: a cuBLAS GEMM on CUDA; under the interpreter the
    float32 slab takes the rounded values). In the input dtype whatever autocast is on.
    ``out`` may be a slab with padded rows: cuBLAS writes them in place (row stride as its
    leading dimension), with no [C, V] temporary."""
    h = hidden.index_select(0, rows)
    with no_autocast(hidden.device):
        if out.dtype == hidden.dtype and out.stride(1) == 1:
            torch.matmul(h, weight.T, out=out)
        else:
            out.copy_(h @ weight.T)
    return out


def logit_chunks(rows: torch.Tensor, count: torch.Tensor, heads):
    """The forward's chunks under ``TISDPO_HEAD_LOGITS=gemm``: for each chunk of the slots of
    ``rows`` (``count`` [1] kept), (its rows, its kept count clamped to it on the device,
    [logits of each (hidden, weight) in ``heads``]). The heads' logit slabs, allocated once,
    share the ``TISDPO_DZ_MB`` budget."""
    n, v = rows.shape[0], heads[0][1].shape[0]
    dts = [dz_dtype(h) for h, _ in heads]
    c = dz_chunk_rows(n, v, sum(torch.finfo(dt).bits // 8 for dt in dts))
    bufs = [dz_slab(c, v, dt, rows.device) for dt in dts]
    for lo in range(0, n, c):
        sl = rows[lo:lo + c]
        k = sl.shape[0]
        yield sl, (count - lo).clamp(0, k), [gemm_logits(h, w, sl, buf[:k])
                                             for (h, w), buf in zip(heads, bufs)]


def slab_backward(write_dz, hidden: torch.Tensor, weight: torch.Tensor, bias, rows, count,
                  need_dh: bool, need_dw: bool, need_db: bool, *, filter_eps=None,
                  targets=None, stats_block_n: int = 16, extra_itemsize: int = 0):
    """(d_hidden, d_weight, d_bias) in the inputs' dtypes (None where not needed) from dz slabs.

    ``rows`` [N] is the compacted row order (``compact_rows``): the kept rows first, ``count``
    [1] (on the device) how many. For each chunk of C slots, ``write_dz(dz, lo, pmax)`` fills
    dz [C, V] for slots lo..lo+C (rows past the kept count as zeros); then d_hidden[rows] =
    dz·W, d_weight (+)= dzᵀ·H[rows] and d_bias (+)= Σ_rows dz. The hidden rows past the kept
    count enter the d_weight GEMM as zeros, so an ignored row's hidden state (even NaN or inf,
    as padding may hold) contributes exactly nothing (0·NaN would be NaN). One chunk writes
    d_weight and d_bias in the parameters' dtypes; more accumulate in float32 and cast once.
    Every output element is written by exactly one GEMM or sum, so the result is the same bit
    for bit on every run. Slots past the kept count still cost their (zero) rows of GEMM
    work: sizing the GEMMs to the kept count would need a host sync.

    With ``filter_eps`` (docs/FILTERING.md) ``pmax`` is a zeroed float32 [⌈C/stats_block_n⌉,
    V] that ``write_dz`` fills with per-token-block column maxima of the softmax (``pmax`` is
    None otherwise); the GEMMs then run on the columns ``kept_columns`` keeps (``targets`` [N]
    gives the rows' target ids), one host sync per chunk.

    ``extra_itemsize``: bytes per logit of other [C, V] buffers ``write_dz`` holds per chunk
    (the KL head's reference logits under ``TISDPO_HEAD_LOGITS=gemm``), counted in the budget.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    if n == 0:
        return (torch.zeros_like(hidden) if need_dh else None,
                torch.zeros_like(weight) if need_dw else None,
                torch.zeros_like(bias) if need_db else None)
    dev = hidden.device
    dt = dz_dtype(hidden)
    c = dz_chunk_rows(n, v, torch.finfo(dt).bits // 8 + extra_itemsize)
    single = c >= n
    w = weight if weight.dtype == dt else weight.to(dt)
    dh = torch.empty(n, d, dtype=hidden.dtype, device=dev) if need_dh else None
    # several chunks: a float32 sum, which the first chunk's GEMM writes (no zero-fill) unless
    # filtering may add a chunk's kept columns into it
    dw = (torch.zeros(v, d, dtype=torch.float32, device=dev)
          if need_dw and not single and filter_eps is not None else None)
    db = None
    with no_autocast(dev):       # the compute dtype, whatever autocast the caller has on
        for lo in range(0, n, c):
            hi = min(lo + c, n)
            dz = dz_slab(hi - lo, v, dt, dev)
            sl = rows[lo:hi]
            kept = torch.arange(lo, hi, device=dev) < count                 # [C], no sync
            cols = None
            if filter_eps is None:
                write_dz(dz, lo, None)
            else:
                pmax = torch.zeros(triton.cdiv(hi - lo, stats_block_n), v, dtype=torch.float32,
                                   device=dev)
                write_dz(dz, lo, pmax)
                tg = torch.where(kept, targets.index_select(0, sl), 0)     # ignored: any id
                cols = kept_columns(pmax.amax(0), tg, kept, filter_eps)
            wc = w if cols is None else w.index_select(0, cols)
            dzc = dz if cols is None else dz.index_select(1, cols)
            del dz
            if need_dh:      # the GEMM's own output dtype is the compute dtype (fp32 accumulation)
                dh.index_copy_(0, sl, (dzc @ wc).to(hidden.dtype))
            if need_dw:
                h = hidden.index_select(0, sl)
                h = torch.where(kept[:, None], h, torch.zeros((), dtype=h.dtype, device=dev))
                h = h if h.dtype == dt else h.to(dt)
                if single:
                    part = (dzc.t() @ h).to(weight.dtype)
                    dw = part if cols is None else torch.zeros(
                        v, d, dtype=weight.dtype, device=dev).index_copy_(0, cols, part)
                elif cols is None:
                    dw = accumulate_mm(dw, dzc.t(), h)
                else:        # distinct columns: one add per element, deterministic
                    dw.index_add_(0, cols, addmm_f32_(torch.zeros(
                        cols.numel(), d, dtype=torch.float32, device=dev), dzc.t(), h))
            if need_db:
                part = dzc.sum(0, dtype=torch.float32)
                if cols is not None:
                    part = torch.zeros(v, dtype=torch.float32, device=dev).index_copy_(
                        0, cols, part)
                db = part if db is None else db.add_(part)
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    return dh, dw, db
