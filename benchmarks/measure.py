"""Timing, peak memory, counted flops and OOM handling (docs/DESIGN.md §5).

CUDA: CUDA events around each repetition, after warm-up, with the L2 cache flushed and the
gradients of the inputs reset to None before each one (``triton.testing.do_bench`` style, but
with warm-up and repetitions given as counts); median and p20/p80 over the repetitions; peak
memory is ``torch.cuda.max_memory_allocated`` during one call minus what was allocated just
before it. The backward mode times each backward after a fresh, untimed forward.
CPU: ``time.perf_counter`` around each repetition and no memory figure.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

__all__ = [
    "Stats", "FLOP_MODELS", "flop_multiple", "flops", "time_fn", "peak_memory_mb", "guarded",
    "free_memory", "quantile", "env_vars",
]

# Flops as multiples of N·D·V (docs/DESIGN.md §5). "recompute": logits are
# recomputed in backward (CCE, us); "materialise": autograd keeps the logits (eager,
# torch.compile); "grads_in_forward": the gradient GEMMs run inside forward (Liger's chunked
# DPO loss), backward only rescales. The loss and KL ops run a second (reference) head,
# 2·N·D·V in forward, which the loss op skips when its reference log-probs are precomputed.
FLOP_MODELS: dict[tuple[str, str], dict[str, int]] = {
    ("logprobs", "recompute"): {"fwd": 2, "bwd": 6, "fwdbwd": 8},
    ("logprobs", "materialise"): {"fwd": 2, "bwd": 4, "fwdbwd": 6},
    ("logprobs", "grads_in_forward"): {"fwd": 6, "bwd": 0, "fwdbwd": 6},
    ("loss", "recompute"): {"fwd": 4, "bwd": 6, "fwdbwd": 10},
    ("loss", "materialise"): {"fwd": 4, "bwd": 4, "fwdbwd": 8},
    ("loss", "grads_in_forward"): {"fwd": 8, "bwd": 0, "fwdbwd": 8},
    ("kl", "recompute"): {"fwd": 4, "bwd": 8, "fwdbwd": 12},
    ("kl", "materialise"): {"fwd": 4, "bwd": 4, "fwdbwd": 8},
    ("ceiling", "dense"): {"fwd": 2},
}


def flop_multiple(op: str, strategy: str, mode: str) -> int:
    try:
        return FLOP_MODELS[(op, strategy)][mode]
    except KeyError:
        raise ValueError(f"no flop model for op={op!r}, strategy={strategy!r}, "
                         f"mode={mode!r}") from None


def flops(op: str, strategy: str, mode: str, tokens: int, hidden: int, vocab: int, *,
          reference_head: bool = True) -> float:
    """Counted floating-point operations of one call (``reference_head=False``: the loss op
    with precomputed reference log-probs, no reference head forward)."""
    multiple = flop_multiple(op, strategy, mode)
    if op == "loss" and not reference_head and mode != "bwd":
        multiple -= 2
    return float(multiple) * tokens * hidden * vocab


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (as ``torch.quantile``) of a non-empty list."""
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of an empty list")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Milliseconds per call over ``reps`` repetitions."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    @classmethod
    def of(cls, times_ms: list[float]) -> Stats:
        return cls(quantile(times_ms, 0.5), quantile(times_ms, 0.2), quantile(times_ms, 0.8),
                   len(times_ms))


def _clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_fn(fn: Callable, *, device: torch.device, warmup: int, reps: int,
            grad_to_none: Iterable[torch.Tensor] = (), setup: Callable | None = None) -> Stats:
    """Median/p20/p80 time of ``fn()`` in ms, after ``warmup`` untimed calls.

    With ``setup``, each repetition first runs ``state = setup()`` untimed and then times
    ``fn(state)`` (e.g. a fresh forward, then the timed backward).
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    grad_to_none = tuple(grad_to_none)

    def prepare():
        _clear_grads(grad_to_none)
        return (setup(),) if setup is not None else ()

    for _ in range(warmup):
        fn(*prepare())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        # Flush L2 between repetitions (256 MB is larger than any current L2).
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            args = prepare()
            flush.zero_()
            starts[i].record()
            fn(*args)
            ends[i].record()
            del args
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        del flush
    else:
        times = []
        for _ in range(reps):
            args = prepare()
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
            del args
    return Stats.of(times)


def peak_memory_mb(fn: Callable, *, device: torch.device,
                   grad_to_none: Iterable[torch.Tensor] = (),
                   setup: Callable | None = None) -> float | None:
    """Peak allocated memory of one ``fn()`` (or ``fn(setup())``) beyond what was allocated
    just before it, setup's results included (MiB). None off CUDA: the CPU allocator keeps
    no peak statistics."""
    _clear_grads(grad_to_none)
    if device.type != "cuda":
        return None
    args = (setup(),) if setup is not None else ()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn(*args)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, args
    return peak / 2**20


def _is_oom(err: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError",
                                                                   None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    return isinstance(err, (RuntimeError, MemoryError)) and "out of memory" in str(err).lower()


def guarded(fn: Callable[[], object]) -> tuple[str, object]:
    """Run ``fn``; return ("ok", result), ("oom", message) or ("error", message)."""
    try:
        return "ok", fn()
    except Exception as err:  # noqa: BLE001 - a benchmark row records it instead of crashing
        status = "oom" if _is_oom(err) or isinstance(err, MemoryError) else "error"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return status, f"{type(err).__name__}: {first}"[:300]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def env_vars(**values: str):
    """Set environment variables for the duration of the block, then restore the caller's
    values (unset ones are removed again)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
