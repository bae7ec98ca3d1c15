"""Shared Triton helpers for the kernels (linear_logprobs.py, linear_token_kl.py, ...).

@triton.jit helpers first (they inline into the caller), then small host-side helpers.
Conventions every helper follows:

- ``UPCAST`` (constexpr) is true only under the Triton interpreter with 16-bit inputs: the
  interpreter computes bf16 ``tl.dot``/adds on raw bits, so tiles are cast to fp32 right after
  ``tl.load``. On a GPU it is false and ``tl.dot`` runs on bf16/fp16 tensor cores.
- ``DOT_PRECISION`` (constexpr) is "ieee" or "tf32"; it only matters for fp32 inputs and
  follows ``torch.get_float32_matmul_precision()`` (see :func:`dot_precision`).
- Statistics (max, sum-exp, lse, softmax) are always fp32.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tisdpo_kernels import _env
from tisdpo_kernels._triton import configs

# --------------------------------------------------------------------------------------------
# @triton.jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def tanh(x):
    """tanh in fp32, accurate to ~2 ulp, portable (libdevice is unavailable when interpreting).

    |x| < 0.4: odd Taylor polynomial (9 terms, truncation < 1e-10 relative); otherwise
    sign(x)·(1 − e)/(1 + e) with e = exp(−2|x|), which has no cancellation there.
    """
    ax = tl.abs(x)
    x2 = x * x
    p = 0.000590027440945586
    p = p * x2 - 0.0014558343870513183
    p = p * x2 + 0.003592128036572481
    p = p * x2 - 0.008863235529902197
    p = p * x2 + 0.021869488536155203
    p = p * x2 - 0.05396825396825397
    p = p * x2 + 0.13333333333333333
    p = p * x2 - 0.3333333333333333
    p = p * x2 + 1.0
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.4, x * p, big)


@triton.jit
def softcap_fwd(z, cap):
    """Logit softcap (Gemma): cap · tanh(z / cap)."""
    return cap * tanh(z / cap)


@triton.jit
def softcap_grad(zc, cap):
    """d softcap(z)/dz from the capped value zc = cap·tanh(z/cap): 1 − (zc/cap)²."""
    t = zc / cap
    return 1.0 - t * t


@triton.jit
def load_tile(ptr, offs_r, offs_c, stride_r, stride_c, mask_r, mask_c, UPCAST: tl.constexpr):
    """[R, C] tile ptr[offs_r, offs_c] (0 outside the masks), fp32 when UPCAST."""
    offs_r = offs_r.to(tl.int64)
    x = tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
                mask=mask_r[:, None] & mask_c[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def logits_tile(h_ptr, w_ptr, rows, cols, col0, row_mask, col_mask, D,
                stride_hn, stride_hd, stride_wv, stride_wd,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] = hidden[rows] @ weight[cols]ᵀ, looping over D in BLOCK_D steps.

    ``rows`` / ``cols`` are index vectors (rows may be a gathered, non-contiguous set); rows or
    columns outside their mask contribute 0. The columns are col0 .. col0 + BLOCK_V. TMA:
    ``w_ptr`` is a tensor descriptor of the weight with block [BLOCK_V, BLOCK_D] (Hopper's bulk
    tensor copies; zeros past V and D), else a pointer. The hidden rows are a gather, which a
    tiled descriptor cannot express, so they are always pointer loads.
    """
    offs_d = tl.arange(0, BLOCK_D)
    rows = rows.to(tl.int64)   # N·D and V·D may exceed 2^31 elements
    h_ptrs = h_ptr + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd   # [BN, BD]
    if not TMA:
        w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wv + offs_d[:, None] * stride_wd
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_D)):
        d_mask = offs_d < D - k * BLOCK_D
        h = tl.load(h_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if TMA:
            w = w_ptr.load([col0, k * BLOCK_D]).T                               # [BD, BV]
        else:
            w = tl.load(w_ptrs, mask=d_mask[:, None] & col_mask[None, :], other=0.0)
            w_ptrs += BLOCK_D * stride_wd
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_D * stride_hd
    return acc


@triton.jit
def head_logits(h_ptr, w_ptr, b_ptr, rows, cols, col0, row_mask, col_mask, D,
                stride_hn, stride_hd, stride_wv, stride_wd, stride_b, cap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """The head's fp32 logit tile softcap(hidden[rows] @ weight[cols]ᵀ + bias[cols]), cols =
    col0 + arange(BLOCK_V) (``w_ptr`` a descriptor when TMA: :func:`logits_tile`).

    Columns outside ``col_mask`` hold garbage-free finite values (bias 0): mask them before any
    reduction (use :func:`mask_cols`).
    """
    z = logits_tile(h_ptr, w_ptr, rows, cols, col0, row_mask, col_mask, D,
                    stride_hn, stride_hd, stride_wv, stride_wd,
                    BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION, TMA)
    return _bias_softcap(z, b_ptr, cols, col_mask, stride_b, cap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def given_logits(z_ptr, local, cols, row_mask, col_mask, stride_z, b_ptr, stride_b, cap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """:func:`head_logits` from logits a GEMM already wrote (``TISDPO_HEAD_LOGITS=gemm``):
    the fp32 tile softcap(z[local, cols] + bias[cols]) of a [C, V] matrix z (the head's
    h·Wᵀ without bias) with row stride ``stride_z``; 0 + bias outside ``row_mask``, so rows a
    mask leaves out never read what they hold (NaN padding included)."""
    z = load_tile(z_ptr, local, cols, stride_z, 1, row_mask, col_mask, True)   # fp32
    return _bias_softcap(z, b_ptr, cols, col_mask, stride_b, cap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def _bias_softcap(z, b_ptr, cols, col_mask, stride_b, cap,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    if HAS_BIAS:
        b = tl.load(b_ptr + cols * stride_b, mask=col_mask, other=0.0).to(tl.float32)
        z += b[None, :]
    if HAS_SOFTCAP:
        z = softcap_fwd(z, cap)
    return z


@triton.jit
def store_tile(ptr, x, row0, col0, n_rows, n_cols, stride,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TMA: tl.constexpr):
    """x [BLOCK_R, BLOCK_C] into rows row0.. and columns col0.. of an [n_rows, n_cols] matrix,
    in its dtype, nothing outside it. TMA: ``ptr`` is a tensor descriptor with that block (a
    bulk tensor store, clipped by the descriptor's shape), else a pointer with row stride
    ``stride``."""
    if TMA:
        ptr.store([row0, col0], x.to(ptr.dtype))
    else:
        r = row0 + tl.arange(0, BLOCK_R)
        c = col0 + tl.arange(0, BLOCK_C)
        tl.store(ptr + r.to(tl.int64)[:, None] * stride + c[None, :],
                 x.to(ptr.dtype.element_ty), mask=(r < n_rows)[:, None] & (c < n_cols)[None, :])


@triton.jit
def mask_cols(z, col_mask):
    """−inf outside the valid vocabulary columns (so they vanish from max and sum-exp)."""
    return tl.where(col_mask[None, :], z, float("-inf"))


@triton.jit
def online_lse_step(m, s, z):
    """One online-logsumexp update with a tile z [BN, BV] (masked columns = −inf).

    m: running max [BN] (start at −inf), s: running Σ exp(z − m) [BN] (start at 0). Each tile
    must contain at least one finite column, so the new max is finite and exp(m − m_new) is 0
    on the first tile. Returns (m_new, s_new); lse = m + log(s) at the end.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    s_new = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    return m_new, s_new


@triton.jit
def gather_cols(z, cols, target):
    """z[i, target[i]] when target[i] is among ``cols``, else 0: Σ_j where(cols_j == t_i, z_ij)."""
    return tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)


@triton.jit
def grouped_tile(pid, N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 GROUP_N: tl.constexpr):
    """(token block, vocab block) of program ``pid`` in grouped order: GROUP_N token blocks ×
    all vocab blocks, token block fastest, so programs running together share weight tiles in
    L2."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_pid_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    return pid_n, pid_v


@triton.jit
def split_rows(pid, NUM_SPLITS, rows_ptr, count_ptr, t_ptr, stride_t, V,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """A forward program's work: its token block's kept rows and its vocabulary split.

    Splits of one token block are adjacent programs. Returns (split, slots, row_mask, rows,
    targets, v_lo, v_hi, n_tiles): ``slots`` are positions in the packed row list
    (``compact_rows``), [v_lo, v_hi) the split's columns, n_tiles 0 when the block keeps no row.
    """
    pid_n = pid // NUM_SPLITS
    split = pid % NUM_SPLITS
    count = tl.load(count_ptr)
    slots = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = slots < count
    rows = tl.load(rows_ptr + slots, mask=row_mask, other=0)
    tgt = tl.load(t_ptr + rows * stride_t, mask=row_mask, other=-1)
    tiles = tl.cdiv(tl.cdiv(V, BLOCK_V), NUM_SPLITS)
    v_lo = split * tiles * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles * BLOCK_V, V)
    n_tiles = tl.maximum(tl.cdiv(v_hi - v_lo, BLOCK_V), 0)
    n_tiles = tl.where(pid_n * BLOCK_N < count, n_tiles, 0)
    return split, slots, row_mask, rows, tgt, v_lo, v_hi, n_tiles


# --------------------------------------------------------------------------------------------
# host helpers
# --------------------------------------------------------------------------------------------


def interpreting(t: torch.Tensor) -> bool:
    """True when this tensor's kernels run under the Triton interpreter (a CPU tensor)."""
    return t.device.type != "cuda"


def upcast(*tensors: torch.Tensor | None) -> bool:
    """The UPCAST constexpr: any of ``tensors`` interpreted and 16-bit (the interpreter's
    bf16 math is wrong, and its float -> 16-bit casts truncate)."""
    return any(t is not None and interpreting(t) and t.dtype in (torch.bfloat16, torch.float16)
               for t in tensors)


def f64_constants(values, device: torch.device) -> torch.Tensor:
    """A float64 tensor of ``values`` on ``device``; on CUDA an async copy from pinned memory
    (kernel parameters that must stay float64: Triton passes Python floats as float32)."""
    if device.type == "cuda":
        return torch.tensor(values, dtype=torch.float64, pin_memory=True).to(
            device, non_blocking=True)
    return torch.tensor(values, dtype=torch.float64, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """DOT_PRECISION for ``dtype``: fp32 dots follow torch's float32 matmul precision."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """Triton kernels take fp32/bf16/fp16; float64 is for impl='torch' or 'reference'."""
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"{op}: impl='triton' supports float32, bfloat16 and float16 {name}, got {t.dtype}; "
            f"use impl='torch' or impl='reference' for {t.dtype}")


def check_blocks(op: str, **blocks: int) -> None:
    """Block sizes must be powers of two >= 16 (tl.dot's minimum on a GPU)."""
    for name, b in blocks.items():
        assert b >= 16 and (b & (b - 1)) == 0, f"{op}: {name}={b} must be a power of two >= 16"


def compact_rows(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A permutation of the rows with the kept ones first (in order), and their count; no sync.

    keep: bool [N]. Returns (rows [N] int64, count [1] int32 on the device): rows[:count] are
    the kept row ids. Kernels read ``count`` and give programs past it no work, so ignored
    rows cost (almost) nothing. Every slot is written once: no duplicate scatter indices.
    """
    n = keep.shape[0]
    if n == 0:
        return (torch.zeros(0, dtype=torch.int64, device=keep.device),
                torch.zeros(1, dtype=torch.int32, device=keep.device))
    kept_before = torch.cumsum(keep.to(torch.int64), 0)          # kept rows in [0, i]
    count = kept_before[-1:]
    idx = torch.arange(n, dtype=torch.int64, device=keep.device)
    # kept row i -> slot kept_before[i] − 1; dropped row i -> count + (dropped rows before i)
    dest = torch.where(keep, kept_before - 1, count + idx - kept_before)
    rows = torch.empty(n, dtype=torch.int64, device=keep.device).scatter_(0, dest, idx)
    return rows, count.to(torch.int32)


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (a no-op context for CPU tensors)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# A TMA box holds at most 256 elements per dimension.
TMA_MAX_BOX = 256


def tma(t: torch.Tensor, *tiled: torch.Tensor) -> bool:
    """The TMA constexpr of a head kernel launched on ``t``'s device that reads the matrices
    ``tiled`` (its weights) by tiles: ``TISDPO_TMA`` allows it (``auto``: Hopper or newer) and
    every one's layout fits a tensor descriptor (unit inner stride, 16-byte aligned base and
    row stride, rows apart: not an expanded, stride-0 view; non-empty). Otherwise the kernels use pointers. (The backward's dz slab always
    fits: ``slabs.dz_slab`` allocates it so.)"""
    mode = _env.tma()
    if mode == "off" or (mode == "auto" and not (
            t.device.type == "cuda" and torch.cuda.get_device_capability(t.device)[0] >= 9)):
        return False
    return all(w.dim() == 2 and w.numel() > 0 and w.stride(1) == 1 and w.stride(0) > 0
               and (w.stride(0) * w.element_size()) % 16 == 0 and w.data_ptr() % 16 == 0
               for w in tiled)


def _descriptor(w: torch.Tensor, block_shape: list) -> TensorDescriptor:
    return TensorDescriptor(w, list(w.shape), list(w.stride()), block_shape)


def _set_block_shapes(descriptors: tuple):
    """An autotune pre-hook: size each descriptor argument's block to the config's blocks."""
    def hook(nargs):
        for arg, keys in descriptors:
            if isinstance(nargs[arg], TensorDescriptor):
                nargs[arg].block_shape = [nargs[k] for k in keys]
    return hook


@functools.cache
def _autotuned(name: str, fn, key: tuple, reset_to_zero: tuple, descriptors: tuple = ()):
    """The autotuned variant of a kernel (TISDPO_AUTOTUNE=1 on a GPU), built on first use."""
    hook = _set_block_shapes(descriptors) if descriptors else None
    return triton.autotune([c.triton_config(pre_hook=hook) for c in configs.AUTOTUNE[name]],
                           key=list(key), reset_to_zero=list(reset_to_zero) or None)(fn)


def launch(name: str, fn, grid_of, t: torch.Tensor, args: tuple, flags: dict, *,
           autotune_key: tuple, reset_to_zero: tuple = (), descriptors: tuple = ()) -> None:
    """Run kernel ``fn`` with its configured blocks (configs.get(name, t)), or its autotuned
    variant when autotuning; grid_of(meta) -> grid.

    ``descriptors``: (argument name, (block keys...)) pairs. When ``flags["TMA"]`` is set,
    each such argument (a tensor in ``args``) is passed as a tensor descriptor whose block is
    the config's values of those keys; a config whose blocks exceed a TMA box runs with TMA
    off.
    """
    autotuning = configs.autotuning(t)
    cfg = None if autotuning else configs.get(name, t)
    if cfg is not None:
        check_blocks(name, **{k: v for k, v in cfg.meta.items() if k.startswith("BLOCK")})
    tma_on = bool(descriptors) and flags.get("TMA", False) and (cfg is None or all(
        cfg.meta[k] <= TMA_MAX_BOX for _, keys in descriptors for k in keys))
    if flags.get("TMA", False) and not tma_on:
        flags = {**flags, "TMA": False}
    if tma_on:       # autotuning: each config's pre-hook sizes the blocks
        at = {n: i for i, n in enumerate(fn.arg_names)}
        args = list(args)
        for arg, keys in descriptors:
            block = [cfg.meta[k] if cfg is not None else 16 for k in keys]
            args[at[arg]] = _descriptor(args[at[arg]], block)
    if autotuning:
        _autotuned(name, fn, autotune_key, reset_to_zero, descriptors if tma_on else ())[
            lambda meta: grid_of(meta)](*args, **flags)
        return
    fn[grid_of(cfg.meta)](*args, **flags, **cfg.meta, **cfg.launch_kwargs(t))


def num_splits(cfg, t: torch.Tensor, N: int, V: int) -> int:
    """Vocabulary splits: ≥ min_splits, and enough programs to fill the GPU twice over."""
    n_blocks = triton.cdiv(N, cfg.meta["BLOCK_N"])
    n_vtiles = triton.cdiv(V, cfg.meta["BLOCK_V"])
    want = cfg.host.get("min_splits", 1)
    if t.device.type == "cuda":
        sms = torch.cuda.get_device_properties(t.device).multi_processor_count
        want = max(want, triton.cdiv(2 * sms, n_blocks))
    return max(1, min(want, n_vtiles))
