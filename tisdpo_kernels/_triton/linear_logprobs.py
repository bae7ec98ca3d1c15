"""Fused LM-head log-probabilities: logp_t = z_t[y_t] − logsumexp(z_t), z = softcap(H Wᵀ + b).

Nothing of size tokens × vocab is ever stored.

Forward (``linear_logprobs_fwd_kernel``): one program per (token block, vocabulary split). It
walks its split's vocabulary tiles; each tile is a [BLOCK_N, BLOCK_V] GEMM over D in BLOCK_D
steps with fp32 accumulation (bf16/fp16 tensor cores on a GPU; on sm_90 the weight tiles by
TMA, ``common.logits_tile``), followed by bias, softcap, an online fp32 logsumexp and the
target-logit gather. With one split the program writes logp and lse; with S splits it writes
per-split lse partials [S, N] and the split holding the target writes the target logit, and
``linear_logprobs_fwd_combine_kernel`` merges them exactly (max, then Σ exp). Splits exist for
parallelism (few tokens) and for L2 reuse (programs that run together share hidden strips and
weight tiles). Flops: 2·N·D·V.

Backward, per dz slab (``slabs.slab_backward``: within ``TISDPO_DZ_MB``, all N rows × V when
they fit, else chunks of rows or bands of vocabulary columns, ``slabs.slab_plan``; a band is
launched as the head's slice with shifted targets): ``linear_logprobs_bwd_kernel``, one
program per (token block, vocabulary block) tile of the slab, grouped GROUP_N token blocks at
a time for L2 reuse, recomputes the logit tile and writes

    dz = g_logp·(onehot(y) − p) + g_lse·p,   p = exp(z − lse)   (× softcap′(z) with softcap)

for arbitrary per-token upstream gradients (any sign, zero) into the dz slab in the
compute dtype; then d_hidden (+)= dz·W, d_weight (+)= dzᵀ·H and d_bias (+)= Σ_rows dz are plain
GEMMs and a sum through torch (cuBLAS, fp32 accumulation). No atomics: the gradients are the
same bit for bit run to run. Flops: 2·N·D·V (recompute) + 2·N·D·V per requested gradient,
i.e. 8·N·D·V for forward + backward with both; extra memory: one slab, and with several the
float32 sum over them ([N, D] for bands, [V, D] for row chunks). Exact by default;
with ``filter_eps`` (docs/FILTERING.md) each tile also writes its column maxima of p, and the
GEMMs run on the chunk's kept columns only (gathered; one host sync per chunk).

Ignored tokens (and, in backward, tokens whose two upstream gradients are both 0) are packed
out on the device (``common.compact_rows``, no host sync): forward programs past the kept count
do no work, backward tiles past it only write their zeros (the GEMMs still see those zero rows:
sizing them to the kept count would need a host sync). Ignored tokens get logp = lse = 0 and
zero gradient.

Logits from a GEMM (``TISDPO_HEAD_LOGITS=gemm``, docs/DESIGN.md §3): per slab within the dz
budget (chunks of rows in the forward, the backward's slabs in the backward), the framework's
GEMM (cuBLAS on CUDA) writes the logits h·Wᵀ in the input dtype and both kernels read their
tiles from it (``Z_GIVEN``) instead of multiplying; the backward's dz overwrites them in
place. The same math and outputs, the logits rounded as eager rounds them; no TMA (nothing is
multiplied), no host sync.

Dispatch: CUDA tensors run compiled; CPU tensors run under TRITON_INTERPRET=1, where 16-bit
tiles are upcast to fp32 after loading (UPCAST) and dz is not rounded to the input dtype.
The public function goes through ``torch.library`` custom ops (registered on first use) so
``torch.compile`` sees one opaque node with a fake implementation and an autograd formula.
float64 inputs are rejected (use impl="torch" or "reference").
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
    given_logits, grouped_tile, head_logits, launch, mask_cols, num_splits, online_lse_step,
    softcap_grad, split_rows, store_tile, tma, upcast,
)
from tisdpo_kernels._triton.slabs import (
    column_band, dz_dtype, gemm_logits, logit_chunks, slab_backward,
)

__all__ = ["linear_logprobs", "linear_logprobs_fwd", "linear_logprobs_bwd",
           "LinearLogprobsFunction"]

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def linear_logprobs_fwd_kernel(
        h_ptr, w_ptr, b_ptr, t_ptr, rows_ptr, count_ptr,
        part_ptr, tlogit_ptr, logp_ptr, lse_ptr, z_ptr,
        N, V, D, NUM_SPLITS,
        stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_t, stride_z, cap,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FINAL: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        FLATTEN: tl.constexpr = False, TMA: tl.constexpr = False,
        Z_GIVEN: tl.constexpr = False):
    """Z_GIVEN: the logit tiles are read from z [N, V] (slot i's logits in row i) instead of
    multiplied (``TISDPO_HEAD_LOGITS=gemm``); h_ptr and w_ptr are then unused."""
    split, slots, row_mask, rows, tgt, v_lo, v_hi, n_tiles = split_rows(
        tl.program_id(0), NUM_SPLITS, rows_ptr, count_ptr, t_ptr, stride_t, V, BLOCK_N, BLOCK_V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    # FLATTEN: one software pipeline over (vocabulary tile, D step), so the next tile's loads
    # overlap this tile's logsumexp epilogue (fewer registers; larger tiles compile unspilled)
    for i in tl.range(0, n_tiles, flatten=FLATTEN):
        col0 = v_lo + i * BLOCK_V
        cols = col0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        if Z_GIVEN:
            z = given_logits(z_ptr, slots, cols, row_mask, col_mask, stride_z, b_ptr,
                             stride_b, cap, HAS_BIAS, HAS_SOFTCAP)
        else:
            z = head_logits(h_ptr, w_ptr, b_ptr, rows, cols, col0, row_mask, col_mask, D,
                            stride_hn, stride_hd, stride_wv, stride_wd, stride_b, cap,
                            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
                            DOT_PRECISION, TMA)
        zt += gather_cols(z, cols, tgt)
        m, s = online_lse_step(m, s, mask_cols(z, col_mask))
    lse = m + tl.log(tl.maximum(s, 1e-30))     # s ≥ 1 unless the split is empty (then −inf)
    if FINAL:
        tl.store(logp_ptr + rows, zt - lse, mask=row_mask)
        tl.store(lse_ptr + rows, lse, mask=row_mask)
    else:
        tl.store(part_ptr + split.to(tl.int64) * N + slots, lse, mask=row_mask)
        owns_target = row_mask & (tgt >= v_lo) & (tgt < v_hi)
        tl.store(tlogit_ptr + slots, zt, mask=owns_target)


@triton.jit
def linear_logprobs_fwd_combine_kernel(
        part_ptr, tlogit_ptr, rows_ptr, count_ptr, logp_ptr, lse_ptr, N, NUM_SPLITS,
        BLOCK_N: tl.constexpr):
    slots = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = slots < tl.load(count_ptr)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    ptrs = part_ptr + slots                                  # part [S, N]: step N per split
    for _ in range(0, NUM_SPLITS):
        m = tl.maximum(m, tl.load(ptrs, mask=mask, other=0.0))
        ptrs += N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    ptrs = part_ptr + slots
    for _ in range(0, NUM_SPLITS):
        acc += tl.exp(tl.load(ptrs, mask=mask, other=0.0) - m)   # empty split: exp(−inf) = 0
        ptrs += N
    lse = m + tl.log(acc)
    rows = tl.load(rows_ptr + slots, mask=mask, other=0)
    zt = tl.load(tlogit_ptr + slots, mask=mask, other=0.0)
    tl.store(logp_ptr + rows, zt - lse, mask=mask)
    tl.store(lse_ptr + rows, lse, mask=mask)


@triton.jit
def linear_logprobs_bwd_kernel(
        h_ptr, w_ptr, b_ptr, t_ptr, rows_ptr, count_ptr, lse_ptr, gl_ptr, gs_ptr, z_ptr,
        dz_ptr, pmax_ptr, lo, C, V, D,
        stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_t, stride_gl, stride_gs,
        stride_z, stride_dz, stride_pm, cap,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_FILTER: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        GROUP_N: tl.constexpr, TMA: tl.constexpr = False, Z_GIVEN: tl.constexpr = False):
    """One [BLOCK_N, BLOCK_V] tile of the dz slab for slots lo..lo+C: recomputed logits, then
    dz = g_logp·(onehot − p) + g_lse·p (× softcap′); zeros for slots past the kept count.
    TMA: the weight and the dz slab are tensor descriptors. Z_GIVEN: the tiles are read from
    the chunk's logits h·Wᵀ z [C, V] (``TISDPO_HEAD_LOGITS=gemm``) instead of multiplied; z
    may be the dz slab itself (each program reads, then writes, only its own tile).
    HAS_FILTER: also the tile's column maxima of p into row pid_n of pmax (zeroed by the
    launcher), for the filtered backward's column choice."""
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
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        g_lp = tl.load(gl_ptr + rows * stride_gl, mask=row_mask, other=0.0).to(tl.float32)
        g_lse = tl.load(gs_ptr + rows * stride_gs, mask=row_mask, other=0.0).to(tl.float32)
        if Z_GIVEN:
            z = given_logits(z_ptr, local, cols, row_mask, col_mask, stride_z, b_ptr,
                             stride_b, cap, HAS_BIAS, HAS_SOFTCAP)
        else:
            z = head_logits(h_ptr, w_ptr, b_ptr, rows, cols, pid_v * BLOCK_V, row_mask,
                            col_mask, D, stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                            cap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
                            DOT_PRECISION, TMA)
        p = tl.exp(z - lse[:, None])
        p = tl.where(row_mask[:, None] & col_mask[None, :], p, 0.0)
        if HAS_FILTER:
            tl.store(pmax_ptr + pid_n * stride_pm + cols, tl.max(p, axis=0), mask=col_mask)
        dz = (g_lse - g_lp)[:, None] * p
        dz += tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0)
        if HAS_SOFTCAP:
            dz *= softcap_grad(z, cap)
    else:
        dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    store_tile(dz_ptr, dz, pid_n * BLOCK_N, pid_v * BLOCK_V, C, V, stride_dz, BLOCK_N, BLOCK_V,
               TMA)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

# the weight (and the backward's dz slab) go through tensor descriptors when TMA is on
# (common.launch)
_DESCRIPTORS = (("w_ptr", ("BLOCK_V", "BLOCK_D")),)
_BWD_DESCRIPTORS = _DESCRIPTORS + (("dz_ptr", ("BLOCK_N", "BLOCK_V")),)
# the autotuner's key, both kernels (a name a kernel lacks is left out of its key): the shape,
# and the flags, so that each launch kind (bias, softcap, split or not...) is timed on its own
_AUTOTUNE_KEY = ("V", "D", "HAS_BIAS", "HAS_SOFTCAP", "HAS_FILTER", "FINAL", "UPCAST",
                 "DOT_PRECISION", "TMA", "Z_GIVEN")


def linear_logprobs_fwd(hidden, weight, targets, bias, ignore_index: int,
                        softcap: float | None):
    """(logp [N], lse [N]) float32, 0 where ``targets == ignore_index``. hidden [N, D] and
    weight [V, D] may be strided views; targets [N] int64; bias [V] or None. Under
    ``TISDPO_HEAD_LOGITS=gemm``, chunk by chunk of the dz budget: the logits by a GEMM, then
    the same kernel reading them (``slabs.logit_chunks``)."""
    N = hidden.shape[0]
    logp = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return logp, lse
    rows, count = compact_rows(targets != ignore_index)
    gemm = _env.head_logits() == "gemm"
    flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                 UPCAST=upcast(hidden), DOT_PRECISION=dot_precision(hidden.dtype),
                 TMA=not gemm and tma(hidden, weight), Z_GIVEN=gemm)
    with device_guard(hidden):
        if not gemm:
            _fwd_rows(hidden, weight, bias, targets, rows, count, logp, lse, softcap, flags)
            return logp, lse
        for sl, kept, (z,) in logit_chunks(rows, count, [(hidden, weight)]):
            _fwd_rows(hidden, weight, bias, targets, sl, kept, logp, lse, softcap, flags, z)
    return logp, lse


def _fwd_rows(hidden, weight, bias, targets, rows, count, logp, lse, softcap, flags, z=None):
    """The forward kernel (and the split combine) over the slots of ``rows`` (``count`` [1]
    of them kept), writing logp and lse at the rows' ids; ``z`` [slots, V]: their logits
    (Z_GIVEN) or None."""
    n, D = rows.shape[0], hidden.shape[1]
    V = weight.shape[0]
    name = "linear_logprobs_fwd_z" if flags["Z_GIVEN"] else "linear_logprobs_fwd"
    cfg = configs.get(name, hidden)
    splits = num_splits(cfg, hidden, n, V)   # with autotuning: from the default blocks
    final = splits == 1
    part = torch.empty((splits, n) if not final else (1,), dtype=torch.float32,
                       device=hidden.device)
    tlogit = torch.empty(n if not final else 1, dtype=torch.float32, device=hidden.device)
    b = bias if bias is not None else weight
    zz = z if z is not None else hidden
    args = (hidden, weight, b, targets, rows, count, part, tlogit, logp, lse, zz, n, V, D,
            splits, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            b.stride(0), targets.stride(0), zz.stride(0), float(softcap or 1.0))
    launch(name, linear_logprobs_fwd_kernel,
           lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,), hidden, args,
           {**flags, "FINAL": final}, autotune_key=_AUTOTUNE_KEY, descriptors=_DESCRIPTORS)
    if not final:
        cc = configs.get("linear_logprobs_fwd_combine", hidden)
        check_blocks("linear_logprobs_fwd_combine", **cc.meta)
        linear_logprobs_fwd_combine_kernel[(triton.cdiv(n, cc.meta["BLOCK_N"]),)](
            part, tlogit, rows, count, logp, lse, n, splits, **cc.meta,
            **cc.launch_kwargs(hidden))


def linear_logprobs_bwd(g_logp, g_lse, hidden, weight, targets, bias, lse, ignore_index: int,
                        softcap: float | None, need_dh: bool, need_dw: bool, need_db: bool,
                        filter_eps: float | None = None):
    """(d_hidden, d_weight, d_bias) in the inputs' dtypes, each None unless requested.

    g_logp, g_lse: [N] upstream gradients of logp and lse (any values; may be strided or
    expanded); lse: the forward's [N] float32 lse. dz slabs, then GEMMs (``slab_backward``;
    over the kept columns only with ``filter_eps``). Under ``TISDPO_HEAD_LOGITS=gemm`` a GEMM
    first writes each slab's logits, which the kernel reads and overwrites with dz.
    """
    D = hidden.shape[1]
    need_db = need_db and bias is not None
    keep = (targets != ignore_index) & ((g_logp != 0) | (g_lse != 0))
    rows, count = compact_rows(keep)
    b = bias if bias is not None else weight
    filtering = filter_eps is not None
    gemm = _env.head_logits() == "gemm"
    name = "linear_logprobs_bwd_z" if gemm else "linear_logprobs_bwd"
    flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                 HAS_FILTER=filtering, UPCAST=upcast(hidden),
                 DOT_PRECISION=dot_precision(hidden.dtype),
                 TMA=not gemm and tma(hidden, weight), Z_GIVEN=gemm)

    autotuning = gemm and configs.autotuning(hidden)

    def write_dz(dz, lo, pmax, v0, hs):
        C, W = dz.shape      # slots lo..lo+C, columns v0..v0+W: a band is the head's slice
        w, bb, t = column_band(v0, W, targets, weight, b)
        pm = pmax if pmax is not None else dz
        z = dz
        if gemm:     # in place, except under autotuning (its trials would read dz as z)
            z = dz if not autotuning else torch.empty_like(dz)
            gemm_logits(hs[0], w, z)
        args = (hidden, w, bb, t, rows, count, lse, g_logp, g_lse, z, dz, pm, lo, C,
                W, D, hidden.stride(0), hidden.stride(1), w.stride(0), w.stride(1),
                bb.stride(0), t.stride(0), g_logp.stride(0), g_lse.stride(0),
                z.stride(0), dz.stride(0), pm.stride(0), float(softcap or 1.0))
        launch(name, linear_logprobs_bwd_kernel,
               lambda meta: (triton.cdiv(C, meta["BLOCK_N"]) * triton.cdiv(W, meta["BLOCK_V"]),),
               hidden, args, flags, autotune_key=_AUTOTUNE_KEY, descriptors=_BWD_DESCRIPTORS)

    stats_block_n = min([configs.get(name, hidden).meta["BLOCK_N"]] + (
        [c.meta["BLOCK_N"] for c in configs.AUTOTUNE[name]]
        if configs.autotuning(hidden) else []))
    with device_guard(hidden):
        return slab_backward(write_dz, hidden, weight, bias, rows, count, need_dh, need_dw,
                             need_db, filter_eps=filter_eps, targets=targets,
                             stats_block_n=stats_block_n,
                             extra_itemsize=torch.finfo(dz_dtype(hidden)).bits // 8
                             if autotuning else 0,
                             logit_hidden=(hidden,) if gemm else ())


# --------------------------------------------------------------------------------------------
# autograd (registered on torch.library custom ops so torch.compile sees one opaque node)
# --------------------------------------------------------------------------------------------


class LinearLogprobsFunction:
    """The autograd formula of ``tisdpo::linear_logprobs_fwd``, registered with
    ``torch.library.register_autograd`` (a custom op rather than a torch.autograd.Function so
    that torch.compile traces it as one node instead of breaking the graph on the launcher).
    Only the inputs that need a gradient get kernel work."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, targets, bias, ignore_index, softcap, filter_eps = inputs
        ctx.save_for_backward(hidden, weight, targets, bias, output[1])
        ctx.ignore_index, ctx.softcap, ctx.filter_eps = ignore_index, softcap, filter_eps

    @staticmethod
    @first_order("linear_logprobs")
    def backward(ctx, g_logp, g_lse):
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        need_dh, need_dw, _, need_db = ctx.needs_input_grad[:4]
        need_db = need_db and bias is not None
        if not (need_dh or need_dw or need_db):
            return None, None, None, None, None, None, None
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse
        dh, dw, db = _ops()[1](g_logp, g_lse, hidden, weight, targets, bias, lse,
                               ctx.ignore_index, ctx.softcap, need_dh, need_dw, need_db,
                               ctx.filter_eps)
        return (dh if need_dh else None, dw if need_dw else None, None,
                db if need_db else None, None, None, None)


_OPS: tuple = ()


def _ops():
    """The custom ops (forward op, backward op), registered on first use, never at import.
    (A plain global, not functools.cache, so torch.compile traces the lookup cleanly.)"""
    global _OPS
    if not _OPS:
        _OPS = _register_ops()
    return _OPS


def _register_ops():
    @torch.library.custom_op("tisdpo::linear_logprobs_fwd", mutates_args=())
    def fwd_op(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
               ignore_index: int, softcap: Optional[float],
               filter_eps: Optional[float]) -> tuple[Tensor, Tensor]:
        return linear_logprobs_fwd(hidden, weight, targets, bias, ignore_index, softcap)

    @fwd_op.register_fake
    def _(hidden, weight, targets, bias, ignore_index, softcap, filter_eps):
        n = hidden.shape[0]
        return (hidden.new_empty(n, dtype=torch.float32),
                hidden.new_empty(n, dtype=torch.float32))

    @torch.library.custom_op("tisdpo::linear_logprobs_bwd", mutates_args=())
    def bwd_op(g_logp: Tensor, g_lse: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor,
               bias: Optional[Tensor], lse: Tensor, ignore_index: int, softcap: Optional[float],
               need_dh: bool, need_dw: bool, need_db: bool,
               filter_eps: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
        dh, dw, db = linear_logprobs_bwd(g_logp, g_lse, hidden, weight, targets, bias, lse,
                                         ignore_index, softcap, need_dh, need_dw, need_db,
                                         filter_eps)
        empty = hidden.new_empty(0)   # custom ops cannot return None: unrequested = empty
        return (empty if dh is None else dh, empty.clone() if dw is None else dw,
                empty.clone() if db is None else db)

    @bwd_op.register_fake
    def _(g_logp, g_lse, hidden, weight, targets, bias, lse, ignore_index, softcap,
          need_dh, need_dw, need_db, filter_eps):
        return (torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
                torch.empty_like(weight) if need_dw else hidden.new_empty(0),
                torch.empty_like(bias) if need_db and bias is not None else hidden.new_empty(0))

    fwd_op.register_autograd(LinearLogprobsFunction.backward,
                             setup_context=LinearLogprobsFunction.setup_context)
    return fwd_op, bwd_op


# --------------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------------


def linear_logprobs(hidden, weight, targets, bias, opts):
    """Backend entry (see ``tisdpo_kernels.ops``): hidden [N, D], weight [V, D], targets [N]
    int64, bias [V] or None, opts: ``HeadOptions`` -> (logp [N], lse [N]) float32, 0 where
    ignored; differentiable in hidden, weight and bias through both outputs.

        logp_t = z_t[y_t] − logsumexp(z_t),  z_t = softcap(W h_t + b)
    """
    check_dtype("linear_logprobs", "hidden", hidden)
    check_dtype("linear_logprobs", "weight", weight)
    if bias is not None:
        check_dtype("linear_logprobs", "bias", bias)
    if weight.shape[0] == 0:
        raise ValueError("linear_logprobs: weight has V=0 rows; the vocabulary must be non-empty")
    return _ops()[0](hidden, weight, targets, bias, opts.ignore_index, opts.softcap,
                     opts.filter_eps)
