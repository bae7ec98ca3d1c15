"""The chunked backward of the fused heads: dz slabs, then GEMMs through torch.

A backward kernel writes the per-logit gradient dz into a slab in the compute dtype; d_hidden,
d_weight and d_bias then come from plain GEMMs and a column sum (cuBLAS on CUDA), with no
atomics. A slab holds ``TISDPO_DZ_MB``: all the rows when they fit, else either a chunk of
rows [C, V] (d_weight summed over the chunks in float32) or a band of vocabulary columns
[N, W] (d_hidden summed over the bands in float32, each band's d_weight rows written once),
whichever sum is the smaller (:func:`slab_plan`). Under ``TISDPO_HEAD_LOGITS=gemm`` the
framework's GEMM also writes a slab's logits (:func:`gemm_logits`) for the kernels to read
instead of multiplying.
"""
from __future__ import annotations

import torch
import triton

from tisdpo_kernels import _env
from tisdpo_kernels._common import (
    accumulate_mm, addmm_f32_, dz_chunk_rows, kept_columns, no_autocast,
)
from tisdpo_kernels._triton.common import upcast

# a column band's width is a multiple of this (whole tiles of every config but the last band's)
BAND_ALIGN = 128


def dz_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dz slab's dtype: the inputs' on a GPU (tensor-core GEMM operands), float32 under the
    interpreter (whose 16-bit arithmetic is not faithful) and for float32 inputs."""
    return torch.float32 if upcast(hidden) else hidden.dtype


def dz_slab(rows: int, v: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised dz slab [rows, v] whose rows start 16-byte aligned (a view of a slab
    with its row length rounded up), so a TMA store can write it whatever V is."""
    per = 128 // torch.finfo(dtype).bits          # elements in 16 bytes
    return torch.empty(rows, triton.cdiv(v, per) * per, dtype=dtype, device=device)[:, :v]


def gemm_logits(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` [C, V] = h @ weightᵀ for a slab's hidden rows ``h`` [C, D] (gathered, in the
    input dtype), rounded to that dtype as eager rounds the logits (``TISDPO_HEAD_LOGITS=gemm``:
    a cuBLAS GEMM on CUDA; under the interpreter the float32 slab takes the rounded values).
    In the input dtype whatever autocast is on. ``out`` may be a slab with padded rows: cuBLAS
    writes them in place (row stride as its leading dimension), with no [C, V] temporary."""
    with no_autocast(h.device):
        if out.dtype == h.dtype and out.stride(1) == 1:
            torch.matmul(h, weight.T, out=out)
        else:
            out.copy_(h @ weight.T)
    return out


def column_band(v0: int, width: int, targets: torch.Tensor, *heads):
    """(each of ``heads`` [V, ...] sliced to rows v0..v0+width, targets − v0): what a backward
    kernel takes to write the dz band of columns v0..v0+width as if the vocabulary were that
    band (a target outside it matches no column). None stays None; the tensors themselves
    for the whole vocabulary."""
    if v0 == 0 and all(t is None or t.shape[0] == width for t in heads):
        return (*heads, targets)
    return (*(None if t is None else t[v0:v0 + width] for t in heads), targets - v0)


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
        yield sl, (count - lo).clamp(0, k), [gemm_logits(h.index_select(0, sl), w, buf[:k])
                                             for (h, w), buf in zip(heads, bufs)]


def slab_plan(n: int, v: int, d: int, dz_size: int, extra_size: int, need_dh: bool,
              need_dw: bool, filtering: bool, row_size: int = 0) -> tuple[str, int]:
    """How the backward cuts its dz into slabs within ``TISDPO_DZ_MB``: ("rows", C) for chunks
    of C rows (one chunk of all n when it fits), or ("columns", W) for bands of W vocabulary
    columns and all n rows. ``dz_size``: bytes of a dz element (the compute dtype's),
    ``extra_size``: bytes per logit of other slab-shaped buffers, ``row_size``: bytes per row
    of other [n, ·] buffers a band loop holds (the reference head's hidden rows under the
    gemm mode).

    Rows sum d_weight over the chunks in a float32 [V, D] and cast it at the end; bands write
    each band's d_weight rows once, in the parameter dtype, and sum d_hidden over the bands in
    a float32 [n, D]. So bands are taken when d_weight is wanted and their sum is the smaller
    (n < V, or no d_hidden wanted): at n = 8192, V = 128256, D = 4096 in bf16, 128 MiB of
    float32 instead of 2 GiB plus the 1 GiB cast. The budget then holds a band and the band
    loop's own [n, D] buffers (the masked hidden rows, d_hidden's float32 sum), so the
    backward's memory is d_hidden + d_weight + the budget + O(n). Gradient filtering keeps
    row chunks (its column choice is per chunk of rows), and so does a budget that leaves less
    than one aligned band.
    """
    c = dz_chunk_rows(n, v, dz_size + extra_size)
    if c >= n or not need_dw or filtering or (need_dh and n >= v):
        return "rows", c
    room = _env.dz_budget_bytes() - n * (d * (dz_size + (4 if need_dh else 0)) + row_size)
    widest = max(room, 0) // (n * (dz_size + extra_size)) // BAND_ALIGN * BAND_ALIGN
    if widest < BAND_ALIGN:
        return "rows", c
    bands = triton.cdiv(v, widest)                  # as few as fit, of near-equal width
    return "columns", triton.cdiv(triton.cdiv(v, bands), BAND_ALIGN) * BAND_ALIGN


def slab_backward(write_dz, hidden: torch.Tensor, weight: torch.Tensor, bias, rows, count,
                  need_dh: bool, need_dw: bool, need_db: bool, *, filter_eps=None,
                  targets=None, stats_block_n: int = 16, extra_itemsize: int = 0,
                  logit_hidden: tuple = ()):
    """(d_hidden, d_weight, d_bias) in the inputs' dtypes (None where not needed) from dz slabs.

    ``rows`` [N] is the compacted row order (``compact_rows``): the kept rows first, ``count``
    [1] (on the device) how many. ``write_dz(dz, lo, pmax, v0, hs)`` fills dz [C, W] for slots
    lo..lo+C and vocabulary columns v0..v0+W (rows past the kept count as zeros); the slabs
    are chunks of rows or bands of columns (:func:`slab_plan`). Then d_hidden[rows] (+)= dz·W,
    d_weight (+)= dzᵀ·H[rows] and d_bias (+)= Σ_rows dz. The hidden rows past the kept count
    enter the d_weight GEMM as zeros, so an ignored row's hidden state (even NaN or inf, as
    padding may hold) contributes exactly nothing (0·NaN would be NaN). A gradient that one
    GEMM writes whole is written in its dtype; one summed over several slabs is summed in
    float32 and cast once. Every output element is written by exactly one GEMM or sum, so the
    result is the same bit for bit on every run. Slots past the kept count still cost their
    (zero) rows of GEMM work: sizing the GEMMs to the kept count would need a host sync.

    With ``filter_eps`` (docs/FILTERING.md; row chunks) ``pmax`` is a zeroed float32
    [⌈C/stats_block_n⌉, V] that ``write_dz`` fills with per-token-block column maxima of the
    softmax (``pmax`` is None otherwise); the GEMMs then run on the columns ``kept_columns``
    keeps (``targets`` [N] gives the rows' target ids), one host sync per chunk.

    ``extra_itemsize``: bytes per logit of other slab-shaped buffers ``write_dz`` holds (the
    KL head's reference logits under ``TISDPO_HEAD_LOGITS=gemm``), counted in the budget.

    ``logit_hidden``: the hidden tensors whose rows ``write_dz`` multiplies itself (under
    ``TISDPO_HEAD_LOGITS=gemm``: ``hidden``, and the KL head's ref_hidden). ``hs`` then holds
    the slab's rows of each, in its own dtype, gathered once per chunk of rows or once for all
    bands (and counted in the band budget); ``hidden``'s are the masked rows the d_weight GEMM
    reads, so they are gathered once for both. ``hs`` is () otherwise.
    """
    n = hidden.shape[0]
    if n == 0:
        return (torch.zeros_like(hidden) if need_dh else None,
                torch.zeros_like(weight) if need_dw else None,
                torch.zeros_like(bias) if need_db else None)
    dt = dz_dtype(hidden)
    others = [t for t in logit_hidden if t is not hidden]
    kind, size = slab_plan(n, weight.shape[0], hidden.shape[1], torch.finfo(dt).bits // 8,
                           extra_itemsize, need_dh, need_dw, filter_eps is not None,
                           sum(t.shape[1] * t.element_size() for t in others))
    rows_of = _SlabRows(hidden, logit_hidden, rows, count, dt)
    # the d_hidden GEMM's weight operand in the compute dtype
    w = None if not need_dh else weight if weight.dtype == dt else weight.to(dt)
    with no_autocast(hidden.device):  # the compute dtype, whatever autocast the caller has on
        if kind == "columns":
            dh, dw, db = _column_bands(write_dz, rows_of, weight, w, need_dh, need_db, size)
        else:
            dh, dw, db = _row_chunks(write_dz, rows_of, weight, w, need_dh, need_dw, need_db,
                                     size, filter_eps, targets, stats_block_n)
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    return dh, dw, db


class _SlabRows:
    """A slab's rows of the hidden tensors: the masked rows of ``hidden`` in the compute dtype
    (the d_weight GEMM's operand; an ignored row's hidden state, even NaN, becomes zeros) and
    what ``write_dz`` takes (``logit_hidden``), each gathered once per slab."""

    def __init__(self, hidden, logit_hidden, rows, count, dt):
        self.hidden, self.rows, self.count, self.dt = hidden, rows, count, dt
        self.wanted = logit_hidden
        self.writer_takes_hidden = any(t is hidden for t in logit_hidden)

    def masked(self, lo: int, hi: int) -> torch.Tensor:
        """hidden[rows[lo:hi]] in the compute dtype, the rows past the kept count zeroed."""
        h = self.hidden.index_select(0, self.rows[lo:hi])
        kept = torch.arange(lo, hi, device=h.device) < self.count              # no sync
        h = torch.where(kept[:, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        return h if h.dtype == self.dt else h.to(self.dt)

    def for_writer(self, lo: int, hi: int, masked) -> tuple:
        """``write_dz``'s rows of each of ``logit_hidden`` for slots lo..hi, in its own dtype
        (``masked``: this slab's ``masked`` rows when made, else None)."""
        out = []
        for t in self.wanted:
            if t is not self.hidden:
                out.append(t.index_select(0, self.rows[lo:hi]))
            else:    # in the input dtype: a float32 copy (the interpreter's) is rounded back
                h = self.masked(lo, hi) if masked is None else masked
                out.append(h if h.dtype == t.dtype else h.to(t.dtype))
        return tuple(out)


def _row_chunks(write_dz, rows_of, weight, w, need_dh, need_dw, need_db, c, filter_eps,
                targets, stats_block_n):
    """slab_backward over chunks of c rows: (d_hidden, d_weight, d_bias sum)."""
    hidden, rows, count, dt = rows_of.hidden, rows_of.rows, rows_of.count, rows_of.dt
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    single = c >= n
    dh = torch.empty(n, d, dtype=hidden.dtype, device=dev) if need_dh else None
    # several chunks: a float32 sum, which the first chunk's GEMM writes (no zero-fill) unless
    # filtering may add a chunk's kept columns into it
    dw = (torch.zeros(v, d, dtype=torch.float32, device=dev)
          if need_dw and not single and filter_eps is not None else None)
    db = None
    for lo in range(0, n, c):
        hi = min(lo + c, n)
        dz = dz_slab(hi - lo, v, dt, dev)
        sl = rows[lo:hi]
        kept = torch.arange(lo, hi, device=dev) < count                     # [C], no sync
        h = rows_of.masked(lo, hi) if need_dw and rows_of.writer_takes_hidden else None
        hs = rows_of.for_writer(lo, hi, h)
        cols = None
        if filter_eps is None:
            write_dz(dz, lo, None, 0, hs)
        else:
            pmax = torch.zeros(triton.cdiv(hi - lo, stats_block_n), v, dtype=torch.float32,
                               device=dev)
            write_dz(dz, lo, pmax, 0, hs)
            tg = torch.where(kept, targets.index_select(0, sl), 0)         # ignored: any id
            cols = kept_columns(pmax.amax(0), tg, kept, filter_eps)
        del hs
        dzc = dz if cols is None else dz.index_select(1, cols)
        del dz
        if need_dh:      # the GEMM's own output dtype is the compute dtype (fp32 accumulation)
            wc = w if cols is None else w.index_select(0, cols)
            dh.index_copy_(0, sl, (dzc @ wc).to(hidden.dtype))
        if need_dw:
            h = rows_of.masked(lo, hi) if h is None else h
            if single:
                part = (dzc.t() @ h).to(weight.dtype)
                dw = part if cols is None else torch.zeros(
                    v, d, dtype=weight.dtype, device=dev).index_copy_(0, cols, part)
            elif cols is None:
                dw = accumulate_mm(dw, dzc.t(), h)
            else:        # distinct columns: one add per element, deterministic
                dw.index_add_(0, cols, addmm_f32_(torch.zeros(
                    cols.numel(), d, dtype=torch.float32, device=dev), dzc.t(), h))
            del h
        if need_db:
            part = dzc.sum(0, dtype=torch.float32)
            if cols is not None:
                part = torch.zeros(v, dtype=torch.float32, device=dev).index_copy_(0, cols, part)
            db = part if db is None else db.add_(part)
    return dh, dw, db


def _column_bands(write_dz, rows_of, weight, w, need_dh, need_db, width):
    """slab_backward over bands of ``width`` vocabulary columns, all rows in each: every
    band's d_weight rows by one GEMM into the parameter-dtype d_weight, d_hidden summed over
    the bands in float32 (the first band's GEMM writes the sum)."""
    hidden, rows, dt = rows_of.hidden, rows_of.rows, rows_of.dt
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    h = rows_of.masked(0, n)
    hs = rows_of.for_writer(0, n, h)
    dw = torch.empty(v, d, dtype=weight.dtype, device=dev)
    db = torch.empty(v, dtype=torch.float32, device=dev) if need_db else None
    acc = None
    for v0 in range(0, v, width):
        v1 = min(v0 + width, v)
        dz = dz_slab(n, v1 - v0, dt, dev)
        write_dz(dz, 0, None, v0, hs)
        if need_dh:
            acc = accumulate_mm(acc, dz, w[v0:v1])
        if dt == weight.dtype:
            torch.matmul(dz.t(), h, out=dw[v0:v1])
        else:
            dw[v0:v1] = dz.t() @ h
        if need_db:
            torch.sum(dz, 0, dtype=torch.float32, out=db[v0:v1])
        del dz
    del h, hs
    dh = None
    if need_dh:      # cast, free the float32 sum, then put the slots' rows in row order
        acc = acc.to(hidden.dtype)
        dh = torch.empty(n, d, dtype=hidden.dtype, device=dev).index_copy_(0, rows, acc)
    return dh, dw, db
