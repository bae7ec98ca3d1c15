"""Rules both backends share unchanged (the torch and the Triton backend import this module; they
never import each other).

- ``stat_dtype``: float64 inputs stay float64, everything else computes its statistics and
  per-token outputs in float32.
- ``normalizer_tensor``: the preference loss's normaliser as a device tensor (no host sync).
  (Its pair checks run in the public op: ``validate.check_packed_pairs``.)
- ``per_sequence_weights``: the rank_based / binary token weights within each sequence, by
  two stable sorts (no host sync); the Triton backend computes the scores with its kernel and
  ranks them here, since a segmented-sort kernel would not pay at these sizes.
- ``addmm_f32_`` / ``mm_f32``: a float32 gradient accumulator += (or =) a product of 16-bit
  operands, on tensor cores with fp32 accumulation on a GPU.
- The token-chunk helpers of the chunked head code (``chunk_size``, ``dz_chunk_rows``,
  ``sweep_rows``, ``chunks``, ``no_autocast``, ``valid_and_safe``, ``masked``, ``kept_rows``) and the
  preference links ``link_loss``: the one-sweep head's sweep (``_one_sweep.py``) runs them for
  either backend.
- ``kept_columns``: the vocabulary columns an opt-in filtered backward keeps for one chunk of
  rows (``filter_eps``, docs/FILTERING.md).
"""
from __future__ import annotations

import contextlib
import functools
import itertools

import torch
import torch.nn.functional as F

from tisdpo_kernels import _env
from tisdpo_kernels import validate as V
from tisdpo_kernels.config import PreferenceConfig, WeightParams

__all__ = ["stat_dtype", "normalizer_tensor", "per_sequence_weights", "addmm_f32_", "mm_f32",
           "kept_columns", "chunk_size", "dz_chunk_rows", "sweep_rows", "chunks", "no_autocast",
           "valid_and_safe", "masked", "kept_rows", "link_loss"]

_F64 = torch.float64


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of softmax statistics and per-token outputs for inputs of ``dtype``."""
    return _F64 if dtype == _F64 else torch.float32


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b for a float32 ``acc``. bf16/fp16 operands on a GPU go through cuBLAS with
    fp32 accumulation straight into ``acc`` (``aten::addmm.dtype_out``: tensor cores, no fp32
    copy of the operands); anything else is a float32 GEMM."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype \
            and hasattr(torch.ops.aten.addmm, "dtype_out"):
        return torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def mm_f32(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b as a new ``dtype`` (float32 or float64) tensor: what ``addmm_f32_`` adds, without
    reading (or first zeroing) an accumulator. bf16/fp16 operands on a GPU: cuBLAS with fp32
    accumulation (``aten::mm.dtype``); anything else: a GEMM in ``dtype``."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype \
            and dtype == torch.float32 and hasattr(torch.ops.aten.mm, "dtype"):
        return torch.ops.aten.mm.dtype(a, b, torch.float32)
    return a.to(dtype) @ b.to(dtype)


def accumulate_mm(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """acc + a @ b in place (``addmm_f32_``), or, when acc is None, a new ``dtype`` sum that
    the GEMM writes (``mm_f32``): the first of several products needs no zero-filled sum."""
    return mm_f32(a, b, dtype) if acc is None else addmm_f32_(acc, a, b)


def kept_columns(col_max_p: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor,
                 eps: float) -> torch.Tensor | None:
    """Indices [K] of the vocabulary columns a filtered backward keeps for one chunk of rows,
    or None when the chunk should run unfiltered.

    col_max_p [V]: the largest softmax probability of each column over the chunk's rows;
    targets [C]: the rows' target ids (any valid id where ``counts`` is false), counts [C]
    bool: the rows that count. A column is kept when a counted row targets it or its
    probability reaches ``eps`` in some row; a dropped column's terms are each below eps times
    their row's p-coefficient. One host sync (the GEMMs are sized by K). A chunk keeping more
    than half the vocabulary runs unfiltered: the gathered copies would cost more memory than
    the skipped work is worth.
    """
    hits = torch.zeros(col_max_p.shape, dtype=torch.int32, device=col_max_p.device)
    hits.index_put_((targets,), counts.to(torch.int32), accumulate=True)   # integer: exact
    cols = ((col_max_p >= eps) | (hits > 0)).nonzero().squeeze(1)
    return None if 2 * cols.numel() > col_max_p.numel() else cols


def normalizer_tensor(normalizer, device) -> torch.Tensor | None:
    """``normalizer`` as a float64 0-d tensor on ``device`` (None stays None); no host sync."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        V.require(normalizer.numel() == 1,
                  f"normalizer must be a number or a 1-element tensor, got shape "
                  f"{tuple(normalizer.shape)}")
        norm = normalizer.detach().to(device=device, dtype=_F64).reshape(())
        V.value_check(~(norm > 0) | ~torch.isfinite(norm), lambda b: (
            "normalizer must be finite and > 0" + ("" if b is None else f", got {float(norm)}")))
        return norm
    normalizer = V.check_scalar("normalizer", normalizer, low=0.0, low_open=True)  # numpy too
    return torch.full((), normalizer, dtype=_F64, device=device)


def per_sequence_weights(s, seq_ids, method: str, params: WeightParams):
    """rank_based / binary weights of scores ``s`` [N] float64 within each sequence.

    Tokens with seq_ids < 0 form one extra run whose values the caller discards.
    """
    n_tok = s.numel()
    if n_tok == 0:
        return torch.zeros_like(s)
    valid = seq_ids >= 0
    ids = torch.where(valid, seq_ids, -1)
    s = torch.where(valid, s, 0.0)  # garbage (NaN) outside sequences must not disturb the sort
    by_score = torch.argsort(s, stable=True)
    perm = by_score[torch.argsort(ids[by_score], stable=True)]  # sorted slot j -> token
    sid = ids[perm]
    pos = torch.arange(n_tok, device=s.device)
    new_run = torch.ones(n_tok, dtype=torch.bool, device=s.device)
    new_run[1:] = sid[1:] != sid[:-1]
    start = torch.cummax(torch.where(new_run, pos, 0), dim=0).values
    run = torch.cumsum(new_run, dim=0) - 1
    length = torch.zeros(n_tok, dtype=_F64, device=s.device).index_add_(
        0, run, torch.ones(n_tok, dtype=_F64, device=s.device))[run]
    rank = (pos - start).to(_F64)
    if method == "rank_based":
        # stable order: among ties the earlier position gets the lower rank; n = 1 -> middle
        frac = torch.where(length > 1, rank / (length - 1).clamp(min=1), 0.5)
        w_sorted = params.w_min + frac * (params.w_max - params.w_min)
    elif method == "binary":
        # 1 for the top ceil(n·p/100) scores (at least one); ties at the threshold all get 1
        k = torch.ceil(length * params.top_percent / 100.0).clamp(min=1)
        s_sorted = s[perm]
        thresh = s_sorted[start + (length - k).long()]
        w_sorted = (s_sorted >= thresh).to(_F64)
    else:
        raise ValueError(f"method must be rank_based or binary, got {method!r}")
    return torch.empty_like(s).scatter_(0, perm, w_sorted)


def chunk_size(chunk_tokens: int | None, vocab: int) -> int:
    """Tokens per chunk: ``chunk_tokens`` when given, else ``TISDPO_CHUNK_TOKENS`` or a
    default sized from the vocabulary (see ``_env.torch_chunk_tokens``)."""
    if chunk_tokens is None:
        return _env.torch_chunk_tokens(vocab)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    return chunk_tokens


def dz_chunk_rows(n: int, v: int, itemsize: int) -> int:
    """Rows of one dz slab: ``TISDPO_DZ_MB`` over V·itemsize bytes, a multiple of 16 (at
    least 16), and no more than the n rows there are."""
    rows = max(16, (_env.dz_budget_bytes() // max(v * itemsize, 1)) // 16 * 16)
    return max(1, min(n, rows))


def sweep_rows(n: int, v: int, itemsize: int, chunk_tokens: int | None = None) -> int:
    """Rows per chunk of the Triton one-sweep head: ``chunk_tokens``, else
    ``TISDPO_CHUNK_TOKENS`` when set, else as many as the ``TISDPO_DZ_MB`` budget holds at
    ``itemsize`` bytes per logit (every [C, V] buffer a chunk keeps)."""
    if chunk_tokens is not None or _env.chunk_tokens_set():
        return chunk_size(chunk_tokens, v)
    return dz_chunk_rows(n, v, itemsize)


def chunks(n: int, size: int):
    """(start, end) row ranges covering [0, n), at most ``size`` rows each, balanced.

    ceil(n / size) chunks of near-equal length, so there is no thin tail chunk: BLAS runs
    matrices of a few rows through matrix-vector code that sums the whole reduction
    sequentially (up to ~40x the rounding error of its blocked GEMM at V = 32k).
    From shapes only: no host sync.
    """
    if n == 0:
        return []
    count = -(-n // size)
    bounds = [(i * n) // count for i in range(count + 1)]
    return list(itertools.pairwise(bounds))


def no_autocast(device: torch.device):
    """Both passes compute in the input dtype, whatever autocast the caller has on; so the
    backward's recomputed logits are the forward's. (A device without autocast, such as
    'meta', has nothing to turn off.)"""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def first_order(op: str):
    """Decorates a fused autograd backward, which builds no graph: under ``create_graph=True``
    its gradients would silently count as constants (a gradient penalty through them would
    lose its second-order term), so it refuses that instead. Grad mode is on inside a
    backward exactly when the caller asked for ``create_graph``."""
    def wrap(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{op}: the fused backward is first order and create_graph=True (a double "
                    f"backward) is not supported; use impl='reference' for second derivatives")
            return backward(ctx, *grads)
        return run
    return wrap


def valid_and_safe(targets: torch.Tensor, ignore_index: int):
    """(valid mask [N], targets with ignored entries replaced by 0 [N]); no host sync."""
    valid = targets != ignore_index
    return valid, torch.where(valid, targets, 0)


def masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x where valid, exactly 0 elsewhere (also stops NaN/inf upstream grads of ignored rows)."""
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def kept_rows(h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """h [C, D] with the rows of ignored tokens set to exactly 0 (a dense [C, D] copy, no
    sync), so a NaN/inf hidden state at an ignored position never reaches a GEMM: not a
    gradient GEMM (0·NaN = NaN), and not the logits GEMM either, where some CPU bfloat16
    kernels (oneDNN's AMX path, at some D that are not multiples of 32) read past each
    row, into the next row or a strided view's padding, and let a NaN there into the row's
    logits. The torch backend's and the one-sweep head's GEMMs take hidden rows through here."""
    return torch.where(valid[:, None], h, torch.zeros((), dtype=h.dtype, device=h.device))


def link_loss(z, cfg: PreferenceConfig):
    """ℓ(z) for the config's link (docs/ALGORITHMS.md §8)."""
    b, e = cfg.beta, cfg.epsilon
    if cfg.link == "sigmoid":
        return -F.logsigmoid(b * z)
    if cfg.link == "conservative":
        return -(1 - e) * F.logsigmoid(b * z) - e * F.logsigmoid(-b * z)
    if cfg.link == "robust":
        return (-(1 - e) * F.logsigmoid(b * z) + e * F.logsigmoid(-b * z)) / (1 - 2 * e)
    if cfg.link == "ipo":
        return (z - 1 / (2 * b)) ** 2
    if cfg.link == "hinge":
        return torch.relu(1 - b * z)
    raise ValueError(f"unknown link {cfg.link!r}")
