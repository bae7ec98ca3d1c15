"""Torch backend of ``linear_logprobs``: token-chunked, logits recomputed in the backward.

Forward, per chunk of C tokens: z = softcap(h W^T + b) [C, V], lse = logsumexp(z),
logp = z[y] − lse. Saved for the backward: the inputs and the raw lse [N] (O(N) extras).
Backward, per chunk: recompute z, p = exp(z − lse) and

    dz = g_logp · (onehot(y) − p) + g_lse · p  =  (g_lse − g_logp) · p + g_logp · onehot(y)

(times 1 − tanh² under a softcap), then dH = dz W, dW += dz^T H, db += Σ dz (with
``filter_eps``: over the chunk's kept columns only, ``_common.kept_columns``). Each chunk's
work is a function, so its [C, V] buffers die before the next chunk's are made: neither
pass holds more than a few C × V tensors (the logits, a softmax temporary, the softcap
factor).
"""
from __future__ import annotations

import torch

from tisdpo_kernels._common import first_order, kept_columns
from tisdpo_kernels._torch.common import (
    HeadGrads, chunk_logits, chunk_size, chunks, kept_rows, logsumexp, masked, no_autocast,
    softcap_grad_factor, stat_dtype, valid_and_safe,
)
from tisdpo_kernels.config import HeadOptions

__all__ = ["linear_logprobs"]


def _chunk_fwd(h, weight, bias, safe, softcap):
    """(logp, lse) [C] of one chunk; its [C, V] logits die on return."""
    z = chunk_logits(h, weight, bias, softcap)                              # [C, V]
    lse = logsumexp(z)
    return z.gather(1, safe[:, None]).squeeze(1) - lse, lse


def _chunk_dz(h, weight, bias, safe, lse, p_coef, g_logp, softcap, valid, filter_eps):
    """(dz, cols): d loss / d (pre-bias logits) [C, V] of one chunk, from its recomputed
    logits, and the columns a filtered backward keeps (None: all; ``kept_columns``)."""
    z = chunk_logits(h, weight, bias, softcap)                              # [C, V]
    cap = softcap_grad_factor(z, softcap)
    p = z.sub_(lse[:, None]).exp_()                                         # 0 on ignored rows
    cols = None if filter_eps is None else kept_columns(p.amax(0), safe, valid, filter_eps)
    dz = p.mul_(p_coef[:, None])                                            # (g_lse − g_logp)·p
    dz.scatter_add_(1, safe[:, None], g_logp[:, None])                      # + g_logp·onehot
    return (dz if cap is None else dz.mul_(cap)), cols


def linear_logprobs_fwd(hidden, weight, targets, bias, opts: HeadOptions, chunk: int):
    """(logp [N], raw lse [N]): logp is 0 where ignored; lse is unmasked (for the backward)."""
    n = hidden.shape[0]
    sd = stat_dtype(hidden.dtype)
    valid, safe = valid_and_safe(targets, opts.ignore_index)
    logp = torch.empty(n, dtype=sd, device=hidden.device)
    lse = torch.empty(n, dtype=sd, device=hidden.device)
    with no_autocast(hidden.device):
        for s, e in chunks(n, chunk):
            logp[s:e], lse[s:e] = _chunk_fwd(kept_rows(hidden[s:e], valid[s:e]), weight, bias,
                                             safe[s:e], opts.softcap)
    return masked(logp, valid), lse


def linear_logprobs_bwd(hidden, weight, targets, bias, lse, g_logp, g_lse, opts: HeadOptions,
                        chunk: int, needs: tuple[bool, bool, bool]):
    """(d_hidden, d_weight, d_bias) for upstream grads g_logp, g_lse [N]; None where not needed.

    Each chunk's dz goes straight into :class:`HeadGrads` (no name holds it across chunks,
    so one chunk's [C, V] buffers are freed before the next chunk's are made).
    """
    sd = stat_dtype(hidden.dtype)
    valid, safe = valid_and_safe(targets, opts.ignore_index)
    g_logp = masked(g_logp.to(sd), valid)
    p_coef = masked(g_lse.to(sd), valid) - g_logp                           # multiplies p
    # ignored rows contribute exactly nothing, whatever their hidden state (even NaN/inf):
    # they are recomputed from zeros (``kept_rows``) against lse = +inf, so p = 0 and their
    # dz row is exactly 0, without another pass over the [C, V] chunk
    lse = torch.where(valid, lse, float("inf"))
    grads = HeadGrads(hidden, weight, bias, *needs)
    with no_autocast(hidden.device):
        for s, e in chunks(hidden.shape[0], chunk):
            h = kept_rows(hidden[s:e], valid[s:e])
            grads.add(s, e, h, *_chunk_dz(h, weight, bias, safe[s:e], lse[s:e], p_coef[s:e],
                                          g_logp[s:e], opts.softcap, valid[s:e],
                                          opts.filter_eps))
    return grads.finish()


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, opts: HeadOptions, chunk: int):
        logp, lse = linear_logprobs_fwd(hidden, weight, targets, bias, opts, chunk)
        ctx.save_for_backward(hidden, weight, targets, bias, lse)
        ctx.opts, ctx.chunk = opts, chunk
        valid = targets != opts.ignore_index
        return logp, masked(lse, valid)

    @staticmethod
    @first_order("linear_logprobs")
    def backward(ctx, g_logp, g_lse):
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dh, dw, db = linear_logprobs_bwd(hidden, weight, targets, bias, lse, g_logp, g_lse,
                                         ctx.opts, ctx.chunk, (needs[0], needs[1], needs[3]))
        return dh, dw, None, db, None, None


def linear_logprobs(hidden, weight, targets, bias, opts: HeadOptions, *,
                    chunk_tokens: int | None = None):
    """(logp [N], lse [N]) for hidden [N, D], weight [V, D], targets [N] int64, bias [V]|None.

    float32 outputs (float64 for float64 inputs), 0 where ``targets == opts.ignore_index``;
    differentiable in hidden, weight and bias through both outputs. ``chunk_tokens``
    overrides ``TISDPO_CHUNK_TOKENS`` (tokens per chunk; C × V logits at most).
    """
    return LinearLogprobsFunction.apply(hidden, weight, targets, bias, opts,
                                        chunk_size(chunk_tokens, weight.shape[0]))
