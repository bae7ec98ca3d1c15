"""Which way a preference loss computes its head gradients (docs/ONE_SWEEP.md).

- ``"recompute"``: per-token log-probs (and KL) in the forward, logits recomputed in the
  backward — forward 2·N·D·V flops, backward 6·N·D·V (plus 2·N·D′·V per pass for a reference
  head); works for every preset and every impl.
- ``"one_sweep"``: ``linear_preference_loss`` — every head gradient formed in the forward
  (6·N·D·V), the backward only scales them; for presets whose loss is a sum of per-pair terms.
- ``"auto"``: one_sweep only where it pays (the rule of :func:`choose_strategy`), else
  recompute.
"""
from __future__ import annotations

import torch

from tisdpo_kernels import _env
from tisdpo_kernels._common import sweep_rows
from tisdpo_kernels._impl import triton_available
from tisdpo_kernels.config import PreferenceConfig

__all__ = ["STRATEGIES", "one_sweep_unsupported", "choose_strategy", "device_free_bytes",
           "sweep_chunk_rows", "one_sweep_bytes"]

STRATEGIES = ("auto", "one_sweep", "recompute")


def one_sweep_unsupported(config: PreferenceConfig) -> str | None:
    """Why the one-sweep head cannot compute this loss, or None when it can."""
    if config.granularity != "seq":
        return ("its loss is a mean of per-position links (granularity='pos'), not a sum of "
                "per-pair terms ℓ(z_b), so a token's gradient has no single per-pair scalar")
    return None


FLOAT16_REASON = (
    "float16 gradients formed in the forward are rounded before the upstream gradient (a "
    "GradScaler's loss scale) reaches them, so the small ones lose precision or flush to "
    "zero; use bfloat16 or strategy='recompute' (which applies the scale first)")


def device_free_bytes(device: torch.device) -> int | None:
    """Bytes a CUDA device can still hand out (driver-free plus what PyTorch's caching
    allocator holds unused); None off CUDA. A driver query, not a stream synchronisation."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def sweep_chunk_rows(tokens: int, vocab: int, itemsize: int | None = None) -> int:
    """Rows per chunk of the one-sweep head: the torch backend's ``TISDPO_CHUNK_TOKENS``
    (``itemsize`` None); the Triton backend's from the ``TISDPO_DZ_MB`` budget at ``itemsize``
    bytes per logit, every [C, V] buffer its chunk holds (``chunk_itemsize`` of the Triton
    head), or ``TISDPO_CHUNK_TOKENS`` when set."""
    if itemsize is not None:
        return sweep_rows(tokens, vocab, itemsize)
    return _env.torch_chunk_tokens(vocab)


def one_sweep_bytes(tokens: int, num_pairs: int, vocab: int, dim: int, elem: int,
                    itemsize: int | None = None) -> int:
    """Bytes the one-sweep head allocates: d_hidden; the float32 d_weight sum, and a second
    [V, D] buffer when two or more pairs are longer than a chunk (mean pair length); the
    chunk × V buffers: ~6 float32 ones for the torch backend, ``itemsize`` bytes per logit
    for the Triton one (``sweep_chunk_rows``)."""
    rows = sweep_chunk_rows(tokens, vocab, itemsize)
    long_pairs = num_pairs if tokens > rows * num_pairs else 0
    scratch = 2 if long_pairs >= 2 else 1
    chunk_bytes = rows * vocab * (4 * 6 if itemsize is None else itemsize)
    return tokens * dim * elem + scratch * vocab * dim * 4 + chunk_bytes


def _triton_itemsize(hidden, ref_hidden) -> int:
    from tisdpo_kernels._triton.linear_preference_loss import chunk_itemsize
    return chunk_itemsize(hidden, ref_hidden)


def choose_strategy(strategy: str, config: PreferenceConfig, *, hidden, weight, bias=None,
                    impl: str = "auto", seq_offsets=None, pairs=None, ref_hidden=None) -> str:
    """``"one_sweep"`` or ``"recompute"`` for one call (shapes and host metadata only).

    ``"one_sweep"`` asked for a preset it cannot compute raises ValueError saying why.
    ``"one_sweep"`` with float16 hidden states and a gradient wanted raises too
    (``FLOAT16_REASON``).
    ``"auto"`` picks one_sweep only when all hold: the preset is a sum of per-pair terms; a
    gradient is wanted; the hidden states are not float16; the tensors are on CUDA (on CPU the trade-off is not measured, so auto
    stays with recompute); impl is "auto", "triton" or "torch" (each has a one-sweep backend:
    cuBLAS GEMMs with a Triton epilogue, or with torch elementwise ops; "reference" is the
    materialising oracle, never a sweep); the mean tokens per pair (chosen +
    rejected, padding included) fit one chunk of the sweep (:func:`sweep_chunk_rows`: such a
    pair's gradients go straight into the sums) or reach ``TISDPO_ONE_SWEEP_MIN_TOKENS`` (2048:
    see ``_env.one_sweep_min_tokens`` for the trade-off of folding a longer pair's [V, D]
    buffer); a packed layout's
    ``seq_offsets`` and ``pairs`` are CPU tensors (the sweep's schedule is read on the host)
    and no sequence is in two pairs; and the device has the memory the sweep allocates.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy={strategy!r}; valid choices are {list(STRATEGIES)}")
    why = one_sweep_unsupported(config)
    if strategy == "one_sweep" and why is not None:
        raise ValueError(f"strategy='one_sweep' cannot compute this loss: {why}; use "
                         f"strategy='recompute' or 'auto'")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if strategy == "one_sweep" and needs_grad and hidden.dtype == torch.float16:
        raise ValueError(f"strategy='one_sweep' with float16 hidden states: {FLOAT16_REASON}")
    if strategy != "auto":
        return strategy
    if why is not None or not needs_grad or hidden.device.type != "cuda" \
            or hidden.dtype == torch.float16 or impl not in ("auto", "triton", "torch"):
        return "recompute"
    packed = seq_offsets is not None or pairs is not None
    if packed:
        if pairs is None or seq_offsets is None or pairs.device.type != "cpu" \
                or seq_offsets.device.type != "cpu":
            return "recompute"
        num_pairs = pairs.shape[0]
        if torch.unique(pairs.reshape(-1)).numel() != pairs.numel():
            return "recompute"
    else:
        num_pairs = hidden.shape[0] // 2
    tokens = hidden.numel() // hidden.shape[-1]
    triton = impl in ("auto", "triton") and triton_available()
    vocab, elem = weight.shape[0], hidden.element_size()
    itemsize = _triton_itemsize(hidden, ref_hidden) if triton else None
    # a pair that fits a chunk costs no per-pair fold; a longer one pays from the threshold on
    fits = tokens <= sweep_chunk_rows(tokens, vocab, itemsize) * num_pairs
    if num_pairs < 1 or not (fits or tokens >= _env.one_sweep_min_tokens() * num_pairs):
        return "recompute"
    need = one_sweep_bytes(tokens, num_pairs, vocab, weight.shape[1], elem, itemsize)
    free = device_free_bytes(hidden.device)
    return "one_sweep" if free is not None and free >= need else "recompute"
