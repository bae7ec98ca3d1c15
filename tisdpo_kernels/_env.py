"""Every environment variable the kernels read is parsed here (and listed in the README); the
training side's torchrun variables are parsed by ``tisdpo.train.parallel.torchrun_env``.

Read at call time, never at import time, so tests and users may set them late.
"""
from __future__ import annotations

import os

# megabytes of the dz budget when TISDPO_DZ_MB is unset
DZ_MB_DEFAULT = 1024

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected one of 0/1/true/false")


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw!r}: must be >= {minimum}")
    return value


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: run Triton kernels on the CPU through Triton's interpreter."""
    return _flag("TRITON_INTERPRET", False)


def autotune() -> bool:
    """TISDPO_AUTOTUNE=1: search kernel configs instead of using the one tuned config."""
    return _flag("TISDPO_AUTOTUNE", False)


def tma() -> str:
    """TISDPO_TMA: how the fused head kernels load weight tiles and store the backward's dz
    tiles. ``auto`` (default): Hopper's bulk tensor copies (TMA) on sm_90 and newer, pointers
    elsewhere; ``1``: TMA wherever the weight's layout allows (under the interpreter too,
    which emulates it); ``0``: never.
    """
    raw = os.environ.get("TISDPO_TMA", "auto")
    value = raw.strip().lower()
    if value in ("auto", ""):
        return "auto"
    if value in _TRUE:
        return "on"
    if value in _FALSE:
        return "off"
    raise ValueError(f"environment variable TISDPO_TMA={raw!r}: expected auto, 0 or 1")


def head_logits() -> str:
    """TISDPO_HEAD_LOGITS: who computes the logit tiles of the Triton ``linear_logprobs`` and
    ``linear_token_kl``. ``fused`` (default): the head kernels, as tiles of their own GEMM
    that are never stored; ``gemm``: the framework's GEMM (cuBLAS on CUDA) writes them, a
    slab at a time into the dz slab's budget (``TISDPO_DZ_MB``; the KL head's two
    heads share it), in the input dtype as eager rounds them, and the same kernels read them
    back instead of multiplying.
    """
    raw = os.environ.get("TISDPO_HEAD_LOGITS", "fused")
    value = raw.strip().lower() or "fused"
    if value not in ("fused", "gemm"):
        raise ValueError(f"environment variable TISDPO_HEAD_LOGITS={raw!r}: expected fused or "
                         f"gemm")
    return value


def torch_chunk_tokens(vocab: int) -> int:
    """TISDPO_CHUNK_TOKENS: tokens per chunk in the torch backend (chunk x V logits at most);
    when set, also the Triton one-sweep head's (unset, that head fills ``TISDPO_DZ_MB``).

    Unset, the chunk is sized from the vocabulary so one fp32 chunk x V buffer is about
    256 MB (2048 tokens up to V = 32768; 523 at V = 128256), and at least 16 tokens.
    """
    default = max(16, min(2048, (1 << 26) // max(vocab, 1)))
    return _int("TISDPO_CHUNK_TOKENS", default)


def chunk_tokens_set() -> bool:
    """Whether TISDPO_CHUNK_TOKENS is set (the Triton one-sweep head then takes its chunks
    from it instead of from ``TISDPO_DZ_MB``)."""
    return os.environ.get("TISDPO_CHUNK_TOKENS", "").strip() != ""


def one_sweep_min_tokens() -> int:
    """TISDPO_ONE_SWEEP_MIN_TOKENS: the tokens per pair (chosen + rejected, padding included)
    from which ``TISDPOLoss(strategy="auto")`` uses the one-sweep head on CUDA for pairs longer
    than one chunk of its sweep (pairs that fit a chunk need no fold and always qualify).

    Default 2048: folding a long pair's [V, D] float32 gradient into d_weight moves about
    12·V·D bytes and saves 2·T·D·V flops, so it pays above T ≈ 6·(flop/s)/(bytes/s) — about
    1.4k tokens on an H100 (≈ 790 TFLOP/s bf16, 3.35 TB/s), 1.0k on an H200 (4.8 TB/s), from
    the spec sheets; 2048 leaves a margin.
    """
    return _int("TISDPO_ONE_SWEEP_MIN_TOKENS", 2048)


def dz_budget_bytes() -> int:
    """TISDPO_DZ_MB: megabytes for one dz slab of the Triton backward (C rows x V logits, or
    all N rows x a band of columns together with the band loop's [N, D] buffers).

    Default 1024: at V = 128256 in bf16 that is 4176 rows per chunk; a batch that fits is
    one slab (its gradients are written in the parameters' dtype directly).
    """
    return _int("TISDPO_DZ_MB", DZ_MB_DEFAULT) << 20


def value_checks() -> str:
    """TISDPO_CHECKS: how data-dependent input checks run.

    ``auto`` (default): full ValueError checks on CPU tensors; on CUDA an asynchronous
    device assertion (no host sync). ``full``: ValueError checks everywhere (one host sync
    per call on CUDA). ``off``: shape and dtype checks only.
    """
    raw = os.environ.get("TISDPO_CHECKS", "").strip().lower() or "auto"
    if raw not in {"auto", "full", "off"}:
        raise ValueError(f"environment variable TISDPO_CHECKS={raw!r}: expected auto, full or off")
    return raw


def check_all() -> None:
    """Parse every variable above, so a bad value is a ValueError naming it on any machine,
    not only where the code path that reads it runs (a GPU's)."""
    for parse in (triton_interpret, autotune, tma, head_logits, one_sweep_min_tokens,
                  dz_budget_bytes, value_checks):
        parse()
    torch_chunk_tokens(1)
